//! What the load generator measures outside itself: the collector's (or the
//! broker's) RSS and CPU time from /proc, and the collector's own counters
//! from `GET /v1/stats`. Counters survive a collector restart: a value that
//! goes down is taken as a new process counting from zero.

use std::path::PathBuf;
use std::sync::Mutex;

/// Resident set size of `pid` in bytes (`VmRSS` in /proc/PID/status).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User + system CPU time of `pid` in seconds (/proc/PID/stat fields 14 and 15).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; everything after its ')'
    // starts at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) as f64 / ticks)
}

/// A counter that may restart from zero (a restarted collector): the sum of
/// every increase seen.
#[derive(Debug, Default, Clone, Copy)]
pub struct Monotonic {
    last: Option<f64>,
    total: f64,
}

impl Monotonic {
    /// Feeds the counter's current value; returns the accumulated total.
    pub fn feed(&mut self, value: f64) -> f64 {
        match self.last {
            Some(last) if value >= last => self.total += value - last,
            // First sample: the baseline. Later, a smaller value means a new
            // process whose counter started at zero.
            Some(_) => self.total += value,
            None => {}
        }
        self.last = Some(value);
        self.total
    }

    /// The accumulated total.
    pub fn total(&self) -> f64 {
        self.total
    }
}

/// Where the measured server's pid comes from.
#[derive(Debug, Clone)]
pub enum PidSource {
    /// `--collector-pid`.
    Fixed(u32),
    /// The `pid` in the collector's `run.json` (follows restarts).
    RunFile(PathBuf),
    /// Not measured.
    None,
}

impl PidSource {
    /// The pid now.
    pub fn pid(&self) -> Option<u32> {
        match self {
            PidSource::Fixed(p) => Some(*p),
            PidSource::RunFile(path) => std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["pid"].as_u64())
                .and_then(|p| u32::try_from(p).ok())
                .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists()),
            PidSource::None => None,
        }
    }
}

/// The measured server process: CPU accumulated across restarts, RSS now.
pub struct Process {
    source: PidSource,
    cpu: Mutex<(Option<u32>, Monotonic)>,
}

impl Process {
    /// Measures the process `source` names.
    pub fn new(source: PidSource) -> Process {
        Process { source, cpu: Mutex::new((None, Monotonic::default())) }
    }

    /// The pid now, if known.
    pub fn pid(&self) -> Option<u32> {
        self.source.pid()
    }

    /// (CPU seconds accumulated since the first sample, RSS bytes now).
    pub fn sample(&self) -> (Option<f64>, Option<u64>) {
        let Some(pid) = self.source.pid() else {
            let cpu = self.cpu.lock().expect("cpu lock").1.total();
            return (Some(cpu).filter(|_| !matches!(self.source, PidSource::None)), None);
        };
        let pid_s = pid.to_string();
        let rss = rss_bytes(&pid_s);
        let mut guard = self.cpu.lock().expect("cpu lock");
        let (last_pid, acc) = &mut *guard;
        let cpu = cpu_seconds(&pid_s).map(|now| {
            if last_pid.is_some_and(|p| p != pid) {
                // A new process: its time counts from zero.
                let mut fresh = *acc;
                fresh.feed(0.0);
                *acc = fresh;
            }
            *last_pid = Some(pid);
            acc.feed(now)
        });
        (cpu, rss)
    }
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_survives_a_restart() {
        let mut m = Monotonic::default();
        assert_eq!(m.feed(100.0), 0.0);
        assert_eq!(m.feed(150.0), 50.0);
        assert_eq!(m.feed(20.0), 70.0);
        assert_eq!(m.feed(25.0), 75.0);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id().to_string();
        assert!(rss_bytes(&me).unwrap() > 0);
        assert!(cpu_seconds(&me).unwrap() >= 0.0);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
