//! Raspberry Pi under-voltage and throttling.
//!
//! Raspberry Pi OS kernels expose the firmware's `get_throttled` word, which
//! has both "now" and "since boot" bits. Mainline kernels only have the
//! `rpi_volt` hwmon device, whose alarm says "under-voltage now"; the caller
//! keeps the since-boot bit sticky so a brief brown-out between two samples
//! is not forgotten at the next one.

use std::fs;
use std::path::{Path, PathBuf};

use pulsebell_proto::Throttled;

use super::read_text;

const FIRMWARE: &str = "sys/devices/platform/soc/soc:firmware/get_throttled";

/// Parses the firmware word, hex with or without `0x` (`0x50005`, `50005`).
pub(super) fn parse_get_throttled(s: &str) -> Option<u32> {
    let s = s.trim();
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    if hex.is_empty() || hex.starts_with('+') {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// Parses a hwmon alarm file: `0` clear, anything else set.
pub(super) fn parse_alarm(s: &str) -> Option<bool> {
    s.trim().parse::<u32>().ok().map(|v| v != 0)
}

/// The `hwmon*` directory whose `name` is `rpi_volt`, if any.
fn find_rpi_volt(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root.join("sys/class/hwmon"))
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("hwmon")))
        .map(|e| e.path())
        .find(|dir| fs::read_to_string(dir.join("name")).is_ok_and(|name| name.trim() == "rpi_volt"))
}

/// Reads the throttling state, or `None` off a Raspberry Pi.
/// `under_voltage_seen` is the sampler's sticky since-boot flag for the
/// `rpi_volt` fallback.
pub(super) fn read(root: &Path, under_voltage_seen: &mut bool) -> Option<Throttled> {
    let firmware = root.join(FIRMWARE);
    if let Some(text) = read_text(&firmware) {
        match parse_get_throttled(&text) {
            Some(raw) => return Some(Throttled::from_firmware(raw)),
            None => tracing::debug!(value = text.trim(), "health: malformed get_throttled"),
        }
    }

    let Some(dir) = find_rpi_volt(root) else {
        tracing::debug!("health: no throttling source (not a Raspberry Pi)");
        return None;
    };
    // An unreadable alarm on a board that has the sensor is "not alarmed now",
    // but the board is still a Pi, so the since-boot flag is still reported.
    let now = read_text(&dir.join("in0_lcrit_alarm")).and_then(|t| parse_alarm(&t)).unwrap_or(false);
    *under_voltage_seen |= now;
    Some(from_alarm(now, *under_voltage_seen))
}

/// Builds the flags from the `rpi_volt` alarm and the sticky flag.
fn from_alarm(now: bool, since_boot: bool) -> Throttled {
    let mut bits = 0;
    if now {
        bits |= Throttled::UNDER_VOLTAGE;
    }
    if since_boot {
        bits |= Throttled::UNDER_VOLTAGE << 4;
    }
    Throttled(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    #[test]
    fn firmware_word_with_and_without_prefix() {
        assert_eq!(parse_get_throttled("0x50005\n"), Some(0x50005));
        assert_eq!(parse_get_throttled("50005"), Some(0x50005));
        assert_eq!(parse_get_throttled("0X8000a\n"), Some(0x8000a));
        assert_eq!(parse_get_throttled("0"), Some(0));
        assert_eq!(parse_get_throttled(""), None);
        assert_eq!(parse_get_throttled("0x"), None);
        assert_eq!(parse_get_throttled("+5"), None);
        assert_eq!(parse_get_throttled("throttled=0x5"), None);
        assert_eq!(parse_get_throttled("0x123456789"), None);
    }

    #[test]
    fn alarm_values() {
        assert_eq!(parse_alarm("1\n"), Some(true));
        assert_eq!(parse_alarm("0\n"), Some(false));
        assert_eq!(parse_alarm("x"), None);
    }

    #[test]
    fn alarm_flags_match_firmware_layout() {
        // The fallback must decode like the firmware word with bits 0 and 16.
        assert_eq!(from_alarm(true, true), Throttled::from_firmware(0x10001));
        assert_eq!(from_alarm(false, true), Throttled::from_firmware(0x10000));
        assert_eq!(from_alarm(false, false), Throttled::default());
    }

    fn put(root: &Path, rel: &str, contents: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    #[test]
    fn firmware_wins_over_rpi_volt_and_malformed_falls_back() {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        let mut seen = false;
        assert_eq!(read(r, &mut seen), None);

        put(r, "sys/class/hwmon/hwmon0/name", "cpu_thermal\n");
        put(r, "sys/class/hwmon/hwmon2/name", "rpi_volt\n");
        put(r, "sys/class/hwmon/hwmon2/in0_lcrit_alarm", "1\n");
        put(r, FIRMWARE, "0x80000\n");
        assert_eq!(read(r, &mut seen), Some(Throttled::from_firmware(0x80000)));
        assert!(!seen);

        put(r, FIRMWARE, "junk\n");
        assert_eq!(read(r, &mut seen), Some(Throttled::from_firmware(0x10001)));
        assert!(seen);
    }

    #[test]
    fn hwmon_without_rpi_volt_is_not_a_pi() {
        let dir = TempDir::new().unwrap();
        put(dir.path(), "sys/class/hwmon/hwmon0/name", "rpi_voltage_other\n");
        put(dir.path(), "sys/class/hwmon/hwmon0/in0_lcrit_alarm", "1\n");
        let mut seen = false;
        assert_eq!(read(dir.path(), &mut seen), None);
        assert!(!seen);
    }
}
