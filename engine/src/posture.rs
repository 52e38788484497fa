//! The attributes a node reports about itself, which posture rules in the
//! policy (`srcPosture`) decide on.
//!
//! The engine only sends them. Where they come from is the host's: weft's
//! own `node:*` attributes through a [`SystemAttributes`] hook, called each
//! time the node reports, and an administrator's `custom:*` ones through a
//! watch channel (`weftd` reads the operating system and a posture file).

use std::collections::BTreeMap;

/// Attributes by key, `node:*` and `custom:*`.
pub type Attributes = BTreeMap<String, String>;

/// weft's own `node:*` attributes (OS, OS version, client version) for the
/// host name the node asked for.
pub type SystemAttributes = fn(&str) -> Attributes;

/// What the node reports: the host's `node:*` attributes and the custom ones.
pub(crate) fn report(system: SystemAttributes, hostname: &str, custom: &Attributes) -> Attributes {
    let mut attributes = system(hostname);
    attributes.extend(custom.iter().map(|(k, v)| (k.clone(), v.clone())));
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_holds_the_system_and_the_custom_attributes() {
        fn system(hostname: &str) -> Attributes {
            Attributes::from([
                ("node:os".to_owned(), "linux".to_owned()),
                ("node:hostname".to_owned(), hostname.to_owned()),
            ])
        }
        let custom = Attributes::from([("custom:managed".to_owned(), "true".to_owned())]);
        let attrs = report(system, "web-1", &custom);
        assert_eq!(attrs["custom:managed"], "true");
        assert_eq!(attrs["node:os"], "linux");
        assert_eq!(attrs["node:hostname"], "web-1");
    }
}
