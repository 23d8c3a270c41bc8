//! The wgpu region: one anonymous mapping aligned to the import alignment, reserved
//! `PROT_NONE` at its full size plus a guard (so Wasmtime can elide bounds checks, as
//! on the CPU backend), with a read-write prefix that grows in place.
//!
//! The accessible prefix is imported into the GPU lazily, as *views*: buffers of at
//! most `view_len` bytes starting every `stride` bytes, overlapping by `max_tensor`
//! bytes, so every tensor of at most `max_tensor` bytes lies inside one view (the
//! scheme ggml-metal uses for `maxBufferLength`). A view is imported when an op first
//! needs it; after the region grows, a longer view replaces it for new bindings and the
//! old one stays alive for the graphs that bound it. Imports never copy.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use samepage_backend::{BackendError, Region};

use crate::device::Gpu;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// An anonymous page-aligned mapping, unmapped on drop.
pub(crate) struct Mapping {
    pub base: *mut u8,
    raw: *mut u8,
    raw_len: usize,
}

// SAFETY: a plain address range; access is synchronised by its users.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Reserve `len` bytes aligned to `align`, `PROT_NONE`, or read-write if `rw`.
    pub fn new(len: usize, align: usize, rw: bool) -> Result<Mapping, BackendError> {
        let raw_len = len.checked_add(align).ok_or(BackendError::Capacity {
            requested: usize::MAX,
            capacity: len,
        })?;
        let prot = if rw {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(BackendError::Reserve {
                size: raw_len,
                source: std::io::Error::last_os_error(),
            });
        }
        let raw = raw as *mut u8;
        let base = round_up(raw as usize, align) as *mut u8;
        Ok(Mapping { base, raw, raw_len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; its users are gone (owners drop GPU buffers first).
        unsafe { libc::munmap(self.raw as *mut libc::c_void, self.raw_len) };
    }
}

/// Where views start and how long they are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ViewGeometry {
    pub stride: usize,
    pub view_len: usize,
    /// The largest tensor (bytes) one binding can cover.
    pub max_tensor: usize,
}

impl ViewGeometry {
    pub fn new(gpu: &Gpu, capacity: usize) -> ViewGeometry {
        let a = gpu.import_align;
        let down = |v: u64| (v as usize / a) * a;
        let cap = round_up(capacity.max(1), a);
        let binding = down(gpu.max_binding).saturating_sub(a).max(a);
        let buffer = down(gpu.max_buffer.min(isize::MAX as u64)).max(a);
        if buffer >= cap {
            ViewGeometry {
                stride: cap,
                view_len: cap,
                max_tensor: binding,
            }
        } else {
            let half = binding.min(down(buffer as u64 / 2)).max(a);
            ViewGeometry {
                stride: buffer - half,
                view_len: buffer,
                max_tensor: half,
            }
        }
    }
}

#[derive(Default)]
struct Views {
    /// Slot `i` starts at `i * stride`: (buffer, imported length).
    slots: Vec<Option<(wgpu::Buffer, usize)>>,
    /// Shorter views replaced after growth; graphs may still have them bound.
    retired: Vec<wgpu::Buffer>,
}

/// A guest memory whose pages the GPU uses in place.
pub struct WgpuRegion {
    /// Unique for the process lifetime: graphs cache bind groups per region id.
    pub(crate) id: u64,
    map: Mapping,
    capacity: usize,
    /// `capacity` rounded up to the import alignment.
    cap_aligned: usize,
    size: AtomicUsize,
    grow: Mutex<()>,
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) geometry: ViewGeometry,
    views: Mutex<Views>,
    /// One imported page the kernels set runtime-error flags in (word 0).
    pub(crate) status: StatusPage,
}

// SAFETY: `size` is atomic, growth and views are behind mutexes; synchronising kernel
// access to the bytes is the caller's job (the submit/wait contract).
unsafe impl Send for WgpuRegion {}
unsafe impl Sync for WgpuRegion {}

impl WgpuRegion {
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        initial: usize,
        capacity: usize,
        guard: usize,
    ) -> Result<WgpuRegion, BackendError> {
        if initial > capacity {
            return Err(BackendError::Capacity {
                requested: initial,
                capacity,
            });
        }
        let a = gpu.import_align;
        let cap_aligned = round_up(capacity.max(1), a);
        let total = cap_aligned
            .checked_add(round_up(guard, a))
            .ok_or(BackendError::Capacity {
                requested: usize::MAX,
                capacity,
            })?;
        let map = Mapping::new(total, a, false)?;
        let status = StatusPage::new(&gpu)?;
        let region = WgpuRegion {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            map,
            capacity,
            cap_aligned,
            size: AtomicUsize::new(0),
            grow: Mutex::new(()),
            geometry: ViewGeometry::new(&gpu, capacity),
            gpu,
            views: Mutex::new(Views::default()),
            status,
        };
        region.grow_to(initial)?;
        Ok(region)
    }

    /// The accessible bytes, rounded up to the import alignment (those pages are mapped).
    fn accessible(&self) -> usize {
        round_up(self.size(), self.gpu.import_align).min(self.cap_aligned)
    }

    /// A view holding `[start, end)` (which lies inside the accessible size and is at
    /// most `geometry.max_tensor` long): the buffer and the region offset it starts at.
    pub(crate) fn view_for(&self, start: usize, end: usize) -> Result<(wgpu::Buffer, usize), BackendError> {
        let g = self.geometry;
        let i = start / g.stride;
        let vstart = i * g.stride;
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.slots.len() <= i {
            views.slots.resize_with(i + 1, || None);
        }
        if let Some((buf, len)) = &views.slots[i] {
            if vstart + len >= end {
                return Ok((buf.clone(), vstart));
            }
        }
        let len = g.view_len.min(self.accessible() - vstart);
        if vstart + len < end {
            return Err(BackendError::Other(format!(
                "range [{start}, {end}) does not fit one view of {} bytes at {vstart}",
                g.view_len
            )));
        }
        // SAFETY: vstart and len are multiples of the import alignment (the base is
        // aligned to it); [vstart, vstart + len) is accessible and stays mapped with the
        // same pages until the region drops, after its buffers (see Drop).
        let buf = unsafe { self.gpu.import(self.map.base.add(vstart), len)? };
        if let Some((old, _)) = views.slots[i].replace((buf.clone(), len)) {
            views.retired.push(old);
        }
        Ok((buf, vstart))
    }

    /// The host ranges imported as GPU buffers so far: the pointer handed to the driver
    /// and the length (for the zero-copy proof).
    pub fn imported_views(&self) -> Vec<(*mut u8, usize)> {
        let g = self.geometry;
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views
            .slots
            .iter()
            .enumerate()
            // SAFETY: i * stride is inside the reservation (a view was imported there).
            .filter_map(|(i, s)| {
                s.as_ref()
                    .map(|(_, len)| (unsafe { self.map.base.add(i * g.stride) }, *len))
            })
            .collect()
    }
}

// SAFETY: the base comes from one mapping that lives until drop and is never remapped;
// `grow_to` only makes zero-filled anonymous pages readable and writable in place.
unsafe impl Region for WgpuRegion {
    fn base(&self) -> *mut u8 {
        self.map.base
    }

    fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&self, new_size: usize) -> Result<(), BackendError> {
        if new_size > self.capacity {
            return Err(BackendError::Capacity {
                requested: new_size,
                capacity: self.capacity,
            });
        }
        let _g = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.size.load(Ordering::Acquire);
        if new_size <= old {
            return Ok(());
        }
        let a = self.gpu.import_align;
        let from = round_up(old, a);
        let to = round_up(new_size, a).min(self.cap_aligned);
        if to > from {
            // SAFETY: [from, to) lies inside our reservation (to <= cap_aligned).
            let rc = unsafe {
                libc::mprotect(
                    self.map.base.add(from) as *mut libc::c_void,
                    to - from,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                return Err(BackendError::Io(std::io::Error::last_os_error()));
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
    // `map_file` keeps the default (read once): replacing pages with MAP_FIXED would
    // leave an already imported view pointing at the old physical pages.
}

impl Drop for WgpuRegion {
    fn drop(&mut self) {
        // Release the GPU's references to the pages before the mapping goes.
        let views = std::mem::take(&mut *self.views.lock().unwrap_or_else(|e| e.into_inner()));
        drop(views);
        let _ = self.gpu.device.poll(wgpu::PollType::wait_indefinitely());
    }
}

/// A page of host memory imported as a buffer: kernels report runtime errors there and
/// the host reads them after `wait`, with no copy.
pub(crate) struct StatusPage {
    pub buffer: wgpu::Buffer,
    map: Mapping,
}

impl StatusPage {
    fn new(gpu: &Gpu) -> Result<StatusPage, BackendError> {
        let a = gpu.import_align;
        let map = Mapping::new(a, a, true)?;
        // SAFETY: an aligned, read-write page of ours that outlives the buffer (field order).
        let buffer = unsafe { gpu.import(map.base, a)? };
        Ok(StatusPage { buffer, map })
    }

    fn word(&self) -> *mut u32 {
        self.map.base as *mut u32
    }

    /// Read and clear the error flags.
    pub fn take(&self) -> u32 {
        // SAFETY: the page is mapped read-write; the GPU is idle (called after wait).
        unsafe {
            let v = std::ptr::read_volatile(self.word());
            std::ptr::write_volatile(self.word(), 0);
            v
        }
    }
}
