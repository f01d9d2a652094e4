//! A connection's queue of messages waiting for its socket.
//!
//! Two lanes. Control messages (`subscribed`, `unsubscribed`, `error`) wait in
//! order and are never dropped. Positions are *conflated*: there is one slot
//! per (topic, device), holding only the newest undelivered position, so a
//! client that cannot keep up receives the latest position of every device
//! when it drains, and its queue is bounded by its devices, not by the record
//! rate.
//!
//! The record path calls [`Outbox::push_position`] once per subscriber: a lock,
//! an integer-keyed lookup and a reference-count increment, with no allocation
//! once the connection's maps have grown to its devices.
//!
//! The writer sends control messages before positions, so a `subscribed`
//! message always precedes the positions of its topic. While a subscription's
//! snapshot is being built its topic is *held*: positions collect in their
//! slots and are released after the snapshot, only when newer than it.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::latest::DeviceIdx;
use crate::registry::TopicIdx;

fn key(topic: TopicIdx, device: DeviceIdx) -> u64 {
    (u64::from(topic) << 32) | u64::from(device)
}

fn topic_of(key: u64) -> TopicIdx {
    (key >> 32) as TopicIdx
}

/// Below these capacities an idle connection keeps its buffers; above, an
/// emptied one gives the memory back (a burst must not cost an idle client
/// forever).
const KEEP_PENDING: usize = 32;
const KEEP_READY: usize = 64;

#[derive(Default)]
struct Inner {
    control: VecDeque<Bytes>,
    control_bytes: usize,
    /// Per (topic, device): `ts` of the newest position the client has
    /// (sent, or in its snapshot). Positions at or below it are stale.
    floors: FxHashMap<u64, i64>,
    /// Per (topic, device): the newest position not sent yet.
    pending: FxHashMap<u64, (i64, Bytes)>,
    /// Keys of `pending` in the order they became ready to send. A key can
    /// linger after an unsubscribe removed its position; drain skips it.
    ready: VecDeque<u64>,
    held: Vec<TopicIdx>,
    overflow: bool,
    closed: bool,
}

impl Inner {
    fn is_empty(&self) -> bool {
        self.control.is_empty() && self.ready.is_empty()
    }

    fn stale(&self, k: u64, ts: i64) -> bool {
        self.floors.get(&k).is_some_and(|f| ts <= *f)
    }
}

/// What happened to a pushed position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued in an empty slot.
    Queued,
    /// Replaced an older position the client had not read yet.
    Conflated,
    /// Not newer than what the client already has; dropped.
    Stale,
    /// The connection is closing.
    Closed,
}

/// The queue. Shared by the record path (producer) and the connection's
/// writer (consumer).
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    control_limit: usize,
}

/// What the writer should do after draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Frames were taken (maybe none); `more` when the queue is not empty yet.
    Frames { more: bool },
    /// The control backlog passed its limit: close the client with 1008.
    Overflow,
}

impl Outbox {
    pub fn new(control_limit: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            control_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the queue inconsistent
        // in a way that matters more than losing the connection's messages.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a position of `device` on `topic`, replacing an unread older
    /// one. `msg` is shared with every other subscriber of the topic.
    pub fn push_position(
        &self,
        topic: TopicIdx,
        device: DeviceIdx,
        ts: i64,
        msg: &Bytes,
    ) -> Pushed {
        let mut inner = self.lock();
        if inner.closed {
            return Pushed::Closed;
        }
        let k = key(topic, device);
        if inner.stale(k, ts) {
            return Pushed::Stale;
        }
        let was_empty = inner.is_empty();
        let held = inner.held.contains(&topic);
        match inner.pending.get_mut(&k) {
            Some((p, _)) if ts <= *p => return Pushed::Stale,
            Some(slot) => {
                *slot = (ts, msg.clone());
                return Pushed::Conflated;
            }
            None => {
                inner.pending.insert(k, (ts, msg.clone()));
            }
        }
        if held {
            return Pushed::Queued;
        }
        inner.ready.push_back(k);
        drop(inner);
        if was_empty {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Queues a control message. Returns false when the control backlog is
    /// over its limit (the connection will be closed with 1008).
    pub fn push_control(&self, msg: Bytes) -> bool {
        let mut inner = self.lock();
        self.push_control_locked(&mut inner, msg)
    }

    fn push_control_locked(&self, inner: &mut Inner, msg: Bytes) -> bool {
        if inner.closed {
            return false;
        }
        let was_empty = inner.is_empty();
        // Only a backlog counts: one large message (a big snapshot) to a
        // client that reads is not a reason to close it.
        if inner.control_bytes > self.control_limit {
            inner.overflow = true;
        }
        inner.control_bytes += msg.len();
        inner.control.push_back(msg);
        if was_empty || inner.overflow {
            self.notify.notify_one();
        }
        !inner.overflow
    }

    /// Starts holding a topic's positions (a snapshot is being built).
    pub fn hold(&self, topic: TopicIdx) {
        let mut inner = self.lock();
        if !inner.held.contains(&topic) {
            inner.held.push(topic);
        }
    }

    /// Ends a hold: queues `subscribed` (with its snapshot), records what the
    /// snapshot gave of each device, and releases held positions newer than it.
    pub fn release(&self, topic: TopicIdx, snapshot: &[(DeviceIdx, i64)], subscribed: Bytes) {
        let mut inner = self.lock();
        inner.held.retain(|t| *t != topic);
        for &(device, ts) in snapshot {
            let k = key(topic, device);
            let floor = inner.floors.entry(k).or_insert(ts);
            *floor = (*floor).max(ts);
            let floor = *floor;
            if inner.pending.get(&k).is_some_and(|(p, _)| *p <= floor) {
                inner.pending.remove(&k);
            }
        }
        self.push_control_locked(&mut inner, subscribed);
        let Inner { pending, ready, .. } = &mut *inner;
        ready.extend(pending.keys().filter(|k| topic_of(**k) == topic));
    }

    /// Drops a topic's positions and floors (and any hold) and queues its
    /// `unsubscribed`.
    pub fn remove_topic(&self, topic: TopicIdx, unsubscribed: Option<Bytes>) {
        let mut inner = self.lock();
        inner.held.retain(|t| *t != topic);
        inner.pending.retain(|k, _| topic_of(*k) != topic);
        inner.floors.retain(|k, _| topic_of(*k) != topic);
        if let Some(msg) = unsubscribed {
            self.push_control_locked(&mut inner, msg);
        }
    }

    /// Moves up to `max` frames into `out`: control messages first, then the
    /// newest position of each ready slot.
    pub fn drain(&self, out: &mut Vec<Bytes>, max: usize) -> Drained {
        let mut inner = self.lock();
        if inner.overflow {
            return Drained::Overflow;
        }
        while out.len() < max {
            let Some(msg) = inner.control.pop_front() else {
                break;
            };
            inner.control_bytes -= msg.len();
            out.push(msg);
        }
        let Inner {
            floors,
            pending,
            ready,
            ..
        } = &mut *inner;
        while out.len() < max {
            let Some(k) = ready.pop_front() else {
                break;
            };
            if let Some((ts, msg)) = pending.remove(&k) {
                floors.insert(k, ts);
                out.push(msg);
            }
        }
        if ready.is_empty() {
            if pending.is_empty() && pending.capacity() > KEEP_PENDING {
                *pending = FxHashMap::default();
            }
            if ready.capacity() > KEEP_READY {
                *ready = VecDeque::new();
            }
            if inner.control.is_empty() && inner.control.capacity() > KEEP_READY {
                inner.control = VecDeque::new();
            }
        }
        Drained::Frames {
            more: !inner.is_empty(),
        }
    }

    /// Positions waiting to be sent (at most one per topic and device).
    pub fn pending_positions(&self) -> usize {
        self.lock().pending.len()
    }

    /// Waits until something may have been queued.
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// Refuses further pushes and frees the queue.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.control = VecDeque::new();
        inner.floors = FxHashMap::default();
        inner.pending = FxHashMap::default();
        inner.ready = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn drain_all(o: &Outbox) -> Vec<Bytes> {
        let mut out = Vec::new();
        o.drain(&mut out, usize::MAX);
        out
    }

    #[test]
    fn conflates_per_device_and_keeps_control() {
        let o = Outbox::new(1 << 20);
        assert_eq!(o.push_position(0, 1, 10, &b("d1@10")), Pushed::Queued);
        assert_eq!(o.push_position(0, 2, 10, &b("d2@10")), Pushed::Queued);
        assert_eq!(o.push_position(0, 1, 11, &b("d1@11")), Pushed::Conflated);
        assert_eq!(o.push_position(0, 1, 9, &b("d1@9")), Pushed::Stale);
        o.push_control(b("ctl"));
        assert_eq!(drain_all(&o), [b("ctl"), b("d1@11"), b("d2@10")]);
        // Sent positions set the floor.
        assert_eq!(o.push_position(0, 1, 11, &b("again")), Pushed::Stale);
        assert!(drain_all(&o).is_empty());
    }

    #[test]
    fn holds_a_topic_until_its_snapshot_and_skips_what_it_covered() {
        let o = Outbox::new(1 << 20);
        o.hold(7);
        o.push_position(7, 1, 100, &b("d1@100"));
        o.push_position(7, 2, 50, &b("d2@50"));
        assert!(
            drain_all(&o).is_empty(),
            "held positions wait for the snapshot"
        );
        // The snapshot already has d1@100 (read from the latest cache) and d2@40.
        o.release(7, &[(1, 100), (2, 40)], b("subscribed"));
        assert_eq!(drain_all(&o), [b("subscribed"), b("d2@50")]);
    }

    #[test]
    fn unsubscribe_drops_queued_positions() {
        let o = Outbox::new(1 << 20);
        o.push_position(3, 1, 1, &b("p"));
        o.remove_topic(3, Some(b("unsubscribed")));
        assert_eq!(drain_all(&o), [b("unsubscribed")]);
    }

    #[test]
    fn control_backlog_limit() {
        let o = Outbox::new(8);
        assert!(
            o.push_control(b("a message over the limit")),
            "one message alone is fine"
        );
        assert_eq!(
            o.drain(&mut Vec::new(), 10),
            Drained::Frames { more: false }
        );
        assert!(o.push_control(b("12345")));
        assert!(o.push_control(b("6789")));
        assert!(!o.push_control(b("x")), "an unread backlog over the limit");
        assert_eq!(o.drain(&mut Vec::new(), 10), Drained::Overflow);
    }

    #[test]
    fn drain_is_bounded() {
        let o = Outbox::new(1 << 20);
        for d in 0..10 {
            o.push_position(0, d, 1, &b("p"));
        }
        let mut out = Vec::new();
        assert_eq!(o.drain(&mut out, 4), Drained::Frames { more: true });
        assert_eq!(out.len(), 4);
    }
}
