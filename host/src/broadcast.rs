//! The record path, one batch at a time, on a thread of its own:
//!
//! ```text
//! stream batch → decode → filter chain (record stage) → latest → route
//!              → [delivery stage, per audience] → outboxes
//! ```
//!
//! It is synchronous on purpose: nothing here waits on I/O (the consumer
//! task reads Redis, the connections write sockets), and a plugin call is CPU
//! work that must not stall the async runtime. Each record is decoded once,
//! its body serialized once, its message built once per topic (or once per
//! audience a delivery plugin changed it for) and shared by reference with
//! every subscriber.
//!
//! The thread owns the filter chain, so it also runs the chain over
//! snapshots (so a subscriber sees at subscribe time what the same rules let
//! through live) and swaps in a reloaded chain between two pieces of work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use crate::deflate::Packed;
use crate::devices::{DeviceEvents, DeviceMap};
use crate::filter::{AudienceRef, Chain, Decided, Record};
use crate::flusher::{Flusher, Handoff};
use crate::ids::{DeviceIdx, TopicIdx};
use crate::latest::{Latest, LatestPositions, Observed};
use crate::metrics::Metrics;
use crate::outbox::{Floor, Outbox, Pushed};
use crate::protocol;
use crate::ratelimit::LogLimiter;
use crate::record::{Malformed, Position};
use crate::registry::{Audience, Identity, Registry, Topic, View};
use crate::resume::{self, Coverage, Full, Known};
use crate::snapshot::{CatchUp, Entry, EventSnapshot, View as SnapshotView};

/// One stream entry as read: its id and its `payload` field, if any.
#[derive(Debug)]
pub struct StreamEntry {
    pub id: String,
    pub payload: Option<Vec<u8>>,
}

/// What the record path is asked to do.
pub enum Work {
    /// A batch read from the stream.
    Batch(Vec<StreamEntry>),
    /// Build an event's snapshot from its database rows.
    Snapshot(BuildJob),
    /// Serve a built snapshot to one subscriber.
    Serve(ServeJob),
    /// Answer a resume from memory, if memory can.
    Delta(DeltaJob),
    /// The host is stopping.
    Stop,
}

/// An event's snapshot to build: the record stage over its database rows,
/// merged with the host's latest positions.
pub struct BuildJob {
    pub event: uuid::Uuid,
    /// Rows from the database, as stream payloads; not yet filtered.
    /// `None`: the query failed, the host's memory alone answers.
    pub from_database: Option<Vec<Bytes>>,
    pub reply: oneshot::Sender<EventSnapshot>,
}

/// A built snapshot to serve to one subscriber, whose outbox holds `topic`.
pub struct ServeJob {
    pub snapshot: Arc<EventSnapshot>,
    pub topic: TopicIdx,
    pub identity: Arc<Identity>,
    pub outbox: Arc<Outbox>,
    pub reply: oneshot::Sender<Served>,
}

/// A resume (`since`) of one subscriber, registered and holding its topic.
pub struct DeltaJob {
    pub event: uuid::Uuid,
    pub since: i64,
    pub identity: Arc<Identity>,
    /// The subscriber negotiated permessage-deflate.
    pub deflate: bool,
    pub reply: oneshot::Sender<Result<Served, Full>>,
}

/// What a subscriber was served.
pub struct Served {
    /// Its audience's view: the `subscribed` body and the floors.
    pub view: Arc<SnapshotView>,
    /// Positions queued behind `subscribed` because the snapshot was older
    /// than the host's memory.
    pub caught_up: usize,
}

/// What the record path needs of the host.
pub struct Broadcaster {
    pub chain: Chain,
    pub latest: Arc<LatestPositions>,
    pub devices: Arc<DeviceMap>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// The device map the latest positions were last pruned against.
    map: Arc<DeviceEvents>,
    /// Bumped on every chain swap (see `snapshot::Snapshots`).
    chain_generation: Arc<AtomicU64>,
    /// When the chain in use was swapped in (Unix ms; 0: at start).
    chain_since_ms: i64,
    coverage: Arc<Coverage>,
    resume_slack_ms: i64,
    /// Larger stream entries are skipped as malformed (`too_large`).
    max_record_bytes: usize,
    /// Shorter messages are not compressed (`LIVE_WS_DEFLATE_MIN_BYTES`).
    deflate_min: usize,
    /// Writes what a batch queued for quiet connections.
    flusher: Arc<Flusher>,
    malformed_log: LogLimiter,
    // Reused between batches.
    records: Vec<Record>,
    bodies: Vec<Bytes>,
    observed: Vec<Observed>,
}

/// Counts of one batch, added to the metrics once per batch.
#[derive(Default)]
struct Tally {
    stale: u64,
    unrouted: u64,
    routed: u64,
    deliveries: u64,
    conflated: u64,
    deflate_in: u64,
    deflate_out: u64,
}

impl Tally {
    fn pushed(&mut self, p: Pushed) {
        match p {
            Pushed::Queued { .. } => self.deliveries += 1,
            Pushed::Conflated => {
                self.deliveries += 1;
                self.conflated += 1;
            }
            Pushed::Shed(n) => {
                self.deliveries += 1;
                self.conflated += n as u64;
            }
            Pushed::Stale | Pushed::Closed => {}
        }
    }
}

/// What one batch hands to subscribers: the positions pushed into their
/// outboxes, counted, and the outboxes to have written once the whole batch
/// is in (so a client gets the batch in one write).
struct Delivery {
    tally: Tally,
    /// Outboxes this batch gave their first thing to send, by writer.
    handoff: Handoff,
    deflate_min: usize,
}

impl Delivery {
    fn new(deflate_min: usize) -> Self {
        Self {
            tally: Tally::default(),
            handoff: Handoff::default(),
            deflate_min,
        }
    }

    /// Adds the routing counts (records stale, unrouted, routed).
    fn tally(mut self, routing: Tally) -> Self {
        self.tally.stale += routing.stale;
        self.tally.unrouted += routing.unrouted;
        self.tally.routed += routing.routed;
        self
    }

    /// Queues one position for one subscriber: the message shared by the
    /// topic (or audience), compressed once for those that negotiated
    /// permessage-deflate.
    fn push(&mut self, outbox: &Arc<Outbox>, topic: TopicIdx, position: Queued, msg: &Packed) {
        let tally = &mut self.tally;
        let msg = msg.for_connection(outbox.deflate(), self.deflate_min, |i, o| {
            tally.deflate_in += i as u64;
            tally.deflate_out += o as u64;
        });
        let p = outbox.push_position(topic, position.device, position.ts, msg, position.floor);
        if p == (Pushed::Queued { first: true }) {
            self.handoff.add(outbox);
        }
        self.tally.pushed(p);
    }

    /// Counts the batch in the metrics, then has the connections it gave
    /// their first positions written. In this order, so a record a client
    /// has seen is always counted by then.
    ///
    /// Written after the whole batch, so a client gets it in one syscall,
    /// by the flusher's shards, so that the writes of a thousand clients run
    /// on every core of the runtime (writing them here, on one thread, lost
    /// that; see docs/benchmarks.md). Connections waiting for their tick
    /// are not here: their shard writes them when it comes.
    fn finish(mut self, metrics: &Metrics, flusher: &Flusher) {
        let t = &self.tally;
        metrics.records_stale.inc_by(t.stale);
        metrics.records_unrouted.inc_by(t.unrouted);
        metrics.records_routed.inc_by(t.routed);
        metrics.deliveries.inc_by(t.deliveries);
        metrics.conflated.inc_by(t.conflated);
        metrics.deflate_in_bytes.inc_by(t.deflate_in);
        metrics.deflate_out_bytes.inc_by(t.deflate_out);
        flusher.write_now(&mut self.handoff);
    }
}

/// One position as pushed to each subscriber of a topic.
#[derive(Clone, Copy)]
struct Queued {
    device: DeviceIdx,
    ts: i64,
    floor: Floor,
}

/// A (record, topic, audience) the delivery stage decides on.
struct Pair {
    record: usize,
    device: DeviceIdx,
    /// Index into the batch's audiences.
    audience: u32,
}

impl Broadcaster {
    pub fn new(
        chain: Chain,
        latest: Arc<LatestPositions>,
        devices: Arc<DeviceMap>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        max_record_bytes: usize,
    ) -> Self {
        let flusher = Arc::new(Flusher::new(1, metrics.flush_lag_ms.clone()));
        Self {
            chain,
            latest,
            map: devices.current(),
            chain_generation: Arc::default(),
            chain_since_ms: 0,
            coverage: Arc::default(),
            resume_slack_ms: 5_000,
            devices,
            registry,
            metrics,
            max_record_bytes,
            deflate_min: usize::MAX,
            flusher,
            malformed_log: LogLimiter::new(Duration::from_secs(10)),
            records: Vec::new(),
            bodies: Vec::new(),
            observed: Vec::new(),
        }
    }

    /// Compresses messages of at least `min` bytes for the connections that
    /// negotiated permessage-deflate (none are, without this).
    pub fn with_deflate_min(mut self, min: usize) -> Self {
        self.deflate_min = min;
        self
    }

    /// Has `flusher` write the positions a batch queued (without one, they
    /// wait in the outboxes: unit tests write them by hand).
    pub fn with_flusher(mut self, flusher: Arc<Flusher>) -> Self {
        self.flusher = flusher;
        self
    }

    /// Shares the counter of chain swaps with the snapshots' cache.
    pub fn with_chain_generation(mut self, generation: Arc<AtomicU64>) -> Self {
        self.chain_generation = generation;
        self
    }

    /// Shares the consumer's record of unbroken reading, for resumes with
    /// `LIVE_RESUME_SLACK_MS` of `slack`.
    pub fn with_resume(mut self, coverage: Arc<Coverage>, slack: Duration) -> Self {
        self.coverage = coverage;
        self.resume_slack_ms = i64::try_from(slack.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// Runs until told to stop (or every sender is gone). A reloaded chain
    /// (from `filter::reload`) is swapped in before the next piece of work.
    pub fn run(mut self, mut work: mpsc::Receiver<Work>, mut chains: mpsc::Receiver<Box<Chain>>) {
        while let Some(w) = work.blocking_recv() {
            while let Ok(chain) = chains.try_recv() {
                self.chain = *chain;
                self.chain_generation.fetch_add(1, Ordering::AcqRel);
                self.chain_since_ms = resume::unix_ms();
            }
            match w {
                Work::Batch(batch) => self.process(batch),
                Work::Snapshot(job) => self.snapshot(job),
                Work::Serve(job) => self.serve(job),
                Work::Delta(job) => self.delta(job),
                Work::Stop => return,
            }
        }
    }

    /// Takes one batch from the stream to the subscribers' outboxes.
    pub fn process(&mut self, batch: Vec<StreamEntry>) {
        self.metrics.records_read.inc_by(batch.len() as u64);
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        for entry in batch {
            match decode(entry, self.max_record_bytes) {
                Ok(r) => records.push(r),
                Err((id, why)) => self.skip(&id, why),
            }
        }

        self.chain.filter(&mut records);

        let mut bodies = std::mem::take(&mut self.bodies);
        bodies.clear();
        bodies.extend(records.iter().map(|r| r.position.body()));
        let devices = self.devices.current();
        if !Arc::ptr_eq(&devices, &self.map) {
            self.latest.forget_unregistered(&devices);
            self.map = devices.clone();
        }
        let mut observed = std::mem::take(&mut self.observed);
        self.latest.observe(
            records
                .iter()
                .zip(&bodies)
                .map(|(r, b)| (&*r.position.device, r.position.ts_ms, b, &r.payload)),
            &devices,
            resume::unix_ms(),
            &mut observed,
        );

        if self.chain.has_delivery() {
            self.route_per_audience(&records, &bodies, &observed, &devices);
        } else {
            self.route(&records, &bodies, &observed, &devices);
        }

        self.records = records;
        self.bodies = bodies;
        self.observed = observed;
    }

    fn skip(&mut self, id: &str, why: Malformed) {
        crate::metrics::inc(&self.metrics.records_malformed, "reason", why.label());
        if let Some(held_back) = self.malformed_log.allow() {
            tracing::warn!(entry = id, reason = %why, held_back, "skipped a malformed stream entry");
        }
    }

    /// Without a delivery stage: one message per (record, topic), the same
    /// bytes for every subscriber.
    fn route(
        &self,
        records: &[Record],
        bodies: &[Bytes],
        observed: &[Observed],
        devices: &DeviceEvents,
    ) {
        let registry = self.registry.view();
        let mut out = Delivery::new(self.deflate_min);
        let routing = each_route(records, observed, devices, &registry, |i, device, topic| {
            let msg = Packed::new(protocol::position(&topic.prefix, &bodies[i]));
            let position = Queued {
                device,
                ts: records[i].position.ts_ms,
                floor: Floor::Skip,
            };
            for outbox in topic.subscribers() {
                out.push(outbox, topic.idx, position, &msg);
            }
        });
        out.tally(routing).finish(&self.metrics, &self.flusher);
    }

    /// With a delivery stage: the chain decides per (record, audience), in
    /// one call per plugin for the whole batch. Audiences the chain passes
    /// share the topic's message; a replacement is serialized once for its
    /// audience. The registry is not locked while plugins run (subscribes
    /// would wait on them): the pairs are collected, decided, then pushed to
    /// whoever subscribes to each audience by then.
    fn route_per_audience(
        &mut self,
        records: &[Record],
        bodies: &[Bytes],
        observed: &[Observed],
        devices: &DeviceEvents,
    ) {
        let mut pairs: Vec<Pair> = Vec::new();
        // The batch's distinct audiences: (event, topic name, identity).
        let mut audiences: Vec<(uuid::Uuid, String, Arc<Identity>)> = Vec::new();
        let routing;
        {
            let registry = self.registry.view();
            let mut audience_index: FxHashMap<(u32, usize), u32> = FxHashMap::default();
            routing = each_route(records, observed, devices, &registry, |i, device, topic| {
                for (a, group) in topic.audiences.iter().enumerate() {
                    let audience = *audience_index.entry((topic.idx, a)).or_insert_with(|| {
                        audiences.push((topic.event, topic.name.clone(), group.identity.clone()));
                        (audiences.len() - 1) as u32
                    });
                    pairs.push(Pair {
                        record: i,
                        device,
                        audience,
                    });
                }
            });
        }
        if pairs.is_empty() {
            Delivery::new(self.deflate_min)
                .tally(routing)
                .finish(&self.metrics, &self.flusher);
            return;
        }
        let refs: Vec<AudienceRef<'_>> = audiences
            .iter()
            .map(|(_, topic, id)| AudienceRef {
                topic,
                role: &id.role,
                user_id: &id.user_id,
            })
            .collect();
        let abi_pairs: Vec<(u32, u32)> = pairs
            .iter()
            .map(|p| (p.record as u32, p.audience))
            .collect();
        let payloads: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
        let decided = self.chain.deliver(&payloads, &refs, &abi_pairs);

        let registry = self.registry.view();
        // Each audience found again once (it may have gone meanwhile), not
        // once per pair.
        let groups: Vec<Option<(&Topic, &Audience)>> = audiences
            .iter()
            .map(|(event, _, identity)| {
                let topic = registry.topic(event)?;
                let group = topic.audiences.iter().find(|a| a.identity == *identity)?;
                Some((topic, group))
            })
            .collect();
        let mut shared: Option<(usize, u32, Packed)> = None;
        let mut out = Delivery::new(self.deflate_min);
        for (p, d) in pairs.iter().zip(decided) {
            if matches!(d, Decided::Drop) {
                continue;
            }
            let Some((topic, group)) = groups[p.audience as usize] else {
                continue;
            };
            // Every position of an audience keeps a floor here: a plugin may
            // pass one record and give an older (delayed) one for the next.
            let replaced;
            let (msg, ts) = match d {
                Decided::Drop => continue,
                Decided::Pass => {
                    let same =
                        matches!(&shared, Some((r, idx, _)) if *r == p.record && *idx == topic.idx);
                    if !same {
                        let m = protocol::position(&topic.prefix, &bodies[p.record]);
                        shared = Some((p.record, topic.idx, Packed::new(m)));
                    }
                    let Some((_, _, msg)) = &shared else {
                        continue;
                    };
                    (msg, records[p.record].position.ts_ms)
                }
                Decided::Replace(r) => {
                    replaced = Packed::new(protocol::position(&topic.prefix, &r.position.body()));
                    (&replaced, r.position.ts_ms)
                }
            };
            let position = Queued {
                device: p.device,
                ts,
                floor: Floor::Keep,
            };
            for (_, outbox) in &group.members {
                out.push(outbox, topic.idx, position, msg);
            }
        }
        out.tally(routing).finish(&self.metrics, &self.flusher);
    }

    /// Builds an event's snapshot: the record stage over database rows
    /// (memory entries went through it live), then the newest of database
    /// and memory per device. It reads the latest positions here, between
    /// two batches, so that every position it finds has been routed too.
    fn snapshot(&mut self, job: BuildJob) {
        let from_memory = job.from_database.is_none();
        let mut from_db: Vec<Record> = Vec::new();
        for payload in job.from_database.into_iter().flatten() {
            match Position::decode(&payload) {
                Ok(position) => from_db.push(Record { payload, position }),
                Err(why) => {
                    self.metrics.snapshot_bad_rows.inc();
                    if let Some(held_back) = self.malformed_log.allow() {
                        tracing::warn!(reason = %why, held_back, "left a database row out of a snapshot: it is not a valid position");
                    }
                }
            }
        }
        self.chain.filter(&mut from_db);
        let devices = self.devices.current();
        // Newest per device; a database row newer than anything the host saw
        // on the stream is the one case where the subscriber must remember
        // the entry's ts (a late stream record could be older).
        let mut newest: FxHashMap<Box<str>, (Option<DeviceIdx>, Latest, Floor)> = self
            .latest
            .get_many(devices.devices_of(job.event).iter().map(|d| &**d))
            .into_iter()
            .map(|(d, idx, l)| (d.into(), (Some(idx), l, Floor::Skip)))
            .collect();
        for r in from_db {
            let ts = r.position.ts_ms;
            if newest
                .get(&r.position.device)
                .is_some_and(|(_, have, _)| have.ts_ms >= ts)
            {
                continue;
            }
            let latest = Latest {
                ts_ms: ts,
                body: r.position.body(),
                payload: r.payload,
                // Never reached the host's memory.
                arrived_ms: 0,
            };
            newest.insert(r.position.device, (None, latest, Floor::Keep));
        }
        let entries = newest
            .into_iter()
            .map(|(device, (idx, l, floor))| Entry {
                // A device known only from the database gets its index now.
                idx: idx.unwrap_or_else(|| self.latest.device_idx(&device)),
                device,
                ts_ms: l.ts_ms,
                body: l.body,
                payload: l.payload,
                floor,
            })
            .collect();
        let generation = self.chain_generation.load(Ordering::Acquire);
        let snapshot = EventSnapshot::new(job.event, entries, from_memory, generation);
        if !self.chain.has_delivery() {
            // One view for everyone, serialized here once.
            snapshot.view(None, |s| self.audience_view(s, &Identity::default(), false));
        }
        let _ = job.reply.send(snapshot);
    }

    /// Serves a snapshot to one subscriber: its audience's view (the
    /// delivery stage runs once per audience and snapshot), and, queued
    /// into its held topic, the devices whose latest position is newer than
    /// the snapshot's entry.
    fn serve(&mut self, job: ServeJob) {
        let snapshot = &job.snapshot;
        let delivery = self.chain.has_delivery();
        let audience = delivery.then_some(&*job.identity);
        let view = snapshot.view(audience, |s| self.audience_view(s, &job.identity, delivery));
        // Compressed here, on the record path, once per view: not on a
        // connection's task, where concurrent subscribers would each wait.
        if job.outbox.deflate()
            && let Some((i, o)) = view.deflate(self.deflate_min)
        {
            self.metrics.deflate_in_bytes.inc_by(i as u64);
            self.metrics.deflate_out_bytes.inc_by(o as u64);
        }

        let devices = self.devices.current();
        let newer = self.latest.newer_than(
            devices.devices_of(snapshot.event).iter().map(|d| &**d),
            |idx| snapshot.ts_of(idx),
        );
        let mut todo: Vec<(DeviceIdx, Latest)> = Vec::new();
        let mut caught_up = 0;
        for (idx, latest) in newer {
            match view.made_catch_up(idx, latest.ts_ms) {
                Some(made) => caught_up += usize::from(self.push_catch_up(&job, idx, made)),
                None => todo.push((idx, latest)),
            }
        }
        if !todo.is_empty() {
            let decided = if delivery {
                let payloads: Vec<&[u8]> = todo.iter().map(|(_, l)| &l.payload[..]).collect();
                let audience = [AudienceRef {
                    topic: &snapshot.topic,
                    role: &job.identity.role,
                    user_id: &job.identity.user_id,
                }];
                let pairs: Vec<(u32, u32)> = (0..todo.len() as u32).map(|i| (i, 0)).collect();
                self.chain.deliver(&payloads, &audience, &pairs)
            } else {
                vec![Decided::Pass; todo.len()]
            };
            // Positions of an audience keep a floor, as live ones do (see
            // `route_per_audience`).
            let floor = if delivery { Floor::Keep } else { Floor::Skip };
            for ((idx, latest), d) in todo.into_iter().zip(decided) {
                let made = match d {
                    Decided::Drop => None,
                    Decided::Pass => Some(CatchUp {
                        ts_ms: latest.ts_ms,
                        msg: Arc::new(Packed::new(protocol::position(
                            &snapshot.prefix,
                            &latest.body,
                        ))),
                        floor,
                    }),
                    Decided::Replace(r) => Some(CatchUp {
                        ts_ms: r.position.ts_ms,
                        msg: Arc::new(Packed::new(protocol::position(
                            &snapshot.prefix,
                            &r.position.body(),
                        ))),
                        floor: Floor::Keep,
                    }),
                };
                view.remember_catch_up(idx, latest.ts_ms, made.clone());
                caught_up += usize::from(self.push_catch_up(&job, idx, made));
            }
        }
        let _ = job.reply.send(Served { view, caught_up });
    }

    /// Answers a resume from memory: the devices of the event a client
    /// holding positions up to `since` may lack, through the delivery stage
    /// for its audience. Built and served in one step between two batches,
    /// so nothing needs catching up: every position routed from here on is
    /// pushed into the held topic after it, and checked against its floors.
    fn delta(&mut self, job: DeltaJob) {
        let devices = self.devices.current();
        let known = Known {
            now_ms: resume::unix_ms(),
            covered_from_ms: self.coverage.began_ms(),
            devices_since_ms: devices.unchanged_since(job.event),
            chain_since_ms: self.chain_since_ms,
            slack_ms: self.resume_slack_ms,
        };
        if let Err(full) = resume::delta_allowed(job.since, known) {
            let _ = job.reply.send(Err(full));
            return;
        }
        let entries = self
            .latest
            .get_many(devices.devices_of(job.event).iter().map(|d| &**d))
            .into_iter()
            .filter(|(_, _, l)| {
                resume::listed(job.since, self.resume_slack_ms, l.ts_ms, l.arrived_ms)
            })
            .map(|(device, idx, l)| Entry {
                device: device.into(),
                idx,
                ts_ms: l.ts_ms,
                body: l.body,
                payload: l.payload,
                floor: Floor::Skip,
            })
            .collect();
        let generation = self.chain_generation.load(Ordering::Acquire);
        let delta = EventSnapshot::new(job.event, entries, false, generation);
        let delivery = self.chain.has_delivery();
        let view = self.audience_view(&delta, &job.identity, delivery);
        if job.deflate
            && let Some((i, o)) = view.deflate(self.deflate_min)
        {
            self.metrics.deflate_in_bytes.inc_by(i as u64);
            self.metrics.deflate_out_bytes.inc_by(o as u64);
        }
        let _ = job.reply.send(Ok(Served {
            view: Arc::new(view),
            caught_up: 0,
        }));
    }

    /// Queues a catch-up position into the subscriber's held topic; whether
    /// it was one to send.
    fn push_catch_up(&self, job: &ServeJob, device: DeviceIdx, made: Option<CatchUp>) -> bool {
        let Some(c) = made else { return false };
        // Compressed once per audience too, shared like the plain message.
        let msg = c
            .msg
            .for_connection(job.outbox.deflate(), self.deflate_min, |i, o| {
                self.metrics.deflate_in_bytes.inc_by(i as u64);
                self.metrics.deflate_out_bytes.inc_by(o as u64);
            });
        let pushed = job
            .outbox
            .push_position(job.topic, device, c.ts_ms, msg, c.floor);
        matches!(pushed, Pushed::Queued { .. } | Pushed::Conflated)
    }

    /// The view of a snapshot for one audience: the delivery stage over its
    /// entries (when there is one), serialized once.
    fn audience_view(
        &mut self,
        snapshot: &EventSnapshot,
        identity: &Identity,
        delivery: bool,
    ) -> SnapshotView {
        let entries = &snapshot.entries;
        let decided = if delivery && !entries.is_empty() {
            let payloads: Vec<&[u8]> = entries.iter().map(|e| &e.payload[..]).collect();
            let audience = [AudienceRef {
                topic: &snapshot.topic,
                role: &identity.role,
                user_id: &identity.user_id,
            }];
            let pairs: Vec<(u32, u32)> = (0..entries.len() as u32).map(|i| (i, 0)).collect();
            self.chain.deliver(&payloads, &audience, &pairs)
        } else {
            vec![Decided::Pass; entries.len()]
        };
        let sent: Vec<(DeviceIdx, i64, Bytes, Floor)> = entries
            .iter()
            .zip(decided)
            .filter_map(|(e, d)| match d {
                Decided::Drop => None,
                Decided::Pass => Some((e.idx, e.ts_ms, e.body.clone(), e.floor)),
                // Keyed by the device the entry is for: a plugin's
                // replacement cannot make the host index a name it invents.
                Decided::Replace(r) => {
                    Some((e.idx, r.position.ts_ms, r.position.body(), Floor::Keep))
                }
            })
            .collect();
        SnapshotView::new(&sent)
    }
}

/// Calls `each(record, device, topic)` for every subscribed topic of every
/// record worth routing; returns the records stale, unrouted and routed.
fn each_route<'v>(
    records: &[Record],
    observed: &[Observed],
    devices: &DeviceEvents,
    registry: &'v View,
    mut each: impl FnMut(usize, DeviceIdx, &'v Topic),
) -> Tally {
    let mut t = Tally::default();
    for (i, (record, seen)) in records.iter().zip(observed).enumerate() {
        let device = match *seen {
            Observed::Newer(device) => device,
            Observed::Stale => {
                t.stale += 1;
                continue;
            }
            Observed::Unrouted => {
                t.unrouted += 1;
                continue;
            }
        };
        let events = devices.events_of(&record.position.device);
        let mut reached = false;
        for topic in events.iter().filter_map(|e| registry.topic(e)) {
            reached = true;
            each(i, device, topic);
        }
        t.routed += u64::from(reached);
    }
    t
}

fn decode(entry: StreamEntry, max_bytes: usize) -> Result<Record, (String, Malformed)> {
    let Some(payload) = entry.payload else {
        return Err((entry.id, Malformed::NoPayload));
    };
    // Before parsing: a huge entry would otherwise be decoded, run through
    // the chain and sent whole to every subscriber.
    if payload.len() > max_bytes {
        return Err((entry.id, Malformed::TooLarge));
    }
    match Position::decode(&payload) {
        Ok(position) => Ok(Record {
            payload: Bytes::from(payload),
            position,
        }),
        Err(why) => Err((entry.id, why)),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use uuid::Uuid;

    use super::*;
    use crate::devices::DeviceEvents;
    use crate::metrics::Metrics as M;
    use crate::ws::OutFrame;

    /// A record path with no plugin, and devices `a` in events 1 and 2, `b`
    /// in event 2, `c` in none.
    struct World {
        b: Broadcaster,
        registry: Arc<Registry>,
        events: [Uuid; 2],
    }

    fn world() -> World {
        let events = [Uuid::new_v4(), Uuid::new_v4()];
        let devices = Arc::new(DeviceMap::default());
        devices.replace(DeviceEvents::from_pairs([
            ("a".to_owned(), events[0]),
            ("a".to_owned(), events[1]),
            ("b".to_owned(), events[1]),
        ]));
        let registry = Arc::new(Registry::default());
        let b = Broadcaster::new(
            Chain::empty(),
            Arc::default(),
            devices,
            registry.clone(),
            Arc::new(Metrics::new()),
            1024,
        );
        World {
            b,
            registry,
            events,
        }
    }

    impl World {
        fn subscriber(&self, conn: u64, events: &[Uuid]) -> Arc<Outbox> {
            self.subscriber_with(conn, events, false)
        }

        /// A subscriber that negotiated permessage-deflate, or not.
        fn subscriber_with(&self, conn: u64, events: &[Uuid], deflate: bool) -> Arc<Outbox> {
            let o =
                Arc::new(Outbox::for_tests(64, std::time::Duration::ZERO).with_deflate(deflate));
            for e in events {
                self.registry
                    .subscribe(*e, conn, &Arc::new(Identity::default()), &o);
            }
            o
        }

        fn batch(&mut self, records: &[(&str, i64)]) {
            let batch = records
                .iter()
                .enumerate()
                .map(|(i, (device, ts))| StreamEntry {
                    id: format!("{i}-0"),
                    payload: Some(payload(device, *ts)),
                })
                .collect();
            self.b.process(batch);
        }
    }

    fn payload(device: &str, ts_ms: i64) -> Vec<u8> {
        let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
            .expect("in range")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("formats");
        format!(r#"{{"device_id":"{device}","timestamp":"{ts}","latitude":1,"longitude":2}}"#)
            .into_bytes()
    }

    /// The bytes the outbox would write now.
    fn written(o: &Outbox) -> Vec<u8> {
        let mut wire = Vec::new();
        o.flush_with(|slices| {
            let n = slices.iter().map(|s| s.len()).sum();
            for s in slices {
                wire.extend_from_slice(s);
            }
            Ok::<_, io::Error>(n)
        });
        wire
    }

    /// (topic, device, ts) of every position the outbox would write now.
    fn sent(o: &Outbox) -> Vec<(String, String, i64)> {
        let wire = written(o);
        let mut out = Vec::new();
        let mut rest = &wire[..];
        while rest.len() > 2 {
            let (len, at) = match rest[1] {
                126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                n => (usize::from(n), 2),
            };
            let v: serde_json::Value =
                serde_json::from_slice(&rest[at..at + len]).expect("a JSON message");
            out.push((
                v["topic"].as_str().unwrap_or_default().to_owned(),
                v["deviceId"].as_str().unwrap_or_default().to_owned(),
                v["ts"].as_i64().unwrap_or_default(),
            ));
            rest = &rest[at + len..];
        }
        out
    }

    /// The one frame the outbox would write now: its first byte and payload.
    fn one_frame(o: &Outbox) -> (u8, Vec<u8>) {
        let wire = written(o);
        let (len, at) = match wire[1] {
            126 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
            n => (usize::from(n), 2),
        };
        assert_eq!(wire.len(), at + len, "one frame");
        (wire[0], wire[at..].to_vec())
    }

    #[test]
    fn a_position_is_compressed_once_for_the_subscribers_that_negotiated_deflate() {
        let mut w = world();
        w.b.deflate_min = 16;
        let [_, e2] = w.events;
        let plain = w.subscriber(1, &[e2]);
        let packed: Vec<_> = (2..5).map(|c| w.subscriber_with(c, &[e2], true)).collect();
        w.batch(&[("a", 10)]);
        let (b0, text) = one_frame(&plain);
        assert_eq!(b0, 0x81, "plain text, RSV1 clear");
        let frames: Vec<_> = packed.iter().map(|o| one_frame(o)).collect();
        for (b0, payload) in &frames {
            assert_eq!(*b0, 0xc1, "RSV1 set");
            assert_eq!(payload, &frames[0].1);
        }
        assert_eq!(
            crate::deflate::inflate(&frames[0].1, 1 << 16).expect("valid"),
            text
        );
        let m = &w.b.metrics;
        assert_eq!(
            m.deflate_in_bytes.get(),
            text.len() as u64,
            "compressed once, not per subscriber"
        );
        assert_eq!(m.deflate_out_bytes.get(), frames[0].1.len() as u64);
        // Without a subscriber that negotiated it, nothing is compressed.
        let mut w = world();
        w.b.deflate_min = 16;
        let plain = w.subscriber(1, &[w.events[1]]);
        w.batch(&[("a", 10)]);
        assert_eq!(one_frame(&plain).0, 0x81);
        assert_eq!(w.b.metrics.deflate_in_bytes.get(), 0);
        // Nor a message under the threshold.
        let mut w = world();
        w.b.deflate_min = 10_000;
        let packed = w.subscriber_with(1, &[w.events[1]], true);
        w.batch(&[("a", 10)]);
        assert_eq!(one_frame(&packed).0, 0x81);
        assert_eq!(w.b.metrics.deflate_in_bytes.get(), 0);
    }

    #[test]
    fn each_record_reaches_every_subscriber_of_every_event_of_its_device() {
        let mut w = world();
        let [e1, e2] = w.events;
        let both = w.subscriber(1, &[e1, e2]);
        let second = w.subscriber(2, &[e2]);
        let none = w.subscriber(3, &[]);
        w.batch(&[("a", 10), ("b", 11), ("c", 12)]);
        let (t1, t2) = (protocol::topic_of(e1), protocol::topic_of(e2));
        let mut got = sent(&both);
        got.sort();
        let mut want = vec![
            (t1.clone(), "a".to_owned(), 10),
            (t2.clone(), "a".to_owned(), 10),
            (t2.clone(), "b".to_owned(), 11),
        ];
        want.sort();
        assert_eq!(got, want);
        let mut got = sent(&second);
        got.sort();
        assert_eq!(
            got,
            [(t2.clone(), "a".to_owned(), 10), (t2, "b".to_owned(), 11)]
        );
        assert!(sent(&none).is_empty());
        assert!(
            w.b.latest.get_many(["c"].into_iter()).is_empty(),
            "c, in no event, is not remembered"
        );
        let m = &w.b.metrics;
        assert_eq!(
            (
                m.records_routed.get(),
                m.records_unrouted.get(),
                m.deliveries.get()
            ),
            (2, 1, 5),
            "a and b routed, c in no event; 3 + 2 deliveries"
        );
    }

    #[test]
    fn an_older_record_of_a_device_goes_nowhere_and_is_counted_stale() {
        let mut w = world();
        let o = w.subscriber(1, &[w.events[1]]);
        w.batch(&[("b", 20), ("b", 15)]);
        w.batch(&[("b", 20), ("b", 21)]);
        let ts: Vec<i64> = sent(&o).into_iter().map(|(_, _, ts)| ts).collect();
        // Every newer record, in order; 15 and the second 20 nowhere.
        assert_eq!(ts, [20, 21]);
        assert_eq!(w.b.metrics.records_stale.get(), 2);
    }

    #[test]
    fn a_malformed_entry_is_skipped_and_counted_by_reason() {
        let mut w = world();
        let o = w.subscriber(1, &[w.events[1]]);
        let batch = vec![
            StreamEntry {
                id: "1-0".into(),
                payload: None,
            },
            StreamEntry {
                id: "2-0".into(),
                payload: Some(b"{not json".to_vec()),
            },
            StreamEntry {
                id: "3-0".into(),
                payload: Some(payload("b", 30)),
            },
            StreamEntry {
                id: "4-0".into(),
                payload: Some(
                    format!(
                        r#"{{"pad":"{}","device_id":"b","timestamp":"2026-05-02T10:15:30Z","latitude":1,"longitude":2}}"#,
                        "x".repeat(1024)
                    )
                    .into_bytes(),
                ),
            },
        ];
        w.b.process(batch);
        assert_eq!(sent(&o).len(), 1, "the good record still goes out");
        let m = &w.b.metrics.records_malformed;
        assert_eq!(M::count(m, "reason", "no_payload"), 1);
        assert_eq!(M::count(m, "reason", "json"), 1);
        assert_eq!(M::count(m, "reason", "too_large"), 1);
    }

    impl World {
        /// A snapshot of `event` built now from these database rows.
        fn build(&mut self, event: Uuid, rows: &[(&str, i64)]) -> Arc<EventSnapshot> {
            let (reply, mut answer) = oneshot::channel();
            self.b.snapshot(BuildJob {
                event,
                from_database: Some(rows.iter().map(|(d, ts)| payload(d, *ts).into()).collect()),
                reply,
            });
            Arc::new(answer.try_recv().expect("built at once"))
        }

        /// Serves `snapshot` to a subscriber holding its topic.
        fn serve(&mut self, snapshot: &Arc<EventSnapshot>, outbox: &Arc<Outbox>) -> Served {
            let topic = self.registry.topic_idx(snapshot.event);
            let (reply, mut answer) = oneshot::channel();
            self.b.serve(ServeJob {
                snapshot: snapshot.clone(),
                topic,
                identity: Arc::new(Identity::default()),
                outbox: outbox.clone(),
                reply,
            });
            answer.try_recv().expect("served at once")
        }
    }

    #[test]
    fn a_shared_snapshot_is_caught_up_to_what_arrived_after_it_was_built() {
        let mut w = world();
        let e = w.events[1];
        w.batch(&[("a", 10)]);
        // Built from a row of b newer than the stream, and a's latest.
        let snapshot = w.build(e, &[("a", 5), ("b", 20)]);
        let ts: Vec<(i64, Floor)> = snapshot
            .entries
            .iter()
            .map(|e| (e.ts_ms, e.floor))
            .collect();
        assert_eq!(ts, [(10, Floor::Skip), (20, Floor::Keep)]);
        // Then a moves; later a subscriber registers and is served the
        // same snapshot.
        w.batch(&[("a", 11)]);
        let o = w.subscriber(1, &[]);
        let topic = w.registry.topic_idx(e);
        o.hold(topic);
        w.registry
            .subscribe(e, 1, &Arc::new(Identity::default()), &o);
        let served = w.serve(&snapshot, &o);
        assert_eq!(
            served.caught_up, 1,
            "a@11 reached the host after the snapshot"
        );
        // A live position pushed meanwhile is not sent twice; b's floor
        // holds against an older one.
        w.batch(&[("a", 12), ("b", 15)]);
        let reply = OutFrame::text_parts(
            protocol::subscribed_head("t", None, false),
            served.view.body.clone(),
        );
        o.release(topic, &served.view.covered, reply);
        let got: Vec<(String, i64)> = sent(&o).into_iter().map(|(_, d, ts)| (d, ts)).collect();
        assert_eq!(
            got,
            [(String::new(), 0), ("a".into(), 12)],
            "subscribed, then a@12 only"
        );
        // A second subscriber gets the same view and the same catch-up
        // message, not copies.
        let o2 = w.subscriber(2, &[]);
        o2.hold(topic);
        let again = w.serve(&snapshot, &o2);
        assert!(Arc::ptr_eq(&served.view, &again.view));
        assert_eq!(again.caught_up, 1, "a@12 now");
    }

    #[test]
    fn a_subscriber_that_left_gets_nothing_more() {
        let mut w = world();
        let e = w.events[1];
        let o = w.subscriber(1, &[e]);
        w.registry.unsubscribe(e, 1);
        w.batch(&[("b", 40)]);
        assert!(sent(&o).is_empty());
        assert_eq!(w.b.metrics.deliveries.get(), 0);
    }
}
