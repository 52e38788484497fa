//! The coordinator's durable state: a revisioned key-value store.
//!
//! The shape follows etcd's so that a replicated backend can replace the
//! embedded one: every write is a transaction of puts and deletes guarded by
//! compares, every committed transaction bumps one global revision, every key
//! remembers the revision that last changed it, and watchers see changes in
//! revision order.

mod redb;

use tokio::sync::broadcast;

pub(crate) use self::redb::RedbStore;

/// A revisioned key-value store with compare-and-swap transactions and watches.
pub(crate) trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Atomically and durably applies all `ops` if every compare holds, like an
    /// etcd `Txn`. Returns the new store revision, or [`StoreError::Conflict`]
    /// when a compare failed (nothing was written then).
    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<u64, StoreError>;

    /// Changes to keys under `prefix` committed from now on, in revision order.
    fn watch(&self, prefix: &str) -> Watch;

    /// The revision of the last committed transaction (0 for an empty store).
    fn revision(&self) -> Result<u64, StoreError>;
}

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
    Delete(String),
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
    /// The backend failed (disk full, I/O error, corrupted file).
    #[error("coordinator database error: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("coordinator database holds a malformed record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Why a watcher missed changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WatchError {
    /// The watcher fell behind and events were dropped; re-read the state with `list`.
    #[error("watcher fell behind by {0} events")]
    Lagged(u64),
    /// The store was dropped.
    #[error("the store is closed")]
    Closed,
}

/// A stream of [`WatchEvent`]s for one key prefix.
#[derive(Debug)]
pub(crate) struct Watch {
    prefix: String,
    rx: broadcast::Receiver<WatchEvent>,
}

impl Watch {
    pub(crate) fn new(prefix: &str, rx: broadcast::Receiver<WatchEvent>) -> Self {
        Self {
            prefix: prefix.to_owned(),
            rx,
        }
    }

    /// The next change under the prefix.
    pub(crate) async fn next(&mut self) -> Result<WatchEvent, WatchError> {
        loop {
            match self.rx.recv().await {
                Ok(event) if event.key.starts_with(&self.prefix) => return Ok(event),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(WatchError::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }

    /// The next change already delivered, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Result<WatchEvent, WatchError>> {
        loop {
            match self.rx.try_recv() {
                Ok(event) if event.key.starts_with(&self.prefix) => return Some(Ok(event)),
                Ok(_) => continue,
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
    })
}

/// Encodes a JSON record.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("cannot encode record: {e}")))
}
