//! The live map page of `livecast demo`, served on the WebSocket listener
//! so that it shares the origin of `/ws-live`: the browser then sends the
//! demo's session cookie with the upgrade, exactly as it sends the Directus
//! cookie behind the TRM proxy, and the host's same-origin check passes.
//!
//! The files are the ones in `clients/js/`, compiled into the binary so the
//! demo needs no checkout at run time. The page imports the client by the
//! relative path `../livecast.js`, so the same files work from any static
//! server that serves `clients/js/`.

use std::sync::Arc;

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::server::Pages;

/// Where the map page lives on the listener.
pub const MAP_PATH: &str = "/map/";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Path, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    (
        MAP_PATH,
        HTML,
        include_str!("../../../clients/js/map/index.html"),
    ),
    (
        "/map/index.html",
        HTML,
        include_str!("../../../clients/js/map/index.html"),
    ),
    (
        "/map/map.js",
        JS,
        include_str!("../../../clients/js/map/map.js"),
    ),
    (
        "/map/map.css",
        CSS,
        include_str!("../../../clients/js/map/map.css"),
    ),
    (
        "/livecast.js",
        JS,
        include_str!("../../../clients/js/livecast.js"),
    ),
];

/// Tiles are the only thing the page may load from elsewhere (an optional
/// base map), so everything else is pinned to this origin.
const CSP: &str = "default-src 'self'; img-src * data:; connect-src 'self' ws: wss:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// The map page and its scripts. `session_cookie` (`name=value`) is set on
/// the page's response, so a browser that opens the page is signed in to the
/// Directus stand-in.
pub fn map_pages(session_cookie: Option<String>) -> Pages {
    let set_cookie = session_cookie.and_then(|c| {
        HeaderValue::from_str(&format!("{c}; Path=/; HttpOnly; SameSite=Strict")).ok()
    });
    Arc::new(move |method: &Method, path: &str| page(method, path, set_cookie.as_ref()))
}

fn page(method: &Method, path: &str, set_cookie: Option<&HeaderValue>) -> Option<Response> {
    if path == "/map" {
        return Some(
            (
                StatusCode::PERMANENT_REDIRECT,
                [(header::LOCATION, MAP_PATH)],
            )
                .into_response(),
        );
    }
    let &(_, content_type, body) = FILES.iter().find(|(p, _, _)| *p == path)?;
    if method != Method::GET && method != Method::HEAD {
        return Some(
            (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::ALLOW, "GET, HEAD")],
                "GET only\n",
            )
                .into_response(),
        );
    }
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type),
            // The files are compiled in: a rebuilt demo must not be shadowed
            // by a cached older script.
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        if method == Method::HEAD { "" } else { body },
    )
        .into_response();
    if content_type == HTML
        && let Some(cookie) = set_cookie
    {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, cookie.clone());
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Option<Response> {
        map_pages(Some("directus_session_token=t".into()))(&Method::GET, path)
    }

    #[test]
    fn serves_the_page_with_the_session_cookie_and_its_scripts_without() {
        let page = get("/map/").expect("the page");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()[header::CONTENT_TYPE], HTML);
        assert_eq!(
            page.headers()[header::SET_COOKIE],
            "directus_session_token=t; Path=/; HttpOnly; SameSite=Strict"
        );
        for script in ["/map/map.js", "/livecast.js"] {
            let r = get(script).expect(script);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()[header::CONTENT_TYPE], JS);
            assert!(r.headers().get(header::SET_COOKIE).is_none());
        }
    }

    #[test]
    fn other_paths_are_not_pages_and_other_methods_are_refused() {
        assert!(get("/map/../livecast.js").is_none());
        assert!(get("/metrics").is_none());
        assert!(get("/livecast.d.ts").is_none());
        assert_eq!(
            get("/map").expect("redirect").status(),
            StatusCode::PERMANENT_REDIRECT
        );
        let post = map_pages(None)(&Method::POST, "/map/").expect("answered");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn without_a_session_no_cookie_is_set() {
        let page = map_pages(None)(&Method::GET, "/map/").expect("the page");
        assert!(page.headers().get(header::SET_COOKIE).is_none());
    }
}
