//! The records the collector keeps: what a [`super::Store`] reads and
//! writes. Plain data, serialized as JSON (sled) or JSON in JetStream, so a
//! record can gain a field (`#[serde(default)]`) without a migration.

use std::collections::BTreeMap;
use std::fmt;

use pulsebell_proto::{ActionInfo, CheckResult, Health, Hello};
use serde::{Deserialize, Serialize};

/// Why a device's liveness changed: the reason of an [`EventRecord`] and a
/// device's `last_offline_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Online: the device connected and said Hello.
    Connected,
    /// Online: a silent device pulsed again on its open connection.
    Pulse,
    /// Offline: the connection ended without the agent saying why.
    Disconnected,
    /// Offline: no pulse for `offline_after`.
    Silent,
    /// Offline: the device was revoked or its token rotated.
    Revoked,
    /// Offline: a newer connection of the device took over.
    Replaced,
    /// Offline: the collector holding the connection shut down.
    CollectorShutdown,
    /// Offline: the collector holding the connection died (cluster mode).
    CollectorLost,
    /// Offline: the collector holding it was cut off from the cluster.
    CollectorFenced,
    /// Offline: the device sent far more than its announced rate and was
    /// cut off.
    RateLimited,
    /// Offline: the agent said goodbye (a planned stop: `systemctl stop`,
    /// a shutdown).
    AgentStopped,
    /// Offline: the agent stopped because a bell's action is rebooting the
    /// board.
    Rebooting,
    /// A device enrolled itself with a provisioning key.
    Provisioned,
    /// One of the agent's checks changed status (the event names it).
    Check,
    /// A reason written by a newer version of the collector.
    #[serde(other)]
    Unknown,
}

impl Reason {
    /// The snake_case name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connected => "connected",
            Reason::Pulse => "pulse",
            Reason::Disconnected => "disconnected",
            Reason::Silent => "silent",
            Reason::Revoked => "revoked",
            Reason::Replaced => "replaced",
            Reason::CollectorShutdown => "collector_shutdown",
            Reason::CollectorLost => "collector_lost",
            Reason::CollectorFenced => "collector_fenced",
            Reason::RateLimited => "rate_limited",
            Reason::AgentStopped => "agent_stopped",
            Reason::Rebooting => "rebooting",
            Reason::Provisioned => "provisioned",
            Reason::Check => "check",
            Reason::Unknown => "unknown",
        }
    }

    /// Whether an offline for this reason is worth an alert (the device's
    /// problem, not the collector's own restart or an operator's action).
    pub fn alerts(self) -> bool {
        matches!(self, Reason::Silent | Reason::Disconnected | Reason::RateLimited)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's enrolment: who may connect as this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// Device id.
    pub device: String,
    /// Public part of the token, used to find the enrolment.
    pub key_id: String,
    /// SHA-256 of the token's secret part, hex.
    pub secret_sha256: String,
    /// When it was enrolled, Unix ms.
    pub created_ms: u64,
    /// Tags given at enrolment (by a provisioning key), shown with the
    /// agent's own.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The provisioning key that enrolled it, if one did.
    #[serde(default)]
    pub provisioned_by: Option<String>,
}

/// Link-quality counters of one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Pulses received.
    #[serde(default)]
    pub pulses: u64,
    /// Pulses that never arrived (gaps in sequence numbers).
    pub missed_pulses: u64,
    /// Pulses that arrived more than 1.5 intervals after the previous one.
    pub late_pulses: u64,
    /// Connection times in the last 24 h, Unix ms (bounded).
    pub connects_ms: Vec<u64>,
    /// Last measured WebSocket ping round trip, ms.
    pub rtt_ms: Option<f64>,
}

/// The last known state of a device, written back periodically. The sled
/// store keeps it as postcard, which is not self-describing: a change to
/// its layout (or to `Hello`, `Health`, `LinkStats`) needs a new format tag
/// there (`store/sled.rs`, `device_record_layout_is_frozen` fails until
/// then).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Facts from the last Hello.
    pub hello: Option<Hello>,
    /// The last health sample.
    pub health: Option<Health>,
    /// Last pulse sequence number.
    pub last_seq: u32,
    /// Time of the last pulse (or Hello), Unix ms.
    pub last_seen_ms: Option<u64>,
    /// Connection generation of the newest connection.
    pub generation: u64,
    /// Whether the device was online at the time of writing.
    pub online: bool,
    /// Why it last went offline.
    #[serde(default)]
    pub last_offline_reason: Option<Reason>,
    /// Link quality.
    #[serde(default)]
    pub link: LinkStats,
    /// The agent's checks as last reported, by name (protocol version 2;
    /// empty for agents of version 1). Last, so that records written
    /// before checks existed decode with none (see `store/sled.rs`).
    #[serde(default)]
    pub checks: Vec<CheckResult>,
    /// The allowlist's actions with their parameters, as the agent sent
    /// them after its last Hello (protocol version 2; empty before).
    #[serde(default)]
    pub action_info: Vec<ActionInfo>,
}

/// States of a bell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BellStatus {
    /// Accepted, waiting for the device.
    Queued,
    /// Written to the device's connection.
    Sent,
    /// The agent started the action.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, or could not run.
    Failed,
    /// Killed after its timeout.
    TimedOut,
    /// Refused by the agent.
    Rejected,
    /// Cancelled by an operator.
    Cancelled,
    /// Its TTL passed before delivery.
    Expired,
}

impl BellStatus {
    /// Whether no further transition can happen.
    pub fn is_final(self) -> bool {
        !matches!(self, BellStatus::Queued | BellStatus::Sent | BellStatus::Running)
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BellStatus::Queued => "queued",
            BellStatus::Sent => "sent",
            BellStatus::Running => "running",
            BellStatus::Succeeded => "succeeded",
            BellStatus::Failed => "failed",
            BellStatus::TimedOut => "timed_out",
            BellStatus::Rejected => "rejected",
            BellStatus::Cancelled => "cancelled",
            BellStatus::Expired => "expired",
        }
    }

    /// All states, for metrics.
    pub const ALL: [BellStatus; 9] = [
        BellStatus::Queued,
        BellStatus::Sent,
        BellStatus::Running,
        BellStatus::Succeeded,
        BellStatus::Failed,
        BellStatus::TimedOut,
        BellStatus::Rejected,
        BellStatus::Cancelled,
        BellStatus::Expired,
    ];
}

/// One state change of a bell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// New state.
    pub state: BellStatus,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Extra detail (who cancelled, why it expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A bell and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BellRecord {
    /// Id.
    pub id: u64,
    /// Target device.
    pub device: String,
    /// Action name.
    pub action: String,
    /// Parameters.
    pub params: BTreeMap<String, String>,
    /// Current state.
    pub state: BellStatus,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// Expires if not delivered by then, Unix ms.
    pub expires_ms: u64,
    /// Run-time limit asked for, ms.
    pub timeout_ms: Option<u32>,
    /// Exit code, once known.
    pub exit_code: Option<i32>,
    /// Output tail.
    pub output: String,
    /// Run time, once known.
    pub duration_ms: Option<u64>,
    /// Why rejected, failed, expired or cancelled.
    pub reason: Option<String>,
    /// Every state change in order.
    pub transitions: Vec<Transition>,
    /// An operator asked to cancel it while it was sent or running; the
    /// node holding the device's connection passes that on to the agent.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Number of changes written so far: a newer copy has a larger one.
    #[serde(default)]
    pub version: u64,
    /// Who rang it: `None` for an operator, `rule:NAME` for a rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// Kind of a liveness event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The device connected and said Hello.
    Online,
    /// The device stopped being online.
    Offline,
    /// The device enrolled itself with a provisioning key.
    Provisioned,
    /// One of its checks left OK (or first reported not OK), or went from
    /// one failing status to another.
    CheckFailed,
    /// One of its checks is OK again.
    CheckRecovered,
}

/// A liveness transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Device id.
    pub device: String,
    /// Online or offline.
    pub kind: EventKind,
    /// Why.
    pub reason: Reason,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Connection generation it belongs to.
    pub generation: u64,
    /// The check, for `check_failed` / `check_recovered`: name and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckEvent>,
}

/// What a check event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckEvent {
    /// The check's name.
    pub name: String,
    /// Its new status (`ok`, `warning`, `critical`, `unknown`).
    pub status: String,
    /// Its summary line.
    pub summary: String,
}

/// Who holds a device's connection (cluster mode): the node and the
/// connection generation. Generations only grow, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Node holding the connection; `None` once it ended.
    pub node: Option<String>,
    /// Generation of the newest connection.
    pub generation: u64,
    /// When this was written, Unix ms.
    pub at_ms: u64,
    /// Why the connection ended, once it did.
    #[serde(default)]
    pub reason: Option<Reason>,
}

/// A collector node's heartbeat (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// Device connections it holds.
    pub devices: u64,
    /// Last heartbeat, Unix ms.
    pub heartbeat_ms: u64,
    /// When it started, Unix ms.
    pub started_ms: u64,
    /// Its device endpoint, for operators.
    #[serde(default)]
    pub device_addr: Option<String>,
    /// Heartbeats sent by this process: with `started_ms`, orders them.
    #[serde(default)]
    pub seq: u64,
}

/// What happened, for alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The device went offline.
    DeviceOffline,
    /// The device is online again after being offline.
    DeviceOnline,
    /// Under-voltage appeared (now).
    UnderVoltage,
    /// Frequency capping, throttling or the soft temperature limit appeared (now).
    Throttled,
    /// A bell ended failed or timed out.
    BellFailed,
    /// The agent stopped on purpose (only when `[alerts] events` lists it).
    AgentStopped,
    /// A device enrolled itself with a provisioning key.
    Provisioned,
    /// A check on the device is failing (warning, critical or unknown).
    CheckFailed,
    /// A failing check is OK again.
    CheckRecovered,
}

impl AlertKind {
    /// Every kind.
    pub const ALL: [AlertKind; 9] = [
        AlertKind::DeviceOffline,
        AlertKind::DeviceOnline,
        AlertKind::UnderVoltage,
        AlertKind::Throttled,
        AlertKind::BellFailed,
        AlertKind::AgentStopped,
        AlertKind::Provisioned,
        AlertKind::CheckFailed,
        AlertKind::CheckRecovered,
    ];

    /// The snake_case name (config `events` values).
    pub const fn as_str(self) -> &'static str {
        match self {
            AlertKind::DeviceOffline => "device_offline",
            AlertKind::DeviceOnline => "device_online",
            AlertKind::UnderVoltage => "under_voltage",
            AlertKind::Throttled => "throttled",
            AlertKind::BellFailed => "bell_failed",
            AlertKind::AgentStopped => "agent_stopped",
            AlertKind::Provisioned => "provisioned",
            AlertKind::CheckFailed => "check_failed",
            AlertKind::CheckRecovered => "check_recovered",
        }
    }
}

/// An alert as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Outbox id.
    pub id: u64,
    /// Stable across retries and restarts: receivers deduplicate on it.
    pub idempotency_key: String,
    /// What happened.
    pub kind: AlertKind,
    /// Which device.
    pub device: String,
    /// When, RFC 3339.
    pub at: String,
    /// Human summary.
    pub summary: String,
    /// Kind-specific details (reason, generation, bell id, flags).
    pub details: serde_json::Value,
}

/// An outbox entry: the alert and the sinks that still need it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The alert.
    pub alert: Alert,
    /// Sink names still to deliver to (`webhook:<url>`, `command`).
    pub pending: Vec<String>,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before, Unix ms.
    pub next_attempt_ms: u64,
    /// Last error, for `show` and logs.
    pub last_error: Option<String>,
}

/// A provisioning key: lets boards flashed with one image enrol themselves.
/// Only a hash of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionKey {
    /// Public id (16 hex digits), the middle part of the key.
    pub id: String,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    /// Tags given to every device it enrols.
    pub tags: Vec<String>,
    /// Enrolments left; `None`: unlimited.
    pub uses_left: Option<u32>,
    /// Not valid after, Unix ms; `None`: no expiry.
    pub expires_ms: Option<u64>,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Devices enrolled with it.
    pub used: u32,
}
