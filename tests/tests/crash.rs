//! Crash safety: `kill -9` of the collector while agents pulse and bells are
//! in flight, then a restart on the same data directory.
//!
//! What must hold (README, "Durability"): enrolments and bells are on disk
//! before the CLI prints them, so none is lost; pulse-only state is written
//! back at most `sync_interval` + `write_back` after it arrived, so
//! `last_seen` loses at most that window; bells that were running are finished after the agents
//! reconnect, answered from the agents' journals, never run twice.
//!
//! Agents keep one `collector_url` across the restart (which changes the
//! device port) through a TCP forwarder; it holds new connections while the
//! collector is down, so the restored state can be inspected before any
//! agent reconnects.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use pulsebell_tests::serde_json::{self, Value};
use pulsebell_tests::{
    describe, find_device, parse_time, toml_str, wait_until, Agent, AgentOpts, Collector, Forwarder,
};
use tempfile::TempDir;

/// How long a bell may take to reach a final state after reconnecting.
const BELL_TIMEOUT: Duration = Duration::from_secs(45);
/// The documented write-back window (set explicitly in the config).
const WRITE_BACK: Duration = Duration::from_secs(1);
/// How old a record whose only news is pulses may get (set explicitly; 30 s
/// by default). Shorter than the test's pulsing, so the bound is exercised.
const SYNC: Duration = Duration::from_secs(2);
/// Allowance on top of it for scheduling and the gap between the last
/// observation and the kill.
const WRITE_BACK_SLACK: Duration = Duration::from_millis(500);
const INTERVAL: Duration = Duration::from_millis(300);
const FINAL: &[&str] = &["succeeded", "failed", "timed_out", "rejected", "cancelled", "expired"];

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-crash-").tempdir().expect("create temp dir")
}

/// An agent config with the `slow` action: it appends its `n` parameter to
/// `runs`, sleeps 1 s and prints `done`.
fn slow_action(runs: &Path) -> String {
    let script = format!("echo \"$PULSEBELL_PARAM_N\" >> {}; sleep 1; echo done", runs.display());
    format!("\n[actions.slow]\ncommand = [\"sh\", \"-c\", {}]\nparams = [\"n\"]\n", toml_str(&script))
}

/// `bell DEVICE slow --param n=N`; returns the printed id.
fn ring(collector: &Collector, device: &str, n: &str) -> u64 {
    let output = collector.cli_ok(&["bell", device, "slow", "--param", &format!("n={n}")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ids: Vec<&str> = stdout.split_whitespace().collect();
    match ids.as_slice() {
        [id] => id.parse().unwrap_or_else(|_| panic!("`bell` printed `{id}`, not an id:\n{}", describe(&output))),
        _ => panic!("`bell` should print one id:\n{}", describe(&output)),
    }
}

fn try_bell(collector: &Collector, id: u64) -> Result<Value, String> {
    let output = collector.cli(&["bell-show", &id.to_string(), "--json"]);
    if !output.status.success() {
        return Err(format!("`bell-show {id} --json` failed:\n{}", describe(&output)));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("`bell-show {id}` is not JSON ({e})"))
}

fn bell_state(bell: &Value) -> String {
    bell["state"].as_str().unwrap_or_else(|| panic!("bell without a state: {bell}")).to_string()
}

/// Lines of `path` (none if it does not exist).
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}

struct Bell {
    id: u64,
    device: String,
    n: String,
}

#[test]
fn kill9_with_pulses_and_bells_in_flight_loses_nothing_and_runs_nothing_twice() {
    let tmp = tempdir();
    let mut collector = Collector::start_with_config(
        tmp.path(),
        &format!("write_back = \"{}ms\"\nsync_interval = \"{}ms\"\n", WRITE_BACK.as_millis(), SYNC.as_millis()),
    );
    let forwarder = Forwarder::start(collector.device_addr(), Duration::from_secs(60));
    let online = ["crash-1", "crash-2", "crash-3"];
    let offline = "crash-offline";
    let mut tokens = BTreeMap::new();
    for id in online.iter().chain([&offline]) {
        tokens.insert(id.to_string(), collector.enroll(id));
    }
    let runs = |id: &str| tmp.path().join(format!("runs-{id}"));
    let mut agents = vec![];
    for id in online {
        let opts = AgentOpts {
            interval: INTERVAL,
            collector_url: Some(forwarder.url()),
            extra_toml: slow_action(&runs(id)),
            ..AgentOpts::default()
        };
        agents.push(Agent::start(&collector, id, &tokens[id], opts));
    }
    // Pulse for twice the window (sync interval + write-back) first, so
    // pulse state older than the window exists when the collector is killed.
    for id in online {
        let first = collector.wait_for_online_with_health(id);
        let t_first = parse_time(&first["last_seen"]).unwrap_or_else(|e| panic!("last_seen: {e}; {first}"));
        collector.wait_for_device(id, "to pulse for twice the window", BELL_TIMEOUT, |d| {
            let t = parse_time(&d["last_seen"])?;
            if d["state"] == "online" && t - t_first >= (SYNC + WRITE_BACK) * 2 {
                Ok(())
            } else {
                Err(format!("pulsing for {}", t - t_first))
            }
        });
    }

    // Bells: two per online device, then (once some run) one more each while
    // the others are running, and two queued for the device that is offline.
    let mut bells: Vec<Bell> = vec![];
    let ring_as = |bells: &mut Vec<Bell>, collector: &Collector, device: &str, n: String| {
        let id = ring(collector, device, &n);
        bells.push(Bell { id, device: device.to_string(), n });
    };
    for id in online {
        for k in ["a", "b"] {
            ring_as(&mut bells, &collector, id, format!("{id}-{k}"));
        }
    }
    for k in ["a", "b"] {
        ring_as(&mut bells, &collector, offline, format!("{offline}-{k}"));
    }
    wait_until("a bell to be running", BELL_TIMEOUT, || {
        let b = try_bell(&collector, bells[0].id)?;
        match bell_state(&b).as_str() {
            "running" => Ok(()),
            s if FINAL.contains(&s) => panic!("bell ended `{s}` before the kill: {b}"),
            s => Err(format!("state `{s}`")),
        }
    });
    for id in online {
        ring_as(&mut bells, &collector, id, format!("{id}-c"));
    }

    // The newest last_seen per device, then kill -9 at once.
    let before = collector.status();
    let kill_at = time::OffsetDateTime::now_utc();
    forwarder.set_target(None);
    collector.kill9();
    let seen_before: BTreeMap<&str, time::OffsetDateTime> = online
        .iter()
        .map(|id| {
            let d = find_device(&before, id).unwrap_or_else(|| panic!("`{id}` not listed: {before:?}"));
            (*id, parse_time(&d["last_seen"]).unwrap_or_else(|e| panic!("last_seen of `{id}`: {e}; {d}")))
        })
        .collect();
    let states_before: Vec<String> = bells.iter().map(|b| format!("{}:{}", b.id, b.n)).collect();
    eprintln!("killed with {} bells rung: {states_before:?}", bells.len());

    collector.restart();

    // Before any agent is let back in: every enrolment, every bell, pulse
    // state within the write-back window.
    let after = collector.status();
    for id in online.iter().chain([&offline]) {
        let d = find_device(&after, id).unwrap_or_else(|| panic!("enrolment of `{id}` lost by kill -9: {after:?}"));
        assert_ne!(d["state"], "online", "`{id}` must not be online before it reconnects: {d}");
    }
    for id in online {
        let d = find_device(&after, id).expect("listed");
        let restored = parse_time(&d["last_seen"]).unwrap_or_else(|e| panic!("last_seen of `{id}` after kill -9: {e}"));
        let observed = seen_before[id];
        let lost = observed - restored;
        eprintln!("`{id}`: last_seen observed before the kill {observed}, restored {restored} (lost {lost})");
        assert!(
            restored >= observed - (SYNC + WRITE_BACK + WRITE_BACK_SLACK),
            "`{id}`: last_seen restored after kill -9 is {restored}, but {observed} had been observed before it: \
             more than the {SYNC:?} sync interval + {WRITE_BACK:?} write-back (+{WRITE_BACK_SLACK:?}) was lost"
        );
        assert!(restored <= kill_at + time::Duration::milliseconds(100), "`{id}`: last_seen {restored} after the kill");
        assert!(d["health"].is_object(), "health of `{id}` lost: {d}");
    }
    let mut restored_states = BTreeMap::new();
    for b in &bells {
        let shown =
            try_bell(&collector, b.id).unwrap_or_else(|e| panic!("bell {} ({}) lost by kill -9: {e}", b.id, b.n));
        assert_eq!(shown["device"], b.device.as_str(), "{shown}");
        assert_eq!(shown["action"], "slow", "{shown}");
        assert_eq!(shown["params"]["n"], b.n.as_str(), "{shown}");
        *restored_states.entry(bell_state(&shown)).or_insert(0) += 1;
        if b.device == offline {
            assert_eq!(bell_state(&shown), "queued", "a bell for an offline device: {shown}");
        }
    }
    eprintln!("bell states after restart: {restored_states:?}");

    // Let the agents back in: every bell they had ends succeeded.
    forwarder.set_target(Some(collector.device_addr()));
    for id in online {
        collector.wait_for_state(id, "online");
    }
    let opts = AgentOpts { interval: INTERVAL, extra_toml: slow_action(&runs(offline)), ..AgentOpts::default() };
    agents.push(Agent::start(&collector, offline, &tokens[offline], opts));
    for b in &bells {
        let done = wait_until(&format!("bell {} ({}) to end", b.id, b.n), BELL_TIMEOUT, || {
            let shown = try_bell(&collector, b.id)?;
            if FINAL.contains(&bell_state(&shown).as_str()) {
                Ok(shown)
            } else {
                Err(format!("state `{}`", bell_state(&shown)))
            }
        });
        assert_eq!(bell_state(&done), "succeeded", "bell {} ({}) after the crash: {done}", b.id, b.n);
        assert_eq!(done["output"], "done\n", "{done}");
        let finals = done["transitions"]
            .as_array()
            .unwrap_or_else(|| panic!("no transitions: {done}"))
            .iter()
            .filter(|t| t["state"].as_str().is_some_and(|s| FINAL.contains(&s)))
            .count();
        assert_eq!(finals, 1, "bell {} must reach one final state once: {done}", b.id);
    }
    for id in online.iter().chain([&offline]) {
        let ran = lines(&runs(id));
        for b in bells.iter().filter(|b| b.device == *id) {
            let times = ran.iter().filter(|l| **l == b.n).count();
            assert_eq!(times, 1, "bell {} ({}) must have run exactly once on `{id}`; runs: {ran:?}", b.id, b.n);
        }
        assert_eq!(ran.len(), bells.iter().filter(|b| b.device == *id).count(), "runs on `{id}`: {ran:?}");
    }
    drop(agents);
}
