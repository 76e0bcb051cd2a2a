//! `events`: online/offline transitions.

use std::time::Duration;

use super::client::Client;
use crate::clock::now_ms;

/// `events [DEVICE] [--since DUR] [--json]`.
pub async fn list(client: &Client, device: Option<&str>, since: Option<Duration>, json: bool) -> anyhow::Result<()> {
    let since_ms = since.map_or(0, |d| now_ms().saturating_sub(d.as_millis() as u64));
    let mut path = format!("/v1/events?since_ms={since_ms}");
    if let Some(d) = device {
        path.push_str(&format!("&device={d}"));
    }
    let events: Vec<serde_json::Value> = client.get(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(());
    }
    let mut rows = vec![["AT", "DEVICE", "KIND", "REASON", "GENERATION"].map(str::to_string)];
    for e in &events {
        // A check event names the check where the liveness reason goes.
        let reason = match e.get("check") {
            Some(c) => format!("{} {}", c["name"].as_str().unwrap_or(""), c["status"].as_str().unwrap_or("")),
            None => e["reason"].as_str().unwrap_or("").to_string(),
        };
        let text = |k: &str| e[k].as_str().unwrap_or("").to_string();
        rows.push([text("at"), text("device"), text("kind"), reason, e["generation"].to_string()]);
    }
    print!("{}", super::status::columns(&rows));
    Ok(())
}
