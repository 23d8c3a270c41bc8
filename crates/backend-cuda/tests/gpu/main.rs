//! GPU tests of the CUDA backend: per-op conformance against the CPU backend and the
//! scalar reference, zero-copy, run-time safety, and graph replay. They skip cleanly
//! without a GPU, and fail when `SAMEPAGE_REQUIRE_GPU=1` is set and none is found.
mod conformance;
mod graph;
mod mega;
mod mvp;
mod safety;
mod zero_copy;

use std::sync::{Arc, OnceLock};

use samepage_abi::{pod_bytes, Pod};
use samepage_backend::{Backend, BackendError, Graph, Mem, Op, Region};
use samepage_backend_cpu::CpuBackend;
use samepage_backend_cuda::CudaBackend;

/// The shared backend, or `None` (printing why) when the test must be skipped.
pub fn cuda() -> Option<CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| match CudaBackend::new() {
        Ok(b) => {
            eprintln!("cuda device: {}", b.device_name());
            Some(b)
        }
        Err(BackendError::Unavailable { reason, .. }) => {
            if std::env::var("SAMEPAGE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SAMEPAGE_REQUIRE_GPU=1 but the CUDA backend is unavailable: {reason}");
            }
            None
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    })
    .clone()
    .or_else(|| {
        println!("skipped: no CUDA device");
        None
    })
}

pub fn cpu() -> CpuBackend {
    CpuBackend::with_config(2, samepage_backend_cpu::Isa::detect())
}

/// A tiny deterministic generator (xorshift64*).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.u64() % n as u64) as u32
    }
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// A memory image: tensors placed at offsets, then written into a region of each backend.
pub struct Image {
    pub bytes: Vec<u8>,
}

impl Default for Image {
    fn default() -> Self {
        Image { bytes: vec![0; 256] }
    }
}

impl Image {
    /// Place bytes at the next multiple of 256, plus `skew` bytes.
    pub fn put_skewed(&mut self, b: &[u8], skew: usize) -> u32 {
        let at = self.bytes.len().div_ceil(256) * 256 + skew;
        self.bytes.resize(at, 0xA5);
        self.bytes.extend_from_slice(b);
        at as u32
    }
    pub fn put(&mut self, b: &[u8]) -> u32 {
        self.put_skewed(b, 0)
    }
    pub fn f32s(&mut self, v: &[f32]) -> u32 {
        self.put(&f32_bytes(v))
    }
    pub fn u32s(&mut self, v: &[u32]) -> u32 {
        self.put(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }
    /// An output of `n` bytes, poisoned with 0xFF (NaN as f32) so unwritten outputs show.
    pub fn out(&mut self, n: usize) -> u32 {
        self.put(&vec![0xFF; n])
    }
    /// The region size that holds the image (whole pages, one spare).
    pub fn size(&self) -> usize {
        self.bytes.len().div_ceil(4096) * 4096 + 4096
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
pub fn read_f32s(b: &[u8], at: u32, n: usize) -> Vec<f32> {
    b[at as usize..at as usize + 4 * n]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
pub fn read_u32s(b: &[u8], at: u32, n: usize) -> Vec<u32> {
    b[at as usize..at as usize + 4 * n]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Validate a descriptor exactly as the runtime does.
pub fn op<T: Pod>(code: u32, d: &T, mem_len: usize) -> Op {
    Op::decode(code, pod_bytes(d), mem_len).unwrap_or_else(|e| panic!("invalid test op: {e}"))
}

/// A region of `b` holding the image.
pub fn load(b: &dyn Backend, img: &Image) -> Arc<dyn Region> {
    let r = b.new_region(img.size(), img.size()).expect("region");
    // SAFETY: the region holds img.size() >= bytes.len() accessible bytes.
    unsafe { std::ptr::copy_nonoverlapping(img.bytes.as_ptr(), r.base(), img.bytes.len()) };
    r
}

pub fn snapshot(r: &Arc<dyn Region>) -> Vec<u8> {
    // SAFETY: reading the accessible bytes after the work finished.
    unsafe { std::slice::from_raw_parts(r.base(), r.size()) }.to_vec()
}

pub fn mem(r: &Arc<dyn Region>) -> Mem {
    r.mem()
}

/// Run `ops` on the CPU and the GPU over the same image; the memories afterwards.
pub fn run_both(gpu: &CudaBackend, img: &Image, ops: &[Op]) -> (Vec<u8>, Vec<u8>) {
    let cpu = cpu();
    let rc = load(&cpu, img);
    cpu.run(rc.mem(), ops).expect("cpu run");
    let rg = load(gpu, img);
    gpu.run(rg.mem(), ops).expect("cuda run");
    (snapshot(&rc), snapshot(&rg))
}

/// Where a greedy decode graph keeps its per-token words and its logits (image offsets).
pub struct DecodeIo {
    pub tok: u32,
    pub pos: u32,
    pub nxt: u32,
    pub logits: u32,
    pub vocab: usize,
}

/// Replays a decode graph recorded on the GPU (`g`, over `rg`) and on the CPU (`cg`, over
/// `rc`) for `steps` tokens, as the guest would: each step writes the token (1, then the
/// CPU's greedy pick) and the position into both, runs both, and asserts that the logits
/// agree to 1e-2 (`what` names the case in the message). `launched(step)` runs right after
/// the GPU graph's launch call. The worst relative error.
pub fn replay_against_cpu(
    (g, rg): (&mut dyn Graph, &Arc<dyn Region>),
    (cg, rc): (&mut dyn Graph, &Arc<dyn Region>),
    io: &DecodeIo,
    steps: u32,
    what: &str,
    mut launched: impl FnMut(u32),
) -> f64 {
    let mut worst: f64 = 0.0;
    for step in 0..steps {
        let t = if step == 0 {
            1
        } else {
            rc.mem().read_u32(io.nxt).unwrap()
        };
        for r in [rg, rc] {
            r.mem().write_u32(io.tok, t).unwrap();
            r.mem().write_u32(io.pos, step).unwrap();
        }
        let res = g.launch(rg.mem());
        launched(step);
        res.unwrap();
        cg.launch(rc.mem()).unwrap();
        g.wait().unwrap();
        cg.wait().unwrap();
        let (a, b) = (
            read_f32s(&snapshot(rg), io.logits, io.vocab),
            read_f32s(&snapshot(rc), io.logits, io.vocab),
        );
        let e = samepage_backend_cpu::reference::rel_err(&a, &b);
        worst = worst.max(e);
        assert!(e < 1e-2, "{what}, step {step}: logits differ from the CPU by {e:.2e}");
    }
    worst
}
