//! The syntax of `src` and `dst` entries: `*`, users, `group:`, `tag:`,
//! SPIFFE IDs, `autogroup:`, host names, IPs and CIDRs.
//!
//! This module only decides what a string *says*; whether a named group, tag
//! or host exists is the resolver's business. Users, tags and SPIFFE IDs
//! come out in their canonical form ([`weft_proto::canonical`]), the form
//! nodes' identities are compared in, so `Mallory@Example.COM` in a deny
//! rule denies the person who logs in as `mallory@example.com`.

use std::net::IpAddr;

use ipnet::IpNet;
use weft_proto::canonical;

use crate::roles::Role;

/// What a selector string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    /// `*`: every node and every address.
    Any,
    /// `alice@example.com`.
    User(String),
    /// `group:NAME` (the full string, prefix included). A name with a second
    /// colon (`group:idp:NAME`) is an external group, asserted by the
    /// identity provider rather than defined in the file.
    Group(String),
    /// A SPIFFE ID pattern: `spiffe://TRUST_DOMAIN/PATH`, where a `*` segment
    /// matches one segment and a trailing `/**` the rest.
    Workload(String),
    /// `autogroup:NAME`.
    Autogroup(Autogroup),
    /// `ipset:NAME`, defined under `ipsets`.
    Ipset(String),
    /// `svc:NAME`, a Tailscale Service (the full string).
    Service(String),
    /// `tag:NAME` (the full string, prefix included).
    Tag(String),
    /// A name from the `hosts` section.
    Host(String),
    /// An IP (as a host prefix) or a CIDR.
    Prefix(IpNet),
}

/// The autogroups weft knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Autogroup {
    /// Nodes of a user, without tags (also written `autogroup:members`).
    Member,
    /// Nodes with tags.
    Tagged,
    /// In a `dst`: the nodes of the source node's own user.
    SelfUser,
    /// The internet through an exit node: weft has no exit nodes.
    Internet,
    /// As a source: every address, inside the network or not (`*` in weft).
    DangerAll,
    /// Users shared in from another tailnet: weft has no sharing.
    Shared,
    /// The user nodes of the people holding a role.
    Role(Role),
}

impl Autogroup {
    pub(crate) fn name(self) -> String {
        match self {
            Autogroup::Member => "autogroup:member".into(),
            Autogroup::Tagged => "autogroup:tagged".into(),
            Autogroup::SelfUser => "autogroup:self".into(),
            Autogroup::Internet => "autogroup:internet".into(),
            Autogroup::DangerAll => "autogroup:danger-all".into(),
            Autogroup::Shared => "autogroup:shared".into(),
            Autogroup::Role(role) => role.autogroup(),
        }
    }

    /// The autogroup named `text`; `autogroup:members` is Tailscale's older
    /// spelling of `autogroup:member`.
    fn from_name(text: &str) -> Option<Autogroup> {
        let name = text.strip_prefix("autogroup:")?;
        Some(match name {
            "member" | "members" => Autogroup::Member,
            "tagged" => Autogroup::Tagged,
            "self" => Autogroup::SelfUser,
            "internet" => Autogroup::Internet,
            "danger-all" => Autogroup::DangerAll,
            "shared" => Autogroup::Shared,
            _ => Autogroup::Role(Role::from_name(name)?),
        })
    }
}

/// Every autogroup name, for hints.
const AUTOGROUPS: &str = "autogroup:member (or :members), autogroup:tagged, autogroup:self, autogroup:internet, autogroup:shared, autogroup:danger-all and the roles autogroup:owner, autogroup:admin, autogroup:it-admin, autogroup:network-admin, autogroup:billing-admin, autogroup:auditor";

/// Whether a `group:` name is an external (identity-provider) group.
pub(crate) fn is_external_group(full: &str) -> bool {
    full.strip_prefix("group:")
        .is_some_and(|name| name.contains(':'))
}

impl std::fmt::Display for Selector {
    /// The selector as a policy file writes it (IPv6 prefixes unbracketed).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::User(name)
            | Selector::Group(name)
            | Selector::Tag(name)
            | Selector::Host(name)
            | Selector::Workload(name) => f.write_str(name),
            Selector::Ipset(name) | Selector::Service(name) => f.write_str(name),
            Selector::Autogroup(group) => f.write_str(&group.name()),
            Selector::Prefix(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Selector::Prefix(net) => write!(f, "{net}"),
        }
    }
}

/// Why a string is not a valid selector, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SelectorError {
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
}

impl SelectorError {
    fn new(message: String, hint: impl Into<Option<String>>) -> Self {
        SelectorError {
            message,
            hint: hint.into(),
        }
    }
}

const SPIFFE_SCHEME: &str = "spiffe://";

const SELECTOR_FORMS: &str = "a selector is *, user@domain, group:NAME, group:idp:NAME, tag:NAME, spiffe://DOMAIN/PATH, autogroup:NAME, ipset:NAME, svc:NAME, a name from \"hosts\", an IP or a CIDR";

/// Parses a `src` selector (or the part of a `dst` before the ports).
pub(crate) fn parse(text: &str) -> Result<Selector, SelectorError> {
    if text == "*" {
        return Ok(Selector::Any);
    }
    if text.is_empty() {
        return Err(SelectorError::new(
            "empty selector".into(),
            SELECTOR_FORMS.to_owned(),
        ));
    }
    if text.chars().any(char::is_whitespace) {
        return Err(SelectorError::new(
            format!("selector \"{text}\" contains whitespace"),
            "remove the spaces; each list element is one selector".to_owned(),
        ));
    }
    if let Some(name) = text.strip_prefix("group:") {
        match name.split_once(':') {
            Some((provider, group)) => {
                check_name("group", provider, text)?;
                check_name("group", group, text)?;
            }
            None => check_name("group", name, text)?,
        }
        return Ok(Selector::Group(text.to_owned()));
    }
    if text
        .get(..SPIFFE_SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SPIFFE_SCHEME))
    {
        return parse_spiffe(&canonical::spiffe_id(text)).map(Selector::Workload);
    }
    if let Some(name) = text.strip_prefix("tag:") {
        check_name("tag", name, text)?;
        return Ok(Selector::Tag(canonical::tag(text).into_owned()));
    }
    if text.starts_with("autogroup:") {
        return Autogroup::from_name(text)
            .map(Selector::Autogroup)
            .ok_or_else(|| {
                SelectorError::new(
                    format!("unknown autogroup \"{text}\""),
                    format!("autogroups are {AUTOGROUPS}"),
                )
            });
    }
    if let Some(name) = text.strip_prefix("ipset:") {
        check_name("ipset", name, text)?;
        return Ok(Selector::Ipset(text.to_owned()));
    }
    if let Some(name) = text.strip_prefix("svc:") {
        check_name("svc", name, text)?;
        return Ok(Selector::Service(text.to_owned()));
    }
    if text.contains('@') {
        if text.starts_with('@') {
            return Err(SelectorError::new(
                format!("invalid user \"{text}\""),
                "users are written as their login, e.g. alice@example.com".to_owned(),
            ));
        }
        return Ok(Selector::User(canonical::email(text).into_owned()));
    }
    if let Some(prefix) = parse_prefix(text)? {
        return Ok(Selector::Prefix(prefix));
    }
    if let Some((prefix, _)) = text.split_once(':') {
        return Err(SelectorError::new(
            format!("unknown selector \"{text}\" (unknown prefix \"{prefix}:\")"),
            SELECTOR_FORMS.to_owned(),
        ));
    }
    check_host_name(text)?;
    Ok(Selector::Host(text.to_owned()))
}

/// Checks a SPIFFE ID pattern: `spiffe://DOMAIN/SEGMENT/…`, with `*` for one
/// segment and a final `**` for the rest.
fn parse_spiffe(text: &str) -> Result<String, SelectorError> {
    let invalid = |why: &str| {
        SelectorError::new(
            format!("invalid SPIFFE ID \"{text}\": {why}"),
            "write spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT; * matches one segment, a final /** the rest".to_owned(),
        )
    };
    let rest = text.strip_prefix(SPIFFE_SCHEME).unwrap_or(text);
    let mut segments = rest.split('/');
    let domain = segments.next().unwrap_or_default();
    if domain.is_empty() || !domain.chars().all(is_name_char) {
        return Err(invalid("the trust domain is missing or invalid"));
    }
    let path: Vec<&str> = segments.collect();
    if path.is_empty() {
        return Err(invalid("the path is missing"));
    }
    for (i, segment) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        let valid = match *segment {
            "*" => true,
            "**" => last,
            s => !s.is_empty() && s.chars().all(is_name_char),
        };
        if !valid {
            return Err(invalid(&format!("bad path segment \"{segment}\"")));
        }
    }
    Ok(text.to_owned())
}

/// The canonical spelling of a selector written as `text`, when `text` is
/// not already it: for the checker's warning, since a reader of the file
/// may not know that `Alice@Example.com` and `alice@example.com` are one.
pub(crate) fn canonical_spelling<'s>(text: &str, selector: &'s Selector) -> Option<&'s str> {
    match selector {
        Selector::User(canonical) | Selector::Tag(canonical) | Selector::Workload(canonical)
            if canonical != text =>
        {
            Some(canonical)
        }
        _ => None,
    }
}

/// Whether the SPIFFE ID `id` matches `pattern` (see [`Selector::Workload`]).
pub(crate) fn spiffe_matches(pattern: &str, id: &str) -> bool {
    let mut want = pattern.split('/');
    let mut have = id.split('/');
    loop {
        match (want.next(), have.next()) {
            (Some("**"), Some(_)) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(w), Some(h)) if w == h => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Parses an IP address or CIDR; `Ok(None)` when `text` does not look like one at all.
pub(crate) fn parse_prefix(text: &str) -> Result<Option<IpNet>, SelectorError> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(addr)));
    }
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(SelectorError::new(
                format!("CIDR \"{text}\" has bits set after the prefix length"),
                format!("did you mean \"{}\"?", net.trunc()),
            ));
        }
        return Ok(Some(net));
    }
    let looks_v4 = text.starts_with(|c: char| c.is_ascii_digit())
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '/');
    let looks_v6 = text.contains("::") || (text.contains(':') && text.contains('/'));
    if looks_v4 || looks_v6 {
        return Err(SelectorError::new(
            format!("invalid IP address or CIDR \"{text}\""),
            "write an address like 100.64.0.1 or fd7a::1, or a CIDR like 100.64.0.0/24".to_owned(),
        ));
    }
    Ok(None)
}

/// Splits a `dst` entry into its selector and ports at the last colon.
///
/// IPv6 literals may be bracketed (`[fd00::1]:80`); a bare one (`fd00::/64:80`)
/// splits at the last colon as well.
pub(crate) fn split_dst(text: &str) -> Result<(&str, &str), SelectorError> {
    if let Some(rest) = text.strip_prefix('[') {
        let Some((addr, ports)) = rest.split_once("]:") else {
            return Err(SelectorError::new(
                format!("invalid dst \"{text}\""),
                "write a bracketed IPv6 dst as [ADDR]:PORTS, e.g. [fd7a::1]:443".to_owned(),
            ));
        };
        return Ok((addr, ports));
    }
    let no_port = || {
        SelectorError::new(
            format!("dst \"{text}\" has no ports"),
            format!("write \"{text}:*\" for every port, or \"{text}:PORT\""),
        )
    };
    if parse_prefix(text).ok().flatten().is_some() && text.contains(':') {
        return Err(SelectorError::new(
            format!("dst \"{text}\" reads as an IPv6 address or CIDR with no ports"),
            format!("bracket IPv6 addresses: \"[{text}]:*\" for every port, or \"[{text}]:PORT\""),
        ));
    }
    let Some((selector, ports)) = text.rsplit_once(':') else {
        return Err(no_port());
    };
    if matches!(selector, "tag" | "group" | "autogroup" | "ipset" | "svc") {
        return Err(no_port());
    }
    Ok((selector, ports))
}

/// Checks the NAME of `group:NAME` or `tag:NAME`.
pub(crate) fn check_name(kind: &str, name: &str, full: &str) -> Result<(), SelectorError> {
    if name.is_empty() {
        return Err(SelectorError::new(
            format!("{kind} name \"{full}\" is empty"),
            format!("write {kind}:NAME"),
        ));
    }
    if !name.chars().all(is_name_char) {
        return Err(SelectorError::new(
            format!("invalid {kind} name \"{full}\""),
            "names use letters, digits, '-', '_' and '.'".to_owned(),
        ));
    }
    Ok(())
}

/// Checks a `hosts` name.
pub(crate) fn check_host_name(name: &str) -> Result<(), SelectorError> {
    if name.is_empty() || !name.chars().all(is_name_char) {
        return Err(SelectorError::new(
            format!("invalid host name \"{name}\""),
            "host names use letters, digits, '-', '_' and '.'".to_owned(),
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn selector_forms() {
        assert_eq!(parse("*"), Ok(Selector::Any));
        assert_eq!(
            parse("alice@example.com"),
            Ok(Selector::User("alice@example.com".into()))
        );
        assert_eq!(parse("group:eng"), Ok(Selector::Group("group:eng".into())));
        assert_eq!(parse("tag:web"), Ok(Selector::Tag("tag:web".into())));
        assert_eq!(parse("db-net"), Ok(Selector::Host("db-net".into())));
        assert_eq!(
            parse("100.64.0.1"),
            Ok(Selector::Prefix(net("100.64.0.1/32")))
        );
        assert_eq!(
            parse("100.64.0.0/10"),
            Ok(Selector::Prefix(net("100.64.0.0/10")))
        );
        assert_eq!(parse("fd7a::1"), Ok(Selector::Prefix(net("fd7a::1/128"))));
        assert_eq!(parse("fd7a::/48"), Ok(Selector::Prefix(net("fd7a::/48"))));
        assert_eq!(
            parse("group:idp:eng"),
            Ok(Selector::Group("group:idp:eng".into()))
        );
        assert!(is_external_group("group:idp:eng") && !is_external_group("group:eng"));
        assert_eq!(
            parse("spiffe://prod.example.com/ns/*/sa/api"),
            Ok(Selector::Workload(
                "spiffe://prod.example.com/ns/*/sa/api".into()
            ))
        );
        assert_eq!(
            parse("autogroup:self"),
            Ok(Selector::Autogroup(Autogroup::SelfUser))
        );
        assert_eq!(
            parse("autogroup:members"),
            Ok(Selector::Autogroup(Autogroup::Member))
        );
        assert_eq!(
            parse("autogroup:network-admin"),
            Ok(Selector::Autogroup(Autogroup::Role(Role::NetworkAdmin)))
        );
        assert_eq!(
            parse("autogroup:internet"),
            Ok(Selector::Autogroup(Autogroup::Internet))
        );
        assert_eq!(
            parse("ipset:office"),
            Ok(Selector::Ipset("ipset:office".into()))
        );
        assert_eq!(parse("svc:wiki"), Ok(Selector::Service("svc:wiki".into())));
        assert_eq!(
            split_dst("autogroup:internet:*"),
            Ok(("autogroup:internet", "*"))
        );
        assert_eq!(
            split_dst("spiffe://td/ns/a/sa/b:443"),
            Ok(("spiffe://td/ns/a/sa/b", "443"))
        );
    }

    #[test]
    fn spiffe_patterns() {
        let id = "spiffe://td/ns/prod/sa/api";
        assert!(spiffe_matches(id, id));
        assert!(spiffe_matches("spiffe://td/ns/*/sa/api", id));
        assert!(spiffe_matches("spiffe://td/ns/**", id));
        assert!(spiffe_matches("spiffe://td/**", id));
        assert!(!spiffe_matches("spiffe://td/ns/*/sa/web", id));
        assert!(!spiffe_matches("spiffe://td/ns/*", id));
        assert!(!spiffe_matches("spiffe://other/ns/**", id));
        assert!(!spiffe_matches("spiffe://td/ns/prod/sa/api/**", id));
        assert!(!spiffe_matches(
            "spiffe://td/ns/prod/sa/api",
            "spiffe://td/ns/prod/sa/api/x"
        ));
        assert!(!spiffe_matches(
            "spiffe://td/ns/*/sa/api",
            "spiffe://td/ns//sa/api"
        ));
    }

    #[test]
    fn selector_errors_explain_the_fix() {
        let err = parse("100.64.0.1/24").unwrap_err();
        assert!(err.message.contains("bits set"), "{err:?}");
        assert_eq!(err.hint.as_deref(), Some("did you mean \"100.64.0.0/24\"?"));
        assert!(parse("100.64.0.300")
            .unwrap_err()
            .message
            .contains("invalid IP"));
        assert!(parse("fd7a::zz")
            .unwrap_err()
            .message
            .contains("invalid IP"));
        let err = parse("autogroup:admn").unwrap_err();
        assert_eq!(err.message, "unknown autogroup \"autogroup:admn\"");
        assert!(err.hint.unwrap().contains("autogroup:admin"));
        assert!(parse("ipset:").unwrap_err().message.contains("empty"));
        assert!(parse("svc:a b").unwrap_err().message.contains("whitespace"));
        assert!(parse("spiffe://")
            .unwrap_err()
            .message
            .contains("trust domain"));
        assert!(parse("spiffe://td")
            .unwrap_err()
            .message
            .contains("path is missing"));
        assert!(parse("spiffe://td/ns/**/sa")
            .unwrap_err()
            .message
            .contains("bad path segment \"**\""));
        assert!(parse("group:idp:").unwrap_err().message.contains("empty"));
        assert!(parse("user:bob")
            .unwrap_err()
            .message
            .contains("unknown prefix \"user:\""));
        assert!(parse("group:").unwrap_err().message.contains("empty"));
        assert!(parse("tag:a b").unwrap_err().message.contains("whitespace"));
        assert!(parse("tag:a/b")
            .unwrap_err()
            .message
            .contains("invalid tag name"));
        assert!(parse("").unwrap_err().message.contains("empty selector"));
        assert!(parse("@example.com")
            .unwrap_err()
            .message
            .contains("invalid user"));
    }

    #[test]
    fn dst_splits_at_the_last_colon() {
        assert_eq!(split_dst("tag:db:5432"), Ok(("tag:db", "5432")));
        assert_eq!(split_dst("*:*"), Ok(("*", "*")));
        assert_eq!(split_dst("db-net:1000-2000"), Ok(("db-net", "1000-2000")));
        assert_eq!(split_dst("100.64.0.0/24:22"), Ok(("100.64.0.0/24", "22")));
        assert_eq!(split_dst("[fd00::1]:80"), Ok(("fd00::1", "80")));
        assert_eq!(split_dst("fd00::/64:80,443"), Ok(("fd00::/64", "80,443")));
        assert_eq!(
            split_dst("alice@example.com:22"),
            Ok(("alice@example.com", "22"))
        );
    }

    #[test]
    fn dst_without_ports_is_explained() {
        let err = split_dst("tag:db").unwrap_err();
        assert_eq!(err.message, "dst \"tag:db\" has no ports");
        assert_eq!(
            err.hint.as_deref(),
            Some("write \"tag:db:*\" for every port, or \"tag:db:PORT\"")
        );
        assert!(split_dst("printer")
            .unwrap_err()
            .message
            .contains("no ports"));
        assert!(split_dst("fd00::1")
            .unwrap_err()
            .hint
            .unwrap()
            .contains("[fd00::1]:*"));
        assert!(split_dst("[fd00::1]")
            .unwrap_err()
            .hint
            .unwrap()
            .contains("[ADDR]:PORTS"));
    }

    proptest! {
        #[test]
        fn arbitrary_selectors_never_panic(text in "\\PC{0,24}") {
            let _ = parse(&text);
            if let Ok((selector, _)) = split_dst(&text) {
                let _ = parse(selector);
            }
        }
    }
}
