//! The admin API: JSON over HTTP/1.1 on the unix socket `DATA_DIR/admin.sock`.
//!
//! The socket is the access control: it is created with mode 0600 inside the
//! data directory, so only its owner (and root) can administer the overlay.

mod api;
mod client;
mod error;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_proto::{Identity, NodeId};

use crate::audit::AuditEntry;

pub(crate) use self::api::{router, AdminState, Peer};
pub use self::client::{AdminClient, ClientError};

/// The admin socket's file name inside the data directory.
pub(crate) const SOCKET_NAME: &str = "admin.sock";

/// A request to create an auth key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyRequest {
    /// `tag:NAME` tags for the nodes it admits.
    pub tags: Vec<String>,
    /// Whether it admits any number of nodes.
    pub reusable: bool,
    /// Whether its nodes are removed once offline.
    pub ephemeral: bool,
    /// Validity, in seconds.
    pub expiry_secs: u64,
}

/// A created auth key. The secret is shown only here, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedAuthKey {
    /// The non-secret id.
    pub id: String,
    /// The whole key, secret included.
    pub key: String,
    pub tags: Vec<String>,
    pub reusable: bool,
    pub ephemeral: bool,
    /// RFC 3339 expiry time.
    pub expires: String,
}

/// A node, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub identity: Identity,
    pub endpoints: Vec<SocketAddr>,
    /// What the node reports about itself (`node:os`, `custom:KEY`, …),
    /// which posture conditions and `weft policy check --devices` read.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Whether the node has a control session right now.
    pub online: bool,
    /// RFC 3339 registration time.
    pub created: String,
    pub ephemeral: bool,
}

/// A policy to install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// The name diagnostics refer to.
    pub file_name: String,
    pub source: String,
    /// Install even if the policy would lock out a declared administrator.
    #[serde(default)]
    pub force: bool,
}

/// The outcome of installing a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInstalled {
    /// How many of the policy's test checks passed.
    pub tests_passed: usize,
    /// Non-fatal diagnostics.
    pub warnings: Vec<String>,
}

/// The audit trail, as `weft-coordinator audit` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    /// The entries asked for, in chain order.
    pub entries: Vec<AuditEntry>,
    /// Entries this coordinator failed to append since it started (each
    /// one logged): events that happened but are missing from the trail.
    pub failed_appends: u64,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
}

/// The admin socket path of a data directory.
pub(crate) fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds the admin socket with mode 0600, replacing a stale one left by a
/// coordinator that did not shut down cleanly. The caller holds the data
/// directory's database lock, so no live coordinator owns that socket.
pub(crate) fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    weft_net::unix::bind_private(path)
}
