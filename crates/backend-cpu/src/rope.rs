//! Rotary position embedding, in place, with optional Llama-3 frequency scaling.
use samepage_abi as abi;
use samepage_backend::{Mem, OpError};

pub use samepage_backend::rope::rope_freqs;

pub(crate) fn rope(mem: &Mem, r: &abi::Rope) -> Result<(), OpError> {
    let (n, heads, hd, n_rot) = (r.n as usize, r.n_heads as usize, r.head_dim as usize, r.n_rot as usize);
    let half = n_rot / 2;
    // SAFETY: positions (n,) u32 and x (n, heads, hd) f32 were validated; positions
    // are read before x is written (they may not overlap x, but we copy them anyway).
    let positions: Vec<u32> = unsafe { mem.slice::<u32>(r.positions, n) }.to_vec();
    let x: &mut [f32] = unsafe { mem.slice_mut(r.x, n * heads * hd) };
    let freqs = rope_freqs(r);
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (i, &p) in positions.iter().enumerate() {
        for (c, &f) in cs.iter_mut().zip(&freqs) {
            let (s, co) = (p as f64 * f).sin_cos();
            *c = (co as f32, s as f32);
        }
        for h in 0..heads {
            let v = &mut x[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            for (j, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = if r.mode == abi::ROPE_INTERLEAVED {
                    (2 * j, 2 * j + 1)
                } else {
                    (j, j + half)
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
    Ok(())
}
