//! Device posture: `postures` conditions on node attributes, checked at compile time.
//!
//! A condition is `ATTRIBUTE OPERATOR VALUE`, e.g. `node:os IN ['linux', 'macos']`
//! or `node:clientVersion >= '1.40'`. A posture holds when all its conditions
//! do; a `srcPosture` list holds when any of its postures does. A missing
//! attribute, or a version that is not dotted numbers, fails the condition:
//! posture only ever narrows access. A bare attribute (`node:tsAutoUpdate`)
//! holds when the attribute is `true`.
//!
//! Attributes Tailscale documents but weft does not collect
//! (`node:tsReleaseTrack`, `ip:country`, device-management integrations'
//! `PROVIDER:KEY`) are absent on every node, so conditions on them never
//! hold; the checker warns about each.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::diagnostic::suggest;

/// `node:` attributes weft nodes report.
const NODE_ATTRIBUTES: &[&str] = &[
    "node:os",
    "node:osVersion",
    "node:clientVersion",
    "node:hostname",
    "node:diskEncrypted",
];

/// A named set of conditions, all of which must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Posture {
    pub(crate) name: String,
    pub(crate) conditions: Vec<Condition>,
}

impl Posture {
    pub(crate) fn holds(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.conditions.iter().all(|c| c.holds(attributes))
    }
}

/// Whether any posture of a `srcPosture` list holds (`None`: no restriction).
pub(crate) fn satisfied(
    postures: Option<&[Posture]>,
    attributes: Option<&BTreeMap<String, String>>,
) -> bool {
    match (postures, attributes) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(list), Some(attributes)) => list.iter().any(|p| p.holds(attributes)),
    }
}

/// One condition on one attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) attribute: String,
    pub(crate) op: Op,
    pub(crate) values: Vec<String>,
}

/// A condition's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    Lt,
    Le,
    Gt,
    Ge,
    /// A bare attribute: it is `true`.
    IsTrue,
}

impl Op {
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::In => "IN",
            Op::NotIn => "NOT IN",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::IsTrue => "",
        }
    }
}

impl Condition {
    pub(crate) fn holds(&self, attributes: &BTreeMap<String, String>) -> bool {
        if !self.collected() {
            return false;
        }
        let Some(actual) = attributes.get(&self.attribute) else {
            return false;
        };
        let first = self.values.first().map(String::as_str).unwrap_or_default();
        let ordering = || compare_versions(actual, first);
        match self.op {
            Op::Eq => actual == first,
            Op::Ne => actual != first,
            Op::In => self.values.iter().any(|v| v == actual),
            Op::NotIn => self.values.iter().all(|v| v != actual),
            Op::Lt => ordering() == Some(Ordering::Less),
            Op::Le => matches!(ordering(), Some(Ordering::Less | Ordering::Equal)),
            Op::Gt => ordering() == Some(Ordering::Greater),
            Op::Ge => matches!(ordering(), Some(Ordering::Greater | Ordering::Equal)),
            Op::IsTrue => actual == "true",
        }
    }

    /// Whether weft nodes report the attribute at all.
    pub(crate) fn collected(&self) -> bool {
        is_collected(&self.attribute)
    }

    /// The condition as a policy file writes it.
    pub(crate) fn text(&self) -> String {
        if self.op == Op::IsTrue {
            return self.attribute.clone();
        }
        let quoted: Vec<String> = self.values.iter().map(|v| format!("'{v}'")).collect();
        let value = match self.op {
            Op::In | Op::NotIn => format!("[{}]", quoted.join(", ")),
            _ => quoted.join(""),
        };
        format!("{} {} {value}", self.attribute, self.op.symbol())
    }
}

/// Why a condition does not parse, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConditionError {
    pub(crate) message: String,
    pub(crate) hint: String,
}

const CONDITION_FORM: &str = "write ATTRIBUTE OPERATOR VALUE, e.g. \"node:os IN ['linux', 'macos']\" or \"node:clientVersion >= '1.40'\"; operators are ==, !=, IN, NOT IN, <, <=, >, >=";

/// Parses one condition.
pub(crate) fn parse_condition(text: &str) -> Result<Condition, ConditionError> {
    let error = |message: String| ConditionError {
        message,
        hint: CONDITION_FORM.to_owned(),
    };
    let trimmed = text.trim();
    let Some((attribute, rest)) = trimmed.split_once(char::is_whitespace) else {
        if trimmed.contains(':') && !trimmed.contains(['=', '<', '>', '!', '\'', '"']) {
            let attribute = canonical_attribute(trimmed)?;
            if matches!(
                attribute.as_str(),
                "node:os" | "node:osVersion" | "node:clientVersion" | "node:hostname"
            ) {
                return Err(error(format!(
                    "posture condition \"{text}\" has no operator"
                )));
            }
            return Ok(Condition {
                attribute,
                op: Op::IsTrue,
                values: Vec::new(),
            });
        }
        return Err(error(format!("invalid posture condition \"{text}\"")));
    };
    let attribute = canonical_attribute(attribute)?;
    let rest = rest.trim_start();
    let ops: [(&str, Op); 8] = [
        ("NOT IN", Op::NotIn),
        ("IN", Op::In),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let Some((op, value)) = ops.iter().find_map(|(symbol, op)| {
        let after = rest.strip_prefix(symbol)?;
        let word_op = symbol.ends_with('N');
        (!word_op || after.starts_with(char::is_whitespace) || after.starts_with('['))
            .then_some((*op, after.trim()))
    }) else {
        return Err(error(format!(
            "posture condition \"{text}\" has no valid operator"
        )));
    };
    let values = match op {
        Op::In | Op::NotIn => {
            let inner = value
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .ok_or_else(|| {
                    error(format!(
                        "\"{}\" needs a list such as ['a', 'b'] in \"{text}\"",
                        op.symbol()
                    ))
                })?;
            inner
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| scalar(v).ok_or_else(|| error(format!("invalid value {v} in \"{text}\""))))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => {
            vec![scalar(value)
                .ok_or_else(|| error(format!("invalid value {value} in \"{text}\"")))?]
        }
    };
    if values.is_empty() {
        return Err(error(format!("posture condition \"{text}\" has no value")));
    }
    if matches!(op, Op::Lt | Op::Le | Op::Gt | Op::Ge) && parse_version(&values[0]).is_none() {
        return Err(ConditionError {
            message: format!(
                "\"{}\" compares versions, but '{}' is not a version in \"{text}\"",
                op.symbol(),
                values[0]
            ),
            hint: "versions are dotted numbers, e.g. '1.40' or '1.40.2'".to_owned(),
        });
    }
    Ok(Condition {
        attribute,
        op,
        values,
    })
}

/// The name weft uses for an attribute: Tailscale's `node:tsVersion` is `node:clientVersion`.
pub(crate) fn canonical_key(name: &str) -> &str {
    if name == "node:tsVersion" {
        "node:clientVersion"
    } else {
        name
    }
}

/// Whether weft nodes report `attribute` (canonical name).
fn is_collected(attribute: &str) -> bool {
    NODE_ATTRIBUTES.contains(&attribute)
        || attribute
            .strip_prefix("custom:")
            .is_some_and(|key| !key.is_empty())
}

/// Checks an attribute name and returns its canonical form.
///
/// A near miss of an attribute weft collects is a typo and an error; any
/// other `NAMESPACE:KEY` is an attribute weft does not collect.
fn canonical_attribute(name: &str) -> Result<String, ConditionError> {
    let name = canonical_key(name);
    if is_collected(name) {
        return Ok(name.to_owned());
    }
    let near = suggest(name, NODE_ATTRIBUTES.iter().copied());
    let well_formed = name.split_once(':').is_some_and(|(namespace, key)| {
        let word = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        word(namespace) && word(key)
    });
    if near.is_none() && well_formed {
        return Ok(name.to_owned());
    }
    let hint = near.map_or_else(
        || {
            format!(
                "attributes are NAMESPACE:KEY; weft collects {} and custom:KEY",
                NODE_ATTRIBUTES.join(", ")
            )
        },
        |near| format!("did you mean \"{near}\"?"),
    );
    Err(ConditionError {
        message: format!("unknown posture attribute \"{name}\""),
        hint,
    })
}

/// A quoted (`'x'` or `"x"`) or bare value.
fn scalar(text: &str) -> Option<String> {
    let unquoted = ['\'', '"'].iter().find_map(|q| {
        text.strip_prefix(*q)
            .and_then(|t| t.strip_suffix(*q))
            .filter(|t| !t.contains(*q))
    });
    match unquoted {
        Some(value) => Some(value.to_owned()),
        None if !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) =>
        {
            Some(text.to_owned())
        }
        None => None,
    }
}

/// Compares dotted numeric versions; missing components are 0. `None` if either is not one.
pub(crate) fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (parse_version(a)?, parse_version(b)?);
    let len = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    Some(
        (0..len)
            .map(|i| at(&a, i).cmp(&at(&b, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal),
    )
}

fn parse_version(text: &str) -> Option<Vec<u64>> {
    let text = text.strip_prefix('v').unwrap_or(text);
    text.split('.')
        .map(|part| {
            (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn holds(condition: &str, pairs: &[(&str, &str)]) -> bool {
        parse_condition(condition).unwrap().holds(&attrs(pairs))
    }

    #[test]
    fn operators() {
        let linux = [
            ("node:os", "linux"),
            ("node:clientVersion", "1.40.2"),
            ("custom:tier", "gold"),
        ];
        assert!(holds("node:os == 'linux'", &linux));
        assert!(!holds("node:os != 'linux'", &linux));
        assert!(holds("node:os IN ['macos', 'linux']", &linux));
        assert!(!holds("node:os NOT IN ['macos', 'linux']", &linux));
        assert!(holds("node:os NOT IN ['windows']", &linux));
        assert!(holds("node:clientVersion >= '1.40'", &linux));
        assert!(holds("node:clientVersion > '1.40'", &linux));
        assert!(holds("node:clientVersion <= '1.40.2.0'", &linux));
        assert!(!holds("node:clientVersion < '1.40.2'", &linux));
        assert!(holds("node:tsVersion < '1.100'", &linux));
        assert!(holds("custom:tier == \"gold\"", &linux));
        assert!(holds("custom:tier IN [gold]", &linux));
    }

    #[test]
    fn missing_or_odd_values_fail_closed() {
        assert!(!holds("node:os != 'linux'", &[]));
        assert!(!holds("node:os NOT IN ['linux']", &[]));
        assert!(!holds(
            "node:clientVersion >= '1.0'",
            &[("node:clientVersion", "dev-build")]
        ));
        assert!(!satisfied(Some(&[]), Some(&attrs(&[]))));
        assert!(satisfied(None, None));
        let p = Posture {
            name: "posture:any".into(),
            conditions: vec![],
        };
        assert!(!satisfied(Some(std::slice::from_ref(&p)), None));
        assert!(satisfied(Some(&[p]), Some(&attrs(&[]))));
    }

    #[test]
    fn errors_name_the_problem() {
        let err = parse_condition("node:oss == 'linux'").unwrap_err();
        assert_eq!(err.message, "unknown posture attribute \"node:oss\"");
        assert_eq!(err.hint, "did you mean \"node:os\"?");
        let err = parse_condition("country == 'CH'").unwrap_err();
        assert!(err.hint.contains("NAMESPACE:KEY"), "{err:?}");
        assert!(parse_condition("node:os ~ 'x'")
            .unwrap_err()
            .message
            .contains("no valid operator"));
        assert!(parse_condition("node:os IN 'linux'")
            .unwrap_err()
            .message
            .contains("needs a list"));
        assert!(parse_condition("node:clientVersion >= 'latest'")
            .unwrap_err()
            .message
            .contains("not a version"));
        assert!(parse_condition("node:os").is_err());
        assert!(parse_condition("node:os == 'a b' c").is_err());
    }

    #[test]
    fn attributes_weft_does_not_collect_never_hold() {
        let track = parse_condition("node:tsReleaseTrack == 'stable'").unwrap();
        assert!(!track.collected());
        assert!(!track.holds(&attrs(&[("node:tsReleaseTrack", "stable")])));
        let not_in = parse_condition("ip:country NOT IN ['XX']").unwrap();
        assert!(!not_in.holds(&attrs(&[])), "absent, so even NOT IN fails");
        let bare = parse_condition("node:tsAutoUpdate").unwrap();
        assert_eq!(
            (bare.op, bare.text()),
            (Op::IsTrue, "node:tsAutoUpdate".into())
        );
        assert!(!bare.holds(&attrs(&[("node:tsAutoUpdate", "true")])));
        let encrypted = parse_condition("node:diskEncrypted").unwrap();
        assert!(encrypted.holds(&attrs(&[("node:diskEncrypted", "true")])));
        assert!(!encrypted.holds(&attrs(&[("node:diskEncrypted", "false")])));
        assert!(parse_condition("node:").is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(compare_versions("1.40", "1.40.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("1.9", "1.10"), Some(Ordering::Less));
        assert_eq!(compare_versions("v2", "1.99"), Some(Ordering::Greater));
        assert_eq!(compare_versions("1..2", "1"), None);
        assert_eq!(compare_versions("1.2-rc1", "1"), None);
    }

    proptest! {
        #[test]
        fn conditions_never_panic(text in "\\PC{0,40}") {
            if let Ok(condition) = parse_condition(&text) {
                let reparsed = parse_condition(&condition.text());
                prop_assert_eq!(reparsed, Ok(condition));
            }
        }

        #[test]
        fn version_order_matches_numbers(a in prop::collection::vec(0u64..50, 1..4), b in prop::collection::vec(0u64..50, 1..4)) {
            let text = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
            let pad = |v: &[u64]| { let mut v = v.to_vec(); v.resize(4, 0); v };
            prop_assert_eq!(compare_versions(&text(&a), &text(&b)), Some(pad(&a).cmp(&pad(&b))));
        }
    }
}
