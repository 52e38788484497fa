//! weft's node: the `weftd` daemon and the `weft` CLI.
//!
//! The Linux shell around the device engine (`weft-engine`), which runs the
//! data plane, the UDP socket, relay sessions, path selection and the
//! control client: the TUN device ([`tun_device`], the engine's packet I/O),
//! netlink and the host's addresses ([`host`], its platform hooks), posture
//! collection, the local API, signals and the command line.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod host;
pub mod posture;
pub mod tun_device;
