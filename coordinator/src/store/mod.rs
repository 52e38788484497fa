//! The coordinator's durable state: a revisioned key-value store.
//!
//! The shape follows etcd's so that a replicated backend can replace the
//! embedded one: every write is a transaction of puts and deletes guarded by
//! compares, every committed transaction bumps one global revision, every key
//! remembers the revision that last changed it, and watchers see changes in
//! revision order. The embedded backend is [`RedbStore`]; [`EtcdStore`]
//! keeps the state in an etcd cluster so that it survives the loss of the
//! coordinator's machine.

#[cfg(test)]
mod conformance;
mod counted;
mod etcd;
mod redb;

use std::time::Duration;

use tokio::sync::broadcast;

pub(crate) use self::counted::Counted;
pub(crate) use self::etcd::EtcdStore;
pub(crate) use self::redb::RedbStore;

/// A revisioned key-value store with compare-and-swap transactions and watches.
///
/// Revisions are one counter for the whole store: they only grow, every
/// committed transaction that writes gets a new one, and every key it wrote
/// carries it as its `mod_revision`. They need not start at 0 nor grow by exactly one per
/// transaction: etcd counts from 1 and counts writes made by others on the
/// same cluster too, and it commits concurrent transactions on disjoint keys
/// together, under one revision.
pub(crate) trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Atomically and durably applies all `ops` if every compare holds, like an
    /// etcd `Txn`. Returns the new store revision (etcd leaves the revision
    /// as it is for a transaction without operations), or
    /// [`StoreError::Conflict`] when a compare failed (nothing was written then).
    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<u64, StoreError>;

    /// Changes to keys under `prefix` committed from now on, in revision order.
    /// It may also deliver changes committed shortly before the call, so
    /// consumers that read the state after subscribing skip events no newer
    /// than what they read (by revision).
    fn watch(&self, prefix: &str) -> Watch;

    /// The store's current revision: at least that of every transaction
    /// committed before the call.
    fn revision(&self) -> Result<u64, StoreError>;

    /// Grants a lease that lives `ttl` past its last keep-alive. Keys put
    /// with [`Op::PutLeased`] vanish (as deletions watchers see) when it
    /// expires or is revoked, so state that only holds while this process
    /// is alive (presence, leadership) cleans itself up when it dies.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Extends `lease` by its ttl. `Ok(false)` when it has already expired:
    /// its keys are gone and the caller must grant a new one.
    fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError>;

    /// Ends `lease` now, deleting its keys.
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
}

/// A lease granted by [`Store::grant_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct LeaseId(pub(crate) i64);

/// A stored value and the revision of the transaction that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Versioned {
    pub(crate) value: Vec<u8>,
    pub(crate) mod_revision: u64,
}

/// A precondition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, u64),
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Put(String, Vec<u8>),
    /// A put whose key is deleted when the lease ends.
    PutLeased(String, Vec<u8>, LeaseId),
    Delete(String),
}

impl Op {
    /// The key the operation writes.
    pub(crate) fn key(&self) -> &str {
        match self {
            Op::Put(key, _) | Op::PutLeased(key, _, _) | Op::Delete(key) => key,
        }
    }
}

/// One committed change, as seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WatchEvent {
    /// The revision of the transaction that made the change.
    pub(crate) revision: u64,
    pub(crate) key: String,
    /// The new value, or `None` when the key was deleted.
    pub(crate) value: Option<Vec<u8>>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// A compare of the transaction did not hold; nothing was written.
    #[error("the stored state changed concurrently; retry the operation")]
    Conflict,
    /// The backend failed (disk full, I/O error, corrupted file, etcd unreachable).
    #[error("coordinator database error: {0}")]
    Backend(String),
    /// The backend failed with an error of its own (redb, the file system,
    /// the JSON encoder, etcd), kept as the cause; `message` already says it.
    #[error("coordinator database error: {message}")]
    Io {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The lease of a [`Op::PutLeased`] has expired or was revoked.
    #[error("the coordinator's store lease expired; it is being renewed")]
    LeaseExpired,
    /// A stored record could not be decoded; `source` is the decoder's
    /// error when there is one (`reason` already says it).
    #[error("coordinator database holds a malformed record at {key}: {reason}")]
    Corrupt {
        key: String,
        reason: String,
        #[source]
        source: Option<serde_json::Error>,
    },
}

impl StoreError {
    /// A backend failure with its cause: "`what`: `cause`".
    pub(crate) fn io(
        what: impl std::fmt::Display,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Io {
            message: format!("{what}: {cause}"),
            source: Box::new(cause),
        }
    }
}

/// Why a watcher missed changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WatchError {
    /// The watcher fell behind and events were dropped (or the backend
    /// compacted the history it needed); re-read the state with `list`.
    #[error("watcher fell behind by {0} events")]
    Lagged(u64),
    /// The store was dropped.
    #[error("the store is closed")]
    Closed,
}

/// What a backend publishes to its watchers: a change, or word that changes
/// were lost (the watcher must re-read the state).
pub(crate) type Notice = Result<WatchEvent, WatchError>;

/// A stream of [`WatchEvent`]s for one key prefix.
#[derive(Debug)]
pub(crate) struct Watch {
    prefix: String,
    rx: broadcast::Receiver<Notice>,
}

impl Watch {
    pub(crate) fn new(prefix: &str, rx: broadcast::Receiver<Notice>) -> Self {
        Self {
            prefix: prefix.to_owned(),
            rx,
        }
    }

    /// The next change under the prefix.
    pub(crate) async fn next(&mut self) -> Result<WatchEvent, WatchError> {
        loop {
            match self.rx.recv().await {
                Ok(Ok(event)) if event.key.starts_with(&self.prefix) => return Ok(event),
                Ok(Ok(_)) => continue,
                Ok(Err(lost)) => return Err(lost),
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(WatchError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }

    /// The next change already delivered, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Result<WatchEvent, WatchError>> {
        loop {
            match self.rx.try_recv() {
                Ok(Ok(event)) if event.key.starts_with(&self.prefix) => return Some(Ok(event)),
                Ok(Ok(_)) => continue,
                Ok(Err(lost)) => return Some(Err(lost)),
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    return Some(Err(WatchError::Lagged(n)))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Some(Err(WatchError::Closed))
                }
            }
        }
    }
}

/// Reads a JSON record.
pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(T, u64)>, StoreError> {
    store
        .get(key)?
        .map(|v| decode(key, &v.value).map(|t| (t, v.mod_revision)))
        .transpose()
}

/// Decodes a JSON record read from `key`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
        source: Some(e),
    })
}

/// Encodes a JSON record.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::io("cannot encode record", e))
}
