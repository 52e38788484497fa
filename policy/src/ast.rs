//! The policy file's structure as written, with source spans.
//!
//! Strings are already split into selectors, ports and protocols, but names
//! are not yet checked against their definitions: that is [`crate::resolve`].

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
    pub(crate) acls: Vec<Acl>,
    pub(crate) tests: Vec<TestEntry>,
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

/// One `acls` entry (its action is always accept in this version).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Acl {
    /// The entry's opening brace.
    pub(crate) span: Span,
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
}

/// `PRINCIPAL:PORT` in a test.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TestDst {
    pub(crate) text: String,
    pub(crate) selector: Selector,
    pub(crate) port: u16,
}
