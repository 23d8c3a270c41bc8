//! The host side of the LLM guest: start a guest instance on a backend, load a model,
//! and drive it through the guest's JSON protocol (`sp_call`), with streamed text coming
//! back through the `emit` import.
//!
//! The `samepage` binary, the server and the tests all go through [`Session`].
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use samepage_backend::Backend;
use samepage_runtime::{HostConfig, Instance, Module, Runtime};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The LLM guest, built from `guests/llm` (see build.rs).
pub static LLM_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llm.wasm"));

/// The guest to run: `SAMEPAGE_GUEST` (a path to a .wasm) overrides the embedded one.
pub fn guest_wasm() -> Result<std::borrow::Cow<'static, [u8]>> {
    match std::env::var_os("SAMEPAGE_GUEST") {
        Some(p) => Ok(std::fs::read(&p)
            .with_context(|| format!("cannot read the guest {}", Path::new(&p).display()))?
            .into()),
        None => Ok(LLM_WASM.into()),
    }
}

/// The backends compiled into this binary, best first.
pub fn backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        v.extend(["metal", "vulkan", "wgpu"]);
    }
    v.push("cpu");
    v
}

/// Pick a backend by name. `auto` takes the best one compiled in and present: CUDA, then
/// a hardware Metal/Vulkan GPU, then the CPU (a software Vulkan device such as lavapipe
/// is never picked automatically: the CPU backend is faster on the same cores).
pub fn backend(name: &str) -> Result<Arc<dyn Backend>> {
    match name {
        "cpu" => Ok(Arc::new(samepage_backend_cpu::CpuBackend::new())),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Arc::new(samepage_backend_cuda::CudaBackend::new()?)),
        #[cfg(feature = "wgpu")]
        "wgpu" | "vulkan" | "metal" => {
            let b = samepage_backend_wgpu::WgpuBackend::new()?;
            if name != "wgpu" && b.name() != name {
                bail!("backend {name} is not available here: the GPU found runs {}", b.name());
            }
            Ok(Arc::new(b))
        }
        "auto" => {
            #[cfg(feature = "cuda")]
            if let Ok(b) = samepage_backend_cuda::CudaBackend::new() {
                return Ok(Arc::new(b));
            }
            #[cfg(feature = "wgpu")]
            if let Ok(b) = samepage_backend_wgpu::WgpuBackend::new() {
                if !b.is_software() {
                    return Ok(Arc::new(b));
                }
            }
            Ok(Arc::new(samepage_backend_cpu::CpuBackend::new()))
        }
        other => bail!(
            "unknown backend '{other}'; this build has: auto, {}",
            backends().join(", ")
        ),
    }
}

/// Sampling and stopping options of one generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenOptions {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_tokens: 256,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// What the guest said about a finished generation.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Generation {
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: u64,
    #[serde(default)]
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub prompt_ns: u64,
    pub gen_ns: u64,
    #[serde(default)]
    pub tokens: Vec<u32>,
}

/// A chat message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

type Sink = Arc<Mutex<Option<Box<dyn FnMut(&str) -> bool + Send>>>>;

/// A backend and the compiled guest, shared by several [`Session`]s (the server's
/// workers): on the CPU one thread pool serves them all, instead of one pool each
/// competing for the same cores.
pub struct Host {
    runtime: Runtime,
    module: Module,
    pub backend: String,
}

impl Host {
    pub fn new(backend_name: &str) -> Result<Host> {
        let backend = backend(backend_name)?;
        let name = backend.name().to_string();
        let runtime = Runtime::new(backend)?;
        let module = runtime.compile(&guest_wasm()?)?;
        Ok(Host {
            runtime,
            module,
            backend: name,
        })
    }
}

/// One guest instance with a model loaded.
pub struct Session {
    instance: Instance,
    sink: Sink,
    /// The guest's description of the model (`load`'s `model` object).
    pub model: Value,
    pub backend: String,
}

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub backend: String,
    /// 0: the model's maximum, capped at 4096.
    pub ctx: u32,
    pub vocab_only: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: "auto".into(),
            ctx: 0,
            vocab_only: false,
        }
    }
}

impl Session {
    /// Start a guest on the chosen backend and load the model at `path` (a .gguf file or
    /// a Hugging Face directory). `progress` receives `(done, total)` bytes while loading.
    pub fn load(path: &Path, opts: &LoadOptions, progress: Option<Box<dyn FnMut(u64, u64) + Send>>) -> Result<Session> {
        let host = Host::new(&opts.backend)?;
        Session::load_on(&host, path, opts, progress)
    }

    /// Like [`Session::load`], on a [`Host`] shared with other sessions (one backend,
    /// one compiled guest; `opts.backend` is ignored).
    pub fn load_on(
        shared: &Host,
        path: &Path,
        opts: &LoadOptions,
        progress: Option<Box<dyn FnMut(u64, u64) + Send>>,
    ) -> Result<Session> {
        std::fs::metadata(path).map_err(|e| anyhow!("cannot open the model {}: {e}", path.display()))?;
        let path: PathBuf = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let backend_name = shared.backend.clone();
        let mut host = HostConfig::default();
        host.grant(&path);
        let mut instance = Instance::new(&shared.runtime, &shared.module, host)?;

        let sink: Sink = Arc::new(Mutex::new(None));
        let sink2 = sink.clone();
        let progress = Arc::new(Mutex::new(progress));
        instance.set_emit(Box::new(move |kind, bytes| {
            let text = String::from_utf8_lossy(bytes);
            match kind {
                samepage_abi::emit::TEXT => match sink2.lock().unwrap().as_mut() {
                    Some(f) => f(&text),
                    None => false,
                },
                samepage_abi::emit::JSON => {
                    if let Ok(v) = serde_json::from_str::<Value>(&text) {
                        if let (Some(d), Some(t)) = (v["progress"]["done"].as_u64(), v["progress"]["total"].as_u64()) {
                            if let Some(p) = progress.lock().unwrap().as_mut() {
                                p(d, t);
                            }
                        }
                    }
                    false
                }
                _ => {
                    if std::env::var_os("SAMEPAGE_LOG").is_some() {
                        eprintln!("[guest] {text}");
                    }
                    false
                }
            }
        }));
        let mut s = Session {
            instance,
            sink,
            model: Value::Null,
            backend: backend_name,
        };
        let r = s.call(json!({"cmd": "load", "path": path, "ctx": opts.ctx, "vocab_only": opts.vocab_only}))?;
        s.model = r["model"].clone();
        Ok(s)
    }

    /// One request to the guest; a `{"error": ...}` answer becomes an `Err`.
    pub fn call(&mut self, req: Value) -> Result<Value> {
        let resp = self.instance.call_json(&req.to_string())?;
        let v: Value = serde_json::from_str(&resp).map_err(|e| anyhow!("the guest sent malformed JSON ({e})"))?;
        if let Some(e) = v.get("error") {
            bail!("{}", e.as_str().unwrap_or("unknown error"));
        }
        Ok(v)
    }

    pub fn tokenize(&mut self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let v =
            self.call(json!({"cmd":"tokenize","text":text,"add_special":add_special,"parse_special":parse_special}))?;
        Ok(serde_json::from_value(v["tokens"].clone())?)
    }

    pub fn detokenize(&mut self, tokens: &[u32]) -> Result<String> {
        let v = self.call(json!({"cmd":"detokenize","tokens":tokens}))?;
        Ok(v["text"].as_str().unwrap_or_default().to_string())
    }

    pub fn apply_template(&mut self, messages: &[Message]) -> Result<String> {
        let v = self.call(json!({"cmd":"apply_template","messages":messages,"add_generation_prompt":true}))?;
        Ok(v["text"].as_str().unwrap_or_default().to_string())
    }

    /// Generate from `input` (a JSON object with `prompt`, `messages` or `tokens`),
    /// streaming text pieces to `on_text` (return `true` to stop).
    pub fn generate(
        &mut self,
        input: Value,
        opts: &GenOptions,
        keep_cache: bool,
        on_text: impl FnMut(&str) -> bool + Send + 'static,
    ) -> Result<Generation> {
        let mut req = serde_json::to_value(opts)?;
        let obj = req.as_object_mut().unwrap();
        obj.insert("cmd".into(), "generate".into());
        obj.insert("keep_cache".into(), keep_cache.into());
        if let Value::Object(m) = input {
            obj.extend(m);
        }
        *self.sink.lock().unwrap() = Some(Box::new(on_text));
        let r = self.call(req);
        *self.sink.lock().unwrap() = None;
        Ok(serde_json::from_value(r?)?)
    }

    /// Run a prefill of `tokens` from position `pos`, and return the logits the guest left
    /// in its memory: every position's if `all`, else the last one's. Read in place.
    pub fn forward(&mut self, tokens: &[u32], pos: u32, all: bool) -> Result<Vec<Vec<f32>>> {
        let v = self.call(json!({"cmd":"forward","tokens":tokens,"pos":pos,"all_logits":all}))?;
        let off = v["logits_offset"].as_u64().context("forward: no logits_offset")? as usize;
        let rows = v["rows"].as_u64().context("forward: no rows")? as usize;
        let cols = v["cols"].as_u64().context("forward: no cols")? as usize;
        let mem = self.instance.region().mem();
        if !mem.contains(off, rows * cols * 4) || !off.is_multiple_of(4) {
            bail!("the guest returned logits outside its memory");
        }
        // SAFETY: the range was checked to lie inside the region, aligned; the guest is
        // not running (call_json returned), so nothing writes it concurrently.
        let all_logits: &[f32] = unsafe { mem.slice(off as u32, rows * cols) };
        Ok(all_logits.chunks(cols).map(|r| r.to_vec()).collect())
    }

    pub fn reset(&mut self) -> Result<()> {
        self.call(json!({"cmd":"reset"}))?;
        Ok(())
    }

    /// The runtime instance (for zero-copy checks in tests).
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The tokens `generate` would prefill for `input` (a JSON object with `prompt`,
    /// `messages` or `tokens`) on a fresh cache.
    pub fn prompt_tokens(&mut self, input: Value) -> Result<Vec<u32>> {
        let mut req = input;
        req["cmd"] = "prompt_tokens".into();
        let v = self.call(req)?;
        Ok(serde_json::from_value(v["tokens"].clone())?)
    }

    /// Where the KV cache lies in guest memory and what it holds.
    pub fn kv_layout(&mut self) -> Result<samepage_server::snapshot::Layout> {
        samepage_server::snapshot::Layout::of(self)
    }

    /// Write the KV cache (every cached token and the pending one) to a safetensors
    /// snapshot at `path`, straight from guest memory. `extra` goes into its metadata.
    pub fn save_session(&mut self, path: &Path, extra: &[(&str, String)]) -> Result<samepage_server::snapshot::Saved> {
        samepage_server::snapshot::save(self, path, extra)
    }

    /// Check the snapshot at `path` (format, CRC, same model, fits the context) and put
    /// it into the KV cache, straight into guest memory. A refused file leaves the cache
    /// as it was. Returns the snapshot (its tokens and metadata).
    pub fn load_session(&mut self, path: &Path) -> Result<samepage_server::snapshot::Snapshot> {
        let snap = samepage_server::snapshot::Snapshot::open(path)?;
        snap.restore(self, None)?;
        Ok(snap)
    }
}

impl samepage_server::Worker for Session {
    fn call(&mut self, req: Value) -> Result<Value> {
        Session::call(self, req)
    }

    fn generate(&mut self, req: Value, on_text: Box<dyn FnMut(&str) -> bool + Send>) -> Result<Value> {
        *self.sink.lock().unwrap() = Some(on_text);
        let r = Session::call(self, req);
        *self.sink.lock().unwrap() = None;
        r
    }

    fn mem(&self) -> samepage_backend::Mem {
        self.instance.region().mem()
    }

    fn model(&self) -> Value {
        self.model.clone()
    }
}
