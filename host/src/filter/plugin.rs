//! One plugin of the chain with its failure policy: whatever the guest does,
//! every item gets a decision and the stream goes on.
//!
//! A failed call discards the instance (its memory may be corrupt) and the
//! batch is re-run one item at a time on fresh instances, so that only the
//! item that makes the plugin fail (the poison record) gets the policy. A
//! plugin that keeps failing on most of what it sees is switched off by a
//! circuit breaker, with its policy applied to everything, and retried with
//! backoff.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::config::{PluginSpec, Policy};
use super::engine::{Compiled, EngineError, FilterEngine, ModuleError};
use super::instance::{Failure, Instance, StartError};
use super::record::Decided;
use crate::metrics::FilterMetrics;
use crate::ratelimit::LogLimiter;

/// Items re-run one by one after a failed call, at most, before the rest of
/// the batch gets the policy (a plugin that fails on everything must not
/// cost one deadline per record).
const MAX_ISOLATION_FAILURES: usize = 4;
/// Consecutive bad calls (over half the items failed) that open the breaker.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_MIN_BACKOFF: Duration = Duration::from_secs(1);
const BREAKER_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a plugin cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Engine(&'static EngineError),
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Start(#[from] StartError),
}

struct Breaker {
    bad_calls: u32,
    open_until: Option<Instant>,
    backoff: Duration,
}

impl Breaker {
    fn new() -> Self {
        Self {
            bad_calls: 0,
            open_until: None,
            backoff: BREAKER_MIN_BACKOFF,
        }
    }
}

struct Handles {
    calls: Counter,
    records_in: Counter,
    passed: Counter,
    dropped: Counter,
    replaced: Counter,
    by_policy: Counter,
    batch_ms: Histogram,
    breaker_open: Gauge,
}

pub struct Plugin {
    pub name: Arc<str>,
    policy: Policy,
    compiled: Arc<Compiled>,
    config_json: String,
    memory_limit: usize,
    timeout: Duration,
    engine: &'static FilterEngine,
    instance: Option<Instance>,
    breaker: Breaker,
    m: Handles,
    metrics: Arc<FilterMetrics>,
    fail_log: LogLimiter,
}

impl Plugin {
    /// Compiles the module and starts a first instance, which runs `init`:
    /// a configuration the plugin rejects fails here, before the chain is
    /// used.
    pub fn load(
        spec: &PluginSpec,
        max_module_bytes: usize,
        metrics: &Arc<FilterMetrics>,
    ) -> Result<Plugin, PluginError> {
        let engine = FilterEngine::global().map_err(PluginError::Engine)?;
        let compiled = engine.compile(&spec.wasm, max_module_bytes)?;
        let name: Arc<str> = spec.name.as_str().into();
        let instance = Instance::start(
            engine,
            &compiled,
            &name,
            &spec.config_json,
            spec.memory_limit,
            spec.timeout,
        )?;
        let m = metrics.handles(&spec.name);
        Ok(Plugin {
            m: Handles {
                calls: m.0,
                records_in: m.1,
                passed: m.2,
                dropped: m.3,
                replaced: m.4,
                by_policy: m.5,
                batch_ms: m.6,
                breaker_open: m.7,
            },
            name,
            policy: spec.policy,
            compiled,
            config_json: spec.config_json.clone(),
            memory_limit: spec.memory_limit,
            timeout: spec.timeout,
            engine,
            instance: Some(instance),
            breaker: Breaker::new(),
            metrics: metrics.clone(),
            fail_log: LogLimiter::new(Duration::from_secs(5)),
        })
    }

    pub fn has_deliver(&self) -> bool {
        self.compiled.has_deliver
    }

    fn policy_decision(&self) -> Decided {
        match self.policy {
            Policy::FailClosed => Decided::Drop,
            Policy::FailOpen => Decided::Pass,
        }
    }

    /// The record stage over `records`: one decision each.
    pub fn filter(&mut self, records: &[&[u8]]) -> Vec<Decided> {
        self.guarded(records.len(), |inst, range| inst.filter(&records[range]))
    }

    /// The delivery stage over `pairs` of (record, audience): one decision each.
    pub fn deliver(
        &mut self,
        records: &[&[u8]],
        audiences: &[super::abi::AudienceRef<'_>],
        pairs: &[(u32, u32)],
    ) -> Vec<Decided> {
        self.guarded(pairs.len(), |inst, range| {
            inst.deliver(records, audiences, &pairs[range])
        })
    }

    fn guarded(
        &mut self,
        n: usize,
        call: impl Fn(&mut Instance, Range<usize>) -> Result<Vec<Decided>, Failure>,
    ) -> Vec<Decided> {
        if n == 0 {
            return Vec::new();
        }
        let started = Instant::now();
        self.m.calls.inc();
        self.m.records_in.inc_by(n as u64);
        let now = Instant::now();
        let out = if self.breaker.open_until.is_some_and(|t| now < t) {
            self.m.by_policy.inc_by(n as u64);
            vec![self.policy_decision(); n]
        } else {
            match self.attempt(0..n, &call) {
                Ok(v) => {
                    self.close_breaker();
                    v
                }
                Err(f) => {
                    self.failed(f, n);
                    self.isolate(n, &call)
                }
            }
        };
        // Counted per batch: an atomic per record would cost more than the
        // pass-through plugin itself.
        let (mut passed, mut dropped, mut replaced) = (0, 0, 0);
        for d in &out {
            match d {
                Decided::Pass => passed += 1,
                Decided::Drop => dropped += 1,
                Decided::Replace(..) => replaced += 1,
            }
        }
        self.m.passed.inc_by(passed);
        self.m.dropped.inc_by(dropped);
        self.m.replaced.inc_by(replaced);
        self.m
            .batch_ms
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        out
    }

    /// Re-runs a failed batch item by item; only failing items get the policy.
    fn isolate(
        &mut self,
        n: usize,
        call: &impl Fn(&mut Instance, Range<usize>) -> Result<Vec<Decided>, Failure>,
    ) -> Vec<Decided> {
        let mut out = Vec::with_capacity(n);
        let mut failures = if n == 1 { 1 } else { 0 };
        for i in 0..n {
            if n == 1 || failures >= MAX_ISOLATION_FAILURES {
                out.push(self.policy_decision());
                self.m.by_policy.inc();
                continue;
            }
            match self.attempt(i..i + 1, call) {
                Ok(mut v) => out.push(v.pop().unwrap_or(Decided::Pass)),
                Err(f) => {
                    self.failed(f, 1);
                    failures += 1;
                    out.push(self.policy_decision());
                    self.m.by_policy.inc();
                }
            }
        }
        let by_policy_share = if failures >= MAX_ISOLATION_FAILURES {
            n
        } else {
            failures
        };
        if by_policy_share * 2 > n {
            self.bad_call();
        } else {
            self.close_breaker();
        }
        out
    }

    /// One call on the live instance (started if needed), replacements
    /// validated. A failed call discards the instance.
    fn attempt(
        &mut self,
        range: Range<usize>,
        call: &impl Fn(&mut Instance, Range<usize>) -> Result<Vec<Decided>, Failure>,
    ) -> Result<Vec<Decided>, Failure> {
        let mut inst = match self.instance.take() {
            Some(inst) => inst,
            None => Instance::start(
                self.engine,
                &self.compiled,
                &self.name,
                &self.config_json,
                self.memory_limit,
                self.timeout,
            )?,
        };
        let result = call(&mut inst, range);
        if result.is_ok() {
            self.instance = Some(inst);
        }
        result
    }

    fn failed(&mut self, f: Failure, items: usize) {
        self.metrics.failure(&self.name, f.kind());
        if let Some(held_back) = self.fail_log.allow() {
            let kind = f.kind();
            let f = anyhow::Error::new(f);
            tracing::warn!(plugin = %self.name, kind, items, held_back, "filter plugin failed: {f:#}");
        }
    }

    fn bad_call(&mut self) {
        let b = &mut self.breaker;
        b.bad_calls += 1;
        if b.bad_calls >= BREAKER_THRESHOLD {
            b.open_until = Some(Instant::now() + b.backoff);
            tracing::warn!(plugin = %self.name, retry_in_ms = b.backoff.as_millis() as u64, policy = ?self.policy, "filter plugin keeps failing: switched off, its policy applies to every record");
            b.backoff = (b.backoff * 2).min(BREAKER_MAX_BACKOFF);
            self.m.breaker_open.set(1);
        }
    }

    fn close_breaker(&mut self) {
        let b = &mut self.breaker;
        if b.open_until.take().is_some() {
            tracing::info!(plugin = %self.name, "filter plugin works again: switched back on");
        }
        b.bad_calls = 0;
        b.backoff = BREAKER_MIN_BACKOFF;
        self.m.breaker_open.set(0);
    }
}
