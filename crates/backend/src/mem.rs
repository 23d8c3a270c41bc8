//! A view of a region's accessible bytes, for kernels.

/// The accessible part of a region: a base pointer and a length. Kernels build slices
/// from it at offsets that [`crate::Op::decode`] validated.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    base: *mut u8,
    len: usize,
}

// SAFETY: Mem is a plain address range; the synchronisation contract (the guest does
// not touch a graph's tensors between submit and wait) is enforced above it.
unsafe impl Send for Mem {}
unsafe impl Sync for Mem {}

impl Mem {
    /// # Safety
    /// `[base, base + len)` must be mapped, readable and writable for as long as the
    /// `Mem` (or anything derived from it) is used.
    pub unsafe fn new(base: *mut u8, len: usize) -> Mem {
        Mem { base, len }
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `[offset, offset + bytes)` lies inside the view.
    pub fn contains(&self, offset: usize, bytes: usize) -> bool {
        offset.checked_add(bytes).is_some_and(|end| end <= self.len)
    }

    /// A pointer to `offset`, typed.
    ///
    /// # Safety
    /// `offset` must be inside the view and aligned for `T`.
    pub unsafe fn ptr<T>(&self, offset: u32) -> *mut T {
        debug_assert!((offset as usize) <= self.len);
        self.base.add(offset as usize) as *mut T
    }

    /// A shared slice of `len` `T`s at `offset`.
    ///
    /// # Safety
    /// The range must have been validated (inside the view, aligned), and no `&mut`
    /// to an overlapping range may be alive while the slice is used.
    pub unsafe fn slice<'a, T>(&self, offset: u32, len: usize) -> &'a [T] {
        debug_assert!(self.contains(offset as usize, len * std::mem::size_of::<T>()));
        debug_assert_eq!((self.base as usize + offset as usize) % std::mem::align_of::<T>(), 0);
        std::slice::from_raw_parts(self.ptr::<T>(offset), len)
    }

    /// A mutable slice of `len` `T`s at `offset`.
    ///
    /// # Safety
    /// As [`Mem::slice`], and no other reference to an overlapping range may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<'a, T>(&self, offset: u32, len: usize) -> &'a mut [T] {
        debug_assert!(self.contains(offset as usize, len * std::mem::size_of::<T>()));
        debug_assert_eq!((self.base as usize + offset as usize) % std::mem::align_of::<T>(), 0);
        std::slice::from_raw_parts_mut(self.ptr::<T>(offset), len)
    }

    /// Read a little-endian `u32` that the guest wrote (a position, a token id), checking
    /// the bounds: per-token values are read at execution time.
    pub fn read_u32(&self, offset: u32) -> Option<u32> {
        if !self.contains(offset as usize, 4) {
            return None;
        }
        // SAFETY: in bounds (checked); read_unaligned has no alignment requirement.
        Some(unsafe { std::ptr::read_unaligned(self.base.add(offset as usize) as *const u32) })
    }

    /// Read a little-endian `u64` (the sampler's RNG state).
    pub fn read_u64(&self, offset: u32) -> Option<u64> {
        if !self.contains(offset as usize, 8) {
            return None;
        }
        // SAFETY: in bounds (checked).
        Some(unsafe { std::ptr::read_unaligned(self.base.add(offset as usize) as *const u64) })
    }

    /// Write a `u64` (bounds-checked).
    pub fn write_u64(&self, offset: u32, v: u64) -> Option<()> {
        if !self.contains(offset as usize, 8) {
            return None;
        }
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::write_unaligned(self.base.add(offset as usize) as *mut u64, v) };
        Some(())
    }

    /// Write a `u32` (bounds-checked).
    pub fn write_u32(&self, offset: u32, v: u32) -> Option<()> {
        if !self.contains(offset as usize, 4) {
            return None;
        }
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::write_unaligned(self.base.add(offset as usize) as *mut u32, v) };
        Some(())
    }

    /// Read a Pod descriptor-like struct (e.g. [`samepage_abi::SampleParams`]).
    pub fn read_pod<T: samepage_abi::Pod>(&self, offset: u32) -> Option<T> {
        let n = std::mem::size_of::<T>();
        if !self.contains(offset as usize, n) {
            return None;
        }
        // SAFETY: in bounds (checked); T is Pod.
        Some(unsafe { std::ptr::read_unaligned(self.base.add(offset as usize) as *const T) })
    }
}
