//! Scalar references: number formats, ggml block dequantisation, and each op in f64.
use samepage_guest::abi::{self, DType};

/// xorshift64*: deterministic test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Round to nearest even, as `half` does. Inputs here are finite and in f16 range.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1u32 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let rem = man & 0x1fff;
    let mut r = ((e as u32) << 10) | (man >> 13);
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// ggml's `get_scale_min_k4`.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Dequantise one block (ggml's `dequantize_row_*`), appending to `y`.
fn dequant_block(dt: DType, b: &[u8], y: &mut Vec<f32>) {
    match dt {
        DType::F32 => y.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::F16 => y.push(f16_at(b, 0)),
        DType::BF16 => y.push(bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        DType::U32 => unreachable!(),
        DType::Q8_0 => {
            let d = f16_at(b, 0);
            y.extend(b[2..34].iter().map(|&q| d * q as i8 as f32));
        }
        DType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            y.extend(qs.iter().map(|&q| ((q & 0xf) as i32 - 8) as f32 * d));
            y.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
        }
        DType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            y.extend(qs.iter().map(|&q| (q & 0xf) as f32 * d + m));
            y.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
        }
        DType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            let mut hi = [0f32; 16];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                y.push((((qs[j] as u32 & 0xf) | xh0) as i32 - 16) as f32 * d);
                hi[j] = (((qs[j] as u32 >> 4) | xh1) as i32 - 16) as f32 * d;
            }
            y.extend_from_slice(&hi);
        }
        DType::Q4_K | DType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, mut ql) = if dt == DType::Q5_K {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            let (mut u1, mut u2) = (1u8, 2u8);
            for is in (0..8).step_by(2) {
                let (sc, m) = scale_min_k4(is, scales);
                let (d1, m1) = (d * sc, dmin * m);
                let (sc, m) = scale_min_k4(is + 1, scales);
                let (d2, m2) = (d * sc, dmin * m);
                for l in 0..32 {
                    let h = if !qh.is_empty() && qh[l] & u1 != 0 { 16.0 } else { 0.0 };
                    y.push(d1 * ((ql[l] & 0xf) as f32 + h) - m1);
                }
                for l in 0..32 {
                    let h = if !qh.is_empty() && qh[l] & u2 != 0 { 16.0 } else { 0.0 };
                    y.push(d2 * ((ql[l] >> 4) as f32 + h) - m2);
                }
                ql = &ql[32..];
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        DType::Q6_K => {
            let d = f16_at(b, 208);
            for n in 0..2 {
                let ql = &b[n * 64..n * 64 + 64];
                let qh = &b[128 + n * 32..128 + n * 32 + 32];
                let sc = &b[192 + n * 8..192 + n * 8 + 8];
                let mut out = [0f32; 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    out[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    out[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    out[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    out[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
                y.extend_from_slice(&out);
            }
        }
    }
}

/// Dequantise `rows` rows of `cols` elements.
pub fn dequant(dt: DType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let row_bytes = dt.row_bytes(cols).unwrap();
    let mut y = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
        for blk in row.chunks_exact(dt.block_bytes()) {
            dequant_block(dt, blk, &mut y);
        }
    }
    y
}

/// Random weights of `(rows, cols)` in `dt`, values of order 1 (valid blocks: random
/// quants, small positive scales).
pub fn random_weights(dt: DType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let n = rows * dt.row_bytes(cols).unwrap();
    let mut b = vec![0u8; n];
    let scale16 = |rng: &mut Rng, lo: f32, hi: f32| f32_to_f16(lo + (rng.f32() * 0.5 + 0.5) * (hi - lo));
    for blk in b.chunks_exact_mut(dt.block_bytes()) {
        for x in blk.iter_mut() {
            *x = rng.byte();
        }
        let put = |blk: &mut [u8], at: usize, h: u16| blk[at..at + 2].copy_from_slice(&h.to_le_bytes());
        match dt {
            DType::F32 => blk.copy_from_slice(&rng.f32().to_le_bytes()),
            DType::F16 => put(blk, 0, f32_to_f16(rng.f32())),
            DType::BF16 => put(blk, 0, (rng.f32().to_bits() >> 16) as u16),
            DType::Q8_0 => {
                put(blk, 0, scale16(rng, 0.004, 0.01));
                for q in &mut blk[2..] {
                    if *q == 0x80 {
                        *q = 0x81; // ggml never produces -128
                    }
                }
            }
            DType::Q4_0 | DType::Q5_0 => put(blk, 0, scale16(rng, 0.05, 0.1)),
            DType::Q4_1 => {
                put(blk, 0, scale16(rng, 0.05, 0.1));
                put(blk, 2, f32_to_f16(-rng.f32().abs() * 0.5));
            }
            DType::Q4_K | DType::Q5_K => {
                put(blk, 0, scale16(rng, 0.001, 0.003));
                put(blk, 2, scale16(rng, 0.001, 0.003));
            }
            DType::Q6_K => {
                put(blk, 208, scale16(rng, 0.0005, 0.001));
                for s in &mut blk[192..208] {
                    *s = ((*s as i8) / 2) as u8;
                }
            }
            DType::U32 => unreachable!(),
        }
    }
    b
}

/// Normalised mean squared error `sum (a-b)^2 / sum b^2` (ggml's test-backend-ops).
pub fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut num = 0.0;
    let mut den = 0.0;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w) * (g as f64 - w);
        den += w * w;
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

pub fn matmul(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum();
        }
    }
    out
}

pub fn rmsnorm(x: &[f32], w: &[f32], dim: usize, eps: f32) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| v as f64 * r * g as f64));
    }
    out
}

/// Inverse frequencies of RoPE, with Llama-3 scaling (Hugging Face's
/// `_compute_llama3_parameters`) when `scaling_factor > 0`.
pub fn rope_freqs(r: &abi::Rope) -> Vec<f64> {
    let n_rot = r.n_rot as usize;
    (0..n_rot / 2)
        .map(|j| {
            let inv = (r.freq_base as f64).powf(-2.0 * j as f64 / n_rot as f64);
            if r.scaling_factor <= 0.0 {
                return inv;
            }
            let (factor, lo, hi, ctx) = (
                r.scaling_factor as f64,
                r.low_freq_factor as f64,
                r.high_freq_factor as f64,
                r.original_context as f64,
            );
            let wavelen = 2.0 * core::f64::consts::PI / inv;
            if wavelen < ctx / hi {
                inv
            } else if wavelen > ctx / lo {
                inv / factor
            } else {
                let smooth = (ctx / wavelen - lo) / (hi - lo);
                (1.0 - smooth) * inv / factor + smooth * inv
            }
        })
        .collect()
}

pub fn rope(x: &[f32], r: &abi::Rope, positions: &[u32]) -> Vec<f64> {
    let hd = r.head_dim as usize;
    let n_rot = r.n_rot as usize;
    let freqs = rope_freqs(r);
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..r.n_heads as usize {
            let base = (t * r.n_heads as usize + h) * hd;
            for (j, &f) in freqs.iter().enumerate() {
                let (a, b) = if r.mode == abi::ROPE_INTERLEAVED {
                    (2 * j, 2 * j + 1)
                } else {
                    (j, j + n_rot / 2)
                };
                let (s, c) = (p as f64 * f).sin_cos();
                let (x0, x1) = (out[base + a], out[base + b]);
                out[base + a] = x0 * c - x1 * s;
                out[base + b] = x0 * s + x1 * c;
            }
        }
    }
    out
}

/// Causal GQA attention over f32 caches `(n_kv_heads, ctx, head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    n: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    ctx: usize,
    pos: usize,
    scale: f32,
) -> Vec<f64> {
    let mut out = vec![0.0; n * n_heads * hd];
    let group = n_heads / n_kv;
    for i in 0..n {
        for h in 0..n_heads {
            let kvh = h / group;
            let qv = &q[(i * n_heads + h) * hd..][..hd];
            let len = pos + i + 1;
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    let kv = &kc[(kvh * ctx + t) * hd..][..hd];
                    qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let p = softmax(&scores);
            for d in 0..hd {
                out[(i * n_heads + h) * hd + d] = (0..len).map(|t| p[t] * vc[(kvh * ctx + t) * hd + d] as f64).sum();
            }
        }
    }
    out
}

pub fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

pub fn silu(g: f32) -> f64 {
    let g = g as f64;
    g / (1.0 + (-g).exp())
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}
