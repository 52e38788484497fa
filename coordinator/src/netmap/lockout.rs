//! The lockout guard: a new policy under which a declared administrator
//! (`serve --admin PRINCIPAL`) who could reach something before reaches
//! nothing any more is refused, unless forced with `policy set --force`.
//!
//! An administrator who loses access to the overlay can no longer repair it
//! from inside; the guard turns that mistake into a refusal that names the
//! administrator and the override.

use weft_policy::{NodeInfo, Policy};
use weft_proto::{FilterRule, Identity, Protocol, RuleAction};

/// A new policy would cut a declared administrator off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the new policy would lock out administrator {admin}: under the policy in force it reaches \
     other nodes, under the new one it reaches none. Fix the policy, or if this is intended \
     install it with `weft-coordinator policy set --force FILE` (a reloaded --policy file \
     cannot be forced)"
)]
pub(crate) struct Lockout {
    /// The principal as given to `--admin`.
    pub(crate) admin: String,
}

/// Checks `new` against the policy in force (`old`) for every principal in
/// `admins`, over the registered `nodes`.
pub(crate) fn check(
    admins: &[String],
    old: Option<&Policy>,
    new: &Policy,
    nodes: &[NodeInfo],
) -> Result<(), Lockout> {
    let Some(old) = old else {
        // Nothing could be reached before: nobody can be locked out.
        return Ok(());
    };
    for admin in admins {
        if reaches_anything(old, admin, nodes) && !reaches_anything(new, admin, nodes) {
            return Err(Lockout {
                admin: admin.clone(),
            });
        }
    }
    Ok(())
}

/// Whether a node of `principal` may open a connection to some other node
/// under `policy`: some other node's compiled filter has a rule that is not
/// an enforced deny admitting one of the principal's addresses, and the two
/// are peers.
fn reaches_anything(policy: &Policy, principal: &str, nodes: &[NodeInfo]) -> bool {
    let compiled = policy.compile(nodes);
    let mine: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| is_principal(&n.identity, principal))
        .collect();
    mine.iter().any(|me| {
        let Some(access) = compiled.nodes.get(&me.id) else {
            return false;
        };
        access.peers.iter().any(|peer| {
            compiled.nodes.get(peer).is_some_and(|theirs| {
                let rules = &theirs.filter.rules;
                me.addresses.iter().any(|addr| {
                    let from = |rule: &&FilterRule| rule.src.iter().any(|net| net.contains(addr));
                    rules
                        .iter()
                        .filter(from)
                        .filter(|rule| rule.action != RuleAction::Deny)
                        .any(|admit| {
                            !rules
                                .iter()
                                .filter(from)
                                .filter(|rule| rule.action == RuleAction::Deny)
                                .any(|deny| covers(deny, admit))
                        })
                })
            })
        })
    })
}

/// Whether `deny` drops everything `admit` admits (destinations, protocols
/// and ports; the source is already known to match both). One deny rule must
/// cover the whole of `admit`: a guard that misses a lockout split over
/// several deny rules stays silent rather than refusing a harmless policy.
fn covers(deny: &FilterRule, admit: &FilterRule) -> bool {
    let protocols = |rule: &FilterRule| -> Vec<Protocol> {
        if rule.protocols.is_empty() {
            Protocol::DEFAULT.to_vec()
        } else {
            rule.protocols.clone()
        }
    };
    let denied = protocols(deny);
    admit
        .dst
        .iter()
        .all(|d| deny.dst.iter().any(|net| net.contains(d)))
        && protocols(admit).iter().all(|p| denied.contains(p))
        && admit.ports.iter().all(|range| {
            deny.ports
                .iter()
                .any(|r| r.first <= range.first && range.last <= r.last)
        })
}

/// Whether `identity` is `principal`: one of its tags or IdP groups, its
/// user, or its workload.
fn is_principal(identity: &Identity, principal: &str) -> bool {
    identity.tags.iter().any(|t| t == principal)
        || identity.groups.iter().any(|g| g == principal)
        || identity.user.as_deref() == Some(principal)
        || identity.workload.as_deref() == Some(principal)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use weft_proto::NodeId;

    use super::*;

    fn node(id: u64, tag: &str) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, id as u8))],
            identity: Identity::tagged(vec![tag.to_owned()]),
            attributes: BTreeMap::new(),
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(text, "policy.hujson").unwrap()
    }

    const OPEN: &str = r#"{"tagOwners": {"tag:admin": [], "tag:web": []},
        "acls": [{"action": "accept", "src": ["tag:admin"], "dst": ["tag:web:22"]}]}"#;
    const CLOSED: &str = r#"{"tagOwners": {"tag:admin": [], "tag:web": []},
        "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:web:80"]}]}"#;
    const DENIED: &str = r#"{"tagOwners": {"tag:admin": [], "tag:web": []},
        "acls": [{"action": "accept", "src": ["tag:admin"], "dst": ["tag:web:22"]}],
        "deny": [{"src": ["tag:admin"], "dst": ["tag:web:22"]}]}"#;

    fn nodes() -> Vec<NodeInfo> {
        vec![node(1, "tag:admin"), node(2, "tag:web"), node(3, "tag:web")]
    }

    #[test]
    fn a_policy_that_cuts_an_admin_off_is_refused_naming_them() {
        let admins = vec!["tag:admin".to_owned()];
        let err = check(&admins, Some(&policy(OPEN)), &policy(CLOSED), &nodes()).unwrap_err();
        assert_eq!(err.admin, "tag:admin");
        let text = err.to_string();
        assert!(text.contains("tag:admin"), "{text}");
        assert!(text.contains("policy set --force"), "{text}");
    }

    #[test]
    fn a_deny_rule_that_cuts_an_admin_off_is_refused_too() {
        let admins = vec!["tag:admin".to_owned()];
        assert!(check(&admins, Some(&policy(OPEN)), &policy(DENIED), &nodes()).is_err());
    }

    #[test]
    fn policies_that_keep_access_or_concern_no_admin_pass() {
        let admins = vec!["tag:admin".to_owned()];
        check(&admins, Some(&policy(OPEN)), &policy(OPEN), &nodes()).unwrap();
        // An admin who reached nothing before cannot be locked out.
        check(&admins, Some(&policy(CLOSED)), &policy(CLOSED), &nodes()).unwrap();
        check(&admins, None, &policy(CLOSED), &nodes()).unwrap();
        // Without declared admins there is nothing to guard.
        check(&[], Some(&policy(OPEN)), &policy(CLOSED), &nodes()).unwrap();
        // An admin principal with no node reaches nothing either way.
        let others = vec!["alice@example.com".to_owned()];
        check(&others, Some(&policy(OPEN)), &policy(CLOSED), &nodes()).unwrap();
    }
}
