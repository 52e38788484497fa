//! What one coordinator replica keeps in the shared store so that its peers
//! replicas know about it: a lease that dies with the process, the presence
//! of the nodes connected to it, and leadership of the jobs that must run
//! once across all replicas (the ephemeral reap).
//!
//! Leadership is the key [`LEADER_KEY`] put with the replica's lease if it is
//! absent. Its `mod_revision` is the fence: the leader's writes compare it,
//! so a replica that lost the key (its lease expired while it was paused or
//! cut off) has every write refused instead of racing the new leader. The key
//! is never rewritten while held, so its `mod_revision` is its create revision.
//!
//! Presence is one key per node and replica, `presence/NODE/LEASE`, put with
//! the replica's lease when the node's first session attaches and deleted at
//! its last detach; a replica that dies takes its keys with it within the
//! lease's ttl. A node is online while any key under `presence/NODE/` exists.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use weft_proto::NodeId;

use crate::store::{Compare, LeaseId, Op, Store, StoreError};

/// The key held by the leader of the singleton jobs.
pub(crate) const LEADER_KEY: &str = "leader/singletons";
/// Where presence keys live.
pub(crate) const PRESENCE_PREFIX: &str = "presence/";
/// How long a dead replica's presence and leadership outlive it.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(3);
/// Presence changes written per transaction (etcd takes 128 operations).
const PRESENCE_BATCH: usize = 100;

/// The fence of a leadership: the revision at which the leader key was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fence(pub(crate) u64);

impl Fence {
    /// The compare that makes a write succeed only while this leadership holds.
    pub(crate) fn compare(self) -> Compare {
        Compare::ModRevision(LEADER_KEY.to_owned(), self.0)
    }
}

/// A change in this replica's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// The node has a session here now.
    Up(NodeId),
    /// The node's last session here ended.
    Down(NodeId),
}

/// The node a presence key is about.
pub(crate) fn presence_node(key: &str) -> Option<NodeId> {
    let rest = key.strip_prefix(PRESENCE_PREFIX)?;
    let (node, _lease) = rest.split_once('/')?;
    node.parse().ok().map(NodeId)
}

fn presence_key(node: NodeId, lease: LeaseId) -> String {
    format!("{PRESENCE_PREFIX}{}/{:x}", node.0, lease.0)
}

/// Keeps the replica's lease alive, campaigns for leadership on every
/// keep-alive, and writes presence changes from `presence`. Reports each
/// change of leadership through `leadership`. Ends when `presence` closes,
/// revoking the lease so that peers see this replica's nodes offline and
/// take over leadership at once.
pub(crate) async fn run(
    store: Arc<dyn Store>,
    mut presence: mpsc::UnboundedReceiver<Presence>,
    leadership: impl Fn(Option<Fence>),
) {
    let mut online = BTreeSet::new();
    let mut lease: Option<LeaseId> = None;
    let mut leader: Option<Fence> = None;
    let mut tick = tokio::time::interval(LEASE_TTL / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut changes = Vec::new();
        tokio::select! {
            _ = tick.tick() => {
                let (held, now) = off_runtime(|| renew(&*store, lease, &online));
                lease = held;
                if now != leader {
                    match now {
                        Some(fence) => tracing::info!(fence = fence.0, "this coordinator now runs the singleton jobs"),
                        None => tracing::info!("this coordinator no longer runs the singleton jobs"),
                    }
                    leader = now;
                    leadership(now);
                }
            }
            change = presence.recv() => match change {
                Some(change) => changes.push(change),
                None => break,
            },
        }
        while let Ok(change) = presence.try_recv() {
            changes.push(change);
        }
        if changes.is_empty() {
            continue;
        }
        if let Some(id) = lease {
            if off_runtime(|| write_presence(&*store, id, &mut online, &changes)).is_err() {
                lease = None;
            }
        } else {
            apply(&mut online, &changes);
        }
    }
    if let Some(id) = lease {
        if let Err(e) = off_runtime(|| store.revoke_lease(id)) {
            tracing::warn!("cannot revoke the coordinator's store lease: {e}");
        }
    }
}

/// Renews `lease` (or grants a new one, publishing `online` under it) and
/// campaigns for leadership with it: the lease now held, and the fence if
/// this replica leads.
fn renew(
    store: &dyn Store,
    lease: Option<LeaseId>,
    online: &BTreeSet<NodeId>,
) -> (Option<LeaseId>, Option<Fence>) {
    let held = match lease {
        Some(id) => match store.keep_alive(id) {
            Ok(true) => Some(id),
            Ok(false) => {
                tracing::warn!("the coordinator's store lease expired; granting a new one");
                None
            }
            Err(e) => {
                tracing::warn!("cannot renew the coordinator's store lease: {e}");
                Some(id)
            }
        },
        None => None,
    };
    let lease = match held {
        Some(id) => Some(id),
        None => grant(store, online),
    };
    (lease, lease.and_then(|id| campaign(store, id)))
}

/// Runs `f`, which blocks on the store (an embedded commit waits for the
/// disk), without stalling the tasks queued behind it on this worker, such
/// as the QUIC endpoint's: on a multi-threaded runtime the worker hands them
/// to another thread meanwhile.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Grants a lease and publishes the presence of every node online here.
fn grant(store: &dyn Store, online: &BTreeSet<NodeId>) -> Option<LeaseId> {
    let id = match store.grant_lease(LEASE_TTL) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!("cannot get a store lease: {e}");
            return None;
        }
    };
    let puts: Vec<Op> = online
        .iter()
        .map(|node| Op::PutLeased(presence_key(*node, id), Vec::new(), id))
        .collect();
    for chunk in puts.chunks(PRESENCE_BATCH) {
        if let Err(e) = store.txn(&[], chunk) {
            tracing::warn!("cannot publish node presence: {e}");
            return None;
        }
    }
    Some(id)
}

/// Takes the leader key if it is free; the fence if this lease holds it.
fn campaign(store: &dyn Store, lease: LeaseId) -> Option<Fence> {
    let ours = lease.0.to_string().into_bytes();
    let put = Op::PutLeased(LEADER_KEY.to_owned(), ours.clone(), lease);
    match store.txn(&[Compare::Absent(LEADER_KEY.to_owned())], &[put]) {
        Ok(revision) => return Some(Fence(revision)),
        Err(StoreError::Conflict) => {}
        Err(e) => {
            tracing::debug!("cannot campaign for leadership: {e}");
            return None;
        }
    }
    match store.get(LEADER_KEY) {
        Ok(Some(held)) if held.value == ours => Some(Fence(held.mod_revision)),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!("cannot read the leader key: {e}");
            None
        }
    }
}

/// Writes the net effect of `changes`; an error means the lease is lost or
/// the store is away, and the next grant republishes everything.
fn write_presence(
    store: &dyn Store,
    lease: LeaseId,
    online: &mut BTreeSet<NodeId>,
    changes: &[Presence],
) -> Result<(), StoreError> {
    let before = online.clone();
    apply(online, changes);
    let ops: Vec<Op> = online
        .difference(&before)
        .map(|node| Op::PutLeased(presence_key(*node, lease), Vec::new(), lease))
        .chain(
            before
                .difference(online)
                .map(|node| Op::Delete(presence_key(*node, lease))),
        )
        .collect();
    for chunk in ops.chunks(PRESENCE_BATCH) {
        if let Err(e) = store.txn(&[], chunk) {
            tracing::warn!("cannot write node presence: {e}");
            return Err(e);
        }
    }
    Ok(())
}

fn apply(online: &mut BTreeSet<NodeId>, changes: &[Presence]) {
    for change in changes {
        match change {
            Presence::Up(node) => online.insert(*node),
            Presence::Down(node) => online.remove(node),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        (dir, Arc::new(store))
    }

    #[test]
    fn presence_keys_name_their_node() {
        let key = presence_key(NodeId(42), LeaseId(0x1f));
        assert_eq!(key, "presence/42/1f");
        assert_eq!(presence_node(&key), Some(NodeId(42)));
        assert_eq!(presence_node("presence/42"), None);
        assert_eq!(presence_node("presence/x/1"), None);
        assert_eq!(presence_node("nodes/42/1"), None);
    }

    #[test]
    fn one_campaigner_wins_and_a_stale_leader_is_fenced_off() {
        let (_dir, store) = store();
        let a = store.grant_lease(LEASE_TTL).unwrap();
        let b = store.grant_lease(LEASE_TTL).unwrap();
        let fence_a = campaign(&*store, a).unwrap();
        assert_eq!(campaign(&*store, b), None, "the key is held");
        assert_eq!(
            campaign(&*store, a),
            Some(fence_a),
            "re-campaigning keeps it"
        );

        // A's lease ends (as if A was paused past its ttl); B takes over.
        store.revoke_lease(a).unwrap();
        let fence_b = campaign(&*store, b).unwrap();
        assert_ne!(fence_a, fence_b);
        let write = |fence: Fence| store.txn(&[fence.compare()], &[Op::Put("x".into(), vec![1])]);
        assert!(matches!(write(fence_a), Err(StoreError::Conflict)));
        assert!(write(fence_b).is_ok());
    }

    #[test]
    fn on_etcd_a_leader_whose_lease_expired_is_fenced_off() {
        let etcd = weft_test_etcd::EtcdCluster::start(3).unwrap();
        let settings = crate::config::EtcdSettings {
            prefix: "/weft-test/".into(),
            ..crate::config::EtcdSettings::new(etcd.endpoints())
        };
        let a: Arc<dyn Store> = Arc::new(crate::store::EtcdStore::connect(&settings).unwrap());
        let b: Arc<dyn Store> = Arc::new(crate::store::EtcdStore::connect(&settings).unwrap());
        let lease_a = a.grant_lease(Duration::from_secs(1)).unwrap();
        let lease_b = b.grant_lease(LEASE_TTL).unwrap();
        let fence_a = campaign(&*a, lease_a).unwrap();
        assert_eq!(campaign(&*b, lease_b), None);
        // A stops renewing (paused, cut off): B takes over once the lease ends.
        let started = std::time::Instant::now();
        let fence_b = loop {
            if let Some(fence) = campaign(&*b, lease_b) {
                break fence;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no takeover");
            std::thread::sleep(Duration::from_millis(100));
        };
        let write = |store: &dyn Store, fence: Fence| {
            store.txn(&[fence.compare()], &[Op::Put("x".into(), vec![1])])
        };
        assert!(matches!(write(&*a, fence_a), Err(StoreError::Conflict)));
        assert!(write(&*b, fence_b).is_ok());
        assert_eq!(
            campaign(&*a, lease_a),
            None,
            "the expired lease cannot campaign"
        );
    }

    #[test]
    fn presence_follows_attach_and_detach_and_survives_a_new_lease() {
        let (_dir, store) = store();
        let lease = store.grant_lease(LEASE_TTL).unwrap();
        let mut online = BTreeSet::new();
        let (n1, n2) = (NodeId(1), NodeId(2));
        let changes = [Presence::Up(n1), Presence::Up(n2), Presence::Down(n2)];
        write_presence(&*store, lease, &mut online, &changes).unwrap();
        let keys = |store: &dyn Store| -> Vec<Option<NodeId>> {
            store
                .list(PRESENCE_PREFIX)
                .unwrap()
                .into_iter()
                .map(|(k, _)| presence_node(&k))
                .collect()
        };
        assert_eq!(keys(&*store), [Some(n1)]);

        store.revoke_lease(lease).unwrap();
        assert!(keys(&*store).is_empty(), "the lease took its keys");
        assert!(matches!(
            write_presence(&*store, lease, &mut online, &[Presence::Up(n2)]),
            Err(StoreError::LeaseExpired)
        ));
        let renewed = grant(&*store, &online).unwrap();
        assert_ne!(renewed, lease);
        assert_eq!(keys(&*store), [Some(n1), Some(n2)]);
    }
}
