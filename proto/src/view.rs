//! Human-unit JSON views of wire values, shared by the agent's `health
//! --json`, the collector's admin API and its CLI, so the field names are
//! defined once.

use serde::{Deserialize, Serialize};

use crate::{Health, Throttled};

/// A [`Health`] sample in bytes, percent and °C.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthView {
    /// CPU busy, percent.
    pub cpu_percent: f64,
    /// Load averages.
    pub load1: f64,
    /// Load average over 5 minutes.
    pub load5: f64,
    /// Load average over 15 minutes.
    pub load15: f64,
    /// Total memory.
    pub mem_total_bytes: u64,
    /// Used memory (total − available).
    pub mem_used_bytes: u64,
    /// Total swap.
    pub swap_total_bytes: u64,
    /// Used swap.
    pub swap_used_bytes: u64,
    /// Root filesystem size.
    pub disk_total_bytes: u64,
    /// Root filesystem used.
    pub disk_used_bytes: u64,
    /// Highest temperature, `null` without a sensor.
    pub temp_celsius: Option<f64>,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Received bytes per second.
    pub net_rx_bytes_per_sec: u64,
    /// Sent bytes per second.
    pub net_tx_bytes_per_sec: u64,
    /// Raspberry Pi throttling, `null` off a Pi.
    pub throttled: Option<ThrottledView>,
}

/// [`Throttled`] as named booleans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ThrottledView {
    pub under_voltage_now: bool,
    pub freq_capped_now: bool,
    pub throttled_now: bool,
    pub soft_temp_limit_now: bool,
    pub under_voltage_since_boot: bool,
    pub freq_capped_since_boot: bool,
    pub throttled_since_boot: bool,
    pub soft_temp_limit_since_boot: bool,
}

impl ThrottledView {
    /// Short warnings for a table cell ("under-voltage!", "throttled (boot)").
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut out = vec![];
        let flags = [
            (self.under_voltage_now, self.under_voltage_since_boot, "under-voltage"),
            (self.freq_capped_now, self.freq_capped_since_boot, "freq-capped"),
            (self.throttled_now, self.throttled_since_boot, "throttled"),
            (self.soft_temp_limit_now, self.soft_temp_limit_since_boot, "soft-temp-limit"),
        ];
        for (now, since_boot, name) in flags {
            if now {
                out.push(name);
            } else if since_boot {
                out.push(match name {
                    "under-voltage" => "under-voltage(boot)",
                    "freq-capped" => "freq-capped(boot)",
                    "throttled" => "throttled(boot)",
                    _ => "soft-temp-limit(boot)",
                });
            }
        }
        out
    }
}

impl From<Throttled> for ThrottledView {
    fn from(t: Throttled) -> Self {
        ThrottledView {
            under_voltage_now: t.now(Throttled::UNDER_VOLTAGE),
            freq_capped_now: t.now(Throttled::FREQ_CAPPED),
            throttled_now: t.now(Throttled::THROTTLED),
            soft_temp_limit_now: t.now(Throttled::SOFT_TEMP_LIMIT),
            under_voltage_since_boot: t.since_boot(Throttled::UNDER_VOLTAGE),
            freq_capped_since_boot: t.since_boot(Throttled::FREQ_CAPPED),
            throttled_since_boot: t.since_boot(Throttled::THROTTLED),
            soft_temp_limit_since_boot: t.since_boot(Throttled::SOFT_TEMP_LIMIT),
        }
    }
}

impl From<&Health> for HealthView {
    fn from(h: &Health) -> Self {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * 1024;
        HealthView {
            cpu_percent: h.cpu_percent(),
            load1: f64::from(h.load1_centi) / 100.0,
            load5: f64::from(h.load5_centi) / 100.0,
            load15: f64::from(h.load15_centi) / 100.0,
            mem_total_bytes: h.mem_total_kib.saturating_mul(KIB),
            mem_used_bytes: h.mem_used_kib.saturating_mul(KIB),
            swap_total_bytes: h.swap_total_kib.saturating_mul(KIB),
            swap_used_bytes: h.swap_used_kib.saturating_mul(KIB),
            disk_total_bytes: h.disk_total_mib.saturating_mul(MIB),
            disk_used_bytes: h.disk_used_mib.saturating_mul(MIB),
            temp_celsius: h.temp_celsius(),
            uptime_secs: h.uptime_secs,
            net_rx_bytes_per_sec: h.net_rx_bps,
            net_tx_bytes_per_sec: h.net_tx_bps,
            throttled: h.throttled.map(ThrottledView::from),
        }
    }
}
