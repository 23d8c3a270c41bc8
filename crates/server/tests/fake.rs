//! The server and the snapshot format against a fake worker (no model): refused
//! snapshots never touch the cache, and a client that disconnects stops its generation.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use samepage_backend::Mem;
use samepage_server::snapshot::{self, Snapshot};
use samepage_server::{Config, Server, Worker};
use serde_json::{json, Value};

const LAYERS: u64 = 2;
const HEADS: u64 = 2;
const HEAD_DIM: u64 = 4;
const CTX: u64 = 16;
const ROW: u64 = HEAD_DIM * 4;
const LAYER_BYTES: u64 = HEADS * CTX * ROW;

/// A guest stand-in: a KV cache in a byte array laid out like the LLM guest's.
struct Fake {
    mem: Box<[u64]>,
    hash: String,
    tokens: Vec<u32>,
    cancelled: Arc<AtomicUsize>,
    step: Duration,
}

impl Fake {
    fn new(hash: &str, fill: u8) -> Fake {
        let mut f = Fake {
            mem: vec![0u64; 8192].into_boxed_slice(),
            hash: hash.into(),
            tokens: Vec::new(),
            cancelled: Arc::new(AtomicUsize::new(0)),
            step: Duration::from_millis(10),
        };
        let (k, _) = (Fake::k(), Fake::v());
        let bytes = f.bytes_mut();
        for (i, b) in bytes[k as usize..(k + 2 * LAYERS * LAYER_BYTES) as usize]
            .iter_mut()
            .enumerate()
        {
            *b = fill.wrapping_add(i as u8);
        }
        f
    }
    fn k() -> u64 {
        1024
    }
    fn v() -> u64 {
        1024 + LAYERS * LAYER_BYTES
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let n = self.mem.len() * 8;
        // SAFETY: the u64 array reinterpreted as bytes.
        unsafe { std::slice::from_raw_parts_mut(self.mem.as_mut_ptr() as *mut u8, n) }
    }
    fn bytes(&self) -> Vec<u8> {
        let n = self.mem.len() * 8;
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr() as *const u8, n) }.to_vec()
    }
}

impl Worker for Fake {
    fn call(&mut self, req: Value) -> Result<Value> {
        match req["cmd"].as_str().unwrap_or("") {
            "info" => Ok(self.model()),
            "kv_layout" => {
                let layers: Vec<Value> = (0..LAYERS)
                    .map(|l| json!({"k": Fake::k() + l * LAYER_BYTES, "v": Fake::v() + l * LAYER_BYTES}))
                    .collect();
                Ok(
                    json!({"format": 1, "model_hash": self.hash, "arch": "fake", "n_layers": LAYERS,
                    "n_kv_heads": HEADS, "head_dim": HEAD_DIM, "vocab": 1000, "ctx": CTX, "cache_dtype": "f32",
                    "layers": layers, "head_stride": CTX * ROW, "row_bytes": ROW, "tokens": self.tokens,
                    "pos": self.tokens.len(), "pending": null}),
                )
            }
            "kv_restore" => {
                self.tokens = serde_json::from_value(req["tokens"].clone())?;
                Ok(json!({"ok": true}))
            }
            "reset" => {
                self.tokens.clear();
                Ok(json!({"ok": true}))
            }
            "prompt_tokens" => {
                let p = req["prompt"].as_str().unwrap_or("x");
                Ok(json!({"tokens": p.bytes().map(u32::from).collect::<Vec<_>>()}))
            }
            c => bail!("unknown command {c}"),
        }
    }

    fn generate(&mut self, req: Value, mut on_text: Box<dyn FnMut(&str) -> bool + Send>) -> Result<Value> {
        let n = req["max_tokens"].as_u64().unwrap_or(4);
        let mut text = String::new();
        for i in 0..n {
            std::thread::sleep(self.step);
            let piece = format!("t{i} ");
            text.push_str(&piece);
            if on_text(&piece) {
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                return Ok(json!({"text": text, "finish_reason": "cancelled", "prompt_tokens": 1,
                                 "completion_tokens": i + 1}));
            }
        }
        Ok(json!({"text": text, "finish_reason": "length", "prompt_tokens": 1, "completion_tokens": n}))
    }

    fn mem(&self) -> Mem {
        // SAFETY: the array lives as long as the worker; callers use it between calls.
        unsafe { Mem::new(self.mem.as_ptr() as *mut u8, self.mem.len() * 8) }
    }

    fn model(&self) -> Value {
        json!({"name": "fake", "arch": "fake", "ctx": CTX, "model_hash": self.hash})
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("samepage-server-fake-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn snapshot_round_trip_and_refusals_never_touch_the_cache() {
    let mut a = Fake::new("aaaa", 7);
    a.tokens = (1..=10).collect();
    let path = tmp("a.safetensors");
    let saved = snapshot::save(&mut a, &path, &[("note", "hi".into())]).unwrap();
    assert_eq!(saved.tokens, 10);
    let snap = Snapshot::open(&path).unwrap();
    assert_eq!(snap.tokens, (1..=10).collect::<Vec<u32>>());
    assert_eq!(snap.extra("note"), Some("hi"));

    // Same model: the first 10 positions of every head come back, the rest is untouched.
    let mut c = Fake::new("aaaa", 100);
    let before = c.bytes();
    assert_eq!(snap.restore(&mut c, None).unwrap(), 10);
    assert_eq!(c.tokens, (1..=10).collect::<Vec<u32>>());
    let (am, cm) = (a.bytes(), c.bytes());
    for base in [Fake::k(), Fake::v()] {
        for l in 0..LAYERS {
            for h in 0..HEADS {
                let o = (base + l * LAYER_BYTES + h * CTX * ROW) as usize;
                let n = (10 * ROW) as usize;
                assert_eq!(cm[o..o + n], am[o..o + n]);
                assert_eq!(
                    cm[o + n..o + (CTX * ROW) as usize],
                    before[o + n..o + (CTX * ROW) as usize]
                );
            }
        }
    }
    // A prefix only.
    let mut c2 = Fake::new("aaaa", 100);
    assert_eq!(snap.restore(&mut c2, Some(3)).unwrap(), 3);
    assert_eq!(c2.tokens, vec![1, 2, 3]);

    // Another model: refused before anything is written.
    let mut b = Fake::new("bbbb", 50);
    b.tokens = vec![9, 9];
    let before = b.bytes();
    let e = snap.restore(&mut b, None).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    assert_eq!(b.bytes(), before);
    assert_eq!(b.tokens, vec![9, 9]);

    // Truncated, corrupt, extended, or not a snapshot: refused at open.
    let good = std::fs::read(&path).unwrap();
    let mut corrupt = good.clone();
    let n = corrupt.len();
    corrupt[n - 3] ^= 0x10;
    let mut header = good.clone();
    let i = header.windows(7).position(|w| w == b"samepag").unwrap();
    header[i] = b'X';
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("trunc", good[..good.len() - 1].to_vec(), "truncated"),
        ("trunc2", good[..20].to_vec(), "truncated"),
        ("long", [good.clone(), vec![0]].concat(), "truncated"),
        ("corrupt", corrupt, "corrupt"),
        ("header", header, "format"),
        ("empty", vec![], "truncated"),
    ];
    for (name, bytes, needle) in cases {
        let p = tmp(&format!("{name}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", Snapshot::open(&p).unwrap_err());
        assert!(
            e.contains(needle) && e.contains("not a usable KV snapshot"),
            "{name}: {e}"
        );
    }
}

async fn start(parallel: usize, queue: usize, cancelled: Arc<AtomicUsize>) -> String {
    let c2 = cancelled.clone();
    let factory: samepage_server::Factory = Arc::new(move |_vocab_only| {
        let mut f = Fake::new("aaaa", 1);
        f.cancelled = c2.clone();
        Ok(Box::new(f) as Box<dyn Worker>)
    });
    let cfg = Config {
        model_id: "fake".into(),
        parallel,
        queue,
        session_dir: tmp("sessions"),
    };
    let server = tokio::task::spawn_blocking(move || Server::new(cfg, factory))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server.serve(listener, std::future::pending()));
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_slot() {
    let cancelled = Arc::new(AtomicUsize::new(0));
    let url = start(1, 0, cancelled.clone()).await;
    let c = reqwest::Client::new();
    // Streamed: read one chunk, then drop the response.
    let mut r = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 10000, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    // While it runs, the only slot is taken: 503 in OpenAI's shape.
    let busy = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 503);
    let v: Value = busy.json().await.unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
    drop(r);
    let t = Instant::now();
    while cancelled.load(Ordering::SeqCst) < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the generation was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not streamed: the client gives up (timeout) and the generation stops too.
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let _ = short
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 10000}))
        .send()
        .await;
    let t = Instant::now();
    while cancelled.load(Ordering::SeqCst) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a non-streamed request whose client left was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], "t0 t1 t2 ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}
