//! End-to-end tests: the real collector and agent binaries, over TLS.
//!
//! Every test has its own temporary directory, collector and ports, so they
//! run in parallel. Waiting is done on events (a log line, a process exit) or
//! by polling `status --json` with [`wait_until`]; never by a fixed sleep.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use pulsebell_proto::{close, AgentMsg, Health, Pulse, ServerMsg, Throttled, PROTOCOL_VERSION, SUBPROTOCOL};
use pulsebell_tests::raw::{self, block_on, Endpoint, Incoming};
use pulsebell_tests::serde_json::Value;
use pulsebell_tests::{
    agent_cli, describe, find_device, parse_time, state_of, wait_until, write_foreign_ca, write_private, Agent,
    AgentOpts, Collector, HEALTH_KEYS, STATE_TIMEOUT,
};
use tempfile::TempDir;

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-e2e-").tempdir().expect("create temp dir")
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}"))
}

fn f64_of(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {v}"))
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-9, "{what}: expected {want}, got {got}");
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `token` with its last character changed: same shape, wrong value.
fn mangle(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let last = chars.last_mut().expect("token is not empty");
    *last = if *last == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

/// Asserts a device entry is not online (or the device is no longer listed).
fn assert_not_online(collector: &Collector, id: &str) {
    let devices = collector.status();
    let state = state_of(&devices, id);
    assert_ne!(state.as_deref(), Some("online"), "device `{id}` must not be online; status: {devices:?}");
}

/// (1) Enrol, connect over TLS, show up online with plausible health.
#[test]
fn enrolled_agent_goes_online_with_plausible_health() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-kitchen";
    let token = collector.enroll(id);
    let _agent = Agent::start(&collector, id, &token, AgentOpts::default().tags(&["kitchen", "floor-1"]));

    let d = collector.wait_for_online_with_health(id);
    assert_eq!(d["id"], id);
    assert_eq!(d["state"], "online");
    assert!(!str_of(&d, "hostname").is_empty(), "hostname is empty: {d}");
    assert_eq!(str_of(&d, "agent_version"), env!("CARGO_PKG_VERSION"), "agent_version: {d}");
    assert_eq!(str_of(&d, "arch"), std::env::consts::ARCH, "arch: {d}");
    assert_eq!(d["tags"], serde_json_array(&["kitchen", "floor-1"]), "tags: {d}");

    let last_seen = parse_time(&d["last_seen"]).unwrap_or_else(|e| panic!("last_seen: {e}; entry: {d}"));
    let age = time::OffsetDateTime::now_utc() - last_seen;
    assert!(age.abs() < time::Duration::seconds(60), "last_seen {last_seen} is not recent (age {age}): {d}");

    let h = &d["health"];
    for key in HEALTH_KEYS {
        assert!(h.get(*key).is_some(), "health has no `{key}`: {h}");
    }
    assert!(u64_of(h, "mem_total_bytes") > 0, "mem_total_bytes: {h}");
    assert!(u64_of(h, "mem_used_bytes") <= u64_of(h, "mem_total_bytes"), "mem used > total: {h}");
    assert!(u64_of(h, "uptime_secs") > 0, "uptime_secs: {h}");
    let cpu = f64_of(h, "cpu_percent");
    assert!((0.0..=100.0).contains(&cpu), "cpu_percent {cpu} out of 0..=100: {h}");
    assert!(f64_of(h, "load1") >= 0.0, "load1: {h}");
    assert!(h["temp_celsius"].is_null() || h["temp_celsius"].is_number(), "temp_celsius: {h}");

    let shown = collector.show(id);
    assert_eq!(shown["id"], id, "show {id} --json: {shown}");
    assert_eq!(shown["hostname"], d["hostname"], "show {id} --json: {shown}");
    assert!(shown["health"].is_object(), "show {id} --json: {shown}");

    // The human table lists the device too.
    let table = collector.cli_ok(&["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(id), "`status` does not list {id}:\n{}", describe(&table));
}

fn serde_json_array(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// (2) An enrolled device that never connected.
#[test]
fn enrolled_device_that_never_connected_is_never_seen() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-shelf";
    collector.enroll(id);

    // First start generated the dev PKI and a private admin token.
    let data = collector.data_dir();
    for file in ["tls/ca.pem", "tls/cert.pem", "tls/key.pem", "admin.token"] {
        assert!(data.join(file).is_file(), "{} was not generated", data.join(file).display());
    }
    let mode = std::fs::metadata(data.join("admin.token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token mode is {mode:o}");

    let d = collector.device(id).unwrap_or_else(|| panic!("`{id}` not listed: {:?}", collector.status()));
    assert_eq!(d["state"], "never_seen", "{d}");
    assert!(d["health"].is_null(), "health must be null before any pulse: {d}");
    assert!(d["last_seen"].is_null(), "last_seen must be null before any pulse: {d}");

    let shown = collector.show(id);
    assert_eq!(shown["id"], id, "{shown}");
    assert_eq!(shown["state"], "never_seen", "{shown}");
    assert!(shown["health"].is_null() && shown["last_seen"].is_null(), "{shown}");

    // Global flags are accepted after the subcommand, and --admin is honoured.
    let output = collector.cli_ok(&["status", "--json", "--admin", collector.admin_url()]);
    let devices: Vec<Value> = pulsebell_tests::serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", describe(&output)));
    assert_eq!(state_of(&devices, id).as_deref(), Some("never_seen"), "{devices:?}");
}

/// (3) A wrong or missing token gets HTTP 401 before any upgrade, and an
/// agent with a wrong token never goes online.
#[test]
fn wrong_token_gets_401_and_never_goes_online() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let good_token = collector.enroll("pi-good");
    let victim_token = collector.enroll("pi-victim");
    let ep = Endpoint::of(&collector);

    block_on(async {
        for (what, auth) in [
            ("no Authorization header", None),
            ("an unknown token", Some(bearer("not-a-real-token"))),
            ("a token with one character changed", Some(bearer(&mangle(&victim_token)))),
            ("a valid token in a Basic header", Some(format!("Basic {victim_token}"))),
        ] {
            assert_eq!(raw::refused_status(&ep, auth.as_deref()).await, Ok(401), "upgrade with {what}");
        }
        // Control: the same client with the real token is upgraded and
        // gets the subprotocol, so the 401s above are about the token.
        let (mut ws, resp) = raw::upgrade(&ep, Some(&bearer(&victim_token)))
            .await
            .unwrap_or_else(|e| panic!("upgrade with the real token failed: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let proto = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
        assert_eq!(proto, Some(SUBPROTOCOL), "subprotocol in {resp:?}");
        raw::close(&mut ws).await;
    });

    let bad = Agent::start(&collector, "pi-victim", "wrong-token-0123456789", AgentOpts::default());
    let _good = Agent::start(&collector, "pi-good", &good_token, AgentOpts::default());
    bad.wait_for_log(&["HTTP 401", "refused this device's token"], STATE_TIMEOUT);
    collector.wait_for_online_with_health("pi-good");

    let devices = collector.status();
    let victim = find_device(&devices, "pi-victim").unwrap_or_else(|| panic!("pi-victim not listed: {devices:?}"));
    assert_eq!(victim["state"], "never_seen", "a wrong token must not bring pi-victim online: {victim}");
    assert!(victim["health"].is_null(), "{victim}");
}

/// (4) An agent that trusts another CA refuses the collector's certificate.
#[test]
fn agent_refuses_a_collector_certificate_from_another_ca() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let foreign_ca = tmp.path().join("other-ca.pem");
    write_foreign_ca(&foreign_ca);
    let control_token = collector.enroll("pi-control");
    let token = collector.enroll("pi-mitm");

    let mismatched = Agent::start(&collector, "pi-mitm", &token, AgentOpts::default().ca_file(&foreign_ca));
    let _control = Agent::start(&collector, "pi-control", &control_token, AgentOpts::default());
    let line = mismatched.wait_for_log(&["TLS", "certificate"], STATE_TIMEOUT);
    assert!(line.contains("TLS") || line.contains("certificate"), "{line}");
    collector.wait_for_online_with_health("pi-control");

    let devices = collector.status();
    assert_eq!(
        state_of(&devices, "pi-mitm").as_deref(),
        Some("never_seen"),
        "an agent that cannot verify the collector must never connect: {devices:?}"
    );
}

/// Runs an agent until its pulses span at least `span` (as seen in
/// `last_seen`), stops it, and waits until the collector shows it offline.
/// Returns the first online entry and the offline one.
fn pulse_then_go_offline(collector: &Collector, id: &str, token: &str, span: Duration) -> (Value, Value) {
    let mut agent = Agent::start(collector, id, token, AgentOpts::default().tags(&["persist"]));
    let first = collector.wait_for_online_with_health(id);
    let t_first = parse_time(&first["last_seen"]).unwrap_or_else(|e| panic!("last_seen: {e}; entry: {first}"));
    collector.wait_for_device(id, &format!("to pulse for {span:?}"), STATE_TIMEOUT, |d| {
        let t = parse_time(&d["last_seen"])?;
        if d["state"] == "online" && t - t_first >= span {
            Ok(())
        } else {
            Err(format!("pulsing for {}", t - t_first))
        }
    });
    agent.stop();
    let offline = collector.wait_for_state(id, "offline");
    assert!(offline["health"].is_object(), "an offline device keeps its last health: {offline}");
    parse_time(&offline["last_seen"]).unwrap_or_else(|e| panic!("last_seen: {e}; entry: {offline}"));
    (first, offline)
}

/// (5a) SIGTERM and restart: enrolments and last state survive.
#[test]
fn restart_after_sigterm_keeps_enrolments_and_last_state() {
    let tmp = tempdir();
    let mut collector = Collector::start(tmp.path());
    let id = "pi-restart";
    let token = collector.enroll(id);
    collector.enroll("pi-idle");
    let (_, before) = pulse_then_go_offline(&collector, id, &token, Duration::from_millis(800));

    let exit = collector.stop();
    assert!(exit.success(), "the collector should exit 0 on SIGTERM, got {exit}");
    collector.restart();

    // Before any agent reconnects.
    let devices = collector.status();
    let after = find_device(&devices, id).unwrap_or_else(|| panic!("`{id}` not listed after restart: {devices:?}"));
    assert_eq!(after["state"], "offline", "after restart: {after}");
    let t_before = parse_time(&before["last_seen"]).unwrap();
    let t_after = parse_time(&after["last_seen"]).unwrap_or_else(|e| panic!("last_seen after restart: {e}; {after}"));
    assert!(
        (t_after - t_before).abs() <= time::Duration::milliseconds(1),
        "last_seen changed across a clean restart: before {t_before}, after {t_after}"
    );
    assert_eq!(after["health"], before["health"], "health changed across a clean restart");
    for key in ["hostname", "agent_version", "arch", "tags"] {
        assert_eq!(after[key], before[key], "`{key}` changed across a clean restart");
    }
    assert_eq!(state_of(&devices, "pi-idle").as_deref(), Some("never_seen"), "{devices:?}");

    // The enrolment survived: the same token connects again.
    let _agent = Agent::start(&collector, id, &token, AgentOpts::default().tags(&["persist"]));
    let online = collector.wait_for_online_with_health(id);
    assert!(parse_time(&online["last_seen"]).unwrap() > t_before, "{online}");
}

/// (5b) SIGKILL and restart: pulse state older than the write-back window
/// survives (the default config documents "written to disk at most 1s
/// later"; the test sets it explicitly).
#[test]
fn restart_after_sigkill_keeps_last_state() {
    let tmp = tempdir();
    let mut collector = Collector::start_with_config(tmp.path(), "write_back = \"1s\"\n");
    let id = "pi-crash";
    let token = collector.enroll(id);
    collector.enroll("pi-idle");
    // Pulse for twice the window, so pulses older than it exist when the
    // collector is killed.
    let (first, before) = pulse_then_go_offline(&collector, id, &token, Duration::from_secs(2));

    collector.kill9();
    collector.restart();

    let devices = collector.status();
    let after = find_device(&devices, id).unwrap_or_else(|| panic!("`{id}` not listed after kill -9: {devices:?}"));
    assert_eq!(after["state"], "offline", "after kill -9: {after}");
    assert!(after["health"].is_object(), "health lost by kill -9: {after}");
    assert!(u64_of(&after["health"], "mem_total_bytes") > 0, "{after}");
    let t_first = parse_time(&first["last_seen"]).unwrap();
    let t_before = parse_time(&before["last_seen"]).unwrap();
    let t_after = parse_time(&after["last_seen"]).unwrap_or_else(|e| panic!("last_seen after kill -9: {e}; {after}"));
    assert!(
        t_first <= t_after && t_after <= t_before,
        "last_seen after kill -9 is {t_after}; pulses seen before the kill span {t_first} ..= {t_before}"
    );
    assert_eq!(state_of(&devices, "pi-idle").as_deref(), Some("never_seen"), "{devices:?}");

    let _agent = Agent::start(&collector, id, &token, AgentOpts::default());
    collector.wait_for_state(id, "online");
}

/// An enrolment is on disk once `enroll` has printed the token: a crash right
/// after it must not invalidate the token an operator already copied.
#[test]
fn enrolment_survives_sigkill_right_after_enroll() {
    let tmp = tempdir();
    let mut collector = Collector::start(tmp.path());
    let token = collector.enroll("pi-fresh");
    collector.kill9();
    collector.restart();

    let devices = collector.status();
    assert_eq!(state_of(&devices, "pi-fresh").as_deref(), Some("never_seen"), "{devices:?}");
    let _agent = Agent::start(&collector, "pi-fresh", &token, AgentOpts::default());
    collector.wait_for_online_with_health("pi-fresh");
}

/// (6) `revoke` disconnects the device and keeps it out.
#[test]
fn revoke_disconnects_the_device_and_keeps_it_out() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-stolen";
    let token = collector.enroll(id);
    let agent = Agent::start(&collector, id, &token, AgentOpts::default());
    collector.wait_for_online_with_health(id);
    let mark = agent.log().len();

    collector.revoke(id);
    wait_until(&format!("`{id}` to go offline or disappear after revoke"), STATE_TIMEOUT, || {
        let devices = collector.try_status()?;
        match state_of(&devices, id).as_deref() {
            None | Some("offline") => Ok(()),
            other => Err(format!("state {other:?}")),
        }
    });
    // The agent keeps trying; each attempt is refused.
    wait_until(&format!("agent `{id}` to be refused with 401 after revoke"), STATE_TIMEOUT, || {
        let since = agent.log().text_since(mark);
        if since.contains("HTTP 401") || since.contains("refused this device's token") {
            Ok(())
        } else {
            Err(format!("agent log since revoke:\n{since}"))
        }
    });
    assert_not_online(&collector, id);
    let ep = Endpoint::of(&collector);
    assert_eq!(block_on(raw::refused_status(&ep, Some(&bearer(&token)))), Ok(401), "upgrade with a revoked token");
}

/// (6b) Revoking a connected device closes its session with code 4003.
#[test]
fn revoke_closes_a_live_session_with_code_4003() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "raw-revoked";
    let token = collector.enroll(id);
    let ep = Endpoint::of(&collector);
    block_on(async {
        let (mut ws, _) = raw::upgrade(&ep, Some(&bearer(&token))).await.expect("upgrade");
        raw::send(&mut ws, &AgentMsg::Hello(raw::hello(id, 10_000, &[]))).await;
        match raw::recv(&mut ws).await {
            Incoming::Msg(ServerMsg::Welcome(_)) => {}
            other => panic!("expected a Welcome, got {other:?}"),
        }
        collector.revoke(id);
        match raw::recv(&mut ws).await {
            Incoming::Close(Some((code, _))) => {
                assert_eq!(code, close::REVOKED, "close code after revoke")
            }
            other => panic!("expected a close with code {}, got {other:?}", close::REVOKED),
        }
    });
}

/// (7a) `check-config` names the bad key and exits 64.
#[test]
fn agent_check_config_names_the_bad_key() {
    let tmp = tempdir();
    let token_file = tmp.path().join("token");
    write_private(&token_file, "some-token\n");
    let base = format!(
        "collector_url = \"wss://localhost:8443/v1/ws\"\ndevice_id = \"pi-1\"\ntoken_file = {}\nstate_dir = {}\n",
        pulsebell_tests::toml_str(&token_file.to_string_lossy()),
        pulsebell_tests::toml_str(&tmp.path().join("state").to_string_lossy()),
    );
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, format!("{base}interval = \"500ms\"\n")).unwrap();
    let output = agent_cli(&["check-config".as_ref(), "--config".as_ref(), good.as_os_str()]);
    assert_eq!(output.status.code(), Some(0), "valid config:\n{}", describe(&output));

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, format!("{base}interval = \"5 parsecs\"\n")).unwrap();
    let output = agent_cli(&["check-config".as_ref(), "--config".as_ref(), bad.as_os_str()]);
    assert_eq!(output.status.code(), Some(64), "invalid interval:\n{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("interval"), "stderr does not name `interval`:\n{}", describe(&output));
}

/// (7b) The printed default config passes `check-config` once filled in.
#[test]
fn agent_default_config_passes_check_config_once_filled_in() {
    let tmp = tempdir();
    let output = agent_cli(&["print-default-config"]);
    assert!(output.status.success(), "{}", describe(&output));
    let default = String::from_utf8(output.stdout).expect("UTF-8 config");
    assert!(default.contains("device_id = \"change-me\""), "{default}");
    assert!(default.contains("token_file = \"/etc/pulsebell/agent.token\""), "{default}");

    let token_file = tmp.path().join("agent.token");
    write_private(&token_file, "a-device-token\n");
    let filled = default
        .replace("device_id = \"change-me\"", "device_id = \"pi-default\"")
        .replace(
            "token_file = \"/etc/pulsebell/agent.token\"",
            &format!("token_file = {}", pulsebell_tests::toml_str(&token_file.to_string_lossy())),
        )
        .replace(
            "state_dir = \"/var/lib/pulsebell-agent\"",
            &format!("state_dir = {}", pulsebell_tests::toml_str(&tmp.path().join("state").to_string_lossy())),
        );
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, &filled).unwrap();
    let output = agent_cli(&["check-config".as_ref(), "--config".as_ref(), config.as_os_str()]);
    assert_eq!(output.status.code(), Some(0), "filled-in default config:\n{filled}\n{}", describe(&output));

    // Unfilled, it points at a token file that does not exist here.
    if !Path::new("/etc/pulsebell/agent.token").exists() {
        let config = tmp.path().join("default.toml");
        std::fs::write(&config, &default).unwrap();
        let output = agent_cli(&["check-config".as_ref(), "--config".as_ref(), config.as_os_str()]);
        assert_eq!(output.status.code(), Some(64), "{}", describe(&output));
        assert!(String::from_utf8_lossy(&output.stderr).contains("token_file"), "{}", describe(&output));
    }
}

/// (7c) `health --json` prints one sample with every health key and facts.
#[test]
fn agent_health_json_has_every_health_key() {
    let output = agent_cli(&["health", "--json"]);
    assert!(output.status.success(), "{}", describe(&output));
    let h: Value = pulsebell_tests::serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", describe(&output)));
    for key in HEALTH_KEYS {
        assert!(h.get(*key).is_some(), "`health --json` has no `{key}`: {h}");
    }
    assert!(u64_of(&h, "mem_total_bytes") > 0, "{h}");
    let cpu = f64_of(&h, "cpu_percent");
    assert!((0.0..=100.0).contains(&cpu), "cpu_percent {cpu}: {h}");
    let facts = &h["facts"];
    assert!(facts.is_object(), "no `facts` object: {h}");
    assert_eq!(facts["arch"], std::env::consts::ARCH, "{facts}");
}

/// (8) Failed upgrade attempts do not disturb a connected device.
#[test]
fn bad_token_attempts_do_not_disturb_a_good_device() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "pi-steady";
    let token = collector.enroll(id);
    let agent = Agent::start(&collector, id, &token, AgentOpts::default());
    let before = collector.wait_for_online_with_health(id);
    let mark = agent.log().len();

    let ep = Endpoint::of(&collector);
    let auths: Vec<Option<String>> = (0..40)
        .map(|i| match i % 4 {
            0 => None,
            1 => Some(bearer(&format!("bogus-{i}"))),
            2 => Some(bearer(&mangle(&token))),
            _ => Some(format!("Bearer {id}")),
        })
        .collect();
    block_on(async {
        // In waves of concurrent attempts.
        for wave in auths.chunks(10) {
            let attempts = wave.iter().map(|auth| raw::refused_status(&ep, auth.as_deref()));
            for (auth, result) in wave.iter().zip(futures_util::future::join_all(attempts).await) {
                assert_eq!(result, Ok(401), "upgrade with Authorization {auth:?}");
            }
        }
    });

    // Still online and still pulsing on its original connection.
    collector.wait_for_device(id, "to keep pulsing", STATE_TIMEOUT, |d| {
        if d["state"] != "online" {
            return Err(format!("state is {}", d["state"]));
        }
        if d["last_seen"] == before["last_seen"] {
            return Err("last_seen has not moved".into());
        }
        Ok(())
    });
    let since = agent.log().text_since(mark);
    for sign in ["closed the connection", "connection lost", "nothing heard", "reconnect"] {
        assert!(!since.contains(sign), "the good agent's connection was disturbed (`{sign}`):\n{since}");
    }
    assert_eq!(collector.device(id).unwrap()["state"], "online");
}

/// A hand-written Hello gets a Welcome, and a Pulse's fixed-point values show
/// up in `status --json` in bytes, percent and °C.
#[test]
fn raw_pulse_is_shown_in_human_units() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "raw-units";
    let token = collector.enroll(id);
    let ep = Endpoint::of(&collector);
    block_on(async {
        let (mut ws, _) = raw::upgrade(&ep, Some(&bearer(&token))).await.expect("upgrade");
        raw::send(&mut ws, &AgentMsg::Hello(raw::hello(id, 5_000, &["raw"]))).await;
        let welcome = match raw::recv(&mut ws).await {
            Incoming::Msg(ServerMsg::Welcome(w)) => w,
            other => panic!("expected a Welcome, got {other:?}"),
        };
        assert_eq!(welcome.protocol_version, PROTOCOL_VERSION, "{welcome:?}");
        assert_eq!(welcome.interval_ms, 5_000, "{welcome:?}");
        assert!(welcome.offline_after_ms >= 3 * 5_000, "offline after 3 intervals: {welcome:?}");
        assert!(welcome.generation >= 1, "{welcome:?}");

        let health = Health {
            cpu_permille: 425,
            load1_centi: 150,
            load5_centi: 75,
            load15_centi: 5,
            mem_total_kib: 1_000_000,
            mem_used_kib: 250_000,
            swap_total_kib: 2_048,
            swap_used_kib: 1_024,
            disk_total_mib: 30_000,
            disk_used_mib: 12_000,
            temp_decicelsius: Some(523),
            uptime_secs: 12_345,
            net_rx_bps: 1_000,
            net_tx_bps: 2_000,
            throttled: Some(Throttled(Throttled::UNDER_VOLTAGE | (Throttled::THROTTLED << 4))),
        };
        raw::send(&mut ws, &AgentMsg::Pulse(Pulse { seq: 1, health })).await;

        let d = collector.wait_for_online_with_health(id);
        let h = &d["health"];
        assert_close(f64_of(h, "cpu_percent"), 42.5, "cpu_percent");
        assert_close(f64_of(h, "load1"), 1.5, "load1");
        assert_close(f64_of(h, "load5"), 0.75, "load5");
        assert_close(f64_of(h, "load15"), 0.05, "load15");
        assert_eq!(u64_of(h, "mem_total_bytes"), 1_000_000 * 1024);
        assert_eq!(u64_of(h, "mem_used_bytes"), 250_000 * 1024);
        assert_eq!(u64_of(h, "swap_total_bytes"), 2_048 * 1024);
        assert_eq!(u64_of(h, "swap_used_bytes"), 1_024 * 1024);
        assert_eq!(u64_of(h, "disk_total_bytes"), 30_000 * 1024 * 1024);
        assert_eq!(u64_of(h, "disk_used_bytes"), 12_000 * 1024 * 1024);
        assert_close(f64_of(h, "temp_celsius"), 52.3, "temp_celsius");
        assert_eq!(u64_of(h, "uptime_secs"), 12_345);
        assert_eq!(u64_of(h, "net_rx_bytes_per_sec"), 1_000);
        assert_eq!(u64_of(h, "net_tx_bytes_per_sec"), 2_000);
        let t = &h["throttled"];
        assert_eq!(t["under_voltage_now"], true, "{t}");
        assert_eq!(t["throttled_now"], false, "{t}");
        assert_eq!(t["throttled_since_boot"], true, "{t}");
        assert_eq!(t["under_voltage_since_boot"], false, "{t}");
        assert_eq!(d["hostname"], "raw-test-host", "{d}");
        assert_eq!(d["agent_version"], "0.0.0-raw-test", "{d}");
        assert_eq!(d["arch"], std::env::consts::ARCH, "{d}");
        assert_eq!(d["tags"], serde_json_array(&["raw"]), "{d}");
        raw::close(&mut ws).await;
    });
}

/// A second connection of the same device replaces the first: the old one
/// is closed with code 4004 and the new one gets a higher generation.
#[test]
fn second_connection_replaces_the_first_with_code_4004() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let id = "raw-twice";
    let token = collector.enroll(id);
    let ep = Endpoint::of(&collector);
    block_on(async {
        let mut generations = vec![];
        let mut sockets = vec![];
        for _ in 0..2 {
            let (mut ws, _) = raw::upgrade(&ep, Some(&bearer(&token))).await.expect("upgrade");
            raw::send(&mut ws, &AgentMsg::Hello(raw::hello(id, 10_000, &[]))).await;
            match raw::recv(&mut ws).await {
                Incoming::Msg(ServerMsg::Welcome(w)) => generations.push(w.generation),
                other => panic!("expected a Welcome, got {other:?}"),
            }
            sockets.push(ws);
        }
        assert!(generations[1] > generations[0], "generations {generations:?}");
        match raw::recv(&mut sockets[0]).await {
            Incoming::Close(Some((code, _))) => {
                assert_eq!(code, close::REPLACED, "close code of the replaced connection")
            }
            other => panic!("expected a close with code {}, got {other:?}", close::REPLACED),
        }
        raw::close(&mut sockets[1]).await;
    });
}
