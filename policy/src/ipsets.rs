//! `ipsets`: named sets of addresses built by adding and removing IPs,
//! CIDRs, hosts, other ipsets and `autogroup:internet`, in order.
//!
//! An ipset resolves to a list of prefixes, so `ipset:NAME` works wherever a
//! CIDR does. `autogroup:internet` in a set matches nothing (weft has no
//! exit nodes); removing it removes every address outside the private and
//! overlay ranges, more than the internet itself, so a removal never leaves
//! more addresses than Tailscale would.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::ast::IpsetDef;
use crate::diagnostic::{known_list, suggest, Diagnostic, SourceMap};
use crate::resolve::host_hint;
use crate::resolve::Names;
use crate::selector::{Autogroup, Selector};

/// What an ipset stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ipset {
    /// Aggregated prefixes.
    pub(crate) nets: Vec<IpNet>,
    /// Whether it includes `autogroup:internet` (which matches nothing).
    pub(crate) internet: bool,
}

/// Addresses that are never the internet: private, overlay and unique-local ranges.
pub(crate) const NOT_INTERNET: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// Resolves every ipset of `defs`, reporting undefined names and cycles.
pub(crate) fn resolve(
    defs: &[IpsetDef],
    names: &Names,
    map: &SourceMap<'_>,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Ipset> {
    let mut builder = Builder {
        defs: defs.iter().map(|d| (d.name.value.as_str(), d)).collect(),
        names,
        map,
        diags,
        done: BTreeMap::new(),
    };
    for def in defs {
        builder.build(&def.name.value, &mut Vec::new());
    }
    builder.done
}

struct Builder<'f, 'm, 'd> {
    defs: BTreeMap<&'f str, &'f IpsetDef>,
    names: &'f Names,
    map: &'m SourceMap<'m>,
    diags: &'d mut Vec<Diagnostic>,
    done: BTreeMap<String, Ipset>,
}

impl Builder<'_, '_, '_> {
    /// The set `name` (known to be defined); `stack` holds the sets being built.
    fn build(&mut self, name: &str, stack: &mut Vec<String>) -> Ipset {
        if let Some(set) = self.done.get(name) {
            return set.clone();
        }
        let Some(def) = self.defs.get(name).copied() else {
            return Ipset::default();
        };
        stack.push(name.to_owned());
        let mut set = Ipset::default();
        for entry in &def.entries {
            let (nets, internet) = match &entry.value.selector {
                Selector::Prefix(net) => (vec![*net], false),
                Selector::Host(host) => match self.names.hosts.get(host) {
                    Some(net) => (vec![*net], false),
                    None => {
                        let hint = host_hint(self.names, host);
                        self.diags.push(self.map.error(
                            entry.span,
                            format!("undefined host \"{host}\""),
                            Some(hint),
                        ));
                        continue;
                    }
                },
                Selector::Autogroup(Autogroup::Internet) => (Vec::new(), true),
                Selector::Ipset(other) if stack.contains(other) => {
                    let start = stack.iter().position(|s| s == other).unwrap_or(0);
                    let cycle: Vec<&str> = stack[start..]
                        .iter()
                        .map(String::as_str)
                        .chain([other.as_str()])
                        .collect();
                    self.diags.push(self.map.error(
                        entry.span,
                        format!("ipset cycle: {}", cycle.join(" → ")),
                        Some(
                            "an ipset cannot contain itself; remove one of these references".into(),
                        ),
                    ));
                    continue;
                }
                Selector::Ipset(other) if !self.defs.contains_key(other.as_str()) => {
                    let hint = suggest(other, self.defs.keys().copied()).map_or_else(
                        || {
                            format!(
                                "define it under \"ipsets\" ({})",
                                known_list("ipsets", self.defs.keys().copied())
                            )
                        },
                        |near| format!("did you mean \"{near}\"?"),
                    );
                    self.diags.push(self.map.error(
                        entry.span,
                        format!("undefined ipset \"{other}\""),
                        Some(hint),
                    ));
                    continue;
                }
                Selector::Ipset(other) => {
                    let inner = self.build(other, stack);
                    (inner.nets, inner.internet)
                }
                // The parser admits nothing else.
                _ => continue,
            };
            if entry.value.remove {
                let mut holes = nets;
                if internet {
                    holes.extend(internet_superset());
                    set.internet = false;
                }
                for hole in holes {
                    set.nets = subtract(std::mem::take(&mut set.nets), hole);
                }
            } else {
                set.nets.extend(nets);
                set.internet |= internet;
            }
            set.nets = IpNet::aggregate(&set.nets);
        }
        stack.pop();
        self.done.insert(name.to_owned(), set.clone());
        set
    }
}

/// Every address except the ranges that are never the internet.
fn internet_superset() -> Vec<IpNet> {
    let mut all = vec![
        IpNet::new_assert(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpNet::new_assert(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    ];
    for private in NOT_INTERNET {
        let private: IpNet = private.parse().unwrap_or_else(|_| unreachable!());
        all = subtract(all, private);
    }
    all
}

/// `nets` without the addresses of `hole`.
pub(crate) fn subtract(nets: Vec<IpNet>, hole: IpNet) -> Vec<IpNet> {
    let mut out = Vec::new();
    for net in nets {
        if hole.contains(&net) {
            continue;
        }
        if !net.contains(&hole) {
            out.push(net);
            continue;
        }
        // Walk down from `net` to `hole`, keeping the half that misses it.
        let mut current = net;
        while current != hole {
            let Ok(mut halves) = current.subnets(current.prefix_len() + 1) else {
                break;
            };
            let (Some(low), Some(high)) = (halves.next(), halves.next()) else {
                break;
            };
            if low.contains(&hole) {
                out.push(high);
                current = low;
            } else {
                out.push(low);
                current = high;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Policy;

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn subtraction_splits_prefixes() {
        assert_eq!(
            subtract(nets(&["10.0.0.0/24"]), "10.0.0.0/26".parse().unwrap()),
            nets(&["10.0.0.128/25", "10.0.0.64/26"])
        );
        assert_eq!(
            subtract(nets(&["10.0.0.1/32"]), "10.0.0.0/8".parse().unwrap()),
            []
        );
        assert_eq!(
            subtract(nets(&["10.0.0.0/8"]), "fd00::/8".parse().unwrap()),
            nets(&["10.0.0.0/8"])
        );
        let superset = internet_superset();
        assert!(!superset
            .iter()
            .any(|n| n.contains(&"100.64.1.1".parse::<IpAddr>().unwrap())));
        assert!(superset
            .iter()
            .any(|n| n.contains(&"8.8.8.8".parse::<IpAddr>().unwrap())));
    }

    fn errors(source: &str) -> Vec<String> {
        Policy::parse(source, "p")
            .unwrap_err()
            .0
            .into_iter()
            .map(|d| format!("{} ({})", d.message, d.hint.unwrap_or_default()))
            .collect()
    }

    #[test]
    fn cycles_and_undefined_names_are_errors() {
        assert_eq!(
            errors(r#"{"ipsets": {"ipset:a": ["add ipset:b"], "ipset:b": ["10.0.0.0/8", "ipset:a"]}}"#),
            ["ipset cycle: ipset:a → ipset:b → ipset:a (an ipset cannot contain itself; remove one of these references)"]
        );
        assert_eq!(
            errors(
                r#"{"ipsets": {"ipset:office": ["10.0.0.0/8"], "ipset:b": ["add ipset:ofice"]}}"#
            ),
            ["undefined ipset \"ipset:ofice\" (did you mean \"ipset:office\"?)"]
        );
        assert_eq!(
            errors(r#"{"ipsets": {"ipset:a": ["remove lab"]}}"#),
            ["undefined host \"lab\" (define it under \"hosts\", or fix the name (no hosts are defined))"]
        );
        assert_eq!(
            errors(r#"{"ipsets": {"ipset:a": ["remove tag:x"]}}"#)[0],
            "ipset entry \"remove tag:x\" is not an address (ipsets hold IPs, CIDRs, hosts, other ipsets and autogroup:internet, not users, groups or tags)"
        );
        assert_eq!(
            errors(r#"{"ipsets": {"ipset:a": ["drop 10.0.0.0/8"]}}"#)[0],
            "invalid ipset operation \"drop\" in \"drop 10.0.0.0/8\" (ipset entries are ITEM, \"add ITEM\" or \"remove ITEM\")"
        );
        assert_eq!(
            errors(r#"{"acls": [{"action": "accept", "src": ["ipset:none"], "dst": ["*:*"]}]}"#),
            ["undefined ipset \"ipset:none\" (define it under \"ipsets\" (no ipsets are defined))"]
        );
    }
}
