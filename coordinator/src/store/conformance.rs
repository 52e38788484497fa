//! The behaviour every [`Store`] backend must show, run against each of them.
//!
//! A backend's tests call [`conformance_suite!`] with an expression that
//! builds a fresh [`Fixture`]: a store that nobody else writes to, which can
//! be opened again (reopened or reconnected) to the same state.

use std::sync::Arc;
use std::time::Duration;

use super::{Compare, Op, Store, StoreError, Watch, WatchEvent};

/// A backend's state, opened as often as a test needs.
pub(crate) trait Fixture {
    /// Opens the store: the same state every time. Only one store opened
    /// from a fixture is alive at a time.
    fn open(&self) -> Arc<dyn Store>;
}

/// Generates one test per behaviour for the backend `$fixture` builds.
macro_rules! conformance_suite {
    ($fixture:expr) => {
        #[test]
        fn revisions_count_transactions_and_stamp_keys() {
            let fixture = $fixture;
            $crate::store::conformance::revisions_count_transactions_and_stamp_keys(&fixture);
        }

        #[test]
        fn failed_compares_write_nothing() {
            let fixture = $fixture;
            $crate::store::conformance::failed_compares_write_nothing(&fixture);
        }

        #[test]
        fn list_returns_only_the_prefix_in_order() {
            let fixture = $fixture;
            $crate::store::conformance::list_returns_only_the_prefix_in_order(&fixture);
        }

        #[test]
        fn state_survives_reopening() {
            let fixture = $fixture;
            $crate::store::conformance::state_survives_reopening(&fixture);
        }

        #[tokio::test]
        async fn watchers_see_changes_under_their_prefix_in_order() {
            let fixture = $fixture;
            $crate::store::conformance::watchers_see_changes_under_their_prefix_in_order(&fixture)
                .await;
        }

        #[test]
        fn concurrent_audit_appends_form_one_chain() {
            let fixture = $fixture;
            $crate::store::conformance::concurrent_audit_appends_form_one_chain(&fixture);
        }

        #[test]
        fn concurrent_compare_and_swap_admits_exactly_one_writer() {
            let fixture = $fixture;
            $crate::store::conformance::concurrent_compare_and_swap_admits_exactly_one_writer(
                &fixture,
            );
        }
    };
}

pub(crate) use conformance_suite;

/// How long a watcher may take to see a committed change.
const WATCH_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn put(key: &str, value: &str) -> Op {
    Op::Put(key.into(), value.as_bytes().to_vec())
}

pub(crate) fn revisions_count_transactions_and_stamp_keys(fixture: &dyn Fixture) {
    let store = fixture.open();
    let start = store.revision().unwrap();
    assert_eq!(store.get("a").unwrap(), None);
    let first = store.txn(&[], &[put("a", "1"), put("b", "2")]).unwrap();
    assert!(first > start, "{first} after {start}");
    let second = store.txn(&[], &[put("b", "3")]).unwrap();
    assert!(second > first, "{second} after {first}");
    assert_eq!(store.get("a").unwrap().unwrap().mod_revision, first);
    let b = store.get("b").unwrap().unwrap();
    assert_eq!((b.value.as_slice(), b.mod_revision), (&b"3"[..], second));
    assert_eq!(store.revision().unwrap(), second);
    assert_eq!(store.get("c").unwrap(), None);
}

pub(crate) fn failed_compares_write_nothing(fixture: &dyn Fixture) {
    let store = fixture.open();
    let written = store
        .txn(&[Compare::Absent("k".into())], &[put("k", "v1")])
        .unwrap();
    let err = store
        .txn(
            &[Compare::Absent("k".into())],
            &[put("k", "v2"), put("other", "x")],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err}");
    let err = store
        .txn(
            &[Compare::ModRevision("k".into(), written + 7)],
            &[Op::Delete("k".into())],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err}");
    for stale in [written, 0] {
        assert!(matches!(
            store.txn(
                &[Compare::ModRevision("missing".into(), stale)],
                &[put("x", "y")]
            ),
            Err(StoreError::Conflict)
        ));
    }
    assert_eq!(store.get("k").unwrap().unwrap().value, b"v1");
    assert_eq!(store.get("other").unwrap(), None);
    assert_eq!(store.get("x").unwrap(), None);
    assert_eq!(store.revision().unwrap(), written);
    let deleted = store
        .txn(
            &[
                Compare::ModRevision("k".into(), written),
                Compare::Absent("other".into()),
            ],
            &[Op::Delete("k".into())],
        )
        .unwrap();
    assert!(deleted > written);
    assert_eq!(store.get("k").unwrap(), None);
}

pub(crate) fn list_returns_only_the_prefix_in_order(fixture: &dyn Fixture) {
    let store = fixture.open();
    assert!(store.list("nodes/").unwrap().is_empty());
    let rev = store
        .txn(
            &[],
            &[
                put("nodes/2", "b"),
                put("nodes/10", "c"),
                put("nodes/1", "a"),
                put("nodez", "x"),
                put("n", "y"),
            ],
        )
        .unwrap();
    let listed = store.list("nodes/").unwrap();
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["nodes/1", "nodes/10", "nodes/2"]);
    assert!(listed.iter().all(|(_, v)| v.mod_revision == rev));
    assert_eq!(listed[0].1.value, b"a");
    assert_eq!(store.list("").unwrap().len(), 5);
}

pub(crate) fn state_survives_reopening(fixture: &dyn Fixture) {
    let (deleted, last) = {
        let store = fixture.open();
        store.txn(&[], &[put("a", "1")]).unwrap();
        let last = store
            .txn(&[], &[put("b", "2"), Op::Delete("a".into())])
            .unwrap();
        (store.get("a").unwrap(), last)
    };
    assert_eq!(deleted, None);
    let store = fixture.open();
    assert_eq!(store.revision().unwrap(), last);
    assert_eq!(store.get("a").unwrap(), None);
    assert_eq!(store.get("b").unwrap().unwrap().mod_revision, last);
    assert!(store.txn(&[], &[put("c", "3")]).unwrap() > last);
}

pub(crate) async fn watchers_see_changes_under_their_prefix_in_order(fixture: &dyn Fixture) {
    let store = fixture.open();
    let mut watch = store.watch("nodes/");
    let first_rev = store
        .txn(&[], &[put("nodes/1", "a"), put("keys/1", "k")])
        .unwrap();
    let second_rev = store.txn(&[], &[Op::Delete("nodes/1".into())]).unwrap();
    let third_rev = store
        .txn(&[], &[put("nodes/2", "b"), put("nodes/3", "c")])
        .unwrap();
    let first = next_event(&mut watch).await;
    assert_eq!((first.revision, first.key.as_str()), (first_rev, "nodes/1"));
    assert_eq!(first.value.as_deref(), Some(&b"a"[..]));
    let second = next_event(&mut watch).await;
    assert_eq!(
        second,
        WatchEvent {
            revision: second_rev,
            key: "nodes/1".into(),
            value: None
        }
    );
    let third = next_event(&mut watch).await;
    let fourth = next_event(&mut watch).await;
    assert_eq!(
        [(third.revision, third.key), (fourth.revision, fourth.key)],
        [(third_rev, "nodes/2".into()), (third_rev, "nodes/3".into())]
    );
    assert!(watch.try_next().is_none());
}

/// The next change a watcher sees, failing the test if none comes.
pub(crate) async fn next_event(watch: &mut Watch) -> WatchEvent {
    tokio::time::timeout(WATCH_WAIT, watch.next())
        .await
        .expect("no change arrived in time")
        .unwrap()
}

pub(crate) fn concurrent_compare_and_swap_admits_exactly_one_writer(fixture: &dyn Fixture) {
    let store = fixture.open();
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
                    match store.txn(&cmp, &ops) {
                        Ok(_) => 1,
                        Err(StoreError::Conflict) => 0,
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(winners, 1);
    assert!(store
        .get("token")
        .unwrap()
        .unwrap()
        .value
        .starts_with(b"taken by"));
}

/// Appends from two threads at once: the compare on the chain head makes
/// the loser of each race retry, so the chain never forks.
pub(crate) fn concurrent_audit_appends_form_one_chain(fixture: &dyn Fixture) {
    let store = fixture.open();
    let writers = [(1, store.clone()), (2, store.clone())];
    audit_appends_form_one_chain(&store, writers);
}

/// Each of `writers` (a uid and a handle on `store`) appends 20 entries at
/// once; then the chain holds all of them, intact.
pub(crate) fn audit_appends_form_one_chain(
    store: &Arc<dyn Store>,
    writers: [(u32, Arc<dyn Store>); 2],
) {
    use crate::audit::{self, Actor, Event};
    std::thread::scope(|s| {
        for (uid, writer) in writers {
            s.spawn(move || {
                for n in 0..20 {
                    let appended =
                        audit::append_with(&*writer, std::time::SystemTime::now(), || {
                            Ok(audit::Staged {
                                compares: Vec::new(),
                                ops: Vec::new(),
                                actor: Actor::Admin { uid: Some(uid) },
                                event: Event::UserDisabled {
                                    email: format!("user{n}@example.org"),
                                    nodes: 0,
                                },
                            })
                        });
                    appended.unwrap();
                }
            });
        }
    });
    let verification = audit::verify(&**store, None).unwrap();
    assert_eq!(verification.problem, None);
    assert_eq!(verification.entries, 40);
    let entries = audit::list(&**store, None).unwrap();
    for uid in [1, 2] {
        let by = entries
            .iter()
            .filter(|e| e.actor == Actor::Admin { uid: Some(uid) })
            .count();
        assert_eq!(by, 20, "every append of writer {uid} is in the chain");
    }
}
