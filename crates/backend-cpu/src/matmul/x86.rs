//! x86-64 kernels, chosen at run time.
//!
//! - AVX-512 (F/BW/VL + VNNI + BF16): hand-written. Quantized formats take `vpdpbusd`
//!   (u8 x i8) dot products of the unsigned weight codes with the Q8 activation, two
//!   32-blocks per 512-bit register, and fix the offset (`-8`, `-16`, `-32`, Q8_0's
//!   `+128` bias) with the per-block activation sums. BF16 takes two `vdpbf16ps` per 32
//!   weights (activation split into bf16 hi + lo).
//! - AVX2 (+FMA, F16C): the portable kernels compiled for AVX2 (LLVM vectorizes them).
use std::arch::x86_64::*;

use samepage_abi::DType;

use super::{portable, DotFn, XRow};
use crate::Isa;

pub(super) fn dot_fn(isa: Isa, dt: DType) -> Option<DotFn> {
    match isa {
        Isa::Avx512 => Some(match dt {
            DType::F32 => avx512::dot_f32,
            DType::F16 => avx512::dot_f16,
            DType::BF16 => avx512::dot_bf16,
            DType::Q8_0 => avx512::dot_q8_0,
            DType::Q4_0 => avx512::dot_q4_0,
            DType::Q4_1 => avx512::dot_q4_1,
            DType::Q5_0 => avx512::dot_q5_0,
            DType::Q4_K => avx512::dot_q4_k,
            DType::Q5_K => avx512::dot_q5_k,
            DType::Q6_K => avx512::dot_q6_k,
            DType::U32 => return None,
        }),
        Isa::Avx2 => Some(match dt {
            DType::F32 => avx2::dot_f32,
            DType::F16 => avx2::dot_f16,
            DType::BF16 => avx2::dot_bf16,
            DType::Q8_0 => avx2::dot_q8_0,
            DType::Q4_0 => avx2::dot_q4_0,
            DType::Q4_1 => avx2::dot_q4_1,
            DType::Q5_0 => avx2::dot_q5_0,
            DType::Q4_K => avx2::dot_q4_k,
            DType::Q5_K => avx2::dot_q5_k,
            DType::Q6_K => avx2::dot_q6_k,
            DType::U32 => return None,
        }),
        Isa::Portable => None,
    }
}

/// The portable kernels, compiled for a feature level.
macro_rules! portable_at {
    ($feat:literal: $($name:ident),*) => {$(
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn $name(w: *const u8, row_bytes: usize, x: &XRow) -> f32 {
            // SAFETY (of callers): `w` points at `row_bytes` readable bytes.
            portable::$name(unsafe { std::slice::from_raw_parts(w, row_bytes) }, x)
        }
    )*};
}

mod avx2 {
    use super::*;
    portable_at!("avx2,fma,f16c": dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0, dot_q4_1, dot_q5_0, dot_q4_k, dot_q5_k, dot_q6_k);
}

mod avx512 {
    use super::*;

    #[repr(C, packed)]
    struct Unaligned<T>(T);

    /// An unaligned load of a `T` at `p`. A packed-field read compiles to a plain
    /// unaligned load; `_mm*_loadu_*` and `read_unaligned` carry std's UB checks in
    /// builds with debug assertions (our dev profile), which cost ~2x in these loops.
    ///
    /// # Safety
    /// `p` must be valid for reading `size_of::<T>()` bytes.
    #[inline(always)]
    unsafe fn ld<T: Copy, U>(p: *const U) -> T {
        (*(p as *const Unaligned<T>)).0
    }

    /// The f16 bits at `p`.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> u16 {
        ld::<u16, _>(p)
    }

    /// Two f16 scales as the low two lanes of an f32 vector.
    #[inline(always)]
    unsafe fn f16x2(a: u16, b: u16) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((a as u32 | (b as u32) << 16) as i32))
    }

    /// Two adjacent f32 at `p` as the low two lanes.
    #[inline(always)]
    unsafe fn f32x2(p: *const f32) -> __m128 {
        _mm_castsi128_ps(_mm_cvtsi64_si128(ld::<i64, _>(p)))
    }

    /// Lanes 0-7 = s[0], lanes 8-15 = s[1].
    #[inline(always)]
    unsafe fn spread2(s: __m128) -> __m512 {
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s))
    }

    /// Two 16-byte nibble arrays (blocks A and B) as the 64 codes in activation order:
    /// `[A lo, A hi, B lo, B hi]` (16 bytes each).
    #[inline(always)]
    unsafe fn nibbles2(a: *const u8, b: *const u8) -> __m512i {
        let y = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld::<__m128i, _>(a)), ld::<__m128i, _>(b));
        let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(y), _mm256_srli_epi16::<4>(y));
        let z = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
        // [A lo, B lo, A hi, B hi] -> [A lo, A hi, B lo, B hi]
        _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z)
    }

    /// One block's 16 nibbles as 32 codes `[lo, hi]`.
    #[inline(always)]
    unsafe fn nibbles1(a: *const u8) -> __m256i {
        let x = ld::<__m128i, _>(a);
        let y = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(x), _mm_srli_epi16::<4>(x));
        _mm256_and_si256(y, _mm256_set1_epi8(0x0F))
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn hsum128(v: __m128) -> f32 {
        let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The shared shape of the 32-block formats: `BB` bytes per block, codes from
    /// `codes2`/`codes1`, and per block `dw * (dx * dot(codes, q) + OFF * ds)`, or with
    /// a min (Q4_1) `dw * dx * dot + m * ds`.
    #[inline(always)]
    unsafe fn dot_blocks32<const BB: usize>(
        w: *const u8,
        x: &XRow,
        codes2: impl Fn(*const u8, *const u8) -> __m512i,
        codes1: impl Fn(*const u8) -> __m256i,
        // (scale of the dot, coefficient of ds) per block from the block header.
        head: impl Fn(*const u8, *const u8) -> (__m128, __m128),
    ) -> f32 {
        let nb = x.q.d.len();
        let (qs, d, ds) = (x.q.qs.as_ptr(), x.q.d.as_ptr(), x.q.ds.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut corr = _mm_setzero_ps();
        let mut b = 0;
        while b + 2 <= nb {
            let (pa, pb) = (w.add(b * BB), w.add((b + 1) * BB));
            let codes = codes2(pa, pb);
            let xq = ld::<__m512i, _>(qs.add(32 * b));
            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xq);
            let (sw, cw) = head(pa, pb);
            let s = _mm_mul_ps(sw, f32x2(d.add(b)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), spread2(s), acc);
            corr = _mm_fmadd_ps(cw, f32x2(ds.add(b)), corr);
            b += 2;
        }
        let mut tail = 0.0f32;
        if b < nb {
            let pa = w.add(b * BB);
            let codes = codes1(pa);
            let xq = ld::<__m256i, _>(qs.add(32 * b));
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xq);
            let (sw, cw) = head(pa, pa);
            let isum = hsum256(_mm256_cvtepi32_ps(dot));
            tail = _mm_cvtss_f32(sw) * *d.add(b) * isum + _mm_cvtss_f32(cw) * *ds.add(b);
        }
        // Only the low two lanes of `corr` are meaningful.
        let corr = _mm_castsi128_ps(_mm_move_epi64(_mm_castps_si128(corr)));
        _mm512_reduce_add_ps(acc) + hsum128(corr) + tail
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let bias = _mm512_set1_epi8(-128);
        dot_blocks32::<34>(
            w,
            x,
            // w + 128 as u8; the 128 * sum(q) is taken back through ds.
            |a, b| {
                let y = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(ld::<__m256i, _>(a.add(2))),
                    ld::<__m256i, _>(b.add(2)),
                );
                _mm512_xor_si512(y, bias)
            },
            |a| _mm256_xor_si256(ld::<__m256i, _>(a.add(2)), _mm512_castsi512_si256(bias)),
            |a, b| {
                let dw = f16x2(f16_at(a), f16_at(b));
                (dw, _mm_mul_ps(dw, _mm_set1_ps(-128.0)))
            },
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q4_0(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        dot_blocks32::<18>(
            w,
            x,
            |a, b| nibbles2(a.add(2), b.add(2)),
            |a| nibbles1(a.add(2)),
            |a, b| {
                let dw = f16x2(f16_at(a), f16_at(b));
                (dw, _mm_mul_ps(dw, _mm_set1_ps(-8.0)))
            },
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        dot_blocks32::<20>(
            w,
            x,
            |a, b| nibbles2(a.add(4), b.add(4)),
            |a| nibbles1(a.add(4)),
            |a, b| (f16x2(f16_at(a), f16_at(b)), f16x2(f16_at(a.add(2)), f16_at(b.add(2)))),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q5_0(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let hb = _mm512_set1_epi8(0x10);
        dot_blocks32::<22>(
            w,
            x,
            |a, b| {
                let qa = ld::<u32, _>(a.add(2)) as u64;
                let qb = ld::<u32, _>(b.add(2)) as u64;
                let n = nibbles2(a.add(6), b.add(6));
                _mm512_mask_add_epi8(n, qa | qb << 32, n, hb)
            },
            |a| {
                let qa = ld::<u32, _>(a.add(2));
                let n = nibbles1(a.add(6));
                _mm256_mask_add_epi8(n, qa, n, _mm512_castsi512_si256(hb))
            },
            |a, b| {
                let dw = f16x2(f16_at(a), f16_at(b));
                (dw, _mm_mul_ps(dw, _mm_set1_ps(-16.0)))
            },
        )
    }

    /// The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K block as f32 vectors.
    #[inline(always)]
    unsafe fn scales_mins_k4(q: *const u8) -> (__m256, __m256) {
        let q = std::slice::from_raw_parts(q, 12);
        let mut sc = [0u8; 16];
        let mut mn = [0u8; 16];
        for j in 0..8 {
            let (s, m) = crate::quant::scale_min_k4(j, q);
            sc[j] = s;
            mn[j] = m;
        }
        let cvt = |v: &[u8; 16]| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ld::<__m128i, _>(v.as_ptr())));
        (cvt(&sc), cvt(&mn))
    }

    /// Q4_K and Q5_K: per super-block, `d * sum_j sc_j dx_j dot_j - dmin * sum_j m_j ds_j`.
    #[inline(always)]
    unsafe fn dot_k4<const BB: usize, const Q5: bool>(w: *const u8, x: &XRow) -> f32 {
        let nb = x.q.d.len() / 8;
        let (qs, d, ds) = (x.q.qs.as_ptr(), x.q.d.as_ptr(), x.q.ds.as_ptr());
        let low = _mm512_set1_epi8(0x0F);
        let hb = _mm512_set1_epi8(0x10);
        // Nibble shift per 256-bit half: low nibbles (sub-block 2j), high (2j+1).
        let shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
        let mut acc = _mm512_setzero_ps();
        let mut mins = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = w.add(b * BB);
            let dw = _mm_cvtss_f32(f16x2(f16_at(blk), 0));
            let dmin = _mm_cvtss_f32(f16x2(f16_at(blk.add(2)), 0));
            let (sc, mn) = scales_mins_k4(blk.add(4));
            let dx = ld::<__m256, _>(d.add(8 * b));
            let s8 = _mm512_castps256_ps512(_mm256_mul_ps(sc, dx));
            mins = _mm256_fmadd_ps(
                _mm256_set1_ps(dmin),
                _mm256_mul_ps(mn, ld::<__m256, _>(ds.add(8 * b))),
                mins,
            );
            let q = blk.add(if Q5 { 48 } else { 16 });
            let qh = _mm512_broadcast_i64x4(ld::<__m256i, _>(blk.add(16)));
            let mut bacc = _mm512_setzero_ps();
            for j in 0..4 {
                let y = _mm512_broadcast_i64x4(ld::<__m256i, _>(q.add(32 * j)));
                let mut codes = _mm512_and_si512(_mm512_srlv_epi64(y, shift), low);
                if Q5 {
                    let bits = _mm512_set_epi64(
                        0x0202_0202_0202_0202 << (2 * j),
                        0x0202_0202_0202_0202 << (2 * j),
                        0x0202_0202_0202_0202 << (2 * j),
                        0x0202_0202_0202_0202 << (2 * j),
                        0x0101_0101_0101_0101 << (2 * j),
                        0x0101_0101_0101_0101 << (2 * j),
                        0x0101_0101_0101_0101 << (2 * j),
                        0x0101_0101_0101_0101 << (2 * j),
                    );
                    codes = _mm512_mask_add_epi8(codes, _mm512_test_epi8_mask(qh, bits), codes, hb);
                }
                let xq = ld::<__m512i, _>(qs.add(256 * b + 64 * j));
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xq);
                let idx = _mm512_set_epi32(
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32 + 1,
                    2 * j as i32,
                    2 * j as i32,
                    2 * j as i32,
                    2 * j as i32,
                    2 * j as i32,
                    2 * j as i32,
                    2 * j as i32,
                    2 * j as i32,
                );
                bacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, s8), bacc);
            }
            acc = _mm512_fmadd_ps(_mm512_set1_ps(dw), bacc, acc);
        }
        _mm512_reduce_add_ps(acc) - hsum256(mins)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q4_k(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        dot_k4::<144, false>(w, x)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q5_k(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        dot_k4::<176, true>(w, x)
    }

    /// Q6_K: per super-block `d * sum_i sc_i dx_(i/2) (dot_i - 32 sum16_i)` over 16
    /// groups of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q6_k(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let nb = x.q.d.len() / 8;
        let (qs, d, s16) = (x.q.qs.as_ptr(), x.q.d.as_ptr(), x.q.sum16.as_ptr());
        let low = _mm512_set1_epi8(0x0F);
        let three0 = _mm512_set1_epi8(0x30);
        let dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        let mut acc = _mm512_setzero_ps();
        let mut corr = _mm512_setzero_ps();
        for b in 0..nb {
            let blk = w.add(b * 210);
            let dw = _mm512_set1_ps(_mm_cvtss_f32(f16x2(f16_at(blk.add(208)), 0)));
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld::<__m128i, _>(blk.add(192))));
            let dx = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(ld::<__m256, _>(d.add(8 * b))));
            let sdx = _mm512_mul_ps(sc, dx);
            let sums = _mm512_cvtepi32_ps(ld::<__m512i, _>(s16.add(16 * b)));
            corr = _mm512_fmadd_ps(dw, _mm512_mul_ps(sdx, sums), corr);
            let mut bacc = _mm512_setzero_ps();
            for h in 0..2 {
                let ql = ld::<__m512i, _>(blk.add(64 * h));
                let qh = _mm512_broadcast_i64x4(ld::<__m256i, _>(blk.add(128 + 32 * h)));
                for part in 0..2 {
                    let lo4 = if part == 0 {
                        _mm512_and_si512(ql, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low)
                    };
                    // High bits: (qh >> (4 part + 2 half)) & 3, moved to bits 4-5.
                    let sh = _mm512_set_epi64(
                        4 * part as i64 + 2,
                        4 * part as i64 + 2,
                        4 * part as i64 + 2,
                        4 * part as i64 + 2,
                        4 * part as i64,
                        4 * part as i64,
                        4 * part as i64,
                        4 * part as i64,
                    );
                    let hi2 = _mm512_and_si512(_mm512_slli_epi16::<4>(_mm512_srlv_epi64(qh, sh)), three0);
                    let codes = _mm512_or_si512(lo4, hi2);
                    let xq = ld::<__m512i, _>(qs.add(256 * b + 128 * h + 64 * part));
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xq);
                    let g = (8 * h + 4 * part) as i32;
                    let idx = _mm512_set_epi32(
                        g + 3,
                        g + 3,
                        g + 3,
                        g + 3,
                        g + 2,
                        g + 2,
                        g + 2,
                        g + 2,
                        g + 1,
                        g + 1,
                        g + 1,
                        g + 1,
                        g,
                        g,
                        g,
                        g,
                    );
                    bacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, sdx), bacc);
                }
            }
            acc = _mm512_fmadd_ps(dw, bacc, acc);
        }
        _mm512_reduce_add_ps(acc) - 32.0 * _mm512_reduce_add_ps(corr)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn dot_f32(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let (w, xs, k) = (w as *const f32, x.f.as_ptr(), x.f.len());
        let mut a = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= k {
            for (u, acc) in a.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(
                    ld::<__m512, _>(w.add(i + 16 * u)),
                    ld::<__m512, _>(xs.add(i + 16 * u)),
                    *acc,
                );
            }
            i += 64;
        }
        while i < k {
            let m: __mmask16 = if k - i >= 16 { 0xFFFF } else { (1u16 << (k - i)) - 1 };
            a[0] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, w.add(i)),
                _mm512_maskz_loadu_ps(m, xs.add(i)),
                a[0],
            );
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub(super) unsafe fn dot_f16(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let (w, xs, k) = (w as *const u16, x.f.as_ptr(), x.f.len());
        let mut a = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= k {
            for (u, acc) in a.iter_mut().enumerate() {
                let wv = _mm512_cvtph_ps(ld::<__m256i, _>(w.add(i + 16 * u)));
                *acc = _mm512_fmadd_ps(wv, ld::<__m512, _>(xs.add(i + 16 * u)), *acc);
            }
            i += 64;
        }
        while i < k {
            let m: __mmask16 = if k - i >= 16 { 0xFFFF } else { (1u16 << (k - i)) - 1 };
            let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.add(i) as *const i16));
            a[0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xs.add(i)), a[0]);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])))
    }

    /// BF16 weights with `vdpbf16ps` against the activation's bf16 hi and lo parts.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
    pub(super) unsafe fn dot_bf16(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let k = x.f.len();
        let (w, hi, lo) = (
            w as *const i16,
            x.bf.as_ptr() as *const i16,
            x.bf.as_ptr().add(k) as *const i16,
        );
        let bh = |v: __m512i| -> __m512bh { std::mem::transmute(v) };
        let mut a = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= k {
            for u in 0..2 {
                let o = i + 32 * u;
                let wv = bh(ld::<__m512i, _>(w.add(o)));
                a[2 * u] = _mm512_dpbf16_ps(a[2 * u], wv, bh(ld::<__m512i, _>(hi.add(o))));
                a[2 * u + 1] = _mm512_dpbf16_ps(a[2 * u + 1], wv, bh(ld::<__m512i, _>(lo.add(o))));
            }
            i += 64;
        }
        while i < k {
            let m: __mmask32 = if k - i >= 32 { u32::MAX } else { (1u32 << (k - i)) - 1 };
            let wv = bh(_mm512_maskz_loadu_epi16(m, w.add(i)));
            a[0] = _mm512_dpbf16_ps(a[0], wv, bh(_mm512_maskz_loadu_epi16(m, hi.add(i))));
            a[1] = _mm512_dpbf16_ps(a[1], wv, bh(_mm512_maskz_loadu_epi16(m, lo.add(i))));
            i += 32;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])))
    }
}
