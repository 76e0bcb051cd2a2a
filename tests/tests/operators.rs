//! End-to-end tests of the operators' features: `/metrics` for Prometheus,
//! the `history` command, alerts (webhooks and a command, from the durable
//! outbox), and the web dashboard driven in a real headless Chromium.
//!
//! Every test has its own temporary directory, collector, agents and ports.
//! Waiting is done by polling (a scrape, a receiver's log, `status --json`)
//! with [`wait_until`], or on a child's output; never by a fixed sleep.
//!
//! External tools: `promtool` (metrics lint) and `node` + `playwright-core`
//! (in `tests/browser/node_modules`) + `/usr/bin/chromium` (dashboard). When
//! one is missing the part that needs it prints a `SKIP` line, unless
//! `PULSEBELL_REQUIRE_PROMTOOL=1` / `PULSEBELL_REQUIRE_BROWSER=1` make that a
//! failure (CI sets them).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pulsebell_tests::http::{admin_token, http, Response};
use pulsebell_tests::raw::{self, block_on, Endpoint};
use pulsebell_tests::serde_json::{self, Value};
use pulsebell_tests::{
    bin_dir, describe, parse_time, toml_str, wait_until, Agent, AgentOpts, Collector, Log, STATE_TIMEOUT,
};
use tempfile::TempDir;

/// Pulse interval of the agents here: offline after 3 × this.
const INTERVAL: Duration = Duration::from_millis(300);
/// How long an alert may take to reach a receiver that answers.
const ALERT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest time one HTTP exchange with the admin API may take.
const HTTP_TIMEOUT: Duration = pulsebell_tests::http::TIMEOUT;

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-ops-").tempdir().expect("create temp dir")
}

fn opts() -> AgentOpts {
    AgentOpts::default().interval(INTERVAL)
}

/// Whether an environment variable is set to `1`.
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------
// A small HTTP/1.1 client for the admin API

/// `GET /metrics` with the admin token and `accept`, expecting 200.
fn scrape_with(collector: &Collector, accept: Option<&str>) -> Response {
    let auth = format!("Bearer {}", admin_token(collector));
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(a) = accept {
        headers.push(("Accept", a));
    }
    let resp = http("GET", &format!("{}/metrics", collector.admin_url()), &headers, None);
    assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
    resp
}

/// `GET /metrics` in the classic text format, parsed.
fn scrape(collector: &Collector) -> Metrics {
    Metrics::parse(&scrape_with(collector, None).text())
}

// ---------------------------------------------------------------------------
// The Prometheus text format

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: the text, its samples and its `# TYPE` lines.
struct Metrics {
    text: String,
    samples: Vec<Sample>,
    types: HashMap<String, String>,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line `{line}`"));
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(parse_sample(line));
        }
        Metrics { text: text.to_string(), samples, types }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect()
    }

    /// The value of the one sample of `name` with `labels`; fails the test
    /// (showing the exposition) if there is not exactly one.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [one] => one.value,
            other => panic!("expected one `{name}` sample with {labels:?}, found {}:\n{}", other.len(), self.text),
        }
    }

    fn try_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        match self.find(name, labels).as_slice() {
            [one] => Ok(one.value),
            other => Err(format!("{} `{name}` samples with {labels:?}", other.len())),
        }
    }

    fn assert_type(&self, name: &str, ty: &str) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some(ty),
            "`# TYPE {name} {ty}` expected in:\n{}",
            self.text
        );
    }
}

/// Parses `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("cannot parse the sample line `{line}`") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad());
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            inner = inner.trim_start_matches(',');
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inner.split_once("=\"").unwrap_or_else(|| bad());
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bad(),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => bad(),
                }
            };
            labels.insert(key.to_string(), value);
            inner = &after[end + 1..];
        }
    }
    let value_text = rest.split_whitespace().next().unwrap_or_else(|| bad());
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad()),
    };
    Sample { name, labels, value }
}

/// Runs `promtool check metrics` on `body`: `Ok(None)` when it passes,
/// `Ok(Some(why))` when it does not, `Err` when promtool cannot be run.
fn promtool_check(body: &str) -> Result<Option<String>, String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let body = body.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(body.as_bytes()));
    let output = child.wait_with_output().map_err(|e| format!("waiting for promtool: {e}"))?;
    let _ = writer.join();
    if output.status.success() {
        Ok(None)
    } else {
        Ok(Some(describe(&output)))
    }
}

// ---------------------------------------------------------------------------
// Fake /proc and /sys for an agent with a temperature sensor and a Pi
// firmware throttling word (this machine may have neither)

/// A root directory with this machine's `/proc` files (copied) plus a
/// thermal zone at 48.5 °C and `get_throttled` = 0x50000 (under-voltage and
/// throttling since boot, nothing now).
fn fake_root(dir: &Path) -> PathBuf {
    let root = dir.join("fake-root");
    for rel in ["proc/stat", "proc/meminfo", "proc/loadavg", "proc/uptime", "proc/net/dev"] {
        let text = fs::read_to_string(Path::new("/").join(rel)).unwrap_or_else(|e| panic!("read /{rel}: {e}"));
        put(&root, rel, &text);
    }
    put(&root, "sys/class/thermal/thermal_zone0/temp", "48500\n");
    put(&root, "sys/devices/platform/soc/soc:firmware/get_throttled", "0x50000\n");
    root
}

fn put(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("has a parent")).expect("create fake root dirs");
    fs::write(&path, contents).expect("write fake root file");
}

// ---------------------------------------------------------------------------
// 1. /metrics

/// `[metrics] per_device` bounds the series a device adds: `all` has
/// health series, `up` only `pulsebell_device_up`, `none` no series
/// labelled with a device; `pulsebell_devices{state}` counts the fleet in
/// every mode.
#[test]
fn metrics_per_device_setting_bounds_device_series() {
    for mode in ["all", "up", "none"] {
        let tmp = tempdir();
        let collector = Collector::start_with_config(tmp.path(), &format!("[metrics]\nper_device = \"{mode}\"\n"));
        let (on, off) = (format!("pd-{mode}-on"), format!("pd-{mode}-off"));
        let token = collector.enroll(&on);
        collector.enroll(&off); // enrolled, never connected
        let _agent = Agent::start(&collector, &on, &token, opts());
        collector.wait_for_online_with_health(&on);
        let m = wait_until("`pulsebell_devices` to count the fleet", STATE_TIMEOUT, || {
            let m = scrape(&collector);
            match (
                m.try_value("pulsebell_devices", &[("state", "online")])?,
                m.try_value("pulsebell_devices", &[("state", "offline")])?,
            ) {
                (1.0, 1.0) => Ok(m),
                other => Err(format!("online/offline = {other:?}")),
            }
        });
        let with_device: Vec<&str> =
            m.samples.iter().filter(|s| s.labels.contains_key("device")).map(|s| s.name.as_str()).collect();
        let on_l: &[(&str, &str)] = &[("device", &on)];
        match mode {
            "all" => {
                assert_eq!(m.value("pulsebell_device_up", on_l), 1.0);
                assert_eq!(m.value("pulsebell_device_up", &[("device", &off)]), 0.0);
                assert!(m.value("pulsebell_device_memory_total_bytes", on_l) > 0.0, "health series with `all`");
            }
            "up" => {
                assert_eq!(m.value("pulsebell_device_up", on_l), 1.0);
                assert_eq!(m.value("pulsebell_device_up", &[("device", &off)]), 0.0);
                assert!(
                    with_device.iter().all(|n| *n == "pulsebell_device_up"),
                    "only pulsebell_device_up with `up`, found {with_device:?}"
                );
            }
            _ => assert!(with_device.is_empty(), "no device series with `none`, found {with_device:?}"),
        }
    }
}

#[test]
fn metrics_for_prometheus() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let (lab, plain) = ("met-lab", "met-plain");
    let lab_token = collector.enroll(lab);
    let plain_token = collector.enroll(plain);
    let root = fake_root(tmp.path());
    let lab_opts = AgentOpts {
        extra_toml: format!("root = {}\n", toml_str(&root.to_string_lossy())),
        ..opts().tags(&["lab", "east"])
    };
    let _lab_agent = Agent::start(&collector, lab, &lab_token, lab_opts);
    let mut plain_agent = Agent::start(&collector, plain, &plain_token, opts());
    collector.wait_for_online_with_health(lab);
    collector.wait_for_online_with_health(plain);

    // Without the admin token: 401, and no metrics in the answer.
    let url = format!("{}/metrics", collector.admin_url());
    let anon = http("GET", &url, &[], None);
    assert_eq!(anon.status, 401, "GET /metrics without a token: {}", anon.text());
    assert!(!anon.text().contains("pulsebell_"), "a 401 must not carry metrics: {}", anon.text());
    let wrong = http("GET", &url, &[("Authorization", "Bearer not-the-admin-token")], None);
    assert_eq!(wrong.status, 401, "GET /metrics with a wrong token: {}", wrong.text());

    // A device connection with a bad token, and a ping bell.
    let ep = Endpoint::of(&collector);
    assert_eq!(block_on(raw::refused_status(&ep, Some("Bearer pb1.0123456789abcdef.wrong"))), Ok(401));
    let bell = collector.cli_ok(&["bell", plain, "ping", "--wait"]);
    assert!(bell.status.success(), "ping bell: {}", describe(&bell));

    // Both connections counted (the refused one is gone by now).
    let m = wait_until("`pulsebell_connections` to be 2", STATE_TIMEOUT, || {
        let m = scrape(&collector);
        let v = m.try_value("pulsebell_connections", &[])?;
        if v == 2.0 {
            Ok(m)
        } else {
            Err(format!("pulsebell_connections is {v}"))
        }
    });

    // Device metrics, one series per device with its tags.
    let lab_l: &[(&str, &str)] = &[("device", lab), ("tags", "lab,east")];
    let plain_l: &[(&str, &str)] = &[("device", plain), ("tags", "")];
    for l in [lab_l, plain_l] {
        assert_eq!(m.value("pulsebell_device_up", l), 1.0, "device_up of an online device {l:?}");
        let seen = m.value("pulsebell_device_last_seen_timestamp_seconds", l);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        assert!((now - seen).abs() < 60.0, "last_seen {seen} is not recent (now {now}) for {l:?}");
        let cpu = m.value("pulsebell_device_cpu_ratio", l);
        assert!((0.0..=1.0).contains(&cpu), "cpu ratio {cpu} outside 0..1 for {l:?}");
        for window in ["1m", "5m", "15m"] {
            let mut with = l.to_vec();
            with.push(("window", window));
            let load = m.value("pulsebell_device_load", &with);
            assert!(load >= 0.0, "load {window} is {load} for {l:?}");
        }
        let (used, total) =
            (m.value("pulsebell_device_memory_used_bytes", l), m.value("pulsebell_device_memory_total_bytes", l));
        assert!(used > 0.0 && used <= total, "memory used {used} of {total} for {l:?}");
        let (used, total) =
            (m.value("pulsebell_device_disk_used_bytes", l), m.value("pulsebell_device_disk_total_bytes", l));
        assert!(used > 0.0 && used <= total, "disk used {used} of {total} for {l:?}");
    }
    // The sensor and the firmware word of the fake root.
    assert_eq!(m.value("pulsebell_device_temperature_celsius", lab_l), 48.5);
    let flag = |flag: &str, when: &str| {
        let mut with = lab_l.to_vec();
        with.extend([("flag", flag), ("when", when)]);
        m.value("pulsebell_device_throttled", &with)
    };
    assert_eq!(flag("under_voltage", "since_boot"), 1.0);
    assert_eq!(flag("throttled", "since_boot"), 1.0);
    assert_eq!(flag("under_voltage", "now"), 0.0);
    assert_eq!(flag("freq_capped", "since_boot"), 0.0);
    assert!(m.find("pulsebell_device_throttled", plain_l).is_empty(), "no throttled series off a Pi:\n{}", m.text);
    for (name, ty) in [
        ("pulsebell_device_up", "gauge"),
        ("pulsebell_device_last_seen_timestamp_seconds", "gauge"),
        ("pulsebell_device_cpu_ratio", "gauge"),
        ("pulsebell_device_load", "gauge"),
        ("pulsebell_device_memory_used_bytes", "gauge"),
        ("pulsebell_device_memory_total_bytes", "gauge"),
        ("pulsebell_device_disk_used_bytes", "gauge"),
        ("pulsebell_device_disk_total_bytes", "gauge"),
        ("pulsebell_device_temperature_celsius", "gauge"),
        ("pulsebell_device_throttled", "gauge"),
        ("pulsebell_connections", "gauge"),
        ("pulsebell_pulses_received_total", "counter"),
        ("pulsebell_received_bytes_total", "counter"),
        ("pulsebell_handshakes_total", "counter"),
        ("pulsebell_handshake_failures_total", "counter"),
        ("pulsebell_bells_pending", "gauge"),
        ("pulsebell_bells_finished_total", "counter"),
        ("pulsebell_store_write_seconds", "histogram"),
    ] {
        m.assert_type(name, ty);
    }

    // Collector metrics.
    assert!(m.value("pulsebell_handshake_failures_total", &[("reason", "unauthorized")]) >= 1.0);
    assert!(m.value("pulsebell_handshakes_total", &[]) >= 2.0);
    assert!(m.value("pulsebell_received_bytes_total", &[]) > 0.0);
    assert!(m.value("pulsebell_bells_finished_total", &[("state", "succeeded")]) >= 1.0);
    assert_eq!(m.value("pulsebell_bells_finished_total", &[("state", "failed")]), 0.0);
    for state in ["queued", "sent", "running"] {
        assert_eq!(m.value("pulsebell_bells_pending", &[("state", state)]), 0.0, "bells pending {state}");
    }
    let count = m.value("pulsebell_store_write_seconds_count", &[]);
    assert!(count >= 1.0, "store writes observed: {count}");
    assert!(m.value("pulsebell_store_write_seconds_sum", &[]) >= 0.0);
    assert_eq!(m.value("pulsebell_store_write_seconds_bucket", &[("le", "+Inf")]), count, "+Inf bucket == count");
    let pulses = m.value("pulsebell_pulses_received_total", &[]);
    assert!(pulses >= 2.0, "pulses received: {pulses}");
    wait_until("pulsebell_pulses_received_total to increase between scrapes", STATE_TIMEOUT, || {
        let now = scrape(&collector).try_value("pulsebell_pulses_received_total", &[])?;
        if now > pulses {
            Ok(())
        } else {
            Err(format!("still {now} (first scrape: {pulses})"))
        }
    });

    // promtool's lint of the classic text format.
    let body = scrape_with(&collector, None);
    assert!(
        body.header("content-type").is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "content type of the classic format: {:?}",
        body.header("content-type")
    );
    match promtool_check(&body.text()) {
        Ok(None) => println!("promtool check metrics: ok"),
        Ok(Some(why)) => panic!("`promtool check metrics` rejects /metrics:\n{why}\n--- body ---\n{}", body.text()),
        Err(e) if required("PULSEBELL_REQUIRE_PROMTOOL") => panic!("{e} (PULSEBELL_REQUIRE_PROMTOOL=1)"),
        Err(e) => println!("SKIP promtool: {e}; set PULSEBELL_REQUIRE_PROMTOOL=1 to make this a failure"),
    }

    // OpenMetrics when asked for.
    let om = scrape_with(&collector, Some("application/openmetrics-text; version=1.0.0,text/plain;q=0.5"));
    let om_text = om.text();
    assert!(
        om.header("content-type").is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "content type of OpenMetrics: {:?}",
        om.header("content-type")
    );
    assert!(om_text.ends_with("# EOF\n"), "OpenMetrics must end with `# EOF`:\n{om_text}");
    assert!(om_text.contains("# TYPE pulsebell_pulses_received counter\n"), "OpenMetrics counter family:\n{om_text}");
    assert!(om_text.contains("# UNIT pulsebell_device_memory_used_bytes bytes\n"), "OpenMetrics unit:\n{om_text}");

    // A device that goes offline: device_up 0, one connection left.
    plain_agent.stop();
    collector.wait_for_state(plain, "offline");
    let m = wait_until("the offline device to show up 0", STATE_TIMEOUT, || {
        let m = scrape(&collector);
        let v = m.try_value("pulsebell_device_up", plain_l)?;
        if v == 0.0 {
            Ok(m)
        } else {
            Err(format!("device_up is {v}"))
        }
    });
    assert_eq!(m.value("pulsebell_device_up", lab_l), 1.0);
    wait_until("pulsebell_connections to be 1", STATE_TIMEOUT, || {
        let v = scrape(&collector).try_value("pulsebell_connections", &[])?;
        if v == 1.0 {
            Ok(())
        } else {
            Err(format!("pulsebell_connections is {v}"))
        }
    });
    let lab_lines: usize =
        m.text.lines().filter(|l| !l.starts_with('#') && l.contains(&format!("device=\"{lab}\""))).map(str::len).sum();

    // 1,000 more devices (never seen): the size of a scrape.
    let ids: Vec<String> = (0..1000).map(|i| format!("bulk-{i:04}")).collect();
    let auth = format!("Bearer {}", admin_token(&collector));
    let body = serde_json::to_vec(&serde_json::json!({ "ids": ids })).expect("encode");
    let resp = http(
        "POST",
        &format!("{}/v1/devices/bulk", collector.admin_url()),
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        Some(&body),
    );
    assert_eq!(resp.status, 200, "bulk enrolment: {}", resp.text());
    let enrolled = resp.json()["enrolled"].as_array().map_or(0, Vec::len);
    assert_eq!(enrolled, 1000, "bulk enrolment answer");
    let started = Instant::now();
    let big = scrape_with(&collector, None);
    let took = started.elapsed();
    let size = big.body.len();
    let m = Metrics::parse(&big.text());
    assert_eq!(m.find("pulsebell_device_up", &[]).len(), 1002, "one device_up per enrolled device");
    assert_eq!(m.value("pulsebell_device_up", &[("device", "bulk-0500"), ("tags", "")]), 0.0, "never seen: up 0");
    assert!(m.find("pulsebell_device_last_seen_timestamp_seconds", &[("device", "bulk-0500")]).is_empty());
    println!(
        "/metrics at 1,002 devices (1,000 never seen, 1 online, 1 offline): {size} bytes, scraped in {took:?}; \
         an online device with health adds about {lab_lines} bytes (so ~{} KB for 1,000 online devices)",
        (lab_lines * 1000 + size) / 1024
    );
    assert!(size < 2 * 1024 * 1024, "/metrics at 1,000 devices is {size} bytes, more than 2 MB");
    if let Ok(None) = promtool_check(&big.text()) {
        println!("promtool check metrics at 1,002 devices: ok");
    }
}

// ---------------------------------------------------------------------------
// 2. history

const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `b[key]` as (min, avg, max), checking min ≤ avg ≤ max. The average of a
/// real machine's samples is compared with a relative slack of 1e-9; the
/// exact case (identical samples) is checked with a fake root below.
fn agg_ok(b: &Value, key: &str) -> Result<(f64, f64, f64), String> {
    let a = &b[key];
    let get = |k: &str| a[k].as_f64().ok_or_else(|| format!("`{key}.{k}` is not a number in {b}"));
    let (min, avg, max) = (get("min")?, get("avg")?, get("max")?);
    let slack = 1e-9 * max.abs().max(1.0);
    if !(min <= max && min - slack <= avg && avg <= max + slack) {
        return Err(format!("`{key}` is not min ≤ avg ≤ max: {a}"));
    }
    Ok((min, avg, max))
}

/// Polls `history DEVICE --json` until `ready` accepts it.
fn wait_for_history(
    collector: &Collector,
    id: &str,
    what: &str,
    ready: impl Fn(&Value) -> Result<(), String>,
) -> Value {
    wait_until(&format!("history of `{id}` {what}"), STATE_TIMEOUT, || {
        let output = collector.cli(&["history", id, "--json"]);
        if !output.status.success() {
            return Err(format!("`history --json` failed:\n{}", describe(&output)));
        }
        let v: Value = serde_json::from_slice(&output.stdout).map_err(|e| format!("not JSON ({e})"))?;
        if !v["buckets"].is_array() {
            return Err(format!("no `buckets` array: {v}"));
        }
        ready(&v).map_err(|e| format!("{e}: {v}"))?;
        Ok(v)
    })
}

#[test]
fn history_from_the_cli() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "hist-pi";
    let token = collector.enroll(id);
    let _agent = Agent::start(&collector, id, &token, opts());
    // A device whose every sample is the same: load 1.31, 48.5 °C, fixed memory.
    let steady = "hist-steady";
    let steady_token = collector.enroll(steady);
    let root = fake_root(tmp.path());
    put(&root, "proc/loadavg", "1.31 1.20 1.10 1/100 12345\n");
    let steady_opts = AgentOpts { extra_toml: format!("root = {}\n", toml_str(&root.to_string_lossy())), ..opts() };
    let _steady_agent = Agent::start(&collector, steady, &steady_token, steady_opts);
    collector.wait_for_online_with_health(id);
    collector.wait_for_online_with_health(steady);

    // A few seconds of pulses: the open minute counts.
    let json = wait_for_history(&collector, id, "with at least 5 samples", |v| {
        let samples: u64 = v["buckets"].as_array().into_iter().flatten().filter_map(|b| b["samples"].as_u64()).sum();
        if samples >= 5 {
            Ok(())
        } else {
            Err(format!("{samples} samples so far"))
        }
    });
    assert_eq!(json["device"], id, "{json}");
    assert_eq!(json["bucket_secs"], 60, "{json}");
    let buckets = json["buckets"].as_array().expect("buckets");
    assert!(!buckets.is_empty() && buckets.len() <= 2, "a few seconds fit one or two minutes: {json}");
    let mut previous = None;
    for b in buckets {
        assert!(b["samples"].as_u64().is_some_and(|n| n > 0), "a bucket has no samples: {b}");
        let start = parse_time(&b["start"]).unwrap_or_else(|e| panic!("bucket start: {e}: {b}"));
        assert_eq!(start.second(), 0, "a bucket starts on a minute: {b}");
        assert!(previous.is_none_or(|p| p < start), "buckets are in order: {json}");
        previous = Some(start);
        let (cpu_min, _, cpu_max) = agg_ok(b, "cpu").unwrap_or_else(|e| panic!("{e}"));
        assert!(cpu_min >= 0.0 && cpu_max <= 100.0, "cpu percent out of range: {b}");
        let (mem_min, _, _) = agg_ok(b, "mem").unwrap_or_else(|e| panic!("{e}"));
        assert!(mem_min > 0.0, "memory used must be > 0: {b}");
        agg_ok(b, "load").unwrap_or_else(|e| panic!("{e}"));
        assert!(b["temp"].is_null() || agg_ok(b, "temp").is_ok(), "temp is null or an aggregate: {b}");
    }

    // The sparkline and its summary, for every metric that has data.
    for metric in ["cpu", "mem", "load"] {
        let output = collector.cli_ok(&["history", id, "--metric", metric]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.chars().any(|c| SPARKS.contains(&c)), "`history --metric {metric}` has no sparkline:\n{text}");
        for word in ["min", "avg", "max"] {
            assert!(text.contains(word), "`history --metric {metric}` does not say `{word}`:\n{text}");
        }
        assert!(text.contains(id), "`history --metric {metric}` does not name the device:\n{text}");
    }
    let output = collector.cli_ok(&["history", id]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains('%') && text.chars().any(|c| SPARKS.contains(&c)), "default metric is cpu:\n{text}");

    // Usage errors exit 2; an unknown device exits 1.
    let output = collector.cli(&["history", id, "--metric", "bogus"]);
    assert_eq!(output.status.code(), Some(2), "`--metric bogus`:\n{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cpu"), "the error lists the metrics");
    let output = collector.cli(&["history", "no-such-device"]);
    assert_eq!(output.status.code(), Some(1), "unknown device:\n{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no-such-device"),
        "the error names the device:\n{}",
        describe(&output)
    );
    // (Surviving a restart needs a completed minute: not waited for here.)

    // Identical samples aggregate to exactly that value: min = avg = max.
    // (6 to 14 samples of 1.31: a naive running sum divided by n is off by
    // an ulp there, e.g. avg 1.3100000000000003 > max 1.31.)
    let steady_json = wait_for_history(&collector, steady, "with a bucket of at least 6 samples", |v| {
        let most = v["buckets"].as_array().into_iter().flatten().filter_map(|b| b["samples"].as_u64()).max();
        if most.unwrap_or(0) >= 6 {
            Ok(())
        } else {
            Err(format!("largest bucket: {most:?} samples"))
        }
    });
    for b in steady_json["buckets"].as_array().expect("buckets") {
        let exact = |key: &str, want: Option<f64>| {
            let a = &b[key];
            let want = want.or_else(|| a["min"].as_f64()).unwrap_or_else(|| panic!("`{key}.min` in {b}"));
            for k in ["min", "avg", "max"] {
                assert_eq!(
                    a[k].as_f64(),
                    Some(want),
                    "`{key}.{k}` of identical samples must be exactly {want} (min ≤ avg ≤ max): bucket {b}"
                );
            }
        };
        exact("load", Some(1.31));
        exact("temp", Some(48.5));
        exact("mem", None);
        exact("cpu", None);
    }
}

// ---------------------------------------------------------------------------
// 3. Alerts

/// One request a webhook receiver got.
#[derive(Debug, Clone)]
struct Hook {
    /// When it arrived.
    at: Instant,
    path: String,
    idempotency_header: Option<String>,
    /// What the receiver answered.
    answered: u16,
    body: Value,
}

impl Hook {
    fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or_default()
    }
    fn key(&self) -> &str {
        self.body["idempotency_key"].as_str().unwrap_or_default()
    }
}

/// A webhook receiver on 127.0.0.1: records every request and answers with
/// the status currently set (200 unless told otherwise).
#[derive(Clone)]
struct Receiver {
    port: u16,
    hooks: Arc<Mutex<Vec<Hook>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    /// Listens on a free port.
    fn start() -> Receiver {
        Receiver::listen(TcpListener::bind("127.0.0.1:0").expect("bind receiver"))
    }

    /// Listens on `port` (reserved earlier with [`reserve_port`]).
    fn start_on(port: u16) -> Receiver {
        Receiver::listen(
            TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("bind receiver on port {port}: {e}")),
        )
    }

    fn listen(listener: TcpListener) -> Receiver {
        let port = listener.local_addr().expect("local addr").port();
        let r = Receiver { port, hooks: Arc::default(), status: Arc::new(AtomicU16::new(200)) };
        let me = r.clone();
        // The thread lives as long as the test process; the port is the test's.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.serve(stream));
            }
        });
        r
    }

    /// Answers the requests of one connection (reqwest keeps it alive).
    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let mut writer = stream.try_clone().expect("clone stream");
        let mut reader = BufReader::new(stream);
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let path = request_line.split(' ').nth(1).unwrap_or_default().to_string();
            let mut length = 0usize;
            let mut key = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "content-length" => length = v.trim().parse().unwrap_or(0),
                        "idempotency-key" => key = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let answered = self.status.load(Ordering::SeqCst);
            let body = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            self.hooks.lock().unwrap_or_else(|e| e.into_inner()).push(Hook {
                at: Instant::now(),
                path,
                idempotency_header: key,
                answered,
                body,
            });
            let reason = if answered == 200 { "OK" } else { "Service Unavailable" };
            let response = format!("HTTP/1.1 {answered} {reason}\r\ncontent-length: 0\r\n\r\n");
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a request matching `pred` (answered with 200 if `ok`).
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Hook) -> bool) -> Hook {
        wait_until(&format!("the receiver to get {what}"), timeout, || {
            let hooks = self.hooks();
            hooks.iter().find(|h| pred(h)).cloned().ok_or_else(|| {
                let got: Vec<String> =
                    hooks.iter().map(|h| format!("{} {} → {}", h.kind(), h.key(), h.answered)).collect();
                format!("got {got:?}")
            })
        })
    }

    /// Waits for an alert of `kind` about `device` that was answered 200.
    fn wait_for_alert(&self, kind: &str, device: &str, timeout: Duration) -> Hook {
        self.wait_for(&format!("a delivered `{kind}` alert for `{device}`"), timeout, |h| {
            h.answered == 200 && h.kind() == kind && h.body["device"] == device
        })
    }

    /// Asserts no idempotency key was answered 200 more than once.
    fn assert_no_duplicates(&self) {
        let hooks = self.hooks();
        let mut seen = HashMap::new();
        for h in hooks.iter().filter(|h| h.answered == 200) {
            *seen.entry(h.key().to_string()).or_insert(0) += 1;
        }
        let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(dups.is_empty(), "alerts delivered more than once (key, times): {dups:?}\nall: {hooks:#?}");
    }
}

/// A free port nobody listens on (bound, then closed).
fn reserve_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("local addr").port()
}

/// Collector config with fast write-back and the given alert sinks.
fn alerts_config(webhooks: &[String], command: &[&str]) -> String {
    let list = |items: Vec<String>| items.join(", ");
    format!(
        "write_back = \"200ms\"\n[alerts]\nwebhooks = [{}]\ncommand = [{}]\n",
        list(webhooks.iter().map(|u| toml_str(u)).collect()),
        list(command.iter().map(|c| toml_str(c)).collect()),
    )
}

/// Checks the documented shape of an alert.
fn assert_alert_shape(hook: &Hook, kind: &str, device: &str) {
    let a = &hook.body;
    assert_eq!(hook.path, "/hook", "webhook path: {a}");
    assert!(a["id"].as_u64().is_some(), "`id` is a number: {a}");
    let key = a["idempotency_key"].as_str().unwrap_or_else(|| panic!("no `idempotency_key`: {a}"));
    assert!(!key.is_empty(), "empty idempotency_key: {a}");
    assert_eq!(hook.idempotency_header.as_deref(), Some(key), "Idempotency-Key header == body key: {a}");
    assert_eq!(a["kind"], kind, "{a}");
    assert_eq!(a["device"], device, "{a}");
    parse_time(&a["at"]).unwrap_or_else(|e| panic!("`at`: {e}: {a}"));
    let summary = a["summary"].as_str().unwrap_or_else(|| panic!("no `summary`: {a}"));
    assert!(summary.contains(device), "the summary names the device: {a}");
    assert!(a["details"].is_object(), "`details` is an object: {a}");
}

/// Checks `details` of a liveness alert.
fn assert_liveness_details(hook: &Hook, reasons: &[&str]) {
    let d = &hook.body["details"];
    let reason = d["reason"].as_str().unwrap_or_else(|| panic!("no details.reason: {}", hook.body));
    assert!(reasons.contains(&reason), "details.reason `{reason}` not in {reasons:?}: {}", hook.body);
    assert!(d["generation"].as_u64().is_some_and(|g| g >= 1), "details.generation: {}", hook.body);
}

/// The alerts a command sink appended to `file` (concatenated JSON).
fn command_alerts(file: &Path) -> Vec<Value> {
    let text = fs::read_to_string(file).unwrap_or_default();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|v| {
            v.unwrap_or_else(|e| panic!("{} holds something else than JSON alerts ({e}):\n{text}", file.display()))
        })
        .collect()
}

/// Outbox ids the collector logged as failed deliveries.
fn failed_alert_ids(log: &Log) -> Vec<u64> {
    log.text()
        .lines()
        .filter(|l| l.contains("alert delivery failed"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("alert=")).and_then(|n| n.parse().ok()))
        .collect()
}

#[test]
fn alerts_reach_webhooks_and_commands() {
    let tmp = tempdir();
    let receiver = Receiver::start();
    let file = tmp.path().join("alerts.json");
    let script = format!("cat >> {}", file.to_string_lossy());
    let collector = Collector::start_with_config(tmp.path(), &alerts_config(&[receiver.url()], &["sh", "-c", &script]));
    let id = "alert-pi";
    let token = collector.enroll(id);
    let agent_opts =
        AgentOpts { extra_toml: "\n[actions.fail]\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n".to_string(), ..opts() };
    let mut agent = Agent::start(&collector, id, &token, agent_opts);
    collector.wait_for_online_with_health(id);

    // A bell that fails.
    let output = collector.cli(&["bell", id, "fail", "--wait"]);
    assert_eq!(output.status.code(), Some(1), "a failed bell:\n{}", describe(&output));
    let failed = receiver.wait_for_alert("bell_failed", id, ALERT_TIMEOUT);
    assert_alert_shape(&failed, "bell_failed", id);
    let d = &failed.body["details"];
    assert_eq!(d["exit_code"], 3, "details.exit_code: {}", failed.body);
    assert_eq!(d["action"], "fail", "details.action: {}", failed.body);
    assert_eq!(d["state"], "failed", "details.state: {}", failed.body);
    assert!(d["bell"].as_u64().is_some(), "details.bell: {}", failed.body);

    // Offline, then online again.
    agent.kill9(); // a crash: a planned stop (SIGTERM) is `agent_stopped`, not an alert
    let offline = receiver.wait_for_alert("device_offline", id, ALERT_TIMEOUT);
    assert_alert_shape(&offline, "device_offline", id);
    assert_liveness_details(&offline, &["disconnected", "silent"]);
    agent.restart();
    let online = receiver.wait_for_alert("device_online", id, ALERT_TIMEOUT);
    assert_alert_shape(&online, "device_online", id);
    assert_liveness_details(&online, &["connected", "pulse"]);
    assert!(online.at > offline.at, "online arrived before offline");
    let (t_off, t_on) = (parse_time(&offline.body["at"]).unwrap(), parse_time(&online.body["at"]).unwrap());
    assert!(t_on >= t_off, "online `at` {t_on} before offline `at` {t_off}");
    assert!(
        online.body["details"]["generation"].as_u64() > offline.body["details"]["generation"].as_u64(),
        "the online alert is of a newer connection: {} / {}",
        offline.body,
        online.body
    );

    // The command got the same alerts on stdin.
    let keys: Vec<String> = [&failed, &offline, &online].iter().map(|h| h.key().to_string()).collect();
    let from_command = wait_until("the command sink to get the three alerts", ALERT_TIMEOUT, || {
        let got = command_alerts(&file);
        let got_keys: Vec<&str> = got.iter().filter_map(|a| a["idempotency_key"].as_str()).collect();
        if keys.iter().all(|k| got_keys.contains(&k.as_str())) {
            Ok(got)
        } else {
            Err(format!("{} has {got_keys:?}", file.display()))
        }
    });
    for hook in [&failed, &offline, &online] {
        let same = from_command.iter().find(|a| a["idempotency_key"] == hook.key()).expect("found above");
        assert_eq!(same, &hook.body, "the command and the webhook get the same JSON");
    }

    // The first connection raised no `device_online`; nothing was sent twice.
    let hooks = receiver.hooks();
    assert_eq!(hooks.iter().filter(|h| h.kind() == "device_online").count(), 1, "one device_online: {hooks:#?}");
    assert_eq!(hooks.len(), 3, "three alerts: {hooks:#?}");
    receiver.assert_no_duplicates();
    assert_eq!(from_command.len(), 3, "three alerts through the command: {from_command:#?}");
}

#[test]
fn alerts_wait_for_a_receiver_that_is_down() {
    let tmp = tempdir();
    let port = reserve_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let collector = Collector::start_with_config(tmp.path(), &alerts_config(&[url], &[]));
    let id = "down-pi";
    let token = collector.enroll(id);
    let mut agent = Agent::start(&collector, id, &token, opts());
    collector.wait_for_online_with_health(id);

    // Offline while nobody listens: at least two attempts fail.
    agent.kill9(); // a crash: a planned stop (SIGTERM) is `agent_stopped`, not an alert
    let failures = wait_until("two failed deliveries in the collector's log", ALERT_TIMEOUT, || {
        let ids = failed_alert_ids(collector.log());
        if ids.len() >= 2 {
            Ok(ids)
        } else {
            Err(format!("failed attempts so far: {ids:?}"))
        }
    });
    let up = Instant::now();
    let receiver = Receiver::start_on(port);
    let offline = receiver.wait_for_alert("device_offline", id, ALERT_TIMEOUT);
    let lag = offline.at - up;
    println!("alert delivered {lag:?} after the receiver came up (after {} failed attempts)", failures.len());
    assert!(lag < Duration::from_secs(12), "the retry came {lag:?} after the receiver was up (backoff too long)");
    assert_alert_shape(&offline, "device_offline", id);
    assert!(
        offline.body["id"].as_u64().is_some_and(|n| failures.contains(&n)),
        "the delivered alert is the one that failed ({failures:?}): {}",
        offline.body
    );

    // A later alert as a barrier: by then the first was sent only once.
    agent.restart();
    receiver.wait_for_alert("device_online", id, ALERT_TIMEOUT);
    receiver.assert_no_duplicates();
    let offlines = receiver.hooks().iter().filter(|h| h.kind() == "device_offline").count();
    assert_eq!(offlines, 1, "device_offline delivered once: {:#?}", receiver.hooks());
}

#[test]
fn alerts_retry_with_backoff_and_survive_a_restart() {
    let tmp = tempdir();
    let receiver = Receiver::start();
    receiver.set_status(503);
    let mut collector = Collector::start_with_config(tmp.path(), &alerts_config(&[receiver.url()], &[]));
    let id = "durable-pi";
    let token = collector.enroll(id);
    let mut agent = Agent::start(&collector, id, &token, opts());
    collector.wait_for_online_with_health(id);

    // The receiver answers 503: the collector retries with backoff
    // ("1 s doubling, jittered" by at most a quarter).
    agent.kill9(); // a crash: a planned stop (SIGTERM) is `agent_stopped`, not an alert
    let attempts = wait_until("three attempts of the offline alert", Duration::from_secs(30), || {
        let hooks = receiver.hooks();
        if hooks.len() >= 3 {
            Ok(hooks)
        } else {
            Err(format!("{} attempt(s) so far", hooks.len()))
        }
    });
    let key = attempts[0].key().to_string();
    assert_alert_shape(&attempts[0], "device_offline", id);
    for a in &attempts {
        assert_eq!(a.key(), key, "every retry carries the same idempotency key");
        assert_eq!(a.body, attempts[0].body, "every retry sends the same alert");
    }
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!("retry gaps while the receiver answered 503: {gaps:?}");
    // Checked at the end, so that a wrong schedule does not hide the rest.
    let schedule_problem = gaps.iter().zip([1.0f64, 2.0]).enumerate().find_map(|(i, (gap, base))| {
        let (lo, hi) = (base * 0.9, base * 1.25 + 0.6);
        (!(lo..=hi).contains(&gap.as_secs_f64())).then(|| {
            format!(
                "retry {} came {gap:?} after the previous attempt; the backoff starts at 1 s and doubles \
                 (expected {base} s, jittered up to +25 %: {lo:.2}..={hi:.2} s); all gaps: {gaps:?}",
                i + 1
            )
        })
    });

    // Stop the collector with the alert still pending, start it again, and
    // let the receiver answer: the same alert, with the same key, once.
    collector.stop();
    receiver.set_status(200);
    collector.restart();
    let delivered = receiver.wait_for_alert("device_offline", id, ALERT_TIMEOUT);
    assert_eq!(delivered.key(), key, "the idempotency key survives the restart");
    assert_eq!(delivered.body, attempts[0].body, "the same alert after the restart");

    // A barrier: the device comes back (new ports), device_online arrives.
    let _agent = Agent::start(&collector, id, &token, opts());
    receiver.wait_for_alert("device_online", id, ALERT_TIMEOUT);
    receiver.assert_no_duplicates();
    let delivered_offline =
        receiver.hooks().iter().filter(|h| h.kind() == "device_offline" && h.answered == 200).count();
    assert_eq!(delivered_offline, 1, "device_offline delivered once: {:#?}", receiver.hooks());
    if let Some(problem) = schedule_problem {
        panic!("{problem}");
    }
}

// ---------------------------------------------------------------------------
// 4. The dashboard's live stream and pages

/// A Server-Sent Events stream from the admin API, read as it arrives.
struct Sse {
    reader: BufReader<TcpStream>,
    /// Decoded body not yet split into events.
    pending: String,
}

/// One event: its name and its JSON data.
#[derive(Debug)]
struct SseEvent {
    name: String,
    data: Value,
}

impl Sse {
    fn open(collector: &Collector, query: &str) -> Sse {
        let url = format!("{}/v1/stream?{query}", collector.admin_url());
        let host = url.trim_start_matches("http://").split('/').next().expect("host").to_string();
        let mut stream = TcpStream::connect(&host).unwrap_or_else(|e| panic!("connect to {host}: {e}"));
        stream.set_read_timeout(Some(HTTP_TIMEOUT)).expect("set read timeout");
        let path = &url[url.find(&host).expect("host in url") + host.len()..];
        let token = admin_token(collector);
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n").expect("send");
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read the response head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
        assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
        Sse { reader, pending: String::new() }
    }

    /// The next event (keep-alive comments skipped).
    fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if name.is_empty() {
                    continue; // a comment
                }
                let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event `{name}` data ({e}): {data}"));
                return SseEvent { name, data };
            }
            // One chunk of the chunked body.
            let mut size = String::new();
            self.reader.read_line(&mut size).expect("read a chunk size");
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            assert!(size > 0, "the stream ended");
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).expect("read a chunk");
            self.pending.push_str(std::str::from_utf8(&chunk[..size]).expect("UTF-8 event"));
        }
    }
}

/// `GET /v1/fleet?query` as JSON.
fn fleet_page(collector: &Collector, query: &str) -> Value {
    let auth = format!("Bearer {}", admin_token(collector));
    let resp = http("GET", &format!("{}/v1/fleet?{query}", collector.admin_url()), &[("Authorization", &auth)], None);
    assert_eq!(resp.status, 200, "GET /v1/fleet?{query}: {}", resp.text());
    resp.json()
}

fn row_ids(rows: &Value) -> Vec<String> {
    rows.as_array().expect("rows").iter().map(|r| r["id"].as_str().expect("row id").to_string()).collect()
}

#[test]
fn dashboard_stream_sends_the_page_then_only_changes() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let (a, b, quiet) = ("dash-a", "dash-b", "dash-quiet");
    let _agent_a = Agent::start(&collector, a, &collector.enroll(a), opts().tags(&["lab"]));
    let mut agent_b = Agent::start(&collector, b, &collector.enroll(b), opts());
    collector.enroll(quiet); // never connects: its row never changes
    collector.wait_for_online_with_health(a);
    collector.wait_for_online_with_health(b);

    // Pages are cut on the server: search, tag, state, offset and limit.
    let p = fleet_page(&collector, "limit=2");
    assert_eq!(row_ids(&p["rows"]), [a, b], "{p}");
    assert_eq!((p["matched"].as_u64(), p["limit"].as_u64()), (Some(3), Some(2)), "{p}");
    assert_eq!(row_ids(&fleet_page(&collector, "limit=2&offset=2")["rows"]), [quiet]);
    assert_eq!(row_ids(&fleet_page(&collector, "q=QUIET")["rows"]), [quiet], "search ignores case");
    assert_eq!(row_ids(&fleet_page(&collector, "tag=lab")["rows"]), [a]);
    assert_eq!(row_ids(&fleet_page(&collector, "state=never_seen")["rows"]), [quiet]);
    assert_eq!(p["tags"], serde_json::json!(["lab"]), "{p}");

    let mut sse = Sse::open(&collector, "limit=3");
    let first = sse.next();
    assert_eq!(first.name, "page", "the first event is the whole page: {first:?}");
    assert_eq!(row_ids(&first.data["rows"]), [a, b, quiet]);
    let counts = &first.data["counts"];
    assert_eq!(
        (counts["devices"].as_u64(), counts["online"].as_u64(), counts["never_seen"].as_u64()),
        (Some(3), Some(2), Some(1)),
        "{first:?}"
    );
    let mut shown: HashMap<String, Value> = first.data["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect();

    // After it: `changes` with only the rows that differ (the two pulsing
    // devices' last pulse), never the quiet one, never the whole page.
    let mut changed = HashMap::<String, u32>::new();
    for _ in 0..4 {
        let ev = sse.next();
        assert_eq!(ev.name, "changes", "after the first page only changes: {ev:?}");
        assert!(ev.data.get("tags").is_none(), "a change carries no page: {ev:?}");
        for row in ev.data["rows"].as_array().expect("rows") {
            let id = row["id"].as_str().expect("id").to_string();
            assert_ne!(id, quiet, "an unchanged row was sent again: {ev:?}");
            assert_ne!(shown.get(&id), Some(row), "row {id} sent although it did not change: {ev:?}");
            *changed.entry(id.clone()).or_default() += 1;
            shown.insert(id, row.clone());
        }
    }
    assert!(changed.contains_key(a) && changed.contains_key(b), "both pulsing rows changed: {changed:?}");

    // A device going offline is a change of its row and of the counts.
    agent_b.stop();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no change said {b} went offline");
        let ev = sse.next();
        assert_eq!(ev.name, "changes", "{ev:?}");
        let rows = ev.data["rows"].as_array().expect("rows");
        if rows.iter().any(|r| r["id"] == b && r["state"] == "offline") {
            // Rows and counts come from one snapshot: the change that shows
            // the row offline carries the counts that moved with it.
            let c = &ev.data["counts"];
            assert_eq!((c["online"].as_u64(), c["offline"].as_u64()), (Some(1), Some(1)), "{ev:?}");
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// 5. The dashboard in a real browser

/// The browser script's directory.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Why the browser test cannot run here, if it cannot.
fn browser_missing(chromium: &Path) -> Option<String> {
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return Some(format!("`node --version` failed: {}", describe(&o))),
        Err(e) => return Some(format!("node is not available: {e}")),
    }
    let pw = browser_dir().join("node_modules/playwright-core/package.json");
    if !pw.is_file() {
        return Some(format!("{} is missing: run `npm ci` in {}", pw.display(), browser_dir().display()));
    }
    if !chromium.is_file() {
        return Some(format!("{} is missing: `apt-get install chromium`", chromium.display()));
    }
    None
}

#[test]
fn dashboard_in_a_real_browser() {
    let chromium = PathBuf::from(std::env::var("PULSEBELL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if let Some(why) = browser_missing(&chromium) {
        if required("PULSEBELL_REQUIRE_BROWSER") {
            panic!("{why} (PULSEBELL_REQUIRE_BROWSER=1)");
        }
        println!("SKIP dashboard_in_a_real_browser: {why}; set PULSEBELL_REQUIRE_BROWSER=1 to make this a failure");
        return;
    }

    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let (lab, plain) = ("dash-lab", "dash-plain");
    let lab_token = collector.enroll(lab);
    let plain_token = collector.enroll(plain);
    let mut agents = HashMap::new();
    agents.insert(lab, Agent::start(&collector, lab, &lab_token, opts().tags(&["lab"])));
    agents.insert(plain, Agent::start(&collector, plain, &plain_token, opts()));
    collector.wait_for_online_with_health(lab);
    collector.wait_for_online_with_health(plain);

    let artifacts = bin_dir().parent().expect("target dir").join("test-artifacts");
    fs::create_dir_all(&artifacts).expect("create the artifact dir");
    let mut child = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .current_dir(browser_dir())
        .env("ADMIN_URL", collector.admin_url())
        .env("ADMIN_TOKEN", admin_token(&collector))
        .env("ARTIFACT_DIR", &artifacts)
        .env("CHROMIUM", &chromium)
        .env("PROFILE_DIR", tmp.path().join("chromium-profile"))
        .env("LAB_DEVICE", lab)
        .env("OTHER_DEVICE", plain)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + Duration::from_secs(180);
    let mut out = Vec::new();
    let mut killed = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("[browser] {line}");
                if let Some(device) = line.strip_prefix("READY_TO_KILL ") {
                    let device = device.trim().to_string();
                    let agent = agents.get_mut(device.as_str()).unwrap_or_else(|| panic!("unknown device `{device}`"));
                    agent.stop();
                    killed = Some(device);
                }
                out.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the browser script took more than 3 minutes; output:\n{}", out.join("\n"));
            }
        }
    }
    let status = child.wait().expect("wait for node");
    let stderr = errors.join().unwrap_or_default();
    if !stderr.is_empty() {
        println!("[browser stderr]\n{stderr}");
    }
    assert!(status.success(), "the browser script failed ({status}):\n{}\n--- stderr ---\n{stderr}", out.join("\n"));
    assert_eq!(killed.as_deref(), Some(lab), "the script asked to kill the lab device");
    assert!(out.iter().any(|l| l.starts_with("PAGE_LOAD_MS")), "no page load time printed");
    assert!(out.iter().any(|l| l == "DASHBOARD_OK"), "the script did not finish its checks");
    for shot in ["fleet.png", "device.png"] {
        let path = artifacts.join(shot);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {} missing or empty", path.display());
    }
}

/// The dashboard's cookie alone cannot change anything: a POST also needs
/// the session's CSRF token, which only the page served to that session
/// holds. The CLI's bearer token needs none.
#[test]
fn dashboard_changes_need_the_session_csrf_token() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let token = collector.enroll("csrf-pi");
    let _agent = Agent::start(&collector, "csrf-pi", &token, opts());
    collector.wait_for_online_with_health("csrf-pi");
    let admin = admin_token(&collector);
    let base = collector.admin_url().to_string();

    let form = format!("token={admin}");
    let login = http(
        "POST",
        &format!("{base}/login"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(form.as_bytes()),
    );
    assert!(login.status == 303 || login.status == 302, "login: HTTP {} {}", login.status, login.text());
    let cookies: Vec<String> = login
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.split(';').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(cookies.len(), 2, "admin and session cookies: {cookies:?}");
    for c in login.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")) {
        assert!(c.1.contains("HttpOnly") && c.1.contains("SameSite=Strict"), "{c:?}");
    }
    let cookie = cookies.join("; ");
    let page = http("GET", &format!("{base}/"), &[("Cookie", &cookie)], None);
    assert_eq!(page.status, 200);
    let html = page.text();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token in the page"))
        .to_string();
    assert_eq!(csrf.len(), 64, "{csrf}");

    let bell = br#"{"device": "csrf-pi", "action": "ping"}"#;
    let post = |headers: &[(&str, &str)]| {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        http("POST", &format!("{base}/v1/bells"), &h, Some(bell))
    };
    let forged = post(&[("Cookie", &cookie)]);
    assert_eq!(forged.status, 403, "cookie without the CSRF token: {}", forged.text());
    assert!(forged.text().contains("CSRF"), "{}", forged.text());
    let wrong = post(&[("Cookie", &cookie), ("X-CSRF-Token", &"0".repeat(64))]);
    assert_eq!(wrong.status, 403, "a wrong CSRF token: {}", wrong.text());
    // Another session's token does not fit this session.
    let other_session = format!("{}; pulsebell_session={}", cookies[0], "ab".repeat(16));
    let stolen = post(&[("Cookie", &other_session), ("X-CSRF-Token", &csrf)]);
    assert_eq!(stolen.status, 403, "a token of another session: {}", stolen.text());
    let ok = post(&[("Cookie", &cookie), ("X-CSRF-Token", &csrf)]);
    assert_eq!(ok.status, 201, "cookie and its CSRF token: {}", ok.text());
    let bearer = format!("Bearer {admin}");
    let cli = post(&[("Authorization", &bearer)]);
    assert_eq!(cli.status, 201, "the bearer token needs no CSRF token: {}", cli.text());
    // Reading needs no CSRF token.
    let read = http("GET", &format!("{base}/v1/bells"), &[("Cookie", &cookie)], None);
    assert_eq!(read.status, 200);
    assert_eq!(read.json().as_array().map(Vec::len), Some(2));
}
