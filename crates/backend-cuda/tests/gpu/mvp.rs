//! Matvec steps of a decode graph: the pipelined decode matvec (`mvp` in cu/mvp.cu),
//! which the graph uses for f16/bf16 and quantized single-token matvecs with the rmsnorm
//! before them and a gate/up swiglu after them fused, and the quantized groups
//! (`gemv_quant`, for what the pipelined kernel does not take: rows that are not 16-byte
//! multiples, small matrices, dtype mixes it has no kernel or stage split for) with the
//! rmsnorm fused into their x (`quantize_x`): every output (the matvecs', the rmsnorm's,
//! the swiglu's) must match the CPU running the same ops one by one, at Llama-like
//! shapes (many pipeline stages per block, rows split into parts, pairs, bias and
//! accumulation) and odd ones.
use samepage_abi::{self as abi, hint, op as code, DType};
use samepage_backend::Backend;

use crate::conformance::weights;
use crate::*;

struct Case {
    name: &'static str,
    dt: DType,
    k: usize,
    /// Rows of each matvec (1-3); with `pair`, gate and up.
    ms: &'static [usize],
    norm: bool,
    pair: bool,
    flags: u32,
    /// The last matrix's dtype, where it differs (Q4_K_M's q/k/v).
    last_dt: Option<DType>,
    /// Recorded as one pipelined launch (`mvp`) on sm_90 (else the quantized group path:
    /// rows that are not 16-byte multiples, fewer than 64 stages, a stage that would
    /// hold two dtypes).
    piped: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "rmsnorm + q/k/v, q8_0, k 2048 (rmsnorm fused into the quantized x)",
        dt: DType::Q8_0,
        k: 2048,
        ms: &[2048, 512, 512],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + gate/up + swiglu, q4_K, k 2048",
        dt: DType::Q4_K,
        k: 2048,
        ms: &[8192, 8192],
        norm: true,
        pair: true,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "gate/up + swiglu, q8_0, k 2048",
        dt: DType::Q8_0,
        k: 2048,
        ms: &[8192, 8192],
        norm: false,
        pair: true,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + output, q6_K, k 2048, 40000 rows",
        dt: DType::Q6_K,
        k: 2048,
        ms: &[40000],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "output, q8_0, k 2048, 40000 rows, accumulated",
        dt: DType::Q8_0,
        k: 2048,
        ms: &[40000],
        norm: false,
        pair: false,
        flags: abi::MATMUL_ACCUMULATE,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + output, q6_K, k 1536 (1260-byte rows: the quantized group)",
        dt: DType::Q6_K,
        k: 1536,
        ms: &[1000],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: None,
        piped: false,
    },
    Case {
        name: "rmsnorm + q/k/v, bf16, k 2048",
        dt: DType::BF16,
        k: 2048,
        ms: &[2048, 512, 512],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + gate/up + swiglu, bf16, k 2048",
        dt: DType::BF16,
        k: 2048,
        ms: &[8192, 8192],
        norm: true,
        pair: true,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "down += , f16, k 8192 (4 parts a row)",
        dt: DType::F16,
        k: 8192,
        ms: &[2048],
        norm: false,
        pair: false,
        flags: abi::MATMUL_ACCUMULATE,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + output with bias, f16, k 1536, 1000 rows",
        dt: DType::F16,
        k: 1536,
        ms: &[1000],
        norm: true,
        pair: false,
        flags: abi::MATMUL_BIAS,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + gate/up + swiglu, bf16, k 4096 (2 parts), 300 rows",
        dt: DType::BF16,
        k: 4096,
        ms: &[300, 300],
        norm: true,
        pair: true,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm over 8192 (4 parts) + 2 matvecs, bf16, 70 and 3 rows",
        dt: DType::BF16,
        k: 8192,
        ms: &[70, 3],
        norm: true,
        pair: false,
        flags: abi::MATMUL_ACCUMULATE | abi::MATMUL_BIAS,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + q/k (q4_K) + v (q6_K), k 2048 (two dtypes in one launch)",
        dt: DType::Q4_K,
        k: 2048,
        ms: &[2048, 512, 512],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: Some(DType::Q6_K),
        piped: true,
    },
    Case {
        name: "q/k (q5_K) + v (q6_K), k 2048, bias (two dtypes in one launch)",
        dt: DType::Q5_K,
        k: 2048,
        ms: &[2048, 256, 256],
        norm: false,
        pair: false,
        flags: abi::MATMUL_BIAS,
        last_dt: Some(DType::Q6_K),
        piped: true,
    },
    Case {
        name: "rmsnorm + q/k (q4_K) + v (q6_K), 2040 + 512 + 512 rows (a stage would hold both dtypes: split in two)",
        dt: DType::Q4_K,
        k: 2048,
        ms: &[2040, 512, 512],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: Some(DType::Q6_K),
        piped: false,
    },
    Case {
        name: "down +=, bf16, k 8192 (4 parts a row)",
        dt: DType::BF16,
        k: 8192,
        ms: &[2048],
        norm: false,
        pair: false,
        flags: abi::MATMUL_ACCUMULATE,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "down +=, q4_K, k 8192 (2 parts a row)",
        dt: DType::Q4_K,
        k: 8192,
        ms: &[2048],
        norm: false,
        pair: false,
        flags: abi::MATMUL_ACCUMULATE,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "down +=, q8_0 with bias, k 8192 (4 parts a row), 300 rows",
        dt: DType::Q8_0,
        k: 8192,
        ms: &[300],
        norm: false,
        pair: false,
        flags: abi::MATMUL_ACCUMULATE | abi::MATMUL_BIAS,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + gate/up + swiglu, q5_K, k 2048, 1000 rows",
        dt: DType::Q5_K,
        k: 2048,
        ms: &[1000, 1000],
        norm: true,
        pair: true,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "rmsnorm + q/k/v, q4_1, k 1024",
        dt: DType::Q4_1,
        k: 1024,
        ms: &[1024, 256, 256],
        norm: true,
        pair: false,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "gate/up + swiglu, q4_0, k 2048, 600 rows",
        dt: DType::Q4_0,
        k: 2048,
        ms: &[600, 600],
        norm: false,
        pair: true,
        flags: 0,
        last_dt: None,
        piped: true,
    },
    Case {
        name: "output, q5_0, k 2048, 3000 rows",
        dt: DType::Q5_0,
        k: 2048,
        ms: &[3000],
        norm: false,
        pair: false,
        flags: 0,
        last_dt: None,
        piped: true,
    },
];

#[test]
fn pipelined_matvec_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    for (ci, case) in CASES.iter().enumerate() {
        let mut rng = Rng::new(40 + ci as u64);
        let k = case.k;
        let mut img = Image::default();
        let x = img.f32s(&rng.f32s(k));
        let nw = img.f32s(&rng.f32s(k).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
        let xn = img.out(4 * k);
        let mut mats = Vec::new();
        for (i, &m) in case.ms.iter().enumerate() {
            let dt = match case.last_dt {
                Some(d) if i + 1 == case.ms.len() => d,
                _ => case.dt,
            };
            let w = img.put(&weights(dt, m, k, &mut rng));
            let bias = img.f32s(&rng.f32s(m));
            // Accumulating outputs start from values; others from NaN (unwritten shows).
            let out = if case.flags & abi::MATMUL_ACCUMULATE != 0 {
                img.f32s(&rng.f32s(m))
            } else {
                img.out(4 * m)
            };
            mats.push((w, dt, m, bias, out));
        }
        let l = img.size();
        let mut ops = Vec::new();
        if case.norm {
            let r = abi::RmsNorm {
                x,
                weight: nw,
                out: xn,
                n: 1,
                dim: k as u32,
                eps: 1e-5,
            };
            ops.push(op(code::RMSNORM, &r, l));
        }
        for &(w, dt, m, bias, out) in &mats {
            let mm = abi::Matmul {
                w,
                dtype: dt as u32,
                m: m as u32,
                k: k as u32,
                x: if case.norm { xn } else { x },
                n: 1,
                out,
                bias,
                flags: case.flags,
            };
            ops.push(op(code::MATMUL, &mm, l));
        }
        if case.pair {
            // In place over gate's output, as the guest does.
            let s = abi::SwiGlu {
                gate: mats[0].4,
                up: mats[1].4,
                out: mats[0].4,
                len: case.ms[0] as u32,
            };
            ops.push(op(code::SWIGLU, &s, l));
        }
        let rg = load(&gpu, &img);
        rg.hint(0, l, hint::DEVICE);
        let cpu = cpu();
        let rc = load(&cpu, &img);
        let before = samepage_backend_cuda::pipelined_matvecs();
        let mut g = gpu.record(ops.clone()).unwrap();
        let mut cg = cpu.record(ops).unwrap();
        // Twice: a replay must give the same (accumulating outputs grow twice on both).
        for _ in 0..2 {
            g.launch(rg.mem()).unwrap();
            g.wait().unwrap();
            cg.launch(rc.mem()).unwrap();
            cg.wait().unwrap();
        }
        if case.piped && gpu.has_pipelined_matvec() {
            // Recorded as one pipelined launch (other tests running alongside may add more).
            assert!(
                samepage_backend_cuda::pipelined_matvecs() > before,
                "{}: the pipelined matvec did not run",
                case.name
            );
        }
        let (a, b) = (snapshot(&rg), snapshot(&rc));
        let check = |what: &str, at: u32, n: usize| {
            let (ga, cb) = (read_f32s(&a, at, n), read_f32s(&b, at, n));
            assert!(
                ga.iter().all(|v| v.is_finite()),
                "{}: {what} has unwritten or non-finite values",
                case.name
            );
            let e = samepage_backend_cpu::reference::rel_err(&ga, &cb);
            println!("{}: {what} rel err vs cpu {e:.2e}", case.name);
            assert!(e < 1e-4, "{}: {what} differs from the CPU by {e:.2e}", case.name);
        };
        if case.norm {
            check("rmsnorm out", xn, k);
        }
        for (i, &(_, _, m, _, out)) in mats.iter().enumerate() {
            check(&format!("matvec {i} out"), out, m);
        }
    }
}
