//! weft's data plane, without IO: everything a node does to packets, as
//! state machines driven by the caller.
//!
//! - [`core`]: the node's WireGuard sessions with its peers, direct paths
//!   and relays, endpoint discovery and disco pings. Packets and datagrams
//!   go in through `handle_*`, come out through `poll_*`, and every timer
//!   runs on the `now` the caller passes.
//! - [`filter`]: the stateful default-deny packet filter the policy compiles
//!   to, with connection tracking.
//! - [`offload`]: splitting and coalescing the TUN device's TCP and UDP
//!   super-packets (virtio-net headers, GSO/GRO).
//!
//! No sockets, no tokio, no TUN device: the daemon around it (`weft-node`)
//! owns those and moves bytes between them and this crate.

pub mod core;
pub mod filter;
pub mod offload;
