//! Sessions with the relays the coordinator lists: one task per relay,
//! over QUIC, or TLS over TCP where QUIC cannot connect (TCP races QUIC
//! after a head start), reconnecting with backoff. The device loop hands
//! them the core's relay datagrams and gets back what arrives, admissions,
//! RTTs and losses as [`RelayEvent`]s. Sessions authenticate with the
//! node's current WireGuard key and restart when it rotates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_net::relay::{ClientError, RelayClient, TcpRelayClient};
use weft_proto::{PrivateKey, PublicKey, RelayInfo};

use super::control_surface::RelayTransport as Transport;

/// QUIC keep-alive: also keeps the NAT mapping to the relay open.
const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// A relay silent this long is gone; the core moves to another within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a QUIC attempt may take.
const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long QUIC has to itself before TLS over TCP races it: enough for
/// QUIC to win wherever UDP gets through, short enough that a network
/// blocking UDP gets a relay quickly.
const TCP_HEAD_START: Duration = Duration::from_millis(250);
/// How long the TCP fallback may take.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// A TCP session idle this long is probed by the kernel, once a second.
const TCP_KEEP_IDLE_SECS: u32 = 1;
/// A TCP session whose probes or data stay unacknowledged this long is
/// gone: about what [`IDLE_TIMEOUT`] gives QUIC.
const TCP_USER_TIMEOUT_MS: u32 = 3000;
/// The first delay after a failure; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A session that lasted this long was healthy: the next failure starts
/// the backoff afresh.
const HEALTHY: Duration = Duration::from_secs(10);
/// How often a connected session reports a fresh RTT.
const RTT_REPORT: Duration = Duration::from_secs(2);
/// Datagrams queued for one session; more are dropped, as a full UDP
/// socket buffer would.
const QUEUE: usize = 512;
/// Events from all sessions to the device loop.
const EVENTS: usize = 1024;

/// What a session task reports to the device loop.
#[derive(Debug)]
pub(crate) struct RelayEvent {
    relay: Arc<str>,
    generation: u64,
    kind: EventKind,
}

#[derive(Debug)]
enum EventKind {
    /// Admitted, or still up with a fresh RTT.
    Up {
        transport: Transport,
        rtt: Duration,
        max_payload: Option<usize>,
    },
    /// The session ended; the task reconnects.
    Down,
    /// A datagram from the node holding `from`.
    Packet { from: PublicKey, payload: Bytes },
}

/// What the core must hear about after a [`RelayEvent`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CoreUpdate<'a> {
    /// `relay_connected(relay, rtt)`.
    Connected(&'a str, Duration),
    /// `relay_disconnected(relay)`.
    Disconnected(&'a str),
    /// `handle_relayed(relay, from, payload)`.
    Packet(&'a str, PublicKey, &'a [u8]),
}

/// One relay session as `weft netcheck` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionState {
    pub(crate) name: String,
    /// `None` while disconnected.
    pub(crate) transport: Option<Transport>,
    /// The largest datagram payload a QUIC session carries now.
    pub(crate) max_payload: Option<usize>,
    /// Packets larger than `max_payload`, carried on the QUIC session's stream.
    pub(crate) oversized: u64,
    /// Packets dropped because the session was down or congested.
    pub(crate) dropped: u64,
}

/// The device's relay sessions.
#[derive(Debug)]
pub(crate) struct Relays {
    sessions: BTreeMap<String, Session>,
    events_tx: mpsc::Sender<RelayEvent>,
    events: mpsc::Receiver<RelayEvent>,
    /// The QUIC endpoint all sessions share, bound on first use; not the
    /// WireGuard socket, so relay traffic never competes with its batches.
    endpoint: Option<quinn::Endpoint>,
    generation: u64,
}

#[derive(Debug)]
struct Session {
    info: RelayInfo,
    generation: u64,
    outgoing: mpsc::Sender<(PublicKey, Vec<u8>)>,
    task: JoinHandle<()>,
    transport: Option<Transport>,
    max_payload: Option<usize>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    oversized: AtomicU64,
    dropped: AtomicU64,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relays {
    pub(crate) fn new() -> Self {
        let (events_tx, events) = mpsc::channel(EVENTS);
        Self {
            sessions: BTreeMap::new(),
            events_tx,
            events,
            endpoint: None,
            generation: 0,
        }
    }

    /// Runs sessions for exactly `relays`, authenticating with `key`:
    /// starts new ones, restarts those whose address or key changed, stops
    /// the rest. Returns the relays whose connected session stopped, which
    /// the core must forget.
    pub(crate) fn set(&mut self, relays: &[RelayInfo], key: &PrivateKey) -> Vec<String> {
        let mut gone = Vec::new();
        let listed: BTreeMap<&str, &RelayInfo> =
            relays.iter().map(|r| (r.name.as_str(), r)).collect();
        self.sessions.retain(|name, session| {
            let keep = listed.get(name.as_str()) == Some(&&session.info);
            if !keep && session.transport.is_some() {
                gone.push(name.clone());
            }
            keep
        });
        for relay in relays {
            if !self.sessions.contains_key(&relay.name) {
                self.start(relay.clone(), key);
            }
        }
        gone
    }

    /// Reconnects every session with `key` after the node key rotated.
    pub(crate) fn rekey(&mut self, key: &PrivateKey) -> Vec<String> {
        let relays: Vec<RelayInfo> = self.sessions.values().map(|s| s.info.clone()).collect();
        let gone = self.stop();
        self.set(&relays, key);
        gone
    }

    /// Reconnects the sessions running over TCP after the host's addresses
    /// changed: a TCP connection does not follow the node as QUIC does.
    pub(crate) fn reconnect_tcp(&mut self, key: &PrivateKey) -> Vec<String> {
        let stale: Vec<RelayInfo> = self
            .sessions
            .values()
            .filter(|s| s.transport == Some(Transport::Tcp))
            .map(|s| s.info.clone())
            .collect();
        for relay in &stale {
            self.sessions.remove(&relay.name);
            self.start(relay.clone(), key);
        }
        stale.into_iter().map(|r| r.name).collect()
    }

    /// Ends every session; returns the relays that were connected.
    pub(crate) fn stop(&mut self) -> Vec<String> {
        let gone = self
            .sessions
            .iter()
            .filter(|(_, s)| s.transport.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        self.sessions.clear();
        gone
    }

    /// Queues a datagram for relay `relay`; dropped (and counted) when that
    /// session is down or its queue is full, as UDP would.
    pub(crate) fn send(&self, relay: &str, to: PublicKey, payload: Vec<u8>) {
        let Some(session) = self.sessions.get(relay) else {
            tracing::trace!(relay, "no session with this relay; datagram dropped");
            return;
        };
        if session.transport.is_none() || session.outgoing.try_send((to, payload)).is_err() {
            session.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The next event from any session; cancel-safe.
    pub(crate) async fn recv(&mut self) -> RelayEvent {
        match self.events.recv().await {
            Some(event) => event,
            // `self` holds a sender, so the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Records `event` and says what the core must hear; `None` for events
    /// of sessions already replaced or stopped.
    pub(crate) fn on_event<'a>(&mut self, event: &'a RelayEvent) -> Option<CoreUpdate<'a>> {
        let session = self
            .sessions
            .get_mut(&*event.relay)
            .filter(|s| s.generation == event.generation)?;
        let relay = &*event.relay;
        Some(match &event.kind {
            EventKind::Up {
                transport,
                rtt,
                max_payload,
            } => {
                session.transport = Some(*transport);
                session.max_payload = *max_payload;
                CoreUpdate::Connected(relay, *rtt)
            }
            EventKind::Down => {
                session.transport = None;
                session.max_payload = None;
                CoreUpdate::Disconnected(relay)
            }
            EventKind::Packet { from, payload } => CoreUpdate::Packet(relay, *from, payload),
        })
    }

    /// Every session's state, by relay name.
    pub(crate) fn states(&self) -> Vec<SessionState> {
        self.sessions
            .iter()
            .map(|(name, s)| SessionState {
                name: name.clone(),
                transport: s.transport,
                max_payload: s.max_payload,
                oversized: s.counters.oversized.load(Ordering::Relaxed),
                dropped: s.counters.dropped.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn start(&mut self, info: RelayInfo, key: &PrivateKey) {
        self.generation += 1;
        let endpoint = self.endpoint();
        let (outgoing, queue) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let link = Link {
            relay: Arc::from(info.name.as_str()),
            generation: self.generation,
            events: self.events_tx.clone(),
            counters: Arc::clone(&counters),
        };
        let task = tokio::spawn(run(info.clone(), key.clone(), endpoint, queue, link));
        self.sessions.insert(
            info.name.clone(),
            Session {
                info,
                generation: self.generation,
                outgoing,
                task,
                transport: None,
                max_payload: None,
                counters,
            },
        );
    }

    /// The shared QUIC endpoint; `None` when no UDP socket can be bound,
    /// in which case sessions use TCP.
    fn endpoint(&mut self) -> Option<quinn::Endpoint> {
        if self.endpoint.is_none() {
            let bind = |addr: &str| {
                let addr: SocketAddr = addr.parse().ok()?;
                weft_net::relay::endpoint_with_timers(addr, KEEP_ALIVE, IDLE_TIMEOUT)
                    .inspect_err(|e| tracing::debug!(%addr, "no relay QUIC endpoint: {e}"))
                    .ok()
            };
            self.endpoint = bind("[::]:0").or_else(|| bind("0.0.0.0:0"));
            if self.endpoint.is_none() {
                tracing::warn!("cannot bind a UDP socket for relay sessions; using TCP only");
            }
        }
        self.endpoint.clone()
    }
}

/// Reconnection pacing and transport order for one relay: pure, so the
/// session task's choices are unit-tested.
#[derive(Debug, Clone)]
pub(crate) struct Redial {
    failures: u32,
    has_tcp: bool,
    has_quic: bool,
}

impl Redial {
    pub(crate) fn new(has_quic: bool, has_tcp: bool) -> Self {
        Self {
            failures: 0,
            has_tcp,
            has_quic,
        }
    }

    /// How long to wait before the next attempt.
    pub(crate) fn delay(&self) -> Duration {
        let Some(doublings) = self.failures.checked_sub(1) else {
            return Duration::ZERO;
        };
        MIN_BACKOFF
            .checked_mul(1u32 << doublings.min(8))
            .map_or(MAX_BACKOFF, |d| d.min(MAX_BACKOFF))
    }

    /// The transports to try and when to start each: QUIC at once on
    /// every attempt (it carries datagrams without head-of-line blocking),
    /// TCP after [`TCP_HEAD_START`] unless there is no QUIC to wait for.
    pub(crate) fn plan(&self) -> impl Iterator<Item = (Transport, Duration)> {
        let tcp_start = if self.has_quic {
            TCP_HEAD_START
        } else {
            Duration::ZERO
        };
        [
            Some((Transport::Quic, Duration::ZERO)).filter(|_| self.has_quic),
            Some((Transport::Tcp, tcp_start)).filter(|_| self.has_tcp),
        ]
        .into_iter()
        .flatten()
    }

    /// Whether a QUIC failure `error` is worth trying TCP for: not when the
    /// relay answered and refused (the same key is refused over TCP too).
    pub(crate) fn fall_back(error: &ClientError) -> bool {
        matches!(error, ClientError::Connect(_) | ClientError::Lost(_))
    }

    /// An attempt failed.
    pub(crate) fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// A session that was admitted ended after `lasted`.
    pub(crate) fn ended(&mut self, lasted: Duration) {
        if lasted >= HEALTHY {
            self.failures = 0;
        }
        self.failed();
    }
}

/// A session task's way back to the device loop.
#[derive(Debug)]
struct Link {
    relay: Arc<str>,
    generation: u64,
    events: mpsc::Sender<RelayEvent>,
    counters: Arc<Counters>,
}

impl Link {
    /// `false` once the device dropped the sessions.
    async fn report(&self, kind: EventKind) -> bool {
        let event = RelayEvent {
            relay: Arc::clone(&self.relay),
            generation: self.generation,
            kind,
        };
        self.events.send(event).await.is_ok()
    }
}

enum Connected {
    Quic(RelayClient),
    Tcp(Box<TcpRelayClient>),
}

/// Why a connected session ended.
enum End {
    /// The device stopped the session.
    Stopped,
    Failed(ClientError),
}

type Queue = mpsc::Receiver<(PublicKey, Vec<u8>)>;

/// One relay's session task: connect, pump, reconnect, until stopped.
async fn run(
    info: RelayInfo,
    key: PrivateKey,
    endpoint: Option<quinn::Endpoint>,
    mut queue: Queue,
    link: Link,
) {
    let mut redial = Redial::new(endpoint.is_some(), info.tcp_address.is_some());
    let mut last_error: Option<String> = None;
    loop {
        tokio::time::sleep(redial.delay()).await;
        let connected = match connect(&info, &key, endpoint.as_ref(), &redial).await {
            Ok(connected) => connected,
            Err(e) => {
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!(relay = %info.name, "cannot connect to the relay: {text}");
                    last_error = Some(text);
                } else {
                    tracing::debug!(relay = %info.name, "cannot connect to the relay: {text}");
                }
                redial.failed();
                continue;
            }
        };
        last_error = None;
        // Whatever queued while down is stale: the core sent it elsewhere.
        while queue.try_recv().is_ok() {}
        let since = Instant::now();
        let end = match connected {
            Connected::Quic(client) => pump_quic(&info, client, &mut queue, &link).await,
            Connected::Tcp(client) => pump_tcp(&info, *client, &mut queue, &link).await,
        };
        if !link.report(EventKind::Down).await {
            return;
        }
        match end {
            End::Stopped => return,
            End::Failed(e) => {
                tracing::warn!(relay = %info.name, "relay session ended: {e}");
                redial.ended(since.elapsed());
            }
        }
    }
}

/// Races the transports [`Redial::plan`] lists, each from its start
/// delay; the first admitted session wins. QUIC starts first and needs a
/// round trip less, so it wins wherever UDP gets through; TCP is ready
/// [`TCP_HEAD_START`] later where it does not.
async fn connect(
    info: &RelayInfo,
    key: &PrivateKey,
    endpoint: Option<&quinn::Endpoint>,
    redial: &Redial,
) -> Result<Connected, ClientError> {
    let dial = |transport: Transport, start: Duration| async move {
        tokio::time::sleep(start).await;
        let connected = match (transport, endpoint, info.tcp_address) {
            (Transport::Quic, Some(endpoint), _) => {
                let dial = RelayClient::connect(endpoint, info.address, &info.key, key);
                within(QUIC_CONNECT_TIMEOUT, dial)
                    .await
                    .map(Connected::Quic)
            }
            (Transport::Tcp, _, Some(address)) => {
                let dial = TcpRelayClient::connect(address, &info.key, key);
                within(TCP_CONNECT_TIMEOUT, dial)
                    .await
                    .map(|c| Connected::Tcp(Box::new(c)))
            }
            _ => Err(ClientError::Connect(
                format!("no {transport:?} transport").into(),
            )),
        };
        (transport, connected)
    };
    let mut attempts: futures::stream::FuturesUnordered<_> = redial
        .plan()
        .map(|(transport, start)| dial(transport, start))
        .collect();
    let mut error = ClientError::Connect("the relay offers no transport this node can use".into());
    while let Some((transport, attempt)) = futures::StreamExt::next(&mut attempts).await {
        match attempt {
            Ok(connected) => {
                tracing::info!(relay = %info.name, ?transport, "relay session admitted");
                return Ok(connected);
            }
            Err(e) if Redial::fall_back(&e) => {
                tracing::debug!(relay = %info.name, ?transport, "relay connect failed: {e}");
                error = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(error)
}

async fn within<T>(
    limit: Duration,
    attempt: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Connect(
                format!("no answer within {} ms", limit.as_millis()).into(),
            ))
        })
}

async fn pump_quic(info: &RelayInfo, client: RelayClient, queue: &mut Queue, link: &Link) -> End {
    let mut max_payload = client.max_payload();
    tracing::info!(relay = %info.name, max_payload, "relay datagram limit");
    let up = |client: &RelayClient| EventKind::Up {
        transport: Transport::Quic,
        rtt: client.rtt(),
        max_payload: Some(client.max_payload()),
    };
    if !link.report(up(&client)).await {
        client.close();
        return End::Stopped;
    }
    let mut tick = tokio::time::interval(RTT_REPORT);
    tick.tick().await;
    loop {
        tokio::select! {
            out = queue.recv() => {
                let Some((to, payload)) = out else {
                    client.close();
                    return End::Stopped;
                };
                if payload.len() > client.max_payload() {
                    link.counters.oversized.fetch_add(1, Ordering::Relaxed);
                }
                match client.send(&to, &payload) {
                    Ok(()) => {}
                    // A dead connection shows on the receiving side.
                    Err(e) => {
                        link.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(relay = %info.name, "relay send failed: {e}");
                    }
                }
            }
            received = client.recv() => match received {
                Ok((from, payload)) => {
                    if !link.report(EventKind::Packet { from, payload }).await {
                        client.close();
                        return End::Stopped;
                    }
                }
                Err(e) => return End::Failed(e),
            },
            _ = tick.tick() => {
                let now = client.max_payload();
                if now != max_payload {
                    tracing::debug!(relay = %info.name, max_payload = now, "relay datagram limit changed");
                    max_payload = now;
                }
                if !link.report(up(&client)).await {
                    client.close();
                    return End::Stopped;
                }
            }
        }
    }
}

async fn pump_tcp(info: &RelayInfo, client: TcpRelayClient, queue: &mut Queue, link: &Link) -> End {
    bound_liveness(info, &client);
    let rtt = client.rtt();
    let up = || EventKind::Up {
        transport: Transport::Tcp,
        rtt,
        max_payload: None,
    };
    if !link.report(up()).await {
        return End::Stopped;
    }
    let (mut sender, mut receiver) = client.into_split();
    let writer = async {
        while let Some((to, payload)) = queue.recv().await {
            sender.send(&to, &payload).await?;
        }
        Ok::<(), ClientError>(())
    };
    let reader = async {
        loop {
            let (from, payload) = receiver.recv().await?;
            if !link.report(EventKind::Packet { from, payload }).await {
                return Ok::<(), ClientError>(());
            }
        }
    };
    let ticker = async {
        let mut tick = tokio::time::interval(RTT_REPORT);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !link.report(up()).await {
                return;
            }
        }
    };
    tokio::pin!(writer, reader, ticker);
    let result = tokio::select! {
        r = &mut writer => r,
        r = &mut reader => r,
        () = &mut ticker => Ok(()),
    };
    match result {
        Ok(()) => {
            tracing::debug!(relay = %info.name, "relay session stopped");
            End::Stopped
        }
        Err(e) => End::Failed(e),
    }
}

/// Has the kernel end a TCP session whose relay went silent within a few
/// seconds, idle or not, as the QUIC idle timeout does.
fn bound_liveness(info: &RelayInfo, client: &TcpRelayClient) {
    use nix::sys::socket::{setsockopt, sockopt};
    let result = setsockopt(client, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(client, sockopt::TcpKeepIdle, &TCP_KEEP_IDLE_SECS))
        .and_then(|()| setsockopt(client, sockopt::TcpKeepInterval, &1))
        .and_then(|()| setsockopt(client, sockopt::TcpUserTimeout, &TCP_USER_TIMEOUT_MS));
    if let Err(e) = result {
        tracing::debug!(relay = %info.name, "cannot shorten the TCP session's timeouts: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_doubles_and_caps() {
        let mut redial = Redial::new(true, true);
        assert_eq!(redial.delay(), Duration::ZERO);
        let mut delays = Vec::new();
        for _ in 0..7 {
            redial.failed();
            delays.push(redial.delay().as_millis());
        }
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000, 5000]);
        for _ in 0..100 {
            redial.failed();
        }
        assert_eq!(redial.delay(), MAX_BACKOFF);
    }

    #[test]
    fn a_healthy_session_resets_the_backoff_and_a_flapping_one_does_not() {
        let mut redial = Redial::new(true, false);
        for _ in 0..4 {
            redial.failed();
        }
        redial.ended(Duration::from_secs(60));
        assert_eq!(redial.delay(), MIN_BACKOFF);
        redial.ended(Duration::from_millis(200));
        redial.ended(Duration::from_millis(200));
        assert_eq!(redial.delay(), Duration::from_secs(2));
    }

    #[test]
    fn quic_starts_first_and_tcp_races_it_only_when_offered() {
        let both: Vec<_> = Redial::new(true, true).plan().collect();
        assert_eq!(
            both,
            [
                (Transport::Quic, Duration::ZERO),
                (Transport::Tcp, TCP_HEAD_START)
            ]
        );
        let quic: Vec<_> = Redial::new(true, false).plan().collect();
        assert_eq!(quic, [(Transport::Quic, Duration::ZERO)]);
        let no_udp: Vec<_> = Redial::new(false, true).plan().collect();
        assert_eq!(no_udp, [(Transport::Tcp, Duration::ZERO)]);
        assert_eq!(Redial::new(false, false).plan().count(), 0);
    }

    #[test]
    fn only_transport_failures_fall_back_to_tcp() {
        assert!(Redial::fall_back(&ClientError::Connect("timeout".into())));
        assert!(Redial::fall_back(&ClientError::Lost("reset".into())));
        let refused = ClientError::Closed {
            code: weft_proto::relay::CLOSE_RELAY_NOT_ADMITTED,
            reason: "not admitted".into(),
        };
        assert!(!Redial::fall_back(&refused));
        assert!(!Redial::fall_back(&ClientError::Protocol("garbage".into())));
    }

    fn relay(name: &str, port: u16) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            key: PrivateKey::generate().public_key(),
            tcp_address: None,
            stun_address: None,
        }
    }

    #[tokio::test]
    async fn sessions_follow_the_listed_relays_and_ignore_stale_events() {
        let key = PrivateKey::generate();
        let mut relays = Relays::new();
        let fra = relay("fra1", 9);
        let ams = relay("ams1", 9);
        assert!(relays.set(&[fra.clone(), ams.clone()], &key).is_empty());
        let names: Vec<String> = relays.states().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["ams1", "fra1"]);

        let fra_generation = relays.sessions["fra1"].generation;
        let up = RelayEvent {
            relay: Arc::from("fra1"),
            generation: fra_generation,
            kind: EventKind::Up {
                transport: Transport::Quic,
                rtt: Duration::from_millis(3),
                max_payload: Some(1200),
            },
        };
        assert_eq!(
            relays.on_event(&up),
            Some(CoreUpdate::Connected("fra1", Duration::from_millis(3)))
        );
        assert_eq!(relays.states()[1].transport, Some(Transport::Quic));

        // Unchanged relays keep their session; a changed one is restarted,
        // and the core hears it is gone; a dropped one too.
        let mut moved = fra.clone();
        moved.address = SocketAddr::from(([127, 0, 0, 1], 10));
        assert_eq!(relays.set(&[moved, ams.clone()], &key), ["fra1"]);
        assert_ne!(relays.sessions["fra1"].generation, fra_generation);
        assert_eq!(relays.on_event(&up), None, "an event of the old session");
        assert!(relays.set(&[ams], &key).is_empty());
        assert_eq!(relays.states().len(), 1);

        // After the host moved, only a TCP session reconnects.
        assert!(relays.reconnect_tcp(&key).is_empty());
        let ams_generation = relays.sessions["ams1"].generation;
        let over_tcp = RelayEvent {
            relay: Arc::from("ams1"),
            generation: ams_generation,
            kind: EventKind::Up {
                transport: Transport::Tcp,
                rtt: Duration::from_millis(9),
                max_payload: None,
            },
        };
        assert!(relays.on_event(&over_tcp).is_some());
        assert_eq!(relays.reconnect_tcp(&key), ["ams1"]);
        assert_ne!(relays.sessions["ams1"].generation, ams_generation);
        assert_eq!(relays.states()[0].transport, None);

        // A datagram for a relay without a connected session is counted.
        relays.send("ams1", key.public_key(), vec![1, 2, 3]);
        relays.send("fra1", key.public_key(), vec![1, 2, 3]);
        assert_eq!(relays.states()[0].dropped, 1);
        assert!(relays.stop().is_empty());
        assert!(relays.states().is_empty());
    }
}
