//! The samepage CPU backend: the reference backend and the default one.
//!
//! Design choices:
//! - The region is one `mmap` reserved at its full size plus a guard ([`CpuRegion`]);
//!   kernels run directly on the guest's pages. Weights can be mapped from the model
//!   file into the region (`MAP_FIXED|MAP_PRIVATE`), so they are resident once.
//! - One file per op family; every kernel trusts its validated [`Op`] and checks only
//!   the values it reads from guest memory at execution time (positions, token ids,
//!   sampling parameters).
//! - Matmuls are row-parallel dot products over the packed ggml formats, on a
//!   persistent thread pool (`pool.rs`); the instruction set (AVX-512 with BF16/VNNI,
//!   AVX2/FMA, NEON via the portable kernels, scalar) is picked at run time.
//! - [`reference`] holds plain scalar implementations of every op for conformance
//!   suites, this crate's and the GPU backends'.
// Kernels index several arrays with one counter on purpose (it reads like the math
// and vectorizes).
#![allow(clippy::needless_range_loop)]

use std::sync::Arc;

use samepage_backend::{Backend, BackendError, Graph, Mem, MemoryLayout, Op, OpError, Region, Replay};

mod attention;
mod elementwise;
mod embed;
mod matmul;
mod norm;
mod pool;
pub mod quant;
pub mod reference;
mod region;
mod rope;
mod sample;
pub use sample::sample as sample_op;

pub use region::CpuRegion;

/// An instruction-set level for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (auto-vectorized for the build target; NEON on aarch64).
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI and BF16.
    Avx512,
}

impl Isa {
    /// The best level this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every level this CPU can run, best first (for tests).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| match best {
                Isa::Avx512 => true,
                Isa::Avx2 => i != Isa::Avx512,
                Isa::Portable => i == Isa::Portable,
            })
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

struct Inner {
    pool: pool::Pool,
    isa: Isa,
}

/// The CPU backend. Cloning is cheap (the thread pool is shared).
#[derive(Clone)]
pub struct CpuBackend {
    inner: Arc<Inner>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// Threads from `SAMEPAGE_THREADS`, else the available parallelism; the best ISA.
    pub fn new() -> CpuBackend {
        let threads = std::env::var("SAMEPAGE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        CpuBackend::with_config(threads, Isa::detect())
    }

    /// A backend with `threads` threads (the caller's included) and kernels for `isa`
    /// (which must be one of [`Isa::available`]; a level the CPU lacks falls back to
    /// the detected one).
    pub fn with_config(threads: usize, isa: Isa) -> CpuBackend {
        let isa = if Isa::available().contains(&isa) {
            isa
        } else {
            Isa::detect()
        };
        CpuBackend {
            inner: Arc::new(Inner {
                pool: pool::Pool::new(threads),
                isa,
            }),
        }
    }

    pub fn threads(&self) -> usize {
        self.inner.pool.threads()
    }

    pub fn isa(&self) -> Isa {
        self.inner.isa
    }

    fn run_one(&self, mem: &Mem, op: &Op) -> Result<(), OpError> {
        let (pool, isa) = (&self.inner.pool, self.inner.isa);
        match op {
            Op::Embed(d) => embed::embed(mem, d),
            Op::RmsNorm(d) => norm::rmsnorm(mem, d),
            Op::Matmul(d) => matmul::matmul(mem, pool, isa, d),
            Op::Rope(d) => rope::rope(mem, d),
            Op::KvStore(d) => attention::kv_store(mem, d),
            Op::Attention(d) => attention::attention(mem, pool, d),
            Op::SwiGlu(d) => elementwise::swiglu(mem, d),
            Op::Add(d) => elementwise::add(mem, d),
            Op::Scale(d) => elementwise::scale(mem, d),
            Op::Softmax(d) => elementwise::softmax(mem, d),
            Op::Argmax(d) => elementwise::argmax(mem, d),
            Op::Sample(d) => sample::sample(mem, d),
        }
    }
}

/// Reserved bytes per region: the whole 32-bit wasm address space.
pub const RESERVATION: u64 = 4 << 30;
/// Guard bytes after the reservation.
pub const GUARD: u64 = 2 << 30;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn memory_layout(&self) -> MemoryLayout {
        MemoryLayout {
            reservation: RESERVATION,
            guard: GUARD,
        }
    }

    fn new_region(&self, initial: usize, capacity: usize) -> Result<Arc<dyn Region>, BackendError> {
        // Reserve at least the full wasm address space so that Cranelift's elided bounds
        // checks land in PROT_NONE pages.
        let reserve = capacity.max(RESERVATION as usize);
        let region = CpuRegion::new(initial, reserve, GUARD as usize)?;
        Ok(Arc::new(region.with_capacity(capacity)))
    }

    fn run(&self, mem: Mem, ops: &[Op]) -> Result<(), OpError> {
        for op in ops {
            self.run_one(&mem, op)?;
        }
        Ok(())
    }

    fn record(&self, ops: Vec<Op>) -> Result<Box<dyn Graph>, OpError> {
        Ok(Box::new(Replay {
            backend: self.clone(),
            ops,
        }))
    }
}
