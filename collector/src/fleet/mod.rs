//! The fleet: every enrolled device, who holds its connection and its last
//! state, in memory; written back to the store in batches.
//!
//! - `mod.rs` (this file): the registry and its lock; connections, pulses,
//!   offline, enrolment and revocation; changes from other nodes.
//! - [`crate::liveness`]: the rules for online/offline and what each
//!   change records (pure).
//! - [`link`]: link-quality counters.
//! - [`view`]: the JSON view of a device.
//! - [`page`]: a page of the fleet table (the dashboard).
//! - [`writeback`]: the batch written to the store every `write_back`.
//!
//! One `std::sync::Mutex` guards the map. Critical sections are short: no
//! I/O, no await, no serialization; the store is called before taking the
//! lock (enrolment, generation claims) or after releasing it (write-back),
//! which is why a std mutex and not a tokio one.

pub mod link;
pub mod page;
pub mod view;
pub mod writeback;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pulsebell_proto::{close, CheckDigest, CheckReport, CheckStatus, Hello, Pulse, ServerMsg};
use tracing::{info, warn};

use crate::alerts::Raised;
use crate::auth;
use crate::clock::now_ms;
use crate::config::{Config, RuleConfig};
use crate::history::{Accumulator, Bucket};
use crate::liveness::{self, Effects};
use crate::store::{Change, DeviceRecord, Enrolment, EventRecord, Owner, Reason, Store};

pub use view::{CheckRow, CheckView, DeviceView, LinkView};

/// Something for one device's connection task to do.
#[derive(Debug)]
pub enum Outbound {
    /// Send this message (boxed: the queue's slots are sized for the
    /// largest variant).
    Msg(Box<ServerMsg>),
    /// Close with this code and reason; the device goes offline for the
    /// typed reason.
    Close(u16, Box<str>, Reason),
}

/// The sending side of a connection's outbound queue.
pub type OutboundTx = flume::Sender<Outbound>;
/// The connection's side of its outbound queue.
pub type OutboundRx = flume::Receiver<Outbound>;

/// A connection's outbound queue, holding at most `capacity` items. flume's
/// queue allocates its slots as items arrive (tokio's mpsc allocates 32 slots
/// and a cache-padded channel, ~1.3 KB, with every connection, and most
/// connections never carry anything but pulses inward).
pub fn outbound_queue(capacity: usize) -> (OutboundTx, OutboundRx) {
    flume::bounded(capacity)
}

/// The live connection of a device on this node.
#[derive(Debug)]
struct Conn {
    generation: u64,
    tx: OutboundTx,
}

#[derive(Debug)]
struct Device {
    enrolment: Enrolment,
    record: DeviceRecord,
    conn: Option<Conn>,
    /// Node holding the connection (this one when `conn` is set; another
    /// node of the cluster otherwise).
    owner: Option<String>,
    dirty: bool,
    /// A change other nodes should see at the next write-back (liveness,
    /// Hello), not only a newer pulse.
    urgent: bool,
    /// When its record was last taken into a batch, Unix ms.
    written_ms: u64,
    /// Pulses accepted since its record was last taken into a batch: they
    /// count as stored once that record is written (`pulses_stored`).
    unwritten: u32,
    /// The open history minute.
    minute: Option<Accumulator>,
    /// The last generation whose end another node's loss was recorded for.
    ended_elsewhere: u64,
}

impl Device {
    /// Whether connection `generation` is the one this node holds for the
    /// device now (messages of an older, replaced connection are dropped).
    fn holds(&self, generation: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.generation == generation)
    }

    fn new(enrolment: Enrolment, record: DeviceRecord) -> Box<Device> {
        Box::new(Device {
            enrolment,
            record,
            conn: None,
            owner: None,
            dirty: false,
            urgent: false,
            written_ms: 0,
            unwritten: 0,
            minute: None,
            ended_elsewhere: 0,
        })
    }

    /// `online`, `offline` or `never_seen`.
    fn state(&self) -> &'static str {
        view::state_of(&self.record, self.owner.as_deref())
    }

    /// Its tags: the agent's (last Hello), then its enrolment's (may repeat).
    fn tags(&self) -> impl Iterator<Item = &String> {
        let agent = self.record.hello.as_ref().map(|h| h.tags.as_slice()).unwrap_or_default();
        agent.iter().chain(&self.enrolment.tags)
    }

    fn has_tag(&self, tag: &str) -> bool {
        self.tags().any(|t| t == tag)
    }
}

/// The devices by id. Boxed: a hash table keeps up to twice as many slots as
/// entries, and a `Device` is 752 B inline; boxed, an empty slot costs 8 B.
type Devices = HashMap<String, Box<Device>>;

#[derive(Default)]
struct State {
    devices: Devices,
    /// Token key id → device id.
    keys: HashMap<String, String>,
    /// Devices with unsaved state.
    dirty: Vec<String>,
    /// Events not yet saved.
    events: Vec<EventRecord>,
    /// Finished history minutes not yet saved.
    history: Vec<(String, Bucket)>,
    /// Alerts not yet in the outbox.
    alerts: Vec<Raised>,
    /// Device ids sorted, for dashboard pages: built by the first page
    /// asked for, dropped when a device is enrolled or removed.
    sorted: Option<Vec<String>>,
    /// Devices by state and tags, kept in step with every change of either
    /// (every site that changes a device's state or tags tells it).
    tally: page::Tally,
    /// Devices with a check that is not OK: what a check rule looks at,
    /// instead of the whole fleet (every site that changes a device's
    /// checks calls `note_checks`).
    failing: std::collections::HashSet<String>,
}

impl State {
    /// A liveness change: written at the next write-back.
    fn mark_dirty(&mut self, id: &str) {
        self.mark(id, true);
    }

    /// Only a newer pulse: may wait for the sync interval.
    fn mark_routine(&mut self, id: &str) {
        self.mark(id, false);
    }

    fn mark(&mut self, id: &str, urgent: bool) {
        if let Some(d) = self.devices.get_mut(id) {
            d.urgent |= urgent;
            if !d.dirty {
                d.dirty = true;
                self.dirty.push(id.to_string());
            }
        }
    }

    /// Keeps `failing` in step with `id`'s checks.
    fn note_checks(&mut self, id: &str) {
        let failing = self.devices.get(id).is_some_and(|d| failing_checks(&d.record));
        if !failing {
            self.failing.remove(id);
        } else if !self.failing.contains(id) {
            self.failing.insert(id.to_string());
        }
    }

    fn absorb(&mut self, fx: Effects) {
        self.events.extend(fx.events);
        self.alerts.extend(fx.alerts);
    }
}

/// A fleet lock holder above this is logged with its call site.
pub const SLOW_LOCK: Duration = Duration::from_millis(2);

/// The fleet lock held; times itself on release. The guard is an `Option`
/// only so that `drop` can release the fleet lock before it records the
/// times (a histogram takes a mutex of its own: not inside ours, on the
/// per-pulse path).
struct Locked<'a> {
    guard: Option<std::sync::MutexGuard<'a, State>>,
    since: std::time::Instant,
    waited: Duration,
    at: &'static std::panic::Location<'static>,
    stats: &'a Stats,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        drop(self.guard.take());
        self.stats.lock_wait_seconds.observe(self.waited.as_secs_f64());
        self.stats.lock_hold_seconds.observe(held.as_secs_f64());
        if held >= SLOW_LOCK {
            tracing::debug!(target: "fleet_lock", held_ms = held.as_secs_f64() * 1000.0, at = %self.at, "fleet lock held long");
        }
    }
}

/// Counters for the admin API and metrics.
#[derive(Debug)]
pub struct Stats {
    /// Pulses accepted into device state.
    pub pulses_accepted: AtomicU64,
    /// Pulses whose device state has been written to the store.
    pub pulses_stored: AtomicU64,
    /// Bytes of device messages received.
    pub bytes_received: AtomicU64,
    /// Device connections open now.
    pub connections: AtomicU64,
    /// Completed handshakes.
    pub handshakes: AtomicU64,
    /// Device records written to the store.
    pub records_written: AtomicU64,
    /// Connections closed for sending far above their announced rate.
    pub rate_limited: AtomicU64,
    /// Failed handshakes by reason.
    pub handshake_failures: Mutex<HashMap<&'static str, u64>>,
    /// Latency of durable store writes (device batches, bells), seconds.
    pub store_write_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Time spent waiting for the fleet lock, seconds.
    pub lock_wait_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Time the fleet lock was held, seconds.
    pub lock_hold_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            pulses_accepted: AtomicU64::new(0),
            pulses_stored: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            handshake_failures: Mutex::new(HashMap::new()),
            store_write_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            lock_wait_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_001, 4.0, 10),
            ),
            lock_hold_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_001, 4.0, 10),
            ),
        }
    }
}

impl Stats {
    /// Counts one failed handshake.
    pub fn handshake_failed(&self, reason: &'static str) {
        *self.handshake_failures.lock().expect("stats lock").entry(reason).or_default() += 1;
    }
}

/// Why authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No or malformed token.
    Malformed,
    /// No enrolment has this key id, or the secret is wrong.
    Invalid,
}

/// What a connection learns when its Hello is accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// This connection's generation.
    pub generation: u64,
    /// Offline threshold for this device.
    pub offline_after: Duration,
}

/// What became of a pulse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pulsed {
    /// Taken in.
    Accepted,
    /// Taken in, but its check digest disagrees with the checks this
    /// collector holds: ask the agent for all of them again.
    ChecksDiffer,
    /// From a connection that is no longer the device's current one.
    Stale,
}

/// Why a Hello was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The device is no longer enrolled.
    Revoked,
    /// A newer connection of the device exists (on this or another node).
    Superseded,
}

/// The fleet.
pub struct Fleet {
    config: Arc<Config>,
    node: String,
    /// Routine (pulse-only) records wait this long between writes, ms.
    sync_ms: u64,
    store: Arc<dyn Store>,
    state: Mutex<State>,
    /// Counters.
    pub stats: Stats,
}

impl Fleet {
    /// Loads enrolments, last states and connection owners from the store.
    pub async fn load(config: Arc<Config>, node: String, store: Arc<dyn Store>) -> anyhow::Result<Arc<Fleet>> {
        let enrolments = store.enrolments().await?;
        let records = store.device_states().await?;
        let owners = store.owners().await?;
        let sync = if config.cluster.enabled() { config.cluster.sync_interval } else { config.sync_interval };
        let sync_ms = sync.as_millis() as u64;
        let fleet = Arc::new(Fleet {
            config,
            node,
            sync_ms,
            store,
            state: Mutex::new(State::default()),
            stats: Stats::default(),
        });
        {
            let mut state = fleet.lock();
            let mut records: HashMap<String, DeviceRecord> = records.into_iter().collect();
            for e in enrolments {
                let record = records.remove(&e.device).unwrap_or_default();
                state.keys.insert(e.key_id.clone(), e.device.clone());
                state.devices.insert(e.device.clone(), Device::new(e, record));
            }
            for (id, owner) in owners {
                if let Some(d) = state.devices.get_mut(&id) {
                    apply_owner(d, &id, &owner, &fleet.node);
                }
            }
            state.tally = page::Tally::of(&state.devices);
            state.failing =
                state.devices.iter().filter(|(_, d)| failing_checks(&d.record)).map(|(id, _)| id.clone()).collect();
        }
        Ok(fleet)
    }

    /// The fleet lock. Every pulse, report and view takes it, so how long
    /// it is waited for and held is measured (`/metrics`), and a holder
    /// over [`SLOW_LOCK`] is logged with its call site (target
    /// `fleet_lock`, debug).
    #[track_caller]
    fn lock(&self) -> Locked<'_> {
        let asked = std::time::Instant::now();
        let guard = self.state.lock().expect("fleet lock");
        let since = std::time::Instant::now();
        Locked {
            guard: Some(guard),
            since,
            waited: since - asked,
            at: std::panic::Location::caller(),
            stats: &self.stats,
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Devices the store says are online but that no node holds, with the
    /// time they must be declared offline if they have not come back (last
    /// seen + offline_after): after a restart of a single collector.
    pub fn stale_online(&self) -> Vec<(String, u64, u64)> {
        let state = self.lock();
        state
            .devices
            .iter()
            .filter(|(_, d)| d.record.online && d.conn.is_none() && d.owner.is_none())
            .map(|(id, d)| {
                let after = self.offline_after_of(id, &d.record).as_millis() as u64;
                (id.clone(), d.record.generation, d.record.last_seen_ms.unwrap_or(0) + after)
            })
            .collect()
    }

    fn offline_after_of(&self, id: &str, record: &DeviceRecord) -> Duration {
        let interval = record.hello.as_ref().map_or(5000, |h| h.interval_ms);
        self.config.offline_after(id, Duration::from_millis(u64::from(interval)))
    }

    /// Queues an alert raised outside the fleet (bells) for the next
    /// write-back.
    pub fn raise(&self, alert: Raised) {
        self.lock().alerts.push(alert);
    }

    /// Checks a device token; returns the device id.
    pub fn authenticate(&self, token: &str) -> Result<String, AuthError> {
        let (key_id, secret) = auth::parse(token).ok_or(AuthError::Malformed)?;
        let state = self.lock();
        let device = state.keys.get(key_id).ok_or(AuthError::Invalid)?;
        let d = state.devices.get(device).ok_or(AuthError::Invalid)?;
        if auth::verify_secret(secret, &d.enrolment.secret_sha256) {
            Ok(device.clone())
        } else {
            Err(AuthError::Invalid)
        }
    }

    /// Enrolls `ids` (or re-enrolls them with a new token when `rotate`).
    /// Durable before it returns. Returns each id with its token, or `None`
    /// if the device exists and `rotate` is false.
    pub async fn enroll(&self, ids: &[String], rotate: bool) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let mut new = vec![];
        let mut out = vec![];
        {
            let state = self.lock();
            for id in ids {
                if state.devices.contains_key(id) && !rotate {
                    out.push((id.clone(), None));
                    continue;
                }
                let t = auth::generate();
                new.push(Enrolment {
                    device: id.clone(),
                    key_id: t.key_id,
                    secret_sha256: t.secret_sha256,
                    created_ms: now_ms(),
                    tags: vec![],
                    provisioned_by: None,
                });
                out.push((id.clone(), Some(t.token)));
            }
        }
        self.store.put_enrolments(&new).await?;
        let mut state = self.lock();
        for e in new {
            apply_enrolment(&mut state, e);
        }
        Ok(out)
    }

    /// Enrols `id` with `tags` for provisioning key `key_id`, only if no
    /// device has that id anywhere (compare-and-set in the store). Durable.
    /// The token, or `None` when the id is taken.
    pub async fn enroll_new(&self, id: &str, tags: Vec<String>, key_id: &str) -> anyhow::Result<Option<String>> {
        if self.exists(id) {
            return Ok(None);
        }
        let t = auth::generate();
        let e = Enrolment {
            device: id.to_string(),
            key_id: t.key_id,
            secret_sha256: t.secret_sha256,
            created_ms: now_ms(),
            tags,
            provisioned_by: Some(key_id.to_string()),
        };
        if !self.store.create_enrolment(&e).await? {
            return Ok(None);
        }
        let mut state = self.lock();
        apply_enrolment(&mut state, e);
        state.events.push(EventRecord {
            device: id.to_string(),
            kind: crate::store::EventKind::Provisioned,
            reason: Reason::Provisioned,
            at_ms: now_ms(),
            generation: 0,
            check: None,
        });
        state.alerts.push(Raised::new(
            crate::store::AlertKind::Provisioned,
            id,
            format!("{id} enrolled itself with provisioning key {key_id}"),
            serde_json::json!({ "key": key_id }),
        ));
        Ok(Some(t.token))
    }

    /// Removes a device and closes its connection. Durable. Whether it existed.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        let existed = self.store.delete_device(id).await?;
        let removed = apply_removal(&mut self.lock(), id);
        Ok(existed || removed)
    }

    /// The generation a new connection of `id` must exceed (the newest
    /// this node knows of), for [`Store::claim`].
    pub fn generation_floor(&self, id: &str) -> u64 {
        self.lock().devices.get(id).map_or(0, |d| d.record.generation)
    }

    /// Registers connection `generation` (claimed from the store) after a
    /// valid Hello. The previous connection of the device on this node, if
    /// any, is told to close.
    pub fn connect(&self, id: &str, hello: Hello, tx: OutboundTx, generation: u64) -> Result<Accepted, Refused> {
        let now = now_ms();
        let offline_after = self.config.offline_after(id, Duration::from_millis(u64::from(hello.interval_ms)));
        let mut guard = self.lock();
        let state = &mut *guard;
        let d = state.devices.get_mut(id).ok_or(Refused::Revoked)?;
        // Equal is this very claim, echoed back by the store's watch before
        // the Hello got here (each generation is claimed exactly once).
        if generation < d.record.generation || d.conn.as_ref().is_some_and(|c| c.generation >= generation) {
            return Err(Refused::Superseded);
        }
        if let Some(old) = d.conn.take() {
            let _ = old.tx.try_send(Outbound::Close(
                close::REPLACED,
                "replaced by a newer connection".into(),
                Reason::Replaced,
            ));
        }
        // A new Hello may bring other tags.
        state.tally.leave(d);
        d.conn = Some(Conn { generation, tx });
        d.owner = Some(self.node.clone());
        d.minute = None;
        let fx = liveness::connected(id, &mut d.record, hello, generation, now);
        state.tally.enter(d);
        info!(device = id, generation, "online");
        state.absorb(fx);
        state.mark_dirty(id);
        self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok(Accepted { generation, offline_after })
    }

    /// Records a pulse from connection `generation`. Returns false if that
    /// connection is no longer the device's current one.
    pub fn pulse(&self, id: &str, generation: u64, pulse: Pulse, digest: Option<CheckDigest>) -> Pulsed {
        let now = now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(d) = state.devices.get_mut(id).filter(|d| d.holds(generation)) else { return Pulsed::Stale };
        let checks_differ = digest.is_some_and(|digest| CheckDigest::of(&d.record.checks) != digest);
        // An agent of protocol version 1 has no checks: forget those of a
        // newer agent the device ran before.
        let forgot_checks = digest.is_none() && !d.record.checks.is_empty();
        if forgot_checks {
            d.record.checks.clear();
            state.failing.remove(id);
        }
        let was = d.state();
        // A device's first health is news worth writing at once.
        let first_health = d.record.health.is_none();
        let fx = liveness::pulsed(id, &mut d.record, generation, &pulse, now);
        d.unwritten = d.unwritten.saturating_add(1);
        state.tally.moved(was, d.state());
        let minute = (now / 60_000) as u32;
        let finished = match &mut d.minute {
            Some(acc) => acc.add(minute, &pulse.health),
            None => {
                d.minute = Some(Accumulator::new(minute, &pulse.health));
                None
            }
        };
        if let Some(b) = finished {
            state.history.push((id.to_string(), b));
        }
        let urgent = !fx.events.is_empty() || forgot_checks || first_health;
        state.absorb(fx);
        if urgent {
            state.mark_dirty(id);
        } else {
            state.mark_routine(id);
        }
        self.stats.pulses_accepted.fetch_add(1, Ordering::Relaxed);
        if checks_differ {
            Pulsed::ChecksDiffer
        } else {
            Pulsed::Accepted
        }
    }

    /// Takes in the action descriptions of connection `generation`
    /// (protocol version 2).
    pub fn action_info(&self, id: &str, generation: u64, actions: Vec<pulsebell_proto::ActionInfo>) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(d) = state.devices.get_mut(id).filter(|d| d.holds(generation)) else { return };
        d.record.action_info = actions;
        state.mark_dirty(id);
    }

    /// Takes in a check report of connection `generation` (protocol
    /// version 2); ignored from a connection that is no longer current.
    pub fn checks(&self, id: &str, generation: u64, report: CheckReport) {
        let now = now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(d) = state.devices.get_mut(id).filter(|d| d.holds(generation)) else { return };
        let fx = liveness::checks_reported(id, &mut d.record, report, generation, now);
        state.note_checks(id);
        state.absorb(fx);
        // Other nodes should see a check change soon, like a liveness one.
        state.mark_dirty(id);
    }

    /// Records a WebSocket ping round trip.
    pub fn rtt(&self, id: &str, generation: u64, rtt: Duration) {
        let mut state = self.lock();
        if let Some(d) = state.devices.get_mut(id) {
            if d.record.generation == generation {
                d.record.link.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            }
        }
    }

    /// Marks the device offline because connection `generation` went
    /// silent (or ended, or the device is gone, for `reason`). Returns
    /// whether the connection was the device's current one (then the
    /// caller releases it in the store).
    pub fn offline(&self, id: &str, generation: u64, reason: Reason) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(d) = state.devices.get_mut(id) else { return false };
        // Ordered by generation: an older connection cannot mark a newer
        // one offline.
        if d.record.generation != generation {
            return false;
        }
        let was = d.state();
        if reason != Reason::Silent && d.holds(generation) {
            d.conn = None;
            d.owner = None;
        }
        let fx = liveness::ended(id, &mut d.record, generation, reason, now_ms());
        state.tally.moved(was, d.state());
        if !fx.events.is_empty() {
            info!(device = id, generation, %reason, "offline");
        }
        state.absorb(fx);
        state.mark_dirty(id);
        true
    }

    /// Applies a change made by another node of the cluster.
    pub fn apply(&self, change: &Change) {
        let mut guard = self.lock();
        let state = &mut *guard;
        match change {
            Change::Enrolled(e) => {
                let same = state.devices.get(&e.device).is_some_and(|d| d.enrolment == *e);
                if !same {
                    apply_enrolment(state, e.clone());
                }
            }
            Change::Removed(id) => {
                apply_removal(state, id);
            }
            Change::Device(id, record) => {
                let Some(d) = state.devices.get_mut(id) else { return };
                // The node holding the connection writes the record; this
                // node's copy wins while it holds it.
                if d.conn.is_none() && record.generation >= d.record.generation {
                    fn tags(r: &DeviceRecord) -> &[String] {
                        r.hello.as_ref().map(|h| h.tags.as_slice()).unwrap_or_default()
                    }
                    let retag = tags(&d.record) != tags(record);
                    let was = d.state();
                    if retag {
                        state.tally.leave(d);
                    }
                    d.record = record.clone();
                    if retag {
                        state.tally.enter(d);
                    } else {
                        state.tally.moved(was, d.state());
                    }
                    state.note_checks(id);
                }
            }
            Change::Owner(id, owner) => {
                if let Some(d) = state.devices.get_mut(id) {
                    let was = d.state();
                    apply_owner(d, id, owner, &self.node);
                    state.tally.moved(was, d.state());
                }
            }
            Change::Bell(_) | Change::Node(_) | Change::Resynced(_) => {}
        }
    }

    /// Marks `id`'s connection `generation` ended on another node for
    /// `reason` (a lost collector), recording the event here: the caller
    /// won the compare-and-set that ended it, so no other node records it.
    pub fn ended_elsewhere(&self, id: &str, generation: u64, reason: Reason) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(d) = state.devices.get_mut(id) else { return };
        if d.conn.is_some() || d.record.generation > generation || d.ended_elsewhere >= generation {
            return;
        }
        let was = d.state();
        d.ended_elsewhere = generation;
        d.record.generation = generation;
        d.owner = None;
        // It was online in this generation (the lost node may not have
        // written that back): the rule records exactly one offline event.
        d.record.online = true;
        let fx = liveness::ended(id, &mut d.record, generation, reason, now_ms());
        state.tally.moved(was, d.state());
        info!(device = id, generation, %reason, "offline");
        state.absorb(fx);
        state.mark_dirty(id);
    }

    /// The connection sender of a device connected to this node.
    pub fn sender(&self, id: &str) -> Option<OutboundTx> {
        self.lock().devices.get(id).and_then(|d| d.conn.as_ref()).map(|c| c.tx.clone())
    }

    /// Whether the device is enrolled.
    pub fn exists(&self, id: &str) -> bool {
        self.lock().devices.contains_key(id)
    }

    /// Ids of devices tagged `tag` (by their last Hello or their enrolment).
    pub fn with_tag(&self, tag: &str) -> Vec<String> {
        let state = self.lock();
        let mut ids: Vec<String> =
            state.devices.iter().filter(|(_, d)| d.has_tag(tag)).map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    /// Devices for which `rule`'s condition holds now and which this node
    /// looks after: a check rule, the devices connected here; an offline
    /// rule, every offline device when `offline_duty` (one node of a
    /// cluster has it). With each, whether it announced the rule's action.
    pub fn rule_holds(&self, rule: &RuleConfig, offline_duty: bool) -> Vec<(String, bool)> {
        let status = rule.when.status.as_deref().and_then(CheckStatus::parse).unwrap_or(CheckStatus::Critical);
        let state = self.lock();
        debug_assert!(
            state.devices.iter().all(|(id, d)| failing_checks(&d.record) == state.failing.contains(id)),
            "the failing-checks index drifted from the fleet"
        );
        let holds = |d: &Device| match (&rule.when.check, &rule.when.state) {
            (Some(check), _) => {
                d.conn.is_some() && d.record.checks.iter().any(|c| &c.name == check && c.status == status)
            }
            (None, Some(_)) => offline_duty && d.state() == "offline",
            (None, None) => false,
        };
        let matching = |(id, d): (&String, &Device)| {
            let tagged = rule.tags.is_empty() || rule.tags.iter().any(|t| d.has_tag(t));
            (tagged && holds(d)).then(|| {
                let offers = d.record.hello.as_ref().is_some_and(|h| h.actions.contains(&rule.ring.action));
                (id.clone(), offers)
            })
        };
        // A rule on a failing status needs only the devices with a failing
        // check (at 19k devices, ~5 ms for the whole walk under the lock).
        if rule.when.check.is_some() && status != CheckStatus::Ok {
            state
                .failing
                .iter()
                .filter_map(|id| state.devices.get_key_value(id))
                .filter_map(|(id, d)| matching((id, d)))
                .collect()
        } else {
            state.devices.iter().filter_map(|(id, d)| matching((id, d))).collect()
        }
    }

    /// Number of enrolled devices.
    pub fn len(&self) -> usize {
        self.lock().devices.len()
    }

    /// Whether no device is enrolled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enrolled devices and how many of them are online, without building
    /// a view of each (the stats endpoint is polled at fleet scale).
    pub fn counts(&self) -> (usize, usize) {
        let counts = self.lock().tally.counts();
        (counts.devices, counts.online)
    }

    /// Connections this node holds.
    pub fn local_connections(&self) -> u64 {
        self.lock().devices.values().filter(|d| d.conn.is_some()).count() as u64
    }

    /// Devices that `node` holds, with their generation.
    pub fn held_by(&self, node: &str) -> Vec<(String, u64)> {
        let state = self.lock();
        state
            .devices
            .iter()
            .filter(|(_, d)| d.owner.as_deref() == Some(node))
            .map(|(id, d)| (id.clone(), d.record.generation))
            .collect()
    }

    /// Views of every device, sorted by id.
    pub fn views(&self) -> Vec<DeviceView> {
        let now = now_ms();
        let state = self.lock();
        let mut views: Vec<DeviceView> = state.devices.iter().map(|(id, d)| self.view_of(id, d, now)).collect();
        drop(state);
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// One page of the fleet table (the dashboard), with the fleet-wide
    /// counts and tags.
    pub fn page(&self, query: &page::PageQuery) -> page::Page {
        let now = now_ms();
        let mut guard = self.lock();
        let State { devices, sorted, tally, .. } = &mut *guard;
        // Every test that builds a page checks the tally against a count.
        debug_assert_eq!(*tally, page::Tally::of(devices), "the tally drifted from the fleet");
        let ids = sorted.get_or_insert_with(|| {
            let mut ids: Vec<String> = devices.keys().cloned().collect();
            ids.sort_unstable();
            ids
        });
        page::build(devices, ids, query, now, tally.summary())
    }

    /// Checks of every device (or of `device`; `None` when it is not
    /// enrolled), those in `status` only if given, by device then name.
    pub fn check_rows(&self, device: Option<&str>, status: Option<CheckStatus>) -> Option<Vec<CheckRow>> {
        let state = self.lock();
        let mut rows = vec![];
        let mut add = |id: &str, d: &Device| {
            for c in d.record.checks.iter().filter(|c| status.is_none_or(|s| c.status == s)) {
                rows.push(CheckRow { device: id.to_string(), check: c.into() });
            }
        };
        match device {
            Some(id) => add(id, state.devices.get(id)?),
            None => state.devices.iter().filter(|(_, d)| !d.record.checks.is_empty()).for_each(|(id, d)| add(id, d)),
        }
        drop(state);
        rows.sort_by(|a, b| (&a.device, &a.check.name).cmp(&(&b.device, &b.check.name)));
        Some(rows)
    }

    /// View of one device.
    pub fn view(&self, id: &str) -> Option<DeviceView> {
        let state = self.lock();
        state.devices.get(id).map(|d| self.view_of(id, d, now_ms()))
    }

    fn view_of(&self, id: &str, d: &Device, now: u64) -> DeviceView {
        let offline_after = self.offline_after_of(id, &d.record).as_millis() as u64;
        view::build(id, &d.enrolment, &d.record, d.owner.as_deref(), offline_after, now)
    }

    /// History of `id` from `since_ms` on: stored minutes plus the open one.
    pub async fn history(&self, id: &str, since_ms: u64) -> anyhow::Result<Option<Vec<Bucket>>> {
        let open = {
            let state = self.lock();
            let Some(d) = state.devices.get(id) else { return Ok(None) };
            d.minute.as_ref().map(Accumulator::bucket)
        };
        let since = (since_ms / 60_000) as u32;
        let mut buckets = self.store.history(id, since).await?;
        if let Some(b) = open {
            if b.minute >= since && buckets.last().is_none_or(|last| last.minute < b.minute) {
                buckets.push(b);
            }
        }
        Ok(Some(buckets))
    }

    /// Ids of every enrolled device.
    pub fn ids(&self) -> Vec<String> {
        self.lock().devices.keys().cloned().collect()
    }

    /// Closes every connection of this node with `code` and marks their
    /// devices offline for `reason` (graceful shutdown, or cut off from
    /// the cluster). Returns the connections closed, to release.
    pub fn close_all(&self, code: u16, text: &str, reason: Reason) -> Vec<(String, u64)> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = now_ms();
        let mut fx = Effects::default();
        let mut closed = vec![];
        let mut minutes = vec![];
        for (id, d) in state.devices.iter_mut() {
            // The open history minute is kept too (partial): a planned stop
            // loses nothing.
            if let Some(acc) = d.minute.take() {
                minutes.push((id.clone(), acc.bucket()));
            }
            let Some(conn) = d.conn.take() else { continue };
            let _ = conn.tx.try_send(Outbound::Close(code, text.into(), reason));
            let was = d.state();
            d.owner = None;
            let e = liveness::ended(id, &mut d.record, conn.generation, reason, now);
            state.tally.moved(was, d.state());
            fx.events.extend(e.events);
            fx.alerts.extend(e.alerts);
            closed.push((id.clone(), conn.generation));
        }
        state.absorb(fx);
        state.history.extend(minutes);
        for (id, _) in &closed {
            state.mark_dirty(id);
        }
        closed
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The config.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }
}

fn apply_enrolment(state: &mut State, e: Enrolment) {
    let id = e.device.clone();
    state.keys.insert(e.key_id.clone(), id.clone());
    match state.devices.get_mut(&id) {
        Some(d) => {
            // Rotation: the old token stops working, its connection too.
            // The new enrolment may carry other tags.
            state.tally.leave(d);
            let old_key = std::mem::replace(&mut d.enrolment, e).key_id;
            state.tally.enter(d);
            if let Some(conn) = &d.conn {
                let _ = conn.tx.try_send(Outbound::Close(close::REVOKED, "token rotated".into(), Reason::Revoked));
            }
            if old_key != d.enrolment.key_id {
                state.keys.remove(&old_key);
            }
        }
        None => {
            let d = Device::new(e, DeviceRecord::default());
            state.tally.enter(&d);
            state.devices.insert(id, d);
            state.sorted = None;
        }
    }
}

fn failing_checks(r: &DeviceRecord) -> bool {
    r.checks.iter().any(|c| c.status != CheckStatus::Ok)
}

fn apply_removal(state: &mut State, id: &str) -> bool {
    let Some(mut d) = state.devices.remove(id) else { return false };
    state.tally.leave(&d);
    state.failing.remove(id);
    state.sorted = None;
    state.keys.remove(&d.enrolment.key_id);
    if let Some(conn) = &d.conn {
        let _ = conn.tx.try_send(Outbound::Close(close::REVOKED, "device revoked".into(), Reason::Revoked));
    }
    let generation = d.record.generation;
    let fx = liveness::ended(id, &mut d.record, generation, Reason::Revoked, now_ms());
    state.absorb(fx);
    true
}

fn apply_owner(d: &mut Device, id: &str, owner: &Owner, me: &str) {
    if let Some(conn) = &d.conn {
        if owner.generation == conn.generation && owner.node.as_deref() != Some(me) {
            // Another node ended this very connection (it took this node
            // for lost): let the device reconnect for a fresh generation.
            warn!(device = id, generation = conn.generation, "connection ended by another node; closing it");
            let _ = conn.tx.try_send(Outbound::Close(
                close::TRY_AGAIN_LATER,
                "connection taken over by the cluster; reconnect".into(),
                owner.reason.unwrap_or(Reason::CollectorLost),
            ));
            d.conn = None;
        } else if owner.generation > conn.generation {
            // A newer connection elsewhere: this one is replaced.
            info!(device = id, generation = conn.generation, newer = owner.generation, "replaced on another node");
            let _ = conn.tx.try_send(Outbound::Close(
                close::REPLACED,
                "replaced by a newer connection".into(),
                Reason::Replaced,
            ));
            d.conn = None;
        } else {
            return; // this node holds the newest connection
        }
    }
    if owner.generation >= d.record.generation {
        d.record.generation = owner.generation;
        d.owner = owner.node.clone().filter(|n| n != me || d.conn.is_some());
        // Without an owner the device shows offline at once, with the
        // reason; the node that ended the connection writes the record.
        if owner.node.is_none() && d.record.online {
            d.record.online = false;
            d.record.last_offline_reason = owner.reason;
        }
    }
}

#[cfg(test)]
mod tests;
