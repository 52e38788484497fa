//! weft's connection layer, written once for every client and server: QUIC
//! and TLS-over-TCP with the Noise `IK` handshake bound to the TLS session
//! ([`handshake`]), the TLS configurations under them ([`tls`]), the static
//! key files of coordinators and relays ([`keyfile`]), the private local
//! sockets of the admin and local APIs ([`unix`]), the node side of the
//! relay protocol ([`relay`]), and the `/metrics` endpoint of every
//! component's `--metrics-listen` ([`metrics_http`]).
//!
//! The wire contract — the handshake's state machine, frames, relay
//! messages — is [`weft_proto`]'s; this crate only moves its bytes. The node
//! (control and relay clients), the relay (listeners and coordinator feed)
//! and the coordinator (control listeners) build on it, never on each other.

pub mod handshake;
pub mod keyfile;
pub mod metrics_http;
pub mod relay;
pub mod tls;
pub mod unix;

use weft_proto::handshake::Purpose;

/// A weft service a connection reaches: what it speaks and how it is named
/// on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The coordinator's control protocol.
    Control,
    /// A relay.
    Relay,
}

impl Service {
    /// The TLS ALPN protocol.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Service::Control => weft_proto::ALPN,
            Service::Relay => weft_proto::relay::RELAY_ALPN,
        }
    }

    /// The TLS exporter label of the value that binds the Noise handshake
    /// to the TLS session.
    pub fn exporter_label(self) -> &'static [u8] {
        match self {
            Service::Control => weft_proto::EXPORTER_LABEL,
            Service::Relay => weft_proto::relay::RELAY_EXPORTER_LABEL,
        }
    }

    /// The TLS server name clients send and certificates carry; nobody
    /// checks it (see [`tls`]).
    pub fn server_name(self) -> &'static str {
        match self {
            Service::Control => "weft-coordinator",
            Service::Relay => "weft-relay",
        }
    }

    /// The Noise handshake's purpose.
    pub fn purpose(self) -> Purpose {
        match self {
            Service::Control => Purpose::Control,
            Service::Relay => Purpose::Relay,
        }
    }
}
