//! Decode matvec bandwidth per weight dtype: `cargo run --release --example gemv_bench`.
//! Each shape is timed as a CUDA graph of many matvecs over rotating weight copies
//! (more bytes than the 50 MB L2), so the numbers are HBM reads, not cache hits.
//! Each shape's last output is also checked against the CPU dequantization of 64 rows
//! (`err`: normwise relative error vs f64; quantized matvecs round x to i16, ~1e-5).
//! `GEMV_BENCH_DTYPES=q4_k,q8_0` limits the dtypes; `GEMV_BENCH_STEP=0` skips the decode
//! steps; `SAMEPAGE_CUDA_QMV_BLOCKS` sets the quantized matvec's target block count.
use std::time::Instant;

use samepage_abi::{self as abi, hint, op as code, pod_bytes, DType};
use samepage_backend::{Backend, Op};
use samepage_backend_cuda::{copy_calls, CudaBackend};

const PEAK: f64 = 3.0e12;

fn main() {
    let gpu = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    println!("device: {}", gpu.device_name());
    let shapes = [(2048usize, 8192usize), (8192, 2048), (2048, 2048), (128256, 2048)];
    let only = std::env::var("GEMV_BENCH_DTYPES").ok();
    let wanted = |dt: DType| only.as_deref().is_none_or(|l| l.split(',').any(|n| n == dt.name()));
    let mut rows = Vec::new();
    let mut bad = 0;
    for dt in DType::WEIGHTS.into_iter().filter(|&dt| wanted(dt)) {
        for &(m, k) in &shapes {
            let rb = dt.row_bytes(k).unwrap();
            let wbytes = m * rb;
            let copies = (400_000_000 / wbytes).clamp(2, 64);
            let wspan = wbytes.div_ceil(256) * 256;
            let xo = copies * wspan;
            let oo = xo + 4 * k;
            let size = (oo + 4 * m).div_ceil(4096) * 4096;
            let region = gpu.new_region(size, size).unwrap();
            // Random bytes with sane f16 scales would matter for values, not for speed;
            // fill with a pattern that decodes to small finite numbers.
            // SAFETY: the region holds `size` bytes.
            let mem = unsafe { std::slice::from_raw_parts_mut(region.base(), size) };
            for (i, b) in mem.iter_mut().enumerate() {
                *b = ((i * 2654435761) >> 13) as u8 & 0x3b;
            }
            // x: uniform in [-1, 1) (a checkable activation; the pattern decodes to tiny floats).
            let mut seed = 0x9e3779b97f4a7c15u64;
            let x: Vec<f32> = (0..k)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect();
            for (i, v) in x.iter().enumerate() {
                mem[xo + 4 * i..xo + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
            region.hint(0, size, hint::WEIGHTS);
            let reps = (copies * 4).max(32);
            let ops: Vec<Op> = (0..reps)
                .map(|i| {
                    let d = abi::Matmul {
                        w: ((i % copies) * wspan) as u32,
                        dtype: dt as u32,
                        m: m as u32,
                        k: k as u32,
                        x: xo as u32,
                        n: 1,
                        out: oo as u32,
                        bias: 0,
                        flags: 0,
                    };
                    Op::decode(code::MATMUL, pod_bytes(&d), size).unwrap()
                })
                .collect();
            let mut g = gpu.record(ops).unwrap();
            for _ in 0..3 {
                g.launch(region.mem()).unwrap();
                g.wait().unwrap();
            }
            let mut times = Vec::new();
            for _ in 0..10 {
                let t = Instant::now();
                g.launch(region.mem()).unwrap();
                g.wait().unwrap();
                times.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            let gbs = wbytes as f64 / t / 1e9;
            // The last matvec read copy (reps - 1) % copies; check 64 of its rows.
            // SAFETY: the region holds `size` bytes; the graph has finished.
            let mem = unsafe { std::slice::from_raw_parts(region.base(), size) };
            let w0 = ((reps - 1) % copies) * wspan;
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for i in 0..64 {
                let r = i * (m - 1) / 63;
                let wr = samepage_backend_cpu::reference::dequant(dt, &mem[w0 + r * rb..w0 + (r + 1) * rb], 1, k);
                let want: f64 = wr.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let got = f32::from_le_bytes(mem[oo + 4 * r..oo + 4 * r + 4].try_into().unwrap()) as f64;
                num += (got - want) * (got - want);
                den += want * want;
            }
            let err = (num / den.max(f64::MIN_POSITIVE)).sqrt();
            let tol = if dt.block_elems() == 1 { 1e-5 } else { 1e-4 };
            if err.is_nan() || err > tol {
                bad += 1;
            }
            rows.push(format!(
                "| {:5} | {:>6} x {:>5} | {:>8.1} | {:>8.2} | {:>7.0} | {:>5.1}% | {:.1e}{} |",
                dt.name(),
                m,
                k,
                wbytes as f64 / 1e6,
                t * 1e6,
                gbs,
                100.0 * gbs * 1e9 / PEAK,
                err,
                if err.is_nan() || err > tol { " BAD" } else { "" }
            ));
            eprintln!("{}", rows.last().unwrap());
        }
    }
    println!("| dtype | m x k            | MB       | us       | GB/s    | of 3.0 TB/s | err |");
    println!("|-------|------------------|----------|----------|---------|-------|-----|");
    for r in rows {
        println!("{r}");
    }
    println!("copy calls: {}", copy_calls());
    if bad > 0 {
        println!("CHECK FAILED: {bad} shape(s) with a wrong result (BAD above)");
    }
    if std::env::var("GEMV_BENCH_STEP").as_deref() == Ok("0") {
        return;
    }
    println!();
    println!("Llama-3.2-1B-shaped decode step (16 layers, dim 2048, ffn 8192, 32/8 heads, vocab 128256, tied), pos 448, f16 KV:");
    println!("| weights | GB     | ms/token | tok/s  | GB/s  | floor (3.0 TB/s) |");
    println!("|---------|--------|----------|--------|-------|------------------|");
    for dt in [DType::BF16, DType::Q8_0, DType::Q4_K, DType::Q6_K] {
        decode_step(&gpu, dt, true);
    }
    // The same with the per-token page left device-resident (no HOST hint): the cost of
    // kernels reading `pos` and the token id across the bus.
    decode_step(&gpu, DType::BF16, false);
    println!("copy calls: {}", copy_calls());
}

/// One token of a Llama-3.2-1B-shaped model as a recorded graph, replayed.
fn decode_step(gpu: &CudaBackend, dt: DType, host_hint: bool) {
    let (dim, ffn, heads, kvh, hd, vocab, layers, ctx) = (
        2048usize,
        8192usize,
        32usize,
        8usize,
        64usize,
        128256usize,
        16usize,
        512usize,
    );
    let at = std::cell::Cell::new(4096usize);
    let alloc = |bytes: usize| {
        let o = at.get();
        at.set((o + bytes).div_ceil(256) * 256);
        o as u32
    };
    let wb = |m: usize, k: usize| m * dt.row_bytes(k).unwrap();
    let emb = alloc(wb(vocab, dim));
    let mut wbytes = wb(vocab, dim);
    struct L {
        wq: u32,
        wk: u32,
        wv: u32,
        wo: u32,
        wg: u32,
        wu: u32,
        wd: u32,
        kc: u32,
        vc: u32,
    }
    let ls: Vec<L> = (0..layers)
        .map(|_| {
            wbytes += wb(dim, dim) * 2 + wb(kvh * hd, dim) * 2 + wb(ffn, dim) * 2 + wb(dim, ffn);
            L {
                wq: alloc(wb(heads * hd, dim)),
                wk: alloc(wb(kvh * hd, dim)),
                wv: alloc(wb(kvh * hd, dim)),
                wo: alloc(wb(dim, heads * hd)),
                wg: alloc(wb(ffn, dim)),
                wu: alloc(wb(ffn, dim)),
                wd: alloc(wb(dim, ffn)),
                kc: alloc(kvh * ctx * hd * 2),
                vc: alloc(kvh * ctx * hd * 2),
            }
        })
        .collect();
    let weights_end = at.get();
    let norm = alloc(4 * dim);
    let (x, h, q, k, v, att, g, u, logits) = (
        alloc(4 * dim),
        alloc(4 * dim),
        alloc(4 * dim),
        alloc(4 * kvh * hd),
        alloc(4 * kvh * hd),
        alloc(4 * dim),
        alloc(4 * ffn),
        alloc(4 * ffn),
        alloc(4 * vocab),
    );
    let host = alloc(4096);
    let (tok, pos, next) = (host, host + 4, host + 8);
    let size = at.get().div_ceil(4096) * 4096;
    let region = gpu.new_region(size, size).unwrap();
    // SAFETY: the region holds `size` bytes.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.base(), size) };
    for (i, b) in mem[..weights_end].iter_mut().enumerate() {
        *b = ((i * 2654435761) >> 13) as u8 & 0x3b;
    }
    for i in 0..dim {
        mem[norm as usize + 4 * i..norm as usize + 4 * i + 4].copy_from_slice(&1.0f32.to_le_bytes());
    }
    region.hint(0, weights_end, hint::WEIGHTS);
    region.hint(weights_end, host as usize - weights_end, hint::DEVICE);
    if host_hint {
        region.hint(host as usize, 4096, hint::HOST);
    }
    region.mem().write_u32(tok, 7).unwrap();
    region.mem().write_u32(pos, 448).unwrap();
    let o = |c: u32, b: &[u8]| Op::decode(c, b, size).unwrap();
    let mm = |w: u32, m: usize, kk: usize, xi: u32, out: u32, flags: u32| {
        o(
            code::MATMUL,
            pod_bytes(&abi::Matmul {
                w,
                dtype: dt as u32,
                m: m as u32,
                k: kk as u32,
                x: xi,
                n: 1,
                out,
                bias: 0,
                flags,
            }),
        )
    };
    let rms = |xi: u32, out: u32| {
        o(
            code::RMSNORM,
            pod_bytes(&abi::RmsNorm {
                x: xi,
                weight: norm,
                out,
                n: 1,
                dim: dim as u32,
                eps: 1e-5,
            }),
        )
    };
    let rope = |xi: u32, nh: usize| {
        o(
            code::ROPE,
            pod_bytes(&abi::Rope {
                x: xi,
                n: 1,
                n_heads: nh as u32,
                head_dim: hd as u32,
                n_rot: hd as u32,
                mode: abi::ROPE_HALF,
                positions: pos,
                freq_base: 500000.0,
                scaling_factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192,
            }),
        )
    };
    let mut ops = vec![o(
        code::EMBED,
        pod_bytes(&abi::Embed {
            table: emb,
            dtype: dt as u32,
            vocab: vocab as u32,
            dim: dim as u32,
            ids: tok,
            n: 1,
            out: x,
        }),
    )];
    for l in &ls {
        ops.push(rms(x, h));
        ops.push(mm(l.wq, heads * hd, dim, h, q, 0));
        ops.push(mm(l.wk, kvh * hd, dim, h, k, 0));
        ops.push(mm(l.wv, kvh * hd, dim, h, v, 0));
        ops.push(rope(q, heads));
        ops.push(rope(k, kvh));
        ops.push(o(
            code::KV_STORE,
            pod_bytes(&abi::KvStore {
                k,
                v,
                n: 1,
                n_kv_heads: kvh as u32,
                head_dim: hd as u32,
                k_cache: l.kc,
                v_cache: l.vc,
                cache_dtype: DType::F16 as u32,
                ctx: ctx as u32,
                pos,
            }),
        ));
        ops.push(o(
            code::ATTENTION,
            pod_bytes(&abi::Attention {
                q,
                n: 1,
                n_heads: heads as u32,
                n_kv_heads: kvh as u32,
                head_dim: hd as u32,
                k_cache: l.kc,
                v_cache: l.vc,
                cache_dtype: DType::F16 as u32,
                ctx: ctx as u32,
                pos,
                out: att,
                scale: 0.125,
            }),
        ));
        ops.push(mm(l.wo, dim, heads * hd, att, x, abi::MATMUL_ACCUMULATE));
        ops.push(rms(x, h));
        ops.push(mm(l.wg, ffn, dim, h, g, 0));
        ops.push(mm(l.wu, ffn, dim, h, u, 0));
        ops.push(o(
            code::SWIGLU,
            pod_bytes(&abi::SwiGlu {
                gate: g,
                up: u,
                out: g,
                len: ffn as u32,
            }),
        ));
        ops.push(mm(l.wd, dim, ffn, g, x, abi::MATMUL_ACCUMULATE));
    }
    ops.push(rms(x, h));
    ops.push(mm(emb, vocab, dim, h, logits, 0));
    ops.push(o(
        code::ARGMAX,
        pod_bytes(&abi::Argmax {
            x: logits,
            out: next,
            rows: 1,
            cols: vocab as u32,
        }),
    ));
    let nops = ops.len();
    let mut graph = gpu.record(ops).unwrap();
    for _ in 0..5 {
        graph.launch(region.mem()).unwrap();
        graph.wait().unwrap();
    }
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        graph.launch(region.mem()).unwrap();
        graph.wait().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let t = times[times.len() / 2];
    let gb = wbytes as f64 / 1e9;
    println!(
        "| {:7} | {:6.3} | {:8.3} | {:6.0} | {:5.0} | {:.3} ms ({:.0}%) |  ({nops} ops{})",
        dt.name(),
        gb,
        t * 1e3,
        1.0 / t,
        gb / t,
        gb / 3.0,
        100.0 * (gb / 3.0) / (t * 1e3),
        if host_hint { "" } else { ", no HOST hint" }
    );
}
