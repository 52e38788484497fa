//! The embedded [`Store`] backend: one redb file, every commit durable.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{Compare, Op, Store, StoreError, Versioned, Watch, WatchEvent};

/// Values: the 8-byte big-endian revision that last wrote the key, then the payload.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
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
    events: broadcast::Sender<WatchEvent>,
}

impl RedbStore {
    /// Opens (or creates) the database file.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        // Node records and key hashes are for the coordinator's eyes only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Backend(format!("cannot restrict {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(KV).map_err(backend)?;
        tx.open_table(META).map_err(backend)?;
        tx.commit().map_err(backend)?;
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        Ok(Self {
            db,
            write_lock: Mutex::new(()),
            events,
        })
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
            for op in ops {
                match op {
                    Op::Put(key, value) => {
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
            }
            revision
        };
        tx.commit().map_err(backend)?;
        for op in ops {
            let (key, value) = match op {
                Op::Put(key, value) => (key.clone(), Some(value.clone())),
                Op::Delete(key) => (key.clone(), None),
            };
            // No receivers is fine: nobody is watching yet.
            let _ = self.events.send(WatchEvent {
                revision,
                key,
                value,
            });
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
}

fn split(key: &str, stored: &[u8]) -> Result<Versioned, StoreError> {
    let Some((rev, value)) = stored.split_first_chunk::<REV_BYTES>() else {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            reason: "value shorter than its revision header".into(),
        });
    };
    Ok(Versioned {
        value: value.to_vec(),
        mod_revision: u64::from_be_bytes(*rev),
    })
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn open() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        (dir, store)
    }

    fn put(key: &str, value: &str) -> Op {
        Op::Put(key.into(), value.as_bytes().to_vec())
    }

    #[test]
    fn revisions_count_transactions_and_stamp_keys() {
        let (_dir, store) = open();
        assert_eq!(store.revision().unwrap(), 0);
        assert_eq!(store.txn(&[], &[put("a", "1"), put("b", "2")]).unwrap(), 1);
        assert_eq!(store.txn(&[], &[put("b", "3")]).unwrap(), 2);
        assert_eq!(store.get("a").unwrap().unwrap().mod_revision, 1);
        let b = store.get("b").unwrap().unwrap();
        assert_eq!((b.value.as_slice(), b.mod_revision), (&b"3"[..], 2));
        assert_eq!(store.revision().unwrap(), 2);
        assert_eq!(store.get("c").unwrap(), None);
    }

    #[test]
    fn failed_compares_write_nothing() {
        let (_dir, store) = open();
        store
            .txn(&[Compare::Absent("k".into())], &[put("k", "v1")])
            .unwrap();
        let err = store
            .txn(
                &[Compare::Absent("k".into())],
                &[put("k", "v2"), put("other", "x")],
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict));
        let err = store
            .txn(
                &[Compare::ModRevision("k".into(), 7)],
                &[Op::Delete("k".into())],
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict));
        assert!(matches!(
            store.txn(&[Compare::ModRevision("missing".into(), 1)], &[]),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.get("k").unwrap().unwrap().value, b"v1");
        assert_eq!(store.get("other").unwrap(), None);
        assert_eq!(store.revision().unwrap(), 1);
        store
            .txn(
                &[Compare::ModRevision("k".into(), 1)],
                &[Op::Delete("k".into())],
            )
            .unwrap();
        assert_eq!(store.get("k").unwrap(), None);
    }

    #[test]
    fn list_returns_only_the_prefix_in_order() {
        let (_dir, store) = open();
        store
            .txn(
                &[],
                &[
                    put("nodes/2", "b"),
                    put("nodes/1", "a"),
                    put("nodez", "x"),
                    put("n", "y"),
                ],
            )
            .unwrap();
        let keys: Vec<String> = store
            .list("nodes/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["nodes/1", "nodes/2"]);
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store.txn(&[], &[put("a", "1")]).unwrap();
            store
                .txn(&[], &[put("b", "2"), Op::Delete("a".into())])
                .unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.revision().unwrap(), 2);
        assert_eq!(store.get("a").unwrap(), None);
        assert_eq!(store.get("b").unwrap().unwrap().mod_revision, 2);
        assert_eq!(store.txn(&[], &[put("c", "3")]).unwrap(), 3);
    }

    #[tokio::test]
    async fn watchers_see_changes_under_their_prefix_in_order() {
        let (_dir, store) = open();
        let mut watch = store.watch("nodes/");
        store
            .txn(&[], &[put("nodes/1", "a"), put("keys/1", "k")])
            .unwrap();
        store.txn(&[], &[Op::Delete("nodes/1".into())]).unwrap();
        let first = watch.next().await.unwrap();
        assert_eq!((first.revision, first.key.as_str()), (1, "nodes/1"));
        assert_eq!(first.value.as_deref(), Some(&b"a"[..]));
        let second = watch.next().await.unwrap();
        assert_eq!((second.revision, second.value), (2, None));
        assert!(watch.try_next().is_none());
    }

    #[test]
    fn concurrent_compare_and_swap_admits_exactly_one_writer() {
        let (_dir, store) = open();
        let store = Arc::new(store);
        store.txn(&[], &[put("token", "fresh")]).unwrap();
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let store = Arc::clone(&store);
                    s.spawn(move || {
                        let current = store.get("token").unwrap().unwrap();
                        if current.value != b"fresh" {
                            return 0;
                        }
                        let ops = [put("token", &format!("taken by {i}"))];
                        let cmp = [Compare::ModRevision("token".into(), current.mod_revision)];
                        usize::from(store.txn(&cmp, &ops).is_ok())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1);
    }
}
