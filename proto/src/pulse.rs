//! The pulse: a sequence number and one compact health sample.
//!
//! Every quantity is a fixed-point integer so postcard writes it as a short
//! varint: a typical pulse is about 35 bytes, at most 48 (see the size test).

use serde::{Deserialize, Serialize};

/// A periodic health report. `seq` counts up from 1 for the life of the agent
/// process, across reconnects, so the collector can count missed pulses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulse {
    /// Sequence number, starting at 1 when the agent starts.
    pub seq: u32,
    /// The sample.
    pub health: Health,
}

/// One health sample, in fixed-point units chosen for small varints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Busy CPU time since the previous sample, over all cores, in 0.1 %
    /// (0..=1000).
    pub cpu_permille: u16,
    /// Load average over 1 minute, in hundredths.
    pub load1_centi: u32,
    /// Load average over 5 minutes, in hundredths.
    pub load5_centi: u32,
    /// Load average over 15 minutes, in hundredths.
    pub load15_centi: u32,
    /// Total memory, KiB.
    pub mem_total_kib: u64,
    /// Used memory (total − available, page cache is not used), KiB.
    pub mem_used_kib: u64,
    /// Total swap, KiB.
    pub swap_total_kib: u64,
    /// Used swap, KiB.
    pub swap_used_kib: u64,
    /// Size of the root filesystem, MiB.
    pub disk_total_mib: u64,
    /// Used space on the root filesystem (size − available to users), MiB.
    pub disk_used_mib: u64,
    /// Highest temperature of any sensor, in 0.1 °C; `None` when the board has
    /// no sensor (never 0 for "unknown").
    pub temp_decicelsius: Option<i16>,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Received bytes per second over all non-loopback interfaces.
    pub net_rx_bps: u64,
    /// Sent bytes per second over all non-loopback interfaces.
    pub net_tx_bps: u64,
    /// Raspberry Pi throttling state; `None` off a Pi.
    pub throttled: Option<Throttled>,
}

impl Health {
    /// CPU usage in percent.
    pub fn cpu_percent(&self) -> f64 {
        f64::from(self.cpu_permille) / 10.0
    }
    /// Highest temperature in °C, if any sensor exists.
    pub fn temp_celsius(&self) -> Option<f64> {
        self.temp_decicelsius.map(|t| f64::from(t) / 10.0)
    }
}

/// The Raspberry Pi firmware's throttling flags, packed in one byte: the low
/// nibble is the state now, the high nibble what happened since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttled(pub u8);

impl Throttled {
    /// Under-voltage detected.
    pub const UNDER_VOLTAGE: u8 = 1 << 0;
    /// ARM frequency capped.
    pub const FREQ_CAPPED: u8 = 1 << 1;
    /// Currently throttled.
    pub const THROTTLED: u8 = 1 << 2;
    /// Soft temperature limit active.
    pub const SOFT_TEMP_LIMIT: u8 = 1 << 3;

    /// Decodes the value of the firmware's `get_throttled` (`vcgencmd
    /// get_throttled`): bits 0–3 are "now", bits 16–19 "since boot".
    pub fn from_firmware(raw: u32) -> Self {
        let now = (raw & 0xf) as u8;
        let since_boot = ((raw >> 16) & 0xf) as u8;
        Throttled(now | (since_boot << 4))
    }

    /// Whether `flag` (one of the constants) is set now.
    pub fn now(self, flag: u8) -> bool {
        self.0 & flag != 0
    }

    /// Whether `flag` (one of the constants) has been set since boot.
    pub fn since_boot(self, flag: u8) -> bool {
        (self.0 >> 4) & flag != 0
    }

    /// Whether anything is or was wrong.
    pub fn any(self) -> bool {
        self.0 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_bits() {
        // 0x50005: under-voltage and throttled now, and both since boot.
        let t = Throttled::from_firmware(0x50005);
        assert!(t.now(Throttled::UNDER_VOLTAGE));
        assert!(t.now(Throttled::THROTTLED));
        assert!(!t.now(Throttled::FREQ_CAPPED));
        assert!(t.since_boot(Throttled::UNDER_VOLTAGE));
        assert!(t.since_boot(Throttled::THROTTLED));
        assert!(!t.since_boot(Throttled::SOFT_TEMP_LIMIT));
        // 0x80000: soft temperature limit happened since boot only.
        let t = Throttled::from_firmware(0x80000);
        assert!(!t.now(Throttled::SOFT_TEMP_LIMIT));
        assert!(t.since_boot(Throttled::SOFT_TEMP_LIMIT));
        assert!(!Throttled::from_firmware(0).any());
    }
}
