//! The load harness in its smoke mode: a few seconds, a few clients, and
//! correctness only (its speed numbers mean nothing in a debug build under
//! a parallel test run).

use std::path::PathBuf;
use std::time::Duration;

use livecast_tests::TestEnv;
use livecast_tests::load::{self, Scenario, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_harness_accounts_for_every_delivery() {
    // The harness scrapes the host with reqwest, which has no crypto
    // provider of its own: run alone, nothing else installs one.
    livecast::test_util::install_crypto();
    let env = TestEnv::new().await;
    load::seed(&env.db, 0..1, 10).await.expect("seed");
    let target = Target {
        redis_url: livecast_tests::services().redis_url.clone(),
        postgres_url: env.postgres_url.clone(),
        stream: env.stream.clone(),
        host_bin: PathBuf::from(env!("CARGO_BIN_EXE_livecast-test-host")),
        chain: None,
    };
    let mut scenario = Scenario {
        name: "smoke".into(),
        clients: 12,
        stuck_clients: 2,
        events: 1,
        devices_per_event: 10,
        rate: 100,
        duration: Duration::from_secs(2),
        deflate: false,
    };
    let mut per_delivery = Vec::new();
    // Then every client with permessage-deflate, as browsers connect.
    for deflate in [false, true] {
        scenario.deflate = deflate;
        let r = load::run(&target, &scenario).await.expect("run");
        assert_eq!(r.connections_held, 12);
        assert!(r.records_published >= 150, "{r:?}");
        assert_eq!(r.deliveries_expected, 10 * r.records_published);
        assert!(r.deliveries_received > 0);
        assert_eq!((r.lost, r.duplicated, r.out_of_order), (0, 0, 0), "{r:?}");
        assert!(
            r.host_rss_kib_with_clients > 0 && r.host_cpu_percent > 0.0,
            "{r:?}"
        );
        per_delivery.push(r.wire_bytes_per_delivery);
    }
    // Compressed positions are smaller on the wire.
    println!("wire bytes per delivery, plain and deflate: {per_delivery:?}");
    assert!(per_delivery[1] < per_delivery[0], "{per_delivery:?}");
}
