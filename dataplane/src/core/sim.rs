//! A deterministic in-memory network of [`Node`]s with a virtual clock.
//!
//! Datagrams a node transmits are delivered to the `handle_udp` of the node
//! owning the destination address, from the sender's current address, until
//! no node has anything left to send. Packets nodes hand to their TUN device
//! are collected per node.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use weft_proto::{
    DefaultAction, FilterRule, FlowVerdict, PacketFilter, PortRange, Protocol, RuleAction, SelfNode,
};

use super::*;
use crate::filter::test_packets::{self, ACK, SYN};

struct SimNode {
    id: NodeId,
    name: &'static str,
    key: PrivateKey,
    node: Node,
    underlay: SocketAddr,
    v4: IpAddr,
    v6: IpAddr,
    /// Packets written to this node's TUN device.
    tun: Vec<Vec<u8>>,
}

impl SimNode {
    fn peer(&self) -> Peer {
        Peer {
            id: self.id,
            name: self.name.to_owned(),
            node_key: self.key.public_key(),
            addresses: vec![self.v4, self.v6],
            endpoints: vec![self.underlay],
            home_relay: None,
            identity: Identity {
                user: Some(format!("{}@example.com", self.name)),
                tags: Vec::new(),
                ..Default::default()
            },
        }
    }

    fn self_node(&self) -> SelfNode {
        let (IpAddr::V4(ipv4), IpAddr::V6(ipv6)) = (self.v4, self.v6) else {
            unreachable!("sim addresses are one of each family")
        };
        SelfNode {
            id: self.id,
            name: self.name.to_owned(),
            ipv4,
            ipv6,
            identity: Identity::default(),
            key_expiry: None,
        }
    }
}

/// A datagram that crossed the simulated network.
#[derive(Debug, Clone)]
struct Sent {
    from: usize,
    to: Option<usize>,
    payload: Vec<u8>,
    /// When, on the virtual clock.
    at: Instant,
}

struct Sim {
    nodes: Vec<SimNode>,
    /// When the simulation started, on the virtual clock.
    start: Instant,
    now: Instant,
    sent: Vec<Sent>,
    /// Every datagram sent, disco included: sender, destination, bytes.
    wire: Vec<(usize, SocketAddr, Vec<u8>)>,
    /// Datagrams are lost rather than delivered while set.
    cut: bool,
    /// Seeds the nodes' keys and random generators.
    seed: u64,
}

/// The wall-clock time, since the Unix epoch, when every simulation starts.
const WALL_START: Duration = Duration::from_secs(1_700_000_000);

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

impl Sim {
    /// Three nodes, none knowing any other yet.
    fn new() -> Self {
        Self::seeded(1)
    }

    /// Three nodes whose keys and random numbers all derive from `seed`.
    fn seeded(seed: u64) -> Self {
        let now = crate::test_clock();
        let mut keys = StdRng::seed_from_u64(seed);
        let nodes = ["alpha", "bravo", "charlie"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let n = u8::try_from(i + 1).unwrap();
                let key = PrivateKey::from_bytes(keys.gen());
                SimNode {
                    id: NodeId(u64::from(n)),
                    name,
                    node: Node::new(
                        key.clone(),
                        now,
                        SystemTime::UNIX_EPOCH + WALL_START,
                        keys.next_u64(),
                    ),
                    key,
                    underlay: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 41641),
                    v4: IpAddr::V4(Ipv4Addr::new(100, 64, 0, n)),
                    v6: IpAddr::V6(Ipv6Addr::new(
                        0xfd7a,
                        0x115c,
                        0xa1e0,
                        0,
                        0,
                        0,
                        0,
                        u16::from(n),
                    )),
                    tun: Vec::new(),
                }
            })
            .collect();
        Self {
            nodes,
            start: now,
            now,
            sent: Vec::new(),
            wire: Vec::new(),
            cut: false,
            seed,
        }
    }

    /// A fresh node for `key` as it would start now (a restart or a
    /// reinstall).
    fn fresh_node(&mut self, key: PrivateKey) -> Node {
        self.seed = self.seed.wrapping_add(1);
        let wall = SystemTime::UNIX_EPOCH + WALL_START + (self.now - self.start);
        Node::new(key, self.now, wall, self.seed)
    }

    /// Gives node `me` a netmap with `peers` and `filter`.
    fn set_netmap(&mut self, me: usize, peers: &[usize], filter: Vec<FilterRule>) {
        let netmap = NetMap {
            revision: 1,
            self_node: self.nodes[me].self_node(),
            peers: peers.iter().map(|&p| self.nodes[p].peer()).collect(),
            filter: PacketFilter {
                rules: filter,
                default: DefaultAction::Deny,
            },
            capabilities: Vec::new(),
        };
        let now = self.now;
        self.nodes[me].node.set_netmap(&netmap, now);
    }

    fn apply_delta(&mut self, me: usize, delta: NetMapDelta) {
        let now = self.now;
        self.nodes[me].node.apply_delta(&delta, now);
    }

    /// `node` reads `packet` from its TUN device; the network then settles.
    fn send(&mut self, node: usize, packet: &[u8]) {
        let now = self.now;
        self.nodes[node].node.handle_tun_packet(packet, now);
        self.settle();
    }

    /// Delivers datagrams until no node has anything to send.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for from in 0..self.nodes.len() {
                while let Some(transmit) = self.nodes[from].node.poll_transmit() {
                    moved = true;
                    let source = self.nodes[from].underlay;
                    self.wire
                        .push((from, transmit.dst, transmit.payload.clone()));
                    let to = self.nodes.iter().position(|n| n.underlay == transmit.dst);
                    if let (Some(to), false) = (to, self.cut) {
                        let now = self.now;
                        self.nodes[to]
                            .node
                            .handle_udp(source, &transmit.payload, now);
                    }
                    // Only WireGuard: these tests count its messages; path
                    // probing has its own tests (`sim_nat`).
                    if !disco::is_disco(&transmit.payload) {
                        self.sent.push(Sent {
                            from,
                            to,
                            payload: transmit.payload,
                            at: self.now,
                        });
                    }
                }
                while let Some(packet) = self.nodes[from].node.poll_tun_packet() {
                    self.nodes[from].tun.push(packet);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the simulated network did not settle");
    }

    /// Advances the virtual clock by `by`, firing every timeout on the way.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = self
                .nodes
                .iter()
                .filter_map(|n| n.node.poll_timeout())
                .filter(|t| *t <= end)
                .min();
            let Some(next) = next else { break };
            self.now = self.now.max(next);
            for i in 0..self.nodes.len() {
                if self.nodes[i]
                    .node
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    let now = self.now;
                    self.nodes[i].node.handle_timeout(now);
                }
            }
            self.settle();
        }
        self.now = end;
    }

    fn take_tun(&mut self, node: usize) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.nodes[node].tun)
    }

    fn stats(&self, node: usize) -> FilterStats {
        self.nodes[node].node.filter_stats()
    }

    fn ping(&self, from: usize, to: usize, id: u16) -> Vec<u8> {
        test_packets::echo(self.nodes[from].v4, self.nodes[to].v4, false, id, 1)
    }

    fn pong(&self, from: usize, to: usize, id: u16) -> Vec<u8> {
        test_packets::echo(self.nodes[from].v4, self.nodes[to].v4, true, id, 1)
    }

    /// A rule letting `from` reach `to` with `protocols` on `ports`.
    fn allow(
        &self,
        from: usize,
        to: usize,
        protocols: &[Protocol],
        ports: &[PortRange],
    ) -> FilterRule {
        FilterRule {
            src: vec![
                IpNet::from(self.nodes[from].v4),
                IpNet::from(self.nodes[from].v6),
            ],
            dst: vec![
                IpNet::from(self.nodes[to].v4),
                IpNet::from(self.nodes[to].v6),
            ],
            ports: ports.to_vec(),
            protocols: protocols.to_vec(),
            action: RuleAction::Accept,
            policy_line: 7,
            rule_id: weft_proto::RuleId::default(),
        }
    }

    /// A and B know each other; B lets A ping it, A lets nobody in.
    fn a_may_ping_b() -> Self {
        let mut sim = Self::new();
        let rule = sim.allow(A, B, &[Protocol::Icmp], &[]);
        sim.set_netmap(A, &[B], vec![]);
        sim.set_netmap(B, &[A], vec![rule]);
        sim
    }

    /// [`Sim::a_may_ping_b`] after one ping, so the session is up.
    fn established() -> Self {
        let mut sim = Self::a_may_ping_b();
        let ping = sim.ping(A, B, 1);
        sim.send(A, &ping);
        assert_eq!(sim.take_tun(B), vec![ping]);
        sim
    }
}

impl Sim {
    /// Node `me` learns `of`'s current key from the coordinator.
    fn learn_key(&mut self, me: usize, of: usize) {
        let peer = self.nodes[of].peer();
        self.apply_delta(
            me,
            NetMapDelta {
                upsert_peers: vec![peer],
                ..delta()
            },
        );
        self.settle();
    }

    /// Node `me` switches to a fresh key.
    fn rotate(&mut self, me: usize) {
        let key = PrivateKey::generate();
        let now = self.now;
        self.nodes[me].node.rotate_key(key.clone(), now);
        self.nodes[me].key = key;
        self.settle();
    }

    /// `count` pings from A to B and their replies, 100 ms apart, as
    /// `ping -i 0.1` sends them; every one must arrive.
    fn exchange(&mut self, ids: std::ops::Range<u16>) {
        for id in ids {
            self.round_trip(id);
            self.advance(Duration::from_millis(100));
        }
    }

    /// A pings B and B answers; both must arrive.
    fn round_trip(&mut self, id: u16) {
        let ping = self.ping(A, B, id);
        self.send(A, &ping);
        assert_eq!(self.take_tun(B), vec![ping], "ping {id} lost");
        let pong = self.pong(B, A, id);
        self.send(B, &pong);
        assert_eq!(self.take_tun(A), vec![pong], "reply {id} lost");
    }

    /// WireGuard message types A and B sent since `before`.
    fn types_since(&self, before: usize) -> Vec<(usize, u8)> {
        self.sent[before..]
            .iter()
            .map(|s| (s.from, message_type(&s.payload)))
            .collect()
    }
}

fn delta() -> NetMapDelta {
    NetMapDelta {
        revision: 2,
        upsert_peers: Vec::new(),
        remove_peers: Vec::new(),
        filter: None,
        self_node: None,
        capabilities: None,
    }
}

/// The WireGuard message type of a datagram.
fn message_type(datagram: &[u8]) -> u8 {
    datagram[0]
}

#[test]
fn a_ping_arrives_after_the_handshake_and_its_reply_returns() {
    let mut sim = Sim::a_may_ping_b();
    let ping = sim.ping(A, B, 1);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping.clone()]);
    let types: Vec<u8> = sim.sent.iter().map(|s| message_type(&s.payload)).collect();
    assert_eq!(types[..2], [1, 2], "a handshake comes first");

    let pong = sim.pong(B, A, 1);
    sim.send(B, &pong);
    assert_eq!(sim.take_tun(A), vec![pong]);
    assert_eq!(sim.stats(A).accepted, 1);
    assert_eq!(sim.stats(B).accepted, 1);
    let (a, b) = (sim.stats(A), sim.stats(B));
    let direct = |t: PathTraffic| (t.direct_packets, t.direct_bytes, t.relay_packets);
    assert_eq!(direct(a.sent), (1, ping.len() as u64, 0));
    assert_eq!(direct(b.received), (1, ping.len() as u64, 0));
    assert_eq!((b.sent.direct_packets, b.sent.relay_packets), (1, 0));

    let status = sim.nodes[A].node.peers();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].id, sim.nodes[B].id);
    assert_eq!(status[0].endpoint, Some(sim.nodes[B].underlay));
    assert!(status[0].last_handshake.is_some());
    assert_eq!(status[0].tx_bytes, ping.len() as u64);
}

#[test]
fn recycled_buffers_carry_the_next_packets() {
    let mut sim = Sim::a_may_ping_b();
    let ping = sim.ping(A, B, 1);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);

    let now = sim.now;
    let ping = sim.ping(A, B, 2);
    sim.nodes[A].node.handle_tun_packet(&ping, now);
    let first = sim.nodes[A].node.poll_transmit().unwrap();
    let datagram = first.payload.clone();
    let reused = first.payload.as_ptr();
    sim.nodes[A].node.recycle(first.payload);
    let ping = sim.ping(A, B, 3);
    sim.nodes[A].node.handle_tun_packet(&ping, now);
    let second = sim.nodes[A].node.poll_transmit().unwrap();
    assert_eq!(
        second.payload.as_ptr(),
        reused,
        "the spare buffer is reused"
    );
    assert_eq!(second.payload.len(), datagram.len());
    assert_ne!(
        second.payload, datagram,
        "a fresh encryption, not the old bytes"
    );

    let source = sim.nodes[A].underlay;
    sim.nodes[B].node.handle_udp(source, &datagram, now);
    let packet = sim.nodes[B].node.poll_tun_packet().unwrap();
    assert_eq!(packet, sim.ping(A, B, 2));
    let reused = packet.as_ptr();
    sim.nodes[B].node.recycle(packet);
    sim.nodes[B].node.handle_udp(source, &second.payload, now);
    let packet = sim.nodes[B].node.poll_tun_packet().unwrap();
    assert_eq!(packet, ping);
    assert_eq!(packet.as_ptr(), reused, "inbound buffers are reused too");
    sim.nodes[B].node.recycle(packet);
    sim.nodes[B].node.handle_udp(source, &datagram, now);
    assert!(
        sim.nodes[B].node.poll_tun_packet().is_none(),
        "a replayed datagram is refused"
    );
}

#[test]
fn ipv6_works_too() {
    let mut sim = Sim::a_may_ping_b();
    let ping = test_packets::echo(sim.nodes[A].v6, sim.nodes[B].v6, false, 3, 1);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);
    let pong = test_packets::echo(sim.nodes[B].v6, sim.nodes[A].v6, true, 3, 1);
    sim.send(B, &pong);
    assert_eq!(sim.take_tun(A), vec![pong]);
}

#[test]
fn a_new_flow_from_the_side_without_permission_is_dropped() {
    let mut sim = Sim::established();
    let ping = sim.ping(B, A, 9);
    sim.send(B, &ping);
    let syn = test_packets::tcp(sim.nodes[B].v4, 40000, sim.nodes[A].v4, 22, SYN);
    sim.send(B, &syn);
    assert!(sim.take_tun(A).is_empty());
    assert_eq!(sim.stats(A).dropped, 2);
    assert_eq!(sim.stats(A).accepted, 0);
}

#[test]
fn removing_a_peer_cuts_its_tunnel() {
    let mut sim = Sim::established();
    let b = sim.nodes[B].id;
    sim.apply_delta(
        A,
        NetMapDelta {
            remove_peers: vec![b],
            ..delta()
        },
    );
    assert!(sim.nodes[A].node.peers().is_empty());

    let ping = sim.ping(A, B, 2);
    sim.send(A, &ping);
    assert!(sim.take_tun(B).is_empty());
    assert_eq!(sim.stats(A).dropped_no_peer, 1);

    // B still holds its session, but A no longer accepts it.
    let pong = sim.pong(B, A, 1);
    sim.send(B, &pong);
    assert!(sim.take_tun(A).is_empty());
    assert_eq!(sim.stats(A).dropped_unknown_peer, 1);
}

#[test]
fn handshakes_from_keys_outside_the_netmap_are_dropped() {
    let mut sim = Sim::a_may_ping_b();
    // C knows A, but A does not know C.
    let rule = sim.allow(C, A, &[Protocol::Icmp], &[]);
    sim.set_netmap(A, &[B], vec![rule]);
    sim.set_netmap(C, &[A], vec![]);
    let ping = sim.ping(C, A, 1);
    sim.send(C, &ping);
    assert!(sim.take_tun(A).is_empty());
    assert_eq!(sim.stats(A).dropped_unknown_peer, 1);
    assert!(
        sim.sent.iter().all(|s| s.from != A),
        "A answered a stranger"
    );
    assert!(sim.nodes[C].node.peers()[0].last_handshake.is_none());
}

#[test]
fn a_peer_cannot_send_as_another_peer() {
    let mut sim = Sim::new();
    let from_c = sim.allow(C, A, &[Protocol::Icmp], &[]);
    let from_b = sim.allow(B, A, &[Protocol::Icmp], &[]);
    sim.set_netmap(A, &[B, C], vec![from_b, from_c]);
    sim.set_netmap(B, &[A], vec![]);
    sim.set_netmap(C, &[A], vec![]);

    let spoofed = test_packets::echo(sim.nodes[C].v4, sim.nodes[A].v4, false, 1, 1);
    sim.send(B, &spoofed);
    assert!(sim.take_tun(A).is_empty());
    assert_eq!(sim.stats(A).dropped_spoofed, 1);

    // The same packet from its real owner is admitted.
    sim.send(C, &spoofed);
    assert_eq!(sim.take_tun(A), vec![spoofed]);
}

#[test]
fn a_key_change_recreates_the_session() {
    let mut sim = Sim::established();
    let pong = sim.pong(B, A, 1);
    sim.send(B, &pong);
    assert_eq!(sim.take_tun(A), vec![pong]);
    let old_data = sim
        .sent
        .iter()
        .rev()
        .find(|s| s.from == B && message_type(&s.payload) == 4)
        .map(|s| s.payload.clone())
        .unwrap();

    // B is reinstalled with a fresh key.
    let key = PrivateKey::generate();
    sim.nodes[B].node = sim.fresh_node(key.clone());
    sim.nodes[B].key = key;
    let rule = sim.allow(A, B, &[Protocol::Icmp], &[]);
    sim.set_netmap(B, &[A], vec![rule]);

    // A's session belongs to the old key: the new B cannot read it.
    let ping = sim.ping(A, B, 2);
    sim.send(A, &ping);
    assert!(sim.take_tun(B).is_empty());
    let stats = sim.stats(B);
    // Unknown index, or (if the random indices collide) undecryptable.
    assert_eq!(
        stats.dropped_unknown_peer + stats.dropped_invalid_datagram,
        1
    );

    let before = sim.sent.len();
    sim.learn_key(A, B);
    assert_eq!(
        message_type(&sim.sent[before].payload),
        1,
        "a fresh handshake as soon as the key changes"
    );
    let ping = sim.ping(A, B, 3);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);

    // Once the new session has carried traffic for a while, datagrams of
    // the old session find no tunnel at A.
    sim.advance(Duration::from_secs(6));
    let now = sim.now;
    let from = sim.nodes[B].underlay;
    let dropped = sim.stats(A).dropped_unknown_peer;
    sim.nodes[A].node.handle_udp(from, &old_data, now);
    sim.settle();
    assert!(sim.take_tun(A).is_empty());
    assert_eq!(sim.stats(A).dropped_unknown_peer, dropped + 1);
}

#[test]
fn unrelated_updates_keep_the_session() {
    let mut sim = Sim::established();
    let mut b = sim.nodes[B].peer();
    b.name = "bravo-renamed".to_owned();
    sim.apply_delta(
        A,
        NetMapDelta {
            upsert_peers: vec![b],
            ..delta()
        },
    );
    let before = sim.sent.len();
    let ping = sim.ping(A, B, 2);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);
    let types: Vec<u8> = sim.sent[before..]
        .iter()
        .map(|s| message_type(&s.payload))
        .collect();
    assert_eq!(types, vec![4], "no new handshake");
    assert_eq!(sim.nodes[A].node.peers()[0].name, "bravo-renamed");
}

#[test]
fn removing_an_allow_cuts_the_flows_it_admitted() {
    let mut sim = Sim::new();
    let ssh = sim.allow(
        A,
        B,
        &[Protocol::Tcp],
        &[PortRange {
            first: 22,
            last: 22,
        }],
    );
    sim.set_netmap(A, &[B], vec![]);
    sim.set_netmap(B, &[A], vec![ssh]);
    let (a, b) = (sim.nodes[A].v4, sim.nodes[B].v4);
    let syn = test_packets::tcp(a, 40000, b, 22, SYN);
    sim.send(A, &syn);
    assert_eq!(sim.take_tun(B), vec![syn]);
    let syn_ack = test_packets::tcp(b, 22, a, 40000, SYN | ACK);
    sim.send(B, &syn_ack);
    assert_eq!(sim.take_tun(A), vec![syn_ack]);

    sim.apply_delta(
        B,
        NetMapDelta {
            filter: Some(PacketFilter::default()),
            ..delta()
        },
    );
    let data = test_packets::tcp(a, 40000, b, 22, ACK);
    sim.send(A, &data);
    assert!(sim.take_tun(B).is_empty());
    assert_eq!(sim.stats(B).dropped, 1);
}

#[test]
fn an_authenticated_packet_from_a_new_address_moves_the_endpoint() {
    let mut sim = Sim::established();
    let moved: SocketAddr = "198.51.100.7:60000".parse().unwrap();
    sim.nodes[B].underlay = moved;
    let pong = sim.pong(B, A, 1);
    sim.send(B, &pong);
    assert_eq!(sim.take_tun(A), vec![pong]);
    assert_eq!(sim.nodes[A].node.peers()[0].endpoint, Some(moved));

    let ping = sim.ping(A, B, 1);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);
    assert_eq!(sim.sent.last().map(|s| s.to), Some(Some(B)));
}

#[test]
fn forged_datagrams_do_not_move_the_endpoint() {
    let mut sim = Sim::established();
    let pong = sim.pong(B, A, 1);
    sim.send(B, &pong);
    let mut forged = sim
        .sent
        .iter()
        .find(|s| s.from == B && message_type(&s.payload) == 4)
        .map(|s| s.payload.clone())
        .unwrap();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let now = sim.now;
    sim.nodes[A]
        .node
        .handle_udp("203.0.113.9:1".parse().unwrap(), &forged, now);
    assert_eq!(
        sim.nodes[A].node.peers()[0].endpoint,
        Some(sim.nodes[B].underlay)
    );
    assert_eq!(sim.stats(A).dropped_invalid_datagram, 1);
}

#[test]
fn garbage_is_counted_not_fatal() {
    let mut sim = Sim::established();
    let now = sim.now;
    let node = &mut sim.nodes[A].node;
    node.handle_udp("192.0.2.2:41641".parse().unwrap(), &[], now);
    node.handle_udp("192.0.2.2:41641".parse().unwrap(), &[4, 0, 0, 0, 1], now);
    node.handle_tun_packet(&[], now);
    node.handle_tun_packet(&[0x45, 0, 0], now);
    let stats = node.filter_stats();
    assert_eq!(stats.dropped_invalid_datagram, 2);
    assert_eq!(stats.dropped_malformed, 2);
}

#[test]
fn packets_to_a_peer_without_an_endpoint_are_dropped() {
    let mut sim = Sim::new();
    let mut b = sim.nodes[B].peer();
    b.endpoints.clear();
    let netmap = NetMap {
        revision: 1,
        self_node: sim.nodes[A].self_node(),
        peers: vec![b],
        filter: PacketFilter::default(),
        capabilities: Vec::new(),
    };
    let now = sim.now;
    sim.nodes[A].node.set_netmap(&netmap, now);
    let ping = sim.ping(A, B, 1);
    sim.send(A, &ping);
    assert_eq!(sim.stats(A).dropped_no_endpoint, 1);
    assert!(sim.sent.is_empty());

    // Once B reaches out, A answers at the address B wrote from.
    sim.set_netmap(B, &[A], vec![]);
    let ping = sim.ping(B, A, 1);
    sim.send(B, &ping);
    assert_eq!(
        sim.nodes[A].node.peers()[0].endpoint,
        Some(sim.nodes[B].underlay)
    );
    let pong = sim.pong(A, B, 1);
    sim.send(A, &pong);
    assert_eq!(sim.take_tun(B), vec![pong]);
}

#[test]
fn timers_tick_while_peers_exist_and_flows_expire() {
    let mut sim = Sim::established();
    let start = sim.now;
    assert_eq!(
        sim.nodes[A].node.poll_timeout(),
        Some(start),
        "traffic to an idle peer asks for probing at once"
    );
    sim.advance(Duration::ZERO);
    let next = sim.nodes[A].node.poll_timeout().unwrap();
    assert!(next > start && next <= start + TICK);
    assert_eq!(sim.stats(A).flows, 1);

    sim.advance(filter::ICMP_IDLE + TICK);
    assert_eq!(sim.stats(A).flows, 0);
    // The echo flow is gone, so a late reply is no longer return traffic.
    let pong = sim.pong(B, A, 1);
    sim.send(B, &pong);
    assert!(sim.take_tun(A).is_empty());

    sim.nodes[A].node.clear();
    assert_eq!(sim.nodes[A].node.poll_timeout(), None);
    assert!(sim.nodes[A].node.peers().is_empty());
}

#[test]
fn a_restarted_peer_gets_the_tunnel_back_at_once() {
    let mut sim = Sim::established();
    // B restarts: same key, no sessions, fresh indices.
    sim.nodes[B].node = sim.fresh_node(sim.nodes[B].key.clone());
    let rule = sim.allow(A, B, &[Protocol::Icmp], &[]);
    sim.set_netmap(B, &[A], vec![rule]);

    // A still sends on its old session: B cannot read it, but answers with a handshake.
    let lost = sim.ping(A, B, 2);
    sim.send(A, &lost);
    assert!(sim.take_tun(B).is_empty());
    let ping = sim.ping(A, B, 3);
    sim.send(A, &ping);
    assert_eq!(
        sim.take_tun(B),
        vec![ping],
        "the next packet crosses the new session"
    );

    // The nudge is rate-limited: garbage on unknown sessions does not make B spam handshakes.
    let before = sim.sent.len();
    let mut stale = vec![4u8, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
    stale.extend_from_slice(&[0; 24]);
    let from = sim.nodes[A].underlay;
    for _ in 0..10 {
        sim.nodes[B].node.handle_udp(from, &stale, sim.now);
    }
    let handshakes = std::iter::from_fn(|| sim.nodes[B].node.poll_transmit())
        .filter(|t| message_type(&t.payload) == 1)
        .count();
    assert!(
        handshakes <= 1,
        "{handshakes} handshakes for 10 stale datagrams"
    );
    assert_eq!(sim.sent.len(), before);
}

#[test]
fn a_key_rotation_loses_no_packet_when_peers_learn_the_key_late() {
    let mut sim = Sim::established();
    sim.exchange(1..4);

    // B rotates; A does not know the new key yet and drops B's handshake.
    let unknown = sim.stats(A).dropped_unknown_peer;
    sim.rotate(B);
    assert_eq!(sim.stats(A).dropped_unknown_peer, unknown + 1);
    sim.exchange(4..10);

    // The coordinator tells A: the new session comes up at once.
    let before = sim.sent.len();
    sim.learn_key(A, B);
    let types = sim.types_since(before);
    assert!(
        types.contains(&(A, 1)) && types.contains(&(B, 2)),
        "{types:?}"
    );
    sim.exchange(10..20);

    // The old sessions end; the new one carries everything.
    sim.advance(Duration::from_secs(6));
    sim.exchange(20..25);
    let before = sim.sent.len();
    sim.exchange(25..26);
    assert_eq!(sim.types_since(before), vec![(A, 4), (B, 4)]);
}

#[test]
fn a_key_rotation_loses_no_packet_when_peers_learn_the_key_first() {
    let mut sim = Sim::established();
    sim.exchange(1..4);

    // A learns B's next key before B switches to it: A's handshake for the
    // new key fails at B, and the old session keeps working.
    let stale_key = sim.nodes[B].key.clone();
    let next_key = PrivateKey::generate();
    sim.nodes[B].key = next_key.clone();
    let invalid = sim.stats(B).dropped_invalid_datagram;
    sim.learn_key(A, B);
    assert_eq!(sim.stats(B).dropped_invalid_datagram, invalid + 1);
    sim.nodes[B].key = stale_key;
    sim.exchange(4..10);

    // B switches: its handshake with A succeeds.
    let now = sim.now;
    sim.nodes[B].node.rotate_key(next_key.clone(), now);
    sim.nodes[B].key = next_key;
    let before = sim.sent.len();
    sim.settle();
    let types = sim.types_since(before);
    assert!(
        types.contains(&(B, 1)) && types.contains(&(A, 2)),
        "{types:?}"
    );
    sim.exchange(10..20);
    sim.advance(Duration::from_secs(6));
    sim.exchange(20..25);
}

#[test]
fn both_sides_rotating_at_once_lose_no_packet() {
    let mut sim = Sim::established();
    sim.exchange(1..3);
    sim.rotate(A);
    sim.rotate(B);
    sim.exchange(3..6);
    sim.learn_key(A, B);
    sim.learn_key(B, A);
    sim.exchange(6..12);
    sim.advance(Duration::from_secs(6));
    sim.exchange(12..16);
    assert_eq!(
        sim.nodes[A].node.public_key(),
        sim.nodes[A].key.public_key()
    );
}

mod mtu;
mod timers;

/// Every flow report `node` has queued.
fn flow_reports(sim: &mut Sim, node: usize) -> Vec<filter::FlowReport> {
    std::iter::from_fn(|| sim.nodes[node].node.poll_flow_report()).collect()
}

#[test]
fn both_ends_report_a_flow_alike_on_the_virtual_clock() {
    let mut sim = Sim::new();
    let db = PortRange {
        first: 5432,
        last: 5432,
    };
    let rule = FilterRule {
        rule_id: weft_proto::RuleId::of_text("a to b's database"),
        ..sim.allow(A, B, &[Protocol::Tcp], &[db])
    };
    sim.set_netmap(A, &[B], vec![]);
    sim.set_netmap(B, &[A], vec![rule.clone()]);
    let (a, b) = (sim.nodes[A].v4, sim.nodes[B].v4);
    let start = sim.now;
    sim.send(A, &test_packets::tcp_seq(a, 40000, b, 5432, SYN, 0xabc));
    sim.send(B, &test_packets::tcp(b, 5432, a, 40000, SYN | ACK));
    for _ in 0..4 {
        sim.advance(Duration::from_secs(20));
        sim.send(A, &test_packets::tcp(a, 40000, b, 5432, ACK));
    }
    let last_packet = sim.now;
    assert_eq!(sim.take_tun(B).len(), 5);
    assert_eq!(sim.take_tun(A).len(), 1);
    // B denies what no rule admits, and sums it.
    sim.send(A, &test_packets::udp(a, 40001, b, 53, b"q"));
    sim.send(A, &test_packets::udp(a, 40002, b, 53, b"q"));

    // Each end reported the flow 1 s after it opened, and again with the
    // traffic of its first minute.
    let interim: Vec<_> = [A, B].map(|n| flow_reports(&mut sim, n)).into();
    for reports in &interim {
        assert!(
            matches!(reports.as_slice(), [first, minute]
                if !first.ended && !minute.ended
                    && first.start == start && first.end == start
                    && minute.to_dst.packets == 4),
            "{reports:?}"
        );
    }

    sim.advance(filter::TCP_IDLE + Duration::from_secs(1));
    let on_a = flow_reports(&mut sim, A);
    let on_b = flow_reports(&mut sim, B);
    // A reports the UDP flows it opened 1 s in and when they end, B their
    // summary one summary interval in; each end one more interim report of
    // the TCP flow (traffic came after the last), then its end.
    let kinds = |reports: &[filter::FlowReport]| -> Vec<(Protocol, bool)> {
        reports.iter().map(|r| (r.key.protocol, r.ended)).collect()
    };
    let udp = (Protocol::Udp, true);
    let tcp = |ended| (Protocol::Tcp, ended);
    let udp_open = (Protocol::Udp, false);
    assert_eq!(
        kinds(&on_a),
        [udp_open, udp_open, tcp(false), udp, udp, tcp(true)]
    );
    assert_eq!(kinds(&on_b), [udp, tcp(false), tcp(true)]);
    let (opened, summary, accepted) = (&on_a[5], &on_b[0], &on_b[2]);
    for (end, verdict) in [
        (opened, FlowVerdict::Opened),
        (accepted, FlowVerdict::Accept),
    ] {
        assert_eq!(end.verdict, verdict);
        assert_eq!((end.key.src, end.key.src_port), (a, 40000));
        assert_eq!((end.key.dst, end.key.dst_port), (b, 5432));
        assert_eq!(end.discriminator, 0xabc);
        assert_eq!((end.start, end.end), (start, last_packet));
        assert_eq!((end.to_dst.packets, end.to_src.packets), (5, 1));
        assert!(end.ended);
    }
    assert_eq!(opened.to_dst, accepted.to_dst);
    assert_eq!(opened.to_src, accepted.to_src);
    assert_eq!(opened.rule, None);
    assert_eq!(
        accepted.rule,
        Some(weft_proto::RuleRef {
            line: 7,
            id: rule.rule_id
        })
    );
    assert_eq!(summary.verdict, FlowVerdict::Deny);
    assert_eq!(summary.key.dst_port, 53);
    assert_eq!(summary.denied.as_ref().map(|d| d.flows), Some(2));
    assert_eq!(
        summary.end.duration_since(last_packet),
        Duration::ZERO,
        "denied at the same virtual instant"
    );
    assert_eq!(sim.nodes[B].node.flow_log_stats().dropped, 0);
}
