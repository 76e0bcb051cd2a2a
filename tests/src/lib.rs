//! Harness for Pulsebell's end-to-end tests: runs the real
//! `pulsebell-collector` and `pulsebell-agent` binaries as child processes,
//! each test in its own temporary directory with its own ports, and drives
//! them through their command lines and the device endpoint.
//!
//! - [`Collector`]: `serve` on `127.0.0.1:0`, waits for `collector ready`,
//!   reads `run.json`; the admin CLI (`enroll`, `status --json`, …); SIGTERM,
//!   SIGKILL and restart on the same data directory.
//! - [`backend`]: the storage backend the collectors run on, from
//!   `PULSEBELL_TEST_BACKEND` (`sled`, the default, or `nats`: each
//!   collector gets its own single-node JetStream server and runs in cluster
//!   mode on it); [`skip_on_nats`] for tests that only make sense on sled.
//! - [`Agent`]: writes a config (token file, state dir, the collector's dev
//!   CA) and runs `pulsebell-agent run`.
//! - [`wait_until`]: polls a condition that can only be observed by polling
//!   (a device's state in `status`), failing with the last observation.
//! - [`raw`]: a bare TLS WebSocket client for what the agent never does
//!   (bad tokens, hand-written Hello and Pulse messages).
//!
//! Both child types capture stdout and stderr line by line into a log file in
//! the test's directory; when a test panics, their `Drop` prints the logs so
//! the failure report shows what the processes said.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

pub use serde_json;
pub mod http;
pub mod nats;

/// How long a collector may take to log `collector ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM (or SIGKILL).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Default timeout for a state change observed by polling (a device going
/// online or offline). Generous: tests run in parallel on busy machines.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval of [`wait_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(75);
/// Default pulse interval of test agents: offline detection at 3 × this.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(400);

/// Keys every health object has (in `status`, `show` and the agent's
/// `health --json`); `temp_celsius` and `throttled` may be null.
pub const HEALTH_KEYS: &[&str] = &[
    "cpu_percent",
    "load1",
    "load5",
    "load15",
    "mem_total_bytes",
    "mem_used_bytes",
    "swap_total_bytes",
    "swap_used_bytes",
    "disk_total_bytes",
    "disk_used_bytes",
    "temp_celsius",
    "uptime_secs",
    "net_rx_bytes_per_sec",
    "net_tx_bytes_per_sec",
    "throttled",
];

/// The marker the collector logs once both listeners are bound and
/// `run.json` is written.
pub const READY_MARKER: &str = "collector ready";

// ---------------------------------------------------------------------------
// Binaries

/// The directory holding the workspace's binaries (`target/debug`): the
/// parent of the `deps` directory this test executable runs from.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test executable has a parent directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first \
         (`cargo test --workspace` builds it too)",
        path.display()
    );
    path
}

/// Path of the `pulsebell-collector` binary.
pub fn collector_bin() -> PathBuf {
    bin("pulsebell-collector")
}

/// Path of the `pulsebell-agent` binary.
pub fn agent_bin() -> PathBuf {
    bin("pulsebell-agent")
}

/// A command for one of our binaries, with an environment that cannot leak
/// into the test's expectations: no systemd sockets, plain-text logs at
/// `info`, no inherited `RUST_LOG`.
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in
        ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM", "RUST_LOG"]
    {
        cmd.env_remove(var);
    }
    cmd.env("PULSEBELL_LOG", "info").env("NO_COLOR", "1");
    cmd
}

// ---------------------------------------------------------------------------
// Running commands with a timeout

/// Runs `cmd` to completion, capturing stdout and stderr; kills it and
/// panics if it takes longer than `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let pid = Pid::from_child(&child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("waiting for {shown} failed: {e}"),
        Err(_) => {
            let _ = kill_process(pid, Signal::KILL);
            panic!("{shown} did not finish within {timeout:?}; killed it");
        }
    }
}

/// Formats a command's output for an assertion message.
pub fn describe(output: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// Log capture

/// Lines a child process wrote to stdout and stderr, kept in memory and
/// appended to a file in the test's directory.
#[derive(Clone)]
pub struct Log {
    name: String,
    path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

enum LogEvent {
    /// A line holding the watched marker was read.
    Marker,
    /// The stream ended: the process exited (or closed it).
    Eof,
}

impl Log {
    fn new(name: impl Into<String>, path: PathBuf) -> Log {
        Log { name: name.into(), path, lines: Arc::default() }
    }

    /// Copies `reader`'s lines into the log on a background thread. When
    /// `events` is given, sends [`LogEvent::Marker`] for each line containing
    /// `marker` and [`LogEvent::Eof`] at the end.
    fn capture(
        &self,
        reader: impl Read + Send + 'static,
        stream: &'static str,
        events: Option<(mpsc::Sender<LogEvent>, &'static str)>,
    ) {
        let log = self.clone();
        std::thread::spawn(move || {
            let mut file = OpenOptions::new().create(true).append(true).open(&log.path).ok();
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']));
                if let Some(file) = file.as_mut() {
                    let _ = writeln!(file, "[{stream}] {line}");
                }
                let marked = events.as_ref().is_some_and(|(_, marker)| line.contains(marker));
                log.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                if marked {
                    if let Some((tx, _)) = &events {
                        let _ = tx.send(LogEvent::Marker);
                    }
                }
            }
            if let Some((tx, _)) = &events {
                let _ = tx.send(LogEvent::Eof);
            }
        });
    }

    /// Appends a line of our own (e.g. a restart separator).
    fn note(&self, text: &str) {
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(&self.path) {
            let _ = writeln!(file, "[test] {text}");
        }
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).push(format!("[test] {text}"));
    }

    /// All lines so far.
    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for line in lines.iter() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Number of lines so far.
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing has been logged yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lines logged after the first `from` lines.
    pub fn text_since(&self, from: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().skip(from).fold(String::new(), |mut out, line| {
            let _ = writeln!(out, "{line}");
            out
        })
    }

    /// Whether any line contains `needle` (case-sensitive).
    pub fn contains(&self, needle: &str) -> bool {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|l| l.contains(needle))
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log framed with its name, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "===== {} log ({}) =====\n{}===== end of {} log =====",
            self.name,
            self.path.display(),
            self.text(),
            self.name
        )
    }
}

/// Removes ANSI escape sequences (in case a binary colours its logs anyway).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Sends `signal` to `child` and waits up to [`STOP_TIMEOUT`] for it to
/// exit; SIGKILLs it and panics when it does not.
fn signal_and_wait(child: &mut Child, signal: Signal, what: &str) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    let _ = kill_process(Pid::from_child(child), signal);
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {STOP_TIMEOUT:?} of {signal:?}; killed it");
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Polling

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Ok`, and returns
/// that value. `Err` carries what was observed instead; after `timeout` the
/// test fails with `what` and the last observation.
///
/// Only for conditions that cannot be awaited as an event (a device's state
/// as shown by `status`); never a substitute for a fixed sleep.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) => {
                if start.elapsed() >= timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// Storage backend

/// Environment variable choosing the collectors' storage backend:
/// [`BACKEND_SLED`] (default) or [`BACKEND_NATS`].
pub const BACKEND_ENV: &str = "PULSEBELL_TEST_BACKEND";
/// The single-node sled database in the data directory.
pub const BACKEND_SLED: &str = "sled";
/// NATS JetStream: every [`Collector::start`] / [`Collector::start_with_config`]
/// also starts its own single-server JetStream ([`nats::NatsCluster`]) and
/// runs the collector in cluster mode on it, as node [`NATS_NODE_ID`].
pub const BACKEND_NATS: &str = "nats";
/// `node_id` of collectors on the NATS backend.
pub const NATS_NODE_ID: &str = "test";

/// The backend the collectors of this test run use: `sled` or `nats`, from
/// [`BACKEND_ENV`] (unset or empty: `sled`; anything else fails the test).
/// `nats` without a usable `nats-server` falls back to `sled`, saying so
/// once with a `SKIP` line like [`nats::nats_or_skip`], or fails when
/// `PULSEBELL_REQUIRE_NATS=1`.
pub fn backend() -> &'static str {
    static BACKEND: std::sync::OnceLock<Result<&'static str, String>> = std::sync::OnceLock::new();
    let chosen = BACKEND.get_or_init(|| match std::env::var(BACKEND_ENV).unwrap_or_default().as_str() {
        "" | BACKEND_SLED => Ok(BACKEND_SLED),
        BACKEND_NATS => match nats::find_nats_server() {
            Ok(_) => Ok(BACKEND_NATS),
            Err(why) if nats::require_nats() => {
                Err(format!("{BACKEND_ENV}=nats: {why} ({}=1)", nats::REQUIRE_NATS_ENV))
            }
            Err(why) => {
                println!(
                    "SKIP the NATS backend ({BACKEND_ENV}=nats): {why}; running on sled instead; set {}=1 to make \
                     this a failure",
                    nats::REQUIRE_NATS_ENV
                );
                Ok(BACKEND_SLED)
            }
        },
        other => Err(format!("{BACKEND_ENV}={other:?}: use `{BACKEND_SLED}` or `{BACKEND_NATS}`")),
    });
    match chosen {
        Ok(name) => name,
        Err(why) => panic!("{why}"),
    }
}

/// For the top of a test that only makes sense on sled (it looks at the
/// data directory's database, or is about a lone collector in a way cluster
/// mode changes): on the NATS backend prints `SKIP test: why` and returns
/// true. `if skip_on_nats("my_test", "reads sled's files") { return; }`.
pub fn skip_on_nats(test: &str, why: &str) -> bool {
    if backend() != BACKEND_NATS {
        return false;
    }
    println!("SKIP {test} on the NATS backend: {why}");
    true
}

/// Whether `config_toml` configures cluster mode itself: a `[cluster]` (or
/// `[cluster.…]`) table header, or a top-level `cluster` key (inline table
/// or dotted keys) before the first table header.
fn has_cluster_table(config_toml: &str) -> bool {
    let mut top_level = true;
    for line in config_toml.lines() {
        let line = line.trim_start();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[').trim_start();
            let name = name.strip_prefix('"').unwrap_or(name);
            if name.strip_prefix("cluster").is_some_and(|rest| rest.trim_start().starts_with([']', '.', '"'])) {
                return true;
            }
            top_level = false;
        } else if top_level {
            let key = line.strip_prefix('"').unwrap_or(line);
            if key.strip_prefix("cluster").is_some_and(|rest| rest.trim_start().starts_with(['=', '.', '"'])) {
                return true;
            }
        }
    }
    false
}

/// A single-server JetStream in `dir/nats` for a collector on the NATS
/// backend, and `config_toml` with a `[cluster]` table pointing at it
/// appended (a table after everything else, so after the top-level keys).
fn nats_backend(dir: &Path, config_toml: &str) -> (nats::NatsCluster, String) {
    let nats_dir = dir.join("nats");
    fs::create_dir_all(&nats_dir).expect("create the NATS server dir");
    let server = nats::NatsCluster::start(1, &nats_dir);
    let mut config = config_toml.to_string();
    if !config.is_empty() && !config.ends_with('\n') {
        config.push('\n');
    }
    let _ = write!(
        config,
        "\n# Added by pulsebell-tests ({BACKEND_ENV}=nats). sync_interval 0: every\n# write-back goes out, as on sled, which these suites assume.\n[cluster]\nnats_urls = [{}]\nnode_id = {}\nsync_interval = \"0s\"\n",
        toml_str(&server.url(0)),
        toml_str(NATS_NODE_ID)
    );
    (server, config)
}

// ---------------------------------------------------------------------------
// Collector

/// What the collector writes to `run.json` once it is listening.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// Server process id.
    pub pid: u32,
    /// `127.0.0.1:PORT` of the device endpoint.
    pub device_addr: String,
    /// `http://127.0.0.1:PORT` of the admin API.
    pub admin_url: String,
    /// The dev CA that signed the server certificate.
    pub ca_file: PathBuf,
}

impl RunInfo {
    fn read(path: &Path) -> Result<RunInfo, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{} is not JSON ({e}): {text}", path.display()))?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("{} has no string `{k}`: {text}", path.display()))
        };
        let pid = v
            .get("pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| format!("{} has no numeric `pid`: {text}", path.display()))?;
        Ok(RunInfo {
            pid,
            device_addr: s("device_addr")?,
            admin_url: s("admin_url")?,
            ca_file: PathBuf::from(s("ca_file")?),
        })
    }
}

static AGENT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running `pulsebell-collector serve`. Dropping it kills the process
/// (and then its NATS server, on the NATS backend).
pub struct Collector {
    dir: PathBuf,
    data_dir: PathBuf,
    config: Option<PathBuf>,
    child: Option<Child>,
    log: Log,
    run: RunInfo,
    starts: u32,
    /// On the NATS backend: the collector's own JetStream server, where its
    /// data lives. Started once with the collector and kept running across
    /// [`Collector::restart`], [`Collector::stop`] and [`Collector::kill9`].
    nats: Option<nats::NatsCluster>,
}

impl Collector {
    /// Starts a collector whose data directory is `dir/collector-data`,
    /// logging to `dir/collector.log`. On the NATS backend ([`backend`]) it
    /// runs in cluster mode on its own JetStream server in `dir/nats`, with
    /// that `[cluster]` table in `dir/collector.toml`.
    pub fn start(dir: &Path) -> Collector {
        if backend() == BACKEND_NATS {
            return Collector::start_with_config(dir, "");
        }
        Collector::launch(dir, None, None)
    }

    /// Like [`Collector::start`], with `config_toml` written to
    /// `dir/collector.toml` and passed as `--config`. On the NATS backend a
    /// `[cluster]` table for the collector's own JetStream server is
    /// appended, unless `config_toml` configures cluster mode itself (as
    /// [`Collector::start_cluster_node`] does).
    pub fn start_with_config(dir: &Path, config_toml: &str) -> Collector {
        let (nats, config_toml) = if backend() == BACKEND_NATS && !has_cluster_table(config_toml) {
            let (server, config) = nats_backend(dir, config_toml);
            (Some(server), config)
        } else {
            (None, config_toml.to_string())
        };
        let path = dir.join("collector.toml");
        fs::write(&path, config_toml).expect("write collector config");
        Collector::launch(dir, Some(path), nats)
    }

    /// A collector in cluster mode on `nats_urls` as node `node_id`, with
    /// `config_toml` (top-level keys) added. With `share`, that collector's
    /// admin token and TLS material are copied into this one's data dir
    /// first, so the nodes share one token and one CA (as the README says
    /// to do by hand).
    pub fn start_cluster_node(
        dir: &Path,
        nats_urls: &[String],
        node_id: &str,
        share: Option<&Collector>,
        config_toml: &str,
    ) -> Collector {
        let data_dir = dir.join("collector-data");
        fs::create_dir_all(&data_dir).expect("create data dir");
        if let Some(other) = share {
            fs::copy(other.data_dir().join("admin.token"), data_dir.join("admin.token")).expect("copy admin.token");
            let tls = data_dir.join("tls");
            fs::create_dir_all(&tls).expect("create tls dir");
            for e in fs::read_dir(other.data_dir().join("tls")).expect("read tls dir") {
                let e = e.expect("tls dir entry");
                fs::copy(e.path(), tls.join(e.file_name())).expect("copy tls file");
            }
        }
        let urls: Vec<String> = nats_urls.iter().map(|u| toml_str(u)).collect();
        let config =
            format!("{config_toml}\n[cluster]\nnats_urls = [{}]\nnode_id = {}\n", urls.join(", "), toml_str(node_id));
        Collector::start_with_config(dir, &config)
    }

    fn launch(dir: &Path, config: Option<PathBuf>, nats: Option<nats::NatsCluster>) -> Collector {
        let data_dir = dir.join("collector-data");
        let log = Log::new("collector", dir.join("collector.log"));
        let (child, run) = spawn_collector(&data_dir, config.as_deref(), &log);
        Collector { dir: dir.to_path_buf(), data_dir, config, child: Some(child), log, run, starts: 1, nats }
    }

    /// Starts the collector again on the same data directory (and config),
    /// after [`Collector::stop`] or [`Collector::kill9`]. Ports change. On
    /// the NATS backend its JetStream server keeps running (it holds the
    /// data).
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.starts += 1;
        self.log.note(&format!("---- start #{} on the same data dir ----", self.starts));
        let (child, run) = spawn_collector(&self.data_dir, self.config.as_deref(), &self.log);
        self.child = Some(child);
        self.run = run;
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("collector is not running");
        let status = signal_and_wait(&mut child, Signal::TERM, "collector");
        self.log.note(&format!("---- stopped with SIGTERM: {status} ----"));
        status
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("collector is not running");
        let status = signal_and_wait(&mut child, Signal::KILL, "collector");
        self.log.note(&format!("---- killed with SIGKILL: {status} ----"));
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The test's directory (agents put their files under it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The collector's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// On the NATS backend, the collector's own JetStream server (`None` on
    /// sled, and for [`Collector::start_cluster_node`]).
    pub fn nats(&self) -> Option<&nats::NatsCluster> {
        self.nats.as_ref()
    }

    /// The contents of `run.json` of the current run.
    pub fn run_info(&self) -> &RunInfo {
        &self.run
    }

    /// `http://127.0.0.1:PORT` of the admin API.
    pub fn admin_url(&self) -> &str {
        &self.run.admin_url
    }

    /// `127.0.0.1:PORT` of the device endpoint.
    pub fn device_addr(&self) -> &str {
        &self.run.device_addr
    }

    /// Port of the device endpoint.
    pub fn device_port(&self) -> u16 {
        let (_, port) = self.run.device_addr.rsplit_once(':').expect("device_addr has a port");
        port.parse().expect("device_addr port is a number")
    }

    /// `wss://localhost:PORT/v1/ws`.
    pub fn device_url(&self) -> String {
        format!("wss://localhost:{}{}", self.device_port(), pulsebell_proto::WS_PATH)
    }

    /// The dev CA certificate (PEM).
    pub fn ca_file(&self) -> &Path {
        &self.run.ca_file
    }

    /// The collector's log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Runs `pulsebell-collector --data-dir DIR ARGS…` (the admin URL comes
    /// from `run.json`) and returns its output, whatever the exit status.
    pub fn cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = command(&collector_bin());
        cmd.arg("--data-dir").arg(&self.data_dir).args(args);
        run_with_timeout(cmd, CLI_TIMEOUT)
    }

    /// Like [`Collector::cli`], failing the test unless it exits 0.
    pub fn cli_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let output = self.cli(args);
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        assert!(output.status.success(), "`pulsebell-collector {}` failed:\n{}", shown.join(" "), describe(&output));
        output
    }

    /// `enroll ID`: returns the device token (the last line of stdout).
    pub fn enroll(&self, id: &str) -> String {
        let output = self.cli_ok(&["enroll", id]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let token = stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default().to_string();
        assert!(
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()),
            "`enroll {id}` did not print a token on its last line:\n{}",
            describe(&output)
        );
        token
    }

    /// `revoke ID`.
    pub fn revoke(&self, id: &str) {
        self.cli_ok(&["revoke", id]);
    }

    /// `status --json`, parsed, or why it could not be had.
    pub fn try_status(&self) -> Result<Vec<Value>, String> {
        let output = self.cli(&["status", "--json"]);
        if !output.status.success() {
            return Err(format!("`status --json` failed:\n{}", describe(&output)));
        }
        match serde_json::from_slice::<Value>(&output.stdout) {
            Ok(Value::Array(devices)) => Ok(devices),
            Ok(other) => Err(format!("`status --json` printed {other}, not a JSON array")),
            Err(e) => Err(format!("`status --json` did not print JSON ({e}):\n{}", describe(&output))),
        }
    }

    /// `status --json`, parsed; fails the test if that does not work.
    pub fn status(&self) -> Vec<Value> {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The `status --json` entry of device `id`, if listed.
    pub fn device(&self, id: &str) -> Option<Value> {
        find_device(&self.status(), id).cloned()
    }

    /// `show ID --json`, parsed.
    pub fn show(&self, id: &str) -> Value {
        let output = self.cli_ok(&["show", id, "--json"]);
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("`show {id} --json` did not print JSON ({e}):\n{}", describe(&output)))
    }

    /// Polls `status --json` until device `id` satisfies `check` (which says
    /// what is wrong otherwise), and returns its entry.
    pub fn wait_for_device(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Value) -> Result<(), String>,
    ) -> Value {
        wait_until(&format!("device `{id}` {what}"), timeout, || {
            let devices = self.try_status()?;
            let device = find_device(&devices, id).ok_or_else(|| format!("`{id}` is not listed in {devices:?}"))?;
            check(device).map_err(|e| format!("{e}; entry: {device}"))?;
            Ok(device.clone())
        })
    }

    /// Waits until device `id` shows `state` (`online`, `offline`, `never_seen`).
    pub fn wait_for_state(&self, id: &str, state: &str) -> Value {
        self.wait_for_device(id, &format!("to be {state}"), STATE_TIMEOUT, |d| {
            match d.get("state").and_then(Value::as_str) {
                Some(s) if s == state => Ok(()),
                other => Err(format!("state is {other:?}")),
            }
        })
    }

    /// Waits until device `id` is online and has reported health.
    pub fn wait_for_online_with_health(&self, id: &str) -> Value {
        self.wait_for_device(id, "to be online with health", STATE_TIMEOUT, |d| {
            if d["state"] != "online" {
                return Err(format!("state is {}", d["state"]));
            }
            if !d["health"].is_object() {
                return Err(format!("health is {}", d["health"]));
            }
            Ok(())
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log.dump());
        }
    }
}

fn spawn_collector(data_dir: &Path, config: Option<&Path>, log: &Log) -> (Child, RunInfo) {
    let mut cmd = command(&collector_bin());
    cmd.arg("serve").arg("--data-dir").arg(data_dir).args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let (tx, rx) = mpsc::channel();
    log.capture(child.stdout.take().expect("piped stdout"), "stdout", None);
    log.capture(child.stderr.take().expect("piped stderr"), "stderr", Some((tx, READY_MARKER)));

    let fail = |child: &mut Child, why: String| -> ! {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        panic!("collector did not start: {why} (exit status: {status})\ncommand: {shown}\n{}", log.dump());
    };
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(LogEvent::Marker) => {}
        Ok(LogEvent::Eof) => {
            // stderr closed: the process exited (or closed stderr) first.
            fail(&mut child, format!("it exited (or closed stderr) before logging `{READY_MARKER}`"));
        }
        Err(_) => fail(&mut child, format!("no `{READY_MARKER}` line on stderr within {START_TIMEOUT:?}")),
    }
    let run = match RunInfo::read(&data_dir.join("run.json")) {
        Ok(run) => run,
        Err(e) => fail(&mut child, format!("after `{READY_MARKER}`: {e}")),
    };
    let pid = child.id();
    if run.pid != pid {
        fail(&mut child, format!("run.json names pid {}, but the server is pid {pid}", run.pid));
    }
    (child, run)
}

/// The entry with `"id": id` in a `status --json` array.
pub fn find_device<'a>(devices: &'a [Value], id: &str) -> Option<&'a Value> {
    devices.iter().find(|d| d.get("id").and_then(Value::as_str) == Some(id))
}

/// The state of device `id` in a `status --json` array, if listed.
pub fn state_of(devices: &[Value], id: &str) -> Option<String> {
    find_device(devices, id).and_then(|d| d.get("state")).and_then(Value::as_str).map(str::to_owned)
}

/// Parses an RFC 3339 timestamp from `status` output.
pub fn parse_time(v: &Value) -> Result<time::OffsetDateTime, String> {
    let s = v.as_str().ok_or_else(|| format!("{v} is not a string"))?;
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`{s}` is not RFC 3339: {e}"))
}

// ---------------------------------------------------------------------------
// Agent

/// How to configure a test agent.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// Pulse interval.
    pub interval: Duration,
    /// Tags.
    pub tags: Vec<String>,
    /// CA file; `None` uses the collector's dev CA.
    pub ca_file: Option<PathBuf>,
    /// `collector_url`; `None` uses [`Collector::device_url`].
    pub collector_url: Option<String>,
    /// `collector_urls` (cluster failover); when set, `collector_url` is not
    /// written.
    pub collector_urls: Vec<String>,
    /// TOML appended to the generated config (e.g. `[actions.x]` tables).
    pub extra_toml: String,
    /// Environment variables set for the agent process (e.g. a `PATH` that
    /// starts with a fake `systemctl`).
    pub env: Vec<(String, String)>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            interval: DEFAULT_INTERVAL,
            tags: vec![],
            ca_file: None,
            collector_url: None,
            collector_urls: vec![],
            extra_toml: String::new(),
            env: vec![],
        }
    }
}

impl AgentOpts {
    /// Sets the tags.
    pub fn tags(mut self, tags: &[&str]) -> Self {
        self.tags = tags.iter().map(|t| t.to_string()).collect();
        self
    }

    /// Sets the pulse interval.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Trusts `ca_file` instead of the collector's dev CA.
    pub fn ca_file(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }
}

/// Quotes `s` as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A running `pulsebell-agent run`. Dropping it kills the process.
pub struct Agent {
    id: String,
    dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: Log,
}

impl Agent {
    /// Writes a config for device `id` with `token` into a fresh directory
    /// under the collector's test directory, and starts the agent.
    pub fn start(collector: &Collector, id: &str, token: &str, opts: AgentOpts) -> Agent {
        let n = AGENT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = collector.dir().join(format!("agent-{id}-{n}"));
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).expect("create agent state dir");
        let token_file = dir.join("token");
        write_private(&token_file, &format!("{token}\n"));
        let ca_file = opts.ca_file.clone().unwrap_or_else(|| collector.ca_file().to_path_buf());
        let url = opts.collector_url.clone().unwrap_or_else(|| collector.device_url());
        let tags: Vec<String> = opts.tags.iter().map(|t| toml_str(t)).collect();
        let url_line = if opts.collector_urls.is_empty() {
            format!("collector_url = {}", toml_str(&url))
        } else {
            let urls: Vec<String> = opts.collector_urls.iter().map(|u| toml_str(u)).collect();
            format!("collector_urls = [{}]", urls.join(", "))
        };
        let config_text = format!(
            "{}\ndevice_id = {}\ntoken_file = {}\nca_file = {}\ninterval = \"{}ms\"\ntags = [{}]\nstate_dir = {}\n{}\n",
            url_line,
            toml_str(id),
            toml_str(&token_file.to_string_lossy()),
            toml_str(&ca_file.to_string_lossy()),
            opts.interval.as_millis(),
            tags.join(", "),
            toml_str(&state_dir.to_string_lossy()),
            opts.extra_toml,
        );
        let config = dir.join("agent.toml");
        fs::write(&config, config_text).expect("write agent config");
        let log = Log::new(format!("agent `{id}`"), dir.join("agent.log"));
        let mut agent = Agent { id: id.to_string(), dir, config, env: opts.env, child: None, log };
        agent.spawn();
        agent
    }

    /// Starts an agent with a config of the test's own: `config` gets the
    /// agent's fresh directory (holding an empty `state/`) and returns the
    /// TOML. `label` names the directory and the log.
    pub fn start_with_config(collector: &Collector, label: &str, config: impl FnOnce(&Path) -> String) -> Agent {
        let n = AGENT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = collector.dir().join(format!("agent-{label}-{n}"));
        fs::create_dir_all(dir.join("state")).expect("create agent state dir");
        let text = config(&dir);
        let path = dir.join("agent.toml");
        fs::write(&path, text).expect("write agent config");
        let log = Log::new(format!("agent `{label}`"), dir.join("agent.log"));
        let mut agent = Agent { id: label.to_string(), dir, config: path, env: vec![], child: None, log };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let mut cmd = command(&agent_bin());
        cmd.arg("run").arg("--config").arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        self.log.capture(child.stdout.take().expect("piped stdout"), "stdout", None);
        self.log.capture(child.stderr.take().expect("piped stderr"), "stderr", None);
        self.child = Some(child);
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent's directory (config, token, state, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The agent's log (stdout and stderr).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Polls the log until a line contains any of `needles`; returns that
    /// line. Fails the test (showing the log) after `timeout`.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> String {
        wait_until(&format!("agent `{}` to log one of {needles:?}", self.id), timeout, || {
            let text = self.log.text();
            text.lines()
                .find(|l| needles.iter().any(|n| l.contains(n)))
                .map(str::to_owned)
                .ok_or_else(|| format!("{} line(s) so far", text.lines().count()))
        })
    }

    /// The exit status if the agent has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits for the agent to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent is not running");
        let status = signal_and_wait(&mut child, Signal::TERM, "agent");
        self.log.note(&format!("---- stopped with SIGTERM: {status} ----"));
        status
    }

    /// Sends SIGKILL and reaps the process: a crash (or power loss), with no
    /// goodbye to the collector.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent is not running");
        let status = signal_and_wait(&mut child, Signal::KILL, "agent");
        self.log.note(&format!("---- killed with SIGKILL: {status} ----"));
    }

    /// Starts the agent again with the same config (after [`Agent::stop`]).
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.log.note("---- restarted ----");
        self.spawn();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log.dump());
        }
    }
}

/// Writes `contents` to a new file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    file.write_all(contents.as_bytes()).expect("write file");
}

/// Runs `pulsebell-agent ARGS…` to completion (for `check-config`,
/// `health`, `print-default-config`).
pub fn agent_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let mut cmd = command(&agent_bin());
    cmd.args(args);
    run_with_timeout(cmd, CLI_TIMEOUT)
}

/// Writes a self-signed CA certificate (PEM) unrelated to any collector to
/// `path`, for agents that must refuse the collector's certificate.
pub fn write_foreign_ca(path: &Path) {
    let key = rcgen::KeyPair::generate().expect("generate key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("certificate params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "Some other CA");
    let cert = params.self_signed(&key).expect("self-sign");
    fs::write(path, cert.pem()).expect("write foreign CA");
}

// ---------------------------------------------------------------------------
// Raw device connections

/// A bare device-side WebSocket client: TLS verified against the
/// collector's CA, the current subprotocol (or the one a test offers, e.g.
/// `pulsebell.v1` to play an agent of the previous version), and whatever
/// `Authorization` header the test chooses.
pub mod raw {
    use std::future::Future;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use pulsebell_proto::{decode, encode, AgentMsg, Hello, ServerMsg, MAX_FRAME, SUBPROTOCOL};
    use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
    use tokio::net::TcpStream;
    use tokio_rustls::{client::TlsStream, TlsConnector};
    use tokio_tungstenite::tungstenite::{
        self,
        client::IntoClientRequest,
        handshake::client::Response,
        http::{header, HeaderValue},
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Message,
    };
    use tokio_tungstenite::WebSocketStream;

    use crate::Collector;

    /// An open device connection.
    pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

    /// Time allowed for one connection attempt or one awaited message.
    pub const TIMEOUT: Duration = Duration::from_secs(10);

    /// Runs `fut` on a fresh current-thread runtime.
    pub fn block_on<F: Future>(fut: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(fut)
    }

    /// Where and how to connect: address, URL and trusted CA.
    #[derive(Debug, Clone)]
    pub struct Endpoint {
        /// `127.0.0.1:PORT`.
        pub addr: String,
        /// `wss://localhost:PORT/v1/ws`.
        pub url: String,
        /// PEM file of the CA to trust.
        pub ca_file: std::path::PathBuf,
    }

    impl Endpoint {
        /// The device endpoint of `collector`.
        pub fn of(collector: &Collector) -> Endpoint {
            Endpoint {
                addr: collector.device_addr().to_string(),
                url: collector.device_url(),
                ca_file: collector.ca_file().to_path_buf(),
            }
        }
    }

    fn tls_config(ca_file: &Path) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).expect("read CA file") {
            roots.add(cert.expect("PEM certificate")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    fn io_err(e: impl std::fmt::Display) -> tungstenite::Error {
        tungstenite::Error::Io(std::io::Error::other(e.to_string()))
    }

    /// Opens a connection with `authorization` as the whole
    /// `Authorization` header value (`None`: no header). A refused upgrade
    /// is `Err(tungstenite::Error::Http(response))`.
    pub async fn upgrade(ep: &Endpoint, authorization: Option<&str>) -> Result<(Ws, Response), tungstenite::Error> {
        upgrade_offering(ep, authorization, SUBPROTOCOL).await
    }

    /// Like [`upgrade`], offering `subprotocols` (`Sec-WebSocket-Protocol`,
    /// e.g. `pulsebell.v1`).
    pub async fn upgrade_offering(
        ep: &Endpoint,
        authorization: Option<&str>,
        subprotocols: &str,
    ) -> Result<(Ws, Response), tungstenite::Error> {
        tokio::time::timeout(TIMEOUT, upgrade_inner(ep, authorization, subprotocols))
            .await
            .unwrap_or_else(|_| Err(io_err(format!("no upgrade answer within {TIMEOUT:?}"))))
    }

    async fn upgrade_inner(
        ep: &Endpoint,
        authorization: Option<&str>,
        subprotocols: &str,
    ) -> Result<(Ws, Response), tungstenite::Error> {
        let tcp = TcpStream::connect(&ep.addr).await?;
        let connector = TlsConnector::from(tls_config(&ep.ca_file));
        let tls = connector
            .connect(ServerName::try_from("localhost").expect("server name"), tcp)
            .await
            .map_err(|e| io_err(format!("TLS handshake failed: {e}")))?;
        let mut request = ep.url.as_str().into_client_request()?;
        let headers = request.headers_mut();
        if let Some(auth) = authorization {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).map_err(io_err)?);
        }
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(subprotocols).map_err(io_err)?);
        let config = WebSocketConfig::default().max_message_size(Some(MAX_FRAME)).max_frame_size(Some(MAX_FRAME));
        tokio_tungstenite::client_async_with_config(request, tls, Some(config)).await
    }

    /// The HTTP status a refused upgrade got, or a description of what
    /// happened instead.
    pub async fn refused_status(ep: &Endpoint, authorization: Option<&str>) -> Result<u16, String> {
        match upgrade(ep, authorization).await {
            Err(tungstenite::Error::Http(resp)) => Ok(resp.status().as_u16()),
            Err(e) => Err(format!("upgrade failed without an HTTP status: {e}")),
            Ok((_, resp)) => Err(format!("upgrade succeeded (HTTP {})", resp.status())),
        }
    }

    /// A Hello as the agent would send it.
    pub fn hello(device_id: &str, interval_ms: u32, tags: &[&str]) -> Hello {
        Hello {
            protocol_version: pulsebell_proto::PROTOCOL_VERSION,
            device_id: device_id.to_string(),
            agent_version: "0.0.0-raw-test".to_string(),
            boot_id: "00000000-0000-4000-8000-000000000000".to_string(),
            hostname: "raw-test-host".to_string(),
            os: "Test OS".to_string(),
            kernel: "6.0.0-test".to_string(),
            arch: std::env::consts::ARCH.to_string(),
            board_model: Some("Test Board".to_string()),
            interval_ms,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            actions: vec![],
        }
    }

    /// Sends one agent message as a binary frame.
    pub async fn send(ws: &mut Ws, msg: &AgentMsg) {
        let bytes = encode(msg).expect("encode");
        ws.send(Message::Binary(bytes.into())).await.expect("send a frame");
    }

    /// What arrived from the collector.
    #[derive(Debug)]
    pub enum Incoming {
        /// A decoded message.
        Msg(ServerMsg),
        /// A close frame: code and reason.
        Close(Option<(u16, String)>),
        /// The stream ended without a close frame, or failed.
        Ended(String),
    }

    /// The next message or close from the collector, skipping pings and
    /// pongs; fails the test after [`TIMEOUT`].
    pub async fn recv(ws: &mut Ws) -> Incoming {
        let fut = async {
            loop {
                match ws.next().await {
                    None => return Incoming::Ended("end of stream".into()),
                    Some(Err(e)) => return Incoming::Ended(e.to_string()),
                    Some(Ok(Message::Binary(bytes))) => {
                        let msg = decode::<ServerMsg>(&bytes).expect("collector sent a message that does not decode");
                        return Incoming::Msg(msg);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Incoming::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())))
                    }
                    Some(Ok(Message::Text(t))) => panic!("collector sent a text frame: {t}"),
                    Some(Ok(_)) => {}
                }
            }
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| panic!("nothing from the collector within {TIMEOUT:?}"))
    }

    /// Closes the connection normally (best effort).
    pub async fn close(ws: &mut Ws) {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "test done".into() };
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
    }
}

/// A TCP forwarder with a stable port in front of a collector's device
/// port, so an agent keeps one `collector_url` across collector restarts
/// (which change ports). TLS passes through untouched. While it has no
/// target, new connections wait (up to `hold`) for one.
pub struct Forwarder {
    port: u16,
    target: Arc<Mutex<Option<String>>>,
}

impl Forwarder {
    /// Forwards to `target` (`host:port`); connections wait up to `hold`
    /// while there is no target.
    pub fn start(target: &str, hold: Duration) -> Forwarder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        let target = Arc::new(Mutex::new(Some(target.to_string())));
        let shared = Arc::clone(&target);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || Forwarder::pipe(client, &shared, hold));
            }
        });
        Forwarder { port, target }
    }

    fn pipe(client: std::net::TcpStream, target: &Mutex<Option<String>>, hold: Duration) {
        use std::net::{Shutdown, TcpStream};
        let deadline = Instant::now() + hold;
        let server = loop {
            let addr = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(server) = addr.and_then(|a| TcpStream::connect(a).ok()) {
                break server;
            }
            if Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else { return };
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut client_r, &mut server_w);
            let _ = server_w.shutdown(Shutdown::Write);
        });
        let _ = std::io::copy(&mut &server, &mut &client);
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        let _ = up.join();
    }

    /// Where new connections go; `None` holds them.
    pub fn set_target(&self, target: Option<&str>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target.map(str::to_owned);
    }

    /// `wss://localhost:PORT/v1/ws` through the forwarder.
    pub fn url(&self) -> String {
        format!("wss://localhost:{}{}", self.port, pulsebell_proto::WS_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::has_cluster_table;

    #[test]
    fn cluster_table_detection() {
        assert!(!has_cluster_table(""));
        assert!(!has_cluster_table("write_back = \"1s\"\n"));
        assert!(!has_cluster_table("[alerts]\nwebhooks = [\"http://x\"]\n# [cluster]\n"));
        assert!(!has_cluster_table("[alerts]\ncluster = 1\n"));
        assert!(!has_cluster_table("[clusters]\n"));
        assert!(has_cluster_table("write_back = \"1s\"\n\n[cluster]\nnats_urls = [\"nats://x:1\"]\n"));
        assert!(has_cluster_table("  [ cluster ]\n"));
        assert!(has_cluster_table("[cluster.extra]\n"));
        assert!(has_cluster_table("cluster = { nats_urls = [\"nats://x:1\"] }\n"));
        assert!(has_cluster_table("cluster.nats_urls = [\"nats://x:1\"]\n"));
    }
}
