//! Cost of the filter chain per record, on realistic batches.
//!
//! `cargo bench -p livecast-tests --bench chain` prints, for batches of 256 stream
//! payloads with IO attributes, the time `Chain::filter` takes per record:
//! without plugins, with the shipped pass-through plugin, and with plugins
//! that parse every record. The delivery stage is measured per (record,
//! audience) pair. Only the chain call is timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use livecast::test_util::Position;
use livecast::test_util::{AudienceRef, Chain, ChainSpec, FilterMetrics, Record};
use livecast::test_util::{
    DEFAULT_MAX_MODULE_BYTES, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT, PLUGIN_DIR, PluginSpec, Policy,
};

const BATCH: usize = 256;
const DEVICES: usize = 64;

fn payload(i: usize) -> Vec<u8> {
    let device = 356_307_042_440_000u64 + (i % DEVICES) as u64;
    let step = (i / DEVICES) as f64;
    let ms = i / DEVICES;
    format!(
        r#"{{"device_id":"{device}","timestamp":"2026-05-02T10:{:02}:{:02}.{:03}Z","latitude":{},"longitude":{},"altitude":112,"angle":271,"speed":63,"satellites":11,"priority":0,"attributes":{{"239":1,"240":1,"21":4,"200":0,"69":1,"181":9,"182":7,"66":12841,"24":63,"16":{},"78":{{"__bigint":"18446744073709551615"}},"385":{{"__buffer_b64":"AQID"}}}}}}"#,
        (ms / 60_000) % 60,
        (ms / 1000) % 60,
        ms % 1000,
        41.3 + step * 1e-5,
        19.8 + step * 1e-5,
        1_000_000 + i
    )
    .into_bytes()
}

/// Batch `round`, freshly decoded, as the record path hands it to the chain
/// (its payloads are in cache, as they just were parsed).
fn batch(round: usize) -> Vec<Record> {
    (round * BATCH..(round + 1) * BATCH)
        .map(|i| {
            let payload = payload(i);
            let position = Position::decode(&payload).expect("valid sample");
            Record {
                payload: Bytes::from(payload),
                position,
            }
        })
        .collect()
}

fn chain(plugin: Option<(&str, &str)>) -> Chain {
    let Some((name, config)) = plugin else {
        return Chain::empty();
    };
    let path = format!("{PLUGIN_DIR}/plugin_{}.wasm", name.replace('-', "_"));
    let spec = ChainSpec {
        plugins: vec![PluginSpec {
            name: name.into(),
            origin: path.clone(),
            wasm: std::fs::read(&path).expect("plugin built by the host's build script"),
            config_json: config.into(),
            policy: Policy::FailOpen,
            timeout: DEFAULT_TIMEOUT,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }],
        max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
    };
    Chain::load(&spec, &Arc::new(FilterMetrics::default())).expect("load")
}

/// ns per record of `Chain::filter`, over `rounds` batches.
fn record_stage(mut chain: Chain, rounds: usize) -> f64 {
    let mut timed = Duration::ZERO;
    for round in 0..rounds {
        let mut b = batch(round);
        let t = Instant::now();
        chain.filter(&mut b);
        timed += t.elapsed();
        std::hint::black_box(&b);
    }
    timed.as_nanos() as f64 / (BATCH * rounds) as f64
}

/// ns per (record, audience) pair of `Chain::deliver`.
fn delivery_stage(mut chain: Chain, audiences: usize, rounds: usize) -> f64 {
    let names: Vec<(String, String)> = (0..audiences)
        .map(|i| (format!("role-{}", i % 2), format!("user-{i}")))
        .collect();
    let auds: Vec<AudienceRef<'_>> = names
        .iter()
        .map(|(role, user)| AudienceRef {
            topic: "event:0b6c7c1e-3a3b-4b8e-9d1a-2f6f5c4e8a10",
            role,
            user_id: user,
        })
        .collect();
    let pairs: Vec<(u32, u32)> = (0..BATCH as u32)
        .flat_map(|r| (0..audiences as u32).map(move |a| (r, a)))
        .collect();
    let mut timed = Duration::ZERO;
    for round in 0..rounds {
        let b = batch(round);
        let payloads: Vec<&[u8]> = b.iter().map(|r| &r.payload[..]).collect();
        let t = Instant::now();
        let d = chain.deliver(&payloads, &auds, &pairs);
        timed += t.elapsed();
        std::hint::black_box(d);
    }
    timed.as_nanos() as f64 / (pairs.len() * rounds) as f64
}

/// Re-filters one batch in a loop, for a profiler: `--profile <plugin>
/// [rounds]` (200,000 by default; fewer for valgrind).
fn profile(name: &str, rounds: usize) {
    let mut c = chain(Some((name, "{}")));
    let mut one = batch(0);
    let t = Instant::now();
    for _ in 0..rounds {
        c.filter(&mut one);
    }
    println!(
        "{name}: {:.1} ns/record",
        t.elapsed().as_nanos() as f64 / (rounds * BATCH) as f64
    );
}

fn main() {
    // `cargo bench` passes --bench; a `--quick` run is for CI smoke checks.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        let rounds = args.get(i + 2).and_then(|r| r.parse().ok());
        return profile(
            args.get(i + 1).map_or("passthrough", String::as_str),
            rounds.unwrap_or(200_000),
        );
    }
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = if quick { 20 } else { 2_000 };
    let keep = r#"{"keep":["239","240","21","66","24"]}"#;
    let keep_all =
        r#"{"keep":["239","240","21","200","69","181","182","66","24","16","78","385"]}"#;
    let role = r#"{"full_roles":["role-0"],"decimals":3}"#;

    // Warm up: compile every module once (the engine caches by hash).
    for (name, cfg) in [
        ("passthrough", "{}"),
        ("plausibility", "{}"),
        ("attributes-allowlist", keep),
        ("audience", role),
    ] {
        record_stage(chain(Some((name, cfg))), 4);
    }
    let none = record_stage(chain(None), rounds);
    let rows = [
        ("no plugin", none),
        (
            "passthrough",
            record_stage(chain(Some(("passthrough", "{}"))), rounds),
        ),
        (
            "plausibility (parses, passes)",
            record_stage(chain(Some(("plausibility", "{}"))), rounds),
        ),
        (
            "attributes-allowlist, keeps all (parses, passes)",
            record_stage(chain(Some(("attributes-allowlist", keep_all))), rounds),
        ),
        (
            "attributes-allowlist, strips 7 of 12 (parses, replaces)",
            record_stage(chain(Some(("attributes-allowlist", keep))), rounds),
        ),
    ];
    println!("filter chain, record stage: batches of {BATCH} records, {rounds} batches");
    println!(
        "{:<58} {:>12} {:>14}",
        "chain", "ns/record", "added vs none"
    );
    for (name, ns) in rows {
        println!("{name:<58} {ns:>12.1} {:>14.1}", ns - none);
    }
    let pairs = delivery_stage(chain(Some(("audience", role))), 4, rounds / 4);
    println!(
        "{:<58} {pairs:>12.1}",
        "audience delivery stage, 4 audiences (ns per pair)"
    );
}
