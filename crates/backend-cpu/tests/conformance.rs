//! Every op through `Op::decode` + `CpuBackend::run`, on every instruction-set level
//! this CPU has, against `samepage_backend_cpu::reference`, with a normalised error
//! tolerance (`‖a − b‖ / ‖b‖`) per op and dtype.
use samepage_abi::{self as abi, op, pod_bytes, status, DType, Pod, SampleParams};
use samepage_backend::{Backend, Mem, Op, OpError, Region};
use samepage_backend_cpu::{reference, CpuBackend, CpuRegion, Isa};

/// A test memory: a `CpuRegion` and a bump allocator.
struct Harness {
    region: CpuRegion,
    next: usize,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            region: CpuRegion::new(64 << 20, 64 << 20, 1 << 20).unwrap(),
            next: 4096,
        }
    }
    fn mem(&self) -> Mem {
        self.region.mem()
    }
    /// `bytes` at a 64-byte aligned offset plus `skew` (2 tests unaligned weight rows).
    fn alloc(&mut self, bytes: usize, skew: usize) -> u32 {
        let off = self.next.div_ceil(64) * 64 + skew;
        self.next = off + bytes;
        assert!(self.next <= self.region.size());
        off as u32
    }
    fn put_bytes(&mut self, b: &[u8], skew: usize) -> u32 {
        let off = self.alloc(b.len(), skew);
        // SAFETY: inside the region, nothing else refers to it.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.region.base().add(off as usize), b.len()) };
        off
    }
    fn put_f32(&mut self, v: &[f32]) -> u32 {
        self.put_bytes(&v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>(), 0)
    }
    fn put_u32(&mut self, v: &[u32]) -> u32 {
        self.put_bytes(&v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>(), 0)
    }
    fn get_bytes(&self, off: u32, len: usize) -> Vec<u8> {
        // SAFETY: inside the region.
        unsafe { std::slice::from_raw_parts(self.region.base().add(off as usize), len).to_vec() }
    }
    fn get_f32(&self, off: u32, len: usize) -> Vec<f32> {
        self.get_bytes(off, 4 * len)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn get_u32(&self, off: u32, len: usize) -> Vec<u32> {
        self.get_bytes(off, 4 * len)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn run<T: Pod>(&self, b: &CpuBackend, code: u32, desc: &T) -> Result<(), OpError> {
        let op = Op::decode(code, pod_bytes(desc), self.region.size()).expect("descriptor validates");
        b.run(self.mem(), &[op])
    }
}

/// xorshift64*, for test data.
struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn backends() -> Vec<CpuBackend> {
    Isa::available()
        .into_iter()
        .map(|isa| CpuBackend::with_config(2, isa))
        .collect()
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = reference::rel_err(got, want);
    if std::env::var_os("SHOW_ERR").is_some() {
        eprintln!("{what}: {e:.3e}");
    }
    assert!(e <= tol, "{what}: normalised error {e:.3e} > {tol:.0e}");
}

/// Random weights of `dtype`, `(rows, cols)`: random bytes with small finite scales.
fn random_weights(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = dtype.row_bytes(cols).unwrap();
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    match dtype {
        DType::F32 => rng.vec(rows * cols).iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => rng.vec(rows * cols).iter().flat_map(|&v| f16(v)).collect(),
        DType::BF16 => rng
            .vec(rows * cols)
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        _ => {
            let bb = dtype.block_bytes();
            let mut w: Vec<u8> = (0..rows * rb).map(|_| rng.u64() as u8).collect();
            for blk in w.chunks_exact_mut(bb) {
                let offs: &[usize] = match dtype {
                    DType::Q4_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
                    DType::Q6_K => &[208],
                    _ => &[0],
                };
                for &o in offs {
                    let s = f16(rng.f32() * 0.02);
                    blk[o..o + 2].copy_from_slice(&s);
                }
            }
            w
        }
    }
}

/// Weights at 2 bytes past a 64-byte boundary, the worst alignment the ABI allows.
fn skew(dt: DType) -> usize {
    if dt == DType::F32 {
        0
    } else {
        2
    }
}

fn matmul_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F16 => 1e-5,
        DType::BF16 => 1e-4,
        // The activation is quantized to i16 per 32-block (~1.5e-5 of each block's
        // largest value).
        _ => 1e-4,
    }
}

#[test]
fn matmul_every_dtype_and_flag() {
    let mut rng = Rng(1);
    for b in backends() {
        for (i, &dt) in DType::WEIGHTS.iter().enumerate() {
            let k = if dt.block_elems() == 256 { 256 * 3 } else { 32 * 7 };
            for (t, &n) in [1usize, 3, 17].iter().enumerate() {
                for m in [37usize, 300] {
                    let mut h = Harness::new();
                    let flags = ((i + t + m) % 4) as u32;
                    let wb = random_weights(&mut rng, dt, m, k);
                    let x = rng.vec(n * k);
                    let bias = rng.vec(m);
                    let prev = rng.vec(n * m);
                    let w = h.put_bytes(&wb, skew(dt));
                    let xo = h.put_f32(&x);
                    let bo = h.put_f32(&bias);
                    let out = h.put_f32(&prev);
                    let d = abi::Matmul {
                        w,
                        dtype: dt as u32,
                        m: m as u32,
                        k: k as u32,
                        x: xo,
                        n: n as u32,
                        out,
                        bias: bo,
                        flags,
                    };
                    h.run(&b, op::MATMUL, &d).unwrap();
                    let want = reference::matmul(
                        dt,
                        &wb,
                        m,
                        k,
                        &x,
                        n,
                        (flags & abi::MATMUL_BIAS != 0).then_some(&bias[..]),
                        (flags & abi::MATMUL_ACCUMULATE != 0).then_some(&prev[..]),
                    );
                    let what = format!(
                        "matmul {} {} m={m} k={k} n={n} flags={flags}",
                        b.isa().name(),
                        dt.name()
                    );
                    check(&what, &h.get_f32(out, n * m), &want, matmul_tol(dt));
                }
            }
        }
    }
}

#[test]
fn matmul_large_is_threaded_and_tiled() {
    let mut rng = Rng(2);
    for b in backends() {
        for dt in [
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q6_K,
        ] {
            let (m, k, n) = (515, 1024, 33);
            let mut h = Harness::new();
            let wb = random_weights(&mut rng, dt, m, k);
            let x = rng.vec(n * k);
            let w = h.put_bytes(&wb, 0);
            let xo = h.put_f32(&x);
            let out = h.alloc(4 * n * m, 0);
            let d = abi::Matmul {
                w,
                dtype: dt as u32,
                m: m as u32,
                k: k as u32,
                x: xo,
                n: n as u32,
                out,
                bias: 0,
                flags: 0,
            };
            h.run(&b, op::MATMUL, &d).unwrap();
            let want = reference::matmul(dt, &wb, m, k, &x, n, None, None);
            check(
                &format!("matmul {} {} large", b.isa().name(), dt.name()),
                &h.get_f32(out, n * m),
                &want,
                matmul_tol(dt),
            );
        }
    }
}

#[test]
fn embed_every_dtype_and_bad_ids() {
    let mut rng = Rng(3);
    let b = CpuBackend::with_config(1, Isa::detect());
    for dt in DType::WEIGHTS {
        let dim = if dt.block_elems() == 256 { 512 } else { 96 };
        let vocab = 11;
        let mut h = Harness::new();
        let table = random_weights(&mut rng, dt, vocab, dim);
        let ids = [3u32, 0, 10, 3];
        let t = h.put_bytes(&table, skew(dt));
        let io = h.put_u32(&ids);
        let out = h.alloc(4 * ids.len() * dim, 0);
        let d = abi::Embed {
            table: t,
            dtype: dt as u32,
            vocab: vocab as u32,
            dim: dim as u32,
            ids: io,
            n: 4,
            out,
        };
        h.run(&b, op::EMBED, &d).unwrap();
        let want = reference::embed(dt, &table, vocab, dim, &ids);
        assert_eq!(h.get_f32(out, ids.len() * dim), want, "embed {}", dt.name());

        // An id past the vocabulary is a runtime error and writes nothing.
        let sentinel = vec![7.0f32; ids.len() * dim];
        let out2 = h.put_f32(&sentinel);
        let bad = h.put_u32(&[1, 11, 0, 0]);
        let e = h
            .run(
                &b,
                op::EMBED,
                &abi::Embed {
                    ids: bad,
                    out: out2,
                    ..d
                },
            )
            .unwrap_err();
        assert_eq!(e.status, status::RUNTIME, "{e}");
        assert_eq!(h.get_f32(out2, sentinel.len()), sentinel);
    }
}

#[test]
fn rmsnorm_in_and_out_of_place() {
    let mut rng = Rng(4);
    for b in backends() {
        let (n, dim) = (3, 67);
        let x = rng.vec(n * dim);
        let w = rng.vec(dim);
        let want = reference::rmsnorm(&x, &w, dim, 1e-5);
        let mut h = Harness::new();
        let xo = h.put_f32(&x);
        let wo = h.put_f32(&w);
        let out = h.alloc(4 * n * dim, 0);
        let d = abi::RmsNorm {
            x: xo,
            weight: wo,
            out,
            n: n as u32,
            dim: dim as u32,
            eps: 1e-5,
        };
        h.run(&b, op::RMSNORM, &d).unwrap();
        check("rmsnorm", &h.get_f32(out, n * dim), &want, 1e-6);
        h.run(&b, op::RMSNORM, &abi::RmsNorm { out: xo, ..d }).unwrap();
        check("rmsnorm in place", &h.get_f32(xo, n * dim), &want, 1e-6);
    }
}

#[test]
fn rope_both_modes_with_and_without_llama3_scaling() {
    let mut rng = Rng(5);
    let b = CpuBackend::with_config(1, Isa::detect());
    for mode in [abi::ROPE_INTERLEAVED, abi::ROPE_HALF] {
        for scaling in [0.0f32, 8.0] {
            for n_rot in [64u32, 32] {
                let (n, heads, hd) = (3usize, 4usize, 64usize);
                let x = rng.vec(n * heads * hd);
                let positions = [0u32, 17, 5000];
                let mut h = Harness::new();
                let xo = h.put_f32(&x);
                let po = h.put_u32(&positions);
                let d = abi::Rope {
                    x: xo,
                    n: n as u32,
                    n_heads: heads as u32,
                    head_dim: hd as u32,
                    n_rot,
                    mode,
                    positions: po,
                    freq_base: 500000.0,
                    scaling_factor: scaling,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_context: 8192,
                };
                h.run(&b, op::ROPE, &d).unwrap();
                let want = reference::rope(&x, &d, &positions);
                check(
                    &format!("rope mode={mode} scaling={scaling} n_rot={n_rot}"),
                    &h.get_f32(xo, x.len()),
                    &want,
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn llama3_frequencies_match_hugging_face() {
    // HF `_compute_llama3_parameters` with Llama-3.2's rope_scaling, head_dim 64:
    // the lowest frequencies are divided by the factor, the highest kept.
    let d = abi::Rope {
        n_rot: 64,
        freq_base: 500000.0,
        scaling_factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 8192,
        ..Default::default()
    };
    let f = reference::rope_freqs(&d);
    assert_eq!(f[0], 1.0);
    let plain = 500000f64.powf(-62.0 / 64.0);
    assert!((f[31] - plain / 32.0).abs() < 1e-15 * plain);
    // A medium frequency is smoothed between the two.
    let j = 16;
    let inv = 500000f64.powf(-2.0 * j as f64 / 64.0);
    let wavelen = 2.0 * std::f64::consts::PI / inv;
    assert!(wavelen > 8192.0 / 4.0 && wavelen < 8192.0);
    let smooth = (8192.0 / wavelen - 1.0) / 3.0;
    assert!((f[j] - ((1.0 - smooth) * inv / 32.0 + smooth * inv)).abs() < 1e-12 * inv);
}

fn to_f16(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

#[test]
fn kv_store_and_gqa_attention_f32_and_f16_caches() {
    let mut rng = Rng(6);
    for b in backends() {
        for cache_dt in [DType::F32, DType::F16] {
            for (n, pos) in [(1usize, 0usize), (1, 9), (5, 7), (17, 0)] {
                let (heads, kvh, hd, ctx) = (6usize, 2usize, 32usize, 40usize);
                let es = cache_dt.block_bytes();
                let mut h = Harness::new();
                // Fill the cache with history, then store n new rows at pos.
                let kc0 = rng.vec(kvh * ctx * hd);
                let vc0 = rng.vec(kvh * ctx * hd);
                let (kcb, vcb) = if cache_dt == DType::F16 {
                    (to_f16(&kc0), to_f16(&vc0))
                } else {
                    (
                        kc0.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        vc0.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    )
                };
                let kc = h.put_bytes(&kcb, 0);
                let vc = h.put_bytes(&vcb, 0);
                let k = rng.vec(n * kvh * hd);
                let v = rng.vec(n * kvh * hd);
                let q = rng.vec(n * heads * hd);
                let ko = h.put_f32(&k);
                let vo = h.put_f32(&v);
                let qo = h.put_f32(&q);
                let po = h.put_u32(&[pos as u32]);
                let out = h.alloc(4 * n * heads * hd, 0);
                let st = abi::KvStore {
                    k: ko,
                    v: vo,
                    n: n as u32,
                    n_kv_heads: kvh as u32,
                    head_dim: hd as u32,
                    k_cache: kc,
                    v_cache: vc,
                    cache_dtype: cache_dt as u32,
                    ctx: ctx as u32,
                    pos: po,
                };
                h.run(&b, op::KV_STORE, &st).unwrap();
                let at = abi::Attention {
                    q: qo,
                    n: n as u32,
                    n_heads: heads as u32,
                    n_kv_heads: kvh as u32,
                    head_dim: hd as u32,
                    k_cache: kc,
                    v_cache: vc,
                    cache_dtype: cache_dt as u32,
                    ctx: ctx as u32,
                    pos: po,
                    out,
                    scale: 1.0 / (hd as f32).sqrt(),
                };
                h.run(&b, op::ATTENTION, &at).unwrap();

                // Reference: the cache as the kernel should have left it, in f32.
                let read_cache = |off: u32| -> Vec<f32> {
                    let raw = h.get_bytes(off, kvh * ctx * hd * es);
                    if cache_dt == DType::F16 {
                        raw.chunks_exact(2)
                            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                            .collect()
                    } else {
                        raw.chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect()
                    }
                };
                let (kc_now, vc_now) = (read_cache(kc), read_cache(vc));
                let round = |x: f32| {
                    if cache_dt == DType::F16 {
                        half::f16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                };
                for (cache0, new, now) in [(&kc0, &k, &kc_now), (&vc0, &v, &vc_now)] {
                    for hh in 0..kvh {
                        for t in 0..ctx {
                            for e in 0..hd {
                                let want = if t >= pos && t < pos + n {
                                    new[((t - pos) * kvh + hh) * hd + e]
                                } else {
                                    cache0[(hh * ctx + t) * hd + e]
                                };
                                assert_eq!(
                                    now[(hh * ctx + t) * hd + e],
                                    round(want),
                                    "kv_store {} n={n} pos={pos}",
                                    cache_dt.name()
                                );
                            }
                        }
                    }
                }
                let want = reference::attention(&q, &kc_now, &vc_now, n, heads, kvh, hd, ctx, pos, at.scale);
                let what = format!("attention {} {} n={n} pos={pos}", b.isa().name(), cache_dt.name());
                check(&what, &h.get_f32(out, n * heads * hd), &want, 1e-5);

                // Past the cache: a runtime error, nothing written.
                let bad = h.put_u32(&[(ctx - n + 1) as u32]);
                let before = (h.get_bytes(kc, kcb.len()), h.get_bytes(out, 4 * n * heads * hd));
                let e = h.run(&b, op::KV_STORE, &abi::KvStore { pos: bad, ..st }).unwrap_err();
                assert_eq!(e.status, status::RUNTIME, "{e}");
                let e = h
                    .run(&b, op::ATTENTION, &abi::Attention { pos: bad, ..at })
                    .unwrap_err();
                assert_eq!(e.status, status::RUNTIME, "{e}");
                assert_eq!(
                    before,
                    (h.get_bytes(kc, kcb.len()), h.get_bytes(out, 4 * n * heads * hd))
                );
            }
        }
    }
}

#[test]
fn elementwise_in_and_out_of_place() {
    let mut rng = Rng(7);
    let b = CpuBackend::with_config(1, Isa::detect());
    let len = 1001;
    let (x, y) = (rng.vec(len), rng.vec(len));
    for in_place in [false, true] {
        let mut h = Harness::new();
        let (a, bb) = (h.put_f32(&x), h.put_f32(&y));
        let out = if in_place { a } else { h.alloc(4 * len, 0) };
        h.run(
            &b,
            op::SWIGLU,
            &abi::SwiGlu {
                gate: a,
                up: bb,
                out,
                len: len as u32,
            },
        )
        .unwrap();
        check("swiglu", &h.get_f32(out, len), &reference::swiglu(&x, &y), 1e-6);

        let a = h.put_f32(&x);
        let out = if in_place { a } else { h.alloc(4 * len, 0) };
        h.run(
            &b,
            op::ADD,
            &abi::Add {
                a,
                b: bb,
                out,
                len: len as u32,
            },
        )
        .unwrap();
        check("add", &h.get_f32(out, len), &reference::add(&x, &y), 0.0);

        let a = h.put_f32(&x);
        let out = if in_place { a } else { h.alloc(4 * len, 0) };
        h.run(
            &b,
            op::SCALE,
            &abi::Scale {
                x: a,
                out,
                len: len as u32,
                scale: 0.37,
            },
        )
        .unwrap();
        check("scale", &h.get_f32(out, len), &reference::scale(&x, 0.37), 0.0);

        let (rows, cols) = (3usize, 333usize);
        let z: Vec<f32> = x[..rows * cols].iter().map(|v| v * 20.0).collect();
        let a = h.put_f32(&z);
        let out = if in_place { a } else { h.alloc(4 * rows * cols, 0) };
        h.run(
            &b,
            op::SOFTMAX,
            &abi::Softmax {
                x: a,
                out,
                rows: rows as u32,
                cols: cols as u32,
            },
        )
        .unwrap();
        check(
            "softmax",
            &h.get_f32(out, rows * cols),
            &reference::softmax(&z, cols),
            1e-6,
        );
    }
}

#[test]
fn argmax_takes_the_first_of_ties() {
    let b = CpuBackend::with_config(1, Isa::detect());
    let mut h = Harness::new();
    let x = [1.0f32, 3.0, 3.0, -1.0, /* row 2 */ -5.0, -5.0, -7.0, -6.0];
    let xo = h.put_f32(&x);
    let out = h.alloc(8, 0);
    h.run(
        &b,
        op::ARGMAX,
        &abi::Argmax {
            x: xo,
            out,
            rows: 2,
            cols: 4,
        },
    )
    .unwrap();
    assert_eq!(h.get_u32(out, 2), vec![1, 0]);
    assert_eq!(reference::argmax(&x, 4), vec![1, 0]);
}

/// A sampler set-up in guest memory.
struct Sampler {
    h: Harness,
    d: abi::Sample,
    vocab: usize,
}

impl Sampler {
    fn new(logits: &[f32], history: &[u32], seed: u64) -> Sampler {
        let mut h = Harness::new();
        let lo = h.put_f32(logits);
        let params = h.alloc(24, 0);
        let hi = h.put_u32(history);
        let rng = h.put_bytes(&seed.to_le_bytes(), 0);
        let out = h.alloc(4, 0);
        let d = abi::Sample {
            logits: lo,
            vocab: logits.len() as u32,
            params,
            history: hi,
            history_cap: history.len() as u32,
            rng,
            out,
        };
        Sampler {
            h,
            d,
            vocab: logits.len(),
        }
    }
    fn draw(&mut self, b: &CpuBackend, p: SampleParams) -> Result<u32, OpError> {
        let m = self.h.mem();
        let bytes = pod_bytes(&p);
        // SAFETY: the params slot was allocated for 24 bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), m.base().add(self.d.params as usize), 24) };
        self.h.run(b, op::SAMPLE, &self.d)?;
        Ok(self.h.get_u32(self.d.out, 1)[0])
    }
    fn rng(&self) -> u64 {
        u64::from_le_bytes(self.h.get_bytes(self.d.rng, 8).try_into().unwrap())
    }
}

#[test]
fn sampling_greedy_seeded_and_filtered() {
    let b = CpuBackend::with_config(1, Isa::detect());
    let mut rng = Rng(8);
    let logits: Vec<f32> = rng.vec(1000).iter().map(|v| v * 5.0).collect();
    let best = reference::argmax_row(&logits);
    let mut s = Sampler::new(&logits, &[], 42);
    // Greedy equals argmax and leaves the RNG alone.
    assert_eq!(s.draw(&b, SampleParams::default()).unwrap(), best);
    assert_eq!(s.rng(), 42);
    // top_k = 1 is argmax.
    let p = SampleParams {
        temperature: 1.0,
        top_k: 1,
        ..Default::default()
    };
    assert_eq!(s.draw(&b, p).unwrap(), best);
    // The same seed gives the same tokens.
    let p = SampleParams {
        temperature: 1.5,
        top_p: 0.95,
        ..Default::default()
    };
    let seq = |seed| {
        let mut s = Sampler::new(&logits, &[], seed);
        (0..20).map(|_| s.draw(&b, p).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(seq(7), seq(7));
    assert_ne!(seq(7), seq(8));
    // The logits are not modified.
    assert_eq!(s.h.get_f32(s.d.logits, s.vocab), logits);
}

#[test]
fn sampling_distribution_and_truncation() {
    let b = CpuBackend::with_config(1, Isa::detect());
    let probs = [0.1f32, 0.2, 0.3, 0.4];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let mut s = Sampler::new(&logits, &[], 12345);
    let draws = 20000;
    let mut count = [0usize; 4];
    for _ in 0..draws {
        count[s
            .draw(
                &b,
                SampleParams {
                    temperature: 1.0,
                    ..Default::default()
                },
            )
            .unwrap() as usize] += 1;
    }
    for (c, p) in count.iter().zip(probs) {
        let f = *c as f32 / draws as f32;
        assert!((f - p).abs() < 0.015, "frequency {f} for probability {p}: {count:?}");
    }
    // top_p = 0.6 keeps {3, 2}; min_p = 0.6 keeps tokens with p >= 0.24: {3, 2}; top_k 2 too.
    for p in [
        SampleParams {
            temperature: 1.0,
            top_p: 0.6,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            min_p: 0.6,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        },
    ] {
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.draw(&b, p).unwrap() as usize] += 1;
        }
        assert_eq!((seen[0], seen[1]), (0, 0), "{p:?}: {seen:?}");
        assert!(seen[2] > 600 && seen[3] > 900, "{p:?}: {seen:?}");
    }
}

#[test]
fn sampling_repetition_penalty_and_bad_params() {
    let b = CpuBackend::with_config(1, Isa::detect());
    let logits = [2.0f32, 1.9, -1.0, -1.1];
    // The window is the last history_len entries: [.., 0, 0] penalises token 0 once.
    let mut s = Sampler::new(&logits, &[2, 0, 0], 1);
    let p = SampleParams {
        repeat_penalty: 1.1,
        history_len: 2,
        ..Default::default()
    };
    assert_eq!(s.draw(&b, p).unwrap(), 1); // 2.0 / 1.1 < 1.9
    let p = SampleParams {
        repeat_penalty: 1.01,
        history_len: 2,
        ..Default::default()
    };
    assert_eq!(s.draw(&b, p).unwrap(), 0); // 2.0 / 1.01 > 1.9
    let mut s2 = Sampler::new(&[-1.0, -1.05], &[0], 1);
    let p = SampleParams {
        repeat_penalty: 1.1,
        history_len: 1,
        ..Default::default()
    };
    assert_eq!(s2.draw(&b, p).unwrap(), 1); // -1.0 * 1.1 < -1.05

    let before = s.h.get_u32(s.d.out, 1);
    for p in [
        SampleParams {
            history_len: 4,
            ..Default::default()
        },
        SampleParams {
            temperature: f32::NAN,
            ..Default::default()
        },
        SampleParams {
            top_p: 1.5,
            ..Default::default()
        },
        SampleParams {
            repeat_penalty: 0.0,
            ..Default::default()
        },
    ] {
        let e = s.draw(&b, p).unwrap_err();
        assert_eq!(e.status, status::RUNTIME, "{p:?}: {e}");
        assert_eq!(s.h.get_u32(s.d.out, 1), before);
    }
    // A history token past the vocabulary.
    let mut s3 = Sampler::new(&logits, &[9], 1);
    let e = s3
        .draw(
            &b,
            SampleParams {
                repeat_penalty: 1.1,
                history_len: 1,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.status, status::RUNTIME);
}

#[test]
fn recorded_graph_replays() {
    let b = CpuBackend::with_config(2, Isa::detect());
    let mut h = Harness::new();
    let a = h.put_f32(&[1.0, 2.0]);
    let c = h.put_f32(&[10.0, 20.0]);
    let d = abi::Add {
        a,
        b: c,
        out: a,
        len: 2,
    };
    let op = Op::decode(op::ADD, pod_bytes(&d), h.region.size()).unwrap();
    let mut g = b.record(vec![op, op]).unwrap();
    g.launch(h.mem()).unwrap();
    g.wait().unwrap();
    assert_eq!(h.get_f32(a, 2), vec![21.0, 42.0]);
}
