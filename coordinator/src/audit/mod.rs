//! The audit trail of the control plane: who installed which policy,
//! created auth keys, registered, deleted and expired nodes, disabled
//! users, and every login and workload join with its result.
//!
//! Entries form a hash chain in the store (see [`entry`]): each names the
//! hash of the one before, and a head record names the last. An append is
//! one transaction guarded by a compare on the head, so coordinator
//! replicas sharing a store write one chain: of two concurrent appends one
//! commits and the other re-reads the head and tries again.
//!
//! A policy install and its entry are one transaction: no policy is ever in
//! force without its entry. Every other event is appended after the
//! operation it records; a failed append is logged and counted (the count
//! shows in `weft-coordinator audit`), and never fails that operation.

mod chain;
mod entry;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use self::chain::Head;
pub use self::chain::{Pin, Tamper, Verification};
pub(crate) use self::entry::sha256_hex;
pub use self::entry::{Actor, AuditEntry, Event, Outcome, GENESIS_HASH};
use crate::authkey::unix_secs;
use crate::store::{self, Compare, Op, Store, StoreError};

/// Where entries are kept, by zero-padded sequence number so that keys sort
/// in chain order.
pub(crate) const ENTRIES_PREFIX: &str = "audit/entries/";
/// Where the head record is kept.
const HEAD_KEY: &str = "audit/head";

/// Appends that lost to a concurrent one more often than this give up:
/// far more replicas than any deployment runs would have to append at once.
const MAX_APPEND_ATTEMPTS: usize = 64;

/// Best-effort appends that failed since this process started.
static FAILED_APPENDS: AtomicU64 = AtomicU64::new(0);

fn entry_path(seq: u64) -> String {
    format!("{ENTRIES_PREFIX}{seq:020}")
}

/// An operation to commit together with its entry.
#[derive(Debug)]
pub(crate) struct Staged {
    /// What must hold for the operation, besides the chain head.
    pub(crate) compares: Vec<Compare>,
    /// The operation's writes.
    pub(crate) ops: Vec<Op>,
    pub(crate) actor: Actor,
    pub(crate) event: Event,
}

/// Appends the entry `stage` describes, committing its operation in the
/// same transaction. `stage` runs again whenever the transaction lost to a
/// concurrent one (a compare of its own, or the chain head, changed).
pub(crate) fn append_with(
    store: &dyn Store,
    now: SystemTime,
    mut stage: impl FnMut() -> Result<Staged, StoreError>,
) -> Result<AuditEntry, StoreError> {
    for _ in 0..MAX_APPEND_ATTEMPTS {
        let staged = stage()?;
        let mut chained = chain_onto_head(store, [(now, staged.actor, staged.event)])?;
        let mut compares = staged.compares;
        compares.append(&mut chained.compares);
        let mut ops = staged.ops;
        ops.append(&mut chained.ops);
        match store.txn(&compares, &ops) {
            Ok(_) => return Ok(chained.entries.remove(0)),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

/// Entries chained onto the stored head, with what their transaction must
/// compare and write.
struct Chained {
    entries: Vec<AuditEntry>,
    /// The head is unchanged and no entry is stored at the new positions.
    compares: Vec<Compare>,
    /// The entries and the new head.
    ops: Vec<Op>,
}

/// Numbers and links `events` after the chain's current head.
fn chain_onto_head(
    store: &dyn Store,
    events: impl IntoIterator<Item = (SystemTime, Actor, Event)>,
) -> Result<Chained, StoreError> {
    let (mut head, guard) = match store::get_json::<Head>(store, HEAD_KEY)? {
        Some((head, revision)) => (head, Compare::ModRevision(HEAD_KEY.into(), revision)),
        None => (Head::genesis(), Compare::Absent(HEAD_KEY.into())),
    };
    let mut chained = Chained {
        entries: Vec::new(),
        compares: vec![guard],
        ops: Vec::new(),
    };
    for (now, actor, event) in events {
        let entry = AuditEntry::new(head.seq + 1, unix_secs(now), actor, event, head.hash);
        let path = entry_path(entry.seq);
        chained.compares.push(Compare::Absent(path.clone()));
        chained.ops.push(Op::Put(path, store::encode(&entry)?));
        head = Head {
            seq: entry.seq,
            hash: entry.hash.clone(),
        };
        chained.entries.push(entry);
    }
    chained
        .ops
        .push(Op::Put(HEAD_KEY.into(), store::encode(&head)?));
    Ok(chained)
}

/// Appends an entry for an operation already done. A failure is logged and
/// counted, never returned: the operation stands either way.
///
/// Appends that arrive while another is committing are written together,
/// in one transaction after it (group commit): a burst of registrations
/// costs a few commits, not one each, and they do not race each other for
/// the chain head.
pub(crate) fn record(store: &dyn Store, now: SystemTime, actor: Actor, event: Event) {
    let key = store_key(store);
    lock(&PENDING)
        .entry(key)
        .or_default()
        .push((now, actor, event));
    let _writer = lock(&WRITER);
    let Some(batch) = lock(&PENDING).remove(&key) else {
        // A writer before this one committed the entry with its own.
        return;
    };
    if let Err(e) = append_batch(store, &batch) {
        let failed =
            FAILED_APPENDS.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
        // Entries name people; the log says only what kind they were.
        let kinds: Vec<&str> = batch.iter().map(|(_, _, event)| event.kind()).collect();
        tracing::error!(
            failed_appends = failed,
            "cannot append {} to the audit trail: {e}",
            kinds.join(", ")
        );
    }
}

/// Best-effort entries waiting for a writer, per store.
type Pending = BTreeMap<usize, Vec<(SystemTime, Actor, Event)>>;

static PENDING: Mutex<Pending> = Mutex::new(BTreeMap::new());
/// Held while best-effort entries are committed, so one writer at a time
/// takes what is pending.
static WRITER: Mutex<()> = Mutex::new(());

/// The store's identity while it is borrowed: a key is in [`PENDING`] only
/// while a [`record`] call borrowing that store is running, so a dropped
/// store's address is never mistaken for a live one.
fn store_key(store: &dyn Store) -> usize {
    std::ptr::from_ref(store).cast::<()>() as usize
}

/// A poisoned lock only means another append panicked; the data is a
/// queue of entries and stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends `batch`, in order, in one transaction guarded by the chain head.
fn append_batch(store: &dyn Store, batch: &[(SystemTime, Actor, Event)]) -> Result<(), StoreError> {
    for _ in 0..MAX_APPEND_ATTEMPTS {
        let chained = chain_onto_head(store, batch.iter().cloned())?;
        match store.txn(&chained.compares, &chained.ops) {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

/// How many best-effort appends failed since this process started.
pub(crate) fn failed_appends() -> u64 {
    FAILED_APPENDS.load(Ordering::Relaxed)
}

/// The number of the last entry (0 while the trail is empty).
pub(crate) fn head_seq(store: &dyn Store) -> Result<u64, StoreError> {
    Ok(store::get_json::<Head>(store, HEAD_KEY)?.map_or(0, |(head, _)| head.seq))
}

/// Every entry recorded at or after `since` (Unix seconds), in chain order.
pub(crate) fn list(store: &dyn Store, since: Option<u64>) -> Result<Vec<AuditEntry>, StoreError> {
    let mut entries = Vec::new();
    for (key, value) in store.list(ENTRIES_PREFIX)? {
        let entry: AuditEntry = store::decode(&key, &value.value)?;
        if since.is_none_or(|since| entry.time >= since) {
            entries.push(entry);
        }
    }
    Ok(entries)
}

/// Checks the stored chain, and that it still holds `pin` if given.
pub(crate) fn verify(store: &dyn Store, pin: Option<&Pin>) -> Result<Verification, StoreError> {
    let entries: Vec<_> = store
        .list(ENTRIES_PREFIX)?
        .into_iter()
        .map(|(key, value)| {
            let position = key
                .strip_prefix(ENTRIES_PREFIX)
                .and_then(|seq| seq.parse().ok());
            (position, value.value)
        })
        .collect();
    let head = store.get(HEAD_KEY)?;
    Ok(chain::verify(
        &entries,
        head.as_ref().map(|head| &*head.value),
        pin,
    ))
}
