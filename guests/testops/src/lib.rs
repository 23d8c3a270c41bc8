//! testops: a guest the runtime's tests drive. Every export checks something from inside
//! the guest and returns 0 (or a count of 0) on success, or the id of the first failed
//! check; each failure is also sent to the host as a log line through `emit`.
//!
//! - zero copy: `zc_fill`, `zc_check`, `zc_roundtrip`
//! - every op against scalar references, immediate and as a replayed graph: `all_ops`
//! - the graph state machine: `grow_while_in_flight`, `submit_twice`
//! - bad input from the guest side: `bad_ops`
//! - files: `file_checksum`; the app protocol: `sp_alloc`, `sp_free`, `sp_call`
//! - the cost of one import call: `bench_op`, `bench_clock`, `bench_name`, `bench_submit`
use std::alloc::{alloc_zeroed, dealloc, Layout};

use samepage_guest::{self as sg, abi, raw, Buffer, File, Recording};

mod bad;
mod graph;
mod ops;
mod refs;
mod util;

samepage_guest::export_abi_version!();

// ---- zero copy -------------------------------------------------------------------------

fn zc_value(i: u32) -> f32 {
    i as f32 * 0.25 + 1.0
}

/// Allocate `n` f32s (leaked), fill them with `i * 0.25 + 1`, return their offset.
#[no_mangle]
pub extern "C" fn zc_fill(n: u32) -> u32 {
    let mut b = Buffer::f32s(n as usize);
    for (i, v) in b.as_mut_slice::<f32>().iter_mut().enumerate() {
        *v = zc_value(i as u32);
    }
    let off = b.offset();
    std::mem::forget(b);
    off
}

/// Count the f32s at `off` that differ from `(i * 0.25 + 1) * scale`, read through the
/// guest's own pointer.
#[no_mangle]
pub extern "C" fn zc_check(off: u32, n: u32, scale: f32) -> u32 {
    // SAFETY: the host passes an offset from zc_fill with its length; on wasm32 an offset
    // is an address in this guest's memory.
    let v = unsafe { std::slice::from_raw_parts(off as usize as *const f32, n as usize) };
    v.iter()
        .enumerate()
        .filter(|&(i, &x)| x != zc_value(i as u32) * scale)
        .count() as u32
}

/// The guest writes, a kernel doubles in place, the guest reads through the same pointer.
/// Returns the number of wrong values (0), or u32::MAX if the op failed.
#[no_mangle]
pub extern "C" fn zc_roundtrip() -> u32 {
    let n = 1000;
    let off = zc_fill(n);
    if sg::scale(&abi::Scale {
        x: off,
        out: off,
        len: n,
        scale: 2.0,
    })
    .is_err()
    {
        return u32::MAX;
    }
    let bad = zc_check(off, n, 2.0);
    // SAFETY: allocated by zc_fill with this layout.
    unsafe {
        dealloc(
            off as usize as *mut u8,
            Layout::from_size_align(n as usize * 4, 64).unwrap(),
        )
    };
    bad
}

// ---- op conformance, state machine, bad input -----------------------------------------

/// Every op, every weight dtype, against scalar references: immediate mode, then a small
/// transformer step recorded once and replayed per token. 0 or the failed check's id.
#[no_mangle]
pub extern "C" fn all_ops() -> i32 {
    ops::run_all().and_then(|()| graph::replay()).err().unwrap_or(0)
}

/// Record a graph and grow the memory (allowed), submit it: `memory.grow` must fail until
/// `wait`, then succeed again.
#[no_mangle]
pub extern "C" fn grow_while_in_flight() -> i32 {
    let x = util::f32_buf(&[1.0; 16]);
    let rec = match Recording::begin() {
        Ok(r) => r,
        Err(_) => return 1,
    };
    if sg::scale(&abi::Scale {
        x: x.offset(),
        out: x.offset(),
        len: 16,
        scale: 1.5,
    })
    .is_err()
    {
        return 2;
    }
    let Ok(g) = rec.end() else { return 3 };
    // Growing between record and submit is fine: the recorded ranges stay valid.
    if core::arch::wasm32::memory_grow(0, 1) == usize::MAX {
        return 9;
    }
    let Ok(sub) = g.submit() else { return 4 };
    // No allocation in here: the allocator could call memory.grow itself.
    let during = core::arch::wasm32::memory_grow(0, 1);
    let waited = sub.wait();
    let after = core::arch::wasm32::memory_grow(0, 1);
    if during != usize::MAX {
        return 5;
    }
    if waited.is_err() {
        return 6;
    }
    if after == usize::MAX {
        return 7;
    }
    if x.as_slice::<f32>()[0] != 1.5 {
        return 8;
    }
    0
}

/// A second submit before `wait` is BAD_STATE; so is a wait with nothing submitted.
#[no_mangle]
pub extern "C" fn submit_twice() -> i32 {
    let x = util::f32_buf(&[2.0; 8]);
    let run = || -> util::Checked {
        let rec = Recording::begin().map_err(|_| 1)?;
        util::ok(
            2,
            "scale",
            sg::scale(&abi::Scale {
                x: x.offset(),
                out: x.offset(),
                len: 8,
                scale: 0.5,
            }),
        )?;
        let g = rec.end().map_err(|_| 3)?;
        let first = g.submit().map_err(|_| 4)?;
        let second = g.submit().err().map(|e| e.status).unwrap_or(0);
        util::expect_status(5, "second submit", second, abi::status::BAD_STATE)?;
        first.wait().map_err(|_| 6)?;
        // SAFETY: no pointers.
        let w = unsafe { raw::wait(g.id()) };
        util::expect_status(7, "wait without submit", w, abi::status::BAD_STATE)?;
        g.run().map_err(|_| 8)?;
        util::expect(9, "two runs scaled twice", x.as_slice::<f32>()[0] == 0.5)
    };
    run().err().unwrap_or(0)
}

/// Each class of bad input from inside the guest. 0 or the failed check's id.
#[no_mangle]
pub extern "C" fn bad_ops() -> i32 {
    bad::run().err().unwrap_or(0)
}

/// Deliberately trap.
#[no_mangle]
pub extern "C" fn trap_now() {
    core::arch::wasm32::unreachable()
}

/// Grow memory by `pages`; returns the old size in pages or -1.
#[no_mangle]
pub extern "C" fn grow(pages: u32) -> i32 {
    core::arch::wasm32::memory_grow(0, pages as usize) as i32
}

// ---- files -----------------------------------------------------------------------------

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Open the file named by the UTF-8 path at `[ptr, ptr + len)`, read it whole with
/// `file_read` and again with `file_map`, and return its FNV-1a hash, or the negative
/// status of the first failing call (-100 if the two copies differ).
#[no_mangle]
pub extern "C" fn file_checksum(ptr: u32, len: u32) -> i64 {
    // SAFETY: the host wrote the path into memory it got from sp_alloc.
    let path = unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, len as usize) };
    let Ok(path) = std::str::from_utf8(path) else {
        return -101;
    };
    let run = || -> sg::Result<i64> {
        let f = File::open(path)?;
        let size = f.size()? as usize;
        let mut read = Buffer::new(size, 4096);
        f.read_at(0, &mut read.bytes_mut()[..size])?;
        let mut mapped = Buffer::new(size, 4096);
        f.map_at(0, &mut mapped.bytes_mut()[..size])?;
        if read.bytes()[..size] != mapped.bytes()[..size] {
            return Ok(-100);
        }
        Ok(fnv1a(&read.bytes()[..size]) as i64)
    };
    run().unwrap_or_else(|e| e.status as i64)
}

// ---- the app protocol ------------------------------------------------------------------

/// 8-aligned, zeroed; 0 on failure.
#[no_mangle]
pub extern "C" fn sp_alloc(len: u32) -> u32 {
    let Ok(layout) = Layout::from_size_align(len.max(1) as usize, 8) else {
        return 0;
    };
    // SAFETY: non-zero size.
    unsafe { alloc_zeroed(layout) as usize as u32 }
}

#[no_mangle]
pub extern "C" fn sp_free(ptr: u32, len: u32) {
    if ptr != 0 {
        // SAFETY: allocated by sp_alloc with this length.
        unsafe {
            dealloc(
                ptr as usize as *mut u8,
                Layout::from_size_align(len.max(1) as usize, 8).unwrap(),
            )
        }
    }
}

/// Echo: `{"echo": <request>, "chunks": n, "backend": name}`; streams three text chunks
/// through `emit` first and stops early when the host asks.
#[no_mangle]
pub extern "C" fn sp_call(ptr: u32, len: u32) -> u64 {
    // SAFETY: the host wrote `len` bytes at `ptr` (from sp_alloc).
    let req = unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, len as usize) };
    let req = String::from_utf8_lossy(req);
    let mut chunks = 0;
    for c in ["hello", ", ", "world"] {
        chunks += 1;
        if sg::emit_text(c) {
            break;
        }
    }
    let resp = format!(
        r#"{{"echo":{req},"chunks":{chunks},"backend":"{}"}}"#,
        sg::backend_name()
    );
    let p = sp_alloc(resp.len() as u32);
    if p == 0 {
        return 0;
    }
    // SAFETY: p has resp.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(resp.as_ptr(), p as usize as *mut u8, resp.len()) };
    ((p as u64) << 32) | resp.len() as u64
}

// ---- import call cost ------------------------------------------------------------------

/// `n` immediate Scale ops of one element; returns the elapsed nanoseconds.
#[no_mangle]
pub extern "C" fn bench_op(n: u32) -> u64 {
    let x = util::f32_buf(&[1.0]);
    let d = abi::Scale {
        x: x.offset(),
        out: x.offset(),
        len: 1,
        scale: 1.0,
    };
    let bytes = abi::pod_bytes(&d);
    let (p, l) = (sg::off(bytes.as_ptr()), bytes.len() as u32);
    let t0 = sg::clock_ns();
    for _ in 0..n {
        // SAFETY: the descriptor lives across the calls.
        let s = unsafe { raw::op(abi::op::SCALE, p, l) };
        if s != 0 {
            return 0;
        }
    }
    sg::clock_ns() - t0
}

/// `n` calls of `clock_ns`; returns the elapsed nanoseconds.
#[no_mangle]
pub extern "C" fn bench_clock(n: u32) -> u64 {
    let t0 = sg::clock_ns();
    let mut acc = 0u64;
    for _ in 0..n {
        acc = acc.wrapping_add(sg::clock_ns());
    }
    core::hint::black_box(acc);
    sg::clock_ns() - t0
}

/// `n` calls of `backend_name` with no room for the name: the bare cost of an import
/// that checks one range; returns the elapsed nanoseconds.
#[no_mangle]
pub extern "C" fn bench_name(n: u32) -> u64 {
    let t0 = sg::clock_ns();
    for _ in 0..n {
        // SAFETY: zero bytes are written.
        core::hint::black_box(unsafe { raw::backend_name(0, 0) });
    }
    sg::clock_ns() - t0
}

/// `n` submit + wait pairs of a one-op graph; returns the elapsed nanoseconds.
#[no_mangle]
pub extern "C" fn bench_submit(n: u32) -> u64 {
    let x = util::f32_buf(&[1.0]);
    let Ok(rec) = Recording::begin() else { return 0 };
    if sg::scale(&abi::Scale {
        x: x.offset(),
        out: x.offset(),
        len: 1,
        scale: 1.0,
    })
    .is_err()
    {
        return 0;
    }
    let Ok(g) = rec.end() else { return 0 };
    let t0 = sg::clock_ns();
    for _ in 0..n {
        // SAFETY: no pointers.
        unsafe {
            raw::submit(g.id());
            raw::wait(g.id());
        }
    }
    sg::clock_ns() - t0
}

/// Does nothing: the host measures the cost of calling into the guest.
#[no_mangle]
pub extern "C" fn noop() {}
