//! End-to-end tests of ready bells: the real collector and agent binaries,
//! the `bell`, `bell-show`, `bells` and `cancel` commands, and the agent's
//! allowlisted actions and journal.
//!
//! Every test has its own temporary directory, collector and ports. Waiting
//! is done with `bell --wait` or by polling `bell-show --json` (or `status
//! --json`, a log line, a file) with [`wait_until`]; never by a fixed sleep.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use pulsebell_tests::serde_json::{self, Value};
use pulsebell_tests::{describe, toml_str, wait_until, Agent, AgentOpts, Collector, Forwarder, STATE_TIMEOUT};
use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;

/// How long a bell may take to reach an awaited state.
const BELL_TIMEOUT: Duration = Duration::from_secs(30);

/// Final bell states.
const FINAL: &[&str] = &["succeeded", "failed", "timed_out", "rejected", "cancelled", "expired"];

/// The regex of the README's `update` example, as written in TOML.
const VERSION_PARAM: &str = r#"params = { version = "^[0-9]+\\.[0-9]+\\.[0-9]+$" }"#;

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-bells-").tempdir().expect("create temp dir")
}

// ---------------------------------------------------------------------------
// Agent config

/// An `[actions.NAME]` table with `command` and any further lines in `rest`.
fn action(name: &str, command: &[&str], rest: &str) -> String {
    let argv: Vec<String> = command.iter().map(|a| toml_str(a)).collect();
    format!("\n[actions.{name}]\ncommand = [{}]\n{rest}\n", argv.join(", "))
}

/// Agent options with `extra` appended to the config (top-level keys first,
/// then `[actions.x]` tables).
fn opts(extra: String) -> AgentOpts {
    AgentOpts { extra_toml: extra, ..AgentOpts::default() }
}

/// `path` as a string for a shell script inside an action.
fn p(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

/// Writes `<root>/proc/sys/kernel/random/boot_id`: what the agent with
/// `root = "<root>"` reads as its boot id.
fn set_boot_id(root: &Path, boot_id: &str) {
    let path = root.join("proc/sys/kernel/random/boot_id");
    fs::create_dir_all(path.parent().expect("boot_id has a parent")).expect("create fake /proc");
    fs::write(&path, format!("{boot_id}\n")).expect("write fake boot_id");
}

/// Number of lines in `path`, 0 if it does not exist.
fn line_count(path: &Path) -> usize {
    fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Bells through the CLI

/// Runs `bell ARGS…` without `--wait`; returns the printed ids.
fn ring(collector: &Collector, args: &[&str]) -> Vec<u64> {
    let mut full = vec!["bell"];
    full.extend_from_slice(args);
    let output = collector.cli_ok(&full);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ids: Vec<u64> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().unwrap_or_else(|_| panic!("`bell` printed `{l}`, not a bell id:\n{}", describe(&output))))
        .collect();
    assert!(!ids.is_empty(), "`bell` printed no id:\n{}", describe(&output));
    ids
}

/// Runs `bell ARGS… ` for one device without `--wait`; returns its id.
fn ring_one(collector: &Collector, args: &[&str]) -> u64 {
    let ids = ring(collector, args);
    assert_eq!(ids.len(), 1, "one bell expected, got ids {ids:?}");
    ids[0]
}

/// Runs `bell ARGS… --wait --json`; returns the output and the bells.
fn ring_wait(collector: &Collector, args: &[&str]) -> (Output, Vec<Value>) {
    let mut full = vec!["bell"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--wait", "--json"]);
    let output = collector.cli(&full);
    let bells = match serde_json::from_slice::<Value>(&output.stdout) {
        Ok(Value::Array(bells)) => bells,
        Ok(other) => panic!("`{}` printed {other}, not a JSON array:\n{}", full.join(" "), describe(&output)),
        Err(e) => panic!("`{}` did not print JSON ({e}):\n{}", full.join(" "), describe(&output)),
    };
    (output, bells)
}

/// Like [`ring_wait`] for one device: the single bell.
fn ring_wait_one(collector: &Collector, args: &[&str]) -> (Output, Value) {
    let (output, mut bells) = ring_wait(collector, args);
    assert_eq!(bells.len(), 1, "one bell expected:\n{}", describe(&output));
    (output, bells.remove(0))
}

/// `bell-show ID --json`, parsed, or why it could not be had.
fn try_show_bell(collector: &Collector, id: u64) -> Result<Value, String> {
    let output = collector.cli(&["bell-show", &id.to_string(), "--json"]);
    if !output.status.success() {
        return Err(format!("`bell-show {id} --json` failed:\n{}", describe(&output)));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("`bell-show {id} --json` did not print JSON ({e}):\n{}", describe(&output)))
}

fn show_bell(collector: &Collector, id: u64) -> Value {
    try_show_bell(collector, id).unwrap_or_else(|e| panic!("{e}"))
}

fn state(bell: &Value) -> &str {
    bell["state"].as_str().unwrap_or_else(|| panic!("bell has no string `state`: {bell}"))
}

/// The states of a bell's transitions, in order.
fn transition_states(bell: &Value) -> Vec<String> {
    bell["transitions"]
        .as_array()
        .unwrap_or_else(|| panic!("bell has no `transitions` array: {bell}"))
        .iter()
        .map(|t| t["state"].as_str().unwrap_or_else(|| panic!("transition without a state: {bell}")).to_string())
        .collect()
}

/// The states of a bell's transitions with repeats (a note on the same
/// state, e.g. "cancel requested") collapsed.
fn distinct_states(bell: &Value) -> Vec<String> {
    let mut states = transition_states(bell);
    states.dedup();
    states
}

fn reason(bell: &Value) -> &str {
    match bell["reason"].as_str() {
        Some(r) if !r.trim().is_empty() => r,
        _ => panic!("bell has no reason: {bell}"),
    }
}

/// Polls `bell-show` until bell `id` is in state `want`; fails at once if
/// it reaches another final state.
fn wait_for_bell(collector: &Collector, id: u64, want: &str) -> Value {
    wait_until(&format!("bell {id} to be {want}"), BELL_TIMEOUT, || {
        let bell = try_show_bell(collector, id)?;
        let got = state(&bell);
        if got == want {
            return Ok(bell);
        }
        assert!(!FINAL.contains(&got), "bell {id} ended `{got}`, expected `{want}`: {bell}");
        Err(format!("state `{got}`: {bell}"))
    })
}

fn assert_exit_code(output: &Output, code: i32, what: &str) {
    assert_eq!(output.status.code(), Some(code), "{what}: expected exit code {code}:\n{}", describe(output));
}

// ---------------------------------------------------------------------------
// Processes

/// Whether process `pid` is gone (no `/proc/PID`) or a zombie.
fn gone_or_zombie(pid: u32) -> Result<(), String> {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => Ok(()),
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let st = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()).unwrap_or_default();
            if st.starts_with('Z') || st.starts_with('X') {
                Ok(())
            } else {
                Err(format!("process {pid} still alive: {stat}"))
            }
        }
    }
}

/// Waits for a pid file written by an action; returns the pid.
fn read_pid_file(path: &Path) -> u32 {
    wait_until(&format!("{} to hold a pid", path.display()), BELL_TIMEOUT, || {
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        text.trim().parse::<u32>().map_err(|e| format!("`{text}`: {e}"))
    })
}

/// Waits until process `pid` is gone (or a zombie).
fn wait_for_exit(pid: u32, what: &str) {
    wait_until(&format!("{what} (pid {pid}) to be killed"), Duration::from_secs(15), || gone_or_zombie(pid));
}

/// Kills the `sleep` whose pid an action wrote to a file, when dropped: a
/// failing test must not leave `sleep 1000` behind.
struct KillPidFile(PathBuf);

impl Drop for KillPidFile {
    fn drop(&mut self) {
        let Some(pid) = fs::read_to_string(&self.0).ok().and_then(|t| t.trim().parse::<i32>().ok()) else { return };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "sleep" {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
}

/// Ids of the bells the agent logged `running action` for, in log order.
fn started_bells(agent: &Agent) -> Vec<u64> {
    agent
        .log()
        .text()
        .lines()
        .filter(|l| l.contains("running action"))
        .filter_map(|l| {
            let rest = &l[l.find("bell=")? + "bell=".len()..];
            rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests

/// (1) `bell --wait` on an online device: succeeded, with its output and
/// exit code, and every transition in order.
#[test]
fn bell_with_wait_on_an_online_device_succeeds_with_its_output() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-hello";
    let token = collector.enroll(id);
    let extra = action("greet", &["echo", "hello from {who}"], r#"params = ["who"]"#)
        + &action("env-greet", &["sh", "-c", "echo \"env: $PULSEBELL_PARAM_WHO\""], r#"params = ["who"]"#);
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");

    let (output, bell) = ring_wait_one(&collector, &[id, "greet", "--param", "who=world"]);
    assert_exit_code(&output, 0, "a succeeded bell with --wait");
    assert_eq!(state(&bell), "succeeded", "{bell}");
    assert_eq!(bell["device"], id, "{bell}");
    assert_eq!(bell["action"], "greet", "{bell}");
    assert_eq!(bell["params"]["who"], "world", "{bell}");
    assert_eq!(bell["output"], "hello from world\n", "{bell}");
    assert_eq!(bell["exit_code"], 0, "{bell}");
    assert!(bell["duration_ms"].is_u64(), "duration_ms: {bell}");
    let bell_id = bell["id"].as_u64().unwrap_or_else(|| panic!("no numeric id: {bell}"));

    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "succeeded", "{shown}");
    assert_eq!(shown["output"], "hello from world\n", "{shown}");
    assert_eq!(shown["exit_code"], 0, "{shown}");
    assert_eq!(transition_states(&shown), ["queued", "sent", "running", "succeeded"], "{shown}");
    for t in shown["transitions"].as_array().into_iter().flatten() {
        pulsebell_tests::parse_time(&t["at"]).unwrap_or_else(|e| panic!("transition time: {e}; {shown}"));
    }

    // `bells DEVICE --json` lists it.
    let output = collector.cli_ok(&["bells", id, "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("`bells {id} --json` did not print a JSON array ({e}):\n{}", describe(&output)));
    assert!(
        listed.iter().any(|b| b["id"] == bell_id && b["state"] == "succeeded"),
        "`bells {id} --json` does not list bell {bell_id} as succeeded: {listed:?}"
    );

    // Parameters are also exported as PULSEBELL_PARAM_<NAME>.
    let (output, bell) = ring_wait_one(&collector, &[id, "env-greet", "--param", "who=env-world"]);
    assert_exit_code(&output, 0, "env-greet");
    assert_eq!(bell["output"], "env: env-world\n", "{bell}");
}

/// (2) Bells for an enrolled device whose agent is not running stay
/// queued, and run, in order, once the agent connects.
#[test]
fn bell_for_an_offline_device_waits_queued_then_runs_when_it_connects() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-late";
    let token = collector.enroll(id);
    let marker = tmp.path().join("ran");

    let ids: Vec<u64> = (0..3).map(|_| ring_one(&collector, &[id, "mark"])).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "bell ids must increase: {ids:?}");
    for &bell_id in &ids {
        let shown = show_bell(&collector, bell_id);
        assert_eq!(state(&shown), "queued", "{shown}");
        assert_eq!(transition_states(&shown), ["queued"], "{shown}");
        assert!(shown["exit_code"].is_null(), "exit_code must be null until known: {shown}");
    }

    let extra = action("mark", &["sh", "-c", &format!("echo ran >> {}", p(&marker))], "");
    let agent = Agent::start(&collector, id, &token, opts(extra));
    for &bell_id in &ids {
        let done = wait_for_bell(&collector, bell_id, "succeeded");
        assert_eq!(done["exit_code"], 0, "{done}");
        assert_eq!(transition_states(&done), ["queued", "sent", "running", "succeeded"], "{done}");
    }
    assert_eq!(line_count(&marker), 3, "each bell must have run exactly once");
    assert_eq!(started_bells(&agent), ids, "queued bells must be delivered in order:\n{}", agent.log().text());
}

/// (3) A bell survives `kill -9` of the collector right after `bell`
/// returned, and is delivered when the device connects to the new
/// collector.
#[test]
fn queued_bell_survives_collector_sigkill_and_is_delivered_later() {
    let tmp = tempdir();
    let mut collector = Collector::start(tmp.path());
    let id = "pi-durable";
    let token = collector.enroll(id);
    let marker = tmp.path().join("ran");

    let bell_id = ring_one(&collector, &[id, "mark"]);
    collector.kill9();
    collector.restart();

    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "queued", "after kill -9 and restart: {shown}");
    assert_eq!(shown["action"], "mark", "{shown}");

    let extra = action("mark", &["sh", "-c", &format!("echo ran >> {}; echo marked", p(&marker))], "");
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    let done = wait_for_bell(&collector, bell_id, "succeeded");
    assert_eq!(done["output"], "marked\n", "{done}");
    assert_eq!(done["exit_code"], 0, "{done}");
    assert_eq!(line_count(&marker), 1, "the action must have run exactly once");

    // The result itself is durable too.
    collector.kill9();
    collector.restart();
    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "succeeded", "after a second kill -9 and restart: {shown}");
    assert_eq!(shown["output"], "marked\n", "{shown}");
}

/// (4) A bell whose result was lost (the collector was killed while the
/// action ran) is re-delivered on reconnect and answered from the agent's
/// journal: recorded as succeeded, and the action ran once.
#[test]
fn redelivered_bell_is_answered_from_the_journal_not_run_twice() {
    let tmp = tempdir();
    let mut collector = Collector::start(tmp.path());
    let proxy = Forwarder::start(collector.device_addr(), Duration::from_secs(10));
    let id = "pi-once";
    let token = collector.enroll(id);
    let count = tmp.path().join("count");
    let script = format!("echo run >> {}; sleep 3; echo done", p(&count));
    let agent_opts = AgentOpts { collector_url: Some(proxy.url()), ..opts(action("slow", &["sh", "-c", &script], "")) };
    let agent = Agent::start(&collector, id, &token, agent_opts);
    collector.wait_for_state(id, "online");

    let bell_id = ring_one(&collector, &[id, "slow"]);
    wait_for_bell(&collector, bell_id, "running");
    // Hold new connections, then kill the collector mid-action.
    proxy.set_target(None);
    collector.kill9();
    collector.restart();
    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "running", "the store must still have the bell running: {shown}");

    // The action ends while the agent is disconnected: its result is only
    // in the journal. Then let the agent reach the new collector.
    agent.wait_for_log(&["bell finished"], BELL_TIMEOUT);
    proxy.set_target(Some(collector.device_addr()));
    let done = wait_for_bell(&collector, bell_id, "succeeded");
    assert_eq!(done["output"], "done\n", "{done}");
    assert_eq!(done["exit_code"], 0, "{done}");
    let states = transition_states(&done);
    assert_eq!(states.iter().filter(|s| *s == "succeeded").count(), 1, "{done}");
    assert_eq!(line_count(&count), 1, "the action must have run exactly once: {}", p(&count));
}

/// (5) Unknown actions, undeclared parameters and values that fail the
/// action's regex are rejected with a reason, and nothing runs.
#[test]
fn unknown_actions_and_bad_parameters_are_rejected_and_nothing_runs() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-strict";
    let token = collector.enroll(id);
    let ran = tmp.path().join("ran");
    let injected = tmp.path().join("injected");
    // `deploy` puts its parameter into a shell script: only the regex keeps
    // `1.0.0; touch …` out. `update` is the README's argv-only example.
    let deploy = format!("echo ran >> {}; echo deploying {{version}}", p(&ran));
    let extra = action("update", &["/bin/echo", "{version}"], VERSION_PARAM)
        + &action("deploy", &["sh", "-c", &deploy], VERSION_PARAM);
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");

    let (output, bell) = ring_wait_one(&collector, &[id, "no-such-action"]);
    assert_exit_code(&output, 1, "a rejected bell with --wait");
    assert_eq!(state(&bell), "rejected", "{bell}");
    assert!(reason(&bell).contains("no-such-action"), "the reason should name the action: {bell}");

    let injection = format!("version=1.0.0; touch {}", p(&injected));
    for param in ["version=1.0; rm -rf /", injection.as_str(), "version=1.0.0\nreboot", "other=1.0.0"] {
        for act in ["update", "deploy"] {
            let (output, bell) = ring_wait_one(&collector, &[id, act, "--param", param]);
            assert_exit_code(&output, 1, &format!("{act} --param {param:?}"));
            assert_eq!(state(&bell), "rejected", "{act} --param {param:?}: {bell}");
            reason(&bell);
            assert!(bell["exit_code"].is_null(), "{act} --param {param:?}: nothing may run: {bell}");
            assert_eq!(bell["output"], "", "{act} --param {param:?}: nothing may run: {bell}");
        }
    }
    // A missing parameter leaves a placeholder unfilled: rejected too.
    let (output, bell) = ring_wait_one(&collector, &[id, "deploy"]);
    assert_exit_code(&output, 1, "deploy without its parameter");
    assert_eq!(state(&bell), "rejected", "{bell}");
    // The built-in `ping` takes no parameters.
    let (output, bell) = ring_wait_one(&collector, &[id, "ping", "--param", "x=1"]);
    assert_exit_code(&output, 1, "ping with a parameter");
    assert_eq!(state(&bell), "rejected", "{bell}");
    assert!(!ran.exists(), "a rejected bell ran its action");
    assert!(!injected.exists(), "a parameter value was run as shell code");

    // Usage errors exit 2 and ring nothing.
    for args in [&[id, "deploy", "--param", "version", "--wait"][..], &[id][..], &["--tag", "t", id, "deploy"][..]] {
        let mut full = vec!["bell"];
        full.extend_from_slice(args);
        let output = collector.cli(&full);
        assert_exit_code(&output, 2, &format!("`{}`", full.join(" ")));
    }

    // Control: a value that matches runs.
    let (output, bell) = ring_wait_one(&collector, &[id, "deploy", "--param", "version=1.4.2"]);
    assert_exit_code(&output, 0, "deploy with a valid version");
    assert_eq!(bell["output"], "deploying 1.4.2\n", "{bell}");
    assert_eq!(line_count(&ran), 1);
    assert!(!injected.exists());
}

/// (6) `--timeout` kills the action and the processes it started.
#[test]
fn timeout_kills_the_action_and_its_children() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-slow";
    let token = collector.enroll(id);
    let pid_file = tmp.path().join("sleep.pid");
    let _cleanup = KillPidFile(pid_file.clone());
    let script = format!("sleep 1000 & echo $! > {}; wait", p(&pid_file));
    let _agent = Agent::start(&collector, id, &token, opts(action("hang", &["sh", "-c", &script], "")));
    collector.wait_for_state(id, "online");

    let started = Instant::now();
    let (output, bell) = ring_wait_one(&collector, &[id, "hang", "--timeout", "1s"]);
    assert_exit_code(&output, 1, "a timed-out bell with --wait");
    assert_eq!(state(&bell), "timed_out", "{bell}");
    reason(&bell);
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?} to time out a 1 s limit", started.elapsed());
    assert_eq!(distinct_states(&bell), ["queued", "sent", "running", "timed_out"], "{bell}");

    let pid = read_pid_file(&pid_file);
    wait_for_exit(pid, "the action's background `sleep 1000`");
}

/// (6a) An action that ignores SIGTERM is SIGKILLed after the grace
/// period, children included.
#[test]
fn timeout_escalates_to_sigkill_for_an_action_that_ignores_sigterm() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-stubborn";
    let token = collector.enroll(id);
    let pid_file = tmp.path().join("sleep.pid");
    let _cleanup = KillPidFile(pid_file.clone());
    let script = format!("trap '' TERM; sleep 1000 & echo $! > {}; wait", p(&pid_file));
    let _agent = Agent::start(&collector, id, &token, opts(action("stubborn", &["sh", "-c", &script], "")));
    collector.wait_for_state(id, "online");

    let (output, bell) = ring_wait_one(&collector, &[id, "stubborn", "--timeout", "1s"]);
    assert_exit_code(&output, 1, "a timed-out bell with --wait");
    assert_eq!(state(&bell), "timed_out", "{bell}");
    let pid = read_pid_file(&pid_file);
    wait_for_exit(pid, "the background `sleep 1000` that ignores SIGTERM");
}

/// (6b) A bell may shorten an action's run-time limit but never extend
/// it: the agent's config is the allowlist, limits included.
#[test]
fn bell_timeout_cannot_extend_the_actions_own_limit() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-capped";
    let token = collector.enroll(id);
    let pid_file = tmp.path().join("sleep.pid");
    let _cleanup = KillPidFile(pid_file.clone());
    let script = format!("sleep 1000 & echo $! > {}; wait", p(&pid_file));
    let extra = action("hang", &["sh", "-c", &script], "timeout = \"1s\"");
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");

    let bell_id = ring_one(&collector, &[id, "hang", "--timeout", "1h"]);
    let done = wait_for_bell(&collector, bell_id, "timed_out");
    reason(&done);
    let pid = read_pid_file(&pid_file);
    wait_for_exit(pid, "the action's background `sleep 1000`");
}

/// (6c) A failing action is `failed` with its exit code and output
/// (stderr included); output is cut to its last 4 KiB.
#[test]
fn failing_action_reports_exit_code_and_output_tail() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-fail";
    let token = collector.enroll(id);
    let extra = action("fail", &["sh", "-c", "echo oops >&2; exit 3"], "")
        + &action("chatty", &["sh", "-c", "head -c 6000 /dev/zero | tr '\\000' a; echo END"], "");
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");

    let (output, bell) = ring_wait_one(&collector, &[id, "fail"]);
    assert_exit_code(&output, 1, "a failed bell with --wait");
    assert_eq!(state(&bell), "failed", "{bell}");
    assert_eq!(bell["exit_code"], 3, "{bell}");
    assert_eq!(bell["output"], "oops\n", "stderr is part of the output: {bell}");
    reason(&bell);

    let (output, bell) = ring_wait_one(&collector, &[id, "chatty"]);
    assert_exit_code(&output, 0, "chatty");
    let out = bell["output"].as_str().unwrap_or_else(|| panic!("no output: {bell}"));
    assert!(out.len() <= 4096 && out.len() > 4000, "output is {} bytes, expected the last 4 KiB", out.len());
    assert!(out.ends_with("aaaEND\n"), "output must be the tail: ...{:?}", &out[out.len().saturating_sub(20)..]);
}

/// (6d) An action that was running when the agent stopped is reported
/// `failed` after the agent starts again, and is not run a second time.
#[test]
fn action_running_when_the_agent_stops_is_failed_not_rerun() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-interrupted";
    let token = collector.enroll(id);
    let count = tmp.path().join("count");
    let pid_file = tmp.path().join("sleep.pid");
    let _cleanup = KillPidFile(pid_file.clone());
    let script = format!("echo run >> {}; echo $$ > {}; exec sleep 1000", p(&count), p(&pid_file));
    let mut agent = Agent::start(&collector, id, &token, opts(action("long", &["sh", "-c", &script], "")));
    collector.wait_for_state(id, "online");

    let bell_id = ring_one(&collector, &[id, "long"]);
    wait_for_bell(&collector, bell_id, "running");
    read_pid_file(&pid_file);
    agent.stop();
    agent.restart();
    let done = wait_for_bell(&collector, bell_id, "failed");
    reason(&done);
    assert_eq!(line_count(&count), 1, "the interrupted action must not run again");
    assert_eq!(started_bells(&agent), [bell_id], "the agent started the bell more than once:\n{}", agent.log().text());
}

/// (7) `cancel` stops a running action (and its children).
#[test]
fn cancel_stops_a_running_action() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-cancel";
    let token = collector.enroll(id);
    let pid_file = tmp.path().join("sleep.pid");
    let _cleanup = KillPidFile(pid_file.clone());
    let script = format!("sleep 1000 & echo $! > {}; wait", p(&pid_file));
    let _agent = Agent::start(&collector, id, &token, opts(action("hang", &["sh", "-c", &script], "")));
    collector.wait_for_state(id, "online");

    let bell_id = ring_one(&collector, &[id, "hang"]);
    wait_for_bell(&collector, bell_id, "running");
    let pid = read_pid_file(&pid_file);
    collector.cli_ok(&["cancel", &bell_id.to_string()]);
    let done = wait_for_bell(&collector, bell_id, "cancelled");
    reason(&done);
    assert_eq!(distinct_states(&done), ["queued", "sent", "running", "cancelled"], "{done}");
    wait_for_exit(pid, "the cancelled action's background `sleep 1000`");

    // A final bell cannot be cancelled again.
    let again = collector.cli(&["cancel", &bell_id.to_string()]);
    assert_exit_code(&again, 1, "cancel of a finished bell");
}

/// (7b) `cancel` of a bell still queued for an offline device settles it at
/// once; the agent never runs it.
#[test]
fn cancel_of_a_queued_bell_means_it_never_runs() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-later";
    let token = collector.enroll(id);
    let count = tmp.path().join("count");

    let bell_id = ring_one(&collector, &[id, "mark"]);
    collector.cli_ok(&["cancel", &bell_id.to_string()]);
    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "cancelled", "{shown}");
    reason(&shown);

    let extra = action("mark", &["sh", "-c", &format!("echo run >> {}", p(&count))], "");
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");
    // A later bell on the same connection is a barrier: once it has run,
    // anything delivered on connect would have run before it.
    let (output, _) = ring_wait_one(&collector, &[id, "mark"]);
    assert_exit_code(&output, 0, "a later bell");
    assert_eq!(line_count(&count), 1, "only the later bell may have run");
    let shown = show_bell(&collector, bell_id);
    assert_eq!(transition_states(&shown), ["queued", "cancelled"], "{shown}");
}

/// (8) `--tag` reaches exactly the devices with that tag.
#[test]
fn tag_bell_reaches_exactly_the_tagged_devices() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let mut agents = vec![];
    for (id, tags) in [("pi-a", &["t1"][..]), ("pi-b", &["t2"][..]), ("pi-c", &["x", "t1"][..])] {
        let token = collector.enroll(id);
        agents.push(Agent::start(&collector, id, &token, AgentOpts::default().tags(tags)));
    }
    for id in ["pi-a", "pi-b", "pi-c"] {
        collector.wait_for_state(id, "online");
    }

    let (output, bells) = ring_wait(&collector, &["--tag", "t1", "ping"]);
    assert_exit_code(&output, 0, "ping on tag t1");
    let mut devices: Vec<&str> = bells.iter().map(|b| b["device"].as_str().unwrap_or_default()).collect();
    devices.sort_unstable();
    assert_eq!(devices, ["pi-a", "pi-c"], "bells: {bells:?}");
    for b in &bells {
        assert_eq!(state(b), "succeeded", "{b}");
        assert_eq!(b["action"], "ping", "{b}");
    }
    let output = collector.cli_ok(&["bells", "pi-b", "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("`bells pi-b --json` did not print a JSON array ({e}):\n{}", describe(&output)));
    assert!(listed.is_empty(), "pi-b has no tag t1 but got bells: {listed:?}");

    // Without --wait, one id per bell.
    let ids = ring(&collector, &["--tag", "t1", "ping"]);
    assert_eq!(ids.len(), 2, "{ids:?}");

    // A tag nobody has is an error, not an empty success.
    let output = collector.cli(&["bell", "--tag", "nobody", "ping"]);
    assert_exit_code(&output, 1, "bell on an unknown tag");
}

/// (9) A bell whose TTL passes before the device connects expires, with a
/// reason, and is never run.
#[test]
fn bell_expires_after_its_ttl_and_never_runs() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-away";
    let token = collector.enroll(id);
    let count = tmp.path().join("count");

    let bell_id = ring_one(&collector, &[id, "mark", "--ttl", "1s"]);
    let expired = wait_for_bell(&collector, bell_id, "expired");
    reason(&expired);
    assert_eq!(transition_states(&expired), ["queued", "expired"], "{expired}");

    let extra = action("mark", &["sh", "-c", &format!("echo run >> {}", p(&count))], "");
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");
    // Barrier: a later bell on the same connection.
    let (output, _) = ring_wait_one(&collector, &[id, "mark"]);
    assert_exit_code(&output, 0, "a later bell");
    assert_eq!(line_count(&count), 1, "the expired bell must not have run");
    let shown = show_bell(&collector, bell_id);
    assert_eq!(transition_states(&shown), ["queued", "expired"], "{shown}");
}

/// (9b) The TTL of a queued bell still runs out after a collector
/// `kill -9` and restart.
#[test]
fn bell_ttl_survives_a_collector_restart() {
    let tmp = tempdir();
    let mut collector = Collector::start(tmp.path());
    let id = "pi-gone";
    collector.enroll(id);

    let bell_id = ring_one(&collector, &[id, "mark", "--ttl", "2s"]);
    collector.kill9();
    collector.restart();
    let expired = wait_for_bell(&collector, bell_id, "expired");
    reason(&expired);
    assert_eq!(transition_states(&expired), ["queued", "expired"], "{expired}");
}

/// (10) A `reboots` action stays running until the agent comes back with a
/// new boot id, then succeeds exactly once.
#[test]
fn reboot_action_succeeds_once_the_agent_starts_on_a_new_boot_id() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-reboot";
    let token = collector.enroll(id);
    let root = tmp.path().join("fake-root");
    let boot_1 = "11111111-1111-4111-8111-111111111111";
    let boot_2 = "22222222-2222-4222-8222-222222222222";
    set_boot_id(&root, boot_1);
    let extra =
        format!("root = {}\n", toml_str(&p(&root))) + &action("reboot", &["true"], "reboots = true\ntimeout = \"2m\"");
    let mut agent = Agent::start(&collector, id, &token, opts(extra));
    let d = collector.wait_for_state(id, "online");
    assert_eq!(d["boot_id"], boot_1, "the agent should read the fake boot id: {d}");

    let bell_id = ring_one(&collector, &[id, "reboot"]);
    wait_for_bell(&collector, bell_id, "running");
    // The command has run; on the same boot that is not success yet.
    agent.wait_for_log(&["reboot requested"], BELL_TIMEOUT);
    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "running", "a reboot is not done before a new boot id: {shown}");

    // Same boot id after an agent restart: re-delivered, still not done.
    agent.stop();
    agent.restart();
    collector.wait_for_state(id, "online");
    let barrier = ring_wait_one(&collector, &[id, "ping"]);
    assert_exit_code(&barrier.0, 0, "ping after the restart");
    let shown = show_bell(&collector, bell_id);
    assert_eq!(state(&shown), "running", "same boot id after a restart is not a reboot: {shown}");

    // "Reboot": a new boot id.
    agent.stop();
    set_boot_id(&root, boot_2);
    agent.restart();
    let done = wait_for_bell(&collector, bell_id, "succeeded");
    let states = transition_states(&done);
    assert_eq!(states.iter().filter(|s| *s == "succeeded").count(), 1, "{done}");
    assert_eq!(distinct_states(&done), ["queued", "sent", "running", "succeeded"], "{done}");
    let d = collector.wait_for_device(id, "to report the new boot id", STATE_TIMEOUT, |d| {
        if d["boot_id"] == boot_2 {
            Ok(())
        } else {
            Err(format!("boot_id {}", d["boot_id"]))
        }
    });
    assert_eq!(d["state"], "online", "{d}");

    // Restarting again on the new boot changes nothing.
    agent.stop();
    agent.restart();
    collector.wait_for_state(id, "online");
    let barrier = ring_wait_one(&collector, &[id, "ping"]);
    assert_exit_code(&barrier.0, 0, "ping after another restart");
    let shown = show_bell(&collector, bell_id);
    assert_eq!(transition_states(&shown), states, "a final bell must not change: {shown}");
}

/// (10b) A `reboots` action fails when the boot id has not changed by the
/// end of its timeout.
#[test]
fn reboot_action_fails_when_the_boot_id_does_not_change_in_time() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-stuck";
    let token = collector.enroll(id);
    let root = tmp.path().join("fake-root");
    set_boot_id(&root, "33333333-3333-4333-8333-333333333333");
    let extra = format!("root = {}\n", toml_str(&p(&root))) + &action("reboot", &["true"], "reboots = true");
    let _agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");

    let (output, bell) = ring_wait_one(&collector, &[id, "reboot", "--timeout", "1s"]);
    assert_exit_code(&output, 1, "a reboot that never happened");
    assert_eq!(state(&bell), "failed", "{bell}");
    assert!(reason(&bell).contains("boot"), "the reason should say the board did not reboot: {bell}");
}

/// (10c) A disruptive action is rejected while the agent's maintenance lock
/// file exists, and runs once it is gone.
#[test]
fn disruptive_action_is_rejected_while_the_maintenance_lock_exists() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-locked";
    let token = collector.enroll(id);
    let marker = tmp.path().join("restarted");
    let extra =
        action("restart-app", &["touch", &p(&marker)], "disruptive = true") + &action("harmless", &["true"], "");
    let agent = Agent::start(&collector, id, &token, opts(extra));
    collector.wait_for_state(id, "online");
    let lock: PathBuf = agent.dir().join("state").join("maintenance.lock");
    fs::write(&lock, b"").expect("create the maintenance lock");

    let (output, bell) = ring_wait_one(&collector, &[id, "restart-app"]);
    assert_exit_code(&output, 1, "a disruptive bell under the maintenance lock");
    assert_eq!(state(&bell), "rejected", "{bell}");
    assert!(reason(&bell).contains("maintenance lock"), "{bell}");
    assert!(!marker.exists(), "a disruptive action ran under the maintenance lock");

    // The lock holds off only disruptive actions.
    let (output, _) = ring_wait_one(&collector, &[id, "harmless"]);
    assert_exit_code(&output, 0, "a non-disruptive action under the lock");

    fs::remove_file(&lock).expect("remove the maintenance lock");
    let (output, bell) = ring_wait_one(&collector, &[id, "restart-app"]);
    assert_exit_code(&output, 0, "the disruptive action without the lock");
    assert_eq!(state(&bell), "succeeded", "{bell}");
    assert!(marker.exists(), "the disruptive action did not run after the lock was removed");
}
