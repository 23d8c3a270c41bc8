//! A guest instance: its store, its region, typed calls and the app protocol.
use std::any::{Any, TypeId};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use samepage_abi::{exports, ABI_VERSION};
use samepage_backend::Region;
use wasmtime::{Memory, Store, TypedFunc, WasmParams, WasmResults};

use crate::files::Grants;
use crate::host::{EmitFn, HostState};
use crate::{app, Module, Runtime, RuntimeError};

/// What the host grants an instance.
///
/// ```
/// # use samepage_runtime::HostConfig;
/// let mut config = HostConfig::new();
/// config.grant("/models/llama").on_emit(|_kind, bytes| {
///     print!("{}", String::from_utf8_lossy(bytes));
///     false
/// });
/// ```
#[derive(Default)]
pub struct HostConfig {
    grants: Vec<PathBuf>,
    emit: Option<EmitFn>,
}

impl HostConfig {
    pub fn new() -> HostConfig {
        HostConfig::default()
    }

    /// Let the guest open `path`: a file (the model; relative names resolve beside it,
    /// but only this file may be opened) or a directory (any file inside it).
    pub fn grant(&mut self, path: impl Into<PathBuf>) -> &mut HostConfig {
        self.grants.push(path.into());
        self
    }

    /// Receive the guest's `emit` output: `(kind, bytes)`, return `true` to ask it to stop.
    pub fn on_emit(&mut self, f: impl FnMut(u32, &[u8]) -> bool + Send + 'static) -> &mut HostConfig {
        self.emit = Some(Box::new(f));
        self
    }
}

impl fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostConfig")
            .field("grants", &self.grants)
            .field("emit", &self.emit.is_some())
            .finish()
    }
}

/// One running guest. Its memory is its region.
pub struct Instance {
    store: Store<HostState>,
    instance: wasmtime::Instance,
    memory: Memory,
    region: Arc<dyn Region>,
    poisoned: bool,
    /// Typed exports already looked up: `(name, TypeId of TypedFunc<P, R>, TypedFunc)`.
    funcs: Vec<(String, TypeId, Box<dyn Any + Send + Sync>)>,
}

impl Instance {
    /// Instantiate `module` (a fresh region from the backend) and check its ABI version.
    pub fn new(runtime: &Runtime, module: &Module, config: HostConfig) -> Result<Instance, RuntimeError> {
        let mut grants = Grants::default();
        for path in &config.grants {
            grants.add(path)?;
        }
        let state = HostState::new(runtime.backend.clone(), grants, config.emit);
        let mut store = Store::new(&runtime.engine, state);
        let instance = runtime
            .linker
            .instantiate(&mut store, &module.inner)
            .map_err(|e| RuntimeError::Instantiate(format!("{e:#}")))?;
        let memory = instance
            .get_memory(&mut store, exports::MEMORY)
            .ok_or_else(|| RuntimeError::InvalidModule("it does not export its memory".into()))?;
        let data_ptr = memory.data_ptr(&store);
        let (region, in_flight) = runtime.creator.take(data_ptr).ok_or(RuntimeError::NotARegion {
            data_ptr: data_ptr as usize,
        })?;
        store.data_mut().bind(region.clone(), in_flight);
        let mut this = Instance {
            store,
            instance,
            memory,
            region,
            poisoned: false,
            funcs: Vec::new(),
        };
        let guest: u32 = this.call(exports::ABI_VERSION, ())?;
        if guest != ABI_VERSION {
            return Err(RuntimeError::AbiMismatch {
                guest,
                host: ABI_VERSION,
            });
        }
        Ok(this)
    }

    /// The region that is this guest's memory.
    pub fn region(&self) -> &Arc<dyn Region> {
        &self.region
    }

    /// Where Wasmtime says the guest's memory starts; always `region().base()`.
    pub fn data_ptr(&self) -> *mut u8 {
        self.memory.data_ptr(&self.store)
    }

    /// The guest memory's current size in bytes.
    pub fn memory_size(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// The guest's memory, read-only (for tests and diagnostics).
    pub fn memory(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// The guest's memory, writable (for tests and hosts that pass data in place).
    pub fn memory_mut(&mut self) -> &mut [u8] {
        self.memory.data_mut(&mut self.store)
    }

    /// Replace the receiver of the guest's `emit` output (see [`HostConfig::on_emit`]).
    pub fn set_emit(&mut self, emit: EmitFn) {
        self.store.data_mut().set_emit(Some(emit));
    }

    /// The last error message an import reported to the guest.
    pub fn last_error(&self) -> &str {
        self.store.data().last_error()
    }

    /// Call an exported function by name with typed parameters and results (`u32`,
    /// `i32`, `u64`, `f32`, ... or tuples of them; `()` for none).
    pub fn call<P, R>(&mut self, name: &str, params: P) -> Result<R, RuntimeError>
    where
        P: WasmParams + 'static,
        R: WasmResults + 'static,
    {
        if self.poisoned {
            return Err(RuntimeError::Poisoned);
        }
        let func = self.typed_func::<P, R>(name)?;
        func.call(&mut self.store, params).map_err(|e| {
            self.poisoned = true;
            self.store.data_mut().quiesce();
            RuntimeError::Trap {
                func: name.into(),
                message: format!("{e:#}"),
            }
        })
    }

    /// Look up (once) and type-check an export.
    fn typed_func<P, R>(&mut self, name: &str) -> Result<TypedFunc<P, R>, RuntimeError>
    where
        P: WasmParams + 'static,
        R: WasmResults + 'static,
    {
        let key = TypeId::of::<TypedFunc<P, R>>();
        let cached = self.funcs.iter().find(|(n, k, _)| n == name && *k == key);
        if let Some(f) = cached.and_then(|(_, _, f)| f.downcast_ref::<TypedFunc<P, R>>()) {
            return Ok(f.clone());
        }
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(|e| RuntimeError::MissingExport {
                name: name.into(),
                message: format!("{e:#}"),
            })?;
        self.funcs.push((name.to_owned(), key, Box::new(func.clone())));
        Ok(func)
    }

    /// The LLM app protocol: send a UTF-8 JSON request, get the guest's JSON response.
    /// The request goes into guest memory through `sp_alloc`, `sp_call` answers with
    /// `(resp_ptr << 32) | resp_len`, and both buffers are given back with `sp_free`.
    /// Streaming output arrives through the `emit` receiver during the call.
    pub fn call_json(&mut self, request: &str) -> Result<String, RuntimeError> {
        let len = u32::try_from(request.len())
            .map_err(|_| RuntimeError::Protocol(format!("a {}-byte request is too large", request.len())))?;
        let alloc_len = len.max(1);
        let ptr: u32 = self.call(app::ALLOC, alloc_len)?;
        if ptr == 0 {
            return Err(RuntimeError::Protocol(format!("{}({alloc_len}) failed", app::ALLOC)));
        }
        self.memory
            .write(&mut self.store, ptr as usize, request.as_bytes())
            .map_err(|_| {
                RuntimeError::Protocol(format!("{} returned {ptr}, which cannot hold {len} bytes", app::ALLOC))
            })?;
        let packed: u64 = self.call(app::CALL, (ptr, len))?;
        self.call::<_, ()>(app::FREE, (ptr, alloc_len))?;
        let (resp_ptr, resp_len) = ((packed >> 32) as u32, packed as u32);
        if resp_ptr == 0 && resp_len == 0 {
            return Ok(String::new());
        }
        let bytes = self
            .memory()
            .get(resp_ptr as usize..resp_ptr as usize + resp_len as usize)
            .ok_or_else(|| {
                RuntimeError::Protocol(format!(
                    "the response [{resp_ptr}, +{resp_len}) is outside guest memory"
                ))
            })?
            .to_vec();
        self.call::<_, ()>(app::FREE, (resp_ptr, resp_len))?;
        String::from_utf8(bytes).map_err(|e| RuntimeError::Protocol(format!("the response is not UTF-8: {e}")))
    }
}
