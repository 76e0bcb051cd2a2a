//! [`Store`] in memory: for unit tests of liveness and the bell state
//! machine, where a real database would only slow them down. Nothing is
//! durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;

/// The in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    seq: AtomicU64,
    bell_seq: AtomicU64,
}

#[derive(Default)]
struct State {
    enrolments: BTreeMap<String, Enrolment>,
    devices: BTreeMap<String, DeviceRecord>,
    generations: HashMap<String, u64>,
    bells: BTreeMap<u64, BellRecord>,
    events: Vec<EventRecord>,
    history: BTreeMap<(String, u32), Bucket>,
    outbox: BTreeMap<u64, OutboxEntry>,
    provision: BTreeMap<String, ProvisionKey>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory store lock")
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn put_enrolments(&self, es: &[Enrolment]) -> Result<()> {
        let mut s = self.lock();
        for e in es {
            s.enrolments.insert(e.device.clone(), e.clone());
        }
        Ok(())
    }

    async fn create_enrolment(&self, e: &Enrolment) -> Result<bool> {
        let mut s = self.lock();
        if s.enrolments.contains_key(&e.device) {
            return Ok(false);
        }
        s.enrolments.insert(e.device.clone(), e.clone());
        Ok(true)
    }

    async fn delete_device(&self, device: &str) -> Result<bool> {
        let mut s = self.lock();
        s.devices.remove(device);
        s.history.retain(|(d, _), _| d != device);
        Ok(s.enrolments.remove(device).is_some())
    }

    async fn enrolments(&self) -> Result<Vec<Enrolment>> {
        Ok(self.lock().enrolments.values().cloned().collect())
    }

    async fn put_device_states(&self, states: &[(String, DeviceRecord)]) -> Result<()> {
        let mut s = self.lock();
        for (id, r) in states {
            s.devices.insert(id.clone(), r.clone());
        }
        Ok(())
    }

    async fn device_states(&self) -> Result<Vec<(String, DeviceRecord)>> {
        Ok(self.lock().devices.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn claim(&self, device: &str, _node: &str, floor: u64) -> Result<u64> {
        let mut s = self.lock();
        let g = s.generations.entry(device.to_string()).or_default();
        *g = (*g).max(floor) + 1;
        Ok(*g)
    }

    async fn release(&self, device: &str, _node: &str, generation: u64, _reason: Reason) -> Result<bool> {
        Ok(self.lock().generations.get(device) == Some(&generation))
    }

    async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        Ok(vec![])
    }

    async fn next_bell_id(&self) -> Result<u64> {
        Ok(self.bell_seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    async fn put_bells(&self, bells: &[BellRecord]) -> Result<()> {
        let mut s = self.lock();
        for b in bells {
            s.bells.insert(b.id, b.clone());
        }
        Ok(())
    }

    async fn update_bell(&self, id: u64, change: BellChange<'_>) -> Result<Option<BellRecord>> {
        let mut s = self.lock();
        let Some(current) = s.bells.get(&id) else { return Ok(None) };
        let Some(mut new) = change(current) else { return Ok(None) };
        new.version = current.version + 1;
        s.bells.insert(id, new.clone());
        Ok(Some(new))
    }

    async fn bell(&self, id: u64) -> Result<Option<BellRecord>> {
        Ok(self.lock().bells.get(&id).cloned())
    }

    async fn bells(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>> {
        let s = self.lock();
        Ok(s.bells.values().rev().filter(|b| device.is_none_or(|d| d == b.device)).take(limit).cloned().collect())
    }

    async fn pending_bells(&self) -> Result<Vec<BellRecord>> {
        Ok(self.lock().bells.values().filter(|b| !b.state.is_final()).cloned().collect())
    }

    async fn append_events(&self, events: &[EventRecord]) -> Result<()> {
        self.lock().events.extend_from_slice(events);
        Ok(())
    }

    async fn events(&self, device: Option<&str>, since_ms: u64, limit: usize) -> Result<Vec<EventRecord>> {
        let s = self.lock();
        let all: Vec<EventRecord> =
            s.events.iter().filter(|e| e.at_ms >= since_ms && device.is_none_or(|d| d == e.device)).cloned().collect();
        Ok(all[all.len().saturating_sub(limit)..].to_vec())
    }

    async fn put_history(&self, buckets: &[(String, Bucket)]) -> Result<()> {
        let mut s = self.lock();
        for (d, b) in buckets {
            s.history.insert((d.clone(), b.minute), b.clone());
        }
        Ok(())
    }

    async fn history(&self, device: &str, since_minute: u32) -> Result<Vec<Bucket>> {
        let s = self.lock();
        Ok(s.history
            .range((device.to_string(), since_minute)..=(device.to_string(), u32::MAX))
            .map(|(_, b)| b.clone())
            .collect())
    }

    async fn prune(&self, events_before_ms: u64, history_before_minute: u32, _devices: &[String]) -> Result<usize> {
        let mut s = self.lock();
        let before = s.events.len() + s.history.len();
        s.events.retain(|e| e.at_ms >= events_before_ms);
        s.history.retain(|(_, m), _| *m >= history_before_minute);
        Ok(before - s.events.len() - s.history.len())
    }

    async fn next_id(&self) -> Result<u64> {
        Ok(self.seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn instance_id(&self) -> String {
        "memory".into()
    }

    async fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()> {
        let mut s = self.lock();
        for e in entries {
            s.outbox.insert(e.alert.id, e.clone());
        }
        Ok(())
    }

    async fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        Ok(self.lock().outbox.values().cloned().collect())
    }

    async fn lease_outbox(&self, _id: u64, _node: &str, _until_ms: u64) -> Result<bool> {
        Ok(true)
    }

    async fn remove_outbox(&self, id: u64) -> Result<()> {
        self.lock().outbox.remove(&id);
        Ok(())
    }

    async fn put_provision_key(&self, key: &ProvisionKey) -> Result<()> {
        self.lock().provision.insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn provision_keys(&self) -> Result<Vec<ProvisionKey>> {
        Ok(self.lock().provision.values().cloned().collect())
    }

    async fn update_provision_key(&self, id: &str, change: ProvisionChange<'_>) -> Result<Option<ProvisionKey>> {
        let mut s = self.lock();
        let Some(current) = s.provision.get(id) else { return Ok(None) };
        let Some(new) = change(current) else { return Ok(None) };
        s.provision.insert(id.to_string(), new.clone());
        Ok(Some(new))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
