//! Who may open a socket (live-ws.md §2).

use livecast::test_util::Metrics;
use livecast_tests::*;

const A: &str = "356307042441013";

#[tokio::test]
async fn no_credential_or_a_bad_one_gets_401() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("good", None, &[event]);
    let host = env.start_host().await;

    assert_eq!(Client::connect(&host.ws_url, &[]).await.err(), Some(401));
    assert_eq!(
        Client::connect(&host.ws_url, &[("cookie", &cookie("expired"))])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        Client::connect(&host.ws_url, &[("authorization", "Basic Z29vZDp4")])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        Metrics::count(&host.metrics.auth_attempts, "result", "unauthorized"),
        3
    );
    // No credential means no Directus call at all.
    assert_eq!(env.directus.users_me_calls(), 1);
}

#[tokio::test]
async fn cookie_and_bearer_both_authenticate() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("good", None, &[event]);
    let host = env.start_host().await;

    let mut by_cookie = host.connect(&cookie("good")).await;
    assert_eq!(by_cookie.subscribe(event, "c").await["type"], "subscribed");
    let mut by_bearer = Client::connect(&host.ws_url, &[("authorization", "Bearer good")])
        .await
        .expect("bearer accepted");
    assert_eq!(by_bearer.subscribe(event, "b").await["type"], "subscribed");
    assert_eq!(
        Metrics::count(&host.metrics.auth_attempts, "result", "ok"),
        2
    );
}

#[tokio::test]
async fn directus_down_gets_503() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("good", None, &[event]);
    let host = env.start_host().await;

    env.directus.set_failing(true);
    assert_eq!(
        Client::connect(&host.ws_url, &[("cookie", &cookie("good"))])
            .await
            .err(),
        Some(503)
    );
    env.directus.set_failing(false);
    assert!(
        Client::connect(&host.ws_url, &[("cookie", &cookie("good"))])
            .await
            .is_ok()
    );

    // Unreachable (nothing listens there) is an outage too, not a bad cookie.
    let mut config = env.config();
    config.directus_base_url = "http://127.0.0.1:9/".parse().expect("url");
    let unreachable = env.start_host_with(config).await;
    assert_eq!(
        Client::connect(&unreachable.ws_url, &[("cookie", &cookie("good"))])
            .await
            .err(),
        Some(503)
    );
    assert_eq!(
        Metrics::count(&unreachable.metrics.auth_attempts, "result", "unavailable"),
        1
    );
}

#[tokio::test]
async fn foreign_origin_gets_403_and_same_origin_passes() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("good", None, &[event]);
    let host = env.start_host().await;
    let own = host
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws-live")
        .to_owned();

    let c = cookie("good");
    assert_eq!(
        Client::connect(
            &host.ws_url,
            &[("cookie", &c), ("origin", "https://evil.example")]
        )
        .await
        .err(),
        Some(403)
    );
    assert!(
        Client::connect(
            &host.ws_url,
            &[("cookie", &c), ("origin", &format!("http://{own}"))]
        )
        .await
        .is_ok()
    );
    assert_eq!(
        Metrics::count(&host.metrics.auth_attempts, "result", "forbidden_origin"),
        1
    );
    // A refused origin costs no Directus call.
    assert_eq!(env.directus.users_me_calls(), 1);

    let mut config = env.config();
    config.live_ws_allowed_origins = vec!["https://trm.example".into()];
    let listed = env.start_host_with(config).await;
    assert!(
        Client::connect(
            &listed.ws_url,
            &[("cookie", &c), ("origin", "https://trm.example")]
        )
        .await
        .is_ok()
    );
    assert_eq!(
        Client::connect(
            &listed.ws_url,
            &[("cookie", &c), ("origin", &format!("http://{own}"))]
        )
        .await
        .err(),
        Some(403)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_past_the_handshake_limit_wait_then_get_503_with_retry_after() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("good", None, &[event]);
    let mut config = env.config();
    config.live_ws_max_handshakes = 2;
    config.live_ws_handshake_wait_ms = 300;
    let host = env.start_host_with(config).await;

    // Directus answers slowly: two upgrades hold both handshake slots.
    env.directus.set_delay(std::time::Duration::from_secs(3));
    let url = host.ws_url.clone();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Client::connect(&url, &[("cookie", &cookie("good"))]).await })
        })
        .collect();
    assert!(eventually(|| async { env.directus.users_me_calls() == 2 }).await);
    assert_eq!(host.metrics.handshakes_in_flight.get(), 2);

    // A third waits its 300 ms, then is told to come back, without costing
    // Directus a call.
    let mut req = url.as_str().into_client_request().expect("request");
    req.headers_mut()
        .insert("cookie", cookie("good").parse().expect("cookie"));
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("1")
            );
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "a socket")),
    }
    assert_eq!(host.metrics.handshakes_refused.get(), 1);
    assert_eq!(env.directus.users_me_calls(), 2);

    // The two slow ones get through, and the slots are free again.
    for s in slow {
        assert!(s.await.expect("task").is_ok());
    }
    env.directus.set_delay(std::time::Duration::ZERO);
    assert!(
        Client::connect(&url, &[("cookie", &cookie("good"))])
            .await
            .is_ok()
    );
    assert_eq!(host.metrics.handshakes_in_flight.get(), 0);
}
