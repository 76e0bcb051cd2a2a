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
//! Every change is a compare-and-set in the store ([`Store::update_bell`]):
//! two changes of one bell, made on one node or on two nodes of a cluster,
//! can never be persisted out of order or overwrite each other, and a
//! final state is reached exactly once. Each node keeps the bells not yet
//! final in memory, fed by its own changes and (cluster) by the store's
//! watch of everyone else's; the node holding the device's connection is
//! the one that sends it bells and cancel requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use pulsebell_proto::{Bell, BellReport, BellState, ServerMsg, MAX_ITEMS, MAX_PARAM_VALUE, MAX_STRING};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::alerts::Raised;
use crate::clock::{now_ms, rfc3339};
use crate::fleet::{Fleet, Outbound};
use crate::store::{AlertKind, BellRecord, BellStatus, Store, StoreError, Transition};

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
    /// Who rang: `None` for an operator (the API); `rule:NAME` for a rule.
    /// Set by the collector, never read from a request.
    #[serde(skip)]
    pub origin: Option<String>,
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
    Store(#[from] StoreError),
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
    /// Who rang it: `operator`, or `rule:NAME` for a rule.
    #[serde(default)]
    pub origin: String,
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
            origin: b.origin.clone().unwrap_or_else(|| "operator".into()),
        }
    }
}

/// The bell service.
pub struct Bells {
    fleet: Arc<Fleet>,
    store: Arc<dyn Store>,
    default_ttl: Duration,
    /// Bells not yet final, by id: the newest version this node has seen.
    pending: std::sync::Mutex<Cache>,
    /// Ids of bells that changed (for waiters).
    changed: broadcast::Sender<u64>,
    /// Bells this node brought to each final state since start (metrics).
    finished: std::sync::Mutex<HashMap<BellStatus, u64>>,
}

/// Bells not yet final, the ids of recently finished ones (so that a
/// late, older copy from a watch cannot bring a finished bell back), and
/// the final records of the most recent of them: a waiter reads those from
/// memory, never from the store, where a follower may still serve the
/// previous version (a `--wait` once waited out its timeout that way).
#[derive(Default)]
struct Cache {
    pending: HashMap<u64, BellRecord>,
    finished: std::collections::HashSet<u64>,
    finished_order: std::collections::VecDeque<u64>,
    recent_final: HashMap<u64, BellRecord>,
}

/// Finished bell ids remembered per node.
const FINISHED_REMEMBERED: usize = 65_536;
/// Final records kept in memory (the newest finished bells).
const FINAL_RECORDS_KEPT: usize = 4_096;

impl Cache {
    fn get(&self, id: &u64) -> Option<&BellRecord> {
        self.pending.get(id).or_else(|| self.recent_final.get(id))
    }

    fn values(&self) -> impl Iterator<Item = &BellRecord> {
        self.pending.values()
    }

    fn finish(&mut self, b: &BellRecord) {
        let id = b.id;
        self.pending.remove(&id);
        if self.finished.insert(id) {
            self.finished_order.push_back(id);
            if self.finished_order.len() > FINISHED_REMEMBERED {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
            self.recent_final.insert(id, b.clone());
            let n = self.finished_order.len();
            if n > FINAL_RECORDS_KEPT {
                if let Some(old) = self.finished_order.get(n - FINAL_RECORDS_KEPT - 1) {
                    self.recent_final.remove(old);
                }
            }
        }
    }
}

fn transition(b: &mut BellRecord, state: BellStatus, note: Option<String>) {
    let now = now_ms();
    b.state = state;
    b.updated_ms = now;
    b.transitions.push(Transition { state, at_ms: now, note });
}

fn report_state(s: BellState) -> BellStatus {
    match s {
        BellState::Running => BellStatus::Running,
        BellState::Succeeded => BellStatus::Succeeded,
        BellState::Failed => BellStatus::Failed,
        BellState::TimedOut => BellStatus::TimedOut,
        BellState::Rejected => BellStatus::Rejected,
        BellState::Cancelled => BellStatus::Cancelled,
    }
}

impl Bells {
    /// Loads pending bells and arms TTL timers for the queued ones.
    pub async fn load(fleet: Arc<Fleet>, default_ttl: Duration) -> anyhow::Result<Arc<Bells>> {
        let store = fleet.store().clone();
        let pending = store.pending_bells().await?;
        let (changed, _) = broadcast::channel(1024);
        let bells = Arc::new(Bells {
            fleet,
            store,
            default_ttl,
            pending: std::sync::Mutex::new(Cache::default()),
            changed,
            finished: std::sync::Mutex::new(HashMap::new()),
        });
        for b in pending {
            bells.observe(b);
        }
        Ok(bells)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.pending.lock().expect("bells lock")
    }

    /// Subscribes to bell changes (ids).
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Takes in a version of a bell (this node's change or another node's,
    /// from the store's watch). Returns whether it was news; arms the TTL
    /// timer of a queued bell seen for the first time.
    fn observe(self: &Arc<Self>, b: BellRecord) -> bool {
        let (news, arm) = {
            let mut cache = self.lock();
            let known = cache.get(&b.id).map(|old| old.version);
            if known.is_some_and(|v| v >= b.version) || cache.finished.contains(&b.id) {
                (false, false)
            } else if b.state.is_final() {
                cache.finish(&b);
                (true, false)
            } else {
                let arm = known.is_none() && b.state == BellStatus::Queued;
                cache.pending.insert(b.id, b.clone());
                (true, arm)
            }
        };
        if arm {
            self.arm_expiry(b.id, b.expires_ms);
        }
        if news {
            let _ = self.changed.send(b.id);
        }
        news
    }

    /// A bell changed on another node (the store's watch).
    pub async fn apply(self: &Arc<Self>, b: BellRecord) {
        if self.observe(b.clone()) {
            self.react(&b).await;
        }
    }

    /// What this node does about a bell's new version: deliver a queued
    /// bell or pass a cancel request on, if it holds the device's connection.
    async fn react(self: &Arc<Self>, b: &BellRecord) {
        if b.state.is_final() {
            return;
        }
        let Some(tx) = self.fleet.sender(&b.device) else { return };
        if b.state == BellStatus::Queued {
            self.deliver(b.id).await;
        } else if b.cancel_requested {
            let _ = tx.try_send(Outbound::Msg(Box::new(ServerMsg::Cancel(b.id))));
        }
    }

    /// Applies `change` to bell `id` in the store (compare-and-set) and
    /// takes in the result.
    async fn commit(
        self: &Arc<Self>,
        id: u64,
        change: impl Fn(&BellRecord) -> Option<BellRecord> + Send + Sync,
    ) -> Result<Option<BellRecord>, BellError> {
        let started = std::time::Instant::now();
        let updated = self.store.update_bell(id, &change).await?;
        self.fleet.stats.store_write_seconds.observe(started.elapsed().as_secs_f64());
        if let Some(b) = &updated {
            if b.state.is_final() {
                *self.finished.lock().expect("finished lock").entry(b.state).or_default() += 1;
            }
            self.observe(b.clone());
        }
        Ok(updated)
    }

    /// Bells that this node brought to each final state since it started.
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
            let id = self.store.next_bell_id().await?;
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
                cancel_requested: false,
                version: 0,
                origin: req.origin.clone(),
            });
        }
        let started = std::time::Instant::now();
        self.store.put_bells(&records).await?;
        self.fleet.stats.store_write_seconds.observe(started.elapsed().as_secs_f64());
        for r in &records {
            info!(bell = r.id, device = %r.device, action = %r.action, "bell queued");
            self.observe(r.clone());
        }
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            self.react(&r).await;
            out.push(self.get(r.id).await?.unwrap_or(r));
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

    async fn expire(self: &Arc<Self>, id: u64) {
        let expire = |b: &BellRecord| {
            (b.state == BellStatus::Queued && b.expires_ms <= now_ms()).then(|| {
                let mut b = b.clone();
                transition(&mut b, BellStatus::Expired, None);
                b.reason = Some("the device did not come online before the bell's TTL passed".into());
                b
            })
        };
        match self.commit(id, expire).await {
            Ok(Some(b)) => info!(bell = id, device = %b.device, "bell expired"),
            Ok(None) => {}
            Err(e) => warn!(bell = id, error = %e, "cannot record expiry"),
        }
    }

    /// Sends a pending bell to its device if it is connected to this node;
    /// marks a queued one sent.
    async fn deliver(self: &Arc<Self>, id: u64) {
        let Some(b) = self.lock().get(&id).cloned() else { return };
        if b.state.is_final() || (b.state == BellStatus::Queued && b.expires_ms <= now_ms()) {
            return; // the expiry timer settles a late one
        }
        let Some(tx) = self.fleet.sender(&b.device) else { return };
        let msg = ServerMsg::Bell(Bell {
            id,
            action: b.action.clone(),
            params: b.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            timeout_ms: b.timeout_ms,
        });
        if tx.try_send(Outbound::Msg(Box::new(msg))).is_err() {
            warn!(bell = id, device = %b.device, "device queue full; bell stays queued until it reconnects");
            return;
        }
        if b.cancel_requested {
            let _ = tx.try_send(Outbound::Msg(Box::new(ServerMsg::Cancel(id))));
        }
        if b.state != BellStatus::Queued {
            return; // a re-delivery: state unchanged
        }
        let sent = |b: &BellRecord| {
            (b.state == BellStatus::Queued).then(|| {
                let mut b = b.clone();
                transition(&mut b, BellStatus::Sent, None);
                b
            })
        };
        if let Err(e) = self.commit(id, sent).await {
            warn!(bell = id, error = %e, "cannot record delivery");
        }
    }

    /// A device connected to this node: (re-)deliver its pending bells in
    /// order.
    pub async fn on_connect(self: &Arc<Self>, device: &str) {
        let mut ids: Vec<u64> = self.lock().values().filter(|b| b.device == device).map(|b| b.id).collect();
        ids.sort_unstable();
        for id in ids {
            self.deliver(id).await;
        }
    }

    /// A report from `device`'s agent.
    pub async fn on_report(self: &Arc<Self>, device: &str, r: BellReport) {
        let id = r.id;
        let state = report_state(r.state);
        let apply = |b: &BellRecord| {
            if b.device != device || b.state.is_final() {
                return None;
            }
            let mut b = b.clone();
            // The frame went out before `deliver` recorded it sent (that
            // write waits for a flush); a fast agent's report can come
            // first. It is proof of delivery: record `sent` now, so every
            // bell's transitions read queued, sent, ...
            if b.state == BellStatus::Queued {
                transition(&mut b, BellStatus::Sent, None);
            }
            if state == BellStatus::Running {
                if b.state == BellStatus::Running {
                    return None;
                }
                transition(&mut b, BellStatus::Running, None);
            } else {
                transition(&mut b, state, None);
                b.exit_code = r.exit_code;
                b.output = r.output.clone();
                b.duration_ms = Some(r.duration_ms);
                b.reason = r.reason.clone();
            }
            Some(b)
        };
        if let Some(owner) = self.lock().get(&id).map(|b| b.device.clone()).filter(|d| d != device) {
            warn!(bell = id, device, %owner, "ignoring a report for another device's bell");
            return;
        }
        let b = match self.commit(id, apply).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                // Not recorded: the agent's journal still has it, and the
                // next re-delivery brings it back.
                warn!(bell = id, error = %e, "cannot record bell report");
                return;
            }
        };
        if b.state.is_final() {
            info!(bell = b.id, device, state = b.state.as_str(), exit_code = ?b.exit_code, "bell finished");
            if matches!(b.state, BellStatus::Failed | BellStatus::TimedOut) {
                let details = serde_json::json!({
                    "bell": b.id, "action": b.action, "state": b.state.as_str(),
                    "exit_code": b.exit_code, "reason": b.reason,
                });
                let summary = format!("bell {} ({}) on {device} {}", b.id, b.action, b.state.as_str());
                self.fleet.raise(Raised::new(AlertKind::BellFailed, device, summary, details));
            }
        }
    }

    /// Cancels a bell: a queued one at once; a sent or running one by
    /// asking its agent through the node holding its connection (the agent
    /// reports `cancelled`); one whose device is offline at once.
    pub async fn cancel(self: &Arc<Self>, id: u64) -> Result<BellRecord, BellError> {
        let online = self
            .fleet
            .view(&self.lock().get(&id).map(|b| b.device.clone()).unwrap_or_default())
            .is_some_and(|v| v.node.is_some());
        let cancel = |b: &BellRecord| {
            if b.state.is_final() {
                return None;
            }
            let mut b = b.clone();
            match b.state {
                BellStatus::Queued => {
                    transition(&mut b, BellStatus::Cancelled, Some("cancelled before delivery".into()));
                    b.reason = Some("cancelled by the operator before delivery".into());
                }
                _ if online => {
                    if b.cancel_requested {
                        return None;
                    }
                    b.cancel_requested = true;
                    b.updated_ms = now_ms();
                    b.transitions.push(Transition {
                        state: b.state,
                        at_ms: now_ms(),
                        note: Some("cancel requested".into()),
                    });
                }
                _ => {
                    transition(&mut b, BellStatus::Cancelled, Some("device offline".into()));
                    b.reason = Some("cancelled while the device was offline; it may have started".into());
                }
            }
            Some(b)
        };
        match self.commit(id, cancel).await? {
            Some(b) => {
                self.react(&b).await;
                Ok(b)
            }
            None => match self.store.bell(id).await? {
                Some(b) if b.state.is_final() => {
                    Err(BellError::Conflict(format!("bell {id} is already {}", b.state.as_str())))
                }
                Some(b) => Ok(b), // a cancel was already requested
                None => Err(BellError::NotFound(format!("no bell {id}"))),
            },
        }
    }

    /// One bell.
    pub async fn get(&self, id: u64) -> Result<Option<BellRecord>, BellError> {
        if let Some(b) = self.lock().get(&id) {
            return Ok(Some(b.clone()));
        }
        Ok(self.store.bell(id).await?)
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
            // Woken by this bell's change, or every second to look again
            // (a change that lands between the look and the subscription's
            // next receive is never missed for longer than that).
            loop {
                let tick = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
                match tokio::time::timeout_at(tick, rx.recv()).await {
                    Err(_) if tick >= deadline => return Ok(b),
                    Err(_) => break,
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
        let mut out = self.store.bells(device, limit.min(LIST_LIMIT)).await?;
        out.sort_by_key(|b| std::cmp::Reverse(b.id));
        Ok(out)
    }

    /// Counts of pending bells by state (metrics).
    pub fn pending_counts(&self) -> HashMap<BellStatus, u64> {
        let mut out = HashMap::new();
        for b in self.lock().values() {
            *out.entry(b.state).or_default() += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests;
