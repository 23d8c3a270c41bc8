//! SmolLM2 end to end on the GPU backends: CUDA (and Vulkan through wgpu, on a hardware
//! device) against the CPU backend and the float64 reference, greedy decoding, and the
//! count of explicit copies while decoding.
//!
//! Without the device each test prints "skipped: ..." and passes; with
//! `SAMEPAGE_REQUIRE_GPU=1` a missing CUDA device fails instead. Vulkan tests need a
//! hardware Vulkan device: a software one (lavapipe) is covered by the wgpu crate's own
//! tests, so here it is skipped even then.
use samepage::{GenOptions, LoadOptions, Session};
use serde_json::{json, Value};

use crate::{fixtures, rel_err, smollm2};

const VOCAB: usize = 49152;

fn require_gpu() -> bool {
    std::env::var("SAMEPAGE_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Whether the named GPU backend is usable here; prints why not and decides skip or fail.
fn available(backend: &str) -> bool {
    match samepage::backend(backend) {
        Ok(_b) => {
            // A software Vulkan device (lavapipe) is left to the wgpu crate's own tests.
            #[cfg(feature = "wgpu")]
            if backend == "vulkan" {
                if let Ok(w) = samepage_backend_wgpu::WgpuBackend::new() {
                    let ad = w.adapter().to_lowercase();
                    if ["llvmpipe", "lavapipe", "swiftshader"].iter().any(|s| ad.contains(s)) {
                        eprintln!("skipped: only a software Vulkan device ({ad})");
                        return false;
                    }
                    eprintln!("vulkan adapter: {}", w.adapter());
                }
            }
            true
        }
        Err(e) => {
            let what = if backend == "cuda" { "CUDA" } else { "Vulkan" };
            if require_gpu() && backend == "cuda" {
                panic!("SAMEPAGE_REQUIRE_GPU=1 but there is no CUDA device: {e}");
            }
            eprintln!("skipped: no {what} device ({e})");
            false
        }
    }
}

fn session(backend: &str) -> Session {
    Session::load(
        &smollm2(),
        &LoadOptions {
            backend: backend.into(),
            ctx: 512,
            ..LoadOptions::default()
        },
        None,
    )
    .unwrap_or_else(|e| panic!("load SmolLM2 on {backend}: {e:#}"))
}

fn reference() -> (Value, Vec<f32>) {
    let j: Value = serde_json::from_slice(&std::fs::read(fixtures().join("smollm2_reference.json")).unwrap()).unwrap();
    let bin = std::fs::read(fixtures().join("smollm2_reference_logits.bin")).unwrap();
    let logits = bin
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (j, logits)
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

/// Logits of every reference prompt on `backend`, against the CPU backend (which
/// quantizes activations to 8 bits, so ~1e-2 apart) and against the float64 reference.
fn logits_match(backend: &str) {
    if !available(backend) {
        return;
    }
    let (j, all) = reference();
    let mut gpu = session(backend);
    let mut cpu = session("cpu");
    for p in j["prompts"].as_array().unwrap() {
        let tokens = ids(&p["ids"]);
        let row = p["logits_row"].as_u64().unwrap() as usize;
        let want = &all[row * VOCAB..(row + 1) * VOCAB];
        let got = gpu.forward(&tokens, 0, false).unwrap().pop().unwrap();
        let on_cpu = cpu.forward(&tokens, 0, false).unwrap().pop().unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "{}: non-finite logits", p["name"]);
        let (e_ref, e_cpu) = (rel_err(&got, want), rel_err(&got, &on_cpu));
        eprintln!(
            "{backend} {}: {} tokens, normalised logit error vs float64 {e_ref:.2e}, vs cpu backend {e_cpu:.2e} (cpu vs float64 {:.2e})",
            p["name"],
            tokens.len(),
            rel_err(&on_cpu, want)
        );
        assert!(
            e_ref < 3e-2,
            "{backend} {}: error vs float64 {e_ref} >= 3e-2",
            p["name"]
        );
        assert!(e_cpu < 3e-2, "{backend} {}: error vs cpu {e_cpu} >= 3e-2", p["name"]);
        assert_eq!(
            argmax(&got) as u64,
            p["top10_ids"][0].as_u64().unwrap(),
            "{backend} {}: top token",
            p["name"]
        );
    }
    // The whole-prompt (every position) logits agree too, and the decode graph agrees
    // with the prefill.
    let prompt = gpu.tokenize("The capital of France is", false, true).unwrap();
    let a = gpu.forward(&prompt, 0, true).unwrap();
    let b = cpu.forward(&prompt, 0, true).unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let e = rel_err(x, y);
        assert!(e < 3e-2, "{backend}: position {i}: error vs cpu {e}");
    }
}

#[test]
fn cuda_logits_match_cpu_and_float64() {
    logits_match("cuda");
}

#[test]
fn vulkan_logits_match_cpu_and_float64() {
    logits_match("vulkan");
}

fn greedy_paris(backend: &str) {
    if !available(backend) {
        return;
    }
    let mut s = session(backend);
    let prompt = s.tokenize("The capital of France is", false, true).unwrap();
    let opts = GenOptions {
        max_tokens: 8,
        temperature: 0.0,
        ..GenOptions::default()
    };
    let g = s.generate(json!({"tokens": prompt}), &opts, false, |_| false).unwrap();
    eprintln!("{backend}: {:?} -> {:?}", "The capital of France is", g.text);
    assert!(g.text.starts_with(" Paris"), "{backend}: got {:?}", g.text);
    // Decoding (the replayed graph) agrees with a prefill of the same tokens.
    let mut all = prompt.clone();
    all.extend(&g.tokens[..3]);
    let logits = s.forward(&all, 0, true).unwrap();
    for (i, t) in g.tokens[..4].iter().enumerate() {
        assert_eq!(argmax(&logits[prompt.len() - 1 + i]) as u32, *t, "{backend}: step {i}");
    }
}

#[test]
fn cuda_greedy_says_paris() {
    greedy_paris("cuda");
}

#[test]
fn vulkan_greedy_says_paris() {
    greedy_paris("vulkan");
}

/// No explicit copy call (`cuMemcpy*`) while decoding 100 tokens: the guest's memory is the
/// GPU's memory. Also prints the decode speed of this run.
#[test]
fn cuda_decode_of_100_tokens_makes_no_copies() {
    if !available("cuda") {
        return;
    }
    let mut s = session("cuda");
    let prompt = s.tokenize("Once upon a time", false, true).unwrap();
    let opts = GenOptions {
        max_tokens: 100,
        temperature: 0.0,
        ignore_eos: true,
        ..GenOptions::default()
    };
    // Warm-up: the first generation captures the decode graph.
    s.generate(
        json!({"tokens": prompt}),
        &GenOptions {
            max_tokens: 4,
            ..opts.clone()
        },
        false,
        |_| false,
    )
    .unwrap();
    #[cfg(feature = "cuda")]
    let before = samepage_backend_cuda::copy_calls();
    let g = s.generate(json!({"tokens": prompt}), &opts, false, |_| false).unwrap();
    assert_eq!(g.completion_tokens, 100);
    #[cfg(feature = "cuda")]
    {
        let after = samepage_backend_cuda::copy_calls();
        eprintln!(
            "cuda: 100 decoded tokens, {} explicit copies ({} in the whole process), {:.1} tok/s",
            after - before,
            after,
            g.completion_tokens as f64 / (g.gen_ns as f64 * 1e-9)
        );
        assert_eq!(after - before, 0, "explicit copies while decoding");
        assert_eq!(after, 0, "explicit copies in this process");
    }
}

/// SmolLM2 generation speed through Vulkan (a measurement, printed; not asserted).
#[test]
fn vulkan_tg128_speed() {
    if !available("vulkan") {
        return;
    }
    let mut s = session("vulkan");
    let opts = GenOptions {
        max_tokens: 128,
        temperature: 0.0,
        ignore_eos: true,
        ..GenOptions::default()
    };
    s.generate(
        json!({"tokens": [1u32]}),
        &GenOptions {
            max_tokens: 4,
            ..opts.clone()
        },
        false,
        |_| false,
    )
    .unwrap();
    let g = s.generate(json!({"tokens": [1u32]}), &opts, false, |_| false).unwrap();
    eprintln!(
        "vulkan: SmolLM2 tg{}: {:.1} tok/s",
        g.completion_tokens,
        g.completion_tokens as f64 / (g.gen_ns as f64 * 1e-9)
    );
}
