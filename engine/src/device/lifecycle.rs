//! The device's life: joining (`weft up`, `weft login`, a workload's
//! token), leaving (`weft down`, a refusal), the control session's events,
//! and a workload's identity renewal with node-key rotation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use weft_dataplane::core::Node;
use weft_proto::{
    Credential, IdentityToken, LoginFlow, LoginPrompt, NetMap, NetMapDelta, PrivateKey, Refusal,
    RefusalCode, SelfNode,
};

use super::control_surface::{
    CoordinatorStatus, LoginPending, LoginRequest, RunState, Status, UpReply, UpRequest,
};
use super::{endpoints, identity, paths, relays, status};
use super::{CommandError, DeviceError, PacketIo, Platform, Underlay};
use crate::control::{ControlConfig, ControlError, ControlEvent, ControlTask, ControlUpdate};
use crate::flows::FlowQueue;
use crate::metrics::{NodeMetrics, PeerMetrics};
use crate::netmap_cache;
use crate::posture::Attributes;
use crate::state::{Prefs, StateDir};

/// Control updates queued for the device loop.
const CONTROL_UPDATES: usize = 64;

/// A node's device: the data-plane core and everything that feeds it,
/// driven by one loop ([`Device::run`]).
pub struct Device<T, P> {
    pub(super) core: Node,
    pub(super) node_key: PrivateKey,
    machine_key: PrivateKey,
    state: StateDir,
    pub(super) packets: T,
    pub(super) platform: P,
    pub(super) underlay: Underlay,
    pub(super) wireguard_port: u16,
    /// Where this node can be reached, for the control session to report.
    pub(super) advertisement: watch::Sender<weft_proto::Advertisement>,
    /// Sessions with the relays the coordinator lists.
    pub(super) relays: relays::Relays,
    /// `weft ping` requests waiting for their pong, by ping id.
    pub(super) pings: std::collections::HashMap<u64, paths::PendingPing>,
    /// The host's endpoints as last handed to the core.
    pub(super) local_endpoints: Option<Vec<std::net::SocketAddr>>,
    updates: mpsc::Sender<ControlUpdate>,
    pub(super) control_updates: mpsc::Receiver<ControlUpdate>,
    control: Option<ControlTask>,
    /// Counts control sessions, so updates from a replaced session are ignored.
    sessions: u64,
    /// The preferences of the running session.
    prefs: Option<Prefs>,
    /// Preferences from `weft up`, saved once the coordinator accepts them.
    pending_prefs: Option<Prefs>,
    pending_up: Option<oneshot::Sender<Result<UpReply, CommandError>>>,
    run_state: RunState,
    message: Option<String>,
    /// The pending login link (see [`Status::login_url`]).
    login_url: Option<String>,
    pub(super) self_node: Option<SelfNode>,
    /// When the self node's key expiry was last granted (Unix seconds).
    key_granted: Option<u64>,
    /// When the last netmap or delta arrived.
    netmap_at: Option<Instant>,
    connected: bool,
    /// The replica the control session is connected to.
    connected_to: Option<std::net::SocketAddr>,
    /// The posture file's attributes, for every control session.
    posture: watch::Receiver<Attributes>,
    /// Application capabilities the netmap grants peers on this node, for `whois`.
    pub(super) capabilities: Vec<weft_proto::AppGrant>,
    /// The next WireGuard key, while a session re-authenticates with it.
    rotation: Option<PrivateKey>,
    /// The identity token the current session registers with.
    presenting: Option<IdentityToken>,
    /// When to renew a workload's identity.
    renewal: identity::Renewal,
    /// The renewal policy's clock starts here.
    started: Instant,
    /// The last problem with the identity token file, logged once.
    token_error: Option<String>,
    /// Flow records for the coordinator, spooled in the state directory.
    pub(super) flows: Arc<FlowQueue>,
    /// The data plane's flow-log drops already passed on to `flows`.
    pub(super) flow_drops_seen: u64,
}

impl<T, P> std::fmt::Debug for Device<T, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("node_key", &self.node_key.public_key())
            .field("wireguard_port", &self.wireguard_port)
            .field("run_state", &self.run_state)
            .field("connected_to", &self.connected_to)
            .finish_non_exhaustive()
    }
}

impl<T: PacketIo, P: Platform> Device<T, P> {
    /// A device that is not in an overlay yet, with the node's keys from
    /// `state`: `packets` carries the overlay's packets, `platform` the
    /// rest of the operating system, `underlay` WireGuard's datagrams
    /// (kept out of the tunnel here), and `posture` the administrator's
    /// `custom:*` attributes for every control session.
    pub fn new(
        state: StateDir,
        packets: T,
        platform: P,
        underlay: Underlay,
        posture: watch::Receiver<Attributes>,
    ) -> Result<Self, DeviceError> {
        let machine_key = state.machine_key()?;
        let node_key = state.node_key()?;
        platform
            .protect(underlay.as_fd())
            .map_err(DeviceError::Protect)?;
        let wireguard_port = underlay.port().map_err(DeviceError::Socket)?;
        let endpoints = endpoints::local_endpoints(&platform, wireguard_port).unwrap_or_default();
        let (updates, control_updates) = mpsc::channel(CONTROL_UPDATES);
        let flows = Arc::new(FlowQueue::open(&state.path().join("flows")));
        Ok(Self {
            flows,
            flow_drops_seen: 0,
            core: Node::new(
                node_key.clone(),
                Instant::now(),
                SystemTime::now(),
                rand::random(),
            ),
            posture,
            capabilities: Vec::new(),
            node_key,
            machine_key,
            state,
            packets,
            platform,
            underlay,
            wireguard_port,
            advertisement: watch::Sender::new(weft_proto::Advertisement {
                endpoints,
                home_relay: None,
            }),
            relays: relays::Relays::new(),
            pings: std::collections::HashMap::new(),
            local_endpoints: None,
            updates,
            control_updates,
            control: None,
            sessions: 0,
            prefs: None,
            pending_prefs: None,
            pending_up: None,
            run_state: RunState::Stopped,
            message: None,
            login_url: None,
            self_node: None,
            key_granted: None,
            netmap_at: None,
            connected: false,
            connected_to: None,
            rotation: None,
            presenting: None,
            renewal: identity::Renewal::default(),
            started: Instant::now(),
            token_error: None,
        })
    }

    /// Joins the overlay `join` names, as `weft up` would; without one,
    /// rejoins the overlay the saved preferences want running, in force at
    /// once with the cached netmap while the coordinator is reached.
    pub async fn resume(&mut self, join: Option<UpRequest>) -> Result<(), DeviceError> {
        let prefs = self.state.load_prefs()?;
        if let Some(join) = join {
            tracing::info!(coordinator = %join.coordinator, "joining the overlay");
            self.start_up(join).map_err(DeviceError::Join)?;
        } else if let Some(prefs) = prefs.filter(|p| p.want_running) {
            tracing::info!(coordinator = %prefs.coordinator, "rejoining the overlay");
            let node_key = self.node_key.public_key();
            if let Some(netmap) =
                netmap_cache::restore_at_start(self.state.path(), &prefs, node_key)
            {
                self.on_netmap(&netmap).await;
            }
            self.start_control(prefs, None);
        }
        Ok(())
    }

    pub(super) fn on_up(
        &mut self,
        request: UpRequest,
        reply: oneshot::Sender<Result<UpReply, CommandError>>,
    ) {
        if let Some(previous) = self.pending_up.take() {
            let _ = previous.send(Err(CommandError::Invalid(
                "superseded by a newer `weft up`".into(),
            )));
        }
        match self.start_up(request) {
            Ok(()) => self.pending_up = Some(reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Starts joining the overlay `request` names.
    fn start_up(&mut self, request: UpRequest) -> Result<(), CommandError> {
        let hostname = match request.hostname {
            Some(name) => name,
            None => self.platform.host_name(),
        };
        if hostname.trim().is_empty() {
            return Err(CommandError::Invalid(
                "the hostname is empty; pass --hostname NAME".into(),
            ));
        }
        let prefs = Prefs {
            coordinator: request.coordinator,
            coordinator_key: request.coordinator_key,
            hostname,
            want_running: true,
            identity_token_file: request.identity_token_file,
        };
        // A workload presents its platform's token; otherwise a machine
        // that already joined this coordinator rejoins by its machine key,
        // and any other needs an auth key or a person's login.
        let joined = self.state.load_prefs().ok().flatten().is_some_and(|saved| {
            saved.coordinator == prefs.coordinator && saved.coordinator_key == prefs.coordinator_key
        });
        let credential = match (request.auth_key, &prefs.identity_token_file) {
            (Some(key), _) => Some(Credential::AuthKey(key)),
            (None, Some(path)) => Some(Credential::IdentityToken(
                identity::read_token(path).map_err(|e| CommandError::Invalid(e.to_string()))?,
            )),
            (None, None) if joined => None,
            (None, None) => Some(Credential::Interactive(flow(request.device_code))),
        };
        self.pending_prefs = Some(prefs.clone());
        self.rotation = None;
        self.start_control(prefs, credential);
        Ok(())
    }

    /// `weft login`: log a person in again for the overlay this machine
    /// joined; the node keeps its id and addresses.
    pub(super) fn on_login(
        &mut self,
        request: LoginRequest,
        reply: oneshot::Sender<Result<UpReply, CommandError>>,
    ) {
        let saved = self
            .prefs
            .clone()
            .or_else(|| self.state.load_prefs().ok().flatten());
        let Some(mut prefs) = saved else {
            let _ = reply.send(Err(CommandError::Invalid(
                "this machine has not joined an overlay; run `weft up --coordinator HOST:PORT --coordinator-key KEY`".into(),
            )));
            return;
        };
        if let Some(previous) = self.pending_up.take() {
            let _ = previous.send(Err(CommandError::Invalid(
                "superseded by `weft login`".into(),
            )));
        }
        prefs.want_running = true;
        self.pending_prefs = Some(prefs.clone());
        self.pending_up = Some(reply);
        self.rotation = None;
        let credential = Credential::Interactive(flow(request.device_code));
        self.start_control(prefs, Some(credential));
    }

    /// Starts a control session registering with `credential`, and with the
    /// next node key while a rotation is under way.
    fn start_control(&mut self, prefs: Prefs, credential: Option<Credential>) {
        self.sessions += 1;
        self.presenting = match &credential {
            Some(Credential::IdentityToken(token)) => Some(token.clone()),
            _ => None,
        };
        let node_key = self
            .rotation
            .as_ref()
            .unwrap_or(&self.node_key)
            .public_key();
        let config = ControlConfig {
            coordinator: prefs.coordinator.clone(),
            coordinator_key: prefs.coordinator_key,
            machine_key: self.machine_key.clone(),
            credential,
            hostname: prefs.hostname.clone(),
            node_key,
            advertisement: self.advertisement.subscribe(),
            system_attributes: P::system_attributes,
            posture: self.posture.clone(),
        };
        let cache = netmap_cache::CacheWriter::new(self.state.path(), prefs.coordinator_key);
        self.control = Some(ControlTask::spawn_caching(
            config,
            cache,
            Arc::clone(&self.flows),
            self.sessions,
            self.updates.clone(),
        ));
        self.prefs = Some(prefs);
        self.connected = false;
        self.connected_to = None;
        if self.run_state != RunState::Running {
            self.run_state = RunState::Connecting;
        }
    }

    pub(super) async fn on_down(&mut self) -> Status {
        if let Some(pending) = self.pending_up.take() {
            let _ = pending.send(Err(CommandError::Invalid(
                "cancelled by `weft down`".into(),
            )));
        }
        self.pending_prefs = None;
        self.stop_control().await;
        if let Some(prefs) = self.prefs.as_mut() {
            prefs.want_running = false;
            if let Err(e) = self.state.save_prefs(prefs) {
                tracing::error!("{e}");
            }
        }
        self.run_state = RunState::Stopped;
        self.message = None;
        self.login_url = None;
        tracing::info!("stopped by `weft down`");
        self.status()
    }

    /// Ends the control session and withdraws the overlay: no tunnels, no addresses.
    pub(super) async fn stop_control(&mut self) {
        self.control = None;
        self.rotation = None;
        self.connected = false;
        self.connected_to = None;
        self.self_node = None;
        self.capabilities.clear();
        self.stop_relays();
        self.core.clear();
        if let Err(e) = self.platform.unassign().await {
            tracing::warn!("{e}");
        }
    }

    pub(super) async fn on_control(&mut self, update: ControlUpdate) {
        if self.control.as_ref().map(ControlTask::session) != Some(update.session) {
            return;
        }
        match update.event {
            ControlEvent::Connected(address) => self.connected_to = Some(address),
            ControlEvent::Registered(node) => self.on_registered(node),
            ControlEvent::LoginRequired(prompt) => self.on_login_required(prompt),
            ControlEvent::NetMap(netmap) => self.on_netmap(&netmap).await,
            ControlEvent::Delta(delta) => self.on_delta(&delta).await,
            ControlEvent::Relays(relays) => self.on_relays(&relays),
            ControlEvent::Refused(refusal) => self.on_refused(refusal).await,
            ControlEvent::Disconnected(error) => self.on_disconnected(error).await,
        }
    }

    fn on_registered(&mut self, node: SelfNode) {
        tracing::info!(id = %node.id, "registered with the coordinator");
        if let Some(next_key) = self.rotation.take() {
            self.core.rotate_key(next_key.clone(), Instant::now());
            if let Err(e) = self.state.save_node_key(&next_key) {
                // The coordinator has the new key: after a restart with
                // the old one, the node rejoins and registers that instead.
                tracing::error!("{e}");
            }
            self.node_key = next_key;
            self.rekey_relays();
        }
        self.renewal
            .accepted(self.presenting.take(), unix_now(), node.key_expiry);
        tracing::debug!(name = %node.name, identity = %node.identity, "registered as");
        self.connected = true;
        self.message = None;
        self.login_url = None;
        self.self_node = Some(node);
        if let Some(prefs) = self.pending_prefs.take() {
            if let Err(e) = self.state.save_prefs(&prefs) {
                tracing::error!("{e}");
            }
        }
    }

    /// Says why the state is what it is. A pending login link is void once
    /// anything else is said: the login it was for has failed or moved on.
    fn say(&mut self, message: String) {
        self.message = Some(message);
        self.login_url = None;
    }

    /// Hands the login URL to the waiting `weft up` or `weft login`, which
    /// prints it and follows the status until the person logged in.
    fn on_login_required(&mut self, prompt: LoginPrompt) {
        tracing::info!(
            "waiting for a person to log in at the link given to `weft up` or `weft login`"
        );
        self.run_state = RunState::NeedsLogin;
        self.message = Some(
            "waiting for a person to log in at the link given to `weft up` or `weft login`".into(),
        );
        self.login_url = Some(prompt.url.clone());
        if let Some(pending) = self.pending_up.take() {
            let _ = pending.send(Ok(UpReply::LoginRequired(LoginPending {
                login_url: prompt.url,
                user_code: prompt.user_code,
                expires_in_secs: prompt.expires_in_secs,
            })));
        }
    }

    async fn on_netmap(&mut self, netmap: &NetMap) {
        tracing::info!(
            revision = netmap.revision,
            peers = netmap.peers.len(),
            "netmap received"
        );
        self.core.set_netmap(netmap, Instant::now());
        self.netmap_at = Some(Instant::now());
        self.capabilities.clone_from(&netmap.capabilities);
        self.apply_self(netmap.self_node.clone()).await;
    }

    async fn on_delta(&mut self, delta: &NetMapDelta) {
        tracing::debug!(
            revision = delta.revision,
            upserts = delta.upsert_peers.len(),
            removals = delta.remove_peers.len(),
            "netmap delta received"
        );
        self.core.apply_delta(delta, Instant::now());
        self.netmap_at = Some(Instant::now());
        if let Some(capabilities) = &delta.capabilities {
            self.capabilities.clone_from(capabilities);
        }
        if let Some(node) = &delta.self_node {
            self.apply_self(node.clone()).await;
        }
    }

    /// Puts the node's own addresses on the overlay interface and answers a waiting `weft up`.
    async fn apply_self(&mut self, node: SelfNode) {
        let result = self.platform.assign(node.ipv4, node.ipv6).await;
        let me = status::self_status(&node, self.core.public_key());
        let previous = self.self_node.as_ref().and_then(|n| n.key_expiry);
        if node.key_expiry != previous || self.key_granted.is_none() {
            self.key_granted = Some(unix_now());
        }
        self.self_node = Some(node);
        match result {
            Ok(()) => {
                self.run_state = RunState::Running;
                self.message = None;
                self.login_url = None;
                if let Some(pending) = self.pending_up.take() {
                    let _ = pending.send(Ok(UpReply::Running(me)));
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                self.say(e.to_string());
                if let Some(pending) = self.pending_up.take() {
                    let _ = pending.send(Err(CommandError::Internal(e.to_string())));
                }
            }
        }
    }

    async fn on_refused(&mut self, refusal: Refusal) {
        if let Some(pending) = self.pending_up.take() {
            let _ = pending.send(Err(CommandError::Refused(refusal.message.clone())));
        }
        self.connected = false;
        // The control task retries these itself; the node keeps running.
        if matches!(
            refusal.code,
            RefusalCode::Unavailable | RefusalCode::MachineKeyInUse
        ) {
            self.say(refusal.message);
            return;
        }
        if self.renewal_refused(&refusal) || self.renew_expired_key(&refusal) {
            return;
        }
        self.say(refusal.message);
        // Fail closed: a node the coordinator no longer admits keeps no tunnels.
        // Preferences of a join that never succeeded are not saved, so the
        // next `weft up` joins afresh instead of rejoining.
        let never_joined = self.pending_prefs.take().is_some();
        self.stop_control().await;
        self.run_state = match refusal.code {
            RefusalCode::NodeDeleted => RunState::Deleted,
            RefusalCode::BadRequest => RunState::Stopped,
            RefusalCode::KeyExpired
            | RefusalCode::LoginFailed
            | RefusalCode::IdentityProviderUnavailable => RunState::NeedsLogin,
            _ => RunState::NeedsAuth,
        };
        if let Some(prefs) = self
            .prefs
            .as_mut()
            .filter(|p| p.want_running && !never_joined)
        {
            prefs.want_running = false;
            if let Err(e) = self.state.save_prefs(prefs) {
                tracing::error!("{e}");
            }
        }
    }

    /// Re-authenticates with the workload's identity token if the file
    /// holds a fresh one or the node key is close to expiry, rotating the
    /// node key.
    pub(super) fn check_renewal(&mut self) {
        let Some(path) = self.token_file() else {
            return;
        };
        if self.rotation.is_some() || !self.connected {
            return;
        }
        let token = match identity::read_token(&path) {
            Ok(token) => {
                self.token_error = None;
                token
            }
            Err(e) => {
                let text = e.to_string();
                if self.token_error.as_ref() != Some(&text) {
                    tracing::warn!("{text}");
                    self.token_error = Some(text);
                }
                return;
            }
        };
        if self.renewal.due(&token, unix_now(), self.started.elapsed()) {
            self.rotate_with(token);
        }
    }

    /// Registers again with `token` and a fresh node key, which the data
    /// plane switches to once the coordinator accepted it.
    fn rotate_with(&mut self, token: IdentityToken) {
        let Some(prefs) = self.prefs.clone() else {
            return;
        };
        tracing::info!(
            "renewing the workload identity with the token file's token; rotating the node key"
        );
        self.renewal.started(self.started.elapsed());
        self.rotation = Some(PrivateKey::generate());
        self.start_control(prefs, Some(Credential::IdentityToken(token)));
    }

    /// A refused renewal leaves the node on its current key while that is
    /// valid: it rejoins without the token and tries again later. `true`
    /// when handled.
    fn renewal_refused(&mut self, refusal: &Refusal) -> bool {
        if self.rotation.take().is_none() {
            return false;
        }
        if let Some(token) = self.presenting.take() {
            self.renewal.refused(token);
        }
        let valid = self
            .self_node
            .as_ref()
            .and_then(|n| n.key_expiry)
            .is_some_and(|expiry| expiry > unix_now());
        let Some(prefs) = self.prefs.clone().filter(|_| valid) else {
            return false;
        };
        if refusal.code == RefusalCode::NodeDeleted {
            return false;
        }
        tracing::warn!(code = ?refusal.code, "the coordinator refused the renewed identity: {}; keeping the current key until it expires", refusal.message);
        self.say(format!(
            "renewing the workload identity failed: {}",
            refusal.message
        ));
        self.start_control(prefs, None);
        true
    }

    /// A workload whose key expired (it was offline too long) renews it
    /// with the token file's token at once. `true` when handled.
    fn renew_expired_key(&mut self, refusal: &Refusal) -> bool {
        if refusal.code != RefusalCode::KeyExpired {
            return false;
        }
        let Some(path) = self.token_file() else {
            return false;
        };
        match identity::read_token(&path) {
            Ok(token) => {
                self.rotate_with(token);
                true
            }
            Err(e) => {
                tracing::warn!("{e}");
                false
            }
        }
    }

    /// The identity token file of the overlay this node is in, if it is a workload.
    fn token_file(&self) -> Option<PathBuf> {
        self.prefs
            .as_ref()
            .filter(|p| p.want_running)
            .and_then(|p| p.identity_token_file.clone())
    }

    async fn on_disconnected(&mut self, error: ControlError) {
        self.connected = false;
        self.connected_to = None;
        self.say(error.to_string());
        let handshake_failed = matches!(error, ControlError::Handshake(_));
        if let (true, Some(pending)) = (handshake_failed, self.pending_up.take()) {
            // A wrong pinned key will not fix itself: give the operator the answer now.
            let _ = pending.send(Err(CommandError::Handshake(error.to_string())));
            self.pending_prefs = None;
            self.stop_control().await;
            self.run_state = RunState::Stopped;
        }
    }

    pub(super) fn status(&self) -> Status {
        let now = SystemTime::now();
        Status {
            state: self.run_state,
            message: self.message.clone(),
            login_url: self
                .login_url
                .clone()
                .filter(|_| self.run_state == RunState::NeedsLogin),
            self_node: self
                .self_node
                .as_ref()
                .map(|node| status::self_status(node, self.core.public_key())),
            coordinator: CoordinatorStatus {
                address: self.prefs.as_ref().map(|p| p.coordinator.to_string()),
                connected: self.connected,
                connected_to: self.connected_to.filter(|_| self.connected),
            },
            peers: self
                .core
                .peers()
                .iter()
                .map(|peer| status::peer_summary(peer, now))
                .collect(),
            filter: status::filter_status(
                &self.core.filter_stats(),
                self.packets.malformed_frames(),
            ),
            flows: self.flow_status(),
        }
    }

    fn flow_status(&self) -> super::FlowLogStatus {
        status::flow_status(self.core.flow_log_stats(), self.flows.stats())
    }
}

impl<T: PacketIo, P: Platform> Device<T, P> {
    pub(super) fn metrics(&self) -> NodeMetrics {
        NodeMetrics {
            clock: SystemTime::now(),
            state: self.run_state,
            coordinator_connected: self.connected,
            netmap_age: self.netmap_at.map(|at| at.elapsed()),
            key_expiry: self.self_node.as_ref().and_then(|n| n.key_expiry),
            key_granted: self.key_granted,
            peers: self
                .core
                .peers()
                .iter()
                .map(|peer| PeerMetrics {
                    path: peer.path,
                    last_handshake: peer.last_handshake,
                })
                .collect(),
            filter: self.core.filter_stats(),
            rules: self.core.rule_verdicts(),
            malformed_frames: self.packets.malformed_frames(),
            relay_dropped: self.relays.states().iter().map(|s| s.dropped).sum(),
            flows: self.flow_status(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn flow(device_code: bool) -> LoginFlow {
    if device_code {
        LoginFlow::DeviceCode
    } else {
        LoginFlow::Browser
    }
}
