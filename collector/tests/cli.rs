//! The collector's command line, run as a real process.

use std::process::Command;

fn collector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pulsebell-collector"))
}

#[test]
fn invalid_config_exits_64_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, "[limits]\nhandshake_timeout = \"whenever\"\n").unwrap();
    let out = collector().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.handshake_timeout"));
    let out = collector().args(["serve", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn default_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let out = collector().arg("print-default-config").output().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, out.stdout).unwrap();
    let out = collector().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bell_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["bell", "only-one-arg"][..],
        &["bell", "--tag", "t", "dev", "action"],
        &["bell", "d", "a", "--param", "novalue"],
    ] {
        let out = collector()
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env("PULSEBELL_ADMIN_TOKEN", "x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn cli_without_a_collector_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = collector()
        .args(["--admin", "http://127.0.0.1:9", "status"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("PULSEBELL_ADMIN_TOKEN", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
