//! Failover between collectors (`collector_urls`), with the agent's daemon
//! loop run in-process against two tiny TLS WebSocket listeners and a closed
//! port. The listeners only take the agent's Hello and close with 1001
//! (going away), so the agent has to move on each time.
//!
//! `fixtures/` holds a test CA and a server certificate for `localhost` and
//! `127.0.0.1` (P-256, valid until 2126), made with openssl; the key is for
//! these tests only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pulsebell_agent::config::Config;
use pulsebell_proto::{close, decode, AgentMsg, SUBPROTOCOL};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::{
    handshake::server::{ErrorResponse, Request, Response},
    http::HeaderValue,
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

/// How long the agent may take to reach both listeners. The backoff between
/// the first attempts is at most 1 s, then 2 s, so this is generous.
const WAIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// One accepted session: which listener, the SNI the agent sent, and the
/// device id from its Hello.
#[derive(Debug)]
struct Seen {
    listener: &'static str,
    sni: Option<String>,
    device_id: String,
}

fn acceptor() -> TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(fixture("server.pem")).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// The upgrade answers with the agent's subprotocol, which the agent checks.
/// (The signature, large `Err` and all, is tungstenite's callback.)
#[allow(clippy::result_large_err)]
fn echo_subprotocol(_: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
    Ok(resp)
}

/// A TLS WebSocket listener on 127.0.0.1 that reports each Hello on `seen`,
/// then closes the session with 1001 (going away). Returns its port.
async fn start_listener(name: &'static str, seen: mpsc::UnboundedSender<Seen>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = acceptor();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, echo_subprotocol).await else { return };
                let Some(Ok(Message::Binary(bytes))) = ws.next().await else { return };
                let Ok(AgentMsg::Hello(hello)) = decode::<AgentMsg>(&bytes) else { return };
                let _ = seen.send(Seen { listener: name, sni, device_id: hello.device_id });
                let frame = CloseFrame { code: CloseCode::from(close::GOING_AWAY), reason: "test listener".into() };
                let _ = ws.close(Some(frame)).await;
                // Let the agent read the close frame before the socket goes.
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
            });
        }
    });
    port
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn agent_moves_round_robin_past_a_dead_collector() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let a = start_listener("a", seen_tx.clone()).await;
    let b = start_listener("b", seen_tx).await;
    let dead = closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    // `a` by name and `b` by address: the TLS server name comes from each
    // URL's host, and both are checked against the same CA.
    let text = format!(
        "collector_urls = [\"wss://127.0.0.1:{dead}/v1/ws\", \"wss://localhost:{a}/v1/ws\", \"wss://127.0.0.1:{b}/v1/ws\"]\n\
         device_id = \"pi-failover\"\n\
         token = \"pb1.test.secret\"\n\
         ca_file = \"{}\"\n\
         state_dir = \"{}\"\n",
        fixture("ca.pem").display(),
        dir.path().display(),
    );
    let config = Config::parse(&text).unwrap();
    assert_eq!(config.collectors.len(), 3);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let agent = tokio::spawn(pulsebell_agent::run::run(config, async move {
        let _ = stop_rx.await;
    }));

    // Whatever the random start, the first two sessions land on different
    // listeners: after a dropped session the agent moves on (past the dead
    // port when it is next) instead of going back to the same collector.
    let mut sessions = vec![];
    while sessions.len() < 2 {
        let s = tokio::time::timeout(WAIT, seen_rx.recv()).await.expect("the agent reached a listener").unwrap();
        sessions.push(s);
    }
    assert_ne!(sessions[0].listener, sessions[1].listener, "{sessions:?}");
    for s in &sessions {
        assert_eq!(s.device_id, "pi-failover");
        match s.listener {
            "a" => assert_eq!(s.sni.as_deref(), Some("localhost"), "{s:?}"),
            // An IP address is verified against the certificate but never sent as SNI.
            _ => assert_eq!(s.sni, None, "{s:?}"),
        }
    }

    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, agent).await.expect("the agent stops").unwrap().unwrap();
}
