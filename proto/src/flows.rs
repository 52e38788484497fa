//! Flow records: what a node's filter decided about each flow, and the flows
//! the node opened, with both ends' identities, as nodes report them to the
//! coordinator.
//!
//! Both ends of a flow report it, and both compute the same [`FlowId`] from
//! what they both see — the opening packet's 5-tuple and, for TCP, the
//! initial sequence number of its SYN — so the two records join without
//! either end telling the other anything.
//!
//! A node sends records in [`FlowBatch`]es ([`crate::ClientMessage::Flows`])
//! of at most [`MAX_BATCH_RECORDS`] records and [`MAX_BATCH_BYTES`] encoded
//! bytes, and no more than
//! [`MAX_BATCHES_IN_FLIGHT`] unacknowledged at once; the coordinator answers
//! each with [`crate::ServerMessage::FlowsAck`] once it has kept it. A node
//! that gets no acknowledgement holds its records (bounded, drops counted)
//! and sends them again on its next session, so the coordinator may see a
//! batch twice: `(reporter, batch id)` identifies a batch across sessions.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ring::digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::messages::{Identity, NodeId};

/// The most records one batch holds.
pub const MAX_BATCH_RECORDS: usize = 128;

/// The most bytes one batch encodes to: inside the 64 KiB frame limit the
/// coordinator holds registered nodes to. One record with every field at
/// its limit ([`MAX_FIELD_LEN`], [`MAX_LIST_LEN`]) encodes to about 34 KiB,
/// so every record fits in a batch of its own.
pub const MAX_BATCH_BYTES: usize = 48 * 1024;

/// How many batches a node sends before it waits for an acknowledgement.
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// The most sample flow ids one denial summary carries.
pub const MAX_SUMMARY_IDS: usize = 8;

/// The longest string a record field may hold (names, users, groups, tags,
/// SPIFFE IDs, relay names); longer values are cut on the node.
pub const MAX_FIELD_LEN: usize = 256;

/// The most groups or tags one identity in a record lists.
pub const MAX_LIST_LEN: usize = 32;

/// The id both ends of a flow compute alike.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub [u8; 16]);

impl FlowId {
    /// The id of the flow opened by a packet of `protocol` (IP protocol
    /// number) from `src` to `dst` (ports, or the echo identifier as the
    /// source port of an ICMP echo request). `discriminator` tells apart
    /// flows that reuse a 5-tuple when both ends can see what does: the
    /// initial sequence number of a TCP SYN; 0 otherwise.
    pub fn compute(protocol: u8, src: SocketAddr, dst: SocketAddr, discriminator: u32) -> Self {
        let mut input = Vec::with_capacity(64);
        input.extend_from_slice(b"weft flow id v1");
        input.push(protocol);
        for end in [src, dst] {
            input.extend_from_slice(&canonical_ip(end.ip()).octets());
            input.extend_from_slice(&end.port().to_be_bytes());
        }
        input.extend_from_slice(&discriminator.to_be_bytes());
        let hash = digest::digest(&digest::SHA256, &input);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_ref()[..16]);
        Self(id)
    }
}

/// IPv4 addresses as IPv4-mapped IPv6, so both families hash alike.
fn canonical_ip(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The stable id of a policy rule: the same for the same entry wherever it
/// moves in the file, so a rule's flows can be followed across edits.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u64);

impl RuleId {
    /// The id of the rule written as `text` (the entry on one line, as the
    /// policy compiler normalises it).
    pub fn of_text(text: &str) -> Self {
        let hash = digest::digest(&digest::SHA256, text.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&hash.as_ref()[..8]);
        Self(u64::from_be_bytes(id))
    }
}

/// A hex id did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {len} hexadecimal digits, got {got:?}")]
pub struct IdParseError {
    what: &'static str,
    len: usize,
    got: String,
}

fn parse_hex<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], IdParseError> {
    let error = || IdParseError {
        what,
        len: N * 2,
        got: s.chars().take(N * 2 + 8).collect(),
    };
    if s.len() != N * 2 || !s.is_ascii() {
        return Err(error());
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).map_err(|_| error())?;
    }
    Ok(out)
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for FlowId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<16>(s, "a flow id").map(Self)
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for RuleId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<8>(s, "a rule id").map(|b| Self(u64::from_be_bytes(b)))
    }
}

/// Ids are hex strings in human-readable formats (JSON), bytes on the wire.
macro_rules! hex_serde {
    ($ty:ty, $raw:ty, $to_raw:expr, $from_raw:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    let raw: $raw = $to_raw(self);
                    raw.serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let text = String::deserialize(deserializer)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    <$raw>::deserialize(deserializer).map($from_raw)
                }
            }
        }
    };
}

hex_serde!(FlowId, [u8; 16], |id: &FlowId| id.0, FlowId);
hex_serde!(RuleId, u64, |id: &RuleId| id.0, RuleId);

/// One flow as one of its ends saw it, or a summary of denied flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The flow's id; for a denial summary, the first summarised flow's.
    pub id: FlowId,
    /// When the flow's first packet was seen (or the summary's interval
    /// began), in milliseconds since the Unix epoch, by the reporter's clock.
    pub start_ms: u64,
    /// When its last packet so far was seen (or the interval ended).
    pub end_ms: u64,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, …).
    pub protocol: u8,
    /// The end that opened the flow, with its port (the echo identifier of
    /// an ICMP echo request; 0 for protocols without ports, and for denial
    /// summaries, which group the opener's ports).
    pub src: SocketAddr,
    /// The end it was opened to.
    pub dst: SocketAddr,
    /// Which end reported the record.
    pub direction: FlowDirection,
    /// What the reporter's filter decided.
    pub verdict: FlowVerdict,
    /// The policy rule that decided, if one did (none for the default, for
    /// flows the reporter opened, and for return traffic).
    pub rule: Option<RuleRef>,
    /// Who opened the flow.
    pub src_identity: FlowEndpoint,
    /// Who it was opened to.
    pub dst_identity: FlowEndpoint,
    /// How the flow's packets travelled between the two nodes.
    pub path: FlowPath,
    /// Traffic from `src` to `dst`.
    pub to_dst: Traffic,
    /// Traffic from `dst` back to `src`.
    pub to_src: Traffic,
    /// Whether the flow is over (idle past its protocol's timeout, or its
    /// peer left); `false` for an interim report of a flow still open.
    pub ended: bool,
    /// Set when the record summarises denied flows of one interval.
    pub summary: Option<DenialSummary>,
}

/// Which end of the flow reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowDirection {
    /// The reporter is `dst`: its filter decided on the flow.
    Inbound,
    /// The reporter is `src`: it opened the flow (its filter does not decide
    /// what it sends; `dst`'s does).
    Outbound,
}

/// What the reporter's filter did with the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    /// An accept rule admitted it.
    Accept,
    /// A deny rule, or the default, dropped it.
    Deny,
    /// A deny rule in audit mode (or the audit-mode default) would have
    /// dropped it; it passed.
    AuditDeny,
    /// The reporter opened it; the other end's filter decides.
    Opened,
}

/// The rule that decided a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    /// The rule's line in the policy file.
    pub line: u32,
    /// The rule's stable id.
    pub id: RuleId,
}

/// One end of a flow: which node, and who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    /// The node, when the address belongs to one the reporter knows.
    pub node: Option<NodeId>,
    /// The node's name.
    pub name: Option<String>,
    /// Who the node is: its user and groups, SPIFFE ID, tags.
    pub identity: Identity,
}

/// How a flow's packets travelled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowPath {
    /// Peer to peer over the underlay.
    Direct,
    /// Through the named relay.
    Relay {
        /// The relay's name.
        name: String,
    },
    /// Not known: no packet of the flow crossed the tunnel yet.
    Unknown,
}

/// Packets and bytes (of the IP packets, before encryption) one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Denied flows summarised into one record: one per source node,
/// destination, port and rule per interval, never one per packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialSummary {
    /// How many distinct flows were denied.
    pub flows: u64,
    /// Ids of further denied flows, after the record's own, up to
    /// [`MAX_SUMMARY_IDS`] in all.
    pub more_ids: Vec<FlowId>,
}

/// Records a node sends in one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBatch {
    /// The batch's id: increasing per node, kept across restarts, so the
    /// coordinator can tell a batch sent again from a new one.
    pub id: u64,
    /// At most [`MAX_BATCH_RECORDS`].
    pub records: Vec<FlowRecord>,
    /// Records the node dropped since its previous batch, because its
    /// buffer or spool was full.
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_endpoint() -> impl Strategy<Value = FlowEndpoint> {
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of("[a-z0-9-]{1,20}"),
            proptest::option::of("[a-z]{1,8}@[a-z]{1,8}\\.com"),
            proptest::collection::vec("group:idp:[a-z]{1,10}", 0..3),
            proptest::collection::vec("tag:[a-z]{1,10}", 0..3),
        )
            .prop_map(|(node, name, user, groups, tags)| FlowEndpoint {
                node: node.map(NodeId),
                name,
                identity: Identity {
                    user,
                    groups,
                    workload: None,
                    tags,
                },
            })
    }

    /// Addresses as packets carry them: no IPv6 scope or flow label.
    fn arb_socket() -> impl Strategy<Value = SocketAddr> {
        (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    fn arb_record() -> impl Strategy<Value = FlowRecord> {
        (
            (any::<[u8; 16]>(), any::<u64>(), any::<u64>(), any::<u8>()),
            (arb_socket(), arb_socket(), any::<bool>()),
            (
                prop_oneof![
                    Just(FlowVerdict::Accept),
                    Just(FlowVerdict::Deny),
                    Just(FlowVerdict::AuditDeny),
                    Just(FlowVerdict::Opened)
                ],
                proptest::option::of((any::<u32>(), any::<u64>())),
            ),
            (arb_endpoint(), arb_endpoint()),
            proptest::option::of("[a-z0-9]{1,12}"),
            any::<[u64; 4]>(),
            proptest::option::of((
                any::<u64>(),
                proptest::collection::vec(any::<[u8; 16]>(), 0..8),
            )),
        )
            .prop_map(
                |(
                    (id, start_ms, end_ms, protocol),
                    (src, dst, inbound),
                    (verdict, rule),
                    (a, b),
                    relay,
                    t,
                    summary,
                )| FlowRecord {
                    id: FlowId(id),
                    start_ms,
                    end_ms,
                    protocol,
                    src,
                    dst,
                    direction: if inbound {
                        FlowDirection::Inbound
                    } else {
                        FlowDirection::Outbound
                    },
                    verdict,
                    rule: rule.map(|(line, id)| RuleRef {
                        line,
                        id: RuleId(id),
                    }),
                    src_identity: a,
                    dst_identity: b,
                    path: relay.map_or(FlowPath::Direct, |name| FlowPath::Relay { name }),
                    to_dst: Traffic {
                        packets: t[0],
                        bytes: t[1],
                    },
                    to_src: Traffic {
                        packets: t[2],
                        bytes: t[3],
                    },
                    ended: inbound,
                    summary: summary.map(|(flows, ids)| DenialSummary {
                        flows,
                        more_ids: ids.into_iter().map(FlowId).collect(),
                    }),
                },
            )
    }

    proptest! {
        #[test]
        fn batches_survive_the_wire(
            id in any::<u64>(),
            records in proptest::collection::vec(arb_record(), 0..6),
            dropped in any::<u64>(),
        ) {
            let batch = crate::ClientMessage::Flows(FlowBatch { id, records, dropped });
            let frame = crate::encode_frame(&batch).unwrap();
            let mut decoder = crate::FrameDecoder::new();
            decoder.push(&frame);
            prop_assert_eq!(decoder.next_message::<crate::ClientMessage>().unwrap(), Some(batch));
        }
    }

    #[test]
    fn a_record_with_every_field_at_its_limit_fits_a_batch() {
        let long = "x".repeat(MAX_FIELD_LEN);
        let endpoint = FlowEndpoint {
            node: Some(NodeId(u64::MAX)),
            name: Some(long.clone()),
            identity: Identity {
                user: Some(long.clone()),
                groups: vec![long.clone(); MAX_LIST_LEN],
                workload: Some(long.clone()),
                tags: vec![long.clone(); MAX_LIST_LEN],
            },
        };
        let any: SocketAddr = "[ffff::ffff]:65535".parse().unwrap();
        let record = FlowRecord {
            id: FlowId([0xff; 16]),
            start_ms: u64::MAX,
            end_ms: u64::MAX,
            protocol: 255,
            src: any,
            dst: any,
            direction: FlowDirection::Inbound,
            verdict: FlowVerdict::Deny,
            rule: Some(RuleRef {
                line: u32::MAX,
                id: RuleId(u64::MAX),
            }),
            src_identity: endpoint.clone(),
            dst_identity: endpoint,
            path: FlowPath::Relay { name: long },
            to_dst: Traffic {
                packets: u64::MAX,
                bytes: u64::MAX,
            },
            to_src: Traffic {
                packets: u64::MAX,
                bytes: u64::MAX,
            },
            ended: true,
            summary: Some(DenialSummary {
                flows: u64::MAX,
                more_ids: vec![FlowId([0xff; 16]); MAX_SUMMARY_IDS - 1],
            }),
        };
        let batch = crate::ClientMessage::Flows(FlowBatch {
            id: u64::MAX,
            records: vec![record],
            dropped: u64::MAX,
        });
        let len = crate::encode_frame(&batch).unwrap().len();
        assert!(len < MAX_BATCH_BYTES, "{len} bytes");
    }

    #[test]
    fn flow_ids_depend_on_every_input_and_not_on_the_address_family_spelling() {
        let a: SocketAddr = "100.64.0.1:40000".parse().unwrap();
        let b: SocketAddr = "100.64.0.2:5432".parse().unwrap();
        let id = FlowId::compute(6, a, b, 7);
        assert_eq!(id, FlowId::compute(6, a, b, 7));
        assert_ne!(id, FlowId::compute(17, a, b, 7));
        assert_ne!(id, FlowId::compute(6, b, a, 7));
        assert_ne!(id, FlowId::compute(6, a, b, 8));
        let mapped: SocketAddr = "[::ffff:100.64.0.1]:40000".parse().unwrap();
        assert_eq!(id, FlowId::compute(6, mapped, b, 7));
    }

    #[test]
    fn ids_print_as_hex_in_json_and_travel_as_bytes() {
        let id = FlowId([0xab; 16]);
        assert_eq!(id.to_string(), "abababababababababababababababab");
        assert_eq!(id.to_string().parse::<FlowId>().unwrap(), id);
        let wire = postcard::to_allocvec(&id).unwrap();
        assert_eq!(wire.len(), 16);
        assert_eq!(postcard::from_bytes::<FlowId>(&wire).unwrap(), id);
        let rule = RuleId::of_text(r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#);
        assert_eq!(rule.to_string().parse::<RuleId>().unwrap(), rule);
        assert!("xyz".parse::<FlowId>().is_err());
        assert!("é".repeat(16).parse::<FlowId>().is_err());
        assert!("00".repeat(9).parse::<RuleId>().is_err());
    }
}
