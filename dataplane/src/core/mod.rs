//! The node's data plane as a sans-IO state machine: one WireGuard session
//! per peer over a single UDP socket or through relays, the discovery and
//! probing that choose between them, and the stateful inbound filter.

mod disco;
mod discovery;
mod paths;
mod peer;
mod probe;
mod rule_stats;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_nat;
mod too_big;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use weft_proto::{
    Advertisement, Identity, NetMap, NetMapDelta, NodeId, Peer, PrivateKey, PublicKey, RelayInfo,
};

use crate::filter::{self, Firewall, Verdict};
use crate::wireguard::errors::WireGuardError;
use crate::wireguard::handshake::parse_handshake_anon;
use crate::wireguard::rate_limiter::RateLimiter;
use crate::wireguard::{Packet, Tunn, TunnResult};
use discovery::Discovery;
use peer::{Maker, PeerTunnel, Slot};
use probe::Pending;
use rule_stats::RuleStats;
pub use rule_stats::RuleVerdicts;
use too_big::TokenBucket;

/// A weft node's data plane: WireGuard sessions to the netmap's peers and
/// the inbound packet filter. It does no IO, reads no clock of its own and
/// draws every random number (session indices, ephemeral keys, disco and
/// STUN transaction ids) from a generator seeded by the caller, so a run
/// replays exactly from its inputs and seed.
///
/// # Driving it
///
/// Inputs:
/// - [`Node::set_netmap`], [`Node::apply_delta`], [`Node::clear`] when the
///   coordinator's view changes;
/// - [`Node::handle_tun_packet`] for every IP packet read from the TUN device;
/// - [`Node::handle_udp`] for every datagram received on the WireGuard
///   socket (WireGuard, disco and STUN answers share it);
/// - [`Node::set_relays`] with the coordinator's relay list,
///   [`Node::relay_connected`] / [`Node::relay_disconnected`] as relay
///   sessions come and go, and [`Node::handle_relayed`] for every datagram a
///   relay session delivers;
/// - [`Node::set_local_endpoints`] with the host's addresses, at start and
///   whenever they may have changed;
/// - [`Node::ping`] for `weft ping`;
/// - [`Node::handle_timeout`] when the instant [`Node::poll_timeout`] named
///   has passed.
///
/// After any input, drain the outputs until they return `None`:
/// [`Node::poll_transmit`] (datagrams for the UDP socket),
/// [`Node::poll_relay_transmit`] (datagrams for a relay session),
/// [`Node::poll_tun_packet`] (packets for the TUN device) and
/// [`Node::poll_event`] (advertisements for the coordinator, ping answers).
/// Then ask [`Node::poll_timeout`] and wait for IO or that instant, whichever
/// comes first. Every input takes `now`, which must not go backwards.
///
/// # Paths
///
/// A peer is reached directly while a direct path is *trusted* (a disco pong
/// or an authenticated WireGuard packet from it in the last 5 s), else
/// through a relay when one is connected, else at the best guess (the first
/// endpoint it advertises, or where it last spoke from). While there is
/// traffic and no trusted path the node probes every candidate endpoint with
/// disco pings (and one through the relay, which makes the peer probe back at
/// once and punches holes in both NATs). Disco messages are sealed with the
/// node keys (Noise `K`) and share the WireGuard socket, so NAT mappings are
/// shared with WireGuard.
///
/// Feeding many inputs before draining is fine and cheaper (the shell reads
/// whole batches per wakeup). Hand the buffers of drained outputs back with
/// [`Node::recycle`] once written: the node reuses them, so a steady stream
/// of packets allocates nothing.
///
/// # Clocks
///
/// Every timer runs on the `now` passed in: the node's 250 ms tick, flow
/// expiry, and WireGuard's own (rekeying, handshake retransmission,
/// keepalives, session expiry, the handshake age in [`PeerStatus`]), so a
/// simulation that advances `now` faster than real time ages sessions too.
/// The wall clock given to [`Node::new`] only dates handshake initiations,
/// which peers require to grow across restarts.
///
/// # Admission
///
/// Only peers in the netmap can open a tunnel: a handshake from any other key
/// is dropped. A peer may only send packets from its own overlay addresses,
/// and those packets then pass the filter ([`crate::filter`]).
///
/// # MTU
///
/// Packets from the TUN device longer than the tunnel's MTU
/// ([`Node::with_mtu`]) get the answer a router would give: ICMP
/// "fragmentation needed" for IPv4 with DF set, ICMPv6 "packet too big" for
/// IPv6, at most 100 a second, queued for the TUN device; IPv4 without DF
/// is sent, for the underlay to fragment.
///
/// # Key changes
///
/// When this node's key rotates ([`Node::rotate_key`]) or a peer's key
/// changes in the netmap, the peer gets a new tunnel and the old one keeps
/// carrying traffic until the new one's handshake completes (then for a few
/// seconds more, for packets already in flight), so a rotation loses no
/// packets whichever side learns of it first.
pub struct Node {
    /// This node's key, and what its peers' tunnels are made from.
    maker: Maker,
    /// Checks mac1 and applies the node-wide handshake rate limit (cookie
    /// replies under load) before the Diffie-Hellman that identifies a sender.
    handshake_gate: RateLimiter,
    peers: BTreeMap<NodeId, PeerTunnel>,
    by_key: HashMap<PublicKey, NodeId>,
    by_index: HashMap<u32, (NodeId, Slot)>,
    by_address: HashMap<IpAddr, NodeId>,
    next_index: u32,
    firewall: Firewall,
    transmits: VecDeque<Transmit>,
    tun_packets: VecDeque<Vec<u8>>,
    /// Buffers of outputs already written, reused for the next ones.
    spare: Vec<Vec<u8>>,
    next_tick: Option<Instant>,
    stats: FilterStats,
    /// Verdicts by the policy rule that decided them.
    rule_stats: RuleStats,
    /// Scratch space for WireGuard's output, large enough for any IP packet plus overhead.
    buf: Box<[u8]>,
    relay_transmits: VecDeque<RelayTransmit>,
    discovery: Discovery,
    events: VecDeque<Event>,
    /// The advertisement last reported, to report only changes.
    advertised: Option<Advertisement>,
    /// Disco pings awaiting their pong, by transaction.
    pending: HashMap<disco::Tx, Pending>,
    /// `weft ping` probes awaiting an answer: the peer and the deadline.
    user_pings: BTreeMap<u64, (NodeId, Instant)>,
    next_ping_id: u64,
    /// Disco messages the node still opens this tick (each costs two DH).
    disco_budget: u32,
    /// An extra wakeup: a peer became active and has to be probed at once.
    wake: Option<Instant>,
    /// The latest `now` of a timer or control input, for status.
    last_now: Instant,
    /// The tunnel's MTU: longer packets from the TUN device are answered
    /// with ICMP "too big" ([`too_big`]).
    mtu: u16,
    /// This node's overlay addresses, from the netmap's `self_node`: only
    /// packets from them get "too big" answers.
    own: Vec<IpAddr>,
    /// Limits "too big" answers.
    too_big_limit: TokenBucket,
}

/// A datagram for a relay: WireGuard or disco, to the node holding `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTransmit {
    /// The relay's name, as in the coordinator's list.
    pub relay: String,
    /// The node key of the destination.
    pub to: PublicKey,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// A peer and how it is reached now ([`Node::peer_route`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoute<'a> {
    /// The peer as the netmap describes it.
    pub peer: &'a Peer,
    /// How it is reached; `None` while there is no way yet.
    pub path: Option<PathKind>,
    /// The relay, when `path` is [`PathKind::Relay`].
    pub relay: Option<String>,
}

/// How a peer is reached now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Straight over the underlay, UDP.
    Direct,
    /// Through a relay.
    Relay,
}

/// What the node asks the shell to do or report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Tell the coordinator (`ClientMessage::UpdateEndpoints`); emitted whenever it changes.
    Advertise(Advertisement),
    /// The answer to [`Node::ping`].
    Pong {
        /// The id [`Node::ping`] returned.
        id: u64,
        /// Who answered.
        peer: NodeId,
        /// The path the ping and its answer took.
        path: PathKind,
        /// The relay, when `path` is [`PathKind::Relay`].
        relay: Option<String>,
        /// The peer's endpoint, when `path` is [`PathKind::Direct`].
        endpoint: Option<SocketAddr>,
        /// Round-trip time.
        rtt: Duration,
    },
    /// [`Node::ping`] got no answer within [`PING_TIMEOUT`].
    PingTimeout {
        /// The id [`Node::ping`] returned.
        id: u64,
        /// The peer that did not answer.
        peer: NodeId,
    },
}

/// What endpoint discovery found, for `weft netcheck`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netcheck {
    /// Reflexive endpoints of the WireGuard socket as each STUN server saw it.
    pub reflexive: Vec<Reflection>,
    /// Endpoint-independent when at least two STUN servers saw the same
    /// mapped endpoint, dependent when they differ, `None` when fewer than
    /// two answered.
    pub mapping: Option<NatMapping>,
    /// Whether any STUN answer arrived on the WireGuard socket in the last round (UDP works).
    pub udp: bool,
    /// Relay latencies as the shell reported them, home first.
    pub relays: Vec<RelayLatency>,
    /// The host's addresses with the WireGuard port.
    pub local: Vec<SocketAddr>,
}

/// The WireGuard socket's endpoint as one relay's STUN server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reflection {
    /// The relay whose STUN server answered.
    pub relay: String,
    /// The source address and port it saw.
    pub endpoint: SocketAddr,
}

/// How the NAT in front of this node maps the WireGuard socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatMapping {
    /// One public endpoint whatever the destination: peers can reach it once
    /// a hole is punched.
    EndpointIndependent,
    /// A different public endpoint per destination (symmetric NAT): direct
    /// paths work only to peers that need no hole punched.
    EndpointDependent,
}

/// One relay's session, as the shell measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLatency {
    /// The relay's name.
    pub name: String,
    /// Round-trip time while connected; `None` when not connected.
    pub rtt: Option<Duration>,
    /// Whether it is this node's home relay.
    pub home: bool,
}

/// How long [`Node::ping`] waits for an answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// A datagram to send on the WireGuard UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dst: SocketAddr,
    /// The WireGuard message.
    pub payload: Vec<u8>,
}

/// One peer, for `weft status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Stable id.
    pub id: NodeId,
    /// Name in the overlay.
    pub name: String,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Who it is.
    pub identity: Identity,
    /// Its direct endpoint, when `path` is [`PathKind::Direct`].
    pub endpoint: Option<SocketAddr>,
    /// How it is reached now; `None` when there is no way yet.
    #[serde(default)]
    pub path: Option<PathKind>,
    /// The relay used, when `path` is [`PathKind::Relay`].
    #[serde(default)]
    pub relay: Option<String>,
    /// How long ago the current session's handshake completed.
    pub last_handshake: Option<Duration>,
    /// Payload bytes received from it.
    pub rx_bytes: u64,
    /// Payload bytes sent to it.
    pub tx_bytes: u64,
}

/// Packet counters of the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterStats {
    /// Inbound packets the filter admitted.
    pub accepted: u64,
    /// Inbound packets the filter denied (for any reason, deny rules included).
    pub dropped: u64,
    /// Inbound flows (and flowless packets such as fragments) that passed
    /// only because a deny rule or the default is in audit mode.
    pub audit_passed: u64,
    /// Inbound packets an explicit deny rule dropped.
    pub denied_by_rule: u64,
    /// Inbound packets whose source is not an address of the peer that sent them.
    pub dropped_spoofed: u64,
    /// Packets (either way) that are not valid IPv4 or IPv6.
    pub dropped_malformed: u64,
    /// Outbound packets to an address no peer has.
    pub dropped_no_peer: u64,
    /// Outbound packets to a peer whose endpoint is not known yet.
    pub dropped_no_endpoint: u64,
    /// Datagrams from a key or for a session index not in the netmap.
    pub dropped_unknown_peer: u64,
    /// Datagrams that are not valid WireGuard, or fail authentication.
    pub dropped_invalid_datagram: u64,
    /// Outbound packets longer than the tunnel's MTU answered with ICMP
    /// "fragmentation needed" or ICMPv6 "packet too big" (and dropped).
    #[serde(default)]
    pub too_big_sent: u64,
    /// Outbound packets longer than the tunnel's MTU dropped without an
    /// answer: rate-limited, ICMP errors themselves, or not from this node.
    #[serde(default)]
    pub too_big_suppressed: u64,
    /// Handshakes abandoned after WireGuard's retries went unanswered
    /// (REKEY_ATTEMPT_TIME): the peer is unreachable on every path tried.
    #[serde(default)]
    pub handshake_failures: u64,
    /// Data packets decrypted from peers, by the path they came over.
    #[serde(default)]
    pub received: PathTraffic,
    /// Data packets encrypted for peers, by the path they went on.
    #[serde(default)]
    pub sent: PathTraffic,
    /// Flows currently tracked.
    pub flows: u64,
}

/// Tunnel traffic split by path: plain counters the packet path adds to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathTraffic {
    /// Packets straight over the underlay.
    pub direct_packets: u64,
    /// Their IP packets' bytes (before encryption).
    pub direct_bytes: u64,
    /// Packets through a relay.
    pub relay_packets: u64,
    /// Their IP packets' bytes (before encryption).
    pub relay_bytes: u64,
}

impl PathTraffic {
    fn count(&mut self, relayed: bool, len: usize) {
        if relayed {
            self.relay_packets += 1;
            self.relay_bytes += len as u64;
        } else {
            self.direct_packets += 1;
            self.direct_bytes += len as u64;
        }
    }
}

/// The interval of the WireGuard timer tick, as in boringtun's device.
const TICK: Duration = Duration::from_millis(250);
/// How often a peer that sends on a session this node no longer has is
/// offered a fresh handshake (WireGuard's REKEY_TIMEOUT).
const STALE_SESSION_NUDGE: Duration = Duration::from_secs(5);
/// Handshake messages the node answers per [`TICK`] before demanding cookies:
/// the gate's count resets every tick, so this is 100 a second.
const HANDSHAKE_RATE_LIMIT: u64 = 25;
/// The largest IP packet; the scratch buffer holds it plus WireGuard's overhead.
const MAX_PACKET: usize = 65_535;
const WIREGUARD_OVERHEAD: usize = 32;
/// The largest message `encapsulate` writes for a packet: a handshake
/// initiation, when the packet has to wait for a session.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Spare buffers kept for reuse: a batch's worth, so a burst's buffers come
/// back to the allocator rather than staying pinned.
const SPARE_BUFFERS: usize = 256;
/// Session indices are 24 bits; the low 8 count rekeys.
const INDEX_MASK: u32 = 0x00ff_ffff;
/// How long the side with the higher key waits before sending its
/// handshake again on a new path (the other side sends at once).
const HANDSHAKE_DEFER: Duration = Duration::from_secs(1);
/// Disco messages opened per [`TICK`] (200 a second): bounds the
/// Diffie-Hellman work garbage from known keys can cause.
const DISCO_RATE_LIMIT: u32 = 50;
/// "Too big" answers sent at once, then one per [`TOO_BIG_INTERVAL`]
/// (100 a second), like a router's ICMP rate limit.
const TOO_BIG_BURST: u32 = 20;
const TOO_BIG_INTERVAL: Duration = Duration::from_millis(10);

/// The memory a peer's WireGuard tunnel takes once made (on its first
/// packet), for sizing large netmaps.
pub const TUNNEL_SIZE: usize = std::mem::size_of::<Tunn>();

/// The tunnel's MTU over a 1500-byte underlay: 1500 less WireGuard's 80
/// bytes of worst-case (IPv6) overhead. The TUN device is given the same.
pub const DEFAULT_MTU: u16 = 1420;

impl Node {
    /// A node with no peers and a deny-all filter. `private_key` is this
    /// node's WireGuard key; `wall_clock` is the wall-clock time at `now`;
    /// every random number the node needs comes from a generator seeded
    /// with `rng_seed` (the daemon passes a random one; simulations a fixed
    /// one). Nothing is scheduled until peers or relays arrive. The
    /// tunnel's MTU is [`DEFAULT_MTU`]; [`Node::with_mtu`] sets another.
    pub fn new(
        private_key: PrivateKey,
        now: Instant,
        wall_clock: SystemTime,
        rng_seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(rng_seed);
        let wall = wall_clock
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let discovery = Discovery::new(rng.next_u64());
        // A random start, so a restarted node's indices do not meet the
        // datagrams of its previous run's sessions.
        let next_index = (rng.gen::<u32>() & INDEX_MASK).max(1);
        let static_private = private_key.to_x25519();
        let handshake_gate = RateLimiter::new_at(
            &x25519_dalek::PublicKey::from(&static_private),
            HANDSHAKE_RATE_LIMIT,
            &mut rng,
            now,
        );
        Self {
            handshake_gate,
            maker: Maker::new(static_private, now, wall, rng),
            peers: BTreeMap::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            by_address: HashMap::new(),
            next_index,
            firewall: Firewall::default(),
            transmits: VecDeque::new(),
            tun_packets: VecDeque::new(),
            spare: Vec::new(),
            next_tick: None,
            stats: FilterStats::default(),
            rule_stats: RuleStats::default(),
            buf: vec![0; MAX_PACKET + WIREGUARD_OVERHEAD].into_boxed_slice(),
            relay_transmits: VecDeque::new(),
            discovery,
            events: VecDeque::new(),
            advertised: None,
            pending: HashMap::new(),
            user_pings: BTreeMap::new(),
            next_ping_id: 1,
            disco_budget: DISCO_RATE_LIMIT,
            wake: None,
            last_now: now,
            mtu: DEFAULT_MTU,
            own: Vec::new(),
            too_big_limit: TokenBucket::new(TOO_BIG_BURST, TOO_BIG_INTERVAL, now),
        }
    }

    /// Sets the tunnel's MTU, the TUN device's: the largest packet whose
    /// WireGuard datagram still fits the underlay. Longer packets from the
    /// TUN device get ICMP "too big" answers (see "MTU" above); for IPv6
    /// the limit is never below 1280 bytes.
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.mtu = mtu;
        self
    }

    /// Installs a complete netmap (first sync). Peers no longer present are
    /// dropped with their sessions; peers whose key is unchanged keep theirs.
    pub fn set_netmap(&mut self, netmap: &NetMap, now: Instant) {
        self.own = netmap.self_node.addresses().to_vec();
        let keep: Vec<NodeId> = netmap.peers.iter().map(|p| p.id).collect();
        let gone: Vec<NodeId> = self
            .peers
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove_peer(id);
        }
        for peer in &netmap.peers {
            self.upsert_peer(peer, now);
        }
        self.firewall.set_filter(&netmap.filter);
        self.rule_stats.set_rules(&netmap.filter);
        self.reindex(now);
    }

    /// Applies a delta. Removed peers' sessions are dropped at once (their
    /// tunnels are cut); a peer both upserted and removed is removed. Of
    /// the node's own details (`self_node`) the data plane keeps only its
    /// addresses.
    pub fn apply_delta(&mut self, delta: &NetMapDelta, now: Instant) {
        if let Some(node) = &delta.self_node {
            self.own = node.addresses().to_vec();
        }
        for peer in &delta.upsert_peers {
            self.upsert_peer(peer, now);
        }
        for id in &delta.remove_peers {
            self.remove_peer(*id);
        }
        if let Some(filter) = &delta.filter {
            self.firewall.set_filter(filter);
            self.rule_stats.set_rules(filter);
        }
        self.reindex(now);
    }

    /// Replaces this node's WireGuard key with `private_key`, once the
    /// coordinator has published it. Every peer gets a tunnel for the new
    /// key while its old session keeps carrying traffic until then; peers
    /// still knowing only the old key cannot start new handshakes until the
    /// coordinator tells them the new one.
    pub fn rotate_key(&mut self, private_key: PrivateKey, now: Instant) {
        let static_private = private_key.to_x25519();
        let static_public = x25519_dalek::PublicKey::from(&static_private);
        if static_public == self.maker.static_public {
            return;
        }
        self.handshake_gate = RateLimiter::new_at(
            &static_public,
            HANDSHAKE_RATE_LIMIT,
            &mut self.maker.rng,
            now,
        );
        self.maker.set_key(static_private, now);
        let peers: Vec<Peer> = self.peers.values().map(|p| p.peer.clone()).collect();
        for peer in peers {
            self.replace_tunnel(peer, now);
        }
        self.reindex(now);
        tracing::info!(key = %PublicKey::from(self.maker.static_public).short(), "node key rotated");
    }

    /// This node's WireGuard public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.maker.static_public)
    }

    /// Forgets every peer and the filter (on `weft down`, or when the node is deleted).
    pub fn clear(&mut self) {
        self.own.clear();
        self.peers.clear();
        self.by_key.clear();
        self.by_index.clear();
        self.by_address.clear();
        self.firewall.clear();
        self.transmits.clear();
        self.relay_transmits.clear();
        self.tun_packets.clear();
        self.pending.clear();
        self.next_tick = None;
        self.wake = None;
        for (id, (peer, _)) in std::mem::take(&mut self.user_pings) {
            self.events.push_back(Event::PingTimeout { id, peer });
        }
    }

    /// An IP packet read from the TUN device (outbound).
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) {
        if packet.len() > MAX_PACKET {
            self.stats.dropped_malformed += 1;
            return;
        }
        let headers = match filter::parse(packet) {
            Ok(headers) => headers,
            Err(error) => {
                self.stats.dropped_malformed += 1;
                tracing::trace!(%error, "dropping malformed packet from the TUN device");
                return;
            }
        };
        let Some(&id) = self.by_address.get(&headers.dst) else {
            self.stats.dropped_no_peer += 1;
            tracing::trace!(dst = %headers.dst, "dropping packet: no peer has the address");
            return;
        };
        if packet.len() > usize::from(self.mtu) && !self.send_oversized(packet, now) {
            return;
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            // `by_address` is rebuilt from `peers` whenever they change.
            self.stats.dropped_no_peer += 1;
            return;
        };
        let Some(dst) = route(peer, &self.discovery, now) else {
            self.stats.dropped_no_endpoint += 1;
            tracing::trace!(peer = %peer.peer.id, "dropping packet: peer has no endpoint yet");
            return;
        };
        if peer.paths.touch(now) {
            self.wake = Some(now);
        }
        self.firewall.outbound(&headers, packet.len(), now);
        // Encrypted straight into the buffer that goes to the socket.
        let mut out = self.spare.pop().unwrap_or_default();
        out.resize(
            (packet.len() + WIREGUARD_OVERHEAD).max(HANDSHAKE_INIT_LEN),
            0,
        );
        let written = match peer
            .sending_tunn(&mut self.maker, now)
            .encapsulate_at(packet, &mut out, now)
        {
            TunnResult::WriteToNetwork(datagram) => Some(datagram.len()),
            TunnResult::Err(error) => {
                tracing::trace!(peer = %peer.peer.id, ?error, "cannot encapsulate packet");
                None
            }
            // Queued in the tunnel until the handshake completes.
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => None,
        };
        match written {
            Some(len) => {
                out.truncate(len);
                self.stats
                    .sent
                    .count(matches!(dst, Dst::Relay(_)), packet.len());
                let to = peer.key();
                push(&mut self.transmits, &mut self.relay_transmits, dst, to, out);
            }
            None => self.recycle(out),
        }
    }

    /// Decides about a packet from the TUN device longer than the MTU:
    /// `true` to send it anyway, `false` when it is dropped, after queueing
    /// a "too big" answer for the TUN device when one is due.
    fn send_oversized(&mut self, packet: &[u8], now: Instant) -> bool {
        let silence = match too_big::classify(packet, self.mtu, &self.own) {
            too_big::Verdict::Fits | too_big::Verdict::Fragmentable => return true,
            too_big::Verdict::Silent(silence) => Some(silence),
            too_big::Verdict::Answer => None,
        };
        if silence.is_none() && self.too_big_limit.take(now) {
            let mut answer = self.spare.pop().unwrap_or_default();
            if too_big::write_answer(packet, self.mtu, &mut answer) {
                self.stats.too_big_sent += 1;
                tracing::trace!(
                    len = packet.len(),
                    mtu = self.mtu,
                    "packet too big; answered"
                );
                self.tun_packets.push_back(answer);
                return false;
            }
            self.recycle(answer);
        }
        self.stats.too_big_suppressed += 1;
        tracing::trace!(
            len = packet.len(),
            mtu = self.mtu,
            ?silence,
            "packet too big; dropped without an answer"
        );
        false
    }

    /// A datagram received on the WireGuard UDP socket: WireGuard, disco, or
    /// a STUN answer, told apart by their first bytes.
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        match datagram {
            // WireGuard: the type, then three zero bytes.
            [1..=4, 0, 0, 0, ..] => {}
            [first, ..] if *first == disco::MAGIC[0] && disco::is_disco(datagram) => {
                self.handle_disco(Source::Udp(from), datagram, now);
                return;
            }
            // STUN: the first two bits are zero.
            [first, ..] if first & 0xc0 == 0 => {
                if self.discovery.handle_stun(from, datagram) {
                    self.advertise_changes();
                } else {
                    self.stats.dropped_invalid_datagram += 1;
                    tracing::trace!(%from, "dropping datagram that is neither WireGuard, disco nor an expected STUN answer");
                }
                return;
            }
            _ => {}
        }
        self.handle_wireguard(Source::Udp(from), datagram, now);
    }

    /// The relays the coordinator lists (`ServerMessage::Relays`). STUN goes
    /// to their `stun_address`.
    pub fn set_relays(&mut self, relays: &[RelayInfo], now: Instant) {
        self.last_now = now;
        self.discovery.set_relays(relays, now, &mut self.transmits);
        self.schedule_tick(now);
        self.advertise_changes();
    }

    /// The shell's session to relay `name` is admitted (or its RTT was re-measured).
    pub fn relay_connected(&mut self, name: &str, rtt: Duration, now: Instant) {
        self.last_now = now;
        if self.discovery.relay_connected(name, rtt) {
            // Handshakes that went to a guess while no relay was up go again
            // now, rather than on WireGuard's 5 s retry.
            let waiting: Vec<NodeId> = self
                .peers
                .iter()
                .filter(|(_, p)| {
                    !p.has_session() && p.paths.active(now) && p.paths.trusted(now).is_none()
                })
                .map(|(id, _)| *id)
                .collect();
            for id in waiting {
                self.handshake_on_new_path(id, now);
            }
        }
        self.advertise_changes();
    }

    /// The shell's session to relay `name` ended; the node stops using it.
    pub fn relay_disconnected(&mut self, name: &str, now: Instant) {
        self.last_now = now;
        self.discovery.relay_disconnected(name);
        self.advertise_changes();
    }

    /// A datagram that arrived through relay `relay` from the node holding
    /// `from` (as the relay authenticated it): WireGuard or disco.
    pub fn handle_relayed(&mut self, relay: &str, from: PublicKey, datagram: &[u8], now: Instant) {
        let source = Source::Relay { relay, key: from };
        if disco::is_disco(datagram) {
            self.handle_disco(source, datagram, now);
        } else {
            self.handle_wireguard(source, datagram, now);
        }
    }

    /// Next datagram for a relay session.
    pub fn poll_relay_transmit(&mut self) -> Option<RelayTransmit> {
        self.relay_transmits.pop_front()
    }

    /// The host's usable addresses with the WireGuard port. A change from a
    /// previous set means the node moved: every direct path has to prove
    /// itself again (traffic takes the relay meanwhile), STUN runs at once,
    /// and active peers are probed at once.
    pub fn set_local_endpoints(&mut self, endpoints: Vec<SocketAddr>, now: Instant) {
        self.last_now = now;
        if self.discovery.set_local(endpoints) {
            tracing::info!("local addresses changed; finding paths again");
            for peer in self.peers.values_mut() {
                peer.paths.distrust();
                if peer.paths.active(now) {
                    peer.paths.next_probe = Some(now);
                }
            }
            self.wake = Some(now);
            self.discovery.stun(now, &mut self.transmits);
        }
        self.advertise_changes();
    }

    /// Next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Sends one disco ping to `peer` over its current path (and probes its
    /// direct candidates when no direct path is trusted); the answer comes as
    /// [`Event::Pong`] or [`Event::PingTimeout`] with the returned id. `None`
    /// when the peer is unknown.
    pub fn ping(&mut self, peer: NodeId, now: Instant) -> Option<u64> {
        self.last_now = now;
        let tunnel = self.peers.get(&peer)?;
        let id = self.next_ping_id;
        self.next_ping_id += 1;
        self.user_pings.insert(id, (peer, now + PING_TIMEOUT));
        let trusted = tunnel.paths.trusted(now).is_some();
        if let Some(dst) = route(tunnel, &self.discovery, now) {
            self.send_ping(peer, dst, Some(id), now);
        }
        if !trusted {
            self.probe_candidates(peer, now);
        }
        Some(id)
    }

    /// What endpoint discovery found, for `weft netcheck`.
    pub fn netcheck(&self) -> Netcheck {
        self.discovery.netcheck()
    }

    /// WireGuard from the socket or a relay.
    fn handle_wireguard(&mut self, source: Source<'_>, datagram: &[u8], now: Instant) {
        let Some((id, slot, authenticates)) = self.route_datagram(source, datagram, now) else {
            return;
        };
        let Self {
            peers,
            firewall,
            transmits,
            relay_transmits,
            tun_packets,
            spare,
            stats,
            rule_stats,
            buf,
            wake,
            maker,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&id) else {
            return;
        };
        let key = peer.key();
        if let Source::Relay { key: from, .. } = source {
            if from != key {
                stats.dropped_unknown_peer += 1;
                tracing::trace!(peer = %id, "dropping relayed WireGuard whose session belongs to another key");
                return;
            }
        }
        // Field by field, so the paths stay assignable below.
        let tunn = match (slot, &mut peer.retiring) {
            (Slot::Current, _) => maker.made(&mut peer.tunn, peer.peer.node_key, peer.index, now),
            (Slot::Retiring, Some(retiring)) => &mut retiring.tunn,
            (Slot::Retiring, None) => return,
        };
        let (packet, src) = match tunn.decapsulate_at(source.ip(), datagram, buf, now) {
            TunnResult::Done => {
                if authenticates {
                    source.heard(&mut peer.paths, now);
                }
                return;
            }
            TunnResult::Err(error) => {
                stats.dropped_invalid_datagram += 1;
                tracing::trace!(peer = %id, ?error, "dropping datagram");
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                source.heard(&mut peer.paths, now);
                push(
                    transmits,
                    relay_transmits,
                    source.reply(),
                    key,
                    reply.to_vec(),
                );
                // The tunnel's contract: flush what queued up behind the handshake.
                while let TunnResult::WriteToNetwork(queued) =
                    tunn.decapsulate_at(None, &[], buf, now)
                {
                    push(
                        transmits,
                        relay_transmits,
                        source.reply(),
                        key,
                        queued.to_vec(),
                    );
                }
                return;
            }
            TunnResult::WriteToTunnelV4(packet, src) => (packet, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(packet, src) => (packet, IpAddr::V6(src)),
        };
        source.heard(&mut peer.paths, now);
        if peer.paths.touch(now) {
            *wake = Some(now);
        }
        stats
            .received
            .count(matches!(source, Source::Relay { .. }), packet.len());
        if !peer.owns(src) {
            stats.dropped_spoofed += 1;
            tracing::trace!(peer = %id, %src, "dropping packet: source is not the peer's address");
            return;
        }
        let headers = match filter::parse(packet) {
            Ok(headers) => headers,
            Err(error) => {
                stats.dropped_malformed += 1;
                tracing::trace!(peer = %id, %error, "dropping malformed packet from the tunnel");
                return;
            }
        };
        let verdict = firewall.inbound(&headers, packet.len(), now);
        rule_stats.count(&verdict);
        match verdict {
            Verdict::Accept(admission) => {
                stats.accepted += 1;
                if let filter::Admission::Audit { .. } = admission {
                    stats.audit_passed += 1;
                }
                let mut out = spare.pop().unwrap_or_default();
                out.clear();
                out.extend_from_slice(packet);
                tun_packets.push_back(out);
            }
            Verdict::Drop(reason) => {
                stats.dropped += 1;
                if let filter::Denial::Denied { .. } = reason {
                    stats.denied_by_rule += 1;
                }
                tracing::trace!(
                    src = %headers.src,
                    dst = %headers.dst,
                    protocol = ?headers.protocol,
                    transport = ?headers.transport,
                    ?reason,
                    "filter dropped inbound packet"
                );
            }
        }
    }

    /// Drives timers: WireGuard's for every peer every 250 ms,
    /// path probing, STUN, ping timeouts, and flow expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        let tick = self.next_tick.is_some_and(|tick| tick <= now);
        if tick || self.wake.is_some_and(|wake| wake <= now) {
            self.wake = None;
            self.probe_due(now);
        }
        if tick {
            for peer in self.peers.values_mut() {
                let Some(tunn) = peer.tunn.as_deref_mut() else {
                    continue;
                };
                match tunn.update_timers_at(&mut self.buf, now) {
                    TunnResult::WriteToNetwork(datagram) => {
                        match route(peer, &self.discovery, now) {
                            Some(dst) => push(
                                &mut self.transmits,
                                &mut self.relay_transmits,
                                dst,
                                peer.peer.node_key,
                                datagram.to_vec(),
                            ),
                            None => {
                                tracing::trace!(peer = %peer.peer.id, "no path for timer message")
                            }
                        }
                    }
                    TunnResult::Err(WireGuardError::HandshakeTimedOut) => {
                        self.stats.handshake_failures += 1;
                        tracing::debug!(peer = %peer.peer.id, "handshake timed out");
                    }
                    TunnResult::Err(error) => {
                        tracing::trace!(peer = %peer.peer.id, ?error, "WireGuard timer");
                    }
                    TunnResult::Done
                    | TunnResult::WriteToTunnelV4(..)
                    | TunnResult::WriteToTunnelV6(..) => {}
                }
            }
            let due: Vec<NodeId> = self
                .peers
                .iter_mut()
                .filter(|(_, p)| p.handshake_due.is_some_and(|at| at <= now))
                .map(|(id, p)| {
                    p.handshake_due = None;
                    *id
                })
                .collect();
            for id in due {
                if self.peers.get(&id).is_some_and(|p| !p.has_session()) {
                    self.resend_handshake(id, now);
                }
            }
            for peer in self.peers.values_mut() {
                if let Some(index) = peer.expire_retiring(now) {
                    tracing::debug!(peer = %peer.peer.id, "the session of the replaced key ended");
                    self.by_index.remove(&index);
                }
            }
            self.handshake_gate.reset_count_at(now);
            self.disco_budget = DISCO_RATE_LIMIT;
            self.expire_pings(now);
            self.discovery.handle_timeout(now, &mut self.transmits);
            self.advertise_changes();
            self.next_tick = Some(now + TICK);
        }
        self.firewall.handle_timeout(now);
    }

    /// Next datagram to send on the UDP socket.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next packet to write to the TUN device: a decrypted, filter-admitted
    /// IP packet, or the ICMP answer to a packet too big for the tunnel.
    pub fn poll_tun_packet(&mut self) -> Option<Vec<u8>> {
        self.tun_packets.pop_front()
    }

    /// Takes back the buffer of a drained [`Transmit`] or TUN packet, for
    /// reuse by the next output.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buffer);
        }
    }

    /// When [`Node::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.next_tick, self.wake, self.firewall.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Per-peer status for `weft status`, ordered by node id, as of the
    /// latest timer or control input.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|p| {
                let (last_handshake, tx, rx) = p
                    .tunn
                    .as_deref()
                    .map_or((None, 0, 0), |tunn| tunn.stats_at(self.last_now));
                let (path, endpoint, relay) = match route(p, &self.discovery, self.last_now) {
                    Some(Dst::Udp(endpoint)) => (Some(PathKind::Direct), Some(endpoint), None),
                    Some(Dst::Relay(relay)) => (Some(PathKind::Relay), None, Some(relay)),
                    None => (None, None, None),
                };
                PeerStatus {
                    id: p.peer.id,
                    name: p.peer.name.clone(),
                    addresses: p.peer.addresses.clone(),
                    identity: p.peer.identity.clone(),
                    endpoint,
                    path,
                    relay,
                    last_handshake,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect()
    }

    /// Inbound verdicts by the policy rule that decided them, by line.
    pub fn rule_verdicts(&self) -> Vec<RuleVerdicts> {
        self.rule_stats.snapshot()
    }

    /// The oldest flow report the shell has not taken yet: flows that
    /// ended, interim reports of long-lived ones, and denial summaries
    /// ([`crate::filter::FlowLog`]). Drain it after every input, as the
    /// other outputs; what is not drained in time is dropped and counted.
    pub fn poll_flow_report(&mut self) -> Option<filter::FlowReport> {
        self.firewall.poll_report()
    }

    /// The flow log's counters.
    pub fn flow_log_stats(&self) -> filter::FlowLogStats {
        self.firewall.log_stats()
    }

    /// The peer that holds overlay address `address`, and how it is
    /// reached now: for naming the far end of a flow report.
    pub fn peer_route(&self, address: IpAddr) -> Option<PeerRoute<'_>> {
        let id = self.by_address.get(&address)?;
        let tunnel = self.peers.get(id)?;
        let (path, relay) = match route(tunnel, &self.discovery, self.last_now) {
            Some(Dst::Udp(_)) => (Some(PathKind::Direct), None),
            Some(Dst::Relay(relay)) => (Some(PathKind::Relay), Some(relay)),
            None => (None, None),
        };
        Some(PeerRoute {
            peer: &tunnel.peer,
            path,
            relay,
        })
    }

    /// Packet counters.
    pub fn filter_stats(&self) -> FilterStats {
        FilterStats {
            flows: self.firewall.flows() as u64,
            ..self.stats
        }
    }

    /// Finds the peer a datagram is for, and whether a successful
    /// decapsulation proves it came from that peer (cookie replies do not).
    /// Handshake initiations are identified by the sender's static key, the
    /// rest by the session index the peer's tunnel was created with.
    fn route_datagram(
        &mut self,
        source: Source<'_>,
        datagram: &[u8],
        now: Instant,
    ) -> Option<(NodeId, Slot, bool)> {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(packet) => packet,
            Err(error) => {
                self.stats.dropped_invalid_datagram += 1;
                tracing::trace!(?source, ?error, "dropping datagram that is not WireGuard");
                return None;
            }
        };
        if matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        ) {
            match self
                .handshake_gate
                .verify_packet_at(source.ip(), datagram, &mut self.buf, now)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    if let Source::Udp(from) = source {
                        self.transmits.push_back(Transmit {
                            dst: from,
                            payload: cookie.to_vec(),
                        });
                    }
                    return None;
                }
                Err(_) => {
                    self.stats.dropped_invalid_datagram += 1;
                    tracing::trace!(?source, "dropping handshake with a bad mac1 or under load");
                    return None;
                }
            }
        }
        let is_data = matches!(packet, Packet::PacketData(_));
        let (route, authenticates) = match packet {
            Packet::HandshakeInit(init) => {
                let Ok(half) = parse_handshake_anon(
                    &self.maker.static_private,
                    &self.maker.static_public,
                    &init,
                ) else {
                    self.stats.dropped_invalid_datagram += 1;
                    tracing::trace!(?source, "dropping undecryptable handshake initiation");
                    return None;
                };
                let key = PublicKey::from_bytes(half.peer_static_public);
                (self.by_key.get(&key).map(|id| (*id, Slot::Current)), true)
            }
            Packet::HandshakeResponse(response) => (self.session(response.receiver_idx), true),
            Packet::PacketCookieReply(cookie) => (self.session(cookie.receiver_idx), false),
            Packet::PacketData(data) => (self.session(data.receiver_idx), true),
        };
        let Some((id, slot)) = route else {
            self.stats.dropped_unknown_peer += 1;
            tracing::trace!(
                ?source,
                "dropping datagram from a key or session not in the netmap"
            );
            if is_data {
                self.nudge_stale_sender(source, now);
            }
            return None;
        };
        Some((id, slot, authenticates))
    }

    /// Data for a session this node does not have comes from a peer that
    /// still holds a session from before this node restarted. WireGuard leaves
    /// that to the sender's rekey timer (about 15 s of silence); offering the
    /// peer at that endpoint a fresh handshake restores the tunnel in one
    /// round trip. The datagram itself proves nothing, so this only ever sends
    /// a handshake initiation, at most once per [`STALE_SESSION_NUDGE`] per peer.
    fn nudge_stale_sender(&mut self, source: Source<'_>, now: Instant) {
        let peer = match source {
            Source::Udp(from) => self
                .peers
                .values_mut()
                .find(|p| p.paths.endpoint == Some(from)),
            Source::Relay { key, .. } => {
                self.by_key.get(&key).and_then(|id| self.peers.get_mut(id))
            }
        };
        let Some(peer) = peer else {
            return;
        };
        if peer
            .last_nudge
            .is_some_and(|at| now.saturating_duration_since(at) < STALE_SESSION_NUDGE)
        {
            return;
        }
        peer.last_nudge = Some(now);
        let key = peer.key();
        if let TunnResult::WriteToNetwork(init) = peer
            .tunn(&mut self.maker, now)
            .format_handshake_initiation_at(&mut self.buf, false, now)
        {
            push(
                &mut self.transmits,
                &mut self.relay_transmits,
                source.reply(),
                key,
                init.to_vec(),
            );
        }
    }

    fn session(&self, receiver_idx: u32) -> Option<(NodeId, Slot)> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
    }

    fn upsert_peer(&mut self, peer: &Peer, now: Instant) {
        if peer.node_key.as_bytes() == self.maker.static_public.as_bytes() {
            tracing::warn!(peer = %peer.id, "ignoring a peer that has this node's own key");
            return;
        }
        if let Some(existing) = self.peers.get_mut(&peer.id) {
            let gone: Vec<IpAddr> = existing
                .peer
                .addresses
                .iter()
                .filter(|a| !peer.addresses.contains(a))
                .copied()
                .collect();
            if !gone.is_empty() {
                self.firewall.forget_addresses(&gone);
            }
            if existing.key() == peer.node_key {
                let reachable_anew = existing.peer.home_relay != peer.home_relay
                    || existing.peer.endpoints != peer.endpoints;
                existing.update(peer.clone(), now);
                // A handshake that went nowhere goes again to where the peer is now.
                if reachable_anew && !existing.has_session() && existing.paths.active(now) {
                    self.handshake_on_new_path(peer.id, now);
                }
                return;
            }
            tracing::debug!(peer = %peer.id, key = %peer.node_key.short(), "peer key changed; new session");
        } else {
            tracing::debug!(peer = %peer.id, name = %peer.name, key = %peer.node_key.short(), "peer added");
        }
        self.replace_tunnel(peer.clone(), now);
    }

    /// Gives `peer` a new tunnel for the current key pair. Its old tunnel,
    /// if it has a session, carries traffic until the new one has its own,
    /// which starts its handshake at once rather than on the next packet.
    fn replace_tunnel(&mut self, peer: Peer, now: Instant) {
        let index = self.allocate_index();
        let id = peer.id;
        let mut tunnel = PeerTunnel::new(peer, index);
        if let Some(old) = self.peers.remove(&id) {
            tunnel.succeed(old, now);
        }
        if let (Some(dst), Some(_)) = (route(&tunnel, &self.discovery, now), &tunnel.retiring) {
            if let TunnResult::WriteToNetwork(init) = tunnel
                .tunn(&mut self.maker, now)
                .format_handshake_initiation_at(&mut self.buf, false, now)
            {
                push(
                    &mut self.transmits,
                    &mut self.relay_transmits,
                    dst,
                    tunnel.key(),
                    init.to_vec(),
                );
            }
        }
        self.peers.insert(id, tunnel);
    }

    fn remove_peer(&mut self, id: NodeId) {
        if let Some(gone) = self.peers.remove(&id) {
            tracing::debug!(peer = %id, name = %gone.peer.name, "peer removed; tunnel cut");
            self.firewall.forget_addresses(&gone.peer.addresses);
        }
    }

    /// A 24-bit session index no current peer uses. Indices count up and
    /// wrap only after 2^24 tunnels, so a stale datagram cannot reach a new peer.
    fn allocate_index(&mut self) -> u32 {
        loop {
            let index = self.next_index;
            self.next_index = (self.next_index + 1) & INDEX_MASK;
            if self.next_index == 0 {
                self.next_index = 1;
            }
            if !self
                .peers
                .values()
                .any(|p| p.indices().any(|(used, _)| used == index))
            {
                return index;
            }
        }
    }

    /// Rebuilds the lookup maps from the peers, and starts or stops the tick.
    /// A key or address claimed by two peers goes to the lower node id.
    fn reindex(&mut self, now: Instant) {
        self.by_key.clear();
        self.by_index.clear();
        self.by_address.clear();
        for (id, tunnel) in &self.peers {
            for (index, slot) in tunnel.indices() {
                self.by_index.insert(index, (*id, slot));
            }
            if let Some(other) = self.by_key.insert(tunnel.key(), *id) {
                tracing::warn!(peer = %id, %other, "two peers share a key; using the first");
                self.by_key.insert(tunnel.key(), other);
            }
            for address in &tunnel.peer.addresses {
                if let Some(other) = self.by_address.insert(*address, *id) {
                    tracing::warn!(peer = %id, %other, %address, "two peers share an address; using the first");
                    self.by_address.insert(*address, other);
                }
            }
        }
        self.schedule_tick(now);
    }

    /// Runs the tick while there are peers or relays (STUN), and only then.
    fn schedule_tick(&mut self, now: Instant) {
        if self.peers.is_empty() && !self.discovery.has_relays() {
            self.next_tick = None;
        } else if self.next_tick.is_none() {
            self.next_tick = Some(now + TICK);
        }
    }

    /// A path appeared for `peer` while its handshake waits on one that did
    /// not answer: send it again there, at once from the side with the
    /// lower key and a little later from the other. Two initiations crossing
    /// each other would each replace the other's handshake, again and again.
    fn handshake_on_new_path(&mut self, peer: NodeId, now: Instant) {
        let Some(tunnel) = self.peers.get_mut(&peer) else {
            return;
        };
        if tunnel.handshake_due.is_some() {
            return;
        }
        if self.maker.static_public.as_bytes() < tunnel.peer.node_key.as_bytes() {
            self.resend_handshake(peer, now);
        } else {
            tunnel.handshake_due = Some(now + HANDSHAKE_DEFER);
        }
    }

    /// Sends `peer` a fresh handshake initiation over its current path.
    fn resend_handshake(&mut self, peer: NodeId, now: Instant) {
        let Some(tunnel) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(dst) = route(tunnel, &self.discovery, now) else {
            return;
        };
        if let TunnResult::WriteToNetwork(init) = tunnel
            .tunn(&mut self.maker, now)
            .format_handshake_initiation_at(&mut self.buf, true, now)
        {
            tracing::trace!(%peer, ?dst, "handshake sent again on a new path");
            push(
                &mut self.transmits,
                &mut self.relay_transmits,
                dst,
                tunnel.peer.node_key,
                init.to_vec(),
            );
        }
    }

    /// Reports the advertisement when it differs from the last one reported.
    fn advertise_changes(&mut self) {
        let advertisement = self.discovery.advertisement();
        if self.advertised.as_ref() != Some(&advertisement) {
            tracing::debug!(?advertisement, "advertisement changed");
            self.advertised = Some(advertisement.clone());
            self.events.push_back(Event::Advertise(advertisement));
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &PublicKey::from(self.maker.static_public))
            .field("peers", &self.peers)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Where a datagram for a peer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dst {
    Udp(SocketAddr),
    Relay(String),
}

/// Where a datagram came from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Udp(SocketAddr),
    /// Through relay `relay`, from the node the relay authenticated as `key`.
    Relay {
        relay: &'a str,
        key: PublicKey,
    },
}

impl Source<'_> {
    /// The source address WireGuard's cookie mechanism keys on.
    fn ip(self) -> Option<IpAddr> {
        match self {
            Self::Udp(from) => Some(from.ip()),
            Self::Relay { .. } => None,
        }
    }

    /// Where an answer goes: back the way the datagram came.
    fn reply(self) -> Dst {
        match self {
            Self::Udp(from) => Dst::Udp(from),
            Self::Relay { relay, .. } => Dst::Relay(relay.to_owned()),
        }
    }

    /// An authenticated WireGuard message came this way.
    #[inline]
    fn heard(self, paths: &mut paths::Paths, now: Instant) {
        match self {
            Self::Udp(from) => paths.heard_from(from, now),
            Self::Relay { relay, .. } => {
                if paths.relay_from.as_deref() != Some(relay) {
                    paths.relay_from = Some(relay.to_owned());
                }
            }
        }
    }
}

/// How to reach `peer` now: its trusted direct path, else a connected
/// relay, else the best guess.
#[inline]
fn route(peer: &PeerTunnel, discovery: &Discovery, now: Instant) -> Option<Dst> {
    if let Some(endpoint) = peer.paths.trusted(now) {
        return Some(Dst::Udp(endpoint));
    }
    if let Some(relay) = discovery.relay_for(
        peer.peer.home_relay.as_deref(),
        peer.paths.relay_from.as_deref(),
    ) {
        return Some(Dst::Relay(relay.to_owned()));
    }
    peer.paths.endpoint.map(Dst::Udp)
}

fn push(
    transmits: &mut VecDeque<Transmit>,
    relay_transmits: &mut VecDeque<RelayTransmit>,
    dst: Dst,
    to: PublicKey,
    payload: Vec<u8>,
) {
    match dst {
        Dst::Udp(dst) => transmits.push_back(Transmit { dst, payload }),
        Dst::Relay(relay) => relay_transmits.push_back(RelayTransmit { relay, to, payload }),
    }
}
