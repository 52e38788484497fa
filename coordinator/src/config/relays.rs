//! The `[[relays]]` entries of the configuration file.
//!
//! ```toml
//! [[relays]]
//! name = "fra1"
//! address = "203.0.113.10:7444"
//! key = "BASE64"            # `weft-relay key` on the relay prints it
//! tcp_address = "203.0.113.10:7444"
//! stun_address = "203.0.113.10:3478"
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde::Deserialize;
use weft_proto::{PublicKey, RelayInfo};

use super::{ConfigError, FileConfig};

/// The longest relay name.
const MAX_NAME: usize = 32;

/// Whether `name` is a well-formed relay name: 1 to [`MAX_NAME`] lowercase
/// letters, digits or dashes.
pub(crate) fn is_relay_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// One `[[relays]]` entry as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// A short name (`fra1`): lowercase letters, digits and dashes.
    pub name: String,
    /// The relay's QUIC (UDP) address, as nodes reach it.
    pub address: SocketAddr,
    /// The relay's public key, as `weft-relay key` prints it.
    pub key: String,
    /// The relay's TLS-over-TCP fallback address, when it listens on one.
    #[serde(default)]
    pub tcp_address: Option<SocketAddr>,
    /// The relay's STUN responder, when it runs one.
    #[serde(default)]
    pub stun_address: Option<SocketAddr>,
}

impl FileConfig {
    /// Checks every `[[relays]]` entry; names and keys must be unique.
    pub fn resolve_relays(&self) -> Result<Vec<RelayInfo>, ConfigError> {
        resolve(&self.relays)
    }
}

fn resolve(entries: &[RelayConfig]) -> Result<Vec<RelayInfo>, ConfigError> {
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut relays = Vec::with_capacity(entries.len());
    for entry in entries {
        let invalid =
            |what: String| ConfigError::Invalid(format!("[[relays]] {:?}: {what}", entry.name));
        if !is_relay_name(&entry.name) {
            return Err(invalid(format!(
                "name must be 1 to {MAX_NAME} lowercase letters, digits or dashes, e.g. \"fra1\""
            )));
        }
        let key: PublicKey = entry.key.trim().parse().map_err(|_| {
            invalid(
                "key is not a public key; paste the 44 characters `weft-relay key` prints on the relay".into(),
            )
        })?;
        if !names.insert(entry.name.clone()) {
            return Err(invalid(
                "the name appears twice; give every relay its own".into(),
            ));
        }
        if !keys.insert(key) {
            return Err(invalid(
                "the key is another relay's too; every relay needs its own data directory and key"
                    .into(),
            ));
        }
        relays.push(RelayInfo {
            name: entry.name.clone(),
            address: entry.address,
            key,
            tcp_address: entry.tcp_address,
            stun_address: entry.stun_address,
        });
    }
    Ok(relays)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const OTHER: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    fn parse(text: &str) -> Result<Vec<RelayInfo>, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        file.resolve_relays().map_err(|e| e.to_string())
    }

    #[test]
    fn the_documented_entry_resolves() {
        let relays = parse(&format!(
            "[[relays]]\nname = \"fra1\"\naddress = \"203.0.113.10:7444\"\nkey = \"{KEY}\"\ntcp_address = \"203.0.113.10:7444\"\n"
        ))
        .unwrap();
        assert_eq!(relays.len(), 1);
        assert_eq!(relays[0].name, "fra1");
        assert_eq!(relays[0].key.to_string(), KEY);
        assert_eq!(
            relays[0].tcp_address,
            Some("203.0.113.10:7444".parse().unwrap())
        );
        assert_eq!(relays[0].stun_address, None);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_name_the_problem() {
        let entry = |name: &str, address: &str, key: &str| {
            format!("[[relays]]\nname = \"{name}\"\naddress = \"{address}\"\nkey = \"{key}\"\n")
        };
        let err = parse(&entry("Fra 1", "203.0.113.10:7444", KEY)).unwrap_err();
        assert!(err.contains("lowercase"), "{err}");
        let err = parse(&entry("fra1", "203.0.113.10:7444", "nope")).unwrap_err();
        assert!(err.contains("weft-relay key"), "{err}");
        let err = parse(&entry("fra1", "somewhere", KEY)).unwrap_err();
        assert!(err.contains("address"), "{err}");
        let twice =
            entry("fra1", "203.0.113.10:7444", KEY) + &entry("fra1", "203.0.113.11:7444", OTHER);
        assert!(parse(&twice).unwrap_err().contains("twice"));
        let shared =
            entry("fra1", "203.0.113.10:7444", KEY) + &entry("ams1", "203.0.113.11:7444", KEY);
        assert!(parse(&shared).unwrap_err().contains("own data directory"));
        let unknown = entry("fra1", "203.0.113.10:7444", KEY) + "port = 1\n";
        assert!(parse(&unknown).unwrap_err().contains("port"));
    }
}
