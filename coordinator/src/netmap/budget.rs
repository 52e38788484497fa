//! The netmap budget: a policy under which some node's netmap would encode
//! to more than [`NETMAP_BUDGET`] is refused before it is installed.
//!
//! A netmap larger than a control frame cannot be sent at all: the session
//! would end, and end again on every reconnect, while the node kept its old
//! filter. Refusing the policy up front, naming the nodes it would hurt,
//! keeps the policy in force and every session up. The budget is a quarter
//! of the frame limit, so the nodes that join after a policy was accepted,
//! each adding a peer to its neighbours' netmaps, have room to grow into.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use weft_policy::Policy;
use weft_proto::{NodeId, MAX_FRAME_LEN};

use crate::nodes::NodeRecord;

/// The largest netmap (peers, filter, capabilities, encoded) a policy may
/// give any node.
pub(crate) const NETMAP_BUDGET: usize = MAX_FRAME_LEN / 4;

/// How many of the largest netmaps a refusal names.
const NAMED: usize = 5;

/// A policy would give some nodes a netmap over the budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the policy would give {over} node(s) a netmap over the {} budget per node \
     (a quarter of the {}-byte control frame limit): {}. Shrink the policy: \
     fewer rules, or rules naming groups and tags instead of long address lists",
    Bytes(*budget),
    MAX_FRAME_LEN,
    Worst(worst)
)]
pub(crate) struct OverBudget {
    /// The largest netmaps over the budget, largest first: the node's name,
    /// id and encoded netmap size.
    pub(crate) worst: Vec<(String, NodeId, usize)>,
    /// How many nodes are over the budget.
    pub(crate) over: usize,
    /// The budget, in bytes.
    pub(crate) budget: usize,
}

/// Checks that under `policy` no node in `nodes` (those not expired) gets
/// a netmap over `budget` bytes.
pub(crate) fn check<'n>(
    policy: &Policy,
    nodes: impl IntoIterator<Item = &'n NodeRecord>,
    budget: usize,
) -> Result<(), OverBudget> {
    let nodes: BTreeMap<NodeId, &NodeRecord> = nodes.into_iter().map(|n| (n.id, n)).collect();
    let infos: Vec<_> = nodes.values().map(|n| n.info()).collect();
    let compiled = policy.compile(&infos);
    let peer_sizes: BTreeMap<NodeId, usize> = nodes
        .iter()
        .map(|(id, n)| (*id, encoded_len(&n.peer())))
        .collect();
    let mut over: Vec<(String, NodeId, usize)> = Vec::new();
    for (id, access) in &compiled.nodes {
        let Some(record) = nodes.get(id) else {
            continue;
        };
        let peers: usize = access
            .peers
            .iter()
            .filter(|p| *p != id)
            .filter_map(|p| peer_sizes.get(p))
            .sum();
        let size = encoded_len(&record.self_node())
            + peers
            + encoded_len(&access.filter)
            + encoded_len(&access.capabilities)
            // The revision and the peer count, at most ten bytes each.
            + 20;
        if size > budget {
            over.push((record.name.clone(), *id, size));
        }
    }
    if over.is_empty() {
        return Ok(());
    }
    over.sort_by(|a, b| b.2.cmp(&a.2).then(a.1.cmp(&b.1)));
    let count = over.len();
    over.truncate(NAMED);
    Err(OverBudget {
        worst: over,
        over: count,
        budget,
    })
}

/// The postcard encoding's length; a value that does not encode cannot be
/// sent either, so it counts as over any budget.
fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::experimental::serialized_size(value).unwrap_or(usize::MAX / 4)
}

/// A byte count, in the unit an operator reads at a glance.
struct Bytes(usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: usize = 1 << 20;
        if self.0 >= MIB {
            write!(
                f,
                "{:.1} MiB ({} bytes)",
                self.0 as f64 / MIB as f64,
                self.0
            )
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

/// The named nodes of a refusal.
struct Worst<'a>(&'a [(String, NodeId, usize)]);

impl fmt::Display for Worst<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, id, size)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} ({id}) {}", Bytes(*size))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::tests::node;

    /// `rules` accept rules from distinct addresses to `tag:db`, one port each.
    fn policy(rules: usize) -> Policy {
        let acls: Vec<String> = (0..rules)
            .map(|i| {
                format!(
                    r#"{{"action": "accept", "src": ["198.18.{}.{}"], "dst": ["tag:db:{}"]}}"#,
                    i / 256,
                    i % 256,
                    1 + i
                )
            })
            .collect();
        let text = format!(
            r#"{{"tagOwners": {{"tag:web": [], "tag:db": []}}, "acls": [{}]}}"#,
            acls.join(",")
        );
        Policy::parse(&text, "policy.hujson").unwrap()
    }

    #[test]
    fn a_policy_within_the_budget_passes() {
        let nodes = [node(1, "tag:web"), node(2, "tag:db")];
        check(&policy(100), &nodes, NETMAP_BUDGET).unwrap();
    }

    #[test]
    fn a_policy_over_the_budget_names_the_largest_netmaps_and_the_budget() {
        let nodes = [node(1, "tag:web"), node(2, "tag:db"), node(3, "tag:db")];
        let small = check(&policy(500), &nodes, 4096).unwrap_err();
        assert_eq!(small.over, 2, "only the databases filter anything");
        let names: Vec<_> = small.worst.iter().map(|w| w.1).collect();
        assert_eq!(names, [NodeId(2), NodeId(3)]);
        assert!(small.worst.iter().all(|w| w.2 > 4096 && w.2 < 64 * 1024));
        let text = small.to_string();
        for expected in ["db-2 (n2)", "db-3 (n3)", "4096 bytes", "frame limit"] {
            assert!(text.contains(expected), "{expected:?} missing from {text}");
        }
        assert!(!text.contains("web-1"), "{text}");
    }

    #[test]
    fn the_size_counted_is_the_encoded_netmap() {
        let nodes = [node(1, "tag:web"), node(2, "tag:db")];
        let policy = policy(300);
        let compiled = policy.compile(&nodes.iter().map(NodeRecord::info).collect::<Vec<_>>());
        let access = &compiled.nodes[&NodeId(2)];
        let netmap = weft_proto::NetMap {
            revision: 1,
            self_node: nodes[1].self_node(),
            peers: Vec::new(),
            filter: access.filter.clone(),
            capabilities: access.capabilities.clone(),
        };
        let exact = postcard::to_allocvec(&netmap).unwrap().len();
        let counted = check(&policy, &nodes, 0).unwrap_err().worst[0].2;
        assert!(
            (exact..exact + 24).contains(&counted),
            "counted {counted}, encoded {exact}"
        );
    }
}
