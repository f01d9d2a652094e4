//! The WebAssembly engine shared by every chain in the process: compiled
//! modules cached by content hash, a pooling allocator so a fresh instance
//! costs microseconds, and an epoch ticker that bounds every call in time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, ExternType, FuncType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ValType,
};

use super::sandbox::{Sandbox, link_log};

/// Resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// A validated, compiled plugin module, ready to instantiate.
pub struct Compiled {
    pub pre: InstancePre<Sandbox>,
    pub has_deliver: bool,
}

/// The process's engine.
pub struct FilterEngine {
    engine: Engine,
    linker: Linker<Sandbox>,
    cache: Mutex<HashMap<[u8; 32], Arc<Compiled>>>,
}

impl FilterEngine {
    /// The engine, created on first use with its epoch ticker.
    pub fn global() -> Result<&'static FilterEngine, String> {
        static ENGINE: OnceLock<Result<FilterEngine, String>> = OnceLock::new();
        ENGINE
            .get_or_init(FilterEngine::new)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn new() -> Result<FilterEngine, String> {
        let mut pool = PoolingAllocationConfig::default();
        // Slots for every plugin of the running chain, the trial instances of
        // a reload, and the instances of several hosts in one test process.
        pool.total_core_instances(256)
            .total_memories(256)
            .total_tables(256)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .max_memory_size(super::config::MAX_MEMORY_LIMIT);
        let mut cfg = Config::new();
        // For profiling plugins: `perf` then names their functions (from
        // /tmp/perf-<pid>.map; a module built without `strip` has names).
        if std::env::var_os("LIVECAST_WASM_PERFMAP").is_some() {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        cfg.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // 4 GiB of address space (not memory: the cap is the limiter's)
            // per slot plus a guard, so that compiled code needs no bounds
            // check on loads and stores. A 256 MiB reservation with explicit
            // checks made the parsing plugin about 20 % slower.
            .memory_reservation(4 << 30)
            .memory_reservation_for_growth(0)
            .memory_guard_size(32 << 20);
        let engine =
            Engine::new(&cfg).map_err(|e| format!("cannot create the WebAssembly engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        link_log(&mut linker).map_err(|e| format!("cannot link the log import: {e}"))?;

        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("livecast-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                }
            })
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        Ok(FilterEngine {
            engine,
            linker,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Compiles and validates a module against ABI v1, or returns the cached
    /// compilation of identical bytes.
    pub fn compile(&self, wasm: &[u8], max_module_bytes: usize) -> Result<Arc<Compiled>, String> {
        if wasm.len() > max_module_bytes {
            return Err(format!(
                "the module is {} bytes, over max_module_bytes ({max_module_bytes})",
                wasm.len()
            ));
        }
        let digest: [u8; 32] = Sha256::digest(wasm).into();
        if let Some(c) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
        {
            return Ok(c.clone());
        }
        let module = Module::new(&self.engine, wasm)
            .map_err(|e| format!("not a valid WebAssembly module: {e:#}"))?;
        let has_deliver = validate(&module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| format!("cannot link the module: {e:#}"))?;
        let compiled = Arc::new(Compiled { pre, has_deliver });
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, compiled.clone());
        Ok(compiled)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

fn func(params: &[ValType], results: &[ValType], engine: &Engine) -> FuncType {
    FuncType::new(engine, params.iter().cloned(), results.iter().cloned())
}

/// Checks imports and exports against the ABI; returns whether the module
/// has a delivery stage.
fn validate(module: &Module) -> Result<bool, String> {
    use ValType::I32;
    let engine = module.engine();
    for import in module.imports() {
        let ok = import.module() == "livecast"
            && import.name() == "log"
            && matches!(import.ty(), ExternType::Func(f) if FuncType::eq(&f, &func(&[I32, I32, I32], &[], engine)));
        if !ok {
            return Err(format!(
                "imports {}::{}; the only import a plugin may have is livecast::log(i32, i32, i32)",
                import.module(),
                import.name()
            ));
        }
    }
    let export = |name: &str| module.get_export(name);
    if export("livecast_abi_v1").is_none() {
        return Err(
            "does not export livecast_abi_v1: not a livecast plugin, or another ABI version".into(),
        );
    }
    if !matches!(export("memory"), Some(ExternType::Memory(_))) {
        return Err("does not export its memory as \"memory\"".into());
    }
    let expect = |name: &str, ty: FuncType, required: bool| -> Result<bool, String> {
        match export(name) {
            None if !required => Ok(false),
            Some(ExternType::Func(f)) if FuncType::eq(&f, &ty) => Ok(true),
            _ => Err(format!("must export {name} as a function {ty}")),
        }
    };
    expect("livecast_reserve", func(&[I32], &[I32], engine), true)?;
    expect("init", func(&[I32, I32], &[I32], engine), true)?;
    expect("filter_batch", func(&[I32, I32], &[I32], engine), true)?;
    expect("deliver_batch", func(&[I32, I32], &[I32], engine), false)
}
