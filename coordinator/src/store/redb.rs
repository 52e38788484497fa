//! The embedded [`Store`] backend: one redb file, every commit durable.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{Compare, LeaseId, Notice, Op, Store, StoreError, Versioned, Watch, WatchEvent};

/// Values: the 8-byte big-endian revision that last wrote the key, then the payload.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Keys put with a lease, and the lease. Leases live only as long as the
/// process that holds the file, so opening the file deletes these keys.
const LEASED: TableDefinition<&str, i64> = TableDefinition::new("leased");
const REVISION: &str = "revision";
const REV_BYTES: usize = 8;
const WATCH_CAPACITY: usize = 4096;

/// A [`Store`] in a redb file. Writes are serialised, committed with
/// immediate durability (they survive `kill -9` once acknowledged) and then
/// published to watchers in revision order.
#[derive(Debug)]
pub(crate) struct RedbStore {
    db: Database,
    /// Held from the start of a write transaction until its events are
    /// published, so watchers see revisions in order.
    write_lock: Mutex<()>,
    events: broadcast::Sender<Notice>,
    /// Leases granted by this process and not revoked; they never expire.
    leases: Mutex<Leases>,
}

#[derive(Debug, Default)]
struct Leases {
    last: i64,
    live: BTreeSet<i64>,
}

impl RedbStore {
    /// Opens (or creates) the database file.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::io(format_args!("cannot open {}", path.display()), e))?;
        // Node records and key hashes are for the coordinator's eyes only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::io(format_args!("cannot restrict {}", path.display()), e))?;
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(KV).map_err(backend)?;
        tx.open_table(META).map_err(backend)?;
        tx.open_table(LEASED).map_err(backend)?;
        tx.commit().map_err(backend)?;
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        let store = Self {
            db,
            write_lock: Mutex::new(()),
            events,
            leases: Mutex::new(Leases::default()),
        };
        // The process that held those leases is gone.
        let stale = store.leased_keys(|_| true)?;
        if !stale.is_empty() {
            store.txn(&[], &stale)?;
        }
        Ok(store)
    }

    /// Deletions of the keys held by leases that `which` selects.
    fn leased_keys(&self, which: impl Fn(i64) -> bool) -> Result<Vec<Op>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(LEASED).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (key, lease) = entry.map_err(backend)?;
            if which(lease.value()) {
                out.push(Op::Delete(key.value().to_owned()));
            }
        }
        Ok(out)
    }

    fn lease_is_live(&self, lease: LeaseId) -> bool {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .contains(&lease.0)
    }
}

impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let value = table.get(key).map_err(backend)?;
        value.map(|v| split(key, v.value())).transpose()
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_owned(), split(key, value.value())?));
        }
        Ok(out)
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<u64, StoreError> {
        let _serial = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(backend)?;
        let revision = {
            let mut kv = tx.open_table(KV).map_err(backend)?;
            for compare in compares {
                let holds = match compare {
                    Compare::Absent(key) => kv.get(key.as_str()).map_err(backend)?.is_none(),
                    Compare::ModRevision(key, want) => {
                        match kv.get(key.as_str()).map_err(backend)? {
                            Some(v) => split(key, v.value())?.mod_revision == *want,
                            None => false,
                        }
                    }
                };
                if !holds {
                    return Err(StoreError::Conflict);
                }
            }
            let mut meta = tx.open_table(META).map_err(backend)?;
            let revision = meta
                .get(REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value())
                + 1;
            meta.insert(REVISION, revision).map_err(backend)?;
            let mut leased = tx.open_table(LEASED).map_err(backend)?;
            for op in ops {
                match op {
                    Op::Put(key, value) | Op::PutLeased(key, value, _) => {
                        let mut stored = Vec::with_capacity(REV_BYTES + value.len());
                        stored.extend_from_slice(&revision.to_be_bytes());
                        stored.extend_from_slice(value);
                        kv.insert(key.as_str(), stored.as_slice())
                            .map_err(backend)?;
                    }
                    Op::Delete(key) => {
                        kv.remove(key.as_str()).map_err(backend)?;
                    }
                }
                match op {
                    Op::PutLeased(key, _, lease) => {
                        if !self.lease_is_live(*lease) {
                            return Err(StoreError::LeaseExpired);
                        }
                        leased.insert(key.as_str(), lease.0).map_err(backend)?;
                    }
                    Op::Put(key, _) | Op::Delete(key) => {
                        leased.remove(key.as_str()).map_err(backend)?;
                    }
                }
            }
            revision
        };
        tx.commit().map_err(backend)?;
        for op in ops {
            let (key, value) = match op {
                Op::Put(key, value) | Op::PutLeased(key, value, _) => {
                    (key.clone(), Some(value.clone()))
                }
                Op::Delete(key) => (key.clone(), None),
            };
            // No receivers is fine: nobody is watching yet.
            let _ = self.events.send(Ok(WatchEvent {
                revision,
                key,
                value,
            }));
        }
        Ok(revision)
    }

    fn watch(&self, prefix: &str) -> Watch {
        Watch::new(prefix, self.events.subscribe())
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let meta = tx.open_table(META).map_err(backend)?;
        let revision = meta
            .get(REVISION)
            .map_err(backend)?
            .map_or(0, |v| v.value());
        Ok(revision)
    }

    fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.last += 1;
        let id = leases.last;
        leases.live.insert(id);
        Ok(LeaseId(id))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        Ok(self.lease_is_live(lease))
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .remove(&lease.0);
        let keys = self.leased_keys(|l| l == lease.0)?;
        if !keys.is_empty() {
            self.txn(&[], &keys)?;
        }
        Ok(())
    }
}

fn split(key: &str, stored: &[u8]) -> Result<Versioned, StoreError> {
    let Some((rev, value)) = stored.split_first_chunk::<REV_BYTES>() else {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            reason: "value shorter than its revision header".into(),
            source: None,
        });
    };
    Ok(Versioned {
        value: value.to_vec(),
        mod_revision: u64::from_be_bytes(*rev),
    })
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    let e = e.into();
    StoreError::Io {
        message: e.to_string(),
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::{conformance_suite, put, Fixture};

    struct File {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl File {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("weft.redb");
            Self { _dir: dir, path }
        }
    }

    impl Fixture for File {
        fn open(&self) -> Arc<dyn Store> {
            Arc::new(RedbStore::open(&self.path).unwrap())
        }
    }

    conformance_suite!(File::new());

    #[test]
    fn revisions_start_at_zero_and_count_one_per_transaction() {
        let file = File::new();
        let store = file.open();
        assert_eq!(store.revision().unwrap(), 0);
        assert_eq!(store.txn(&[], &[put("a", "1"), put("b", "2")]).unwrap(), 1);
        assert_eq!(store.txn(&[], &[]).unwrap(), 2);
        assert_eq!(store.revision().unwrap(), 2);
    }
}
