//! `pulsebell-agent`: thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pulsebell_agent::config::{Config, DEFAULT_CONFIG, EX_CONFIG};
use pulsebell_agent::{checks, health, run};

#[derive(Parser)]
#[command(
    name = "pulsebell-agent",
    version,
    about = "Pulsebell device agent: pulses health to the collector, runs allowlisted actions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the daemon).
    Run {
        /// Config file.
        #[arg(long, short, default_value = "/etc/pulsebell/agent.toml")]
        config: PathBuf,
    },
    /// Print one health sample of this machine.
    Health {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Root of /proc and /sys (for testing with a fake tree).
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// Run the configured checks once (retries ignored) and exit with the
    /// worst status's Nagios code: 0 ok, 1 warning, 2 critical, 3 unknown.
    Check {
        /// Only this check.
        name: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Config file (its token is not needed).
        #[arg(long, short, default_value = "/etc/pulsebell/agent.toml")]
        config: PathBuf,
    },
    /// Print the commented default config.
    PrintDefaultConfig,
    /// Validate a config file, its token and CA files.
    CheckConfig {
        /// Config file.
        #[arg(long, short, default_value = "/etc/pulsebell/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_CONFIG as u8 } else { 0 });
        }
    };
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                let urls: Vec<&str> = c.collectors.iter().map(|u| u.url.as_str()).collect();
                let collectors = match urls.as_slice() {
                    [one] => format!("collector {one}"),
                    many => format!("{} collectors [{}]", many.len(), many.join(", ")),
                };
                println!(
                    "{}: ok (device `{}`, {collectors}, interval {}, {} action(s), {} check(s))",
                    config.display(),
                    c.device_id,
                    humantime::format_duration(c.interval),
                    c.actions.len(),
                    c.checks.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(EX_CONFIG as u8)
            }
        },
        Command::Check { name, json, config } => check(name, json, &config),
        Command::Health { json, root } => {
            let mut sampler = health::Sampler::new(root.clone(), root.clone());
            // CPU and network are rates: measure over a short window.
            std::thread::sleep(std::time::Duration::from_millis(500));
            let sample = sampler.sample();
            let facts = health::facts(&root);
            if json {
                let mut v = health::to_json(&sample);
                v["facts"] = serde_json::to_value(&facts).unwrap_or_default();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", render_table(&facts, &sample));
            }
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(EX_CONFIG as u8);
                }
            };
            init_logging();
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run::run(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `check`: the config's checks once, an exit code for Nagios and NRPE.
fn check(name: Option<String>, json: bool, path: &std::path::Path) -> ExitCode {
    // Parse only: the token (mode 0600) is not needed, and NRPE's user may
    // not be able to read it.
    let config = match std::fs::read_to_string(path)
        .map_err(|e| format!("invalid config: cannot read {}: {e}", path.display()))
        .and_then(|text| Config::parse(&text).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    let mut selected = config.checks.clone();
    if let Some(name) = &name {
        selected.retain(|n, _| n == name);
        if selected.is_empty() {
            let names: Vec<&str> = config.checks.keys().map(String::as_str).collect();
            let known = if names.is_empty() { "none are configured".to_string() } else { names.join(", ") };
            eprintln!("{}: no check named `{name}` (checks: {known})", path.display());
            return ExitCode::from(EX_CONFIG as u8);
        }
    } else if selected.is_empty() && !json {
        eprintln!("{}: no checks configured", path.display());
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let results = runtime.block_on(checks::run_once(&checks::Runner::new(&config), &selected));
    if json {
        println!("{}", checks::to_json(&results));
    } else if !results.is_empty() {
        print!("{}", checks::render_table(&results));
    }
    ExitCode::from(checks::exit_code(&results))
}

fn init_logging() {
    // A level, not a full filter: keeps the agent binary small.
    let level = std::env::var("PULSEBELL_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    // Colour only on a terminal, and never with NO_COLOR set (no-color.org).
    let colour = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    // Under systemd, journald adds its own timestamps.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn render_table(facts: &health::SystemFacts, h: &pulsebell_proto::Health) -> String {
    use pulsebell_proto::Throttled as T;
    let gib = |kib: u64| kib as f64 / (1024.0 * 1024.0);
    let mut rows: Vec<(&str, String)> = vec![
        ("hostname", facts.hostname.clone()),
        ("os", facts.os.clone()),
        ("kernel", facts.kernel.clone()),
        ("arch", facts.arch.clone()),
        ("board", facts.board_model.clone().unwrap_or_else(|| "-".into())),
        ("boot id", facts.boot_id.clone()),
        ("uptime", humantime::format_duration(std::time::Duration::from_secs(h.uptime_secs)).to_string()),
        ("cpu", format!("{:.1} %", h.cpu_percent())),
        (
            "load",
            format!(
                "{:.2} {:.2} {:.2}",
                h.load1_centi as f64 / 100.0,
                h.load5_centi as f64 / 100.0,
                h.load15_centi as f64 / 100.0
            ),
        ),
        ("memory", format!("{:.2} / {:.2} GiB", gib(h.mem_used_kib), gib(h.mem_total_kib))),
        ("swap", format!("{:.2} / {:.2} GiB", gib(h.swap_used_kib), gib(h.swap_total_kib))),
        ("disk", format!("{:.1} / {:.1} GiB", h.disk_used_mib as f64 / 1024.0, h.disk_total_mib as f64 / 1024.0)),
        ("temperature", h.temp_celsius().map_or("-".into(), |t| format!("{t:.1} °C"))),
        ("net rx/tx", format!("{} / {} B/s", h.net_rx_bps, h.net_tx_bps)),
    ];
    let throttled = match h.throttled {
        None => "- (not a Raspberry Pi)".to_string(),
        Some(t) if !t.any() => "none".to_string(),
        Some(t) => {
            let names = [
                (T::UNDER_VOLTAGE, "under-voltage"),
                (T::FREQ_CAPPED, "frequency capped"),
                (T::THROTTLED, "throttled"),
                (T::SOFT_TEMP_LIMIT, "soft temperature limit"),
            ];
            let mut parts = vec![];
            for (flag, name) in names {
                if t.now(flag) {
                    parts.push(format!("{name} NOW"));
                } else if t.since_boot(flag) {
                    parts.push(format!("{name} since boot"));
                }
            }
            parts.join(", ")
        }
    };
    rows.push(("throttling", throttled));
    rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}
