//! weft's inbound packet filter: stateful, default deny.
//!
//! Packets from the tunnel are admitted when they are return traffic of a
//! flow this node opened, or when one of the netmap's allow rules admits
//! them. Packets this node sends are never filtered (each destination
//! enforces its own inbound policy); they only open flows.
//!
//! So when A may reach B but B may not reach A, A's connections to B work
//! both ways while a connection B opens to A is dropped at A.

mod conntrack;
mod packet;
mod rules;

#[cfg(test)]
pub(crate) mod test_packets;

use std::net::IpAddr;
use std::time::Instant;

use weft_proto::FilterRule;

pub use conntrack::{ConnTrack, FlowKey, Origin, DEFAULT_CAPACITY, ICMP_IDLE, TCP_IDLE, UDP_IDLE};
pub use packet::{parse, Headers, ParseError, Transport};
pub use rules::{Filter, Query};

/// The rules plus the connection-tracking table: one node's filter state.
///
/// Non-first IPv4 and IPv6 fragments carry no ports, so they match neither a
/// tracked flow nor a port-specific rule: they are dropped unless a rule
/// admits every port ([`weft_proto::PortRange::ANY`]) of their protocol
/// between their addresses. ICMP errors are matched by the rules alone, not
/// related to the flow they report on.
#[derive(Debug, Default)]
pub struct Firewall {
    filter: Filter,
    conntrack: ConnTrack,
}

/// The decision on one inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    Accept(Admission),
    /// Drop it.
    Drop(Denial),
}

/// Why an inbound packet was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It answers a flow this node opened.
    Return,
    /// It belongs to a peer-opened flow the rules still admit.
    Established,
    /// A rule admitted it; it opens a flow.
    Rule {
        /// The policy line of the rule.
        policy_line: u32,
    },
}

/// Why an inbound packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No rule admits it and it answers no flow of this node's.
    NoRule,
    /// Its flow was admitted once, but the current rules no longer admit it.
    Revoked,
}

impl Firewall {
    /// A filter that admits nothing but return traffic, tracking at most
    /// `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        Self {
            filter: Filter::default(),
            conntrack: ConnTrack::new(capacity),
        }
    }

    /// Replaces the rules. Peer-opened flows are re-checked against the new
    /// rules, so removing an allow also cuts the flows it admitted.
    pub fn set_rules(&mut self, rules: &[FilterRule]) {
        self.filter = Filter::new(rules);
        let filter = &self.filter;
        self.conntrack
            .recheck_inbound(|key| filter.evaluate(&query(key)).is_some());
    }

    /// Records a packet this node sends, so its answers are admitted.
    ///
    /// A packet answering a peer-opened flow only keeps that flow alive; an
    /// echo reply opens nothing.
    pub fn outbound(&mut self, headers: &Headers, now: Instant) {
        let Some(key) = FlowKey::of(headers) else {
            return;
        };
        let reverse = key.reversed();
        if let Some(Origin::Inbound { .. }) = self.conntrack.origin(&reverse) {
            self.conntrack.touch(&reverse, now);
            return;
        }
        if self.conntrack.touch(&key, now) {
            return;
        }
        if !matches!(headers.transport, Transport::Echo { reply: true, .. }) {
            self.conntrack.insert(key, Origin::Outbound, now);
        }
    }

    /// Decides on a packet arriving from the tunnel.
    pub fn inbound(&mut self, headers: &Headers, now: Instant) -> Verdict {
        let key = FlowKey::of(headers);
        if let Some(key) = key {
            let reverse = key.reversed();
            if self.conntrack.origin(&reverse) == Some(Origin::Outbound) {
                self.conntrack.touch(&reverse, now);
                return Verdict::Accept(Admission::Return);
            }
            match self.conntrack.origin(&key) {
                Some(Origin::Inbound { allowed: true }) => {
                    self.conntrack.touch(&key, now);
                    return Verdict::Accept(Admission::Established);
                }
                Some(Origin::Inbound { allowed: false }) => return Verdict::Drop(Denial::Revoked),
                Some(Origin::Outbound) | None => {}
            }
        }
        let dst_port = match headers.transport {
            Transport::Ports { dst, .. } => Some(dst),
            _ => None,
        };
        let query = Query {
            protocol: headers.protocol,
            src: headers.src,
            dst: headers.dst,
            dst_port,
        };
        let Some(policy_line) = self.filter.evaluate(&query) else {
            return Verdict::Drop(Denial::NoRule);
        };
        if let Some(key) = key {
            self.conntrack
                .insert(key, Origin::Inbound { allowed: true }, now);
        }
        Verdict::Accept(Admission::Rule { policy_line })
    }

    /// Forgets flows involving `addresses` (a peer left: its addresses may be
    /// handed to another node, which must not inherit its flows).
    pub fn forget_addresses(&mut self, addresses: &[IpAddr]) {
        self.conntrack.forget_addresses(addresses);
    }

    /// Expires idle flows.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.conntrack.handle_timeout(now);
    }

    /// When [`Firewall::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conntrack.poll_timeout()
    }

    /// Number of tracked flows.
    pub fn flows(&self) -> usize {
        self.conntrack.len()
    }

    /// Forgets the rules (deny all) and every flow.
    pub fn clear(&mut self) {
        self.filter = Filter::default();
        self.conntrack.clear();
    }
}

/// The rule query a tracked peer-opened flow stands for.
fn query(key: &FlowKey) -> Query {
    use weft_proto::Protocol;
    let dst_port = match key.protocol {
        Protocol::Tcp | Protocol::Udp => Some(key.dst_port),
        Protocol::Icmp | Protocol::Other(_) => None,
    };
    Query {
        protocol: key.protocol,
        src: key.src,
        dst: key.dst,
        dst_port,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use ipnet::IpNet;
    use proptest::prelude::*;
    use weft_proto::{PortRange, Protocol, RuleAction};

    use super::test_packets::{self, ACK, SYN};
    use super::*;

    const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));

    fn headers(packet: &[u8]) -> Headers {
        parse(packet).unwrap()
    }

    fn allow(src: IpAddr, dst: IpAddr, ports: &[(u16, u16)], protocols: &[Protocol]) -> FilterRule {
        FilterRule {
            src: vec![IpNet::from(src)],
            dst: vec![IpNet::from(dst)],
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocols: protocols.to_vec(),
            policy_line: 1,
            action: RuleAction::Accept,
        }
    }

    fn admitted(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Accept(_))
    }

    #[test]
    fn return_traffic_of_an_outbound_flow_is_admitted_but_new_flows_are_not() {
        let now = Instant::now();
        let mut fw = Firewall::default();
        fw.outbound(&headers(&test_packets::tcp(ME, 40000, PEER, 22, SYN)), now);
        let answer = headers(&test_packets::tcp(PEER, 22, ME, 40000, SYN | ACK));
        assert_eq!(fw.inbound(&answer, now), Verdict::Accept(Admission::Return));
        let fresh = headers(&test_packets::tcp(PEER, 22, ME, 40001, SYN));
        assert_eq!(fw.inbound(&fresh, now), Verdict::Drop(Denial::NoRule));
        let to_listener = headers(&test_packets::tcp(PEER, 50000, ME, 22, SYN));
        assert_eq!(fw.inbound(&to_listener, now), Verdict::Drop(Denial::NoRule));
    }

    #[test]
    fn echo_replies_are_return_traffic_but_echo_requests_are_not() {
        let now = Instant::now();
        let mut fw = Firewall::default();
        fw.outbound(&headers(&test_packets::echo(ME, PEER, false, 5, 1)), now);
        assert!(admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, true, 5, 1)),
            now
        )));
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, true, 6, 1)),
            now
        )));
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, false, 5, 2)),
            now
        )));
    }

    #[test]
    fn answering_a_peer_opens_nothing() {
        let now = Instant::now();
        let mut fw = Firewall::default();
        fw.outbound(&headers(&test_packets::echo(ME, PEER, true, 5, 1)), now);
        assert_eq!(fw.flows(), 0);
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, false, 5, 2)),
            now
        )));
    }

    #[test]
    fn rule_admitted_flows_are_tracked_and_revoked_with_their_rule() {
        let now = Instant::now();
        let mut fw = Firewall::default();
        fw.set_rules(&[allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp])]);
        let syn = headers(&test_packets::tcp(PEER, 50000, ME, 22, SYN));
        assert_eq!(
            fw.inbound(&syn, now),
            Verdict::Accept(Admission::Rule { policy_line: 1 })
        );
        let data = headers(&test_packets::tcp(PEER, 50000, ME, 22, ACK));
        assert_eq!(
            fw.inbound(&data, now),
            Verdict::Accept(Admission::Established)
        );
        // This node answers; that keeps the flow but does not make it outbound.
        fw.outbound(&headers(&test_packets::tcp(ME, 22, PEER, 50000, ACK)), now);

        fw.set_rules(&[]);
        assert_eq!(fw.inbound(&data, now), Verdict::Drop(Denial::Revoked));
        // Further answers cannot turn the flow into return traffic.
        fw.outbound(&headers(&test_packets::tcp(ME, 22, PEER, 50000, ACK)), now);
        assert_eq!(fw.inbound(&data, now), Verdict::Drop(Denial::Revoked));

        // Restoring the rule restores the flow.
        fw.set_rules(&[allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp])]);
        assert_eq!(
            fw.inbound(&data, now),
            Verdict::Accept(Admission::Established)
        );
    }

    #[test]
    fn flows_expire() {
        let start = Instant::now();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")),
            start,
        );
        let answer = headers(&test_packets::udp(PEER, 53, ME, 5000, b"a"));
        let almost = start + UDP_IDLE - Duration::from_secs(1);
        fw.handle_timeout(almost);
        assert!(admitted(fw.inbound(&answer, almost)));
        // The answer refreshed the flow.
        let expired = almost + UDP_IDLE;
        assert!(fw.poll_timeout().is_some_and(|t| t <= expired));
        fw.handle_timeout(expired);
        assert_eq!(fw.flows(), 0);
        assert!(!admitted(fw.inbound(&answer, expired)));
    }

    #[test]
    fn fragments_and_icmp_errors_are_decided_by_rules_alone() {
        let now = Instant::now();
        let mut fw = Firewall::default();
        fw.outbound(&headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")), now);
        let fragment = headers(&test_packets::non_first_fragment(test_packets::udp(
            PEER, 53, ME, 5000, b"a",
        )));
        assert!(!admitted(fw.inbound(&fragment, now)));
        fw.set_rules(&[allow(PEER, ME, &[(0, 65535)], &[Protocol::Udp])]);
        assert!(admitted(fw.inbound(&fragment, now)));
        assert_eq!(fw.flows(), 1, "fragments open no flow");
    }

    #[test]
    fn forgotten_addresses_lose_their_return_traffic() {
        let now = Instant::now();
        let mut fw = Firewall::default();
        fw.outbound(&headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")), now);
        fw.forget_addresses(&[PEER]);
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::udp(PEER, 53, ME, 5000, b"a")),
            now
        )));
    }

    // Model-based tests: a reference evaluator written straight from the
    // rules' definition, over small address and port spaces so that random
    // packets hit rules and flows often.

    const PEERS: [IpAddr; 4] = [
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
        IpAddr::V4(Ipv4Addr::new(100, 64, 1, 3)),
        IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 2)),
        IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 1, 0, 0, 0, 3)),
    ];
    const SELVES: [IpAddr; 2] = [ME, IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 1))];
    const PORTS: [u16; 4] = [22, 53, 80, 40000];

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Tcp,
        Udp,
        Echo { reply: bool },
        IcmpOther,
        Gre,
        UdpFragment,
    }

    #[derive(Debug, Clone, Copy)]
    struct Spec {
        kind: Kind,
        peer: usize,
        me: usize,
        peer_port: u16,
        my_port: u16,
    }

    impl Spec {
        /// The peer and this node's address, of one family.
        fn addresses(&self) -> (IpAddr, IpAddr) {
            let me = SELVES[self.me];
            let peer = PEERS[(self.peer & 1) | if me.is_ipv4() { 0 } else { 2 }];
            (peer, me)
        }

        /// The packet flowing from the peer (`inbound`) or to it.
        fn packet(&self, inbound: bool) -> Vec<u8> {
            let (peer, me) = self.addresses();
            let (src, sport, dst, dport) = if inbound {
                (peer, self.peer_port, me, self.my_port)
            } else {
                (me, self.my_port, peer, self.peer_port)
            };
            match self.kind {
                Kind::Tcp => test_packets::tcp(src, sport, dst, dport, ACK),
                Kind::Udp => test_packets::udp(src, sport, dst, dport, b"x"),
                Kind::Echo { reply } => test_packets::echo(src, dst, reply, self.peer_port, 1),
                Kind::IcmpOther => {
                    let mut packet = test_packets::echo(src, dst, false, 1, 1);
                    let at = if src.is_ipv4() { 20 } else { 40 };
                    packet[at] = 3;
                    packet
                }
                Kind::Gre => test_packets::opaque(src, dst, 47),
                Kind::UdpFragment if src.is_ipv4() => test_packets::non_first_fragment(
                    test_packets::udp(src, sport, dst, dport, b"x"),
                ),
                Kind::UdpFragment => test_packets::udp(src, sport, dst, dport, b"x"),
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Tcp),
            Just(Kind::Udp),
            any::<bool>().prop_map(|reply| Kind::Echo { reply }),
            Just(Kind::IcmpOther),
            Just(Kind::Gre),
            Just(Kind::UdpFragment),
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (kind(), 0..4usize, 0..2usize, 0..4usize, 0..4usize).prop_map(|(kind, peer, me, pp, mp)| {
            Spec {
                kind,
                peer,
                me,
                peer_port: PORTS[pp],
                my_port: PORTS[mp],
            }
        })
    }

    fn net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0..4usize).prop_map(|i| IpNet::from(PEERS[i])),
            (0..2usize).prop_map(|i| IpNet::from(SELVES[i])),
            Just("100.64.0.0/24".parse().unwrap()),
            Just("fd7a::/64".parse().unwrap()),
            Just("0.0.0.0/0".parse().unwrap()),
            Just("::/0".parse().unwrap()),
        ]
    }

    fn rule() -> impl Strategy<Value = FilterRule> {
        let range = prop_oneof![
            (0..4usize).prop_map(|i| PortRange {
                first: PORTS[i],
                last: PORTS[i]
            }),
            Just(PortRange {
                first: 20,
                last: 60
            }),
            Just(PortRange::ANY),
        ];
        let protocol = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Icmp),
            Just(Protocol::Other(47)),
            Just(Protocol::Other(17)),
        ];
        (
            proptest::collection::vec(net(), 0..3),
            proptest::collection::vec(net(), 0..3),
            proptest::collection::vec(range, 0..3),
            proptest::collection::vec(protocol, 0..3),
            0..100u32,
        )
            .prop_map(|(src, dst, ports, protocols, policy_line)| FilterRule {
                src,
                dst,
                ports,
                protocols,
                policy_line,
                action: RuleAction::Accept,
            })
    }

    /// Whether `rules` admit the inbound packet of `spec`, from the rules' definition.
    fn reference_rules(rules: &[FilterRule], spec: &Spec) -> bool {
        let (src, dst) = spec.addresses();
        let (protocol, port) = match spec.kind {
            Kind::Tcp => (Protocol::Tcp, Some(spec.my_port)),
            Kind::Udp => (Protocol::Udp, Some(spec.my_port)),
            Kind::UdpFragment if src.is_ipv4() => (Protocol::Udp, None),
            Kind::UdpFragment => (Protocol::Udp, Some(spec.my_port)),
            Kind::Echo { .. } | Kind::IcmpOther => (Protocol::Icmp, None),
            Kind::Gre => (Protocol::Other(47), None),
        };
        rules.iter().any(|rule| {
            let protocols: Vec<Protocol> = if rule.protocols.is_empty() {
                Protocol::DEFAULT.to_vec()
            } else {
                rule.protocols
                    .iter()
                    .map(|p| match p {
                        Protocol::Other(n) => Protocol::from_number(*n),
                        p => *p,
                    })
                    .collect()
            };
            let ports_ok = match protocol {
                Protocol::Tcp | Protocol::Udp => match port {
                    Some(port) => rule.ports.iter().any(|r| r.contains(port)),
                    None => rule.ports.contains(&PortRange::ANY),
                },
                _ => true,
            };
            protocols.contains(&protocol)
                && rule.src.iter().any(|n| n.contains(&src))
                && rule.dst.iter().any(|n| n.contains(&dst))
                && ports_ok
        })
    }

    /// Whether the inbound packet of `spec` answers one of the outbound packets in `opened`.
    fn reference_return(opened: &[Spec], spec: &Spec) -> bool {
        opened.iter().any(|out| {
            let same_ends = out.addresses() == spec.addresses();
            let same_ports = out.peer_port == spec.peer_port && out.my_port == spec.my_port;
            match (out.kind, spec.kind) {
                (Kind::Tcp, Kind::Tcp) | (Kind::Udp, Kind::Udp) => same_ends && same_ports,
                (Kind::Udp, Kind::UdpFragment) if !spec.addresses().0.is_ipv4() => {
                    same_ends && same_ports
                }
                (Kind::UdpFragment, Kind::Udp | Kind::UdpFragment)
                    if !out.addresses().0.is_ipv4() =>
                {
                    same_ends && same_ports && !spec.addresses().0.is_ipv4()
                }
                (Kind::Echo { reply: false }, Kind::Echo { reply: true }) => {
                    same_ends && out.peer_port == spec.peer_port
                }
                (Kind::Gre, Kind::Gre) => same_ends,
                _ => false,
            }
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Out(Spec),
        In(Spec),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![spec().prop_map(Op::Out), spec().prop_map(Op::In)]
    }

    proptest! {
        /// With fixed rules, an inbound packet is admitted exactly when a rule
        /// admits it or it answers a flow this node opened.
        #[test]
        fn admission_matches_the_reference(
            rules in proptest::collection::vec(rule(), 0..4),
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let now = Instant::now();
            let mut fw = Firewall::default();
            fw.set_rules(&rules);
            let mut opened = Vec::new();
            for op in ops {
                match op {
                    Op::Out(spec) => {
                        fw.outbound(&headers(&spec.packet(false)), now);
                        opened.push(spec);
                    }
                    Op::In(spec) => {
                        let got = admitted(fw.inbound(&headers(&spec.packet(true)), now));
                        let want = reference_rules(&rules, &spec) || reference_return(&opened, &spec);
                        prop_assert_eq!(got, want, "{:?}", spec);
                    }
                }
            }
        }

        /// Removing a rule never admits more, also for flows the rule let in earlier,
        /// and what is admitted is always allowed by the current rules or answers a flow
        /// this node opened.
        #[test]
        fn removing_a_rule_never_admits_more(
            rules in proptest::collection::vec(rule(), 1..4),
            removed in 0..4usize,
            before in proptest::collection::vec(op(), 0..30),
            after in proptest::collection::vec(op(), 1..30),
        ) {
            let now = Instant::now();
            let removed = removed % rules.len();
            let mut fewer = rules.clone();
            fewer.remove(removed);
            let mut kept = Firewall::default();
            let mut changed = Firewall::default();
            kept.set_rules(&rules);
            changed.set_rules(&rules);
            let mut opened = Vec::new();
            for op in &before {
                match op {
                    Op::Out(spec) => {
                        kept.outbound(&headers(&spec.packet(false)), now);
                        changed.outbound(&headers(&spec.packet(false)), now);
                        opened.push(*spec);
                    }
                    Op::In(spec) => {
                        let packet = headers(&spec.packet(true));
                        prop_assert_eq!(kept.inbound(&packet, now), changed.inbound(&packet, now));
                    }
                }
            }
            changed.set_rules(&fewer);
            for op in &after {
                match op {
                    Op::Out(spec) => {
                        kept.outbound(&headers(&spec.packet(false)), now);
                        changed.outbound(&headers(&spec.packet(false)), now);
                        opened.push(*spec);
                    }
                    Op::In(spec) => {
                        let packet = headers(&spec.packet(true));
                        let with_rule = admitted(kept.inbound(&packet, now));
                        let without = admitted(changed.inbound(&packet, now));
                        prop_assert!(!without || with_rule, "{:?}", spec);
                        prop_assert!(
                            !without || reference_rules(&fewer, spec) || reference_return(&opened, spec),
                            "{:?}", spec
                        );
                    }
                }
            }
        }
    }
}
