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

use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::clock::{now_ms, rfc3339};
use crate::config::AlertsConfig;
use crate::store::{Alert, OutboxEntry, Store};

pub use crate::store::AlertKind;

/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Time allowed for one delivery attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// An alert raised by the fleet or the bells, before it has an id and
/// sinks: [`Alerts::enqueue`] turns it into an outbox entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    /// What happened.
    pub kind: AlertKind,
    /// Which device.
    pub device: String,
    /// Human summary.
    pub summary: String,
    /// Kind-specific details.
    pub details: serde_json::Value,
    /// When, Unix ms.
    pub at_ms: u64,
}

impl Raised {
    /// An alert raised now.
    pub fn new(kind: AlertKind, device: &str, summary: String, details: serde_json::Value) -> Raised {
        Raised { kind, device: device.to_string(), summary, details, at_ms: now_ms() }
    }
}

/// TLS for `https://` webhooks: the public roots (webpki-roots), plus the
/// CAs in `ca_file` for a private receiver; rustls with ring; certificates
/// always verified.
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context;
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("alerts.ca_file: cannot read {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("alerts.ca_file: {} is not PEM", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("alerts.ca_file: a certificate in {} is not usable", path.display()))?;
            n += 1;
        }
        anyhow::ensure!(n > 0, "alerts.ca_file: no certificate in {}", path.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The sender.
pub struct Alerts {
    config: AlertsConfig,
    store: Arc<dyn Store>,
    node: String,
    http: reqwest::Client,
    wake: Notify,
}

impl Alerts {
    /// `None` when no sink is configured (then nothing is raised at all).
    /// Fails when `[alerts] ca_file` cannot be read.
    pub fn new(config: AlertsConfig, store: Arc<dyn Store>, node: String) -> anyhow::Result<Option<Arc<Alerts>>> {
        if config.webhooks.is_empty() && config.command.is_empty() {
            return Ok(None);
        }
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .use_preconfigured_tls(tls_config(config.ca_file.as_deref())?)
            .build()?;
        Ok(Some(Arc::new(Alerts { config, store, node, http, wake: Notify::new() })))
    }

    /// Whether alerts of `kind` are wanted.
    pub fn wants(&self, kind: AlertKind) -> bool {
        // A planned agent stop is news only to those who ask for it.
        let default = self.config.events.is_empty() && kind != AlertKind::AgentStopped;
        default || self.config.events.iter().any(|e| e == kind.as_str())
    }

    /// Writes wanted alerts to the outbox (durable) and wakes the sender.
    pub async fn enqueue(&self, raised: Vec<Raised>) -> anyhow::Result<()> {
        let mut entries = vec![];
        for r in raised.into_iter().filter(|r| self.wants(r.kind)) {
            let id = self.store.next_id().await?;
            let mut pending: Vec<String> = self.config.webhooks.iter().map(|u| format!("webhook:{u}")).collect();
            if !self.config.command.is_empty() {
                pending.push("command".into());
            }
            entries.push(OutboxEntry {
                alert: Alert {
                    id,
                    idempotency_key: format!("pulsebell-{}-{id}", self.store.instance_id()),
                    kind: r.kind,
                    device: r.device,
                    at: rfc3339(r.at_ms),
                    summary: r.summary,
                    details: r.details,
                },
                pending,
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
            });
        }
        if !entries.is_empty() {
            self.store.put_outbox(&entries).await?;
            self.wake();
        }
        Ok(())
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
        let entries = match self.store.outbox().await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot read the alert outbox");
                return Some(now_ms() + 5000);
            }
        };
        let mut next: Option<u64> = None;
        for mut entry in entries {
            if entry.next_attempt_ms > now_ms() {
                next = Some(next.map_or(entry.next_attempt_ms, |n| n.min(entry.next_attempt_ms)));
                continue;
            }
            // One node of a cluster delivers each alert: take a lease
            // longer than one attempt at every sink.
            let lease = ATTEMPT_TIMEOUT.as_millis() as u64 * (entry.pending.len() as u64 + 1);
            match self.store.lease_outbox(entry.alert.id, &self.node, now_ms() + lease).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(alert = entry.alert.id, error = %e, "cannot lease the alert");
                    continue;
                }
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
            if entry.pending.is_empty() {
                if let Err(e) = self.store.remove_outbox(entry.alert.id).await {
                    warn!(alert = entry.alert.id, error = %e, "cannot remove a delivered alert");
                }
            } else {
                let backoff = Duration::from_secs(1u64 << (entry.attempts - 1).min(9)).min(MAX_BACKOFF);
                let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1);
                entry.next_attempt_ms = now_ms() + backoff.as_millis() as u64 + jitter;
                next = Some(next.map_or(entry.next_attempt_ms, |n| n.min(entry.next_attempt_ms)));
                if let Err(e) = self.store.put_outbox(&[entry]).await {
                    warn!(error = %e, "cannot record an alert attempt");
                }
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
