//! CPU, load, memory, uptime and network counters from `/proc`.
//!
//! The parsers are pure functions of the file text; the `read_*` wrappers
//! resolve the file under the sampler's root and turn absence into zeros.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::read_text;

/// Cumulative CPU time over all cores from the aggregate `cpu` line of
/// `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal.
    pub total: u64,
    /// idle + iowait: waiting for I/O is not work the CPU does.
    pub idle: u64,
}

/// Parses the aggregate `cpu ` line of `/proc/stat`.
///
/// `guest` and `guest_nice` are left out of the total because the kernel
/// already counts them in `user` and `nice`. Kernels before 2.6 print only
/// four fields; missing later fields count as 0.
pub(super) fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu ") || l.starts_with("cpu\t"))?;
    let mut fields = [0u64; 8];
    let mut count = 0;
    for (slot, token) in fields.iter_mut().zip(line.split_whitespace().skip(1)) {
        *slot = token.parse().ok()?;
        count += 1;
    }
    if count < 4 {
        return None;
    }
    let total = fields.iter().fold(0u64, |a, &v| a.saturating_add(v));
    Some(CpuTimes { total, idle: fields[3].saturating_add(fields[4]) })
}

/// Busy share of CPU time between two readings, in 0.1 % (rounded).
///
/// Computed from the busy counter rather than the idle one because the
/// kernel's iowait counter can step backwards; a negative step counts as 0.
pub(super) fn cpu_permille(prev: &CpuTimes, cur: &CpuTimes) -> u16 {
    let total = cur.total.saturating_sub(prev.total);
    if total == 0 {
        return 0;
    }
    let busy_prev = prev.total.saturating_sub(prev.idle);
    let busy_cur = cur.total.saturating_sub(cur.idle);
    let busy = u128::from(busy_cur.saturating_sub(busy_prev).min(total));
    let total = u128::from(total);
    ((busy * 1000 + total / 2) / total) as u16
}

pub(super) fn read_cpu(root: &Path) -> Option<CpuTimes> {
    let cpu = parse_cpu(&read_text(&root.join("proc/stat"))?);
    if cpu.is_none() {
        tracing::debug!("health: no aggregate cpu line in /proc/stat");
    }
    cpu
}

/// Parses the 1, 5 and 15 minute load averages of `/proc/loadavg` into
/// hundredths, rounded.
pub(super) fn parse_loadavg(s: &str) -> Option<[u32; 3]> {
    let mut out = [0u32; 3];
    let mut tokens = s.split_whitespace();
    for slot in &mut out {
        let v: f64 = tokens.next()?.parse().ok()?;
        if !v.is_finite() || v < 0.0 {
            return None;
        }
        *slot = (v * 100.0).round() as u32;
    }
    Some(out)
}

pub(super) fn read_loadavg(root: &Path) -> [u32; 3] {
    let Some(text) = read_text(&root.join("proc/loadavg")) else {
        return [0; 3];
    };
    parse_loadavg(&text).unwrap_or_else(|| {
        tracing::debug!("health: malformed /proc/loadavg");
        [0; 3]
    })
}

/// Memory and swap, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Memory {
    pub mem_total_kib: u64,
    pub mem_used_kib: u64,
    pub swap_total_kib: u64,
    pub swap_used_kib: u64,
}

/// Parses `/proc/meminfo`. Used memory is total − `MemAvailable`: page cache
/// the kernel can drop on demand is not "used". Kernels before 3.14 lack
/// `MemAvailable`; `MemFree + Buffers + Cached` approximates it there.
/// Missing keys give 0 rather than a guess.
pub(super) fn parse_meminfo(s: &str) -> Memory {
    let mut keys: BTreeMap<&str, u64> = BTreeMap::new();
    for line in s.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            keys.insert(key.trim(), v);
        }
    }
    let get = |k: &str| keys.get(k).copied();

    let mut m = Memory::default();
    if let Some(total) = get("MemTotal") {
        let available = get("MemAvailable").or_else(|| {
            let free = get("MemFree")?;
            let cache = get("Buffers").unwrap_or(0).saturating_add(get("Cached").unwrap_or(0));
            Some(free.saturating_add(cache))
        });
        if let Some(available) = available {
            m.mem_total_kib = total;
            m.mem_used_kib = total.saturating_sub(available);
        }
    }
    if let Some(total) = get("SwapTotal") {
        m.swap_total_kib = total;
        m.swap_used_kib = get("SwapFree").map_or(0, |free| total.saturating_sub(free));
    }
    m
}

pub(super) fn read_memory(root: &Path) -> Memory {
    let Some(text) = read_text(&root.join("proc/meminfo")) else {
        return Memory::default();
    };
    let m = parse_meminfo(&text);
    if m.mem_total_kib == 0 {
        tracing::debug!("health: no usable MemTotal/MemAvailable in /proc/meminfo");
    }
    m
}

/// Parses whole seconds since boot from `/proc/uptime`.
pub(super) fn parse_uptime(s: &str) -> Option<u64> {
    let v: f64 = s.split_whitespace().next()?.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

pub(super) fn read_uptime(root: &Path) -> u64 {
    let Some(text) = read_text(&root.join("proc/uptime")) else {
        return 0;
    };
    parse_uptime(&text).unwrap_or_else(|| {
        tracing::debug!("health: malformed /proc/uptime");
        0
    })
}

/// Cumulative byte counters of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NetCounters {
    pub rx: u64,
    pub tx: u64,
}

/// Parses `/proc/net/dev` into byte counters per interface, without `lo`:
/// loopback traffic never leaves the device. Malformed lines are skipped.
pub(super) fn parse_net_dev(s: &str) -> BTreeMap<String, NetCounters> {
    let mut out = BTreeMap::new();
    for line in s.lines() {
        // Header lines have no ':'; old kernels print "eth0:123" with no space.
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" || name.is_empty() {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(rx), Some(tx)) = (fields.first(), fields.get(8)) else {
            continue;
        };
        if let (Ok(rx), Ok(tx)) = (rx.parse(), tx.parse()) {
            out.insert(name.to_owned(), NetCounters { rx, tx });
        }
    }
    out
}

pub(super) fn read_net(root: &Path) -> Option<BTreeMap<String, NetCounters>> {
    read_text(&root.join("proc/net/dev")).map(|t| parse_net_dev(&t))
}

/// Received and sent bytes per second between two readings, rounded.
///
/// Deltas are taken per interface so that an interface appearing (its whole
/// counter would look like new traffic) or disappearing (the sum would drop)
/// does not distort the rate. A counter that went backwards wrapped (32-bit
/// kernels) or was reset; it counts 0 for this sample rather than an absurd
/// number.
pub(super) fn net_rates(
    prev: &BTreeMap<String, NetCounters>,
    cur: &BTreeMap<String, NetCounters>,
    elapsed: Duration,
) -> (u64, u64) {
    let nanos = elapsed.as_nanos();
    if nanos == 0 {
        return (0, 0);
    }
    let (mut rx, mut tx) = (0u128, 0u128);
    for (name, c) in cur {
        let Some(p) = prev.get(name) else { continue };
        rx += u128::from(c.rx.saturating_sub(p.rx));
        tx += u128::from(c.tx.saturating_sub(p.tx));
    }
    let rate = |bytes: u128| u64::try_from((bytes * 1_000_000_000 + nanos / 2) / nanos).unwrap_or(u64::MAX);
    (rate(rx), rate(tx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_parses_and_excludes_guest() {
        let t = parse_cpu("cpu  10 1 5 80 4 0 0 0 7 3\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(t, CpuTimes { total: 100, idle: 84 });
        // Four-field kernels.
        assert_eq!(parse_cpu("cpu 1 2 3 4\n").unwrap(), CpuTimes { total: 10, idle: 4 });
        // Per-core lines alone, short or malformed lines are rejected.
        assert_eq!(parse_cpu("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(parse_cpu("cpu  1 2 3\n"), None);
        assert_eq!(parse_cpu("cpu  1 2 x 4\n"), None);
        assert_eq!(parse_cpu(""), None);
    }

    #[test]
    fn cpu_permille_is_busy_share_rounded() {
        let a = CpuTimes { total: 1000, idle: 850 };
        assert_eq!(cpu_permille(&a, &CpuTimes { total: 2000, idle: 1500 }), 350);
        // 1/3 busy → 333.3 → 333; 2/3 → 666.7 → 667.
        assert_eq!(cpu_permille(&a, &CpuTimes { total: 1003, idle: 852 }), 333);
        assert_eq!(cpu_permille(&a, &CpuTimes { total: 1003, idle: 851 }), 667);
        // No time passed, or counters went backwards.
        assert_eq!(cpu_permille(&a, &a), 0);
        assert_eq!(cpu_permille(&a, &CpuTimes { total: 10, idle: 5 }), 0);
        // Idle (iowait) stepping backwards never exceeds 100 %.
        assert_eq!(cpu_permille(&a, &CpuTimes { total: 1100, idle: 700 }), 1000);
    }

    #[test]
    fn loadavg_in_hundredths() {
        assert_eq!(parse_loadavg("0.15 1.50 12.07 3/456 789\n"), Some([15, 150, 1207]));
        assert_eq!(parse_loadavg("0.00 0.01 0.005"), Some([0, 1, 1]));
        assert_eq!(parse_loadavg("0.15 1.50"), None);
        assert_eq!(parse_loadavg("nan 1 1"), None);
        assert_eq!(parse_loadavg("-1 1 1"), None);
    }

    #[test]
    fn meminfo_uses_available_not_free() {
        let m = parse_meminfo(
            "MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 700 kB\nBuffers: 50 kB\n\
             Cached: 300 kB\nSwapTotal: 500 kB\nSwapFree: 400 kB\n",
        );
        assert_eq!(m, Memory { mem_total_kib: 1000, mem_used_kib: 300, swap_total_kib: 500, swap_used_kib: 100 });
    }

    #[test]
    fn meminfo_fallback_and_missing_keys() {
        // No MemAvailable: free + buffers + cached = 450.
        let m = parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 300 kB\n");
        assert_eq!((m.mem_total_kib, m.mem_used_kib), (1000, 550));
        assert_eq!((m.swap_total_kib, m.swap_used_kib), (0, 0));
        // Nothing to compute "available" from: no guess.
        assert_eq!(parse_meminfo("MemTotal: 1000 kB\n"), Memory::default());
        assert_eq!(parse_meminfo("garbage"), Memory::default());
        // Available larger than total (never seen, but must not wrap).
        let m = parse_meminfo("MemTotal: 10 kB\nMemAvailable: 20 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n");
        assert_eq!(m.mem_used_kib, 0);
    }

    #[test]
    fn uptime_whole_seconds() {
        assert_eq!(parse_uptime("12345.99 5.0\n"), Some(12345));
        assert_eq!(parse_uptime("0.50 5.0"), Some(0));
        assert_eq!(parse_uptime("x 5"), None);
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("-3 1"), None);
    }

    #[test]
    fn net_dev_skips_lo_headers_and_malformed_lines() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0
  eth0:1000 2 0 0 0 0 0 0 2000 3 0 0 0 0 0 0
 wlan0: 5 1 0 0 0 0 0 0 7
  bad0: 1 2 3
  bad1: x 0 0 0 0 0 0 0 1 0 0 0 0 0 0 0
";
        let m = parse_net_dev(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m["eth0"], NetCounters { rx: 1000, tx: 2000 });
        assert_eq!(m["wlan0"], NetCounters { rx: 5, tx: 7 });
    }

    fn counters(list: &[(&str, u64, u64)]) -> BTreeMap<String, NetCounters> {
        list.iter().map(|&(n, rx, tx)| (n.to_owned(), NetCounters { rx, tx })).collect()
    }

    #[test]
    fn net_rates_per_interface() {
        let prev = counters(&[("eth0", 1000, 500), ("wlan0", 100, 100), ("usb0", 9, 9)]);
        let cur = counters(&[("eth0", 3000, 1500), ("wlan0", 100, 100), ("wg0", 1 << 40, 1 << 40)]);
        // New wg0 and vanished usb0 do not count; eth0 moved 2000/1000 in 2 s.
        assert_eq!(net_rates(&prev, &cur, Duration::from_secs(2)), (1000, 500));
        assert_eq!(net_rates(&prev, &cur, Duration::from_millis(500)), (4000, 2000));
        assert_eq!(net_rates(&prev, &cur, Duration::ZERO), (0, 0));
    }

    #[test]
    fn net_rates_wrap_or_reset_is_zero() {
        let prev = counters(&[("eth0", u64::from(u32::MAX) - 10, 500), ("eth1", 0, 0)]);
        let cur = counters(&[("eth0", 20, 600), ("eth1", 10, 10)]);
        // eth0's rx wrapped: 0 from it, but its tx and eth1 still count.
        assert_eq!(net_rates(&prev, &cur, Duration::from_secs(1)), (10, 110));
    }
}
