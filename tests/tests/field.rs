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

/// An HTTPS webhook receiver with its own CA: serves TLS with a leaf signed
/// by a fresh CA (written to `ca.pem`), records POST bodies.
struct HttpsReceiver {
    url: String,
    ca_file: std::path::PathBuf,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<pulsebell_tests::serde_json::Value>>>,
}

impl HttpsReceiver {
    fn start(dir: &std::path::Path) -> HttpsReceiver {
        use std::sync::Arc;
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Receiver test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
        let ca_file = dir.join("receiver-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let url = format!("https://localhost:{}/hook", std_listener.local_addr().unwrap().port());
        let bodies = Arc::new(std::sync::Mutex::new(vec![]));
        let sink = bodies.clone();
        let serve = async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                let sink = sink.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let mut reader = BufReader::new(tls);
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).await.is_ok() {
                        if let Ok(v) = pulsebell_tests::serde_json::from_slice(&body) {
                            sink.lock().unwrap().push(v);
                        }
                    }
                    let _ = reader
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    let _ = reader.get_mut().shutdown().await;
                });
            }
        };
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(serve);
        });
        HttpsReceiver { url, ca_file, bodies }
    }
}

/// `https://` webhooks work, to a private receiver trusted through
/// `[alerts] ca_file`; the certificate is verified.
#[test]
fn https_webhooks_reach_a_private_receiver() {
    let tmp = tempdir();
    let hook = HttpsReceiver::start(tmp.path());
    let config = format!(
        "[alerts]\nwebhooks = [{}]\nca_file = {}\n",
        pulsebell_tests::toml_str(&hook.url),
        pulsebell_tests::toml_str(hook.ca_file.to_str().unwrap())
    );
    let collector = Collector::start_with_config(tmp.path(), &config);
    let token = collector.enroll("pi-https");
    let agent = Agent::start(&collector, "pi-https", &token, AgentOpts::default());
    collector.wait_for_state("pi-https", "online");
    drop(agent); // a crash: device_offline
    let got = pulsebell_tests::wait_until("the alert over HTTPS", Duration::from_secs(30), || {
        let bodies = hook.bodies.lock().unwrap();
        match bodies.iter().find(|b| b["kind"] == "device_offline") {
            Some(b) => Ok(b.clone()),
            None => Err(format!("{bodies:?}")),
        }
    });
    assert_eq!(got["device"], "pi-https", "{got}");
    assert!(got["idempotency_key"].as_str().is_some_and(|k| k.starts_with("pulsebell-")), "{got}");
}

/// Without the receiver's CA, the certificate is refused: nothing is
/// delivered, and the attempt is logged.
#[test]
fn https_webhooks_verify_the_receiver() {
    let tmp = tempdir();
    let hook = HttpsReceiver::start(tmp.path());
    let config = format!("[alerts]\nwebhooks = [{}]\n", pulsebell_tests::toml_str(&hook.url));
    let collector = Collector::start_with_config(tmp.path(), &config);
    let token = collector.enroll("pi-unverified");
    let agent = Agent::start(&collector, "pi-unverified", &token, AgentOpts::default());
    collector.wait_for_state("pi-unverified", "online");
    drop(agent);
    pulsebell_tests::wait_until("a failed delivery in the log", Duration::from_secs(30), || {
        if collector.log().contains("alert delivery failed") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert!(hook.bodies.lock().unwrap().is_empty());
}
