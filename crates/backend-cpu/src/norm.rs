//! RMSNorm: `out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight`.
use samepage_abi as abi;
use samepage_backend::{Mem, OpError};

pub(crate) fn rmsnorm(mem: &Mem, r: &abi::RmsNorm) -> Result<(), OpError> {
    let (n, dim) = (r.n as usize, r.dim as usize);
    // SAFETY: x and out (n, dim) and weight (dim,) were validated; out is x exactly or
    // disjoint from it, and disjoint from weight. We go through raw pointers so the
    // in-place case never holds a shared and a mutable slice of the same bytes.
    let (x, out): (*const f32, *mut f32) = unsafe { (mem.ptr(r.x), mem.ptr(r.out)) };
    let w: &[f32] = unsafe { mem.slice(r.weight, dim) };
    for i in 0..n {
        // SAFETY: row i is inside both validated tensors.
        let (xr, or) = unsafe { (x.add(i * dim), out.add(i * dim)) };
        let mut acc = [0.0f32; 16];
        let mut j = 0;
        while j + 16 <= dim {
            for l in 0..16 {
                // SAFETY: j + l < dim.
                let v = unsafe { *xr.add(j + l) };
                acc[l] += v * v;
            }
            j += 16;
        }
        let mut ss: f32 = acc.iter().sum();
        for j in j..dim {
            // SAFETY: j < dim.
            let v = unsafe { *xr.add(j) };
            ss += v * v;
        }
        let scale = 1.0 / (ss / dim as f32 + r.eps).sqrt();
        for (j, &wj) in w.iter().enumerate() {
            // SAFETY: j < dim; element j is read before it is written.
            unsafe { *or.add(j) = *xr.add(j) * scale * wj };
        }
    }
    Ok(())
}
