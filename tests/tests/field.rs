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

/// A tiny webhook receiver: every POST body, in arrival order.
struct Receiver {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<pulsebell_tests::serde_json::Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let sink = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(v) = pulsebell_tests::serde_json::from_slice(&body) {
                        sink.lock().unwrap().push(v);
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        Receiver { url, bodies }
    }

    fn alerts(&self) -> Vec<(String, String)> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .map(|b| (b["kind"].as_str().unwrap_or("").to_string(), b["device"].as_str().unwrap_or("").to_string()))
            .collect()
    }
}

/// `systemctl stop` of an agent (SIGTERM) says goodbye: the collector
/// records `agent_stopped`, not `disconnected`, and raises no
/// `device_offline` alert for it; a crash (SIGKILL) still does.
#[test]
fn a_planned_agent_stop_is_not_a_failure() {
    let tmp = tempdir();
    let hook = Receiver::start();
    let config = format!("[alerts]\nwebhooks = [{}]\n", pulsebell_tests::toml_str(&hook.url));
    let collector = Collector::start_with_config(tmp.path(), &config);
    let token_a = collector.enroll("pi-stopped");
    let token_b = collector.enroll("pi-crashed");
    let mut a = Agent::start(&collector, "pi-stopped", &token_a, AgentOpts::default());
    let b = Agent::start(&collector, "pi-crashed", &token_b, AgentOpts::default());
    collector.wait_for_state("pi-stopped", "online");
    collector.wait_for_state("pi-crashed", "online");

    a.stop();
    let d = collector.wait_for_state("pi-stopped", "offline");
    assert_eq!(d["last_offline_reason"], "agent_stopped", "{d}");
    // A crash of the other device afterwards: its alert is the barrier
    // (the outbox sends in order).
    drop(b);
    pulsebell_tests::wait_until("the crash's device_offline alert", Duration::from_secs(30), || {
        let got = hook.alerts();
        if got.iter().any(|(k, d)| k == "device_offline" && d == "pi-crashed") {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    let got = hook.alerts();
    assert!(!got.iter().any(|(_, d)| d == "pi-stopped"), "no alert for a planned stop: {got:?}");
    let out = collector.cli_ok(&["events", "pi-stopped", "--json"]);
    let events: pulsebell_tests::serde_json::Value = pulsebell_tests::serde_json::from_slice(&out.stdout).unwrap();
    let reasons: Vec<&str> = events.as_array().unwrap().iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons, ["connected", "agent_stopped"], "{events}");
}

/// One device sending 50,000 pulses as fast as it can is cut off with 1008
/// `rate_limited`, counted, and its record stays intact; an honest device
/// on the same collector stays online.
#[test]
fn a_flooding_device_is_cut_off_and_an_honest_one_stays_online() {
    use pulsebell_proto::{AgentMsg, Health, Pulse};
    use pulsebell_tests::raw::{self, Incoming};
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let honest_token = collector.enroll("pi-honest");
    let flood_token = collector.enroll("pi-flood");
    let _honest = Agent::start(&collector, "pi-honest", &honest_token, AgentOpts::default());
    collector.wait_for_state("pi-honest", "online");
    let ep = raw::Endpoint::of(&collector);
    let (closed, sent) = raw::block_on(async {
        let (mut ws, _) = raw::upgrade(&ep, Some(&format!("Bearer {flood_token}"))).await.expect("upgrade");
        raw::send(&mut ws, &AgentMsg::Hello(raw::hello("pi-flood", 1000, &[]))).await;
        assert!(matches!(raw::recv(&mut ws).await, Incoming::Msg(_)), "welcome");
        let mut sent = 0u32;
        use futures_util::SinkExt;
        for seq in 1..=50_000u32 {
            let bytes = pulsebell_proto::encode(&AgentMsg::Pulse(Pulse { seq, health: Health::default() })).unwrap();
            if ws.send(tokio_tungstenite::tungstenite::Message::Binary(bytes.into())).await.is_err() {
                break;
            }
            sent += 1;
        }
        // Whatever got through, the collector's close frame is what we read.
        loop {
            match raw::recv(&mut ws).await {
                Incoming::Close(c) => break (c, sent),
                Incoming::Ended(e) => break (Some((0, e)), sent),
                Incoming::Msg(_) => {}
            }
        }
    });
    let (code, reason) = closed.expect("a close frame");
    assert_eq!((code, reason.as_str()), (1008, "rate_limited"), "after {sent} pulses");
    let d = collector.show("pi-flood");
    assert_eq!(d["last_offline_reason"], "rate_limited", "{d}");
    assert_eq!(d["state"], "offline", "{d}");
    let honest = collector.show("pi-honest");
    assert_eq!(honest["state"], "online", "{honest}");
    let out = collector.cli_ok(&["events", "pi-flood", "--json"]);
    let events: pulsebell_tests::serde_json::Value = pulsebell_tests::serde_json::from_slice(&out.stdout).unwrap();
    assert!(events.as_array().unwrap().iter().any(|e| e["reason"] == "rate_limited"), "{events}");
}
