//! Compiles the rules for a concrete set of nodes: each node's peers, inbound filter and capabilities.
//!
//! Nodes are indexed by tag, user, group, workload and address once, so each
//! rule costs time proportional to the nodes it concerns, not to all nodes.
//! [`compile_for`] computes the access of only some nodes, for incremental
//! recompilation (see [`crate::Engine`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use weft_proto::{
    AppGrant, DefaultAction, FilterRule, Identity, NodeId, PacketFilter, PortRange, Protocol,
    RuleAction,
};

use crate::ports::{has_ports, normalize};
use crate::posture::{self, Posture};
use crate::rules::{DstTarget, Rule, Rules, Target};
use crate::selector::spiffe_matches;

/// A node as policy sees it.
///
/// Its JSON form, for a device list (`weft policy check --devices FILE`
/// reads an array of these):
/// `{"id": 7, "name": "web1", "addresses": ["100.64.0.7"], "identity":
/// {"user": null, "groups": [], "workload": null, "tags": ["tag:web"]},
/// "attributes": {"node:os": "linux"}}`; `attributes` may be left out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// Stable id; expected to be unique among the nodes compiled together.
    pub id: NodeId,
    /// Unique name in the overlay.
    pub name: String,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Who the node is: user and IdP groups, workload, or tags.
    pub identity: Identity,
    /// What the node reports about itself (`node:os`, `node:osVersion`,
    /// `node:clientVersion`, `custom:KEY`), for `srcPosture` conditions.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl NodeInfo {
    /// The node with its identity in canonical form, the form policy
    /// selectors are parsed into.
    pub fn into_canonical(mut self) -> NodeInfo {
        self.identity = self.identity.into_canonical();
        self
    }
}

/// `nodes` with identities in canonical form; borrowed when they are already.
pub(crate) fn canonical_nodes(nodes: &[NodeInfo]) -> Cow<'_, [NodeInfo]> {
    if nodes.iter().all(|n| n.identity.is_canonical()) {
        Cow::Borrowed(nodes)
    } else {
        Cow::Owned(
            nodes
                .iter()
                .cloned()
                .map(NodeInfo::into_canonical)
                .collect(),
        )
    }
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
    /// Inbound rules for this node's own addresses (`dst` = this node's
    /// addresses as /32 and /128, `src` = the prefixes of the source nodes,
    /// hosts and CIDRs, `policy_line` = the rule's line) and the default.
    pub filter: PacketFilter,
    /// Application capabilities that grants give sources on this node.
    pub capabilities: Vec<AppGrant>,
}

/// Compiles `rules` for all `nodes`.
pub(crate) fn compile(rules: &Rules, nodes: &[NodeInfo]) -> Compiled {
    let nodes = &*canonical_nodes(nodes);
    let mut compiled = Compiled::default();
    for (i, access) in compile_for(rules, nodes, None) {
        let entry = compiled.nodes.entry(nodes[i].id).or_default();
        entry.peers.extend(access.peers);
        entry.filter.rules.extend(access.filter.rules);
        entry.filter.default = access.filter.default;
        entry.capabilities.extend(access.capabilities);
    }
    compiled
}

/// Compiles the access of the nodes at the indices `only` (every node when `None`).
pub(crate) fn compile_for(
    rules: &Rules,
    nodes: &[NodeInfo],
    only: Option<&BTreeSet<usize>>,
) -> BTreeMap<usize, NodeAccess> {
    build(rules, nodes, only, true)
}

/// Like [`compile_for`], but leaves the peers empty: for nodes whose
/// filters and capabilities changed but whose peers are known.
pub(crate) fn compile_filters_for(
    rules: &Rules,
    nodes: &[NodeInfo],
    only: &BTreeSet<usize>,
) -> BTreeMap<usize, NodeAccess> {
    build(rules, nodes, Some(only), false)
}

fn build(
    rules: &Rules,
    nodes: &[NodeInfo],
    only: Option<&BTreeSet<usize>>,
    peers: bool,
) -> BTreeMap<usize, NodeAccess> {
    let index = Index::new(nodes);
    let wanted: Vec<bool> = match only {
        None => vec![true; nodes.len()],
        Some(only) => (0..nodes.len()).map(|i| only.contains(&i)).collect(),
    };
    let mut out = Builder {
        nodes,
        wanted: &wanted,
        only,
        peers,
        access: BTreeMap::new(),
        audits: BTreeMap::new(),
        linked: HashSet::new(),
    };
    for (i, node) in nodes.iter().enumerate() {
        if wanted[i] {
            let access = out.access.entry(i).or_default();
            if rules.audit {
                access.peers = nodes
                    .iter()
                    .map(|n| n.id)
                    .filter(|&id| id != node.id)
                    .collect();
                access.filter.default = DefaultAction::AuditDeny;
            }
        }
    }
    for rule in &rules.rules {
        out.rule(&index, rule, rules.audit);
    }
    for app in &rules.apps {
        if !out.concerns(&index, &app.src, app.dst.iter()) {
            continue;
        }
        let src = index.sources(&app.src, app.posture.as_deref());
        if src.nets.is_empty() {
            continue;
        }
        let mut per_node: BTreeMap<usize, Vec<IpNet>> = BTreeMap::new();
        for target in &app.dst {
            if *target == Target::SelfUser {
                for (login, members) in src.by_login(nodes) {
                    for &d in index.by_user.get(login).into_iter().flatten() {
                        per_node.entry(d).or_default().extend(src.nets_of(&members));
                    }
                }
            } else {
                for d in index.matching(target) {
                    per_node.entry(d).or_default().extend(&src.nets);
                }
            }
        }
        for (d, nets) in per_node {
            let Some(access) = out.wanted_access(d) else {
                continue;
            };
            let nets = IpNet::aggregate(&nets);
            for (name, values) in &app.caps {
                access.capabilities.push(AppGrant {
                    src: nets.clone(),
                    name: name.clone(),
                    values: values.clone(),
                    policy_line: app.line,
                });
            }
        }
    }
    out.finish()
}

/// The source prefixes of `*`.
const EVERY_V4: IpNet = IpNet::new_assert(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
const EVERY_V6: IpNet = IpNet::new_assert(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

/// Per destination node: (its addresses the rule covers, ports) pairs, merged by address set.
type Grants = BTreeMap<usize, Vec<(Vec<IpNet>, Vec<PortRange>)>>;

/// Accumulates the access of the wanted nodes.
struct Builder<'n, 'w> {
    nodes: &'n [NodeInfo],
    wanted: &'w [bool],
    only: Option<&'w BTreeSet<usize>>,
    /// Whether to compute peers at all.
    peers: bool,
    access: BTreeMap<usize, NodeAccess>,
    /// Audit-mode deny rules per node, intersected with its accepts at the end.
    audits: BTreeMap<usize, Vec<FilterRule>>,
    /// (sources, destinations) already made peers.
    linked: HashSet<(Vec<usize>, Vec<usize>)>,
}

impl Builder<'_, '_> {
    fn wanted_access(&mut self, node: usize) -> Option<&mut NodeAccess> {
        if self.wanted[node] {
            Some(self.access.entry(node).or_default())
        } else {
            None
        }
    }

    /// Whether a rule with these sources and destinations can concern a wanted node.
    fn concerns<'t>(
        &self,
        index: &Index<'_>,
        src: &[Target],
        mut dst: impl Iterator<Item = &'t Target>,
    ) -> bool {
        let Some(only) = self.only else {
            return true;
        };
        let touches = |target: &Target| match target {
            // The user nodes of any source user.
            Target::SelfUser => true,
            _ => index.matching(target).iter().any(|i| only.contains(i)),
        };
        src.iter().any(touches) || dst.any(touches)
    }

    fn rule(&mut self, index: &Index<'_>, rule: &Rule, file_audit: bool) {
        if !self.concerns(index, &rule.src, rule.dst.iter().map(|d| &d.target)) {
            return;
        }
        let src = index.sources(&rule.src, rule.posture.as_deref());
        if src.nets.is_empty() {
            return;
        }
        let (self_dsts, dsts): (Vec<&DstTarget>, Vec<&DstTarget>) =
            rule.dst.iter().partition(|d| d.target == Target::SelfUser);
        let grants = index.destinations(&dsts);
        for (&node, entries) in &grants {
            for (addrs, ports) in entries {
                self.push(
                    node,
                    rule,
                    src.nets.clone(),
                    addrs.clone(),
                    ports.clone(),
                    file_audit,
                );
            }
        }
        if rule.action == RuleAction::Accept {
            self.link(src.node_list(), grants.keys().copied().collect());
        }
        if self_dsts.is_empty() {
            return;
        }
        let ports = normalize(
            self_dsts
                .iter()
                .flat_map(|d| d.ports.iter().copied())
                .collect(),
        );
        for (login, members) in src.by_login(self.nodes) {
            let nets = IpNet::aggregate(&src.nets_of(&members));
            let dsts = index.by_user.get(login).cloned().unwrap_or_default();
            for &d in &dsts {
                let addrs = self.nodes[d]
                    .addresses
                    .iter()
                    .map(|a| IpNet::from(*a))
                    .collect();
                self.push(d, rule, nets.clone(), addrs, ports.clone(), file_audit);
            }
            if rule.action == RuleAction::Accept {
                self.link(members, dsts);
            }
        }
    }

    fn push(
        &mut self,
        node: usize,
        rule: &Rule,
        src: Vec<IpNet>,
        dst: Vec<IpNet>,
        ports: Vec<PortRange>,
        file_audit: bool,
    ) {
        if !self.wanted[node] {
            return;
        }
        let filter_rule = FilterRule {
            src,
            dst,
            ports: normalize(ports),
            protocols: rule.protocols.clone(),
            action: rule.action,
            policy_line: rule.line,
            rule_id: rule.id,
        };
        if rule.action == RuleAction::AuditDeny && !file_audit {
            self.audits.entry(node).or_default().push(filter_rule);
        } else {
            self.access
                .entry(node)
                .or_default()
                .filter
                .rules
                .push(filter_rule);
        }
    }

    /// Makes every source a peer of every destination (both sorted).
    fn link(&mut self, srcs: Vec<usize>, dsts: Vec<usize>) {
        if !self.peers || srcs.is_empty() || dsts.is_empty() {
            return;
        }
        let nodes = self.nodes;
        let add = |this: usize, others: &[usize], access: &mut BTreeMap<usize, NodeAccess>| {
            let peers = &mut access.entry(this).or_default().peers;
            let id = nodes[this].id;
            peers.extend(others.iter().map(|&o| nodes[o].id).filter(|&o| o != id));
        };
        match self.only {
            Some(only) => {
                for &w in only {
                    if dsts.binary_search(&w).is_ok() {
                        add(w, &srcs, &mut self.access);
                    }
                    if srcs.binary_search(&w).is_ok() {
                        add(w, &dsts, &mut self.access);
                    }
                }
            }
            None => {
                if !self.linked.insert((srcs.clone(), dsts.clone())) {
                    return;
                }
                for &d in &dsts {
                    add(d, &srcs, &mut self.access);
                }
                for &s in &srcs {
                    add(s, &dsts, &mut self.access);
                }
            }
        }
    }

    fn finish(mut self) -> BTreeMap<usize, NodeAccess> {
        for (node, audits) in std::mem::take(&mut self.audits) {
            let access = self.access.entry(node).or_default();
            let accepts: Vec<FilterRule> = access
                .filter
                .rules
                .iter()
                .filter(|r| r.action == RuleAction::Accept)
                .cloned()
                .collect();
            for audit in &audits {
                access
                    .filter
                    .rules
                    .extend(accepts.iter().filter_map(|accept| intersect(audit, accept)));
            }
        }
        for access in self.access.values_mut() {
            access.filter.compact();
        }
        self.access
    }
}

/// The part of an audit-mode deny rule that an accept rule also matches: only
/// there does the audit deny decide (elsewhere the default already denies).
fn intersect(audit: &FilterRule, accept: &FilterRule) -> Option<FilterRule> {
    let src = intersect_nets(&audit.src, &accept.src);
    let dst = intersect_nets(&audit.dst, &accept.dst);
    if src.is_empty() || dst.is_empty() {
        return None;
    }
    let effective = |r: &FilterRule| -> Vec<Protocol> {
        if r.protocols.is_empty() {
            Protocol::DEFAULT.to_vec()
        } else {
            r.protocols.clone()
        }
    };
    let theirs = effective(accept);
    let mut ports: Vec<PortRange> = Vec::new();
    for a in &audit.ports {
        for b in &accept.ports {
            let (first, last) = (a.first.max(b.first), a.last.min(b.last));
            if first <= last {
                ports.push(PortRange { first, last });
            }
        }
    }
    let ports = normalize(ports);
    let mut protocols: Vec<Protocol> = effective(audit)
        .into_iter()
        .filter(|p| theirs.contains(p) && (!has_ports(*p) || !ports.is_empty()))
        .collect();
    protocols.sort_unstable();
    protocols.dedup();
    if protocols.is_empty() {
        return None;
    }
    Some(FilterRule {
        src,
        dst,
        ports,
        protocols,
        action: RuleAction::AuditDeny,
        policy_line: audit.policy_line,
        rule_id: audit.rule_id,
    })
}

fn intersect_nets(a: &[IpNet], b: &[IpNet]) -> Vec<IpNet> {
    let mut both = Vec::new();
    for x in a {
        for y in b {
            if x.contains(y) {
                both.push(*y);
            } else if y.contains(x) {
                both.push(*x);
            }
        }
    }
    IpNet::aggregate(&both)
}

/// The sources of a rule: the nodes it admits (with the addresses admitted
/// for each) and every prefix its filters admit.
struct Sources {
    nodes: BTreeMap<usize, Vec<IpNet>>,
    nets: Vec<IpNet>,
}

impl Sources {
    fn node_list(&self) -> Vec<usize> {
        self.nodes.keys().copied().collect()
    }

    /// Source user nodes grouped by user, for `autogroup:self`.
    fn by_login<'n>(&self, nodes: &'n [NodeInfo]) -> BTreeMap<&'n str, Vec<usize>> {
        let mut logins: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for &i in self.nodes.keys() {
            if let Some(user) = member_login(&nodes[i]) {
                logins.entry(user).or_default().push(i);
            }
        }
        logins
    }

    fn nets_of(&self, members: &[usize]) -> Vec<IpNet> {
        members
            .iter()
            .filter_map(|m| self.nodes.get(m))
            .flatten()
            .copied()
            .collect()
    }
}

/// The user of a user node (no tags, no workload); `None` for other nodes.
fn member_login(node: &NodeInfo) -> Option<&str> {
    let identity = &node.identity;
    if identity.tags.is_empty() && identity.workload.is_none() {
        identity.user.as_deref()
    } else {
        None
    }
}

/// Whether `node` is a user node for `autogroup:member`.
fn is_member(node: &NodeInfo) -> bool {
    let identity = &node.identity;
    identity.tags.is_empty()
        && identity.workload.is_none()
        && (identity.user.is_some() || !identity.groups.is_empty())
}

struct Index<'n> {
    nodes: &'n [NodeInfo],
    by_tag: HashMap<&'n str, Vec<usize>>,
    /// User nodes only: tagged and workload nodes are not matched by their user.
    by_user: HashMap<&'n str, Vec<usize>>,
    /// Identity-provider groups of user nodes.
    by_group: HashMap<&'n str, Vec<usize>>,
    workloads: Vec<usize>,
    members: Vec<usize>,
    tagged: Vec<usize>,
    by_addr: BTreeMap<IpAddr, Vec<usize>>,
}

impl<'n> Index<'n> {
    fn new(nodes: &'n [NodeInfo]) -> Self {
        let mut index = Index {
            nodes,
            by_tag: HashMap::new(),
            by_user: HashMap::new(),
            by_group: HashMap::new(),
            workloads: Vec::new(),
            members: Vec::new(),
            tagged: Vec::new(),
            by_addr: BTreeMap::new(),
        };
        for (i, node) in nodes.iter().enumerate() {
            let identity = &node.identity;
            if is_member(node) {
                index.members.push(i);
                if let Some(user) = &identity.user {
                    index.by_user.entry(user).or_default().push(i);
                }
                for group in &identity.groups {
                    index.by_group.entry(group).or_default().push(i);
                }
            }
            if identity.workload.is_some() {
                index.workloads.push(i);
            }
            if !identity.tags.is_empty() {
                index.tagged.push(i);
            }
            for tag in &identity.tags {
                index.by_tag.entry(tag).or_default().push(i);
            }
            for addr in &node.addresses {
                index.by_addr.entry(*addr).or_default().push(i);
            }
        }
        index
    }

    /// The nodes a target covers, sorted and unique (`autogroup:self` covers none on its own).
    fn matching(&self, target: &Target) -> Vec<usize> {
        let lookup =
            |map: &HashMap<&str, Vec<usize>>, key: &str| map.get(key).cloned().unwrap_or_default();
        let mut found: Vec<usize> = match target {
            Target::Any => (0..self.nodes.len()).collect(),
            Target::User(user) => lookup(&self.by_user, user),
            Target::Group { members, .. } => members
                .iter()
                .filter_map(|m| self.by_user.get(m.as_str()))
                .flatten()
                .copied()
                .collect(),
            Target::External(group) => lookup(&self.by_group, group),
            Target::Tag(tag) => lookup(&self.by_tag, tag),
            Target::Workload(pattern) => self
                .workloads
                .iter()
                .copied()
                .filter(|&i| {
                    self.nodes[i]
                        .identity
                        .workload
                        .as_deref()
                        .is_some_and(|id| spiffe_matches(pattern, id))
                })
                .collect(),
            Target::Member => self.members.clone(),
            Target::Tagged => self.tagged.clone(),
            Target::Role { users, groups, .. } => users
                .iter()
                .filter_map(|u| self.by_user.get(u.as_str()))
                .chain(groups.iter().filter_map(|g| self.by_group.get(g.as_str())))
                .flatten()
                .copied()
                .collect(),
            Target::SelfUser | Target::Unenforced(_) => Vec::new(),
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

    /// The nodes and prefixes `targets` admit as sources; with a posture, only
    /// the addresses of nodes that satisfy it.
    fn sources(&self, targets: &[Target], posture: Option<&[Posture]>) -> Sources {
        let mut nodes: BTreeMap<usize, Vec<IpNet>> = BTreeMap::new();
        let mut raw = Vec::new();
        for target in targets {
            let matched = self.matching(target);
            for &i in &matched {
                let addresses = self.nodes[i].addresses.iter().map(|a| IpNet::from(*a));
                let admitted = nodes.entry(i).or_default();
                match target {
                    Target::Prefix(net) => {
                        admitted.extend(addresses.filter(|a| net.contains(a)));
                    }
                    _ => admitted.extend(addresses),
                }
            }
            if posture.is_none() {
                match target {
                    Target::Any => raw.extend([EVERY_V4, EVERY_V6]),
                    Target::Prefix(net) => raw.push(*net),
                    _ => {}
                }
            }
        }
        if let Some(postures) = posture {
            nodes.retain(|&i, _| {
                posture::satisfied(Some(postures), Some(&self.nodes[i].attributes))
            });
        }
        for admitted in nodes.values_mut() {
            admitted.sort_unstable();
            admitted.dedup();
        }
        raw.extend(nodes.values().flatten().copied());
        Sources {
            nets: IpNet::aggregate(&raw),
            nodes,
        }
    }

    /// The nodes the (non-`autogroup:self`) `dsts` cover, with the addresses and ports opened on each.
    fn destinations(&self, dsts: &[&DstTarget]) -> Grants {
        let mut grants = Grants::new();
        for dst in dsts {
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
    use weft_proto::{Protocol, RuleId};

    use super::*;
    use crate::eval::{Subject, Verdict};
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
            attributes: BTreeMap::new(),
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

    /// The verdict of a node's filter on a new flow, with the precedence the node applies.
    fn filter_verdict(
        filter: &PacketFilter,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Verdict {
        let matching = |action: RuleAction| {
            filter.rules.iter().any(|r| {
                let protocol_ok = if r.protocols.is_empty() {
                    Protocol::DEFAULT.contains(&protocol)
                } else {
                    r.protocols.contains(&protocol)
                };
                r.action == action
                    && r.src.iter().any(|n| n.contains(&src))
                    && r.dst.iter().any(|n| n.contains(&dst))
                    && protocol_ok
                    && (!has_ports(protocol) || r.ports.iter().any(|p| p.contains(port)))
            })
        };
        if matching(RuleAction::Deny) {
            Verdict::Deny
        } else if matching(RuleAction::AuditDeny) {
            Verdict::AuditDeny
        } else if matching(RuleAction::Accept) {
            Verdict::Accept
        } else if filter.default == DefaultAction::AuditDeny {
            Verdict::AuditDeny
        } else {
            Verdict::Deny
        }
    }

    /// Whether a node's filter lets a new flow pass.
    fn allows(
        filter: &PacketFilter,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        filter_verdict(filter, src, dst, protocol, port).passes()
    }

    fn compile(source: &str, nodes: &[NodeInfo]) -> Compiled {
        Policy::parse(source, "p").unwrap().compile(nodes)
    }

    #[test]
    fn rule_ids_follow_the_entry_not_its_line_or_layout() {
        let nodes = [tagged(1, &["tag:web"]), tagged(2, &["tag:db"])];
        let id = |source: &str| compile(source, &nodes).nodes[&NodeId(2)].filter.rules[0].rule_id;
        let rule = r#"{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}"#;
        let tags = r#""tagOwners": {"tag:web": [], "tag:db": []}"#;
        let first = id(&format!("{{{tags}, \"acls\": [{rule}]}}"));
        let moved = id(&format!(
            "{{\n  // the team's rules\n  {tags},\n\n  \"acls\": [\n    {}\n  ]\n}}",
            rule.replace(", ", ",\n      ")
        ));
        assert_eq!(first, moved, "moved down and re-indented");
        let edited = id(&format!(
            "{{{tags}, \"acls\": [{}]}}",
            rule.replace("5432", "5433")
        ));
        assert_ne!(first, edited, "another port is another rule");
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
            db.filter.rules,
            [FilterRule {
                src: vec![net("100.64.0.1/32"), net("fd7a::1/128")],
                dst: vec![net("100.64.0.2/32"), net("fd7a::2/128")],
                ports: vec![PortRange {
                    first: 5432,
                    last: 5432
                }],
                protocols: vec![Protocol::Tcp],
                policy_line: 5,
                rule_id: RuleId::of_text(
                    r#"{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"}"#
                ),
                action: RuleAction::Accept,
            }]
        );
        assert_eq!(
            web.filter.rules,
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
                rule_id: RuleId::of_text(
                    r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443", "tag:web:8080"]}"#
                ),
                action: RuleAction::Accept,
            }]
        );
        assert!(alice.filter.rules.is_empty(), "nothing may reach alice");
    }

    /// A deny naming a person in another case than their login denies them:
    /// identifiers compare in one canonical form on both sides.
    #[test]
    fn a_deny_in_another_case_still_denies() {
        let source = r#"{
  "tagOwners": {"tag:web": []},
  "acls": [
    {"action": "deny", "src": ["Mallory@Example.COM"], "dst": ["tag:web:*"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["TAG:web:*"]},
  ],
  "tests": [{"src": "mallory@example.com", "deny": ["tag:web:443"]}],
}"#
        .replace("TAG:web", "tag:web");
        let policy = Policy::parse(&source, "p").unwrap();
        policy.run_tests().unwrap();
        for login in ["mallory@example.com", "MALLORY@example.com"] {
            let nodes = [
                tagged(1, &["tag:Web"]),
                user(2, login),
                user(3, "alice@example.com"),
            ];
            let web = &policy.compile(&nodes).nodes[&NodeId(1)];
            let v4 = |n: u8| IpAddr::V4(Ipv4Addr::new(100, 64, 0, n));
            assert!(
                !allows(&web.filter, v4(2), v4(1), Protocol::Tcp, 443),
                "{login} is denied"
            );
            assert!(allows(&web.filter, v4(3), v4(1), Protocol::Tcp, 443));
            let engine = crate::Engine::new(policy.clone(), nodes.to_vec());
            assert_eq!(engine.access()[&NodeId(1)], *web, "{login}: engine agrees");
        }
        let explained = policy
            .explain("Mallory@example.com", "tag:WEB", 443, Protocol::Tcp)
            .unwrap();
        assert_eq!(explained.verdict, crate::Verdict::Deny);
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
        let filter = &compiled.nodes[&NodeId(1)].filter.rules;
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
            web.filter.rules[0].src,
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
        assert_eq!(one.filter.rules[0].dst, vec![net("100.64.0.1/32")]);
        assert_eq!(one.peers, ids(&[2]));
        let three = &compiled.nodes[&NodeId(3)];
        assert_eq!(three.filter.rules[0].dst, vec![net("fd7a::3/128")]);
        assert_eq!(
            three.filter.rules[0].ports,
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
        assert!(compiled.nodes[&NodeId(5)].filter.rules.is_empty());
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
        assert_eq!(db.filter.rules[0].src, vec![net("0.0.0.0/0"), net("::/0")]);
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
                    attributes: BTreeMap::new(),
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
        assert_eq!(zero.filter.rules.len(), 10);
        // Each source service's 100 consecutive addresses aggregate into a few prefixes.
        for rule in &zero.filter.rules {
            let covered: u32 = rule.src.iter().map(|n| 1u32 << (32 - n.prefix_len())).sum();
            assert_eq!(covered, 100);
            assert!(rule.src.len() <= 8, "{:?}", rule.src);
        }
        assert_eq!(zero.peers.len(), 200);
        assert!(elapsed.as_secs() < 60, "compile took {elapsed:?}");
    }

    #[test]
    fn deny_and_audit_deny_compile_to_their_actions() {
        let source = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:db:*"]},
    {"action": "deny", "src": ["tag:web"], "dst": ["tag:db:22"]},
    {"action": "deny", "src": ["*"], "dst": ["tag:db:8000-9000"], "proto": "tcp", "mode": "audit"},
    {"action": "deny", "src": ["*"], "dst": ["tag:web:80"], "mode": "audit"},
  ],
}"#;
        let nodes = [tagged(1, &["tag:web"]), tagged(2, &["tag:db"])];
        let compiled = compile(source, &nodes);
        let db = &compiled.nodes[&NodeId(2)];
        let actions: Vec<(RuleAction, u32)> = db
            .filter
            .rules
            .iter()
            .map(|r| (r.action, r.policy_line))
            .collect();
        assert_eq!(
            actions,
            [
                (RuleAction::Accept, 4),
                (RuleAction::Deny, 5),
                (RuleAction::AuditDeny, 6)
            ]
        );
        assert_eq!(db.filter.rules[2].protocols, [Protocol::Tcp]);
        assert_eq!(
            db.filter.rules[2].ports,
            [PortRange {
                first: 8000,
                last: 9000
            }]
        );
        let web_ip: IpAddr = "100.64.0.1".parse().unwrap();
        let db_ip: IpAddr = "100.64.0.2".parse().unwrap();
        assert_eq!(
            filter_verdict(&db.filter, web_ip, db_ip, Protocol::Tcp, 22),
            Verdict::Deny
        );
        assert_eq!(
            filter_verdict(&db.filter, web_ip, db_ip, Protocol::Tcp, 8080),
            Verdict::AuditDeny
        );
        assert_eq!(
            filter_verdict(&db.filter, web_ip, db_ip, Protocol::Udp, 8080),
            Verdict::Accept
        );
        // Nothing accepts traffic to web, so its audit deny compiles to nothing: it must not open port 80.
        let web = &compiled.nodes[&NodeId(1)];
        assert!(web.filter.rules.is_empty());
        assert_eq!(
            filter_verdict(&web.filter, db_ip, web_ip, Protocol::Tcp, 80),
            Verdict::Deny
        );
        assert_eq!(
            web.peers,
            ids(&[2]),
            "deny rules make no peers; the accept does"
        );
    }

    #[test]
    fn whole_file_audit_mode_enforces_nothing_and_peers_everyone() {
        let source = r#"{"mode": "audit", "tagOwners": {"tag:db": []},
            "acls": [{"action": "deny", "src": ["*"], "dst": ["tag:db:22"]}]}"#;
        let nodes = [tagged(1, &["tag:db"]), user(2, "a@x"), user(3, "b@x")];
        let compiled = compile(source, &nodes);
        let db = &compiled.nodes[&NodeId(1)];
        assert_eq!(db.filter.default, DefaultAction::AuditDeny);
        assert_eq!(db.filter.rules[0].action, RuleAction::AuditDeny);
        assert_eq!(compiled.nodes[&NodeId(2)].peers, ids(&[1, 3]));
    }

    #[test]
    fn postures_admit_only_compliant_sources() {
        let source = r#"{
  "tagOwners": {"tag:db": []},
  "postures": {"posture:fresh": ["node:os == 'linux'", "node:clientVersion >= '1.4'"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:db:5432"], "srcPosture": ["posture:fresh"]}],
}"#;
        let with = |id, os: &str, version: &str| NodeInfo {
            attributes: BTreeMap::from([
                ("node:os".to_owned(), os.to_owned()),
                ("node:clientVersion".to_owned(), version.to_owned()),
            ]),
            ..user(id, "a@x")
        };
        let nodes = [
            tagged(1, &["tag:db"]),
            with(2, "linux", "1.10"),
            with(3, "linux", "1.3.9"),
            with(4, "macos", "2"),
        ];
        let compiled = compile(source, &nodes);
        let db = &compiled.nodes[&NodeId(1)];
        assert_eq!(
            db.filter.rules[0].src,
            vec![net("100.64.0.2/32"), net("fd7a::2/128")]
        );
        assert_eq!(db.peers, ids(&[2]));
    }

    #[test]
    fn workloads_idp_groups_and_autogroups() {
        let source = r#"{
  "tagOwners": {"tag:db": []},
  "acls": [
    {"action": "accept", "src": ["spiffe://prod/ns/*/sa/api"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["group:idp:sre"], "dst": ["autogroup:tagged:22"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
}"#;
        let workload = |id, spiffe: &str| {
            node(
                id,
                Identity {
                    workload: Some(spiffe.into()),
                    user: Some("a@x".into()),
                    ..Identity::default()
                },
            )
        };
        let sre = |id, login: &str| {
            node(
                id,
                Identity {
                    user: Some(login.into()),
                    groups: vec!["group:idp:sre".into()],
                    ..Identity::default()
                },
            )
        };
        let nodes = [
            tagged(1, &["tag:db"]),
            workload(2, "spiffe://prod/ns/shop/sa/api"),
            workload(3, "spiffe://prod/ns/shop/sa/web"),
            sre(4, "a@x"),
            user(5, "a@x"),
            user(6, "b@x"),
        ];
        let compiled = compile(source, &nodes);
        let peers = |n| compiled.nodes[&NodeId(n)].peers.clone();
        assert_eq!(peers(1), ids(&[2, 4]));
        assert_eq!(
            peers(3),
            ids(&[]),
            "the web workload matches no rule, and not as user a@x"
        );
        assert_eq!(peers(4), ids(&[1, 5]));
        assert_eq!(peers(5), ids(&[4]));
        assert_eq!(peers(6), ids(&[]), "b@x has one node: only itself");
        let a_node = &compiled.nodes[&NodeId(5)];
        assert_eq!(a_node.filter.rules.len(), 1);
        assert_eq!(
            a_node.filter.rules[0].src,
            vec![net("100.64.0.4/31"), net("fd7a::4/127")]
        );
    }

    #[test]
    fn grants_open_ports_and_hand_out_capabilities() {
        let source = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "grants": [
    {"src": ["tag:web"], "dst": ["tag:db"], "ip": ["tcp:5432", "icmp:*"]},
    {"src": ["a@x"], "dst": ["tag:db"], "app": {"x.com/cap/db": [{"role": "admin"}]}},
  ],
}"#;
        let nodes = [
            tagged(1, &["tag:web"]),
            tagged(2, &["tag:db"]),
            user(3, "a@x"),
        ];
        let compiled = compile(source, &nodes);
        let db = &compiled.nodes[&NodeId(2)];
        assert_eq!(db.peers, ids(&[1]), "an app-only grant makes no peers");
        let web_ip: IpAddr = "100.64.0.1".parse().unwrap();
        let db_ip: IpAddr = "100.64.0.2".parse().unwrap();
        assert!(allows(&db.filter, web_ip, db_ip, Protocol::Tcp, 5432));
        assert!(allows(&db.filter, web_ip, db_ip, Protocol::Icmp, 0));
        assert!(!allows(&db.filter, web_ip, db_ip, Protocol::Udp, 5432));
        assert_eq!(
            db.capabilities,
            [AppGrant {
                src: vec![net("100.64.0.3/32"), net("fd7a::3/128")],
                name: "x.com/cap/db".into(),
                values: vec!["{\"role\":\"admin\"}".into()],
                policy_line: 5,
            }]
        );
        assert!(compiled.nodes[&NodeId(3)].capabilities.is_empty());
    }

    const SRCS: &[&str] = &[
        "*",
        "alice@x.com",
        "bob@x.com",
        "group:eng",
        "group:idp:sre",
        "tag:web",
        "tag:db",
        "spiffe://td/ns/*/sa/api",
        "autogroup:member",
        "autogroup:tagged",
        "100.64.0.0/30",
        "lan",
        "fd7a::/125",
    ];
    const DSTS: &[&str] = &[
        "*",
        "alice@x.com",
        "group:eng",
        "group:idp:sre",
        "tag:web",
        "tag:db",
        "spiffe://td/ns/prod/sa/api",
        "autogroup:member",
        "autogroup:self",
        "100.64.0.2/31",
        "lan",
        "[fd7a::4]",
    ];
    const PORTS: &[&str] = &["*", "22", "80,443", "1000-2000"];
    const PROTOS: &[&str] = &["", "tcp", "udp", "icmp"];
    const KINDS: &[&str] = &["accept", "accept", "accept-posture", "deny", "audit"];

    fn arb_rule() -> impl Strategy<Value = String> {
        (
            prop::sample::subsequence(SRCS, 1..3),
            prop::collection::vec(
                (prop::sample::select(DSTS), prop::sample::select(PORTS)),
                1..3,
            ),
            prop::sample::select(PROTOS),
            prop::sample::select(KINDS),
        )
            .prop_map(|(src, dst, proto, kind)| rule_text(&src, &dst, proto, kind))
    }

    fn rule_text(src: &[&str], dst: &[(&str, &str)], proto: &str, kind: &str) -> String {
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
        let extra = match kind {
            "accept-posture" => "\"action\": \"accept\", \"srcPosture\": [\"posture:linux\"]",
            "deny" => "\"action\": \"deny\"",
            "audit" => "\"action\": \"deny\", \"mode\": \"audit\"",
            _ => "\"action\": \"accept\"",
        };
        format!(
            "{{{extra}, \"src\": [{}], \"dst\": [{}]{proto}}}",
            src.join(","),
            dst.join(",")
        )
    }

    fn arb_node(id: u64) -> impl Strategy<Value = NodeInfo> {
        let identity = prop_oneof![
            Just(Identity {
                user: Some("alice@x.com".into()),
                ..Identity::default()
            }),
            Just(Identity {
                user: Some("bob@x.com".into()),
                groups: vec!["group:idp:sre".into()],
                ..Identity::default()
            }),
            Just(Identity {
                user: Some("carol@x.com".into()),
                ..Identity::default()
            }),
            Just(Identity::tagged(vec!["tag:web".into()])),
            Just(Identity::tagged(vec!["tag:db".into()])),
            Just(Identity::tagged(vec!["tag:web".into(), "tag:db".into()])),
            Just(Identity {
                workload: Some("spiffe://td/ns/prod/sa/api".into()),
                ..Identity::default()
            }),
        ];
        (identity, prop::bool::ANY).prop_map(move |(identity, linux)| NodeInfo {
            attributes: BTreeMap::from([(
                "node:os".to_owned(),
                if linux { "linux" } else { "macos" }.to_owned(),
            )]),
            ..node(id, identity)
        })
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeInfo>> {
        (1u64..7).prop_flat_map(|n| (1..=n).map(arb_node).collect::<Vec<_>>())
    }

    fn policy_text(rules: &[String], audit: bool) -> String {
        format!(
            "{{{}\"groups\": {{\"group:eng\": [\"alice@x.com\", \"carol@x.com\"]}}, \"tagOwners\": {{\"tag:web\": [], \"tag:db\": []}},\n\"hosts\": {{\"lan\": \"100.64.0.4/30\"}},\n\"postures\": {{\"posture:linux\": [\"node:os == 'linux'\"]}},\n\"acls\": [\n{}\n]}}",
            if audit { "\"mode\": \"audit\", " } else { "" },
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

    /// Checks that nothing passes in `narrower` that does not pass in `wider`.
    fn never_more(
        wider: &Compiled,
        narrower: &Compiled,
        nodes: &[NodeInfo],
    ) -> Result<(), TestCaseError> {
        let probes = probes(nodes);
        for node in nodes {
            let (wide, narrow) = (&wider.nodes[&node.id], &narrower.nodes[&node.id]);
            for &(src, protocol, port) in &probes {
                for &dst in &node.addresses {
                    if allows(&narrow.filter, src, dst, protocol, port) {
                        prop_assert!(
                            allows(&wide.filter, src, dst, protocol, port),
                            "{src} → {dst} {protocol:?}/{port}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn removing_an_accept_never_allows_more(
            rules in prop::collection::vec(arb_rule(), 1..6),
            nodes in arb_nodes(),
            removed in any::<prop::sample::Index>(),
            audit in prop::bool::weighted(0.2),
        ) {
            let full = compile(&policy_text(&rules, audit), &nodes);
            let mut fewer_rules = rules.clone();
            let victim = removed.index(rules.len());
            prop_assume!(rules[victim].contains("\"action\": \"accept\""));
            fewer_rules.remove(victim);
            let fewer = compile(&policy_text(&fewer_rules, audit), &nodes);
            never_more(&full, &fewer, &nodes)?;
            for node in &nodes {
                prop_assert!(fewer.nodes[&node.id].peers.is_subset(&full.nodes[&node.id].peers));
                prop_assert!(!full.nodes[&node.id].peers.contains(&node.id));
            }
        }

        #[test]
        fn adding_a_deny_never_allows_more(
            rules in prop::collection::vec(arb_rule(), 0..6),
            deny_src in prop::sample::subsequence(SRCS, 1..3),
            deny_dst in prop::collection::vec((prop::sample::select(DSTS), prop::sample::select(PORTS)), 1..3),
            deny_proto in prop::sample::select(PROTOS),
            audit_deny in prop::bool::ANY,
            nodes in arb_nodes(),
        ) {
            let before = compile(&policy_text(&rules, false), &nodes);
            let mut more = rules.clone();
            more.push(rule_text(&deny_src, &deny_dst, deny_proto, if audit_deny { "audit" } else { "deny" }));
            let after = compile(&policy_text(&more, false), &nodes);
            never_more(&before, &after, &nodes)?;
        }

        #[test]
        fn explain_agrees_with_the_compiled_filters(
            rules in prop::collection::vec(arb_rule(), 0..6),
            nodes in arb_nodes(),
            audit in prop::bool::weighted(0.2),
        ) {
            let policy = Policy::parse(&policy_text(&rules, audit), "p").unwrap();
            let compiled = policy.compile(&nodes);
            let outsiders: Vec<IpAddr> = vec!["203.0.113.7".parse().unwrap(), "fd7a::ff".parse().unwrap()];
            for b in &nodes {
                let access = &compiled.nodes[&b.id];
                for &dst in &b.addresses {
                    let dst_subject = Subject::node(b, Some(dst));
                    let mut sources: Vec<(Option<&NodeInfo>, IpAddr, Subject)> = outsiders
                        .iter()
                        .map(|&a| (None, a, Subject { addr: Some(IpNet::from(a)), ..Subject::default() }))
                        .collect();
                    for a in &nodes {
                        for &addr in &a.addresses {
                            sources.push((Some(a), addr, Subject::node(a, Some(addr))));
                        }
                    }
                    for (a, src, subject) in &sources {
                        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Other(132)] {
                            for port in [22, 80, 443, 1500, 5432] {
                                let explained = crate::eval::decide(&policy.rules, subject, &dst_subject, protocol, port).0;
                                let enforced = filter_verdict(&access.filter, *src, dst, protocol, port);
                                prop_assert_eq!(explained, enforced, "{} → {} {:?}/{}", src, dst, protocol, port);
                                if let Some(a) = a {
                                    if enforced.passes() && a.id != b.id {
                                        prop_assert!(access.peers.contains(&a.id), "{} admits {} but they are not peers", b.id, a.id);
                                        prop_assert!(compiled.nodes[&a.id].peers.contains(&b.id));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// One selector of a generated rule, and whether weft does not enforce it.
    type Part = (&'static str, bool);

    const FAIL_CLOSED_SRCS: &[Part] = &[
        ("*", false),
        ("alice@x.com", false),
        ("group:eng", false),
        ("group:idp:sre", false),
        ("tag:web", false),
        ("autogroup:member", false),
        ("100.64.0.0/30", false),
        ("autogroup:shared", true),
        ("autogroup:admin", true),
    ];
    const FAIL_CLOSED_DSTS: &[Part] = &[
        ("*", false),
        ("tag:web", false),
        ("tag:db", false),
        ("alice@x.com", false),
        ("lan", false),
        ("100.64.0.2/31", false),
        ("autogroup:internet", true),
        ("svc:wiki", true),
        ("ipset:out", false),
    ];

    /// A generated rule: `kind` is accept, deny, audit, grant or via (a grant with `via`).
    #[derive(Debug, Clone)]
    struct MixedRule {
        kind: &'static str,
        src: Vec<Part>,
        dst: Vec<Part>,
        port: &'static str,
        proto: &'static str,
        /// `posture:track` checks an attribute weft does not collect.
        posture: Option<&'static str>,
    }

    impl MixedRule {
        /// The rule as written, or with the unenforced parts removed (`None`
        /// when nothing of it is left).
        fn text(&self, strip: bool) -> Option<String> {
            if strip && self.kind == "via" {
                return None;
            }
            let keep = |parts: &[Part]| -> Vec<String> {
                parts
                    .iter()
                    .filter(|(_, unenforced)| !strip || !unenforced)
                    .map(|(s, _)| (*s).to_owned())
                    .collect()
            };
            let (src, dst) = (keep(&self.src), keep(&self.dst));
            if src.is_empty() || dst.is_empty() {
                return None;
            }
            let quoted = |items: Vec<String>| {
                items
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let posture = self
                .posture
                .map(|p| format!(", \"srcPosture\": [\"{p}\"]"))
                .unwrap_or_default();
            let port = if self.proto == "icmp" { "*" } else { self.port };
            Some(match self.kind {
                "grant" | "via" => {
                    let ip = if self.proto.is_empty() {
                        port.to_owned()
                    } else {
                        format!("{}:{port}", self.proto)
                    };
                    let via = if self.kind == "via" {
                        ", \"via\": [\"tag:db\"]"
                    } else {
                        ""
                    };
                    format!(
                        "{{\"grants\": [{{\"src\": [{}], \"dst\": [{}], \"ip\": [\"{ip}\"]{posture}{via}}}]}}",
                        quoted(src),
                        quoted(dst)
                    )
                }
                kind => {
                    let dst = dst.into_iter().map(|d| format!("{d}:{port}")).collect();
                    let proto = if self.proto.is_empty() {
                        String::new()
                    } else {
                        format!(", \"proto\": \"{}\"", self.proto)
                    };
                    let (action, posture) = match kind {
                        "deny" => ("\"action\": \"deny\"", String::new()),
                        "audit" => ("\"action\": \"deny\", \"mode\": \"audit\"", String::new()),
                        _ => ("\"action\": \"accept\"", posture),
                    };
                    format!(
                        "{{\"acls\": [{{{action}, \"src\": [{}], \"dst\": [{}]{proto}{posture}}}]}}",
                        quoted(src),
                        quoted(dst)
                    )
                }
            })
        }
    }

    fn arb_mixed_rule() -> impl Strategy<Value = MixedRule> {
        (
            prop::sample::select(vec!["accept", "accept", "deny", "audit", "grant", "via"]),
            prop::sample::subsequence(FAIL_CLOSED_SRCS, 1..3),
            prop::sample::subsequence(FAIL_CLOSED_DSTS, 1..3),
            prop::sample::select(vec!["*", "22", "80,443"]),
            prop::sample::select(vec!["", "tcp", "udp", "icmp"]),
            prop::sample::select(vec![None, Some("posture:linux"), Some("posture:track")]),
        )
            .prop_map(|(kind, src, dst, port, proto, posture)| MixedRule {
                kind,
                src,
                dst,
                port,
                proto,
                posture,
            })
    }

    /// The policy of `rules`; `strip` removes what weft does not enforce.
    fn mixed_policy(rules: &[MixedRule], strip: bool) -> Policy {
        let (mut acls, mut grants) = (Vec::new(), Vec::new());
        for rule in rules {
            let Some(text) = rule.text(strip) else {
                continue;
            };
            // Each rule renders as a one-entry section; keep the entry.
            let entry = &text[text.find('[').unwrap_or(0) + 1..text.rfind(']').unwrap_or(0)];
            if rule.kind == "grant" || rule.kind == "via" {
                grants.push(entry.to_owned());
            } else {
                acls.push(entry.to_owned());
            }
        }
        let track = if strip {
            "[\"node:os == 'linux'\"]"
        } else {
            "[\"node:os == 'linux'\", \"node:tsReleaseTrack == 'stable'\"]"
        };
        let out = if strip {
            "[\"add 100.64.0.4/31\"]"
        } else {
            "[\"add autogroup:internet\", \"add 100.64.0.4/31\", \"remove 8.8.8.8\"]"
        };
        let source = format!(
            "{{\"groups\": {{\"group:eng\": [\"alice@x.com\", \"carol@x.com\"]}}, \"tagOwners\": {{\"tag:web\": [], \"tag:db\": []}},\n\"hosts\": {{\"lan\": \"100.64.0.4/30\"}},\n\"ipsets\": {{\"ipset:out\": {out}}},\n\"postures\": {{\"posture:linux\": [\"node:os == 'linux'\"], \"posture:track\": {track}}},\n\"acls\": [{}],\n\"grants\": [{}]}}",
            acls.join(",\n"),
            grants.join(",\n"),
        );
        match Policy::parse(&source, "p") {
            Ok(policy) => policy,
            Err(err) => panic!("{err}\n{source}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// What weft cannot enforce matches nothing, so the policy as
        /// written never allows a flow that the policy without those parts
        /// (which a reviewer reads as the narrower one) does not.
        #[test]
        fn unenforced_constructs_fail_closed(
            rules in prop::collection::vec(arb_mixed_rule(), 1..6),
            nodes in arb_nodes(),
        ) {
            let nodes: Vec<NodeInfo> = nodes
                .into_iter()
                .map(|mut n| {
                    n.attributes.insert("node:tsReleaseTrack".into(), "stable".into());
                    n
                })
                .collect();
            let written = mixed_policy(&rules, false).compile(&nodes);
            let stripped = mixed_policy(&rules, true).compile(&nodes);
            never_more(&stripped, &written, &nodes)?;
            let outside: IpAddr = "8.8.4.4".parse().unwrap();
            for node in &nodes {
                prop_assert!(written.nodes[&node.id].peers.is_subset(&stripped.nodes[&node.id].peers));
                for &src in &node.addresses {
                    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Icmp] {
                        // No rule reaches the internet: weft has no exit nodes.
                        prop_assert!(!allows(&written.nodes[&node.id].filter, src, outside, protocol, 443));
                    }
                }
            }
        }
    }
}
