//! weft's node: the `weftd` daemon and the `weft` CLI.
//!
//! The Linux shell around the sans-IO data plane (`weft-dataplane`) and the
//! device engine (`weft-engine`, the control client): the TUN device and
//! netlink, the UDP socket, relay sessions, posture collection, the local
//! API and the command line.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod endpoints;
pub mod host;
pub mod posture;
pub mod tun_device;
