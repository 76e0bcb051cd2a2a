//! Where a bell's round trip goes. Both processes run on one machine and
//! read one wall clock, so the load generator's own marks (request sent,
//! bell frame read by the simulated device, report written, answer read)
//! and the collector's (the bell's `queued` and final transitions, to the
//! millisecond) split each round trip into hops:
//!
//! ```text
//! request   POST sent → bell queued (HTTP, auth, validation)
//! store     queued → marked sent (the bell written and flushed, handed to
//!           the device's connection)
//! transit   marked sent → the device has read the frame (the connection
//!           thread writes it, TLS, the device task scheduled; negative
//!           when the frame is read before `sent` is stamped)
//! device    frame read → report written (the simulated agent)
//! report    report written → final state recorded (the collector reads the
//!           frame, compare-and-set begins)
//! answer    recorded → answer read (the flush, waking the waiting request,
//!           HTTP response, the client scheduled)
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Wall clock, Unix ms with sub-ms digits.
pub fn unix_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The simulated devices' marks per bell id: (frame read, report written).
#[derive(Debug, Default)]
pub struct DeviceMarks(Mutex<HashMap<u64, (f64, f64)>>);

impl DeviceMarks {
    /// Records one answered bell.
    pub fn record(&self, id: u64, read: f64, written: f64) {
        self.0.lock().expect("device marks").insert(id, (read, written));
    }

    fn get(&self, id: u64) -> Option<(f64, f64)> {
        self.0.lock().expect("device marks").get(&id).copied()
    }
}

/// One succeeded bell as the ringing side saw it.
#[derive(Debug, Clone)]
pub struct Rung {
    /// Round trip, ms.
    pub rtt: f64,
    /// POST sent, Unix ms.
    pub sent: f64,
    /// The answer: the bell as JSON (`id`, `transitions`).
    pub bell: Value,
}

/// Names of the hops, in order.
pub const HOPS: [&str; 6] = ["request", "store", "transit", "device", "report", "answer"];

/// A bell's hops in ms, when every mark is there.
fn hops(r: &Rung, devices: &DeviceMarks) -> Option<[f64; 6]> {
    let id = r.bell["id"].as_u64()?;
    let (read, written) = devices.get(id)?;
    let at = |state: &str| -> Option<f64> {
        let t = r.bell["transitions"].as_array()?.iter().find(|t| t["state"] == state)?;
        let ts = humantime::parse_rfc3339(t["at"].as_str()?).ok()?;
        Some(ts.duration_since(UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
    };
    let queued = at("queued")?;
    let sent = at("sent")?;
    let done = at("succeeded")?;
    Some([queued - r.sent, sent - queued, read - sent, written - read, done - written, r.sent + r.rtt - done])
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn named(h: [f64; 6]) -> Value {
    let r = |x: f64| (x * 100.0).round() / 100.0;
    HOPS.iter().zip(h).map(|(k, v)| ((*k).to_string(), json!(r(v)))).collect::<serde_json::Map<_, _>>().into()
}

/// Median hops over all bells, over the slowest 1 % (at least 5), and the
/// ten slowest one by one.
pub fn breakdown(rung: &[Rung], devices: &DeviceMarks) -> Value {
    let mut all: Vec<(f64, [f64; 6])> = rung.iter().filter_map(|r| Some((r.rtt, hops(r, devices)?))).collect();
    if all.is_empty() {
        return Value::Null;
    }
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let med = |set: &[(f64, [f64; 6])]| named(std::array::from_fn(|i| median(set.iter().map(|h| h.1[i]).collect())));
    let slow = &all[..(all.len() / 100).max(5).min(all.len())];
    json!({
        "bells": all.len(),
        "median_all": med(&all),
        "median_slowest_1pct": med(slow),
        "slowest": all.iter().take(10).map(|(rtt, h)| json!({ "rtt": (rtt * 100.0).round() / 100.0, "hops": named(*h) })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_add_up_to_the_round_trip() {
        let devices = DeviceMarks::default();
        // Queued at .002, read at .004, written at .0045, done at .007.
        let base = 1_764_000_000_000.0;
        devices.record(9, base + 4.0, base + 4.5);
        let bell = json!({ "id": 9, "transitions": [
            { "state": "queued", "at": "2025-11-24T16:00:00.002Z" },
            { "state": "sent", "at": "2025-11-24T16:00:00.003Z" },
            { "state": "succeeded", "at": "2025-11-24T16:00:00.007Z" },
        ]});
        let r = Rung { rtt: 9.0, sent: base + 0.5, bell };
        let h = hops(&r, &devices).expect("every mark is there");
        let want = [1.5, 1.0, 1.0, 0.5, 2.5, 2.5];
        for (got, want) in h.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{h:?}");
        }
        assert!((h.iter().sum::<f64>() - r.rtt).abs() < 1e-6);
        // No device marks: not counted.
        let other = Rung { bell: json!({ "id": 10, "transitions": [] }), ..r.clone() };
        assert!(hops(&other, &devices).is_none());
        let b = breakdown(&[r, other], &devices);
        assert_eq!(b["bells"], 1);
        assert_eq!(b["median_all"]["device"], 0.5);
    }
}
