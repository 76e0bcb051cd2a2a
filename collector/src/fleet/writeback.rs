//! Write-back: what changed in memory since the last round, written to the
//! store in one batch every `write_back` (and at shutdown).
//!
//! A device pulsing many times in one window is written once: the batch
//! holds each dirty device's latest record, so store writes per second are
//! bounded by the number of devices, not by the pulse rate. A failed write
//! puts everything back for the next round.

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
    /// Pulses accepted up to this batch.
    pub pulses: u64,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.events.is_empty() && self.history.is_empty() && self.alerts.is_empty()
    }
}

impl Fleet {
    /// Takes what changed since the last batch (under the lock; copies
    /// only, no I/O).
    pub fn take_batch(&self) -> Batch {
        let mut state = self.lock();
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
        Batch { records, events, history, alerts, pulses: self.stats.pulses_accepted.load(Ordering::Relaxed) }
    }

    /// Puts back what a failed write did not store, ahead of newer changes.
    fn requeue(&self, batch: Batch) {
        let mut state = self.lock();
        for (id, _) in &batch.records {
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
    let batch = fleet.take_batch();
    if batch.is_empty() {
        fleet.stats.pulses_stored.store(batch.pulses, Ordering::Relaxed);
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
    fleet.stats.pulses_stored.store(batch.pulses, Ordering::Relaxed);
    if let Some(a) = alerts {
        if !batch.alerts.is_empty() {
            if let Err(e) = a.enqueue(batch.alerts.clone()).await {
                warn!(error = %e, "cannot queue alerts; will retry");
                fleet.requeue(Batch { alerts: batch.alerts, ..Batch::default() });
            }
        }
    }
    Ok(n)
}
