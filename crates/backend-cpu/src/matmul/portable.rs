//! Portable dot products of one weight row with one prepared activation row. Written
//! so that LLVM vectorizes them (fixed-size inner loops, lane-parallel accumulators);
//! the same bodies are compiled once more per x86 feature level in `x86.rs`.
use super::XRow;
use crate::quant::{bf16, f16, scale_min_k4};

/// `(k,)` f32 weights.
#[inline(always)]
pub fn dot_f32(w: &[u8], x: &XRow) -> f32 {
    let mut acc = [0.0f32; 16];
    for (wc, xc) in w.chunks_exact(64).zip(x.f.chunks_exact(16)) {
        for l in 0..16 {
            let v = f32::from_le_bytes([wc[4 * l], wc[4 * l + 1], wc[4 * l + 2], wc[4 * l + 3]]);
            acc[l] += v * xc[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    let done = x.f.len() / 16 * 16;
    for i in done..x.f.len() {
        s += f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]) * x.f[i];
    }
    s
}

/// `(k,)` f16 weights.
#[inline(always)]
pub fn dot_f16(w: &[u8], x: &XRow) -> f32 {
    let mut acc = [0.0f32; 16];
    for (wc, xc) in w.chunks_exact(32).zip(x.f.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += f16(wc[2 * l], wc[2 * l + 1]) * xc[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    let done = x.f.len() / 16 * 16;
    for i in done..x.f.len() {
        s += f16(w[2 * i], w[2 * i + 1]) * x.f[i];
    }
    s
}

/// `(k,)` bf16 weights.
#[inline(always)]
pub fn dot_bf16(w: &[u8], x: &XRow) -> f32 {
    let mut acc = [0.0f32; 16];
    for (wc, xc) in w.chunks_exact(32).zip(x.f.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += bf16(wc[2 * l], wc[2 * l + 1]) * xc[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    let done = x.f.len() / 16 * 16;
    for i in done..x.f.len() {
        s += bf16(w[2 * i], w[2 * i + 1]) * x.f[i];
    }
    s
}

/// `sum_l c[l] * x[l]` over one block: codes `c` (elements in order) against the
/// block's two activation halves. i16 x i16 products summed in i32 (`vpmaddwd` when
/// vectorized); callers bound `|c| * 32767 * 32 < 2^31`.
#[inline(always)]
fn idot32(c: &[i16; 32], x: &XRow, b: usize) -> i32 {
    let (x0, x1) = (x.q.half(b, 0), x.q.half(b, 1));
    let mut s = 0i32;
    for l in 0..16 {
        s += c[l] as i32 * x0[l] as i32;
    }
    for l in 0..16 {
        s += c[16 + l] as i32 * x1[l] as i32;
    }
    s
}

#[inline(always)]
fn block<const N: usize>(w: &[u8], b: usize) -> &[u8; N] {
    w[N * b..N * b + N].try_into().unwrap()
}

/// Q8_0 weights against the i16 activation (|dot| <= 128 * 32767 * 32 < 2^31).
#[inline(always)]
pub fn dot_q8_0(w: &[u8], x: &XRow) -> f32 {
    let mut s = 0.0f32;
    for b in 0..x.q.nb {
        let blk = block::<34>(w, b);
        let mut c = [0i16; 32];
        for l in 0..32 {
            c[l] = (blk[2 + l] as i8) as i16;
        }
        s += f16(blk[0], blk[1]) * x.q.d[b] * idot32(&c, x, b) as f32;
    }
    s
}

/// Nibble codes `[lo, hi]` of 16 bytes, minus `off`.
#[inline(always)]
fn nibbles(q: &[u8], off: i16) -> [i16; 32] {
    let mut c = [0i16; 32];
    for l in 0..16 {
        c[l] = (q[l] & 0xF) as i16 - off;
        c[l + 16] = (q[l] >> 4) as i16 - off;
    }
    c
}

/// Q4_0: `d * (q - 8)`.
#[inline(always)]
pub fn dot_q4_0(w: &[u8], x: &XRow) -> f32 {
    let mut s = 0.0f32;
    for b in 0..x.q.nb {
        let blk = block::<18>(w, b);
        let c = nibbles(&blk[2..], 8);
        s += f16(blk[0], blk[1]) * x.q.d[b] * idot32(&c, x, b) as f32;
    }
    s
}

/// Q4_1: `d * q + m`; the min meets `ds = dx * sum(qx)`.
#[inline(always)]
pub fn dot_q4_1(w: &[u8], x: &XRow) -> f32 {
    let mut s = 0.0f32;
    for b in 0..x.q.nb {
        let blk = block::<20>(w, b);
        let c = nibbles(&blk[4..], 0);
        s += f16(blk[0], blk[1]) * x.q.d[b] * idot32(&c, x, b) as f32 + f16(blk[2], blk[3]) * x.q.ds[b];
    }
    s
}

/// Q5_0: `d * (q - 16)` with the fifth bits in `qh`.
#[inline(always)]
pub fn dot_q5_0(w: &[u8], x: &XRow) -> f32 {
    let mut s = 0.0f32;
    for b in 0..x.q.nb {
        let blk = block::<22>(w, b);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let mut c = [0i16; 32];
        for l in 0..16 {
            c[l] = ((blk[6 + l] & 0xF) | ((((qh >> l) & 1) as u8) << 4)) as i16 - 16;
            c[l + 16] = ((blk[6 + l] >> 4) | ((((qh >> (l + 16)) & 1) as u8) << 4)) as i16 - 16;
        }
        s += f16(blk[0], blk[1]) * x.q.d[b] * idot32(&c, x, b) as f32;
    }
    s
}

/// Q4_K: super-blocks of 256, eight sub-blocks with 6-bit scales and mins.
#[inline(always)]
pub fn dot_q4_k(w: &[u8], x: &XRow) -> f32 {
    dot_k4::<144, false>(w, x)
}

/// Q5_K: as Q4_K with fifth bits in `qh`.
#[inline(always)]
pub fn dot_q5_k(w: &[u8], x: &XRow) -> f32 {
    dot_k4::<176, true>(w, x)
}

/// Q4_K/Q5_K: per super-block `d * sum_j sc_j dx_j dot_j - dmin * sum_j m_j ds_j`
/// (|dot_j| <= 31 * 32767 * 32).
#[inline(always)]
fn dot_k4<const BB: usize, const Q5: bool>(w: &[u8], x: &XRow) -> f32 {
    let mut s = 0.0f32;
    for b in 0..x.q.nb / 8 {
        let blk = block::<BB>(w, b);
        let (d, dmin) = (f16(blk[0], blk[1]), f16(blk[2], blk[3]));
        let scales = &blk[4..16];
        let qh = &blk[16..48];
        let qs = &blk[if Q5 { 48 } else { 16 }..];
        let mut sum = 0.0f32;
        let mut mins = 0.0f32;
        for j in 0..4 {
            let q = &qs[32 * j..32 * j + 32];
            let (mut lo, mut hi) = ([0i16; 32], [0i16; 32]);
            for l in 0..32 {
                lo[l] = (q[l] & 0xF) as i16;
                hi[l] = (q[l] >> 4) as i16;
                if Q5 {
                    lo[l] |= (((qh[l] >> (2 * j)) & 1) << 4) as i16;
                    hi[l] |= (((qh[l] >> (2 * j + 1)) & 1) << 4) as i16;
                }
            }
            for (h, c) in [lo, hi].iter().enumerate() {
                let sb = 8 * b + 2 * j + h;
                let (sc, m) = scale_min_k4(2 * j + h, scales);
                sum += sc as f32 * x.q.d[sb] * idot32(c, x, sb) as f32;
                mins += m as f32 * x.q.ds[sb];
            }
        }
        s += d * sum - dmin * mins;
    }
    s
}

/// Q6_K: 6-bit values `q - 32`, a signed 8-bit scale per 16.
#[inline(always)]
pub fn dot_q6_k(w: &[u8], x: &XRow) -> f32 {
    let mut s = 0.0f32;
    for b in 0..x.q.nb / 8 {
        let blk = block::<210>(w, b);
        let d = f16(blk[208], blk[209]);
        let mut sum = 0.0f32;
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..160 + 32 * h];
            let mut c = [[0i16; 32]; 4];
            for l in 0..32 {
                c[0][l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i16 - 32;
                c[1][l] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i16 - 32;
                c[2][l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i16 - 32;
                c[3][l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i16 - 32;
            }
            for (g, c) in c.iter().enumerate() {
                let sb = 8 * b + 4 * h + g;
                for half in 0..2 {
                    let xh = x.q.half(sb, half);
                    // |i| <= 16 * 32 * 32767.
                    let mut i = 0i32;
                    for l in 0..16 {
                        i += c[16 * half + l] as i32 * xh[l] as i32;
                    }
                    let sc = blk[192 + 8 * h + 2 * g + half] as i8;
                    sum += sc as f32 * x.q.d[sb] * i as f32;
                }
            }
        }
        s += d * sum;
    }
    s
}
