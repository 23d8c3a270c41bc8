//! The samepage backend interface.
//!
//! Design choices, in the spirit of ggml's backend interface and wgpu-hal:
//! - A backend owns **regions**: one per guest instance, reserved at its maximum size,
//!   never moved. Wasmtime adopts a region as the guest's memory 0; kernels address
//!   tensors as byte offsets into it. Nothing is ever copied between "host" and
//!   "device" buffers, because there is only one buffer.
//! - Validation happens once, above the kernels: [`Op::decode`] turns a raw
//!   descriptor (copied out of guest memory) into an [`Op`] whose every
//!   `(offset, length)`, dtype, shape and overlap was checked against the region size.
//!   Kernels trust a validated `Op`; if a kernel finds a bad value, the bug is above it.
//!   The only values a kernel checks itself are those read from guest memory at
//!   execution time (positions, token ids, sampling parameters).
//! - A backend is a small trait: make a region, run ops, record a graph.
use std::fs::File;
use std::sync::Arc;

pub use samepage_abi as abi;
use samepage_abi::status;

pub mod cache;
mod mem;
pub mod rope;
mod validate;

pub use mem::Mem;
pub use validate::Op;

/// A host-side error with a guest-facing status code and a readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// One of [`samepage_abi::status`] (negative).
    pub status: i32,
    pub message: String,
}

impl OpError {
    pub fn new(status: i32, message: impl Into<String>) -> Self {
        OpError {
            status,
            message: message.into(),
        }
    }
    pub fn runtime(message: impl Into<String>) -> Self {
        OpError::new(status::RUNTIME, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        OpError::new(status::UNSUPPORTED, message)
    }
}

/// Errors of backend set-up (regions, devices), as opposed to op errors.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not reserve a {size}-byte region: {source}")]
    Reserve { size: usize, source: std::io::Error },
    #[error("cannot grow the region to {requested} bytes: its capacity is {capacity} bytes")]
    Capacity { requested: usize, capacity: usize },
    #[error("cannot grow the region while a graph is in flight")]
    Busy,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("backend {backend} is not available: {reason}")]
    Unavailable { backend: &'static str, reason: String },
    #[error("{0}")]
    Other(String),
}

/// How Wasmtime must be configured for a backend's regions (engine-wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Bytes reserved for each region (`Config::memory_reservation`). With guard pages,
    /// `reservation + guard >= 4 GiB` lets Cranelift elide bounds checks.
    pub reservation: u64,
    /// Guard bytes after the reservation (`Config::memory_guard_size`); 0 means Wasmtime
    /// emits explicit bounds checks.
    pub guard: u64,
}

/// One guest's memory, owned by a backend.
///
/// # Safety
/// Implementors guarantee that `base()` never changes for the region's lifetime, that
/// `[base, base + size())` is readable and writable, that memory newly made accessible by
/// `grow_to` is zero-filled, and that the region stays mapped until dropped.
pub unsafe trait Region: Send + Sync {
    /// The base address; never changes.
    fn base(&self) -> *mut u8;
    /// Bytes accessible now.
    fn size(&self) -> usize;
    /// Bytes the region can grow to without moving.
    fn capacity(&self) -> usize;
    /// Make `[0, new_size)` accessible (zero-filled). Never moves the base.
    fn grow_to(&self, new_size: usize) -> Result<(), BackendError>;
    /// Put `len` bytes of `file` at `file_offset` into `[dst, dst + len)` without a second
    /// resident copy where possible. The range was bounds-checked by the caller.
    /// The default reads the bytes in once.
    fn map_file(&self, file: &File, file_offset: u64, dst: usize, len: usize) -> Result<(), BackendError> {
        read_file_into(self, file, file_offset, dst, len)
    }
    /// Placement advice for `[offset, offset + len)`, one of [`samepage_abi::hint`].
    fn hint(&self, _offset: usize, _len: usize, _kind: u32) {}
    /// A view of the accessible bytes for kernels.
    fn mem(&self) -> Mem {
        // SAFETY: the Region contract says [base, base + size) is mapped and
        // stays so while the region lives.
        unsafe { Mem::new(self.base(), self.size()) }
    }
}

/// Read `len` bytes of `file` at `file_offset` into the region at `dst` (bounds checked
/// by the caller). Used by [`Region::map_file`]'s default.
pub fn read_file_into<R: Region + ?Sized>(
    region: &R,
    file: &File,
    file_offset: u64,
    dst: usize,
    len: usize,
) -> Result<(), BackendError> {
    use std::os::unix::fs::FileExt;
    let end = dst.checked_add(len).ok_or(BackendError::Capacity {
        requested: usize::MAX,
        capacity: region.capacity(),
    })?;
    if end > region.size() {
        return Err(BackendError::Capacity {
            requested: end,
            capacity: region.size(),
        });
    }
    // SAFETY: the range is inside the accessible region (checked above).
    let buf = unsafe { std::slice::from_raw_parts_mut(region.base().add(dst), len) };
    file.read_exact_at(buf, file_offset)?;
    Ok(())
}

/// A recorded sequence of validated ops, replayed unchanged on every submit.
pub trait Graph: Send {
    /// Start the graph. The default and the CPU backend run it to completion here.
    fn launch(&mut self, mem: Mem) -> Result<(), OpError>;
    /// Wait for the last launch; every device write is then visible to the host.
    fn wait(&mut self) -> Result<(), OpError> {
        Ok(())
    }
    /// The ops as recorded.
    fn ops(&self) -> &[Op];
}

/// A compute backend.
pub trait Backend: Send + Sync {
    /// A short name: "cpu", "cuda", "vulkan", ...
    fn name(&self) -> &'static str;
    /// How Wasmtime must be configured for this backend's regions.
    fn memory_layout(&self) -> MemoryLayout;
    /// Reserve a region of `capacity` bytes with `initial` accessible (zero-filled).
    fn new_region(&self, initial: usize, capacity: usize) -> Result<Arc<dyn Region>, BackendError>;
    /// Whether this backend can run `op` (ggml's `supports_op`). Default: everything.
    fn supports(&self, _op: &Op) -> bool {
        true
    }
    /// Run validated ops in order, to completion (immediate mode).
    fn run(&self, mem: Mem, ops: &[Op]) -> Result<(), OpError>;
    /// Record validated ops for replay (a CUDA graph, a reusable command buffer; on the
    /// CPU, the op list).
    fn record(&self, ops: Vec<Op>) -> Result<Box<dyn Graph>, OpError>;
}

/// A graph that replays its ops through [`Backend::run`] of a cloneable backend.
pub struct Replay<B> {
    pub backend: B,
    pub ops: Vec<Op>,
}

impl<B: Backend> Graph for Replay<B> {
    fn launch(&mut self, mem: Mem) -> Result<(), OpError> {
        self.backend.run(mem, &self.ops)
    }
    fn ops(&self) -> &[Op] {
        &self.ops
    }
}
