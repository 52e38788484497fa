//! Flow-level evaluation: what the policy decides for one source, destination, protocol and port.
//!
//! This is what `tests`, `explain`, `diff` and the lockout guard ask, and it
//! follows the precedence every node's filter applies: an enforced deny
//! drops; an audit-mode deny passes (and is logged) where something else
//! would pass; an accept passes; otherwise the default (deny, or in
//! whole-file audit mode pass and log).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use weft_proto::{Protocol, RuleAction};

use crate::compile::NodeInfo;
use crate::ports::has_ports;
use crate::posture;
use crate::rules::{Rule, Rules, Target, Unenforced};
use crate::selector::spiffe_matches;

/// What the policy does with a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// An accept rule admits it.
    Accept,
    /// An enforced deny rule drops it, or nothing admits it.
    Deny,
    /// It would be denied, but audit mode lets it pass and logs it.
    AuditDeny,
}

impl Verdict {
    /// Whether traffic passes (accept, or a denial in audit mode).
    pub fn passes(self) -> bool {
        matches!(self, Verdict::Accept | Verdict::AuditDeny)
    }

    /// The verdict as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Deny => "deny",
            Verdict::AuditDeny => "audit-deny",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One end of a flow as policy sees it: who, from which address, with which attributes.
///
/// Identities are normalised the way nodes are matched: a workload is its
/// SPIFFE ID and tags, a tagged node its tags, and only a user node has a
/// user and identity-provider groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subject {
    pub(crate) user: Option<String>,
    pub(crate) groups: Vec<String>,
    pub(crate) tags: Vec<String>,
    pub(crate) workload: Option<String>,
    /// The address (or, for a CIDR principal, the prefix) traffic comes from or goes to.
    pub(crate) addr: Option<IpNet>,
    /// Node attributes; `None` for sources that are not nodes, which no posture admits.
    pub(crate) attributes: Option<BTreeMap<String, String>>,
    /// For `explain` only: a construct weft does not enforce, named as a
    /// principal (`autogroup:internet`, `svc:NAME`, …); no rule covers it.
    pub(crate) construct: Option<Unenforced>,
}

impl Subject {
    /// A node, seen at one of its addresses.
    pub(crate) fn node(node: &NodeInfo, addr: Option<IpAddr>) -> Subject {
        let identity = &node.identity;
        let mut subject = Subject {
            addr: addr.map(IpNet::from),
            attributes: Some(node.attributes.clone()),
            tags: identity.tags.clone(),
            ..Subject::default()
        };
        if identity.workload.is_some() {
            subject.workload.clone_from(&identity.workload);
        } else if identity.tags.is_empty() {
            subject.user.clone_from(&identity.user);
            subject.groups.clone_from(&identity.groups);
        }
        subject
    }

    /// A user node: no tags, no workload, and a user or identity-provider groups.
    pub(crate) fn is_member(&self) -> bool {
        self.tags.is_empty()
            && self.workload.is_none()
            && (self.user.is_some() || !self.groups.is_empty())
    }

    fn same_user(&self, other: &Subject) -> bool {
        self.is_member() && other.is_member() && self.user.is_some() && self.user == other.user
    }
}

impl Target {
    /// Whether this target covers the subject (`autogroup:self` needs the source: see [`Rule::covers_dst`]).
    pub(crate) fn covers(&self, s: &Subject) -> bool {
        match self {
            Target::Any => true,
            Target::User(user) => s.user.as_deref() == Some(user.as_str()),
            Target::Group { members, .. } => s.user.as_ref().is_some_and(|u| members.contains(u)),
            Target::External(group) => s.groups.contains(group),
            Target::Tag(tag) => s.tags.contains(tag),
            Target::Workload(pattern) => s
                .workload
                .as_deref()
                .is_some_and(|id| spiffe_matches(pattern, id)),
            Target::Member => s.is_member(),
            Target::Tagged => !s.tags.is_empty(),
            Target::SelfUser => false,
            Target::Prefix(net) => s.addr.is_some_and(|a| net.contains(&a)),
            Target::Role { users, groups, .. } => {
                s.user.as_ref().is_some_and(|u| users.contains(u))
                    || s.groups.iter().any(|g| groups.contains(g))
            }
            Target::Unenforced(_) => false,
        }
    }
}

impl Rule {
    /// Whether the rule admits `protocol` to `port` (ports matter for TCP and UDP only).
    pub(crate) fn admits(
        &self,
        protocol: Protocol,
        port: u16,
        ports: &[weft_proto::PortRange],
    ) -> bool {
        let protocol_ok = if self.protocols.is_empty() {
            Protocol::DEFAULT.contains(&protocol)
        } else {
            self.protocols.contains(&protocol)
        };
        protocol_ok && (!has_ports(protocol) || ports.iter().any(|r| r.contains(port)))
    }

    /// Whether the rule's sources (and posture) cover `src`.
    pub(crate) fn covers_src(&self, src: &Subject) -> bool {
        posture::satisfied(self.posture.as_deref(), src.attributes.as_ref())
            && self.src.iter().any(|t| t.covers(src))
    }

    /// Whether the flow matches the rule.
    pub(crate) fn matches(
        &self,
        src: &Subject,
        dst: &Subject,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        self.covers_src(src)
            && self.dst.iter().any(|d| {
                let covered = match d.target {
                    Target::SelfUser => src.same_user(dst),
                    _ => d.target.covers(dst),
                };
                covered && self.admits(protocol, port, &d.ports)
            })
    }
}

/// The verdict on one flow and the rules that decide it (none when the default decides).
pub(crate) fn decide<'r>(
    rules: &'r Rules,
    src: &Subject,
    dst: &Subject,
    protocol: Protocol,
    port: u16,
) -> (Verdict, Vec<&'r Rule>) {
    let matching = |action: RuleAction| -> Vec<&'r Rule> {
        rules
            .rules
            .iter()
            .filter(|r| r.action == action && r.matches(src, dst, protocol, port))
            .collect()
    };
    let deny = matching(RuleAction::Deny);
    if !deny.is_empty() {
        return (Verdict::Deny, deny);
    }
    let accept = matching(RuleAction::Accept);
    let audit = matching(RuleAction::AuditDeny);
    if !audit.is_empty() && (!accept.is_empty() || rules.audit) {
        return (Verdict::AuditDeny, audit);
    }
    if !accept.is_empty() {
        return (Verdict::Accept, accept);
    }
    if rules.audit {
        (Verdict::AuditDeny, Vec::new())
    } else {
        (Verdict::Deny, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::{Identity, NodeId, PortRange};

    use super::*;
    use crate::rules::DstTarget;

    fn rule(
        action: RuleAction,
        src: Vec<Target>,
        dst: Vec<(Target, Vec<PortRange>)>,
        protocols: Vec<Protocol>,
    ) -> Rule {
        Rule {
            line: 1,
            text: String::new(),
            id: weft_proto::RuleId::default(),
            action,
            src,
            dst: dst
                .into_iter()
                .map(|(target, ports)| DstTarget { target, ports })
                .collect(),
            protocols,
            posture: None,
        }
    }

    fn tag(name: &str) -> Target {
        Target::Tag(name.into())
    }

    fn tagged(name: &str) -> Subject {
        Subject {
            tags: vec![name.into()],
            ..Subject::default()
        }
    }

    fn user(login: &str) -> Subject {
        Subject {
            user: Some(login.into()),
            ..Subject::default()
        }
    }

    fn port(n: u16) -> Vec<PortRange> {
        vec![PortRange { first: n, last: n }]
    }

    fn verdict(
        rules: &[Rule],
        audit: bool,
        src: &Subject,
        dst: &Subject,
        p: Protocol,
        n: u16,
    ) -> Verdict {
        let rules = Rules {
            rules: rules.to_vec(),
            apps: Vec::new(),
            inert: Vec::new(),
            audit,
        };
        decide(&rules, src, dst, p, n).0
    }

    #[test]
    fn groups_and_external_groups_cover_users_only() {
        let eng = Target::Group {
            name: "group:eng".into(),
            members: vec!["alice@x".into(), "bob@x".into()],
        };
        assert!(eng.covers(&user("alice@x")));
        assert!(!eng.covers(&user("carol@x")));
        assert!(!eng.covers(&tagged("tag:eng")));
        let idp = Target::External("group:idp:eng".into());
        let carol = Subject {
            groups: vec!["group:idp:eng".into()],
            ..user("carol@x")
        };
        assert!(idp.covers(&carol) && !idp.covers(&user("alice@x")));
        assert!(Target::Member.covers(&carol) && !Target::Member.covers(&tagged("tag:a")));
        assert!(Target::Tagged.covers(&tagged("tag:a")) && !Target::Tagged.covers(&carol));
    }

    #[test]
    fn nodes_are_matched_by_their_strongest_identity() {
        let mut node = NodeInfo {
            id: NodeId(1),
            name: "n".into(),
            addresses: vec![],
            identity: Identity {
                user: Some("alice@x".into()),
                groups: vec!["group:idp:eng".into()],
                workload: Some("spiffe://td/ns/a/sa/b".into()),
                tags: vec!["tag:k8s".into()],
            },
            attributes: BTreeMap::new(),
        };
        let workload = Subject::node(&node, None);
        assert!(Target::Workload("spiffe://td/ns/*/sa/b".into()).covers(&workload));
        assert!(tag("tag:k8s").covers(&workload));
        assert!(!Target::User("alice@x".into()).covers(&workload));
        node.identity.workload = None;
        let tagged = Subject::node(&node, None);
        assert!(!Target::External("group:idp:eng".into()).covers(&tagged));
        node.identity.tags.clear();
        let person = Subject::node(&node, None);
        assert!(Target::User("alice@x".into()).covers(&person));
        assert!(Target::External("group:idp:eng".into()).covers(&person));
    }

    #[test]
    fn prefixes_cover_contained_addresses() {
        let net = Target::Prefix("100.64.0.0/24".parse().unwrap());
        let at = |a: &str| Subject {
            addr: Some(a.parse().unwrap()),
            ..Subject::default()
        };
        assert!(net.covers(&at("100.64.0.9/32")));
        assert!(net.covers(&at("100.64.0.128/25")));
        assert!(!net.covers(&at("100.64.0.0/16")));
        assert!(!net.covers(&at("fd7a::1/128")));
        assert!(!net.covers(&user("alice@x")));
        assert!(Target::Any.covers(&tagged("tag:x")));
    }

    #[test]
    fn ports_apply_to_tcp_and_udp_but_not_icmp() {
        let rules = [rule(
            RuleAction::Accept,
            vec![tag("tag:web")],
            vec![(tag("tag:db"), port(5432))],
            vec![],
        )];
        let (web, db) = (tagged("tag:web"), tagged("tag:db"));
        let v = |s: &Subject, d: &Subject, p, n| verdict(&rules, false, s, d, p, n);
        assert_eq!(v(&web, &db, Protocol::Tcp, 5432), Verdict::Accept);
        assert_eq!(v(&web, &db, Protocol::Udp, 5432), Verdict::Accept);
        assert_eq!(v(&web, &db, Protocol::Tcp, 22), Verdict::Deny);
        assert_eq!(v(&web, &db, Protocol::Icmp, 0), Verdict::Accept);
        assert_eq!(v(&web, &db, Protocol::Other(132), 5432), Verdict::Deny);
        assert_eq!(v(&db, &web, Protocol::Tcp, 5432), Verdict::Deny);
    }

    #[test]
    fn deny_wins_and_audit_denies_only_log() {
        let accept = rule(
            RuleAction::Accept,
            vec![Target::Any],
            vec![(Target::Any, vec![PortRange::ANY])],
            vec![],
        );
        let deny = rule(
            RuleAction::Deny,
            vec![tag("tag:a")],
            vec![(tag("tag:b"), port(22))],
            vec![],
        );
        let audit = rule(
            RuleAction::AuditDeny,
            vec![tag("tag:a")],
            vec![(tag("tag:b"), port(80))],
            vec![],
        );
        let (a, b) = (tagged("tag:a"), tagged("tag:b"));
        let all = [accept.clone(), deny.clone(), audit.clone()];
        assert_eq!(
            verdict(&all, false, &a, &b, Protocol::Tcp, 22),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&all, false, &a, &b, Protocol::Tcp, 80),
            Verdict::AuditDeny
        );
        assert_eq!(
            verdict(&all, false, &a, &b, Protocol::Tcp, 443),
            Verdict::Accept
        );
        // An audit deny never lets through what nothing accepts.
        let without_accept = [deny, audit];
        assert_eq!(
            verdict(&without_accept, false, &a, &b, Protocol::Tcp, 80),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&without_accept, true, &a, &b, Protocol::Tcp, 80),
            Verdict::AuditDeny
        );
        assert_eq!(
            verdict(&[], true, &a, &b, Protocol::Tcp, 1),
            Verdict::AuditDeny
        );
        assert_eq!(verdict(&[], false, &a, &b, Protocol::Tcp, 1), Verdict::Deny);
    }

    #[test]
    fn self_means_the_same_user() {
        let rules = [rule(
            RuleAction::Accept,
            vec![Target::Member],
            vec![(Target::SelfUser, vec![PortRange::ANY])],
            vec![],
        )];
        let v = |s: &Subject, d: &Subject| verdict(&rules, false, s, d, Protocol::Tcp, 22);
        assert_eq!(v(&user("a@x"), &user("a@x")), Verdict::Accept);
        assert_eq!(v(&user("a@x"), &user("b@x")), Verdict::Deny);
        assert_eq!(v(&tagged("tag:a"), &tagged("tag:a")), Verdict::Deny);
    }

    #[test]
    fn explicit_protocols_restrict() {
        let rules = [rule(
            RuleAction::Accept,
            vec![Target::Any],
            vec![(Target::Any, vec![PortRange::ANY])],
            vec![Protocol::Udp],
        )];
        let (a, b) = (user("a@x"), tagged("tag:b"));
        assert_eq!(
            verdict(&rules, false, &a, &b, Protocol::Udp, 53),
            Verdict::Accept
        );
        assert_eq!(
            verdict(&rules, false, &a, &b, Protocol::Tcp, 53),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&rules, false, &a, &b, Protocol::Icmp, 0),
            Verdict::Deny
        );
    }
}
