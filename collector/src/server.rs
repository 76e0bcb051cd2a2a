//! Starting and stopping a collector: open the store, bind both listeners,
//! run the gateway, the admin API and the write-back loop, and shut down
//! gracefully.
//!
//! [`start`] returns once both listeners are bound (port 0 works: read the
//! bound addresses from [`Server`]), so tests and the demo run a real
//! collector in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pulsebell_proto::close;
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::alerts::Alerts;
use crate::bells::Bells;
use crate::clock::now_ms;
use crate::cluster::{self, Membership};
use crate::config::Config;
use crate::fleet::{writeback, Fleet};
use crate::gateway::{self, Gateway};
use crate::provision::Provisioning;
use crate::store::{NatsStore, Reason, SledStore, Store};
use crate::tls;

/// File in the data dir with the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File in the data dir describing the running collector (addresses, CA).
pub const RUN_FILE: &str = "run.json";

/// A running collector.
pub struct Server {
    /// Where devices connect.
    pub device_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// The generated dev CA, if one is in use.
    pub dev_ca: Option<PathBuf>,
    /// The admin token.
    pub admin_token: String,
    /// The fleet (for in-process users such as the demo).
    pub fleet: Arc<Fleet>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Reads or creates the admin token (mode 0600).
pub fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    tls::write_private(&path, format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// Opens the store the config asks for: sled in the data dir, or NATS
/// JetStream in cluster mode (retrying until the servers answer).
pub async fn open_store(config: &Config, node: &str) -> anyhow::Result<Arc<dyn Store>> {
    if config.cluster.enabled() {
        Ok(Arc::new(NatsStore::connect(&config.cluster, node, config.history_retention).await?))
    } else {
        Ok(Arc::new(SledStore::open(&config.data_dir.join("db"), config.sled_cache_mb * 1024 * 1024)?))
    }
}

/// Starts a collector with `config`.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let config = Arc::new(config);
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let token = admin_token(&data_dir)?;
    let tls = tls::load(&config.tls, &data_dir)?;
    let node = config.cluster.node_id();
    let store = open_store(&config, &node).await?;
    let changes = store.changes();
    let fleet = Fleet::load(config.clone(), node.clone(), store.clone()).await?;
    let bells = Bells::load(fleet.clone(), config.bell_ttl).await?;
    let alerts = Alerts::new(config.alerts.clone(), store.clone(), node.clone())?;

    let device_listener = bind_devices(config.listen, config.limits.accept_backlog)
        .with_context(|| format!("cannot listen for devices on {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen for the admin API on {}", config.admin_listen))?;
    let device_addr = device_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        warn!(%admin_addr, "the admin API listens beyond loopback; it is protected by the admin token only");
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let provisioning = Arc::new(Provisioning::new(fleet.clone(), tls.ca_fingerprint.clone()));
    let gw =
        Arc::new(Gateway::new(fleet.clone(), bells.clone(), provisioning.clone(), tls.config, config.limits.clone())?);
    let membership = Arc::new(Membership::new(&node));
    let cluster_task = changes.map(|changes| {
        tokio::spawn(cluster::run(
            gw.clone(),
            membership.clone(),
            changes,
            config.cluster.lost_after,
            device_addr.to_string(),
            shutdown_rx.clone(),
        ))
    });
    let (done_tx, done_rx) = mpsc::channel::<()>(1);
    let gateway_task = tokio::spawn(gateway::serve(gw.clone(), device_listener, shutdown_rx.clone(), done_tx));

    let rules = crate::rules::Rules::load(
        fleet.clone(),
        bells.clone(),
        config.cluster.enabled().then(|| (membership.clone(), config.cluster.lost_after)),
    )
    .await?;
    let rules_task = tokio::spawn(rules.clone().run(shutdown_rx.clone()));
    let admin_state = AdminState {
        fleet: fleet.clone(),
        bells: bells.clone(),
        rules,
        alerts: alerts.clone(),
        membership: config.cluster.enabled().then(|| membership.clone()),
        provisioning,
        token: Arc::new(token.clone()),
        pages: Arc::new(admin::dashboard::Pages::new(fleet.clone())),
    };
    let mut admin_shutdown = shutdown_rx.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin_listener, admin::router(admin_state))
            .with_graceful_shutdown(async move {
                let _ = admin_shutdown.changed().await;
            })
            .await
    });

    let write_back_task = tokio::spawn(write_back_loop(
        fleet.clone(),
        alerts.clone(),
        config.write_back,
        config.history_retention,
        shutdown_rx.clone(),
    ));
    restart_liveness(&fleet);
    let alerts_task = alerts.clone().map(|a| tokio::spawn(a.run(shutdown_rx.clone())));

    let run = serde_json::json!({
        "pid": std::process::id(),
        "node": node,
        "backend": store.backend(),
        "device_addr": device_addr.to_string(),
        "admin_url": format!("http://{admin_addr}"),
        "ca_file": tls.dev_ca.as_ref().map(|p| p.display().to_string()),
        "ca_fingerprint": tls.ca_fingerprint,
        "started_ms": now_ms(),
    });
    std::fs::write(data_dir.join(RUN_FILE), serde_json::to_vec_pretty(&run)?)?;

    let task = {
        let fleet = fleet.clone();
        let grace = config.shutdown_grace;
        let mut shutdown_rx = shutdown_rx;
        tokio::spawn(async move {
            let _ = shutdown_rx.changed().await;
            info!("shutting down: closing device connections");
            let _ = gateway_task.await;
            let closed = fleet.close_all(close::GOING_AWAY, "collector shutting down", Reason::CollectorShutdown);
            for (device, generation) in closed {
                let _ = fleet.store().release(&device, fleet.node(), generation, Reason::CollectorShutdown).await;
            }
            let mut done_rx = done_rx;
            if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
                warn!(?grace, "connections did not close within the grace period");
            }
            let _ = admin_task.await;
            let _ = rules_task.await;
            let _ = write_back_task.await;
            if let Some(t) = alerts_task {
                let _ = t.await;
            }
            if let Some(t) = cluster_task {
                let _ = t.await;
            }
            writeback::write_back_with(&fleet, alerts.as_deref(), true).await?;
            fleet.store().flush().await?;
            info!("shutdown complete");
            Ok(())
        })
    };

    Ok(Server { device_addr, admin_addr, dev_ca: tls.dev_ca, admin_token: token, fleet, shutdown: shutdown_tx, task })
}

impl Server {
    /// Stops gracefully and waits for the end.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await?
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        self.shutdown().await
    }
}

/// The device listener, with a deep accept queue: a reconnect storm
/// arrives as thousands of SYNs at once, and tokio's default backlog (128)
/// would drop most of them.
fn bind_devices(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Writes device state back every `period`, until shutdown; prunes old
/// events and history hourly.
async fn write_back_loop(
    fleet: Arc<Fleet>,
    alerts: Option<Arc<Alerts>>,
    period: Duration,
    history_retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention = Duration::from_secs(30 * 24 * 3600);
    let prune_every = (Duration::from_secs(3600).as_millis() / period.as_millis().max(1)) as u32;
    let mut since_prune = prune_every; // prune once at start
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = writeback::write_back(&fleet, alerts.as_deref()).await {
            warn!(error = %e, "write-back failed");
        }
        since_prune += 1;
        if since_prune >= prune_every {
            since_prune = 0;
            let events_before = now_ms().saturating_sub(retention.as_millis() as u64);
            let history_before = (now_ms().saturating_sub(history_retention.as_millis() as u64) / 60_000) as u32;
            if let Err(e) = fleet.store().prune(events_before, history_before, &fleet.ids()).await {
                warn!(error = %e, "pruning failed");
            }
        }
    }
}

/// After a restart, devices the store says were online are not shown
/// online (they are not connected); each gets its `offline` event when its
/// `offline_after` since the last pulse has passed, unless it reconnected.
fn restart_liveness(fleet: &Arc<Fleet>) {
    for (id, generation, at_ms) in fleet.stale_online() {
        let fleet = Arc::downgrade(fleet);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms()))).await;
            if let Some(fleet) = fleet.upgrade() {
                fleet.offline(&id, generation, Reason::Silent);
            }
        });
    }
}
