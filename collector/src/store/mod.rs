//! Persistence behind a narrow interface.
//!
//! [`Store`] is everything the collector asks of its database: enrolments,
//! the last state of each device, bells and liveness events. [`SledStore`]
//! is the embedded implementation; a distributed backend implements the same
//! trait. Calls are synchronous (sled is); async callers use
//! `spawn_blocking` for the ones that flush.
//!
//! Durability contract: methods documented "durable" have reached disk
//! when they return. Device state is written back in batches
//! ([`Store::put_device_states`]), so up to the configured write-back window
//! of pulse state can be lost in a crash; never an enrolment or a bell.

mod sled_store;

use std::collections::BTreeMap;

use pulsebell_proto::{Health, Hello};
use serde::{Deserialize, Serialize};

pub use sled_store::SledStore;

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(String),
    /// A stored value did not decode.
    #[error("corrupt record in `{tree}` for key {key}: {error}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// Key, printable.
        key: String,
        /// Decoder error.
        error: String,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

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

/// The last known state of a device, written back periodically.
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
    pub last_offline_reason: Option<String>,
    /// Link quality.
    #[serde(default)]
    pub link: LinkStats,
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
}

/// Kind of a liveness event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The device connected and said Hello.
    Online,
    /// The device stopped being online.
    Offline,
}

/// A liveness transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Device id.
    pub device: String,
    /// Online or offline.
    pub kind: EventKind,
    /// Why (`connected`, `disconnected`, `silent`, `revoked`, `collector_shutdown`, …).
    pub reason: String,
    /// When, Unix ms.
    pub at_ms: u64,
    /// Connection generation it belongs to.
    pub generation: u64,
}

/// What the collector needs from a database.
pub trait Store: Send + Sync + 'static {
    /// Adds or replaces an enrolment. Durable.
    fn put_enrolment(&self, e: &Enrolment) -> Result<()>;
    /// Adds many enrolments at once. Durable.
    fn put_enrolments(&self, es: &[Enrolment]) -> Result<()>;
    /// Removes a device: enrolment and state. Durable. Whether it existed.
    fn delete_device(&self, device: &str) -> Result<bool>;
    /// Every enrolment.
    fn enrolments(&self) -> Result<Vec<Enrolment>>;

    /// Writes device states in one batch. Durable.
    fn put_device_states(&self, states: &[(String, DeviceRecord)]) -> Result<()>;
    /// Every stored device state.
    fn device_states(&self) -> Result<Vec<(String, DeviceRecord)>>;

    /// A new bell id, unique and increasing.
    fn next_bell_id(&self) -> Result<u64>;
    /// Writes bells (new or updated) and their indexes. Durable.
    fn put_bells(&self, bells: &[BellRecord]) -> Result<()>;
    /// One bell.
    fn bell(&self, id: u64) -> Result<Option<BellRecord>>;
    /// Newest bells first, of one device or all, at most `limit`.
    fn bells(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>>;
    /// Bells not yet in a final state, oldest first.
    fn pending_bells(&self) -> Result<Vec<BellRecord>>;

    /// Appends liveness events. Durable.
    fn append_events(&self, events: &[EventRecord]) -> Result<()>;
    /// Events at or after `since_ms`, oldest first, of one device or all,
    /// the newest `limit` of them.
    fn events(&self, device: Option<&str>, since_ms: u64, limit: usize) -> Result<Vec<EventRecord>>;
    /// Drops events older than `before_ms`; returns how many.
    fn prune_events(&self, before_ms: u64) -> Result<usize>;

    /// Stores finished history buckets. Not flushed by itself (the
    /// write-back loop flushes).
    fn put_history(&self, buckets: &[(String, crate::history::Bucket)]) -> Result<()>;
    /// Buckets of `device` from `since_minute` on, oldest first.
    fn history(&self, device: &str, since_minute: u32) -> Result<Vec<crate::history::Bucket>>;
    /// Deletes buckets of `device` older than `before_minute` (whole hours);
    /// returns how many keys went.
    fn prune_history(&self, device: &str, before_minute: u32) -> Result<usize>;

    /// A new unique id (alerts and other records).
    fn next_id(&self) -> Result<u64>;
    /// A random id of this database, made on first open.
    fn instance_id(&self) -> String;
    /// Writes alert outbox entries (new or updated). Durable.
    fn put_outbox(&self, entries: &[crate::alerts::OutboxEntry]) -> Result<()>;
    /// Every outbox entry, oldest first.
    fn outbox(&self) -> Result<Vec<crate::alerts::OutboxEntry>>;
    /// Removes a delivered entry. Durable.
    fn remove_outbox(&self, id: u64) -> Result<()>;

    /// Flushes everything written so far to disk.
    fn flush(&self) -> Result<()>;
}
