//! Ready bells: the durable queue of server-to-device commands and their
//! state machine.
//!
//! ```text
//! queued ──► sent ──► running ──► succeeded | failed | timed_out
//!   │          │         │
//!   │          └─────────┴──► rejected | cancelled
//!   ├──► expired (TTL passed before delivery)
//!   └──► cancelled
//! ```
//!
//! A bell is written to the store (flushed) before its id is returned, and
//! every transition is written before it is visible. Delivery is
//! at-least-once: bells not yet final are re-sent whenever their device
//! connects; the agent's journal makes execution exactly-once.
//!
//! All changes go through one async mutex held across the store write, so
//! two updates of one bell can never be persisted out of order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use pulsebell_proto::{Bell, BellReport, BellState, ServerMsg, MAX_ITEMS, MAX_PARAM_VALUE, MAX_STRING};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};
use tracing::{info, warn};

use crate::fleet::{now_ms, rfc3339, Fleet, Outbound};
use crate::store::{BellRecord, BellStatus, Store, Transition};

/// Most bells listed at once.
pub const LIST_LIMIT: usize = 1000;

/// A request to ring bells.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingRequest {
    /// Target device.
    #[serde(default)]
    pub device: Option<String>,
    /// Or every device with this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Action name.
    pub action: String,
    /// Parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Time to wait for an offline device, ms.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// Run-time limit, ms.
    #[serde(default)]
    pub timeout_ms: Option<u32>,
}

/// Why a bell request failed.
#[derive(Debug, thiserror::Error)]
pub enum BellError {
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
    /// No such device or bell.
    #[error("{0}")]
    NotFound(String),
    /// The bell is already final.
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error("store error: {0}")]
    Store(String),
}

/// The JSON view of a bell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BellView {
    /// Id.
    pub id: u64,
    /// Device.
    pub device: String,
    /// Action.
    pub action: String,
    /// Parameters.
    pub params: BTreeMap<String, String>,
    /// State.
    pub state: BellStatus,
    /// Created, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub updated_at: String,
    /// Expires if not delivered by then, RFC 3339.
    pub expires_at: String,
    /// Run-time limit asked for, ms.
    pub timeout_ms: Option<u32>,
    /// Exit code, null until known.
    pub exit_code: Option<i32>,
    /// Output tail.
    pub output: String,
    /// Run time.
    pub duration_ms: Option<u64>,
    /// Why rejected, failed, expired or cancelled.
    pub reason: Option<String>,
    /// Every state change.
    pub transitions: Vec<TransitionView>,
}

/// One state change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransitionView {
    /// New state.
    pub state: BellStatus,
    /// When, RFC 3339.
    pub at: String,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl From<&BellRecord> for BellView {
    fn from(b: &BellRecord) -> Self {
        BellView {
            id: b.id,
            device: b.device.clone(),
            action: b.action.clone(),
            params: b.params.clone(),
            state: b.state,
            created_at: rfc3339(b.created_ms),
            updated_at: rfc3339(b.updated_ms),
            expires_at: rfc3339(b.expires_ms),
            timeout_ms: b.timeout_ms,
            exit_code: b.exit_code,
            output: b.output.clone(),
            duration_ms: b.duration_ms,
            reason: b.reason.clone(),
            transitions: b
                .transitions
                .iter()
                .map(|t| TransitionView { state: t.state, at: rfc3339(t.at_ms), note: t.note.clone() })
                .collect(),
        }
    }
}

/// The bell service.
pub struct Bells {
    fleet: Arc<Fleet>,
    store: Arc<dyn Store>,
    default_ttl: Duration,
    /// Bells not yet final, by id.
    pending: Mutex<HashMap<u64, BellRecord>>,
    /// Ids of bells that changed (for waiters).
    changed: broadcast::Sender<u64>,
    /// Bells that reached each final state since start (metrics).
    finished: std::sync::Mutex<HashMap<BellStatus, u64>>,
}

fn transition(b: &mut BellRecord, state: BellStatus, note: Option<String>) {
    let now = now_ms();
    b.state = state;
    b.updated_ms = now;
    b.transitions.push(Transition { state, at_ms: now, note });
}

impl Bells {
    /// Loads pending bells and arms TTL timers for the queued ones.
    pub fn load(fleet: Arc<Fleet>, default_ttl: Duration) -> anyhow::Result<Arc<Bells>> {
        let store = fleet.store().clone();
        let pending: HashMap<u64, BellRecord> = store.pending_bells()?.into_iter().map(|b| (b.id, b)).collect();
        let (changed, _) = broadcast::channel(1024);
        let bells = Arc::new(Bells {
            fleet,
            store,
            default_ttl,
            pending: Mutex::new(HashMap::new()),
            changed,
            finished: std::sync::Mutex::new(HashMap::new()),
        });
        let queued: Vec<(u64, u64)> =
            pending.values().filter(|b| b.state == BellStatus::Queued).map(|b| (b.id, b.expires_ms)).collect();
        *bells.pending.try_lock().expect("no other user yet") = pending;
        for (id, expires) in queued {
            bells.arm_expiry(id, expires);
        }
        Ok(bells)
    }

    /// Subscribes to bell changes (ids).
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.changed.subscribe()
    }

    async fn persist(&self, records: Vec<BellRecord>) -> Result<(), BellError> {
        let store = self.store.clone();
        let finals: Vec<BellStatus> = records.iter().filter(|b| b.state.is_final()).map(|b| b.state).collect();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || store.put_bells(&records))
            .await
            .map_err(|e| BellError::Store(e.to_string()))?
            .map_err(|e| BellError::Store(e.to_string()))?;
        self.fleet.stats.store_write_seconds.observe(started.elapsed().as_secs_f64());
        let mut finished = self.finished.lock().expect("finished lock");
        for state in finals {
            *finished.entry(state).or_default() += 1;
        }
        Ok(())
    }

    /// Bells that reached each final state since the collector started.
    pub fn finished_counts(&self) -> HashMap<BellStatus, u64> {
        self.finished.lock().expect("finished lock").clone()
    }

    /// Validates and creates bells, durably, then delivers to online devices.
    pub async fn ring(self: &Arc<Self>, req: RingRequest) -> Result<Vec<BellRecord>, BellError> {
        let devices = match (&req.device, &req.tag) {
            (Some(d), None) => {
                if !self.fleet.exists(d) {
                    return Err(BellError::NotFound(format!("no enrolled device `{d}`")));
                }
                vec![d.clone()]
            }
            (None, Some(tag)) => {
                let ids = self.fleet.with_tag(tag);
                if ids.is_empty() {
                    return Err(BellError::NotFound(format!("no device has tag `{tag}`")));
                }
                ids
            }
            _ => return Err(BellError::Invalid("give either a device or a tag".into())),
        };
        if req.action.is_empty() || req.action.len() > MAX_STRING || !pulsebell_proto::valid_tag(&req.action) {
            return Err(BellError::Invalid(format!("`{}` is not a valid action name", req.action)));
        }
        if req.params.len() > MAX_ITEMS {
            return Err(BellError::Invalid(format!("at most {MAX_ITEMS} parameters")));
        }
        for (k, v) in &req.params {
            if k.is_empty() || k.len() > MAX_STRING || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(BellError::Invalid(format!("`{k}` is not a valid parameter name")));
            }
            if v.len() > MAX_PARAM_VALUE {
                return Err(BellError::Invalid(format!("parameter `{k}` is over {MAX_PARAM_VALUE} bytes")));
            }
        }
        let ttl = req.ttl_ms.map(Duration::from_millis).unwrap_or(self.default_ttl);
        let now = now_ms();
        let mut records = Vec::with_capacity(devices.len());
        for device in devices {
            let id = self.store.next_bell_id().map_err(|e| BellError::Store(e.to_string()))?;
            records.push(BellRecord {
                id,
                device,
                action: req.action.clone(),
                params: req.params.clone(),
                state: BellStatus::Queued,
                created_ms: now,
                updated_ms: now,
                expires_ms: now + ttl.as_millis() as u64,
                timeout_ms: req.timeout_ms,
                exit_code: None,
                output: String::new(),
                duration_ms: None,
                reason: None,
                transitions: vec![Transition { state: BellStatus::Queued, at_ms: now, note: None }],
            });
        }
        {
            let mut pending = self.pending.lock().await;
            self.persist(records.clone()).await?;
            for r in &records {
                pending.insert(r.id, r.clone());
                info!(bell = r.id, device = %r.device, action = %r.action, "bell queued");
            }
        }
        for r in &records {
            self.arm_expiry(r.id, r.expires_ms);
            let _ = self.changed.send(r.id);
        }
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            out.push(self.deliver(r.id).await.unwrap_or(r));
        }
        Ok(out)
    }

    fn arm_expiry(self: &Arc<Self>, id: u64, expires_ms: u64) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(expires_ms.saturating_sub(now_ms()))).await;
            if let Some(this) = this.upgrade() {
                this.expire(id).await;
            }
        });
    }

    async fn expire(&self, id: u64) {
        let mut pending = self.pending.lock().await;
        let Some(b) = pending.get(&id) else { return };
        if b.state != BellStatus::Queued {
            return;
        }
        let mut b = b.clone();
        transition(&mut b, BellStatus::Expired, None);
        b.reason = Some("the device did not come online before the bell's TTL passed".into());
        if let Err(e) = self.persist(vec![b.clone()]).await {
            warn!(bell = id, error = %e, "cannot record expiry");
            return;
        }
        pending.remove(&id);
        info!(bell = id, device = %b.device, "bell expired");
        let _ = self.changed.send(id);
    }

    /// Sends a pending bell to its device if it is connected; marks it sent.
    async fn deliver(&self, id: u64) -> Option<BellRecord> {
        let mut pending = self.pending.lock().await;
        let b = pending.get(&id)?.clone();
        if b.state.is_final() {
            return Some(b);
        }
        if b.state == BellStatus::Queued && b.expires_ms <= now_ms() {
            return Some(b); // the expiry timer settles it
        }
        let tx = self.fleet.sender(&b.device)?;
        let msg = ServerMsg::Bell(Bell {
            id,
            action: b.action.clone(),
            params: b.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            timeout_ms: b.timeout_ms,
        });
        if tx.try_send(Outbound::Msg(msg)).is_err() {
            warn!(bell = id, device = %b.device, "device queue full; bell stays queued until it reconnects");
            return Some(b);
        }
        if b.state != BellStatus::Queued {
            return Some(b); // a re-delivery: state unchanged
        }
        let mut b = b;
        transition(&mut b, BellStatus::Sent, None);
        if let Err(e) = self.persist(vec![b.clone()]).await {
            warn!(bell = id, error = %e, "cannot record delivery");
        }
        pending.insert(id, b.clone());
        let _ = self.changed.send(id);
        Some(b)
    }

    /// A device connected: (re-)deliver its pending bells in order.
    pub async fn on_connect(&self, device: &str) {
        let mut ids: Vec<u64> = {
            let pending = self.pending.lock().await;
            pending.values().filter(|b| b.device == device).map(|b| b.id).collect()
        };
        ids.sort_unstable();
        for id in ids {
            self.deliver(id).await;
        }
    }

    /// A report from `device`'s agent.
    pub async fn on_report(&self, device: &str, r: BellReport) {
        let mut pending = self.pending.lock().await;
        let Some(b) = pending.get(&r.id) else { return };
        if b.device != device {
            warn!(bell = r.id, device, owner = %b.device, "ignoring a report for another device's bell");
            return;
        }
        let mut b = b.clone();
        let state = match r.state {
            BellState::Running => BellStatus::Running,
            BellState::Succeeded => BellStatus::Succeeded,
            BellState::Failed => BellStatus::Failed,
            BellState::TimedOut => BellStatus::TimedOut,
            BellState::Rejected => BellStatus::Rejected,
            BellState::Cancelled => BellStatus::Cancelled,
        };
        if state == BellStatus::Running {
            if b.state == BellStatus::Running {
                return;
            }
            transition(&mut b, BellStatus::Running, None);
        } else {
            transition(&mut b, state, None);
            b.exit_code = r.exit_code;
            b.output = r.output;
            b.duration_ms = Some(r.duration_ms);
            b.reason = r.reason;
        }
        if let Err(e) = self.persist(vec![b.clone()]).await {
            // Not recorded: the agent's journal still has it, and the next
            // re-delivery brings it back.
            warn!(bell = b.id, error = %e, "cannot record bell report");
            return;
        }
        if b.state.is_final() {
            info!(bell = b.id, device, state = b.state.as_str(), exit_code = ?b.exit_code, "bell finished");
            if matches!(b.state, BellStatus::Failed | BellStatus::TimedOut) {
                let details = serde_json::json!({
                    "bell": b.id, "action": b.action, "state": b.state.as_str(),
                    "exit_code": b.exit_code, "reason": b.reason,
                });
                let summary = format!("bell {} ({}) on {device} {}", b.id, b.action, b.state.as_str());
                self.fleet.raise_alert(crate::alerts::AlertKind::BellFailed, device, summary, details);
            }
            pending.remove(&b.id);
        } else {
            pending.insert(b.id, b.clone());
        }
        let _ = self.changed.send(b.id);
    }

    /// Cancels a bell: a queued one at once; a sent or running one by
    /// asking its agent (the agent reports `cancelled`).
    pub async fn cancel(&self, id: u64) -> Result<BellRecord, BellError> {
        let mut pending = self.pending.lock().await;
        let Some(b) = pending.get(&id).cloned() else {
            return match self.store.bell(id).map_err(|e| BellError::Store(e.to_string()))? {
                Some(b) => Err(BellError::Conflict(format!("bell {id} is already {}", b.state.as_str()))),
                None => Err(BellError::NotFound(format!("no bell {id}"))),
            };
        };
        let mut b = b;
        let online = self.fleet.sender(&b.device);
        match (b.state, online) {
            (BellStatus::Queued, _) => {
                transition(&mut b, BellStatus::Cancelled, Some("cancelled before delivery".into()));
                b.reason = Some("cancelled by the operator before delivery".into());
            }
            (_, Some(tx)) => {
                let _ = tx.try_send(Outbound::Msg(ServerMsg::Cancel(id)));
                let note = Some("cancel requested".into());
                b.transitions.push(Transition { state: b.state, at_ms: now_ms(), note });
                b.updated_ms = now_ms();
            }
            (_, None) => {
                transition(&mut b, BellStatus::Cancelled, Some("device offline".into()));
                b.reason = Some("cancelled while the device was offline; it may have started".into());
            }
        }
        self.persist(vec![b.clone()]).await?;
        if b.state.is_final() {
            pending.remove(&id);
        } else {
            pending.insert(id, b.clone());
        }
        let _ = self.changed.send(id);
        Ok(b)
    }

    /// One bell.
    pub async fn get(&self, id: u64) -> Result<Option<BellRecord>, BellError> {
        if let Some(b) = self.pending.lock().await.get(&id) {
            return Ok(Some(b.clone()));
        }
        self.store.bell(id).map_err(|e| BellError::Store(e.to_string()))
    }

    /// Waits until the bell is final or `timeout` passes; returns it.
    pub async fn wait(&self, id: u64, timeout: Duration) -> Result<BellRecord, BellError> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let b = self.get(id).await?.ok_or_else(|| BellError::NotFound(format!("no bell {id}")))?;
            if b.state.is_final() {
                return Ok(b);
            }
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Err(_) => return Ok(b),
                    Ok(Ok(changed)) if changed == id => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(b),
                }
            }
        }
    }

    /// Newest bells first.
    pub async fn list(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>, BellError> {
        let mut out = self.store.bells(device, limit.min(LIST_LIMIT)).map_err(|e| BellError::Store(e.to_string()))?;
        // Pending ones may be newer in memory than on disk only between a
        // change and its write, which happens under the lock; the store is
        // authoritative.
        out.sort_by_key(|b| std::cmp::Reverse(b.id));
        Ok(out)
    }

    /// Counts of pending bells by state (metrics).
    pub async fn pending_counts(&self) -> HashMap<BellStatus, u64> {
        let mut out = HashMap::new();
        for b in self.pending.lock().await.values() {
            *out.entry(b.state).or_default() += 1;
        }
        out
    }
}
