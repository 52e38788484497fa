//! The device's control surface: what it is asked ([`Command`](super::Command)
//! carries these requests) and what it reports. `weftd` serves them as the
//! JSON bodies of its local API, whose paths the docs name.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use weft_proto::{AuthKey, PublicKey};

pub use weft_dataplane::core::PathKind;

/// `POST /v1/up`: join (or rejoin) an overlay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpRequest {
    /// The coordinator's replicas, `HOST:PORT` each, tried in order: a
    /// JSON list, or one string (comma-separated).
    pub coordinator: crate::coordinators::Coordinators,
    /// The coordinator's public key, base64, as `weft-coordinator key` prints it.
    #[serde(with = "crate::key_text")]
    pub coordinator_key: PublicKey,
    /// A pre-auth key; not needed when this machine is already a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key: Option<AuthKey>,
    /// The name to ask for; defaults to the host's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Without an auth key, log in with the device-code flow instead of a browser link.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub device_code: bool,
    /// Join as a workload with the identity token in this file, which
    /// weftd reads (and re-reads to renew) itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_token_file: Option<std::path::PathBuf>,
}

/// `POST /v1/login`: log a person in again, keeping the node's addresses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoginRequest {
    /// Use the device-code flow instead of a browser link.
    #[serde(default)]
    pub device_code: bool,
}

/// The answer to `POST /v1/up` and `POST /v1/login`: connected (200), or a
/// person must log in first (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UpReply {
    /// Registered and running.
    Running(SelfStatus),
    /// Waiting for a person to log in; `GET /v1/status` says when they did.
    LoginRequired(LoginPending),
}

/// Where a person completes the login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginPending {
    /// The URL to open in a browser.
    pub login_url: String,
    /// For the device-code flow, the code to enter there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    /// How long the URL stays valid.
    pub expires_in_secs: u64,
}

/// The device's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Registered, with a netmap in force (the coordinator may be briefly away).
    Running,
    /// Not connected, by the operator's choice.
    Stopped,
    /// Trying to reach or register with the coordinator.
    Connecting,
    /// The coordinator wants an auth key (missing, invalid, used or expired).
    NeedsAuth,
    /// A person must log in: a login is waiting at a URL, or the device's
    /// login expired (`weft login`).
    NeedsLogin,
    /// An administrator deleted this node.
    Deleted,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The connection state.
    pub state: RunState,
    /// Why the state is what it is, when that needs saying (a refusal, a connection error).
    #[serde(default)]
    pub message: Option<String>,
    /// The link a person must open to log this node in, while a login
    /// waits. Whoever opens it first decides whose identity the node joins
    /// as, so only root and weftd's own user see it: never members of the
    /// socket's group, and never the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_url: Option<String>,
    /// This node, once registered.
    #[serde(rename = "self")]
    pub self_node: Option<SelfStatus>,
    /// The coordinator.
    pub coordinator: CoordinatorStatus,
    /// The peers in the netmap.
    pub peers: Vec<PeerSummary>,
    /// Packet-filter counters.
    pub filter: FilterStatus,
    /// Flow records on their way to the coordinator.
    #[serde(default)]
    pub flows: FlowLogStatus,
}

/// The flow log: records of the flows this node filtered and opened, held
/// until the coordinator acknowledges them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogStatus {
    /// Records made since weftd started.
    pub recorded: u64,
    /// Records not yet acknowledged: queued, being batched, or in batches
    /// sent or spooled.
    pub queued: u64,
    /// Batches held in the spool until acknowledged.
    pub spooled_batches: u64,
    /// Their size in bytes.
    pub spool_bytes: u64,
    /// Records dropped since weftd started because a queue or the spool
    /// was full (and denied packets the summary table had no room for).
    pub dropped: u64,
    /// The id of the last batch the coordinator acknowledged.
    #[serde(default)]
    pub last_acked_batch: Option<u64>,
}

/// This node as the coordinator registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfStatus {
    /// The node's unique name.
    pub hostname: String,
    /// Overlay addresses: IPv4 then IPv6.
    pub addresses: Vec<IpAddr>,
    /// Tags, or the owning user.
    pub identity: String,
    /// The coordinator's id for the node.
    pub id: u64,
    /// The node's WireGuard public key (workloads rotate it at every renewal).
    pub node_key: String,
    /// When the node's key expires (RFC 3339), for keys a login or a
    /// workload token issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<String>,
}

/// The coordinator the node is configured for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// The configured replicas, comma-separated, once `weft up` has named them.
    pub address: Option<String>,
    /// Whether a control session is established.
    pub connected: bool,
    /// The replica's socket address the session is established with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_to: Option<SocketAddr>,
}

/// One peer's tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// The peer's unique name.
    pub hostname: String,
    /// Its overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Its tags, or its owning user.
    pub identity: String,
    /// The underlay endpoint its packets come from or go to.
    pub endpoint: Option<SocketAddr>,
    /// How the peer is reached now: `direct` (to `endpoint`), `relay`
    /// (through `relay`), or null while there is no way yet.
    #[serde(default)]
    pub path: Option<PathKind>,
    /// The relay carrying the peer's packets when `path` is `relay`.
    #[serde(default)]
    pub relay: Option<String>,
    /// When the last WireGuard handshake completed, RFC 3339 (UTC).
    pub last_handshake: Option<String>,
    /// Bytes received through the tunnel.
    pub rx_bytes: u64,
    /// Bytes sent through the tunnel.
    pub tx_bytes: u64,
}

/// `POST /v1/ping`: one disco ping to a peer over its current path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingRequest {
    /// The peer's name or one of its overlay addresses.
    pub peer: String,
}

/// The answer to one ping: a pong, or a timeout after 2 s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    /// The peer's name.
    pub peer: String,
    /// The peer's first overlay address.
    pub address: Option<IpAddr>,
    /// Whether a pong came back.
    pub pong: bool,
    /// The path the pong came over.
    pub path: Option<PathKind>,
    /// The relay it came through, for `path` `relay`.
    pub relay: Option<String>,
    /// The peer's underlay endpoint it came from, for `path` `direct`.
    pub endpoint: Option<SocketAddr>,
    /// The round-trip time in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// `GET /v1/netcheck`: what endpoint discovery found and how the relays are reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// Whether STUN answers arrived on the WireGuard socket in the last round.
    pub udp: bool,
    /// How the NAT in front of this node maps the WireGuard socket:
    /// `endpoint-independent`, `endpoint-dependent`, or null when fewer
    /// than two STUN servers answered.
    pub mapping: Option<String>,
    /// The WireGuard socket's address as each relay's STUN server saw it.
    pub reflexive: Vec<ReflexiveEndpoint>,
    /// The host's own addresses with the WireGuard port.
    pub local: Vec<SocketAddr>,
    /// Every relay the coordinator lists, the home relay first.
    pub relays: Vec<RelayReport>,
}

/// One STUN answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflexiveEndpoint {
    /// The relay whose STUN server answered.
    pub relay: String,
    /// The address it saw.
    pub endpoint: SocketAddr,
}

/// One relay as this node reaches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayReport {
    /// The relay's name.
    pub name: String,
    /// Whether it is this node's home relay, the one peers reach it through.
    pub home: bool,
    /// The session's transport, or null while it is down.
    pub transport: Option<RelayTransport>,
    /// The round-trip time in milliseconds, while connected.
    pub rtt_ms: Option<f64>,
    /// The largest packet a QUIC session carries as one datagram now;
    /// larger ones travel on the session's stream. Null over TCP, which
    /// carries every packet on its stream.
    pub max_payload: Option<usize>,
    /// Packets larger than `max_payload` that went on the QUIC stream.
    pub oversized: u64,
    /// Packets dropped because the session was down or congested.
    pub dropped: u64,
}

/// How a relay session is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTransport {
    /// QUIC datagrams over UDP.
    Quic,
    /// Stream frames over TLS on TCP, where UDP is blocked.
    Tcp,
}

/// Packet-filter counters for traffic arriving from the tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterStatus {
    /// Packets admitted.
    pub accepted: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Packets an explicit deny rule dropped (counted in `dropped` too).
    #[serde(default)]
    pub denied_by_rule: u64,
    /// Flows that passed only because a deny rule or the whole policy is in
    /// audit mode (each logged as a would-be denial).
    #[serde(default)]
    pub audit_passed: u64,
    /// Outbound packets longer than the tunnel's MTU answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" (path MTU discovery).
    #[serde(default)]
    pub too_big_sent: u64,
    /// Outbound packets longer than the tunnel's MTU dropped without an
    /// answer (rate limit, ICMP errors, sources other than this node).
    #[serde(default)]
    pub too_big_suppressed: u64,
    /// Packets from a peer whose source address is not one of that peer's:
    /// a compromised or misconfigured peer trying to speak for another.
    #[serde(default)]
    pub spoofed: u64,
    /// Datagrams on the WireGuard port that are not valid WireGuard, fail
    /// authentication, or come from a key the netmap does not have.
    #[serde(default)]
    pub invalid_datagrams: u64,
    /// Frames from the TUN device that could not be split into packets
    /// (a bad offload header or checksum request): dropped, never sent.
    #[serde(default)]
    pub malformed_frames: u64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> Status {
        Status {
            state: RunState::Running,
            message: None,
            login_url: None,
            self_node: Some(SelfStatus {
                hostname: "web-1".into(),
                addresses: vec![
                    "100.64.0.1".parse().unwrap(),
                    "fd7a:115c:a1e0::1".parse().unwrap(),
                ],
                identity: "tag:web".into(),
                id: 1,
                node_key: "AAAA".into(),
                key_expiry: None,
            }),
            coordinator: CoordinatorStatus {
                address: Some("198.51.100.1:7443".into()),
                connected: true,
                connected_to: Some("198.51.100.1:7443".parse().unwrap()),
            },
            peers: vec![PeerSummary {
                hostname: "db-1".into(),
                addresses: vec!["100.64.0.2".parse().unwrap()],
                identity: "tag:db".into(),
                endpoint: Some("192.0.2.20:51820".parse().unwrap()),
                path: Some(PathKind::Direct),
                relay: None,
                last_handshake: Some("2026-01-01T00:00:00Z".into()),
                rx_bytes: 10,
                tx_bytes: 20,
            }],
            filter: FilterStatus {
                accepted: 3,
                dropped: 4,
                ..FilterStatus::default()
            },
            flows: FlowLogStatus {
                recorded: 12,
                queued: 2,
                spooled_batches: 1,
                spool_bytes: 900,
                dropped: 0,
                last_acked_batch: Some(41),
            },
        }
    }

    #[test]
    fn status_json_has_the_documented_shape() {
        let value = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            value,
            json!({
                "state": "running",
                "message": null,
                "self": {
                    "hostname": "web-1",
                    "addresses": ["100.64.0.1", "fd7a:115c:a1e0::1"],
                    "identity": "tag:web",
                    "id": 1,
                    "node_key": "AAAA"
                },
                "coordinator": {
                    "address": "198.51.100.1:7443",
                    "connected": true,
                    "connected_to": "198.51.100.1:7443"
                },
                "peers": [{
                    "hostname": "db-1",
                    "addresses": ["100.64.0.2"],
                    "identity": "tag:db",
                    "endpoint": "192.0.2.20:51820",
                    "path": "direct",
                    "relay": null,
                    "last_handshake": "2026-01-01T00:00:00Z",
                    "rx_bytes": 10,
                    "tx_bytes": 20
                }],
                "filter": {
                    "accepted": 3,
                    "dropped": 4,
                    "denied_by_rule": 0,
                    "audit_passed": 0,
                    "too_big_sent": 0,
                    "too_big_suppressed": 0,
                    "spoofed": 0,
                    "invalid_datagrams": 0,
                    "malformed_frames": 0
                },
                "flows": {
                    "recorded": 12,
                    "queued": 2,
                    "spooled_batches": 1,
                    "spool_bytes": 900,
                    "dropped": 0,
                    "last_acked_batch": 41
                }
            })
        );
        let back: Status = serde_json::from_value(value).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn states_are_kebab_case() {
        assert_eq!(
            serde_json::to_value(RunState::NeedsAuth).unwrap(),
            json!("needs-auth")
        );
        assert_eq!(
            serde_json::to_value(RunState::Deleted).unwrap(),
            json!("deleted")
        );
    }

    #[test]
    fn an_up_request_carries_the_key_as_text_and_hides_the_auth_key_in_debug() {
        let key = weft_proto::PrivateKey::generate().public_key();
        let request = UpRequest {
            coordinator: "198.51.100.1:7443".parse().unwrap(),
            coordinator_key: key,
            auth_key: Some(AuthKey::new("weft-auth-0123456789ab-secretsecret")),
            hostname: None,
            device_code: false,
            identity_token_file: None,
        };
        let value = serde_json::to_value(&request).unwrap();
        assert_eq!(value["coordinator_key"], json!(key.to_string()));
        assert_eq!(
            value["auth_key"],
            json!("weft-auth-0123456789ab-secretsecret")
        );
        assert!(!format!("{request:?}").contains("secretsecret"));
        let bad = json!({"coordinator": "x:1", "coordinator_key": "nope"});
        let err = serde_json::from_value::<UpRequest>(bad).unwrap_err();
        assert!(err.to_string().contains("invalid key"), "{err}");
    }
}
