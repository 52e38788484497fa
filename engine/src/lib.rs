//! weft's device engine: what a node runs that is not integration with its
//! operating system, so that `weftd` on Linux and a later mobile shell wrap
//! the same code.
//!
//! It owns the device ([`device`]): the loop around the data-plane core
//! (`weft-dataplane`), the WireGuard UDP socket, relay sessions, path
//! selection, identity renewal and the commands and status reports a shell
//! drives it with, and the Prometheus metrics a scrape renders from it
//! ([`metrics`]). It owns the control client ([`control`]) and what it
//! keeps between runs: the coordinator's replicas ([`coordinators`]), the
//! state directory and preferences ([`state`]) and the verified netmap cache
//! ([`netmap_cache`]). The operating system comes in through the
//! [`device::PacketIo`] and [`device::Platform`] traits, and the attributes a
//! node reports ([`posture`]) through a hook. The records of the flows the
//! node filters and opens go to the coordinator through [`flows`]. It builds on the wire contract
//! (`weft-proto`) and the connection layer (`weft-net`); it holds no TUN
//! device, netlink, local API, signal handling or command line, which stay
//! in the shell (`weft-node`).

pub mod control;
pub mod coordinators;
pub mod device;
pub mod flows;
pub mod key_text;
pub mod metrics;
pub mod netmap_cache;
pub mod posture;
pub mod state;
