//! weft's relay: forwards already-encrypted WireGuard packets between nodes
//! that cannot reach each other directly, admitting exactly the node keys
//! the coordinator lists.
//!
//! The wire contract is [`weft_proto::relay`]. This crate holds the sans-IO
//! forwarding [`core`] and the server around it ([`Relay`]: QUIC,
//! TLS-over-TCP fallback, STUN responder, coordinator feed) on the
//! connection layer of [`weft_net`], where the node side of the protocol
//! lives too ([`weft_net::relay`]), and its Prometheus [`metrics`].

pub mod core;
mod feed;
mod keyfile;
pub mod metrics;
mod quic;
mod server;
mod stun;
mod tcp;

pub use keyfile::load_or_create_key;
pub use server::{Relay, RelayOptions, StartError};
pub use weft_net::keyfile::KeyFileError;
pub use weft_net::tls::TlsError;
