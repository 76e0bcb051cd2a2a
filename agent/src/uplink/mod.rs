//! The uplink: one TLS WebSocket connection to the collector.
//!
//! [`Dialer`] opens a connection (TCP → TLS with a verified server
//! certificate → WebSocket upgrade with the device token and the
//! `pulsebell.v1` subprotocol). The reconnect policy lives in [`backoff`]
//! (how long to wait) and [`endpoints`] (which collector next, when
//! `collector_urls` lists several); what flows over an open connection is
//! the daemon's business (`crate::run`).

pub mod backoff;
pub mod endpoints;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use pulsebell_proto::{subprotocol, subprotocol_version, MAX_FRAME, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_tungstenite::tungstenite::{
    self,
    client::IntoClientRequest,
    http::{header, HeaderValue, StatusCode},
    protocol::WebSocketConfig,
};
use tokio_tungstenite::WebSocketStream;

use crate::config::CollectorUrl;

/// An open connection to the collector.
pub type WsStream = WebSocketStream<TlsStream<TcpStream>>;

/// An open connection and the protocol version the collector chose.
pub struct Connection {
    /// The WebSocket.
    pub ws: WsStream,
    /// Protocol version of the connection: the newest both sides speak. An
    /// older collector answers with an older one.
    pub version: u16,
}

/// The `Sec-WebSocket-Protocol` offer: every version this agent speaks,
/// newest first (`pulsebell.v2, pulsebell.v1`).
fn offer() -> String {
    (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).rev().filter_map(subprotocol).collect::<Vec<_>>().join(", ")
}

/// Time allowed for TCP, TLS and the upgrade together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a connection attempt failed. Each variant is one kind of log line:
/// the daemon logs when the kind changes, not on every retry.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed (collector down, network unreachable, DNS).
    #[error("cannot reach {addr}: {source}")]
    Tcp {
        /// host:port
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS handshake failed: most often the collector's certificate is not
    /// signed by the configured CA or does not name the host.
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// Host name checked against the certificate.
        host: String,
        /// The error (rustls errors arrive wrapped in io::Error).
        source: std::io::Error,
    },
    /// The collector refused the token (HTTP 401).
    #[error("the collector refused this device's token (HTTP 401); enroll again and update the token")]
    Unauthorized,
    /// The collector answered the upgrade with another HTTP status.
    #[error("the collector refused the WebSocket upgrade: HTTP {0}")]
    Refused(StatusCode),
    /// Any other WebSocket handshake failure.
    #[error("WebSocket handshake failed: {0}")]
    Handshake(tungstenite::Error),
    /// The whole attempt took longer than [`CONNECT_TIMEOUT`].
    #[error("connection attempt timed out after {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// A short stable name for the kind of failure (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Tcp { .. } => "tcp",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Unauthorized => "unauthorized",
            ConnectError::Refused(_) => "refused",
            ConnectError::Handshake(_) => "handshake",
            ConnectError::Timeout(_) => "timeout",
        }
    }
}

/// WebSocket settings for a device: small buffers (pulses are tens of
/// bytes; tungstenite's defaults are 128 KiB each) and the protocol's frame
/// limit.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_FRAME * 4)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// The provisioning URL of a collector URL: same scheme, host and port,
/// path [`pulsebell_proto::provision::PROVISION_PATH`].
pub fn provision_url(url: &str) -> String {
    let rest = url.strip_prefix("wss://").unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    format!("wss://{authority}{}", pulsebell_proto::provision::PROVISION_PATH)
}

/// Opens connections to one collector with one identity. With several
/// collectors the daemon keeps one dialer per URL, sharing the TLS config.
#[derive(Clone)]
pub struct Dialer {
    url: CollectorUrl,
    token: String,
    tls: TlsConnector,
}

impl Dialer {
    /// A dialer for `url`, authenticating with `token`, trusting `tls`'s roots.
    pub fn new(url: CollectorUrl, token: String, tls: Arc<rustls::ClientConfig>) -> Self {
        Dialer { url, token, tls: TlsConnector::from(tls) }
    }

    /// The collector this dialer connects to.
    pub fn url(&self) -> &CollectorUrl {
        &self.url
    }

    /// Opens one connection: TCP, TLS, WebSocket upgrade. The TLS server
    /// name is the URL's host.
    pub async fn connect(&self) -> Result<Connection, ConnectError> {
        self.connect_from(None).await
    }

    /// Like [`Dialer::connect`], from a chosen local address (the load
    /// generator spreads connections over 127.0.0.x to get past one
    /// address's ephemeral ports).
    pub async fn connect_from(&self, local: Option<std::net::IpAddr>) -> Result<Connection, ConnectError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(local))
            .await
            .unwrap_or(Err(ConnectError::Timeout(CONNECT_TIMEOUT)))
    }

    async fn tcp(&self, local: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
        let (host, port) = (self.url.host.as_str(), self.url.port);
        let Some(local) = local else {
            return crate::resolve::connect(host, port).await;
        };
        let mut last = None;
        for remote in crate::resolve::lookup(host, port).await? {
            if remote.is_ipv4() != local.is_ipv4() {
                continue;
            }
            let socket =
                if local.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(std::net::SocketAddr::new(local, 0))?;
            match socket.connect(remote).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address of the collector matches the local address family",
            )
        }))
    }

    /// Opens a provisioning connection to the same collector: the
    /// provisioning key as bearer, the device id asked for in a header
    /// ([`pulsebell_proto::provision`]).
    pub async fn provision(&self, key: &str, device_id: &str) -> Result<WsStream, ConnectError> {
        let url = provision_url(&self.url.url);
        let fut = self.open(None, &url, key, Some(device_id));
        let opened =
            tokio::time::timeout(CONNECT_TIMEOUT, fut).await.unwrap_or(Err(ConnectError::Timeout(CONNECT_TIMEOUT)));
        opened.map(|c| c.ws)
    }

    async fn connect_inner(&self, local: Option<std::net::IpAddr>) -> Result<Connection, ConnectError> {
        self.open(local, &self.url.url, &self.token, None).await
    }

    async fn open(
        &self,
        local: Option<std::net::IpAddr>,
        url: &str,
        bearer_token: &str,
        device_id: Option<&str>,
    ) -> Result<Connection, ConnectError> {
        let addr = format!("{}:{}", self.url.host, self.url.port);
        let tcp = self.tcp(local).await.map_err(|source| ConnectError::Tcp { addr: addr.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.url.host.clone()).map_err(|e| ConnectError::Tls {
            host: self.url.host.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| ConnectError::Tls { host: self.url.host.clone(), source })?;
        let mut request = url.into_client_request().map_err(ConnectError::Handshake)?;
        let headers = request.headers_mut();
        let bad = |e: tokio_tungstenite::tungstenite::http::header::InvalidHeaderValue| {
            ConnectError::Handshake(tungstenite::Error::HttpFormat(e.into()))
        };
        let bearer = HeaderValue::from_str(&format!("Bearer {bearer_token}")).map_err(bad)?;
        headers.insert(header::AUTHORIZATION, bearer);
        if let Some(id) = device_id {
            headers.insert(pulsebell_proto::provision::DEVICE_ID_HEADER, HeaderValue::from_str(id).map_err(bad)?);
        }
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(&offer()).map_err(bad)?);
        let (ws, response) = tokio_tungstenite::client_async_with_config(request, tls, Some(ws_config()))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    ConnectError::Unauthorized
                }
                tungstenite::Error::Http(resp) => ConnectError::Refused(resp.status()),
                other => ConnectError::Handshake(other),
            })?;
        // tungstenite has checked that the answer is one we offered.
        let version = response
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| subprotocol_version(v.trim()))
            .unwrap_or(OLDEST_PROTOCOL_VERSION);
        Ok(Connection { ws, version })
    }
}
