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
    #[cfg(any(test, feature = "test-util"))]
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

#[cfg(test)]
mod tests {
    //! Unit tests of the chain, and helpers for those of its modules: small
    //! plugins written in WAT whose verdicts a test can script record by
    //! record.

    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::config::{DEFAULT_MAX_MODULE_BYTES, DEFAULT_MEMORY_LIMIT, PluginSpec, Policy};
    use super::*;
    use crate::metrics::{FailureLabel, PluginLabel};
    use crate::record::Position;

    /// A plugin whose verdict on an item is set by a digit: the record's
    /// last member is `"m":D` (see [`rec`]), and in the delivery stage a
    /// record with digit 0 takes the last digit of the audience's user id
    /// instead. `table[D]` is the verdict: `p` pass, `d` drop, `r` replace
    /// with the plugin's configuration (a record), `s` spin until stopped,
    /// `t` trap. `salt` makes otherwise equal modules differ.
    pub(crate) struct Scripted<'a> {
        pub table: &'a str,
        pub deliver: bool,
        pub salt: u32,
    }

    impl Scripted<'_> {
        pub(crate) fn wasm(&self) -> Vec<u8> {
            assert_eq!(self.table.len(), 10, "one verdict per digit");
            let codes: String = self
                .table
                .chars()
                .map(|c| match c {
                    'p' => "\\00",
                    'd' => "\\01",
                    'r' => "\\02",
                    's' => "\\08",
                    't' => "\\09",
                    other => panic!("unknown verdict {other}"),
                })
                .collect();
            let deliver = match self.deliver {
                false => "",
                true => DELIVER_WAT,
            };
            let wat = format!(
                r#"(module
  (memory (export "memory") 41)
  (global $cfg_len (mut i32) (i32.const 0))
  (data (i32.const 16) "{codes}")
  (data (i32.const 32) "salt {salt}")
  (func (export "livecast_abi_v1"))
  ;; 1 MiB of input at page 1; the configuration is kept at 1024 (the
  ;; first batch overwrites the region); output tables from page 17
  (func (export "livecast_reserve") (param $size i32) (result i32)
    (if (result i32) (i32.le_u (local.get $size) (i32.const 1048576))
      (then (i32.const 65536)) (else (i32.const 0))))
  (func (export "init") (param $p i32) (param $len i32) (result i32)
    (memory.copy (i32.const 1024) (local.get $p) (local.get $len))
    (global.set $cfg_len (local.get $len))
    (i32.const 0))
  ;; the digit of the bytes at $p: the one before their last byte
  (func $digit (param $p i32) (param $len i32) (result i32)
    (i32.sub
      (i32.load8_u (i32.sub (i32.add (local.get $p) (local.get $len)) (i32.const 2)))
      (i32.const 48)))
  ;; output entry $i for digit $d
  (func $decide (param $i i32) (param $d i32)
    (local $entry i32) (local $v i32)
    (local.set $entry (i32.add (i32.const 1114116) (i32.mul (local.get $i) (i32.const 12))))
    (if (i32.lt_u (local.get $d) (i32.const 10))
      (then (local.set $v (i32.load8_u offset=16 (local.get $d)))))
    (if (i32.eq (local.get $v) (i32.const 9)) (then unreachable))
    (if (i32.eq (local.get $v) (i32.const 8)) (then (loop $spin (br $spin))))
    (i32.store (local.get $entry) (local.get $v))
    (i32.store offset=4 (local.get $entry) (i32.const 1024))
    (i32.store offset=8 (local.get $entry) (global.get $cfg_len)))
  (func (export "filter_batch") (param $in i32) (param $len i32) (result i32)
    (local $n i32) (local $i i32) (local $row i32)
    (local.set $n (i32.load (local.get $in)))
    (i32.store (i32.const 1114112) (local.get $n))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $row (i32.add (local.get $in) (i32.shl (local.get $i) (i32.const 3))))
        (call $decide (local.get $i)
          (call $digit
            (i32.add (local.get $in) (i32.load offset=4 (local.get $row)))
            (i32.load offset=8 (local.get $row))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1114112))
  {deliver})"#,
                salt = self.salt,
            );
            wat::parse_str(&wat).expect("the scripted plugin assembles")
        }
    }

    const DELIVER_WAT: &str = r#"
  (func (export "deliver_batch") (param $in i32) (param $len i32) (result i32)
    (local $auds i32) (local $pairs i32) (local $n i32) (local $i i32)
    (local $pair i32) (local $row i32) (local $aud i32) (local $d i32)
    (local.set $auds (i32.add (i32.add (local.get $in) (i32.const 4))
                              (i32.shl (i32.load (local.get $in)) (i32.const 3))))
    (local.set $pairs (i32.add (i32.add (local.get $auds) (i32.const 4))
                               (i32.mul (i32.load (local.get $auds)) (i32.const 24))))
    (local.set $n (i32.load (local.get $pairs)))
    (i32.store (i32.const 1114112) (local.get $n))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $pair (i32.add (i32.add (local.get $pairs) (i32.const 4))
                                  (i32.shl (local.get $i) (i32.const 3))))
        (local.set $row (i32.add (local.get $in) (i32.shl (i32.load (local.get $pair)) (i32.const 3))))
        (local.set $d (call $digit
          (i32.add (local.get $in) (i32.load offset=4 (local.get $row)))
          (i32.load offset=8 (local.get $row))))
        (if (i32.eqz (local.get $d))
          (then
            ;; the user id of the audience: offset and length at 16 and 20
            ;; of its row; its last byte is the digit
            (local.set $aud (i32.add (i32.add (local.get $auds) (i32.const 4))
                                     (i32.mul (i32.load offset=4 (local.get $pair)) (i32.const 24))))
            (local.set $d (call $digit
              (i32.add (local.get $in) (i32.load offset=16 (local.get $aud)))
              (i32.add (i32.load offset=20 (local.get $aud)) (i32.const 1))))))
        (call $decide (local.get $i) (local.get $d))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1114112))"#;

    /// A valid record of `device` whose digit is `digit`.
    pub(crate) fn rec(device: &str, digit: u8) -> String {
        assert!(digit <= 9);
        format!(
            r#"{{"device_id":"{device}","timestamp":"2026-05-02T10:15:30.123Z","latitude":41.3,"longitude":19.8,"m":{digit}}}"#
        )
    }

    pub(crate) fn spec(
        name: &str,
        wasm: Vec<u8>,
        config: &str,
        policy: Policy,
        timeout: Duration,
    ) -> PluginSpec {
        PluginSpec {
            name: name.into(),
            origin: format!("test {name}"),
            wasm,
            config_json: config.into(),
            policy,
            timeout,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }
    }

    /// A shipped plugin's module (`<target>/plugins`).
    pub(crate) fn shipped(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/plugin_{}.wasm",
            super::config::PLUGIN_DIR,
            name.replace('-', "_")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub(crate) fn count(
        family: &prometheus_client::metrics::family::Family<
            PluginLabel,
            prometheus_client::metrics::counter::Counter,
        >,
        plugin: &str,
    ) -> u64 {
        family
            .get(&PluginLabel {
                plugin: plugin.into(),
            })
            .map_or(0, |c| c.get())
    }

    pub(crate) fn failures(m: &FilterMetrics, plugin: &str, kind: &str) -> u64 {
        m.failures
            .get(&FailureLabel {
                plugin: plugin.into(),
                kind: kind.into(),
            })
            .map_or(0, |c| c.get())
    }

    /// A decision as a test writes it: `pass`, `drop`, or the replacement.
    pub(crate) fn show(d: &Decided) -> String {
        match d {
            Decided::Pass => "pass".into(),
            Decided::Drop => "drop".into(),
            Decided::Replace(r) => String::from_utf8_lossy(&r.payload).into_owned(),
        }
    }

    fn chain(plugins: Vec<PluginSpec>, metrics: &Arc<FilterMetrics>) -> Chain {
        let spec = ChainSpec {
            plugins,
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
        };
        Chain::load(&spec, metrics).expect("the chain loads")
    }

    fn record(payload: String) -> Record {
        let position = Position::decode(payload.as_bytes()).expect("a valid record");
        Record {
            payload: Bytes::from(payload),
            position,
        }
    }

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn the_record_stage_runs_each_plugin_on_what_the_previous_one_left() {
        let m = Arc::new(FilterMetrics::default());
        // first: 1 drop, 2 replace with r1 (digit 5); second: 5 replace with
        // r2, 4 drop, 2 pass, 1 trap (it must never see the dropped record)
        let (r1, r2) = (rec("c", 5), rec("c", 6));
        let first = Scripted {
            table: "pdrppppppp",
            deliver: false,
            salt: 0,
        };
        let second = Scripted {
            table: "ptppdrpppp",
            deliver: false,
            salt: 0,
        };
        let mut chain = chain(
            vec![
                spec("first", first.wasm(), &r1, Policy::FailOpen, T),
                spec("second", second.wasm(), &r2, Policy::FailOpen, T),
            ],
            &m,
        );
        let mut batch = vec![
            record(rec("a", 0)),
            record(rec("b", 1)),
            record(rec("c", 2)),
            record(rec("d", 4)),
        ];
        chain.filter(&mut batch);
        let out: Vec<&[u8]> = batch.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(out, [rec("a", 0).as_bytes(), r2.as_bytes()], "{batch:?}");
        assert_eq!(
            &*batch[1].position.device, "c",
            "decoded from the replacement"
        );
        assert_eq!(count(&m.records_in, "second"), 3, "b was dropped before it");
        assert_eq!(failures(&m, "second", "trap"), 0);
    }

    #[test]
    fn the_delivery_stage_runs_each_plugin_on_what_the_previous_one_left_pair_by_pair() {
        let m = Arc::new(FilterMetrics::default());
        // Pairs of record 0 (digit 0) are decided by the user's digit, those
        // of record 1 (digit 7) by the record. The first plugin's
        // replacement has digit 0, so the second decides it by user too,
        // where it would pass the original record 1.
        let (r1, r2) = (rec("a", 0), rec("a", 6));
        let first = Scripted {
            table: "pdrpppprpp",
            deliver: true,
            salt: 1,
        };
        let second = Scripted {
            table: "pdprdppppp",
            deliver: true,
            salt: 1,
        };
        let mut chain = chain(
            vec![
                spec("first", first.wasm(), &r1, Policy::FailOpen, T),
                spec("second", second.wasm(), &r2, Policy::FailOpen, T),
            ],
            &m,
        );
        assert!(chain.has_delivery());
        let (rec0, rec1) = (rec("a", 0), rec("b", 7));
        let records = [rec0.as_bytes(), rec1.as_bytes()];
        let audiences: Vec<AudienceRef<'_>> = ["u1", "u2", "u3", "u4"]
            .into_iter()
            .map(|user_id| AudienceRef {
                topic: "event:x",
                role: "",
                user_id,
            })
            .collect();
        let pairs = [(1, 2), (0, 0), (0, 1), (1, 3), (0, 3), (0, 2)];
        let decided = chain.deliver(&records, &audiences, &pairs);
        let shown: Vec<String> = decided.iter().map(show).collect();
        assert_eq!(shown, [&r2, "drop", &r1, "drop", "drop", &r2]);
        assert_eq!(
            count(&m.records_in, "second"),
            5,
            "all but the dropped pair"
        );

        // Once the first plugin drops every pair, the second is not called.
        let calls = count(&m.calls, "second");
        let decided = chain.deliver(&records, &audiences, &[(0, 0)]);
        assert_eq!(decided.iter().map(show).collect::<Vec<_>>(), ["drop"]);
        assert_eq!(count(&m.calls, "second"), calls);
    }
}
