//! x86-64 kernels, chosen at run time.
//!
//! - AVX-512 (F/BW/VL + VNNI + BF16): hand-written. Quantized formats widen the weight
//!   codes to i16 (offsets `-8`, `-16`, `-32` applied exactly in i16) and take `vpdpwssd`
//!   (i16 x i16 -> i32) dot products with the i16 activation, a pair of 32-blocks per
//!   two 512-bit registers, then scale per block in f32. BF16 takes two `vdpbf16ps`
//!   per 32 weights (activation split into bf16 hi + lo).
//! - AVX2 (+FMA, F16C): the portable kernels compiled for AVX2 (LLVM vectorizes them;
//!   the i16 dot products become `vpmaddwd`).
use std::arch::x86_64::*;

use samepage_abi::DType;

use super::{portable, Dot4Fn, DotFn, XRow};
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

/// Four consecutive weight rows against one activation row, for the 32-block formats on
/// AVX-512 (the rows share the activation loads and the final reductions).
pub(super) fn dot4_fn(isa: Isa, dt: DType) -> Option<Dot4Fn> {
    match (isa, dt) {
        (Isa::Avx512, DType::Q8_0) => Some(avx512::dot4_q8_0),
        (Isa::Avx512, DType::Q4_0) => Some(avx512::dot4_q4_0),
        (Isa::Avx512, DType::Q4_1) => Some(avx512::dot4_q4_1),
        (Isa::Avx512, DType::Q5_0) => Some(avx512::dot4_q5_0),
        _ => None,
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

    /// 16 bytes at `a` then 16 at `b`.
    #[inline(always)]
    unsafe fn two16(a: *const u8, b: *const u8) -> __m256i {
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld::<__m128i, _>(a)), ld::<__m128i, _>(b))
    }

    /// The i32 dot of a block pair: codes `(c1, c2)` = `([A 0..16, B 0..16], [A 16..32,
    /// B 16..32])` against the activation pair at `xq` (the `Q16Row` layout). Lanes 0-7
    /// hold block A's partial sums, lanes 8-15 block B's, four products each.
    #[inline(always)]
    unsafe fn dot_pair(c1: __m512i, c2: __m512i, xq: *const i16) -> __m512 {
        let dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), c1, ld::<__m512i, _>(xq));
        _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(dot, c2, ld::<__m512i, _>(xq.add(32))))
    }

    /// The shared shape of the 32-block formats, a pair of blocks at a time, for `R`
    /// consecutive weight rows (`rb` bytes apart) against one activation row (whose
    /// loads the rows share): `BB` bytes per block, i16 codes from `codes2` (see
    /// [`dot_pair`]), and per block `dw * dx * dot + m * ds` (`m`, the min, with `MIN`
    /// only: Q4_1). An odd last block pairs with itself against the activation's zero
    /// padding.
    #[inline(always)]
    unsafe fn dot_blocks32<const BB: usize, const MIN: bool, const R: usize>(
        w: *const u8,
        rb: usize,
        x: &XRow,
        codes2: impl Fn(*const u8, *const u8) -> (__m512i, __m512i),
        // (scale, min) of blocks A and B as the low two lanes (the others zero).
        head: impl Fn(*const u8, *const u8) -> (__m128, __m128),
    ) -> [f32; R] {
        let nb = x.q.nb;
        let (qs, d, ds) = (x.q.qs.as_ptr(), x.q.d.as_ptr(), x.q.ds.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        let mut corr = [_mm_setzero_ps(); R];
        let mut b = 0;
        while b < nb {
            let step = if b + 1 < nb { BB } else { 0 };
            let (xq, dx) = (qs.add(32 * b), f32x2(d.add(b)));
            let dsx = if MIN { f32x2(ds.add(b)) } else { _mm_setzero_ps() };
            for r in 0..R {
                let pa = w.add(r * rb + b * BB);
                let pb = pa.add(step);
                let (c1, c2) = codes2(pa, pb);
                let dot = dot_pair(c1, c2, xq);
                let (sw, mw) = head(pa, pb);
                acc[r] = _mm512_fmadd_ps(dot, spread2(_mm_mul_ps(sw, dx)), acc[r]);
                if MIN {
                    corr[r] = _mm_fmadd_ps(mw, dsx, corr[r]);
                }
            }
            b += 2;
        }
        let mut out = [0.0f32; R];
        if R == 4 {
            // Four horizontal sums at once.
            let h = |v: __m512| {
                _mm_add_ps(
                    _mm_add_ps(_mm512_castps512_ps128(v), _mm512_extractf32x4_ps::<1>(v)),
                    _mm_add_ps(_mm512_extractf32x4_ps::<2>(v), _mm512_extractf32x4_ps::<3>(v)),
                )
            };
            let mut v = [_mm_setzero_ps(); 4];
            for r in 0..4 {
                v[r] = _mm_add_ps(h(acc[r]), corr[r]);
            }
            let s = _mm_hadd_ps(_mm_hadd_ps(v[0], v[1]), _mm_hadd_ps(v[2], v[3]));
            _mm_storeu_ps(out.as_mut_ptr(), s);
        } else {
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(acc[r]) + if MIN { hsum128(corr[r]) } else { 0.0 };
            }
        }
        out
    }

    /// One f16 scale per block, no min.
    #[inline(always)]
    unsafe fn head_d(a: *const u8, b: *const u8) -> (__m128, __m128) {
        (f16x2(f16_at(a), f16_at(b)), _mm_setzero_ps())
    }

    /// |dot| per block <= 128 * 32767 * 32 < 2^31.
    #[inline(always)]
    unsafe fn q8_0_rows<const R: usize>(w: *const u8, rb: usize, x: &XRow) -> [f32; R] {
        dot_blocks32::<34, false, R>(
            w,
            rb,
            x,
            |a, b| {
                (
                    _mm512_cvtepi8_epi16(two16(a.add(2), b.add(2))),
                    _mm512_cvtepi8_epi16(two16(a.add(18), b.add(18))),
                )
            },
            |a, b| head_d(a, b),
        )
    }

    /// 16 nibble bytes of blocks A and B as i16 codes `([A lo, B lo], [A hi, B hi])`
    /// minus `off`.
    #[inline(always)]
    unsafe fn nibbles_pair(a: *const u8, b: *const u8, off: i16) -> (__m512i, __m512i) {
        let z = _mm512_cvtepu8_epi16(two16(a, b));
        let lo = _mm512_and_si512(z, _mm512_set1_epi16(0x0F));
        let hi = _mm512_srli_epi16::<4>(z);
        if off == 0 {
            (lo, hi)
        } else {
            let o = _mm512_set1_epi16(off);
            (_mm512_sub_epi16(lo, o), _mm512_sub_epi16(hi, o))
        }
    }

    #[inline(always)]
    unsafe fn q4_0_rows<const R: usize>(w: *const u8, rb: usize, x: &XRow) -> [f32; R] {
        dot_blocks32::<18, false, R>(
            w,
            rb,
            x,
            |a, b| nibbles_pair(a.add(2), b.add(2), 8),
            |a, b| head_d(a, b),
        )
    }

    #[inline(always)]
    unsafe fn q4_1_rows<const R: usize>(w: *const u8, rb: usize, x: &XRow) -> [f32; R] {
        dot_blocks32::<20, true, R>(
            w,
            rb,
            x,
            |a, b| nibbles_pair(a.add(4), b.add(4), 0),
            |a, b| (f16x2(f16_at(a), f16_at(b)), f16x2(f16_at(a.add(2)), f16_at(b.add(2)))),
        )
    }

    #[inline(always)]
    unsafe fn q5_0_rows<const R: usize>(w: *const u8, rb: usize, x: &XRow) -> [f32; R] {
        let k16 = _mm512_set1_epi16(16);
        dot_blocks32::<22, false, R>(
            w,
            rb,
            x,
            |a, b| {
                let (qa, qb) = (ld::<u32, _>(a.add(2)), ld::<u32, _>(b.add(2)));
                // Fifth bits of [A lo, B lo] and [A hi, B hi]; codes without it lose 16.
                let (m1, m2) = ((qa & 0xFFFF) | (qb << 16), (qa >> 16) | (qb & 0xFFFF_0000));
                let (lo, hi) = nibbles_pair(a.add(6), b.add(6), 0);
                (
                    _mm512_mask_sub_epi16(lo, !m1, lo, k16),
                    _mm512_mask_sub_epi16(hi, !m2, hi, k16),
                )
            },
            |a, b| head_d(a, b),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        q8_0_rows::<1>(w, 0, x)[0]
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot4_q8_0(w: *const u8, rb: usize, x: &XRow, out: &mut [f32; 4]) {
        *out = q8_0_rows::<4>(w, rb, x);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q4_0(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        q4_0_rows::<1>(w, 0, x)[0]
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot4_q4_0(w: *const u8, rb: usize, x: &XRow, out: &mut [f32; 4]) {
        *out = q4_0_rows::<4>(w, rb, x);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        q4_1_rows::<1>(w, 0, x)[0]
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot4_q4_1(w: *const u8, rb: usize, x: &XRow, out: &mut [f32; 4]) {
        *out = q4_1_rows::<4>(w, rb, x);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q5_0(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        q5_0_rows::<1>(w, 0, x)[0]
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot4_q5_0(w: *const u8, rb: usize, x: &XRow, out: &mut [f32; 4]) {
        *out = q5_0_rows::<4>(w, rb, x);
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

    /// Lanes 0-7 = `i`, lanes 8-15 = `i + 1`: picks a pair's two scales.
    #[inline(always)]
    unsafe fn pair_idx(i: i32) -> __m512i {
        _mm512_add_epi32(
            _mm512_set1_epi32(i),
            _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        )
    }

    /// Q4_K and Q5_K: per super-block, `d * sum_j sc_j dx_j dot_j - dmin * sum_j m_j ds_j`
    /// (|dot_j| <= 31 * 32767 * 32).
    #[inline(always)]
    unsafe fn dot_k4<const BB: usize, const Q5: bool>(w: *const u8, x: &XRow) -> f32 {
        let nb = x.q.nb / 8;
        let (qs, d, ds) = (x.q.qs.as_ptr(), x.q.d.as_ptr(), x.q.ds.as_ptr());
        let low = _mm512_set1_epi16(0x0F);
        let k16 = _mm512_set1_epi16(16);
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
            let qh = if Q5 {
                _mm512_cvtepu8_epi16(ld::<__m256i, _>(blk.add(16)))
            } else {
                _mm512_setzero_si512()
            };
            let mut bacc = _mm512_setzero_ps();
            for j in 0..4 {
                // Sub-blocks 2j (low nibbles) and 2j + 1 (high), each in order.
                let z = _mm512_cvtepu8_epi16(ld::<__m256i, _>(q.add(32 * j)));
                let mut lo = _mm512_and_si512(z, low);
                let mut hi = _mm512_srli_epi16::<4>(z);
                if Q5 {
                    let m_lo = _mm512_test_epi16_mask(qh, _mm512_set1_epi16(1 << (2 * j)));
                    let m_hi = _mm512_test_epi16_mask(qh, _mm512_set1_epi16(2 << (2 * j)));
                    lo = _mm512_mask_add_epi16(lo, m_lo, lo, k16);
                    hi = _mm512_mask_add_epi16(hi, m_hi, hi, k16);
                }
                let c1 = _mm512_shuffle_i64x2::<0b01_00_01_00>(lo, hi);
                let c2 = _mm512_shuffle_i64x2::<0b11_10_11_10>(lo, hi);
                let dot = dot_pair(c1, c2, qs.add(256 * b + 64 * j));
                bacc = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(pair_idx(2 * j as i32), s8), bacc);
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

    /// Q6_K: per super-block `d * sum_i dx_(i/2) dot_i` over the eight 32-blocks, where
    /// the codes `q - 32` are multiplied by their 16-group's i8 scale in i16 first
    /// (|32 * 128| = 4096; a lane sums four products: 4 * 4096 * 32767 < 2^31).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub(super) unsafe fn dot_q6_k(w: *const u8, _rb: usize, x: &XRow) -> f32 {
        let nb = x.q.nb / 8;
        let (qs, d) = (x.q.qs.as_ptr(), x.q.d.as_ptr());
        let low = _mm512_set1_epi16(0x0F);
        let three = _mm512_set1_epi16(3);
        let k32 = _mm512_set1_epi16(32);
        // Lanes 0-15 = i, 16-31 = i + 1: the two scales of a 32-block.
        let sc_idx = |i: i16| {
            _mm512_add_epi16(
                _mm512_set1_epi16(i),
                _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(1)),
            )
        };
        let mut acc = _mm512_setzero_ps();
        for b in 0..nb {
            let blk = w.add(b * 210);
            let dw = _mm512_set1_ps(_mm_cvtss_f32(f16x2(f16_at(blk.add(208)), 0)));
            let sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(ld::<__m128i, _>(blk.add(192))));
            let mut bacc = _mm512_setzero_ps();
            for h in 0..2 {
                let za = _mm512_cvtepu8_epi16(ld::<__m256i, _>(blk.add(64 * h)));
                let zb = _mm512_cvtepu8_epi16(ld::<__m256i, _>(blk.add(64 * h + 32)));
                let hz = _mm512_cvtepu8_epi16(ld::<__m256i, _>(blk.add(128 + 32 * h)));
                // The four 32-blocks of this half, each in order.
                let g = [
                    _mm512_or_si512(
                        _mm512_and_si512(za, low),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(hz, three)),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(zb, low),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<2>(hz), three)),
                    ),
                    _mm512_or_si512(
                        _mm512_srli_epi16::<4>(za),
                        _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(hz), three)),
                    ),
                    _mm512_or_si512(
                        _mm512_srli_epi16::<4>(zb),
                        _mm512_slli_epi16::<4>(_mm512_srli_epi16::<6>(hz)),
                    ),
                ];
                for p in 0..2 {
                    let scaled = |i: usize| {
                        let s = _mm512_permutexvar_epi16(sc_idx((8 * h + 2 * i) as i16), sc);
                        _mm512_mullo_epi16(_mm512_sub_epi16(g[i], k32), s)
                    };
                    let (ga, gb) = (scaled(2 * p), scaled(2 * p + 1));
                    let c1 = _mm512_shuffle_i64x2::<0b01_00_01_00>(ga, gb);
                    let c2 = _mm512_shuffle_i64x2::<0b11_10_11_10>(ga, gb);
                    let sb = 8 * b + 4 * h + 2 * p;
                    let dot = dot_pair(c1, c2, qs.add(32 * sb));
                    bacc = _mm512_fmadd_ps(dot, spread2(f32x2(d.add(sb))), bacc);
                }
            }
            acc = _mm512_fmadd_ps(dw, bacc, acc);
        }
        _mm512_reduce_add_ps(acc)
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
