//! The coordinator addresses a node knows: one or several replicas of one
//! overlay's coordinator, tried in order by the control client.
//!
//! Given as repeated `--coordinator HOST:PORT` options, as one
//! comma-separated value, or both. Saved in the preferences as a JSON list;
//! preferences written when a node knew one coordinator hold a single
//! string, which still loads.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One coordinator address, `HOST:PORT`, as given (a name is resolved at
/// every connection attempt, and every address it resolves to is tried).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoordinatorAddress(String);

/// The non-empty, ordered list of a coordinator's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinators(Vec<CoordinatorAddress>);

/// Why a coordinator address was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No address at all, or an empty entry in a comma-separated list.
    #[error("the coordinator address is empty; pass --coordinator HOST:PORT (repeat it, or separate addresses with commas, for several replicas)")]
    Empty,
    /// The entry does not end in a port.
    #[error("coordinator address {0:?} has no valid port; write HOST:PORT, e.g. coordinator.example:7443 or [fd00::1]:7443")]
    Port(String),
    /// An IPv6 address without brackets, whose last group reads as a port.
    #[error("coordinator address {0:?} is ambiguous; write an IPv6 address in brackets, e.g. [fd00::1]:7443")]
    Ipv6(String),
}

impl CoordinatorAddress {
    /// The address as given, for name resolution and display.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Coordinators {
    /// The list of `addresses`, which must not be empty.
    pub fn new(addresses: Vec<CoordinatorAddress>) -> Result<Self, AddressError> {
        if addresses.is_empty() {
            return Err(AddressError::Empty);
        }
        Ok(Self(addresses))
    }

    /// The addresses in the order they are tried.
    pub fn addresses(&self) -> &[CoordinatorAddress] {
        &self.0
    }
}

impl FromStr for CoordinatorAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(AddressError::Port(text.to_owned()));
        };
        if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p != 0) {
            return Err(AddressError::Port(text.to_owned()));
        }
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.contains(':') && !bracketed {
            return Err(AddressError::Ipv6(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }
}

/// A comma-separated list, as `WEFT_COORDINATOR` or an old preferences file holds it.
impl FromStr for Coordinators {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let addresses = text
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(addresses)
    }
}

impl From<SocketAddr> for Coordinators {
    fn from(address: SocketAddr) -> Self {
        Self(vec![CoordinatorAddress(address.to_string())])
    }
}

impl fmt::Display for CoordinatorAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Comma-separated, the form `--coordinator` and `WEFT_COORDINATOR` accept.
impl fmt::Display for Coordinators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, address) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&address.0)?;
        }
        Ok(())
    }
}

impl Serialize for Coordinators {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(CoordinatorAddress::as_str))
    }
}

impl<'de> Deserialize<'de> for Coordinators {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<String>),
            Single(String),
        }
        let list = match Form::deserialize(deserializer)? {
            Form::List(list) => list,
            Form::Single(text) => vec![text],
        };
        let mut addresses = Vec::new();
        for entry in &list {
            let parsed: Coordinators = entry.parse().map_err(serde::de::Error::custom)?;
            addresses.extend(parsed.0);
        }
        Self::new(addresses).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_list_parses_in_order() {
        let list: Coordinators = "198.51.100.1:7443, coord.example:7443,[fd00::1]:7443"
            .parse()
            .unwrap();
        let names: Vec<&str> = list.addresses().iter().map(|a| a.as_str()).collect();
        assert_eq!(
            names,
            ["198.51.100.1:7443", "coord.example:7443", "[fd00::1]:7443"]
        );
        assert_eq!(
            list.to_string(),
            "198.51.100.1:7443,coord.example:7443,[fd00::1]:7443"
        );
    }

    #[test]
    fn bad_addresses_name_the_fix() {
        for (text, expected) in [
            ("", AddressError::Empty),
            ("a:1,,b:2", AddressError::Empty),
            ("coord.example", AddressError::Port("coord.example".into())),
            (":7443", AddressError::Port(":7443".into())),
            ("coord:0", AddressError::Port("coord:0".into())),
            ("coord:70000", AddressError::Port("coord:70000".into())),
            ("fd00::1:7443", AddressError::Ipv6("fd00::1:7443".into())),
        ] {
            assert_eq!(text.parse::<Coordinators>(), Err(expected), "{text:?}");
        }
        let err = "coord".parse::<Coordinators>().unwrap_err().to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
    }

    #[test]
    fn preferences_with_a_single_string_still_load() {
        let old: Coordinators = serde_json::from_str("\"198.51.100.1:7443\"").unwrap();
        assert_eq!(old.to_string(), "198.51.100.1:7443");
        let new: Coordinators =
            serde_json::from_str("[\"198.51.100.1:7443\",\"198.51.100.2:7443\"]").unwrap();
        assert_eq!(new.addresses().len(), 2);
        assert_eq!(
            serde_json::to_string(&new).unwrap(),
            "[\"198.51.100.1:7443\",\"198.51.100.2:7443\"]"
        );
        assert!(serde_json::from_str::<Coordinators>("[]").is_err());
        assert!(serde_json::from_str::<Coordinators>("\"nope\"").is_err());
        assert!(serde_json::from_str::<Coordinators>("7").is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(
            hosts in proptest::collection::vec("[a-z][a-z0-9.-]{0,20}", 1..5),
            ports in proptest::collection::vec(1u16.., 5),
        ) {
            let text = hosts
                .iter()
                .zip(&ports)
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            let list: Coordinators = text.parse().unwrap();
            prop_assert_eq!(list.to_string(), text);
            let json = serde_json::to_string(&list).unwrap();
            prop_assert_eq!(serde_json::from_str::<Coordinators>(&json).unwrap(), list);
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,40}") {
            let _ = text.parse::<Coordinators>();
        }
    }
}
