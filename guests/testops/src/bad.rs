//! Bad input from inside the guest: every call must fail with the right status and a
//! readable `last_error`, and nothing may trap. Check ids are 1-based positions.
use samepage_guest::{self as sg, abi, abi::status, raw, Buffer, Recording};

use crate::util::*;

fn mem_size() -> u32 {
    (core::arch::wasm32::memory_size(0) * 65536) as u32
}

/// Run a raw op with a descriptor's bytes (possibly truncated).
fn op_bytes(code: u32, bytes: &[u8]) -> i32 {
    // SAFETY: the bytes live across the call.
    unsafe { raw::op(code, sg::off(bytes.as_ptr()), bytes.len() as u32) }
}

fn raw_op(code: u32, desc: u32, len: u32) -> i32 {
    // SAFETY: the host bounds-checks the descriptor and only reads it.
    unsafe { raw::op(code, desc, len) }
}

fn op<D: abi::Pod>(code: u32, d: &D) -> i32 {
    op_bytes(code, abi::pod_bytes(d))
}

pub fn run() -> Checked {
    let mut x = Buffer::f32s(64);
    let y = Buffer::f32s(64);
    let w = Buffer::new(4096, 64);
    let scale = abi::Scale {
        x: x.offset(),
        out: y.offset(),
        len: 64,
        scale: 2.0,
    };
    let matmul = abi::Matmul {
        w: w.offset(),
        dtype: abi::DType::F32 as u32,
        m: 4,
        k: 64,
        x: x.offset(),
        n: 1,
        out: y.offset(),
        bias: 0,
        flags: 0,
    };
    let end = mem_size();
    let sdesc = abi::pod_bytes(&scale);
    // Each call runs right before its check, so `last_error` is its own.
    let mut n = 0;
    let mut check = |what: &str, got: i32, want: i32| {
        n += 1;
        expect_status(n, what, got, want)
    };
    check("a good op", op(abi::op::SCALE, &scale), status::OK)?;
    // Descriptor pointer and length.
    check(
        "descriptor past memory",
        raw_op(abi::op::SCALE, end - 8, 16),
        status::OUT_OF_BOUNDS,
    )?;
    check(
        "descriptor at u32::MAX",
        raw_op(abi::op::SCALE, u32::MAX, 16),
        status::OUT_OF_BOUNDS,
    )?;
    check(
        "descriptor too short",
        op_bytes(abi::op::SCALE, &sdesc[..12]),
        status::BAD_DESCRIPTOR,
    )?;
    check(
        "descriptor of 1 GiB",
        raw_op(abi::op::SCALE, 0, 1 << 30),
        status::BAD_DESCRIPTOR,
    )?;
    check("unknown op code", op(77, &scale), status::BAD_OP)?;
    // Ranges.
    check(
        "tensor past memory",
        op(abi::op::SCALE, &abi::Scale { x: end - 128, ..scale }),
        status::OUT_OF_BOUNDS,
    )?;
    let x_max = abi::Scale {
        x: u32::MAX - 3,
        ..scale
    };
    check(
        "offset + len past 4 GiB",
        op(abi::op::SCALE, &x_max),
        status::OUT_OF_BOUNDS,
    )?;
    let huge = abi::Matmul {
        m: u32::MAX,
        k: u32::MAX,
        ..matmul
    };
    check("size overflows", op(abi::op::MATMUL, &huge), status::OVERFLOW)?;
    check(
        "zero length",
        op(abi::op::SCALE, &abi::Scale { len: 0, ..scale }),
        status::BAD_SHAPE,
    )?;
    let odd = abi::Scale {
        x: x.offset() + 2,
        ..scale
    };
    check("misaligned f32", op(abi::op::SCALE, &odd), status::MISALIGNED)?;
    let overlap = abi::Scale {
        out: x.offset() + 4,
        ..scale
    };
    check("partial overlap", op(abi::op::SCALE, &overlap), status::BAD_ARGUMENT)?;
    let nan = abi::Scale {
        scale: f32::NAN,
        ..scale
    };
    check("NaN scale", op(abi::op::SCALE, &nan), status::BAD_ARGUMENT)?;
    // Dtypes.
    check(
        "unknown dtype",
        op(abi::op::MATMUL, &abi::Matmul { dtype: 99, ..matmul }),
        status::BAD_DTYPE,
    )?;
    let u32w = abi::Matmul {
        dtype: abi::DType::U32 as u32,
        ..matmul
    };
    check("u32 weights", op(abi::op::MATMUL, &u32w), status::BAD_DTYPE)?;
    let kv = abi::KvStore {
        k: x.offset(),
        v: x.offset(),
        n: 1,
        n_kv_heads: 1,
        head_dim: 4,
        k_cache: w.offset(),
        v_cache: w.offset() + 1024,
        cache_dtype: abi::DType::Q8_0 as u32,
        ctx: 4,
        pos: y.offset(),
    };
    check("q8_0 kv cache", op(abi::op::KV_STORE, &kv), status::BAD_DTYPE)?;
    // Shapes.
    let q40 = abi::Matmul {
        dtype: abi::DType::Q4_0 as u32,
        k: 40,
        ..matmul
    };
    check(
        "q4_0 row not whole blocks",
        op(abi::op::MATMUL, &q40),
        status::BAD_SHAPE,
    )?;
    let att = abi::Attention {
        q: x.offset(),
        n: 1,
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 4,
        k_cache: w.offset(),
        v_cache: w.offset() + 1024,
        cache_dtype: abi::DType::F32 as u32,
        ctx: 4,
        pos: w.offset() + 2048,
        out: y.offset(),
        scale: 0.5,
    };
    check(
        "heads not a multiple of kv heads",
        op(abi::op::ATTENTION, &att),
        status::BAD_SHAPE,
    )?;
    let rope = abi::Rope {
        x: x.offset(),
        n: 1,
        n_heads: 1,
        head_dim: 8,
        n_rot: 3,
        mode: abi::ROPE_HALF,
        positions: y.offset(),
        freq_base: 10000.0,
        ..Default::default()
    };
    check("odd n_rot", op(abi::op::ROPE, &rope), status::BAD_SHAPE)?;
    // Host state and the other imports.
    // SAFETY (the raw calls below): the host bounds-checks every offset, and the only
    // memory written (last_error) is checked to be outside the guest's memory.
    unsafe {
        check("graph_end without begin", raw::graph_end(), status::BAD_STATE)?;
        check("submit of an unknown graph", raw::submit(12345), status::BAD_HANDLE)?;
        check("wait for an unknown graph", raw::wait(12345), status::BAD_HANDLE)?;
        check(
            "graph_free of an unknown graph",
            raw::graph_free(12345),
            status::BAD_HANDLE,
        )?;
        check(
            "mem_hint past memory",
            raw::mem_hint(end - 4, 8, abi::hint::WEIGHTS),
            status::OUT_OF_BOUNDS,
        )?;
        check(
            "mem_hint of an unknown kind",
            raw::mem_hint(x.offset(), 4, 99),
            status::BAD_ARGUMENT,
        )?;
        check(
            "emit past memory",
            raw::emit(abi::emit::LOG, end, 1),
            status::OUT_OF_BOUNDS,
        )?;
        check(
            "file_open path past memory",
            raw::file_open(end - 2, 4),
            status::OUT_OF_BOUNDS,
        )?;
        check(
            "file_size of an unknown handle",
            raw::file_size(777) as i32,
            status::BAD_HANDLE,
        )?;
        check(
            "file_read of an unknown handle",
            raw::file_read(777, 0, x.offset(), 4),
            status::BAD_HANDLE,
        )?;
        check(
            "last_error into bad memory",
            raw::last_error(end, 16),
            status::OUT_OF_BOUNDS,
        )?;
    }

    // A bad op inside a recording is refused and not recorded; the graph still works.
    let rec = Recording::begin().map_err(|_| fail(90, "graph_begin"))?;
    // SAFETY: no pointers.
    expect_status(
        91,
        "graph_begin twice",
        unsafe { raw::graph_begin() },
        status::BAD_STATE,
    )?;
    let zero = abi::Scale { len: 0, ..scale };
    expect_status(
        92,
        "bad op while recording",
        op(abi::op::SCALE, &zero),
        status::BAD_SHAPE,
    )?;
    ok(
        93,
        "good op while recording",
        sg::scale(&abi::Scale {
            x: x.offset(),
            out: x.offset(),
            len: 64,
            scale: 3.0,
        }),
    )?;
    let g = rec.end().map_err(|_| fail(94, "graph_end"))?;
    x.as_mut_slice::<f32>()[0] = 1.0;
    ok(95, "run the graph", g.run())?;
    expect(96, "the graph ran the good op only", x.as_slice::<f32>()[0] == 3.0)?;
    Ok(())
}
