//! weft's access policy.
//!
//! A policy is a HuJSON file: JSON that also allows `//` and `/* */`
//! comments and trailing commas. Its language is the subset of Tailscale's
//! policy file that weft enforces:
//!
//! ```hujson
//! {
//!   "groups":    { "group:eng": ["alice@example.com", "bob@example.com"] },
//!   "tagOwners": { "tag:web": ["group:eng"], "tag:db": ["group:eng"] },
//!   "hosts":     { "db-net": "100.64.0.0/24" },
//!   "acls": [
//!     { "action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp" },
//!     { "action": "accept", "src": ["group:eng"], "dst": ["*:*"] },
//!   ],
//!   "tests": [
//!     { "src": "tag:web", "accept": ["tag:db:5432"], "deny": ["tag:db:22"] },
//!   ],
//! }
//! ```
//!
//! - **Selectors** (`src`, and `dst` before the ports): `*`, a user login,
//!   `group:NAME`, `tag:NAME`, a `hosts` name, an IP or a CIDR. Every group,
//!   host and tag must be defined (tags under `tagOwners`).
//! - **Destinations** are `SELECTOR:PORTS`, split at the last colon; PORTS is
//!   `*`, `N`, `N-M` or a comma list. IPv6 addresses are bracketed:
//!   `[fd7a::1]:443`; CIDRs need no brackets: `fd7a::/48:443`.
//! - **`proto`**: `tcp`, `udp`, `icmp`, another IANA name or a number;
//!   without it a rule admits TCP, UDP and ICMP. Only TCP and UDP have ports.
//! - **Meaning**: everything not accepted is denied, so `{}` denies all. A
//!   tagged node is matched by its tags only; an untagged node by its user and
//!   the groups holding that user. Hosts and CIDRs match addresses.
//! - **`tests`** check the rules at the level of users, groups, tags and
//!   addresses, without any nodes; a failing test rejects the policy.
//! - Top-level keys that Tailscale has but weft does not enforce (`ssh`,
//!   `grants`, `nodeAttrs`, …) are ignored with a warning; none of them grants
//!   access, so ignoring one never widens it. Unknown keys are errors.
//!
//! The pipeline is `hujson` (values with spans) → `parse` (the
//! `ast`) → `resolve` (checked `rules`) → `eval` (tests) and `compile`
//! (per-node peers and filters).

mod ast;
mod compile;
mod diagnostic;
mod eval;
mod hujson;
mod parse;
mod ports;
mod resolve;
mod rules;
mod selector;
mod tests_block;

use std::path::Path;

pub use compile::{Compiled, NodeAccess, NodeInfo};
pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use tests_block::TestReport;

use diagnostic::SourceMap;
use rules::{Rule, TestCase};

/// A parsed and validated policy. Its `tests` have not run yet: see [`Policy::run_tests`].
#[derive(Debug, Clone)]
pub struct Policy {
    file: String,
    rules: Vec<Rule>,
    tests: Vec<TestCase>,
    warnings: Vec<Diagnostic>,
}

impl Policy {
    /// Parses and validates. `file_name` is used in diagnostics.
    ///
    /// On failure the diagnostics hold every error found, and the warnings,
    /// in file order.
    pub fn parse(source: &str, file_name: &str) -> Result<Policy, Diagnostics> {
        let map = SourceMap::new(file_name, source);
        let root = hujson::parse(source).map_err(|err| {
            Diagnostics(vec![map.error(
                diagnostic::Span {
                    start: err.offset,
                    end: err.offset,
                },
                err.message,
                err.hint,
            )])
        })?;
        let mut diags = Vec::new();
        let file = parse::file(&root, &map, &mut diags);
        let resolved = resolve::resolve(&file, &map, &mut diags);
        diags.sort_by_key(|d| (d.line, d.column));
        if diags.iter().any(|d| d.severity == Severity::Error) {
            return Err(Diagnostics(diags));
        }
        Ok(Policy {
            file: file_name.to_owned(),
            rules: resolved.rules,
            tests: resolved.tests,
            warnings: diags,
        })
    }

    /// Runs the file's `tests`. Err lists each failing test.
    pub fn run_tests(&self) -> Result<TestReport, Diagnostics> {
        tests_block::run(&self.tests, &self.rules, &self.file)
    }

    /// Warnings found while parsing (unsupported keys).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// Compiles what each node may do. Nodes that no rule concerns get no peers and an empty filter.
    pub fn compile(&self, nodes: &[NodeInfo]) -> Compiled {
        compile::compile(&self.rules, nodes)
    }
}

/// A policy file that parsed and whose tests passed.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The policy.
    pub policy: Policy,
    /// The passing tests.
    pub tests: TestReport,
    /// Warnings from parsing.
    pub warnings: Vec<Diagnostic>,
}

/// Convenience for `weft policy check FILE` and the coordinator: read + parse + run tests.
///
/// On a failing test the error holds the failures followed by the parse warnings.
pub fn check_file(path: &Path) -> Result<Checked, Diagnostics> {
    let file_name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|err| {
        Diagnostics(vec![Diagnostic {
            severity: Severity::Error,
            file: file_name.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read the policy file: {err}"),
            hint: Some("check the path and that the file is readable UTF-8 text".into()),
        }])
    })?;
    let policy = Policy::parse(&source, &file_name)?;
    let tests = policy.run_tests().map_err(|Diagnostics(mut failures)| {
        failures.extend(policy.warnings.iter().cloned());
        Diagnostics(failures)
    })?;
    let warnings = policy.warnings.clone();
    Ok(Checked {
        policy,
        tests,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Policy-shaped text: real keys and selector fragments in random arrangements.
    fn policy_like() -> impl Strategy<Value = String> {
        let atom = prop::sample::select(vec![
            "\"groups\"",
            "\"tagOwners\"",
            "\"hosts\"",
            "\"acls\"",
            "\"tests\"",
            "\"action\"",
            "\"src\"",
            "\"dst\"",
            "\"proto\"",
            "\"accept\"",
            "\"deny\"",
            "\"group:a\"",
            "\"tag:a\"",
            "\"tag:a:80\"",
            "\"*:*\"",
            "\"a@x\"",
            "\"h\"",
            "\"h:1-2\"",
            "\"10.0.0.0/8\"",
            "\"[fd00::1]:80\"",
            "\"fd00::/64:1\"",
            "\"icmp\"",
            "17",
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            "// c\n",
            "/* c */",
            "null",
            "true",
        ]);
        prop::collection::vec(atom, 0..40).prop_map(|atoms| atoms.concat())
    }

    proptest! {
        #[test]
        fn random_text_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(policy) = Policy::parse(&String::from_utf8_lossy(&bytes), "p") {
                let _ = policy.run_tests();
            }
        }

        #[test]
        fn policy_like_text_never_panics(text in policy_like()) {
            if let Ok(policy) = Policy::parse(&text, "p") {
                let _ = policy.run_tests();
                let _ = policy.compile(&[]);
            }
        }

        #[test]
        fn errors_always_have_a_position_inside_the_file(text in policy_like()) {
            if let Err(diags) = Policy::parse(&text, "p") {
                prop_assert!(diags.has_errors());
                let lines = u32::try_from(text.lines().count().max(1)).unwrap();
                for d in &diags.0 {
                    prop_assert!(d.line >= 1 && d.line <= lines + 1 && d.column >= 1, "{d}");
                }
            }
        }
    }
}
