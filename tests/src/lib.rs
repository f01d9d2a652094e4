//! The end-to-end test harness: real Redis, real PostgreSQL, real WebSocket
//! clients, and the Directus stand-in.
//!
//! Services come from `REDIS_URL` and `POSTGRES_URL`; when those are unset
//! they are started with testcontainers (which needs Docker). Every test gets
//! its own PostgreSQL schema, its own stream key and consumer group prefix,
//! and its own Directus stand-in, so tests run in parallel.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livecast::test_util::Inspector;
use livecast::test_util::Metrics;
use livecast::test_util::directus_standin::{DirectusStandIn, StandInUser};
use livecast::{Config, Host};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub mod load;
pub mod proxy;
pub use proxy::Proxy;

/// How long a test waits for something that should happen "at once". Only
/// a failing test waits this long, so it is generous: CI runs the tests in
/// parallel on two cores.
pub const SOON: Duration = Duration::from_secs(5);
/// How long a test listens for something that must not arrive.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long a test waits for something that should happen eventually.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Redis and PostgreSQL URLs for this test process.
pub struct Services {
    pub redis_url: String,
    pub postgres_url: String,
}

/// The services: from the environment, else from testcontainers.
pub fn services() -> &'static Services {
    static S: OnceLock<Services> = OnceLock::new();
    S.get_or_init(
        || match (std::env::var("REDIS_URL"), std::env::var("POSTGRES_URL")) {
            (Ok(redis_url), Ok(postgres_url)) => Services {
                redis_url,
                postgres_url,
            },
            _ => containers(),
        },
    )
}

/// Starts Redis and PostgreSQL containers on a thread of their own that keeps
/// them alive for the rest of the test process.
fn containers() -> Services {
    use testcontainers::runners::AsyncRunner;
    use testcontainers_modules::{postgres::Postgres, redis::Redis};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let started = async {
                let redis = Redis::default().start().await?;
                let pg = Postgres::default().start().await?;
                let redis_url = format!(
                    "redis://{}:{}",
                    redis.get_host().await?,
                    redis.get_host_port_ipv4(6379).await?
                );
                let postgres_url = format!(
                    "postgres://postgres:postgres@{}:{}/postgres",
                    pg.get_host().await?,
                    pg.get_host_port_ipv4(5432).await?
                );
                Ok::<_, testcontainers::TestcontainersError>((redis, pg, redis_url, postgres_url))
            };
            match started.await {
                Ok((_redis, _pg, r, p)) => {
                    let _ = tx.send(Ok((r, p)));
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        });
    });
    match rx.recv() {
        Ok(Ok((redis_url, postgres_url))) => Services {
            redis_url,
            postgres_url,
        },
        Ok(Err(e)) => panic!(
            "REDIS_URL/POSTGRES_URL are unset and testcontainers could not start the services: {e}"
        ),
        Err(_) => panic!("the testcontainers thread died"),
    }
}

fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// One test's world: a schema, a stream, a Directus stand-in.
pub struct TestEnv {
    pub schema: String,
    /// PostgreSQL URL whose connections use this test's schema.
    pub postgres_url: String,
    pub db: PgPool,
    pub stream: String,
    pub group_prefix: String,
    pub redis: redis::aio::MultiplexedConnection,
    pub directus: DirectusStandIn,
    org: Uuid,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let stream = self.stream.clone();
        // Drop cannot await: clean up on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let s = services();
            if let Ok(client) = redis::Client::open(s.redis_url.as_str())
                && let Ok(mut c) = client.get_connection()
            {
                let _: Result<(), _> = redis::cmd("DEL").arg(&stream).query(&mut c);
            }
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    if let Ok(db) = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&s.postgres_url)
                        .await
                    {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS {schema} CASCADE"
                        )))
                        .execute(&db)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// A tracker position as the ingestion service writes it.
pub fn payload(imei: &str, ts_ms: i64, lat: f64, lon: f64) -> Value {
    json!({
        "device_id": imei,
        "timestamp": iso(ts_ms),
        "latitude": lat,
        "longitude": lon,
        "altitude": 112,
        "angle": 271,
        "speed": 63,
        "satellites": 11,
        "priority": 0,
        "attributes": {"239": 1, "66": 12841,
                       "78": {"__bigint": "18446744073709551615"},
                       "385": {"__buffer_b64": "AQID"}}
    })
}

/// Epoch ms as ISO-8601 UTC with milliseconds, like JavaScript's `toISOString`.
pub fn iso(ts_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .expect("timestamp in range");
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Now, epoch ms.
pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let s = services();
        let id = Uuid::new_v4().simple().to_string();
        let schema = format!("lc_{}", &id[..12]);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&s.postgres_url)
            .await
            .expect("connect to POSTGRES_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let postgres_url = with_search_path(&s.postgres_url, &schema);
        let db = PgPoolOptions::new()
            .max_connections(4)
            .connect(&postgres_url)
            .await
            .expect("connect to the test schema");
        livecast::test_util::schema::migrate(&db)
            .await
            .expect("migrate");
        let org = Uuid::new_v4();
        sqlx::query("INSERT INTO organizations (id, name, slug) VALUES ($1, 'Test org', $2)")
            .bind(org)
            .bind(org.to_string())
            .execute(&db)
            .await
            .expect("org");
        let redis = redis::Client::open(s.redis_url.as_str())
            .expect("REDIS_URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to REDIS_URL");
        let directus = DirectusStandIn::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))
            .await
            .expect("stand-in");
        TestEnv {
            schema,
            postgres_url,
            db,
            stream: format!("livecast-test:{id}"),
            group_prefix: format!("test-{}-", &id[..8]),
            redis,
            directus,
            org,
        }
    }

    /// A host configuration for this test: its stream, schema and stand-in,
    /// ephemeral ports, and intervals short enough for tests.
    pub fn config(&self) -> Config {
        let s = services();
        let mut c = Config::with_services(self.directus.url(), &s.redis_url, &self.postgres_url);
        c.live_ws_host = Ipv4Addr::LOCALHOST.into();
        c.metrics_host = Ipv4Addr::LOCALHOST.into();
        c.live_ws_port = 0;
        c.metrics_port = 0;
        c.redis_telemetry_stream = self.stream.clone();
        c.live_broadcast_group_prefix = self.group_prefix.clone();
        c.instance_id = Some("test".into());
        c.live_broadcast_batch_block_ms = 200;
        c.live_device_event_refresh_ms = 300;
        c.live_ws_drain_timeout_ms = 1_000;
        c
    }

    pub async fn start_host(&self) -> TestHost {
        self.start_host_with(self.config()).await
    }

    pub async fn start_host_with(&self, config: Config) -> TestHost {
        TestHost::start(config).await
    }

    /// A user with a session token who may read `events`.
    pub fn user(&self, token: &str, role: Option<Uuid>, events: &[Uuid]) -> Uuid {
        let id = Uuid::new_v4();
        self.directus.add_user(
            token,
            StandInUser {
                id,
                email: format!("{token}@test.invalid"),
                role,
                events: events.iter().copied().collect(),
            },
        );
        id
    }

    /// An event with the given devices (created when new).
    pub async fn event(&self, imeis: &[&str]) -> Uuid {
        let event = Uuid::new_v4();
        sqlx::query("INSERT INTO events (id, organization_id, name, slug) VALUES ($1, $2, 'Test event', $3)")
            .bind(event)
            .bind(self.org)
            .bind(event.to_string())
            .execute(&self.db)
            .await
            .expect("event");
        self.directus.add_event(event);
        for imei in imeis {
            self.register(event, imei).await;
        }
        event
    }

    /// Registers a device to an event (one new entry).
    pub async fn register(&self, event: Uuid, imei: &str) {
        sqlx::query("INSERT INTO devices (id, imei, model) VALUES ($1, $2, 'FMB920') ON CONFLICT (imei) DO NOTHING")
            .bind(Uuid::new_v4())
            .bind(imei)
            .execute(&self.db)
            .await
            .expect("device");
        let entry = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO entries (id, event_id, race_number, status) VALUES ($1, $2, 7, 'racing')",
        )
        .bind(entry)
        .bind(event)
        .execute(&self.db)
        .await
        .expect("entry");
        sqlx::query(
            "INSERT INTO entry_devices (id, entry_id, device_id) \
             SELECT $1, $2, id FROM devices WHERE imei = $3",
        )
        .bind(Uuid::new_v4())
        .bind(entry)
        .bind(imei)
        .execute(&self.db)
        .await
        .expect("entry device");
    }

    /// Moves a device's registration from one event to another (a tracker
    /// put in another car).
    pub async fn move_device(&self, imei: &str, from: Uuid, to: Uuid) {
        let entry = Uuid::new_v4();
        sqlx::query("INSERT INTO entries (id, event_id) VALUES ($1, $2)")
            .bind(entry)
            .bind(to)
            .execute(&self.db)
            .await
            .expect("entry");
        sqlx::query(
            "UPDATE entry_devices ed SET entry_id = $1 \
             FROM entries e, devices d \
             WHERE ed.entry_id = e.id AND ed.device_id = d.id AND e.event_id = $2 AND d.imei = $3",
        )
        .bind(entry)
        .bind(from)
        .bind(imei)
        .execute(&self.db)
        .await
        .expect("move");
    }

    /// A row as the durable-write processor would store it.
    pub async fn insert_position(&self, imei: &str, ts_ms: i64, lat: f64, lon: f64, faulty: bool) {
        sqlx::query(
            "INSERT INTO positions (device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, attributes, codec, faulty) \
             VALUES ($1, to_timestamp($2::float8 / 1000), $3, $4, 100, 90, 42, 9, 0, '{\"239\": 1}', '8E', $5)",
        )
        .bind(imei)
        .bind(ts_ms)
        .bind(lat)
        .bind(lon)
        .bind(faulty)
        .execute(&self.db)
        .await
        .expect("position");
    }

    /// `XADD` of a position, as the ingestion service does.
    pub async fn publish(&self, payload: &Value) -> String {
        let imei = payload["device_id"].as_str().unwrap_or_default().to_owned();
        let ts = payload["timestamp"].as_str().unwrap_or_default().to_owned();
        self.xadd(&[
            ("ts", &ts),
            ("device_id", &imei),
            ("codec", "8E"),
            ("payload", &payload.to_string()),
        ])
        .await
    }

    /// `XADD`s of many positions in one pipeline: a burst, as a tracker
    /// uploading its buffer after a coverage gap, or many trackers at once.
    pub async fn publish_all(&self, payloads: &[Value]) {
        self.xadd_all(payloads, false).await;
    }

    /// `XADD`s of positions in one transaction (`MULTI`/`EXEC`): the host
    /// reads them as one batch.
    pub async fn publish_batch(&self, payloads: &[Value]) {
        self.xadd_all(payloads, true).await;
    }

    async fn xadd_all(&self, payloads: &[Value], atomic: bool) {
        let mut pipe = redis::pipe();
        if atomic {
            pipe.atomic();
        }
        for p in payloads {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("*")
                .arg("ts")
                .arg(p["timestamp"].as_str().unwrap_or_default())
                .arg("device_id")
                .arg(p["device_id"].as_str().unwrap_or_default())
                .arg("codec")
                .arg("8E")
                .arg("payload")
                .arg(p.to_string())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.redis.clone())
            .await
            .expect("XADD pipeline");
    }

    /// `XADD` of arbitrary fields (for malformed entries).
    pub async fn xadd(&self, fields: &[(&str, &str)]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query_async(&mut self.redis.clone())
            .await
            .expect("XADD")
    }
}

/// The path of a shipped plugin's module, e.g. `plugin("drop-device")`.
pub fn plugin(name: &str) -> String {
    format!(
        "{}/plugin_{}.wasm",
        livecast::test_util::PLUGIN_DIR,
        name.replace('-', "_")
    )
}

impl TestEnv {
    /// Writes a chain file for this test and returns its path.
    pub fn chain_file(&self, toml: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("livecast-{}", self.schema));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("chain.toml");
        // Write then rename, as an operator's deploy would, so a reload never
        // reads a half-written file.
        let tmp = dir.join("chain.toml.tmp");
        std::fs::write(&tmp, toml).expect("write chain");
        std::fs::rename(&tmp, &path).expect("rename chain");
        path
    }

    /// A host running the given chain.
    pub async fn start_host_with_chain(&self, toml: &str) -> TestHost {
        let mut config = self.config();
        config.live_filter_chain = Some(self.chain_file(toml));
        config.live_filter_reload_poll_ms = 100;
        self.start_host_with(config).await
    }
}

/// A host running in this process.
pub struct TestHost {
    pub ws_url: String,
    pub metrics_url: String,
    pub metrics: Arc<Metrics>,
    pub inspector: Inspector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestHost {
    /// Starts a host and waits until it reads the stream and has loaded the
    /// device map, so that a test's first record is not missed.
    pub async fn start(config: Config) -> TestHost {
        TestHost::run(Host::bind(config).await.expect("bind host")).await
    }

    /// Runs a host already bound (e.g. one given pages to serve) and waits
    /// until it is ready, as [`TestHost::start`] does.
    pub async fn run(host: Host) -> TestHost {
        let ws_url = format!("ws://{}/ws-live", host.ws_addr());
        let metrics_url = format!("http://{}", host.metrics_addr());
        let metrics = host.metrics();
        let inspector = host.inspector();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(host.run(async {
            let _ = stopped.await;
        }));
        let h = TestHost {
            ws_url,
            metrics_url,
            metrics,
            inspector,
            stop: Some(stop),
            task: Some(task),
        };
        let ready = eventually(|| async {
            h.inspector.redis_ready()
                && Metrics::count(&h.metrics.device_map_refreshes, "result", "ok") > 0
        })
        .await;
        assert!(ready, "host did not become ready");
        h
    }

    /// Shuts the host down (as SIGTERM would) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("host task").expect("host run");
        }
    }

    pub async fn connect(&self, cookie: &str) -> Client {
        Client::connect(&self.ws_url, &[("cookie", cookie)])
            .await
            .unwrap_or_else(|status| panic!("upgrade refused with {status}"))
    }

    /// The metrics page as served.
    pub async fn scrape(&self) -> String {
        reqwest::get(format!("{}/metrics", self.metrics_url))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `cond` until it holds or [`EVENTUALLY`] passes.
pub async fn eventually<F, Fut>(mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A WebSocket client, like the SPA's.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Close(u16),
    Dropped,
}

impl Client {
    /// Opens a WebSocket with the given headers; `Err(status)` when the
    /// upgrade is refused.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, u16> {
        let mut req = url.into_client_request().expect("url");
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                    .expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("connect: {e}"),
        }
    }

    pub async fn send(&mut self, frame: &Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(Utf8Bytes::from(text)))
            .await
            .expect("send");
    }

    /// Subscribes and returns the reply (`subscribed` or `error`).
    pub async fn subscribe(&mut self, event: Uuid, id: &str) -> Value {
        self.send(&json!({"type": "subscribe", "topic": format!("event:{event}"), "id": id}))
            .await;
        self.reply(id).await
    }

    /// The next control message answering request `id`, skipping positions.
    pub async fn reply(&mut self, id: &str) -> Value {
        loop {
            let msg = self
                .next()
                .await
                .unwrap_or_else(|| panic!("no reply to {id}"));
            if msg["type"] != "position" {
                assert_eq!(msg["id"], id, "replies come in request order: {msg}");
                return msg;
            }
        }
    }

    /// The next JSON message within [`SOON`].
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(SOON).await
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(Message::Text(t)) => {
                    return Some(serde_json::from_str(&t).expect("JSON text frame"));
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Positions received within `wait`.
    pub async fn positions_within(&mut self, wait: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["type"] == "position" {
                    out.push(v);
                }
            }
        }
        out
    }

    /// Positions received until `done` holds for those received so far (or
    /// `wait` passes), then any that follow within [`QUIET`]. A test waits
    /// as long as a loaded machine needs for what must arrive, and still
    /// sees what must not (a duplicate, a stale record) if the host sends it
    /// right behind.
    pub async fn positions_until(
        &mut self,
        wait: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while !done(&out) {
            match self
                .next_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await
            {
                Some(v) if v["type"] == "position" => out.push(v),
                Some(_) => {}
                None => return out,
            }
        }
        out.extend(self.positions_within(QUIET).await);
        out
    }

    /// The `ts` of every position received until `device`'s position at
    /// `ts` arrives (see [`Client::positions_until`]).
    pub async fn ts_until(&mut self, device: &str, ts: i64) -> Vec<Value> {
        self.positions_until(SOON, |got| has(got, device, ts))
            .await
            .into_iter()
            .map(|p| p["ts"].clone())
            .collect()
    }

    /// Reads until the connection ends; the close code the host sent.
    pub async fn ended(&mut self, wait: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection still open after {wait:?}"),
                Ok(Some(Ok(Message::Close(Some(CloseFrame { code, .. }))))) => {
                    return Ended::Close(code.into());
                }
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => {
                    return Ended::Dropped;
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// A cookie carrying a Directus session token.
/// Whether `got` holds a position of `device` at `ts`.
pub fn has(got: &[Value], device: &str, ts: i64) -> bool {
    got.iter()
        .any(|p| p["deviceId"] == device && p["ts"].as_i64() == Some(ts))
}

pub fn cookie(token: &str) -> String {
    format!("directus_session_token={token}; theme=dark")
}
