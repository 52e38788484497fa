//! The running relay: its listeners, its coordinator feed and the state
//! they share.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use weft_net::relay::close_reason;
use weft_net::tls::TlsError;
use weft_proto::relay::Message;
use weft_proto::{PrivateKey, PublicKey};

use crate::core::{ConnId, Core, Counters, NotAdmitted, RateLimit};
use crate::{feed, quic, stun, tcp};

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The relay's static key: nodes pin its public half, the coordinator lists it.
    pub key: PrivateKey,
    /// The relay's name, as in the coordinator's `[[relays]]` entry.
    pub name: String,
    /// The UDP address of the QUIC listener.
    pub listen: SocketAddr,
    /// The TCP address of the TLS fallback listener, if any.
    pub tcp_listen: Option<SocketAddr>,
    /// The UDP address of the STUN responder, if any.
    pub stun_listen: Option<SocketAddr>,
    /// The coordinator's control address (`host:port`).
    pub coordinator: String,
    /// The coordinator's key, as `weft-coordinator key` prints it.
    pub coordinator_key: PublicKey,
    /// How much each client may send.
    pub rate: RateLimit,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not bind.
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    stun_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Binds every listener and starts following the coordinator. Fails
    /// before serving if a listener cannot bind.
    pub async fn start(options: RelayOptions) -> Result<Self, StartError> {
        let shared = Arc::new(Shared {
            key: options.key.clone(),
            state: Mutex::new(State {
                core: Core::new(options.rate),
                links: HashMap::new(),
            }),
            next_conn: AtomicU64::new(1),
            dropped_transport: AtomicU64::new(0),
        });
        let bind = |what, addr| move |source| StartError::Bind { what, addr, source };
        let endpoint = quic::bind(options.listen).map_err(|e| match e {
            quic::BindError::Tls(e) => StartError::Tls(e),
            quic::BindError::Io(source) => bind("UDP", options.listen)(source),
        })?;
        let local_addr = endpoint.local_addr().map_err(bind("UDP", options.listen))?;
        let mut tasks = JoinSet::new();
        tasks.spawn(quic::accept(endpoint.clone(), Arc::clone(&shared)));
        let tcp_addr = match options.tcp_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(bind("TCP", addr))?;
                let bound = listener.local_addr().map_err(bind("TCP", addr))?;
                tasks.spawn(tcp::accept(listener, tcp::acceptor()?, Arc::clone(&shared)));
                Some(bound)
            }
            None => None,
        };
        let stun_addr = match options.stun_listen {
            Some(addr) => {
                let socket = tokio::net::UdpSocket::bind(addr)
                    .await
                    .map_err(bind("UDP (STUN)", addr))?;
                let bound = socket.local_addr().map_err(bind("UDP (STUN)", addr))?;
                tasks.spawn(stun::serve(socket));
                Some(bound)
            }
            None => None,
        };
        tasks.spawn(feed::follow(
            feed::FeedConfig {
                coordinator: options.coordinator,
                coordinator_key: options.coordinator_key,
                name: options.name,
            },
            Arc::clone(&shared),
        ));
        tracing::info!(%local_addr, ?tcp_addr, ?stun_addr, relay_key = %options.key.public_key(), "relay listening");
        Ok(Self {
            shared,
            endpoint,
            local_addr,
            tcp_addr,
            stun_addr,
            tasks,
        })
    }

    /// The QUIC listener's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TCP fallback listener's bound address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The STUN responder's bound address.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }

    /// What happened to client packets so far.
    pub fn counters(&self) -> Counters {
        self.shared.lock().core.counters()
    }

    /// The relay's Prometheus metrics, for a scrape handler.
    pub fn metrics(&self) -> crate::metrics::Metrics {
        crate::metrics::Metrics::new(Arc::clone(&self.shared))
    }

    /// Runs until the process is asked to stop.
    pub async fn shutdown(mut self) {
        self.endpoint.close(0u32.into(), b"relay shutting down");
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The state every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) key: PrivateKey,
    state: Mutex<State>,
    next_conn: AtomicU64,
    /// Forwards the destination's transport could not take (full queue, datagram too large).
    dropped_transport: AtomicU64,
}

#[derive(Debug)]
struct State {
    core: Core,
    links: HashMap<ConnId, Link>,
}

/// How to reach one connected client.
#[derive(Debug)]
pub(crate) enum Link {
    Quic {
        conn: quinn::Connection,
        /// Messages larger than the connection's datagram limit, for its stream.
        oversize: mpsc::Sender<Vec<u8>>,
    },
    Tcp {
        /// Encoded messages, framed by the writer.
        messages: mpsc::Sender<Vec<u8>>,
        /// Set to a close code to end the session.
        close: watch::Sender<Option<u32>>,
    },
}

impl Link {
    fn deliver(&self, message: Vec<u8>) -> bool {
        match self {
            Link::Quic { conn, oversize } => {
                if message.len() <= conn.max_datagram_size().unwrap_or(0) {
                    conn.send_datagram(message.into()).is_ok()
                } else {
                    oversize.try_send(message).is_ok()
                }
            }
            Link::Tcp { messages, .. } => messages.try_send(message).is_ok(),
        }
    }

    fn close(&self, code: u32, reason: &'static [u8]) {
        match self {
            Link::Quic { conn, .. } => conn.close(code.into(), reason),
            Link::Tcp { close, .. } => {
                let _ = close.send(Some(code));
            }
        }
    }
}

/// What the relay's metrics report, read under the state's lock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Snapshot {
    pub(crate) counters: Counters,
    pub(crate) dropped_transport: u64,
    pub(crate) admitted: usize,
    pub(crate) quic_sessions: usize,
    pub(crate) tcp_sessions: usize,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let quic_sessions = state
            .links
            .values()
            .filter(|link| matches!(link, Link::Quic { .. }))
            .count();
        Snapshot {
            counters: state.core.counters(),
            dropped_transport: self.dropped_transport.load(Ordering::Relaxed),
            admitted: state.core.admitted_len(),
            quic_sessions,
            tcp_sessions: state.links.len() - quic_sessions,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the core half-updated in
        // a way that widens access: every method is a single decision.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh session id.
    pub(crate) fn next_conn(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Admits a client that proved `key`, reachable through `link`.
    pub(crate) fn connect(
        &self,
        key: PublicKey,
        conn: ConnId,
        link: Link,
    ) -> Result<(), NotAdmitted> {
        let mut state = self.lock();
        state.core.connect(key, conn, Instant::now())?;
        state.links.insert(conn, link);
        state.close_disconnected();
        tracing::debug!(node_key = %key.short(), conn = conn.0, "relay client admitted");
        Ok(())
    }

    /// Forgets a session whose transport ended.
    pub(crate) fn disconnect(&self, key: &PublicKey, conn: ConnId) {
        let mut state = self.lock();
        state.core.disconnect(key, conn);
        state.links.remove(&conn);
    }

    /// Handles one message from a client and forwards it if the core says so.
    pub(crate) fn handle(&self, from: PublicKey, conn: ConnId, bytes: &[u8]) {
        let mut state = self.lock();
        let Some(forward) = state.core.handle_message(from, conn, bytes, Instant::now()) else {
            tracing::trace!(node_key = %from.short(), "relay dropped a packet");
            return;
        };
        let delivered = state
            .links
            .get(&forward.to)
            .is_some_and(|link| link.deliver(forward.message));
        if !delivered {
            self.dropped_transport.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Applies a message of the coordinator's feed.
    pub(crate) fn apply_admissions(&self, full: bool, add: &[PublicKey], remove: &[PublicKey]) {
        let mut state = self.lock();
        state.core.apply_admissions(full, add, remove);
        state.close_disconnected();
        tracing::debug!(
            full,
            added = add.len(),
            removed = remove.len(),
            admitted = state.core.admitted_len(),
            "relay admissions updated"
        );
    }
}

impl State {
    fn close_disconnected(&mut self) {
        while let Some(cut) = self.core.poll_disconnect() {
            if let Some(link) = self.links.remove(&cut.conn) {
                tracing::debug!(node_key = %cut.key.short(), code = cut.code, "ending relay session");
                link.close(cut.code, close_reason(cut.code));
            }
        }
    }
}

/// The `Admitted` answer, as a stream frame.
pub(crate) fn admitted_frame() -> Vec<u8> {
    // A fixed, valid message: encoding cannot fail.
    Message::Admitted.to_stream_frame().unwrap_or_default()
}

/// A `Closed` answer, as a stream frame.
pub(crate) fn closed_frame(code: u32) -> Vec<u8> {
    Message::Closed { code }
        .to_stream_frame()
        .unwrap_or_default()
}
