//! Every op and dtype on the GPU against the CPU backend, with a normalised error
//! tolerance per op (test-backend-ops style). Odd shapes and unaligned offsets included.
use samepage_abi::{self as abi, status, DType};
use samepage_backend::{Backend, Op};

use crate::common::*;

/// A valid random weight matrix `(rows, cols)` in `dt`: random quants, small sane scales.
fn weights(rng: &mut Rng, dt: DType, rows: usize, cols: usize) -> Vec<u8> {
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match dt {
        DType::F32 => rng.fs(rows * cols).iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => rng.fs(rows * cols).iter().flat_map(|&v| f16(v)).collect(),
        DType::BF16 => rng
            .fs(rows * cols)
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => {
            let bb = dt.block_bytes();
            let mut w = rng.bytes(dt.row_bytes(cols).unwrap() * rows);
            for b in w.chunks_exact_mut(bb) {
                let d = f16(0.01 + 0.02 * rng.f().abs());
                let m = f16(0.01 * rng.f());
                let at: &[(usize, [u8; 2])] = match dt {
                    DType::Q8_0 | DType::Q4_0 | DType::Q5_0 => &[(0, d)],
                    DType::Q4_1 | DType::Q4_K | DType::Q5_K => &[(0, d), (2, m)],
                    DType::Q6_K => &[(208, d)],
                    _ => unreachable!(),
                };
                for (o, v) in at {
                    b[*o..*o + 2].copy_from_slice(v);
                }
            }
            w
        }
    }
}

/// Weights other than f32 may start at 2 mod 4: test that.
fn skew(dt: DType) -> usize {
    if dt == DType::F32 {
        0
    } else {
        2
    }
}

fn check(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    eprintln!("{name}: normalised error {e:.2e} (tolerance {tol:.0e})");
    assert!(
        e <= tol,
        "{name}: normalised error {e:.3e} > {tol:.0e}\n got {:?}\nwant {:?}",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
}

#[test]
fn matmul_every_dtype() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(1);
    for dt in DType::WEIGHTS {
        let shapes: &[(u32, u32, u32)] = match dt.block_elems() {
            1 => &[(5, 37, 1), (67, 64, 3), (3, 300, 9)],
            32 => &[(5, 64, 1), (67, 96, 3), (3, 256, 9)],
            _ => &[(5, 256, 1), (67, 512, 3), (3, 256, 9)],
        };
        for &(m, k, n) in shapes {
            for flags in [0, abi::MATMUL_BIAS, abi::MATMUL_BIAS | abi::MATMUL_ACCUMULATE] {
                let mut img = Image::new();
                let w = img.put(&weights(&mut rng, dt, m as usize, k as usize), 4, skew(dt));
                let x = img.f32s(&rng.fs((n * k) as usize));
                let bias = img.f32s(&rng.fs(m as usize));
                let out = img.f32s(&rng.fs((n * m) as usize));
                let op = Op::Matmul(abi::Matmul {
                    w,
                    dtype: dt as u32,
                    m,
                    k,
                    x,
                    n,
                    out,
                    bias,
                    flags,
                });
                let p = run_both(&gpu, &img, &[op]);
                p.cpu_res.unwrap();
                p.gpu_res.unwrap();
                let len = (n * m) as usize;
                let name = format!("matmul {} m={m} k={k} n={n} flags={flags}", dt.name());
                let got = f32s_at(&p.gpu.mem(), out, len);
                // The CPU backend quantises the activations for quantised weights (as
                // llama.cpp does); the GPU does not, so it is also held to the exact
                // scalar reference.
                let mem = p.cpu.mem();
                // SAFETY: test ranges.
                let wb = unsafe { mem.slice::<u8>(w, dt.row_bytes(k as usize).unwrap() * m as usize) };
                let xs = f32s_at(&mem, x, (n * k) as usize);
                let bs = f32s_at(&mem, bias, m as usize);
                let prev: Vec<f32> = img.bytes[out as usize..out as usize + 4 * len]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let want = samepage_backend_cpu::reference::matmul(
                    dt,
                    wb,
                    m as usize,
                    k as usize,
                    &xs,
                    n as usize,
                    (flags & abi::MATMUL_BIAS != 0).then_some(&bs[..]),
                    (flags & abi::MATMUL_ACCUMULATE != 0).then_some(&prev[..]),
                );
                check(&format!("{name} vs reference"), &got, &want, 1e-5);
                let tol = if dt.block_elems() == 1 { 1e-5 } else { 5e-2 };
                check(&format!("{name} vs cpu"), &got, &f32s_at(&p.cpu.mem(), out, len), tol);
            }
        }
    }
}

#[test]
fn embed_every_dtype() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(2);
    for dt in DType::WEIGHTS {
        let dim = if dt.block_elems() == 256 {
            512
        } else if dt.block_elems() == 32 {
            96
        } else {
            50
        };
        let vocab = 13;
        let mut img = Image::new();
        let table = img.put(&weights(&mut rng, dt, vocab, dim), 4, skew(dt));
        let ids = img.u32s(&[3, 0, 12, 3, 7]);
        let out = img.zeros(5 * dim * 4);
        let op = Op::Embed(abi::Embed {
            table,
            dtype: dt as u32,
            vocab: vocab as u32,
            dim: dim as u32,
            ids,
            n: 5,
            out,
        });
        let p = run_both(&gpu, &img, &[op]);
        p.cpu_res.unwrap();
        p.gpu_res.unwrap();
        check(
            &format!("embed {}", dt.name()),
            &f32s_at(&p.gpu.mem(), out, 5 * dim),
            &f32s_at(&p.cpu.mem(), out, 5 * dim),
            0.0,
        );
    }
}

#[test]
fn embed_bad_id_is_a_runtime_error() {
    let Some(gpu) = gpu() else { return };
    let mut img = Image::new();
    let table = img.f32s(&[1.0; 4 * 8]);
    let ids = img.u32s(&[1, 4]);
    let out = img.f32s(&[-1.0; 16]);
    let op = Op::Embed(abi::Embed {
        table,
        dtype: 0,
        vocab: 4,
        dim: 8,
        ids,
        n: 2,
        out,
    });
    let p = run_both(&gpu, &img, &[op]);
    assert_eq!(p.gpu_res.unwrap_err().status, status::RUNTIME);
    assert_eq!(p.cpu_res.unwrap_err().status, status::RUNTIME);
    // Row 1 is past the table: never written.
    assert_eq!(f32s_at(&p.gpu.mem(), out + 32, 8), vec![-1.0; 8]);
}

#[test]
fn rmsnorm_softmax_argmax_elementwise() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(3);
    let (n, dim) = (3u32, 300u32);
    let len = (n * dim) as usize;
    let mut img = Image::new();
    let x = img.f32s(&rng.fs(len));
    let y = img.f32s(&rng.fs(len));
    let w = img.f32s(&rng.fs(dim as usize));
    let mut ties = rng.fs(len);
    ties[17] = 5.0;
    ties[40] = 5.0;
    ties[dim as usize + 3] = f32::NAN;
    let t = img.f32s(&ties);
    let o1 = img.zeros(len * 4);
    let o2 = img.zeros(len * 4);
    let o3 = img.zeros(len * 4);
    let o4 = img.zeros(len * 4);
    let o5 = img.zeros(len * 4);
    let am = img.zeros(n as usize * 4);
    let inplace = img.f32s(&rng.fs(len));
    let ops = [
        Op::RmsNorm(abi::RmsNorm {
            x,
            weight: w,
            out: o1,
            n,
            dim,
            eps: 1e-5,
        }),
        Op::RmsNorm(abi::RmsNorm {
            x: inplace,
            weight: w,
            out: inplace,
            n,
            dim,
            eps: 1e-6,
        }),
        Op::Softmax(abi::Softmax {
            x,
            out: o2,
            rows: n,
            cols: dim,
        }),
        Op::SwiGlu(abi::SwiGlu {
            gate: x,
            up: y,
            out: o3,
            len: n * dim,
        }),
        Op::Add(abi::Add {
            a: x,
            b: y,
            out: o4,
            len: n * dim,
        }),
        Op::Scale(abi::Scale {
            x: y,
            out: o5,
            len: n * dim,
            scale: -0.75,
        }),
        Op::Argmax(abi::Argmax {
            x: t,
            out: am,
            rows: n,
            cols: dim,
        }),
    ];
    let p = run_both(&gpu, &img, &ops);
    p.cpu_res.unwrap();
    p.gpu_res.unwrap();
    let (g, c) = (p.gpu.mem(), p.cpu.mem());
    for (name, off, tol) in [
        ("rmsnorm", o1, 1e-6),
        ("rmsnorm in place", inplace, 1e-6),
        ("softmax", o2, 1e-6),
        ("swiglu", o3, 1e-6),
        ("add", o4, 0.0),
        ("scale", o5, 0.0),
    ] {
        check(name, &f32s_at(&g, off, len), &f32s_at(&c, off, len), tol);
    }
    assert_eq!(u32s_at(&g, am, n as usize), u32s_at(&c, am, n as usize));
    assert_eq!(u32s_at(&g, am, 1), vec![17]);
}

#[test]
fn rope_modes_and_llama3_scaling() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(4);
    for mode in [abi::ROPE_INTERLEAVED, abi::ROPE_HALF] {
        for (scaling, n_rot) in [(0.0, 64), (8.0, 48)] {
            let (n, heads, hd) = (4u32, 3u32, 64u32);
            let mut img = Image::new();
            let x = img.f32s(&rng.fs((n * heads * hd) as usize));
            let positions = img.u32s(&[0, 7, 4095, 131000]);
            let op = Op::Rope(abi::Rope {
                x,
                n,
                n_heads: heads,
                head_dim: hd,
                n_rot,
                mode,
                positions,
                freq_base: 500000.0,
                scaling_factor: scaling,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192,
            });
            let p = run_both(&gpu, &img, &[op]);
            p.cpu_res.unwrap();
            p.gpu_res.unwrap();
            let len = (n * heads * hd) as usize;
            check(
                &format!("rope mode={mode} scaling={scaling} n_rot={n_rot}"),
                &f32s_at(&p.gpu.mem(), x, len),
                &f32s_at(&p.cpu.mem(), x, len),
                1e-6,
            );
        }
    }
}

/// kv_store then attention, with GQA, several chunks of positions, f32 and f16 caches.
#[test]
fn kv_store_and_attention() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(5);
    for cache_dt in [DType::F32, DType::F16] {
        for (n, pos, hd) in [(1u32, 0u32, 64u32), (3, 150, 64), (5, 290, 80)] {
            let (heads, kv, ctx) = (6u32, 2u32, 300u32);
            let es = cache_dt.block_bytes();
            let cache_bytes = (kv * ctx * hd) as usize * es;
            let mut img = Image::new();
            // Random history in the caches (valid values of the cache dtype).
            let hist = |rng: &mut Rng| -> Vec<u8> {
                let v = rng.fs((kv * ctx * hd) as usize);
                match cache_dt {
                    DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                }
            };
            let k_cache = img.put(&hist(&mut rng), 4, 0);
            let v_cache = img.put(&hist(&mut rng), 2, if es == 2 { 2 } else { 0 });
            let k = img.f32s(&rng.fs((n * kv * hd) as usize));
            let v = img.f32s(&rng.fs((n * kv * hd) as usize));
            let q = img.f32s(&rng.fs((n * heads * hd) as usize));
            let at = img.u32s(&[pos]);
            let out = img.zeros((n * heads * hd) as usize * 4);
            let cdt = cache_dt as u32;
            let ops = [
                Op::KvStore(abi::KvStore {
                    k,
                    v,
                    n,
                    n_kv_heads: kv,
                    head_dim: hd,
                    k_cache,
                    v_cache,
                    cache_dtype: cdt,
                    ctx,
                    pos: at,
                }),
                Op::Attention(abi::Attention {
                    q,
                    n,
                    n_heads: heads,
                    n_kv_heads: kv,
                    head_dim: hd,
                    k_cache,
                    v_cache,
                    cache_dtype: cdt,
                    ctx,
                    pos: at,
                    out,
                    scale: 1.0 / (hd as f32).sqrt(),
                }),
            ];
            let p = run_both(&gpu, &img, &ops);
            p.cpu_res.unwrap();
            p.gpu_res.unwrap();
            let (g, c) = (p.gpu.mem(), p.cpu.mem());
            // SAFETY: test ranges.
            let bytes = |m: &samepage_backend::Mem, off: u32| unsafe { m.slice::<u8>(off, cache_bytes) }.to_vec();
            assert_eq!(bytes(&g, k_cache), bytes(&c, k_cache), "k cache {}", cache_dt.name());
            assert_eq!(bytes(&g, v_cache), bytes(&c, v_cache), "v cache {}", cache_dt.name());
            let len = (n * heads * hd) as usize;
            check(
                &format!("attention {} n={n} pos={pos} hd={hd}", cache_dt.name()),
                &f32s_at(&g, out, len),
                &f32s_at(&c, out, len),
                1e-5,
            );
        }
    }
}

#[test]
fn position_past_the_cache_writes_nothing() {
    let Some(gpu) = gpu() else { return };
    let (kv, hd, ctx) = (1u32, 8u32, 4u32);
    let mut img = Image::new();
    let k_cache = img.f32s(&[7.0; 32]);
    let v_cache = img.f32s(&[7.0; 32]);
    let k = img.f32s(&[1.0; 16]);
    let v = img.f32s(&[1.0; 16]);
    let at = img.u32s(&[3]);
    let q = img.f32s(&[1.0; 16]);
    let out = img.f32s(&[-1.0; 16]);
    let store = Op::KvStore(abi::KvStore {
        k,
        v,
        n: 2,
        n_kv_heads: kv,
        head_dim: hd,
        k_cache,
        v_cache,
        cache_dtype: 0,
        ctx,
        pos: at,
    });
    let attn = Op::Attention(abi::Attention {
        q,
        n: 2,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: hd,
        k_cache,
        v_cache,
        cache_dtype: 0,
        ctx,
        pos: at,
        out,
        scale: 0.3,
    });
    for op in [store, attn] {
        let p = run_both(&gpu, &img, &[op]);
        assert_eq!(p.gpu_res.unwrap_err().status, status::RUNTIME, "{}", op.name());
        assert_eq!(p.cpu_res.unwrap_err().status, status::RUNTIME, "{}", op.name());
        assert_eq!(f32s_at(&p.gpu.mem(), k_cache, 32), vec![7.0; 32]);
        assert_eq!(f32s_at(&p.gpu.mem(), out, 16), vec![-1.0; 16]);
    }
}

#[test]
fn sample_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(6);
    let vocab = 1000u32;
    for (i, params) in [
        abi::SampleParams::default(),
        abi::SampleParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.1,
            history_len: 4,
        },
        abi::SampleParams {
            temperature: 1.2,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            history_len: 0,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let mut img = Image::new();
        let logits = img.f32s(&rng.fs(vocab as usize).iter().map(|v| v * 8.0).collect::<Vec<_>>());
        let p_off = img.put(samepage_abi::pod_bytes(&params), 4, 0);
        let history = img.u32s(&[1, 2, 3, 4, 5, 6]);
        let rng_off = img.put(&(0x1234_5678u64 + i as u64).to_le_bytes(), 8, 0);
        let out = img.zeros(4);
        let op = Op::Sample(abi::Sample {
            logits,
            vocab,
            params: p_off,
            history,
            history_cap: 6,
            rng: rng_off,
            out,
        });
        // A GPU op before it, so the sampler reads what the GPU just wrote.
        let scale = Op::Scale(abi::Scale {
            x: logits,
            out: logits,
            len: vocab,
            scale: 1.0,
        });
        let p = run_both(&gpu, &img, &[scale, op]);
        p.cpu_res.unwrap();
        p.gpu_res.unwrap();
        assert_eq!(u32s_at(&p.gpu.mem(), out, 1), u32s_at(&p.cpu.mem(), out, 1));
        assert_eq!(p.gpu.mem().read_u64(rng_off), p.cpu.mem().read_u64(rng_off));
    }
}

/// A recorded graph replays with per-token values read from memory at launch time.
#[test]
fn recorded_graph_reads_positions_at_launch() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(7);
    let (kv, hd, ctx) = (2u32, 32u32, 16u32);
    let mut img = Image::new();
    let k_cache = img.zeros((kv * ctx * hd * 4) as usize);
    let v_cache = img.zeros((kv * ctx * hd * 4) as usize);
    let k = img.f32s(&rng.fs((kv * hd) as usize));
    let v = img.f32s(&rng.fs((kv * hd) as usize));
    let at = img.u32s(&[0]);
    let store = Op::KvStore(abi::KvStore {
        k,
        v,
        n: 1,
        n_kv_heads: kv,
        head_dim: hd,
        k_cache,
        v_cache,
        cache_dtype: 0,
        ctx,
        pos: at,
    });
    let r = load(&gpu, &img);
    let mut graph = gpu.record(vec![store]).unwrap();
    for step in 0..3u32 {
        r.mem().write_u32(at, step * 5).unwrap();
        graph.launch(r.mem()).unwrap();
        graph.wait().unwrap();
    }
    let cache = f32s_at(&r.mem(), k_cache, (kv * ctx * hd) as usize);
    let kv_in = f32s_at(&r.mem(), k, (kv * hd) as usize);
    for p in [0usize, 5, 10] {
        assert_eq!(&cache[p * hd as usize..(p + 1) * hd as usize], &kv_in[..hd as usize]);
    }
    assert!(cache[hd as usize..2 * hd as usize].iter().all(|&x| x == 0.0));
}

/// Weights larger than one binding are split by rows into several dispatches; tensors
/// that cannot be split are reported as unsupported rather than bound partially.
#[test]
fn weights_larger_than_a_binding_are_split() {
    let Some(gpu) = gpu() else { return };
    let small = gpu.with_binding_limit(4096);
    let mut rng = Rng(8);
    let (m, k, n, dt) = (70u32, 256u32, 2u32, DType::Q4_K);
    let mut img = Image::new();
    let w = img.put(&weights(&mut rng, dt, m as usize, k as usize), 4, 2);
    let x = img.f32s(&rng.fs((n * k) as usize));
    let out = img.zeros((n * m * 4) as usize);
    let table = img.put(&weights(&mut rng, dt, m as usize, k as usize), 4, 2);
    let ids = img.u32s(&[69, 0, 31, 32]);
    let emb = img.zeros(4 * k as usize * 4);
    let ops = [
        Op::Matmul(abi::Matmul {
            w,
            dtype: dt as u32,
            m,
            k,
            x,
            n,
            out,
            bias: 0,
            flags: 0,
        }),
        Op::Embed(abi::Embed {
            table,
            dtype: dt as u32,
            vocab: m,
            dim: k,
            ids,
            n: 4,
            out: emb,
        }),
    ];
    let p = run_both(&small, &img, &ops);
    p.cpu_res.unwrap();
    p.gpu_res.unwrap();
    let (g, c) = (p.gpu.mem(), p.cpu.mem());
    check(
        "split matmul",
        &f32s_at(&g, out, (n * m) as usize),
        &f32s_at(&c, out, (n * m) as usize),
        5e-2,
    );
    check(
        "split embed",
        &f32s_at(&g, emb, 4 * k as usize),
        &f32s_at(&c, emb, 4 * k as usize),
        0.0,
    );
    let big = Op::Add(abi::Add {
        a: x,
        b: x,
        out: x,
        len: 2048,
    });
    assert!(!small.supports(&big));
    assert!(gpu.supports(&big));
}
