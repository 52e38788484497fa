//! Resolves names in the [`ast`](crate::ast) against the file's definitions, producing the [`rules`](crate::rules).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use weft_proto::RuleAction;

use crate::ast::{Action, File, Spanned};
use crate::diagnostic::{known_list, suggest, Diagnostic, SourceMap, Span};
use crate::posture::Posture;
use crate::rules::{AppRule, Check, DstTarget, Expect, Rule, Rules, Target, TestCase};
use crate::selector::{is_external_group, Autogroup, Selector};

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
}

/// Where a selector appears, for the checks that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

/// Resolves every name, appending problems to `diags`.
pub(crate) fn resolve(file: &File, map: &SourceMap<'_>, diags: &mut Vec<Diagnostic>) -> Resolved {
    let names = Names {
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
    };
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
    };
    for def in &file.tag_owners {
        for owner in &def.owners {
            resolver.target(owner, Side::Src);
        }
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
        rules.push(Rule {
            line: map.location(acl.span.start).line,
            text: map.snippet(acl.span),
            action,
            src: resolver.targets(&acl.src, Side::Src),
            dst: acl
                .dst
                .iter()
                .filter_map(|d| {
                    let target = resolver.target(
                        &Spanned {
                            value: d.value.selector.clone(),
                            span: d.span,
                        },
                        Side::Dst,
                    )?;
                    Some(DstTarget {
                        target,
                        ports: d.value.ports.clone(),
                    })
                })
                .collect(),
            protocols: acl.proto.into_iter().collect(),
            posture,
        });
    }
    let mut apps = Vec::new();
    for grant in &file.grants {
        let posture = match &grant.src_posture {
            Some(names) => resolver.postures(names),
            None => default_posture.clone(),
        };
        let line = map.location(grant.span.start).line;
        let text = map.snippet(grant.span);
        let src = resolver.targets(&grant.src, Side::Src);
        let dst = resolver.targets(&grant.dst, Side::Dst);
        for (protocol, ports) in &grant.ip {
            rules.push(Rule {
                line,
                text: text.clone(),
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
        if !grant.app.is_empty() {
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
            })
        })
        .collect();
    Resolved {
        rules: Rules {
            rules,
            apps,
            audit: file.audit,
        },
        tests,
        names,
    }
}

struct Resolver<'f, 'm, 'd> {
    names: &'f Names,
    postures: &'f BTreeMap<&'f str, Posture>,
    map: &'m SourceMap<'m>,
    diags: &'d mut Vec<Diagnostic>,
}

impl Resolver<'_, '_, '_> {
    fn targets(&mut self, selectors: &[Spanned<Selector>], side: Side) -> Vec<Target> {
        selectors
            .iter()
            .filter_map(|s| self.target(s, side))
            .collect()
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
}
