//! Resume (issue 10 §2, docs/protocol.md "Resume"): a subscribe with
//! `since` gets only the devices the client may lack, from the host's
//! memory, when the host has read the stream all along; otherwise the full
//! snapshot, as if `since` had not been sent.

use std::time::Duration;

use livecast::test_util::Metrics;
use livecast_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

const A: &str = "356307042460001";
const B: &str = "356307042460002";
const C: &str = "356307042460003";
const D: &str = "356307042460004";

/// Short, so that a test need not wait seconds for the host's memory to
/// reach back far enough; the rules are the same at any width.
const SLACK_MS: u64 = 300;

fn entries(sub: &Value) -> Vec<(String, i64)> {
    sub["snapshot"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["deviceId"].as_str().unwrap_or_default().to_owned(),
                e["ts"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

fn pair(d: &str, ts: i64) -> (String, i64) {
    (d.to_owned(), ts)
}

async fn resume(c: &mut Client, event: Uuid, id: &str, since: Value) -> Value {
    c.send(
        &json!({"type": "subscribe", "topic": format!("event:{event}"), "id": id, "since": since}),
    )
    .await;
    c.reply(id).await
}

/// Waits (on the clock, not on the host) until `ms` have passed since `t`.
async fn clock_past(t: i64, ms: u64) {
    while now_ms() <= t + ms as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A host that has read the stream for a while, and a client that holds
/// every device of `devices`: D old and long ago, B newest at `since`.
struct Scene {
    env: TestEnv,
    host: TestHost,
    event: Uuid,
    watcher: Client,
    since: i64,
}

async fn scene() -> Scene {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B, C, D]).await;
    env.user("u", None, &[event]);
    let mut config = env.config();
    config.live_resume_slack_ms = SLACK_MS;
    let host = env.start_host_with(config).await;
    let mut watcher = host.connect(&cookie("u")).await;
    watcher.subscribe(event, "w").await;
    let t0 = now_ms();
    env.publish(&payload(D, t0 - 60_000, 1.0, 1.0)).await;
    env.publish(&payload(A, t0 - 50_000, 1.0, 1.0)).await;
    watcher.ts_until(A, t0 - 50_000).await;
    // D and A reached the host more than the slack before `since`.
    clock_past(now_ms(), 2 * SLACK_MS).await;
    let since = now_ms();
    env.publish(&payload(B, since, 2.0, 2.0)).await;
    watcher.ts_until(B, since).await;
    Scene {
        env,
        host,
        event,
        watcher,
        since,
    }
}

#[tokio::test]
async fn a_resume_gets_only_what_moved_from_memory_and_live_positions_are_never_held_back() {
    let Scene {
        env,
        host,
        event,
        mut watcher,
        since,
    } = scene().await;
    // While the client is away: A moves on, and C sends a late fix, older
    // than since, that the client has never seen.
    env.publish(&payload(A, since + 1, 3.0, 3.0)).await;
    env.publish(&payload(C, since - 30_000, 4.0, 4.0)).await;
    watcher.ts_until(C, since - 30_000).await;

    let queries = host.metrics.snapshot_queries.get();
    let mut c = host.connect(&cookie("u")).await;
    let sub = resume(&mut c, event, "r", json!(since)).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    assert_eq!(sub["delta"], true, "{sub}");
    assert_eq!(sub["topic"], format!("event:{event}"));
    // B is the client's own newest position: it reached the host after
    // since - slack, so it is listed again (harmless: not newer). D is not.
    assert_eq!(
        entries(&sub),
        [pair(A, since + 1), pair(B, since), pair(C, since - 30_000)],
        "{sub}"
    );
    assert_eq!(
        host.metrics.snapshot_queries.get(),
        queries,
        "a delta costs the database nothing"
    );
    assert_eq!(Metrics::count(&host.metrics.resumes, "result", "delta"), 1);

    // since shapes the reply only: D's next fix is older than since and
    // still delivered live.
    env.publish(&payload(D, since - 40_000, 5.0, 5.0)).await;
    let got = c.ts_until(D, since - 40_000).await;
    assert_eq!(got, [json!(since - 40_000)], "live, once");

    // The same subscribe without since: the full snapshot, D included, and
    // no delta flag.
    let mut full = host.connect(&cookie("u")).await;
    let sub = full.subscribe(event, "f").await;
    assert_eq!(sub.get("delta"), None, "{sub}");
    assert_eq!(
        entries(&sub),
        [
            pair(A, since + 1),
            pair(B, since),
            pair(C, since - 30_000),
            pair(D, since - 40_000)
        ]
    );
}

#[tokio::test]
async fn since_in_the_future_or_not_covered_gets_the_full_snapshot() {
    let Scene {
        env,
        host,
        event,
        watcher,
        since,
    } = scene().await;
    drop(watcher);
    let mut c = host.connect(&cookie("u")).await;

    let sub = resume(&mut c, event, "future", json!(now_ms() + 60_000)).await;
    assert_eq!(sub.get("delta"), None, "{sub}");
    assert_eq!(entries(&sub).len(), 3, "A, B and D: {sub}");
    assert_eq!(Metrics::count(&host.metrics.resumes, "result", "future"), 1);

    // Far beyond any ts, and beyond i64.
    let sub = resume(&mut c, event, "huge", json!(u64::MAX)).await;
    assert_eq!(sub.get("delta"), None, "{sub}");
    assert_eq!(entries(&sub).len(), 3);

    // Before the host started reading: its memory cannot vouch for what
    // the client lacks.
    let sub = resume(&mut c, event, "old", json!(since - 3_600_000)).await;
    assert_eq!(sub.get("delta"), None, "{sub}");
    assert_eq!(entries(&sub).len(), 3);
    assert_eq!(
        Metrics::count(&host.metrics.resumes, "result", "not_covered"),
        1
    );

    // A restarted host has an empty memory: full snapshot from the
    // database, whatever since says.
    host.stop().await;
    env.insert_position(A, since - 10_000, 6.0, 6.0, false)
        .await;
    let mut config = env.config();
    config.live_resume_slack_ms = SLACK_MS;
    let host = env.start_host_with(config).await;
    let mut c = host.connect(&cookie("u")).await;
    let sub = resume(&mut c, event, "restarted", json!(since)).await;
    assert_eq!(sub.get("delta"), None, "{sub}");
    assert_eq!(entries(&sub), [pair(A, since - 10_000)]);
    assert_eq!(
        Metrics::count(&host.metrics.resumes, "result", "not_covered"),
        1
    );
}

#[tokio::test]
async fn a_device_moved_to_another_event_meanwhile_gets_the_full_snapshot() {
    let Scene {
        env,
        host,
        event,
        watcher,
        since,
    } = scene().await;
    drop(watcher);
    let other = env.event(&[]).await;
    env.move_device(D, event, other).await;
    // Until the host reloads its device map, a delta is still right (the
    // host does not know yet); after, only the full snapshot can take D
    // off the client's map.
    let mut c = host.connect(&cookie("u")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let (changed, last) = loop {
        n += 1;
        let last = resume(&mut c, event, &format!("m{n}"), json!(since)).await;
        if last.get("delta").is_none() {
            break (true, last);
        }
        if tokio::time::Instant::now() > deadline {
            break (false, last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(changed, "still a delta after the map reloaded: {last}");
    let devices: Vec<String> = entries(&last).into_iter().map(|(d, _)| d).collect();
    assert_eq!(devices, [A, B], "D left the event: {last}");
    assert_eq!(
        Metrics::count(&host.metrics.resumes, "result", "devices_changed"),
        1
    );
}

#[tokio::test]
async fn since_must_be_a_whole_number_of_milliseconds() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let mut c = host.connect(&cookie("u")).await;
    for (i, since) in [json!("1777716930123"), json!(-1), json!(1.5), json!(null)]
        .into_iter()
        .enumerate()
    {
        let id = format!("b{i}");
        let e = resume(&mut c, event, &id, since.clone()).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad-request")),
            "since {since}: {e}"
        );
    }
    assert_eq!(host.inspector.subscriptions(), 0, "nothing registered");
    // The connection stays usable.
    let sub = resume(&mut c, event, "ok", json!(0)).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
}
