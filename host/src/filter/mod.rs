//! The filter chain: every record passes through it between decode and
//! routing, so domain rules ship as WebAssembly plugins, never as host
//! changes (docs/plugin-guide.md, docs/plugin-abi.md).
//!
//! Its modules, each depending only on those above it:
//!
//! - `record`: what flows through the chain and what a plugin decides.
//! - `config`: the chain file.
//! - `abi`: the batch layout, written and read with bounds checks.
//! - `sandbox`: a store's limits, its log, the `livecast::log` import.
//! - `engine`: the shared wasmtime engine, module cache, epoch ticker.
//! - `instance`: one sandboxed instance and the ABI calls.
//! - `plugin`: failure policy, poison-record isolation, circuit breaker.
//! - this module: the chain of plugins, both stages.
//! - `reload`: hot reload on file change or SIGHUP, off the record path.
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
pub mod record;
pub mod reload;
pub mod sandbox;

use std::sync::Arc;

pub use abi::AudienceRef;
pub use config::ChainSpec;
pub use plugin::{Plugin, PluginError};
pub use record::{Decided, Record};

use crate::metrics::FilterMetrics;

/// Why a chain could not be loaded: which plugin, and (as the source) why.
#[derive(Debug, thiserror::Error)]
#[error("plugin #{index} \"{name}\" ({origin})")]
pub struct LoadError {
    /// 1-based position in the chain.
    pub index: usize,
    pub name: String,
    pub origin: String,
    #[source]
    pub source: PluginError,
}

/// The ordered chain of plugins.
#[derive(Default)]
pub struct Chain {
    plugins: Vec<Plugin>,
}

impl Chain {
    /// A chain without plugins: every record passes (the baseline of the
    /// benchmarks).
    #[cfg(feature = "test-util")]
    pub fn empty() -> Chain {
        Chain::default()
    }

    /// Compiles every plugin and runs its `init` on a first instance. Any
    /// failure names the plugin and leaves nothing half-loaded.
    pub fn load(spec: &ChainSpec, metrics: &Arc<FilterMetrics>) -> Result<Chain, LoadError> {
        let mut plugins = Vec::with_capacity(spec.plugins.len());
        for (i, p) in spec.plugins.iter().enumerate() {
            let plugin =
                Plugin::load(p, spec.max_module_bytes, metrics).map_err(|source| LoadError {
                    index: i + 1,
                    name: p.name.clone(),
                    origin: p.origin.clone(),
                    source,
                })?;
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
