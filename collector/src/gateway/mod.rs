//! The device gateway: TCP accept → TLS → WebSocket upgrade with token
//! authentication → one [`session`] per device connection.
//!
//! Limits, all from `[limits]` in the config: connections beyond
//! `max_connections` are dropped right after accept; TLS handshakes run
//! under `handshake_concurrency` permits so a reconnect storm queues instead
//! of starving connected devices; TLS + upgrade + Hello must finish within
//! `handshake_timeout`; failed authentications are throttled per source
//! address.

pub mod session;
mod threads;
pub mod tls;

use crate::auth;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use pulsebell_proto::provision::{Provisioned, DEVICE_ID_HEADER, PROVISION_PATH};
use pulsebell_proto::{close, subprotocol, subprotocol_version, WS_PATH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use crate::bells::Bells;
use crate::config::Limits;
use crate::fleet::{AuthError, Fleet};
use crate::provision::{Provisioning, Refusal};

/// Everything a connection needs, shared.
pub struct Gateway {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// Bells.
    pub bells: Arc<Bells>,
    /// Provisioning keys.
    pub provisioning: Arc<Provisioning>,
    /// TLS.
    pub tls: Arc<rustls::ServerConfig>,
    /// Limits.
    pub limits: Limits,
    /// Failed-auth throttle.
    pub throttle: auth::Throttle,
    connections: Arc<Semaphore>,
    handshakes: Semaphore,
    threads: threads::ConnectionThreads,
    /// False while this node is cut off from its cluster: new devices are
    /// refused with 1013.
    accepting: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// A gateway with the given parts.
    pub fn new(
        fleet: Arc<Fleet>,
        bells: Arc<Bells>,
        provisioning: Arc<Provisioning>,
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
    ) -> std::io::Result<Gateway> {
        Ok(Gateway {
            threads: threads::ConnectionThreads::start()?,
            throttle: auth::Throttle::new(limits.auth_failures_per_minute),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Semaphore::new(limits.handshake_concurrency),
            accepting: std::sync::atomic::AtomicBool::new(true),
            fleet,
            bells,
            provisioning,
            tls,
            limits,
        })
    }

    /// Whether new device connections are taken.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Starts or stops taking new device connections.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::Relaxed);
    }

    /// Connection `generation` of `device` ended for `reason`: offline in
    /// the fleet, and (cluster) given up in the store so no other node
    /// declares it lost.
    pub async fn ended(&self, device: &str, generation: u64, reason: crate::store::Reason) {
        if self.fleet.offline(device, generation, reason) {
            if let Err(e) = self.fleet.store().release(device, self.fleet.node(), generation, reason).await {
                debug!(device, generation, error = %e, "cannot release the connection in the store");
            }
        }
    }

    fn ws_config(&self) -> WebSocketConfig {
        // Small buffers: a pulse is ~40 bytes and a fleet is many sockets.
        // 512 B instead of 4 KiB saves ~4 KiB of RSS per connection (5k-device
        // hold) and still takes several pulses per read; larger frames grow
        // the buffer as needed (see BENCHMARKS.md, "Fleet scale").
        WebSocketConfig::default()
            .read_buffer_size(512)
            .write_buffer_size(0)
            .max_write_buffer_size(self.limits.max_message_size * 4)
            .max_message_size(Some(self.limits.max_message_size))
            .max_frame_size(Some(self.limits.max_message_size))
    }
}

/// Accepts device connections until `shutdown` turns true. Each connection
/// task holds a clone of `done`; the caller waits for all of them to drop.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let mut refused_logged = Instant::now() - std::time::Duration::from_secs(60);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = gw.connections.clone().try_acquire_owned() else {
            gw.fleet.stats.handshake_failed("max_connections");
            if refused_logged.elapsed().as_secs() >= 10 {
                warn!(max = gw.limits.max_connections, "connection limit reached; refusing new connections");
                refused_logged = Instant::now();
            }
            drop(tcp);
            continue;
        };
        // The connection moves to a connection thread: its socket is
        // registered with that thread's own event loop (threads.rs).
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand the connection to a connection thread");
                continue;
            }
        };
        let task_gw = gw.clone();
        let shutdown = shutdown.clone();
        let done = done.clone();
        gw.threads.spawn(async move {
            let gw = task_gw;
            let Ok(tcp) = TcpStream::from_std(tcp) else {
                return;
            };
            gw.fleet.stats.connections.fetch_add(1, Ordering::Relaxed);
            // The opening (TLS, upgrade, Hello, registration) runs boxed, on
            // the heap only while it lasts (the TLS-accept and upgrade state
            // alone is ~9 KB); the task keeps only the loop that follows
            // (`session::serve`, < 1 KB). Measured per connection task: 9,216 B
            // with everything inline, 2,176 B with only the TLS handshake
            // boxed, 1,104 B like this.
            if let Some(live) = Box::pin(open(&gw, tcp, peer, shutdown)).await {
                session::serve(&gw, live).await;
            }
            gw.fleet.stats.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            drop(done);
        });
    }
}

/// Why a handshake failed, for logs and metrics.
fn failure(gw: &Gateway, peer: SocketAddr, reason: &'static str, detail: impl std::fmt::Display) {
    gw.fleet.stats.handshake_failed(reason);
    info!(%peer, reason, "handshake failed: {detail}");
}

/// A device's upgraded connection, boxed: the stream (~1.5 KB) then sits
/// once on the heap, instead of inline in every future that takes it (an
/// async fn keeps its argument and the moved local: measured 6,408 B per
/// connection task before, with the stream counted three times).
type DeviceWs = Box<tokio_tungstenite::WebSocketStream<tls::TlsStream>>;

/// What a finished handshake leads to.
enum Upgraded {
    /// A device's session, with the protocol version negotiated.
    Device(DeviceWs, String, u16),
    /// A provisioning request: key and wanted device id.
    Provision(DeviceWs, String, String),
}

/// Handshake, then a device's session opening or a provisioning request.
async fn open(
    gw: &Gateway,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Option<session::Live> {
    let deadline = tokio::time::Instant::now() + gw.limits.handshake_timeout;
    match handshake(gw, tcp, peer, deadline).await? {
        Upgraded::Device(ws, device, version) => {
            debug!(%peer, device, version, "upgraded");
            session::open(gw, ws, device, version, peer, deadline, shutdown).await
        }
        Upgraded::Provision(ws, key, wanted) => {
            provision_device(gw, ws, peer, &key, &wanted).await;
            None
        }
    }
}

/// TLS, then the WebSocket upgrade with the token check; `None` after a
/// failure (logged and counted).
async fn handshake(gw: &Gateway, tcp: TcpStream, peer: SocketAddr, deadline: tokio::time::Instant) -> Option<Upgraded> {
    let _ = tcp.set_nodelay(true);
    // TLS under a concurrency limit: the expensive part of a reconnect storm.
    let tls = {
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, gw.handshakes.acquire()).await.map(|p| p.map(|_| ()))
        else {
            failure(gw, peer, "timeout", "waited too long for a handshake slot");
            return None;
        };
        match tokio::time::timeout_at(deadline, tls::accept(gw.tls.clone(), tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                failure(gw, peer, "tls", e);
                return None;
            }
            Err(_) => {
                failure(gw, peer, "timeout", "TLS handshake timed out");
                return None;
            }
        }
    };
    let mut device: Option<(String, u16)> = None;
    let mut provision: Option<(String, String)> = None;
    let mut refusal: Option<&'static str> = None;
    // tungstenite's callback signature fixes the error type.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let reject = |status: StatusCode, body: &str| {
            let mut r = ErrorResponse::new(Some(body.to_string()));
            *r.status_mut() = status;
            r
        };
        let path = req.uri().path();
        if path != WS_PATH && path != PROVISION_PATH {
            refusal = Some("not_found");
            return Err(reject(StatusCode::NOT_FOUND, "not found; devices connect to /v1/ws"));
        }
        let now = Instant::now();
        if gw.throttle.is_blocked(peer.ip(), now) {
            refusal = Some("throttled");
            return Err(reject(StatusCode::TOO_MANY_REQUESTS, "too many failed authentications; slow down"));
        }
        let token = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(auth::bearer);
        let id = if path == PROVISION_PATH {
            // Checked after the upgrade (the store decides); only the shape here.
            let wanted = req.headers().get(DEVICE_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
            let Some(key) = token.filter(|t| auth::parse_with(auth::PROVISION_PREFIX, t).is_some()) else {
                gw.throttle.record_failure(peer.ip(), now);
                refusal = Some("unauthorized");
                return Err(reject(StatusCode::UNAUTHORIZED, "missing or malformed provisioning key"));
            };
            if !pulsebell_proto::valid_device_id(wanted) {
                refusal = Some("bad_request");
                return Err(reject(StatusCode::BAD_REQUEST, "missing or invalid pulsebell-device-id header"));
            }
            provision = Some((key.to_string(), wanted.to_string()));
            String::new()
        } else {
            match token.map(|t| gw.fleet.authenticate(t)) {
                Some(Ok(id)) => id,
                Some(Err(AuthError::Invalid)) | Some(Err(AuthError::Malformed)) | None => {
                    gw.throttle.record_failure(peer.ip(), now);
                    refusal = Some("unauthorized");
                    return Err(reject(StatusCode::UNAUTHORIZED, "missing or invalid device token"));
                }
            }
        };
        // The newest version both sides speak: agents offer every version
        // they speak, so an agent of the previous version keeps working.
        let offered = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|p| subprotocol_version(p.trim()))
            .filter(|v| *v <= gw.limits.max_protocol_version)
            .max();
        let Some(version) = offered else {
            refusal = Some("subprotocol");
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "a pulsebell subprotocol this collector speaks (pulsebell.v1, pulsebell.v2) is required",
            ));
        };
        let name = subprotocol(version).expect("a version we speak");
        resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(name));
        device = Some((id, version));
        Ok(resp)
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(gw.ws_config()));
    let ws = match tokio::time::timeout_at(deadline, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let reason = refusal.unwrap_or("upgrade");
            failure(gw, peer, reason, e);
            return None;
        }
        Err(_) => {
            failure(gw, peer, "timeout", "WebSocket upgrade timed out");
            return None;
        }
    };
    if let Some((key, wanted)) = provision {
        return Some(Upgraded::Provision(Box::new(ws), key, wanted));
    }
    device.map(|(d, version)| Upgraded::Device(Box::new(ws), d, version))
}

/// A provisioning request after the upgrade: the token in one binary
/// frame and a normal close, or a 1008 close with the refusal.
async fn provision_device<S>(
    gw: &Gateway,
    mut ws: Box<tokio_tungstenite::WebSocketStream<S>>,
    peer: SocketAddr,
    key: &str,
    wanted: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    let (code, reason) = match gw.provisioning.redeem(key, wanted).await {
        Ok(token) => {
            info!(%peer, device = wanted, "device provisioned");
            let msg = Provisioned { device_id: wanted.to_string(), token };
            match pulsebell_proto::encode(&msg) {
                Ok(bytes) => {
                    let _ = ws.send(Message::Binary(bytes.into())).await;
                    (close::NORMAL, "provisioned".to_string())
                }
                Err(e) => (close::POLICY, e.to_string()),
            }
        }
        Err(r) => {
            if r != Refusal::Unavailable {
                gw.throttle.record_failure(peer.ip(), Instant::now());
            }
            gw.fleet.stats.handshake_failed("provision_refused");
            info!(%peer, device = wanted, reason = %r, "provisioning refused");
            let code = if r == Refusal::Unavailable { close::TRY_AGAIN_LATER } else { close::POLICY };
            (code, r.to_string())
        }
    };
    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), (*ws).close(Some(frame))).await;
}
