//! The daemon's local API: HTTP/1.1 with JSON bodies over a Unix socket.
//!
//! The socket is mode 0600, so only its owner (root) may drive the daemon.
//!
//! | Method and path   | Request body                                               | Response                         |
//! |-------------------|------------------------------------------------------------|----------------------------------|
//! | `POST /v1/up`     | [`UpRequest`]: `coordinator`, `coordinator_key`, `auth_key?`, `hostname?` | [`SelfStatus`] once registered and the first netmap is applied (waits up to 30 s) |
//! | `POST /v1/down`   | none                                                       | [`Status`]                       |
//! | `GET /v1/status`  | none                                                       | [`Status`]                       |
//! | `POST /v1/ping`   | [`PingRequest`]: `peer` (name or overlay address)           | [`PingReply`] for one disco ping over the peer's current path: `pong`, `path`, `relay` or `endpoint`, `rtt_ms`; `pong: false` after 2 s; 404 for an unknown peer |
//! | `GET /v1/netcheck`| none                                                       | [`NetcheckReport`]: `udp`, `mapping`, `reflexive` endpoints, `local` endpoints, and each relay's `transport`, `rtt_ms`, `home`, `max_payload` and drop counters |
//! | `GET /metrics`   | none                                                       | The Prometheus exposition (OpenMetrics text) of [`weft_engine::metrics`]: peers by path, handshakes, bytes, drops by reason, filter verdicts, key expiry, netmap age, coordinator connection; no identities |
//! | `GET /v1/whois?addr=IP[:PORT]` | none                                          | [`WhoIs`]: the peer owning that overlay address (`node`: `id`, `name`, `addresses`), its `identity` (`user`, `groups`, `workload`, `tags`) and the `capabilities` the policy's grants give it on this node (`{"NAME": [JSON values…]}`); 404 for an address no peer has |
//!
//! Errors are `{"error": "<sentence naming the problem and the fix>", "kind": "<kind>"}`
//! with a 4xx status for the caller's or the coordinator's refusal and 5xx for
//! the daemon's own failures; see [`ApiError`].

mod client;
mod error;
mod server;
mod whois;

pub use client::{ApiClient, ClientError};
pub use error::{ApiError, ErrorBody};
pub use server::{bind, metrics_text, serve, UP_TIMEOUT};
pub use weft_engine::device::{
    whois_lookup, Command, CommandError, CoordinatorStatus, FilterStatus, FlowLogStatus,
    LoginPending, LoginRequest, NetcheckReport, PathKind, PeerSummary, PingReply, PingRequest,
    ReflexiveEndpoint, RelayReport, RelayTransport, RunState, SelfStatus, Status, UpReply,
    UpRequest, WhoIs, WhoIsIdentity, WhoIsNode,
};
pub use whois::{parse_address, WhoIsQuery};
