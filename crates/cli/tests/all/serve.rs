//! `samepage serve` as a real process on loopback, driven by reqwest (and by the official
//! `openai` Python package when it is installed), and KV-session snapshots across
//! process restarts (`serve`, `run`, `chat`).
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::{fixtures, smollm2};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_samepage")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("samepage-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `samepage serve` child on an ephemeral port; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let model = smollm2();
        let mut child = Command::new(bin())
            .args(["serve", "--backend", "cpu", "--port", "0", "-m"])
            .arg(&model)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start samepage serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut line = String::new();
        let url = loop {
            line.clear();
            if err.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                let _ = child.kill();
                panic!("samepage serve did not start: {line}");
            }
            if let Some(i) = line.find("listening on ") {
                break line[i + "listening on ".len()..].trim().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while err.read_line(&mut sink).unwrap_or(0) > 0 {
                if std::env::var_os("SAMEPAGE_TEST_LOG").is_some() {
                    eprint!("[serve] {sink}");
                }
                sink.clear();
            }
        });
        Server { child, url }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client().post(format!("{}{path}", self.url)).json(body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> Value {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

fn chat(content: &str, max_tokens: u32, seed: u64) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
           "temperature": 0.8, "seed": seed})
}

/// Read an SSE response: the `data:` payloads, `[DONE]` included.
fn sse_events(r: reqwest::blocking::Response) -> Vec<String> {
    let text = r.text().unwrap();
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data:").map(|d| d.trim().to_string()))
        .collect()
}

/// The text and finish reason of a streamed chat or text completion.
fn streamed(s: &Server, path: &str, mut body: Value) -> (String, String) {
    body["stream"] = true.into();
    let r = client().post(format!("{}{path}", s.url)).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = sse_events(r);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let mut text = String::new();
    let mut finish = String::new();
    for e in &ev[..ev.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        text.push_str(c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn serve_endpoints_and_errors() {
    let s = Server::start(&["--parallel", "1", "--queue", "0", "--ctx", "256"]);
    assert_eq!(s.get("/health")["status"], "ok");
    let models = s.get("/v1/models");
    let id = models["data"][0]["id"].as_str().unwrap().to_string();
    assert!(id.contains("SmolLM2"), "{models}");

    // Chat, not streamed and streamed: the same text for the same seed.
    let body = json!({"model": id, "messages": [{"role": "user", "content": "Name three colours."}],
                      "max_tokens": 24, "temperature": 0.7, "seed": 5});
    let (st, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
    let (stext, sfinish) = streamed(&s, "/v1/chat/completions", body.clone());
    assert_eq!(stext, text);
    assert_eq!(sfinish, v["choices"][0]["finish_reason"].as_str().unwrap());

    // Text completions, with a stop string.
    let body = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "stop": [" 7"]});
    let (st, v) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let t = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!t.contains(" 7"), "{t:?}");
    assert_eq!(streamed(&s, "/v1/completions", body).0, t);

    // Tokenize / detokenize.
    let (st, v) = s.post("/tokenize", &json!({"content": "Hello world", "add_special": false}));
    assert_eq!(st, 200);
    let (st, d) = s.post("/detokenize", &json!({"tokens": v["tokens"]}));
    assert_eq!(st, 200);
    assert_eq!(d["content"], "Hello world");

    // Errors, in OpenAI's shape.
    let raw = |path: &str, body: &str| {
        let r = client()
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    for (body, status) in [
        ("{not json", 400),
        ("[]", 400),
        (r#"{"messages": "hi"}"#, 400),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}"#,
            400,
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
            400,
        ),
        (r#"{"messages": [{"role": "user", "content": "hi"}], "stop": 7}"#, 400),
        (
            r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}"#,
            404,
        ),
    ] {
        let (st, v) = raw("/v1/chat/completions", body);
        assert_eq!(st, status, "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    let long = "word ".repeat(400);
    let (st, v) = s.post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(st, 413, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (st, _) = raw("/v1/nowhere", "{}");
    assert_eq!(st, 404);

    // Queue full: one worker, no queue; a long stream holds the worker.
    let long_req = json!({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let mut busy = client()
        .post(format!("{}/v1/completions", s.url))
        .json(&long_req)
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    let _ = busy.read(&mut first).unwrap(); // it is running
    let (st, v) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    drop(busy); // the client leaves: the worker is freed
    let t = Instant::now();
    loop {
        let (st, _) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
        if st == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 64 concurrent clients (bounded: one request each, then the same 64 again sequentially):
/// every response is its own request's, none is lost; then clients that abort midway,
/// and the server stays healthy.
#[test]
fn serve_64_concurrent_clients() {
    let s = Server::start(&["--parallel", "4", "--queue", "128", "--ctx", "512"]);
    let url = s.url.clone();
    let req = |i: u64| {
        let mut b = chat(&format!("Repeat the number {} three times.", 1000 + i * 37), 12, i);
        b["stream"] = i.is_multiple_of(2).into();
        b
    };
    let one = move |url: &str, i: u64| -> String {
        let b = req(i);
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&b)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        if i.is_multiple_of(2) {
            let ev = sse_events(r);
            assert_eq!(ev.last().unwrap(), "[DONE]");
            let mut ids = std::collections::BTreeSet::new();
            let mut text = String::new();
            for e in &ev[..ev.len() - 1] {
                let v: Value = serde_json::from_str(e).unwrap();
                ids.insert(v["id"].as_str().unwrap().to_string());
                text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            }
            assert_eq!(ids.len(), 1, "chunks of several completions in one stream: {ids:?}");
            text
        } else {
            let v: Value = r.json().unwrap();
            v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        }
    };
    let handles: Vec<_> = (0..64u64)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || (i, one(&url, i)))
        })
        .collect();
    let mut concurrent: Vec<(u64, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    concurrent.sort();
    assert_eq!(concurrent.len(), 64);
    for (i, text) in &concurrent {
        assert_eq!(
            *text,
            one(&url, *i),
            "request {i}: the concurrent answer differs from the sequential one"
        );
    }

    // Clients that abort midway (streams dropped after the first bytes, and non-streamed
    // requests given up on by a short timeout).
    let aborts: Vec<_> = (0..16u64)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let b = json!({"prompt": format!("Story {i}:"), "max_tokens": 400, "ignore_eos": true,
                               "stream": i.is_multiple_of(2)});
                let c = Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
                if let Ok(mut r) = c.post(format!("{url}/v1/completions")).json(&b).send() {
                    let mut buf = [0u8; 32];
                    let _ = r.read(&mut buf);
                }
            })
        })
        .collect();
    for h in aborts {
        h.join().unwrap();
    }
    let t = Instant::now();
    loop {
        let h = s.get("/health");
        assert_eq!(h["status"], "ok");
        if h["slots_processing"] == 0 && h["queued"] == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "aborted requests still hold slots: {h}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(one(&url, 3), concurrent[3].1);
}

/// Session snapshots survive a restart of the server process: the continuation after a
/// restore is token for token the one without the restart.
#[test]
fn serve_session_snapshot_survives_restart() {
    let dir = tmpdir("sessions");
    let d = dir.to_str().unwrap();
    let turn1 = json!([{"role": "user", "content": "Tell me about the moon in two sentences."}]);
    let req = |msgs: &Value, sid: Option<&str>| {
        let mut b = json!({"messages": msgs, "max_tokens": 24, "temperature": 0.8, "seed": 11});
        if let Some(id) = sid {
            b["session_id"] = id.into();
        }
        b
    };
    let reply = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let turn2 = |a1: &str| {
        json!([turn1[0], {"role": "assistant", "content": a1},
               {"role": "user", "content": "And about the sun?"}])
    };

    // Without a restart: both turns on one server.
    let (a1, a2) = {
        let s = Server::start(&["--session-dir", d]);
        let (st, v) = s.post("/v1/chat/completions", &req(&turn1, Some("base")));
        assert_eq!(st, 200, "{v}");
        let a1 = reply(&v);
        let (_, v) = s.post("/v1/chat/completions", &req(&turn2(&a1), Some("base")));
        (a1, reply(&v))
    };
    // Turn 1, save, restart, restore, turn 2.
    {
        let s = Server::start(&["--session-dir", d]);
        let (_, v) = s.post("/v1/chat/completions", &req(&turn1, Some("s1")));
        assert_eq!(reply(&v), a1);
        let (st, v) = s.post("/v1/sessions/s1/save", &json!(null));
        assert_eq!(st, 200, "{v}");
    }
    let s = Server::start(&["--session-dir", d]);
    let (st, v) = s.post("/v1/sessions/s1/restore", &json!(null));
    assert_eq!(st, 200, "{v}");
    let n = v["snapshot"]["tokens"].as_u64().unwrap();
    let (_, v) = s.post("/v1/chat/completions", &req(&turn2(&a1), Some("s1")));
    assert_eq!(reply(&v), a2, "the continuation after a restart differs");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 20 && cached <= n, "cached {cached} of a {n}-token snapshot");

    // A prompt saved explicitly, reused automatically by a request without session_id.
    let (st, v) = s.post(
        "/v1/sessions/doc/save",
        &json!({"prompt": "The history of Rome, part one. ".repeat(8)}),
    );
    assert_eq!(st, 200, "{v}");
    drop(s);
    let s = Server::start(&["--session-dir", d]);
    let (st, _) = s.post("/v1/sessions/doc/restore", &json!(null));
    assert_eq!(st, 200);
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": format!("{}Summary:", "The history of Rome, part one. ".repeat(8)), "max_tokens": 4}),
    );
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 60,
        "{v}"
    );

    // Refusals: corrupt, truncated, another model; the server carries on.
    let good = std::fs::read(dir.join("s1.safetensors")).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 10;
    bad[at] ^= 0x40;
    std::fs::write(dir.join("corrupt.safetensors"), &bad).unwrap();
    std::fs::write(dir.join("short.safetensors"), &good[..good.len() / 2]).unwrap();
    other_model_snapshot(&dir.join("other.safetensors"));
    for (id, needle) in [
        ("corrupt", "corrupt"),
        ("short", "truncated"),
        ("other", "another model"),
    ] {
        let (st, v) = s.post(&format!("/v1/sessions/{id}/restore"), &json!(null));
        assert_eq!(st, 400, "{id}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(needle), "{id}: {m}");
    }
    let (st, _) = s.post("/v1/sessions/missing/restore", &json!(null));
    assert_eq!(st, 404);
    assert_eq!(s.get("/health")["status"], "ok");
}

/// A snapshot made with the tiny HF Llama fixture (another model; it has no tokenizer,
/// so its cache is filled from token ids).
fn other_model_snapshot(path: &Path) {
    let opts = samepage::LoadOptions {
        backend: "cpu".into(),
        ..Default::default()
    };
    let mut s = samepage::Session::load(&fixtures().join("hf/llama_tiny"), &opts, None).unwrap();
    s.forward(&[1, 2, 3, 4], 0, false).unwrap();
    let saved = s.save_session(path, &[]).unwrap();
    assert_eq!(saved.tokens, 4);
}

fn samepage_io(args: &[&str], extra: &[&Path], stdin: &str) -> (bool, String, String) {
    let mut c = Command::new(bin())
        .args(args)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `chat --save-session` then `chat --load-session` in a new process continues the
/// conversation exactly as one process would; `run` refuses bad snapshots clearly.
#[test]
fn cli_session_round_trip_and_refusals() {
    let dir = tmpdir("cli");
    let model = smollm2();
    let m = model.to_str().unwrap();
    let f = dir.join("chat.safetensors");
    let args = [
        "chat",
        "--backend",
        "cpu",
        "-m",
        m,
        "-n",
        "20",
        "--temp",
        "0.8",
        "--seed",
        "3",
    ];
    let (ok, both, err) = samepage_io(&args, &[], "What is rust?\nWhy?\n");
    assert!(ok, "{err}");
    let (ok, first, err) = samepage_io(&[&args[..], &["--save-session"]].concat(), &[&f], "What is rust?\n");
    assert!(ok, "{err}");
    assert!(err.contains("saved"), "{err}");
    let (ok, second, err) = samepage_io(&[&args[..], &["--load-session"]].concat(), &[&f], "Why?\n");
    assert!(ok, "{err}");
    assert!(err.contains("restored"), "{err}");
    assert_eq!(format!("{first}{second}"), both, "the restored chat differs");
    // The second turn reused the restored cache: its prompt was not prefilled again.
    assert!(both.lines().count() >= 2);

    // run: a prompt that extends the saved one reuses it.
    let g = dir.join("run.safetensors");
    let run = ["run", "--backend", "cpu", "-m", m, "--raw", "-n", "8", "--temp", "0"];
    let (ok, _, err) = samepage_io(
        &[&run[..], &["-p", "The sky is blue because", "--save-session"]].concat(),
        &[&g],
        "",
    );
    assert!(ok, "{err}");
    let (ok, a, err) = samepage_io(
        &[&run[..], &["-p", "The sky is blue because", "--load-session"]].concat(),
        &[&g],
        "",
    );
    assert!(ok, "{err}");
    let (ok, b, _) = samepage_io(&[&run[..], &["-p", "The sky is blue because"]].concat(), &[], "");
    assert!(ok);
    assert_eq!(a, b);

    // Refusals: one clear sentence, exit 1.
    let good = std::fs::read(&g).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("short", good[..good.len() - 100].to_vec(), "truncated"),
        (
            "corrupt",
            {
                let mut b = good.clone();
                let n = b.len();
                b[n - 5] ^= 1;
                b
            },
            "corrupt",
        ),
        ("junk", b"not a snapshot at all".to_vec(), "not a usable KV snapshot"),
    ];
    for (name, bytes, needle) in cases {
        let p = dir.join(format!("{name}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        let (ok, _, err) = samepage_io(&[&run[..], &["-p", "x", "--load-session"]].concat(), &[&p], "");
        assert!(
            !ok && err.contains(needle) && !err.contains("panicked"),
            "{name}: {err}"
        );
    }
    let other = dir.join("other.safetensors");
    other_model_snapshot(&other);
    let (ok, _, err) = samepage_io(&[&run[..], &["-p", "x", "--load-session"]].concat(), &[&other], "");
    assert!(!ok && err.contains("another model"), "{err}");
}

/// The official `openai` Python package against the server (tests/python/test_openai.py);
/// skipped when the package is missing unless SAMEPAGE_REQUIRE_PYTHON is set.
#[test]
fn openai_python_client() {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let have = Command::new(&py)
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        assert!(
            std::env::var_os("SAMEPAGE_REQUIRE_PYTHON").is_none(),
            "the openai Python package is not installed"
        );
        eprintln!("skipped: pip install openai to run the Python client test");
        return;
    }
    let s = Server::start(&["--parallel", "2"]);
    let script = crate::repo().join("tests/python/test_openai.py");
    let out = Command::new(&py)
        .arg(&script)
        .env("SAMEPAGE_URL", &s.url)
        .env("SAMEPAGE_BIN", bin())
        .env("SAMEPAGE_MODEL", smollm2())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
