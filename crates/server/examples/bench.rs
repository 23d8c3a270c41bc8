//! Serving benchmark (not a timed test): prints markdown tables.
//!
//! ```text
//! cargo run -p samepage-server --example bench -- MODEL.gguf [backend] [parallel]
//! (the dev profile is optimised: opt-level 3)
//! ```
//!
//! 1. Memory of N workers (N = 1 and 4): RSS counts a shared file page once per mapping,
//!    PSS splits it between mappings, so PSS of the file-backed pages stays at the weights'
//!    size when the weights are shared.
//! 2. Aggregate generated tok/s and time to first token (p50/p99, queueing included) at
//!    1, 4, 16 and 64 concurrent streaming clients against an in-process server.
//! 3. KV snapshot restore (open + check + write into the region) against re-prefill, at
//!    24, 512 and 4096 tokens.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use samepage::{Host, LoadOptions, Session};
use samepage_server::snapshot::Snapshot;
use samepage_server::{Config, Server, Worker};
use serde_json::{json, Value};

fn smaps() -> (f64, f64, f64, f64) {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let kb = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(&format!("{k}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kb("Rss"), kb("Pss"), kb("Pss_File"), kb("Pss_Anon"))
}

fn load(host: &Host, model: &Path, ctx: u32) -> Session {
    let opts = LoadOptions {
        backend: String::new(),
        ctx,
        vocab_only: false,
    };
    Session::load_on(host, model, &opts, None).expect("load the model")
}

fn memory(host: &Host, model: &Path) {
    println!("\n### Memory of N worker sessions (ctx 1024 each; after one 8-token generation per worker)\n");
    println!("| workers | RSS MiB | PSS MiB | PSS file-backed MiB | PSS anon MiB |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for n in [1, 4] {
        let mut ws: Vec<Session> = (0..n).map(|_| load(host, model, 1024)).collect();
        for w in &mut ws {
            let opts = samepage::GenOptions {
                max_tokens: 8,
                ..Default::default()
            };
            w.generate(json!({"prompt": "Hello"}), &opts, false, |_| false).unwrap();
        }
        let (rss, pss, pf, pa) = smaps();
        println!("| {n} | {rss:.0} | {pss:.0} | {pf:.0} | {pa:.0} |");
        drop(ws);
    }
}

async fn one_client(c: reqwest::Client, url: String, i: usize, max_tokens: u32) -> (Duration, usize) {
    let t = Instant::now();
    let body = json!({"prompt": format!("Request {i}: tell me a story about number {i}."),
                      "max_tokens": max_tokens, "ignore_eos": true, "stream": true, "temperature": 0.8, "seed": i});
    let mut r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ttft = None;
    let mut buf = String::new();
    let mut tokens = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            let Some(d) = ev.trim().strip_prefix("data: ") else {
                continue;
            };
            if d == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(d).unwrap();
            if v["choices"][0]["text"].as_str().is_some_and(|s| !s.is_empty()) && ttft.is_none() {
                ttft = Some(t.elapsed());
            }
            if v["choices"][0]["finish_reason"].is_string() {
                tokens = max_tokens as usize;
            }
        }
    }
    (ttft.unwrap_or(t.elapsed()), tokens)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

fn load_test(host: Arc<Host>, model: PathBuf, parallel: usize) {
    let h2 = host.clone();
    let m2 = model.clone();
    let factory: samepage_server::Factory = Arc::new(move |vocab_only| {
        let opts = LoadOptions {
            backend: String::new(),
            ctx: 512,
            vocab_only,
        };
        Ok(Box::new(Session::load_on(&h2, &m2, &opts, None)?) as Box<dyn Worker>)
    });
    let cfg = Config {
        model_id: "bench".into(),
        parallel,
        queue: 256,
        session_dir: std::env::temp_dir().join("samepage-bench-sessions"),
    };
    let server = Server::new(cfg, factory).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(server.serve(listener, std::future::pending()));
        let c = reqwest::Client::new();
        one_client(c.clone(), url.clone(), 0, 4).await; // warm-up
        println!(
            "\n### Concurrent streaming clients (server --parallel {parallel}, ctx 512, 32 generated tokens per request)\n"
        );
        println!("| clients | requests | wall s | aggregate gen tok/s | TTFT p50 ms | TTFT p99 ms |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for clients in [1usize, 4, 16, 64] {
            let per_client = if clients == 1 { 4 } else { 1 };
            let t = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|k| {
                    let (c, url) = (c.clone(), url.clone());
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        for j in 0..per_client {
                            out.push(one_client(c.clone(), url.clone(), k * 100 + j, 32).await);
                        }
                        out
                    })
                })
                .collect();
            let mut ttfts = Vec::new();
            let mut tokens = 0;
            for task in tasks {
                for (ttft, n) in task.await.unwrap() {
                    ttfts.push(ttft);
                    tokens += n;
                }
            }
            let wall = t.elapsed().as_secs_f64();
            println!(
                "| {clients} | {} | {wall:.2} | {:.1} | {:.0} | {:.0} |",
                ttfts.len(),
                tokens as f64 / wall,
                pct(&mut ttfts, 0.5),
                pct(&mut ttfts, 0.99)
            );
        }
    });
}

fn snapshots(host: &Host, model: &Path) {
    let mut s = load(host, model, 4200);
    let vocab = s.model["vocab"].as_u64().unwrap() as u32;
    let dir = std::env::temp_dir().join("samepage-bench-snapshots");
    std::fs::create_dir_all(&dir).unwrap();
    println!("\n### KV snapshot restore vs re-prefill (f32 cache)\n");
    println!(
        "| tokens | file MiB | re-prefill ms | save ms | restore ms (open + CRC check + write) | of which write into region ms | speed-up |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in [24usize, 512, 4096] {
        let toks: Vec<u32> = (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab)
            .collect();
        let reps = if n >= 4096 { 1 } else { 3 };
        let mut prefill = f64::MAX;
        for _ in 0..reps {
            s.reset().unwrap();
            let t = Instant::now();
            s.forward(&toks, 0, false).unwrap();
            prefill = prefill.min(t.elapsed().as_secs_f64() * 1e3);
        }
        let path = dir.join(format!("bench-{n}.safetensors"));
        let t = Instant::now();
        let saved = s.save_session(&path, &[]).unwrap();
        let save_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut restore = f64::MAX;
        let mut write = f64::MAX;
        for _ in 0..5 {
            s.reset().unwrap();
            let t = Instant::now();
            let snap = Snapshot::open(&path).unwrap();
            let t1 = Instant::now();
            snap.restore(&mut s, None).unwrap();
            restore = restore.min(t.elapsed().as_secs_f64() * 1e3);
            write = write.min(t1.elapsed().as_secs_f64() * 1e3);
        }
        // The restored cache is the prefilled one: the next token's logits agree exactly.
        let a = s.forward(&[1], n as u32, false).unwrap();
        s.reset().unwrap();
        s.forward(&toks, 0, false).unwrap();
        let b = s.forward(&[1], n as u32, false).unwrap();
        assert_eq!(a, b, "the restored cache differs from the prefilled one");
        println!(
            "| {n} | {:.1} | {prefill:.1} | {save_ms:.1} | {restore:.2} | {write:.2} | {:.0}x |",
            saved.bytes as f64 / (1u64 << 20) as f64,
            prefill / restore
        );
        let _ = std::fs::remove_file(&path);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().expect("usage: bench MODEL.gguf [backend] [parallel]"));
    let backend = args.next().unwrap_or_else(|| "cpu".into());
    let parallel: usize = args.next().and_then(|p| p.parse().ok()).unwrap_or(4);
    let host = Arc::new(Host::new(&backend).unwrap());
    println!(
        "model {} | backend {} | {} CPUs",
        model.display(),
        host.backend,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    memory(&host, &model);
    load_test(host.clone(), model.clone(), parallel);
    snapshots(&host, &model);
}
