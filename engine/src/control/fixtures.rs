//! What a coordinator sends, for the control client's tests.

use weft_proto::signing::{Chain, NetmapSigner, Record};
use weft_proto::{NetMap, PrivateKey, PublicKey, SelfNode, ServerMessage};

/// A first netmap with no peers.
pub(crate) fn empty_netmap() -> NetMap {
    NetMap {
        revision: 1,
        self_node: self_node(),
        peers: vec![],
        filter: weft_proto::PacketFilter::default(),
        capabilities: Vec::new(),
    }
}

pub(crate) fn self_node() -> SelfNode {
    SelfNode {
        id: weft_proto::NodeId(4),
        name: "web-1".into(),
        ipv4: "100.64.0.4".parse().unwrap(),
        ipv6: "fd7a:115c:a1e0::4".parse().unwrap(),
        identity: weft_proto::Identity::tagged(vec!["tag:web".into()]),
        key_expiry: None,
    }
}

pub(crate) fn peer(id: u64) -> weft_proto::Peer {
    weft_proto::Peer {
        id: weft_proto::NodeId(id),
        name: format!("peer-{id}"),
        node_key: PrivateKey::from_bytes([id as u8; 32]).public_key(),
        addresses: vec![format!("100.64.0.{id}").parse().unwrap()],
        endpoints: vec![format!("192.0.2.{id}:41641").parse().unwrap()],
        home_relay: None,
        identity: weft_proto::Identity::tagged(vec!["tag:db".into()]),
    }
}

/// What a coordinator sends after registration: its netmap key and the
/// signed netmap, the signature broken when `tamper`.
pub(crate) fn signed_hello(
    key: &PrivateKey,
    node_key: PublicKey,
    netmap: &NetMap,
    tamper: bool,
) -> Vec<ServerMessage> {
    let signer = NetmapSigner::derive(key);
    let mut signed = Chain::new(netmap.self_node.id, node_key)
        .sign(&signer, &Record::NetMap(netmap.clone()))
        .unwrap();
    if tamper {
        signed.signature[0] ^= 1;
    }
    vec![
        ServerMessage::Registered(netmap.self_node.clone()),
        ServerMessage::NetmapKey(signer.public_key()),
        ServerMessage::Signed(signed),
    ]
}
