//! One simulated device over the real uplink: the agent's [`Dialer`] (TCP
//! from a chosen loopback address, verified TLS, WebSocket upgrade with the
//! device token), a Hello, then a pulse every interval; bells are answered
//! the way the agent answers the built-in `ping` action. On a lost
//! connection it reconnects with the agent's backoff (full jitter).
//!
//! With several collector URLs (cluster mode) a device is connected to one
//! at a time and, like the agent with `collector_urls`, moves to the next
//! URL (round robin) after every failed attempt or ended session, using the
//! agent's own [`Endpoints`] ring.
//!
//! Per-device memory is what the connection needs plus a few words: the
//! id, the dialer (URL, token, shared TLS config) and a sequence number.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use pulsebell_agent::uplink::backoff::{Backoff, CAP, STABLE_AFTER};
use pulsebell_agent::uplink::endpoints::Endpoints;
use pulsebell_agent::uplink::{Dialer, WsStream};
use pulsebell_proto::{decode, encode, AgentMsg, Bell, BellReport, BellState, ServerMsg};
use rand::Rng;
use tokio::time::{interval_at, sleep, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, protocol::CloseFrame, Message};

use crate::fleet::{hello, pulse_bytes, Shared, Stop};

/// Runs device `idx` until the load generator stops, connected to one of
/// `dialers` at a time (one per collector URL, sharing the token).
pub async fn device(
    shared: Arc<Shared>,
    idx: usize,
    id: Box<str>,
    mut dialers: Endpoints<Dialer>,
    local: Option<IpAddr>,
) {
    let mut stop = shared.stop_rx();
    let mut backoff = Backoff::new(shared.backoff_base, CAP);
    let mut seq: u32 = 0;
    while !shared.stopping() {
        let attempt = tokio::select! {
            r = dialers.current().connect_from(local) => r,
            _ = stop.changed() => return,
        };
        let endpoint = dialers.index();
        match attempt {
            Ok(conn) => {
                shared.up(idx, endpoint);
                let started = Instant::now();
                let lost = session(&shared, idx, &id, conn.ws, conn.version, &mut seq, &mut stop).await;
                shared.down(idx, endpoint, lost);
                if started.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
            }
            Err(e) => shared.failed(e.kind()),
        }
        // As the agent does: the next attempt goes to the next collector
        // (the same one when there is only one).
        dialers.advance();
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// What the device answers to a bell: `ping` succeeds at once (as the
/// agent's built-in action does), anything else is not in its allowlist.
pub fn answer(bell: &Bell) -> BellReport {
    let (state, reason) = if bell.action == pulsebell_agent::actions::PING && bell.params.is_empty() {
        (BellState::Succeeded, None)
    } else if bell.action == pulsebell_agent::actions::PING {
        (BellState::Rejected, Some("`ping` takes no parameters".to_string()))
    } else {
        (BellState::Rejected, Some(format!("unknown action `{}`: not in this agent's allowlist", bell.action)))
    };
    BellReport { id: bell.id, state, exit_code: None, output: String::new(), duration_ms: 0, reason }
}

async fn send(ws: &mut WsStream, bytes: Vec<u8>) -> bool {
    ws.send(Message::Binary(bytes.into())).await.is_ok()
}

/// Handles one frame from the collector. `false` when the session is over.
async fn on_frame(shared: &Shared, ws: &mut WsStream, frame: Option<Result<Message, impl Sized>>) -> bool {
    match frame {
        None | Some(Err(_)) => false,
        Some(Ok(Message::Binary(bytes))) => {
            if let Ok(ServerMsg::Bell(bell)) = decode::<ServerMsg>(&bytes) {
                let read = crate::hops::unix_ms();
                let report = encode(&AgentMsg::BellReport(answer(&bell))).expect("a report always encodes");
                if !send(ws, report).await {
                    return false;
                }
                shared.bell_marks.record(bell.id, read, crate::hops::unix_ms());
                shared.bells_answered.fetch_add(1, Ordering::Relaxed);
            }
            true
        }
        Some(Ok(Message::Close(_))) => {
            // tungstenite queued the reply; let it go out.
            let _ = tokio::time::timeout(Duration::from_secs(2), async { while ws.next().await.is_some() {} }).await;
            false
        }
        // Pings are answered by tungstenite.
        Some(Ok(_)) => true,
    }
}

/// One session; `true` when it was lost (not closed by us).
async fn session(
    shared: &Shared,
    idx: usize,
    id: &str,
    mut ws: WsStream,
    version: u16,
    seq: &mut u32,
    stop: &mut Stop,
) -> bool {
    let hello = hello(id, idx, shared.hello_interval_ms(), version);
    let hello = encode(&AgentMsg::Hello(hello)).expect("a hello always encodes");
    if !send(&mut ws, hello).await {
        return true;
    }
    let lost = if shared.interval.is_zero() {
        flood(shared, &mut ws, seq).await
    } else {
        steady(shared, &mut ws, seq, stop).await
    };
    if !lost {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "load generator done".into() };
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
    }
    lost
}

/// A pulse every interval, the first at a random point of the first
/// interval (a real fleet is not synchronised).
async fn steady(shared: &Shared, ws: &mut WsStream, seq: &mut u32, stop: &mut Stop) -> bool {
    let offset = rand::rng().random_range(Duration::ZERO..shared.interval);
    let mut tick = interval_at(Instant::now() + offset, shared.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if shared.pulsing() {
                    *seq = seq.wrapping_add(1).max(1);
                    if !send(ws, pulse_bytes(*seq)).await {
                        return true;
                    }
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            frame = ws.next() => {
                if !on_frame(shared, ws, frame).await {
                    return true;
                }
            }
            _ = stop.changed() => return false,
        }
    }
}

/// Pulses back to back, as fast as the socket takes them; frames from the
/// collector are handled between pulses.
async fn flood(shared: &Shared, ws: &mut WsStream, seq: &mut u32) -> bool {
    const BATCH: u64 = 64;
    let mut unsent_count = 0u64;
    let lost = loop {
        if shared.stopping() {
            break false;
        }
        if !shared.pulsing() {
            shared.sent.fetch_add(std::mem::take(&mut unsent_count), Ordering::Relaxed);
            tokio::select! {
                frame = ws.next() => if !on_frame(shared, ws, frame).await { break true },
                _ = sleep(Duration::from_millis(20)) => {}
            }
            continue;
        }
        while let Some(frame) = ws.next().now_or_never() {
            if !on_frame(shared, ws, frame).await {
                shared.sent.fetch_add(unsent_count, Ordering::Relaxed);
                return true;
            }
        }
        *seq = seq.wrapping_add(1).max(1);
        if !send(ws, pulse_bytes(*seq)).await {
            break true;
        }
        unsent_count += 1;
        if unsent_count == BATCH {
            shared.sent.fetch_add(BATCH, Ordering::Relaxed);
            unsent_count = 0;
        }
    };
    shared.sent.fetch_add(unsent_count, Ordering::Relaxed);
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_ping_like_the_agent() {
        let bell = Bell { id: 7, action: "ping".into(), params: vec![], timeout_ms: None };
        assert_eq!(answer(&bell).state, BellState::Succeeded);
        let bell = Bell { id: 8, action: "reboot".into(), params: vec![], timeout_ms: None };
        let r = answer(&bell);
        assert_eq!((r.id, r.state), (8, BellState::Rejected));
        let bell = Bell { id: 9, action: "ping".into(), params: vec![("a".into(), "b".into())], timeout_ms: None };
        assert_eq!(answer(&bell).state, BellState::Rejected);
    }
}
