//! Alerts: hooks on transitions (device offline, online again,
//! under-voltage or throttling appeared, bell failed), delivered to webhooks
//! (POST JSON) and/or a command (JSON on stdin), from a durable outbox.
//!
//! An alert is raised in memory and written to the outbox in sled with the
//! next write-back (at most `write_back` later, flushed). The sender tries
//! every sink of every due alert; a sink that fails is retried with
//! exponential backoff (1 s doubling to 5 min, jittered) until it succeeds,
//! across restarts. A delivered sink is never tried again; the alert leaves
//! the outbox when every sink has it. Each payload carries an idempotency
//! key: a crash between a delivery and its bookkeeping re-sends with the
//! same key, so receivers can drop the duplicate.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::config::AlertsConfig;
use crate::fleet::{now_ms, rfc3339};
use crate::store::Store;

/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Time allowed for one delivery attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// What happened.
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
}

impl AlertKind {
    /// The snake_case name (config `events` values).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::DeviceOffline => "device_offline",
            AlertKind::DeviceOnline => "device_online",
            AlertKind::UnderVoltage => "under_voltage",
            AlertKind::Throttled => "throttled",
            AlertKind::BellFailed => "bell_failed",
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

/// The sender.
pub struct Alerts {
    config: AlertsConfig,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    wake: Notify,
}

impl Alerts {
    /// `None` when no sink is configured (then nothing is raised at all).
    pub fn new(config: AlertsConfig, store: Arc<dyn Store>) -> Option<Arc<Alerts>> {
        if config.webhooks.is_empty() && config.command.is_empty() {
            return None;
        }
        let http = reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build().ok()?;
        Some(Arc::new(Alerts { config, store, http, wake: Notify::new() }))
    }

    /// Whether alerts of `kind` are wanted.
    pub fn wants(&self, kind: AlertKind) -> bool {
        self.config.events.is_empty() || self.config.events.iter().any(|e| e == kind.as_str())
    }

    /// Builds an outbox entry for every configured sink.
    pub fn entry(
        &self,
        kind: AlertKind,
        device: &str,
        summary: String,
        details: serde_json::Value,
    ) -> anyhow::Result<OutboxEntry> {
        let id = self.store.next_id()?;
        let mut pending: Vec<String> = self.config.webhooks.iter().map(|u| format!("webhook:{u}")).collect();
        if !self.config.command.is_empty() {
            pending.push("command".into());
        }
        let at_ms = now_ms();
        Ok(OutboxEntry {
            alert: Alert {
                id,
                idempotency_key: format!("pulsebell-{}-{id}", self.store.instance_id()),
                kind,
                device: device.to_string(),
                at: rfc3339(at_ms),
                summary,
                details,
            },
            pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
        })
    }

    /// New entries reached the outbox: try them now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Delivers due entries until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = self.deliver_due().await;
            let sleep = next.map_or(Duration::from_secs(60), |at| Duration::from_millis(at.saturating_sub(now_ms())));
            tokio::select! {
                _ = tokio::time::sleep(sleep.max(Duration::from_millis(50))) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass over the outbox; returns when the next entry is due.
    async fn deliver_due(&self) -> Option<u64> {
        let store = self.store.clone();
        let entries = match tokio::task::spawn_blocking(move || store.outbox()).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the alert outbox");
                return Some(now_ms() + 5000);
            }
            Err(_) => return Some(now_ms() + 5000),
        };
        let mut next: Option<u64> = None;
        for mut entry in entries {
            if entry.next_attempt_ms > now_ms() {
                next = Some(next.map_or(entry.next_attempt_ms, |n| n.min(entry.next_attempt_ms)));
                continue;
            }
            let payload = serde_json::to_vec(&entry.alert).unwrap_or_default();
            let mut still = vec![];
            let mut error = None;
            for sink in &entry.pending {
                match self.send(sink, &entry.alert, &payload).await {
                    Ok(()) => {
                        info!(alert = entry.alert.id, kind = entry.alert.kind.as_str(), device = %entry.alert.device, sink, "alert delivered")
                    }
                    Err(e) => {
                        warn!(alert = entry.alert.id, sink, attempt = entry.attempts + 1, "alert delivery failed: {e}");
                        error = Some(e);
                        still.push(sink.clone());
                    }
                }
            }
            entry.pending = still;
            entry.attempts += 1;
            entry.last_error = error;
            // Retry after 1 s, 2 s, 4 s … (attempts counts the one just made).
            let store = self.store.clone();
            if entry.pending.is_empty() {
                let id = entry.alert.id;
                let _ = tokio::task::spawn_blocking(move || store.remove_outbox(id)).await;
            } else {
                let backoff = Duration::from_secs(1u64 << (entry.attempts - 1).min(9)).min(MAX_BACKOFF);
                let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1);
                entry.next_attempt_ms = now_ms() + backoff.as_millis() as u64 + jitter;
                next = Some(next.map_or(entry.next_attempt_ms, |n| n.min(entry.next_attempt_ms)));
                let _ = tokio::task::spawn_blocking(move || store.put_outbox(&[entry])).await;
            }
        }
        next
    }

    async fn send(&self, sink: &str, alert: &Alert, payload: &[u8]) -> Result<(), String> {
        if let Some(url) = sink.strip_prefix("webhook:") {
            let resp = self
                .http
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", &alert.idempotency_key)
                .body(payload.to_vec())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", resp.status()))
            }
        } else {
            self.run_command(alert, payload).await
        }
    }

    async fn run_command(&self, alert: &Alert, payload: &[u8]) -> Result<(), String> {
        let argv = &self.config.command;
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("PULSEBELL_ALERT_KIND", alert.kind.as_str())
            .env("PULSEBELL_ALERT_DEVICE", &alert.device)
            .env("PULSEBELL_ALERT_KEY", &alert.idempotency_key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", argv[0]))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(payload).await;
        }
        match tokio::time::timeout(ATTEMPT_TIMEOUT, child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("command exited with {s}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("command timed out".into()),
        }
    }
}
