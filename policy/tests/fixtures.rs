//! The fixture policies in `tests/fixtures`, checked the way `weft policy check` does.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use weft_policy::{check_file, NodeInfo, Severity};
use weft_proto::{Identity, NodeId};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn rendered(name: &str) -> String {
    let Err(err) = check_file(&fixture(name)) else {
        panic!("{name} should be rejected");
    };
    // File names vary with the checkout; compare from the file name on.
    err.to_string()
        .replace(&fixture("").display().to_string(), "")
}

#[test]
fn the_realistic_policy_passes_its_tests() {
    let checked = check_file(&fixture("valid.hujson")).unwrap();
    assert!(checked.warnings.is_empty());
    assert_eq!(checked.tests.passed, 20);

    let nodes = [
        ("web1", vec!["tag:web"], None, 1),
        ("db1", vec!["tag:db"], None, 2),
        ("alice-laptop", vec![], Some("alice@example.com"), 3),
        ("fred-laptop", vec![], Some("fred@example.com"), 4),
        ("prom", vec!["tag:monitoring"], None, 5),
    ]
    .map(
        |(name, tags, user, n): (&str, Vec<&str>, Option<&str>, u8)| NodeInfo {
            id: NodeId(u64::from(n)),
            name: name.into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, n))],
            identity: Identity {
                user: user.map(str::to_owned),
                tags: tags.into_iter().map(str::to_owned).collect(),
                ..Default::default()
            },
        },
    );
    let compiled = checked.policy.compile(&nodes);
    let peers = |n: u64| {
        compiled.nodes[&NodeId(n)]
            .peers
            .iter()
            .map(|id| id.0)
            .collect::<Vec<_>>()
    };
    assert_eq!(peers(1), [2, 3, 5]);
    assert_eq!(peers(2), [1, 5]);
    assert_eq!(peers(3), [1, 5]);
    assert_eq!(
        peers(4),
        [5],
        "fred only prints, and the printer is not a node; monitoring pings him"
    );
}

#[test]
fn tailscale_only_keys_load_with_warnings() {
    let checked = check_file(&fixture("tailscale_extras.hujson")).unwrap();
    let warnings: Vec<String> = checked.warnings.iter().map(|w| w.message.clone()).collect();
    assert_eq!(
        warnings,
        [
            "\"ssh\" is not supported by weft and is ignored",
            "\"nodeAttrs\" is not supported by weft and is ignored",
            "\"randomizeClientPort\" is not supported by weft and is ignored",
        ]
    );
    assert!(checked
        .warnings
        .iter()
        .all(|w| w.severity == Severity::Warning));
}

#[test]
fn undefined_group_is_reported_with_position_and_hint() {
    assert_eq!(
        rendered("undefined_group.hujson"),
        "undefined_group.hujson:6:35: error: undefined group \"group:eng\"\n  hint: define it under \"groups\", or fix the name (known groups: group:ops)"
    );
}

#[test]
fn failing_test_names_the_rule() {
    assert_eq!(
        rendered("failing_test.hujson"),
        "failing_test.hujson:8:5: error: test src tag:web → tag:db:22: expected deny, but acls line 5 accepts it\n  hint: narrow the rule at line 5, or fix the test"
    );
}

#[test]
fn syntax_error_points_at_the_character() {
    assert_eq!(
        rendered("syntax_error.hujson"),
        "syntax_error.hujson:3:40: error: expected ',' or '}' after an object member, found '\"'\n  hint: separate members with commas"
    );
}

#[test]
fn every_mistake_is_listed() {
    let text = rendered("many_mistakes.hujson");
    let firsts: Vec<&str> = text.lines().filter(|l| !l.starts_with("  hint")).collect();
    assert_eq!(
        firsts,
        [
            "many_mistakes.hujson:2:3: error: unknown top-level key \"acl\"",
            "many_mistakes.hujson:3:15: error: group name \"eng\" must start with \"group:\"",
            "many_mistakes.hujson:6:17: error: invalid action \"deny\"",
            "many_mistakes.hujson:6:53: error: tag \"tag:db\" has no \"tagOwners\" entry",
            "many_mistakes.hujson:7:55: error: invalid port range \"80-70\": 80 is greater than 70",
            "many_mistakes.hujson:7:82: error: invalid proto \"tcpp\"",
        ]
    );
}

#[test]
fn unreadable_file_is_an_error_without_position() {
    let err = check_file(&fixture("missing.hujson")).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].line, 0);
    assert!(
        err.0[0].message.starts_with("cannot read the policy file"),
        "{err}"
    );
}

#[test]
fn diagnostics_serialize_for_json_output() {
    let err = check_file(&fixture("undefined_group.hujson")).unwrap_err();
    let json = serde_json::to_value(&err).unwrap();
    assert_eq!(json[0]["severity"], "error");
    assert_eq!(json[0]["line"], 6);
    assert_eq!(json[0]["column"], 35);
    assert_eq!(json[0]["message"], "undefined group \"group:eng\"");
}
