//! The tokio shell around [`Netmaps`]: one task that owns the core, follows
//! the store's node records, takes commands from sessions and the admin API,
//! and delivers each session's messages over its own channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use weft_policy::{Diagnostics, Policy, TestReport};
use weft_proto::flows::FlowEndpoint;
use weft_proto::signing::NetmapSigner;
use weft_proto::{NodeId, PrivateKey, Refusal, RefusalCode, Resume, ServerMessage};

use super::replica::{self, Fence, Presence, PRESENCE_PREFIX};
use super::{Lockout, Netmaps, NodeUpdate, Opening, Output, OverBudget, SessionId};
use crate::audit::{self, Actor, Event};
use crate::metrics::{self, PolicyResult};
use crate::nodes::{self, NodeRecord, Registry};
use crate::store::{self, StoreError, Watch, WatchError};

/// Updates queued for one session before it counts as stuck. A node that
/// falls this far behind is disconnected and resynchronises from a full
/// netmap, so a node that stops reading cannot grow the coordinator's memory.
const SESSION_BACKLOG: usize = 64;

/// Fan-outs of at least this many messages log how long computing them took.
const LOGGED_FAN_OUT: usize = 100;

/// How often expired logins are looked for: peers drop an expired node
/// within this of its expiry.
const EXPIRY_SWEEP: Duration = Duration::from_millis(500);

/// What the netmap task tells a session.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SessionEvent {
    /// Send this message to the node.
    Message(Box<ServerMessage>),
    /// Send this refusal and end the session.
    Close(Refusal),
    /// A newer session of the same node took over; end this one quietly.
    Replaced,
}

/// A cheap handle to the netmap task.
#[derive(Debug, Clone)]
pub(crate) struct NetmapHandle {
    commands: mpsc::UnboundedSender<Command>,
    next_session: Arc<AtomicU64>,
    signer: Arc<OnceLock<Arc<NetmapSigner>>>,
}

/// A session attached to the netmap task: its first record, then its events.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) id: SessionId,
    pub(crate) opening: Opening,
    pub(crate) events: mpsc::Receiver<SessionEvent>,
}

#[derive(Debug)]
enum Command {
    Attach {
        session: SessionId,
        record: Box<NodeRecord>,
        revision: u64,
        resume: Option<Box<Resume>>,
        events: mpsc::Sender<SessionEvent>,
        reply: oneshot::Sender<Result<Opening, Refusal>>,
    },
    Detach(SessionId),
    SetPolicy(Option<Arc<Policy>>, oneshot::Sender<()>),
    CheckLockout(
        Arc<Policy>,
        Arc<[String]>,
        oneshot::Sender<Result<(), Lockout>>,
    ),
    CheckBudget(Arc<Policy>, oneshot::Sender<Result<(), OverBudget>>),
    CheckTests(
        Arc<Policy>,
        oneshot::Sender<Result<TestReport, Diagnostics>>,
    ),
    Online(oneshot::Sender<BTreeSet<NodeId>>),
    Endpoints(Vec<IpAddr>, oneshot::Sender<HashMap<IpAddr, FlowEndpoint>>),
    ReapIfOffline(NodeId),
    /// This replica won or lost leadership of the singleton jobs.
    Leader(Option<Fence>),
}

impl NetmapHandle {
    /// Loads every node from the registry and starts the task.
    /// The task ends once every handle is dropped.
    /// Ephemeral nodes are deleted once offline for `ephemeral_timeout`.
    pub(crate) fn spawn(
        registry: Registry,
        policy: Option<Arc<Policy>>,
        ephemeral_timeout: Duration,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        // Subscribe before reading, so no change falls between the two.
        let watch = registry.store().watch(nodes::NODES_PREFIX);
        let presence_watch = registry.store().watch(PRESENCE_PREFIX);
        let revision = registry.store().revision()?;
        let mut core = Netmaps::new(policy);
        core.resync(registry.nodes()?, revision);
        core.handle_timeout(unix_now());
        let present = present_keys(&registry)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let handle = Self {
            commands,
            next_session: Arc::new(AtomicU64::new(1)),
            signer: Arc::default(),
        };
        let (presence, presence_rx) = mpsc::unbounded_channel();
        let leadership = handle.commands.downgrade();
        let replica = tokio::spawn(replica::run(
            Arc::clone(registry.store()),
            presence_rx,
            move |fence| {
                if let Some(commands) = leadership.upgrade() {
                    let _ = commands.send(Command::Leader(fence));
                }
            },
        ));
        let task = Task {
            presence_watch,
            present,
            presence,
            replica,
            leader: None,
            core,
            registry,
            watch,
            rx,
            sessions: BTreeMap::new(),
            commands: handle.commands.downgrade(),
            offline: OfflineSince::new(ephemeral_timeout),
        };
        Ok((handle, tokio::spawn(task.run())))
    }

    /// Attaches a session for the node in `record`, written at `revision`,
    /// resuming from the view the node holds when it sent `resume`.
    pub(crate) async fn attach(
        &self,
        record: NodeRecord,
        revision: u64,
        resume: Option<Box<Resume>>,
    ) -> Result<Attached, Refusal> {
        let id = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let (events, events_rx) = mpsc::channel(SESSION_BACKLOG);
        let (reply, reply_rx) = oneshot::channel();
        self.send(Command::Attach {
            session: id,
            record: Box::new(record),
            revision,
            resume,
            events,
            reply,
        });
        let opening = reply_rx.await.map_err(|_| shutting_down())??;
        Ok(Attached {
            id,
            opening,
            events: events_rx,
        })
    }

    /// The key every session signs its netmaps with, derived from the
    /// coordinator's static `key` on first use: the derivation costs a scalar
    /// multiplication, too much to repeat for each of thousands of sessions.
    /// A coordinator has one static key, so every call passes the same.
    pub(crate) fn signer(&self, key: &PrivateKey) -> Arc<NetmapSigner> {
        Arc::clone(
            self.signer
                .get_or_init(|| Arc::new(NetmapSigner::derive(key))),
        )
    }

    /// Ends a session.
    pub(crate) fn detach(&self, session: SessionId) {
        self.send(Command::Detach(session));
    }

    /// Installs a policy and waits until every session was sent its update.
    pub(crate) async fn set_policy(&self, policy: Option<Arc<Policy>>) {
        if policy.is_some() {
            metrics::policy_load(PolicyResult::Installed);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetPolicy(policy, reply));
        // An error means the task is gone, and with it every session.
        let _ = rx.await;
    }

    /// Refuses `policy` when it would give a node a netmap over the budget.
    pub(crate) async fn check_budget(&self, policy: Arc<Policy>) -> Result<(), OverBudget> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CheckBudget(policy, reply));
        // The task is gone only at shutdown, when nothing is installed anyway.
        let checked = rx.await.unwrap_or(Ok(()));
        if checked.is_err() {
            metrics::policy_load(PolicyResult::Refused);
        }
        checked
    }

    /// Runs `policy`'s tests against the registered nodes.
    pub(crate) async fn check_tests(&self, policy: Arc<Policy>) -> Result<TestReport, Diagnostics> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CheckTests(policy.clone(), reply));
        // The task is gone only at shutdown, when nothing is installed
        // anyway; the tests without nodes have passed.
        let checked = match rx.await {
            Ok(result) => result,
            Err(_) => policy.run_tests(),
        };
        if checked.is_err() {
            metrics::policy_load(PolicyResult::Refused);
        }
        checked
    }

    /// Refuses `policy` when it would lock out one of `admins`.
    pub(crate) async fn check_lockout(
        &self,
        policy: Arc<Policy>,
        admins: Arc<[String]>,
    ) -> Result<(), Lockout> {
        if admins.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::CheckLockout(policy, admins, reply));
        // The task is gone only at shutdown, when nothing is installed anyway.
        let checked = rx.await.unwrap_or(Ok(()));
        if checked.is_err() {
            metrics::policy_load(PolicyResult::Refused);
        }
        checked
    }

    /// The nodes with a connected session.
    pub(crate) async fn online(&self) -> BTreeSet<NodeId> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Online(reply));
        rx.await.unwrap_or_default()
    }

    /// The nodes holding `addresses`, by address, as flow records name
    /// their ends; addresses no node holds are left out.
    pub(crate) async fn endpoints(&self, addresses: Vec<IpAddr>) -> HashMap<IpAddr, FlowEndpoint> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Endpoints(addresses, reply));
        rx.await.unwrap_or_default()
    }

    fn send(&self, command: Command) {
        // The task only ends when the runtime shuts down; commands are moot then.
        let _ = self.commands.send(command);
    }
}

struct Task {
    core: Netmaps,
    registry: Registry,
    watch: Watch,
    /// Presence keys of every replica, this one's included.
    presence_watch: Watch,
    present: BTreeSet<String>,
    /// This replica's session changes, for the replica task to publish.
    presence: mpsc::UnboundedSender<Presence>,
    /// Ends once `presence` is dropped, revoking the lease.
    replica: JoinHandle<()>,
    /// Set while this replica runs the singleton jobs.
    leader: Option<Fence>,
    rx: mpsc::UnboundedReceiver<Command>,
    sessions: BTreeMap<SessionId, mpsc::Sender<SessionEvent>>,
    /// Weak, so that the task ends when the last handle is dropped.
    commands: mpsc::WeakUnboundedSender<Command>,
    offline: OfflineSince,
}

/// When each ephemeral node went offline, so that it is deleted the
/// timeout after its *last* disconnect: a reap timer set at an earlier
/// disconnect finds the node offline again but not for long enough, and
/// leaves it to the timer of the later one.
#[derive(Debug)]
struct OfflineSince {
    timeout: Duration,
    since: BTreeMap<NodeId, Instant>,
}

impl OfflineSince {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            since: BTreeMap::new(),
        }
    }

    /// Node `node` lost its last session at `now`; its reap is due at the returned instant.
    fn went_offline(&mut self, node: NodeId, now: Instant) -> Instant {
        self.since.insert(node, now);
        now + self.timeout
    }

    fn came_online(&mut self, node: NodeId) {
        self.since.remove(&node);
    }

    /// Whether node `node` has been offline for the whole timeout at `now`;
    /// forgets it then.
    fn take_due(&mut self, node: NodeId, now: Instant) -> bool {
        let due = self
            .since
            .get(&node)
            .is_some_and(|since| now.saturating_duration_since(*since) >= self.timeout);
        if due {
            self.since.remove(&node);
        }
        due
    }
}

impl Task {
    async fn run(mut self) {
        // Ephemeral nodes offline since before a restart would otherwise
        // never be reaped: no session of theirs will detach.
        for node in self.core.ephemeral_nodes() {
            self.schedule_reap(node);
        }
        let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.core.handle_timeout(unix_now()),
                command = self.rx.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                event = self.watch.next() => self.handle_watch(event),
                event = self.presence_watch.next() => self.handle_presence(event),
            }
            // Take everything already queued before computing views once.
            loop {
                if let Ok(command) = self.rx.try_recv() {
                    self.handle_command(command);
                } else if let Some(event) = self.watch.try_next() {
                    self.handle_watch(event);
                } else if let Some(event) = self.presence_watch.try_next() {
                    self.handle_presence(event);
                } else {
                    break;
                }
            }
            self.deliver();
        }
        // The store is released only once the replica task let go of it.
        let Task {
            presence, replica, ..
        } = self;
        drop(presence);
        let _ = replica.await;
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Attach {
                session,
                record,
                revision,
                resume,
                events,
                reply,
            } => {
                let node = record.id;
                let result = self
                    .core
                    .attach(session, *record, revision, resume.as_deref());
                if result.is_ok() {
                    self.sessions.insert(session, events);
                    self.offline.came_online(node);
                    let _ = self.presence.send(Presence::Up(node));
                }
                // The session may have given up waiting; it detaches itself then.
                let _ = reply.send(result);
            }
            Command::Detach(session) => self.end_session(session),
            Command::SetPolicy(policy, reply) => {
                self.core.set_policy(policy);
                self.deliver();
                let _ = reply.send(());
                release_freed_memory();
            }
            Command::CheckLockout(policy, admins, reply) => {
                let _ = reply.send(self.core.check_lockout(&policy, &admins));
            }
            Command::CheckBudget(policy, reply) => {
                let _ = reply.send(self.core.check_budget(&policy));
            }
            Command::CheckTests(policy, reply) => {
                let _ = reply.send(self.core.check_tests(&policy));
            }
            Command::Online(reply) => {
                let _ = reply.send(self.core.online());
            }
            Command::Endpoints(addresses, reply) => {
                let _ = reply.send(self.core.endpoints(&addresses));
            }
            Command::ReapIfOffline(node) => {
                // Checked first, so that a node deleted meanwhile is forgotten too.
                let due = self.offline.take_due(node, Instant::now());
                let Some(fence) = self.leader else { return };
                if !due
                    || self.online_anywhere(node)
                    || !self.core.node(node).is_some_and(|n| n.ephemeral)
                {
                    return;
                }
                match self.registry.delete_if(node, &[fence.compare()]) {
                    Ok(Some(record)) => {
                        tracing::info!(node = %record.id, "deleted ephemeral node after it went offline");
                        audit::record(
                            &**self.registry.store(),
                            SystemTime::now(),
                            Actor::Replica,
                            Event::NodeDeleted {
                                node: record.id,
                                name: record.name,
                            },
                        );
                    }
                    Ok(None) => {}
                    Err(StoreError::Conflict) => {
                        tracing::info!(node = %node, "not reaping: this coordinator lost leadership or the node changed");
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, "cannot delete offline ephemeral node: {e}")
                    }
                }
            }
            Command::Leader(fence) => self.set_leader(fence),
        }
    }

    fn handle_watch(&mut self, event: Result<store::WatchEvent, WatchError>) {
        match event {
            Ok(event) => {
                let Some(id) = nodes::node_id_of(&event.key) else {
                    return;
                };
                let update = match event.value {
                    None => NodeUpdate::Delete {
                        id,
                        revision: event.revision,
                    },
                    Some(value) => match store::decode::<NodeRecord>(&event.key, &value) {
                        Ok(record) => NodeUpdate::Put {
                            record: Box::new(record),
                            revision: event.revision,
                        },
                        Err(e) => {
                            tracing::error!("ignoring a node update: {e}");
                            return;
                        }
                    },
                };
                self.core.apply(update);
            }
            Err(WatchError::Lagged(missed)) => {
                tracing::warn!(missed, "node watcher fell behind; reloading every node");
                let reloaded = self
                    .registry
                    .store()
                    .revision()
                    .and_then(|rev| Ok((self.registry.nodes()?, rev)));
                match reloaded {
                    Ok((nodes, revision)) => self.core.resync(nodes, revision),
                    Err(e) => tracing::error!("cannot reload nodes: {e}"),
                }
            }
            Err(WatchError::Closed) => {}
        }
    }

    fn deliver(&mut self) {
        let started = Instant::now();
        let outputs = self.core.flush();
        if outputs.len() >= LOGGED_FAN_OUT {
            tracing::debug!(
                messages = outputs.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "netmap views recomputed"
            );
        }
        let fanned_out = !outputs.is_empty();
        for output in outputs {
            let (session, event) = match output {
                Output::Send(session, message) => (session, SessionEvent::Message(message)),
                Output::Close(session, refusal) => (session, SessionEvent::Close(refusal)),
                Output::Replaced(session) => (session, SessionEvent::Replaced),
            };
            let ends = !matches!(event, SessionEvent::Message(_));
            let delivered = match self.sessions.get(&session).map(|tx| tx.try_send(event)) {
                Some(Ok(())) => true,
                Some(Err(mpsc::error::TrySendError::Full(_))) => {
                    // Dropping the sender ends the session; the node reconnects
                    // and starts again from a full netmap.
                    tracing::warn!(
                        ?session,
                        "a node is not reading its updates; ending its session so it resynchronises"
                    );
                    false
                }
                Some(Err(mpsc::error::TrySendError::Closed(_))) | None => false,
            };
            if ends || !delivered {
                self.end_session(session);
            }
        }
        if fanned_out {
            metrics::fanned_out(started.elapsed());
        }
    }

    fn set_leader(&mut self, fence: Option<Fence>) {
        let gained = self.leader.is_none() && fence.is_some();
        self.leader = fence;
        if gained {
            // Nodes that went offline under another leader, or with a
            // replica that died, are timed from now.
            for node in self.core.ephemeral_nodes() {
                self.schedule_reap(node);
            }
        }
    }

    fn end_session(&mut self, session: SessionId) {
        self.sessions.remove(&session);
        let node = self.core.node_of(session);
        self.core.detach(session);
        if let Some(node) = node {
            if !self.core.is_online(node) {
                let _ = self.presence.send(Presence::Down(node));
            }
            self.schedule_reap(node);
        }
    }

    fn handle_presence(&mut self, event: Result<store::WatchEvent, WatchError>) {
        match event {
            Ok(event) => {
                let Some(node) = replica::presence_node(&event.key) else {
                    return;
                };
                if event.value.is_some() {
                    self.present.insert(event.key);
                    self.offline.came_online(node);
                } else {
                    self.present.remove(&event.key);
                    self.schedule_reap(node);
                }
            }
            Err(WatchError::Lagged(missed)) => {
                tracing::warn!(missed, "presence watcher fell behind; reloading");
                match present_keys(&self.registry) {
                    Ok(present) => self.present = present,
                    Err(e) => tracing::error!("cannot reload node presence: {e}"),
                }
            }
            Err(WatchError::Closed) => {}
        }
    }

    /// Whether the node has a session on this or any other replica.
    fn online_anywhere(&self, node: NodeId) -> bool {
        if self.core.is_online(node) {
            return true;
        }
        let prefix = format!("{PRESENCE_PREFIX}{}/", node.0);
        self.present
            .range(prefix.clone()..)
            .next()
            .is_some_and(|key| key.starts_with(&prefix))
    }

    fn schedule_reap(&mut self, node: NodeId) {
        if self.leader.is_none()
            || self.online_anywhere(node)
            || !self.core.node(node).is_some_and(|n| n.ephemeral)
        {
            return;
        }
        let due = self.offline.went_offline(node, Instant::now());
        let commands = self.commands.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(Command::ReapIfOffline(node));
            }
        });
    }
}

/// Every replica's presence keys.
fn present_keys(registry: &Registry) -> Result<BTreeSet<String>, StoreError> {
    Ok(registry
        .store()
        .list(PRESENCE_PREFIX)?
        .into_iter()
        .map(|(key, _)| key)
        .collect())
}

/// Hands memory freed by a replaced policy (its text, parse tree and
/// compiled filters: hundreds of megabytes for a large one) back to the
/// system. glibc keeps freed memory in each thread's arena for reuse, so
/// without this a coordinator that once held a large policy keeps its peak
/// resident size.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own
    // arenas to the kernel; it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn unix_now() -> u64 {
    crate::authkey::unix_secs(std::time::SystemTime::now())
}

fn shutting_down() -> Refusal {
    Refusal {
        code: RefusalCode::Unavailable,
        message: "the coordinator is shutting down; retry in a moment".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_nodes_are_due_after_their_last_disconnect() {
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        let mut offline = OfflineSince::new(10 * minute);
        let node = NodeId(7);
        let first_due = offline.went_offline(node, start);
        assert_eq!(first_due, start + 10 * minute);
        // Back online, then offline again five minutes later.
        offline.came_online(node);
        assert!(
            !offline.take_due(node, first_due),
            "online nodes are never due"
        );
        let second_due = offline.went_offline(node, start + 5 * minute);
        assert!(
            !offline.take_due(node, first_due),
            "the first disconnect's timer must not reap"
        );
        assert!(offline.take_due(node, second_due));
        assert!(!offline.take_due(node, second_due), "reaped once");
    }
}
