//! The samepage guest SDK, for wasm32 programs that run under the samepage runtime.
//!
//! On wasm32 a pointer *is* an offset into linear memory, and linear memory *is* the
//! backend's buffer, so a tensor is just an aligned allocation in the guest's heap: the
//! guest fills it, passes its offset in an op descriptor, and reads the kernel's result
//! through the same pointer after the op (or after [`Submitted::wait`]).
//!
//! - [`Buffer`]: an aligned, zeroed allocation; its [`Buffer::offset`] goes into descriptors.
//! - [`run`]: one op in immediate mode; typed wrappers such as [`matmul`].
//! - [`Recording`] / [`Graph`]: record ops once, then [`Graph::submit`] and
//!   [`Submitted::wait`] per token.
//! - [`File`]: read or map a granted file straight into guest memory.
//! - Errors are [`Error`]: the status code and the host's readable reason.
//!
//! Off wasm32 (host builds, clippy, unit tests of guest logic) the imports are stubs that
//! return [`status::UNSUPPORTED`].
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;

pub use samepage_abi as abi;
use samepage_abi::{op, status, Pod};

/// The raw `samepage` imports, exactly as the host defines them
/// ([`samepage_abi::imports`]). Prefer the safe wrappers; these exist for tests that must
/// pass arbitrary offsets and for measuring the bare call cost.
///
/// # Safety
/// The host bounds-checks every offset, so no call can corrupt the host; but a call that
/// writes guest memory (`last_error`, `backend_name`, `file_read`, `file_map`, ops) may
/// overwrite any guest data the offsets name.
#[cfg(target_arch = "wasm32")]
pub mod raw {
    #[link(wasm_import_module = "samepage")]
    extern "C" {
        pub fn op(code: u32, desc: u32, len: u32) -> i32;
        pub fn graph_begin() -> i32;
        pub fn graph_end() -> i32;
        pub fn submit(graph: u32) -> i32;
        pub fn wait(graph: u32) -> i32;
        pub fn graph_free(graph: u32) -> i32;
        pub fn last_error(buf: u32, cap: u32) -> i32;
        pub fn mem_hint(offset: u32, len: u32, kind: u32) -> i32;
        pub fn file_open(path: u32, len: u32) -> i32;
        pub fn file_size(handle: u32) -> i64;
        pub fn file_read(handle: u32, file_offset: u64, dst: u32, len: u32) -> i32;
        pub fn file_map(handle: u32, file_offset: u64, dst: u32, len: u32) -> i32;
        pub fn emit(kind: u32, ptr: u32, len: u32) -> i32;
        pub fn clock_ns() -> u64;
        pub fn backend_name(buf: u32, cap: u32) -> i32;
    }
}

/// Stubs of the raw imports off wasm32 (they return [`status::UNSUPPORTED`]).
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc)]
pub mod raw {
    use samepage_abi::status::UNSUPPORTED;
    pub unsafe fn op(_: u32, _: u32, _: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn graph_begin() -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn graph_end() -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn submit(_: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn wait(_: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn graph_free(_: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn last_error(_: u32, _: u32) -> i32 {
        0
    }
    pub unsafe fn mem_hint(_: u32, _: u32, _: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn file_open(_: u32, _: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn file_size(_: u32) -> i64 {
        UNSUPPORTED as i64
    }
    pub unsafe fn file_read(_: u32, _: u64, _: u32, _: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn file_map(_: u32, _: u64, _: u32, _: u32) -> i32 {
        UNSUPPORTED
    }
    pub unsafe fn emit(_: u32, _: u32, _: u32) -> i32 {
        0
    }
    pub unsafe fn clock_ns() -> u64 {
        0
    }
    pub unsafe fn backend_name(_: u32, _: u32) -> i32 {
        0
    }
}

/// Export `samepage_abi_version` from a guest. Call once at the crate root.
#[macro_export]
macro_rules! export_abi_version {
    () => {
        #[no_mangle]
        pub extern "C" fn samepage_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }
    };
}

/// An error from the host: a status code and its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: i32,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{} ({})", status::name(self.status), self.status)
        } else {
            write!(f, "{}", self.message)
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The host's last error message.
pub fn last_error() -> String {
    let mut buf = vec![0u8; 512];
    // SAFETY: buf is a live allocation of buf.len() bytes in guest memory, borrowed
    // mutably: the host writes into it.
    let n = unsafe { raw::last_error(off(buf.as_mut_ptr()), buf.len() as u32) };
    let n = (n.max(0) as usize).min(buf.len());
    buf.truncate(n);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Turn a status code into a `Result`, fetching the reason on error.
pub fn check(code: i32) -> Result<i32> {
    if code >= 0 {
        Ok(code)
    } else {
        Err(Error {
            status: code,
            message: last_error(),
        })
    }
}

/// The offset of a pointer in guest memory (on wasm32, the address itself).
pub fn off<T>(p: *const T) -> u32 {
    p as usize as u32
}

/// Run (or, inside a recording, record) one op.
pub fn run<D: Pod>(code: u32, desc: &D) -> Result<()> {
    let bytes = abi::pod_bytes(desc);
    // SAFETY: the descriptor lives in guest memory for the duration of the call.
    check(unsafe { raw::op(code, off(bytes.as_ptr()), bytes.len() as u32) }).map(|_| ())
}

macro_rules! typed_ops {
    ($($(#[$m:meta])* $name:ident => $code:path, $ty:ty;)*) => {$(
        $(#[$m])*
        pub fn $name(d: &$ty) -> Result<()> {
            run($code, d)
        }
    )*};
}

typed_ops! {
    /// Embedding gather.
    embed => op::EMBED, abi::Embed;
    /// RMSNorm.
    rmsnorm => op::RMSNORM, abi::RmsNorm;
    /// `out (+)= x W^T (+ bias)`.
    matmul => op::MATMUL, abi::Matmul;
    /// Rotary embedding, in place.
    rope => op::ROPE, abi::Rope;
    /// Store K/V into the cache.
    kv_store => op::KV_STORE, abi::KvStore;
    /// Causal GQA attention over the cache.
    attention => op::ATTENTION, abi::Attention;
    /// `silu(gate) * up`.
    swiglu => op::SWIGLU, abi::SwiGlu;
    /// `a + b`.
    add => op::ADD, abi::Add;
    /// `x * s`.
    scale => op::SCALE, abi::Scale;
    /// Row softmax.
    softmax => op::SOFTMAX, abi::Softmax;
    /// Row argmax.
    argmax => op::ARGMAX, abi::Argmax;
    /// Sample a token.
    sample => op::SAMPLE, abi::Sample;
}

/// An open recording: ops run through [`run`] are validated and recorded, not executed.
pub struct Recording(());

impl Recording {
    pub fn begin() -> Result<Recording> {
        // SAFETY: no pointers.
        check(unsafe { raw::graph_begin() })?;
        Ok(Recording(()))
    }

    pub fn end(self) -> Result<Graph> {
        // SAFETY: no pointers.
        let id = check(unsafe { raw::graph_end() })?;
        Ok(Graph { id: id as u32 })
    }
}

/// A recorded graph; replays unchanged each [`Graph::submit`].
#[derive(Debug)]
pub struct Graph {
    id: u32,
}

impl Graph {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Start the graph. The returned token must be waited on before the guest touches
    /// the graph's tensors.
    pub fn submit(&self) -> Result<Submitted<'_>> {
        // SAFETY: no pointers.
        check(unsafe { raw::submit(self.id) })?;
        Ok(Submitted { graph: self })
    }

    /// Submit and wait.
    pub fn run(&self) -> Result<()> {
        self.submit()?.wait()
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: no pointers.
        unsafe { raw::graph_free(self.id) };
    }
}

/// A submitted graph.
#[must_use = "wait before touching the graph's tensors"]
pub struct Submitted<'a> {
    graph: &'a Graph,
}

impl Submitted<'_> {
    pub fn wait(self) -> Result<()> {
        // SAFETY: no pointers.
        check(unsafe { raw::wait(self.graph.id) }).map(|_| ())
    }
}

/// An aligned, zero-filled allocation in guest memory: a tensor's storage.
pub struct Buffer {
    ptr: *mut u8,
    layout: Layout,
    len: usize,
}

/// The page size placement hints work in ([`Buffer::hint`]).
pub const PAGE: usize = 4096;

// SAFETY: a Buffer owns its allocation.
unsafe impl Send for Buffer {}

impl Buffer {
    /// `bytes` zeroed bytes aligned to `align` (a power of two). Panics on allocation failure
    /// like any Rust allocation.
    pub fn new(bytes: usize, align: usize) -> Buffer {
        let layout = Layout::from_size_align(bytes.max(1), align).expect("bad buffer layout");
        Self::zeroed(layout, bytes).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    }

    /// A zeroed allocation of `layout` (non-zero size) holding `len` bytes, or `None`.
    fn zeroed(layout: Layout, len: usize) -> Option<Buffer> {
        // SAFETY: every caller's layout has non-zero size (`bytes.max(1)`).
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Buffer { ptr, layout, len })
    }

    /// Like [`Buffer::new`], but `None` when the allocation fails (e.g. the guest's 4 GiB
    /// address space is exhausted) or the layout is invalid, instead of trapping.
    pub fn try_new(bytes: usize, align: usize) -> Option<Buffer> {
        Self::zeroed(Layout::from_size_align(bytes.max(1), align).ok()?, bytes)
    }

    /// Like [`Buffer::try_new`], but the allocation owns whole pages: page-aligned and
    /// rounded up to a page, so no other allocation shares a page with it. For buffers
    /// given a placement [`hint`](Buffer::hint): the host places memory by pages, and a
    /// heap object the guest writes on a page of a device buffer would move that page to
    /// the host and back (on a CUDA managed region, a ~100 us stall per token).
    /// [`Buffer::len`] is still `bytes`.
    pub fn try_pages(bytes: usize) -> Option<Buffer> {
        Self::zeroed(
            Layout::from_size_align(bytes.max(1).checked_next_multiple_of(PAGE)?, PAGE).ok()?,
            bytes,
        )
    }

    /// `n` zeroed f32s, 64-byte aligned.
    pub fn f32s(n: usize) -> Buffer {
        Buffer::new(n * 4, 64)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The offset in guest memory, for descriptors.
    pub fn offset(&self) -> u32 {
        off(self.ptr)
    }

    /// The offset of byte `at` inside the buffer.
    pub fn offset_at(&self, at: usize) -> u32 {
        assert!(at <= self.len());
        off(self.ptr) + at as u32
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: owned allocation of len() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len()) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of len() bytes, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len()) }
    }

    /// View as a slice of `T` (`T` must fit the alignment; trailing bytes are ignored).
    pub fn as_slice<T: Plain>(&self) -> &[T] {
        assert!(self.layout.align() >= std::mem::align_of::<T>());
        // SAFETY: aligned, in bounds, T is plain data.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len() / std::mem::size_of::<T>()) }
    }

    pub fn as_mut_slice<T: Plain>(&mut self) -> &mut [T] {
        assert!(self.layout.align() >= std::mem::align_of::<T>());
        // SAFETY: aligned, in bounds, T is plain data, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len() / std::mem::size_of::<T>()) }
    }

    /// Advise the host what this buffer is for (one of [`abi::hint`]).
    pub fn hint(&self, kind: u32) {
        // SAFETY: the range is this live allocation.
        unsafe { raw::mem_hint(self.offset(), self.len() as u32, kind) };
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Plain data that any bit pattern is valid for.
///
/// # Safety
/// Implement only for types with no padding and no invalid bit patterns.
pub unsafe trait Plain: Copy {}
unsafe impl Plain for u8 {}
unsafe impl Plain for i8 {}
unsafe impl Plain for u16 {}
unsafe impl Plain for u32 {}
unsafe impl Plain for i32 {}
unsafe impl Plain for u64 {}
unsafe impl Plain for f32 {}

/// A file the host granted to this guest (the model file, or a file beside it).
#[derive(Debug)]
pub struct File {
    handle: u32,
}

impl File {
    pub fn open(path: &str) -> Result<File> {
        // SAFETY: the path bytes live in guest memory during the call.
        let h = check(unsafe { raw::file_open(off(path.as_ptr()), path.len() as u32) })?;
        Ok(File { handle: h as u32 })
    }

    pub fn size(&self) -> Result<u64> {
        // SAFETY: no pointers.
        let s = unsafe { raw::file_size(self.handle) };
        if s < 0 {
            return Err(Error {
                status: s as i32,
                message: last_error(),
            });
        }
        Ok(s as u64)
    }

    /// Read `dst.len()` bytes at `file_offset` straight into `dst`.
    pub fn read_at(&self, file_offset: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: dst is a live, exclusively borrowed range of guest memory.
        check(unsafe { raw::file_read(self.handle, file_offset, off(dst.as_mut_ptr()), dst.len() as u32) }).map(|_| ())
    }

    /// Place file bytes into `dst` without a second resident copy where the backend can
    /// (see [`abi::imports::FILE_MAP`]); `dst`'s address and `file_offset` must be congruent
    /// modulo 4096 for the zero-copy path.
    pub fn map_at(&self, file_offset: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: dst is a live, exclusively borrowed range of guest memory.
        check(unsafe { raw::file_map(self.handle, file_offset, off(dst.as_mut_ptr()), dst.len() as u32) }).map(|_| ())
    }
}

/// Stream generated text to the host. Returns `true` when the host asks the guest to stop.
pub fn emit_text(text: &str) -> bool {
    emit(abi::emit::TEXT, text.as_bytes())
}

/// Send a JSON message to the host. Returns `true` when the host asks the guest to stop.
pub fn emit_json(json: &str) -> bool {
    emit(abi::emit::JSON, json.as_bytes())
}

/// Send a log line to the host.
pub fn log(line: &str) {
    emit(abi::emit::LOG, line.as_bytes());
}

fn emit(kind: u32, bytes: &[u8]) -> bool {
    // SAFETY: bytes live in guest memory during the call.
    unsafe { raw::emit(kind, off(bytes.as_ptr()), bytes.len() as u32) != 0 }
}

/// Monotonic time in nanoseconds, from the host.
pub fn clock_ns() -> u64 {
    // SAFETY: no pointers.
    unsafe { raw::clock_ns() }
}

/// The name of the backend the host runs ("cpu", "cuda", ...).
pub fn backend_name() -> String {
    let mut buf = [0u8; 64];
    // SAFETY: buf is live guest memory, borrowed mutably: the host writes into it.
    let n = unsafe { raw::backend_name(off(buf.as_mut_ptr()), buf.len() as u32) };
    String::from_utf8_lossy(&buf[..(n.max(0) as usize).min(buf.len())]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buffers_own_their_pages() {
        // A small heap object between two page buffers must not land on their pages.
        let a = Buffer::try_pages(5000).unwrap();
        let small = Box::new([7u8; 24]);
        let b = Buffer::try_pages(1).unwrap();
        let page = |p: usize| p / PAGE;
        for buf in [&a, &b] {
            let start = buf.bytes().as_ptr() as usize;
            assert_eq!(start % PAGE, 0);
            let end = page(start + buf.len() - 1);
            let s = small.as_ptr() as usize;
            assert!(
                page(s) < page(start) || page(s + 23) > end,
                "a heap object shares a page"
            );
        }
        assert_eq!(a.len(), 5000);
        assert_eq!(b.len(), 1);
        assert!(a.bytes().iter().all(|&x| x == 0));
        let e = Buffer::try_new(0, 64).unwrap();
        assert!(e.is_empty());
    }
}
