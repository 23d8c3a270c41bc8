//! Decoding and validation of op descriptors. Runs on the host, on a copy of the
//! descriptor, before any kernel sees it.
use samepage_abi::{self as abi, op, status, DType};

use crate::OpError;

/// A validated op: every range lies inside the region it was validated against, every
/// dtype is allowed, shapes are consistent and non-zero, and outputs overlap inputs
/// only where the op allows it (exactly, in place).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Embed(abi::Embed),
    RmsNorm(abi::RmsNorm),
    Matmul(abi::Matmul),
    Rope(abi::Rope),
    KvStore(abi::KvStore),
    Attention(abi::Attention),
    SwiGlu(abi::SwiGlu),
    Add(abi::Add),
    Scale(abi::Scale),
    Softmax(abi::Softmax),
    Argmax(abi::Argmax),
    Sample(abi::Sample),
}

/// A checked byte range `[start, end)`.
#[derive(Clone, Copy, Debug)]
struct Range {
    start: usize,
    end: usize,
}

impl Range {
    fn overlaps(self, o: Range) -> bool {
        self.start < o.end && o.start < self.end
    }
    fn same(self, o: Range) -> bool {
        self.start == o.start && self.end == o.end
    }
}

struct Checker {
    op: &'static str,
    mem_len: usize,
}

impl Checker {
    fn err(&self, status: i32, msg: impl std::fmt::Display) -> OpError {
        OpError::new(status, format!("{}: {msg}", self.op))
    }

    /// `a * b * ...` as usize, or an overflow error naming `what`.
    fn prod(&self, what: &str, dims: &[u32]) -> Result<usize, OpError> {
        let mut acc: usize = 1;
        for &d in dims {
            if d == 0 {
                return Err(self.err(status::BAD_SHAPE, format!("{what} has a zero dimension {dims:?}")));
            }
            acc = acc
                .checked_mul(d as usize)
                .ok_or_else(|| self.err(status::OVERFLOW, format!("{what} size {dims:?} overflows")))?;
        }
        Ok(acc)
    }

    fn bytes(&self, what: &str, elems: usize, elem_bytes: usize) -> Result<usize, OpError> {
        elems
            .checked_mul(elem_bytes)
            .ok_or_else(|| self.err(status::OVERFLOW, format!("{what}: {elems} elements overflow")))
    }

    /// Check `[offset, offset + bytes)` lies in memory and `offset` is aligned.
    fn range(&self, what: &str, offset: u32, bytes: usize, align: usize) -> Result<Range, OpError> {
        let start = offset as usize;
        let end = start.checked_add(bytes).ok_or_else(|| {
            self.err(
                status::OVERFLOW,
                format!("{what}: offset {offset} + {bytes} bytes overflows"),
            )
        })?;
        if end > self.mem_len {
            return Err(self.err(
                status::OUT_OF_BOUNDS,
                format!(
                    "{what} at offset {offset} with {bytes} bytes ends at {end}, past the {}-byte memory",
                    self.mem_len
                ),
            ));
        }
        if !start.is_multiple_of(align) {
            return Err(self.err(
                status::MISALIGNED,
                format!("{what} at offset {offset} is not {align}-byte aligned"),
            ));
        }
        Ok(Range { start, end })
    }

    /// An f32 tensor of `dims`.
    fn f32s(&self, what: &str, offset: u32, dims: &[u32]) -> Result<Range, OpError> {
        let n = self.prod(what, dims)?;
        let b = self.bytes(what, n, 4)?;
        self.range(what, offset, b, 4)
    }

    fn dtype(&self, what: &str, v: u32, allowed: &[DType]) -> Result<DType, OpError> {
        match DType::from_u32(v) {
            Some(d) if allowed.contains(&d) => Ok(d),
            Some(d) => Err(self.err(
                status::BAD_DTYPE,
                format!("{what} has dtype {} which this op does not accept", d.name()),
            )),
            None => Err(self.err(status::BAD_DTYPE, format!("{what} has unknown dtype {v}"))),
        }
    }

    /// A weight matrix `(rows, cols)` in `dtype`.
    fn weights(&self, what: &str, offset: u32, dtype: DType, rows: u32, cols: u32) -> Result<Range, OpError> {
        self.prod(what, &[rows, cols])?;
        let row = dtype.row_bytes(cols as usize).ok_or_else(|| {
            self.err(
                status::BAD_SHAPE,
                format!(
                    "{what}: {cols} columns is not a multiple of the {} block size {}",
                    dtype.name(),
                    dtype.block_elems()
                ),
            )
        })?;
        let b = self.bytes(what, rows as usize, row)?;
        self.range(what, offset, b, dtype.align())
    }

    /// `out` must not overlap any of `inputs`, unless `in_place` allows it to equal one.
    fn disjoint(&self, out_name: &str, out: Range, inputs: &[(&str, Range)], in_place: bool) -> Result<(), OpError> {
        for (name, r) in inputs {
            if out.overlaps(*r) && !(in_place && out.same(*r)) {
                return Err(self.err(
                    status::BAD_ARGUMENT,
                    format!(
                        "{out_name} [{}, {}) overlaps {name} [{}, {})",
                        out.start, out.end, r.start, r.end
                    ),
                ));
            }
        }
        Ok(())
    }

    fn finite(&self, what: &str, v: f32) -> Result<(), OpError> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(self.err(status::BAD_ARGUMENT, format!("{what} is {v}, not a finite number")))
        }
    }
}

const CACHE_TYPES: [DType; 2] = [DType::F32, DType::F16];

impl Op {
    /// The op code.
    pub fn code(&self) -> u32 {
        match self {
            Op::Embed(_) => op::EMBED,
            Op::RmsNorm(_) => op::RMSNORM,
            Op::Matmul(_) => op::MATMUL,
            Op::Rope(_) => op::ROPE,
            Op::KvStore(_) => op::KV_STORE,
            Op::Attention(_) => op::ATTENTION,
            Op::SwiGlu(_) => op::SWIGLU,
            Op::Add(_) => op::ADD,
            Op::Scale(_) => op::SCALE,
            Op::Softmax(_) => op::SOFTMAX,
            Op::Argmax(_) => op::ARGMAX,
            Op::Sample(_) => op::SAMPLE,
        }
    }

    pub fn name(&self) -> &'static str {
        op::name(self.code())
    }

    /// Decode a descriptor (already copied out of guest memory) and validate it against
    /// a memory of `mem_len` bytes.
    pub fn decode(code: u32, desc: &[u8], mem_len: usize) -> Result<Op, OpError> {
        let want =
            abi::descriptor_len(code).ok_or_else(|| OpError::new(status::BAD_OP, format!("unknown op code {code}")))?;
        if desc.len() != want {
            return Err(OpError::new(
                status::BAD_DESCRIPTOR,
                format!(
                    "{}: descriptor is {} bytes, expected {want}",
                    op::name(code),
                    desc.len()
                ),
            ));
        }
        let op = match code {
            op::EMBED => Op::Embed(abi::read_pod(desc).unwrap()),
            op::RMSNORM => Op::RmsNorm(abi::read_pod(desc).unwrap()),
            op::MATMUL => Op::Matmul(abi::read_pod(desc).unwrap()),
            op::ROPE => Op::Rope(abi::read_pod(desc).unwrap()),
            op::KV_STORE => Op::KvStore(abi::read_pod(desc).unwrap()),
            op::ATTENTION => Op::Attention(abi::read_pod(desc).unwrap()),
            op::SWIGLU => Op::SwiGlu(abi::read_pod(desc).unwrap()),
            op::ADD => Op::Add(abi::read_pod(desc).unwrap()),
            op::SCALE => Op::Scale(abi::read_pod(desc).unwrap()),
            op::SOFTMAX => Op::Softmax(abi::read_pod(desc).unwrap()),
            op::ARGMAX => Op::Argmax(abi::read_pod(desc).unwrap()),
            op::SAMPLE => Op::Sample(abi::read_pod(desc).unwrap()),
            _ => unreachable!("descriptor_len knows the code"),
        };
        op.validate(mem_len)?;
        Ok(op)
    }

    /// Validate against a memory of `mem_len` bytes.
    pub fn validate(&self, mem_len: usize) -> Result<(), OpError> {
        let c = Checker {
            op: self.name(),
            mem_len,
        };
        match *self {
            Op::Embed(e) => {
                let dt = c.dtype("table", e.dtype, &DType::WEIGHTS)?;
                let table = c.weights("table", e.table, dt, e.vocab, e.dim)?;
                let ids = c.range("ids", e.ids, c.bytes("ids", c.prod("ids", &[e.n])?, 4)?, 4)?;
                let out = c.f32s("out", e.out, &[e.n, e.dim])?;
                c.disjoint("out", out, &[("table", table), ("ids", ids)], false)
            }
            Op::RmsNorm(r) => {
                let x = c.f32s("x", r.x, &[r.n, r.dim])?;
                let w = c.f32s("weight", r.weight, &[r.dim])?;
                let out = c.f32s("out", r.out, &[r.n, r.dim])?;
                c.finite("eps", r.eps)?;
                if r.eps < 0.0 {
                    return Err(c.err(status::BAD_ARGUMENT, format!("eps {} is negative", r.eps)));
                }
                c.disjoint("out", out, &[("x", x)], true)?;
                c.disjoint("out", out, &[("weight", w)], false)
            }
            Op::Matmul(m) => {
                let dt = c.dtype("w", m.dtype, &DType::WEIGHTS)?;
                let w = c.weights("w", m.w, dt, m.m, m.k)?;
                let x = c.f32s("x", m.x, &[m.n, m.k])?;
                let out = c.f32s("out", m.out, &[m.n, m.m])?;
                if m.flags & !(abi::MATMUL_BIAS | abi::MATMUL_ACCUMULATE) != 0 {
                    return Err(c.err(status::BAD_ARGUMENT, format!("unknown flags {:#x}", m.flags)));
                }
                let mut inputs = vec![("w", w), ("x", x)];
                if m.flags & abi::MATMUL_BIAS != 0 {
                    inputs.push(("bias", c.f32s("bias", m.bias, &[m.m])?));
                }
                c.disjoint("out", out, &inputs, false)
            }
            Op::Rope(r) => {
                c.f32s("x", r.x, &[r.n, r.n_heads, r.head_dim])?;
                c.range(
                    "positions",
                    r.positions,
                    c.bytes("positions", c.prod("positions", &[r.n])?, 4)?,
                    4,
                )?;
                if r.n_rot == 0 || r.n_rot % 2 != 0 || r.n_rot > r.head_dim {
                    return Err(c.err(
                        status::BAD_SHAPE,
                        format!(
                            "n_rot {} must be even, non-zero and at most head_dim {}",
                            r.n_rot, r.head_dim
                        ),
                    ));
                }
                if r.mode != abi::ROPE_INTERLEAVED && r.mode != abi::ROPE_HALF {
                    return Err(c.err(status::BAD_ARGUMENT, format!("unknown rope mode {}", r.mode)));
                }
                c.finite("freq_base", r.freq_base)?;
                if r.freq_base <= 0.0 {
                    return Err(c.err(status::BAD_ARGUMENT, "freq_base must be positive"));
                }
                c.finite("scaling_factor", r.scaling_factor)?;
                if r.scaling_factor > 0.0 {
                    c.finite("low_freq_factor", r.low_freq_factor)?;
                    c.finite("high_freq_factor", r.high_freq_factor)?;
                    if r.low_freq_factor <= 0.0 || r.high_freq_factor <= r.low_freq_factor || r.original_context == 0 {
                        return Err(c.err(
                            status::BAD_ARGUMENT,
                            "Llama-3 scaling needs 0 < low_freq_factor < high_freq_factor and original_context > 0",
                        ));
                    }
                }
                Ok(())
            }
            Op::KvStore(s) => {
                let cdt = c.dtype("cache", s.cache_dtype, &CACHE_TYPES)?;
                let k = c.f32s("k", s.k, &[s.n, s.n_kv_heads, s.head_dim])?;
                let v = c.f32s("v", s.v, &[s.n, s.n_kv_heads, s.head_dim])?;
                let (kc, vc) = caches(&c, s.k_cache, s.v_cache, cdt, s.n_kv_heads, s.ctx, s.head_dim)?;
                let pos = c.range("pos", s.pos, 4, 4)?;
                if s.n > s.ctx {
                    return Err(c.err(
                        status::BAD_SHAPE,
                        format!("{} tokens exceed the cache of {}", s.n, s.ctx),
                    ));
                }
                let ins = [("k", k), ("v", v), ("pos", pos)];
                c.disjoint("k_cache", kc, &ins, false)?;
                c.disjoint("v_cache", vc, &ins, false)?;
                c.disjoint("k_cache", kc, &[("v_cache", vc)], false)
            }
            Op::Attention(a) => {
                let cdt = c.dtype("cache", a.cache_dtype, &CACHE_TYPES)?;
                let q = c.f32s("q", a.q, &[a.n, a.n_heads, a.head_dim])?;
                if a.n_kv_heads == 0 || a.n_heads % a.n_kv_heads != 0 {
                    return Err(c.err(
                        status::BAD_SHAPE,
                        format!("n_heads {} is not a multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads),
                    ));
                }
                let (kc, vc) = caches(&c, a.k_cache, a.v_cache, cdt, a.n_kv_heads, a.ctx, a.head_dim)?;
                let pos = c.range("pos", a.pos, 4, 4)?;
                let out = c.f32s("out", a.out, &[a.n, a.n_heads, a.head_dim])?;
                c.finite("scale", a.scale)?;
                if a.n > a.ctx {
                    return Err(c.err(
                        status::BAD_SHAPE,
                        format!("{} tokens exceed the cache of {}", a.n, a.ctx),
                    ));
                }
                c.disjoint(
                    "out",
                    out,
                    &[("q", q), ("k_cache", kc), ("v_cache", vc), ("pos", pos)],
                    false,
                )
            }
            Op::SwiGlu(s) => {
                let g = c.f32s("gate", s.gate, &[s.len])?;
                let u = c.f32s("up", s.up, &[s.len])?;
                let out = c.f32s("out", s.out, &[s.len])?;
                c.disjoint("out", out, &[("gate", g), ("up", u)], true)
            }
            Op::Add(s) => {
                let a = c.f32s("a", s.a, &[s.len])?;
                let b = c.f32s("b", s.b, &[s.len])?;
                let out = c.f32s("out", s.out, &[s.len])?;
                c.disjoint("out", out, &[("a", a), ("b", b)], true)
            }
            Op::Scale(s) => {
                let x = c.f32s("x", s.x, &[s.len])?;
                let out = c.f32s("out", s.out, &[s.len])?;
                c.finite("scale", s.scale)?;
                c.disjoint("out", out, &[("x", x)], true)
            }
            Op::Softmax(s) => {
                let x = c.f32s("x", s.x, &[s.rows, s.cols])?;
                let out = c.f32s("out", s.out, &[s.rows, s.cols])?;
                c.disjoint("out", out, &[("x", x)], true)
            }
            Op::Argmax(s) => {
                let x = c.f32s("x", s.x, &[s.rows, s.cols])?;
                let out = c.range("out", s.out, c.bytes("out", c.prod("out", &[s.rows])?, 4)?, 4)?;
                c.disjoint("out", out, &[("x", x)], false)
            }
            Op::Sample(s) => {
                let logits = c.f32s("logits", s.logits, &[s.vocab])?;
                let params = c.range("params", s.params, std::mem::size_of::<abi::SampleParams>(), 4)?;
                let history = c.range("history", s.history, c.bytes("history", s.history_cap as usize, 4)?, 4)?;
                let rng = c.range("rng", s.rng, 8, 8)?;
                let out = c.range("out", s.out, 4, 4)?;
                let ins = [("logits", logits), ("params", params), ("history", history)];
                c.disjoint("rng", rng, &ins, false)?;
                c.disjoint("out", out, &ins, false)?;
                c.disjoint("out", out, &[("rng", rng)], false)
            }
        }
    }
}

fn caches(
    c: &Checker,
    k_cache: u32,
    v_cache: u32,
    dt: DType,
    n_kv_heads: u32,
    ctx: u32,
    head_dim: u32,
) -> Result<(Range, Range), OpError> {
    let n = c.prod("cache", &[n_kv_heads, ctx, head_dim])?;
    let b = c.bytes("cache", n, dt.block_bytes())?;
    let kc = c.range("k_cache", k_cache, b, dt.align())?;
    let vc = c.range("v_cache", v_cache, b, dt.align())?;
    Ok((kc, vc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use samepage_abi::pod_bytes;

    const MEM: usize = 1 << 20;

    fn matmul() -> abi::Matmul {
        abi::Matmul {
            w: 0,
            dtype: DType::F32 as u32,
            m: 4,
            k: 8,
            x: 4096,
            n: 2,
            out: 8192,
            bias: 0,
            flags: 0,
        }
    }

    fn status_of(code: u32, bytes: &[u8]) -> i32 {
        Op::decode(code, bytes, MEM).err().map(|e| e.status).unwrap_or(0)
    }

    #[test]
    fn accepts_a_good_matmul() {
        assert_eq!(status_of(op::MATMUL, pod_bytes(&matmul())), 0);
    }

    #[test]
    fn rejects_each_class_of_bad_input() {
        let m = abi::Matmul {
            out: MEM as u32 - 4,
            ..matmul()
        };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::OUT_OF_BOUNDS);
        let m = abi::Matmul {
            x: u32::MAX - 3,
            ..matmul()
        };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::OUT_OF_BOUNDS);
        let m = abi::Matmul {
            m: u32::MAX,
            k: u32::MAX,
            ..matmul()
        };
        let s = Op::decode(op::MATMUL, pod_bytes(&m), usize::MAX).unwrap_err().status;
        assert!(s == status::OVERFLOW || s == status::OUT_OF_BOUNDS, "{s}");
        let m = abi::Matmul { n: 0, ..matmul() };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::BAD_SHAPE);
        let m = abi::Matmul { dtype: 99, ..matmul() };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::BAD_DTYPE);
        let m = abi::Matmul {
            dtype: DType::U32 as u32,
            ..matmul()
        };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::BAD_DTYPE);
        let m = abi::Matmul {
            dtype: DType::Q4_0 as u32,
            k: 40,
            ..matmul()
        };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::BAD_SHAPE);
        let m = abi::Matmul { x: 4098, ..matmul() };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::MISALIGNED);
        let m = abi::Matmul { out: 4096, ..matmul() };
        assert_eq!(status_of(op::MATMUL, pod_bytes(&m)), status::BAD_ARGUMENT);
        assert_eq!(
            status_of(op::MATMUL, &pod_bytes(&matmul())[..8]),
            status::BAD_DESCRIPTOR
        );
        assert_eq!(status_of(77, &[]), status::BAD_OP);
    }

    #[test]
    fn attention_needs_whole_kv_groups() {
        let a = abi::Attention {
            q: 0,
            n: 1,
            n_heads: 6,
            n_kv_heads: 4,
            head_dim: 8,
            k_cache: 4096,
            v_cache: 8192,
            cache_dtype: DType::F32 as u32,
            ctx: 16,
            pos: 12288,
            out: 16384,
            scale: 0.35,
        };
        assert_eq!(status_of(op::ATTENTION, pod_bytes(&a)), status::BAD_SHAPE);
        let a = abi::Attention { n_kv_heads: 3, ..a };
        assert_eq!(status_of(op::ATTENTION, pod_bytes(&a)), 0);
    }

    #[test]
    fn in_place_only_when_exact() {
        let a = abi::Add {
            a: 0,
            b: 64,
            out: 0,
            len: 16,
        };
        assert_eq!(status_of(op::ADD, pod_bytes(&a)), 0);
        let a = abi::Add {
            a: 0,
            b: 64,
            out: 4,
            len: 16,
        };
        assert_eq!(status_of(op::ADD, pod_bytes(&a)), status::BAD_ARGUMENT);
    }
}
