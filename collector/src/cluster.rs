//! Cluster mode: what a collector does beyond serving its own devices when
//! several share one fleet through the store ([`crate::store::NatsStore`]).
//!
//! - **Changes from other nodes**: the store's watches feed every enrolment,
//!   device record, connection owner and bell change into this node's
//!   fleet and bells, so every node answers `status`, `show`, `bells`,
//!   `--wait`, `/metrics` and the dashboard for the whole fleet, and the
//!   node holding a device's connection sees bells rung anywhere.
//! - **Heartbeat**: every `lost_after / 16` the node sends its heartbeat on
//!   core NATS (not JetStream: a stream leader election must not look like
//!   a dead node), and every `lost_after / 8` checks that it can use the
//!   store ([`Store::check`]: connected, and JetStream has a quorum).
//! - **Fencing**: a node whose check has failed for `5/8 · lost_after` is
//!   cut off: it closes its devices with 1013 ("try again later") and
//!   refuses new ones until the check passes again. Other nodes wait the
//!   full `lost_after` before declaring it lost, so two nodes never both
//!   own one device.
//! - **Lost nodes**: a node whose heartbeat has not arrived for `lost_after`
//!   (measured on this node's own clock, so clock skew between machines
//!   does not matter) is lost, provided this node itself has been healthy
//!   all that time and hears its own heartbeat (otherwise the silence may
//!   be its own). Each of the lost node's devices is declared offline with
//!   `collector_lost` by whichever node wins the compare-and-set that ends
//!   its connection ([`Store::release`]), unless the device is already back
//!   on another node with a newer generation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pulsebell_proto::close;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bells::Bells;
use crate::clock::now_ms;
use crate::fleet::Fleet;
use crate::gateway::Gateway;
use crate::store::{Change, NodeRecord, Reason, Store};

/// A node in `cluster --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Device connections it holds.
    pub devices: u64,
    /// Its last heartbeat, RFC 3339.
    pub last_heartbeat: String,
    /// `alive` or `lost`.
    pub state: String,
    /// Its device endpoint.
    pub device_addr: Option<String>,
}

/// What this node knows of the others, shared with the admin API.
pub struct Membership {
    me: String,
    nodes: std::sync::Mutex<HashMap<String, Seen>>,
    /// Since when this node has passed its store check without a break.
    healthy_since: std::sync::Mutex<Option<Instant>>,
}

struct Seen {
    record: NodeRecord,
    /// When this node last saw the heartbeat change (its own clock).
    changed: Instant,
}

impl Membership {
    /// Membership as seen by node `me`.
    pub fn new(me: &str) -> Membership {
        Membership { me: me.to_string(), nodes: Default::default(), healthy_since: Default::default() }
    }

    fn set_healthy(&self, healthy: bool) {
        let mut since = self.healthy_since.lock().expect("membership lock");
        match (healthy, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    /// Whether this node can judge others: healthy for `span`, and its own
    /// heartbeat came back within `echo`.
    fn can_judge(&self, span: Duration, echo: Duration) -> bool {
        let healthy = self.healthy_since.lock().expect("membership lock").is_some_and(|t| t.elapsed() >= span);
        let heard =
            self.nodes.lock().expect("membership lock").get(&self.me).is_some_and(|s| s.changed.elapsed() < echo);
        healthy && heard
    }

    fn observe(&self, n: NodeRecord) {
        let mut nodes = self.nodes.lock().expect("membership lock");
        match nodes.get_mut(&n.id) {
            // Only a newer heartbeat counts (the bucket's copy may lag).
            Some(seen) if (n.started_ms, n.seq) <= (seen.record.started_ms, seen.record.seq) => {}
            Some(seen) => {
                seen.record = n;
                seen.changed = Instant::now();
            }
            None => {
                nodes.insert(n.id.clone(), Seen { record: n, changed: Instant::now() });
            }
        }
    }

    /// Nodes whose heartbeat has not changed for `lost_after`.
    fn lost(&self, lost_after: Duration) -> Vec<String> {
        let nodes = self.nodes.lock().expect("membership lock");
        nodes.iter().filter(|(_, s)| s.changed.elapsed() >= lost_after).map(|(id, _)| id.clone()).collect()
    }

    /// Every node known, for `cluster`.
    pub fn views(&self, lost_after: Duration) -> Vec<NodeView> {
        let nodes = self.nodes.lock().expect("membership lock");
        let mut out: Vec<NodeView> = nodes
            .values()
            .map(|s| NodeView {
                id: s.record.id.clone(),
                devices: s.record.devices,
                last_heartbeat: crate::clock::rfc3339(s.record.heartbeat_ms),
                state: if s.changed.elapsed() >= lost_after { "lost" } else { "alive" }.to_string(),
                device_addr: s.record.device_addr.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Nodes alive now.
    pub fn alive(&self, lost_after: Duration) -> usize {
        self.nodes.lock().expect("membership lock").values().filter(|s| s.changed.elapsed() < lost_after).count()
    }
}

/// Runs the cluster duties until shutdown.
pub async fn run(
    gw: Arc<Gateway>,
    membership: Arc<Membership>,
    changes: mpsc::Receiver<Change>,
    lost_after: Duration,
    device_addr: String,
    shutdown: watch::Receiver<bool>,
) {
    let started_ms = now_ms();
    let feed = tokio::spawn(apply_changes(gw.fleet.clone(), gw.bells.clone(), membership.clone(), changes));
    let beat =
        tokio::spawn(heartbeat(gw.clone(), membership.clone(), lost_after, started_ms, device_addr, shutdown.clone()));
    let sweep = tokio::spawn(sweep_lost(gw.fleet.clone(), membership, lost_after, shutdown));
    let _ = beat.await;
    let _ = sweep.await;
    feed.abort();
}

async fn apply_changes(
    fleet: Arc<Fleet>,
    bells: Arc<Bells>,
    membership: Arc<Membership>,
    mut rx: mpsc::Receiver<Change>,
) {
    while let Some(change) = rx.recv().await {
        match &change {
            Change::Bell(b) => bells.apply(b.clone()).await,
            Change::Node(n) => membership.observe(n.clone()),
            Change::Resynced(what) => info!(what, "cluster watch resynchronized"),
            _ => fleet.apply(&change),
        }
    }
}

async fn heartbeat(
    gw: Arc<Gateway>,
    membership: Arc<Membership>,
    lost_after: Duration,
    started_ms: u64,
    device_addr: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let store: Arc<dyn Store> = gw.fleet.store().clone();
    let mut tick = tokio::time::interval(lost_after / 16);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Updated by the store checks, which run beside the ticks: a check
    // that hangs (a partition) must not delay the decision to fence.
    let last_ok = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut check: Option<tokio::task::JoinHandle<()>> = None;
    let mut fenced = false;
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        seq += 1;
        let record = NodeRecord {
            id: gw.fleet.node().to_string(),
            devices: gw.fleet.local_connections(),
            heartbeat_ms: now_ms(),
            started_ms,
            device_addr: Some(device_addr.clone()),
            seq,
        };
        if let Ok(Err(e)) = tokio::time::timeout(lost_after / 16, store.heartbeat(&record)).await {
            warn!(error = %e, "cannot send the heartbeat");
        }
        // The store check (a JetStream API request answered by the meta
        // leader) every other beat: fencing still starts within one beat
        // of 5/8 · lost_after.
        if seq % 2 == 1 && check.as_ref().is_none_or(|c| c.is_finished()) {
            let (store, membership, last_ok) = (store.clone(), membership.clone(), last_ok.clone());
            check = Some(tokio::spawn(async move {
                let result = tokio::time::timeout(lost_after / 4, store.check()).await;
                let healthy = matches!(result, Ok(Ok(())));
                membership.set_healthy(healthy);
                match result {
                    Ok(Ok(())) => *last_ok.lock().expect("last_ok lock") = Instant::now(),
                    Ok(Err(e)) => warn!(error = %e, "the cluster store is unavailable"),
                    Err(_) => warn!("the cluster store check timed out"),
                }
            }));
        }
        let since_ok = last_ok.lock().expect("last_ok lock").elapsed();
        if since_ok >= lost_after * 5 / 8 {
            membership.set_healthy(false);
            if !fenced {
                // Others will declare this node lost at `lost_after`: stop
                // owning devices before, so no device has two owners.
                fenced = true;
                gw.set_accepting(false);
                let closed = gw.fleet.close_all(
                    close::TRY_AGAIN_LATER,
                    "collector cut off from its cluster; try again later",
                    Reason::CollectorFenced,
                );
                warn!(devices = closed.len(), "cut off from the cluster: closed every device connection");
            }
        } else if fenced {
            info!("reconnected to the cluster: taking devices again");
            fenced = false;
            gw.set_accepting(true);
        }
    }
}

async fn sweep_lost(
    fleet: Arc<Fleet>,
    membership: Arc<Membership>,
    lost_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported: std::collections::HashSet<String> = Default::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let me = fleet.node().to_string();
        if !membership.can_judge(lost_after, lost_after / 2) {
            continue; // the silence may be this node's own
        }
        let lost: Vec<String> = membership.lost(lost_after).into_iter().filter(|n| *n != me).collect();
        for node in lost {
            let held = fleet.held_by(&node);
            if held.is_empty() {
                continue;
            }
            if reported.insert(node.clone()) {
                warn!(node, devices = held.len(), "collector lost: declaring its devices offline");
            }
            for (device, generation) in held {
                match fleet.store().release(&device, &node, generation, Reason::CollectorLost).await {
                    Ok(true) => fleet.ended_elsewhere(&device, generation, Reason::CollectorLost),
                    Ok(false) => {}
                    Err(e) => warn!(device, error = %e, "cannot end a lost collector's connection"),
                }
            }
        }
        reported.retain(|n| !fleet.held_by(n).is_empty());
    }
}
