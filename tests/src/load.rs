//! The load harness: many authenticated WebSocket clients against a real
//! `livecast` process, a publisher at a fixed rate, and an account of every
//! delivery.
//!
//! Each published record carries its device's sequence number and its
//! publish time (as IO attributes `9998` and `9999`, which the host passes
//! through untouched), so every client can check that it received each
//! record of each device exactly once, in order, and how long it took.
//! Host memory and CPU are read from `/proc` of the host process alone.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use livecast::test_util::directus_standin::{DirectusStandIn, StandInUser};
use serde::Serialize;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpSocket;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

/// The session token every harness client uses.
pub const TOKEN: &str = "load-token";
const SEQ_KEY: &[u8] = b"\"9998\":";
const SENT_KEY: &[u8] = b"\"9999\":";
const DEVICE_KEY: &[u8] = b"\"deviceId\":\"";

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    /// WebSocket clients, all subscribed to every event.
    pub clients: usize,
    /// Of those, how many never read after `subscribed`.
    pub stuck_clients: usize,
    pub events: usize,
    pub devices_per_event: usize,
    /// Records per second published, all devices together (0: idle).
    pub rate: u32,
    pub duration: Duration,
    /// Every client negotiates permessage-deflate (as browsers do) and
    /// inflates what comes compressed.
    pub deflate: bool,
}

/// The result of one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub deflate: bool,
    pub clients: usize,
    pub stuck_clients: usize,
    pub connections_held: usize,
    pub rate: u32,
    pub seconds: f64,
    pub records_published: u64,
    pub deliveries_expected: u64,
    pub deliveries_received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub deliveries_per_s: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
    pub host_rss_kib_before_clients: u64,
    pub host_rss_kib_with_clients: u64,
    pub host_rss_kib_peak: u64,
    pub host_rss_kib_end: u64,
    pub rss_bytes_per_connection: f64,
    pub host_cpu_percent: f64,
    /// Host CPU time per delivery received, microseconds.
    pub host_cpu_us_per_delivery: f64,
    /// Socket writes the host made (0 for a host without the counter).
    pub host_socket_writes: u64,
    /// Bytes the clients read off their sockets, per delivery received
    /// (frames, compressed or not, and the snapshots).
    pub wire_bytes_per_delivery: f64,
    pub conflated: u64,
    pub host_deliveries: u64,
}

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Target {
    pub redis_url: String,
    /// PostgreSQL URL of the database (or schema) the host reads.
    pub postgres_url: String,
    pub stream: String,
    /// The host binary to run.
    pub host_bin: PathBuf,
    /// `LIVE_FILTER_CHAIN`, if any.
    pub chain: Option<PathBuf>,
}

/// Now, epoch microseconds.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The IMEI of device `d` of event `e`.
pub fn imei(e: usize, d: usize) -> String {
    format!("35{:05}{:08}", e, d)
}

/// Device index from an IMEI made by [`imei`].
fn device_index(imei: &[u8], devices_per_event: usize) -> Option<usize> {
    let s = std::str::from_utf8(imei).ok()?;
    let (e, d) = (
        s.get(2..7)?.parse::<usize>().ok()?,
        s.get(7..)?.parse::<usize>().ok()?,
    );
    Some(e * devices_per_event + d)
}

/// Fixed event ids, so a kept database can be reused between runs.
pub fn event_id(e: usize) -> Uuid {
    Uuid::from_u128(0x10ad_0000_0000_4000_8000_0000_0000_0000 + e as u128)
}

/// Creates events `events` with `devices_per_event` devices each (idempotent).
pub async fn seed(
    db: &PgPool,
    events: std::ops::Range<usize>,
    devices_per_event: usize,
) -> anyhow::Result<()> {
    let org = Uuid::from_u128(0x10ad_0000_0000_4000_8000_ffff_0000_0000);
    sqlx::query("INSERT INTO organizations (id, name, slug) VALUES ($1, 'Load', 'load') ON CONFLICT DO NOTHING")
        .bind(org)
        .execute(db)
        .await?;
    for e in events {
        sqlx::query("INSERT INTO events (id, organization_id, name, slug) VALUES ($1, $2, 'Load', $3) ON CONFLICT DO NOTHING")
            .bind(event_id(e))
            .bind(org)
            .bind(format!("load-{e}"))
            .execute(db)
            .await?;
        // One entry per device; ids derived from the IMEI so reruns are no-ops.
        sqlx::query(
            "INSERT INTO devices (id, imei, model) \
             SELECT md5('dev' || imei)::uuid, imei, 'FMB920' \
             FROM (SELECT '35' || lpad($1::text, 5, '0') || lpad(d::text, 8, '0') AS imei FROM generate_series(0, $2 - 1) d) x \
             ON CONFLICT DO NOTHING",
        )
        .bind(e as i64)
        .bind(devices_per_event as i64)
        .execute(db)
        .await?;
        sqlx::query(
            "INSERT INTO entries (id, event_id, status) \
             SELECT md5('entry' || $1::text || d::text)::uuid, $2, 'racing' FROM generate_series(0, $3 - 1) d \
             ON CONFLICT DO NOTHING",
        )
        .bind(e as i64)
        .bind(event_id(e))
        .bind(devices_per_event as i64)
        .execute(db)
        .await?;
        sqlx::query(
            "INSERT INTO entry_devices (id, entry_id, device_id) \
             SELECT md5('link' || $1::text || d::text)::uuid, md5('entry' || $1::text || d::text)::uuid, \
                    md5('dev' || '35' || lpad($1::text, 5, '0') || lpad(d::text, 8, '0'))::uuid \
             FROM generate_series(0, $2 - 1) d ON CONFLICT DO NOTHING",
        )
        .bind(e as i64)
        .bind(devices_per_event as i64)
        .execute(db)
        .await?;
    }
    Ok(())
}

/// A running host process.
pub struct HostProcess {
    pub child: Child,
    pub pid: u32,
    pub ws_url: String,
    pub metrics_url: String,
}

impl HostProcess {
    /// Starts the host and waits until it reads the stream.
    pub async fn start(
        t: &Target,
        directus: &DirectusStandIn,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<HostProcess> {
        let mut cmd = Command::new(&t.host_bin);
        cmd.env("DIRECTUS_BASE_URL", directus.url().as_str())
            .env("REDIS_URL", &t.redis_url)
            .env("POSTGRES_URL", &t.postgres_url)
            .env("REDIS_TELEMETRY_STREAM", &t.stream)
            .env("INSTANCE_ID", format!("load-{}", std::process::id()))
            .env("LIVE_WS_HOST", "127.0.0.1")
            .env("LIVE_WS_PORT", "0")
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", "0")
            .env("LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                "warn,livecast::server=info,livecast::consumer=info",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(c) = &t.chain {
            cmd.env("LIVE_FILTER_CHAIN", c);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        // LIVECAST_BENCH_HOST_ENV="K=V K2=V2": for the host process alone
        // (another allocator by LD_PRELOAD, glibc's MALLOC_ARENA_MAX…).
        for kv in std::env::var("LIVECAST_BENCH_HOST_ENV")
            .unwrap_or_default()
            .split_whitespace()
        {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("host exited at once"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut ws, mut metrics, mut reading) = (None, None, false);
        let started = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "livecast is serving" {
                    ws = v["ws"].as_str().map(str::to_owned);
                    metrics = v["metrics"].as_str().map(str::to_owned);
                }
                reading |= v["message"] == "reading the telemetry stream";
                if reading && ws.is_some() {
                    return true;
                }
            }
            false
        })
        .await;
        if started != Ok(true) {
            anyhow::bail!("the host did not start");
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (Some(ws), Some(metrics)) = (ws, metrics) else {
            anyhow::bail!("the host did not log its addresses");
        };
        Ok(HostProcess {
            child,
            pid,
            ws_url: format!("ws://{ws}/ws-live"),
            metrics_url: format!("http://{metrics}"),
        })
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_of(self.pid)
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return 0.0;
        };
        // Fields after the command name, which ends with ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of /proc/pid/stat; here 11, 12.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// A counter from `/metrics`.
    pub async fn counter(&self, name: &str) -> u64 {
        let Ok(resp) = reqwest::get(format!("{}/metrics", self.metrics_url)).await else {
            return 0;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// What one client saw.
#[derive(Default)]
pub struct Account {
    /// Last sequence number received per device (index), 0 = none.
    last: Vec<u64>,
    pub received: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub latency: Option<Histogram<u64>>,
    /// Bytes read off the socket.
    pub bytes: u64,
}

impl Account {
    pub fn new(devices: usize) -> Self {
        Self {
            last: vec![0; devices],
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).ok(),
            ..Self::default()
        }
    }

    /// Accounts one `position` frame; returns false when it is not one of
    /// the harness's records.
    pub fn position(&mut self, frame: &[u8], devices_per_event: usize, now_us: u64) -> bool {
        let (Some(device), Some(seq)) = (
            field_str(frame, DEVICE_KEY).and_then(|d| device_index(d, devices_per_event)),
            field_u64(frame, SEQ_KEY),
        ) else {
            return false;
        };
        let Some(last) = self.last.get_mut(device) else {
            return false;
        };
        self.received += 1;
        match seq.cmp(last) {
            std::cmp::Ordering::Equal => self.duplicated += 1,
            std::cmp::Ordering::Less => self.out_of_order += 1,
            std::cmp::Ordering::Greater => *last = seq,
        }
        if let (Some(sent), Some(h)) = (field_u64(frame, SENT_KEY), self.latency.as_mut()) {
            let _ = h.record(now_us.saturating_sub(sent).max(1));
        }
        true
    }

    /// Records this client missed, given how many were published per device
    /// (sequence numbers start at 1 and have no gaps).
    pub fn lost(&self, published: &[u64]) -> u64 {
        published
            .iter()
            .zip(&self.last)
            .map(|(&p, &last)| p.saturating_sub(last))
            .sum::<u64>()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn field_u64(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(frame, key)? + key.len();
    let digits: &[u8] = &frame[at..];
    let end = digits
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

fn field_str<'a>(frame: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = find(frame, key)? + key.len();
    let end = frame[at..].iter().position(|&c| c == b'"')?;
    Some(&frame[at..at + end])
}

/// A payload for device `d` of event `e`, sequence `seq`.
pub fn payload(e: usize, d: usize, seq: u64, base_ms: u64) -> String {
    let lat = 41.3 + (seq as f64) * 1e-5;
    let lon = 19.8 + (d as f64) * 1e-4;
    let ts = base_ms + seq;
    format!(
        r#"{{"device_id":"{}","timestamp":"{}","latitude":{lat},"longitude":{lon},"altitude":112,"angle":271,"speed":63,"satellites":11,"priority":0,"attributes":{{"239":1,"240":1,"21":4,"66":12841,"24":63,"16":{},"9998":{seq},"9999":{}}}}}"#,
        imei(e, d),
        crate::iso(ts as i64),
        1_000_000 + seq,
        now_us()
    )
}

struct Shared {
    stop: AtomicBool,
    connected: AtomicU64,
    subscribed: AtomicU64,
}

/// A lean WebSocket client for the harness: the handshake by hand and
/// server frames parsed in place from one buffer, so that a thousand of
/// them cost the machine less than the host they measure (a general
/// client library validated and copied every message).
struct LeanClient {
    stream: tokio::net::TcpStream,
    /// Received bytes: `buf[start..filled]` is not parsed yet.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Bytes read off the socket since the upgrade.
    read: u64,
    /// Bytes on the wire of the last frame parsed, header included.
    last_frame: usize,
    /// With permessage-deflate negotiated: the inflater (reset for every
    /// message, as the host compresses each on its own) and the message it
    /// inflated last.
    inflater: Option<(flate2::Decompress, Vec<u8>)>,
}

/// What a browser offers.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A frame the harness cares about.
enum ServerFrame {
    Text(std::ops::Range<usize>),
    /// A compressed text message (RSV1): inflate it with
    /// [`LeanClient::inflate`].
    Deflated(std::ops::Range<usize>),
    Ping(Vec<u8>),
    Close,
    Other,
}

impl LeanClient {
    async fn connect(
        addr: SocketAddr,
        path: &str,
        stuck: bool,
        deflate: bool,
    ) -> anyhow::Result<Self> {
        Self::connect_with(addr, path, stuck, 64 * 1024, deflate).await
    }

    /// Connects with a receive buffer of `buf_len` bytes, offering
    /// permessage-deflate if `deflate` (and failing if the host declines).
    async fn connect_with(
        addr: SocketAddr,
        path: &str,
        stuck: bool,
        buf_len: usize,
        deflate: bool,
    ) -> anyhow::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = TcpSocket::new_v4()?;
        if stuck {
            // A small window, so the host's writes block after a few KB.
            socket.set_recv_buffer_size(4096)?;
        }
        let mut stream = socket.connect(addr).await?;
        let offer = if deflate {
            format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
        } else {
            String::new()
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Cookie: directus_session_token={TOKEN}\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = vec![0u8; buf_len];
        let mut n = 0;
        let head_end = loop {
            let r = stream.read(&mut buf[n..]).await?;
            if r == 0 {
                anyhow::bail!("closed during the handshake");
            }
            n += r;
            if let Some(i) = find(&buf[..n], b"\r\n\r\n") {
                break i + 4;
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            anyhow::bail!(
                "upgrade refused: {}",
                String::from_utf8_lossy(&buf[..head_end.min(64)])
            );
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let negotiated = head.contains("sec-websocket-extensions: permessage-deflate");
        if deflate && !negotiated {
            anyhow::bail!("the host did not negotiate permessage-deflate");
        }
        buf.copy_within(head_end..n, 0);
        Ok(Self {
            stream,
            buf,
            start: 0,
            filled: n - head_end,
            read: (n - head_end) as u64,
            last_frame: 0,
            inflater: negotiated.then(|| (flate2::Decompress::new(false), Vec::new())),
        })
    }

    /// The text of a compressed message in `buf[range]` (RFC 7692 §7.2.2).
    fn inflate(&mut self, range: std::ops::Range<usize>) -> anyhow::Result<&[u8]> {
        let Some((d, out)) = &mut self.inflater else {
            anyhow::bail!("RSV1 without permessage-deflate");
        };
        d.reset(false);
        out.clear();
        for input in [&self.buf[range], &[0x00, 0x00, 0xff, 0xff][..]] {
            let start = d.total_in();
            loop {
                out.reserve(input.len() * 4 + 4096);
                let done = (d.total_in() - start) as usize;
                d.decompress_vec(&input[done..], out, flate2::FlushDecompress::Sync)?;
                if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let key = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![0x81];
        match text.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&key);
        f.extend(text.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.stream.write_all(&f).await?;
        Ok(())
    }

    /// The next frame; its text is `self.buf[range]`.
    async fn next(&mut self) -> anyhow::Result<ServerFrame> {
        loop {
            if let Some(frame) = self.buffered() {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// The next frame already read, if there is a whole one.
    fn buffered(&mut self) -> Option<ServerFrame> {
        let (frame, end) = parse_server_frame(&self.buf[self.start..self.filled])?;
        let base = self.start;
        self.start += end;
        self.last_frame = end;
        Some(match frame {
            (0x41, r) => ServerFrame::Deflated(base + r.start..base + r.end),
            (0x1, r) => ServerFrame::Text(base + r.start..base + r.end),
            (0x9, r) => ServerFrame::Ping(self.buf[base + r.start..base + r.end].to_vec()),
            (0x8, _) => ServerFrame::Close,
            _ => ServerFrame::Other,
        })
    }

    /// Reads what the socket has, up to the buffer's room: as many frames
    /// as the host wrote together (a browser reads them the same way).
    async fn fill(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        // Move the unparsed tail to the front when room runs out; grow only
        // for a frame larger than the buffer (a big snapshot).
        if self.filled == self.buf.len() {
            self.buf.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.start = 0;
            if self.filled == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            anyhow::bail!("closed");
        }
        self.filled += n;
        self.read += n as u64;
        Ok(())
    }
}

impl LeanClient {
    /// The next frame's opcode (0x40 added for RSV1) and its first `keep`
    /// payload bytes at most;
    /// the rest of the payload is read and dropped, so a client of a storm
    /// counts 150 KB snapshots without holding one.
    async fn next_head(&mut self, keep: usize) -> anyhow::Result<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        // The header: at most 10 bytes.
        let (opcode, len, at) = loop {
            let b = &self.buf[self.start..self.filled];
            if b.len() >= 2 {
                let need = match b[1] & 0x7F {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                if b.len() >= need {
                    let len = match need {
                        4 => u16::from_be_bytes([b[2], b[3]]) as usize,
                        10 => u64::from_be_bytes(b[2..10].try_into()?) as usize,
                        _ => (b[1] & 0x7F) as usize,
                    };
                    break (b[0] & 0x4F, len, need);
                }
            }
            self.refill().await?;
        };
        self.start += at;
        let want = keep.min(len);
        while self.filled - self.start < want {
            self.refill().await?;
        }
        let head = self.buf[self.start..self.start + want].to_vec();
        let mut skip = len;
        loop {
            let n = skip.min(self.filled - self.start);
            self.start += n;
            skip -= n;
            if skip == 0 {
                return Ok((opcode, head));
            }
            self.start = 0;
            self.filled = 0;
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                anyhow::bail!("closed");
            }
            self.filled = n;
        }
    }

    /// Reads more into the buffer, moving what is unparsed to its front.
    async fn refill(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        self.buf.copy_within(self.start..self.filled, 0);
        self.filled -= self.start;
        self.start = 0;
        let n = self.stream.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            anyhow::bail!("closed");
        }
        self.filled += n;
        self.read += n as u64;
        Ok(())
    }
}

/// An unmasked server frame at the start of `b`: (opcode, with 0x40 added
/// for RSV1, payload range) and its total length.
fn parse_server_frame(b: &[u8]) -> Option<((u8, std::ops::Range<usize>), usize)> {
    let [b0, b1, ..] = *b else { return None };
    let (len, at) = match b1 & 0x7F {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    if b.len() < at + len {
        return None;
    }
    Some(((b0 & 0x4F, at..at + len), at + len))
}

/// One harness client: connect, subscribe to every event, then account
/// every position until told to stop (or, stuck, never read again).
async fn client(
    addr: SocketAddr,
    path: String,
    s: Arc<Scenario>,
    stuck: bool,
    shared: Arc<Shared>,
    opening: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<Account> {
    let (events, devices_per_event) = (s.events, s.devices_per_event);
    let mut ws = LeanClient::connect(addr, &path, stuck, s.deflate).await?;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    for e in 0..events {
        let frame = format!(
            r#"{{"type":"subscribe","topic":"event:{}","id":"{e}"}}"#,
            event_id(e)
        );
        ws.send_text(&frame).await?;
    }
    let mut account = Account::new(events * devices_per_event);
    let mut pending = events;
    while pending > 0 {
        let frame = ws.next().await?;
        let t = match frame {
            ServerFrame::Text(r) => Some(&ws.buf[r]),
            ServerFrame::Deflated(r) => Some(ws.inflate(r)?),
            ServerFrame::Close => anyhow::bail!("closed before subscribed"),
            _ => None,
        };
        if let Some(t) = t {
            if t.starts_with(br#"{"type":"subscribed""#) {
                pending -= 1;
            } else if t.starts_with(br#"{"type":"error""#) {
                anyhow::bail!("subscribe refused: {}", String::from_utf8_lossy(t));
            } else {
                account.position(t, devices_per_event, now_us());
            }
        }
    }
    shared.subscribed.fetch_add(1, Ordering::Relaxed);
    drop(opening);
    if stuck {
        while !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return Ok(account);
    }
    let done = |mut account: Account, ws: &LeanClient| {
        account.bytes = ws.read;
        Ok(account)
    };
    loop {
        // Every frame one read brought, then one wait for the next read (a
        // timer per read, not per frame: the client must not cost more per
        // delivery than the host it measures).
        while let Some(frame) = ws.buffered() {
            match frame {
                ServerFrame::Text(r) => {
                    account.position(&ws.buf[r], devices_per_event, now_us());
                }
                ServerFrame::Deflated(r) => {
                    let t = ws.inflate(r)?;
                    account.position(t, devices_per_event, now_us());
                }
                ServerFrame::Ping(payload) => {
                    // Answer as a browser would, or the host drops a silent
                    // client.
                    use tokio::io::AsyncWriteExt;
                    let mut f = vec![0x8A, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                    f.extend_from_slice(&payload);
                    ws.stream.write_all(&f).await?;
                }
                ServerFrame::Close => return done(account, &ws),
                ServerFrame::Other => {}
            }
        }
        match tokio::time::timeout(Duration::from_millis(100), ws.fill()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return done(account, &ws),
            Err(_) if shared.stop.load(Ordering::Relaxed) => return done(account, &ws),
            Err(_) => {}
        }
    }
}

/// Publishes at `rate` records per second, round-robin over every device,
/// until `until`; returns how many records each device got.
async fn publish(
    redis_url: &str,
    stream: &str,
    events: usize,
    devices_per_event: usize,
    rate: u32,
    until: Instant,
) -> anyhow::Result<Vec<u64>> {
    let devices = events * devices_per_event;
    let mut published = vec![0u64; devices];
    if rate == 0 {
        tokio::time::sleep_until(until.into()).await;
        return Ok(published);
    }
    // No response timeout: under full load a pipeline can take longer than
    // redis-rs's default 500 ms, and a publisher that gives up loses records.
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;
    let base_ms = now_us() / 1000;
    let tick = Duration::from_millis(5);
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut next_device = 0usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < until {
        interval.tick().await;
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        if due <= sent {
            continue;
        }
        let mut pipe = redis::pipe();
        for _ in sent..due {
            let i = next_device;
            next_device = (next_device + 1) % devices;
            published[i] += 1;
            let (e, d) = (i / devices_per_event, i % devices_per_event);
            pipe.cmd("XADD")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("payload")
                .arg(payload(e, d, published[i], base_ms))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        sent = due;
    }
    Ok(published)
}

/// Publishes sequence number 0 of every device (not accounted: it reaches
/// clients in their snapshot, not live).
async fn prime(
    redis_url: &str,
    stream: &str,
    events: usize,
    devices_per_event: usize,
) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut pipe = redis::pipe();
    let base_ms = now_us() / 1000;
    for e in 0..events {
        for d in 0..devices_per_event {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("payload")
                .arg(payload(e, d, 0, base_ms))
                .ignore();
        }
    }
    pipe.query_async::<()>(&mut conn).await?;
    // Let the host take them in before anyone subscribes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// A Directus stand-in whose one user ([`TOKEN`]) may read `events`.
async fn standin(events: impl IntoIterator<Item = Uuid>) -> anyhow::Result<DirectusStandIn> {
    let directus = DirectusStandIn::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
    directus.add_user(
        TOKEN,
        StandInUser {
            id: Uuid::from_u128(1),
            email: "load@livecast.invalid".into(),
            role: None,
            events: events.into_iter().collect(),
        },
    );
    Ok(directus)
}

/// Runs a scenario against a fresh host process.
pub async fn run(t: &Target, s: &Scenario) -> anyhow::Result<Report> {
    let directus = standin((0..s.events).map(event_id)).await?;
    let host = HostProcess::start(
        t,
        &directus,
        &[("LIVE_WS_SLOW_CLIENT_TIMEOUT_MS", "600000")],
    )
    .await?;
    // One position per device first, so every subscriber gets (and holds)
    // a snapshot of the event, as in production.
    prime(&t.redis_url, &t.stream, s.events, s.devices_per_event).await?;
    let rss_before = host.rss_kib();

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        connected: AtomicU64::new(0),
        subscribed: AtomicU64::new(0),
    });
    let addr: SocketAddr = host
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws-live")
        .parse()?;
    let scenario = Arc::new(s.clone());
    // Open connections a few hundred at a time (the listen backlog is finite).
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(s.clients);
    for i in 0..s.clients {
        let permit = gate.clone().acquire_owned().await?;
        let shared2 = shared.clone();
        let path = "/ws-live".to_owned();
        let scenario = scenario.clone();
        let stuck = i < s.stuck_clients;
        tasks.push(tokio::spawn(async move {
            let r = client(addr, path, scenario, stuck, shared2, permit).await;
            if let Err(e) = &r {
                eprintln!("client {i}: {e:#}");
            }
            r
        }));
    }
    let all_in = tokio::time::timeout(Duration::from_secs(120), async {
        while (shared.subscribed.load(Ordering::Relaxed) as usize) < s.clients {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if all_in.is_err() {
        anyhow::bail!(
            "only {} of {} clients subscribed",
            shared.subscribed.load(Ordering::Relaxed),
            s.clients
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_with = host.rss_kib();

    let cpu0 = host.cpu_seconds();
    let started = Instant::now();
    let until = started + s.duration;
    let sampler = {
        let pid = host.pid;
        tokio::spawn(async move {
            let mut peak = 0;
            while Instant::now() < until {
                let rss = rss_of(pid);
                peak = peak.max(rss);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    let published = publish(
        &t.redis_url,
        &t.stream,
        s.events,
        s.devices_per_event,
        s.rate,
        until,
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = host.cpu_seconds() - cpu0;
    // Let in-flight deliveries land.
    tokio::time::sleep(Duration::from_millis(if s.rate > 0 { 1500 } else { 0 })).await;
    shared.stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap_or(0);

    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut r = Report {
        scenario: s.name.clone(),
        deflate: s.deflate,
        clients: s.clients,
        stuck_clients: s.stuck_clients,
        connections_held: shared.connected.load(Ordering::Relaxed) as usize,
        rate: s.rate,
        seconds,
        records_published: published.iter().sum(),
        host_rss_kib_before_clients: rss_before,
        host_rss_kib_with_clients: rss_with,
        host_rss_kib_peak: peak.max(rss_with),
        host_cpu_percent: 100.0 * cpu / seconds,
        conflated: host.counter("livecast_conflated_total").await,
        host_deliveries: host.counter("livecast_deliveries_total").await,
        host_socket_writes: host.counter("livecast_socket_writes_total").await,
        ..Report::default()
    };
    r.rss_bytes_per_connection =
        (rss_with.saturating_sub(rss_before) * 1024) as f64 / s.clients.max(1) as f64;
    let mut wire_bytes = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let account = task.await??;
        if i < s.stuck_clients {
            continue;
        }
        r.deliveries_expected += r.records_published;
        r.deliveries_received += account.received;
        r.duplicated += account.duplicated;
        r.out_of_order += account.out_of_order;
        r.lost += account.lost(&published);
        wire_bytes += account.bytes;
        if let Some(h) = &account.latency {
            latency.add(h)?;
        }
    }
    r.host_rss_kib_end = host.rss_kib();
    r.deliveries_per_s = r.deliveries_received as f64 / seconds;
    if r.deliveries_received > 0 {
        r.wire_bytes_per_delivery = wire_bytes as f64 / r.deliveries_received as f64;
        r.host_cpu_us_per_delivery = cpu * 1e6 / r.deliveries_received as f64;
    }
    if !latency.is_empty() {
        r.latency_us_p50 = latency.value_at_quantile(0.5);
        r.latency_us_p99 = latency.value_at_quantile(0.99);
        r.latency_us_p999 = latency.value_at_quantile(0.999);
        r.latency_us_max = latency.max();
    }
    host.stop().await;
    Ok(r)
}

/// A reconnect storm, as after a deploy: `clients` connections opened
/// evenly over `spread`, each subscribing to one event as soon as it is
/// upgraded.
#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    pub clients: usize,
    pub spread: Duration,
    pub event: usize,
    pub devices: usize,
    /// Every client negotiates permessage-deflate, as browsers do.
    pub deflate: bool,
}

/// What a storm cost the host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormReport {
    pub deflate: bool,
    pub clients: usize,
    pub spread_ms: u64,
    pub devices: usize,
    /// Average entries per snapshot served.
    pub snapshot_entries: usize,
    /// Snapshot queries the database answered (the latency histogram's
    /// count, which every host version has), and snapshots served from
    /// memory because one failed.
    pub snapshot_queries: u64,
    pub snapshot_failures: u64,
    /// Snapshots served by source (hosts with shared snapshots only).
    pub served_query: u64,
    pub served_flight: u64,
    pub served_cache: u64,
    pub catch_up: u64,
    /// Upgrades refused (503 while the handshake limit was reached) and
    /// tried again, as a browser reconnects.
    pub upgrades_retried: u64,
    /// From the storm's start until the last client had `subscribed`.
    pub seconds_until_all_subscribed: f64,
    /// Per client, from its connect to its `subscribed`.
    pub subscribe_ms_p50: f64,
    pub subscribe_ms_p99: f64,
    pub subscribe_ms_max: f64,
    pub host_rss_kib_before: u64,
    pub host_rss_kib_peak: u64,
    /// A second after the last `subscribed`, every client still connected.
    pub host_rss_kib_after: u64,
    pub rss_bytes_per_connection: f64,
}

/// Runs a storm against a fresh host process.
pub async fn storm(t: &Target, s: &Storm) -> anyhow::Result<StormReport> {
    let directus = standin([event_id(s.event)]).await?;
    let host = HostProcess::start(
        t,
        &directus,
        &[("LIVE_WS_SLOW_CLIENT_TIMEOUT_MS", "600000")],
    )
    .await?;
    let rss_before = host.rss_kib();
    let addr: SocketAddr = host
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws-live")
        .parse()?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        connected: AtomicU64::new(0),
        subscribed: AtomicU64::new(0),
    });
    let retried = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::with_capacity(s.clients);
    for i in 0..s.clients {
        let at = started + s.spread.mul_f64(i as f64 / s.clients as f64);
        let (shared, retried) = (shared.clone(), retried.clone());
        let deflate = s.deflate;
        let subscribe = format!(
            r#"{{"type":"subscribe","topic":"event:{}","id":"storm-{i}"}}"#,
            event_id(s.event)
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let t0 = Instant::now();
            let r = storm_client(addr, &subscribe, deflate, &shared, &retried, t0).await;
            if let Err(e) = &r {
                eprintln!("storm client {i}: {e:#}");
            }
            r
        }));
    }
    let peak = {
        let (pid, shared, n) = (host.pid, shared.clone(), s.clients as u64);
        tokio::spawn(async move {
            let mut peak = 0;
            while shared.subscribed.load(Ordering::Relaxed) < n
                && !shared.stop.load(Ordering::Relaxed)
            {
                peak = peak.max(rss_of(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let all_in = tokio::time::timeout(Duration::from_secs(180), async {
        while (shared.subscribed.load(Ordering::Relaxed) as usize) < s.clients {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let until_all = started.elapsed().as_secs_f64();
    if all_in.is_err() {
        shared.stop.store(true, Ordering::Relaxed);
        anyhow::bail!(
            "only {} of {} storm clients subscribed",
            shared.subscribed.load(Ordering::Relaxed),
            s.clients
        );
    }
    let peak = peak.await.unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = host.rss_kib();
    let mut r = StormReport {
        deflate: s.deflate,
        clients: s.clients,
        spread_ms: s.spread.as_millis() as u64,
        devices: s.devices,
        snapshot_entries: (host.counter("processor_live_snapshot_size_sum").await
            / host
                .counter("processor_live_snapshot_size_count")
                .await
                .max(1)) as usize,
        snapshot_queries: host
            .counter("processor_live_snapshot_query_latency_ms_count")
            .await,
        snapshot_failures: host.counter("livecast_snapshot_failures_total").await,
        served_query: host
            .counter(r#"livecast_snapshots_served_total{source="query"}"#)
            .await,
        served_flight: host
            .counter(r#"livecast_snapshots_served_total{source="flight"}"#)
            .await,
        served_cache: host
            .counter(r#"livecast_snapshots_served_total{source="cache"}"#)
            .await,
        catch_up: host.counter("livecast_snapshot_catch_up_total").await,
        upgrades_retried: retried.load(Ordering::Relaxed),
        seconds_until_all_subscribed: until_all,
        host_rss_kib_before: rss_before,
        host_rss_kib_peak: peak.max(rss_after),
        host_rss_kib_after: rss_after,
        rss_bytes_per_connection: (rss_after.saturating_sub(rss_before) * 1024) as f64
            / s.clients.max(1) as f64,
        ..StormReport::default()
    };
    shared.stop.store(true, Ordering::Relaxed);
    // Stopped first: its close frames end the clients that wait on a read.
    host.stop().await;
    let mut times = Vec::with_capacity(s.clients);
    for task in tasks {
        times.push(task.await??);
    }
    times.sort_by(f64::total_cmp);
    r.subscribe_ms_p50 = percentile(&times, 0.5);
    r.subscribe_ms_p99 = percentile(&times, 0.99);
    r.subscribe_ms_max = times.last().copied().unwrap_or(0.0);
    Ok(r)
}

/// Resident memory of process `pid`, KiB (0 once it is gone).
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One storm client: connect (again after a refused upgrade), subscribe,
/// count the snapshot without keeping it, then stay connected, answering
/// pings, until told to stop. Milliseconds from connect to `subscribed`.
async fn storm_client(
    addr: SocketAddr,
    subscribe: &str,
    deflate: bool,
    shared: &Shared,
    retried: &AtomicU64,
    t0: Instant,
) -> anyhow::Result<f64> {
    use tokio::io::AsyncWriteExt;
    let mut tries = 0;
    let mut ws = loop {
        match LeanClient::connect_with(addr, "/ws-live", false, 4096, deflate).await {
            Ok(ws) => break ws,
            Err(_) if tries < 20 => {
                tries += 1;
                retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(e) => return Err(e),
        }
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    ws.send_text(subscribe).await?;
    loop {
        let (opcode, head) = ws.next_head(64).await?;
        // A compressed message: its first bytes inflate to its beginning.
        let (opcode, head) = match opcode & 0x40 {
            0 => (opcode, head),
            _ => (opcode & 0x0F, inflate_start(&head)),
        };
        match opcode {
            0x1 if head.starts_with(br#"{"type":"subscribed""#) => break,
            0x1 if head.starts_with(br#"{"type":"error""#) => {
                anyhow::bail!("subscribe refused: {}", String::from_utf8_lossy(&head))
            }
            0x8 => anyhow::bail!("closed before subscribed"),
            _ => {}
        }
    }
    let took = t0.elapsed().as_secs_f64() * 1000.0;
    shared.subscribed.fetch_add(1, Ordering::Relaxed);
    // Idle, as a spectator's tab; the wait is on the socket, so that a
    // frame is never cut in the middle by the stop check.
    while !shared.stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), ws.stream.readable()).await {
            Ok(Ok(())) => match ws.next_head(125).await {
                Ok((0x9, payload)) => {
                    let mut f = vec![0x8A, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                    f.extend_from_slice(&payload);
                    ws.stream.write_all(&f).await?;
                }
                Ok((0x8, _)) | Err(_) => break,
                Ok(_) => {}
            },
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    Ok(took)
}

/// What the first bytes of a compressed message inflate to: its beginning.
fn inflate_start(head: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(1024);
    // Cut short, the input may end inside a block: what came out is enough.
    let _ = d.decompress_vec(head, &mut out, flate2::FlushDecompress::None);
    out
}

/// Subscribe round trips (connect once, subscribe and unsubscribe `n` times)
/// for an event of `devices` devices: milliseconds per subscribe.
pub async fn snapshot_latency(
    t: &Target,
    event: usize,
    devices_per_event: usize,
    n: usize,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let directus = standin([event_id(event)]).await?;
    let host = HostProcess::start(t, &directus, &[]).await?;
    let mut req = host.ws_url.as_str().into_client_request()?;
    req.headers_mut()
        .insert("cookie", format!("directus_session_token={TOKEN}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let mut times = Vec::with_capacity(n);
    let mut size = 0;
    let topic = format!("event:{}", event_id(event));
    for i in 0..n + 3 {
        let t0 = Instant::now();
        ws.send(Message::Text(
            format!(r#"{{"type":"subscribe","topic":"{topic}","id":"{i}"}}"#).into(),
        ))
        .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(m))) if m.starts_with(r#"{"type":"subscribed""#) => {
                    // Counted, not parsed: parsing 150 KB of JSON here would
                    // be timed as the host's.
                    size = m.matches("\"deviceId\"").count();
                    break;
                }
                Some(Ok(Message::Text(m))) if m.starts_with(r#"{"type":"error""#) => {
                    anyhow::bail!("{m}")
                }
                Some(Ok(_)) => {}
                _ => anyhow::bail!("connection ended"),
            }
        }
        // The first subscribes warm the pool and the caches.
        if i >= 3 {
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        ws.send(Message::Text(
            format!(r#"{{"type":"unsubscribe","topic":"{topic}","id":"u{i}"}}"#).into(),
        ))
        .await?;
    }
    let _ = devices_per_event;
    host.stop().await;
    Ok((times, size))
}

/// One `subscribed` to event `event` on the wire, in bytes, header
/// included, without and with permessage-deflate; and its entries.
pub async fn subscribed_size(t: &Target, event: usize) -> anyhow::Result<(usize, usize, usize)> {
    let directus = standin([event_id(event)]).await?;
    let host = HostProcess::start(t, &directus, &[]).await?;
    let addr: SocketAddr = host
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws-live")
        .parse()?;
    let topic = format!("event:{}", event_id(event));
    let mut sizes = [0; 2];
    let mut entries = [0; 2];
    for (i, deflate) in [false, true].into_iter().enumerate() {
        let mut ws = LeanClient::connect(addr, "/ws-live", false, deflate).await?;
        ws.send_text(&format!(
            r#"{{"type":"subscribe","topic":"{topic}","id":"s"}}"#
        ))
        .await?;
        loop {
            let frame = ws.next().await?;
            let wire = ws.last_frame;
            let text = match frame {
                ServerFrame::Text(r) => &ws.buf[r],
                ServerFrame::Deflated(r) => ws.inflate(r)?,
                ServerFrame::Close => anyhow::bail!("closed before subscribed"),
                _ => continue,
            };
            if text.starts_with(br#"{"type":"subscribed""#) {
                sizes[i] = wire;
                entries[i] = text.windows(10).filter(|w| w == b"\"deviceId\"").count();
                break;
            }
            if text.starts_with(br#"{"type":"error""#) {
                anyhow::bail!("{}", String::from_utf8_lossy(text));
            }
        }
    }
    host.stop().await;
    if entries[0] != entries[1] {
        anyhow::bail!("{} entries plain, {} inflated", entries[0], entries[1]);
    }
    Ok((sizes[0], sizes[1], entries[0]))
}

/// Fills `positions` to at least `rows` rows for event `event`'s devices
/// (kept between runs; generated once).
pub async fn ensure_positions(
    db: &PgPool,
    event: usize,
    devices: usize,
    rows: i64,
) -> anyhow::Result<i64> {
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM positions")
        .fetch_one(db)
        .await?;
    if have >= rows {
        return Ok(have);
    }
    let per_device = (rows - have + devices as i64 - 1) / devices as i64;
    let start: i64 = sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM max(ts))::int8, 1767225600) + 1 FROM positions",
    )
    .fetch_one(db)
    .await?;
    // In slices, so progress is visible and one statement stays reasonable.
    let slice = 50_i64;
    let mut d0 = 0;
    while d0 < devices as i64 {
        let d1 = (d0 + slice).min(devices as i64);
        sqlx::query(
            "INSERT INTO positions (device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, attributes, codec, faulty) \
             SELECT '35' || lpad($1::text, 5, '0') || lpad(d::text, 8, '0'), to_timestamp($4 + s), 41.3 + s * 1e-6, 19.8, 100, 90, 50, 9, 0, \
                    '{\"239\": 1, \"66\": 12841}', '8E', s % 97 = 0 \
             FROM generate_series($2, $3 - 1) d, generate_series(0, $5 - 1) s",
        )
        .bind(event as i64)
        .bind(d0)
        .bind(d1)
        .bind(start)
        .bind(per_device)
        .execute(db)
        .await?;
        d0 = d1;
        eprintln!("  positions: devices {d1}/{devices}");
    }
    sqlx::query("ANALYZE positions").execute(db).await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM positions")
        .fetch_one(db)
        .await?)
}

/// Percentile of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Writes reports as JSON next to earlier runs; returns the file.
pub fn save(dir: &Path, name: &str, value: &impl Serialize) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("{name}-{stamp}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    Ok(path)
}

/// A storm's report as one line of text.
pub fn storm_line(r: &StormReport) -> String {
    format!(
        "storm{}: {} clients over {} ms, one event of {} devices ({} entries per snapshot): \
         {} snapshot queries ({} served from memory), all subscribed after {:.2} s \
         (connect to subscribed p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} upgrades retried); \
         host RSS {} KiB before, {} KiB peak, {} KiB after: {:.0} B per connection; \
         served query/flight/cache {}/{}/{}, {} catch-up positions",
        if r.deflate {
            " with permessage-deflate"
        } else {
            ""
        },
        r.clients,
        r.spread_ms,
        r.devices,
        r.snapshot_entries,
        r.snapshot_queries,
        r.snapshot_failures,
        r.seconds_until_all_subscribed,
        r.subscribe_ms_p50,
        r.subscribe_ms_p99,
        r.subscribe_ms_max,
        r.upgrades_retried,
        r.host_rss_kib_before,
        r.host_rss_kib_peak,
        r.host_rss_kib_after,
        r.rss_bytes_per_connection,
        r.served_query,
        r.served_flight,
        r.served_cache,
        r.catch_up
    )
}

/// Positions per socket write, from the host's own counters (whole run,
/// snapshots included): what write coalescing achieved. `-` for a host
/// without the write counter.
fn deliveries_per_write(r: &Report) -> String {
    if r.host_socket_writes == 0 {
        return "-".into();
    }
    format!(
        "{:.2}",
        r.host_deliveries as f64 / r.host_socket_writes as f64
    )
}

/// A table of reports, one row each.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<14} {:>7} {:>6} {:>6} {:>9} {:>11} {:>11} {:>6} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6} {:>7} {:>9} {:>6} {:>6}\n",
        "scenario", "clients", "stuck", "rate", "published", "expected", "received", "lost", "dup", "deliv/s",
        "p50 us", "p99 us", "p999 us", "max us", "rss KiB", "peak KiB", "B/conn", "cpu %", "us/dlv", "conflated", "B/dlv",
        "dlv/wr"
    ));
    for r in reports {
        out.push_str(&format!(
            "{:<14} {:>7} {:>6} {:>6} {:>9} {:>11} {:>11} {:>6} {:>5} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8.0} {:>6.0} {:>7.2} {:>9} {:>6.0} {:>6}\n",
            if r.deflate {
                format!("{}+deflate", r.scenario)
            } else {
                r.scenario.clone()
            },
            r.clients,
            r.stuck_clients,
            r.rate,
            r.records_published,
            r.deliveries_expected,
            r.deliveries_received,
            r.lost,
            r.duplicated + r.out_of_order,
            r.deliveries_per_s,
            r.latency_us_p50,
            r.latency_us_p99,
            r.latency_us_p999,
            r.latency_us_max,
            r.host_rss_kib_with_clients,
            r.host_rss_kib_peak,
            r.rss_bytes_per_connection,
            r.host_cpu_percent,
            r.host_cpu_us_per_delivery,
            r.conflated,
            r.wire_bytes_per_delivery,
            deliveries_per_write(r)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(e: usize, d: usize, seq: u64) -> String {
        let p = payload(e, d, seq, 1_700_000_000_000);
        let v: serde_json::Value = serde_json::from_str(&p).expect("payload");
        format!(
            r#"{{"type":"position","topic":"event:x","deviceId":"{}","lat":1,"lon":2,"ts":3,"attributes":{}}}"#,
            v["device_id"].as_str().unwrap_or_default(),
            v["attributes"]
        )
    }

    #[test]
    fn counts_each_delivery_and_detects_loss_duplicates_and_reordering() {
        let mut a = Account::new(4);
        for seq in [1, 2, 3] {
            assert!(a.position(frame(0, 1, seq).as_bytes(), 2, now_us()));
        }
        assert!(a.position(frame(1, 0, 1).as_bytes(), 2, now_us()));
        assert_eq!((a.received, a.duplicated, a.out_of_order), (4, 0, 0));
        // Device 1 published 3, device 2 published 2: one record of device 2 lost.
        assert_eq!(a.lost(&[0, 3, 2, 0]), 1);
        assert!(a.position(frame(0, 1, 3).as_bytes(), 2, now_us()));
        assert_eq!(a.duplicated, 1, "a repeated record is a duplicate");
        assert!(a.position(frame(0, 1, 2).as_bytes(), 2, now_us()));
        assert_eq!(a.out_of_order, 1, "an older record after a newer one");
        assert!(!a.position(br#"{"type":"position","deviceId":"x"}"#, 2, now_us()));
        assert_eq!(a.latency.as_ref().map(|h| h.len()), Some(6));
    }

    #[test]
    fn imeis_round_trip() {
        assert_eq!(device_index(imei(3, 17).as_bytes(), 50), Some(167));
        assert_eq!(imei(3, 17).len(), 15);
    }
}
