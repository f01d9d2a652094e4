//! One plugin of the chain with its failure policy: whatever the guest does,
//! every item gets a decision, the stream goes on, and the record path is
//! held up for a bounded time.
//!
//! A failed call discards the instance (its memory may be corrupt) and the
//! batch is re-run one item at a time on fresh instances, so that only the
//! item that makes the plugin fail (the poison record) gets the policy.
//! Everything the plugin does for one batch shares a wall-time budget, so a
//! plugin that runs out of time on every record costs one budget per batch,
//! not one deadline per record. A plugin that keeps failing, or whose
//! failures keep costing time, is switched off by a circuit breaker, with
//! its policy applied to everything, and retried with backoff. The rules and
//! the bounds they give are in docs/plugin-abi.md, "Failures and limits".

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{PluginSpec, Policy};
use super::engine::{Compiled, EngineError, FilterEngine, ModuleError};
use super::instance::{Deadline, Failure, Instance, StartError};
use super::record::Decided;
use crate::metrics::{FilterMetrics, PluginHandles};
use crate::ratelimit::LogLimiter;

/// The wall-time budget of one batch, in multiples of the plugin's
/// `timeout`: room for the batch call and, if it fails, as long again for
/// fresh instances and isolation.
const BATCH_BUDGET_TIMEOUTS: u32 = 2;
/// Items that may fail during isolation before the rest of the batch gets
/// the policy untried: a plugin that fails on everything must not cost a
/// call per record.
const MAX_ISOLATION_FAILURES: usize = 4;
/// A one-item call during isolation may run this share of the plugin's
/// `timeout` (it carries one record, not a batch): so that the failures
/// isolation allows, all timeouts, fit in the rest of the budget and the
/// good items around them keep their verdicts.
const ISOLATED_CALL_SHARE: u32 = MAX_ISOLATION_FAILURES as u32;

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
    m: PluginHandles,
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
        let started = Instant::now();
        let instance = Instance::start(
            engine,
            &compiled,
            &name,
            &spec.config_json,
            spec.memory_limit,
            Deadline {
                per_call: spec.timeout,
                until: started + spec.timeout * BATCH_BUDGET_TIMEOUTS,
            },
        )?;
        Ok(Plugin {
            m: metrics.handles(&spec.name),
            name,
            policy: spec.policy,
            compiled,
            config_json: spec.config_json.clone(),
            memory_limit: spec.memory_limit,
            timeout: spec.timeout,
            engine,
            instance: Some(instance),
            breaker: Breaker::new(started),
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
        let out = if !self.breaker.allows(started) {
            self.m.by_policy.inc_by(n as u64);
            vec![self.policy_decision(); n]
        } else {
            let until = started + self.timeout * BATCH_BUDGET_TIMEOUTS;
            let whole = Deadline {
                per_call: self.timeout,
                until,
            };
            match self.attempt(0..n, whole, &call) {
                Ok(v) => {
                    let change = self.breaker.succeeded();
                    self.breaker_changed(change);
                    v
                }
                Err(f) => {
                    self.failed(f, n);
                    let (out, by_policy) = self.isolate(n, until, &call);
                    let now = Instant::now();
                    let spent = now.saturating_duration_since(started);
                    self.m.stall_seconds.inc_by(spent.as_secs_f64());
                    let change = self.breaker.failed(now, spent, by_policy * 2 > n);
                    self.breaker_changed(change);
                    out
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

    /// Re-runs a failed batch item by item until the batch's budget ends at
    /// `until`; failed and untried items get the policy. Returns the
    /// decisions and how many of them the policy made.
    fn isolate(
        &mut self,
        n: usize,
        until: Instant,
        call: &impl Fn(&mut Instance, Range<usize>) -> Result<Vec<Decided>, Failure>,
    ) -> (Vec<Decided>, usize) {
        let one = Deadline {
            per_call: self.timeout / ISOLATED_CALL_SHARE,
            until,
        };
        let mut out = Vec::with_capacity(n);
        let mut failures = 0;
        let mut by_policy = 0;
        for i in 0..n {
            // A batch of one has been tried already.
            let tried = n > 1 && failures < MAX_ISOLATION_FAILURES && Instant::now() < until;
            let decided = match tried {
                false => None,
                true => match self.attempt(i..i + 1, one, call) {
                    Ok(mut v) => v.pop(),
                    Err(f) => {
                        self.failed(f, 1);
                        failures += 1;
                        None
                    }
                },
            };
            out.push(decided.unwrap_or_else(|| {
                by_policy += 1;
                self.policy_decision()
            }));
        }
        self.m.by_policy.inc_by(by_policy as u64);
        (out, by_policy)
    }

    /// One call on the live instance (started if needed), replacements
    /// validated. A failed call discards the instance.
    fn attempt(
        &mut self,
        range: Range<usize>,
        deadline: Deadline,
        call: &impl Fn(&mut Instance, Range<usize>) -> Result<Vec<Decided>, Failure>,
    ) -> Result<Vec<Decided>, Failure> {
        let mut inst = match self.instance.take() {
            Some(mut inst) => {
                inst.set_deadline(deadline);
                inst
            }
            None => Instance::start(
                self.engine,
                &self.compiled,
                &self.name,
                &self.config_json,
                self.memory_limit,
                deadline,
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

    fn breaker_changed(&mut self, change: Change) {
        match change {
            Change::None => {}
            Change::Opened { reason, retry_in } => {
                match reason {
                    Reason::Failures => self.m.opened_on_failures.inc(),
                    Reason::Stall => self.m.opened_on_stall.inc(),
                };
                self.m.breaker_open.set(1);
                tracing::warn!(plugin = %self.name, reason = reason.label(), retry_in_ms = retry_in.as_millis() as u64, policy = ?self.policy, "filter plugin keeps failing: switched off, its policy applies to every record");
            }
            Change::Closed => {
                self.m.breaker_open.set(0);
                tracing::info!(plugin = %self.name, "filter plugin works again: switched back on");
            }
        }
    }
}

/// Consecutive bad batches (over half the items decided by the policy) that
/// open the breaker.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_MIN_BACKOFF: Duration = Duration::from_secs(1);
const BREAKER_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The level of the stall account that opens the breaker.
const STALL_LIMIT: Duration = Duration::from_secs(1);
/// The stall account drains by 1/STALL_DRAIN of the time that passes: in the
/// long run a plugin's failures take at most a tenth of the record path.
const STALL_DRAIN: u32 = 10;

/// Why a breaker opened; the names are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// Bad batches in a row.
    Failures,
    /// Time spent on failed batches.
    Stall,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Failures => "failures",
            Reason::Stall => "stall",
        }
    }
}

/// What a batch did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    None,
    Opened { reason: Reason, retry_in: Duration },
    Closed,
}

/// The circuit breaker, a state machine over the batches a plugin was
/// called for, the time they took and the time passing (given, not read, so
/// that tests can drive it).
///
/// The *stall account* is the time spent on batches whose first call failed
/// (that call, fresh instances and isolation), draining at a tenth of the
/// time that passes. Whenever the breaker opens it stays open for its
/// backoff or until the account is back at [`STALL_LIMIT`], whichever is
/// later; a batch is only ever tried while the account is at most the
/// limit, so the account never exceeds the limit plus one batch budget.
#[derive(Debug)]
struct Breaker {
    bad_calls: u32,
    /// Set while open and until a trial batch decides (half-open).
    open_until: Option<Instant>,
    backoff: Duration,
    stall: Duration,
    stall_at: Instant,
}

impl Breaker {
    fn new(now: Instant) -> Self {
        Self {
            bad_calls: 0,
            open_until: None,
            backoff: BREAKER_MIN_BACKOFF,
            stall: Duration::ZERO,
            stall_at: now,
        }
    }

    /// Whether the plugin may be called now (closed, or half-open: a trial).
    fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|t| now >= t)
    }

    /// A batch whose first call succeeded.
    fn succeeded(&mut self) -> Change {
        self.bad_calls = 0;
        self.backoff = BREAKER_MIN_BACKOFF;
        match self.open_until.take() {
            Some(_) => Change::Closed,
            None => Change::None,
        }
    }

    /// A batch whose first call failed, ending `now` after `spent`; `bad`
    /// when over half its items were decided by the policy.
    fn failed(&mut self, now: Instant, spent: Duration, bad: bool) -> Change {
        let elapsed = now.saturating_duration_since(self.stall_at);
        self.stall = self.stall.saturating_sub(elapsed / STALL_DRAIN) + spent;
        self.stall_at = now;
        self.bad_calls = if bad { self.bad_calls + 1 } else { 0 };
        let reason = if self.bad_calls >= BREAKER_THRESHOLD {
            Reason::Failures
        } else if self.stall >= STALL_LIMIT {
            Reason::Stall
        } else {
            self.backoff = BREAKER_MIN_BACKOFF;
            return match self.open_until.take() {
                Some(_) => Change::Closed,
                None => Change::None,
            };
        };
        let drained = self.stall.saturating_sub(STALL_LIMIT) * STALL_DRAIN;
        let retry_in = self.backoff.max(drained);
        self.open_until = Some(now + retry_in);
        self.backoff = (self.backoff * 2).min(BREAKER_MAX_BACKOFF);
        Change::Opened { reason, retry_in }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::config::DEFAULT_MAX_MODULE_BYTES;
    use crate::filter::tests::{Scripted, count, failures, rec, shipped, show, spec};

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn opened(reason: Reason, retry_in: Duration) -> Change {
        Change::Opened { reason, retry_in }
    }

    #[test]
    fn three_bad_batches_in_a_row_open_the_breaker_and_each_bad_trial_doubles_the_wait() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        assert_eq!(b.failed(t0, MS, true), Change::None);
        assert_eq!(b.failed(t0, MS, true), Change::None);
        assert_eq!(b.failed(t0, MS, true), opened(Reason::Failures, S));
        assert!(!b.allows(t0 + S - MS));
        let mut now = t0 + S;
        for wait in [2, 4, 8, 16, 32, 60, 60] {
            assert!(b.allows(now), "a trial after the backoff");
            let wait = wait * S;
            assert_eq!(b.failed(now, MS, true), opened(Reason::Failures, wait));
            assert!(!b.allows(now + wait - MS));
            now += wait;
        }
        assert_eq!(b.succeeded(), Change::Closed);
        assert!(b.allows(now));
        // The count and the backoff start over.
        assert_eq!(b.failed(now, MS, true), Change::None);
        assert_eq!(b.failed(now, MS, true), Change::None);
        assert_eq!(b.failed(now, MS, true), opened(Reason::Failures, S));
    }

    #[test]
    fn a_trial_that_fails_on_few_items_closes_the_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..3 {
            b.failed(t0, MS, true);
        }
        assert_eq!(b.failed(t0 + S, MS, false), Change::Closed);
        assert!(b.allows(t0 + S));
    }

    #[test]
    fn a_good_batch_restarts_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        b.failed(t0, MS, true);
        b.failed(t0, MS, true);
        assert_eq!(b.succeeded(), Change::None);
        assert_eq!(b.failed(t0, MS, true), Change::None);
        assert_eq!(b.failed(t0, MS, true), Change::None);
        assert!(b.allows(t0));
    }

    #[test]
    fn time_spent_on_failed_batches_opens_the_breaker_though_most_items_pass() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        let spent = 300 * MS;
        // The account: 0.3 s, then minus a tenth of the 0.3 s between
        // batches plus 0.3 s each time: 0.57, 0.84, 1.11.
        for k in 1..=3 {
            assert_eq!(b.failed(t0 + spent * k, spent, false), Change::None);
        }
        let now = t0 + spent * 4;
        // Off until the account is back at 1 s: 0.11 s over, at a tenth.
        assert_eq!(
            b.failed(now, spent, false),
            opened(Reason::Stall, 1100 * MS)
        );
        let trial = now + 1100 * MS;
        assert!(!b.allows(trial - MS));
        assert!(b.allows(trial));
        // Any failure of the trial takes it over again; the backoff grows.
        assert_eq!(b.failed(trial, MS, false), opened(Reason::Stall, 2 * S));
        assert_eq!(b.succeeded(), Change::Closed);
    }

    #[test]
    fn failures_spread_out_in_time_never_open_the_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for k in 1..=1000 {
            let now = t0 + 10 * S * k;
            assert_eq!(b.failed(now, 900 * MS, false), Change::None, "batch {k}");
        }
    }

    /// The bound docs/plugin-abi.md states: over any time t, a plugin's
    /// failed batches take at most 1 s + one batch budget + t / 10.
    #[test]
    fn failed_batches_take_at_most_a_tenth_of_the_time_in_the_long_run() {
        for budget in [2 * MS, 200 * MS, 20 * S] {
            for pattern in ["f", "fs", "ffs", "fffffs"] {
                let t0 = Instant::now();
                let mut b = Breaker::new(t0);
                let (mut now, mut stalled) = (t0, Duration::ZERO);
                for step in pattern.chars().cycle().take(100_000) {
                    if !b.allows(now) {
                        now = b.open_until.expect("open");
                        continue;
                    }
                    if step == 's' {
                        now += MS;
                        b.succeeded();
                        continue;
                    }
                    now += budget;
                    stalled += budget;
                    b.failed(now, budget, step == 'f');
                    let bound = S + budget + (now - t0) / 10;
                    assert!(
                        stalled <= bound,
                        "{budget:?} {pattern}: {stalled:?} > {bound:?}"
                    );
                }
            }
        }
    }

    /// A scripted plugin (see [`Scripted`]) without a delivery stage.
    fn record_stage(table: &str, salt: u32) -> Vec<u8> {
        Scripted {
            table,
            deliver: false,
            salt,
        }
        .wasm()
    }

    fn load(spec: &PluginSpec, m: &Arc<FilterMetrics>) -> Plugin {
        Plugin::load(spec, DEFAULT_MAX_MODULE_BYTES, m).expect("the plugin loads")
    }

    fn batch(records: &[String]) -> Vec<&[u8]> {
        records.iter().map(|r| r.as_bytes()).collect()
    }

    fn shown(decided: &[Decided]) -> Vec<String> {
        decided.iter().map(show).collect()
    }

    /// Records of devices `dev0`, `dev1`… with these digits.
    fn digits(ds: &[u8]) -> Vec<String> {
        ds.iter()
            .enumerate()
            .map(|(i, d)| rec(&format!("dev{i}"), *d))
            .collect()
    }

    #[test]
    fn isolation_keeps_the_verdict_of_every_item_that_does_not_fail() {
        let mixed = record_stage("pdrppppppt", 10);
        let r = rec("x", 3);
        for (policy, failed) in [(Policy::FailOpen, "pass"), (Policy::FailClosed, "drop")] {
            let m = Arc::new(FilterMetrics::default());
            let mut p = load(&spec("mixed", mixed.clone(), &r, policy, S), &m);
            let records = digits(&[0, 1, 9, 2, 0, 9, 1, 2, 0]);
            assert_eq!(
                shown(&p.filter(&batch(&records))),
                [
                    "pass", "drop", failed, &r, "pass", failed, "drop", &r, "pass"
                ]
            );
            assert_eq!(
                failures(&m, "mixed", "trap"),
                3,
                "the batch, then each poison record"
            );
            assert_eq!(count(&m.by_policy, "mixed"), 2);
            assert!(p.breaker.open_until.is_none());
            // The instance that failed last is gone; a fresh one works.
            assert_eq!(shown(&p.filter(&batch(&digits(&[1])))), ["drop"]);
        }
    }

    #[test]
    fn after_four_failed_items_the_rest_of_the_batch_gets_the_policy_untried() {
        let m = Arc::new(FilterMetrics::default());
        let mixed = record_stage("pdrppppppt", 10);
        let mut p = load(&spec("mixed", mixed, "{}", Policy::FailOpen, S), &m);
        let records = digits(&[9, 9, 9, 9, 1, 1]);
        assert_eq!(shown(&p.filter(&batch(&records))), ["pass"; 6]);
        assert_eq!(failures(&m, "mixed", "trap"), 5);
        assert_eq!(count(&m.by_policy, "mixed"), 6);
        assert_eq!(p.breaker.bad_calls, 1, "all by the policy: a bad batch");
    }

    #[test]
    fn isolation_keeps_the_verdicts_around_items_that_run_out_of_time() {
        let m = Arc::new(FilterMetrics::default());
        let mixed = record_stage("pdrpppppsp", 11);
        let timeout = 400 * MS;
        let r = rec("x", 3);
        let mut p = load(&spec("mixed", mixed, &r, Policy::FailOpen, timeout), &m);
        let records = digits(&[0, 8, 1, 8, 2]);
        let started = Instant::now();
        let decided = p.filter(&batch(&records));
        let took = started.elapsed();
        assert_eq!(shown(&decided), ["pass", "pass", "drop", "pass", &r]);
        assert_eq!(failures(&m, "mixed", "timeout"), 3);
        // Expected: the batch call's 400 ms, then 100 ms per spinning item.
        assert!(took < 3 * 2 * timeout, "{took:?}");
    }

    #[test]
    fn one_batch_holds_up_the_caller_at_most_twice_the_timeout() {
        let m = Arc::new(FilterMetrics::default());
        let timeout = 100 * MS;
        let mut p = load(
            &spec("spin", shipped("spin"), "{}", Policy::FailOpen, timeout),
            &m,
        );
        let records = digits(&[0; 16]);
        let started = Instant::now();
        let decided = p.filter(&batch(&records));
        let took = started.elapsed();
        assert_eq!(shown(&decided), ["pass"; 16]);
        // The batch call, then up to four one-item calls of a quarter each,
        // as many as the budget has room for.
        assert!((2..=5).contains(&failures(&m, "spin", "timeout")));
        assert!(took >= timeout, "{took:?}");
        assert!(took < 3 * 2 * timeout, "{took:?}");
        let stalled = m
            .stall_seconds
            .get(&crate::metrics::PluginLabel {
                plugin: "spin".into(),
            })
            .map_or(0.0, |c| c.get());
        assert!(stalled >= timeout.as_secs_f64(), "{stalled}");
    }

    #[test]
    fn a_plugin_that_keeps_running_out_of_time_is_switched_off_by_the_stall_it_causes() {
        let m = Arc::new(FilterMetrics::default());
        let timeout = 100 * MS;
        let mut p = load(
            &spec(
                "spin",
                shipped("spin"),
                r#"{"device_id":"B"}"#,
                Policy::FailClosed,
                timeout,
            ),
            &m,
        );
        // Mostly good batches: never bad, so only the time they cost can
        // switch the plugin off (about 125 ms each, 1 s in all).
        let records = vec![rec("A", 0), rec("A", 0), rec("A", 0), rec("B", 0)];
        let started = Instant::now();
        let mut batches = 0;
        while p.breaker.open_until.is_none() && batches < 40 {
            let t = Instant::now();
            let decided = p.filter(&batch(&records));
            assert!(t.elapsed() < 3 * 2 * timeout, "{:?}", t.elapsed());
            assert_eq!(shown(&decided), ["pass", "pass", "pass", "drop"]);
            batches += 1;
        }
        let took = started.elapsed();
        assert_eq!(p.m.opened_on_stall.get(), 1, "after {batches} batches");
        assert_eq!(p.m.opened_on_failures.get(), 0);
        assert_eq!(p.m.breaker_open.get(), 1);
        // The stall limit, plus at most one batch budget.
        assert!(took < 3 * (STALL_LIMIT + 2 * timeout), "{took:?}");
        // Switched off: the policy decides without a call.
        let timeouts = failures(&m, "spin", "timeout");
        assert_eq!(shown(&p.filter(&batch(&records))), ["drop"; 4]);
        assert_eq!(failures(&m, "spin", "timeout"), timeouts);
    }

    #[test]
    fn a_switched_off_plugin_is_tried_after_its_backoff_and_switched_on_when_it_works() {
        let m = Arc::new(FilterMetrics::default());
        let mixed = record_stage("pdrppppppt", 12);
        let mut p = load(&spec("mixed", mixed, "{}", Policy::FailClosed, S), &m);
        let (poison, good) = (digits(&[9]), digits(&[0]));
        for _ in 0..3 {
            assert_eq!(shown(&p.filter(&batch(&poison))), ["drop"]);
        }
        assert_eq!(p.m.opened_on_failures.get(), 1);
        assert_eq!(p.m.breaker_open.get(), 1);
        // While off, even a good record gets the policy, without a call.
        assert_eq!(shown(&p.filter(&batch(&good))), ["drop"]);
        assert_eq!(failures(&m, "mixed", "trap"), 3);

        let wait_for_trial = |p: &Plugin| {
            let until = p.breaker.open_until.expect("open");
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        };
        wait_for_trial(&p);
        let trial = Instant::now();
        assert_eq!(shown(&p.filter(&batch(&poison))), ["drop"]);
        assert_eq!(failures(&m, "mixed", "trap"), 4, "the trial called it");
        assert_eq!(p.m.opened_on_failures.get(), 2);
        let until = p.breaker.open_until.expect("off again");
        assert!(until >= trial + 2 * S, "twice the first backoff");

        wait_for_trial(&p);
        assert_eq!(shown(&p.filter(&batch(&good))), ["pass"]);
        assert_eq!(p.m.breaker_open.get(), 0);
        assert!(p.breaker.open_until.is_none());
        assert_eq!(p.breaker.backoff, BREAKER_MIN_BACKOFF);
    }
}
