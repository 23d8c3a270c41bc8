//! Matvec / matmul throughput of the CPU backend, as a table (not a timed test).
//!
//! `cargo run -p samepage-backend-cpu --example matvec_bench [-- DTYPE...]`
//!
//! Decode (n = 1): GB/s of weights read, for W of 8192x2048 and 2048x8192, at 1 and 2
//! threads. Prefill (n = 128): GFLOP/s (2 m k n per matmul). Then microseconds per
//! decode matmul at a small model's shapes (SmolLM2-135M: dim 576, ffn 1536, kv 192),
//! weights cycled through copies larger than the L3 as in a real forward pass.
use std::time::{Duration, Instant};

use samepage_abi::{self as abi, op, pod_bytes, DType};
use samepage_backend::{Backend, Op, Region};
use samepage_backend_cpu::{CpuBackend, CpuRegion, Isa};

/// Weight copies per shape: together several times the 32 MiB L3.
const COPIES_BYTES: usize = 256 << 20;
const REGION: usize = COPIES_BYTES + (64 << 20) + (80 << 20);

fn random_weights(seed: &mut u64, dt: DType, m: usize, k: usize) -> Vec<u8> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let n = dt.row_bytes(k).unwrap() * m;
    let mut w: Vec<u8> = (0..n).map(|_| next() as u8).collect();
    match dt {
        DType::F32 | DType::F16 | DType::BF16 => {
            // Small finite values: clear the top exponent bits.
            let step = dt.block_bytes();
            for c in w.chunks_exact_mut(step) {
                c[step - 1] &= 0x3F;
            }
        }
        _ => {
            let offs: &[usize] = match dt {
                DType::Q4_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
                DType::Q6_K => &[208],
                _ => &[0],
            };
            for blk in w.chunks_exact_mut(dt.block_bytes()) {
                for &o in offs {
                    blk[o..o + 2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                }
            }
        }
    }
    w
}

/// Median seconds per op, over at least `min_time`, cycling through `ops` (copies of
/// the weights larger than the last-level cache together, so each op reads DRAM).
fn time(b: &CpuBackend, region: &CpuRegion, ops: &[Op], min_time: Duration) -> f64 {
    for op in ops {
        b.run(region.mem(), &[*op]).unwrap();
    }
    let mut ts = Vec::new();
    let start = Instant::now();
    while start.elapsed() < min_time || ts.len() < 5 {
        let op = ops[ts.len() % ops.len()];
        let t = Instant::now();
        b.run(region.mem(), &[op]).unwrap();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).collect();
    let dtypes: Vec<DType> = [
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ]
    .into_iter()
    .filter(|d| filter.is_empty() || filter.iter().any(|f| f.eq_ignore_ascii_case(d.name())))
    .collect();
    let isa = Isa::detect();
    let backends = [CpuBackend::with_config(1, isa), CpuBackend::with_config(2, isa)];
    let region = CpuRegion::new(REGION, REGION, 1 << 20).unwrap();
    let mut seed = 0x1234_5678_9ABC_DEF1u64;
    println!(
        "samepage CPU backend, isa {}; decode: GB/s of weights read; prefill n=128: GFLOP/s",
        isa.name()
    );
    println!(
        "{:<6} | {:>10} {:>10} | {:>10} {:>10} | {:>9} {:>9}",
        "dtype", "8192x2048", "", "2048x8192", "", "prefill", ""
    );
    println!(
        "{:<6} | {:>10} {:>10} | {:>10} {:>10} | {:>9} {:>9}",
        "", "1 thr", "2 thr", "1 thr", "2 thr", "1 thr", "2 thr"
    );
    for dt in dtypes {
        let mut row = format!("{:<6} |", dt.name());
        let mut prefill = String::new();
        for (si, (m, k)) in [(8192usize, 2048usize), (2048, 8192)].into_iter().enumerate() {
            let w = random_weights(&mut seed, dt, m, k);
            let base = region.base();
            let stride = w.len().div_ceil(4096) * 4096;
            let copies = (COPIES_BYTES / stride).max(2);
            for c in 0..copies {
                // SAFETY: inside the region; the copies and the tensors below are disjoint.
                unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), base.add(c * stride), w.len()) };
            }
            let n_max = 128;
            let x_off = (copies * stride) as u32;
            let out_off = x_off + (4 * n_max * k) as u32;
            let xs: Vec<f32> = (0..n_max * k)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                .collect();
            // SAFETY: inside the region.
            unsafe { std::ptr::copy_nonoverlapping(xs.as_ptr() as *const u8, base.add(x_off as usize), 4 * xs.len()) };
            for n in [1usize, n_max] {
                if n > 1 && si > 0 {
                    continue;
                }
                let d = abi::Matmul {
                    w: 0,
                    dtype: dt as u32,
                    m: m as u32,
                    k: k as u32,
                    x: x_off,
                    n: n as u32,
                    out: out_off,
                    bias: 0,
                    flags: 0,
                };
                let ops: Vec<Op> = (0..if n == 1 { copies } else { 1 })
                    .map(|c| {
                        let d = abi::Matmul {
                            w: (c * stride) as u32,
                            ..d
                        };
                        Op::decode(op::MATMUL, pod_bytes(&d), region.size()).unwrap()
                    })
                    .collect();
                for b in &backends {
                    let min = if n == 1 {
                        Duration::from_millis(300)
                    } else {
                        Duration::from_millis(600)
                    };
                    let t = time(b, &region, &ops, min);
                    if n == 1 {
                        row += &format!(" {:>10.1}", w.len() as f64 / t / 1e9);
                    } else {
                        prefill += &format!(" {:>9.1}", 2.0 * (m * k * n) as f64 / t / 1e9);
                    }
                }
                if n == 1 {
                    row += " |";
                }
            }
        }
        println!("{row}{prefill}");
    }

    small_shapes(&backends, &region, &mut seed, &filter);
}

/// Microseconds per decode (n = 1) matmul at small shapes, 1 and 2 threads.
fn small_shapes(backends: &[CpuBackend], region: &CpuRegion, seed: &mut u64, filter: &[String]) {
    let shapes = [(192usize, 576usize), (576, 576), (1536, 576), (576, 1536), (8192, 576)];
    println!();
    println!("decode us/op at small shapes (m x k), 1 thr / 2 thr");
    let mut head = format!("{:<6} |", "dtype");
    for (m, k) in shapes {
        head += &format!(" {:>15} |", format!("{m}x{k}"));
    }
    println!("{head}");
    for dt in [DType::Q4_1, DType::Q8_0, DType::F32] {
        if !(filter.is_empty() || filter.iter().any(|f| f.eq_ignore_ascii_case(dt.name()))) {
            continue;
        }
        let mut row = format!("{:<6} |", dt.name());
        for (m, k) in shapes {
            let w = random_weights(seed, dt, m, k);
            let base = region.base();
            let stride = w.len().div_ceil(4096) * 4096;
            let copies = (COPIES_BYTES / 4 / stride).max(2);
            for c in 0..copies {
                // SAFETY: inside the region; the copies and the tensors below are disjoint.
                unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), base.add(c * stride), w.len()) };
            }
            let x_off = (copies * stride) as u32;
            let out_off = x_off + (4 * k) as u32;
            let xs: Vec<f32> = (0..k).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            // SAFETY: inside the region.
            unsafe { std::ptr::copy_nonoverlapping(xs.as_ptr() as *const u8, base.add(x_off as usize), 4 * k) };
            let ops: Vec<Op> = (0..copies)
                .map(|c| {
                    let d = abi::Matmul {
                        w: (c * stride) as u32,
                        dtype: dt as u32,
                        m: m as u32,
                        k: k as u32,
                        x: x_off,
                        n: 1,
                        out: out_off,
                        bias: 0,
                        flags: 0,
                    };
                    Op::decode(op::MATMUL, pod_bytes(&d), region.size()).unwrap()
                })
                .collect();
            let t: Vec<f64> = backends
                .iter()
                .map(|b| time(b, region, &ops, Duration::from_millis(200)) * 1e6)
                .collect();
            row += &format!(" {:>7.1} {:>7.1} |", t[0], t[1]);
        }
        println!("{row}");
    }
}
