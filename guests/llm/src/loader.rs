//! Loading a model from a granted path (a `.gguf` file or a Hugging Face directory):
//! headers are read into the guest, then each file's tensor data is mapped once into one
//! page-aligned buffer (on CPU the host mmaps it: no copy), and tensors become offsets.
use std::collections::{BTreeMap, HashMap};

use samepage_guest::abi::{self, DType};
use samepage_guest::{Buffer, File};
use serde_json::Value;

use crate::gguf::{self, Gguf};
use crate::model::{Config, Layer, Tensor, Weights};
use crate::safetensors;
use crate::tokenizer::Tokenizer;

/// What a wasm32 guest can use for the model, its cache and everything else.
pub const MEMORY_LIMIT: u64 = 3840 << 20;
/// Room kept for the tokenizer, the template and the heap.
pub const OVERHEAD: u64 = 96 << 20;

pub struct Loaded {
    pub cfg: Config,
    pub tok: Tokenizer,
    pub template: Option<String>,
    pub bos_text: String,
    pub eos_text: String,
    /// Absent with `vocab_only`.
    pub weights: Option<Weights>,
    pub weights_bytes: u64,
    pub tensor_types: BTreeMap<String, u32>,
    /// `{"format", "metadata", "tensors": [{name, type, shape}]}` for `inspect`.
    pub details: Value,
}

/// A tensor inside one of the mapped buffers.
struct Raw {
    buf: usize,
    at: usize,
    dtype: DType,
    /// Row-major shape.
    shape: Vec<u64>,
}

#[derive(Default)]
struct Store {
    bufs: Vec<Buffer>,
    tensors: HashMap<String, Raw>,
}

pub fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

fn open(path: &str) -> Result<File, String> {
    File::open(path).map_err(|e| format!("cannot open {path}: {e}"))
}

fn read_all(path: &str) -> Result<Vec<u8>, String> {
    let f = open(path)?;
    let n = f.size().map_err(|e| format!("cannot size {path}: {e}"))?;
    if n > (512 << 20) {
        return Err(format!("{path} is too large ({} MiB) to read", n >> 20));
    }
    let mut b = vec![0u8; n as usize];
    f.read_at(0, &mut b).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(b)
}

fn read_json(path: &str) -> Result<Value, String> {
    serde_json::from_slice(&read_all(path)?).map_err(|e| format!("{path} is not valid JSON: {e}"))
}

/// Whether the backend places mapped file bytes by mapping pages (the CPU's `mmap`), which
/// needs the destination congruent to the file offset modulo 4096. The others read the
/// bytes in, so the destination is free.
fn maps_pages() -> bool {
    static CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| samepage_guest::backend_name() == "cpu")
}

/// Map `len` bytes of `f` from `start` into a fresh page-aligned buffer; returns the
/// buffer and the offset of the data inside it: `start % 4096` where the host maps whole
/// pages, else 0, so that tensor data keeps the alignment of its place in the file's data
/// section (safetensors data often starts 8 bytes off a 16-byte boundary, and 16-byte
/// aligned rows let GPU kernels and cuBLAS use their widest loads).
fn map_section(f: &File, start: u64, len: u64, what: &str) -> Result<(Buffer, usize), String> {
    let pad = if maps_pages() { (start % 4096) as usize } else { 0 };
    let total = (pad as u64 + len).div_ceil(4096) * 4096 + 4096;
    if total > MEMORY_LIMIT {
        return Err(format!(
            "the model needs {} GiB but a wasm32 guest can address at most 4 GiB",
            gib(total)
        ));
    }
    let mut buf = Buffer::try_new(total as usize, 4096).ok_or_else(|| {
        format!(
            "the model needs {} GiB more but the guest's 4 GiB address space is full",
            gib(total)
        )
    })?;
    f.map_at(start, &mut buf.bytes_mut()[pad..pad + len as usize])
        .map_err(|e| format!("cannot map {what}: {e}"))?;
    buf.hint(abi::hint::WEIGHTS);
    Ok((buf, pad))
}

/// The largest single allocation a wasm32 guest can make is under 2 GiB (`isize::MAX`),
/// so tensor data is mapped in segments of at most this many bytes, split between tensors.
const SEGMENT: u64 = 1536 << 20;

/// Map the byte ranges `(begin, end, tensor name)` (relative to `data_start`) of one file, in as few
/// segments as fit [`SEGMENT`]; returns, for each range, `(segment index, offset inside
/// that segment's buffer)`, with the segments' buffers appended to `bufs`.
fn map_ranges(
    f: &File,
    data_start: u64,
    ranges: &[(u64, u64, &str)],
    what: &str,
    bufs: &mut Vec<Buffer>,
) -> Result<Vec<(usize, usize)>, String> {
    if let Some((b, e, name)) = ranges.iter().find(|r| r.1 - r.0 > SEGMENT) {
        return Err(format!(
            "tensor {name} is {} GiB, but a wasm32 guest cannot hold one tensor larger than {} GiB",
            gib(e - b),
            gib(SEGMENT)
        ));
    }
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let mut out = vec![(0, 0); ranges.len()];
    let mut i = 0;
    let total: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    let mut done = 0;
    while i < order.len() {
        let begin = ranges[order[i]].0;
        let mut end = ranges[order[i]].1;
        let mut j = i + 1;
        while j < order.len() && ranges[order[j]].1.max(end) - begin <= SEGMENT {
            end = end.max(ranges[order[j]].1);
            j += 1;
        }
        let (buf, pad) = map_section(f, data_start + begin, end - begin, what)?;
        for &k in &order[i..j] {
            out[k] = (bufs.len(), pad + (ranges[k].0 - begin) as usize);
        }
        bufs.push(buf);
        done += end - begin;
        samepage_guest::emit_json(&format!(
            r#"{{"progress":{{"done":{},"total":{}}}}}"#,
            done.min(total),
            total
        ));
        i = j;
    }
    Ok(out)
}

pub fn load(
    path: &str,
    vocab_only: bool,
    extra_bytes: &dyn Fn(&Config) -> Result<u64, String>,
) -> Result<Loaded, String> {
    match File::open(path) {
        Ok(f) => {
            let mut magic = [0u8; 4];
            f.read_at(0, &mut magic)
                .map_err(|e| format!("cannot read {path}: {e}"))?;
            if &magic != b"GGUF" {
                return Err(format!("{path} is not a GGUF file or a model directory"));
            }
            load_gguf(path, f, vocab_only, extra_bytes)
        }
        Err(e) if path.ends_with(".gguf") => Err(format!("cannot open {path}: {e}")),
        Err(_) => load_hf(path.trim_end_matches('/'), vocab_only, extra_bytes),
    }
}

fn load_gguf(
    path: &str,
    f: File,
    vocab_only: bool,
    extra_bytes: &dyn Fn(&Config) -> Result<u64, String>,
) -> Result<Loaded, String> {
    let size = f.size().map_err(|e| format!("cannot size {path}: {e}"))?;
    // The header's size is unknown: read 1 MiB, then more until it parses.
    let mut head = Vec::new();
    let mut want = (1u64 << 20).min(size);
    let g = loop {
        let have = head.len();
        head.resize(want as usize, 0);
        f.read_at(have as u64, &mut head[have..])
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        match gguf::parse(&head) {
            Ok(g) => break g,
            Err(gguf::Error::NeedMore(n)) if want < size => want = (n as u64).max(want * 2).min(size),
            Err(gguf::Error::NeedMore(_)) => {
                return Err(format!("{path} is truncated: the file ends inside its GGUF header"))
            }
            Err(gguf::Error::Bad(m)) => return Err(format!("{path}: {m}")),
        }
    };
    drop(head);
    // Tensors first: an unsupported type or a model too big for wasm32 is the real
    // problem even when other metadata is missing too.
    let mut tensor_types = BTreeMap::new();
    let mut data_len = 0u64;
    let mut truncated = None;
    for t in &g.tensors {
        let bytes = Gguf::tensor_bytes(t)?;
        let end = g
            .data_start
            .checked_add(t.offset)
            .and_then(|o| o.checked_add(bytes))
            .unwrap_or(u64::MAX);
        if end > size && truncated.is_none() {
            truncated = Some(format!(
                "{path} is truncated: tensor {} ends at byte {end} but the file has {size} bytes",
                t.name
            ));
        }
        data_len = data_len.max(end.saturating_sub(g.data_start));
        *tensor_types
            .entry(gguf::dtype_of(t.ggml_type).unwrap().name().to_string())
            .or_insert(0) += 1;
    }
    if !vocab_only {
        check_fits(data_len)?;
        if let Some(t) = truncated {
            return Err(t);
        }
    }
    let cfg = gguf_config(&g)?;
    let tok = Tokenizer::from_gguf(&g)?;
    let main_eos = g.u64("tokenizer.ggml.eos_token_id").map(|v| v as u32);
    let bos_text = tok.bos.map(|b| tok.token_text(b)).unwrap_or_default();
    let eos_text = main_eos.map(|e| tok.token_text(e)).unwrap_or_default();
    let template = g.str("tokenizer.chat_template").map(str::to_string);

    let weights_bytes: u64 = g.tensors.iter().map(|t| Gguf::tensor_bytes(t).unwrap_or(0)).sum();
    let details = gguf_details(&g);
    let mut loaded = Loaded {
        cfg,
        tok,
        template,
        bos_text,
        eos_text,
        weights: None,
        weights_bytes,
        tensor_types,
        details,
    };
    let extra = extra_bytes(&loaded.cfg)?;
    if vocab_only {
        return Ok(loaded);
    }
    check_fits(data_len + extra)?;
    let mut store = Store::default();
    let ranges: Vec<(u64, u64, &str)> = g
        .tensors
        .iter()
        .map(|t| (t.offset, t.offset + Gguf::tensor_bytes(t).unwrap(), t.name.as_str()))
        .collect();
    let placed = map_ranges(&f, g.data_start, &ranges, path, &mut store.bufs)?;
    for (t, (buf, at)) in g.tensors.iter().zip(placed) {
        let raw = Raw {
            buf,
            at,
            dtype: gguf::dtype_of(t.ggml_type).unwrap(),
            shape: t.dims.iter().rev().copied().collect(),
        };
        store.tensors.insert(t.name.clone(), raw);
    }
    if let Some(freqs) = store.f32s("rope_freqs.weight") {
        loaded.cfg.rope_scaling = Some(llama3_scaling_from_freqs(&freqs, &loaded.cfg)?);
    }
    loaded.weights = Some(build_weights(&loaded.cfg, store, &GGUF_NAMES)?);
    Ok(loaded)
}

fn gguf_details(g: &Gguf) -> Value {
    fn json(v: &gguf::Value) -> Value {
        match v {
            gguf::Value::Str(s) if s.len() > 256 => {
                Value::from(format!("{}... ({} bytes)", &s[..s.floor_char_boundary(256)], s.len()))
            }
            gguf::Value::Str(s) => Value::from(s.as_str()),
            gguf::Value::Bool(b) => Value::from(*b),
            gguf::Value::Array(a) if a.len() > 16 => Value::from(format!("[{} values]", a.len())),
            gguf::Value::Array(a) => Value::Array(a.iter().map(json).collect()),
            gguf::Value::F32(_) | gguf::Value::F64(_) => Value::from(v.as_f64().unwrap_or(0.0)),
            other => other
                .as_u64()
                .map(Value::from)
                .or_else(|| other.as_f64().map(Value::from))
                .unwrap_or(Value::Null),
        }
    }
    let metadata: serde_json::Map<String, Value> = g.metadata.iter().map(|(k, v)| (k.clone(), json(v))).collect();
    let tensors: Vec<Value> = g
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "type": gguf::ggml_type_name(t.ggml_type), "shape": t.dims.iter().rev().collect::<Vec<_>>()}))
        .collect();
    serde_json::json!({"format": format!("gguf v{}", g.version), "metadata": metadata, "tensors": tensors})
}

fn check_fits(total: u64) -> Result<(), String> {
    if total + OVERHEAD > MEMORY_LIMIT {
        return Err(format!(
            "the model needs {} GiB but a wasm32 guest can address at most 4 GiB",
            gib(total + OVERHEAD)
        ));
    }
    Ok(())
}

fn gguf_config(g: &Gguf) -> Result<Config, String> {
    let arch = g
        .str("general.architecture")
        .ok_or("the GGUF file has no general.architecture")?
        .to_string();
    if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
        return Err(format!(
            "the architecture {arch:?} is not a Llama-family one samepage runs (llama, qwen2, mistral)"
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| {
        g.u64(&key(k))
            .map(|v| v as u32)
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("the GGUF file has no {}", key(k)))
    };
    let dim = need("embedding_length")?;
    let n_heads = need("attention.head_count")?;
    let head_dim = g
        .u64(&key("attention.key_length"))
        .map(|v| v as u32)
        .unwrap_or(dim / n_heads);
    let vocab = match g.tensor("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => t.dims[1] as u32,
        _ => g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len() as u32),
    };
    if let Some(ty) = g.str(&key("rope.scaling.type")) {
        let factor = g.f64(&key("rope.scaling.factor")).unwrap_or(1.0);
        if ty != "none" && factor != 1.0 {
            return Err(format!("rope scaling {ty:?} is not supported"));
        }
    }
    Ok(Config {
        name: g.str("general.name").unwrap_or(&arch).to_string(),
        n_layers: need("block_count")?,
        dim,
        n_heads,
        n_kv_heads: g
            .u64(&key("attention.head_count_kv"))
            .map(|v| v as u32)
            .unwrap_or(n_heads),
        head_dim,
        ffn: need("feed_forward_length")?,
        vocab,
        ctx_max: g.u64(&key("context_length")).map(|v| v as u32).unwrap_or(2048),
        n_rot: g
            .u64(&key("rope.dimension_count"))
            .map(|v| v as u32)
            .unwrap_or(head_dim),
        norm_eps: g.f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
        rope_base: g.f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
        // llama.cpp permutes llama's q/k at conversion (interleaved pairs); qwen2 keeps HF's layout.
        rope_mode: if arch == "qwen2" {
            abi::ROPE_HALF
        } else {
            abi::ROPE_INTERLEAVED
        },
        rope_scaling: None,
        arch,
    })
}

/// GGUF Llama 3.1+ files store the rope frequency factors as a tensor instead of the
/// scaling parameters; recover the parameters and check they reproduce the tensor.
pub fn llama3_scaling_from_freqs(freqs: &[f32], c: &Config) -> Result<(f32, f32, f32, u32), String> {
    let factor = freqs.iter().copied().fold(1.0f32, f32::max);
    let candidates = [(1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)];
    for (low, high, orig) in candidates {
        let expect = llama3_factors(c, factor, low, high, orig);
        if expect.len() == freqs.len()
            && expect
                .iter()
                .zip(freqs)
                .all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1.0))
        {
            return Ok((factor, low, high, orig));
        }
    }
    Err(
        "the model's rope_freqs tensor does not match Llama 3 frequency scaling, the only kind samepage supports"
            .into(),
    )
}

/// Llama 3's per-frequency divisors (as llama.cpp's converter writes them).
pub fn llama3_factors(c: &Config, factor: f32, low: f32, high: f32, orig: u32) -> Vec<f32> {
    let (lo_wl, hi_wl) = (orig as f64 / low as f64, orig as f64 / high as f64);
    (0..c.n_rot / 2)
        .map(|i| {
            let freq = 1.0 / (c.rope_base as f64).powf(2.0 * i as f64 / c.n_rot as f64);
            let wl = 2.0 * std::f64::consts::PI / freq;
            if wl < hi_wl {
                1.0
            } else if wl > lo_wl {
                factor
            } else {
                let smooth = (orig as f64 / wl - low as f64) / (high as f64 - low as f64);
                (1.0 / ((1.0 - smooth) / factor as f64 + smooth)) as f32
            }
        })
        .collect()
}

fn load_hf(
    dir: &str,
    vocab_only: bool,
    extra_bytes: &dyn Fn(&Config) -> Result<u64, String>,
) -> Result<Loaded, String> {
    let file = |name: &str| format!("{dir}/{name}");
    let config_json =
        read_json(&file("config.json")).map_err(|e| format!("{dir} is not a GGUF file or a model directory ({e})"))?;
    let cfg = safetensors::config(&config_json)?;
    let tok_cfg = read_json(&file("tokenizer_config.json")).unwrap_or(Value::Null);
    let token_str = |k: &str| match tok_cfg.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    let (bos_text, eos_text) = (token_str("bos_token"), token_str("eos_token"));
    let mut eos = safetensors::ids(config_json.get("eos_token_id"));
    if let Ok(gen) = read_json(&file("generation_config.json")) {
        for e in safetensors::ids(gen.get("eos_token_id")) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
    }
    let mut tok = match read_all(&file("tokenizer.json")) {
        Ok(json) => Tokenizer::from_hf(&json, &eos, bos_text.as_deref(), eos_text.as_deref())?,
        Err(_) if File::open(&file("tokenizer.json")).is_err() => Tokenizer::none(cfg.vocab),
        Err(e) => return Err(e),
    };
    if tok.eos.is_empty() {
        tok.eos = eos.clone();
    }
    if tok.bos.is_none() {
        tok.bos = safetensors::ids(config_json.get("bos_token_id")).first().copied();
    }
    let template = match tok_cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => read_all(&file("chat_template.jinja"))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    };

    // Shards: the index's files, or the single model.safetensors.
    let shards: Vec<String> = match read_json(&file("model.safetensors.index.json")) {
        Ok(idx) => {
            let mut s: Vec<String> = idx
                .get("weight_map")
                .and_then(Value::as_object)
                .map(|m| m.values().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default();
            s.sort();
            s.dedup();
            s
        }
        Err(_) => vec!["model.safetensors".to_string()],
    };
    let mut headers = Vec::new();
    let mut weights_bytes = 0;
    let mut tensor_types = BTreeMap::new();
    for shard in &shards {
        let path = file(shard);
        let f = match open(&path) {
            Ok(f) => f,
            // A tokenizer-only directory is enough for a vocab-only load.
            Err(_) if vocab_only => continue,
            Err(e) => return Err(e),
        };
        let size = f.size().map_err(|e| format!("cannot size {path}: {e}"))?;
        let mut n = [0u8; 8];
        f.read_at(0, &mut n).map_err(|e| format!("cannot read {path}: {e}"))?;
        let n = u64::from_le_bytes(n);
        if n > (100 << 20) || 8 + n > size {
            return Err(format!("{path} is truncated or not a safetensors file"));
        }
        let mut h = vec![0u8; n as usize];
        f.read_at(8, &mut h).map_err(|e| format!("cannot read {path}: {e}"))?;
        let tensors = safetensors::parse_header(&h, shard)?;
        let data_start = 8 + n;
        for t in &tensors {
            if data_start + t.end > size {
                return Err(format!(
                    "{path} is truncated: tensor {} ends at byte {} but the file has {size} bytes",
                    t.name,
                    data_start + t.end
                ));
            }
            weights_bytes += t.end - t.begin;
            *tensor_types.entry(t.dtype.name().to_string()).or_insert(0) += 1;
        }
        headers.push((f, data_start, tensors, path));
    }
    let tensors: Vec<Value> = headers
        .iter()
        .flat_map(|(_, _, ts, _)| {
            ts.iter()
                .map(|t| serde_json::json!({"name": t.name, "type": t.dtype.name(), "shape": t.shape}))
        })
        .collect();
    let details = serde_json::json!({"format": "safetensors", "metadata": config_json, "tensors": tensors});
    let mut loaded = Loaded {
        details,
        cfg,
        bos_text: tok.bos.map(|b| tok.token_text(b)).or(bos_text).unwrap_or_default(),
        eos_text: eos_text.unwrap_or_default(),
        tok,
        template,
        weights: None,
        weights_bytes,
        tensor_types,
    };
    let extra = extra_bytes(&loaded.cfg)?;
    if vocab_only {
        return Ok(loaded);
    }
    check_fits(weights_bytes + extra)?;
    let mut store = Store::default();
    for (f, data_start, tensors, path) in headers {
        let ranges: Vec<(u64, u64, &str)> = tensors.iter().map(|t| (t.begin, t.end, t.name.as_str())).collect();
        let placed = map_ranges(&f, data_start, &ranges, &path, &mut store.bufs)?;
        for (t, (buf, at)) in tensors.into_iter().zip(placed) {
            if at % t.dtype.align() != 0 {
                return Err(format!(
                    "{path}: tensor {} is not aligned for {}",
                    t.name,
                    t.dtype.name()
                ));
            }
            store.tensors.insert(
                t.name,
                Raw {
                    buf,
                    at,
                    dtype: t.dtype,
                    shape: t.shape,
                },
            );
        }
    }
    loaded.weights = Some(build_weights(&loaded.cfg, store, &HF_NAMES)?);
    Ok(loaded)
}

/// Tensor names: embedding, final norm, output, then per-layer names with `{}` for the layer.
struct Names {
    embed: &'static str,
    out_norm: &'static str,
    output: &'static str,
    /// attn_norm, q, k, v, o, ffn_norm, gate, up, down, q bias, k bias, v bias
    layer: [&'static str; 12],
}

const GGUF_NAMES: Names = Names {
    embed: "token_embd.weight",
    out_norm: "output_norm.weight",
    output: "output.weight",
    layer: [
        "blk.{}.attn_norm.weight",
        "blk.{}.attn_q.weight",
        "blk.{}.attn_k.weight",
        "blk.{}.attn_v.weight",
        "blk.{}.attn_output.weight",
        "blk.{}.ffn_norm.weight",
        "blk.{}.ffn_gate.weight",
        "blk.{}.ffn_up.weight",
        "blk.{}.ffn_down.weight",
        "blk.{}.attn_q.bias",
        "blk.{}.attn_k.bias",
        "blk.{}.attn_v.bias",
    ],
};

const HF_NAMES: Names = Names {
    embed: "model.embed_tokens.weight",
    out_norm: "model.norm.weight",
    output: "lm_head.weight",
    layer: [
        "model.layers.{}.input_layernorm.weight",
        "model.layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.v_proj.weight",
        "model.layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.post_attention_layernorm.weight",
        "model.layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.up_proj.weight",
        "model.layers.{}.mlp.down_proj.weight",
        "model.layers.{}.self_attn.q_proj.bias",
        "model.layers.{}.self_attn.k_proj.bias",
        "model.layers.{}.self_attn.v_proj.bias",
    ],
};

fn f16_to_f32(h: u16) -> f32 {
    let (sign, exp, man) = ((h >> 15) as u32, ((h >> 10) & 0x1f) as u32, (h & 0x3ff) as u32);
    let bits = match (exp, man) {
        (0, 0) => sign << 31,
        (0, _) => {
            // Subnormal: renormalise.
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            (sign << 31) | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (31, _) => (sign << 31) | (0xff << 23) | (man << 13),
        _ => (sign << 31) | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

pub fn to_f32(bytes: &[u8], dtype: DType) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        _ => return None,
    })
}

impl Store {
    fn bytes(&self, r: &Raw) -> &[u8] {
        let n: u64 = r.shape.iter().product();
        let len = (n as usize / r.dtype.block_elems()) * r.dtype.block_bytes();
        &self.bufs[r.buf].bytes()[r.at..r.at + len]
    }

    fn f32s(&self, name: &str) -> Option<Vec<f32>> {
        let r = self.tensors.get(name)?;
        to_f32(self.bytes(r), r.dtype)
    }
}

fn build_weights(c: &Config, store: Store, names: &Names) -> Result<Weights, String> {
    let mut extra: Vec<Buffer> = Vec::new();
    let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let matrix = |name: &str, rows: u32, cols: u32| -> Result<Tensor, String> {
        let r = store
            .tensors
            .get(name)
            .ok_or_else(|| format!("the model has no tensor {name}"))?;
        if r.shape != [rows as u64, cols as u64] {
            return Err(format!(
                "tensor {name} has shape {:?}, expected [{rows}, {cols}]",
                r.shape
            ));
        }
        Ok(Tensor {
            off: store.bufs[r.buf].offset_at(r.at),
            dtype: r.dtype,
            rows,
            cols,
        })
    };
    // Norm weights and biases must be f32: convert the others into small new buffers.
    let mut vector = |name: &str, len: u32, required: bool| -> Result<Option<Tensor>, String> {
        let Some(r) = store.tensors.get(name) else {
            return if required {
                Err(format!("the model has no tensor {name}"))
            } else {
                Ok(None)
            };
        };
        if r.shape != [len as u64] {
            return Err(format!("tensor {name} has shape {:?}, expected [{len}]", r.shape));
        }
        let off = if r.dtype == DType::F32 && store.bufs[r.buf].offset_at(r.at).is_multiple_of(4) {
            store.bufs[r.buf].offset_at(r.at)
        } else {
            let v = to_f32(store.bytes(r), r.dtype)
                .ok_or_else(|| format!("tensor {name} has type {}, expected a float type", r.dtype.name()))?;
            let mut b = Buffer::try_pages(v.len() * 4).ok_or("out of guest memory")?;
            b.as_mut_slice::<f32>()[..v.len()].copy_from_slice(&v);
            b.hint(abi::hint::WEIGHTS);
            let off = b.offset();
            extra.push(b);
            off
        };
        Ok(Some(Tensor {
            off,
            dtype: DType::F32,
            rows: 1,
            cols: len,
        }))
    };
    let embed = matrix(names.embed, c.vocab, c.dim)?;
    let out_norm = vector(names.out_norm, c.dim, true)?.unwrap();
    let mut layers = Vec::with_capacity(c.n_layers as usize);
    for l in 0..c.n_layers {
        let n = |i: usize| names.layer[i].replace("{}", &l.to_string());
        let bq = vector(&n(9), qd, false)?;
        let bk = vector(&n(10), kvd, false)?;
        let bv = vector(&n(11), kvd, false)?;
        let bqkv = match (bq, bk, bv) {
            (Some(q), Some(k), Some(v)) => Some([q, k, v]),
            (None, None, None) => None,
            _ => return Err(format!("layer {l} has some but not all of the q, k, v biases")),
        };
        layers.push(Layer {
            attn_norm: vector(&n(0), c.dim, true)?.unwrap(),
            wq: matrix(&n(1), qd, c.dim)?,
            wk: matrix(&n(2), kvd, c.dim)?,
            wv: matrix(&n(3), kvd, c.dim)?,
            bqkv,
            wo: matrix(&n(4), c.dim, qd)?,
            ffn_norm: vector(&n(5), c.dim, true)?.unwrap(),
            w_gate: matrix(&n(6), c.ffn, c.dim)?,
            w_up: matrix(&n(7), c.ffn, c.dim)?,
            w_down: matrix(&n(8), c.dim, c.ffn)?,
        });
    }
    let output = if store.tensors.contains_key(names.output) {
        matrix(names.output, c.vocab, c.dim)?
    } else {
        embed
    };
    let mut storage = store.bufs;
    storage.extend(extra);
    Ok(Weights {
        embed,
        layers,
        out_norm,
        output,
        storage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_and_bf16_convert() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(to_f32(&[0x80, 0x3f], DType::BF16).unwrap(), vec![1.0]);
    }

    #[test]
    fn llama3_scaling_round_trips() {
        let mut c = crate::safetensors::config(
            &serde_json::from_str(r#"{"model_type":"llama","hidden_size":2048,"num_attention_heads":32,"num_hidden_layers":1,"intermediate_size":1,"vocab_size":1,"rope_theta":500000.0}"#)
                .unwrap(),
        )
        .unwrap();
        c.n_rot = 64;
        let f = llama3_factors(&c, 32.0, 1.0, 4.0, 8192);
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[31], 32.0);
        assert_eq!(llama3_scaling_from_freqs(&f, &c).unwrap(), (32.0, 1.0, 4.0, 8192));
    }
}
