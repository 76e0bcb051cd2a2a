//! The same fleet over MQTT 3.1.1 over TLS (rumqttc with the same rustls
//! client config), for a side-by-side run against a broker such as
//! Mosquitto: each device connects with a keep-alive and a retained
//! last-will `offline` on `pb/ID/status`, publishes a retained `online`
//! there once connected, and then the same postcard pulse (QoS 0) on
//! `pb/ID/pulse` every interval. One subscriber consumes `pb/#`; the pulses
//! it receives are what the broker delivered ("accepted").
//!
//! rumqttc cannot bind a local address, so every connection comes from the
//! kernel's choice on one address: up to ~28k connections to one broker
//! port, enough for the 19k this machine allows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pulsebell_agent::uplink::backoff::{Backoff, CAP, STABLE_AFTER};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::time::{interval_at, sleep, Instant, MissedTickBehavior};

use crate::fleet::{pulse_bytes, Shared};

/// Broker address.
#[derive(Clone)]
pub struct Broker {
    /// Host name the certificate names.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS client config (the agent's, trusting the given CA).
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
}

impl Broker {
    fn options(&self, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(true);
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls.clone())));
        o
    }
}

fn kind(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::Io(_) => "tcp",
        ConnectionError::Tls(_) => "tls",
        ConnectionError::ConnectionRefused(_) => "refused",
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => "timeout",
        _ => "mqtt",
    }
}

/// Runs device `idx` until the load generator stops.
pub async fn device(shared: Arc<Shared>, idx: usize, id: Box<str>, broker: Broker) {
    let mut stop = shared.stop_rx();
    let status = format!("pb/{id}/status");
    let topic = format!("pb/{id}/pulse");
    let mut options = broker.options(&id);
    options.set_last_will(LastWill::new(status.clone(), "offline", QoS::AtLeastOnce, true));
    options.set_max_packet_size(4096, 4096);
    options.set_request_channel_capacity(4);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let mut backoff = Backoff::new(shared.backoff_base, CAP);
    let mut seq: u32 = 0;
    let mut since: Option<Instant> = None;
    let offset = rand::rng().random_range(Duration::ZERO..shared.interval.max(Duration::from_millis(1)));
    let mut tick = interval_at(Instant::now() + offset, shared.interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    shared.up(idx, 0);
                    since = Some(Instant::now());
                    let _ = client.try_publish(status.as_str(), QoS::AtLeastOnce, true, "online");
                }
                Ok(_) => {}
                Err(e) => {
                    match since.take() {
                        Some(at) => {
                            shared.down(idx, 0, true);
                            if at.elapsed() >= STABLE_AFTER {
                                backoff.reset();
                            }
                        }
                        None => shared.failed(kind(&e)),
                    }
                    let delay = backoff.next_delay(&mut rand::rng());
                    tokio::select! {
                        _ = sleep(delay) => {}
                        _ = stop.changed() => return,
                    }
                }
            },
            _ = tick.tick(), if since.is_some() => {
                if shared.pulsing() {
                    seq = seq.wrapping_add(1).max(1);
                    if client.try_publish(topic.as_str(), QoS::AtMostOnce, false, pulse_bytes(seq)).is_ok() {
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = stop.changed() => {
                if since.is_some() {
                    shared.down(idx, 0, false);
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while eventloop.poll().await.is_ok() {}
                    })
                    .await;
                }
                return;
            }
        }
    }
}

/// The subscriber that consumes every message; counts the pulses it
/// receives into `received` and sets `ready` once subscribed.
pub async fn subscriber(broker: Broker, received: Arc<AtomicU64>, ready: Arc<AtomicBool>, shared: Arc<Shared>) {
    let mut stop = shared.stop_rx();
    let mut options = broker.options("pb-subscriber");
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(options, 16);
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("pb/#", QoS::AtMostOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => ready.store(true, Ordering::Relaxed),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with("/pulse") {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}; reconnecting");
                    ready.store(false, Ordering::Relaxed);
                    sleep(Duration::from_millis(500)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}
