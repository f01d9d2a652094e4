//! A connection's queue of messages waiting for its socket, and the writing
//! of them.
//!
//! Two lanes. Control frames (`subscribed`, `unsubscribed`, `error`, and the
//! WebSocket ping, pong and close) wait in order and are never dropped.
//! Positions wait in arrival order, every one of them, up to a budget
//! (`LIVE_WS_POSITION_BUDGET`): a client that reads keeps every record, in
//! order, through a burst (a tracker uploading its buffer after a coverage
//! gap). Past the budget the queue is *conflated*: only the newest unsent
//! position of each (topic, device) stays, and from then on a newer one
//! replaces it in place, so a client that cannot keep up receives the
//! latest position of every device when it drains, and its queue is bounded
//! by the budget and its devices, not by the record rate. Queued positions
//! are the record path's shared bytes: the budget costs references, not
//! copies.
//!
//! The record path pushes a batch's positions into every subscriber's outbox
//! (a lock, an integer-keyed lookup, a reference-count increment) and hands
//! the connections it gave their first positions to the `flusher`, once per
//! batch, which [`Outbox::flush`]es them: non-blocking vectored writes
//! straight from the shared bytes. When a socket would block, the
//! connection's task waits for it to drain (up to the slow-client timeout,
//! counted from its last progress) while the record path keeps queueing,
//! and past the budget conflating.
//!
//! Control frames are written before positions, so `subscribed` precedes
//! the positions of its topic. While a subscription's snapshot is being
//! built its topic is *held*: positions collect, newest per device, and are
//! released after the snapshot, only when newer than it.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::deflate::Message;
use crate::ids::{DeviceIdx, TopicIdx};
use crate::ws::{self, OutFrame};

fn key(topic: TopicIdx, device: DeviceIdx) -> u64 {
    (u64::from(topic) << 32) | u64::from(device)
}

fn topic_of(key: u64) -> TopicIdx {
    (key >> 32) as TopicIdx
}

fn device_of(key: u64) -> DeviceIdx {
    key as DeviceIdx
}

/// Below these capacities an idle connection keeps its buffers; above, an
/// emptied one gives the memory back (a burst must not cost an idle client
/// forever).
const KEEP_SLOTS: usize = 32;
const KEEP_QUEUE: usize = 64;
/// Frames per vectored write (two slices each, on the stack). Positions
/// move to the wire this many at a time, so that those still queued behind
/// a blocked socket can be conflated.
const FRAMES_PER_WRITE: usize = 64;

/// What one connection may hold back, and how often it writes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unwritten control bytes past which the client is closed with 1008.
    pub control_bytes: usize,
    /// Unsent positions past which the queue is conflated.
    pub positions: usize,
    /// Positions are written at most once per interval: those that arrive
    /// within it of a write wait for the next tick and leave together, in
    /// one vectored write. Zero: every wake-up writes.
    pub flush_interval: Duration,
}

#[derive(Default)]
struct Inner {
    control: VecDeque<OutFrame>,
    control_bytes: usize,
    /// Per (topic, device), where the record path's own order is not
    /// enough: `ts` of the newest position the client has. Positions at or
    /// below it are stale. Most connections keep none (see `Floor`).
    floors: FxHashMap<u64, i64>,
    /// Floors a snapshot asked for, per topic, shared with every subscriber
    /// served the same snapshot: after a restart every entry of a snapshot
    /// comes from the database and keeps a floor, and a copy per subscriber
    /// of a 500-device event was most of a connection's memory.
    shared_floors: Vec<(TopicIdx, Arc<Covered>)>,
    /// Positions ready to send, in arrival order (per key, increasing `ts`).
    queue: VecDeque<Pending>,
    /// Sequence number of `queue[0]`; an entry's is its index plus this.
    head: u64,
    /// Per key with an entry in `queue`: the sequence number and `ts` of its
    /// newest one.
    newest: FxHashMap<u64, (u64, i64)>,
    /// The queue went over its budget: newer positions replace queued ones
    /// of their key until it drains.
    conflating: bool,
    held: Vec<TopicIdx>,
    /// Positions of held topics: the newest per key.
    held_slots: FxHashMap<u64, Pending>,
    /// The writer holds frames the socket did not take yet: it waits for
    /// the socket, and will write what is queued when it drains.
    backlog: bool,
    /// Until when positions wait for the connection's next tick (a write
    /// happened less than the flush interval ago). While set, the task has a
    /// timer for it, so a push needs no wake-up.
    cool_until: Option<Instant>,
    overflow: bool,
    /// A close frame is queued: nothing may follow it on the wire.
    closing: bool,
    closed: bool,
}

/// A position waiting for the socket.
struct Pending {
    key: u64,
    ts: i64,
    msg: Bytes,
    /// `msg` is compressed (permessage-deflate): sent with RSV1.
    deflated: bool,
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

/// What only the connection's task touches: the frames committed to the
/// socket, in order, and how much of the first one is written (a write cut
/// short resumes exactly where it stopped). Apart from the queues, so that
/// the record path never waits for a write in progress.
#[derive(Default)]
struct Wire {
    frames: VecDeque<OutFrame>,
    written: usize,
    /// Since when the socket has taken no byte while there was something to
    /// write; `None` while it keeps up or makes progress.
    stalled_since: Option<Instant>,
}

/// What a snapshot gave a subscriber of a topic, for [`Outbox::release`]:
/// built once per snapshot (and audience) and shared by every subscriber
/// it is sent to.
#[derive(Debug, Default)]
pub struct Covered {
    /// `(device, ts)` of every entry: held positions not newer are dropped.
    pub entries: Vec<(DeviceIdx, i64)>,
    /// The entries whose `ts` the subscriber must remember
    /// ([`Floor::Keep`]).
    pub keep: FxHashMap<DeviceIdx, i64>,
}

impl Covered {
    pub fn new(entries: impl IntoIterator<Item = (DeviceIdx, i64, Floor)>) -> Self {
        let mut c = Covered::default();
        for (device, ts, floor) in entries {
            c.entries.push((device, ts));
            if floor == Floor::Keep {
                c.keep.insert(device, ts);
            }
        }
        c
    }
}

impl Inner {
    /// Whether the task will write without being woken: something is
    /// queued for it, it waits for its socket, or its tick is due.
    fn has_work(&self) -> bool {
        !self.control.is_empty()
            || !self.queue.is_empty()
            || self.backlog
            || self.cool_until.is_some()
    }

    /// The `ts` at or below which positions of key `k` are stale, if any.
    fn floor(&self, k: u64) -> Option<i64> {
        let own = self.floors.get(&k).copied();
        if self.shared_floors.is_empty() {
            return own;
        }
        let topic = topic_of(k);
        let shared = self
            .shared_floors
            .iter()
            .find(|(t, _)| *t == topic)
            .and_then(|(_, c)| c.keep.get(&device_of(k)).copied());
        own.max(shared)
    }

    /// Whether a position at `ts` is not newer than what the client has or
    /// will get for key `k`.
    fn stale(&self, k: u64, ts: i64) -> bool {
        self.floor(k).is_some_and(|f| ts <= f) || self.newest.get(&k).is_some_and(|(_, n)| ts <= *n)
    }

    /// Appends a position to the queue (conflating it in place when the
    /// queue is over its budget); the positions this dropped.
    fn enqueue(&mut self, p: Pending, budget: usize) -> Enqueued {
        if self.conflating
            && let Some(&(seq, _)) = self.newest.get(&p.key)
        {
            let at = (seq - self.head) as usize;
            self.newest.insert(p.key, (seq, p.ts));
            self.queue[at] = p;
            return Enqueued::Replaced;
        }
        let seq = self.head + self.queue.len() as u64;
        self.newest.insert(p.key, (seq, p.ts));
        self.queue.push_back(p);
        if self.queue.len() > budget && !self.conflating {
            self.conflating = true;
            return Enqueued::Shed(self.collapse());
        }
        Enqueued::Added
    }

    /// Keeps only the newest queued position of each key; how many it
    /// dropped.
    fn collapse(&mut self) -> usize {
        let before = self.queue.len();
        let mut seq = self.head;
        let newest = &self.newest;
        self.queue.retain(|p| {
            let keep = newest.get(&p.key).is_some_and(|(s, _)| *s == seq);
            seq += 1;
            keep
        });
        self.reindex();
        before - self.queue.len()
    }

    /// Rebuilds `newest` after entries left the middle of the queue.
    fn reindex(&mut self) {
        self.newest.clear();
        for (i, p) in self.queue.iter().enumerate() {
            self.newest.insert(p.key, (self.head + i as u64, p.ts));
        }
        if self.queue.is_empty() {
            self.conflating = false;
        }
    }

    /// Moves what may be sent into the (empty) wire: control first, then
    /// the oldest queued positions, a write's worth, unless they wait for
    /// the next tick. Only an empty wire takes more, so that while a socket
    /// is blocked positions stay in the queue, where conflation can still
    /// replace them. Returns whether it moved positions.
    fn stage(&mut self, wire: &mut VecDeque<OutFrame>, now: Instant) -> bool {
        if self.closing {
            return false;
        }
        let control = !self.control.is_empty();
        wire.extend(self.control.drain(..));
        let tick_due = self.cool_until.is_none_or(|t| t <= now);
        if self.queue.is_empty() {
            if tick_due {
                // A tick with nothing to send: the quiet period begins, and
                // the next position goes out at once.
                self.cool_until = None;
            }
            return false;
        }
        // A control message goes out at once, and takes the positions
        // queued before it along.
        if !control && !tick_due {
            return false;
        }
        let take = self.queue.len().min(FRAMES_PER_WRITE);
        for p in self.queue.drain(..take) {
            if p.floor == Floor::Keep {
                self.floors.insert(p.key, p.ts);
            } else if let Some(f) = self.floors.get_mut(&p.key) {
                *f = p.ts;
            }
            if self
                .newest
                .get(&p.key)
                .is_some_and(|(s, _)| *s == self.head)
            {
                self.newest.remove(&p.key);
            }
            self.head += 1;
            wire.push_back(if p.deflated {
                OutFrame::deflated(p.msg)
            } else {
                OutFrame::text(p.msg)
            });
        }
        if self.queue.is_empty() {
            self.conflating = false;
        }
        true
    }

    /// Gives back emptied buffers: above their keep sizes always, and all
    /// of them when the connection is `quiet` (no position written and no
    /// tick coming: idle until the next push), which is where most
    /// connections spend their time.
    fn shrink_when_idle(&mut self, quiet: bool) {
        let (slots, queue) = if quiet {
            (0, 0)
        } else {
            (KEEP_SLOTS, KEEP_QUEUE)
        };
        if self.newest.is_empty() && self.newest.capacity() > slots {
            self.newest = FxHashMap::default();
        }
        if self.held_slots.is_empty() && self.held_slots.capacity() > slots {
            self.held_slots = FxHashMap::default();
        }
        if self.queue.is_empty() && self.queue.capacity() > queue {
            self.queue = VecDeque::new();
        }
        // Control frames are rare (replies, pings): no room kept for them.
        if self.control.is_empty() {
            self.control = VecDeque::new();
        }
    }
}

/// What `enqueue` did.
enum Enqueued {
    Added,
    Replaced,
    /// Added, and the queue went over its budget: this many older positions
    /// were dropped.
    Shed(usize),
}

/// What happened to a pushed position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; `first` when the outbox had nothing to send before (the
    /// pusher should have it written: the flusher).
    Queued { first: bool },
    /// Replaced an older position the client had not received yet.
    Conflated,
    /// Queued, and the queue went over its budget: this many older
    /// positions were dropped, the newest of each device kept.
    Shed(usize),
    /// Not newer than what the client already has or will get; dropped.
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

/// Where an outbox writes: the client's socket, and the count of writes
/// made to it (each a vectored `writev`).
pub struct Socket {
    pub stream: Arc<TcpStream>,
    pub writes: prometheus_client::metrics::counter::Counter,
}

/// The queue. Shared by the record path and the connection's task.
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Locked by the connection's task alone (always before `inner` when
    /// both are taken).
    wire: Mutex<Wire>,
    notify: Notify,
    limits: Limits,
    socket: Option<Socket>,
    /// The client negotiated permessage-deflate.
    deflate: bool,
    /// The flusher's shard that writes its positions.
    shard: usize,
}

impl Outbox {
    /// An outbox writing to `socket` (`None`: nothing is written, for tests).
    pub fn new(limits: Limits, socket: Option<Socket>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            wire: Mutex::new(Wire::default()),
            notify: Notify::new(),
            limits,
            socket,
            deflate: false,
            shard: 0,
        }
    }

    /// An outbox written by the flusher's shard `shard`.
    pub fn on_shard(mut self, shard: usize) -> Self {
        self.shard = shard;
        self
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// An outbox of a client that negotiated permessage-deflate: the record
    /// path hands it compressed messages where it has them.
    pub fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// Whether the client negotiated permessage-deflate.
    pub fn deflate(&self) -> bool {
        self.deflate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the queue inconsistent
        // in a way that matters more than losing the connection's messages.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wire(&self) -> std::sync::MutexGuard<'_, Wire> {
        self.wire.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a position of `device` on `topic`. `msg` is shared with every
    /// other subscriber of the topic.
    pub fn push_position<'m>(
        &self,
        topic: TopicIdx,
        device: DeviceIdx,
        ts: i64,
        msg: impl Into<Message<'m>>,
        floor: Floor,
    ) -> Pushed {
        let msg = msg.into();
        let mut inner = self.lock();
        if inner.closed || inner.closing {
            return Pushed::Closed;
        }
        let k = key(topic, device);
        let pending = Pending {
            key: k,
            ts,
            msg: msg.bytes.clone(),
            deflated: msg.deflated,
            floor,
        };
        if inner.held.contains(&topic) {
            if inner.floor(k).is_some_and(|f| ts <= f) {
                return Pushed::Stale;
            }
            return match inner.held_slots.get_mut(&k) {
                Some(p) if ts <= p.ts => Pushed::Stale,
                Some(slot) => {
                    *slot = pending;
                    Pushed::Conflated
                }
                None => {
                    inner.held_slots.insert(k, pending);
                    Pushed::Queued { first: false }
                }
            };
        }
        if inner.stale(k, ts) {
            return Pushed::Stale;
        }
        let first = !inner.has_work();
        match inner.enqueue(pending, self.limits.positions) {
            Enqueued::Added => Pushed::Queued { first },
            Enqueued::Replaced => Pushed::Conflated,
            Enqueued::Shed(n) => Pushed::Shed(n),
        }
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
        if inner.control_bytes > self.limits.control_bytes {
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
        if !inner.queue.iter().any(|p| topic_of(p.key) == topic) {
            return;
        }
        let Inner {
            queue, held_slots, ..
        } = &mut *inner;
        for p in queue.iter_mut().filter(|p| topic_of(p.key) == topic) {
            // Entries of a key come in increasing `ts`: the last one wins.
            let taken = Pending {
                key: p.key,
                ts: p.ts,
                msg: std::mem::take(&mut p.msg),
                deflated: p.deflated,
                floor: p.floor,
            };
            held_slots.insert(p.key, taken);
        }
        queue.retain(|p| topic_of(p.key) != topic);
        inner.reindex();
    }

    /// Ends a hold: queues `subscribed` (with its snapshot), drops held
    /// positions the snapshot already covers, keeps the floors the snapshot
    /// asks for (by reference: `covered` is shared with every subscriber of
    /// the same snapshot), and queues the rest.
    pub fn release(&self, topic: TopicIdx, covered: &Arc<Covered>, subscribed: OutFrame) -> usize {
        let mut inner = self.lock();
        inner.held.retain(|t| *t != topic);
        // A topic subscribed again: the floors of its earlier snapshot stay
        // the connection's own (a rare case, so copying them is fine).
        if let Some(at) = inner.shared_floors.iter().position(|(t, _)| *t == topic) {
            let (_, earlier) = inner.shared_floors.swap_remove(at);
            for (&device, &ts) in &earlier.keep {
                let f = inner.floors.entry(key(topic, device)).or_insert(ts);
                *f = (*f).max(ts);
            }
        }
        if !covered.keep.is_empty() {
            inner.shared_floors.push((topic, covered.clone()));
        }
        for &(device, ts) in &covered.entries {
            let k = key(topic, device);
            let mut upto = ts;
            if let Some(f) = inner.floors.get_mut(&k) {
                *f = (*f).max(ts);
                upto = *f;
            }
            if inner.held_slots.get(&k).is_some_and(|p| p.ts <= upto) {
                inner.held_slots.remove(&k);
            }
        }
        self.push_control_locked(&mut inner, subscribed);
        let released: Vec<u64> = inner
            .held_slots
            .keys()
            .copied()
            .filter(|k| topic_of(*k) == topic)
            .collect();
        let mut shed = 0;
        for k in released {
            if let Some(p) = inner.held_slots.remove(&k)
                && let Enqueued::Shed(n) = inner.enqueue(p, self.limits.positions)
            {
                shed += n;
            }
        }
        drop(inner);
        self.notify.notify_one();
        shed
    }

    /// Drops a topic's positions and floors (and any hold) and queues its
    /// `unsubscribed`.
    pub fn remove_topic(&self, topic: TopicIdx, unsubscribed: Option<Bytes>) {
        let mut inner = self.lock();
        inner.held.retain(|t| *t != topic);
        inner.held_slots.retain(|k, _| topic_of(*k) != topic);
        if inner.queue.iter().any(|p| topic_of(p.key) == topic) {
            inner.queue.retain(|p| topic_of(p.key) != topic);
            inner.reindex();
        }
        inner.floors.retain(|k, _| topic_of(*k) != topic);
        inner.shared_floors.retain(|(t, _)| *t != topic);
        if let Some(msg) = unsubscribed {
            self.push_control_locked(&mut inner, OutFrame::text(msg));
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Writes what is queued without waiting (a flusher's shard calls it,
    /// and the connection's task when it has a control message or its
    /// blocked socket drains). With it, when this wrote positions and the
    /// connection's next ones must wait for its tick: when that is (the
    /// caller hands it to the flusher).
    pub fn flush(&self) -> (Flushed, Option<Instant>) {
        let Some(socket) = &self.socket else {
            return (Flushed::Gone, None);
        };
        self.flush_at(Instant::now(), |slices| {
            socket.writes.inc();
            socket.stream.try_write_vectored(slices)
        })
    }

    /// [`Outbox::flush`] over any writer (tests write to memory).
    #[cfg(test)]
    ///
    /// The socket is written without the queue's lock: the record path
    /// keeps pushing meanwhile.
    pub fn flush_with(&self, write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>) -> Flushed {
        self.flush_at(Instant::now(), write).0
    }

    fn flush_at(
        &self,
        now: Instant,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> (Flushed, Option<Instant>) {
        let mut wire = self.wire();
        let (mut progress, mut positions) = (false, false);
        // Control payload bytes written, to take off the backlog.
        let mut control_done = 0;
        let result = loop {
            if wire.frames.is_empty() {
                let mut inner = self.lock();
                if inner.closed {
                    break Flushed::Gone;
                }
                if inner.overflow {
                    break Flushed::Overflow;
                }
                // The wire is empty: said here, under the lock a push takes,
                // not after the write, or a push in between would see an old
                // backlog, take the connection for one that is being written
                // and hand it to no writer.
                inner.backlog = false;
                positions |= inner.stage(&mut wire.frames, now);
                if wire.frames.is_empty() {
                    break Flushed::Done;
                }
            }
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let used = ws::slices(&wire.frames, wire.written, &mut slices);
            match write(&slices[..used]) {
                Ok(0) => break Flushed::Gone,
                Ok(n) => {
                    progress = true;
                    let Wire {
                        frames, written, ..
                    } = &mut *wire;
                    control_done += ws::consume(frames, written, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Flushed::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Flushed::Gone,
            }
        };
        let mut inner = self.lock();
        inner.control_bytes = inner.control_bytes.saturating_sub(control_done);
        inner.backlog = !wire.frames.is_empty();
        let mut tick = None;
        if positions && !self.limits.flush_interval.is_zero() {
            tick = Some(now + self.limits.flush_interval);
            inner.cool_until = tick;
        }
        match result {
            // The slow-client timeout counts time without progress: a client
            // on a weak link that takes bytes all the time, without ever
            // emptying its queue, is not stuck.
            Flushed::Blocked if progress => wire.stalled_since = Some(now),
            Flushed::Blocked => {
                wire.stalled_since.get_or_insert(now);
            }
            Flushed::Done => {
                wire.stalled_since = None;
                // A busy connection keeps its wire's room from tick to tick;
                // one that went quiet gives it back (idle connections are
                // most of them, and a snapshot's burst grew it).
                let quiet = !positions && inner.cool_until.is_none();
                if quiet || wire.frames.capacity() > KEEP_QUEUE {
                    wire.frames = VecDeque::new();
                }
                inner.shrink_when_idle(quiet);
            }
            _ => {}
        }
        (result, tick)
    }

    /// When positions queued now will be written at the latest: the
    /// connection's next tick, if it has one.
    #[cfg(test)]
    pub fn next_tick(&self) -> Option<Instant> {
        self.lock().cool_until
    }

    /// Drops everything not yet started on the wire and queues `frame` (a
    /// close) in its place; a frame half written is finished first, so the
    /// client still reads whole frames.
    pub fn replace_with_close(&self, frame: OutFrame) {
        let mut wire = self.wire();
        let started = if wire.written > 0 {
            wire.frames.pop_front()
        } else {
            None
        };
        wire.frames.clear();
        wire.frames.extend(started);
        wire.frames.push_back(frame);
        let mut inner = self.lock();
        inner.control.clear();
        inner.control_bytes = 0;
        inner.queue.clear();
        inner.newest.clear();
        inner.held_slots.clear();
        inner.overflow = false;
        inner.closing = true;
    }

    /// Wakes the connection's task: its socket would block, or the
    /// connection is over a limit or gone.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Since when the socket has taken nothing while there was something to
    /// write, if it has.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.wire().stalled_since
    }

    /// Positions waiting to be sent.
    #[cfg(feature = "test-util")]
    pub fn pending_positions(&self) -> usize {
        let inner = self.lock();
        inner.queue.len() + inner.held_slots.len()
    }

    /// Waits until the task has something to do (control queued, socket
    /// blocked).
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// An outbox without a socket, a position budget of `positions` and a
    /// control backlog of 1 MiB, for unit tests of the modules around it.
    #[cfg(test)]
    pub fn for_tests(positions: usize, flush_interval: Duration) -> Self {
        Self::new(
            Limits {
                control_bytes: 1 << 20,
                positions,
                flush_interval,
            },
            None,
        )
    }

    /// Refuses further pushes, frees the queue, and ends the TCP
    /// connection now: a flusher's tick entry may still hold the outbox,
    /// and with it the socket, for up to an interval.
    pub fn close(&self) {
        *self.wire() = Wire::default();
        let mut inner = self.lock();
        *inner = Inner {
            closed: true,
            ..Inner::default()
        };
        drop(inner);
        if let Some(s) = &self.socket {
            let _ = socket2::SockRef::from(&*s.stream).shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(positions: usize) -> Outbox {
        Outbox::for_tests(positions, Duration::ZERO)
    }

    impl Outbox {
        fn push_kept(&self, topic: TopicIdx, device: DeviceIdx, ts: i64, msg: &Bytes) -> Pushed {
            self.push_position(topic, device, ts, msg, Floor::Keep)
        }

        fn floors(&self) -> usize {
            self.lock().floors.len()
        }

        fn queued(&self) -> usize {
            self.lock().queue.len()
        }
    }

    /// Ends a hold with a snapshot of these entries.
    fn release(o: &Outbox, topic: TopicIdx, entries: &[(DeviceIdx, i64, Floor)], msg: Bytes) {
        let covered = Arc::new(Covered::new(entries.iter().copied()));
        o.release(topic, &covered, OutFrame::text(msg));
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
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

    /// A writer that takes `budget` bytes, then would block.
    fn trickle<'a>(
        wire: &'a mut Vec<u8>,
        mut budget: usize,
    ) -> impl FnMut(&[IoSlice<'_>]) -> io::Result<usize> + 'a {
        move |slices| {
            let all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            let n = all.len().min(budget);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            budget -= n;
            wire.extend_from_slice(&all[..n]);
            Ok(n)
        }
    }

    #[test]
    fn in_order_positions_leave_no_floor_behind() {
        let o = outbox(64);
        o.hold(1);
        o.push_position(1, 1, 5, &b("d1@5"), Floor::Skip);
        release(
            &o,
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

    #[test]
    fn within_its_budget_a_client_gets_every_position_in_order() {
        let o = outbox(8);
        let mut pushed = Vec::new();
        for ts in 1..=4 {
            for device in [1, 2] {
                let msg = format!("d{device}@{ts}");
                let p = o.push_kept(0, device, ts, &b(&msg));
                assert!(matches!(p, Pushed::Queued { .. }), "{msg}: {p:?}");
                pushed.push(msg);
            }
        }
        assert_eq!(o.push_kept(0, 1, 4, &b("again")), Pushed::Stale);
        assert_eq!(o.push_kept(0, 1, 3, &b("older")), Pushed::Stale);
        assert_eq!(written(&o), pushed);
    }

    #[test]
    fn past_its_budget_the_queue_keeps_the_newest_of_each_device() {
        let o = outbox(4);
        o.push_control(b("ctl"));
        for ts in 1..=2 {
            for device in [1, 2] {
                o.push_kept(0, device, ts, &b(&format!("d{device}@{ts}")));
            }
        }
        // The fifth position goes over the budget of four: the queue
        // collapses to the newest of each device, this one included.
        assert_eq!(o.push_kept(0, 3, 1, &b("d3@1")), Pushed::Shed(2));
        assert_eq!(o.queued(), 3);
        // Until it drains, a newer position replaces its device's in place.
        assert_eq!(o.push_kept(0, 1, 3, &b("d1@3")), Pushed::Conflated);
        assert_eq!(o.push_kept(0, 1, 2, &b("d1@2")), Pushed::Stale);
        assert_eq!(written(&o), ["ctl", "d1@3", "d2@2", "d3@1"]);
        // Drained: every position counts again.
        assert_eq!(
            o.push_kept(0, 1, 4, &b("d1@4")),
            Pushed::Queued { first: true }
        );
        assert_eq!(
            o.push_kept(0, 1, 5, &b("d1@5")),
            Pushed::Queued { first: false }
        );
        assert_eq!(written(&o), ["d1@4", "d1@5"]);
        // Sent positions set the floor.
        assert_eq!(o.push_kept(0, 1, 5, &b("again")), Pushed::Stale);
        assert!(written(&o).is_empty());
    }

    #[test]
    fn holds_a_topic_until_its_snapshot_and_skips_what_it_covered() {
        let o = outbox(64);
        o.hold(7);
        o.push_kept(7, 1, 100, &b("d1@100"));
        o.push_kept(7, 2, 50, &b("d2@50"));
        assert!(
            written(&o).is_empty(),
            "held positions wait for the snapshot"
        );
        // The snapshot already has d1@100 (read from the latest cache) and d2@40.
        release(
            &o,
            7,
            &[(1, 100, Floor::Skip), (2, 40, Floor::Keep)],
            b("subscribed"),
        );
        assert_eq!(written(&o), ["subscribed", "d2@50"]);
    }

    #[test]
    fn the_floors_of_a_snapshot_are_shared_not_copied() {
        // A snapshot read from the database after a restart: every entry
        // keeps a floor, for every subscriber it is sent to.
        let covered = Arc::new(Covered::new((0..500).map(|d| (d, 100, Floor::Keep))));
        let outboxes: Vec<Outbox> = (0..3).map(|_| outbox(64)).collect();
        for o in &outboxes {
            o.hold(2);
            o.release(2, &covered, OutFrame::text(b("subscribed")));
            assert_eq!(written(o), ["subscribed"]);
            assert_eq!(o.floors(), 0, "no copy of the floors");
        }
        assert_eq!(Arc::strong_count(&covered), 4);
        // A late record older than the snapshot is stale for each of them;
        // a newer one goes out, and the order after it needs no floor.
        for o in &outboxes {
            assert_eq!(
                o.push_position(2, 7, 90, &b("d7@90"), Floor::Skip),
                Pushed::Stale
            );
            assert_eq!(
                o.push_position(2, 7, 100, &b("d7@100"), Floor::Skip),
                Pushed::Stale
            );
            assert_eq!(
                o.push_position(2, 7, 110, &b("d7@110"), Floor::Skip),
                Pushed::Queued { first: true }
            );
            assert_eq!(written(o), ["d7@110"]);
        }
        // Unsubscribing lets go of them.
        for o in &outboxes {
            o.remove_topic(2, None);
            assert_eq!(
                o.push_position(2, 7, 50, &b("d7@50"), Floor::Skip),
                Pushed::Queued { first: true }
            );
        }
        assert_eq!(Arc::strong_count(&covered), 1);
    }

    #[test]
    fn a_held_position_older_than_a_shared_floor_is_stale() {
        let o = outbox(64);
        let first = Arc::new(Covered::new([(1, 100, Floor::Keep)]));
        o.hold(3);
        o.release(3, &first, OutFrame::text(b("subscribed")));
        assert_eq!(written(&o), ["subscribed"]);
        // Subscribed again; the new snapshot has an older entry for device
        // 1 (its database row was marked faulty meanwhile): the floor the
        // client already has still holds.
        o.hold(3);
        assert_eq!(
            o.push_position(3, 1, 80, &b("d1@80"), Floor::Skip),
            Pushed::Stale
        );
        assert_eq!(
            o.push_position(3, 2, 80, &b("d2@80"), Floor::Skip),
            Pushed::Queued { first: false }
        );
        let second = Arc::new(Covered::new([(1, 60, Floor::Keep), (2, 90, Floor::Keep)]));
        o.release(3, &second, OutFrame::text(b("again")));
        assert_eq!(written(&o), ["again"], "d2@80 is older than its entry");
        assert_eq!(
            o.push_position(3, 1, 95, &b("d1@95"), Floor::Skip),
            Pushed::Stale
        );
        assert_eq!(
            o.push_position(3, 2, 90, &b("d2@90"), Floor::Skip),
            Pushed::Stale
        );
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "folded into the connection's own"
        );
    }

    #[test]
    fn a_two_piece_subscribed_is_written_as_one_frame() {
        let o = outbox(64);
        o.hold(1);
        o.push_position(1, 1, 5, &b("d1@5"), Floor::Skip);
        let covered = Arc::new(Covered::new([(1, 3, Floor::Skip)]));
        o.release(
            1,
            &covered,
            OutFrame::text_parts(b("{\"id\":1,"), b("\"s\":[]}")),
        );
        assert_eq!(written(&o), ["{\"id\":1,\"s\":[]}", "d1@5"]);
    }

    #[test]
    fn unsubscribe_drops_queued_positions() {
        let o = outbox(64);
        o.push_kept(3, 1, 1, &b("p"));
        o.push_kept(4, 1, 1, &b("other topic"));
        o.push_kept(3, 1, 2, &b("p2"));
        o.remove_topic(3, Some(b("unsubscribed")));
        assert_eq!(written(&o), ["unsubscribed", "other topic"]);
        assert_eq!(
            o.push_kept(3, 1, 2, &b("p2 again")),
            Pushed::Queued { first: true },
            "nothing of the topic is remembered"
        );
    }

    #[test]
    fn control_backlog_limit() {
        let o = Outbox::new(
            Limits {
                control_bytes: 8,
                positions: 64,
                flush_interval: std::time::Duration::ZERO,
            },
            None,
        );
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
        let o = outbox(64);
        o.push_kept(4, 1, 100, &b("d1@100"));
        o.push_kept(4, 2, 100, &b("d2@100"));
        // Re-subscribe: the snapshot will carry d1@120, so d1@120 must not
        // go out before it, and d1@100 not at all.
        o.hold(4);
        assert_eq!(o.push_kept(4, 1, 120, &b("d1@120")), Pushed::Conflated);
        assert!(written(&o).is_empty());
        release(
            &o,
            4,
            &[(1, 120, Floor::Skip), (2, 90, Floor::Skip)],
            b("subscribed"),
        );
        assert_eq!(written(&o), ["subscribed", "d2@100"]);
    }

    #[test]
    fn nothing_follows_a_close_frame() {
        let o = outbox(64);
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
        let o = outbox(64);
        o.push_kept(0, 1, 1, &b("first"));
        o.push_kept(0, 2, 1, &b("second"));
        let mut wire = Vec::new();
        // The socket takes 4 bytes, then refuses.
        assert_eq!(o.flush_with(trickle(&mut wire, 4)), Flushed::Blocked);
        assert!(o.stalled_since().is_some());
        // Meanwhile the record path queues device 1 again: it waits in the
        // queue, behind what is already on the wire.
        assert_eq!(
            o.push_kept(0, 1, 2, &b("third")),
            Pushed::Queued { first: false }
        );
        assert_eq!(
            o.flush_with(|_| Err(io::ErrorKind::WouldBlock.into())),
            Flushed::Blocked
        );
        assert_eq!(
            o.push_kept(0, 1, 3, &b("fourth")),
            Pushed::Queued { first: false }
        );
        let rest = raw(&o);
        wire.extend_from_slice(&rest);
        assert_eq!(frames(&wire), ["first", "second", "third", "fourth"]);
        assert!(o.stalled_since().is_none());
    }

    #[test]
    fn behind_a_blocked_socket_positions_past_the_budget_are_conflated() {
        let o = outbox(2);
        o.push_kept(0, 1, 1, &b("a1"));
        let mut wire = Vec::new();
        assert_eq!(o.flush_with(trickle(&mut wire, 1)), Flushed::Blocked);
        for ts in 2..=5 {
            o.push_kept(0, 1, ts, &b(&format!("a{ts}")));
        }
        let rest = raw(&o);
        wire.extend_from_slice(&rest);
        assert_eq!(frames(&wire), ["a1", "a5"]);
    }

    #[test]
    fn the_stall_timer_counts_from_the_last_progress() {
        let o = outbox(64);
        for ts in 0..10 {
            o.push_kept(0, ts as u32, 1, &b("0123456789"));
        }
        let mut wire = Vec::new();
        assert_eq!(o.flush_with(trickle(&mut wire, 5)), Flushed::Blocked);
        let first = o.stalled_since().expect("stalled");
        std::thread::sleep(std::time::Duration::from_millis(5));
        // Nothing taken: the stall goes on from where it began.
        assert_eq!(
            o.flush_with(|_| Err(io::ErrorKind::WouldBlock.into())),
            Flushed::Blocked
        );
        assert_eq!(o.stalled_since(), Some(first));
        // A few bytes taken: progress, the stall starts again.
        assert_eq!(o.flush_with(trickle(&mut wire, 5)), Flushed::Blocked);
        assert!(o.stalled_since().expect("still stalled") > first);
    }

    /// Flushes at `now` into memory; the text frames written, in write
    /// calls.
    fn writes_at(o: &Outbox, now: Instant) -> Vec<Vec<String>> {
        let mut calls = Vec::new();
        let (result, tick) = o.flush_at(now, |slices| {
            let mut wire = Vec::new();
            for s in slices {
                wire.extend_from_slice(s);
            }
            calls.push(frames(&wire));
            Ok(wire.len())
        });
        assert_eq!(result, Flushed::Done);
        // A tick armed is handed back, so the flusher can keep it.
        if tick.is_some() {
            assert_eq!(tick, o.next_tick());
        }
        calls
    }

    fn coalescing(interval_ms: u64) -> Outbox {
        Outbox::for_tests(64, Duration::from_millis(interval_ms))
    }

    #[test]
    fn positions_within_the_interval_of_a_write_leave_together_at_the_tick() {
        let o = coalescing(20);
        let t0 = Instant::now();
        // After a quiet period the first position goes out at once.
        assert_eq!(
            o.push_kept(0, 1, 1, &b("a1")),
            Pushed::Queued { first: true }
        );
        assert_eq!(writes_at(&o, t0), [["a1"]]);
        assert_eq!(o.next_tick(), Some(t0 + Duration::from_millis(20)));
        // Within the interval: nobody is woken, nothing is written.
        assert_eq!(
            o.push_kept(0, 1, 2, &b("a2")),
            Pushed::Queued { first: false }
        );
        assert_eq!(
            o.push_kept(0, 2, 1, &b("b1")),
            Pushed::Queued { first: false }
        );
        assert!(writes_at(&o, t0 + Duration::from_millis(5)).is_empty());
        // At the tick, in one write, in order.
        let tick = t0 + Duration::from_millis(20);
        assert_eq!(writes_at(&o, tick), [["a2", "b1"]]);
        assert_eq!(o.next_tick(), Some(tick + Duration::from_millis(20)));
        // A tick with nothing to send ends the active period: the next
        // position wakes the connection and goes out at once.
        assert!(writes_at(&o, tick + Duration::from_millis(20)).is_empty());
        assert_eq!(o.next_tick(), None);
        assert_eq!(
            o.push_kept(0, 1, 3, &b("a3")),
            Pushed::Queued { first: true }
        );
        assert_eq!(writes_at(&o, tick + Duration::from_millis(21)), [["a3"]]);
    }

    #[test]
    fn a_connection_that_goes_quiet_keeps_no_buffers() {
        let o = coalescing(20);
        let t0 = Instant::now();
        // A subscribe's burst: its reply and a few positions.
        o.push_control(b("subscribed"));
        for d in 0..10 {
            o.push_kept(0, d, 1, &b("p"));
        }
        assert_eq!(writes_at(&o, t0).concat().len(), 11);
        // Its tick is coming: a busy connection keeps its wire's room.
        assert!(o.wire().frames.capacity() > 0);
        // The tick finds nothing: idle until the next push, and an idle
        // connection (most of them) holds no buffer.
        assert!(writes_at(&o, t0 + Duration::from_millis(20)).is_empty());
        assert_eq!(o.wire().frames.capacity(), 0);
        let inner = o.lock();
        assert_eq!((inner.control.capacity(), inner.queue.capacity()), (0, 0));
        assert_eq!(inner.newest.capacity(), 0);
    }

    #[test]
    fn a_control_message_does_not_wait_for_the_tick() {
        let o = coalescing(20);
        let t0 = Instant::now();
        o.push_kept(0, 1, 1, &b("a1"));
        assert_eq!(writes_at(&o, t0), [["a1"]]);
        o.push_kept(0, 1, 2, &b("a2"));
        o.push_control(b("subscribed"));
        assert_eq!(
            writes_at(&o, t0 + Duration::from_millis(1)),
            [["subscribed", "a2"]]
        );
    }

    #[test]
    fn without_an_interval_every_flush_writes() {
        let o = coalescing(0);
        let t0 = Instant::now();
        o.push_kept(0, 1, 1, &b("a1"));
        assert_eq!(writes_at(&o, t0), [["a1"]]);
        assert_eq!(
            o.push_kept(0, 1, 2, &b("a2")),
            Pushed::Queued { first: true }
        );
        assert_eq!(writes_at(&o, t0), [["a2"]]);
        assert_eq!(o.next_tick(), None);
    }
}
