//! One live plugin instance in its sandbox: a store with a memory cap and a
//! deadline per call, the guest's input region, and the calls of the ABI.
//! Every failure is classified (trap, timeout, memory, malformed output) so
//! that the caller can discard the instance and apply the plugin's policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Memory, Store, Trap, TypedFunc};

use bytes::Bytes;

use super::abi::{self, AudienceRef, RawVerdict};
use super::engine::{BoxError, Compiled, FilterEngine};
use super::record::{Decided, Record};
use super::sandbox::Sandbox;
use crate::record::Position;

/// Why a call failed. [`Failure::kind`] names are metric labels.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("trapped: {0}")]
    Trap(String),
    #[error("ran past its deadline")]
    Timeout,
    #[error("went over its memory limit")]
    Memory,
    #[error("malformed output: {0}")]
    Malformed(&'static str),
    /// A fresh instance for the call could not start.
    #[error(transparent)]
    Init(Box<StartError>),
}

impl Failure {
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Trap(_) => "trap",
            Failure::Timeout => "timeout",
            Failure::Memory => "memory",
            Failure::Malformed(_) => "malformed",
            Failure::Init(_) => "init",
        }
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        Failure::Init(Box::new(e))
    }
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot instantiate")]
    Instantiate(#[source] BoxError),
    #[error("export missing or mistyped")]
    Export(#[source] BoxError),
    #[error("no memory export")]
    NoMemory,
    #[error("cannot place the configuration")]
    Config(#[source] Failure),
    /// With the last error the plugin logged during `init`.
    #[error("rejected its configuration: {0}")]
    Rejected(String),
    #[error("init failed")]
    Init(#[source] Failure),
}

/// How long the next calls into the guest may run: each one at most
/// `per_call`, and none past `until` (the wall-time budget of the batch
/// they serve).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub per_call: Duration,
    pub until: Instant,
}

impl Deadline {
    /// What a call armed now may run.
    fn allowed(&self) -> Duration {
        self.until
            .saturating_duration_since(Instant::now())
            .min(self.per_call)
    }
}

/// A live instance.
pub struct Instance {
    engine: &'static FilterEngine,
    store: Store<Sandbox>,
    memory: Memory,
    reserve: TypedFunc<i32, i32>,
    filter: TypedFunc<(i32, i32), i32>,
    deliver: Option<TypedFunc<(i32, i32), i32>>,
    /// The guest's input region: pointer and capacity.
    region: (u32, usize),
    deadline: Deadline,
}

impl Instance {
    /// Instantiates the module and runs `init` with the configuration, both
    /// calls within `deadline`.
    pub fn start(
        engine: &'static FilterEngine,
        compiled: &Compiled,
        plugin: &Arc<str>,
        config_json: &str,
        memory_limit: usize,
        deadline: Deadline,
    ) -> Result<Instance, StartError> {
        let sandbox = Sandbox::new(plugin.clone(), memory_limit);
        let mut store = Store::new(engine.engine(), sandbox);
        store.limiter(|s| s);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(engine.deadline_ticks(deadline.allowed()));
        let instance = compiled
            .pre
            .instantiate(&mut store)
            .map_err(|e| StartError::Instantiate(e.into()))?;
        let export = |e: wasmtime::Error| StartError::Export(e.into());
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(StartError::NoMemory)?;
        let reserve = instance
            .get_typed_func(&mut store, "livecast_reserve")
            .map_err(export)?;
        let init = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "init")
            .map_err(export)?;
        let filter = instance
            .get_typed_func(&mut store, "filter_batch")
            .map_err(export)?;
        let deliver = match compiled.has_deliver {
            true => Some(
                instance
                    .get_typed_func(&mut store, "deliver_batch")
                    .map_err(export)?,
            ),
            false => None,
        };
        let mut inst = Instance {
            engine,
            store,
            memory,
            reserve,
            filter,
            deliver,
            region: (0, 0),
            deadline,
        };
        let cfg = config_json.as_bytes();
        let ptr = inst.input(cfg.len()).map_err(StartError::Config)?;
        inst.memory.data_mut(&mut inst.store)[ptr..ptr + cfg.len()].copy_from_slice(cfg);
        inst.arm();
        match init.call(&mut inst.store, (ptr as i32, cfg.len() as i32)) {
            Ok(0) => Ok(inst),
            Ok(_) => {
                let why = inst
                    .store
                    .data_mut()
                    .last_error
                    .take()
                    .unwrap_or_else(|| "no reason given".into());
                Err(StartError::Rejected(why))
            }
            Err(e) => Err(StartError::Init(inst.classify(e))),
        }
    }

    /// The limits of the calls that follow, until set again.
    pub fn set_deadline(&mut self, deadline: Deadline) {
        self.deadline = deadline;
    }

    /// Before each call: a fresh deadline, and forget a refused memory grow
    /// the guest survived (it must not turn a later failure into `memory`).
    fn arm(&mut self) {
        let ticks = self.engine.deadline_ticks(self.deadline.allowed());
        self.store.set_epoch_deadline(ticks);
        self.store.data_mut().memory_denied = false;
    }

    fn classify(&mut self, e: wasmtime::Error) -> Failure {
        if std::mem::take(&mut self.store.data_mut().memory_denied) {
            return Failure::Memory;
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Failure::Timeout,
            Some(t) => Failure::Trap(t.to_string()),
            None => Failure::Trap(format!("{e:#}")),
        }
    }

    /// A region of at least `len` bytes in the guest, asked for only when the
    /// one it has is too small. Returns its offset.
    fn input(&mut self, len: usize) -> Result<usize, Failure> {
        if len > self.region.1 || self.region.0 == 0 {
            let want = len.max(4096).next_power_of_two();
            let size = i32::try_from(want)
                .map_err(|_| Failure::Malformed("batch too large for a 32-bit guest"))?;
            self.arm();
            let ptr = match self.reserve.call(&mut self.store, size) {
                Ok(p) => p as u32,
                Err(e) => return Err(self.classify(e)),
            };
            if ptr == 0 {
                return Err(Failure::Malformed("livecast_reserve returned 0"));
            }
            if (ptr as usize).saturating_add(want) > self.memory.data_size(&self.store) {
                return Err(Failure::Malformed(
                    "livecast_reserve returned a region outside memory",
                ));
            }
            self.region = (ptr, want);
        }
        Ok(self.region.0 as usize)
    }

    /// Runs `filter_batch` over `records`.
    pub fn filter(&mut self, records: &[&[u8]]) -> Result<Vec<Decided>, Failure> {
        let len = abi::filter_input_len(records);
        let ptr = self.input(len)?;
        abi::write_filter_input(
            &mut self.memory.data_mut(&mut self.store)[ptr..ptr + len],
            records,
        );
        let func = self.filter.clone();
        self.call(func, ptr, len, records.len())
    }

    /// Runs `deliver_batch` over (record, audience) pairs.
    pub fn deliver(
        &mut self,
        records: &[&[u8]],
        audiences: &[AudienceRef<'_>],
        pairs: &[(u32, u32)],
    ) -> Result<Vec<Decided>, Failure> {
        let Some(func) = self.deliver.clone() else {
            return Ok(vec![Decided::Pass; pairs.len()]);
        };
        let len = abi::deliver_input_len(records, audiences, pairs);
        let ptr = self.input(len)?;
        abi::write_deliver_input(
            &mut self.memory.data_mut(&mut self.store)[ptr..ptr + len],
            records,
            audiences,
            pairs,
        );
        self.call(func, ptr, len, pairs.len())
    }

    fn call(
        &mut self,
        func: TypedFunc<(i32, i32), i32>,
        ptr: usize,
        len: usize,
        n: usize,
    ) -> Result<Vec<Decided>, Failure> {
        self.arm();
        let out = match func.call(&mut self.store, (ptr as i32, len as i32)) {
            Ok(out) => out as u32,
            Err(e) => return Err(self.classify(e)),
        };
        let mem = self.memory.data(&self.store);
        // Replacements are checked here, while they are still in the guest's
        // memory: one that is not a valid record makes the whole call fail.
        abi::read_output(mem, out, n, |v| match v {
            RawVerdict::Pass => Ok(Decided::Pass),
            RawVerdict::Drop => Ok(Decided::Drop),
            RawVerdict::Replace(b) => match Position::decode(b) {
                Ok(position) => Ok(Decided::Replace(Box::new(Record {
                    payload: Bytes::copy_from_slice(b),
                    position,
                }))),
                Err(_) => Err("a replacement is not a valid record"),
            },
        })
        .map_err(Failure::Malformed)
    }
}
