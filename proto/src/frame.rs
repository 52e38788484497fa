//! Framing: how messages are laid out on a control stream.
//!
//! ```text
//! +----------------+-----------------+---------------------------+
//! | length: u32 BE | version: u16 BE | body: postcard(message)   |
//! +----------------+-----------------+---------------------------+
//! ```
//!
//! `length` counts the version and the body. Every frame carries the protocol
//! version, so a decoder refuses a message from an incompatible peer instead of
//! misreading it. The decoder is incremental: feed it bytes as they arrive and
//! take whole messages out.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The control protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 4;

/// The largest frame accepted, header excluded: 16 MiB holds a netmap of well
/// over 50,000 peers.
pub const MAX_FRAME_LEN: usize = 16 << 20;

const LEN_BYTES: usize = 4;
const VERSION_BYTES: usize = 2;

/// Why bytes from the peer could not be decoded. The stream cannot be trusted
/// after any of these; the session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is beyond the decoder's limit (or too short to hold a version).
    #[error("control frame length {len} is outside 2..={max} bytes; the peer is not speaking weft's control protocol")]
    BadLength {
        /// The length the peer announced.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// The frame is from another protocol version.
    #[error("peer speaks control protocol version {got}, this build speaks {PROTOCOL_VERSION}; upgrade the older of node and coordinator")]
    Version {
        /// The version the peer sent.
        got: u16,
    },
    /// The body is not a valid message.
    #[error("malformed control message: {source}")]
    Malformed {
        /// What the decoder found wrong.
        source: postcard::Error,
    },
    /// The stream ended inside a frame.
    #[error("control stream ended in the middle of a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes the frame needed.
        want: usize,
    },
}

/// A message that cannot be sent as one frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message is larger than a frame may be: the receiver
    /// would refuse it, so it is never sent.
    #[error("cannot encode control message: {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge {
        /// The encoded length, version included.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The message does not serialize.
    #[error("cannot encode control message: {source}")]
    Serialize {
        /// What the serializer found wrong.
        source: postcard::Error,
    },
}

/// Encodes one message as a frame.
pub fn encode_frame<M: Serialize>(message: &M) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; LEN_BYTES];
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let mut out =
        postcard::to_extend(message, out).map_err(|source| EncodeError::Serialize { source })?;
    let len = out.len() - LEN_BYTES;
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..LEN_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes a stream of frames incrementally.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder accepting frames up to [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_limit(MAX_FRAME_LEN)
    }

    /// An empty decoder accepting frames up to `max_len` bytes (at most
    /// [`MAX_FRAME_LEN`]). A coordinator reads nodes' frames with a small
    /// limit, so a peer that has not registered yet cannot make it buffer
    /// megabytes.
    pub fn with_limit(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }

    /// Changes the limit for frames from now on; a frame whose length
    /// prefix already arrived is held to the new limit too.
    pub fn set_limit(&mut self, max_len: usize) {
        self.max_len = max_len.min(MAX_FRAME_LEN);
    }

    /// The length of the frame being received, once its length prefix
    /// arrived: what a reader must be ready to buffer before the frame is
    /// whole.
    pub fn pending_len(&self) -> Option<usize> {
        let len = self.buf.get(..LEN_BYTES)?;
        Some(u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole message out, if one has arrived.
    ///
    /// A length prefix is checked as soon as it arrives, so an oversized frame
    /// is refused before its body is buffered.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, DecodeError> {
        let Some(len_bytes) = self.buf.get(..LEN_BYTES) else {
            return Ok(None);
        };
        let mut len = [0u8; LEN_BYTES];
        len.copy_from_slice(len_bytes);
        let len = u32::from_be_bytes(len) as usize;
        if !(VERSION_BYTES..=self.max_len).contains(&len) {
            return Err(DecodeError::BadLength {
                len,
                max: self.max_len,
            });
        }
        let Some(frame) = self.buf.get(LEN_BYTES..LEN_BYTES + len) else {
            return Ok(None);
        };
        let version = u16::from_be_bytes([frame[0], frame[1]]);
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::Version { got: version });
        }
        let message = postcard::from_bytes(&frame[VERSION_BYTES..])
            .map_err(|source| DecodeError::Malformed { source });
        self.buf.drain(..LEN_BYTES + len);
        message.map(Some)
    }

    /// Call when the stream has ended: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = match self.buf.get(..LEN_BYTES) {
            Some(l) => LEN_BYTES + u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize,
            None => LEN_BYTES,
        };
        Err(DecodeError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use proptest::prelude::*;

    use super::*;
    use crate::keys::{AuthKey, PublicKey};
    use crate::messages::*;

    fn arb_key() -> impl Strategy<Value = PublicKey> {
        any::<[u8; 32]>().prop_map(PublicKey::from_bytes)
    }

    fn arb_identity() -> impl Strategy<Value = Identity> {
        (
            proptest::option::of("[a-z]{1,8}@[a-z]{1,8}\\.com"),
            proptest::collection::vec("group:idp:[a-z]{1,10}", 0..3),
            proptest::option::of("spiffe://[a-z.]{1,10}/ns/[a-z]{1,8}/sa/[a-z]{1,8}"),
            proptest::collection::vec("tag:[a-z]{1,10}", 0..3),
        )
            .prop_map(|(user, groups, workload, tags)| Identity {
                user,
                groups,
                workload,
                tags,
            })
    }

    fn arb_action() -> impl Strategy<Value = RuleAction> {
        prop_oneof![
            Just(RuleAction::Accept),
            Just(RuleAction::Deny),
            Just(RuleAction::AuditDeny)
        ]
    }

    fn arb_filter() -> impl Strategy<Value = PacketFilter> {
        (proptest::collection::vec(arb_rule(), 0..5), any::<bool>()).prop_map(|(rules, audit)| {
            PacketFilter {
                rules,
                default: if audit {
                    DefaultAction::AuditDeny
                } else {
                    DefaultAction::Deny
                },
            }
        })
    }

    fn arb_grant() -> impl Strategy<Value = AppGrant> {
        (
            "[a-z./]{1,30}",
            proptest::collection::vec("\\{\"[a-z]{1,5}\": [0-9]{1,3}\\}", 0..3),
            any::<u32>(),
        )
            .prop_map(|(name, values, policy_line)| AppGrant {
                src: vec!["100.64.0.0/10".parse().unwrap()],
                name,
                values,
                policy_line,
            })
    }

    fn arb_self_node() -> impl Strategy<Value = SelfNode> {
        (
            any::<u64>(),
            "[a-z0-9-]{1,20}",
            any::<u32>(),
            any::<u128>(),
            arb_identity(),
        )
            .prop_map(|(id, name, v4, v6, identity)| SelfNode {
                id: NodeId(id),
                name,
                ipv4: Ipv4Addr::from(v4),
                ipv6: Ipv6Addr::from(v6),
                identity,
                key_expiry: None,
            })
    }

    /// Up to `max - 1` IPv4 underlay endpoints.
    fn arb_endpoints(max: usize) -> impl Strategy<Value = Vec<SocketAddr>> {
        proptest::collection::vec(
            (any::<u32>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
            0..max,
        )
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        (
            arb_self_node(),
            arb_key(),
            arb_endpoints(3),
            proptest::option::of("[a-z0-9-]{1,12}"),
        )
            .prop_map(|(node, node_key, endpoints, home_relay)| Peer {
                id: node.id,
                addresses: node.addresses().to_vec(),
                name: node.name,
                node_key,
                endpoints,
                home_relay,
                identity: node.identity,
            })
    }

    fn arb_rule() -> impl Strategy<Value = FilterRule> {
        (
            any::<u32>(),
            0u8..=32,
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            any::<u32>(),
            arb_action(),
        )
            .prop_map(|(ip, prefix, a, b, proto, line, action)| FilterRule {
                src: vec![ipnet::Ipv4Net::new(Ipv4Addr::from(ip), prefix)
                    .expect("prefix <= 32")
                    .into()],
                dst: vec![],
                ports: vec![PortRange {
                    first: a.min(b),
                    last: a.max(b),
                }],
                protocols: vec![Protocol::from_number(proto)],
                action,
                policy_line: line,
                rule_id: crate::flows::RuleId(u64::from(line) << 7 ^ u64::from(ip)),
            })
    }

    fn arb_server_message() -> impl Strategy<Value = ServerMessage> {
        prop_oneof![
            arb_self_node().prop_map(ServerMessage::Registered),
            "[ -~]{0,80}".prop_map(|message| ServerMessage::Refused(Refusal {
                code: RefusalCode::AuthKeyUsed,
                message
            })),
            (
                any::<u64>(),
                arb_self_node(),
                proptest::collection::vec(arb_peer(), 0..5),
                arb_filter(),
                proptest::collection::vec(arb_grant(), 0..3),
            )
                .prop_map(|(revision, self_node, peers, filter, capabilities)| {
                    ServerMessage::NetMap(NetMap {
                        revision,
                        self_node,
                        peers,
                        filter,
                        capabilities,
                    })
                }),
            (
                any::<u64>(),
                proptest::collection::vec(arb_peer(), 0..3),
                proptest::collection::vec(any::<u64>().prop_map(NodeId), 0..3),
                proptest::option::of(arb_filter()),
                proptest::option::of(proptest::collection::vec(arb_grant(), 0..3)),
            )
                .prop_map(
                    |(revision, upsert_peers, remove_peers, filter, capabilities)| {
                        ServerMessage::Delta(NetMapDelta {
                            revision,
                            upsert_peers,
                            remove_peers,
                            filter,
                            capabilities,
                            self_node: None,
                        })
                    },
                ),
            (
                "[ -~]{0,80}",
                proptest::option::of("[A-Z]{4}-[A-Z]{4}"),
                any::<u64>()
            )
                .prop_map(|(url, user_code, expires_in_secs)| {
                    ServerMessage::LoginRequired(LoginPrompt {
                        url,
                        user_code,
                        expires_in_secs,
                    })
                }),
        ]
    }

    fn register() -> ClientMessage {
        ClientMessage::Register(Register {
            credential: Some(Credential::AuthKey(AuthKey::new(
                "weft-auth-0123456789ab-secret",
            ))),
            hostname: "web-1".into(),
            node_key: PublicKey::from_bytes([7; 32]),
            endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
            home_relay: Some("fra1".into()),
            attributes: BTreeMap::from([("node:os".into(), "linux".into())]),
            resume: None,
        })
    }

    fn arb_resume() -> impl Strategy<Value = Resume> {
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<[u8; 16]>()), 0..32),
            any::<[[u8; 16]; 3]>(),
        )
            .prop_map(
                |(node, last_record, revision, peers, [filter, capabilities, self_node])| Resume {
                    node: NodeId(node),
                    last_record,
                    revision,
                    peers: peers
                        .into_iter()
                        .map(|(id, version)| PeerVersion {
                            id: NodeId(id),
                            version,
                        })
                        .collect(),
                    filter,
                    capabilities,
                    self_node,
                },
            )
    }

    fn arb_register() -> impl Strategy<Value = ClientMessage> {
        (
            "[a-z0-9-]{1,32}",
            arb_key(),
            arb_endpoints(4),
            proptest::option::of("[a-z0-9]{1,8}"),
            proptest::option::of(arb_resume()),
        )
            .prop_map(|(hostname, node_key, endpoints, home_relay, resume)| {
                ClientMessage::Register(Register {
                    credential: None,
                    hostname,
                    node_key,
                    endpoints,
                    home_relay,
                    attributes: BTreeMap::new(),
                    resume: resume.map(Box::new),
                })
            })
    }

    #[test]
    fn a_message_round_trips() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode_frame(&register()).unwrap());
        assert_eq!(
            decoder.next_message::<ClientMessage>().unwrap(),
            Some(register())
        );
        assert_eq!(decoder.next_message::<ClientMessage>().unwrap(), None);
        decoder.finish().unwrap();
    }

    #[test]
    fn a_frame_split_across_reads_is_reassembled() {
        let frame = encode_frame(&register()).unwrap();
        let mut decoder = FrameDecoder::new();
        for byte in &frame[..frame.len() - 1] {
            decoder.push(std::slice::from_ref(byte));
            assert_eq!(decoder.next_message::<ClientMessage>().unwrap(), None);
        }
        assert!(matches!(
            decoder.finish(),
            Err(DecodeError::Truncated { .. })
        ));
        decoder.push(&frame[frame.len() - 1..]);
        assert_eq!(
            decoder.next_message::<ClientMessage>().unwrap(),
            Some(register())
        );
    }

    #[test]
    fn another_version_is_refused_with_advice() {
        let mut frame = encode_frame(&register()).unwrap();
        frame[4..6].copy_from_slice(&9u16.to_be_bytes());
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame);
        let err = decoder.next_message::<ClientMessage>().unwrap_err();
        assert_eq!(err, DecodeError::Version { got: 9 });
        assert!(err.to_string().contains("upgrade"));
    }

    #[test]
    fn an_oversized_length_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decoder.next_message::<ServerMessage>(),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn the_pending_length_shows_once_the_prefix_arrived() {
        let frame = encode_frame(&ClientMessage::UpdateAttributes(BTreeMap::new())).unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..3]);
        assert_eq!(decoder.pending_len(), None);
        decoder.push(&frame[3..5]);
        assert_eq!(decoder.pending_len(), Some(frame.len() - LEN_BYTES));
        decoder.set_limit(frame.len() - LEN_BYTES - 1);
        decoder.push(&frame[5..]);
        assert!(matches!(
            decoder.next_message::<ClientMessage>(),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn a_decoder_with_a_small_limit_refuses_larger_frames() {
        let frame = encode_frame(&register()).unwrap();
        let mut decoder = FrameDecoder::with_limit(frame.len() - 5);
        decoder.push(&frame);
        assert!(matches!(
            decoder.next_message::<ClientMessage>(),
            Err(DecodeError::BadLength { .. })
        ));
        let mut decoder = FrameDecoder::with_limit(frame.len());
        decoder.push(&frame);
        assert!(decoder.next_message::<ClientMessage>().unwrap().is_some());
    }

    #[test]
    fn a_truncated_body_is_malformed() {
        let frame = encode_frame(&register()).unwrap();
        let mut cut = frame[..frame.len() - 5].to_vec();
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_be_bytes());
        let mut decoder = FrameDecoder::new();
        decoder.push(&cut);
        let err = decoder.next_message::<ClientMessage>().unwrap_err();
        let DecodeError::Malformed { source } = &err else {
            panic!("expected a malformed message, got {err:?}");
        };
        let cause =
            std::error::Error::source(&err).and_then(|s| s.downcast_ref::<postcard::Error>());
        assert_eq!(cause, Some(source));
        assert_eq!(
            err.to_string(),
            format!("malformed control message: {source}")
        );
    }

    /// Peers with ids from a handful, so upserts and removals meet.
    fn arb_close_peers(max: usize) -> impl Strategy<Value = Vec<Peer>> {
        proptest::collection::vec(
            arb_peer().prop_map(|mut peer| {
                peer.id = NodeId(peer.id.0 % 6);
                peer
            }),
            0..max,
        )
    }

    /// A delta applied the obvious way: each upsert replaces the peer with
    /// its id or is appended, then removals drop theirs.
    fn apply_by_definition(netmap: &mut NetMap, delta: NetMapDelta) {
        for peer in delta.upsert_peers {
            match netmap.peers.iter_mut().find(|p| p.id == peer.id) {
                Some(old) => *old = peer,
                None => netmap.peers.push(peer),
            }
        }
        netmap.peers.retain(|p| !delta.remove_peers.contains(&p.id));
        if let Some(filter) = delta.filter {
            netmap.filter = filter;
        }
        if let Some(capabilities) = delta.capabilities {
            netmap.capabilities = capabilities;
        }
        if let Some(node) = delta.self_node {
            netmap.self_node = node;
        }
        netmap.revision = delta.revision;
    }

    proptest! {
        #[test]
        fn a_delta_applies_as_defined(
            self_node in arb_self_node(),
            held in arb_close_peers(6),
            upsert_peers in arb_close_peers(6),
            remove in proptest::collection::vec(0u64..6, 0..3),
            filter in proptest::option::of(arb_filter()),
            new_self in proptest::option::of(arb_self_node()),
        ) {
            let mut seen = std::collections::HashSet::new();
            let held: Vec<Peer> = held.into_iter().filter(|p| seen.insert(p.id)).collect();
            let netmap = NetMap {
                revision: 1,
                self_node,
                peers: held,
                filter: PacketFilter::default(),
                capabilities: Vec::new(),
            };
            let delta = NetMapDelta {
                revision: 2,
                upsert_peers,
                remove_peers: remove.into_iter().map(NodeId).collect(),
                filter,
                capabilities: None,
                self_node: new_self,
            };
            let mut expected = netmap.clone();
            apply_by_definition(&mut expected, delta.clone());
            let mut applied = netmap;
            applied.apply(delta);
            prop_assert_eq!(applied, expected);
        }

        #[test]
        fn server_messages_round_trip(message in arb_server_message()) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&encode_frame(&message).unwrap());
            prop_assert_eq!(decoder.next_message::<ServerMessage>().unwrap(), Some(message));
        }

        #[test]
        fn registers_round_trip(message in arb_register()) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&encode_frame(&message).unwrap());
            prop_assert_eq!(decoder.next_message::<ClientMessage>().unwrap(), Some(message));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            for _ in 0..4 {
                match decoder.next_message::<ServerMessage>() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            let _ = decoder.next_message::<ClientMessage>();
        }

        #[test]
        fn corrupted_frames_never_panic(message in arb_server_message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut frame = encode_frame(&message).unwrap();
            for (at, byte) in flips {
                let at = at % frame.len();
                frame[at] ^= byte;
            }
            let mut decoder = FrameDecoder::new();
            decoder.push(&frame);
            let _ = decoder.next_message::<ServerMessage>();
        }
    }
}
