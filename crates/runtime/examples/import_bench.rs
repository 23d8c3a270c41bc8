//! The cost of crossing between the guest and the host (target: <= 100 ns per import).
//!
//! The loops run inside the testops guest and time themselves with `clock_ns`:
//! - `op`: an immediate Scale of one element (copy out the descriptor, validate, run);
//! - `clock_ns`: an import that does almost nothing;
//! - `backend_name` with a zero-byte buffer: the bare crossing plus one range check;
//! - `submit + wait`: replaying a one-op graph.
//!
//! And from the host: calling an empty guest export through `Instance::call`.
//!
//! Build the guest first: `scripts/build-guests.sh -p testops`, then
//! `cargo run --release -p samepage-runtime --example import_bench [iterations]`.
use std::sync::Arc;
use std::time::Instant;

use samepage_backend_cpu::CpuBackend;
use samepage_runtime::{HostConfig, Instance, Runtime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../guests/target/wasm32-unknown-unknown/release/testops.wasm"
    );
    let wasm = std::fs::read(path).map_err(|e| format!("{path}: {e}; run scripts/build-guests.sh first"))?;
    let rt = Runtime::new(Arc::new(CpuBackend::new()))?;
    let mut inst = Instance::new(&rt, &rt.compile(&wasm)?, HostConfig::new())?;

    println!("{:<36} {:>12} {:>10}", "call", "iterations", "ns/call");
    let row = |name: &str, iters: u32, ns: u64| println!("{name:<36} {iters:>12} {:>10.1}", ns as f64 / iters as f64);
    for (name, export, iters) in [
        ("guest -> op (scale, 1 element)", "bench_op", n),
        ("guest -> clock_ns", "bench_clock", n),
        ("guest -> backend_name (0 bytes)", "bench_name", n),
        ("guest -> submit + wait (1-op graph)", "bench_submit", n / 10),
    ] {
        let _: u64 = inst.call(export, iters / 100)?; // warm up
        let ns: u64 = inst.call(export, iters)?;
        if ns == 0 {
            return Err(format!("{export} failed: {}", inst.last_error()).into());
        }
        row(name, iters, ns);
    }
    let iters = n / 10;
    let t0 = Instant::now();
    for _ in 0..iters {
        inst.call::<(), ()>("noop", ())?;
    }
    row(
        "host -> guest export (Instance::call)",
        iters,
        t0.elapsed().as_nanos() as u64,
    );
    Ok(())
}
