//! The control client: one task that keeps a session with the coordinator and
//! reports what it learns to the daemon's main loop.
//!
//! A session is a QUIC connection, a Noise `IK` handshake bound to it, a
//! registration and then a stream of netmaps. Where QUIC gets no answer
//! (networks that block UDP) the same session runs over TLS on TCP to the
//! same address and port, with the same handshake (bound to that TLS
//! session) and the same frames; QUIC is tried first again on every later
//! attempt ([`TransportMemory`]), so a network that unblocks UDP goes back to
//! it. The node may know several
//! replicas of the coordinator ([`Coordinators`]): the task tries their
//! addresses in order (every address a name resolves to), gives each
//! [`CONNECT_TIMEOUT`] to answer, stays with the first that works, and when
//! that session drops moves straight on to the next address. Only after a
//! whole round of addresses failed does it wait, with jittered exponential
//! backoff. The daemon keeps the last netmap in force meanwhile, so tunnels
//! keep working while the coordinator is away. A refusal that retrying
//! cannot fix (deleted node, missing or spent auth key) ends the task.
//!
//! The task folds every verified netmap and delta into the view it holds
//! ([`Held`]), and a reconnect resumes from it ([`weft_proto::resume`]): the
//! coordinator answers with a delta against that view, chained after its
//! last record, instead of a full netmap. A task started on a verified cache
//! resumes from the cache.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{ConnectionError, ReadError};
use rand::Rng as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_net::handshake::{self, InitiateError};
use weft_net::tls::Liveness;
use weft_net::Service;
use weft_proto::handshake::HandshakeError;
use weft_proto::signing::{Digest, NetmapKey};
use weft_proto::{
    Advertisement, ClientMessage, Credential, DecodeError, FrameDecoder, LoginPrompt, NetMap,
    NetMapDelta, Opener, PrivateKey, PublicKey, Refusal, RefusalCode, Register, RelayInfo, Resume,
    SelfNode, ServerMessage, SignatureError,
};

use crate::coordinators::Coordinators;
use crate::netmap_cache::{CacheError, CacheWriter};
use crate::posture::{self, Attributes, SystemAttributes};

/// How often a registered node re-reports its attributes even when its
/// posture file did not change; the coordinator stores only changes.
const ATTRIBUTE_REFRESH: Duration = Duration::from_secs(180);

/// How long one coordinator address gets to complete the QUIC handshake
/// before TLS on TCP, and then the next address, is tried; a live replica
/// answers within milliseconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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
    },
    /// No connection could be made, over QUIC or TCP.
    #[error("cannot connect to the coordinator at {address}: {reason}")]
    Connect {
        /// The address given.
        address: String,
        /// The transport's reason.
        reason: String,
    },
    /// The Noise handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The connection dropped after the handshake.
    #[error("lost the connection to the coordinator: {0}")]
    Lost(String),
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
        let handle = tokio::spawn(run(config, Emitter { session, updates }, None));
        Self { session, handle }
    }

    /// Like [`ControlTask::spawn`], and keeps every verified netmap in
    /// `cache` ([`crate::netmap_cache`]) before reporting it.
    pub fn spawn_caching(
        config: ControlConfig,
        cache: CacheWriter,
        session: u64,
        updates: mpsc::Sender<ControlUpdate>,
    ) -> Self {
        let handle = tokio::spawn(run(config, Emitter { session, updates }, Some(cache)));
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
        matches!(self, ControlEvent::Refused(refusal) if is_final_refusal(refusal.code))
    }
}

/// Refusals that reconnecting cannot cure; only the operator can.
fn is_final_refusal(code: RefusalCode) -> bool {
    !matches!(
        code,
        RefusalCode::Unavailable | RefusalCode::MachineKeyInUse
    )
}

/// The least wait after the coordinator said another connection holds this
/// machine key (a clone of this machine): retrying sooner would only take
/// the node from the other machine or be refused again.
const IN_USE_RETRY: Duration = Duration::from_secs(30);

/// Reconnect delays: 0.5 s doubling to 30 s, each scaled by a jitter factor
/// so a fleet of nodes does not reconnect in lockstep after an outage.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The next delay; `jitter` in `[0, 1)` picks a point in 80–120 % of the base.
    pub(crate) fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Sends updates to the daemon; `Err` means the daemon is gone.
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

async fn run(mut config: ControlConfig, emitter: Emitter, mut cache: Option<CacheWriter>) {
    let mut held = cache
        .as_mut()
        .and_then(|cache| Held::from_cache(cache, config.node_key));
    let mut failover = Failover::new();
    let mut transports = TransportMemory::default();
    let mut targets = Vec::new();
    loop {
        if failover.round_starts(targets.len()) {
            targets = resolve(&config.coordinator).await;
        }
        let mut registered = false;
        let outcome = match targets.as_slice() {
            [] => Err(unresolved(&config.coordinator)),
            all => {
                let target = &all[failover.pick(all.len())];
                session(
                    &mut config,
                    target,
                    &mut transports,
                    &emitter,
                    &mut registered,
                    &mut cache,
                    &mut held,
                )
                .await
            }
        };
        let event = match outcome {
            Ok(Ended::DaemonGone) => return,
            Ok(Ended::Refused(refusal)) => ControlEvent::Refused(refusal),
            Err(error) => ControlEvent::Disconnected(error),
        };
        let stop = event.is_final();
        // A refusal to retry (the coordinator unavailable, or this node's
        // netmap too large to send) waits out the backoff like a failed
        // connection: registering again at once would only be refused again.
        let refused = matches!(event, ControlEvent::Refused(_));
        let in_use =
            matches!(&event, ControlEvent::Refused(r) if r.code == RefusalCode::MachineKeyInUse);
        if stop {
            // A node the coordinator no longer admits keeps no netmap to restart with.
            if let Some(cache) = cache.as_mut() {
                cache.discard();
            }
        }
        match &event {
            ControlEvent::Refused(r) => {
                tracing::warn!(code = ?r.code, "coordinator refused the node: {}", r.message);
            }
            ControlEvent::Disconnected(e) => tracing::warn!("control session ended: {e}"),
            _ => {}
        }
        if emitter.emit(event).await.is_err() || stop {
            return;
        }
        let jitter: f64 = rand::thread_rng().gen();
        let mut delay = failover.finished(registered && !refused, targets.len(), jitter);
        if in_use {
            let least = IN_USE_RETRY.mul_f64(0.8 + 0.4 * jitter);
            delay = Some(delay.map_or(least, |d| d.max(least)));
        }
        if let Some(delay) = delay {
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

/// Which coordinator address the control task tries next, and whether it
/// must wait first: it moves to the next address after every attempt that
/// ends (a session that dropped, or one that never started), and backs off
/// only once every address in a round failed.
#[derive(Debug, Clone)]
pub(crate) struct Failover {
    next: usize,
    failed: usize,
    backoff: Backoff,
}

impl Failover {
    pub(crate) fn new() -> Self {
        Self {
            next: 0,
            failed: 0,
            backoff: Backoff::new(),
        }
    }

    /// Whether the next attempt starts a new round over `count` addresses,
    /// so names should be resolved again.
    pub(crate) fn round_starts(&self, count: usize) -> bool {
        self.next == 0 || self.next >= count
    }

    /// The index, among `count` addresses, to try now.
    pub(crate) fn pick(&mut self, count: usize) -> usize {
        let index = self.next % count.max(1);
        self.next = index + 1;
        index
    }

    /// Records how an attempt ended (`registered`: the coordinator accepted
    /// the node) and returns how long to wait before the next attempt.
    pub(crate) fn finished(
        &mut self,
        registered: bool,
        count: usize,
        jitter: f64,
    ) -> Option<Duration> {
        if registered {
            self.failed = 0;
            self.backoff.reset();
            return None;
        }
        self.failed += 1;
        if self.failed < count {
            return None;
        }
        self.failed = 0;
        Some(self.backoff.next_delay(jitter))
    }
}

/// One address to try: a coordinator address as given, and one of the
/// socket addresses it resolves to.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    remote: SocketAddr,
}

/// Every socket address the coordinator addresses resolve to, in order and
/// without repeats; names that do not resolve are logged and skipped.
async fn resolve(coordinators: &Coordinators) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
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
            Err(e) => tracing::warn!("cannot resolve coordinator address {address}: {e}"),
        }
    }
    targets
}

fn unresolved(coordinators: &Coordinators) -> ControlError {
    ControlError::Resolve {
        address: coordinators.to_string(),
        reason: "no address resolved".into(),
    }
}

async fn session(
    config: &mut ControlConfig,
    target: &Target,
    transports: &mut TransportMemory,
    emitter: &Emitter,
    registered: &mut bool,
    cache: &mut Option<CacheWriter>,
    held: &mut Option<Held>,
) -> Result<Ended, ControlError> {
    let mut channel = connect(target, transports).await?;
    let result = exchange(
        config,
        &mut channel,
        target,
        emitter,
        registered,
        cache,
        held,
    )
    .await;
    channel.close().await;
    result
}

async fn exchange(
    config: &mut ControlConfig,
    channel: &mut Channel,
    target: &Target,
    emitter: &Emitter,
    registered: &mut bool,
    cache: &mut Option<CacheWriter>,
    held: &mut Option<Held>,
) -> Result<Ended, ControlError> {
    let Channel {
        transport,
        send,
        recv,
        binding,
        ..
    } = channel;
    let transport = *transport;
    handshake(config, binding, send, recv).await?;
    tracing::info!(coordinator = %target.name, address = %target.remote, %transport, "connected to the coordinator");
    if emitter
        .emit(ControlEvent::Connected(target.remote))
        .await
        .is_err()
    {
        return Ok(Ended::DaemonGone);
    }

    config.posture.mark_unchanged();
    config.advertisement.mark_unchanged();
    // Resume only from a view the cache (if any) holds in full: a cache
    // dropped as too large restarts from the full netmap this asks for.
    let resume_from = held
        .as_ref()
        .filter(|_| cache.as_ref().is_none_or(CacheWriter::is_current))
        .map(|held| (Resume::of(held.last_record, &held.netmap), held.key));
    let mut opener = match &resume_from {
        Some((resume, _)) => Opener::resume(config.node_key, resume.last_record),
        None => Opener::new(config.node_key),
    };
    let resume_key = resume_from.as_ref().map(|(_, key)| *key);
    let register = ClientMessage::Register(register_message(config, resume_from.map(|(r, _)| r)));
    let frame = weft_proto::encode_frame(&register)
        .map_err(|_| ControlError::Protocol("registration too large to send"))?;
    write(send, &frame).await?;

    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    // System attributes (OS version after an upgrade, disk encryption) change
    // without the posture file changing: re-report them periodically so
    // posture rules are re-evaluated at least this often.
    let mut refresh = tokio::time::interval_at(
        tokio::time::Instant::now() + ATTRIBUTE_REFRESH,
        ATTRIBUTE_REFRESH,
    );
    let mut posture_open = true;
    let mut advertisement_open = true;
    loop {
        while let Some(message) = decoder.next_message::<ServerMessage>()? {
            let opened = opener.open(message)?;
            if let (Some(cache), Some(signed)) = (cache.as_mut(), &opened.signed) {
                keep(cache, &opened.message, signed);
            }
            let message = match (&opened.signed, opener.key()) {
                (Some(signed), Some(key)) => Held::advance(held, opened.message, signed, key),
                _ => opened.message,
            };
            let event = match message {
                ServerMessage::Refused(refusal) => return Ok(Ended::Refused(refusal)),
                ServerMessage::LoginRequired(prompt) => {
                    let interactive = matches!(config.credential, Some(Credential::Interactive(_)));
                    if !interactive || *registered {
                        return Err(ControlError::Protocol(
                            "the coordinator asked for an interactive login, which this node did not request",
                        ));
                    }
                    ControlEvent::LoginRequired(prompt)
                }
                ServerMessage::Registered(node) => {
                    *registered = true;
                    config.credential = None;
                    ControlEvent::Registered(node)
                }
                _ if !*registered => {
                    return Err(ControlError::Protocol(
                        "a netmap arrived before registration",
                    ));
                }
                ServerMessage::NetMap(netmap) => ControlEvent::NetMap(netmap),
                ServerMessage::Delta(delta) => ControlEvent::Delta(delta),
                ServerMessage::Relays(relays) => ControlEvent::Relays(relays),
                ServerMessage::NetmapKey(key) => {
                    if resume_key.is_some_and(|held_key| held_key != key) {
                        *held = None;
                        return Err(ControlError::Protocol(
                            "the coordinator signs with another netmap key than the view this node resumed from; reconnecting for a full netmap",
                        ));
                    }
                    if let Some(Err(e)) = cache.as_ref().map(|cache| cache.save_key(key)) {
                        tracing::warn!("cannot keep the coordinator's netmap key; a restart during an outage will start without peers: {e}");
                    }
                    continue;
                }
                ServerMessage::Signed(_) => {
                    return Err(ControlError::Protocol("a signed record was not opened"));
                }
                ServerMessage::RelayAdmissions { .. } => {
                    return Err(ControlError::Protocol(
                        "the coordinator sent relay admissions, which only relays ask for",
                    ));
                }
            };
            if emitter.emit(event).await.is_err() {
                return Ok(Ended::DaemonGone);
            }
        }
        let read = tokio::select! {
            read = recv.read(&mut buf) => read,
            changed = config.posture.changed(), if posture_open && *registered => {
                match changed {
                    Ok(()) => send_attributes(config, send).await?,
                    Err(_) => posture_open = false,
                }
                continue;
            }
            changed = config.advertisement.changed(), if advertisement_open && *registered => {
                match changed {
                    Ok(()) => send_advertisement(config, send).await?,
                    Err(_) => advertisement_open = false,
                }
                continue;
            }
            _ = refresh.tick(), if *registered => {
                send_attributes(config, send).await?;
                if let Some(cache) = cache.as_ref() {
                    cache.touch();
                }
                continue;
            }
        };
        match read {
            Ok(0) => {
                decoder.finish()?;
                return Err(ControlError::Lost(transport.ended().into()));
            }
            Ok(n) => decoder.push(&buf[..n]),
            Err(e) => return Err(ControlError::Lost(describe_io_error(&e))),
        }
    }
}

/// The verified view the control task holds, which a reconnect resumes
/// from ([`weft_proto::resume`]): the fold of every record since the last
/// full netmap, across sessions.
#[derive(Debug, Clone)]
struct Held {
    netmap: NetMap,
    /// The digest of the last record folded in.
    last_record: Digest,
    /// The key the records verified with: a coordinator signing with
    /// another is not resumed from them.
    key: NetmapKey,
    /// Read from the cache, not yet reported to the daemon by this task,
    /// which may hold something else: the first record is reported folded,
    /// as a full netmap.
    from_cache: bool,
}

impl Held {
    /// The cache's view, when it verifies and is fresh ([`CacheWriter::reopen`]).
    fn from_cache(cache: &mut CacheWriter, node_key: PublicKey) -> Option<Self> {
        match cache.reopen(node_key, std::time::SystemTime::now()) {
            Ok(restored) => {
                tracing::debug!(
                    revision = restored.netmap.revision,
                    peers = restored.netmap.peers.len(),
                    "the first session resumes from the cached netmap"
                );
                Some(Self {
                    netmap: restored.netmap,
                    last_record: restored.last_record,
                    key: restored.key,
                    from_cache: true,
                })
            }
            Err(CacheError::Missing) => None,
            Err(e) => {
                tracing::debug!("not resuming from the cached netmap: {e}");
                None
            }
        }
    }

    /// Folds a verified record into `held` and returns the message to
    /// report for it: the record's own, except a delta onto a view the
    /// daemon was not given by this task, reported as the folded netmap.
    fn advance(
        held: &mut Option<Held>,
        message: ServerMessage,
        signed: &weft_proto::SignedRecord,
        key: NetmapKey,
    ) -> ServerMessage {
        let last_record = signed.digest();
        match message {
            ServerMessage::NetMap(netmap) => {
                *held = Some(Held {
                    netmap: netmap.clone(),
                    last_record,
                    key,
                    from_cache: false,
                });
                ServerMessage::NetMap(netmap)
            }
            ServerMessage::Delta(delta) => {
                let Some(view) = held.as_mut() else {
                    return ServerMessage::Delta(delta);
                };
                view.netmap.apply(delta.clone());
                view.last_record = last_record;
                view.key = key;
                if std::mem::take(&mut view.from_cache) {
                    ServerMessage::NetMap(view.netmap.clone())
                } else {
                    ServerMessage::Delta(delta)
                }
            }
            other => other,
        }
    }
}

/// Stores a verified record before the daemon applies it. A cache that
/// cannot keep up is dropped (the writer removes it), never left behind.
fn keep(cache: &mut CacheWriter, message: &ServerMessage, signed: &weft_proto::SignedRecord) {
    let result = match message {
        ServerMessage::NetMap(netmap) => cache.netmap(netmap.self_node.id, signed),
        _ => cache.delta(signed),
    };
    if let Err(e) = result {
        tracing::warn!(
            "not caching the netmap; a restart during an outage will start without peers: {e}"
        );
    }
}

/// Reports the node's current attributes after a posture change.
async fn send_attributes(
    config: &mut ControlConfig,
    send: &mut Writer,
) -> Result<(), ControlError> {
    let custom = config.posture.borrow_and_update().clone();
    let message = ClientMessage::UpdateAttributes(posture::report(
        config.system_attributes,
        &config.hostname,
        &custom,
    ));
    let frame = weft_proto::encode_frame(&message)
        .map_err(|_| ControlError::Protocol("attributes too large to send"))?;
    write(send, &frame).await?;
    tracing::debug!("sent updated attributes");
    Ok(())
}

/// Reports where the node can be reached after it changed.
async fn send_advertisement(
    config: &mut ControlConfig,
    send: &mut Writer,
) -> Result<(), ControlError> {
    let advertisement = config.advertisement.borrow_and_update().clone();
    tracing::debug!(endpoints = ?advertisement.endpoints, home_relay = ?advertisement.home_relay, "advertising");
    let message = ClientMessage::UpdateEndpoints(advertisement);
    let frame = weft_proto::encode_frame(&message)
        .map_err(|_| ControlError::Protocol("endpoints too large to send"))?;
    write(send, &frame).await
}

/// Writes `bytes` and pushes them out (TLS buffers records until flushed).
async fn write(send: &mut Writer, bytes: &[u8]) -> Result<(), ControlError> {
    send.write_all(bytes)
        .await
        .map_err(|e| ControlError::Lost(describe_io_error(&e)))?;
    send.flush()
        .await
        .map_err(|e| ControlError::Lost(describe_io_error(&e)))
}

/// The Noise handshake, bound to the transport's TLS session by `binding`.
async fn handshake(
    config: &ControlConfig,
    binding: &[u8; 32],
    send: &mut Writer,
    recv: &mut Reader,
) -> Result<(), ControlError> {
    let mut stream = tokio::io::join(recv, send);
    handshake::initiate(
        &mut stream,
        Service::Control,
        &config.machine_key,
        &config.coordinator_key,
        binding,
    )
    .await
    .map_err(|e| match e {
        InitiateError::Noise(e) => ControlError::Handshake(e),
        InitiateError::Send(e) => ControlError::Lost(describe_io_error(&e)),
        InitiateError::Receive(e) => handshake_read_error(&e),
        // Closed instead of answering: QUIC's stream finished, or TLS's close_notify.
        InitiateError::Ended => ControlError::Handshake(HandshakeError::Authentication),
    })
}

/// A coordinator that cannot authenticate us closes the connection (QUIC
/// with `CLOSE_HANDSHAKE_FAILED`, TLS with `close_notify`) instead of
/// answering, so an end of the stream during the handshake means the pinned
/// key is wrong — except a plain transport failure (a QUIC timeout, a TCP
/// reset or a TCP close without TLS's), which is reported as such.
fn handshake_read_error(error: &std::io::Error) -> ControlError {
    match quic_read_error(error) {
        Some(ReadError::ConnectionLost(
            e @ (ConnectionError::TimedOut
            | ConnectionError::LocallyClosed
            | ConnectionError::CidsExhausted),
        )) => ControlError::Lost(e.to_string()),
        Some(_) => ControlError::Handshake(HandshakeError::Authentication),
        None => ControlError::Lost(describe_io_error(error)),
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

fn register_message(config: &ControlConfig, resume: Option<Resume>) -> Register {
    let Advertisement {
        endpoints,
        home_relay,
    } = config.advertisement.borrow().clone();
    tracing::debug!(?endpoints, ?home_relay, "registering");
    Register {
        credential: config.credential.clone(),
        hostname: config.hostname.clone(),
        node_key: config.node_key,
        endpoints,
        home_relay,
        attributes: posture::report(
            config.system_attributes,
            &config.hostname,
            &config.posture.borrow(),
        ),
        resume: resume.map(Box::new),
    }
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
    pub(crate) fn quic_timeout(&self, remote: SocketAddr) -> Duration {
        if self.over_tcp.contains(&remote) {
            QUIC_RETRY_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        }
    }

    /// Records that `transport` connected to `remote`.
    pub(crate) fn connected(&mut self, remote: SocketAddr, transport: Transport) {
        match transport {
            Transport::Quic => self.over_tcp.remove(&remote),
            Transport::Tcp => self.over_tcp.insert(remote),
        };
    }
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;
type Reader = Box<dyn AsyncRead + Unpin + Send>;

/// A connection to a coordinator, before the Noise handshake: the two
/// directions of its byte stream and the value that binds the handshake to
/// its TLS session.
struct Channel {
    transport: Transport,
    send: Writer,
    recv: Reader,
    binding: [u8; 32],
    /// QUIC's connection, closed with the session.
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl Channel {
    async fn close(mut self) {
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

/// Why QUIC did not connect.
enum QuicFailure {
    /// Nothing answered (UDP blocked, or nobody there): worth trying TCP.
    NoAnswer(String),
    /// Something answered and refused; TCP would reach the same server.
    Refused(String),
}

/// Connects over QUIC, or over TLS on TCP when QUIC gets no answer.
async fn connect(target: &Target, memory: &mut TransportMemory) -> Result<Channel, ControlError> {
    let connect_error = |reason: String| ControlError::Connect {
        address: format!("{} ({})", target.name, target.remote),
        reason,
    };
    let quic = match connect_quic(target.remote, memory.quic_timeout(target.remote)).await {
        Ok(channel) => {
            memory.connected(target.remote, Transport::Quic);
            return Ok(channel);
        }
        Err(QuicFailure::Refused(reason)) => return Err(connect_error(reason)),
        Err(QuicFailure::NoAnswer(reason)) => reason,
    };
    tracing::debug!(address = %target.remote, "QUIC failed ({quic}); trying TLS over TCP");
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_tcp(target.remote)).await {
        Ok(Ok(channel)) => {
            memory.connected(target.remote, Transport::Tcp);
            Ok(channel)
        }
        Ok(Err(tcp)) => Err(connect_error(format!("{quic}; over TCP: {tcp}"))),
        Err(_) => Err(connect_error(format!(
            "{quic}; over TCP: no answer within {} ms",
            CONNECT_TIMEOUT.as_millis()
        ))),
    }
}

async fn connect_quic(remote: SocketAddr, wait: Duration) -> Result<Channel, QuicFailure> {
    let local = |e: &dyn std::fmt::Display| QuicFailure::NoAnswer(format!("QUIC: {e}"));
    let bind: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint =
        weft_net::tls::quic_client(bind, Service::Control, LIVENESS).map_err(|e| local(&e))?;
    let connecting = endpoint
        .connect(remote, Service::Control.server_name())
        .map_err(|e| local(&e))?;
    let connection = match tokio::time::timeout(wait, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e @ ConnectionError::TimedOut)) => return Err(local(&e)),
        Ok(Err(e)) => return Err(QuicFailure::Refused(e.to_string())),
        Err(_) => {
            endpoint.close(0u32.into(), b"");
            return Err(QuicFailure::NoAnswer(format!(
                "no answer within {} ms",
                wait.as_millis()
            )));
        }
    };
    let opened = async {
        let binding =
            handshake::binding(&connection, Service::Control).map_err(|e| e.to_string())?;
        let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((binding, send, recv))
    };
    match opened.await {
        Ok((binding, send, recv)) => Ok(Channel {
            transport: Transport::Quic,
            send: Box::new(send),
            recv: Box::new(recv),
            binding,
            quic: Some((endpoint, connection)),
        }),
        Err(reason) => {
            connection.close(0u32.into(), b"");
            endpoint.close(0u32.into(), b"");
            Err(QuicFailure::Refused(reason))
        }
    }
}

async fn connect_tcp(remote: SocketAddr) -> Result<Channel, String> {
    let tcp = TcpStream::connect(remote)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    if let Err(e) = tcp::keep_alive(&tcp) {
        tracing::debug!("cannot enable TCP keep-alive on the control connection: {e}");
    }
    let stream = handshake::connect_tls(tcp, Service::Control)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let binding = handshake::binding(&stream, Service::Control).map_err(|e| e.to_string())?;
    let (recv, send) = tokio::io::split(stream);
    Ok(Channel {
        transport: Transport::Tcp,
        send: Box::new(send),
        recv: Box::new(recv),
        binding,
        quic: None,
    })
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
    use weft_proto::AuthKey;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay(0.5)).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[6], Duration::from_secs(30));
        assert_eq!(delays[9], Duration::from_secs(30));

        let mut low = Backoff::new();
        let mut high = Backoff::new();
        assert_eq!(low.next_delay(0.0), Duration::from_millis(400));
        assert_eq!(high.next_delay(0.999_999).as_millis(), 599);

        backoff.reset();
        assert_eq!(backoff.next_delay(0.5), Duration::from_millis(500));
    }

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
        assert!(!ControlEvent::Disconnected(ControlError::Lost("x".into())).is_final());
    }

    #[test]
    fn a_quic_close_in_the_handshake_blames_the_pinned_key() {
        let closed = ReadError::ConnectionLost(ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: weft_proto::CLOSE_HANDSHAKE_FAILED.into(),
                reason: bytes::Bytes::from_static(b"handshake failed"),
            },
        ));
        let err = handshake_read_error(&closed.into());
        assert!(err.to_string().contains("--coordinator-key"), "{err}");
        let err =
            handshake_read_error(&ReadError::ConnectionLost(ConnectionError::TimedOut).into());
        assert!(matches!(err, ControlError::Lost(_)), "{err}");
    }

    #[test]
    fn a_tcp_failure_in_the_handshake_is_a_lost_connection() {
        // A TCP close without TLS's close_notify, and a reset: the network, not the key.
        let unclean = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed");
        let err = handshake_read_error(&unclean);
        assert!(
            matches!(&err, ControlError::Lost(reason) if reason.contains("without a TLS close")),
            "{err}"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            handshake_read_error(&reset),
            ControlError::Lost(_)
        ));
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

    /// What a coordinator sends after registration: its netmap key and the
    /// signed netmap, the signature broken when `tamper`.
    fn signed_hello(
        key: &PrivateKey,
        node_key: PublicKey,
        netmap: &NetMap,
        tamper: bool,
    ) -> Vec<ServerMessage> {
        use weft_proto::signing::{Chain, NetmapSigner, Record};
        let signer = NetmapSigner::derive(key);
        let mut signed = Chain::new(netmap.self_node.id, node_key)
            .sign(&signer, &Record::NetMap(netmap.clone()))
            .unwrap();
        if tamper {
            signed.signature[0] ^= 1;
        }
        vec![
            ServerMessage::Registered(netmap.self_node.clone()),
            ServerMessage::NetmapKey(signer.public_key()),
            ServerMessage::Signed(signed),
        ]
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
        let _task = ControlTask::spawn_caching(config, cache, 9, tx);
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

    fn peer(id: u64) -> weft_proto::Peer {
        weft_proto::Peer {
            id: weft_proto::NodeId(id),
            name: format!("peer-{id}"),
            node_key: PrivateKey::from_bytes([id as u8; 32]).public_key(),
            addresses: vec![format!("100.64.0.{id}").parse().unwrap()],
            endpoints: vec![format!("192.0.2.{id}:41641").parse().unwrap()],
            home_relay: None,
            identity: weft_proto::Identity::tagged(vec!["tag:db".into()]),
        }
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
        let task = ControlTask::spawn_caching(config.clone(), cache, 9, tx);

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
        let _task = ControlTask::spawn_caching(config, cache, 10, tx);
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
        let _task = ControlTask::spawn_caching(config, cache, 9, tx);
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

    /// A first netmap with no peers.
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

    fn empty_netmap() -> NetMap {
        NetMap {
            revision: 1,
            self_node: self_node(),
            peers: vec![],
            filter: weft_proto::PacketFilter::default(),
            capabilities: Vec::new(),
        }
    }

    fn self_node() -> SelfNode {
        SelfNode {
            id: weft_proto::NodeId(4),
            name: "web-1".into(),
            ipv4: "100.64.0.4".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::4".parse().unwrap(),
            identity: weft_proto::Identity::tagged(vec!["tag:web".into()]),
            key_expiry: None,
        }
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

    #[test]
    fn failover_moves_on_after_every_attempt_and_backs_off_after_a_failed_round() {
        let mut failover = Failover::new();
        assert!(failover.round_starts(3));
        assert_eq!(failover.pick(3), 0);
        // The first address worked, then its session dropped: straight to the next.
        assert_eq!(failover.finished(true, 3, 0.5), None);
        assert!(!failover.round_starts(3));
        assert_eq!(failover.pick(3), 1);
        assert_eq!(failover.finished(false, 3, 0.5), None);
        assert_eq!(failover.pick(3), 2);
        assert_eq!(failover.finished(false, 3, 0.5), None);
        assert!(failover.round_starts(3));
        assert_eq!(failover.pick(3), 0);
        // Three failures in a row, a whole round: wait, doubling each round.
        assert_eq!(
            failover.finished(false, 3, 0.5),
            Some(Duration::from_millis(500))
        );
        for _ in 0..2 {
            failover.pick(3);
            assert_eq!(failover.finished(false, 3, 0.5), None);
        }
        failover.pick(3);
        assert_eq!(
            failover.finished(false, 3, 0.5),
            Some(Duration::from_secs(1))
        );
        // Success resets the backoff.
        failover.pick(3);
        assert_eq!(failover.finished(true, 3, 0.5), None);
        for _ in 0..2 {
            failover.pick(3);
            assert_eq!(failover.finished(false, 3, 0.5), None);
        }
        failover.pick(3);
        assert_eq!(
            failover.finished(false, 3, 0.5),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn a_single_address_backs_off_after_each_failure() {
        let mut failover = Failover::new();
        assert_eq!(failover.pick(1), 0);
        assert_eq!(failover.finished(true, 1, 0.5), None);
        assert!(failover.round_starts(1));
        assert_eq!(failover.pick(1), 0);
        assert_eq!(
            failover.finished(false, 1, 0.5),
            Some(Duration::from_millis(500))
        );
        // Nothing resolved: still a failed round.
        assert_eq!(
            failover.finished(false, 0, 0.5),
            Some(Duration::from_secs(1))
        );
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
            ControlEvent::Disconnected(ControlError::Connect { address, reason }) => {
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
            ControlEvent::Disconnected(ControlError::Lost(reason)) => {
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
