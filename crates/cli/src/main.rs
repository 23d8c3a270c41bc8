//! `samepage`: run Llama-family models in a WebAssembly guest whose memory is the
//! compute backend's buffer.
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use samepage::{GenOptions, LoadOptions, Message, Session};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "samepage",
    version,
    about = "LLM inference in a WebAssembly guest whose memory is the accelerator's buffer"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (or chat interactively with --chat).
    Run(RunArgs),
    /// Interactive multi-turn chat; the KV cache is kept between turns.
    Chat(RunArgs),
    /// An OpenAI-compatible HTTP server (chat and text completions, streamed or not,
    /// KV-cache session snapshots).
    Serve(ServeArgs),
    /// Print the token ids of a text.
    Tokenize {
        #[arg(long, short)]
        model: PathBuf,
        /// Leave out the special tokens the model adds (BOS).
        #[arg(long)]
        no_bos: bool,
        text: String,
    },
    /// Show a model's architecture, tensor types, sizes and metadata.
    Inspect { path: PathBuf },
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench.
    Bench {
        #[arg(long, short)]
        model: PathBuf,
        /// Prompt tokens for the pp test.
        #[arg(short = 'p', default_value_t = 512)]
        pp: u32,
        /// Generated tokens for the tg test.
        #[arg(short = 'n', default_value_t = 128)]
        tg: u32,
        /// Repetitions.
        #[arg(short = 'r', default_value_t = 5)]
        reps: u32,
        /// Tokens already in the context when the tg test starts (its prompt; llama-bench's
        /// `-d`): tg then decodes at positions depth .. depth + tg.
        #[arg(short = 'd', long, default_value_t = 0)]
        depth: u32,
        #[arg(long, default_value = "auto")]
        backend: String,
    },
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long, short)]
    model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Compute backend: auto, cpu, cuda, vulkan, metal, wgpu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Requests generating at once (worker sessions, each with its own KV cache).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Context length of each worker (default: the model's, capped at 4096).
    #[arg(long, default_value_t = 0)]
    ctx: u32,
    /// Requests that may wait for a worker; more are refused with 503.
    #[arg(long, default_value_t = 128)]
    queue: usize,
    /// The model id clients use (default: the file name without extension).
    #[arg(long)]
    alias: Option<String>,
    /// Where session snapshots are kept (default: ~/.cache/samepage/sessions).
    #[arg(long)]
    session_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long, short)]
    model: PathBuf,
    /// The prompt; it is wrapped in the model's chat template unless --raw.
    #[arg(long, short)]
    prompt: Option<String>,
    /// Read the prompt from a file ('-' for stdin).
    #[arg(long, short = 'f', conflicts_with = "prompt")]
    file: Option<PathBuf>,
    /// Interactive chat.
    #[arg(long)]
    chat: bool,
    /// Use the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    n: u32,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: u32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Context length (default: the model's, capped at 4096).
    #[arg(long, default_value_t = 0)]
    ctx: u32,
    /// Compute backend: auto, cpu, cuda, vulkan, metal, wgpu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Write the KV cache (and, for chat, the conversation) to this safetensors file
    /// after generating (after every turn in chat).
    #[arg(long)]
    save_session: Option<PathBuf>,
    /// Start from the KV cache (and, for chat, the conversation) in this file: the
    /// prompt's prefix that it holds is not computed again.
    #[arg(long)]
    load_session: Option<PathBuf>,
}

impl RunArgs {
    fn gen_options(&self) -> GenOptions {
        GenOptions {
            max_tokens: self.n,
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

fn main() {
    // Probing for a Vulkan device loads the window-system libraries, and libwayland prints
    // "error: XDG_RUNTIME_DIR is invalid or not set" on headless machines, which reads as
    // our own error. Give it a directory; this runs before any thread exists.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) if a.chat => chat(a),
        Cmd::Run(a) => run(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Tokenize { model, no_bos, text } => tokenize(&model, no_bos, &text),
        Cmd::Inspect { path } => inspect(&path),
        Cmd::Bench {
            model,
            pp,
            tg,
            reps,
            depth,
            backend,
        } => bench(&model, pp, tg, reps, depth, &backend),
    };
    if let Err(e) = r {
        let _ = std::io::stdout().flush();
        eprintln!("error: {}", one_sentence(&e));
        std::process::exit(1);
    }
}

/// The error chain as one line.
fn one_sentence(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn load(model: &Path, backend: &str, ctx: u32, vocab_only: bool) -> Result<(Session, f64)> {
    let t = Instant::now();
    let bar = if std::io::stderr().is_terminal() && !vocab_only {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let b2 = bar.clone();
    let progress: Option<Box<dyn FnMut(u64, u64) + Send>> = b2.map(|b| {
        Box::new(move |done: u64, total: u64| {
            b.set_length(total);
            b.set_position(done);
        }) as Box<dyn FnMut(u64, u64) + Send>
    });
    let opts = LoadOptions {
        backend: backend.to_string(),
        ctx,
        vocab_only,
    };
    let s = Session::load(model, &opts, progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((s?, t.elapsed().as_secs_f64()))
}

fn read_prompt(a: &RunArgs) -> Result<String> {
    if let Some(p) = &a.prompt {
        return Ok(p.clone());
    }
    let bytes = match &a.file {
        Some(f) if f.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
            v
        }
        Some(f) => std::fs::read(f).with_context(|| format!("cannot read the prompt file {}", f.display()))?,
        None => bail!("give a prompt with --prompt TEXT or --file PATH, or use --chat"),
    };
    // Invalid UTF-8 is replaced (U+FFFD) rather than refused: a prompt is text.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn messages(system: &Option<String>, user: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message {
            role: "system".into(),
            content: s.clone(),
        });
    }
    m.push(Message {
        role: "user".into(),
        content: user.to_string(),
    });
    m
}

fn print_stream(piece: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(piece.as_bytes()).is_err() || out.flush().is_err()
}

fn summary(load_s: f64, g: &samepage::Generation) {
    let pp = g.prompt_tokens.saturating_sub(g.cached_tokens);
    let pps = if g.prompt_ns > 0 {
        pp as f64 / (g.prompt_ns as f64 * 1e-9)
    } else {
        0.0
    };
    let tgs = if g.gen_ns > 0 {
        g.completion_tokens as f64 / (g.gen_ns as f64 * 1e-9)
    } else {
        0.0
    };
    eprintln!(
        "load {:.2} s | prompt {} tok ({} cached), {:.1} tok/s | generation {} tok, {:.1} tok/s | {}",
        load_s, g.prompt_tokens, g.cached_tokens, pps, g.completion_tokens, tgs, g.finish_reason
    );
}

fn run(a: RunArgs) -> Result<()> {
    let prompt = read_prompt(&a)?;
    let (mut s, load_s) = load(&a.model, &a.backend, a.ctx, false)?;
    if let Some(p) = &a.load_session {
        restore_session(&mut s, p)?;
    }
    let input = if a.raw || s.model["chat_template"] == Value::Bool(false) && a.system.is_none() {
        json!({ "prompt": prompt })
    } else {
        json!({ "messages": messages(&a.system, &prompt) })
    };
    let g = s.generate(input, &a.gen_options(), false, print_stream)?;
    println!();
    summary(load_s, &g);
    if let Some(p) = &a.save_session {
        save_session(&mut s, p, None)?;
    }
    Ok(())
}

fn restore_session(s: &mut Session, path: &Path) -> Result<samepage_server::snapshot::Snapshot> {
    let t = Instant::now();
    let snap = s.load_session(path)?;
    eprintln!(
        "restored {} cached tokens from {} in {:.1} ms",
        snap.tokens.len(),
        path.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(snap)
}

fn save_session(s: &mut Session, path: &Path, history: Option<&[Message]>) -> Result<()> {
    let t = Instant::now();
    let extra: Vec<(&str, String)> = match history {
        Some(h) => vec![("messages", serde_json::to_string(h)?)],
        None => vec![],
    };
    let saved = s.save_session(path, &extra)?;
    eprintln!(
        "saved {} cached tokens ({:.1} MiB) to {} in {:.1} ms",
        saved.tokens,
        saved.bytes as f64 / (1u64 << 20) as f64,
        path.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("samepage_server=info"))
            .with_writer(std::io::stderr)
            .init();
    }
    std::fs::metadata(&a.model).with_context(|| format!("cannot open the model {}", a.model.display()))?;
    let host = std::sync::Arc::new(samepage::Host::new(&a.backend)?);
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let n = a
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        n.strip_suffix(".gguf").map(str::to_string).unwrap_or(n)
    });
    let session_dir = match &a.session_dir {
        Some(d) => d.clone(),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache/samepage/sessions"),
    };
    let (path, ctx) = (a.model.clone(), a.ctx);
    let factory: samepage_server::Factory = std::sync::Arc::new(move |vocab_only| {
        let opts = LoadOptions {
            backend: String::new(),
            ctx,
            vocab_only,
        };
        Ok(Box::new(Session::load_on(&host, &path, &opts, None)?) as Box<dyn samepage_server::Worker>)
    });
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(a.host.as_str(), a.port))
                .ok()
                .and_then(|mut i| i.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("cannot resolve --host {}", a.host))?;
    let cfg = samepage_server::Config {
        model_id,
        parallel: a.parallel,
        queue: a.queue,
        session_dir,
    };
    samepage_server::run(cfg, factory, addr)
}

fn chat(a: RunArgs) -> Result<()> {
    let (mut s, load_s) = load(&a.model, &a.backend, a.ctx, false)?;
    eprintln!(
        "loaded {} in {:.2} s on {}; type a message, an empty line or Ctrl-D ends",
        s.model["name"].as_str().unwrap_or("the model"),
        load_s,
        s.backend
    );
    let mut history: Vec<Message> = Vec::new();
    if let Some(p) = &a.load_session {
        let snap = restore_session(&mut s, p)?;
        if let Some(m) = snap.extra("messages") {
            history = serde_json::from_str(m).context("the session's conversation is malformed")?;
        }
    }
    if let Some(sys) = a.system.as_ref().filter(|_| history.is_empty()) {
        history.push(Message {
            role: "system".into(),
            content: sys.clone(),
        });
    }
    if let Some(p) = &a.prompt {
        history.push(Message {
            role: "user".into(),
            content: p.clone(),
        });
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut lines = stdin.lock().lines();
    loop {
        if history.last().map(|m| m.role != "user").unwrap_or(true) {
            if interactive {
                eprint!("> ");
            }
            let Some(line) = lines.next() else { break };
            let line = line.unwrap_or_else(|e| format!("{e}"));
            if line.trim().is_empty() {
                break;
            }
            history.push(Message {
                role: "user".into(),
                content: line,
            });
        }
        // The whole conversation is rendered each turn; the guest reuses the KV cache for
        // the prefix it already holds, so only the new turn is prefilled.
        let g = s.generate(json!({ "messages": history }), &a.gen_options(), false, print_stream)?;
        println!();
        summary(0.0, &g);
        history.push(Message {
            role: "assistant".into(),
            content: g.text,
        });
        if let Some(p) = &a.save_session {
            save_session(&mut s, p, Some(&history))?;
        }
    }
    Ok(())
}

fn tokenize(model: &Path, no_bos: bool, text: &str) -> Result<()> {
    let (mut s, _) = load(model, "cpu", 0, true)?;
    let ids = s.tokenize(text, !no_bos, true)?;
    println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    Ok(())
}

fn inspect(path: &Path) -> Result<()> {
    let (mut s, _) = load(path, "cpu", 0, true)?;
    let v = s.call(json!({"cmd": "inspect"}))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

fn bench(model: &Path, pp: u32, tg: u32, reps: u32, depth: u32, backend: &str) -> Result<()> {
    let ctx = (pp.max(depth) + tg + 16).max(256);
    let (mut s, _) = load(model, backend, ctx, false)?;
    let vocab = s.model["vocab"].as_u64().unwrap_or(32000) as u32;
    let threads = std::env::var("SAMEPAGE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let name = s.model["name"].as_str().unwrap_or("model").to_string();
    let size = s.model["weights_bytes"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    println!("| model | size | backend | threads | test | t/s |");
    println!("| --- | ---: | --- | ---: | --- | ---: |");
    let backend = s.backend.clone();
    let row = |test: String, xs: &[f64]| {
        let (m, sd) = mean_sd(xs);
        println!("| {name} | {size:.1} MiB | {backend} | {threads} | {test} | {m:.2} ± {sd:.2} |");
    };
    if pp > 0 {
        // Deterministic pseudo-random prompt tokens, as llama-bench uses random tokens.
        let tokens: Vec<u32> = (0..pp).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
        // Warm-up with the same prompt, as llama-bench does: the first run of a shape
        // records its graphs (and picks its GEMM kernels), which is not throughput.
        s.forward(&tokens, 0, false)?;
        let mut xs = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            s.forward(&tokens, 0, false)?;
            xs.push(pp as f64 / t.elapsed().as_secs_f64());
        }
        row(format!("pp{pp}"), &xs);
    }
    if tg > 0 {
        let opts = GenOptions {
            max_tokens: tg,
            temperature: 0.0,
            ignore_eos: true,
            ..GenOptions::default()
        };
        // The prompt (one token, or `depth` pseudo-random ones) is prefilled first; only the
        // decode is timed.
        let prompt: Vec<u32> = if depth == 0 {
            vec![1u32.min(vocab - 1)]
        } else {
            (0..depth).map(|i| (i.wrapping_mul(2246822519) >> 9) % vocab).collect()
        };
        let mut xs = Vec::new();
        for _ in 0..reps {
            s.reset()?;
            let g = s.generate(json!({ "tokens": prompt }), &opts, false, |_| false)?;
            xs.push(g.completion_tokens as f64 / (g.gen_ns as f64 * 1e-9));
        }
        let at = if depth > 0 {
            format!(" @ d{depth}")
        } else {
            String::new()
        };
        row(format!("tg{tg}{at}"), &xs);
    }
    Ok(())
}
