//! Per-node views of the overlay, and the deltas that keep connected nodes
//! up to date.
//!
//! [`Netmaps`] is the sans-IO core: it holds every node and the policy in
//! force, and tracks what each connected session was last sent. Drive it with
//! [`Netmaps::apply`], [`Netmaps::resync`] and [`Netmaps::set_policy`] for
//! changes, [`Netmaps::attach`] and [`Netmaps::detach`] for sessions, then
//! call [`Netmaps::flush`] once per batch of inputs to take the messages to
//! send.
//!
//! The view of a node holds only the peers the compiled policy names for it,
//! so a node learns nothing about nodes it may neither reach nor be reached by.
//! The policy is compiled in full once at start and after a resync; after
//! that, a node change or a policy change recompiles only the nodes whose
//! access it affects (see [`Engine`]), and only the sessions of those nodes,
//! and of the peers of a node whose peer record changed, are re-diffed.
//!
//! A session that attaches with a [`Resume`] starts with the delta from the
//! view the node says it holds rather than a full netmap ([`Opening`]); the
//! rule for when a full netmap is sent instead is [`FullReason`].

mod budget;
mod lockout;
mod replica;
mod service;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use weft_policy::{Diagnostics, Engine, NodeInfo, Policy, TestReport};
use weft_proto::flows::FlowEndpoint;
use weft_proto::resume::{self, ResumeError};
use weft_proto::signing::Digest;
use weft_proto::{
    AppGrant, NetMap, NetMapDelta, NodeId, PacketFilter, Peer, Refusal, RefusalCode, Resume,
    SelfNode, ServerMessage, ViewDigest,
};

pub(crate) use self::budget::{check as budget_check, OverBudget, NETMAP_BUDGET};
pub(crate) use self::lockout::Lockout;
pub(crate) use self::service::{Attached, NetmapHandle, SessionEvent};
use crate::nodes::{key_expired, NodeRecord};

/// Identifies one control session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SessionId(pub(crate) u64);

/// A change to the stored nodes, at the store revision that made it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NodeUpdate {
    Put {
        record: Box<NodeRecord>,
        revision: u64,
    },
    Delete {
        id: NodeId,
        revision: u64,
    },
}

/// What the core asks its shell to do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// Send this message to the session.
    Send(SessionId, Box<ServerMessage>),
    /// The session's node was deleted: send the refusal and end the session.
    Close(SessionId, Refusal),
    /// A newer session of the same node took over: end this one.
    Replaced(SessionId),
}

/// The sans-IO netmap core. See the module documentation for how to drive it.
#[derive(Debug, Default)]
pub(crate) struct Netmaps {
    nodes: BTreeMap<NodeId, (NodeRecord, u64)>,
    /// Each node's overlay addresses, so naming the ends of flow records
    /// costs a lookup per address, not a scan of every node.
    by_address: HashMap<IpAddr, NodeId>,
    /// Each node's peer record, built once per change and shared by every
    /// view that holds it, so that a fan-out neither rebuilds nor copies it
    /// per viewer and an unchanged peer compares by pointer.
    peers: BTreeMap<NodeId, Arc<Peer>>,
    /// The resume digest of each record in `peers`, computed once per
    /// change, so a fleet resuming at once hashes each peer once rather
    /// than once per viewer.
    peer_digests: BTreeMap<NodeId, ViewDigest>,
    /// Revision at which each known node was deleted, so late updates do not revive it.
    tombstones: BTreeMap<NodeId, u64>,
    policy: Option<Arc<Policy>>,
    /// The policy compiled for the unexpired nodes; `None` without a policy.
    engine: Option<Engine>,
    /// `engine` must be rebuilt from every node: at start and after a
    /// resync, so that a batch of many changes costs one compilation.
    stale: bool,
    /// Nodes whose sessions' views must be recomputed and diffed.
    dirty: BTreeSet<NodeId>,
    /// Every session's view must be recomputed and diffed.
    all_dirty: bool,
    sessions: BTreeMap<SessionId, Session>,
    /// The sessions of each node with any, so that a session's start and
    /// end cost O(log n) rather than a scan of every session.
    by_node: BTreeMap<NodeId, BTreeSet<SessionId>>,
    outputs: VecDeque<Output>,
    /// Unix seconds at the last [`Netmaps::handle_timeout`]; nodes whose
    /// login expired by then are in nobody's view.
    now: u64,
    /// Nodes whose login had expired at `now`.
    expired: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct Session {
    node: NodeId,
    revision: u64,
    view: View,
}

/// What a node was told: its own details, its peers and its filter.
#[derive(Debug, Clone, PartialEq)]
struct View {
    self_node: SelfNode,
    peers: BTreeMap<NodeId, Arc<Peer>>,
    filter: PacketFilter,
    capabilities: Vec<AppGrant>,
}

impl Netmaps {
    /// An empty overlay under `policy` (`None`: deny all).
    pub(crate) fn new(policy: Option<Arc<Policy>>) -> Self {
        Self {
            policy,
            stale: true,
            all_dirty: true,
            ..Self::default()
        }
    }

    /// Applies a stored change. Updates older than what is known are ignored.
    pub(crate) fn apply(&mut self, update: NodeUpdate) {
        match update {
            NodeUpdate::Put { record, revision } => {
                let id = record.id;
                let newer_known = self.nodes.get(&id).is_some_and(|(_, r)| *r >= revision)
                    || self.tombstones.get(&id).is_some_and(|r| *r >= revision);
                if newer_known {
                    return;
                }
                if let Some((old, _)) = self.nodes.get(&id) {
                    let old = addresses(old);
                    self.forget_addresses(id, old);
                }
                for address in addresses(&record) {
                    self.by_address.insert(address, id);
                }
                let old = self.nodes.insert(id, (*record, revision));
                self.node_changed(id, old.map(|(n, _)| n));
            }
            NodeUpdate::Delete { id, revision } => {
                if self.nodes.get(&id).is_some_and(|(_, r)| *r > revision) {
                    return;
                }
                self.tombstones.insert(id, revision);
                if let Some((old, _)) = self.nodes.remove(&id) {
                    self.forget_addresses(id, addresses(&old));
                    self.node_changed(id, Some(old));
                }
                self.close_sessions_of(id);
            }
        }
    }

    /// Replaces every node with `nodes`, read from the store at `revision`:
    /// after a watcher fell behind, or at start.
    pub(crate) fn resync(&mut self, nodes: Vec<(NodeRecord, u64)>, revision: u64) {
        self.mark_stale();
        let present: BTreeSet<NodeId> = nodes.iter().map(|(n, _)| n.id).collect();
        let gone: Vec<NodeId> = self
            .nodes
            .keys()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.apply(NodeUpdate::Delete { id, revision });
        }
        for (record, revision) in nodes {
            self.apply(NodeUpdate::Put {
                record: Box::new(record),
                revision,
            });
        }
    }

    /// Whether installing `policy` would cut one of `admins` off (see
    /// [`Lockout`]), judged over the nodes registered and not expired now.
    pub(crate) fn check_lockout(&self, policy: &Policy, admins: &[String]) -> Result<(), Lockout> {
        lockout::check(admins, self.policy.as_deref(), policy, &self.live_infos())
    }

    /// Runs `policy`'s tests against the nodes registered and not expired
    /// now, as Tailscale runs them against the device list: those naming
    /// an overlay address or a role stand for real devices.
    pub(crate) fn check_tests(&self, policy: &Policy) -> Result<TestReport, Diagnostics> {
        policy.run_tests_on_nodes(&self.live_infos())
    }

    fn live_infos(&self) -> Vec<NodeInfo> {
        self.nodes
            .values()
            .filter(|(n, _)| !n.is_expired(self.now))
            .map(|(n, _)| n.info())
            .collect()
    }

    /// Whether installing `policy` would give a node that is registered and
    /// not expired now a netmap over the budget (see [`OverBudget`]).
    pub(crate) fn check_budget(&self, policy: &Policy) -> Result<(), OverBudget> {
        let nodes = self
            .nodes
            .values()
            .filter(|(n, _)| !n.is_expired(self.now))
            .map(|(n, _)| n);
        budget::check(policy, nodes, NETMAP_BUDGET)
    }

    /// Installs a new policy (`None`: deny all); only the nodes whose access
    /// it changes get new views.
    pub(crate) fn set_policy(&mut self, policy: Option<Arc<Policy>>) {
        self.policy = policy;
        if self.stale {
            return;
        }
        match (&mut self.engine, &self.policy) {
            (Some(engine), Some(policy)) => {
                let changed = engine.set_policy(Policy::clone(policy));
                self.dirty.extend(changed);
            }
            _ => self.mark_stale(),
        }
    }

    /// Starts a session for the node in `record` (just written at
    /// `revision`) and returns its first record: the full netmap, or the
    /// delta from the view the node resumes from (see [`Opening`]). A newer
    /// session replaces older ones of the same node.
    pub(crate) fn attach(
        &mut self,
        session: SessionId,
        record: NodeRecord,
        revision: u64,
        resume: Option<&Resume>,
    ) -> Result<Opening, Refusal> {
        let id = record.id;
        self.apply(NodeUpdate::Put {
            record: Box::new(record),
            revision,
        });
        if !self.nodes.contains_key(&id) {
            return Err(node_deleted());
        }
        for old in self.by_node.remove(&id).unwrap_or_default() {
            self.sessions.remove(&old);
            self.outputs.push_back(Output::Replaced(old));
        }
        self.rebuild_if_stale();
        let Some(view) = self.view_of(id) else {
            return Err(node_deleted());
        };
        let resumed = match resume {
            Some(resume) => self
                .resumed(id, &view, resume)
                .map(|delta| (delta, resume.last_record)),
            None => Err(FullReason::NotAsked),
        };
        let opening = match resumed {
            Ok((delta, after)) => Opening::Resumed { delta, after },
            Err(why) => Opening::Full(full_netmap(&view), why),
        };
        let revision = match &opening {
            Opening::Full(netmap, _) => netmap.revision,
            Opening::Resumed { delta, .. } => delta.revision,
        };
        self.sessions.insert(
            session,
            Session {
                node: id,
                revision,
                view,
            },
        );
        self.by_node.entry(id).or_default().insert(session);
        Ok(opening)
    }

    /// The delta that brings the view `resume` describes to `view`, the
    /// current view of node `id`; an error says why a full netmap is sent
    /// instead. Peer digests come from `peer_digests`, so the cost is one
    /// lookup per peer on either side, no hashing of peers.
    fn resumed(&self, id: NodeId, view: &View, resume: &Resume) -> Result<NetMapDelta, FullReason> {
        resume.check().map_err(FullReason::Malformed)?;
        if resume.node != id {
            return Err(FullReason::OtherNode);
        }
        let mut upsert_peers = Vec::new();
        for (peer_id, peer) in &view.peers {
            let current = self
                .peer_digests
                .get(peer_id)
                .copied()
                .unwrap_or_else(|| resume::peer_digest(peer));
            if resume.peer(*peer_id) != Some(current) {
                upsert_peers.push(Peer::clone(peer));
            }
        }
        if 2 * upsert_peers.len() > view.peers.len() {
            return Err(FullReason::MostlyChanged {
                changed: upsert_peers.len(),
                peers: view.peers.len(),
            });
        }
        let remove_peers: Vec<NodeId> = resume
            .peers
            .iter()
            .map(|p| p.id)
            .filter(|held| !view.peers.contains_key(held))
            .collect();
        let filter =
            (resume::filter_digest(&view.filter) != resume.filter).then(|| view.filter.clone());
        let capabilities = (resume::capabilities_digest(&view.capabilities) != resume.capabilities)
            .then(|| view.capabilities.clone());
        let self_node = (resume::self_node_digest(&view.self_node) != resume.self_node)
            .then(|| view.self_node.clone());
        Ok(NetMapDelta {
            revision: resume.revision.saturating_add(1),
            upsert_peers,
            remove_peers,
            filter,
            capabilities,
            self_node,
        })
    }

    /// Advances the clock to `now` (Unix seconds): nodes whose login expired
    /// leave every peer's view and their sessions are closed.
    pub(crate) fn handle_timeout(&mut self, now: u64) {
        self.now = now;
        let expired: BTreeSet<NodeId> = self
            .nodes
            .values()
            .filter(|(n, _)| n.is_expired(now))
            .map(|(n, _)| n.id)
            .collect();
        let newly: Vec<NodeId> = expired.difference(&self.expired).copied().collect();
        self.expired = expired;
        // Bring the engine in line with the clock. Besides keys expiring, a
        // node can arrive already expired, and the wall clock can step back
        // and revive one: compare each node's presence in the engine with its
        // state now, rather than with the previous sweep.
        let out_of_sync: Vec<NodeId> = match (&self.engine, self.stale) {
            (Some(engine), false) => self
                .nodes
                .keys()
                .filter(|id| engine.nodes().contains_key(id) == self.expired.contains(id))
                .copied()
                .collect(),
            _ => Vec::new(),
        };
        for id in out_of_sync {
            self.dirty.insert(id);
            self.sync_engine(id);
        }
        for id in newly {
            self.close_sessions_with(id, key_expired());
        }
    }

    /// Forgets a session that ended.
    pub(crate) fn detach(&mut self, session: SessionId) {
        let Some(ended) = self.sessions.remove(&session) else {
            return;
        };
        if let Some(of_node) = self.by_node.get_mut(&ended.node) {
            of_node.remove(&session);
            if of_node.is_empty() {
                self.by_node.remove(&ended.node);
            }
        }
    }

    /// The node a session belongs to.
    pub(crate) fn node_of(&self, session: SessionId) -> Option<NodeId> {
        self.sessions.get(&session).map(|s| s.node)
    }

    /// Whether any session of node `id` is connected.
    pub(crate) fn is_online(&self, id: NodeId) -> bool {
        self.by_node.contains_key(&id)
    }

    /// Every node with a connected session.
    pub(crate) fn online(&self) -> BTreeSet<NodeId> {
        self.by_node.keys().copied().collect()
    }

    /// Every ephemeral node.
    pub(crate) fn ephemeral_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|(n, _)| n.ephemeral)
            .map(|(n, _)| n.id)
            .collect()
    }

    /// The stored record of node `id`.
    pub(crate) fn node(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.get(&id).map(|(n, _)| n)
    }

    /// The nodes holding `addresses` (compared in canonical form, so an
    /// IPv4-mapped IPv6 address finds its IPv4 node), by address as given.
    pub(crate) fn endpoints(&self, addresses: &[IpAddr]) -> HashMap<IpAddr, FlowEndpoint> {
        addresses
            .iter()
            .filter_map(|address| {
                let id = self.by_address.get(&address.to_canonical())?;
                let (node, _) = self.nodes.get(id)?;
                let endpoint = FlowEndpoint {
                    node: Some(node.id),
                    name: Some(node.name.clone()),
                    identity: node.identity.clone(),
                };
                Some((*address, endpoint))
            })
            .collect()
    }

    /// Drops `id`'s entries for `addresses` from the address index, unless
    /// another node holds the address by now.
    fn forget_addresses(&mut self, id: NodeId, addresses: [IpAddr; 2]) {
        for address in addresses {
            if self.by_address.get(&address) == Some(&id) {
                self.by_address.remove(&address);
            }
        }
    }

    /// Brings every session's view up to date and returns what to send.
    pub(crate) fn flush(&mut self) -> Vec<Output> {
        self.rebuild_if_stale();
        let all = std::mem::take(&mut self.all_dirty);
        let dirty = std::mem::take(&mut self.dirty);
        if all || !dirty.is_empty() {
            let ids: Vec<(SessionId, NodeId)> = if all {
                self.sessions.iter().map(|(s, v)| (*s, v.node)).collect()
            } else {
                dirty
                    .iter()
                    .filter_map(|node| Some((node, self.by_node.get(node)?)))
                    .flat_map(|(node, sessions)| sessions.iter().map(|s| (*s, *node)))
                    .collect()
            };
            for (sid, node) in ids {
                let Some(view) = self.view_of(node) else {
                    continue;
                };
                let Some(session) = self.sessions.get_mut(&sid) else {
                    continue;
                };
                if let Some(delta) = diff(&session.view, &view, session.revision + 1) {
                    session.revision += 1;
                    session.view = view;
                    self.outputs
                        .push_back(Output::Send(sid, Box::new(ServerMessage::Delta(delta))));
                }
            }
        }
        self.outputs.drain(..).collect()
    }

    /// Node `id` changed from `old` (`None`: it is new) to what `nodes`
    /// holds now (absent: deleted). Its own view changes, the views of the
    /// nodes whose access it affects, and, when its peer record changed, the
    /// views of its peers before and after.
    fn node_changed(&mut self, id: NodeId, old: Option<NodeRecord>) {
        self.dirty.insert(id);
        let new_peer = self.nodes.get(&id).map(|(n, _)| n.peer());
        let record_changed = old.as_ref().map(NodeRecord::peer) != new_peer;
        match new_peer {
            Some(peer) if record_changed => {
                self.peer_digests.insert(id, resume::peer_digest(&peer));
                self.peers.insert(id, Arc::new(peer));
            }
            Some(_) => {}
            None => {
                self.peers.remove(&id);
                self.peer_digests.remove(&id);
            }
        }
        if record_changed {
            self.dirty.extend(self.peers_of(id));
        }
        self.sync_engine(id);
        if record_changed {
            self.dirty.extend(self.peers_of(id));
        }
    }

    /// Brings node `id` in the engine in line with its record: present
    /// while it exists and its login has not expired.
    fn sync_engine(&mut self, id: NodeId) {
        if self.stale {
            return;
        }
        let Some(engine) = &mut self.engine else {
            return;
        };
        let info = self
            .nodes
            .get(&id)
            .filter(|(n, _)| !n.is_expired(self.now))
            .map(|(n, _)| n.info());
        let known = engine.nodes().get(&id);
        let changed = match info {
            Some(info) if known != Some(&info) => engine.upsert(info),
            Some(_) => BTreeSet::new(),
            None if known.is_some() => engine.remove(id),
            None => BTreeSet::new(),
        };
        self.dirty.extend(changed);
    }

    /// The nodes whose compiled access names `id` as a peer.
    fn peers_of(&self, id: NodeId) -> BTreeSet<NodeId> {
        self.engine
            .as_ref()
            .filter(|_| !self.stale)
            .and_then(|e| e.access().get(&id))
            .map(|a| a.peers.clone())
            .unwrap_or_default()
    }

    /// Drops the engine: it is rebuilt from every node, and every view re-diffed, on next use.
    fn mark_stale(&mut self) {
        self.stale = true;
        self.all_dirty = true;
    }

    fn rebuild_if_stale(&mut self) {
        if !std::mem::take(&mut self.stale) {
            return;
        }
        let infos: Vec<_> = self
            .nodes
            .values()
            .filter(|(n, _)| !n.is_expired(self.now))
            .map(|(n, _)| n.info())
            .collect();
        self.engine = self
            .policy
            .as_ref()
            .map(|policy| Engine::new(Policy::clone(policy), infos));
        self.all_dirty = true;
    }

    fn view_of(&self, id: NodeId) -> Option<View> {
        let (record, _) = self.nodes.get(&id)?;
        let access = self.engine.as_ref().and_then(|e| e.access().get(&id));
        let (peers, filter, capabilities) = match access {
            Some(access) => (
                access
                    .peers
                    .iter()
                    .filter(|p| **p != id)
                    .filter_map(|p| self.peers.get(p).map(|peer| (*p, Arc::clone(peer))))
                    .collect(),
                access.filter.clone(),
                access.capabilities.clone(),
            ),
            None => (BTreeMap::new(), PacketFilter::default(), Vec::new()),
        };
        Some(View {
            self_node: record.self_node(),
            peers,
            filter,
            capabilities,
        })
    }

    fn close_sessions_of(&mut self, id: NodeId) {
        self.close_sessions_with(id, node_deleted());
    }

    fn close_sessions_with(&mut self, id: NodeId, refusal: Refusal) {
        for sid in self.by_node.remove(&id).unwrap_or_default() {
            self.sessions.remove(&sid);
            self.outputs.push_back(Output::Close(sid, refusal.clone()));
        }
    }
}

/// A session's first record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Opening {
    /// The node's whole view, starting a new signing chain; and why it was
    /// not resumed.
    Full(NetMap, FullReason),
    /// What changed since the view the node resumed from, signed as the
    /// next record after `after`, the node's last verified record.
    Resumed { delta: NetMapDelta, after: Digest },
}

/// Why a session starts with a full netmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FullReason {
    #[error("the node did not ask to resume")]
    NotAsked,
    #[error("the node's resume is malformed: {0}")]
    Malformed(#[source] ResumeError),
    #[error("the node's resume is for another node id")]
    OtherNode,
    /// More than half of the peers changed: a delta would save little and
    /// cost the node its removals on top.
    #[error("{changed} of {peers} peers changed")]
    MostlyChanged { changed: usize, peers: usize },
}

fn full_netmap(view: &View) -> NetMap {
    NetMap {
        revision: 1,
        self_node: view.self_node.clone(),
        peers: view.peers.values().map(|p| Peer::clone(p)).collect(),
        filter: view.filter.clone(),
        capabilities: view.capabilities.clone(),
    }
}

/// The delta from `old` to `new`, or `None` when nothing changed.
fn diff(old: &View, new: &View, revision: u64) -> Option<NetMapDelta> {
    let upsert_peers: Vec<Peer> = new
        .peers
        .iter()
        .filter(|(id, peer)| {
            !old.peers
                .get(id)
                .is_some_and(|was| Arc::ptr_eq(was, peer) || was == *peer)
        })
        .map(|(_, peer)| Peer::clone(peer))
        .collect();
    let remove_peers: Vec<NodeId> = old
        .peers
        .keys()
        .filter(|id| !new.peers.contains_key(id))
        .copied()
        .collect();
    let filter = (old.filter != new.filter).then(|| new.filter.clone());
    let capabilities = (old.capabilities != new.capabilities).then(|| new.capabilities.clone());
    let self_node = (old.self_node != new.self_node).then(|| new.self_node.clone());
    if upsert_peers.is_empty()
        && remove_peers.is_empty()
        && filter.is_none()
        && capabilities.is_none()
        && self_node.is_none()
    {
        return None;
    }
    Some(NetMapDelta {
        revision,
        upsert_peers,
        remove_peers,
        filter,
        capabilities,
        self_node,
    })
}

fn node_deleted() -> Refusal {
    Refusal {
        code: RefusalCode::NodeDeleted,
        message: "this node was deleted by an administrator; join again with `weft up --auth-key`"
            .into(),
    }
}

/// A node's overlay addresses, as the address index holds them.
fn addresses(node: &NodeRecord) -> [IpAddr; 2] {
    [IpAddr::V4(node.ipv4), IpAddr::V6(node.ipv6)]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use weft_proto::{Identity, PrivateKey};

    use super::*;

    const POLICY: &str = r#"{
        "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
        "acls": [
            {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
        ],
    }"#;

    const OPEN_LONELY: &str = r#"{
        "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
        "acls": [
            {"action": "accept", "src": ["tag:lonely"], "dst": ["tag:db:*"]},
        ],
    }"#;

    fn policy(source: &str) -> Option<Arc<Policy>> {
        Some(Arc::new(Policy::parse(source, "test.hujson").unwrap()))
    }

    /// A tagged node record, for this module's tests and its children's.
    pub(super) fn node(id: u64, tag: &str) -> NodeRecord {
        let ipv4 = Ipv4Addr::new(100, 64, 0, id as u8);
        NodeRecord {
            id: NodeId(id),
            name: format!("{}-{id}", tag.trim_start_matches("tag:")),
            machine_key: PrivateKey::generate().public_key(),
            node_key: PrivateKey::generate().public_key(),
            ipv4,
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x6440, id as u16),
            identity: Identity {
                user: None,
                tags: vec![tag.into()],
                ..Default::default()
            },
            endpoints: vec![format!("192.0.2.{id}:51820").parse().unwrap()],
            home_relay: None,
            attributes: BTreeMap::new(),
            created: 0,
            ephemeral: false,
            key_expiry: None,
        }
    }

    fn put(record: NodeRecord, revision: u64) -> NodeUpdate {
        NodeUpdate::Put {
            record: Box::new(record),
            revision,
        }
    }

    /// web (1), db (2) and lonely (3), each with a session (10 + id).
    fn overlay(source: &str) -> (Netmaps, BTreeMap<u64, NetMap>) {
        let mut netmaps = Netmaps::new(policy(source));
        let nodes = [node(1, "tag:web"), node(2, "tag:db"), node(3, "tag:lonely")];
        for (rev, n) in nodes.iter().enumerate() {
            netmaps.apply(put(n.clone(), rev as u64 + 1));
        }
        let mut maps = BTreeMap::new();
        for n in nodes {
            let id = n.id.0;
            maps.insert(id, full(netmaps.attach(SessionId(10 + id), n, 1, None)));
        }
        netmaps.flush();
        (netmaps, maps)
    }

    fn full(opening: Result<Opening, Refusal>) -> NetMap {
        match opening.unwrap() {
            Opening::Full(netmap, _) => netmap,
            other => panic!("expected a full netmap, got {other:?}"),
        }
    }

    fn peer_ids(map: &NetMap) -> Vec<u64> {
        map.peers.iter().map(|p| p.id.0).collect()
    }

    fn deltas(outputs: Vec<Output>) -> BTreeMap<u64, NetMapDelta> {
        outputs
            .into_iter()
            .map(|o| match o {
                Output::Send(SessionId(s), message) => match *message {
                    ServerMessage::Delta(d) => (s - 10, d),
                    other => panic!("unexpected {other:?}"),
                },
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_reused_address_names_its_new_holder() {
        let (mut netmaps, _) = overlay(POLICY);
        let first: IpAddr = "100.64.0.1".parse().unwrap();
        let second: IpAddr = "100.64.0.2".parse().unwrap();
        netmaps.apply(NodeUpdate::Delete {
            id: NodeId(2),
            revision: 10,
        });
        assert!(netmaps.endpoints(&[second]).is_empty(), "deleted");
        let mut taker = node(9, "tag:web");
        taker.ipv4 = Ipv4Addr::new(100, 64, 0, 2);
        netmaps.apply(put(taker.clone(), 11));
        assert_eq!(netmaps.endpoints(&[second])[&second].node, Some(NodeId(9)));
        // The address moves on before its old holder's deletion arrives.
        taker.ipv4 = Ipv4Addr::new(100, 64, 0, 1);
        netmaps.apply(put(taker, 12));
        netmaps.apply(NodeUpdate::Delete {
            id: NodeId(1),
            revision: 13,
        });
        assert_eq!(netmaps.endpoints(&[first])[&first].node, Some(NodeId(9)));
        assert!(netmaps.endpoints(&[second]).is_empty(), "9 let it go");
    }

    #[test]
    fn flow_ends_are_found_by_either_address_in_any_spelling() {
        let (netmaps, _) = overlay(POLICY);
        let v4: IpAddr = "100.64.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:100.64.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::6440:3".parse().unwrap();
        let stranger: IpAddr = "100.64.0.99".parse().unwrap();
        let found = netmaps.endpoints(&[v4, mapped, v6, stranger]);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[&v4].node, Some(NodeId(2)));
        assert_eq!(found[&v4].name.as_deref(), Some("db-2"));
        assert_eq!(found[&v4].identity.tags, ["tag:db"]);
        assert_eq!(found[&mapped].name.as_deref(), Some("web-1"));
        assert_eq!(found[&v6].node, Some(NodeId(3)));
        assert!(!found.contains_key(&stranger));
    }

    #[test]
    fn a_node_attaching_before_its_watch_event_still_reaches_its_peers() {
        let mut netmaps = Netmaps::new(policy(POLICY));
        let web = node(1, "tag:web");
        netmaps.apply(put(web.clone(), 1));
        netmaps.attach(SessionId(11), web, 1, None).unwrap();
        netmaps.flush();
        // db's session attaches first; its store watch event arrives after.
        let db = node(2, "tag:db");
        netmaps.attach(SessionId(12), db.clone(), 2, None).unwrap();
        let sent = deltas(netmaps.flush());
        assert_eq!(
            sent[&1].upsert_peers.len(),
            1,
            "web must learn about db: {sent:?}"
        );
        netmaps.apply(put(db, 2));
        assert!(
            netmaps.flush().is_empty(),
            "the late watch event changes nothing"
        );
    }

    #[test]
    fn netmaps_hold_only_what_the_policy_allows() {
        let (_, maps) = overlay(POLICY);
        assert_eq!(peer_ids(&maps[&1]), [2], "web reaches db");
        assert_eq!(peer_ids(&maps[&2]), [1], "db is reached by web");
        assert_eq!(
            peer_ids(&maps[&3]),
            Vec::<u64>::new(),
            "lonely learns of nobody"
        );
        assert!(maps[&1].filter.rules.is_empty(), "nothing may reach web");
        assert!(!maps[&2].filter.rules.is_empty(), "db admits web");
        assert!(maps[&3].filter.rules.is_empty());
        assert!(maps.values().all(|m| m.revision == 1));
    }

    #[test]
    fn without_a_policy_everything_is_denied() {
        let mut netmaps = Netmaps::new(None);
        netmaps.apply(put(node(1, "tag:web"), 1));
        let map = full(netmaps.attach(SessionId(1), node(2, "tag:db"), 2, None));
        assert!(map.peers.is_empty() && map.filter.rules.is_empty());
    }

    #[test]
    fn a_policy_change_sends_deltas_to_the_affected_nodes_only() {
        let (mut netmaps, _) = overlay(POLICY);
        netmaps.set_policy(policy(OPEN_LONELY));
        let deltas = deltas(netmaps.flush());
        assert_eq!(deltas[&1].remove_peers, [NodeId(2)]);
        assert_eq!(
            deltas[&1].filter, None,
            "web's filter was empty and stays so"
        );
        let db = &deltas[&2];
        assert_eq!(db.remove_peers, [NodeId(1)]);
        assert_eq!(
            db.upsert_peers.iter().map(|p| p.id).collect::<Vec<_>>(),
            [NodeId(3)]
        );
        assert!(db.filter.is_some());
        assert_eq!(deltas[&3].upsert_peers[0].id, NodeId(2));
        assert!(deltas.values().all(|d| d.revision == 2));
        assert!(netmaps.flush().is_empty(), "nothing changed since");
    }

    #[test]
    fn a_deleted_node_is_removed_from_its_peers_and_its_session_closed() {
        let (mut netmaps, _) = overlay(POLICY);
        netmaps.apply(NodeUpdate::Delete {
            id: NodeId(2),
            revision: 10,
        });
        let outputs = netmaps.flush();
        assert!(outputs.contains(&Output::Close(SessionId(12), node_deleted())));
        let removal = outputs.iter().find_map(|o| match o {
            Output::Send(SessionId(11), message) => match message.as_ref() {
                ServerMessage::Delta(d) => Some(d),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(removal.unwrap().remove_peers, [NodeId(2)]);
        assert_eq!(outputs.len(), 2, "lonely never knew db: {outputs:?}");
        assert!(!netmaps.is_online(NodeId(2)));
        let late = netmaps.attach(SessionId(99), node(2, "tag:db"), 9, None);
        assert_eq!(late.unwrap_err().code, RefusalCode::NodeDeleted);
    }

    #[test]
    fn changed_endpoints_reach_peers_and_stale_updates_are_ignored() {
        let (mut netmaps, _) = overlay(POLICY);
        let mut db = node(2, "tag:db");
        db.node_key = netmaps.node(NodeId(2)).unwrap().node_key;
        db.machine_key = netmaps.node(NodeId(2)).unwrap().machine_key;
        db.endpoints = vec!["198.51.100.7:4000".parse().unwrap()];
        netmaps.apply(put(db.clone(), 20));
        let deltas = deltas(netmaps.flush());
        assert_eq!(deltas.keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(deltas[&1].upsert_peers, [db.peer()]);
        let mut older = db.clone();
        older.endpoints.clear();
        netmaps.apply(put(older, 19));
        assert!(netmaps.flush().is_empty());
    }

    #[test]
    fn a_new_session_replaces_the_old_one_of_the_same_node() {
        let (mut netmaps, _) = overlay(POLICY);
        let web = netmaps.node(NodeId(1)).unwrap().clone();
        netmaps.attach(SessionId(50), web, 30, None).unwrap();
        assert_eq!(netmaps.flush(), [Output::Replaced(SessionId(11))]);
        assert!(netmaps.is_online(NodeId(1)));
        netmaps.detach(SessionId(50));
        assert!(!netmaps.is_online(NodeId(1)));
        assert_eq!(netmaps.online(), [NodeId(2), NodeId(3)].into());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Put {
            id: u64,
            tag: &'static str,
            port: u16,
            expires: bool,
        },
        Delete(u64),
        Policy(Option<&'static str>),
        Timeout(u64),
        Attach(u64),
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        let tag = prop::sample::select(vec!["tag:web", "tag:db", "tag:lonely"]);
        prop_oneof![
            4 => (1u64..6, tag, 1u16..3, prop::bool::weighted(0.2))
                .prop_map(|(id, tag, port, expires)| Step::Put { id, tag, port, expires }),
            1 => (1u64..6).prop_map(Step::Delete),
            1 => prop::sample::select(vec![Some(POLICY), Some(OPEN_LONELY), None]).prop_map(Step::Policy),
            1 => prop::sample::select(vec![0u64, 200]).prop_map(Step::Timeout),
            2 => (1u64..6).prop_map(Step::Attach),
        ]
    }

    /// The view of `id` compiled from scratch for the same nodes, policy and clock.
    fn from_scratch(netmaps: &Netmaps, id: NodeId) -> Option<View> {
        let mut fresh = Netmaps::new(netmaps.policy.clone());
        fresh.handle_timeout(netmaps.now);
        fresh.resync(netmaps.nodes.values().cloned().collect(), 0);
        fresh.rebuild_if_stale();
        fresh.view_of(id)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn incremental_views_equal_views_compiled_from_scratch(
            steps in prop::collection::vec(arb_step(), 1..16),
        ) {
            let mut netmaps = Netmaps::new(policy(POLICY));
            let mut keys: BTreeMap<u64, NodeRecord> = BTreeMap::new();
            let mut next_session = 100;
            for (revision, step) in (1u64..).zip(steps) {
                match step {
                    Step::Put { id, tag, port, expires } => {
                        let mut record = keys.entry(id).or_insert_with(|| node(id, tag)).clone();
                        record.identity.tags = vec![tag.into()];
                        record.endpoints = vec![format!("192.0.2.{id}:{port}").parse().unwrap()];
                        record.key_expiry = expires.then_some(100);
                        netmaps.apply(put(record, revision));
                    }
                    Step::Delete(id) => netmaps.apply(NodeUpdate::Delete { id: NodeId(id), revision }),
                    Step::Policy(source) => netmaps.set_policy(source.and_then(policy)),
                    Step::Timeout(now) => netmaps.handle_timeout(now),
                    Step::Attach(id) => {
                        if let Some((record, rev)) = netmaps.nodes.get(&NodeId(id)).cloned() {
                            let attached = netmaps.attach(SessionId(next_session), record, rev, None);
                            prop_assert!(attached.is_ok());
                            next_session += 1;
                        }
                    }
                }
                netmaps.flush();
                let mut by_node: BTreeMap<NodeId, BTreeSet<SessionId>> = BTreeMap::new();
                for (sid, session) in &netmaps.sessions {
                    by_node.entry(session.node).or_default().insert(*sid);
                }
                prop_assert_eq!(&netmaps.by_node, &by_node);
                for session in netmaps.sessions.values() {
                    let expected = from_scratch(&netmaps, session.node);
                    prop_assert_eq!(Some(&session.view), expected.as_ref(), "node {}", session.node);
                }
            }
        }
    }

    #[test]
    fn a_node_joining_leaves_unconcerned_sessions_alone() {
        let (mut netmaps, _) = overlay(POLICY);
        netmaps.apply(put(node(4, "tag:web"), 20));
        let sent = deltas(netmaps.flush());
        assert_eq!(
            sent.keys().copied().collect::<Vec<_>>(),
            [2],
            "only db gains a peer; web and lonely are not told: {sent:?}"
        );
        assert_eq!(sent[&2].upsert_peers[0].id, NodeId(4));
    }

    #[test]
    fn views_share_one_record_per_peer_until_it_changes() {
        let (mut netmaps, _) = overlay(POLICY);
        netmaps
            .attach(SessionId(14), node(4, "tag:web"), 20, None)
            .unwrap();
        netmaps.flush();
        let db_seen_by = |netmaps: &Netmaps, sid| {
            Arc::clone(&netmaps.sessions[&SessionId(sid)].view.peers[&NodeId(2)])
        };
        assert!(Arc::ptr_eq(
            &db_seen_by(&netmaps, 11),
            &db_seen_by(&netmaps, 14)
        ));
        let before = db_seen_by(&netmaps, 11);
        let mut db = netmaps.node(NodeId(2)).unwrap().clone();
        db.endpoints = vec!["198.51.100.9:4000".parse().unwrap()];
        netmaps.apply(put(db.clone(), 30));
        netmaps.flush();
        let after = db_seen_by(&netmaps, 11);
        assert!(!Arc::ptr_eq(&before, &after));
        assert_eq!(*after, db.peer());
        assert!(Arc::ptr_eq(&after, &db_seen_by(&netmaps, 14)));
    }

    /// Applies `delta` as a node does, peers sorted by id to compare views.
    fn fold(mut netmap: NetMap, delta: NetMapDelta) -> NetMap {
        netmap.apply(delta);
        netmap.peers.sort_by_key(|p| p.id);
        netmap
    }

    /// db (2) seen by five web nodes (1, 4, 5, 6, 7), db's session attached
    /// with a full netmap, which db holds.
    fn fleet() -> (Netmaps, NetMap) {
        let mut netmaps = Netmaps::new(policy(POLICY));
        for (rev, id) in [1u64, 4, 5, 6, 7].into_iter().enumerate() {
            netmaps.apply(put(node(id, "tag:web"), rev as u64 + 1));
        }
        let held = full(netmaps.attach(SessionId(2), node(2, "tag:db"), 10, None));
        netmaps.flush();
        (netmaps, held)
    }

    fn reattach(netmaps: &mut Netmaps, session: u64, resume: &Resume) -> Opening {
        let db = netmaps.node(NodeId(2)).unwrap().clone();
        let opening = netmaps
            .attach(SessionId(session), db, 100, Some(resume))
            .unwrap();
        netmaps.flush();
        opening
    }

    /// What a fresh session of db would be sent now.
    fn current(netmaps: &mut Netmaps) -> NetMap {
        let db = netmaps.node(NodeId(2)).unwrap().clone();
        let netmap = full(netmaps.attach(SessionId(999), db, 100, None));
        netmaps.flush();
        netmap
    }

    #[test]
    fn resuming_an_unchanged_view_sends_an_empty_delta_after_the_last_record() {
        let (mut netmaps, held) = fleet();
        let resume = Resume::of([7; 32], &held);
        let Opening::Resumed { delta, after } = reattach(&mut netmaps, 3, &resume) else {
            panic!("not resumed");
        };
        assert_eq!(after, [7; 32]);
        assert_eq!(
            delta,
            NetMapDelta {
                revision: held.revision + 1,
                upsert_peers: Vec::new(),
                remove_peers: Vec::new(),
                filter: None,
                capabilities: None,
                self_node: None,
            }
        );
        assert!(netmaps.is_online(NodeId(2)));
    }

    #[test]
    fn a_resume_gets_changed_new_and_removed_peers_and_the_new_filter() {
        let (mut netmaps, held) = fleet();
        let mut changed = netmaps.node(NodeId(4)).unwrap().clone();
        changed.endpoints = vec!["198.51.100.4:4000".parse().unwrap()];
        netmaps.apply(put(changed, 20));
        netmaps.apply(NodeUpdate::Delete {
            id: NodeId(5),
            revision: 21,
        });
        netmaps.apply(put(node(8, "tag:web"), 22));
        netmaps.flush();
        let resume = Resume::of([1; 32], &held);
        let Opening::Resumed { delta, .. } = reattach(&mut netmaps, 3, &resume) else {
            panic!("not resumed");
        };
        let upserted: Vec<NodeId> = delta.upsert_peers.iter().map(|p| p.id).collect();
        assert_eq!(upserted, [NodeId(4), NodeId(8)]);
        assert_eq!(delta.remove_peers, [NodeId(5)]);
        assert!(delta.filter.is_some(), "db's filter names its sources");
        assert_eq!(
            (delta.capabilities.clone(), delta.self_node.clone()),
            (None, None)
        );
        let mut now = current(&mut netmaps);
        now.revision = delta.revision;
        assert_eq!(fold(held, delta), now);
    }

    #[test]
    fn a_resume_after_a_policy_change_gets_the_filter_alone_when_peers_stay() {
        let (mut netmaps, held) = fleet();
        netmaps.set_policy(policy(
            r#"{
                "tagOwners": {"tag:web": [], "tag:db": []},
                "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5433"], "proto": "tcp"}],
            }"#,
        ));
        netmaps.flush();
        let Opening::Resumed { delta, .. } = reattach(&mut netmaps, 3, &Resume::of([1; 32], &held))
        else {
            panic!("not resumed");
        };
        assert!(delta.upsert_peers.is_empty() && delta.remove_peers.is_empty());
        assert_eq!(delta.filter, Some(current(&mut netmaps).filter));
    }

    #[test]
    fn malformed_foreign_or_mostly_stale_resumes_get_a_full_netmap() {
        let (mut netmaps, held) = fleet();
        let mut unsorted = Resume::of([1; 32], &held);
        unsorted.peers.reverse();
        assert!(matches!(
            reattach(&mut netmaps, 3, &unsorted),
            Opening::Full(_, FullReason::Malformed(ResumeError::Unsorted(_)))
        ));
        let mut foreign = Resume::of([1; 32], &held);
        foreign.node = NodeId(4);
        assert!(matches!(
            reattach(&mut netmaps, 4, &foreign),
            Opening::Full(_, FullReason::OtherNode)
        ));
        let mut stale = Resume::of([1; 32], &held);
        for peer in &mut stale.peers[..3] {
            peer.version = [0; 16];
        }
        let opening = reattach(&mut netmaps, 5, &stale);
        assert!(
            matches!(
                opening,
                Opening::Full(
                    _,
                    FullReason::MostlyChanged {
                        changed: 3,
                        peers: 5
                    }
                )
            ),
            "{opening:?}"
        );
        // A full netmap of a resumed-too-late session is still the whole view.
        let Opening::Full(netmap, _) = opening else {
            unreachable!()
        };
        assert_eq!(netmap, current(&mut netmaps));
    }

    #[test]
    fn a_resume_never_adds_peers_the_policy_does_not_grant() {
        let (mut netmaps, held) = fleet();
        let mut greedy = Resume::of([1; 32], &held);
        // Claims to hold lonely (3), which it may not see: it is told to drop it.
        netmaps.apply(put(node(3, "tag:lonely"), 30));
        greedy.peers.push(weft_proto::PeerVersion {
            id: NodeId(3),
            version: [0; 16],
        });
        greedy.peers.sort_by_key(|p| p.id);
        let Opening::Resumed { delta, .. } = reattach(&mut netmaps, 3, &greedy) else {
            panic!("not resumed");
        };
        assert_eq!(delta.remove_peers, [NodeId(3)]);
        assert!(delta.upsert_peers.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever changed while db (2) was away, its resume brings it
        /// exactly to the view a fresh session would get.
        #[test]
        fn a_resumed_view_equals_a_fresh_one(
            steps in prop::collection::vec(arb_step(), 1..12),
        ) {
            let (mut netmaps, held) = fleet();
            netmaps.detach(SessionId(2));
            let mut keys: BTreeMap<u64, NodeRecord> = BTreeMap::new();
            for (revision, step) in (100u64..).zip(steps) {
                match step {
                    Step::Put { id, tag, port, expires } => {
                        let id = id + 2;
                        let mut record = keys.entry(id).or_insert_with(|| node(id, tag)).clone();
                        record.identity.tags = vec![tag.into()];
                        record.endpoints = vec![format!("192.0.2.{id}:{port}").parse().unwrap()];
                        record.key_expiry = expires.then_some(100);
                        netmaps.apply(put(record, revision));
                    }
                    Step::Delete(id) => netmaps.apply(NodeUpdate::Delete { id: NodeId(id + 2), revision }),
                    Step::Policy(source) => netmaps.set_policy(source.and_then(policy)),
                    Step::Timeout(now) => netmaps.handle_timeout(now),
                    Step::Attach(_) => {}
                }
                netmaps.flush();
            }
            let opening = reattach(&mut netmaps, 3, &Resume::of([5; 32], &held));
            let mut fresh = current(&mut netmaps);
            match opening {
                Opening::Resumed { delta, after } => {
                    prop_assert_eq!(after, [5; 32]);
                    fresh.revision = delta.revision;
                    prop_assert_eq!(fold(held, delta), fresh);
                }
                Opening::Full(netmap, why) => {
                    prop_assert!(matches!(why, FullReason::MostlyChanged { .. }), "{}", why);
                    prop_assert_eq!(netmap, fresh);
                }
            }
        }
    }

    #[test]
    fn resync_drops_nodes_missing_from_the_store() {
        let (mut netmaps, _) = overlay(POLICY);
        let keep: Vec<_> = [1, 3]
            .map(|id| (netmaps.node(NodeId(id)).unwrap().clone(), 1))
            .into();
        netmaps.resync(keep, 40);
        let outputs = netmaps.flush();
        assert!(outputs.contains(&Output::Close(SessionId(12), node_deleted())));
        assert!(netmaps.node(NodeId(2)).is_none());
    }
}
