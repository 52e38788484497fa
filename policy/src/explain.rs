//! `explain` (why a flow is accepted or denied) and the lockout guard's `reaches_anything`.

use std::collections::BTreeSet;

use serde::Serialize;
use weft_proto::{Protocol, RuleAction};

use crate::compile::canonical_nodes;
use crate::diagnostic::{Diagnostic, Diagnostics, Severity};
use crate::eval::{decide, Subject, Verdict};
use crate::resolve::{host_hint, Names};
use crate::rules::{Rule, Rules, Target, Unenforced};
use crate::selector::{self, is_external_group, Autogroup, Selector};
use crate::tests_block::principals;
use crate::{NodeInfo, Policy};
use ipnet::IpNet;

/// What the policy does with one flow, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// `accept`, `deny` or `audit-deny`.
    pub verdict: Verdict,
    /// The rules that decide it; empty when nothing matches and the default decides.
    pub rules: Vec<RuleRef>,
    /// Rules that would concern the flow but name a construct weft does
    /// not enforce, so they match nothing there.
    pub unenforced: Vec<UnenforcedNote>,
}

/// A rule that matches nothing for a flow because of a construct weft does not enforce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnenforcedNote {
    /// The rule.
    pub rule: RuleRef,
    /// The construct as written: `autogroup:internet`, `svc:NAME`, `"via"`, …
    pub construct: String,
    /// Why weft matches nothing there.
    pub reason: String,
}

/// A rule of the policy file, by line and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// The line of the rule's opening brace.
    pub line: u32,
    /// The rule as written, on one line.
    pub text: String,
}

impl Policy {
    /// Explains the verdict on traffic from `src` to `dst` on `port` over `proto`.
    ///
    /// `src` and `dst` are one principal each: a user login, `group:idp:NAME`,
    /// `tag:NAME`, a SPIFFE ID, a `hosts` name or an IP; or a construct weft
    /// does not enforce (`autogroup:internet`, `autogroup:shared`,
    /// `svc:NAME`, a role autogroup), which no rule matches. Sources are evaluated
    /// without device attributes, so rules with a `srcPosture` do not match.
    pub fn explain(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        proto: Protocol,
    ) -> Result<Explanation, Diagnostics> {
        let src = self.explained_subject(src, "--src")?;
        let dst = self.explained_subject(dst, "--dst")?;
        let (verdict, deciding) = decide(&self.rules, &src, &dst, proto, port);
        Ok(Explanation {
            verdict,
            rules: rule_refs(&deciding),
            unenforced: unenforced_notes(&self.rules, &src, &dst),
        })
    }

    /// Whether `principal` (as in a rule's `src`) can reach any node of
    /// `nodes` on any port: the lockout guard for administrators.
    ///
    /// The principal's own registered nodes are evaluated with their real
    /// identities and attributes, and the principal as written besides; a
    /// node reaching itself does not count. `autogroup:admin` (or another
    /// role autogroup) stands for the role's members as given to
    /// [`Policy::parse_with_roles`]; without members it reaches nothing.
    pub fn reaches_anything(&self, principal: &str, nodes: &[NodeInfo]) -> bool {
        let nodes = &*canonical_nodes(nodes);
        let Ok(target) = self.principal_target(principal, "the principal") else {
            return false;
        };
        let mut sources: Vec<(Option<usize>, Subject)> = principals(&target, None)
            .into_iter()
            .map(|s| (None, s))
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            for addr in &node.addresses {
                let subject = Subject::node(node, Some(*addr));
                if target.covers(&subject) {
                    sources.push((Some(i), subject));
                }
            }
        }
        sources.iter().any(|(own, src)| {
            nodes.iter().enumerate().any(|(i, node)| {
                *own != Some(i)
                    && node
                        .addresses
                        .iter()
                        .any(|addr| reaches(&self.rules, src, &Subject::node(node, Some(*addr))))
            })
        })
    }

    fn explained_subject(&self, text: &str, flag: &str) -> Result<Subject, Diagnostics> {
        let target = self
            .principal_target(text, flag)
            .map_err(|d| Diagnostics(vec![d]))?;
        if let Target::Unenforced(construct) = target {
            return Ok(Subject {
                construct: Some(construct),
                ..Subject::default()
            });
        }
        match principals(&target, None).into_iter().next() {
            Some(subject) => Ok(subject),
            None => Err(Diagnostics(vec![self.usage_error(
                format!("{flag} \"{text}\" is not one principal"),
                "name a user, group:idp:NAME, tag:NAME, SPIFFE ID, host name or IP".into(),
            )])),
        }
    }

    /// Resolves a principal named outside the file (explain, lockout guard).
    fn principal_target(&self, text: &str, what: &str) -> Result<Target, Diagnostic> {
        let names: &Names = &self.names;
        let selector = selector::parse(text).map_err(|err| {
            self.usage_error(
                format!("{what}: {}", err.message),
                err.hint.unwrap_or_default(),
            )
        })?;
        match selector {
            Selector::User(user) => Ok(Target::User(user)),
            Selector::Tag(tag) => Ok(Target::Tag(tag)),
            Selector::Workload(id) => Ok(Target::Workload(id)),
            Selector::Prefix(net) => Ok(Target::Prefix(net)),
            Selector::Group(name) if is_external_group(&name) => Ok(Target::External(name)),
            Selector::Group(name) => match names.groups.get(&name) {
                Some(members) => Ok(Target::Group {
                    name,
                    members: members.clone(),
                }),
                None => Err(self.usage_error(
                    format!("{what}: undefined group \"{name}\""),
                    "name a group defined under \"groups\", or one member".into(),
                )),
            },
            Selector::Host(name) => match names.hosts.get(&name) {
                Some(net) => Ok(Target::Prefix(*net)),
                None => Err(self.usage_error(
                    format!("{what}: undefined host \"{name}\""),
                    host_hint(names, &name),
                )),
            },
            Selector::Autogroup(Autogroup::Role(role)) => Ok(match names.roles.get(role) {
                Some(members) => Target::Role {
                    role,
                    users: members.users.clone(),
                    groups: members.groups.clone(),
                },
                None => Target::Unenforced(Unenforced::Role(role)),
            }),
            Selector::Autogroup(Autogroup::Internet) => {
                Ok(Target::Unenforced(Unenforced::Internet))
            }
            Selector::Autogroup(Autogroup::Shared) => Ok(Target::Unenforced(Unenforced::Shared)),
            Selector::Service(name) => Ok(Target::Unenforced(Unenforced::Service(name))),
            Selector::Any | Selector::Autogroup(_) | Selector::Ipset(_) => Err(self.usage_error(
                format!("{what} \"{text}\" is not one principal"),
                "name a user, group:idp:NAME, tag:NAME, SPIFFE ID, host name or IP".into(),
            )),
        }
    }

    fn usage_error(&self, message: String, hint: String) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            line: 0,
            column: 0,
            message,
            hint: Some(hint),
        }
    }
}

/// The rules as references, one per line (a grant's `ip` entries share one).
pub(crate) fn rule_refs(rules: &[&Rule]) -> Vec<RuleRef> {
    let mut seen = BTreeSet::new();
    rules
        .iter()
        .filter(|r| seen.insert(r.line))
        .map(|r| RuleRef {
            line: r.line,
            text: r.text.clone(),
        })
        .collect()
}

/// The rules that would concern the flow but for a construct weft does not
/// enforce: the construct stands where the flow's src or dst could be (it
/// is named as the principal, a role could hold the user, the internet
/// holds the address) and the rest of the rule covers the other end; and
/// grants with `via` whose src and dst cover the flow.
fn unenforced_notes(rules: &Rules, src: &Subject, dst: &Subject) -> Vec<UnenforcedNote> {
    let mut notes: Vec<UnenforcedNote> = Vec::new();
    let mut note = |rule: &Rule, what: &Unenforced| {
        let construct = what.construct();
        if !notes
            .iter()
            .any(|n| n.rule.line == rule.line && n.construct == construct)
        {
            notes.push(UnenforcedNote {
                rule: RuleRef {
                    line: rule.line,
                    text: rule.text.clone(),
                },
                construct,
                reason: what.reason(),
            });
        }
    };
    let covers_dst = |rule: &Rule| {
        rule.dst
            .iter()
            .any(|d| d.target == Target::SelfUser || d.target.covers(dst))
    };
    for rule in &rules.rules {
        for target in &rule.src {
            if let Target::Unenforced(what) = target {
                if could_be(what, src) && covers_dst(rule) {
                    note(rule, what);
                }
            }
        }
        for d in &rule.dst {
            if let Target::Unenforced(what) = &d.target {
                if could_be(what, dst) && rule.covers_src(src) {
                    note(rule, what);
                }
            }
        }
    }
    for rule in &rules.inert {
        if rule.covers_src(src) && covers_dst(rule) {
            note(rule, &Unenforced::Via);
        }
    }
    notes
}

/// Whether `subject` could be what the unenforced construct stands for.
fn could_be(what: &Unenforced, subject: &Subject) -> bool {
    if subject.construct.as_ref() == Some(what) {
        return true;
    }
    match what {
        Unenforced::Role(_) => subject.is_member(),
        Unenforced::Internet => subject.addr.is_some_and(|net| {
            !crate::ipsets::NOT_INTERNET
                .iter()
                .any(|private| private.parse::<IpNet>().is_ok_and(|p| p.contains(&net)))
        }),
        Unenforced::Shared | Unenforced::Service(_) | Unenforced::Via => false,
    }
}

/// Whether any protocol and port passes from `src` to `dst`.
///
/// The verdict is constant between rule port boundaries, so checking each
/// accept range's first port and the ports just past each deny range suffices.
fn reaches(rules: &Rules, src: &Subject, dst: &Subject) -> bool {
    if rules.audit {
        return true;
    }
    let deny_ends: Vec<u32> = rules
        .rules
        .iter()
        .filter(|r| r.action == RuleAction::Deny)
        .flat_map(|r| {
            r.dst
                .iter()
                .flat_map(|d| d.ports.iter().map(|p| u32::from(p.last) + 1))
        })
        .collect();
    rules
        .rules
        .iter()
        .filter(|r| r.action == RuleAction::Accept && r.covers_src(src))
        .any(|rule| {
            let protocols: Vec<Protocol> = if rule.protocols.is_empty() {
                Protocol::DEFAULT.to_vec()
            } else {
                rule.protocols.clone()
            };
            rule.dst.iter().any(|d| {
                d.ports.iter().any(|range| {
                    let candidates = std::iter::once(range.first).chain(
                        deny_ends
                            .iter()
                            .filter_map(|&end| u16::try_from(end).ok())
                            .filter(|&p| range.contains(p)),
                    );
                    candidates.into_iter().any(|port| {
                        protocols
                            .iter()
                            .any(|&p| decide(rules, src, dst, p, port).0.passes())
                    })
                })
            })
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use weft_proto::{Identity, NodeId};

    use super::*;

    const POLICY: &str = r#"{
  "groups": {"group:ops": ["olga@example.com"]},
  "tagOwners": {"tag:web": [], "tag:db": []},
  "hosts": {"office": "198.51.100.0/24"},
  "acls": [
    {"action": "accept", "src": ["group:ops", "group:idp:sre"], "dst": ["*:*"]},
    {"action": "accept", "src": ["tag:web", "office"], "dst": ["tag:db:5432"]},
    {"action": "deny", "src": ["*"], "dst": ["tag:db:22"]},
    {"action": "deny", "src": ["office"], "dst": ["tag:db:5432"], "mode": "audit"},
  ],
}"#;

    fn policy() -> Policy {
        Policy::parse(POLICY, "p.hujson").unwrap()
    }

    #[test]
    fn verdicts_and_deciding_rules() {
        let p = policy();
        let e = p.explain("tag:web", "tag:db", 5432, Protocol::Tcp).unwrap();
        assert_eq!(e.verdict, Verdict::Accept);
        assert_eq!(e.rules.len(), 1);
        assert_eq!(e.rules[0].line, 7);
        assert_eq!(
            e.rules[0].text,
            r#"{"action": "accept", "src": ["tag:web", "office"], "dst": ["tag:db:5432"]}"#
        );
        let e = p
            .explain("olga@example.com", "tag:db", 22, Protocol::Tcp)
            .unwrap();
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.rules[0].line, 8);
        let e = p.explain("office", "tag:db", 5432, Protocol::Tcp).unwrap();
        assert_eq!(e.verdict, Verdict::AuditDeny);
        assert_eq!(e.rules[0].line, 9);
        let e = p
            .explain("198.51.100.7", "tag:db", 5432, Protocol::Udp)
            .unwrap();
        assert_eq!(e.verdict, Verdict::AuditDeny);
        let e = p.explain("tag:db", "tag:web", 80, Protocol::Tcp).unwrap();
        assert_eq!(
            e,
            Explanation {
                verdict: Verdict::Deny,
                rules: vec![],
                unenforced: vec![],
            }
        );
        let e = p
            .explain("group:idp:sre", "tag:web", 80, Protocol::Tcp)
            .unwrap();
        assert_eq!(e.verdict, Verdict::Accept);
    }

    #[test]
    fn rules_matching_nothing_because_of_unenforced_constructs_are_named() {
        let p = Policy::parse(
            r#"{"tagOwners": {"tag:exit": [], "tag:db": []}, "acls": [
                {"action": "accept", "src": ["alice@example.com"], "dst": ["autogroup:internet:*"]},
                {"action": "accept", "src": ["autogroup:shared"], "dst": ["tag:db:5432"]}],
              "grants": [{"src": ["alice@example.com"], "dst": ["tag:db"], "ip": ["*"], "via": ["tag:exit"]}]}"#,
            "p",
        )
        .unwrap();
        let e = p
            .explain("alice@example.com", "tag:db", 5432, Protocol::Tcp)
            .unwrap();
        assert_eq!(e.verdict, Verdict::Deny);
        let named = |e: &Explanation| -> Vec<(u32, String)> {
            e.unenforced
                .iter()
                .map(|n| (n.rule.line, n.construct.clone()))
                .collect()
        };
        assert_eq!(named(&e), [(4, "\"via\"".to_owned())]);
        let e = p
            .explain("autogroup:shared", "tag:db", 5432, Protocol::Tcp)
            .unwrap();
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(named(&e), [(3, "autogroup:shared".to_owned())]);
        assert_eq!(
            e.unenforced[0].reason,
            "weft has no sharing between networks, so users shared in are not enforced"
        );
        let e = p
            .explain("alice@example.com", "8.8.8.8", 443, Protocol::Tcp)
            .unwrap();
        assert_eq!(e.unenforced[0].construct, "autogroup:internet");
        let e = p.explain("tag:db", "tag:exit", 1, Protocol::Tcp).unwrap();
        assert!(e.unenforced.is_empty(), "{e:?}");
    }

    #[test]
    fn the_lockout_guard_takes_the_admin_role() {
        let source = r#"{"tagOwners": {"tag:db": []}, "acls": [
            {"action": "accept", "src": ["autogroup:admin"], "dst": ["tag:db:22"]}]}"#;
        let nodes = db_and_olga();
        let mut roles = crate::Roles::default();
        roles.add(crate::Role::Admin, "olga@example.com").unwrap();
        let p = Policy::parse_with_roles(source, "p", &roles).unwrap();
        assert!(p.reaches_anything("autogroup:admin", &nodes));
        assert!(p.reaches_anything("olga@example.com", &nodes));
        let without = Policy::parse(source, "p").unwrap();
        assert!(!without.reaches_anything("autogroup:admin", &nodes));
        let e = without
            .explain("olga@example.com", "tag:db", 22, Protocol::Tcp)
            .unwrap();
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.unenforced[0].construct, "autogroup:admin");
        assert_eq!(
            e.unenforced[0].reason,
            "the admin role has no members configured"
        );
    }

    #[test]
    fn bad_principals_are_explained() {
        let p = policy();
        let err = p.explain("*", "tag:db", 1, Protocol::Tcp).unwrap_err();
        assert_eq!(err.0[0].message, "--src \"*\" is not one principal");
        let err = p.explain("tag:web", "ofice", 1, Protocol::Tcp).unwrap_err();
        assert_eq!(err.0[0].message, "--dst: undefined host \"ofice\"");
        assert_eq!(err.0[0].hint.as_deref(), Some("did you mean \"office\"?"));
        let err = p
            .explain("group:eng", "tag:db", 1, Protocol::Tcp)
            .unwrap_err();
        assert!(err.0[0].message.contains("undefined group"));
    }

    fn node(id: u64, identity: Identity) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            name: format!("n{id}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(
                100,
                64,
                0,
                u8::try_from(id).unwrap(),
            ))],
            identity,
            attributes: BTreeMap::new(),
        }
    }

    /// A database node and olga's laptop.
    fn db_and_olga() -> [NodeInfo; 2] {
        [
            node(1, Identity::tagged(vec!["tag:db".into()])),
            node(
                2,
                Identity {
                    user: Some("olga@example.com".into()),
                    ..Identity::default()
                },
            ),
        ]
    }

    #[test]
    fn lockout_guard() {
        let p = policy();
        let nodes = db_and_olga();
        assert!(p.reaches_anything("olga@example.com", &nodes));
        assert!(p.reaches_anything("group:ops", &nodes));
        assert!(!p.reaches_anything("mallory@example.com", &nodes));
        let own_only = Policy::parse(
            r#"{"acls": [{"action": "accept", "src": ["olga@example.com"], "dst": ["100.64.0.2:*"]}]}"#,
            "p",
        )
        .unwrap();
        assert!(
            own_only.reaches_anything("olga@example.com", &nodes),
            "another device of olga's may reach it"
        );
        assert!(!own_only.reaches_anything("group:ops", &nodes[..1]));
        let only_ssh = Policy::parse(
            r#"{"tagOwners": {"tag:db": []}, "acls": [
                {"action": "accept", "src": ["olga@example.com"], "dst": ["tag:db:22"], "proto": "tcp"},
                {"action": "deny", "src": ["*"], "dst": ["tag:db:*"]}]}"#,
            "p",
        )
        .unwrap();
        assert!(
            !only_ssh.reaches_anything("olga@example.com", &nodes),
            "the deny removes the only path"
        );
        let around_a_deny = Policy::parse(
            r#"{"tagOwners": {"tag:db": []}, "acls": [
                {"action": "accept", "src": ["olga@example.com"], "dst": ["tag:db:20-30"], "proto": "tcp"},
                {"action": "deny", "src": ["*"], "dst": ["tag:db:20-29"]}]}"#,
            "p",
        )
        .unwrap();
        assert!(
            around_a_deny.reaches_anything("olga@example.com", &nodes),
            "port 30 is still open"
        );
        assert!(!Policy::parse("{}", "p")
            .unwrap()
            .reaches_anything("olga@example.com", &nodes));
        assert!(!p.reaches_anything("not a principal", &nodes));
    }
}
