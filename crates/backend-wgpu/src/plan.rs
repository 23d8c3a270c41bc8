//! From validated ops to dispatches: which kernel, its parameter words, the byte ranges
//! of the region it binds, and how many workgroups.
//!
//! A tensor is bound as the range that starts at its offset rounded down to the
//! storage-offset alignment; the remainder (`offset % align`) goes into the parameters,
//! in the kernel's units. Views start at multiples of the import alignment (itself a
//! multiple of the storage alignment), so the parameters do not depend on the view.
//! Weights larger than one binding are split by rows into several dispatches.
use samepage_abi::{self as abi, DType};
use samepage_backend::{Op, OpError};

use crate::kernels::Kernel;

/// Workgroups per dispatch are capped here; kernels grid-stride over the rest.
const MAX_GROUPS: usize = 65535;
/// `attention.wgsl` keeps a head in workgroup memory.
pub const MAX_HEAD_DIM: u32 = 512;
/// `rope.wgsl` takes at most this many frequencies.
const MAX_ROT_PAIRS: usize = 256;

/// A byte range of the region bound at `slot`.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    pub slot: u32,
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug)]
pub struct Dispatch {
    pub kernel: Kernel,
    pub params: Vec<u32>,
    pub bindings: Vec<Binding>,
    /// Binds the region's status page at slot 7.
    pub status: bool,
    pub groups: u32,
}

/// The binding limits a plan must respect.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub storage_align: usize,
    pub max_tensor: usize,
    /// Weight rows one matmul workgroup covers.
    pub matmul_rows: usize,
}

struct Builder {
    lim: Limits,
    op: &'static str,
}

fn groups(n: usize) -> u32 {
    n.clamp(1, MAX_GROUPS) as u32
}

impl Builder {
    /// The parameter offset of a tensor at `offset`, in units of `unit` bytes.
    fn off(&self, offset: u32, unit: u32) -> u32 {
        (offset % self.lim.storage_align as u32) / unit
    }

    fn bind(&self, slot: u32, offset: u32, bytes: usize) -> Result<Binding, OpError> {
        if bytes > self.lim.max_tensor {
            return Err(OpError::unsupported(format!(
                "{}: a {bytes}-byte tensor at offset {offset} exceeds the {}-byte binding limit of this GPU",
                self.op, self.lim.max_tensor
            )));
        }
        Ok(Binding {
            slot,
            start: offset as usize,
            end: offset as usize + bytes,
        })
    }

    /// Row chunks `[r0, r1)` of a `(rows, row_bytes)` weight that each fit a binding.
    /// Rows `[r0, r1)` of a weight matrix at `base`, split so each chunk fits one binding,
    /// with the chunk's binding in slot 1.
    fn row_chunks(&self, base: u32, rows: u32, row_bytes: usize) -> Result<Vec<(u32, u32, Binding)>, OpError> {
        let per = (self.lim.max_tensor / row_bytes.max(1)).min(u32::MAX as usize) as u32;
        if per == 0 {
            return Err(OpError::unsupported(format!(
                "{}: one {row_bytes}-byte weight row exceeds the binding limit of this GPU",
                self.op
            )));
        }
        Ok((0..rows)
            .step_by(per as usize)
            .map(|r0| {
                let r1 = (r0 + per).min(rows);
                let start = base as usize + r0 as usize * row_bytes;
                let end = start + (r1 - r0) as usize * row_bytes;
                (r0, r1, Binding { slot: 1, start, end })
            })
            .collect())
    }
}

fn f32s(n: u32) -> usize {
    n as usize * 4
}

/// `theta_j / 2 pi` (turns per position, with Llama-3 scaling, as the CPU reference
/// computes it in f64) as 64-bit binary fractions: `(hi, lo)` words.
pub fn rope_turns(r: &abi::Rope) -> Vec<(u32, u32)> {
    samepage_backend_cpu::reference::rope_freqs(r)
        .into_iter()
        .map(|f| {
            let turns = (f / (2.0 * std::f64::consts::PI)).fract();
            let fx = (turns * 18446744073709551616.0) as u64;
            ((fx >> 32) as u32, fx as u32)
        })
        .collect()
}

/// The dispatches for one op.
pub fn plan(op: &Op, lim: Limits) -> Result<Vec<Dispatch>, OpError> {
    let b = Builder { lim, op: op.name() };
    let d = |kernel, params, bindings, status, n| Dispatch {
        kernel,
        params,
        bindings,
        status,
        groups: groups(n),
    };
    Ok(match *op {
        Op::Matmul(m) => {
            let dt = DType::from_u32(m.dtype).expect("validated");
            let row_bytes = dt.row_bytes(m.k as usize).expect("validated");
            let x = b.bind(2, m.x, f32s(m.n) * m.k as usize)?;
            let out = b.bind(3, m.out, f32s(m.n) * m.m as usize)?;
            let has_bias = m.flags & abi::MATMUL_BIAS != 0;
            let bias = if has_bias {
                b.bind(4, m.bias, f32s(m.m))?
            } else {
                Binding { slot: 4, ..x }
            };
            let mut v = Vec::new();
            for (r0, r1, w) in b.row_chunks(m.w, m.m, row_bytes)? {
                let params = vec![
                    b.off(w.start as u32, 1),
                    row_bytes as u32,
                    b.off(m.x, 4),
                    b.off(m.out, 4),
                    if has_bias { b.off(m.bias, 4) } else { b.off(m.x, 4) },
                    m.k,
                    m.n,
                    m.m,
                    r0,
                    r1 - r0,
                    m.flags,
                    m.k.div_ceil(32),
                ];
                v.push(d(
                    Kernel::Matmul(dt),
                    params,
                    vec![w, x, out, bias],
                    false,
                    ((r1 - r0) as usize).div_ceil(lim.matmul_rows),
                ));
            }
            v
        }
        Op::Embed(e) => {
            let dt = DType::from_u32(e.dtype).expect("validated");
            let row_bytes = dt.row_bytes(e.dim as usize).expect("validated");
            let ids = b.bind(2, e.ids, f32s(e.n))?;
            let out = b.bind(3, e.out, f32s(e.n) * e.dim as usize)?;
            let mut v = Vec::new();
            for (r0, r1, t) in b.row_chunks(e.table, e.vocab, row_bytes)? {
                let params = vec![
                    b.off(t.start as u32, 1),
                    row_bytes as u32,
                    b.off(e.ids, 4),
                    b.off(e.out, 4),
                    e.dim,
                    e.n,
                    r0,
                    r1,
                    e.vocab,
                    e.dim.div_ceil(32),
                ];
                v.push(d(Kernel::Embed(dt), params, vec![t, ids, out], true, e.n as usize));
            }
            v
        }
        Op::RmsNorm(r) => {
            let bytes = f32s(r.n) * r.dim as usize;
            let params = vec![
                b.off(r.x, 4),
                b.off(r.weight, 4),
                b.off(r.out, 4),
                r.n,
                r.dim,
                r.eps.to_bits(),
            ];
            let bind = vec![
                b.bind(1, r.x, bytes)?,
                b.bind(2, r.weight, f32s(r.dim))?,
                b.bind(3, r.out, bytes)?,
            ];
            vec![d(Kernel::RmsNorm, params, bind, false, r.n as usize)]
        }
        Op::Rope(r) => {
            let turns = rope_turns(&r);
            if turns.len() > MAX_ROT_PAIRS {
                return Err(OpError::unsupported(format!(
                    "rope: n_rot {} exceeds {}",
                    r.n_rot,
                    2 * MAX_ROT_PAIRS
                )));
            }
            let mut params = vec![
                b.off(r.x, 4),
                b.off(r.positions, 4),
                r.n,
                r.n_heads,
                r.head_dim,
                r.n_rot,
                (r.mode == abi::ROPE_HALF) as u32,
                0,
            ];
            params.extend(turns.iter().flat_map(|&(hi, lo)| [hi, lo]));
            params.resize(8 + 2 * MAX_ROT_PAIRS, 0);
            let x = b.bind(1, r.x, f32s(r.n) * (r.n_heads * r.head_dim) as usize)?;
            let pos = b.bind(2, r.positions, f32s(r.n))?;
            let work = r.n as usize * r.n_heads as usize * (r.n_rot / 2) as usize;
            vec![d(Kernel::Rope, params, vec![x, pos], false, work.div_ceil(256))]
        }
        Op::KvStore(s) => {
            let cdt = DType::from_u32(s.cache_dtype).expect("validated");
            let es = cdt.block_bytes() as u32;
            let row = s.n_kv_heads as usize * s.head_dim as usize;
            let cache = s.n_kv_heads as usize * s.ctx as usize * s.head_dim as usize * es as usize;
            let params = vec![
                b.off(s.k, 4),
                b.off(s.v, 4),
                b.off(s.k_cache, es),
                b.off(s.v_cache, es),
                b.off(s.pos, 4),
                s.n,
                s.n_kv_heads,
                s.head_dim,
                s.ctx,
            ];
            let bind = vec![
                b.bind(1, s.k, f32s(s.n) * row)?,
                b.bind(2, s.v, f32s(s.n) * row)?,
                b.bind(3, s.k_cache, cache)?,
                b.bind(4, s.v_cache, cache)?,
                b.bind(5, s.pos, 4)?,
            ];
            vec![d(
                Kernel::KvStore(cdt),
                params,
                bind,
                true,
                (s.n as usize * row).div_ceil(256),
            )]
        }
        Op::Attention(a) => {
            if a.head_dim > MAX_HEAD_DIM {
                return Err(OpError::unsupported(format!(
                    "attention: head_dim {} exceeds {MAX_HEAD_DIM}",
                    a.head_dim
                )));
            }
            let cdt = DType::from_u32(a.cache_dtype).expect("validated");
            let es = cdt.block_bytes() as u32;
            let qbytes = f32s(a.n) * (a.n_heads * a.head_dim) as usize;
            let cache = a.n_kv_heads as usize * a.ctx as usize * a.head_dim as usize * es as usize;
            let params = vec![
                b.off(a.q, 4),
                b.off(a.k_cache, es),
                b.off(a.v_cache, es),
                b.off(a.out, 4),
                b.off(a.pos, 4),
                a.n,
                a.n_heads,
                a.n_kv_heads,
                a.head_dim,
                a.ctx,
                a.scale.to_bits(),
            ];
            let bind = vec![
                b.bind(1, a.q, qbytes)?,
                b.bind(2, a.k_cache, cache)?,
                b.bind(3, a.v_cache, cache)?,
                b.bind(4, a.out, qbytes)?,
                b.bind(5, a.pos, 4)?,
            ];
            vec![d(
                Kernel::Attention(cdt),
                params,
                bind,
                true,
                a.n as usize * a.n_heads as usize,
            )]
        }
        Op::SwiGlu(s) => binary(&b, Kernel::SwiGlu, s.gate, s.up, s.out, s.len)?,
        Op::Add(s) => binary(&b, Kernel::Add, s.a, s.b, s.out, s.len)?,
        Op::Scale(s) => {
            let params = vec![b.off(s.x, 4), 0, b.off(s.out, 4), s.len, s.scale.to_bits()];
            let bind = vec![b.bind(1, s.x, f32s(s.len))?, b.bind(3, s.out, f32s(s.len))?];
            vec![d(Kernel::Scale, params, bind, false, (s.len as usize).div_ceil(256))]
        }
        Op::Softmax(s) => rows(&b, Kernel::Softmax, s.x, s.out, s.rows, s.cols, s.cols)?,
        Op::Argmax(s) => rows(&b, Kernel::Argmax, s.x, s.out, s.rows, s.cols, 1)?,
        Op::Sample(_) => Vec::new(),
    })
}

fn binary(b: &Builder, kernel: Kernel, x: u32, y: u32, out: u32, len: u32) -> Result<Vec<Dispatch>, OpError> {
    let params = vec![b.off(x, 4), b.off(y, 4), b.off(out, 4), len, 0];
    let bytes = f32s(len);
    let bind = vec![b.bind(1, x, bytes)?, b.bind(2, y, bytes)?, b.bind(3, out, bytes)?];
    Ok(vec![Dispatch {
        kernel,
        params,
        bindings: bind,
        status: false,
        groups: groups((len as usize).div_ceil(256)),
    }])
}

fn rows(
    b: &Builder,
    kernel: Kernel,
    x: u32,
    out: u32,
    rows: u32,
    cols: u32,
    out_cols: u32,
) -> Result<Vec<Dispatch>, OpError> {
    let params = vec![b.off(x, 4), b.off(out, 4), rows, cols];
    let bind = vec![
        b.bind(1, x, f32s(rows) * cols as usize)?,
        b.bind(2, out, f32s(rows) * out_cols as usize)?,
    ];
    Ok(vec![Dispatch {
        kernel,
        params,
        bindings: bind,
        status: false,
        groups: groups(rows as usize),
    }])
}
