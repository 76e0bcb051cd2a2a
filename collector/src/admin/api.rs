//! Admin API handlers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{AdminState, ApiError};
use crate::bells::{BellView, RingRequest};
use crate::clock::{now_ms, rfc3339};
use crate::cluster::NodeView;
use crate::fleet::{writeback, DeviceView};
use crate::store::{EventKind, EventRecord, Reason};

/// Longest a request may wait for a bell to finish.
const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
pub struct EnrollRequest {
    id: String,
    #[serde(default)]
    rotate: bool,
}

#[derive(Serialize, Deserialize)]
pub struct Enrolled {
    id: String,
    token: Option<String>,
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if pulsebell_proto::valid_device_id(id) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "`{id}` is not a valid device id: use 1 to {} letters, digits, '.', '_' or '-'",
                pulsebell_proto::MAX_DEVICE_ID
            ),
        ))
    }
}

async fn enroll_ids(state: &AdminState, ids: Vec<String>, rotate: bool) -> Result<Vec<Enrolled>, ApiError> {
    for id in &ids {
        check_id(id)?;
    }
    let out = state.fleet.enroll(&ids, rotate).await?;
    Ok(out.into_iter().map(|(id, token)| Enrolled { id, token }).collect())
}

pub async fn enroll(
    State(state): State<AdminState>,
    Json(req): Json<EnrollRequest>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let mut out = enroll_ids(&state, vec![req.id.clone()], req.rotate).await?;
    let e = out.pop().expect("one result per id");
    if e.token.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("device `{}` is already enrolled; use --rotate to issue a new token", req.id),
        ));
    }
    Ok((StatusCode::CREATED, Json(e)))
}

#[derive(Deserialize)]
pub struct BulkRequest {
    ids: Vec<String>,
    #[serde(default)]
    rotate: bool,
}

pub async fn enroll_bulk(
    State(state): State<AdminState>,
    Json(req): Json<BulkRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if req.ids.len() > 100_000 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "at most 100000 ids per request".into()));
    }
    let out = enroll_ids(&state, req.ids, req.rotate).await?;
    Ok(Json(serde_json::json!({ "enrolled": out })))
}

pub async fn list_devices(State(state): State<AdminState>) -> Json<Vec<DeviceView>> {
    Json(state.fleet.views())
}

pub async fn show_device(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    state.fleet.view(&id).map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no enrolled device `{id}`")))
}

pub async fn revoke(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let existed = state.fleet.revoke(&id).await?;
    if existed {
        Ok(Json(serde_json::json!({ "revoked": id })))
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no enrolled device `{id}`")))
    }
}

#[derive(Deserialize)]
pub struct WaitQuery {
    wait_ms: Option<u64>,
}

pub async fn ring(
    State(state): State<AdminState>,
    Query(q): Query<WaitQuery>,
    Json(req): Json<RingRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut bells = state.bells.ring(req).await?;
    if let Some(ms) = q.wait_ms {
        let wait = Duration::from_millis(ms).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        for b in bells.iter_mut() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            *b = state.bells.wait(b.id, left).await?;
        }
    }
    let views: Vec<BellView> = bells.iter().map(BellView::from).collect();
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "bells": views }))))
}

#[derive(Deserialize)]
pub struct ListBellsQuery {
    device: Option<String>,
    limit: Option<usize>,
}

pub async fn list_bells(
    State(state): State<AdminState>,
    Query(q): Query<ListBellsQuery>,
) -> Result<Json<Vec<BellView>>, ApiError> {
    let bells = state.bells.list(q.device.as_deref(), q.limit.unwrap_or(50)).await?;
    Ok(Json(bells.iter().map(BellView::from).collect()))
}

pub async fn show_bell(
    State(state): State<AdminState>,
    Path(id): Path<u64>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<BellView>, ApiError> {
    let bell = match q.wait_ms {
        Some(ms) => state.bells.wait(id, Duration::from_millis(ms).min(MAX_WAIT)).await?,
        None => state.bells.get(id).await?.ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no bell {id}")))?,
    };
    Ok(Json(BellView::from(&bell)))
}

pub async fn cancel_bell(State(state): State<AdminState>, Path(id): Path<u64>) -> Result<Json<BellView>, ApiError> {
    let b = state.bells.cancel(id).await?;
    Ok(Json(BellView::from(&b)))
}

/// A liveness event in JSON.
#[derive(Serialize, Deserialize)]
pub struct EventView {
    device: String,
    kind: EventKind,
    reason: Reason,
    at: String,
    generation: u64,
    /// `check_failed` / `check_recovered`: the check's name, new status and
    /// summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<crate::store::CheckEvent>,
}

impl From<EventRecord> for EventView {
    fn from(e: EventRecord) -> Self {
        EventView {
            device: e.device,
            kind: e.kind,
            reason: e.reason,
            at: rfc3339(e.at_ms),
            generation: e.generation,
            check: e.check,
        }
    }
}

/// `GET /v1/rules`: each rule with its last firing and what it held back.
pub async fn rules(State(state): State<AdminState>) -> Json<Vec<crate::rules::RuleView>> {
    Json(state.rules.views())
}

#[derive(Deserialize)]
pub struct ChecksQuery {
    device: Option<String>,
    status: Option<String>,
}

/// `GET /v1/checks?device=D&status=S`: checks across the fleet.
pub async fn checks(
    State(state): State<AdminState>,
    Query(q): Query<ChecksQuery>,
) -> Result<Json<Vec<crate::fleet::CheckRow>>, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(pulsebell_proto::CheckStatus::parse(s).ok_or_else(|| {
            ApiError(StatusCode::BAD_REQUEST, format!("status `{s}`: use ok, warning, critical or unknown"))
        })?),
    };
    let rows = state.fleet.check_rows(q.device.as_deref(), status).ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, format!("no enrolled device `{}`", q.device.as_deref().unwrap_or_default()))
    })?;
    Ok(Json(rows))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    device: Option<String>,
    since_ms: Option<u64>,
    limit: Option<usize>,
}

pub async fn events(
    State(state): State<AdminState>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    // Events wait up to one write-back window in memory; write them now so
    // the answer is complete.
    writeback::write_back(&state.fleet, state.alerts.as_deref()).await?;
    let since = q.since_ms.unwrap_or(0);
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let mut events = state
        .fleet
        .store()
        .events(q.device.as_deref(), since, limit)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    crate::liveness::order_events(&mut events);
    Ok(Json(events.into_iter().map(EventView::from).collect()))
}

pub async fn stats(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let s = &state.fleet.stats;
    let failures: BTreeMap<String, u64> =
        s.handshake_failures.lock().expect("stats lock").iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let (devices, online) = state.fleet.counts();
    Json(serde_json::json!({
        "time_ms": now_ms(),
        "devices": devices,
        "online": online,
        "connections": s.connections.load(Ordering::Relaxed),
        "pulses_accepted": s.pulses_accepted.load(Ordering::Relaxed),
        "pulses_stored": s.pulses_stored.load(Ordering::Relaxed),
        "bytes_received": s.bytes_received.load(Ordering::Relaxed),
        "handshakes": s.handshakes.load(Ordering::Relaxed),
        "handshake_failures": failures,
        "node": state.fleet.node(),
        "backend": state.fleet.store().backend(),
    }))
}

/// The cluster's nodes.
pub async fn cluster(State(state): State<AdminState>) -> Result<Json<Vec<NodeView>>, ApiError> {
    let Some(m) = &state.membership else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this collector is not in cluster mode (no [cluster] nats_urls)".into(),
        ));
    };
    Ok(Json(m.views(state.fleet.config().cluster.lost_after)))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    since_ms: Option<u64>,
}

pub async fn history(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let since = q.since_ms.unwrap_or_else(|| now_ms().saturating_sub(3_600_000));
    let buckets = state
        .fleet
        .history(&id, since)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no enrolled device `{id}`")))?;
    let buckets: Vec<serde_json::Value> = buckets
        .iter()
        .map(|b| {
            serde_json::json!({
                "start": rfc3339(u64::from(b.minute) * 60_000),
                "samples": b.samples,
                "cpu": b.cpu,
                "temp": b.temp,
                "mem": b.mem,
                "load": b.load,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "device": id, "bucket_secs": 60, "buckets": buckets })))
}

#[derive(Deserialize)]
pub struct CreateKeyRequest {
    #[serde(default)]
    tags: Vec<String>,
    uses: Option<u32>,
    ttl_ms: Option<u64>,
}

pub async fn create_provision_key(
    State(state): State<AdminState>,
    Json(req): Json<CreateKeyRequest>,
) -> Result<(StatusCode, Json<crate::provision::KeyView>), ApiError> {
    if let Some(bad) = req.tags.iter().find(|t| !pulsebell_proto::valid_tag(t)) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("`{bad}` is not a valid tag")));
    }
    if req.tags.len() > pulsebell_proto::MAX_TAGS {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("at most {} tags", pulsebell_proto::MAX_TAGS)));
    }
    if req.uses == Some(0) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "uses must be at least 1".into()));
    }
    let view = state.provisioning.create(req.tags, req.uses, req.ttl_ms.map(Duration::from_millis)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list_provision_keys(
    State(state): State<AdminState>,
) -> Result<Json<Vec<crate::provision::KeyView>>, ApiError> {
    Ok(Json(state.provisioning.list().await?))
}

pub async fn revoke_provision_key(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if state.provisioning.revoke(&id).await? {
        Ok(Json(serde_json::json!({ "revoked": id })))
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no provisioning key `{id}`")))
    }
}
