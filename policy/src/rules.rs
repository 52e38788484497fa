//! The checked rule set: what the resolver produces and the evaluator and compiler consume.
//!
//! Every name is resolved here: groups carry their members, hosts are
//! prefixes, every tag is known to `tagOwners` and every posture is defined.

use std::collections::BTreeMap;

use ipnet::IpNet;
use weft_proto::{PortRange, Protocol, RuleAction, RuleId};

use crate::diagnostic::Location;
use crate::posture::Posture;
use crate::roles::Role;

/// Whom a `src` or `dst` selector covers, with every name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Every node and every address.
    Any,
    /// The user nodes of this user.
    User(String),
    /// The user nodes of any of these users.
    Group { name: String, members: Vec<String> },
    /// User nodes whose identity provider asserted this group (`group:idp:NAME`).
    External(String),
    /// Nodes carrying this tag.
    Tag(String),
    /// Workload nodes whose SPIFFE ID matches this pattern.
    Workload(String),
    /// `autogroup:member`: user nodes.
    Member,
    /// `autogroup:tagged`: nodes with tags.
    Tagged,
    /// `autogroup:self` (dst only): the user nodes of the source's user.
    SelfUser,
    /// Addresses in this prefix (a host, IP, CIDR or part of an `ipset`).
    Prefix(IpNet),
    /// A role autogroup: the user nodes of its members' logins and
    /// identity-provider groups.
    Role {
        role: Role,
        users: Vec<String>,
        groups: Vec<String>,
    },
    /// A construct weft loads but does not enforce: it matches nothing.
    Unenforced(Unenforced),
}

/// What a rule names that weft cannot enforce, so it matches nothing there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Unenforced {
    /// `autogroup:internet`: weft has no exit nodes.
    Internet,
    /// `autogroup:shared`: weft has no sharing between networks.
    Shared,
    /// `svc:NAME`: weft has no Tailscale Services.
    Service(String),
    /// A grant's `via`: weft cannot route through chosen routers.
    Via,
    /// A role autogroup without configured members.
    Role(Role),
}

impl Unenforced {
    /// The construct as the file writes it.
    pub(crate) fn construct(&self) -> String {
        match self {
            Unenforced::Internet => "autogroup:internet".into(),
            Unenforced::Shared => "autogroup:shared".into(),
            Unenforced::Service(name) => name.clone(),
            Unenforced::Via => "\"via\"".into(),
            Unenforced::Role(role) => role.autogroup(),
        }
    }

    /// The checker's warning: what matches nothing and why.
    pub(crate) fn message(&self) -> String {
        match self {
            Unenforced::Via => format!("grants with \"via\" match nothing: {}", self.reason()),
            _ => format!("{} matches nothing: {}", self.construct(), self.reason()),
        }
    }

    /// Why weft matches nothing there.
    pub(crate) fn reason(&self) -> String {
        match self {
            Unenforced::Internet => {
                "weft has no exit nodes, so exit-node access is not enforced".into()
            }
            Unenforced::Shared => {
                "weft has no sharing between networks, so users shared in are not enforced".into()
            }
            Unenforced::Service(_) => {
                "weft has no Tailscale Services, so access to them is not enforced".into()
            }
            Unenforced::Via => {
                "weft has no subnet routers or exit nodes to route through, so routing is not enforced".into()
            }
            Unenforced::Role(role) => format!(
                "the {} role has no members configured",
                role.name()
            ),
        }
    }
}

/// Everything a policy decides, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    /// Network rules from `acls`, `deny` and the `ip` of `grants`, in file order.
    pub(crate) rules: Vec<Rule>,
    /// The `app` capabilities of `grants`.
    pub(crate) apps: Vec<AppRule>,
    /// Grants with `via`, as the network rules they would be: never
    /// enforced, kept so `explain` can name them.
    pub(crate) inert: Vec<Rule>,
    /// Whole-file audit mode: nothing is enforced, would-be denials are logged.
    pub(crate) audit: bool,
}

/// One network rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// The line of the entry, for audit logs, explanations and test reports.
    pub(crate) line: u32,
    /// The entry as written, on one line.
    pub(crate) text: String,
    /// The entry's stable id: the hash of `text`, so moving or re-indenting
    /// the entry keeps it and editing the entry changes it.
    pub(crate) id: RuleId,
    /// Accept, deny, or a deny in audit mode.
    pub(crate) action: RuleAction,
    pub(crate) src: Vec<Target>,
    pub(crate) dst: Vec<DstTarget>,
    /// Empty means TCP, UDP and ICMP.
    pub(crate) protocols: Vec<Protocol>,
    /// `srcPosture` (or `defaultSrcPosture`): `None` admits every source.
    pub(crate) posture: Option<Vec<Posture>>,
}

/// One `dst` entry of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DstTarget {
    pub(crate) target: Target,
    /// Sorted and merged; only TCP and UDP look at them.
    pub(crate) ports: Vec<PortRange>,
}

/// The `app` part of one grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppRule {
    pub(crate) line: u32,
    pub(crate) src: Vec<Target>,
    pub(crate) dst: Vec<Target>,
    /// Capability name and its values, each compact JSON.
    pub(crate) caps: Vec<(String, Vec<String>)>,
    pub(crate) posture: Option<Vec<Posture>>,
}

/// One `tests` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestCase {
    pub(crate) location: Location,
    pub(crate) src_text: String,
    pub(crate) src: Target,
    pub(crate) proto: Option<Protocol>,
    /// `srcPostureAttrs`.
    pub(crate) attributes: Option<BTreeMap<String, String>>,
    pub(crate) checks: Vec<Check>,
    /// Why the test cannot be evaluated without the nodes (a role autogroup,
    /// or an overlay address no `hosts` entry covers); `None` when it can.
    pub(crate) needs_devices: Option<String>,
}

/// One `accept` or `deny` destination of a test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub(crate) expect: Expect,
    pub(crate) dst_text: String,
    pub(crate) dst: Target,
    pub(crate) port: u16,
}

/// What a test expects for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Accept,
    Deny,
}
