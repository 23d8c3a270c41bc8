//! Regions: one `cuMemAllocManaged` allocation (or `mmap` + `cuMemHostRegister`) that
//! Wasmtime adopts as the guest's memory. The base never moves; the whole capacity is
//! allocated up front and `grow_to` only widens the accessible size.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};
use samepage_abi::hint;
use samepage_backend::{BackendError, Region};

use crate::Inner;

const PAGE: usize = 4096;

/// How a region's pages are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryMode {
    /// `cuMemAllocManaged`: one address valid on host and device; pages placed by
    /// advice and prefetch. The default.
    Managed,
    /// `mmap` + `cuMemHostRegister`: the GPU reads host pages over the bus. Full speed
    /// only on coherent machines (GH200, Jetson); `SAMEPAGE_CUDA_MEMORY=registered`.
    Registered,
}

pub(crate) struct CudaRegion {
    inner: Arc<Inner>,
    mode: MemoryMode,
    base: *mut u8,
    capacity: usize,
    size: AtomicUsize,
    grow: Mutex<()>,
}

// SAFETY: the region is a fixed address range; access is synchronised by the runtime
// (no guest access between submit and wait) and `grow` is serialised by a mutex.
unsafe impl Send for CudaRegion {}
unsafe impl Sync for CudaRegion {}

fn other(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Other(format!("cuda: {what}: {e:?}"))
}

impl CudaRegion {
    pub(crate) fn new(inner: Arc<Inner>, initial: usize, capacity: usize) -> Result<CudaRegion, BackendError> {
        if initial > capacity {
            return Err(BackendError::Capacity {
                requested: initial,
                capacity,
            });
        }
        let alloc = capacity.max(PAGE).div_ceil(PAGE) * PAGE;
        inner
            .ctx
            .bind_to_thread()
            .map_err(|e| other("binding the context", e))?;
        let base = match inner.mode {
            MemoryMode::Managed => {
                let (free, _total) = result::mem_get_info().map_err(|e| other("cuMemGetInfo", e))?;
                if alloc > free {
                    return Err(BackendError::Reserve {
                        size: alloc,
                        source: std::io::Error::other(format!(
                            "the GPU has {free} bytes free; ask for a smaller memory maximum"
                        )),
                    });
                }
                // SAFETY: a fresh allocation; zero-filled below before anyone reads it.
                let p = unsafe { result::malloc_managed(alloc, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
                    .map_err(|e| BackendError::Reserve {
                        size: alloc,
                        source: std::io::Error::other(format!("{e:?}")),
                    })?;
                p as usize as *mut u8
            }
            MemoryMode::Registered => {
                // SAFETY: an anonymous private mapping (zero-filled by the kernel).
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        alloc,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(BackendError::Reserve {
                        size: alloc,
                        source: std::io::Error::last_os_error(),
                    });
                }
                let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
                // SAFETY: p is a live mapping of `alloc` bytes.
                let r = unsafe { sys::cuMemHostRegister_v2(p, alloc, flags) };
                if r != sys::CUresult::CUDA_SUCCESS {
                    // SAFETY: unmapping what we mapped above.
                    unsafe { libc::munmap(p, alloc) };
                    return Err(other("cuMemHostRegister", r));
                }
                let mut dev: sys::CUdeviceptr = 0;
                // SAFETY: p was registered above.
                let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0) };
                if r != sys::CUresult::CUDA_SUCCESS || dev as usize != p as usize {
                    // Kernels address the region by its host address (unified addressing).
                    // SAFETY: undoing the registration and mapping above.
                    unsafe {
                        sys::cuMemHostUnregister(p);
                        libc::munmap(p, alloc);
                    }
                    return Err(other(
                        "registered memory needs device pointer == host pointer",
                        (r, dev),
                    ));
                }
                p as *mut u8
            }
        };
        let mode = inner.mode;
        let region = CudaRegion {
            inner,
            mode,
            base,
            capacity,
            size: AtomicUsize::new(0),
            grow: Mutex::new(()),
        };
        region.grow_to(initial)?;
        Ok(region)
    }
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        let alloc = self.capacity.max(PAGE).div_ceil(PAGE) * PAGE;
        let _ = self.inner.ctx.bind_to_thread();
        // Nothing may still run on these pages.
        let _ = self.inner.stream.synchronize();
        // SAFETY: allocated in `new` with the same mode and size; no work is in flight.
        unsafe {
            match self.mode {
                MemoryMode::Managed => {
                    let _ = result::memory_free(self.base as usize as sys::CUdeviceptr);
                }
                MemoryMode::Registered => {
                    sys::cuMemHostUnregister(self.base as *mut _);
                    libc::munmap(self.base as *mut _, alloc);
                }
            }
        }
    }
}

// SAFETY: the base is fixed for the region's life; [base, base + capacity) is
// allocated up front, and `grow_to` zero-fills what it makes accessible.
unsafe impl Region for CudaRegion {
    fn base(&self) -> *mut u8 {
        self.base
    }
    fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn grow_to(&self, new_size: usize) -> Result<(), BackendError> {
        let _g = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.size();
        if new_size > self.capacity {
            return Err(BackendError::Capacity {
                requested: new_size,
                capacity: self.capacity,
            });
        }
        if new_size > old {
            // Zero on the host (a memset, not a copy): pages the guest fills next (weights
            // read from a file) start host-resident and move to the GPU once, by prefetch.
            if self.mode == MemoryMode::Managed {
                // SAFETY: [old, new_size) is inside the managed allocation.
                unsafe { std::ptr::write_bytes(self.base.add(old), 0, new_size - old) };
            }
            // Registered pages come from an anonymous mapping and are zero already.
            self.size.store(new_size, Ordering::Release);
        }
        Ok(())
    }
    fn hint(&self, offset: usize, len: usize, kind: u32) {
        if self.mode != MemoryMode::Managed || len == 0 {
            return;
        }
        let start = offset / PAGE * PAGE;
        let end = offset.saturating_add(len).min(self.capacity).div_ceil(PAGE) * PAGE;
        if start >= end {
            return;
        }
        let ptr = self.base as usize as u64 + start as u64;
        self.inner.advise(ptr, end - start, kind);
        if kind == hint::WEIGHTS || kind == hint::DEVICE {
            self.inner.queue_prefetch(ptr, end - start);
        }
    }
}
