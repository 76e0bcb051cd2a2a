//! Application checks end to end: a real agent runs `unit`, `command`,
//! `http`, `tcp` and `process` checks against things the test controls, and
//! their states reach `status`, `show --json`, `checks`, `/metrics` and the
//! event log; agents of protocol version 1 keep working against this
//! collector.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use futures_util::SinkExt;
use pulsebell_proto::{close, AgentMsg, CheckDigest, CheckReport, Health, Pulse, ServerMsg};
use pulsebell_tests::http::admin_get;
use pulsebell_tests::raw::{self, block_on, Endpoint, Incoming};
use pulsebell_tests::serde_json::{self, Value};
use pulsebell_tests::{toml_str, wait_until, Agent, AgentOpts, Collector, STATE_TIMEOUT};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-checks-").tempdir().expect("create temp dir")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn write_script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// The device's checks from `show --json`, by name: (kind, status, summary, output).
fn checks_of(collector: &Collector, id: &str) -> Vec<(String, String, String, String, String)> {
    let show = collector.show(id);
    let checks = show["checks"].as_array().unwrap_or_else(|| panic!("no `checks` array in {show}"));
    checks
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("`{k}` is not a string in {c}")).to_string();
            assert!(pulsebell_tests::parse_time(&c["since"]).is_ok(), "since is RFC 3339 in {c}");
            (s("name"), s("kind"), s("status"), s("summary"), s("output"))
        })
        .collect()
}

fn status_of(collector: &Collector, id: &str, check: &str) -> Result<String, String> {
    checks_of(collector, id)
        .into_iter()
        .find(|c| c.0 == check)
        .map(|c| c.2)
        .ok_or_else(|| format!("no check `{check}` yet"))
}

fn wait_check(collector: &Collector, id: &str, check: &str, want: &str) {
    wait_until(&format!("check {check} of {id} {want}"), STATE_TIMEOUT, || match status_of(collector, id, check)? {
        s if s == want => Ok(()),
        s => Err(format!("{check} is {s}")),
    });
}

/// Serves `HTTP/1.1 200` to every request on a thread, for the `http` check.
fn health_endpoint() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind health endpoint");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

#[test]
fn checks_reach_status_show_checks_metrics_and_events() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let token = collector.enroll("kiosk-1");

    // The "app": its Nagios-style check exits with the code in a file.
    let app_state = tmp.path().join("app-state");
    fs::write(&app_state, "0").unwrap();
    let check_app = tmp.path().join("check_app");
    write_script(
        &check_app,
        &format!("code=$(cat {})\necho \"app says $code\"\necho \"detail line\"\nexit $code", app_state.display()),
    );
    // A fake systemctl first on PATH, printing the unit's state from a file.
    let unit_state = tmp.path().join("unit-state");
    fs::write(&unit_state, "active\n").unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    write_script(&bin.join("systemctl"), &format!("cat {}", unit_state.display()));
    let http_port = health_endpoint();
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp port");
    let tcp_port = tcp.local_addr().unwrap().port();

    let extra = format!(
        r#"
[checks.app]
command = [{app}]
interval = "1s"
[checks.svc]
unit = "app.service"
interval = "1s"
[checks.web]
http = "http://127.0.0.1:{http_port}/health"
interval = "1s"
[checks.port]
tcp = "127.0.0.1:{tcp_port}"
interval = "1s"
[checks.agent]
process = "pulsebell-agent"
interval = "1s"
"#,
        app = toml_str(&check_app.to_string_lossy()),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let opts = AgentOpts {
        interval: Duration::from_millis(500),
        extra_toml: extra,
        env: vec![("PATH".into(), path)],
        ..AgentOpts::default()
    };
    let agent = Agent::start(&collector, "kiosk-1", &token, opts);

    // Every check arrives, OK.
    let all_ok = wait_until("five checks, all OK", STATE_TIMEOUT, || {
        let checks = checks_of(&collector, "kiosk-1");
        match checks.iter().filter(|c| c.2 == "ok").count() {
            5 => Ok(checks),
            _ => Err(format!("{checks:?}")),
        }
    });
    let kinds: Vec<(&str, &str)> = all_ok.iter().map(|c| (c.0.as_str(), c.1.as_str())).collect();
    assert_eq!(kinds, [("agent", "process"), ("app", "command"), ("port", "tcp"), ("svc", "unit"), ("web", "http")]);
    assert_eq!(all_ok[1].3, "app says 0", "a command's summary is its first line");
    let status = String::from_utf8_lossy(&collector.cli_ok(&["status"]).stdout).into_owned();
    let header = status.lines().next().unwrap_or_default();
    assert!(header.contains("CHECKS"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("kiosk-1") && l.contains("5 ok")), "{status}");

    // The app fails: CRITICAL everywhere an operator looks.
    fs::write(&app_state, "2").unwrap();
    wait_check(&collector, "kiosk-1", "app", "critical");
    let app = checks_of(&collector, "kiosk-1").into_iter().find(|c| c.0 == "app").unwrap();
    assert_eq!(app.3, "app says 2");
    assert!(app.4.contains("detail line"), "output tail in {app:?}");
    let status = String::from_utf8_lossy(&collector.cli_ok(&["status"]).stdout).into_owned();
    assert!(status.lines().any(|l| l.starts_with("kiosk-1") && l.contains("1 crit")), "{status}");
    let crit: Value = serde_json::from_slice(&collector.cli_ok(&["checks", "--status", "crit", "--json"]).stdout)
        .expect("checks --json is JSON");
    let crit = crit.as_array().expect("an array");
    assert_eq!(crit.len(), 1, "{crit:?}");
    assert_eq!((crit[0]["device"].as_str(), crit[0]["name"].as_str()), (Some("kiosk-1"), Some("app")));
    for key in ["kind", "status", "summary", "since", "output"] {
        assert!(crit[0][key].is_string(), "`{key}` in {}", crit[0]);
    }
    let mine: Value = serde_json::from_slice(&collector.cli_ok(&["checks", "kiosk-1", "--json"]).stdout).unwrap();
    assert_eq!(mine.as_array().map(Vec::len), Some(5));
    let table = String::from_utf8_lossy(&collector.cli_ok(&["checks"]).stdout).into_owned();
    assert!(table.lines().any(|l| l.contains("kiosk-1") && l.contains("app") && l.contains("CRITICAL")), "{table}");
    let bad = collector.cli(&["checks", "--status", "sideways"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--status"), "{bad:?}");

    let metrics = admin_get(&collector, "/metrics").text();
    let value = |check: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("pulsebell_check_status{")
                    && l.contains("device=\"kiosk-1\"")
                    && l.contains(&format!("check=\"{check}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(value("app"), Some(2.0), "{metrics}");
    assert_eq!(value("web"), Some(0.0), "{metrics}");

    // The unit fails too; then the app recovers.
    fs::write(&unit_state, "failed\n").unwrap();
    wait_check(&collector, "kiosk-1", "svc", "critical");
    fs::write(&app_state, "0").unwrap();
    wait_check(&collector, "kiosk-1", "app", "ok");

    let events: Value = serde_json::from_slice(&collector.cli_ok(&["events", "kiosk-1", "--json"]).stdout).unwrap();
    let check_events: Vec<(String, String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["check"].is_object())
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (s(&e["kind"]), s(&e["check"]["name"]), s(&e["check"]["status"]))
        })
        .collect();
    let has =
        |kind: &str, name: &str, status: &str| check_events.iter().any(|e| e.0 == kind && e.1 == name && e.2 == status);
    assert!(has("check_failed", "app", "critical"), "{check_events:?}");
    assert!(has("check_failed", "svc", "critical"), "{check_events:?}");
    assert!(has("check_recovered", "app", "ok"), "{check_events:?}");
    assert!(!check_events.iter().any(|e| e.1 == "web"), "an OK check from the start is no event: {check_events:?}");
    drop(agent);
    drop(tcp);
}

#[test]
fn an_agent_of_protocol_version_1_still_works() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let token = collector.enroll("old-1");
    let ep = Endpoint::of(&collector);
    block_on(async {
        // Offers only version 1, as agents before checks did.
        let (mut ws, resp) = raw::upgrade_offering(&ep, Some(&bearer(&token)), "pulsebell.v1").await.expect("upgrade");
        let proto = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
        assert_eq!(proto, Some("pulsebell.v1"));
        let hello = pulsebell_proto::Hello { protocol_version: 1, ..raw::hello("old-1", 1000, &["v1"]) };
        raw::send(&mut ws, &AgentMsg::Hello(hello)).await;
        match raw::recv(&mut ws).await {
            Incoming::Msg(ServerMsg::Welcome(w)) => assert_eq!(w.protocol_version, 1, "{w:?}"),
            other => panic!("expected a Welcome, got {other:?}"),
        }
        let health = Health { cpu_permille: 123, mem_total_kib: 1000, ..Health::default() };
        raw::send(&mut ws, &AgentMsg::Pulse(Pulse { seq: 1, health })).await;
        wait_until("old-1 online with its pulse", STATE_TIMEOUT, || {
            let d = collector.show("old-1");
            match (d["state"].as_str(), d["health"]["cpu_percent"].as_f64()) {
                (Some("online"), Some(cpu)) if (cpu - 12.3).abs() < 1e-9 => Ok(d),
                _ => Err(format!("{d}")),
            }
        });
        assert_eq!(collector.show("old-1")["checks"], Value::Array(vec![]));
        // A version-2 message on a version-1 connection ends it, clearly.
        raw::send(&mut ws, &AgentMsg::Checks(CheckReport { full: true, results: vec![] })).await;
        match raw::recv(&mut ws).await {
            Incoming::Close(Some((code, reason))) => {
                assert_eq!(code, close::PROTOCOL, "{reason}");
                assert!(reason.contains("version 2"), "{reason}");
            }
            other => panic!("expected a close, got {other:?}"),
        }

        // Offered both, the collector picks version 2; a Hello then claiming
        // version 1 contradicts the connection.
        let (mut ws, resp) =
            raw::upgrade_offering(&ep, Some(&bearer(&token)), "pulsebell.v2, pulsebell.v1").await.expect("upgrade");
        let proto = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
        assert_eq!(proto, Some("pulsebell.v2"));
        let hello = pulsebell_proto::Hello { protocol_version: 1, ..raw::hello("old-1", 1000, &[]) };
        raw::send(&mut ws, &AgentMsg::Hello(hello)).await;
        match raw::recv(&mut ws).await {
            Incoming::Close(Some((code, reason))) => assert_eq!(code, close::VERSION_MISMATCH, "{reason}"),
            other => panic!("expected a close, got {other:?}"),
        }
        // No version it speaks: refused before the upgrade.
        match raw::upgrade_offering(&ep, Some(&bearer(&token)), "pulsebell.v9").await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 400),
            Err(e) => panic!("expected HTTP 400, got {e}"),
            Ok(_) => panic!("expected HTTP 400, got an upgrade"),
        }
    });
}

/// A pulse whose digest disagrees with what the collector holds makes it
/// ask for every check again; a full report settles it.
#[test]
fn a_digest_that_disagrees_asks_for_the_checks_again() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let token = collector.enroll("pi-d");
    let ep = Endpoint::of(&collector);
    block_on(async {
        let (mut ws, _) = raw::upgrade(&ep, Some(&bearer(&token))).await.expect("upgrade");
        raw::send(&mut ws, &AgentMsg::Hello(raw::hello("pi-d", 1000, &[]))).await;
        assert!(matches!(raw::recv(&mut ws).await, Incoming::Msg(ServerMsg::Welcome(_))));
        let one_ok = CheckDigest { ok: 1, ..CheckDigest::default() };
        let pulse = |seq| AgentMsg::CheckedPulse(Pulse { seq, health: Health::default() }, one_ok);
        raw::send(&mut ws, &pulse(1)).await;
        match raw::recv(&mut ws).await {
            Incoming::Msg(ServerMsg::ResendChecks) => {}
            other => panic!("expected ResendChecks, got {other:?}"),
        }
        let check = pulsebell_proto::CheckResult {
            name: "app".into(),
            kind: pulsebell_proto::CheckKind::Tcp,
            status: pulsebell_proto::CheckStatus::Ok,
            summary: "connected".into(),
            output: String::new(),
            since_ms: 1_764_500_000_000,
        };
        raw::send(&mut ws, &AgentMsg::Checks(CheckReport { full: true, results: vec![check] })).await;
        raw::send(&mut ws, &pulse(2)).await;
        wait_until("pi-d's check and second pulse", STATE_TIMEOUT, || {
            let d = collector.show("pi-d");
            match (d["checks"][0]["name"].as_str(), d["link"]["missed_pulses"].as_u64(), d["state"].as_str()) {
                (Some("app"), Some(0), Some("online")) => Ok(()),
                _ => Err(format!("{d}")),
            }
        });
        // Settled: another pulse asks nothing; the next thing to arrive is
        // the answer to our close.
        raw::send(&mut ws, &pulse(3)).await;
        ws.send(Message::Close(None)).await.expect("send close");
        match raw::recv(&mut ws).await {
            Incoming::Close(_) | Incoming::Ended(_) => {}
            Incoming::Msg(m) => panic!("expected nothing more, got {m:?}"),
        }
    });
}

/// `rules --json`, parsed.
fn rules_of(collector: &Collector) -> Vec<Value> {
    let out = collector.cli_ok(&["rules", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("rules --json is JSON");
    v.as_array().expect("an array").clone()
}

fn lines_in(path: &Path) -> usize {
    fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// A kiosk whose "app" check exits with the code in `state`, and whose
/// `restart-app` action sets it back to 0 and counts its runs in `runs`.
fn kiosk(collector: &Collector, dir: &Path, id: &str) -> (Agent, std::path::PathBuf, std::path::PathBuf) {
    let state = dir.join(format!("{id}-state"));
    let runs = dir.join(format!("{id}-runs"));
    fs::write(&state, "0").unwrap();
    let check = dir.join(format!("{id}-check"));
    write_script(&check, &format!("code=$(cat {s})\necho \"app exit $code\"\nexit $code", s = state.display()));
    let restart = dir.join(format!("{id}-restart"));
    write_script(&restart, &format!("echo 0 > {s}\necho ran >> {r}", s = state.display(), r = runs.display()));
    let extra = format!(
        "[checks.app]\ncommand = [{}]\ninterval = \"500ms\"\n[actions.restart-app]\ncommand = [{}]\n",
        toml_str(&check.to_string_lossy()),
        toml_str(&restart.to_string_lossy())
    );
    let token = collector.enroll(id);
    let opts = AgentOpts { extra_toml: extra, ..AgentOpts::default() }.tags(&["kiosk"]);
    (Agent::start(collector, id, &token, opts), state, runs)
}

#[test]
fn a_rule_restarts_a_failing_app_once_within_its_cooldown_and_its_ceiling_holds() {
    let tmp = tempdir();
    let config = r#"
[[rules]]
name = "restart-app"
when = { check = "app", status = "critical", for = "1s" }
ring = { action = "restart-app" }
tags = ["kiosk"]
cooldown = "1h"
max_per_hour = 1
"#;
    let mut collector = Collector::start_with_config(tmp.path(), config);
    let (_a1, state1, runs1) = kiosk(&collector, tmp.path(), "kiosk-1");
    let (_a2, state2, runs2) = kiosk(&collector, tmp.path(), "kiosk-2");
    wait_check(&collector, "kiosk-1", "app", "ok");
    wait_check(&collector, "kiosk-2", "app", "ok");
    let rules = rules_of(&collector);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["name"], "restart-app");
    assert!(rules[0]["last_fired"].is_null(), "{rules:?}");

    // kiosk-1's app fails: the rule restarts it, once, and the check recovers.
    fs::write(&state1, "2").unwrap();
    wait_until("the rule's restart on kiosk-1", STATE_TIMEOUT, || match lines_in(&runs1) {
        1 => Ok(()),
        n => Err(format!("{n} runs")),
    });
    wait_check(&collector, "kiosk-1", "app", "ok");
    let bells: Value = serde_json::from_slice(&collector.cli_ok(&["bells", "--json"]).stdout).unwrap();
    let bells = bells.as_array().unwrap();
    assert_eq!(bells.len(), 1, "{bells:?}");
    assert_eq!(bells[0]["origin"], "rule:restart-app");
    assert_eq!(bells[0]["device"], "kiosk-1");
    assert_eq!(bells[0]["action"], "restart-app");
    let bell_id = bells[0]["id"].as_u64().unwrap();
    let shown: Value =
        serde_json::from_slice(&collector.cli_ok(&["bell-show", &bell_id.to_string(), "--json"]).stdout).unwrap();
    assert_eq!(shown["origin"], "rule:restart-app");
    let table = String::from_utf8_lossy(&collector.cli_ok(&["bells"]).stdout).into_owned();
    assert!(table.contains("rule:restart-app"), "{table}");

    // kiosk-2 fails: the rule has rung its one bell this hour.
    fs::write(&state2, "2").unwrap();
    wait_check(&collector, "kiosk-2", "app", "critical");
    wait_until("the ceiling holding kiosk-2 back", STATE_TIMEOUT, || {
        let r = &rules_of(&collector)[0];
        match r["held_back"]["ceiling"].as_u64() {
            Some(n) if n >= 1 => Ok(()),
            _ => Err(format!("{r}")),
        }
    });
    // kiosk-1 fails again within the cooldown: held back too.
    fs::write(&state1, "2").unwrap();
    wait_until("the cooldown holding kiosk-1 back", STATE_TIMEOUT, || {
        let r = &rules_of(&collector)[0];
        match r["held_back"]["cooldown"].as_u64() {
            Some(n) if n >= 1 => Ok(r.clone()),
            _ => Err(format!("{r}")),
        }
    });
    let r = &rules_of(&collector)[0];
    assert_eq!(r["fired_last_hour"], 1, "{r}");
    assert_eq!(r["last_fired"]["device"], "kiosk-1", "{r}");
    assert_eq!((lines_in(&runs1), lines_in(&runs2)), (1, 0), "exactly one restart");
    let text = String::from_utf8_lossy(&collector.cli_ok(&["rules"]).stdout).into_owned();
    assert!(text.contains("restart-app") && text.contains("by cooldown"), "{text}");

    // After a restart the rule remembers its bell: cooldown and ceiling hold.
    collector.restart();
    let r = rules_of(&collector).remove(0);
    assert_eq!(r["fired_last_hour"], 1, "{r}");
    assert_eq!(r["last_fired"]["bell"], bell_id, "{r}");
    assert_eq!((lines_in(&runs1), lines_in(&runs2)), (1, 0));
}

/// A new agent against a collector that speaks only version 1 (as the
/// previous release, here one pinned with `[limits] max_protocol_version`):
/// it falls back, pulses as before, and says in its log that the collector
/// needs upgrading for its checks.
#[test]
fn a_new_agent_falls_back_to_a_collector_of_version_1_and_says_so() {
    let tmp = tempdir();
    let collector = Collector::start_with_config(tmp.path(), "[limits]\nmax_protocol_version = 1\n");
    let token = collector.enroll("new-1");
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let extra = format!("[checks.port]\ntcp = \"{}\"\ninterval = \"1s\"\n", tcp.local_addr().unwrap());
    let agent = Agent::start(&collector, "new-1", &token, AgentOpts { extra_toml: extra, ..AgentOpts::default() });
    let d = collector.wait_for_online_with_health("new-1");
    assert_eq!(d["agent_version"], env!("CARGO_PKG_VERSION"));
    let line = agent.wait_for_log(&["older protocol"], STATE_TIMEOUT);
    assert!(line.contains("upgrade the collectors first") && line.contains("version=1"), "{line}");
    // Pulses keep coming; no checks reach a version-1 collector.
    let seq = |d: &Value| d["link"]["missed_pulses"].as_u64();
    wait_until("a few more pulses", STATE_TIMEOUT, || {
        let now = collector.show("new-1");
        match (now["state"].as_str(), seq(&now)) {
            (Some("online"), Some(0)) if now["last_seen"] != d["last_seen"] => Ok(()),
            _ => Err(format!("{now}")),
        }
    });
    assert_eq!(collector.show("new-1")["checks"], Value::Array(vec![]));
    drop(tcp);
}

/// `retries = 2`: one failing result between good ones changes nothing,
/// while the same flap with `retries = 1` is a failure and a recovery.
#[test]
fn retries_damp_a_single_failure() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let token = collector.enroll("flappy");
    // Each check counts its runs; its third run fails, the others pass.
    let script = |name: &str| {
        let runs = tmp.path().join(format!("{name}-runs"));
        let path = tmp.path().join(format!("{name}-check"));
        write_script(
            &path,
            &format!(
                "echo run >> {r}\nn=$(wc -l < {r})\nif [ \"$n\" -eq 3 ]; then echo \"run $n fails\"; exit 2; fi\necho \"run $n\"",
                r = runs.display()
            ),
        );
        (path, runs)
    };
    let (damped, damped_runs) = script("damped");
    let (plain, plain_runs) = script("plain");
    let extra = format!(
        "[checks.damped]\ncommand = [{}]\ninterval = \"300ms\"\nretries = 2\n\
         [checks.plain]\ncommand = [{}]\ninterval = \"300ms\"\n",
        toml_str(&damped.to_string_lossy()),
        toml_str(&plain.to_string_lossy())
    );
    let _agent = Agent::start(&collector, "flappy", &token, AgentOpts { extra_toml: extra, ..AgentOpts::default() });
    wait_until("both checks past their failing run", STATE_TIMEOUT, || {
        match (lines_in(&damped_runs), lines_in(&plain_runs)) {
            (d, p) if d >= 6 && p >= 6 => Ok(()),
            other => Err(format!("runs {other:?}")),
        }
    });
    wait_check(&collector, "flappy", "plain", "ok");
    let events: Value = serde_json::from_slice(&collector.cli_ok(&["events", "flappy", "--json"]).stdout).unwrap();
    let changes = |name: &str| -> Vec<String> {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["check"]["name"] == name)
            .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(changes("plain"), ["check_failed", "check_recovered"], "{events}");
    assert!(changes("damped").is_empty(), "a single failure is damped: {events}");
    assert_eq!(status_of(&collector, "flappy", "damped").unwrap(), "ok");
}
