//! Compiles the rules for a concrete set of nodes: each node's peers and inbound filter.
//!
//! Nodes are indexed by tag, by user and by address once, so each rule costs
//! time proportional to the nodes it concerns, not to all nodes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use weft_proto::{FilterRule, Identity, NodeId, PortRange, RuleAction};

use crate::ports::normalize;
use crate::rules::{Rule, Target};

/// A node as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Stable id; expected to be unique among the nodes compiled together.
    pub id: NodeId,
    /// Unique name in the overlay.
    pub name: String,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Tags, or the owning user for an untagged node.
    pub identity: Identity,
}

/// What every node may do, keyed by node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// One entry for every node compiled, including those no rule concerns.
    pub nodes: BTreeMap<NodeId, NodeAccess>,
}

/// One node's share of the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAccess {
    /// Every node this one may reach or be reached by (excluding itself).
    pub peers: BTreeSet<NodeId>,
    /// Inbound allow rules for this node's own addresses (`dst` = this node's
    /// addresses as /32 and /128, `src` = the prefixes of the admitted source
    /// nodes, hosts and CIDRs, `policy_line` = the acls entry's line).
    pub filter: Vec<FilterRule>,
}

/// Compiles `rules` for `nodes`.
pub(crate) fn compile(rules: &[Rule], nodes: &[NodeInfo]) -> Compiled {
    let index = Index::new(nodes);
    let mut access: Vec<NodeAccess> = vec![NodeAccess::default(); nodes.len()];
    let mut linked: HashSet<(Vec<usize>, Vec<usize>)> = HashSet::new();
    for rule in rules {
        let (src_nodes, src_nets) = index.sources(rule);
        if src_nets.is_empty() {
            continue;
        }
        let targets = index.destinations(rule);
        for (&node, grants) in &targets {
            for (dst, ports) in grants {
                access[node].filter.push(FilterRule {
                    src: src_nets.clone(),
                    dst: dst.clone(),
                    ports: normalize(ports.clone()),
                    protocols: rule.protocols.clone(),
                    action: RuleAction::Accept,
                    policy_line: rule.line,
                });
            }
        }
        let dst_nodes: Vec<usize> = targets.keys().copied().collect();
        if linked.insert((src_nodes.clone(), dst_nodes.clone())) {
            for &d in &dst_nodes {
                for &s in &src_nodes {
                    if nodes[s].id != nodes[d].id {
                        access[d].peers.insert(nodes[s].id);
                        access[s].peers.insert(nodes[d].id);
                    }
                }
            }
        }
    }
    let mut compiled = Compiled::default();
    for (node, mut node_access) in nodes.iter().zip(access) {
        node_access.filter.dedup();
        let entry: &mut NodeAccess = compiled.nodes.entry(node.id).or_default();
        entry.peers.extend(node_access.peers);
        entry.filter.extend(node_access.filter);
    }
    compiled
}

/// The source prefixes of `*`.
const EVERY_V4: IpNet = IpNet::new_assert(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
const EVERY_V6: IpNet = IpNet::new_assert(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

/// Per destination node: (its addresses the rule covers, ports) pairs, merged by address set.
type Grants = BTreeMap<usize, Vec<(Vec<IpNet>, Vec<PortRange>)>>;

struct Index<'n> {
    nodes: &'n [NodeInfo],
    by_tag: HashMap<&'n str, Vec<usize>>,
    /// Untagged nodes only: a tagged node is matched by its tags alone.
    by_user: HashMap<&'n str, Vec<usize>>,
    by_addr: BTreeMap<IpAddr, Vec<usize>>,
}

impl<'n> Index<'n> {
    fn new(nodes: &'n [NodeInfo]) -> Self {
        let mut index = Index {
            nodes,
            by_tag: HashMap::new(),
            by_user: HashMap::new(),
            by_addr: BTreeMap::new(),
        };
        for (i, node) in nodes.iter().enumerate() {
            if node.identity.tags.is_empty() {
                if let Some(user) = &node.identity.user {
                    index.by_user.entry(user).or_default().push(i);
                }
            }
            for tag in &node.identity.tags {
                index.by_tag.entry(tag).or_default().push(i);
            }
            for addr in &node.addresses {
                index.by_addr.entry(*addr).or_default().push(i);
            }
        }
        index
    }

    /// The nodes a target covers, sorted and unique.
    fn matching(&self, target: &Target) -> Vec<usize> {
        let mut found: Vec<usize> = match target {
            Target::Any => (0..self.nodes.len()).collect(),
            Target::User(user) => self.by_user.get(user.as_str()).cloned().unwrap_or_default(),
            Target::Group { members, .. } => members
                .iter()
                .filter_map(|m| self.by_user.get(m.as_str()))
                .flatten()
                .copied()
                .collect(),
            Target::Tag(tag) => self.by_tag.get(tag.as_str()).cloned().unwrap_or_default(),
            Target::Prefix(net) => self
                .by_addr
                .range(net.network()..=net.broadcast())
                .flat_map(|(_, nodes)| nodes.iter().copied())
                .collect(),
        };
        found.sort_unstable();
        found.dedup();
        found
    }

    /// The nodes a rule's `src` covers, and the source prefixes its filters admit.
    fn sources(&self, rule: &Rule) -> (Vec<usize>, Vec<IpNet>) {
        let mut nodes = Vec::new();
        let mut nets = Vec::new();
        for target in &rule.src {
            let matched = self.matching(target);
            match target {
                Target::Any => {
                    nets.extend([EVERY_V4, EVERY_V6]);
                }
                Target::Prefix(net) => nets.push(*net),
                Target::User(_) | Target::Group { .. } | Target::Tag(_) => {
                    nets.extend(
                        matched
                            .iter()
                            .flat_map(|&i| self.nodes[i].addresses.iter().map(|a| IpNet::from(*a))),
                    );
                }
            }
            nodes.extend(matched);
        }
        nodes.sort_unstable();
        nodes.dedup();
        (nodes, IpNet::aggregate(&nets))
    }

    /// The nodes a rule's `dst` covers, with the addresses and ports it opens on each.
    fn destinations(&self, rule: &Rule) -> Grants {
        let mut grants = Grants::new();
        for dst in &rule.dst {
            for node in self.matching(&dst.target) {
                let addresses = self.nodes[node].addresses.iter();
                let covered: Vec<IpNet> = match &dst.target {
                    Target::Prefix(net) => addresses
                        .filter(|a| net.contains(*a))
                        .map(|a| IpNet::from(*a))
                        .collect(),
                    _ => addresses.map(|a| IpNet::from(*a)).collect(),
                };
                if covered.is_empty() {
                    continue;
                }
                let node_grants = grants.entry(node).or_default();
                match node_grants.iter_mut().find(|(addrs, _)| *addrs == covered) {
                    Some((_, ports)) => ports.extend(dst.ports.iter().copied()),
                    None => node_grants.push((covered, dst.ports.clone())),
                }
            }
        }
        grants
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;
    use weft_proto::Protocol;

    use super::*;
    use crate::ports::has_ports;
    use crate::Policy;

    fn node(id: u64, identity: Identity) -> NodeInfo {
        let n = u8::try_from(id).unwrap();
        NodeInfo {
            id: NodeId(id),
            name: format!("node{id}"),
            addresses: vec![
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, n)),
                IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, u16::from(n))),
            ],
            identity,
        }
    }

    fn tagged(id: u64, tags: &[&str]) -> NodeInfo {
        node(
            id,
            Identity {
                user: Some("owner@example.com".into()),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    fn user(id: u64, login: &str) -> NodeInfo {
        node(
            id,
            Identity {
                user: Some(login.into()),
                tags: Vec::new(),
                ..Default::default()
            },
        )
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|&i| NodeId(i)).collect()
    }

    /// Whether a node's filter admits a packet, the way the node's packet filter reads it.
    fn allows(
        filter: &[FilterRule],
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        filter.iter().any(|r| {
            let protocol_ok = if r.protocols.is_empty() {
                Protocol::DEFAULT.contains(&protocol)
            } else {
                r.protocols.contains(&protocol)
            };
            r.src.iter().any(|n| n.contains(&src))
                && r.dst.iter().any(|n| n.contains(&dst))
                && protocol_ok
                && (!has_ports(protocol) || r.ports.iter().any(|p| p.contains(port)))
        })
    }

    fn compile(source: &str, nodes: &[NodeInfo]) -> Compiled {
        Policy::parse(source, "p").unwrap().compile(nodes)
    }

    const THREE: &str = r#"{
  "groups": {"group:eng": ["alice@example.com"]},
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443", "tag:web:8080"]},
  ],
}"#;

    #[test]
    fn three_nodes() {
        let nodes = [
            tagged(1, &["tag:web"]),
            tagged(2, &["tag:db"]),
            user(3, "alice@example.com"),
            user(4, "mallory@example.com"),
        ];
        let compiled = compile(THREE, &nodes);
        let web = &compiled.nodes[&NodeId(1)];
        let db = &compiled.nodes[&NodeId(2)];
        let alice = &compiled.nodes[&NodeId(3)];
        let mallory = &compiled.nodes[&NodeId(4)];

        assert_eq!(web.peers, ids(&[2, 3]));
        assert_eq!(db.peers, ids(&[1]), "db learns nothing about alice");
        assert_eq!(alice.peers, ids(&[1]), "alice learns nothing about db");
        assert_eq!(
            mallory,
            &NodeAccess::default(),
            "an unrelated node gets nothing"
        );

        assert_eq!(
            db.filter,
            [FilterRule {
                src: vec![net("100.64.0.1/32"), net("fd7a::1/128")],
                dst: vec![net("100.64.0.2/32"), net("fd7a::2/128")],
                ports: vec![PortRange {
                    first: 5432,
                    last: 5432
                }],
                protocols: vec![Protocol::Tcp],
                policy_line: 5,
                action: RuleAction::Accept,
            }]
        );
        assert_eq!(
            web.filter,
            [FilterRule {
                src: vec![net("100.64.0.3/32"), net("fd7a::3/128")],
                dst: vec![net("100.64.0.1/32"), net("fd7a::1/128")],
                ports: vec![
                    PortRange {
                        first: 80,
                        last: 80
                    },
                    PortRange {
                        first: 443,
                        last: 443
                    },
                    PortRange {
                        first: 8080,
                        last: 8080
                    },
                ],
                protocols: vec![],
                policy_line: 6,
                action: RuleAction::Accept,
            }]
        );
        assert!(alice.filter.is_empty(), "nothing may reach alice");
    }

    #[test]
    fn tagged_nodes_are_not_matched_by_their_user() {
        let source = r#"{"groups": {"group:eng": ["alice@example.com"]}, "acls": [
            {"action": "accept", "src": ["alice@example.com"], "dst": ["group:eng:22"]}]}"#;
        let nodes = [
            user(1, "alice@example.com"),
            node(
                2,
                Identity {
                    user: Some("alice@example.com".into()),
                    tags: vec!["tag:ci".into()],
                    ..Default::default()
                },
            ),
            user(3, "alice@example.com"),
        ];
        let compiled = compile(source, &nodes);
        assert_eq!(compiled.nodes[&NodeId(1)].peers, ids(&[3]));
        assert_eq!(compiled.nodes[&NodeId(3)].peers, ids(&[1]));
        assert_eq!(compiled.nodes[&NodeId(2)], NodeAccess::default());
        let filter = &compiled.nodes[&NodeId(1)].filter;
        assert_eq!(filter.len(), 1);
        assert_eq!(
            filter[0].src,
            vec![
                net("100.64.0.1/32"),
                net("100.64.0.3/32"),
                net("fd7a::1/128"),
                net("fd7a::3/128")
            ]
        );
    }

    #[test]
    fn hosts_and_cidrs() {
        let source = r#"{
  "tagOwners": {"tag:web": []},
  "hosts": {"office": "198.51.100.0/24", "pair": "100.64.0.0/31"},
  "acls": [
    {"action": "accept", "src": ["office", "100.64.0.5"], "dst": ["tag:web:443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["pair:9000", "fd7a::3/128:53"]},
  ],
}"#;
        let nodes = [
            user(1, "a@x"),
            tagged(2, &["tag:web"]),
            user(3, "b@x"),
            user(5, "c@x"),
        ];
        let compiled = compile(source, &nodes);
        let web = &compiled.nodes[&NodeId(2)];
        assert_eq!(
            web.filter[0].src,
            vec![net("100.64.0.5/32"), net("198.51.100.0/24")]
        );
        assert_eq!(web.peers, ids(&[1, 3, 5]));
        let office_host: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(allows(
            &web.filter,
            office_host,
            "100.64.0.2".parse().unwrap(),
            Protocol::Tcp,
            443
        ));
        assert!(!allows(
            &web.filter,
            office_host,
            "100.64.0.2".parse().unwrap(),
            Protocol::Tcp,
            80
        ));
        assert!(!allows(
            &web.filter,
            "203.0.113.1".parse().unwrap(),
            "100.64.0.2".parse().unwrap(),
            Protocol::Tcp,
            443
        ));

        // "pair" covers node 1's IPv4 address only; the CIDR dst covers node 3's IPv6 only.
        let one = &compiled.nodes[&NodeId(1)];
        assert_eq!(one.filter[0].dst, vec![net("100.64.0.1/32")]);
        assert_eq!(one.peers, ids(&[2]));
        let three = &compiled.nodes[&NodeId(3)];
        assert_eq!(three.filter[0].dst, vec![net("fd7a::3/128")]);
        assert_eq!(
            three.filter[0].ports,
            vec![PortRange {
                first: 53,
                last: 53
            }]
        );
        assert_eq!(
            compiled.nodes[&NodeId(5)].peers,
            ids(&[2]),
            "node 5 is admitted as a source by IP"
        );
        assert!(compiled.nodes[&NodeId(5)].filter.is_empty());
    }

    #[test]
    fn star_admits_every_address_and_every_node() {
        let source = r#"{"tagOwners": {"tag:db": []}, "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:db:5432"]}]}"#;
        let nodes = [
            tagged(1, &["tag:db"]),
            user(2, "a@x"),
            tagged(3, &["tag:other"]),
        ];
        let compiled = compile(source, &nodes);
        let db = &compiled.nodes[&NodeId(1)];
        assert_eq!(db.filter[0].src, vec![net("0.0.0.0/0"), net("::/0")]);
        assert_eq!(db.peers, ids(&[2, 3]));
        assert_eq!(compiled.nodes[&NodeId(2)].peers, ids(&[1]));
        assert!(allows(
            &db.filter,
            "203.0.113.9".parse().unwrap(),
            "fd7a::1".parse().unwrap(),
            Protocol::Udp,
            5432
        ));
    }

    #[test]
    fn empty_policy_compiles_to_nothing() {
        let nodes = [user(1, "a@x"), tagged(2, &["tag:x"])];
        let compiled = compile("{}", &nodes);
        assert_eq!(compiled.nodes.len(), 2);
        assert!(compiled
            .nodes
            .values()
            .all(|access| *access == NodeAccess::default()));
    }

    #[test]
    fn many_rules_and_nodes_compile_quickly() {
        // 100 services of 100 nodes each, 1,000 rules between them.
        let nodes: Vec<NodeInfo> = (0..10_000u32)
            .map(|i| {
                let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
                NodeInfo {
                    id: NodeId(u64::from(i)),
                    name: format!("n{i}"),
                    addresses: vec![IpAddr::V4(v4)],
                    identity: Identity {
                        user: None,
                        tags: vec![format!("tag:svc{}", i / 100)],
                        ..Default::default()
                    },
                }
            })
            .collect();
        let owners: Vec<String> = (0..100).map(|s| format!("\"tag:svc{s}\": []")).collect();
        let rules: Vec<String> = (0..1000)
            .map(|r| format!("{{\"action\": \"accept\", \"src\": [\"tag:svc{}\"], \"dst\": [\"tag:svc{}:{}\"]}}", r % 100, (r * 7 + 1) % 100, 1000 + r))
            .collect();
        let source = format!(
            "{{\"tagOwners\": {{{}}}, \"acls\": [{}]}}",
            owners.join(","),
            rules.join(",\n")
        );
        let policy = Policy::parse(&source, "p").unwrap();
        let started = Instant::now();
        let compiled = policy.compile(&nodes);
        let elapsed = started.elapsed();
        // Node 0 (svc0) is the source of rules 0, 100, … towards svc1 and the
        // destination of rules whose (r*7+1) % 100 == 0, from svc((r) % 100).
        let zero = &compiled.nodes[&NodeId(0)];
        assert_eq!(zero.filter.len(), 10);
        // Each source service's 100 consecutive addresses aggregate into a few prefixes.
        for rule in &zero.filter {
            let covered: u32 = rule.src.iter().map(|n| 1u32 << (32 - n.prefix_len())).sum();
            assert_eq!(covered, 100);
            assert!(rule.src.len() <= 8, "{:?}", rule.src);
        }
        assert_eq!(zero.peers.len(), 200);
        assert!(elapsed.as_secs() < 60, "compile took {elapsed:?}");
    }

    const SRCS: &[&str] = &[
        "*",
        "alice@x.com",
        "bob@x.com",
        "group:eng",
        "tag:web",
        "tag:db",
        "100.64.0.0/30",
        "lan",
        "fd7a::/125",
    ];
    const DSTS: &[&str] = &[
        "*",
        "alice@x.com",
        "group:eng",
        "tag:web",
        "tag:db",
        "100.64.0.2/31",
        "lan",
        "[fd7a::4]",
    ];
    const PORTS: &[&str] = &["*", "22", "80,443", "1000-2000"];
    const PROTOS: &[&str] = &["", "tcp", "udp", "icmp"];

    fn arb_rule() -> impl Strategy<Value = String> {
        (
            prop::sample::subsequence(SRCS, 1..3),
            prop::collection::vec(
                (prop::sample::select(DSTS), prop::sample::select(PORTS)),
                1..3,
            ),
            prop::sample::select(PROTOS),
        )
            .prop_map(|(src, dst, proto)| {
                let src: Vec<String> = src.iter().map(|s| format!("\"{s}\"")).collect();
                let dst: Vec<String> = dst
                    .iter()
                    .map(|(d, p)| format!("\"{d}:{}\"", if proto == "icmp" { "*" } else { p }))
                    .collect();
                let proto = if proto.is_empty() {
                    String::new()
                } else {
                    format!(", \"proto\": \"{proto}\"")
                };
                format!(
                    "{{\"action\": \"accept\", \"src\": [{}], \"dst\": [{}]{proto}}}",
                    src.join(","),
                    dst.join(",")
                )
            })
    }

    fn arb_node(id: u64) -> impl Strategy<Value = NodeInfo> {
        prop_oneof![
            Just(user(id, "alice@x.com")),
            Just(user(id, "bob@x.com")),
            Just(user(id, "carol@x.com")),
            Just(tagged(id, &["tag:web"])),
            Just(tagged(id, &["tag:db"])),
            Just(tagged(id, &["tag:web", "tag:db"])),
        ]
    }

    fn policy_text(rules: &[String]) -> String {
        format!(
            "{{\"groups\": {{\"group:eng\": [\"alice@x.com\", \"carol@x.com\"]}}, \"tagOwners\": {{\"tag:web\": [], \"tag:db\": []}},\n\"hosts\": {{\"lan\": \"100.64.0.4/30\"}},\n\"acls\": [\n{}\n]}}",
            rules.join(",\n")
        )
    }

    fn probes(nodes: &[NodeInfo]) -> Vec<(IpAddr, Protocol, u16)> {
        let mut srcs: Vec<IpAddr> = nodes.iter().flat_map(|n| n.addresses.clone()).collect();
        srcs.push("203.0.113.7".parse().unwrap());
        srcs.push("fd7a::ff".parse().unwrap());
        let mut probes = Vec::new();
        for src in srcs {
            for protocol in [
                Protocol::Tcp,
                Protocol::Udp,
                Protocol::Icmp,
                Protocol::Other(132),
            ] {
                for port in [22, 80, 443, 1500, 5432] {
                    probes.push((src, protocol, port));
                }
            }
        }
        probes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn removing_a_rule_never_allows_more(
            rules in prop::collection::vec(arb_rule(), 1..6),
            nodes in (1u64..7).prop_flat_map(|n| (1..=n).map(arb_node).collect::<Vec<_>>()),
            removed in any::<prop::sample::Index>(),
        ) {
            let full = compile(&policy_text(&rules), &nodes);
            let mut fewer_rules = rules.clone();
            fewer_rules.remove(removed.index(rules.len()));
            let fewer = compile(&policy_text(&fewer_rules), &nodes);
            let probes = probes(&nodes);
            for node in &nodes {
                let (with, without) = (&full.nodes[&node.id], &fewer.nodes[&node.id]);
                prop_assert!(without.peers.is_subset(&with.peers));
                prop_assert!(!with.peers.contains(&node.id));
                for &(src, protocol, port) in &probes {
                    for &dst in &node.addresses {
                        if allows(&without.filter, src, dst, protocol, port) {
                            prop_assert!(allows(&with.filter, src, dst, protocol, port));
                        }
                    }
                }
            }
        }

        #[test]
        fn peers_are_symmetric_and_follow_the_filters(
            rules in prop::collection::vec(arb_rule(), 0..6),
            nodes in (1u64..7).prop_flat_map(|n| (1..=n).map(arb_node).collect::<Vec<_>>()),
        ) {
            let compiled = compile(&policy_text(&rules), &nodes);
            for a in &nodes {
                for b in &nodes {
                    let a_sees_b = compiled.nodes[&a.id].peers.contains(&b.id);
                    prop_assert_eq!(a_sees_b, compiled.nodes[&b.id].peers.contains(&a.id));
                    // If b's filter admits a packet from a, they must be peers.
                    let admitted = probes(std::slice::from_ref(a)).iter().any(|&(src, protocol, port)| {
                        a.addresses.contains(&src)
                            && b.addresses.iter().any(|&dst| allows(&compiled.nodes[&b.id].filter, src, dst, protocol, port))
                    });
                    if admitted && a.id != b.id {
                        prop_assert!(a_sees_b, "{} admits {} but they are not peers", b.id, a.id);
                    }
                }
            }
        }
    }
}
