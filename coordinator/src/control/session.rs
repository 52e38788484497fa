//! One node's control session over one QUIC connection, or over one TLS
//! connection on TCP where the node's network blocks UDP.
//!
//! Handshake (Noise IK bound to the TLS exporter), then `Register`, then the
//! netmap stream, the same bytes on either transport. Any failure ends the
//! connection with a close code that tells the node why:
//! [`CLOSE_HANDSHAKE_FAILED`], [`CLOSE_PROTOCOL_ERROR`] or
//! [`CLOSE_BY_COORDINATOR`]. TLS has no close codes: there the coordinator
//! ends a session it means to end with a TLS `close_notify` (after a final
//! `Refused` when there is one), which the node tells apart from a lost
//! connection, and a `close_notify` instead of the handshake response means
//! the node's pinned key is wrong.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use weft_net::handshake::{respond_quic, respond_tls};
use weft_net::Service;
use weft_proto::resume;
use weft_proto::signing::{Chain, NetmapSigner, Record, SignatureError};
use weft_proto::{
    encode_frame, ClientMessage, Credential, DecodeError, EncodeError, FrameDecoder, LoginFlow,
    NodeId, PublicKey, Refusal, RefusalCode, ServerMessage, CLOSE_BY_COORDINATOR,
    CLOSE_HANDSHAKE_FAILED, CLOSE_PROTOCOL_ERROR,
};

use super::claims::Claim;
use super::{stopping, Context};
use crate::audit::{self, Actor, Event, Outcome};
use crate::authkey::AdmitError;
use crate::flows::{BatchError, Progress};
use crate::netmap::{Attached, Opening, SessionEvent};
use crate::nodes;
use crate::nodes::{Login, NodeRecord, Registry, UserLogin};
use crate::oidc::LOGIN_TTL;
use crate::relays::{self, Admissions};
use crate::store::WatchError;
use crate::workload::WorkloadLogin;

/// The largest frame a node may send once registered, and any frame that
/// needs no share of [`FIRST_FRAME_BUDGET`]: a `Register` within every other
/// limit (hostname, 32 endpoints, 64 attributes of 256 bytes) stays well below.
const SMALL_FRAME: usize = 64 * 1024;
/// The largest first frame: a `Register` with the largest resume
/// ([`resume::MAX_RESUME_BYTES`], 65,536 peers).
const MAX_FIRST_FRAME: usize = SMALL_FRAME + resume::MAX_RESUME_BYTES;
/// The bytes of large first frames that all unregistered sessions together
/// may buffer. A session waits for its share (while flow control holds the
/// node's bytes back) rather than every connection a peer opens making the
/// coordinator hold megabytes; after a failover, resumes queue here briefly.
pub(crate) const FIRST_FRAME_BUDGET: usize = 64 << 20;
/// Time allowed from the first packet to a completed Noise handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node may take to accept one message from the coordinator.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed after the handshake for the node's `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a refusal to reach the node before the connection closes.
const LINGER: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 64 * 1024;
/// How often a relay's feed checks for logins that expired: relays drop an
/// expired node within this of its expiry.
const RELAY_EXPIRY_SWEEP: Duration = Duration::from_millis(500);
const SHUTTING_DOWN: &[u8] = b"coordinator shutting down";

/// Runs one QUIC control session to its end.
pub(crate) async fn serve(incoming: quinn::Incoming, ctx: Arc<Context>) {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let conn = match timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "QUIC handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "QUIC handshake timed out");
            return;
        }
    };
    let authenticated = timeout_at(deadline, respond_quic(&conn, Service::Control, &ctx.key));
    let (machine_key, send, recv) = match authenticated.await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            failed_handshake(&ctx, remote, &e);
            conn.close(CLOSE_HANDSHAKE_FAILED.into(), b"handshake failed");
            return;
        }
        Err(_) => {
            failed_handshake(
                &ctx,
                remote,
                &format!("timed out after {HANDSHAKE_TIMEOUT:?}"),
            );
            conn.close(CLOSE_HANDSHAKE_FAILED.into(), b"handshake timed out");
            return;
        }
    };
    let mut session = Session {
        link: Link::Quic { conn, send },
        reader: FrameReader::new(Box::new(recv), Arc::clone(&ctx.first_frames)),
        remote,
        shutdown: ctx.shutdown.clone(),
        ctx,
    };
    session.run(machine_key).await;
}

/// Logs a failed control handshake: at DEBUG each time, and at INFO at
/// first and then at most every few seconds with how many failed since.
/// Unauthenticated clients can fail handshakes by the thousand; the log
/// must say that they do without a line for each.
fn failed_handshake(ctx: &Context, remote: SocketAddr, why: &dyn std::fmt::Display) {
    tracing::debug!(%remote, "control handshake failed: {why}");
    let due = ctx
        .failed_handshakes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .hit(Instant::now());
    if let Some((failed, failed_since_start)) = due {
        tracing::info!(
            %remote,
            failed,
            failed_since_start,
            "control handshakes failing (wrong coordinator key, or not a weft node); the latest: {why}"
        );
    }
}

/// Runs one control session over TLS on TCP to its end. `deadline` bounds
/// the TLS and Noise handshakes.
pub(crate) async fn serve_tls(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Arc<Context>,
    deadline: Instant,
) {
    let mut tls = match timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            return;
        }
    };
    let authenticated =
        timeout_at(deadline, respond_tls(&mut tls, Service::Control, &ctx.key)).await;
    let (recv, send) = tokio::io::split(tls);
    let mut reader = FrameReader::new(Box::new(recv), Arc::clone(&ctx.first_frames));
    let mut link = Link::Tls { send };
    let machine_key = match authenticated {
        Ok(Ok(machine_key)) => machine_key,
        Ok(Err(e)) => {
            failed_handshake(&ctx, remote, &e);
            link.close(CLOSE_HANDSHAKE_FAILED, b"handshake failed", &mut reader)
                .await;
            return;
        }
        Err(_) => {
            failed_handshake(
                &ctx,
                remote,
                &format!("timed out after {HANDSHAKE_TIMEOUT:?}"),
            );
            link.close(CLOSE_HANDSHAKE_FAILED, b"handshake timed out", &mut reader)
                .await;
            return;
        }
    };
    tracing::debug!(%remote, machine = %machine_key.short(), "control session over TLS on TCP");
    let mut session = Session {
        link,
        reader,
        remote,
        shutdown: ctx.shutdown.clone(),
        ctx,
    };
    session.run(machine_key).await;
}

/// How the session reaches the node: the write side of its transport and
/// the transport's way of ending a session.
enum Link {
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
    },
    Tls {
        send: WriteHalf<TlsStream<TcpStream>>,
    },
}

impl Link {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Quic { send, .. } => send.write_all(bytes).await.map_err(Into::into),
            Link::Tls { send } => {
                send.write_all(bytes).await?;
                send.flush().await
            }
        }
    }

    /// Ends the session. QUIC carries `code` and `reason` to the node; TLS
    /// sends `close_notify` and waits (at most [`LINGER`]) for the node to
    /// close its side, so what was written before arrives rather than being
    /// cut off by a reset.
    async fn close(&mut self, code: u32, reason: &'static [u8], reader: &mut FrameReader) {
        match self {
            Link::Quic { conn, .. } => conn.close(code.into(), reason),
            Link::Tls { send } => {
                let _ = timeout(LINGER, async {
                    let _ = send.shutdown().await;
                    reader.drain().await;
                })
                .await;
            }
        }
    }

    /// Why QUIC ended the connection (an idle timeout, a reset, the node's
    /// close code), which a stream error does not tell; `None` on TLS or
    /// while the connection is open.
    fn close_reason(&self) -> Option<String> {
        match self {
            Link::Quic { conn, .. } => conn.close_reason().map(|e| e.to_string()),
            Link::Tls { .. } => None,
        }
    }

    /// Lets what was written reach the node before the session closes.
    async fn linger(&mut self) {
        match self {
            Link::Quic { send, .. } => {
                let _ = send.finish();
                let _ = timeout(LINGER, send.stopped()).await;
            }
            // `close` waits for the node's side to close.
            Link::Tls { .. } => {}
        }
    }
}

struct Session {
    link: Link,
    reader: FrameReader,
    remote: SocketAddr,
    /// Set when the coordinator shuts down: QUIC sessions end with their
    /// endpoint, TLS ones watch this.
    shutdown: watch::Receiver<bool>,
    ctx: Arc<Context>,
}

/// How a session ended, for the log.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("the node closed the session")]
    Closed,
    /// The connection broke.
    #[error("connection lost: {0}")]
    Lost(#[source] std::io::Error),
    /// The node stopped reading, or the coordinator is shutting down.
    #[error("connection lost: {0}")]
    Stalled(String),
    /// A message out of place, described.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A flow record batch the contract rules out.
    #[error("protocol error: {0}")]
    Flows(#[source] BatchError),
    /// A flow record batch could not be kept (the writer logged why).
    #[error("flow batch {0} could not be kept; the node sends it again on its next session")]
    FlowsNotKept(u64),
    /// The node sent bytes that are not a control message.
    #[error("protocol error: {0}")]
    Decode(#[source] DecodeError),
    /// A message could not be encoded.
    #[error("protocol error: {0}")]
    Encode(#[source] EncodeError),
    /// A netmap or delta could not be signed.
    #[error("protocol error: {0}")]
    Sign(#[source] SignatureError),
    /// A netmap or delta too large for one frame: the node is refused (a
    /// refusal it retries after a backoff) instead of losing the connection.
    #[error("netmap too large: {len} bytes exceeds the {max}-byte control frame limit")]
    TooLarge { len: usize, max: usize },
}

impl Session {
    async fn run(&mut self, machine_key: PublicKey) {
        let mut register = match timeout(REGISTER_TIMEOUT, self.reader.next()).await {
            Ok(Ok(Some(ClientMessage::Register(register)))) => register,
            Ok(Ok(Some(ClientMessage::RelayFeed { name }))) => {
                self.reader.registered();
                return self.relay_feed(machine_key, &name).await;
            }
            Ok(Ok(Some(other))) => {
                return self
                    .fail(End::Protocol(format!(
                        "expected Register first, got {}",
                        other.kind()
                    )))
                    .await;
            }
            Ok(Ok(None)) => return self.fail(End::Closed).await,
            Ok(Err(end)) => return self.fail(end).await,
            Err(_) => {
                return self
                    .fail(End::Protocol(format!(
                        "no Register within {REGISTER_TIMEOUT:?}"
                    )))
                    .await
            }
        };
        tracing::debug!(remote = %self.remote, machine = %machine_key.short(), credential = ?register.credential, "registration");
        self.reader.registered();
        let _claim = match self
            .ctx
            .claims
            .claim(machine_key, self.remote, Instant::now())
        {
            Claim::Granted(guard) => guard,
            Claim::InUse(in_use) => {
                if in_use.first {
                    tracing::warn!(
                        machine = %machine_key.short(),
                        holder = %in_use.holder,
                        newcomer = %self.remote,
                        "machine key in use by two connections: was this machine cloned? \
                         Refusing newcomers while the holder is connected (logged once a minute per key)"
                    );
                }
                return self.refuse(in_use.refusal()).await;
            }
        };
        let resume = register.resume.take();
        let stranger = Actor::Machine {
            machine: machine_key.short().to_string(),
        };
        let login = match &register.credential {
            Some(Credential::Interactive(flow)) => match self.login(*flow).await {
                Ok(login) => Some(Login::User(login)),
                Err(Some(refusal)) => {
                    let event = Event::Login {
                        email: None,
                        node: None,
                        result: Outcome::Refused,
                        reason: Some(refusal.message.clone()),
                    };
                    self.audit(stranger, event);
                    return self.refuse(refusal).await;
                }
                Err(None) => return,
            },
            Some(Credential::IdentityToken(token)) => {
                match self.verify_token(token.expose_secret()).await {
                    Ok(workload) => Some(Login::Workload(workload)),
                    Err(refusal) => {
                        let event = Event::WorkloadJoin {
                            spiffe_id: None,
                            node: None,
                            result: Outcome::Refused,
                            reason: Some(refusal.message.clone()),
                        };
                        self.audit(stranger, event);
                        return self.refuse(refusal).await;
                    }
                }
            }
            Some(Credential::AuthKey(_)) | None => None,
        };
        let audited = login.clone();
        let registry = self.ctx.registry.clone();
        let registered = tokio::task::spawn_blocking(move || {
            registry.register_as(machine_key, &register, login.as_ref(), SystemTime::now())
        })
        .await;
        let registered = match registered {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(AdmitError::Refused(refusal))) => Err(refusal),
            Ok(Err(AdmitError::Store(e))) => {
                tracing::error!("cannot register a node: {e}");
                Err(unavailable())
            }
            Err(e) => {
                tracing::error!("registration task failed: {e}");
                Err(unavailable())
            }
        };
        if let Some(login) = &audited {
            let (actor, event) = admission(login, registered.as_ref().map(|(r, _)| r.id));
            self.audit(actor, event);
        }
        let (record, revision) = match registered {
            Ok(done) => done,
            Err(refusal) => return self.refuse(refusal).await,
        };
        tracing::info!(node = %record.id, name = %record.name, ipv4 = %record.ipv4, machine = %machine_key.short(), "node registered");
        tracing::debug!(node = %record.id, identity = %record.identity, "node details");
        let attached = match self
            .ctx
            .netmaps
            .attach(record.clone(), revision, resume)
            .await
        {
            Ok(attached) => attached,
            Err(refusal) => return self.refuse(refusal).await,
        };
        let session = attached.id;
        let end = self.stream(&record, attached).await;
        self.ctx.netmaps.detach(session);
        if let Some(end) = end {
            self.fail(end).await;
        }
    }

    /// Appends to the audit trail off the async runtime, without waiting:
    /// the session goes on whether or not the entry is written.
    fn audit(&self, actor: Actor, event: Event) {
        let store = self.ctx.registry.store().clone();
        let now = SystemTime::now();
        tokio::task::spawn_blocking(move || audit::record(&*store, now, actor, event));
    }

    /// Verifies a workload's platform token against the trusted issuers.
    async fn verify_token(&self, token: &str) -> Result<WorkloadLogin, Refusal> {
        let Some(workloads) = &self.ctx.workloads else {
            return Err(Refusal {
                code: RefusalCode::TokenInvalid,
                message: "this coordinator trusts no workload token issuers; add a [[workload_issuers]] entry to its configuration, or join with `weft up --auth-key KEY`".into(),
            });
        };
        let login = workloads
            .verify(token, SystemTime::now())
            .await
            .map_err(|e| e.refusal())?;
        tracing::debug!(remote = %self.remote, workload = ?login.identity.workload, "workload token verified");
        Ok(login)
    }

    /// Has a person log in through the identity provider while the node
    /// waits. `Err(None)` when the session already ended meanwhile.
    async fn login(&mut self, flow: LoginFlow) -> Result<UserLogin, Option<Refusal>> {
        let Some(logins) = self.ctx.logins.clone() else {
            return Err(Some(Refusal {
                code: RefusalCode::LoginFailed,
                message: "this coordinator has no identity provider configured; join with `weft up --auth-key KEY`".into(),
            }));
        };
        let (prompt, mut waiting) = logins.start(flow).await.map_err(Some)?;
        if let Err(end) = self.write(&ServerMessage::LoginRequired(prompt)).await {
            self.fail(end).await;
            return Err(None);
        }
        tracing::debug!(remote = %self.remote, "waiting for an interactive login");
        tokio::select! {
            result = &mut waiting.result => match result {
                Ok(Ok(who)) => {
                    let now = SystemTime::now() + logins.key_expiry();
                    Ok(UserLogin {
                        user: who.email,
                        groups: who.groups,
                        key_expiry: crate::authkey::unix_secs(now),
                    })
                }
                Ok(Err(refusal)) => Err(Some(refusal)),
                Err(_) => Err(Some(login_expired())),
            },
            () = tokio::time::sleep(LOGIN_TTL) => Err(Some(login_expired())),
            () = stopping(&mut self.shutdown) => {
                self.close(CLOSE_BY_COORDINATOR, SHUTTING_DOWN).await;
                Err(None)
            }
            message = self.reader.next() => {
                match message {
                    Ok(None) => self.fail(End::Closed).await,
                    Ok(Some(_)) => self.fail(End::Protocol("a message arrived before the login completed".into())).await,
                    Err(end) => self.fail(end).await,
                }
                Err(None)
            }
        }
    }

    /// Sends the first messages, then relays updates until the session ends.
    /// `None` when the session already closed the connection itself.
    async fn stream(&mut self, record: &NodeRecord, attached: Attached) -> Option<End> {
        let Attached {
            opening,
            mut events,
            ..
        } = attached;
        let signer = self.ctx.netmaps.signer(&self.ctx.key);
        let (mut chain, first) = match opening {
            Opening::Full(netmap, why) => {
                tracing::debug!(node = %record.id, peers = netmap.peers.len(), "session starts with a full netmap: {why}");
                (
                    Chain::new(record.id, record.node_key),
                    ServerMessage::NetMap(netmap),
                )
            }
            Opening::Resumed { delta, after } => {
                tracing::debug!(
                    node = %record.id,
                    upserts = delta.upsert_peers.len(),
                    removals = delta.remove_peers.len(),
                    "session resumed with a delta"
                );
                (
                    Chain::resume(record.id, record.node_key, after),
                    ServerMessage::Delta(delta),
                )
            }
        };
        let hello = [
            ServerMessage::Registered(record.self_node()),
            ServerMessage::NetmapKey(signer.public_key()),
            first,
        ];
        for message in hello {
            if let Err(end) = self.write_sealed(&signer, &mut chain, message).await {
                return Some(end);
            }
        }
        crate::metrics::registered();
        let _online = crate::metrics::Online::new();
        let mut flows = self.ctx.flows.session(record);
        if !self.ctx.relays.is_empty() {
            let relays = ServerMessage::Relays(self.ctx.relays.clone());
            if let Err(end) = self.write(&relays).await {
                return Some(end);
            }
        }
        loop {
            tokio::select! {
                () = stopping(&mut self.shutdown) => {
                    self.close(CLOSE_BY_COORDINATOR, SHUTTING_DOWN).await;
                    return None;
                }
                event = events.recv() => match event {
                    Some(SessionEvent::Message(message)) => {
                        if let Err(end) = self.write_sealed(&signer, &mut chain, *message).await {
                            return Some(end);
                        }
                    }
                    Some(SessionEvent::Close(refusal)) => {
                        tracing::info!(node = %record.id, "ending the session of a deleted node");
                        self.refuse(refusal).await;
                        return None;
                    }
                    Some(SessionEvent::Replaced) => {
                        tracing::debug!(node = %record.id, "session replaced by a newer one");
                        self.close(CLOSE_BY_COORDINATOR, b"replaced by a newer session").await;
                        return None;
                    }
                    None => {
                        self.close(CLOSE_BY_COORDINATOR, b"session ended by the coordinator; reconnect to resynchronise").await;
                        return None;
                    }
                },
                progress = flows.progress(), if flows.busy() => match progress {
                    Progress::Ack(id) => {
                        if let Err(end) = self.write(&ServerMessage::FlowsAck { id }).await {
                            return Some(end);
                        }
                    }
                    // Until the node sends this batch again, the writer holds
                    // back its later ones: a new session makes it do so.
                    Progress::NotKept(id) => return Some(End::FlowsNotKept(id)),
                    Progress::Submitted => {}
                },
                // Reads only while the node's batches have room on their way
                // to storage: a slow disk holds the node back, not memory.
                message = self.reader.next(), if flows.accepts() => match message {
                    Ok(Some(ClientMessage::UpdateEndpoints(advertisement))) => {
                        let update = move |registry: Registry, id| registry.update_endpoints(id, &advertisement);
                        if let Some(end) = self.update_node(record.id, update).await {
                            return Some(end);
                        }
                    }
                    Ok(Some(ClientMessage::UpdateAttributes(attributes))) => {
                        let update = move |registry: Registry, id| registry.update_attributes(id, &attributes);
                        if let Some(end) = self.update_node(record.id, update).await {
                            return Some(end);
                        }
                    }
                    Ok(Some(ClientMessage::Register(_))) => {
                        return Some(End::Protocol("Register sent twice in one session".into()));
                    }
                    Ok(Some(ClientMessage::RelayFeed { .. })) => {
                        return Some(End::Protocol("RelayFeed sent by a registered node".into()));
                    }
                    Ok(Some(ClientMessage::Flows(batch))) => {
                        if let Err(e) = flows.offer(batch).await {
                            return Some(End::Flows(e));
                        }
                    }
                    Ok(None) => return Some(End::Closed),
                    Err(end) => return Some(end),
                },
            }
        }
    }

    /// Serves a relay: the admitted node keys, in full and then as they
    /// change, until the relay goes away.
    async fn relay_feed(&mut self, key: PublicKey, name: &str) {
        let relay = match relays::configured(&self.ctx.relays, &key, name) {
            Ok(relay) => relay.name.clone(),
            Err(refusal) => return self.refuse(refusal).await,
        };
        tracing::info!(remote = %self.remote, %relay, "relay following admissions");
        let mut watch = self.ctx.registry.store().watch(nodes::NODES_PREFIX);
        let mut sweep = tokio::time::interval(RELAY_EXPIRY_SWEEP);
        let mut feed = Admissions::default();
        let mut next_expiry = None;
        let mut stale = true;
        loop {
            if stale {
                let registry = self.ctx.registry.clone();
                match tokio::task::spawn_blocking(move || registry.nodes()).await {
                    Ok(Ok(nodes)) => {
                        let (keys, expiry) =
                            relays::admitted(nodes.iter().map(|(record, _)| record), unix_now());
                        next_expiry = expiry;
                        stale = false;
                        if let Some(message) = feed.update(keys) {
                            if let Err(end) = self.write(&message).await {
                                return self.fail(end).await;
                            }
                        }
                    }
                    // The sweep retries; the relay keeps its last set meanwhile.
                    Ok(Err(e)) => tracing::error!(%relay, "cannot read the nodes for a relay: {e}"),
                    Err(e) => tracing::error!(%relay, "relay admission task failed: {e}"),
                }
            }
            tokio::select! {
                event = watch.next() => match event {
                    Ok(_) | Err(WatchError::Lagged(_)) => {
                        while watch.try_next().is_some() {}
                        stale = true;
                    }
                    Err(WatchError::Closed) => {
                        self.close(CLOSE_BY_COORDINATOR, SHUTTING_DOWN).await;
                        return;
                    }
                },
                _ = sweep.tick() => {
                    stale |= next_expiry.is_some_and(|expiry| expiry <= unix_now());
                }
                () = stopping(&mut self.shutdown) => {
                    return self.close(CLOSE_BY_COORDINATOR, SHUTTING_DOWN).await;
                }
                message = self.reader.next() => match message {
                    Ok(None) => return self.fail(End::Closed).await,
                    Ok(Some(_)) => return self.fail(End::Protocol("a relay sent a message after RelayFeed".into())).await,
                    Err(end) => return self.fail(end).await,
                },
            }
        }
    }

    /// Stores a change the node reported about itself, off the async runtime.
    /// A refusal ends the session.
    async fn update_node(
        &mut self,
        id: NodeId,
        update: impl FnOnce(Registry, NodeId) -> Result<Option<u64>, AdmitError> + Send + 'static,
    ) -> Option<End> {
        let registry = self.ctx.registry.clone();
        match tokio::task::spawn_blocking(move || update(registry, id)).await {
            Ok(Ok(_)) => None,
            Ok(Err(AdmitError::Refused(refusal))) => {
                self.refuse(refusal).await;
                Some(End::Closed)
            }
            Ok(Err(AdmitError::Store(e))) => {
                tracing::error!(node = %id, "cannot store the node's update: {e}");
                None
            }
            Err(e) => {
                tracing::error!(node = %id, "node update task failed: {e}");
                None
            }
        }
    }

    /// Sends one message. A node that does not take it within
    /// [`WRITE_TIMEOUT`] is stuck or hostile; the session ends.
    async fn write(&mut self, message: &ServerMessage) -> Result<(), End> {
        let frame = encode_frame(message).map_err(|e| match e {
            EncodeError::TooLarge { len, max } => End::TooLarge { len, max },
            e => End::Encode(e),
        })?;
        match timeout(WRITE_TIMEOUT, self.link.write_all(&frame)).await {
            Ok(written) => written.map_err(End::Lost),
            Err(_) => Err(End::Stalled(format!(
                "the node did not read a message within {WRITE_TIMEOUT:?}"
            ))),
        }
    }

    /// Sends one message, a netmap or delta signed as the next record of
    /// the session's chain.
    async fn write_sealed(
        &mut self,
        signer: &NetmapSigner,
        chain: &mut Chain,
        message: ServerMessage,
    ) -> Result<(), End> {
        let message = seal(signer, chain, message)?;
        self.write(&message).await
    }

    /// Sends `refusal`, waits briefly for it to arrive, and closes.
    async fn refuse(&mut self, refusal: Refusal) {
        crate::metrics::refused(refusal.code);
        if refusal.code == RefusalCode::MachineKeyInUse {
            // Logged once a minute per key by the caller, not per attempt.
            tracing::debug!(remote = %self.remote, "refusing node: {}", refusal.message);
        } else {
            tracing::info!(remote = %self.remote, code = ?refusal.code, "refusing node: {}", refusal.message);
        }
        if self.write(&ServerMessage::Refused(refusal)).await.is_ok() {
            self.link.linger().await;
        }
        self.close(CLOSE_BY_COORDINATOR, b"refused").await;
    }

    async fn fail(&mut self, end: End) {
        match &end {
            End::TooLarge { .. } => {
                let refusal = Refusal {
                    code: RefusalCode::Unavailable,
                    message: format!(
                        "{end}: the policy gives this node more peers or rules than one \
                         frame holds; the policy's operator must shrink it"
                    ),
                };
                self.refuse(refusal).await;
            }
            End::Protocol(_) | End::Flows(_) | End::Decode(_) | End::Encode(_) | End::Sign(_) => {
                tracing::info!(remote = %self.remote, "closing control session: {end}");
                self.close(CLOSE_PROTOCOL_ERROR, b"protocol error").await;
            }
            End::FlowsNotKept(_) => {
                tracing::info!(remote = %self.remote, "ending control session: {end}");
                self.close(
                    CLOSE_BY_COORDINATOR,
                    b"cannot keep flow records now; reconnect",
                )
                .await;
            }
            End::Closed | End::Lost(_) | End::Stalled(_) => {
                match self.link.close_reason() {
                    Some(why) => {
                        tracing::debug!(remote = %self.remote, "control session ended: {end} ({why})")
                    }
                    None => tracing::debug!(remote = %self.remote, "control session ended: {end}"),
                }
                self.close(0, b"").await;
            }
        }
    }

    async fn close(&mut self, code: u32, reason: &'static [u8]) {
        self.link.close(code, reason, &mut self.reader).await;
    }
}

/// Signs a netmap or delta as the next record of the session's chain;
/// other messages pass unchanged.
fn seal(
    signer: &NetmapSigner,
    chain: &mut Chain,
    message: ServerMessage,
) -> Result<ServerMessage, End> {
    let record = match message {
        ServerMessage::NetMap(netmap) => Record::NetMap(netmap),
        ServerMessage::Delta(delta) => Record::Delta(delta),
        other => return Ok(other),
    };
    chain
        .sign(signer, &record)
        .map(ServerMessage::Signed)
        .map_err(End::Sign)
}

fn unix_now() -> u64 {
    crate::authkey::unix_secs(SystemTime::now())
}

fn login_expired() -> Refusal {
    Refusal {
        code: RefusalCode::LoginFailed,
        message:
            "the login link expired before the login completed; run `weft login` for a new one"
                .into(),
    }
}

/// The audit entry of a person's login or a workload's join that got as
/// far as registering: admitted as a node, or refused.
fn admission(login: &Login, admitted: Result<NodeId, &Refusal>) -> (Actor, Event) {
    let (node, result, reason) = match admitted {
        Ok(node) => (Some(node), Outcome::Accepted, None),
        Err(refusal) => (None, Outcome::Refused, Some(refusal.message.clone())),
    };
    match login {
        Login::User(user) => (
            Actor::User {
                email: user.user.clone(),
            },
            Event::Login {
                email: Some(user.user.clone()),
                node,
                result,
                reason,
            },
        ),
        Login::Workload(workload) => {
            let spiffe_id = workload.identity.workload.clone();
            let actor = match &spiffe_id {
                Some(spiffe_id) => Actor::Workload {
                    spiffe_id: spiffe_id.clone(),
                },
                None => Actor::Workload {
                    spiffe_id: workload.identity.to_string(),
                },
            };
            let event = Event::WorkloadJoin {
                spiffe_id,
                node,
                result,
                reason,
            };
            (actor, event)
        }
    }
}

fn unavailable() -> Refusal {
    Refusal {
        code: RefusalCode::Unavailable,
        message: "the coordinator cannot reach its database right now; retry later".into(),
    }
}

/// Reads whole client messages from the control stream, whichever
/// transport carries it.
struct FrameReader {
    recv: Box<dyn AsyncRead + Unpin + Send + Sync>,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// The first-frame budget, shared by every session.
    budget: Arc<Semaphore>,
    /// The budget share of the large frame being received.
    held: Option<OwnedSemaphorePermit>,
}

/// The first-frame budget, as a semaphore of [`SMALL_FRAME`]-sized units.
pub(crate) fn first_frame_budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(budget_units(FIRST_FRAME_BUDGET) as usize))
}

fn budget_units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(SMALL_FRAME)).unwrap_or(u32::MAX)
}

impl FrameReader {
    fn new(recv: Box<dyn AsyncRead + Unpin + Send + Sync>, budget: Arc<Semaphore>) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::with_limit(MAX_FIRST_FRAME),
            buf: vec![0; READ_CHUNK],
            budget,
            held: None,
        }
    }

    /// Holds every later frame to [`SMALL_FRAME`]: only the first may
    /// carry a resume.
    fn registered(&mut self) {
        self.decoder.set_limit(SMALL_FRAME);
    }

    /// The next message; `None` when the node finished the stream cleanly.
    /// Cancel-safe: bytes are only consumed once a read completes.
    ///
    /// A frame larger than [`SMALL_FRAME`] is buffered only with its share
    /// of the first-frame budget, held until the frame is whole.
    async fn next(&mut self) -> Result<Option<ClientMessage>, End> {
        loop {
            match self.decoder.next_message::<ClientMessage>() {
                Ok(Some(message)) => {
                    self.held = None;
                    return Ok(Some(message));
                }
                Ok(None) => {}
                Err(e) => return Err(End::Decode(e)),
            }
            if let (None, Some(len)) = (&self.held, self.decoder.pending_len()) {
                if len > SMALL_FRAME {
                    let budget = Arc::clone(&self.budget);
                    let share = budget_units(len).min(budget_units(FIRST_FRAME_BUDGET));
                    let permit = budget
                        .acquire_many_owned(share)
                        .await
                        .map_err(|_| End::Stalled("the coordinator is shutting down".into()))?;
                    self.held = Some(permit);
                }
            }
            match self.recv.read(&mut self.buf).await {
                Ok(0) => return self.decoder.finish().map(|()| None).map_err(End::Decode),
                Ok(n) => self.decoder.push(&self.buf[..n]),
                Err(e) => return Err(End::Lost(e)),
            }
        }
    }

    /// Discards what the node still sends until it closes its side.
    async fn drain(&mut self) {
        while let Ok(1..) = self.recv.read(&mut self.buf).await {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn large_message() -> (ClientMessage, Vec<u8>) {
        let attributes = BTreeMap::from([("custom:blob".to_owned(), "x".repeat(3 * SMALL_FRAME))]);
        let message = ClientMessage::UpdateAttributes(attributes);
        let frame = encode_frame(&message).unwrap();
        (message, frame)
    }

    fn reader(budget: &Arc<Semaphore>) -> (FrameReader, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(8 * SMALL_FRAME);
        (FrameReader::new(Box::new(ours), Arc::clone(budget)), theirs)
    }

    #[tokio::test]
    async fn a_large_first_frame_holds_its_share_until_it_is_whole() {
        let budget = first_frame_budget();
        let all = budget.available_permits();
        let (mut reader, mut node) = reader(&budget);
        let (message, frame) = large_message();
        node.write_all(&frame[..SMALL_FRAME]).await.unwrap();
        let read = tokio::spawn(async move { (reader.next().await.unwrap(), reader) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            budget.available_permits(),
            all - 4,
            "3 units of payload and the frame header"
        );
        node.write_all(&frame[SMALL_FRAME..]).await.unwrap();
        let (got, _reader) = read.await.unwrap();
        assert_eq!(got, Some(message));
        assert_eq!(budget.available_permits(), all);
    }

    #[tokio::test]
    async fn a_large_first_frame_waits_while_the_budget_is_spent() {
        let budget = first_frame_budget();
        let spent = Arc::clone(&budget)
            .acquire_many_owned(budget.available_permits() as u32)
            .await
            .unwrap();
        let (mut reader, mut node) = reader(&budget);
        let (message, frame) = large_message();
        node.write_all(&frame).await.unwrap();
        let waited = timeout(Duration::from_millis(200), reader.next()).await;
        assert!(waited.is_err(), "read a large frame without budget");
        drop(spent);
        assert_eq!(reader.next().await.unwrap(), Some(message));
    }

    #[tokio::test]
    async fn once_registered_a_large_frame_is_refused() {
        let budget = first_frame_budget();
        let (mut reader, mut node) = reader(&budget);
        reader.registered();
        node.write_all(&large_message().1).await.unwrap();
        assert!(matches!(
            reader.next().await,
            Err(End::Decode(DecodeError::BadLength { .. }))
        ));
    }
}
