//! `demo`: a collector and three real agents on this machine, over TLS,
//! with a status table every 2 s; everything removed afterwards.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::client::Client;
use super::status::render_table;
use crate::config::Config;
use crate::fleet::DeviceView;
use crate::server;

/// Runs the demo for `duration`.
pub async fn run(duration: Duration) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("pulsebell-demo-").tempdir()?;
    let config = Config {
        data_dir: dir.path().join("collector"),
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    let server = server::start(config).await?;
    let ca = server.dev_ca.clone().context("the demo collector has a dev CA")?;
    println!(
        "collector: devices on wss://localhost:{}/v1/ws, admin on http://{}",
        server.device_addr.port(),
        server.admin_addr
    );
    println!("dev CA:    {}", ca.display());
    let client = Client::with_token(&format!("http://{}", server.admin_addr), &server.admin_token)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = vec![];
    for n in 1..=3 {
        let id = format!("demo-{n}");
        let enrolled: serde_json::Value = client.post("/v1/devices", &serde_json::json!({ "id": id })).await?;
        let token = enrolled["token"].as_str().context("enroll returned no token")?;
        let state_dir = dir.path().join(&id);
        let text = format!(
            "collector_url = \"wss://localhost:{port}/v1/ws\"\n\
             device_id = \"{id}\"\n\
             token = \"{token}\"\n\
             ca_file = \"{ca}\"\n\
             interval = \"2s\"\n\
             tags = [\"demo\", \"rack-{rack}\"]\n\
             state_dir = \"{state}\"\n",
            port = server.device_addr.port(),
            ca = ca.display(),
            rack = if n == 3 { "b" } else { "a" },
            state = state_dir.display(),
        );
        let agent_config = pulsebell_agent::config::Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut stop = stop_rx.clone();
        agents.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            pulsebell_agent::run::run(agent_config, shutdown).await
        }));
        println!("enrolled {id}; agent started (real health of this machine, TLS to the collector)");
    }

    let started = Instant::now();
    let mut rang = false;
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        ticker.tick().await;
        let devices: Vec<DeviceView> = client.get("/v1/devices").await?;
        println!("\n── t = {:>2}s ─────────────────────────────────────────────", started.elapsed().as_secs());
        print!("{}", render_table(&devices, std::time::SystemTime::now()));
        if !rang && started.elapsed() >= duration / 2 && devices.iter().all(|d| d.state == "online") {
            rang = true;
            let t = Instant::now();
            let resp: serde_json::Value =
                client.post("/v1/bells?wait_ms=5000", &serde_json::json!({ "tag": "demo", "action": "ping" })).await?;
            let states: Vec<String> = resp["bells"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|b| {
                            format!("{}={}", b["device"].as_str().unwrap_or("?"), b["state"].as_str().unwrap_or("?"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "rang a `ping` bell on tag `demo`: {} in {:.1} ms",
                states.join(" "),
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        if started.elapsed() >= duration {
            break;
        }
    }

    println!("\nshutting down agents and collector…");
    let _ = stop_tx.send(true);
    for a in agents {
        if let Ok(Err(e)) = a.await {
            eprintln!("agent error: {e:#}");
        }
    }
    server.shutdown().await?;
    let path = dir.path().to_path_buf();
    dir.close().context("cannot remove the demo directory")?;
    println!("done; removed {}", path.display());
    Ok(())
}
