//! Control sessions over TLS on TCP, for nodes whose network blocks UDP.
//!
//! The TCP side of the control address also serves the HTTP endpoints
//! unless they listen elsewhere: the first byte of a connection tells them
//! apart, since a TLS connection starts with a handshake record (`0x16`)
//! and an HTTP request with a method name.
//!
//! Every connection first takes a place under the [`ConnectionGate`]'s
//! caps (per source address and in total, sized so that client connections
//! never take the descriptors the coordinator keeps for itself); one beyond
//! them is closed as soon as it is accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsAcceptor;

use super::{session, stopping, Context};
use crate::http;
use crate::limits::{self, ConnectionGate, Permit};

/// What a connection on the control port speaks, by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// A TLS handshake record: a control session.
    Tls,
    /// Anything else: HTTP, when it shares the port.
    Other,
}

/// Classifies a connection by its first byte.
pub(crate) fn classify(first: u8) -> Protocol {
    /// The TLS record content type of a handshake (RFC 8446, 5.1).
    const TLS_HANDSHAKE: u8 = 0x16;
    if first == TLS_HANDSHAKE {
        Protocol::Tls
    } else {
        Protocol::Other
    }
}

/// Where connections that are not TLS go: the HTTP server sharing the
/// port, or nowhere when HTTP listens elsewhere (`--http-listen`).
pub(crate) type HttpHandoff = Option<Arc<http::Server>>;

/// Time a new connection has to send its first byte, and then to complete
/// the TLS and Noise handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on control sessions: a node gone without a trace is
/// noticed within about 30 s, as QUIC's idle timeout does.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 4;
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown`, then waits for the sessions to
/// close.
pub(crate) async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    http: HttpHandoff,
    gate: Arc<ConnectionGate>,
    shutdown: watch::Receiver<bool>,
) {
    let serving = shutdown.clone();
    let name = "control port's TCP listener";
    limits::accept_until(listener, name, gate, shutdown, |stream, remote, permit| {
        route(
            stream,
            remote,
            permit,
            acceptor.clone(),
            Arc::clone(&ctx),
            http.clone(),
            serving.clone(),
        )
    })
    .await;
}

/// Serves one connection as its first byte says, holding its place under
/// the caps until it closes.
async fn route(
    stream: TcpStream,
    remote: SocketAddr,
    _permit: Permit,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    http: HttpHandoff,
    mut shutdown: watch::Receiver<bool>,
) {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        peeked = timeout_at(deadline, stream.peek(&mut first)) => peeked,
        () = stopping(&mut shutdown) => return,
    };
    match peeked {
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "cannot read from a TCP connection on the control port: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "a TCP connection on the control port sent nothing within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    }
    match (classify(first[0]), http) {
        (Protocol::Tls, _) => {
            let _ = stream.set_nodelay(true);
            if let Err(e) = keep_alive(&stream) {
                tracing::debug!(%remote, "cannot enable TCP keep-alive: {e}");
            }
            session::serve_tls(stream, remote, acceptor, ctx, deadline).await;
        }
        (Protocol::Other, Some(http)) => http.serve(stream, remote, &mut shutdown).await,
        (Protocol::Other, None) => {
            tracing::info!(%remote, first_byte = first[0], "closing a connection on the control port that is not TLS (the HTTP endpoints listen elsewhere, see --http-listen)");
        }
    }
}

fn keep_alive(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_handshake_record_is_a_control_session() {
        assert_eq!(classify(0x16), Protocol::Tls);
    }

    #[test]
    fn http_methods_are_not() {
        for method in ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PRI"] {
            assert_eq!(classify(method.as_bytes()[0]), Protocol::Other, "{method}");
        }
    }

    #[test]
    fn every_other_byte_is_not() {
        // Other TLS record types (alert, application data, …) never start a connection.
        for byte in (0..=u8::MAX).filter(|b| *b != 0x16) {
            assert_eq!(classify(byte), Protocol::Other, "{byte:#x}");
        }
    }
}
