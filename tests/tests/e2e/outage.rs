//! Redis, PostgreSQL or Directus going away degrades service and recovers by
//! itself. Each outage is a TCP proxy in front of the real service, cut and
//! restored, so other tests keep their services.

use livecast_tests::proxy::via;
use livecast_tests::*;
use serde_json::Value;

const A: &str = "356307042441013";

#[tokio::test]
async fn redis_going_away_and_coming_back() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    let proxy = Proxy::start(proxy::authority(&services().redis_url)).await;
    let mut config = env.config();
    config.redis_url = via(&services().redis_url, proxy.addr);
    let host = env.start_host_with(config).await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;
    let t = now_ms();
    env.publish(&payload(A, t, 1.0, 1.0)).await;
    assert!(c.next().await.is_some());

    proxy.down();
    assert!(
        eventually(|| async { !host.inspector.redis_ready() }).await,
        "readiness drops"
    );
    let ready = reqwest::get(format!("{}/readyz", host.metrics_url))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    // Published while the host cannot read: delivered after the reconnect.
    env.publish(&payload(A, t + 1, 2.0, 2.0)).await;
    proxy.up();
    assert!(
        eventually(|| async { host.inspector.redis_ready() }).await,
        "it reconnects by itself"
    );
    env.publish(&payload(A, t + 2, 3.0, 3.0)).await;
    let got: Vec<Value> = c.ts_until(A, t + 2).await;
    assert_eq!(got, [Value::from(t + 1), Value::from(t + 2)]);
    assert_eq!(
        host.metrics.connections.get(),
        1,
        "clients stay connected through the outage"
    );
}

#[tokio::test]
async fn postgres_going_away_serves_snapshots_from_memory() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    env.insert_position(A, now_ms() - 60_000, 1.0, 1.0, false)
        .await;
    let proxy = Proxy::start(proxy::authority(&services().postgres_url)).await;
    let mut config = env.config();
    config.postgres_url = via(&env.postgres_url, proxy.addr);
    config.live_snapshot_timeout_ms = 1_000;
    // Every subscribe asks the database: a snapshot shared from before the
    // outage would not show what the host serves during it.
    config.live_snapshot_share_ms = 0;
    let host = env.start_host_with(config).await;
    let mut c = host.connect(&cookie("u")).await;
    c.subscribe(event, "s").await;
    let t = now_ms();
    env.publish(&payload(A, t, 2.0, 2.0)).await;
    assert!(c.next().await.is_some());

    proxy.down();
    let mut other = host.connect(&cookie("u")).await;
    let sub = other.subscribe(event, "s2").await;
    assert_eq!(sub["type"], "subscribed", "fail open: {sub}");
    let snapshot = sub["snapshot"].as_array().expect("snapshot");
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0]["ts"], t, "what the host holds in memory");
    assert!(host.metrics.snapshot_failures.get() >= 1);
    // The stream keeps flowing without the database.
    env.publish(&payload(A, t + 1, 3.0, 3.0)).await;
    assert_eq!(
        other.next().await.map(|p| p["ts"].clone()),
        Some(Value::from(t + 1))
    );

    proxy.up();
    let failures = host.metrics.snapshot_failures.get();
    let mut third = host.connect(&cookie("u")).await;
    assert!(
        eventually(|| async {
            host.metrics
                .device_map_refreshes
                .get_or_create(&[("result", "ok")])
                .get()
                > 2
        })
        .await
    );
    assert_eq!(third.subscribe(event, "s3").await["type"], "subscribed");
    assert_eq!(
        host.metrics.snapshot_failures.get(),
        failures,
        "the database answers again"
    );
}

#[tokio::test]
async fn a_pooled_connection_that_died_silently_does_not_stall_a_snapshot() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    // Only the database knows this position: a snapshot from memory would
    // be empty.
    let ts = now_ms() - 60_000;
    env.insert_position(A, ts, 1.0, 1.0, false).await;
    let proxy = Proxy::start(proxy::authority(&services().postgres_url)).await;
    let mut config = env.config();
    config.postgres_url = via(&env.postgres_url, proxy.addr);
    // Only the snapshots use the pool meanwhile.
    config.live_device_event_refresh_ms = 600_000;
    // The second subscribe must ask the database, not share the first's.
    config.live_snapshot_share_ms = 0;
    let host = env.start_host_with(config).await;
    let mut c = host.connect(&cookie("u")).await;
    assert_eq!(c.subscribe(event, "s1").await["snapshot"][0]["ts"], ts);
    assert!(eventually(|| async { host.inspector.idle_db_connections() > 0 }).await);

    // PostgreSQL "comes back" behind a new path: every pooled connection is
    // dead without knowing it, new ones work.
    proxy.freeze();
    let sub = c.subscribe(event, "s2").await;
    assert_eq!(
        sub["snapshot"][0]["ts"], ts,
        "the snapshot still comes from the database: {sub}"
    );
    assert_eq!(host.metrics.snapshot_failures.get(), 0);
}
