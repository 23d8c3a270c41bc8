//! ggml block formats: dequantization (bit-exact with ggml and `gguf.quants`) and the
//! 16-bit activation format the quantized matmuls take their integer dot products with.
//!
//! Weight bytes are only 2-byte aligned (blocks of 18, 34, 210 bytes...), so every read
//! of a scale goes through `u16::from_le_bytes`.
use samepage_abi::DType;

#[inline(always)]
pub fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

#[inline(always)]
pub fn bf16(lo: u8, hi: u8) -> f32 {
    f32::from_bits((u16::from_le_bytes([lo, hi]) as u32) << 16)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (`get_scale_min_k4`).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantize one block of `dtype` (`dtype.block_bytes()` bytes) into
/// `dtype.block_elems()` floats.
pub fn dequant_block(dtype: DType, b: &[u8], y: &mut [f32]) {
    match dtype {
        DType::F32 | DType::U32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => y[0] = f16(b[0], b[1]),
        DType::BF16 => y[0] = bf16(b[0], b[1]),
        DType::Q8_0 => {
            let d = f16(b[0], b[1]);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        DType::Q4_0 => {
            let d = f16(b[0], b[1]);
            for j in 0..16 {
                let q = b[2 + j];
                y[j] = d * ((q & 0xF) as i32 - 8) as f32;
                y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }
        DType::Q4_1 => {
            let (d, m) = (f16(b[0], b[1]), f16(b[2], b[3]));
            for j in 0..16 {
                let q = b[4 + j];
                y[j] = d * (q & 0xF) as f32 + m;
                y[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
        DType::Q5_0 => {
            let d = f16(b[0], b[1]);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let q = b[6 + j];
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = d * (((q & 0xF) as u32 | h0) as i32 - 16) as f32;
                y[j + 16] = d * (((q >> 4) as u32 | h1) as i32 - 16) as f32;
            }
        }
        DType::Q4_K => {
            let (d, dmin) = (f16(b[0], b[1]), f16(b[2], b[3]));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for j in 0..4 {
                let (s1, m1) = scale_min_k4(2 * j, scales);
                let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    y[64 * j + l] = d1 * (q[l] & 0xF) as f32 - m1;
                    y[64 * j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        DType::Q5_K => {
            let (d, dmin) = (f16(b[0], b[1]), f16(b[2], b[3]));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for j in 0..4 {
                let (s1, m1) = scale_min_k4(2 * j, scales);
                let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    let h1 = ((qh[l] >> (2 * j)) & 1) << 4;
                    let h2 = ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    y[64 * j + l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
                    y[64 * j + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
                }
            }
        }
        DType::Q6_K => {
            let d = f16(b[208], b[209]);
            for h in 0..2 {
                let ql = &b[64 * h..64 * h + 64];
                let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                let y = &mut y[128 * h..128 * h + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantize a row of `y.len()` elements (whole blocks) from `src`.
pub fn dequant_row(dtype: DType, src: &[u8], y: &mut [f32]) {
    let (be, bb) = (dtype.block_elems(), dtype.block_bytes());
    debug_assert_eq!(y.len() % be, 0);
    match dtype {
        DType::F32 => {
            for (v, c) in y.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (v, c) in y.iter_mut().zip(src.chunks_exact(2)) {
                *v = f16(c[0], c[1]);
            }
        }
        DType::BF16 => {
            for (v, c) in y.iter_mut().zip(src.chunks_exact(2)) {
                *v = bf16(c[0], c[1]);
            }
        }
        _ => {
            for (yb, b) in y.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                dequant_block(dtype, b, yb);
            }
        }
    }
}

/// An activation row quantized to signed 16 bits in blocks of 32 (`d = amax / 32767`),
/// with `d * sum(q)` per block for the formats with a min (Q4_1, Q4_K, Q5_K). Used for
/// every quantized weight type; k-quants combine eight of these blocks per super-block.
///
/// 16-bit activations keep the rounding error at ~1.5e-5 of each block's largest value
/// (8-bit: ~4e-3, which end to end costs a few percent of the logits); the kernels take
/// i16 x i16 -> i32 dot products (`vpdpwssd`, `vpmaddwd`).
///
/// Layout: the blocks go in pairs `(2p, 2p + 1)`, stored as
/// `[A 0..16, B 0..16, A 16..32, B 16..32]` (A = block 2p, B = block 2p + 1), so one
/// 512-bit register holds the first halves of both blocks and one the second halves; a
/// nibble-packed block's low nibbles are its first half and its high nibbles the
/// second. An odd block count is padded with a zero block (`d = ds = 0`), so kernels
/// may always take whole pairs. [`Q16Row::half`] gives elements `16 h .. 16 h + 16` of
/// block `b`.
#[derive(Default, Clone)]
pub struct Q16Row {
    /// The number of (real) blocks, `k / 32`.
    pub nb: usize,
    /// `(32 * nb rounded up to pairs,)` in the pair-interleaved layout above.
    pub qs: Vec<i16>,
    /// `(nb rounded up to even,)` scale per block.
    pub d: Vec<f32>,
    /// `(nb rounded up to even,)` `d * sum(qs)` per block.
    pub ds: Vec<f32>,
}

/// The offset in [`Q16Row::qs`] of elements `16 h .. 16 h + 16` of block `b`.
#[inline(always)]
pub fn q16_offset(b: usize, h: usize) -> usize {
    64 * (b / 2) + 32 * h + 16 * (b % 2)
}

impl Q16Row {
    pub fn with_len(k: usize) -> Q16Row {
        let nb = k / 32;
        let padded = nb.div_ceil(2) * 2;
        Q16Row {
            nb,
            qs: vec![0; 32 * padded],
            d: vec![0.0; padded],
            ds: vec![0.0; padded],
        }
    }

    /// Elements `16 h .. 16 h + 16` of block `b`.
    #[inline(always)]
    pub fn half(&self, b: usize, h: usize) -> &[i16; 16] {
        let o = q16_offset(b, h);
        self.qs[o..o + 16].try_into().unwrap()
    }

    /// Quantize `x` (`k` floats, `k % 32 == 0`) into `self` (sized by `with_len(k)`).
    pub fn quantize(&mut self, x: &[f32]) {
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 32767.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for h in 0..2 {
                let o = q16_offset(b, h);
                for (qi, &v) in self.qs[o..o + 16].iter_mut().zip(&xb[16 * h..16 * h + 16]) {
                    // Round half away from zero (as `f32::round`, which is a libm call
                    // without SSE4.1) by hand, so that the loop vectorizes;
                    // |v * id| <= 32767 up to rounding, and the clamp guards the edge.
                    let t = v * id;
                    let i = t as i32;
                    let f = t - i as f32;
                    let r = i + (f >= 0.5) as i32 - (f <= -0.5) as i32;
                    *qi = r.clamp(-32767, 32767) as i16;
                    sum += *qi as i32;
                }
            }
            self.d[b] = d;
            // |sum| <= 32 * 32767 < 2^24: exact in f32.
            self.ds[b] = d * sum as f32;
        }
    }
}
