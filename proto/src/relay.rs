//! The relay protocol: how nodes that cannot reach each other directly pass
//! their WireGuard packets through a `weft-relay`.
//!
//! A relay forwards packets that are already end-to-end encrypted by
//! WireGuard; it only decides *who may talk through it*. It admits exactly
//! the node keys the coordinator lists as admitted right now.
//!
//! # Node ↔ relay
//!
//! 1. **Transport**: QUIC on UDP (ALPN [`RELAY_ALPN`], default port
//!    [`DEFAULT_RELAY_PORT`]), or — where UDP is blocked — TLS 1.3 over TCP
//!    with the same ALPN. The self-signed certificate is never trusted on
//!    its own, exactly as on the control connection.
//! 2. **Handshake**: Noise IK ([`crate::handshake`]) with
//!    [`Purpose::Relay`](crate::handshake::Purpose::Relay) and the TLS
//!    exporter value for [`RELAY_EXPORTER_LABEL`] as binding. The node proves
//!    its **WireGuard node key** and pins the relay's key (from
//!    [`RelayInfo::key`]). On QUIC the handshake runs on the first
//!    bidirectional stream; on TCP it is the first bytes of the TLS stream.
//! 3. **Admission**: the relay answers on that stream with one stream frame
//!    (see below): [`Message::Admitted`], or [`Message::Closed`] with
//!    [`CLOSE_RELAY_NOT_ADMITTED`] when the coordinator does not admit the key.
//! 4. **Packets**: [`Message::Send`] from the node, [`Message::Recv`] to the
//!    node. On QUIC each is one unreliable QUIC datagram (no head-of-line
//!    blocking) — or, when it is larger than the connection's current
//!    datagram limit (a full 1500-byte-MTU WireGuard packet plus QUIC's
//!    overhead can be), one stream frame on the handshake stream, so no
//!    packet is lost for its size; on TCP each is one stream frame. A relay forwards a `Send`
//!    only when both keys are admitted and the destination is connected;
//!    otherwise it drops it silently (and counts it).
//! 5. **End**: when the sender's key leaves the admitted set (node deleted,
//!    expired, key rotated), the relay ends the session with
//!    [`CLOSE_RELAY_REMOVED`]: a QUIC application close code, or a final
//!    [`Message::Closed`] frame on TCP. A second session with the same key
//!    replaces the first ([`CLOSE_RELAY_REPLACED`]).
//!
//! # Stream frames
//!
//! ```text
//! +----------------+----------------------------+
//! | length: u16 BE | message (`encode`)         |
//! +----------------+----------------------------+
//! ```
//!
//! # Messages
//!
//! ```text
//! Send     0x01 | to:   32 B | payload      node  → relay
//! Recv     0x02 | from: 32 B | payload      relay → node
//! Admitted 0x03                             relay → node, stream only
//! Closed   0x04 | code: u32 BE              relay → node, stream only
//! ```
//!
//! # Relay ↔ coordinator
//!
//! The relay opens a control session like a node (Noise IK with
//! [`Purpose::Control`](crate::handshake::Purpose::Control), its relay key as
//! the machine key) and sends [`ClientMessage::RelayFeed`](crate::ClientMessage::RelayFeed)
//! instead of `Register`. The coordinator accepts only keys of relays in its
//! configuration and then streams [`ServerMessage::RelayAdmissions`](crate::ServerMessage::RelayAdmissions):
//! a full set, then changes.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// The UDP (QUIC) and TCP (TLS fallback) port a relay uses unless told otherwise.
pub const DEFAULT_RELAY_PORT: u16 = 7444;
/// The UDP port of a relay's STUN responder unless told otherwise.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// The ALPN protocol name of relay connections, QUIC and TLS alike.
pub const RELAY_ALPN: &[u8] = b"weft-relay/1";
/// The TLS exporter label whose output binds the relay handshake to its transport.
pub const RELAY_EXPORTER_LABEL: &[u8] = b"EXPORTER-weft-relay-binding";

/// The largest payload a [`Message::Send`] or [`Message::Recv`] carries: a
/// WireGuard packet of a 1500-byte tunnel MTU plus its overhead, with room
/// to spare. Over QUIC the connection's current datagram limit may be lower;
/// see `max_datagram_size` of the transport.
pub const MAX_PAYLOAD: usize = 1600;
/// The largest encoded message: type, key and payload.
pub const MAX_MESSAGE: usize = 1 + 32 + MAX_PAYLOAD;

/// Close code: the node key is not admitted by the coordinator.
pub const CLOSE_RELAY_NOT_ADMITTED: u32 = 0x201;
/// Close code: the node key was admitted but no longer is.
pub const CLOSE_RELAY_REMOVED: u32 = 0x202;
/// Close code: another session with the same node key took over.
pub const CLOSE_RELAY_REPLACED: u32 = 0x203;
/// Close code: the node sent more than its rate allows for too long.
pub const CLOSE_RELAY_RATE_LIMITED: u32 = 0x204;

/// A relay as nodes learn it from the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// A short name for status output and logs (`fra1`).
    pub name: String,
    /// The relay's QUIC address (UDP).
    pub address: SocketAddr,
    /// The relay's static key, pinned in the relay handshake.
    pub key: PublicKey,
    /// The relay's TLS-over-TCP fallback address, when it offers one.
    pub tcp_address: Option<SocketAddr>,
    /// The relay's STUN responder, when it runs one.
    pub stun_address: Option<SocketAddr>,
}

/// One message of the node ↔ relay protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Node → relay: forward `payload` to the node holding `to`.
    Send {
        /// The destination's node key.
        to: PublicKey,
        /// A WireGuard packet.
        payload: &'a [u8],
    },
    /// Relay → node: `payload` from the node authenticated as `from`.
    Recv {
        /// The sender's node key, as proven in its relay handshake.
        from: PublicKey,
        /// A WireGuard packet.
        payload: &'a [u8],
    },
    /// Relay → node: the key is admitted; packets may flow.
    Admitted,
    /// Relay → node: the session ends, for the reason in `code` (a `CLOSE_RELAY_*` value).
    Closed {
        /// Why.
        code: u32,
    },
}

/// Why bytes are not a relay message. The relay drops such datagrams; on a
/// stream, the session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Nothing at all.
    #[error("empty relay message")]
    Empty,
    /// A type byte this build does not know.
    #[error("unknown relay message type {0:#04x}; upgrade the older of node and relay")]
    UnknownType(u8),
    /// Too short for its type.
    #[error("relay message of type {kind:#04x} has {len} bytes, too short for its header")]
    Truncated {
        /// The type byte.
        kind: u8,
        /// Bytes received.
        len: usize,
    },
    /// A payload beyond [`MAX_PAYLOAD`], or trailing bytes after a fixed-size message.
    #[error("relay message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The limit for its type.
        max: usize,
    },
}

const SEND: u8 = 0x01;
const RECV: u8 = 0x02;
const ADMITTED: u8 = 0x03;
const CLOSED: u8 = 0x04;
const KEY_LEN: usize = 32;
const STREAM_HEADER: usize = 2;

impl Message<'_> {
    /// Appends the encoded message to `out`. Fails only for a payload
    /// beyond [`MAX_PAYLOAD`], which nothing may send.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        match self {
            Message::Send { to: key, payload } | Message::Recv { from: key, payload } => {
                if payload.len() > MAX_PAYLOAD {
                    return Err(MessageError::TooLarge {
                        len: 1 + KEY_LEN + payload.len(),
                        max: MAX_MESSAGE,
                    });
                }
                let kind = if matches!(self, Message::Send { .. }) {
                    SEND
                } else {
                    RECV
                };
                out.push(kind);
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(payload);
            }
            Message::Admitted => out.push(ADMITTED),
            Message::Closed { code } => {
                out.push(CLOSED);
                out.extend_from_slice(&code.to_be_bytes());
            }
        }
        Ok(())
    }

    /// The encoded message as a fresh buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, MessageError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out)?;
        Ok(out)
    }

    /// The encoded message as one stream frame (`u16` length, then the message).
    pub fn to_stream_frame(&self) -> Result<Vec<u8>, MessageError> {
        let mut out = Vec::with_capacity(STREAM_HEADER + self.encoded_len());
        out.extend_from_slice(&[0, 0]);
        self.encode(&mut out)?;
        let len = out.len() - STREAM_HEADER;
        // MAX_MESSAGE fits in a u16, so an encoded message always does.
        let len = u16::try_from(len).map_err(|_| MessageError::TooLarge {
            len,
            max: MAX_MESSAGE,
        })?;
        out[..STREAM_HEADER].copy_from_slice(&len.to_be_bytes());
        Ok(out)
    }

    fn encoded_len(&self) -> usize {
        match self {
            Message::Send { payload, .. } | Message::Recv { payload, .. } => {
                1 + KEY_LEN + payload.len()
            }
            Message::Admitted => 1,
            Message::Closed { .. } => 5,
        }
    }
}

/// Parses one message. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, MessageError> {
    let (&kind, rest) = bytes.split_first().ok_or(MessageError::Empty)?;
    let truncated = MessageError::Truncated {
        kind,
        len: bytes.len(),
    };
    match kind {
        SEND | RECV => {
            if bytes.len() > MAX_MESSAGE {
                return Err(MessageError::TooLarge {
                    len: bytes.len(),
                    max: MAX_MESSAGE,
                });
            }
            let (key, payload) = rest.split_first_chunk::<KEY_LEN>().ok_or(truncated)?;
            let key = PublicKey::from_bytes(*key);
            Ok(if kind == SEND {
                Message::Send { to: key, payload }
            } else {
                Message::Recv { from: key, payload }
            })
        }
        ADMITTED => match rest {
            [] => Ok(Message::Admitted),
            _ => Err(MessageError::TooLarge {
                len: bytes.len(),
                max: 1,
            }),
        },
        CLOSED => match rest.len() {
            4 => {
                let code = [rest[0], rest[1], rest[2], rest[3]];
                Ok(Message::Closed {
                    code: u32::from_be_bytes(code),
                })
            }
            n if n < 4 => Err(truncated),
            _ => Err(MessageError::TooLarge {
                len: bytes.len(),
                max: 5,
            }),
        },
        other => Err(MessageError::UnknownType(other)),
    }
}

/// Why a relay stream cannot be read further. The session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A frame length of zero or beyond [`MAX_MESSAGE`].
    #[error("relay stream frame of {len} bytes is outside 1..={MAX_MESSAGE}; the peer is not speaking weft's relay protocol")]
    BadLength {
        /// The announced length.
        len: usize,
    },
    /// The frame's message is malformed.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The stream ended inside a frame.
    #[error("relay stream ended in the middle of a frame")]
    Truncated,
}

/// Splits a relay byte stream into messages. Feed bytes with
/// [`StreamDecoder::push`], take messages with [`StreamDecoder::next_frame`].
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's message bytes, if one is buffered. Pass them to
    /// [`decode`]; a length outside the limits is an error before any
    /// payload is buffered.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, StreamError> {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let pending = &self.buf[self.start..];
        let Some(header) = pending.first_chunk::<STREAM_HEADER>() else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes(*header));
        if len == 0 || len > MAX_MESSAGE {
            return Err(StreamError::BadLength { len });
        }
        if pending.len() < STREAM_HEADER + len {
            return Ok(None);
        }
        let begin = self.start + STREAM_HEADER;
        self.start = begin + len;
        Ok(Some(&self.buf[begin..begin + len]))
    }

    /// Checks that the stream did not end inside a frame.
    pub fn finish(&self) -> Result<(), StreamError> {
        if self.start == self.buf.len() {
            Ok(())
        } else {
            Err(StreamError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; 32])
    }

    #[test]
    fn the_layout_is_type_key_payload() {
        let bytes = Message::Send {
            to: key(7),
            payload: b"wg",
        }
        .to_vec()
        .unwrap();
        assert_eq!(bytes[0], 0x01);
        assert_eq!(&bytes[1..33], &[7u8; 32]);
        assert_eq!(&bytes[33..], b"wg");
        assert_eq!(
            Message::Closed { code: 0x201 }.to_vec().unwrap(),
            [0x04, 0, 0, 2, 1]
        );
    }

    #[test]
    fn oversized_payloads_are_refused_both_ways() {
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(Message::Send {
            to: key(1),
            payload: &big
        }
        .to_vec()
        .is_err());
        let mut raw = vec![SEND];
        raw.extend_from_slice(&[1u8; 32]);
        raw.extend_from_slice(&big);
        assert!(matches!(decode(&raw), Err(MessageError::TooLarge { .. })));
        let max = vec![0u8; MAX_PAYLOAD];
        let frame = Message::Recv {
            from: key(1),
            payload: &max,
        }
        .to_stream_frame()
        .unwrap();
        assert_eq!(frame.len(), 2 + MAX_MESSAGE);
    }

    #[test]
    fn malformed_messages_name_the_problem() {
        assert_eq!(decode(&[]), Err(MessageError::Empty));
        assert_eq!(decode(&[0x09]), Err(MessageError::UnknownType(0x09)));
        assert!(matches!(
            decode(&[SEND, 1, 2]),
            Err(MessageError::Truncated { kind: SEND, len: 3 })
        ));
        assert!(decode(&[ADMITTED, 0]).is_err());
        assert!(decode(&[CLOSED, 0, 0]).is_err());
        assert!(MessageError::UnknownType(9).to_string().contains("upgrade"));
    }

    #[test]
    fn a_zero_or_huge_stream_length_is_refused_before_buffering() {
        let mut decoder = StreamDecoder::new();
        decoder.push(&[0, 0]);
        assert_eq!(decoder.next_frame(), Err(StreamError::BadLength { len: 0 }));
        let mut decoder = StreamDecoder::new();
        decoder.push(&u16::MAX.to_be_bytes());
        assert!(matches!(
            decoder.next_frame(),
            Err(StreamError::BadLength { .. })
        ));
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated() {
        let mut decoder = StreamDecoder::new();
        let frame = Message::Admitted.to_stream_frame().unwrap();
        decoder.push(&frame);
        decoder.push(&frame[..2]);
        assert_eq!(decoder.next_frame().unwrap(), Some(&[ADMITTED][..]));
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert_eq!(decoder.finish(), Err(StreamError::Truncated));
    }

    fn message() -> impl Strategy<Value = (u8, [u8; 32], Vec<u8>, u32)> {
        (
            0u8..4,
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD),
            any::<u32>(),
        )
    }

    fn build(kind: u8, k: [u8; 32], payload: &[u8], code: u32) -> Message<'_> {
        match kind {
            0 => Message::Send {
                to: PublicKey::from_bytes(k),
                payload,
            },
            1 => Message::Recv {
                from: PublicKey::from_bytes(k),
                payload,
            },
            2 => Message::Admitted,
            _ => Message::Closed { code },
        }
    }

    #[test]
    fn control_messages_are_appended_and_round_trip() {
        use crate::{encode_frame, ClientMessage, FrameDecoder, ServerMessage};
        let relays = ServerMessage::Relays(vec![RelayInfo {
            name: "fra1".into(),
            address: "203.0.113.10:7444".parse().unwrap(),
            key: key(3),
            tcp_address: Some("203.0.113.10:7444".parse().unwrap()),
            stun_address: None,
        }]);
        let admissions = ServerMessage::RelayAdmissions {
            full: true,
            add: vec![key(1), key(2)],
            remove: vec![key(4)],
        };
        let feed = ClientMessage::RelayFeed {
            name: "fra1".into(),
        };
        // postcard writes the variant index first: existing variants keep theirs.
        for (index, frame) in [
            (5u8, encode_frame(&relays).unwrap()),
            (6, encode_frame(&admissions).unwrap()),
            (3, encode_frame(&feed).unwrap()),
        ] {
            assert_eq!(frame[6], index);
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode_frame(&relays).unwrap());
        decoder.push(&encode_frame(&admissions).unwrap());
        assert_eq!(
            decoder.next_message::<ServerMessage>().unwrap(),
            Some(relays)
        );
        assert_eq!(
            decoder.next_message::<ServerMessage>().unwrap(),
            Some(admissions)
        );
        decoder.push(&encode_frame(&feed).unwrap());
        assert_eq!(decoder.next_message::<ClientMessage>().unwrap(), Some(feed));
    }

    proptest! {
        #[test]
        fn messages_round_trip((kind, k, payload, code) in message()) {
            let message = build(kind, k, &payload, code);
            let bytes = message.to_vec().unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), message);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode(&bytes);
            let mut decoder = StreamDecoder::new();
            decoder.push(&bytes);
            while let Ok(Some(frame)) = decoder.next_frame() {
                let _ = decode(frame);
            }
        }

        #[test]
        fn streams_split_anywhere_yield_the_same_messages(
            messages in proptest::collection::vec(message(), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut stream = Vec::new();
            for (kind, k, payload, code) in &messages {
                stream.extend(build(*kind, *k, payload, *code).to_stream_frame().unwrap());
            }
            let cut = cut.index(stream.len() + 1);
            let mut decoder = StreamDecoder::new();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                decoder.push(part);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    got.push(frame.to_vec());
                }
            }
            decoder.finish().unwrap();
            prop_assert_eq!(got.len(), messages.len());
            for (raw, (kind, k, payload, code)) in got.iter().zip(&messages) {
                prop_assert_eq!(decode(raw).unwrap(), build(*kind, *k, payload, *code));
            }
        }
    }
}
