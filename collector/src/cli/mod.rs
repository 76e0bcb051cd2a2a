//! The `pulsebell-collector` command line: the server (`serve`), the demo,
//! and the operator commands, which talk to the admin API. One file per
//! group of subcommands.

mod bell;
mod checks;
mod client;
mod cluster;
mod demo;
mod events;
mod history;
mod provision;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub use client::{ApiError, Client, DEFAULT_ADMIN};

use crate::config::{Config, DEFAULT_CONFIG, EX_CONFIG};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./pulsebell-data";

/// The command line.
#[derive(Parser)]
#[command(name = "pulsebell-collector", version, about = "Pulsebell collector: server and operator CLI")]
pub struct Cli {
    /// Admin API URL [default: the running collector's in --data-dir, else http://127.0.0.1:9180]
    #[arg(long, global = true)]
    pub admin: Option<String>,
    /// Data directory (admin token, TLS material, database) [default: ./pulsebell-data]
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// A command-line duration: `30s`, `10m`, `1h 30m`, or a bare number of
/// seconds (`8`, `2.5`), which is what people type.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && (0.0..1e9).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("`{s}` is not a duration: seconds must be between 0 and 1e9"));
    }
    humantime::parse_duration(t).map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 8, 30s, 10m, 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_bare_seconds_and_units() {
        assert_eq!(parse_duration("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }
}

/// Subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the collector.
    Serve {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Device listener address [default: 0.0.0.0:8443]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener address [default: 127.0.0.1:9180]
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Cluster mode: NATS servers, comma-separated (config: [cluster] nats_urls)
        #[arg(long, value_name = "URL[,URL...]")]
        nats: Option<String>,
        /// This node's id in the cluster [default: the hostname]
        #[arg(long)]
        node_id: Option<String>,
    },
    /// Provisioning keys: one key in an image enrols many boards.
    Provision {
        /// What to do.
        #[command(subcommand)]
        action: ProvisionCommand,
    },
    /// The cluster's collectors (cluster mode).
    Cluster {
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Copy a sled data dir (enrolments, device state, bells, events,
    /// history, pending alerts) into NATS JetStream for cluster mode.
    Migrate {
        /// The single collector's data dir (stop that collector first).
        #[arg(long)]
        from: PathBuf,
        /// NATS servers, comma-separated.
        #[arg(long, value_name = "URL[,URL...]")]
        nats: String,
        /// Stream and bucket replicas [default: 3 in a NATS cluster, 1 on a single server]
        #[arg(long)]
        replicas: Option<usize>,
    },
    /// Start a collector and three real agents on this machine, show the status table, clean up.
    Demo {
        /// How long to run.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        duration: Duration,
    },
    /// Print the commented default config.
    PrintDefaultConfig,
    /// Validate a config file.
    CheckConfig {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Enroll a device; prints its token on the last line.
    Enroll {
        /// Device id.
        id: String,
        /// Issue a new token for an enrolled device (the old one stops working).
        #[arg(long)]
        rotate: bool,
    },
    /// Remove a device's enrolment and disconnect it.
    Revoke {
        /// Device id.
        id: String,
    },
    /// One row per device.
    Status {
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one device.
    Show {
        /// Device id.
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ring a bell: run an allowlisted action on a device, or on every device with a tag.
    Bell {
        /// DEVICE ACTION, or ACTION with --tag.
        #[arg(num_args = 1..=2, required = true, value_names = ["TARGET", "ACTION"])]
        args: Vec<String>,
        /// Every device with this tag instead of one device.
        #[arg(long)]
        tag: Option<String>,
        /// Parameter NAME=VALUE (repeatable).
        #[arg(long = "param", short = 'p')]
        params: Vec<String>,
        /// How long to wait for an offline device [default: 1h]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Run-time limit, at most the action's own [default: the action's]
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Wait for the result; exit 0 only if every bell succeeded.
        #[arg(long)]
        wait: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Recent bells.
    Bells {
        /// Only this device's.
        device: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One bell with every transition.
    BellShow {
        /// Bell id.
        id: u64,
        /// Wait until it ends (exit 0 only if it succeeded).
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a bell.
    Cancel {
        /// Bell id.
        id: u64,
    },
    /// A device's one-minute history: sparkline and min/avg/max, or JSON.
    History {
        /// Device id.
        device: String,
        /// cpu, temp, mem or load.
        #[arg(long, default_value = "cpu")]
        metric: String,
        /// How far back.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        since: Duration,
        /// JSON buckets.
        #[arg(long)]
        json: bool,
    },
    /// The agents' application checks, across the fleet or of one device.
    Checks {
        /// Only this device's.
        device: Option<String>,
        /// Only checks in this status: ok, warning (warn), critical (crit), unknown.
        #[arg(long)]
        status: Option<String>,
        /// JSON array of {device, name, kind, status, summary, since, output}.
        #[arg(long)]
        json: bool,
    },
    /// The `[[rules]]`: each with its last bell and what it held back.
    Rules {
        /// JSON array of {name, when, action, tags, cooldown_secs, max_per_hour, last_fired, fired_last_hour, holding, held_back}.
        #[arg(long)]
        json: bool,
    },
    /// Online/offline events.
    Events {
        /// Only this device's.
        device: Option<String>,
        /// Only events newer than this (e.g. 1h).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `provision` subcommands.
#[derive(Subcommand)]
pub enum ProvisionCommand {
    /// Create a key; it is shown once, with the CA fingerprint agents pin.
    Create {
        /// Tag for every device it enrols (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// How many devices it may enrol [default: unlimited]
        #[arg(long)]
        uses: Option<u32>,
        /// How long it is valid [default: no expiry]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List keys (without the keys themselves).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it enrols nothing more (enrolled devices stay).
    Revoke {
        /// Key id.
        id: String,
    },
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(ce) = e.downcast_ref::<crate::config::ConfigError>() {
                let _ = ce;
                return EX_CONFIG;
            }
            1
        }
    }
}

fn usage(msg: &str) -> anyhow::Result<i32> {
    eprintln!("error: {msg}");
    Ok(2)
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let data_dir_arg = cli.data_dir.clone();
    let data_dir = data_dir_arg.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let client = || Client::new(cli.admin.as_deref(), &data_dir);
    match cli.command {
        Command::Serve { config, listen, admin_listen, nats, node_id } => {
            let mut config = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if let Some(d) = data_dir_arg {
                config.data_dir = d;
            }
            if let Some(l) = listen {
                config.listen = l;
            }
            if let Some(a) = admin_listen {
                config.admin_listen = a;
            }
            if let Some(urls) = nats {
                config.cluster.nats_urls =
                    urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
            }
            if let Some(id) = node_id {
                config.cluster.node_id = Some(id);
            }
            config.validate()?;
            serve(config).await?;
            Ok(0)
        }
        Command::Provision { action } => {
            provision::run(&client()?, action).await?;
            Ok(0)
        }
        Command::Cluster { json } => {
            cluster::show(&client()?, json).await?;
            Ok(0)
        }
        Command::Migrate { from, nats, replicas } => {
            cluster::migrate(&from, &nats, replicas).await?;
            Ok(0)
        }
        Command::Demo { duration } => {
            demo::run(duration).await?;
            Ok(0)
        }
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(0)
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            println!(
                "{}: ok (devices on {}, admin on {}, data in {})",
                config.display(),
                c.listen,
                c.admin_listen,
                c.data_dir.display()
            );
            Ok(0)
        }
        Command::Enroll { id, rotate } => {
            let resp: serde_json::Value =
                client()?.post("/v1/devices", &serde_json::json!({ "id": id, "rotate": rotate })).await?;
            let token = resp["token"].as_str().unwrap_or_default();
            println!("enrolled `{id}`; its token (shown once; put it in the agent's token_file):");
            println!("{token}");
            Ok(0)
        }
        Command::Revoke { id } => {
            let _: serde_json::Value = client()?.delete(&format!("/v1/devices/{id}")).await?;
            println!("revoked `{id}`");
            Ok(0)
        }
        Command::Status { json } => {
            status::status(&client()?, json).await?;
            Ok(0)
        }
        Command::Show { id, json } => {
            status::show(&client()?, &id, json).await?;
            Ok(0)
        }
        Command::Bell { args, tag, params, ttl, timeout, wait, json } => {
            let (device, action) = match (args.len(), &tag) {
                (1, Some(_)) => (None, args[0].clone()),
                (2, None) => (Some(args[0].clone()), args[1].clone()),
                (1, None) => return usage("give a device and an action (`bell DEVICE ACTION`), or `--tag TAG ACTION`"),
                _ => return usage("with --tag, give only the action (`bell --tag TAG ACTION`)"),
            };
            let args = bell::BellArgs { device, tag, action, params, ttl, timeout, wait, json };
            if let Some(p) = args.params.iter().find(|p| !p.contains('=')) {
                return usage(&format!("--param `{p}`: write it as NAME=VALUE"));
            }
            bell::ring(&client()?, args).await
        }
        Command::Bells { device, json } => {
            bell::list(&client()?, device.as_deref(), json).await?;
            Ok(0)
        }
        Command::BellShow { id, wait, timeout, json } => {
            bell::show(&client()?, id, wait.then_some(timeout), json).await
        }
        Command::Cancel { id } => {
            bell::cancel(&client()?, id).await?;
            Ok(0)
        }
        Command::History { device, metric, since, json } => {
            if history_metric_invalid(&metric) {
                return usage("--metric must be one of cpu, temp, mem, load");
            }
            history::show(&client()?, &device, &metric, since, json).await?;
            Ok(0)
        }
        Command::Checks { device, status, json } => {
            let status = match status.as_deref().map(|s| (s, pulsebell_proto::CheckStatus::parse(s))) {
                None => None,
                Some((_, Some(s))) => Some(s.as_str()),
                Some((s, None)) => return usage(&format!("--status `{s}`: use ok, warning, critical or unknown")),
            };
            checks::list(&client()?, device.as_deref(), status, json).await?;
            Ok(0)
        }
        Command::Rules { json } => {
            checks::rules(&client()?, json).await?;
            Ok(0)
        }
        Command::Events { device, since, json } => {
            events::list(&client()?, device.as_deref(), since, json).await?;
            Ok(0)
        }
    }
}

fn history_metric_invalid(m: &str) -> bool {
    crate::history::Metric::parse(m).is_none()
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = crate::server::start(config).await?;
    if let Some(ca) = &server.dev_ca {
        tracing::info!(ca = %ca.display(), "using a generated dev CA: agents need `ca_file` pointing at a copy of it");
    }
    tracing::info!(devices = %server.device_addr, admin = %server.admin_addr, "collector ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    server.run_until(shutdown_signal()).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
