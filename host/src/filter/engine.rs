//! The WebAssembly engine shared by every chain in the process: compiled
//! modules cached by content hash, a pooling allocator so a fresh instance
//! costs microseconds, and an epoch ticker that bounds every call in time.
//!
//! The cache holds modules weakly: a module stays compiled while a plugin of
//! some chain uses it (a reload of unchanged bytes finds it), and its code is
//! freed with the last such plugin, so hot reloads of new bytes do not pile
//! up compiled code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, ExternType, FuncType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ValType,
};

use super::config::TooLarge;
use super::sandbox::{Sandbox, link_log};

/// Resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// A wasmtime error as a standard error, its causes kept as sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the process has no WebAssembly engine (then no chain can load).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot create the WebAssembly engine")]
    Create(#[source] BoxError),
    #[error("cannot link the log import")]
    Link(#[source] BoxError),
    #[error("cannot start the epoch ticker")]
    Ticker(#[source] std::io::Error),
}

/// Why a module cannot be a plugin.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("not a valid WebAssembly module")]
    Invalid(#[source] BoxError),
    #[error(
        "imports {module}::{name}; the only import a plugin may have is livecast::log(i32, i32, i32)"
    )]
    Import { module: String, name: String },
    #[error("does not export livecast_abi_v1: not a livecast plugin, or another ABI version")]
    NotAPlugin,
    #[error("does not export its memory as \"memory\"")]
    NoMemory,
    #[error("must export {name} as a function {ty}")]
    Export { name: &'static str, ty: String },
    #[error("cannot link the module")]
    Link(#[source] BoxError),
}

/// Wall time in epoch ticks: how many are due since the ticker started, and
/// how many it has counted.
struct EpochClock {
    origin: Instant,
    ticked: AtomicU64,
}

impl EpochClock {
    fn due(&self) -> u64 {
        (self.origin.elapsed().as_nanos() / EPOCH_TICK.as_nanos()) as u64
    }
}

/// A validated, compiled plugin module, ready to instantiate.
pub struct Compiled {
    pub pre: InstancePre<Sandbox>,
    pub has_deliver: bool,
}

/// The process's engine.
pub struct FilterEngine {
    engine: Engine,
    clock: Arc<EpochClock>,
    linker: Linker<Sandbox>,
    /// By content hash; dead entries are swept when a module is added.
    cache: Mutex<HashMap<[u8; 32], Weak<Compiled>>>,
}

impl FilterEngine {
    /// The engine, created on first use with its epoch ticker.
    pub fn global() -> Result<&'static FilterEngine, &'static EngineError> {
        static ENGINE: OnceLock<Result<FilterEngine, EngineError>> = OnceLock::new();
        ENGINE.get_or_init(FilterEngine::new).as_ref()
    }

    fn new() -> Result<FilterEngine, EngineError> {
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
            // check on loads and stores (a smaller reservation with explicit
            // checks slowed the parsing plugin measurably: docs/benchmarks.md,
            // "Filter chain").
            .memory_reservation(4 << 30)
            .memory_reservation_for_growth(0)
            .memory_guard_size(32 << 20);
        let engine = Engine::new(&cfg).map_err(|e| EngineError::Create(e.into()))?;
        let mut linker = Linker::new(&engine);
        link_log(&mut linker).map_err(|e| EngineError::Link(e.into()))?;

        let clock = Arc::new(EpochClock {
            origin: Instant::now(),
            ticked: AtomicU64::new(0),
        });
        let (ticker, ticks) = (engine.clone(), clock.clone());
        std::thread::Builder::new()
            .name("livecast-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    // Every tick that is due, not one per wake-up: on a
                    // loaded machine this thread wakes late, and deadlines
                    // are wall time.
                    let due = ticks.due();
                    let mut ticked = ticks.ticked.load(Ordering::Relaxed);
                    while ticked < due {
                        ticker.increment_epoch();
                        ticked += 1;
                    }
                    ticks.ticked.store(ticked, Ordering::Relaxed);
                }
            })
            .map_err(EngineError::Ticker)?;
        Ok(FilterEngine {
            engine,
            clock,
            linker,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Compiles and validates a module against ABI v1, or returns the
    /// compilation of identical bytes that a live plugin still holds.
    pub fn compile(
        &self,
        wasm: &[u8],
        max_module_bytes: usize,
    ) -> Result<Arc<Compiled>, ModuleError> {
        if wasm.len() > max_module_bytes {
            return Err(TooLarge {
                size: wasm.len() as u64,
                max: max_module_bytes,
            }
            .into());
        }
        let digest: [u8; 32] = Sha256::digest(wasm).into();
        if let Some(c) = self.cache().get(&digest).and_then(Weak::upgrade) {
            return Ok(c);
        }
        // Compiled outside the lock: a reload compiling a large module must
        // not hold up another chain's lookups.
        let module = Module::new(&self.engine, wasm).map_err(|e| ModuleError::Invalid(e.into()))?;
        let has_deliver = validate(&module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| ModuleError::Link(e.into()))?;
        let compiled = Arc::new(Compiled { pre, has_deliver });
        let mut cache = self.cache();
        cache.retain(|_, c| c.strong_count() > 0);
        cache.insert(digest, Arc::downgrade(&compiled));
        Ok(compiled)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Weak<Compiled>>> {
        // The map stays consistent whatever panicked while holding it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The epoch deadline (in ticks from the engine's current epoch) of a
    /// call that may run `allowed` from now: stopped between `allowed` and
    /// one tick after it. Ticks the ticker has yet to catch up on are added,
    /// so that a deadline set while it is late is not cut short.
    pub fn deadline_ticks(&self, allowed: Duration) -> u64 {
        let behind = self
            .clock
            .due()
            .saturating_sub(self.clock.ticked.load(Ordering::Relaxed));
        (allowed.as_nanos() / EPOCH_TICK.as_nanos()) as u64 + 1 + behind
    }
}

fn func(params: &[ValType], results: &[ValType], engine: &Engine) -> FuncType {
    FuncType::new(engine, params.iter().cloned(), results.iter().cloned())
}

/// Checks imports and exports against the ABI; returns whether the module
/// has a delivery stage.
fn validate(module: &Module) -> Result<bool, ModuleError> {
    use ValType::I32;
    let engine = module.engine();
    for import in module.imports() {
        let ok = import.module() == "livecast"
            && import.name() == "log"
            && matches!(import.ty(), ExternType::Func(f) if FuncType::eq(&f, &func(&[I32, I32, I32], &[], engine)));
        if !ok {
            return Err(ModuleError::Import {
                module: import.module().to_owned(),
                name: import.name().to_owned(),
            });
        }
    }
    let export = |name: &str| module.get_export(name);
    if export("livecast_abi_v1").is_none() {
        return Err(ModuleError::NotAPlugin);
    }
    if !matches!(export("memory"), Some(ExternType::Memory(_))) {
        return Err(ModuleError::NoMemory);
    }
    let expect = |name: &'static str, ty: FuncType, required: bool| match export(name) {
        None if !required => Ok(false),
        Some(ExternType::Func(f)) if FuncType::eq(&f, &ty) => Ok(true),
        _ => Err(ModuleError::Export {
            name,
            ty: ty.to_string(),
        }),
    };
    expect("livecast_reserve", func(&[I32], &[I32], engine), true)?;
    expect("init", func(&[I32, I32], &[I32], engine), true)?;
    expect("filter_batch", func(&[I32, I32], &[I32], engine), true)?;
    expect("deliver_batch", func(&[I32, I32], &[I32], engine), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::tests::Scripted;

    fn report(e: ModuleError) -> String {
        format!("{:#}", anyhow::Error::new(e))
    }

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).expect("assembles")
    }

    /// What a hot reload of new bytes does, many times: the module of the
    /// chain being replaced must leave the cache with its last plugin.
    #[test]
    fn a_module_leaves_the_cache_with_the_last_plugin_that_uses_it() {
        let engine = FilterEngine::global().expect("engine");
        let modules: Vec<Vec<u8>> = (0..12)
            .map(|salt| {
                Scripted {
                    table: "pppppppppp",
                    deliver: false,
                    salt: 1000 + salt,
                }
                .wasm()
            })
            .collect();
        let digests: Vec<[u8; 32]> = modules.iter().map(|m| Sha256::digest(m).into()).collect();
        // Other tests share the engine: count only this test's modules.
        let cached = || {
            let cache = engine.cache();
            digests.iter().filter(|d| cache.contains_key(*d)).count()
        };
        let mut running = engine.compile(&modules[0], usize::MAX).expect("compiles");
        for wasm in &modules[1..] {
            let next = engine.compile(wasm, usize::MAX).expect("compiles");
            let replaced = Arc::downgrade(&running);
            running = next;
            assert!(
                replaced.upgrade().is_none(),
                "nothing else keeps it compiled"
            );
            assert!(cached() <= 2);
        }
        // The next module added sweeps the last dead entry.
        let same = engine.compile(modules.last().expect("some"), usize::MAX);
        assert!(
            Arc::ptr_eq(&same.expect("compiles"), &running),
            "found while in use"
        );
        let other = Scripted {
            table: "dddddddddd",
            deliver: false,
            salt: 999,
        };
        let _other = engine.compile(&other.wasm(), usize::MAX).expect("compiles");
        assert_eq!(cached(), 1, "only the running chain's module");
        drop(running);
        let again = engine.compile(&modules[0], usize::MAX).expect("compiles");
        assert_eq!(cached(), 1, "the dropped one swept, the new one in");
        drop(again);
    }

    #[test]
    fn a_module_that_is_no_plugin_is_refused_with_the_reason() {
        let engine = FilterEngine::global().expect("engine");
        let refused = |wasm: &[u8], max: usize| match engine.compile(wasm, max) {
            Ok(_) => panic!("compiled"),
            Err(e) => e,
        };
        let e = refused(b"\0asm\x01\0\0\0garbage", usize::MAX);
        assert!(matches!(e, ModuleError::Invalid(_)));
        assert!(
            std::error::Error::source(&e).is_some(),
            "wasmtime's error is kept as the source"
        );
        let text = report(e);
        assert!(
            text.starts_with("not a valid WebAssembly module: failed to parse"),
            "the parser's reason follows: {text}"
        );

        assert_eq!(
            report(refused(b"\0asm\x01\0\0\0", 4)),
            "the module is 8 bytes, over max_module_bytes (4)"
        );
        assert_eq!(
            report(refused(&wat("(module)"), usize::MAX)),
            "does not export livecast_abi_v1: not a livecast plugin, or another ABI version"
        );
        assert_eq!(
            report(refused(
                &wat(r#"(module (import "env" "clock" (func)) (func (export "livecast_abi_v1")))"#),
                usize::MAX
            )),
            "imports env::clock; the only import a plugin may have is livecast::log(i32, i32, i32)"
        );
        assert_eq!(
            report(refused(
                &wat(
                    r#"(module (func (export "livecast_abi_v1")) (memory (export "memory") 1)
                        (func (export "livecast_reserve") (param i32) (result i32) i32.const 0)
                        (func (export "init") (param i32 i32) (result i32) i32.const 0)
                        (func (export "filter_batch") (param i32) (result i32) i32.const 0))"#
                ),
                usize::MAX
            )),
            "must export filter_batch as a function (type (func (param i32 i32) (result i32)))"
        );
    }
}
