use std::sync::{Arc, OnceLock};

use samepage_backend::{Backend, Mem, Op, OpError, Region};
use samepage_backend_cpu::CpuBackend;
use samepage_backend_wgpu::WgpuBackend;

/// The shared GPU backend, or `None` (after printing "skipped") when there is no usable
/// device. Panics instead when `SAMEPAGE_REQUIRE_GPU=1`.
pub fn gpu() -> Option<WgpuBackend> {
    static GPU: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    match GPU.get_or_init(|| WgpuBackend::new().map_err(|e| e.to_string())) {
        Ok(b) => Some(b.clone()),
        Err(e) => {
            if std::env::var("SAMEPAGE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("SAMEPAGE_REQUIRE_GPU=1 but the wgpu backend is unavailable: {e}");
            }
            // Straight to the stream, past the test harness's capture, so CI logs show it.
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "skipped: no wgpu device: {e}");
            None
        }
    }
}

pub fn cpu() -> CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(|| CpuBackend::with_config(1, samepage_backend_cpu::Isa::detect()))
        .clone()
}

/// A deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn fs(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A memory image laid out by a bump allocator, then copied into a region of each backend.
pub struct Image {
    pub bytes: Vec<u8>,
}

impl Image {
    pub fn new() -> Image {
        // Start off a page boundary so bindings need their in-binding offsets.
        Image { bytes: vec![0; 4100] }
    }
    /// Place `data` at the next offset that is `align`-aligned plus `skew` bytes.
    pub fn put(&mut self, data: &[u8], align: usize, skew: usize) -> u32 {
        let at = self.bytes.len().div_ceil(align) * align + skew;
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(data);
        at as u32
    }
    pub fn f32s(&mut self, v: &[f32]) -> u32 {
        self.put(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(), 4, 0)
    }
    pub fn u32s(&mut self, v: &[u32]) -> u32 {
        self.put(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(), 4, 0)
    }
    pub fn zeros(&mut self, bytes: usize) -> u32 {
        self.put(&vec![0; bytes], 8, 0)
    }
}

/// A region of `backend` holding a copy of the image.
pub fn load(backend: &dyn Backend, img: &Image) -> Arc<dyn Region> {
    let size = (img.bytes.len() + 4096).div_ceil(65536) * 65536;
    let r = backend.new_region(size, size * 2).expect("region");
    // SAFETY: the region is at least `size` bytes and nothing else uses it yet.
    unsafe { std::ptr::copy_nonoverlapping(img.bytes.as_ptr(), r.base(), img.bytes.len()) };
    r
}

pub fn f32s_at(mem: &Mem, off: u32, n: usize) -> Vec<f32> {
    // SAFETY: tests read ranges they laid out.
    unsafe { mem.slice::<f32>(off, n) }.to_vec()
}

pub fn u32s_at(mem: &Mem, off: u32, n: usize) -> Vec<u32> {
    // SAFETY: as above.
    unsafe { mem.slice::<u32>(off, n) }.to_vec()
}

/// Run `ops` on the CPU and on the GPU over the same image; return both memories.
pub struct Pair {
    pub cpu: Arc<dyn Region>,
    pub gpu: Arc<dyn Region>,
    pub cpu_res: Result<(), OpError>,
    pub gpu_res: Result<(), OpError>,
}

pub fn run_both(gpu: &WgpuBackend, img: &Image, ops: &[Op]) -> Pair {
    let cpu_r = load(&cpu(), img);
    let gpu_r = load(gpu, img);
    for op in ops {
        op.validate(img.bytes.len())
            .unwrap_or_else(|e| panic!("test op invalid: {e}"));
    }
    let cpu_res = cpu().run(cpu_r.mem(), ops);
    let gpu_res = gpu.run(gpu_r.mem(), ops);
    Pair {
        cpu: cpu_r,
        gpu: gpu_r,
        cpu_res,
        gpu_res,
    }
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    samepage_backend_cpu::reference::rel_err(a, b)
}
