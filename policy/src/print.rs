//! Prints a parsed policy back as canonical HuJSON: one key order, every
//! list on one line, comments gone. Parsing the output gives the same policy.

use std::fmt::Write as _;

use weft_proto::PortRange;

use crate::ast::{Acl, Action, File, Grant, Spanned, TestEntry};
use crate::ports::proto_name;
use crate::selector::Selector;

/// The canonical text of `file`.
pub(crate) fn print(file: &File) -> String {
    let mut sections: Vec<String> = Vec::new();
    if file.audit {
        sections.push("  \"mode\": \"audit\"".into());
    }
    if !file.groups.is_empty() {
        let entries = file.groups.iter().map(|g| {
            format!(
                "{}: {}",
                quote(&g.name.value),
                list(g.members.iter().map(|m| m.value.clone()))
            )
        });
        sections.push(object("groups", entries));
    }
    if !file.tag_owners.is_empty() {
        let entries = file.tag_owners.iter().map(|t| {
            format!(
                "{}: {}",
                quote(&t.tag.value),
                list(t.owners.iter().map(|o| o.value.to_string()))
            )
        });
        sections.push(object("tagOwners", entries));
    }
    if !file.hosts.is_empty() {
        let entries = file.hosts.iter().map(|h| {
            let prefix = Selector::Prefix(h.prefix).to_string();
            format!("{}: {}", quote(&h.name.value), quote(&prefix))
        });
        sections.push(object("hosts", entries));
    }
    if !file.ipsets.is_empty() {
        let entries = file.ipsets.iter().map(|set| {
            let items = set.entries.iter().map(|e| {
                let op = if e.value.remove { "remove" } else { "add" };
                format!("{op} {}", e.value.selector)
            });
            format!("{}: {}", quote(&set.name.value), list(items))
        });
        sections.push(object("ipsets", entries));
    }
    if !file.postures.is_empty() {
        let entries = file.postures.iter().map(|p| {
            format!(
                "{}: {}",
                quote(&p.name.value),
                list(p.conditions.iter().map(|c| c.text()))
            )
        });
        sections.push(object("postures", entries));
    }
    if !file.default_src_posture.is_empty() {
        sections.push(format!(
            "  \"defaultSrcPosture\": {}",
            names(&file.default_src_posture)
        ));
    }
    if !file.acls.is_empty() {
        sections.push(array("acls", file.acls.iter().map(acl)));
    }
    if !file.grants.is_empty() {
        sections.push(array("grants", file.grants.iter().map(grant)));
    }
    if !file.tests.is_empty() {
        sections.push(array("tests", file.tests.iter().map(test)));
    }
    if sections.is_empty() {
        return "{}\n".into();
    }
    format!("{{\n{}\n}}\n", sections.join(",\n"))
}

fn acl(acl: &Acl) -> String {
    let action = match acl.action {
        Action::Accept => "accept",
        Action::Deny => "deny",
    };
    let mut text = format!("\"action\": \"{action}\"");
    let _ = write!(text, ", \"src\": {}", selectors(&acl.src));
    let dst = acl.dst.iter().map(|d| {
        let selector = match &d.value.selector {
            Selector::Prefix(net) if net.addr().is_ipv6() => format!("[{}]", d.value.selector),
            other => other.to_string(),
        };
        format!("{selector}:{}", ports(&d.value.ports))
    });
    let _ = write!(text, ", \"dst\": {}", list(dst));
    if let Some(protocol) = acl.proto {
        let _ = write!(text, ", \"proto\": {}", quote(&proto_name(protocol)));
    }
    if let Some(postures) = &acl.src_posture {
        let _ = write!(text, ", \"srcPosture\": {}", names(postures));
    }
    if acl.audit {
        text.push_str(", \"mode\": \"audit\"");
    }
    format!("{{{text}}}")
}

fn grant(grant: &Grant) -> String {
    let mut text = format!(
        "\"src\": {}, \"dst\": {}",
        selectors(&grant.src),
        selectors(&grant.dst)
    );
    if !grant.ip.is_empty() {
        let ip = grant.ip.iter().map(|(protocol, ranges)| match protocol {
            Some(p) => format!("{}:{}", proto_name(*p), ports(ranges)),
            None => ports(ranges),
        });
        let _ = write!(text, ", \"ip\": {}", list(ip));
    }
    if !grant.app.is_empty() {
        let caps: Vec<String> = grant
            .app
            .iter()
            .map(|(name, values)| format!("{}: [{}]", quote(name), values.join(", ")))
            .collect();
        let _ = write!(text, ", \"app\": {{{}}}", caps.join(", "));
    }
    if let Some(postures) = &grant.src_posture {
        let _ = write!(text, ", \"srcPosture\": {}", names(postures));
    }
    if !grant.via.is_empty() {
        let _ = write!(text, ", \"via\": {}", selectors(&grant.via));
    }
    format!("{{{text}}}")
}

fn test(test: &TestEntry) -> String {
    let mut text = format!("\"src\": {}", quote(&test.src_text));
    if let Some(protocol) = test.proto {
        let _ = write!(text, ", \"proto\": {}", quote(&proto_name(protocol)));
    }
    if !test.accept.is_empty() {
        let _ = write!(
            text,
            ", \"accept\": {}",
            list(test.accept.iter().map(|d| d.value.text.clone()))
        );
    }
    if !test.deny.is_empty() || test.accept.is_empty() {
        let _ = write!(
            text,
            ", \"deny\": {}",
            list(test.deny.iter().map(|d| d.value.text.clone()))
        );
    }
    if let Some(attributes) = &test.src_posture_attrs {
        let pairs: Vec<String> = attributes
            .iter()
            .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
            .collect();
        let _ = write!(text, ", \"srcPostureAttrs\": {{{}}}", pairs.join(", "));
    }
    format!("{{{text}}}")
}

fn ports(ranges: &[PortRange]) -> String {
    if ranges == [PortRange::ANY] {
        return "*".into();
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            }
        })
        .collect();
    parts.join(",")
}

fn selectors(list_of: &[Spanned<Selector>]) -> String {
    list(list_of.iter().map(|s| s.value.to_string()))
}

fn names(list_of: &[Spanned<String>]) -> String {
    list(list_of.iter().map(|s| s.value.clone()))
}

fn list(items: impl Iterator<Item = String>) -> String {
    let quoted: Vec<String> = items.map(|i| quote(&i)).collect();
    format!("[{}]", quoted.join(", "))
}

fn object(key: &str, entries: impl Iterator<Item = String>) -> String {
    let body: Vec<String> = entries.map(|e| format!("    {e},")).collect();
    format!("  \"{key}\": {{\n{}\n  }}", body.join("\n"))
}

fn array(key: &str, entries: impl Iterator<Item = String>) -> String {
    let body: Vec<String> = entries.map(|e| format!("    {e},")).collect();
    format!("  \"{key}\": [\n{}\n  ]", body.join("\n"))
}

fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::Policy;

    /// The rules with positions blanked, to compare policies printed differently.
    fn shape(policy: &Policy) -> String {
        let mut rules = policy.rules.clone();
        for rule in rules.rules.iter_mut().chain(&mut rules.inert) {
            rule.line = 0;
            rule.text.clear();
            rule.id = weft_proto::RuleId::default();
        }
        for app in &mut rules.apps {
            app.line = 0;
        }
        let tests: Vec<_> = policy
            .tests
            .iter()
            .map(|t| {
                (
                    t.src_text.clone(),
                    t.proto,
                    t.attributes.clone(),
                    t.checks.clone(),
                )
            })
            .collect();
        format!("{rules:?} {:?} {tests:?}", policy.names)
    }

    const SRC: &[&str] = &[
        "*",
        "alice@x.com",
        "group:eng",
        "group:idp:sre",
        "tag:web",
        "lan",
        "100.64.0.0/10",
        "fd7a::/48",
        "fd7a::1",
        "spiffe://td/ns/*/sa/api",
        "autogroup:member",
        "autogroup:tagged",
        "autogroup:shared",
        "autogroup:admin",
        "ipset:office",
    ];
    const DST: &[&str] = &[
        "*:*",
        "tag:db:5432",
        "lan:22,80-90",
        "[fd7a::1]:443",
        "fd7a::/48:1-2",
        "autogroup:self:*",
        "spiffe://td/ns/a/sa/b:8443",
        "group:idp:sre:22",
        "autogroup:internet:*",
        "ipset:office:443",
        "svc:wiki:443",
    ];

    fn arb_acl() -> impl Strategy<Value = String> {
        (
            prop::sample::subsequence(SRC, 1..4),
            prop::sample::subsequence(DST, 1..3),
            prop::sample::select(vec!["", ", \"proto\": \"tcp\"", ", \"proto\": 17"]),
            prop::sample::select(vec![
                "\"action\": \"accept\"",
                "\"action\": \"accept\", \"srcPosture\": [\"posture:ok\"]",
                "\"action\": \"deny\"",
                "\"action\": \"deny\", \"mode\": \"audit\"",
            ]),
        )
            .prop_map(|(src, dst, proto, action)| {
                let src: Vec<String> = src.iter().map(|s| format!("\"{s}\"")).collect();
                let dst: Vec<String> = dst.iter().map(|s| format!("\"{s}\"")).collect();
                format!(
                    "{{{action}, \"src\": [{}], \"dst\": [{}]{proto}}}",
                    src.join(", "),
                    dst.join(", ")
                )
            })
    }

    fn arb_grant() -> impl Strategy<Value = String> {
        (
            prop::sample::subsequence(SRC, 1..3),
            prop::sample::select(vec![
                "\"tag:db\"",
                "\"lan\", \"fd7a::1\"",
                "\"autogroup:self\"",
            ]),
            prop::sample::select(vec![
                "\"ip\": [\"*\"]",
                "\"ip\": [\"tcp:443\", \"icmp:*\", \"53\"]",
                "\"app\": {\"x.com/cap/a\": [{\"b\": [1, 2.5, null], \"a\": \"é\\\"\"}, true]}",
                "\"ip\": [\"udp:1-2,5\"], \"srcPosture\": [\"posture:ok\"]",
                "\"ip\": [\"*\"], \"via\": [\"tag:db\", \"tag:web\"]",
            ]),
        )
            .prop_map(|(src, dst, body)| {
                let src: Vec<String> = src.iter().map(|s| format!("\"{s}\"")).collect();
                format!(
                    "{{\"src\": [{}], \"dst\": [{dst}], {body}}}",
                    src.join(", ")
                )
            })
    }

    fn arb_policy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(arb_acl(), 0..4),
            prop::collection::vec(arb_grant(), 0..3),
            prop::bool::ANY,
            prop::bool::ANY,
        )
            .prop_map(|(acls, grants, audit, default_posture)| {
                format!(
                    r#"{{
  // a comment, and trailing commas
  {}"groups": {{"group:eng": ["alice@x.com", "bob@x.com",],}},
  "tagOwners": {{"tag:web": ["group:eng", "autogroup:admin"], "tag:db": ["tag:web"]}},
  "hosts": {{"lan": "100.64.0.0/24", "one": "fd7a::5"}},
  "ipsets": {{"ipset:office": ["add 10.1.0.0/16", "remove 10.1.2.0/24", "host:lan", "add ipset:inet"], "ipset:inet": ["autogroup:internet"]}},
  "postures": {{"posture:ok": ["node:os IN ['linux', \"mac os\"]", "node:tsVersion >= '1.40'", "custom:tier != gold"]}},
  {}"acls": [{}],
  "grants": [{}],
  "tests": [
    {{"src": "alice@x.com", "accept": [], "deny": ["tag:db:22"], "srcPostureAttrs": {{"node:os": "linux", "custom:n": 3}}}},
    {{"src": "100.64.0.1", "proto": "udp", "deny": ["[fd7a::1]:53", "one:1"]}},
  ],
  "ssh": [],
}}"#,
                    if audit { "\"mode\": \"audit\", " } else { "" },
                    if default_posture { "\"defaultSrcPosture\": [\"posture:ok\"], " } else { "" },
                    acls.join(",\n"),
                    grants.join(",\n"),
                )
            })
    }

    proptest! {
        #[test]
        fn parse_print_parse_is_stable(text in arb_policy()) {
            let first = match Policy::parse(&text, "p") {
                Ok(policy) => policy,
                Err(err) => return Err(TestCaseError::fail(format!("{err}\n{text}"))),
            };
            let printed = first.to_hujson();
            let second = Policy::parse(&printed, "p").map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert_eq!(shape(&first), shape(&second), "{}", printed);
            prop_assert_eq!(second.to_hujson(), printed);
        }
    }

    #[test]
    fn empty_policies_print_as_empty_objects() {
        assert_eq!(
            Policy::parse("// nothing\n{}", "p").unwrap().to_hujson(),
            "{}\n"
        );
    }
}
