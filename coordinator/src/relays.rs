//! What relays are told: which node keys are admitted right now.
//!
//! A relay opens a control session with its relay key and sends
//! `RelayFeed`; the session then sends a full set of admitted WireGuard node
//! keys and, after every change to the stored nodes or a login expiring,
//! only what changed. [`Admissions`] is the pure part: it turns successive
//! snapshots of the admitted set into those messages.

use std::collections::BTreeSet;

use weft_proto::{PublicKey, Refusal, RefusalCode, RelayInfo, ServerMessage};

use crate::nodes::NodeRecord;

/// The configured relay holding `key`, if its name matches; otherwise a
/// refusal that tells the operator what to fix.
pub(crate) fn configured<'a>(
    relays: &'a [RelayInfo],
    key: &PublicKey,
    name: &str,
) -> Result<&'a RelayInfo, Refusal> {
    let refuse = |message: String| Refusal {
        code: RefusalCode::BadRequest,
        message,
    };
    let Some(relay) = relays.iter().find(|r| r.key == *key) else {
        return Err(refuse(format!(
            "relay key {key} is not in this coordinator's configuration; add a [[relays]] entry with this key (printed by `weft-relay key`) and restart the coordinator"
        )));
    };
    if relay.name != name {
        return Err(refuse(format!(
            "this relay key is configured as relay {:?}, but the relay calls itself {name:?}; pass --name {} to weft-relay or fix the [[relays]] entry",
            relay.name, relay.name
        )));
    }
    Ok(relay)
}

/// The WireGuard keys of the nodes admitted at `now` (Unix seconds), and the
/// earliest future expiry among them, when the set must be recomputed even
/// without a stored change.
pub(crate) fn admitted<'a>(
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
    now: u64,
) -> (BTreeSet<PublicKey>, Option<u64>) {
    let mut keys = BTreeSet::new();
    let mut next_expiry: Option<u64> = None;
    for node in nodes {
        if node.is_expired(now) {
            continue;
        }
        keys.insert(node.node_key);
        if let Some(expiry) = node.key_expiry {
            next_expiry = Some(next_expiry.map_or(expiry, |e| e.min(expiry)));
        }
    }
    (keys, next_expiry)
}

/// The admitted set a relay was last sent.
#[derive(Debug, Default)]
pub(crate) struct Admissions {
    sent: Option<BTreeSet<PublicKey>>,
}

impl Admissions {
    /// The message that brings the relay to `now`: a full set the first
    /// time, then the differences; `None` when nothing changed.
    pub(crate) fn update(&mut self, now: BTreeSet<PublicKey>) -> Option<ServerMessage> {
        let message = match &self.sent {
            None => ServerMessage::RelayAdmissions {
                full: true,
                add: now.iter().copied().collect(),
                remove: Vec::new(),
            },
            Some(sent) => {
                let add: Vec<_> = now.difference(sent).copied().collect();
                let remove: Vec<_> = sent.difference(&now).copied().collect();
                if add.is_empty() && remove.is_empty() {
                    return None;
                }
                ServerMessage::RelayAdmissions {
                    full: false,
                    add,
                    remove,
                }
            }
        };
        self.sent = Some(now);
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; 32])
    }

    fn set(bytes: &[u8]) -> BTreeSet<PublicKey> {
        bytes.iter().copied().map(key).collect()
    }

    fn relay(name: &str, byte: u8) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            address: "203.0.113.10:7444".parse().unwrap(),
            key: key(byte),
            tcp_address: None,
            stun_address: None,
        }
    }

    #[test]
    fn a_full_set_first_then_only_changes() {
        let mut feed = Admissions::default();
        assert_eq!(
            feed.update(set(&[1, 2])),
            Some(ServerMessage::RelayAdmissions {
                full: true,
                add: vec![key(1), key(2)],
                remove: vec![],
            })
        );
        assert_eq!(feed.update(set(&[1, 2])), None);
        // Node 2 rotated its key to 3: one removal and one addition.
        assert_eq!(
            feed.update(set(&[1, 3])),
            Some(ServerMessage::RelayAdmissions {
                full: false,
                add: vec![key(3)],
                remove: vec![key(2)],
            })
        );
    }

    #[test]
    fn an_empty_overlay_still_gets_a_full_set() {
        let mut feed = Admissions::default();
        assert_eq!(
            feed.update(BTreeSet::new()),
            Some(ServerMessage::RelayAdmissions {
                full: true,
                add: vec![],
                remove: vec![],
            })
        );
    }

    fn node(id: u64, node_key: u8, key_expiry: Option<u64>) -> NodeRecord {
        NodeRecord {
            id: weft_proto::NodeId(id),
            name: format!("n{id}"),
            machine_key: key(100),
            node_key: key(node_key),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, 1),
            ipv6: std::net::Ipv6Addr::LOCALHOST,
            identity: weft_proto::Identity::default(),
            endpoints: Vec::new(),
            home_relay: None,
            attributes: Default::default(),
            created: 0,
            ephemeral: false,
            key_expiry,
        }
    }

    #[test]
    fn expired_nodes_are_not_admitted_and_the_next_expiry_is_known() {
        let nodes = [
            node(1, 1, None),
            node(2, 2, Some(100)),
            node(3, 3, Some(50)),
        ];
        assert_eq!(admitted(&nodes, 10), (set(&[1, 2, 3]), Some(50)));
        assert_eq!(admitted(&nodes, 50), (set(&[1, 2]), Some(100)));
        assert_eq!(admitted(&nodes, 100), (set(&[1]), None));
    }

    #[test]
    fn only_configured_relays_under_their_name_are_accepted() {
        let relays = [relay("fra1", 1), relay("ams1", 2)];
        assert_eq!(configured(&relays, &key(2), "ams1").unwrap().name, "ams1");
        let stranger = configured(&relays, &key(9), "fra1").unwrap_err();
        assert!(stranger.message.contains("[[relays]]"));
        let misnamed = configured(&relays, &key(1), "ams1").unwrap_err();
        assert!(misnamed.message.contains("--name fra1"));
    }
}
