//! The read-only web dashboard: one embedded page (no CDN, no build step),
//! a login form that sets an HttpOnly cookie holding the admin token, and a
//! Server-Sent Events stream of the fleet for live updates.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use futures_util::stream::Stream;
use serde::Deserialize;

use super::AdminState;
use crate::auth;

/// Name of the session cookie.
pub const COOKIE: &str = "pulsebell_admin";

const PAGE: &str = include_str!("dashboard.html");

const LOGIN: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Pulsebell · sign in</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22 viewBox=%220 0 100 100%22%3E%3Ctext y=%22.9em%22 font-size=%2290%22%3E%F0%9F%94%94%3C/text%3E%3C/svg%3E">
<style>body{margin:0;font:14px system-ui,sans-serif;background:#0f1419;color:#e6e9ed}
form{max-width:380px;margin:80px auto;background:#171d24;padding:24px;border-radius:8px;border:1px solid #2a323c}
input{width:100%;box-sizing:border-box;margin:8px 0 12px;padding:7px;background:#0f1419;color:#e6e9ed;border:1px solid #2a323c;border-radius:4px}
button{background:#5dade2;border:0;border-radius:4px;padding:7px 14px;font-weight:600}.err{color:#e74c3c}</style></head>
<body><form method="post" action="/login"><h2>🔔 Pulsebell</h2>ERROR
<label for="token">Admin token (<code>&lt;data-dir&gt;/admin.token</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form></body></html>"#;

/// The admin token from the session cookie, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// `GET /`: the dashboard, or the login form without a valid cookie.
pub async fn index(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    match cookie_token(&headers) {
        Some(t) if auth::tokens_equal(&t, &state.token) => {
            ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
        }
        _ => Redirect::to("/login").into_response(),
    }
}

/// `GET /login`.
pub async fn login_form() -> Html<String> {
    Html(LOGIN.replace("ERROR", ""))
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /login`: checks the token and sets the session cookie.
pub async fn login(State(state): State<AdminState>, Form(form): Form<Login>) -> Response {
    let token = form.token.trim();
    if !auth::tokens_equal(token, &state.token) {
        let page = LOGIN.replace("ERROR", "<p class=\"err\">That is not the admin token.</p>");
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    // The token is hex, safe as a cookie value.
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age=2592000");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// `GET /v1/stream`: the fleet as an SSE `devices` event every second.
pub async fn stream(State(state): State<AdminState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let fleet = state.fleet.clone();
    let stream = futures_util::stream::unfold((fleet, true), |(fleet, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let data = serde_json::to_string(&fleet.views()).unwrap_or_else(|_| "[]".into());
        Some((Ok(Event::default().event("devices").data(data)), (fleet, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
