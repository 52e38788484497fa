//! Principal-level evaluation: does some rule let this user, tag or address reach that one?
//!
//! This is what `tests` entries check. It needs no nodes: a user stands for
//! an untagged node of that user, a tag for a node carrying (only) that tag,
//! an address for traffic from or to it.

use ipnet::IpNet;
use weft_proto::Protocol;

use crate::ports::has_ports;
use crate::rules::{Rule, Target};

/// One concrete principal a test talks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Principal<'a> {
    /// An untagged node of this user.
    User(&'a str),
    /// A node with this tag.
    Tag(&'a str),
    /// Traffic from or to these addresses.
    Addr(IpNet),
}

impl Target {
    /// The concrete principals a test's src or dst stands for: a group is each of its members.
    pub(crate) fn principals(&self) -> Vec<Principal<'_>> {
        match self {
            Target::Any => Vec::new(),
            Target::User(user) => vec![Principal::User(user)],
            Target::Group { members, .. } => members.iter().map(|m| Principal::User(m)).collect(),
            Target::Tag(tag) => vec![Principal::Tag(tag)],
            Target::Prefix(net) => vec![Principal::Addr(*net)],
        }
    }

    /// Whether this target covers the principal.
    pub(crate) fn covers(&self, principal: Principal<'_>) -> bool {
        match (self, principal) {
            (Target::Any, _) => true,
            (Target::User(user), Principal::User(p)) => user == p,
            (Target::Group { members, .. }, Principal::User(p)) => members.iter().any(|m| m == p),
            (Target::Tag(tag), Principal::Tag(p)) => tag == p,
            (Target::Prefix(net), Principal::Addr(p)) => net.contains(&p),
            _ => false,
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
}

/// The first rule that lets `src` reach `dst` on `port` over `protocol`, if any.
pub(crate) fn first_accepting<'r>(
    rules: &'r [Rule],
    src: Principal<'_>,
    dst: Principal<'_>,
    protocol: Protocol,
    port: u16,
) -> Option<&'r Rule> {
    rules.iter().find(|rule| {
        rule.src.iter().any(|s| s.covers(src))
            && rule
                .dst
                .iter()
                .any(|d| d.target.covers(dst) && rule.admits(protocol, port, &d.ports))
    })
}

#[cfg(test)]
mod tests {
    use weft_proto::PortRange;

    use super::*;
    use crate::rules::DstTarget;

    fn rule(
        src: Vec<Target>,
        dst: Vec<(Target, Vec<PortRange>)>,
        protocols: Vec<Protocol>,
    ) -> Rule {
        Rule {
            line: 1,
            src,
            dst: dst
                .into_iter()
                .map(|(target, ports)| DstTarget { target, ports })
                .collect(),
            protocols,
        }
    }

    fn tag(name: &str) -> Target {
        Target::Tag(name.into())
    }

    fn port(n: u16) -> Vec<PortRange> {
        vec![PortRange { first: n, last: n }]
    }

    #[test]
    fn groups_cover_their_members_only() {
        let eng = Target::Group {
            name: "group:eng".into(),
            members: vec!["alice@x".into(), "bob@x".into()],
        };
        assert!(eng.covers(Principal::User("alice@x")));
        assert!(!eng.covers(Principal::User("carol@x")));
        assert!(!eng.covers(Principal::Tag("tag:eng")));
        assert_eq!(
            eng.principals(),
            vec![Principal::User("alice@x"), Principal::User("bob@x")]
        );
    }

    #[test]
    fn prefixes_cover_contained_addresses() {
        let net = Target::Prefix("100.64.0.0/24".parse().unwrap());
        assert!(net.covers(Principal::Addr("100.64.0.9/32".parse().unwrap())));
        assert!(net.covers(Principal::Addr("100.64.0.128/25".parse().unwrap())));
        assert!(!net.covers(Principal::Addr("100.64.0.0/16".parse().unwrap())));
        assert!(!net.covers(Principal::Addr("fd7a::1/128".parse().unwrap())));
        assert!(!net.covers(Principal::User("alice@x")));
        assert!(Target::Any.covers(Principal::Tag("tag:x")));
    }

    #[test]
    fn ports_apply_to_tcp_and_udp_but_not_icmp() {
        let rules = [rule(
            vec![tag("tag:web")],
            vec![(tag("tag:db"), port(5432))],
            vec![],
        )];
        let (web, db) = (Principal::Tag("tag:web"), Principal::Tag("tag:db"));
        assert!(first_accepting(&rules, web, db, Protocol::Tcp, 5432).is_some());
        assert!(first_accepting(&rules, web, db, Protocol::Udp, 5432).is_some());
        assert!(first_accepting(&rules, web, db, Protocol::Tcp, 22).is_none());
        assert!(first_accepting(&rules, web, db, Protocol::Icmp, 0).is_some());
        assert!(first_accepting(&rules, web, db, Protocol::Other(132), 5432).is_none());
        assert!(first_accepting(&rules, db, web, Protocol::Tcp, 5432).is_none());
    }

    #[test]
    fn explicit_protocols_restrict() {
        let rules = [rule(
            vec![Target::Any],
            vec![(Target::Any, vec![PortRange::ANY])],
            vec![Protocol::Udp],
        )];
        let (a, b) = (Principal::User("a@x"), Principal::Tag("tag:b"));
        assert!(first_accepting(&rules, a, b, Protocol::Udp, 53).is_some());
        assert!(first_accepting(&rules, a, b, Protocol::Tcp, 53).is_none());
        assert!(first_accepting(&rules, a, b, Protocol::Icmp, 0).is_none());
    }

    #[test]
    fn the_first_matching_rule_is_reported() {
        let rules = [
            rule(vec![tag("tag:a")], vec![(tag("tag:b"), port(80))], vec![]),
            Rule {
                line: 9,
                ..rule(vec![Target::Any], vec![(tag("tag:b"), port(22))], vec![])
            },
        ];
        let found = first_accepting(
            &rules,
            Principal::Tag("tag:a"),
            Principal::Tag("tag:b"),
            Protocol::Tcp,
            22,
        );
        assert_eq!(found.map(|r| r.line), Some(9));
    }
}
