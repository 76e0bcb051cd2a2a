//! `status` and `show`: the fleet at a glance, one device in full.

use std::time::{Duration, SystemTime};

use super::client::Client;
use crate::fleet::DeviceView;

/// `status [--json]`.
pub async fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let devices: Vec<DeviceView> = client.get("/v1/devices").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
    } else {
        print!("{}", render_table(&devices, SystemTime::now()));
    }
    Ok(())
}

/// `show ID [--json]`.
pub async fn show(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let d: DeviceView = client.get(&format!("/v1/devices/{id}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let mut rows: Vec<(&str, String)> = vec![
        ("id", d.id.clone()),
        ("state", d.state.clone()),
        ("last seen", ago(d.last_seen.as_deref(), SystemTime::now())),
        ("connected", format!("{} (generation {})", d.connected, d.generation)),
        ("node", d.node.clone().unwrap_or_else(|| "-".into())),
        ("hostname", d.hostname.clone().unwrap_or_default()),
        ("os", d.os.clone().unwrap_or_default()),
        ("kernel", d.kernel.clone().unwrap_or_default()),
        ("arch", d.arch.clone().unwrap_or_default()),
        ("board", d.board_model.clone().unwrap_or_default()),
        ("agent", d.agent_version.clone().unwrap_or_default()),
        ("tags", d.tags.join(", ")),
        ("actions", d.actions.join(", ")),
        ("interval", d.interval_ms.map(|ms| format!("{ms} ms")).unwrap_or_default()),
        ("offline after", format!("{} ms", d.offline_after_ms)),
        ("enrolled", d.enrolled_at.clone()),
    ];
    if let Some(h) = &d.health {
        rows.extend([
            ("uptime", humantime::format_duration(Duration::from_secs(h.uptime_secs)).to_string()),
            ("cpu", format!("{:.1} %", h.cpu_percent)),
            ("load", format!("{:.2} {:.2} {:.2}", h.load1, h.load5, h.load15)),
            ("memory", format!("{} / {}", bytes(h.mem_used_bytes), bytes(h.mem_total_bytes))),
            ("swap", format!("{} / {}", bytes(h.swap_used_bytes), bytes(h.swap_total_bytes))),
            ("disk", format!("{} / {}", bytes(h.disk_used_bytes), bytes(h.disk_total_bytes))),
            ("temperature", h.temp_celsius.map(|t| format!("{t:.1} °C")).unwrap_or_else(|| "-".into())),
            ("net rx/tx", format!("{}/s / {}/s", bytes(h.net_rx_bytes_per_sec), bytes(h.net_tx_bytes_per_sec))),
            (
                "throttling",
                match &h.throttled {
                    None => "- (not a Raspberry Pi)".into(),
                    Some(t) if t.warnings().is_empty() => "none".into(),
                    Some(t) => t.warnings().join(", "),
                },
            ),
        ]);
    }
    let l = &d.link;
    rows.push((
        "link",
        format!(
            "missed {} · late {} · reconnects/24h {} · rtt {}{}",
            l.missed_pulses,
            l.late_pulses,
            l.reconnects_24h,
            l.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into()),
            if l.flaky { " · FLAKY" } else { "" }
        ),
    ));
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
    for c in &d.checks {
        println!(
            "{:<14} {} {} ({}, since {}): {}",
            "check",
            c.name,
            c.status.to_uppercase(),
            c.kind,
            c.since,
            c.summary
        );
    }
    Ok(())
}

/// "4s ago", "3m ago", "never".
pub fn ago(rfc3339: Option<&str>, now: SystemTime) -> String {
    let Some(t) = rfc3339.and_then(|s| humantime::parse_rfc3339(s).ok()) else { return "never".into() };
    let secs = now.duration_since(t).unwrap_or_default().as_secs();
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// 1.2G, 512M, 40K.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else if v >= 10.0 {
        format!("{v:.0}{}", UNITS[unit])
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn short_uptime(secs: u64) -> String {
    match secs {
        0..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Rows as left-aligned columns two spaces apart, each as wide as its
/// widest cell (by characters, so `°C` counts as two), with no trailing
/// blanks. The first row is the header. Every table the CLI prints uses it.
pub fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: [usize; N] = std::array::from_fn(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0));
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The status table.
pub fn render_table(devices: &[DeviceView], now: SystemTime) -> String {
    let header = ["ID", "STATE", "LAST SEEN", "UPTIME", "CPU", "LOAD", "MEM", "DISK", "TEMP", "CHECKS", "WARNINGS"];
    let mut rows: Vec<[String; 11]> = vec![header.map(str::to_string)];
    for d in devices {
        let h = d.health.as_ref();
        let mut warnings: Vec<String> = h
            .and_then(|h| h.throttled.as_ref())
            .map(|t| t.warnings().iter().map(|s| s.to_string()).collect())
            .unwrap_or_default();
        if d.link.flaky {
            warnings.push("flaky-link".into());
        }
        let pct = |used: u64, total: u64| {
            if total == 0 {
                "-".to_string()
            } else {
                format!("{:.0}%", used as f64 * 100.0 / total as f64)
            }
        };
        rows.push([
            d.id.clone(),
            d.state.clone(),
            ago(d.last_seen.as_deref(), now),
            h.map(|h| short_uptime(h.uptime_secs)).unwrap_or_else(|| "-".into()),
            h.map(|h| format!("{:.0}%", h.cpu_percent)).unwrap_or_else(|| "-".into()),
            h.map(|h| format!("{:.2}", h.load1)).unwrap_or_else(|| "-".into()),
            h.map(|h| pct(h.mem_used_bytes, h.mem_total_bytes)).unwrap_or_else(|| "-".into()),
            h.map(|h| pct(h.disk_used_bytes, h.disk_total_bytes)).unwrap_or_else(|| "-".into()),
            h.and_then(|h| h.temp_celsius).map(|t| format!("{t:.0}°C")).unwrap_or_else(|| "-".into()),
            super::checks::summary_cell(&d.checks),
            if warnings.is_empty() { "-".into() } else { warnings.join(",") },
        ]);
    }
    let mut out = columns(&rows);
    if devices.is_empty() {
        out.push_str("(no devices enrolled: `pulsebell-collector enroll ID`)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(4 * 1024 * 1024 * 1024), "4.0G");
        let now = humantime::parse_rfc3339("2026-01-01T00:01:00Z").unwrap();
        assert_eq!(ago(Some("2026-01-01T00:00:56Z"), now), "4s ago");
        assert_eq!(ago(Some("2025-12-31T23:58:00Z"), now), "3m ago");
        assert_eq!(ago(None, now), "never");
    }
}
