//! The snapshot a subscriber receives: the latest non-faulty position of
//! every device of the event.
//!
//! The database answers with one index descent per device (a LATERAL subquery
//! with `ORDER BY ts DESC LIMIT 1` on `positions_faulty_idx`), each row shaped
//! as a stream payload so that it goes through the same decoding and the same
//! filter chain as live records. The host's own latest positions are merged
//! in, so a snapshot is never older than the live data, and they alone answer
//! when the database fails (fail open).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::broadcast::{SnapshotEntry, SnapshotJob, Work};
use crate::devices::DeviceEvents;
use crate::ids::DeviceIdx;
use crate::latest::LatestPositions;
use crate::metrics::Metrics;
use crate::outbox::Floor;
use crate::registry::Identity;

/// The latest non-faulty position of each device registered to event `$1`,
/// as the ingestion service's payload JSON.
pub const SNAPSHOT_SQL: &str = "\
SELECT json_build_object( \
         'device_id', d.imei, \
         'timestamp', to_char(p.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
         'latitude', p.latitude, 'longitude', p.longitude, 'altitude', p.altitude, \
         'angle', p.angle, 'speed', p.speed, 'satellites', p.satellites, \
         'priority', p.priority, 'attributes', p.attributes)::text \
FROM (SELECT DISTINCT dv.imei \
        FROM entries e \
        JOIN entry_devices ed ON ed.entry_id = e.id \
        JOIN devices dv ON dv.id = ed.device_id \
       WHERE e.event_id = $1) d \
CROSS JOIN LATERAL ( \
       SELECT ts, latitude, longitude, altitude, angle, speed, satellites, priority, attributes \
         FROM positions \
        WHERE device_id = d.imei AND faulty = false \
        ORDER BY ts DESC \
        LIMIT 1) p";

/// One device's entry, keyed for the connection's outbox.
#[derive(Debug, Clone)]
pub struct Entry {
    pub device: DeviceIdx,
    pub ts_ms: i64,
    pub body: Bytes,
    pub floor: Floor,
}

/// A built snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<Entry>,
}

/// What a snapshot is built from.
pub struct Sources<'a> {
    pub db: &'a PgPool,
    pub timeout: Duration,
    pub devices: &'a DeviceEvents,
    pub latest: &'a LatestPositions,
    pub work: &'a mpsc::Sender<Work>,
    pub metrics: &'a Metrics,
}

/// Builds the snapshot of `event` for a subscriber.
pub async fn build(event: Uuid, topic: &str, identity: &Arc<Identity>, s: Sources<'_>) -> Snapshot {
    let started = Instant::now();
    let query = sqlx::query_scalar::<_, String>(SNAPSHOT_SQL)
        .bind(event)
        .fetch_all(s.db);
    let rows = match tokio::time::timeout(s.timeout, query).await {
        Ok(Ok(rows)) => {
            s.metrics
                .snapshot_latency_ms
                .observe(started.elapsed().as_secs_f64() * 1000.0);
            Some(rows)
        }
        Ok(Err(e)) => {
            tracing::warn!(%event, error = %e, "snapshot query failed; serving the snapshot from memory");
            None
        }
        Err(_) => {
            tracing::warn!(%event, timeout_ms = s.timeout.as_millis() as u64, "snapshot query timed out; serving the snapshot from memory");
            None
        }
    };
    if rows.is_none() {
        s.metrics.snapshot_failures.inc();
    }

    let known = s.devices.devices_of(event);
    let from_memory = s
        .latest
        .get_many(known.iter().map(|d| &**d))
        .into_iter()
        .map(|(device, _, l)| (Box::<str>::from(device), l))
        .collect();
    let (reply, answer) = oneshot::channel();
    let job = SnapshotJob {
        topic: topic.to_owned(),
        identity: identity.clone(),
        from_database: rows.into_iter().flatten().map(Bytes::from).collect(),
        from_memory,
        reply,
    };
    let entries: Vec<SnapshotEntry> = match s.work.send(Work::Snapshot(job)).await {
        Ok(()) => answer.await.unwrap_or_default(),
        // Shutting down: the record path is gone.
        Err(_) => Vec::new(),
    };
    let entries: Vec<Entry> = entries
        .into_iter()
        .map(|e| Entry {
            device: s.latest.device_idx(&e.device),
            ts_ms: e.ts_ms,
            body: e.body,
            floor: e.floor,
        })
        .collect();
    s.metrics.snapshot_size.observe(entries.len() as f64);
    Snapshot { entries }
}
