//! The demo's map page on the WebSocket listener: served only when the host
//! is given pages, on the origin of `/ws-live`, so that the cookie the page
//! sets reaches the upgrade and the same-origin check passes.

use livecast::Host;
use livecast::test_util::page;
use livecast_tests::*;

const A: &str = "356307042441013";

#[tokio::test]
async fn a_host_given_no_pages_serves_none() {
    let env = TestEnv::new().await;
    let host = env.start_host().await;
    let origin = format!("http://{}", proxy::authority(&host.ws_url));
    for path in ["/map/", "/livecast.js"] {
        let r = reqwest::get(format!("{origin}{path}")).await.expect("GET");
        assert_eq!(r.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn the_map_page_signs_the_browser_in_on_the_origin_of_ws_live() {
    let env = TestEnv::new().await;
    let event = env.event(&[A]).await;
    env.user("page-session", None, &[event]);
    let mut host = Host::bind(env.config()).await.expect("bind");
    host.serve_pages(page::map_pages(Some(
        "directus_session_token=page-session".into(),
    )));
    let host = TestHost::run(host).await;
    let origin = format!("http://{}", proxy::authority(&host.ws_url));

    let page = reqwest::get(format!("{origin}/map/?event={event}"))
        .await
        .expect("GET the page");
    assert_eq!(page.status(), 200);
    let set_cookie = page.headers()["set-cookie"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let body = page.text().await.expect("body");
    assert!(
        body.contains(r#"<script type="module" src="map.js">"#),
        "{body}"
    );
    let client = reqwest::get(format!("{origin}/livecast.js"))
        .await
        .expect("GET the client");
    assert_eq!(
        client.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(
        client.text().await.expect("body"),
        include_str!("../../../clients/js/livecast.js")
    );

    // What the browser sends next: the cookie, and the page's origin.
    let cookie = set_cookie.split(';').next().expect("name=value");
    let mut c = Client::connect(&host.ws_url, &[("cookie", cookie), ("origin", &origin)])
        .await
        .expect("the page's origin and cookie open the socket");
    assert_eq!(c.subscribe(event, "m").await["type"], "subscribed");
    // Another site's page riding on that cookie is still refused.
    assert_eq!(
        Client::connect(
            &host.ws_url,
            &[("cookie", cookie), ("origin", "http://elsewhere.example")]
        )
        .await
        .err(),
        Some(403)
    );
}
