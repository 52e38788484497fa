//! From the HuJSON value tree to the policy [`ast`](crate::ast): keys, types and the syntax of every string.
//!
//! Problems are collected rather than returned at the first one, so a single
//! `weft policy check` run shows everything that needs fixing.

use std::collections::BTreeMap;

use weft_proto::{canonical, PortRange, Protocol};

use crate::ast::{
    Acl, Action, Dst, File, Grant, GroupDef, HostDef, IpsetDef, IpsetEntry, PostureDef, Spanned,
    TagOwnerDef, TestDst, TestEntry,
};
use crate::diagnostic::{suggest, Diagnostic, SourceMap, Span};
use crate::hujson::{Kind, Member, Value};
use crate::ports;
use crate::posture;
use crate::selector::{self, Autogroup, Selector, SelectorError};

mod sections;

/// Top-level keys weft understands.
const SUPPORTED_KEYS: &[&str] = &[
    "groups",
    "tagOwners",
    "hosts",
    "acls",
    "deny",
    "grants",
    "postures",
    "defaultSrcPosture",
    "mode",
    "tests",
    "ipsets",
];

/// The capitalised top-level keys of early Tailscale policy files.
const TOP_LEVEL_ALIASES: &[(&str, &str)] = &[
    ("ACLs", "acls"),
    ("Groups", "groups"),
    ("Hosts", "hosts"),
    ("TagOwners", "tagOwners"),
    ("Tests", "tests"),
];

/// Early spellings of acls entry fields: `users`/`ports` for `src`/`dst`, capitalised.
const ACL_ALIASES: &[(&str, &str)] = &[
    ("Action", "action"),
    ("users", "src"),
    ("Users", "src"),
    ("ports", "dst"),
    ("Ports", "dst"),
];

/// Early spellings of tests entry fields: `user` for `src`, `allow` for `accept`.
const TEST_ALIASES: &[(&str, &str)] = &[
    ("user", "src"),
    ("User", "src"),
    ("allow", "accept"),
    ("Allow", "accept"),
    ("Accept", "accept"),
    ("Deny", "deny"),
];

/// Top-level keys of Tailscale policy files that weft ignores with a warning.
/// None of them grants access on its own, so ignoring one never widens access.
const IGNORED_KEYS: &[&str] = &[
    "ssh",
    "sshTests",
    "nodeAttrs",
    "autoApprovers",
    "derpMap",
    "randomizeClientPort",
    "disableIPv4",
    "OneCSIDRoutes",
    "attrs",
];

/// Parses the policy structure, appending problems to `diags`.
pub(crate) fn file(root: &Value, map: &SourceMap<'_>, diags: &mut Vec<Diagnostic>) -> File {
    let mut walker = Walker {
        map,
        diags,
        member_spelling: None,
    };
    let mut file = File::default();
    let Some(members) = walker.object(
        root,
        "the policy",
        "a policy file is one object: { \"acls\": [ … ] }",
    ) else {
        return file;
    };
    let mut seen = BTreeMap::new();
    for member in members {
        let Some(key) = walker.field(member, TOP_LEVEL_ALIASES, &mut seen, "the policy") else {
            continue;
        };
        match key {
            "groups" => file.groups = walker.groups(&member.value),
            "tagOwners" => file.tag_owners = walker.tag_owners(&member.value),
            "hosts" => file.hosts = walker.hosts(&member.value),
            "acls" => file.acls.extend(walker.acls(&member.value, Action::Accept)),
            "deny" => file.acls.extend(walker.acls(&member.value, Action::Deny)),
            "grants" => file.grants = walker.grants(&member.value),
            "postures" => file.postures = walker.postures(&member.value),
            "defaultSrcPosture" => {
                file.default_src_posture = walker.posture_names(&member.value).unwrap_or_default();
            }
            "mode" => file.audit = walker.mode(&member.value).unwrap_or(false),
            "tests" => file.tests = walker.tests(&member.value),
            "ipsets" => file.ipsets = walker.ipsets(&member.value),
            _ if IGNORED_KEYS.contains(&key) => {
                walker.diags.push(map.warning(
                    member.key_span,
                    format!("\"{key}\" is not supported by weft and is ignored"),
                    Some("the rest of the policy still applies; remove the key to silence this warning".into()),
                ));
                walker.unenforced_section(key, &member.value, &mut file.references);
            }
            _ => {
                let hint = suggest(key, SUPPORTED_KEYS.iter().copied())
                    .or_else(|| suggest(key, IGNORED_KEYS.iter().copied()))
                    .map_or_else(
                        || format!("top-level keys are {}", SUPPORTED_KEYS.join(", ")),
                        |near| format!("did you mean \"{near}\"?"),
                    );
                walker.error(
                    member.key_span,
                    format!("unknown top-level key \"{key}\""),
                    hint,
                );
            }
        }
    }
    file
}

struct Walker<'m, 'd> {
    map: &'m SourceMap<'m>,
    diags: &'d mut Vec<Diagnostic>,
    /// The first spelling of `autogroup:member(s)` the file uses.
    member_spelling: Option<String>,
}

impl Walker<'_, '_> {
    fn groups(&mut self, value: &Value) -> Vec<GroupDef> {
        const SHAPE: &str = "write \"groups\": { \"group:NAME\": [\"user@example.com\", …] }";
        let Some(members) = self.object(value, "\"groups\"", SHAPE) else {
            return Vec::new();
        };
        let mut groups = Vec::new();
        for member in members {
            if selector::is_external_group(&member.key) {
                self.error(
                    member.key_span,
                    format!("\"{}\" is an identity-provider group and cannot be defined here", member.key),
                    "remove it from \"groups\": the identity provider asserts its members at login; file groups are group:NAME".into(),
                );
                continue;
            }
            let Some(name) = self.prefixed_name(member, "group") else {
                continue;
            };
            let what = format!("group \"{}\"", member.key);
            let Some(items) = self.array(&member.value, &what, SHAPE) else {
                continue;
            };
            let mut users = Vec::new();
            for item in items {
                let Some(text) = self.string(
                    item,
                    &format!("a member of {what}"),
                    "members are user logins",
                ) else {
                    continue;
                };
                match self.selector(text, item.span) {
                    Ok(Selector::User(user)) => users.push(Spanned { value: user, span: item.span }),
                    Ok(Selector::Group(_)) => self.error(
                        item.span,
                        format!("{what} contains the group \"{text}\"; groups cannot contain other groups"),
                        "list that group's users directly".into(),
                    ),
                    Ok(_) => self.error(
                        item.span,
                        format!("{what} contains \"{text}\", which is not a user"),
                        "group members are user logins such as alice@example.com".into(),
                    ),
                    Err(err) => self.selector_error(item.span, err),
                }
            }
            groups.push(GroupDef {
                name,
                members: users,
            });
        }
        groups
    }

    fn tag_owners(&mut self, value: &Value) -> Vec<TagOwnerDef> {
        const SHAPE: &str =
            "write \"tagOwners\": { \"tag:NAME\": [\"group:NAME\", \"user@example.com\", …] }";
        let mut defs = Vec::new();
        for (tag, what, items) in
            self.prefixed_lists(value, "tagOwners", "tag", "the owners of", SHAPE)
        {
            let mut owners = Vec::new();
            for item in items {
                let Some(text) = self.string(
                    item,
                    &format!("one of {what}"),
                    "owners are users, groups or tags",
                ) else {
                    continue;
                };
                match self.selector(text, item.span) {
                    Ok(owner @ (Selector::User(_) | Selector::Group(_) | Selector::Tag(_))) => {
                        owners.push(Spanned {
                            value: owner,
                            span: item.span,
                        });
                    }
                    // Who may tag is the coordinator's business, not the
                    // filter's: the role and member autogroups are accepted
                    // as written and need no definition.
                    Ok(Selector::Autogroup(Autogroup::Role(_) | Autogroup::Member)) => {}
                    Ok(_) => self.error(
                        item.span,
                        format!("\"{text}\" cannot own a tag"),
                        "tag owners are users, group:NAME, tag:NAME, autogroup:member or a role autogroup such as autogroup:admin".into(),
                    ),
                    Err(err) => self.selector_error(item.span, err),
                }
            }
            defs.push(TagOwnerDef { tag, owners });
        }
        defs
    }

    fn hosts(&mut self, value: &Value) -> Vec<HostDef> {
        const SHAPE: &str = "write \"hosts\": { \"NAME\": \"100.64.0.0/24\" }";
        let Some(members) = self.object(value, "\"hosts\"", SHAPE) else {
            return Vec::new();
        };
        let mut hosts = Vec::new();
        for member in members {
            let name = member.key.as_str();
            let name_problem = selector::check_host_name(name).err().or_else(|| {
                (selector::parse_prefix(name) != Ok(None)).then(|| SelectorError {
                    message: format!("host name \"{name}\" looks like an IP address"),
                    hint: Some(
                        "host names are words such as db-net; the address goes in the value".into(),
                    ),
                })
            });
            if let Some(err) = name_problem {
                self.selector_error(member.key_span, err);
                continue;
            }
            let Some(text) = self.string(&member.value, &format!("host \"{name}\""), SHAPE) else {
                continue;
            };
            match selector::parse_prefix(text) {
                Ok(Some(prefix)) => hosts.push(HostDef {
                    name: Spanned {
                        value: name.to_owned(),
                        span: member.key_span,
                    },
                    prefix,
                }),
                Ok(None) => self.error(
                    member.value.span,
                    format!("host \"{name}\" is \"{text}\", which is not an IP address or CIDR"),
                    "write an address like 100.64.0.1 or a CIDR like 100.64.0.0/24".into(),
                ),
                Err(err) => self.selector_error(member.value.span, err),
            }
        }
        hosts
    }

    /// The `acls` list (`list` = accept) or the `deny` list (`list` = deny).
    fn acls(&mut self, value: &Value, list: Action) -> Vec<Acl> {
        let (what, shape) = match list {
            Action::Accept => ("\"acls\"", "write \"acls\": [ { \"action\": \"accept\", \"src\": [ … ], \"dst\": [ \"SELECTOR:PORTS\" ] } ]"),
            Action::Deny => ("\"deny\"", "write \"deny\": [ { \"src\": [ … ], \"dst\": [ \"SELECTOR:PORTS\" ] } ]"),
        };
        let Some(items) = self.array(value, what, shape) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| self.acl(item, list))
            .collect()
    }

    fn acl(&mut self, value: &Value, list: Action) -> Option<Acl> {
        const FIELDS: &[&str] = &["action", "src", "dst", "proto", "srcPosture", "mode"];
        let entry = match list {
            Action::Accept => "acls entry",
            Action::Deny => "deny entry",
        };
        let members = self.object(
            value,
            &format!("an {entry}"),
            "an acls entry is { \"action\": \"accept\", \"src\": [ … ], \"dst\": [ … ] }",
        )?;
        let (mut action, mut src, mut dst, mut proto) = (None, None, None, None);
        let (mut src_posture, mut mode) = (None, None);
        let mut seen = BTreeMap::new();
        for member in members {
            let Some(field) = self.field(member, ACL_ALIASES, &mut seen, entry) else {
                continue;
            };
            match field {
                "action" => action = Some(&member.value),
                "src" => src = Some(&member.value),
                "dst" => dst = Some(&member.value),
                "proto" => proto = Some(&member.value),
                "srcPosture" => src_posture = Some(member),
                "mode" => mode = Some(&member.value),
                other => self.unknown_field(member, other, entry, FIELDS),
            }
        }
        let action = match (action, list) {
            (None, Action::Accept) => {
                self.error(
                    value.span,
                    "acls entry has no \"action\"".into(),
                    "add \"action\": \"accept\" or \"action\": \"deny\"".into(),
                );
                Action::Accept
            }
            (None, Action::Deny) => Action::Deny,
            (Some(action), _) => self.action(action, list),
        };
        let audit = mode.and_then(|m| self.mode(m)).unwrap_or(false);
        if audit && action == Action::Accept {
            self.error(
                mode.map_or(value.span, |m| m.span),
                "\"mode\": \"audit\" on an accept rule".into(),
                "mode audit applies to deny rules and to the whole file; remove it here".into(),
            );
        }
        let src_posture = match src_posture {
            Some(member) if action == Action::Deny => {
                self.error(
                    member.key_span,
                    "\"srcPosture\" on a deny rule".into(),
                    "srcPosture applies to accept rules and grants; a deny covers every posture"
                        .into(),
                );
                None
            }
            Some(member) => self.posture_names(&member.value),
            None => None,
        };
        // `None` when the proto was invalid (and reported), `Some(None)` when absent.
        let proto = match proto {
            None => Some(None),
            Some(p) => self.proto(p).map(Some),
        };
        let src = self.required_list(value, src, "src", "add \"src\": [\"group:NAME\", …]");
        let dst = self.required_list(value, dst, "dst", "add \"dst\": [\"tag:NAME:PORTS\", …]");
        let src: Vec<_> = src
            .iter()
            .filter_map(|item| self.src_selector(item))
            .collect();
        let dst: Vec<_> = dst
            .iter()
            .filter_map(|item| self.dst(item, proto))
            .collect();
        // An entry with errors is still resolved, so its names get checked
        // too; the errors already reported keep the policy from loading.
        Some(Acl {
            span: value.span,
            action,
            audit,
            src_posture,
            src,
            dst,
            proto: proto.flatten(),
        })
    }

    fn action(&mut self, value: &Value, list: Action) -> Action {
        let hint = "write \"action\": \"accept\" or \"action\": \"deny\"";
        let Some(text) = self.string(value, "\"action\"", hint) else {
            return list;
        };
        match (text, list) {
            ("accept", Action::Accept) => Action::Accept,
            ("deny", _) => Action::Deny,
            ("accept", Action::Deny) => {
                self.error(
                    value.span,
                    "an entry of the \"deny\" list has \"action\": \"accept\"".into(),
                    "move it to \"acls\", or remove the action".into(),
                );
                Action::Deny
            }
            _ => {
                let hint = suggest(text, ["accept", "deny"]).map_or_else(
                    || {
                        "actions are \"accept\" and \"deny\"; anything not accepted is denied"
                            .into()
                    },
                    |near| format!("did you mean \"{near}\"?"),
                );
                self.error(value.span, format!("invalid action \"{text}\""), hint);
                list
            }
        }
    }

    /// `"mode"`: `Some(true)` for audit, `Some(false)` for enforce, `None` after an error.
    fn mode(&mut self, value: &Value) -> Option<bool> {
        let hint =
            "write \"mode\": \"audit\" (log would-be denials, enforce nothing) or \"enforce\"";
        match self.string(value, "\"mode\"", hint)? {
            "audit" => Some(true),
            "enforce" => Some(false),
            other => {
                self.error(value.span, format!("invalid mode \"{other}\""), hint.into());
                None
            }
        }
    }

    /// A list of `posture:NAME` references (`srcPosture`, `defaultSrcPosture`).
    fn posture_names(&mut self, value: &Value) -> Option<Vec<Spanned<String>>> {
        let hint = "write [\"posture:NAME\", …] naming entries of \"postures\"";
        let items = self.array(value, "a posture list", hint)?;
        let mut names = Vec::new();
        for item in items {
            let Some(text) = self.string(item, "a posture name", hint) else {
                continue;
            };
            if text.strip_prefix("posture:").is_some_and(|n| !n.is_empty()) {
                names.push(Spanned {
                    value: text.to_owned(),
                    span: item.span,
                });
            } else {
                self.error(
                    item.span,
                    format!("posture name \"{text}\" must start with \"posture:\""),
                    format!("write \"posture:{text}\""),
                );
            }
        }
        Some(names)
    }

    fn postures(&mut self, value: &Value) -> Vec<PostureDef> {
        const SHAPE: &str =
            "write \"postures\": { \"posture:NAME\": [\"node:os IN ['linux']\", …] }";
        let mut defs = Vec::new();
        let mut uncollected = Vec::new();
        for (name, what, items) in
            self.prefixed_lists(value, "postures", "posture", "posture", SHAPE)
        {
            let mut conditions = Vec::new();
            for item in items {
                let Some(text) = self.string(item, &format!("a condition of {what}"), SHAPE) else {
                    continue;
                };
                match posture::parse_condition(text) {
                    Ok(condition) => {
                        if !condition.collected() && !uncollected.contains(&condition.attribute) {
                            uncollected.push(condition.attribute.clone());
                            self.diags.push(self.map.warning(
                                item.span,
                                format!("posture attribute \"{}\" is not collected by weft: it is absent on every node, so conditions on it never hold", condition.attribute),
                                Some("rules needing this posture admit no node; remove the condition, or use an attribute weft nodes report (node:os, node:osVersion, node:clientVersion, node:hostname, node:diskEncrypted, custom:KEY)".into()),
                            ));
                        }
                        conditions.push(condition);
                    }
                    Err(err) => self.error(item.span, err.message, err.hint),
                }
            }
            defs.push(PostureDef { name, conditions });
        }
        defs
    }

    fn grants(&mut self, value: &Value) -> Vec<Grant> {
        const SHAPE: &str =
            "write \"grants\": [ { \"src\": [ … ], \"dst\": [ … ], \"ip\": [\"tcp:443\"] } ]";
        let Some(items) = self.array(value, "\"grants\"", SHAPE) else {
            return Vec::new();
        };
        items.iter().filter_map(|item| self.grant(item)).collect()
    }

    fn grant(&mut self, value: &Value) -> Option<Grant> {
        const FIELDS: &[&str] = &["src", "dst", "ip", "app", "srcPosture", "via"];
        let members = self.object(
            value,
            "a grants entry",
            "a grants entry is { \"src\": [ … ], \"dst\": [ … ], \"ip\": [ … ], \"app\": { … } }",
        )?;
        let (mut src, mut dst, mut ip, mut app, mut src_posture) = (None, None, None, None, None);
        let mut via = Vec::new();
        for member in members {
            match member.key.as_str() {
                "src" => src = Some(&member.value),
                "dst" => dst = Some(&member.value),
                "ip" => ip = Some(&member.value),
                "app" => app = Some(&member.value),
                "srcPosture" => src_posture = self.posture_names(&member.value),
                "via" => via = self.via(&member.value),
                other => self.unknown_field(member, other, "grants entry", FIELDS),
            }
        }
        if ip.is_none() && app.is_none() {
            self.error(
                value.span,
                "grants entry has neither \"ip\" nor \"app\"".into(),
                "add \"ip\": [\"tcp:443\"] for network access, or \"app\": { … } for capabilities"
                    .into(),
            );
        }
        let src = self.required_list(value, src, "src", "add \"src\": [\"group:NAME\", …]");
        let dst = self.required_list(value, dst, "dst", "add \"dst\": [\"tag:NAME\", …]");
        let src = src
            .iter()
            .filter_map(|item| self.src_selector(item))
            .collect();
        let dst = dst
            .iter()
            .filter_map(|item| {
                if let Ok((_, ports)) = selector::split_dst(self.text_of(item)) {
                    if ports::parse_ports(ports).is_ok() {
                        self.error(
                            item.span,
                            format!("grant dst \"{}\" names ports", self.text_of(item)),
                            "grant destinations have no ports; put them in \"ip\", e.g. \"ip\": [\"tcp:443\"]".into(),
                        );
                        return None;
                    }
                }
                self.src_selector(item)
            })
            .collect();
        let ip = ip.map(|list| self.grant_ip(list)).unwrap_or_default();
        let app = app.map(|caps| self.grant_app(caps)).unwrap_or_default();
        Some(Grant {
            span: value.span,
            src,
            dst,
            ip,
            app,
            src_posture,
            via,
        })
    }

    /// `via`: the tags of the subnet routers or exit nodes to route through.
    fn via(&mut self, value: &Value) -> Vec<Spanned<Selector>> {
        const HINT: &str = "write \"via\": [\"tag:NAME\", …] naming subnet routers or exit nodes";
        let Some(items) = self.array(value, "\"via\"", HINT) else {
            return Vec::new();
        };
        if items.is_empty() {
            self.error(value.span, "\"via\" is empty".into(), HINT.into());
        }
        let mut routers = Vec::new();
        for item in items {
            let Some(text) = self.string(item, "a \"via\" entry", HINT) else {
                continue;
            };
            match self.selector(text, item.span) {
                Ok(tag @ Selector::Tag(_)) => routers.push(Spanned {
                    value: tag,
                    span: item.span,
                }),
                Ok(_) => self.error(
                    item.span,
                    format!("\"via\" entry \"{text}\" is not a tag"),
                    HINT.into(),
                ),
                Err(err) => self.selector_error(item.span, err),
            }
        }
        routers
    }

    fn ipsets(&mut self, value: &Value) -> Vec<IpsetDef> {
        const SHAPE: &str = "write \"ipsets\": { \"ipset:NAME\": [\"10.0.0.0/8\", \"add HOST\", \"remove 10.0.5.0/24\", \"add ipset:OTHER\"] }";
        let mut defs = Vec::new();
        for (name, what, items) in self.prefixed_lists(value, "ipsets", "ipset", "ipset", SHAPE) {
            let mut entries = Vec::new();
            for item in items {
                let Some(text) = self.string(item, &format!("an entry of {what}"), SHAPE) else {
                    continue;
                };
                if let Some(entry) = self.ipset_entry(text, item.span) {
                    entries.push(Spanned {
                        value: entry,
                        span: item.span,
                    });
                }
            }
            defs.push(IpsetDef { name, entries });
        }
        defs
    }

    /// `ITEM`, `add ITEM` or `remove ITEM`, where ITEM is an IP, CIDR, host
    /// (also written `host:NAME`), `ipset:NAME` or `autogroup:internet`.
    fn ipset_entry(&mut self, text: &str, span: Span) -> Option<IpsetEntry> {
        let (remove, item) = match text.split_once(' ') {
            Some(("add", item)) => (false, item.trim()),
            Some(("remove", item)) => (true, item.trim()),
            Some((op, _)) => {
                self.error(
                    span,
                    format!("invalid ipset operation \"{op}\" in \"{text}\""),
                    "ipset entries are ITEM, \"add ITEM\" or \"remove ITEM\"".into(),
                );
                return None;
            }
            None => (false, text),
        };
        let item = item.strip_prefix("host:").unwrap_or(item);
        match self.selector(item, span) {
            Ok(
                selector @ (Selector::Prefix(_)
                | Selector::Host(_)
                | Selector::Ipset(_)
                | Selector::Autogroup(Autogroup::Internet)),
            ) => Some(IpsetEntry { remove, selector }),
            Ok(_) => {
                self.error(
                    span,
                    format!("ipset entry \"{text}\" is not an address"),
                    "ipsets hold IPs, CIDRs, hosts, other ipsets and autogroup:internet, not users, groups or tags".into(),
                );
                None
            }
            Err(err) => {
                self.selector_error(span, err);
                None
            }
        }
    }

    fn text_of<'v>(&self, value: &'v Value) -> &'v str {
        match &value.kind {
            Kind::String(text) => text,
            _ => "",
        }
    }

    /// `ip`: `"*"`, `"PORTS"` or `"PROTO:PORTS"`.
    fn grant_ip(&mut self, value: &Value) -> Vec<(Option<Protocol>, Vec<PortRange>)> {
        const HINT: &str = "ip entries are \"*\", \"PORTS\" or \"PROTO:PORTS\", e.g. \"tcp:443\", \"udp:53\", \"icmp:*\"";
        let Some(items) = self.array(value, "\"ip\"", HINT) else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for item in items {
            let Some(text) = self.string(item, "an \"ip\" entry", HINT) else {
                continue;
            };
            let (proto, port_text) = match text.split_once(':') {
                Some((proto, ports)) => match ports::parse_proto(proto) {
                    Ok(protocol) => (Some(protocol), ports),
                    Err(err) => {
                        self.error(item.span, err.message, err.hint);
                        continue;
                    }
                },
                None => (None, text),
            };
            match ports::parse_ports(port_text) {
                Ok(ranges) => {
                    if let Some(protocol) = proto {
                        if !ports::has_ports(protocol) && ranges != [PortRange::ANY] {
                            self.error(
                                item.span,
                                format!(
                                    "proto \"{}\" has no ports, but \"{text}\" names some",
                                    ports::proto_name(protocol)
                                ),
                                format!("write \"{}:*\"", ports::proto_name(protocol)),
                            );
                            continue;
                        }
                    }
                    entries.push((proto, ranges));
                }
                Err(err) => self.error(item.span, err.message, err.hint),
            }
        }
        entries
    }

    /// `app`: `{ "NAME": [JSON, …] }`.
    fn grant_app(&mut self, value: &Value) -> Vec<(String, Vec<String>)> {
        const HINT: &str = "write \"app\": { \"example.com/cap/NAME\": [ { …JSON… } ] }";
        let Some(members) = self.object(value, "\"app\"", HINT) else {
            return Vec::new();
        };
        let mut caps = Vec::new();
        for member in members {
            if member.key.is_empty() || member.key.chars().any(char::is_whitespace) {
                self.error(
                    member.key_span,
                    format!("invalid capability name \"{}\"", member.key),
                    "capability names look like example.com/cap/NAME".into(),
                );
                continue;
            }
            let what = format!("capability \"{}\"", member.key);
            let Some(values) = self.array(&member.value, &what, HINT) else {
                continue;
            };
            caps.push((
                member.key.clone(),
                values.iter().map(|v| v.to_json().to_string()).collect(),
            ));
        }
        caps
    }

    /// `None` means an error was reported.
    fn proto(&mut self, value: &Value) -> Option<Protocol> {
        let text = match &value.kind {
            Kind::String(text) => text.as_str(),
            Kind::Number(text) => text.as_str(),
            other => {
                self.error(
                    value.span,
                    format!(
                        "\"proto\" must be a string or a number, found {}",
                        other.describe()
                    ),
                    "write \"proto\": \"tcp\", \"udp\", \"icmp\" or an IANA protocol number".into(),
                );
                return None;
            }
        };
        match ports::parse_proto(text) {
            Ok(protocol) => Some(protocol),
            Err(err) => {
                self.error(value.span, err.message, err.hint);
                None
            }
        }
    }

    fn src_selector(&mut self, item: &Value) -> Option<Spanned<Selector>> {
        let text = self.string(
            item,
            "a \"src\" entry",
            "src entries are selectors such as \"group:eng\"",
        )?;
        match self.selector(text, item.span) {
            Ok(value) => Some(Spanned {
                value,
                span: item.span,
            }),
            Err(err) => {
                self.selector_error(item.span, err);
                None
            }
        }
    }

    /// `proto` is `None` when the rule's proto was invalid (then port checks against it are skipped).
    fn dst(&mut self, item: &Value, proto: Option<Option<Protocol>>) -> Option<Spanned<Dst>> {
        let text = self.string(
            item,
            "a \"dst\" entry",
            "dst entries are SELECTOR:PORTS, e.g. \"tag:db:5432\"",
        )?;
        let parsed = selector::split_dst(text)
            .and_then(|(sel, ports)| Ok((self.selector(sel, item.span)?, ports)));
        let (selector, port_text) = match parsed {
            Ok(parsed) => parsed,
            Err(err) => {
                self.selector_error(item.span, err);
                return None;
            }
        };
        let ports = match ports::parse_ports(port_text) {
            Ok(ports) => ports,
            Err(err) => {
                self.error(item.span, err.message, err.hint);
                return None;
            }
        };
        if let Some(Some(protocol)) = proto {
            if !ports::has_ports(protocol) && ports != [PortRange::ANY] {
                let (sel, _) = text.rsplit_once(':').unwrap_or((text, ""));
                self.error(
                    item.span,
                    format!(
                        "proto \"{}\" has no ports, but dst \"{text}\" names some",
                        ports::proto_name(protocol)
                    ),
                    format!("write \"{sel}:*\""),
                );
                return None;
            }
        }
        Some(Spanned {
            value: Dst { selector, ports },
            span: item.span,
        })
    }

    fn tests(&mut self, value: &Value) -> Vec<TestEntry> {
        const SHAPE: &str = "write \"tests\": [ { \"src\": \"tag:web\", \"accept\": [\"tag:db:5432\"], \"deny\": [\"tag:db:22\"] } ]";
        let Some(items) = self.array(value, "\"tests\"", SHAPE) else {
            return Vec::new();
        };
        items.iter().filter_map(|item| self.test(item)).collect()
    }

    fn test(&mut self, value: &Value) -> Option<TestEntry> {
        const FIELDS: &[&str] = &["src", "accept", "deny", "proto", "srcPostureAttrs"];
        let members = self.object(
            value,
            "a tests entry",
            "a tests entry is { \"src\": …, \"accept\": [ … ], \"deny\": [ … ] }",
        )?;
        let (mut src, mut accept, mut deny, mut proto) = (None, None, None, None);
        let mut src_posture_attrs = None;
        let mut seen = BTreeMap::new();
        for member in members {
            let Some(field) = self.field(member, TEST_ALIASES, &mut seen, "tests entry") else {
                continue;
            };
            match field {
                "src" => src = Some(&member.value),
                "accept" => accept = Some(&member.value),
                "deny" => deny = Some(&member.value),
                "proto" => proto = Some(&member.value),
                "srcPostureAttrs" => src_posture_attrs = self.attributes(&member.value),
                other => self.unknown_field(member, other, "tests entry", FIELDS),
            }
        }
        let proto = match proto {
            Some(p) => Some(self.proto(p)?),
            None => None,
        };
        if accept.is_none() && deny.is_none() {
            self.error(
                value.span,
                "tests entry has no \"accept\" or \"deny\"".into(),
                "list what src should reach in \"accept\" and what it must not in \"deny\"".into(),
            );
        }
        let Some(src_value) = src else {
            self.error(
                value.span,
                "tests entry has no \"src\"".into(),
                "add \"src\": \"tag:NAME\" (or a user, group, host or IP)".into(),
            );
            return None;
        };
        let src_text = self.string(
            src_value,
            "a test's \"src\"",
            "write one principal, e.g. \"src\": \"tag:web\"",
        )?;
        let src = self.principal(src_text, src_value.span)?;
        let accept = self.test_dsts(accept, "accept");
        let deny = self.test_dsts(deny, "deny");
        Some(TestEntry {
            span: value.span,
            src: Spanned {
                value: src,
                span: src_value.span,
            },
            src_text: src_text.to_owned(),
            proto,
            accept,
            deny,
            src_posture_attrs,
        })
    }

    /// `srcPostureAttrs`: `{ "node:os": "linux", … }`; non-string values are written as JSON.
    fn attributes(&mut self, value: &Value) -> Option<BTreeMap<String, String>> {
        let members = self.object(
            value,
            "\"srcPostureAttrs\"",
            "write \"srcPostureAttrs\": { \"node:os\": \"linux\", … }",
        )?;
        Some(
            members
                .iter()
                .map(|m| {
                    let value = match &m.value.kind {
                        Kind::String(text) => text.clone(),
                        _ => m.value.to_json().to_string(),
                    };
                    (posture::canonical_key(&m.key).to_owned(), value)
                })
                .collect(),
        )
    }

    fn test_dsts(&mut self, list: Option<&Value>, key: &str) -> Vec<Spanned<TestDst>> {
        let Some(list) = list else {
            return Vec::new();
        };
        let shape = format!("write \"{key}\": [\"tag:db:5432\", …]");
        let Some(items) = self.array(list, &format!("\"{key}\""), &shape) else {
            return Vec::new();
        };
        let mut dsts = Vec::new();
        for item in items {
            let Some(text) = self.string(item, &format!("a \"{key}\" entry"), &shape) else {
                continue;
            };
            let (sel, port) = match selector::split_dst(text) {
                Ok(split) => split,
                Err(err) => {
                    self.selector_error(item.span, err);
                    continue;
                }
            };
            let Some(selector) = self.principal(sel, item.span) else {
                continue;
            };
            match ports::parse_single_port(port) {
                Ok(port) => dsts.push(Spanned {
                    value: TestDst {
                        text: text.to_owned(),
                        selector,
                        port,
                    },
                    span: item.span,
                }),
                Err(err) => self.error(item.span, err.message, err.hint),
            }
        }
        dsts
    }

    /// A test's src or dst: one concrete principal, not `*`.
    fn principal(&mut self, text: &str, span: Span) -> Option<Selector> {
        match self.selector(text, span) {
            Ok(Selector::Any) => {
                self.error(
                    span,
                    "tests need a concrete principal, not \"*\"".into(),
                    "name a user, group, tag, host or IP".into(),
                );
                None
            }
            Ok(role @ Selector::Autogroup(Autogroup::Role(_))) => Some(role),
            Ok(Selector::Autogroup(group)) => {
                self.error(
                    span,
                    format!("tests need a concrete principal, not \"{}\"", group.name()),
                    "name a user, group, tag, SPIFFE ID, host or IP".into(),
                );
                None
            }
            Ok(Selector::Ipset(name) | Selector::Service(name)) => {
                self.error(
                    span,
                    format!("tests need a concrete principal, not \"{name}\""),
                    "name a user, group, tag, SPIFFE ID, host or IP".into(),
                );
                None
            }
            Ok(selector) => Some(selector),
            Err(err) => {
                self.selector_error(span, err);
                None
            }
        }
    }

    fn required_list<'v>(
        &mut self,
        entry: &Value,
        list: Option<&'v Value>,
        key: &str,
        hint: &str,
    ) -> &'v [Value] {
        let Some(list) = list else {
            self.error(
                entry.span,
                format!("acls entry has no \"{key}\""),
                hint.into(),
            );
            return &[];
        };
        let Some(items) = self.array(list, &format!("\"{key}\""), hint) else {
            return &[];
        };
        if items.is_empty() {
            self.error(
                list.span,
                format!("\"{key}\" is empty, so the rule can never match"),
                format!("{hint}, or remove the rule"),
            );
        }
        items
    }

    /// Parses a selector, warning when it is not written in the canonical
    /// form it is compared in.
    fn selector(&mut self, text: &str, span: Span) -> Result<Selector, SelectorError> {
        let selector = selector::parse(text)?;
        if let Some(canonical) = selector::canonical_spelling(text, &selector) {
            self.non_canonical(span, text, canonical);
        }
        if selector == Selector::Autogroup(Autogroup::Member) {
            match &self.member_spelling {
                None => self.member_spelling = Some(text.to_owned()),
                Some(first) if first != text => {
                    // Tailscale refuses a file that mixes the two.
                    return Err(SelectorError {
                        message: format!("\"{text}\" in a file that also writes \"{first}\""),
                        hint: Some("autogroup:members is the older spelling of autogroup:member; write autogroup:member everywhere".into()),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(selector)
    }

    fn non_canonical(&mut self, span: Span, text: &str, canonical: &str) {
        self.diags.push(self.map.warning(
            span,
            format!("\"{text}\" is compared as \"{canonical}\": emails, tags and SPIFFE trust domains are case-insensitive"),
            Some(format!("write \"{canonical}\"")),
        ));
    }

    /// The entries of a `{ "KIND:NAME": [ … ] }` section (`tagOwners`,
    /// `postures`, `ipsets`) whose names carry their prefix and whose values
    /// are lists: the checked name, how to name the entry in messages
    /// (`LABEL "KEY"`) and the list.
    fn prefixed_lists<'v>(
        &mut self,
        value: &'v Value,
        section: &str,
        kind: &str,
        label: &str,
        shape: &str,
    ) -> Vec<(Spanned<String>, String, &'v [Value])> {
        let Some(members) = self.object(value, &format!("\"{section}\""), shape) else {
            return Vec::new();
        };
        let mut lists = Vec::new();
        for member in members {
            let Some(name) = self.prefixed_name(member, kind) else {
                continue;
            };
            let what = format!("{label} \"{}\"", member.key);
            if let Some(items) = self.array(&member.value, &what, shape) {
                lists.push((name, what, items));
            }
        }
        lists
    }

    /// Checks that a `groups`/`tagOwners` key carries its prefix.
    fn prefixed_name(&mut self, member: &Member, kind: &str) -> Option<Spanned<String>> {
        let key = member.key.as_str();
        let prefix = format!("{kind}:");
        let Some(name) = key.strip_prefix(&prefix) else {
            self.error(
                member.key_span,
                format!("{kind} name \"{key}\" must start with \"{prefix}\""),
                format!("write \"{prefix}{key}\""),
            );
            return None;
        };
        if let Err(err) = selector::check_name(kind, name, key) {
            self.selector_error(member.key_span, err);
            return None;
        }
        let value = if kind == "tag" {
            let canonical = canonical::tag(key);
            if canonical != key {
                self.non_canonical(member.key_span, key, &canonical);
            }
            canonical.into_owned()
        } else {
            key.to_owned()
        };
        Some(Spanned {
            value,
            span: member.key_span,
        })
    }

    /// The field `member` sets, with early Tailscale spellings (`aliases`)
    /// mapped to the current one; `None`, with an error, when `seen` shows
    /// the object already set that field under another spelling.
    fn field<'k>(
        &mut self,
        member: &'k Member,
        aliases: &[(&str, &'k str)],
        seen: &mut BTreeMap<&'k str, &'k str>,
        entry: &str,
    ) -> Option<&'k str> {
        let written = member.key.as_str();
        let field = aliases
            .iter()
            .find(|(alias, _)| *alias == written)
            .map_or(written, |(_, field)| *field);
        if let Some(first) = seen.insert(field, written) {
            self.error(
                member.key_span,
                format!("{entry} has both \"{first}\" and \"{written}\""),
                format!("\"{first}\" and \"{written}\" are two spellings of \"{field}\"; keep one"),
            );
            return None;
        }
        Some(field)
    }

    fn unknown_field(&mut self, member: &Member, key: &str, entry: &str, fields: &[&str]) {
        let hint = suggest(key, fields.iter().copied()).map_or_else(
            || format!("an {entry} has the keys {}", fields.join(", ")),
            |near| format!("did you mean \"{near}\"?"),
        );
        self.error(
            member.key_span,
            format!("unknown key \"{key}\" in {entry}"),
            hint,
        );
    }

    fn object<'v>(&mut self, value: &'v Value, what: &str, hint: &str) -> Option<&'v [Member]> {
        match &value.kind {
            Kind::Object(members) => Some(members),
            other => {
                self.type_error(value, what, "an object", other, hint);
                None
            }
        }
    }

    fn array<'v>(&mut self, value: &'v Value, what: &str, hint: &str) -> Option<&'v [Value]> {
        match &value.kind {
            Kind::Array(items) => Some(items),
            other => {
                self.type_error(value, what, "an array", other, hint);
                None
            }
        }
    }

    fn string<'v>(&mut self, value: &'v Value, what: &str, hint: &str) -> Option<&'v str> {
        match &value.kind {
            Kind::String(text) => Some(text),
            other => {
                self.type_error(value, what, "a string", other, hint);
                None
            }
        }
    }

    fn type_error(&mut self, value: &Value, what: &str, expected: &str, found: &Kind, hint: &str) {
        self.error(
            value.span,
            format!("{what} must be {expected}, found {}", found.describe()),
            hint.into(),
        );
    }

    fn selector_error(&mut self, span: Span, err: SelectorError) {
        self.diags.push(self.map.error(span, err.message, err.hint));
    }

    fn error(&mut self, span: Span, message: String, hint: String) {
        self.diags.push(self.map.error(span, message, Some(hint)));
    }
}

#[cfg(test)]
mod tests {
    use crate::{Diagnostic, Policy, Severity};

    /// The single error of `source`, as (line, column, message, hint).
    fn error(source: &str) -> (u32, u32, String, String) {
        let diags = Policy::parse(source, "p.hujson").unwrap_err().0;
        let errors: Vec<&Diagnostic> = diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .collect();
        assert_eq!(errors.len(), 1, "expected one error, got {diags:#?}");
        let d = errors[0];
        (
            d.line,
            d.column,
            d.message.clone(),
            d.hint.clone().unwrap_or_default(),
        )
    }

    fn acl(rule: &str) -> String {
        format!(
            "{{\n  \"tagOwners\": {{\"tag:web\": [], \"tag:db\": []}},\n  \"acls\": [\n    {rule},\n  ],\n}}"
        )
    }

    #[test]
    fn unknown_top_level_key_suggests_the_near_miss() {
        let (line, col, message, hint) = error("{\n  \"acl\": []\n}");
        assert_eq!((line, col), (2, 3));
        assert_eq!(message, "unknown top-level key \"acl\"");
        assert_eq!(hint, "did you mean \"acls\"?");
        let (_, _, message, hint) = error("{\"tagowners\": {}}");
        assert_eq!(message, "unknown top-level key \"tagowners\"");
        assert_eq!(hint, "did you mean \"tagOwners\"?");
        let (_, _, _, hint) = error("{\"whatever\": {}}");
        assert_eq!(
            hint,
            "top-level keys are groups, tagOwners, hosts, acls, deny, grants, postures, defaultSrcPosture, mode, tests, ipsets"
        );
    }

    #[test]
    fn tailscale_only_keys_warn_and_load() {
        let source = "{\n  \"ssh\": [],\n  \"nodeAttrs\": [],\n  \"acls\": [],\n  \"randomizeClientPort\": true,\n}";
        let policy = Policy::parse(source, "p.hujson").unwrap();
        let warnings: Vec<(u32, &str)> = policy
            .warnings()
            .iter()
            .map(|w| (w.line, w.message.as_str()))
            .collect();
        assert_eq!(
            warnings,
            [
                (2, "\"ssh\" is not supported by weft and is ignored"),
                (3, "\"nodeAttrs\" is not supported by weft and is ignored"),
                (
                    5,
                    "\"randomizeClientPort\" is not supported by weft and is ignored"
                ),
            ]
        );
        assert!(policy
            .warnings()
            .iter()
            .all(|w| w.severity == Severity::Warning));
    }

    #[test]
    fn identifiers_in_another_case_warn_and_load_canonical() {
        let source = r#"{
  "groups": {"group:eng": ["Alice@Example.com"]},
  "tagOwners": {"tag:Web": ["group:eng"]},
  "acls": [
    {"action": "deny", "src": ["Mallory@Example.COM"], "dst": ["tag:web:*"]},
    {"action": "accept", "src": ["SPIFFE://Prod.Example.com/ns/Shop/sa/api"], "dst": ["TAG:web:443"]},
  ],
}"#;
        let diags = Policy::parse(source, "p.hujson").unwrap_err();
        assert_eq!(
            diags
                .0
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count(),
            1,
            "only the unknown prefix TAG: is an error: {diags:?}"
        );
        let source = source.replace("TAG:web", "tag:web");
        let policy = Policy::parse(&source, "p.hujson").unwrap();
        let warnings: Vec<(u32, &str)> = policy
            .warnings()
            .iter()
            .map(|w| (w.line, w.message.as_str()))
            .collect();
        assert_eq!(
            warnings,
            [
                (2, "\"Alice@Example.com\" is compared as \"alice@example.com\": emails, tags and SPIFFE trust domains are case-insensitive"),
                (3, "\"tag:Web\" is compared as \"tag:web\": emails, tags and SPIFFE trust domains are case-insensitive"),
                (5, "\"Mallory@Example.COM\" is compared as \"mallory@example.com\": emails, tags and SPIFFE trust domains are case-insensitive"),
                (6, "\"SPIFFE://Prod.Example.com/ns/Shop/sa/api\" is compared as \"spiffe://prod.example.com/ns/Shop/sa/api\": emails, tags and SPIFFE trust domains are case-insensitive"),
            ]
        );
        assert_eq!(
            policy.warnings()[0].hint.as_deref(),
            Some("write \"alice@example.com\"")
        );
    }

    #[test]
    fn wrong_json_types() {
        let (line, col, message, _) = error("{\n  \"groups\": []\n}");
        assert_eq!(
            (line, col, message.as_str()),
            (2, 13, "\"groups\" must be an object, found an array")
        );
        let (_, _, message, _) = error("[]");
        assert_eq!(message, "the policy must be an object, found an array");
        let (line, col, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": \"tag:web\", \"dst\": [\"tag:db:*\"]}",
        ));
        assert_eq!(
            (line, col, message.as_str()),
            (4, 33, "\"src\" must be an array, found a string")
        );
        let (_, _, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [1], \"dst\": [\"tag:db:*\"]}",
        ));
        assert_eq!(message, "a \"src\" entry must be a string, found a number");
        let (_, _, message, _) = error("{\"groups\": {\"group:a\": [\"a@x\", null]}}");
        assert_eq!(
            message,
            "a member of group \"group:a\" must be a string, found null"
        );
        let (_, _, message, _) = error("{\"hosts\": {\"h\": 3}}");
        assert_eq!(message, "host \"h\" must be a string, found a number");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let (line, col, message, _) = error("{\n  \"acls\": [],\n  \"acls\": []\n}");
        assert_eq!(
            (line, col, message.as_str()),
            (3, 3, "duplicate key \"acls\"")
        );
        let (line, col, message, _) = error("{\"groups\": {\"group:a\": [], \n\"group:a\": []}}");
        assert_eq!(
            (line, col, message.as_str()),
            (2, 1, "duplicate key \"group:a\"")
        );
    }

    #[test]
    fn syntax_errors_name_the_offending_character() {
        let (line, col, message, _) =
            error("{\n  \"acls\": [\n    {\"action\" \"accept\"}\n  ]\n}");
        assert_eq!((line, col), (3, 15));
        assert_eq!(message, "expected ':' after key \"action\", found '\"'");
    }

    #[test]
    fn group_and_tag_names_need_their_prefix() {
        let (line, col, message, hint) = error("{\n  \"groups\": {\"eng\": [\"a@x\"]}\n}");
        assert_eq!((line, col), (2, 14));
        assert_eq!(message, "group name \"eng\" must start with \"group:\"");
        assert_eq!(hint, "write \"group:eng\"");
        let (line, col, message, hint) = error("{\n  \"tagOwners\": {\n    \"web\": []\n  }\n}");
        assert_eq!((line, col), (3, 5));
        assert_eq!(message, "tag name \"web\" must start with \"tag:\"");
        assert_eq!(hint, "write \"tag:web\"");
    }

    #[test]
    fn group_members_are_users() {
        let (_, _, message, _) =
            error("{\"groups\": {\"group:a\": [\"a@x\"], \"group:b\": [\"group:a\"]}}");
        assert_eq!(
            message,
            "group \"group:b\" contains the group \"group:a\"; groups cannot contain other groups"
        );
        let (_, _, message, _) =
            error("{\"tagOwners\": {\"tag:t\": []}, \"groups\": {\"group:b\": [\"tag:t\"]}}");
        assert_eq!(
            message,
            "group \"group:b\" contains \"tag:t\", which is not a user"
        );
    }

    #[test]
    fn actions_modes_and_deny_lists() {
        let (line, col, message, hint) = error(&acl(
            "{\"action\": \"drop\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!((line, col), (4, 16));
        assert_eq!(message, "invalid action \"drop\"");
        assert!(
            hint.starts_with("actions are \"accept\" and \"deny\""),
            "{hint}"
        );
        let (_, _, _, hint) = error(&acl(
            "{\"action\": \"deni\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!(hint, "did you mean \"deny\"?");
        let (line, col, message) = {
            let (l, c, m, _) = error(&acl("{\"src\": [\"*\"], \"dst\": [\"*:*\"]}"));
            (l, c, m)
        };
        assert_eq!(
            (line, col, message.as_str()),
            (4, 5, "acls entry has no \"action\"")
        );
        let (_, _, message, hint) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"mode\": \"audit\"}",
        ));
        assert_eq!(message, "\"mode\": \"audit\" on an accept rule");
        assert_eq!(
            hint,
            "mode audit applies to deny rules and to the whole file; remove it here"
        );
        let (_, _, message, _) = error(&acl(
            "{\"action\": \"deny\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"mode\": \"log\"}",
        ));
        assert_eq!(message, "invalid mode \"log\"");
        let (_, _, message, _) =
            error("{\"deny\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}");
        assert_eq!(
            message,
            "an entry of the \"deny\" list has \"action\": \"accept\""
        );
        let (_, _, message, _) = error("{\"mode\": \"strict\"}");
        assert_eq!(message, "invalid mode \"strict\"");
        let policy = Policy::parse(
            "{\"mode\": \"audit\", \"deny\": [{\"src\": [\"*\"], \"dst\": [\"*:22\"]}], \"acls\": [{\"action\": \"deny\", \"src\": [\"*\"], \"dst\": [\"*:23\"]}]}",
            "p",
        )
        .unwrap();
        assert!(policy.audit_mode());
        assert_eq!(policy.rules.rules.len(), 2);
        assert!(policy
            .rules
            .rules
            .iter()
            .all(|r| r.action == weft_proto::RuleAction::AuditDeny));
    }

    #[test]
    fn grants_and_postures() {
        let source = r#"{
  "tagOwners": {"tag:db": []},
  "postures": {"posture:ok": ["node:os IN ['linux']", "node:clientVersion >= '1.2'"]},
  "defaultSrcPosture": ["posture:ok"],
  "grants": [
    {"src": ["group:idp:eng"], "dst": ["tag:db"], "ip": ["tcp:5432", "icmp:*", "53"],
     "app": {"x.com/cap/db": [{"role": "ro", "n": 1}, "plain"]}},
  ],
}"#;
        let policy = Policy::parse(source, "p").unwrap();
        let rules = &policy.rules.rules;
        assert_eq!(rules.len(), 3);
        assert!(rules
            .iter()
            .all(|r| r.line == 6 && r.posture.as_ref().is_some_and(|p| p.len() == 1)));
        assert_eq!(rules[1].protocols, [weft_proto::Protocol::Icmp]);
        assert!(rules[2].protocols.is_empty());
        assert_eq!(policy.rules.apps.len(), 1);
        assert_eq!(
            policy.rules.apps[0].caps,
            [(
                "x.com/cap/db".to_owned(),
                vec![
                    "{\"n\":1,\"role\":\"ro\"}".to_owned(),
                    "\"plain\"".to_owned()
                ]
            )]
        );
        let grant = |g: &str| format!("{{\"tagOwners\": {{\"tag:db\": []}}, \"grants\": [{g}]}}");
        let (_, _, message, hint) = error(&grant(
            r#"{"src": ["*"], "dst": ["tag:db:5432"], "ip": ["*"]}"#,
        ));
        assert_eq!(message, "grant dst \"tag:db:5432\" names ports");
        assert!(hint.contains("\"ip\""), "{hint}");
        let (_, _, message, _) = error(&grant(r#"{"src": ["*"], "dst": ["tag:db"]}"#));
        assert_eq!(message, "grants entry has neither \"ip\" nor \"app\"");
        let (_, _, message, _) = error(&grant(
            r#"{"src": ["*"], "dst": ["tag:db"], "ip": ["icmp:7"]}"#,
        ));
        assert_eq!(
            message,
            "proto \"icmp\" has no ports, but \"icmp:7\" names some"
        );
        let (_, _, message, _) = error(&grant(
            r#"{"src": ["*"], "dst": ["tag:db"], "ip": ["tcpp:1"]}"#,
        ));
        assert_eq!(message, "invalid proto \"tcpp\"");
        let via = Policy::parse(
            &grant(r#"{"src": ["*"], "dst": ["tag:db"], "ip": ["*"], "via": ["tag:db"]}"#),
            "p",
        )
        .unwrap();
        assert_eq!(
            via.warnings()[0].message,
            "grants with \"via\" match nothing: weft has no subnet routers or exit nodes to route through, so routing is not enforced"
        );
        let (_, _, message, _) = error(&grant(
            r#"{"src": ["*"], "dst": ["tag:db"], "ip": ["*"], "via": ["tag:exit"]}"#,
        ));
        assert_eq!(message, "tag \"tag:exit\" has no \"tagOwners\" entry");
        let (_, _, message, _) = error(&grant(
            r#"{"src": ["*"], "dst": ["tag:db"], "ip": ["*"], "via": ["10.0.0.1"]}"#,
        ));
        assert_eq!(message, "\"via\" entry \"10.0.0.1\" is not a tag");
        let (_, _, message, hint) = error("{\"postures\": {\"posture:a\": [\"node:oss == 'x'\"]}}");
        assert_eq!(message, "unknown posture attribute \"node:oss\"");
        assert_eq!(hint, "did you mean \"node:os\"?");
        let (_, _, message, _) = error("{\"defaultSrcPosture\": [\"ok\"]}");
        assert_eq!(message, "posture name \"ok\" must start with \"posture:\"");
        let (_, _, message, hint) = error("{\"groups\": {\"group:idp:eng\": [\"a@x\"]}}");
        assert_eq!(
            message,
            "\"group:idp:eng\" is an identity-provider group and cannot be defined here"
        );
        assert!(hint.starts_with("remove it from \"groups\""), "{hint}");
        let (_, _, message, _) = error("{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:self\"], \"dst\": [\"*:*\"]}]}");
        assert_eq!(message, "autogroup:self is only valid as a destination");
    }

    #[test]
    fn invalid_ports_cidrs_and_protos() {
        let (line, col, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:db:70000\"]}",
        ));
        assert_eq!(
            (line, col, message.as_str()),
            (4, 48, "invalid ports \"70000\"")
        );
        let (_, _, message, hint) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:db\"]}",
        ));
        assert_eq!(message, "dst \"tag:db\" has no ports");
        assert_eq!(
            hint,
            "write \"tag:db:*\" for every port, or \"tag:db:PORT\""
        );
        let (line, col, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"10.0.0.0/33\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!(
            (line, col, message.as_str()),
            (4, 34, "invalid IP address or CIDR \"10.0.0.0/33\"")
        );
        let (_, _, message, hint) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"10.1.2.3/8:22\"]}",
        ));
        assert_eq!(
            message,
            "CIDR \"10.1.2.3/8\" has bits set after the prefix length"
        );
        assert_eq!(hint, "did you mean \"10.0.0.0/8\"?");
        let (line, col, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": \"tcpp\"}",
        ));
        assert_eq!(
            (line, col, message.as_str()),
            (4, 65, "invalid proto \"tcpp\"")
        );
        let (_, _, message, hint) = error(&acl("{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:db:22\"], \"proto\": \"icmp\"}"));
        assert_eq!(
            message,
            "proto \"icmp\" has no ports, but dst \"tag:db:22\" names some"
        );
        assert_eq!(hint, "write \"tag:db:*\"");
        let (_, _, message, _) = error("{\"hosts\": {\"h\": \"not-an-ip\"}}");
        assert_eq!(
            message,
            "host \"h\" is \"not-an-ip\", which is not an IP address or CIDR"
        );
        let (_, _, message, _) = error("{\"hosts\": {\"10.0.0.1\": \"10.0.0.1\"}}");
        assert_eq!(message, "host name \"10.0.0.1\" looks like an IP address");
    }

    #[test]
    fn numeric_protos_are_accepted() {
        let policy = Policy::parse(
            &acl("{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": 17}"),
            "p",
        );
        assert!(policy.is_ok(), "{policy:?}");
        let policy = Policy::parse(&acl("{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"proto\": \"132\"}"), "p");
        assert!(policy.is_ok(), "{policy:?}");
    }

    #[test]
    fn unknown_and_unsupported_entry_keys() {
        let (line, col, message, hint) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dts\": [\"*:*\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!((line, col), (4, 40));
        assert_eq!(message, "unknown key \"dts\" in acls entry");
        assert_eq!(hint, "did you mean \"dst\"?");
        let (_, _, message, hint) = error(&acl("{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"srcPosture\": [\"posture:x\"]}"));
        assert_eq!(message, "undefined posture \"posture:x\"");
        assert_eq!(
            hint,
            "define it under \"postures\" (no postures are defined)"
        );
        let (_, _, message, _) = error(&acl("{\"action\": \"deny\", \"src\": [\"*\"], \"dst\": [\"*:*\"], \"srcPosture\": [\"posture:x\"]}"));
        assert_eq!(message, "\"srcPosture\" on a deny rule");
        let (line, col, message, hint) = error(&acl(
            "{\"action\": \"accept\", \"users\": [\"*\"], \"src\": [\"*\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!((line, col), (4, 42));
        assert_eq!(message, "acls entry has both \"users\" and \"src\"");
        assert_eq!(
            hint,
            "\"users\" and \"src\" are two spellings of \"src\"; keep one"
        );
        let (_, _, message, _) = error(&acl(
            "{\"Action\": \"accept\", \"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!(message, "acls entry has both \"Action\" and \"action\"");
        let (_, _, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!(message, "\"src\" is empty, so the rule can never match");
    }

    #[test]
    fn test_entries_are_checked() {
        let base = |test: &str| {
            format!(
                "{{\"tagOwners\": {{\"tag:db\": []}}, \"acls\": [],\n\"tests\": [\n  {test}\n]}}"
            )
        };
        let (line, col, message, _) = error(&base("{\"src\": \"*\", \"accept\": [\"tag:db:22\"]}"));
        assert_eq!(
            (line, col, message.as_str()),
            (3, 11, "tests need a concrete principal, not \"*\"")
        );
        let (_, _, message, _) = error(&base("{\"src\": \"a@x\", \"accept\": [\"tag:db:22-23\"]}"));
        assert_eq!(message, "invalid test port \"22-23\"");
        let (line, col, message, _) = error(&base("{\"accept\": [\"tag:db:22\"]}"));
        assert_eq!(
            (line, col, message.as_str()),
            (3, 3, "tests entry has no \"src\"")
        );
        let (_, _, message, _) = error(&base("{\"src\": \"a@x\"}"));
        assert_eq!(message, "tests entry has no \"accept\" or \"deny\"");
        let (_, _, message, hint) = error(&base(
            "{\"src\": \"a@x\", \"acept\": [\"tag:db:22\"], \"deny\": []}",
        ));
        assert_eq!(message, "unknown key \"acept\" in tests entry");
        assert_eq!(hint, "did you mean \"accept\"?");
    }

    #[test]
    fn every_error_is_reported_in_file_order() {
        let source =
            "{\n  \"acl\": [],\n  \"groups\": {\"eng\": []},\n  \"hosts\": {\"h\": \"x\"},\n}";
        let diags = Policy::parse(source, "p.hujson").unwrap_err();
        let lines: Vec<u32> = diags.0.iter().map(|d| d.line).collect();
        assert_eq!(lines, [2, 3, 4]);
    }

    #[test]
    fn early_tailscale_spellings_load() {
        let early = r#"{
  "Groups": {"group:eng": ["alice@example.com"]},
  "Hosts": {"nas": "192.168.1.10"},
  "ACLs": [
    {"Action": "accept", "Users": ["group:eng"], "Ports": ["nas:445"]},
    {"action": "accept", "users": ["*"], "ports": ["nas:80"]},
  ],
  "Tests": [
    {"User": "alice@example.com", "Allow": ["nas:445", "nas:80"], "Deny": ["nas:22"]},
    {"src": "bob@example.com", "allow": ["nas:80"], "deny": ["nas:445"]},
  ],
}"#;
        let policy = Policy::parse(early, "p").unwrap();
        assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
        assert_eq!(policy.run_tests().unwrap().passed, 5);
        let current = policy.to_hujson();
        assert!(
            current.contains("\"src\": [\"group:eng\"], \"dst\": [\"nas:445\"]"),
            "{current}"
        );
        let (_, _, message, hint) = error("{\"acls\": [], \"ACLs\": []}");
        assert_eq!(message, "the policy has both \"acls\" and \"ACLs\"");
        assert_eq!(
            hint,
            "\"acls\" and \"ACLs\" are two spellings of \"acls\"; keep one"
        );
        let (_, _, message, _) = error(
            "{\"hosts\": {\"h\": \"10.0.0.1\"}, \"tests\": [{\"src\": \"a@x\", \"accept\": [\"h:1\"], \"allow\": [\"h:2\"]}]}",
        );
        assert_eq!(message, "tests entry has both \"accept\" and \"allow\"");
        let (_, _, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"ports\": [\"*:*\"], \"dst\": [\"*:*\"]}",
        ));
        assert_eq!(message, "acls entry has both \"ports\" and \"dst\"");
    }

    #[test]
    fn member_spellings_do_not_mix() {
        let policy = Policy::parse(
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:members\"], \"dst\": [\"autogroup:self:*\"]}]}",
            "p",
        );
        assert!(policy.is_ok(), "{policy:?}");
        let (line, col, message, hint) = error(
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:members\"], \"dst\": [\"autogroup:self:*\"]},\n{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"*:22\"]}]}",
        );
        assert_eq!((line, col), (2, 30));
        assert_eq!(
            message,
            "\"autogroup:member\" in a file that also writes \"autogroup:members\""
        );
        assert!(hint.contains("older spelling"), "{hint}");
    }

    #[test]
    fn danger_all_is_every_source() {
        let policy = Policy::parse(
            "{\"tagOwners\": {\"tag:web\": []}, \"grants\": [{\"src\": [\"autogroup:danger-all\"], \"dst\": [\"tag:web\"], \"ip\": [\"tcp:443\"]}]}",
            "p",
        )
        .unwrap();
        assert_eq!(policy.rules.rules[0].src, [crate::rules::Target::Any]);
        let (_, _, message, _) = error(&acl(
            "{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"autogroup:danger-all:*\"]}",
        ));
        assert_eq!(message, "autogroup:danger-all is only valid as a source");
    }

    #[test]
    fn empty_policy_is_valid() {
        let policy = Policy::parse("{}", "p").unwrap();
        assert!(policy.warnings().is_empty());
        assert_eq!(policy.run_tests().unwrap().passed, 0);
        let policy = Policy::parse("// nothing allowed\n{ /* yet */ }\n", "p").unwrap();
        assert!(policy.rules.rules.is_empty());
    }
}
