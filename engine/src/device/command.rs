//! What the device is asked, and why it says no.

use std::net::IpAddr;

use tokio::sync::oneshot;

use super::control_surface::{
    LoginRequest, NetcheckReport, PingReply, PingRequest, Status, UpReply, UpRequest,
};
use super::whois::WhoIs;

/// A request for the device loop, with the channel for its answer: the
/// shell's interface (`weftd`'s local API, a mobile app) hands these over
/// so that all state lives in the loop.
#[derive(Debug)]
pub enum Command {
    /// Connect to a coordinator; answer once registered and the netmap is applied.
    Up(UpRequest, oneshot::Sender<Result<UpReply, CommandError>>),
    /// Log a person in again; answer with the login URL, or once running.
    Login(LoginRequest, oneshot::Sender<Result<UpReply, CommandError>>),
    /// Disconnect and remove the overlay addresses.
    Down(oneshot::Sender<Status>),
    /// Report the current status.
    Status(oneshot::Sender<Status>),
    /// Report the counters a metrics scrape renders.
    Metrics(oneshot::Sender<crate::metrics::NodeMetrics>),
    /// Say who owns an overlay address, and their capabilities here.
    WhoIs(IpAddr, oneshot::Sender<Result<WhoIs, CommandError>>),
    /// Send one disco ping; answer with its pong or timeout.
    Ping(
        PingRequest,
        oneshot::Sender<Result<PingReply, CommandError>>,
    ),
    /// Report endpoint discovery and the relay sessions.
    Netcheck(oneshot::Sender<NetcheckReport>),
}

/// Why the device refused or failed a [`Command`]. Every message names the
/// problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The request itself is invalid, or does not fit the device's state.
    #[error("{0}")]
    Invalid(String),
    /// The coordinator refused the node; the message is the coordinator's.
    #[error("{0}")]
    Refused(String),
    /// The coordinator could not be authenticated (wrong pinned key).
    #[error("{0}")]
    Handshake(String),
    /// What was asked for does not exist (e.g. an address no peer has).
    #[error("{0}")]
    NotFound(String),
    /// The device failed on its side (e.g. cannot configure the overlay interface).
    #[error("{0}")]
    Internal(String),
}
