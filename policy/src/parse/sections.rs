//! Well-formedness of the sections weft loads but does not enforce: `ssh`,
//! `sshTests`, `nodeAttrs` and `autoApprovers`.
//!
//! None of them opens traffic in weft, but a team keeping one policy file for
//! both still wants CI to catch a typo there: wrong field names and value
//! types are errors, as Tailscale refuses them, and the groups, tags, hosts
//! and ipsets they name are checked against their definitions.

use crate::ast::Spanned;
use crate::hujson::{Kind, Value};
use crate::selector::{self, Selector};

use super::Walker;

const SSH_FIELDS: &[&str] = &[
    "action",
    "src",
    "dst",
    "users",
    "checkPeriod",
    "acceptEnv",
    "recorder",
    "enforceRecorder",
];
const SSH_TEST_FIELDS: &[&str] = &["src", "dst", "accept", "check", "deny"];
const NODE_ATTR_FIELDS: &[&str] = &["target", "attr", "app", "ipPool"];
const AUTO_APPROVER_FIELDS: &[&str] = &["routes", "exitNode", "services"];

/// A field's expected JSON type.
#[derive(Clone, Copy)]
enum Shape {
    /// An array of selectors, checked and recorded as references.
    Principals,
    /// An array of strings taken as written.
    Strings,
    String,
    Bool,
    Object,
}

impl Walker<'_, '_> {
    /// Checks one of the sections weft does not enforce, recording the names
    /// it uses in `references`.
    pub(super) fn unenforced_section(
        &mut self,
        key: &str,
        value: &Value,
        references: &mut Vec<Spanned<Selector>>,
    ) {
        match key {
            "ssh" => self.entries(value, "ssh", references, |walker, members, refs| {
                walker.fields(members, "ssh rule", SSH_FIELDS, refs, |field| match field {
                    "src" | "dst" | "recorder" => Some(Shape::Principals),
                    "users" | "acceptEnv" => Some(Shape::Strings),
                    "action" | "checkPeriod" => Some(Shape::String),
                    "enforceRecorder" => Some(Shape::Bool),
                    _ => None,
                });
                walker.required(members, "ssh rule", &["action", "src", "dst", "users"]);
                if let Some(period) = members.iter().find(|m| m.key == "checkPeriod") {
                    if let Kind::String(text) = &period.value.kind {
                        if !is_check_period(text) {
                            walker.error(
                                period.value.span,
                                format!("invalid checkPeriod \"{text}\""),
                                "write \"always\" or a duration such as \"12h\" or \"90m\"".into(),
                            );
                        }
                    }
                }
                if let Some(action) = members.iter().find(|m| m.key == "action") {
                    if let Kind::String(text) = &action.value.kind {
                        if text != "accept" && text != "check" {
                            walker.error(
                                action.value.span,
                                format!("invalid ssh action \"{text}\""),
                                "ssh actions are \"accept\" and \"check\"".into(),
                            );
                        }
                    }
                }
            }),
            "sshTests" => {
                self.entries(value, "sshTests", references, |walker, members, refs| {
                    walker.fields(members, "sshTests entry", SSH_TEST_FIELDS, refs, |field| {
                        match field {
                            "src" => Some(Shape::String),
                            "dst" => Some(Shape::Principals),
                            "accept" | "check" | "deny" => Some(Shape::Strings),
                            _ => None,
                        }
                    });
                    walker.required(members, "sshTests entry", &["src", "dst"]);
                    if let Some(src) = members.iter().find(|m| m.key == "src") {
                        if let Kind::String(text) = &src.value.kind {
                            walker.reference(text, src.value.span, refs);
                        }
                    }
                })
            }
            "nodeAttrs" => self.entries(value, "nodeAttrs", references, |walker, members, refs| {
                walker.fields(
                    members,
                    "nodeAttrs entry",
                    NODE_ATTR_FIELDS,
                    refs,
                    |field| match field {
                        "target" => Some(Shape::Principals),
                        "attr" | "ipPool" => Some(Shape::Strings),
                        "app" => Some(Shape::Object),
                        _ => None,
                    },
                );
                walker.required(members, "nodeAttrs entry", &["target"]);
            }),
            "autoApprovers" => self.auto_approvers(value, references),
            _ => {}
        }
    }

    /// Runs `check` on each object of the array `value`.
    fn entries(
        &mut self,
        value: &Value,
        section: &str,
        references: &mut Vec<Spanned<Selector>>,
        mut check: impl FnMut(&mut Self, &[crate::hujson::Member], &mut Vec<Spanned<Selector>>),
    ) {
        let hint = format!("\"{section}\" is a list of objects");
        let Some(items) = self.array(value, &format!("\"{section}\""), &hint) else {
            return;
        };
        for item in items {
            if let Some(members) = self.object(item, &format!("an entry of \"{section}\""), &hint) {
                check(self, members, references);
            }
        }
    }

    /// Checks each member's name and type.
    fn fields(
        &mut self,
        members: &[crate::hujson::Member],
        entry: &str,
        known: &[&str],
        references: &mut Vec<Spanned<Selector>>,
        shape: impl Fn(&str) -> Option<Shape>,
    ) {
        for member in members {
            let Some(expected) = shape(&member.key) else {
                self.unknown_field(member, &member.key, entry, known);
                continue;
            };
            let what = format!("\"{}\" of an {entry}", member.key);
            let value = &member.value;
            match expected {
                Shape::Principals | Shape::Strings => {
                    let Some(items) = self.array(value, &what, "write a list of strings") else {
                        continue;
                    };
                    for item in items {
                        let Some(text) = self.string(
                            item,
                            &format!("an entry of {what}"),
                            "write a list of strings",
                        ) else {
                            continue;
                        };
                        if matches!(expected, Shape::Principals) {
                            self.reference(text, item.span, references);
                        }
                    }
                }
                Shape::String => {
                    self.string(value, &what, "write a string");
                }
                Shape::Bool => {
                    if !matches!(value.kind, Kind::Bool(_)) {
                        self.type_error(
                            value,
                            &what,
                            "true or false",
                            &value.kind,
                            "write true or false",
                        );
                    }
                }
                Shape::Object => {
                    self.object(value, &what, "write an object");
                }
            }
        }
    }

    fn required(&mut self, members: &[crate::hujson::Member], entry: &str, keys: &[&str]) {
        let Some(first) = members.first() else {
            return;
        };
        for key in keys {
            if !members.iter().any(|m| m.key == *key) {
                self.error(
                    first.key_span,
                    format!("{entry} has no \"{key}\""),
                    format!("an {entry} needs {}", keys.join(", ")),
                );
            }
        }
    }

    /// Parses a principal of an unenforced section and records it for the resolver.
    fn reference(
        &mut self,
        text: &str,
        span: crate::diagnostic::Span,
        references: &mut Vec<Spanned<Selector>>,
    ) {
        match self.selector(text, span) {
            Ok(value) => references.push(Spanned { value, span }),
            // SSH rules may name login names in `dst` positions of tests and
            // `localpart:` patterns; only selector-shaped strings are checked.
            Err(_) if !text.contains(':') && !text.contains('@') => {}
            Err(err) => self.selector_error(span, err),
        }
    }

    fn auto_approvers(&mut self, value: &Value, references: &mut Vec<Spanned<Selector>>) {
        const HINT: &str = "write \"autoApprovers\": { \"routes\": { \"CIDR\": [\"tag:NAME\", …] }, \"exitNode\": [ … ] }";
        let Some(members) = self.object(value, "\"autoApprovers\"", HINT) else {
            return;
        };
        for member in members {
            match member.key.as_str() {
                "routes" | "services" => {
                    let Some(routes) =
                        self.object(&member.value, &format!("\"{}\"", member.key), HINT)
                    else {
                        continue;
                    };
                    for route in routes {
                        let key_ok = if member.key == "routes" {
                            matches!(selector::parse_prefix(&route.key), Ok(Some(_)))
                        } else {
                            matches!(selector::parse(&route.key), Ok(Selector::Service(_)))
                        };
                        if !key_ok {
                            let want = if member.key == "routes" {
                                "a CIDR"
                            } else {
                                "svc:NAME"
                            };
                            self.error(
                                route.key_span,
                                format!(
                                    "auto-approved {} \"{}\" is not {want}",
                                    member.key, route.key
                                ),
                                HINT.into(),
                            );
                        }
                        self.approvers(&route.value, references);
                    }
                }
                "exitNode" => self.approvers(&member.value, references),
                other => self.unknown_field(member, other, "autoApprovers", AUTO_APPROVER_FIELDS),
            }
        }
    }

    fn approvers(&mut self, value: &Value, references: &mut Vec<Spanned<Selector>>) {
        const HINT: &str = "approvers are a list of users, groups, tags or autogroups";
        let Some(items) = self.array(value, "an approver list", HINT) else {
            return;
        };
        for item in items {
            if let Some(text) = self.string(item, "an approver", HINT) {
                self.reference(text, item.span, references);
            }
        }
    }
}

/// `always`, or a duration in Go's form: numbers with `h`, `m` or `s`, e.g. `1h30m`.
fn is_check_period(text: &str) -> bool {
    if text == "always" {
        return true;
    }
    let mut digits = false;
    let mut units = 0;
    for c in text.chars() {
        match c {
            '0'..='9' | '.' => digits = true,
            'h' | 'm' | 's' if digits => {
                digits = false;
                units += 1;
            }
            _ => return false,
        }
    }
    !digits && units > 0
}

#[cfg(test)]
mod tests {
    use crate::{Policy, Severity};

    fn errors(section: &str) -> Vec<(String, String)> {
        let source = format!(
            "{{\"groups\": {{\"group:eng\": []}}, \"tagOwners\": {{\"tag:prod\": []}},\n{section}}}"
        );
        match Policy::parse(&source, "p") {
            Ok(_) => Vec::new(),
            Err(diags) => diags
                .0
                .into_iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| (d.message, d.hint.unwrap_or_default()))
                .collect(),
        }
    }

    #[test]
    fn well_formed_sections_load() {
        let sections = r#""ssh": [
    {"action": "check", "src": ["group:eng"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot", "root"], "checkPeriod": "12h"},
    {"action": "accept", "src": ["tag:prod"], "dst": ["tag:prod"], "users": ["deploy"], "acceptEnv": ["GIT_*"], "recorder": ["tag:prod"], "enforceRecorder": false},
  ],
  "sshTests": [{"src": "group:eng", "dst": ["tag:prod"], "accept": ["root"], "check": ["ubuntu"], "deny": ["admin"]}],
  "nodeAttrs": [{"target": ["autogroup:member", "group:eng"], "attr": ["funnel"]}, {"target": ["*"], "app": {"tailscale.com/app-connectors": []}}],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:prod"], "fd00::/8": ["group:eng"]}, "exitNode": ["tag:prod", "autogroup:admin"], "services": {"svc:wiki": ["tag:prod"]}},"#;
        assert_eq!(errors(sections), []);
    }

    #[test]
    fn typos_and_wrong_types_are_errors() {
        assert_eq!(
            errors(
                r#""ssh": [{"action": "acept", "src": ["group:eng"], "dst": ["tag:prod"], "users": ["root"]}]"#
            ),
            [(
                "invalid ssh action \"acept\"".into(),
                "ssh actions are \"accept\" and \"check\"".into()
            )]
        );
        assert_eq!(
            errors(
                r#""ssh": [{"action": "accept", "src": ["group:eng"], "dts": ["tag:prod"], "users": ["root"]}]"#
            ),
            [
                (
                    "ssh rule has no \"dst\"".into(),
                    "an ssh rule needs action, src, dst, users".into()
                ),
                (
                    "unknown key \"dts\" in ssh rule".into(),
                    "did you mean \"dst\"?".into()
                ),
            ]
        );
        assert_eq!(
            errors(
                r#""ssh": [{"action": "accept", "src": "group:eng", "dst": ["tag:prod"], "users": ["root"], "enforceRecorder": "yes"}]"#
            ),
            [
                (
                    "\"src\" of an ssh rule must be an array, found a string".into(),
                    "write a list of strings".into()
                ),
                (
                    "\"enforceRecorder\" of an ssh rule must be true or false, found a string"
                        .into(),
                    "write true or false".into()
                ),
            ]
        );
        assert_eq!(
            errors(r#""nodeAttrs": [{"target": ["tag:prd"], "attrs": ["funnel"]}]"#),
            [
                (
                    "tag \"tag:prd\" has no \"tagOwners\" entry".into(),
                    "did you mean \"tag:prod\"?".into()
                ),
                (
                    "unknown key \"attrs\" in nodeAttrs entry".into(),
                    "did you mean \"attr\"?".into()
                ),
            ]
        );
        assert_eq!(
            errors(r#""autoApprovers": {"routes": {"10.0.0.0/33": ["tag:prod"]}, "exitNodes": []}"#),
            [
                ("auto-approved routes \"10.0.0.0/33\" is not a CIDR".into(), "write \"autoApprovers\": { \"routes\": { \"CIDR\": [\"tag:NAME\", …] }, \"exitNode\": [ … ] }".into()),
                ("unknown key \"exitNodes\" in autoApprovers".into(), "did you mean \"exitNode\"?".into()),
            ]
        );
        assert_eq!(
            errors(
                r#""sshTests": [{"src": "group:nope", "dst": ["tag:prod"], "accept": ["root"]}]"#
            )[0]
            .0,
            "undefined group \"group:nope\""
        );
        assert_eq!(
            errors(r#""ssh": [{"action": "check", "src": ["group:eng"], "dst": ["tag:prod"], "users": ["root"], "checkPeriod": "12 hours"}]"#)[0].0,
            "invalid checkPeriod \"12 hours\""
        );
        assert!(super::is_check_period("1h30m") && super::is_check_period("always"));
        assert!(!super::is_check_period("h") && !super::is_check_period("12"));
    }
}
