//! `weft policy check`, `explain` and `diff`: policy files, offline.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use weft_policy::{
    Diagnostic, Diagnostics, NodeInfo, Policy, Protocol, Roles, Severity, TestReport, Verdict,
};

/// `--roles FILE`: who holds the roles the role autogroups stand for.
#[derive(Debug, Clone, clap::Args)]
pub struct RolesArg {
    /// The members of the roles `autogroup:admin`, `autogroup:owner`, … stand
    /// for, as the coordinator's `roles` setting gives them: a JSON object
    /// mapping a role (owner, admin, it-admin, network-admin,
    /// billing-admin, auditor) to user logins and group:idp:NAME groups.
    /// Without it, role autogroups have no members.
    #[arg(long = "roles", value_name = "FILE")]
    roles_file: Option<std::path::PathBuf>,
}

impl RolesArg {
    fn load(&self) -> Result<Roles, Diagnostics> {
        let Some(path) = &self.roles_file else {
            return Ok(Roles::default());
        };
        let text = read(path, "roles file")?;
        serde_json::from_str(&text).map_err(|err| {
            file_error(
                path,
                format!("cannot read the roles: {err}"),
                r#"write one JSON object mapping roles to members, e.g. {"admin": ["alice@example.com", "group:idp:secops"]}"#,
            )
        })
    }
}

/// Checks `file`. Warnings and errors go to stderr in `file:line:col:` form
/// (or everything to stdout as JSON); exits 1 when the policy has errors.
pub(super) fn check(
    file: &Path,
    roles: &RolesArg,
    devices: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let inputs = roles.load().and_then(|roles| {
        let nodes = devices.map(load_devices).transpose()?;
        Ok((roles, nodes))
    });
    let (roles, nodes) = match inputs {
        Ok(inputs) => inputs,
        Err(diagnostics) => return failed(file, &diagnostics, json),
    };
    match weft_policy::check_file_with(file, &roles, nodes.as_deref()) {
        Ok(checked) => {
            if json {
                let report = json!({
                    "ok": true,
                    "tests_passed": checked.tests.passed,
                    "tests_not_evaluated": checked.tests.not_evaluated,
                    "warnings": checked.warnings,
                    "errors": [],
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for warning in &checked.warnings {
                    eprintln!("{warning}");
                }
                println!("ok: {}", tests_summary(&checked.tests));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            if json {
                let report = json!({
                    "ok": false,
                    "tests_passed": 0,
                    "tests_not_evaluated": 0,
                    "warnings": [],
                    "errors": diagnostics,
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprintln!("{}", diagnostics.to_string().trim_end());
                eprintln!("error: {} has errors", file.display());
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// The protocols `weft policy explain` asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (ports do not apply).
    Icmp,
}

impl From<ProtoArg> for Protocol {
    fn from(proto: ProtoArg) -> Protocol {
        match proto {
            ProtoArg::Tcp => Protocol::Tcp,
            ProtoArg::Udp => Protocol::Udp,
            ProtoArg::Icmp => Protocol::Icmp,
        }
    }
}

/// Explains the verdict on one flow. Exits 0 with a verdict, 1 when the
/// file or the arguments have errors.
pub(super) fn explain(
    file: &Path,
    src: &str,
    dst: &str,
    proto: ProtoArg,
    roles: &RolesArg,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let result = load(file, roles).and_then(|policy| {
        let (dst_name, port) = split_port(dst, proto).map_err(|d| Diagnostics(vec![d]))?;
        policy
            .explain(src, dst_name, port, proto.into())
            .map(|explanation| (explanation, port))
    });
    let (explanation, port) = match result {
        Ok(found) => found,
        Err(diagnostics) => return failed(file, &diagnostics, json),
    };
    if json {
        let report = json!({
            "src": src,
            "dst": dst,
            "proto": proto_name(proto),
            "port": port,
            "verdict": explanation.verdict,
            "rules": explanation.rules,
            "unenforced": explanation.unenforced,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", explanation.verdict);
    if explanation.rules.is_empty() {
        let default = if explanation.verdict == Verdict::AuditDeny {
            "the policy is in audit mode: nothing matches, so the flow passes and is logged as a would-be denial"
        } else {
            "no rule matches, and anything not accepted is denied"
        };
        println!("  {default}");
    }
    for rule in &explanation.rules {
        println!("  {}:{}: {}", file.display(), rule.line, rule.text);
    }
    for note in &explanation.unenforced {
        println!(
            "  not enforced, matches nothing: {}:{}: {} ({}: {})",
            file.display(),
            note.rule.line,
            note.rule.text,
            note.construct,
            note.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what changes between two policy files. Exits 0, or 1 when either file has errors.
pub(super) fn diff(
    old: &Path,
    new: &Path,
    roles: &RolesArg,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let old_policy = match load(old, roles) {
        Ok(policy) => policy,
        Err(diagnostics) => return failed(old, &diagnostics, json),
    };
    let new_policy = match load(new, roles) {
        Ok(policy) => policy,
        Err(diagnostics) => return failed(new, &diagnostics, json),
    };
    let change = weft_policy::diff(&old_policy, &new_policy);
    if json {
        println!("{}", serde_json::to_string_pretty(&change)?);
    } else {
        println!("{}", change.to_string().trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads and parses a policy file (its tests are not run: explain and diff
/// work on drafts too). Warnings go to stderr.
fn load(file: &Path, roles: &RolesArg) -> Result<Policy, Diagnostics> {
    let roles = roles.load()?;
    let source = read(file, "policy file")?;
    let policy = Policy::parse_with_roles(&source, &file.display().to_string(), &roles)?;
    for warning in policy.warnings() {
        eprintln!("{warning}");
    }
    Ok(policy)
}

/// Reads the device list `--devices` names.
fn load_devices(path: &Path) -> Result<Vec<NodeInfo>, Diagnostics> {
    let text = read(path, "device list")?;
    weft_policy::parse_devices(&text).map_err(|err| {
        file_error(
            path,
            err.to_string(),
            "save the device list with `weft-coordinator nodes list --json > FILE`",
        )
    })
}

/// "N tests passed", and how many wait for a device list.
fn tests_summary(tests: &TestReport) -> String {
    let passed = match tests.passed {
        1 => "1 test passed".to_owned(),
        n => format!("{n} tests passed"),
    };
    match tests.not_evaluated {
        0 => passed,
        n => format!(
            "{passed}, {n} not evaluated offline (they need the device list: pass --devices FILE)"
        ),
    }
}

/// Reads a UTF-8 input file; `what` names it in the error.
fn read(path: &Path, what: &str) -> Result<String, Diagnostics> {
    std::fs::read_to_string(path).map_err(|err| {
        file_error(
            path,
            format!("cannot read the {what}: {err}"),
            "check the path and that the file is readable UTF-8 text",
        )
    })
}

/// One error about a whole input file.
fn file_error(path: &Path, message: String, hint: &str) -> Diagnostics {
    Diagnostics(vec![Diagnostic {
        severity: Severity::Error,
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message,
        hint: Some(hint.into()),
    }])
}

/// Splits `DST:PORT` (`[IPv6]:PORT` for IPv6 addresses); ICMP needs no port.
fn split_port(dst: &str, proto: ProtoArg) -> Result<(&str, u16), Diagnostic> {
    let error = |message: String| Diagnostic {
        severity: Severity::Error,
        file: "--dst".into(),
        line: 0,
        column: 0,
        message,
        hint: Some(
            "write --dst DST:PORT, e.g. tag:db:5432, alice@example.com:22 or [fd7a::1]:443".into(),
        ),
    };
    let split = match dst.strip_prefix('[') {
        Some(rest) => rest
            .split_once("]:")
            .or_else(|| rest.strip_suffix(']').map(|a| (a, ""))),
        None if dst.parse::<std::net::IpAddr>().is_ok() => Some((dst, "")),
        None => dst.rsplit_once(':').filter(|(name, port)| {
            !matches!(*name, "tag" | "group")
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
        }),
    };
    match split.unwrap_or((dst, "")) {
        (name, "") if proto == ProtoArg::Icmp => Ok((name, 0)),
        (_, "") => Err(error(format!("--dst \"{dst}\" has no port"))),
        (name, port) => port
            .parse()
            .map(|port| (name, port))
            .map_err(|_| error(format!("invalid port \"{port}\" in --dst \"{dst}\""))),
    }
}

fn proto_name(proto: ProtoArg) -> &'static str {
    match proto {
        ProtoArg::Tcp => "tcp",
        ProtoArg::Udp => "udp",
        ProtoArg::Icmp => "icmp",
    }
}

/// Reports diagnostics (stderr, or stdout as JSON) and exits 1. The
/// closing line names the file the errors are in: `file`, or the roles file
/// or device list when one of those is what failed.
fn failed(file: &Path, diagnostics: &Diagnostics, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let report = json!({ "ok": false, "errors": diagnostics });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let named = file.display().to_string();
        let culprit = diagnostics
            .0
            .iter()
            .find(|d| d.severity == Severity::Error)
            .map_or(named.as_str(), |d| d.file.as_str());
        eprintln!("{}", diagnostics.to_string().trim_end());
        eprintln!("error: {culprit} has errors");
    }
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_counts_read_as_sentences() {
        let report = |passed, not_evaluated| TestReport {
            passed,
            not_evaluated,
        };
        assert_eq!(tests_summary(&report(1, 0)), "1 test passed");
        assert_eq!(tests_summary(&report(0, 0)), "0 tests passed");
        assert_eq!(
            tests_summary(&report(3, 2)),
            "3 tests passed, 2 not evaluated offline (they need the device list: pass --devices FILE)"
        );
    }

    #[test]
    fn destinations_and_ports() {
        assert_eq!(
            split_port("tag:db:5432", ProtoArg::Tcp).unwrap(),
            ("tag:db", 5432)
        );
        assert_eq!(
            split_port("[fd7a::1]:443", ProtoArg::Udp).unwrap(),
            ("fd7a::1", 443)
        );
        assert_eq!(
            split_port("a@x.com:22", ProtoArg::Tcp).unwrap(),
            ("a@x.com", 22)
        );
        assert_eq!(split_port("tag:db", ProtoArg::Icmp).unwrap(), ("tag:db", 0));
        assert_eq!(
            split_port("fd7a::1", ProtoArg::Icmp).unwrap(),
            ("fd7a::1", 0)
        );
        assert_eq!(
            split_port("[fd7a::1]", ProtoArg::Icmp).unwrap(),
            ("fd7a::1", 0)
        );
        assert_eq!(
            split_port("tag:db", ProtoArg::Tcp).unwrap_err().message,
            "--dst \"tag:db\" has no port"
        );
        assert_eq!(
            split_port("fd7a::1", ProtoArg::Tcp).unwrap_err().message,
            "--dst \"fd7a::1\" has no port"
        );
        assert_eq!(
            split_port("tag:db:99999", ProtoArg::Tcp)
                .unwrap_err()
                .message,
            "invalid port \"99999\" in --dst \"tag:db:99999\""
        );
    }
}
