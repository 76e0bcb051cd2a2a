//! Checks: is the application on the board healthy, not just the board.
//!
//! - [`Runner`] runs one check once: one async function per kind (a systemd
//!   unit, a Nagios-convention command, an HTTP GET, a TCP connect, a
//!   process by name), each bounded by the check's timeout. A run that
//!   outlives it is UNKNOWN.
//! - [`Damper`] is the `retries` rule as pure state, no I/O: a check's
//!   status changes only when `retries` results in a row agree on the new
//!   one.
//! - [`Checks`] runs every check on its own interval and publishes the
//!   settled results through a watch channel, for the uplink to report.
//! - [`run_once`], [`render_table`], [`to_json`] and [`exit_code`] are
//!   `pulsebell-agent check`: every check once, retries ignored, with a
//!   Nagios exit code for scripts and NRPE.
//!
//! Commands run the way actions do ([`crate::actions`]): argv from the
//! config, never a shell, in their own process group, stopped as a group.

use std::collections::BTreeMap;
use std::future::{pending, Future};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pulsebell_proto::{CheckDigest, CheckResult, CheckStatus, MAX_CHECK_OUTPUT, MAX_STRING};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info};

use crate::actions::{describe_exit, run_program, Ended};
use crate::config::{CheckSpec, CheckTarget, Config, HostPort, HttpTarget};
use crate::uplink::tls::Trust;

/// Environment variable naming the `systemctl` program unit checks run
/// (default [`DEFAULT_SYSTEMCTL`]), e.g. a wrapper on a system without
/// systemd.
pub const SYSTEMCTL_ENV: &str = "PULSEBELL_SYSTEMCTL";

/// The `systemctl` unit checks run unless [`SYSTEMCTL_ENV`] says otherwise.
pub const DEFAULT_SYSTEMCTL: &str = "systemctl";

/// Summary of a check that has not finished its first run yet.
pub const PENDING: &str = "pending";

/// Whether `r` is a check that has not produced its first result yet.
pub fn is_pending(r: &CheckResult) -> bool {
    r.status == CheckStatus::Unknown && r.summary == PENDING
}

/// Most bytes of an HTTP response a check reads (head and start of body).
const MAX_RESPONSE: usize = 16 * 1024;

/// The longest random delay before a check's first run, so that checks
/// configured together don't all start in the same instant.
const MAX_SPLAY: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What one run of a check saw, before retries damping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The status this run found.
    pub status: CheckStatus,
    /// One line, at most [`MAX_STRING`] bytes.
    pub summary: String,
    /// At most [`MAX_CHECK_OUTPUT`] bytes.
    pub output: String,
}

impl Outcome {
    /// An outcome with no output; `summary` is cut to its first line and
    /// [`MAX_STRING`] bytes.
    pub fn new(status: CheckStatus, summary: impl AsRef<str>) -> Outcome {
        Outcome { status, summary: first_line(summary.as_ref()), output: String::new() }
    }

    fn with_output(mut self, output: &str) -> Outcome {
        self.output = tail(output, MAX_CHECK_OUTPUT).to_string();
        self
    }

    fn timed_out(timeout: Duration) -> Outcome {
        Outcome::new(CheckStatus::Unknown, format!("timed out after {}", humantime::format_duration(timeout)))
    }
}

/// The first line of `text`, trimmed, at most [`MAX_STRING`] bytes (cut at
/// a char boundary).
fn first_line(text: &str) -> String {
    let line = text.trim_start().lines().next().unwrap_or("").trim();
    let mut end = line.len().min(MAX_STRING);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

/// The last `max` bytes of `text`, cut at a char boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The first `max` bytes of `text`, cut at a char boundary.
fn head(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Runs checks: what every kind needs from the config and the system.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Root of `/proc` for process checks (the config's `root`; tests point
    /// it at a fake tree).
    pub root: PathBuf,
    /// The program unit checks run as `systemctl show -p ActiveState
    /// --value UNIT`.
    pub systemctl: String,
    /// What `https://` checks trust: the same as the connection to the
    /// collector (`ca_file`, `ca_fingerprint` or the web PKI).
    pub trust: Trust,
}

impl Runner {
    /// A runner for `config`; `systemctl` from [`SYSTEMCTL_ENV`], else
    /// [`DEFAULT_SYSTEMCTL`].
    pub fn new(config: &Config) -> Runner {
        let systemctl = std::env::var(SYSTEMCTL_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SYSTEMCTL.to_string());
        Runner { root: config.root.clone(), systemctl, trust: config.trust.clone() }
    }

    /// Runs `spec` once, within its timeout.
    pub async fn run(&self, spec: &CheckSpec) -> Outcome {
        let timeout = spec.timeout;
        match &spec.target {
            // These stop their own process group on timeout.
            CheckTarget::Unit(unit) => check_unit(&self.systemctl, unit, timeout).await,
            CheckTarget::Command(argv) => check_command(argv, timeout).await,
            // This one keeps a status it has already read when time runs out.
            CheckTarget::Http(target) => check_http(target, &self.trust, timeout).await,
            CheckTarget::Tcp(addr) => bounded(timeout, check_tcp(addr)).await,
            CheckTarget::Process(name) => bounded(timeout, check_process(&self.root, name)).await,
        }
    }
}

/// `check` or UNKNOWN "timed out after …".
async fn bounded(timeout: Duration, check: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(timeout, check).await.unwrap_or_else(|_| Outcome::timed_out(timeout))
}

/// A systemd unit's `ActiveState`: active is OK; activating, reloading,
/// deactivating WARNING; failed, inactive CRITICAL; anything else UNKNOWN.
pub async fn check_unit(systemctl: &str, unit: &str, timeout: Duration) -> Outcome {
    let argv: Vec<String> =
        [systemctl, "show", "-p", "ActiveState", "--value", unit].iter().map(|s| s.to_string()).collect();
    let run = match run_program(&argv, &[], timeout, pending(), MAX_CHECK_OUTPUT).await {
        Ok(run) => run,
        Err(e) => return Outcome::new(CheckStatus::Unknown, format!("cannot start `{systemctl}`: {e}")),
    };
    match run.ended {
        Ended::Exited(s) if s.success() => {
            let state = first_line(&run.stdout_head);
            let status = match state.as_str() {
                "active" => CheckStatus::Ok,
                "activating" | "reloading" | "deactivating" => CheckStatus::Warning,
                "failed" | "inactive" => CheckStatus::Critical,
                _ => CheckStatus::Unknown,
            };
            let state = if state.is_empty() { "(no state)" } else { state.as_str() };
            Outcome::new(status, format!("{unit} is {state}"))
        }
        Ended::Exited(s) => Outcome::new(
            CheckStatus::Unknown,
            format!("`{systemctl} show {unit}` {}: {}", describe_exit(&s), first_line(&run.output)),
        )
        .with_output(&run.output),
        Ended::TimedOut => Outcome::timed_out(timeout),
        Ended::WaitFailed(e) => Outcome::new(CheckStatus::Unknown, format!("waiting for `{systemctl}` failed: {e}")),
        Ended::Cancelled => Outcome::new(CheckStatus::Unknown, "cancelled"),
    }
}

/// A Nagios-convention plugin: exit 0 OK, 1 WARNING, 2 CRITICAL, anything
/// else (or a signal, a timeout, no such program) UNKNOWN. The summary is
/// the first line of stdout without its performance data (after `|`); the
/// output is the tail of stdout and stderr together.
pub async fn check_command(argv: &[String], timeout: Duration) -> Outcome {
    let run = match run_program(argv, &[], timeout, pending(), MAX_CHECK_OUTPUT).await {
        Ok(run) => run,
        Err(e) => return Outcome::new(CheckStatus::Unknown, format!("cannot start `{}`: {e}", argv[0])),
    };
    let line = first_line(&run.stdout_head);
    let line = line.split_once('|').map_or(line.as_str(), |(text, _perfdata)| text).trim();
    let outcome = match run.ended {
        Ended::Exited(s) => match s.code() {
            Some(code @ 0..=3) if !line.is_empty() => Outcome::new(CheckStatus::from_exit_code(code), line),
            Some(code) if line.is_empty() => {
                Outcome::new(CheckStatus::from_exit_code(code), format!("{} (no output)", describe_exit(&s)))
            }
            Some(code) => Outcome::new(CheckStatus::from_exit_code(code), format!("{}: {line}", describe_exit(&s))),
            None => Outcome::new(CheckStatus::Unknown, describe_exit(&s)),
        },
        Ended::TimedOut => Outcome::timed_out(timeout),
        Ended::WaitFailed(e) => Outcome::new(CheckStatus::Unknown, format!("wait failed: {e}")),
        Ended::Cancelled => Outcome::new(CheckStatus::Unknown, "cancelled"),
    };
    outcome.with_output(&run.output)
}

/// A TCP connect: OK "connected in N ms", else CRITICAL with the error.
pub async fn check_tcp(addr: &HostPort) -> Outcome {
    let started = Instant::now();
    match crate::resolve::connect(&addr.host, addr.port).await {
        Ok(_) => Outcome::new(CheckStatus::Ok, format!("connected in {} ms", started.elapsed().as_millis())),
        Err(e) => Outcome::new(CheckStatus::Critical, format!("cannot connect to {addr}: {e}")),
    }
}

/// At least one process named `name` under `<root>/proc`: its `comm`
/// (which the kernel cuts to 15 bytes) or the file name of its argv\[0\].
/// Zombies don't count. None found while PID 1 is invisible too is
/// UNKNOWN: /proc hides other users' processes (`hidepid`, systemd's
/// `ProtectProc=invisible`), so the check cannot tell.
pub async fn check_process(root: &Path, name: &str) -> Outcome {
    let proc = root.join("proc");
    let scan = {
        let (proc, name) = (proc.clone(), name.to_string());
        // A few hundred small reads: off the runtime's thread.
        tokio::task::spawn_blocking(move || count_processes(&proc, &name))
    };
    match scan.await {
        Ok(Ok(0)) if !proc.join("1").exists() => Outcome::new(
            CheckStatus::Unknown,
            format!("no process named {name} visible, and other users' processes are hidden (ProtectProc=invisible?)"),
        ),
        Ok(Ok(0)) => Outcome::new(CheckStatus::Critical, format!("no process named {name}")),
        Ok(Ok(1)) => Outcome::new(CheckStatus::Ok, "1 process"),
        Ok(Ok(n)) => Outcome::new(CheckStatus::Ok, format!("{n} processes")),
        Ok(Err(e)) => Outcome::new(CheckStatus::Unknown, format!("cannot read {}: {e}", proc.display())),
        Err(e) => Outcome::new(CheckStatus::Unknown, format!("the process scan failed: {e}")),
    }
}

fn count_processes(proc: &Path, name: &str) -> std::io::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(proc)? {
        // Processes come and go while we read: skip what vanished.
        let Ok(entry) = entry else { continue };
        let is_pid = entry.file_name().to_str().is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        let dir = entry.path();
        let comm = std::fs::read(dir.join("comm")).unwrap_or_default();
        let matches = comm.strip_suffix(b"\n").unwrap_or(&comm) == name.as_bytes() || {
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            !argv0.is_empty() && argv0.rsplit(|&b| b == b'/').next() == Some(name.as_bytes())
        };
        if matches && !is_zombie(&dir) {
            count += 1;
        }
    }
    Ok(count)
}

/// Whether `/proc/PID/stat` says Z (the state follows the last `)`).
fn is_zombie(dir: &Path) -> bool {
    let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// An HTTP/1.1 GET: 2xx (or exactly `expect_status`) is OK, any other
/// status CRITICAL, no connection CRITICAL. The summary has the status and
/// the time to the response head; the output is the start of the body.
/// A status already read when the timeout strikes still counts (a server
/// that ignores `Connection: close`); before that, the check is UNKNOWN.
pub async fn check_http(target: &HttpTarget, trust: &Trust, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let addr = &target.addr;
    let tcp = match tokio::time::timeout_at(deadline, crate::resolve::connect(&addr.host, addr.port)).await {
        Err(_) => return Outcome::timed_out(timeout),
        Ok(Err(e)) => return Outcome::new(CheckStatus::Critical, format!("cannot connect to {addr}: {e}")),
        Ok(Ok(tcp)) => tcp,
    };
    if !target.tls {
        return exchange(tcp, target, started, deadline, timeout).await;
    }
    let config = match crate::uplink::tls::config_for(trust) {
        Ok(c) => c,
        Err(e) => return Outcome::new(CheckStatus::Unknown, format!("cannot set up TLS: {e:#}")),
    };
    let name = match rustls_pki_types::ServerName::try_from(addr.host.clone()) {
        Ok(n) => n,
        Err(e) => return Outcome::new(CheckStatus::Unknown, format!("`{}` cannot be checked by TLS: {e}", addr.host)),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout_at(deadline, connector.connect(name, tcp)).await {
        Err(_) => Outcome::timed_out(timeout),
        Ok(Err(e)) => Outcome::new(CheckStatus::Critical, format!("TLS with {addr} failed: {e}")),
        Ok(Ok(tls)) => exchange(tls, target, started, deadline, timeout).await,
    }
}

/// The response head as far as a check needs it.
struct ResponseHead {
    status: u16,
    reason: String,
    elapsed_ms: u128,
    /// Where the body starts, once the blank line after the headers came.
    body_start: Option<usize>,
    content_length: Option<usize>,
    chunked: bool,
}

impl ResponseHead {
    /// Whether everything worth reading has been read.
    fn complete(&self, buf: &[u8]) -> bool {
        let Some(start) = self.body_start else { return false };
        let body = &buf[start..];
        if (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return true;
        }
        // The output keeps only the start of the body.
        if body.len() >= 2 * MAX_CHECK_OUTPUT {
            return true;
        }
        match (self.content_length, self.chunked) {
            (_, true) => body.starts_with(b"0\r\n") || body.ends_with(b"\r\n0\r\n\r\n"),
            (Some(n), false) => body.len() >= n,
            (None, false) => false,
        }
    }
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    target: &HttpTarget,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
) -> Outcome {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pulsebell-agent/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.path,
        target.host_header,
        env!("CARGO_PKG_VERSION")
    );
    match tokio::time::timeout_at(deadline, stream.write_all(request.as_bytes())).await {
        Err(_) => return Outcome::timed_out(timeout),
        Ok(Err(e)) => return Outcome::new(CheckStatus::Critical, format!("cannot send the request: {e}")),
        Ok(Ok(())) => {}
    }
    let mut buf = Vec::new();
    let mut head: Option<ResponseHead> = None;
    let mut chunk = [0u8; 2048];
    loop {
        if head.as_ref().is_some_and(|h| h.complete(&buf)) || buf.len() >= MAX_RESPONSE {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            // Once the status is in, the rest is a bonus (a missing TLS
            // close_notify is an error here, too).
            Err(_) | Ok(Err(_)) if head.is_some() => break,
            Err(_) => return Outcome::timed_out(timeout),
            Ok(Err(e)) => return Outcome::new(CheckStatus::Critical, format!("reading the response failed: {e}")),
        }
        if let Err(outcome) = parse_head(&buf, &mut head, started) {
            return outcome;
        }
    }
    let Some(head) = head else {
        let what =
            if buf.is_empty() { "the server closed the connection without answering" } else { "no HTTP status line" };
        return Outcome::new(CheckStatus::Critical, what);
    };
    let ok = match target.expect_status {
        Some(want) => head.status == want,
        None => (200..300).contains(&head.status),
    };
    let mut summary = format!("HTTP {}", head.status);
    if !head.reason.is_empty() {
        summary = format!("{summary} {}", head.reason);
    }
    summary = format!("{summary} in {} ms", head.elapsed_ms);
    if let (false, Some(want)) = (ok, target.expect_status) {
        summary = format!("{summary}, expected {want}");
    }
    let body = head.body_start.map_or(&[][..], |start| &buf[start..]);
    let body = if head.chunked { dechunk(body) } else { body.to_vec() };
    let body = String::from_utf8_lossy(&body);
    let status = if ok { CheckStatus::Ok } else { CheckStatus::Critical };
    Outcome { output: head_of(&body), ..Outcome::new(status, summary) }
}

fn head_of(body: &str) -> String {
    head(body, MAX_CHECK_OUTPUT).to_string()
}

/// Fills `head` from `buf` as far as it goes; `Err` for a response that is
/// not HTTP.
fn parse_head(buf: &[u8], head: &mut Option<ResponseHead>, started: Instant) -> Result<(), Outcome> {
    if head.is_none() {
        let Some(end) = find(buf, b"\r\n") else {
            return if buf.len() > 1024 || !b"HTTP/1.".iter().zip(buf).all(|(a, b)| a == b) {
                Err(Outcome::new(CheckStatus::Critical, "not an HTTP response"))
            } else {
                Ok(())
            };
        };
        let line = String::from_utf8_lossy(&buf[..end]);
        let mut parts = line.splitn(3, ' ');
        let (version, code, reason) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
        let status = match (version, code.and_then(|c| c.parse::<u16>().ok())) {
            (Some(v), Some(s)) if v.starts_with("HTTP/1.") && (100..=599).contains(&s) => s,
            _ => return Err(Outcome::new(CheckStatus::Critical, format!("not an HTTP status line: {line}"))),
        };
        *head = Some(ResponseHead {
            status,
            reason: reason.trim().to_string(),
            elapsed_ms: started.elapsed().as_millis(),
            body_start: None,
            content_length: None,
            chunked: false,
        });
    }
    let Some(h) = head.as_mut() else { return Ok(()) };
    if h.body_start.is_none() {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            h.body_start = Some(end + 4);
            for line in String::from_utf8_lossy(&buf[..end]).lines().skip(1) {
                let Some((name, value)) = line.split_once(':') else { continue };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    h.content_length = value.parse().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    h.chunked = value.to_ascii_lowercase().contains("chunked");
                }
            }
        }
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The data of a chunked body, as far as it is well-formed.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(body, b"\r\n") {
        let size = std::str::from_utf8(&body[..eol]).ok().and_then(|l| {
            let hex = l.split(';').next().unwrap_or("").trim();
            usize::from_str_radix(hex, 16).ok()
        });
        let Some(size) = size.filter(|s| *s > 0) else { break };
        let data = &body[eol + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        if take < size || data.len() < size + 2 {
            break;
        }
        body = &data[size + 2..];
    }
    out
}

/// What one result did to a check's settled status ([`Damper::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The first result, or the `retries`-th in a row agreeing on a new
    /// status: that status is the settled one now.
    Changed,
    /// The result agrees with the settled status.
    Same,
    /// The result differs from the settled status: this many in a row
    /// agree on it so far, fewer than `retries`, so nothing changes yet.
    Damped(u32),
}

/// The `retries` rule for one check, as pure state: the first result
/// settles at once; after that the settled status changes only when
/// `retries` results in a row agree on the new status (with `retries = 2`
/// a single failure is ignored). A result that agrees with the settled
/// status, or with neither, starts the count again.
#[derive(Debug, Clone)]
pub struct Damper {
    retries: u32,
    /// Settled status and since when (Unix ms).
    settled: Option<(CheckStatus, u64)>,
    /// A differing status, how many results in a row had it, and when the
    /// first of them came (Unix ms).
    streak: Option<(CheckStatus, u32, u64)>,
}

impl Damper {
    /// A check with no result yet; `retries` below 1 counts as 1.
    pub fn new(retries: u32) -> Damper {
        Damper { retries: retries.max(1), settled: None, streak: None }
    }

    /// Takes one result, seen at `now_ms` (Unix ms).
    pub fn observe(&mut self, status: CheckStatus, now_ms: u64) -> Settle {
        match self.settled {
            None => {
                self.settled = Some((status, now_ms));
                Settle::Changed
            }
            Some((settled, _)) if settled == status => {
                self.streak = None;
                Settle::Same
            }
            Some(_) => {
                let (count, first_ms) = match self.streak {
                    Some((s, n, first)) if s == status => (n + 1, first),
                    _ => (1, now_ms),
                };
                if count >= self.retries {
                    // The status began with the first result that had it.
                    self.settled = Some((status, first_ms));
                    self.streak = None;
                    Settle::Changed
                } else {
                    self.streak = Some((status, count, first_ms));
                    Settle::Damped(count)
                }
            }
        }
    }

    /// The settled status, once there is a result.
    pub fn settled(&self) -> Option<CheckStatus> {
        self.settled.map(|(s, _)| s)
    }

    /// Since when (Unix ms) the settled status holds: the time of the
    /// first of the results that changed it.
    pub fn since_ms(&self) -> Option<u64> {
        self.settled.map(|(_, since)| since)
    }
}

/// Every configured check, each run on its own interval; the settled
/// results, sorted by name, in a watch channel.
///
/// Every check is there from the start: UNKNOWN "pending" until its first
/// result, which settles at once whatever `retries` says. Subscribers are
/// *notified* only when a check's settled status changes (and on each first
/// result); a later result that agrees with the settled status updates its
/// summary and output in the current value without notifying, so a summary
/// that changes on every run (a time in ms) does not cause a message per
/// run. Dropping `Checks` stops the checks (a command already running is
/// left to finish).
pub struct Checks {
    results: Arc<watch::Sender<Arc<Vec<CheckResult>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Checks {
    /// Starts the config's checks (inside a tokio runtime).
    pub fn spawn(config: &Config) -> Checks {
        Checks::start(Runner::new(config), &config.checks)
    }

    /// Starts `checks` run by `runner` (inside a tokio runtime).
    pub fn start(runner: Runner, checks: &BTreeMap<String, CheckSpec>) -> Checks {
        let now = now_ms();
        let initial = checks
            .iter()
            .map(|(name, spec)| CheckResult {
                name: name.clone(),
                kind: spec.kind(),
                status: CheckStatus::Unknown,
                summary: PENDING.into(),
                output: String::new(),
                since_ms: now,
            })
            .collect();
        let (tx, _) = watch::channel(Arc::new(initial));
        let results = Arc::new(tx);
        let runner = Arc::new(runner);
        let tasks = checks
            .iter()
            .enumerate()
            .map(|(index, (name, spec))| {
                tokio::spawn(check_loop(index, name.clone(), spec.clone(), runner.clone(), results.clone()))
            })
            .collect();
        Checks { results, tasks }
    }

    /// A receiver of the settled results; the current value counts as seen.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<CheckResult>>> {
        self.results.subscribe()
    }

    /// The settled results now, sorted by name.
    pub fn current(&self) -> Arc<Vec<CheckResult>> {
        self.results.borrow().clone()
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn check_loop(
    index: usize,
    name: String,
    spec: CheckSpec,
    runner: Arc<Runner>,
    results: Arc<watch::Sender<Arc<Vec<CheckResult>>>>,
) {
    let max_splay = (spec.interval / 10).min(MAX_SPLAY).as_millis() as u64;
    let splay = Duration::from_millis(rand::random_range(0..=max_splay));
    let mut ticks = tokio::time::interval_at(Instant::now() + splay, spec.interval);
    // A run longer than the interval delays the next; no bursts to catch up.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut damper = Damper::new(spec.retries);
    loop {
        ticks.tick().await;
        let outcome = runner.run(&spec).await;
        let settle = damper.observe(outcome.status, now_ms());
        match settle {
            Settle::Changed => {
                info!(check = %name, status = outcome.status.as_str(), summary = %outcome.summary, "check status")
            }
            Settle::Damped(n) => debug!(
                check = %name,
                status = outcome.status.as_str(),
                summary = %outcome.summary,
                "check result {n} of {} needed to change its status",
                spec.retries
            ),
            Settle::Same => {}
        }
        let since_ms = damper.since_ms().unwrap_or_else(now_ms);
        results.send_if_modified(|all| match settle {
            Settle::Damped(_) => false,
            Settle::Same => {
                let r = &all[index];
                if r.summary == outcome.summary && r.output == outcome.output {
                    return false;
                }
                let r = &mut Arc::make_mut(all)[index];
                r.summary = outcome.summary;
                r.output = outcome.output;
                false
            }
            Settle::Changed => {
                let r = &mut Arc::make_mut(all)[index];
                r.status = outcome.status;
                r.summary = outcome.summary;
                r.output = outcome.output;
                r.since_ms = since_ms;
                true
            }
        });
    }
}

/// Runs each of `checks` once, all at the same time, ignoring `retries`.
/// Sorted by name; `since_ms` is when each finished.
pub async fn run_once(runner: &Runner, checks: &BTreeMap<String, CheckSpec>) -> Vec<CheckResult> {
    let runs = checks.iter().map(|(name, spec)| async move {
        let outcome = runner.run(spec).await;
        CheckResult {
            name: name.clone(),
            kind: spec.kind(),
            status: outcome.status,
            summary: outcome.summary,
            output: outcome.output,
            since_ms: now_ms(),
        }
    });
    futures_util::future::join_all(runs).await
}

/// The Nagios exit code of the worst status (CRITICAL over UNKNOWN over
/// WARNING, as [`CheckDigest::worst`] ranks them): 0 ok, 1 warning, 2
/// critical, 3 unknown; 0 without checks.
pub fn exit_code(results: &[CheckResult]) -> u8 {
    CheckDigest::of(results).worst().map_or(0, CheckStatus::code)
}

/// A table: NAME, KIND, STATUS (upper case, as Nagios writes it), SUMMARY.
pub fn render_table(results: &[CheckResult]) -> String {
    let header = ["NAME", "KIND", "STATUS", "SUMMARY"];
    let rows: Vec<[String; 4]> = results
        .iter()
        .map(|r| [r.name.clone(), r.kind.as_str().into(), r.status.as_str().to_ascii_uppercase(), r.summary.clone()])
        .collect();
    let width = |col: usize| rows.iter().map(|r| r[col].len()).chain([header[col].len()]).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    std::iter::once(header.map(String::from))
        .chain(rows)
        .map(|[name, kind, status, summary]| format!("{name:<w0$}  {kind:<w1$}  {status:<w2$}  {summary}\n"))
        .collect()
}

/// One check as `pulsebell-agent check --json` prints it.
#[derive(serde::Serialize)]
struct JsonResult<'a> {
    name: &'a str,
    kind: &'static str,
    status: &'static str,
    summary: &'a str,
    output: &'a str,
}

/// A pretty JSON array of `{name, kind, status, summary, output}` (in that
/// key order), kind and status as lower-case strings.
pub fn to_json(results: &[CheckResult]) -> String {
    let results: Vec<JsonResult<'_>> = results
        .iter()
        .map(|r| JsonResult {
            name: &r.name,
            kind: r.kind.as_str(),
            status: r.status.as_str(),
            summary: &r.summary,
            output: &r.output,
        })
        .collect();
    serde_json::to_string_pretty(&results).expect("strings serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsebell_proto::CheckKind;
    use std::os::unix::fs::PermissionsExt;
    use tokio::net::TcpListener;

    /// How long a test waits for an event that should come much sooner.
    const WAIT: Duration = Duration::from_secs(20);

    fn spec(target: CheckTarget) -> CheckSpec {
        CheckSpec { target, interval: Duration::from_secs(60), timeout: Duration::from_secs(10), retries: 1 }
    }

    fn runner() -> Runner {
        Runner { root: "/".into(), systemctl: "/nonexistent/systemctl".into(), trust: Trust::WebPki }
    }

    fn http_target(port: u16, path: &str, expect_status: Option<u16>) -> CheckTarget {
        CheckTarget::Http(HttpTarget {
            url: format!("http://127.0.0.1:{port}{path}"),
            tls: false,
            addr: HostPort { host: "127.0.0.1".into(), port },
            host_header: format!("127.0.0.1:{port}"),
            path: path.into(),
            expect_status,
        })
    }

    /// An executable `sh` script in `dir`.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A port nothing listens on (bound, then released).
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn tcp_open_port_is_ok_and_closed_port_critical() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr = |port| CheckTarget::Tcp(HostPort { host: "127.0.0.1".into(), port });
        let ok = runner().run(&spec(addr(port))).await;
        assert_eq!(ok.status, CheckStatus::Ok, "{ok:?}");
        assert!(ok.summary.starts_with("connected in ") && ok.summary.ends_with(" ms"), "{ok:?}");
        drop(listener);
        let port = closed_port().await;
        let bad = runner().run(&spec(addr(port))).await;
        assert_eq!(bad.status, CheckStatus::Critical, "{bad:?}");
        assert!(bad.summary.contains(&format!("127.0.0.1:{port}")), "{bad:?}");
    }

    /// Serves one canned response per connection, in order; sends each
    /// request's head on the returned channel.
    async fn http_server(responses: Vec<&'static str>) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for response in responses {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while find(&req, b"\r\n\r\n").is_none() {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
                s.write_all(response.as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn http_2xx_is_ok_and_500_critical() {
        let (port, mut requests) = http_server(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine",
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ndatabase down\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfié\r\n3\r\nne!\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let check = spec(http_target(port, "/health?x=1", None));
        let ok = runner().run(&check).await;
        assert_eq!(ok.status, CheckStatus::Ok, "{ok:?}");
        assert!(ok.summary.starts_with("HTTP 200 OK in ") && ok.summary.ends_with(" ms"), "{ok:?}");
        assert_eq!(ok.output, "fine");
        let req = requests.recv().await.unwrap();
        assert!(req.starts_with("GET /health?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")), "{req}");
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");

        let bad = runner().run(&check).await;
        assert_eq!(bad.status, CheckStatus::Critical, "{bad:?}");
        assert!(bad.summary.starts_with("HTTP 500 Internal Server Error in "), "{bad:?}");
        assert_eq!(bad.output, "database down\n");

        let chunked = runner().run(&check).await;
        assert_eq!((chunked.status, chunked.output.as_str()), (CheckStatus::Ok, "fiéne!"));

        // 200 when 204 is expected.
        let strict = runner().run(&spec(http_target(port, "/", Some(204)))).await;
        assert_eq!(strict.status, CheckStatus::Critical, "{strict:?}");
        assert!(strict.summary.ends_with("expected 204"), "{strict:?}");

        let refused = runner().run(&spec(http_target(closed_port().await, "/", None))).await;
        assert_eq!(refused.status, CheckStatus::Critical, "{refused:?}");
        assert!(refused.summary.starts_with("cannot connect to 127.0.0.1:"), "{refused:?}");
    }

    #[tokio::test]
    async fn http_silence_is_unknown_but_a_status_already_read_counts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            // First connection: never answers. Second: a head, then nothing
            // and no close.
            let (_silent, _) = listener.accept().await.unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\nstarting").await.unwrap();
            pending::<()>().await;
        });
        let mut check = spec(http_target(port, "/", None));
        check.timeout = Duration::from_millis(300);
        let silent = runner().run(&check).await;
        assert_eq!(silent, Outcome::new(CheckStatus::Unknown, "timed out after 300ms"));
        let slow = runner().run(&check).await;
        assert_eq!(slow.status, CheckStatus::Critical, "{slow:?}");
        assert!(slow.summary.starts_with("HTTP 503 Service Unavailable"), "{slow:?}");
        assert_eq!(slow.output, "starting");
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[tokio::test]
    async fn https_uses_the_agents_trust() {
        use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(fixture("server.pem")).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                // The untrusting client gives up during the handshake.
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                tls.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
                let _ = tls.shutdown().await;
            }
        });
        let target = |host: &str| {
            CheckTarget::Http(HttpTarget {
                url: format!("https://{host}:{port}/"),
                tls: true,
                addr: HostPort { host: host.into(), port },
                host_header: format!("{host}:{port}"),
                path: "/".into(),
                expect_status: None,
            })
        };
        let trusting = Runner { trust: Trust::CaFile(fixture("ca.pem")), ..runner() };
        for host in ["localhost", "127.0.0.1"] {
            let ok = trusting.run(&spec(target(host))).await;
            assert_eq!(ok.status, CheckStatus::Ok, "{host}: {ok:?}");
            assert!(ok.summary.starts_with("HTTP 204 No Content in "), "{ok:?}");
        }
        // The web PKI does not know the test CA.
        let bad = runner().run(&spec(target("127.0.0.1"))).await;
        assert_eq!(bad.status, CheckStatus::Critical, "{bad:?}");
        assert!(bad.summary.starts_with("TLS with 127.0.0.1:"), "{bad:?}");
    }

    #[tokio::test]
    async fn command_follows_the_nagios_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("code");
        let plugin = script(
            dir.path(),
            "check_app",
            &format!(
                "c=$(cat {0}); echo \"APP $c: all said | load=1;2;3\"; echo more; echo oops >&2; exit $c",
                code.display()
            ),
        );
        let check = spec(CheckTarget::Command(vec![plugin.display().to_string()]));
        let mut seen = vec![];
        for c in ["0", "2", "0", "1", "3", "7"] {
            std::fs::write(&code, c).unwrap();
            let o = runner().run(&check).await;
            seen.push(o.status);
            if c == "7" {
                assert_eq!(o.summary, "exited with status 7: APP 7: all said");
            } else {
                assert_eq!(o.summary, format!("APP {c}: all said"), "perfdata is not part of the summary");
            }
            // stdout and stderr are read apart: their lines may interleave.
            for line in ["| load=1;2;3\n", "more\n", "oops\n"] {
                assert!(o.output.contains(line), "{line:?} in {o:?}");
            }
        }
        use CheckStatus::*;
        assert_eq!(seen, [Ok, Critical, Ok, Warning, Unknown, Unknown]);

        let silent = spec(CheckTarget::Command(vec!["sh".into(), "-c".into(), "exit 2".into()]));
        assert_eq!(runner().run(&silent).await, Outcome::new(Critical, "exited with status 2 (no output)"));
        let missing = runner().run(&spec(CheckTarget::Command(vec!["/nonexistent/check".into()]))).await;
        assert_eq!(missing.status, Unknown);
        // Under qemu-user (scripts/cross-test) the emulator's exec reports a
        // missing program as exit 127, the shell's "not found", not a spawn error.
        let not_found =
            |s: &str, program: &str| s.starts_with(&format!("cannot start `{program}`")) || s.contains("status 127");
        assert!(not_found(&missing.summary, "/nonexistent/check"), "{missing:?}");
        let killed = spec(CheckTarget::Command(vec!["sh".into(), "-c".into(), "kill -9 $$".into()]));
        assert_eq!(runner().run(&killed).await, Outcome::new(Unknown, "killed by signal 9"));
    }

    #[tokio::test]
    async fn output_is_the_tail_and_summary_is_bounded() {
        let long = spec(CheckTarget::Command(vec![
            "sh".into(),
            "-c".into(),
            "printf 'é%.0s' $(seq 400); echo; seq 1000".into(),
        ]));
        let o = runner().run(&long).await;
        assert_eq!(o.status, CheckStatus::Ok);
        assert!(o.summary.len() <= MAX_STRING && o.summary.len() >= MAX_STRING - 1, "{}", o.summary.len());
        assert!(o.summary.chars().all(|c| c == 'é'));
        assert!(o.output.len() <= MAX_CHECK_OUTPUT && o.output.ends_with("999\n1000\n"), "{:?}", o.output);
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_unknown_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut check = spec(CheckTarget::Command(vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 1000 & echo $! > {}; wait", pidfile.display()),
        ]));
        check.timeout = Duration::from_millis(300);
        let o = runner().run(&check).await;
        assert_eq!((o.status, o.summary.as_str()), (CheckStatus::Unknown, "timed out after 300ms"));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The group got its SIGKILL; dying takes the grandchild a moment on
        // a busy machine, and there is no event to await for a process that
        // is not our child: poll /proc until it is gone or a zombie.
        let gone = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z")).then_some(()).ok_or(stat)
        };
        let deadline = Instant::now() + WAIT;
        while let Err(stat) = gone() {
            assert!(Instant::now() < deadline, "sleep survived: {stat}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn process_matches_comm_or_argv0_and_skips_zombies() {
        let root = tempfile::tempdir().unwrap();
        let proc = root.path().join("proc");
        let add = |pid: &str, comm: &str, cmdline: &[u8], state: &str| {
            let dir = proc.join(pid);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(dir.join("cmdline"), cmdline).unwrap();
            std::fs::write(dir.join("stat"), format!("{pid} ({comm}) {state} 1 1 1")).unwrap();
        };
        add("1", "systemd", b"/sbin/init\0splash\0", "S");
        add("40", "chromium", b"/usr/lib/chromium/chromium\0--kiosk\0", "S");
        // Renamed thread-group leader: comm differs, argv[0] matches.
        add("41", "ThreadPoolForeg", b"/usr/lib/chromium/chromium\0--type=renderer\0", "R");
        add("42", "chromium", b"", "Z");
        // comm is cut to 15 bytes; argv[0] is not.
        add("50", "very-long-progr", b"/opt/app/very-long-program-name\0", "S");
        add("60", "kthreadd", b"", "S");
        std::fs::create_dir_all(proc.join("self")).unwrap();
        std::fs::write(proc.join("uptime"), "1 1").unwrap();
        let r = Runner { root: root.path().to_path_buf(), ..runner() };
        let run = |name: &str| {
            let (r, check) = (r.clone(), spec(CheckTarget::Process(name.into())));
            async move { r.run(&check).await }
        };
        assert_eq!(run("chromium").await, Outcome::new(CheckStatus::Ok, "2 processes"));
        assert_eq!(run("very-long-program-name").await, Outcome::new(CheckStatus::Ok, "1 process"));
        assert_eq!(run("firefox").await, Outcome::new(CheckStatus::Critical, "no process named firefox"));
        assert_eq!(run("").await.status, CheckStatus::Critical, "an empty argv[0] is no name");
        // Without PID 1 in sight, /proc hides other users' processes.
        std::fs::remove_dir_all(proc.join("1")).unwrap();
        let hidden = run("firefox").await;
        assert_eq!(hidden.status, CheckStatus::Unknown, "{hidden:?}");
        assert!(hidden.summary.contains("hidden"), "{hidden:?}");
        assert_eq!(run("chromium").await.status, CheckStatus::Ok);
        let none = Runner { root: root.path().join("nope"), ..runner() };
        assert_eq!(none.run(&spec(CheckTarget::Process("x".into()))).await.status, CheckStatus::Unknown);
    }

    #[tokio::test]
    async fn unit_maps_the_active_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let systemctl = script(
            dir.path(),
            "systemctl",
            &format!(
                "[ \"$1 $2 $3 $4 $5\" = \"show -p ActiveState --value app.service\" ] || {{ echo \"bad args: $*\" >&2; exit 1; }}\ncat {}",
                state.display()
            ),
        );
        let r = Runner { systemctl: systemctl.display().to_string(), ..runner() };
        let check = spec(CheckTarget::Unit("app.service".into()));
        use CheckStatus::*;
        for (active_state, status) in [
            ("active", Ok),
            ("failed", Critical),
            ("inactive", Critical),
            ("activating", Warning),
            ("reloading", Warning),
            ("deactivating", Warning),
            ("maintenance", Unknown),
        ] {
            std::fs::write(&state, format!("{active_state}\n")).unwrap();
            assert_eq!(r.run(&check).await, Outcome::new(status, format!("app.service is {active_state}")));
        }
        let other = r.run(&spec(CheckTarget::Unit("other.service".into()))).await;
        assert_eq!(other.status, Unknown, "{other:?}");
        assert!(other.summary.contains("exited with status 1: bad args: show"), "{other:?}");
        let missing = runner().run(&check).await;
        assert_eq!(missing.status, Unknown);
        // Under qemu-user a missing program is exit 127 (see the command test).
        let s = &missing.summary;
        assert!(s.starts_with("cannot start `/nonexistent/systemctl`") || s.contains("status 127"), "{missing:?}");
    }

    #[test]
    fn damper_settles_the_first_result_and_damps_the_rest() {
        use CheckStatus::*;
        let mut d = Damper::new(2);
        assert_eq!(d.settled(), None);
        assert_eq!(d.observe(Critical, 10), Settle::Changed, "the first result settles at once");
        assert_eq!((d.settled(), d.since_ms()), (Some(Critical), Some(10)));
        assert_eq!(d.observe(Ok, 20), Settle::Damped(1));
        assert_eq!(d.observe(Ok, 30), Settle::Changed);
        assert_eq!((d.settled(), d.since_ms()), (Some(Ok), Some(20)), "since the first agreeing result");
        assert_eq!(d.observe(Critical, 40), Settle::Damped(1));
        assert_eq!(d.observe(Ok, 50), Settle::Same, "a single failure is damped");
        assert_eq!(d.observe(Critical, 60), Settle::Damped(1));
        assert_eq!(d.observe(Warning, 70), Settle::Damped(1), "results must agree with each other");
        assert_eq!(d.observe(Warning, 80), Settle::Changed);
        assert_eq!((d.settled(), d.since_ms()), (Some(Warning), Some(70)));

        let mut d = Damper::new(1);
        d.observe(Ok, 1);
        assert_eq!(d.observe(Critical, 2), Settle::Changed);
        assert_eq!(d.observe(Critical, 3), Settle::Same);
        assert_eq!(d.since_ms(), Some(2));
    }

    /// Waits for the next notified value of `rx`.
    async fn next(rx: &mut watch::Receiver<Arc<Vec<CheckResult>>>) -> Arc<Vec<CheckResult>> {
        tokio::time::timeout(WAIT, rx.changed()).await.expect("no change in time").unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn scheduler_publishes_settled_results_and_damps_a_single_failure() {
        let dir = tempfile::tempdir().unwrap();
        // Each run takes the next exit code; 0 once they run out.
        let codes = dir.path().join("codes");
        std::fs::write(&codes, "0\n2\n0\n2\n2\n0\n").unwrap();
        let runs = dir.path().join("runs");
        let plugin = script(
            dir.path(),
            "check_seq",
            &format!(
                "c=$(head -n 1 {0}); sed -i 1d {0}; c=${{c:-0}}; echo run >> {1}; echo \"code $c\"; exit $c",
                codes.display(),
                runs.display()
            ),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut checks = BTreeMap::new();
        let every = |target| CheckSpec { interval: Duration::from_millis(100), retries: 2, ..spec(target) };
        checks.insert("seq".to_string(), every(CheckTarget::Command(vec![plugin.display().to_string()])));
        checks.insert("port".to_string(), every(CheckTarget::Tcp(HostPort { host: "127.0.0.1".into(), port })));
        let started_ms = now_ms();
        let checks = Checks::start(runner(), &checks);

        // Every check is there at once, pending, sorted by name.
        let first = checks.current();
        let names: Vec<(&str, CheckKind, CheckStatus, &str)> =
            first.iter().map(|r| (r.name.as_str(), r.kind, r.status, r.summary.as_str())).collect();
        assert_eq!(
            names,
            [
                ("port", CheckKind::Tcp, CheckStatus::Unknown, PENDING),
                ("seq", CheckKind::Command, CheckStatus::Unknown, PENDING)
            ]
        );

        // Follow `seq` through its notifications: OK (first result, at
        // once), CRITICAL only after the two 2s in a row (runs 4 and 5), OK
        // after two 0s in a row. The lone 2 of run 2 never shows.
        let mut rx = checks.subscribe();
        let mut seq_statuses = vec![];
        let mut critical = None;
        while seq_statuses.len() < 3 {
            let all = next(&mut rx).await;
            let seq = &all[1];
            if seq_statuses.last() != Some(&seq.status) && seq.summary != PENDING {
                if seq.status == CheckStatus::Critical {
                    let runs = std::fs::read_to_string(&runs).unwrap().lines().count();
                    critical = Some((seq.clone(), runs));
                }
                seq_statuses.push(seq.status);
            }
        }
        assert_eq!(seq_statuses, [CheckStatus::Ok, CheckStatus::Critical, CheckStatus::Ok]);
        let (critical, runs_then) = critical.unwrap();
        assert_eq!(critical.summary, "code 2");
        assert!(runs_then >= 5, "CRITICAL after {runs_then} runs");
        assert!(critical.since_ms >= started_ms);

        let now = checks.current();
        assert_eq!(now[0].status, CheckStatus::Ok, "{:?}", now[0]);
        assert!(now[0].summary.starts_with("connected in "));
        assert_eq!(now[1].summary, "code 0");
        assert!(now[1].since_ms > critical.since_ms);
    }

    #[tokio::test]
    async fn run_once_ignores_retries_and_reports_the_worst() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut checks = BTreeMap::new();
        let damped = |target| CheckSpec { retries: 5, ..spec(target) };
        checks.insert("b-port".to_string(), damped(CheckTarget::Tcp(HostPort { host: "127.0.0.1".into(), port })));
        checks.insert(
            "a-cmd".to_string(),
            damped(CheckTarget::Command(vec!["sh".into(), "-c".into(), "echo meh; exit 1".into()])),
        );
        let results = run_once(&runner(), &checks).await;
        assert_eq!(results.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["a-cmd", "b-port"]);
        assert_eq!(exit_code(&results), 1);

        let table = render_table(&results);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "NAME    KIND     STATUS   SUMMARY");
        assert_eq!(lines[1], "a-cmd   command  WARNING  meh");
        assert!(lines[2].starts_with("b-port  tcp      OK       connected in "), "{table}");

        let text = to_json(&results);
        assert!(text.find("\"name\"") < text.find("\"kind\""), "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json[0],
            serde_json::json!({"name": "a-cmd", "kind": "command", "status": "warning", "summary": "meh", "output": "meh\n"})
        );
        assert_eq!(json[1]["status"], "ok");
    }

    #[test]
    fn exit_code_is_the_worst_status() {
        let r = |status| CheckResult {
            name: "x".into(),
            kind: CheckKind::Tcp,
            status,
            summary: String::new(),
            output: String::new(),
            since_ms: 0,
        };
        use CheckStatus::*;
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[r(Ok), r(Ok)]), 0);
        assert_eq!(exit_code(&[r(Ok), r(Warning)]), 1);
        assert_eq!(exit_code(&[r(Unknown), r(Warning)]), 3);
        assert_eq!(exit_code(&[r(Unknown), r(Critical), r(Warning)]), 2);
    }

    #[test]
    fn chunked_bodies_and_bounded_strings() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert_eq!(dechunk(b"5\r\nab"), b"ab");
        assert_eq!(dechunk(b"zz\r\nab"), b"");
        assert_eq!(first_line("\n  first  \nsecond"), "first");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aé", 2), "é");
        assert_eq!(head("éa", 1), "");
    }
}
