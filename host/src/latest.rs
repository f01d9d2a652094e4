//! The latest position of every device seen on the stream.
//!
//! It gives each device a small integer (`DeviceIdx`) so that per-connection
//! queues key on integers instead of hashing IMEIs per subscriber, it drops
//! records older than what was already broadcast for a device (a tracker
//! replaying its offline buffer), and it backs snapshots so that a snapshot is
//! never older than the live data, even when the database lags behind.

use std::sync::RwLock;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::ids::DeviceIdx;

/// A device's latest position: fix time, wire body, and the payload the
/// filter chain passed (the delivery stage of a snapshot needs it).
#[derive(Debug, Clone)]
pub struct Latest {
    pub ts_ms: i64,
    pub body: Bytes,
    pub payload: Bytes,
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
}

impl LatestPositions {
    /// Records a batch of positions under one lock: `(device, ts, body,
    /// payload)` in, one decision per record out (in `out`, cleared first).
    pub fn observe<'a>(
        &self,
        records: impl Iterator<Item = (&'a str, i64, &'a Bytes, &'a Bytes)>,
        out: &mut Vec<Observed>,
    ) {
        out.clear();
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (device, ts_ms, body, payload) in records {
            let idx = inner.intern(device);
            let slot = &mut inner.latest[idx as usize];
            match slot {
                Some(l) if l.ts_ms >= ts_ms => out.push(Observed::Stale),
                _ => {
                    *slot = Some(Latest {
                        ts_ms,
                        body: body.clone(),
                        payload: payload.clone(),
                    });
                    out.push(Observed::Newer(idx));
                }
            }
        }
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
}
