//! SmolLM2 end to end on the wgpu backend (Vulkan; lavapipe in CI): logits against the
//! float64 reference, greedy decoding, and the zero-copy check. Skips without a Vulkan
//! device unless `SAMEPAGE_REQUIRE_GPU=1`.
use samepage::{GenOptions, LoadOptions, Session};
use serde_json::{json, Value};

use crate::{fixtures, rel_err, smollm2};

fn session() -> Option<Session> {
    let opts = LoadOptions {
        backend: "vulkan".into(),
        ctx: 64,
        vocab_only: false,
    };
    match Session::load(&smollm2(), &opts, None) {
        Ok(s) => Some(s),
        Err(e) if std::env::var_os("SAMEPAGE_REQUIRE_GPU").is_some_and(|v| v == "1") => {
            panic!("SAMEPAGE_REQUIRE_GPU=1 but the Vulkan backend is unavailable: {e:#}")
        }
        Err(e) => {
            eprintln!("skipped: no Vulkan device ({e:#})");
            None
        }
    }
}

#[test]
fn smollm2_on_vulkan_matches_the_reference() {
    let Some(mut s) = session() else { return };
    assert_eq!(
        s.instance().data_ptr(),
        s.instance().region().base(),
        "the guest's memory is the imported region"
    );
    let j: Value = serde_json::from_slice(&std::fs::read(fixtures().join("smollm2_reference.json")).unwrap()).unwrap();
    let bin = std::fs::read(fixtures().join("smollm2_reference_logits.bin")).unwrap();
    let all: Vec<f32> = bin
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let p = &j["prompts"][0];
    let tokens: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
    let got = s.forward(&tokens, 0, false).unwrap().pop().unwrap();
    let e = rel_err(&got, &all[..49152]);
    eprintln!("vulkan: normalised logit error {e:.2e}");
    assert!(e < 3e-2, "normalised error {e}");
    let want: Vec<u32> = serde_json::from_value(p["greedy"]["ids"].clone()).unwrap();
    let opts = GenOptions {
        max_tokens: 4,
        temperature: 0.0,
        ..GenOptions::default()
    };
    let g = s
        .generate(json!({ "tokens": tokens }), &opts, false, |_| false)
        .unwrap();
    assert_eq!(g.tokens, want[..4], "greedy tokens");
}
