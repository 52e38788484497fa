//! `weft policy check`, `explain` and `diff`: policy files, offline.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use weft_policy::{Diagnostic, Diagnostics, Policy, Protocol, Severity, Verdict};

/// Checks `file`. Warnings and errors go to stderr in `file:line:col:` form
/// (or everything to stdout as JSON); exits 1 when the policy has errors.
pub(super) fn check(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    match weft_policy::check_file(file) {
        Ok(checked) => {
            if json {
                let report = json!({
                    "ok": true,
                    "tests_passed": checked.tests.passed,
                    "warnings": checked.warnings,
                    "errors": [],
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for warning in &checked.warnings {
                    eprintln!("{warning}");
                }
                println!("ok: {} tests passed", checked.tests.passed);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            if json {
                let report = json!({
                    "ok": false,
                    "tests_passed": 0,
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
    json: bool,
) -> anyhow::Result<ExitCode> {
    let result = load(file).and_then(|policy| {
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
    Ok(ExitCode::SUCCESS)
}

/// Prints what changes between two policy files. Exits 0, or 1 when either file has errors.
pub(super) fn diff(old: &Path, new: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let old_policy = match load(old) {
        Ok(policy) => policy,
        Err(diagnostics) => return failed(old, &diagnostics, json),
    };
    let new_policy = match load(new) {
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
fn load(file: &Path) -> Result<Policy, Diagnostics> {
    let name = file.display().to_string();
    let source = std::fs::read_to_string(file).map_err(|err| {
        Diagnostics(vec![Diagnostic {
            severity: Severity::Error,
            file: name.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read the policy file: {err}"),
            hint: Some("check the path and that the file is readable UTF-8 text".into()),
        }])
    })?;
    let policy = Policy::parse(&source, &name)?;
    for warning in policy.warnings() {
        eprintln!("{warning}");
    }
    Ok(policy)
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

/// Reports diagnostics (stderr, or stdout as JSON) and exits 1.
fn failed(file: &Path, diagnostics: &Diagnostics, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let report = json!({ "ok": false, "errors": diagnostics });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!("{}", diagnostics.to_string().trim_end());
        eprintln!("error: {} has errors", file.display());
    }
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

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
