//! `bell`, `bells`, `bell-show`, `cancel`: ring and follow ready bells.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;

use super::client::Client;
use crate::bells::{BellView, RingRequest};
use crate::store::BellStatus;

/// Arguments of `bell`, parsed by clap in `cli/mod.rs`.
pub struct BellArgs {
    pub device: Option<String>,
    pub tag: Option<String>,
    pub action: String,
    pub params: Vec<String>,
    pub ttl: Option<Duration>,
    pub timeout: Option<Duration>,
    pub wait: bool,
    pub json: bool,
}

/// Exit code: 0 all succeeded, 1 any ended otherwise (or did not end).
pub async fn ring(client: &Client, args: BellArgs) -> anyhow::Result<i32> {
    let mut params = BTreeMap::new();
    for p in &args.params {
        let Some((k, v)) = p.split_once('=') else { bail!("--param `{p}`: write it as NAME=VALUE") };
        params.insert(k.to_string(), v.to_string());
    }
    let req = RingRequest {
        device: args.device,
        tag: args.tag,
        action: args.action,
        params,
        ttl_ms: args.ttl.map(|d| d.as_millis() as u64),
        timeout_ms: args.timeout.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        origin: None,
    };
    // Waiting happens server-side, one long request per bell, bounded by
    // the bell's own limits (TTL for delivery plus the run timeout).
    let resp: serde_json::Value = client.post("/v1/bells", &req).await?;
    let mut bells: Vec<BellView> = serde_json::from_value(resp["bells"].clone())?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&bells)?);
        } else {
            for b in &bells {
                println!("{}", b.id);
            }
        }
        return Ok(0);
    }
    let wait_ms = req.ttl_ms.unwrap_or(3_600_000) + req.timeout_ms.map(u64::from).unwrap_or(3_600_000) + 10_000;
    for b in bells.iter_mut() {
        while !b.state.is_final() {
            *b = client.get(&format!("/v1/bells/{}?wait_ms={}", b.id, wait_ms.min(600_000))).await?;
            if !b.state.is_final() && elapsed_ms(b) > wait_ms {
                break;
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&bells)?);
    } else {
        for b in &bells {
            print_result(b);
        }
    }
    Ok(if bells.iter().all(|b| b.state == BellStatus::Succeeded) { 0 } else { 1 })
}

fn elapsed_ms(b: &BellView) -> u64 {
    humantime::parse_rfc3339(&b.created_at)
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn print_result(b: &BellView) {
    println!(
        "bell {} on {}: {} (exit code {}, {})",
        b.id,
        b.device,
        b.state.as_str(),
        b.exit_code.map_or("-".to_string(), |c| c.to_string()),
        b.duration_ms.map_or("-".to_string(), |ms| format!("{ms} ms")),
    );
    if let Some(r) = &b.reason {
        println!("  reason: {r}");
    }
    if !b.output.is_empty() {
        for line in b.output.lines() {
            println!("  | {line}");
        }
    }
}

/// `bells [DEVICE] [--json]`.
pub async fn list(client: &Client, device: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = match device {
        Some(d) => format!("/v1/bells?device={d}"),
        None => "/v1/bells".to_string(),
    };
    let bells: Vec<BellView> = client.get(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&bells)?);
        return Ok(());
    }
    let mut rows = vec![["ID", "DEVICE", "ACTION", "STATE", "EXIT", "UPDATED", "ORIGIN"].map(str::to_string)];
    for b in &bells {
        rows.push([
            b.id.to_string(),
            b.device.clone(),
            b.action.clone(),
            b.state.as_str().to_string(),
            b.exit_code.map_or("-".to_string(), |c| c.to_string()),
            b.updated_at.clone(),
            b.origin.clone(),
        ]);
    }
    print!("{}", super::status::columns(&rows));
    Ok(())
}

/// `bell-show ID [--wait [--timeout D]] [--json]`; with `--wait`, exit 0
/// only if the bell succeeded.
pub async fn show(client: &Client, id: u64, wait: Option<Duration>, json: bool) -> anyhow::Result<i32> {
    let path = match wait {
        Some(w) => format!("/v1/bells/{id}?wait_ms={}", w.as_millis()),
        None => format!("/v1/bells/{id}"),
    };
    let b: BellView = client.get(&path).await?;
    let code = match wait {
        Some(_) if b.state != BellStatus::Succeeded => 1,
        _ => 0,
    };
    show_view(&b, json)?;
    Ok(code)
}

fn show_view(b: &BellView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(b)?);
        return Ok(());
    }
    println!("bell {} · {} on {} · rung by {}", b.id, b.action, b.device, b.origin);
    if !b.params.is_empty() {
        let p: Vec<String> = b.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("params: {}", p.join(" "));
    }
    for t in &b.transitions {
        match &t.note {
            Some(n) => println!("  {}  {:<10} {n}", t.at, t.state.as_str()),
            None => println!("  {}  {}", t.at, t.state.as_str()),
        }
    }
    print_result(b);
    Ok(())
}

/// `cancel ID`.
pub async fn cancel(client: &Client, id: u64) -> anyhow::Result<()> {
    let b: BellView = client.post(&format!("/v1/bells/{id}/cancel"), &serde_json::json!({})).await?;
    if b.state == BellStatus::Cancelled {
        println!("bell {id} cancelled");
    } else {
        println!("bell {id}: cancel sent to {} (now {})", b.device, b.state.as_str());
    }
    Ok(())
}
