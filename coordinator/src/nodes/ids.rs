//! Node ids, handed out from blocks reserved in the store.
//!
//! Ids come from one counter in the store so that they are never reused,
//! whichever coordinator registered a node. If every registration advanced
//! the counter in its own transaction, all concurrent registrations would
//! conflict on it and commit one at a time. Instead a coordinator reserves
//! a block of ids with one compare-and-swap on the counter (at least as
//! many as registrations are waiting for one) and hands them out from memory.
//!
//! Ids a coordinator reserved but had not used when it stopped (or was
//! killed) are never handed out: ids have gaps, but an id names one node
//! for ever, so a log line or audit record never becomes ambiguous.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use weft_proto::NodeId;

use crate::store::{self, Compare, Op, Store, StoreError};

/// The store key of the next id no coordinator has reserved.
pub(super) const NEXT_ID_KEY: &str = "config/next-node-id";
/// Fewest ids reserved at once: a reservation is a commit (a disk sync).
const MIN_BLOCK: u64 = 16;
/// Most ids reserved at once.
const MAX_BLOCK: u64 = 256;
const MAX_ATTEMPTS: usize = 64;

/// Ids this coordinator has reserved and not handed out yet.
#[derive(Debug, Default)]
pub(super) struct Ids {
    block: Mutex<Block>,
    /// Callers waiting for the block: how many ids the next reservation takes.
    waiting: AtomicU64,
}

#[derive(Debug, Default)]
struct Block {
    /// Ids handed out to registrations refused before they wrote
    /// anything, smallest last.
    returned: Vec<u64>,
    /// The reserved ids `next..end` not handed out yet.
    next: u64,
    end: u64,
}

impl Ids {
    /// An id no node has had, reserving a block in `store` when none is left.
    pub(super) fn take(&self, store: &dyn Store) -> Result<NodeId, StoreError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut block = self.lock();
        let others = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        if let Some(id) = block.returned.pop() {
            return Ok(NodeId(id));
        }
        if block.next >= block.end {
            let count = (others + 1).clamp(MIN_BLOCK, MAX_BLOCK);
            let start = reserve(store, count)?;
            (block.next, block.end) = (start, start + count);
        }
        let id = block.next;
        block.next += 1;
        Ok(NodeId(id))
    }

    /// Gives back `id`, taken by a registration that was refused before it
    /// wrote anything, for the next one.
    pub(super) fn give_back(&self, id: NodeId) {
        let mut block = self.lock();
        block.returned.push(id.0);
        block.returned.sort_unstable_by(|a, b| b.cmp(a));
    }

    fn lock(&self) -> MutexGuard<'_, Block> {
        self.block.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The node id `text` spells as ids are shown (`n7`), if it is one.
/// No node may take a name that parses here.
pub(crate) fn parse(text: &str) -> Option<NodeId> {
    let digits = text.strip_prefix('n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(NodeId)
}

/// Advances the store's counter by `count`; the first id of the block.
fn reserve(store: &dyn Store, count: u64) -> Result<u64, StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let (next, compare) = match store::get_json::<u64>(store, NEXT_ID_KEY)? {
            Some((next, rev)) => (next, Compare::ModRevision(NEXT_ID_KEY.into(), rev)),
            None => (1, Compare::Absent(NEXT_ID_KEY.into())),
        };
        let end = next
            .checked_add(count)
            .ok_or_else(|| StoreError::Backend("the node id counter is exhausted".into()))?;
        let op = Op::Put(NEXT_ID_KEY.into(), store::encode(&end)?);
        match store.txn(&[compare], &[op]) {
            Ok(_) => return Ok(next),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::store::RedbStore;

    fn open() -> (tempfile::TempDir, Arc<RedbStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("weft.redb")).unwrap());
        (dir, store)
    }

    #[test]
    fn a_lone_caller_takes_ids_in_order_from_one_reservation() {
        let (_dir, store) = open();
        let ids = Ids::default();
        assert_eq!(ids.take(&*store).unwrap(), NodeId(1));
        assert_eq!(ids.take(&*store).unwrap(), NodeId(2));
        assert_eq!(
            store::get_json::<u64>(&*store, NEXT_ID_KEY)
                .unwrap()
                .unwrap()
                .0,
            1 + MIN_BLOCK
        );
    }

    #[test]
    fn given_back_ids_are_handed_out_again() {
        let (_dir, store) = open();
        let ids = Ids::default();
        let first = ids.take(&*store).unwrap();
        ids.give_back(first);
        assert_eq!(ids.take(&*store).unwrap(), first);
        assert_eq!(ids.take(&*store).unwrap(), NodeId(2));
    }

    /// A coordinator killed with ids reserved: the next one never hands
    /// them out.
    #[test]
    fn ids_reserved_by_an_earlier_run_are_never_handed_out() {
        let (_dir, store) = open();
        let before = Ids::default();
        assert_eq!(before.take(&*store).unwrap(), NodeId(1));
        let after = Ids::default();
        assert_eq!(after.take(&*store).unwrap(), NodeId(1 + MIN_BLOCK));
    }

    /// Many callers at once: every id is handed out once, and callers that
    /// wait together share a reservation.
    #[test]
    fn concurrent_callers_get_distinct_ids() {
        const CALLERS: usize = 32;
        let (_dir, store) = open();
        let ids = Ids::default();
        let start = Barrier::new(CALLERS);
        let taken: Vec<NodeId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let (ids, store, start) = (&ids, &store, &start);
                    s.spawn(move || {
                        start.wait();
                        (0..5)
                            .map(|_| ids.take(&**store).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let distinct: BTreeSet<NodeId> = taken.iter().copied().collect();
        assert_eq!(distinct.len(), taken.len());
        let counter = store::get_json::<u64>(&*store, NEXT_ID_KEY)
            .unwrap()
            .unwrap()
            .0;
        assert!(distinct.iter().all(|id| id.0 >= 1 && id.0 < counter));
    }
}
