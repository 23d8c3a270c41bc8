//! Tiny random Llama / Llama-3-RoPE / Qwen2 models saved by Hugging Face transformers
//! (scripts/gen_hf_fixtures.py), with transformers' logits at every position.
use samepage::{LoadOptions, Session};
use serde_json::Value;

use crate::{fixtures, rel_err};

fn check(name: &str) {
    let dir = fixtures().join("hf").join(name);
    let j: Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let mut s = Session::load(
        &dir,
        &LoadOptions {
            ctx: 64,
            ..LoadOptions::default()
        },
        None,
    )
    .unwrap_or_else(|e| panic!("{name}: load failed: {e:#}"));
    for (seq, want) in j["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(j["logits"].as_array().unwrap())
    {
        let tokens: Vec<u32> = serde_json::from_value(seq.clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(want.clone()).unwrap();
        let got = s.forward(&tokens, 0, true).unwrap();
        assert_eq!(got.len(), tokens.len());
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(g, w);
            assert!(
                e < 1e-4,
                "{name}: position {t} of {}: relative error {e:.2e}",
                tokens.len()
            );
        }
    }
}

#[test]
fn llama_matches_transformers() {
    check("llama_tiny");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("llama3_rope_tiny");
}

#[test]
fn qwen2_matches_transformers() {
    check("qwen2_tiny");
}
