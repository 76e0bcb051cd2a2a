//! [`Store`] on NATS JetStream: the shared state of a cluster of collectors.
//!
//! Buckets (KV, JSON values unless noted) and streams, all created on first
//! start with replicas = `cluster.replicas`, default 3 when the server is
//! part of a NATS cluster and 1 on a single server:
//!
//! | name | key | value |
//! |---|---|---|
//! | KV `pulsebell_enrolments` | device | [`Enrolment`] |
//! | KV `pulsebell_devices` | device | [`DeviceRecord`] (written back by the node holding it) |
//! | KV `pulsebell_owners` | device | [`Owner`]: node and generation, compare-and-set |
//! | KV `pulsebell_bells` | id (20 digits) | [`BellRecord`], compare-and-set; kept 90 days |
//! | KV `pulsebell_outbox` | id (20 digits) | [`OutboxEntry`] + lease |
//! | KV `pulsebell_nodes` | node | [`NodeRecord`] heartbeat |
//! | KV `pulsebell_provision` | key id | [`ProvisionKey`], compare-and-set |
//! | KV `pulsebell_meta` | `instance`, `seq_bell`, `seq_id` | cluster id and counters |
//! | stream `PULSEBELL_EVENTS` | `pulsebell.events.<device>` | [`EventRecord`], 30 days |
//! | stream `PULSEBELL_HISTORY` | `pulsebell.history.<device>` | finished minutes of one write-back round (postcard); `max_age` = history retention |
//!
//! History is a stream, not a bucket: a round appends each device's new
//! minutes with one pipelined publish (no read-before-write, no
//! compare-and-set), and a reader folds a device's messages by minute (the
//! last write of a minute wins, so a hand-over between two nodes within a
//! minute is harmless).
//!
//! Device ids may hold `.`, which NATS keys and subjects use as a
//! separator; keys spell it `=` (not allowed in device ids).
//!
//! Correctness where several nodes write: generations ([`Store::claim`]),
//! releases, bell transitions, counters and outbox leases are
//! compare-and-set on the key's revision (`Nats-Expected-Last-Subject-Sequence`),
//! retried with the fresh value on conflict: a stale read from a follower
//! can only cost a retry, never a lost update. Event publishes carry a
//! `Nats-Msg-Id` derived from the event, so a publish retried across a
//! leader election is stored once.
//!
//! Every node watches the buckets ([`Store::changes`]); a watch that ends or
//! goes quiet (an ordered consumer can stop silently after a server
//! restart) is restarted from the last revision it saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::*;
use crate::config::ClusterConfig;
use crate::history::StoredBucket;

const ENROLMENTS: &str = "pulsebell_enrolments";
const DEVICES: &str = "pulsebell_devices";
const OWNERS: &str = "pulsebell_owners";
const BELLS: &str = "pulsebell_bells";
const OUTBOX: &str = "pulsebell_outbox";
const NODES: &str = "pulsebell_nodes";
const META: &str = "pulsebell_meta";
const PROVISION: &str = "pulsebell_provision";
const EVENTS: &str = "PULSEBELL_EVENTS";
const EVENTS_PREFIX: &str = "pulsebell.events";
const HISTORY: &str = "PULSEBELL_HISTORY";
const HISTORY_PREFIX: &str = "pulsebell.history";
/// Core NATS subject of heartbeats (`.<node>`): not JetStream, so a stream
/// leader election never delays them.
const HEARTBEAT_PREFIX: &str = "pulsebell.heartbeat";

/// How long bells are kept.
const BELL_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long events are kept.
const EVENT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Attempts of a compare-and-set before giving up.
const CAS_ATTEMPTS: usize = 64;
/// Time allowed for one JetStream request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A watch with nothing to say for this long is restarted (the nodes
/// bucket gets a heartbeat every few seconds, so silence means trouble).
const WATCH_QUIET: Duration = Duration::from_secs(20);
/// How often a node's record goes to the nodes bucket (its heartbeat goes
/// out on core NATS far more often).
const NODE_RECORD_EVERY: Duration = Duration::from_secs(2);
/// Publishes in flight at once in a batch (the client allows 5,000
/// unacknowledged ones in all).
const PIPELINE: usize = 512;

/// Whether a JetStream error is worth retrying (a timeout, no responders
/// during an election), not a final answer (placement, permissions).
fn is_transient(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("timed out")
        || e.contains("no responders")
        || e.contains("timeout")
        || e.contains("not available")
        // A server of a cluster that just started may not have reported in
        // yet (seen under load); too few servers in all is a different
        // answer and stays final.
        || e.contains("peer offline")
}

/// Device id → key (`.` → `=`).
fn key(device: &str) -> String {
    device.replace('.', "=")
}

/// Key → device id.
fn device_of(key: &str) -> String {
    key.replace('=', ".")
}

fn bell_key(id: u64) -> String {
    format!("{id:020}")
}

fn err(context: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::db(context, e)
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes> {
    serde_json::to_vec(v).map(Bytes::from).map_err(|e| err("encoding a record", e))
}

/// An outbox entry with the lease of the node delivering it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredOutbox {
    entry: OutboxEntry,
    #[serde(default)]
    lease_node: Option<String>,
    #[serde(default)]
    lease_until_ms: u64,
}

/// The JetStream-backed store.
pub struct NatsStore {
    client: async_nats::Client,
    js: jetstream::Context,
    buckets: Buckets,
    events: stream::Stream,
    history: stream::Stream,
    instance: String,
    node: String,
    corrupt: Arc<AtomicU64>,
    /// When the node record was last written to its bucket, Unix ms.
    node_record_ms: AtomicU64,
    changes: Mutex<Option<mpsc::Receiver<Change>>>,
    watch_tx: Mutex<Option<mpsc::Sender<Change>>>,
}

#[derive(Clone)]
struct Buckets {
    enrolments: kv::Store,
    devices: kv::Store,
    owners: kv::Store,
    bells: kv::Store,
    outbox: kv::Store,
    nodes: kv::Store,
    meta: kv::Store,
    provision: kv::Store,
}

/// Connects to NATS, retrying until a server answers, and logs which URLs
/// it tried.
async fn connect(cfg: &ClusterConfig, node: &str) -> anyhow::Result<async_nats::Client> {
    let urls = cfg.nats_urls.join(",");
    let addrs: Vec<async_nats::ServerAddr> = cfg
        .nats_urls
        .iter()
        .map(|u| u.parse().map_err(|e| anyhow::anyhow!("cluster.nats_urls: `{u}` is not a NATS URL: {e}")))
        .collect::<anyhow::Result<_>>()?;
    let mut delay = Duration::from_millis(500);
    loop {
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("pulsebell-collector {node}"))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None::<usize>)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => info!("NATS connected"),
                    async_nats::Event::Disconnected => warn!("NATS disconnected; reconnecting"),
                    other => debug!(event = %other, "NATS event"),
                }
            });
        if let Some(path) = &cfg.nats_creds_file {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read cluster.nats_creds_file {}: {e}", path.display()))?;
        }
        if let Some(path) = &cfg.nats_ca_file {
            opts = opts.add_root_certificates(path.clone());
        }
        match opts.connect(addrs.as_slice()).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(urls = %urls, error = %e, retry_in = ?delay, "cannot reach NATS (cluster.nats_urls); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

impl NatsStore {
    /// Connects and creates (or opens) every bucket and stream; history is
    /// kept for `history_retention`.
    pub async fn connect(cfg: &ClusterConfig, node: &str, history_retention: Duration) -> anyhow::Result<NatsStore> {
        let client = connect(cfg, node).await?;
        let js = jetstream::new(client.clone());
        let info = client.server_info();
        // A clustered server's INFO lists only the client URLs it has heard
        // of so far (routes still forming after a start), so it would
        // undercount; a cluster gets 3 replicas unless told otherwise, and a
        // standalone server 1.
        let servers = if info.cluster.is_some() { info.connect_urls.len().max(3) } else { 1 };
        let replicas = cfg.replicas.unwrap_or(servers.min(3));
        info!(server = %info.server_name, version = %info.version, servers, replicas, "JetStream store");
        let setting = if cfg.replicas.is_some() {
            "cluster.replicas"
        } else {
            "cluster.replicas (default: 3 in a NATS cluster, 1 on a single server)"
        };
        let bucket = |name: &'static str, max_age: Duration| {
            let js = js.clone();
            create_retrying("bucket", name, replicas, setting, move || {
                let js = js.clone();
                async move {
                    if let Ok(kv) = js.get_key_value(name).await {
                        return Ok(kv);
                    }
                    js.create_key_value(kv::Config {
                        bucket: name.to_string(),
                        history: 1,
                        max_age,
                        num_replicas: replicas,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                }
            })
        };
        let buckets = Buckets {
            enrolments: bucket(ENROLMENTS, Duration::ZERO).await?,
            devices: bucket(DEVICES, Duration::ZERO).await?,
            owners: bucket(OWNERS, Duration::ZERO).await?,
            bells: bucket(BELLS, BELL_RETENTION).await?,
            outbox: bucket(OUTBOX, Duration::ZERO).await?,
            nodes: bucket(NODES, Duration::from_secs(24 * 3600)).await?,
            meta: bucket(META, Duration::ZERO).await?,
            provision: bucket(PROVISION, Duration::ZERO).await?,
        };
        let stream = |name: &'static str, prefix: &'static str, max_age: Duration, duplicate_window: Duration| {
            let js = js.clone();
            create_retrying("stream", name, replicas, setting, move || {
                let js = js.clone();
                async move {
                    js.get_or_create_stream(stream::Config {
                        name: name.to_string(),
                        subjects: vec![format!("{prefix}.>")],
                        max_age,
                        num_replicas: replicas,
                        duplicate_window,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                }
            })
        };
        let events = stream(EVENTS, EVENTS_PREFIX, EVENT_RETENTION, Duration::from_secs(120)).await?;
        // The duplicate window must not exceed max_age.
        let history =
            stream(HISTORY, HISTORY_PREFIX, history_retention, history_retention.min(Duration::from_secs(120))).await?;
        let instance = {
            let id = format!("{:016x}", rand::random::<u64>());
            match buckets.meta.create("instance", Bytes::from(id.clone())).await {
                Ok(_) => id,
                Err(_) => buckets
                    .meta
                    .get("instance")
                    .await
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or(id),
            }
        };
        let (tx, rx) = mpsc::channel(4096);
        Ok(NatsStore {
            client,
            js,
            buckets,
            events,
            history,
            instance,
            node: node.to_string(),
            corrupt: Arc::new(AtomicU64::new(0)),
            node_record_ms: AtomicU64::new(0),
            changes: Mutex::new(Some(rx)),
            watch_tx: Mutex::new(Some(tx)),
        })
    }

    fn decode<T: DeserializeOwned>(&self, bucket: &str, key: &str, bytes: &[u8]) -> Option<T> {
        decode_counted(&self.corrupt, bucket, key, bytes)
    }

    /// The latest value of every key of `bucket` whose subject matches
    /// `filter` (a key pattern), read through an ordered consumer.
    async fn scan(&self, kv: &kv::Store, pattern: &str) -> Result<Vec<(String, Bytes, u64)>> {
        scan(&self.js, kv, pattern).await
    }

    async fn scan_decoded<T: DeserializeOwned>(&self, kv: &kv::Store, pattern: &str) -> Result<Vec<(String, T)>> {
        let rows = self.scan(kv, pattern).await?;
        Ok(rows.into_iter().filter_map(|(k, v, _)| self.decode(&kv.name, &k, &v).map(|t| (k, t))).collect())
    }

    /// Publishes every (subject, payload, msg id) and waits for all acks,
    /// `PIPELINE` in flight at once. A failed publish is retried with the
    /// same message id (JetStream drops the duplicate).
    async fn publish_all(&self, msgs: Vec<(String, Bytes, Option<String>)>) -> Result<()> {
        let js = self.js.clone();
        let results: Vec<Result<()>> = futures_util::stream::iter(msgs)
            .map(|(subject, payload, id)| {
                let js = js.clone();
                async move { publish(&js, subject, payload, id).await }
            })
            .buffer_unordered(PIPELINE)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Compare-and-set loop on one key: `change(current value, revision)`
    /// returns the new value (or `None` to leave it). Returns the new value
    /// written, if any.
    async fn cas<T, F>(&self, kv: &kv::Store, key: &str, change: F) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(Option<T>) -> Option<T>,
    {
        cas(kv, key, &self.corrupt, change).await
    }

    /// Makes the next bell id larger than `max` (migration keeps old ids).
    pub async fn bell_ids_above(&self, max: u64) -> Result<()> {
        self.cas(&self.buckets.meta, "seq_bell", |n: Option<u64>| (n.unwrap_or(0) < max).then_some(max)).await?;
        Ok(())
    }

    async fn counter(&self, name: &str) -> Result<u64> {
        let v: Option<u64> = self.cas(&self.buckets.meta, name, |n: Option<u64>| Some(n.unwrap_or(0) + 1)).await?;
        v.ok_or_else(|| StoreError::Unavailable(format!("counter {name} not written")))
    }
}

/// Opens or creates one bucket or stream (`what` says which), retrying
/// what a just-started cluster answers for a while (a timeout, a leader
/// election, a peer not reported in yet); a placement error is final and
/// names the replicas setting.
async fn create_retrying<T, E, F, Fut>(
    what: &str,
    name: &str,
    replicas: usize,
    setting: &str,
    create: F,
) -> anyhow::Result<T>
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match create().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 8 && is_transient(&e.to_string()) => {
                warn!(what, name, attempt, error = %e, "creating a JetStream {what}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot create JetStream {what} `{name}` with {replicas} replicas ({setting}): {e}"
                ))
            }
        }
    }
}

fn decode_counted<T: DeserializeOwned>(corrupt: &AtomicU64, bucket: &str, key: &str, bytes: &[u8]) -> Option<T> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            corrupt.fetch_add(1, Ordering::Relaxed);
            warn!(bucket, key, error = %e, "skipping a record that does not decode");
            None
        }
    }
}

async fn publish(js: &jetstream::Context, subject: String, payload: Bytes, id: Option<String>) -> Result<()> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut p = jetstream::message::PublishMessage::build().payload(payload.clone());
        if let Some(id) = &id {
            p = p.message_id(id.as_str());
        }
        let result = match js.send_publish(subject.clone(), p).await {
            Ok(ack) => tokio::time::timeout(REQUEST_TIMEOUT, ack)
                .await
                .map_err(|_| "publish ack timed out".to_string())
                .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => return Ok(()),
            // During a leader election publishes fail for a few seconds.
            Err(e) if attempt < 6 => {
                debug!(subject, attempt, error = %e, "publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(StoreError::Unavailable(format!("publishing to {subject}: {e}"))),
        }
    }
}

async fn cas<T, F>(kv: &kv::Store, key: &str, corrupt: &AtomicU64, change: F) -> Result<Option<T>>
where
    T: Serialize + DeserializeOwned,
    F: Fn(Option<T>) -> Option<T>,
{
    let mut delay = Duration::from_millis(5);
    for _ in 0..CAS_ATTEMPTS {
        let entry = tokio::time::timeout(REQUEST_TIMEOUT, kv.entry(key))
            .await
            .map_err(|_| StoreError::Unavailable(format!("reading {}/{key} timed out", kv.name)))?
            .map_err(|e| err(format!("reading {}/{key}", kv.name), e))?;
        let (current, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = decode_counted(corrupt, &kv.name, key, &e.value);
                (v, Some(e.revision))
            }
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        };
        let Some(new) = change(current) else { return Ok(None) };
        let bytes = encode(&new)?;
        let write = match revision {
            Some(rev) => tokio::time::timeout(REQUEST_TIMEOUT, kv.update(key, bytes, rev)).await.map(|r| {
                r.map(|_| ()).map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string()))
            }),
            None => tokio::time::timeout(REQUEST_TIMEOUT, kv.create(key, bytes))
                .await
                .map(|r| r.map(|_| ()).map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string()))),
        };
        match write {
            Ok(Ok(())) => return Ok(Some(new)),
            // Someone else wrote first, or the read was stale: read again.
            Ok(Err((true, _))) => {}
            Ok(Err((false, e))) => debug!(bucket = %kv.name, key, error = %e, "compare-and-set failed; retrying"),
            Err(_) => debug!(bucket = %kv.name, key, "compare-and-set timed out; retrying"),
        }
        tokio::time::sleep(delay + Duration::from_millis(rand::random::<u64>() % 5)).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
    Err(StoreError::Unavailable(format!("{}/{key}: too many conflicting writers", kv.name)))
}

/// The latest value of every key of `kv` matching `pattern`.
async fn scan(js: &jetstream::Context, kv: &kv::Store, pattern: &str) -> Result<Vec<(String, Bytes, u64)>> {
    let stream_name = format!("KV_{}", kv.name);
    let prefix = format!("$KV.{}.", kv.name);
    let stream = js.get_stream(&stream_name).await.map_err(|e| err(format!("opening {stream_name}"), e))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{prefix}{pattern}"),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| err(format!("reading {}", kv.name), e))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| err(format!("reading {}", kv.name), e))?;
    loop {
        let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next())
            .await
            .map_err(|_| StoreError::Unavailable(format!("reading {} timed out", kv.name)))?;
        let Some(m) = next else { break };
        let m = m.map_err(|e| err(format!("reading {}", kv.name), e))?;
        let (pending, seq) = match m.info() {
            Ok(i) => (i.pending, i.stream_sequence),
            Err(_) => (0, 0),
        };
        let deleted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
        if !deleted {
            let key = m.subject.as_str().strip_prefix(&prefix).unwrap_or(m.subject.as_str()).to_string();
            out.push((key, m.payload.clone(), seq));
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// Watches `kv` and sends each change, converted by `convert`, until the
/// receiver is gone; restarts from the last revision seen when the watch
/// ends, fails or (with `quiet`) stays silent too long.
fn spawn_watch(
    kv: kv::Store,
    tx: mpsc::Sender<Change>,
    quiet: Option<Duration>,
    convert: impl Fn(&kv::Entry) -> Option<Change> + Send + Sync + 'static,
) {
    tokio::spawn(async move {
        let mut last: Option<u64> = None;
        loop {
            let watch = match last {
                None => kv.watch_with_history(">").await,
                Some(rev) => kv.watch_all_from_revision(rev + 1).await,
            };
            let mut watch = match watch {
                Ok(w) => w,
                Err(e) => {
                    warn!(bucket = %kv.name, error = %e, "cannot watch; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if last.is_some() {
                let _ = tx.send(Change::Resynced(bucket_name(&kv.name))).await;
            }
            loop {
                let next = match quiet {
                    Some(q) => match tokio::time::timeout(q, watch.next()).await {
                        Ok(n) => n,
                        Err(_) => {
                            warn!(bucket = %kv.name, "watch went quiet; restarting it");
                            break;
                        }
                    },
                    None => watch.next().await,
                };
                match next {
                    Some(Ok(entry)) => {
                        last = Some(entry.revision);
                        if let Some(change) = convert(&entry) {
                            if tx.send(change).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        warn!(bucket = %kv.name, error = %e, "watch failed; restarting it");
                        break;
                    }
                    None => break,
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

fn bucket_name(name: &str) -> &'static str {
    match name {
        ENROLMENTS => ENROLMENTS,
        DEVICES => DEVICES,
        OWNERS => OWNERS,
        BELLS => BELLS,
        NODES => NODES,
        _ => "bucket",
    }
}

#[async_trait]
impl Store for NatsStore {
    fn backend(&self) -> &'static str {
        "nats"
    }

    async fn put_enrolments(&self, es: &[Enrolment]) -> Result<()> {
        let msgs = es
            .iter()
            .map(|e| Ok((format!("$KV.{ENROLMENTS}.{}", key(&e.device)), encode(e)?, None)))
            .collect::<Result<Vec<_>>>()?;
        self.publish_all(msgs).await
    }

    async fn create_enrolment(&self, e: &Enrolment) -> Result<bool> {
        let k = key(&e.device);
        match self.buckets.enrolments.create(k.as_str(), encode(e)?).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self::err(format!("creating {ENROLMENTS}/{k}"), e)),
        }
    }

    async fn put_provision_key(&self, k: &ProvisionKey) -> Result<()> {
        publish(&self.js, format!("$KV.{PROVISION}.{}", k.id), encode(k)?, None).await
    }

    async fn provision_keys(&self) -> Result<Vec<ProvisionKey>> {
        Ok(self.scan_decoded::<ProvisionKey>(&self.buckets.provision, ">").await?.into_iter().map(|(_, k)| k).collect())
    }

    async fn update_provision_key(&self, id: &str, change: ProvisionChange<'_>) -> Result<Option<ProvisionKey>> {
        self.cas(&self.buckets.provision, id, |cur: Option<ProvisionKey>| change(&cur?)).await
    }

    async fn delete_device(&self, device: &str) -> Result<bool> {
        let k = key(device);
        let existed = self
            .buckets
            .enrolments
            .get(k.as_str())
            .await
            .map_err(|e| err(format!("reading {ENROLMENTS}/{k}"), e))?
            .is_some();
        for kv in [&self.buckets.enrolments, &self.buckets.devices] {
            kv.purge(k.as_str()).await.map_err(|e| err(format!("deleting {}/{k}", kv.name), e))?;
        }
        self.history
            .purge()
            .filter(format!("{HISTORY_PREFIX}.{k}"))
            .await
            .map_err(|e| err(format!("deleting history of {device}"), e))?;
        Ok(existed)
    }

    async fn enrolments(&self) -> Result<Vec<Enrolment>> {
        Ok(self.scan_decoded::<Enrolment>(&self.buckets.enrolments, ">").await?.into_iter().map(|(_, e)| e).collect())
    }

    async fn put_device_states(&self, states: &[(String, DeviceRecord)]) -> Result<()> {
        let msgs = states
            .iter()
            .map(|(id, r)| Ok((format!("$KV.{DEVICES}.{}", key(id)), encode(r)?, None)))
            .collect::<Result<Vec<_>>>()?;
        self.publish_all(msgs).await
    }

    async fn device_states(&self) -> Result<Vec<(String, DeviceRecord)>> {
        let rows = self.scan_decoded::<DeviceRecord>(&self.buckets.devices, ">").await?;
        Ok(rows.into_iter().map(|(k, r)| (device_of(&k), r)).collect())
    }

    async fn claim(&self, device: &str, node: &str, floor: u64) -> Result<u64> {
        let now = crate::clock::now_ms();
        let owner = self
            .cas(&self.buckets.owners, &key(device), |cur: Option<Owner>| {
                let generation = cur.map_or(0, |o| o.generation).max(floor) + 1;
                Some(Owner { node: Some(node.to_string()), generation, at_ms: now, reason: None })
            })
            .await?;
        owner.map(|o| o.generation).ok_or_else(|| StoreError::Unavailable("claim not written".into()))
    }

    async fn release(&self, device: &str, node: &str, generation: u64, reason: Reason) -> Result<bool> {
        let now = crate::clock::now_ms();
        let done = self
            .cas(&self.buckets.owners, &key(device), |cur: Option<Owner>| {
                let cur = cur?;
                (cur.node.as_deref() == Some(node) && cur.generation == generation).then_some(Owner {
                    node: None,
                    generation,
                    at_ms: now,
                    reason: Some(reason),
                })
            })
            .await?;
        Ok(done.is_some())
    }

    async fn owners(&self) -> Result<Vec<(String, Owner)>> {
        let rows = self.scan_decoded::<Owner>(&self.buckets.owners, ">").await?;
        Ok(rows.into_iter().map(|(k, o)| (device_of(&k), o)).collect())
    }

    async fn next_bell_id(&self) -> Result<u64> {
        self.counter("seq_bell").await
    }

    async fn put_bells(&self, bells: &[BellRecord]) -> Result<()> {
        let msgs = bells
            .iter()
            .map(|b| Ok((format!("$KV.{BELLS}.{}", bell_key(b.id)), encode(b)?, None)))
            .collect::<Result<Vec<_>>>()?;
        self.publish_all(msgs).await
    }

    async fn update_bell(&self, id: u64, change: BellChange<'_>) -> Result<Option<BellRecord>> {
        self.cas(&self.buckets.bells, &bell_key(id), |cur: Option<BellRecord>| {
            let cur = cur?;
            let mut new = change(&cur)?;
            new.version = cur.version + 1;
            Some(new)
        })
        .await
    }

    async fn bell(&self, id: u64) -> Result<Option<BellRecord>> {
        let k = bell_key(id);
        let v = self.buckets.bells.get(k.as_str()).await.map_err(|e| err(format!("reading {BELLS}/{k}"), e))?;
        Ok(v.and_then(|v| self.decode(BELLS, &k, &v)))
    }

    async fn bells(&self, device: Option<&str>, limit: usize) -> Result<Vec<BellRecord>> {
        let mut all: Vec<BellRecord> = self
            .scan_decoded::<BellRecord>(&self.buckets.bells, ">")
            .await?
            .into_iter()
            .map(|(_, b)| b)
            .filter(|b| device.is_none_or(|d| d == b.device))
            .collect();
        all.sort_by_key(|b| std::cmp::Reverse(b.id));
        all.truncate(limit);
        Ok(all)
    }

    async fn pending_bells(&self) -> Result<Vec<BellRecord>> {
        let mut all: Vec<BellRecord> = self
            .scan_decoded::<BellRecord>(&self.buckets.bells, ">")
            .await?
            .into_iter()
            .map(|(_, b)| b)
            .filter(|b| !b.state.is_final())
            .collect();
        all.sort_by_key(|b| b.id);
        Ok(all)
    }

    async fn append_events(&self, events: &[EventRecord]) -> Result<()> {
        // Sent in order on one connection (the stream stores them in that
        // order) and acknowledged together. After a failure the rest is
        // sent again one by one with the same message ids: JetStream drops
        // what it already has. A retried event may land after a later one
        // of another connection; readers order a device's events by
        // generation.
        let msgs = events
            .iter()
            .map(|e| {
                let k = key(&e.device);
                let id = format!("ev-{k}-{}-{:?}-{}-{}", e.generation, e.kind, e.reason, e.at_ms);
                Ok((format!("{EVENTS_PREFIX}.{k}"), encode(e)?, id))
            })
            .collect::<Result<Vec<_>>>()?;
        // In chunks: the client holds at most 5,000 unacknowledged
        // publishes (a semaphore; a sender waits for a permit), so acks
        // must be awaited before more than that are sent.
        let mut failed = msgs.len();
        'chunks: for (c, chunk) in msgs.chunks(PIPELINE).enumerate() {
            let mut acks = Vec::with_capacity(chunk.len());
            for (i, (subject, payload, id)) in chunk.iter().enumerate() {
                let p = jetstream::message::PublishMessage::build().payload(payload.clone()).message_id(id.as_str());
                match self.js.send_publish(subject.clone(), p).await {
                    Ok(ack) => acks.push(ack),
                    Err(_) => {
                        failed = c * PIPELINE + i;
                        break;
                    }
                }
            }
            for (i, ack) in acks.into_iter().enumerate() {
                if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, ack).await, Ok(Ok(_))) {
                    failed = failed.min(c * PIPELINE + i);
                    break;
                }
            }
            if failed < msgs.len() {
                break 'chunks;
            }
        }
        for (subject, payload, id) in msgs.into_iter().skip(failed) {
            publish(&self.js, subject, payload, Some(id)).await?;
        }
        Ok(())
    }

    async fn events(&self, device: Option<&str>, since_ms: u64, limit: usize) -> Result<Vec<EventRecord>> {
        let filter = match device {
            Some(d) => format!("{EVENTS_PREFIX}.{}", key(d)),
            None => format!("{EVENTS_PREFIX}.>"),
        };
        let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let consumer = self
            .events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                ..Default::default()
            })
            .await
            .map_err(|e| err("reading events", e))?;
        let mut out = std::collections::VecDeque::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(vec![]);
        }
        let mut messages = consumer.messages().await.map_err(|e| err("reading events", e))?;
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next())
                .await
                .map_err(|_| StoreError::Unavailable("reading events timed out".into()))?;
            let Some(m) = next else { break };
            let m = m.map_err(|e| err("reading events", e))?;
            let pending = m.info().map(|i| i.pending).unwrap_or(0);
            if let Some(e) = self.decode::<EventRecord>(EVENTS, m.subject.as_str(), &m.payload) {
                if e.at_ms >= since_ms {
                    out.push_back(e);
                    if out.len() > limit {
                        out.pop_front();
                    }
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out.into())
    }

    async fn put_history(&self, buckets: &[(String, Bucket)]) -> Result<()> {
        let mut by_device: BTreeMap<&str, Vec<StoredBucket>> = BTreeMap::new();
        for (device, b) in buckets {
            by_device.entry(device.as_str()).or_default().push(StoredBucket::from(b));
        }
        let msgs = by_device
            .into_iter()
            .map(|(device, minutes)| {
                let k = key(device);
                let first = minutes.iter().map(StoredBucket::minute).min().unwrap_or(0);
                let last = minutes.iter().map(StoredBucket::minute).max().unwrap_or(0);
                let bytes = postcard::to_stdvec(&minutes).map_err(|e| err("encoding history", e))?;
                Ok((format!("{HISTORY_PREFIX}.{k}"), Bytes::from(bytes), Some(format!("h-{k}-{first}-{last}"))))
            })
            .collect::<Result<Vec<_>>>()?;
        self.publish_all(msgs).await
    }

    async fn history(&self, device: &str, since_minute: u32) -> Result<Vec<Bucket>> {
        // A round is published after its minutes ended, so messages from
        // before `since_minute` hold only older minutes.
        let start = time::OffsetDateTime::from_unix_timestamp(i64::from(since_minute) * 60)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let subject = format!("{HISTORY_PREFIX}.{}", key(device));
        let consumer = self
            .history
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                ..Default::default()
            })
            .await
            .map_err(|e| err("reading history", e))?;
        let mut minutes: BTreeMap<u32, StoredBucket> = BTreeMap::new();
        if consumer.cached_info().num_pending > 0 {
            let mut messages = consumer.messages().await.map_err(|e| err("reading history", e))?;
            loop {
                let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next())
                    .await
                    .map_err(|_| StoreError::Unavailable("reading history timed out".into()))?;
                let Some(m) = next else { break };
                let m = m.map_err(|e| err("reading history", e))?;
                let pending = m.info().map(|i| i.pending).unwrap_or(0);
                match postcard::from_bytes::<Vec<StoredBucket>>(&m.payload) {
                    Ok(round) => {
                        for b in round.into_iter().filter(|b| b.minute() >= since_minute) {
                            minutes.insert(b.minute(), b);
                        }
                    }
                    Err(e) => {
                        self.corrupt.fetch_add(1, Ordering::Relaxed);
                        warn!(stream = HISTORY, subject = %subject, error = %e, "skipping a record that does not decode");
                    }
                }
                if pending == 0 {
                    break;
                }
            }
        }
        Ok(minutes.into_values().map(Into::into).collect())
    }

    async fn prune(&self, _events_before_ms: u64, _history_before_minute: u32, _devices: &[String]) -> Result<usize> {
        // The stream's and buckets' max_age do it.
        Ok(0)
    }

    async fn next_id(&self) -> Result<u64> {
        self.counter("seq_id").await
    }

    fn instance_id(&self) -> String {
        self.instance.clone()
    }

    async fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()> {
        let msgs = entries
            .iter()
            .map(|e| {
                let stored = StoredOutbox { entry: e.clone(), lease_node: None, lease_until_ms: 0 };
                Ok((format!("$KV.{OUTBOX}.{}", bell_key(e.alert.id)), encode(&stored)?, None))
            })
            .collect::<Result<Vec<_>>>()?;
        self.publish_all(msgs).await
    }

    async fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        let mut rows: Vec<OutboxEntry> = self
            .scan_decoded::<StoredOutbox>(&self.buckets.outbox, ">")
            .await?
            .into_iter()
            .map(|(_, s)| s.entry)
            .collect();
        rows.sort_by_key(|e| e.alert.id);
        Ok(rows)
    }

    async fn lease_outbox(&self, id: u64, node: &str, until_ms: u64) -> Result<bool> {
        let now = crate::clock::now_ms();
        let got = self
            .cas(&self.buckets.outbox, &bell_key(id), |cur: Option<StoredOutbox>| {
                let cur = cur?;
                let held_by_other = cur.lease_node.as_deref().is_some_and(|n| n != node) && cur.lease_until_ms > now;
                (!held_by_other).then(|| StoredOutbox {
                    lease_node: Some(node.to_string()),
                    lease_until_ms: until_ms,
                    ..cur
                })
            })
            .await?;
        Ok(got.is_some())
    }

    async fn remove_outbox(&self, id: u64) -> Result<()> {
        let k = bell_key(id);
        self.buckets.outbox.purge(k.as_str()).await.map_err(|e| err(format!("deleting {OUTBOX}/{k}"), e))
    }

    async fn heartbeat(&self, node: &NodeRecord) -> Result<()> {
        let bytes = encode(node)?;
        self.client
            .publish(format!("{HEARTBEAT_PREFIX}.{}", node.id), bytes.clone())
            .await
            .map_err(|e| err("publishing the heartbeat", e))?;
        // Also kept in a bucket, so `cluster` knows nodes that are gone
        // (every NODE_RECORD_EVERY: a replicated write, watched by every
        // node; liveness goes by the core NATS heartbeat above); best
        // effort, never waited for.
        let now = crate::clock::now_ms();
        let last = self.node_record_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < NODE_RECORD_EVERY.as_millis() as u64 {
            return Ok(());
        }
        self.node_record_ms.store(now, Ordering::Relaxed);
        let js = self.js.clone();
        let subject = format!("$KV.{NODES}.{}", node.id);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, js.publish(subject, bytes)).await;
        });
        Ok(())
    }

    async fn check(&self) -> Result<()> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StoreError::Unavailable("not connected to NATS".into()));
        }
        // Answered by the JetStream meta leader: fails without a quorum
        // (a server cut off from the others).
        match tokio::time::timeout(Duration::from_secs(2), self.js.query_account()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("JetStream: {e}"))),
            Err(_) => Err(StoreError::Unavailable("JetStream did not answer".into())),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        Ok(self.scan_decoded::<NodeRecord>(&self.buckets.nodes, ">").await?.into_iter().map(|(_, n)| n).collect())
    }

    fn changes(&self) -> Option<mpsc::Receiver<Change>> {
        let rx = self.changes.lock().expect("changes lock").take()?;
        let tx = self.watch_tx.lock().expect("changes lock").take()?;
        let b = self.buckets.clone();
        let corrupt = self.corrupt.clone();
        let c = corrupt.clone();
        spawn_watch(b.enrolments, tx.clone(), None, move |e| match e.operation {
            kv::Operation::Put => decode_counted(&c, ENROLMENTS, &e.key, &e.value).map(Change::Enrolled),
            _ => Some(Change::Removed(device_of(&e.key))),
        });
        let c = corrupt.clone();
        spawn_watch(b.devices, tx.clone(), None, move |e| match e.operation {
            kv::Operation::Put => {
                decode_counted(&c, DEVICES, &e.key, &e.value).map(|r| Change::Device(device_of(&e.key), r))
            }
            _ => None,
        });
        let c = corrupt.clone();
        spawn_watch(b.owners, tx.clone(), None, move |e| match e.operation {
            kv::Operation::Put => {
                decode_counted(&c, OWNERS, &e.key, &e.value).map(|o| Change::Owner(device_of(&e.key), o))
            }
            _ => None,
        });
        let c = corrupt.clone();
        spawn_watch(b.bells, tx.clone(), None, move |e| match e.operation {
            kv::Operation::Put => decode_counted(&c, BELLS, &e.key, &e.value).map(Change::Bell),
            _ => None,
        });
        let c = corrupt.clone();
        spawn_watch(b.nodes, tx.clone(), Some(WATCH_QUIET), move |e| match e.operation {
            kv::Operation::Put => decode_counted(&c, NODES, &e.key, &e.value).map(Change::Node),
            _ => None,
        });
        let client = self.client.clone();
        tokio::spawn(async move {
            // The subscription is restored by the client after a reconnect.
            let mut sub = loop {
                match client.subscribe(format!("{HEARTBEAT_PREFIX}.*")).await {
                    Ok(s) => break s,
                    Err(e) => {
                        warn!(error = %e, "cannot subscribe to heartbeats; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            while let Some(m) = sub.next().await {
                if let Some(n) = decode_counted(&corrupt, "heartbeat", m.subject.as_str(), &m.payload) {
                    if tx.send(Change::Node(n)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let _ = &self.node;
        Some(rx)
    }

    fn corrupt_records(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<()> {
        self.client.flush().await.map_err(|e| err("flushing NATS", e))
    }
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore").field("instance", &self.instance).field("node", &self.node).finish()
    }
}
