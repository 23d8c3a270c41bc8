//! A decode-shaped graph recorded once and replayed 100 times: per-token values are
//! read from memory, results match the CPU each step, and no copy call is made.
use samepage_abi::{self as abi, hint, op as code, DType};
use samepage_backend::Backend;
use samepage_backend_cuda::copy_calls;

use crate::conformance::weights;
use crate::*;

#[test]
fn replayed_graph_100_tokens_zero_copies() {
    replay([DType::Q4_K, DType::BF16, DType::Q6_K]);
}

/// q/k/v of one dtype over the same x: the backend fuses them into one launch at record
/// time; results must still match the CPU's one-by-one matmuls.
#[test]
fn replayed_graph_with_fused_qkv() {
    replay([DType::BF16; 3]);
    replay([DType::Q8_0; 3]);
}

fn replay(qkv: [DType; 3]) {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(8);
    let (vocab, dim, heads, kvh, hd, ctx) = (512usize, 256usize, 4usize, 2usize, 64usize, 128usize);
    let mut img = Image::default();
    let emb = img.put(&weights(DType::Q8_0, vocab, dim, &mut rng));
    let wq = img.put(&weights(qkv[0], heads * hd, dim, &mut rng));
    let wk = img.put(&weights(qkv[1], kvh * hd, dim, &mut rng));
    let wv = img.put(&weights(qkv[2], kvh * hd, dim, &mut rng));
    let wo = img.put(&weights(DType::F16, dim, heads * hd, &mut rng));
    let wout = img.put(&weights(DType::Q8_0, vocab, dim, &mut rng));
    // A bf16 feed-forward wide enough (2 x 4608 rows) for the streaming matvec, which
    // fuses gate, up and swiglu into one launch; down accumulates into x.
    let ffn = 4608usize;
    let (wg, wu, wd) = (
        img.put(&weights(DType::BF16, ffn, dim, &mut rng)),
        img.put(&weights(DType::BF16, ffn, dim, &mut rng)),
        img.put(&weights(DType::BF16, dim, ffn, &mut rng)),
    );
    let (go, uo) = (img.out(4 * ffn), img.out(4 * ffn));
    let norm = img.f32s(&vec![1.0; dim]);
    let kc = img.out(4 * kvh * ctx * hd);
    let vc = img.out(4 * kvh * ctx * hd);
    let (xo, ho, qo, ko, vo, ao, lo) = (
        img.out(4 * dim),
        img.out(4 * dim),
        img.out(4 * heads * hd),
        img.out(4 * kvh * hd),
        img.out(4 * kvh * hd),
        img.out(4 * heads * hd),
        img.out(4 * vocab),
    );
    let (tok, pos, nxt) = (img.u32s(&[1]), img.u32s(&[0]), img.u32s(&[0]));
    let l = img.size();
    let mm = |w, dt: DType, m: usize, k: usize, x, out, flags| {
        op(
            code::MATMUL,
            &abi::Matmul {
                w,
                dtype: dt as u32,
                m: m as u32,
                k: k as u32,
                x,
                n: 1,
                out,
                bias: 0,
                flags,
            },
            l,
        )
    };
    let rope = |x, h| abi::Rope {
        x,
        n: 1,
        n_heads: h,
        head_dim: hd as u32,
        n_rot: hd as u32,
        mode: abi::ROPE_HALF,
        positions: pos,
        freq_base: 10000.0,
        scaling_factor: 0.0,
        low_freq_factor: 0.0,
        high_freq_factor: 0.0,
        original_context: 0,
    };
    let ops = vec![
        op(
            code::EMBED,
            &abi::Embed {
                table: emb,
                dtype: DType::Q8_0 as u32,
                vocab: vocab as u32,
                dim: dim as u32,
                ids: tok,
                n: 1,
                out: xo,
            },
            l,
        ),
        op(
            code::RMSNORM,
            &abi::RmsNorm {
                x: xo,
                weight: norm,
                out: ho,
                n: 1,
                dim: dim as u32,
                eps: 1e-5,
            },
            l,
        ),
        mm(wq, qkv[0], heads * hd, dim, ho, qo, 0),
        mm(wk, qkv[1], kvh * hd, dim, ho, ko, 0),
        mm(wv, qkv[2], kvh * hd, dim, ho, vo, 0),
        // q/k norms keep the random model's attention scores moderate (well-conditioned).
        op(
            code::RMSNORM,
            &abi::RmsNorm {
                x: qo,
                weight: norm,
                out: qo,
                n: heads as u32,
                dim: hd as u32,
                eps: 1e-5,
            },
            l,
        ),
        op(
            code::RMSNORM,
            &abi::RmsNorm {
                x: ko,
                weight: norm,
                out: ko,
                n: kvh as u32,
                dim: hd as u32,
                eps: 1e-5,
            },
            l,
        ),
        op(code::ROPE, &rope(qo, heads as u32), l),
        op(code::ROPE, &rope(ko, kvh as u32), l),
        op(
            code::KV_STORE,
            &abi::KvStore {
                k: ko,
                v: vo,
                n: 1,
                n_kv_heads: kvh as u32,
                head_dim: hd as u32,
                k_cache: kc,
                v_cache: vc,
                cache_dtype: DType::F32 as u32,
                ctx: ctx as u32,
                pos,
            },
            l,
        ),
        op(
            code::ATTENTION,
            &abi::Attention {
                q: qo,
                n: 1,
                n_heads: heads as u32,
                n_kv_heads: kvh as u32,
                head_dim: hd as u32,
                k_cache: kc,
                v_cache: vc,
                cache_dtype: DType::F32 as u32,
                ctx: ctx as u32,
                pos,
                out: ao,
                scale: 0.125,
            },
            l,
        ),
        mm(wo, DType::F16, dim, heads * hd, ao, xo, abi::MATMUL_ACCUMULATE),
        op(
            code::RMSNORM,
            &abi::RmsNorm {
                x: xo,
                weight: norm,
                out: ho,
                n: 1,
                dim: dim as u32,
                eps: 1e-5,
            },
            l,
        ),
        mm(wg, DType::BF16, ffn, dim, ho, go, 0),
        mm(wu, DType::BF16, ffn, dim, ho, uo, 0),
        op(
            code::SWIGLU,
            &abi::SwiGlu {
                gate: go,
                up: uo,
                out: go,
                len: ffn as u32,
            },
            l,
        ),
        mm(wd, DType::BF16, dim, ffn, go, xo, abi::MATMUL_ACCUMULATE),
        op(
            code::RMSNORM,
            &abi::RmsNorm {
                x: xo,
                weight: norm,
                out: ho,
                n: 1,
                dim: dim as u32,
                eps: 1e-5,
            },
            l,
        ),
        mm(wout, DType::Q8_0, vocab, dim, ho, lo, 0),
        op(
            code::ARGMAX,
            &abi::Argmax {
                x: lo,
                out: nxt,
                rows: 1,
                cols: vocab as u32,
            },
            l,
        ),
    ];
    let rg = load(&gpu, &img);
    rg.hint(0, l, hint::DEVICE);
    rg.hint(tok as usize, 4096, hint::HOST);
    let cpu = cpu();
    let rc = load(&cpu, &img);
    let mut g = gpu.record(ops.clone()).unwrap();
    let mut cg = cpu.record(ops).unwrap();
    let copies = copy_calls();
    let io = DecodeIo {
        tok,
        pos,
        nxt,
        logits: lo,
        vocab,
    };
    let worst = replay_against_cpu((&mut *g, &rg), (&mut *cg, &rc), &io, 100, "replay", |_| {});
    println!(
        "100 replays: worst logits rel err vs cpu {worst:.2e}, copy calls {}",
        copy_calls() - copies
    );
    assert_eq!(copy_calls(), 0, "explicit copies during replay");
}

/// rope(q), rope(k), kv_store of one token: the backend runs them as one `rope_kv`
/// launch at record time (Llama-3 scaling, both rope modes, partial rotation, f32 and
/// f16 caches); q, k and both caches must match the CPU's op-by-op results at every
/// position, and a position past the cache must still fail as kv_store.
#[test]
fn replayed_graph_with_fused_rope_kv_store() {
    let Some(gpu) = cuda() else { return };
    let cpu = cpu();
    let (heads, kvh, hd) = (8usize, 2usize, 64usize);
    let mut worst: f64 = 0.0;
    // With the attention after them the four ops run as one `rope_kv_attn` launch (blocks
    // per KV head and chunk of positions, merged by the last); its output must match the
    // CPU too. ctx 300: up to 10 chunks of >= 32 positions and a tile past the first 64
    // of a chunk. `pre`: a scale op first, so that the fused launch reads the staged
    // position and the older cache rows before its PDL wait (graph.rs `tok_ready_early`).
    for (mode, n_rot, scaled, cache, with_attn, ctx, pre) in [
        (abi::ROPE_HALF, 64u32, true, DType::F32, false, 24usize, false),
        (abi::ROPE_INTERLEAVED, 48, false, DType::F16, false, 24, false),
        (abi::ROPE_HALF, 64u32, true, DType::F32, true, 24, false),
        (abi::ROPE_INTERLEAVED, 48, false, DType::F16, true, 24, false),
        (abi::ROPE_HALF, 64u32, true, DType::F16, true, 300, true),
        (abi::ROPE_INTERLEAVED, 48, false, DType::F32, true, 300, false),
    ] {
        let mut rng = Rng::new(31);
        let mut img = Image::default();
        let eb = if cache == DType::F16 { 2 } else { 4 };
        let kc = img.put(&vec![0; eb * kvh * ctx * hd]);
        let vc = img.put(&vec![0; eb * kvh * ctx * hd]);
        let (qv, kv, vv) = (rng.f32s(heads * hd), rng.f32s(kvh * hd), rng.f32s(kvh * hd));
        let (qo, ko, vo) = (img.f32s(&qv), img.f32s(&kv), img.f32s(&vv));
        let pos = img.u32s(&[0]);
        let ao = img.out(4 * heads * hd);
        let (sx, so) = (img.f32s(&rng.f32s(64)), img.out(4 * 64));
        let l = img.size();
        let rope = |x, h: usize| abi::Rope {
            x,
            n: 1,
            n_heads: h as u32,
            head_dim: hd as u32,
            n_rot,
            mode,
            positions: pos,
            freq_base: 500000.0,
            scaling_factor: if scaled { 32.0 } else { 0.0 },
            low_freq_factor: if scaled { 1.0 } else { 0.0 },
            high_freq_factor: if scaled { 4.0 } else { 0.0 },
            original_context: if scaled { 8192 } else { 0 },
        };
        let mut ops = Vec::new();
        if pre {
            let sc = abi::Scale {
                x: sx,
                out: so,
                len: 64,
                scale: 0.5,
            };
            ops.push(op(code::SCALE, &sc, l));
        }
        ops.extend([
            op(code::ROPE, &rope(qo, heads), l),
            op(code::ROPE, &rope(ko, kvh), l),
            op(
                code::KV_STORE,
                &abi::KvStore {
                    k: ko,
                    v: vo,
                    n: 1,
                    n_kv_heads: kvh as u32,
                    head_dim: hd as u32,
                    k_cache: kc,
                    v_cache: vc,
                    cache_dtype: cache as u32,
                    ctx: ctx as u32,
                    pos,
                },
                l,
            ),
        ]);
        if with_attn {
            ops.push(op(
                code::ATTENTION,
                &abi::Attention {
                    q: qo,
                    n: 1,
                    n_heads: heads as u32,
                    n_kv_heads: kvh as u32,
                    head_dim: hd as u32,
                    k_cache: kc,
                    v_cache: vc,
                    cache_dtype: cache as u32,
                    ctx: ctx as u32,
                    pos,
                    out: ao,
                    scale: 0.125,
                },
                l,
            ));
        }
        let (rg, rc) = (load(&gpu, &img), load(&cpu, &img));
        let mut g = gpu.record(ops.clone()).unwrap();
        let mut cg = cpu.record(ops).unwrap();
        for step in 0..=ctx as u32 {
            let (q, k, v) = (rng.f32s(heads * hd), rng.f32s(kvh * hd), rng.f32s(kvh * hd));
            for r in [&rg, &rc] {
                for (at, x) in [(qo, &q), (ko, &k), (vo, &v)] {
                    for (i, f) in x.iter().enumerate() {
                        r.mem().write_u32(at + 4 * i as u32, f.to_bits()).unwrap();
                    }
                }
                r.mem().write_u32(pos, step).unwrap();
            }
            g.launch(rg.mem()).unwrap();
            let res = g.wait();
            if step == ctx as u32 {
                let e = res.expect_err("a position past the cache must fail").to_string();
                let kv_op = if pre { "op 3" } else { "op 2" };
                assert!(e.contains(kv_op) && e.contains("kv_store"), "{e}");
                break;
            }
            res.unwrap();
            cg.launch(rc.mem()).unwrap();
            cg.wait().unwrap();
            let (a, b) = (snapshot(&rg), snapshot(&rc));
            // The attention reads the cache: with an f16 cache one-ulp word differences
            // (below) pass through, ~2^-11 on a few values.
            let att_tol = if cache == DType::F16 { 1e-3 } else { 1e-5 };
            let outs: &[(u32, usize, f64)] = if with_attn {
                &[(qo, heads * hd, 1e-5), (ko, kvh * hd, 1e-5), (ao, heads * hd, att_tol)]
            } else {
                &[(qo, heads * hd, 1e-5), (ko, kvh * hd, 1e-5)]
            };
            for &(at, n, tol) in outs {
                let e = samepage_backend_cpu::reference::rel_err(&read_f32s(&a, at, n), &read_f32s(&b, at, n));
                worst = worst.max(e);
                assert!(e < tol, "step {step}: output at {at} differs from the CPU by {e:.2e}");
            }
            let cb = eb * kvh * ctx * hd;
            for at in [kc, vc] {
                let (x, y) = (&a[at as usize..at as usize + cb], &b[at as usize..at as usize + cb]);
                if cache == DType::F32 {
                    let e =
                        samepage_backend_cpu::reference::rel_err(&read_f32s(x, 0, cb / 4), &read_f32s(y, 0, cb / 4));
                    worst = worst.max(e);
                    assert!(e < 1e-5, "step {step}: cache differs from the CPU by {e:.2e}");
                } else {
                    // f16 words: equal, or one ulp apart (rounding of a value that differs
                    // in its last f32 bit).
                    for (i, (u, w)) in x.chunks_exact(2).zip(y.chunks_exact(2)).enumerate() {
                        let (u, w) = (u16::from_le_bytes([u[0], u[1]]), u16::from_le_bytes([w[0], w[1]]));
                        assert!(u.abs_diff(w) <= 1, "step {step}: f16 cache word {i}: {u:#x} vs {w:#x}");
                    }
                }
            }
        }
    }
    println!("fused rope+rope+kv_store(+attention): worst rel err vs cpu {worst:.2e}");
}
