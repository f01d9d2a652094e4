//! One snapshot per event, not per subscriber.
//!
//! A reconnect storm (every spectator of an event subscribing within a
//! second, as after a deploy) asks for the same snapshot thousands of times.
//! [`Snapshots`] makes it one query per event: subscribes that arrive while
//! a snapshot is being built wait for it (single flight), and those that
//! arrive within `LIVE_SNAPSHOT_SHARE_MS` after it was built get it too
//! (see [`crate::snapshot`] for what is shared and how each subscriber
//! still ends exact).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::broadcast::{BuildJob, DeltaJob, ServeJob, Served, Work};
use crate::ids::TopicIdx;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::registry::Identity;
use crate::resume::Full;
use crate::snapshot::{EventSnapshot, SNAPSHOT_SQL, View};

/// Where a subscriber's snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its subscribe started the query.
    Query,
    /// It joined a query another subscribe started.
    Flight,
    /// It was built within the sharing window.
    Cache,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Query => "query",
            Source::Flight => "flight",
            Source::Cache => "cache",
        }
    }
}

enum Slot {
    Building(watch::Receiver<Option<Arc<EventSnapshot>>>),
    Ready(Arc<EventSnapshot>),
}

/// The snapshots being built or recently built, per event.
pub struct Snapshots {
    share_for: Duration,
    slots: Mutex<FxHashMap<Uuid, Slot>>,
    chain: Arc<AtomicU64>,
}

impl Snapshots {
    /// Snapshots served for `share_for` after they were built (zero: only
    /// to subscribes that arrive while one is being built).
    pub fn new(share_for: Duration) -> Self {
        Self {
            share_for,
            slots: Mutex::default(),
            chain: Arc::default(),
        }
    }

    /// Bumped by the record path each time it swaps in a reloaded chain, so
    /// that a snapshot filtered by the previous chain is not shared again.
    pub fn chain_generation(&self) -> Arc<AtomicU64> {
        self.chain.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FxHashMap<Uuid, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot of `event`: the one being built, or one built within
    /// the sharing window by the current chain, or else a new one from
    /// `build`. A build runs as a task of its own (in `tasks`, until `stop`)
    /// so that a subscriber that goes away does not take the others'
    /// snapshot with it. `None` only when the build was stopped.
    pub async fn get<B, F>(
        self: &Arc<Self>,
        event: Uuid,
        tasks: &TaskTracker,
        stop: &CancellationToken,
        build: B,
    ) -> Option<(Arc<EventSnapshot>, Source)>
    where
        B: FnOnce() -> F,
        F: Future<Output = EventSnapshot> + Send + 'static,
    {
        let (mut built, source) = {
            let mut slots = self.lock();
            let chain = self.chain.load(Ordering::Acquire);
            match slots.get(&event) {
                Some(Slot::Ready(s)) if s.chain == chain => {
                    return Some((s.clone(), Source::Cache));
                }
                Some(Slot::Building(rx)) => (rx.clone(), Source::Flight),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    slots.insert(event, Slot::Building(rx.clone()));
                    tasks.spawn(self.clone().flight(event, tx, build(), stop.clone()));
                    (rx, Source::Query)
                }
            }
        };
        let snapshot = built.wait_for(Option::is_some).await.ok()?.clone()?;
        Some((snapshot, source))
    }

    /// Builds one snapshot, hands it to everyone waiting, keeps it for the
    /// sharing window, then forgets it.
    async fn flight(
        self: Arc<Self>,
        event: Uuid,
        tx: watch::Sender<Option<Arc<EventSnapshot>>>,
        build: impl Future<Output = EventSnapshot>,
        stop: CancellationToken,
    ) {
        // However this ends (stopped, or a panic in `build`), the slot does
        // not outlive it: the next subscribe starts a new flight.
        let forget = Forget {
            snapshots: &self,
            event,
            tx: &tx,
        };
        let snapshot = tokio::select! {
            s = build => Arc::new(s),
            _ = stop.cancelled() => return,
        };
        // A snapshot from memory alone is not kept: the next subscribe asks
        // the database again, which may be back.
        let keep = !snapshot.from_memory && !self.share_for.is_zero();
        {
            let mut slots = self.lock();
            if matches!(slots.get(&event), Some(Slot::Building(rx)) if rx.same_channel(&tx.subscribe()))
            {
                if keep {
                    slots.insert(event, Slot::Ready(snapshot.clone()));
                } else {
                    slots.remove(&event);
                }
            }
        }
        std::mem::forget(forget);
        tx.send_replace(Some(snapshot.clone()));
        if !keep {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(self.share_for) => {}
            _ = stop.cancelled() => {}
        }
        let mut slots = self.lock();
        if matches!(slots.get(&event), Some(Slot::Ready(s)) if Arc::ptr_eq(s, &snapshot)) {
            slots.remove(&event);
        }
    }

    /// Events with a snapshot being built or kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Removes a flight's slot if the flight ends without a snapshot.
struct Forget<'a> {
    snapshots: &'a Snapshots,
    event: Uuid,
    tx: &'a watch::Sender<Option<Arc<EventSnapshot>>>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut slots = self.snapshots.lock();
        if matches!(slots.get(&self.event), Some(Slot::Building(rx)) if rx.same_channel(&self.tx.subscribe()))
        {
            slots.remove(&self.event);
        }
    }
}

/// What a snapshot is built from.
#[derive(Clone)]
pub struct Sources {
    pub db: PgPool,
    pub timeout: Duration,
    pub work: mpsc::Sender<Work>,
    pub metrics: Arc<Metrics>,
}

/// Queries the database for `event` and has the record path build its
/// snapshot.
pub async fn build(event: Uuid, s: Sources) -> EventSnapshot {
    let m = &s.metrics;
    let started = Instant::now();
    m.snapshot_queries.inc();
    let query = sqlx::query_scalar::<_, String>(SNAPSHOT_SQL)
        .bind(event)
        .fetch_all(&s.db);
    let rows = match tokio::time::timeout(s.timeout, query).await {
        Ok(Ok(rows)) => {
            m.snapshot_latency_ms
                .observe(started.elapsed().as_secs_f64() * 1000.0);
            Some(rows.into_iter().map(Bytes::from).collect())
        }
        Ok(Err(e)) => {
            tracing::warn!(%event, error = %e, "snapshot query failed; serving the snapshot from memory");
            None
        }
        Err(_) => {
            tracing::warn!(%event, timeout_ms = s.timeout.as_millis() as u64, "snapshot query timed out; serving the snapshot from memory");
            None
        }
    };
    let (reply, answer) = oneshot::channel();
    let job = BuildJob {
        event,
        from_database: rows,
        reply,
    };
    match s.work.send(Work::Snapshot(job)).await {
        Ok(()) => answer.await.unwrap_or_else(|_| EventSnapshot::empty(event)),
        // Shutting down: the record path is gone.
        Err(_) => EventSnapshot::empty(event),
    }
}

/// Has the record path serve `snapshot` to one subscriber of `topic`: its
/// audience's view, and the catch-up positions queued into its outbox
/// (whose topic is held).
pub async fn serve(
    snapshot: Arc<EventSnapshot>,
    topic: TopicIdx,
    identity: &Arc<Identity>,
    outbox: &Arc<Outbox>,
    work: &mpsc::Sender<Work>,
) -> Served {
    let (reply, answer) = oneshot::channel();
    let job = ServeJob {
        snapshot,
        topic,
        identity: identity.clone(),
        outbox: outbox.clone(),
        reply,
    };
    let served = match work.send(Work::Serve(job)).await {
        Ok(()) => answer.await.ok(),
        Err(_) => None,
    };
    // Shutting down: nothing to send but the reply.
    served.unwrap_or_else(|| Served {
        view: Arc::new(View::new(&[])),
        caught_up: 0,
    })
}

/// Has the record path answer a resume (`since`) of one subscriber, whose
/// topic is held, from memory; `Err` when only the full snapshot will do.
pub async fn delta(
    event: Uuid,
    since: i64,
    identity: &Arc<Identity>,
    deflate: bool,
    work: &mpsc::Sender<Work>,
) -> Result<Served, Full> {
    let (reply, answer) = oneshot::channel();
    let job = DeltaJob {
        event,
        since,
        identity: identity.clone(),
        deflate,
        reply,
    };
    if work.send(Work::Delta(job)).await.is_err() {
        // Shutting down: the full path answers with what it can.
        return Err(Full::NotCovered);
    }
    answer.await.unwrap_or(Err(Full::NotCovered))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    struct Harness {
        snapshots: Arc<Snapshots>,
        tasks: TaskTracker,
        stop: CancellationToken,
        builds: Arc<AtomicUsize>,
        /// Builds wait for this before finishing.
        gate: Arc<tokio::sync::Notify>,
    }

    impl Harness {
        fn new(share_for: Duration) -> Self {
            Self {
                snapshots: Arc::new(Snapshots::new(share_for)),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
                builds: Arc::default(),
                gate: Arc::default(),
            }
        }

        /// A subscribe's `get`; builds wait for the gate when `gated`.
        fn get(
            &self,
            event: Uuid,
            gated: bool,
            from_memory: bool,
        ) -> impl Future<Output = Option<(Arc<EventSnapshot>, Source)>> + use<> {
            let (snapshots, tasks, stop) = (
                self.snapshots.clone(),
                self.tasks.clone(),
                self.stop.clone(),
            );
            let (builds, gate) = (self.builds.clone(), self.gate.clone());
            async move {
                snapshots
                    .get(event, &tasks, &stop, move || async move {
                        builds.fetch_add(1, Ordering::SeqCst);
                        if gated {
                            gate.notified().await;
                        }
                        EventSnapshot::new(event, Vec::new(), from_memory, 0)
                    })
                    .await
            }
        }
    }

    #[tokio::test]
    async fn concurrent_subscribes_share_one_build_and_later_ones_the_cache() {
        let h = Harness::new(Duration::from_secs(60));
        let event = Uuid::new_v4();
        let waiting: Vec<_> = (0..10)
            .map(|_| tokio::spawn(h.get(event, true, false)))
            .collect();
        tokio::task::yield_now().await;
        while h.builds.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        h.gate.notify_waiters();
        let mut sources = Vec::new();
        let mut first: Option<Arc<EventSnapshot>> = None;
        for w in waiting {
            let (s, source) = w.await.expect("task").expect("a snapshot");
            assert!(first.get_or_insert_with(|| s.clone()).event == s.event);
            assert!(
                Arc::ptr_eq(first.as_ref().expect("set"), &s),
                "the same one"
            );
            sources.push(source);
        }
        assert_eq!(h.builds.load(Ordering::SeqCst), 1);
        assert_eq!(sources.iter().filter(|s| **s == Source::Query).count(), 1);
        assert!(sources.iter().all(|s| *s != Source::Cache));
        let (s, source) = h.get(event, false, false).await.expect("cached");
        assert_eq!(source, Source::Cache);
        assert!(Arc::ptr_eq(first.as_ref().expect("set"), &s));
        assert_eq!(h.builds.load(Ordering::SeqCst), 1);
        // Another event is another query.
        h.get(Uuid::new_v4(), false, false).await.expect("built");
        assert_eq!(h.builds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_snapshot_is_forgotten_after_the_window() {
        let h = Harness::new(Duration::from_millis(50));
        let event = Uuid::new_v4();
        h.get(event, false, false).await.expect("built");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while h.snapshots.len() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(h.snapshots.len(), 0, "nothing kept past the window");
        assert_eq!(
            h.get(event, false, false).await.map(|(_, s)| s),
            Some(Source::Query)
        );
        assert_eq!(h.builds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn without_a_window_only_a_flight_is_shared() {
        let h = Harness::new(Duration::ZERO);
        let event = Uuid::new_v4();
        h.get(event, false, false).await.expect("built");
        assert_eq!(h.snapshots.len(), 0);
        assert_eq!(
            h.get(event, false, false).await.map(|(_, s)| s),
            Some(Source::Query)
        );
        assert_eq!(h.builds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_snapshot_from_memory_alone_is_not_kept() {
        let h = Harness::new(Duration::from_secs(60));
        let event = Uuid::new_v4();
        h.get(event, false, true).await.expect("built");
        assert_eq!(
            h.get(event, false, false).await.map(|(_, s)| s),
            Some(Source::Query)
        );
        assert_eq!(
            h.get(event, false, false).await.map(|(_, s)| s),
            Some(Source::Cache)
        );
    }

    #[tokio::test]
    async fn a_reloaded_chain_is_not_served_an_older_snapshot() {
        let h = Harness::new(Duration::from_secs(60));
        let event = Uuid::new_v4();
        h.get(event, false, false).await.expect("built");
        h.snapshots
            .chain_generation()
            .fetch_add(1, Ordering::AcqRel);
        assert_eq!(
            h.get(event, false, false).await.map(|(_, s)| s),
            Some(Source::Query)
        );
    }

    #[tokio::test]
    async fn the_subscriber_that_started_a_build_may_leave_without_stopping_it() {
        let h = Harness::new(Duration::from_secs(60));
        let event = Uuid::new_v4();
        let starter = tokio::spawn(h.get(event, true, false));
        while h.builds.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let follower = tokio::spawn(h.get(event, true, false));
        tokio::task::yield_now().await;
        starter.abort();
        let _ = starter.await;
        h.gate.notify_waiters();
        let (_, source) = follower.await.expect("task").expect("a snapshot");
        assert_eq!(source, Source::Flight);
        assert_eq!(h.builds.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stopped_build_leaves_no_slot_behind() {
        let h = Harness::new(Duration::from_secs(60));
        let event = Uuid::new_v4();
        let waiting = tokio::spawn(h.get(event, true, false));
        while h.builds.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        h.stop.cancel();
        assert!(waiting.await.expect("task").is_none());
        h.tasks.close();
        h.tasks.wait().await;
        assert_eq!(h.snapshots.len(), 0);
    }
}
