//! The daemon's local API: HTTP/1.1 with JSON bodies over a Unix socket.
//!
//! The socket is mode 0600, so only its owner (root) may drive the daemon.
//!
//! | Method and path   | Request body                                               | Response                         |
//! |-------------------|------------------------------------------------------------|----------------------------------|
//! | `POST /v1/up`     | [`UpRequest`]: `coordinator`, `coordinator_key`, `auth_key?`, `hostname?` | [`SelfStatus`] once registered and the first netmap is applied (waits up to 30 s) |
//! | `POST /v1/down`   | none                                                       | [`Status`]                       |
//! | `GET /v1/status`  | none                                                       | [`Status`]                       |
//!
//! Errors are `{"error": "<sentence naming the problem and the fix>", "kind": "<kind>"}`
//! with a 4xx status for the caller's or the coordinator's refusal and 5xx for
//! the daemon's own failures; see [`ApiError`].

mod client;
mod error;
mod server;
mod types;

pub use client::{ApiClient, ClientError};
pub use error::{ApiError, ErrorBody};
pub use server::{bind, serve, Command, UP_TIMEOUT};
pub use types::{
    CoordinatorStatus, FilterStatus, PeerSummary, RunState, SelfStatus, Status, UpRequest,
};
