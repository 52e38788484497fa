//! The Noise `IK` handshake over a transport's byte stream, bound to the
//! transport's TLS session: the first bidirectional stream of a QUIC
//! connection, or a TLS connection on TCP.
//!
//! Both ends mix a TLS exporter value ([`binding`]) into the handshake's
//! prologue, so the handshake completes only where both see the same TLS
//! session; that is what lets the rest of the session rely on TLS's
//! encryption although no one checks its certificate. The state machine is
//! [`weft_proto::handshake`]'s; this module moves its two fixed-size
//! messages and nothing else, so every client and server of weft runs the
//! same bytes in the same order.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use weft_proto::handshake::{self, HandshakeError, Initiator, INITIATION_LEN, RESPONSE_LEN};
use weft_proto::{PrivateKey, PublicKey};

use crate::Service;

/// A TLS session that exports keying material: QUIC's, or TLS's on TCP on
/// either side.
pub trait TlsSession {
    /// Fills `out` with the exporter value for `label` (empty context).
    fn export(&self, out: &mut [u8], label: &[u8]) -> Result<(), BindingError>;
}

impl TlsSession for quinn::Connection {
    fn export(&self, out: &mut [u8], label: &[u8]) -> Result<(), BindingError> {
        self.export_keying_material(out, label, b"")
            .map_err(|_| BindingError)
    }
}

impl<S> TlsSession for tokio_rustls::client::TlsStream<S> {
    fn export(&self, out: &mut [u8], label: &[u8]) -> Result<(), BindingError> {
        export_tls(self.get_ref().1, out, label)
    }
}

impl<S> TlsSession for tokio_rustls::server::TlsStream<S> {
    fn export(&self, out: &mut [u8], label: &[u8]) -> Result<(), BindingError> {
        export_tls(self.get_ref().1, out, label)
    }
}

fn export_tls<D>(
    conn: &rustls::ConnectionCommon<D>,
    out: &mut [u8],
    label: &[u8],
) -> Result<(), BindingError> {
    conn.export_keying_material(out, label, Some(b""))
        .map(drop)
        .map_err(|_| BindingError)
}

/// The TLS session could not export a binding value (it has not finished
/// its own handshake).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the TLS session cannot export a channel binding")]
pub struct BindingError;

/// The value that binds `service`'s handshake to `session`.
pub fn binding(session: &impl TlsSession, service: Service) -> Result<[u8; 32], BindingError> {
    let mut binding = [0u8; 32];
    session.export(&mut binding, service.exporter_label())?;
    Ok(binding)
}

/// Why the initiator's side of the handshake failed. Callers word these
/// for their peer: only they know what an ended stream means there.
#[derive(Debug, thiserror::Error)]
pub enum InitiateError {
    /// The answer did not authenticate the pinned key, or has another version.
    #[error(transparent)]
    Noise(#[from] HandshakeError),
    /// The initiation could not be sent.
    #[error("cannot send the handshake: {0}")]
    Send(#[source] std::io::Error),
    /// The answer could not be read.
    #[error("cannot read the handshake: {0}")]
    Receive(#[source] std::io::Error),
    /// The peer ended its side of the stream instead of answering in full.
    #[error("the peer ended the stream during the handshake")]
    Ended,
}

/// Runs the initiator's side on `stream`: proves `local_key` for
/// `service` and checks that the peer holds `remote_key` and sees the TLS
/// session `binding` came from.
pub async fn initiate(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    service: Service,
    local_key: &PrivateKey,
    remote_key: &PublicKey,
    binding: &[u8; 32],
) -> Result<(), InitiateError> {
    let (initiator, initiation) =
        Initiator::start_for(service.purpose(), local_key, remote_key, binding)?;
    write(stream, &initiation)
        .await
        .map_err(InitiateError::Send)?;
    let mut response = [0u8; RESPONSE_LEN];
    let mut filled = 0;
    while filled < RESPONSE_LEN {
        match stream.read(&mut response[filled..]).await {
            Ok(0) => return Err(InitiateError::Ended),
            Ok(n) => filled += n,
            Err(e) => return Err(InitiateError::Receive(e)),
        }
    }
    initiator.finish(&response)?;
    Ok(())
}

/// Why the responder's side of the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The QUIC connection failed before its handshake stream opened.
    #[error("no handshake stream: {0}")]
    Stream(#[from] quinn::ConnectionError),
    /// The TLS handshake on TCP failed.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// The client offered another protocol in TLS's ALPN.
    #[error("the client does not speak {} (TLS ALPN)", String::from_utf8_lossy(.0.alpn()))]
    Alpn(Service),
    /// See [`BindingError`].
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// The handshake messages could not be read or written.
    #[error("cannot exchange the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The initiation did not authenticate, or has another version.
    #[error(transparent)]
    Noise(#[from] HandshakeError),
}

/// Runs the responder's side on `stream` as `local_key`; the initiator's
/// proven key.
pub async fn respond(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    service: Service,
    local_key: &PrivateKey,
    binding: &[u8; 32],
) -> Result<PublicKey, AuthError> {
    let mut initiation = [0u8; INITIATION_LEN];
    stream.read_exact(&mut initiation).await?;
    let (accepted, response) =
        handshake::respond_for(service.purpose(), local_key, binding, &initiation)?;
    write(stream, &response).await?;
    Ok(accepted.machine_key)
}

/// The responder's side on a QUIC connection: accepts the handshake
/// stream; the initiator's proven key and the stream, for the session.
pub async fn respond_quic(
    conn: &quinn::Connection,
    service: Service,
    local_key: &PrivateKey,
) -> Result<(PublicKey, quinn::SendStream, quinn::RecvStream), AuthError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let binding = binding(conn, service)?;
    let key = respond(
        &mut tokio::io::join(&mut recv, &mut send),
        service,
        local_key,
        &binding,
    )
    .await?;
    Ok((key, send, recv))
}

/// The responder's side on TLS over TCP, for a client that negotiated
/// `service`'s ALPN; the initiator's proven key.
pub async fn respond_tls<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &mut tokio_rustls::server::TlsStream<S>,
    service: Service,
    local_key: &PrivateKey,
) -> Result<PublicKey, AuthError> {
    if tls.get_ref().1.alpn_protocol() != Some(service.alpn()) {
        return Err(AuthError::Alpn(service));
    }
    let binding = binding(&*tls, service)?;
    respond(tls, service, local_key, &binding).await
}

/// Opens the handshake stream of a QUIC connection and runs the
/// initiator's side on it; the stream, for the session.
pub async fn initiate_quic(
    conn: &quinn::Connection,
    service: Service,
    local_key: &PrivateKey,
    remote_key: &PublicKey,
) -> Result<(quinn::SendStream, quinn::RecvStream), QuicInitiateError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let binding = binding(conn, service)?;
    initiate(
        &mut tokio::io::join(&mut recv, &mut send),
        service,
        local_key,
        remote_key,
        &binding,
    )
    .await?;
    Ok((send, recv))
}

/// Why [`initiate_quic`] failed.
#[derive(Debug, thiserror::Error)]
pub enum QuicInitiateError {
    /// The connection failed before the handshake stream opened.
    #[error("cannot open the handshake stream: {0}")]
    Stream(#[from] quinn::ConnectionError),
    /// See [`BindingError`].
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// See [`InitiateError`].
    #[error(transparent)]
    Handshake(#[from] InitiateError),
}

/// Connects TLS for `service` on `tcp`, accepting any certificate (see
/// [`crate::tls`]).
pub async fn connect_tls(
    tcp: tokio::net::TcpStream,
    service: Service,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, std::io::Error> {
    let config = crate::tls::client_config(service.alpn()).map_err(std::io::Error::other)?;
    let name = rustls::pki_types::ServerName::try_from(service.server_name())
        .map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Writes `bytes` and pushes them out: TLS holds records until flushed.
async fn write(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINDING: [u8; 32] = [7; 32];

    /// Runs both sides in memory; the client pins `pinned`, or the
    /// server's key, and the server sees `server_binding`.
    async fn run(
        service: Service,
        pinned: Option<PublicKey>,
        server_binding: [u8; 32],
    ) -> (Result<(), InitiateError>, Result<PublicKey, AuthError>) {
        let client = PrivateKey::generate();
        let server = PrivateKey::generate();
        let pinned = pinned.unwrap_or_else(|| server.public_key());
        let (mut a, mut b) = tokio::io::duplex(1024);
        let initiated = async move { initiate(&mut a, service, &client, &pinned, &BINDING).await };
        // The responder's end closes when it is done, as a server's would.
        let responded = async move { respond(&mut b, service, &server, &server_binding).await };
        tokio::join!(initiated, responded)
    }

    #[tokio::test]
    async fn both_sides_of_one_session_authenticate() {
        for service in [Service::Control, Service::Relay] {
            let (initiated, responded) = run(service, None, BINDING).await;
            initiated.unwrap();
            responded.unwrap();
        }
    }

    /// The responder refuses the initiation and ends the stream unanswered.
    fn assert_refused(outcome: (Result<(), InitiateError>, Result<PublicKey, AuthError>)) {
        let (initiated, responded) = outcome;
        assert!(
            matches!(responded, Err(AuthError::Noise(_))),
            "{responded:?}"
        );
        assert!(
            matches!(initiated, Err(InitiateError::Ended)),
            "{initiated:?}"
        );
    }

    #[tokio::test]
    async fn another_tls_session_fails_the_handshake() {
        assert_refused(run(Service::Control, None, [8; 32]).await);
    }

    #[tokio::test]
    async fn a_wrong_pinned_key_fails_the_handshake() {
        let wrong = PrivateKey::generate().public_key();
        assert_refused(run(Service::Relay, Some(wrong), BINDING).await);
    }
}
