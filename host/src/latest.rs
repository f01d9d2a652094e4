//! The latest position of every device that belongs to an event.
//!
//! It gives each device a small integer (`DeviceIdx`) so that per-connection
//! queues key on integers instead of hashing IMEIs per subscriber, it drops
//! records older than what was already broadcast for a device (a tracker
//! replaying its offline buffer), and it backs snapshots so that a snapshot is
//! never older than the live data, even when the database lags behind.
//!
//! Only devices of the device map are remembered: anyone who can put a
//! record on the stream (a tracker speaking the ingestion protocol, a
//! plugin inventing a `device_id`) could otherwise grow the host without
//! bound. A device's index outlives its registration (outboxes key on it),
//! its position does not.

use std::sync::RwLock;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::devices::DeviceEvents;
use crate::ids::DeviceIdx;

/// A device's latest position: fix time, wire body, and the payload the
/// filter chain passed (the delivery stage of a snapshot needs it).
#[derive(Debug, Clone)]
pub struct Latest {
    pub ts_ms: i64,
    pub body: Bytes,
    pub payload: Bytes,
    /// When it reached the host (Unix ms, host clock): a resume lists a
    /// device whose position is older than the client's `since` but arrived
    /// after the client went away (see `resume`).
    pub arrived_ms: i64,
}

#[derive(Default)]
pub struct LatestPositions {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    index: FxHashMap<Box<str>, DeviceIdx>,
    latest: Vec<Option<Latest>>,
}

impl Inner {
    fn intern(&mut self, device: &str) -> DeviceIdx {
        if let Some(&i) = self.index.get(device) {
            return i;
        }
        let i = self.latest.len() as DeviceIdx;
        self.index.insert(device.into(), i);
        self.latest.push(None);
        i
    }
}

/// What `observe` decided for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Newer than anything seen for the device: broadcast it.
    Newer(DeviceIdx),
    /// Not newer than the device's latest: already superseded.
    Stale,
    /// The device belongs to no event: nobody can be sent it.
    Unrouted,
}

impl LatestPositions {
    /// Records a batch of positions under one lock: `(device, ts, body,
    /// payload)` in, all arrived at `arrived_ms`; one decision per record
    /// out (in `out`, cleared first). Devices of no event in `devices` are
    /// neither remembered nor indexed.
    pub fn observe<'a>(
        &self,
        records: impl Iterator<Item = (&'a str, i64, &'a Bytes, &'a Bytes)>,
        devices: &DeviceEvents,
        arrived_ms: i64,
        out: &mut Vec<Observed>,
    ) {
        out.clear();
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (device, ts_ms, body, payload) in records {
            if devices.events_of(device).is_empty() {
                out.push(Observed::Unrouted);
                continue;
            }
            let idx = inner.intern(device);
            let slot = &mut inner.latest[idx as usize];
            match slot {
                Some(l) if l.ts_ms >= ts_ms => out.push(Observed::Stale),
                _ => {
                    *slot = Some(Latest {
                        ts_ms,
                        body: body.clone(),
                        payload: payload.clone(),
                        arrived_ms,
                    });
                    out.push(Observed::Newer(idx));
                }
            }
        }
    }

    /// Forgets the positions of devices no longer in any event (their
    /// indexes stay: outboxes may still key on them).
    pub fn forget_unregistered(&self, devices: &DeviceEvents) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let Inner { index, latest } = &mut *inner;
        for (device, &idx) in index.iter() {
            if devices.events_of(device).is_empty() {
                latest[idx as usize] = None;
            }
        }
    }

    /// Devices ever indexed.
    #[cfg(test)]
    pub fn indexed(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .index
            .len()
    }

    /// The index of a device, created if it was never seen (a device known
    /// only from the database).
    pub fn device_idx(&self, device: &str) -> DeviceIdx {
        if let Some(&i) = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .index
            .get(device)
        {
            return i;
        }
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .intern(device)
    }

    /// The latest position of each listed device that is newer than what
    /// `have` says a snapshot holds for it (`None`: nothing).
    pub fn newer_than<'a>(
        &self,
        devices: impl Iterator<Item = &'a str>,
        have: impl Fn(DeviceIdx) -> Option<i64>,
    ) -> Vec<(DeviceIdx, Latest)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        devices
            .filter_map(|d| {
                let &idx = inner.index.get(d)?;
                let l = inner.latest[idx as usize].as_ref()?;
                match have(idx) {
                    Some(ts) if ts >= l.ts_ms => None,
                    _ => Some((idx, l.clone())),
                }
            })
            .collect()
    }

    /// The latest position of each listed device that has one.
    pub fn get_many<'a>(
        &self,
        devices: impl Iterator<Item = &'a str>,
    ) -> Vec<(&'a str, DeviceIdx, Latest)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        devices
            .filter_map(|d| {
                let &idx = inner.index.get(d)?;
                let l = inner.latest[idx as usize].clone()?;
                Some((d, idx, l))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(devices: &[&str]) -> DeviceEvents {
        let event = uuid::Uuid::new_v4();
        DeviceEvents::from_pairs(devices.iter().map(|d| ((*d).to_owned(), event)))
    }

    #[test]
    fn keeps_the_newest_and_flags_stale() {
        let l = LatestPositions::default();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        let mut out = Vec::new();
        l.observe(
            [
                ("d1", 10, &a, &a),
                ("d1", 5, &b, &b),
                ("d2", 1, &b, &b),
                ("d1", 10, &b, &b),
            ]
            .into_iter(),
            &map(&["d1", "d2"]),
            0,
            &mut out,
        );
        assert_eq!(
            out,
            [
                Observed::Newer(0),
                Observed::Stale,
                Observed::Newer(1),
                Observed::Stale
            ]
        );
        let got = l.get_many(["d1", "d3"].into_iter());
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].2.ts_ms, &got[0].2.body[..]), (10, &b"a"[..]));
        assert_eq!(l.device_idx("d3"), 2);
        assert_eq!(l.device_idx("d1"), 0);
    }

    #[test]
    fn newer_than_lists_what_a_snapshot_lacks() {
        let l = LatestPositions::default();
        let p = Bytes::from_static(b"p");
        let mut out = Vec::new();
        l.observe(
            [("d1", 10, &p, &p), ("d2", 20, &p, &p), ("d3", 30, &p, &p)].into_iter(),
            &map(&["d1", "d2", "d3"]),
            0,
            &mut out,
        );
        // The snapshot has d1 at 10 (same), d2 at 15 (older), d3 not at all;
        // d4 has no position.
        let have = |idx: DeviceIdx| match idx {
            0 => Some(10),
            1 => Some(15),
            _ => None,
        };
        let got: Vec<(DeviceIdx, i64)> = l
            .newer_than(["d1", "d2", "d3", "d4"].into_iter(), have)
            .into_iter()
            .map(|(i, l)| (i, l.ts_ms))
            .collect();
        assert_eq!(got, [(1, 20), (2, 30)]);
    }

    #[test]
    fn devices_of_no_event_are_not_remembered() {
        let l = LatestPositions::default();
        let p = Bytes::from_static(b"p");
        let mut out = Vec::new();
        let records: Vec<String> = (0..1000).map(|i| format!("stranger-{i}")).collect();
        l.observe(
            records
                .iter()
                .map(|d| (d.as_str(), 1, &p, &p))
                .chain([("d1", 1, &p, &p)]),
            &map(&["d1"]),
            0,
            &mut out,
        );
        assert!(out[..1000].iter().all(|o| *o == Observed::Unrouted));
        assert_eq!(out[1000], Observed::Newer(0));
        assert_eq!(l.indexed(), 1, "only the registered device is indexed");
    }

    #[test]
    fn a_device_that_leaves_every_event_is_forgotten_but_keeps_its_index() {
        let l = LatestPositions::default();
        let p = Bytes::from_static(b"p");
        let mut out = Vec::new();
        l.observe([("d1", 1, &p, &p)].into_iter(), &map(&["d1"]), 0, &mut out);
        l.forget_unregistered(&map(&["d2"]));
        assert!(l.get_many(["d1"].into_iter()).is_empty());
        assert_eq!(l.device_idx("d1"), 0);
    }
}
