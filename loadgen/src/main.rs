//! `pulsebell-loadgen`: simulates a fleet of devices against a running
//! collector — real TLS WebSockets from the agent's own uplink code, real
//! pulses at a given interval, bells answered like the agent's `ping` — and
//! reports what the collector made of it. With `--mqtt` the same fleet
//! speaks MQTT over TLS to a broker, for comparison.
//!
//! Phases: enrol (bulk, through the admin API) → ramp (connect at `--ramp`
//! per second until every device is connected) → hold (`--duration`, the
//! measured window; bells are rung here; SIGUSR1 ends it early) → settle (pulses stop; wait until
//! the collector has stored everything) → close.
//!
//! Several processes with distinct `--id-prefix` values can share one
//! collector; each reports its own devices and the collector's totals.
//!
//! Cluster mode: `--url` takes several collector URLs, comma-separated.
//! Every device starts at the first (or at a random one with
//! `--random-start`, as the agent does) and, like the agent with
//! `collector_urls`, moves to the next after a failed attempt or a lost
//! session, so the devices of a collector that dies fail over to the
//! others. Enrolment and the counters go through `--admin` (one node of
//! the cluster); `connected_by_url` in the summary says where the devices
//! ended up.
#![forbid(unsafe_code)]

mod fleet;
mod hops;
mod mqtt;
mod probe;
mod ws;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use pulsebell_agent::config::CollectorUrl;
use pulsebell_agent::uplink::endpoints::Endpoints;
use pulsebell_agent::uplink::{tls, Dialer};
use pulsebell_collector::cli::Client;
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::http::Uri;

use crate::fleet::Shared;
use crate::probe::{percentile, Monotonic, PidSource, Process};

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Simulates devices against a Pulsebell collector (or an MQTT broker).
#[derive(Parser, Debug)]
#[command(name = "pulsebell-loadgen", version)]
struct Args {
    /// Device endpoint: wss://HOST:PORT/v1/ws (with --mqtt: mqtts://HOST:PORT).
    /// Several, comma-separated (collectors of a cluster): a device is
    /// connected to one at a time and moves to the next after a failed
    /// attempt or a lost session, as the agent does with `collector_urls`.
    #[arg(long)]
    url: String,
    /// With several --url: start each device at a random URL (as the agent
    /// does) instead of the first.
    #[arg(long)]
    random_start: bool,
    /// CA bundle (PEM) the server certificate must chain to.
    #[arg(long)]
    ca_file: PathBuf,
    /// Admin API base URL (default: from DIR/run.json).
    #[arg(long)]
    admin: Option<String>,
    /// The collector's data dir: the admin token is read from DIR/admin.token.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Devices to simulate.
    #[arg(long)]
    devices: usize,
    /// Pulse interval; 0 floods (pulses back to back, as fast as the socket takes them).
    #[arg(long, value_parser = parse_duration)]
    interval: Duration,
    /// Same as --interval 0.
    #[arg(long)]
    flood: bool,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 1000.0)]
    ramp: f64,
    /// Length of the measured window once every device is connected.
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Prefix of the device ids (ids are PREFIX000000, PREFIX000001, ...).
    #[arg(long, default_value = "lg-")]
    id_prefix: String,
    /// Pid of the collector (or broker) to measure RSS and CPU of
    /// (default: the pid in DIR/run.json, following restarts).
    #[arg(long)]
    collector_pid: Option<u32>,
    /// Ping bells to ring per second during the window, at random connected devices.
    #[arg(long, default_value_t = 0.0)]
    bells_per_sec: f64,
    /// Final summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Speak MQTT over TLS to a broker instead.
    #[arg(long)]
    mqtt: bool,
    /// MQTT keep-alive (default: 2 x interval, so a dead device is noticed
    /// after 3 intervals as the collector does).
    #[arg(long, value_parser = parse_duration)]
    keep_alive: Option<Duration>,
    /// Local source addresses, FIRST-LAST (IPv4), or `none` for the kernel's choice.
    #[arg(long, default_value = "127.0.0.2-127.0.0.50")]
    sources: String,
    /// First reconnect backoff ceiling (the agent's is 1s; it doubles to 60s, full jitter).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    backoff_base: Duration,
    /// How often the collector's /v1/stats is read for the live line; 0 reads it
    /// only at the window's edges (the endpoint walks every device).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    stats_every: Duration,
    /// Longest wait, after the pulses stop, for the collector to report every
    /// pulse stored (its `sync_interval`, 30 s by default, plus a margin).
    #[arg(long, value_parser = parse_duration, default_value = "40s")]
    settle: Duration,
    /// Longest wait for every device to connect after the ramp.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    connect_grace: Duration,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// Raises the open-file limit to the hard limit; returns the soft limit now.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.maximum != limit.current {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn parse_sources(s: &str) -> anyhow::Result<Vec<Option<IpAddr>>> {
    if s == "none" {
        return Ok(vec![None]);
    }
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.trim().parse().with_context(|| format!("bad --sources `{s}`"))?;
    let b: Ipv4Addr = b.trim().parse().with_context(|| format!("bad --sources `{s}`"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_536 {
        bail!("bad --sources `{s}`: FIRST-LAST with FIRST <= LAST");
    }
    Ok((a..=b).map(|ip| Some(IpAddr::V4(Ipv4Addr::from(ip)))).collect())
}

fn parse_url(url: &str, scheme: &str) -> anyhow::Result<(String, u16)> {
    let uri: Uri = url.parse().with_context(|| format!("`{url}` is not a URL"))?;
    if uri.scheme_str() != Some(scheme) {
        bail!("`{url}` must start with {scheme}://");
    }
    let host = uri.host().context("the URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if scheme == "wss" { 443 } else { 8883 });
    Ok((host, port))
}

/// The server's counters: accepted (in memory) and stored (on disk).
#[derive(Default)]
struct Counters {
    accepted: Monotonic,
    stored: Monotonic,
}

/// Where "accepted" comes from.
enum Source {
    /// The collector's /v1/stats.
    Collector(Client),
    /// The MQTT subscriber's count.
    Subscriber(Arc<AtomicU64>),
}

struct Meter {
    source: Source,
    counters: Mutex<Counters>,
    process: Process,
}

impl Meter {
    /// Reads the counters; (accepted total, stored total) since the first read.
    async fn poll(&self) -> Option<(u64, u64)> {
        let (accepted, stored) = match &self.source {
            Source::Collector(client) => {
                let v: Value =
                    tokio::time::timeout(Duration::from_secs(5), client.get("/v1/stats")).await.ok()?.ok()?;
                (v["pulses_accepted"].as_u64()?, v["pulses_stored"].as_u64()?)
            }
            Source::Subscriber(n) => {
                let n = n.load(Ordering::Relaxed);
                (n, n)
            }
        };
        let mut c = self.counters.lock().expect("counters lock");
        Some((c.accepted.feed(accepted as f64) as u64, c.stored.feed(stored as f64) as u64))
    }

    fn totals(&self) -> (u64, u64) {
        let c = self.counters.lock().expect("counters lock");
        (c.accepted.total() as u64, c.stored.total() as u64)
    }
}

/// A point of the run, as the live loop records it.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    sent: u64,
    accepted: u64,
    cpu: Option<f64>,
}

/// One second of the run: (seconds since start, connected, pulses sent/s, accepted/s).
type Second = (f64, i64, u64, Option<u64>);

struct Live {
    shared: Arc<Shared>,
    meter: Arc<Meter>,
    devices: usize,
    started: Instant,
    stats_every: Duration,
    holding: AtomicBool,
    /// (seconds since start, connected, pulses sent/s, accepted/s)
    timeline: Mutex<Vec<Second>>,
    /// Outages during the window: (starts at s, lasted s, fewest connected, ended at Unix ms).
    outages: Mutex<Vec<(f64, f64, i64, u64)>>,
    /// The outage going on: since when, fewest connected.
    outage: Mutex<Option<(Instant, i64)>>,
}

impl Live {
    async fn run(self: Arc<Self>) {
        // The collector's counters are read by a task of their own, so a slow
        // or unreachable admin API never stalls the outage sampling.
        let rates: Arc<Mutex<Option<f64>>> = Arc::new(Mutex::new(None));
        if !self.stats_every.is_zero() {
            let (meter, rates, every) = (self.meter.clone(), rates.clone(), self.stats_every);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last: Option<(u64, Instant)> = None;
                loop {
                    tick.tick().await;
                    let now = meter.poll().await.map(|(accepted, _)| (accepted, Instant::now()));
                    *rates.lock().expect("rates") = match (last, now) {
                        (Some((a0, t0)), Some((a1, t1))) => {
                            Some(a1.saturating_sub(a0) as f64 / t1.duration_since(t0).as_secs_f64().max(0.001))
                        }
                        _ => None,
                    };
                    last = now;
                }
            });
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut n = 0u64;
        let mut last_line = (0u64, Instant::now());
        loop {
            tick.tick().await;
            n += 1;
            let connected = self.shared.connected.load(Ordering::Relaxed);
            if self.holding.load(Ordering::Relaxed) {
                let mut outage = self.outage.lock().expect("outage");
                match &mut *outage {
                    None if connected < self.devices as i64 => *outage = Some((Instant::now(), connected)),
                    Some((_, fewest)) if connected < *fewest => *fewest = connected,
                    Some((since, fewest)) if connected >= self.devices as i64 => {
                        let start = since.duration_since(self.started).as_secs_f64();
                        let lasted = since.elapsed().as_secs_f64();
                        self.outages.lock().expect("outages").push((start, lasted, *fewest, unix_ms()));
                        *outage = None;
                    }
                    _ => {}
                }
            }
            if !n.is_multiple_of(10) {
                continue;
            }
            let sent = self.shared.sent.load(Ordering::Relaxed);
            let secs = last_line.1.elapsed().as_secs_f64().max(0.001);
            let sent_rate = ((sent - last_line.0) as f64 / secs).round() as u64;
            last_line = (sent, Instant::now());
            let accepted_rate = rates.lock().expect("rates").map(|r| r.round() as u64);
            let t = (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
            self.timeline.lock().expect("timeline").push((t, connected, sent_rate, accepted_rate));
            let failures: u64 = self.shared.failures.lock().expect("failures").values().sum();
            let by_url = if self.shared.by_endpoint.len() > 1 {
                let counts: Vec<String> =
                    self.shared.by_endpoint.iter().map(|n| n.load(Ordering::Relaxed).to_string()).collect();
                format!("  by url {}", counts.join("/"))
            } else {
                String::new()
            };
            eprintln!(
                "[{t:>6.1}s] connected {connected:>6}/{}  sent {sent_rate:>7}/s  accepted {:>7}/s  failures {failures}{by_url}",
                self.devices,
                accepted_rate.map_or("-".to_string(), |r| r.to_string()),
            );
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn mark(shared: &Shared, meter: &Meter) -> Mark {
    let _ = meter.poll().await;
    let (accepted, _) = meter.totals();
    let (cpu, _) = meter.process.sample();
    Mark { at: Instant::now(), sent: shared.sent.load(Ordering::Relaxed), accepted, cpu }
}

/// Rings ping bells at random connected devices until `until` (or until the
/// window ends early); the bells that succeeded, and the number that did
/// not.
async fn ring_bells(
    client: Arc<Client>,
    shared: Arc<Shared>,
    ids: Arc<Vec<Box<str>>>,
    per_sec: f64,
    until: Instant,
    ended: Arc<AtomicBool>,
) -> (Vec<hops::Rung>, u64) {
    let results = Arc::new(Mutex::new((Vec::new(), 0u64)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < until && !ended.load(Ordering::Relaxed) {
        tick.tick().await;
        let target =
            (0..50).map(|_| rand::rng().random_range(0..ids.len())).find(|i| shared.online[*i].load(Ordering::Relaxed));
        let Some(target) = target else { continue };
        let (client, results, device) = (client.clone(), results.clone(), ids[target].to_string());
        tasks.spawn(async move {
            let body = json!({ "device": device, "action": "ping" });
            let sent = hops::unix_ms();
            let t = std::time::Instant::now();
            let r: anyhow::Result<Value> = client.post("/v1/bells?wait_ms=5000", &body).await;
            let rtt = t.elapsed().as_secs_f64() * 1000.0;
            let mut res = results.lock().expect("bell results");
            match r {
                Ok(mut v) if v["bells"][0]["state"] == "succeeded" => {
                    res.0.push(hops::Rung { rtt, sent, bell: v["bells"][0].take() })
                }
                _ => res.1 += 1,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut res = results.lock().expect("bell results");
    (std::mem::take(&mut res.0), res.1)
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.flood {
        args.interval = Duration::ZERO;
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t);
    }
    rt.enable_all().build()?.block_on(run(args.json, &args))
}

async fn run(json_out: bool, args: &Args) -> anyhow::Result<()> {
    // SIGUSR1 ends the window early (a script that has seen what it waited
    // for, e.g. every device back after a collector was killed); one that
    // arrives before the window ends it as soon as it starts.
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let nofile = raise_nofile();
    if (args.devices as u64) + 64 > nofile {
        eprintln!("warning: {} devices but only {nofile} open files allowed", args.devices);
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if args.ramp.is_nan() || args.ramp <= 0.0 {
        bail!("--ramp must be positive");
    }
    let tls = tls::client_config(Some(&args.ca_file))?;
    let urls: Vec<&str> = args.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        bail!("--url is empty");
    }
    if args.mqtt && urls.len() > 1 {
        bail!("--mqtt takes one --url");
    }
    let shared = Arc::new(Shared::new(args.devices, urls.len(), args.interval, args.backoff_base));
    let ids: Arc<Vec<Box<str>>> =
        Arc::new((0..args.devices).map(|i| format!("{}{i:06}", args.id_prefix).into_boxed_str()).collect());
    let started = Instant::now();
    let started_unix_ms = unix_ms();

    // What is measured, and the devices' connection details.
    let (meter, client, dialers, broker, subscribed) = if args.mqtt {
        let (host, port) = parse_url(urls[0], "mqtts")?;
        let keep_alive = args.keep_alive.unwrap_or((args.interval * 2).max(Duration::from_secs(5)));
        let broker = mqtt::Broker { host, port, tls: tls.clone(), keep_alive };
        let received = Arc::new(AtomicU64::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        tokio::spawn(mqtt::subscriber(broker.clone(), received.clone(), ready.clone(), shared.clone()));
        let pid = args.collector_pid.map_or(PidSource::None, PidSource::Fixed);
        let meter =
            Meter { source: Source::Subscriber(received), counters: Default::default(), process: Process::new(pid) };
        (meter, None, vec![], Some(broker), Some(ready))
    } else {
        let collectors: Vec<CollectorUrl> = urls
            .iter()
            .map(|u| parse_url(u, "wss").map(|(host, port)| CollectorUrl { url: u.to_string(), host, port }))
            .collect::<anyhow::Result<_>>()?;
        let data_dir = args.data_dir.clone().context("--data-dir is required (the admin token is read from it)")?;
        let client = Arc::new(Client::new(args.admin.as_deref(), &data_dir)?);
        let pid = match args.collector_pid {
            Some(p) => PidSource::Fixed(p),
            None => PidSource::RunFile(data_dir.join("run.json")),
        };
        let meter = Meter {
            source: Source::Collector(Client::new(args.admin.as_deref(), &data_dir)?),
            counters: Default::default(),
            process: Process::new(pid),
        };
        // Enrol in bulk; rotate so a rerun against the same collector works.
        let mut tokens = Vec::with_capacity(args.devices);
        for chunk in ids.chunks(5000) {
            let body = json!({ "ids": chunk, "rotate": true });
            let v: Value = client.post("/v1/devices/bulk", &body).await.context("bulk enrolment failed")?;
            for e in v["enrolled"].as_array().context("bulk enrolment answered no `enrolled` list")? {
                tokens.push(e["token"].as_str().context("bulk enrolment returned no token")?.to_string());
            }
        }
        if tokens.len() != args.devices {
            bail!("enrolled {} devices, wanted {}", tokens.len(), args.devices);
        }
        let mut rng = rand::rng();
        let dialers: Vec<Endpoints<Dialer>> = tokens
            .into_iter()
            .map(|t| {
                let ring = collectors.iter().map(|url| Dialer::new(url.clone(), t.clone(), tls.clone())).collect();
                let start = if args.random_start { rng.random_range(0..collectors.len()) } else { 0 };
                Endpoints::new(ring, start).expect("at least one URL")
            })
            .collect();
        (meter, Some(client), dialers, None, None)
    };
    let meter = Arc::new(meter);
    let (_, rss_start) = meter.process.sample();
    let _ = meter.poll().await;
    let enrolled_at = Instant::now();
    if let Some(ready) = &subscribed {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.load(Ordering::Relaxed) {
            if Instant::now() > deadline {
                bail!("the MQTT subscriber did not get subscribed within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let live = Arc::new(Live {
        shared: shared.clone(),
        meter: meter.clone(),
        devices: args.devices,
        started,
        stats_every: args.stats_every,
        holding: AtomicBool::new(false),
        timeline: Mutex::new(vec![]),
        outages: Mutex::new(vec![]),
        outage: Mutex::new(None),
    });
    let live_task = tokio::spawn(live.clone().run());

    // Ramp.
    let sources = parse_sources(&args.sources)?;
    let mut tasks = Vec::with_capacity(args.devices);
    {
        let step = Duration::from_secs_f64(1.0 / args.ramp);
        let mut next = Instant::now();
        let mut dialers = dialers.into_iter();
        for idx in 0..args.devices {
            if next > Instant::now() {
                tokio::time::sleep_until(next).await;
            }
            next += step;
            let id = ids[idx].clone();
            let task = match &broker {
                Some(b) => tokio::spawn(mqtt::device(shared.clone(), idx, id, b.clone())),
                None => {
                    let dialer = dialers.next().expect("one dialer per device");
                    let local = sources[idx % sources.len()];
                    tokio::spawn(ws::device(shared.clone(), idx, id, dialer, local))
                }
            };
            tasks.push(task);
        }
    }
    let deadline = Instant::now() + args.connect_grace;
    while (shared.connected.load(Ordering::Relaxed) as usize) < args.devices && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_secs = enrolled_at.elapsed().as_secs_f64();
    let all_connected = shared.connected.load(Ordering::Relaxed) as usize >= args.devices;
    if !all_connected {
        eprintln!(
            "warning: only {} of {} devices connected after the ramp",
            shared.connected.load(Ordering::Relaxed),
            args.devices
        );
    }

    // The measured window.
    let hold_start = mark(&shared, &meter).await;
    live.holding.store(true, Ordering::Relaxed);
    let until = hold_start.at + args.duration;
    let ended = Arc::new(AtomicBool::new(false));
    let bells = match (&client, args.bells_per_sec > 0.0) {
        (Some(c), true) => Some(tokio::spawn(ring_bells(
            c.clone(),
            shared.clone(),
            ids.clone(),
            args.bells_per_sec,
            until,
            ended.clone(),
        ))),
        _ => None,
    };
    tokio::select! {
        _ = tokio::time::sleep_until(until) => {}
        _ = usr1.recv() => eprintln!("SIGUSR1: the window ends now"),
    }
    ended.store(true, Ordering::Relaxed);
    let hold_end = mark(&shared, &meter).await;
    let connected_at_end = shared.connected.load(Ordering::Relaxed);
    let by_url_at_end: Vec<i64> = shared.by_endpoint.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let (_, rss_end) = meter.process.sample();
    live.holding.store(false, Ordering::Relaxed);
    let (rung, bell_failures) = match bells {
        Some(t) => t.await?,
        None => (vec![], 0),
    };
    let bell_hops = hops::breakdown(&rung, &shared.bell_marks);
    let mut rtts: Vec<f64> = rung.iter().map(|r| r.rtt).collect();

    // Settle: stop pulsing, then wait until the server has stored every
    // pulse, or `--settle`. The collector writes a device whose only news is
    // pulses once per `sync_interval` (30 s by default), and devices that
    // connected together are written together, so the count can stand still
    // for many seconds before the next group: only the deadline ends a wait
    // that falls short.
    shared.pulsing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_total = shared.sent.load(Ordering::Relaxed);
    let settle_deadline = Instant::now() + args.settle;
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(if args.mqtt { 500 } else { 1100 })).await;
        let Some((_, stored)) = meter.poll().await else { continue };
        if stored >= sent_total {
            break;
        }
    }
    let (_, stored_total) = meter.totals();
    let (cpu_total, _) = meter.process.sample();

    // Close.
    shared.stop();
    let close_deadline = Instant::now() + Duration::from_secs(10);
    for t in tasks {
        let left = close_deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, t).await.is_err() {
            break;
        }
    }
    live_task.abort();

    let hold_secs = hold_end.at.duration_since(hold_start.at).as_secs_f64();
    let sent_hold = hold_end.sent - hold_start.sent;
    let accepted_hold = hold_end.accepted.saturating_sub(hold_start.accepted);
    let cpu_hold = match (hold_start.cpu, hold_end.cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    rtts.sort_by(|a, b| a.total_cmp(b));
    let failures: BTreeMap<String, u64> =
        shared.failures.lock().expect("failures").iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let me = std::process::id().to_string();
    let rss_per_device = match (rss_start, rss_end) {
        (Some(a), Some(b)) if connected_at_end > 0 => Some((b.saturating_sub(a)) as f64 / connected_at_end as f64),
        _ => None,
    };
    let unrecovered = live.outage.lock().expect("outage").map(|(since, fewest)| {
        json!({ "at_s": since.duration_since(started).as_secs_f64(), "seconds": null, "fewest_connected": fewest })
    });
    let outages: Vec<Value> = live
        .outages
        .lock()
        .expect("outages")
        .iter()
        .map(|(at, secs, fewest, end)| {
            json!({ "at_s": at, "seconds": secs, "fewest_connected": fewest, "ended_unix_ms": end })
        })
        .chain(unrecovered)
        .collect();
    let timeline: Vec<Value> =
        live.timeline.lock().expect("timeline").iter().map(|(t, c, s, a)| json!([t, c, s, a])).collect();
    let r2 = |x: f64| (x * 1000.0).round() / 1000.0;
    let summary = json!({
        "started_unix_ms": started_unix_ms,
        "mode": if args.mqtt { "mqtt" } else { "ws" },
        "devices": args.devices,
        "interval_ms": args.interval.as_millis() as u64,
        "connected": connected_at_end,
        "urls": urls,
        "connected_by_url": by_url_at_end,
        "all_connected_after_ramp": all_connected,
        "ramp_seconds": r2(ramp_secs),
        "hold_seconds": r2(hold_secs),
        "pulses_sent": sent_total,
        "pulses_accepted": stored_total,
        "pulses_lost": sent_total.saturating_sub(stored_total),
        "pulses_per_sec_sent": r2(sent_hold as f64 / hold_secs),
        "pulses_per_sec_accepted": r2(accepted_hold as f64 / hold_secs),
        "connects": shared.connects.load(Ordering::Relaxed),
        "disconnects": shared.disconnects.load(Ordering::Relaxed),
        "handshake_failures": failures.values().sum::<u64>(),
        "handshake_failures_by_reason": failures,
        "outages": outages,
        "bells_succeeded": rtts.len(),
        "bells_failed": bell_failures,
        "bells_answered": shared.bells_answered.load(Ordering::Relaxed),
        "bell_rtt_p50_ms": percentile(&rtts, 0.50).map(r2),
        "bell_rtt_p90_ms": percentile(&rtts, 0.90).map(r2),
        "bell_rtt_p99_ms": percentile(&rtts, 0.99).map(r2),
        "bell_rtt_max_ms": rtts.last().copied().map(r2),
        "bell_hops_ms": bell_hops,
        "collector_pid": meter.process.pid(),
        "collector_rss_start_bytes": rss_start,
        "collector_rss_bytes": rss_end,
        "collector_rss_per_device_bytes": rss_per_device.map(|x| x.round()),
        "collector_cpu_seconds": cpu_total.map(r2),
        "collector_cpu_seconds_window": cpu_hold.map(r2),
        "collector_cpu_per_1000_pulses": cpu_hold.filter(|_| accepted_hold > 0).map(|c| r2(c * 1000.0 / accepted_hold as f64 * 1000.0) / 1000.0),
        "loadgen_rss_bytes": probe::rss_bytes(&me),
        "loadgen_cpu_seconds": probe::cpu_seconds(&me).map(r2),
        "open_file_limit": nofile,
        "timeline": timeline,
    });
    if json_out {
        println!("{summary}");
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn print_summary(s: &Value) {
    let f = |k: &str| match &s[k] {
        Value::Null => "-".to_string(),
        v => v.to_string(),
    };
    println!("devices            {} ({} connected at the end of the window)", f("devices"), f("connected"));
    println!("ramp               {} s to connect every device", f("ramp_seconds"));
    println!(
        "pulses             {}/s sent, {}/s accepted over {} s; {} sent, {} stored, {} lost",
        f("pulses_per_sec_sent"),
        f("pulses_per_sec_accepted"),
        f("hold_seconds"),
        f("pulses_sent"),
        f("pulses_accepted"),
        f("pulses_lost")
    );
    println!("handshake failures {} {}", f("handshake_failures"), s["handshake_failures_by_reason"]);
    println!(
        "bells              {} succeeded, {} failed; RTT p50 {} ms, p99 {} ms",
        f("bells_succeeded"),
        f("bells_failed"),
        f("bell_rtt_p50_ms"),
        f("bell_rtt_p99_ms")
    );
    println!(
        "server (pid {})    RSS {} bytes ({} at start, {} per device); CPU {} s in the window, {} s per 1000 pulses",
        f("collector_pid"),
        f("collector_rss_bytes"),
        f("collector_rss_start_bytes"),
        f("collector_rss_per_device_bytes"),
        f("collector_cpu_seconds_window"),
        f("collector_cpu_per_1000_pulses")
    );
    if !s["bell_hops_ms"].is_null() {
        let h = &s["bell_hops_ms"];
        println!("bell hops (ms)     median {}; slowest 1 %: {}", h["median_all"], h["median_slowest_1pct"]);
    }
    if s["outages"].as_array().is_some_and(|o| !o.is_empty()) {
        println!("outages            {}", s["outages"]);
    }
}
