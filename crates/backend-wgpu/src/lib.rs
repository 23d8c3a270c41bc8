//! The samepage portable GPU backend: wgpu with WGSL kernels, on Vulkan (and Metal on
//! macOS), where the guest's own pages are the GPU buffer.
//!
//! Design choices:
//! - **One region, imported, never copied.** A region is an `mmap` reservation (4 GiB
//!   plus a 2 GiB guard, as on the CPU backend, so Wasmtime elides bounds checks) aligned
//!   to the driver's import alignment. Its accessible pages are imported with
//!   `VK_EXT_external_memory_host` (Metal: `newBufferWithBytesNoCopy`) as overlapping
//!   views, so any tensor up to the binding limit lies inside one view ([`region`]).
//! - **Per-tensor bindings.** Each kernel binds the sub-ranges it touches at offsets
//!   rounded down to `minStorageBufferOffsetAlignment`, and gets the remainder as a
//!   parameter. Weights larger than one binding are split by rows ([`plan`]).
//! - **Recorded graphs.** Pipelines, parameters and bind groups are built once; a
//!   launch re-encodes the prebuilt dispatches (wgpu cannot resubmit a command buffer).
//!   Positions and token ids are read by the kernels from guest memory.
//! - **Runtime errors** (a position past the cache, a token id past the vocabulary) are
//!   flagged by the kernels in an imported status page; the kernel writes nothing out
//!   of bounds and `wait` returns [`samepage_abi::status::RUNTIME`].
//! - **Host visibility.** After each submission a `SHADER_WRITE -> HOST_READ` barrier is
//!   recorded through wgpu-hal (wgpu emits none), as Vulkan requires on real GPUs.
//! - **Sampling** runs on the host between GPU segments, on the same pages, with the
//!   ABI's reference sampler (bit-identical tokens on every backend).
//!
//! This backend is for UMA GPUs (Apple Silicon, integrated Intel/AMD, lavapipe), where
//! the import is the real zero-copy path. On a discrete GPU the imported pages stay in
//! host memory and every access crosses PCIe: correct and portable, not fast.
use std::sync::{Arc, Mutex, Weak};

use samepage_backend::{Backend, BackendError, Graph, Mem, MemoryLayout, Op, OpError, Region};

mod device;
mod graph;
pub mod kernels;
#[cfg(target_os = "macos")]
mod metal;
mod plan;
mod region;
mod sample;

pub use graph::WgpuGraph;
pub use kernels::Kernel;
pub use region::WgpuRegion;

/// Reserved bytes per region: the whole 32-bit wasm address space.
pub const RESERVATION: u64 = 4 << 30;
/// Guard bytes after the reservation.
pub const GUARD: u64 = 2 << 30;

/// The regions a backend made, so a launch can find the buffers behind a `Mem`.
pub(crate) struct Registry {
    regions: Mutex<Vec<Weak<WgpuRegion>>>,
}

impl Registry {
    pub fn find(&self, base: *mut u8) -> Option<Arc<WgpuRegion>> {
        let mut list = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).find(|r| r.base() == base)
    }
}

/// The wgpu backend: one device, shared by every region and graph.
#[derive(Clone)]
pub struct WgpuBackend {
    gpu: Arc<device::Gpu>,
    pipelines: Arc<kernels::Pipelines>,
    registry: Arc<Registry>,
    /// A smaller per-binding limit than the device's (tests exercise the split paths).
    max_tensor: Option<usize>,
}

impl WgpuBackend {
    /// Open the best adapter that can import host memory. Returns
    /// [`BackendError::Unavailable`] when there is none (no driver, no adapter, or no
    /// `VK_EXT_external_memory_host`).
    pub fn new() -> Result<WgpuBackend, BackendError> {
        let gpu = device::Gpu::open()?;
        if gpu.import_align % gpu.storage_align.max(1) as usize != 0 {
            return Err(BackendError::Unavailable {
                backend: gpu.api,
                reason: format!(
                    "the import alignment {} is not a multiple of the storage offset alignment {}",
                    gpu.import_align, gpu.storage_align
                ),
            });
        }
        Ok(WgpuBackend {
            pipelines: Arc::new(kernels::Pipelines::new(gpu.cpu)),
            gpu: Arc::new(gpu),
            registry: Arc::new(Registry {
                regions: Mutex::new(Vec::new()),
            }),
            max_tensor: None,
        })
    }

    /// The same device with tensors limited to `bytes` per binding, as if the device's
    /// binding limit were that small (to test the row-split paths on any device).
    pub fn with_binding_limit(&self, bytes: usize) -> WgpuBackend {
        WgpuBackend {
            max_tensor: Some(bytes),
            ..self.clone()
        }
    }

    /// Whether the adapter is a software renderer running on the CPU (lavapipe).
    pub fn is_software(&self) -> bool {
        self.gpu.cpu
    }

    /// The adapter's name (e.g. "llvmpipe (LLVM 19.1.7, 256 bits)").
    pub fn adapter(&self) -> &str {
        &self.gpu.adapter
    }

    /// Compile every kernel now rather than on first use.
    pub fn warm_up(&self) -> Result<(), OpError> {
        for k in Kernel::all() {
            self.pipelines.get(&self.gpu.device, k).map_err(OpError::unsupported)?;
        }
        Ok(())
    }

    fn limits(&self, capacity: usize) -> plan::Limits {
        let g = region::ViewGeometry::new(&self.gpu, capacity);
        plan::Limits {
            storage_align: self.gpu.storage_align as usize,
            max_tensor: g.max_tensor.min(self.max_tensor.unwrap_or(usize::MAX)),
            matmul_rows: kernels::matmul_rows_per_group(self.gpu.cpu),
        }
    }

    /// A region with the concrete type (for tests and tools).
    pub fn new_wgpu_region(&self, initial: usize, capacity: usize) -> Result<Arc<WgpuRegion>, BackendError> {
        let reserve = capacity.max(RESERVATION as usize);
        let region = Arc::new(WgpuRegion::new(
            self.gpu.clone(),
            initial,
            capacity,
            reserve - capacity + GUARD as usize,
        )?);
        let mut list = self.registry.regions.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&region));
        Ok(region)
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &'static str {
        self.gpu.api
    }

    fn memory_layout(&self) -> MemoryLayout {
        MemoryLayout {
            reservation: RESERVATION,
            guard: GUARD,
        }
    }

    fn new_region(&self, initial: usize, capacity: usize) -> Result<Arc<dyn Region>, BackendError> {
        Ok(self.new_wgpu_region(initial, capacity)?)
    }

    fn supports(&self, op: &Op) -> bool {
        plan::plan(op, self.limits(RESERVATION as usize)).is_ok()
    }

    fn run(&self, mem: Mem, ops: &[Op]) -> Result<(), OpError> {
        let mut g = self.record(ops.to_vec())?;
        g.launch(mem)?;
        g.wait()
    }

    fn record(&self, ops: Vec<Op>) -> Result<Box<dyn Graph>, OpError> {
        // Regions share one geometry rule; the largest capacity gives the tightest limit.
        let lim = self.limits(RESERVATION as usize);
        Ok(Box::new(WgpuGraph::new(
            self.gpu.clone(),
            &self.pipelines,
            self.registry.clone(),
            lim,
            ops,
        )?))
    }
}
