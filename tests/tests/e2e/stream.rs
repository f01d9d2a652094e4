//! From the stream to subscribers: routing, ordering, handoff, bad entries,
//! and the host's isolation from the rest of the platform (upstream.md).

use std::time::Duration;

use livecast::test_util::Metrics;
use livecast_tests::*;
use redis::Value as RedisValue;
use serde_json::Value;

const A: &str = "356307042441013";
const B: &str = "356307042441014";
const ORPHAN: &str = "356307042449999";

#[tokio::test]
async fn every_subscriber_gets_the_record_and_no_directus_call_is_made_per_record() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u1", None, &[event]);
    env.user("u2", None, &[event]);
    let host = env.start_host().await;
    let mut clients = Vec::new();
    for token in ["u1", "u2", "u1"] {
        let mut c = host.connect(&cookie(token)).await;
        c.subscribe(event, "s").await;
        clients.push(c);
    }
    let (me_calls, item_calls) = (env.directus.users_me_calls(), env.directus.items_calls());

    let first = now_ms();
    env.publish(&payload(A, first, 1.0, 1.0)).await;
    for c in &mut clients {
        let p = c.next().await.expect("every subscriber gets the position");
        assert_eq!(
            (p["deviceId"].as_str(), p["ts"].as_i64()),
            (Some(A), Some(first))
        );
    }
    assert_eq!(host.metrics.deliveries.get(), 3);

    let ts = first + 1;
    for i in 0..50 {
        env.publish(&payload(A, ts + i, 1.0, 1.0)).await;
    }
    for c in &mut clients {
        // Conflation may merge positions of a client that is momentarily
        // behind, but the newest always arrives.
        let got = c.positions_until(SOON, |got| has(got, A, ts + 49)).await;
        assert_eq!(
            got.last().map(|p| p["ts"].clone()),
            Some(Value::from(ts + 49))
        );
    }
    assert_eq!(env.directus.users_me_calls(), me_calls);
    assert_eq!(env.directus.items_calls(), item_calls);
}

#[tokio::test]
async fn a_device_in_two_events_reaches_both_topics_and_an_orphan_reaches_none() {
    let env = TestEnv::new().await;
    let e1 = env.event(&[A]).await;
    let e2 = env.event(&[A, B]).await;
    env.user("u", None, &[e1, e2]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(e1, "1").await;
    c.subscribe(e2, "2").await;

    env.publish(&payload(ORPHAN, now_ms(), 1.0, 1.0)).await;
    env.publish(&payload(A, now_ms(), 1.0, 1.0)).await;
    let got = c.positions_until(SOON, |got| got.len() >= 2).await;
    let mut topics: Vec<_> = got
        .iter()
        .map(|p| p["topic"].as_str().unwrap_or_default().to_owned())
        .collect();
    topics.sort();
    let mut want = vec![format!("event:{e1}"), format!("event:{e2}")];
    want.sort();
    assert_eq!(topics, want);
    assert!(got.iter().all(|p| p["deviceId"] == A));
    assert_eq!(host.metrics.records_unrouted.get(), 1);
}

#[tokio::test]
async fn an_older_record_is_not_delivered_as_live() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;

    let t = now_ms();
    env.publish(&payload(A, t, 1.0, 1.0)).await;
    assert_eq!(
        c.next().await.map(|p| p["ts"].clone()),
        Some(Value::from(t))
    );
    // A tracker uploading its offline buffer after a reconnect.
    env.publish(&payload(A, t - 30_000, 2.0, 2.0)).await;
    env.publish(&payload(A, t, 2.0, 2.0)).await;
    env.publish(&payload(A, t + 1_000, 3.0, 3.0)).await;
    assert_eq!(c.ts_until(A, t + 1_000).await, [Value::from(t + 1_000)]);
    assert_eq!(host.metrics.records_stale.get(), 2);
}

#[tokio::test]
async fn a_record_arriving_during_the_snapshot_is_delivered_exactly_once() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let t0 = now_ms() - 5_000;
    env.insert_position(A, t0, 1.0, 1.0, false).await;
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;

    // Hold the snapshot query back: it waits for this lock.
    let mut tx = env.db.begin().await.expect("tx");
    sqlx::query("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("lock");
    c.send(&serde_json::json!({"type": "subscribe", "topic": format!("event:{event}"), "id": "s"}))
        .await;
    // Registered for live records, snapshot still pending.
    assert!(eventually(|| async { host.inspector.subscriptions() == 1 }).await);
    let t1 = now_ms();
    env.publish(&payload(A, t1, 2.0, 2.0)).await;
    assert!(eventually(|| async { host.metrics.records_routed.get() == 1 }).await);
    tx.rollback().await.expect("unlock");

    let sub = c.reply("s").await;
    let snapshot = sub["snapshot"].as_array().expect("snapshot");
    assert_eq!(snapshot.len(), 1);
    assert_eq!(
        snapshot[0]["ts"], t1,
        "the snapshot is not older than the live data"
    );
    let t2 = t1 + 1_000;
    env.publish(&payload(A, t2, 3.0, 3.0)).await;
    let live: Vec<_> = c.ts_until(A, t2).await;
    assert_eq!(
        live,
        [Value::from(t2)],
        "t1 came in the snapshot, so not again as live"
    );
}

#[tokio::test]
async fn a_moved_device_is_picked_up_after_a_refresh() {
    let env = TestEnv::new().await;
    let from = env.event(&[A]).await;
    let to = env.event(&[B]).await;
    env.user("u", None, &[from, to]);
    let host = env.start_host().await;
    let mut on_from = host.connect(&cookie("u")).await;
    on_from.subscribe(from, "f").await;
    let mut on_to = host.connect(&cookie("u")).await;
    on_to.subscribe(to, "t").await;

    env.move_device(A, from, to).await;
    let refreshes = Metrics::count(&host.metrics.device_map_refreshes, "result", "ok");
    assert!(
        eventually(|| async {
            Metrics::count(&host.metrics.device_map_refreshes, "result", "ok") >= refreshes + 2
        })
        .await
    );
    env.publish(&payload(A, now_ms(), 1.0, 1.0)).await;
    let got = on_to.next().await.expect("the new event gets the device");
    assert_eq!(got["topic"], format!("event:{to}"));
    assert!(
        on_from
            .positions_within(Duration::from_millis(300))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn malformed_entries_are_skipped_and_counted_and_the_next_one_delivered() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;

    env.xadd(&[("ts", "x"), ("device_id", A)]).await;
    env.xadd(&[("payload", "{not json")]).await;
    env.xadd(&[(
        "payload",
        r#"{"device_id":"356307042441013","timestamp":"2026-05-02T10:15:30Z","latitude":1}"#,
    )])
    .await;
    env.xadd(&[(
        "payload",
        r#"{"device_id":"356307042441013","timestamp":"yesterday","latitude":1,"longitude":1}"#,
    )])
    .await;
    let ts = now_ms();
    env.publish(&payload(A, ts, 1.0, 1.0)).await;
    assert_eq!(
        c.next().await.map(|p| p["ts"].clone()),
        Some(Value::from(ts))
    );
    let m = &host.metrics.records_malformed;
    assert_eq!(
        [
            Metrics::count(m, "reason", "no_payload"),
            Metrics::count(m, "reason", "json"),
            Metrics::count(m, "reason", "missing_field"),
            Metrics::count(m, "reason", "timestamp"),
        ],
        [1, 1, 1, 1]
    );
    assert!(
        host.scrape()
            .await
            .contains("livecast_records_malformed_total{reason=\"json\"} 1")
    );
}

#[tokio::test]
async fn an_entry_over_the_size_limit_is_skipped_before_anyone_gets_it() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;

    // A valid position, 10 MiB of it in one attribute.
    let ts = now_ms();
    let mut huge = payload(A, ts, 1.0, 1.0);
    huge["attributes"]["9999"] = Value::from("x".repeat(10 << 20));
    env.publish(&huge).await;
    env.publish(&payload(A, ts + 1, 1.0, 1.0)).await;
    let got = c.ts_until(A, ts + 1).await;
    assert_eq!(got, [Value::from(ts + 1)], "only the normal record arrives");
    assert_eq!(
        Metrics::count(&host.metrics.records_malformed, "reason", "too_large"),
        1
    );
}

#[tokio::test]
async fn nothing_written_after_the_stream_is_deleted_is_lost() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;
    let ts = now_ms();
    env.publish(&payload(A, ts, 1.0, 1.0)).await;
    assert_eq!(c.ts_until(A, ts).await, [Value::from(ts)]);

    // Someone deletes the stream under the host's blocked read, and the
    // ingestion service writes the next record at once.
    let _: i64 = redis::cmd("DEL")
        .arg(&env.stream)
        .query_async(&mut env.redis.clone())
        .await
        .expect("DEL");
    env.publish(&payload(A, ts + 1, 2.0, 2.0)).await;
    env.publish(&payload(A, ts + 2, 3.0, 3.0)).await;
    assert_eq!(
        c.ts_until(A, ts + 2).await,
        [Value::from(ts + 1), Value::from(ts + 2)]
    );
}

fn group_info(v: &RedisValue, group: &str) -> Option<Vec<(String, String)>> {
    let RedisValue::Array(groups) = v else {
        return None;
    };
    groups.iter().find_map(|g| {
        let RedisValue::Array(f) = g else { return None };
        let pairs: Vec<(String, String)> = f
            .chunks_exact(2)
            .map(|kv| {
                let s = |v: &RedisValue| match v {
                    RedisValue::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    RedisValue::Int(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                (s(&kv[0]), s(&kv[1]))
            })
            .collect();
        pairs
            .iter()
            .any(|(k, v)| k == "name" && v == group)
            .then_some(pairs)
    })
}

#[tokio::test]
async fn the_processor_group_and_the_stream_are_left_alone() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let mut redis = env.redis.clone();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&env.stream)
        .arg("processor")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .expect("processor group");
    for i in 0..3 {
        env.publish(&payload(B, now_ms() + i, 1.0, 1.0)).await;
    }
    // The durable writer has read two entries and not acknowledged them yet.
    let _: RedisValue = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("processor")
        .arg("writer-1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&env.stream)
        .arg(">")
        .query_async(&mut redis)
        .await
        .expect("processor read");
    let info = || async {
        let v: RedisValue = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&env.stream)
            .query_async(&mut env.redis.clone())
            .await
            .expect("xinfo");
        group_info(&v, "processor").expect("processor group")
    };
    let before = info().await;

    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;
    for i in 0..5 {
        env.publish(&payload(A, now_ms() + i, 1.0, 1.0)).await;
    }
    assert_eq!(
        c.positions_until(SOON, |got| got.iter().any(|p| p["deviceId"] == A))
            .await
            .last()
            .map(|p| p["deviceId"].clone()),
        Some(Value::from(A))
    );
    host.stop().await;

    let after = info().await;
    let field = |info: &[(String, String)], k: &str| {
        info.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
    for k in ["last-delivered-id", "pending", "consumers"] {
        assert_eq!(
            field(&after, k),
            field(&before, k),
            "processor's {k} changed"
        );
    }
    let len: i64 = redis::cmd("XLEN")
        .arg(&env.stream)
        .query_async(&mut redis)
        .await
        .expect("xlen");
    assert_eq!(len, 8, "the host never writes to or trims the stream");
    let groups: RedisValue = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&env.stream)
        .query_async(&mut redis)
        .await
        .expect("xinfo");
    assert!(
        group_info(&groups, &format!("{}test", env.group_prefix)).is_none(),
        "the host removes its own group when it stops"
    );
}

#[tokio::test]
async fn a_snapshot_row_newer_than_the_stream_is_not_undercut_by_a_late_record() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    // The durable writer has a fix the host never saw on the stream (it
    // started after it), then the tracker uploads an older one from its
    // offline buffer.
    let t = now_ms() - 10_000;
    env.insert_position(A, t, 1.0, 1.0, false).await;
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    let sub = c.subscribe(event, "s").await;
    assert_eq!(sub["snapshot"][0]["ts"], t);

    env.publish(&payload(A, t - 5_000, 2.0, 2.0)).await;
    env.publish(&payload(A, t + 1_000, 3.0, 3.0)).await;
    let live: Vec<Value> = c.ts_until(A, t + 1_000).await;
    assert_eq!(
        live,
        [Value::from(t + 1_000)],
        "never older than the snapshot"
    );
}
