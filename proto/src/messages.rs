//! The messages of the control protocol.
//!
//! The node sends [`ClientMessage`]s, the coordinator [`ServerMessage`]s. After
//! the handshake the node sends [`ClientMessage::Register`]; the coordinator
//! answers [`ServerMessage::Registered`] or [`ServerMessage::Refused`], then
//! its netmap-signing key, then a full [`NetMap`], then a [`NetMapDelta`]
//! whenever something the node may see changes — each of those two signed
//! ([`crate::signing`]). A node that reconnects with a [`Resume`] in its
//! `Register` may get a [`NetMapDelta`] against the view it holds in place of
//! the full netmap ([`crate::resume`]).
//!
//! The netmap is the node's whole view of the overlay: the peers the policy
//! lets it reach or be reached by — nothing about any other node — and the
//! inbound packet-filter rules that concern its own addresses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::flows::{FlowBatch, RuleId};
use crate::keys::{AuthKey, PublicKey};
use crate::relay::RelayInfo;
use crate::signing::{Digest, NetmapKey, SignedRecord};

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
    /// Where the node can be reached changed: its underlay endpoints or its
    /// home relay.
    UpdateEndpoints(Advertisement),
    /// The node's attributes (OS, posture) changed.
    UpdateAttributes(BTreeMap<String, String>),
    /// Sent first, instead of `Register`, by a relay that proved a configured
    /// relay key: asks for the stream of admitted node keys
    /// ([`ServerMessage::RelayAdmissions`]).
    RelayFeed {
        /// The relay's name, as in the coordinator's `[[relays]]` entry.
        name: String,
    },
    /// Flow records ([`crate::flows`]); the coordinator acknowledges each
    /// batch with [`ServerMessage::FlowsAck`] once it has kept it.
    Flows(FlowBatch),
}

impl ClientMessage {
    /// The message's name, for errors about unexpected messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Register(_) => "Register",
            ClientMessage::UpdateEndpoints(_) => "UpdateEndpoints",
            ClientMessage::UpdateAttributes(_) => "UpdateAttributes",
            ClientMessage::RelayFeed { .. } => "RelayFeed",
            ClientMessage::Flows(_) => "Flows",
        }
    }
}

/// A registration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// What admits the node. Needed to join, and to log in again after the
    /// node's key expired; a machine that is already a node in good standing
    /// rejoins without one.
    pub credential: Option<Credential>,
    /// The name the node asks for; the coordinator makes it unique.
    pub hostname: String,
    /// The node's WireGuard public key.
    pub node_key: PublicKey,
    /// Underlay UDP endpoints where the node's WireGuard socket can be reached.
    pub endpoints: Vec<SocketAddr>,
    /// The relay (a `[[relays]]` name) where the node can be reached, when
    /// it is connected to one: a node rejoining after a coordinator failover
    /// keeps it.
    pub home_relay: Option<String>,
    /// Attributes the node reports about itself (OS, client version, `custom:*` posture).
    pub attributes: BTreeMap<String, String>,
    /// The verified view the node holds from an earlier session, so the
    /// coordinator may answer with a delta against it instead of a full
    /// netmap ([`crate::resume`]); `None` to ask for a full netmap.
    pub resume: Option<Box<Resume>>,
}

/// What a reconnecting node holds, stated compactly: any replica can compute
/// the delta from it without keeping per-node state across sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The node the view was for: a view of another id (the node was
    /// deleted and joined again) is not resumed.
    pub node: NodeId,
    /// [`SignedRecord::digest`] of the last record the node verified; a
    /// resumed session's first record chains after it.
    pub last_record: Digest,
    /// The revision of the view the node holds.
    pub revision: u64,
    /// Every peer the node holds, sorted by id without repeats, with the
    /// digest of its record as held ([`crate::resume::peer_digest`]).
    pub peers: Vec<PeerVersion>,
    /// [`crate::resume::filter_digest`] of the filter the node holds.
    pub filter: ViewDigest,
    /// [`crate::resume::capabilities_digest`] of the capabilities the node holds.
    pub capabilities: ViewDigest,
    /// [`crate::resume::self_node_digest`] of the node's own details as held.
    pub self_node: ViewDigest,
}

/// One peer a resuming node holds, and which version of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerVersion {
    /// The peer's id.
    pub id: NodeId,
    /// The digest of its record as the node holds it.
    pub version: ViewDigest,
}

/// A truncated SHA-256 of one item of a view ([`crate::resume`]): enough to
/// tell versions apart, not a commitment anyone signs.
pub type ViewDigest = [u8; 16];

/// Where a node can be reached: what it reports in
/// [`ClientMessage::UpdateEndpoints`] and what peers receive in [`Peer`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// Underlay UDP endpoints of the node's WireGuard socket: its host
    /// addresses and its reflexive (public, after NAT) endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// The relay (a `[[relays]]` name) the node is reachable through.
    pub home_relay: Option<String>,
}

/// What a node presents to be admitted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// A pre-auth key.
    AuthKey(AuthKey),
    /// Log a person in through the identity provider; the coordinator answers
    /// with [`ServerMessage::LoginRequired`].
    Interactive(LoginFlow),
    /// A platform-issued workload token (a JWT), e.g. a Kubernetes
    /// service-account token.
    IdentityToken(IdentityToken),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::AuthKey(key) => write!(f, "AuthKey({key:?})"),
            Credential::Interactive(flow) => write!(f, "Interactive({flow:?})"),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// How a person logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginFlow {
    /// Authorization code with PKCE in a browser, on this or another device.
    Browser,
    /// The device authorization grant (RFC 8628), for machines without a browser.
    DeviceCode,
}

/// A workload token. Redacted in `Debug`; never logged.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop,
)]
pub struct IdentityToken(String);

impl IdentityToken {
    /// Wraps a token read from the platform's token file.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token, for validation.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdentityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityToken(<redacted>)")
    }
}

/// A message from the coordinator to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Registration succeeded; this is who the node is.
    Registered(SelfNode),
    /// Registration was refused; the coordinator closes the session after this.
    Refused(Refusal),
    /// A person must log in; the session stays open and continues with
    /// [`ServerMessage::Registered`] once they have.
    LoginRequired(LoginPrompt),
    /// The node's complete view, sent first and after any resynchronisation;
    /// on the wire only inside [`ServerMessage::Signed`].
    NetMap(NetMap),
    /// A change to the view, relative to the previous revision; on the wire
    /// only inside [`ServerMessage::Signed`].
    Delta(NetMapDelta),
    /// The relays the node may use, sent after its first netmap when the
    /// coordinator has any, and again when the list changes. Replaces the
    /// previous list.
    Relays(Vec<RelayInfo>),
    /// To a relay: the WireGuard node keys of admitted nodes (registered, not
    /// expired, not deleted). The first has `full` set and lists every key in
    /// `add`; later ones are changes. A rotated node key is one removal and
    /// one addition.
    RelayAdmissions {
        /// `add` is the whole set; forget every key not in it.
        full: bool,
        /// Keys admitted now.
        add: Vec<PublicKey>,
        /// Keys no longer admitted.
        remove: Vec<PublicKey>,
    },
    /// The key the coordinator signs netmaps with, sent after
    /// [`ServerMessage::Registered`] and before the first signed record.
    NetmapKey(NetmapKey),
    /// A [`NetMap`] or [`NetMapDelta`], signed: the only way a coordinator
    /// sends either ([`crate::signing`]).
    Signed(SignedRecord),
    /// The coordinator kept the node's [`FlowBatch`] with this id.
    FlowsAck {
        /// The batch's id.
        id: u64,
    },
}

impl ServerMessage {
    /// The message's name, for errors about unexpected messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::Registered(_) => "Registered",
            ServerMessage::Refused(_) => "Refused",
            ServerMessage::LoginRequired(_) => "LoginRequired",
            ServerMessage::NetMap(_) => "NetMap",
            ServerMessage::Delta(_) => "Delta",
            ServerMessage::Relays(_) => "Relays",
            ServerMessage::RelayAdmissions { .. } => "RelayAdmissions",
            ServerMessage::NetmapKey(_) => "NetmapKey",
            ServerMessage::Signed(_) => "Signed",
            ServerMessage::FlowsAck { .. } => "FlowsAck",
        }
    }
}

/// Where and how a person completes an interactive login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginPrompt {
    /// The URL to open in a browser.
    pub url: String,
    /// For the device flow: the code to enter at `url`.
    pub user_code: Option<String>,
    /// How long the URL stays valid.
    pub expires_in_secs: u64,
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
    /// The node's key expired; a person must log in again (`weft login`).
    KeyExpired,
    /// The node's user was disabled by an administrator.
    UserDisabled,
    /// The interactive login failed or expired.
    LoginFailed,
    /// The identity provider cannot be reached; retry later.
    IdentityProviderUnavailable,
    /// A workload token was refused (signature, issuer, audience, age).
    TokenInvalid,
    /// The request itself is invalid (e.g. an empty hostname).
    BadRequest,
    /// The coordinator could not serve the request (e.g. storage unavailable); retry later.
    Unavailable,
    /// Another connection holds this machine key and newcomers keep taking
    /// it (two machines with one state directory); retry much later. Last,
    /// so every earlier code keeps its number on the wire: a node that
    /// predates it fails to decode the refusal and backs off all the same.
    MachineKeyInUse,
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
    /// When the node's key expires (Unix seconds); `None` for keys that
    /// live until deleted.
    pub key_expiry: Option<u64>,
}

impl SelfNode {
    /// Both overlay addresses.
    pub fn addresses(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }
}

/// Who a node is: a person's device (user and their identity-provider
/// groups), a workload (SPIFFE ID), or a server named by tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The user who owns the node, for nodes logged in as a person.
    pub user: Option<String>,
    /// Groups the identity provider asserted for the user at login, as policy
    /// principals (`group:idp:NAME`).
    pub groups: Vec<String>,
    /// The workload's SPIFFE ID, for nodes admitted by a platform token.
    pub workload: Option<String>,
    /// `tag:NAME` tags, for nodes that are services rather than people.
    pub tags: Vec<String>,
}

impl Identity {
    /// A node named by tags alone (admitted with a tagged auth key).
    pub fn tagged(tags: Vec<String>) -> Self {
        Self {
            tags,
            ..Self::default()
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.workload, &self.user, self.tags.is_empty()) {
            (Some(workload), _, _) => f.write_str(workload),
            (None, _, false) => f.write_str(&self.tags.join(",")),
            (None, Some(user), true) => f.write_str(user),
            (None, None, true) => f.write_str("(untagged)"),
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
    /// The inbound packet filter for this node's addresses.
    pub filter: PacketFilter,
    /// Application capabilities that grants give sources on this node.
    pub capabilities: Vec<AppGrant>,
}

impl NetMap {
    /// Applies `delta` as every holder of a view does: upserted peers
    /// replace the peer with their id or join at the end (in the delta's
    /// order, the last of repeated ids winning), removals win over upserts,
    /// and the filter, capabilities and self are replaced when present.
    /// Linear in the peers held and the delta's size, so a node folding
    /// every delta into its view never pays peers × changes.
    pub fn apply(&mut self, delta: NetMapDelta) {
        let removed: HashSet<NodeId> = delta.remove_peers.into_iter().collect();
        let mut order = Vec::new();
        let mut latest = HashMap::with_capacity(delta.upsert_peers.len());
        for peer in delta.upsert_peers {
            let id = peer.id;
            if latest.insert(id, peer).is_none() {
                order.push(id);
            }
        }
        self.peers.retain_mut(|peer| {
            if removed.contains(&peer.id) {
                return false;
            }
            if let Some(newer) = latest.remove(&peer.id) {
                *peer = newer;
            }
            true
        });
        self.peers.extend(
            order
                .into_iter()
                .filter(|id| !removed.contains(id))
                .filter_map(|id| latest.remove(&id)),
        );
        if let Some(filter) = delta.filter {
            self.filter = filter;
        }
        if let Some(capabilities) = delta.capabilities {
            self.capabilities = capabilities;
        }
        if let Some(node) = delta.self_node {
            self.self_node = node;
        }
        self.revision = delta.revision;
    }
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
    pub filter: Option<PacketFilter>,
    /// The new capabilities, when they changed.
    pub capabilities: Option<Vec<AppGrant>>,
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
    /// Underlay UDP endpoints to send its WireGuard packets to: candidates
    /// for a direct path, which the node probes before it trusts one.
    pub endpoints: Vec<SocketAddr>,
    /// The relay (a name from [`ServerMessage::Relays`]) the peer is
    /// reachable through when no direct path works.
    pub home_relay: Option<String>,
    /// Who it is.
    pub identity: Identity,
}

/// A node's inbound packet filter: its rules and what happens to a packet
/// no rule matches.
///
/// Precedence: return traffic of a flow this node opened passes; then a
/// matching [`RuleAction::Deny`] drops; then a matching
/// [`RuleAction::AuditDeny`] passes and is logged as a would-be denial; then
/// a matching [`RuleAction::Accept`] passes; otherwise `default` decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PacketFilter {
    /// The rules, in any order (precedence is by action, not position).
    pub rules: Vec<FilterRule>,
    /// What happens to a packet no rule matches.
    pub default: DefaultAction,
}

impl PacketFilter {
    /// Shrinks the filter without changing any decision or the policy line
    /// a decision names, so large policies make small netmaps: every rule's
    /// prefixes are aggregated (repeats and adjacent prefixes merged), a rule
    /// that repeats an earlier one of the same action but another line is
    /// dropped (the earlier rule always names the line), and consecutive
    /// rules of one line that differ only in their sources become one.
    /// Ports are never merged: an accept rule admits fragments only when it
    /// admits every port, which a union of ranges could change.
    pub fn compact(&mut self) {
        for rule in &mut self.rules {
            rule.src = IpNet::aggregate(&rule.src);
            rule.dst = IpNet::aggregate(&rule.dst);
        }
        let keep: Vec<bool> = {
            let mut seen = HashSet::with_capacity(self.rules.len());
            self.rules
                .iter()
                .map(|r| seen.insert((&r.src, &r.dst, &r.ports, &r.protocols, r.action)))
                .collect()
        };
        let mut keep = keep.into_iter();
        self.rules.retain(|_| keep.next().unwrap_or(true));
        let mut merged: Vec<(FilterRule, bool)> = Vec::with_capacity(self.rules.len());
        for rule in self.rules.drain(..) {
            match merged.last_mut() {
                Some((last, grown))
                    if last.policy_line == rule.policy_line
                        && last.action == rule.action
                        && last.dst == rule.dst
                        && last.ports == rule.ports
                        && last.protocols == rule.protocols =>
                {
                    last.src.extend(rule.src);
                    *grown = true;
                }
                _ => merged.push((rule, false)),
            }
        }
        self.rules = merged
            .into_iter()
            .map(|(mut rule, grown)| {
                if grown {
                    rule.src = IpNet::aggregate(&rule.src);
                }
                rule
            })
            .collect();
    }
}

/// What a filter does with a packet no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DefaultAction {
    /// Drop it (default deny).
    #[default]
    Deny,
    /// Pass it and log a would-be denial: the whole policy is in audit mode.
    AuditDeny,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuleAction {
    /// Admit the packet.
    #[default]
    Accept,
    /// Drop the packet, whatever accept rules say.
    Deny,
    /// A deny rule in audit mode: admit the packet, log a would-be denial.
    AuditDeny,
}

/// An application capability a grant gives sources on this node. weft does
/// not enforce it in the tunnel; applications ask the node's local API.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppGrant {
    /// Sources the capability is granted to.
    pub src: Vec<IpNet>,
    /// The capability's name, e.g. `example.com/cap/admin`.
    pub name: String,
    /// The capability's values, each a JSON document.
    pub values: Vec<String>,
    /// The policy line of the grant.
    pub policy_line: u32,
}

/// One rule of a node's stateful inbound packet filter.
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
    /// What a match does.
    pub action: RuleAction,
    /// The policy line the rule came from, for audit logs.
    pub policy_line: u32,
    /// The rule's stable id, for flow records.
    pub rule_id: RuleId,
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
