//! Which events each device belongs to (IMEI → event ids), and back.
//!
//! Loaded from the database by the same join as the snapshot and reloaded in
//! the background, so a tracker moved to another car is picked up without a
//! restart. The record path only reads an `Arc` of the current map.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustc_hash::FxHashMap;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{Metrics, inc};

/// Every (IMEI, event) registration: `entries → entry_devices → devices.imei`.
/// `entry_devices.device_id` is a uuid and `positions.device_id` an IMEI, so
/// the join goes through `devices.imei`.
pub const DEVICE_EVENTS_SQL: &str = "SELECT DISTINCT d.imei, e.event_id \
     FROM entries e \
     JOIN entry_devices ed ON ed.entry_id = e.id \
     JOIN devices d ON d.id = ed.device_id";

/// One loaded map.
#[derive(Debug)]
pub struct DeviceEvents {
    by_device: FxHashMap<Box<str>, Box<[Uuid]>>,
    /// Each event's devices, sorted (so two loads compare as sets).
    by_event: FxHashMap<Uuid, Box<[Box<str>]>>,
    /// When the first map was loaded (Unix ms; `i64::MAX` before).
    loaded_ms: i64,
    /// When an event's devices last changed, if after the first load: a
    /// resume from before then gets the full snapshot (a device that left
    /// would otherwise linger on the client's map).
    changed_ms: FxHashMap<Uuid, i64>,
}

impl Default for DeviceEvents {
    fn default() -> Self {
        Self {
            by_device: FxHashMap::default(),
            by_event: FxHashMap::default(),
            loaded_ms: i64::MAX,
            changed_ms: FxHashMap::default(),
        }
    }
}

impl DeviceEvents {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Uuid)>) -> Self {
        let mut by_device: FxHashMap<Box<str>, Vec<Uuid>> = FxHashMap::default();
        let mut by_event: FxHashMap<Uuid, Vec<Box<str>>> = FxHashMap::default();
        for (imei, event) in pairs {
            by_event
                .entry(event)
                .or_default()
                .push(imei.as_str().into());
            by_device.entry(imei.into()).or_default().push(event);
        }
        Self {
            by_device: by_device.into_iter().map(|(k, v)| (k, v.into())).collect(),
            by_event: by_event
                .into_iter()
                .map(|(k, mut v)| {
                    v.sort_unstable();
                    v.dedup();
                    (k, v.into())
                })
                .collect(),
            ..Self::default()
        }
    }

    /// This map as the successor of `previous`, loaded at `now_ms`: the
    /// events whose devices differ are stamped `now_ms`.
    fn succeeding(mut self, previous: &DeviceEvents, now_ms: i64) -> Self {
        if previous.loaded_ms == i64::MAX {
            self.loaded_ms = now_ms;
            return self;
        }
        self.loaded_ms = previous.loaded_ms;
        self.changed_ms = previous.changed_ms.clone();
        let events = previous.by_event.keys().chain(self.by_event.keys());
        let changed: Vec<Uuid> = events
            .filter(|e| previous.devices_of(**e) != self.devices_of(**e))
            .copied()
            .collect();
        for e in changed {
            self.changed_ms.insert(e, now_ms);
        }
        self
    }

    /// Since when (Unix ms) the map has known `event`'s devices as they are
    /// now.
    pub fn unchanged_since(&self, event: Uuid) -> i64 {
        self.changed_ms
            .get(&event)
            .copied()
            .unwrap_or(self.loaded_ms)
    }

    /// The events a device is registered to (empty for an orphan device).
    pub fn events_of(&self, imei: &str) -> &[Uuid] {
        self.by_device.get(imei).map_or(&[], |e| e)
    }

    /// The devices registered to an event.
    pub fn devices_of(&self, event: Uuid) -> &[Box<str>] {
        self.by_event.get(&event).map_or(&[], |d| d)
    }

    pub fn device_count(&self) -> usize {
        self.by_device.len()
    }
}

/// The current map, swapped whole on every reload.
#[derive(Default)]
pub struct DeviceMap {
    current: RwLock<Arc<DeviceEvents>>,
}

impl DeviceMap {
    pub fn current(&self) -> Arc<DeviceEvents> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace(&self, map: DeviceEvents) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(map.succeeding(&current, crate::resume::unix_ms()));
    }
}

/// Loads the map once.
pub async fn load(db: &PgPool) -> Result<DeviceEvents, sqlx::Error> {
    let rows: Vec<(String, Uuid)> = sqlx::query_as(DEVICE_EVENTS_SQL).fetch_all(db).await?;
    Ok(DeviceEvents::from_pairs(rows))
}

/// Reloads the map every `every` until cancelled. While the database is down
/// the last good map stays in use and reloads are retried sooner.
pub async fn refresh_loop(
    db: PgPool,
    map: Arc<DeviceMap>,
    metrics: Arc<Metrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut retry = Duration::from_millis(250);
    loop {
        let wait = match load(&db).await {
            Ok(m) => {
                metrics.device_map_devices.set(m.device_count() as i64);
                map.replace(m);
                inc(&metrics.device_map_refreshes, "result", "ok");
                retry = Duration::from_millis(250);
                every
            }
            Err(e) => {
                inc(&metrics.device_map_refreshes, "result", "error");
                tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64, "device to event map reload failed; keeping the previous map");
                let wait = retry.min(every);
                retry = (retry * 2).min(Duration::from_secs(30));
                wait
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, u128)]) -> DeviceEvents {
        DeviceEvents::from_pairs(
            p.iter()
                .map(|(d, e)| ((*d).to_owned(), Uuid::from_u128(*e))),
        )
    }

    #[test]
    fn an_event_is_stamped_when_its_devices_change() {
        let (e1, e2, e3) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let before = DeviceEvents::default();
        assert_eq!(
            before.unchanged_since(e1),
            i64::MAX,
            "nothing known before a load"
        );

        let first = pairs(&[("a", 1), ("b", 1), ("c", 2)]).succeeding(&before, 100);
        assert_eq!(first.unchanged_since(e1), 100);
        assert_eq!(
            first.unchanged_since(e3),
            100,
            "an event without devices, as loaded"
        );

        // Same sets in another order: nothing changed.
        let second = pairs(&[("c", 2), ("b", 1), ("a", 1)]).succeeding(&first, 200);
        assert_eq!(second.unchanged_since(e1), 100);

        // c moves from event 2 to event 1; event 3 gets a device.
        let third = pairs(&[("a", 1), ("b", 1), ("c", 1), ("d", 3)]).succeeding(&second, 300);
        assert_eq!(third.unchanged_since(e1), 300);
        assert_eq!(third.unchanged_since(e2), 300, "the event c left");
        assert_eq!(third.unchanged_since(e3), 300);

        let fourth = pairs(&[("a", 1), ("b", 1), ("c", 1), ("d", 3)]).succeeding(&third, 400);
        assert_eq!(fourth.unchanged_since(e1), 300, "a change is remembered");
        assert_eq!(fourth.unchanged_since(Uuid::from_u128(9)), 100);
    }
}
