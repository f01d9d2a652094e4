//! The host: its listeners, its background tasks, and its lifecycle from bind
//! to a drained shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth;
use crate::broadcast::Broadcaster;
use crate::broadcast::Work;
use crate::config::Config;
use crate::connection;
use crate::consumer::{Consumer, StreamConfig};
use crate::deflate;
use crate::devices;
use crate::directus::Directus;
use crate::directus::{Credential, User};
use crate::filter::{Chain, ChainSpec, reload};
use crate::flusher::Flusher;
use crate::ids::ConnId;
use crate::metrics::{Counted, Metrics};
use crate::outbox::{self, Outbox};
use crate::snapshots::Snapshots;
use crate::state::Shared;
use crate::ws::WebSocket;

/// Largest client frame accepted (close 1009 past it).
pub const MAX_CLIENT_FRAME: usize = 16 * 1024;

/// Plain HTTP responses the WebSocket listener gives, by method and path,
/// besides the upgrade paths. Only `livecast demo` (and the tests that stand
/// in for it) hands the host any, so that its map page shares the origin of
/// `/ws-live` as it would behind the TRM proxy; production serves none.
pub type Pages = Arc<dyn Fn(&Method, &str) -> Option<Response> + Send + Sync>;

/// A bound, not yet running host.
pub struct Host {
    shared: Arc<Shared>,
    chain: Chain,
    chain_fingerprint: [u8; 32],
    work: mpsc::Receiver<Work>,
    redis: redis::Client,
    ws_listener: TcpListener,
    metrics_listener: TcpListener,
    pages: Option<Pages>,
}

/// Installs the process-wide TLS crypto provider (ring) for Directus and
/// PostgreSQL connections. Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Host {
    /// Checks the configuration, loads the filter chain and binds both
    /// listeners. Nothing is connected yet: Redis, PostgreSQL and Directus
    /// may be down at start and come up later.
    pub async fn bind(config: Config) -> anyhow::Result<Host> {
        install_crypto();
        let redis = redis::Client::open(config.redis_url.as_str())
            .context("REDIS_URL is not a valid Redis URL")?;
        let db = database(&config)?;
        let metrics = Arc::new(Metrics::new());
        let spec = match &config.live_filter_chain {
            Some(path) => ChainSpec::read(path).context("LIVE_FILTER_CHAIN")?,
            None => ChainSpec::default_chain(),
        };
        let chain = Chain::load(&spec, &metrics.filter).context("LIVE_FILTER_CHAIN")?;
        tracing::info!(plugins = ?chain.names(), "filter chain loaded");
        let chain_fingerprint = reload::fingerprint(&spec);
        // A few batches of slack between Redis and the record path; past that
        // the consumer waits, and the lag shows in `livecast_consumer_lag`.
        let (work_tx, work) = mpsc::channel(4);
        let ws_addr = SocketAddr::new(config.live_ws_host, config.live_ws_port);
        let ws_listener = TcpListener::bind(ws_addr)
            .await
            .with_context(|| format!("cannot listen on {ws_addr} (LIVE_WS_HOST, LIVE_WS_PORT)"))?;
        let metrics_addr = SocketAddr::new(config.metrics_host, config.metrics_port);
        let metrics_listener = TcpListener::bind(metrics_addr).await.with_context(|| {
            format!("cannot listen on {metrics_addr} (METRICS_HOST, METRICS_PORT)")
        })?;
        let directus = Directus::new(
            config.directus_base_url.clone(),
            config.auth_timeout(),
            config.authz_timeout(),
        );
        let config_handshakes = config.live_ws_max_handshakes as usize;
        let snapshots = Arc::new(Snapshots::new(config.snapshot_share()));
        // One writer per runtime worker (tokio's default count).
        let flusher = Arc::new(Flusher::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            metrics.flush_lag_ms.clone(),
        ));
        let shared = Arc::new(Shared {
            config,
            directus,
            db,
            registry: Arc::default(),
            latest: Arc::default(),
            devices: Arc::default(),
            snapshots,
            metrics,
            shutdown: CancellationToken::new(),
            abandon: CancellationToken::new(),
            redis_ready: Arc::default(),
            coverage: Arc::default(),
            flusher,
            work: work_tx,
            connections: TaskTracker::new(),
            handshakes: tokio::sync::Semaphore::new(config_handshakes),
            next_conn: AtomicU64::new(1),
        });
        Ok(Host {
            shared,
            chain,
            chain_fingerprint,
            work,
            redis,
            ws_listener,
            metrics_listener,
            pages: None,
        })
    }

    /// Serves `pages` on the WebSocket listener (see [`Pages`]): the demo's
    /// map, not part of the embedding interface.
    pub(crate) fn set_pages(&mut self, pages: Pages) {
        self.pages = Some(pages);
    }

    /// [`Host::set_pages`], for the test fixture that stands in for the demo.
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    pub fn serve_pages(&mut self, pages: Pages) {
        self.set_pages(pages);
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    #[cfg(feature = "test-util")]
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// A read-only view of the running host's state, for tests and tools.
    #[cfg(feature = "test-util")]
    pub fn inspector(&self) -> Inspector {
        Inspector(self.shared.clone())
    }

    /// Serves until `shutdown` completes, then stops accepting, closes every
    /// client with 1001, gives them `LIVE_WS_DRAIN_TIMEOUT_MS` to drain, and
    /// returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Host {
            shared,
            chain,
            chain_fingerprint,
            work,
            redis,
            ws_listener,
            metrics_listener,
            pages,
        } = self;
        let config = &shared.config;
        let background = CancellationToken::new();
        let ws_addr = ws_listener.local_addr()?;
        let ops_addr = metrics_listener.local_addr()?;

        let stream = StreamConfig {
            stream: config.redis_telemetry_stream.clone(),
            group: config.consumer_group(),
            consumer: config.instance_id(),
            batch_size: config.live_broadcast_batch_size,
            block: config.batch_block(),
        };
        let broadcaster = Broadcaster::new(
            chain,
            shared.latest.clone(),
            shared.devices.clone(),
            shared.registry.clone(),
            shared.metrics.clone(),
            config.live_max_record_bytes as usize,
        )
        .with_chain_generation(shared.snapshots.chain_generation())
        .with_resume(shared.coverage.clone(), config.resume_slack())
        .with_deflate_min(config.live_ws_deflate_min_bytes as usize)
        .with_flusher(shared.flusher.clone());
        // Reloaded chains: one at a time is plenty (a reload takes seconds).
        let (chains_tx, chains) = mpsc::channel(1);
        let record_path = std::thread::Builder::new()
            .name("livecast-records".into())
            .spawn(move || broadcaster.run(work, chains))
            .context("cannot start the record path thread")?;
        let consumer = tokio::spawn(
            Consumer {
                client: redis.clone(),
                config: stream.clone(),
                metrics: shared.metrics.clone(),
                ready: shared.redis_ready.clone(),
                coverage: shared.coverage.clone(),
            }
            .run(shared.work.clone(), background.clone()),
        );
        for shard in 0..shared.flusher.shards() {
            tokio::spawn(shared.flusher.clone().run(shard, background.clone()));
        }
        tokio::spawn(reload::watch(
            config.live_filter_chain.clone(),
            chain_fingerprint,
            config.filter_reload_poll(),
            shared.metrics.filter.clone(),
            chains_tx,
            background.clone(),
        ));
        tokio::spawn(Consumer::lag_loop(
            redis,
            stream,
            shared.metrics.clone(),
            Duration::from_secs(5),
            background.clone(),
        ));
        tokio::spawn(devices::refresh_loop(
            shared.db.clone(),
            shared.devices.clone(),
            shared.metrics.clone(),
            config.device_refresh(),
            background.clone(),
        ));

        let ws_server = tokio::spawn(serve_websockets(ws_listener, shared.clone(), pages));
        let ops_app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(shared.clone());
        let ops_server = axum::serve(metrics_listener, ops_app)
            .with_graceful_shutdown(background.clone().cancelled_owned());
        let ops_server = tokio::spawn(async move { ops_server.await });
        tracing::info!(ws = %ws_addr, metrics = %ops_addr, "livecast is serving");

        shutdown.await;
        tracing::info!(
            connections = shared.metrics.connections.get(),
            "shutting down: closing every client with 1001"
        );
        shared.shutdown.cancel();
        shared.connections.close();
        // Each connection sends its close frame and waits for the reply up to
        // the drain timeout; a little slack covers the sending itself.
        let drain = config.drain_timeout() + Duration::from_millis(250);
        if tokio::time::timeout(drain, shared.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = shared.metrics.connections.get(),
                "drain timeout: dropping the remaining connections"
            );
            shared.abandon.cancel();
            shared.connections.wait().await;
        }
        // No connection is left to ask for a snapshot: the record path can
        // stop without one waiting behind its Stop.
        background.cancel();
        let _ = consumer.await;
        let _ = shared.work.send(Work::Stop).await;
        let _ = tokio::task::spawn_blocking(move || record_path.join()).await;
        let _ = ws_server.await;
        let _ = ops_server.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// SIGTERM (orchestrators) or SIGINT (a terminal).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How long an idle pooled connection may take to answer a ping before it
/// is replaced. PostgreSQL answers in well under a millisecond; a connection
/// that died silently (a restart or failover whose resets never reached
/// us) would otherwise hold the first query for the whole acquire timeout.
const PING_TIMEOUT: Duration = Duration::from_millis(250);

/// The read-only pool of the snapshot and the device map. Connections are
/// opened on first use: PostgreSQL may be down at start.
fn database(config: &Config) -> anyhow::Result<PgPool> {
    use sqlx::{ConnectOptions, Connection};
    let options = PgConnectOptions::from_str(&config.postgres_url)
        .context("POSTGRES_URL is not a valid PostgreSQL URL")?
        // sqlx logs slow statements at warn, SQL included; slow snapshots
        // have the host's own metric and warnings.
        .log_statements(log::LevelFilter::Debug)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
    let fresh = Arc::new(options.clone());
    Ok(PgPoolOptions::new()
        .max_connections(config.postgres_max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .before_acquire(move |conn, _| {
            let fresh = fresh.clone();
            Box::pin(async move {
                if let Ok(Ok(())) = tokio::time::timeout(PING_TIMEOUT, conn.ping()).await {
                    return Ok(true);
                }
                // Dead: a fresh connection takes its place, and dropping the
                // old one closes its socket at once. Handing it back to sqlx
                // to close would wait for a TLS goodbye a dead peer never
                // sends, for the whole acquire timeout.
                *conn = PgConnection::connect_with(&fresh).await?;
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Looks inside a running host.
#[cfg(feature = "test-util")]
#[derive(Clone)]
pub struct Inspector(Arc<Shared>);

#[cfg(feature = "test-util")]
impl Inspector {
    /// The largest number of positions any connection has queued.
    pub fn max_pending_positions(&self) -> usize {
        self.0.registry.max_pending_positions()
    }

    /// Active subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.0.registry.subscriptions()
    }

    /// Idle connections in the database pool.
    pub fn idle_db_connections(&self) -> usize {
        self.0.db.num_idle()
    }

    /// Whether the stream consumer is connected with its group in place.
    pub fn redis_ready(&self) -> bool {
        self.0.redis_ready.load(Ordering::Relaxed)
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let redis = shared.redis_ready.load(Ordering::Relaxed);
    let stopping = shared.shutdown.is_cancelled();
    let status = if redis && !stopping {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!("{{\"redis\":{redis},\"shutting_down\":{stopping}}}\n");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Why an upgrade request is refused before anything else is checked.
#[derive(Debug, PartialEq, Eq)]
enum NotUpgrade {
    /// Not a WebSocket upgrade, or not version 13: 426, naming the protocol
    /// and the version the host speaks (RFC 6455 §4.2.2).
    Required,
    /// A version 13 upgrade without exactly one `Sec-WebSocket-Key` that is
    /// the base64 of 16 bytes: a malformed handshake, 400 (§4.2.1, §11.3.1).
    BadKey,
}

/// The `Sec-WebSocket-Key` of a valid upgrade request.
fn websocket_key(method: &Method, headers: &HeaderMap) -> Result<Vec<u8>, NotUpgrade> {
    let valid = method == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    if !valid {
        return Err(NotUpgrade::Required);
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) if is_nonce(key.as_bytes()) => Ok(key.as_bytes().to_vec()),
        _ => Err(NotUpgrade::BadKey),
    }
}

/// Whether `key` is exactly the base64 of 16 bytes, as RFC 6455 §4.1 has a
/// client send. Re-encoding refuses what a decoder alone would let through
/// (padding inside the string, bits set past the 16th byte).
fn is_nonce(key: &[u8]) -> bool {
    use data_encoding::BASE64;
    if key.len() != 24 {
        return false;
    }
    let mut nonce = [0u8; 18];
    if BASE64.decode_mut(key, &mut nonce) != Ok(16) {
        return false;
    }
    let mut again = [0u8; 24];
    BASE64.encode_mut(&nonce[..16], &mut again);
    again == key
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    (status, body).into_response()
}

/// Unsent bytes a client's socket may hold in the kernel (`TCP_NOTSENT_LOWAT`):
/// a few writes' worth, so a large snapshot still goes out in a couple of
/// writes.
const SEND_LOWAT: u32 = 128 * 1024;

/// The WebSocket listener: plain HTTP/1.1 with upgrades, served by hyper
/// directly so that an upgraded connection is the bare `TcpStream` (the
/// WebSocket layer writes to it without another buffer in between). It
/// stops accepting when the host starts shutting down.
async fn serve_websockets(listener: TcpListener, shared: Arc<Shared>, pages: Option<Pages>) {
    let stop = shared.shutdown.clone();
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Positions are small and latency matters: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        // Little unsent data in the kernel: what a slow client has not taken
        // stays in its outbox, where newer positions conflate it, instead of
        // seconds of stale ones in a send buffer grown to megabytes; and the
        // socket turns writable as the client reads, which is the progress
        // the slow-client timeout measures.
        let _ = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(SEND_LOWAT);
        let stop = shared.shutdown.clone();
        let shared = shared.clone();
        let pages = pages.clone();
        // Tracked with the connections, and dropped at shutdown: a handshake
        // still waiting on Directus then gets no 101 from a stopping host.
        let tracker = shared.connections.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                let pages = pages.clone();
                async move {
                    let response = match req.uri().path() {
                        "/" | "/ws-live" => upgrade(shared, req).await,
                        path => pages
                            .and_then(|p| p(req.method(), path))
                            .unwrap_or_else(|| plain(StatusCode::NOT_FOUND, "not found\n")),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let http = hyper::server::conn::http1::Builder::new()
                // Without a timer hyper applies no header timeout, and an
                // idle or trickling connection would be held for ever.
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = http => {}
            }
        });
    }
}

async fn upgrade(shared: Arc<Shared>, mut req: Request<hyper::body::Incoming>) -> Response {
    if shared.shutdown.is_cancelled() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let key = match websocket_key(req.method(), req.headers()) {
        Ok(key) => key,
        Err(NotUpgrade::Required) => {
            return (
                StatusCode::UPGRADE_REQUIRED,
                [
                    (header::CONNECTION, "upgrade"),
                    (header::UPGRADE, "websocket"),
                    (header::SEC_WEBSOCKET_VERSION, "13"),
                ],
                "this endpoint speaks WebSocket, version 13\n",
            )
                .into_response();
        }
        Err(NotUpgrade::BadKey) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be the base64 of 16 bytes\n",
            );
        }
    };
    // Bounded: every handshake may cost a Directus call and holds request
    // buffers, so a flood of upgrades (a reconnect storm after a deploy)
    // queues here, briefly, instead of landing on Directus all at once.
    let wait = shared.config.handshake_wait();
    let Ok(Ok(_permit)) = tokio::time::timeout(wait, shared.handshakes.acquire()).await else {
        shared.metrics.handshakes_refused.inc();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many connections are opening; retry in a second\n",
        )
            .into_response();
    };
    let _in_flight = Counted::new(&shared.metrics.handshakes_in_flight);
    let extensions = if shared.config.live_ws_deflate {
        deflate::negotiate(
            req.headers()
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .map(|v| v.as_bytes()),
        )
    } else {
        None
    };
    let deflate = extensions.is_some();
    let (user, credential) = match auth::authenticate(
        req.headers(),
        &shared.config.live_ws_allowed_origins,
        &shared.directus,
        &shared.metrics,
    )
    .await
    {
        Ok(ok) => ok,
        Err(refusal) => {
            let body = match refusal {
                auth::Refusal::ForbiddenOrigin => "origin not allowed\n",
                auth::Refusal::Unauthorized => "not authenticated\n",
                auth::Refusal::Unavailable => "authentication is unavailable\n",
            };
            return plain(refusal.status(), body);
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let conn_shared = shared.clone();
    let abandon = shared.abandon.clone();
    shared.connections.spawn(async move {
        tokio::select! {
            // Past the drain timeout: dropped (its cleanup runs on drop).
            _ = abandon.cancelled() => {}
            _ = serve_upgraded(conn_shared, on_upgrade, user, credential, id, deflate) => {}
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key));
    if let Some(accepted) = extensions {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, accepted);
    }
    response
        .body(Body::empty())
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "upgrade failed\n"))
}

/// An upgraded connection, from hyper's hand-over to its close.
async fn serve_upgraded(
    conn_shared: Arc<Shared>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    user: User,
    credential: Credential,
    id: ConnId,
    deflate: bool,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    // The listener is plain TCP, so the upgraded stream is a TcpStream;
    // the WebSocket layer writes to it directly.
    let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => p,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return;
        }
    };
    // `read_buf` is a view into hyper's 8 KiB read buffer: copy what it
    // holds and let it go, or every connection would keep it.
    let hyper::upgrade::Parts { io, read_buf, .. } = parts;
    let socket = Arc::new(io.into_inner());
    let ws = WebSocket::new(socket.clone(), &read_buf, MAX_CLIENT_FRAME, deflate);
    drop(read_buf);
    let outbox = Arc::new(
        Outbox::new(
            conn_shared.config.outbox_limits(),
            Some(outbox::Socket {
                stream: socket,
                writes: conn_shared.metrics.socket_writes.clone(),
            }),
        )
        .with_deflate(deflate)
        .on_shard(conn_shared.flusher.assign()),
    );
    connection::serve(conn_shared, ws, outbox, user, credential, id).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(extra: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ]
        .iter()
        .chain(extra)
        {
            h.append(
                header::HeaderName::from_static(k),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn an_upgrade_needs_one_key_of_16_bytes() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = upgrade(&[("sec-websocket-key", key)]);
        assert_eq!(
            websocket_key(&Method::GET, &ok).as_deref(),
            Ok(key.as_bytes())
        );
        assert_eq!(websocket_key(&Method::POST, &ok), Err(NotUpgrade::Required));
        let v8 = {
            let mut h = ok.clone();
            h.insert(header::SEC_WEBSOCKET_VERSION, "8".parse().expect("8"));
            h
        };
        assert_eq!(websocket_key(&Method::GET, &v8), Err(NotUpgrade::Required));
        let bad_keys = [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25jZXMh",
            "dGhlIHNhbXBsZSBub25j",
            "AA==AAAAAAAAAAAAAAAAAAAA",
            "dGhlIHNhbXBsZSBub25jZQ-_",
            " dGhlIHNhbXBsZSBub25jZQ==",
        ];
        for k in bad_keys {
            let h = upgrade(&[("sec-websocket-key", k)]);
            assert_eq!(
                websocket_key(&Method::GET, &h),
                Err(NotUpgrade::BadKey),
                "{k:?}"
            );
        }
        let none = upgrade(&[]);
        assert_eq!(websocket_key(&Method::GET, &none), Err(NotUpgrade::BadKey));
        let two = upgrade(&[("sec-websocket-key", key), ("sec-websocket-key", key)]);
        assert_eq!(websocket_key(&Method::GET, &two), Err(NotUpgrade::BadKey));
    }
}
