//! Reaching one coordinator address: QUIC first, TLS on TCP where QUIC gets
//! no answer ([`TransportMemory`]), then the Noise handshake bound to the
//! TLS session. The words for every failure are here too, since only the
//! transport knows what an ended stream or a reset means.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{ConnectionError, ReadError};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use weft_net::handshake::{self, InitiateError};
use weft_net::tls::Liveness;
use weft_net::Service;
use weft_proto::handshake::HandshakeError;
use weft_proto::{PrivateKey, PublicKey};

use super::{ControlError, CONNECT_TIMEOUT};

/// How long QUIC gets at an address where it got no answer last time but
/// TCP worked: long enough for a network that unblocked UDP, short enough
/// that reconnecting where UDP stays blocked is quick.
const QUIC_RETRY_TIMEOUT: Duration = Duration::from_millis(300);

/// QUIC's liveness on the control connection. A coordinator that dies
/// without closing the connection (crash, kill -9, restart) is noticed
/// within the idle timeout, so the node reconnects and takes netmap changes
/// again within seconds. The keep-alives cost one small packet a second; a
/// spurious timeout costs only a reconnect, since tunnels do not depend on
/// the session.
const LIVENESS: Liveness = Liveness {
    keep_alive: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(3),
};

/// The error behind a failure, kept as its `source()`.
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// One address to try: a coordinator address as given, and one of the
/// socket addresses it resolves to.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) remote: SocketAddr,
}

/// How a control session reaches the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Quic,
    /// TLS on TCP, where UDP is blocked.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Quic => "QUIC",
            Transport::Tcp => "TLS over TCP",
        })
    }
}

impl Transport {
    /// What the stream ending cleanly means: QUIC's coordinator finishes
    /// the stream only as it closes the connection; over TLS a
    /// `close_notify` is how it ends a session on purpose.
    fn ended(self) -> &'static str {
        match self {
            Transport::Quic => "the coordinator closed the control stream",
            Transport::Tcp => "the coordinator ended the session (TLS close)",
        }
    }
}

/// Per address, whether QUIC got no answer last time and TCP worked. QUIC
/// is still tried first there, but only for [`QUIC_RETRY_TIMEOUT`], so a
/// node behind a network that blocks UDP reconnects quickly while one whose
/// network unblocked UDP goes back to QUIC.
#[derive(Debug, Default)]
pub(crate) struct TransportMemory {
    over_tcp: HashSet<SocketAddr>,
}

impl TransportMemory {
    /// How long QUIC gets at `remote`.
    fn quic_timeout(&self, remote: SocketAddr) -> Duration {
        if self.over_tcp.contains(&remote) {
            QUIC_RETRY_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        }
    }

    /// Records that `transport` connected to `remote`.
    fn connected(&mut self, remote: SocketAddr, transport: Transport) {
        match transport {
            Transport::Quic => self.over_tcp.remove(&remote),
            Transport::Tcp => self.over_tcp.insert(remote),
        };
    }
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;
type Reader = Box<dyn AsyncRead + Unpin + Send>;

/// A connection to a coordinator: the two directions of its byte stream
/// and the value that binds the Noise handshake to its TLS session.
pub(crate) struct Channel {
    transport: Transport,
    send: Writer,
    recv: Reader,
    binding: [u8; 32],
    /// QUIC's connection, closed with the session.
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Channel {
    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// The Noise handshake, proving `machine_key` and checking that the
    /// coordinator holds `coordinator_key`.
    pub(crate) async fn handshake(
        &mut self,
        machine_key: &PrivateKey,
        coordinator_key: &PublicKey,
    ) -> Result<(), ControlError> {
        let mut stream = tokio::io::join(&mut self.recv, &mut self.send);
        handshake::initiate(
            &mut stream,
            Service::Control,
            machine_key,
            coordinator_key,
            &self.binding,
        )
        .await
        .map_err(|e| match e {
            InitiateError::Noise(e) => ControlError::Handshake(e),
            InitiateError::Send(e) => lost(e),
            InitiateError::Receive(e) => handshake_read_error(e),
            // Closed instead of answering: QUIC's stream finished, or TLS's close_notify.
            InitiateError::Ended => ControlError::Handshake(HandshakeError::Authentication),
        })
    }

    /// Reads what arrived into `buf`; `Ok(0)` when the stream ended.
    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ControlError> {
        self.recv.read(buf).await.map_err(lost)
    }

    /// Writes `bytes` and pushes them out (TLS buffers records until flushed).
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), ControlError> {
        self.send.write_all(bytes).await.map_err(lost)?;
        self.send.flush().await.map_err(lost)
    }

    /// Why the stream ended cleanly, in this transport's words.
    pub(crate) fn ended(&self) -> ControlError {
        ControlError::Lost {
            reason: self.transport.ended().into(),
            source: None,
        }
    }

    pub(crate) async fn close(mut self) {
        match self.quic.take() {
            Some((endpoint, connection)) => {
                connection.close(0u32.into(), b"node closing");
                endpoint.close(0u32.into(), b"");
            }
            // Tell the coordinator this end was deliberate (TLS close_notify).
            None => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.send.shutdown()).await;
            }
        }
    }
}

/// Why an attempt failed: the words for the operator and the error behind
/// them, if one.
struct Failure {
    reason: String,
    source: Option<Cause>,
}

impl Failure {
    fn new(reason: String, source: impl Into<Cause>) -> Self {
        Self {
            reason,
            source: Some(source.into()),
        }
    }

    /// `error` in its own words.
    fn of(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::new(error.to_string(), error)
    }
}

/// Why QUIC did not connect.
enum QuicFailure {
    /// Nothing answered (UDP blocked, or nobody there): worth trying TCP.
    NoAnswer(Failure),
    /// Something answered and refused; TCP would reach the same server.
    Refused(Failure),
}

/// Connects over QUIC, or over TLS on TCP when QUIC gets no answer.
pub(crate) async fn connect(
    target: &Target,
    memory: &mut TransportMemory,
) -> Result<Channel, ControlError> {
    let connect_error = |failure: Failure| ControlError::Connect {
        address: format!("{} ({})", target.name, target.remote),
        reason: failure.reason,
        source: failure.source,
    };
    let quic = match connect_quic(target.remote, memory.quic_timeout(target.remote)).await {
        Ok(channel) => {
            memory.connected(target.remote, Transport::Quic);
            return Ok(channel);
        }
        Err(QuicFailure::Refused(failure)) => return Err(connect_error(failure)),
        Err(QuicFailure::NoAnswer(failure)) => failure,
    };
    tracing::debug!(address = %target.remote, "QUIC failed ({}); trying TLS over TCP", quic.reason);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_tcp(target.remote)).await {
        Ok(Ok(channel)) => {
            memory.connected(target.remote, Transport::Tcp);
            Ok(channel)
        }
        Ok(Err(tcp)) => Err(connect_error(Failure {
            reason: format!("{}; over TCP: {}", quic.reason, tcp.reason),
            source: tcp.source,
        })),
        Err(_) => Err(connect_error(Failure {
            reason: format!(
                "{}; over TCP: no answer within {} ms",
                quic.reason,
                CONNECT_TIMEOUT.as_millis()
            ),
            source: quic.source,
        })),
    }
}

async fn connect_quic(remote: SocketAddr, wait: Duration) -> Result<Channel, QuicFailure> {
    fn local(error: impl std::error::Error + Send + Sync + 'static) -> QuicFailure {
        QuicFailure::NoAnswer(Failure::new(format!("QUIC: {error}"), error))
    }
    let bind: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = weft_net::tls::quic_client(bind, Service::Control, LIVENESS).map_err(local)?;
    let connecting = endpoint
        .connect(remote, Service::Control.server_name())
        .map_err(local)?;
    let connection = match tokio::time::timeout(wait, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e @ ConnectionError::TimedOut)) => return Err(local(e)),
        Ok(Err(e)) => return Err(QuicFailure::Refused(Failure::of(e))),
        Err(_) => {
            endpoint.close(0u32.into(), b"");
            return Err(QuicFailure::NoAnswer(Failure {
                reason: format!("no answer within {} ms", wait.as_millis()),
                source: None,
            }));
        }
    };
    let opened = async {
        let binding = handshake::binding(&connection, Service::Control).map_err(Failure::of)?;
        let (send, recv) = connection.open_bi().await.map_err(Failure::of)?;
        Ok::<_, Failure>((binding, send, recv))
    };
    match opened.await {
        Ok((binding, send, recv)) => Ok(Channel {
            transport: Transport::Quic,
            send: Box::new(send),
            recv: Box::new(recv),
            binding,
            quic: Some((endpoint, connection)),
        }),
        Err(failure) => {
            connection.close(0u32.into(), b"");
            endpoint.close(0u32.into(), b"");
            Err(QuicFailure::Refused(failure))
        }
    }
}

async fn connect_tcp(remote: SocketAddr) -> Result<Channel, Failure> {
    let tcp = TcpStream::connect(remote).await.map_err(Failure::of)?;
    let _ = tcp.set_nodelay(true);
    if let Err(e) = tcp::keep_alive(&tcp) {
        tracing::debug!("cannot enable TCP keep-alive on the control connection: {e}");
    }
    let stream = handshake::connect_tls(tcp, Service::Control)
        .await
        .map_err(|e| Failure::new(format!("TLS: {e}"), e))?;
    let binding = handshake::binding(&stream, Service::Control).map_err(Failure::of)?;
    let (recv, send) = tokio::io::split(stream);
    Ok(Channel {
        transport: Transport::Tcp,
        send: Box::new(send),
        recv: Box::new(recv),
        binding,
        quic: None,
    })
}

/// The connection dropped with `error`.
fn lost(error: std::io::Error) -> ControlError {
    ControlError::Lost {
        reason: describe_io_error(&error),
        source: Some(error),
    }
}

/// A coordinator that cannot authenticate us closes the connection (QUIC
/// with `CLOSE_HANDSHAKE_FAILED`, TLS with `close_notify`) instead of
/// answering, so an end of the stream during the handshake means the pinned
/// key is wrong — except a plain transport failure (a QUIC timeout, a TCP
/// reset or a TCP close without TLS's), which is reported as such.
fn handshake_read_error(error: std::io::Error) -> ControlError {
    let transport_failure = match quic_read_error(&error) {
        Some(ReadError::ConnectionLost(
            e @ (ConnectionError::TimedOut
            | ConnectionError::LocallyClosed
            | ConnectionError::CidsExhausted),
        )) => e.to_string(),
        Some(_) => return ControlError::Handshake(HandshakeError::Authentication),
        None => return lost(error),
    };
    ControlError::Lost {
        reason: transport_failure,
        source: Some(error),
    }
}

/// The QUIC error under an IO error from a QUIC stream.
fn quic_read_error(error: &std::io::Error) -> Option<&ReadError> {
    error.get_ref()?.downcast_ref::<ReadError>()
}

fn describe_io_error(error: &std::io::Error) -> String {
    if let Some(quic) = quic_read_error(error) {
        return describe_read_error(quic);
    }
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "the TCP connection closed without a TLS close from the coordinator".into()
        }
        std::io::ErrorKind::TimedOut => {
            format!("the coordinator stopped answering over TCP ({error})")
        }
        _ => error.to_string(),
    }
}

fn describe_read_error(error: &ReadError) -> String {
    match error {
        ReadError::ConnectionLost(ConnectionError::ApplicationClosed(close))
            if close.error_code == weft_proto::CLOSE_BY_COORDINATOR.into() =>
        {
            format!(
                "the coordinator ended the session ({})",
                String::from_utf8_lossy(&close.reason)
            )
        }
        other => other.to_string(),
    }
}

mod tcp {
    //! Liveness of a control session on TCP, matching QUIC's keep-alive
    //! (1 s) and idle timeout (3 s): a coordinator that vanishes without
    //! closing the connection is noticed within about 3 s whether or not
    //! the node has data in flight.

    use std::os::fd::AsFd;

    use nix::sys::socket::{setsockopt, sockopt};

    /// Idle time before the first probe, and between probes (seconds).
    const KEEPALIVE_IDLE_S: u32 = 1;
    const KEEPALIVE_INTERVAL_S: u32 = 1;
    const KEEPALIVE_PROBES: u32 = 2;
    /// Unacknowledged data (or probes) this long ends the connection.
    const USER_TIMEOUT_MS: u32 = 3_000;

    pub(super) fn keep_alive(stream: &impl AsFd) -> nix::Result<()> {
        setsockopt(stream, sockopt::KeepAlive, &true)?;
        setsockopt(stream, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_S)?;
        setsockopt(stream, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_S)?;
        setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
        setsockopt(stream, sockopt::TcpUserTimeout, &USER_TIMEOUT_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quic_close_in_the_handshake_blames_the_pinned_key() {
        let closed = ReadError::ConnectionLost(ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: weft_proto::CLOSE_HANDSHAKE_FAILED.into(),
                reason: bytes::Bytes::from_static(b"handshake failed"),
            },
        ));
        let err = handshake_read_error(closed.into());
        assert!(err.to_string().contains("--coordinator-key"), "{err}");
        let err = handshake_read_error(ReadError::ConnectionLost(ConnectionError::TimedOut).into());
        assert!(matches!(err, ControlError::Lost { .. }), "{err}");
        assert!(
            std::error::Error::source(&err).is_some(),
            "the QUIC error is kept"
        );
    }

    #[test]
    fn a_tcp_failure_in_the_handshake_is_a_lost_connection() {
        // A TCP close without TLS's close_notify, and a reset: the network, not the key.
        let unclean = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed");
        let err = handshake_read_error(unclean);
        assert!(
            matches!(&err, ControlError::Lost { reason, .. } if reason.contains("without a TLS close")),
            "{err}"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let err = handshake_read_error(reset);
        assert!(matches!(err, ControlError::Lost { .. }));
        let source = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .expect("the IO error is kept");
        assert_eq!(source.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn a_quic_close_mid_session_names_the_coordinator() {
        let closed = ReadError::ConnectionLost(ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: weft_proto::CLOSE_BY_COORDINATOR.into(),
                reason: bytes::Bytes::from_static(b"replaced by a newer session"),
            },
        ));
        assert_eq!(
            describe_io_error(&closed.into()),
            "the coordinator ended the session (replaced by a newer session)"
        );
    }

    #[test]
    fn quic_is_retried_briefly_where_only_tcp_worked() {
        let remote: SocketAddr = "192.0.2.1:7443".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:7443".parse().unwrap();
        let mut memory = TransportMemory::default();
        assert_eq!(memory.quic_timeout(remote), CONNECT_TIMEOUT);
        memory.connected(remote, Transport::Tcp);
        assert_eq!(memory.quic_timeout(remote), QUIC_RETRY_TIMEOUT);
        assert_eq!(memory.quic_timeout(other), CONNECT_TIMEOUT);
        // UDP works again: back to the full wait, which only a dead address pays.
        memory.connected(remote, Transport::Quic);
        assert_eq!(memory.quic_timeout(remote), CONNECT_TIMEOUT);
    }

    #[test]
    fn the_tls_config_builds() {
        weft_net::tls::quic_client_config(Service::Control, LIVENESS).unwrap();
    }
}
