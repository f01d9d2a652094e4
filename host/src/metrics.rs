//! Prometheus metrics.
//!
//! One registry per host instance (not a process-global one) so that tests can
//! run several hosts in one process and read each one's numbers. Hot-path
//! code holds the metric handles directly; counters that move once per record
//! are added per batch, not per subscriber.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A single `result`/`reason`/`code` label.
pub type Label = [(&'static str, &'static str); 1];
type CounterFamily = Family<Label, Counter>;

/// Every metric the host exports.
pub struct Metrics {
    registry: Registry,

    pub connections: Gauge,
    pub deflate_connections: Gauge,
    pub deflate_in_bytes: Counter,
    pub deflate_out_bytes: Counter,
    pub auth_attempts: CounterFamily,
    pub auth_latency_ms: Histogram,
    pub authz: CounterFamily,
    pub authz_latency_ms: Histogram,
    pub handshakes_in_flight: Gauge,
    pub handshakes_refused: Counter,
    pub subscriptions: Gauge,
    pub client_errors: CounterFamily,
    pub closes: CounterFamily,

    pub records_read: Counter,
    pub records_malformed: CounterFamily,
    pub records_stale: Counter,
    pub records_unrouted: Counter,
    pub records_routed: Counter,
    pub deliveries: Counter,
    pub socket_writes: Counter,
    pub flush_lag_ms: Histogram,
    pub conflated: Counter,
    pub consumer_lag: Gauge,
    pub consumer_errors: CounterFamily,
    pub redis_connected: Gauge,

    pub snapshot_latency_ms: Histogram,
    pub snapshot_size: Histogram,
    pub snapshot_failures: Counter,
    pub snapshot_bad_rows: Counter,
    pub snapshot_queries: Counter,
    pub snapshots_served: CounterFamily,
    pub snapshot_catch_up: Counter,
    pub resumes: CounterFamily,

    pub device_map_refreshes: CounterFamily,
    pub device_map_devices: Gauge,

    pub filter: std::sync::Arc<FilterMetrics>,
}

fn latency_ms() -> Histogram {
    // 0.25 ms … ~8 s
    Histogram::new(exponential_buckets(0.25, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                r.register($name, $help, m.clone());
                m
            }};
        }
        let mut m = Metrics {
            connections: reg!(
                "livecast_connections",
                "Open WebSocket connections",
                Gauge::default()
            ),
            deflate_connections: reg!(
                "livecast_ws_deflate_connections",
                "Open WebSocket connections that negotiated permessage-deflate",
                Gauge::default()
            ),
            deflate_in_bytes: reg!(
                "livecast_deflate_in_bytes",
                "Bytes of the messages compressed for permessage-deflate clients, before (each message once, however many clients get it)",
                Counter::default()
            ),
            deflate_out_bytes: reg!(
                "livecast_deflate_out_bytes",
                "Bytes of the messages compressed for permessage-deflate clients, after",
                Counter::default()
            ),
            auth_attempts: reg!(
                "processor_live_auth_attempts",
                "Upgrade auth attempts by result (ok, unauthorized, unavailable, forbidden_origin)",
                CounterFamily::default()
            ),
            auth_latency_ms: reg!(
                "processor_live_auth_latency_ms",
                "Latency of the Directus /users/me call at upgrade, ms",
                latency_ms()
            ),
            authz: reg!(
                "livecast_authz",
                "Subscribe authorizations by result (ok, forbidden, not_found, error)",
                CounterFamily::default()
            ),
            authz_latency_ms: reg!(
                "livecast_authz_latency_ms",
                "Latency of the Directus /items/events call at subscribe, ms",
                latency_ms()
            ),
            handshakes_in_flight: reg!(
                "livecast_handshakes_in_flight",
                "Upgrades being authenticated now (at most LIVE_WS_MAX_HANDSHAKES)",
                Gauge::default()
            ),
            handshakes_refused: reg!(
                "livecast_handshakes_refused",
                "Upgrades answered 503 because no handshake slot freed up in time",
                Counter::default()
            ),
            subscriptions: reg!(
                "livecast_subscriptions",
                "Active subscriptions",
                Gauge::default()
            ),
            client_errors: reg!(
                "livecast_client_errors",
                "Error replies sent to clients, by code",
                CounterFamily::default()
            ),
            closes: reg!(
                "livecast_closes",
                "Connections closed, by reason (client, silent, shutdown, binary_frame, frame_too_large, slow_client, session_expired)",
                CounterFamily::default()
            ),
            records_read: reg!(
                "livecast_records_read",
                "Stream entries read",
                Counter::default()
            ),
            records_malformed: reg!(
                "livecast_records_malformed",
                "Stream entries skipped as malformed, by reason",
                CounterFamily::default()
            ),
            records_stale: reg!(
                "livecast_records_stale",
                "Records not broadcast because the device already has a newer position",
                Counter::default()
            ),
            records_unrouted: reg!(
                "livecast_records_unrouted",
                "Records of devices registered to no event",
                Counter::default()
            ),
            records_routed: reg!(
                "livecast_records_routed",
                "Records that reached at least one subscribed topic",
                Counter::default()
            ),
            deliveries: reg!(
                "livecast_deliveries",
                "Positions queued to subscribers",
                Counter::default()
            ),
            socket_writes: reg!(
                "livecast_socket_writes",
                "Vectored writes to client sockets; deliveries per write shows how well writes coalesce",
                Counter::default()
            ),
            flush_lag_ms: reg!(
                "livecast_flush_lag_ms",
                "How late the writers reach the connections whose flush tick came due, once per writer pass",
                latency_ms()
            ),
            conflated: reg!(
                "livecast_conflated",
                "Positions replaced by a newer one of the same device before a slow client read them",
                Counter::default()
            ),
            consumer_lag: reg!(
                "livecast_consumer_lag",
                "Entries in the stream not yet read by this instance's group",
                Gauge::default()
            ),
            consumer_errors: reg!(
                "livecast_consumer_errors",
                "Redis errors of the stream consumer, by kind",
                CounterFamily::default()
            ),
            redis_connected: reg!(
                "livecast_redis_connected",
                "1 while the stream consumer is connected and its group exists",
                Gauge::default()
            ),
            snapshot_latency_ms: reg!(
                "processor_live_snapshot_query_latency_ms",
                "Latency of the snapshot query, ms",
                latency_ms()
            ),
            snapshot_size: reg!(
                "processor_live_snapshot_size",
                "Entries per snapshot",
                Histogram::new(exponential_buckets(1.0, 2.0, 12))
            ),
            snapshot_bad_rows: reg!(
                "livecast_snapshot_bad_rows",
                "Snapshot rows left out because they do not decode as a position",
                Counter::default()
            ),
            snapshot_failures: reg!(
                "livecast_snapshot_failures",
                "Snapshots served from memory because the database failed",
                Counter::default()
            ),
            snapshot_queries: reg!(
                "livecast_snapshot_queries",
                "Snapshot queries sent to the database (one per event for all the subscribes that share it)",
                Counter::default()
            ),
            snapshots_served: reg!(
                "livecast_snapshots_served",
                "Snapshots served, by source (query: the subscribe ran it; flight: joined one in progress; cache: built within LIVE_SNAPSHOT_SHARE_MS)",
                CounterFamily::default()
            ),
            snapshot_catch_up: reg!(
                "livecast_snapshot_catch_up",
                "Positions sent right after subscribed because the shared snapshot was older than the host's memory",
                Counter::default()
            ),
            resumes: reg!(
                "livecast_resumes",
                "Subscribes with since, by result (delta: answered from memory; else why the full snapshot was sent: future, not_covered, devices_changed, chain_reloaded)",
                CounterFamily::default()
            ),
            device_map_refreshes: reg!(
                "livecast_device_map_refreshes",
                "Reloads of the device to event map, by result",
                CounterFamily::default()
            ),
            device_map_devices: reg!(
                "livecast_device_map_devices",
                "Devices registered to at least one event",
                Gauge::default()
            ),
            filter: Default::default(),
            registry: Registry::default(),
        };
        m.filter.register(&mut r);
        m.registry = r;
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counter `name{label=value}` from a family, for tests and the bench.
    #[cfg(any(test, feature = "test-util"))]
    pub fn count(family: &CounterFamily, key: &'static str, value: &'static str) -> u64 {
        family.get(&[(key, value)]).map(|c| c.get()).unwrap_or(0)
    }
}

/// One more in a gauge for as long as it lives (a connection, a handshake),
/// however its owner ends.
pub struct Counted(Gauge);

impl Counted {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `family{key=value} += 1`.
pub fn inc(family: &CounterFamily, key: &'static str, value: &'static str) {
    family.get_or_create(&[(key, value)]).inc();
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

/// Why a circuit breaker opened: `failures` (bad calls in a row) or
/// `stall` (time spent on failed batches).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabel {
    pub plugin: String,
    pub reason: &'static str,
}

type Hist = Family<PluginLabel, Histogram, fn() -> Histogram>;
type Seconds = Counter<f64, AtomicU64>;

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
    pub breaker_opens: Family<BreakerLabel, Counter>,
    pub stall_seconds: Family<PluginLabel, Seconds>,
    pub reloads: Family<Label, Counter>,
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
            breaker_opens: Family::default(),
            stall_seconds: Family::default(),
            reloads: Family::default(),
            chain_plugins: Gauge::default(),
        }
    }
}

/// One plugin's series, looked up once when it loads so that a batch
/// touches no map.
pub(crate) struct PluginHandles {
    pub calls: Counter,
    pub records_in: Counter,
    pub passed: Counter,
    pub dropped: Counter,
    pub replaced: Counter,
    pub by_policy: Counter,
    pub batch_ms: Histogram,
    pub breaker_open: Gauge,
    pub opened_on_failures: Counter,
    pub opened_on_stall: Counter,
    pub stall_seconds: Seconds,
}

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
            "livecast_filter_breaker_opens",
            "Times a plugin was switched off by its circuit breaker, by reason (failures, stall)",
            self.breaker_opens.clone(),
        );
        r.register(
            "livecast_filter_stall_seconds",
            "Time the record path spent on batches in which the plugin failed: the failed call, fresh instances and isolation",
            self.stall_seconds.clone(),
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

    pub(crate) fn handles(&self, plugin: &str) -> PluginHandles {
        let l = PluginLabel {
            plugin: plugin.to_owned(),
        };
        let opens = |reason| {
            self.breaker_opens.get_or_create_owned(&BreakerLabel {
                plugin: plugin.to_owned(),
                reason,
            })
        };
        PluginHandles {
            calls: self.calls.get_or_create_owned(&l),
            records_in: self.records_in.get_or_create_owned(&l),
            passed: self.passed.get_or_create_owned(&l),
            dropped: self.dropped.get_or_create_owned(&l),
            replaced: self.replaced.get_or_create_owned(&l),
            by_policy: self.by_policy.get_or_create_owned(&l),
            batch_ms: self.batch_ms.get_or_create_owned(&l),
            breaker_open: self.breaker_open.get_or_create_owned(&l),
            opened_on_failures: opens("failures"),
            opened_on_stall: opens("stall"),
            stall_seconds: self.stall_seconds.get_or_create_owned(&l),
        }
    }

    pub(crate) fn failure(&self, plugin: &str, kind: &str) {
        self.failures
            .get_or_create(&FailureLabel {
                plugin: plugin.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// `livecast_filter_failures_total{plugin, kind}`, for tests.
    #[cfg(feature = "test-util")]
    pub fn failures_of(&self, plugin: &str, kind: &str) -> u64 {
        self.failures
            .get(&FailureLabel {
                plugin: plugin.to_owned(),
                kind: kind.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// `livecast_filter_breaker_opens_total{plugin, reason}`, for tests.
    #[cfg(feature = "test-util")]
    pub fn opens_of(&self, plugin: &str, reason: &'static str) -> u64 {
        self.breaker_opens
            .get(&BreakerLabel {
                plugin: plugin.to_owned(),
                reason,
            })
            .map_or(0, |c| c.get())
    }

    /// Whether the plugin's breaker is open (or half-open), for tests.
    #[cfg(feature = "test-util")]
    pub fn breaker_is_open(&self, plugin: &str) -> bool {
        self.breaker_open
            .get(&PluginLabel {
                plugin: plugin.to_owned(),
            })
            .is_some_and(|g| g.get() != 0)
    }

    /// `livecast_filter_stall_seconds_total{plugin}`, for tests.
    #[cfg(feature = "test-util")]
    pub fn stall_seconds_of(&self, plugin: &str) -> f64 {
        self.stall_seconds
            .get(&PluginLabel {
                plugin: plugin.to_owned(),
            })
            .map_or(0.0, |c| c.get())
    }

    /// A per-plugin counter's value, for tests.
    #[cfg(feature = "test-util")]
    pub fn count(family: &Family<PluginLabel, Counter>, plugin: &str) -> u64 {
        family
            .get(&PluginLabel {
                plugin: plugin.to_owned(),
            })
            .map_or(0, |c| c.get())
    }
}
