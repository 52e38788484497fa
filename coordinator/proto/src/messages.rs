//! The messages of the control protocol.
//!
//! The node sends [`ClientMessage`]s, the coordinator [`ServerMessage`]s. After
//! the handshake the node sends [`ClientMessage::Register`]; the coordinator
//! answers [`ServerMessage::Registered`] or [`ServerMessage::Refused`], then a
//! full [`NetMap`], then a [`NetMapDelta`] whenever something the node may see
//! changes.
//!
//! The netmap is the node's whole view of the overlay: the peers the policy
//! lets it reach or be reached by — nothing about any other node — and the
//! inbound packet-filter rules that concern its own addresses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::{AuthKey, PublicKey};

/// A node's stable id, assigned by the coordinator at registration.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A message from a node to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Join the overlay, or rejoin as the node this machine key already is.
    Register(Register),
    /// The node's underlay endpoints changed.
    UpdateEndpoints(Vec<SocketAddr>),
}

/// A registration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// A pre-auth key. Needed to join; a machine that is already a node rejoins without one.
    pub auth_key: Option<AuthKey>,
    /// The name the node asks for; the coordinator makes it unique.
    pub hostname: String,
    /// The node's WireGuard public key.
    pub node_key: PublicKey,
    /// Underlay UDP endpoints where the node's WireGuard socket can be reached.
    pub endpoints: Vec<SocketAddr>,
    /// Attributes the node reports about itself (OS, client version, `custom:*` posture).
    pub attributes: BTreeMap<String, String>,
}

/// A message from the coordinator to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Registration succeeded; this is who the node is.
    Registered(SelfNode),
    /// Registration was refused; the coordinator closes the session after this.
    Refused(Refusal),
    /// The node's complete view, sent first and after any resynchronisation.
    NetMap(NetMap),
    /// A change to the view, relative to the previous revision.
    Delta(NetMapDelta),
}

/// Why the coordinator refused a node, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub code: RefusalCode,
    /// A sentence for the operator, naming the problem and the fix. Never contains secrets.
    pub message: String,
}

/// Machine-readable refusal reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// An unknown machine came without an auth key.
    AuthKeyRequired,
    /// The auth key is not one the coordinator issued (or it was revoked).
    AuthKeyInvalid,
    /// A single-use auth key that already admitted a node.
    AuthKeyUsed,
    /// The auth key's expiry has passed.
    AuthKeyExpired,
    /// An administrator deleted this node; it must join again with a new auth key.
    NodeDeleted,
    /// The request itself is invalid (e.g. an empty hostname).
    BadRequest,
    /// The coordinator could not serve the request (e.g. storage unavailable); retry later.
    Unavailable,
}

/// The registered node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfNode {
    /// Stable id.
    pub id: NodeId,
    /// Unique name in the overlay.
    pub name: String,
    /// Overlay IPv4 address, from 100.64.0.0/10.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address, from the overlay's ULA /48.
    pub ipv6: Ipv6Addr,
    /// Who the node is, for policy.
    pub identity: Identity,
}

impl SelfNode {
    /// Both overlay addresses.
    pub fn addresses(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }
}

/// Who a node is: the tags of a workload or server, or the user of a person's device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The user who owns the node, for nodes logged in as a person.
    pub user: Option<String>,
    /// `tag:NAME` tags, for nodes that are services rather than people.
    pub tags: Vec<String>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.user, self.tags.is_empty()) {
            (_, false) => f.write_str(&self.tags.join(",")),
            (Some(user), true) => f.write_str(user),
            (None, true) => f.write_str("(untagged)"),
        }
    }
}

/// The node's complete view of the overlay at one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetMap {
    /// Increases with every change the coordinator sends this node.
    pub revision: u64,
    /// The node itself.
    pub self_node: SelfNode,
    /// Every peer this node may reach or be reached by.
    pub peers: Vec<Peer>,
    /// Inbound packet-filter rules for this node's addresses. Empty means deny all.
    pub filter: Vec<FilterRule>,
}

/// A change to a [`NetMap`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetMapDelta {
    /// The revision this delta produces.
    pub revision: u64,
    /// Peers that are new or whose details changed, in full.
    pub upsert_peers: Vec<Peer>,
    /// Peers that are gone from this node's view.
    pub remove_peers: Vec<NodeId>,
    /// The new filter, when it changed.
    pub filter: Option<Vec<FilterRule>>,
    /// The node itself, when its own details changed.
    pub self_node: Option<SelfNode>,
}

/// Another node this node may talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Stable id.
    pub id: NodeId,
    /// Unique name in the overlay.
    pub name: String,
    /// WireGuard public key.
    pub node_key: PublicKey,
    /// Overlay addresses (its IPv4 and IPv6).
    pub addresses: Vec<IpAddr>,
    /// Underlay UDP endpoints to send its WireGuard packets to.
    pub endpoints: Vec<SocketAddr>,
    /// Who it is.
    pub identity: Identity,
}

/// One inbound allow rule of a node's stateful packet filter.
///
/// A packet arriving from the tunnel matches when its source is in `src`, its
/// destination in `dst`, its protocol in `protocols` and — for TCP and UDP —
/// its destination port in one of `ports`. ICMP matches on addresses alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source prefixes admitted.
    pub src: Vec<IpNet>,
    /// Destination prefixes (this node's addresses, or routes it serves).
    pub dst: Vec<IpNet>,
    /// Destination port ranges, for TCP and UDP.
    pub ports: Vec<PortRange>,
    /// Protocols admitted; empty means TCP, UDP and ICMP.
    pub protocols: Vec<Protocol>,
    /// The policy line the rule came from, for audit logs.
    pub policy_line: u32,
}

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// An IP protocol a rule admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1) and ICMPv6 (58).
    Icmp,
    /// Any other IP protocol, by number.
    Other(u8),
}

impl Protocol {
    /// The protocols an empty `protocols` list stands for.
    pub const DEFAULT: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp];

    /// The protocol of an IP packet's next-header number.
    pub fn from_number(number: u8) -> Self {
        match number {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 | 58 => Protocol::Icmp,
            other => Protocol::Other(other),
        }
    }
}
