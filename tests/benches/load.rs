//! The load benchmarks: fan-out throughput, latency, memory per connection
//! and snapshot time, against a real `livecast` process, real Redis and
//! PostgreSQL on this machine (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p livecast-tests --bench load                 # the standard set
//! cargo bench -p livecast-tests --bench load -- fanout       # one scenario
//! LIVECAST_BENCH_HOST=<binary> cargo bench … -- fanout      # another host
//! LIVE_WS_FLUSH_INTERVAL_MS=0 cargo bench … -- fanout       # host settings pass through
//! cargo bench -p livecast-tests --bench load -- smoke        # seconds, correctness only
//! cargo bench -p livecast-tests --bench load -- storm        # 3,000 subscribes in a second
//! ```
//!
//! Options: `--clients=N` (every scenario), `--deflate` (every client of
//! the scenarios and of the storm negotiates permessage-deflate, as
//! browsers do: run a scenario with and without to compare), `--spread-ms=N` (the storm's
//! connections are opened evenly over that time; default 1000),
//! `--rows=N` (positions in the snapshot database; default 10,000,000,
//! fewer for a quick check). `LIVECAST_BENCH_HOST=<binary>` runs another
//! host build (an older commit, another allocator) under the same harness.
//!
//! Services: `REDIS_URL` and `POSTGRES_URL` (defaults: the local ones). The
//! host reads a database `livecast_bench` on that server, created, migrated
//! and seeded on first use and kept between runs (the snapshot scenario's
//! 10 million positions take minutes to generate). Each run prints a table
//! and writes it as JSON under `target/bench/`.

use std::path::PathBuf;
use std::time::Duration;

use livecast_tests::load::{self, Report, Scenario, Target};
use sqlx::postgres::PgPoolOptions;

const SNAPSHOT_EVENT: usize = 90;
const SNAPSHOT_DEVICES: usize = 500;
const SNAPSHOT_ROWS: i64 = 10_000_000;

fn scenario(name: &str, clients: usize, stuck: usize, rate: u32, secs: u64) -> Scenario {
    Scenario {
        name: name.into(),
        clients,
        stuck_clients: stuck,
        events: 1,
        devices_per_event: 50,
        rate,
        duration: Duration::from_secs(secs),
        deflate: false,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    livecast::test_util::install_crypto();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let which = args.first().map(String::as_str).unwrap_or("standard");
    // `--clients=N`: another client count for the scenarios run.
    let option = |name: &str| -> Option<u64> {
        std::env::args().find_map(|a| a.strip_prefix(name).and_then(|n| n.parse().ok()))
    };
    let clients = option("--clients=").map(|n| n as usize);
    let spread = Duration::from_millis(option("--spread-ms=").unwrap_or(1_000));
    let rows = option("--rows=").map_or(SNAPSHOT_ROWS, |n| n as i64);
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let server = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let postgres_url =
        livecast::test_util::schema::ensure_database(&server, "livecast_bench").await?;
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&postgres_url)
        .await?;
    livecast::test_util::schema::migrate(&db).await?;
    load::seed(&db, 0..1, 50).await?;

    let target = Target {
        redis_url,
        postgres_url,
        stream: "livecast:bench:telemetry".into(),
        // LIVECAST_BENCH_HOST: another host binary (an older build, or a
        // wrapper that runs it under a profiler).
        host_bin: std::env::var_os("LIVECAST_BENCH_HOST")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_livecast-test-host"))),
        chain: None,
    };
    let scenarios: Vec<Scenario> = match which {
        "smoke" => vec![scenario("smoke", 20, 2, 200, 2)],
        "idle" => vec![scenario("idle", 10_000, 0, 0, 5)],
        "fanout" => vec![scenario("fanout", 1_000, 0, 200, 20)],
        "fanout-50" => vec![scenario("fanout-50", 1_000, 0, 50, 20)],
        "fanout-2000x300" => vec![scenario("fanout-2000x300", 2_000, 0, 300, 20)],
        "saturation" => [250, 500, 750, 1000, 1500]
            .into_iter()
            .map(|r| scenario(&format!("sat-{r}"), 1_000, 0, r, 10))
            .collect(),
        "slow" => vec![
            scenario("slow-base", 1_000, 0, 200, 20),
            scenario("slow-10pct", 1_000, 100, 200, 20),
        ],
        "snapshot" | "storm" => vec![],
        _ => vec![
            scenario("idle", 10_000, 0, 0, 5),
            scenario("fanout", 1_000, 0, 200, 20),
            scenario("fanout-50", 1_000, 0, 50, 20),
            scenario("fanout-2000x300", 2_000, 0, 300, 20),
            scenario("sat-500", 1_000, 0, 500, 10),
            scenario("sat-1000", 1_000, 0, 1000, 10),
            scenario("slow-10pct", 1_000, 100, 200, 20),
        ],
    };
    let mut scenarios = scenarios;
    let deflate = std::env::args().any(|a| a == "--deflate");
    for s in &mut scenarios {
        s.deflate = deflate;
    }
    if let Some(n) = clients {
        for s in &mut scenarios {
            s.clients = n;
            s.stuck_clients = s.stuck_clients.min(n / 10);
        }
    }
    let mut reports: Vec<Report> = Vec::new();
    for s in &scenarios {
        eprintln!(
            "running {} ({} clients, {} stuck, {} records/s, {:?})",
            s.name, s.clients, s.stuck_clients, s.rate, s.duration
        );
        let r = load::run(&target, s).await?;
        eprintln!("{}", load::table(std::slice::from_ref(&r)));
        reports.push(r);
    }
    if !reports.is_empty() {
        println!("{}", load::table(&reports));
    }
    let bench_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let snapshot_rows = if ["snapshot", "storm", "standard"].contains(&which) {
        load::seed(&db, SNAPSHOT_EVENT..SNAPSHOT_EVENT + 1, SNAPSHOT_DEVICES).await?;
        eprintln!("positions: making sure there are {rows} rows (kept between runs)");
        load::ensure_positions(&db, SNAPSHOT_EVENT, SNAPSHOT_DEVICES, rows).await?
    } else {
        0
    };
    if which == "snapshot" || which == "standard" {
        let rows = snapshot_rows;
        let (mut times, size) =
            load::snapshot_latency(&target, SNAPSHOT_EVENT, SNAPSHOT_DEVICES, 50).await?;
        times.sort_by(f64::total_cmp);
        println!(
            "snapshot: {size} entries over {rows} rows, {} subscribes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            times.len(),
            load::percentile(&times, 0.5),
            load::percentile(&times, 0.99),
            times.last().copied().unwrap_or(0.0)
        );
        // An older host (run for a before/after) does not negotiate it.
        let (plain, packed) = match load::subscribed_size(&target, SNAPSHOT_EVENT).await {
            Ok((plain, packed, entries)) => {
                println!(
                    "subscribed: {entries} entries, {plain} bytes on the wire, {packed} with permessage-deflate ({:.1}x smaller)",
                    plain as f64 / packed.max(1) as f64
                );
                (Some(plain), Some(packed))
            }
            Err(e) => {
                println!("subscribed: size with permessage-deflate not measured: {e}");
                (None, None)
            }
        };
        let path = load::save(
            &bench_dir,
            "snapshot",
            &serde_json::json!({
                "rows": rows, "entries": size, "ms": times,
                "subscribed_bytes": plain, "subscribed_bytes_deflate": packed,
            }),
        )?;
        eprintln!("wrote {}", path.display());
    }
    if which == "storm" || which == "standard" {
        // After a deploy: a fresh host (nothing in memory, every entry from
        // the database), every spectator of the event at once.
        let storm = load::Storm {
            clients: clients.unwrap_or(3_000),
            spread,
            event: SNAPSHOT_EVENT,
            devices: SNAPSHOT_DEVICES,
            deflate,
        };
        eprintln!(
            "running storm ({} clients over {:?}, {snapshot_rows} rows)",
            storm.clients, storm.spread
        );
        let r = load::storm(&target, &storm).await?;
        println!("{}", load::storm_line(&r));
        let path = load::save(&bench_dir, "storm", &r)?;
        eprintln!("wrote {}", path.display());
    }
    if !reports.is_empty() {
        let path = load::save(&bench_dir, which, &reports)?;
        eprintln!("wrote {}", path.display());
    }
    let broken: Vec<&Report> = reports
        .iter()
        .filter(|r| r.duplicated + r.out_of_order > 0)
        .collect();
    if !broken.is_empty() {
        anyhow::bail!("duplicated or reordered deliveries: {broken:?}");
    }
    Ok(())
}
