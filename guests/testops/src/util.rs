//! Buffers from values, and reporting a failed check as an id plus a log line.
use samepage_guest::{self as sg, Buffer};

/// A failed check: its id, already logged.
pub type Fail = i32;
pub type Checked<T = ()> = Result<T, Fail>;

pub fn f32_buf(v: &[f32]) -> Buffer {
    let mut b = Buffer::f32s(v.len());
    b.as_mut_slice::<f32>()[..v.len()].copy_from_slice(v);
    b
}

pub fn u32_buf(v: &[u32]) -> Buffer {
    let mut b = Buffer::new(v.len() * 4, 64);
    b.as_mut_slice::<u32>()[..v.len()].copy_from_slice(v);
    b
}

pub fn byte_buf(v: &[u8]) -> Buffer {
    let mut b = Buffer::new(v.len(), 64);
    b.bytes_mut()[..v.len()].copy_from_slice(v);
    b
}

pub fn f32s(b: &Buffer, n: usize) -> Vec<f32> {
    b.as_slice::<f32>()[..n].to_vec()
}

pub fn fail(id: i32, what: &str) -> Fail {
    sg::log(&format!("FAIL [{id}] {what}"));
    id
}

/// An op must succeed.
pub fn ok(id: i32, what: &str, r: sg::Result<()>) -> Checked {
    r.map_err(|e| fail(id, &format!("{what}: status {} ({e})", e.status)))
}

/// An error within tolerance (ggml-style normalised MSE).
pub fn close(id: i32, what: &str, got: &[f32], want: &[f64], tol: f64) -> Checked {
    let e = crate::refs::nmse(got, want);
    if e <= tol {
        sg::log(&format!("ok   [{id}] {what}: nmse {e:.2e} (tol {tol:.0e})"));
        Ok(())
    } else {
        Err(fail(id, &format!("{what}: nmse {e:.3e} > {tol:.0e}")))
    }
}

pub fn expect(id: i32, what: &str, cond: bool) -> Checked {
    if cond {
        Ok(())
    } else {
        Err(fail(id, what))
    }
}

/// A call must fail with `status`, and `last_error` must explain it.
pub fn expect_status(id: i32, what: &str, got: i32, status: i32) -> Checked {
    if got != status {
        return Err(fail(id, &format!("{what}: status {got}, expected {status}")));
    }
    let msg = sg::last_error();
    if status < 0 && msg.is_empty() {
        return Err(fail(id, &format!("{what}: empty last_error")));
    }
    sg::log(&format!("ok   [{id}] {what}: {msg}"));
    Ok(())
}

/// The status of a guest-SDK result (0 on success).
pub fn status_of(r: sg::Result<()>) -> i32 {
    r.err().map(|e| e.status).unwrap_or(0)
}
