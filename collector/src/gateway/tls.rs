//! The device side's TLS stream: rustls' unbuffered API under tokio, so a
//! connection holds no buffer while it is idle.
//!
//! rustls' buffered connection (what `tokio-rustls` wraps) keeps a 4 KiB
//! receive buffer per connection for its whole life; with tens of
//! thousands of mostly idle devices that was a fifth of the collector's
//! memory (BENCHMARKS.md, "Fleet scale": 19.8 → 14.7 KiB per device at 10k
//! with a 512-byte buffer). Here the socket is read into a buffer on the
//! stack; only bytes that must outlive the read are kept: a record that
//! has not fully arrived, plaintext the reader has not taken yet, and
//! ciphertext the socket has not taken yet. Each is freed once empty, so
//! between pulses a connection owns only its TLS state and keys.
//!
//! rustls does all of TLS (handshake, record protection, key updates,
//! alerts); this file only moves bytes between it and the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire (16 KiB of plaintext plus header,
/// padding and tag); one socket read takes at most this much.
const READ_CHUNK: usize = 16 * 1024 + 256;
/// Handshake messages may span records; more unprocessed input than this
/// (the cap rustls itself uses for handshake messages) fails the handshake.
const MAX_HANDSHAKE_BUFFER: usize = 0xffff + 5;
/// At most this much plaintext is encrypted per write (one record).
const MAX_WRITE: usize = 16 * 1024;

/// A server-side TLS connection over TCP; see the module docs.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not consumed yet (a partial record).
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_pos`.
    plaintext: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes the socket has not taken yet, from `out_pos`.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify, or closed the socket.
    read_closed: bool,
    /// Our close_notify is queued.
    close_sent: bool,
}

/// What rustls wants next, after [`drive`] processed the input it had.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The handshake needs more input.
    NeedInput,
    /// The connection is established; nothing more to process until more
    /// input arrives.
    Open,
    /// Both sides sent close_notify.
    Closed,
}

/// What to do when rustls is ready for application data.
enum Want<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

fn tls_error(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `fill` writes to `out`, growing it to the size rustls asks
/// for when the first try does not fit.
fn append<E>(
    out: &mut Vec<u8>,
    first_guess: usize,
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = first_guess;
    loop {
        out.resize(start + room, 0);
        match fill(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match required(&e) {
                Some(size) if size > room => room = size,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

/// Runs rustls over `input` until it needs more input or is ready for
/// application data (then does `want`). Decrypted data goes to `reader`
/// while it has room and nothing is queued before it, the rest to
/// `plaintext`; records to send (handshake, alerts, `want`'s) to
/// `outgoing`. Returns how many bytes of `input` rustls consumed and what
/// it wants next.
fn drive(
    conn: &mut UnbufferedServerConnection,
    input: &mut [u8],
    mut reader: Option<&mut ReadBuf<'_>>,
    plaintext: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    read_closed: &mut bool,
    mut want: Want<'_>,
) -> io::Result<(usize, Step)> {
    let mut consumed = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut input[consumed..]);
        let step = match state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let mut payload = record.map_err(tls_error)?.payload;
                    if let Some(reader) = reader.as_deref_mut().filter(|_| plaintext.is_empty()) {
                        let n = reader.remaining().min(payload.len());
                        reader.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    plaintext.extend_from_slice(payload);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut data) => {
                append(
                    outgoing,
                    1024,
                    |buf| data.encode(buf),
                    |e| match e {
                        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
                        _ => None,
                    },
                )
                .map_err(tls_error)?;
                None
            }
            // `outgoing` is written in order before anything encoded later.
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(Step::NeedInput),
            ConnectionState::PeerClosed => {
                *read_closed = true;
                None
            }
            ConnectionState::Closed => Some(Step::Closed),
            ConnectionState::WriteTraffic(mut traffic) => {
                let required = |e: &EncryptError| match e {
                    EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
                    _ => None,
                };
                match std::mem::replace(&mut want, Want::Nothing) {
                    Want::Nothing => {}
                    Want::Encrypt(data) => {
                        append(outgoing, data.len() + 64, |buf| traffic.encrypt(data, buf), required)
                            .map_err(tls_error)?
                    }
                    Want::CloseNotify => {
                        append(outgoing, 64, |buf| traffic.queue_close_notify(buf), required).map_err(tls_error)?
                    }
                }
                Some(Step::Open)
            }
            // Early data is not enabled (max_early_data_size = 0).
            ConnectionState::ReadEarlyData(_) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected TLS early data"))
            }
            other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected TLS state {other:?}"))),
        };
        consumed += discard;
        if let Some(step) = step {
            return Ok((consumed, step));
        }
    }
}

/// The server side of a TLS handshake on `tcp`.
pub async fn accept(config: Arc<ServerConfig>, mut tcp: TcpStream) -> io::Result<TlsStream> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut incoming: Vec<u8> = Vec::new();
    let mut plaintext = Vec::new();
    let mut outgoing = Vec::new();
    let mut read_closed = false;
    loop {
        let (consumed, step) =
            drive(&mut conn, &mut incoming, None, &mut plaintext, &mut outgoing, &mut read_closed, Want::Nothing)?;
        incoming.drain(..consumed);
        if !outgoing.is_empty() {
            tcp.write_all(&outgoing).await?;
            outgoing.clear();
        }
        match step {
            Step::Open => break,
            Step::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
            Step::NeedInput => {
                if read_closed {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS handshake message too large"));
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                incoming.extend_from_slice(&chunk[..n]);
            }
        }
    }
    incoming.shrink_to_fit();
    plaintext.shrink_to_fit();
    Ok(TlsStream {
        tcp,
        conn,
        incoming,
        plaintext,
        plain_pos: 0,
        outgoing: Vec::new(),
        out_pos: 0,
        read_closed,
        close_sent: false,
    })
}

impl TlsStream {
    /// Processes new bytes read into `chunk`: where nothing was left over,
    /// straight from `chunk`, keeping only an incomplete record; plaintext
    /// goes to `reader` first.
    fn take_input(&mut self, chunk: &mut [u8], reader: &mut ReadBuf<'_>) -> io::Result<()> {
        let (input, from_chunk): (&mut [u8], bool) = if self.incoming.is_empty() {
            (chunk, true)
        } else {
            if self.incoming.len() + chunk.len() > MAX_HANDSHAKE_BUFFER + READ_CHUNK {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS record larger than allowed"));
            }
            self.incoming.extend_from_slice(chunk);
            (&mut self.incoming[..], false)
        };
        let (consumed, step) = drive(
            &mut self.conn,
            input,
            Some(reader),
            &mut self.plaintext,
            &mut self.outgoing,
            &mut self.read_closed,
            Want::Nothing,
        )?;
        if from_chunk {
            self.incoming.extend_from_slice(&chunk[consumed..]);
        } else {
            self.incoming.drain(..consumed);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
        }
        if step == Step::Closed {
            self.read_closed = true;
        }
        Ok(())
    }

    /// Writes `outgoing` to the socket; frees it once all is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Hands rustls `want` once it is ready for application data.
    fn encrypt(&mut self, want: Want<'_>) -> io::Result<()> {
        let (consumed, step) = drive(
            &mut self.conn,
            &mut self.incoming,
            None,
            &mut self.plaintext,
            &mut self.outgoing,
            &mut self.read_closed,
            want,
        )?;
        self.incoming.drain(..consumed);
        match step {
            Step::Open => Ok(()),
            Step::Closed => Err(io::ErrorKind::BrokenPipe.into()),
            Step::NeedInput => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plaintext.len() {
                let n = buf.remaining().min(this.plaintext.len() - this.plain_pos);
                buf.put_slice(&this.plaintext[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Records rustls produced while reading (a key update's answer)
            // go out as the socket allows; a full socket waits for the
            // next write or flush.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            // Uninitialised: zeroing 16 KiB per read was a memset per pulse.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            match read.filled().len() {
                0 => {
                    this.read_closed = true;
                    if !this.incoming.is_empty() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed in the middle of a TLS record",
                        )));
                    }
                }
                _ => {
                    let before = buf.filled().len();
                    this.take_input(read.filled_mut(), buf)?;
                    if buf.filled().len() > before {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Bound what is held: earlier records go out first.
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_WRITE);
        this.encrypt(Want::Encrypt(&buf[..n]))?;
        // Start sending now; what the socket does not take waits for the
        // next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_send(cx))?;
            this.close_sent = true;
            this.encrypt(Want::CloseNotify)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let cert_der = CertificateDer::from(cert.der().to_vec());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A real client (tokio-rustls) against [`accept`] on loopback.
    async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server_cfg, client_cfg) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(server_cfg, tcp).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client = tokio_rustls::TlsConnector::from(client_cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn small_and_large_messages_both_ways() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Idle: nothing held between messages.
        assert!(server.incoming.capacity() == 0 && server.plaintext.capacity() == 0, "buffers freed");

        // Larger than a record, and read through a small buffer.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let to_send = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&to_send).await.unwrap();
            client.flush().await.unwrap();
            client
        });
        let mut got = vec![0u8; big.len()];
        let mut at = 0;
        while at < got.len() {
            let end = (at + 300).min(got.len());
            let n = server.read(&mut got[at..end]).await.unwrap();
            assert!(n > 0, "early EOF at {at}");
            at += n;
        }
        assert_eq!(got, big);
        let mut client = writer.await.unwrap();

        server.write_all(&big).await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(server.outgoing.capacity(), 0, "sent buffer freed");
        let mut back = vec![0u8; big.len()];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, big);
    }

    #[tokio::test]
    async fn key_updates_from_the_client_are_answered() {
        let (mut server, mut client) = pair().await;
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 10]).await.unwrap();
            client.flush().await.unwrap();
            let mut got = [0u8; 10];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 10]);
            server.write_all(&[round + 10; 3]).await.unwrap();
            server.flush().await.unwrap();
            let mut back = [0u8; 3];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round + 10; 3]);
        }
    }

    #[tokio::test]
    async fn close_notify_reads_as_end_of_stream_both_ways() {
        let (mut server, mut client) = pair().await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut all = vec![];
        client.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"bye");

        client.shutdown().await.unwrap();
        let mut rest = vec![];
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn garbage_fails_the_handshake_with_an_error() {
        let (server_cfg, _) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(server_cfg, tcp).await.err().expect("not TLS")
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let err = server.await.unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// A blocking socket that writes one byte per call, so every record
    /// (handshake and data) reaches the server in pieces.
    struct Drip(std::net::TcpStream);

    impl io::Read for Drip {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl io::Write for Drip {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match buf.first() {
                Some(b) => self.0.write(std::slice::from_ref(b)),
                None => Ok(0),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }

    #[tokio::test]
    async fn records_arriving_byte_by_byte_are_assembled() {
        use std::io::{Read, Write};
        let (server_cfg, client_cfg) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::task::spawn_blocking(move || {
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_nodelay(true).unwrap();
            let conn = rustls::ClientConnection::new(client_cfg, ServerName::try_from("localhost").unwrap()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, Drip(tcp));
            tls.write_all(b"ping").unwrap();
            tls.flush().unwrap();
            let mut back = [0u8; 4];
            tls.read_exact(&mut back).unwrap();
            back
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut server = accept(server_cfg, tcp).await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(&client.await.unwrap(), b"pong");
    }
}
