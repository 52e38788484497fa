//! weft's node: the `weftd` daemon and the `weft` CLI.
//!
//! [`core`] and [`filter`] are the sans-IO data plane; the other modules are
//! the tokio shell around it: the TUN device, the UDP socket, the control
//! client, the local API and the command line.

pub mod api;
pub mod cli;
pub mod control;
pub mod coordinators;
pub mod core;
pub mod daemon;
pub mod endpoints;
pub mod filter;
mod key_text;
pub mod netmap_cache;
pub mod offload;
pub mod posture;
pub mod state;
pub mod tun_device;
pub mod underlay;
