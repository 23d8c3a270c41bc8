//! The Llama-family model: configuration, weights (offsets into guest memory, which is the
//! backend's buffer) and the forward pass, recorded as ops.
use samepage_guest::abi::{self, DType};
use samepage_guest::{self as sp, Buffer, Graph, Recording};

/// Rows per prefill chunk: activations are sized for this many tokens.
pub const CHUNK: u32 = 256;
/// Tokens the repetition penalty looks back over.
pub const HISTORY: u32 = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: String,
    pub name: String,
    pub n_layers: u32,
    pub dim: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub ffn: u32,
    pub vocab: u32,
    pub ctx_max: u32,
    /// Rotated dims per head.
    pub n_rot: u32,
    pub norm_eps: f32,
    pub rope_base: f32,
    /// [`abi::ROPE_INTERLEAVED`] (GGUF llama) or [`abi::ROPE_HALF`] (HF, GGUF qwen2).
    pub rope_mode: u32,
    /// Llama-3 scaling: (factor, low_freq_factor, high_freq_factor, original_context).
    pub rope_scaling: Option<(f32, f32, f32, u32)>,
}

/// A weight matrix `(rows, cols)` (or a vector, rows = 1) at an offset in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Tensor {
    pub off: u32,
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
}

pub struct Layer {
    pub attn_norm: Tensor,         // (dim,) f32
    pub wq: Tensor,                // (n_heads * head_dim, dim)
    pub wk: Tensor,                // (n_kv_heads * head_dim, dim)
    pub wv: Tensor,                // (n_kv_heads * head_dim, dim)
    pub bqkv: Option<[Tensor; 3]>, // Qwen2: q, k, v biases, f32
    pub wo: Tensor,                // (dim, n_heads * head_dim)
    pub ffn_norm: Tensor,          // (dim,) f32
    pub w_gate: Tensor,            // (ffn, dim)
    pub w_up: Tensor,              // (ffn, dim)
    pub w_down: Tensor,            // (dim, ffn)
}

pub struct Weights {
    pub embed: Tensor, // (vocab, dim)
    pub layers: Vec<Layer>,
    pub out_norm: Tensor, // (dim,) f32
    pub output: Tensor,   // (vocab, dim); the embedding when tied
    /// Keeps the mapped file data and converted tensors alive.
    pub storage: Vec<Buffer>,
}

/// Activations, the KV cache and the sampler's small buffers, sized once per context.
pub struct State {
    pub ctx: u32,
    pub cache_dtype: DType,
    x: Buffer,                      // (CHUNK, dim) residual stream
    xb: Buffer,                     // (CHUNK, dim) normed
    q: Buffer,                      // (CHUNK, n_heads * head_dim)
    k: Buffer,                      // (CHUNK, n_kv_heads * head_dim)
    v: Buffer,                      // (CHUNK, n_kv_heads * head_dim)
    att: Buffer,                    // (CHUNK, n_heads * head_dim)
    hb: Buffer,                     // (CHUNK, ffn)
    hb2: Buffer,                    // (CHUNK, ffn)
    pub logits: Buffer,             // (vocab,) the last row's logits
    pub all_logits: Option<Buffer>, // (rows, vocab) for `forward` with all_logits
    k_cache: Buffer,                // (n_layers, n_kv_heads, ctx, head_dim) in cache_dtype
    v_cache: Buffer,                // (n_layers, n_kv_heads, ctx, head_dim)
    // Host-side per-token values, rewritten before each submit.
    ids: Buffer,         // (CHUNK,) u32 token ids
    positions: Buffer,   // (CHUNK,) u32; positions[0] is also the KV `pos`
    pub params: Buffer,  // SampleParams
    pub history: Buffer, // (HISTORY,) u32, the most recent tokens right-aligned
    pub rng: Buffer,     // u64
    pub sampled: Buffer, // u32
    decode: Option<Graph>,
    chunk: Option<Graph>,
    /// The tokens whose keys and values are in the cache, in order.
    pub tokens: Vec<u32>,
    /// The last token a generation sampled but did not run (unless it ended the turn):
    /// a `keep_cache` generation continues after it.
    pub pending: Option<u32>,
}

pub struct Model {
    pub cfg: Config,
    pub w: Weights,
}

/// Bytes of activations and cache for a context (for the 4 GiB check).
pub fn state_bytes(c: &Config, ctx: u32, cache_dtype: DType) -> u64 {
    let (chunk, qd, kvd) = (
        CHUNK as u64,
        (c.n_heads * c.head_dim) as u64,
        (c.n_kv_heads * c.head_dim) as u64,
    );
    let act = chunk * (2 * c.dim as u64 + 2 * qd + 2 * kvd + 2 * c.ffn as u64) * 4 + c.vocab as u64 * 4;
    let cache = 2 * c.n_layers as u64 * kvd * ctx as u64 * cache_dtype.block_bytes() as u64;
    act + cache
}

fn buf(bytes: u64, what: &str, hint: u32) -> Result<Buffer, String> {
    // Whole pages: placement hints work in pages, and a heap object sharing a page with
    // a device buffer would move that page between host and GPU every token.
    let b = Buffer::try_pages(bytes as usize)
        .ok_or_else(|| format!("out of guest memory allocating the {what} ({} MiB)", bytes >> 20))?;
    b.hint(hint);
    Ok(b)
}

impl State {
    pub fn new(c: &Config, ctx: u32, cache_dtype: DType) -> Result<State, String> {
        let (chunk, dim, qd, kvd, ffn) = (
            CHUNK as u64,
            c.dim as u64,
            (c.n_heads * c.head_dim) as u64,
            (c.n_kv_heads * c.head_dim) as u64,
            c.ffn as u64,
        );
        let dev = abi::hint::DEVICE;
        let cache = c.n_layers as u64 * kvd * ctx as u64 * cache_dtype.block_bytes() as u64;
        Ok(State {
            ctx,
            cache_dtype,
            x: buf(chunk * dim * 4, "activations", dev)?,
            xb: buf(chunk * dim * 4, "activations", dev)?,
            q: buf(chunk * qd * 4, "activations", dev)?,
            k: buf(chunk * kvd * 4, "activations", dev)?,
            v: buf(chunk * kvd * 4, "activations", dev)?,
            att: buf(chunk * qd * 4, "activations", dev)?,
            hb: buf(chunk * ffn * 4, "activations", dev)?,
            hb2: buf(chunk * ffn * 4, "activations", dev)?,
            // Written by the output matmul and read by the sample op, both on the device;
            // only `forward` hands logits to the host, which then reads them in place.
            logits: buf(c.vocab as u64 * 4, "logits", dev)?,
            all_logits: None,
            k_cache: buf(cache, "KV cache", dev)?,
            v_cache: buf(cache, "KV cache", dev)?,
            ids: buf(chunk * 4, "token ids", abi::hint::HOST)?,
            positions: buf(chunk * 4, "positions", abi::hint::HOST)?,
            params: buf(
                std::mem::size_of::<abi::SampleParams>() as u64,
                "sampler",
                abi::hint::HOST,
            )?,
            history: buf(HISTORY as u64 * 4, "sampler", abi::hint::HOST)?,
            rng: buf(8, "sampler", abi::hint::HOST)?,
            sampled: buf(4, "sampler", abi::hint::HOST)?,
            decode: None,
            chunk: None,
            tokens: Vec::new(),
            pending: None,
        })
    }

    /// The KV cache for snapshots: `(k_cache offset, v_cache offset, bytes of each)`, both
    /// laid out `(n_layers, n_kv_heads, ctx, head_dim)` in `cache_dtype`.
    pub fn kv_cache(&self) -> (u32, u32, usize) {
        (self.k_cache.offset(), self.v_cache.offset(), self.k_cache.len())
    }

    fn set_tokens(&mut self, toks: &[u32], start: u32) {
        self.ids.as_mut_slice::<u32>()[..toks.len()].copy_from_slice(toks);
        for (i, p) in self.positions.as_mut_slice::<u32>()[..toks.len()]
            .iter_mut()
            .enumerate()
        {
            *p = start + i as u32;
        }
    }
}

/// Record the ops `f` issues as a graph (closing the recording even when an op fails).
fn record(f: impl FnOnce() -> sp::Result<()>) -> sp::Result<Graph> {
    let rec = Recording::begin()?;
    match f() {
        Ok(()) => rec.end(),
        Err(e) => {
            drop(rec.end());
            Err(e)
        }
    }
}

/// `out (+)= x W^T (+ b)` over `n` rows.
fn mm(w: &Tensor, x: &Buffer, n: u32, out: u32, bias: Option<&Tensor>, flags: u32) -> sp::Result<()> {
    sp::matmul(&abi::Matmul {
        w: w.off,
        dtype: w.dtype as u32,
        m: w.rows,
        k: w.cols,
        x: x.offset(),
        n,
        out,
        bias: bias.map_or(0, |b| b.off),
        flags: flags | if bias.is_some() { abi::MATMUL_BIAS } else { 0 },
    })
}

impl Model {
    fn rope(&self, x: &Buffer, n: u32, n_heads: u32, s: &State) -> sp::Result<()> {
        let c = &self.cfg;
        let (factor, low, high, orig) = c.rope_scaling.unwrap_or((0.0, 0.0, 0.0, 0));
        sp::rope(&abi::Rope {
            x: x.offset(),
            n,
            n_heads,
            head_dim: c.head_dim,
            n_rot: c.n_rot,
            mode: c.rope_mode,
            positions: s.positions.offset(),
            freq_base: c.rope_base,
            scaling_factor: factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_context: orig,
        })
    }

    /// The forward pass over `n` tokens (ids, positions set in `s`) up to the residual
    /// stream `x`, writing their keys and values into the cache.
    fn layers(&self, s: &State, n: u32) -> sp::Result<()> {
        let (c, w) = (&self.cfg, &self.w);
        let (dim, hd, kvd) = (c.dim, c.head_dim, c.n_kv_heads * c.head_dim);
        let layer_bytes = (kvd * s.ctx) as usize * s.cache_dtype.block_bytes();
        let e = w.embed;
        sp::embed(&abi::Embed {
            table: e.off,
            dtype: e.dtype as u32,
            vocab: e.rows,
            dim,
            ids: s.ids.offset(),
            n,
            out: s.x.offset(),
        })?;
        for (l, ly) in w.layers.iter().enumerate() {
            // Attention: x += Wo · attn(rope(Wq·xb), cache(rope(Wk·xb), Wv·xb)), xb = rmsnorm(x).
            let norm = |wt: &Tensor| {
                sp::rmsnorm(&abi::RmsNorm {
                    x: s.x.offset(),
                    weight: wt.off,
                    out: s.xb.offset(),
                    n,
                    dim,
                    eps: c.norm_eps,
                })
            };
            norm(&ly.attn_norm)?;
            let b = ly.bqkv.as_ref();
            mm(&ly.wq, &s.xb, n, s.q.offset(), b.map(|b| &b[0]), 0)?; // q (n, n_heads, hd)
            mm(&ly.wk, &s.xb, n, s.k.offset(), b.map(|b| &b[1]), 0)?; // k (n, n_kv_heads, hd)
            mm(&ly.wv, &s.xb, n, s.v.offset(), b.map(|b| &b[2]), 0)?; // v (n, n_kv_heads, hd)
            self.rope(&s.q, n, c.n_heads, s)?;
            self.rope(&s.k, n, c.n_kv_heads, s)?;
            let (kc, vc) = (
                s.k_cache.offset_at(l * layer_bytes),
                s.v_cache.offset_at(l * layer_bytes),
            );
            let (cd, pos) = (s.cache_dtype as u32, s.positions.offset());
            sp::kv_store(&abi::KvStore {
                k: s.k.offset(),
                v: s.v.offset(),
                n,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                k_cache: kc,
                v_cache: vc,
                cache_dtype: cd,
                ctx: s.ctx,
                pos,
            })?;
            sp::attention(&abi::Attention {
                q: s.q.offset(),
                n,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                k_cache: kc,
                v_cache: vc,
                cache_dtype: cd,
                ctx: s.ctx,
                pos,
                out: s.att.offset(),
                scale: 1.0 / (hd as f32).sqrt(),
            })?; // att (n, n_heads, hd)
            mm(&ly.wo, &s.att, n, s.x.offset(), None, abi::MATMUL_ACCUMULATE)?;
            // Feed-forward: x += W_down · (silu(W_gate·xb) * W_up·xb), xb = rmsnorm(x).
            norm(&ly.ffn_norm)?;
            mm(&ly.w_gate, &s.xb, n, s.hb.offset(), None, 0)?; // hb (n, ffn)
            mm(&ly.w_up, &s.xb, n, s.hb2.offset(), None, 0)?; // hb2 (n, ffn)
            let len = n * c.ffn;
            sp::swiglu(&abi::SwiGlu {
                gate: s.hb.offset(),
                up: s.hb2.offset(),
                out: s.hb.offset(),
                len,
            })?;
            mm(&ly.w_down, &s.hb, n, s.x.offset(), None, abi::MATMUL_ACCUMULATE)?;
        }
        Ok(())
    }

    /// Logits for rows `row .. row + n` of `x`: rmsnorm, then the output matrix, into `out`.
    fn head(&self, s: &State, row: u32, n: u32, out: u32) -> sp::Result<()> {
        let dim = self.cfg.dim;
        let (x, xb) = (s.x.offset() + row * dim * 4, s.xb.offset());
        sp::rmsnorm(&abi::RmsNorm {
            x,
            weight: self.w.out_norm.off,
            out: xb,
            n,
            dim,
            eps: self.cfg.norm_eps,
        })?;
        mm(&self.w.output, &s.xb, n, out, None, 0)
    }

    fn sample_op(&self, s: &State) -> abi::Sample {
        abi::Sample {
            logits: s.logits.offset(),
            vocab: self.cfg.vocab,
            params: s.params.offset(),
            history: s.history.offset(),
            history_cap: HISTORY,
            rng: s.rng.offset(),
            out: s.sampled.offset(),
        }
    }

    /// Run `toks` at positions `start..`, leaving the last token's logits in `s.logits`
    /// (or every token's in `s.all_logits`, which must hold `toks.len()` rows).
    pub fn prefill(&self, s: &mut State, toks: &[u32], start: u32, all_logits: bool) -> sp::Result<()> {
        let vocab = self.cfg.vocab;
        let mut done = 0u32;
        for chunk in toks.chunks(CHUNK as usize) {
            let n = chunk.len() as u32;
            s.set_tokens(chunk, start + done);
            if n == CHUNK {
                if s.chunk.is_none() {
                    s.chunk = Some(record(|| self.layers(s, CHUNK))?);
                }
                s.chunk.as_ref().unwrap().run()?;
            } else {
                self.layers(s, n)?;
            }
            if all_logits {
                let out = s
                    .all_logits
                    .as_ref()
                    .map_or(0, |b| b.offset_at((done * vocab) as usize * 4));
                self.head(s, 0, n, out)?;
            } else if done + n == toks.len() as u32 {
                self.head(s, n - 1, 1, s.logits.offset())?;
            }
            done += n;
        }
        Ok(())
    }

    /// Sample from `s.logits` now (after a prefill).
    pub fn sample(&self, s: &State) -> sp::Result<u32> {
        sp::sample(&self.sample_op(s))?;
        Ok(s.sampled.as_slice::<u32>()[0])
    }

    /// One decode step: run `token` at `pos` and sample the next token. The step is recorded
    /// once as a graph and replayed; only `ids[0]`, `positions[0]` (and the sampler's
    /// buffers) change between replays.
    pub fn step(&self, s: &mut State, token: u32, pos: u32) -> sp::Result<u32> {
        s.set_tokens(&[token], pos);
        if s.decode.is_none() {
            s.decode = Some(record(|| {
                self.layers(s, 1)?;
                self.head(s, 0, 1, s.logits.offset())?;
                sp::sample(&self.sample_op(s))
            })?);
        }
        s.decode.as_ref().unwrap().submit()?.wait()?;
        Ok(s.sampled.as_slice::<u32>()[0])
    }
}
