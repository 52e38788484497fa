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
//! No sockets, no tokio, no TUN device, no clock and no ambient randomness:
//! the daemon around it (`weft-node`) owns those, moves bytes between them
//! and this crate, and passes the time and a random seed in. WireGuard's
//! Noise layer is vendored from boringtun (`wireguard`) so that its timers
//! run on that time too.

pub mod core;
pub mod filter;
pub mod offload;
mod wireguard;

/// The start of a test's clock: an arbitrary instant, since the crate
/// reads no clock of its own and tests only measure from it.
#[cfg(test)]
#[expect(
    clippy::disallowed_methods,
    reason = "tests need one real instant to count from"
)]
fn test_clock() -> std::time::Instant {
    std::time::Instant::now()
}
