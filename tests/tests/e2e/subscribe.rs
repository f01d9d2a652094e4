//! Subscriptions, authorization at subscribe time and snapshots
//! (live-ws.md §3, §4).

use livecast::test_util::Metrics;
use livecast_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const A: &str = "356307042441013";
const B: &str = "356307042441014";
const C: &str = "356307042441015";

fn entry_of<'a>(snapshot: &'a Value, imei: &str) -> Option<&'a Value> {
    snapshot.as_array()?.iter().find(|e| e["deviceId"] == imei)
}

#[tokio::test]
async fn happy_path_snapshot_then_live_position() {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B, C]).await;
    env.user("u", None, &[event]);
    let t0 = now_ms() - 10_000;
    env.insert_position(A, t0 - 60_000, 41.0, 19.0, false).await;
    env.insert_position(A, t0, 41.5, 19.5, false).await;
    env.insert_position(B, t0 - 5_000, 42.25, 20.125, false)
        .await;
    // C has no position: it is absent from the snapshot.
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;

    let sub = c.subscribe(event, "r1").await;
    let topic = format!("event:{event}");
    assert_eq!(sub["type"], "subscribed", "{sub}");
    assert_eq!(sub["topic"], topic);
    let snapshot = &sub["snapshot"];
    assert_eq!(snapshot.as_array().map(Vec::len), Some(2), "{snapshot}");
    assert_eq!(
        entry_of(snapshot, A),
        Some(
            &json!({"deviceId": A, "lat": 41.5, "lon": 19.5, "ts": t0, "speed": 42, "course": 90, "attributes": {"239": 1}})
        )
    );
    assert_eq!(
        entry_of(snapshot, B).map(|e| &e["ts"]),
        Some(&json!(t0 - 5_000))
    );
    assert!(entry_of(snapshot, C).is_none());

    let ts = now_ms();
    env.publish(&payload(A, ts, 41.327953, 19.819025)).await;
    let pos = c.next().await.expect("position within 1 s");
    assert_eq!(
        pos,
        json!({
            "type": "position", "topic": topic, "deviceId": A,
            "lat": 41.327953, "lon": 19.819025, "ts": ts, "speed": 63, "course": 271,
            "attributes": {"239": 1, "66": 12841,
                           "78": {"__bigint": "18446744073709551615"},
                           "385": {"__buffer_b64": "AQID"}}
        })
    );
}

#[tokio::test]
async fn speed_and_course_are_omitted_when_zero() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "r").await;
    let mut p = payload(A, now_ms(), 1.0, 2.0);
    p["speed"] = json!(0);
    p["angle"] = json!(0);
    env.publish(&p).await;
    let pos = c.next().await.expect("position");
    assert!(
        pos.get("speed").is_none() && pos.get("course").is_none(),
        "{pos}"
    );
}

#[tokio::test]
async fn faulty_rows_are_excluded_from_the_snapshot() {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B]).await;
    env.user("u", None, &[event]);
    let t0 = now_ms() - 60_000;
    env.insert_position(A, t0, 1.0, 1.0, false).await;
    env.insert_position(A, t0 + 1_000, 9.0, 9.0, true).await;
    env.insert_position(B, t0, 2.0, 2.0, true).await;
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;

    let sub = c.subscribe(event, "r").await;
    let snapshot = &sub["snapshot"];
    assert_eq!(
        entry_of(snapshot, A).map(|e| &e["ts"]),
        Some(&json!(t0)),
        "{snapshot}"
    );
    assert!(
        entry_of(snapshot, B).is_none(),
        "a device with only faulty rows is absent"
    );
}

#[tokio::test]
async fn forbidden_not_found_and_unknown_topics() {
    let env = TestEnv::new().await;
    let mine = env.event(&[A]).await;
    let theirs = env.event(&[B]).await;
    env.user("u", None, &[mine]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;

    let e = c.subscribe(theirs, "f").await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{e}"
    );
    assert_eq!(e["topic"], format!("event:{theirs}"));
    let missing = uuid::Uuid::new_v4();
    let e = c.subscribe(missing, "n").await;
    assert_eq!(e["code"], "not-found", "{e}");
    c.send(&json!({"type": "subscribe", "topic": "device:356307042441013", "id": "u"}))
        .await;
    let e = c.reply("u").await;
    assert_eq!(
        (e["code"].as_str(), e["topic"].as_str()),
        (Some("unknown-topic"), Some("device:356307042441013"))
    );
    assert_eq!(
        host.inspector.subscriptions(),
        0,
        "nothing registered on failure"
    );

    // A forbidden user's subscribe costs no database query.
    assert_eq!(host.metrics.snapshot_latency_ms.count(), 0);
    assert_eq!(
        Metrics::count(&host.metrics.authz, "result", "forbidden"),
        1
    );
    assert_eq!(
        Metrics::count(&host.metrics.authz, "result", "not_found"),
        1
    );

    // Directus failing at subscribe time is a transient `error`; the
    // connection stays and a retry succeeds.
    env.directus.set_failing(true);
    assert_eq!(c.subscribe(mine, "x").await["code"], "error");
    env.directus.set_failing(false);
    assert_eq!(c.subscribe(mine, "y").await["type"], "subscribed");
}

#[tokio::test]
async fn malformed_frames_get_bad_request_and_the_connection_stays_usable() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    let topic = format!("event:{event}");

    for (frame, id) in [
        ("not json".to_owned(), None),
        (json!({"type": "subscribe"}).to_string(), None),
        (
            json!({"type": "subscribe", "topic": topic, "id": "a", "extra": 1}).to_string(),
            Some("a"),
        ),
        (
            json!({"type": "subscribe", "topic": 7, "id": "b"}).to_string(),
            Some("b"),
        ),
        (
            json!({"type": "publish", "topic": topic, "id": "c"}).to_string(),
            Some("c"),
        ),
        (
            json!({"type": "subscribe", "topic": topic, "id": "x".repeat(129)}).to_string(),
            None,
        ),
    ] {
        c.send_text(&frame).await;
        let e = c.next().await.expect("an error reply");
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad-request")),
            "{frame}: {e}"
        );
        assert_eq!(e["id"].as_str(), id, "{frame}: {e}");
    }
    assert_eq!(host.inspector.subscriptions(), 0);
    assert_eq!(c.subscribe(event, "ok").await["type"], "subscribed");
}

#[tokio::test]
async fn subscribe_and_unsubscribe_are_idempotent() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;

    assert_eq!(c.subscribe(event, "1").await["type"], "subscribed");
    let again = c.subscribe(event, "2").await;
    assert_eq!(
        again["type"], "subscribed",
        "a held topic answers subscribed again"
    );
    assert_eq!(host.inspector.subscriptions(), 1);
    env.publish(&payload(A, now_ms(), 1.0, 1.0)).await;
    assert_eq!(
        c.positions_until(SOON, |got| !got.is_empty()).await.len(),
        1,
        "one position, not two"
    );

    let topic = format!("event:{event}");
    for id in ["3", "4"] {
        c.send(&json!({"type": "unsubscribe", "topic": topic, "id": id}))
            .await;
        let r = c.reply(id).await;
        assert_eq!(
            (r["type"].as_str(), r["topic"].as_str()),
            (Some("unsubscribed"), Some(topic.as_str()))
        );
    }
    assert_eq!(host.inspector.subscriptions(), 0);
    env.publish(&payload(A, now_ms() + 1, 1.0, 1.0)).await;
    assert!(c.positions_within(QUIET).await.is_empty());
}

#[tokio::test]
async fn subscriptions_are_capped_per_connection() {
    let env = TestEnv::new().await;
    let events = [
        env.event(&[A]).await,
        env.event(&[B]).await,
        env.event(&[C]).await,
    ];
    env.user("u", None, &events);
    let mut config = env.config();
    config.live_ws_max_subscriptions = 2;
    let host = env.start_host_with(config).await;
    let mut c = host.connect(&cookie("u")).await;

    assert_eq!(c.subscribe(events[0], "1").await["type"], "subscribed");
    assert_eq!(c.subscribe(events[1], "2").await["type"], "subscribed");
    assert_eq!(
        c.subscribe(events[2], "3").await["code"],
        "too-many-subscriptions"
    );
    assert_eq!(
        c.subscribe(events[1], "4").await["type"],
        "subscribed",
        "a held topic is not a new one"
    );
    c.send(&json!({"type": "unsubscribe", "topic": format!("event:{}", events[0]), "id": "5"}))
        .await;
    c.reply("5").await;
    assert_eq!(c.subscribe(events[2], "6").await["type"], "subscribed");
}

#[tokio::test]
async fn closing_removes_every_subscription() {
    let env = TestEnv::new().await;
    let events = [env.event(&[A]).await, env.event(&[B]).await];
    env.user("u", None, &events);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(events[0], "1").await;
    c.subscribe(events[1], "2").await;
    assert_eq!(host.inspector.subscriptions(), 2);
    c.ws.close(None).await.expect("close");
    assert!(eventually(|| async { host.inspector.subscriptions() == 0 }).await);
    assert!(eventually(|| async { host.metrics.connections.get() == 0 }).await);
}

#[tokio::test]
async fn binary_and_oversized_frames_close_the_connection() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;

    let mut c = host.connect(&cookie("u")).await;
    c.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("send");
    assert_eq!(c.ended(Duration::from_secs(3)).await, Ended::Close(1003));

    let mut c = host.connect(&cookie("u")).await;
    c.send_text(&format!(
        "{{\"type\":\"subscribe\",\"topic\":\"{}\"}}",
        "x".repeat(17 * 1024)
    ))
    .await;
    assert_eq!(c.ended(Duration::from_secs(3)).await, Ended::Close(1009));
}

#[tokio::test]
async fn a_session_that_expired_closes_the_connection_at_the_next_subscribe() {
    let env = TestEnv::new().await;
    let events = [env.event(&[A]).await, env.event(&[B]).await];
    env.user("u", None, &events);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    assert_eq!(c.subscribe(events[0], "1").await["type"], "subscribed");
    env.publish(&payload(A, now_ms(), 1.0, 1.0)).await;
    assert!(
        c.next().await.is_some(),
        "held topics stream whatever the session does"
    );

    // Directus answers 401 once the session is gone: retrying with the same
    // credential would never work, so the client is sent to reconnect.
    env.directus.end_session("u");
    c.send(&json!({"type": "subscribe", "topic": format!("event:{}", events[1]), "id": "2"}))
        .await;
    assert_eq!(c.ended(Duration::from_secs(3)).await, Ended::Close(1008));
    assert_eq!(
        Metrics::count(&host.metrics.closes, "reason", "session_expired"),
        1
    );
    assert_eq!(
        Client::connect(&host.ws_url, &[("cookie", &cookie("u"))])
            .await
            .err(),
        Some(401)
    );
}
