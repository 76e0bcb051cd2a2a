//! Defects found by trying Pulsebell as a new user would (issue 11): each
//! test is named after what was wrong.

use std::time::Duration;

use pulsebell_tests::{Agent, AgentOpts, Collector};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pulsebell-field-").tempdir().expect("temp dir")
}

/// Logs written to a file (not a terminal) carry no ANSI escape codes,
/// from the collector or the agent.
#[test]
fn logs_to_a_file_carry_no_escape_codes() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let token = collector.enroll("pi-plain");
    let agent = Agent::start(&collector, "pi-plain", &token, AgentOpts::default());
    collector.wait_for_state("pi-plain", "online");
    agent.wait_for_log(&["connected"], Duration::from_secs(20));
    for (who, text) in [("collector", collector.log().text()), ("agent", agent.log().text())] {
        assert!(!text.is_empty());
        assert!(!text.contains('\u{1b}'), "{who} log has escape codes:\n{text}");
    }
}

/// `demo --duration 8`: a bare number of seconds is a duration.
#[test]
fn a_bare_number_is_a_duration_on_the_command_line() {
    let out = pulsebell_tests::run_with_timeout(
        {
            let mut cmd = std::process::Command::new(pulsebell_tests::collector_bin());
            cmd.args(["demo", "--duration", "1"]);
            cmd
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", pulsebell_tests::describe(&out));
}
