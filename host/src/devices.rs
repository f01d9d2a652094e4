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
#[derive(Debug, Default)]
pub struct DeviceEvents {
    by_device: FxHashMap<Box<str>, Box<[Uuid]>>,
    by_event: FxHashMap<Uuid, Box<[Box<str>]>>,
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
            by_event: by_event.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
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
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
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
