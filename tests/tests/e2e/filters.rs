//! The WebAssembly filter chain, through the running host (plugins.md).

use std::time::{Duration, Instant};

use livecast::test_util::FilterMetrics;
use livecast_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

const A: &str = "356307042441013";
const B: &str = "356307042441014";

/// A chain entry for a shipped plugin, named after it unless `extra` names it.
fn entry(plugin_name: &str, extra: &str) -> String {
    let name = match extra.contains("name =") {
        true => String::new(),
        false => format!("name = \"{plugin_name}\"\n"),
    };
    format!(
        "[[plugin]]\n{name}path = \"{}\"\n{extra}\n",
        plugin(plugin_name)
    )
}

async fn subscribed(host: &TestHost, token: &str, event: Uuid) -> (Client, Value) {
    let mut c = host.connect(&cookie(token)).await;
    let sub = c.subscribe(event, "s").await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    (c, sub)
}

fn devices_of(positions: &[Value]) -> Vec<String> {
    let mut d: Vec<String> = positions
        .iter()
        .map(|p| p["deviceId"].as_str().unwrap_or_default().to_owned())
        .collect();
    d.sort();
    d.dedup();
    d
}

#[tokio::test]
async fn the_default_chain_is_the_passthrough_plugin_and_passes_everything() {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B]).await;
    env.user("u", None, &[event]);
    let host = env.start_host().await;
    let (mut c, _) = subscribed(&host, "u", event).await;
    let ts = now_ms();
    env.publish(&payload(A, ts, 1.0, 1.0)).await;
    env.publish(&payload(B, ts, 1.0, 1.0)).await;
    assert_eq!(
        devices_of(
            &c.positions_until(SOON, |got| has(got, A, ts) && has(got, B, ts))
                .await
        ),
        [A, B]
    );
    let f = &host.metrics.filter;
    assert!(FilterMetrics::count(&f.passed, "passthrough") >= 2);
    assert_eq!(FilterMetrics::count(&f.dropped, "passthrough"), 0);
    assert_eq!(f.chain_plugins.get(), 1);
}

#[tokio::test]
async fn a_drop_plugin_removes_exactly_its_device_from_every_subscriber_and_the_snapshot() {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B]).await;
    env.user("u1", None, &[event]);
    env.user("u2", None, &[event]);
    env.insert_position(A, now_ms() - 60_000, 1.0, 1.0, false)
        .await;
    env.insert_position(B, now_ms() - 60_000, 1.0, 1.0, false)
        .await;
    let host = env
        .start_host_with_chain(&entry(
            "drop-device",
            &format!("[plugin.config]\ndevice_id = \"{B}\""),
        ))
        .await;
    let (mut c1, sub) = subscribed(&host, "u1", event).await;
    let (mut c2, _) = subscribed(&host, "u2", event).await;
    assert_eq!(
        devices_of(sub["snapshot"].as_array().expect("snapshot")),
        [A],
        "the snapshot is filtered too"
    );

    let t0 = now_ms();
    for i in 0..5 {
        env.publish(&payload(A, t0 + i, 1.0, 1.0)).await;
        env.publish(&payload(B, t0 + i, 1.0, 1.0)).await;
    }
    for c in [&mut c1, &mut c2] {
        assert_eq!(
            devices_of(&c.positions_until(SOON, |got| has(got, A, t0 + 4)).await),
            [A]
        );
    }
    assert_eq!(
        FilterMetrics::count(&host.metrics.filter.dropped, "drop-device"),
        7,
        "5 live, and B's row in each of the two snapshots"
    );
}

#[tokio::test]
async fn a_replace_plugin_changes_what_clients_receive() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("u", None, &[event]);
    env.insert_position(A, now_ms() - 60_000, 1.0, 1.0, false)
        .await;
    let host = env
        .start_host_with_chain(&entry(
            "rewrite",
            "[plugin.config]\nfield = \"speed\"\nvalue = 99",
        ))
        .await;
    let (mut c, sub) = subscribed(&host, "u", event).await;
    assert_eq!(sub["snapshot"][0]["speed"], 99);
    env.publish(&payload(A, now_ms(), 41.5, 19.5)).await;
    let p = c.next().await.expect("position");
    assert_eq!(
        (p["speed"].clone(), p["lat"].clone(), p["course"].clone()),
        (json!(99), json!(41.5), json!(271))
    );
    assert_eq!(
        p["attributes"]["78"]["__bigint"], "18446744073709551615",
        "the rest is untouched"
    );
}

#[tokio::test]
async fn an_audience_plugin_gives_two_roles_two_streams_on_one_topic() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    let (control, public) = (Uuid::new_v4(), Uuid::new_v4());
    env.user("marshal", Some(control), &[event]);
    env.user("viewer", Some(public), &[event]);
    env.insert_position(A, now_ms() - 60_000, 41.123456, 19.654321, false)
        .await;
    let host = env
        .start_host_with_chain(&entry(
            "audience",
            &format!("[plugin.config]\nfull_roles = [\"{control}\"]\ndecimals = 2\nstrip_attributes = true"),
        ))
        .await;
    let (mut marshal, msub) = subscribed(&host, "marshal", event).await;
    let (mut viewer, vsub) = subscribed(&host, "viewer", event).await;
    // A second connection of the same viewer: the same audience.
    let (mut viewer2, _) = subscribed(&host, "viewer", event).await;
    assert_eq!(msub["snapshot"][0]["lat"], 41.123456);
    assert_eq!(
        vsub["snapshot"][0]["lat"], 41.12,
        "the snapshot follows the same rules"
    );

    let f = &host.metrics.filter;
    let (calls, items) = (
        FilterMetrics::count(&f.calls, "audience"),
        FilterMetrics::count(&f.records_in, "audience"),
    );
    env.publish(&payload(A, now_ms(), 41.327953, 19.819025))
        .await;
    let full = marshal.next().await.expect("marshal");
    let coarse = viewer.next().await.expect("viewer");
    assert_eq!(
        (full["lat"].clone(), full["lon"].clone()),
        (json!(41.327953), json!(19.819025))
    );
    assert!(full.get("attributes").is_some());
    assert_eq!(
        (coarse["lat"].clone(), coarse["lon"].clone()),
        (json!(41.33), json!(19.82))
    );
    assert!(coarse.get("attributes").is_none(), "{coarse}");
    assert_eq!(viewer2.next().await.expect("viewer2"), coarse);
    // One record, three subscribers, two audiences: one call per stage, and
    // the delivery stage decided 2 (record, audience) pairs, not 3.
    assert_eq!(FilterMetrics::count(&f.calls, "audience") - calls, 2);
    assert_eq!(
        FilterMetrics::count(&f.records_in, "audience") - items,
        1 + 2
    );
}

/// A misbehaving plugin aimed at device B, with the given policy: A's
/// records keep flowing; B's get the policy; the failure is counted.
async fn misbehaving(plugin_name: &str, policy: &str, kind: &str, extra: &str) {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B]).await;
    env.user("u", None, &[event]);
    let host = env
        .start_host_with_chain(&entry(
            plugin_name,
            &format!("policy = \"{policy}\"\ntimeout_ms = 30\n{extra}\n[plugin.config]\ndevice_id = \"{B}\""),
        ))
        .await;
    let (mut c, _) = subscribed(&host, "u", event).await;
    let t0 = now_ms();
    for i in 0..6 {
        env.publish(&payload(A, t0 + i, 1.0, 1.0)).await;
        env.publish(&payload(B, t0 + i, 1.0, 1.0)).await;
    }
    let got = c
        .positions_until(SOON, |got| {
            has(got, A, t0 + 5)
                && (policy == "fail-closed" || got.iter().any(|p| p["deviceId"] == B))
        })
        .await;
    let a: Vec<i64> = got
        .iter()
        .filter(|p| p["deviceId"] == A)
        .filter_map(|p| p["ts"].as_i64())
        .collect();
    assert_eq!(
        a.last(),
        Some(&(t0 + 5)),
        "{plugin_name}: the stream keeps flowing: {got:?}"
    );
    let b = got.iter().filter(|p| p["deviceId"] == B).count();
    match policy {
        "fail-closed" => assert_eq!(b, 0, "{plugin_name}: fail-closed drops the poison records"),
        _ => assert!(b > 0, "{plugin_name}: fail-open passes them"),
    }
    let failures = host.metrics.filter.failures_of(plugin_name, kind);
    assert!(
        failures > 0,
        "{plugin_name}: failures of kind {kind} are counted:\n{}",
        host.scrape().await
    );
    assert!(FilterMetrics::count(&host.metrics.filter.by_policy, plugin_name) > 0);
}

#[tokio::test]
async fn a_trapping_plugin_is_contained() {
    misbehaving("trap", "fail-closed", "trap", "").await;
    misbehaving("trap", "fail-open", "trap", "").await;
}

#[tokio::test]
async fn a_looping_plugin_is_stopped_at_its_deadline() {
    misbehaving("spin", "fail-closed", "timeout", "").await;
}

#[tokio::test]
async fn a_memory_bomb_is_stopped_at_its_cap() {
    misbehaving(
        "memory-bomb",
        "fail-closed",
        "memory",
        "memory_limit_bytes = 4194304",
    )
    .await;
}

#[tokio::test]
async fn malformed_output_is_a_failure() {
    misbehaving("malformed", "fail-open", "malformed", "").await;
}

#[tokio::test]
async fn a_bad_chain_file_stops_start_up_with_a_message_naming_the_entry() {
    let env = TestEnv::new().await;
    let cases = [
        (entry("reject-config", "name = \"picky\""), "\"picky\""),
        (
            "[[plugin]]\npath = \"/nonexistent/x.wasm\"\n".to_owned(),
            "plugin #1 \"x\" (/nonexistent/x.wasm)",
        ),
        (
            format!(
                "{}{}",
                entry("passthrough", ""),
                entry("drop-device", "name = \"dd\"")
            ),
            "#2 \"dd\"",
        ),
        ("[[plugin]\n".to_owned(), "invalid TOML"),
    ];
    for (toml, want) in cases {
        let mut config = env.config();
        config.live_filter_chain = Some(env.chain_file(&toml));
        let err = match livecast::Host::bind(config).await {
            Ok(_) => panic!("a bad chain must not start: {toml}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.starts_with("LIVE_FILTER_CHAIN"), "{err}");
        assert!(err.contains(want), "{toml}\n{err}");
    }
    // The plugin's own reason reaches the operator.
    let mut config = env.config();
    config.live_filter_chain = Some(env.chain_file(&entry("reject-config", "")));
    let err = livecast::Host::bind(config)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("rejects every configuration"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_reload_under_traffic_loses_no_connection_and_no_record() {
    let env = TestEnv::new().await;
    let event = env.event(&[A, B]).await;
    env.user("u", None, &[event]);
    let host = env.start_host_with_chain(&entry("passthrough", "")).await;
    let (mut c, _) = subscribed(&host, "u", event).await;

    let t0 = now_ms();
    // The reader reads until A's last record, which the writer names once
    // it knows it.
    let (last_tx, last_rx) = tokio::sync::watch::channel(None::<i64>);
    let reader = tokio::spawn(async move {
        let cap = Instant::now() + 3 * EVENTUALLY;
        let mut got = Vec::new();
        while Instant::now() < cap {
            if let Some(last) = *last_rx.borrow()
                && has(&got, A, last)
            {
                break;
            }
            match c.next_within(Duration::from_millis(200)).await {
                Some(v) if v["type"] == "position" => got.push(v),
                _ => {}
            }
        }
        (got, c)
    });
    // Traffic until the new chain is in and 40 rounds after, however long
    // the new module takes to compile (a debug build on a loaded machine
    // takes seconds).
    let mut reloaded_at = None;
    let mut i = 0i64;
    let cap = Instant::now() + 2 * EVENTUALLY;
    while reloaded_at.is_none_or(|at| i < at + 40) && Instant::now() < cap {
        env.publish(&payload(A, t0 + i, 1.0, 1.0)).await;
        env.publish(&payload(B, t0 + i, 1.0, 1.0)).await;
        if i == 60 {
            env.chain_file(&entry(
                "drop-device",
                &format!("[plugin.config]\ndevice_id = \"{B}\""),
            ));
        }
        if reloaded_at.is_none()
            && livecast::test_util::Metrics::count(&host.metrics.filter.reloads, "result", "ok")
                == 1
        {
            reloaded_at = Some(i);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        i += 1;
    }
    let rounds = i;
    let _ = last_tx.send(Some(t0 + rounds - 1));
    let reloaded_at = reloaded_at.expect("the chain was reloaded during the traffic");
    let (got, _c) = reader.await.expect("reader");
    let a: Vec<i64> = got
        .iter()
        .filter(|p| p["deviceId"] == A)
        .filter_map(|p| p["ts"].as_i64())
        .collect();
    assert_eq!(
        a,
        (0..rounds).map(|i| t0 + i).collect::<Vec<_>>(),
        "every record of A, in order, across the swap"
    );
    let b: Vec<i64> = got
        .iter()
        .filter(|p| p["deviceId"] == B)
        .filter_map(|p| p["ts"].as_i64())
        .collect();
    assert!(b.len() >= 60, "B flowed before the reload");
    assert!(
        b.iter().all(|ts| *ts <= t0 + reloaded_at),
        "B stopped once the new chain was in"
    );
    assert_eq!(host.metrics.connections.get(), 1);
    assert!(FilterMetrics::count(&host.metrics.filter.passed, "drop-device") > 0);

    // A broken file is refused and the running chain kept.
    env.chain_file("[[plugin]]\npath = \"/nonexistent.wasm\"\n");
    assert!(
        eventually(|| async {
            livecast::test_util::Metrics::count(&host.metrics.filter.reloads, "result", "error")
                == 1
        })
        .await
    );
    assert_eq!(host.metrics.filter.chain_plugins.get(), 1);
}

/// The WAT example of docs/plugin-abi.md, taken from the page itself, so the
/// page cannot drift from what the host accepts.
#[tokio::test]
async fn a_plugin_written_by_hand_from_the_abi_page_works() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/plugin-abi.md"
    ))
    .expect("abi page");
    let blocks: Vec<&str> = page
        .split("```wat")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(!blocks.is_empty(), "the ABI page has WAT examples");
    for (i, wat) in blocks.iter().enumerate() {
        let env = TestEnv::new().await;
        let event = env.event(&[A, B]).await;
        env.user("u", None, &[event]);
        let wasm =
            wat::parse_str(wat).unwrap_or_else(|e| panic!("example {i} does not assemble: {e}"));
        let path = std::env::temp_dir().join(format!("livecast-{}-{i}.wasm", env.schema));
        std::fs::write(&path, wasm).expect("write wasm");
        let host = env
            .start_host_with_chain(&format!(
                "[[plugin]]\nname = \"by-hand\"\npath = \"{}\"\n",
                path.display()
            ))
            .await;
        let (mut c, _) = subscribed(&host, "u", event).await;
        let ts = now_ms();
        env.publish(&payload(A, ts, 1.0, 1.0)).await;
        env.publish(&payload(B, ts, 1.0, 1.0)).await;
        // B last: once A is here, B would be right behind.
        let got = devices_of(&c.positions_until(SOON, |got| has(got, A, ts)).await);
        let expected: Vec<String> = match wat.contains("drops device") {
            true => vec![A.to_owned()],
            false => vec![A.to_owned(), B.to_owned()],
        };
        assert_eq!(got, expected, "example {i}");
        assert_eq!(
            host.metrics
                .filter
                .failures
                .get(&livecast::test_util::FailureLabel {
                    plugin: "by-hand".into(),
                    kind: "malformed".into()
                })
                .map(|c| c.get()),
            None
        );
        assert!(FilterMetrics::count(&host.metrics.filter.calls, "by-hand") > 0);
    }
}
