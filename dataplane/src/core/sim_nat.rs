//! A simulated underlay with NATs, relays and STUN servers, driving real
//! [`Node`]s on a virtual clock: path discovery, hole punching, relay
//! fallback and roaming, deterministically and without sockets.
//!
//! The simulation also plays the coordinator: every [`Event::Advertise`] a
//! node reports reaches its peers as a netmap delta at once.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use weft_proto::{DefaultAction, FilterRule, PacketFilter, Protocol, RuleAction, SelfNode};

use super::disco::{self, Message};
use super::*;
use crate::filter::test_packets;

const WG_PORT: u16 = 41641;

/// How a NAT maps and filters UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatKind {
    /// Endpoint-independent mapping keeping the source port, address and
    /// port-dependent filtering: Linux `masquerade`.
    Masquerade,
    /// A new random port for every destination: `masquerade random,fully-random`.
    Symmetric,
    /// Forwarded UDP is dropped (relays still work over TCP).
    UdpBlocked,
}

struct Nat {
    kind: NatKind,
    wan: IpAddr,
    /// (inside endpoint, destination for symmetric) → outside port.
    mappings: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// Outside port → inside endpoint and the destinations it sent to.
    reverse: HashMap<u16, (SocketAddr, BTreeSet<SocketAddr>)>,
    next_port: u16,
}

impl Nat {
    fn new(kind: NatKind, wan: Ipv4Addr) -> Self {
        Self {
            kind,
            wan: IpAddr::V4(wan),
            mappings: HashMap::new(),
            reverse: HashMap::new(),
            next_port: 20_000,
        }
    }

    /// The outside source of a datagram from `inside` to `dst`, or `None` when dropped.
    fn outbound(&mut self, inside: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
        let key = match self.kind {
            NatKind::UdpBlocked => return None,
            NatKind::Masquerade => (inside, None),
            NatKind::Symmetric => (inside, Some(dst)),
        };
        let port = match self.mappings.get(&key) {
            Some(port) => *port,
            None => {
                let port = if self.kind == NatKind::Masquerade
                    && !self.reverse.contains_key(&inside.port())
                {
                    inside.port()
                } else {
                    self.next_port += 7;
                    self.next_port
                };
                self.mappings.insert(key, port);
                self.reverse.insert(port, (inside, BTreeSet::new()));
                port
            }
        };
        if let Some((_, remotes)) = self.reverse.get_mut(&port) {
            remotes.insert(dst);
        }
        Some(SocketAddr::new(self.wan, port))
    }

    /// The inside endpoint for a datagram from `from` to outside port
    /// `port`, when a mapping exists and `from` was sent to through it.
    fn inbound(&self, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        let (inside, remotes) = self.reverse.get(&port)?;
        remotes.contains(&from).then_some(*inside)
    }
}

struct Host {
    id: NodeId,
    key: PrivateKey,
    node: Node,
    lan: SocketAddr,
    nat: Option<Nat>,
    v4: IpAddr,
    advertisement: Advertisement,
    tun: Vec<Vec<u8>>,
    events: Vec<Event>,
    /// The relays this host holds a session to.
    sessions: BTreeSet<String>,
}

impl Host {
    fn peer(&self) -> Peer {
        Peer {
            id: self.id,
            name: format!("host{}", self.id.0),
            node_key: self.key.public_key(),
            addresses: vec![self.v4],
            endpoints: self.advertisement.endpoints.clone(),
            home_relay: self.advertisement.home_relay.clone(),
            identity: Identity::default(),
        }
    }
}

struct SimRelay {
    info: RelayInfo,
    up: bool,
    rtt: Duration,
}

/// A datagram as it crossed the underlay or a relay.
#[derive(Debug, Clone)]
struct Seen {
    to: SocketAddr,
    payload: Vec<u8>,
}

struct Net {
    hosts: Vec<Host>,
    relays: Vec<SimRelay>,
    now: Instant,
    /// Every UDP datagram delivered to a node, as it arrived.
    delivered: Vec<(usize, Seen)>,
    /// Datagrams the nodes sent to addresses outside the simulation.
    strays: Vec<Seen>,
}

const A: usize = 0;
const B: usize = 1;

impl Net {
    /// Two nodes on LANs 198.18.1.0/24 and 198.18.2.0/24 behind NATs of
    /// `kinds` (`None`: a public address, no NAT), and relays `r1` (10 ms)
    /// and `r2` (20 ms) with STUN servers, every node connected to both.
    fn new(kinds: [Option<NatKind>; 2]) -> Self {
        let now = crate::test_clock();
        let relays = [("r1", 1, 10), ("r2", 2, 20)]
            .into_iter()
            .map(|(name, n, rtt)| SimRelay {
                info: RelayInfo {
                    name: name.into(),
                    address: SocketAddr::from(([198, 51, 100, n], 7444)),
                    key: PrivateKey::generate().public_key(),
                    tcp_address: None,
                    stun_address: Some(SocketAddr::from(([198, 51, 100, n], 3478))),
                },
                up: true,
                rtt: Duration::from_millis(rtt),
            })
            .collect();
        let hosts = kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let n = u8::try_from(i + 1).unwrap();
                let key = PrivateKey::generate();
                let (lan, nat) = match kind {
                    Some(kind) => (
                        SocketAddr::from(([198, 18, n, 2], WG_PORT)),
                        Some(Nat::new(*kind, Ipv4Addr::new(203, 0, 113, n))),
                    ),
                    None => (SocketAddr::from(([203, 0, 113, 100 + n], WG_PORT)), None),
                };
                Host {
                    id: NodeId(u64::from(n)),
                    node: Node::new(
                        key.clone(),
                        now,
                        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                        u64::from(n),
                    ),
                    key,
                    lan,
                    nat,
                    v4: IpAddr::V4(Ipv4Addr::new(100, 64, 0, n)),
                    advertisement: Advertisement::default(),
                    tun: Vec::new(),
                    events: Vec::new(),
                    sessions: BTreeSet::new(),
                }
            })
            .collect();
        let mut net = Self {
            hosts,
            relays,
            now,
            delivered: Vec::new(),
            strays: Vec::new(),
        };
        for i in 0..net.hosts.len() {
            let infos: Vec<RelayInfo> = net.relays.iter().map(|r| r.info.clone()).collect();
            let lan = net.hosts[i].lan;
            let host = &mut net.hosts[i];
            host.node.set_local_endpoints(vec![lan], now);
            host.node.set_relays(&infos, now);
            for relay in &net.relays {
                host.node.relay_connected(&relay.info.name, relay.rtt, now);
                host.sessions.insert(relay.info.name.clone());
            }
        }
        net.settle();
        for i in 0..net.hosts.len() {
            net.set_netmap(i);
        }
        net.settle();
        net
    }

    fn set_netmap(&mut self, me: usize) {
        let others: Vec<usize> = (0..self.hosts.len()).filter(|&o| o != me).collect();
        let rules = others
            .iter()
            .map(|&o| FilterRule {
                src: vec![IpNet::from(self.hosts[o].v4)],
                dst: vec![IpNet::from(self.hosts[me].v4)],
                ports: Vec::new(),
                protocols: vec![Protocol::Icmp],
                action: RuleAction::Accept,
                policy_line: 1,
                rule_id: weft_proto::RuleId::default(),
            })
            .collect();
        let IpAddr::V4(ipv4) = self.hosts[me].v4 else {
            unreachable!("sim hosts have IPv4 overlay addresses")
        };
        let netmap = NetMap {
            revision: 1,
            self_node: SelfNode {
                id: self.hosts[me].id,
                name: format!("host{me}"),
                ipv4,
                ipv6: Ipv6Addr::LOCALHOST,
                identity: Identity::default(),
                key_expiry: None,
            },
            peers: others.iter().map(|&o| self.hosts[o].peer()).collect(),
            filter: PacketFilter {
                rules,
                default: DefaultAction::Deny,
            },
            capabilities: Vec::new(),
        };
        let now = self.now;
        self.hosts[me].node.set_netmap(&netmap, now);
    }

    /// Where a datagram from host `from` to `dst` arrives: the host and the
    /// source address it sees, or `None` when the network drops it.
    fn route(&mut self, from: usize, dst: SocketAddr) -> Option<(Delivery, SocketAddr)> {
        let inside = self.hosts[from].lan;
        let src = match &mut self.hosts[from].nat {
            Some(nat) => nat.outbound(inside, dst)?,
            None => inside,
        };
        if let Some(relay) = self
            .relays
            .iter()
            .find(|r| r.info.stun_address == Some(dst))
        {
            return relay.up.then_some((Delivery::Stun(dst), src));
        }
        let host = self.hosts.iter().position(|h| match &h.nat {
            None => h.lan == dst,
            Some(nat) => nat.wan == dst.ip() && nat.inbound(src, dst.port()).is_some(),
        })?;
        Some((Delivery::Host(host), src))
    }

    /// Moves every datagram and event until the network is quiet.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..self.hosts.len() {
                while let Some(transmit) = self.hosts[i].node.poll_transmit() {
                    moved = true;
                    self.deliver_udp(i, transmit);
                }
                while let Some(relayed) = self.hosts[i].node.poll_relay_transmit() {
                    moved = true;
                    self.deliver_relayed(i, relayed);
                }
                while let Some(packet) = self.hosts[i].node.poll_tun_packet() {
                    self.hosts[i].tun.push(packet);
                }
                while let Some(event) = self.hosts[i].node.poll_event() {
                    moved = true;
                    self.coordinate(i, event);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the simulated network did not settle");
    }

    fn deliver_udp(&mut self, from: usize, transmit: Transmit) {
        let now = self.now;
        let Some((delivery, src)) = self.route(from, transmit.dst) else {
            self.strays.push(Seen {
                to: transmit.dst,
                payload: transmit.payload,
            });
            return;
        };
        match delivery {
            Delivery::Stun(server) => {
                let Some(response) = weft_proto::stun::respond(&transmit.payload, src) else {
                    return;
                };
                // The answer crosses the NAT back like any inbound datagram.
                let Some(host) = self.inbound(server, src) else {
                    return;
                };
                self.hosts[host].node.handle_udp(server, &response, now);
            }
            Delivery::Host(to) => {
                let lan = self.hosts[to].lan;
                self.hosts[to].node.handle_udp(src, &transmit.payload, now);
                self.delivered.push((
                    to,
                    Seen {
                        to: lan,
                        payload: transmit.payload,
                    },
                ));
            }
        }
    }

    /// The host a datagram from `from` to outside address `to` reaches.
    fn inbound(&self, from: SocketAddr, to: SocketAddr) -> Option<usize> {
        self.hosts.iter().position(|h| match &h.nat {
            None => h.lan == to,
            Some(nat) => nat.wan == to.ip() && nat.inbound(from, to.port()).is_some(),
        })
    }

    /// A relay forwards to the node holding `to` when both hold a session.
    fn deliver_relayed(&mut self, from: usize, relayed: RelayTransmit) {
        let up = self
            .relays
            .iter()
            .any(|r| r.info.name == relayed.relay && r.up)
            && self.hosts[from].sessions.contains(&relayed.relay);
        let Some(to) = self
            .hosts
            .iter()
            .position(|h| h.key.public_key() == relayed.to)
        else {
            return;
        };
        if !up || !self.hosts[to].sessions.contains(&relayed.relay) {
            return;
        }
        let key = self.hosts[from].key.public_key();
        let now = self.now;
        self.hosts[to]
            .node
            .handle_relayed(&relayed.relay, key, &relayed.payload, now);
    }

    /// Plays the coordinator: an advertisement reaches every other node.
    fn coordinate(&mut self, from: usize, event: Event) {
        if let Event::Advertise(advertisement) = &event {
            self.hosts[from].advertisement = advertisement.clone();
            let peer = self.hosts[from].peer();
            let now = self.now;
            for other in (0..self.hosts.len()).filter(|&o| o != from) {
                let delta = NetMapDelta {
                    revision: 2,
                    upsert_peers: vec![peer.clone()],
                    remove_peers: Vec::new(),
                    filter: None,
                    self_node: None,
                    capabilities: None,
                };
                self.hosts[other].node.apply_delta(&delta, now);
            }
        }
        self.hosts[from].events.push(event);
    }

    /// Advances the virtual clock by `by`, firing every timeout on the way.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = self
                .hosts
                .iter()
                .filter_map(|h| h.node.poll_timeout())
                .filter(|t| *t <= end)
                .min();
            let Some(next) = next else { break };
            self.now = self.now.max(next);
            for i in 0..self.hosts.len() {
                if self.hosts[i]
                    .node
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    let now = self.now;
                    self.hosts[i].node.handle_timeout(now);
                }
            }
            self.settle();
        }
        self.now = end;
    }

    /// One echo request from `from` to `to` and its reply; returns whether both arrived.
    fn ping(&mut self, from: usize, to: usize, seq: u16) -> bool {
        let (src, dst) = (self.hosts[from].v4, self.hosts[to].v4);
        let request = test_packets::echo(src, dst, false, 1, seq);
        let now = self.now;
        self.hosts[from].node.handle_tun_packet(&request, now);
        self.settle();
        let arrived = std::mem::take(&mut self.hosts[to].tun) == vec![request];
        let reply = test_packets::echo(dst, src, true, 1, seq);
        self.hosts[to].node.handle_tun_packet(&reply, now);
        self.settle();
        arrived && std::mem::take(&mut self.hosts[from].tun) == vec![reply]
    }

    /// Pings both ways every 200 ms for `duration`; returns how many round trips failed.
    fn traffic(&mut self, duration: Duration) -> usize {
        let rounds = duration.as_millis() / 200;
        let mut lost = 0;
        for seq in 0..rounds {
            let seq = u16::try_from(seq).unwrap();
            if !self.ping(A, B, seq) {
                lost += 1;
            }
            self.advance(Duration::from_millis(200));
        }
        lost
    }

    /// How `me` reaches its peer now.
    fn path(&self, me: usize) -> (Option<PathKind>, Option<String>) {
        let status = self.hosts[me].node.peers();
        (status[0].path, status[0].relay.clone())
    }

    fn relay_down(&mut self, name: &str) {
        let now = self.now;
        for relay in &mut self.relays {
            if relay.info.name == name {
                relay.up = false;
            }
        }
        for host in &mut self.hosts {
            host.node.relay_disconnected(name, now);
            host.sessions.remove(name);
        }
        self.settle();
    }

    fn relay_up(&mut self, name: &str) {
        let now = self.now;
        for relay in &mut self.relays {
            if relay.info.name == name {
                relay.up = true;
                for host in &mut self.hosts {
                    host.node.relay_connected(name, relay.rtt, now);
                    host.sessions.insert(name.to_owned());
                }
            }
        }
        self.settle();
    }

    /// Host `me` moves to LAN `lan` behind a fresh NAT of `kind` and notices.
    fn roam(&mut self, me: usize, lan: SocketAddr, kind: NatKind, wan: Ipv4Addr) {
        self.hosts[me].lan = lan;
        self.hosts[me].nat = Some(Nat::new(kind, wan));
        let now = self.now;
        self.hosts[me].node.set_local_endpoints(vec![lan], now);
        self.settle();
    }
}

enum Delivery {
    Stun(SocketAddr),
    Host(usize),
}

const DIRECT: (Option<PathKind>, Option<String>) = (Some(PathKind::Direct), None);

fn via(relay: &str) -> (Option<PathKind>, Option<String>) {
    (Some(PathKind::Relay), Some(relay.to_owned()))
}

/// Traffic flows within the first round trip, through the home relay, and
/// the path is `expected` after a few seconds, on both sides.
fn reaches(kinds: [Option<NatKind>; 2], expected: &[(Option<PathKind>, Option<String>); 2]) -> Net {
    let mut net = Net::new(kinds);
    assert!(net.ping(A, B, 0), "the first packet arrives");
    assert_eq!(net.traffic(Duration::from_secs(3)), 0, "no packet is lost");
    assert_eq!(&[net.path(A), net.path(B)], expected);
    net
}

#[test]
fn stun_finds_the_reflexive_endpoint_and_the_mapping() {
    let net = Net::new([Some(NatKind::Masquerade), Some(NatKind::Symmetric)]);
    let a = net.hosts[A].node.netcheck();
    assert!(a.udp);
    assert_eq!(a.mapping, Some(NatMapping::EndpointIndependent));
    assert_eq!(
        a.reflexive[0].endpoint,
        "203.0.113.1:41641".parse().unwrap()
    );
    assert_eq!(
        a.relays[0],
        RelayLatency {
            name: "r1".into(),
            rtt: Some(Duration::from_millis(10)),
            home: true
        }
    );
    let b = net.hosts[B].node.netcheck();
    assert_eq!(b.mapping, Some(NatMapping::EndpointDependent));
    assert_eq!(
        net.hosts[A].advertisement,
        Advertisement {
            endpoints: vec![
                "198.18.1.2:41641".parse().unwrap(),
                "203.0.113.1:41641".parse().unwrap()
            ],
            home_relay: Some("r1".into()),
        }
    );
    let blocked = Net::new([Some(NatKind::UdpBlocked), None]);
    let a = blocked.hosts[A].node.netcheck();
    assert!(!a.udp && a.reflexive.is_empty() && a.mapping.is_none());
}

#[test]
fn public_nodes_go_direct() {
    reaches([None, None], &[DIRECT, DIRECT]);
}

#[test]
fn masquerade_on_both_sides_goes_direct_by_punching_holes() {
    let net = reaches(
        [Some(NatKind::Masquerade), Some(NatKind::Masquerade)],
        &[DIRECT, DIRECT],
    );
    let endpoint = net.hosts[A].node.peers()[0].endpoint;
    assert_eq!(endpoint, Some("203.0.113.2:41641".parse().unwrap()));
}

#[test]
fn symmetric_nat_facing_a_public_node_goes_direct() {
    reaches([Some(NatKind::Symmetric), None], &[DIRECT, DIRECT]);
}

#[test]
fn symmetric_nats_on_both_sides_stay_on_the_home_relay() {
    let mut net = reaches(
        [Some(NatKind::Symmetric), Some(NatKind::Symmetric)],
        &[via("r1"), via("r1")],
    );
    assert_eq!(net.traffic(Duration::from_secs(10)), 0);
    assert_eq!(net.path(A), via("r1"));
}

#[test]
fn blocked_udp_uses_the_relay() {
    reaches([Some(NatKind::UdpBlocked), None], &[via("r1"), via("r1")]);
}

#[test]
fn a_dead_relay_is_replaced_by_the_other() {
    let mut net = reaches(
        [Some(NatKind::Symmetric), Some(NatKind::Symmetric)],
        &[via("r1"), via("r1")],
    );
    net.relay_down("r1");
    assert!(net.ping(A, B, 100), "traffic moves to r2 at once");
    assert_eq!([net.path(A), net.path(B)], [via("r2"), via("r2")]);
    assert_eq!(net.hosts[A].advertisement.home_relay.as_deref(), Some("r2"));
    assert_eq!(net.traffic(Duration::from_secs(2)), 0);
}

#[test]
fn a_node_that_moves_finds_a_direct_path_again() {
    let mut net = reaches(
        [Some(NatKind::Masquerade), Some(NatKind::Masquerade)],
        &[DIRECT, DIRECT],
    );
    net.roam(
        B,
        SocketAddr::from(([198, 18, 3, 2], WG_PORT)),
        NatKind::Masquerade,
        Ipv4Addr::new(203, 0, 113, 3),
    );
    assert_eq!(
        net.path(B),
        via("r1"),
        "direct paths are distrusted at once"
    );
    // The shell calls `handle_timeout` as soon as `poll_timeout` says so.
    net.advance(Duration::ZERO);
    assert!(net.ping(A, B, 100), "traffic recovers at once");
    assert_eq!(net.traffic(Duration::from_secs(3)), 0);
    assert_eq!([net.path(A), net.path(B)], [DIRECT, DIRECT]);
    assert_eq!(
        net.hosts[A].node.peers()[0].endpoint,
        Some("203.0.113.3:41641".parse().unwrap())
    );
}

#[test]
fn idle_peers_are_not_probed() {
    let mut net = reaches([None, None], &[DIRECT, DIRECT]);
    net.advance(paths::ACTIVE);
    let before = net.delivered.len();
    net.advance(Duration::from_secs(30));
    assert_eq!(net.delivered.len(), before, "no probes, no heartbeats");
}

#[test]
fn ping_reports_the_path_and_times_out() {
    let mut net = reaches([None, None], &[DIRECT, DIRECT]);
    let peer = net.hosts[B].id;
    let now = net.now;
    let id = net.hosts[A].node.ping(peer, now).unwrap();
    net.settle();
    let pong = net.hosts[A].events.iter().find_map(|e| match e {
        Event::Pong {
            id: got,
            path,
            endpoint,
            ..
        } if *got == id => Some((*path, *endpoint)),
        _ => None,
    });
    assert_eq!(pong, Some((PathKind::Direct, Some(net.hosts[B].lan))));
    assert_eq!(net.hosts[A].node.ping(NodeId(99), now), None);

    let mut net = reaches(
        [Some(NatKind::Symmetric), Some(NatKind::Symmetric)],
        &[via("r1"), via("r1")],
    );
    let now = net.now;
    let id = net.hosts[A].node.ping(peer, now).unwrap();
    net.settle();
    assert!(net.hosts[A].events.iter().any(|e| matches!(
        e,
        Event::Pong { id: got, path: PathKind::Relay, relay: Some(r), .. } if *got == id && r == "r1"
    )));
    net.relay_down("r1");
    net.relay_down("r2");
    let now = net.now;
    let id = net.hosts[A].node.ping(peer, now).unwrap();
    net.advance(PING_TIMEOUT + TICK);
    assert!(net.hosts[A]
        .events
        .iter()
        .any(|e| matches!(e, Event::PingTimeout { id: got, peer: p } if *got == id && *p == peer)));
}

/// What an attacker on the path can do with disco: send garbage, forge,
/// replay captured messages from its own address. None of it moves a path
/// or draws an answer to the attacker.
#[test]
fn forged_replayed_and_garbage_disco_never_changes_a_path() {
    let mut net = reaches([None, None], &[DIRECT, DIRECT]);
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    let before = net.hosts[A].node.peers()[0].endpoint;
    let b_key = net.hosts[B].key.public_key();
    let a_key = net.hosts[A].key.public_key();
    let now = net.now;

    let captured: Vec<Vec<u8>> = net
        .delivered
        .iter()
        .filter(|(to, seen)| *to == A && disco::is_disco(&seen.payload))
        .map(|(_, seen)| seen.payload.clone())
        .collect();
    assert!(captured.len() >= 2, "pings and pongs were seen");

    let mut garbage = disco::MAGIC.to_vec();
    garbage.extend_from_slice(b_key.as_bytes());
    garbage.extend_from_slice(&[0x5a; 80]);
    let b_private = net.hosts[B].key.to_x25519().to_bytes();
    let unknown_pong = disco::seal(
        &b_private,
        &b_key,
        &a_key,
        &Message::Pong {
            tx: [0x42; 12],
            observed: Some(attacker),
        },
        1,
    )
    .unwrap();
    let stranger = PrivateKey::generate();
    let from_stranger = disco::seal(
        &stranger.to_x25519().to_bytes(),
        &stranger.public_key(),
        &a_key,
        &Message::Ping { tx: [1; 12] },
        2,
    )
    .unwrap();
    let mut forged_sender = from_stranger.clone();
    forged_sender[disco::MAGIC.len()..disco::MAGIC.len() + 32].copy_from_slice(b_key.as_bytes());

    let node = &mut net.hosts[A].node;
    for datagram in captured
        .iter()
        .chain([&garbage, &unknown_pong, &from_stranger, &forged_sender])
    {
        node.handle_udp(attacker, datagram, now);
        node.handle_relayed("r1", b_key, datagram, now);
    }
    node.handle_udp(attacker, &disco::MAGIC, now);
    assert_eq!(node.peers()[0].endpoint, before);
    while let Some(t) = node.poll_transmit() {
        assert_ne!(t.dst, attacker, "nothing is sent to the attacker");
    }
    while node.poll_relay_transmit().is_some() {}
    net.advance(Duration::from_secs(1));
    assert_eq!(net.hosts[A].node.peers()[0].endpoint, before);
    assert!(net.strays.iter().all(|s| s.to != attacker));
    assert_eq!(net.traffic(Duration::from_secs(1)), 0);
}

#[test]
fn without_relays_the_first_advertised_endpoint_is_used_until_one_answers() {
    let mut sim = Net::new([None, None]);
    for host in &mut sim.hosts {
        let now = sim.now;
        host.node.relay_disconnected("r1", now);
        host.node.relay_disconnected("r2", now);
    }
    sim.settle();
    assert_eq!(sim.path(A), (Some(PathKind::Direct), None));
    assert_eq!(
        sim.hosts[A].node.peers()[0].endpoint,
        Some(sim.hosts[B].lan)
    );
    assert!(sim.ping(A, B, 1));
}

#[test]
fn a_handshake_to_a_dead_guess_goes_again_on_the_path_that_answers() {
    let mut net = Net::new([None, None]);
    net.relay_down("r1");
    net.relay_down("r2");
    let mut b = net.hosts[B].peer();
    let dead: SocketAddr = "192.0.2.99:41641".parse().unwrap();
    b.endpoints.insert(0, dead);
    let now = net.now;
    net.hosts[A].node.apply_delta(
        &NetMapDelta {
            revision: 3,
            upsert_peers: vec![b],
            remove_peers: Vec::new(),
            filter: None,
            self_node: None,
            capabilities: None,
        },
        now,
    );
    assert!(!net.ping(A, B, 1), "the first guess is dead");
    assert!(net.strays.iter().any(|s| s.to == dead));
    net.advance(Duration::ZERO);
    let request = test_packets::echo(net.hosts[A].v4, net.hosts[B].v4, false, 1, 1);
    assert_eq!(
        std::mem::take(&mut net.hosts[B].tun),
        vec![request],
        "the queued packet follows the handshake over the confirmed path"
    );
    assert_eq!(net.path(A), DIRECT);
    assert_eq!(
        net.hosts[A].node.peers()[0].endpoint,
        Some(net.hosts[B].lan)
    );
}

#[test]
fn a_relay_that_comes_up_carries_the_waiting_handshake_at_once() {
    let mut net = Net::new([Some(NatKind::Symmetric), Some(NatKind::Symmetric)]);
    net.relay_down("r1");
    net.relay_down("r2");
    assert!(!net.ping(A, B, 1), "no path at all");
    net.advance(Duration::from_millis(500));
    net.relay_up("r2");
    let request = test_packets::echo(net.hosts[A].v4, net.hosts[B].v4, false, 1, 1);
    assert_eq!(std::mem::take(&mut net.hosts[B].tun), vec![request]);
    assert_eq!(net.path(A), via("r2"));
}

#[test]
fn a_peer_that_joins_a_relay_late_gets_the_handshake_at_once() {
    let mut net = Net::new([Some(NatKind::Symmetric), Some(NatKind::Symmetric)]);
    let now = net.now;
    for name in ["r1", "r2"] {
        net.hosts[B].node.relay_disconnected(name, now);
        net.hosts[B].sessions.remove(name);
    }
    net.settle();
    assert_eq!(net.hosts[A].node.peers()[0].relay.as_deref(), Some("r1"));
    let request = test_packets::echo(net.hosts[A].v4, net.hosts[B].v4, false, 1, 1);
    let now = net.now;
    net.hosts[A].node.handle_tun_packet(&request, now);
    net.settle();
    assert!(net.hosts[B].tun.is_empty(), "B is on no relay yet");
    net.advance(Duration::from_millis(300));
    net.hosts[B]
        .node
        .relay_connected("r2", Duration::from_millis(20), net.now);
    net.hosts[B].sessions.insert("r2".into());
    net.settle();
    // B advertises r2 as its home; A learns it and sends its handshake there,
    // at once or after HANDSHAKE_DEFER, whichever side has the lower key.
    net.advance(HANDSHAKE_DEFER + TICK);
    assert_eq!(std::mem::take(&mut net.hosts[B].tun), vec![request]);
    assert_eq!(net.path(A), via("r2"));
}
