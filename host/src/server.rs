//! The host: its listeners, its background tasks, and its lifecycle from bind
//! to a drained shutdown.

use std::future::Future;
use std::net::SocketAddr;
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
use sqlx::postgres::PgPoolOptions;
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
use crate::devices;
use crate::directus::Directus;
use crate::filter::{Chain, ChainSpec, reload};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::state::Shared;
use crate::ws::WebSocket;

/// Largest client frame accepted (close 1009 past it).
pub const MAX_CLIENT_FRAME: usize = 16 * 1024;

/// A bound, not yet running host.
pub struct Host {
    shared: Arc<Shared>,
    chain: Chain,
    chain_fingerprint: [u8; 32],
    work: mpsc::Receiver<Work>,
    redis: redis::Client,
    ws_listener: TcpListener,
    metrics_listener: TcpListener,
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
        let db = PgPoolOptions::new()
            .max_connections(config.postgres_max_connections)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(&config.postgres_url)
            .context("POSTGRES_URL is not a valid PostgreSQL URL")?;
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
        let shared = Arc::new(Shared {
            config,
            directus,
            db,
            registry: Arc::default(),
            latest: Arc::default(),
            devices: Arc::default(),
            metrics,
            shutdown: CancellationToken::new(),
            redis_ready: Arc::default(),
            work: work_tx,
            connections: TaskTracker::new(),
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
        })
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
        );
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
            }
            .run(shared.work.clone(), background.clone()),
        );
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

        let ws_server = tokio::spawn(serve_websockets(ws_listener, shared.clone()));
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
            tracing::warn!("drain timeout: dropping the remaining connections");
        }
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

/// The `Sec-WebSocket-Key` of a valid upgrade request.
fn websocket_key(method: &Method, headers: &HeaderMap) -> Option<Vec<u8>> {
    let valid = method == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    if !valid {
        return None;
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec())
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    (status, body).into_response()
}

/// The WebSocket listener: plain HTTP/1.1 with upgrades, served by hyper
/// directly so that an upgraded connection is the bare `TcpStream` (the
/// WebSocket layer writes to it without another buffer in between). It
/// stops accepting when the host starts shutting down.
async fn serve_websockets(listener: TcpListener, shared: Arc<Shared>) {
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
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let response = match req.uri().path() {
                        "/" | "/ws-live" => upgrade(shared, req).await,
                        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                // Without a timer hyper applies no header timeout, and an
                // idle or trickling connection would be held for ever.
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn upgrade(shared: Arc<Shared>, mut req: Request<hyper::body::Incoming>) -> Response {
    if shared.shutdown.is_cancelled() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let Some(key) = websocket_key(req.method(), req.headers()) else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, "websocket")],
            "this endpoint speaks WebSocket\n",
        )
            .into_response();
    };
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
    shared.connections.spawn(async move {
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
        let ws = WebSocket::new(socket.clone(), &read_buf, MAX_CLIENT_FRAME);
        drop(read_buf);
        let outbox = Arc::new(Outbox::new(
            conn_shared.config.live_ws_backpressure_threshold_bytes,
            Some(socket),
        ));
        connection::serve(conn_shared, ws, outbox, user, credential, id).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
        .body(Body::empty())
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "upgrade failed\n"))
}
