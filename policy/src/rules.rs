//! The checked rule set: what the resolver produces and the evaluator and compiler consume.
//!
//! Every name is resolved here: groups carry their members, hosts are
//! prefixes, and every tag is known to `tagOwners`.

use ipnet::IpNet;
use weft_proto::{PortRange, Protocol};

use crate::diagnostic::Location;

/// Whom a `src` or `dst` selector covers, with every name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Every node and every address.
    Any,
    /// Untagged nodes of this user.
    User(String),
    /// Untagged nodes of any of these users.
    Group { name: String, members: Vec<String> },
    /// Nodes carrying this tag.
    Tag(String),
    /// Addresses in this prefix (a host, IP or CIDR).
    Prefix(IpNet),
}

/// One accept rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// The line of the acls entry, for audit logs and test reports.
    pub(crate) line: u32,
    pub(crate) src: Vec<Target>,
    pub(crate) dst: Vec<DstTarget>,
    /// Empty means TCP, UDP and ICMP.
    pub(crate) protocols: Vec<Protocol>,
}

/// One `dst` entry of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DstTarget {
    pub(crate) target: Target,
    /// Sorted and merged; only TCP and UDP look at them.
    pub(crate) ports: Vec<PortRange>,
}

/// One `tests` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestCase {
    pub(crate) location: Location,
    pub(crate) src_text: String,
    pub(crate) src: Target,
    pub(crate) proto: Option<Protocol>,
    pub(crate) checks: Vec<Check>,
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
