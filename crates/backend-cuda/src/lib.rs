//! The samepage CUDA backend.
//!
//! Design choices:
//! - **One region, one allocation.** A region is a single `cuMemAllocManaged`
//!   allocation of its whole capacity: one address valid on the CPU and the GPU, which
//!   Wasmtime adopts as the guest's memory. There are no guard pages
//!   ([`MemoryLayout`] reservation 0, guard 0), so Wasmtime emits bounds checks.
//!   Placement follows the guest's [`samepage_abi::hint`]s: weights and activations are
//!   advised to the GPU and prefetched there at the next run or launch; a `HOST` range
//!   (token ids, positions, the sampled token) stays in host memory, mapped for the GPU.
//!   `SAMEPAGE_CUDA_MEMORY=registered` selects `mmap` + `cuMemHostRegister` instead,
//!   for coherent machines (GH200, Jetson).
//! - **No copies.** No `cuMemcpy*` is ever issued; [`copy_calls`] counts them (it stays
//!   0) in every build. Errors found on the GPU come back through a pinned, mapped status
//!   word; sampling runs on the GPU, so only the token id crosses.
//! - **Kernels** are CUDA C (`src/cu`), compiled by NVRTC for the device's architecture
//!   once per process. A kernel gets the validated descriptor by value plus the region's
//!   base; it checks the per-token values it reads (positions, token ids, sampling
//!   parameters) and on a bad one writes nothing and reports it.
//! - **Graphs** are CUDA graphs, captured at the first launch (the region's base is
//!   known then) and replayed unchanged: per-token values are read from guest memory.
//! - **Prefill** (n > 1) matmuls run on tensor cores through cuBLAS (16-bit inputs, f32
//!   accumulation; `SAMEPAGE_CUDA_GEMM=tiled` keeps the exact fp32 kernel), attention
//!   through a tiled kernel; see [`prefill`].
//! - **No CUDA, no panic.** [`CudaBackend::new`] checks that the driver, NVRTC and cuBLAS
//!   libraries load before touching them and returns [`BackendError::Unavailable`].
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaStream};
use samepage_abi::hint;
use samepage_backend::{Backend, BackendError, Graph, Mem, MemoryLayout, Op, OpError, Region};

mod exec;
mod graph;
pub mod kernels;
mod prefill;
mod region;
mod stage;

pub use region::MemoryMode;

static COPY_CALLS: AtomicU64 = AtomicU64::new(0);

/// How many explicit copy calls (`cuMemcpy*`) this process's CUDA backends issued.
/// The design issues none, so this stays 0; it is kept in release builds as a proof.
pub fn copy_calls() -> u64 {
    COPY_CALLS.load(Ordering::Relaxed)
}

static PIPELINED: AtomicU64 = AtomicU64::new(0);

/// How many launches of the pipelined decode matvec (`exec::launch_mv`: rmsnorm and
/// swiglu fused, W streamed before the previous kernel ends) were recorded into graphs.
pub fn pipelined_matvecs() -> u64 {
    PIPELINED.load(Ordering::Relaxed)
}

pub(crate) fn count_pipelined() {
    PIPELINED.fetch_add(1, Ordering::Relaxed);
}

static MEGA: AtomicU64 = AtomicU64::new(0);

/// How many graphs were captured with the decode megakernel (cu/mega.cu) taking a run
/// of their steps.
pub fn mega_graphs() -> u64 {
    MEGA.load(Ordering::Relaxed)
}

pub(crate) fn count_mega() {
    MEGA.fetch_add(1, Ordering::Relaxed);
}

/// Count one explicit copy. Any future code path that must copy calls this first.
#[allow(dead_code)]
pub(crate) fn count_copy() {
    COPY_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Whether the CUDA driver, NVRTC and cuBLAS libraries can be loaded (cudarc panics on
/// a missing library, so ask first).
pub fn libraries_present() -> Result<(), String> {
    // SAFETY: these only try to dlopen the libraries.
    unsafe {
        if !sys::is_culib_present() {
            return Err("the CUDA driver library (libcuda) was not found".into());
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err("NVRTC (libnvrtc) was not found".into());
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err("cuBLAS (libcublas) was not found".into());
        }
    }
    Ok(())
}

struct Prefetch {
    ptr: u64,
    len: usize,
}

pub(crate) struct Inner {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) kernels: kernels::Kernels,
    pub(crate) mode: MemoryMode,
    /// Held while enqueuing (and capturing), so one thread's capture never takes in
    /// another thread's launches.
    pub(crate) enqueue: Mutex<()>,
    immediate: Mutex<Immediate>,
    prefetch: Mutex<Vec<Prefetch>>,
    /// Whether decode graphs are captured with the megakernel (`graph::mega_plan`).
    pub(crate) mega: std::sync::atomic::AtomicBool,
}

struct Immediate {
    status: exec::StatusWord,
    scratch: exec::Scratch,
}

impl Inner {
    fn device_location(&self) -> sys::CUmemLocation {
        sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ctx.ordinal() as i32,
        }
    }

    /// Placement advice for a managed range (page-aligned by the caller).
    pub(crate) fn advise(&self, ptr: u64, len: usize, kind: u32) {
        use sys::CUmem_advise::*;
        let dev = self.device_location();
        let host = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        };
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the range lies inside a managed allocation of this context. Advice is
        // only a hint; a failure changes placement, never correctness.
        unsafe {
            match kind {
                hint::HOST => {
                    let _ = result::mem_advise(ptr, len, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, host);
                    let _ = result::mem_advise(ptr, len, CU_MEM_ADVISE_SET_ACCESSED_BY, dev);
                }
                _ => {
                    let _ = result::mem_advise(ptr, len, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, dev);
                    let _ = result::mem_advise(ptr, len, CU_MEM_ADVISE_SET_ACCESSED_BY, dev);
                }
            }
        }
    }

    pub(crate) fn queue_prefetch(&self, ptr: u64, len: usize) {
        self.prefetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Prefetch { ptr, len });
    }

    /// Move hinted ranges to the GPU before the next work on the stream (weights are
    /// written by the host first, so this waits for the first run or launch).
    pub(crate) fn flush_prefetch(&self) {
        let pending = std::mem::take(&mut *self.prefetch.lock().unwrap_or_else(|e| e.into_inner()));
        for p in pending {
            // SAFETY: a range inside a managed allocation; prefetch is advisory.
            let _ =
                unsafe { result::mem_prefetch_async(p.ptr, p.len, self.device_location(), self.stream.cu_stream()) };
        }
    }

    /// The device address kernels use for a region's base (the same address under
    /// unified addressing; checked at region creation).
    pub(crate) fn device_base(&self, mem: &Mem) -> u64 {
        mem.base() as usize as u64
    }
}

/// The CUDA backend: cheap to clone, one context and stream per device.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl CudaBackend {
    /// Open device 0. The memory mode comes from `SAMEPAGE_CUDA_MEMORY` (`managed`, the
    /// default, or `registered`).
    pub fn new() -> Result<CudaBackend, BackendError> {
        let mode = match std::env::var("SAMEPAGE_CUDA_MEMORY").as_deref() {
            Ok("registered") => MemoryMode::Registered,
            Ok("managed") | Ok("") | Err(_) => MemoryMode::Managed,
            Ok(other) => {
                return Err(BackendError::Other(format!(
                    "SAMEPAGE_CUDA_MEMORY={other} is not a memory mode; use managed or registered"
                )))
            }
        };
        Self::with_mode(0, mode)
    }

    /// Open device `ordinal` with a memory mode.
    pub fn with_mode(ordinal: usize, mode: MemoryMode) -> Result<CudaBackend, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable {
            backend: "cuda",
            reason,
        };
        prefill::gemm_mode().map_err(BackendError::Other)?;
        libraries_present().map_err(unavailable)?;
        let n = CudaContext::device_count().map_err(|e| unavailable(format!("no CUDA device: {e:?}")))?;
        if n as usize <= ordinal {
            return Err(unavailable(format!("no CUDA device {ordinal} ({n} found)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("creating a context: {e:?}")))?;
        // SAFETY: we never use cudarc's CudaSlice, so its event tracking has nothing to track,
        // and stream capture forbids the events it would record.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("creating a stream: {e:?}")))?;
        let mut kernels = kernels::Kernels::load(&ctx).map_err(unavailable)?;
        // The cuBLAS handle for prefill GEMMs (see `prefill`): made here, never while a
        // graph is being captured (creating one allocates).
        kernels.blas = prefill::Blas::new(&ctx, &stream).map_err(unavailable)?;
        let status = exec::StatusWord::new().map_err(|e| unavailable(format!("pinned status word: {e:?}")))?;
        let inner = Inner {
            ctx,
            stream,
            kernels,
            mode,
            enqueue: Mutex::new(()),
            immediate: Mutex::new(Immediate {
                status,
                scratch: exec::Scratch::empty(),
            }),
            prefetch: Mutex::new(Vec::new()),
            mega: std::sync::atomic::AtomicBool::new(std::env::var("SAMEPAGE_CUDA_MEGA").as_deref() == Ok("1")),
        };
        Ok(CudaBackend { inner: Arc::new(inner) })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> String {
        self.inner.ctx.name().unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// Whether the pipelined decode matvec is available (sm_90 and newer, unless
    /// `SAMEPAGE_CUDA_MVP=0`).
    pub fn has_pipelined_matvec(&self) -> bool {
        self.inner.kernels.mvp.iter().any(|f| f.is_some()) && exec::mvp_enabled()
    }

    /// Whether the decode megakernel (cu/mega.cu) is loaded: sm_90 and its shared memory.
    pub fn has_megakernel(&self) -> bool {
        self.inner.kernels.mega.iter().any(|f| f.is_some())
    }

    /// Capture decode graphs recorded from now on with the megakernel where it applies
    /// (`SAMEPAGE_CUDA_MEGA=1` sets this at start). Off by default: on an H100 it is
    /// slower than the step-by-step launches (scripts/cuda/NOTES.md, session 10).
    pub fn set_megakernel(&self, on: bool) {
        self.inner.mega.store(on, Ordering::Relaxed);
    }

    pub fn memory_mode(&self) -> MemoryMode {
        self.inner.mode
    }

    /// Wait for all work on this backend's stream.
    pub fn synchronize(&self) -> Result<(), OpError> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| exec::cuda_err("synchronize", e))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn memory_layout(&self) -> MemoryLayout {
        MemoryLayout {
            reservation: 0,
            guard: 0,
        }
    }

    fn new_region(&self, initial: usize, capacity: usize) -> Result<Arc<dyn Region>, BackendError> {
        Ok(Arc::new(region::CudaRegion::new(
            self.inner.clone(),
            initial,
            capacity,
        )?))
    }

    fn supports(&self, op: &Op) -> bool {
        exec::supports(op)
    }

    fn run(&self, mem: Mem, ops: &[Op]) -> Result<(), OpError> {
        let inner = &self.inner;
        let mut imm = inner.immediate.lock().unwrap_or_else(|e| e.into_inner());
        let _q = inner.enqueue.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .ctx
            .bind_to_thread()
            .map_err(|e| exec::cuda_err("binding the context", e))?;
        let need = ops.iter().map(exec::scratch_bytes).max().unwrap_or(0);
        if need > 0 {
            // The old scratch may still be read by earlier work on the stream.
            inner
                .stream
                .synchronize()
                .map_err(|e| exec::cuda_err("synchronize", e))?;
            imm.scratch
                .ensure(need)
                .map_err(|e| exec::cuda_err("allocating scratch", e))?;
        }
        imm.status.reset();
        inner.flush_prefetch();
        let base = inner.device_base(&mem);
        prefill::forget_x();
        for (i, op) in ops.iter().enumerate() {
            let c = exec::KCtx::new(
                base,
                imm.status.dev(),
                imm.scratch.ptr(),
                imm.scratch.counters(),
                i as u32,
            );
            exec::launch_op(&inner.kernels, &inner.stream, c, op)?;
        }
        inner
            .stream
            .synchronize()
            .map_err(|e| exec::cuda_err("synchronize", e))?;
        imm.status.check(ops)
    }

    fn record(&self, ops: Vec<Op>) -> Result<Box<dyn Graph>, OpError> {
        Ok(Box::new(graph::CudaOpGraph::new(self.inner.clone(), ops)?))
    }
}
