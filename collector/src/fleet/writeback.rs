//! Write-back: what changed in memory since the last round, written to the
//! store in one batch every `write_back` (and at shutdown).
//!
//! A device pulsing many times in one window is written once: the batch
//! holds each dirty device's latest record, so store writes per second are
//! bounded by the number of devices, not by the pulse rate. A record whose
//! only news is a newer pulse waits until its last write is `sync_interval`
//! old (`[cluster] sync_interval` in cluster mode; 30 s by default): with a
//! 10 s pulse interval that is one write per three pulses, while liveness
//! changes (online, offline, a new connection, the first health) still go
//! out at the next round. On sled this keeps the main database's writes, and
//! so the file system journal a bell's flush waits on, small (BENCHMARKS.md,
//! bell round trip). A failed write puts everything back for the next round.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::warn;

use super::Fleet;
use crate::alerts::{Alerts, Raised};
use crate::history::Bucket;
use crate::store::{DeviceRecord, EventRecord};

/// One round's worth of changes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Latest record of each changed device.
    pub records: Vec<(String, DeviceRecord)>,
    /// Liveness events, in order.
    pub events: Vec<EventRecord>,
    /// Finished history minutes.
    pub history: Vec<(String, Bucket)>,
    /// Raised alerts.
    pub alerts: Vec<Raised>,
    /// Pulses whose state the records carry (per record, in order): stored
    /// once the batch is written, given back to the devices if it fails.
    pub pulses: Vec<u32>,
    /// Whether no record was left for a later round.
    pub complete: bool,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.events.is_empty() && self.history.is_empty() && self.alerts.is_empty()
    }
}

impl Fleet {
    /// Takes what changed since the last batch (under the lock; copies
    /// only, no I/O). Routine records younger than the sync interval stay
    /// for a later round, unless `force` (shutdown).
    pub fn take_batch(&self, force: bool) -> Batch {
        let now = crate::clock::now_ms();
        let sync_ms = self.sync_ms;
        let mut state = self.lock();
        let ids = std::mem::take(&mut state.dirty);
        let events = std::mem::take(&mut state.events);
        let history = std::mem::take(&mut state.history);
        let alerts = std::mem::take(&mut state.alerts);
        let mut records = Vec::with_capacity(ids.len());
        let mut pulses = Vec::with_capacity(ids.len());
        let mut deferred = Vec::new();
        for id in ids {
            if let Some(d) = state.devices.get_mut(&id) {
                if !force && !d.urgent && now.saturating_sub(d.written_ms) < sync_ms {
                    deferred.push(id);
                    continue;
                }
                d.dirty = false;
                d.urgent = false;
                d.written_ms = now;
                pulses.push(std::mem::take(&mut d.unwritten));
                records.push((id, d.record.clone()));
            }
        }
        let complete = deferred.is_empty();
        state.dirty = deferred;
        Batch { records, events, history, alerts, pulses, complete }
    }

    /// Puts back what a failed write did not store, ahead of newer changes.
    fn requeue(&self, batch: Batch) {
        let mut state = self.lock();
        for ((id, _), n) in batch.records.iter().zip(&batch.pulses) {
            if let Some(d) = state.devices.get_mut(id) {
                d.unwritten = d.unwritten.saturating_add(*n);
            }
            state.mark_dirty(id);
        }
        let newer = std::mem::replace(&mut state.events, batch.events);
        state.events.extend(newer);
        let newer = std::mem::replace(&mut state.history, batch.history);
        state.history.extend(newer);
        let newer = std::mem::replace(&mut state.alerts, batch.alerts);
        state.alerts.extend(newer);
    }
}

/// Writes one batch: events, history and device records to the store, and
/// raised alerts to the outbox. Returns the number of device records.
pub async fn write_back(fleet: &Fleet, alerts: Option<&Alerts>) -> anyhow::Result<usize> {
    write_back_with(fleet, alerts, false).await
}

/// Like [`write_back`]; `force` writes every dirty record now (shutdown).
pub async fn write_back_with(fleet: &Fleet, alerts: Option<&Alerts>, force: bool) -> anyhow::Result<usize> {
    let batch = fleet.take_batch(force);
    if batch.is_empty() {
        return Ok(0);
    }
    let store = fleet.store();
    let started = Instant::now();
    let result = async {
        if !batch.events.is_empty() {
            store.append_events(&batch.events).await?;
        }
        if !batch.history.is_empty() {
            store.put_history(&batch.history).await?;
        }
        if !batch.records.is_empty() {
            store.put_device_states(&batch.records).await?;
        }
        anyhow::Ok(())
    }
    .await;
    fleet.stats.store_write_seconds.observe(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        warn!(error = %e, "writing device state failed; will retry");
        fleet.requeue(batch);
        return Err(e);
    }
    let n = batch.records.len();
    fleet.stats.records_written.fetch_add(n as u64, Ordering::Relaxed);
    let stored: u64 = batch.pulses.iter().map(|&n| u64::from(n)).sum();
    fleet.stats.pulses_stored.fetch_add(stored, Ordering::Relaxed);
    if let Some(a) = alerts {
        if !batch.alerts.is_empty() {
            if let Err(e) = a.enqueue(batch.alerts.clone()).await {
                warn!(error = %e, "cannot queue alerts; will retry");
                fleet.requeue(Batch { alerts: batch.alerts, complete: true, ..Batch::default() });
            }
        }
    }
    Ok(n)
}
