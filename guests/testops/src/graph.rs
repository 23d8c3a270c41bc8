//! A one-layer transformer step, recorded once and replayed per token (check ids 2000+).
//!
//! Two sessions run the same ops on their own activations and KV caches: `a` through a
//! recorded graph, `b` op by op in immediate mode. Between steps the guest writes the
//! per-token values (token id, position) into memory; the kernels must read them at
//! execution time, so both sessions must agree with each other exactly, and with an f64
//! reference of the whole step within the tolerance of the quantised matmuls.
use samepage_guest::{self as sg, abi, abi::DType, Buffer, Recording};

use crate::refs::{self, Rng};
use crate::util::*;

const DIM: usize = 256;
const N_HEADS: usize = 4;
const N_KV: usize = 2;
const HD: usize = 64; // DIM / N_HEADS
const KV_DIM: usize = N_KV * HD;
const CTX: usize = 8;
const VOCAB: usize = 32;
const FF: usize = 256;
const STEPS: usize = 6;

/// A weight matrix in guest memory and its dequantised copy.
struct W {
    buf: Buffer,
    dt: DType,
    rows: usize,
    cols: usize,
    f: Vec<f32>,
}

impl W {
    fn new(dt: DType, rows: usize, cols: usize, rng: &mut Rng) -> W {
        let b = refs::random_weights(dt, rows, cols, rng);
        let f = refs::dequant(dt, &b, rows, cols);
        W {
            buf: byte_buf(&b),
            dt,
            rows,
            cols,
            f,
        }
    }
}

struct Weights {
    emb: W,            // (VOCAB, DIM) q4_K
    attn_norm: Buffer, // (DIM,)
    wq: W,             // (DIM, DIM) q8_0
    wk: W,             // (KV_DIM, DIM) q6_K
    wv: W,             // (KV_DIM, DIM) bf16
    wo: W,             // (DIM, DIM) f16
    ffn_norm: Buffer,  // (DIM,)
    w1: W,             // (FF, DIM) q5_K
    w3: W,             // (FF, DIM) q4_1
    w2: W,             // (DIM, FF) q5_0
    out_norm: Buffer,  // (DIM,)
    lm: W,             // (VOCAB, DIM) f32
    lm_bias: Buffer,   // (VOCAB,)
}

/// One session's per-token values, activations and cache.
struct Session {
    id: Buffer,     // (1,) u32 token id
    pos: Buffer,    // (1,) u32 position (also rope's positions)
    x: Buffer,      // (DIM,) residual stream
    xn: Buffer,     // (DIM,)
    q: Buffer,      // (N_HEADS, HD)
    k: Buffer,      // (N_KV, HD)
    v: Buffer,      // (N_KV, HD)
    kc: Buffer,     // (N_KV, CTX, HD) f16
    vc: Buffer,     // (N_KV, CTX, HD) f16
    att: Buffer,    // (N_HEADS, HD)
    h1: Buffer,     // (FF,)
    h3: Buffer,     // (FF,)
    hs: Buffer,     // (FF,)
    ffo: Buffer,    // (DIM,)
    logits: Buffer, // (VOCAB,)
    half: Buffer,   // (VOCAB,) logits * 0.5
    probs: Buffer,  // (VOCAB,)
    tok: Buffer,    // (1,) u32 argmax
    tok2: Buffer,   // (1,) u32 greedy sample
    params: Buffer, // SampleParams
    history: Buffer,
    rng: Buffer, // u64
}

impl Session {
    fn new() -> Session {
        let f = Buffer::f32s;
        let cache = || Buffer::new(N_KV * CTX * HD * 2, 64);
        Session {
            id: u32_buf(&[0]),
            pos: u32_buf(&[0]),
            x: f(DIM),
            xn: f(DIM),
            q: f(DIM),
            k: f(KV_DIM),
            v: f(KV_DIM),
            kc: cache(),
            vc: cache(),
            att: f(DIM),
            h1: f(FF),
            h3: f(FF),
            hs: f(FF),
            ffo: f(DIM),
            logits: f(VOCAB),
            half: f(VOCAB),
            probs: f(VOCAB),
            tok: u32_buf(&[0]),
            tok2: u32_buf(&[0]),
            params: byte_buf(abi::pod_bytes(&abi::SampleParams::default())),
            history: u32_buf(&[0]),
            rng: Buffer::new(8, 64),
        }
    }

    fn set_token(&mut self, token: u32, pos: u32) {
        self.id.as_mut_slice::<u32>()[0] = token;
        self.pos.as_mut_slice::<u32>()[0] = pos;
    }
}

fn matmul(w: &W, x: &Buffer, out: &Buffer, flags: u32, bias: u32) -> sg::Result<()> {
    sg::matmul(&abi::Matmul {
        w: w.buf.offset(),
        dtype: w.dt as u32,
        m: w.rows as u32,
        k: w.cols as u32,
        x: x.offset(),
        n: 1,
        out: out.offset(),
        bias,
        flags,
    })
}

fn rope_desc(x: &Buffer, n_heads: usize, pos: &Buffer) -> abi::Rope {
    abi::Rope {
        x: x.offset(),
        positions: pos.offset(),
        ..rope_params(n_heads)
    }
}

/// Llama-3-style RoPE parameters (offsets left 0).
fn rope_params(n_heads: usize) -> abi::Rope {
    abi::Rope {
        x: 0,
        n: 1,
        n_heads: n_heads as u32,
        head_dim: HD as u32,
        n_rot: HD as u32,
        mode: abi::ROPE_HALF,
        positions: 0,
        freq_base: 500000.0,
        scaling_factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 8192,
    }
}

/// The step, as ops; run immediately or recorded, depending on the caller.
fn step(w: &Weights, s: &Session) -> sg::Result<()> {
    let norm = |x: &Buffer, g: &Buffer, out: &Buffer| {
        sg::rmsnorm(&abi::RmsNorm {
            x: x.offset(),
            weight: g.offset(),
            out: out.offset(),
            n: 1,
            dim: DIM as u32,
            eps: 1e-5,
        })
    };
    let f16 = DType::F16 as u32;
    sg::embed(&abi::Embed {
        table: w.emb.buf.offset(),
        dtype: w.emb.dt as u32,
        vocab: VOCAB as u32,
        dim: DIM as u32,
        ids: s.id.offset(),
        n: 1,
        out: s.x.offset(),
    })?;
    norm(&s.x, &w.attn_norm, &s.xn)?;
    matmul(&w.wq, &s.xn, &s.q, 0, 0)?;
    matmul(&w.wk, &s.xn, &s.k, 0, 0)?;
    matmul(&w.wv, &s.xn, &s.v, 0, 0)?;
    sg::rope(&rope_desc(&s.q, N_HEADS, &s.pos))?;
    sg::rope(&rope_desc(&s.k, N_KV, &s.pos))?;
    sg::kv_store(&abi::KvStore {
        k: s.k.offset(),
        v: s.v.offset(),
        n: 1,
        n_kv_heads: N_KV as u32,
        head_dim: HD as u32,
        k_cache: s.kc.offset(),
        v_cache: s.vc.offset(),
        cache_dtype: f16,
        ctx: CTX as u32,
        pos: s.pos.offset(),
    })?;
    sg::attention(&abi::Attention {
        q: s.q.offset(),
        n: 1,
        n_heads: N_HEADS as u32,
        n_kv_heads: N_KV as u32,
        head_dim: HD as u32,
        k_cache: s.kc.offset(),
        v_cache: s.vc.offset(),
        cache_dtype: f16,
        ctx: CTX as u32,
        pos: s.pos.offset(),
        out: s.att.offset(),
        scale: 1.0 / (HD as f32).sqrt(),
    })?;
    matmul(&w.wo, &s.att, &s.x, abi::MATMUL_ACCUMULATE, 0)?;
    norm(&s.x, &w.ffn_norm, &s.xn)?;
    matmul(&w.w1, &s.xn, &s.h1, 0, 0)?;
    matmul(&w.w3, &s.xn, &s.h3, 0, 0)?;
    sg::swiglu(&abi::SwiGlu {
        gate: s.h1.offset(),
        up: s.h3.offset(),
        out: s.hs.offset(),
        len: FF as u32,
    })?;
    matmul(&w.w2, &s.hs, &s.ffo, 0, 0)?;
    sg::add(&abi::Add {
        a: s.x.offset(),
        b: s.ffo.offset(),
        out: s.x.offset(),
        len: DIM as u32,
    })?;
    norm(&s.x, &w.out_norm, &s.xn)?;
    matmul(&w.lm, &s.xn, &s.logits, abi::MATMUL_BIAS, w.lm_bias.offset())?;
    sg::scale(&abi::Scale {
        x: s.logits.offset(),
        out: s.half.offset(),
        len: VOCAB as u32,
        scale: 0.5,
    })?;
    sg::softmax(&abi::Softmax {
        x: s.half.offset(),
        out: s.probs.offset(),
        rows: 1,
        cols: VOCAB as u32,
    })?;
    sg::argmax(&abi::Argmax {
        x: s.logits.offset(),
        out: s.tok.offset(),
        rows: 1,
        cols: VOCAB as u32,
    })?;
    sg::sample(&abi::Sample {
        logits: s.logits.offset(),
        vocab: VOCAB as u32,
        params: s.params.offset(),
        history: s.history.offset(),
        history_cap: 1,
        rng: s.rng.offset(),
        out: s.tok2.offset(),
    })
}

/// The same step in f64 (activations rounded to f32 between ops, the cache to f16).
struct Reference {
    kc: Vec<f32>, // (N_KV, CTX, HD)
    vc: Vec<f32>,
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl Reference {
    fn step(&mut self, w: &Weights, ws: &[Vec<f32>; 4], token: usize, pos: usize) -> Vec<f64> {
        let [attn_norm, ffn_norm, out_norm, lm_bias] = ws;
        let mm = |w: &W, x: &[f32]| refs::matmul(&w.f, x, w.rows, w.cols, 1);
        let mut x: Vec<f32> = w.emb.f[token * DIM..][..DIM].to_vec();
        let xn = to32(&refs::rmsnorm(&x, attn_norm, DIM, 1e-5));
        let (q, k, v) = (to32(&mm(&w.wq, &xn)), to32(&mm(&w.wk, &xn)), to32(&mm(&w.wv, &xn)));
        let q = to32(&refs::rope(&q, &rope_params(N_HEADS), &[pos as u32]));
        let k = to32(&refs::rope(&k, &rope_params(N_KV), &[pos as u32]));
        let round = |x: f32| refs::f16_to_f32(refs::f32_to_f16(x));
        for h in 0..N_KV {
            for e in 0..HD {
                self.kc[(h * CTX + pos) * HD + e] = round(k[h * HD + e]);
                self.vc[(h * CTX + pos) * HD + e] = round(v[h * HD + e]);
            }
        }
        let att = to32(&refs::attention(
            &q, &self.kc, &self.vc, 1, N_HEADS, N_KV, HD, CTX, pos, 0.125,
        ));
        for (xi, o) in x.iter_mut().zip(mm(&w.wo, &att)) {
            *xi = (*xi as f64 + o) as f32;
        }
        let xn = to32(&refs::rmsnorm(&x, ffn_norm, DIM, 1e-5));
        let (h1, h3) = (to32(&mm(&w.w1, &xn)), to32(&mm(&w.w3, &xn)));
        let hs: Vec<f32> = h1
            .iter()
            .zip(&h3)
            .map(|(&g, &u)| (refs::silu(g) * u as f64) as f32)
            .collect();
        for (xi, o) in x.iter_mut().zip(mm(&w.w2, &hs)) {
            *xi = (*xi as f64 + o) as f32;
        }
        let xn = to32(&refs::rmsnorm(&x, out_norm, DIM, 1e-5));
        mm(&w.lm, &xn)
            .iter()
            .zip(lm_bias)
            .map(|(&l, &b)| l + b as f64)
            .collect()
    }
}

pub fn replay() -> Checked {
    let mut rng = Rng(0x5eed_0002);
    let norm = |rng: &mut Rng| rng.f32s(DIM, 0.5).iter().map(|v| v + 1.0).collect::<Vec<f32>>();
    let (attn_norm, ffn_norm, out_norm) = (norm(&mut rng), norm(&mut rng), norm(&mut rng));
    let lm_bias = rng.f32s(VOCAB, 0.1);
    let w = Weights {
        emb: W::new(DType::Q4_K, VOCAB, DIM, &mut rng),
        attn_norm: f32_buf(&attn_norm),
        wq: W::new(DType::Q8_0, DIM, DIM, &mut rng),
        wk: W::new(DType::Q6_K, KV_DIM, DIM, &mut rng),
        wv: W::new(DType::BF16, KV_DIM, DIM, &mut rng),
        wo: W::new(DType::F16, DIM, DIM, &mut rng),
        ffn_norm: f32_buf(&ffn_norm),
        w1: W::new(DType::Q5_K, FF, DIM, &mut rng),
        w3: W::new(DType::Q4_1, FF, DIM, &mut rng),
        w2: W::new(DType::Q5_0, DIM, FF, &mut rng),
        out_norm: f32_buf(&out_norm),
        lm: W::new(DType::F32, VOCAB, DIM, &mut rng),
        lm_bias: f32_buf(&lm_bias),
    };
    let ws = [attn_norm, ffn_norm, out_norm, lm_bias];
    let (mut a, mut b) = (Session::new(), Session::new());
    let mut r = Reference {
        kc: vec![0.0; N_KV * CTX * HD],
        vc: vec![0.0; N_KV * CTX * HD],
    };

    let rec = Recording::begin().map_err(|e| fail(2000, &format!("graph_begin: {e}")))?;
    if let Err(e) = step(&w, &a) {
        // Leave the recording state clean before reporting.
        let _ = rec.end();
        return Err(fail(2001, &format!("recording the step: {e}")));
    }
    let graph = rec.end().map_err(|e| fail(2002, &format!("graph_end: {e}")))?;

    // Distinct tokens, so every cached key and value differs: a kernel that read the
    // position at record time instead of at run time would attend to the wrong ones.
    let tokens = [1u32, 5, 9, 14, 22, 30];
    for (t, &token) in tokens.iter().enumerate().take(STEPS) {
        let id = 2010 + 10 * t as i32;
        a.set_token(token, t as u32);
        b.set_token(token, t as u32);
        graph.run().map_err(|e| fail(id, &format!("step {t}: graph: {e}")))?;
        step(&w, &b).map_err(|e| fail(id + 1, &format!("step {t}: immediate: {e}")))?;
        let la = f32s(&a.logits, VOCAB);
        let lb: Vec<f64> = f32s(&b.logits, VOCAB).iter().map(|&v| v as f64).collect();
        close(id + 2, &format!("step {t}: graph == immediate"), &la, &lb, 1e-12)?;
        let want = r.step(&w, &ws, token as usize, t);
        close(id + 3, &format!("step {t}: graph vs f64 reference"), &la, &want, 2e-3)?;
        let half: Vec<f64> = la.iter().map(|&v| v as f64 * 0.5).collect();
        close(
            id + 4,
            &format!("step {t}: probs"),
            &f32s(&a.probs, VOCAB),
            &refs::softmax(&half),
            1e-10,
        )?;
        let (ta, tb) = (a.tok.as_slice::<u32>()[0], b.tok.as_slice::<u32>()[0]);
        let ts = a.tok2.as_slice::<u32>()[0];
        expect(
            id + 5,
            &format!("step {t}: tokens {ta} {tb} {ts} agree"),
            ta == tb && ta == ts,
        )?;
        expect(id + 6, &format!("step {t}: argmax"), ta == refs::argmax(&la))?;
    }
    sg::log(&format!("ok   [2000] graph replayed {STEPS} steps"));
    Ok(())
}
