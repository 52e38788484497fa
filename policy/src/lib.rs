//! weft's access policy.
//!
//! A policy is a HuJSON file: JSON that also allows `//` and `/* */`
//! comments and trailing commas. Its language is Tailscale's policy file
//! (Headscale's too), so existing files work unchanged, plus explicit deny,
//! audit mode and workload identities:
//!
//! ```hujson
//! {
//!   "groups":    { "group:eng": ["alice@example.com", "bob@example.com"] },
//!   "tagOwners": { "tag:web": ["group:eng"], "tag:db": ["group:eng"] },
//!   "hosts":     { "db-net": "100.64.0.0/24" },
//!   "postures":  { "posture:managed": ["node:os IN ['linux', 'macos']", "node:clientVersion >= '1.4'"] },
//!   "acls": [
//!     { "action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp" },
//!     { "action": "accept", "src": ["group:eng"], "dst": ["*:*"], "srcPosture": ["posture:managed"] },
//!     { "action": "deny",   "src": ["*"], "dst": ["tag:db:22"] },
//!   ],
//!   "grants": [
//!     { "src": ["spiffe://prod.example.com/ns/*/sa/api"], "dst": ["tag:db"], "ip": ["tcp:5432"],
//!       "app": { "example.com/cap/db": [{ "role": "reader" }] } },
//!   ],
//!   "tests": [
//!     { "src": "tag:web", "accept": ["tag:db:5432"], "deny": ["tag:db:22"] },
//!   ],
//! }
//! ```
//!
//! - **Principals** (`src`, and `dst` before the ports): `*`; a user login;
//!   `group:NAME` (defined under `groups`); `group:idp:NAME`, a group the
//!   identity provider asserts at login — any `group:` name with a second
//!   colon is such an external group, which may not be defined in the file
//!   and needs no definition; `tag:NAME` (listed under `tagOwners`); a
//!   workload's SPIFFE ID `spiffe://DOMAIN/ns/NS/sa/SA`, where a `*` segment
//!   matches one segment and a final `/**` the rest; a `hosts` name, an IP or
//!   a CIDR; `ipset:NAME` (defined under `ipsets`); `autogroup:member` (user
//!   nodes; `autogroup:members` is its older spelling, and a file may not
//!   mix the two), `autogroup:tagged` (tagged nodes), as a destination only
//!   `autogroup:self` (the source user's own user nodes), as a source only
//!   `autogroup:danger-all` (the same as `*`), and the role autogroups
//!   `autogroup:owner`, `autogroup:admin`, `autogroup:it-admin`,
//!   `autogroup:network-admin`, `autogroup:billing-admin` and
//!   `autogroup:auditor`: the user nodes of the role's members, given as
//!   [`Roles`] ([`Policy::parse_with_roles`]).
//! - **Who a node is**: a workload node is matched by its SPIFFE ID and its
//!   tags; a tagged node by its tags only; a user node by its user, the file
//!   groups listing that user, and its identity-provider groups.
//! - **Destinations** are `SELECTOR:PORTS`, split at the last colon; PORTS is
//!   `*`, `N`, `N-M` or a comma list. IPv6 addresses are bracketed:
//!   `[fd7a::1]:443`; CIDRs need no brackets: `fd7a::/48:443`. Grant
//!   destinations carry no ports: they are in `ip` (`"tcp:443"`, `"53"`,
//!   `"icmp:*"`, `"*"`).
//! - **`proto`**: `tcp`, `udp`, `icmp`, another IANA name or a number;
//!   without it a rule covers TCP, UDP and ICMP. Only TCP and UDP have
//!   ports, so a rule without `proto` covers ICMP whatever its ports — for a
//!   deny rule too.
//! - **Precedence**, applied by each destination node to new inbound flows
//!   (return traffic of its own flows always passes): a matching enforced
//!   **deny** drops, whatever accepts say; then a matching **audit-mode deny**
//!   (`"mode": "audit"` on a deny rule) passes and is logged as a would-be
//!   denial; then a matching **accept** (an `acls` accept or a grant's `ip`)
//!   passes; anything else is denied. An audit-mode deny only ever concerns
//!   traffic that an accept admits, so it never opens anything. Rule order
//!   does not matter. `{}` denies everything.
//! - **Deny** rules are `acls` entries with `"action": "deny"` or entries of
//!   the top-level `deny` list. `"mode": "audit"` on an accept rule is an
//!   error. `"mode": "audit"` at the top level puts the whole file in audit
//!   mode: nothing is enforced, every flow it would deny passes and is logged,
//!   and every node may reach every other.
//! - **Postures**: `postures` names lists of conditions on node attributes
//!   (`node:os`, `node:osVersion`, `node:clientVersion` — Tailscale's
//!   `node:tsVersion` is the same — and `custom:KEY`), with `==`, `!=`, `IN`,
//!   `NOT IN` and version comparisons `<`, `<=`, `>`, `>=` on dotted numbers.
//!   A rule's `srcPosture` (or else the file's `defaultSrcPosture`, for
//!   accepts and grants) admits only source nodes satisfying every condition
//!   of at least one listed posture. Missing attributes and non-numeric
//!   versions fail; addresses that are not nodes never satisfy a posture.
//!   A bare attribute (`node:tsAutoUpdate`) holds when it is `true`. Other
//!   `NAMESPACE:KEY` attributes Tailscale documents (`node:tsReleaseTrack`,
//!   `ip:country`, …) are not collected by weft: absent on every node, so a
//!   condition on them never holds (a warning names each). Deny rules take
//!   no posture.
//! - **Grants**: `ip` opens the network like an accept; `app` hands
//!   capabilities (JSON values) to applications on the destination through
//!   the node's local API, and is not enforced in the tunnel. A grant with
//!   only `app` opens no traffic and makes no peers.
//! - **`ipsets`**: `"ipset:NAME": ["10.0.0.0/8", "add HOST", "remove
//!   10.0.5.0/24", "add ipset:OTHER", "add autogroup:internet"]`, applied in
//!   order (`host:NAME` names a host too). Cycles and undefined names are
//!   errors.
//! - **`tests`** check the rules at the level of principals, without any
//!   nodes; `srcPostureAttrs` gives the source's attributes. An `accept`
//!   holds when the verdict is accept; a `deny` holds when it is deny or
//!   audit-deny. A failing test rejects the policy. A test naming a role
//!   autogroup, or an overlay address no `hosts` entry covers, stands for
//!   devices: offline it is not evaluated (a warning, and
//!   [`TestReport::not_evaluated`]); [`Policy::run_tests_on_nodes`]
//!   evaluates it against the nodes.
//! - **Early Tailscale spellings** load as their current names: `ACLs`,
//!   `Groups`, `Hosts`, `TagOwners`, `Tests` at the top level; `Action`,
//!   `users`/`Users` (= `src`) and `ports`/`Ports` (= `dst`) in acls;
//!   `user`/`User` (= `src`) and `allow`/`Allow` (= `accept`) in tests. One
//!   object setting a field under two spellings is an error naming both.
//!
//! ## What weft does not enforce
//!
//! weft never grants more than the file says: what it cannot enforce
//! matches nothing, loads, and is named by one warning per construct, and
//! [`Policy::explain`] lists the rules that match nothing because of it
//! ([`Explanation::unenforced`]).
//!
//! - `autogroup:internet` (exit-node access): weft has no exit nodes.
//! - `autogroup:shared` (users shared in from another tailnet): weft has no
//!   sharing.
//! - `svc:NAME` (Tailscale Services) and grants with `via` (routing through
//!   chosen subnet routers or exit nodes): weft has neither.
//! - Role autogroups without configured members. In a deny rule, not
//!   knowing who holds the role, weft denies every source instead.
//! - Posture attributes weft does not collect (above).
//! - The sections `ssh`, `sshTests`, `nodeAttrs` and `autoApprovers` are
//!   ignored with a warning naming the key, but checked like Tailscale
//!   checks them: unknown fields, wrong value types and undefined groups,
//!   tags, hosts and ipsets are errors, so a typo still fails in CI. Other
//!   Tailscale settings (`derpMap`, `randomizeClientPort`, …) are ignored
//!   with a warning. Unknown keys are errors.
//!
//! ## Entry points
//!
//! - `weft policy check FILE [--roles FILE] [--devices FILE]`:
//!   [`check_file_with`]`(path, &roles, devices)`, where `roles` is the
//!   roles file deserialized into [`Roles`] (see its JSON form) and
//!   `devices` the device list read by [`parse_devices`] (the JSON of
//!   `weft-coordinator nodes list --json`). Warnings are in
//!   [`Checked::warnings`]; errors and failing tests are the `Err`.
//! - The coordinator: deserialize its roles setting into [`Roles`], parse
//!   with [`Policy::parse_with_roles`], and on every load run
//!   [`Policy::run_tests_on_nodes`] with the registered nodes, refusing the
//!   policy when it returns `Err`. The lockout guard can take the `admin`
//!   role itself: `reaches_anything("autogroup:admin", nodes)`, or each of
//!   [`Roles::members`]`(Role::Admin)`.
//!
//! The pipeline is `hujson` (values with spans) → `parse` (the `ast`) →
//! `resolve` (checked `rules`) → `eval` (tests, [`Policy::explain`],
//! [`diff`], [`Policy::reaches_anything`]) and `compile` (per-node peers,
//! filters and capabilities; [`Engine`] recompiles incrementally).

mod ast;
mod compile;
mod devices;
mod diagnostic;
mod diff;
mod engine;
mod eval;
mod explain;
mod hujson;
mod ipsets;
mod parse;
mod ports;
mod posture;
mod print;
mod resolve;
mod roles;
mod rules;
mod selector;
mod tests_block;

use std::path::Path;

pub use compile::{Compiled, NodeAccess, NodeInfo};
pub use devices::{parse_devices, DevicesError};
pub use diagnostic::{Diagnostic, Diagnostics, Severity};

pub use diff::{diff, Flow, PolicyDiff};
pub use engine::Engine;
pub use eval::Verdict;
pub use explain::{Explanation, RuleRef, UnenforcedNote};
pub use roles::{Role, Roles, RolesError};

pub use tests_block::TestReport;
pub use weft_proto::Protocol;

use diagnostic::SourceMap;
use resolve::Names;
use rules::{Rules, TestCase};

/// A parsed and validated policy. Its `tests` have not run yet: see [`Policy::run_tests`].
#[derive(Debug, Clone)]
pub struct Policy {
    file: String,
    /// The file as written, for printing it back.
    ast: ast::File,
    rules: Rules,
    names: Names,
    tests: Vec<TestCase>,
    warnings: Vec<Diagnostic>,
}

impl Policy {
    /// Parses and validates, without role members: role autogroups match
    /// nothing (in deny rules: every source). `file_name` is used in
    /// diagnostics.
    ///
    /// On failure the diagnostics hold every error found, and the warnings,
    /// in file order.
    pub fn parse(source: &str, file_name: &str) -> Result<Policy, Diagnostics> {
        Policy::parse_with_roles(source, file_name, &Roles::default())
    }

    /// Parses and validates with the members of the role autogroups
    /// (`autogroup:admin`, …), from the coordinator's roles setting or
    /// `weft policy check --roles FILE` (see [`Roles`]).
    pub fn parse_with_roles(
        source: &str,
        file_name: &str,
        roles: &Roles,
    ) -> Result<Policy, Diagnostics> {
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
        let resolved = resolve::resolve(&file, roles, &map, &mut diags);
        diags.sort_by_key(|d| (d.line, d.column));
        if diags.iter().any(|d| d.severity == Severity::Error) {
            return Err(Diagnostics(diags));
        }
        Ok(Policy {
            ast: file,
            file: file_name.to_owned(),
            rules: resolved.rules,
            names: resolved.names,
            tests: resolved.tests,
            warnings: diags,
        })
    }

    /// Runs the file's `tests` without nodes. Err lists each failing test.
    ///
    /// Tests that need the nodes (a role autogroup, an overlay address no
    /// `hosts` entry covers) are not evaluated: they are counted in
    /// [`TestReport::not_evaluated`], and [`Policy::warnings`] names each.
    pub fn run_tests(&self) -> Result<TestReport, Diagnostics> {
        tests_block::run(&self.tests, &self.rules, &self.file, None)
    }

    /// Runs every `tests` entry, those that need the nodes against `nodes`
    /// (the nodes the policy compiles for: `weft policy check --devices
    /// FILE`, or the coordinator's registered nodes on every load).
    ///
    /// An overlay address stands for the node holding it (or for the bare
    /// address when no node does), and a role autogroup for the user nodes
    /// of its members; a source node's attributes are its own unless the
    /// test gives `srcPostureAttrs`. Err lists each failing test.
    pub fn run_tests_on_nodes(&self, nodes: &[NodeInfo]) -> Result<TestReport, Diagnostics> {
        let nodes = compile::canonical_nodes(nodes);
        tests_block::run(&self.tests, &self.rules, &self.file, Some(&nodes))
    }

    /// Warnings found while parsing: keys and constructs weft does not
    /// enforce, and tests that need the nodes.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// The [`Policy::warnings`] that still hold once the tests ran against
    /// nodes ([`Policy::run_tests_on_nodes`]): all but those saying a test
    /// was not evaluated offline.
    pub fn warnings_with_nodes(&self) -> impl Iterator<Item = &Diagnostic> {
        self.warnings
            .iter()
            .filter(|w| !w.message.ends_with(resolve::NOT_EVALUATED_OFFLINE))
    }

    /// Compiles what each node may do: peers, inbound filter and capabilities.
    /// Nodes that no rule concerns get no peers and a default-deny filter
    /// (in whole-file audit mode: every node as a peer and a default that
    /// passes and logs).
    pub fn compile(&self, nodes: &[NodeInfo]) -> Compiled {
        compile::compile(&self.rules, nodes)
    }

    /// The policy as canonical HuJSON (comments dropped, one key order);
    /// parsing it gives the same policy.
    pub fn to_hujson(&self) -> String {
        print::print(&self.ast)
    }

    /// Whether the whole file is in audit mode (`"mode": "audit"`).
    pub fn audit_mode(&self) -> bool {
        self.rules.audit
    }

    /// How many access rules the policy holds (each `acls` entry, and each
    /// protocol of a grant): a measure of what comparing it costs.
    pub fn rule_count(&self) -> usize {
        self.rules.rules.len() + self.rules.inert.len()
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
    check_file_with(path, &Roles::default(), None)
}

/// [`check_file`] with role members (`--roles FILE`) and, when given, the
/// nodes to evaluate the tests that need them against (`--devices FILE`).
pub fn check_file_with(
    path: &Path,
    roles: &Roles,
    nodes: Option<&[NodeInfo]>,
) -> Result<Checked, Diagnostics> {
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
    let policy = Policy::parse_with_roles(&source, &file_name, roles)?;
    let tests = match nodes {
        Some(nodes) => policy.run_tests_on_nodes(nodes),
        None => policy.run_tests(),
    };
    let warnings: Vec<Diagnostic> = match nodes {
        Some(_) => policy.warnings_with_nodes().cloned().collect(),
        None => policy.warnings.clone(),
    };
    let tests = tests.map_err(|Diagnostics(mut failures)| {
        failures.extend(warnings.iter().cloned());
        Diagnostics(failures)
    })?;
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
