//! weft's relay: forwards already-encrypted WireGuard packets between nodes
//! that cannot reach each other directly, admitting exactly the node keys
//! the coordinator lists.
//!
//! The wire contract is [`weft_proto::relay`]. This crate holds the sans-IO
//! forwarding [`core`], the server around it ([`Relay`]: QUIC, TLS-over-TCP
//! fallback, STUN responder, coordinator feed) and the node side
//! ([`client`]).

pub mod client;
pub mod core;
mod feed;
mod keyfile;
mod quic;
mod server;
mod stun;
mod tcp;
mod tls;

pub use client::{ClientError, RelayClient, TcpRelayClient};
pub use keyfile::{load_or_create_key, KeyFileError};
pub use server::{Relay, RelayOptions, StartError};
pub use tls::TlsError;
