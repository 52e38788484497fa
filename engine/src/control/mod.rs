//! The control client: one task that keeps a session with the coordinator and
//! reports what it learns to the daemon's main loop.
//!
//! A session is a QUIC connection, a Noise `IK` handshake bound to it, a
//! registration and then a stream of netmaps. Where QUIC gets no answer
//! (networks that block UDP) the same session runs over TLS on TCP to the
//! same address and port, with the same handshake (bound to that TLS
//! session) and the same frames; QUIC is tried first again on every later
//! attempt (`connect`), so a network that unblocks UDP goes back to it.
//! The node may know several replicas of the coordinator ([`Coordinators`]):
//! the task tries their addresses in order (every address a name resolves
//! to), gives each [`CONNECT_TIMEOUT`] to answer, stays with the first that
//! works, and when that session drops moves straight on to the next
//! address. Only after a whole round of addresses failed does it wait, with
//! jittered exponential backoff (`failover`). The daemon keeps the last
//! netmap in force meanwhile, so tunnels keep working while the coordinator
//! is away. A refusal that retrying cannot fix (deleted node, missing or
//! spent auth key) ends the task.
//!
//! The protocol's rules live in a sans-IO `session::Session`; this task
//! only connects, moves bytes and timeouts to it and carries out what it
//! asks: frames to write, events for the daemon, cache writes. It folds
//! every verified netmap and delta into the view it holds (`held::Held`),
//! and a reconnect resumes from it ([`weft_proto::resume`]): the
//! coordinator answers with a delta against that view, chained after its
//! last record, instead of a full netmap. A task started on a verified cache
//! resumes from the cache.

mod connect;
mod failover;
#[cfg(test)]
pub(crate) mod fixtures;
mod held;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_proto::handshake::HandshakeError;
use weft_proto::{
    Advertisement, Credential, DecodeError, LoginPrompt, NetMap, NetMapDelta, PrivateKey,
    PublicKey, Refusal, RelayInfo, SelfNode, SignatureError,
};

use crate::coordinators::Coordinators;
use crate::flows::FlowQueue;
use crate::netmap_cache::{CacheError, CacheWriter};
use crate::posture::{self, Attributes, SystemAttributes};
use connect::{Channel, Target, TransportMemory};
use failover::{Failover, Next};
use held::Held;
use session::{CacheUpdate, End, Hello, Session, SessionEvent};

/// How long one coordinator address gets to complete the QUIC handshake
/// before TLS on TCP, and then the next address, is tried; a live replica
/// answers within milliseconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the control task needs to register the node.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The coordinator's replicas, tried in order.
    pub coordinator: Coordinators,
    /// The coordinator's pinned static key (shared by all its replicas).
    pub coordinator_key: PublicKey,
    /// This machine's Noise key.
    pub machine_key: PrivateKey,
    /// What admits the node: a pre-auth key, a person's login, or a
    /// workload's identity token. Dropped once registered, since a known
    /// machine rejoins with its machine key alone while its key is valid.
    pub credential: Option<Credential>,
    /// The name the node asks for.
    pub hostname: String,
    /// The node's WireGuard public key.
    pub node_key: PublicKey,
    /// Where the node can be reached (its endpoints and home relay), kept
    /// current by the daemon; sent with the registration and again
    /// whenever it changes.
    pub advertisement: tokio::sync::watch::Receiver<Advertisement>,
    /// weft's own `node:*` posture attributes, read from the host each
    /// time the node reports them.
    pub system_attributes: SystemAttributes,
    /// The node's `custom:*` posture attributes ([`crate::posture`]); sent
    /// with the registration and again whenever they change.
    pub posture: tokio::sync::watch::Receiver<Attributes>,
}

/// Something the control task learned, tagged with the session that learned it.
#[derive(Debug)]
pub struct ControlUpdate {
    /// The [`ControlTask::session`] this came from; stale updates are ignored.
    pub session: u64,
    /// What happened.
    pub event: ControlEvent,
}

/// What the control task reports.
#[derive(Debug)]
pub enum ControlEvent {
    /// A coordinator at this address authenticated itself; the session goes on there.
    Connected(SocketAddr),
    /// The coordinator accepted the node.
    Registered(SelfNode),
    /// A person must log in at the prompt's URL; the session waits for it.
    LoginRequired(LoginPrompt),
    /// The coordinator refused the node. [`ControlEvent::is_final`] says whether the task gave up.
    Refused(Refusal),
    /// A complete netmap.
    NetMap(NetMap),
    /// A change to the netmap.
    Delta(NetMapDelta),
    /// The relays the node may use, replacing the previous list.
    Relays(Vec<RelayInfo>),
    /// The session ended; the task retries after a backoff.
    Disconnected(ControlError),
}

/// Why a control session ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The coordinator address does not resolve.
    #[error("cannot resolve coordinator address {address}: {reason} (expected HOST:PORT)")]
    Resolve {
        /// The address given.
        address: String,
        /// Why it did not resolve.
        reason: String,
        /// The last lookup's error, if a lookup failed.
        #[source]
        source: Option<std::io::Error>,
    },
    /// No connection could be made, over QUIC or TCP.
    #[error("cannot connect to the coordinator at {address}: {reason}")]
    Connect {
        /// The address given.
        address: String,
        /// The transport's reason.
        reason: String,
        /// The error behind the reason (TCP's, when TCP was tried too).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The Noise handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The connection dropped after the handshake.
    #[error("lost the connection to the coordinator: {reason}")]
    Lost {
        /// What happened to the connection.
        reason: String,
        /// The transport's error; `None` when the coordinator ended the stream.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The coordinator sent something undecodable.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The coordinator sent messages out of order.
    #[error("the coordinator broke the control protocol: {0}")]
    Protocol(&'static str),
    /// A netmap did not verify; it was not applied.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// The running control task; dropping it ends the session.
#[derive(Debug)]
pub struct ControlTask {
    session: u64,
    handle: JoinHandle<()>,
}

impl ControlTask {
    /// Starts a task that connects, registers and reports to `updates`.
    pub fn spawn(
        config: ControlConfig,
        session: u64,
        updates: mpsc::Sender<ControlUpdate>,
    ) -> Self {
        let emitter = Emitter { session, updates };
        let handle = tokio::spawn(Task::new(config, emitter, None, None).run());
        Self { session, handle }
    }

    /// Like [`ControlTask::spawn`], and keeps every verified netmap in
    /// `cache` ([`crate::netmap_cache`]) before reporting it, and sends the
    /// flow batches `flows` holds ([`crate::flows`]) once registered.
    pub fn spawn_caching(
        config: ControlConfig,
        cache: CacheWriter,
        flows: Arc<FlowQueue>,
        session: u64,
        updates: mpsc::Sender<ControlUpdate>,
    ) -> Self {
        let emitter = Emitter { session, updates };
        let handle = tokio::spawn(Task::new(config, emitter, Some(cache), Some(flows)).run());
        Self { session, handle }
    }

    /// The tag on this task's updates.
    pub fn session(&self) -> u64 {
        self.session
    }
}

impl Drop for ControlTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl ControlEvent {
    /// Whether the control task stopped after this event.
    pub fn is_final(&self) -> bool {
        matches!(self, ControlEvent::Refused(refusal) if failover::is_final_refusal(refusal.code))
    }
}

/// Sends updates to the daemon; `Err` means the daemon is gone.
#[derive(Debug)]
struct Emitter {
    session: u64,
    updates: mpsc::Sender<ControlUpdate>,
}

impl Emitter {
    async fn emit(&self, event: ControlEvent) -> Result<(), DaemonGone> {
        let update = ControlUpdate {
            session: self.session,
            event,
        };
        self.updates.send(update).await.map_err(|_| DaemonGone)
    }
}

struct DaemonGone;

/// How a session ended other than by a transport failure.
enum Ended {
    Refused(Refusal),
    DaemonGone,
}

/// The control task's state across sessions.
#[derive(Debug)]
struct Task {
    config: ControlConfig,
    emitter: Emitter,
    cache: Option<CacheWriter>,
    /// Flow batches for the coordinator, kept across sessions.
    flows: Option<Arc<FlowQueue>>,
    /// The view the next session resumes from.
    held: Option<Held>,
    transports: TransportMemory,
}

impl Task {
    fn new(
        config: ControlConfig,
        emitter: Emitter,
        mut cache: Option<CacheWriter>,
        flows: Option<Arc<FlowQueue>>,
    ) -> Self {
        let held = cache
            .as_mut()
            .and_then(|cache| restore(cache, config.node_key));
        Self {
            config,
            emitter,
            cache,
            flows,
            held,
            transports: TransportMemory::default(),
        }
    }

    async fn run(mut self) {
        let mut failover = Failover::new();
        let mut targets = Vec::new();
        let mut lookup_error = None;
        loop {
            if failover.round_starts(targets.len()) {
                (targets, lookup_error) = resolve(&self.config.coordinator).await;
            }
            let (outcome, registered) = match targets.as_slice() {
                [] => {
                    let error = ControlError::Resolve {
                        address: self.config.coordinator.to_string(),
                        reason: "no address resolved".into(),
                        source: lookup_error.take(),
                    };
                    (Err(error), false)
                }
                all => self.attempt(&all[failover.pick(all.len())]).await,
            };
            let event = match outcome {
                Ok(Ended::DaemonGone) => return,
                Ok(Ended::Refused(refusal)) => ControlEvent::Refused(refusal),
                Err(error) => ControlEvent::Disconnected(error),
            };
            let refusal = match &event {
                ControlEvent::Refused(r) => {
                    tracing::warn!(code = ?r.code, "coordinator refused the node: {}", r.message);
                    Some(r.code)
                }
                _ => None,
            };
            if let ControlEvent::Disconnected(e) = &event {
                tracing::warn!("control session ended: {e}");
            }
            let jitter: f64 = rand::thread_rng().gen();
            let next = failover.after(refusal, registered, targets.len(), jitter);
            if next == Next::Stop {
                // A node the coordinator no longer admits keeps no netmap to restart with.
                if let Some(cache) = self.cache.as_mut() {
                    cache.discard();
                }
            }
            if self.emitter.emit(event).await.is_err() || next == Next::Stop {
                return;
            }
            if let Next::Wait { delay, in_use } = next {
                let delay_ms = delay.as_millis() as u64;
                if in_use {
                    tracing::info!(
                        delay_ms,
                        "another connection holds this machine key; retrying"
                    );
                } else {
                    tracing::info!(delay_ms, "no coordinator address answered; retrying");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// One session at `target`; also says whether the coordinator accepted
    /// the node in it.
    async fn attempt(&mut self, target: &Target) -> (Result<Ended, ControlError>, bool) {
        let mut channel = match connect::connect(target, &mut self.transports).await {
            Ok(channel) => channel,
            Err(error) => return (Err(error), false),
        };
        let outcome = self.converse(&mut channel, target).await;
        channel.close().await;
        outcome
    }

    async fn converse(
        &mut self,
        channel: &mut Channel,
        target: &Target,
    ) -> (Result<Ended, ControlError>, bool) {
        let config = &mut self.config;
        if let Err(error) = channel
            .handshake(&config.machine_key, &config.coordinator_key)
            .await
        {
            return (Err(error), false);
        }
        tracing::info!(coordinator = %target.name, address = %target.remote, transport = %channel.transport(), "connected to the coordinator");
        if self
            .emitter
            .emit(ControlEvent::Connected(target.remote))
            .await
            .is_err()
        {
            return (Ok(Ended::DaemonGone), false);
        }
        let advertisement = config.advertisement.borrow_and_update().clone();
        let hello = Hello {
            credential: config.credential.clone(),
            hostname: config.hostname.clone(),
            node_key: config.node_key,
            advertisement,
            attributes: report(config),
        };
        // Resume only from a view the cache (if any) holds in full: a cache
        // dropped as too large restarts from the full netmap this asks for.
        let resume = self
            .held
            .take()
            .filter(|_| self.cache.as_ref().is_none_or(CacheWriter::is_current));
        let mut session = Session::new(hello, resume, now());
        if let Some(flows) = &self.flows {
            flows.rewind();
        }
        let outcome = self.drive(&mut session, channel).await;
        let registered = session.is_registered();
        if registered {
            self.config.credential = None;
        }
        self.held = session.into_held();
        (outcome, registered)
    }

    /// Moves bytes, changes and timeouts into `session` and carries out
    /// what it asks, until it ends.
    async fn drive(
        &mut self,
        session: &mut Session,
        channel: &mut Channel,
    ) -> Result<Ended, ControlError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut posture_open = true;
        let mut advertisement_open = true;
        loop {
            while let Some(event) = session.poll_event() {
                match event {
                    SessionEvent::Control(event) => {
                        if self.emitter.emit(event).await.is_err() {
                            return Ok(Ended::DaemonGone);
                        }
                    }
                    SessionEvent::Cache(update) => self.keep(update),
                    SessionEvent::RefreshAttributes => {
                        session.attributes_changed(report(&mut self.config));
                    }
                    SessionEvent::FlowsAcked(id) => {
                        if let Some(flows) = &self.flows {
                            flows.ack(id);
                        }
                    }
                    SessionEvent::Ended(End::Refused(refusal)) => {
                        return Ok(Ended::Refused(refusal))
                    }
                    SessionEvent::Ended(End::Closed) => return Err(channel.ended()),
                    SessionEvent::Ended(End::Failed(error)) => return Err(error),
                }
            }
            if let Some(flows) = &self.flows {
                while session.can_send_flows() {
                    let Some((id, frame)) = flows.next_unsent() else {
                        break;
                    };
                    session.send_flows(id, frame);
                }
            }
            while let Some(frame) = session.poll_transmit() {
                channel.write(&frame).await?;
            }
            let deadline = session.poll_timeout();
            let config = &mut self.config;
            let flows = self.flows.as_deref();
            tokio::select! {
                read = channel.read(&mut buf) => match read? {
                    0 => session.handle_eof(),
                    n => session.handle_input(&buf[..n]),
                },
                changed = config.posture.changed(), if posture_open => match changed {
                    Ok(()) => session.attributes_changed(report(config)),
                    Err(_) => posture_open = false,
                },
                changed = config.advertisement.changed(), if advertisement_open => match changed {
                    Ok(()) => session.advertisement_changed(config.advertisement.borrow_and_update().clone()),
                    Err(_) => advertisement_open = false,
                },
                () = sleep_until(deadline), if deadline.is_some() => session.handle_timeout(now()),
                // A batch was sealed: the loop sends it if the session takes it.
                () = sealed(flows), if session.can_send_flows() => {}
            }
        }
    }

    /// Carries out a cache update. A cache that cannot keep up is dropped
    /// (the writer removes it), never left behind.
    fn keep(&mut self, update: CacheUpdate) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let result = match update {
            CacheUpdate::NetMap { node, record } => cache.netmap(node, &record),
            CacheUpdate::Delta(record) => cache.delta(&record),
            CacheUpdate::Key(key) => {
                if let Err(e) = cache.save_key(key) {
                    tracing::warn!("cannot keep the coordinator's netmap key; a restart during an outage will start without peers: {e}");
                }
                return;
            }
            CacheUpdate::Touch => {
                cache.touch();
                return;
            }
        };
        if let Err(e) = result {
            tracing::warn!(
                "not caching the netmap; a restart during an outage will start without peers: {e}"
            );
        }
    }
}

/// The node's attributes as they are now, system and custom; marks the
/// custom ones seen.
fn report(config: &mut ControlConfig) -> Attributes {
    let custom = config.posture.borrow_and_update().clone();
    posture::report(config.system_attributes, &config.hostname, &custom)
}

/// The session clock: tokio's, so tests with a paused clock can jump it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Waits until `flows` seals a batch, or forever without flows.
async fn sealed(flows: Option<&FlowQueue>) {
    match flows {
        Some(flows) => flows.wait_sealed().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The cache's view, when it verifies and is fresh ([`CacheWriter::reopen`]).
fn restore(cache: &mut CacheWriter, node_key: PublicKey) -> Option<Held> {
    match cache.reopen(node_key, std::time::SystemTime::now()) {
        Ok(restored) => {
            tracing::debug!(
                revision = restored.netmap.revision,
                peers = restored.netmap.peers.len(),
                "the first session resumes from the cached netmap"
            );
            Some(Held::restored(restored))
        }
        Err(CacheError::Missing) => None,
        Err(e) => {
            tracing::debug!("not resuming from the cached netmap: {e}");
            None
        }
    }
}

/// Every socket address the coordinator addresses resolve to, in order and
/// without repeats; names that do not resolve are logged and skipped. Also
/// the last lookup's error, for when none resolves.
async fn resolve(coordinators: &Coordinators) -> (Vec<Target>, Option<std::io::Error>) {
    let mut targets: Vec<Target> = Vec::new();
    let mut failed = None;
    for address in coordinators.addresses() {
        match tokio::net::lookup_host(address.as_str()).await {
            Ok(remotes) => {
                for remote in remotes {
                    if !targets.iter().any(|t| t.remote == remote) {
                        targets.push(Target {
                            name: address.to_string(),
                            remote,
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot resolve coordinator address {address}: {e}");
                failed = Some(e);
            }
        }
    }
    (targets, failed)
}
#[cfg(test)]
mod tests {
    use weft_proto::{AuthKey, RefusalCode, Register, Resume, ServerMessage};

    use super::fixtures::{empty_netmap, peer, self_node, signed_hello};
    use super::*;

    #[test]
    fn only_an_unavailable_coordinator_is_retried() {
        let refused = |code| {
            ControlEvent::Refused(Refusal {
                code,
                message: String::new(),
            })
        };
        assert!(!refused(RefusalCode::Unavailable).is_final());
        for code in [
            RefusalCode::NodeDeleted,
            RefusalCode::AuthKeyUsed,
            RefusalCode::AuthKeyRequired,
            RefusalCode::AuthKeyExpired,
            RefusalCode::AuthKeyInvalid,
        ] {
            assert!(refused(code).is_final(), "{code:?}");
        }
        assert!(!ControlEvent::Disconnected(ControlError::Lost {
            reason: "x".into(),
            source: None,
        })
        .is_final());
    }

    /// The coordinator's side of a session, over real QUIC on loopback.
    mod fake_coordinator {
        use std::net::SocketAddr;
        use std::time::Duration;

        use tokio::sync::mpsc;
        use weft_net::handshake::respond_quic;
        use weft_net::Service;
        use weft_proto::{
            encode_frame, ClientMessage, FrameDecoder, PrivateKey, Register, ServerMessage,
        };

        /// Starts a coordinator that answers each registration with `answers`
        /// and reports what it received.
        pub(super) fn start(
            key: PrivateKey,
            answers: Vec<ServerMessage>,
            close_after_answers: bool,
        ) -> (SocketAddr, mpsc::UnboundedReceiver<Register>) {
            start_with(key, move |_| answers.clone(), close_after_answers)
        }

        /// Like [`start`], answering each registration with what `answer`
        /// makes of it.
        pub(super) fn start_with(
            key: PrivateKey,
            answer: impl Fn(&Register) -> Vec<ServerMessage> + Send + 'static,
            close_after_answers: bool,
        ) -> (SocketAddr, mpsc::UnboundedReceiver<Register>) {
            let config = weft_net::tls::quic_server_config(
                Service::Control,
                Duration::from_secs(30),
                quinn::TransportConfig::default(),
            )
            .unwrap();
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = endpoint.local_addr().unwrap();
            let (seen_tx, seen) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let connection = incoming.await.unwrap();
                    let Ok((_, mut send, mut recv)) =
                        respond_quic(&connection, Service::Control, &key).await
                    else {
                        connection.close(
                            weft_proto::CLOSE_HANDSHAKE_FAILED.into(),
                            b"handshake failed",
                        );
                        continue;
                    };
                    let mut decoder = FrameDecoder::new();
                    let mut buf = [0u8; 4096];
                    let register = loop {
                        if let Some(ClientMessage::Register(r)) = decoder.next_message().unwrap() {
                            break r;
                        }
                        let n = recv.read(&mut buf).await.unwrap().unwrap();
                        decoder.push(&buf[..n]);
                    };
                    let answers = answer(&register);
                    seen_tx.send(register).unwrap();
                    for answer in &answers {
                        send.write_all(&encode_frame(answer).unwrap())
                            .await
                            .unwrap();
                    }
                    if close_after_answers {
                        // Closing discards unacknowledged stream data; let it arrive first.
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        connection.close(weft_proto::CLOSE_BY_COORDINATOR.into(), b"restarting");
                    } else {
                        let _ = connection.closed().await;
                    }
                }
            });
            (addr, seen)
        }
    }

    /// A caching control task against a fake coordinator that answers with
    /// the signed first netmap (its signature broken when `tamper`).
    struct CachingSession {
        key: PrivateKey,
        node_key: PublicKey,
        netmap: NetMap,
        state: tempfile::TempDir,
        seen: mpsc::UnboundedReceiver<Register>,
        updates: mpsc::Receiver<ControlUpdate>,
        _task: ControlTask,
    }

    fn caching_session(tamper: bool) -> CachingSession {
        let key = PrivateKey::generate();
        let node_key = PrivateKey::generate().public_key();
        let netmap = empty_netmap();
        let (addr, seen) = fake_coordinator::start(
            key.clone(),
            signed_hello(&key, node_key, &netmap, tamper),
            false,
        );
        let mut config = config(addr, key.public_key());
        config.node_key = node_key;
        let state = tempfile::tempdir().unwrap();
        let cache = CacheWriter::new(state.path(), key.public_key());
        let (tx, updates) = mpsc::channel(8);
        let _task =
            ControlTask::spawn_caching(config, cache, Arc::new(FlowQueue::in_memory()), 9, tx);
        CachingSession {
            key,
            node_key,
            netmap,
            state,
            seen,
            updates,
            _task,
        }
    }

    #[tokio::test]
    async fn a_netmap_that_does_not_verify_ends_the_session_unapplied() {
        let CachingSession {
            state,
            mut updates,
            _task,
            seen: _seen,
            ..
        } = caching_session(true);

        assert!(matches!(
            next(&mut updates).await.event,
            ControlEvent::Registered(_)
        ));
        let update = next(&mut updates).await;
        assert!(
            matches!(
                update.event,
                ControlEvent::Disconnected(ControlError::Signature(SignatureError::BadSignature))
            ),
            "{update:?}"
        );
        assert!(!state.path().join("netmap.cache").exists());
    }

    /// A coordinator that answers a registration without a resume with a
    /// netmap of peers 5 and 6, and one resuming after that netmap with a
    /// delta chained after it (peer 7 joined, 5 left), closing each session.
    fn resuming_coordinator(
        key: &PrivateKey,
        node_key: PublicKey,
    ) -> (
        SocketAddr,
        mpsc::UnboundedReceiver<Register>,
        NetMap,
        NetMapDelta,
    ) {
        use weft_proto::signing::{Chain, NetmapSigner, Record};
        let signer = NetmapSigner::derive(key);
        let mut netmap = empty_netmap();
        netmap.peers = vec![peer(5), peer(6)];
        let first = Chain::new(netmap.self_node.id, node_key)
            .sign(&signer, &Record::NetMap(netmap.clone()))
            .unwrap();
        let delta = NetMapDelta {
            revision: 2,
            upsert_peers: vec![peer(7)],
            remove_peers: vec![weft_proto::NodeId(5)],
            filter: None,
            capabilities: None,
            self_node: None,
        };
        let resumed = Chain::resume(netmap.self_node.id, node_key, first.digest())
            .sign(&signer, &Record::Delta(delta.clone()))
            .unwrap();
        let full = netmap.clone();
        let (addr, seen) = fake_coordinator::start_with(
            key.clone(),
            move |register| {
                let record = match &register.resume {
                    Some(resume) if resume.last_record == first.digest() => resumed.clone(),
                    _ => first.clone(),
                };
                vec![
                    ServerMessage::Registered(full.self_node.clone()),
                    ServerMessage::NetmapKey(signer.public_key()),
                    ServerMessage::Signed(record),
                ]
            },
            true,
        );
        (addr, seen, netmap, delta)
    }

    /// The next netmap or delta reported.
    async fn next_view(updates: &mut mpsc::Receiver<ControlUpdate>) -> ControlEvent {
        loop {
            let event = next(updates).await.event;
            if matches!(event, ControlEvent::NetMap(_) | ControlEvent::Delta(_)) {
                return event;
            }
        }
    }

    #[tokio::test]
    async fn a_reconnect_resumes_from_the_held_view_and_the_cache_continues() {
        let key = PrivateKey::generate();
        let node_key = PrivateKey::generate().public_key();
        let (addr, mut seen, netmap, delta) = resuming_coordinator(&key, node_key);
        let mut config = config(addr, key.public_key());
        config.node_key = node_key;
        let state = tempfile::tempdir().unwrap();
        let cache = CacheWriter::new(state.path(), key.public_key());
        let (tx, mut updates) = mpsc::channel(8);
        let task = ControlTask::spawn_caching(
            config.clone(),
            cache,
            Arc::new(FlowQueue::in_memory()),
            9,
            tx,
        );

        assert!(matches!(next_view(&mut updates).await, ControlEvent::NetMap(n) if n == netmap));
        assert_eq!(seen.recv().await.unwrap().resume, None);
        // The coordinator closed the session; the next one resumes.
        let ControlEvent::Delta(got) = next_view(&mut updates).await else {
            panic!("the resumed session did not report a delta");
        };
        assert_eq!(got, delta);
        let resume = seen.recv().await.unwrap().resume.expect("a resume");
        assert_eq!(*resume, Resume::of(resume.last_record, &netmap));
        let mut folded = netmap.clone();
        folded.apply(delta);
        let cached = restored(&state, &key, node_key);
        assert_eq!(cached, folded, "the delta was appended to the cached chain");
        drop(task);

        // A new task (a restarted daemon) resumes from the cache, and
        // reports the folded view whole: the daemon may hold anything.
        let cache = CacheWriter::new(state.path(), key.public_key());
        let (tx, mut updates) = mpsc::channel(8);
        let _task =
            ControlTask::spawn_caching(config, cache, Arc::new(FlowQueue::in_memory()), 10, tx);
        let resume = seen
            .recv()
            .await
            .unwrap()
            .resume
            .expect("a resume from the cache");
        assert_eq!(resume.revision, 2);
        assert_eq!(resume.peers.len(), 2);
        // This coordinator only knows how to resume after its netmap, so it
        // answers the later chain with a full netmap, which replaces the cache.
        assert!(matches!(next_view(&mut updates).await, ControlEvent::NetMap(n) if n == netmap));
    }

    #[tokio::test]
    async fn a_task_started_on_a_cache_resumes_and_reports_the_folded_view() {
        let key = PrivateKey::generate();
        let node_key = PrivateKey::generate().public_key();
        let (addr, mut seen, netmap, delta) = resuming_coordinator(&key, node_key);
        let state = tempfile::tempdir().unwrap();
        {
            use weft_proto::signing::{Chain, NetmapSigner, Record};
            let signer = NetmapSigner::derive(&key);
            let mut writer = CacheWriter::new(state.path(), key.public_key());
            writer.save_key(signer.public_key()).unwrap();
            let first = Chain::new(netmap.self_node.id, node_key)
                .sign(&signer, &Record::NetMap(netmap.clone()))
                .unwrap();
            writer.netmap(netmap.self_node.id, &first).unwrap();
        }
        let mut config = config(addr, key.public_key());
        config.node_key = node_key;
        let cache = CacheWriter::new(state.path(), key.public_key());
        let (tx, mut updates) = mpsc::channel(8);
        let _task =
            ControlTask::spawn_caching(config, cache, Arc::new(FlowQueue::in_memory()), 9, tx);
        assert!(seen.recv().await.unwrap().resume.is_some());
        let mut folded = netmap.clone();
        folded.apply(delta);
        let ControlEvent::NetMap(reported) = next_view(&mut updates).await else {
            panic!("a resume from the cache must report the whole view");
        };
        assert_eq!(reported, folded);
    }

    #[tokio::test]
    async fn a_coordinator_signing_with_another_key_is_not_resumed_from() {
        use weft_proto::signing::{Chain, NetmapSigner, Record};
        let key = PrivateKey::generate();
        let node_key = PrivateKey::generate().public_key();
        let before = NetmapSigner::derive(&key);
        let after = NetmapSigner::derive(&PrivateKey::generate());
        let netmap = empty_netmap();
        let id = netmap.self_node.id;
        let first = Chain::new(id, node_key)
            .sign(&before, &Record::NetMap(netmap.clone()))
            .unwrap();
        let resumed = Chain::resume(id, node_key, first.digest())
            .sign(
                &after,
                &Record::Delta(NetMapDelta {
                    revision: 2,
                    upsert_peers: vec![peer(7)],
                    remove_peers: Vec::new(),
                    filter: None,
                    capabilities: None,
                    self_node: None,
                }),
            )
            .unwrap();
        let fresh = Chain::new(id, node_key)
            .sign(&after, &Record::NetMap(netmap.clone()))
            .unwrap();
        let sessions = std::sync::atomic::AtomicUsize::new(0);
        let (addr, mut seen) = fake_coordinator::start_with(
            key.clone(),
            move |_| {
                let (signer, record) =
                    match sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                        0 => (&before, first.clone()),
                        1 => (&after, resumed.clone()),
                        _ => (&after, fresh.clone()),
                    };
                vec![
                    ServerMessage::Registered(self_node()),
                    ServerMessage::NetmapKey(signer.public_key()),
                    ServerMessage::Signed(record),
                ]
            },
            true,
        );
        let mut config = config(addr, key.public_key());
        config.node_key = node_key;
        let (tx, mut updates) = mpsc::channel(8);
        let _task = ControlTask::spawn(config, 9, tx);
        assert!(seen.recv().await.unwrap().resume.is_none());
        assert!(seen.recv().await.unwrap().resume.is_some());
        loop {
            if let ControlEvent::Disconnected(ControlError::Protocol(why)) =
                next(&mut updates).await.event
            {
                assert!(why.contains("another netmap key"), "{why}");
                break;
            }
        }
        assert!(
            seen.recv().await.unwrap().resume.is_none(),
            "after a key change the node asks for a full netmap"
        );
    }

    /// The cache in `state`, verified as a restarted node would.
    fn restored(state: &tempfile::TempDir, key: &PrivateKey, node_key: PublicKey) -> NetMap {
        crate::netmap_cache::restore(
            state.path(),
            key.public_key(),
            node_key,
            std::time::SystemTime::now(),
        )
        .unwrap()
    }

    /// The host's attributes, as a Linux host would report them.
    fn system(hostname: &str) -> Attributes {
        Attributes::from([
            ("node:os".to_owned(), "linux".to_owned()),
            ("node:hostname".to_owned(), hostname.to_owned()),
        ])
    }

    fn config(coordinator: SocketAddr, coordinator_key: PublicKey) -> ControlConfig {
        ControlConfig {
            coordinator: coordinator.into(),
            coordinator_key,
            machine_key: PrivateKey::generate(),
            credential: Some(Credential::AuthKey(AuthKey::new(
                "weft-auth-0123456789ab-secret",
            ))),
            hostname: "web-1".into(),
            node_key: PrivateKey::generate().public_key(),
            advertisement: tokio::sync::watch::channel(Advertisement {
                endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
                home_relay: None,
            })
            .1,
            system_attributes: system,
            posture: tokio::sync::watch::channel(Attributes::new()).1,
        }
    }

    /// The next update other than [`ControlEvent::Connected`].
    async fn next(updates: &mut mpsc::Receiver<ControlUpdate>) -> ControlUpdate {
        loop {
            let update = next_any(updates).await;
            if !matches!(update.event, ControlEvent::Connected(_)) {
                return update;
            }
        }
    }

    async fn next_any(updates: &mut mpsc::Receiver<ControlUpdate>) -> ControlUpdate {
        tokio::time::timeout(Duration::from_secs(10), updates.recv())
            .await
            .expect("no control update within 10 s")
            .expect("control task ended")
    }

    /// The address of the next session's coordinator.
    async fn next_connected(updates: &mut mpsc::Receiver<ControlUpdate>) -> SocketAddr {
        loop {
            if let ControlEvent::Connected(address) = next_any(updates).await.event {
                return address;
            }
        }
    }

    /// A UDP port on loopback that swallows every packet: a replica that
    /// died without a trace.
    fn silent_address() -> (std::net::UdpSocket, SocketAddr) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        (socket, address)
    }

    fn coordinators(addresses: &[SocketAddr]) -> Coordinators {
        addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn a_silent_address_is_skipped_within_the_connect_timeout() {
        let key = PrivateKey::generate();
        let (_silent, dead) = silent_address();
        let (live, _seen) = fake_coordinator::start(
            key.clone(),
            vec![ServerMessage::Registered(self_node())],
            false,
        );
        let mut config = config(live, key.public_key());
        config.coordinator = coordinators(&[dead, live]);
        let (tx, mut updates) = mpsc::channel(8);
        let started = std::time::Instant::now();
        let _task = ControlTask::spawn(config, 1, tx);
        match next(&mut updates).await.event {
            ControlEvent::Disconnected(ControlError::Connect {
                address, reason, ..
            }) => {
                assert!(address.contains(&dead.to_string()), "{address}");
                assert!(reason.contains("no answer"), "{reason}");
            }
            other => panic!("expected a connect timeout, got {other:?}"),
        }
        assert_eq!(next_connected(&mut updates).await, live);
        assert!(matches!(
            next(&mut updates).await.event,
            ControlEvent::Registered(_)
        ));
        let took = started.elapsed();
        assert!(
            took < CONNECT_TIMEOUT + Duration::from_secs(2),
            "took {took:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_session_moves_to_the_next_replica() {
        let key = PrivateKey::generate();
        let (first, _first_seen) = fake_coordinator::start(
            key.clone(),
            vec![ServerMessage::Registered(self_node())],
            true,
        );
        let (second, _second_seen) = fake_coordinator::start(
            key.clone(),
            vec![ServerMessage::Registered(self_node())],
            false,
        );
        let mut config = config(first, key.public_key());
        config.coordinator = coordinators(&[first, second]);
        let (tx, mut updates) = mpsc::channel(8);
        let _task = ControlTask::spawn(config, 1, tx);
        assert_eq!(next_connected(&mut updates).await, first);
        assert_eq!(next_connected(&mut updates).await, second);
        assert!(matches!(
            next(&mut updates).await.event,
            ControlEvent::Registered(_)
        ));
        // It stays with the replica that works.
        let more = tokio::time::timeout(Duration::from_secs(2), updates.recv()).await;
        assert!(more.is_err(), "unexpected update {more:?}");
    }

    #[tokio::test]
    async fn a_node_registers_and_receives_its_netmap() {
        let CachingSession {
            key,
            node_key,
            netmap,
            state,
            mut seen,
            mut updates,
            _task,
        } = caching_session(false);

        let update = next(&mut updates).await;
        assert_eq!(update.session, 9);
        assert!(
            matches!(update.event, ControlEvent::Registered(ref n) if *n == self_node()),
            "{update:?}"
        );
        assert!(
            matches!(next(&mut updates).await.event, ControlEvent::NetMap(ref m) if *m == netmap)
        );
        let cached = restored(&state, &key, node_key);
        assert_eq!(
            cached, netmap,
            "the verified netmap is cached before it is reported"
        );

        let register = seen.recv().await.unwrap();
        assert_eq!(register.hostname, "web-1");
        assert_eq!(register.node_key, node_key);
        assert!(matches!(
            register.credential,
            Some(Credential::AuthKey(ref key)) if key.expose_secret() == "weft-auth-0123456789ab-secret"
        ));
        assert_eq!(register.attributes["node:os"], "linux");
        assert_eq!(register.attributes["node:hostname"], "web-1");
        assert!(register
            .endpoints
            .iter()
            .all(|e| e.port() == 51820 && !e.ip().is_loopback()));
    }

    #[tokio::test]
    async fn a_wrong_pinned_key_is_reported_as_such() {
        let (addr, _seen) = fake_coordinator::start(PrivateKey::generate(), vec![], false);
        let (tx, mut updates) = mpsc::channel(8);
        let _task = ControlTask::spawn(config(addr, PrivateKey::generate().public_key()), 1, tx);
        match next(&mut updates).await.event {
            ControlEvent::Disconnected(ControlError::Handshake(HandshakeError::Authentication)) => {
            }
            other => panic!("expected a handshake failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_final_refusal_ends_the_task() {
        let key = PrivateKey::generate();
        let refusal = Refusal {
            code: RefusalCode::AuthKeyUsed,
            message: "auth key 0123456789ab was already used; create a new one".into(),
        };
        let (addr, _seen) = fake_coordinator::start(
            key.clone(),
            vec![ServerMessage::Refused(refusal.clone())],
            false,
        );
        let (tx, mut updates) = mpsc::channel(8);
        let _task = ControlTask::spawn(config(addr, key.public_key()), 1, tx);
        assert!(
            matches!(next(&mut updates).await.event, ControlEvent::Refused(ref r) if *r == refusal)
        );
        let end = tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .unwrap();
        assert!(end.is_none(), "the task kept running: {end:?}");
    }

    #[tokio::test]
    async fn a_dropped_session_reconnects_without_the_auth_key() {
        let key = PrivateKey::generate();
        let (addr, mut seen) = fake_coordinator::start(
            key.clone(),
            vec![ServerMessage::Registered(self_node())],
            true,
        );
        let (tx, mut updates) = mpsc::channel(8);
        let _task = ControlTask::spawn(config(addr, key.public_key()), 1, tx);
        assert!(matches!(
            next(&mut updates).await.event,
            ControlEvent::Registered(_)
        ));
        match next(&mut updates).await.event {
            ControlEvent::Disconnected(ControlError::Lost { reason, .. }) => {
                assert!(reason.contains("restarting"), "{reason}");
            }
            other => panic!("expected a lost session, got {other:?}"),
        }
        assert!(matches!(
            next(&mut updates).await.event,
            ControlEvent::Registered(_)
        ));
        assert!(seen.recv().await.unwrap().credential.is_some());
        assert!(seen.recv().await.unwrap().credential.is_none());
    }
}
