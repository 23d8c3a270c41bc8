//! samepage's OpenAI-compatible HTTP server.
//!
//! # Endpoints
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: OpenAI's request and response
//!   shapes, streamed as Server-Sent Events (`data: {chunk}` ... `data: [DONE]`) when
//!   `stream` is true. Fields: `messages` / `prompt`, `max_tokens` (or
//!   `max_completion_tokens`), `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`
//!   (a string or a list), `repeat_penalty`, `stream_options.include_usage`, and the
//!   extension `session_id` (below). Responses carry `usage` (with
//!   `prompt_tokens_details.cached_tokens`) and `finish_reason` (`stop`, `length`).
//! - `GET /v1/models`, `GET /health`, `POST /tokenize` (`{"content"}` -> `{"tokens"}`),
//!   `POST /detokenize` (`{"tokens"}` -> `{"content"}`).
//! - KV snapshots: `POST /v1/sessions/{id}/save` (body: a `prompt` or `messages` to
//!   prefill and save, or nothing to confirm a session already saved),
//!   `POST /v1/sessions/{id}/restore` (map and check `{session_dir}/{id}.safetensors`,
//!   e.g. after a restart), `GET /v1/sessions`, `DELETE /v1/sessions/{id}`. A completion
//!   request with `"session_id": id` starts from that session's snapshot and saves its
//!   cache (prompt and reply) back under the same id when it ends. Any request whose
//!   prompt shares a longer prefix with a loaded snapshot than with the worker's own
//!   cache gets that prefix restored instead of prefilled (automatic prefix reuse).
//! - Errors: OpenAI's `{"error": {"message", "type", "param", "code"}}` with 400 (bad
//!   JSON or fields, a refused snapshot), 404 (unknown model, route or session), 413
//!   (prompt longer than the context), 503 (queue full), 500 (the backend failed).
//!
//! # Design: N workers, one queue
//!
//! `--parallel N` workers each own one guest instance (a `Worker`: its own region, so
//! its own KV cache and activations) on its own OS thread. All of them share one
//! `Runtime`/backend (on the CPU: one thread pool; ops from different workers take turns
//! on it) and the weights: on the CPU backend each region maps the model file
//! `MAP_PRIVATE` at the weights' offsets, so the weight pages are the page cache's, resident
//! once however many workers map them (PSS, not RSS, shows it; see the benchmark notes).
//! Requests go into one bounded queue (`--queue`); a request that finds `parallel +
//! queue` requests admitted gets 503 at once. A worker takes the next request, runs it to
//! the end and streams text back through a channel. A client that disconnects drops the
//! channel: the guest's `emit` callback then returns `true` and the guest stops at the
//! next token (`finish_reason: "cancelled"`, logged), freeing the worker. A request whose
//! client left while it was queued is skipped.
//!
//! Limits of this design: the N decode steps are N matrix-*vector* passes over the same
//! weights, serialised on the shared thread pool, so aggregate throughput on a
//! memory-bound CPU stays about that of one stream (it gains only from overlapping one
//! worker's guest-side work with another's kernels); and each worker has its own context
//! of `--ctx` tokens. The next step is a batched decode in one region: the sessions' KV
//! caches side by side in one guest's memory, and one decode graph that gathers the
//! current token of every active sequence into rows of a (B, dim) activation, runs every
//! matmul as a matrix-matrix product over the B rows (the weights are read once per step
//! for all sequences), and attends per row over that row's own cache (a per-row position
//! and cache offset in the attention op). That needs a batched attention op in the ABI
//! and a scheduler in the guest (continuous batching: admit and retire sequences between
//! steps); it is not built here.
pub mod snapshot;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::Stream;
use samepage_backend::Mem;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::snapshot::Snapshot;

/// One guest instance with the model loaded, driven through the guest's JSON protocol.
/// `samepage::Session` implements it; tests use fakes.
pub trait Worker: Send {
    /// One protocol request; a guest `{"error"}` answer is an `Err`.
    fn call(&mut self, req: Value) -> Result<Value>;
    /// A `generate` request, streaming text to `on_text` (return `true` to stop).
    fn generate(&mut self, req: Value, on_text: Box<dyn FnMut(&str) -> bool + Send>) -> Result<Value>;
    /// The guest's memory (its region), for snapshots; valid between calls.
    fn mem(&self) -> Mem;
    /// The guest's description of the model (`load`'s answer).
    fn model(&self) -> Value;
}

/// Makes workers: `true` asks for a vocab-only one (tokenizer and template, no weights).
pub type Factory = Arc<dyn Fn(bool) -> Result<Box<dyn Worker>> + Send + Sync>;

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The id clients send as `model` (and `/v1/models` lists).
    pub model_id: String,
    /// Worker sessions, i.e. requests generating at once.
    pub parallel: usize,
    /// Requests that may wait for a worker; more get 503.
    pub queue: usize,
    /// Where session snapshots live (`{id}.safetensors`).
    pub session_dir: PathBuf,
}

/// An API error in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    fn param(mut self, p: &str) -> ApiError {
        self.param = Some(p.to_string());
        self
    }
    fn code(mut self, c: &'static str) -> ApiError {
        self.code = Some(c);
        self
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }
    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// What a worker tells the request handler.
enum Event {
    /// The prompt is accepted (tokenized, within the context); generation starts.
    Started,
    Text(String),
    Done(Value),
    Error(ApiError),
}

struct GenJob {
    /// The generate request (`tokens` is filled in by the worker).
    req: Value,
    session_id: Option<String>,
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

enum Job {
    Generate(GenJob),
}

/// A place in the admission count; freed on drop.
struct Permit(Arc<Shared>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Shared {
    cfg: Config,
    info: Value,
    ctx: usize,
    model_hash: String,
    admitted: AtomicUsize,
    running: AtomicUsize,
    jobs: Mutex<Option<std_mpsc::Sender<(Job, Permit)>>>,
    /// Vocab-only guest for /tokenize and /detokenize.
    tokenizer: Mutex<Box<dyn Worker>>,
    snapshots: RwLock<HashMap<String, Arc<Snapshot>>>,
    /// Serialises writes of one session file.
    save_lock: Mutex<()>,
    started: u64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "session id {id:?} is invalid: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
        .param("session_id"))
    }
}

impl Shared {
    fn session_path(&self, id: &str) -> PathBuf {
        self.cfg.session_dir.join(format!("{id}.safetensors"))
    }

    /// Map and check `{dir}/{id}.safetensors` and keep it loaded.
    fn load_session(&self, id: &str) -> Result<Arc<Snapshot>, ApiError> {
        let path = self.session_path(id);
        if !path.exists() {
            return Err(ApiError::not_found(format!("no session {id:?} is saved")).code("session_not_found"));
        }
        let snap = Snapshot::open(&path).map_err(|e| ApiError::bad(format!("{e:#}")).code("invalid_snapshot"))?;
        if snap.model_hash != self.model_hash {
            return Err(ApiError::bad(format!(
                "session {id:?} was saved with another model (hash {}, {}); this server runs {} ({})",
                snap.model_hash,
                snap.arch,
                self.model_hash,
                self.info["arch"].as_str().unwrap_or("?")
            ))
            .code("invalid_snapshot"));
        }
        let snap = Arc::new(snap);
        self.snapshots.write().unwrap().insert(id.to_string(), snap.clone());
        Ok(snap)
    }

    fn session(&self, id: &str) -> Result<Option<Arc<Snapshot>>, ApiError> {
        if let Some(s) = self.snapshots.read().unwrap().get(id) {
            return Ok(Some(s.clone()));
        }
        match self.load_session(id) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn admit(self: &Arc<Self>) -> Result<Permit, ApiError> {
        let limit = self.cfg.parallel + self.cfg.queue;
        let prev = self.admitted.fetch_add(1, Ordering::SeqCst);
        let permit = Permit(self.clone());
        if prev >= limit {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "the server is busy: {} requests are running or queued (limit {limit}); retry later",
                    prev
                ),
            )
            .code("queue_full"));
        }
        Ok(permit)
    }

    fn submit(self: &Arc<Self>, job: Job, permit: Permit) -> Result<(), ApiError> {
        let jobs = self.jobs.lock().unwrap();
        match jobs.as_ref() {
            Some(tx) => tx
                .send((job, permit))
                .map_err(|_| ApiError::internal("the server is shutting down")),
            None => Err(ApiError::internal("the server is shutting down")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Workers

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Guest errors: input problems are 400; a backend failure is 500.
fn guest_error(e: anyhow::Error) -> ApiError {
    let m = format!("{e:#}");
    if m.contains("backend failed") || m.contains("trapped") || m.contains("guest") && m.contains("malformed") {
        ApiError::internal(m)
    } else {
        ApiError::bad(m)
    }
}

fn worker_loop(
    index: usize,
    mut w: Box<dyn Worker>,
    factory: Factory,
    rx: Arc<Mutex<std_mpsc::Receiver<(Job, Permit)>>>,
    sh: Arc<Shared>,
) {
    loop {
        let next = rx.lock().unwrap().recv();
        let Ok((job, permit)) = next else { return };
        sh.running.fetch_add(1, Ordering::SeqCst);
        let mut permit = Some(permit);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::Generate(g) => run_generate(&mut *w, g, &sh, &mut permit),
        }));
        if permit.is_some() {
            sh.running.fetch_sub(1, Ordering::SeqCst);
        }
        drop(permit);
        // A panic or a trapped guest: start this worker afresh.
        let broken = r.is_err() || w.call(json!({"cmd": "info"})).is_err();
        if broken {
            tracing::error!(worker = index, "worker failed; reloading the model");
            match factory(false) {
                Ok(nw) => w = nw,
                Err(e) => {
                    tracing::error!(worker = index, "cannot reload: {e:#}; this worker stops");
                    return;
                }
            }
        }
    }
}

/// Run one generation. The admission permit is released just before the last event is
/// sent, so a client that sends its next request as soon as it has the answer finds the
/// slot free.
fn run_generate(w: &mut dyn Worker, job: GenJob, sh: &Shared, permit: &mut Option<Permit>) {
    let GenJob {
        mut req,
        session_id,
        tx,
        cancel,
    } = job;
    if cancel.load(Ordering::SeqCst) || tx.is_closed() {
        return; // the client left while the request was queued
    }
    let release = |p: &mut Option<Permit>| {
        if p.take().is_some() {
            sh.running.fetch_sub(1, Ordering::SeqCst);
        }
    };
    let fail = |e: ApiError, p: &mut Option<Permit>| {
        release(p);
        let _ = tx.send(Event::Error(e));
    };
    // The prompt's tokens, as generate would make them.
    let mut preq = req.clone();
    preq["cmd"] = "prompt_tokens".into();
    let toks: Vec<u32> = match w.call(preq) {
        Ok(v) => serde_json::from_value(v["tokens"].clone()).unwrap_or_default(),
        Err(e) => return fail(guest_error(e), permit),
    };
    if toks.len() > sh.ctx {
        return fail(
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the prompt is {} tokens, longer than the context of {} tokens",
                    toks.len(),
                    sh.ctx
                ),
            )
            .code("context_length_exceeded"),
            permit,
        );
    }
    if toks.is_empty() {
        return fail(ApiError::bad("the prompt is empty"), permit);
    }
    // Prefix reuse: this worker's own cache, or a snapshot that shares more.
    let own = snapshot::Layout::of(w)
        .map(|l| common_prefix(&l.tokens, &toks))
        .unwrap_or(0);
    let mut cands: Vec<Arc<Snapshot>> = sh.snapshots.read().unwrap().values().cloned().collect();
    if let Some(id) = &session_id {
        match sh.session(id) {
            Ok(Some(s)) => cands.push(s),
            Ok(None) => {}
            Err(e) => return fail(e, permit),
        }
    }
    let best = cands
        .iter()
        .map(|s| (s.common_prefix(&toks), s))
        .max_by_key(|(n, _)| *n);
    if let Some((n, snap)) = best {
        if n > own {
            let t = Instant::now();
            match snap.restore(w, Some(n)) {
                Ok(n) => tracing::info!(
                    tokens = n,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "restored a prefix from {}",
                    snap.path.display()
                ),
                Err(e) => tracing::warn!("snapshot restore failed: {e:#}"),
            }
        }
    }
    if tx.send(Event::Started).is_err() {
        return;
    }
    req["cmd"] = "generate".into();
    req["tokens"] = json!(toks);
    req["keep_cache"] = false.into();
    for k in ["prompt", "messages"] {
        if let Some(o) = req.as_object_mut() {
            o.remove(k);
        }
    }
    let tx2 = tx.clone();
    let c2 = cancel.clone();
    let on_text = Box::new(move |t: &str| c2.load(Ordering::Relaxed) || tx2.send(Event::Text(t.to_string())).is_err());
    match w.generate(req, on_text) {
        Ok(mut v) => {
            if v["finish_reason"] == "cancelled" {
                tracing::info!(
                    completion_tokens = v["completion_tokens"].as_u64(),
                    "client disconnected; generation cancelled"
                );
            }
            if let Some(id) = &session_id {
                let _g = sh.save_lock.lock().unwrap();
                let path = sh.session_path(id);
                let saved = std::fs::create_dir_all(&sh.cfg.session_dir)
                    .map_err(anyhow::Error::from)
                    .and_then(|_| snapshot::save(w, &path, &[]))
                    .and_then(|_| Snapshot::open(&path));
                match saved {
                    Ok(s) => {
                        sh.snapshots.write().unwrap().insert(id.clone(), Arc::new(s));
                    }
                    Err(e) => {
                        tracing::warn!("cannot save session {id}: {e:#}");
                        v["session_error"] = format!("{e:#}").into();
                    }
                }
            }
            release(permit);
            let _ = tx.send(Event::Done(v));
        }
        Err(e) => fail(guest_error(e), permit),
    }
}

// ---------------------------------------------------------------------------------------
// Requests

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

fn check_model(sh: &Shared, v: &Value) -> Result<(), ApiError> {
    match v.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if *m == sh.cfg.model_id || sh.info["name"].as_str() == Some(m.as_str()) => Ok(()),
        Some(Value::String(m)) => Err(ApiError::not_found(format!(
            "the model {m:?} does not exist; this server serves {:?}",
            sh.cfg.model_id
        ))
        .param("model")
        .code("model_not_found")),
        Some(_) => Err(ApiError::bad("\"model\" must be a string").param("model")),
    }
}

/// A number field within `[lo, hi]`.
fn num(v: &Value, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f >= lo && f <= hi => Ok(Some(f)),
            _ => Err(ApiError::bad(format!("\"{key}\" must be a number in [{lo}, {hi}]")).param(key)),
        },
    }
}

fn int(v: &Value, key: &str, hi: u64) -> Result<Option<u64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n <= hi => Ok(Some(n)),
            _ => Err(ApiError::bad(format!("\"{key}\" must be an integer in [0, {hi}]")).param(key)),
        },
    }
}

/// A message's content: a string, or a list of `{"type":"text","text":...}` parts.
fn content(c: &Value) -> Result<String, ApiError> {
    match c {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => {
                        return Err(ApiError::bad("only text content parts are supported").param("messages"));
                    }
                }
            }
            Ok(s)
        }
        _ => Err(ApiError::bad("a message's content must be a string or a list of text parts").param("messages")),
    }
}

/// Turn an OpenAI request into the guest's generate request.
fn gen_request(sh: &Shared, v: &Value, chat: bool) -> Result<Value, ApiError> {
    let mut r = json!({});
    if chat {
        let msgs = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::bad("\"messages\" must be a list of messages").param("messages"))?;
        if msgs.is_empty() {
            return Err(ApiError::bad("\"messages\" is empty").param("messages"));
        }
        let mut out = Vec::new();
        for m in msgs {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("every message needs a \"role\" string").param("messages"))?;
            out.push(json!({"role": role, "content": content(m.get("content").unwrap_or(&Value::Null))?}));
        }
        r["messages"] = out.into();
    } else {
        let p = match v.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap().to_string(),
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|t| t.is_u64()) => {
                r["tokens"] = Value::Array(a.clone());
                String::new()
            }
            _ => {
                return Err(
                    ApiError::bad("\"prompt\" must be a string (or a list of one string, or of token ids)")
                        .param("prompt"),
                )
            }
        };
        if r.get("tokens").is_none() {
            r["prompt"] = p.into();
        }
    }
    if let Some(n) = int(v, "n", u32::MAX as u64)? {
        if n != 1 {
            return Err(ApiError::bad("only n = 1 is supported").param("n"));
        }
    }
    let max = match int(v, "max_completion_tokens", u32::MAX as u64)? {
        Some(m) => Some(m),
        None => int(v, "max_tokens", u32::MAX as u64)?,
    };
    r["max_tokens"] = max.unwrap_or(sh.ctx as u64).into();
    if let Some(t) = num(v, "temperature", 0.0, 100.0)? {
        r["temperature"] = t.into();
    }
    if let Some(t) = num(v, "top_p", 0.0, 1.0)? {
        r["top_p"] = t.into();
    }
    if let Some(t) = num(v, "min_p", 0.0, 1.0)? {
        r["min_p"] = t.into();
    }
    if let Some(t) = num(v, "repeat_penalty", 0.0, 100.0)? {
        if t == 0.0 {
            return Err(ApiError::bad("\"repeat_penalty\" must be positive").param("repeat_penalty"));
        }
        r["repeat_penalty"] = t.into();
    }
    match v.get("top_k") {
        None | Some(Value::Null) => {}
        Some(x) => match x.as_i64() {
            Some(k) if k <= 0 => r["top_k"] = 0.into(),
            Some(k) if k <= u32::MAX as i64 => r["top_k"] = k.into(),
            _ => return Err(ApiError::bad("\"top_k\" must be an integer").param("top_k")),
        },
    }
    match v.get("seed") {
        None | Some(Value::Null) => {}
        Some(x) => match (x.as_u64(), x.as_i64()) {
            (Some(s), _) => r["seed"] = s.into(),
            (None, Some(s)) => r["seed"] = (s as u64).into(),
            _ => return Err(ApiError::bad("\"seed\" must be an integer").param("seed")),
        },
    }
    match v.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => r["stop"] = json!([s]),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() <= 16 => r["stop"] = Value::Array(a.clone()),
        Some(_) => {
            return Err(ApiError::bad("\"stop\" must be a string or a list of up to 16 strings").param("stop"));
        }
    }
    if let Some(b) = v.get("ignore_eos").and_then(Value::as_bool) {
        r["ignore_eos"] = b.into();
    }
    Ok(r)
}

fn session_id(v: &Value) -> Result<Option<String>, ApiError> {
    match v.get("session_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            valid_id(s)?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(ApiError::bad("\"session_id\" must be a string").param("session_id")),
    }
}

/// Sets the cancel flag when the request's handler or stream is dropped (the client left).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn usage(d: &Value) -> Value {
    let (p, c) = (
        d["prompt_tokens"].as_u64().unwrap_or(0),
        d["completion_tokens"].as_u64().unwrap_or(0),
    );
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
           "prompt_tokens_details": {"cached_tokens": d["cached_tokens"].as_u64().unwrap_or(0)}})
}

async fn completions(sh: Arc<Shared>, body: Bytes, chat: bool) -> Response {
    match completions_inner(sh, body, chat).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

async fn completions_inner(sh: Arc<Shared>, body: Bytes, chat: bool) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    check_model(&sh, &v)?;
    let req = gen_request(&sh, &v, chat)?;
    let session_id = session_id(&v)?;
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("\"stream\" must be a boolean").param("stream")),
    };
    let include_usage = v["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    let permit = sh.admit()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    sh.submit(
        Job::Generate(GenJob {
            req,
            session_id,
            tx,
            cancel,
        }),
        permit,
    )?;
    // The status line waits for the worker to accept the prompt (400/413 come back here).
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Error(e)) => return Err(e),
        _ => return Err(ApiError::internal("the worker stopped before answering")),
    }
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = if chat {
        format!("chatcmpl-{:x}{n:06}", sh.started)
    } else {
        format!("cmpl-{:x}{n:06}", sh.started)
    };
    let created = now_s();
    let model = sh.cfg.model_id.clone();
    if !stream {
        let mut text = String::new();
        let done = loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done(d)) => break d,
                Some(Event::Error(e)) => return Err(e),
                Some(Event::Started) => {}
                None => return Err(ApiError::internal("the worker stopped before finishing")),
            }
        };
        drop(guard);
        // The guest's text is the authoritative one (stop strings cut it).
        let text = done["text"].as_str().map(str::to_string).unwrap_or(text);
        let finish = done["finish_reason"].clone();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        let object = if chat { "chat.completion" } else { "text_completion" };
        return Ok(Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage(&done), "system_fingerprint": format!("samepage-{}", sh.model_hash),
        }))
        .into_response());
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |delta: Value, finish: Value| -> SseEvent {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta.get("content").cloned().unwrap_or("".into()), "logprobs": null, "finish_reason": finish})
        };
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        SseEvent::default().data(c.to_string())
    };
    let state = (rx, guard, 0u8);
    let events = futures_util::stream::unfold(state, move |(mut rx, guard, phase)| {
        let chunk = chunk.clone();
        async move {
            match phase {
                0 if chat => {
                    let e = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
                    return Some((vec![e], (rx, guard, 1)));
                }
                0 => return Some((vec![], (rx, guard, 1))),
                2 => return None,
                _ => {}
            }
            match rx.recv().await {
                Some(Event::Text(t)) => Some((vec![chunk(json!({"content": t}), Value::Null)], (rx, guard, 1))),
                Some(Event::Started) => Some((vec![], (rx, guard, 1))),
                Some(Event::Done(d)) => {
                    let mut out = vec![chunk(json!({}), d["finish_reason"].clone())];
                    if include_usage {
                        let u = json!({"id": "", "object": object, "choices": [], "usage": usage(&d)});
                        out.push(SseEvent::default().data(u.to_string()));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    Some((out, (rx, guard, 2)))
                }
                Some(Event::Error(e)) => {
                    // Headers are sent: report in-band, as OpenAI does.
                    let out = vec![
                        SseEvent::default().data(e.body().to_string()),
                        SseEvent::default().data("[DONE]"),
                    ];
                    Some((out, (rx, guard, 2)))
                }
                None => None,
            }
        }
    });
    let flat = futures_util::StreamExt::flat_map(events, |v| {
        futures_util::stream::iter(v.into_iter().map(Ok::<_, Infallible>))
    });
    Ok(sse(flat).into_response())
}

fn sse<S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static>(s: S) -> Sse<S> {
    Sse::new(s)
}

async fn chat_handler(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    completions(sh, body, true).await
}

async fn completion_handler(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    completions(sh, body, false).await
}

async fn models(State(sh): State<Arc<Shared>>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": sh.cfg.model_id, "object": "model", "created": sh.started, "owned_by": "samepage",
        "meta": sh.info,
    }]}))
    .into_response()
}

async fn health(State(sh): State<Arc<Shared>>) -> Response {
    let running = sh.running.load(Ordering::SeqCst);
    let admitted = sh.admitted.load(Ordering::SeqCst);
    Json(json!({
        "status": "ok", "model": sh.cfg.model_id, "slots_total": sh.cfg.parallel,
        "slots_processing": running, "slots_idle": sh.cfg.parallel.saturating_sub(running),
        "queued": admitted.saturating_sub(running), "queue_limit": sh.cfg.queue,
    }))
    .into_response()
}

/// Run `f` on the vocab-only tokenizer guest, off the async threads.
async fn with_tokenizer<T: Send + 'static>(
    sh: Arc<Shared>,
    f: impl FnOnce(&mut dyn Worker) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut t = sh.tokenizer.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut **t)
    })
    .await
    .map_err(|_| ApiError::internal("the tokenizer failed"))?
}

async fn tokenize(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let r = async {
        let v = parse_json(&body)?;
        let text = match v.get("content").or(v.get("text")).or(v.get("prompt")) {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(ApiError::bad("\"content\" must be a string").param("content")),
        };
        let add_special = v.get("add_special").and_then(Value::as_bool).unwrap_or(true);
        let parse_special = v.get("parse_special").and_then(Value::as_bool).unwrap_or(true);
        let with_pieces = v.get("with_pieces").and_then(Value::as_bool).unwrap_or(false);
        with_tokenizer(sh, move |t| {
            let r = t
                .call(json!({"cmd": "tokenize", "text": text, "add_special": add_special, "parse_special": parse_special}))
                .map_err(guest_error)?;
            let mut out = json!({"tokens": r["tokens"]});
            if with_pieces {
                let p = t
                    .call(json!({"cmd": "detokenize", "tokens": r["tokens"], "token_pieces": true}))
                    .map_err(guest_error)?;
                out["pieces"] = p["pieces"].clone();
            }
            Ok(out)
        })
        .await
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn detokenize(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let r = async {
        let v = parse_json(&body)?;
        let toks = match v.get("tokens") {
            Some(Value::Array(a)) if a.iter().all(|t| t.as_u64().is_some_and(|n| n <= u32::MAX as u64)) => a.clone(),
            _ => return Err(ApiError::bad("\"tokens\" must be a list of token ids").param("tokens")),
        };
        with_tokenizer(sh, move |t| {
            let r = t
                .call(json!({"cmd": "detokenize", "tokens": toks}))
                .map_err(guest_error)?;
            Ok(json!({"content": r["text"]}))
        })
        .await
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn session_save(State(sh): State<Arc<Shared>>, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    let r = async {
        valid_id(&id)?;
        let empty = body.iter().all(u8::is_ascii_whitespace)
            || matches!(serde_json::from_slice::<Value>(&body), Ok(Value::Null))
            || matches!(serde_json::from_slice::<Value>(&body), Ok(Value::Object(o)) if o.is_empty());
        if empty {
            // Nothing to prefill: the session must exist already (saved by a request
            // with this session_id); its file is written as it ends.
            let s = sh
                .session(&id)?
                .ok_or_else(|| ApiError::not_found(format!("no session {id:?} is saved")).code("session_not_found"))?;
            return Ok(json!({"id": id, "saved": true, "snapshot": s.describe()}));
        }
        let v = parse_json(&body)?;
        check_model(&sh, &v)?;
        let chat = v.get("messages").is_some();
        let mut req = gen_request(&sh, &v, chat)?;
        req["max_tokens"] = 0.into(); // prefill only
        let t = Instant::now();
        let permit = sh.admit()?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        sh.submit(
            Job::Generate(GenJob {
                req,
                session_id: Some(id.clone()),
                tx,
                cancel,
            }),
            permit,
        )?;
        loop {
            match rx.recv().await {
                Some(Event::Done(d)) => {
                    if let Some(e) = d["session_error"].as_str() {
                        return Err(ApiError::internal(e.to_string()));
                    }
                    let s = sh
                        .session(&id)?
                        .ok_or_else(|| ApiError::internal("the session was not saved"))?;
                    return Ok(json!({
                        "id": id, "saved": true, "snapshot": s.describe(),
                        "prompt_tokens": d["prompt_tokens"], "cached_tokens": d["cached_tokens"],
                        "ms": t.elapsed().as_secs_f64() * 1e3,
                    }));
                }
                Some(Event::Error(e)) => return Err(e),
                Some(_) => {}
                None => return Err(ApiError::internal("the worker stopped before finishing")),
            }
        }
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn session_restore(State(sh): State<Arc<Shared>>, UrlPath(id): UrlPath<String>) -> Response {
    let r: Result<Value, ApiError> = async {
        valid_id(&id)?;
        let t = Instant::now();
        let sh2 = sh.clone();
        let id2 = id.clone();
        let s = tokio::task::spawn_blocking(move || sh2.load_session(&id2))
            .await
            .map_err(|_| ApiError::internal("restore failed"))??;
        Ok(json!({"id": id, "restored": true, "snapshot": s.describe(), "ms": t.elapsed().as_secs_f64() * 1e3}))
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn session_list(State(sh): State<Arc<Shared>>) -> Response {
    let m = sh.snapshots.read().unwrap();
    let data: Vec<Value> = m
        .iter()
        .map(|(id, s)| {
            let mut d = s.describe();
            d["id"] = id.clone().into();
            d
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn session_delete(State(sh): State<Arc<Shared>>, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(e) = valid_id(&id) {
        return e.into_response();
    }
    let had = sh.snapshots.write().unwrap().remove(&id).is_some();
    let removed = std::fs::remove_file(sh.session_path(&id)).is_ok();
    if had || removed {
        Json(json!({"id": id, "deleted": true})).into_response()
    } else {
        ApiError::not_found(format!("no session {id:?} is saved"))
            .code("session_not_found")
            .into_response()
    }
}

async fn fallback() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}

/// A server with its workers loaded, ready to serve.
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Load `cfg.parallel` workers (concurrently) and a vocab-only tokenizer.
    pub fn new(cfg: Config, factory: Factory) -> Result<Server> {
        anyhow::ensure!(cfg.parallel >= 1, "--parallel must be at least 1");
        let loads: Vec<_> = (0..cfg.parallel)
            .map(|_| {
                let f = factory.clone();
                std::thread::spawn(move || f(false))
            })
            .collect();
        let mut workers = Vec::new();
        for l in loads {
            workers.push(l.join().map_err(|_| anyhow::anyhow!("loading a worker panicked"))??);
        }
        let tokenizer = factory(true)?;
        let info = workers[0].model();
        let ctx = info["ctx"].as_u64().unwrap_or(0) as usize;
        let model_hash = info["model_hash"].as_str().unwrap_or_default().to_string();
        let (tx, rx) = std_mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            cfg,
            info,
            ctx,
            model_hash,
            admitted: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            jobs: Mutex::new(Some(tx)),
            tokenizer: Mutex::new(tokenizer),
            snapshots: RwLock::new(HashMap::new()),
            save_lock: Mutex::new(()),
            started: now_s(),
        });
        let threads = workers
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let (rx, sh, f) = (rx.clone(), shared.clone(), factory.clone());
                std::thread::Builder::new()
                    .name(format!("samepage-worker-{i}"))
                    .spawn(move || worker_loop(i, w, f, rx, sh))
                    .expect("spawn a worker thread")
            })
            .collect();
        Ok(Server { shared, threads })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_handler))
            .route("/v1/completions", post(completion_handler))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/tokenize", post(tokenize))
            .route("/detokenize", post(detokenize))
            .route("/v1/sessions", get(session_list))
            .route("/v1/sessions/{id}/save", post(session_save))
            .route("/v1/sessions/{id}/restore", post(session_restore))
            .route("/v1/sessions/{id}", axum::routing::delete(session_delete))
            .fallback(fallback)
            .with_state(self.shared.clone())
    }

    /// Serve on `listener` until `shutdown` resolves; then stop the workers.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let app = self.router();
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        self.shared.jobs.lock().unwrap().take(); // workers see the channel close
        for t in self.threads {
            let _ = t.join();
        }
        Ok(())
    }
}

/// `samepage serve`: load, bind `addr`, serve until Ctrl-C.
pub fn run(cfg: Config, factory: Factory, addr: SocketAddr) -> Result<()> {
    let parallel = cfg.parallel;
    let t = Instant::now();
    let server = Server::new(cfg, factory)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "samepage: {parallel} worker(s) loaded in {:.2} s; listening on http://{local}",
            t.elapsed().as_secs_f64()
        );
        server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })
}
