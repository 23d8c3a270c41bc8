//! `out (+)= x W^T (+ bias)` for every weight dtype.
//!
//! Row-parallel dot products over the packed weight formats (batch-1 decode is a
//! memory-bound matvec). Quantized weights take integer dot products with the
//! activation quantized to i16 per 32-block once per op (llama.cpp and candle use i8,
//! which end to end costs a few percent of the logits; i16 is ~256x finer for about the
//! same memory-bound decode speed). Threads take
//! chunks of weight rows; within a chunk every token is visited while the rows are in
//! L1, so prefill reads each weight once.
use samepage_abi::{self as abi, DType};
use samepage_backend::{Mem, OpError};

use crate::pool::{Chunks, Pool};
use crate::quant::Q16Row;
use crate::Isa;

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

/// One activation row, prepared for the weight dtype's kernel.
pub struct XRow<'a> {
    /// `(k,)` f32 (float weights).
    pub f: &'a [f32],
    /// The row quantized to i16 per 32-block (quantized weights).
    pub q: &'a Q16Row,
    /// `(2k,)` bf16: the row rounded to bf16, then the rounding error in bf16
    /// (BF16 weights with AVX-512 BF16: two `vdpbf16ps` give ~16 mantissa bits).
    pub bf: &'a [u16],
}

/// A dot product of one weight row (`row_bytes` at `w`) with one activation row.
pub type DotFn = unsafe fn(w: *const u8, row_bytes: usize, x: &XRow) -> f32;

pub(crate) fn is_quantized(dt: DType) -> bool {
    !matches!(dt, DType::F32 | DType::F16 | DType::BF16)
}

/// Four consecutive weight rows (`row_bytes` apart from `w`) against one activation row.
pub type Dot4Fn = unsafe fn(w: *const u8, row_bytes: usize, x: &XRow, out: &mut [f32; 4]);

/// The four-row kernel for `dt` on `isa`, where there is one.
fn dot4_fn(isa: Isa, dt: DType) -> Option<Dot4Fn> {
    #[cfg(target_arch = "x86_64")]
    return x86::dot4_fn(isa, dt);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, dt);
        None
    }
}

/// The kernel for `dt` on `isa`.
pub(crate) fn dot_fn(isa: Isa, dt: DType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = x86::dot_fn(isa, dt) {
        return f;
    }
    let _ = isa;
    macro_rules! wrap {
        ($f:path) => {{
            // SAFETY (of callers): `w` points at `row_bytes` readable bytes.
            unsafe fn f(w: *const u8, row_bytes: usize, x: &XRow) -> f32 {
                $f(std::slice::from_raw_parts(w, row_bytes), x)
            }
            f as DotFn
        }};
    }
    match dt {
        DType::F32 => wrap!(portable::dot_f32),
        DType::F16 => wrap!(portable::dot_f16),
        DType::BF16 => wrap!(portable::dot_bf16),
        DType::Q8_0 => wrap!(portable::dot_q8_0),
        DType::Q4_0 => wrap!(portable::dot_q4_0),
        DType::Q4_1 => wrap!(portable::dot_q4_1),
        DType::Q5_0 => wrap!(portable::dot_q5_0),
        DType::Q4_K => wrap!(portable::dot_q4_k),
        DType::Q5_K => wrap!(portable::dot_q5_k),
        DType::Q6_K => wrap!(portable::dot_q6_k),
        DType::U32 => unreachable!("validation rejects u32 weights"),
    }
}

/// Whether `isa`'s BF16 kernel wants the bf16 hi/lo activation.
fn wants_bf16_split(isa: Isa, dt: DType) -> bool {
    dt == DType::BF16 && isa == Isa::Avx512
}

/// Split `x` into `hi = bf16(x)` and `lo = bf16(x - hi)` (round to nearest even).
fn bf16_split(x: &[f32], out: &mut [u16]) {
    let k = x.len();
    for i in 0..k {
        let hi = half::bf16::from_f32(x[i]);
        let lo = half::bf16::from_f32(x[i] - hi.to_f32());
        out[i] = hi.to_bits();
        out[k + i] = lo.to_bits();
    }
}

/// Rows of W per scheduling chunk, and tokens per tile within a chunk.
const ROW_CHUNK: usize = 16;
const TOKEN_TILE: usize = 8;
/// Ops reading fewer weight bytes (times tokens) than this run on the calling thread
/// alone: waking the workers costs more than they save.
const POOL_MIN_BYTES: usize = 1 << 16;

pub(crate) fn matmul(mem: &Mem, pool: &Pool, isa: Isa, d: &abi::Matmul) -> Result<(), OpError> {
    let dt = DType::from_u32(d.dtype).ok_or_else(|| OpError::unsupported("matmul: unknown dtype"))?;
    let (m, k, n) = (d.m as usize, d.k as usize, d.n as usize);
    let row_bytes = dt.row_bytes(k).expect("validated");
    // SAFETY: the ranges were validated: x (n, k) f32, out (n, m) f32 disjoint from x, w
    // and bias; bias (m,) f32 when flagged.
    let x: &[f32] = unsafe { mem.slice(d.x, n * k) };
    let bias: Option<&[f32]> = (d.flags & abi::MATMUL_BIAS != 0).then(|| unsafe { mem.slice(d.bias, m) });
    let accumulate = d.flags & abi::MATMUL_ACCUMULATE != 0;
    // SAFETY: validated, 2-byte aligned.
    let w: *const u8 = unsafe { mem.ptr::<u8>(d.w) };
    let out: *mut f32 = unsafe { mem.ptr::<f32>(d.out) };

    // Prepare the activations once per op.
    let q16: Vec<Q16Row> = if is_quantized(dt) {
        (0..n)
            .map(|j| {
                let mut r = Q16Row::with_len(k);
                r.quantize(&x[j * k..(j + 1) * k]);
                r
            })
            .collect()
    } else {
        Vec::new()
    };
    let bf: Vec<u16> = if wants_bf16_split(isa, dt) {
        let mut v = vec![0u16; 2 * k * n];
        for j in 0..n {
            bf16_split(&x[j * k..(j + 1) * k], &mut v[2 * k * j..2 * k * (j + 1)]);
        }
        v
    } else {
        Vec::new()
    };
    let empty = Q16Row::default();
    let rows: Vec<XRow> = (0..n)
        .map(|j| XRow {
            f: &x[j * k..(j + 1) * k],
            q: q16.get(j).unwrap_or(&empty),
            bf: bf.get(2 * k * j..2 * k * (j + 1)).unwrap_or(&[]),
        })
        .collect();

    let dot = dot_fn(isa, dt);
    let out_addr = out as usize;
    let w_addr = w as usize;
    let rows = &rows[..];
    let threads = if m * row_bytes * n < POOL_MIN_BYTES {
        1
    } else {
        pool.threads()
    };
    // Decode: a few big chunks per thread (a chunk costs a shared-counter round trip);
    // prefill: small chunks (each is worth n dot products).
    let chunk = if n == 1 {
        m.div_ceil(4 * threads).next_multiple_of(ROW_CHUNK)
    } else {
        ROW_CHUNK
    };
    let chunks = Chunks::new(m, chunk);
    let chunks = &chunks;
    // `move`: each thread reads its own copies of the captures.
    // Prefill only: four rows per call share each activation load across the rows, but
    // streaming four interleaved rows from DRAM measured ~2-3x slower than one row at a
    // time (the hardware prefetcher loses the streams), so decode keeps one row.
    let dot4 = dot4_fn(isa, dt).filter(|_| n > 1);
    // SAFETY (of callers): out[j, r] is inside the validated output; each (j, r) is
    // written by exactly one thread (rows are partitioned).
    let store = move |j: usize, r: usize, mut v: f32| unsafe {
        if let Some(b) = bias {
            v += b[r];
        }
        let o = (out_addr as *mut f32).add(j * m + r);
        *o = if accumulate { *o + v } else { v };
    };
    // `move`: each thread reads its own copies of the captures.
    let work = move |_t: usize| {
        while let Some((r0, r1)) = chunks.next() {
            for t0 in (0..n).step_by(TOKEN_TILE) {
                let tile = rows.iter().enumerate().take((t0 + TOKEN_TILE).min(n)).skip(t0);
                let mut r = r0;
                if let Some(dot4) = dot4 {
                    while r + 4 <= r1 {
                        let wr = (w_addr + r * row_bytes) as *const u8;
                        for (j, xr) in tile.clone() {
                            let mut v = [0.0f32; 4];
                            // SAFETY: rows r..r+4 of W are inside the validated range.
                            unsafe { dot4(wr, row_bytes, xr, &mut v) };
                            for (i, v) in v.into_iter().enumerate() {
                                store(j, r + i, v);
                            }
                        }
                        r += 4;
                    }
                }
                for r in r..r1 {
                    let wr = (w_addr + r * row_bytes) as *const u8;
                    for (j, xr) in tile.clone() {
                        // SAFETY: row r of W is inside the validated weight range.
                        store(j, r, unsafe { dot(wr, row_bytes, xr) });
                    }
                }
            }
        }
    };
    if threads == 1 {
        work(0);
    } else {
        pool.run(&work);
    }
    Ok(())
}
