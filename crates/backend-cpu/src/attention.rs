//! The KV cache store and causal grouped-query attention over it.
//! Cache layout: `(n_kv_heads, ctx, head_dim)` in f32 or f16.
use samepage_abi::{self as abi, DType};
use samepage_backend::{Mem, OpError};

use crate::pool::{Chunks, Pool};

/// Read the start position and check `pos + n <= ctx`.
fn start_pos(mem: &Mem, op: &str, pos_off: u32, n: u32, ctx: u32) -> Result<usize, OpError> {
    let pos = mem
        .read_u32(pos_off)
        .ok_or_else(|| OpError::runtime(format!("{op}: pos is out of bounds")))?;
    if pos as u64 + n as u64 > ctx as u64 {
        return Err(OpError::runtime(format!(
            "{op}: positions {pos}..{} run past the cache of {ctx} (pos + n must be <= ctx)",
            pos as u64 + n as u64
        )));
    }
    Ok(pos as usize)
}

pub(crate) fn kv_store(mem: &Mem, s: &abi::KvStore) -> Result<(), OpError> {
    let pos = start_pos(mem, "kv_store", s.pos, s.n, s.ctx)?;
    let (n, kvh, hd, ctx) = (s.n as usize, s.n_kv_heads as usize, s.head_dim as usize, s.ctx as usize);
    let f16 = s.cache_dtype == DType::F16 as u32;
    for (src_off, dst_off) in [(s.k, s.k_cache), (s.v, s.v_cache)] {
        // SAFETY: src (n, kvh, hd) f32 and the cache were validated and are disjoint.
        let src: &[f32] = unsafe { mem.slice(src_off, n * kvh * hd) };
        for i in 0..n {
            for h in 0..kvh {
                let row = &src[(i * kvh + h) * hd..(i * kvh + h + 1) * hd];
                let at = (h * ctx + pos + i) * hd;
                if f16 {
                    // SAFETY: the cache (kvh, ctx, hd) f16 was validated; pos + i < ctx.
                    let dst: &mut [u16] = unsafe { mem.slice_mut(dst_off, kvh * ctx * hd) };
                    for (d, &v) in dst[at..at + hd].iter_mut().zip(row) {
                        *d = half::f16::from_f32(v).to_bits();
                    }
                } else {
                    // SAFETY: as above, f32.
                    let dst: &mut [f32] = unsafe { mem.slice_mut(dst_off, kvh * ctx * hd) };
                    dst[at..at + hd].copy_from_slice(row);
                }
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// A cache row as f32: borrowed (f32 cache) or converted into `buf` (f16 cache).
#[inline(always)]
fn cache_row(f16: bool, base: *const u8, at: usize, hd: usize, buf: &mut [f32]) -> &[f32] {
    if f16 {
        // SAFETY: `at..at + hd` is inside the validated f16 cache.
        let src = unsafe { std::slice::from_raw_parts((base as *const u16).add(at), hd) };
        for (d, &v) in buf.iter_mut().zip(src) {
            *d = half::f16::from_bits(v).to_f32();
        }
        buf
    } else {
        // SAFETY: `at..at + hd` is inside the validated f32 cache.
        unsafe { std::slice::from_raw_parts((base as *const f32).add(at), hd) }
    }
}

pub(crate) fn attention(mem: &Mem, pool: &Pool, a: &abi::Attention) -> Result<(), OpError> {
    let pos = start_pos(mem, "attention", a.pos, a.n, a.ctx)?;
    let (n, heads, kvh, hd, ctx) = (
        a.n as usize,
        a.n_heads as usize,
        a.n_kv_heads as usize,
        a.head_dim as usize,
        a.ctx as usize,
    );
    let group = heads / kvh;
    let f16 = a.cache_dtype == DType::F16 as u32;
    // SAFETY: q (n, heads, hd) f32, the caches and out were validated; out is disjoint
    // from q and the caches.
    let q: &[f32] = unsafe { mem.slice(a.q, n * heads * hd) };
    let (kc, vc): (*const u8, *const u8) = unsafe { (mem.ptr(a.k_cache), mem.ptr(a.v_cache)) };
    let (kc, vc) = (kc as usize, vc as usize);
    // SAFETY: out was validated (see above).
    let out_addr = unsafe { mem.ptr::<f32>(a.out) } as usize;
    let items = Chunks::new(n * heads, 1);
    let work = |_t: usize| {
        let mut scores = vec![0.0f32; pos + n];
        let mut krow = vec![0.0f32; hd];
        let mut acc = vec![0.0f32; hd];
        while let Some((it, _)) = items.next() {
            let (i, h) = (it / heads, it % heads);
            let kv = h / group;
            let qv = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            let len = pos + i + 1;
            let mut max = f32::NEG_INFINITY;
            for (t, s) in scores[..len].iter_mut().enumerate() {
                let k = cache_row(f16, kc as *const u8, (kv * ctx + t) * hd, hd, &mut krow);
                *s = dot(qv, k) * a.scale;
                max = max.max(*s);
            }
            let mut sum = 0.0f32;
            for s in &mut scores[..len] {
                *s = (*s - max).exp();
                sum += *s;
            }
            acc.fill(0.0);
            for (t, &p) in scores[..len].iter().enumerate() {
                let v = cache_row(f16, vc as *const u8, (kv * ctx + t) * hd, hd, &mut krow);
                for (o, &vv) in acc.iter_mut().zip(v) {
                    *o += p * vv;
                }
            }
            let inv = 1.0 / sum;
            // SAFETY: out row (i, h) is inside the validated output; each item is
            // written by one thread.
            let o = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut f32).add((i * heads + h) * hd), hd) };
            for (o, &v) in o.iter_mut().zip(&acc) {
                *o = v * inv;
            }
        }
    };
    if n * heads * (pos + n) * hd < 1 << 15 {
        work(0);
    } else {
        pool.run(&work);
    }
    Ok(())
}
