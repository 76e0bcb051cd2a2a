//! State shared by every simulated device of this process: counters the
//! live line and the summary read, and the switches that stop pulsing and
//! close the connections.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use pulsebell_proto::{AgentMsg, Health, Hello, Pulse, Throttled};

/// Shared by every device task.
pub struct Shared {
    /// Pulse interval; zero floods (one pulse after the other, as fast as
    /// the socket takes them).
    pub interval: Duration,
    /// First backoff ceiling for reconnects (the agent's is 1 s).
    pub backoff_base: Duration,
    /// Devices with an open session now.
    pub connected: AtomicI64,
    /// Pulses written to a socket.
    pub sent: AtomicU64,
    /// Sessions opened.
    pub connects: AtomicU64,
    /// Sessions that ended before the load generator closed them.
    pub disconnects: AtomicU64,
    /// Bells answered.
    pub bells_answered: AtomicU64,
    /// When each bell's frame was read and its report written.
    pub bell_marks: crate::hops::DeviceMarks,
    /// Failed connection attempts by kind.
    pub failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Per device: whether it has a session now (bell targets).
    pub online: Vec<AtomicBool>,
    /// Sessions open now, per collector URL (in `--url` order).
    pub by_endpoint: Vec<AtomicI64>,
    /// While false, devices keep their connection but send no pulse.
    pub pulsing: AtomicBool,
    /// Set once: every device closes and its task ends.
    pub stopping: AtomicBool,
    stop: watch::Sender<bool>,
}

/// The stop signal as a device task waits for it.
pub type Stop = watch::Receiver<bool>;

impl Shared {
    /// State for `devices` devices spread over `endpoints` collector URLs.
    pub fn new(devices: usize, endpoints: usize, interval: Duration, backoff_base: Duration) -> Shared {
        Shared {
            interval,
            backoff_base,
            connected: AtomicI64::new(0),
            sent: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            bells_answered: AtomicU64::new(0),
            bell_marks: crate::hops::DeviceMarks::default(),
            failures: Mutex::new(BTreeMap::new()),
            online: (0..devices).map(|_| AtomicBool::new(false)).collect(),
            by_endpoint: (0..endpoints.max(1)).map(|_| AtomicI64::new(0)).collect(),
            pulsing: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            stop: watch::channel(false).0,
        }
    }

    /// A receiver of the stop signal.
    pub fn stop_rx(&self) -> Stop {
        self.stop.subscribe()
    }

    /// Tells every device to close and end.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.send_replace(true);
    }

    /// Counts a failed connection attempt.
    pub fn failed(&self, kind: &'static str) {
        *self.failures.lock().expect("failures lock").entry(kind).or_default() += 1;
    }

    /// A session of device `idx` opened, to the collector URL `endpoint`.
    pub fn up(&self, idx: usize, endpoint: usize) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.by_endpoint[endpoint].fetch_add(1, Ordering::Relaxed);
        self.online[idx].store(true, Ordering::Relaxed);
    }

    /// A session of device `idx` to `endpoint` ended; `lost` when the load
    /// generator did not end it.
    pub fn down(&self, idx: usize, endpoint: usize, lost: bool) {
        self.online[idx].store(false, Ordering::Relaxed);
        self.connected.fetch_sub(1, Ordering::Relaxed);
        self.by_endpoint[endpoint].fetch_sub(1, Ordering::Relaxed);
        if lost {
            self.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether pulses should be sent now.
    pub fn pulsing(&self) -> bool {
        self.pulsing.load(Ordering::Relaxed)
    }

    /// Whether devices should close and end.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The Hello interval: the real one, or 1 s while flooding (the
    /// protocol's bounds apply to the announcement, not to the rate).
    pub fn hello_interval_ms(&self) -> u32 {
        if self.interval.is_zero() {
            1000
        } else {
            u32::try_from(self.interval.as_millis()).unwrap_or(u32::MAX)
        }
    }
}

/// A Raspberry Pi 4's health, idle: the payload a real agent sends (the
/// same sample as `proto/examples/pulse_size.rs`, 36 bytes with a
/// five-digit sequence number).
pub fn pi_health() -> Health {
    Health {
        cpu_permille: 31,
        load1_centi: 8,
        load5_centi: 12,
        load15_centi: 9,
        mem_total_kib: 3_884_108,
        mem_used_kib: 412_336,
        swap_total_kib: 102_396,
        swap_used_kib: 0,
        disk_total_mib: 29_612,
        disk_used_mib: 4_730,
        temp_decicelsius: Some(462),
        uptime_secs: 264_117,
        net_rx_bps: 1_830,
        net_tx_bps: 912,
        throttled: Some(Throttled(0)),
    }
}

/// The encoded pulse `seq` (one binary frame).
pub fn pulse_bytes(seq: u32) -> Vec<u8> {
    pulsebell_proto::encode(&AgentMsg::Pulse(Pulse { seq, health: pi_health() })).expect("a pulse always encodes")
}

/// A Hello like a Raspberry Pi's agent sends, for device `id` (`idx` makes
/// its boot id), in protocol `version` (the connection's). Simulated
/// devices have no checks: they send plain pulses in every version.
pub fn hello(id: &str, idx: usize, interval_ms: u32, version: u16) -> Hello {
    Hello {
        protocol_version: version,
        device_id: id.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        boot_id: format!("6f1c2a9e-4b7d-4e0a-9c3f-{idx:012x}"),
        hostname: id.to_string(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.6.31+rpt-rpi-v8".into(),
        arch: "aarch64".into(),
        board_model: Some("Raspberry Pi 4 Model B Rev 1.4".into()),
        interval_ms,
        tags: vec!["loadgen".into()],
        actions: vec![pulsebell_agent::actions::PING.into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_is_as_big_as_a_real_agents() {
        // The size `pulse_size` prints for an idle Pi with seq 17280.
        assert_eq!(pulse_bytes(17_280).len(), 36);
    }
}
