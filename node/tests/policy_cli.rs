//! `weft policy check|explain|diff`: the real binary on real files.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../policy/tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn weft(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run weft: {err}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("stdout is not JSON ({err}): {}", text(&output.stdout)))
}

#[test]
fn check_accepts_a_valid_file() {
    let out = weft(&["policy", "check", &fixture("valid.hujson")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok: 20 tests passed");
    let out = weft(&[
        "policy",
        "check",
        "--json",
        &fixture("tailscale_full.hujson"),
    ]);
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["ok"], true);
    assert_eq!(
        report["warnings"][0]["message"],
        "\"ssh\" is not supported by weft and is ignored"
    );
}

#[test]
fn check_reports_errors_with_positions_and_hints() {
    let out = weft(&["policy", "check", &fixture("undefined_group.hujson")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("undefined_group.hujson:6:35: error: undefined group \"group:eng\"\n  hint: define it under \"groups\""),
        "{stderr}"
    );
    let out = weft(&[
        "policy",
        "check",
        "--json",
        &fixture("many_mistakes.hujson"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(report["ok"], false);
    assert_eq!(report["errors"][0]["line"], 2);
    assert_eq!(report["errors"][0]["hint"], "did you mean \"acls\"?");
}

#[test]
fn check_refuses_a_failing_test() {
    let out = weft(&["policy", "check", &fixture("failing_test.hujson")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("expected deny, but the rule at line 5 accepts it"),
        "{}",
        text(&out.stderr)
    );
}

fn tailscale_fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../policy/tests/tailscale")
        .join(name)
        .display()
        .to_string()
}

/// Tests that stand for devices wait for a device list offline; with the
/// roles and a device list (the coordinator's `nodes list --json`) they run.
#[test]
fn check_evaluates_device_tests_with_roles_and_a_device_list() {
    let policy = tailscale_fixture("roles_and_devices.hujson");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tailscale_fixture("roles_and_devices.expect.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let roles = dir.path().join("roles.json");
    std::fs::write(&roles, expected["roles"].to_string()).unwrap();
    // The coordinator's listing: ipv4/ipv6 instead of addresses, and
    // fields a device list does not need.
    let listing: Vec<serde_json::Value> = expected["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| {
            let mut node = device.clone();
            let address = node["addresses"][0].clone();
            let object = node.as_object_mut().unwrap();
            object.remove("addresses");
            object.insert("ipv4".into(), address);
            object.insert("online".into(), true.into());
            node
        })
        .collect();
    let devices = dir.path().join("devices.json");
    std::fs::write(&devices, serde_json::to_string(&listing).unwrap()).unwrap();
    let (roles, devices) = (roles.display().to_string(), devices.display().to_string());

    let out = weft(&["policy", "check", &policy]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "ok: 2 tests passed, 7 not evaluated offline (they need the device list: pass --devices FILE)"
    );

    let out = weft(&[
        "policy",
        "check",
        "--json",
        "--roles",
        &roles,
        "--devices",
        &devices,
        &policy,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = json(&out);
    assert_eq!(report["tests_passed"], 9);
    assert_eq!(report["tests_not_evaluated"], 0);
    assert!(
        !report["warnings"]
            .to_string()
            .contains("not evaluated offline"),
        "{report}"
    );

    // Without the roles, the role tests fail against the devices: nobody holds a role.
    let out = weft(&["policy", "check", "--devices", &devices, &policy]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));

    let bad = dir.path().join("bad-roles.json");
    std::fs::write(&bad, r#"{"admins": ["ada@example.org"]}"#).unwrap();
    let out = weft(&[
        "policy",
        "check",
        "--roles",
        &bad.display().to_string(),
        &policy,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot read the roles: unknown variant `admins`"),
        "{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with(&format!("error: {} has errors", bad.display())),
        "{stderr}"
    );

    let out = weft(&["policy", "check", "--devices", &policy, &policy]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nodes list --json"),
        "{}",
        text(&out.stderr)
    );
}

/// `explain` names the rules that match nothing because weft does not
/// enforce what they name, and takes the roles.
#[test]
fn explain_names_unenforced_rules_and_takes_roles() {
    let policy = tailscale_fixture("startup_acls.hujson");
    let out = weft(&[
        "policy",
        "explain",
        &policy,
        "--src",
        "alice@example.com",
        "--dst",
        "autogroup:internet:443",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(
            "deny
"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("not enforced, matches nothing: "),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let roles = dir.path().join("roles.json");
    std::fs::write(&roles, r#"{"admin": ["ada@example.org"]}"#).unwrap();
    let policy = tailscale_fixture("roles_and_devices.hujson");
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "policy",
            "explain",
            &policy,
            "--src",
            "ada@example.org",
            "--dst",
            "tag:prod:22",
        ];
        args.extend_from_slice(extra);
        weft(&args)
    };
    assert!(text(&explain(&[]).stdout).starts_with(
        "deny
"
    ));
    let roles = roles.display().to_string();
    assert!(text(&explain(&["--roles", &roles]).stdout).starts_with(
        "accept
"
    ));
}

#[test]
fn explain_gives_the_verdict_and_the_deciding_rule() {
    let file = fixture("weft_extensions.hujson");
    let explain = |src: &str, dst: &str, extra: &[&str]| {
        let mut args = vec!["policy", "explain", &file, "--src", src, "--dst", dst];
        args.extend_from_slice(extra);
        weft(&args)
    };
    let out = explain("alice@example.com", "tag:db:22", &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = json(&out);
    assert_eq!(report["verdict"], "deny");
    assert_eq!(report["rules"][0]["line"], 16);
    let out = explain("203.0.113.9", "tag:db:5432", &["--json"]);
    assert_eq!(json(&out)["verdict"], "audit-deny");
    let out = explain("alice@example.com", "tag:db:5432", &["--proto", "udp"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("accept\n"), "{stdout}");
    assert!(stdout.contains("weft_extensions.hujson:9: "), "{stdout}");
    let out = explain("tag:db", "tag:web", &["--proto", "icmp"]);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("deny\n  no rule matches"), "{stdout}");
    let out = explain("*", "tag:db:22", &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--src \"*\" is not one principal"),
        "{stderr}"
    );
    let out = explain("tag:web", "tag:db", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--dst \"tag:db\" has no port"));
}

#[test]
fn diff_lists_newly_allowed_and_denied_flows() {
    let (old, new) = (fixture("valid.hujson"), fixture("policy_v2.hujson"));
    let out = weft(&["policy", "diff", &old, &new]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .starts_with("newly allowed (2):\n  + office -> tag:web tcp:22 (was deny, now accept)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("newly denied (4):\n  - fred@example.com -> printer tcp:9100"),
        "{stdout}"
    );
    let out = weft(&["policy", "diff", "--json", &old, &new]);
    let report = json(&out);
    assert_eq!(report["newly_allowed"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["newly_denied"][0]["before"], "accept");
    let out = weft(&["policy", "diff", &old, &old]);
    assert_eq!(text(&out.stdout).trim(), "no change in access");
    let out = weft(&["policy", "diff", &old, &fixture("syntax_error.hujson")]);
    assert_eq!(out.status.code(), Some(1));
}

/// `weft … | head` ends quietly when the reader goes away, like any Unix
/// tool: no panic, no backtrace.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "check", &fixture("valid.hujson")])
        .stdout(std::process::Stdio::from(writer))
        .output()
        .unwrap();
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGPIPE)
    );
}
