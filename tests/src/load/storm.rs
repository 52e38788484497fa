//! The registration-storm fault trial: N new nodes register concurrently
//! with one reusable auth key, the coordinator is killed with SIGKILL at a
//! random moment of the storm and restarted on the same state, the nodes
//! that had no answer retry as weftd would (same machine key, same
//! WireGuard key), and the result is checked against what every node was
//! told.
//!
//! The checks read the registry through the admin CLI (`nodes list --json`)
//! and through the control protocol: a last node registers and its netmap
//! lists every node's WireGuard key. Every simulated machine asks for its own
//! hostname, so a machine registered twice shows as a second, suffixed name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use weft_proto::{
    AuthKey, ClientMessage, Credential, FrameDecoder, NetMap, PrivateKey, PublicKey, Refusal,
    RefusalCode, Register, SelfNode, ServerMessage,
};

use super::coordinator::{CoordinatorProcess, ListedNode};
use super::scenario::Groups;
use super::sim::{self, Fleet};
use super::{Backend, LoadOptions};

/// What one trial runs.
#[derive(Debug, Clone)]
pub struct StormOptions {
    /// New nodes in the storm.
    pub nodes: usize,
    /// Nodes registering at once.
    pub wave: usize,
    /// The coordinator's store.
    pub backend: Backend,
    /// The `weft-coordinator` binary.
    pub coordinator_bin: PathBuf,
    /// Seeds the kill point, the kill's delay and the downtime.
    pub seed: u64,
    /// The longest a trial may take from the first registration until every
    /// node is registered.
    pub timeout: Duration,
}

/// What one trial saw.
#[derive(Debug, Clone)]
pub struct TrialReport {
    pub seed: u64,
    pub backend: Backend,
    pub nodes: usize,
    /// Nodes the killed coordinator answered with `Registered`.
    pub acked_before_kill: usize,
    /// Nodes whose `Register` reached the killed coordinator's connection
    /// but that had no answer.
    pub sent_unacked: usize,
    /// Nodes that had not sent `Register` when the coordinator died.
    pub not_sent: usize,
    /// Connection attempts beyond each node's first.
    pub retries: usize,
    /// From the first registration to the kill.
    pub kill_after: Duration,
    /// From spawning the restarted coordinator to its admin socket answering.
    pub restart: Duration,
    /// From the kill until every node was registered.
    pub recovery: Duration,
    /// The whole trial, including start-up and the checks.
    pub total: Duration,
    /// Every broken guarantee, naming the node.
    pub violations: Vec<Violation>,
}

/// One broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub detail: String,
}

/// The guarantees a storm must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// An acknowledged registration is missing or no longer what the node was told.
    Lost,
    /// An id, name, address or key appears twice, or a machine registered twice.
    Duplicate,
    /// A node that retried never got registered.
    Unregistered,
    /// A node id was handed out again: a node registered after the storm
    /// got an id no higher than one already held. (Ids may have gaps: a
    /// killed coordinator's unused reserved ids are skipped.)
    Counter,
}

impl TrialReport {
    /// How many violations of `kind`.
    pub fn count(&self, kind: ViolationKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "{} seed {:#x}: {} nodes, {} acknowledged before kill -9 at {:.2} s, {} sent without answer, \
             {} not yet sent, {} retries; restart {:.2} s, all registered {:.2} s after the kill; \
             lost {}, duplicates {}, unregistered {}, counter errors {}",
            self.backend,
            self.seed,
            self.nodes,
            self.acked_before_kill,
            self.kill_after.as_secs_f64(),
            self.sent_unacked,
            self.not_sent,
            self.retries,
            self.restart.as_secs_f64(),
            self.recovery.as_secs_f64(),
            self.count(ViolationKind::Lost),
            self.count(ViolationKind::Duplicate),
            self.count(ViolationKind::Unregistered),
            self.count(ViolationKind::Counter),
        )
    }
}

/// Runs one trial; `Err` only when the trial itself cannot run (the
/// coordinator does not start, the storm stalls before the kill point).
pub async fn trial(options: &StormOptions) -> Result<TrialReport> {
    if options.nodes < 2 || options.wave == 0 {
        bail!("a storm needs at least 2 nodes and a wave of at least 1");
    }
    let begun = Instant::now();
    let mut rng = SplitMix64(options.seed);
    let kill_point = options.nodes / 10 + rng.below(options.nodes * 8 / 10 + 1);
    let kill_point = kill_point.clamp(1, options.nodes - 1);
    let kill_delay = Duration::from_micros(rng.below(20_000) as u64);
    let downtime = Duration::from_millis(50 + rng.below(450) as u64);

    // One group: every node, and the observer, sees every other node.
    let groups = Groups::new(options.nodes + 1, options.nodes + 1);
    let load_options = LoadOptions {
        nodes: options.nodes,
        group_size: options.nodes + 1,
        wave: options.wave,
        backend: options.backend,
        coordinator_bin: options.coordinator_bin.clone(),
        phase_timeout: options.timeout,
        idle_window: Duration::ZERO,
        resume: true,
    };
    let mut coordinator = CoordinatorProcess::start(&load_options, groups).await?;
    let auth_key = coordinator
        .create_auth_keys(groups)
        .await?
        .into_iter()
        .next()
        .context("no auth key was created")?;
    let fleet = Fleet::new(coordinator.listen(), coordinator.public_key())?;
    let machines: Vec<Arc<Machine>> = (0..options.nodes)
        .map(|i| Arc::new(Machine::new(format!("s{i}"))))
        .collect();

    let epoch = Arc::new(AtomicU32::new(0));
    let waves = Arc::new(Semaphore::new(options.wave));
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let started = Instant::now();
    let deadline = started + options.timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for machine in &machines {
        tasks.spawn(storm_node(
            fleet.clone(),
            machine.clone(),
            auth_key.clone(),
            waves.clone(),
            epoch.clone(),
            acks_tx.clone(),
            deadline,
        ));
    }
    drop(acks_tx);

    let mut acked = 0;
    while acked < kill_point {
        match tokio::time::timeout_at(deadline, acks.recv()).await {
            Ok(Some(())) => acked += 1,
            Ok(None) | Err(_) => {
                tasks.abort_all();
                bail!(
                    "the storm stalled: {acked} of {} nodes registered before {:?}, the kill point was {kill_point}",
                    options.nodes,
                    options.timeout
                );
            }
        }
    }
    tokio::time::sleep(kill_delay).await;
    let kill_after = started.elapsed();
    coordinator.kill_hard()?;
    let killed = Instant::now();
    tokio::time::sleep(downtime).await;
    epoch.store(1, Ordering::SeqCst);
    let restarting = Instant::now();
    coordinator.restart().await?;
    let restart = restarting.elapsed();

    let mut outcomes = Vec::with_capacity(options.nodes);
    while let Some(outcome) = tasks.join_next().await {
        outcomes.push(outcome.context("a simulated node panicked")?);
    }
    let recovery = killed.elapsed();
    outcomes.sort_by_key(|o| o.machine.hostname.clone());

    let listed = coordinator.nodes().await?;
    let observed = observe(&fleet, &auth_key).await;
    fleet.endpoint.close(0u32.into(), b"storm over");
    coordinator.stop();

    let violations = check(&outcomes, &listed, &observed);
    Ok(TrialReport {
        seed: options.seed,
        backend: options.backend,
        nodes: options.nodes,
        acked_before_kill: outcomes
            .iter()
            .filter(|o| o.ack.as_ref().is_some_and(|a| a.epoch == 0))
            .count(),
        sent_unacked: outcomes
            .iter()
            .filter(|o| o.first_sent == Some(0) && o.ack.as_ref().is_none_or(|a| a.epoch != 0))
            .count(),
        not_sent: outcomes.iter().filter(|o| o.first_sent != Some(0)).count(),
        retries: outcomes.iter().map(|o| o.attempts.saturating_sub(1)).sum(),
        kill_after,
        restart,
        recovery,
        total: begun.elapsed(),
        violations,
    })
}

/// A small seeded generator (SplitMix64), so a trial is replayed by its seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        match u64::try_from(n) {
            Ok(0) | Err(_) => 0,
            Ok(n) => usize::try_from(self.next_u64() % n).unwrap_or(0),
        }
    }
}

/// A simulated machine: its keys live across its attempts, as weftd's state
/// directory keeps them across restarts.
#[derive(Debug)]
struct Machine {
    hostname: String,
    machine_key: PrivateKey,
    node_key: PublicKey,
}

impl Machine {
    fn new(hostname: String) -> Self {
        Self {
            hostname,
            machine_key: PrivateKey::generate(),
            node_key: PrivateKey::generate().public_key(),
        }
    }
}

/// A `Registered` answer and which coordinator run (0: the killed one) gave it.
#[derive(Debug, Clone)]
struct Ack {
    node: SelfNode,
    epoch: u32,
}

/// How one machine fared.
#[derive(Debug)]
struct Outcome {
    machine: Arc<Machine>,
    /// The coordinator run during which `Register` was first written.
    first_sent: Option<u32>,
    ack: Option<Ack>,
    attempts: usize,
    last_error: Option<String>,
}

/// Registers `machine`, retrying on connection failures and `Unavailable`
/// with backoff (0.25 s doubling to 2 s) until `deadline`; reports the
/// acknowledgement on `acks`.
async fn storm_node(
    fleet: Fleet,
    machine: Arc<Machine>,
    auth_key: String,
    waves: Arc<Semaphore>,
    epoch: Arc<AtomicU32>,
    acks: mpsc::UnboundedSender<()>,
    deadline: Instant,
) -> Outcome {
    let mut outcome = Outcome {
        machine: machine.clone(),
        first_sent: None,
        ack: None,
        attempts: 0,
        last_error: None,
    };
    let Ok(_permit) = waves.acquire_owned().await else {
        outcome.last_error = Some("the wave semaphore closed".into());
        return outcome;
    };
    let mut delay = Duration::from_millis(250);
    loop {
        outcome.attempts += 1;
        let attempt = register(&fleet, &machine, &auth_key, &epoch, &mut outcome.first_sent);
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Err(_) => {
                outcome.last_error = Some("no answer before the trial's deadline".into());
                return outcome;
            }
            Ok(Ok(Answer::Registered(node))) => {
                outcome.ack = Some(Ack {
                    node,
                    epoch: epoch.load(Ordering::SeqCst),
                });
                let _ = acks.send(());
                return outcome;
            }
            Ok(Ok(Answer::Refused(refusal))) if refusal.code != RefusalCode::Unavailable => {
                outcome.last_error =
                    Some(format!("refused ({:?}): {}", refusal.code, refusal.message));
                return outcome;
            }
            Ok(Ok(Answer::Refused(refusal))) => format!("unavailable: {}", refusal.message),
            Ok(Err(e)) => format!("{e:#}"),
        };
        outcome.last_error = Some(error);
        if Instant::now() + delay >= deadline {
            return outcome;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The coordinator's answer to `Register`.
#[derive(Debug)]
enum Answer {
    Registered(SelfNode),
    Refused(Refusal),
}

/// One control session's `Register`: records in `sent` the coordinator run
/// during which it was first written, and returns the answer.
async fn register(
    fleet: &Fleet,
    machine: &Machine,
    auth_key: &str,
    epoch: &AtomicU32,
    sent: &mut Option<u32>,
) -> Result<Answer> {
    let mut session = Session::open(fleet, machine, auth_key).await?;
    sent.get_or_insert(epoch.load(Ordering::SeqCst));
    session.answer().await
}

/// A control session past `Register`, reading the coordinator's messages.
struct Session {
    _connection: quinn::Connection,
    /// Kept open: finishing it tells the coordinator the node left.
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    opener: weft_proto::Opener,
}

impl Session {
    async fn open(fleet: &Fleet, machine: &Machine, auth_key: &str) -> Result<Self> {
        let (connection, mut send, recv) = sim::handshake(fleet, &machine.machine_key).await?;
        let register = Register {
            credential: Some(Credential::AuthKey(AuthKey::new(auth_key.to_owned()))),
            hostname: machine.hostname.clone(),
            node_key: machine.node_key,
            endpoints: Vec::new(),
            home_relay: None,
            attributes: BTreeMap::new(),
            resume: None,
        };
        let frame = weft_proto::encode_frame(&ClientMessage::Register(register))
            .map_err(|e| anyhow!("{e}"))?;
        send.write_all(&frame).await.context("send Register")?;
        Ok(Self {
            _connection: connection,
            _send: send,
            recv,
            decoder: FrameDecoder::new(),
            opener: weft_proto::Opener::new(machine.node_key),
        })
    }

    /// The next message, signed netmaps verified and opened.
    async fn next(&mut self) -> Result<ServerMessage> {
        loop {
            if let Some(message) = self.decoder.next_message::<ServerMessage>()? {
                match self.opener.open(message)?.message {
                    ServerMessage::NetmapKey(_) => continue,
                    message => return Ok(message),
                }
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => bail!("the coordinator closed the control stream"),
                Err(e) => return Err(e).context("control stream"),
            }
        }
    }

    async fn answer(&mut self) -> Result<Answer> {
        match self.next().await? {
            ServerMessage::Registered(node) => Ok(Answer::Registered(node)),
            ServerMessage::Refused(refusal) => Ok(Answer::Refused(refusal)),
            other => bail!("expected Registered or Refused, got {}", other.kind()),
        }
    }
}

/// What a node registering after the storm was told: itself and its netmap.
type Observed = Result<(SelfNode, NetMap), String>;

/// Registers one more node and reads its first netmap, which lists every
/// storm node with its WireGuard key.
async fn observe(fleet: &Fleet, auth_key: &str) -> Observed {
    let machine = Machine::new("observer".into());
    let attempt = async {
        let mut session = Session::open(fleet, &machine, auth_key).await?;
        let node = match session.answer().await? {
            Answer::Registered(node) => node,
            Answer::Refused(r) => bail!("refused ({:?}): {}", r.code, r.message),
        };
        loop {
            match session.next().await? {
                ServerMessage::NetMap(netmap) => return Ok((node, netmap)),
                ServerMessage::Relays(_) => {}
                other => bail!("expected a netmap, got {}", other.kind()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(result) => result.map_err(|e| format!("{e:#}")),
        Err(_) => Err("no netmap within 20 s".into()),
    }
}

/// Checks the registry after the storm against what every machine was told.
fn check(outcomes: &[Outcome], listed: &[ListedNode], observed: &Observed) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut flag = |kind, detail: String| violations.push(Violation { kind, detail });

    let mut ids = BTreeSet::new();
    let mut names = HashMap::new();
    let mut ipv4s: HashMap<Ipv4Addr, &str> = HashMap::new();
    let mut ipv6s: HashMap<Ipv6Addr, &str> = HashMap::new();
    for node in listed {
        if !ids.insert(node.id) {
            flag(
                ViolationKind::Duplicate,
                format!("id {} is listed twice", node.id),
            );
        }
        if let Some(other) = names.insert(node.name.as_str(), node.id) {
            flag(
                ViolationKind::Duplicate,
                format!("name {} belongs to ids {other} and {}", node.name, node.id),
            );
        }
        if let Some(other) = ipv4s.insert(node.ipv4, &node.name) {
            flag(
                ViolationKind::Duplicate,
                format!("{} belongs to {other} and {}", node.ipv4, node.name),
            );
        }
        if let Some(other) = ipv6s.insert(node.ipv6, &node.name) {
            flag(
                ViolationKind::Duplicate,
                format!("{} belongs to {other} and {}", node.ipv6, node.name),
            );
        }
    }

    let hostnames: BTreeSet<&str> = outcomes
        .iter()
        .map(|o| o.machine.hostname.as_str())
        .collect();
    for node in listed {
        if !hostnames.contains(node.name.as_str()) {
            flag(
                ViolationKind::Duplicate,
                format!(
                    "node {} (id {}) is no machine's hostname: a machine registered twice",
                    node.name, node.id
                ),
            );
        }
    }

    let by_id: HashMap<u64, &ListedNode> = listed.iter().map(|n| (n.id, n)).collect();
    for outcome in outcomes {
        let hostname = &outcome.machine.hostname;
        let Some(ack) = &outcome.ack else {
            flag(
                ViolationKind::Unregistered,
                format!(
                    "{hostname} was never registered after {} attempt(s) (Register {}): {}",
                    outcome.attempts,
                    match outcome.first_sent {
                        Some(0) => "sent to the killed coordinator",
                        Some(_) => "first sent after the restart",
                        None => "never sent",
                    },
                    outcome.last_error.as_deref().unwrap_or("no error recorded")
                ),
            );
            continue;
        };
        let told = &ack.node;
        let run = if ack.epoch == 0 { "before" } else { "after" };
        match by_id.get(&told.id.0) {
            None => flag(
                ViolationKind::Lost,
                format!(
                    "{hostname} was acknowledged {run} the kill as id {} ({}, {}), but no node has that id",
                    told.id.0, told.name, told.ipv4
                ),
            ),
            Some(node) if node.name != told.name || node.ipv4 != told.ipv4 || node.ipv6 != told.ipv6 => flag(
                ViolationKind::Lost,
                format!(
                    "{hostname} was acknowledged {run} the kill as id {} {} {} {}, but the id now holds {} {} {}",
                    told.id.0, told.name, told.ipv4, told.ipv6, node.name, node.ipv4, node.ipv6
                ),
            ),
            Some(_) => {}
        }
        if told.name != *hostname {
            flag(
                ViolationKind::Duplicate,
                format!(
                    "{hostname} was registered as {}: its name was taken, by itself",
                    told.name
                ),
            );
        }
    }

    match observed {
        Err(e) => flag(
            ViolationKind::Counter,
            format!("a node registering after the storm failed: {e}"),
        ),
        Ok((node, netmap)) => {
            let highest = ids.last().copied().unwrap_or(0);
            if node.id.0 <= highest {
                flag(
                    ViolationKind::Counter,
                    format!(
                        "the node registered after the storm got id {}, not above the highest held, {highest}",
                        node.id.0
                    ),
                );
            }
            let machines: HashMap<&str, &Machine> = outcomes
                .iter()
                .map(|o| (o.machine.hostname.as_str(), &*o.machine))
                .collect();
            let mut keys = HashMap::new();
            for peer in &netmap.peers {
                if let Some(other) = keys.insert(peer.node_key, &peer.name) {
                    flag(
                        ViolationKind::Duplicate,
                        format!(
                            "WireGuard key {} belongs to {other} and {}",
                            peer.node_key, peer.name
                        ),
                    );
                }
                match machines.get(peer.name.as_str()) {
                    Some(machine) if machine.node_key != peer.node_key => flag(
                        ViolationKind::Lost,
                        format!(
                            "{} is a peer with WireGuard key {}, not its own {}",
                            peer.name, peer.node_key, machine.node_key
                        ),
                    ),
                    _ => {}
                }
            }
            if netmap.peers.len() != listed.len() {
                flag(
                    ViolationKind::Lost,
                    format!(
                        "the node registered after the storm has {} peers, but {} nodes are listed",
                        netmap.peers.len(),
                        listed.len()
                    ),
                );
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::{Identity, NodeId, PacketFilter, Peer};

    fn machine(i: usize) -> Arc<Machine> {
        Arc::new(Machine::new(format!("s{i}")))
    }

    fn node(id: u64, name: &str) -> SelfNode {
        SelfNode {
            id: NodeId(id),
            name: name.into(),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: format!("fd7a::{id}").parse().unwrap(),
            identity: Identity::tagged(vec!["tag:g0".into()]),
            key_expiry: None,
        }
    }

    fn listed(node: &SelfNode) -> ListedNode {
        ListedNode {
            id: node.id.0,
            name: node.name.clone(),
            ipv4: node.ipv4,
            ipv6: node.ipv6,
        }
    }

    fn peer(node: &SelfNode, key: PublicKey) -> Peer {
        Peer {
            id: node.id,
            name: node.name.clone(),
            node_key: key,
            addresses: Vec::new(),
            endpoints: Vec::new(),
            home_relay: None,
            identity: node.identity.clone(),
        }
    }

    /// Three machines, acknowledged as ids 1..=3, all listed, seen by an observer with id 4.
    fn healthy() -> (Vec<Outcome>, Vec<ListedNode>, Observed) {
        let outcomes: Vec<Outcome> = (0..3)
            .map(|i| Outcome {
                machine: machine(i),
                first_sent: Some(0),
                ack: Some(Ack {
                    node: node(i as u64 + 1, &format!("s{i}")),
                    epoch: (i % 2) as u32,
                }),
                attempts: 1,
                last_error: None,
            })
            .collect();
        let listed_nodes = outcomes
            .iter()
            .filter_map(|o| o.ack.as_ref().map(|a| listed(&a.node)))
            .collect();
        let netmap = NetMap {
            revision: 9,
            self_node: node(4, "observer"),
            peers: outcomes
                .iter()
                .filter_map(|o| o.ack.as_ref().map(|a| peer(&a.node, o.machine.node_key)))
                .collect(),
            filter: PacketFilter::default(),
            capabilities: Vec::new(),
        };
        (outcomes, listed_nodes, Ok((node(4, "observer"), netmap)))
    }

    fn kinds(violations: &[Violation]) -> Vec<ViolationKind> {
        violations.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_consistent_registry_passes() {
        let (outcomes, listed, observed) = healthy();
        assert_eq!(check(&outcomes, &listed, &observed), Vec::new());
    }

    #[test]
    fn a_missing_acknowledged_node_is_lost_and_named() {
        let (outcomes, mut listed, observed) = healthy();
        listed.remove(1);
        let violations = check(&outcomes, &listed, &observed);
        assert!(kinds(&violations).contains(&ViolationKind::Lost));
        assert!(violations.iter().any(|v| v.detail.contains("s1")));
    }

    #[test]
    fn a_changed_address_is_lost() {
        let (outcomes, mut listed, observed) = healthy();
        listed[2].ipv4 = Ipv4Addr::new(100, 64, 0, 99);
        assert_eq!(
            kinds(&check(&outcomes, &listed, &observed)),
            vec![ViolationKind::Lost]
        );
    }

    #[test]
    fn a_machine_registered_twice_is_a_duplicate() {
        let (outcomes, mut listed, observed) = healthy();
        let mut second = listed[0].clone();
        second.id = 4;
        second.name = "s0-1".into();
        second.ipv4 = Ipv4Addr::new(100, 64, 0, 4);
        second.ipv6 = "fd7a::4".parse().unwrap();
        listed.push(second);
        let violations = check(&outcomes, &listed, &observed);
        assert!(kinds(&violations).contains(&ViolationKind::Duplicate));
        assert!(violations.iter().any(|v| v.detail.contains("s0-1")));
    }

    #[test]
    fn a_shared_address_or_key_is_a_duplicate() {
        let (outcomes, mut listed, mut observed) = healthy();
        listed[1].ipv4 = listed[0].ipv4;
        assert!(kinds(&check(&outcomes, &listed, &observed)).contains(&ViolationKind::Duplicate));
        let (_, listed, _) = healthy();
        if let Ok((_, netmap)) = &mut observed {
            netmap.peers[1].node_key = netmap.peers[0].node_key;
        }
        assert!(kinds(&check(&outcomes, &listed, &observed)).contains(&ViolationKind::Duplicate));
    }

    #[test]
    fn a_reissued_id_breaks_the_counter() {
        let (outcomes, listed, mut observed) = healthy();
        if let Ok((node, _)) = &mut observed {
            node.id = NodeId(2);
        }
        assert_eq!(
            kinds(&check(&outcomes, &listed, &observed)),
            vec![ViolationKind::Counter]
        );
    }

    #[test]
    fn a_node_never_registered_is_reported_with_its_last_error() {
        let (mut outcomes, mut listed, _) = healthy();
        outcomes[2].ack = None;
        outcomes[2].last_error = Some("connection lost".into());
        listed.pop();
        let violations = check(&outcomes, &listed, &Err("not run".into()));
        let unregistered: Vec<_> = violations
            .iter()
            .filter(|v| v.kind == ViolationKind::Unregistered)
            .collect();
        assert_eq!(unregistered.len(), 1);
        assert!(unregistered[0].detail.contains("s2"));
        assert!(unregistered[0].detail.contains("connection lost"));
    }

    #[test]
    fn the_generator_is_seeded_and_bounded() {
        let draws = |seed| {
            let mut rng = SplitMix64(seed);
            (0..100).map(|_| rng.below(7)).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        assert!(draws(1).iter().all(|&n| n < 7));
        assert_eq!(SplitMix64(5).below(0), 0);
    }
}
