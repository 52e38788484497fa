//! The node side of the relay protocol, over QUIC ([`RelayClient`]) or the
//! TLS-over-TCP fallback ([`TcpRelayClient`]), and what both sides of it
//! share: stream frames ([`write_frame`]) and the reasons sent with close
//! codes ([`close_reason`]).
//!
//! Both clients prove the node's WireGuard key, pin the relay's key, and
//! return only once the relay admitted the key.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use weft_proto::handshake::HandshakeError;
use weft_proto::relay::{self, Message, MessageError, StreamDecoder, StreamError};
use weft_proto::{PrivateKey, PublicKey, CLOSE_HANDSHAKE_FAILED};

use crate::handshake::{self, BindingError, InitiateError, QuicInitiateError};
use crate::tls::{self, ClientEndpointError, Liveness};
use crate::Service;

/// How a relay session notices a relay that went away, unless the node
/// asks for its own ([`endpoint_with_timers`]).
const LIVENESS: Liveness = Liveness {
    keep_alive: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(15),
};

/// Why a relay session failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport could not be set up.
    #[error("cannot reach the relay: {0}")]
    Connect(#[source] Cause),
    /// The relay's key is not the pinned one, or the connection was intercepted.
    #[error("relay handshake failed: the relay's key does not match the one the coordinator lists, or the connection was intercepted")]
    Handshake(#[from] HandshakeError),
    /// The relay ended the session with a `CLOSE_RELAY_*` code.
    #[error("the relay closed the session (code {code:#x}): {reason}")]
    Closed {
        /// Why, as a `CLOSE_RELAY_*` code (or `CLOSE_HANDSHAKE_FAILED`).
        code: u32,
        /// The relay's sentence.
        reason: String,
    },
    /// The connection broke.
    #[error("relay connection lost: {0}")]
    Lost(#[source] Cause),
    /// The relay sent something that is not the relay protocol.
    #[error("relay protocol error: {0}")]
    Protocol(#[source] Cause),
    /// The packet is larger than a datagram of this connection and the
    /// queue of such packets for its stream is full; it was dropped, as a
    /// congested path would.
    #[error("relay session congested: packet of {len} bytes dropped")]
    Congested {
        /// The encoded message size.
        len: usize,
    },
}

impl From<MessageError> for ClientError {
    fn from(e: MessageError) -> Self {
        ClientError::Protocol(Cause::Message(e))
    }
}

impl From<StreamError> for ClientError {
    fn from(e: StreamError) -> Self {
        ClientError::Protocol(Cause::Stream(e))
    }
}

/// What kept a relay session from starting or ended it: another layer's
/// error, kept for callers to match on, or a sentence when none is behind
/// it. Its message is the cause's own.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// No error of another layer is behind it.
    #[error("{0}")]
    Described(String),
    /// The TCP connection or TLS session.
    #[error("{0}")]
    Io(#[source] std::io::Error),
    /// The QUIC client endpoint could not be made.
    #[error("{0}")]
    Endpoint(#[source] ClientEndpointError),
    /// quinn refused to start the connection.
    #[error("{0}")]
    QuicConnect(#[source] quinn::ConnectError),
    /// The QUIC connection failed or was closed.
    #[error("{0}")]
    QuicConnection(#[source] quinn::ConnectionError),
    /// A datagram could not be sent.
    #[error("{0}")]
    Datagram(#[source] quinn::SendDatagramError),
    /// The QUIC stream could not be read.
    #[error("{0}")]
    Read(#[source] quinn::ReadError),
    /// The TLS session cannot bind the handshake.
    #[error("{0}")]
    Binding(#[source] BindingError),
    /// The handshake could not be sent or its answer read.
    #[error("{0}")]
    Initiate(#[source] InitiateError),
    /// A relay message does not decode.
    #[error("{0}")]
    Message(#[source] MessageError),
    /// The relay's stream of frames does not decode.
    #[error("{0}")]
    Stream(#[source] StreamError),
}

impl From<String> for Cause {
    fn from(sentence: String) -> Self {
        Cause::Described(sentence)
    }
}

impl From<&str> for Cause {
    fn from(sentence: &str) -> Self {
        Cause::Described(sentence.to_owned())
    }
}

/// A QUIC client endpoint for relay sessions, bound to `bind`.
pub fn endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
    endpoint_with_timers(bind, LIVENESS.keep_alive, LIVENESS.idle_timeout)
}

/// A QUIC client endpoint for relay sessions, bound to `bind`, whose
/// connections send a keep-alive every `keep_alive` and end after
/// `idle_timeout` without hearing from the relay: the node notices a relay
/// that died within about `idle_timeout` instead of the default 15 s.
pub fn endpoint_with_timers(
    bind: SocketAddr,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, ClientError> {
    let liveness = Liveness {
        keep_alive,
        idle_timeout,
    };
    tls::quic_client(bind, Service::Relay, liveness)
        .map_err(|e| ClientError::Connect(Cause::Endpoint(e)))
}

/// Oversized messages queued for the handshake stream before further ones
/// are dropped.
const STREAM_QUEUE: usize = 64;

/// A node's session with a relay over QUIC.
///
/// Messages travel as datagrams; one larger than the connection's current
/// datagram limit (a full-size WireGuard packet can be, once QUIC's
/// overhead is added to a 1500-byte path MTU) travels as a stream frame on
/// the handshake stream instead, both ways.
#[derive(Debug)]
pub struct RelayClient {
    conn: quinn::Connection,
    /// Oversized messages, for the task writing them to the stream.
    oversize: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// Oversized messages from the relay.
    stream: tokio::sync::Mutex<StreamReader>,
}

#[derive(Debug)]
struct StreamReader {
    recv: quinn::RecvStream,
    decoder: StreamDecoder,
    buf: Vec<u8>,
    open: bool,
}

impl RelayClient {
    /// Connects to the relay at `addr` holding `relay_key`, proves `node_key`
    /// and waits for admission.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        relay_key: &PublicKey,
        node_key: &PrivateKey,
    ) -> Result<Self, ClientError> {
        let conn = endpoint
            .connect(addr, Service::Relay.server_name())
            .map_err(|e| ClientError::Connect(Cause::QuicConnect(e)))?
            .await
            .map_err(|e| ClientError::Connect(Cause::QuicConnection(e)))?;
        let (send, mut recv) = handshake::initiate_quic(&conn, Service::Relay, node_key, relay_key)
            .await
            .map_err(|e| match e {
                QuicInitiateError::Stream(e) => closed(e),
                QuicInitiateError::Binding(e) => ClientError::Connect(Cause::Binding(e)),
                QuicInitiateError::Handshake(InitiateError::Noise(e)) => ClientError::Handshake(e),
                QuicInitiateError::Handshake(e) => match conn.close_reason() {
                    Some(reason) => closed(reason),
                    None => ClientError::Lost(Cause::Initiate(e)),
                },
            })?;
        let mut decoder = StreamDecoder::new();
        let mut buf = [0u8; 64];
        loop {
            if let Some(frame) = decoder.next_frame()? {
                return match relay::decode(frame)? {
                    Message::Admitted => {
                        let (oversize, queue) = tokio::sync::mpsc::channel(STREAM_QUEUE);
                        tokio::spawn(write_oversize(send, queue));
                        Ok(Self {
                            conn,
                            oversize,
                            stream: tokio::sync::Mutex::new(StreamReader {
                                recv,
                                decoder,
                                buf: vec![0u8; 16 * 1024],
                                open: true,
                            }),
                        })
                    }
                    Message::Closed { code } => Err(ClientError::Closed {
                        code,
                        reason: reason_of(code),
                    }),
                    other => Err(ClientError::Protocol(
                        format!("expected an admission answer, got {other:?}").into(),
                    )),
                };
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.push(&buf[..n]),
                Ok(None) => return Err(ClientError::Protocol("no admission answer".into())),
                Err(e) => {
                    return Err(match conn.close_reason() {
                        Some(reason) => closed(reason),
                        None => ClientError::Lost(Cause::Read(e)),
                    })
                }
            }
        }
    }

    /// Sends `payload` (a WireGuard packet) to the node holding `to`.
    /// Unreliable, like UDP: the relay drops what it cannot deliver. A
    /// packet larger than [`RelayClient::max_payload`] goes on the stream.
    pub fn send(&self, to: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
        let message = Message::Send { to: *to, payload }.to_vec()?;
        if message.len() > self.conn.max_datagram_size().unwrap_or(0) {
            let len = message.len();
            return self
                .oversize
                .try_send(message)
                .map_err(|_| ClientError::Congested { len });
        }
        self.conn
            .send_datagram(Bytes::from(message))
            .map_err(|e| match self.conn.close_reason() {
                Some(reason) => closed(reason),
                None => ClientError::Lost(Cause::Datagram(e)),
            })
    }

    /// The next packet from another node, by datagram or on the stream:
    /// its sender's key and the payload. Cancel-safe.
    pub async fn recv(&self) -> Result<(PublicKey, Bytes), ClientError> {
        let mut guard = self.stream.lock().await;
        let reader = &mut *guard;
        loop {
            while let Some(frame) = reader.decoder.next_frame()? {
                if let Some(packet) = packet_of(frame)? {
                    return Ok(packet);
                }
            }
            tokio::select! {
                datagram = self.conn.read_datagram() => {
                    let datagram = datagram.map_err(closed)?;
                    // Anything but a Recv is ignored, as the relay ignores garbage.
                    if let Ok(Message::Recv { from, payload }) = relay::decode(&datagram) {
                        let start = datagram.len() - payload.len();
                        return Ok((from, datagram.slice(start..)));
                    }
                }
                read = reader.recv.read(&mut reader.buf), if reader.open => match read {
                    Ok(Some(n)) => reader.decoder.push(&reader.buf[..n]),
                    // The relay finished its stream; datagrams may still flow.
                    Ok(None) => reader.open = false,
                    Err(e) => {
                        return Err(match self.conn.close_reason() {
                            Some(reason) => closed(reason),
                            None => ClientError::Lost(Cause::Read(e)),
                        })
                    }
                },
            }
        }
    }

    /// The connection's current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The largest payload this connection carries in one datagram now.
    pub fn max_payload(&self) -> usize {
        self.conn
            .max_datagram_size()
            .map_or(0, |max| max.saturating_sub(33))
    }

    /// Ends the session.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"");
    }
}

/// A node's session with a relay over TLS on TCP.
#[derive(Debug)]
pub struct TcpRelayClient {
    stream: TlsStream<TcpStream>,
    decoder: StreamDecoder,
    buf: Vec<u8>,
    rtt: Duration,
}

/// The sending half of a [`TcpRelayClient`], for a task of its own.
#[derive(Debug)]
pub struct TcpRelaySender {
    stream: WriteHalf<TlsStream<TcpStream>>,
}

/// The receiving half of a [`TcpRelayClient`]; [`TcpRelayReceiver::recv`]
/// is cancel-safe.
#[derive(Debug)]
pub struct TcpRelayReceiver {
    stream: ReadHalf<TlsStream<TcpStream>>,
    decoder: StreamDecoder,
    buf: Vec<u8>,
}

impl TcpRelayClient {
    /// Connects to the relay's TCP fallback at `addr`, proves `node_key`
    /// and waits for admission.
    pub async fn connect(
        addr: SocketAddr,
        relay_key: &PublicKey,
        node_key: &PrivateKey,
    ) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Connect(Cause::Io(e)))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = handshake::connect_tls(tcp, Service::Relay)
            .await
            .map_err(|e| ClientError::Connect(Cause::Io(e)))?;
        let binding = handshake::binding(&stream, Service::Relay)
            .map_err(|e| ClientError::Connect(Cause::Binding(e)))?;
        let sent = Instant::now();
        handshake::initiate(&mut stream, Service::Relay, node_key, relay_key, &binding)
            .await
            .map_err(|e| match e {
                InitiateError::Noise(e) => ClientError::Handshake(e),
                InitiateError::Send(e) => ClientError::Lost(Cause::Io(e)),
                InitiateError::Receive(_) | InitiateError::Ended => ClientError::Closed {
                    code: CLOSE_HANDSHAKE_FAILED,
                    reason: "the relay ended the connection during the handshake".into(),
                },
            })?;
        // One round trip over this very path, TLS and TCP included.
        let rtt = sent.elapsed();
        let mut client = Self {
            stream,
            decoder: StreamDecoder::new(),
            buf: vec![0u8; 16 * 1024],
            rtt,
        };
        match client.next_message().await? {
            Admission::Admitted => Ok(client),
            Admission::Other(kind) => Err(ClientError::Protocol(
                format!("expected an admission answer, got {kind}").into(),
            )),
        }
    }

    /// Sends `payload` to the node holding `to`.
    pub async fn send(&mut self, to: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
        send_frame(&mut self.stream, to, payload).await
    }

    /// The next packet from another node. Not cancel-safe against `send` on
    /// the same client; [`TcpRelayClient::into_split`] gives each direction
    /// its own half.
    pub async fn recv(&mut self) -> Result<(PublicKey, Bytes), ClientError> {
        next_packet(&mut self.stream, &mut self.decoder, &mut self.buf).await
    }

    /// The round-trip time of the relay handshake on this connection.
    /// The relay protocol has no ping, so this is the session's one
    /// measurement.
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// Splits the session into a sending and a receiving half.
    pub fn into_split(self) -> (TcpRelaySender, TcpRelayReceiver) {
        let (read, write) = tokio::io::split(self.stream);
        (
            TcpRelaySender { stream: write },
            TcpRelayReceiver {
                stream: read,
                decoder: self.decoder,
                buf: self.buf,
            },
        )
    }

    async fn next_message(&mut self) -> Result<Admission, ClientError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return match relay::decode(frame)? {
                    Message::Admitted => Ok(Admission::Admitted),
                    Message::Closed { code } => Err(ClientError::Closed {
                        code,
                        reason: reason_of(code),
                    }),
                    other => Ok(Admission::Other(format!("{other:?}"))),
                };
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        fill(&mut self.stream, &mut self.decoder, &mut self.buf).await
    }
}

/// The TCP socket, for the node to tune how fast a silent relay is noticed
/// (keep-alive, `TCP_USER_TIMEOUT`): the relay protocol has no ping.
impl std::os::fd::AsFd for TcpRelayClient {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.get_ref().0.as_fd()
    }
}

impl TcpRelaySender {
    /// Sends `payload` to the node holding `to`.
    pub async fn send(&mut self, to: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
        send_frame(&mut self.stream, to, payload).await
    }
}

impl TcpRelayReceiver {
    /// The next packet from another node; cancel-safe.
    pub async fn recv(&mut self) -> Result<(PublicKey, Bytes), ClientError> {
        next_packet(&mut self.stream, &mut self.decoder, &mut self.buf).await
    }
}

async fn send_frame<W: AsyncWrite + Unpin>(
    stream: &mut W,
    to: &PublicKey,
    payload: &[u8],
) -> Result<(), ClientError> {
    let message = Message::Send { to: *to, payload }.to_vec()?;
    write_frame(stream, &message)
        .await
        .map_err(|e| ClientError::Lost(Cause::Io(e)))
}

/// Reads until a whole `Recv` arrives. Cancel-safe: bytes read stay in
/// `decoder`.
async fn next_packet<R: AsyncRead + Unpin>(
    stream: &mut R,
    decoder: &mut StreamDecoder,
    buf: &mut [u8],
) -> Result<(PublicKey, Bytes), ClientError> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            if let Some(packet) = packet_of(frame)? {
                return Ok(packet);
            }
            continue;
        }
        fill(stream, decoder, buf).await?;
    }
}

/// What a stream frame from the relay means to a client waiting for
/// packets: a packet, the end of the session, or nothing (anything else is
/// ignored).
fn packet_of(frame: &[u8]) -> Result<Option<(PublicKey, Bytes)>, ClientError> {
    match relay::decode(frame)? {
        Message::Recv { from, payload } => Ok(Some((from, Bytes::copy_from_slice(payload)))),
        Message::Closed { code } => Err(ClientError::Closed {
            code,
            reason: reason_of(code),
        }),
        _ => Ok(None),
    }
}

async fn fill<R: AsyncRead + Unpin>(
    stream: &mut R,
    decoder: &mut StreamDecoder,
    buf: &mut [u8],
) -> Result<(), ClientError> {
    match stream.read(buf).await {
        Ok(0) => {
            decoder.finish()?;
            Err(ClientError::Lost("the relay closed the connection".into()))
        }
        Ok(n) => {
            decoder.push(&buf[..n]);
            Ok(())
        }
        Err(e) => Err(ClientError::Lost(Cause::Io(e))),
    }
}

/// Writes oversized messages to the handshake stream until the client is
/// dropped or the connection ends.
async fn write_oversize(
    mut send: quinn::SendStream,
    mut queue: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    while let Some(message) = queue.recv().await {
        if write_frame(&mut send, &message).await.is_err() {
            return;
        }
    }
}

enum Admission {
    Admitted,
    Other(String),
}

fn closed(e: quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX);
            ClientError::Closed {
                code,
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        other => ClientError::Lost(Cause::QuicConnection(other)),
    }
}

fn reason_of(code: u32) -> String {
    String::from_utf8_lossy(close_reason(code)).into_owned()
}

/// The operator-facing reason a relay sends with a close code.
pub fn close_reason(code: u32) -> &'static [u8] {
    match code {
        relay::CLOSE_RELAY_NOT_ADMITTED => {
            b"node key not admitted by the coordinator; register the node first"
        }
        relay::CLOSE_RELAY_REMOVED => {
            b"node key no longer admitted by the coordinator (deleted, expired or rotated)"
        }
        relay::CLOSE_RELAY_REPLACED => b"replaced by a newer session with this key",
        _ => b"",
    }
}

/// Writes one message as a stream frame: a `u16` length, then the message.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too large"))?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    writer.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_tcp_connection_keeps_the_io_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let key = PrivateKey::generate();
        let err = TcpRelayClient::connect(addr, &key.public_key(), &key)
            .await
            .unwrap_err();
        let ClientError::Connect(Cause::Io(io)) = &err else {
            panic!("expected a connect error, got {err:?}");
        };
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(err.to_string(), format!("cannot reach the relay: {io}"));
        let cause = std::error::Error::source(&err).unwrap();
        assert!(std::error::Error::source(cause).is_some_and(|e| e.is::<std::io::Error>()));
    }

    #[test]
    fn a_relay_message_that_does_not_decode_is_a_protocol_error_with_its_cause() {
        let err = packet_of(&[]).unwrap_err();
        assert!(
            matches!(&err, ClientError::Protocol(Cause::Message(_))),
            "{err:?}"
        );
    }
}
