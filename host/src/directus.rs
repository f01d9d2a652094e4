//! The two Directus calls the host makes: who is this user (at upgrade) and
//! may they read this event (at subscribe). Never called per record.

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, COOKIE, HeaderValue};
use serde::Deserialize;
use uuid::Uuid;

/// The credential a browser presented at upgrade, forwarded unchanged to
/// Directus. Its `Debug` output is redacted so it can never reach a log.
#[derive(Clone)]
pub enum Credential {
    /// The raw `Cookie` header (cookie-name-agnostic: any Directus auth cookie works).
    Cookie(HeaderValue),
    /// A raw `Authorization: Bearer …` header, used when there is no cookie.
    Bearer(HeaderValue),
}

/// A copy of a header value in an allocation of its own. A parsed header is
/// a view into the HTTP connection's 8 KiB read buffer; keeping the view for
/// the connection's lifetime would keep that whole buffer.
fn detached(v: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    copy.set_sensitive(true);
    copy
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Cookie(_) => f.write_str("Cookie(<redacted>)"),
            Credential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credential {
    /// The credential of an upgrade request: its cookie, or else its bearer token.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Option<Credential> {
        if let Some(c) = headers.get(COOKIE).filter(|c| !c.is_empty()) {
            return Some(Credential::Cookie(detached(c)));
        }
        let auth = headers.get(AUTHORIZATION)?;
        let bytes = auth.as_bytes();
        if bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(Credential::Bearer(detached(auth)));
        }
        None
    }

    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Credential::Cookie(v) => req.header(COOKIE, v.clone()),
            Credential::Bearer(v) => req.header(AUTHORIZATION, v.clone()),
        }
    }
}

/// The Directus user bound to a connection for its lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: Option<String>,
    /// The role id (Directus returns the id unless the role is expanded).
    pub role: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// Why `/users/me` did not yield a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// The credential is missing, invalid or expired: HTTP 401.
    Unauthorized,
    /// Directus is unreachable, timed out or failing: HTTP 503.
    Unavailable,
}

/// The answer to "may this user read this event".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authz {
    Allowed,
    Forbidden,
    NotFound,
    /// The connection's session is no longer valid (401): the client must
    /// reconnect with a fresh one.
    SessionExpired,
    /// Directus failed, timed out or answered something unexpected.
    Error,
}

impl Authz {
    pub fn label(self) -> &'static str {
        match self {
            Authz::Allowed => "ok",
            Authz::Forbidden => "forbidden",
            Authz::NotFound => "not_found",
            Authz::SessionExpired => "session_expired",
            Authz::Error => "error",
        }
    }
}

/// A Directus client: one connection pool, timeouts per call.
#[derive(Clone)]
pub struct Directus {
    http: reqwest::Client,
    base: reqwest::Url,
    auth_timeout: Duration,
    authz_timeout: Duration,
}

#[derive(Deserialize)]
struct MeBody {
    data: Option<MeData>,
}

#[derive(Deserialize)]
struct MeData {
    id: serde_json::Value,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    role: Option<serde_json::Value>,
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
}

fn id_of(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        // An expanded relation (`role: {id, name, …}`)
        serde_json::Value::Object(o) => o.get("id").and_then(id_of),
        _ => None,
    }
}

impl Directus {
    pub fn new(base: reqwest::Url, auth_timeout: Duration, authz_timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(auth_timeout.min(authz_timeout))
            .pool_idle_timeout(Duration::from_secs(60))
            // A burst of upgrades opens many connections at once; keeping
            // them all idle afterwards would cost memory for nothing.
            .pool_max_idle_per_host(16)
            .build()
            // Only fails when no TLS provider is installed, which is a build defect.
            .expect("HTTP client (is a rustls crypto provider installed?)");
        Self {
            http,
            base,
            auth_timeout,
            authz_timeout,
        }
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        let joined = format!("{}/{}", url.path().trim_end_matches('/'), path);
        url.set_path(&joined);
        url
    }

    /// `GET /users/me` with the user's credential.
    pub async fn current_user(&self, cred: &Credential) -> (Result<User, AuthError>, Duration) {
        let started = Instant::now();
        let req = cred
            .apply(self.http.get(self.url("users/me")))
            .timeout(self.auth_timeout);
        let result = match req.send().await {
            Err(_) => Err(AuthError::Unavailable),
            Ok(resp) => match resp.status() {
                StatusCode::OK => match resp.bytes().await {
                    Err(e) if e.is_timeout() => Err(AuthError::Unavailable),
                    Err(_) => Err(AuthError::Unauthorized),
                    Ok(body) => match serde_json::from_slice::<MeBody>(&body) {
                        Ok(MeBody { data: Some(d) }) => match id_of(&d.id) {
                            Some(id) => Ok(User {
                                id,
                                email: d.email,
                                role: d.role.as_ref().and_then(id_of),
                                first_name: d.first_name,
                                last_name: d.last_name,
                            }),
                            None => Err(AuthError::Unauthorized),
                        },
                        // `data: null` is an expired session; a body that does not
                        // parse is a credential we cannot trust either.
                        Ok(MeBody { data: None }) | Err(_) => Err(AuthError::Unauthorized),
                    },
                },
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    Err(AuthError::Unavailable)
                }
                _ => Err(AuthError::Unauthorized),
            },
        };
        (result, started.elapsed())
    }

    /// `GET /items/events/<id>?fields=id` with the user's credential.
    pub async fn authorize_event(&self, cred: &Credential, event: Uuid) -> (Authz, Duration) {
        let started = Instant::now();
        let mut url = self.url(&format!("items/events/{event}"));
        url.set_query(Some("fields=id"));
        let req = cred.apply(self.http.get(url)).timeout(self.authz_timeout);
        let authz = match req.send().await {
            Err(_) => Authz::Error,
            Ok(resp) => match resp.status() {
                StatusCode::OK => Authz::Allowed,
                StatusCode::FORBIDDEN => Authz::Forbidden,
                StatusCode::NOT_FOUND => Authz::NotFound,
                StatusCode::UNAUTHORIZED => Authz::SessionExpired,
                _ => Authz::Error,
            },
        };
        (authz, started.elapsed())
    }
}
