//! The samepage runtime: a Wasmtime engine whose guests' linear memory is a backend region.
//!
//! Design choices:
//! - **One region per instance, never copied, never moved.** The engine's
//!   [`wasmtime::MemoryCreator`] asks the backend for a region and hands it to Wasmtime
//!   as the guest's (module-defined) memory 0; kernels read and write the same pages
//!   the guest does. [`Instance::new`] proves it: it finds its region by the address
//!   Wasmtime reports for the memory, and fails if none matches.
//! - **The `samepage` imports** ([`samepage_abi::imports`]) are typed Wasmtime host
//!   functions over `u32` offsets. Every descriptor is copied out of guest memory and
//!   validated ([`samepage_backend::Op::decode`]) before a kernel sees it; a bad argument
//!   is a negative status plus a `last_error` message, never a trap or a host panic.
//! - **Graphs**: `submit` marks the instance in flight until `wait`; meanwhile the
//!   guest's `memory.grow` returns -1 so kernels never see the memory change under them.
//! - **Errors**: host-side failures are [`RuntimeError`]; a guest trap is
//!   [`RuntimeError::Trap`] and poisons that instance (its program state is unknown), while
//!   the [`Runtime`] stays usable for new instances.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let backend: std::sync::Arc<dyn samepage_backend::Backend> = todo!();
//! use samepage_runtime::{HostConfig, Instance, Runtime};
//! let runtime = Runtime::new(backend)?;
//! let module = runtime.compile(&std::fs::read("llm.wasm")?)?;
//! let mut config = HostConfig::new();
//! config.grant("model.gguf");
//! let mut instance = Instance::new(&runtime, &module, config)?;
//! let response = instance.call_json(r#"{"op":"load"}"#)?;
//! # Ok(()) }
//! ```
use std::path::PathBuf;
use std::sync::Arc;

use samepage_abi::{exports, IMPORT_MODULE};
use samepage_backend::Backend;
use wasmtime::{Config, Engine, ExternType, InstanceAllocationStrategy, Linker, ValType};

mod files;
mod host;
mod instance;
mod memory;

pub use host::EmitFn;
pub use instance::{HostConfig, Instance};
pub use samepage_backend as backend;
/// The CPU backend (feature `cpu`, on by default).
#[cfg(feature = "cpu")]
pub use samepage_backend_cpu as cpu;
pub use wasmtime::{WasmParams, WasmResults};

use host::HostState;
use memory::RegionCreator;

/// The app protocol's exports (see [`Instance::call_json`]).
pub mod app {
    /// `sp_alloc(len: u32) -> u32`: 8-aligned, 0 on failure.
    pub const ALLOC: &str = "sp_alloc";
    /// `sp_free(ptr: u32, len: u32)`.
    pub const FREE: &str = "sp_free";
    /// `sp_call(ptr: u32, len: u32) -> u64`: `(resp_ptr << 32) | resp_len`.
    pub const CALL: &str = "sp_call";
}

/// Host-side errors.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("could not set up Wasmtime for the {backend} backend: {message}")]
    Engine { backend: &'static str, message: String },
    #[error("could not compile the guest: {0}")]
    Compile(String),
    #[error("not a samepage guest: {0}")]
    InvalidModule(String),
    #[error(
        "the guest speaks samepage ABI version {guest} but this runtime speaks version {host}; \
         rebuild the guest against this samepage"
    )]
    AbiMismatch { guest: u32, host: u32 },
    #[error("could not instantiate the guest: {0}")]
    Instantiate(String),
    #[error("the guest's memory at {data_ptr:#x} is not a region of the backend (zero-copy is broken)")]
    NotARegion { data_ptr: usize },
    #[error("the guest has no export `{name}` of the expected type: {message}")]
    MissingExport { name: String, message: String },
    #[error("the guest trapped in `{func}`: {message}")]
    Trap { func: String, message: String },
    #[error("the guest broke the app protocol: {0}")]
    Protocol(String),
    #[error("cannot grant {}: {source}", path.display())]
    Grant { path: PathBuf, source: std::io::Error },
    #[error("this instance trapped earlier and cannot be used again; create a new Instance")]
    Poisoned,
}

/// An engine configured for one backend. Cheap to share; make instances from it.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    backend: Arc<dyn Backend>,
    creator: Arc<RegionCreator>,
}

impl Runtime {
    /// Configure Wasmtime so that every guest memory is one of `backend`'s regions.
    pub fn new(backend: Arc<dyn Backend>) -> Result<Runtime, RuntimeError> {
        let layout = backend.memory_layout();
        let creator = Arc::new(RegionCreator::new(backend.clone()));
        let mut config = Config::new();
        config
            .with_host_memory(creator.clone())
            // The creator only takes part with the on-demand allocator.
            .allocation_strategy(InstanceAllocationStrategy::OnDemand)
            // Wasmtime elides bounds checks only if reservation + guard >= 4 GiB; the
            // backend's layout says what its regions really provide.
            .memory_reservation(layout.reservation)
            .memory_guard_size(layout.guard)
            .guard_before_linear_memory(false)
            .memory_reservation_for_growth(0)
            // Kernels hold the base address: it must never change.
            .memory_may_move(false)
            // With a custom memory, CoW images panic (upstream issue 10740).
            .memory_init_cow(false)
            // One memory per guest: the region.
            .wasm_multi_memory(false)
            .wasm_memory64(false);
        let err = |e: wasmtime::Error| RuntimeError::Engine {
            backend: backend.name(),
            message: format!("{e:#}"),
        };
        let engine = Engine::new(&config).map_err(err)?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(err)?;
        Ok(Runtime {
            engine,
            linker,
            backend,
            creator,
        })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Compile a guest and check that it is one: it defines and exports its memory,
    /// exports `samepage_abi_version`, and imports nothing but `samepage` functions.
    /// Runs no guest code.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, RuntimeError> {
        let module = match cache_path(&self.engine, wasm) {
            Some(path) => self.compile_cached(wasm, &path)?,
            None => wasmtime::Module::new(&self.engine, wasm).map_err(|e| RuntimeError::Compile(format!("{e:#}")))?,
        };
        check_module(&module)?;
        Ok(Module { inner: module })
    }

    /// Compiling the LLM guest takes seconds; its machine code is kept in a per-user
    /// cache keyed by the wasm bytes and the engine's configuration.
    fn compile_cached(&self, wasm: &[u8], path: &std::path::Path) -> Result<wasmtime::Module, RuntimeError> {
        if path.exists() {
            // SAFETY: the file was written by `Module::serialize` of an engine with the same
            // compatibility hash (part of its name), in the user's own cache directory;
            // Wasmtime checks the header and refuses a mismatched or corrupt artifact.
            if let Ok(m) = unsafe { wasmtime::Module::deserialize_file(&self.engine, path) } {
                return Ok(m);
            }
        }
        let m = wasmtime::Module::new(&self.engine, wasm).map_err(|e| RuntimeError::Compile(format!("{e:#}")))?;
        if let Ok(bytes) = m.serialize() {
            // Best effort, written atomically: a failed write only costs the next compile.
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::create_dir_all(path.parent().unwrap_or(path)).is_ok() && std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        Ok(m)
    }
}

/// Where the compiled form of `wasm` is cached (in [`samepage_backend::cache::dir`]);
/// `None` when caching is off or no directory is known.
fn cache_path(engine: &wasmtime::Engine, wasm: &[u8]) -> Option<std::path::PathBuf> {
    use std::hash::{Hash, Hasher};
    let dir = samepage_backend::cache::dir()?;
    let h = samepage_backend::cache::fnv1a(wasm);
    let mut e = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut e);
    Some(dir.join(format!("{h:016x}-{:016x}.cwasm", e.finish())))
}

/// A compiled, checked guest.
#[derive(Clone)]
pub struct Module {
    inner: wasmtime::Module,
}

fn check_module(module: &wasmtime::Module) -> Result<(), RuntimeError> {
    let invalid = |m: String| Err(RuntimeError::InvalidModule(m));
    for import in module.imports() {
        let (m, n) = (import.module(), import.name());
        if let ExternType::Memory(_) = import.ty() {
            return invalid(format!(
                "it imports its memory ({m}::{n}); a samepage guest must define and export it"
            ));
        }
        if m != IMPORT_MODULE || !host::IMPORTS.contains(&n) {
            return invalid(format!("it imports `{m}::{n}`, which samepage does not provide"));
        }
    }
    match module.get_export(exports::MEMORY) {
        Some(ExternType::Memory(ty)) if !ty.is_64() && !ty.is_shared() => {}
        Some(ExternType::Memory(_)) => return invalid("its memory must be a 32-bit, unshared memory".into()),
        _ => return invalid(format!("it does not export its memory as `{}`", exports::MEMORY)),
    }
    match module.get_export(exports::ABI_VERSION) {
        Some(ExternType::Func(f))
            if f.params().len() == 0 && f.results().len() == 1 && matches!(f.results().next(), Some(ValType::I32)) => {}
        _ => {
            return invalid(format!(
                "it does not export `{}() -> u32` (samepage_guest::export_abi_version!())",
                exports::ABI_VERSION
            ))
        }
    }
    Ok(())
}
