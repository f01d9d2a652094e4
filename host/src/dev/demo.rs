//! `livecast demo`: the whole live path on a developer machine, with one
//! command and local Redis and PostgreSQL.
//!
//! It creates and migrates a demo database, seeds an event with a few dozen
//! devices (and a last known position each), starts the **development-only**
//! Directus stand-in, starts the host, and plays the ingestion service:
//! moving positions appended to a demo stream. It serves a live map of the
//! event at the host's own origin (`page`), and prints its URL and the
//! command that watches the feed in a terminal.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use super::directus_standin::{DirectusStandIn, StandInUser};
use crate::config::{Config, LogFormat};
use crate::server::Host;

pub const DEMO_TOKEN: &str = "demo-session-token";
pub const DEMO_EVENT: Uuid = Uuid::from_u128(0x0b6c7c1e_3a3b_4b8e_9d1a_2f6f5c4e8a10);
const DEMO_ORG: Uuid = Uuid::from_u128(0x5e0a1c2b_1111_4c3d_8e9f_000000000001);
const DEMO_USER: Uuid = Uuid::from_u128(0x5e0a1c2b_2222_4c3d_8e9f_000000000002);
const CENTER: (f64, f64) = (41.3275, 19.8187);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Redis server to use.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// PostgreSQL server to use; the demo creates a `livecast_demo` database on it.
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// WebSocket port.
    #[arg(long, default_value_t = 8081)]
    ws_port: u16,
    /// Metrics port.
    #[arg(long, default_value_t = 9090)]
    metrics_port: u16,
    /// Devices in the demo event.
    #[arg(long, default_value_t = 40)]
    devices: u32,
    /// Interval between two positions of one device, ms.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// A filter chain file to run instead of the pass-through plugin; it is
    /// hot-reloaded on change, as in production.
    #[arg(long, env = "LIVE_FILTER_CHAIN")]
    filter_chain: Option<std::path::PathBuf>,
    /// Names this demo's stream and consumer group, so that two demos can
    /// share a Redis. Default: the WebSocket port (two demos on one machine
    /// have different ports anyway).
    #[arg(long)]
    name: Option<String>,
}

/// The demo's own stream, so it never writes to a real `telemetry:teltonika`.
pub fn stream(name: &str) -> String {
    format!("livecast:demo:{name}:telemetry")
}

/// The IMEI of demo device `i`.
pub fn imei(i: u32) -> String {
    format!("35630704244{i:04}")
}

/// Runs the demo until SIGINT (Ctrl-C) or SIGTERM, then stops the host as
/// in production (its consumer group removed) and deletes the demo stream.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let name = match (&args.name, args.ws_port) {
        (Some(n), _) => n.clone(),
        (None, 0) => std::process::id().to_string(),
        (None, port) => port.to_string(),
    };
    let stream = stream(&name);
    crate::server::install_crypto();
    crate::logging::init(LogFormat::Pretty);
    let db_url = super::schema::ensure_database(&args.postgres_url, "livecast_demo").await?;
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_url)
        .await?;
    super::schema::migrate(&db).await?;
    seed(&db, args.devices).await?;

    let standin = DirectusStandIn::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
    standin.add_user(
        DEMO_TOKEN,
        StandInUser {
            id: DEMO_USER,
            email: "demo@livecast.invalid".into(),
            role: None,
            events: [DEMO_EVENT].into(),
        },
    );

    let mut config = Config::with_services(standin.url(), &args.redis_url, &db_url);
    config.live_ws_host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.metrics_host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.live_ws_port = args.ws_port;
    config.metrics_port = args.metrics_port;
    config.redis_telemetry_stream = stream.clone();
    config.instance_id = Some(format!("demo-{name}"));
    config.live_device_event_refresh_ms = 5_000;
    config.live_filter_chain = args.filter_chain.clone();
    let mut host = Host::bind(config).await?;
    host.set_pages(super::page::map_pages(Some(format!(
        "directus_session_token={DEMO_TOKEN}"
    ))));
    let ws = host.ws_addr();
    let metrics = host.metrics_addr();

    let redis = redis::Client::open(args.redis_url.as_str())?;
    let publisher = tokio::spawn(publish(
        redis.clone(),
        stream.clone(),
        args.devices,
        Duration::from_millis(args.interval_ms),
    ));

    println!();
    println!("  livecast demo — DEVELOPMENT ONLY: Directus is an in-process stand-in");
    println!();
    println!(
        "  Live map    http://{ws}{}?event={DEMO_EVENT}   <- open this in a browser",
        super::page::MAP_PATH
    );
    println!("  WebSocket   ws://{ws}/ws-live");
    println!("  metrics     http://{metrics}/metrics");
    println!(
        "  event       event:{DEMO_EVENT} ({} devices moving)",
        args.devices
    );
    println!("  session     cookie directus_session_token={DEMO_TOKEN}");
    println!("  Directus    {} (stand-in)", standin.url());
    if let Some(chain) = &args.filter_chain {
        println!("  filters     {} (reloaded on change)", chain.display());
    }
    println!();
    println!("  Watch the feed (in another terminal):");
    println!(
        "    cargo run -p livecast -- watch --url ws://{ws}/ws-live --cookie directus_session_token={DEMO_TOKEN} event:{DEMO_EVENT}"
    );
    println!();

    let result = host.run(crate::server::shutdown_signal()).await;
    publisher.abort();
    // The stream is the demo's own: nothing else reads it.
    if let Ok(mut conn) = redis.get_multiplexed_async_connection().await {
        let _: Result<i64, _> = redis::cmd("DEL").arg(&stream).query_async(&mut conn).await;
    }
    result
}

/// The demo organization, event and devices, and a last known position for
/// each device (so the first snapshot is not empty). Idempotent.
async fn seed(db: &PgPool, devices: u32) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO organizations (id, name, slug) VALUES ($1, 'Demo Racing', 'demo') ON CONFLICT DO NOTHING")
        .bind(DEMO_ORG)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO events (id, organization_id, name, slug, starts_at) \
         VALUES ($1, $2, 'Demo Rally', 'demo-rally', now()) ON CONFLICT DO NOTHING",
    )
    .bind(DEMO_EVENT)
    .bind(DEMO_ORG)
    .execute(&mut *tx)
    .await?;
    for i in 0..devices {
        let device = Uuid::from_u128(0xde71ce00_0000_4000_8000_000000000000 + u128::from(i));
        let entry = Uuid::from_u128(0xe7721e00_0000_4000_8000_000000000000 + u128::from(i));
        let link = Uuid::from_u128(0x11272c00_0000_4000_8000_000000000000 + u128::from(i));
        sqlx::query("INSERT INTO devices (id, imei, model) VALUES ($1, $2, 'FMB920') ON CONFLICT DO NOTHING")
            .bind(device)
            .bind(imei(i))
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO entries (id, event_id, status) VALUES ($1, $2, 'racing') ON CONFLICT DO NOTHING")
            .bind(entry)
            .bind(DEMO_EVENT)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO entry_devices (id, entry_id, device_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(link)
            .bind(entry)
            .bind(device)
            .execute(&mut *tx)
            .await?;
        let (lat, lon) = spot(i, 0);
        sqlx::query(
            "INSERT INTO positions (device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, attributes, codec) \
             VALUES ($1, now() - interval '1 minute', $2, $3, 100, 0, 0, 9, 0, '{\"239\": 0}', '8E') ON CONFLICT DO NOTHING",
        )
        .bind(imei(i))
        .bind(lat)
        .bind(lon)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Where device `i` is at tick `t`: cars on concentric loops around the centre.
fn spot(i: u32, t: u64) -> (f64, f64) {
    let radius = 0.01 + 0.0015 * f64::from(i % 8);
    let speed = 0.02 + 0.004 * f64::from(i % 5);
    let phase = f64::from(i) * 0.7 + speed * t as f64;
    (
        CENTER.0 + radius * phase.sin(),
        CENTER.1 + radius * 1.3 * phase.cos(),
    )
}

/// The stream payload of demo device `i` at tick `t` (`t` >= 1), fix time
/// `timestamp` (RFC 3339): where it is, heading from where it was at `t - 1`.
pub fn payload(i: u32, t: u64, timestamp: &str) -> serde_json::Value {
    let (lat, lon) = spot(i, t);
    let (plat, plon) = spot(i, t.saturating_sub(1));
    // A degree of longitude is shorter than one of latitude away from the
    // equator; without the cosine the course points off the track on a map.
    let course = ((lon - plon) * lat.to_radians().cos())
        .atan2(lat - plat)
        .to_degrees()
        .rem_euclid(360.0)
        .round();
    serde_json::json!({
        "device_id": imei(i), "timestamp": timestamp, "latitude": lat, "longitude": lon,
        "altitude": 110, "angle": course, "speed": 40 + (i % 5) * 15, "satellites": 11,
        "priority": 0, "attributes": {"239": 1, "66": 12_500 + i, "21": 4},
    })
}

/// Plays the ingestion service: one position per device per interval.
async fn publish(
    redis: redis::Client,
    stream: String,
    devices: u32,
    every: Duration,
) -> anyhow::Result<()> {
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let mut tick = tokio::time::interval(every);
    for t in 1u64.. {
        tick.tick().await;
        let now = time::OffsetDateTime::now_utc();
        let ts = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut pipe = redis::pipe();
        for i in 0..devices {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(10_000)
                .arg("*")
                .arg("ts")
                .arg(&ts)
                .arg("device_id")
                .arg(imei(i))
                .arg("codec")
                .arg("8E")
                .arg("payload")
                .arg(payload(i, t, &ts).to_string())
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "demo publisher: XADD failed");
        }
    }
    Ok(())
}
