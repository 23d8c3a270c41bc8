//! Bad input never panics the host, never traps the guest, and always gets a status and a
//! reason: from inside a Rust guest (testops), from hand-written modules, and from a
//! seeded fuzz loop over descriptors and the graph state machine.
use samepage_abi::{self as abi, op, status};
use samepage_runtime::{HostConfig, Instance, Runtime};

use crate::support::*;

#[test]
fn bad_ops_from_the_guest() {
    let rt = runtime();
    let (mut inst, logs) = testops(&rt, HostConfig::new());
    let failed: i32 = inst.call("bad_ops", ()).unwrap();
    assert_eq!(failed, 0, "check {failed} failed: {:?}", logs.lock().unwrap());
}

/// A raw guest: it forwards the imports, so the host can call them with any arguments.
const RAW: &str = r#"(module
    (import "samepage" "op" (func $op (param i32 i32 i32) (result i32)))
    (import "samepage" "graph_begin" (func $graph_begin (result i32)))
    (import "samepage" "graph_end" (func $graph_end (result i32)))
    (import "samepage" "submit" (func $submit (param i32) (result i32)))
    (import "samepage" "wait" (func $wait (param i32) (result i32)))
    (import "samepage" "graph_free" (func $graph_free (param i32) (result i32)))
    (import "samepage" "last_error" (func $last_error (param i32 i32) (result i32)))
    (import "samepage" "file_read" (func $file_read (param i32 i64 i32 i32) (result i32)))
    (memory (export "memory") 16)
    (func (export "samepage_abi_version") (result i32) i32.const 1)
    (func (export "op") (param i32 i32 i32) (result i32) local.get 0 local.get 1 local.get 2 call $op)
    (func (export "graph_begin") (result i32) call $graph_begin)
    (func (export "graph_end") (result i32) call $graph_end)
    (func (export "submit") (param i32) (result i32) local.get 0 call $submit)
    (func (export "wait") (param i32) (result i32) local.get 0 call $wait)
    (func (export "graph_free") (param i32) (result i32) local.get 0 call $graph_free)
    (func (export "last_error") (param i32 i32) (result i32) local.get 0 local.get 1 call $last_error)
    (func (export "file_read") (param i32 i64 i32 i32) (result i32)
        local.get 0 local.get 1 local.get 2 local.get 3 call $file_read))"#;

const MEM: u32 = 16 * 65536;

fn raw(rt: &Runtime) -> Instance {
    Instance::new(rt, &wat(rt, RAW).unwrap(), HostConfig::new()).unwrap()
}

fn call_op(inst: &mut Instance, code: u32, desc: u32, len: u32) -> i32 {
    inst.call("op", (code, desc, len)).expect("an import trapped")
}

fn write(inst: &mut Instance, at: u32, bytes: &[u8]) {
    inst.memory_mut()[at as usize..][..bytes.len()].copy_from_slice(bytes);
}

fn last_error(inst: &mut Instance) -> String {
    let n: i32 = inst.call("last_error", (0u32, 1024u32)).unwrap();
    assert!(n >= 0);
    String::from_utf8(inst.memory()[..(n as usize).min(1024)].to_vec()).unwrap()
}

fn scale(x: u32, len: u32) -> abi::Scale {
    abi::Scale {
        x,
        out: x,
        len,
        scale: 2.0,
    }
}

#[test]
fn bad_descriptors_from_a_raw_module() {
    let rt = runtime();
    let mut inst = raw(&rt);
    let good = scale(4096, 16);
    let bytes = abi::pod_bytes(&good);
    write(&mut inst, 2048, bytes);
    let len = bytes.len() as u32;
    assert_eq!(call_op(&mut inst, op::SCALE, 2048, len), status::OK);

    let cases = [
        ("descriptor past memory", op::SCALE, MEM - 4, len, status::OUT_OF_BOUNDS),
        (
            "descriptor wrapping around",
            op::SCALE,
            u32::MAX - 2,
            len,
            status::OUT_OF_BOUNDS,
        ),
        (
            "descriptor one byte short",
            op::SCALE,
            2048,
            len - 1,
            status::BAD_DESCRIPTOR,
        ),
        (
            "descriptor one byte long",
            op::SCALE,
            2048,
            len + 1,
            status::BAD_DESCRIPTOR,
        ),
        ("empty descriptor", op::SCALE, 2048, 0, status::BAD_DESCRIPTOR),
        ("descriptor of 4 GiB", op::SCALE, 0, u32::MAX, status::BAD_DESCRIPTOR),
        ("unknown op", 0, 2048, len, status::BAD_OP),
    ];
    for (what, code, ptr, len, want) in cases {
        assert_eq!(call_op(&mut inst, code, ptr, len), want, "{what}");
        let msg = last_error(&mut inst);
        assert!(!msg.is_empty(), "{what}: no reason given");
    }

    // Ranges inside a well-formed descriptor.
    for (what, d, want) in [
        ("tensor past memory", scale(MEM - 32, 16), status::OUT_OF_BOUNDS),
        ("tensor past 4 GiB", scale(u32::MAX - 3, 16), status::OUT_OF_BOUNDS),
        ("zero elements", scale(4096, 0), status::BAD_SHAPE),
        ("misaligned", scale(4097, 16), status::MISALIGNED),
    ] {
        write(&mut inst, 2048, abi::pod_bytes(&d));
        assert_eq!(call_op(&mut inst, op::SCALE, 2048, len), want, "{what}");
        let msg = last_error(&mut inst);
        assert!(msg.contains("scale"), "{what}: {msg}");
    }

    // file_read with no file open; last_error with a bad buffer.
    assert_eq!(
        inst.call::<_, i32>("file_read", (0u32, 0u64, 0u32, 16u32)).unwrap(),
        status::BAD_HANDLE
    );
    assert_eq!(
        inst.call::<_, i32>("last_error", (MEM - 1, 64u32)).unwrap(),
        status::OUT_OF_BOUNDS
    );
    assert!(last_error(&mut inst).contains("last_error"));
}

/// xorshift64*, seeded: the fuzz loop is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
    /// A descriptor field: usually plausible (a small dimension, an aligned offset, a
    /// dtype, a small float), sometimes anything.
    fn field(&mut self) -> u32 {
        match self.below(8) {
            0 => self.below(9),
            1 => self.below(70),
            2 | 3 => 8192 + self.below((MEM - 8192) / 64) * 64,
            4 => self.below(MEM),
            5 => (self.below(200) as f32 * 0.05).to_bits(),
            6 => [0, 1, 2, 3, 32, 256, u32::MAX, u32::MAX / 2, 0x8000_0000][self.below(9) as usize],
            _ => self.next(),
        }
    }
}

/// A valid descriptor for each op code over the raw module's 1 MiB memory (scalars from
/// 8192, activations from 16384, weights and caches from 65536), for the fuzz loop to
/// mutate.
fn template(code: u32, rng: &mut Rng) -> Vec<u8> {
    let weights = abi::DType::WEIGHTS[rng.below(10) as usize] as u32;
    let cache = rng.below(2);
    match code {
        op::EMBED => {
            let d = abi::Embed {
                table: 65536,
                dtype: weights,
                vocab: 4,
                dim: 256,
                ids: 8192,
                n: 2,
                out: 16384,
            };
            abi::pod_bytes(&d).to_vec()
        }
        op::RMSNORM => {
            let d = abi::RmsNorm {
                x: 16384,
                weight: 20480,
                out: 24576,
                n: 2,
                dim: 64,
                eps: 1e-5,
            };
            abi::pod_bytes(&d).to_vec()
        }
        op::MATMUL => {
            let flags = rng.below(4);
            let d = abi::Matmul {
                w: 65536,
                dtype: weights,
                m: 8,
                k: 256,
                x: 16384,
                n: 2,
                out: 24576,
                bias: 20480,
                flags,
            };
            abi::pod_bytes(&d).to_vec()
        }
        op::ROPE => {
            let d = abi::Rope {
                x: 16384,
                n: 2,
                n_heads: 2,
                head_dim: 16,
                n_rot: 16,
                mode: cache,
                positions: 8192,
                freq_base: 10000.0,
                ..Default::default()
            };
            abi::pod_bytes(&d).to_vec()
        }
        op::KV_STORE => {
            let d = abi::KvStore {
                k: 16384,
                v: 20480,
                n: 2,
                n_kv_heads: 2,
                head_dim: 16,
                k_cache: 65536,
                v_cache: 98304,
                cache_dtype: cache,
                ctx: 16,
                pos: 8192,
            };
            abi::pod_bytes(&d).to_vec()
        }
        op::ATTENTION => {
            let d = abi::Attention {
                q: 16384,
                n: 2,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 16,
                k_cache: 65536,
                v_cache: 98304,
                cache_dtype: cache,
                ctx: 16,
                pos: 8192,
                out: 24576,
                scale: 0.25,
            };
            abi::pod_bytes(&d).to_vec()
        }
        op::SWIGLU => abi::pod_bytes(&abi::SwiGlu {
            gate: 16384,
            up: 20480,
            out: 24576,
            len: 64,
        })
        .to_vec(),
        op::ADD => abi::pod_bytes(&abi::Add {
            a: 16384,
            b: 20480,
            out: 24576,
            len: 64,
        })
        .to_vec(),
        op::SCALE => abi::pod_bytes(&abi::Scale {
            x: 16384,
            out: 24576,
            len: 64,
            scale: 0.5,
        })
        .to_vec(),
        op::SOFTMAX => abi::pod_bytes(&abi::Softmax {
            x: 16384,
            out: 24576,
            rows: 2,
            cols: 64,
        })
        .to_vec(),
        op::ARGMAX => abi::pod_bytes(&abi::Argmax {
            x: 16384,
            out: 24576,
            rows: 2,
            cols: 64,
        })
        .to_vec(),
        _ => {
            let d = abi::Sample {
                logits: 16384,
                vocab: 64,
                params: 8192 + 64,
                history: 8192 + 128,
                history_cap: 4,
                rng: 8192 + 256,
                out: 8192 + 512,
            };
            abi::pod_bytes(&d).to_vec()
        }
    }
}

/// Fill the raw module's memory with test data: mostly small floats, sometimes any bits
/// (NaN, infinities), and small integers where ids, positions and sampling parameters go.
fn fill(inst: &mut Instance, rng: &mut Rng) {
    let wild = rng.below(5) == 0;
    let mut bytes = Vec::with_capacity((MEM - 8192) as usize);
    for _ in 0..(MEM - 8192) / 4 {
        let v = if wild && rng.below(8) == 0 {
            rng.next()
        } else {
            (rng.next() as i32 as f32 / 2e9).to_bits()
        };
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write(inst, 8192, &bytes);
    let small: Vec<u8> = (0..16).flat_map(|_| rng.below(6).to_le_bytes()).collect();
    write(inst, 8192, &small);
    let params = abi::SampleParams {
        temperature: [0.0, 0.7, 1.0][rng.below(3) as usize],
        top_k: rng.below(10),
        top_p: 0.9,
        min_p: 0.05,
        repeat_penalty: 1.1,
        history_len: rng.below(5),
    };
    write(inst, 8192 + 64, abi::pod_bytes(&params));
    write(inst, 8192 + 128, &small[..16]);
}

#[test]
fn fuzz_descriptors_and_graph_calls() {
    let rt = runtime();
    let mut inst = raw(&rt);
    let mut rng = Rng(0x5a3e_9a9e);
    let mut ran = [0u32; 13];
    for i in 0..5000 {
        if i % 250 == 0 {
            fill(&mut inst, &mut rng);
        }
        let what = rng.below(12);
        let s = match what {
            0..=7 => {
                let code = rng.below(14);
                let want = abi::descriptor_len(code).unwrap_or(40) as u32;
                let len = match rng.below(10) {
                    0 => rng.below(80),
                    1 => rng.next(),
                    _ => want,
                };
                let ptr = match rng.below(10) {
                    0 => rng.next(),
                    _ => 64 * rng.below(64),
                };
                // A valid descriptor with up to two fields replaced, or random words.
                let desc: Vec<u8> = if (1..=12).contains(&code) && rng.below(4) != 0 {
                    let mut d = template(code, &mut rng);
                    for _ in 0..[0, 0, 1, 1, 2][rng.below(5) as usize] {
                        let f = rng.below(d.len() as u32 / 4) as usize * 4;
                        d[f..f + 4].copy_from_slice(&rng.field().to_le_bytes());
                    }
                    d
                } else {
                    (0..16).flat_map(|_| rng.field().to_le_bytes()).collect()
                };
                write(&mut inst, ptr.min(4096), &desc);
                let s = call_op(&mut inst, code, ptr, len);
                if s == 0 {
                    ran[code as usize] += 1;
                }
                s
            }
            8 => inst.call::<(), i32>("graph_begin", ()).unwrap(),
            9 => inst.call::<(), i32>("graph_end", ()).unwrap().min(0),
            10 => inst.call::<u32, i32>("submit", rng.below(4)).unwrap(),
            _ => {
                let f = if rng.below(2) == 0 { "wait" } else { "graph_free" };
                inst.call::<u32, i32>(f, rng.below(4)).unwrap()
            }
        };
        assert!(
            (status::BAD_ARGUMENT..=status::OK).contains(&s),
            "iteration {i}: status {s}"
        );
        if s < 0 {
            let msg = last_error(&mut inst);
            assert!(!msg.is_empty(), "iteration {i}: status {s} without a reason");
            assert!(!msg.contains("panicked"), "iteration {i}: {msg}");
        }
    }
    println!("fuzz: ops accepted (run or recorded), by code: {ran:?}");
    assert!(
        ran[1..].iter().all(|&n| n > 0),
        "the fuzz loop missed some ops: {ran:?}"
    );

    // The instance still works.
    let _ = inst.call::<(), i32>("graph_end", ());
    write(&mut inst, 2048, abi::pod_bytes(&scale(4096, 16)));
    assert_eq!(call_op(&mut inst, op::SCALE, 2048, 16), status::OK);
    assert_eq!(inst.memory_size(), MEM as usize);
}
