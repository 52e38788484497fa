//! The policy file's structure as written, with source spans.
//!
//! Strings are already split into selectors, ports and protocols, but names
//! are not yet checked against their definitions: that is [`crate::resolve`].

use std::collections::BTreeMap;

use ipnet::IpNet;
use weft_proto::{PortRange, Protocol};

use crate::diagnostic::Span;
use crate::selector::Selector;

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// A whole policy file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct File {
    pub(crate) groups: Vec<GroupDef>,
    pub(crate) tag_owners: Vec<TagOwnerDef>,
    pub(crate) hosts: Vec<HostDef>,
    /// `acls` entries, then the entries of the `deny` list.
    pub(crate) acls: Vec<Acl>,
    pub(crate) grants: Vec<Grant>,
    pub(crate) postures: Vec<PostureDef>,
    /// `defaultSrcPosture`: posture names.
    pub(crate) default_src_posture: Vec<Spanned<String>>,
    /// `"mode": "audit"` for the whole file.
    pub(crate) audit: bool,
    pub(crate) tests: Vec<TestEntry>,
    pub(crate) ipsets: Vec<IpsetDef>,
    /// Names used in the sections weft checks but does not enforce (`ssh`,
    /// `sshTests`, `nodeAttrs`, `autoApprovers`), so undefined ones are caught.
    pub(crate) references: Vec<Spanned<Selector>>,
}

/// `"ipset:NAME": ["add 10.0.0.0/8", "remove host:lab", …]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IpsetDef {
    pub(crate) name: Spanned<String>,
    /// In order: later entries add to or remove from what the earlier built.
    pub(crate) entries: Vec<Spanned<IpsetEntry>>,
}

/// One `add`/`remove` operation of an ipset.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IpsetEntry {
    pub(crate) remove: bool,
    /// An IP or CIDR, a host, another ipset or `autogroup:internet`.
    pub(crate) selector: Selector,
}

/// `"posture:NAME": ["CONDITION", …]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PostureDef {
    pub(crate) name: Spanned<String>,
    pub(crate) conditions: Vec<crate::posture::Condition>,
}

/// Whether a rule admits or refuses what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Accept,
    Deny,
}

/// One `grants` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Grant {
    /// The entry's opening brace.
    pub(crate) span: Span,
    pub(crate) src: Vec<Spanned<Selector>>,
    /// Selectors without ports: the ports are in `ip`.
    pub(crate) dst: Vec<Spanned<Selector>>,
    /// `ip` entries: a protocol (none: TCP, UDP and ICMP) and its ports.
    pub(crate) ip: Vec<(Option<Protocol>, Vec<PortRange>)>,
    /// `app` capabilities: name and values as compact JSON.
    pub(crate) app: Vec<(String, Vec<String>)>,
    pub(crate) src_posture: Option<Vec<Spanned<String>>>,
    /// `via`: the routers traffic must pass (not enforced by weft).
    pub(crate) via: Vec<Spanned<Selector>>,
}

/// `"group:eng": ["alice@example.com"]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupDef {
    pub(crate) name: Spanned<String>,
    /// User logins.
    pub(crate) members: Vec<Spanned<String>>,
}

/// `"tag:web": ["group:eng"]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TagOwnerDef {
    pub(crate) tag: Spanned<String>,
    /// Users, groups or tags; autogroups are kept out (they need no definition).
    pub(crate) owners: Vec<Spanned<Selector>>,
}

/// `"db-net": "100.64.0.0/24"`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostDef {
    pub(crate) name: Spanned<String>,
    pub(crate) prefix: IpNet,
}

/// One `acls` entry, or one entry of the `deny` list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Acl {
    /// The entry's opening brace.
    pub(crate) span: Span,
    pub(crate) action: Action,
    /// `"mode": "audit"` on a deny rule.
    pub(crate) audit: bool,
    pub(crate) src_posture: Option<Vec<Spanned<String>>>,
    pub(crate) src: Vec<Spanned<Selector>>,
    pub(crate) dst: Vec<Spanned<Dst>>,
    pub(crate) proto: Option<Protocol>,
}

/// `SELECTOR:PORTS`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dst {
    pub(crate) selector: Selector,
    pub(crate) ports: Vec<PortRange>,
}

/// One `tests` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TestEntry {
    /// The entry's opening brace.
    pub(crate) span: Span,
    pub(crate) src: Spanned<Selector>,
    pub(crate) src_text: String,
    pub(crate) proto: Option<Protocol>,
    pub(crate) accept: Vec<Spanned<TestDst>>,
    pub(crate) deny: Vec<Spanned<TestDst>>,
    /// `srcPostureAttrs`: the attributes the test's source reports.
    pub(crate) src_posture_attrs: Option<BTreeMap<String, String>>,
}

/// `PRINCIPAL:PORT` in a test.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TestDst {
    pub(crate) text: String,
    pub(crate) selector: Selector,
    pub(crate) port: u16,
}
