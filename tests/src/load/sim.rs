//! Simulated nodes: the real control protocol (QUIC, Noise `IK` bound to the
//! QUIC session, `Register` with an auth key, then netmap frames) without a
//! TUN device or WireGuard socket. All nodes share one QUIC client endpoint —
//! one UDP socket — so ten thousand of them fit in the file descriptor limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::sync::mpsc;
use tokio::time::Instant;
use weft_net::handshake::initiate_quic;
use weft_net::tls::Liveness;
use weft_net::Service;
use weft_proto::resume;
use weft_proto::signing::Digest;
use weft_proto::{
    AuthKey, ClientMessage, Credential, FrameDecoder, NodeId, PacketFilter, Peer, PeerVersion,
    PrivateKey, PublicKey, Register, Resume, ServerMessage, SignedRecord, ViewDigest,
};

use super::scenario;

/// What a simulated node reports to the load tool, with when it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Milestone {
    /// Registered and holding its first netmap.
    Synced,
    /// Its filter reflects the changed policy.
    PolicyApplied,
    /// It has the joining node among its peers.
    SawJoiner,
    /// Back in sync in a later session, after its first one ended.
    Resynced,
}

/// A milestone of node `index`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Report {
    pub(crate) index: usize,
    pub(crate) milestone: Milestone,
    pub(crate) at: Instant,
}

/// What every simulated node shares.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) coordinator: SocketAddr,
    pub(crate) coordinator_key: PublicKey,
    /// The joining node's name, which peers watch for.
    pub(crate) joiner: Arc<str>,
    /// Connection attempts that failed before the node synced.
    pub(crate) retries: Arc<AtomicUsize>,
    /// Whether a reconnecting node resumes from the view it holds.
    pub(crate) resume: bool,
    /// Bounds concurrent reconnects (until resynced) as the first wave
    /// bounds first connections.
    pub(crate) reconnects: Arc<tokio::sync::Semaphore>,
    /// Control-stream bytes the fleet received from the coordinator.
    pub(crate) received: Arc<AtomicU64>,
    /// Sessions whose first record was a delta (resumed) or a netmap.
    pub(crate) resumed: Arc<AtomicUsize>,
    pub(crate) full_syncs: Arc<AtomicUsize>,
}

impl Fleet {
    /// One client endpoint on loopback with weftd's transport settings
    /// (1 s keep-alive, 3 s idle timeout), so the coordinator sees the
    /// packet rate a real fleet causes, driven by the QUIC thread so that
    /// the simulated nodes' own work cannot starve it.
    pub(crate) fn new(coordinator: SocketAddr, coordinator_key: PublicKey) -> Result<Self> {
        let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .context("bind the simulated nodes' UDP socket")?;
        widen_receive_buffer(&socket);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            // QUIC on its own thread, as in the coordinator: ten thousand
            // node tasks waking at once must not delay keep-alives.
            weft_coordinator::QuicThread::shared()
                .context("start the simulated nodes' QUIC thread")?,
        )
        .context("start the simulated nodes' QUIC endpoint")?;
        endpoint.set_default_client_config(weft_net::tls::quic_client_config(
            Service::Control,
            LIVENESS,
        )?);
        Ok(Self {
            endpoint,
            coordinator,
            coordinator_key,
            joiner: Arc::from("joiner"),
            retries: Arc::default(),
            resume: true,
            reconnects: Arc::new(tokio::sync::Semaphore::new(200)),
            received: Arc::default(),
            resumed: Arc::default(),
            full_syncs: Arc::default(),
        })
    }
}

/// The kernel receive buffer of the fleet's one UDP socket. Ten thousand
/// real nodes would each have their own; one shared socket with the default
/// buffer (about 200 KiB) overflows in bursts, and the datagrams it drops
/// would show as sessions the coordinator lost.
const FLEET_RECEIVE_BUFFER: libc::c_int = 32 * 1024 * 1024;

/// Raises the socket's receive buffer to [`FLEET_RECEIVE_BUFFER`]: past the
/// system limit where permitted (root), else up to it.
fn widen_receive_buffer(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size = FLEET_RECEIVE_BUFFER;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads a c_int from `size`, the length given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == 0 {
            return;
        }
    }
}

/// Runs node `index` named `hostname` until aborted: registers with
/// `auth_key`, then reports milestones as frames arrive. Like weftd, it
/// retries with backoff (0.5 s doubling, same keys) while it has not synced;
/// `connecting` is held until then, bounding concurrent handshakes. Once
/// synced, a session that ends is reconnected at once and then with backoff,
/// resuming from the view held when the fleet resumes ([`Held`]).
pub(crate) async fn run_node(
    fleet: Fleet,
    index: usize,
    hostname: String,
    auth_key: String,
    connecting: tokio::sync::OwnedSemaphorePermit,
    reports: mpsc::UnboundedSender<Report>,
) -> Result<()> {
    let machine_key = PrivateKey::generate();
    let node_key = PrivateKey::generate().public_key();
    let mut connecting = Some(connecting);
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    let mut held = Held::default();
    let mut jitter = super::SplitMix64(index as u64);
    loop {
        let register = Register {
            credential: Some(Credential::AuthKey(AuthKey::new(auth_key.clone()))),
            hostname: hostname.clone(),
            node_key,
            endpoints: Vec::new(),
            home_relay: None,
            attributes: Default::default(),
            resume: held.resume().filter(|_| fleet.resume).map(Box::new),
        };
        let was_synced = held.node.is_some();
        let result = session(
            &fleet,
            index,
            &machine_key,
            register,
            &mut connecting,
            &reports,
            &mut held,
        )
        .await;
        let Err(e) = result;
        if !was_synced && held.node.is_none() {
            // Never synced yet: the first connection's retries.
            if attempt >= MAX_ATTEMPTS {
                return Err(e.context(format!("after {attempt} attempt(s)")));
            }
            fleet.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(8));
            attempt += 1;
            continue;
        }
        if connecting.is_none() {
            // The session had synced: reconnect at once, as weftd does.
            delay = Duration::from_millis(500);
        } else {
            let jitter = 0.8 + 0.4 * (jitter.below(1000) as f64 / 1000.0);
            tokio::time::sleep(delay.mul_f64(jitter)).await;
            delay = (delay * 2).min(Duration::from_secs(8));
        }
        if connecting.is_none() {
            connecting = Some(
                Arc::clone(&fleet.reconnects)
                    .acquire_owned()
                    .await
                    .context("reconnect semaphore closed")?,
            );
        }
    }
}

/// What a simulated node holds of its view, as digests: enough to resume
/// ([`weft_proto::resume`]) and to follow deltas, at a few bytes per peer.
#[derive(Debug, Default)]
struct Held {
    /// Set once the node holds a view.
    node: Option<NodeId>,
    revision: u64,
    last_record: Digest,
    peers: BTreeMap<NodeId, ViewDigest>,
    filter: ViewDigest,
    capabilities: ViewDigest,
    self_node: ViewDigest,
}

impl Held {
    /// Folds in a verified record.
    fn record(&mut self, message: &ServerMessage, signed: &SignedRecord) {
        match message {
            ServerMessage::NetMap(netmap) => {
                self.node = Some(netmap.self_node.id);
                self.revision = netmap.revision;
                self.peers = netmap
                    .peers
                    .iter()
                    .map(|p| (p.id, resume::peer_digest(p)))
                    .collect();
                self.filter = resume::filter_digest(&netmap.filter);
                self.capabilities = resume::capabilities_digest(&netmap.capabilities);
                self.self_node = resume::self_node_digest(&netmap.self_node);
            }
            ServerMessage::Delta(delta) => {
                self.revision = delta.revision;
                for peer in &delta.upsert_peers {
                    self.peers.insert(peer.id, resume::peer_digest(peer));
                }
                for id in &delta.remove_peers {
                    self.peers.remove(id);
                }
                if let Some(filter) = &delta.filter {
                    self.filter = resume::filter_digest(filter);
                }
                if let Some(capabilities) = &delta.capabilities {
                    self.capabilities = resume::capabilities_digest(capabilities);
                }
                if let Some(node) = &delta.self_node {
                    self.node = Some(node.id);
                    self.self_node = resume::self_node_digest(node);
                }
            }
            _ => return,
        }
        self.last_record = signed.digest();
    }

    /// The resume for the view held, if any.
    fn resume(&self) -> Option<Resume> {
        Some(Resume {
            node: self.node?,
            last_record: self.last_record,
            revision: self.revision,
            peers: self
                .peers
                .iter()
                .map(|(id, version)| PeerVersion {
                    id: *id,
                    version: *version,
                })
                .collect(),
            filter: self.filter,
            capabilities: self.capabilities,
            self_node: self.self_node,
        })
    }
}

/// Connection attempts before a node that never synced gives up.
const MAX_ATTEMPTS: u32 = 6;

/// One control session, until it fails; `connecting` is released once
/// synced, and `held` follows every verified record.
async fn session(
    fleet: &Fleet,
    index: usize,
    machine_key: &PrivateKey,
    register: Register,
    connecting: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    reports: &mpsc::UnboundedSender<Report>,
    held: &mut Held,
) -> Result<std::convert::Infallible> {
    let (_connection, mut send, mut recv) = handshake(fleet, machine_key).await?;
    let node_key = register.node_key;
    let mut opener = match &register.resume {
        Some(resume) => weft_proto::Opener::resume(node_key, resume.last_record),
        None => weft_proto::Opener::new(node_key),
    };
    let resync = held.node.is_some();
    let frame =
        weft_proto::encode_frame(&ClientMessage::Register(register)).map_err(|e| anyhow!("{e}"))?;
    send.write_all(&frame).await.context("send Register")?;

    let mut view = View::default();
    let mut decoder = FrameDecoder::new();
    loop {
        while let Some(message) = decoder.next_message::<ServerMessage>()? {
            let opened = opener.open(message)?;
            if let Some(signed) = &opened.signed {
                if !view.synced {
                    let counter = match opened.message {
                        ServerMessage::Delta(_) => &fleet.resumed,
                        _ => &fleet.full_syncs,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                held.record(&opened.message, signed);
            }
            for milestone in view.apply(opened.message, &fleet.joiner)? {
                if milestone == Milestone::Synced {
                    *connecting = None;
                }
                let milestone = match milestone {
                    Milestone::Synced if resync => Milestone::Resynced,
                    other => other,
                };
                let _ = reports.send(Report {
                    index,
                    milestone,
                    at: Instant::now(),
                });
            }
        }
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                fleet
                    .received
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                decoder.push(&chunk.bytes);
            }
            Ok(None) => bail!("the coordinator closed the control stream"),
            Err(e) => return Err(e).context("control stream"),
        }
    }
}

/// The node's QUIC liveness (weftd's): keep-alives every second, gone
/// after three silent seconds.
const LIVENESS: Liveness = Liveness {
    keep_alive: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(3),
};

/// Opens a control session proving `machine_key`: QUIC, one stream, and the
/// Noise `IK` handshake bound to the QUIC session. The connection is returned
/// so the caller holds it open for as long as it uses the stream.
pub(crate) async fn handshake(
    fleet: &Fleet,
    machine_key: &PrivateKey,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let connection = fleet
        .endpoint
        .connect(fleet.coordinator, Service::Control.server_name())
        .context("start QUIC connection")?
        .await
        .context("QUIC connection")?;
    let (send, recv) = initiate_quic(
        &connection,
        Service::Control,
        machine_key,
        &fleet.coordinator_key,
    )
    .await
    .context("control handshake")?;
    Ok((connection, send, recv))
}

/// What a simulated node tracks of its netmap: only what the milestones need.
#[derive(Debug, Default)]
struct View {
    registered: bool,
    synced: bool,
    policy_applied: bool,
    saw_joiner: bool,
}

impl View {
    /// Folds in one message; returns the milestones it reached.
    fn apply(&mut self, message: ServerMessage, joiner: &str) -> Result<Vec<Milestone>> {
        let (filter, peers): (Option<PacketFilter>, Vec<Peer>) = match message {
            ServerMessage::Registered(_) => {
                self.registered = true;
                return Ok(Vec::new());
            }
            ServerMessage::Refused(refusal) => {
                bail!("refused ({:?}): {}", refusal.code, refusal.message)
            }
            ServerMessage::LoginRequired(_) => bail!("asked for an interactive login"),
            _ if !self.registered => bail!("a netmap arrived before registration"),
            ServerMessage::NetMap(netmap) => (Some(netmap.filter), netmap.peers),
            ServerMessage::Delta(delta) => (delta.filter, delta.upsert_peers),
            ServerMessage::Relays(_) | ServerMessage::NetmapKey(_) => return Ok(Vec::new()),
            ServerMessage::RelayAdmissions { .. } => bail!("sent relay admissions"),
            ServerMessage::Signed(_) => bail!("a signed record was not opened"),
            ServerMessage::FlowsAck { .. } => bail!("acknowledged flow records it never sent"),
        };
        let mut reached = Vec::new();
        if !self.synced {
            self.synced = true;
            reached.push(Milestone::Synced);
        }
        if !self.policy_applied
            && filter.is_some_and(|f| scenario::admits_port(&f, scenario::PORT_AFTER))
        {
            self.policy_applied = true;
            reached.push(Milestone::PolicyApplied);
        }
        if !self.saw_joiner && peers.iter().any(|p| p.name == joiner) {
            self.saw_joiner = true;
            reached.push(Milestone::SawJoiner);
        }
        Ok(reached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::{Identity, NetMap, NetMapDelta, NodeId, SelfNode};

    fn self_node() -> SelfNode {
        SelfNode {
            id: NodeId(1),
            name: "n1".into(),
            ipv4: "100.64.0.1".parse().unwrap(),
            ipv6: "fd7a::1".parse().unwrap(),
            identity: Identity::tagged(vec!["tag:g0".into()]),
            key_expiry: None,
        }
    }

    fn delta(upsert_peers: Vec<Peer>) -> NetMapDelta {
        NetMapDelta {
            revision: 2,
            upsert_peers,
            remove_peers: Vec::new(),
            filter: None,
            capabilities: None,
            self_node: None,
        }
    }

    fn peer(name: &str) -> Peer {
        Peer {
            id: NodeId(9),
            name: name.into(),
            node_key: PrivateKey::generate().public_key(),
            addresses: Vec::new(),
            endpoints: Vec::new(),
            home_relay: None,
            identity: Identity::tagged(Vec::new()),
        }
    }

    #[test]
    fn milestones_follow_the_messages_once_each() {
        let mut view = View::default();
        assert!(view
            .apply(ServerMessage::Registered(self_node()), "joiner")
            .is_ok_and(|m| m.is_empty()));
        let netmap = NetMap {
            revision: 1,
            self_node: self_node(),
            peers: vec![peer("n2")],
            filter: PacketFilter::default(),
            capabilities: Vec::new(),
        };
        assert_eq!(
            view.apply(ServerMessage::NetMap(netmap), "joiner").ok(),
            Some(vec![Milestone::Synced])
        );
        let delta = delta(vec![peer("joiner")]);
        let again = delta.clone();
        assert_eq!(
            view.apply(ServerMessage::Delta(delta), "joiner").ok(),
            Some(vec![Milestone::SawJoiner])
        );
        assert!(view
            .apply(ServerMessage::Delta(again), "joiner")
            .is_ok_and(|m| m.is_empty()));
    }

    #[test]
    fn the_held_digests_resume_like_a_node_holding_the_folded_view() {
        let signed = |n: u8| SignedRecord {
            body: vec![n],
            signature: Vec::new(),
        };
        let mut netmap = NetMap {
            revision: 1,
            self_node: self_node(),
            peers: vec![
                peer("n2"),
                Peer {
                    id: NodeId(3),
                    ..peer("n3")
                },
            ],
            filter: PacketFilter::default(),
            capabilities: Vec::new(),
        };
        let mut held = Held::default();
        assert_eq!(held.resume(), None, "nothing held, nothing to resume");
        held.record(&ServerMessage::NetMap(netmap.clone()), &signed(1));
        let joined = peer("n9");
        let mut change = delta(vec![joined.clone()]);
        change.remove_peers = vec![NodeId(3)];
        held.record(&ServerMessage::Delta(change), &signed(2));
        netmap.peers = vec![joined];
        netmap.revision = 2;
        assert_eq!(held.resume(), Some(Resume::of(signed(2).digest(), &netmap)));
    }

    #[test]
    fn a_netmap_before_registration_is_an_error() {
        let delta = delta(Vec::new());
        assert!(View::default()
            .apply(ServerMessage::Delta(delta), "joiner")
            .is_err());
    }
}
