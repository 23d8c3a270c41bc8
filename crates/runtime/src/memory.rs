//! The backend's region as Wasmtime's linear memory.
//!
//! Wasmtime asks an engine-wide [`MemoryCreator`] for each instance's memory 0. Ours asks
//! the backend for a fresh region and wraps it; the base never moves and growth happens
//! in place. Because the creator is engine-wide, the instance finds its own region
//! afterwards by base address in [`RegionCreator::take`] (the address Wasmtime reports
//! through `Memory::data_ptr`), which doubles as the zero-copy check: if Wasmtime were
//! using any other buffer, the lookup would fail.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use samepage_backend::{Backend, MemoryLayout, Region};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// The largest memory a wasm32 guest can address.
pub const MAX_MEMORY: usize = 1 << 32;

/// The number of graphs submitted and not yet waited for, shared by an instance's host
/// state and its memory: while it is non-zero, `memory.grow` is refused.
pub type InFlight = Arc<AtomicU32>;

/// A region made for an instance that has not claimed it yet.
struct Pending {
    region: Weak<dyn Region>,
    in_flight: InFlight,
}

/// Makes every guest memory a backend region.
pub struct RegionCreator {
    backend: Arc<dyn Backend>,
    layout: MemoryLayout,
    pending: Mutex<HashMap<usize, Pending>>,
}

impl RegionCreator {
    pub fn new(backend: Arc<dyn Backend>) -> RegionCreator {
        let layout = backend.memory_layout();
        RegionCreator {
            backend,
            layout,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Claim the region whose base is `base` (as Wasmtime reports it), once.
    pub fn take(&self, base: *mut u8) -> Option<(Arc<dyn Region>, InFlight)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let p = pending.remove(&(base as usize))?;
        Some((p.region.upgrade()?, p.in_flight))
    }
}

// SAFETY: every memory we return is a `Region`, whose contract gives a fixed base, a
// zero-filled accessible prefix and a reservation of `capacity()` bytes; we check below
// that the capacity covers the reservation Wasmtime compiled code for and that the
// backend's guard is at least the one Wasmtime was configured with.
unsafe impl MemoryCreator for RegionCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if ty.is_64() || ty.is_shared() || ty.page_size_log2() != 16 {
            return Err("samepage supports only unshared wasm32 memories with 64 KiB pages".into());
        }
        if guard_size_in_bytes as u64 > self.layout.guard {
            return Err(format!(
                "Wasmtime expects {guard_size_in_bytes} guard bytes but the {} backend provides {}",
                self.backend.name(),
                self.layout.guard
            ));
        }
        let reserved = reserved_size_in_bytes.unwrap_or(0);
        let capacity = if reserved > 0 {
            reserved
        } else {
            maximum.unwrap_or(MAX_MEMORY).min(MAX_MEMORY)
        };
        if minimum > capacity {
            return Err(format!(
                "the guest wants {minimum} bytes of memory, more than the {capacity}-byte region"
            ));
        }
        let region = self.backend.new_region(minimum, capacity).map_err(|e| e.to_string())?;
        if region.capacity() < capacity || region.size() < minimum {
            return Err(format!(
                "the {} backend made a region of {} bytes ({} accessible), asked for {capacity} ({minimum})",
                self.backend.name(),
                region.capacity(),
                region.size()
            ));
        }
        let in_flight = InFlight::default();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, p| p.region.strong_count() > 0);
        pending.insert(
            region.base() as usize,
            Pending {
                region: Arc::downgrade(&region),
                in_flight: in_flight.clone(),
            },
        );
        Ok(Box::new(RegionMemory { region, in_flight }))
    }
}

/// A region seen by Wasmtime.
struct RegionMemory {
    region: Arc<dyn Region>,
    in_flight: InFlight,
}

// SAFETY: the Region contract: the base never moves, [base, base + size) is accessible,
// grown memory is zero-filled, and growth up to capacity happens in place.
unsafe impl LinearMemory for RegionMemory {
    fn byte_size(&self) -> usize {
        self.region.size()
    }

    fn byte_capacity(&self) -> usize {
        self.region.capacity().min(MAX_MEMORY)
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        // The guest sees -1 from memory.grow: kernels may be using the memory.
        if self.in_flight.load(Ordering::Acquire) != 0 {
            wasmtime::bail!("cannot grow the guest memory while a graph is in flight");
        }
        self.region.grow_to(new_size).map_err(wasmtime::Error::new)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region.base()
    }
}
