//! Bell round trip: admin API request → collector persists the bell → agent
//! runs `ping` → result persisted → API answers. Real TLS, real sled, real
//! agent, all on loopback in one process.
//!
//! `cargo run --release -p pulsebell-collector --example bell_rtt -- [N]`

use std::time::{Duration, Instant};

use pulsebell_collector::{cli::Client, config::Config, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().join("collector"),
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    let server = server::start(config).await?;
    let client = Client::with_token(&format!("http://{}", server.admin_addr), &server.admin_token)?;
    let enrolled: serde_json::Value = client.post("/v1/devices", &serde_json::json!({ "id": "bench-1" })).await?;
    let agent_config = pulsebell_agent::config::Config::parse(&format!(
        "collector_url = \"wss://localhost:{}/v1/ws\"\ndevice_id = \"bench-1\"\ntoken = \"{}\"\nca_file = \"{}\"\ninterval = \"1s\"\nstate_dir = \"{}\"\n",
        server.device_addr.port(),
        enrolled["token"].as_str().unwrap_or_default(),
        server.dev_ca.as_ref().expect("dev CA").display(),
        dir.path().join("agent").display(),
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(pulsebell_agent::run::run(agent_config, async move {
        let _ = stop_rx.changed().await;
    }));
    // Wait until the device is online.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d: serde_json::Value = client.get("/v1/devices/bench-1").await?;
        if d["state"] == "online" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the agent did not come online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ring = serde_json::json!({ "device": "bench-1", "action": "ping" });
    for _ in 0..20 {
        let _: serde_json::Value = client.post("/v1/bells?wait_ms=5000", &ring).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp: serde_json::Value = client.post("/v1/bells?wait_ms=5000", &ring).await?;
        let rtt = t.elapsed();
        anyhow::ensure!(resp["bells"][0]["state"] == "succeeded", "bell did not succeed: {resp}");
        samples.push(rtt);
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| bells | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {:.2} | {:.2} | {:.2} | {:.2} |",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(*samples.last().expect("samples"))
    );
    let _ = stop_tx.send(true);
    let _ = agent.await;
    server.shutdown().await?;
    Ok(())
}
