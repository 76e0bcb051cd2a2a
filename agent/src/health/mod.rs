//! Device health sampled from procfs and sysfs.
//!
//! Every path is resolved under a configurable root directory (`/` in
//! production) so tests can lay out a fake tree in a temporary directory. The
//! filesystem whose usage is reported is configured separately, because
//! `statvfs` needs a real mount point, not a file under the fake root.
//!
//! One file per source:
//! - `procfs`: CPU, load, memory and swap, uptime, network rates.
//! - `thermal`: the highest temperature over thermal zones and hwmon sensors.
//! - `throttle`: Raspberry Pi under-voltage and throttling flags.
//! - `disk`: root filesystem usage via `statvfs`.
//! - `facts`: the static [`SystemFacts`] sent once per connection.
//!
//! Sampling never fails: a missing or malformed source reports 0 (or `None`
//! for temperature and throttling) and logs at debug level, so one odd kernel
//! or board never stops the pulses.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pulsebell_proto::Health;
use serde_json::Value;

mod disk;
mod facts;
mod procfs;
mod thermal;
mod throttle;

pub use self::facts::{facts, SystemFacts};

/// Largest file read from procfs or sysfs. The files read are a few KiB at
/// most; the cap only keeps a bogus file from costing memory.
const MAX_READ: u64 = 1024 * 1024;

/// Reads a whole text file, replacing invalid UTF-8. Returns `None` (and logs
/// at debug level) when it cannot be read, which callers treat as "source
/// absent".
fn read_text(path: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|f| f.take(MAX_READ).read_to_end(&mut bytes)) {
        Ok(_) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "health: cannot read");
            None
        }
    }
}

/// Samples device health. Keeps the previous CPU and network counters because
/// both are reported as rates over the time between two samples, and a sticky
/// under-voltage flag for boards where the kernel only reports "now".
#[derive(Debug)]
pub struct Sampler {
    root: PathBuf,
    disk_path: PathBuf,
    prev_cpu: Option<procfs::CpuTimes>,
    prev_net: Option<BTreeMap<String, procfs::NetCounters>>,
    prev_at: Instant,
    under_voltage_seen: bool,
}

impl Sampler {
    /// Creates a sampler reading procfs/sysfs under `root` ("/" in
    /// production; tests pass a temporary directory laid out like `/`) and
    /// reporting the usage of the filesystem holding `disk_path`.
    ///
    /// Takes an initial CPU and network reading so the first [`sample`]
    /// already has a baseline to compute rates against.
    ///
    /// [`sample`]: Sampler::sample
    pub fn new(root: impl Into<PathBuf>, disk_path: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Sampler {
            prev_cpu: procfs::read_cpu(&root),
            prev_net: procfs::read_net(&root),
            prev_at: Instant::now(),
            disk_path: disk_path.into(),
            root,
            under_voltage_seen: false,
        }
    }

    /// Takes one sample. CPU and network rates cover the time since the
    /// previous sample (or since [`Sampler::new`]). Never fails or panics.
    pub fn sample(&mut self) -> Health {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.prev_at);
        self.sample_inner(elapsed, now)
    }

    /// Like [`Sampler::sample`], with the time since the previous sample
    /// given explicitly, so tests can check network rates exactly.
    pub fn sample_with_elapsed(&mut self, elapsed: Duration) -> Health {
        self.sample_inner(elapsed, Instant::now())
    }

    fn sample_inner(&mut self, elapsed: Duration, now: Instant) -> Health {
        let root = self.root.as_path();

        let cpu = procfs::read_cpu(root);
        let cpu_permille = match (&self.prev_cpu, &cpu) {
            (Some(prev), Some(cur)) => procfs::cpu_permille(prev, cur),
            _ => 0,
        };
        self.prev_cpu = cpu;

        // The baseline is replaced even when this reading failed: keeping an
        // older one would divide its larger delta by this shorter interval.
        let net = procfs::read_net(root);
        let (net_rx_bps, net_tx_bps) = match (&self.prev_net, &net) {
            (Some(prev), Some(cur)) => procfs::net_rates(prev, cur, elapsed),
            _ => (0, 0),
        };
        self.prev_net = net;
        self.prev_at = now;

        let [load1_centi, load5_centi, load15_centi] = procfs::read_loadavg(root);
        let mem = procfs::read_memory(root);
        let (disk_total_mib, disk_used_mib) = disk::usage(&self.disk_path);

        Health {
            cpu_permille,
            load1_centi,
            load5_centi,
            load15_centi,
            mem_total_kib: mem.mem_total_kib,
            mem_used_kib: mem.mem_used_kib,
            swap_total_kib: mem.swap_total_kib,
            swap_used_kib: mem.swap_used_kib,
            disk_total_mib,
            disk_used_mib,
            temp_decicelsius: thermal::max_temp(root),
            uptime_secs: procfs::read_uptime(root),
            net_rx_bps,
            net_tx_bps,
            throttled: throttle::read(root, &mut self.under_voltage_seen),
        }
    }
}

/// Renders a sample in human units (percent, load, bytes, °C) for JSON APIs
/// and logs, where fixed-point wire units would only confuse readers.
pub fn to_json(h: &Health) -> Value {
    serde_json::to_value(pulsebell_proto::view::HealthView::from(h)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsebell_proto::Throttled;
    use serde_json::json;
    use std::fs;
    use tempfile::TempDir;

    /// Writes `contents` to `rel` under `root`, creating parent directories.
    fn put(root: &Path, rel: &str, contents: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    const STAT_1: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\nintr 1 2 3\n";
    // Deltas: user 200 (of which 40 guest, already counted in user), system
    // 50, idle 550, iowait 100, irq 50, softirq 50 → total 1000, busy 350.
    const STAT_2: &str = "cpu  300 0 100 1350 150 50 50 0 40 0\ncpu0 300 0 100 1350 150 50 50 0 40 0\nintr 1 2 3\n";

    const NET_1: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 5000000     100    0    0    0     0          0         0  5000000     100    0    0    0     0       0          0
  eth0:  100000     100    0    0    0     0          0         0    50000      50    0    0    0     0       0          0
 wlan0:   20000      10    0    0    0     0          0         0    10000       5    0    0    0     0       0          0
";
    // eth0 +200000 rx / +60000 tx, wlan0 +4000 rx / +2000 tx; lo changes a
    // lot but must not count.
    const NET_2: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 9000000     100    0    0    0     0          0         0  9000000     100    0    0    0     0       0          0
  eth0:  300000     100    0    0    0     0          0         0   110000      50    0    0    0     0       0          0
 wlan0:   24000      10    0    0    0     0          0         0    12000       5    0    0    0     0       0          0
";

    /// A complete fake Raspberry Pi tree.
    fn fake_pi() -> TempDir {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        put(r, "proc/stat", STAT_1);
        put(r, "proc/loadavg", "0.15 1.50 2.05 2/345 6789\n");
        put(
            r,
            "proc/meminfo",
            "MemTotal:        3884096 kB\nMemFree:          200000 kB\nMemAvailable:    2884096 kB\n\
             Buffers:           50000 kB\nCached:          1500000 kB\nSwapTotal:        102396 kB\n\
             SwapFree:          92396 kB\n",
        );
        put(r, "proc/uptime", "12345.67 40000.00\n");
        put(r, "proc/net/dev", NET_1);
        put(r, "proc/sys/kernel/hostname", "pi-kitchen\n");
        put(r, "proc/sys/kernel/osrelease", "6.6.31+rpt-rpi-v8\n");
        put(r, "proc/sys/kernel/random/boot_id", "1c2b0e6e-8d1a-4c9e-9f0e-3b7d2a1f0c55\n");
        put(
            r,
            "etc/os-release",
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n",
        );
        put(r, "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\0");
        put(r, "sys/class/thermal/thermal_zone0/temp", "51234\n");
        put(r, "sys/class/thermal/thermal_zone1/temp", "40000\n");
        put(r, "sys/class/hwmon/hwmon0/name", "cpu_thermal\n");
        put(r, "sys/class/hwmon/hwmon0/temp1_input", "53470\n");
        put(r, "sys/devices/platform/soc/soc:firmware/get_throttled", "0x50005\n");
        dir
    }

    #[test]
    fn fake_pi_sample_exact_values() {
        let dir = fake_pi();
        let r = dir.path();
        let mut s = Sampler::new(r, r);
        put(r, "proc/stat", STAT_2);
        put(r, "proc/net/dev", NET_2);
        let h = s.sample_with_elapsed(Duration::from_secs(2));

        assert_eq!(h.cpu_permille, 350);
        assert_eq!((h.load1_centi, h.load5_centi, h.load15_centi), (15, 150, 205));
        assert_eq!(h.mem_total_kib, 3_884_096);
        assert_eq!(h.mem_used_kib, 3_884_096 - 2_884_096);
        assert_eq!(h.swap_total_kib, 102_396);
        assert_eq!(h.swap_used_kib, 10_000);
        assert_eq!(h.uptime_secs, 12_345);
        assert_eq!(h.net_rx_bps, (200_000 + 4_000) / 2);
        assert_eq!(h.net_tx_bps, (60_000 + 2_000) / 2);
        // Max over both zones and the hwmon sensor, rounded to 0.1 °C.
        assert_eq!(h.temp_decicelsius, Some(535));
        let t = h.throttled.expect("firmware value present");
        assert_eq!(t, Throttled::from_firmware(0x50005));
        assert!(t.now(Throttled::UNDER_VOLTAGE) && t.since_boot(Throttled::UNDER_VOLTAGE));
        assert!(t.now(Throttled::THROTTLED) && t.since_boot(Throttled::THROTTLED));
        assert!(!t.now(Throttled::FREQ_CAPPED) && !t.since_boot(Throttled::SOFT_TEMP_LIMIT));
        // The disk is the temp dir's real filesystem.
        assert!(h.disk_total_mib > 0);
        assert!(h.disk_used_mib <= h.disk_total_mib);

        // Unchanged counters: no CPU time passed, no bytes moved.
        let h = s.sample_with_elapsed(Duration::from_secs(2));
        assert_eq!((h.cpu_permille, h.net_rx_bps, h.net_tx_bps), (0, 0, 0));
    }

    #[test]
    fn net_counter_reset_gives_zero_not_huge() {
        let dir = fake_pi();
        let r = dir.path();
        let mut s = Sampler::new(r, r);
        // eth0 was re-created (counters restarted low), wlan0 moved 4000/2000.
        put(r, "proc/net/dev", &NET_2.replace("300000", "1000").replace("110000", "500"));
        let h = s.sample_with_elapsed(Duration::from_secs(2));
        assert_eq!((h.net_rx_bps, h.net_tx_bps), (2_000, 1_000));
    }

    #[test]
    fn rpi_volt_fallback_keeps_under_voltage_since_boot() {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        put(r, "sys/class/hwmon/hwmon0/name", "cpu_thermal\n");
        put(r, "sys/class/hwmon/hwmon0/temp1_input", "45000\n");
        put(r, "sys/class/hwmon/hwmon1/name", "rpi_volt\n");
        put(r, "sys/class/hwmon/hwmon1/in0_lcrit_alarm", "0\n");
        let mut s = Sampler::new(r, r);

        let t = s.sample().throttled.expect("rpi_volt present");
        assert!(!t.any());

        put(r, "sys/class/hwmon/hwmon1/in0_lcrit_alarm", "1\n");
        let t = s.sample().throttled.unwrap();
        assert!(t.now(Throttled::UNDER_VOLTAGE));
        assert!(t.since_boot(Throttled::UNDER_VOLTAGE));
        assert!(!t.now(Throttled::THROTTLED));

        put(r, "sys/class/hwmon/hwmon1/in0_lcrit_alarm", "0\n");
        let h = s.sample();
        let t = h.throttled.unwrap();
        assert!(!t.now(Throttled::UNDER_VOLTAGE));
        assert!(t.since_boot(Throttled::UNDER_VOLTAGE));
        assert_eq!(h.temp_decicelsius, Some(450));

        // A fresh sampler has not seen it.
        let t = Sampler::new(r, r).sample().throttled.unwrap();
        assert!(!t.since_boot(Throttled::UNDER_VOLTAGE));
    }

    #[test]
    fn empty_tree_gives_zeros_and_none() {
        let dir = TempDir::new().unwrap();
        let mut s = Sampler::new(dir.path(), dir.path().join("no/such/dir"));
        assert_eq!(s.sample(), Health::default());
        assert_eq!(s.sample_with_elapsed(Duration::ZERO), Health::default());

        let f = facts(dir.path());
        assert_eq!(f.os, "Linux");
        assert_eq!(f.board_model, None);
        assert_eq!(f.arch, std::env::consts::ARCH);
        assert!(f.boot_id.is_empty() && f.hostname.is_empty() && f.kernel.is_empty());
    }

    #[test]
    fn malformed_sources_give_zeros_and_none() {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        for rel in ["proc/stat", "proc/loadavg", "proc/meminfo", "proc/uptime", "proc/net/dev"] {
            put(r, rel, "garbage \u{0} nan -1\n");
        }
        put(r, "sys/class/thermal/thermal_zone0/temp", "-274000\n");
        put(r, "sys/class/hwmon/hwmon0/temp1_input", "999999\n");
        put(r, "sys/devices/platform/soc/soc:firmware/get_throttled", "zz\n");
        let mut s = Sampler::new(r, r.join("missing"));
        let h = s.sample_with_elapsed(Duration::from_secs(1));
        assert_eq!(h, Health::default());
    }

    #[test]
    fn fake_pi_facts() {
        let dir = fake_pi();
        let f = facts(dir.path());
        assert_eq!(
            f,
            SystemFacts {
                boot_id: "1c2b0e6e-8d1a-4c9e-9f0e-3b7d2a1f0c55".into(),
                hostname: "pi-kitchen".into(),
                os: "Debian GNU/Linux 12 (bookworm)".into(),
                kernel: "6.6.31+rpt-rpi-v8".into(),
                arch: std::env::consts::ARCH.into(),
                board_model: Some("Raspberry Pi 4 Model B Rev 1.4".into()),
            }
        );
    }

    #[test]
    fn to_json_uses_human_units_and_exact_keys() {
        let h = Health {
            cpu_permille: 355,
            load1_centi: 15,
            load5_centi: 150,
            load15_centi: 205,
            mem_total_kib: 4,
            mem_used_kib: 2,
            swap_total_kib: 8,
            swap_used_kib: 1,
            disk_total_mib: 3,
            disk_used_mib: 1,
            temp_decicelsius: Some(-53),
            uptime_secs: 99,
            net_rx_bps: 10,
            net_tx_bps: 20,
            throttled: Some(Throttled::from_firmware(0x8_0002)),
        };
        let expected = json!({
            "cpu_percent": 35.5,
            "load1": 0.15, "load5": 1.5, "load15": 2.05,
            "mem_total_bytes": 4096, "mem_used_bytes": 2048,
            "swap_total_bytes": 8192, "swap_used_bytes": 1024,
            "disk_total_bytes": 3 * 1024 * 1024, "disk_used_bytes": 1024 * 1024,
            "temp_celsius": -5.3,
            "uptime_secs": 99,
            "net_rx_bytes_per_sec": 10, "net_tx_bytes_per_sec": 20,
            "throttled": {
                "under_voltage_now": false, "freq_capped_now": true,
                "throttled_now": false, "soft_temp_limit_now": false,
                "under_voltage_since_boot": false, "freq_capped_since_boot": false,
                "throttled_since_boot": false, "soft_temp_limit_since_boot": true,
            },
        });
        assert_eq!(to_json(&h), expected);

        let v = to_json(&Health::default());
        assert_eq!(v["temp_celsius"], Value::Null);
        assert_eq!(v["throttled"], Value::Null);
    }

    #[test]
    fn real_host_sample() {
        let mut s = Sampler::new("/", "/");
        let h = s.sample();
        assert!(h.mem_total_kib > 0);
        assert!(h.mem_used_kib <= h.mem_total_kib);
        assert!(h.uptime_secs > 0);
        assert!(h.cpu_permille <= 1000);
        assert!(h.disk_total_mib > 0);
        let f = facts(Path::new("/"));
        assert!(!f.kernel.is_empty());
    }
}
