//! Group commit: transactions that callers submit while another commit is
//! in flight go to etcd together, as one request, when it returns.
//!
//! Every etcd commit waits for the leader's disk to sync (and, in a cluster,
//! for a quorum), so sending transactions one at a time caps a coordinator
//! at one sync per transaction however many nodes register at once. Here
//! the first caller to find no commit in flight leads: it takes a batch from
//! the queue, commits it, answers every caller in it, and hands the lead to
//! the caller now first in the queue. A lone transaction is sent at once, as
//! before; nothing waits on a timer, so batching adds no latency.
//!
//! A batch holds transactions whose keys (compared or written) are pairwise
//! disjoint. Each keeps its own compares, so one that fails does not fail
//! the others, and since none reads a key another writes, committing them
//! together is the same as committing them one after another.

use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc::{self, SyncSender};

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::super::{Compare, Op, StoreError};

/// Most transactions in one batch; etcd refuses more than `--max-txn-ops`
/// (128 by default) operations in a request, and each is one.
pub(super) const MAX_BATCH: usize = 64;
/// Most bytes of keys and values in one batch, well inside etcd's default
/// 1.5 MiB request limit.
pub(super) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Sends one batch to etcd; each transaction's outcome, in order.
pub(super) type Commit<'a> = dyn Fn(&[&Txn]) -> Vec<Result<u64, StoreError>> + 'a;

/// One transaction as submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Txn {
    pub(super) compares: Vec<Compare>,
    pub(super) ops: Vec<Op>,
}

impl Txn {
    /// Every key the transaction compares or writes.
    fn keys(&self) -> BTreeSet<String> {
        let compared = self.compares.iter().map(|c| match c {
            Compare::Absent(key) | Compare::ModRevision(key, _) => key.clone(),
        });
        compared
            .chain(self.ops.iter().map(|op| op.key().to_owned()))
            .collect()
    }

    /// Bytes of keys and values it sends.
    pub(super) fn bytes(&self) -> usize {
        let ops: usize = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Put(key, value) | Op::PutLeased(key, value, _) => key.len() + value.len(),
                Op::Delete(key) => key.len(),
            })
            .sum();
        let compares: usize = self
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(key) | Compare::ModRevision(key, _) => key.len(),
            })
            .sum();
        ops + compares
    }

    /// Too large to share a request with others: it goes alone, so that
    /// etcd's own limits (and their error) apply to it as submitted.
    fn alone(&self) -> bool {
        self.ops.len() + self.compares.len() > MAX_BATCH || self.bytes() > MAX_BATCH_BYTES / 2
    }
}

/// The queue of transactions waiting for a commit.
#[derive(Default)]
pub(super) struct GroupCommit {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Whether some caller leads: commits a batch or is about to.
    leading: bool,
}

struct Queued {
    txn: Txn,
    keys: BTreeSet<String>,
    reply: SyncSender<Turn>,
}

/// What a waiting caller is told.
enum Turn {
    /// Its transaction's outcome.
    Done(Result<u64, StoreError>),
    /// It is first in the queue and no commit is in flight: commit a batch.
    Lead,
}

impl GroupCommit {
    /// Commits `txn`, in a batch with whatever else is waiting. `commit`
    /// sends one batch to etcd and returns each transaction's outcome, in
    /// order.
    pub(super) fn submit(&self, txn: Txn, commit: &Commit<'_>) -> Result<u64, StoreError> {
        let (reply, turns) = mpsc::sync_channel(1);
        let keys = txn.keys();
        let lead = {
            let mut state = self.lock();
            state.queue.push_back(Queued { txn, keys, reply });
            !std::mem::replace(&mut state.leading, true)
        };
        if lead {
            self.lead(commit);
        }
        loop {
            match super::wait(|| turns.recv()) {
                Ok(Turn::Done(outcome)) => return outcome,
                Ok(Turn::Lead) => self.lead(commit),
                Err(_) => return Err(StoreError::Backend("the etcd commit queue stopped".into())),
            }
        }
    }

    /// Commits one batch, answers its callers and passes the lead on.
    fn lead(&self, commit: &Commit<'_>) {
        let batch = take_batch(&mut self.lock().queue);
        let txns: Vec<&Txn> = batch.iter().map(|q| &q.txn).collect();
        let mut outcomes = commit(&txns).into_iter();
        for queued in batch {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "etcd answered fewer transactions than were sent".into(),
                ))
            });
            // The caller waits until it is answered; it cannot be gone.
            let _ = queued.reply.send(Turn::Done(outcome));
        }
        let mut state = self.lock();
        while let Some(next) = state.queue.front() {
            if next.reply.send(Turn::Lead).is_ok() {
                return;
            }
            state.queue.pop_front();
        }
        state.leading = false;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Takes the next batch off the queue: its first transaction, then every
/// later one that touches no key an earlier one in the queue touches (so
/// transactions on the same keys commit in the order they were submitted),
/// within the batch limits.
fn take_batch(queue: &mut VecDeque<Queued>) -> Vec<Queued> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    if first.txn.alone() {
        return vec![first];
    }
    let mut bytes = first.txn.bytes();
    let mut claimed = first.keys.clone();
    let mut batch = vec![first];
    let mut left = VecDeque::with_capacity(queue.len());
    while let Some(queued) = queue.pop_front() {
        let fits = batch.len() < MAX_BATCH
            && !queued.txn.alone()
            && bytes + queued.txn.bytes() <= MAX_BATCH_BYTES
            && claimed.is_disjoint(&queued.keys);
        claimed.extend(queued.keys.iter().cloned());
        if fits {
            bytes += queued.txn.bytes();
            batch.push(queued);
        } else {
            left.push_back(queued);
        }
    }
    *queue = left;
    batch
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use super::*;

    fn put(key: &str) -> Op {
        Op::Put(key.into(), b"v".to_vec())
    }

    fn txn(compares: &[&str], puts: &[&str]) -> Txn {
        Txn {
            compares: compares
                .iter()
                .map(|k| Compare::Absent((*k).into()))
                .collect(),
            ops: puts.iter().map(|k| put(k)).collect(),
        }
    }

    fn queue(txns: Vec<Txn>) -> VecDeque<Queued> {
        txns.into_iter()
            .map(|txn| Queued {
                keys: txn.keys(),
                txn,
                reply: mpsc::sync_channel(1).0,
            })
            .collect()
    }

    fn names<'a>(batch: impl IntoIterator<Item = &'a Queued>) -> Vec<String> {
        batch
            .into_iter()
            .map(|q| q.txn.ops.first().map_or("", |op| op.key()).to_owned())
            .collect()
    }

    #[test]
    fn a_batch_takes_disjoint_transactions_and_leaves_overlapping_ones_in_order() {
        let mut waiting = queue(vec![
            txn(&["names/a"], &["a"]),
            txn(&[], &["b"]),
            // Compares a key the first one writes: must see its outcome.
            txn(&["a"], &["c"]),
            // Overlaps only with the one left behind: must not overtake it.
            txn(&[], &["c"]),
            txn(&["names/e"], &["e"]),
        ]);
        let batch = take_batch(&mut waiting);
        assert_eq!(names(&batch), ["a", "b", "e"]);
        assert_eq!(names(&waiting), ["c", "c"]);
        let batch = take_batch(&mut waiting);
        assert_eq!(names(&batch), ["c"]);
        assert_eq!(names(&take_batch(&mut waiting)), ["c"]);
        assert!(take_batch(&mut waiting).is_empty());
    }

    #[test]
    fn batches_respect_the_count_and_size_limits() {
        let mut waiting = queue(
            (0..MAX_BATCH + 3)
                .map(|i| txn(&[], &[&format!("k{i}")]))
                .collect(),
        );
        assert_eq!(take_batch(&mut waiting).len(), MAX_BATCH);
        assert_eq!(take_batch(&mut waiting).len(), 3);

        let big = |key: &str| Txn {
            compares: Vec::new(),
            ops: vec![Op::Put(key.into(), vec![0; MAX_BATCH_BYTES / 3])],
        };
        let mut waiting = queue(vec![big("x"), big("y"), big("z")]);
        assert_eq!(names(&take_batch(&mut waiting)), ["x", "y"]);
        assert_eq!(names(&take_batch(&mut waiting)), ["z"]);

        // One too large to share a request goes alone, even when first.
        let mut many = txn(&[], &[]);
        many.ops = (0..MAX_BATCH + 1).map(|i| put(&format!("m{i}"))).collect();
        let mut waiting = queue(vec![many, txn(&[], &["p"]), txn(&[], &["q"])]);
        assert_eq!(take_batch(&mut waiting).len(), 1);
        assert_eq!(names(&take_batch(&mut waiting)), ["p", "q"]);
    }

    /// Many callers at once: each gets its own outcome, and callers that
    /// arrive while a commit is in flight share the next one.
    #[test]
    fn concurrent_callers_share_commits_and_each_gets_its_outcome() {
        const CALLERS: usize = 24;
        let group = GroupCommit::default();
        let commits = AtomicUsize::new(0);
        let largest = AtomicUsize::new(0);
        let commit = |txns: &[&Txn]| -> Vec<Result<u64, StoreError>> {
            let n = commits.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            largest.fetch_max(txns.len(), Ordering::SeqCst);
            // A commit that takes a while, like a disk sync.
            std::thread::sleep(std::time::Duration::from_millis(20));
            txns.iter()
                .map(|t| match t.ops.first().map(Op::key) {
                    Some(key) if key.ends_with("-refused") => Err(StoreError::Conflict),
                    _ => Ok(n),
                })
                .collect()
        };
        let start = Arc::new(Barrier::new(CALLERS));
        let outcomes: Vec<(usize, Result<u64, StoreError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CALLERS)
                .map(|i| {
                    let (group, start) = (&group, Arc::clone(&start));
                    let commit = &commit;
                    s.spawn(move || {
                        let key = if i % 5 == 0 {
                            format!("k{i}-refused")
                        } else {
                            format!("k{i}")
                        };
                        start.wait();
                        (i, group.submit(txn(&[], &[&key]), commit))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, outcome) in &outcomes {
            match outcome {
                Err(StoreError::Conflict) => assert_eq!(i % 5, 0),
                Ok(revision) => {
                    assert_ne!(i % 5, 0);
                    assert!(*revision >= 1);
                }
                Err(e) => panic!("{e}"),
            }
        }
        let commits = commits.load(Ordering::SeqCst);
        assert!(commits < CALLERS, "{commits} commits for {CALLERS} callers");
        assert!(largest.load(Ordering::SeqCst) > 1);
        assert!(!group.lock().leading, "the lead is released when idle");
        assert!(group.lock().queue.is_empty());
    }
}
