use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use weft_proto::NodeId;

use super::*;
use crate::store::RedbStore;

fn open() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(&dir.path().join("weft.redb")).unwrap());
    (dir, store)
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn deleted(n: u64) -> Event {
    Event::NodeDeleted {
        node: NodeId(n),
        name: format!("web-{n}"),
    }
}

/// A store holding a chain of `n` entries.
fn chain_of(n: u64) -> (tempfile::TempDir, Arc<dyn Store>) {
    let (dir, store) = open();
    for i in 1..=n {
        record(
            &*store,
            at(1_000 + i),
            Actor::Admin { uid: Some(0) },
            deleted(i),
        );
    }
    (dir, store)
}

fn stored(store: &dyn Store, seq: u64) -> Vec<u8> {
    store.get(&entry_path(seq)).unwrap().unwrap().value
}

fn overwrite(store: &dyn Store, seq: u64, bytes: Vec<u8>) {
    store.txn(&[], &[Op::Put(entry_path(seq), bytes)]).unwrap();
}

fn problem(store: &dyn Store) -> Option<Tamper> {
    verify(store, None).unwrap().problem
}

#[test]
fn appends_link_each_entry_to_the_one_before() {
    let (_dir, store) = chain_of(3);
    let entries = list(&*store, None).unwrap();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(entries[0].prev_hash, GENESIS_HASH);
    assert_eq!(entries[1].prev_hash, entries[0].hash);
    assert_eq!(entries[2].prev_hash, entries[1].hash);
    assert_eq!(entries[2].event, deleted(3));
    assert_eq!(entries[2].time, 1_003);

    let verification = verify(&*store, None).unwrap();
    assert_eq!(verification.problem, None);
    assert_eq!(verification.entries, 3);
    assert_eq!(
        verification.head,
        Some(Pin {
            seq: 3,
            hash: entries[2].hash.clone()
        })
    );
    assert_eq!(
        list(&*store, Some(1_002)).unwrap().len(),
        2,
        "--since keeps entries from then on"
    );
}

#[test]
fn concurrent_appends_make_one_chain_with_every_entry_once() {
    let (_dir, store) = open();
    let (other_dir, other) = open();
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let store = if t % 4 == 0 {
                other.clone()
            } else {
                store.clone()
            };
            std::thread::spawn(move || {
                for i in 0..20 {
                    record(
                        &*store,
                        at(2_000),
                        Actor::Admin { uid: None },
                        deleted(t * 100 + i),
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for (store, want) in [(&store, 240), (&other, 80)] {
        let verification = verify(&**store, None).unwrap();
        assert_eq!(verification.problem, None);
        assert_eq!(verification.entries, want);
        let mut nodes: Vec<_> = list(&**store, None)
            .unwrap()
            .into_iter()
            .map(|e| match e.event {
                Event::NodeDeleted { node, .. } => node.0,
                other => panic!("{other:?}"),
            })
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes.len(), want as usize, "each entry once");
    }
    drop(other_dir);
}

#[test]
fn an_empty_chain_verifies() {
    let (_dir, store) = open();
    let verification = verify(&*store, None).unwrap();
    assert_eq!(verification.entries, 0);
    assert_eq!(verification.problem, None);
}

#[test]
fn an_edited_entry_is_found() {
    let (_dir, store) = chain_of(3);
    let bytes = String::from_utf8(stored(&*store, 2)).unwrap();
    let edited = bytes.replace("web-2", "db-2");
    assert_ne!(bytes, edited);
    overwrite(&*store, 2, edited.into_bytes());
    assert_eq!(problem(&*store), Some(Tamper::Edited { seq: 2 }));
}

#[test]
fn an_entry_rehashed_after_an_edit_breaks_the_next_link() {
    let (_dir, store) = chain_of(3);
    let mut entry: AuditEntry = serde_json::from_slice(&stored(&*store, 2)).unwrap();
    entry.actor = Actor::PolicyFileWatcher;
    entry.hash = entry.computed_hash();
    overwrite(&*store, 2, serde_json::to_vec(&entry).unwrap());
    assert_eq!(problem(&*store), Some(Tamper::Unlinked { seq: 3 }));
}

#[test]
fn a_removed_entry_is_found() {
    let (_dir, store) = chain_of(4);
    store.txn(&[], &[Op::Delete(entry_path(2))]).unwrap();
    let verification = verify(&*store, None).unwrap();
    assert_eq!(verification.problem, Some(Tamper::Removed { seq: 2 }));
    assert_eq!(verification.entries, 1, "entry 1 is intact");
}

#[test]
fn entries_removed_from_the_end_are_found_against_the_head() {
    let (_dir, store) = chain_of(4);
    store
        .txn(&[], &[Op::Delete(entry_path(3)), Op::Delete(entry_path(4))])
        .unwrap();
    assert_eq!(
        problem(&*store),
        Some(Tamper::Truncated { seq: 3, head: 4 })
    );
}

#[test]
fn reordered_entries_are_found() {
    let (_dir, store) = chain_of(4);
    let (second, third) = (stored(&*store, 2), stored(&*store, 3));
    overwrite(&*store, 2, third);
    overwrite(&*store, 3, second);
    assert_eq!(
        problem(&*store),
        Some(Tamper::Reordered { seq: 2, found: 3 })
    );
}

#[test]
fn a_pinned_entry_must_still_be_there() {
    let (_dir, store) = chain_of(3);
    let second = list(&*store, None).unwrap().remove(1);
    let pin = Pin {
        seq: 2,
        hash: second.hash,
    };
    assert_eq!(verify(&*store, Some(&pin)).unwrap().problem, None);
    let wrong = Pin {
        seq: 2,
        hash: GENESIS_HASH.into(),
    };
    assert_eq!(
        verify(&*store, Some(&wrong)).unwrap().problem,
        Some(Tamper::PinMismatch { seq: 2 })
    );
    let beyond = Pin {
        seq: 9,
        hash: GENESIS_HASH.into(),
    };
    assert_eq!(
        verify(&*store, Some(&beyond)).unwrap().problem,
        Some(Tamper::PinMismatch { seq: 9 })
    );
}

#[test]
fn an_operation_commits_with_its_entry_or_not_at_all() {
    let (_dir, store) = chain_of(1);
    let staged = || {
        Ok(Staged {
            compares: vec![Compare::Absent("guarded".into())],
            ops: vec![Op::Put("written".into(), b"1".to_vec())],
            actor: Actor::Replica,
            event: deleted(7),
        })
    };
    append_with(&*store, at(5), staged).unwrap();
    assert!(store.get("written").unwrap().is_some());
    assert_eq!(list(&*store, None).unwrap().len(), 2);

    store
        .txn(&[], &[Op::Put("guarded".into(), b"x".to_vec())])
        .unwrap();
    let err = append_with(&*store, at(6), staged).unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err}");
    assert_eq!(list(&*store, None).unwrap().len(), 2, "no entry without it");
}

#[test]
fn the_readme_example_is_what_is_stored() {
    let entry = AuditEntry::new(
        42,
        1_796_634_760,
        Actor::Admin { uid: Some(0) },
        Event::AuthKeyCreated {
            id: "3f9a1c7be042".into(),
            tags: vec!["tag:db".into()],
            reusable: false,
            ephemeral: false,
            expires: 1_796_721_160,
        },
        "de6e60dedbfd13d2e593230271ccb34bcbbfdb5b73586b49a378a27c99f70e14".into(),
    );
    assert_eq!(
        entry.hash,
        "414791e363f19c0d41d3afb224b5bde3cd4bce48ffb62014691f7f1daba0a010"
    );
    let json = serde_json::to_value(&entry).unwrap();
    assert_eq!(
        json["actor"],
        serde_json::json!({"type": "admin", "uid": 0})
    );
    assert_eq!(json["event"]["kind"], entry.event.kind());
    assert_eq!(
        entry.event.to_string(),
        "auth key 3f9a1c7be042 created (single-use), tags tag:db, expires 2026-12-08T09:12:40Z"
    );
}

/// Stored entries (position, bytes) and the head record's bytes.
type StoredChain = (Vec<(Option<u64>, Vec<u8>)>, Vec<u8>);

/// The stored bytes of a chain of four entries and its head, written once.
static STORED_CHAIN: LazyLock<StoredChain> = LazyLock::new(stored_chain);

fn stored_chain() -> StoredChain {
    let (_dir, store) = open();
    let actors = [
        Actor::Admin { uid: Some(1000) },
        Actor::User {
            email: "ada@example.org".into(),
        },
        Actor::Workload {
            spiffe_id: "spiffe://example.org/ci".into(),
        },
        Actor::PolicyFileWatcher,
    ];
    for (i, actor) in actors.into_iter().enumerate() {
        record(&*store, at(1_000 + i as u64), actor, deleted(i as u64));
    }
    let entries = (1..=4)
        .map(|seq| (Some(seq), stored(&*store, seq)))
        .collect();
    let head = store.get(HEAD_KEY).unwrap().unwrap().value;
    (entries, head)
}

proptest! {
    #[test]
    fn any_single_byte_change_to_a_stored_entry_is_found(
        which in 0usize..4,
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let (mut entries, head) = STORED_CHAIN.clone();
        prop_assert_eq!(chain::verify(&entries, Some(&head), None).problem, None);
        let bytes = &mut entries[which].1;
        let at = position.index(bytes.len());
        bytes[at] ^= flip;
        prop_assert!(chain::verify(&entries, Some(&head), None).problem.is_some());
    }
}
