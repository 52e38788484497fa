//! Incremental compilation: a policy and its nodes, recompiling only what a node change affects.
//!
//! The engine keeps, for every rule, the nodes its sources and its
//! destinations cover, and for every node, the rules that concern it. A node
//! change looks only at the rules the node's old and new versions concern:
//!
//! - the node itself is recompiled over its neighbourhood (the nodes sharing
//!   a rule with it);
//! - the destinations of rules it is a source of get their filters and
//!   capabilities recompiled, from those rules only;
//! - whether two nodes are peers depends on those two nodes and the rules
//!   alone, so every other node's peers change by this node at most and are
//!   patched in place.
//!
//! All of it is proportional to what the change touches, not to the size of
//! the overlay. The one exception is a rule whose sources have no addresses
//! (it opens nothing): there a change may open or close the rule for all the
//! nodes it concerns, and those are recompiled.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use weft_proto::NodeId;

use crate::compile::{compile, compile_filters_for, compile_for};
use crate::eval::Subject;
use crate::rules::{AppRule, Rule, Rules, Target};
use crate::{NodeAccess, NodeInfo, Policy};

/// Holds a policy, the nodes and every node's compiled access.
///
/// Drive it with [`Engine::upsert`] and [`Engine::remove`] as nodes register,
/// change identity, addresses or attributes, and leave, and with
/// [`Engine::set_policy`] when the policy changes; each returns the nodes
/// whose access was recompiled or patched (every node whose access changed
/// is among them). [`Engine::access`] always equals what
/// [`Policy::compile`] would produce for the current nodes.
#[derive(Debug, Clone)]
pub struct Engine {
    policy: Policy,
    nodes: BTreeMap<NodeId, NodeInfo>,
    access: BTreeMap<NodeId, NodeAccess>,
    /// Per network rule, then per app rule: the nodes its sources cover
    /// (whatever their posture).
    srcs: Vec<BTreeSet<NodeId>>,
    /// Likewise, the nodes its destinations cover (`autogroup:self` aside).
    dsts: Vec<BTreeSet<NodeId>>,
    /// Per node: the indices of the rules that concern it; a user node is
    /// concerned by every rule with an `autogroup:self` destination.
    rules_of: HashMap<NodeId, BTreeSet<usize>>,
    /// Per node: the rules it may be a destination of, which make its filter
    /// and capabilities.
    dst_rules_of: HashMap<NodeId, BTreeSet<usize>>,
    /// User nodes by login, for `autogroup:self`.
    by_login: HashMap<String, BTreeSet<NodeId>>,
    /// Nodes without addresses.
    addressless: BTreeSet<NodeId>,
}

impl Engine {
    /// Compiles `policy` for `nodes` (a later node replaces an earlier one with the same id).
    pub fn new(policy: Policy, nodes: Vec<NodeInfo>) -> Engine {
        let nodes: BTreeMap<NodeId, NodeInfo> = nodes
            .into_iter()
            .map(|n| (n.id, n.into_canonical()))
            .collect();
        let list: Vec<NodeInfo> = nodes.values().cloned().collect();
        let access = compile(&policy.rules, &list).nodes;
        let mut engine = Engine {
            policy,
            nodes: BTreeMap::new(),
            access,
            srcs: Vec::new(),
            dsts: Vec::new(),
            rules_of: HashMap::new(),
            dst_rules_of: HashMap::new(),
            by_login: HashMap::new(),
            addressless: BTreeSet::new(),
        };
        for node in list {
            engine.remember(&node);
        }
        engine.nodes = nodes;
        engine.index_rules(Vec::new());
        engine
    }

    /// Every node's access.
    pub fn access(&self) -> &BTreeMap<NodeId, NodeAccess> {
        &self.access
    }

    /// The nodes compiled for, by id.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeInfo> {
        &self.nodes
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy; returns the nodes whose access was recompiled.
    ///
    /// Only the nodes that an added, removed or changed rule concerns are
    /// recompiled (a group's membership, a host's address or a posture is
    /// part of every rule that uses it). Switching audit mode, or reordering
    /// rules that stay, recompiles every node.
    pub fn set_policy(&mut self, policy: Policy) -> BTreeSet<NodeId> {
        let old_policy = std::mem::replace(&mut self.policy, policy);
        let (old, new) = (&old_policy.rules, &self.policy.rules);
        let kept_old: Vec<&Rule> = old.rules.iter().filter(|r| new.rules.contains(r)).collect();
        let kept_new: Vec<&Rule> = new.rules.iter().filter(|r| old.rules.contains(r)).collect();
        let apps_kept = old
            .apps
            .iter()
            .filter(|a| new.apps.contains(a))
            .eq(new.apps.iter().filter(|a| old.apps.contains(a)));
        let everything = old.audit != new.audit || kept_old != kept_new || !apps_kept;
        let mut wanted: BTreeSet<NodeId> = BTreeSet::new();
        for i in 0..old.rules.len() + old.apps.len() {
            if !new.has_rule_of(old, i) {
                wanted.extend(self.concerned_by(&old_policy, i));
            }
        }
        let reused = reuse(
            old,
            new,
            std::mem::take(&mut self.srcs),
            std::mem::take(&mut self.dsts),
        );
        let fresh = self.index_rules(reused);
        if everything {
            return self.recompile_all();
        }
        for i in fresh {
            wanted.extend(self.concerned_by(&self.policy, i));
        }
        self.recompile_nodes(&wanted)
    }

    /// Adds or replaces a node; returns the nodes whose access was recompiled or patched.
    pub fn upsert(&mut self, node: NodeInfo) -> BTreeSet<NodeId> {
        let node = node.into_canonical();
        let old = self.nodes.insert(node.id, node.clone());
        if let Some(old) = &old {
            self.forget(old);
        }
        self.remember(&node);
        let old_peers = self.peers_of(node.id);
        let touched = self.reindex_node(node.id, Some(&node));
        let versions: Vec<&NodeInfo> = old.iter().chain(std::iter::once(&node)).collect();
        self.node_changed(node.id, &versions, &touched, old_peers)
    }

    /// Removes a node; returns the nodes whose access was recompiled or patched.
    pub fn remove(&mut self, id: NodeId) -> BTreeSet<NodeId> {
        let Some(old) = self.nodes.remove(&id) else {
            return BTreeSet::new();
        };
        self.forget(&old);
        let old_peers = self.peers_of(id);
        self.access.remove(&id);
        let touched = self.reindex_node(id, None);
        self.node_changed(id, &[&old], &touched, old_peers)
    }

    /// Rebuilds the rule indexes for the current policy, taking a rule's
    /// covered nodes from `reused` where present; returns the indices of the
    /// rules whose covered nodes were computed afresh.
    fn index_rules(&mut self, reused: Vec<Option<Covered>>) -> Vec<usize> {
        let seen: Vec<(NodeId, Vec<Subject>)> =
            self.nodes.values().map(|n| (n.id, subjects(n))).collect();
        let count = self.policy.rules.rules.len() + self.policy.rules.apps.len();
        let mut reused = reused.into_iter();
        let mut fresh = Vec::new();
        let (mut srcs, mut dsts) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for i in 0..count {
            let (src, dst) = match reused.next().flatten() {
                Some(covered) => covered,
                None => {
                    fresh.push(i);
                    let (mut src, mut dst) = (BTreeSet::new(), BTreeSet::new());
                    for (id, subjects) in &seen {
                        let side = sides(&self.policy.rules, i, subjects);
                        if side.src {
                            src.insert(*id);
                        }
                        if side.dst {
                            dst.insert(*id);
                        }
                    }
                    (src, dst)
                }
            };
            srcs.push(src);
            dsts.push(dst);
        }
        self.srcs = srcs;
        self.dsts = dsts;
        self.rules_of.clear();
        self.dst_rules_of.clear();
        for (i, (src, dst)) in self.srcs.iter().zip(&self.dsts).enumerate() {
            for id in src.iter().chain(dst) {
                self.rules_of.entry(*id).or_default().insert(i);
            }
            for id in dst {
                self.dst_rules_of.entry(*id).or_default().insert(i);
            }
        }
        let self_rules: Vec<usize> = (0..count)
            .filter(|&i| has_self_dst(&self.policy.rules, i))
            .collect();
        if !self_rules.is_empty() {
            for id in self.by_login.values().flatten() {
                self.rules_of.entry(*id).or_default().extend(&self_rules);
                self.dst_rules_of
                    .entry(*id)
                    .or_default()
                    .extend(&self_rules);
            }
        }
        fresh
    }

    /// Moves node `id` in the rule indexes, from what its old version
    /// concerned to what `new` (`None`: removed) concerns; returns every rule
    /// either version concerns.
    fn reindex_node(&mut self, id: NodeId, new: Option<&NodeInfo>) -> BTreeSet<usize> {
        let mut touched = self.rules_of.remove(&id).unwrap_or_default();
        self.dst_rules_of.remove(&id);
        for &i in &touched {
            if let Some(src) = self.srcs.get_mut(i) {
                src.remove(&id);
            }
            if let Some(dst) = self.dsts.get_mut(i) {
                dst.remove(&id);
            }
        }
        let Some(new) = new else {
            return touched;
        };
        let (subjects, login) = (subjects(new), login_of(new).is_some());
        let (mut all, mut as_dst) = (BTreeSet::new(), BTreeSet::new());
        for i in 0..self.srcs.len() {
            let side = sides(&self.policy.rules, i, &subjects);
            let self_dst = login && has_self_dst(&self.policy.rules, i);
            if side.src {
                if let Some(src) = self.srcs.get_mut(i) {
                    src.insert(id);
                }
            }
            if side.dst {
                if let Some(dst) = self.dsts.get_mut(i) {
                    dst.insert(id);
                }
            }
            if side.dst || self_dst {
                as_dst.insert(i);
            }
            if side.src || side.dst || self_dst {
                all.insert(i);
            }
        }
        touched.extend(&all);
        if !all.is_empty() {
            self.rules_of.insert(id, all);
        }
        if !as_dst.is_empty() {
            self.dst_rules_of.insert(id, as_dst);
        }
        touched
    }

    /// Recompiles what a change of node `id` (`versions`: its old and new
    /// versions) affects; `touched` are the rules either version concerns and
    /// `old_peers` its peers before.
    fn node_changed(
        &mut self,
        id: NodeId,
        versions: &[&NodeInfo],
        touched: &BTreeSet<usize>,
        old_peers: BTreeSet<NodeId>,
    ) -> BTreeSet<NodeId> {
        if self.policy.rules.audit {
            return self.recompile_all();
        }
        let addressless_source = touched.iter().any(|&i| {
            self.srcs
                .get(i)
                .is_some_and(|src| self.addressless.iter().any(|a| src.contains(a)))
        });
        if addressless_source {
            let mut wanted = BTreeSet::from([id]);
            for &i in touched {
                wanted.extend(self.concerned_by(&self.policy, i));
            }
            return self.recompile_nodes(&wanted);
        }
        let mut filters: BTreeSet<NodeId> = BTreeSet::new();
        for version in versions {
            let subjects = subjects(version);
            let mates = login_of(version).and_then(|l| self.by_login.get(l));
            for &i in touched {
                if sides(&self.policy.rules, i, &subjects).src {
                    filters.extend(self.dsts.get(i).into_iter().flatten());
                    if has_self_dst(&self.policy.rules, i) {
                        filters.extend(mates.into_iter().flatten());
                    }
                }
            }
        }
        filters.remove(&id);
        let mut changed = BTreeSet::new();
        if self.nodes.contains_key(&id) {
            changed.extend(self.recompile_nodes(&BTreeSet::from([id])));
        }
        changed.extend(self.recompile_filters(&filters));
        let new_peers = self.peers_of(id);
        for other in old_peers.union(&new_peers) {
            let Some(access) = self.access.get_mut(other) else {
                continue;
            };
            let patched = if new_peers.contains(other) {
                access.peers.insert(id)
            } else {
                access.peers.remove(&id)
            };
            if patched {
                changed.insert(*other);
            }
        }
        changed
    }

    /// Recompiles the nodes in `wanted` over their neighbourhood: every node
    /// that shares a rule with one of them, and their logins' user nodes.
    fn recompile_nodes(&mut self, wanted: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        if self.policy.rules.audit {
            return self.recompile_all();
        }
        let rules: BTreeSet<usize> = wanted
            .iter()
            .filter_map(|id| self.rules_of.get(id))
            .flatten()
            .copied()
            .collect();
        let mut around = wanted.clone();
        for &i in &rules {
            around.extend(self.srcs.get(i).into_iter().flatten());
            around.extend(self.dsts.get(i).into_iter().flatten());
        }
        for id in wanted {
            around.extend(self.mates_of(*id));
        }
        let fresh = self.compile_among(&rules, &around, wanted, |rules, nodes, only| {
            compile_for(rules, nodes, Some(only))
        });
        let ids = fresh.keys().copied().collect();
        self.access.extend(fresh);
        ids
    }

    /// Recompiles the filters and capabilities of the nodes in `wanted`
    /// (their peers stay), from the rules they are destinations of.
    fn recompile_filters(&mut self, wanted: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        let rules: BTreeSet<usize> = wanted
            .iter()
            .filter_map(|id| self.dst_rules_of.get(id))
            .flatten()
            .copied()
            .collect();
        let mut around = wanted.clone();
        for &i in &rules {
            around.extend(self.srcs.get(i).into_iter().flatten());
        }
        let mut changed = BTreeSet::new();
        for (id, fresh) in self.compile_among(&rules, &around, wanted, compile_filters_for) {
            let Some(access) = self.access.get_mut(&id) else {
                continue;
            };
            if access.filter != fresh.filter || access.capabilities != fresh.capabilities {
                access.filter = fresh.filter;
                access.capabilities = fresh.capabilities;
                changed.insert(id);
            }
        }
        changed
    }

    /// Compiles, with `compiler`, the rules at indices `rules` (network
    /// rules, then apps) for the nodes in `around`, keeping the access of the
    /// nodes in `wanted`.
    fn compile_among(
        &self,
        rules: &BTreeSet<usize>,
        around: &BTreeSet<NodeId>,
        wanted: &BTreeSet<NodeId>,
        compiler: impl Fn(&Rules, &[NodeInfo], &BTreeSet<usize>) -> BTreeMap<usize, NodeAccess>,
    ) -> BTreeMap<NodeId, NodeAccess> {
        let all = &self.policy.rules;
        let subset = Rules {
            rules: rules
                .iter()
                .filter_map(|&i| all.rules.get(i))
                .cloned()
                .collect(),
            apps: rules
                .iter()
                .filter_map(|&i| i.checked_sub(all.rules.len()))
                .filter_map(|i| all.apps.get(i))
                .cloned()
                .collect(),
            inert: Vec::new(),
            audit: all.audit,
        };
        let list: Vec<NodeInfo> = around
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .cloned()
            .collect();
        let positions: BTreeSet<usize> = list
            .iter()
            .enumerate()
            .filter(|(_, n)| wanted.contains(&n.id))
            .map(|(i, _)| i)
            .collect();
        compiler(&subset, &list, &positions)
            .into_iter()
            .filter_map(|(i, access)| list.get(i).map(|n| (n.id, access)))
            .collect()
    }

    fn recompile_all(&mut self) -> BTreeSet<NodeId> {
        let list: Vec<NodeInfo> = self.nodes.values().cloned().collect();
        self.access = compile(&self.policy.rules, &list).nodes;
        self.access.keys().copied().collect()
    }

    /// Every node rule `i` of `policy` concerns, as a source or destination.
    fn concerned_by(&self, policy: &Policy, i: usize) -> BTreeSet<NodeId> {
        let mut found: BTreeSet<NodeId> = self.srcs.get(i).into_iter().flatten().copied().collect();
        found.extend(self.dsts.get(i).into_iter().flatten());
        if has_self_dst(&policy.rules, i) {
            found.extend(self.by_login.values().flatten());
        }
        found
    }

    fn peers_of(&self, id: NodeId) -> BTreeSet<NodeId> {
        self.access
            .get(&id)
            .map(|a| a.peers.clone())
            .unwrap_or_default()
    }

    /// The user nodes sharing node `id`'s login.
    fn mates_of(&self, id: NodeId) -> BTreeSet<NodeId> {
        self.nodes
            .get(&id)
            .and_then(login_of)
            .and_then(|l| self.by_login.get(l))
            .cloned()
            .unwrap_or_default()
    }

    fn remember(&mut self, node: &NodeInfo) {
        if let Some(login) = login_of(node) {
            self.by_login
                .entry(login.to_owned())
                .or_default()
                .insert(node.id);
        }
        if node.addresses.is_empty() {
            self.addressless.insert(node.id);
        }
    }

    fn forget(&mut self, node: &NodeInfo) {
        if let Some(login) = login_of(node) {
            if let Some(ids) = self.by_login.get_mut(login) {
                ids.remove(&node.id);
                if ids.is_empty() {
                    self.by_login.remove(login);
                }
            }
        }
        self.addressless.remove(&node.id);
    }
}

/// The nodes a rule's sources and destinations cover.
type Covered = (BTreeSet<NodeId>, BTreeSet<NodeId>);

/// For each rule of `new` (network rules, then apps): what an equal rule of
/// `old` covers, if there is one.
fn reuse(
    old: &Rules,
    new: &Rules,
    mut srcs: Vec<BTreeSet<NodeId>>,
    mut dsts: Vec<BTreeSet<NodeId>>,
) -> Vec<Option<Covered>> {
    let mut take = |i: Option<usize>| {
        let i = i?;
        let src = std::mem::take(srcs.get_mut(i)?);
        let dst = std::mem::take(dsts.get_mut(i)?);
        Some((src, dst))
    };
    let offset = old.rules.len();
    let mut out: Vec<Option<Covered>> = new
        .rules
        .iter()
        .map(|r| take(old.rules.iter().position(|o| o == r)))
        .collect();
    out.extend(
        new.apps
            .iter()
            .map(|a| take(old.apps.iter().position(|o| o == a).map(|i| offset + i))),
    );
    out
}

impl Rules {
    /// Whether these rules hold rule `i` of `other` (network rules, then apps).
    fn has_rule_of(&self, other: &Rules, i: usize) -> bool {
        match other.rules.get(i) {
            Some(rule) => self.rules.contains(rule),
            None => other
                .apps
                .get(i - other.rules.len())
                .is_some_and(|app| self.apps.contains(app)),
        }
    }
}

/// Which sides of a rule cover a node.
struct Sides {
    src: bool,
    /// `autogroup:self` aside.
    dst: bool,
}

/// Which sides of rule `i` (network rules, then apps) cover a node seen as `subjects`.
fn sides(rules: &Rules, i: usize, subjects: &[Subject]) -> Sides {
    let covers = |t: &Target| subjects.iter().any(|s| t.covers(s));
    match rules.rules.get(i) {
        Some(rule) => Sides {
            src: rule.src.iter().any(covers),
            dst: rule.dst.iter().any(|d| covers(&d.target)),
        },
        None => match rules.apps.get(i - rules.rules.len()) {
            Some(app) => Sides {
                src: app.src.iter().any(covers),
                dst: app.dst.iter().any(covers),
            },
            None => Sides {
                src: false,
                dst: false,
            },
        },
    }
}

/// Whether rule `i` (network rules, then apps) has an `autogroup:self` destination.
fn has_self_dst(rules: &Rules, i: usize) -> bool {
    match rules.rules.get(i) {
        Some(rule) => rule.dst.iter().any(|d| d.target == Target::SelfUser),
        None => rules
            .apps
            .get(i - rules.rules.len())
            .is_some_and(|app: &AppRule| app.dst.contains(&Target::SelfUser)),
    }
}

/// A node as rules see it, once per address (once without an address when it has none).
fn subjects(node: &NodeInfo) -> Vec<Subject> {
    if node.addresses.is_empty() {
        return vec![Subject::node(node, None)];
    }
    node.addresses
        .iter()
        .map(|a| Subject::node(node, Some(*a)))
        .collect()
}

/// The user of a user node (no tags, no workload), which `autogroup:self` matches by.
fn login_of(node: &NodeInfo) -> Option<&str> {
    let identity = &node.identity;
    if identity.tags.is_empty() && identity.workload.is_none() {
        identity.user.as_deref()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use weft_proto::Identity;

    use super::*;

    const POLICY: &str = r#"{
  "groups": {"group:eng": ["alice@x.com", "carol@x.com"]},
  "tagOwners": {"tag:web": [], "tag:db": []},
  "hosts": {"lan": "100.64.0.4/30"},
  "postures": {"posture:linux": ["node:os == 'linux'"]},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["group:idp:sre"], "dst": ["lan:22"], "srcPosture": ["posture:linux"]},
    {"action": "deny", "src": ["bob@x.com"], "dst": ["tag:db:*"]},
    {"action": "deny", "src": ["lan"], "dst": ["tag:web:443"], "mode": "audit"},
    {"action": "accept", "src": ["spiffe://td/ns/*/sa/api"], "dst": ["tag:db:5432"]},
  ],
  "grants": [
    {"src": ["tag:web"], "dst": ["bob@x.com"], "app": {"x.com/cap/read": [{"all": true}]}},
  ],
}"#;

    fn arb_node() -> impl Strategy<Value = NodeInfo> {
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
            Just(Identity {
                workload: Some("spiffe://td/ns/prod/sa/api".into()),
                ..Identity::default()
            }),
        ];
        let os = prop_oneof![Just("linux"), Just("macos")];
        (0u64..8, identity, 0u8..10, os).prop_map(|(id, identity, host, os)| NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            // Host 0: a node without addresses yet.
            addresses: if host == 0 {
                Vec::new()
            } else {
                vec![
                    IpAddr::V4(Ipv4Addr::new(100, 64, 0, host)),
                    IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, u16::from(host))),
                ]
            },
            identity,
            attributes: BTreeMap::from([("node:os".to_owned(), os.to_owned())]),
        })
    }

    /// Rules that reach everyone, by address and by user, for the node changes below.
    const WIDE: &str = r#"{
  "groups": {"group:eng": ["alice@x.com", "carol@x.com"]},
  "tagOwners": {"tag:web": [], "tag:db": []},
  "postures": {"posture:linux": ["node:os == 'linux'"]},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
    {"action": "accept", "src": ["autogroup:tagged"], "dst": ["100.64.0.0/29:22"]},
    {"action": "accept", "src": ["group:eng"], "dst": ["autogroup:self:*", "fd7a::/125:80"], "srcPosture": ["posture:linux"]},
    {"action": "deny", "src": ["group:idp:sre"], "dst": ["*:22"], "mode": "audit"},
  ],
  "grants": [
    {"src": ["autogroup:member"], "dst": ["autogroup:self"], "app": {"x.com/cap/own": [{}]}},
  ],
}"#;

    #[derive(Debug, Clone)]
    enum Change {
        Upsert(NodeInfo),
        Remove(u64),
        Policy(Vec<bool>, bool),
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => arb_node().prop_map(Change::Upsert),
            2 => (0u64..8).prop_map(Change::Remove),
            1 => (prop::collection::vec(any::<bool>(), 7), any::<bool>())
                .prop_map(|(drop, carol)| Change::Policy(drop, carol)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn incremental_equals_full_compile(
            wide in any::<bool>(),
            initial in prop::collection::vec(arb_node(), 0..6),
            changes in prop::collection::vec(arb_change(), 1..8),
        ) {
            let source = if wide { WIDE } else { POLICY };
            let mut engine = Engine::new(Policy::parse(source, "p").unwrap(), initial);
            for change in changes {
                match change {
                    Change::Upsert(node) => { engine.upsert(node); }
                    Change::Remove(id) => { engine.remove(NodeId(id)); }
                    Change::Policy(drop, carol) => {
                        engine.set_policy(Policy::parse(&variant(&drop, carol, false), "p").unwrap());
                    }
                }
                let nodes: Vec<NodeInfo> = engine.nodes.values().cloned().collect();
                let full = engine.policy.compile(&nodes).nodes;
                prop_assert_eq!(&engine.access, &full);
            }
        }
    }

    /// POLICY with some rules dropped, one group changed, or audit mode on.
    fn variant(drop: &[bool], carol_in_eng: bool, audit: bool) -> String {
        let mut text = POLICY.to_owned();
        let rules: Vec<&str> = POLICY
            .lines()
            .filter(|l| l.trim_start().starts_with("{\"action\""))
            .collect();
        for (rule, dropped) in rules.iter().zip(drop) {
            if *dropped {
                text = text.replace(&format!("{rule}\n"), "");
            }
        }
        if !carol_in_eng {
            text = text.replace(", \"carol@x.com\"]", "]");
        }
        if audit {
            text = text.replacen('{', "{\"mode\": \"audit\",", 1);
        }
        text
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn policy_changes_recompile_to_the_full_result(
            nodes in prop::collection::vec(arb_node(), 0..7),
            before in (prop::collection::vec(any::<bool>(), 7), any::<bool>(), prop::bool::weighted(0.2)),
            after in (prop::collection::vec(any::<bool>(), 7), any::<bool>(), prop::bool::weighted(0.2)),
        ) {
            let first = Policy::parse(&variant(&before.0, before.1, before.2), "p").unwrap();
            let second = Policy::parse(&variant(&after.0, after.1, after.2), "p").unwrap();
            let mut engine = Engine::new(first, nodes);
            engine.set_policy(second.clone());
            let nodes: Vec<NodeInfo> = engine.nodes.values().cloned().collect();
            prop_assert_eq!(&engine.access, &second.compile(&nodes).nodes);
        }
    }

    /// A node with address 100.64.`subnet`.`id`.
    fn node_in(subnet: u8, id: u64, identity: Identity) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(
                100,
                64,
                subnet,
                u8::try_from(id).unwrap(),
            ))],
            identity,
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn a_policy_change_recompiles_only_the_nodes_it_concerns() {
        let node = |id, identity| node_in(2, id, identity);
        let person = |login: &str| Identity {
            user: Some(login.into()),
            ..Identity::default()
        };
        let nodes = vec![
            node(1, person("alice@x.com")),
            node(2, person("carol@x.com")),
            node(3, Identity::tagged(vec!["tag:web".into()])),
            node(4, Identity::tagged(vec!["tag:db".into()])),
        ];
        let all = [false; 7];
        let mut engine = Engine::new(
            Policy::parse(&variant(&all, true, false), "p").unwrap(),
            nodes,
        );
        // carol leaves group:eng: the rule using the group changes, and it concerns eng's members and the web tier.
        let touched = engine.set_policy(Policy::parse(&variant(&all, false, false), "p").unwrap());
        assert_eq!(touched, BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)]));
        assert!(!engine.access()[&NodeId(3)].peers.contains(&NodeId(2)));
    }

    #[test]
    fn a_change_recompiles_only_what_it_touches() {
        let policy = Policy::parse(POLICY, "p").unwrap();
        let node = |id, identity| node_in(1, id, identity);
        let web = |id| node(id, Identity::tagged(vec!["tag:web".into()]));
        let db = |id| node(id, Identity::tagged(vec!["tag:db".into()]));
        let mut engine = Engine::new(policy, vec![web(1), db(2), db(3), web(4)]);
        let touched = engine.upsert(db(5));
        assert_eq!(touched, BTreeSet::from([NodeId(1), NodeId(4), NodeId(5)]));
        assert!(engine.access()[&NodeId(1)].peers.contains(&NodeId(5)));
        let touched = engine.remove(NodeId(4));
        assert_eq!(touched, BTreeSet::from([NodeId(2), NodeId(3), NodeId(5)]));
        assert!(!engine.access().contains_key(&NodeId(4)));
    }
}
