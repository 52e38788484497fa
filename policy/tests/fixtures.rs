//! The fixture policies in `tests/fixtures`, checked the way `weft policy check` does.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use weft_policy::{check_file, NodeInfo, Protocol, Severity, Verdict};
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
            attributes: Default::default(),
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
        "undefined_group.hujson:6:35: error: undefined group \"group:eng\"\n  hint: define it under \"groups\", or fix the name (known groups: group:ops); identity-provider groups are written group:idp:NAME"
    );
}

#[test]
fn failing_test_names_the_rule() {
    assert_eq!(
        rendered("failing_test.hujson"),
        "failing_test.hujson:8:5: error: test src tag:web → tag:db:22: expected deny, but the rule at line 5 accepts it\n  hint: narrow the rule at line 5, or add a deny rule, or fix the test"
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
            "many_mistakes.hujson:6:17: error: invalid action \"reject\"",
            "many_mistakes.hujson:6:55: error: tag \"tag:db\" has no \"tagOwners\" entry",
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

fn checked(name: &str) -> weft_policy::Checked {
    match check_file(&fixture(name)) {
        Ok(checked) => checked,
        Err(err) => panic!("{name} should load and pass its tests:\n{err}"),
    }
}

fn verdict(
    policy: &weft_policy::Policy,
    src: &str,
    dst: &str,
    port: u16,
    proto: Protocol,
) -> Verdict {
    match policy.explain(src, dst, port, proto) {
        Ok(explanation) => explanation.verdict,
        Err(err) => panic!("cannot explain {src} -> {dst}: {err}"),
    }
}

#[test]
fn a_full_tailscale_policy_loads_passes_and_warns_per_key() {
    let checked = checked("tailscale_full.hujson");
    assert_eq!(checked.tests.passed, 22);
    let warned: Vec<&str> = checked
        .warnings
        .iter()
        .map(|w| w.message.as_str())
        .collect();
    assert_eq!(
        warned,
        [
            "\"ssh\" is not supported by weft and is ignored",
            "\"nodeAttrs\" is not supported by weft and is ignored",
            "\"autoApprovers\" is not supported by weft and is ignored",
            "\"derpMap\" is not supported by weft and is ignored",
            "\"randomizeClientPort\" is not supported by weft and is ignored",
        ]
    );
    let p = &checked.policy;
    // autogroup:self: a member reaches their own devices, not others'.
    assert_eq!(
        verdict(
            p,
            "alice@example.com",
            "alice@example.com",
            22,
            Protocol::Tcp
        ),
        Verdict::Accept
    );
    assert_eq!(
        verdict(p, "alice@example.com", "bob@example.com", 22, Protocol::Tcp),
        Verdict::Deny
    );
    // srcPosture: explain has no device attributes, so the postured rule does not match.
    assert_eq!(
        verdict(p, "alice@example.com", "tag:web", 443, Protocol::Tcp),
        Verdict::Deny
    );
    // Hosts, CIDRs and protocols.
    assert_eq!(
        verdict(p, "198.51.100.4", "tag:web", 443, Protocol::Udp),
        Verdict::Accept
    );
    assert_eq!(
        verdict(p, "tag:web", "db-subnet", 5432, Protocol::Udp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(p, "tag:monitoring", "tag:prod", 0, Protocol::Icmp),
        Verdict::Accept
    );
    let e = p.explain("tag:ci", "tag:web", 22, Protocol::Tcp).unwrap();
    assert_eq!(e.rules[0].line, 69, "{e:?}");
}

#[test]
fn a_full_tailscale_policy_compiles_capabilities_and_postures() {
    let checked = checked("tailscale_full.hujson");
    let node = |n: u8, identity: Identity, attrs: &[(&str, &str)]| NodeInfo {
        id: NodeId(u64::from(n)),
        name: format!("n{n}"),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(100, 64, 0, n))],
        identity,
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let person = |login: &str| Identity {
        user: Some(login.into()),
        ..Identity::default()
    };
    let nodes = [
        node(1, Identity::tagged(vec!["tag:web".into()]), &[]),
        node(
            2,
            person("alice@example.com"),
            &[("node:os", "linux"), ("node:clientVersion", "1.70")],
        ),
        node(
            3,
            person("bob@example.com"),
            &[("node:os", "linux"), ("node:clientVersion", "1.2")],
        ),
        node(4, person("olga@example.com"), &[]),
    ];
    let compiled = checked.policy.compile(&nodes);
    let web = &compiled.nodes[&NodeId(1)];
    let peers: Vec<u64> = web.peers.iter().map(|id| id.0).collect();
    assert_eq!(
        peers,
        [2, 4],
        "bob's client is too old for the postured rule"
    );
    let caps: Vec<(&str, &str, u32)> = web
        .capabilities
        .iter()
        .map(|c| (c.name.as_str(), c.values[0].as_str(), c.src.len() as u32))
        .collect();
    assert_eq!(
        caps,
        [
            (
                "example.com/cap/admin-ui",
                "{\"paths\":[\"/status\",\"/metrics\"],\"role\":\"viewer\"}",
                1
            ),
            ("example.com/cap/admin-ui", "{\"role\":\"admin\"}", 1),
        ]
    );
    // Capabilities carry no posture here: both engineers' laptops get the viewer role.
    assert_eq!(web.capabilities[0].src[0].to_string(), "100.64.0.2/31");
    assert_eq!(web.capabilities[1].src[0].to_string(), "100.64.0.4/32");
}

#[test]
fn weft_extensions_deny_audit_workloads_and_idp_groups() {
    let checked = checked("weft_extensions.hujson");
    assert_eq!(checked.tests.passed, 12);
    assert!(checked.warnings.is_empty());
    let p = &checked.policy;
    assert_eq!(
        verdict(p, "203.0.113.9", "tag:db", 5432, Protocol::Tcp),
        Verdict::AuditDeny
    );
    assert_eq!(
        verdict(p, "bob@example.com", "tag:db", 5432, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(
            p,
            "spiffe://prod.example.com/ns/batch/sa/x",
            "tag:web",
            443,
            Protocol::Tcp
        ),
        Verdict::Accept
    );
    let e = p
        .explain("alice@example.com", "tag:db", 22, Protocol::Tcp)
        .unwrap();
    assert_eq!((e.verdict, e.rules[0].line), (Verdict::Deny, 16));
}

#[test]
fn whole_file_audit_mode() {
    let checked = checked("audit_mode.hujson");
    assert!(checked.policy.audit_mode());
    let p = &checked.policy;
    assert_eq!(
        verdict(p, "tag:web", "tag:db", 5432, Protocol::Tcp),
        Verdict::Accept
    );
    assert_eq!(
        verdict(p, "tag:web", "tag:db", 22, Protocol::Tcp),
        Verdict::AuditDeny
    );
    assert_eq!(
        verdict(p, "tag:db", "tag:web", 80, Protocol::Tcp),
        Verdict::AuditDeny
    );
}

#[test]
fn diffing_a_reviewed_change() {
    let old = checked("valid.hujson").policy;
    let new = weft_policy::Policy::parse(
        &std::fs::read_to_string(fixture("policy_v2.hujson")).unwrap(),
        "policy_v2.hujson",
    )
    .unwrap();
    let change = weft_policy::diff(&old, &new);
    let show = |flows: &[weft_policy::Flow]| -> Vec<String> {
        flows
            .iter()
            .map(|f| format!("{} -> {} {}:{}", f.src, f.dst, f.proto, f.ports))
            .collect()
    };
    assert_eq!(
        show(&change.newly_allowed),
        ["office -> tag:web tcp:22", "office -> tag:web udp:22"]
    );
    assert_eq!(
        show(&change.newly_denied),
        [
            "fred@example.com -> printer tcp:9100",
            "fred@example.com -> printer udp:9100",
            "tag:monitoring -> tag:db tcp:9100",
            "tag:monitoring -> tag:db udp:9100",
        ]
    );
    assert!(weft_policy::diff(&old, &old).is_empty());
}
