//! `weft whois`: who is behind an overlay address, and which application
//! capabilities the policy's grants give it on this node.
//!
//! Applications behind weft use it to authorize a connection they accepted:
//! the source address of a packet that came through the tunnel is the peer's
//! own (the data plane drops spoofed sources), so the answer names the peer that
//! opened the connection.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use weft_proto::{AppGrant, Identity, NodeId};

use super::CommandError;
use weft_dataplane::core::PeerStatus;

/// Who owns an overlay address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhoIs {
    /// The peer that owns the address.
    pub node: WhoIsNode,
    /// Who it is.
    pub identity: WhoIsIdentity,
    /// Capability name → the grants' values (JSON documents), for every
    /// grant on this node whose sources include the address.
    pub capabilities: BTreeMap<String, Vec<serde_json::Value>>,
}

/// The node part of a [`WhoIs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoIsNode {
    /// The coordinator's id for the node.
    pub id: u64,
    /// Its unique name in the overlay.
    pub name: String,
    /// Its overlay addresses.
    pub addresses: Vec<IpAddr>,
}

/// The identity part of a [`WhoIs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoIsIdentity {
    /// The user owning the node, for a person's device.
    pub user: Option<String>,
    /// The user's identity-provider groups.
    pub groups: Vec<String>,
    /// The workload's SPIFFE ID.
    pub workload: Option<String>,
    /// The node's tags.
    pub tags: Vec<String>,
}

/// Looks `addr` up among `peers`, with the capabilities `grants` give it.
pub fn lookup(
    peers: &[PeerStatus],
    grants: &[AppGrant],
    addr: IpAddr,
) -> Result<WhoIs, CommandError> {
    let Some(peer) = peers.iter().find(|p| p.addresses.contains(&addr)) else {
        return Err(CommandError::NotFound(format!(
            "no peer of this node has the address {addr}: it is not in the overlay, or the policy lets it neither reach nor be reached by this node (see `weft status`)"
        )));
    };
    Ok(WhoIs {
        node: node(peer.id, &peer.name, &peer.addresses),
        identity: identity(&peer.identity),
        capabilities: capabilities(grants, addr),
    })
}

fn node(id: NodeId, name: &str, addresses: &[IpAddr]) -> WhoIsNode {
    WhoIsNode {
        id: id.0,
        name: name.to_owned(),
        addresses: addresses.to_vec(),
    }
}

fn identity(identity: &Identity) -> WhoIsIdentity {
    WhoIsIdentity {
        user: identity.user.clone(),
        groups: identity.groups.clone(),
        workload: identity.workload.clone(),
        tags: identity.tags.clone(),
    }
}

/// The capabilities whose grants cover `addr`. A value that is not valid
/// JSON (the coordinator only sends JSON) is passed on as a string.
fn capabilities(grants: &[AppGrant], addr: IpAddr) -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for grant in grants
        .iter()
        .filter(|g| g.src.iter().any(|n| n.contains(&addr)))
    {
        let values = out.entry(grant.name.clone()).or_default();
        for value in &grant.values {
            values.push(
                serde_json::from_str(value)
                    .unwrap_or_else(|_| serde_json::Value::String(value.clone())),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn peer() -> PeerStatus {
        PeerStatus {
            id: NodeId(7),
            name: "laptop".into(),
            addresses: vec![
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, 7)),
                "fd7a::7".parse().unwrap(),
            ],
            identity: Identity {
                user: Some("alice@example.com".into()),
                groups: vec!["group:idp:eng".into()],
                workload: None,
                tags: vec![],
            },
            endpoint: None,
            path: None,
            relay: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn grant(src: &str, name: &str, values: &[&str]) -> AppGrant {
        AppGrant {
            src: vec![src.parse().unwrap()],
            name: name.into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
            policy_line: 3,
        }
    }

    #[test]
    fn a_peer_gets_the_capabilities_granted_to_its_address() {
        let grants = [
            grant(
                "100.64.0.7/32",
                "example.com/cap/admin",
                &[r#"{"level": 2}"#],
            ),
            grant("100.64.0.0/24", "example.com/cap/admin", &["true"]),
            grant("100.64.1.0/24", "example.com/cap/other", &["1"]),
        ];
        let who = lookup(&[peer()], &grants, "100.64.0.7".parse().unwrap()).unwrap();
        assert_eq!(who.node.name, "laptop");
        assert_eq!(who.identity.user.as_deref(), Some("alice@example.com"));
        assert_eq!(
            who.capabilities["example.com/cap/admin"],
            vec![serde_json::json!({"level": 2}), serde_json::json!(true)]
        );
        assert!(!who.capabilities.contains_key("example.com/cap/other"));
        let by_v6 = lookup(&[peer()], &grants, "fd7a::7".parse().unwrap()).unwrap();
        assert!(by_v6.capabilities.is_empty(), "grants are per address");
    }

    #[test]
    fn unknown_addresses_are_not_found_with_a_reason() {
        let err = lookup(&[peer()], &[], "100.64.0.9".parse().unwrap()).unwrap_err();
        assert!(matches!(err, CommandError::NotFound(_)));
        assert!(err.to_string().contains("100.64.0.9"), "{err}");
    }
}
