//! The control listeners: QUIC on UDP, and TLS on TCP for networks that
//! block UDP; one task per node connection.

mod claims;
mod quic_thread;

pub(crate) mod session;
mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use weft_net::tls::{self, TlsError};
use weft_net::Service;
use weft_proto::{PrivateKey, RelayInfo};

pub(crate) use self::claims::Claims;
pub use self::quic_thread::QuicThread;
pub(crate) use self::session::first_frame_budget;
pub(crate) use self::tcp::accept as accept_tcp;
use crate::flows::FlowWriter;
use crate::limits::{stopping, Report};
use crate::netmap::NetmapHandle;
use crate::nodes::Registry;
use crate::oidc::Logins;
use crate::workload::Workloads;

/// What every session needs.
#[derive(Debug)]
pub(crate) struct Context {
    /// The coordinator's Noise static key.
    pub(crate) key: PrivateKey,
    pub(crate) registry: Registry,
    pub(crate) netmaps: NetmapHandle,
    /// The identity provider people log in with, when one is configured.
    pub(crate) logins: Option<Arc<Logins>>,
    /// The trusted issuers of workload tokens, when any are configured.
    pub(crate) workloads: Option<Arc<Workloads>>,
    /// The configured relays.
    pub(crate) relays: Vec<RelayInfo>,
    /// Where nodes' flow records go.
    pub(crate) flows: FlowWriter,
    /// Becomes `true` when the coordinator shuts down; sessions on TCP end then.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Bytes that nodes' unregistered sessions may hold in large first
    /// frames together (see [`session::FIRST_FRAME_BUDGET`]).
    pub(crate) first_frames: Arc<tokio::sync::Semaphore>,
    /// The machine keys with a live session on this coordinator.
    pub(crate) claims: Arc<Claims>,
    /// Control handshakes that failed, for a log line every few seconds
    /// rather than one per attempt.
    pub(crate) failed_handshakes: std::sync::Mutex<Report>,
}

/// Why the control listener could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the QUIC thread: {0}")]
    QuicThread(#[source] std::io::Error),
}

/// Nodes keep their session alive; a node silent this long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The TLS acceptor of control sessions on TCP, for nodes whose network
/// blocks UDP: the same protocol (ALPN) and the same unchecked certificate
/// as QUIC.
pub(crate) fn tls_acceptor() -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    tls::acceptor(Service::Control)
}

/// Binds the QUIC endpoint on `addr`, driven by the QUIC thread (see
/// [`quic_thread`]) so that sessions' work never delays keep-alives.
///
/// The endpoint's stateless-reset key and connection-ID key are derived from
/// the coordinator's static key, so they are the same across restarts: a
/// coordinator that crashed and came back recognises its old connections' IDs
/// and answers their next packets with a valid stateless reset, and nodes
/// reconnect within a keep-alive interval instead of waiting for their idle
/// timeout.
pub(crate) fn bind(addr: SocketAddr, key: &PrivateKey) -> Result<quinn::Endpoint, ListenError> {
    let server = tls::quic_server_config(
        Service::Control,
        IDLE_TIMEOUT,
        quinn::TransportConfig::default(),
    )?;
    let derived = derive(key, b"weft coordinator QUIC stateless reset v1");
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &derived,
    )));
    let cid_key = derive(key, b"weft coordinator QUIC connection IDs v1");
    let cid_key = u64::from_le_bytes([
        cid_key[0], cid_key[1], cid_key[2], cid_key[3], cid_key[4], cid_key[5], cid_key[6],
        cid_key[7],
    ]);
    endpoint.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| ListenError::Bind { addr, source })?;
    grow_receive_buffer(&socket);
    let runtime = QuicThread::shared().map_err(ListenError::QuicThread)?;
    quinn::Endpoint::new(endpoint, Some(server), socket, runtime)
        .map_err(|source| ListenError::Bind { addr, source })
}

/// The control socket's receive buffer: every node's keep-alive lands on
/// this one socket, and a burst that overflows the default (about 200 KiB)
/// drops keep-alives until sessions time out.
const RECEIVE_BUFFER: usize = 32 << 20;

/// Raises the control socket's receive buffer to [`RECEIVE_BUFFER`]: past
/// the system limit when running as root (`SO_RCVBUFFORCE`), else as far as
/// `net.core.rmem_max` allows. A smaller buffer still works, so failure is
/// only logged.
fn grow_receive_buffer(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size = libc::c_int::try_from(RECEIVE_BUFFER).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the open socket borrowed for this call, and
    // the option value is a live c_int of the length passed.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    let socket = socket2::SockRef::from(socket);
    if !forced {
        if let Err(e) = socket.set_recv_buffer_size(RECEIVE_BUFFER) {
            tracing::info!("cannot raise the control socket's receive buffer: {e}");
        }
    }
    if let Ok(size) = socket.recv_buffer_size() {
        tracing::debug!(bytes = size, "control socket receive buffer");
    }
}

/// A secret bound to the coordinator's identity, domain-separated from every
/// other use of its static key.
fn derive(key: &PrivateKey, purpose: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(purpose);
    hasher.update(key.as_bytes());
    hasher.finalize().into()
}

/// Accepts connections until the endpoint closes, then waits for the
/// sessions to end.
pub(crate) async fn accept(endpoint: quinn::Endpoint, ctx: Arc<Context>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    sessions.spawn(session::serve(incoming, Arc::clone(&ctx)));
                }
                None => break,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(ctx);
    while sessions.join_next().await.is_some() {}
}
