//! **DEVELOPMENT ONLY.** A stand-in for Directus that speaks exactly the two
//! calls the host makes, with Directus's status codes and bodies:
//!
//! - `GET /users/me` → `200 {"data": {...}}`, or `401 INVALID_CREDENTIALS`;
//! - `GET /items/events/<id>?fields=id` → `200`, `403 FORBIDDEN`, or `404`
//!   for an event it does not know (real Directus answers 403 there too; the
//!   stand-in distinguishes them so the host's `not-found` path is testable).
//!
//! It runs only when the demo or a test starts it, never in `livecast serve`.
//! A session token is accepted in any cookie (Directus's session cookie is
//! `directus_session_token`) or as a bearer token.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A user the stand-in knows, by session token.
#[derive(Debug, Clone)]
pub struct StandInUser {
    pub id: Uuid,
    pub email: String,
    pub role: Option<Uuid>,
    /// Events this user may read.
    pub events: HashSet<Uuid>,
}

#[derive(Default)]
struct Inner {
    users: RwLock<HashMap<String, StandInUser>>,
    events: RwLock<HashSet<Uuid>>,
    failing: AtomicBool,
    /// Milliseconds every `/users/me` answer waits (a slow Directus).
    delay_ms: AtomicU64,
    users_me_calls: AtomicU64,
    items_calls: AtomicU64,
}

/// A running stand-in. Dropping it stops it.
pub struct DirectusStandIn {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl Drop for DirectusStandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DirectusStandIn {
    /// Starts it on `bind` (port 0 picks a free port).
    pub async fn start(bind: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/users/me", get(users_me))
            .route("/items/events/{id}", get(event))
            .with_state(inner.clone());
        let stop = CancellationToken::new();
        let server =
            axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        tokio::spawn(async move {
            let _ = server.await;
        });
        tracing::warn!(%addr, "DIRECTUS STAND-IN (development only) is answering /users/me and /items/events");
        Ok(Self { addr, inner, stop })
    }

    /// Base URL to give the host as `DIRECTUS_BASE_URL`.
    pub fn url(&self) -> reqwest::Url {
        reqwest::Url::parse(&format!("http://{}", self.addr))
            .expect("a socket address is a valid URL")
    }

    /// Registers an event that exists.
    pub fn add_event(&self, event: Uuid) {
        self.inner
            .events
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(event);
    }

    /// Registers a user and the token of their session.
    pub fn add_user(&self, token: &str, user: StandInUser) {
        for e in &user.events {
            self.add_event(*e);
        }
        self.inner
            .users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_owned(), user);
    }
}

/// What tests do to the stand-in besides adding users.
#[cfg(feature = "test-util")]
impl DirectusStandIn {
    /// Ends a session: the token is no longer accepted (as after an expiry
    /// or a logout).
    pub fn end_session(&self, token: &str) {
        self.inner
            .users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    /// The user a token belongs to.
    pub fn user(&self, token: &str) -> Option<StandInUser> {
        self.inner
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    /// When set, every call answers 503 (an outage).
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::Relaxed);
    }

    /// Makes every `/users/me` answer wait this long (a slow Directus).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.inner
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// `/users/me` calls served so far.
    pub fn users_me_calls(&self) -> u64 {
        self.inner.users_me_calls.load(Ordering::Relaxed)
    }

    /// `/items/events` calls served so far.
    pub fn items_calls(&self) -> u64 {
        self.inner.items_calls.load(Ordering::Relaxed)
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"message": message, "extensions": {"code": code}}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
        "Service unavailable.",
    )
}

fn invalid_credentials() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "INVALID_CREDENTIALS",
        "Invalid user credentials.",
    )
}

/// The session token: any cookie's value, or a bearer token.
fn user_of(inner: &Inner, headers: &HeaderMap) -> Option<StandInUser> {
    let users = inner.users.read().unwrap_or_else(|e| e.into_inner());
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.split_once('=').map(|(_, v)| v.trim()));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    cookies
        .chain(bearer)
        .find_map(|token| users.get(token).cloned())
}

async fn users_me(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.users_me_calls.fetch_add(1, Ordering::Relaxed);
    let delay = inner.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    if inner.failing.load(Ordering::Relaxed) {
        return unavailable();
    }
    let Some(user) = user_of(&inner, &headers) else {
        return invalid_credentials();
    };
    let body = serde_json::json!({"data": {
        "id": user.id,
        "email": user.email,
        "role": user.role,
        "first_name": "Demo",
        "last_name": "User",
    }});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn event(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    inner.items_calls.fetch_add(1, Ordering::Relaxed);
    if inner.failing.load(Ordering::Relaxed) {
        return unavailable();
    }
    let Some(user) = user_of(&inner, &headers) else {
        return invalid_credentials();
    };
    let forbidden = || {
        error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "You don't have permission to access this.",
        )
    };
    let Ok(event) = Uuid::try_parse(&id) else {
        return forbidden();
    };
    if !inner
        .events
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&event)
    {
        return error(StatusCode::NOT_FOUND, "ROUTE_NOT_FOUND", "Item not found.");
    }
    if !user.events.contains(&event) {
        return forbidden();
    }
    let body = serde_json::json!({"data": {"id": event}});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
