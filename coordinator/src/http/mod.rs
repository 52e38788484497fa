//! The coordinator's HTTP endpoints, on TCP: the login link and the identity
//! provider's callback. They share the control address's TCP port with
//! control sessions over TLS unless `--http-listen` puts them elsewhere.
//!
//! Pages are plain HTML for the person at the browser; every value from the
//! request or the identity provider is escaped. Connections are served with
//! timeouts and under the connection caps (`serve.rs`).

mod serve;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub(crate) use self::serve::{accept, Server};
use crate::oidc::{CallbackParams, LoginError, Logins, BROWSER_COOKIE, CALLBACK_PATH};

/// Binds the HTTP listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The routes. Without an identity provider configured, the login routes
/// answer that logins are not set up.
pub(crate) fn router(logins: Option<Arc<Logins>>, secure_cookie: bool) -> Router {
    Router::new()
        .route("/login/{id}", get(login))
        .route(CALLBACK_PATH, get(callback))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(HttpState {
            logins,
            secure_cookie,
        })
}

#[derive(Debug, Clone)]
struct HttpState {
    logins: Option<Arc<Logins>>,
    secure_cookie: bool,
}

async fn login(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(logins) = state.logins else {
        return not_configured();
    };
    match logins.open_link(&id).await {
        Ok(redirect) => {
            let secure = if state.secure_cookie { "; Secure" } else { "" };
            let cookie = format!(
                "{BROWSER_COOKIE}={}; Path={CALLBACK_PATH}; Max-Age=600; HttpOnly; SameSite=Lax{secure}",
                redirect.cookie
            );
            let mut headers = HeaderMap::new();
            if let (Ok(location), Ok(cookie)) = (
                HeaderValue::from_str(redirect.location.as_str()),
                HeaderValue::from_str(&cookie),
            ) {
                headers.insert(header::LOCATION, location);
                headers.insert(header::SET_COOKIE, cookie);
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return (StatusCode::SEE_OTHER, headers).into_response();
            }
            page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Login failed",
                "The identity provider's login URL cannot be sent to the browser.",
            )
        }
        Err(e) => failure(&e),
    }
}

async fn callback(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(params): Query<CallbackParams>,
) -> Response {
    let Some(logins) = state.logins else {
        return not_configured();
    };
    let cookie = browser_cookie(&headers);
    match logins.callback(params, cookie.as_deref()).await {
        Ok(who) => page(
            StatusCode::OK,
            "Device connected",
            &format!(
                "Your device is connected to the overlay as {}. You can close this page.",
                escape(&who.email)
            ),
        ),
        Err(e) => failure(&e),
    }
}

fn failure(error: &LoginError) -> Response {
    let status = match error {
        LoginError::Link(_) | LoginError::MissingParameter(_) => StatusCode::BAD_REQUEST,
        LoginError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        LoginError::Refused(_) | LoginError::ProviderRefused(_) | LoginError::NotAdmitted(_) => {
            StatusCode::FORBIDDEN
        }
        LoginError::DeviceGone => StatusCode::GONE,
    };
    page(status, "Login failed", &escape(&error.to_string()))
}

fn not_configured() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Login not available",
        "This coordinator has no identity provider configured (an [oidc] section in its configuration file).",
    )
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>weft: {title}</title></head>\n<body><h1>{title}</h1><p>{body}</p></body></html>\n"
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

/// The login cookie from the request's `Cookie` headers.
fn browser_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == BROWSER_COOKIE)
        .map(|(_, value)| value.to_owned())
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_login_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; weft_login=abc"),
        );
        assert_eq!(browser_cookie(&headers).as_deref(), Some("abc"));
        assert_eq!(browser_cookie(&HeaderMap::new()), None);
    }

    proptest! {
        #[test]
        fn escaped_text_has_no_markup(text in ".*") {
            let escaped = escape(&text);
            prop_assert!(!escaped.contains('<') && !escaped.contains('>') && !escaped.contains('"'));
        }
    }
}
