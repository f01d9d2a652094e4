//! The snapshot a subscriber receives: the latest non-faulty position of
//! every device of the event.
//!
//! The database answers with one index descent per device (a LATERAL subquery
//! with `ORDER BY ts DESC LIMIT 1` on `positions_faulty_idx`); the host's own
//! latest positions are merged in so that a snapshot is never older than the
//! live data, and they alone answer when the database fails (fail open).

use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use serde_json::value::RawValue;
use sqlx::PgPool;
use uuid::Uuid;

use crate::devices::DeviceEvents;
use crate::latest::{DeviceIdx, LatestPositions};
use crate::metrics::Metrics;
use crate::record::Position;

/// The latest non-faulty position of each device registered to event `$1`.
pub const SNAPSHOT_SQL: &str = "\
SELECT d.imei, \
       (floor(extract(epoch FROM p.ts) * 1000))::int8 AS ts_ms, \
       p.latitude, p.longitude, p.speed::float8, p.angle::float8, p.attributes::text \
FROM (SELECT DISTINCT dv.imei \
        FROM entries e \
        JOIN entry_devices ed ON ed.entry_id = e.id \
        JOIN devices dv ON dv.id = ed.device_id \
       WHERE e.event_id = $1) d \
CROSS JOIN LATERAL ( \
       SELECT ts, latitude, longitude, speed, angle, attributes \
         FROM positions \
        WHERE device_id = d.imei AND faulty = false \
        ORDER BY ts DESC \
        LIMIT 1) p";

type Row = (String, i64, f64, f64, f64, f64, String);

/// One device's entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub device: DeviceIdx,
    pub ts_ms: i64,
    pub body: Bytes,
}

/// A built snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<Entry>,
    /// Whether the database answered (false: served from memory only).
    pub from_database: bool,
}

fn row_body(row: Row) -> Option<(String, i64, Bytes)> {
    let (imei, ts_ms, lat, lon, speed, angle, attributes) = row;
    let attributes = RawValue::from_string(attributes).ok();
    let p = Position {
        device: imei.as_str().into(),
        ts_ms,
        lat,
        lon,
        speed,
        course: angle,
        attributes,
    };
    let body = p.body();
    Some((imei, ts_ms, body))
}

/// Builds the snapshot of `event`.
pub async fn build(
    event: Uuid,
    db: &PgPool,
    timeout: Duration,
    devices: &DeviceEvents,
    latest: &LatestPositions,
    metrics: &Metrics,
) -> Snapshot {
    let started = Instant::now();
    let query = sqlx::query_as::<_, Row>(SNAPSHOT_SQL)
        .bind(event)
        .fetch_all(db);
    let rows = match tokio::time::timeout(timeout, query).await {
        Ok(Ok(rows)) => {
            metrics
                .snapshot_latency_ms
                .observe(started.elapsed().as_secs_f64() * 1000.0);
            Some(rows)
        }
        Ok(Err(e)) => {
            tracing::warn!(%event, error = %e, "snapshot query failed; serving the snapshot from memory");
            None
        }
        Err(_) => {
            tracing::warn!(%event, timeout_ms = timeout.as_millis() as u64, "snapshot query timed out; serving the snapshot from memory");
            None
        }
    };
    let from_database = rows.is_some();
    if !from_database {
        metrics.snapshot_failures.inc();
    }

    // Newest of database and memory, per device.
    let mut by_device: FxHashMap<String, (i64, Bytes)> = FxHashMap::default();
    for (imei, ts, body) in rows.into_iter().flatten().filter_map(row_body) {
        by_device.insert(imei, (ts, body));
    }
    let known = devices.devices_of(event);
    for (imei, _, l) in latest.get_many(known.iter().map(|d| &**d)) {
        match by_device.get_mut(imei) {
            Some((ts, _)) if *ts >= l.ts_ms => {}
            Some(slot) => *slot = (l.ts_ms, l.body),
            None => {
                by_device.insert(imei.to_owned(), (l.ts_ms, l.body));
            }
        }
    }
    let mut by_device: Vec<_> = by_device.into_iter().collect();
    by_device.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let entries: Vec<Entry> = by_device
        .into_iter()
        .map(|(imei, (ts_ms, body))| Entry {
            device: latest.device_idx(&imei),
            ts_ms,
            body,
        })
        .collect();
    metrics.snapshot_size.observe(entries.len() as f64);
    Snapshot {
        entries,
        from_database,
    }
}
