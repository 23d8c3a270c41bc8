//! Every op and every weight dtype against the CPU backend and the scalar reference,
//! with a normalised error ‖gpu − ref‖ / ‖ref‖ per op.
use samepage_abi::{self as abi, op as code, DType, SampleParams};
use samepage_backend_cpu::reference as r;

use crate::*;

/// Random but sane weights: random quant bytes, every f16 scale a small finite value.
pub fn weights(dt: DType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_le_bytes();
    let n = rows * cols;
    match dt {
        DType::F32 => f32_bytes(&rng.f32s(n)),
        DType::F16 => (0..n).flat_map(|_| f16(rng.f32())).collect(),
        DType::BF16 => (0..n).flat_map(|_| bf16(rng.f32())).collect(),
        _ => {
            let bb = dt.block_bytes();
            let blocks = n / dt.block_elems();
            let mut b: Vec<u8> = (0..blocks * bb).map(|_| rng.u64() as u8).collect();
            let scales: &[usize] = match dt {
                DType::Q8_0 | DType::Q4_0 | DType::Q5_0 => &[0],
                DType::Q4_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
                DType::Q6_K => &[208],
                _ => unreachable!(),
            };
            for blk in b.chunks_exact_mut(bb) {
                for &s in scales {
                    blk[s..s + 2].copy_from_slice(&f16(rng.f32() * 0.05));
                }
            }
            b
        }
    }
}

fn check(what: &str, gpu: &[f32], want: &[f32], tol: f64) {
    assert!(
        gpu.iter().all(|v| v.is_finite()),
        "{what}: non-finite output (unwritten?)"
    );
    let e = r::rel_err(gpu, want);
    println!("{what}: rel err {e:.2e}");
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:.0e}");
}

/// The unit roundoff of the prefill GEMM's inputs (n > 1 through cuBLAS): x rounded to
/// bf16 for BF16 weights, x and W to f16 for F16 and quantized weights (W's rounding
/// adds as much again), none for F32 (Sgemm). `SAMEPAGE_CUDA_GEMM=tiled` is exact.
fn gemm_unit(dt: DType) -> f64 {
    match dt {
        DType::F32 => 0.0,
        DType::BF16 => (2.0f64).powi(-8),
        _ => (2.0f64).powi(-11),
    }
}

/// Every output of an n > 1 matmul within `u * sum_l |x_il| |w_jl|` (plus f32 rounding
/// of the sums, bias and accumulated values) of the reference: a wrong layout or a
/// transposed operand is far outside it. And the normalised error within `u`.
#[allow(clippy::too_many_arguments)]
fn check_gemm(
    what: &str,
    gpu: &[f32],
    want: &[f32],
    dt: DType,
    w: &[u8],
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    extra: Option<(&[f32], &[f32])>,
) {
    let u = gemm_unit(dt);
    check(what, gpu, want, u.max(1e-5));
    let wd = r::dequant(dt, w, m, k);
    let mut worst = 0.0f64;
    for i in 0..n {
        for j in 0..m {
            let s: f64 = (0..k).map(|l| (x[i * k + l] as f64 * wd[j * k + l] as f64).abs()).sum();
            let e = extra.map_or(0.0, |(b, p)| (b[j].abs() + p[i * m + j].abs()) as f64);
            let (g, r) = (gpu[i * m + j] as f64, want[i * m + j] as f64);
            let bound = (u + 1e-5) * s + 1e-5 * e + 1e-6;
            worst = worst.max((g - r).abs() / bound);
            assert!(
                (g - r).abs() <= bound,
                "{what}: out[{i}, {j}] = {g} vs {r}: error {:.3e} > bound {bound:.3e}",
                (g - r).abs()
            );
        }
    }
    println!("{what}: worst error / bound {worst:.2}");
}

#[test]
fn matmul_every_dtype_and_path() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(1);
    for dt in DType::WEIGHTS {
        let kq = dt.block_elems().max(32);
        // (m, k, n, weight skew, x skew): skews of 2/4 bytes take the unaligned paths. n > 1:
        // cuBLAS (quantized n <= 4: one matvec per row), unless SAMEPAGE_CUDA_GEMM=tiled.
        let mut shapes = vec![
            (67, 2 * kq.max(256), 1, 0, 0),
            (67, 2 * kq.max(256), 1, 2, 4),
            (130, 3 * kq.max(256), 70, 0, 0),
            (9, kq, 3, 2, 4),
        ];
        if dt.block_elems() == 1 {
            shapes.push((33, 40, 1, 0, 0));
            shapes.push((33, 40, 2, 0, 0));
            // Prefill GEMM: W rows 8-byte aligned, and k not a multiple of 8 (both
            // through the scratch copy), x 4-byte aligned.
            shapes.push((40, 64, 9, 8, 4));
            shapes.push((33, 36, 5, 8, 0));
        }
        if dt == DType::Q4_K || dt == DType::BF16 {
            // W in two scratch chunks (32 MiB of f16 rows each: 2048 rows of k = 8192).
            shapes.push((2100, 8192, 5, if dt == DType::BF16 { 2 } else { 0 }, 0));
        }
        if dt == DType::F32 {
            // f32 weights are 4-byte aligned: no 2-byte skew.
            for s in &mut shapes {
                s.3 = if s.3 == 2 { 4 } else { s.3 };
            }
        }
        for (m, k, n, wskew, xskew) in shapes {
            for flags in [0, abi::MATMUL_BIAS | abi::MATMUL_ACCUMULATE] {
                let w = weights(dt, m, k, &mut rng);
                let x = rng.f32s(n * k);
                let bias = rng.f32s(m);
                let prev = rng.f32s(n * m);
                let mut img = Image::default();
                let wo = img.put_skewed(&w, wskew);
                let xo = img.put_skewed(&f32_bytes(&x), xskew);
                let bo = img.f32s(&bias);
                let oo = if flags != 0 {
                    img.f32s(&prev)
                } else {
                    img.out(4 * n * m)
                };
                let d = abi::Matmul {
                    w: wo,
                    dtype: dt as u32,
                    m: m as u32,
                    k: k as u32,
                    x: xo,
                    n: n as u32,
                    out: oo,
                    bias: bo,
                    flags,
                };
                let ops = [op(code::MATMUL, &d, img.size())];
                let (c, g) = run_both(&gpu, &img, &ops);
                let (bias_r, prev_r) = if flags != 0 {
                    (Some(&bias[..]), Some(&prev[..]))
                } else {
                    (None, None)
                };
                let want = r::matmul(dt, &w, m, k, &x, n, bias_r, prev_r);
                let what = format!(
                    "matmul {} m={m} k={k} n={n} skew=({wskew},{xskew}) flags={flags}",
                    dt.name()
                );
                if n == 1 {
                    // Quantized W: the matvec rounds x to i16 per 32 elements (as the CPU
                    // backend): 2^-16 of each block's max at most, ~1.5e-5 normwise for
                    // uniform x; one wrongly decoded weight of k = 512 is ~1e-2.
                    let tol = if dt.block_elems() == 1 { 1e-5 } else { 5e-5 };
                    check(&what, &read_f32s(&g, oo, n * m), &want, tol);
                } else {
                    let extra = (flags != 0).then_some((&bias[..], &prev[..]));
                    check_gemm(&what, &read_f32s(&g, oo, n * m), &want, dt, &w, (m, k, n), &x, extra);
                }
                let cpu_err = r::rel_err(&read_f32s(&c, oo, n * m), &read_f32s(&g, oo, n * m));
                assert!(cpu_err < 2e-2, "{what}: differs from the CPU backend by {cpu_err:.2e}");
            }
        }
    }
}

#[test]
fn embed_every_dtype() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(2);
    for dt in DType::WEIGHTS {
        let (vocab, dim, n) = (50, 256, 7);
        let t = weights(dt, vocab, dim, &mut rng);
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab as u32)).collect();
        let mut img = Image::default();
        let to = img.put_skewed(&t, if dt == DType::F32 { 0 } else { 2 });
        let io = img.u32s(&ids);
        let oo = img.out(4 * n * dim);
        let d = abi::Embed {
            table: to,
            dtype: dt as u32,
            vocab: vocab as u32,
            dim: dim as u32,
            ids: io,
            n: n as u32,
            out: oo,
        };
        let (c, g) = run_both(&gpu, &img, &[op(code::EMBED, &d, img.size())]);
        let want = r::embed(dt, &t, vocab, dim, &ids);
        check(
            &format!("embed {}", dt.name()),
            &read_f32s(&g, oo, n * dim),
            &want,
            1e-6,
        );
        assert_eq!(
            read_f32s(&c, oo, n * dim),
            read_f32s(&g, oo, n * dim),
            "embed {} vs cpu",
            dt.name()
        );
    }
}

#[test]
fn norm_rope_elementwise() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(3);
    // rmsnorm, in place and not.
    for (n, dim) in [(1usize, 2048usize), (5, 100)] {
        let x = rng.f32s(n * dim);
        let w = rng.f32s(dim);
        let mut img = Image::default();
        let xo = img.f32s(&x);
        let wo = img.f32s(&w);
        let oo = img.out(4 * n * dim);
        let a = abi::RmsNorm {
            x: xo,
            weight: wo,
            out: oo,
            n: n as u32,
            dim: dim as u32,
            eps: 1e-5,
        };
        let b = abi::RmsNorm { out: xo, ..a };
        let l = img.size();
        let (_, g) = run_both(&gpu, &img, &[op(code::RMSNORM, &a, l), op(code::RMSNORM, &b, l)]);
        let want = r::rmsnorm(&x, &w, dim, 1e-5);
        check("rmsnorm", &read_f32s(&g, oo, n * dim), &want, 1e-6);
        check("rmsnorm in place", &read_f32s(&g, xo, n * dim), &want, 1e-6);
    }
    // rope: both layouts, partial rotation, Llama-3 scaling.
    for (mode, n_rot, scaling) in [
        (abi::ROPE_INTERLEAVED, 64, 0.0),
        (abi::ROPE_HALF, 64, 32.0),
        (abi::ROPE_HALF, 32, 0.0),
    ] {
        let (n, heads, hd) = (3usize, 4usize, 64usize);
        let x = rng.f32s(n * heads * hd);
        let pos: Vec<u32> = vec![0, 17, 5000];
        let mut img = Image::default();
        let xo = img.f32s(&x);
        let po = img.u32s(&pos);
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
        let (c, g) = run_both(&gpu, &img, &[op(code::ROPE, &d, img.size())]);
        let want = r::rope(&x, &d, &pos);
        check(
            &format!("rope mode={mode} n_rot={n_rot} scaling={scaling}"),
            &read_f32s(&g, xo, x.len()),
            &want,
            1e-6,
        );
        check(
            "rope vs cpu",
            &read_f32s(&g, xo, x.len()),
            &read_f32s(&c, xo, x.len()),
            1e-6,
        );
    }
    // swiglu, add (in place), scale, softmax, argmax.
    let len = 3000;
    let (a, b) = (rng.f32s(len), rng.f32s(len));
    let mut img = Image::default();
    let ao = img.f32s(&a);
    let bo = img.f32s(&b);
    let so = img.out(4 * len);
    let co = img.out(4 * len);
    let (rows, cols) = (3usize, 1000usize);
    let mut sm = rng.f32s(rows * cols);
    sm[10] = 5.0;
    sm[20] = 5.0; // a tie: the first index wins
    sm[1000 + 999] = 7.0;
    let smo = img.f32s(&sm);
    let smout = img.out(4 * rows * cols);
    let amo = img.out(4 * rows);
    let l = img.size();
    let ops = [
        op(
            code::SWIGLU,
            &abi::SwiGlu {
                gate: ao,
                up: bo,
                out: so,
                len: len as u32,
            },
            l,
        ),
        op(
            code::SCALE,
            &abi::Scale {
                x: ao,
                out: co,
                len: len as u32,
                scale: 0.37,
            },
            l,
        ),
        op(
            code::ADD,
            &abi::Add {
                a: ao,
                b: bo,
                out: ao,
                len: len as u32,
            },
            l,
        ),
        op(
            code::SOFTMAX,
            &abi::Softmax {
                x: smo,
                out: smout,
                rows: rows as u32,
                cols: cols as u32,
            },
            l,
        ),
        op(
            code::ARGMAX,
            &abi::Argmax {
                x: smo,
                out: amo,
                rows: rows as u32,
                cols: cols as u32,
            },
            l,
        ),
    ];
    let (c, g) = run_both(&gpu, &img, &ops);
    check("swiglu", &read_f32s(&g, so, len), &r::swiglu(&a, &b), 1e-6);
    check("scale", &read_f32s(&g, co, len), &r::scale(&a, 0.37), 1e-7);
    check("add in place", &read_f32s(&g, ao, len), &r::add(&a, &b), 1e-7);
    check(
        "softmax",
        &read_f32s(&g, smout, rows * cols),
        &r::softmax(&sm, cols),
        1e-6,
    );
    assert_eq!(read_u32s(&g, amo, rows), r::argmax(&sm, cols));
    assert_eq!(read_u32s(&g, amo, rows), read_u32s(&c, amo, rows));
    assert_eq!(read_u32s(&g, amo, rows)[..2], [10, 999]);
}

fn f16_vals(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// The normwise error allowed for attention of `n` queries. n >= 32 runs the prefill
/// kernel, by default on tensor cores: q * scale, K and V (exact for an F16 cache) and the
/// softmax weights P are each rounded to f16 once (unit roundoff u = 2^-11, RMS relative
/// error about u / 2.5), every sum in f32. A relative perturbation of V or P moves the
/// weighted mean out = sum p v / sum p by about as much, relative; the scores' error is
/// about u * scale * sqrt(sum (q_d k_d)^2), a fraction of u for these inputs. Together
/// about u; the bound is 4u = 2^-9 (a layout error is O(1)). `SAMEPAGE_CUDA_ATTN=simt`
/// (and the decode kernels) are fp32: 1e-5.
fn attn_tol(n: usize) -> f64 {
    if n >= 32 && std::env::var("SAMEPAGE_CUDA_ATTN").as_deref() != Ok("simt") {
        (2.0f64).powi(-9)
    } else {
        1e-5
    }
}

#[test]
fn kv_store_and_attention() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(4);
    for cache_dt in [DType::F32, DType::F16] {
        // (n, pos, ctx): decode with many splits, decode at 0, a prefill chunk; then
        // prefills through the prefill kernel (n >= 32): rows (query, group head) not a
        // multiple of its 64-row (SIMT: 32-row) blocks, head_dim 64 / 80 / 128 / 256, GQA
        // groups of 1, 2, 4, pos 0 and > 0, the cache ending at pos + n, several K/V
        // tiles. Then the tensor-core kernel's other loaders: head_dim 36 (F16 rows not
        // 16-byte multiples: element loads; F32 through the staging tile) and 50, and a
        // cache `skew` bytes off 16-byte alignment (element loads).
        for (n, pos, ctx, heads, kvh, hd, skew) in [
            (1usize, 300usize, 512usize, 8usize, 2usize, 64usize, false),
            (1, 0, 2048, 4, 4, 128, false),
            // Single-token kernel (attention_dec): several 128-position tiles per split
            // (64 splits), head_dim 80 (threads left idle in the p * V phase) with a merge,
            // and one split of one tile.
            (1, 9000, 9100, 4, 2, 64, false),
            (1, 130, 200, 6, 3, 80, false),
            (1, 127, 128, 8, 8, 256, false),
            (7, 20, 64, 6, 3, 80, false),
            (37, 0, 64, 8, 2, 64, false),
            (70, 25, 95, 6, 6, 128, false),
            (33, 5, 64, 4, 1, 80, false),
            (40, 100, 160, 4, 2, 256, false),
            (100, 200, 512, 32, 8, 64, false),
            (160, 96, 300, 8, 2, 64, false),
            (48, 10, 64, 4, 2, 36, false),
            (35, 3, 40, 2, 1, 50, false),
            (64, 70, 200, 8, 2, 128, true),
        ] {
            let es = cache_dt.block_bytes();
            let skew = if skew { es } else { 0 };
            // An old cache (random), new k/v for positions pos..pos+n, queries.
            let old_k = rng.f32s(kvh * ctx * hd);
            let old_v = rng.f32s(kvh * ctx * hd);
            let (kn, vn, q) = (rng.f32s(n * kvh * hd), rng.f32s(n * kvh * hd), rng.f32s(n * heads * hd));
            let enc = |v: &[f32]| -> Vec<u8> {
                if es == 2 {
                    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
                } else {
                    f32_bytes(v)
                }
            };
            let mut img = Image::default();
            let kc = img.put_skewed(&enc(&old_k), skew);
            let vc = img.put_skewed(&enc(&old_v), skew);
            let ko = img.f32s(&kn);
            let vo = img.f32s(&vn);
            let qo = img.f32s(&q);
            let po = img.u32s(&[pos as u32]);
            let oo = img.out(4 * n * heads * hd);
            let l = img.size();
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
                out: oo,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let (c, g) = run_both(&gpu, &img, &[op(code::KV_STORE, &st, l), op(code::ATTENTION, &at, l)]);
            // The caches must match the CPU's byte for byte.
            let cb = kvh * ctx * hd * es;
            assert!(
                c[kc as usize..kc as usize + cb] == g[kc as usize..kc as usize + cb],
                "k cache"
            );
            assert!(
                c[vc as usize..vc as usize + cb] == g[vc as usize..vc as usize + cb],
                "v cache"
            );
            // Reference on the stored cache (as f32).
            let mut kf = if es == 2 { f16_vals(&old_k) } else { old_k.clone() };
            let mut vf = if es == 2 { f16_vals(&old_v) } else { old_v.clone() };
            for i in 0..n {
                for h in 0..kvh {
                    for d in 0..hd {
                        let src = (i * kvh + h) * hd + d;
                        let dst = (h * ctx + pos + i) * hd + d;
                        kf[dst] = if es == 2 {
                            half::f16::from_f32(kn[src]).to_f32()
                        } else {
                            kn[src]
                        };
                        vf[dst] = if es == 2 {
                            half::f16::from_f32(vn[src]).to_f32()
                        } else {
                            vn[src]
                        };
                    }
                }
            }
            let want = r::attention(&q, &kf, &vf, n, heads, kvh, hd, ctx, pos, at.scale);
            let what = format!(
                "attention {} n={n} pos={pos} ctx={ctx} heads={heads}/{kvh} hd={hd} skew={skew}",
                cache_dt.name()
            );
            check(&what, &read_f32s(&g, oo, n * heads * hd), &want, attn_tol(n));
            check(
                &format!("{what} vs cpu"),
                &read_f32s(&g, oo, n * heads * hd),
                &read_f32s(&c, oo, n * heads * hd),
                attn_tol(n),
            );
        }
    }
}

#[test]
fn sample_matches_the_cpu_draw_for_draw() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(5);
    let vocab = 5000usize;
    let cases = [
        SampleParams::default(),
        SampleParams {
            repeat_penalty: 1.3,
            history_len: 8,
            ..Default::default()
        },
        SampleParams {
            temperature: 0.8,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            top_k: 40,
            ..Default::default()
        },
        SampleParams {
            temperature: 0.7,
            top_p: 0.9,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.2,
            top_k: 100,
            top_p: 0.8,
            min_p: 0.05,
            repeat_penalty: 1.1,
            history_len: 16,
        },
        SampleParams {
            temperature: 2.0,
            top_p: 0.999,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            top_p: 0.0,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            min_p: 0.2,
            ..Default::default()
        },
        // With logits rounded to whole numbers below (many equal values): top-k keeps the
        // smallest ids among the ties at its cut.
        SampleParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 0.9,
            ..Default::default()
        },
    ];
    let history: Vec<u32> = (0..32).map(|_| rng.below(vocab as u32)).collect();
    for (ci, p) in cases.iter().enumerate() {
        let mut same = 0;
        let ties = ci == cases.len() - 1;
        for seed in 0..12u64 {
            let logits: Vec<f32> = (0..vocab)
                .map(|_| rng.f32() * 6.0)
                .map(|x| if ties { x.round() } else { x })
                .collect();
            let mut img = Image::default();
            let d = put_sample(&mut img, &logits, p, &history, seed * 7919 + 3);
            let (ro, oo) = (d.rng, d.out);
            let (c, g) = run_both(&gpu, &img, &[op(code::SAMPLE, &d, img.size())]);
            same += same_draw(&c, &g, ro, oo, vocab, &format!("case {ci} seed {seed} ({p:?})")) as u32;
        }
        // exp() differs in the last ulp between the CPU and the GPU; a draw on a boundary
        // may differ, rarely.
        assert!(same >= 11, "case {ci}: only {same}/12 draws agree ({p:?})");
    }
}

/// Top-k sampling at a temperature over a Llama-3-sized vocabulary runs over the blocks
/// (each block's top-k, then the top-k of their lists in the last block): the same draws
/// as the CPU. With whole-number logits (thousands of equal values at every block's cut)
/// it falls back to the one-block path over the whole vocabulary, with the same result.
#[test]
fn top_k_sample_over_blocks_matches_the_cpu_draw_for_draw() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(9);
    let vocab = 128_256usize + 7;
    let cases = [
        SampleParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            top_k: 64,
            ..Default::default()
        },
        SampleParams {
            temperature: 0.6,
            top_k: 3,
            top_p: 0.5,
            ..Default::default()
        },
        SampleParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 0.9,
            ..Default::default()
        },
    ];
    let cpu = cpu();
    for (ci, p) in cases.iter().enumerate() {
        // One recorded graph per case (the multi-block path needs the graph's counters and
        // scratch); the logits and the rng state rewritten before each launch.
        let mut img = Image::default();
        let d = put_sample(&mut img, &vec![0.0; vocab], p, &[0; 4], 0);
        let (lo, ro, oo) = (d.logits, d.rng, d.out);
        let ops = vec![op(code::SAMPLE, &d, img.size())];
        let (rg, rc) = (load(&gpu, &img), load(&cpu, &img));
        let mut g = gpu.record(ops.clone()).unwrap();
        let mut cg = cpu.record(ops).unwrap();
        let mut same = 0;
        let ties = ci == cases.len() - 1;
        for seed in 0..12u64 {
            let logits: Vec<f32> = (0..vocab)
                .map(|_| rng.f32() * 12.0)
                .map(|x| if ties { x.round() } else { x })
                .collect();
            let state = seed * 104_729 + 11;
            for r in [&rg, &rc] {
                for (i, x) in logits.iter().enumerate() {
                    r.mem().write_u32(lo + 4 * i as u32, x.to_bits()).unwrap();
                }
                r.mem().write_u32(ro, state as u32).unwrap();
                r.mem().write_u32(ro + 4, (state >> 32) as u32).unwrap();
            }
            g.launch(rg.mem()).unwrap();
            g.wait().unwrap();
            cg.launch(rc.mem()).unwrap();
            cg.wait().unwrap();
            let (a, b) = (snapshot(&rg), snapshot(&rc));
            same += same_draw(&b, &a, ro, oo, vocab, &format!("case {ci} seed {seed} ({p:?})")) as u32;
        }
        assert!(same >= 11, "case {ci}: only {same}/12 draws agree ({p:?})");
    }
}

/// One draw of a sample op on the CPU (`c`) and the GPU (`g`) region snapshots: the RNG
/// states at `ro` must be equal and the GPU's token at `oo` inside the vocabulary; whether
/// the tokens agree (a disagreement is printed: `exp` differs in the last ulp between
/// the CPU and the GPU, so a draw on a boundary may differ, rarely).
fn same_draw(c: &[u8], g: &[u8], ro: u32, oo: u32, vocab: usize, what: &str) -> bool {
    let (tc, tg) = (read_u32s(c, oo, 1)[0], read_u32s(g, oo, 1)[0]);
    assert_eq!(
        c[ro as usize..ro as usize + 8],
        g[ro as usize..ro as usize + 8],
        "{what}: rng state"
    );
    assert!((tg as usize) < vocab, "{what}: token {tg} is past the vocabulary");
    if tc != tg {
        println!("{what}: cpu {tc} gpu {tg}");
    }
    tc == tg
}

/// A sample op's tensors put into `img` (logits, parameters, token history, the rng
/// state `seed`, one output word) and its descriptor.
fn put_sample(img: &mut Image, logits: &[f32], p: &SampleParams, history: &[u32], seed: u64) -> abi::Sample {
    abi::Sample {
        logits: img.f32s(logits),
        vocab: logits.len() as u32,
        params: img.put(samepage_abi::pod_bytes(p)),
        history: img.u32s(history),
        history_cap: history.len() as u32,
        rng: img.put(&seed.to_le_bytes()),
        out: img.out(4),
    }
}

/// Greedy sampling over a Llama-3-sized vocabulary runs as several blocks whose maxima the
/// last block merges: the same token as the CPU (the first index among equal maxima, a NaN
/// never chosen), launch after launch of one graph (the merge counter re-arms).
#[test]
fn greedy_sample_over_blocks_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let cpu = cpu();
    let mut rng = Rng::new(77);
    let vocab = 128_256usize + 7;
    let mut img = Image::default();
    let d = put_sample(&mut img, &vec![0.0; vocab], &SampleParams::default(), &[0; 4], 3);
    let (lo, oo) = (d.logits, d.out);
    let ops = vec![op(code::SAMPLE, &d, img.size())];
    let (rg, rc) = (load(&gpu, &img), load(&cpu, &img));
    let mut g = gpu.record(ops.clone()).unwrap();
    let mut cg = cpu.record(ops).unwrap();
    for case in 0..10 {
        let mut l: Vec<f32> = (0..vocab).map(|_| rng.f32() * 6.0 - 3.0).collect();
        match case {
            // Whole numbers: many equal maxima in every block.
            1 => l.iter_mut().for_each(|x| *x = x.round()),
            2 => l[vocab - 1] = 10.0,
            // Equal maxima in two blocks, and NaNs around them.
            3 => {
                l[100_000] = 9.0;
                l[9_000] = 9.0;
                l[8_999] = f32::NAN;
                l[120_000] = f32::NAN;
            }
            4 => l[..60_000].iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
            5 => l.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
            6 => l[0] = 7.0,
            _ => {}
        }
        for r in [&rg, &rc] {
            for (i, x) in l.iter().enumerate() {
                r.mem().write_u32(lo + 4 * i as u32, x.to_bits()).unwrap();
            }
        }
        g.launch(rg.mem()).unwrap();
        g.wait().unwrap();
        cg.launch(rc.mem()).unwrap();
        cg.wait().unwrap();
        let (a, b) = (snapshot(&rg), snapshot(&rc));
        let (tg, tc) = (read_u32s(&a, oo, 1)[0], read_u32s(&b, oo, 1)[0]);
        assert_eq!(tg, tc, "case {case}: gpu token {tg}, cpu {tc}");
    }
}

/// Prefill ops (n > 1: cuBLAS GEMMs with their scratch, the tiled attention) recorded as
/// one CUDA graph by stream capture and replayed at two positions: the same results as
/// the CPU's graph.
#[test]
fn prefill_graph_matches_cpu() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(9);
    let (n, dim, heads, kvh, hd, ctx) = (48usize, 256usize, 8usize, 2usize, 64usize, 128usize);
    let mut img = Image::default();
    let x = rng.f32s(n * dim);
    let (kn, vn, q) = (rng.f32s(n * kvh * hd), rng.f32s(n * kvh * hd), rng.f32s(n * heads * hd));
    let bias = rng.f32s(96);
    let mats = [
        (DType::Q4_K, 96usize, 0usize),
        (DType::BF16, 64, 2),
        (DType::F32, 32, 0),
    ];
    let ws: Vec<Vec<u8>> = mats.iter().map(|&(dt, m, _)| weights(dt, m, dim, &mut rng)).collect();
    let wo: Vec<u32> = ws
        .iter()
        .zip(&mats)
        .map(|(w, &(_, _, sk))| img.put_skewed(w, sk))
        .collect();
    let xo = img.f32s(&x);
    let bo = img.f32s(&bias);
    let (ko, vo, qo) = (img.f32s(&kn), img.f32s(&vn), img.f32s(&q));
    let kc = img.out(2 * kvh * ctx * hd);
    let vc = img.out(2 * kvh * ctx * hd);
    let po = img.u32s(&[0]);
    let ao = img.out(4 * n * heads * hd);
    let oo: Vec<u32> = mats.iter().map(|&(_, m, _)| img.out(4 * n * m)).collect();
    let l = img.size();
    let st = abi::KvStore {
        k: ko,
        v: vo,
        n: n as u32,
        n_kv_heads: kvh as u32,
        head_dim: hd as u32,
        k_cache: kc,
        v_cache: vc,
        cache_dtype: DType::F16 as u32,
        ctx: ctx as u32,
        pos: po,
    };
    let at = abi::Attention {
        q: qo,
        n: n as u32,
        n_heads: heads as u32,
        n_kv_heads: kvh as u32,
        head_dim: hd as u32,
        k_cache: kc,
        v_cache: vc,
        cache_dtype: DType::F16 as u32,
        ctx: ctx as u32,
        pos: po,
        out: ao,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let mut ops = vec![op(code::KV_STORE, &st, l), op(code::ATTENTION, &at, l)];
    for (i, &(dt, m, _)) in mats.iter().enumerate() {
        let d = abi::Matmul {
            w: wo[i],
            dtype: dt as u32,
            m: m as u32,
            k: dim as u32,
            x: xo,
            n: n as u32,
            out: oo[i],
            bias: bo,
            flags: if i == 1 { abi::MATMUL_BIAS } else { 0 },
        };
        ops.push(op(code::MATMUL, &d, l));
    }
    let (rg, rc) = (load(&gpu, &img), load(&cpu(), &img));
    let mut g = gpu.record(ops.clone()).unwrap();
    let mut cg = cpu().record(ops).unwrap();
    for pos in [0u32, 48] {
        for r in [&rg, &rc] {
            r.mem().write_u32(po, pos).unwrap();
        }
        g.launch(rg.mem()).unwrap();
        cg.launch(rc.mem()).unwrap();
        g.wait().unwrap();
        cg.wait().unwrap();
        let (a, b) = (snapshot(&rg), snapshot(&rc));
        let what = format!("prefill graph at pos {pos}");
        check(
            &format!("{what}: attention"),
            &read_f32s(&a, ao, n * heads * hd),
            &read_f32s(&b, ao, n * heads * hd),
            attn_tol(n),
        );
        for (i, &(dt, m, _)) in mats.iter().enumerate() {
            let bias_r = (i == 1).then_some(&bias[..m]);
            let want = r::matmul(dt, &ws[i], m, dim, &x, n, bias_r, None);
            let extra = vec![0.0; n * m];
            check_gemm(
                &format!("{what}: matmul {}", dt.name()),
                &read_f32s(&a, oo[i], n * m),
                &want,
                dt,
                &ws[i],
                (m, dim, n),
                &x,
                bias_r.map(|b| (b, &extra[..])),
            );
        }
    }
}
