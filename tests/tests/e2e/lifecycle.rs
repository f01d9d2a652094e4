//! The host as a real process: configuration errors, SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use livecast_tests::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_livecast-test-host");

fn command(env: &TestEnv) -> Command {
    let s = services();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DIRECTUS_BASE_URL", env.directus.url().as_str())
        .env("REDIS_URL", &s.redis_url)
        .env("POSTGRES_URL", &env.postgres_url)
        .env("REDIS_TELEMETRY_STREAM", &env.stream)
        .env("LIVE_BROADCAST_GROUP_PREFIX", &env.group_prefix)
        .env("INSTANCE_ID", "proc")
        .env("LIVE_WS_HOST", "127.0.0.1")
        .env("LIVE_WS_PORT", "0")
        .env("METRICS_HOST", "127.0.0.1")
        .env("METRICS_PORT", "0")
        .env("LIVE_WS_DRAIN_TIMEOUT_MS", "2000")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let env = TestEnv::new().await;
    let event = env.event(&["356307042440000"]).await;
    env.user("u", None, &[event]);
    let mut child = command(&env).spawn().expect("spawn the host");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ws = tokio::time::timeout(EVENTUALLY, async {
        let (mut ws, mut reading) = (None, false);
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["message"] == "livecast is serving" {
                ws = v["ws"].as_str().map(str::to_owned);
            }
            reading |= v["message"] == "reading the telemetry stream";
            if reading && ws.is_some() {
                break;
            }
        }
        ws
    })
    .await
    .expect("the host starts")
    .expect("the host logs its address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let url = format!("ws://{ws}/ws-live");
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&url, &[("cookie", &cookie("u"))])
            .await
            .expect("connect");
        assert_eq!(c.subscribe(event, "s").await["type"], "subscribed");
        clients.push(c);
    }
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    for c in &mut clients {
        assert_eq!(c.ended(Duration::from_secs(5)).await, Ended::Close(1001));
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the host exits after draining")
        .expect("status");
    assert!(status.success(), "exit status {status}");
    // New connections are refused once it is gone.
    assert!(tokio::net::TcpStream::connect(&ws).await.is_err());
}

#[tokio::test]
async fn an_invalid_setting_stops_start_up_with_a_line_naming_it() {
    let env = TestEnv::new().await;
    for (var, value) in [
        ("LIVE_WS_PORT", "eighty"),
        ("LIVE_WS_PING_INTERVAL_MS", "0"),
        ("REDIS_URL", "not a url"),
    ] {
        let out = command(&env).env(var, value).output().await.expect("run");
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
    }
    let out = command(&env)
        .env_remove("DIRECTUS_BASE_URL")
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DIRECTUS_BASE_URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_stopped_host_runs_on() {
    let env = TestEnv::new().await;
    let event = env.event(&["356307042440000"]).await;
    env.user("u", None, &[event]);
    let mut config = env.config();
    config.live_ws_drain_timeout_ms = 300;
    let host = env.start_host_with(config).await;
    let metrics = host.metrics.clone();

    // An upgrade still waiting on Directus when the host stops.
    env.directus.set_delay(Duration::from_secs(3));
    let url = host.ws_url.clone();
    let pending = tokio::spawn(async move {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.as_str().into_client_request().expect("request");
        req.headers_mut()
            .insert("cookie", cookie("u").parse().expect("cookie"));
        tokio_tungstenite::connect_async(req).await.map(|_| ())
    });
    assert!(eventually(|| async { env.directus.users_me_calls() == 1 }).await);
    host.stop().await;

    // The stopped host never completes it: no 101, no connection opened
    // after the host said it stopped.
    let upgraded = tokio::time::timeout(EVENTUALLY, pending)
        .await
        .expect("the client is answered")
        .expect("task");
    assert!(upgraded.is_err(), "no socket from a stopped host");
    assert_eq!(metrics.connections.get(), 0);
    assert_eq!(metrics.handshakes_in_flight.get(), 0);
}

#[tokio::test]
async fn the_demo_stops_cleanly_on_sigterm_and_removes_what_it_made_in_redis() {
    let s = services();
    let name = format!("t{}", std::process::id());
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args([
            "demo",
            "--ws-port",
            "0",
            "--metrics-port",
            "0",
            "--devices",
            "3",
        ])
        .args(["--name", &name, "--redis-url", &s.redis_url])
        .args(["--postgres-url", &s.postgres_url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = tokio::time::timeout(EVENTUALLY, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Live map") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(started, Ok(true), "the demo prints its banner");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let stream = format!("livecast:demo:{name}:telemetry");
    let mut redis = redis::Client::open(s.redis_url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    assert!(
        eventually(|| {
            let mut redis = redis.clone();
            let stream = stream.clone();
            async move {
                redis::cmd("EXISTS")
                    .arg(&stream)
                    .query_async::<bool>(&mut redis)
                    .await
                    .unwrap_or(false)
            }
        })
        .await,
        "the demo publishes to its own stream"
    );

    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(EVENTUALLY, child.wait())
        .await
        .expect("the demo exits")
        .expect("status");
    assert!(status.success(), "a graceful stop: {status}");
    let exists: bool = redis::cmd("EXISTS")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .expect("EXISTS");
    assert!(!exists, "its stream, and the group on it, are gone");
}
