//! `cluster` (the collectors of a cluster) and `migrate` (a single
//! collector's sled data into JetStream).

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;

use super::client::Client;
use crate::cluster::NodeView;
use crate::config::ClusterConfig;
use crate::store::{NatsStore, Reason, SledStore, Store};

/// `cluster [--json]`.
pub async fn show(client: &Client, json: bool) -> anyhow::Result<()> {
    let nodes: Vec<NodeView> = client.get("/v1/cluster").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    let now = SystemTime::now();
    let mut rows =
        vec![["ID".to_string(), "STATE".into(), "DEVICES".into(), "LAST HEARTBEAT".into(), "ADDRESS".into()]];
    for n in &nodes {
        rows.push([
            n.id.clone(),
            n.state.clone(),
            n.devices.to_string(),
            super::status::ago(Some(&n.last_heartbeat), now),
            n.device_addr.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..5).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

/// `migrate --from DIR --nats URLS`: copies everything a single collector
/// keeps into the cluster's buckets and streams, so devices keep their
/// tokens. Idempotent: running it twice writes the same records again.
pub async fn migrate(from: &Path, nats: &str, replicas: Option<usize>) -> anyhow::Result<()> {
    let db = from.join("db");
    anyhow::ensure!(db.is_dir(), "{} holds no collector database (no db/ directory)", from.display());
    let sled = SledStore::open(&db, 64 << 20)
        .with_context(|| format!("cannot open {} (stop the collector using it first)", db.display()))?;
    let cfg = ClusterConfig {
        nats_urls: nats.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect(),
        replicas,
        ..ClusterConfig::default()
    };
    let nats = NatsStore::connect(&cfg, "migrate", crate::config::Config::default().history_retention).await?;

    let enrolments = sled.enrolments().await?;
    nats.put_enrolments(&enrolments).await?;
    println!("enrolments: {}", enrolments.len());

    let mut states = sled.device_states().await?;
    for (id, r) in states.iter_mut() {
        if r.online {
            r.online = false;
            r.last_offline_reason = Some(Reason::CollectorShutdown);
        }
        // Cluster generations continue above the single collector's.
        let g = nats.claim(id, "migrate", r.generation).await?;
        nats.release(id, "migrate", g, Reason::CollectorShutdown).await?;
        r.generation = g;
    }
    nats.put_device_states(&states).await?;
    println!("device states: {}", states.len());

    let bells = sled.bells(None, usize::MAX).await?;
    nats.put_bells(&bells).await?;
    if let Some(max) = bells.iter().map(|b| b.id).max() {
        nats.bell_ids_above(max).await?;
    }
    let pending = bells.iter().filter(|b| !b.state.is_final()).count();
    println!("bells: {} ({pending} pending)", bells.len());

    let events = sled.events(None, 0, usize::MAX).await?;
    nats.append_events(&events).await?;
    println!("events: {}", events.len());

    let mut buckets = 0;
    for e in &enrolments {
        let h = sled.history(&e.device, 0).await?;
        buckets += h.len();
        let rows: Vec<_> = h.into_iter().map(|b| (e.device.clone(), b)).collect();
        nats.put_history(&rows).await?;
    }
    println!("history minutes: {buckets}");

    let keys = sled.provision_keys().await?;
    for k in &keys {
        nats.put_provision_key(k).await?;
    }
    println!("provisioning keys: {}", keys.len());

    let outbox = sled.outbox().await?;
    nats.put_outbox(&outbox).await?;
    println!("pending alerts: {}", outbox.len());
    nats.flush().await?;
    println!("done: start the collectors with --nats; agents keep their tokens");
    Ok(())
}
