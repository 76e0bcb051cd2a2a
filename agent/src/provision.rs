//! First start with a provisioning key: ask a collector for this device's
//! own token ([`pulsebell_proto::provision`]) and keep it in
//! `<state_dir>/device.token` (0600, fsynced); later starts use the saved
//! token. A refusal (id already enrolled, key expired, used up or revoked)
//! is logged and retried with backoff, so fixing it on the collector is
//! enough.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use pulsebell_proto::provision::Provisioned;
use rand::SeedableRng;
use tokio_tungstenite::tungstenite::Message;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::uplink::backoff::Backoff;
use crate::uplink::endpoints::Endpoints;
use crate::uplink::{Dialer, WsStream};

/// The device token: the saved one, or a new one from a collector.
pub async fn obtain_token(config: &Config, tls: Arc<rustls::ClientConfig>, key: &str) -> anyhow::Result<String> {
    let path = config.saved_token_path();
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let dialers: Vec<Dialer> =
        config.collectors.iter().map(|u| Dialer::new(u.clone(), String::new(), tls.clone())).collect();
    let mut dialers = Endpoints::with_random_start(dialers, &mut rand::rng())
        .ok_or_else(|| anyhow::anyhow!("no collector configured"))?;
    let mut backoff = Backoff::default();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut last_refusal: Option<String> = None;
    info!(device = %config.device_id, "not enrolled yet: provisioning with the key");
    loop {
        let url = dialers.current().url().url.clone();
        match dialers.current().provision(key, &config.device_id).await {
            Ok(ws) => match answer(ws).await {
                Ok(p) => {
                    save_token(&path, &p.token)?;
                    info!(device = %p.device_id, collector = %url, token_file = %path.display(), "provisioned");
                    return Ok(p.token);
                }
                Err(why) => {
                    if last_refusal.as_deref() != Some(why.as_str()) {
                        error!(collector = %url, "provisioning refused: {why}");
                        last_refusal = Some(why);
                    }
                }
            },
            Err(e) => warn!(collector = %url, "provisioning: {e}"),
        }
        dialers.advance();
        tokio::time::sleep(backoff.next_delay(&mut rng)).await;
    }
}

/// The collector's answer: the token, or why not.
async fn answer(mut ws: WsStream) -> Result<Provisioned, String> {
    let next = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next()).await;
    let result = match next {
        Err(_) => Err("no answer within 30 s".to_string()),
        Ok(None) => Err("connection closed without an answer".into()),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(Some(Ok(Message::Binary(bytes)))) => {
            pulsebell_proto::decode::<Provisioned>(&bytes).map_err(|e| e.to_string())
        }
        Ok(Some(Ok(Message::Close(frame)))) => {
            Err(frame.map_or("closed".into(), |f| format!("{} ({})", f.reason, u16::from(f.code))))
        }
        Ok(Some(Ok(other))) => Err(format!("unexpected {other:?}")),
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), ws.close(None)).await;
    result
}

/// Writes the token (0600), fsyncs it and its directory.
fn save_token(path: &Path, token: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = path.parent().context("token path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
