//! The node's data plane as a sans-IO state machine: one WireGuard session
//! per peer over a single UDP socket, and the stateful inbound filter.

mod peer;
#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use serde::{Deserialize, Serialize};
use weft_proto::{Identity, NetMap, NetMapDelta, NodeId, Peer, PrivateKey, PublicKey};

use crate::filter::{self, Firewall, Verdict};
use peer::{PeerTunnel, Slot};

/// A weft node's data plane: WireGuard sessions to the netmap's peers and
/// the inbound packet filter. It does no IO and reads no clock of its own.
///
/// # Driving it
///
/// Inputs:
/// - [`Node::set_netmap`], [`Node::apply_delta`], [`Node::clear`] when the
///   coordinator's view changes;
/// - [`Node::handle_tun_packet`] for every IP packet read from the TUN device;
/// - [`Node::handle_udp`] for every datagram received on the WireGuard socket;
/// - [`Node::handle_timeout`] when the instant [`Node::poll_timeout`] named
///   has passed.
///
/// After any input, drain the outputs until they return `None`:
/// [`Node::poll_transmit`] (datagrams for the UDP socket) and
/// [`Node::poll_tun_packet`] (packets for the TUN device). Then ask
/// [`Node::poll_timeout`] and wait for IO or that instant, whichever comes
/// first. Every input takes `now`, which must not go backwards.
///
/// Feeding many inputs before draining is fine and cheaper (the shell reads
/// whole batches per wakeup). Hand the buffers of drained outputs back with
/// [`Node::recycle`] once written: the node reuses them, so a steady stream
/// of packets allocates nothing.
///
/// # Clocks
///
/// The node's own timers (its 250 ms WireGuard tick and flow expiry) run on
/// the `now` passed in. boringtun's `Tunn` reads the system clock for its
/// WireGuard timers (rekeying, retransmission, keepalives, handshake age in
/// [`PeerStatus`]); that is a limitation of boringtun 0.7, so a simulation
/// that advances `now` faster than real time does not age sessions.
///
/// # Admission
///
/// Only peers in the netmap can open a tunnel: a handshake from any other key
/// is dropped. A peer may only send packets from its own overlay addresses,
/// and those packets then pass the filter ([`crate::filter`]).
///
/// # Key changes
///
/// When this node's key rotates ([`Node::rotate_key`]) or a peer's key
/// changes in the netmap, the peer gets a new tunnel and the old one keeps
/// carrying traffic until the new one's handshake completes (then for a few
/// seconds more, for packets already in flight), so a rotation loses no
/// packets whichever side learns of it first.
pub struct Node {
    static_private: x25519_dalek::StaticSecret,
    static_public: x25519_dalek::PublicKey,
    /// Checks mac1 and applies the node-wide handshake rate limit (cookie
    /// replies under load) before the Diffie-Hellman that identifies a sender.
    handshake_gate: RateLimiter,
    /// Shared by every `Tunn`; never under load, since the gate already decided.
    tunn_limiter: Arc<RateLimiter>,
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
    /// Scratch space for boringtun's output, large enough for any IP packet plus overhead.
    buf: Box<[u8]>,
}

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
    /// Where its WireGuard packets go now.
    pub endpoint: Option<SocketAddr>,
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
    /// Flows currently tracked.
    pub flows: u64,
}

/// The interval of the WireGuard timer tick, as in boringtun's own device.
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
/// Session indices are 24 bits; boringtun uses the low 8 for rekeys.
const INDEX_MASK: u32 = 0x00ff_ffff;

impl Node {
    /// A node with no peers and a deny-all filter. `private_key` is this
    /// node's WireGuard key. Nothing is scheduled until peers arrive, so
    /// `_now` is not needed yet.
    pub fn new(private_key: PrivateKey, _now: Instant) -> Self {
        let static_private = private_key.to_x25519();
        let static_public = x25519_dalek::PublicKey::from(&static_private);
        Self {
            handshake_gate: RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT),
            tunn_limiter: Arc::new(RateLimiter::new(&static_public, u64::MAX)),
            static_private,
            static_public,
            peers: BTreeMap::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            by_address: HashMap::new(),
            // A random start, so a restarted node's indices do not meet the
            // datagrams of its previous run's sessions.
            next_index: (rand::random::<u32>() & INDEX_MASK).max(1),
            firewall: Firewall::default(),
            transmits: VecDeque::new(),
            tun_packets: VecDeque::new(),
            spare: Vec::new(),
            next_tick: None,
            stats: FilterStats::default(),
            buf: vec![0; MAX_PACKET + WIREGUARD_OVERHEAD].into_boxed_slice(),
        }
    }

    /// Installs a complete netmap (first sync). Peers no longer present are
    /// dropped with their sessions; peers whose key is unchanged keep theirs.
    pub fn set_netmap(&mut self, netmap: &NetMap, now: Instant) {
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
        self.reindex(now);
    }

    /// Applies a delta. Removed peers' sessions are dropped at once (their
    /// tunnels are cut); a peer both upserted and removed is removed. The
    /// node's own details (`self_node`) do not concern the data plane.
    pub fn apply_delta(&mut self, delta: &NetMapDelta, now: Instant) {
        for peer in &delta.upsert_peers {
            self.upsert_peer(peer, now);
        }
        for id in &delta.remove_peers {
            self.remove_peer(*id);
        }
        if let Some(filter) = &delta.filter {
            self.firewall.set_filter(filter);
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
        if static_public == self.static_public {
            return;
        }
        self.handshake_gate = RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT);
        self.tunn_limiter = Arc::new(RateLimiter::new(&static_public, u64::MAX));
        self.static_private = static_private;
        self.static_public = static_public;
        let peers: Vec<Peer> = self.peers.values().map(|p| p.peer.clone()).collect();
        for peer in peers {
            self.replace_tunnel(peer, now);
        }
        self.reindex(now);
        tracing::info!(key = %PublicKey::from(self.static_public).short(), "node key rotated");
    }

    /// This node's WireGuard public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.static_public)
    }

    /// Forgets every peer and the filter (on `weft down`, or when the node is deleted).
    pub fn clear(&mut self) {
        self.peers.clear();
        self.by_key.clear();
        self.by_index.clear();
        self.by_address.clear();
        self.firewall.clear();
        self.transmits.clear();
        self.tun_packets.clear();
        self.next_tick = None;
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
        let Some(peer) = self
            .by_address
            .get(&headers.dst)
            .and_then(|id| self.peers.get_mut(id))
        else {
            self.stats.dropped_no_peer += 1;
            tracing::trace!(dst = %headers.dst, "dropping packet: no peer has the address");
            return;
        };
        let Some(endpoint) = peer.endpoint else {
            self.stats.dropped_no_endpoint += 1;
            tracing::trace!(peer = %peer.peer.id, "dropping packet: peer has no endpoint yet");
            return;
        };
        self.firewall.outbound(&headers, now);
        // Encrypted straight into the buffer that goes to the socket.
        let mut out = self.spare.pop().unwrap_or_default();
        out.resize(
            (packet.len() + WIREGUARD_OVERHEAD).max(HANDSHAKE_INIT_LEN),
            0,
        );
        let written = match peer.sending_tunn().encapsulate(packet, &mut out) {
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
                self.transmits.push_back(Transmit {
                    dst: endpoint,
                    payload: out,
                });
            }
            None => self.recycle(out),
        }
    }

    /// A datagram received on the WireGuard UDP socket.
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Some((id, slot, authenticates)) = self.route_datagram(from, datagram, now) else {
            return;
        };
        let Self {
            peers,
            firewall,
            transmits,
            tun_packets,
            spare,
            stats,
            buf,
            ..
        } = self;
        let Some(peer) = peers.get_mut(&id) else {
            return;
        };
        // Field by field, so the endpoint stays assignable below.
        let tunn = match (slot, &mut peer.retiring) {
            (Slot::Current, _) => &mut peer.tunn,
            (Slot::Retiring, Some(retiring)) => &mut retiring.tunn,
            (Slot::Retiring, None) => return,
        };
        let (packet, src) = match tunn.decapsulate(Some(from.ip()), datagram, buf) {
            TunnResult::Done => {
                if authenticates {
                    peer.endpoint = Some(from);
                }
                return;
            }
            TunnResult::Err(error) => {
                stats.dropped_invalid_datagram += 1;
                tracing::trace!(peer = %id, %from, ?error, "dropping datagram");
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                peer.endpoint = Some(from);
                transmits.push_back(Transmit {
                    dst: from,
                    payload: reply.to_vec(),
                });
                // boringtun's contract: flush what queued up behind the handshake.
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], buf) {
                    transmits.push_back(Transmit {
                        dst: from,
                        payload: queued.to_vec(),
                    });
                }
                return;
            }
            TunnResult::WriteToTunnelV4(packet, src) => (packet, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(packet, src) => (packet, IpAddr::V6(src)),
        };
        peer.endpoint = Some(from);
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
        match firewall.inbound(&headers, now) {
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

    /// Drives timers: boringtun's `update_timers` for every peer every 250 ms,
    /// and flow expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_tick.is_some_and(|tick| tick <= now) {
            for peer in self.peers.values_mut() {
                match peer.tunn.update_timers(&mut self.buf) {
                    TunnResult::WriteToNetwork(datagram) => match peer.endpoint {
                        Some(dst) => self.transmits.push_back(Transmit {
                            dst,
                            payload: datagram.to_vec(),
                        }),
                        None => {
                            tracing::trace!(peer = %peer.peer.id, "no endpoint for timer message")
                        }
                    },
                    TunnResult::Err(error) => {
                        tracing::trace!(peer = %peer.peer.id, ?error, "WireGuard timer");
                    }
                    TunnResult::Done
                    | TunnResult::WriteToTunnelV4(..)
                    | TunnResult::WriteToTunnelV6(..) => {}
                }
            }
            for peer in self.peers.values_mut() {
                if let Some(index) = peer.expire_retiring(now) {
                    tracing::debug!(peer = %peer.peer.id, "the session of the replaced key ended");
                    self.by_index.remove(&index);
                }
            }
            self.handshake_gate.reset_count();
            self.next_tick = Some(now + TICK);
        }
        self.firewall.handle_timeout(now);
    }

    /// Next datagram to send on the UDP socket.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next decrypted, filter-admitted IP packet to write to the TUN device.
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
        let tick = self.next_tick.filter(|_| !self.peers.is_empty());
        match (tick, self.firewall.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Per-peer status for `weft status`, ordered by node id.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|p| {
                let (last_handshake, tx, rx, _, _) = p.tunn.stats();
                PeerStatus {
                    id: p.peer.id,
                    name: p.peer.name.clone(),
                    addresses: p.peer.addresses.clone(),
                    identity: p.peer.identity.clone(),
                    endpoint: p.endpoint,
                    last_handshake,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect()
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
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Option<(NodeId, Slot, bool)> {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(packet) => packet,
            Err(error) => {
                self.stats.dropped_invalid_datagram += 1;
                tracing::trace!(%from, ?error, "dropping datagram that is not WireGuard");
                return None;
            }
        };
        if matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        ) {
            match self
                .handshake_gate
                .verify_packet(Some(from.ip()), datagram, &mut self.buf)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: cookie.to_vec(),
                    });
                    return None;
                }
                Err(_) => {
                    self.stats.dropped_invalid_datagram += 1;
                    tracing::trace!(%from, "dropping handshake with a bad mac1");
                    return None;
                }
            }
        }
        let is_data = matches!(packet, Packet::PacketData(_));
        let (route, authenticates) = match packet {
            Packet::HandshakeInit(init) => {
                let Ok(half) =
                    parse_handshake_anon(&self.static_private, &self.static_public, &init)
                else {
                    self.stats.dropped_invalid_datagram += 1;
                    tracing::trace!(%from, "dropping undecryptable handshake initiation");
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
            tracing::trace!(%from, "dropping datagram from a key or session not in the netmap");
            if is_data {
                self.nudge_stale_sender(from, now);
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
    fn nudge_stale_sender(&mut self, from: SocketAddr, now: Instant) {
        let Some(peer) = self.peers.values_mut().find(|p| p.endpoint == Some(from)) else {
            return;
        };
        if peer
            .last_nudge
            .is_some_and(|at| now.saturating_duration_since(at) < STALE_SESSION_NUDGE)
        {
            return;
        }
        peer.last_nudge = Some(now);
        if let TunnResult::WriteToNetwork(init) =
            peer.tunn.format_handshake_initiation(&mut self.buf, false)
        {
            self.transmits.push_back(Transmit {
                dst: from,
                payload: init.to_vec(),
            });
        }
    }

    fn session(&self, receiver_idx: u32) -> Option<(NodeId, Slot)> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
    }

    fn upsert_peer(&mut self, peer: &Peer, now: Instant) {
        if peer.node_key.as_bytes() == self.static_public.as_bytes() {
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
                existing.update(peer.clone());
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
        let mut tunnel = PeerTunnel::new(&self.static_private, peer, index, &self.tunn_limiter);
        if let Some(old) = self.peers.remove(&id) {
            tunnel.succeed(old, now);
        }
        if let (Some(dst), Some(_)) = (tunnel.endpoint, &tunnel.retiring) {
            if let TunnResult::WriteToNetwork(init) = tunnel
                .tunn
                .format_handshake_initiation(&mut self.buf, false)
            {
                self.transmits.push_back(Transmit {
                    dst,
                    payload: init.to_vec(),
                });
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
        if self.peers.is_empty() {
            self.next_tick = None;
        } else if self.next_tick.is_none() {
            self.next_tick = Some(now + TICK);
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &PublicKey::from(self.static_public))
            .field("peers", &self.peers)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}
