//! The highest temperature over all thermal zones and hwmon sensors.
//!
//! Boards expose their SoC sensor as a thermal zone, a hwmon device or both;
//! the hottest reading is what matters for an alert, so every sensor counts.

use std::fs;
use std::path::{Path, PathBuf};

use super::read_text;

/// Readings outside this range (millidegrees Celsius) are broken sensors or
/// error codes (some drivers report -273150 or 0x7fffffff), not temperatures.
const MIN_MILLI: i64 = -50_000;
const MAX_MILLI: i64 = 200_000;

/// Parses a sysfs temperature in millidegrees Celsius into 0.1 °C, rounded;
/// `None` when malformed or implausible.
pub(super) fn parse_millidegrees(s: &str) -> Option<i16> {
    let milli: i64 = s.trim().parse().ok()?;
    if !(MIN_MILLI..=MAX_MILLI).contains(&milli) {
        return None;
    }
    // In range, so the result fits i16 (±2000).
    Some((milli as f64 / 100.0).round() as i16)
}

/// Entries of `dir` whose name starts with `prefix`; empty when `dir` is
/// missing.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|e| e.path())
        .collect()
}

/// Whether `name` is a hwmon temperature input, `temp<N>_input`.
fn is_hwmon_temp(name: &str) -> bool {
    name.strip_prefix("temp")
        .and_then(|rest| rest.strip_suffix("_input"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Every temperature file under `root`'s thermal and hwmon classes.
fn sensor_files(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        entries(&root.join("sys/class/thermal"), "thermal_zone").into_iter().map(|zone| zone.join("temp")).collect();
    for hwmon in entries(&root.join("sys/class/hwmon"), "hwmon") {
        files.extend(
            entries(&hwmon, "temp")
                .into_iter()
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_hwmon_temp)),
        );
    }
    files
}

/// The highest plausible temperature in 0.1 °C, or `None` when the board has
/// no readable sensor (never 0, which would look like a real reading).
pub(super) fn max_temp(root: &Path) -> Option<i16> {
    let max = sensor_files(root)
        .iter()
        .filter_map(|p| {
            let t = parse_millidegrees(&read_text(p)?);
            if t.is_none() {
                tracing::debug!(path = %p.display(), "health: ignoring implausible temperature");
            }
            t
        })
        .max();
    if max.is_none() {
        tracing::debug!("health: no temperature sensor");
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    #[test]
    fn millidegrees_to_decicelsius() {
        assert_eq!(parse_millidegrees("51234\n"), Some(512));
        assert_eq!(parse_millidegrees("51250"), Some(513));
        assert_eq!(parse_millidegrees("-5260"), Some(-53));
        assert_eq!(parse_millidegrees("200000"), Some(2000));
        assert_eq!(parse_millidegrees("-50000"), Some(-500));
        assert_eq!(parse_millidegrees("200001"), None);
        assert_eq!(parse_millidegrees("-273150"), None);
        assert_eq!(parse_millidegrees("2147483647"), None);
        assert_eq!(parse_millidegrees("51.2"), None);
        assert_eq!(parse_millidegrees(""), None);
    }

    #[test]
    fn hwmon_temp_names() {
        assert!(is_hwmon_temp("temp1_input"));
        assert!(is_hwmon_temp("temp12_input"));
        assert!(!is_hwmon_temp("temp1_crit"));
        assert!(!is_hwmon_temp("temp_input"));
        assert!(!is_hwmon_temp("tempx_input"));
    }

    fn put(root: &Path, rel: &str, contents: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    #[test]
    fn max_over_zones_and_hwmon_ignoring_junk() {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        assert_eq!(max_temp(r), None);
        put(r, "sys/class/thermal/thermal_zone0/temp", "41000\n");
        put(r, "sys/class/thermal/cooling_device0/temp", "99000\n");
        put(r, "sys/class/thermal/thermal_zone1/temp", "250000\n");
        assert_eq!(max_temp(r), Some(410));
        put(r, "sys/class/hwmon/hwmon3/temp2_input", "62500\n");
        put(r, "sys/class/hwmon/hwmon3/temp2_crit", "105000\n");
        put(r, "sys/class/hwmon/hwmon3/temp1_input", "garbage\n");
        assert_eq!(max_temp(r), Some(625));
    }

    #[test]
    fn only_implausible_readings_is_none() {
        let dir = TempDir::new().unwrap();
        put(dir.path(), "sys/class/thermal/thermal_zone0/temp", "-274000\n");
        assert_eq!(max_temp(dir.path()), None);
    }
}
