//! The control protocol between a weft node and its coordinator.
//!
//! Everything here is pure data and pure functions: no sockets, no clock, no
//! tasks. The coordinator and the node daemon each wrap it in a thin tokio
//! shell over QUIC.
//!
//! A session runs in three steps:
//!
//! 1. **Transport**: a QUIC connection (UDP, default port [`DEFAULT_PORT`]).
//!    QUIC's TLS certificate is not trusted on its own; it only provides the
//!    encryption that the next step binds to.
//! 2. **Handshake** ([`handshake`]): Noise `IK` over the first bidirectional
//!    stream. The node proves its machine key and checks the coordinator's
//!    static key, which the operator pinned. The Noise prologue carries a TLS
//!    exporter value of the QUIC connection, so a machine-in-the-middle with
//!    its own TLS session cannot complete the handshake.
//! 3. **Messages** ([`frame`], [`messages`]): length-prefixed, versioned
//!    frames carrying [`ClientMessage`] and [`ServerMessage`] values — a
//!    registration, then a full [`NetMap`] and a [`NetMapDelta`] for every
//!    change that concerns the node, each signed by the coordinator
//!    ([`signing`]) so a node can keep them and trust them after a restart.
//!    A node that reconnects may resume instead: it states what it holds and
//!    gets only the difference ([`resume`]).
//!
//! Nodes that cannot reach each other directly pass WireGuard packets through
//! relays; [`relay`] is that protocol, and how relays learn whom to admit.

pub mod canonical;
pub mod flows;
pub mod frame;
pub mod handshake;
pub mod keys;
pub mod messages;
pub mod relay;
pub mod resume;
pub mod signing;
pub mod stun;

pub use flows::{
    FlowBatch, FlowDirection, FlowEndpoint, FlowId, FlowPath, FlowRecord, FlowVerdict, RuleId,
    RuleRef, Traffic,
};
pub use frame::{
    encode_frame, DecodeError, EncodeError, FrameDecoder, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
pub use keys::{AuthKey, KeyParseError, PrivateKey, PublicKey};
pub use messages::{
    Advertisement, AppGrant, ClientMessage, Credential, DefaultAction, FilterRule, Identity,
    IdentityToken, LoginFlow, LoginPrompt, NetMap, NetMapDelta, NodeId, PacketFilter, Peer,
    PeerVersion, PortRange, Protocol, Refusal, RefusalCode, Register, Resume, RuleAction, SelfNode,
    ServerMessage, ViewDigest,
};
pub use relay::RelayInfo;
pub use signing::{NetmapKey, Opener, SignatureError, SignedRecord};

/// The UDP port the coordinator's control listener uses unless told otherwise.
pub const DEFAULT_PORT: u16 = 7443;

/// The ALPN protocol name of the control connection.
pub const ALPN: &[u8] = b"weft-control/1";

/// The TLS exporter label whose output binds the Noise handshake to the QUIC
/// connection it runs in.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-weft-control-binding";

/// QUIC application close code: the Noise handshake failed (wrong pinned
/// coordinator key, or a tampered connection).
pub const CLOSE_HANDSHAKE_FAILED: u32 = 0x101;
/// QUIC application close code: the peer sent a message this side could not decode.
pub const CLOSE_PROTOCOL_ERROR: u32 = 0x102;
/// QUIC application close code: the coordinator ended the session on purpose
/// (refused registration, node deleted, shutdown).
pub const CLOSE_BY_COORDINATOR: u32 = 0x103;
