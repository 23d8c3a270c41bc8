//! Shared helpers: the testops guest, runtimes for the CPU backend with and without
//! guard pages, and an instance whose guest log lines are printed and kept.
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use samepage_backend::{Backend, BackendError, Graph, Mem, MemoryLayout, Op, OpError, Region};
use samepage_backend_cpu::{CpuBackend, CpuRegion};
use samepage_runtime::{HostConfig, Instance, Module, Runtime};

pub fn testops_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guests/target/wasm32-unknown-unknown/release/testops.wasm")
}

/// The testops guest's bytes; fails the test clearly when it was not built.
pub fn testops_wasm() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        let path = testops_path();
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run scripts/build-guests.sh first (it builds guests/testops)",
                path.display()
            )
        })
    })
}

pub fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new())
}

/// The CPU backend configured like a backend without guard pages (CUDA managed memory):
/// reservation 0 and guard 0, so Wasmtime emits explicit bounds checks.
pub struct NoGuard(pub CpuBackend);

impl Backend for NoGuard {
    fn name(&self) -> &'static str {
        "cpu-noguard"
    }
    fn memory_layout(&self) -> MemoryLayout {
        MemoryLayout {
            reservation: 0,
            guard: 0,
        }
    }
    fn new_region(&self, initial: usize, capacity: usize) -> Result<Arc<dyn Region>, BackendError> {
        Ok(Arc::new(CpuRegion::new(initial, capacity, 0)?))
    }
    fn run(&self, mem: Mem, ops: &[Op]) -> Result<(), OpError> {
        self.0.run(mem, ops)
    }
    fn record(&self, ops: Vec<Op>) -> Result<Box<dyn Graph>, OpError> {
        self.0.record(ops)
    }
}

pub fn runtime() -> Runtime {
    Runtime::new(cpu()).expect("runtime")
}

pub fn runtime_no_guard() -> Runtime {
    Runtime::new(Arc::new(NoGuard(CpuBackend::new()))).expect("runtime without guard pages")
}

pub fn testops_module(rt: &Runtime) -> Module {
    rt.compile(testops_wasm()).expect("compile testops")
}

/// A config granting `path`.
pub fn granting(path: impl Into<std::path::PathBuf>) -> HostConfig {
    let mut c = HostConfig::new();
    c.grant(path);
    c
}

/// Log lines the guest emitted.
pub type Logs = Arc<Mutex<Vec<String>>>;

/// A testops instance whose emitted lines are printed (shown when a test fails) and kept.
pub fn testops(rt: &Runtime, mut config: HostConfig) -> (Instance, Logs) {
    let logs = Logs::default();
    let sink = logs.clone();
    config.on_emit(move |kind, bytes| {
        let line = String::from_utf8_lossy(bytes).into_owned();
        println!("guest[{kind}]: {line}");
        sink.lock().unwrap().push(line);
        false
    });
    let inst = Instance::new(rt, &testops_module(rt), config).expect("instantiate testops");
    (inst, logs)
}

/// Compile a hand-written module (the tests enable Wasmtime's `wat` feature, so
/// `compile` accepts the text format).
pub fn wat(rt: &Runtime, text: &str) -> Result<Module, samepage_runtime::RuntimeError> {
    rt.compile(text.as_bytes())
}
