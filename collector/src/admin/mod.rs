//! The admin listener: a JSON HTTP API for the CLI and scripts, on
//! loopback, every request authenticated with the admin token.
//!
//! Endpoints (all under `Authorization: Bearer <admin token>` except
//! `/healthz`):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | liveness of the collector itself |
//! | POST | `/v1/devices` | enroll `{id, rotate?}` → `{id, token}` |
//! | POST | `/v1/devices/bulk` | enroll `{ids}` → `{enrolled: [{id, token}]}` |
//! | GET | `/v1/devices` | every device ([`DeviceView`]) |
//! | GET | `/v1/devices/{id}` | one device |
//! | DELETE | `/v1/devices/{id}` | revoke |
//! | GET | `/v1/devices/{id}/history?since_ms=` | one-minute buckets (default: last hour) |
//! | POST | `/v1/bells?wait_ms=` | ring ([`RingRequest`]) → `{bells: [...]}` |
//! | GET | `/v1/bells?device=&limit=` | recent bells |
//! | GET | `/v1/bells/{id}?wait_ms=` | one bell, optionally waiting for its end |
//! | POST | `/v1/bells/{id}/cancel` | cancel |
//! | GET | `/v1/events?device=&since_ms=&limit=` | liveness events |
//! | GET | `/v1/stats` | counters |
//! | POST | `/v1/provision` | create a provisioning key `{tags, uses, ttl_ms}` → the key, shown once |
//! | GET | `/v1/provision` | provisioning keys (without the keys) |
//! | DELETE | `/v1/provision/{id}` | revoke a provisioning key |
//! | GET | `/v1/cluster` | the cluster's nodes (cluster mode; 404 otherwise) |
//! | GET | `/metrics` | Prometheus text format ([`metrics`]) |
//! | GET | `/`, `/login` | the dashboard ([`dashboard`]; cookie login) |
//! | GET | `/v1/fleet?q=&tag=&state=&device=&offset=&limit=` | one page of the fleet table |
//! | GET | `/v1/stream?q=&tag=&state=&device=&offset=&limit=` | that page live, as Server-Sent Events: the page, then only changes |

mod api;
pub mod dashboard;
pub mod metrics;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::alerts::Alerts;
use crate::auth;
use crate::bells::Bells;
use crate::cluster::Membership;
use crate::fleet::Fleet;

pub use crate::bells::{BellView, RingRequest};
pub use crate::fleet::DeviceView;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// Bells.
    pub bells: Arc<Bells>,
    /// Rules.
    pub rules: Arc<crate::rules::Rules>,
    /// The alert sender, if any sink is configured.
    pub alerts: Option<Arc<Alerts>>,
    /// The cluster's nodes (cluster mode only).
    pub membership: Option<Arc<Membership>>,
    /// Provisioning keys.
    pub provisioning: Arc<crate::provision::Provisioning>,
    /// The admin token.
    pub token: Arc<String>,
    /// Dashboard pages, shared by the live streams showing the same one.
    pub pages: Arc<dashboard::Pages>,
}

/// A JSON error: `{"error": "..."}` with a status.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::bells::BellError> for ApiError {
    fn from(e: crate::bells::BellError) -> Self {
        use crate::bells::BellError::*;
        let status = match &e {
            Invalid(_) => StatusCode::BAD_REQUEST,
            NotFound(_) => StatusCode::NOT_FOUND,
            Conflict(_) => StatusCode::CONFLICT,
            Store(crate::store::StoreError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    // The CLI and scripts send the bearer token; the dashboard, its cookie.
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(auth::bearer);
    let (given, by_cookie) = match bearer {
        Some(t) => (Some(t.to_string()), false),
        None => (dashboard::cookie_token(req.headers()), true),
    };
    match given.as_deref() {
        Some(t) if auth::tokens_equal(t, &state.token) => {
            // A browser sends the cookie with any request to this origin:
            // a change also needs the session's CSRF token, which only a
            // page served by us holds.
            let safe = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
            if by_cookie && !safe && !dashboard::csrf_ok(req.headers(), &state.token) {
                return ApiError(StatusCode::FORBIDDEN, "missing or invalid CSRF token".into()).into_response();
            }
            next.run(req).await
        }
        _ => ApiError(StatusCode::UNAUTHORIZED, "missing or invalid admin token".into()).into_response(),
    }
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/v1/devices", get(api::list_devices).post(api::enroll))
        .route("/v1/devices/bulk", post(api::enroll_bulk))
        .route("/v1/devices/{id}", get(api::show_device).delete(api::revoke))
        .route("/v1/devices/{id}/history", get(api::history))
        .route("/v1/bells", get(api::list_bells).post(api::ring))
        .route("/v1/bells/{id}", get(api::show_bell))
        .route("/v1/bells/{id}/cancel", post(api::cancel_bell))
        .route("/v1/events", get(api::events))
        .route("/v1/checks", get(api::checks))
        .route("/v1/rules", get(api::rules))
        .route("/v1/stats", get(api::stats))
        .route("/v1/cluster", get(api::cluster))
        .route("/v1/provision", get(api::list_provision_keys).post(api::create_provision_key))
        .route("/v1/provision/{id}", axum::routing::delete(api::revoke_provision_key))
        .route("/metrics", get(metrics::handler))
        .route("/v1/fleet", get(dashboard::fleet_page))
        .route("/v1/stream", get(dashboard::stream))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/", get(dashboard::index))
        .route("/login", get(dashboard::login_form).post(dashboard::login))
        .merge(api)
        .with_state(state)
}
