//! The `samepage` binary: the main job, and one clear sentence with a non-zero exit for
//! each kind of bad input.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::smollm2;

fn samepage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(args)
        .output()
        .expect("run samepage")
}

/// `samepage run -m MODEL ARGS...`
fn run(model: &Path, args: &[&str]) -> Output {
    let mut all = vec!["run", "-m", model.to_str().unwrap()];
    all.extend_from_slice(args);
    samepage(&all)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("samepage-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// The command failed with one `error: ...` sentence on stderr and no panic.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "no error line: {err}");
    assert!(
        last.to_lowercase().contains(&needle.to_lowercase()),
        "error {last:?} does not mention {needle:?}"
    );
}

/// A minimal GGUF v3 writer: llama metadata and the given tensors `(name, ggml type, dims)`,
/// with `data_len` bytes of tensor data (a sparse file when large).
fn write_gguf(path: &Path, tensors: &[(&str, u32, &[u64])], data_len: u64) {
    fn s(b: &mut Vec<u8>, v: &str) {
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
    }
    fn kv_u32(b: &mut Vec<u8>, k: &str, v: u32) {
        s(b, k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend(9u64.to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    kv_u32(&mut b, "llama.block_count", 1);
    kv_u32(&mut b, "llama.embedding_length", 64);
    kv_u32(&mut b, "llama.feed_forward_length", 128);
    kv_u32(&mut b, "llama.attention.head_count", 4);
    kv_u32(&mut b, "llama.attention.head_count_kv", 4);
    kv_u32(&mut b, "llama.context_length", 256);
    kv_u32(&mut b, "llama.vocab_size", 256);
    s(&mut b, "llama.rope.freq_base");
    b.extend(6u32.to_le_bytes());
    b.extend(10000f32.to_le_bytes());
    let mut off = 0u64;
    for (name, ty, dims) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
        off += 4096;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    let f = std::fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut &f, &b).unwrap();
    f.set_len(b.len() as u64 + data_len).unwrap();
}

#[test]
fn the_capital_of_france_is_paris() {
    let m = smollm2();
    let out = run(
        &m,
        &["-p", "The capital of France is", "--raw", "--temp", "0", "-n", "4"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with(" Paris"), "continued with {stdout:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tok/s"), "no summary line: {err}");
}

#[test]
fn chat_completion_with_the_template() {
    let m = smollm2();
    let out = run(&m, &["-p", "What is 2+2?", "--temp", "0", "-n", "16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains('4'), "answer: {stdout:?}");
    assert!(
        !stdout.contains("<|im_end|>"),
        "the end-of-turn token leaked: {stdout:?}"
    );
}

#[test]
fn tokenize_prints_ids() {
    let m = smollm2();
    let out = samepage(&[
        "tokenize",
        "-m",
        m.to_str().unwrap(),
        "--no-bos",
        "The capital of France is",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "504 3575 282 4649 314");
}

#[test]
fn tokenize_works_on_a_vocab_only_gguf() {
    // The SmolLM2 header alone (metadata and tensor infos, no tensor data) is a vocab-only
    // file as far as the tokenizer is concerned.
    let m = smollm2();
    let bytes = std::fs::read(&m).unwrap();
    let p = tmp("vocab-only.gguf");
    std::fs::write(&p, &bytes[..1_785_664]).unwrap();
    let out = samepage(&["tokenize", "-m", p.to_str().unwrap(), "--no-bos", "Hello world"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn inspect_describes_the_model() {
    let m = smollm2();
    let out = samepage(&["inspect", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("llama") && s.contains("q4_1") && s.contains("blk.0.attn_q.weight"),
        "{s}"
    );
}

#[test]
fn bench_prints_a_table() {
    let m = smollm2();
    let out = samepage(&["bench", "-m", m.to_str().unwrap(), "-p", "16", "-n", "8", "-r", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("| pp16 |") && s.contains("| tg8 |"), "{s}");
}

#[test]
fn invalid_utf8_in_the_prompt_is_handled() {
    let m = smollm2();
    let p = tmp("bad-utf8.txt");
    std::fs::write(&p, b"Hello \xff\xfe world, the capital of France is").unwrap();
    let out = run(&m, &["-f", p.to_str().unwrap(), "--raw", "--temp", "0", "-n", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_missing_file_is_one_sentence() {
    fails_with(
        &samepage(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]),
        "/nonexistent/model.gguf",
    );
}

#[test]
fn a_truncated_gguf_is_refused() {
    let m = smollm2();
    let bytes = std::fs::read(&m).unwrap();
    let p = tmp("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&run(&p, &["-p", "hi"]), "truncated");
    let p = tmp("truncated-header.gguf");
    std::fs::write(&p, &bytes[..100_000]).unwrap();
    fails_with(&run(&p, &["-p", "hi"]), "truncated");
}

#[test]
fn an_unsupported_tensor_type_is_named() {
    let p = tmp("q2k.gguf");
    // ggml type 10 is Q2_K, which samepage does not support.
    write_gguf(&p, &[("token_embd.weight", 10, &[256, 256])], 8192);
    fails_with(&run(&p, &["-p", "hi"]), "q2_k");
}

#[test]
fn a_model_too_big_for_wasm32_says_so() {
    let p = tmp("huge.gguf");
    // An 8 GiB f32 tensor, in a sparse file.
    write_gguf(&p, &[("token_embd.weight", 0, &[65536, 32768])], 8 << 30);
    fails_with(&run(&p, &["-p", "hi"]), "4 GiB");
    let _ = std::fs::remove_file(&p);
}

#[test]
fn a_context_longer_than_the_model_supports_is_refused() {
    let m = smollm2();
    fails_with(&run(&m, &["-p", "hi", "--ctx", "100000"]), "8192");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let m = smollm2();
    let long = "word ".repeat(300);
    fails_with(&run(&m, &["-p", &long, "--raw", "--ctx", "64"]), "context");
}

#[test]
fn an_unknown_backend_is_refused() {
    let m = smollm2();
    fails_with(&run(&m, &["-p", "hi", "--backend", "tpu"]), "tpu");
}

#[test]
fn chat_keeps_the_kv_cache_between_turns() {
    use std::io::Write;
    let m = smollm2();
    let mut child = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args([
            "chat",
            "-m",
            m.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "8",
            "--ctx",
            "512",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Italy?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let turns: Vec<&str> = err.lines().filter(|l| l.contains("generation")).collect();
    assert_eq!(turns.len(), 2, "{err}");
    // The second turn re-renders the conversation; only the new part is prefilled.
    let cached: u64 = turns[1]
        .split(" cached")
        .next()
        .unwrap()
        .rsplit('(')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cached > 20, "second turn reused only {cached} tokens: {}", turns[1]);
}
