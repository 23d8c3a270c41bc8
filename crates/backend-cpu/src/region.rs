//! The CPU region: one anonymous mapping, reserved `PROT_NONE` at its full size plus a
//! guard, with a read-write prefix that grows in place. The base never moves.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use samepage_backend::{read_file_into, BackendError, Region};

/// An `mmap`ed guest memory.
pub struct CpuRegion {
    base: *mut u8,
    /// Bytes mapped in all (capacity rounded up, plus the guard).
    mapped: usize,
    capacity: usize,
    size: AtomicUsize,
    grow: Mutex<()>,
}

// SAFETY: the region is a plain address range; `size` is atomic and growth is
// serialised by `grow`. Synchronising kernel access to the bytes is the caller's job.
unsafe impl Send for CpuRegion {}
unsafe impl Sync for CpuRegion {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

impl CpuRegion {
    /// Reserve `capacity + guard` bytes (`PROT_NONE`) and make the first `initial` bytes
    /// readable and writable (zero-filled).
    pub fn new(initial: usize, capacity: usize, guard: usize) -> Result<CpuRegion, BackendError> {
        let page = page_size();
        if initial > capacity {
            return Err(BackendError::Capacity {
                requested: initial,
                capacity,
            });
        }
        let overflow = || BackendError::Capacity {
            requested: usize::MAX,
            capacity,
        };
        let mapped = round_up(capacity, page)
            .checked_add(round_up(guard, page))
            .ok_or_else(overflow)?
            .max(page);
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(BackendError::Reserve {
                size: mapped,
                source: std::io::Error::last_os_error(),
            });
        }
        let region = CpuRegion {
            base: base as *mut u8,
            mapped,
            capacity,
            size: AtomicUsize::new(0),
            grow: Mutex::new(()),
        };
        region.grow_to(initial)?;
        Ok(region)
    }

    /// Lower the capacity the region reports (and may grow to); the reservation and
    /// guard stay mapped `PROT_NONE`.
    pub fn with_capacity(mut self, capacity: usize) -> CpuRegion {
        self.capacity = self.capacity.min(capacity).max(self.size());
        self
    }
}

// SAFETY: the base comes from one mmap that lives until drop and is never remapped as
// a whole; `grow_to` only changes protections of anonymous (zero-filled) pages inside it;
// `map_file` replaces pages inside the accessible prefix with readable-writable pages.
unsafe impl Region for CpuRegion {
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
        let page = page_size();
        let from = round_up(old, page);
        let to = round_up(new_size, page);
        if to > from {
            // SAFETY: [from, to) lies inside our mapping (to <= round_up(capacity) <= mapped).
            let rc = unsafe {
                libc::mprotect(
                    self.base.add(from) as *mut libc::c_void,
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

    fn map_file(&self, file: &File, file_offset: u64, dst: usize, len: usize) -> Result<(), BackendError> {
        let page = page_size();
        let end = dst.checked_add(len).ok_or(BackendError::Capacity {
            requested: usize::MAX,
            capacity: self.size(),
        })?;
        if end > self.size() {
            return Err(BackendError::Capacity {
                requested: end,
                capacity: self.size(),
            });
        }
        if (dst % page) as u64 != file_offset % page as u64 {
            return read_file_into(self, file, file_offset, dst, len);
        }
        let a = round_up(dst, page).min(end);
        let b = (end / page * page).max(a);
        let read = |from: usize, to: usize| -> Result<(), BackendError> {
            if to > from {
                // SAFETY: [from, to) is inside the accessible prefix (checked above).
                let buf = unsafe { std::slice::from_raw_parts_mut(self.base.add(from), to - from) };
                file.read_exact_at(buf, file_offset + (from - dst) as u64)?;
            }
            Ok(())
        };
        read(dst, a)?;
        if b > a {
            // SAFETY: [a, b) is page-aligned and inside the accessible prefix of our own
            // mapping, so MAP_FIXED replaces only our pages; the file offset is page-aligned
            // because dst and file_offset are congruent modulo the page size.
            let p = unsafe {
                libc::mmap(
                    self.base.add(a) as *mut libc::c_void,
                    b - a,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    (file_offset + (a - dst) as u64) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                let err = std::io::Error::last_os_error();
                // The old pages may be gone: restore zeroed anonymous pages, then read.
                // SAFETY: as above, our own range.
                unsafe {
                    libc::mmap(
                        self.base.add(a) as *mut libc::c_void,
                        b - a,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                read(a, b).map_err(|_| BackendError::Io(err))?;
            }
        }
        read(b, end)
    }

    fn hint(&self, offset: usize, len: usize, kind: u32) {
        if kind != samepage_abi::hint::WEIGHTS {
            return;
        }
        let page = page_size();
        let start = offset / page * page;
        let end = offset.saturating_add(len).min(self.size());
        if end > start {
            // SAFETY: advisory only, inside our mapping.
            unsafe {
                libc::madvise(
                    self.base.add(start) as *mut libc::c_void,
                    end - start,
                    libc::MADV_WILLNEED,
                )
            };
        }
    }
}

impl Drop for CpuRegion {
    fn drop(&mut self) {
        // SAFETY: we own the whole mapping; nothing refers to it after drop (Region contract).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.mapped) };
    }
}
