//! Who may open a WebSocket: the Origin check and the Directus session check,
//! both decided before the 101 response. A refused upgrade opens no socket.

use axum::http::{HeaderMap, StatusCode, header};

use crate::directus::{AuthError, Credential, Directus, User};
use crate::metrics::{Metrics, inc};

/// Why an upgrade was refused, and the HTTP status it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A browser page from another site (cross-site WebSocket hijacking).
    ForbiddenOrigin,
    /// No credential, or Directus does not accept it.
    Unauthorized,
    /// Directus cannot answer: an outage, not a bad cookie.
    Unavailable,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::ForbiddenOrigin => StatusCode::FORBIDDEN,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Refusal::ForbiddenOrigin => "forbidden_origin",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// Checks the upgrade request; on success returns the user and the
/// credential to reuse for per-subscribe authorization.
pub async fn authenticate(
    headers: &HeaderMap,
    allowed_origins: &[String],
    directus: &Directus,
    metrics: &Metrics,
) -> Result<(User, Credential), Refusal> {
    let result = check(headers, allowed_origins, directus, metrics).await;
    let label = match &result {
        Ok(_) => "ok",
        Err(r) => r.label(),
    };
    inc(&metrics.auth_attempts, "result", label);
    result
}

async fn check(
    headers: &HeaderMap,
    allowed_origins: &[String],
    directus: &Directus,
    metrics: &Metrics,
) -> Result<(User, Credential), Refusal> {
    if !origin_allowed(headers, allowed_origins) {
        return Err(Refusal::ForbiddenOrigin);
    }
    let cred = Credential::from_headers(headers).ok_or(Refusal::Unauthorized)?;
    let (user, took) = directus.current_user(&cred).await;
    metrics.auth_latency_ms.observe(took.as_secs_f64() * 1000.0);
    match user {
        Ok(user) => Ok((user, cred)),
        Err(AuthError::Unauthorized) => Err(Refusal::Unauthorized),
        Err(AuthError::Unavailable) => Err(Refusal::Unavailable),
    }
}

/// No `Origin` (a non-browser client) is allowed. Otherwise the origin must be
/// listed in `LIVE_WS_ALLOWED_ORIGINS`, or, when that is empty, name the host
/// the request was sent to (`Host`, or `X-Forwarded-Host` behind a proxy).
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().trim_end_matches('/');
    if !allowed.is_empty() {
        return allowed
            .iter()
            .any(|a| a.trim().trim_end_matches('/').eq_ignore_ascii_case(origin));
    }
    let Some((_, authority)) = origin.split_once("://") else {
        return false;
    };
    let forwarded = headers
        .get("x-forwarded-host")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split(',').next());
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    [forwarded, host]
        .into_iter()
        .flatten()
        .any(|h| h.trim().eq_ignore_ascii_case(authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origin_rules() {
        let none: &[String] = &[];
        assert!(origin_allowed(&headers(&[("host", "live.example")]), none));
        assert!(origin_allowed(
            &headers(&[("host", "live.example"), ("origin", "https://live.example")]),
            none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "live.example"), ("origin", "https://evil.example")]),
            none
        ));
        assert!(origin_allowed(
            &headers(&[
                ("host", "10.0.0.5:8081"),
                ("x-forwarded-host", "trm.example"),
                ("origin", "https://trm.example")
            ]),
            none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "live.example"), ("origin", "null")]),
            none
        ));
        let listed = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(
            &headers(&[("host", "x"), ("origin", "https://app.example")]),
            &listed
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "x"), ("origin", "https://x")]),
            &listed
        ));
    }
}
