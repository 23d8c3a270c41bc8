//! Each op in immediate mode against the scalar references in `refs`.
//! Check ids: 100s matmul, 200s embed, 300 rmsnorm, 400 rope, 500 kv_store,
//! 600 attention, 700 swiglu, 800 add, 900 scale, 1000 softmax, 1100 argmax, 1200 sample.
use samepage_guest::{self as sg, abi, abi::DType, Buffer};

use crate::refs::{self, Rng};
use crate::util::*;

pub fn run_all() -> Checked {
    let mut rng = Rng(0x5eed_0001);
    for (i, &dt) in DType::WEIGHTS.iter().enumerate() {
        let id = 100 + 10 * i as i32;
        let k = cols_for(dt);
        matmul_case(id, dt, 7, k, 3, 0, &mut rng)?;
        matmul_case(id + 1, dt, 130, k, 1, 0, &mut rng)?;
        matmul_case(id + 2, dt, 9, k, 2, abi::MATMUL_BIAS | abi::MATMUL_ACCUMULATE, &mut rng)?;
        embed_case(200 + 10 * i as i32, dt, k, &mut rng)?;
    }
    rmsnorm(&mut rng)?;
    rope(&mut rng)?;
    kv_store(&mut rng)?;
    attention(&mut rng)?;
    elementwise(&mut rng)?;
    softmax_argmax(&mut rng)?;
    sample(&mut rng)
}

/// Odd column counts: not a multiple of a SIMD width, but whole blocks.
fn cols_for(dt: DType) -> usize {
    match dt.block_elems() {
        1 => 300,
        32 => 288,
        _ => 512,
    }
}

/// Quantised weights take a quantised activation path on the CPU (ggml's tolerance);
/// bf16 may round the activations to bf16.
fn matmul_tol(dt: DType) -> f64 {
    match dt {
        DType::F32 | DType::F16 => 1e-9,
        DType::BF16 => 1e-4,
        _ => 5e-4,
    }
}

fn matmul_case(id: i32, dt: DType, m: usize, k: usize, n: usize, flags: u32, rng: &mut Rng) -> Checked {
    let w = refs::random_weights(dt, m, k, rng);
    let wf = refs::dequant(dt, &w, m, k);
    let x = rng.f32s(n * k, 1.0);
    let bias = rng.f32s(m, 1.0);
    let out0 = if flags & abi::MATMUL_ACCUMULATE != 0 {
        rng.f32s(n * m, 1.0)
    } else {
        vec![7.0; n * m]
    };
    let (wb, xb, bb, ob) = (byte_buf(&w), f32_buf(&x), f32_buf(&bias), f32_buf(&out0));
    let d = abi::Matmul {
        w: wb.offset(),
        dtype: dt as u32,
        m: m as u32,
        k: k as u32,
        x: xb.offset(),
        n: n as u32,
        out: ob.offset(),
        bias: bb.offset(),
        flags,
    };
    let what = format!("matmul {} ({m}x{k}) x ({n}x{k}) flags {flags}", dt.name());
    ok(id, &what, sg::matmul(&d))?;
    let mut want = refs::matmul(&wf, &x, m, k, n);
    for i in 0..n {
        for j in 0..m {
            if flags & abi::MATMUL_BIAS != 0 {
                want[i * m + j] += bias[j] as f64;
            }
            if flags & abi::MATMUL_ACCUMULATE != 0 {
                want[i * m + j] += out0[i * m + j] as f64;
            }
        }
    }
    close(id, &what, &f32s(&ob, n * m), &want, matmul_tol(dt))
}

fn embed_case(id: i32, dt: DType, dim: usize, rng: &mut Rng) -> Checked {
    let vocab = 6;
    let t = refs::random_weights(dt, vocab, dim, rng);
    let tf = refs::dequant(dt, &t, vocab, dim);
    let ids = [5u32, 0, 3, 5];
    let (tb, ib, ob) = (byte_buf(&t), u32_buf(&ids), f32_buf(&vec![7.0; ids.len() * dim]));
    let mut d = abi::Embed {
        table: tb.offset(),
        dtype: dt as u32,
        vocab: vocab as u32,
        dim: dim as u32,
        ids: ib.offset(),
        n: ids.len() as u32,
        out: ob.offset(),
    };
    let what = format!("embed {} ({vocab}x{dim})", dt.name());
    ok(id, &what, sg::embed(&d))?;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| tf[i as usize * dim..][..dim].iter().map(|&v| v as f64))
        .collect();
    close(id, &what, &f32s(&ob, ids.len() * dim), &want, 1e-12)?;
    // A token id past the vocabulary is caught by the kernel at run time.
    let bad = u32_buf(&[vocab as u32]);
    d.ids = bad.offset();
    d.n = 1;
    expect_status(
        id + 1,
        &format!("{what} with id {vocab}"),
        status_of(sg::embed(&d)),
        abi::status::RUNTIME,
    )
}

fn rmsnorm(rng: &mut Rng) -> Checked {
    let (n, dim, eps) = (3, 300, 1e-5);
    let x = rng.f32s(n * dim, 2.0);
    let w = rng.f32s(dim, 1.0);
    let (xb, wb, ob) = (f32_buf(&x), f32_buf(&w), f32_buf(&vec![0.0; n * dim]));
    let want = refs::rmsnorm(&x, &w, dim, eps);
    let mut d = abi::RmsNorm {
        x: xb.offset(),
        weight: wb.offset(),
        out: ob.offset(),
        n: n as u32,
        dim: dim as u32,
        eps,
    };
    ok(300, "rmsnorm", sg::rmsnorm(&d))?;
    close(300, "rmsnorm", &f32s(&ob, n * dim), &want, 1e-10)?;
    d.out = d.x;
    ok(301, "rmsnorm in place", sg::rmsnorm(&d))?;
    close(301, "rmsnorm in place", &f32s(&xb, n * dim), &want, 1e-10)
}

fn rope(rng: &mut Rng) -> Checked {
    let (n, n_heads, hd) = (3usize, 4usize, 64usize);
    let positions = [0u32, 7, 300];
    let base = abi::Rope {
        x: 0,
        n: n as u32,
        n_heads: n_heads as u32,
        head_dim: hd as u32,
        n_rot: hd as u32,
        mode: abi::ROPE_HALF,
        positions: 0,
        freq_base: 10000.0,
        scaling_factor: 0.0,
        low_freq_factor: 0.0,
        high_freq_factor: 0.0,
        original_context: 0,
    };
    let cases = [
        (
            "rope interleaved, partial (n_rot 32)",
            abi::Rope {
                mode: abi::ROPE_INTERLEAVED,
                n_rot: 32,
                ..base
            },
        ),
        ("rope half (neox)", base),
        (
            "rope half, llama-3 scaling",
            abi::Rope {
                freq_base: 500000.0,
                scaling_factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192,
                ..base
            },
        ),
    ];
    let pb = u32_buf(&positions);
    for (i, (what, r)) in cases.into_iter().enumerate() {
        let id = 400 + i as i32;
        let x = rng.f32s(n * n_heads * hd, 1.0);
        let xb = f32_buf(&x);
        let d = abi::Rope {
            x: xb.offset(),
            positions: pb.offset(),
            ..r
        };
        ok(id, what, sg::rope(&d))?;
        close(id, what, &f32s(&xb, x.len()), &refs::rope(&x, &d, &positions), 1e-8)?;
    }
    Ok(())
}

/// A cache of `n` f32 values in `dt` (f32 or f16), and how it reads back as f32.
fn cache_buf(vals: &[f32], dt: DType) -> (Buffer, Vec<f32>) {
    if dt == DType::F32 {
        return (f32_buf(vals), vals.to_vec());
    }
    let h: Vec<u16> = vals.iter().map(|&v| refs::f32_to_f16(v)).collect();
    let mut b = Buffer::new(h.len() * 2, 64);
    b.as_mut_slice::<u16>()[..h.len()].copy_from_slice(&h);
    (b, h.iter().map(|&v| refs::f16_to_f32(v)).collect())
}

fn read_cache(b: &Buffer, dt: DType, n: usize) -> Vec<f32> {
    if dt == DType::F32 {
        f32s(b, n)
    } else {
        b.as_slice::<u16>()[..n].iter().map(|&v| refs::f16_to_f32(v)).collect()
    }
}

fn kv_store(rng: &mut Rng) -> Checked {
    let (n, n_kv, hd, ctx) = (2usize, 2usize, 64usize, 8usize);
    for (ci, dt) in [DType::F32, DType::F16].into_iter().enumerate() {
        let id = 500 + 10 * ci as i32;
        let what = format!("kv_store, {} cache", dt.name());
        let size = n_kv * ctx * hd;
        let (k, v) = (rng.f32s(n * n_kv * hd, 1.0), rng.f32s(n * n_kv * hd, 1.0));
        let (kb, vb) = (f32_buf(&k), f32_buf(&v));
        let (kc, mut want_k) = cache_buf(&vec![9.0; size], dt);
        let (vc, mut want_v) = cache_buf(&vec![9.0; size], dt);
        let pos = 3usize;
        let pb = u32_buf(&[pos as u32]);
        let mut d = abi::KvStore {
            k: kb.offset(),
            v: vb.offset(),
            n: n as u32,
            n_kv_heads: n_kv as u32,
            head_dim: hd as u32,
            k_cache: kc.offset(),
            v_cache: vc.offset(),
            cache_dtype: dt as u32,
            ctx: ctx as u32,
            pos: pb.offset(),
        };
        ok(id, &what, sg::kv_store(&d))?;
        let round = |x: f32| {
            if dt == DType::F16 {
                refs::f16_to_f32(refs::f32_to_f16(x))
            } else {
                x
            }
        };
        for i in 0..n {
            for h in 0..n_kv {
                for e in 0..hd {
                    want_k[(h * ctx + pos + i) * hd + e] = round(k[(i * n_kv + h) * hd + e]);
                    want_v[(h * ctx + pos + i) * hd + e] = round(v[(i * n_kv + h) * hd + e]);
                }
            }
        }
        let wk: Vec<f64> = want_k.iter().map(|&x| x as f64).collect();
        let wv: Vec<f64> = want_v.iter().map(|&x| x as f64).collect();
        close(id, &format!("{what}: k"), &read_cache(&kc, dt, size), &wk, 1e-12)?;
        close(id + 1, &format!("{what}: v"), &read_cache(&vc, dt, size), &wv, 1e-12)?;
        // pos + n past the cache: a run-time error that writes nothing.
        let late = u32_buf(&[(ctx - 1) as u32]);
        d.pos = late.offset();
        expect_status(
            id + 2,
            &format!("{what} past the cache"),
            status_of(sg::kv_store(&d)),
            abi::status::RUNTIME,
        )?;
        close(
            id + 3,
            &format!("{what}: untouched after the error"),
            &read_cache(&kc, dt, size),
            &wk,
            0.0,
        )?;
    }
    Ok(())
}

fn attention(rng: &mut Rng) -> Checked {
    let (hd, ctx) = (64usize, 8usize);
    // (n, n_heads, n_kv_heads, pos): GQA with two queries, then plain multi-head.
    let shapes = [(2usize, 4usize, 2usize, 3usize), (1, 4, 4, 5)];
    let mut id = 600;
    for (n, n_heads, n_kv, pos) in shapes {
        for dt in [DType::F32, DType::F16] {
            let what = format!("attention n={n} heads {n_heads}/{n_kv} pos {pos}, {} cache", dt.name());
            let size = n_kv * ctx * hd;
            let q = rng.f32s(n * n_heads * hd, 1.0);
            let (kc, kf) = cache_buf(&rng.f32s(size, 1.0), dt);
            let (vc, vf) = cache_buf(&rng.f32s(size, 1.0), dt);
            let (qb, pb, ob) = (f32_buf(&q), u32_buf(&[pos as u32]), f32_buf(&vec![0.0; q.len()]));
            let scale = 1.0 / (hd as f32).sqrt();
            let mut d = abi::Attention {
                q: qb.offset(),
                n: n as u32,
                n_heads: n_heads as u32,
                n_kv_heads: n_kv as u32,
                head_dim: hd as u32,
                k_cache: kc.offset(),
                v_cache: vc.offset(),
                cache_dtype: dt as u32,
                ctx: ctx as u32,
                pos: pb.offset(),
                out: ob.offset(),
                scale,
            };
            ok(id, &what, sg::attention(&d))?;
            let want = refs::attention(&q, &kf, &vf, n, n_heads, n_kv, hd, ctx, pos, scale);
            close(id, &what, &f32s(&ob, q.len()), &want, 1e-9)?;
            let late = u32_buf(&[(ctx - n + 1) as u32]);
            d.pos = late.offset();
            expect_status(
                id + 1,
                &format!("{what} past the cache"),
                status_of(sg::attention(&d)),
                abi::status::RUNTIME,
            )?;
            id += 10;
        }
    }
    Ok(())
}

fn elementwise(rng: &mut Rng) -> Checked {
    let len = 300;
    let (a, b) = (rng.f32s(len, 4.0), rng.f32s(len, 4.0));
    let want_swiglu: Vec<f64> = a.iter().zip(&b).map(|(&g, &u)| refs::silu(g) * u as f64).collect();
    let want_add: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
    let want_scale: Vec<f64> = a.iter().map(|&x| x as f64 * -0.75).collect();
    for in_place in [false, true] {
        let sfx = if in_place { " in place" } else { "" };
        let (ab, bb, ob) = (f32_buf(&a), f32_buf(&b), f32_buf(&vec![0.0; len]));
        let out = if in_place { ab.offset() } else { ob.offset() };
        let res = |b: &Buffer| f32s(if in_place { &ab } else { b }, len);
        let d = abi::SwiGlu {
            gate: ab.offset(),
            up: bb.offset(),
            out,
            len: len as u32,
        };
        ok(700, "swiglu", sg::swiglu(&d))?;
        close(
            700 + in_place as i32,
            &format!("swiglu{sfx}"),
            &res(&ob),
            &want_swiglu,
            1e-10,
        )?;

        let (ab, bb, ob) = (f32_buf(&a), f32_buf(&b), f32_buf(&vec![0.0; len]));
        let out = if in_place { ab.offset() } else { ob.offset() };
        let res = |b: &Buffer| f32s(if in_place { &ab } else { b }, len);
        ok(
            800,
            "add",
            sg::add(&abi::Add {
                a: ab.offset(),
                b: bb.offset(),
                out,
                len: len as u32,
            }),
        )?;
        close(800 + in_place as i32, &format!("add{sfx}"), &res(&ob), &want_add, 1e-14)?;

        let (ab, ob) = (f32_buf(&a), f32_buf(&vec![0.0; len]));
        let out = if in_place { ab.offset() } else { ob.offset() };
        let res = |b: &Buffer| f32s(if in_place { &ab } else { b }, len);
        ok(
            900,
            "scale",
            sg::scale(&abi::Scale {
                x: ab.offset(),
                out,
                len: len as u32,
                scale: -0.75,
            }),
        )?;
        close(
            900 + in_place as i32,
            &format!("scale{sfx}"),
            &res(&ob),
            &want_scale,
            1e-14,
        )?;
    }
    Ok(())
}

fn softmax_argmax(rng: &mut Rng) -> Checked {
    let (rows, cols) = (3usize, 300usize);
    let mut x = rng.f32s(rows * cols, 50.0);
    // A tie in row 1: the first index wins.
    x[cols + 10] = 100.0;
    x[cols + 200] = 100.0;
    let want: Vec<f64> = x
        .chunks_exact(cols)
        .flat_map(|r| refs::softmax(&r.iter().map(|&v| v as f64).collect::<Vec<_>>()))
        .collect();
    let (xb, ob) = (f32_buf(&x), f32_buf(&vec![0.0; x.len()]));
    let d = abi::Softmax {
        x: xb.offset(),
        out: ob.offset(),
        rows: rows as u32,
        cols: cols as u32,
    };
    ok(1000, "softmax", sg::softmax(&d))?;
    close(1000, "softmax", &f32s(&ob, x.len()), &want, 1e-10)?;

    let am = u32_buf(&[99; 3]);
    let d = abi::Argmax {
        x: xb.offset(),
        out: am.offset(),
        rows: rows as u32,
        cols: cols as u32,
    };
    ok(1100, "argmax", sg::argmax(&d))?;
    let want: Vec<u32> = x.chunks_exact(cols).map(refs::argmax).collect();
    expect(
        1101,
        "argmax: first index on ties",
        want[1] == 10 && am.as_slice::<u32>()[..3] == want[..],
    )?;

    ok(1002, "softmax in place", sg::softmax(&d_softmax(&xb, rows, cols)))?;
    let sums: Vec<f32> = f32s(&xb, x.len()).chunks_exact(cols).map(|r| r.iter().sum()).collect();
    expect(
        1003,
        "softmax in place: rows sum to 1",
        sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
    )
}

fn d_softmax(x: &Buffer, rows: usize, cols: usize) -> abi::Softmax {
    abi::Softmax {
        x: x.offset(),
        out: x.offset(),
        rows: rows as u32,
        cols: cols as u32,
    }
}

/// The sampler's buffers; `draw` runs one Sample op.
struct Sampler {
    logits: Buffer,
    vocab: usize,
    params: Buffer,
    history: Buffer,
    history_cap: usize,
    rng: Buffer,
    out: Buffer,
}

impl Sampler {
    fn new(logits: &[f32], params: abi::SampleParams, history: &[u32], seed: u64) -> Sampler {
        let mut s = Sampler {
            logits: f32_buf(logits),
            vocab: logits.len(),
            params: byte_buf(abi::pod_bytes(&params)),
            history: u32_buf(if history.is_empty() { &[0] } else { history }),
            history_cap: history.len().max(1),
            rng: Buffer::new(8, 64),
            out: u32_buf(&[u32::MAX]),
        };
        s.seed(seed);
        s
    }

    fn seed(&mut self, seed: u64) {
        self.rng.as_mut_slice::<u64>()[0] = seed;
    }

    fn draw(&self) -> sg::Result<u32> {
        sg::sample(&abi::Sample {
            logits: self.logits.offset(),
            vocab: self.vocab as u32,
            params: self.params.offset(),
            history: self.history.offset(),
            history_cap: self.history_cap as u32,
            rng: self.rng.offset(),
            out: self.out.offset(),
        })?;
        Ok(self.out.as_slice::<u32>()[0])
    }

    fn draws(&self, id: i32, n: usize) -> Checked<Vec<u32>> {
        (0..n)
            .map(|_| self.draw().map_err(|e| fail(id, &format!("sample: {e}"))))
            .collect()
    }
}

fn sample(rng: &mut Rng) -> Checked {
    let vocab = 300;
    let logits = rng.f32s(vocab, 5.0);
    let greedy = abi::SampleParams::default();
    let top = refs::argmax(&logits);

    let s = Sampler::new(&logits, greedy, &[], 1);
    let t = s.draw().map_err(|e| fail(1200, &format!("greedy sample: {e}")))?;
    expect(1200, "greedy sample is the argmax", t == top)?;
    expect(1201, "sample leaves the logits alone", f32s(&s.logits, vocab) == logits)?;

    // Repetition penalty: the best token was just generated, so the runner-up wins.
    let mut l = logits.clone();
    for v in l.iter_mut() {
        *v = v.min(8.0);
    }
    l[17] = 10.0;
    l[33] = 9.0;
    let p = abi::SampleParams {
        repeat_penalty: 2.0,
        history_len: 1,
        ..greedy
    };
    let t = Sampler::new(&l, p, &[17], 1)
        .draw()
        .map_err(|e| fail(1202, &format!("penalised sample: {e}")))?;
    expect(1202, "repetition penalty demotes the repeated token", t == 33)?;

    // Seeded sampling is reproducible, advances the RNG, and respects top-k.
    let p = abi::SampleParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        ..greedy
    };
    let mut s = Sampler::new(&logits, p, &[], 42);
    let a = s.draws(1203, 20)?;
    let advanced = s.rng.as_slice::<u64>()[0] != 42;
    s.seed(42);
    let b = s.draws(1203, 20)?;
    expect(1203, "same seed, same tokens", a == b)?;
    expect(1204, "sampling advances the RNG state", advanced)?;
    let mut sorted = logits.clone();
    sorted.sort_by(|x, y| y.total_cmp(x));
    expect(
        1205,
        "top-k 40: only the 40 best",
        a.iter().all(|&t| logits[t as usize] >= sorted[39]),
    )?;
    expect(
        1206,
        "seeded sampling is not stuck on one token",
        a.iter().any(|&t| t != a[0]),
    )?;

    // Temperature 1 over two tokens with p = (1/4, 3/4).
    let two = [0.0f32, 3f32.ln()];
    let p1 = abi::SampleParams {
        temperature: 1.0,
        ..greedy
    };
    let ones = Sampler::new(&two, p1, &[], 7)
        .draws(1207, 2000)?
        .iter()
        .filter(|&&t| t == 1)
        .count();
    sg::log(&format!(
        "     sample: p(token 1) = {:.3} over 2000 draws (want 0.75)",
        ones as f64 / 2000.0
    ));
    expect(1207, "temperature 1 follows the softmax", (1400..=1600).contains(&ones))?;

    // p = (0.5, 0.3, 0.2): top-p 0.6 and min-p 0.5 both leave tokens {0, 1}.
    let three = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    for (id, what, p) in [
        (1208, "top-p 0.6", abi::SampleParams { top_p: 0.6, ..p1 }),
        (1209, "min-p 0.5", abi::SampleParams { min_p: 0.5, ..p1 }),
        (1210, "top-k 1", abi::SampleParams { top_k: 1, ..p1 }),
    ] {
        let got = Sampler::new(&three, p, &[], 99).draws(id, 500)?;
        let allowed = if id == 1210 { 1 } else { 2 };
        expect(
            id,
            &format!("{what}: only the {allowed} best tokens"),
            got.iter().all(|&t| t < allowed),
        )?;
        if allowed == 2 {
            expect(
                id,
                &format!("{what}: both tokens drawn"),
                got.contains(&0) && got.contains(&1),
            )?;
        }
    }
    Ok(())
}
