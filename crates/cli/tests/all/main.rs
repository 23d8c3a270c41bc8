//! End-to-end tests: the LLM guest on the CPU backend against references we did not write
//! (Hugging Face transformers, a float64 numpy implementation, the Python `tokenizers`
//! library), and the CLI's handling of bad input.
mod cli;
mod gpu;
mod hf;
mod serve;
mod smollm2;
mod tokenizer;
mod vulkan;

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// The SmolLM2 GGUF: `$SAMEPAGE_MODEL`, else fetched by scripts/fetch-model.sh.
pub fn smollm2() -> PathBuf {
    if let Some(p) = std::env::var_os("SAMEPAGE_MODEL") {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new(repo().join("scripts/fetch-model.sh"))
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(s.lines().last().unwrap().trim())
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}
