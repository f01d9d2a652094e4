//! A connection's queue of messages waiting for its socket, and the writing
//! of them.
//!
//! Two lanes. Control frames (`subscribed`, `unsubscribed`, `error`, and the
//! WebSocket ping, pong and close) wait in order and are never dropped.
//! Positions are *conflated*: there is one slot per (topic, device), holding
//! only the newest undelivered position, so a client that cannot keep up
//! receives the latest position of every device when it drains, and its
//! queue is bounded by its devices, not by the record rate.
//!
//! The record path pushes a batch's positions into every subscriber's outbox
//! (a lock, an integer-keyed lookup, a reference-count increment) and wakes
//! each connection task it gave work to, once per batch. The task
//! [`Outbox::flush`]es: non-blocking vectored writes straight from the
//! shared bytes. When a socket would block, the task waits for it to drain
//! (up to the slow-client timeout) while the record path keeps conflating
//! into the slots.
//!
//! Control frames are written before positions, so `subscribed` precedes
//! the positions of its topic. While a subscription's snapshot is being
//! built its topic is *held*: positions collect in their slots and are
//! released after the snapshot, only when newer than it.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::ids::{DeviceIdx, TopicIdx};
use crate::ws::{self, OutFrame};

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
const KEEP_QUEUE: usize = 64;
/// Frames per vectored write (two slices each, on the stack).
const FRAMES_PER_WRITE: usize = 64;

#[derive(Default)]
struct Inner {
    control: VecDeque<OutFrame>,
    control_bytes: usize,
    /// Per (topic, device), where the record path's own order is not
    /// enough: `ts` of the newest position the client has. Positions at or
    /// below it are stale. Most connections keep none (see `Floor`).
    floors: FxHashMap<u64, i64>,
    /// Per (topic, device): the newest position not sent yet.
    pending: FxHashMap<u64, Pending>,
    /// Keys of `pending` in the order they became ready to send. A key can
    /// linger after an unsubscribe removed its position; it is skipped.
    ready: VecDeque<u64>,
    held: Vec<TopicIdx>,
    /// Frames committed to the socket, in order, and how much of the first
    /// one is written: a write cut short resumes exactly where it stopped.
    wire: VecDeque<OutFrame>,
    written: usize,
    /// Since when the socket has refused bytes; `None` while it keeps up.
    blocked_since: Option<Instant>,
    overflow: bool,
    /// A close frame is queued: nothing may follow it on the wire.
    closing: bool,
    closed: bool,
}

/// A position waiting for the socket.
struct Pending {
    ts: i64,
    msg: Bytes,
    /// Whether to remember its `ts` once sent.
    floor: Floor,
}

/// Whether a position must leave a floor behind once the client has it.
///
/// The record path hands every connection the positions of a device in
/// increasing `ts` (older ones are dropped before routing), so in general
/// nothing needs remembering per connection. Two cases break that order and
/// keep a floor: a snapshot entry read from the database that is newer than
/// what the host has seen on the stream, and a position a delivery-stage
/// plugin replaced for this audience.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    Keep,
    Skip,
}

impl Inner {
    fn has_work(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty() || !self.wire.is_empty()
    }

    fn stale(&self, k: u64, ts: i64) -> bool {
        self.floors.get(&k).is_some_and(|f| ts <= *f)
    }

    /// Moves what may be sent into the (empty) wire queue: control first,
    /// then the newest position of each ready slot. Only an empty wire takes
    /// more, so that while a socket is blocked positions stay in their slots,
    /// where newer ones replace them.
    fn stage(&mut self) {
        if !self.wire.is_empty() || self.closing {
            return;
        }
        self.wire.extend(self.control.drain(..));
        while let Some(k) = self.ready.pop_front() {
            if let Some(p) = self.pending.remove(&k) {
                if p.floor == Floor::Keep {
                    self.floors.insert(k, p.ts);
                } else if let Some(f) = self.floors.get_mut(&k) {
                    *f = p.ts;
                }
                self.wire.push_back(OutFrame::text(p.msg));
            }
        }
    }

    fn shrink_when_idle(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > KEEP_PENDING {
            self.pending = FxHashMap::default();
        }
        if self.ready.is_empty() && self.ready.capacity() > KEEP_QUEUE {
            self.ready = VecDeque::new();
        }
        for q in [&mut self.wire, &mut self.control] {
            if q.is_empty() && q.capacity() > KEEP_QUEUE {
                *q = VecDeque::new();
            }
        }
    }
}

/// What happened to a pushed position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued in an empty slot; `first` when the outbox had nothing to send
    /// before (the pusher should flush it).
    Queued { first: bool },
    /// Replaced an older position the client had not received yet.
    Conflated,
    /// Not newer than what the client already has; dropped.
    Stale,
    /// The connection is closing.
    Closed,
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued is written.
    Done,
    /// The socket refused bytes; the connection task waits for it.
    Blocked,
    /// The control backlog passed its limit: close the client with 1008.
    Overflow,
    /// The socket failed, or the outbox is closed.
    Gone,
}

/// The queue. Shared by the record path and the connection's task.
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    control_limit: usize,
    socket: Option<Arc<TcpStream>>,
}

impl Outbox {
    /// An outbox writing to `socket` (`None`: nothing is written, for tests).
    pub fn new(control_limit: usize, socket: Option<Arc<TcpStream>>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            control_limit,
            socket,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the queue inconsistent
        // in a way that matters more than losing the connection's messages.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a position of `device` on `topic`, replacing an unsent older
    /// one. `msg` is shared with every other subscriber of the topic.
    pub fn push_position(
        &self,
        topic: TopicIdx,
        device: DeviceIdx,
        ts: i64,
        msg: &Bytes,
        floor: Floor,
    ) -> Pushed {
        let mut inner = self.lock();
        if inner.closed || inner.closing {
            return Pushed::Closed;
        }
        let k = key(topic, device);
        if inner.stale(k, ts) {
            return Pushed::Stale;
        }
        let first = !inner.has_work();
        let pending = || Pending {
            ts,
            msg: msg.clone(),
            floor,
        };
        match inner.pending.get_mut(&k) {
            Some(p) if ts <= p.ts => return Pushed::Stale,
            Some(slot) => {
                *slot = pending();
                return Pushed::Conflated;
            }
            None => {
                inner.pending.insert(k, pending());
            }
        }
        if inner.held.contains(&topic) {
            return Pushed::Queued { first: false };
        }
        inner.ready.push_back(k);
        Pushed::Queued { first }
    }

    /// Queues a control message (text) and wakes the connection task to
    /// write it. Returns false when the control backlog is over its limit
    /// (the connection will be closed with 1008).
    pub fn push_control(&self, msg: Bytes) -> bool {
        self.push_frame(OutFrame::text(msg))
    }

    /// Queues a WebSocket control frame (ping, pong, close).
    pub fn push_frame(&self, frame: OutFrame) -> bool {
        let mut inner = self.lock();
        let ok = self.push_control_locked(&mut inner, frame);
        drop(inner);
        self.notify.notify_one();
        ok
    }

    fn push_control_locked(&self, inner: &mut Inner, frame: OutFrame) -> bool {
        if inner.closed || inner.closing {
            return false;
        }
        // Only a backlog counts (what is queued or on the wire, unwritten):
        // one large message (a big snapshot) to a client that reads is not a
        // reason to close it.
        if inner.control_bytes > self.control_limit {
            inner.overflow = true;
        }
        let frame = frame.into_control();
        inner.control_bytes += frame.control_len();
        inner.control.push_back(frame);
        !inner.overflow
    }

    /// Starts holding a topic's positions (a snapshot is being built).
    /// Positions of the topic not yet on the wire wait too: sent now, one
    /// could be newer than the snapshot that follows it.
    pub fn hold(&self, topic: TopicIdx) {
        let mut inner = self.lock();
        if !inner.held.contains(&topic) {
            inner.held.push(topic);
        }
        inner.ready.retain(|k| topic_of(*k) != topic);
    }

    /// Ends a hold: queues `subscribed` (with its snapshot), drops held
    /// positions the snapshot already covers, keeps the floors the snapshot
    /// asks for, and releases the rest.
    pub fn release(
        &self,
        topic: TopicIdx,
        snapshot: &[(DeviceIdx, i64, Floor)],
        subscribed: Bytes,
    ) {
        let mut inner = self.lock();
        inner.held.retain(|t| *t != topic);
        for &(device, ts, floor) in snapshot {
            let k = key(topic, device);
            let covered = match inner.floors.get_mut(&k) {
                Some(f) => {
                    *f = (*f).max(ts);
                    *f
                }
                None if floor == Floor::Keep => {
                    inner.floors.insert(k, ts);
                    ts
                }
                None => ts,
            };
            if inner.pending.get(&k).is_some_and(|p| p.ts <= covered) {
                inner.pending.remove(&k);
            }
        }
        self.push_control_locked(&mut inner, OutFrame::text(subscribed));
        let Inner { pending, ready, .. } = &mut *inner;
        ready.extend(pending.keys().filter(|k| topic_of(**k) == topic));
        drop(inner);
        self.notify.notify_one();
    }

    /// Drops a topic's positions and floors (and any hold) and queues its
    /// `unsubscribed`.
    pub fn remove_topic(&self, topic: TopicIdx, unsubscribed: Option<Bytes>) {
        let mut inner = self.lock();
        inner.held.retain(|t| *t != topic);
        inner.pending.retain(|k, _| topic_of(*k) != topic);
        inner.floors.retain(|k, _| topic_of(*k) != topic);
        if let Some(msg) = unsubscribed {
            self.push_control_locked(&mut inner, OutFrame::text(msg));
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Writes what is queued without waiting (the connection task calls it
    /// when woken, and when its blocked socket drains).
    pub fn flush(&self) -> Flushed {
        let Some(socket) = &self.socket else {
            return Flushed::Gone;
        };
        self.flush_with(|slices| socket.try_write_vectored(slices))
    }

    /// [`Outbox::flush`] over any writer (tests write to memory).
    pub fn flush_with(
        &self,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> Flushed {
        let mut inner = self.lock();
        if inner.closed {
            return Flushed::Gone;
        }
        if inner.overflow {
            return Flushed::Overflow;
        }
        let result = loop {
            inner.stage();
            if inner.wire.is_empty() {
                break Flushed::Done;
            }
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let used = ws::slices(&inner.wire, inner.written, &mut slices);
            match write(&slices[..used]) {
                Ok(0) => break Flushed::Gone,
                Ok(n) => {
                    let Inner { wire, written, .. } = &mut *inner;
                    let done = ws::consume(wire, written, n);
                    inner.control_bytes = inner.control_bytes.saturating_sub(done);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Flushed::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Flushed::Gone,
            }
        };
        match result {
            Flushed::Blocked => {
                inner.blocked_since.get_or_insert_with(Instant::now);
            }
            Flushed::Done => {
                inner.blocked_since = None;
                inner.shrink_when_idle();
            }
            _ => {}
        }
        result
    }

    /// Drops everything not yet started on the wire and queues `frame` (a
    /// close) in its place; a frame half written is finished first, so the
    /// client still reads whole frames.
    pub fn replace_with_close(&self, frame: OutFrame) {
        let mut inner = self.lock();
        let started = if inner.written > 0 {
            inner.wire.pop_front()
        } else {
            None
        };
        inner.wire.clear();
        inner.wire.extend(started);
        inner.wire.push_back(frame);
        inner.control.clear();
        inner.control_bytes = 0;
        inner.pending.clear();
        inner.ready.clear();
        inner.overflow = false;
        inner.closing = true;
    }

    /// Wakes the connection task to write what the record path queued.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Since when the socket has refused bytes, if it does.
    pub fn blocked_since(&self) -> Option<Instant> {
        self.lock().blocked_since
    }

    /// Positions waiting to be sent (at most one per topic and device).
    #[cfg(feature = "test-util")]
    pub fn pending_positions(&self) -> usize {
        self.lock().pending.len()
    }

    /// Waits until the task has something to do (control queued, socket
    /// blocked).
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// Refuses further pushes and frees the queue.
    pub fn close(&self) {
        let mut inner = self.lock();
        *inner = Inner {
            closed: true,
            ..Inner::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Outbox {
        fn push_kept(&self, topic: TopicIdx, device: DeviceIdx, ts: i64, msg: &Bytes) -> Pushed {
            self.push_position(topic, device, ts, msg, Floor::Keep)
        }

        fn floors(&self) -> usize {
            self.lock().floors.len()
        }
    }

    #[test]
    fn in_order_positions_leave_no_floor_behind() {
        let o = Outbox::new(1 << 20, None);
        o.hold(1);
        o.push_position(1, 1, 5, &b("d1@5"), Floor::Skip);
        o.release(
            1,
            &[(1, 3, Floor::Skip), (2, 3, Floor::Skip)],
            b("subscribed"),
        );
        assert_eq!(written(&o), ["subscribed", "d1@5"]);
        o.push_position(1, 2, 4, &b("d2@4"), Floor::Skip);
        assert_eq!(written(&o), ["d2@4"]);
        assert_eq!(o.floors(), 0, "an idle subscriber keeps nothing per device");
        // A snapshot row newer than the stream, or a replaced position, does.
        o.push_position(1, 3, 9, &b("d3@9"), Floor::Keep);
        assert_eq!(written(&o), ["d3@9"]);
        assert_eq!(
            o.push_position(1, 3, 8, &b("d3@8"), Floor::Skip),
            Pushed::Stale
        );
        assert_eq!(o.floors(), 1);
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// Flushes everything into memory; the bytes written.
    fn raw(o: &Outbox) -> Vec<u8> {
        let mut wire = Vec::new();
        assert_eq!(
            o.flush_with(|slices| {
                let mut n = 0;
                for s in slices {
                    wire.extend_from_slice(s);
                    n += s.len();
                }
                Ok(n)
            }),
            Flushed::Done
        );
        wire
    }

    /// Flushes into memory and returns the text frames written.
    fn written(o: &Outbox) -> Vec<String> {
        frames(&raw(o))
    }

    fn frames(mut wire: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while wire.len() >= 2 {
            let len = usize::from(wire[1]);
            assert!(len < 126, "test frames are short");
            out.push(String::from_utf8(wire[2..2 + len].to_vec()).unwrap());
            wire = &wire[2 + len..];
        }
        out
    }

    #[test]
    fn conflates_per_device_and_keeps_control() {
        let o = Outbox::new(1 << 20, None);
        assert_eq!(
            o.push_kept(0, 1, 10, &b("d1@10")),
            Pushed::Queued { first: true }
        );
        assert_eq!(
            o.push_kept(0, 2, 10, &b("d2@10")),
            Pushed::Queued { first: false }
        );
        assert_eq!(o.push_kept(0, 1, 11, &b("d1@11")), Pushed::Conflated);
        assert_eq!(o.push_kept(0, 1, 9, &b("d1@9")), Pushed::Stale);
        o.push_control(b("ctl"));
        assert_eq!(written(&o), ["ctl", "d1@11", "d2@10"]);
        // Sent positions set the floor.
        assert_eq!(o.push_kept(0, 1, 11, &b("again")), Pushed::Stale);
        assert!(written(&o).is_empty());
    }

    #[test]
    fn holds_a_topic_until_its_snapshot_and_skips_what_it_covered() {
        let o = Outbox::new(1 << 20, None);
        o.hold(7);
        o.push_kept(7, 1, 100, &b("d1@100"));
        o.push_kept(7, 2, 50, &b("d2@50"));
        assert!(
            written(&o).is_empty(),
            "held positions wait for the snapshot"
        );
        // The snapshot already has d1@100 (read from the latest cache) and d2@40.
        o.release(
            7,
            &[(1, 100, Floor::Skip), (2, 40, Floor::Keep)],
            b("subscribed"),
        );
        assert_eq!(written(&o), ["subscribed", "d2@50"]);
    }

    #[test]
    fn unsubscribe_drops_queued_positions() {
        let o = Outbox::new(1 << 20, None);
        o.push_kept(3, 1, 1, &b("p"));
        o.remove_topic(3, Some(b("unsubscribed")));
        assert_eq!(written(&o), ["unsubscribed"]);
    }

    #[test]
    fn control_backlog_limit() {
        let o = Outbox::new(8, None);
        assert!(
            o.push_control(b("a message over the limit")),
            "one message alone is fine"
        );
        assert_eq!(written(&o), ["a message over the limit"]);
        assert!(o.push_control(b("12345")));
        assert!(o.push_control(b("6789")));
        assert!(!o.push_control(b("x")), "an unread backlog over the limit");
        assert_eq!(o.flush_with(|_| Ok(0)), Flushed::Overflow);
    }

    #[test]
    fn a_resubscribe_holds_positions_already_queued() {
        let o = Outbox::new(1 << 20, None);
        o.push_kept(4, 1, 100, &b("d1@100"));
        // Re-subscribe: the snapshot will carry d1@120, so d1@120 must not
        // go out before it, and d1@100 not at all.
        o.hold(4);
        assert_eq!(o.push_kept(4, 1, 120, &b("d1@120")), Pushed::Conflated);
        assert!(written(&o).is_empty());
        o.release(4, &[(1, 120, Floor::Skip)], b("subscribed"));
        assert_eq!(written(&o), ["subscribed"]);
    }

    #[test]
    fn nothing_follows_a_close_frame() {
        let o = Outbox::new(1 << 20, None);
        o.push_kept(0, 1, 1, &b("p"));
        o.replace_with_close(OutFrame::close(1001, "bye"));
        assert_eq!(o.push_kept(0, 2, 1, &b("late")), Pushed::Closed);
        assert!(!o.push_control(b("late")));
        let wire = raw(&o);
        assert_eq!(wire[0], 0x88, "only the close frame");
        assert_eq!(wire.len(), 2 + 2 + 3);
    }

    #[test]
    fn a_blocked_socket_keeps_order_and_resumes_mid_frame() {
        let o = Outbox::new(1 << 20, None);
        o.push_kept(0, 1, 1, &b("first"));
        o.push_kept(0, 2, 1, &b("second"));
        let mut wire = Vec::new();
        // The socket takes 4 bytes, then refuses.
        let mut budget = 4;
        let r = o.flush_with(|slices| {
            let all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            let n = all.len().min(budget);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            budget -= n;
            wire.extend_from_slice(&all[..n]);
            Ok(n)
        });
        assert_eq!(r, Flushed::Blocked);
        assert!(o.blocked_since().is_some());
        // Meanwhile the record path queues device 1 again; while the socket
        // stays blocked the position stays in its slot (not on the wire),
        // where a newer one replaces it.
        assert_eq!(
            o.push_kept(0, 1, 2, &b("third")),
            Pushed::Queued { first: false }
        );
        assert_eq!(
            o.flush_with(|_| Err(io::ErrorKind::WouldBlock.into())),
            Flushed::Blocked
        );
        assert_eq!(o.push_kept(0, 1, 3, &b("fourth")), Pushed::Conflated);
        let rest = raw(&o);
        wire.extend_from_slice(&rest);
        assert_eq!(frames(&wire), ["first", "second", "fourth"]);
        assert!(o.blocked_since().is_none());
    }
}
