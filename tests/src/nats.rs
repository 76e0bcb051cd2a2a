//! NATS servers with JetStream for the cluster-mode tests: real
//! `nats-server` processes on loopback, one config file and store directory
//! each in the test's directory.
//!
//! - [`nats_or_skip`]: the first line of every test that needs a server. A
//!   missing (or too old, < 2.10) `nats-server` skips the test with a `SKIP`
//!   line, unless `PULSEBELL_REQUIRE_NATS=1` (as in CI, which installs one
//!   with `scripts/install-nats`), where it fails it.
//! - [`NatsCluster`]: `n` servers `n1`..`nN` with JetStream, routed to each
//!   other when `n > 1`; [`NatsCluster::start`] returns once every server's
//!   `/healthz` answers 200, which for a cluster means a JetStream meta
//!   leader has been elected and every server is current with it. Nodes are
//!   addressed by index `i` in `0..n` (node `i` is server `n{i+1}`).
//!
//! Each server's stdout and stderr go to `nats-n{i+1}.log` in the test's
//! directory; when a test panics, `Drop` prints them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;

use crate::{signal_and_wait, Log, POLL_INTERVAL};

/// Environment variable naming the `nats-server` binary to use instead of
/// the one on `PATH`.
pub const NATS_SERVER_ENV: &str = "PULSEBELL_NATS_SERVER";
/// Environment variable that turns a skipped NATS test into a failure.
pub const REQUIRE_NATS_ENV: &str = "PULSEBELL_REQUIRE_NATS";
/// Oldest supported server: cluster mode uses async-nats' `server_2_10` API.
pub const MIN_NATS_VERSION: (u32, u32) = (2, 10);
/// How long servers may take to become healthy after a (re)start: a meta
/// leader election normally takes well under a second on loopback.
pub const NATS_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at [`NatsCluster::start`] when a port picked as free was taken
/// by someone else before the server bound it.
const START_ATTEMPTS: u32 = 4;
/// Timeout of one monitoring request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Finding the server

/// The `nats-server` binary: `$PULSEBELL_NATS_SERVER` if set (non-empty),
/// else the first executable `nats-server` on `PATH`. Not checked further;
/// see [`find_nats_server`].
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("nats-server")).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a missing `nats-server` fails the test instead of skipping it
/// (`PULSEBELL_REQUIRE_NATS=1`).
pub fn require_nats() -> bool {
    std::env::var(REQUIRE_NATS_ENV).is_ok_and(|v| v == "1")
}

/// The version `bin --version` prints (`nats-server: v2.15.1`).
pub fn nats_server_version(bin: &Path) -> Result<(u32, u32, u32), String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --version`: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    parse_version(&text).ok_or_else(|| format!("`{} --version` printed no version: {text:?}", bin.display()))
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split(['.', '-', '+']).map(str::parse::<u32>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?, parts.next().and_then(Result::ok).unwrap_or(0)))
}

/// A usable `nats-server` (found by [`nats_server_bin`], at least
/// [`MIN_NATS_VERSION`]), or why there is none. Looked up once per test
/// binary.
pub fn find_nats_server() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let bin = nats_server_bin().ok_or_else(|| {
                format!("no `nats-server` on PATH (and {NATS_SERVER_ENV} unset); run scripts/install-nats")
            })?;
            let (major, minor, patch) = nats_server_version(&bin)?;
            if (major, minor) < MIN_NATS_VERSION {
                let (min_major, min_minor) = MIN_NATS_VERSION;
                return Err(format!(
                    "{} is nats-server {major}.{minor}.{patch}, older than the {min_major}.{min_minor} cluster mode \
                     needs; run scripts/install-nats",
                    bin.display()
                ));
            }
            Ok(bin)
        })
        .clone()
}

/// For the top of a test that needs NATS:
/// `let Some(_) = nats_or_skip("my_test") else { return };`.
/// Without a usable server, prints a `SKIP` line and returns `None`, or
/// panics when [`require_nats`].
pub fn nats_or_skip(test: &str) -> Option<PathBuf> {
    match find_nats_server() {
        Ok(bin) => Some(bin),
        Err(why) if require_nats() => panic!("{test}: {why} ({REQUIRE_NATS_ENV}=1)"),
        Err(why) => {
            println!("SKIP {test}: {why}; set {REQUIRE_NATS_ENV}=1 to make this a failure");
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Monitoring endpoint

/// `GET http://{addr}{path}` over HTTP/1.0 (so the body is neither chunked
/// nor kept alive): the status code and body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sock = addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, HTTP_TIMEOUT).map_err(|e| format!("connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("read from {addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP header end from {addr}{path}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}{path}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

// ---------------------------------------------------------------------------
// Cluster

static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One server of a [`NatsCluster`].
struct Node {
    name: String,
    config: PathBuf,
    store_dir: PathBuf,
    client_port: u16,
    cluster_port: u16,
    http_port: u16,
    child: Option<Child>,
    log: Log,
}

impl Node {
    fn monitor_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// Whether the process has exited (reaping it), with its status.
    fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut().map(Child::try_wait) {
            None => None,
            Some(Ok(Some(status))) => Some(status),
            Some(Ok(None)) => None,
            Some(Err(e)) => panic!("waiting for nats {}: {e}", self.name),
        }
    }

    /// `/healthz` (with `query`) answers 200, or what it answered instead.
    fn healthz(&self, query: &str) -> Result<(), String> {
        let path = format!("/healthz{query}");
        match http_get(&self.monitor_addr(), &path) {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{}: {path} answered {status}: {}", self.name, body.trim())),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

/// `n` `nats-server` processes with JetStream on 127.0.0.1, clustered when
/// `n > 1`. Dropping it SIGKILLs every server.
pub struct NatsCluster {
    bin: PathBuf,
    cluster_name: String,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` servers named `n1`..`nN`, each with a config file
    /// `dir/nats-nK.conf`, a JetStream store `dir/nats-nK-store` and a log
    /// `dir/nats-nK.log`, and waits until every one reports healthy
    /// (JetStream enabled and, when clustered, a meta leader elected).
    /// Panics when there is no usable `nats-server` (call [`nats_or_skip`]
    /// first) or the servers don't become healthy in
    /// [`NATS_START_TIMEOUT`].
    pub fn start(n: usize, dir: &Path) -> NatsCluster {
        assert!(n >= 1, "a cluster has at least one server");
        let bin = find_nats_server().unwrap_or_else(|why| panic!("cannot start NATS: {why}"));
        let id = CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let cluster_name = format!("pulsebell-test-{}-{id}", std::process::id());
        for attempt in 1..=START_ATTEMPTS {
            let mut cluster = NatsCluster::configure(&bin, &cluster_name, n, dir);
            for i in 0..n {
                cluster.spawn(i);
            }
            match cluster.wait_all_healthy() {
                Ok(()) => return cluster,
                Err(why) if attempt < START_ATTEMPTS && cluster.lost_a_port_race() => {
                    eprintln!("nats cluster: a port was taken before a server bound it ({why}); retrying");
                    for node in &cluster.nodes {
                        node.log.note(&format!("--- attempt {attempt} lost a port race; retrying ---"));
                    }
                    cluster.kill_all();
                }
                Err(why) => {
                    cluster.kill_all();
                    // Drop prints the logs.
                    panic!("NATS servers did not become healthy: {why}");
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Picks free ports and writes each server's config file (fresh store
    /// directories).
    fn configure(bin: &Path, cluster_name: &str, n: usize, dir: &Path) -> NatsCluster {
        // Hold every listener until all ports are picked, so they differ.
        let listeners: Vec<TcpListener> =
            (0..3 * n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
        let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().expect("local_addr").port()).collect();
        drop(listeners);

        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let store_dir = dir.join(format!("nats-{name}-store"));
                if store_dir.exists() {
                    fs::remove_dir_all(&store_dir).expect("clear the store dir of a failed attempt");
                }
                Node {
                    config: dir.join(format!("nats-{name}.conf")),
                    store_dir,
                    client_port: ports[3 * i],
                    cluster_port: ports[3 * i + 1],
                    http_port: ports[3 * i + 2],
                    child: None,
                    log: Log::new(format!("nats {name}"), dir.join(format!("nats-{name}.log"))),
                    name,
                }
            })
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            let mut conf = format!(
                "# Written by pulsebell-tests (tests/src/nats.rs).\n\
                 server_name: {name}\n\
                 listen: \"127.0.0.1:{client}\"\n\
                 http: \"127.0.0.1:{http}\"\n\
                 jetstream {{\n  store_dir: {store}\n}}\n",
                name = node.name,
                client = node.client_port,
                http = node.http_port,
                store = quoted(node.store_dir.to_str().expect("test paths are UTF-8")),
            );
            if n > 1 {
                let routes: String = nodes
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, peer)| format!("    \"nats-route://127.0.0.1:{}\"\n", peer.cluster_port))
                    .collect();
                conf.push_str(&format!(
                    "cluster {{\n  name: {cluster}\n  listen: \"127.0.0.1:{port}\"\n  routes: [\n{routes}  ]\n}}\n",
                    cluster = quoted(cluster_name),
                    port = node.cluster_port,
                ));
            }
            fs::write(&node.config, conf).expect("write nats config");
        }
        NatsCluster { bin: bin.to_owned(), cluster_name: cluster_name.to_owned(), nodes }
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "nats {} is already running", node.name);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&node.config);
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        node.log.note(&format!("$ {shown} (pid {})", child.id()));
        node.log.capture(child.stdout.take().expect("piped stdout"), "stdout", None);
        node.log.capture(child.stderr.take().expect("piped stderr"), "stderr", None);
        node.child = Some(child);
    }

    /// Polls every running server's `/healthz` until all answer 200; fails
    /// early when one exits.
    fn wait_all_healthy(&mut self) -> Result<(), String> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_healthy_nodes(&all, "")
    }

    fn wait_healthy_nodes(&mut self, which: &[usize], query: &str) -> Result<(), String> {
        let deadline = Instant::now() + NATS_START_TIMEOUT;
        loop {
            let mut last = Ok(());
            for &i in which {
                let node = &mut self.nodes[i];
                if let Some(status) = node.exited() {
                    return Err(format!("nats {} exited ({status})", node.name));
                }
                if let Err(e) = node.healthz(query) {
                    last = Err(e);
                    break;
                }
            }
            match last {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("not healthy within {NATS_START_TIMEOUT:?}; last observed: {e}"))
                }
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Whether a server died because one of its ports was in use.
    fn lost_a_port_race(&mut self) -> bool {
        self.nodes.iter_mut().any(|node| node.exited().is_some() && node.log.contains("address already in use"))
    }

    fn kill_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one server.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The cluster name in the servers' configs (unique per cluster).
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// Client URLs of every server (`nats://127.0.0.1:PORT`), running or not.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Client URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// `server_name` of server `i` (`n{i+1}`).
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// `http://127.0.0.1:PORT` of server `i`'s monitoring endpoint.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].monitor_addr())
    }

    /// The JetStream store directory of server `i` (kept across restarts).
    pub fn store_dir(&self, i: usize) -> &Path {
        &self.nodes[i].store_dir
    }

    /// The config file of server `i`.
    pub fn config_path(&self, i: usize) -> &Path {
        &self.nodes[i].config
    }

    /// What server `i` has logged.
    pub fn log(&self, i: usize) -> &Log {
        &self.nodes[i].log
    }

    /// `GET path` (e.g. `/routez`, `/jsz`) on server `i`'s monitoring
    /// endpoint, parsed as JSON; `Err` for anything but a 200 with JSON.
    pub fn monitor(&self, i: usize, path: &str) -> Result<Value, String> {
        let node = &self.nodes[i];
        match http_get(&node.monitor_addr(), path)? {
            (200, body) => {
                serde_json::from_str(&body).map_err(|e| format!("{}{path} is not JSON ({e}): {body}", node.name))
            }
            (status, body) => Err(format!("{}: {path} answered {status}: {}", node.name, body.trim())),
        }
    }

    /// The `server_name`s server `i` has routes to (`/routez`; with route
    /// pooling each peer has several route connections, so `num_routes` is
    /// a multiple of the peer count).
    pub fn route_peers(&self, i: usize) -> Result<BTreeSet<String>, String> {
        let routez = self.monitor(i, "/routez")?;
        let routes = routez["routes"].as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(routes.iter().filter_map(|r| r["remote_name"].as_str()).map(str::to_owned).collect())
    }

    /// The JetStream meta leader as server `i` sees it (`/jsz`
    /// `meta_cluster.leader`), `None` while there is none (or unclustered).
    pub fn meta_leader(&self, i: usize) -> Result<Option<String>, String> {
        let jsz = self.monitor(i, "/jsz")?;
        Ok(jsz["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty()).map(str::to_owned))
    }

    /// Each stream server `i` knows (KV buckets are streams `KV_<name>`)
    /// with its replica count (`/jsz?streams=true`, `config.num_replicas`).
    pub fn stream_replicas(&self, i: usize) -> Result<BTreeMap<String, u64>, String> {
        let jsz = self.monitor(i, "/jsz?accounts=true&streams=true&config=true")?;
        let mut out = BTreeMap::new();
        for account in jsz["account_details"].as_array().map(Vec::as_slice).unwrap_or_default() {
            for stream in account["stream_detail"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let name = stream["name"].as_str().ok_or_else(|| format!("a stream without a name: {stream}"))?;
                let replicas = stream["config"]["num_replicas"].as_u64().unwrap_or(1);
                out.insert(name.to_owned(), replicas);
            }
        }
        Ok(out)
    }

    /// The `INFO` object server `i` sends a client on connect (proves the
    /// client port is served; has `server_name`, `version`, `jetstream`).
    pub fn client_info(&self, i: usize) -> Result<Value, String> {
        let addr = format!("127.0.0.1:{}", self.nodes[i].client_port);
        let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let stream = TcpStream::connect_timeout(&sock, HTTP_TIMEOUT).map_err(|e| format!("connect to {addr}: {e}"))?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).map_err(|e| format!("read INFO from {addr}: {e}"))?;
        let json = line.strip_prefix("INFO ").ok_or_else(|| format!("{addr} sent {line:?}, not INFO"))?;
        serde_json::from_str(json.trim_end()).map_err(|e| format!("INFO from {addr} is not JSON ({e}): {line}"))
    }

    /// Whether server `i`'s process is alive.
    pub fn is_running(&mut self, i: usize) -> bool {
        let node = &mut self.nodes[i];
        node.child.is_some() && node.exited().is_none()
    }

    /// SIGKILLs server `i` and waits for it to exit. No-op if it is not
    /// running.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            let _ = signal_and_wait(&mut child, Signal::KILL, &format!("nats {}", node.name));
            node.log.note("--- killed (SIGKILL) ---");
        }
    }

    /// Stops server `i` gracefully (SIGTERM; SIGKILL after
    /// [`crate::STOP_TIMEOUT`]) and returns its exit status.
    pub fn stop(&mut self, i: usize) -> Option<ExitStatus> {
        let node = &mut self.nodes[i];
        let mut child = node.child.take()?;
        let status = signal_and_wait(&mut child, Signal::TERM, &format!("nats {}", node.name));
        node.log.note(&format!("--- stopped: {status} ---"));
        Some(status)
    }

    /// Starts server `i` again with the same config, ports and store dir
    /// (SIGKILLing it first if it is still running). Waits until it serves
    /// clients and, when a majority of the servers is running (so a meta
    /// leader can exist), until its `/healthz` is 200: it has caught up
    /// with the meta leader and its streams.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.nodes[i].log.note("--- restart ---");
        self.spawn(i);
        let running = (0..self.nodes.len()).filter(|&j| self.is_running(j)).count();
        let query = if 2 * running > self.nodes.len() { "" } else { "?js-server-only=true" };
        if let Err(why) = self.wait_healthy_nodes(&[i], query) {
            panic!("nats {} did not come back: {why}", self.nodes[i].name);
        }
    }

    /// Waits until every running server's `/healthz` is 200.
    pub fn wait_healthy(&mut self) {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|&j| self.is_running(j)).collect();
        if let Err(why) = self.wait_healthy_nodes(&running, "") {
            panic!("NATS servers not healthy: {why}");
        }
    }

    fn dump_logs(&self) -> String {
        self.nodes.iter().map(|n| n.log.dump()).collect::<Vec<_>>().join("\n")
    }
}

/// `s` as a double-quoted config string.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("{}", self.dump_logs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("nats-server: v2.12"), Some((2, 12, 0)));
        assert_eq!(parse_version("no version"), None);
    }
}
