//! Resolves names in the [`ast`](crate::ast) against the file's definitions, producing the [`rules`](crate::rules).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::ast::{File, Spanned};
use crate::diagnostic::{known_list, suggest, Diagnostic, SourceMap, Span};
use crate::rules::{Check, DstTarget, Expect, Rule, Target, TestCase};
use crate::selector::Selector;

/// The checked rules and tests of a file.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    pub(crate) rules: Vec<Rule>,
    pub(crate) tests: Vec<TestCase>,
}

/// Resolves every name, appending problems to `diags`.
pub(crate) fn resolve(file: &File, map: &SourceMap<'_>, diags: &mut Vec<Diagnostic>) -> Resolved {
    let mut resolver = Resolver {
        groups: file
            .groups
            .iter()
            .map(|g| {
                (
                    g.name.value.as_str(),
                    g.members.iter().map(|m| m.value.clone()).collect(),
                )
            })
            .collect(),
        tags: file
            .tag_owners
            .iter()
            .map(|t| t.tag.value.as_str())
            .collect(),
        hosts: file
            .hosts
            .iter()
            .map(|h| (h.name.value.as_str(), h.prefix))
            .collect(),
        map,
        diags,
    };
    for def in &file.tag_owners {
        for owner in &def.owners {
            resolver.target(owner);
        }
    }
    let rules = file
        .acls
        .iter()
        .map(|acl| Rule {
            line: map.location(acl.span.start).line,
            src: acl.src.iter().filter_map(|s| resolver.target(s)).collect(),
            dst: acl
                .dst
                .iter()
                .filter_map(|d| {
                    let target = resolver.target(&Spanned {
                        value: d.value.selector.clone(),
                        span: d.span,
                    })?;
                    Some(DstTarget {
                        target,
                        ports: d.value.ports.clone(),
                    })
                })
                .collect(),
            protocols: acl.proto.into_iter().collect(),
        })
        .collect();
    let tests = file
        .tests
        .iter()
        .filter_map(|entry| {
            let src = resolver.target(&entry.src)?;
            let accept = entry.accept.iter().map(|d| (Expect::Accept, d));
            let deny = entry.deny.iter().map(|d| (Expect::Deny, d));
            let checks = accept
                .chain(deny)
                .filter_map(|(expect, d)| {
                    let dst = resolver.target(&Spanned {
                        value: d.value.selector.clone(),
                        span: d.span,
                    })?;
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
                checks,
            })
        })
        .collect();
    Resolved { rules, tests }
}

struct Resolver<'f, 'm, 'd> {
    groups: BTreeMap<&'f str, Vec<String>>,
    tags: std::collections::BTreeSet<&'f str>,
    hosts: BTreeMap<&'f str, IpNet>,
    map: &'m SourceMap<'m>,
    diags: &'d mut Vec<Diagnostic>,
}

impl Resolver<'_, '_, '_> {
    /// Resolves one selector; `None` (with a diagnostic) when it names something undefined.
    fn target(&mut self, selector: &Spanned<Selector>) -> Option<Target> {
        let span = selector.span;
        match &selector.value {
            Selector::Any => Some(Target::Any),
            Selector::User(user) => Some(Target::User(user.clone())),
            Selector::Prefix(net) => Some(Target::Prefix(*net)),
            Selector::Group(name) => {
                if let Some(members) = self.groups.get(name.as_str()) {
                    return Some(Target::Group {
                        name: name.clone(),
                        members: members.clone(),
                    });
                }
                let hint = self
                    .did_you_mean(name, self.groups.keys().copied())
                    .unwrap_or_else(|| {
                        format!(
                            "define it under \"groups\", or fix the name ({})",
                            known_list("groups", self.groups.keys().copied())
                        )
                    });
                self.error(span, format!("undefined group \"{name}\""), hint);
                None
            }
            Selector::Tag(tag) => {
                if self.tags.contains(tag.as_str()) {
                    return Some(Target::Tag(tag.clone()));
                }
                let hint = self
                    .did_you_mean(tag, self.tags.iter().copied())
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
                if let Some(prefix) = self.hosts.get(name.as_str()) {
                    return Some(Target::Prefix(*prefix));
                }
                let as_group = format!("group:{name}");
                let as_tag = format!("tag:{name}");
                let hint = if self.groups.contains_key(as_group.as_str()) {
                    format!("did you mean the group \"{as_group}\"?")
                } else if self.tags.contains(as_tag.as_str()) {
                    format!("did you mean the tag \"{as_tag}\"?")
                } else {
                    self.did_you_mean(name, self.hosts.keys().copied())
                        .unwrap_or_else(|| {
                            format!(
                                "define it under \"hosts\", or fix the name ({})",
                                known_list("hosts", self.hosts.keys().copied())
                            )
                        })
                };
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
            "define it under \"groups\", or fix the name (known groups: group:ops)"
        );
        let full = Policy::parse(
            &with_rule(r#"{"action": "accept", "src": ["group:eng"], "dst": ["*:*"]}"#),
            "policy.hujson",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            full,
            "policy.hujson:6:34: error: undefined group \"group:eng\"\n  hint: define it under \"groups\", or fix the name (known groups: group:ops)"
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
