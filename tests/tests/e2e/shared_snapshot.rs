//! One snapshot per event, not per subscriber (issue 9 §2): concurrent
//! subscribes share one query, one record-stage pass and one body per
//! audience, and every subscriber still ends exact: what reached the host
//! after the shared snapshot was built follows `subscribed` as positions,
//! once, in order.

use std::collections::BTreeMap;

use livecast::test_util::{FilterMetrics, Metrics};
use livecast_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

fn imei(i: usize) -> String {
    format!("3563070424{:05}", 50_000 + i)
}

/// A window wide enough that every subscribe of a test shares the first
/// snapshot, however slow the machine: the catch-up path is then taken for
/// certain, not by chance.
const WIDE: u64 = 10_000;

/// What a client ends up with: per device, the `ts` of the snapshot entry
/// and then of every position, in arrival order.
fn history(snapshot: &Value, positions: &[Value]) -> BTreeMap<String, Vec<i64>> {
    let mut h: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in snapshot.as_array().into_iter().flatten().chain(positions) {
        let device = e["deviceId"].as_str().unwrap_or_default().to_owned();
        h.entry(device)
            .or_default()
            .push(e["ts"].as_i64().unwrap_or_default());
    }
    h
}

/// Whether every device's newest `ts` so far is `want[device]`.
fn reached(snapshot: &Value, got: &[Value], want: &BTreeMap<String, i64>) -> bool {
    let h = history(snapshot, got);
    want.iter()
        .all(|(d, ts)| h.get(d).and_then(|s| s.last()) == Some(ts))
}

#[tokio::test]
async fn concurrent_subscribes_share_one_query_and_each_gets_its_own_reply() {
    let env = TestEnv::new().await;
    let devices: Vec<String> = (0..5).map(imei).collect();
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    env.user("u", None, &[event]);
    let t0 = now_ms() - 60_000;
    for (i, d) in devices.iter().enumerate() {
        env.insert_position(d, t0 + i as i64, 1.0, 2.0, false).await;
    }
    let mut config = env.config();
    // Only the flight is shared here: nothing is kept after it.
    config.live_snapshot_share_ms = 0;
    let host = env.start_host_with(config).await;
    const N: usize = 12;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(host.connect(&cookie("u")).await);
    }

    // The query waits on this lock, so every subscribe arrives while the
    // first one's query is in flight.
    let mut tx = env.db.begin().await.expect("tx");
    sqlx::query("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("lock");
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(
            &json!({"type": "subscribe", "topic": format!("event:{event}"), "id": format!("r{i}")}),
        )
        .await;
    }
    assert!(eventually(|| async { host.inspector.subscriptions() == N }).await);
    tx.rollback().await.expect("unlock");

    let mut snapshots = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let sub = c.reply(&format!("r{i}")).await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        assert_eq!(sub["topic"], format!("event:{event}"));
        snapshots.push(sub["snapshot"].clone());
    }
    assert_eq!(snapshots[0].as_array().map(Vec::len), Some(5));
    assert!(snapshots.iter().all(|s| *s == snapshots[0]), "one snapshot");
    let m = &host.metrics;
    assert_eq!(m.snapshot_queries.get(), 1, "the database answered once");
    assert_eq!(m.snapshot_latency_ms.count(), 1);
    assert_eq!(Metrics::count(&m.snapshots_served, "source", "query"), 1);
    assert_eq!(
        Metrics::count(&m.snapshots_served, "source", "flight"),
        N as u64 - 1
    );
    // Each subscribe was still filtered... once: the record stage ran over
    // the five rows one time.
    assert_eq!(
        FilterMetrics::count(&m.filter.records_in, "passthrough"),
        5,
        "one record-stage pass over the rows"
    );

    // The flight is over and the window is zero: the next subscribe asks
    // the database again.
    assert_eq!(
        clients[0].subscribe(event, "again").await["type"],
        "subscribed"
    );
    assert_eq!(m.snapshot_queries.get(), 2);
}

#[tokio::test]
async fn records_published_while_many_subscribe_reach_every_client_exactly_once_in_order() {
    let env = TestEnv::new().await;
    const D: usize = 10;
    let devices: Vec<String> = (0..D).map(imei).collect();
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    env.user("u", None, &[event]);
    let base = now_ms() - 30_000;
    // Only the database knows the devices when the first snapshot is built
    // (as after a restart): every entry keeps a floor.
    for d in &devices {
        env.insert_position(d, base - 60_000, 1.0, 1.0, false).await;
    }
    let mut config = env.config();
    config.live_snapshot_share_ms = WIDE;
    let host = env.start_host_with(config).await;

    // The first subscriber's snapshot is the one everybody shares.
    let mut first = host.connect(&cookie("u")).await;
    let first_sub = first.subscribe(event, "first").await;
    assert_eq!(first_sub["snapshot"].as_array().map(Vec::len), Some(D));

    // Round 1 for every device reaches the host (and the first client)
    // before anyone else registers: only catch-up can give it to them.
    let round1: Vec<Value> = devices
        .iter()
        .map(|d| payload(d, base + 1, 2.0, 2.0))
        .collect();
    env.publish_all(&round1).await;
    let got = first
        .positions_until(SOON, |got| devices.iter().all(|d| has(got, d, base + 1)))
        .await;
    assert_eq!(got.len(), D, "round 1 once each: {got:?}");

    // Odd devices keep moving while sixteen clients subscribe at once.
    const N: usize = 16;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let odd: Vec<String> = devices.iter().skip(1).step_by(2).cloned().collect();
        let redis = env.redis.clone();
        let stream = env.stream.clone();
        tokio::spawn(async move {
            let mut ts = base + 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ts < base + 2_000 {
                ts += 1;
                let mut pipe = redis::pipe();
                for d in &odd {
                    let p = payload(d, ts, 3.0, 3.0);
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("payload")
                        .arg(p.to_string())
                        .ignore();
                }
                pipe.query_async::<()>(&mut redis.clone())
                    .await
                    .expect("XADD");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            ts
        })
    };
    let url = host.ws_url.clone();
    let subscribers: Vec<_> = (0..N)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(&url, &[("cookie", &cookie("u"))])
                    .await
                    .expect("upgrade");
                let sub = c.subscribe(event, &format!("s{i}")).await;
                (c, sub)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for s in subscribers {
        clients.push(s.await.expect("subscriber"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last_odd = publisher.await.expect("publisher");

    // A last round for everyone: each client must end on it.
    let last = last_odd + 1;
    let round: Vec<Value> = devices.iter().map(|d| payload(d, last, 4.0, 4.0)).collect();
    env.publish_all(&round).await;
    let want: BTreeMap<String, i64> = devices.iter().map(|d| (d.clone(), last)).collect();
    for (i, (c, sub)) in clients.iter_mut().enumerate() {
        assert_eq!(sub["type"], "subscribed", "{sub}");
        let snapshot = sub["snapshot"].clone();
        let got = c
            .positions_until(EVENTUALLY, |got| reached(&snapshot, got, &want))
            .await;
        let h = history(&snapshot, &got);
        for (d, seq) in &h {
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "client {i}, device {d}: duplicate or regression: {seq:?}"
            );
            assert_eq!(seq.last(), Some(&last), "client {i}, device {d}: {seq:?}");
        }
        assert_eq!(h.len(), D, "client {i}: every device");
        for d in devices.iter().step_by(2) {
            assert!(
                h[d].contains(&(base + 1)),
                "client {i}, device {d}: round 1 reached the host before this client \
                 registered, after the shared snapshot was built: {:?}",
                h[d]
            );
        }
    }
    let m = &host.metrics;
    assert_eq!(m.snapshot_queries.get(), 1, "one query for 17 subscribes");
    assert_eq!(
        Metrics::count(&m.snapshots_served, "source", "cache"),
        N as u64
    );
    assert!(
        m.snapshot_catch_up.get() >= (N * D / 2) as u64,
        "at least round 1 of the even devices for each client: {}",
        m.snapshot_catch_up.get()
    );
}

#[tokio::test]
async fn concurrent_subscribers_of_different_audiences_each_get_their_own_view() {
    let env = TestEnv::new().await;
    const D: usize = 4;
    let devices: Vec<String> = (0..D).map(imei).collect();
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    let event = env.event(&refs).await;
    let (control, public) = (Uuid::new_v4(), Uuid::new_v4());
    env.user("marshal", Some(control), &[event]);
    env.user("viewer1", Some(public), &[event]);
    env.user("viewer2", Some(public), &[event]);
    let t0 = now_ms() - 60_000;
    for d in &devices {
        env.insert_position(d, t0, 41.123456, 19.654321, false)
            .await;
    }
    let mut config = env.config();
    config.live_filter_chain = Some(env.chain_file(&format!(
        "[[plugin]]\nname = \"audience\"\npath = \"{}\"\n[plugin.config]\nfull_roles = [\"{control}\"]\ndecimals = 2\nstrip_attributes = true\n",
        plugin("audience")
    )));
    config.live_snapshot_share_ms = WIDE;
    let host = env.start_host_with(config).await;

    let mut first = host.connect(&cookie("marshal")).await;
    let sub = first.subscribe(event, "m0").await;
    assert_eq!(sub["snapshot"][0]["lat"], 41.123456);
    // The devices move after the shared snapshot was built.
    let t1 = now_ms();
    let moved: Vec<Value> = devices
        .iter()
        .map(|d| payload(d, t1, 41.327953, 19.819025))
        .collect();
    env.publish_all(&moved).await;
    let got = first
        .positions_until(SOON, |got| devices.iter().all(|d| has(got, d, t1)))
        .await;
    assert_eq!(got.len(), D);

    let f = &host.metrics.filter;
    let calls = FilterMetrics::count(&f.calls, "audience");
    // Marshal's second tab, two public viewers (two audiences: the user id
    // is part of one), and viewer2's second tab, all at once.
    let who = ["marshal", "viewer1", "viewer2", "viewer2"];
    let url = host.ws_url.clone();
    let tasks: Vec<_> = who
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let url = url.clone();
            let token = token.to_string();
            tokio::spawn(async move {
                let mut c = Client::connect(&url, &[("cookie", &cookie(&token))])
                    .await
                    .expect("upgrade");
                let sub = c.subscribe(event, &format!("s{i}")).await;
                let caught = c
                    .positions_until(SOON, |got| devices_reached(got, D, t1))
                    .await;
                (token, sub, caught)
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("subscriber"));
    }
    for (token, sub, caught) in &seen {
        assert_eq!(sub["type"], "subscribed", "{sub}");
        let snapshot = sub["snapshot"].as_array().expect("snapshot");
        assert_eq!(snapshot.len(), D, "{token}");
        assert_eq!(
            caught.len(),
            D,
            "{token}: one catch-up per device: {caught:?}"
        );
        for e in snapshot.iter().chain(caught) {
            if token == "marshal" {
                assert!(e["lat"] == 41.123456 || e["lat"] == 41.327953, "{e}");
                assert!(e.get("attributes").is_some(), "{token}: {e}");
            } else {
                assert!(e["lat"] == 41.12 || e["lat"] == 41.33, "{token}: {e}");
                assert!(e.get("attributes").is_none(), "{token}: {e}");
            }
        }
        assert!(caught.iter().all(|p| p["ts"] == t1), "{caught:?}");
    }
    // viewer2's two tabs: the same view, made once.
    assert_eq!(seen[2].1["snapshot"], seen[3].1["snapshot"]);
    assert_eq!(seen[2].2, seen[3].2);
    assert_eq!(host.metrics.snapshot_queries.get(), 1);
    // Marshal's view existed: its catch-up only (1 call); each viewer: its
    // view and its catch-up (2 calls each); viewer2's second tab: nothing.
    assert_eq!(FilterMetrics::count(&f.calls, "audience") - calls, 5);
}

/// Whether `got` holds a position at `ts` of `n` distinct devices.
fn devices_reached(got: &[Value], n: usize, ts: i64) -> bool {
    let mut d: Vec<&str> = got
        .iter()
        .filter(|p| p["ts"] == ts)
        .filter_map(|p| p["deviceId"].as_str())
        .collect();
    d.sort();
    d.dedup();
    d.len() == n
}
