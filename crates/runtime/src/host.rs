//! The `samepage` imports: per-instance host state and the functions the guest calls.
//!
//! Every import takes `u32` offsets into the guest's memory, which is the region. The
//! host reads and writes guest memory only through [`HostState::guest`] and
//! [`HostState::guest_mut`], which check the range against the region's current size
//! first. A bad argument becomes a negative status and a `last_error` message; the host
//! never panics on guest input and never traps for it.
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use samepage_abi::{self as abi, imports, status};
use samepage_backend::{Backend, Graph, Op, OpError, Region};
use wasmtime::{Caller, Linker};

use crate::files::Grants;
use crate::memory::InFlight;

/// Receives what the guest emits: `(kind, bytes)`; return `true` to ask the guest to stop.
pub type EmitFn = Box<dyn FnMut(u32, &[u8]) -> bool + Send>;

/// The largest descriptor of any op, rounded up; longer `desc_len`s are refused unread.
const MAX_DESCRIPTOR: usize = 64;
/// Limits that keep a misbehaving guest from exhausting host memory.
const MAX_GRAPHS: usize = 4096;
const MAX_GRAPH_OPS: usize = 1 << 20;
const MAX_FILES: usize = 1024;
const MAX_PATH: u32 = 4096;

type HostResult<T = i32> = Result<T, OpError>;

struct Slot {
    graph: Box<dyn Graph>,
    submitted: bool,
}

/// One instance's host side.
pub struct HostState {
    backend: Arc<dyn Backend>,
    /// Bound right after instantiation (see `RegionCreator::take`).
    region: Option<Arc<dyn Region>>,
    in_flight: InFlight,
    recording: Option<Vec<Op>>,
    graphs: Vec<Option<Slot>>,
    files: Vec<Option<File>>,
    grants: Grants,
    emit: Option<EmitFn>,
    last_error: String,
    started: Instant,
}

impl HostState {
    pub fn new(backend: Arc<dyn Backend>, grants: Grants, emit: Option<EmitFn>) -> HostState {
        HostState {
            backend,
            region: None,
            in_flight: InFlight::default(),
            recording: None,
            graphs: Vec::new(),
            files: Vec::new(),
            grants,
            emit,
            last_error: String::new(),
            started: Instant::now(),
        }
    }

    pub fn bind(&mut self, region: Arc<dyn Region>, in_flight: InFlight) {
        self.region = Some(region);
        self.in_flight = in_flight;
    }

    pub fn set_emit(&mut self, emit: Option<EmitFn>) {
        self.emit = emit;
    }

    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// Wait for every submitted graph (after a trap, or before the region goes away).
    pub fn quiesce(&mut self) {
        for slot in self.graphs.iter_mut().flatten() {
            if slot.submitted {
                let _ = slot.graph.wait();
                slot.submitted = false;
            }
        }
        self.in_flight.store(0, Ordering::Release);
        self.recording = None;
    }

    /// Turn a result into the status the guest sees, remembering the reason.
    fn status(&mut self, r: HostResult) -> i32 {
        match r {
            Ok(v) => v,
            Err(e) => {
                self.last_error = e.message;
                e.status
            }
        }
    }

    fn bound(&self) -> HostResult<&Arc<dyn Region>> {
        self.region.as_ref().ok_or_else(|| {
            OpError::new(
                status::BAD_STATE,
                "guest memory is not ready (called during instantiation)",
            )
        })
    }

    /// Check `[ptr, ptr + len)` against the accessible region.
    fn check(&self, what: &str, ptr: u32, len: u32) -> HostResult<&Arc<dyn Region>> {
        let region = self.bound()?;
        let end = ptr as u64 + len as u64;
        if end > region.size() as u64 {
            return Err(OpError::new(
                status::OUT_OF_BOUNDS,
                format!(
                    "{what}: [{ptr}, {end}) is outside the {}-byte guest memory",
                    region.size()
                ),
            ));
        }
        Ok(region)
    }

    /// Guest bytes, bounds-checked.
    fn guest(&self, what: &str, ptr: u32, len: u32) -> HostResult<&[u8]> {
        let region = self.check(what, ptr, len)?;
        // SAFETY: the range is inside the accessible region (checked), which stays mapped
        // while `self` holds the Arc; the guest is not running while an import runs.
        Ok(unsafe { std::slice::from_raw_parts(region.base().add(ptr as usize), len as usize) })
    }

    /// Copy `bytes` (truncated to `cap`) into guest memory; returns the full length.
    fn copy_out(&self, what: &str, bytes: &[u8], buf: u32, cap: u32) -> HostResult {
        let n = bytes.len().min(cap as usize);
        let region = self.check(what, buf, n as u32)?;
        // SAFETY: [buf, buf + n) is inside the accessible region (checked); `bytes` is host
        // memory (a String of ours), so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.base().add(buf as usize), n) };
        Ok(bytes.len().min(i32::MAX as usize) as i32)
    }

    pub fn op(&mut self, code: u32, desc: u32, desc_len: u32) -> i32 {
        let r = self.op_inner(code, desc, desc_len);
        self.status(r)
    }

    fn op_inner(&mut self, code: u32, desc: u32, desc_len: u32) -> HostResult {
        if desc_len as usize > MAX_DESCRIPTOR {
            return Err(OpError::new(
                status::BAD_DESCRIPTOR,
                format!(
                    "{}: a {desc_len}-byte descriptor is longer than any op's",
                    abi::op::name(code)
                ),
            ));
        }
        // Copy the descriptor out first: the kernels must see exactly what was validated.
        let mut copy = [0u8; MAX_DESCRIPTOR];
        let copy = &mut copy[..desc_len as usize];
        copy.copy_from_slice(self.guest("op descriptor", desc, desc_len)?);
        let mem = self.bound()?.mem();
        let op = Op::decode(code, copy, mem.len())?;
        if !self.backend.supports(&op) {
            return Err(OpError::unsupported(format!(
                "{}: the {} backend does not support {op:?}",
                op.name(),
                self.backend.name()
            )));
        }
        if let Some(rec) = &mut self.recording {
            if rec.len() >= MAX_GRAPH_OPS {
                return Err(OpError::new(
                    status::BAD_STATE,
                    format!("a graph may hold at most {MAX_GRAPH_OPS} ops"),
                ));
            }
            rec.push(op);
            return Ok(status::OK);
        }
        let backend = &self.backend;
        guarded(backend.name(), op.name(), || backend.run(mem, &[op]))?;
        Ok(status::OK)
    }

    pub fn graph_begin(&mut self) -> i32 {
        let r = if self.recording.is_some() {
            Err(OpError::new(
                status::BAD_STATE,
                "graph_begin: a graph is already being recorded",
            ))
        } else {
            self.recording = Some(Vec::new());
            Ok(status::OK)
        };
        self.status(r)
    }

    pub fn graph_end(&mut self) -> i32 {
        let r = self.graph_end_inner();
        self.status(r)
    }

    fn graph_end_inner(&mut self) -> HostResult {
        let ops = self
            .recording
            .take()
            .ok_or_else(|| OpError::new(status::BAD_STATE, "graph_end: no graph is being recorded"))?;
        let free = self.graphs.iter().position(Option::is_none);
        if free.is_none() && self.graphs.len() >= MAX_GRAPHS {
            return Err(OpError::new(
                status::BAD_STATE,
                format!("graph_end: at most {MAX_GRAPHS} graphs may be alive"),
            ));
        }
        let backend = &self.backend;
        let slot = Slot {
            graph: guarded(backend.name(), "graph_end", || backend.record(ops))?,
            submitted: false,
        };
        let id = match free {
            Some(i) => {
                self.graphs[i] = Some(slot);
                i
            }
            None => {
                self.graphs.push(Some(slot));
                self.graphs.len() - 1
            }
        };
        Ok(id as i32)
    }

    fn slot(&mut self, what: &str, id: u32) -> HostResult<&mut Slot> {
        self.graphs
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| OpError::new(status::BAD_HANDLE, format!("{what}: no graph with id {id}")))
    }

    pub fn submit(&mut self, id: u32) -> i32 {
        let r = self.submit_inner(id);
        self.status(r)
    }

    /// Launch a graph. A launch that fails leaves nothing in flight and returns its error
    /// here; otherwise [`HostState::wait`] returns the graph's status.
    fn submit_inner(&mut self, id: u32) -> HostResult {
        let mem = self.bound()?.mem();
        let in_flight = self.in_flight.clone();
        let name = self.backend.name();
        let slot = self.slot("submit", id)?;
        if slot.submitted {
            return Err(OpError::new(
                status::BAD_STATE,
                format!("submit: graph {id} was already submitted; wait for it first"),
            ));
        }
        // Mark in flight before launching so a concurrent grow can never race the kernels.
        in_flight.fetch_add(1, Ordering::AcqRel);
        match guarded(name, "submit", || slot.graph.launch(mem)) {
            Ok(()) => {
                slot.submitted = true;
                Ok(status::OK)
            }
            Err(e) => {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    pub fn wait(&mut self, id: u32) -> i32 {
        let r = self.wait_inner(id);
        self.status(r)
    }

    fn wait_inner(&mut self, id: u32) -> HostResult {
        let in_flight = self.in_flight.clone();
        let name = self.backend.name();
        let slot = self.slot("wait", id)?;
        if !slot.submitted {
            return Err(OpError::new(
                status::BAD_STATE,
                format!("wait: graph {id} is not submitted"),
            ));
        }
        let r = guarded(name, "wait", || slot.graph.wait());
        slot.submitted = false;
        in_flight.fetch_sub(1, Ordering::AcqRel);
        r.map(|()| status::OK)
    }

    pub fn graph_free(&mut self, id: u32) -> i32 {
        let r = self.slot("graph_free", id).map(|slot| {
            if slot.submitted {
                // The SDK cannot do this, but a raw guest can: never free under running kernels.
                let _ = slot.graph.wait();
                slot.submitted = false;
                true
            } else {
                false
            }
        });
        let r = r.map(|was_in_flight| {
            if was_in_flight {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            self.graphs[id as usize] = None;
            status::OK
        });
        self.status(r)
    }

    pub fn last_error_into(&mut self, buf: u32, cap: u32) -> i32 {
        let msg = std::mem::take(&mut self.last_error);
        let r = self.copy_out("last_error", msg.as_bytes(), buf, cap);
        if self.last_error.is_empty() {
            self.last_error = msg;
        }
        self.status(r)
    }

    pub fn backend_name_into(&mut self, buf: u32, cap: u32) -> i32 {
        let r = self.copy_out("backend_name", self.backend.name().as_bytes(), buf, cap);
        self.status(r)
    }

    pub fn mem_hint(&mut self, offset: u32, len: u32, kind: u32) -> i32 {
        let r = self.check("mem_hint", offset, len).and_then(|region| {
            if kind > abi::hint::HOST {
                return Err(OpError::new(
                    status::BAD_ARGUMENT,
                    format!("mem_hint: unknown kind {kind}"),
                ));
            }
            region.hint(offset as usize, len as usize, kind);
            Ok(status::OK)
        });
        self.status(r)
    }

    pub fn file_open(&mut self, path: u32, len: u32) -> i32 {
        let r = self.file_open_inner(path, len);
        self.status(r)
    }

    fn file_open_inner(&mut self, path: u32, len: u32) -> HostResult {
        if len > MAX_PATH {
            return Err(OpError::new(
                status::BAD_ARGUMENT,
                format!("file_open: a {len}-byte path is too long"),
            ));
        }
        let name = std::str::from_utf8(self.guest("file_open path", path, len)?)
            .map_err(|_| OpError::new(status::BAD_ARGUMENT, "file_open: the path is not UTF-8"))?;
        let file = self.grants.open(name).map_err(|m| OpError::new(status::IO, m))?;
        let free = self.files.iter().position(Option::is_none);
        let id = match free {
            Some(i) => i,
            None if self.files.len() < MAX_FILES => {
                self.files.push(None);
                self.files.len() - 1
            }
            None => {
                return Err(OpError::new(
                    status::IO,
                    format!("file_open: at most {MAX_FILES} files may be open"),
                ));
            }
        };
        self.files[id] = Some(file);
        Ok(id as i32)
    }

    fn file(&self, what: &str, handle: u32) -> HostResult<&File> {
        self.files
            .get(handle as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| OpError::new(status::BAD_HANDLE, format!("{what}: no open file with handle {handle}")))
    }

    pub fn file_size(&mut self, handle: u32) -> i64 {
        let r = self.file("file_size", handle).and_then(|f| {
            f.metadata()
                .map(|m| m.len().min(i64::MAX as u64) as i64)
                .map_err(|e| OpError::new(status::IO, format!("file_size: {e}")))
        });
        match r {
            Ok(n) => n,
            Err(e) => self.status(Err(e)) as i64,
        }
    }

    pub fn file_read(&mut self, handle: u32, file_offset: u64, dst: u32, len: u32) -> i32 {
        let r = self.file_copy("file_read", handle, file_offset, dst, len, false);
        self.status(r)
    }

    pub fn file_map(&mut self, handle: u32, file_offset: u64, dst: u32, len: u32) -> i32 {
        let r = self.file_copy("file_map", handle, file_offset, dst, len, true);
        self.status(r)
    }

    fn file_copy(&self, what: &str, handle: u32, file_offset: u64, dst: u32, len: u32, map: bool) -> HostResult {
        let file = self.file(what, handle)?;
        let region = self.check(what, dst, len)?;
        if len == 0 {
            return Ok(status::OK);
        }
        let io = |e: samepage_backend::BackendError| {
            OpError::new(
                status::IO,
                format!("{what}: {len} bytes at file offset {file_offset}: {e}"),
            )
        };
        if map {
            region
                .map_file(file, file_offset, dst as usize, len as usize)
                .map_err(io)?;
        } else {
            samepage_backend::read_file_into(&**region, file, file_offset, dst as usize, len as usize).map_err(io)?;
        }
        Ok(status::OK)
    }

    pub fn emit(&mut self, kind: u32, ptr: u32, len: u32) -> i32 {
        let r = self.emit_inner(kind, ptr, len);
        self.status(r)
    }

    fn emit_inner(&mut self, kind: u32, ptr: u32, len: u32) -> HostResult {
        if kind > abi::emit::LOG {
            return Err(OpError::new(status::BAD_ARGUMENT, format!("emit: unknown kind {kind}")));
        }
        let region = self.check("emit", ptr, len)?.clone();
        let Some(emit) = self.emit.as_mut() else { return Ok(0) };
        // SAFETY: checked above; the region stays alive through `region`.
        let bytes = unsafe { std::slice::from_raw_parts(region.base().add(ptr as usize), len as usize) };
        Ok(emit(kind, bytes) as i32)
    }

    pub fn clock_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

/// Run a backend call, turning a panic (a backend bug) into a run-time error for the
/// guest instead of unwinding through Wasmtime and taking the host down.
fn guarded<T>(backend: &str, what: &str, f: impl FnOnce() -> HostResult<T>) -> HostResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(OpError::runtime(format!(
            "internal error: the {backend} backend panicked in {what}: {why} (a bug; please report it)"
        )))
    })
}

impl Drop for HostState {
    fn drop(&mut self) {
        // An asynchronous backend may still be running a graph on the region.
        self.quiesce();
    }
}

/// Define the `samepage` imports.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    type C<'a> = Caller<'a, HostState>;
    let m = abi::IMPORT_MODULE;
    linker.func_wrap(m, imports::OP, |mut c: C, code: u32, desc: u32, len: u32| {
        c.data_mut().op(code, desc, len)
    })?;
    linker.func_wrap(m, imports::GRAPH_BEGIN, |mut c: C| c.data_mut().graph_begin())?;
    linker.func_wrap(m, imports::GRAPH_END, |mut c: C| c.data_mut().graph_end())?;
    linker.func_wrap(m, imports::SUBMIT, |mut c: C, id: u32| c.data_mut().submit(id))?;
    linker.func_wrap(m, imports::WAIT, |mut c: C, id: u32| c.data_mut().wait(id))?;
    linker.func_wrap(m, imports::GRAPH_FREE, |mut c: C, id: u32| c.data_mut().graph_free(id))?;
    linker.func_wrap(m, imports::LAST_ERROR, |mut c: C, buf: u32, cap: u32| {
        c.data_mut().last_error_into(buf, cap)
    })?;
    linker.func_wrap(m, imports::MEM_HINT, |mut c: C, off: u32, len: u32, kind: u32| {
        c.data_mut().mem_hint(off, len, kind)
    })?;
    linker.func_wrap(m, imports::FILE_OPEN, |mut c: C, path: u32, len: u32| {
        c.data_mut().file_open(path, len)
    })?;
    linker.func_wrap(m, imports::FILE_SIZE, |mut c: C, h: u32| c.data_mut().file_size(h))?;
    linker.func_wrap(
        m,
        imports::FILE_READ,
        |mut c: C, h: u32, off: u64, dst: u32, len: u32| c.data_mut().file_read(h, off, dst, len),
    )?;
    linker.func_wrap(
        m,
        imports::FILE_MAP,
        |mut c: C, h: u32, off: u64, dst: u32, len: u32| c.data_mut().file_map(h, off, dst, len),
    )?;
    linker.func_wrap(m, imports::EMIT, |mut c: C, kind: u32, ptr: u32, len: u32| {
        c.data_mut().emit(kind, ptr, len)
    })?;
    linker.func_wrap(m, imports::CLOCK_NS, |c: C| c.data().clock_ns())?;
    linker.func_wrap(m, imports::BACKEND_NAME, |mut c: C, buf: u32, cap: u32| {
        c.data_mut().backend_name_into(buf, cap)
    })?;
    Ok(())
}

/// The names of the imports a guest may use, for checking a module up front.
pub const IMPORTS: &[&str] = &[
    imports::OP,
    imports::GRAPH_BEGIN,
    imports::GRAPH_END,
    imports::SUBMIT,
    imports::WAIT,
    imports::GRAPH_FREE,
    imports::LAST_ERROR,
    imports::MEM_HINT,
    imports::FILE_OPEN,
    imports::FILE_SIZE,
    imports::FILE_READ,
    imports::FILE_MAP,
    imports::EMIT,
    imports::CLOCK_NS,
    imports::BACKEND_NAME,
];
