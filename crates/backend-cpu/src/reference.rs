//! Plain scalar implementations of every op, on slices, for conformance suites (this
//! crate's and the GPU backends'). Written for clarity: f64 accumulation, no SIMD, no
//! threads. Quantized weights are dequantized with [`crate::quant`] (bit-exact with
//! ggml), so the reference matmul does not quantize the activations.
use samepage_abi::{DType, SampleParams, ROPE_INTERLEAVED};

use crate::quant::dequant_row;

pub use crate::elementwise::argmax_row;
pub use crate::rope::rope_freqs;
pub use crate::sample::{draw_uniform, sample_logits, splitmix64};

/// Dequantize a `(rows, cols)` weight matrix.
pub fn dequant(dtype: DType, w: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let rb = dtype.row_bytes(cols).expect("cols in whole blocks");
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        dequant_row(dtype, &w[r * rb..(r + 1) * rb], &mut out[r * cols..(r + 1) * cols]);
    }
    out
}

/// `out[i, :] = table[ids[i], :]`.
pub fn embed(dtype: DType, table: &[u8], vocab: usize, dim: usize, ids: &[u32]) -> Vec<f32> {
    let t = dequant(dtype, table, vocab, dim);
    ids.iter()
        .flat_map(|&id| t[id as usize * dim..(id as usize + 1) * dim].to_vec())
        .collect()
}

/// `(n, m) = x (n, k) W^T (m, k) (+ bias)`, then `+ prev` when accumulating.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dtype: DType,
    w: &[u8],
    m: usize,
    k: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    prev: Option<&[f32]>,
) -> Vec<f32> {
    let wf = dequant(dtype, w, m, k);
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut s = 0.0f64;
            for l in 0..k {
                s += x[i * k + l] as f64 * wf[j * k + l] as f64;
            }
            if let Some(b) = bias {
                s += b[j] as f64;
            }
            if let Some(p) = prev {
                s += p[i * m + j] as f64;
            }
            out[i * m + j] = s as f32;
        }
    }
    out
}

pub fn rmsnorm(x: &[f32], weight: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    x.chunks_exact(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &w)| (v as f64 * s * w as f64) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// RoPE on `(n, n_heads, head_dim)`, returning the rotated copy.
pub fn rope(x: &[f32], desc: &samepage_abi::Rope, positions: &[u32]) -> Vec<f32> {
    let (heads, hd, half) = (desc.n_heads as usize, desc.head_dim as usize, desc.n_rot as usize / 2);
    let freqs = rope_freqs(desc);
    let mut out = x.to_vec();
    for (i, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let v = &mut out[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            for (j, &f) in freqs.iter().enumerate() {
                let (s, c) = (p as f64 * f).sin_cos();
                let (a, b) = if desc.mode == ROPE_INTERLEAVED {
                    (2 * j, 2 * j + 1)
                } else {
                    (j, j + half)
                };
                let (x0, x1) = (v[a] as f64, v[b] as f64);
                v[a] = (x0 * c - x1 * s) as f32;
                v[b] = (x0 * s + x1 * c) as f32;
            }
        }
    }
    out
}

/// Causal GQA attention. `q`: `(n, n_heads, hd)`; caches `(n_kv_heads, ctx, hd)` as f32
/// (convert an f16 cache first); queries at positions `pos..pos + n`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    n: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    ctx: usize,
    pos: usize,
    scale: f32,
) -> Vec<f32> {
    let group = n_heads / n_kv_heads;
    let mut out = vec![0.0; n * n_heads * hd];
    for i in 0..n {
        for h in 0..n_heads {
            let kv = h / group;
            let qv = &q[(i * n_heads + h) * hd..(i * n_heads + h + 1) * hd];
            let len = pos + i + 1;
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    let k = &k_cache[(kv * ctx + t) * hd..(kv * ctx + t + 1) * hd];
                    qv.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let mut acc = 0.0f64;
                for (t, &p) in e.iter().enumerate() {
                    acc += p * v_cache[(kv * ctx + t) * hd + d] as f64;
                }
                out[(i * n_heads + h) * hd + d] = (acc / sum) as f32;
            }
        }
    }
    out
}

pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
        .collect()
}

pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

pub fn scale(x: &[f32], s: f32) -> Vec<f32> {
    x.iter().map(|v| v * s).collect()
}

pub fn softmax(x: &[f32], cols: usize) -> Vec<f32> {
    x.chunks_exact(cols)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / s) as f32).collect::<Vec<_>>()
        })
        .collect()
}

pub fn argmax(x: &[f32], cols: usize) -> Vec<u32> {
    x.chunks_exact(cols).map(argmax_row).collect()
}

/// The sampler (the ABI's specification, see [`samepage_abi::Sample`]).
pub fn sample(logits: &[f32], params: &SampleParams, history_window: &[u32], rng: &mut u64) -> Result<u32, String> {
    sample_logits(logits, params, history_window, rng)
}

/// `‖a − b‖ / ‖b‖` (0 when both are zero).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
