//! The fleet: every enrolled device, its connection and its last state, in
//! memory, written back to the store in batches.
//!
//! One `std::sync::Mutex` guards the map. Critical sections are short
//! (no I/O, no await), which is why a std mutex and not a tokio one.
//!
//! Liveness: a device is online from its Hello until its connection ends
//! or it stays silent (no pulse) past its `offline_after`. Each change is an
//! [`EventRecord`] tagged with the connection generation; a change from an
//! older generation than the device's current one is ignored, so a late
//! "disconnected" from a replaced connection never marks a reconnected
//! device offline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pulsebell_proto::view::HealthView;
use pulsebell_proto::{close, Hello, Pulse, ServerMsg};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::alerts::{AlertKind, Alerts, OutboxEntry};
use crate::config::Config;
use crate::gateway::auth;
use crate::history::{Accumulator, Bucket};
use crate::store::{DeviceRecord, Enrolment, EventKind, EventRecord, Store};

/// Unix time now, ms.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a Unix ms time.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// How long connection times are kept for `reconnects_24h`.
const DAY_MS: u64 = 24 * 3600 * 1000;
/// Most connection times remembered per device.
const MAX_CONNECTS: usize = 128;

/// Something for one device's connection task to do.
#[derive(Debug)]
pub enum Outbound {
    /// Send this message.
    Msg(ServerMsg),
    /// Close with this code and reason.
    Close(u16, String),
}

/// The live connection of a device.
#[derive(Debug)]
struct Conn {
    generation: u64,
    tx: mpsc::Sender<Outbound>,
}

#[derive(Debug)]
struct Device {
    enrolment: Enrolment,
    record: DeviceRecord,
    conn: Option<Conn>,
    dirty: bool,
    /// The open history minute.
    minute: Option<Accumulator>,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, Device>,
    /// Token key id → device id.
    keys: HashMap<String, String>,
    /// Devices with unsaved state.
    dirty: Vec<String>,
    /// Events not yet saved.
    events: Vec<EventRecord>,
    /// Finished history minutes not yet saved.
    history: Vec<(String, Bucket)>,
    /// Alerts not yet in the outbox.
    alerts: Vec<OutboxEntry>,
}

impl State {
    fn mark_dirty(&mut self, id: &str) {
        if let Some(d) = self.devices.get_mut(id) {
            if !d.dirty {
                d.dirty = true;
                self.dirty.push(id.to_string());
            }
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
    /// Failed handshakes by reason.
    pub handshake_failures: Mutex<HashMap<&'static str, u64>>,
    /// Latency of durable store writes (device batches, bells), seconds.
    pub store_write_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            pulses_accepted: AtomicU64::new(0),
            pulses_stored: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            handshake_failures: Mutex::new(HashMap::new()),
            store_write_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
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

/// The JSON view of a device (`status --json`, `show --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// `online`, `offline` or `never_seen`.
    pub state: String,
    /// Last pulse, RFC 3339.
    pub last_seen: Option<String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// CPU architecture.
    pub arch: Option<String>,
    /// OS.
    pub os: Option<String>,
    /// Kernel.
    pub kernel: Option<String>,
    /// Board model.
    pub board_model: Option<String>,
    /// Boot id.
    pub boot_id: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Actions the agent allows.
    pub actions: Vec<String>,
    /// Pulse interval, ms.
    pub interval_ms: Option<u32>,
    /// Offline threshold, ms.
    pub offline_after_ms: u64,
    /// Whether a connection is open.
    pub connected: bool,
    /// Connection generation.
    pub generation: u64,
    /// When enrolled, RFC 3339.
    pub enrolled_at: String,
    /// Last health, in human units.
    pub health: Option<HealthView>,
    /// Link quality.
    pub link: LinkView,
}

/// Link quality in the device view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkView {
    /// Gaps in sequence numbers.
    pub missed_pulses: u64,
    /// Pulses that came more than 1.5 intervals after the previous one.
    pub late_pulses: u64,
    /// Reconnections in the last 24 h.
    pub reconnects_24h: u64,
    /// Last ping round trip, ms.
    pub rtt_ms: Option<f64>,
    /// Whether the link looks unreliable.
    pub flaky: bool,
}

/// The fleet.
pub struct Fleet {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    alerts: Option<Arc<Alerts>>,
    state: Mutex<State>,
    /// Counters.
    pub stats: Stats,
}

impl Fleet {
    /// Loads enrolments and last states from the store.
    pub fn load(config: Arc<Config>, store: Arc<dyn Store>) -> anyhow::Result<Arc<Fleet>> {
        let mut state = State::default();
        let mut records: HashMap<String, DeviceRecord> = store.device_states()?.into_iter().collect();
        for e in store.enrolments()? {
            let record = records.remove(&e.device).unwrap_or_default();
            state.keys.insert(e.key_id.clone(), e.device.clone());
            state
                .devices
                .insert(e.device.clone(), Device { enrolment: e, record, conn: None, dirty: false, minute: None });
        }
        let alerts = Alerts::new(config.alerts.clone(), store.clone());
        let fleet = Arc::new(Fleet { config, store, alerts, state: Mutex::new(state), stats: Stats::default() });
        Ok(fleet)
    }

    /// Devices the store says were online when the collector stopped, with
    /// the time they must be declared offline if they have not come back
    /// (last seen + offline_after).
    pub fn stale_online(&self) -> Vec<(String, u64, u64)> {
        let state = self.state.lock().expect("fleet lock");
        state
            .devices
            .iter()
            .filter(|(_, d)| d.record.online && d.conn.is_none())
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

    /// The alert sender, if any sink is configured.
    pub fn alerts(&self) -> Option<&Arc<Alerts>> {
        self.alerts.as_ref()
    }

    /// Queues an alert for the outbox (written with the next write-back).
    fn raise(&self, state: &mut State, kind: AlertKind, device: &str, summary: String, details: serde_json::Value) {
        let Some(alerts) = &self.alerts else { return };
        if !alerts.wants(kind) {
            return;
        }
        match alerts.entry(kind, device, summary, details) {
            Ok(e) => state.alerts.push(e),
            Err(e) => warn!(error = %e, "cannot raise an alert"),
        }
    }

    /// Raises an alert from outside the fleet (bells).
    pub fn raise_alert(&self, kind: AlertKind, device: &str, summary: String, details: serde_json::Value) {
        let mut state = self.state.lock().expect("fleet lock");
        self.raise(&mut state, kind, device, summary, details);
    }

    /// Checks a device token; returns the device id.
    pub fn authenticate(&self, token: &str) -> Result<String, AuthError> {
        let (key_id, secret) = auth::parse(token).ok_or(AuthError::Malformed)?;
        let state = self.state.lock().expect("fleet lock");
        let device = state.keys.get(key_id).ok_or(AuthError::Invalid)?;
        let d = state.devices.get(device).ok_or(AuthError::Invalid)?;
        if auth::verify_secret(secret, &d.enrolment.secret_sha256) {
            Ok(device.clone())
        } else {
            Err(AuthError::Invalid)
        }
    }

    /// Enrolls `id` (or re-enrolls it with a new token when `rotate`).
    /// Durable before it returns. Returns the token, or `None` if the
    /// device exists and `rotate` is false.
    pub fn enroll(&self, ids: &[String], rotate: bool) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let mut new = vec![];
        let mut out = vec![];
        {
            let state = self.state.lock().expect("fleet lock");
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
                });
                out.push((id.clone(), Some(t.token)));
            }
        }
        self.store.put_enrolments(&new)?;
        let mut state = self.state.lock().expect("fleet lock");
        for e in new {
            let id = e.device.clone();
            state.keys.insert(e.key_id.clone(), id.clone());
            match state.devices.get_mut(&id) {
                Some(d) => {
                    // Rotation: the old token stops working, its connection too.
                    let old_key = std::mem::replace(&mut d.enrolment, e).key_id;
                    if let Some(conn) = &d.conn {
                        let _ = conn.tx.try_send(Outbound::Close(close::REVOKED, "token rotated".into()));
                    }
                    state.keys.remove(&old_key);
                }
                None => {
                    state.devices.insert(
                        id,
                        Device {
                            enrolment: e,
                            record: DeviceRecord::default(),
                            conn: None,
                            dirty: false,
                            minute: None,
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Removes a device and closes its connection. Durable. Whether it existed.
    pub fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        let removed = {
            let mut state = self.state.lock().expect("fleet lock");
            let removed = state.devices.remove(id);
            if let Some(d) = &removed {
                state.keys.remove(&d.enrolment.key_id);
                if d.record.online {
                    state.events.push(EventRecord {
                        device: id.to_string(),
                        kind: EventKind::Offline,
                        reason: "revoked".into(),
                        at_ms: now_ms(),
                        generation: d.record.generation,
                    });
                }
            }
            removed
        };
        if let Some(conn) = removed.as_ref().and_then(|d| d.conn.as_ref()) {
            let _ = conn.tx.try_send(Outbound::Close(close::REVOKED, "device revoked".into()));
        }
        let existed = self.store.delete_device(id)?;
        Ok(existed || removed.is_some())
    }

    /// Registers a new connection after a valid Hello. The previous
    /// connection of the device, if any, is told to close.
    pub fn connect(&self, id: &str, hello: Hello, tx: mpsc::Sender<Outbound>) -> Option<Accepted> {
        let now = now_ms();
        let mut state = self.state.lock().expect("fleet lock");
        let offline_after = self.config.offline_after(id, Duration::from_millis(u64::from(hello.interval_ms)));
        let d = state.devices.get_mut(id)?;
        if let Some(old) = d.conn.take() {
            let _ = old.tx.try_send(Outbound::Close(close::REPLACED, "replaced by a newer connection".into()));
        }
        d.record.generation += 1;
        let generation = d.record.generation;
        d.conn = Some(Conn { generation, tx });
        // A new agent process starts its sequence at 1.
        if hello.boot_id != d.record.hello.as_ref().map(|h| h.boot_id.clone()).unwrap_or_default() {
            d.record.last_seq = 0;
        }
        d.record.hello = Some(hello);
        d.record.last_seen_ms = Some(now);
        let link = &mut d.record.link;
        link.connects_ms.retain(|t| now.saturating_sub(*t) < DAY_MS);
        link.connects_ms.push(now);
        if link.connects_ms.len() > MAX_CONNECTS {
            link.connects_ms.remove(0);
        }
        // "Online again" is worth an alert only after an offline that was
        // one (not a collector restart or the first connection).
        let seen_before = d.record.generation > 1
            && d.record.last_offline_reason.as_deref().is_some_and(|r| r == "silent" || r == "disconnected");
        let was_online = std::mem::replace(&mut d.record.online, true);
        if !was_online {
            info!(device = id, generation, "online");
        }
        // Every accepted connection is an `online` event of its generation,
        // so the event log explains each reconnect.
        state.events.push(EventRecord {
            device: id.to_string(),
            kind: EventKind::Online,
            reason: "connected".into(),
            at_ms: now,
            generation,
        });
        if !was_online && seen_before {
            let details = serde_json::json!({ "reason": "connected", "generation": generation });
            self.raise(&mut state, AlertKind::DeviceOnline, id, format!("{id} is online again"), details);
        }
        state.mark_dirty(id);
        self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        Some(Accepted { generation, offline_after })
    }

    /// Records a pulse from connection `generation`. Returns false if that
    /// connection is no longer the device's current one.
    pub fn pulse(&self, id: &str, generation: u64, pulse: Pulse) -> bool {
        let now = now_ms();
        let mut state = self.state.lock().expect("fleet lock");
        let Some(d) = state.devices.get_mut(id) else { return false };
        if d.conn.as_ref().map(|c| c.generation) != Some(generation) {
            return false;
        }
        let interval = d.record.hello.as_ref().map_or(5000, |h| u64::from(h.interval_ms));
        let link = &mut d.record.link;
        let last = d.record.last_seq;
        if last != 0 && pulse.seq > last {
            link.missed_pulses += u64::from(pulse.seq - last - 1);
        }
        if last != 0 {
            if let Some(prev) = d.record.last_seen_ms {
                if now.saturating_sub(prev) * 2 > interval * 3 {
                    link.late_pulses += 1;
                }
            }
        }
        link.pulses += 1;
        let minute = (now / 60_000) as u32;
        let finished = match &mut d.minute {
            Some(acc) => acc.add(minute, &pulse.health),
            None => {
                d.minute = Some(Accumulator::new(minute, &pulse.health));
                None
            }
        };
        d.record.last_seq = pulse.seq;
        let before = d.record.health.as_ref().and_then(|h| h.throttled).map_or(0, |t| t.0 & 0xf);
        let after = pulse.health.throttled.map_or(0, |t| t.0 & 0xf);
        let appeared = after & !before;
        d.record.health = Some(pulse.health);
        d.record.last_seen_ms = Some(now);
        let back = !d.record.online;
        if back {
            d.record.online = true;
            info!(device = id, generation, "online again: pulsing");
            state.events.push(EventRecord {
                device: id.to_string(),
                kind: EventKind::Online,
                reason: "pulse".into(),
                at_ms: now,
                generation,
            });
            let details = serde_json::json!({ "reason": "pulse", "generation": generation });
            self.raise(&mut state, AlertKind::DeviceOnline, id, format!("{id} is online again"), details);
        }
        if appeared & pulsebell_proto::Throttled::UNDER_VOLTAGE != 0 {
            let details = serde_json::json!({ "flags": after });
            self.raise(&mut state, AlertKind::UnderVoltage, id, format!("{id}: under-voltage detected"), details);
        }
        if appeared & !pulsebell_proto::Throttled::UNDER_VOLTAGE != 0 {
            let t = pulsebell_proto::view::ThrottledView::from(pulsebell_proto::Throttled(after));
            let what = t.warnings().join(", ");
            let details = serde_json::json!({ "flags": after, "throttled": t });
            self.raise(&mut state, AlertKind::Throttled, id, format!("{id}: {what}"), details);
        }
        if let Some(b) = finished {
            state.history.push((id.to_string(), b));
        }
        state.mark_dirty(id);
        self.stats.pulses_accepted.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Records a WebSocket ping round trip.
    pub fn rtt(&self, id: &str, generation: u64, rtt: Duration) {
        let mut state = self.state.lock().expect("fleet lock");
        if let Some(d) = state.devices.get_mut(id) {
            if d.record.generation == generation {
                d.record.link.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            }
        }
    }

    /// Marks the device offline because connection `generation` went
    /// silent (or ended, or the device is gone for `reason`).
    pub fn offline(&self, id: &str, generation: u64, reason: &str) {
        let mut state = self.state.lock().expect("fleet lock");
        let Some(d) = state.devices.get_mut(id) else { return };
        // Ordered by generation: an older connection cannot mark a newer
        // one offline.
        if d.record.generation != generation {
            return;
        }
        if reason != "silent" && d.conn.as_ref().is_some_and(|c| c.generation == generation) {
            d.conn = None;
        }
        if std::mem::replace(&mut d.record.online, false) {
            d.record.last_offline_reason = Some(reason.to_string());
            info!(device = id, generation, reason, "offline");
            state.events.push(EventRecord {
                device: id.to_string(),
                kind: EventKind::Offline,
                reason: reason.to_string(),
                at_ms: now_ms(),
                generation,
            });
            if reason == "silent" || reason == "disconnected" {
                let details = serde_json::json!({ "reason": reason, "generation": generation });
                self.raise(&mut state, AlertKind::DeviceOffline, id, format!("{id} is offline ({reason})"), details);
            }
        }
        state.mark_dirty(id);
    }

    /// The connection sender of an online device.
    pub fn sender(&self, id: &str) -> Option<mpsc::Sender<Outbound>> {
        let state = self.state.lock().expect("fleet lock");
        state.devices.get(id).and_then(|d| d.conn.as_ref()).map(|c| c.tx.clone())
    }

    /// Whether the device is enrolled.
    pub fn exists(&self, id: &str) -> bool {
        self.state.lock().expect("fleet lock").devices.contains_key(id)
    }

    /// Ids of devices whose last Hello carried `tag`.
    pub fn with_tag(&self, tag: &str) -> Vec<String> {
        let state = self.state.lock().expect("fleet lock");
        let mut ids: Vec<String> = state
            .devices
            .iter()
            .filter(|(_, d)| d.record.hello.as_ref().is_some_and(|h| h.tags.iter().any(|t| t == tag)))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Number of enrolled devices.
    pub fn len(&self) -> usize {
        self.state.lock().expect("fleet lock").devices.len()
    }

    /// Whether no device is enrolled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enrolled devices and how many of them are online, without building
    /// a view of each (the stats endpoint is polled at fleet scale).
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock().expect("fleet lock");
        let online = state.devices.values().filter(|d| d.record.online && d.conn.is_some()).count();
        (state.devices.len(), online)
    }

    /// Views of every device, sorted by id.
    pub fn views(&self) -> Vec<DeviceView> {
        let now = now_ms();
        let state = self.state.lock().expect("fleet lock");
        let mut views: Vec<DeviceView> = state.devices.iter().map(|(id, d)| self.view_of(id, d, now)).collect();
        drop(state);
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// View of one device.
    pub fn view(&self, id: &str) -> Option<DeviceView> {
        let state = self.state.lock().expect("fleet lock");
        state.devices.get(id).map(|d| self.view_of(id, d, now_ms()))
    }

    fn view_of(&self, id: &str, d: &Device, now: u64) -> DeviceView {
        let r = &d.record;
        let h = r.hello.as_ref();
        let state = if r.last_seen_ms.is_none() {
            "never_seen"
        } else if r.online && d.conn.is_some() {
            "online"
        } else {
            "offline"
        };
        let in_window = r.link.connects_ms.iter().filter(|t| now.saturating_sub(**t) < DAY_MS).count() as u64;
        let older_known = r.link.connects_ms.iter().any(|t| now.saturating_sub(*t) >= DAY_MS);
        let reconnects_24h = if older_known { in_window } else { in_window.saturating_sub(1) };
        let total = r.link.pulses;
        let bad = r.link.missed_pulses + r.link.late_pulses;
        let flaky = reconnects_24h >= 3 || (total >= 20 && bad * 20 > total);
        DeviceView {
            id: id.to_string(),
            state: state.to_string(),
            last_seen: r.last_seen_ms.map(rfc3339),
            agent_version: h.map(|h| h.agent_version.clone()),
            hostname: h.map(|h| h.hostname.clone()),
            arch: h.map(|h| h.arch.clone()),
            os: h.map(|h| h.os.clone()),
            kernel: h.map(|h| h.kernel.clone()),
            board_model: h.and_then(|h| h.board_model.clone()),
            boot_id: h.map(|h| h.boot_id.clone()),
            tags: h.map(|h| h.tags.clone()).unwrap_or_default(),
            actions: h.map(|h| h.actions.clone()).unwrap_or_default(),
            interval_ms: h.map(|h| h.interval_ms),
            offline_after_ms: self.offline_after_of(id, r).as_millis() as u64,
            connected: d.conn.is_some(),
            generation: r.generation,
            enrolled_at: rfc3339(d.enrolment.created_ms),
            health: r.health.as_ref().map(HealthView::from),
            link: LinkView {
                missed_pulses: r.link.missed_pulses,
                late_pulses: r.link.late_pulses,
                reconnects_24h,
                rtt_ms: r.link.rtt_ms,
                flaky,
            },
        }
    }

    /// Writes dirty device states and pending events to the store.
    pub fn write_back(&self) -> anyhow::Result<usize> {
        let (records, events, history, alerts, pulses) = {
            let mut state = self.state.lock().expect("fleet lock");
            let ids = std::mem::take(&mut state.dirty);
            let events = std::mem::take(&mut state.events);
            let history = std::mem::take(&mut state.history);
            let alerts = std::mem::take(&mut state.alerts);
            let mut records = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(d) = state.devices.get_mut(&id) {
                    d.dirty = false;
                    records.push((id, d.record.clone()));
                }
            }
            (records, events, history, alerts, self.stats.pulses_accepted.load(Ordering::Relaxed))
        };
        if !alerts.is_empty() {
            self.store.put_outbox(&alerts)?;
            if let Some(a) = &self.alerts {
                a.wake();
            }
        }
        if !events.is_empty() {
            self.store.append_events(&events)?;
        }
        if !history.is_empty() {
            // Flushed with the device states below.
            self.store.put_history(&history)?;
        }
        if !records.is_empty() {
            let started = std::time::Instant::now();
            let result = self.store.put_device_states(&records);
            self.stats.store_write_seconds.observe(started.elapsed().as_secs_f64());
            if let Err(e) = result {
                // Put them back so the next round retries.
                let mut state = self.state.lock().expect("fleet lock");
                for (id, _) in &records {
                    state.mark_dirty(id);
                }
                warn!(error = %e, "writing device state failed; will retry");
                return Err(e.into());
            }
        }
        self.stats.pulses_stored.store(pulses, Ordering::Relaxed);
        Ok(records.len())
    }

    /// History of `id` from `since_ms` on: stored minutes plus the open one.
    pub fn history(&self, id: &str, since_ms: u64) -> anyhow::Result<Option<Vec<Bucket>>> {
        let open = {
            let state = self.state.lock().expect("fleet lock");
            let Some(d) = state.devices.get(id) else { return Ok(None) };
            d.minute.as_ref().map(Accumulator::bucket)
        };
        let since = (since_ms / 60_000) as u32;
        let mut buckets = self.store.history(id, since)?;
        if let Some(b) = open {
            if b.minute >= since && buckets.last().is_none_or(|last| last.minute < b.minute) {
                buckets.push(b);
            }
        }
        Ok(Some(buckets))
    }

    /// Ids of every enrolled device.
    pub fn ids(&self) -> Vec<String> {
        self.state.lock().expect("fleet lock").devices.keys().cloned().collect()
    }

    /// Closes every connection with `code` and marks their devices offline
    /// with `reason` (graceful shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        let mut state = self.state.lock().expect("fleet lock");
        let now = now_ms();
        let mut events = vec![];
        let mut dirty = vec![];
        for (id, d) in state.devices.iter_mut() {
            if let Some(conn) = d.conn.take() {
                let _ = conn.tx.try_send(Outbound::Close(code, reason.to_string()));
            }
            if std::mem::replace(&mut d.record.online, false) {
                d.record.last_offline_reason = Some("collector_shutdown".into());
                events.push(EventRecord {
                    device: id.clone(),
                    kind: EventKind::Offline,
                    reason: "collector_shutdown".into(),
                    at_ms: now,
                    generation: d.record.generation,
                });
                dirty.push(id.clone());
            }
        }
        state.events.extend(events);
        for id in dirty {
            state.mark_dirty(&id);
        }
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
