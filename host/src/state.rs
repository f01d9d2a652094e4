//! What the listeners, the connections and the background tasks share: the
//! settings, the clients of the three services, and the structures the
//! record path and the control path meet in (see docs/architecture.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::Work;
use crate::config::Config;
use crate::devices::DeviceMap;
use crate::directus::Directus;
use crate::flusher::Flusher;
use crate::latest::LatestPositions;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::resume::Coverage;
use crate::snapshots::Snapshots;

/// State shared by the listeners, the connections and the background tasks.
pub struct Shared {
    pub config: Config,
    pub directus: Directus,
    pub db: PgPool,
    pub registry: Arc<Registry>,
    pub latest: Arc<LatestPositions>,
    pub devices: Arc<DeviceMap>,
    /// Snapshots being built or shared, per event.
    pub snapshots: Arc<Snapshots>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the host starts shutting down.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain timeout has passed: what still runs is
    /// dropped.
    pub abandon: CancellationToken,
    pub redis_ready: Arc<AtomicBool>,
    /// Since when the stream has been read without a break (resumes).
    pub coverage: Arc<Coverage>,
    /// The writers of positions (one shard per runtime worker).
    pub flusher: Arc<Flusher>,
    /// The record path's queue: batches and snapshots to filter.
    pub work: mpsc::Sender<Work>,
    /// Upgrades being authenticated (`LIVE_WS_MAX_HANDSHAKES`).
    pub handshakes: tokio::sync::Semaphore,
    /// Every connection's task, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    pub next_conn: AtomicU64,
}
