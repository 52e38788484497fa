//! The lockout guard: a new policy under which a declared administrator
//! (`serve --admin PRINCIPAL`) who could reach something before reaches
//! nothing any more is refused, unless forced with `policy set --force`.
//!
//! An administrator who loses access to the overlay can no longer repair it
//! from inside; the guard turns that mistake into a refusal that names the
//! administrator and the override.

use weft_policy::{NodeInfo, Policy};

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
        if old.reaches_anything(admin, nodes) && !new.reaches_anything(admin, nodes) {
            return Err(Lockout {
                admin: admin.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use weft_proto::NodeId;

    use super::*;
    use weft_proto::Identity;

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
