//! Actions: the only things a bell can make the agent do.
//!
//! A bell names an action from the agent's own allowlist (its config) and
//! may carry parameters. Nothing from the network is ever run through a
//! shell: the argv comes from the config, and a parameter can only fill a
//! `{name}` placeholder the action declares, after matching its regex.
//!
//! Exactly-once execution over at-least-once delivery: every bell is
//! journaled before it runs and when it ends ([`crate::journal`]); a bell
//! the journal knows is answered from it, never run again. An action that
//! reboots the board succeeds when the agent comes back with a new boot id.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pulsebell_proto::{Bell, BellReport, BellState, MAX_OUTPUT};
use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{Action, Config};
use crate::journal::{Entry, Journal, JournaledReport};

/// The built-in action: always allowed, never disruptive, succeeds at once.
pub const PING: &str = "ping";

/// Time between SIGTERM and SIGKILL when an action is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Runs bells; one per agent.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    actions: BTreeMap<String, Action>,
    lock_file: PathBuf,
    boot_id: String,
    journal: Mutex<Journal>,
    /// Cancel senders of running actions.
    running: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// The bell whose action is rebooting the board, if any.
    rebooting: Mutex<Option<u64>>,
    /// The current session's report channel; `None` while disconnected
    /// (final reports are journaled and re-sent when the bell is
    /// re-delivered).
    reports: Mutex<Option<mpsc::Sender<BellReport>>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn report(id: u64, state: BellState, reason: Option<String>) -> BellReport {
    BellReport { id, state, exit_code: None, output: String::new(), duration_ms: 0, reason }
}

impl Executor {
    /// Opens the journal in the config's state dir and settles bells left
    /// from a previous run: a reboot that happened succeeded; anything else
    /// that was running when the agent stopped failed (it is not re-run).
    pub fn open(config: &Config, boot_id: String) -> anyhow::Result<Executor> {
        let mut journal = Journal::open(&config.state_dir)?;
        let pending: Vec<(u64, Entry)> = journal
            .entries()
            .filter(|(_, e)| matches!(e, Entry::Started { .. }))
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        let mut reboot_deadlines = vec![];
        for (id, entry) in pending {
            let Entry::Started { boot_id: started_boot, started_ms, timeout_ms, reboots } = entry else { continue };
            let outcome = if reboots && started_boot != boot_id {
                info!(bell = id, "the board rebooted as bell {id} asked: succeeded");
                let mut r = report(id, BellState::Succeeded, None);
                r.duration_ms = now_ms().saturating_sub(started_ms);
                Some(r)
            } else if reboots {
                // Same boot: the reboot may still be on its way; fail it
                // when its timeout passes.
                reboot_deadlines.push((id, started_ms + timeout_ms));
                None
            } else {
                Some(report(
                    id,
                    BellState::Failed,
                    Some("the agent stopped while the action was running; not re-run".into()),
                ))
            };
            if let Some(r) = outcome {
                journal.put(id, Entry::Done(JournaledReport::from_report(&r)))?;
            }
        }
        let executor = Executor {
            inner: Arc::new(Inner {
                actions: config.actions.clone(),
                lock_file: config.lock_file.clone(),
                boot_id,
                journal: Mutex::new(journal),
                running: Mutex::new(HashMap::new()),
                rebooting: Mutex::new(None),
                reports: Mutex::new(None),
            }),
        };
        for (id, deadline_ms) in reboot_deadlines {
            executor.spawn_reboot_deadline(id, deadline_ms);
        }
        Ok(executor)
    }

    /// Names of the allowlisted actions, `ping` included.
    pub fn action_names(&self) -> Vec<String> {
        std::iter::once(PING.to_string()).chain(self.inner.actions.keys().cloned()).collect()
    }

    /// The allowlist as the collector's forms need it: each action's
    /// parameters and whether it is disruptive or reboots.
    pub fn action_infos(&self) -> Vec<pulsebell_proto::ActionInfo> {
        let ping = pulsebell_proto::ActionInfo { name: PING.into(), params: vec![], disruptive: false, reboots: false };
        std::iter::once(ping)
            .chain(self.inner.actions.iter().map(|(name, a)| pulsebell_proto::ActionInfo {
                name: name.clone(),
                params: a.params.keys().cloned().collect(),
                disruptive: a.disruptive,
                reboots: a.reboots,
            }))
            .collect()
    }

    /// Reports go to `tx` from now on.
    pub async fn attach(&self, tx: mpsc::Sender<BellReport>) {
        *self.inner.reports.lock().expect("reports lock") = Some(tx);
    }

    /// The session ended; reports are only journaled until the next attach.
    pub async fn detach(&self) {
        *self.inner.reports.lock().expect("reports lock") = None;
    }

    /// Stops accepting work. Running actions keep running; the journal
    /// settles them on the next start.
    pub async fn shutdown(&self) {
        self.detach().await;
    }

    fn emit(&self, r: BellReport) {
        let tx = self.inner.reports.lock().expect("reports lock").clone();
        if let Some(tx) = tx {
            if tx.try_send(r).is_err() {
                warn!("bell report dropped: the connection is backed up; the collector will re-deliver");
            }
        }
    }

    fn finish(&self, r: BellReport) {
        if let Err(e) =
            self.inner.journal.lock().expect("journal lock").put(r.id, Entry::Done(JournaledReport::from_report(&r)))
        {
            warn!(bell = r.id, error = %e, "cannot journal the outcome");
        }
        info!(bell = r.id, state = ?r.state, exit_code = ?r.exit_code, "bell finished");
        self.emit(r);
    }

    /// Handles a bell from the collector.
    pub async fn ring(&self, bell: Bell) {
        // Re-delivered? Answer from the journal.
        let known = self.inner.journal.lock().expect("journal lock").get(bell.id).cloned();
        match known {
            Some(Entry::Done(r)) => return self.emit(r.to_report(bell.id)),
            Some(Entry::Started { .. }) => {
                // Running now, or a reboot on its way: say so, don't re-run.
                return self.emit(report(bell.id, BellState::Running, None));
            }
            None => {}
        }
        if bell.action == PING {
            if !bell.params.is_empty() {
                return self.finish(report(bell.id, BellState::Rejected, Some("`ping` takes no parameters".into())));
            }
            let mut r = report(bell.id, BellState::Succeeded, None);
            r.exit_code = Some(0);
            return self.emit(r);
        }
        let action = match self.inner.actions.get(&bell.action) {
            Some(a) => a.clone(),
            None => {
                return self.finish(report(
                    bell.id,
                    BellState::Rejected,
                    Some(format!("unknown action `{}`: not in this agent's allowlist", bell.action)),
                ))
            }
        };
        let argv = match build_argv(&action, &bell.params) {
            Ok(argv) => argv,
            Err(reason) => return self.finish(report(bell.id, BellState::Rejected, Some(reason))),
        };
        if action.disruptive && self.inner.lock_file.exists() {
            return self.finish(report(
                bell.id,
                BellState::Rejected,
                Some(format!("maintenance lock held ({} exists)", self.inner.lock_file.display())),
            ));
        }
        // The device's config bounds the run time: a bell may ask for less,
        // never more.
        let timeout = bell
            .timeout_ms
            .map(|ms| Duration::from_millis(u64::from(ms)).min(action.timeout))
            .unwrap_or(action.timeout);
        let entry = Entry::Started {
            boot_id: self.inner.boot_id.clone(),
            started_ms: now_ms(),
            timeout_ms: timeout.as_millis() as u64,
            reboots: action.reboots,
        };
        if let Err(e) = self.inner.journal.lock().expect("journal lock").put(bell.id, entry) {
            // Without a journal entry a re-delivery could run it twice.
            return self.finish(report(bell.id, BellState::Failed, Some(format!("cannot write the journal: {e}"))));
        }
        let (cancel_tx, cancel_rx) = oneshot::channel();
        self.inner.running.lock().expect("running lock").insert(bell.id, cancel_tx);
        if action.reboots {
            *self.inner.rebooting.lock().expect("rebooting lock") = Some(bell.id);
        }
        self.emit(report(bell.id, BellState::Running, None));
        info!(bell = bell.id, action = %bell.action, "running action");
        let this = self.clone();
        let env: Vec<(String, String)> = bell
            .params
            .iter()
            .map(|(k, v)| (format!("PULSEBELL_PARAM_{}", k.to_ascii_uppercase()), v.clone()))
            .collect();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut r = execute(bell.id, &argv, &env, timeout, cancel_rx).await;
            this.inner.running.lock().expect("running lock").remove(&bell.id);
            if action.reboots && r.state != BellState::Succeeded {
                this.inner.rebooting.lock().expect("rebooting lock").take();
            }
            if action.reboots && r.state == BellState::Succeeded {
                // The reboot was requested; success is a new boot id, seen
                // by the next agent start. Fail if it never comes.
                info!(bell = bell.id, "reboot requested; waiting for the new boot");
                this.spawn_reboot_deadline(bell.id, now_ms() + timeout.as_millis() as u64);
                return;
            }
            r.duration_ms = started.elapsed().as_millis() as u64;
            this.finish(r);
        });
    }

    fn spawn_reboot_deadline(&self, id: u64, deadline_ms: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(deadline_ms.saturating_sub(now_ms()))).await;
            this.finish(report(
                id,
                BellState::Failed,
                Some("the board did not reboot (boot id unchanged) within the timeout".into()),
            ));
        });
    }

    /// The bell rebooting the board, if one is (the agent's own stop is
    /// then part of it).
    pub fn rebooting(&self) -> Option<u64> {
        *self.inner.rebooting.lock().expect("rebooting lock")
    }

    /// Stops a running bell (SIGTERM to its process group, then SIGKILL).
    pub async fn cancel(&self, id: u64) {
        if let Some(tx) = self.inner.running.lock().expect("running lock").remove(&id) {
            info!(bell = id, "cancelling");
            let _ = tx.send(());
        }
    }
}

/// Fills placeholders from parameters, checking every parameter first.
fn build_argv(action: &Action, params: &[(String, String)]) -> Result<Vec<String>, String> {
    let mut values: HashMap<&str, &str> = HashMap::new();
    for (name, value) in params {
        let Some(re) = action.params.get(name) else {
            return Err(format!("parameter `{name}` is not declared by this action"));
        };
        if !re.is_match(value) {
            return Err(format!("parameter `{name}` does not match {}", re.as_str()));
        }
        if values.insert(name, value).is_some() {
            return Err(format!("parameter `{name}` given twice"));
        }
    }
    action
        .command
        .iter()
        .map(|arg| {
            // One pass over the template, so a value is never itself
            // scanned for placeholders.
            let mut out = String::with_capacity(arg.len());
            let mut rest = arg.as_str();
            while let Some(open) = rest.find('{') {
                let Some(close) = rest[open..].find('}') else { break };
                let name = &rest[open + 1..open + close];
                let value = values.get(name).ok_or_else(|| format!("missing parameter `{name}`"))?;
                out.push_str(&rest[..open]);
                out.push_str(value);
                rest = &rest[open + close + 1..];
            }
            out.push_str(rest);
            Ok(out)
        })
        .collect()
}

/// Spawns `argv` in its own process group and waits for it, its timeout or
/// a cancel. Returns the final report (duration filled by the caller).
async fn execute(
    id: u64,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    cancel: oneshot::Receiver<()>,
) -> BellReport {
    // A dropped sender is no cancel.
    let cancel = async {
        if cancel.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let run = match run_program(argv, env, timeout, cancel, MAX_OUTPUT).await {
        Ok(run) => run,
        Err(e) => return report(id, BellState::Failed, Some(format!("cannot start `{}`: {e}", argv[0]))),
    };
    let (state, reason, status) = match run.ended {
        Ended::Exited(s) if s.success() => (BellState::Succeeded, None, Some(s)),
        Ended::Exited(s) => (BellState::Failed, Some(describe_exit(&s)), Some(s)),
        Ended::WaitFailed(e) => (BellState::Failed, Some(format!("wait failed: {e}")), None),
        Ended::TimedOut => {
            (BellState::TimedOut, Some(format!("ran longer than {}", humantime::format_duration(timeout))), None)
        }
        Ended::Cancelled => (BellState::Cancelled, Some("cancelled by the operator".into()), None),
    };
    BellReport { id, state, exit_code: status.and_then(|s| s.code()), output: run.output, duration_ms: 0, reason }
}

/// How a program run by [`run_program`] ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// It exited (or was killed by a signal it did not get from us).
    Exited(std::process::ExitStatus),
    /// Waiting for it failed.
    WaitFailed(std::io::Error),
    /// It ran past its timeout and its process group was stopped.
    TimedOut,
    /// It was cancelled and its process group was stopped.
    Cancelled,
}

/// What [`run_program`] saw.
#[derive(Debug)]
pub(crate) struct ProgramRun {
    /// How it ended.
    pub ended: Ended,
    /// The last `max_output` bytes of combined stdout and stderr.
    pub output: String,
    /// The first [`STDOUT_HEAD`] bytes of stdout alone (a Nagios plugin's
    /// status line is its first line of stdout).
    pub stdout_head: String,
}

/// How much of stdout's start [`run_program`] keeps apart.
pub(crate) const STDOUT_HEAD: usize = 1024;

/// Spawns `cmd`, retrying a few times over a few milliseconds when exec
/// says "text file busy": a script just written (a deploy updating a check,
/// or a test) can be briefly held open for writing by another process
/// between its fork and its exec.
async fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<tokio::process::Child> {
    let busy = rustix::io::Errno::TXTBSY.raw_os_error();
    let mut attempt = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(busy) && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
            other => return other,
        }
    }
}

/// The way the agent runs any program (actions, command checks): `argv`
/// directly (no shell), in its own process group, stdin from /dev/null,
/// output captured. On `timeout` or when `cancel` completes, SIGTERM to the
/// group, SIGKILL after [`KILL_GRACE`]. `Err` only when it cannot start.
pub(crate) async fn run_program(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    cancel: impl std::future::Future<Output = ()>,
    max_output: usize,
) -> std::io::Result<ProgramRun> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = spawn_retrying_busy(&mut cmd).await?;
    let pgid = child.id().and_then(|pid| Pid::from_raw(pid as i32));
    let captured = Arc::new(Mutex::new(Captured { tail: Tail::with_limit(max_output), stdout_head: Vec::new() }));
    let readers = [
        child.stdout.take().map(|s| tokio::spawn(capture(s, captured.clone(), true))),
        child.stderr.take().map(|s| tokio::spawn(capture(s, captured.clone(), false))),
    ];
    let ended = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => Ended::Exited(s),
            Err(e) => Ended::WaitFailed(e),
        },
        () = tokio::time::sleep(timeout) => {
            stop_group(pgid, &mut child).await;
            Ended::TimedOut
        }
        () = cancel => {
            stop_group(pgid, &mut child).await;
            Ended::Cancelled
        }
    };
    // Children may keep the pipes open; don't wait on them forever.
    for reader in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
    }
    let captured = captured.lock().expect("capture lock");
    Ok(ProgramRun {
        ended,
        output: captured.tail.to_string(),
        stdout_head: String::from_utf8_lossy(&captured.stdout_head).into_owned(),
    })
}

/// "exited with status 2", "killed by signal 9".
pub(crate) fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".into(),
    }
}

/// SIGTERM to the whole process group, SIGKILL after [`KILL_GRACE`].
async fn stop_group(pgid: Option<Pid>, child: &mut tokio::process::Child) {
    if let Some(pgid) = pgid {
        let _ = kill_process_group(pgid, Signal::TERM);
        if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_ok() {
            // The leader is gone; make sure its children are too.
            let _ = kill_process_group(pgid, Signal::KILL);
            return;
        }
        let _ = kill_process_group(pgid, Signal::KILL);
    }
    let _ = child.kill().await;
}

/// The last `limit` bytes of combined output ([`MAX_OUTPUT`] by default).
struct Tail {
    buf: Vec<u8>,
    limit: usize,
}

impl Default for Tail {
    fn default() -> Self {
        Tail::with_limit(MAX_OUTPUT)
    }
}

impl Tail {
    fn with_limit(limit: usize) -> Self {
        Tail { buf: Vec::new(), limit }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.limit {
            self.buf.drain(..self.buf.len() - self.limit);
        }
    }
}

impl std::fmt::Display for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = String::from_utf8_lossy(&self.buf);
        // Lossy decoding can grow the text; keep the last `limit` bytes at
        // a char boundary.
        let mut start = text.len().saturating_sub(self.limit);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        f.write_str(&text[start..])
    }
}

/// Output captured from both pipes.
struct Captured {
    tail: Tail,
    stdout_head: Vec<u8>,
}

async fn capture(mut pipe: impl AsyncRead + Unpin, captured: Arc<Mutex<Captured>>, stdout: bool) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut c = captured.lock().expect("capture lock");
        c.tail.push(&buf[..n]);
        if stdout && c.stdout_head.len() < STDOUT_HEAD {
            let take = n.min(STDOUT_HEAD - c.stdout_head.len());
            c.stdout_head.extend_from_slice(&buf[..take]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, actions: &str) -> Config {
        let text = format!(
            "collector_url = \"wss://c:1/v1/ws\"\ndevice_id = \"d\"\ntoken = \"t\"\nstate_dir = \"{}\"\n{actions}",
            dir.display()
        );
        Config::parse(&text).unwrap()
    }

    async fn ring_and_wait(ex: &Executor, bell: Bell) -> Vec<BellReport> {
        let (tx, mut rx) = mpsc::channel(16);
        ex.attach(tx).await;
        ex.ring(bell).await;
        let mut out = vec![];
        while let Some(r) = rx.recv().await {
            let done = r.state.is_final();
            out.push(r);
            if done {
                break;
            }
        }
        out
    }

    fn bell(id: u64, action: &str, params: &[(&str, &str)]) -> Bell {
        Bell {
            id,
            action: action.into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            timeout_ms: None,
        }
    }

    #[tokio::test]
    async fn runs_once_and_answers_redelivery_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("count");
        let cfg = config(
            dir.path(),
            &format!(
                "[actions.append]\ncommand = [\"sh\", \"-c\", \"echo run >> {} && echo hello $PULSEBELL_PARAM_WHO\"]\nparams = [\"who\"]\n",
                out.display()
            ),
        );
        let ex = Executor::open(&cfg, "boot-1".into()).unwrap();
        let reports = ring_and_wait(&ex, bell(1, "append", &[("who", "world")])).await;
        let last = reports.last().unwrap();
        assert_eq!(last.state, BellState::Succeeded, "{last:?}");
        assert_eq!(last.output, "hello world\n");
        assert_eq!(last.exit_code, Some(0));
        // Re-delivered, also after a restart: same answer, no second run.
        let again = ring_and_wait(&ex, bell(1, "append", &[("who", "world")])).await;
        assert_eq!(again.last().unwrap().state, BellState::Succeeded);
        let ex2 = Executor::open(&cfg, "boot-1".into()).unwrap();
        let again = ring_and_wait(&ex2, bell(1, "append", &[("who", "world")])).await;
        assert_eq!(again.last().unwrap().output, "hello world\n");
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);
    }

    #[tokio::test]
    async fn rejects_unknown_actions_and_bad_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let cfg = config(
            dir.path(),
            &format!(
                "[actions.update]\ncommand = [\"touch\", \"{}\", \"{{version}}\"]\nparams = {{ version = \"^[0-9]+\\\\.[0-9]+\\\\.[0-9]+$\" }}\n",
                marker.display()
            ),
        );
        let ex = Executor::open(&cfg, "b".into()).unwrap();
        for (id, b) in [
            (1, bell(1, "rm", &[])),
            (2, bell(2, "update", &[("version", "1.0; rm -rf /")])),
            (3, bell(3, "update", &[("other", "1")])),
            (4, bell(4, "update", &[])),
        ] {
            let r = ring_and_wait(&ex, b).await;
            assert_eq!(r.len(), 1, "bell {id}: {r:?}");
            assert_eq!(r[0].state, BellState::Rejected, "bell {id}");
            assert!(r[0].reason.is_some());
        }
        assert!(!marker.exists(), "nothing may run");
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let cfg = config(
            dir.path(),
            &format!(
                "[actions.hang]\ncommand = [\"sh\", \"-c\", \"sleep 1000 & echo $! > {}; wait\"]\ntimeout = \"300ms\"\n",
                pidfile.display()
            ),
        );
        let ex = Executor::open(&cfg, "b".into()).unwrap();
        let r = ring_and_wait(&ex, bell(1, "hang", &[])).await;
        assert_eq!(r.last().unwrap().state, BellState::TimedOut);
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The grandchild `sleep` got the signal too; reap is by init, so poll
        // /proc for it to be gone or a zombie.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z"), "sleep survived: {stat}");
    }

    #[tokio::test]
    async fn disruptive_actions_respect_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "[actions.restart]\ncommand = [\"true\"]\ndisruptive = true\n");
        std::fs::write(&cfg.lock_file, b"").unwrap();
        let ex = Executor::open(&cfg, "b".into()).unwrap();
        let r = ring_and_wait(&ex, bell(1, "restart", &[])).await;
        assert_eq!(r[0].state, BellState::Rejected);
        assert!(r[0].reason.as_deref().unwrap().contains("maintenance lock"));
        std::fs::remove_file(&cfg.lock_file).unwrap();
        let r = ring_and_wait(&ex, bell(2, "restart", &[])).await;
        assert_eq!(r.last().unwrap().state, BellState::Succeeded);
    }

    #[tokio::test]
    async fn reboot_succeeds_on_a_new_boot_id_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "[actions.reboot]\ncommand = [\"true\"]\nreboots = true\ntimeout = \"1h\"\n");
        let ex = Executor::open(&cfg, "boot-1".into()).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        ex.attach(tx).await;
        ex.ring(bell(7, "reboot", &[])).await;
        assert_eq!(rx.recv().await.unwrap().state, BellState::Running);
        // Same boot: still pending, not re-run, not succeeded.
        let ex = Executor::open(&cfg, "boot-1".into()).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        ex.attach(tx).await;
        ex.ring(bell(7, "reboot", &[])).await;
        assert_eq!(rx.recv().await.unwrap().state, BellState::Running);
        // New boot id: succeeded, once.
        let ex = Executor::open(&cfg, "boot-2".into()).unwrap();
        let r = ring_and_wait(&ex, bell(7, "reboot", &[])).await;
        assert_eq!(r.last().unwrap().state, BellState::Succeeded);
    }

    #[test]
    fn values_are_substituted_once() {
        let cfg = Config::parse(
            "collector_url = \"wss://c:1/v1/ws\"\ndevice_id = \"d\"\ntoken = \"t\"\n[actions.x]\ncommand = [\"echo\", \"{a}-{b}\"]\nparams = { a = \".*\", b = \".*\" }\n",
        )
        .unwrap();
        let argv = build_argv(&cfg.actions["x"], &[("a".into(), "{b}".into()), ("b".into(), "2".into())]).unwrap();
        assert_eq!(argv, ["echo", "{b}-2"]);
    }

    #[tokio::test]
    async fn a_bell_cannot_extend_the_actions_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "[actions.hang]\ncommand = [\"sleep\", \"1000\"]\ntimeout = \"300ms\"\n");
        let ex = Executor::open(&cfg, "b".into()).unwrap();
        let mut b = bell(1, "hang", &[]);
        b.timeout_ms = Some(3_600_000);
        let r = ring_and_wait(&ex, b).await;
        assert_eq!(r.last().unwrap().state, BellState::TimedOut);
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; MAX_OUTPUT]);
        t.push(b"end");
        let s = t.to_string();
        assert_eq!(s.len(), MAX_OUTPUT);
        assert!(s.ends_with("aend"));
    }
}
