//! The app protocol: JSON requests in, JSON responses out (see `sp_call` in lib.rs).
//! Every failure is `{"error": "one sentence"}`; nothing here panics on bad input.
use std::cell::RefCell;

use samepage_guest::abi::DType;
use samepage_guest::{self as sp, Buffer};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::loader::{self, Loaded};
use crate::model::{self, Config, Model, State};
use crate::sampler::{self, Sampling};
use crate::snapshot;
use crate::template::{ChatTemplate, Message};
use crate::tokenizer::{Tokenizer, Utf8Stream};

struct App {
    cfg: Config,
    tok: Tokenizer,
    template: ChatTemplate,
    model: Option<Model>,
    state: Option<State>,
    info: Value,
    /// The model's identity for snapshots ([`snapshot::model_hash`]), 0 when vocab-only.
    hash: u64,
    /// File metadata and the tensor list, for `inspect`.
    details: Value,
}

thread_local! {
    static APP: RefCell<Option<App>> = const { RefCell::new(None) };
}

/// Handle one request; always returns a JSON document.
pub fn handle(req: &[u8]) -> String {
    let out = match serde_json::from_slice::<Value>(req) {
        Ok(v) => dispatch(v),
        Err(e) => Err(format!("the request is not valid JSON: {e}")),
    };
    match out {
        Ok(v) => v.to_string(),
        Err(e) => json!({ "error": e }).to_string(),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(cmd: &str, v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("bad {cmd} request: {e}"))
}

fn dispatch(v: Value) -> Result<Value, String> {
    let cmd = v
        .get("cmd")
        .and_then(Value::as_str)
        .ok_or("the request has no \"cmd\"")?
        .to_string();
    if cmd == "load" {
        let r: LoadReq = parse(&cmd, v)?;
        APP.with(|a| *a.borrow_mut() = None); // free the old model first
        let app = load(r)?;
        let info = app.info.clone();
        APP.with(|a| *a.borrow_mut() = Some(app));
        return Ok(json!({ "ok": true, "model": info }));
    }
    APP.with(|a| {
        let mut a = a.borrow_mut();
        let app = a.as_mut().ok_or("no model is loaded; send a load request first")?;
        match cmd.as_str() {
            "info" => Ok(app.info.clone()),
            "inspect" => {
                let mut v = app.details.clone();
                v["model"] = app.info.clone();
                Ok(v)
            }
            "tokenize" => tokenize(app, parse(&cmd, v)?),
            "detokenize" => detokenize(app, parse(&cmd, v)?),
            "apply_template" => {
                let r: TemplateReq = parse(&cmd, v)?;
                Ok(json!({ "text": app.template.render(&r.messages, r.add_generation_prompt)? }))
            }
            "generate" => generate(app, parse(&cmd, v)?),
            "prompt_tokens" => {
                let r: GenerateReq = parse(&cmd, v)?;
                let appending = r.keep_cache && app.state.as_ref().is_some_and(|s| !s.tokens.is_empty());
                Ok(json!({ "tokens": prompt_tokens(app, &r, appending)? }))
            }
            "kv_layout" => {
                let hash = app.hash;
                let (model, s, _, _) = need_model(app)?;
                Ok(snapshot::layout(&model.cfg, s, hash))
            }
            "kv_restore" => {
                let r: RestoreReq = parse(&cmd, v)?;
                let (_, s, _, vocab) = need_model(app)?;
                snapshot::restore(s, vocab, r.tokens, r.pending)
            }
            "forward" => forward(app, parse(&cmd, v)?),
            "reset" => {
                if let Some(s) = app.state.as_mut() {
                    s.tokens.clear();
                    s.pending = None;
                }
                Ok(json!({ "ok": true }))
            }
            other => Err(format!("unknown command {other:?}")),
        }
    })
}

#[derive(Deserialize)]
struct RestoreReq {
    tokens: Vec<u32>,
    #[serde(default)]
    pending: Option<u32>,
}

#[derive(Deserialize)]
struct LoadReq {
    path: String,
    #[serde(default)]
    ctx: u32,
    #[serde(default)]
    vocab_only: bool,
    #[serde(default)]
    cache_dtype: Option<String>,
}

fn load(r: LoadReq) -> Result<App, String> {
    let cache_dtype = match r.cache_dtype.as_deref() {
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some(o) => return Err(format!("cache_dtype {o:?} is not supported (f32 and f16 are)")),
    };
    let ctx_of = |c: &Config| -> Result<u32, String> {
        if r.ctx > c.ctx_max {
            return Err(format!(
                "the context {} is longer than the model's maximum {}",
                r.ctx, c.ctx_max
            ));
        }
        Ok(if r.ctx == 0 { c.ctx_max.min(4096) } else { r.ctx })
    };
    let extra = |c: &Config| ctx_of(c).map(|ctx| model::state_bytes(c, ctx, cache_dtype));
    let Loaded {
        cfg,
        tok,
        template,
        bos_text,
        eos_text,
        weights,
        weights_bytes,
        tensor_types,
        details,
    } = loader::load(&r.path, r.vocab_only, &extra)?;
    let ctx = ctx_of(&cfg)?;
    let has_template = template.is_some();
    let template = ChatTemplate::new(template.as_deref(), bos_text, eos_text)?;
    let (model, state) = match weights {
        Some(w) => {
            let state = State::new(&cfg, ctx, cache_dtype)?;
            (Some(Model { cfg: cfg.clone(), w }), Some(state))
        }
        None => (None, None),
    };
    let hash = model.as_ref().map_or(0, snapshot::model_hash);
    let info = json!({
        "model_hash": format!("{hash:016x}"), "arch": cfg.arch, "name": cfg.name, "n_layers": cfg.n_layers, "dim": cfg.dim,
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "ffn": cfg.ffn,
        "vocab": cfg.vocab, "ctx": ctx, "ctx_max": cfg.ctx_max, "weights_bytes": weights_bytes,
        "tensor_types": tensor_types, "bos": tok.bos, "eos": tok.eos, "chat_template": has_template,
        "tokenizer": tok.kind, "cache_dtype": cache_dtype.name(), "vocab_only": model.is_none(),
    });
    Ok(App {
        cfg,
        tok,
        template,
        model,
        state,
        info,
        hash,
        details,
    })
}

#[derive(Deserialize)]
struct TokenizeReq {
    #[serde(default)]
    text: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default)]
    parse_special: bool,
}

fn tokenize(app: &mut App, r: TokenizeReq) -> Result<Value, String> {
    Ok(json!({ "tokens": app.tok.encode(&r.text, r.add_special, r.parse_special)? }))
}

#[derive(Deserialize)]
struct DetokenizeReq {
    tokens: Vec<u32>,
    #[serde(default)]
    token_pieces: bool,
}

fn detokenize(app: &mut App, r: DetokenizeReq) -> Result<Value, String> {
    check_ids(&r.tokens, app.tok.vocab_size() as u32)?;
    let mut v = json!({ "text": app.tok.decode(&r.tokens) });
    if r.token_pieces {
        v["pieces"] = r.tokens.iter().map(|&t| app.tok.token_text(t)).collect();
    }
    Ok(v)
}

fn check_ids(ids: &[u32], vocab: u32) -> Result<(), String> {
    match ids.iter().find(|&&t| t >= vocab) {
        Some(t) => Err(format!("token id {t} is outside the vocabulary of {vocab}")),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
struct TemplateReq {
    messages: Vec<Message>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

fn need_model(app: &mut App) -> Result<(&Model, &mut State, &Tokenizer, u32), String> {
    let vocab = app.cfg.vocab;
    match (app.model.as_ref(), app.state.as_mut()) {
        (Some(m), Some(s)) => Ok((m, s, &app.tok, vocab)),
        _ => Err("the model was loaded with vocab_only, so it cannot run; load it again without vocab_only".into()),
    }
}

fn op_err(e: sp::Error) -> String {
    format!("the backend failed: {e}")
}

#[derive(Deserialize)]
struct ForwardReq {
    tokens: Vec<u32>,
    pos: Option<u32>,
    #[serde(default)]
    all_logits: bool,
}

fn forward(app: &mut App, r: ForwardReq) -> Result<Value, String> {
    let (model, s, _, vocab) = need_model(app)?;
    if r.tokens.is_empty() {
        return Err("forward needs at least one token".into());
    }
    check_ids(&r.tokens, vocab)?;
    let pos = r.pos.unwrap_or(s.tokens.len() as u32);
    if pos as usize > s.tokens.len() {
        return Err(format!("pos {pos} is past the {} tokens in the cache", s.tokens.len()));
    }
    let n = r.tokens.len() as u32;
    if pos as u64 + n as u64 > s.ctx as u64 {
        return Err(format!(
            "the prompt is {} tokens, longer than the context of {}",
            pos + n,
            s.ctx
        ));
    }
    s.all_logits = None;
    if r.all_logits {
        let bytes = n as usize * vocab as usize * 4;
        s.all_logits =
            Some(Buffer::try_new(bytes, 64).ok_or_else(|| format!("out of guest memory for {n} rows of logits"))?);
    }
    s.tokens.truncate(pos as usize);
    s.pending = None;
    let res = model.prefill(s, &r.tokens, pos, r.all_logits);
    if let Err(e) = res {
        s.tokens.clear(); // the cache is in an unknown state
        return Err(op_err(e));
    }
    s.tokens.extend_from_slice(&r.tokens);
    let (off, rows) = match &s.all_logits {
        Some(b) => (b.offset(), n),
        None => (s.logits.offset(), 1),
    };
    Ok(json!({ "logits_offset": off, "rows": rows, "cols": vocab }))
}

#[derive(Deserialize)]
struct GenerateReq {
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    tokens: Option<Vec<u32>>,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default = "default_temperature")]
    temperature: f32,
    #[serde(default = "default_top_k")]
    top_k: u32,
    #[serde(default = "default_top_p")]
    top_p: f32,
    #[serde(default = "default_min_p")]
    min_p: f32,
    #[serde(default = "default_repeat_penalty")]
    repeat_penalty: f32,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    keep_cache: bool,
    #[serde(default = "yes")]
    parse_special: bool,
}

fn default_max_tokens() -> u32 {
    512
}
fn default_temperature() -> f32 {
    0.8
}
fn default_top_k() -> u32 {
    40
}
fn default_top_p() -> f32 {
    0.95
}
fn default_min_p() -> f32 {
    0.05
}
fn default_repeat_penalty() -> f32 {
    1.0
}

fn render(app: &App, r: &GenerateReq) -> Result<Option<String>, String> {
    Ok(match (&r.messages, &r.prompt) {
        (Some(m), _) => Some(app.template.render(m, true)?),
        (None, Some(p)) => Some(p.clone()),
        (None, None) => None,
    })
}

/// The tokens `generate` would prefill for `r` (without a kept cache's tokens):
/// `prompt_tokens` lets the host match them against snapshots first.
fn prompt_tokens(app: &mut App, r: &GenerateReq, appending: bool) -> Result<Vec<u32>, String> {
    let rendered = render(app, r)?;
    tokens_of(app, r, rendered, appending)
}

/// The prompt's tokens; BOS only when the cache starts fresh (and not twice).
fn tokens_of(app: &mut App, r: &GenerateReq, rendered: Option<String>, appending: bool) -> Result<Vec<u32>, String> {
    Ok(match (&r.tokens, rendered) {
        (Some(t), _) => {
            check_ids(t, app.cfg.vocab)?;
            t.clone()
        }
        (None, Some(text)) => {
            let tok = &mut app.tok;
            let mut t = tok.encode(&text, !appending, r.parse_special || r.messages.is_some())?;
            if t.len() >= 2 && tok.bos.is_some() && t[0] == t[1] && Some(t[0]) == tok.bos {
                t.remove(0);
            }
            check_ids(&t, app.cfg.vocab)?;
            t
        }
        (None, None) => return Err("generate needs a prompt, messages or tokens".into()),
    })
}

fn generate(app: &mut App, r: GenerateReq) -> Result<Value, String> {
    let rendered = render(app, &r)?;
    if app.model.is_none() {
        need_model(app)?;
    }
    let t0 = sp::clock_ns();
    let appending = r.keep_cache && app.state.as_ref().is_some_and(|s| !s.tokens.is_empty());
    let new = tokens_of(app, &r, rendered, appending)?;
    let (model, s, tok, _) = need_model(app)?;
    let full: Vec<u32> = if r.keep_cache {
        s.tokens.iter().chain(&s.pending).chain(&new).copied().collect()
    } else {
        new
    };
    s.pending = None;
    if full.is_empty() {
        return Err("the prompt is empty".into());
    }
    if full.len() > s.ctx as usize {
        return Err(format!(
            "the prompt is {} tokens, longer than the context of {}",
            full.len(),
            s.ctx
        ));
    }
    // Reuse the cached prefix; at least one token must run to give logits.
    let mut reuse = full.iter().zip(&s.tokens).take_while(|(a, b)| a == b).count();
    if reuse == full.len() {
        reuse -= 1;
    }
    s.tokens.truncate(reuse);
    if let Err(e) = model.prefill(s, &full[reuse..], reuse as u32, false) {
        s.tokens.clear();
        return Err(op_err(e));
    }
    s.tokens = full.clone();
    let seed = r.seed.unwrap_or_else(|| sp::clock_ns() ^ 0x5DEE_CE66_D1CE_4E5B);
    let sampling = Sampling::new(r.temperature, r.top_k, r.top_p, r.min_p, r.repeat_penalty, seed);
    sampling.start(s);
    let mut recent: Vec<u32> = full[full.len().saturating_sub(model::HISTORY as usize)..].to_vec();
    sampler::set_history(s, &recent);
    let mut next = model.sample(s).map_err(op_err)?;
    let t1 = sp::clock_ns();

    let mut out = Output {
        stream: Utf8Stream::default(),
        text: String::new(),
        emitted: 0,
        stops: r.stop.clone(),
        stopped: false,
    };
    let mut generated: Vec<u32> = Vec::new();
    let finish = loop {
        if generated.len() >= r.max_tokens as usize {
            break "length"; // max_tokens 0
        }
        let t = next;
        if tok.is_eog(t) && !r.ignore_eos {
            break "stop";
        }
        s.pending = Some(t);
        generated.push(t);
        let piece = if tok.is_control(t) { &[][..] } else { tok.piece(t) };
        match out.push(piece) {
            Flow::Stop => break "stop",
            Flow::Cancel => break "cancelled",
            Flow::Go => {}
        }
        if generated.len() >= r.max_tokens as usize {
            break "length";
        }
        if s.tokens.len() >= s.ctx as usize {
            break "length";
        }
        recent.push(t);
        if recent.len() > model::HISTORY as usize {
            recent.remove(0);
        }
        sampler::set_history(s, &recent);
        let pos = s.tokens.len() as u32;
        next = match model.step(s, t, pos) {
            Ok(n) => n,
            Err(e) => {
                s.tokens.clear();
                s.pending = None;
                return Err(op_err(e));
            }
        };
        s.tokens.push(t);
        s.pending = None;
    };
    out.flush();
    let t2 = sp::clock_ns();
    Ok(json!({
        "text": out.text, "finish_reason": finish, "prompt_tokens": full.len(), "cached_tokens": reuse,
        "completion_tokens": generated.len(), "prompt_ns": t1 - t0, "gen_ns": t2 - t1, "tokens": generated,
    }))
}

enum Flow {
    Go,
    Stop,
    Cancel,
}

/// Generated text: complete UTF-8 only, never a partial stop string.
struct Output {
    stream: Utf8Stream,
    text: String,
    emitted: usize,
    stops: Vec<String>,
    /// A stop string was found: the text ends before it, and nothing more is emitted.
    stopped: bool,
}

impl Output {
    fn push(&mut self, bytes: &[u8]) -> Flow {
        let s = self.stream.push(bytes);
        if s.is_empty() {
            return Flow::Go;
        }
        self.text.push_str(&s);
        match sampler::find_stop(&self.text, &self.stops) {
            Ok(at) => {
                self.text.truncate(at);
                self.stopped = true;
                if self.emit_upto(self.text.len()) {
                    return Flow::Cancel;
                }
                Flow::Stop
            }
            Err(hold) => {
                if self.emit_upto(self.text.len() - hold) {
                    Flow::Cancel
                } else {
                    Flow::Go
                }
            }
        }
    }

    fn emit_upto(&mut self, end: usize) -> bool {
        if end <= self.emitted {
            return false;
        }
        let cancel = sp::emit_text(&self.text[self.emitted..end]);
        self.emitted = end;
        cancel
    }

    fn flush(&mut self) {
        if self.stopped {
            return;
        }
        let rest = self.stream.finish();
        self.text.push_str(&rest);
        let _ = self.emit_upto(self.text.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(req: &str) -> String {
        let v: Value = serde_json::from_str(&handle(req.as_bytes())).unwrap();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error for {req}: {v}"))
            .to_string()
    }

    #[test]
    fn bad_requests_get_one_sentence_errors() {
        assert!(err("not json").contains("not valid JSON"));
        assert!(err("{}").contains("no \"cmd\""));
        assert!(err(r#"{"cmd":"tokenize","text":"hi"}"#).contains("no model is loaded"));
        assert!(err(r#"{"cmd":"load"}"#).contains("bad load request"));
        // Off wasm32 the file imports are stubs, so any load fails cleanly.
        assert!(err(r#"{"cmd":"load","path":"/nonexistent/model.gguf"}"#).contains("cannot open"));
        assert!(err(r#"{"cmd":"load","path":"/nonexistent/dir"}"#).contains("not a GGUF file or a model directory"));
        assert!(err(r#"{"cmd":"load","path":"x.gguf","cache_dtype":"q8"}"#).contains("cache_dtype"));
    }

    #[test]
    fn output_holds_back_partial_stops_and_utf8() {
        let mut o = Output {
            stream: Utf8Stream::default(),
            text: String::new(),
            emitted: 0,
            stops: vec!["</end>".into()],
            stopped: false,
        };
        assert!(matches!(o.push(b"Hello </"), Flow::Go));
        assert_eq!(o.emitted, "Hello ".len());
        assert!(matches!(o.push(&"é".as_bytes()[..1]), Flow::Go));
        assert!(matches!(o.push(&"é".as_bytes()[1..]), Flow::Go));
        assert_eq!(o.emitted, "Hello </é".len());
        assert!(matches!(o.push(b" a</en"), Flow::Go));
        assert!(matches!(o.push(b"d> more"), Flow::Stop));
        o.flush();
        assert_eq!(o.text, "Hello </é a");
    }
}
