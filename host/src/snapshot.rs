//! What a snapshot is: the latest non-faulty position of every device of
//! an event, built once and shared by everyone who subscribes to the event
//! at about the same time ([`crate::snapshots`] decides who shares which).
//!
//! The database answers with one index descent per device (a LATERAL subquery
//! with `ORDER BY ts DESC LIMIT 1` on `positions_faulty_idx`), each row shaped
//! as a stream payload so that it goes through the same decoding and the same
//! filter chain as live records. The host's own latest positions are merged
//! in, so a snapshot is never older than the live data was when it was
//! built, and they alone answer when the database fails (fail open).
//!
//! The record stage runs once over a snapshot's rows (on the record path,
//! which owns the chain), and its `"snapshot":[…]}` body is serialized once
//! per delivery audience ([`View`]) and sent to every subscriber behind its
//! own `{"type":"subscribed",…,"id":…,` head, as one frame of two shared
//! pieces.
//!
//! A shared snapshot was built before some of its subscribers registered:
//! positions that reached the host in between were never pushed to them. So
//! for each subscriber, once it is registered, the record path compares the
//! snapshot with the host's latest positions and queues the devices that
//! moved since as positions right behind `subscribed` (*catch-up*, made
//! once per audience and shared too), into the topic still held, where the
//! outbox's per-device checks dedupe them against live positions pushed
//! meanwhile. It runs between two batches, so every position the host has
//! taken in by then has also been routed, and every one routed later is
//! newer: nothing is missed, nothing sent twice.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use uuid::Uuid;

use crate::deflate::{self, Packed};
use crate::ids::DeviceIdx;
use crate::outbox::{Covered, Floor};
use crate::protocol;
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

/// One device's entry in an event's snapshot: through the record stage,
/// not yet through the delivery stage.
#[derive(Debug, Clone)]
pub struct Entry {
    pub device: Box<str>,
    pub idx: DeviceIdx,
    pub ts_ms: i64,
    pub body: Bytes,
    /// The payload the record stage passed: what the delivery stage reads.
    pub payload: Bytes,
    /// Whether a subscriber must remember the entry's `ts` (see
    /// `outbox::Floor`).
    pub floor: Floor,
}

/// An event's snapshot, built once and shared by everyone it is served to.
pub struct EventSnapshot {
    pub event: Uuid,
    /// `event:<id>`, as the delivery stage sees it.
    pub topic: String,
    /// `{"type":"position","topic":"event:<id>",`, for catch-up positions.
    pub prefix: Bytes,
    /// The query failed or timed out: the host's memory alone.
    pub from_memory: bool,
    /// The chain it went through (see `Snapshots::chain_generation`).
    pub chain: u64,
    /// Newest per device, in device order (the order on the wire).
    pub entries: Vec<Entry>,
    by_device: FxHashMap<DeviceIdx, u32>,
    /// Per delivery audience (`None`: everyone, without a delivery stage),
    /// made on first use by the record path.
    views: Mutex<FxHashMap<Option<Identity>, Arc<View>>>,
}

impl EventSnapshot {
    pub fn new(event: Uuid, mut entries: Vec<Entry>, from_memory: bool, chain: u64) -> Self {
        entries.sort_unstable_by(|a, b| a.device.cmp(&b.device));
        let by_device = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.idx, i as u32))
            .collect();
        Self {
            event,
            topic: protocol::topic_of(event),
            prefix: protocol::position_prefix(event),
            from_memory,
            chain,
            entries,
            by_device,
            views: Mutex::default(),
        }
    }

    /// Nothing (the host is stopping).
    pub fn empty(event: Uuid) -> Self {
        Self::new(event, Vec::new(), false, 0)
    }

    /// The `ts` of a device's entry (before the delivery stage).
    pub fn ts_of(&self, device: DeviceIdx) -> Option<i64> {
        self.by_device
            .get(&device)
            .map(|&i| self.entries[i as usize].ts_ms)
    }

    /// What `audience` is sent of this snapshot (`None`: everyone), made by
    /// `make` the first time it is asked for.
    pub fn view(&self, audience: Option<&Identity>, make: impl FnOnce(&Self) -> View) -> Arc<View> {
        let key = audience.cloned();
        if let Some(v) = self.lock_views().get(&key) {
            return v.clone();
        }
        // Made outside the lock: only the record path makes views, one at
        // a time, so nobody can have made it meanwhile.
        let view = Arc::new(make(self));
        self.lock_views().insert(key, view.clone());
        view
    }

    fn lock_views(&self) -> std::sync::MutexGuard<'_, FxHashMap<Option<Identity>, Arc<View>>> {
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one delivery audience is sent of a snapshot.
pub struct View {
    /// `"snapshot":[…]}`: the shared tail of every `subscribed` reply.
    pub body: Bytes,
    /// Entries and floors, for the outbox's `release`.
    pub covered: Arc<Covered>,
    /// `body` compressed for permessage-deflate, made the first time a
    /// client that negotiated it is served (`None` inside: too short, or
    /// did not shrink).
    deflated: OnceLock<Option<Bytes>>,
    /// Catch-up positions already made for this audience, by device: the
    /// `ts` of the latest position each was made from, and the result
    /// (`None`: the delivery stage withheld it).
    catch_up: Mutex<FxHashMap<DeviceIdx, (i64, Option<CatchUp>)>>,
}

/// A position queued behind `subscribed` because the shared snapshot was
/// older than the host's memory; its message is shared by every subscriber
/// of the same audience.
#[derive(Debug, Clone)]
pub struct CatchUp {
    pub ts_ms: i64,
    /// Shared with the other subscribers of the audience, and so is its
    /// compressed form.
    pub msg: Arc<Packed>,
    pub floor: Floor,
}

impl View {
    /// A view of these `(device, ts, body, floor)` entries, in wire order.
    pub fn new(entries: &[(DeviceIdx, i64, Bytes, Floor)]) -> Self {
        Self {
            body: protocol::snapshot_body(entries.iter().map(|(_, _, b, _)| &b[..])),
            covered: Arc::new(Covered::new(
                entries.iter().map(|(d, ts, _, f)| (*d, *ts, *f)),
            )),
            catch_up: Mutex::default(),
            deflated: OnceLock::new(),
        }
    }

    /// Compresses the body unless done already or shorter than `min`; the
    /// sizes before and after if this call compressed it.
    pub fn deflate(&self, min: usize) -> Option<(usize, usize)> {
        let mut made = None;
        self.deflated.get_or_init(|| {
            if self.body.len() < min {
                return None;
            }
            let c = deflate::compress(&self.body, deflate::SNAPSHOT_LEVEL)?;
            made = Some((self.body.len(), c.len()));
            Some(c)
        });
        made
    }

    /// The compressed body, if [`View::deflate`] made one.
    pub fn deflated(&self) -> Option<&Bytes> {
        self.deflated.get().and_then(Option::as_ref)
    }

    /// Entries sent.
    pub fn len(&self) -> usize {
        self.covered.entries.len()
    }

    /// The catch-up made earlier for `device` from its latest position at
    /// `from_ts`, if any.
    pub fn made_catch_up(&self, device: DeviceIdx, from_ts: i64) -> Option<Option<CatchUp>> {
        match self.lock_catch_up().get(&device) {
            Some((ts, made)) if *ts == from_ts => Some(made.clone()),
            _ => None,
        }
    }

    pub fn remember_catch_up(&self, device: DeviceIdx, from_ts: i64, made: Option<CatchUp>) {
        self.lock_catch_up().insert(device, (from_ts, made));
    }

    fn lock_catch_up(
        &self,
    ) -> std::sync::MutexGuard<'_, FxHashMap<DeviceIdx, (i64, Option<CatchUp>)>> {
        self.catch_up.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_view_is_made_once_per_audience() {
        let s = EventSnapshot::new(Uuid::new_v4(), Vec::new(), false, 0);
        let made = AtomicUsize::new(0);
        let make = |_: &EventSnapshot| {
            made.fetch_add(1, Ordering::SeqCst);
            View::new(&[])
        };
        let a = Identity {
            role: "r".into(),
            user_id: "a".into(),
        };
        let b = Identity {
            role: "r".into(),
            user_id: "b".into(),
        };
        let va = s.view(Some(&a), make);
        assert!(Arc::ptr_eq(&va, &s.view(Some(&a.clone()), make)));
        s.view(Some(&b), make);
        s.view(None, make);
        s.view(None, make);
        assert_eq!(made.load(Ordering::SeqCst), 3);
    }
}
