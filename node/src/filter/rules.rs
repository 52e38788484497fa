//! The netmap's allow rules, compiled for fast lookups.

use std::net::IpAddr;

use ipnet::IpNet;
use weft_proto::{FilterRule, PortRange, Protocol};

/// A compiled, immutable rule set: default deny, each rule an allow.
///
/// Rules are bucketed by protocol, so a query scans only the rules that can
/// apply to its protocol; a query never allocates.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    tcp: Vec<Rule>,
    udp: Vec<Rule>,
    icmp: Vec<Rule>,
    other: Vec<(u8, Rule)>,
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
    /// Destination port for TCP and UDP; `None` for a non-first fragment,
    /// which only a rule admitting every port can match.
    pub dst_port: Option<u16>,
}

impl Filter {
    /// Compiles `rules`. `Protocol::Other(6)` and friends are folded into
    /// their named protocols; an empty `protocols` list means TCP, UDP and
    /// ICMP. An empty `ports` list admits no TCP or UDP port (to admit all,
    /// a rule says [`PortRange::ANY`]).
    pub fn new(rules: &[FilterRule]) -> Self {
        let mut filter = Self::default();
        for rule in rules {
            let compiled = Rule::compile(rule);
            let protocols: &[Protocol] = if rule.protocols.is_empty() {
                &Protocol::DEFAULT
            } else {
                &rule.protocols
            };
            let mut seen: Vec<Protocol> = Vec::with_capacity(protocols.len());
            for protocol in protocols.iter().map(|p| normalise(*p)) {
                if seen.contains(&protocol) {
                    continue;
                }
                seen.push(protocol);
                match protocol {
                    Protocol::Tcp => filter.tcp.push(compiled.clone()),
                    Protocol::Udp => filter.udp.push(compiled.clone()),
                    Protocol::Icmp => filter.icmp.push(compiled.clone()),
                    Protocol::Other(n) => filter.other.push((n, compiled.clone())),
                }
            }
        }
        filter
    }

    /// The policy line of the first rule that admits `query`, or `None` (deny).
    pub fn evaluate(&self, query: &Query) -> Option<u32> {
        let addresses = |rule: &Rule| rule.admits_addresses(query.src, query.dst);
        match query.protocol {
            Protocol::Tcp | Protocol::Udp => {
                let bucket = if query.protocol == Protocol::Tcp {
                    &self.tcp
                } else {
                    &self.udp
                };
                bucket
                    .iter()
                    .find(|rule| addresses(rule) && rule.admits_port(query.dst_port))
                    .map(|rule| rule.policy_line)
            }
            Protocol::Icmp => self
                .icmp
                .iter()
                .find(|r| addresses(r))
                .map(|r| r.policy_line),
            Protocol::Other(n) => self
                .other
                .iter()
                .find(|(number, rule)| *number == n && addresses(rule))
                .map(|(_, rule)| rule.policy_line),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    src: Vec<IpNet>,
    dst: Vec<IpNet>,
    /// Sorted, merged ranges.
    ports: Vec<PortRange>,
    policy_line: u32,
}

impl Rule {
    fn compile(rule: &FilterRule) -> Self {
        Self {
            src: rule.src.iter().map(IpNet::trunc).collect(),
            dst: rule.dst.iter().map(IpNet::trunc).collect(),
            ports: merge(&rule.ports),
            policy_line: rule.policy_line,
        }
    }

    fn admits_addresses(&self, src: IpAddr, dst: IpAddr) -> bool {
        self.src.iter().any(|net| net.contains(&src))
            && self.dst.iter().any(|net| net.contains(&dst))
    }

    fn admits_port(&self, port: Option<u16>) -> bool {
        match port {
            Some(port) => self.ports.iter().any(|range| range.contains(port)),
            None => self.ports.first() == Some(&PortRange::ANY),
        }
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
    use weft_proto::RuleAction;

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
            action: RuleAction::Accept,
        }
    }

    fn query(protocol: Protocol, src: IpAddr, dst: IpAddr, dst_port: Option<u16>) -> Query {
        Query {
            protocol,
            src,
            dst,
            dst_port,
        }
    }

    #[test]
    fn no_rules_admit_nothing() {
        let filter = Filter::new(&[]);
        for protocol in [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::Other(47),
        ] {
            assert_eq!(
                filter.evaluate(&query(protocol, PEER, SELF4, Some(22))),
                None
            );
        }
    }

    #[test]
    fn a_rule_matches_on_source_destination_protocol_and_port() {
        let filter = Filter::new(&[rule(
            "100.64.0.2/32",
            "100.64.0.1/32",
            &[(22, 22)],
            &[Protocol::Tcp],
            7,
        )]);
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(22))),
            Some(7)
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, OTHER, SELF4, Some(22))),
            None
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, OTHER, Some(22))),
            None
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(23))),
            None
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Udp, PEER, SELF4, Some(22))),
            None
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF6, Some(22))),
            None
        );
    }

    #[test]
    fn empty_protocols_mean_tcp_udp_and_icmp() {
        let filter = Filter::new(&[rule("0.0.0.0/0", "0.0.0.0/0", &[(0, 65535)], &[], 1)]);
        assert!(filter
            .evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(1)))
            .is_some());
        assert!(filter
            .evaluate(&query(Protocol::Udp, PEER, SELF4, Some(1)))
            .is_some());
        assert!(filter
            .evaluate(&query(Protocol::Icmp, PEER, SELF4, None))
            .is_some());
        assert!(filter
            .evaluate(&query(Protocol::Other(47), PEER, SELF4, None))
            .is_none());
    }

    #[test]
    fn icmp_matches_on_addresses_alone() {
        let filter = Filter::new(&[rule(
            "100.64.0.2/32",
            "100.64.0.1/32",
            &[],
            &[Protocol::Icmp],
            3,
        )]);
        assert_eq!(
            filter.evaluate(&query(Protocol::Icmp, PEER, SELF4, None)),
            Some(3)
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Icmp, OTHER, SELF4, None)),
            None
        );
    }

    #[test]
    fn empty_ports_admit_no_tcp_or_udp() {
        let filter = Filter::new(&[rule("0.0.0.0/0", "0.0.0.0/0", &[], &[], 1)]);
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(80))),
            None
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Udp, PEER, SELF4, Some(80))),
            None
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Icmp, PEER, SELF4, None)),
            Some(1)
        );
    }

    #[test]
    fn fragments_need_a_rule_for_every_port() {
        let some = Filter::new(&[rule(
            "0.0.0.0/0",
            "0.0.0.0/0",
            &[(1, 65535)],
            &[Protocol::Udp],
            1,
        )]);
        assert_eq!(
            some.evaluate(&query(Protocol::Udp, PEER, SELF4, None)),
            None
        );
        let split = Filter::new(&[rule(
            "0.0.0.0/0",
            "0.0.0.0/0",
            &[(0, 999), (1000, 65535)],
            &[Protocol::Udp],
            2,
        )]);
        assert_eq!(
            split.evaluate(&query(Protocol::Udp, PEER, SELF4, None)),
            Some(2)
        );
    }

    #[test]
    fn numbered_protocols_fold_into_named_ones() {
        let filter = Filter::new(&[rule(
            "0.0.0.0/0",
            "0.0.0.0/0",
            &[(80, 80)],
            &[Protocol::Other(6), Protocol::Other(47)],
            4,
        )]);
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(80))),
            Some(4)
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Other(47), PEER, SELF4, None)),
            Some(4)
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Other(50), PEER, SELF4, None)),
            None
        );
    }

    #[test]
    fn the_first_matching_rule_names_the_policy_line() {
        let filter = Filter::new(&[
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
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(22))),
            Some(10)
        );
        assert_eq!(
            filter.evaluate(&query(Protocol::Tcp, PEER, SELF4, Some(443))),
            Some(11)
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
