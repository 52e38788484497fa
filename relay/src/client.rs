//! The node side of the relay protocol, over QUIC ([`RelayClient`]) or the
//! TLS-over-TCP fallback ([`TcpRelayClient`]).
//!
//! Both prove the node's WireGuard key, pin the relay's key, and return only
//! once the relay admitted the key.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use weft_proto::handshake::{HandshakeError, Initiator, Purpose, RESPONSE_LEN};
use weft_proto::relay::{
    self, Message, MessageError, StreamDecoder, StreamError, RELAY_ALPN, RELAY_EXPORTER_LABEL,
};
use weft_proto::{PrivateKey, PublicKey, CLOSE_HANDSHAKE_FAILED};

use crate::tcp::write_frame;
use crate::tls::{self, SERVER_NAME};

/// Why a relay session failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport could not be set up.
    #[error("cannot reach the relay: {0}")]
    Connect(String),
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
    Lost(String),
    /// The relay sent something that is not the relay protocol.
    #[error("relay protocol error: {0}")]
    Protocol(String),
    /// The packet does not fit in one datagram of this connection.
    #[error("packet of {len} bytes does not fit the relay connection's datagram limit of {max}; lower the tunnel MTU")]
    TooLarge {
        /// The encoded message size.
        len: usize,
        /// What the connection carries now.
        max: usize,
    },
}

impl From<MessageError> for ClientError {
    fn from(e: MessageError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl From<StreamError> for ClientError {
    fn from(e: StreamError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// A QUIC client endpoint for relay sessions, bound to `bind`.
pub fn endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
    let config = tls::quic_client(RELAY_ALPN).map_err(|e| ClientError::Connect(e.to_string()))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A node's session with a relay over QUIC.
#[derive(Debug)]
pub struct RelayClient {
    conn: quinn::Connection,
    /// Kept open: the relay's end of the handshake stream.
    _stream: (quinn::SendStream, quinn::RecvStream),
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
            .connect(addr, SERVER_NAME)
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(closed)?;
        let mut binding = [0u8; 32];
        conn.export_keying_material(&mut binding, RELAY_EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Connect("cannot derive the TLS binding".into()))?;
        let (initiator, initiation) =
            Initiator::start_for(Purpose::Relay, node_key, relay_key, &binding)?;
        send.write_all(&initiation)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        let mut response = [0u8; RESPONSE_LEN];
        if let Err(e) = recv.read_exact(&mut response).await {
            return Err(match conn.close_reason() {
                Some(reason) => closed(reason),
                None => ClientError::Lost(e.to_string()),
            });
        }
        initiator.finish(&response)?;
        let mut decoder = StreamDecoder::new();
        let mut buf = [0u8; 64];
        loop {
            if let Some(frame) = decoder.next_frame()? {
                return match relay::decode(frame)? {
                    Message::Admitted => Ok(Self {
                        conn,
                        _stream: (send, recv),
                    }),
                    Message::Closed { code } => Err(ClientError::Closed {
                        code,
                        reason: reason_of(code),
                    }),
                    other => Err(ClientError::Protocol(format!(
                        "expected an admission answer, got {other:?}"
                    ))),
                };
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.push(&buf[..n]),
                Ok(None) => return Err(ClientError::Protocol("no admission answer".into())),
                Err(e) => {
                    return Err(match conn.close_reason() {
                        Some(reason) => closed(reason),
                        None => ClientError::Lost(e.to_string()),
                    })
                }
            }
        }
    }

    /// Sends `payload` (a WireGuard packet) to the node holding `to`.
    /// Unreliable, like UDP: the relay drops what it cannot deliver.
    pub fn send(&self, to: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
        let message = Message::Send { to: *to, payload }.to_vec()?;
        let max = self.conn.max_datagram_size().unwrap_or(0);
        if message.len() > max {
            return Err(ClientError::TooLarge {
                len: message.len(),
                max,
            });
        }
        self.conn
            .send_datagram(Bytes::from(message))
            .map_err(|e| match self.conn.close_reason() {
                Some(reason) => closed(reason),
                None => ClientError::Lost(e.to_string()),
            })
    }

    /// The next packet from another node: its sender's key and the payload.
    pub async fn recv(&self) -> Result<(PublicKey, Bytes), ClientError> {
        loop {
            let datagram = self.conn.read_datagram().await.map_err(closed)?;
            // Anything but a Recv is ignored, as the relay ignores garbage.
            if let Ok(Message::Recv { from, payload }) = relay::decode(&datagram) {
                let start = datagram.len() - payload.len();
                return Ok((from, datagram.slice(start..)));
            }
        }
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
}

impl TcpRelayClient {
    /// Connects to the relay's TCP fallback at `addr`, proves `node_key`
    /// and waits for admission.
    pub async fn connect(
        addr: SocketAddr,
        relay_key: &PublicKey,
        node_key: &PrivateKey,
    ) -> Result<Self, ClientError> {
        let config =
            tls::client_tls(RELAY_ALPN).map_err(|e| ClientError::Connect(e.to_string()))?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name =
            ServerName::try_from(SERVER_NAME).map_err(|e| ClientError::Connect(e.to_string()))?;
        let mut stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let mut binding = [0u8; 32];
        stream
            .get_ref()
            .1
            .export_keying_material(&mut binding, RELAY_EXPORTER_LABEL, Some(b""))
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (initiator, initiation) =
            Initiator::start_for(Purpose::Relay, node_key, relay_key, &binding)?;
        stream
            .write_all(&initiation)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        let mut response = [0u8; RESPONSE_LEN];
        stream
            .read_exact(&mut response)
            .await
            .map_err(|_| ClientError::Closed {
                code: CLOSE_HANDSHAKE_FAILED,
                reason: "the relay ended the connection during the handshake".into(),
            })?;
        initiator.finish(&response)?;
        let mut client = Self {
            stream,
            decoder: StreamDecoder::new(),
            buf: vec![0u8; 16 * 1024],
        };
        match client.next_message().await? {
            Admission::Admitted => Ok(client),
            Admission::Other(kind) => Err(ClientError::Protocol(format!(
                "expected an admission answer, got {kind}"
            ))),
        }
    }

    /// Sends `payload` to the node holding `to`.
    pub async fn send(&mut self, to: &PublicKey, payload: &[u8]) -> Result<(), ClientError> {
        let message = Message::Send { to: *to, payload }.to_vec()?;
        write_frame(&mut self.stream, &message)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// The next packet from another node. Not cancel-safe against `send` on
    /// the same client; use one task per direction via a channel if needed.
    pub async fn recv(&mut self) -> Result<(PublicKey, Bytes), ClientError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                match relay::decode(frame)? {
                    Message::Recv { from, payload } => {
                        return Ok((from, Bytes::copy_from_slice(payload)))
                    }
                    Message::Closed { code } => {
                        return Err(ClientError::Closed {
                            code,
                            reason: reason_of(code),
                        })
                    }
                    _ => continue,
                }
            }
            self.fill().await?;
        }
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
        match self.stream.read(&mut self.buf).await {
            Ok(0) => {
                self.decoder.finish()?;
                Err(ClientError::Lost("the relay closed the connection".into()))
            }
            Ok(n) => {
                self.decoder.push(&self.buf[..n]);
                Ok(())
            }
            Err(e) => Err(ClientError::Lost(e.to_string())),
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
        other => ClientError::Lost(other.to_string()),
    }
}

fn reason_of(code: u32) -> String {
    String::from_utf8_lossy(crate::server::reason(code)).into_owned()
}
