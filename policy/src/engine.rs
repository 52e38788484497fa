//! Incremental compilation: a policy and its nodes, recompiling only what a node change affects.

use std::collections::{BTreeMap, BTreeSet};

use weft_proto::NodeId;

use crate::compile::{affected, compile, compile_for, concerned};
use crate::rules::{AppRule, Rule};
use crate::{NodeAccess, NodeInfo, Policy};

/// Holds a policy, the nodes and every node's compiled access.
///
/// Drive it with [`Engine::upsert`] and [`Engine::remove`] as nodes register,
/// change identity, addresses or attributes, and leave, and with
/// [`Engine::set_policy`] when the policy changes; each returns the nodes
/// whose access was recompiled. [`Engine::access`] always equals what
/// [`Policy::compile`] would produce for the current nodes.
#[derive(Debug, Clone)]
pub struct Engine {
    policy: Policy,
    /// Sorted by id, ids unique.
    nodes: Vec<NodeInfo>,
    access: BTreeMap<NodeId, NodeAccess>,
}

impl Engine {
    /// Compiles `policy` for `nodes` (a later node replaces an earlier one with the same id).
    pub fn new(policy: Policy, nodes: Vec<NodeInfo>) -> Engine {
        let mut by_id: BTreeMap<NodeId, NodeInfo> = BTreeMap::new();
        for node in nodes {
            by_id.insert(node.id, node);
        }
        let nodes: Vec<NodeInfo> = by_id.into_values().collect();
        let access = compile(&policy.rules, &nodes).nodes;
        Engine {
            policy,
            nodes,
            access,
        }
    }

    /// Every node's access.
    pub fn access(&self) -> &BTreeMap<NodeId, NodeAccess> {
        &self.access
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
        let (old, new) = (&self.policy.rules, &policy.rules);
        let kept_old: Vec<&Rule> = old.rules.iter().filter(|r| new.rules.contains(r)).collect();
        let kept_new: Vec<&Rule> = new.rules.iter().filter(|r| old.rules.contains(r)).collect();
        let apps_kept = old
            .apps
            .iter()
            .filter(|a| new.apps.contains(a))
            .eq(new.apps.iter().filter(|a| old.apps.contains(a)));
        let wanted: BTreeSet<usize> =
            if old.audit != new.audit || kept_old != kept_new || !apps_kept {
                (0..self.nodes.len()).collect()
            } else {
                let changed: Vec<&Rule> = old
                    .rules
                    .iter()
                    .filter(|r| !new.rules.contains(r))
                    .chain(new.rules.iter().filter(|r| !old.rules.contains(r)))
                    .collect();
                let changed_apps: Vec<&AppRule> = old
                    .apps
                    .iter()
                    .filter(|a| !new.apps.contains(a))
                    .chain(new.apps.iter().filter(|a| !old.apps.contains(a)))
                    .collect();
                concerned(&changed, &changed_apps, &self.nodes)
            };
        self.policy = policy;
        self.recompile_nodes(&wanted)
    }

    /// Adds or replaces a node; returns the nodes whose access was recompiled.
    pub fn upsert(&mut self, node: NodeInfo) -> BTreeSet<NodeId> {
        let old = match self.nodes.binary_search_by_key(&node.id, |n| n.id) {
            Ok(i) => Some(std::mem::replace(&mut self.nodes[i], node.clone())),
            Err(i) => {
                self.nodes.insert(i, node.clone());
                None
            }
        };
        let changed: Vec<&NodeInfo> = old.iter().chain(std::iter::once(&node)).collect();
        self.recompile(&changed)
    }

    /// Removes a node; returns the nodes whose access was recompiled.
    pub fn remove(&mut self, id: NodeId) -> BTreeSet<NodeId> {
        let Ok(i) = self.nodes.binary_search_by_key(&id, |n| n.id) else {
            return BTreeSet::new();
        };
        let old = self.nodes.remove(i);
        self.access.remove(&id);
        self.recompile(&[&old])
    }

    fn recompile(&mut self, changed: &[&NodeInfo]) -> BTreeSet<NodeId> {
        let wanted = affected(&self.policy.rules, &self.nodes, changed);
        self.recompile_nodes(&wanted)
    }

    fn recompile_nodes(&mut self, wanted: &BTreeSet<usize>) -> BTreeSet<NodeId> {
        let fresh = compile_for(&self.policy.rules, &self.nodes, Some(wanted));
        let mut ids = BTreeSet::new();
        for (i, access) in fresh {
            let id = self.nodes[i].id;
            self.access.insert(id, access);
            ids.insert(id);
        }
        ids
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
        (0u64..8, identity, 1u8..10, os).prop_map(|(id, identity, host, os)| NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            addresses: vec![
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, host)),
                IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, u16::from(host))),
            ],
            identity,
            attributes: BTreeMap::from([("node:os".to_owned(), os.to_owned())]),
        })
    }

    #[derive(Debug, Clone)]
    enum Change {
        Upsert(NodeInfo),
        Remove(u64),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn incremental_equals_full_compile(
            initial in prop::collection::vec(arb_node(), 0..6),
            changes in prop::collection::vec(prop_oneof![
                arb_node().prop_map(Change::Upsert),
                (0u64..8).prop_map(Change::Remove),
            ], 1..8),
        ) {
            let policy = Policy::parse(POLICY, "p").unwrap();
            let mut engine = Engine::new(policy.clone(), initial);
            for change in changes {
                match change {
                    Change::Upsert(node) => { engine.upsert(node); }
                    Change::Remove(id) => { engine.remove(NodeId(id)); }
                }
                let full = policy.compile(&engine.nodes).nodes;
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
            prop_assert_eq!(&engine.access, &second.compile(&engine.nodes).nodes);
        }
    }

    #[test]
    fn a_policy_change_recompiles_only_the_nodes_it_concerns() {
        let node = |id: u64, identity: Identity| NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(
                100,
                64,
                2,
                u8::try_from(id).unwrap(),
            ))],
            identity,
            attributes: BTreeMap::new(),
        };
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
        let node = |id: u64, identity: Identity| NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(
                100,
                64,
                1,
                u8::try_from(id).unwrap(),
            ))],
            identity,
            attributes: BTreeMap::new(),
        };
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
