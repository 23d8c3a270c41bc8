//! Bad input never reaches a kernel; a bad per-token value is refused by the kernel
//! without writing; the context works afterwards.
use samepage_abi::{self as abi, op as code, pod_bytes, status, DType};
use samepage_backend::{Backend, Op};

use crate::*;

#[test]
fn invalid_descriptors_then_runtime_errors_then_a_valid_graph() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(6);
    let (kvh, heads, hd, ctx) = (2usize, 4usize, 64usize, 128usize);
    let mut img = Image::default();
    let kc = img.f32s(&rng.f32s(kvh * ctx * hd));
    let vc = img.f32s(&rng.f32s(kvh * ctx * hd));
    let ko = img.f32s(&rng.f32s(kvh * hd));
    let vo = img.f32s(&rng.f32s(kvh * hd));
    let qo = img.f32s(&rng.f32s(heads * hd));
    let po = img.u32s(&[0]);
    let oo = img.out(4 * heads * hd);
    let table = img.f32s(&rng.f32s(10 * 64));
    let ids = img.u32s(&[3]);
    let eo = img.out(4 * 64);
    let len = img.size();
    let region = load(&gpu, &img);

    // 1. Random and hostile descriptors: every one is refused by validation.
    let st = abi::KvStore {
        k: ko,
        v: vo,
        n: 1,
        n_kv_heads: kvh as u32,
        head_dim: hd as u32,
        k_cache: kc,
        v_cache: vc,
        cache_dtype: DType::F32 as u32,
        ctx: ctx as u32,
        pos: po,
    };
    let bad = [
        abi::KvStore {
            k_cache: len as u32 - 8,
            ..st
        },
        abi::KvStore { ctx: u32::MAX, ..st },
        abi::KvStore { n: 0, ..st },
        abi::KvStore { cache_dtype: 99, ..st },
        abi::KvStore { k_cache: vc, ..st },
        abi::KvStore {
            pos: u32::MAX - 1,
            ..st
        },
    ];
    for b in bad {
        assert!(
            Op::decode(code::KV_STORE, pod_bytes(&b), len).is_err(),
            "{b:?} was accepted"
        );
    }
    let mut refused = 0;
    for _ in 0..2000 {
        let code = 1 + rng.below(13);
        let n = abi::descriptor_len(code).unwrap_or(16);
        let words: Vec<u8> = (0..n / 4)
            .flat_map(|_| {
                match rng.below(4) {
                    0 => rng.u64() as u32,
                    1 => rng.below(len as u32 + 64),
                    2 => rng.below(16),
                    _ => u32::MAX - rng.below(4),
                }
                .to_le_bytes()
            })
            .collect();
        match Op::decode(code, &words, len) {
            Err(_) => refused += 1,
            Ok(op) => {
                // A descriptor that happens to be valid is safe to run: it stays in bounds.
                let _ = gpu.run(region.mem(), &[op]);
            }
        }
    }
    println!("{refused}/2000 random descriptors refused");

    // 2. A recorded graph whose position runs past the cache: refused by the kernels,
    //    nothing written.
    let at = abi::Attention {
        q: qo,
        n: 1,
        n_heads: heads as u32,
        n_kv_heads: kvh as u32,
        head_dim: hd as u32,
        k_cache: kc,
        v_cache: vc,
        cache_dtype: DType::F32 as u32,
        ctx: ctx as u32,
        pos: po,
        out: oo,
        scale: 0.125,
    };
    let mut g = gpu
        .record(vec![op(code::KV_STORE, &st, len), op(code::ATTENTION, &at, len)])
        .unwrap();
    let before = snapshot(&region);
    for bad_pos in [ctx as u32, ctx as u32 + 5, u32::MAX] {
        region.mem().write_u32(po, bad_pos).unwrap();
        g.launch(region.mem()).unwrap();
        let e = g.wait().unwrap_err();
        assert_eq!(e.status, status::RUNTIME, "{e}");
        println!("pos {bad_pos}: {e}");
        let mut after = snapshot(&region);
        after[po as usize..po as usize + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(after == before, "a refused op wrote memory");
    }
    // A bad token id: embed refuses, writes nothing.
    region.mem().write_u32(ids, 10).unwrap();
    let e = gpu
        .run(
            region.mem(),
            &[op(
                code::EMBED,
                &abi::Embed {
                    table,
                    dtype: DType::F32 as u32,
                    vocab: 10,
                    dim: 64,
                    ids,
                    n: 1,
                    out: eo,
                },
                len,
            )],
        )
        .unwrap_err();
    assert_eq!(e.status, status::RUNTIME, "{e}");
    assert!(
        read_u32s(&snapshot(&region), eo, 64).iter().all(|&v| v == u32::MAX),
        "embed wrote on a bad id"
    );

    // 3. The context still works: the same graph at a good position matches the CPU.
    region.mem().write_u32(po, 77).unwrap();
    g.launch(region.mem()).unwrap();
    g.wait().expect("valid graph after errors");
    let gpu_out = read_f32s(&snapshot(&region), oo, heads * hd);
    let cpu = cpu();
    let rc = cpu.new_region(region.size(), region.size()).unwrap();
    let snap = before.clone();
    // SAFETY: same size.
    unsafe { std::ptr::copy_nonoverlapping(snap.as_ptr(), rc.base(), snap.len()) };
    rc.mem().write_u32(po, 77).unwrap();
    cpu.run(rc.mem(), g.ops()).unwrap();
    let e = samepage_backend_cpu::reference::rel_err(&gpu_out, &read_f32s(&snapshot(&rc), oo, heads * hd));
    assert!(e < 1e-5, "after errors: rel err {e}");
}
