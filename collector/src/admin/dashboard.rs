//! The web dashboard: one embedded page (no CDN, no build step), a login
//! form that sets an HttpOnly, SameSite=Strict cookie holding the admin
//! token and a session id, and a Server-Sent Events stream of the fleet for
//! live updates. The device page rings actions: every state-changing
//! request authenticated by the cookie must also carry the session's CSRF
//! token ([`crate::auth::csrf_token`]) in `X-CSRF-Token`, which the page
//! gets embedded when it is served (see `require_token` in `admin/mod.rs`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};

use super::AdminState;
use crate::auth;
use crate::fleet::page::{Counts, Page, PageQuery, Row};
use crate::fleet::Fleet;

/// Name of the cookie holding the admin token.
pub const COOKIE: &str = "pulsebell_admin";

/// Name of the cookie holding the session id (what the CSRF token is bound to).
pub const SESSION_COOKIE: &str = "pulsebell_session";

/// Header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

fn cookie_attrs() -> &'static str {
    "HttpOnly; SameSite=Strict; Path=/; Max-Age=2592000"
}

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

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The admin token from the session cookie, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    cookie(headers, COOKIE)
}

/// Whether a request authenticated by the cookie carries its session's CSRF
/// token.
pub fn csrf_ok(headers: &HeaderMap, admin_token: &str) -> bool {
    let (Some(sid), Some(given)) = (cookie(headers, SESSION_COOKIE), headers.get(CSRF_HEADER)) else {
        return false;
    };
    given.to_str().is_ok_and(|g| auth::tokens_equal(g, &auth::csrf_token(admin_token, &sid)))
}

/// `GET /`: the dashboard with its session's CSRF token, or the login form
/// without a valid cookie. A session from before CSRF tokens gets its id
/// here.
pub async fn index(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    match cookie_token(&headers) {
        Some(t) if auth::tokens_equal(&t, &state.token) => {
            let (sid, new) = match cookie(&headers, SESSION_COOKIE) {
                Some(sid) if sid.len() == 32 && sid.bytes().all(|b| b.is_ascii_hexdigit()) => (sid, false),
                _ => (auth::new_session_id(), true),
            };
            let page = PAGE.replace("{{CSRF_TOKEN}}", &auth::csrf_token(&state.token, &sid));
            let mut resp = ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response();
            if new {
                let c = format!("{SESSION_COOKIE}={sid}; {}", cookie_attrs());
                resp.headers_mut().append(header::SET_COOKIE, c.parse().expect("a valid cookie header"));
            }
            resp
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
    // The token is hex, safe as a cookie value; a new session id with
    // every sign-in.
    let mut resp = Redirect::to("/").into_response();
    for c in [
        format!("{COOKIE}={token}; {}", cookie_attrs()),
        format!("{SESSION_COOKIE}={}; {}", auth::new_session_id(), cookie_attrs()),
    ] {
        resp.headers_mut().append(header::SET_COOKIE, c.parse().expect("a valid cookie header"));
    }
    resp
}

/// `GET /v1/fleet?q=&tag=&state=&device=&offset=&limit=`: one page of the
/// fleet table ([`Page`]), as the stream's first event carries it.
pub async fn fleet_page(State(state): State<AdminState>, Query(query): Query<PageQuery>) -> Json<Page> {
    Json(state.fleet.page(&query))
}

/// `GET /v1/stream?q=&tag=&state=&device=&offset=&limit=`: the fleet table,
/// live, as Server-Sent Events.
///
/// - `page`: the whole page ([`Page`]): first, and again whenever the rows
///   on it are other devices (enrolled, removed, a state filter) or the
///   fleet's tags change.
/// - `changes`: at most once a second, and only when something changed:
///   `{"rows": [...]}` with the rows that differ from what was sent, plus
///   `counts` and `matched` when those changed.
///
/// What one open page costs therefore follows its own rows, not the fleet:
/// 100 rows of devices pulsing every 10 s are ~10 rows a second.
pub async fn stream(
    State(state): State<AdminState>,
    Query(query): Query<PageQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let follow = Follow { pages: state.pages.clone(), query, sent: None };
    let stream = futures_util::stream::unfold(follow, |mut follow| async move {
        let event = follow.next_event().await;
        Some((Ok(event), follow))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// How long a built page serves other streams showing the same page.
const FRESH: Duration = Duration::from_millis(500);

/// Pages built in the last [`FRESH`], shared by the streams that show the
/// same page (a wall of screens, several operators on the first page): one
/// page build a tick however many of them are open.
pub struct Pages {
    fleet: Arc<Fleet>,
    recent: Mutex<HashMap<PageQuery, (Instant, Arc<Page>)>>,
}

impl Pages {
    /// Pages of `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Pages {
        Pages { fleet, recent: Mutex::new(HashMap::new()) }
    }

    /// The page for `query`, built now or in the last [`FRESH`].
    fn get(&self, query: &PageQuery) -> Arc<Page> {
        let now = Instant::now();
        {
            let mut recent = self.recent.lock().expect("pages lock");
            recent.retain(|_, (built, _)| now.duration_since(*built) < FRESH);
            if let Some((_, page)) = recent.get(query) {
                return page.clone();
            }
        }
        let page = Arc::new(self.fleet.page(query));
        self.recent.lock().expect("pages lock").insert(query.clone(), (now, page.clone()));
        page
    }
}

/// One open stream: the query and the page last sent.
struct Follow {
    pages: Arc<Pages>,
    query: PageQuery,
    sent: Option<Arc<Page>>,
}

/// The `changes` event.
#[derive(Serialize)]
struct Changes<'a> {
    rows: Vec<&'a Row>,
    #[serde(skip_serializing_if = "Option::is_none")]
    counts: Option<Counts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    matched: Option<usize>,
}

impl Follow {
    async fn next_event(&mut self) -> Event {
        loop {
            if self.sent.is_some() {
                tokio::time::sleep_until(next_tick(tokio::time::Instant::now())).await;
            }
            let page = self.pages.get(&self.query);
            let event = match &self.sent {
                Some(sent) if same_rows(sent, &page) && sent.summary.tags == page.summary.tags => {
                    let changes = Changes {
                        rows: page
                            .rows
                            .iter()
                            .zip(&sent.rows)
                            .filter(|(new, old)| new != old)
                            .map(|(new, _)| new)
                            .collect(),
                        counts: (page.summary.counts != sent.summary.counts).then_some(page.summary.counts),
                        matched: (page.matched != sent.matched).then_some(page.matched),
                    };
                    if changes.rows.is_empty() && changes.counts.is_none() && changes.matched.is_none() {
                        continue;
                    }
                    json_event("changes", &changes)
                }
                _ => json_event("page", &*page),
            };
            self.sent = Some(page);
            return event;
        }
    }
}

/// Streams tick on whole seconds of the process-wide grid
/// ([`crate::clock::on_grid`]), so the streams of the same page ask for it
/// within one [`FRESH`] window and share one build (ticking a second after
/// each one's own start, five streams of one page built it about twice a
/// second instead of once).
fn next_tick(now: tokio::time::Instant) -> tokio::time::Instant {
    crate::clock::on_grid(now + Duration::from_nanos(1), Duration::from_secs(1))
}

/// Whether two pages hold the same devices in the same places.
fn same_rows(a: &Page, b: &Page) -> bool {
    a.offset == b.offset && a.rows.len() == b.rows.len() && a.rows.iter().zip(&b.rows).all(|(x, y)| x.id == y.id)
}

fn json_event(name: &str, data: &impl Serialize) -> Event {
    Event::default().event(name).data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_tick_together() {
        use tokio::time::Instant;
        let start = Instant::now();
        let first = next_tick(start);
        assert!(first > start && first - start <= Duration::from_secs(1));
        // Streams opened at other moments of the same second tick with it...
        for ms in [1, 250, 700, 999] {
            let t = start + Duration::from_millis(ms);
            if t < first {
                assert_eq!(next_tick(t), first, "opened {ms} ms later");
            }
        }
        // ...and a tick asked for at a tick is the next one, a second on.
        assert_eq!(next_tick(first), first + Duration::from_secs(1));
    }
}
