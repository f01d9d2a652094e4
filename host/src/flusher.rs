//! The writers of positions: a few tasks that write every connection's
//! queued positions to its socket, at once for a quiet connection and on its
//! tick for a busy one, without waking the connection's own task.
//!
//! Coalescing writes (`LIVE_WS_FLUSH_INTERVAL_MS`) left each busy
//! connection with a timer of its own, and its task woke on every tick to
//! make one write: a task wake-up, a timer in the runtime's wheel and the
//! futures of the connection's `select!` rebuilt, per connection, per tick.
//! Here a connection's tick is an entry in its shard's queue: the interval
//! is the same for every connection, so ticks come due in the order they
//! were armed, and a shard needs one timer whatever its number of
//! connections. A batch of records costs one wake-up per shard.
//!
//! The connection's task still writes control messages (they go out at
//! once) and takes over a socket that would block: it waits for the socket
//! to drain, under the slow-client timeout, and a shard that finds a
//! connection blocked, closed or over its limits wakes its task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::outbox::{Flushed, Outbox};

/// Flushes a shard makes before it lets the runtime's other tasks run: a
/// batch for a thousand connections is milliseconds of writes.
const FLUSHES_PER_YIELD: usize = 64;

/// The shards, each one task of the runtime.
pub struct Flusher {
    shards: Box<[Shard]>,
    next: AtomicUsize,
    /// How late due ticks are reached (`livecast_flush_lag_ms`): writers
    /// that fall behind show here before clients notice.
    lag_ms: Histogram,
}

#[derive(Default)]
struct Shard {
    queue: Mutex<Queue>,
    notify: Notify,
}

#[derive(Default)]
struct Queue {
    /// Connections with positions to write now (they were quiet).
    now: Vec<Arc<Outbox>>,
    /// Connections waiting for their tick, in the order they come due,
    /// nearly: a tick a connection's task arms while its shard is writing
    /// a batch goes ahead of that batch's own, which then wait behind it at
    /// most the batch's length (late, never lost).
    ticks: VecDeque<(Instant, Arc<Outbox>)>,
}

impl Shard {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Only whole pushes and pops happen under the lock.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Flusher {
    /// A flusher of `shards` shards (at least one): as many as the runtime
    /// has worker threads, so that writes run on every core.
    pub fn new(shards: usize, lag_ms: Histogram) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            next: AtomicUsize::new(0),
            lag_ms,
        }
    }

    /// The shard for a new connection (in turn).
    pub fn assign(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len()
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Has the positions just queued for the (quiet) connections of
    /// `handoff` written: one lock and one wake-up per shard, for a whole
    /// batch. Leaves `handoff` empty.
    pub fn write_now(&self, handoff: &mut Handoff) {
        for (i, outboxes) in handoff.by_shard.iter_mut().enumerate() {
            if outboxes.is_empty() {
                continue;
            }
            let shard = &self.shards[i % self.shards.len()];
            shard.queue().now.append(outboxes);
            shard.notify.notify_one();
        }
    }

    /// Has a connection written again at `at`: its task wrote positions
    /// (with a control message) and armed its tick.
    pub fn tick_at(&self, outbox: &Arc<Outbox>, at: Instant) {
        let shard = &self.shards[outbox.shard() % self.shards.len()];
        shard.queue().ticks.push_back((at, outbox.clone()));
        shard.notify.notify_one();
    }

    /// Runs shard `shard` until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, shard: usize, stop: CancellationToken) {
        let shard = &self.shards[shard % self.shards.len()];
        let mut batch: Vec<Arc<Outbox>> = Vec::new();
        let mut armed: Vec<(Instant, Arc<Outbox>)> = Vec::new();
        loop {
            let now = Instant::now();
            let (next, oldest) = take_due(shard, now, &mut batch);
            if let Some(due) = oldest {
                let late = now.saturating_duration_since(due);
                self.lag_ms.observe(late.as_secs_f64() * 1000.0);
            }
            if batch.is_empty() {
                let sleep = tokio::time::sleep_until(next.unwrap_or(now).into());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = shard.notify.notified() => {}
                    _ = sleep, if next.is_some() => {}
                }
                continue;
            }
            for (i, outbox) in batch.drain(..).enumerate() {
                let (flushed, tick) = outbox.flush();
                if flushed != Flushed::Done {
                    // Blocked: its task waits for the socket from here on.
                    // Closed or over a limit: its task ends it.
                    outbox.wake();
                }
                if let Some(at) = tick {
                    armed.push((at, outbox));
                }
                if i % FLUSHES_PER_YIELD == FLUSHES_PER_YIELD - 1 {
                    tokio::task::yield_now().await;
                }
            }
            shard.queue().ticks.extend(armed.drain(..));
        }
    }
}

/// Connections a batch gave their first positions, sorted by shard as the
/// record path finds them, so that handing them over is one pass.
#[derive(Default)]
pub struct Handoff {
    by_shard: Vec<Vec<Arc<Outbox>>>,
}

impl Handoff {
    pub fn add(&mut self, outbox: &Arc<Outbox>) {
        let shard = outbox.shard();
        if self.by_shard.len() <= shard {
            self.by_shard.resize_with(shard + 1, Vec::new);
        }
        self.by_shard[shard].push(outbox.clone());
    }
}

/// Moves what is due at `now` into `batch`; when the next tick comes due,
/// and when the oldest tick taken was.
fn take_due(
    shard: &Shard,
    now: Instant,
    batch: &mut Vec<Arc<Outbox>>,
) -> (Option<Instant>, Option<Instant>) {
    let mut q = shard.queue();
    batch.append(&mut q.now);
    let mut oldest = None;
    while q.ticks.front().is_some_and(|(at, _)| *at <= now) {
        if let Some((at, o)) = q.ticks.pop_front() {
            oldest.get_or_insert(at);
            batch.push(o);
        }
    }
    (q.ticks.front().map(|(at, _)| *at), oldest)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::outbox::{Floor, Limits, Pushed, Socket};

    /// An outbox on a real socket, and the client's end of it.
    async fn connection(flush_interval: Duration) -> (Arc<Outbox>, Counter, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let writes = Counter::default();
        let limits = Limits {
            control_bytes: 1 << 20,
            positions: 64,
            flush_interval,
        };
        let socket = Socket {
            stream: Arc::new(server),
            writes: writes.clone(),
        };
        (Arc::new(Outbox::new(limits, Some(socket))), writes, client)
    }

    /// Reads until `want` bytes have come (generous cap).
    async fn read(client: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut got = vec![0; want];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the positions arrive")
            .expect("read");
        got
    }

    fn push(o: &Arc<Outbox>, device: u32, ts: i64) -> Pushed {
        o.push_position(1, device, ts, &Bytes::from_static(b"{}"), Floor::Skip)
    }

    /// A text frame of two bytes: FIN + opcode, length, payload.
    const FRAME: usize = 4;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_connection_is_written_at_its_tick_without_its_task() {
        let metrics = crate::metrics::Metrics::new();
        let flusher = Arc::new(Flusher::new(1, metrics.flush_lag_ms.clone()));
        let stop = CancellationToken::new();
        tokio::spawn(flusher.clone().run(0, stop.clone()));
        // Long enough that nothing else runs between the pushes below.
        let (o, writes, mut client) = connection(Duration::from_millis(300)).await;

        // Quiet: written at once.
        assert_eq!(push(&o, 1, 1), Pushed::Queued { first: true });
        let mut handoff = Handoff::default();
        handoff.add(&o);
        flusher.write_now(&mut handoff);
        read(&mut client, FRAME).await;
        assert_eq!(writes.get(), 1);

        // Within the interval of that write: no wake-up needed, and both
        // leave together at the tick, kept by the shard alone.
        assert_eq!(push(&o, 1, 2), Pushed::Queued { first: false });
        assert_eq!(push(&o, 2, 2), Pushed::Queued { first: false });
        read(&mut client, 2 * FRAME).await;
        assert_eq!(writes.get(), 2);
        let text = metrics.render();
        assert!(
            text.contains("livecast_flush_lag_ms_count ")
                && !text.contains("livecast_flush_lag_ms_count 0\n"),
            "the tick's lateness is observed"
        );

        // The tick after that finds nothing and ends the busy period: the
        // next position is a first one again.
        let quiet = tokio::time::timeout(Duration::from_secs(10), async {
            while o.next_tick().is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(quiet.is_ok(), "an empty tick ends the busy period");
        assert_eq!(push(&o, 1, 3), Pushed::Queued { first: true });
        assert_eq!(writes.get(), 2);
        stop.cancel();
    }
}
