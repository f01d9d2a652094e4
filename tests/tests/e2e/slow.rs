//! Slow clients: always fresh, not always delivered (live-ws.md §6).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use livecast::test_util::Metrics;
use livecast_tests::*;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// A client with a tiny receive buffer, so that a host writing to it blocks
/// after a few kilobytes once it stops reading.
async fn narrow_client(ws_url: &str, token: &str) -> WebSocketStream<TcpStream> {
    let addr = ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws-live")
        .parse()
        .expect("addr");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(addr).await.expect("connect");
    let mut req = ws_url.into_client_request().expect("req");
    req.headers_mut()
        .insert("cookie", cookie(token).parse().expect("cookie"));
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("upgrade");
    ws
}

async fn subscribe_narrow(ws: &mut WebSocketStream<TcpStream>, event: uuid::Uuid) {
    use futures_util::SinkExt;
    let frame = json!({"type": "subscribe", "topic": format!("event:{event}"), "id": "s"});
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            let v: Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "subscribed" {
                return;
            }
        }
    }
}

fn big_payload(imei: &str, ts: i64) -> Value {
    let mut p = payload(imei, ts, 41.0, 19.0);
    // Large IO attributes fill socket buffers quickly.
    p["attributes"]["10000"] = json!({"__buffer_b64": "A".repeat(8 * 1024)});
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_stays_bounded_while_others_get_everything() {
    const DEVICES: usize = 10;
    const ROUNDS: i64 = 150;
    let env = TestEnv::new().await;
    let imeis: Vec<String> = (0..DEVICES).map(|i| format!("35630704244{i:04}")).collect();
    let refs: Vec<&str> = imeis.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    env.user("u", None, &[event]);
    let mut config = env.config();
    config.live_ws_slow_client_timeout_ms = 60_000;
    const BUDGET: usize = 64;
    config.live_ws_position_budget = BUDGET as u32;
    let host = env.start_host_with(config).await;

    let mut stuck = narrow_client(&host.ws_url, "u").await;
    subscribe_narrow(&mut stuck, event).await;
    let mut fast = host.connect(&cookie("u")).await;
    fast.subscribe(event, "f").await;
    let reader = tokio::spawn(async move {
        let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
        let expected = DEVICES * ROUNDS as usize;
        let mut total = 0;
        while total < expected {
            let Some(p) = fast.next_within(Duration::from_secs(5)).await else {
                break;
            };
            if p["type"] == "position" {
                let ts = p["ts"].as_i64().unwrap_or_default();
                seen.entry(p["deviceId"].as_str().unwrap_or_default().to_owned())
                    .or_default()
                    .push(ts);
                total += 1;
            }
        }
        (seen, fast)
    });

    let t0 = now_ms();
    let mut max_pending = 0;
    for round in 0..ROUNDS {
        for imei in &imeis {
            env.publish(&big_payload(imei, t0 + round)).await;
        }
        max_pending = max_pending.max(host.inspector.max_pending_positions());
        // Paced so that the reading client keeps up even on a loaded CI
        // machine: a reader that falls behind is conflated too, by design.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (seen, _fast) = reader.await.expect("reader");
    for imei in &imeis {
        let got = seen.get(imei).cloned().unwrap_or_default();
        let want: Vec<i64> = (0..ROUNDS).map(|r| t0 + r).collect();
        assert_eq!(
            got, want,
            "the reading client gets every position of {imei}, in order"
        );
    }
    assert!(
        max_pending <= BUDGET + DEVICES,
        "a stuck client holds its budget and one position per device at most, saw {max_pending}"
    );
    assert!(
        host.metrics.conflated.get() > 0,
        "the stuck client's positions were conflated"
    );
    assert_eq!(
        host.metrics.connections.get(),
        2,
        "shedding is not closing:\n{}",
        host.scrape().await
    );

    // When it finally reads, it gets the newest position of every device.
    let mut last: HashMap<String, i64> = HashMap::new();
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(500), stuck.next()).await
    {
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "position" {
                last.insert(
                    v["deviceId"].as_str().unwrap_or_default().to_owned(),
                    v["ts"].as_i64().unwrap_or_default(),
                );
            }
        }
    }
    for imei in &imeis {
        assert_eq!(
            last.get(imei),
            Some(&(t0 + ROUNDS - 1)),
            "{imei} drains to its newest position"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_blocked_past_the_timeout_is_closed_with_1008() {
    let env = TestEnv::new().await;
    let event = env.event(&["356307042440000"]).await;
    env.user("u", None, &[event]);
    let mut config = env.config();
    config.live_ws_slow_client_timeout_ms = 300;
    let host = env.start_host_with(config).await;
    let mut stuck = narrow_client(&host.ws_url, "u").await;
    subscribe_narrow(&mut stuck, event).await;

    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    let mut ts = now_ms();
    while Metrics::count(&host.metrics.closes, "reason", "slow_client") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the host closes a client stuck past its timeout"
        );
        ts += 1;
        env.publish(&big_payload("356307042440000", ts)).await;
    }
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), stuck.next()).await {
            Ok(Some(Ok(Message::Close(Some(CloseFrame { code, .. }))))) => {
                break Some(u16::from(code));
            }
            Ok(Some(Ok(_))) => continue,
            _ => break None,
        }
    };
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn pings_flow_and_a_silent_peer_is_dropped() {
    let env = TestEnv::new().await;
    let event = env.event(&["356307042440000"]).await;
    env.user("u", None, &[event]);
    let mut config = env.config();
    config.live_ws_ping_interval_ms = 150;
    let host = env.start_host_with(config).await;

    // A client that reads answers pings (tungstenite does it) and stays. It
    // keeps reading for the whole test, counting pings.
    let mut live = host.connect(&cookie("u")).await;
    let pings = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let pings = pings.clone();
        async move {
            while let Some(Ok(msg)) = live.ws.next().await {
                if matches!(msg, Message::Ping(_)) {
                    pings.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    assert!(
        eventually(|| async { pings.load(Ordering::Relaxed) >= 3 }).await,
        "pings every interval"
    );

    // A client that never reads never answers: dropped after two intervals.
    let _silent = host.connect(&cookie("u")).await;
    assert!(
        eventually(|| async { Metrics::count(&host.metrics.closes, "reason", "silent") == 1 })
            .await
    );
    // Long past two intervals of the live client's own: still there.
    let seen = pings.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!reader.is_finished(), "the live client is still connected");
    assert!(pings.load(Ordering::Relaxed) > seen, "and still pinged");
    assert_eq!(Metrics::count(&host.metrics.closes, "reason", "silent"), 1);
    assert_eq!(host.metrics.connections.get(), 1);
}

/// Reads positions until `want` have arrived or nothing comes for a while;
/// `(device, ts)` in arrival order.
async fn read_positions(ws: &mut WebSocketStream<TcpStream>, want: usize) -> Vec<(String, i64)> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        match tokio::time::timeout(SOON, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["type"] == "position" {
                    got.push((
                        v["deviceId"].as_str().unwrap_or_default().to_owned(),
                        v["ts"].as_i64().unwrap_or_default(),
                    ));
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_keeps_every_record_of_a_burst_in_order() {
    // Trackers upload their buffers in bursts after a coverage gap: here 200
    // devices, 2,000 records in one pipeline, several times. The client reads
    // all the time, through a small receive buffer, so the host's writes
    // block as soon as a burst outruns it; it keeps up on average.
    const DEVICES: usize = 200;
    const PER_DEVICE: i64 = 10;
    const BURSTS: i64 = 5;
    let env = TestEnv::new().await;
    let imeis: Vec<String> = (0..DEVICES).map(|i| format!("35630704245{i:04}")).collect();
    let refs: Vec<&str> = imeis.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut client = narrow_client(&host.ws_url, "u").await;
    subscribe_narrow(&mut client, event).await;

    let t0 = now_ms();
    for burst in 0..BURSTS {
        let mut payloads = Vec::new();
        for r in 0..PER_DEVICE {
            for imei in &imeis {
                payloads.push(payload(imei, t0 + burst * PER_DEVICE + r, 41.0, 19.0));
            }
        }
        let want = payloads.len();
        env.publish_all(&payloads).await;
        let got = read_positions(&mut client, want).await;
        assert_eq!(got.len(), want, "burst {burst}: every record arrives");
        let mut last: HashMap<&str, i64> = HashMap::new();
        for (device, ts) in &got {
            if let Some(prev) = last.insert(device, *ts) {
                assert_eq!(*ts, prev + 1, "{device}: in order, none skipped");
            }
        }
    }
    assert_eq!(host.metrics.conflated.get(), 0, "nothing was conflated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_a_weak_link_that_keeps_reading_is_not_closed() {
    // The host's queue for this client never empties (20 devices' records
    // come faster than it reads) but it takes bytes all the time: it is
    // slow, not stuck.
    const DEVICES: usize = 20;
    let env = TestEnv::new().await;
    let imeis: Vec<String> = (0..DEVICES).map(|i| format!("35630704246{i:04}")).collect();
    let refs: Vec<&str> = imeis.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    env.user("u", None, &[event]);
    let mut config = env.config();
    config.live_ws_slow_client_timeout_ms = 1_000;
    config.live_ws_position_budget = 64;
    let host = env.start_host_with(config).await;
    let mut client = narrow_client(&host.ws_url, "u").await;
    subscribe_narrow(&mut client, event).await;

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let imeis = imeis.clone();
        let env = &env;
        async move {
            let t0 = now_ms();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<Value> = imeis.iter().map(|i| big_payload(i, t0 + round)).collect();
                env.publish_all(&batch).await;
                round += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Read one message every 10 ms, four times past the timeout.
    let reader = async {
        let started = tokio::time::Instant::now();
        let mut read = 0;
        while started.elapsed() < Duration::from_secs(4) {
            match tokio::time::timeout(SOON, client.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    panic!(
                        "closed after {:?} and {read} messages: {frame:?}",
                        started.elapsed()
                    )
                }
                Ok(Some(Ok(_))) => read += 1,
                other => panic!("the connection ended: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        read
    };
    let (read, ()) = tokio::join!(reader, publisher);
    assert_eq!(
        Metrics::count(&host.metrics.closes, "reason", "slow_client"),
        0
    );
    assert!(read > 50, "it kept receiving ({read} messages)");
    assert!(
        host.metrics.conflated.get() > 0,
        "and it was behind all along"
    );
}
