//! The agent's command line, run as a real process.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pulsebell-agent"))
}

#[test]
fn invalid_config_exits_64_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "collector_url = \"wss://c.example:8443/v1/ws\"\ndevice_id = \"pi-1\"\ntoken = \"t\"\ninterval = \"5 parsecs\"\n",
    )
    .unwrap();
    let out = agent().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`interval`"), "{stderr}");

    // `run` refuses it the same way, before doing anything else.
    let out = agent().args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn missing_token_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "collector_url = \"wss://c.example/v1/ws\"\ndevice_id = \"pi-1\"\ntoken_file = \"{}\"\n",
            dir.path().join("nope").display()
        ),
    )
    .unwrap();
    let out = agent().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`token_file`"));
}

#[test]
fn check_config_lists_collector_urls_and_refuses_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let rest = "device_id = \"pi-1\"\ntoken = \"t\"\n";
    std::fs::write(
        &path,
        format!("collector_urls = [\"wss://a.example:8443/v1/ws\", \"wss://b.example:8443/v1/ws\"]\n{rest}"),
    )
    .unwrap();
    let out = agent().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 collectors [wss://a.example:8443/v1/ws, wss://b.example:8443/v1/ws]"), "{stdout}");

    std::fs::write(
        &path,
        format!("collector_url = \"wss://a.example:8443/v1/ws\"\ncollector_urls = [\"wss://b.example/v1/ws\"]\n{rest}"),
    )
    .unwrap();
    let out = agent().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`collector_url`") && stderr.contains("`collector_urls`"), "{stderr}");

    std::fs::write(&path, format!("collector_urls = [\"wss://a.example/v1/ws\", \"ws://b.example/v1/ws\"]\n{rest}"))
        .unwrap();
    let out = agent().args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`collector_urls[1]`"), "{stderr}");
}

#[test]
fn default_config_is_printed_and_valid_once_filled_in() {
    let out = agent().arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("collector_url"));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "pb1.0123456789abcdef.secret\n").unwrap();
    let filled = text.replace("/etc/pulsebell/agent.token", token.to_str().unwrap());
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, filled).unwrap();
    let out = agent().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn health_json_has_the_documented_keys() {
    let out = agent().args(["health", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
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
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["mem_total_bytes"].as_u64().unwrap() > 0);
    assert!(v["mem_used_bytes"].as_u64().unwrap() <= v["mem_total_bytes"].as_u64().unwrap());
    assert_eq!(v["facts"]["arch"], std::env::consts::ARCH);
}

#[test]
fn check_runs_the_checks_once_and_exits_with_the_worst_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listening.local_addr().unwrap().port();
    std::fs::write(
        &path,
        format!(
            "collector_url = \"wss://c.example/v1/ws\"\ndevice_id = \"pi-1\"\ntoken_file = \"/nonexistent\"\n\
             [checks.closed]\ntcp = \"127.0.0.1:{port}\"\ntimeout = \"2s\"\n\
             [checks.open]\ntcp = \"127.0.0.1:{open}\"\n\
             [checks.warn]\ncommand = [\"sh\", \"-c\", \"echo degraded; exit 1\"]\n"
        ),
    )
    .unwrap();
    let out = agent().args(["check", "--json", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "worst is critical: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let by_name = |n: &str| v.as_array().unwrap().iter().find(|c| c["name"] == n).cloned().unwrap();
    assert_eq!(by_name("closed")["status"], "critical");
    assert_eq!(by_name("open")["status"], "ok");
    assert_eq!(
        (by_name("warn")["status"].as_str(), by_name("warn")["summary"].as_str()),
        (Some("warning"), Some("degraded"))
    );
    assert_eq!(by_name("warn")["kind"], "command");
    // One check by name: its own status decides.
    let out = agent().args(["check", "open", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("open"));
    let out = agent().args(["check", "nope", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    drop(listening);
}
