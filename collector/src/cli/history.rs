//! `history`: a device's one-minute aggregates as a sparkline or JSON.

use std::time::Duration;

use anyhow::bail;

use super::client::Client;
use crate::clock::now_ms;
use crate::history::{sparkline, Agg, Bucket, Metric};

/// `history DEVICE [--metric temp|cpu|mem|load] [--since DUR] [--json]`.
pub async fn show(client: &Client, device: &str, metric: &str, since: Duration, json: bool) -> anyhow::Result<()> {
    let Some(m) = Metric::parse(metric) else { bail!("--metric must be one of cpu, temp, mem, load") };
    let since_ms = now_ms().saturating_sub(since.as_millis() as u64);
    let resp: serde_json::Value = client.get(&format!("/v1/devices/{device}/history?since_ms={since_ms}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(());
    }
    let buckets: Vec<Bucket> = resp["buckets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    let start = humantime::parse_rfc3339(b["start"].as_str()?).ok()?;
                    let minute = start.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() / 60;
                    Some(Bucket {
                        minute: minute as u32,
                        samples: b["samples"].as_u64()? as u32,
                        cpu: serde_json::from_value(b["cpu"].clone()).ok()?,
                        temp: serde_json::from_value(b["temp"].clone()).ok()?,
                        mem: serde_json::from_value(b["mem"].clone()).ok()?,
                        load: serde_json::from_value(b["load"].clone()).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let (unit, scale) = match m {
        Metric::Cpu => ("%", 1.0),
        Metric::Temp => ("°C", 1.0),
        Metric::Mem => ("MiB", 1.0 / (1024.0 * 1024.0)),
        Metric::Load => ("", 1.0),
    };
    let aggs: Vec<(u32, Option<Agg>, u32)> = buckets.iter().map(|b| (b.minute, m.of(b), b.samples)).collect();
    let present: Vec<(Agg, u32)> = aggs.iter().filter_map(|(_, a, n)| a.map(|a| (a, *n))).collect();
    if present.is_empty() {
        println!("{device}: no {metric} data in the last {}", humantime::format_duration(since));
        return Ok(());
    }
    // One cell per minute from the first bucket to now, gaps shown blank.
    let first = aggs.first().map(|a| a.0).unwrap_or(0);
    let last = aggs.last().map(|a| a.0).unwrap_or(first);
    let mut series = vec![None; (last - first + 1) as usize];
    for (minute, a, _) in &aggs {
        series[(minute - first) as usize] = a.map(|a| a.avg * scale);
    }
    let min = present.iter().map(|(a, _)| a.min).fold(f64::INFINITY, f64::min) * scale;
    let max = present.iter().map(|(a, _)| a.max).fold(f64::NEG_INFINITY, f64::max) * scale;
    let n: u32 = present.iter().map(|(_, n)| n).sum();
    let avg = present.iter().map(|(a, n)| a.avg * f64::from(*n)).sum::<f64>() / f64::from(n.max(1)) * scale;
    println!(
        "{device} {metric} over the last {} ({} minutes, one cell per minute)",
        humantime::format_duration(since),
        series.len()
    );
    println!("{}", sparkline(&series, 120));
    println!("min {min:.1}{unit}  avg {avg:.1}{unit}  max {max:.1}{unit}  ({n} pulses)");
    Ok(())
}
