//! weft's node: the `weftd` daemon and the `weft` CLI.
//!
//! The tokio shell around the sans-IO data plane (`weft-dataplane`): the
//! TUN device, the UDP socket, the control client, the local API and the
//! command line.

pub mod api;
pub mod cli;
pub mod control;
pub mod coordinators;
pub mod daemon;
pub mod endpoints;
mod key_text;
pub mod netmap_cache;
pub mod posture;
pub mod state;
pub mod tun_device;
pub mod underlay;
