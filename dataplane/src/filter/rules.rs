//! The netmap's packet filter, compiled so that a decision costs the same
//! whether the node has ten rules or a thousand.
//!
//! Rules are indexed by protocol, then by destination prefix (a node has a
//! handful: its own addresses and the routes it serves), then by port: the
//! port ranges of the rules under one destination are cut into disjoint
//! segments, each holding the rules that cover it. Within a segment, sources
//! are looked up by prefix length in hash maps, so a query costs one binary
//! search plus one hash lookup per distinct source prefix length, whatever
//! the number of rules.

use std::net::IpAddr;

use ahash::AHashMap;
use ipnet::IpNet;
use weft_proto::{
    DefaultAction, FilterRule, PacketFilter, PortRange, Protocol, RuleAction, RuleId, RuleRef,
};

/// A compiled, immutable packet filter.
///
/// Precedence, as documented on [`PacketFilter`]: a matching
/// [`RuleAction::Deny`] wins over a matching [`RuleAction::AuditDeny`], which
/// wins over a matching [`RuleAction::Accept`]; among rules of one action the
/// first in the netmap names the policy line. A query never allocates.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    tcp: Vec<DstBucket>,
    udp: Vec<DstBucket>,
    icmp: Vec<DstBucket>,
    other: Vec<(u8, Vec<DstBucket>)>,
    default: DefaultAction,
    /// Every rule's stable id, by its index in the netmap.
    ids: Vec<RuleId>,
}

/// What a query asks: may a packet with these properties come in?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Source address (the remote peer's side).
    pub src: IpAddr,
    /// Destination address (this node's side).
    pub dst: IpAddr,
    /// Destination port for TCP and UDP; `None` for a non-first fragment.
    pub dst_port: Option<u16>,
}

/// What the rules say about a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// An accept rule admits it and no deny rule matches.
    Accept {
        /// The accept rule's policy line.
        policy_line: u32,
    },
    /// A deny rule matches: drop it.
    Deny {
        /// The deny rule's policy line.
        policy_line: u32,
    },
    /// An audit-mode deny rule matches (and no enforced one): admit it and
    /// log a would-be denial.
    AuditDeny {
        /// The audit rule's policy line.
        policy_line: u32,
    },
    /// No rule matches: the filter's default decides.
    Default(DefaultAction),
}

/// A [`Decision`] and the rule that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    /// What the rules say.
    pub decision: Decision,
    /// The deciding rule's line and stable id; `None` when the default decided.
    pub rule: Option<RuleRef>,
}

impl Decision {
    /// Whether the packet passes.
    pub fn admits(&self) -> bool {
        match self {
            Decision::Accept { .. } | Decision::AuditDeny { .. } => true,
            Decision::Deny { .. } => false,
            Decision::Default(action) => *action == DefaultAction::AuditDeny,
        }
    }
}

impl Filter {
    /// Compiles `filter`. `Protocol::Other(6)` and friends are folded into
    /// their named protocols; an empty `protocols` list means TCP, UDP and
    /// ICMP. An empty `ports` list matches no TCP or UDP port (to match all,
    /// a rule says [`PortRange::ANY`]).
    ///
    /// A non-first fragment carries no port: an accept rule admits it only
    /// when the rule admits every port, while a deny rule (enforced or
    /// audit) matches it when the rule names any port, so that fragments
    /// fail closed.
    pub fn new(filter: &PacketFilter) -> Self {
        let mut builders = Builders::default();
        for (index, rule) in filter.rules.iter().enumerate() {
            let protocols: &[Protocol] = if rule.protocols.is_empty() {
                &Protocol::DEFAULT
            } else {
                &rule.protocols
            };
            let mut seen: Vec<Protocol> = Vec::with_capacity(protocols.len());
            for protocol in protocols.iter().map(|p| normalise(*p)) {
                if !seen.contains(&protocol) {
                    seen.push(protocol);
                    builders.add(protocol, index, rule);
                }
            }
        }
        let mut compiled = builders.build(filter.default);
        compiled.ids = filter.rules.iter().map(|rule| rule.rule_id).collect();
        compiled
    }

    /// What the rules decide about `query`.
    pub fn evaluate(&self, query: &Query) -> Decision {
        self.decide(query).decision
    }

    /// What the rules decide about `query`, and which rule decided.
    pub fn decide(&self, query: &Query) -> Decided {
        let buckets: &[DstBucket] = match query.protocol {
            Protocol::Tcp => &self.tcp,
            Protocol::Udp => &self.udp,
            Protocol::Icmp => &self.icmp,
            Protocol::Other(n) => self
                .other
                .iter()
                .find(|(number, _)| *number == n)
                .map_or(&[], |(_, buckets)| buckets.as_slice()),
        };
        let mut best: Option<Candidate> = None;
        for bucket in buckets.iter().filter(|b| b.dst.contains(&query.dst)) {
            if let Some(found) = bucket.lookup(query.src, query.dst_port) {
                best = Some(best.map_or(found, |b| b.better(found)));
            }
        }
        match best {
            Some(candidate) => Decided {
                decision: candidate.decision(),
                rule: self.ids.get(candidate.index as usize).map(|&id| RuleRef {
                    line: candidate.policy_line,
                    id,
                }),
            },
            None => Decided {
                decision: Decision::Default(self.default),
                rule: None,
            },
        }
    }
}

/// A matching rule, ordered by precedence: enforced deny, then audit deny,
/// then accept; among equals the earlier rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    rank: u8,
    index: u32,
    policy_line: u32,
}

impl Candidate {
    fn new(action: RuleAction, index: usize, policy_line: u32) -> Self {
        let rank = match action {
            RuleAction::Deny => 2,
            RuleAction::AuditDeny => 1,
            RuleAction::Accept => 0,
        };
        Self {
            rank,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            policy_line,
        }
    }

    fn better(self, other: Self) -> Self {
        if (other.rank, std::cmp::Reverse(other.index)) > (self.rank, std::cmp::Reverse(self.index))
        {
            other
        } else {
            self
        }
    }

    fn decision(self) -> Decision {
        let policy_line = self.policy_line;
        match self.rank {
            2 => Decision::Deny { policy_line },
            1 => Decision::AuditDeny { policy_line },
            _ => Decision::Accept { policy_line },
        }
    }

    fn is_deny(self) -> bool {
        self.rank > 0
    }
}

/// The rules of one protocol for one destination prefix.
#[derive(Debug, Clone)]
struct DstBucket {
    dst: IpNet,
    /// Disjoint port segments, sorted by first port; for protocols without
    /// ports a single segment covering every port.
    segments: Vec<(PortRange, Sources)>,
    /// What matches a packet without a port (a non-first fragment).
    portless: Sources,
}

impl DstBucket {
    fn lookup(&self, src: IpAddr, port: Option<u16>) -> Option<Candidate> {
        let Some(port) = port else {
            return self.portless.lookup(src);
        };
        let at = self
            .segments
            .partition_point(|(range, _)| range.last < port);
        match self.segments.get(at) {
            Some((range, sources)) if range.contains(port) => sources.lookup(src),
            _ => None,
        }
    }
}

/// Source prefixes of the rules covering one segment: for each prefix
/// length in use, the best candidate per network.
#[derive(Debug, Clone, Default)]
struct Sources {
    by_length: Vec<(u8, AHashMap<IpAddr, Candidate>)>,
}

impl Sources {
    fn insert(&mut self, net: IpNet, candidate: Candidate) {
        let length = net.prefix_len();
        let at = match self.by_length.iter().position(|(l, _)| *l == length) {
            Some(at) => at,
            None => {
                self.by_length.push((length, AHashMap::default()));
                self.by_length.len() - 1
            }
        };
        let map = &mut self.by_length[at].1;
        let slot = map.entry(net.network()).or_insert(candidate);
        *slot = slot.better(candidate);
    }

    fn lookup(&self, src: IpAddr) -> Option<Candidate> {
        let mut best: Option<Candidate> = None;
        for (length, map) in &self.by_length {
            let Some(network) = truncate(src, *length) else {
                continue;
            };
            if let Some(found) = map.get(&network) {
                best = Some(best.map_or(*found, |b| b.better(*found)));
            }
        }
        best
    }

    fn is_empty(&self) -> bool {
        self.by_length.is_empty()
    }
}

/// `addr` with its bits past `length` cleared, or `None` when `length` is
/// too long for its family. IPv4 and IPv6 prefixes share one list of
/// lengths; the map keys carry the family, so a cross-family probe misses.
fn truncate(addr: IpAddr, length: u8) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(v4) if length <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0);
            Some(IpAddr::V4((u32::from(v4) & mask).into()))
        }
        IpAddr::V6(v6) if length <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0);
            Some(IpAddr::V6((u128::from(v6) & mask).into()))
        }
        _ => None,
    }
}

/// Rules gathered per protocol and destination, before segmenting.
#[derive(Debug, Default)]
struct Builders {
    tcp: ByDst,
    udp: ByDst,
    icmp: ByDst,
    other: Vec<(u8, ByDst)>,
}

/// Entries grouped by destination prefix.
type ByDst = Vec<(IpNet, Vec<Entry>)>;

/// One rule under one destination prefix.
#[derive(Debug, Clone)]
struct Entry {
    src: Vec<IpNet>,
    /// Sorted, merged; `[ANY]` for protocols without ports.
    ports: Vec<PortRange>,
    candidate: Candidate,
}

impl Builders {
    fn add(&mut self, protocol: Protocol, index: usize, rule: &FilterRule) {
        let has_ports = matches!(protocol, Protocol::Tcp | Protocol::Udp);
        let entry = Entry {
            src: rule.src.iter().map(IpNet::trunc).collect(),
            ports: if has_ports {
                merge(&rule.ports)
            } else {
                vec![PortRange::ANY]
            },
            candidate: Candidate::new(rule.action, index, rule.policy_line),
        };
        let list = match protocol {
            Protocol::Tcp => &mut self.tcp,
            Protocol::Udp => &mut self.udp,
            Protocol::Icmp => &mut self.icmp,
            Protocol::Other(n) => {
                let at = match self.other.iter().position(|(number, _)| *number == n) {
                    Some(at) => at,
                    None => {
                        self.other.push((n, Vec::new()));
                        self.other.len() - 1
                    }
                };
                &mut self.other[at].1
            }
        };
        let mut dsts: Vec<IpNet> = rule.dst.iter().map(IpNet::trunc).collect();
        dsts.sort();
        dsts.dedup();
        for dst in dsts {
            match list.iter_mut().find(|(d, _)| *d == dst) {
                Some((_, entries)) => entries.push(entry.clone()),
                None => list.push((dst, vec![entry.clone()])),
            }
        }
    }

    fn build(self, default: DefaultAction) -> Filter {
        let buckets = |list: ByDst| -> Vec<DstBucket> {
            list.into_iter()
                .map(|(dst, entries)| segment(dst, &entries))
                .collect()
        };
        Filter {
            tcp: buckets(self.tcp),
            udp: buckets(self.udp),
            icmp: buckets(self.icmp),
            other: self
                .other
                .into_iter()
                .map(|(n, list)| (n, buckets(list)))
                .collect(),
            default,
            ids: Vec::new(),
        }
    }
}

/// Cuts the entries' port ranges into disjoint segments.
fn segment(dst: IpNet, entries: &[Entry]) -> DstBucket {
    // Every boundary where the set of covering rules may change.
    let mut starts: Vec<u32> = Vec::new();
    for entry in entries {
        for range in &entry.ports {
            starts.push(u32::from(range.first));
            starts.push(u32::from(range.last) + 1);
        }
    }
    starts.sort_unstable();
    starts.dedup();
    let mut segments: Vec<(PortRange, Sources)> = Vec::new();
    for pair in starts.windows(2) {
        let (Ok(first), Ok(last)) = (u16::try_from(pair[0]), u16::try_from(pair[1] - 1)) else {
            continue;
        };
        let range = PortRange { first, last };
        let mut sources = Sources::default();
        for entry in entries {
            if entry.ports.iter().any(|r| r.contains(first)) {
                for net in &entry.src {
                    sources.insert(*net, entry.candidate);
                }
            }
        }
        if !sources.is_empty() {
            segments.push((range, sources));
        }
    }
    let mut portless = Sources::default();
    for entry in entries {
        let matches = if entry.candidate.is_deny() {
            !entry.ports.is_empty()
        } else {
            entry.ports.first() == Some(&PortRange::ANY)
        };
        if matches {
            for net in &entry.src {
                portless.insert(*net, entry.candidate);
            }
        }
    }
    DstBucket {
        dst,
        segments,
        portless,
    }
}

/// Folds protocol numbers that have a name into the name, so `Other(6)` is TCP.
fn normalise(protocol: Protocol) -> Protocol {
    match protocol {
        Protocol::Other(n) => Protocol::from_number(n),
        named => named,
    }
}

/// Sorts ranges and merges overlapping or adjacent ones; drops inverted ranges.
fn merge(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut sorted: Vec<PortRange> = ranges
        .iter()
        .copied()
        .filter(|r| r.first <= r.last)
        .collect();
    sorted.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(range.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3));
    const SELF4: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    const SELF6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 1));

    fn rule(
        src: &str,
        dst: &str,
        ports: &[(u16, u16)],
        protocols: &[Protocol],
        line: u32,
    ) -> FilterRule {
        FilterRule {
            src: vec![src.parse().unwrap()],
            dst: vec![dst.parse().unwrap()],
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocols: protocols.to_vec(),
            policy_line: line,
            rule_id: weft_proto::RuleId::default(),
            action: RuleAction::Accept,
        }
    }

    fn with(action: RuleAction, rule: FilterRule) -> FilterRule {
        FilterRule { action, ..rule }
    }

    fn filter(rules: Vec<FilterRule>) -> Filter {
        Filter::new(&PacketFilter {
            rules,
            default: DefaultAction::Deny,
        })
    }

    fn query(protocol: Protocol, src: IpAddr, dst: IpAddr, dst_port: Option<u16>) -> Query {
        Query {
            protocol,
            src,
            dst,
            dst_port,
        }
    }

    const NONE: Decision = Decision::Default(DefaultAction::Deny);

    fn accept(policy_line: u32) -> Decision {
        Decision::Accept { policy_line }
    }

    #[test]
    fn the_decision_names_the_deciding_rule_by_line_and_id() {
        let id = |text: &str| RuleId::of_text(text);
        let web = FilterRule {
            rule_id: id("web"),
            ..rule("100.64.0.0/24", "100.64.0.1/32", &[(80, 80)], &[], 3)
        };
        let ssh = FilterRule {
            rule_id: id("no ssh"),
            ..with(
                RuleAction::Deny,
                rule("100.64.0.2/32", "100.64.0.1/32", &[(22, 22)], &[], 9),
            )
        };
        let f = filter(vec![web, ssh]);
        let decided = f.decide(&query(Protocol::Tcp, PEER, SELF4, Some(80)));
        assert_eq!(decided.decision, accept(3));
        assert_eq!(
            decided.rule,
            Some(RuleRef {
                line: 3,
                id: id("web")
            })
        );
        let decided = f.decide(&query(Protocol::Tcp, PEER, SELF4, Some(22)));
        assert_eq!(decided.decision, Decision::Deny { policy_line: 9 });
        assert_eq!(decided.rule.map(|r| r.id), Some(id("no ssh")));
        let decided = f.decide(&query(Protocol::Udp, PEER, SELF4, Some(53)));
        assert_eq!((decided.decision, decided.rule), (NONE, None));
    }

    #[test]
    fn no_rules_leave_it_to_the_default() {
        let deny = filter(vec![]);
        let audit = Filter::new(&PacketFilter {
            rules: vec![],
            default: DefaultAction::AuditDeny,
        });
        for protocol in [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Other(47),
        ] {
            let q = query(protocol, PEER, SELF4, Some(22));
            assert_eq!(deny.evaluate(&q), NONE);
            assert!(!deny.evaluate(&q).admits());
            assert_eq!(
                audit.evaluate(&q),
                Decision::Default(DefaultAction::AuditDeny)
            );
            assert!(audit.evaluate(&q).admits());
        }
    }

    #[test]
    fn a_rule_matches_on_source_destination_protocol_and_port() {
        let f = filter(vec![rule(
            "100.64.0.2/32",
            "100.64.0.1/32",
            &[(22, 22)],
            &[Protocol::Tcp],
            7,
        )]);
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(22))),
            accept(7)
        );
        for q in [
            query(Protocol::Tcp, OTHER, SELF4, Some(22)),
            query(Protocol::Tcp, PEER, OTHER, Some(22)),
            query(Protocol::Tcp, PEER, SELF4, Some(23)),
            query(Protocol::Udp, PEER, SELF4, Some(22)),
            query(Protocol::Tcp, PEER, SELF6, Some(22)),
        ] {
            assert_eq!(f.evaluate(&q), NONE, "{q:?}");
        }
    }

    #[test]
    fn deny_beats_audit_beats_accept_whatever_the_order() {
        let any = || rule("0.0.0.0/0", "100.64.0.1/32", &[(0, 65535)], &[], 1);
        let narrow = || rule("100.64.0.2/32", "100.64.0.1/32", &[(22, 22)], &[], 2);
        let f = filter(vec![
            any(),
            with(
                RuleAction::AuditDeny,
                rule("100.64.0.0/24", "0.0.0.0/0", &[(20, 30)], &[], 3),
            ),
            with(RuleAction::Deny, narrow()),
        ]);
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(22))),
            Decision::Deny { policy_line: 2 }
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, OTHER, SELF4, Some(22))),
            Decision::AuditDeny { policy_line: 3 }
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, OTHER, SELF4, Some(80))),
            accept(1)
        );
    }

    #[test]
    fn empty_protocols_mean_tcp_udp_and_icmp() {
        let f = filter(vec![rule("0.0.0.0/0", "0.0.0.0/0", &[(0, 65535)], &[], 1)]);
        assert!(f
            .evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(1)))
            .admits());
        assert!(f
            .evaluate(&query(Protocol::Udp, PEER, SELF4, Some(1)))
            .admits());
        assert!(f
            .evaluate(&query(Protocol::Icmp, PEER, SELF4, None))
            .admits());
        assert!(!f
            .evaluate(&query(Protocol::Other(47), PEER, SELF4, None))
            .admits());
    }

    #[test]
    fn icmp_matches_on_addresses_alone() {
        let f = filter(vec![rule(
            "100.64.0.2/32",
            "100.64.0.1/32",
            &[],
            &[Protocol::Icmp],
            3,
        )]);
        assert_eq!(
            f.evaluate(&query(Protocol::Icmp, PEER, SELF4, None)),
            accept(3)
        );
        assert_eq!(f.evaluate(&query(Protocol::Icmp, OTHER, SELF4, None)), NONE);
    }

    #[test]
    fn empty_ports_admit_no_tcp_or_udp() {
        let f = filter(vec![rule("0.0.0.0/0", "0.0.0.0/0", &[], &[], 1)]);
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(80))),
            NONE
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Udp, PEER, SELF4, Some(80))),
            NONE
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Icmp, PEER, SELF4, None)),
            accept(1)
        );
    }

    #[test]
    fn fragments_need_an_accept_for_every_port_and_meet_any_deny() {
        let some = filter(vec![rule(
            "0.0.0.0/0",
            "0.0.0.0/0",
            &[(1, 65535)],
            &[Protocol::Udp],
            1,
        )]);
        assert_eq!(
            some.evaluate(&query(Protocol::Udp, PEER, SELF4, None)),
            NONE
        );
        let split = filter(vec![rule(
            "0.0.0.0/0",
            "0.0.0.0/0",
            &[(0, 999), (1000, 65535)],
            &[Protocol::Udp],
            2,
        )]);
        assert_eq!(
            split.evaluate(&query(Protocol::Udp, PEER, SELF4, None)),
            accept(2)
        );
        let denied = filter(vec![
            rule("0.0.0.0/0", "0.0.0.0/0", &[(0, 65535)], &[Protocol::Udp], 2),
            with(
                RuleAction::Deny,
                rule("0.0.0.0/0", "0.0.0.0/0", &[(53, 53)], &[Protocol::Udp], 3),
            ),
        ]);
        assert_eq!(
            denied.evaluate(&query(Protocol::Udp, PEER, SELF4, None)),
            Decision::Deny { policy_line: 3 }
        );
    }

    #[test]
    fn numbered_protocols_fold_into_named_ones() {
        let f = filter(vec![rule(
            "0.0.0.0/0",
            "0.0.0.0/0",
            &[(80, 80)],
            &[Protocol::Other(6), Protocol::Other(47)],
            4,
        )]);
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(80))),
            accept(4)
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Other(47), PEER, SELF4, None)),
            accept(4)
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Other(50), PEER, SELF4, None)),
            NONE
        );
    }

    #[test]
    fn the_first_matching_rule_of_an_action_names_the_policy_line() {
        let f = filter(vec![
            rule(
                "100.64.0.0/24",
                "100.64.0.1/32",
                &[(22, 22)],
                &[Protocol::Tcp],
                10,
            ),
            rule(
                "100.64.0.2/32",
                "100.64.0.1/32",
                &[(0, 65535)],
                &[Protocol::Tcp],
                11,
            ),
        ]);
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(22))),
            accept(10)
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(443))),
            accept(11)
        );
    }

    #[test]
    fn prefixes_of_every_length_match_both_families() {
        let f = filter(vec![
            rule("0.0.0.0/0", "0.0.0.0/0", &[(1, 1)], &[Protocol::Tcp], 1),
            rule("::/0", "::/0", &[(1, 1)], &[Protocol::Tcp], 2),
            rule(
                "100.64.0.0/10",
                "100.64.0.1/32",
                &[(2, 2)],
                &[Protocol::Tcp],
                3,
            ),
            rule("fd7a::/16", "fd7a::1/128", &[(2, 2)], &[Protocol::Tcp], 4),
        ]);
        let v6peer: IpAddr = "fd7a::2".parse().unwrap();
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(1))),
            accept(1)
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, v6peer, SELF6, Some(1))),
            accept(2)
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(2))),
            accept(3)
        );
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, v6peer, SELF6, Some(2))),
            accept(4)
        );
        let outside: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            f.evaluate(&query(Protocol::Tcp, outside, SELF4, Some(2))),
            NONE
        );
    }

    #[test]
    fn port_ranges_are_merged() {
        let ranges = [
            (10, 20),
            (15, 30),
            (31, 40),
            (50, 60),
            (9, 1),
            (u16::MAX, u16::MAX),
        ];
        let ranges: Vec<PortRange> = ranges
            .iter()
            .map(|&(first, last)| PortRange { first, last })
            .collect();
        let merged: Vec<(u16, u16)> = merge(&ranges).iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(merged, vec![(10, 40), (50, 60), (u16::MAX, u16::MAX)]);
    }
}
