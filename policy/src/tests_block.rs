//! Runs a policy file's `tests` entries against its rules.
//!
//! Without a `proto`, an `accept` check asks for TCP and a `deny` check asks
//! that neither TCP nor UDP gets through (ICMP carries no port, so a port
//! test cannot speak for it). A group stands for each of its members: an
//! accept must hold for all of them, and so must a deny. An `accept` holds
//! when the verdict is accept; a `deny` holds when the verdict is deny or
//! audit-deny, so tests state the intended policy while it is audited.
//! `srcPostureAttrs` gives the source's attributes for `srcPosture`; a user,
//! tag or workload source without it has no attributes, and an address
//! source never satisfies a posture.
//!
//! A test naming a role autogroup or an overlay address outside `hosts`
//! needs the nodes: without them it is not evaluated (and not passed);
//! with them the role stands for its members' user nodes and the address
//! for the node holding it.

use serde::Serialize;
use weft_proto::Protocol;

use std::collections::BTreeMap;

use crate::compile::NodeInfo;
use crate::diagnostic::{Diagnostic, Diagnostics, Severity};
use crate::eval::{decide, Subject, Verdict};
use crate::ports::proto_name;
use crate::rules::{Check, Expect, Rules, Target, TestCase};

/// The outcome of a policy's `tests` when all of them pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TestReport {
    /// How many `accept` and `deny` destinations were checked and held.
    pub passed: usize,
    /// How many were not evaluated because they need the nodes (see
    /// [`crate::Policy::run_tests_on_nodes`]).
    pub not_evaluated: usize,
}

/// Runs every test; the error lists each failing `accept`/`deny` destination.
///
/// Without `nodes`, tests that need them are counted as not evaluated.
pub(crate) fn run(
    tests: &[TestCase],
    rules: &Rules,
    file: &str,
    nodes: Option<&[NodeInfo]>,
) -> Result<TestReport, Diagnostics> {
    let mut passed = 0;
    let mut not_evaluated = 0;
    let mut failures = Vec::new();
    for test in tests {
        let nodes = match (test.needs_devices.is_some(), nodes) {
            (false, _) => None,
            (true, Some(nodes)) => Some(nodes),
            (true, None) => {
                not_evaluated += test.checks.len();
                continue;
            }
        };
        for check in &test.checks {
            match failure(test, check, rules, nodes) {
                None => passed += 1,
                Some((message, hint)) => failures.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.to_owned(),
                    line: test.location.line,
                    column: test.location.column,
                    message,
                    hint: Some(hint),
                }),
            }
        }
    }
    if failures.is_empty() {
        Ok(TestReport {
            passed,
            not_evaluated,
        })
    } else {
        Err(Diagnostics(failures))
    }
}

/// Why one check fails (message and hint), or `None` when it holds.
fn failure(
    test: &TestCase,
    check: &Check,
    rules: &Rules,
    nodes: Option<&[NodeInfo]>,
) -> Option<(String, String)> {
    let protocols: &[Protocol] = match (test.proto.as_ref(), check.expect) {
        (Some(protocol), _) => std::slice::from_ref(protocol),
        (None, Expect::Accept) => &[Protocol::Tcp],
        (None, Expect::Deny) => &[Protocol::Tcp, Protocol::Udp],
    };
    let subjects = |target: &Target, attributes| match (target, nodes) {
        (Target::Prefix(_) | Target::Role { .. }, Some(nodes)) => {
            node_principals(target, attributes, nodes)
        }
        _ => principals(target, attributes),
    };
    let srcs = subjects(&test.src, test.attributes.as_ref());
    let dsts = subjects(&check.dst, None);
    let title = |src: Option<&Subject>, protocol: Option<Protocol>| {
        let member = match (&test.src, src.and_then(|s| s.user.as_ref())) {
            (Target::Group { .. } | Target::Role { .. }, Some(user)) => {
                format!(" (member {user})")
            }
            _ => String::new(),
        };
        let over = match (test.proto, protocol) {
            (None, Some(p)) if p != Protocol::Tcp => format!(" over {}", proto_name(p)),
            _ => String::new(),
        };
        format!(
            "test src {}{member} → {}{over}",
            test.src_text, check.dst_text
        )
    };
    match check.expect {
        Expect::Accept => {
            if srcs.is_empty() || dsts.is_empty() {
                let empty = if srcs.is_empty() {
                    &test.src_text
                } else {
                    &check.dst_text
                };
                let hint = if empty.starts_with("autogroup:") {
                    "give the role its members (the coordinator's roles setting, or `weft policy check --roles FILE`), or fix the test"
                } else {
                    "add members to the group, or fix the test"
                };
                return Some((
                    format!(
                        "{}: expected accept, but {empty} has no members",
                        title(None, None)
                    ),
                    hint.into(),
                ));
            }
            for src in &srcs {
                for dst in &dsts {
                    for &protocol in protocols {
                        let (verdict, deciding) = decide(rules, src, dst, protocol, check.port);
                        let title = title(Some(src), Some(protocol));
                        match (verdict, deciding.first()) {
                            (Verdict::Accept, _) => {}
                            (_, Some(rule)) => {
                                return Some((
                                    format!("{title}: expected accept, but the {verdict} rule at line {} matches", rule.line),
                                    format!("narrow the rule at line {}, or fix the test", rule.line),
                                ));
                            }
                            (_, None) => {
                                return Some((
                                    format!("{title}: expected accept, but no rule accepts it"),
                                    format!("add a rule whose src covers {} and whose dst covers {}, or fix the test", test.src_text, check.dst_text),
                                ));
                            }
                        }
                    }
                }
            }
            None
        }
        Expect::Deny => {
            for src in &srcs {
                for dst in &dsts {
                    for &protocol in protocols {
                        let (verdict, deciding) = decide(rules, src, dst, protocol, check.port);
                        if verdict == Verdict::Accept {
                            let line = deciding.first().map_or(0, |r| r.line);
                            return Some((
                                format!(
                                    "{}: expected deny, but the rule at line {line} accepts it",
                                    title(Some(src), Some(protocol)),
                                ),
                                format!("narrow the rule at line {line}, or add a deny rule, or fix the test"),
                            ));
                        }
                    }
                }
            }
            None
        }
    }
}

/// The concrete subjects a test's src or dst stands for: a group is each of its members.
pub(crate) fn principals(
    target: &Target,
    attributes: Option<&BTreeMap<String, String>>,
) -> Vec<Subject> {
    let node_attributes = Some(attributes.cloned().unwrap_or_default());
    let user = |login: &str| Subject {
        user: Some(login.to_owned()),
        attributes: node_attributes.clone(),
        ..Subject::default()
    };
    match target {
        Target::User(login) => vec![user(login)],
        Target::Group { members, .. } => members.iter().map(|m| user(m)).collect(),
        Target::External(group) => vec![Subject {
            groups: vec![group.clone()],
            attributes: node_attributes,
            ..Subject::default()
        }],
        Target::Tag(tag) => vec![Subject {
            tags: vec![tag.clone()],
            attributes: node_attributes,
            ..Subject::default()
        }],
        Target::Workload(id) => vec![Subject {
            workload: Some(id.clone()),
            attributes: node_attributes,
            ..Subject::default()
        }],
        Target::Prefix(net) => vec![Subject {
            addr: Some(*net),
            ..Subject::default()
        }],
        Target::Role { users, groups, .. } => users
            .iter()
            .map(|m| user(m))
            .chain(groups.iter().map(|group| Subject {
                groups: vec![group.clone()],
                attributes: node_attributes.clone(),
                ..Subject::default()
            }))
            .collect(),
        Target::Any
        | Target::Member
        | Target::Tagged
        | Target::SelfUser
        | Target::Unenforced(_) => Vec::new(),
    }
}

/// The subjects a test's src or dst stands for among `nodes`: the node
/// holding an address (else the bare address), or every node a role or
/// other target covers. `attributes`, when given, replace the nodes' own.
fn node_principals(
    target: &Target,
    attributes: Option<&BTreeMap<String, String>>,
    nodes: &[NodeInfo],
) -> Vec<Subject> {
    let with_attributes = |mut subject: Subject| {
        if let Some(attributes) = attributes {
            subject.attributes = Some(attributes.clone());
        }
        subject
    };
    if let Target::Prefix(net) = target {
        let addr = net.addr();
        let holders: Vec<Subject> = nodes
            .iter()
            .filter(|n| n.addresses.contains(&addr))
            .map(|n| with_attributes(Subject::node(n, Some(addr))))
            .collect();
        return if holders.is_empty() {
            principals(target, attributes)
        } else {
            holders
        };
    }
    nodes
        .iter()
        .map(|n| Subject::node(n, n.addresses.first().copied()))
        .filter(|s| target.covers(s))
        .map(with_attributes)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::{Policy, Severity};

    const POLICY: &str = r#"{
  "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
  "tagOwners": {"tag:web": ["group:eng"], "tag:db": ["group:eng"], "tag:admin": []},
  "hosts": {"db-net": "100.64.0.0/24", "printer": "100.64.9.9"},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["group:eng", "tag:admin"], "dst": ["tag:db:*", "tag:web:*"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:web:80,443", "db-net:1000-2000"]},
    {"action": "accept", "src": ["alice@example.com"], "dst": ["printer:631"], "proto": "udp"},
    {"action": "accept", "src": ["100.64.0.0/16"], "dst": ["tag:web:8080"]},
  ],
  "tests": [TESTS],
}"#;

    fn run(tests: &str) -> Result<usize, Vec<(u32, String)>> {
        let policy = Policy::parse(&POLICY.replace("TESTS", tests), "p.hujson").unwrap();
        policy.run_tests().map(|report| report.passed).map_err(|d| {
            d.0.into_iter()
                .map(|d| {
                    assert_eq!(d.severity, Severity::Error);
                    (d.line, d.message)
                })
                .collect()
        })
    }

    #[test]
    fn passing_tests_are_counted() {
        let tests = r#"
    {"src": "tag:web", "accept": ["tag:db:5432", "tag:web:443", "db-net:1500"], "deny": ["tag:db:22", "tag:admin:22"]},
    {"src": "group:eng", "accept": ["tag:db:22", "tag:web:80"]},
    {"src": "bob@example.com", "deny": ["printer:631"], "proto": "udp"},
    {"src": "alice@example.com", "accept": ["printer:631"], "proto": "udp"},
    {"src": "100.64.1.1", "accept": ["tag:web:8080"], "deny": ["tag:web:80", "tag:db:5432"]},
    {"src": "tag:db", "deny": ["tag:web:80", "db-net:1500"]},
"#;
        assert_eq!(
            run(tests),
            Ok(11),
            "the overlay-address test needs the nodes"
        );
    }

    #[test]
    fn overlay_addresses_and_roles_need_the_nodes() {
        use std::net::IpAddr;

        use weft_proto::{Identity, NodeId};

        use crate::{NodeInfo, Role, Roles};

        let tests = r#"{"src": "100.64.1.1", "accept": ["tag:web:8080"], "deny": ["tag:web:80", "tag:db:5432"]},
    {"src": "autogroup:admin", "accept": ["tag:db:22"], "deny": ["printer:631"]}"#;
        let mut roles = Roles::default();
        roles.add(Role::Admin, "group:idp:ops").unwrap();
        let source = POLICY.replace("TESTS", tests).replace(
            "\"group:eng\", \"tag:admin\"",
            "\"group:eng\", \"tag:admin\", \"autogroup:admin\"",
        );
        let policy = Policy::parse_with_roles(&source, "p.hujson", &roles).unwrap();
        let warned: Vec<&str> = policy
            .warnings()
            .iter()
            .map(|w| w.message.as_str())
            .collect();
        assert_eq!(
            warned,
            [
                "test src 100.64.1.1 is not evaluated offline — needs the device list",
                "test src autogroup:admin is not evaluated offline — needs the device list",
            ]
        );
        let offline = policy.run_tests().unwrap();
        assert_eq!((offline.passed, offline.not_evaluated), (0, 5));
        let node = |n: u8, identity: Identity| NodeInfo {
            id: NodeId(u64::from(n)),
            name: format!("n{n}"),
            addresses: vec![IpAddr::from([100, 64, 1, n])],
            identity,
            attributes: BTreeMap::new(),
        };
        let fred = node(
            1,
            Identity {
                user: Some("fred@example.com".into()),
                ..Identity::default()
            },
        );
        let ops = node(
            3,
            Identity {
                user: Some("olga@example.com".into()),
                groups: vec!["group:idp:ops".into()],
                ..Identity::default()
            },
        );
        let report = policy.run_tests_on_nodes(&[fred, ops]).unwrap();
        assert_eq!((report.passed, report.not_evaluated), (5, 0));
        // 100.64.1.1 as a web node: the web tier reaches itself on port 80.
        let web = node(1, Identity::tagged(vec!["tag:web".into()]));
        let failures = policy.run_tests_on_nodes(&[web]).unwrap_err();
        assert_eq!(
            failures.0[0].message,
            "test src 100.64.1.1 → tag:web:80: expected deny, but the rule at line 8 accepts it"
        );
        assert!(
            failures.0.iter().any(|f| f.message
                == "test src autogroup:admin → tag:db:22: expected accept, but autogroup:admin has no members"),
            "{failures}"
        );
    }

    #[test]
    fn ports_and_protocols_matter() {
        let tests = r#"{"src": "tag:web", "accept": ["tag:db:5432"], "deny": ["tag:db:5433", "db-net:999", "db-net:2001"]},
    {"src": "tag:web", "proto": "udp", "deny": ["tag:db:5432"]},
    {"src": "tag:web", "proto": "icmp", "accept": ["tag:web:1"], "deny": ["tag:db:5432"]}"#;
        assert_eq!(run(tests), Ok(7));
    }

    #[test]
    fn a_deny_failure_names_the_accepting_rule() {
        let failures = run(r#"
    {"src": "tag:web", "deny": ["tag:db:22", "tag:db:5432"]}"#)
        .unwrap_err();
        assert_eq!(
            failures,
            [(
                13,
                "test src tag:web → tag:db:5432: expected deny, but the rule at line 6 accepts it"
                    .to_owned()
            )]
        );
    }

    #[test]
    fn an_accept_failure_says_nothing_accepts() {
        let failures = run(r#"
    {"src": "tag:db", "accept": ["tag:web:80"]},
    {"src": "alice@example.com", "accept": ["printer:631"]}"#)
        .unwrap_err();
        assert_eq!(
            failures,
            [
                (13, "test src tag:db → tag:web:80: expected accept, but no rule accepts it".to_owned()),
                (14, "test src alice@example.com → printer:631: expected accept, but no rule accepts it".to_owned()),
            ]
        );
    }

    #[test]
    fn deny_without_proto_checks_udp_too() {
        let failures = run(r#"{"src": "alice@example.com", "deny": ["printer:631"]}"#).unwrap_err();
        assert_eq!(failures[0].1, "test src alice@example.com → printer:631 over udp: expected deny, but the rule at line 9 accepts it");
    }

    #[test]
    fn groups_must_hold_for_every_member() {
        let failures =
            run(r#"{"src": "group:eng", "deny": ["printer:631"], "proto": "udp"}"#).unwrap_err();
        assert_eq!(failures[0].1, "test src group:eng (member alice@example.com) → printer:631: expected deny, but the rule at line 9 accepts it");
    }

    #[test]
    fn empty_groups_cannot_satisfy_accept() {
        let source = r#"{"groups": {"group:none": []}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "tests": [{"src": "group:none", "accept": ["1.2.3.4:80"], "deny": []}]}"#;
        let failures = Policy::parse(source, "p").unwrap().run_tests().unwrap_err();
        assert_eq!(
            failures.0[0].message,
            "test src group:none → 1.2.3.4:80: expected accept, but group:none has no members"
        );
    }

    #[test]
    fn everything_is_denied_without_rules() {
        let source = r#"{"tagOwners": {"tag:a": []}, "tests": [{"src": "tag:a", "deny": ["tag:a:1", "1.2.3.4:80"]}]}"#;
        assert_eq!(
            Policy::parse(source, "p")
                .unwrap()
                .run_tests()
                .unwrap()
                .passed,
            2
        );
    }
}
