//! The Tailscale compatibility suite: policy files written the way teams
//! write them for Tailscale, each with the verdict weft must reach.
//!
//! Every `tests/tailscale/NAME.hujson` has a `NAME.expect.json` beside it:
//!
//! ```json
//! {
//!   "roles": { "admin": ["alice@example.com"] },
//!   "devices": [ { "id": 1, "name": "web1", "addresses": ["100.64.0.1"], "identity": { … } } ],
//!   "errors": ["the message of each error, in file order"],
//!   "warnings": ["the message of each warning, in file order"],
//!   "tests": { "passed": 12, "not_evaluated": 0 },
//!   "allow": [["SRC", "DST", "tcp:443"]],
//!   "deny": [["SRC", "DST", "udp:53"]]
//! }
//! ```
//!
//! `roles` and `devices` are optional inputs (`--roles FILE`, `--devices
//! FILE`); with `errors` the file must be refused with exactly those
//! messages, otherwise it must load with exactly `warnings`, its tests must
//! pass with the counts in `tests`, and `explain` must give every `allow`
//! flow a passing verdict and every `deny` flow a failing one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use weft_policy::{NodeInfo, Policy, Protocol, Roles, Severity};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    roles: Roles,
    devices: Option<Vec<NodeInfo>>,
    errors: Option<Vec<String>>,
    #[serde(default)]
    warnings: Vec<String>,
    tests: Option<Counts>,
    #[serde(default)]
    allow: Vec<[String; 3]>,
    #[serde(default)]
    deny: Vec<[String; 3]>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Counts {
    passed: usize,
    not_evaluated: usize,
}

fn suite() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tailscale");
    let Ok(entries) = fs::read_dir(&dir) else {
        panic!("cannot list {}", dir.display());
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "hujson"))
        .collect();
    files.sort();
    files
}

/// `tcp:443` → (TCP, 443); `icmp` → (ICMP, 0).
fn flow(spec: &str) -> (Protocol, u16) {
    let (proto, port) = spec.split_once(':').unwrap_or((spec, "0"));
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => panic!("unknown protocol {other} in a flow"),
    };
    let Ok(port) = port.parse() else {
        panic!("bad port in the flow {spec}");
    };
    (proto, port)
}

/// What is wrong with one file of the suite, if anything.
fn check(path: &Path) -> Vec<String> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let expect_path = path.with_extension("expect.json");
    let expect: Expect = match fs::read_to_string(&expect_path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(expect) => expect,
            Err(err) => return vec![format!("{name}: bad expectations: {err}")],
        },
        Err(err) => return vec![format!("{name}: no {}: {err}", expect_path.display())],
    };
    let Ok(source) = fs::read_to_string(path) else {
        return vec![format!("{name}: unreadable")];
    };
    let mut problems = Vec::new();
    let policy = match (
        Policy::parse_with_roles(&source, &name, &expect.roles),
        &expect.errors,
    ) {
        (Err(diags), Some(errors)) => {
            let found: Vec<&str> = diags
                .0
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| d.message.as_str())
                .collect();
            if found != *errors {
                problems.push(format!("{name}: errors {found:#?}, expected {errors:#?}"));
            }
            return problems;
        }
        (Err(diags), None) => return vec![format!("{name}: refused:\n{diags}")],
        (Ok(_), Some(errors)) => {
            return vec![format!("{name}: loaded, expected errors {errors:?}")]
        }
        (Ok(policy), None) => policy,
    };
    let warnings: Vec<&str> = policy
        .warnings()
        .iter()
        .map(|w| w.message.as_str())
        .collect();
    if warnings != expect.warnings {
        problems.push(format!(
            "{name}: warnings {warnings:#?}, expected {:#?}",
            expect.warnings
        ));
    }
    let report = match &expect.devices {
        Some(devices) => policy.run_tests_on_nodes(devices),
        None => policy.run_tests(),
    };
    match (report, &expect.tests) {
        (Ok(report), Some(counts)) => {
            let found = Counts {
                passed: report.passed,
                not_evaluated: report.not_evaluated,
            };
            if found != *counts {
                problems.push(format!("{name}: tests {found:?}, expected {counts:?}"));
            }
        }
        (Ok(_), None) => problems.push(format!("{name}: no expected test counts")),
        (Err(failures), _) => problems.push(format!("{name}: tests fail:\n{failures}")),
    }
    for (flows, passes) in [(&expect.allow, true), (&expect.deny, false)] {
        for [src, dst, spec] in flows {
            let (proto, port) = flow(spec);
            match policy.explain(src, dst, port, proto) {
                Ok(e) if e.verdict.passes() == passes => {}
                Ok(e) => problems.push(format!(
                    "{name}: {src} -> {dst} {spec}: {}, expected {}",
                    e.verdict,
                    if passes { "allowed" } else { "denied" }
                )),
                Err(err) => problems.push(format!("{name}: {src} -> {dst}: {err}")),
            }
        }
    }
    problems
}

#[test]
fn tailscale_policy_files_load_with_the_expected_verdicts() {
    let files = suite();
    assert!(files.len() >= 8, "the suite is missing files: {files:?}");
    let problems: Vec<String> = files.iter().flat_map(|f| check(f)).collect();
    assert!(problems.is_empty(), "\n{}", problems.join("\n\n"));
}

#[test]
fn check_file_with_takes_roles_and_devices() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tailscale/roles_and_devices.hujson");
    let expect: Expect =
        serde_json::from_str(&fs::read_to_string(path.with_extension("expect.json")).unwrap())
            .unwrap();
    let offline = weft_policy::check_file_with(&path, &expect.roles, None).unwrap();
    assert_eq!((offline.tests.passed, offline.tests.not_evaluated), (2, 7));
    assert_eq!(offline.warnings.len(), 3);
    let devices = expect.devices.unwrap();
    let online = weft_policy::check_file_with(&path, &expect.roles, Some(&devices)).unwrap();
    assert_eq!((online.tests.passed, online.tests.not_evaluated), (9, 0));
    // The router at 100.70.0.31 retagged as a billing server fails its test.
    let mut retagged = devices.clone();
    retagged[3].identity.tags = vec!["tag:billing".into()];
    let failures = weft_policy::check_file_with(&path, &expect.roles, Some(&retagged)).unwrap_err();
    assert!(
        failures.0[0]
            .message
            .starts_with("test src 100.70.0.31 → tag:logs:514: expected accept"),
        "{failures}"
    );
}
