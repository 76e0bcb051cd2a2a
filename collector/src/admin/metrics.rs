//! `GET /metrics`: the fleet and the collector in the Prometheus text
//! format (prometheus-client).
//!
//! Device metrics are built from the fleet's current view at each scrape
//! rather than kept as live families: the fleet map is the source of truth,
//! and a revoked device disappears from the next scrape by itself.
//! `[metrics] per_device` bounds them (`all`, `up`, `none`); the fleet
//! totals (`pulsebell_devices{state}`) are always there.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::AdminState;
use crate::config::PerDevice;
use crate::store::BellStatus;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn gauge_family(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    match unit {
        Some(u) => registry.register_with_unit(name, help, u, family.clone()),
        None => registry.register(name, help, family.clone()),
    }
    family
}

/// Renders the metrics text.
pub async fn render(state: &AdminState) -> String {
    let mut r = Registry::with_prefix("pulsebell");
    let up = gauge_family(&mut r, "device_up", "1 if the device is online", None);
    let last_seen =
        gauge_family(&mut r, "device_last_seen_timestamp", "Time of the last pulse, Unix", Some(Unit::Seconds));
    let cpu = gauge_family(&mut r, "device_cpu_ratio", "CPU busy over the last interval, 0..1", None);
    let load = gauge_family(&mut r, "device_load", "Load average (label window: 1m, 5m, 15m)", None);
    let mem_used = gauge_family(&mut r, "device_memory_used", "Memory used (total - available)", Some(Unit::Bytes));
    let mem_total = gauge_family(&mut r, "device_memory_total", "Memory total", Some(Unit::Bytes));
    let disk_used = gauge_family(&mut r, "device_disk_used", "Root filesystem used", Some(Unit::Bytes));
    let disk_total = gauge_family(&mut r, "device_disk_total", "Root filesystem size", Some(Unit::Bytes));
    let temp = gauge_family(&mut r, "device_temperature", "Highest temperature sensor", Some(Unit::Celsius));
    let throttled = gauge_family(
        &mut r,
        "device_throttled",
        "Raspberry Pi throttling flag (labels flag, when=now|since_boot), 1 if set",
        None,
    );

    // Fleet totals, whatever `[metrics] per_device` says.
    let (devices, online) = state.fleet.counts();
    let totals = Family::<Labels, Gauge<i64>>::default();
    totals.get_or_create(&vec![("state".into(), "online".into())]).set(online as i64);
    totals.get_or_create(&vec![("state".into(), "offline".into())]).set(devices.saturating_sub(online) as i64);
    r.register("devices", "Enrolled devices by state", totals);

    let per_device = state.fleet.config().metrics.per_device;
    // `none` builds no device view at all (a view per device costs CPU at
    // fleet scale).
    let views = if per_device == PerDevice::None { Vec::new() } else { state.fleet.views() };
    for d in views {
        let base: Labels = vec![("device".into(), d.id.clone()), ("tags".into(), d.tags.join(","))];
        let with = |k: &str, v: &str| {
            let mut l = base.clone();
            l.push((k.to_string(), v.to_string()));
            l
        };
        up.get_or_create(&base).set(if d.state == "online" { 1.0 } else { 0.0 });
        if per_device == PerDevice::Up {
            continue;
        }
        if let Some(ts) = d.last_seen.as_deref().and_then(|s| humantime::parse_rfc3339(s).ok()) {
            let secs = ts.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            last_seen.get_or_create(&base).set(secs);
        }
        let Some(h) = &d.health else { continue };
        cpu.get_or_create(&base).set(h.cpu_percent / 100.0);
        load.get_or_create(&with("window", "1m")).set(h.load1);
        load.get_or_create(&with("window", "5m")).set(h.load5);
        load.get_or_create(&with("window", "15m")).set(h.load15);
        mem_used.get_or_create(&base).set(h.mem_used_bytes as f64);
        mem_total.get_or_create(&base).set(h.mem_total_bytes as f64);
        disk_used.get_or_create(&base).set(h.disk_used_bytes as f64);
        disk_total.get_or_create(&base).set(h.disk_total_bytes as f64);
        if let Some(t) = h.temp_celsius {
            temp.get_or_create(&base).set(t);
        }
        if let Some(t) = &h.throttled {
            for (flag, now, boot) in [
                ("under_voltage", t.under_voltage_now, t.under_voltage_since_boot),
                ("freq_capped", t.freq_capped_now, t.freq_capped_since_boot),
                ("throttled", t.throttled_now, t.throttled_since_boot),
                ("soft_temp_limit", t.soft_temp_limit_now, t.soft_temp_limit_since_boot),
            ] {
                let mut l = with("flag", flag);
                l.push(("when".into(), "now".into()));
                throttled.get_or_create(&l).set(f64::from(u8::from(now)));
                l.pop();
                l.push(("when".into(), "since_boot".into()));
                throttled.get_or_create(&l).set(f64::from(u8::from(boot)));
            }
        }
    }

    let s = &state.fleet.stats;
    let connected = Gauge::<i64>::default();
    connected.set(s.connections.load(Ordering::Relaxed) as i64);
    r.register("connections", "Device connections open now", connected);
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    r.register("pulses_received", "Pulses accepted", counter(s.pulses_accepted.load(Ordering::Relaxed)));
    r.register_with_unit(
        "received",
        "Bytes of device messages received",
        Unit::Bytes,
        counter(s.bytes_received.load(Ordering::Relaxed)),
    );
    r.register("handshakes", "Device connections accepted (Hello)", counter(s.handshakes.load(Ordering::Relaxed)));
    r.register(
        "rate_limited",
        "Device connections closed for sending far above their announced rate (1008 rate_limited)",
        counter(s.rate_limited.load(Ordering::Relaxed)),
    );
    let failures = Family::<Labels, Counter<u64>>::default();
    for (reason, n) in s.handshake_failures.lock().expect("stats lock").iter() {
        failures.get_or_create(&vec![("reason".into(), reason.to_string())]).inc_by(*n);
    }
    r.register("handshake_failures", "Failed device handshakes by reason", failures);
    let pending = Family::<Labels, Gauge<i64>>::default();
    let counts = state.bells.pending_counts();
    for st in [BellStatus::Queued, BellStatus::Sent, BellStatus::Running] {
        pending.get_or_create(&vec![("state".into(), st.as_str().into())]).set(*counts.get(&st).unwrap_or(&0) as i64);
    }
    r.register("bells_pending", "Bells not yet final, by state", pending);
    let finished = Family::<Labels, Counter<u64>>::default();
    let done = state.bells.finished_counts();
    for st in BellStatus::ALL.iter().filter(|s| s.is_final()) {
        finished.get_or_create(&vec![("state".into(), st.as_str().into())]).inc_by(*done.get(st).unwrap_or(&0));
    }
    r.register("bells_finished", "Bells that reached a final state since start, by state", finished);
    r.register_with_unit(
        "store_write",
        "Latency of durable store writes",
        Unit::Seconds,
        s.store_write_seconds.clone(),
    );
    r.register(
        "store_records_written",
        "Device records written back to the store",
        counter(s.records_written.load(Ordering::Relaxed)),
    );
    r.register(
        "store_corrupt_records",
        "Records in the store that did not decode and were skipped",
        counter(state.fleet.store().corrupt_records()),
    );
    let info = Family::<Labels, Gauge<i64>>::default();
    info.get_or_create(&vec![
        ("node".into(), state.fleet.node().to_string()),
        ("backend".into(), state.fleet.store().backend().to_string()),
        ("version".into(), env!("CARGO_PKG_VERSION").to_string()),
    ])
    .set(1);
    r.register("collector_info", "This collector: node id, store backend, version", info);
    let nodes = Family::<Labels, Gauge<i64>>::default();
    let (alive, lost) = match &state.membership {
        Some(m) => {
            let lost_after = state.fleet.config().cluster.lost_after;
            let all = m.views(lost_after);
            let alive = all.iter().filter(|n| n.state == "alive").count();
            (alive, all.len() - alive)
        }
        None => (1, 0),
    };
    nodes.get_or_create(&vec![("state".into(), "alive".into())]).set(alive as i64);
    nodes.get_or_create(&vec![("state".into(), "lost".into())]).set(lost as i64);
    r.register("cluster_nodes", "Collector nodes of the cluster by state (1 alive without a cluster)", nodes);

    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// The handler: OpenMetrics when the scraper asks for it (Prometheus
/// does), the classic text format otherwise (promtool, curl, older tools).
pub async fn handler(State(state): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    let body = render(&state).await;
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], to_prometheus_text(&body))
    }
}

/// OpenMetrics → Prometheus text 0.0.4: counter families are named with
/// their `_total` suffix, and `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_total_families() {
        let om = "# HELP x_events Events.\n# TYPE x_events counter\nx_events_total 3\n# HELP x_size Size.\n# TYPE x_size gauge\n# UNIT x_size bytes\nx_size 1.0\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_events_total Events.\n# TYPE x_events_total counter\nx_events_total 3\n# HELP x_size Size.\n# TYPE x_size gauge\nx_size 1.0\n"
        );
    }
}
