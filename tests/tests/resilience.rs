//! Resilience and liveness tests: the real collector and agent binaries,
//! attacked at every layer of the device endpoint (TCP, TLS, HTTP,
//! WebSocket, postcard) while a well-behaved agent keeps pulsing.
//!
//! Every bad-input test starts a collector and a real agent, performs one
//! attack, and then checks four things: the attacking connection was closed
//! with the documented reason (close code or HTTP status), the collector
//! logged it, the collector is still running, and the good device is still
//! online on its original connection (no `offline` event, no reconnect,
//! `last_seen` still advancing).
//!
//! The liveness tests measure silence detection, check the event log across
//! a silence and a reconnect, a graceful shutdown, the connection limit and
//! the per-address authentication throttle.
//!
//! Waiting is done on events or by polling (`status --json`, a log line, a
//! socket read with a deadline); fixed waits only hold a state for a
//! measured window.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pulsebell_proto::{close, decode, encode, AgentMsg, Health, Hello, Pulse, ServerMsg, MAX_FRAME, SUBPROTOCOL};
use pulsebell_tests::raw::{self, block_on, Endpoint, Incoming};
use pulsebell_tests::serde_json::{self, Value};
use pulsebell_tests::{describe, find_device, parse_time, wait_until, Agent, AgentOpts, Collector, STATE_TIMEOUT};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_tungstenite::tungstenite::{
    self, client::IntoClientRequest, handshake::client::Response, http::HeaderValue, protocol::WebSocketConfig, Message,
};

/// The well-behaved device of every test.
const GOOD: &str = "good-device";
/// Its pulse interval.
const GOOD_INTERVAL: Duration = Duration::from_millis(400);
/// The enrolled device whose token the attacker uses.
const ATTACKER: &str = "raw-attacker";
/// How long the server may take to close a connection it has rejected.
/// Well under the default 10 s handshake timeout, so a close within it is
/// the server's decision, not the timeout.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Signs in an agent's log that its connection was disturbed.
const DISTURBED: &[&str] = &["closed the connection", "connection lost", "nothing heard", "reconnect", "going away"];

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("pulsebell-resilience-").tempdir().expect("create temp dir")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------
// The fixture: a collector and a good agent

struct Fixture {
    collector: Collector,
    agent: Agent,
    ep: Endpoint,
    /// Agent log length once it was online.
    agent_mark: usize,
    /// Dropped last: the processes above are killed first.
    _tmp: TempDir,
}

impl Fixture {
    /// A collector (with `config` as its config file unless empty) and a
    /// good agent that is online with health.
    fn start(config: &str) -> Fixture {
        let tmp = tempdir();
        let collector = if config.is_empty() {
            Collector::start(tmp.path())
        } else {
            Collector::start_with_config(tmp.path(), config)
        };
        let token = collector.enroll(GOOD);
        let agent = Agent::start(&collector, GOOD, &token, AgentOpts::default().interval(GOOD_INTERVAL));
        collector.wait_for_online_with_health(GOOD);
        let agent_mark = agent.log().len();
        let ep = Endpoint::of(&collector);
        Fixture { collector, agent, ep, agent_mark, _tmp: tmp }
    }

    /// The good device's current `last_seen`.
    fn good_last_seen(&self) -> time::OffsetDateTime {
        let d = self.collector.device(GOOD).unwrap_or_else(|| panic!("`{GOOD}` is not listed"));
        parse_time(&d["last_seen"]).unwrap_or_else(|e| panic!("last_seen of `{GOOD}`: {e}; entry: {d}"))
    }

    /// The collector still runs, and the good device is online on its
    /// first connection and still pulsing.
    fn assert_good_unaffected(&mut self) {
        assert!(self.collector.is_running(), "the collector process died");
        let before = self.good_last_seen();
        self.collector.wait_for_device(GOOD, "to be online with last_seen advancing", STATE_TIMEOUT, |d| {
            if d["state"] != "online" {
                return Err(format!("state is {}", d["state"]));
            }
            let t = parse_time(&d["last_seen"])?;
            if t <= before {
                return Err(format!("last_seen {t} has not moved past {before}"));
            }
            Ok(())
        });
        let events = events(&self.collector, GOOD);
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap_or("?")).collect();
        assert_eq!(kinds, ["online"], "the good device must have one `online` event and nothing else: {events:?}");
        let since = self.agent.log().text_since(self.agent_mark);
        for sign in DISTURBED {
            assert!(!since.contains(sign), "the good agent's connection was disturbed (`{sign}`):\n{since}");
        }
        assert!(self.collector.is_running(), "the collector process died");
    }

    /// Waits for a collector log line containing every one of `needles`.
    fn wait_for_log(&self, needles: &[&str]) -> String {
        wait_for_collector_log(&self.collector, needles)
    }
}

fn wait_for_collector_log(collector: &Collector, needles: &[&str]) -> String {
    wait_until(&format!("a collector log line with {needles:?}"), STATE_TIMEOUT, || {
        let text = collector.log().text();
        text.lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .ok_or_else(|| format!("{} line(s), none matches", text.lines().count()))
    })
}

/// `events DEVICE --json`, parsed; checks each object's keys.
fn events(collector: &Collector, device: &str) -> Vec<Value> {
    let output = collector.cli_ok(&["events", device, "--json"]);
    let events: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("`events {device} --json` is not a JSON array ({e}):\n{}", describe(&output)));
    for e in &events {
        for key in ["device", "kind", "reason", "at", "generation"] {
            assert!(e.get(key).is_some(), "event without `{key}`: {e}");
        }
    }
    assert!(events.iter().all(|e| e["device"] == device), "`events {device}` lists other devices: {events:?}");
    events
}

// ---------------------------------------------------------------------------
// Sockets

/// Reads until the peer closes (EOF or an error such as a reset). Returns
/// what was read and how it ended; `Err` if it is still open at `timeout`.
fn read_until_closed(stream: &mut std::net::TcpStream, timeout: Duration) -> Result<(Vec<u8>, String), String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("still open after {timeout:?} ({} bytes read)", got.len()));
        }
        stream.set_read_timeout(Some(left)).expect("set read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return Ok((got, "EOF".into())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Ok((got, e.to_string())),
        }
    }
}

/// Whether a connection is still open: nothing to read, neither EOF nor an
/// error (a non-blocking peek).
fn still_open(stream: &std::net::TcpStream) -> Result<(), String> {
    stream.set_nonblocking(true).expect("set non-blocking");
    let mut buf = [0u8; 64];
    let result = match stream.peek(&mut buf) {
        Ok(0) => Err("closed (EOF)".into()),
        Ok(n) => Err(format!("unexpectedly received {n} bytes")),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(format!("closed ({e})")),
    };
    stream.set_nonblocking(false).expect("set blocking");
    result
}

fn tls_connector(ca_file: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read CA file") {
        roots.add(cert.expect("PEM certificate")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// TCP to the device port, from `local` when given (any 127/8 address
/// works on Linux: all of it is routed to `lo`).
async fn tcp_from(ep: &Endpoint, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let remote: SocketAddr = ep.addr.parse().expect("device address");
    match local {
        None => TcpStream::connect(remote).await,
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(remote).await
        }
    }
}

/// TCP and a verified TLS handshake with the collector.
async fn tls_from(ep: &Endpoint, local: Option<IpAddr>) -> io::Result<TlsStream<TcpStream>> {
    let tcp = tcp_from(ep, local).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(raw::TIMEOUT, tls_connector(&ep.ca_file).connect(name, tcp))
        .await
        .unwrap_or_else(|_| Err(io::Error::other("TLS handshake timed out")))
}

/// Reads a TLS stream until the server closes it; returns what was read.
async fn tls_read_until_closed(tls: &mut TlsStream<TcpStream>, timeout: Duration) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let fut = async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(()) => Ok(got),
        Err(_) => Err(format!("still open after {timeout:?}; read so far: {:?}", String::from_utf8_lossy(&got))),
    }
}

/// Like [`raw::upgrade`], from a chosen local address.
async fn upgrade_from(
    ep: &Endpoint,
    local: Option<IpAddr>,
    authorization: &str,
) -> Result<(raw::Ws, Response), tungstenite::Error> {
    let io_err = |e: io::Error| tungstenite::Error::Io(e);
    let tls = tls_from(ep, local).await.map_err(io_err)?;
    let mut request = ep.url.as_str().into_client_request()?;
    let headers = request.headers_mut();
    headers.insert("authorization", HeaderValue::from_str(authorization).expect("header value"));
    headers.insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
    let config = WebSocketConfig::default().max_message_size(Some(MAX_FRAME)).max_frame_size(Some(MAX_FRAME));
    let upgrade = tokio_tungstenite::client_async_with_config(request, tls, Some(config));
    tokio::time::timeout(raw::TIMEOUT, upgrade)
        .await
        .unwrap_or_else(|_| Err(io_err(io::Error::other("no upgrade answer in time"))))
}

/// The HTTP status of a refused upgrade from `local`.
async fn refused_status_from(ep: &Endpoint, local: IpAddr, authorization: &str) -> Result<u16, String> {
    match upgrade_from(ep, Some(local), authorization).await {
        Err(tungstenite::Error::Http(resp)) => Ok(resp.status().as_u16()),
        Err(e) => Err(format!("upgrade failed without an HTTP status: {e}")),
        Ok((_, resp)) => Err(format!("upgrade succeeded (HTTP {})", resp.status())),
    }
}

/// The client-side address of a raw connection: the `peer` the collector logs.
fn local_addr(ws: &raw::Ws) -> SocketAddr {
    ws.get_ref().get_ref().0.local_addr().expect("local address")
}

/// Deterministic pseudo-random bytes (xorshift), first byte forced to
/// `first`.
fn garbage(len: usize, first: u8) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    if let Some(b) = out.first_mut() {
        *b = first;
    }
    out
}

// ---------------------------------------------------------------------------
// A raw device connection on its own thread

/// What a [`Background`] connection saw.
#[derive(Debug)]
#[allow(dead_code)] // the texts are read through `Debug`, in failure messages
enum Seen {
    /// The Welcome, and when the Hello had been sent.
    Welcome { generation: u64, hello_sent: Instant },
    /// A ping (tungstenite answers it while reading).
    Ping,
    /// An unsolicited pong: a keep-alive that needs no answer.
    Pong,
    /// Some other message.
    Other(String),
    /// A close frame.
    Closed(Option<(u16, String)>),
    /// The connection ended without a close frame, or never opened.
    Ended(String),
}

/// A raw device connection served by its own thread and runtime, so it
/// keeps reading (and answering pings) while the test blocks on the CLI.
/// It sends a Hello and `pulses` pulses, then nothing.
struct Background {
    rx: std::sync::mpsc::Receiver<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    seen: Vec<Seen>,
}

impl Background {
    fn start(ep: &Endpoint, token: &str, hello: Hello, pulses: u32) -> Background {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ep = ep.clone();
        let auth = bearer(token);
        let thread = std::thread::spawn(move || {
            block_on(async move {
                let (mut ws, _) = match raw::upgrade(&ep, Some(&auth)).await {
                    Ok(x) => x,
                    Err(e) => return drop(tx.send(Seen::Ended(format!("upgrade failed: {e}")))),
                };
                let send = |msg: &AgentMsg| Message::Binary(encode(msg).expect("encode").into());
                if let Err(e) = ws.send(send(&AgentMsg::Hello(hello))).await {
                    return drop(tx.send(Seen::Ended(format!("sending the Hello failed: {e}"))));
                }
                let hello_sent = Instant::now();
                for seq in 1..=pulses {
                    let pulse = AgentMsg::Pulse(Pulse { seq, health: Health::default() });
                    if let Err(e) = ws.send(send(&pulse)).await {
                        return drop(tx.send(Seen::Ended(format!("sending a pulse failed: {e}"))));
                    }
                }
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return raw::close(&mut ws).await,
                        frame = ws.next() => {
                            let seen = match frame {
                                None => Seen::Ended("end of stream".into()),
                                Some(Err(e)) => Seen::Ended(e.to_string()),
                                Some(Ok(Message::Binary(bytes))) => match decode::<ServerMsg>(&bytes) {
                                    Ok(ServerMsg::Welcome(w)) => Seen::Welcome { generation: w.generation, hello_sent },
                                    Ok(other) => Seen::Other(format!("{other:?}")),
                                    Err(e) => Seen::Other(format!("undecodable message: {e}")),
                                },
                                Some(Ok(Message::Ping(_))) => Seen::Ping,
                                Some(Ok(Message::Pong(_))) => Seen::Pong,
                                Some(Ok(Message::Close(f))) => {
                                    Seen::Closed(f.map(|f| (u16::from(f.code), f.reason.to_string())))
                                }
                                Some(Ok(other)) => Seen::Other(format!("{other:?}")),
                            };
                            let last = matches!(seen, Seen::Closed(_) | Seen::Ended(_));
                            let _ = tx.send(seen);
                            if last {
                                return;
                            }
                        }
                    }
                }
            })
        });
        Background { rx, stop: Some(stop), thread: Some(thread), seen: vec![] }
    }

    /// Collects what has arrived so far.
    fn drain(&mut self) {
        while let Ok(s) = self.rx.try_recv() {
            self.seen.push(s);
        }
    }

    /// Waits for the Welcome: its generation and when the Hello was sent.
    fn welcome(&mut self) -> (u64, Instant) {
        let deadline = Instant::now() + raw::TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Seen::Welcome { generation, hello_sent }) => return (generation, hello_sent),
                Ok(other @ (Seen::Closed(_) | Seen::Ended(_))) => panic!("expected a Welcome, got {other:?}"),
                Ok(other) => self.seen.push(other),
                Err(_) => panic!("no Welcome within {:?}; saw {:?}", raw::TIMEOUT, self.seen),
            }
        }
    }

    /// Waits for the connection to end; returns how.
    fn ended(&mut self, timeout: Duration) -> Seen {
        self.drain();
        if let Some(i) = self.seen.iter().position(|s| matches!(s, Seen::Closed(_) | Seen::Ended(_))) {
            return self.seen.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(s @ (Seen::Closed(_) | Seen::Ended(_))) => return s,
                Ok(other) => self.seen.push(other),
                Err(_) => panic!("the connection did not end within {timeout:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Fails if the connection has ended.
    fn assert_open(&mut self, what: &str) {
        self.drain();
        let end = self.seen.iter().find(|s| matches!(s, Seen::Closed(_) | Seen::Ended(_)));
        assert!(end.is_none(), "{what}: the connection ended: {end:?}; saw {:?}", self.seen);
    }

    fn pings(&mut self) -> usize {
        self.drain();
        self.seen.iter().filter(|s| matches!(s, Seen::Ping)).count()
    }

    /// Waits until `n` keep-alives arrived (or `timeout`); returns them in
    /// order: `P` a ping, `U` an unsolicited pong.
    fn keepalives_at_least(&mut self, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.keepalives();
            if seen.len() >= n {
                return seen;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(s) => self.seen.push(s),
                Err(_) => panic!("{n} keep-alives not seen within {timeout:?}: {seen}; saw {:?}", self.seen),
            }
        }
    }

    /// The keep-alives so far, in order: `P` a ping, `U` an unsolicited pong.
    fn keepalives(&mut self) -> String {
        self.drain();
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Ping => Some('P'),
                Seen::Pong => Some('U'),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Bad input below WebSocket

/// Random bytes where a TLS ClientHello belongs: the server closes the TCP
/// connection and logs a TLS handshake failure.
#[test]
fn garbage_instead_of_tls_is_closed_and_logged() {
    let mut f = Fixture::start("");
    let mut tcp = std::net::TcpStream::connect(&f.ep.addr).expect("connect");
    let local = tcp.local_addr().expect("local address");
    tcp.write_all(&garbage(512, 0xFF)).expect("write garbage");
    let started = Instant::now();
    let (reply, how) = read_until_closed(&mut tcp, CLOSE_TIMEOUT).unwrap_or_else(|e| {
        panic!("the collector must close a connection that sends garbage instead of TLS; it is {e}")
    });
    eprintln!(
        "garbage instead of TLS: closed after {:?} ({how}; {} bytes of reply, e.g. a TLS alert)",
        started.elapsed(),
        reply.len()
    );
    let line = f.wait_for_log(&["handshake failed", &format!("peer={local}"), "reason=\"tls\""]);
    eprintln!("collector: {line}");
    f.assert_good_unaffected();
}

/// A good TLS handshake followed by bytes that are not HTTP: closed.
#[test]
fn tls_then_garbage_instead_of_http_is_closed_and_logged() {
    let mut f = Fixture::start("");
    let (local, result) = block_on(async {
        let mut tls = tls_from(&f.ep, None).await.expect("TLS handshake with the collector's CA");
        let local = tls.get_ref().0.local_addr().expect("local address");
        let mut junk = garbage(300, 0x00);
        junk.extend_from_slice(b"\r\n\r\n");
        tls.write_all(&junk).await.expect("write garbage");
        tls.flush().await.expect("flush");
        (local, tls_read_until_closed(&mut tls, CLOSE_TIMEOUT).await)
    });
    let reply = result.unwrap_or_else(|e| panic!("the collector must close a TLS connection that is not HTTP; {e}"));
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
        "expected the connection closed or an HTTP 4xx, got {reply:?}"
    );
    let line = f.wait_for_log(&["handshake failed", &format!("peer={local}")]);
    eprintln!("collector: {line}");
    f.assert_good_unaffected();
}

/// HTTP that is not a WebSocket upgrade: closed or answered with a 4xx; an
/// upgrade to another path gets 404.
#[test]
fn http_without_an_upgrade_is_refused() {
    let mut f = Fixture::start("");
    let token = f.collector.enroll(ATTACKER);
    let requests = [
        (
            "GET /v1/ws without upgrade headers",
            format!("GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"),
        ),
        ("plain GET /", "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string()),
        ("POST with a body", "POST /v1/ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello".to_string()),
    ];
    for (what, request) in &requests {
        let (local, result) = block_on(async {
            let mut tls = tls_from(&f.ep, None).await.expect("TLS handshake");
            let local = tls.get_ref().0.local_addr().expect("local address");
            tls.write_all(request.as_bytes()).await.expect("write request");
            tls.flush().await.expect("flush");
            (local, tls_read_until_closed(&mut tls, CLOSE_TIMEOUT).await)
        });
        let reply = result.unwrap_or_else(|e| panic!("{what}: the collector must refuse and close; {e}"));
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
            "{what}: expected the connection closed or an HTTP 4xx, got {reply:?}"
        );
        eprintln!("{what}: {}", if reply.is_empty() { "closed" } else { reply.lines().next().unwrap_or_default() });
        f.wait_for_log(&["handshake failed", &format!("peer={local}")]);
    }
    // A real upgrade to another path.
    let mut elsewhere = f.ep.clone();
    elsewhere.url = format!("wss://localhost:{}/", f.collector.device_port());
    assert_eq!(block_on(raw::refused_status(&elsewhere, Some(&bearer(&token)))), Ok(404), "upgrade to `/`");
    f.wait_for_log(&["handshake failed", "reason=\"not_found\""]);
    f.assert_good_unaffected();
}

// ---------------------------------------------------------------------------
// Bad input after an authenticated upgrade

/// Upgrades with the attacker's valid token, sends `frame` first, and
/// expects the collector to close with `code` and a reason containing
/// `reason_has`.
fn assert_first_frame_closes(frame: Message, code: u16, reason_has: &str) {
    let mut f = Fixture::start("");
    let token = f.collector.enroll(ATTACKER);
    let shown = match &frame {
        Message::Binary(b) => format!("a {}-byte binary message starting {:02x?}", b.len(), &b[..b.len().min(8)]),
        other => format!("{other:?}"),
    };
    let (local, got) = block_on(async {
        let (mut ws, _) = raw::upgrade(&f.ep, Some(&bearer(&token))).await.expect("upgrade with a valid token");
        let local = local_addr(&ws);
        // The server may stop reading (and reset) before a large message is
        // written; what counts is what comes back.
        let sent = ws.send(frame).await;
        (local, (sent, raw::recv(&mut ws).await))
    });
    let (sent, incoming) = got;
    match incoming {
        Incoming::Close(Some((got_code, reason))) => {
            assert_eq!(got_code, code, "close code after {shown} (reason {reason:?})");
            assert!(
                reason.to_lowercase().contains(&reason_has.to_lowercase()),
                "close reason {reason:?} after {shown} should mention {reason_has:?}"
            );
            eprintln!("{shown}: closed with {got_code} {reason:?}");
        }
        other => panic!("after {shown}: expected a close frame with code {code}, got {other:?} (send: {sent:?})"),
    }
    let line = f.wait_for_log(&["closing connection", &format!("peer={local}"), &format!("code={code}")]);
    eprintln!("collector: {line}");
    f.assert_good_unaffected();
}

#[test]
fn text_frame_is_closed_with_1003() {
    assert_first_frame_closes(Message::Text("{\"hello\": \"json\"}".into()), close::UNSUPPORTED_DATA, "text");
}

#[test]
fn invalid_postcard_is_closed_with_1007() {
    // 0xFF… is not a valid varint: not a message of any version.
    assert_first_frame_closes(Message::Binary(garbage(64, 0xFF).into()), close::INVALID_PAYLOAD, "invalid");
}

#[test]
fn unknown_message_variant_is_closed_with_1007() {
    assert_first_frame_closes(Message::Binary(vec![9, 1, 2, 3].into()), close::INVALID_PAYLOAD, "variant");
}

#[test]
fn hello_of_another_protocol_version_is_closed_with_4001() {
    // A version this collector does not speak at all.
    let hello = Hello { protocol_version: 3, ..raw::hello(ATTACKER, 500, &[]) };
    let bytes = encode(&AgentMsg::Hello(hello)).expect("encode");
    assert_first_frame_closes(Message::Binary(bytes.into()), close::VERSION_MISMATCH, "version 3");
}

#[test]
fn pulse_before_hello_is_closed_with_1002() {
    let bytes = encode(&AgentMsg::Pulse(Pulse { seq: 1, health: Health::default() })).expect("encode");
    assert_first_frame_closes(Message::Binary(bytes.into()), close::PROTOCOL, "Hello");
}

#[test]
fn oversized_message_is_closed_with_1009() {
    let mut big = vec![1u8]; // a Pulse tag, then far too much
    big.extend(garbage(100 * 1024, 0x01));
    assert_first_frame_closes(Message::Binary(big.into()), close::TOO_BIG, "");
}

/// A device's token with a Hello that claims to be another device (here:
/// the good one) is closed with 1008 and does not touch the claimed device.
#[test]
fn hello_naming_another_device_is_closed_with_1008() {
    let bytes = encode(&AgentMsg::Hello(raw::hello(GOOD, 500, &[]))).expect("encode");
    assert_first_frame_closes(Message::Binary(bytes.into()), close::POLICY, GOOD);
}

// ---------------------------------------------------------------------------
// Slowloris

fn vm_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// 1000 TCP connections that never say anything: the good device stays
/// online, memory stays bounded, and the collector closes each one once
/// the handshake timeout has passed.
///
/// The connections are opened in batches of 64, each once the collector has
/// accepted the previous ones: the device listener's accept queue is only
/// 128 long (tokio's `TcpListener::bind` listens with a backlog of 128), so
/// an unpaced burst of 1000 connects overflows it and the kernel drops SYNs
/// (1 s client retransmits); the connections would then trickle in over
/// seconds and never be held all at once.
#[test]
fn thousand_silent_tcp_connections_are_closed_after_the_handshake_timeout() {
    const N: usize = 1000;
    const BATCH: usize = 64;
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    const SLACK: Duration = Duration::from_secs(3);
    const MAX_GROWTH_KIB: u64 = 64 * 1024;
    let mut f = Fixture::start("[limits]\nhandshake_timeout = \"2s\"\n");
    let pid = f.collector.run_info().pid;
    let rss_before = vm_rss_kib(pid);
    let fds_before = open_fds(pid);

    let opened = Instant::now();
    let mut conns: Vec<(std::net::TcpStream, Instant)> = Vec::with_capacity(N);
    let mut rss_held = 0;
    while conns.len() < N {
        for _ in 0..BATCH.min(N - conns.len()) {
            let conn = std::net::TcpStream::connect(&f.ep.addr)
                .unwrap_or_else(|e| panic!("connection {} of {N}: {e}", conns.len() + 1));
            conns.push((conn, Instant::now()));
        }
        let want = fds_before + conns.len();
        let wait_from = Instant::now();
        while open_fds(pid) < want {
            assert!(
                wait_from.elapsed() < HANDSHAKE_TIMEOUT / 2,
                "the collector accepted only {} of the {} connections opened so far within {:?}",
                open_fds(pid).saturating_sub(fds_before),
                conns.len(),
                HANDSHAKE_TIMEOUT / 2
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        rss_held = rss_held.max(vm_rss_kib(pid));
    }
    let all_held_after = opened.elapsed();
    let fds_held = open_fds(pid);
    // The good device while they are all held.
    let d = f.collector.device(GOOD).expect("good device listed");
    rss_held = rss_held.max(vm_rss_kib(pid));
    let still_held = conns.iter().filter(|(c, _)| still_open(c).is_ok()).count();
    assert_eq!(d["state"], "online", "while {N} idle connections are held: {d}");

    // Each one is closed by the server: not before the handshake timeout
    // (counted from its connect), and not much after.
    let mut earliest = Duration::MAX;
    let mut latest = Duration::ZERO;
    let mut hows = std::collections::BTreeMap::<String, usize>::new();
    for (i, (conn, connected)) in conns.iter_mut().enumerate() {
        let left = (HANDSHAKE_TIMEOUT + SLACK).saturating_sub(connected.elapsed()).max(Duration::from_millis(1));
        let (_, how) = read_until_closed(conn, left).unwrap_or_else(|e| {
            panic!(
                "connection {i} of {N} was not closed by the collector within handshake_timeout \
                 {HANDSHAKE_TIMEOUT:?} + {SLACK:?} of its connect: {e}"
            )
        });
        let after = connected.elapsed();
        earliest = earliest.min(after);
        latest = latest.max(after);
        *hows.entry(how).or_default() += 1;
    }
    drop(conns);
    eprintln!(
        "slowloris: {N} idle TCP connections all held {all_held_after:?} after the first connect ({still_held} \
         still open when checked); collector fds {fds_before} -> {fds_held}; VmRSS {rss_before} KiB before, \
         {rss_held} KiB (max) while holding {N} (+{} KiB); closed by the collector {earliest:?} .. {latest:?} \
         after their connect ({hows:?})",
        rss_held.saturating_sub(rss_before)
    );
    assert_eq!(still_held, N, "every connection should still be open before the handshake timeout");
    assert!(
        earliest + Duration::from_millis(100) >= HANDSHAKE_TIMEOUT,
        "a connection was closed {earliest:?} after its connect, before the handshake timeout {HANDSHAKE_TIMEOUT:?}"
    );
    assert!(
        rss_held.saturating_sub(rss_before) < MAX_GROWTH_KIB,
        "holding {N} idle connections grew the collector's RSS from {rss_before} KiB to {rss_held} KiB"
    );
    // The server side is released too.
    wait_until("the collector to release the connections' file descriptors", STATE_TIMEOUT, || {
        let fds = open_fds(pid);
        if fds <= fds_before + 10 {
            Ok(())
        } else {
            Err(format!("{fds} fds open, {fds_before} before"))
        }
    });
    let line = f.wait_for_log(&["handshake failed", "reason=\"timeout\""]);
    let timeouts = f.collector.log().text().lines().filter(|l| l.contains("reason=\"timeout\"")).count();
    eprintln!("collector: {timeouts} handshake timeouts logged, e.g. {line}");
    f.assert_good_unaffected();
}

// ---------------------------------------------------------------------------
// Liveness

/// A device that says Hello and then nothing (while answering pings) goes
/// offline within `offline_after` + 1 s, and its connection stays open.
#[test]
fn silent_device_goes_offline_within_offline_after_while_its_connection_stays_open() {
    const OFFLINE_AFTER: Duration = Duration::from_millis(1500); // 3 × 500 ms
    const ALLOWED_LAG: Duration = Duration::from_millis(1000);
    const POLL_SLACK: Duration = Duration::from_millis(500);
    let mut f = Fixture::start("");
    let id = "raw-silent";
    let token = f.collector.enroll(id);
    let mut conn = Background::start(&f.ep, &token, raw::hello(id, 500, &[]), 0);
    let (_, hello_sent) = conn.welcome();

    let mut seen_online = false;
    let observed_offline = loop {
        let devices = f.collector.status();
        let now = Instant::now();
        let d = find_device(&devices, id).unwrap_or_else(|| panic!("`{id}` not listed: {devices:?}"));
        match d["state"].as_str() {
            Some("online") => seen_online = true,
            Some("offline") => break (now, d.clone()),
            other => panic!("unexpected state {other:?}: {d}"),
        }
        assert!(
            now.duration_since(hello_sent) < OFFLINE_AFTER + ALLOWED_LAG + POLL_SLACK + Duration::from_secs(5),
            "`{id}` still online {:?} after its Hello: {d}",
            now.duration_since(hello_sent)
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    let (at, d) = observed_offline;
    let since_hello = at.duration_since(hello_sent);
    let lag = since_hello.saturating_sub(OFFLINE_AFTER);
    eprintln!(
        "silent device: offline observed {since_hello:?} after its Hello; detection lag beyond offline_after \
         ({OFFLINE_AFTER:?}): {lag:?} (includes the status poll); pings answered so far: {}",
        conn.pings()
    );
    assert!(seen_online, "`{id}` was never seen online before going offline");
    assert!(
        since_hello >= OFFLINE_AFTER,
        "`{id}` went offline {since_hello:?} after its Hello, before {OFFLINE_AFTER:?}"
    );
    assert!(
        lag <= ALLOWED_LAG + POLL_SLACK,
        "detection lag {lag:?} is over {ALLOWED_LAG:?} + {POLL_SLACK:?} poll slack"
    );
    assert_eq!(d["connected"], true, "a silent device's connection stays open: {d}");
    assert_eq!(d["offline_after_ms"], 1500, "{d}");
    conn.assert_open("right after going offline");

    // Hold the silent connection for two more intervals: pings keep it open,
    // but it stays offline.
    std::thread::sleep(Duration::from_millis(1000));
    conn.assert_open("held while silent");
    let d = f.collector.device(id).expect("listed");
    assert_eq!(d["state"], "offline", "pings must not bring a silent device back online: {d}");
    assert_eq!(d["connected"], true, "{d}");
    assert!(conn.pings() >= 1, "the collector never pinged the silent connection");
    assert!(d["link"]["rtt_ms"].is_number(), "our pongs should have given an RTT: {d}");
    // The first keep-alive is a ping (an RTT early); then two unsolicited
    // pongs (no answer needed) for every ping.
    let keepalives = conn.keepalives_at_least(4, Duration::from_secs(10));
    assert!(keepalives.starts_with("PUUP"), "keep-alives in order: {keepalives}");
    conn.assert_open("kept alive by unsolicited pongs");
    let evs = events(&f.collector, id);
    let last = evs.last().unwrap_or_else(|| panic!("no events for `{id}`"));
    assert!(last["kind"] == "offline" && last["reason"] == "silent", "last event of `{id}`: {evs:?}");
    f.assert_good_unaffected();
}

/// Connect, fall silent, reconnect: `events --json` shows online, offline,
/// online with non-decreasing generations and times.
#[test]
fn events_show_online_offline_online_across_silence_and_reconnect() {
    let tmp = tempdir();
    let collector = Collector::start(tmp.path());
    let ep = Endpoint::of(&collector);
    let id = "raw-events";
    let token = collector.enroll(id);

    let mut first = Background::start(&ep, &token, raw::hello(id, 500, &[]), 1);
    let (gen1, _) = first.welcome();
    collector.wait_for_online_with_health(id);
    collector.wait_for_state(id, "offline");
    first.assert_open("silent but connected");

    let mut second = Background::start(&ep, &token, raw::hello(id, 500, &[]), 1);
    let (gen2, _) = second.welcome();
    assert!(gen2 > gen1, "generations {gen1} then {gen2}");
    collector.wait_for_state(id, "online");
    match first.ended(raw::TIMEOUT) {
        Seen::Closed(Some((code, _))) => assert_eq!(code, close::REPLACED, "the silent connection is replaced"),
        other => panic!("the replaced connection should get a close frame, got {other:?}"),
    }
    // The replaced connection's end must not mark the device offline.
    let d = collector.wait_for_state(id, "online");
    assert_eq!(d["generation"], gen2, "{d}");

    let evs = events(&collector, id);
    let summary: Vec<(String, String, u64)> = evs
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("?").to_string(),
                e["reason"].as_str().unwrap_or("?").to_string(),
                e["generation"].as_u64().unwrap_or_else(|| panic!("generation is not a number: {e}")),
            )
        })
        .collect();
    eprintln!("events of `{id}`: {summary:?}");
    assert_eq!(summary.len(), 3, "expected online, offline, online: {evs:?}");
    assert_eq!((summary[0].0.as_str(), summary[0].1.as_str(), summary[0].2), ("online", "connected", gen1), "{evs:?}");
    assert_eq!(summary[1].0, "offline", "{evs:?}");
    assert!(["silent", "disconnected"].contains(&summary[1].1.as_str()), "offline reason: {evs:?}");
    assert_eq!(summary[1].2, gen1, "{evs:?}");
    assert_eq!((summary[2].0.as_str(), summary[2].1.as_str(), summary[2].2), ("online", "connected", gen2), "{evs:?}");
    assert!(summary.windows(2).all(|w| w[0].2 <= w[1].2), "generations must not decrease: {evs:?}");
    let times: Vec<_> = evs.iter().map(|e| parse_time(&e["at"]).unwrap_or_else(|err| panic!("{err}: {e}"))).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "event times must not decrease: {evs:?}");
    drop(second);
}

/// SIGTERM: connected devices get close code 1001, the collector exits 0
/// within its grace period, and the event log says `collector_shutdown`.
#[test]
fn sigterm_closes_devices_with_1001_exits_0_and_logs_collector_shutdown() {
    const GRACE: Duration = Duration::from_secs(5);
    let mut f = Fixture::start("shutdown_grace = \"5s\"\n");
    let id = "raw-shutdown";
    let token = f.collector.enroll(id);
    let mut conn = Background::start(&f.ep, &token, raw::hello(id, 10_000, &[]), 1);
    let (generation, _) = conn.welcome();
    f.collector.wait_for_state(id, "online");

    let started = Instant::now();
    let status = f.collector.stop();
    let took = started.elapsed();
    eprintln!("SIGTERM: the collector exited with {status} after {took:?} (grace {GRACE:?})");
    assert!(status.success(), "the collector must exit 0 on SIGTERM, got {status}");
    assert!(took <= GRACE, "the collector took {took:?} to exit, over its {GRACE:?} grace");
    match conn.ended(raw::TIMEOUT) {
        Seen::Closed(Some((code, reason))) => {
            assert_eq!(code, close::GOING_AWAY, "close code on shutdown (reason {reason:?})");
            assert!(!reason.is_empty(), "close 1001 without a reason");
        }
        other => panic!("a connected device should get close code 1001 on SIGTERM, got {other:?}"),
    }
    f.agent.wait_for_log(&["going away"], STATE_TIMEOUT);
    assert!(f.collector.log().contains("shutdown complete"), "{}", f.collector.log().dump());

    f.collector.restart();
    for (device, gen) in [(id, Some(generation)), (GOOD, None)] {
        let evs = events(&f.collector, device);
        let last_online = evs.iter().rposition(|e| e["kind"] == "online").unwrap_or_else(|| panic!("{evs:?}"));
        let after = &evs[last_online + 1..];
        assert!(
            after.iter().any(|e| e["kind"] == "offline" && e["reason"] == "collector_shutdown"),
            "`{device}` needs an `offline` event with reason `collector_shutdown` after its last `online`: {evs:?}"
        );
        if let Some(gen) = gen {
            assert_eq!(after[0]["generation"], gen, "{evs:?}");
        }
        let d = f.collector.device(device).expect("listed after restart");
        assert_ne!(d["state"], "online", "not online before reconnecting: {d}");
    }
}

/// With `max_connections = 5` (one of them the good agent), a sixth TCP
/// connection is closed at once, the others stay, and a slot freed is
/// usable again.
#[test]
fn connections_beyond_max_connections_are_refused_cleanly() {
    let mut f = Fixture::start("[limits]\nmax_connections = 5\nhandshake_timeout = \"60s\"\n");
    let pid = f.collector.run_info().pid;
    let fds_before = open_fds(pid);
    let mut idle: Vec<std::net::TcpStream> =
        (0..4).map(|_| std::net::TcpStream::connect(&f.ep.addr).expect("connect an idle connection")).collect();
    wait_until("the 4 idle connections to be accepted", STATE_TIMEOUT, || {
        let fds = open_fds(pid);
        if fds >= fds_before + 4 {
            Ok(())
        } else {
            Err(format!("{fds} fds, {fds_before} before"))
        }
    });

    let mut sixth = std::net::TcpStream::connect(&f.ep.addr).expect("TCP connect of the 6th");
    let started = Instant::now();
    let (_, how) = read_until_closed(&mut sixth, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("the connection over max_connections must be closed at once; it is {e}"));
    let took = started.elapsed();
    eprintln!("connection over the limit closed after {took:?} ({how})");
    assert!(took < Duration::from_secs(1), "closing the connection over the limit took {took:?}");
    for (i, c) in idle.iter().enumerate() {
        still_open(c).unwrap_or_else(|e| panic!("idle connection {i} within the limit must stay open, but it is {e}"));
    }
    f.wait_for_log(&["connection limit reached"]);
    f.assert_good_unaffected();

    // Free one slot: a new connection gets through to a TLS handshake.
    drop(idle.pop());
    wait_until("a new connection to be accepted after one slot was freed", STATE_TIMEOUT, || {
        block_on(tls_from(&f.ep, None)).map(drop).map_err(|e| format!("TLS handshake failed: {e}"))
    });
    f.assert_good_unaffected();
}

/// With `auth_failures_per_minute = 5`, a source address that failed 5
/// times gets HTTP 429 for every further attempt, even with a valid token;
/// other addresses (the good agent's) are not affected.
#[test]
fn failed_authentications_are_throttled_per_source_address() {
    let mut f = Fixture::start("[limits]\nauth_failures_per_minute = 5\n");
    let other_token = f.collector.enroll("raw-valid");
    let attacker: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    block_on(async {
        for i in 1..=5 {
            let got = refused_status_from(&f.ep, attacker, &bearer(&format!("pb1.0123456789abcdef.wrong-{i}"))).await;
            assert_eq!(got, Ok(401), "bad token #{i} from {attacker}");
        }
        let got = refused_status_from(&f.ep, attacker, &bearer("pb1.0123456789abcdef.wrong-6")).await;
        assert_eq!(got, Ok(429), "bad token #6 from {attacker}: expected HTTP 429");
        let got = refused_status_from(&f.ep, attacker, &bearer(&other_token)).await;
        assert_eq!(got, Ok(429), "a valid token from the throttled {attacker}: expected HTTP 429");
        // The same valid token from 127.0.0.1 is let in.
        let (mut ws, resp) = upgrade_from(&f.ep, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), &bearer(&other_token))
            .await
            .unwrap_or_else(|e| panic!("a valid token from 127.0.0.1 must be accepted: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        raw::close(&mut ws).await;
    });
    f.wait_for_log(&["handshake failed", "peer=127.0.0.2:", "reason=\"throttled\""]);
    f.wait_for_log(&["handshake failed", "peer=127.0.0.2:", "reason=\"unauthorized\""]);
    f.assert_good_unaffected();
}
