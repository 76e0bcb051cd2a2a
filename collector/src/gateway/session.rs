//! One device connection after the upgrade: Hello, then pulses and bell
//! reports in, bells and pings out, until it ends.
//!
//! A protocol violation closes this connection only, with a WebSocket
//! close code and a reason, logged once. Liveness: the device goes offline
//! when no pulse arrives for `offline_after` (a per-connection timer, so
//! detection costs the same for any fleet size), or when the connection
//! ends. Pings keep the connection alive; they do not keep the device
//! online.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use pulsebell_proto::{
    close, decode, encode, peek_hello_version, AgentMsg, DecodeError, ServerMsg, Welcome, OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{
    self,
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info};

use super::Gateway;
use crate::clock::now_ms;
use crate::fleet::{Outbound, Pulsed, Refused};
use crate::store::Reason;

/// Boxed, see `gateway::DeviceWs`.
type Ws = Box<WebSocketStream<super::tls::TlsStream>>;

/// A device may send this many times its announced pulse rate...
pub const RATE_FACTOR: f64 = 10.0;
/// ...plus a burst of this many messages (a reconnect with queued bell
/// reports, a few bells at once).
pub const RATE_BURST: f64 = 50.0;

/// A token bucket over one connection's messages.
struct RateLimit {
    tokens: f64,
    per_sec: f64,
    last: Instant,
}

impl RateLimit {
    fn new(interval: Duration) -> RateLimit {
        RateLimit { tokens: RATE_BURST, per_sec: RATE_FACTOR / interval.as_secs_f64(), last: Instant::now() }
    }

    /// Takes one message; false when over budget.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec).min(RATE_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How a session ended, and what that means for liveness.
struct End {
    /// Offline reason recorded for the device.
    reason: Reason,
    /// Close frame to send, if the collector is the one closing.
    close: Option<(u16, String)>,
}

impl End {
    fn closing(reason: Reason, code: u16, text: impl Into<String>) -> End {
        End { reason, close: Some((code, text.into())) }
    }
    fn gone() -> End {
        End { reason: Reason::Disconnected, close: None }
    }
}

fn decode_error_end(bytes: &[u8], e: DecodeError) -> End {
    if let Some(v) = peek_hello_version(bytes).filter(|v| !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(v)) {
        return End::closing(
            Reason::Disconnected,
            close::VERSION_MISMATCH,
            format!("unsupported protocol version {v}; this collector speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"),
        );
    }
    match e {
        DecodeError::TooLarge { .. } => End::closing(Reason::Disconnected, close::TOO_BIG, e.to_string()),
        _ => End::closing(Reason::Disconnected, close::INVALID_PAYLOAD, format!("invalid message: {e}")),
    }
}

fn read_error_end(e: tungstenite::Error) -> End {
    match e {
        tungstenite::Error::Capacity(c) => {
            End::closing(Reason::Disconnected, close::TOO_BIG, format!("message too big: {c}"))
        }
        tungstenite::Error::Protocol(p) => {
            End::closing(Reason::Disconnected, close::PROTOCOL, format!("protocol error: {p}"))
        }
        _ => End::gone(),
    }
}

async fn send_close(ws: &mut Ws, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes by the WebSocket spec.
    let mut text = reason.to_string();
    while text.len() > 123 {
        text.pop();
    }
    let frame = CloseFrame { code: CloseCode::from(code), reason: text.into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), (**ws).close(Some(frame))).await;
}

async fn send(ws: &mut Ws, msg: &ServerMsg) -> bool {
    match encode(msg) {
        Ok(bytes) => ws.send(Message::Binary(bytes.into())).await.is_ok(),
        Err(_) => false,
    }
}

/// A registered connection: what its loop needs from the opening.
pub struct Live {
    ws: Ws,
    device: String,
    /// Protocol version negotiated for the connection.
    version: u16,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    rx: crate::fleet::OutboundRx,
    generation: u64,
    interval: Duration,
    offline_after: Duration,
}

/// Opens the session of an authenticated connection of `device`: the Hello,
/// registration and welcome. `None` when the connection ended (closed and
/// accounted for). The caller runs it boxed, so that the connection's task
/// is sized for the loop that lasts (`serve`) rather than for this.
pub async fn open(
    gw: &Gateway,
    mut ws: Ws,
    device: String,
    version: u16,
    peer: SocketAddr,
    hello_deadline: Instant,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Live> {
    // 1. The Hello.
    let first = tokio::select! {
        r = tokio::time::timeout_at(hello_deadline, ws.next()) => r,
        _ = shutdown.changed() => {
            send_close(&mut ws, close::GOING_AWAY, "collector shutting down").await;
            return None;
        }
    };
    let hello = match first {
        Err(_) => Err(End::closing(Reason::Disconnected, close::PROTOCOL, "no Hello within the handshake timeout")),
        Ok(None) => Err(End::gone()),
        Ok(Some(Err(e))) => Err(read_error_end(e)),
        Ok(Some(Ok(Message::Binary(bytes)))) => match decode::<AgentMsg>(&bytes) {
            Ok(AgentMsg::Hello(h)) if h.protocol_version != version => Err(End::closing(
                Reason::Disconnected,
                close::VERSION_MISMATCH,
                format!(
                    "Hello says protocol version {} but the connection negotiated {version} (pulsebell.v{version})",
                    h.protocol_version
                ),
            )),
            Ok(AgentMsg::Hello(h)) if h.device_id != device => Err(End::closing(
                Reason::Disconnected,
                close::POLICY,
                format!("Hello names device `{}` but the token belongs to `{device}`", h.device_id),
            )),
            Ok(AgentMsg::Hello(h)) => Ok(h),
            Ok(AgentMsg::Pulse(_) | AgentMsg::CheckedPulse(..)) => {
                Err(End::closing(Reason::Disconnected, close::PROTOCOL, "Pulse before Hello"))
            }
            Ok(AgentMsg::BellReport(_)) => {
                Err(End::closing(Reason::Disconnected, close::PROTOCOL, "BellReport before Hello"))
            }
            Ok(AgentMsg::Checks(_)) => Err(End::closing(Reason::Disconnected, close::PROTOCOL, "Checks before Hello")),
            Ok(AgentMsg::Actions(_)) => {
                Err(End::closing(Reason::Disconnected, close::PROTOCOL, "Actions before Hello"))
            }
            Err(e) => Err(decode_error_end(&bytes, e)),
        },
        Ok(Some(Ok(Message::Text(_)))) => Err(End::closing(
            Reason::Disconnected,
            close::UNSUPPORTED_DATA,
            "text frames are not accepted; send binary postcard messages",
        )),
        Ok(Some(Ok(Message::Close(_)))) => Err(End::gone()),
        Ok(Some(Ok(_))) => Err(End::closing(Reason::Disconnected, close::PROTOCOL, "expected Hello")),
    };
    let hello = match hello {
        Ok(h) => h,
        Err(end) => {
            if let Some((code, reason)) = &end.close {
                info!(%peer, device, code, %reason, "closing connection");
                gw.fleet.stats.handshake_failed("protocol");
                send_close(&mut ws, *code, reason).await;
            }
            return None;
        }
    };

    // 2. Register, welcome, deliver pending bells.
    let interval = Duration::from_millis(u64::from(
        hello.interval_ms.clamp(pulsebell_proto::MIN_INTERVAL_MS, pulsebell_proto::MAX_INTERVAL_MS),
    ));
    let (tx, rx) = crate::fleet::outbound_queue(gw.limits.outbound_queue);
    if !gw.accepting() {
        gw.fleet.stats.handshake_failed("unavailable");
        send_close(&mut ws, close::TRY_AGAIN_LATER, "collector cut off from its cluster; try again later").await;
        return None;
    }
    // A generation newer than any other connection of this device, on any
    // node (cluster mode: a compare-and-set in JetStream).
    let floor = gw.fleet.generation_floor(&device);
    let generation = match gw.fleet.store().claim(&device, gw.fleet.node(), floor).await {
        Ok(g) => g,
        Err(e) => {
            info!(%peer, device, error = %e, "cannot claim the device's connection");
            gw.fleet.stats.handshake_failed("unavailable");
            send_close(&mut ws, close::TRY_AGAIN_LATER, "collector store unavailable; try again later").await;
            return None;
        }
    };
    let accepted = match gw.fleet.connect(&device, hello, tx, generation) {
        Ok(a) => a,
        Err(Refused::Revoked) => {
            info!(%peer, device, "device was revoked during the handshake");
            send_close(&mut ws, close::REVOKED, "device revoked").await;
            return None;
        }
        Err(Refused::Superseded) => {
            info!(%peer, device, generation, "a newer connection of the device exists");
            send_close(&mut ws, close::REPLACED, "replaced by a newer connection").await;
            return None;
        }
    };
    let generation = accepted.generation;
    info!(%peer, device, generation, "connected");
    let welcome = ServerMsg::Welcome(Welcome {
        protocol_version: version,
        server_time_ms: now_ms(),
        interval_ms: interval.as_millis() as u32,
        offline_after_ms: accepted.offline_after.as_millis() as u32,
        generation,
    });
    if !send(&mut ws, &welcome).await {
        gw.ended(&device, generation, Reason::Disconnected).await;
        return None;
    }
    {
        let bells = gw.bells.clone();
        let device = device.clone();
        tokio::spawn(async move { bells.on_connect(&device).await });
    }
    Some(Live { ws, device, version, peer, shutdown, rx, generation, interval, offline_after: accepted.offline_after })
}

/// The connection's loop: pulses and bell reports in, bells and pings out,
/// until it ends; then the close and the offline record.
pub async fn serve(gw: &Gateway, live: Live) {
    let Live { mut ws, device, version, peer, mut shutdown, rx, generation, interval, offline_after } = live;
    let mut rx = rx.into_stream();
    // 3. The loop. One timer per connection, aimed at the earlier of the
    // silence deadline and the next ping, on a coarse grid (see `Timer`).
    let mut silent_at = Instant::now() + offline_after;
    let mut armed = true;
    let mut ping_at = Instant::now() + interval * PING_AFTER_INTERVALS;
    let mut keepalives: u32 = 0;
    let grid = Timer::grid(interval);
    let timer = tokio::time::sleep_until(Timer::on_grid(ping_at.min(silent_at), grid));
    tokio::pin!(timer);
    let mut budget = RateLimit::new(interval);
    // Bell reports are recorded by a task of their own, in order: recording
    // one waits for the store, and the connection must keep reading, pinging
    // and obeying close requests meanwhile. Started with the first report:
    // most connections never carry one, and an idle task and its queue
    // would cost every connection a few KiB.
    let mut reporter: Option<Reporter> = None;
    // Whether this connection asked the agent to resend its checks and no
    // full report came yet.
    let mut resend_asked = false;
    let end = loop {
        tokio::select! {
            // Close requests (replaced, revoked, cut off) before anything else.
            biased;
            out = rx.next() => match out {
                Some(Outbound::Msg(msg)) => {
                    if !send(&mut ws, &msg).await {
                        break End::gone();
                    }
                    ping_at = Instant::now() + interval * PING_AFTER_INTERVALS;
                }
                Some(Outbound::Close(code, text, reason)) => break End::closing(reason, code, text.into_string()),
                None => break End::gone(),
            },
            _ = shutdown.changed() => break End::closing(Reason::CollectorShutdown, close::GOING_AWAY, "collector shutting down"),
            frame = ws.next() => match frame {
                None => break End::gone(),
                Some(Err(e)) => break read_error_end(e),
                Some(Ok(Message::Binary(bytes))) => {
                    gw.fleet.stats.bytes_received.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if !budget.take() {
                        gw.fleet.stats.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        break End::closing(Reason::RateLimited, close::POLICY, "rate_limited");
                    }
                    match decode::<AgentMsg>(&bytes) {
                        Ok(m) if m.since_version() > version => break End::closing(
                            Reason::Disconnected,
                            close::PROTOCOL,
                            format!("message of protocol version {} on a version {version} connection", m.since_version()),
                        ),
                        Ok(AgentMsg::Pulse(p)) => {
                            if gw.fleet.pulse(&device, generation, p, None) == Pulsed::Stale {
                                break End::closing(Reason::Disconnected, close::REPLACED, "replaced by a newer connection");
                            }
                            silent_at = Instant::now() + offline_after;
                            armed = true;
                        }
                        Ok(AgentMsg::CheckedPulse(p, digest)) => {
                            match gw.fleet.pulse(&device, generation, p, Some(digest)) {
                                Pulsed::Stale => break End::closing(Reason::Disconnected, close::REPLACED, "replaced by a newer connection"),
                                // Once per report: the agent answers with a full one.
                                Pulsed::ChecksDiffer if !resend_asked => {
                                    resend_asked = true;
                                    if !send(&mut ws, &ServerMsg::ResendChecks).await {
                                        break End::gone();
                                    }
                                }
                                Pulsed::ChecksDiffer | Pulsed::Accepted => {}
                            }
                            silent_at = Instant::now() + offline_after;
                            armed = true;
                        }
                        Ok(AgentMsg::Actions(actions)) => gw.fleet.action_info(&device, generation, actions),
                        Ok(AgentMsg::Checks(report)) => {
                            resend_asked &= !report.full;
                            gw.fleet.checks(&device, generation, report);
                        }
                        Ok(AgentMsg::BellReport(r)) => {
                            let reporter = reporter.get_or_insert_with(|| Reporter::start(gw, &device));
                            if reporter.tx.try_send(r).is_err() {
                                break End::closing(Reason::Disconnected, close::TRY_AGAIN_LATER, "too many bell reports pending; try again later");
                            }
                        }
                        Ok(AgentMsg::Hello(_)) => break End::closing(Reason::Disconnected, close::PROTOCOL, "second Hello on one connection"),
                        Err(e) => break decode_error_end(&bytes, e),
                    }
                }
                Some(Ok(Message::Text(_))) => break End::closing(
                    Reason::Disconnected,
                    close::UNSUPPORTED_DATA,
                    "text frames are not accepted; send binary postcard messages",
                ),
                Some(Ok(Message::Pong(payload))) => {
                    if let Ok(sent) = <[u8; 8]>::try_from(payload.as_ref()) {
                        let sent_us = u64::from_be_bytes(sent);
                        let rtt = now_us().saturating_sub(sent_us);
                        gw.fleet.rtt(&device, generation, Duration::from_micros(rtt));
                    }
                }
                Some(Ok(Message::Close(frame))) => break agent_closed(frame.as_ref()),
                Some(Ok(_)) => {}
            },

            () = &mut timer => {
                let now = Instant::now();
                if armed && now >= silent_at {
                    armed = false;
                    gw.fleet.offline(&device, generation, Reason::Silent);
                }
                // Keep the agent's silence timer fed (it gives up after
                // SILENCE_INTERVALS = 3 intervals without a word): a
                // keep-alive when nothing went out for two intervals. Every
                // RTT_EVERY-th one (the first included) is a ping, whose pong
                // measures the round trip; the others are unsolicited pongs,
                // which need no answer (RFC 6455 5.5.3): one frame on the
                // device's link instead of two, and nothing to read here.
                if now >= ping_at {
                    let frame = if keepalives.is_multiple_of(RTT_EVERY) {
                        Message::Ping(now_us().to_be_bytes().to_vec().into())
                    } else {
                        Message::Pong(Default::default())
                    };
                    keepalives = keepalives.wrapping_add(1);
                    if ws.send(frame).await.is_err() {
                        break End::gone();
                    }
                    ping_at = Instant::now() + interval * PING_AFTER_INTERVALS;
                }
            }

        }
        let next = Timer::on_grid(if armed { silent_at.min(ping_at) } else { ping_at }, grid);
        if next != timer.deadline() {
            timer.as_mut().reset(next);
        }
    };
    // Boxed: once per connection, and inline they would size the loop.
    if let Some((code, reason)) = &end.close {
        info!(%peer, device, generation, code, %reason, "closing connection");
        Box::pin(send_close(&mut ws, *code, reason)).await;
    } else {
        debug!(%peer, device, generation, "connection ended");
    }
    Box::pin(gw.ended(&device, generation, end.reason)).await;
    // Reports already received are still recorded, after the close (it must
    // not wait on a store that may be unreachable; the agent's journal
    // would re-send them anyway).
    if let Some(Reporter { tx, task }) = reporter {
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
}

/// The collector pings a device after this many intervals in which it sent
/// it nothing (the agent gives up after 3).
const PING_AFTER_INTERVALS: u32 = 2;

/// One keep-alive in this many is a ping (the round trip is measured); the
/// others are unsolicited pongs. At a 10 s interval a quiet device's RTT is
/// refreshed every minute.
const RTT_EVERY: u32 = 3;

/// Connection timers on a coarse grid: a deadline is rounded up to the
/// next multiple of a grid step (an eighth of the interval, at most 50 ms)
/// counted from one process-wide origin, so the timers of many connections
/// fall due together and wake their thread once, instead of one wake-up per
/// device per interval (the ping tick was as many wake-ups as pulses). A
/// coarser step makes bursts: at 250 ms a quarter second's pings went out at
/// once and bells waiting behind them saw p99 15-26 ms instead of 8.
struct Timer;

impl Timer {
    fn grid(interval: Duration) -> Duration {
        (interval / 8).clamp(Duration::from_millis(1), Duration::from_millis(50))
    }

    fn on_grid(deadline: Instant, grid: Duration) -> Instant {
        crate::clock::on_grid(deadline, grid)
    }
}

/// The task recording one connection's bell reports, in order.
struct Reporter {
    tx: mpsc::Sender<pulsebell_proto::BellReport>,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    fn start(gw: &Gateway, device: &str) -> Reporter {
        let (tx, mut rx) = mpsc::channel::<pulsebell_proto::BellReport>(64);
        let bells = gw.bells.clone();
        let device = device.to_string();
        let task = tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                bells.on_report(&device, r).await;
            }
        });
        Reporter { tx, task }
    }
}

/// The agent closed the connection: a goodbye (1001) is a planned stop (or
/// a reboot bell's), anything else a disconnect.
fn agent_closed(frame: Option<&CloseFrame>) -> End {
    match frame {
        Some(f) if u16::from(f.code) == close::GOING_AWAY => {
            let reason =
                if f.reason.starts_with(close::REBOOTING_PREFIX) { Reason::Rebooting } else { Reason::AgentStopped };
            End { reason, close: None }
        }
        _ => End::gone(),
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn timers_round_up_to_a_shared_grid() {
        let grid = Timer::grid(Duration::from_secs(10));
        assert_eq!(grid, Duration::from_millis(50));
        assert_eq!(Timer::grid(Duration::from_millis(200)), Duration::from_millis(25));
        let now = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        for ms in 0..1000u64 {
            let deadline = now + Duration::from_millis(10_000 + ms);
            let due = Timer::on_grid(deadline, grid);
            assert!(due >= deadline, "never earlier than asked");
            assert!(due - deadline < grid, "at most one step later");
            seen.insert(due);
        }
        // A second of deadlines falls due at 20 or 21 instants.
        assert!(seen.len() <= 21, "{} distinct wake-ups", seen.len());
        assert_eq!(Timer::on_grid(*seen.iter().next().unwrap(), grid), *seen.iter().next().unwrap(), "stable");
    }
}
