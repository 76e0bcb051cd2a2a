//! Persistence behind a narrow, async interface.
//!
//! [`Store`] is everything the collector asks of its database: enrolments,
//! the last state of each device, who holds each device's connection,
//! bells, liveness events, history and the alert outbox. Two
//! implementations:
//!
//! - [`SledStore`] (`sled.rs`): the embedded default, one process.
//! - [`NatsStore`] (`nats.rs`): NATS JetStream, shared by every collector
//!   of a cluster.
//! - [`MemoryStore`] (`memory.rs`): in memory, for unit tests.
//!
//! Where several collectors may write the same record, the interface says
//! so and the cluster implementation decides with compare-and-set, never
//! with a plain read: [`Store::claim`] (connection generations),
//! [`Store::release`], [`Store::update_bell`], [`Store::lease_outbox`].
//!
//! Durability contract: methods documented "durable" have reached disk (or
//! been acknowledged by JetStream with the configured replication) when
//! they return. Device state is written back in batches
//! ([`Store::put_device_states`]), so up to the configured write-back window
//! of pulse state can be lost in a crash; never an enrolment or a bell.

mod memory;
pub mod nats;
mod records;
mod sled;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use memory::MemoryStore;
pub use nats::NatsStore;
pub use records::*;
pub use sled::SledStore;

use crate::history::Bucket;

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("{context}: {source}")]
    Db {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value did not decode.
    #[error("corrupt record in `{tree}` for key {key}: {error}")]
    Corrupt {
        /// Tree or bucket name.
        tree: &'static str,
        /// Key, printable.
        key: String,
        /// Decoder error.
        error: String,
    },
    /// The store is unavailable for now (cluster: cut off from NATS).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A database error with context.
    pub fn db(context: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError::Db { context: context.into(), source: source.into() }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A change made by another collector of the cluster, as the store's
/// watches see it. The single-node stores have none.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // short-lived, one at a time through a channel
pub enum Change {
    /// A device was enrolled or its token rotated.
    Enrolled(Enrolment),
    /// A device was revoked.
    Removed(String),
    /// A device's state was written back.
    Device(String, DeviceRecord),
    /// A device's connection changed hands (or ended).
    Owner(String, Owner),
    /// A bell was created or changed.
    Bell(BellRecord),
    /// A node's heartbeat.
    Node(NodeRecord),
    /// A watch restarted after an interruption: what follows is a full
    /// snapshot of that kind.
    Resynced(&'static str),
}

/// A bell change: given the current record, the new one, or `None` to
/// leave it as it is.
pub type BellChange<'a> = &'a (dyn Fn(&BellRecord) -> Option<BellRecord> + Send + Sync);

/// A provisioning-key change, like [`BellChange`].
pub type ProvisionChange<'a> = &'a (dyn Fn(&ProvisionKey) -> Option<ProvisionKey> + Send + Sync);

/// What the collector needs from a database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sled`, `nats` or `memory`.
    fn backend(&self) -> &'static str;

    /// Adds or replaces enrolments. Durable.
    async fn put_enrolments(&self, es: &[Enrolment]) -> Result<()>;
    /// Adds an enrolment only if the device has none (compare-and-set).
    /// Durable. Whether it was added.
    async fn create_enrolment(&self, e: &Enrolment) -> Result<bool>;
    /// Removes a device: enrolment, state and history. Durable. Whether it
    /// existed.
    async fn delete_device(&self, device: &str) -> Result<bool>;
    /// Every enrolment.
    async fn enrolments(&self) -> Result<Vec<Enrolment>>;

    /// Writes device states in one batch. Durable.
    async fn put_device_states(&self, states: &[(String, DeviceRecord)]) -> Result<()>;
    /// Every stored device state.
    async fn device_states(&self) -> Result<Vec<(String, DeviceRecord)>>;

    /// Claims `device`'s connection for `node`: returns a generation larger
    /// than `floor` and than every generation claimed before, on any node.
    async fn claim(&self, device: &str, node: &str, floor: u64) -> Result<u64>;
    /// Ends `node`'s connection `generation` of `device` for `reason`, if it
    /// is still the newest; whether it was.
    async fn release(&self, device: &str, node: &str, generation: u64, reason: Reason) -> Result<bool>;
    /// Who holds each device's connection (cluster mode; empty otherwise).
    async fn owners(&self) -> Result<Vec<(String, Owner)>>;

    /// A new bell id, unique and increasing.
    async fn next_bell_id(&self) -> Result<u64>;
    /// Writes new bells and their indexes. Durable.
    async fn put_bells(&self, bells: &[BellRecord]) -> Result<()>;
    /// Applies `change` to bell `id` atomically (compare-and-set, retried
    /// on conflict with the fresh record). Durable. The new record, or
    /// `None` when there is no such bell or `change` left it alone.
    async fn update_bell(&self, id: u64, change: BellChange<'_>) -> Result<Option<BellRecord>>;
    /// One bell.
    async fn bell(&self, id: u64) -> Result<Option<BellRecord>>;
    /// Newest bells first, of one device or all, at most `limit`.
    async fn bells(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>>;
    /// Bells not yet in a final state, oldest first.
    async fn pending_bells(&self) -> Result<Vec<BellRecord>>;

    /// Appends liveness events. Durable.
    async fn append_events(&self, events: &[EventRecord]) -> Result<()>;
    /// Events at or after `since_ms`, oldest first, of one device or all,
    /// the newest `limit` of them.
    async fn events(&self, device: Option<&str>, since_ms: u64, limit: usize) -> Result<Vec<EventRecord>>;

    /// Stores finished history buckets.
    async fn put_history(&self, buckets: &[(String, Bucket)]) -> Result<()>;
    /// Buckets of `device` from `since_minute` on, oldest first.
    async fn history(&self, device: &str, since_minute: u32) -> Result<Vec<Bucket>>;

    /// Drops events older than `events_before_ms` and history of `devices`
    /// older than `history_before_minute` (stores with their own retention
    /// do nothing). Returns how many records went.
    async fn prune(&self, events_before_ms: u64, history_before_minute: u32, devices: &[String]) -> Result<usize>;

    /// A new unique id (alerts).
    async fn next_id(&self) -> Result<u64>;
    /// A random id of this database (cluster: of the whole cluster).
    fn instance_id(&self) -> String;
    /// Writes alert outbox entries (new or updated). Durable.
    async fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()>;
    /// Every outbox entry, oldest first.
    async fn outbox(&self) -> Result<Vec<OutboxEntry>>;
    /// Takes alert `id` for `node` until `until_ms`, so that one node of a
    /// cluster delivers it; whether this node got it.
    async fn lease_outbox(&self, id: u64, node: &str, until_ms: u64) -> Result<bool>;
    /// Removes a delivered entry. Durable.
    async fn remove_outbox(&self, id: u64) -> Result<()>;

    /// Adds a provisioning key. Durable.
    async fn put_provision_key(&self, key: &ProvisionKey) -> Result<()>;
    /// Every provisioning key.
    async fn provision_keys(&self) -> Result<Vec<ProvisionKey>>;
    /// Applies `change` to key `id` atomically (compare-and-set). Durable.
    /// The new key, or `None` when there is none or `change` left it alone.
    async fn update_provision_key(&self, id: &str, change: ProvisionChange<'_>) -> Result<Option<ProvisionKey>>;

    /// Sends this node's heartbeat (cluster mode): other nodes see it as a
    /// [`Change::Node`].
    async fn heartbeat(&self, _node: &NodeRecord) -> Result<()> {
        Ok(())
    }
    /// Whether this node can use the shared store now: connected, and the
    /// store has a quorum (cluster mode). A node that fails this for long
    /// must stop serving devices.
    async fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Every node's last heartbeat (cluster mode).
    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        Ok(vec![])
    }

    /// Changes made by other collectors, if the store is shared; `None`
    /// for a single-node store. Called once.
    fn changes(&self) -> Option<mpsc::Receiver<Change>> {
        None
    }

    /// Records that did not decode and were skipped (cluster buckets).
    fn corrupt_records(&self) -> u64 {
        0
    }

    /// Flushes everything written so far to disk.
    async fn flush(&self) -> Result<()>;
}
