//! What an audit entry says, and the hash that chains it to the one before.
//!
//! An entry's hash is SHA-256 over a domain tag and the JSON encoding of
//! everything but the hash itself, fields in the order they are declared
//! here. The encoding is canonical because the types fix it: no maps, no
//! floats, and `serde_json` writes no whitespace. The stored form is the
//! same JSON with the hash added, so an entry whose stored bytes are not
//! exactly the re-encoding of what they decode to has been edited.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weft_proto::NodeId;

/// The `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Separates audit hashes from every other SHA-256 weft computes.
const DOMAIN: &[u8] = b"weft audit entry v1\n";

/// One record of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When it was recorded, in Unix seconds.
    pub time: u64,
    /// Who did it.
    pub actor: Actor,
    /// What happened.
    pub event: Event,
    /// The hex SHA-256 of the entry before ([`GENESIS_HASH`] for the first).
    pub prev_hash: String,
    /// The hex SHA-256 of this entry (see the module documentation).
    pub hash: String,
}

/// The hashed part of an entry: everything but its own hash.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time: u64,
    actor: &'a Actor,
    event: &'a Event,
    prev_hash: &'a str,
}

impl AuditEntry {
    /// The entry at `seq` after the entry hashed `prev_hash`, hashed.
    pub(crate) fn new(seq: u64, time: u64, actor: Actor, event: Event, prev_hash: String) -> Self {
        let mut entry = Self {
            seq,
            time,
            actor,
            event,
            prev_hash,
            hash: String::new(),
        };
        entry.hash = entry.computed_hash();
        entry
    }

    /// The hash the entry's content calls for.
    pub(crate) fn computed_hash(&self) -> String {
        let hashed = Hashed {
            seq: self.seq,
            time: self.time,
            actor: &self.actor,
            event: &self.event,
            prev_hash: &self.prev_hash,
        };
        // Serializing these types cannot fail: no maps with non-string keys.
        let body = serde_json::to_vec(&hashed).unwrap_or_default();
        let mut digest = Sha256::new();
        digest.update(DOMAIN);
        digest.update(&body);
        hex(&digest.finalize())
    }

    /// The time as RFC 3339.
    pub fn time_rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.time)).to_string()
    }
}

/// Who caused an audited event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Actor {
    /// A command on the admin socket, by the peer's uid (`None` when the
    /// kernel did not say).
    Admin {
        /// The connecting process's user id (`SO_PEERCRED`).
        uid: Option<u32>,
    },
    /// The coordinator following its `--policy` file, at start or on a change.
    PolicyFileWatcher,
    /// A coordinator replica's own housekeeping: deleting an ephemeral node
    /// that stayed offline.
    Replica,
    /// A node registering itself.
    Node {
        /// Its id.
        node: NodeId,
    },
    /// A person, by the email the identity provider vouched for.
    User {
        /// Their email address.
        email: String,
    },
    /// A workload, by the SPIFFE ID of its platform token.
    Workload {
        /// Its SPIFFE ID.
        spiffe_id: String,
    },
    /// A machine not (yet) known by a person or workload: the short form of
    /// its machine key.
    Machine {
        /// The machine key's short form.
        machine: String,
    },
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Admin { uid: Some(uid) } => write!(f, "uid {uid}"),
            Actor::Admin { uid: None } => f.write_str("admin socket"),
            Actor::PolicyFileWatcher => f.write_str("policy file watcher"),
            Actor::Replica => f.write_str("replica"),
            Actor::Node { node } => write!(f, "node {node}"),
            Actor::User { email } => f.write_str(email),
            Actor::Workload { spiffe_id } => f.write_str(spiffe_id),
            Actor::Machine { machine } => write!(f, "machine {machine}"),
        }
    }
}

/// Whether a login or join was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Admitted.
    Accepted,
    /// Refused; the entry says why.
    Refused,
}

/// What happened. Names and emails are recorded (that is the trail's
/// point); keys, tokens and secrets never are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A policy was put in force.
    PolicyInstalled {
        /// Where it came from (the file, or the name `policy set` gave).
        file_name: String,
        /// The hex SHA-256 of the policy text.
        sha256: String,
        /// Flows it allows that the policy before did not (`weft policy
        /// diff`); `None` when either policy was too large to compare at
        /// install time.
        newly_allowed: Option<usize>,
        /// Flows the policy before allowed that it does not.
        newly_denied: Option<usize>,
        /// Whether the administrator lockout guard was skipped (`--force`).
        forced: bool,
    },
    /// An auth key was created; its secret is not recorded.
    AuthKeyCreated {
        /// The key's public id (the prefix of the key text).
        id: String,
        /// The tags its nodes get.
        tags: Vec<String>,
        /// Whether it admits any number of nodes.
        reusable: bool,
        /// Whether its nodes are removed once offline.
        ephemeral: bool,
        /// When it stops admitting nodes, in Unix seconds.
        expires: u64,
    },
    /// A new node joined the overlay.
    NodeRegistered {
        /// Its id.
        node: NodeId,
        /// Its name.
        name: String,
        /// Who it is: a user, a workload or tags.
        identity: String,
        /// The id of the auth key that admitted it, if one did.
        auth_key: Option<String>,
        /// Whether it is removed once offline.
        ephemeral: bool,
    },
    /// A node was deleted.
    NodeDeleted {
        /// Its id.
        node: NodeId,
        /// Its name.
        name: String,
    },
    /// An administrator ended a node's login.
    NodeExpired {
        /// Its id.
        node: NodeId,
        /// Its name.
        name: String,
    },
    /// A user was disabled.
    UserDisabled {
        /// Their email address.
        email: String,
        /// How many of their nodes were cut off.
        nodes: usize,
    },
    /// A person logged a device in through the identity provider.
    Login {
        /// The email the identity provider vouched for, once known.
        email: Option<String>,
        /// The node the login admitted.
        node: Option<NodeId>,
        /// Whether it was admitted.
        result: Outcome,
        /// Why it was refused.
        reason: Option<String>,
    },
    /// A workload joined with a platform identity token.
    WorkloadJoin {
        /// The token's SPIFFE ID, once verified.
        spiffe_id: Option<String>,
        /// The node the join admitted.
        node: Option<NodeId>,
        /// Whether it was admitted.
        result: Outcome,
        /// Why it was refused.
        reason: Option<String>,
    },
}

impl Event {
    /// The event's kind, as its JSON `kind` says it.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::PolicyInstalled { .. } => "policy_installed",
            Event::AuthKeyCreated { .. } => "auth_key_created",
            Event::NodeRegistered { .. } => "node_registered",
            Event::NodeDeleted { .. } => "node_deleted",
            Event::NodeExpired { .. } => "node_expired",
            Event::UserDisabled { .. } => "user_disabled",
            Event::Login { .. } => "login",
            Event::WorkloadJoin { .. } => "workload_join",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::PolicyInstalled {
                file_name,
                sha256,
                newly_allowed,
                newly_denied,
                forced,
            } => {
                write!(
                    f,
                    "policy installed from {file_name} (sha256 {})",
                    &sha256[..sha256.len().min(12)]
                )?;
                match (newly_allowed, newly_denied) {
                    (Some(allowed), Some(denied)) => {
                        write!(f, ": {allowed} newly allowed, {denied} newly denied")?;
                    }
                    _ => f.write_str(": too large to summarise the access change")?,
                }
                if *forced {
                    f.write_str(", forced past the lockout guard")?;
                }
                Ok(())
            }
            Event::AuthKeyCreated {
                id,
                tags,
                reusable,
                ephemeral,
                expires,
            } => {
                let uses = if *reusable { "reusable" } else { "single-use" };
                let ephemeral = if *ephemeral { ", ephemeral nodes" } else { "" };
                let tags = if tags.is_empty() {
                    "(none)".to_owned()
                } else {
                    tags.join(",")
                };
                write!(
                    f,
                    "auth key {id} created ({uses}{ephemeral}), tags {tags}, expires {}",
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(*expires))
                )
            }
            Event::NodeRegistered {
                node,
                name,
                identity,
                auth_key,
                ephemeral,
            } => {
                write!(f, "node {node} registered as {name}, identity {identity}")?;
                if let Some(key) = auth_key {
                    write!(f, ", with auth key {key}")?;
                }
                if *ephemeral {
                    f.write_str(", ephemeral")?;
                }
                Ok(())
            }
            Event::NodeDeleted { node, name } => write!(f, "node {node} ({name}) deleted"),
            Event::NodeExpired { node, name } => write!(f, "login of node {node} ({name}) expired"),
            Event::UserDisabled { email, nodes } => {
                write!(f, "user {email} disabled, {nodes} node(s) cut off")
            }
            Event::Login {
                email,
                node,
                result,
                reason,
            } => {
                f.write_str("login")?;
                if let Some(email) = email {
                    write!(f, " of {email}")?;
                }
                admission(f, *node, *result, reason.as_deref())
            }
            Event::WorkloadJoin {
                spiffe_id,
                node,
                result,
                reason,
            } => {
                f.write_str("workload join")?;
                if let Some(id) = spiffe_id {
                    write!(f, " of {id}")?;
                }
                admission(f, *node, *result, reason.as_deref())
            }
        }
    }
}

/// The tail of a login's or join's description.
fn admission(
    f: &mut fmt::Formatter<'_>,
    node: Option<NodeId>,
    result: Outcome,
    reason: Option<&str>,
) -> fmt::Result {
    match result {
        Outcome::Accepted => {
            f.write_str(" accepted")?;
            if let Some(node) = node {
                write!(f, " as node {node}")?;
            }
            Ok(())
        }
        Outcome::Refused => {
            f.write_str(" refused")?;
            if let Some(reason) = reason {
                write!(f, ": {reason}")?;
            }
            Ok(())
        }
    }
}

/// The lower-case hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
