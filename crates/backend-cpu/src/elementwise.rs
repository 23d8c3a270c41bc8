//! Elementwise and row-wise ops on f32: SwiGLU, add, scale, softmax, argmax.
//!
//! In-place ops (`out == input`, exactly, as validation allows) go through raw
//! pointers, so a shared and a mutable slice of the same bytes never coexist.
use samepage_abi as abi;
use samepage_backend::{Mem, OpError};

/// `out[i] = f(a[i], b[i])` where `out` may equal `a` or `b` exactly.
///
/// # Safety
/// `a`, `b` and `out` must be valid for `len` f32 each, and `out` must equal or be
/// disjoint from each input.
#[inline(always)]
unsafe fn zip_map(a: *const f32, b: *const f32, out: *mut f32, len: usize, f: impl Fn(f32, f32) -> f32) {
    for i in 0..len {
        *out.add(i) = f(*a.add(i), *b.add(i));
    }
}

pub(crate) fn swiglu(mem: &Mem, s: &abi::SwiGlu) -> Result<(), OpError> {
    // SAFETY: three validated (len,) f32 ranges; out equals or avoids each input.
    unsafe {
        zip_map(
            mem.ptr(s.gate),
            mem.ptr(s.up),
            mem.ptr(s.out),
            s.len as usize,
            |g, u| g / (1.0 + (-g).exp()) * u,
        )
    };
    Ok(())
}

pub(crate) fn add(mem: &Mem, s: &abi::Add) -> Result<(), OpError> {
    // SAFETY: as in swiglu.
    unsafe { zip_map(mem.ptr(s.a), mem.ptr(s.b), mem.ptr(s.out), s.len as usize, |a, b| a + b) };
    Ok(())
}

pub(crate) fn scale(mem: &Mem, s: &abi::Scale) -> Result<(), OpError> {
    // SAFETY: x was validated as (len,) f32.
    let x: *const f32 = unsafe { mem.ptr(s.x) };
    // SAFETY: as in swiglu (x passed twice).
    unsafe { zip_map(x, x, mem.ptr(s.out), s.len as usize, |v, _| v * s.scale) };
    Ok(())
}

pub(crate) fn softmax(mem: &Mem, s: &abi::Softmax) -> Result<(), OpError> {
    let (rows, cols) = (s.rows as usize, s.cols as usize);
    // SAFETY: (rows, cols) f32 ranges validated; out equals or avoids x.
    let (x, out): (*const f32, *mut f32) = unsafe { (mem.ptr(s.x), mem.ptr(s.out)) };
    for r in 0..rows {
        // SAFETY: row r is inside both tensors.
        let (x, out) = unsafe { (x.add(r * cols), out.add(r * cols)) };
        let mut max = f32::NEG_INFINITY;
        for i in 0..cols {
            // SAFETY: i < cols.
            max = max.max(unsafe { *x.add(i) });
        }
        let mut sum = 0.0f32;
        for i in 0..cols {
            // SAFETY: i < cols; x[i] is read before out[i] is written.
            unsafe {
                let e = (*x.add(i) - max).exp();
                *out.add(i) = e;
                sum += e;
            }
        }
        let inv = 1.0 / sum;
        for i in 0..cols {
            // SAFETY: i < cols.
            unsafe { *out.add(i) *= inv };
        }
    }
    Ok(())
}

/// The first index of the largest value (NaNs are never chosen; 0 if all are NaN).
pub fn argmax_row(x: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in x.iter().enumerate() {
        if v > bv || (!found && v == bv) {
            best = i;
            bv = v;
            found = true;
        }
    }
    best as u32
}

pub(crate) fn argmax(mem: &Mem, s: &abi::Argmax) -> Result<(), OpError> {
    let (rows, cols) = (s.rows as usize, s.cols as usize);
    // SAFETY: x (rows, cols) f32 and out (rows,) u32 validated and disjoint.
    let x: &[f32] = unsafe { mem.slice(s.x, rows * cols) };
    let out: &mut [u32] = unsafe { mem.slice_mut(s.out, rows) };
    for (o, row) in out.iter_mut().zip(x.chunks_exact(cols)) {
        *o = argmax_row(row);
    }
    Ok(())
}
