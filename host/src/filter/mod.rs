//! The filter chain: every record passes through it between decode and
//! routing, so domain rules ship as WebAssembly plugins, never as host
//! changes (docs/plugin-guide.md, docs/plugin-abi.md).
//!
//! - `config`: the chain file.
//! - `engine`: the shared wasmtime engine, module cache, epoch ticker.
//! - `instance`: one sandboxed instance and the ABI calls.
//! - `abi`: the batch layout, written and read with bounds checks.
//! - `plugin`: failure policy, poison-record isolation, circuit breaker.
//! - `reload`: hot reload on file change or SIGHUP.
//!
//! The record stage runs once per batch per plugin. The optional delivery
//! stage runs once per batch per plugin over (record, audience) pairs, so its
//! cost grows with distinct audiences, never with subscribers; a chain
//! without one costs nothing per subscriber.

pub mod abi;
pub mod config;
pub mod engine;
pub mod instance;
pub mod plugin;
pub mod reload;

use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use abi::AudienceRef;
pub use config::{ChainSpec, Policy};
pub use plugin::{Decided, Plugin};

use crate::record::Position;

/// A decoded stream entry on its way to subscribers.
#[derive(Debug, Clone)]
pub struct Record {
    /// The entry's `payload` JSON, as plugins see it.
    pub payload: Bytes,
    /// What the host uses of it, decoded from `payload`.
    pub position: Position,
}

/// The ordered chain of plugins.
#[derive(Default)]
pub struct Chain {
    plugins: Vec<Plugin>,
}

impl Chain {
    /// A chain without plugins: every record passes (the baseline of the
    /// benchmarks).
    pub fn empty() -> Chain {
        Chain::default()
    }

    /// Compiles every plugin and runs its `init` on a first instance. Any
    /// failure names the plugin and leaves nothing half-loaded.
    pub fn load(spec: &ChainSpec, metrics: &Arc<FilterMetrics>) -> Result<Chain, String> {
        let mut plugins = Vec::with_capacity(spec.plugins.len());
        for (i, p) in spec.plugins.iter().enumerate() {
            let plugin = Plugin::load(p, spec.max_module_bytes, metrics)
                .map_err(|e| format!("plugin #{} \"{}\" ({}): {e}", i + 1, p.name, p.origin))?;
            plugins.push(plugin);
        }
        metrics.chain_plugins.set(plugins.len() as i64);
        Ok(Chain { plugins })
    }

    /// Names of the plugins, in order.
    pub fn names(&self) -> Vec<String> {
        self.plugins.iter().map(|p| p.name.to_string()).collect()
    }

    /// Whether any plugin has a delivery stage.
    pub fn has_delivery(&self) -> bool {
        self.plugins.iter().any(Plugin::has_deliver)
    }

    /// The record stage over a batch, in place: dropped records are removed,
    /// replaced ones take their new payload.
    pub fn filter(&mut self, records: &mut Vec<Record>) {
        for plugin in &mut self.plugins {
            if records.is_empty() {
                return;
            }
            let decided = {
                let payloads: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
                plugin.filter(&payloads)
            };
            let mut decided = decided.into_iter();
            records.retain_mut(|r| match decided.next() {
                Some(Decided::Pass) | None => true,
                Some(Decided::Drop) => false,
                Some(Decided::Replace(replacement)) => {
                    *r = *replacement;
                    true
                }
            });
        }
    }

    /// The delivery stage over (record, audience) pairs: one decision per
    /// pair, each plugin seeing what the previous one passed or replaced.
    pub fn deliver(
        &mut self,
        records: &[&[u8]],
        audiences: &[AudienceRef<'_>],
        pairs: &[(u32, u32)],
    ) -> Vec<Decided> {
        let mut current = vec![Decided::Pass; pairs.len()];
        for plugin in self.plugins.iter_mut().filter(|p| p.has_deliver()) {
            let mut live_pairs = Vec::with_capacity(pairs.len());
            let mut index = Vec::with_capacity(pairs.len());
            let decided = {
                let mut recs: Vec<&[u8]> = records.to_vec();
                for (i, (&(r, a), d)) in pairs.iter().zip(&current).enumerate() {
                    let r = match d {
                        Decided::Drop => continue,
                        Decided::Pass => r,
                        Decided::Replace(replacement) => {
                            recs.push(&replacement.payload);
                            (recs.len() - 1) as u32
                        }
                    };
                    live_pairs.push((r, a));
                    index.push(i);
                }
                if live_pairs.is_empty() {
                    return current;
                }
                plugin.deliver(&recs, audiences, &live_pairs)
            };
            for (i, d) in index.into_iter().zip(decided) {
                if !matches!(d, Decided::Pass) {
                    current[i] = d;
                }
            }
        }
        current
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub plugin: String,
    pub kind: String,
}

type Hist = Family<PluginLabel, Histogram, fn() -> Histogram>;

/// Per-plugin metrics.
pub struct FilterMetrics {
    pub calls: Family<PluginLabel, Counter>,
    pub records_in: Family<PluginLabel, Counter>,
    pub passed: Family<PluginLabel, Counter>,
    pub dropped: Family<PluginLabel, Counter>,
    pub replaced: Family<PluginLabel, Counter>,
    pub by_policy: Family<PluginLabel, Counter>,
    pub failures: Family<FailureLabel, Counter>,
    pub batch_ms: Hist,
    pub breaker_open: Family<PluginLabel, Gauge>,
    pub reloads: Family<crate::metrics::Label, Counter>,
    pub chain_plugins: Gauge,
}

impl Default for FilterMetrics {
    fn default() -> Self {
        fn batch_histogram() -> Histogram {
            // 0.01 ms … ~80 ms
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        }
        Self {
            calls: Family::default(),
            records_in: Family::default(),
            passed: Family::default(),
            dropped: Family::default(),
            replaced: Family::default(),
            by_policy: Family::default(),
            failures: Family::default(),
            batch_ms: Family::new_with_constructor(batch_histogram as fn() -> Histogram),
            breaker_open: Family::default(),
            reloads: Family::default(),
            chain_plugins: Gauge::default(),
        }
    }
}

type PluginHandles = (
    Counter,
    Counter,
    Counter,
    Counter,
    Counter,
    Counter,
    Histogram,
    Gauge,
);

impl FilterMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "livecast_filter_calls",
            "Plugin calls (one per batch and stage)",
            self.calls.clone(),
        );
        r.register(
            "livecast_filter_records_in",
            "Items handed to a plugin",
            self.records_in.clone(),
        );
        r.register(
            "livecast_filter_records_passed",
            "Items a plugin passed unchanged (fail-open decisions included)",
            self.passed.clone(),
        );
        r.register(
            "livecast_filter_records_dropped",
            "Items a plugin dropped (fail-closed decisions included)",
            self.dropped.clone(),
        );
        r.register(
            "livecast_filter_records_replaced",
            "Items a plugin replaced",
            self.replaced.clone(),
        );
        r.register(
            "livecast_filter_policy_applied",
            "Items decided by the plugin's failure policy (failure or breaker open)",
            self.by_policy.clone(),
        );
        r.register(
            "livecast_filter_failures",
            "Failed plugin calls, by kind (trap, timeout, memory, malformed, init)",
            self.failures.clone(),
        );
        r.register(
            "livecast_filter_batch_ms",
            "Time of one plugin call over a batch, ms",
            self.batch_ms.clone(),
        );
        r.register(
            "livecast_filter_breaker_open",
            "1 while a plugin is switched off by its circuit breaker",
            self.breaker_open.clone(),
        );
        r.register(
            "livecast_filter_reloads",
            "Chain reloads, by result",
            self.reloads.clone(),
        );
        r.register(
            "livecast_filter_chain_plugins",
            "Plugins in the running chain",
            self.chain_plugins.clone(),
        );
    }

    fn handles(&self, plugin: &str) -> PluginHandles {
        let l = PluginLabel {
            plugin: plugin.to_owned(),
        };
        (
            self.calls.get_or_create_owned(&l),
            self.records_in.get_or_create_owned(&l),
            self.passed.get_or_create_owned(&l),
            self.dropped.get_or_create_owned(&l),
            self.replaced.get_or_create_owned(&l),
            self.by_policy.get_or_create_owned(&l),
            self.batch_ms.get_or_create_owned(&l),
            self.breaker_open.get_or_create_owned(&l),
        )
    }

    fn failure(&self, plugin: &str, kind: &str) {
        self.failures
            .get_or_create(&FailureLabel {
                plugin: plugin.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// `livecast_filter_failures_total{plugin, kind}`, for tests.
    pub fn failures_of(&self, plugin: &str, kind: &str) -> u64 {
        self.failures
            .get(&FailureLabel {
                plugin: plugin.to_owned(),
                kind: kind.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// A per-plugin counter's value, for tests.
    pub fn count(family: &Family<PluginLabel, Counter>, plugin: &str) -> u64 {
        family
            .get(&PluginLabel {
                plugin: plugin.to_owned(),
            })
            .map_or(0, |c| c.get())
    }
}
