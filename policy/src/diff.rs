//! `diff`: the flows between identities that a policy change newly allows or newly denies.
//!
//! The identities are every user, identity-provider group, tag, SPIFFE ID,
//! host and CIDR either version names, plus "another user" and "any
//! address" when a rule covers those (`*`, autogroups). For each pair and
//! protocol the ports are cut at every rule boundary, each piece is decided
//! under both versions, and pieces whose outcome changed are reported as
//! port ranges. Sources are evaluated without device attributes, so rules
//! that need a `srcPosture` are not exercised.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use serde::Serialize;
use weft_proto::Protocol;

use crate::eval::{decide, Subject, Verdict};
use crate::ports::{has_ports, proto_name};
use crate::rules::{Rule, Rules, Target};
use crate::Policy;

/// What a policy change does to access.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    /// Flows that did not pass before and pass now.
    pub newly_allowed: Vec<Flow>,
    /// Flows that passed before and do not pass now.
    pub newly_denied: Vec<Flow>,
}

impl PolicyDiff {
    /// Whether the change leaves access as it was.
    pub fn is_empty(&self) -> bool {
        self.newly_allowed.is_empty() && self.newly_denied.is_empty()
    }
}

/// Traffic between two identities on some ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Flow {
    /// The source identity.
    pub src: String,
    /// The destination identity.
    pub dst: String,
    /// `tcp`, `udp`, `icmp` or a protocol number.
    pub proto: String,
    /// `N`, `N-M`, or `*` for every port (and for protocols without ports).
    pub ports: String,
    /// The verdict under the old policy.
    pub before: Verdict,
    /// The verdict under the new policy.
    pub after: Verdict,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}:{} (was {}, now {})",
            self.src, self.dst, self.proto, self.ports, self.before, self.after
        )
    }
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change in access");
        }
        for (title, sign, flows) in [
            ("newly allowed", '+', &self.newly_allowed),
            ("newly denied", '-', &self.newly_denied),
        ] {
            if flows.is_empty() {
                continue;
            }
            writeln!(f, "{title} ({}):", flows.len())?;
            for flow in flows {
                writeln!(f, "  {sign} {flow}")?;
            }
        }
        Ok(())
    }
}

/// The flows `new` allows or denies that `old` did not.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let subjects = identities(&[old, new]);
    let protocols = protocols(&[old, new]);
    let mut result = PolicyDiff::default();
    for (src_name, src) in &subjects {
        let from_src = |rules: &Rules| Rules {
            rules: rules
                .rules
                .iter()
                .filter(|r| r.covers_src(src))
                .cloned()
                .collect(),
            apps: Vec::new(),
            inert: Vec::new(),
            audit: rules.audit,
        };
        let (old_src, new_src) = (from_src(&old.rules), from_src(&new.rules));
        if old_src.rules.is_empty()
            && new_src.rules.is_empty()
            && old.rules.audit == new.rules.audit
        {
            continue;
        }
        for (dst_name, dst) in &subjects {
            let to_dst = |rules: &Rules| Rules {
                rules: rules
                    .rules
                    .iter()
                    .filter(|r| {
                        r.dst
                            .iter()
                            .any(|d| d.target == Target::SelfUser || d.target.covers(dst))
                    })
                    .cloned()
                    .collect(),
                apps: Vec::new(),
                inert: Vec::new(),
                audit: rules.audit,
            };
            let (old_rules, new_rules) = (to_dst(&old_src), to_dst(&new_src));
            let relevant: Vec<&Rule> = old_rules.rules.iter().chain(&new_rules.rules).collect();
            for &protocol in &protocols {
                let starts = segment_starts(&relevant, protocol);
                let mut open: Option<(u32, Verdict, Verdict)> = None;
                let mut close = |open: &mut Option<(u32, Verdict, Verdict)>, end: u32| {
                    if let Some((first, before, after)) = open.take() {
                        let flow = Flow {
                            src: src_name.clone(),
                            dst: dst_name.clone(),
                            proto: proto_name(protocol),
                            ports: port_text(protocol, first, end - 1),
                            before,
                            after,
                        };
                        if after.passes() {
                            result.newly_allowed.push(flow);
                        } else {
                            result.newly_denied.push(flow);
                        }
                    }
                };
                for &start in &starts {
                    let port = u16::try_from(start).unwrap_or(u16::MAX);
                    let before = decide(&old_rules, src, dst, protocol, port).0;
                    let after = decide(&new_rules, src, dst, protocol, port).0;
                    let changed = before.passes() != after.passes();
                    match open {
                        Some((_, b, a)) if changed && b == before && a == after => {}
                        _ => {
                            close(&mut open, start);
                            if changed {
                                open = Some((start, before, after));
                            }
                        }
                    }
                }
                close(&mut open, 65_536);
            }
        }
    }
    result.newly_allowed.sort();
    result.newly_denied.sort();
    result
}

fn port_text(protocol: Protocol, first: u32, last: u32) -> String {
    if !has_ports(protocol) || (first == 0 && last == 65_535) {
        "*".into()
    } else if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// The first port of every piece the rules' port ranges cut 0–65535 into
/// (just port 0 for protocols without ports).
fn segment_starts(rules: &[&Rule], protocol: Protocol) -> Vec<u32> {
    let mut starts = BTreeSet::from([0u32]);
    if has_ports(protocol) {
        for rule in rules {
            for d in &rule.dst {
                for range in &d.ports {
                    starts.insert(u32::from(range.first));
                    if range.last < u16::MAX {
                        starts.insert(u32::from(range.last) + 1);
                    }
                }
            }
        }
    }
    starts.into_iter().collect()
}

/// TCP, UDP, ICMP, and any other protocol a rule names.
fn protocols(policies: &[&Policy]) -> Vec<Protocol> {
    let mut all: BTreeSet<Protocol> = Protocol::DEFAULT.into_iter().collect();
    for policy in policies {
        for rule in &policy.rules.rules {
            all.extend(rule.protocols.iter().copied());
        }
    }
    all.into_iter().collect()
}

/// Every identity the policies name, by display name.
fn identities(policies: &[&Policy]) -> BTreeMap<String, Subject> {
    let mut found = BTreeMap::new();
    for policy in policies {
        for rule in &policy.rules.rules {
            for target in rule.src.iter().chain(rule.dst.iter().map(|d| &d.target)) {
                add_target(&mut found, target, policy);
            }
        }
        for tag in &policy.names.tags {
            add_target(&mut found, &Target::Tag(tag.clone()), policy);
        }
        for (name, members) in &policy.names.groups {
            add_target(
                &mut found,
                &Target::Group {
                    name: name.clone(),
                    members: members.clone(),
                },
                policy,
            );
        }
        for net in policy.names.hosts.values() {
            add_target(&mut found, &Target::Prefix(*net), policy);
        }
    }
    found
}

/// Adds a user's user node to `found`.
fn add_user(found: &mut BTreeMap<String, Subject>, login: &str) {
    found.insert(
        login.to_owned(),
        Subject {
            user: Some(login.to_owned()),
            attributes: Some(BTreeMap::new()),
            ..Subject::default()
        },
    );
}

/// Adds the identities `target` names to `found`.
fn add_target(found: &mut BTreeMap<String, Subject>, target: &Target, policy: &Policy) {
    let node = || Some(BTreeMap::new());
    let (name, subject) = match target {
        Target::User(user) => {
            add_user(found, user);
            return;
        }
        Target::Group { members, .. } => {
            for m in members {
                add_user(found, m);
            }
            return;
        }
        Target::External(group) => (
            format!("(a member of {group})"),
            Subject {
                groups: vec![group.clone()],
                attributes: node(),
                ..Subject::default()
            },
        ),
        Target::Tag(tag) => (
            tag.clone(),
            Subject {
                tags: vec![tag.clone()],
                attributes: node(),
                ..Subject::default()
            },
        ),
        Target::Workload(id) => (
            id.clone(),
            Subject {
                workload: Some(id.clone()),
                attributes: node(),
                ..Subject::default()
            },
        ),
        Target::Prefix(net) => (
            prefix_name(policy, *net),
            Subject {
                addr: Some(*net),
                ..Subject::default()
            },
        ),
        Target::Any | Target::Member | Target::SelfUser => (
            "(another user)".into(),
            Subject {
                user: Some("(another user)".into()),
                attributes: node(),
                ..Subject::default()
            },
        ),
        Target::Role { users, groups, .. } => {
            for u in users {
                add_user(found, u);
            }
            for g in groups {
                add_target(found, &Target::External(g.clone()), policy);
            }
            return;
        }
        Target::Tagged | Target::Unenforced(_) => return,
    };
    found.insert(name, subject);
    if *target == Target::Any {
        found.insert(
            "(any address)".into(),
            Subject {
                addr: Some(IpNet::V4(ipnet::Ipv4Net::default())),
                ..Subject::default()
            },
        );
    }
}

/// A host's name when the policy defines one for `net`, else the CIDR (or IP).
fn prefix_name(policy: &Policy, net: IpNet) -> String {
    policy
        .names
        .hosts
        .iter()
        .find(|(_, n)| **n == net)
        .map_or_else(
            || {
                if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                }
            },
            |(name, _)| name.clone(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(acls: &str) -> Policy {
        let source = format!(
            r#"{{"groups": {{"group:eng": ["alice@x.com", "bob@x.com"]}},
  "tagOwners": {{"tag:web": [], "tag:db": []}},
  "hosts": {{"office": "198.51.100.0/24"}},
  "acls": [{acls}]}}"#
        );
        Policy::parse(&source, "p").unwrap()
    }

    const BASE: &str = r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443"]}"#;

    #[test]
    fn identical_policies_change_nothing() {
        let d = diff(&policy(BASE), &policy(BASE));
        assert!(d.is_empty());
        assert_eq!(d.to_string(), "no change in access");
    }

    #[test]
    fn widening_and_narrowing_are_reported_as_ranges() {
        let wider = format!("{BASE}, {{\"action\": \"accept\", \"src\": [\"office\"], \"dst\": [\"tag:db:5432\"], \"proto\": \"tcp\"}}");
        let d = diff(&policy(BASE), &policy(&wider));
        assert!(d.newly_denied.is_empty());
        assert_eq!(
            d.newly_allowed,
            [Flow {
                src: "office".into(),
                dst: "tag:db".into(),
                proto: "tcp".into(),
                ports: "5432".into(),
                before: Verdict::Deny,
                after: Verdict::Accept,
            }]
        );
        let narrower = r#"{"action": "accept", "src": ["alice@x.com"], "dst": ["tag:web:80"]},
            {"action": "deny", "src": ["*"], "dst": ["tag:web:443"]}"#;
        let d = diff(&policy(BASE), &policy(narrower));
        assert!(d.newly_allowed.is_empty());
        let denied: Vec<String> = d
            .newly_denied
            .iter()
            .map(|f| format!("{} {} {}:{}", f.src, f.dst, f.proto, f.ports))
            .collect();
        assert_eq!(
            denied,
            [
                // A deny without "proto" covers ICMP, which has no ports.
                "alice@x.com tag:web icmp:*",
                "alice@x.com tag:web tcp:443",
                "alice@x.com tag:web udp:443",
                "bob@x.com tag:web icmp:*",
                "bob@x.com tag:web tcp:443",
                "bob@x.com tag:web tcp:80",
                "bob@x.com tag:web udp:443",
                "bob@x.com tag:web udp:80",
            ]
        );
        assert!(d.to_string().starts_with(
            "newly denied (8):\n  - alice@x.com -> tag:web icmp:* (was accept, now deny)"
        ));
    }

    #[test]
    fn adjacent_ports_merge() {
        let a = policy(
            r#"{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:1000-1999"], "proto": "udp"}"#,
        );
        let b = policy(
            r#"{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:1000-1499", "tag:db:1500-3000"], "proto": "udp"}"#,
        );
        let d = diff(&a, &b);
        assert_eq!(d.newly_allowed.len(), 1);
        assert_eq!(d.newly_allowed[0].ports, "2000-3000");
    }

    fn shown(flows: &[Flow]) -> Vec<String> {
        flows
            .iter()
            .map(|f| format!("{} {} {}:{}", f.src, f.dst, f.proto, f.ports))
            .collect()
    }

    #[test]
    fn roles_ipsets_and_unenforced_constructs() {
        let role = r#"{"action": "accept", "src": ["autogroup:admin"], "dst": ["tag:db:22"], "proto": "tcp"}"#;
        let unenforced = r#"{"action": "accept", "src": ["autogroup:shared"], "dst": ["tag:db:*", "autogroup:internet:*"]}"#;
        // Constructs that match nothing change no access.
        assert!(diff(
            &policy(BASE),
            &policy(&format!("{BASE}, {role}, {unenforced}"))
        )
        .is_empty());
        let mut roles = crate::Roles::default();
        roles.add(crate::Role::Admin, "ada@x.com").unwrap();
        let source = |acls: &str| {
            format!(
                r#"{{"tagOwners": {{"tag:db": []}}, "ipsets": {{"ipset:lab": ["10.9.0.0/16", "remove 10.9.9.0/24"]}}, "acls": [{acls}]}}"#
            )
        };
        let old = Policy::parse_with_roles(&source(""), "p", &roles).unwrap();
        let new = Policy::parse_with_roles(
            &source(&format!(
                r#"{role}, {{"action": "accept", "src": ["ipset:lab"], "dst": ["tag:db:443"], "proto": "tcp"}}"#
            )),
            "p",
            &roles,
        )
        .unwrap();
        let d = diff(&old, &new);
        assert!(d.newly_denied.is_empty());
        let allowed = shown(&d.newly_allowed);
        assert!(
            allowed.contains(&"ada@x.com tag:db tcp:22".to_owned()),
            "{allowed:?}"
        );
        assert!(
            allowed.contains(&"10.9.0.0/21 tag:db tcp:443".to_owned()),
            "{allowed:?}"
        );
        assert!(
            !allowed.iter().any(|f| f.starts_with("10.9.9.")),
            "{allowed:?}"
        );
    }
}
