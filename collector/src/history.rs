//! Per-device history: one-minute aggregates (min / avg / max) of CPU,
//! temperature, memory used and load, kept for `history_retention`
//! (default 7 days).
//!
//! Pulses fold into the device's open minute in memory ([`Accumulator`]);
//! a finished minute becomes a [`Bucket`] that the write-back loop stores.
//! Old buckets are deleted hourly. A bucket is stored as fixed-point
//! integers ([`StoredBucket`], about 30 bytes of postcard) plus sled's
//! per-key overhead; see the README for the measured size.

use pulsebell_proto::Health;
use serde::{Deserialize, Serialize};

/// One metric's aggregate over a minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Agg {
    /// Smallest sample.
    pub min: f64,
    /// Mean of the samples.
    pub avg: f64,
    /// Largest sample.
    pub max: f64,
}

/// One minute of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the minute, Unix minutes.
    pub minute: u32,
    /// Pulses folded in.
    pub samples: u32,
    /// CPU busy, percent.
    pub cpu: Agg,
    /// Highest temperature, °C; `None` if the device has no sensor.
    pub temp: Option<Agg>,
    /// Memory used, bytes.
    pub mem: Agg,
    /// 1-minute load average.
    pub load: Agg,
}

/// A bucket as stored: fixed-point integers (postcard varints), about 40
/// bytes instead of ~100 with floats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBucket {
    minute: u32,
    samples: u32,
    /// CPU min/avg/max, 0.1 %.
    cpu: [u16; 3],
    /// Temperature min/avg/max, 0.1 °C.
    temp: Option<[i16; 3]>,
    /// Memory used min/avg/max, KiB.
    mem_kib: [u64; 3],
    /// Load min/avg/max, hundredths.
    load: [u32; 3],
}

fn fixed<T>(a: Agg, scale: f64, conv: impl Fn(f64) -> T) -> [T; 3] {
    [conv((a.min * scale).round()), conv((a.avg * scale).round()), conv((a.max * scale).round())]
}

fn float<T: Copy + Into<f64>>(v: [T; 3], scale: f64) -> Agg {
    Agg { min: v[0].into() / scale, avg: v[1].into() / scale, max: v[2].into() / scale }
}

impl StoredBucket {
    /// Start of the minute, Unix minutes.
    pub fn minute(&self) -> u32 {
        self.minute
    }
}

impl From<&Bucket> for StoredBucket {
    fn from(b: &Bucket) -> Self {
        StoredBucket {
            minute: b.minute,
            samples: b.samples,
            cpu: fixed(b.cpu, 10.0, |v| v.clamp(0.0, 1000.0) as u16),
            temp: b.temp.map(|t| fixed(t, 10.0, |v| v.clamp(-32768.0, 32767.0) as i16)),
            mem_kib: fixed(b.mem, 1.0 / 1024.0, |v| v.max(0.0) as u64),
            load: fixed(b.load, 100.0, |v| v.max(0.0) as u32),
        }
    }
}

impl From<StoredBucket> for Bucket {
    fn from(s: StoredBucket) -> Self {
        let mem = [s.mem_kib[0] as f64, s.mem_kib[1] as f64, s.mem_kib[2] as f64];
        Bucket {
            minute: s.minute,
            samples: s.samples,
            cpu: float(s.cpu, 10.0),
            temp: s.temp.map(|t| float(t, 10.0)),
            mem: float(mem, 1.0 / 1024.0),
            load: float(s.load, 100.0),
        }
    }
}

/// Which metric to read from a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// CPU percent.
    Cpu,
    /// Temperature °C.
    Temp,
    /// Memory used, bytes.
    Mem,
    /// Load average.
    Load,
}

impl Metric {
    /// Parses `cpu`, `temp`, `mem`, `load`.
    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "cpu" => Some(Metric::Cpu),
            "temp" => Some(Metric::Temp),
            "mem" => Some(Metric::Mem),
            "load" => Some(Metric::Load),
            _ => None,
        }
    }

    /// The aggregate of this metric in `b`.
    pub fn of(self, b: &Bucket) -> Option<Agg> {
        match self {
            Metric::Cpu => Some(b.cpu),
            Metric::Temp => b.temp,
            Metric::Mem => Some(b.mem),
            Metric::Load => Some(b.load),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Running {
    min: f64,
    sum: f64,
    max: f64,
}

impl Running {
    fn new(v: f64) -> Self {
        Running { min: v, sum: v, max: v }
    }
    fn add(&mut self, v: f64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
    }
    fn agg(&self, n: u32) -> Agg {
        // Rounding can put the mean of equal samples a hair outside them.
        let avg = (self.sum / f64::from(n.max(1))).clamp(self.min, self.max);
        Agg { min: self.min, avg, max: self.max }
    }
}

/// The open minute of one device.
#[derive(Debug, Clone)]
pub struct Accumulator {
    minute: u32,
    n: u32,
    cpu: Running,
    temp: Option<(Running, u32)>,
    mem: Running,
    load: Running,
}

fn values(h: &Health) -> (f64, Option<f64>, f64, f64) {
    (h.cpu_percent(), h.temp_celsius(), (h.mem_used_kib * 1024) as f64, f64::from(h.load1_centi) / 100.0)
}

impl Accumulator {
    /// Starts a minute with its first sample.
    pub fn new(minute: u32, h: &Health) -> Self {
        let (cpu, temp, mem, load) = values(h);
        Accumulator {
            minute,
            n: 1,
            cpu: Running::new(cpu),
            temp: temp.map(|t| (Running::new(t), 1)),
            mem: Running::new(mem),
            load: Running::new(load),
        }
    }

    /// Folds a sample taken in `minute`. If that is a later minute, returns
    /// the finished bucket and starts the new one.
    pub fn add(&mut self, minute: u32, h: &Health) -> Option<Bucket> {
        if minute != self.minute {
            let done = self.bucket();
            *self = Accumulator::new(minute, h);
            return Some(done);
        }
        let (cpu, temp, mem, load) = values(h);
        self.n += 1;
        self.cpu.add(cpu);
        self.mem.add(mem);
        self.load.add(load);
        if let Some(t) = temp {
            match &mut self.temp {
                Some((r, n)) => {
                    r.add(t);
                    *n += 1;
                }
                None => self.temp = Some((Running::new(t), 1)),
            }
        }
        None
    }

    /// The bucket so far.
    pub fn bucket(&self) -> Bucket {
        Bucket {
            minute: self.minute,
            samples: self.n,
            cpu: self.cpu.agg(self.n),
            temp: self.temp.map(|(r, n)| r.agg(n)),
            mem: self.mem.agg(self.n),
            load: self.load.agg(self.n),
        }
    }
}

/// A terminal sparkline of `values` (`None` is a gap), `width` cells at most.
pub fn sparkline(values: &[Option<f64>], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() || width == 0 {
        return String::new();
    }
    // Average consecutive values into at most `width` cells.
    let per = values.len().div_ceil(width);
    let cells: Vec<Option<f64>> = values
        .chunks(per)
        .map(|c| {
            let present: Vec<f64> = c.iter().flatten().copied().collect();
            (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
        })
        .collect();
    let present = cells.iter().flatten();
    let lo = present.clone().copied().fold(f64::INFINITY, f64::min);
    let hi = present.copied().fold(f64::NEG_INFINITY, f64::max);
    cells
        .iter()
        .map(|c| match c {
            None => ' ',
            Some(_) if (hi - lo).abs() < f64::EPSILON => BARS[3],
            Some(v) => BARS[(((v - lo) / (hi - lo)) * 7.0).round() as usize],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(cpu_permille: u16, temp: Option<i16>) -> Health {
        Health { cpu_permille, temp_decicelsius: temp, mem_used_kib: 1024, load1_centi: 150, ..Health::default() }
    }

    #[test]
    fn minutes_aggregate_and_roll_over() {
        let mut a = Accumulator::new(100, &h(100, Some(400)));
        assert!(a.add(100, &h(300, Some(500))).is_none());
        assert!(a.add(100, &h(200, None)).is_none());
        let b = a.add(101, &h(900, None)).expect("minute 100 is done");
        assert_eq!(b.minute, 100);
        assert_eq!(b.samples, 3);
        assert_eq!(b.cpu, Agg { min: 10.0, avg: 20.0, max: 30.0 });
        assert_eq!(b.temp, Some(Agg { min: 40.0, avg: 45.0, max: 50.0 }));
        assert_eq!(b.mem.max, 1024.0 * 1024.0);
        assert_eq!(b.load.avg, 1.5);
        let open = a.bucket();
        assert_eq!((open.minute, open.samples, open.temp), (101, 1, None));
    }

    #[test]
    fn stored_buckets_are_small_and_round_trip() {
        let mut a = Accumulator::new(29_000_000, &h(123, Some(456)));
        a.add(29_000_000, &h(130, Some(470)));
        let b = a.bucket();
        let stored = StoredBucket::from(&b);
        let bytes = postcard::to_stdvec(&stored).unwrap();
        assert!(bytes.len() <= 48, "{} bytes", bytes.len());
        let back = Bucket::from(postcard::from_bytes::<StoredBucket>(&bytes).unwrap());
        assert_eq!(back.cpu, Agg { min: 12.3, avg: 12.7, max: 13.0 });
        assert_eq!(back.temp.unwrap().max, 47.0);
        assert_eq!(back.mem, b.mem);
        assert_eq!(back.load, b.load);
    }

    #[test]
    fn sparkline_scales_and_shows_gaps() {
        let s = sparkline(&[Some(0.0), Some(7.0), None, Some(3.5)], 10);
        assert_eq!(s, "▁█ ▅");
        assert_eq!(sparkline(&[Some(1.0); 100], 10).chars().count(), 10);
        assert_eq!(sparkline(&[], 10), "");
    }
}
