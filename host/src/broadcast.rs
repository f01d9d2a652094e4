//! The record path, one batch at a time, on a thread of its own:
//!
//! ```text
//! stream batch → decode → filter chain → latest → route → outboxes
//! ```
//!
//! It is synchronous on purpose: nothing here waits on I/O (the consumer
//! task reads Redis, the connections write sockets), and a plugin call is CPU
//! work that must not stall the async runtime. Each record is decoded once,
//! its body serialized once, its message built once per topic and shared by
//! reference with every subscriber of that topic.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::devices::DeviceMap;
use crate::filter::{Chain, Record};
use crate::latest::{LatestPositions, Observed};
use crate::metrics::Metrics;
use crate::outbox::Pushed;
use crate::protocol;
use crate::ratelimit::LogLimiter;
use crate::record::{Malformed, Position};
use crate::registry::Registry;

/// One stream entry as read: its id and its `payload` field, if any.
#[derive(Debug)]
pub struct StreamEntry {
    pub id: String,
    pub payload: Option<Vec<u8>>,
}

/// What the record path needs of the host.
pub struct Broadcaster {
    pub chain: Chain,
    pub latest: Arc<LatestPositions>,
    pub devices: Arc<DeviceMap>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
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
}

impl Broadcaster {
    pub fn new(
        chain: Chain,
        latest: Arc<LatestPositions>,
        devices: Arc<DeviceMap>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            chain,
            latest,
            devices,
            registry,
            metrics,
            malformed_log: LogLimiter::new(Duration::from_secs(10)),
            records: Vec::new(),
            bodies: Vec::new(),
            observed: Vec::new(),
        }
    }

    /// Runs until the consumer hangs up.
    pub fn run(mut self, mut batches: mpsc::Receiver<Vec<StreamEntry>>) {
        while let Some(batch) = batches.blocking_recv() {
            self.process(batch);
        }
    }

    /// Takes one batch from the stream to the subscribers' outboxes.
    pub fn process(&mut self, batch: Vec<StreamEntry>) {
        self.metrics.records_read.inc_by(batch.len() as u64);
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        for entry in batch {
            match self.decode(entry) {
                Ok(r) => records.push(r),
                Err((id, why)) => self.skip(&id, why),
            }
        }

        self.chain.filter(&mut records);

        let mut bodies = std::mem::take(&mut self.bodies);
        bodies.clear();
        bodies.extend(records.iter().map(|r| r.position.body()));
        let mut observed = std::mem::take(&mut self.observed);
        self.latest.observe(
            records
                .iter()
                .zip(&bodies)
                .map(|(r, b)| (&*r.position.device, r.position.ts_ms, b)),
            &mut observed,
        );

        let tally = self.route(&records, &bodies, &observed);
        let m = &self.metrics;
        m.records_stale.inc_by(tally.stale);
        m.records_unrouted.inc_by(tally.unrouted);
        m.records_routed.inc_by(tally.routed);
        m.deliveries.inc_by(tally.deliveries);
        m.conflated.inc_by(tally.conflated);

        self.records = records;
        self.bodies = bodies;
        self.observed = observed;
    }

    fn decode(&self, entry: StreamEntry) -> Result<Record, (String, Malformed)> {
        let Some(payload) = entry.payload else {
            return Err((entry.id, Malformed::NoPayload));
        };
        match Position::decode(&payload) {
            Ok(position) => Ok(Record { payload, position }),
            Err(why) => Err((entry.id, why)),
        }
    }

    fn skip(&mut self, id: &str, why: Malformed) {
        crate::metrics::inc(&self.metrics.records_malformed, "reason", why.label());
        if let Some(held_back) = self.malformed_log.allow() {
            tracing::warn!(entry = id, reason = %why, held_back, "skipped a malformed stream entry");
        }
    }

    fn route(&self, records: &[Record], bodies: &[Bytes], observed: &[Observed]) -> Tally {
        let mut t = Tally::default();
        let devices = self.devices.current();
        let registry = self.registry.view();
        for ((record, body), seen) in records.iter().zip(bodies).zip(observed) {
            let device = match *seen {
                Observed::Newer(d) => d,
                Observed::Stale => {
                    t.stale += 1;
                    continue;
                }
            };
            let events = devices.events_of(&record.position.device);
            if events.is_empty() {
                t.unrouted += 1;
                continue;
            }
            let mut reached = false;
            for event in events {
                let Some(topic) = registry.topic(event) else {
                    continue;
                };
                reached = true;
                let msg = protocol::position(&topic.prefix, body);
                for outbox in topic.subscribers() {
                    match outbox.push_position(topic.idx, device, record.position.ts_ms, &msg) {
                        Pushed::Queued => t.deliveries += 1,
                        Pushed::Conflated => {
                            t.deliveries += 1;
                            t.conflated += 1;
                        }
                        Pushed::Stale | Pushed::Closed => {}
                    }
                }
            }
            if reached {
                t.routed += 1;
            }
        }
        t
    }
}
