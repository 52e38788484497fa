//! The device: what a node runs to be part of the overlay, on whatever
//! operating system hosts it.
//!
//! A [`Device`] holds the data-plane core and everything that feeds it: the
//! underlay socket ([`Underlay`], UDP with GSO and GRO batches), the relay
//! sessions, path discovery, the control session with its joins, logins and
//! a workload's identity renewal, and the status it reports. One loop drives
//! it ([`Device::run`]); the shell around it hands it [`Command`]s (its
//! control surface) and decides when it stops.
//!
//! The overlay interface's packets come through [`PacketIo`], and
//! everything else the device asks of the operating system through
//! [`Platform`]; the loop is generic over both, so the data path makes
//! direct calls.

mod command;
mod control_surface;
mod endpoints;
mod identity;
mod lifecycle;
mod main_loop;
mod packet_io;
mod paths;
mod platform;
mod relays;
mod status;
mod underlay;
mod whois;

pub use command::{Command, CommandError};
pub use control_surface::{
    CoordinatorStatus, FilterStatus, FlowLogStatus, LoginPending, LoginRequest, NetcheckReport,
    PathKind, PeerSummary, PingReply, PingRequest, ReflexiveEndpoint, RelayReport, RelayTransport,
    RunState, SelfStatus, Status, UpReply, UpRequest,
};
pub use lifecycle::Device;
pub use packet_io::PacketIo;
pub use platform::Platform;
pub use underlay::{RecvBatch, SendBatch, Underlay};
pub use whois::{lookup as whois_lookup, WhoIs, WhoIsIdentity, WhoIsNode};

use crate::state::StateError;

/// Why the device could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The state directory's keys or preferences cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The platform could not keep the underlay socket out of the tunnel.
    #[error("cannot keep the WireGuard socket out of the tunnel")]
    Protect(#[source] std::io::Error),
    /// The underlay socket cannot say where it is bound.
    #[error("cannot read the WireGuard socket's address")]
    Socket(#[source] std::io::Error),
    /// The overlay the device was told to join at start cannot be joined.
    #[error(transparent)]
    Join(CommandError),
    /// Reading the overlay interface failed.
    #[error("reading the TUN device failed")]
    Read(#[source] std::io::Error),
}
