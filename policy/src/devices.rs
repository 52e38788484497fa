//! Device lists for the tests that need devices (`weft policy check
//! --devices FILE`).
//!
//! The file is the JSON array `weft-coordinator nodes list --json` prints,
//! so a team evaluates its policy's tests offline against a snapshot of the
//! fleet: each node has `id`, `name`, `identity` and its overlay addresses,
//! as `ipv4` and `ipv6` (the coordinator's listing) or as an `addresses`
//! array ([`NodeInfo`]'s own form); `attributes` (posture) may be left out.
//! Other fields (`endpoints`, `online`, …) are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use weft_proto::{Identity, NodeId};

use crate::NodeInfo;

/// Why a device list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// Not JSON, or not an array of nodes.
    #[error("the device list is not a JSON array of nodes ({source}); pass the output of `weft-coordinator nodes list --json`")]
    Json {
        /// The JSON error, with its line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A node without any overlay address.
    #[error("node {name:?} in the device list has no overlay address; give it `ipv4`/`ipv6` or `addresses`")]
    NoAddress {
        /// The node's name.
        name: String,
    },
    /// Two nodes with one id.
    #[error("the device list has node id {id} twice; ids must be unique")]
    DuplicateId {
        /// The repeated id.
        id: NodeId,
    },
}

/// One node as a device list writes it.
#[derive(Debug, Deserialize)]
struct Device {
    id: NodeId,
    name: String,
    identity: Identity,
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default)]
    ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// Reads a device list into the nodes [`crate::Policy::run_tests_on_nodes`]
/// evaluates tests against, identities in canonical form.
pub fn parse_devices(json: &str) -> Result<Vec<NodeInfo>, DevicesError> {
    let devices: Vec<Device> =
        serde_json::from_str(json).map_err(|source| DevicesError::Json { source })?;
    let mut ids = BTreeSet::new();
    devices
        .into_iter()
        .map(|device| {
            if !ids.insert(device.id) {
                return Err(DevicesError::DuplicateId { id: device.id });
            }
            let mut addresses = device.addresses;
            addresses.extend(device.ipv4.map(IpAddr::V4));
            addresses.extend(device.ipv6.map(IpAddr::V6));
            addresses.sort_unstable();
            addresses.dedup();
            if addresses.is_empty() {
                return Err(DevicesError::NoAddress { name: device.name });
            }
            Ok(NodeInfo {
                id: device.id,
                name: device.name,
                addresses,
                identity: device.identity,
                attributes: device.attributes,
            }
            .into_canonical())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinators_listing_reads_as_nodes() {
        let listing = r#"[{"id": 7, "name": "web1", "ipv4": "100.64.0.7", "ipv6": "fd7a:115c:a1e0::7",
            "identity": {"user": "Alice@Example.com", "groups": [], "workload": null, "tags": []},
            "endpoints": ["198.51.100.7:41641"], "online": true,
            "created": "2026-12-01T10:00:00Z", "ephemeral": false}]"#;
        let nodes = parse_devices(listing).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            nodes[0].addresses,
            [
                "100.64.0.7".parse::<IpAddr>().unwrap(),
                "fd7a:115c:a1e0::7".parse().unwrap()
            ]
        );
        assert_eq!(nodes[0].identity.user.as_deref(), Some("alice@example.com"));
        assert!(nodes[0].attributes.is_empty());
    }

    #[test]
    fn node_infos_read_back() {
        let json = r#"[{"id": 1, "name": "db", "addresses": ["100.64.0.1"],
            "identity": {"user": null, "groups": [], "workload": null, "tags": ["tag:db"]},
            "attributes": {"node:os": "linux"}}]"#;
        let nodes = parse_devices(json).unwrap();
        assert_eq!(nodes[0].attributes["node:os"], "linux");
        assert_eq!(nodes[0].identity.tags, ["tag:db"]);
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        let error = parse_devices(r#"{"nodes": []}"#).unwrap_err();
        assert!(matches!(error, DevicesError::Json { .. }));
        assert!(error.to_string().contains("nodes list --json"), "{error}");

        let no_address = r#"[{"id": 1, "name": "db",
            "identity": {"user": null, "groups": [], "workload": null, "tags": []}}]"#;
        assert_eq!(
            parse_devices(no_address).unwrap_err().to_string(),
            "node \"db\" in the device list has no overlay address; give it `ipv4`/`ipv6` or `addresses`"
        );

        let twice = r#"[
            {"id": 1, "name": "a", "ipv4": "100.64.0.1", "identity": {"user": null, "groups": [], "workload": null, "tags": []}},
            {"id": 1, "name": "b", "ipv4": "100.64.0.2", "identity": {"user": null, "groups": [], "workload": null, "tags": []}}]"#;
        assert!(matches!(
            parse_devices(twice).unwrap_err(),
            DevicesError::DuplicateId { .. }
        ));
    }
}
