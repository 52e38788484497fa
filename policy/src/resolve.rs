//! Resolves names in the [`ast`](crate::ast) against the file's definitions, producing the [`rules`](crate::rules).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use weft_proto::{RuleAction, RuleId};

use crate::ast::{Action, File, Spanned};
use crate::diagnostic::{known_list, suggest, Diagnostic, SourceMap, Span};
use crate::ipsets::{self, Ipset};
use crate::posture::Posture;
use crate::roles::Roles;
use crate::rules::{AppRule, Check, DstTarget, Expect, Rule, Rules, Target, TestCase, Unenforced};
use crate::selector::{is_external_group, Autogroup, Selector};

/// How the warning about a test that needs the device list ends; with a
/// device list the test is evaluated and the warning is void.
pub(crate) const NOT_EVALUATED_OFFLINE: &str = "is not evaluated offline — needs the device list";

/// The checked rules and tests of a file, and its definitions.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    pub(crate) rules: Rules,
    pub(crate) tests: Vec<TestCase>,
    pub(crate) names: Names,
}

/// The file's definitions, for resolving principals named outside it (`explain`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Names {
    pub(crate) groups: BTreeMap<String, Vec<String>>,
    pub(crate) tags: BTreeSet<String>,
    pub(crate) hosts: BTreeMap<String, IpNet>,
    pub(crate) ipsets: BTreeMap<String, Ipset>,
    /// The role members the policy was resolved with.
    pub(crate) roles: Roles,
}

/// Where a selector appears, for the checks that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

/// Resolves every name, appending problems to `diags`.
pub(crate) fn resolve(
    file: &File,
    roles: &Roles,
    map: &SourceMap<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Resolved {
    let mut names = Names {
        groups: file
            .groups
            .iter()
            .map(|g| {
                (
                    g.name.value.clone(),
                    g.members.iter().map(|m| m.value.clone()).collect(),
                )
            })
            .collect(),
        tags: file
            .tag_owners
            .iter()
            .map(|t| t.tag.value.clone())
            .collect(),
        hosts: file
            .hosts
            .iter()
            .map(|h| (h.name.value.clone(), h.prefix))
            .collect(),
        ipsets: BTreeMap::new(),
        roles: roles.clone(),
    };
    names.ipsets = ipsets::resolve(&file.ipsets, &names, map, diags);
    let postures: BTreeMap<&str, Posture> = file
        .postures
        .iter()
        .map(|p| {
            (
                p.name.value.as_str(),
                Posture {
                    name: p.name.value.clone(),
                    conditions: p.conditions.clone(),
                },
            )
        })
        .collect();
    let mut resolver = Resolver {
        names: &names,
        postures: &postures,
        map,
        diags,
        deny: false,
        warned: BTreeSet::new(),
    };
    for def in &file.tag_owners {
        for owner in &def.owners {
            resolver.target(owner, Side::Src);
        }
    }
    for reference in &file.references {
        resolver.reference(reference);
    }
    let default_posture = if file.default_src_posture.is_empty() {
        None
    } else {
        resolver.postures(&file.default_src_posture)
    };
    let mut rules = Vec::new();
    for acl in &file.acls {
        let posture = match (&acl.src_posture, acl.action) {
            (Some(names), _) => resolver.postures(names),
            (None, Action::Accept) => default_posture.clone(),
            (None, Action::Deny) => None,
        };
        let action = match acl.action {
            Action::Accept => RuleAction::Accept,
            Action::Deny if acl.audit || file.audit => RuleAction::AuditDeny,
            Action::Deny => RuleAction::Deny,
        };
        resolver.deny = acl.action == Action::Deny;
        let src = resolver.targets(&acl.src, Side::Src);
        let dst = acl
            .dst
            .iter()
            .flat_map(|d| {
                resolver
                    .expand(
                        &Spanned {
                            value: d.value.selector.clone(),
                            span: d.span,
                        },
                        Side::Dst,
                    )
                    .into_iter()
                    .map(|target| DstTarget {
                        target,
                        ports: d.value.ports.clone(),
                    })
            })
            .collect();
        resolver.deny = false;
        let text = map.snippet(acl.span);
        rules.push(Rule {
            line: map.location(acl.span.start).line,
            id: RuleId::of_text(&text),
            text,
            action,
            src,
            dst,
            protocols: acl.proto.into_iter().collect(),
            posture,
        });
    }
    let mut apps = Vec::new();
    let mut inert = Vec::new();
    for grant in &file.grants {
        let posture = match &grant.src_posture {
            Some(names) => resolver.postures(names),
            None => default_posture.clone(),
        };
        let line = map.location(grant.span.start).line;
        let text = map.snippet(grant.span);
        let id = RuleId::of_text(&text);
        let src = resolver.targets(&grant.src, Side::Src);
        let dst = resolver.targets(&grant.dst, Side::Dst);
        // Traffic a grant routes through chosen routers cannot be restricted
        // that way, so such a grant opens nothing and hands out nothing.
        let routed = !grant.via.is_empty();
        if let Some(first) = grant.via.first() {
            for router in &grant.via {
                resolver.target(router, Side::Dst);
            }
            resolver.unenforced(Unenforced::Via, first.span);
        }
        for (protocol, ports) in &grant.ip {
            let rules = if routed { &mut inert } else { &mut rules };
            rules.push(Rule {
                line,
                text: text.clone(),
                id,
                action: RuleAction::Accept,
                src: src.clone(),
                dst: dst
                    .iter()
                    .map(|target| DstTarget {
                        target: target.clone(),
                        ports: ports.clone(),
                    })
                    .collect(),
                protocols: protocol.iter().copied().collect(),
                posture: posture.clone(),
            });
        }
        if !grant.app.is_empty() && !routed {
            apps.push(AppRule {
                line,
                src,
                dst,
                caps: grant.app.clone(),
                posture,
            });
        }
    }
    let tests = file
        .tests
        .iter()
        .filter_map(|entry| {
            let src = resolver.target(&entry.src, Side::Src)?;
            let needs_devices = std::iter::once(&entry.src.value)
                .chain(entry.accept.iter().chain(&entry.deny).map(|d| &d.value.selector))
                .find_map(|selector| needs_devices(selector, &names));
            if let Some(reason) = &needs_devices {
                resolver.diags.push(map.warning(
                    entry.span,
                    format!("test src {} {NOT_EVALUATED_OFFLINE}", entry.src_text),
                    Some(format!("{reason}; give the device list to evaluate it (the coordinator evaluates it against its nodes on every load)")),
                ));
            }
            let accept = entry.accept.iter().map(|d| (Expect::Accept, d));
            let deny = entry.deny.iter().map(|d| (Expect::Deny, d));
            let checks = accept
                .chain(deny)
                .filter_map(|(expect, d)| {
                    let dst = resolver.target(
                        &Spanned {
                            value: d.value.selector.clone(),
                            span: d.span,
                        },
                        Side::Dst,
                    )?;
                    Some(Check {
                        expect,
                        dst_text: d.value.text.clone(),
                        dst,
                        port: d.value.port,
                    })
                })
                .collect();
            Some(TestCase {
                location: map.location(entry.span.start),
                src_text: entry.src_text.clone(),
                src,
                proto: entry.proto,
                attributes: entry.src_posture_attrs.clone(),
                checks,
                needs_devices,
            })
        })
        .collect();
    Resolved {
        rules: Rules {
            rules,
            apps,
            inert,
            audit: file.audit,
        },
        tests,
        names,
    }
}

/// Why a test naming `selector` needs the nodes: a role stands for its
/// members' devices, and an overlay address outside `hosts` for whichever
/// device holds it.
fn needs_devices(selector: &Selector, names: &Names) -> Option<String> {
    match selector {
        Selector::Autogroup(Autogroup::Role(role)) => Some(format!(
            "{} stands for the devices of the {} role's members",
            role.autogroup(),
            role.name()
        )),
        Selector::Prefix(net)
            if net.prefix_len() == net.max_prefix_len()
                && OVERLAY
                    .iter()
                    .any(|o| o.parse::<IpNet>().is_ok_and(|o| o.contains(net)))
                && !names.hosts.values().any(|h| h.contains(net)) =>
        {
            Some(format!(
                "{} is an overlay address, which stands for the device holding it",
                net.addr()
            ))
        }
        _ => None,
    }
}

/// The overlay's address ranges.
const OVERLAY: [&str; 2] = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"];

struct Resolver<'f, 'm, 'd> {
    names: &'f Names,
    postures: &'f BTreeMap<&'f str, Posture>,
    map: &'m SourceMap<'m>,
    diags: &'d mut Vec<Diagnostic>,
    /// Resolving a deny rule: a role without members then stands for everyone.
    deny: bool,
    /// Constructs already warned about, to warn once each.
    warned: BTreeSet<String>,
}

impl Resolver<'_, '_, '_> {
    fn targets(&mut self, selectors: &[Spanned<Selector>], side: Side) -> Vec<Target> {
        selectors
            .iter()
            .flat_map(|s| self.expand(s, side))
            .collect()
    }

    /// Resolves a selector to its targets: one, except for an ipset's prefixes.
    fn expand(&mut self, selector: &Spanned<Selector>, side: Side) -> Vec<Target> {
        let Selector::Ipset(name) = &selector.value else {
            return self.target(selector, side).into_iter().collect();
        };
        let Some(set) = self.names.ipsets.get(name) else {
            self.undefined_ipset(name, selector.span);
            return Vec::new();
        };
        let mut targets: Vec<Target> = set.nets.iter().map(|n| Target::Prefix(*n)).collect();
        if set.internet {
            targets.push(self.unenforced(Unenforced::Internet, selector.span));
        }
        targets
    }

    fn undefined_ipset(&mut self, name: &str, span: Span) {
        let hint = self
            .did_you_mean(name, self.names.ipsets.keys().map(String::as_str))
            .unwrap_or_else(|| {
                format!(
                    "define it under \"ipsets\" ({})",
                    known_list("ipsets", self.names.ipsets.keys().map(String::as_str))
                )
            });
        self.error(span, format!("undefined ipset \"{name}\""), hint);
    }

    /// Checks a name used in a section weft does not enforce.
    fn reference(&mut self, selector: &Spanned<Selector>) {
        match &selector.value {
            Selector::Group(_) | Selector::Tag(_) | Selector::Host(_) => {
                self.target(selector, Side::Dst);
            }
            Selector::Ipset(name) if !self.names.ipsets.contains_key(name) => {
                self.undefined_ipset(name, selector.span);
            }
            _ => {}
        }
    }

    /// The target of a construct weft does not enforce, warning once per construct.
    fn unenforced(&mut self, what: Unenforced, span: Span) -> Target {
        // One warning per construct; every service is the same construct.
        let key = match &what {
            Unenforced::Service(_) => "svc:".to_owned(),
            other => other.construct(),
        };
        if self.warned.insert(key) {
            let hint = match what {
                Unenforced::Role(_) => "give weft the role's members (the coordinator's roles setting, or a roles file for `weft policy check`); the rest of the policy still applies",
                Unenforced::Service(_) => "the same holds for every svc: name in the file; weft loads those rules but never matches them there, so they grant nothing the file does not",
                _ => "weft loads the rule but never matches this part of it, so it grants nothing the file does not; the rest of the policy still applies",
            };
            self.diags
                .push(self.map.warning(span, what.message(), Some(hint.into())));
        }
        Target::Unenforced(what)
    }

    /// Resolves `srcPosture` names; `None` (with diagnostics) if any is undefined.
    fn postures(&mut self, names: &[Spanned<String>]) -> Option<Vec<Posture>> {
        let mut found = Vec::new();
        for name in names {
            match self.postures.get(name.value.as_str()) {
                Some(posture) => found.push(posture.clone()),
                None => {
                    let hint = self
                        .did_you_mean(&name.value, self.postures.keys().copied())
                        .unwrap_or_else(|| {
                            format!(
                                "define it under \"postures\" ({})",
                                known_list("postures", self.postures.keys().copied())
                            )
                        });
                    self.error(
                        name.span,
                        format!("undefined posture \"{}\"", name.value),
                        hint,
                    );
                }
            }
        }
        (found.len() == names.len()).then_some(found)
    }

    /// Resolves one selector; `None` (with a diagnostic) when it names something undefined.
    fn target(&mut self, selector: &Spanned<Selector>, side: Side) -> Option<Target> {
        let span = selector.span;
        match &selector.value {
            Selector::Any => Some(Target::Any),
            Selector::User(user) => Some(Target::User(user.clone())),
            Selector::Prefix(net) => Some(Target::Prefix(*net)),
            Selector::Workload(pattern) => Some(Target::Workload(pattern.clone())),
            Selector::Autogroup(Autogroup::Member) => Some(Target::Member),
            Selector::Autogroup(Autogroup::Tagged) => Some(Target::Tagged),
            Selector::Autogroup(Autogroup::DangerAll) => {
                if side == Side::Src {
                    return Some(Target::Any);
                }
                self.error(
                    span,
                    "autogroup:danger-all is only valid as a source".into(),
                    "name the destinations, or use * for every node".into(),
                );
                None
            }
            Selector::Autogroup(Autogroup::Internet) => {
                Some(self.unenforced(Unenforced::Internet, span))
            }
            Selector::Autogroup(Autogroup::Shared) => {
                Some(self.unenforced(Unenforced::Shared, span))
            }
            Selector::Service(name) => {
                Some(self.unenforced(Unenforced::Service(name.clone()), span))
            }
            Selector::Autogroup(Autogroup::Role(role)) => match self.names.roles.get(*role) {
                Some(members) => Some(Target::Role {
                    role: *role,
                    users: members.users.clone(),
                    groups: members.groups.clone(),
                }),
                None if self.deny => {
                    // Not knowing who holds the role, a deny against it
                    // denies everyone rather than no one.
                    if self.warned.insert(format!("deny {}", role.autogroup())) {
                        self.diags.push(self.map.warning(
                            span,
                            format!("{} has no members configured, so deny rules naming it deny every source", role.autogroup()),
                            Some("give weft the role's members (the coordinator's roles setting, or a roles file for `weft policy check`)".into()),
                        ));
                    }
                    Some(Target::Any)
                }
                None => Some(self.unenforced(Unenforced::Role(*role), span)),
            },
            Selector::Ipset(name) => {
                // Only reached for single principals; rules use `expand`.
                if !self.names.ipsets.contains_key(name) {
                    self.undefined_ipset(name, span);
                }
                None
            }
            Selector::Autogroup(Autogroup::SelfUser) => {
                if side == Side::Dst {
                    return Some(Target::SelfUser);
                }
                self.error(
                    span,
                    "autogroup:self is only valid as a destination".into(),
                    "use autogroup:member (or users and groups) as the source".into(),
                );
                None
            }
            Selector::Group(name) if is_external_group(name) => {
                Some(Target::External(name.clone()))
            }
            Selector::Group(name) => {
                if let Some(members) = self.names.groups.get(name.as_str()) {
                    return Some(Target::Group {
                        name: name.clone(),
                        members: members.clone(),
                    });
                }
                let hint = self
                    .did_you_mean(name, self.names.groups.keys().map(String::as_str))
                    .unwrap_or_else(|| {
                        format!(
                            "define it under \"groups\", or fix the name ({}); identity-provider groups are written group:idp:NAME",
                            known_list("groups", self.names.groups.keys().map(String::as_str))
                        )
                    });
                self.error(span, format!("undefined group \"{name}\""), hint);
                None
            }
            Selector::Tag(tag) => {
                if self.names.tags.contains(tag.as_str()) {
                    return Some(Target::Tag(tag.clone()));
                }
                let hint = self
                    .did_you_mean(tag, self.names.tags.iter().map(String::as_str))
                    .unwrap_or_else(|| {
                        format!("add \"{tag}\": [] (or its owners) under \"tagOwners\"")
                    });
                self.error(
                    span,
                    format!("tag \"{tag}\" has no \"tagOwners\" entry"),
                    hint,
                );
                None
            }
            Selector::Host(name) => {
                if let Some(prefix) = self.names.hosts.get(name.as_str()) {
                    return Some(Target::Prefix(*prefix));
                }
                let hint = host_hint(self.names, name);
                self.error(span, format!("undefined host \"{name}\""), hint);
                None
            }
        }
    }

    fn did_you_mean<'c>(
        &self,
        name: &str,
        known: impl IntoIterator<Item = &'c str>,
    ) -> Option<String> {
        suggest(name, known).map(|near| format!("did you mean \"{near}\"?"))
    }

    fn error(&mut self, span: Span, message: String, hint: String) {
        self.diags.push(self.map.error(span, message, Some(hint)));
    }
}

/// What to say about an undefined host name: a group or tag of that name, or a near miss.
pub(crate) fn host_hint(names: &Names, name: &str) -> String {
    let as_group = format!("group:{name}");
    let as_tag = format!("tag:{name}");
    if names.groups.contains_key(&as_group) {
        format!("did you mean the group \"{as_group}\"?")
    } else if names.tags.contains(&as_tag) {
        format!("did you mean the tag \"{as_tag}\"?")
    } else {
        suggest(name, names.hosts.keys().map(String::as_str)).map_or_else(
            || {
                format!(
                    "define it under \"hosts\", or fix the name ({})",
                    known_list("hosts", names.hosts.keys().map(String::as_str))
                )
            },
            |near| format!("did you mean \"{near}\"?"),
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    fn error(source: &str) -> (u32, u32, String, String) {
        let diags = Policy::parse(source, "policy.hujson").unwrap_err().0;
        assert_eq!(diags.len(), 1, "expected one diagnostic, got {diags:#?}");
        let d = &diags[0];
        (
            d.line,
            d.column,
            d.message.clone(),
            d.hint.clone().unwrap_or_default(),
        )
    }

    const HEAD: &str = r#"{
  "groups": {"group:ops": ["olga@example.com"]},
  "tagOwners": {"tag:web": ["group:ops"]},
  "hosts": {"db-net": "100.64.0.0/24"},
  "acls": ["#;

    fn with_rule(rule: &str) -> String {
        format!("{HEAD}\n    {rule}\n  ]\n}}")
    }

    #[test]
    fn undefined_group() {
        let (line, col, message, hint) = error(&with_rule(
            r#"{"action": "accept", "src": ["group:eng"], "dst": ["*:*"]}"#,
        ));
        assert_eq!((line, col), (6, 34));
        assert_eq!(message, "undefined group \"group:eng\"");
        assert_eq!(
            hint,
            "define it under \"groups\", or fix the name (known groups: group:ops); identity-provider groups are written group:idp:NAME"
        );
        let full = Policy::parse(
            &with_rule(r#"{"action": "accept", "src": ["group:eng"], "dst": ["*:*"]}"#),
            "policy.hujson",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            full,
            "policy.hujson:6:34: error: undefined group \"group:eng\"\n  hint: define it under \"groups\", or fix the name (known groups: group:ops); identity-provider groups are written group:idp:NAME"
        );
        let (_, _, _, hint) = error(&with_rule(
            r#"{"action": "accept", "src": ["group:opz"], "dst": ["*:*"]}"#,
        ));
        assert_eq!(hint, "did you mean \"group:ops\"?");
    }

    #[test]
    fn undefined_host() {
        let (line, col, message, hint) = error(&with_rule(
            r#"{"action": "accept", "src": ["*"], "dst": ["printer:631"]}"#,
        ));
        assert_eq!((line, col), (6, 48));
        assert_eq!(message, "undefined host \"printer\"");
        assert_eq!(
            hint,
            "define it under \"hosts\", or fix the name (known hosts: db-net)"
        );
        let (_, _, message, hint) = error(&with_rule(
            r#"{"action": "accept", "src": ["ops"], "dst": ["*:*"]}"#,
        ));
        assert_eq!(message, "undefined host \"ops\"");
        assert_eq!(hint, "did you mean the group \"group:ops\"?");
    }

    #[test]
    fn tags_need_tag_owners() {
        let (line, col, message, hint) = error(&with_rule(
            r#"{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}"#,
        ));
        assert_eq!((line, col), (6, 54));
        assert_eq!(message, "tag \"tag:db\" has no \"tagOwners\" entry");
        assert_eq!(
            hint,
            "add \"tag:db\": [] (or its owners) under \"tagOwners\""
        );
        let source = r#"{"tagOwners": {"tag:web": []}, "tests": [{"src": "tag:api", "accept": ["tag:web:80"]}]}"#;
        let (_, _, message, _) = error(source);
        assert_eq!(message, "tag \"tag:api\" has no \"tagOwners\" entry");
    }

    #[test]
    fn tag_owners_must_exist() {
        let (_, _, message, _) =
            error(r#"{"tagOwners": {"tag:web": ["group:nobody", "autogroup:admin"]}}"#);
        assert_eq!(message, "undefined group \"group:nobody\"");
        let (_, _, message, _) = error(r#"{"tagOwners": {"tag:web": ["tag:ci"]}}"#);
        assert_eq!(message, "tag \"tag:ci\" has no \"tagOwners\" entry");
    }

    fn warnings(policy: &Policy) -> Vec<String> {
        policy
            .warnings()
            .iter()
            .map(|w| format!("{}:{}: {}", w.line, w.column, w.message))
            .collect()
    }

    fn verdict(policy: &Policy, src: &str, dst: &str, port: u16) -> crate::Verdict {
        policy
            .explain(src, dst, port, crate::Protocol::Tcp)
            .unwrap()
            .verdict
    }

    #[test]
    fn exit_node_sharing_and_services_match_nothing_and_warn_once() {
        let policy = Policy::parse(
            &with_rule(
                r#"{"action": "accept", "src": ["group:ops", "autogroup:shared"], "dst": ["autogroup:internet:*", "tag:web:443"]},
    {"action": "accept", "src": ["*"], "dst": ["autogroup:internet:*"]}],
  "grants": [{"src": ["autogroup:shared"], "dst": ["svc:wiki", "svc:git"], "ip": ["tcp:443"]}"#,
            ),
            "policy.hujson",
        )
        .unwrap();
        assert_eq!(
            warnings(&policy),
            [
                "6:47: autogroup:shared matches nothing: weft has no sharing between networks, so users shared in are not enforced",
                "6:76: autogroup:internet matches nothing: weft has no exit nodes, so exit-node access is not enforced",
                "8:52: svc:wiki matches nothing: weft has no Tailscale Services, so access to them is not enforced",
            ]
        );
        assert!(policy.warnings()[1]
            .hint
            .as_deref()
            .unwrap()
            .contains("grants nothing the file does not"));
        // The enforced parts of the rule still apply.
        assert_eq!(
            verdict(&policy, "olga@example.com", "tag:web", 443),
            crate::Verdict::Accept
        );
        assert_eq!(
            verdict(&policy, "olga@example.com", "8.8.8.8", 443),
            crate::Verdict::Deny
        );
    }

    #[test]
    fn role_autogroups_resolve_to_configured_members() {
        let source = with_rule(
            r#"{"action": "accept", "src": ["autogroup:admin"], "dst": ["tag:web:22"]},
    {"action": "deny", "src": ["autogroup:auditor"], "dst": ["tag:web:*"]},
    {"action": "accept", "src": ["*"], "dst": ["tag:web:80"]}"#,
        );
        let policy = Policy::parse(&source, "policy.hujson").unwrap();
        assert_eq!(
            warnings(&policy),
            [
                "6:34: autogroup:admin matches nothing: the admin role has no members configured",
                "7:32: autogroup:auditor has no members configured, so deny rules naming it deny every source",
            ]
        );
        assert_eq!(
            verdict(&policy, "alice@example.com", "tag:web", 22),
            crate::Verdict::Deny
        );
        assert_eq!(
            verdict(&policy, "alice@example.com", "tag:web", 80),
            crate::Verdict::Deny,
            "not knowing the auditors, the deny covers everyone"
        );
        let mut roles = crate::Roles::default();
        roles.add(crate::Role::Admin, "alice@example.com").unwrap();
        roles.add(crate::Role::Admin, "group:idp:secops").unwrap();
        roles
            .add(crate::Role::Auditor, "carol@example.com")
            .unwrap();
        let policy = Policy::parse_with_roles(&source, "policy.hujson", &roles).unwrap();
        assert!(policy.warnings().is_empty(), "{:?}", warnings(&policy));
        for (src, port, expected) in [
            ("alice@example.com", 22, crate::Verdict::Accept),
            ("group:idp:secops", 22, crate::Verdict::Accept),
            ("bob@example.com", 22, crate::Verdict::Deny),
            ("bob@example.com", 80, crate::Verdict::Accept),
            ("carol@example.com", 80, crate::Verdict::Deny),
            ("autogroup:admin", 22, crate::Verdict::Accept),
        ] {
            assert_eq!(
                verdict(&policy, src, "tag:web", port),
                expected,
                "{src} :{port}"
            );
        }
    }

    #[test]
    fn tag_owners_take_role_autogroups() {
        let policy = Policy::parse(
            r#"{"groups": {"group:ops": []}, "tagOwners": {"tag:a": ["autogroup:admin", "autogroup:it-admin", "autogroup:member", "group:ops"]}}"#,
            "p",
        );
        assert!(policy.is_ok(), "{policy:?}");
        let (_, _, message, hint) = error(r#"{"tagOwners": {"tag:a": ["autogroup:internet"]}}"#);
        assert_eq!(message, "\"autogroup:internet\" cannot own a tag");
        assert!(hint.contains("role autogroup"), "{hint}");
        let (_, _, message, _) = error(r#"{"tagOwners": {"tag:a": ["autogroup:admins"]}}"#);
        assert_eq!(message, "unknown autogroup \"autogroup:admins\"");
    }

    #[test]
    fn ipsets_work_wherever_a_cidr_does() {
        let policy = Policy::parse(
            r#"{
  "hosts": {"lab": "10.1.5.0/24"},
  "ipsets": {
    "ipset:corp": ["add 10.1.0.0/16", "remove host:lab", "add ipset:vpn"],
    "ipset:vpn": ["192.0.2.0/24"],
    "ipset:out": ["add autogroup:internet", "remove 8.8.8.8"],
    "ipset:tailnet-only": ["0.0.0.0/0", "remove autogroup:internet"],
  },
  "acls": [
    {"action": "accept", "src": ["ipset:corp"], "dst": ["ipset:corp:22"]},
    {"action": "accept", "src": ["*"], "dst": ["ipset:out:*", "ipset:tailnet-only:443"]},
  ],
}"#,
            "p",
        )
        .unwrap();
        assert_eq!(
            warnings(&policy),
            ["11:48: autogroup:internet matches nothing: weft has no exit nodes, so exit-node access is not enforced"]
        );
        let v = |src: &str, dst: &str, port: u16| verdict(&policy, src, dst, port);
        assert_eq!(v("10.1.2.3", "192.0.2.9", 22), crate::Verdict::Accept);
        assert_eq!(
            v("10.1.5.3", "10.1.2.3", 22),
            crate::Verdict::Deny,
            "lab is removed"
        );
        assert_eq!(v("10.1.2.3", "10.1.5.3", 22), crate::Verdict::Deny);
        assert_eq!(
            v("10.1.2.3", "1.1.1.1", 80),
            crate::Verdict::Deny,
            "internet matches nothing"
        );
        assert_eq!(v("10.1.2.3", "100.64.0.9", 443), crate::Verdict::Accept);
        assert_eq!(
            v("10.1.2.3", "1.1.1.1", 443),
            crate::Verdict::Deny,
            "removing the internet removes at least the internet"
        );
        let printed = policy.to_hujson();
        assert!(
            printed.contains(
                "\"ipset:corp\": [\"add 10.1.0.0/16\", \"remove lab\", \"add ipset:vpn\"]"
            ),
            "{printed}"
        );
        let targets = |p: &Policy| {
            p.rules
                .rules
                .iter()
                .map(|r| (r.src.clone(), r.dst.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            targets(&Policy::parse(&printed, "p").unwrap()),
            targets(&policy)
        );
    }

    #[test]
    fn tests_that_need_the_nodes_are_warned_about() {
        let policy = Policy::parse(
            r#"{"hosts": {"router": "100.64.0.1"}, "tests": [
  {"src": "100.64.0.1", "deny": ["100.64.0.2:22"]},
  {"src": "100.64.0.1", "deny": ["198.51.100.1:22"]},
]}"#,
            "p",
        )
        .unwrap();
        assert_eq!(
            warnings(&policy),
            ["2:3: test src 100.64.0.1 is not evaluated offline — needs the device list"]
        );
        assert!(policy.warnings()[0]
            .hint
            .as_deref()
            .unwrap()
            .starts_with("100.64.0.2 is an overlay address"));
        let report = policy.run_tests().unwrap();
        assert_eq!((report.passed, report.not_evaluated), (1, 1));
    }

    #[test]
    fn names_in_unenforced_sections_are_checked() {
        let diags = Policy::parse(
            &format!("{HEAD}],\n  \"ssh\": [{{\"action\": \"accept\", \"src\": [\"group:opz\"], \"dst\": [\"tag:web\"], \"users\": [\"root\"]}}]\n}}"),
            "p",
        )
        .unwrap_err();
        let errors: Vec<(u32, u32, &str)> = diags
            .0
            .iter()
            .filter(|d| d.severity == crate::Severity::Error)
            .map(|d| (d.line, d.column, d.message.as_str()))
            .collect();
        assert_eq!(errors, [(6, 40, "undefined group \"group:opz\"")]);
        let mut diags = Policy::parse(
            &format!("{HEAD}],\n  \"autoApprovers\": {{\"routes\": {{\"10.0.0.0/8\": [\"tag:router\"]}}, \"exitNode\": [\"ipset:x\"]}}\n}}"),
            "p",
        )
        .unwrap_err()
        .0
        .into_iter()
        .filter(|d| d.severity == crate::Severity::Error)
        .map(|d| d.message);
        assert_eq!(
            diags.next().unwrap(),
            "tag \"tag:router\" has no \"tagOwners\" entry"
        );
        assert_eq!(diags.next().unwrap(), "undefined ipset \"ipset:x\"");
    }
}
