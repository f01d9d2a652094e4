//! Settings, read from the environment with the TRM platform's names.
//!
//! clap does the parsing so that `livecast --help` lists every setting with
//! its variable and default, and a bad value stops start-up with one line
//! that names the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Every setting of the live channel.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the WebSocket listener binds.
    #[arg(long, env = "LIVE_WS_HOST", default_value = "0.0.0.0")]
    pub live_ws_host: IpAddr,

    /// Port of the WebSocket listener (upgrades at `/` and `/ws-live`).
    #[arg(long, env = "LIVE_WS_PORT", default_value_t = 8081)]
    pub live_ws_port: u16,

    /// Address the metrics and health listener binds.
    #[arg(long, env = "METRICS_HOST", default_value = "0.0.0.0")]
    pub metrics_host: IpAddr,

    /// Port of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,

    /// Interval between WebSocket pings; a peer silent for two intervals is dropped.
    #[arg(long, env = "LIVE_WS_PING_INTERVAL_MS", default_value_t = 30_000, value_parser = positive_ms)]
    pub live_ws_ping_interval_ms: u64,

    /// On shutdown, how long clients get to receive their close frame.
    #[arg(long, env = "LIVE_WS_DRAIN_TIMEOUT_MS", default_value_t = 5_000)]
    pub live_ws_drain_timeout_ms: u64,

    /// Comma-separated origins allowed to open a WebSocket; unset: same host only.
    #[arg(long, env = "LIVE_WS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub live_ws_allowed_origins: Vec<String>,

    /// Subscriptions one connection may hold.
    #[arg(long, env = "LIVE_WS_MAX_SUBSCRIPTIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub live_ws_max_subscriptions: u32,

    /// Control messages a client may have queued, in bytes, before it is closed with 1008.
    #[arg(
        long,
        env = "LIVE_WS_BACKPRESSURE_THRESHOLD_BYTES",
        default_value_t = 1_048_576
    )]
    pub live_ws_backpressure_threshold_bytes: usize,

    /// Unsent positions a connection may queue, every one kept in order,
    /// before its queue is conflated to the newest position of each device.
    #[arg(long, env = "LIVE_WS_POSITION_BUDGET", default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub live_ws_position_budget: u32,

    /// A connection writes positions at most once per interval: those that
    /// arrive within it of a write leave together at the next tick. 0: at once.
    #[arg(long, env = "LIVE_WS_FLUSH_INTERVAL_MS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub live_ws_flush_interval_ms: u64,

    /// A client whose socket accepts nothing for this long is closed with 1008.
    #[arg(long, env = "LIVE_WS_SLOW_CLIENT_TIMEOUT_MS", default_value_t = 10_000, value_parser = positive_ms)]
    pub live_ws_slow_client_timeout_ms: u64,

    /// Upgrades authenticated at once; more wait up to LIVE_WS_HANDSHAKE_WAIT_MS.
    #[arg(long, env = "LIVE_WS_MAX_HANDSHAKES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub live_ws_max_handshakes: u32,

    /// How long an upgrade waits for a handshake slot before it gets 503 with Retry-After.
    #[arg(long, env = "LIVE_WS_HANDSHAKE_WAIT_MS", default_value_t = 2_000)]
    pub live_ws_handshake_wait_ms: u64,

    /// Negotiate permessage-deflate with clients that offer it (browsers do).
    #[arg(long, env = "LIVE_WS_DEFLATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub live_ws_deflate: bool,

    /// Messages shorter than this go out uncompressed, even to clients that
    /// negotiated permessage-deflate.
    #[arg(long, env = "LIVE_WS_DEFLATE_MIN_BYTES", default_value_t = 128)]
    pub live_ws_deflate_min_bytes: u32,

    /// Directus base URL, e.g. `http://directus:8055`.
    #[arg(long, env = "DIRECTUS_BASE_URL")]
    pub directus_base_url: reqwest::Url,

    /// Timeout of the `/users/me` call made at upgrade.
    #[arg(long, env = "DIRECTUS_AUTH_TIMEOUT_MS", default_value_t = 5_000, value_parser = positive_ms)]
    pub directus_auth_timeout_ms: u64,

    /// Timeout of the `/items/events/<id>` call made at subscribe.
    #[arg(long, env = "DIRECTUS_AUTHZ_TIMEOUT_MS", default_value_t = 5_000, value_parser = positive_ms)]
    pub directus_authz_timeout_ms: u64,

    /// Redis URL, e.g. `redis://127.0.0.1:6379`.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,

    /// Stream the ingestion service appends positions to.
    #[arg(
        long,
        env = "REDIS_TELEMETRY_STREAM",
        default_value = "telemetry:teltonika"
    )]
    pub redis_telemetry_stream: String,

    /// Prefix of this instance's consumer group (the instance id follows).
    #[arg(
        long,
        env = "LIVE_BROADCAST_GROUP_PREFIX",
        default_value = "live-broadcast-"
    )]
    pub live_broadcast_group_prefix: String,

    /// Identity of this instance; names its consumer group. Default: the hostname.
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Entries read from the stream per XREADGROUP.
    #[arg(long, env = "LIVE_BROADCAST_BATCH_SIZE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub live_broadcast_batch_size: u32,

    /// How long one XREADGROUP waits for entries.
    #[arg(long, env = "LIVE_BROADCAST_BATCH_BLOCK_MS", default_value_t = 1_000, value_parser = positive_ms)]
    pub live_broadcast_batch_block_ms: u64,

    /// Largest stream entry payload accepted; larger ones are skipped and
    /// counted as malformed (`too_large`).
    #[arg(long, env = "LIVE_MAX_RECORD_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(256..))]
    pub live_max_record_bytes: u32,

    /// PostgreSQL URL (read-only use), e.g. `postgres://user@127.0.0.1/trm`.
    #[arg(long, env = "POSTGRES_URL")]
    pub postgres_url: String,

    /// Connections in the PostgreSQL pool.
    #[arg(long, env = "POSTGRES_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub postgres_max_connections: u32,

    /// Interval between reloads of the device → event map.
    #[arg(long, env = "LIVE_DEVICE_EVENT_REFRESH_MS", default_value_t = 30_000, value_parser = positive_ms)]
    pub live_device_event_refresh_ms: u64,

    /// Time the snapshot query may take before the snapshot falls back to memory.
    #[arg(long, env = "LIVE_SNAPSHOT_TIMEOUT_MS", default_value_t = 3_000, value_parser = positive_ms)]
    pub live_snapshot_timeout_ms: u64,

    /// How long a built snapshot is shared with later subscribers of the
    /// same event (0: only with those that arrive while it is being built).
    #[arg(long, env = "LIVE_SNAPSHOT_SHARE_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(..=10_000))]
    pub live_snapshot_share_ms: u64,

    /// Resume: how long before a client's `since` the host must have been
    /// reading the stream to answer with a delta, and how far before it an
    /// arrival still counts as one the client may lack.
    #[arg(long, env = "LIVE_RESUME_SLACK_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(..=600_000))]
    pub live_resume_slack_ms: u64,

    /// Filter chain file (TOML); unset: the shipped pass-through plugin alone.
    #[arg(long, env = "LIVE_FILTER_CHAIN")]
    pub live_filter_chain: Option<PathBuf>,

    /// How often the chain file (and the modules it names) is checked for changes.
    #[arg(long, env = "LIVE_FILTER_RELOAD_POLL_MS", default_value_t = 1_000, value_parser = positive_ms)]
    pub live_filter_reload_poll_ms: u64,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable lines, for a terminal.
    Pretty,
}

fn positive_ms(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

impl Config {
    /// The consumer group of this instance: prefix + instance id.
    pub fn consumer_group(&self) -> String {
        format!("{}{}", self.live_broadcast_group_prefix, self.instance_id())
    }

    /// `INSTANCE_ID`, or the hostname when it is unset.
    pub fn instance_id(&self) -> String {
        if let Some(id) = self.instance_id.as_deref().filter(|s| !s.is_empty()) {
            return id.to_owned();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "livecast".to_owned())
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.live_ws_ping_interval_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.live_ws_drain_timeout_ms)
    }
    pub fn slow_client_timeout(&self) -> Duration {
        Duration::from_millis(self.live_ws_slow_client_timeout_ms)
    }
    pub fn handshake_wait(&self) -> Duration {
        Duration::from_millis(self.live_ws_handshake_wait_ms)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.directus_auth_timeout_ms)
    }
    pub fn authz_timeout(&self) -> Duration {
        Duration::from_millis(self.directus_authz_timeout_ms)
    }
    pub fn batch_block(&self) -> Duration {
        Duration::from_millis(self.live_broadcast_batch_block_ms)
    }
    pub fn device_refresh(&self) -> Duration {
        Duration::from_millis(self.live_device_event_refresh_ms)
    }
    pub fn filter_reload_poll(&self) -> Duration {
        Duration::from_millis(self.live_filter_reload_poll_ms)
    }
    /// What one connection's outbox may hold back.
    pub fn outbox_limits(&self) -> crate::outbox::Limits {
        crate::outbox::Limits {
            control_bytes: self.live_ws_backpressure_threshold_bytes,
            positions: self.live_ws_position_budget as usize,
            flush_interval: Duration::from_millis(self.live_ws_flush_interval_ms),
        }
    }
    pub fn snapshot_timeout(&self) -> Duration {
        Duration::from_millis(self.live_snapshot_timeout_ms)
    }
    pub fn snapshot_share(&self) -> Duration {
        Duration::from_millis(self.live_snapshot_share_ms)
    }
    pub fn resume_slack(&self) -> Duration {
        Duration::from_millis(self.live_resume_slack_ms)
    }

    /// A configuration for tests and the demo: every default, with the three
    /// service addresses given. The environment is not read, so a developer's
    /// shell settings never leak into a test or the demo.
    pub fn with_services(directus: reqwest::Url, redis_url: &str, postgres_url: &str) -> Self {
        use clap::{Command, FromArgMatches};
        let cmd = Config::augment_args(Command::new("livecast")).mut_args(|a| a.env(None::<&str>));
        // Parsing a command line keeps the defaults in one place (the
        // attributes above) instead of repeating them here.
        let matches = cmd.get_matches_from([
            "livecast",
            "--directus-base-url",
            directus.as_str(),
            "--redis-url",
            redis_url,
            "--postgres-url",
            postgres_url,
        ]);
        let mut cfg = Config::from_arg_matches(&matches).expect("the defaults parse");
        cfg.directus_base_url = directus;
        cfg
    }
}
