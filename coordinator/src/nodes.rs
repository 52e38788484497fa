//! The node registry: registration, rejoin, endpoint updates and deletion,
//! with overlay addresses and unique hostnames.
//!
//! Every change is one store transaction guarded by compares on the keys it
//! claims (`machines/`, `names/`, `ipv4/`, the node's record and, for
//! single-use keys, the auth key), so concurrent registrations never share a
//! name, an address or a key; a loser of a race simply retries. Node ids
//! come from blocks reserved in the store (see `ids`), so concurrent
//! registrations of different nodes touch no key in common and commit
//! together.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};
use weft_policy::NodeInfo;
use weft_proto::{
    canonical, Advertisement, Credential, Identity, NodeId, Peer, PublicKey, Refusal, RefusalCode,
    Register, SelfNode,
};

use crate::audit::{self, Actor, Event};
use crate::authkey::{self, AdmitError};
use crate::store::{self, Compare, Op, Store, StoreError};
use crate::users;
use crate::workload::WorkloadLogin;

mod ids;

/// Key prefix of node records.
pub(crate) const NODES_PREFIX: &str = "nodes/";
const OVERLAY_KEY: &str = "config/overlay";
const SCHEMA_KEY: &str = "config/schema";
const SCHEMA_VERSION: u32 = 1;
const MAX_ATTEMPTS: usize = 64;
const MAX_ENDPOINTS: usize = 32;
/// The longest hostname a node may ask for (a DNS name); the name it gets is
/// one label of at most `MAX_HOSTNAME`.
const MAX_REQUESTED_HOSTNAME: usize = 253;
const MAX_ATTRIBUTES: usize = 64;
const MAX_ATTRIBUTE_LEN: usize = 256;
const MAX_HOSTNAME: usize = 63;

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    pub(crate) id: NodeId,
    pub(crate) name: String,
    pub(crate) machine_key: PublicKey,
    pub(crate) node_key: PublicKey,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
    pub(crate) identity: Identity,
    pub(crate) endpoints: Vec<SocketAddr>,
    /// The relay the node is reachable through, as it last reported.
    #[serde(default)]
    pub(crate) home_relay: Option<String>,
    pub(crate) attributes: BTreeMap<String, String>,
    /// Unix seconds.
    pub(crate) created: u64,
    pub(crate) ephemeral: bool,
    /// When a person's login or a workload's token stops admitting the node
    /// (Unix seconds); `None` for nodes admitted by keys, which live until deleted.
    #[serde(default)]
    pub(crate) key_expiry: Option<u64>,
}

impl NodeRecord {
    /// Whether a person's login for this node has run out at `now` (Unix seconds).
    pub(crate) fn is_expired(&self, now: u64) -> bool {
        self.key_expiry.is_some_and(|expiry| expiry <= now)
    }

    pub(crate) fn self_node(&self) -> SelfNode {
        SelfNode {
            id: self.id,
            name: self.name.clone(),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            identity: self.identity.clone(),
            key_expiry: self.key_expiry,
        }
    }

    pub(crate) fn peer(&self) -> Peer {
        Peer {
            id: self.id,
            name: self.name.clone(),
            node_key: self.node_key,
            addresses: self.addresses(),
            endpoints: self.endpoints.clone(),
            home_relay: self.home_relay.clone(),
            identity: self.identity.clone(),
        }
    }

    pub(crate) fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id,
            name: self.name.clone(),
            addresses: self.addresses(),
            identity: self.identity.clone().into_canonical(),
            attributes: self.attributes.clone(),
        }
    }

    fn addresses(&self) -> Vec<IpAddr> {
        vec![IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }
}

/// A person who just logged a device in through the identity provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserLogin {
    /// Their email address.
    pub(crate) user: String,
    /// Their identity-provider groups, as `group:idp:NAME` principals.
    pub(crate) groups: Vec<String>,
    /// When the login stops admitting the device (Unix seconds).
    pub(crate) key_expiry: u64,
}

impl UserLogin {
    fn identity(&self) -> Identity {
        Identity {
            user: Some(self.user.clone()),
            groups: self.groups.clone(),
            ..Identity::default()
        }
    }
}

/// A verified credential that names who the node is: a person's login or a
/// workload's platform token. Registering with one re-authenticates a known
/// node: it takes the new identity and key expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Login {
    User(UserLogin),
    Workload(WorkloadLogin),
}

impl Login {
    fn identity(&self) -> Identity {
        match self {
            Login::User(user) => user.identity(),
            Login::Workload(workload) => workload.identity.clone(),
        }
    }

    fn key_expiry(&self) -> u64 {
        match self {
            Login::User(user) => user.key_expiry,
            Login::Workload(workload) => workload.key_expiry,
        }
    }

    fn ephemeral(&self) -> bool {
        match self {
            Login::User(_) => false,
            Login::Workload(workload) => workload.ephemeral,
        }
    }
}

/// The refusal a node gets once a person's login for it expired.
pub(crate) fn key_expired() -> Refusal {
    Refusal {
        code: RefusalCode::KeyExpired,
        message: "this device's login expired; run `weft login`".into(),
    }
}

/// The refusal a workload's node gets once its token's lifetime ran out.
fn workload_key_expired() -> Refusal {
    Refusal {
        code: RefusalCode::KeyExpired,
        message: "this workload's node key expired with its identity token; register again with a fresh token from the platform".into(),
    }
}

/// Overlay-wide settings chosen once, at the first start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct OverlayConfig {
    /// The RFC 4193 ULA /48 node IPv6 addresses come from.
    ula: Ipv6Net,
}

/// Why an administrator's command found no single node to act on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeleteError {
    #[error("there is no node named {0:?} or with that id; `weft-coordinator nodes list` shows the nodes")]
    NotFound(String),
    /// The argument is one node's id and another node's name (a name given
    /// before names that read as ids were refused).
    #[error("{arg:?} is the id of node {by_id} (named {by_id_name}) and the name of node {by_name}; say `id:{arg}` or `name:{arg}`")]
    Ambiguous {
        arg: String,
        by_id: NodeId,
        by_id_name: String,
        by_name: NodeId,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The nodes of the overlay, kept in a [`Store`].
#[derive(Clone)]
pub(crate) struct Registry {
    store: Arc<dyn Store>,
    ula: Ipv6Net,
    ids: Arc<ids::Ids>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("ula", &self.ula)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens the registry, choosing the overlay's ULA prefix on first use.
    pub(crate) fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        match store::get_json::<u32>(&*store, SCHEMA_KEY)? {
            Some((v, _)) if v > SCHEMA_VERSION => {
                return Err(StoreError::Backend(format!(
                    "the database has schema version {v} but this coordinator understands up to {SCHEMA_VERSION}; run a newer weft-coordinator"
                )))
            }
            Some(_) => {}
            None => {
                let op = Op::Put(SCHEMA_KEY.into(), store::encode(&SCHEMA_VERSION)?);
                match store.txn(&[Compare::Absent(SCHEMA_KEY.into())], &[op]) {
                    Ok(_) | Err(StoreError::Conflict) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let config = loop {
            if let Some((config, _)) = store::get_json::<OverlayConfig>(&*store, OVERLAY_KEY)? {
                break config;
            }
            let config = OverlayConfig { ula: random_ula() };
            let op = Op::Put(OVERLAY_KEY.into(), store::encode(&config)?);
            match store.txn(&[Compare::Absent(OVERLAY_KEY.into())], &[op]) {
                Ok(_) => break config,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        };
        Ok(Self {
            store,
            ula: config.ula,
            ids: Arc::default(),
        })
    }

    /// The store the registry writes to.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Registers the machine that proved `machine_key`: rejoins it as its
    /// existing node, or creates a node if its auth key admits one.
    #[cfg(test)]
    pub(crate) fn register(
        &self,
        machine_key: PublicKey,
        request: &Register,
        now: SystemTime,
    ) -> Result<(NodeRecord, u64), AdmitError> {
        self.register_as(machine_key, request, None, now)
    }

    /// Registers the machine that proved `machine_key` after a person logged
    /// in or a workload token was verified (`login`), or by its machine key
    /// or auth key alone (`None`). A known machine keeps its id, name and
    /// addresses either way.
    pub(crate) fn register_as(
        &self,
        machine_key: PublicKey,
        request: &Register,
        login: Option<&Login>,
        now: SystemTime,
    ) -> Result<(NodeRecord, u64), AdmitError> {
        validate(request)?;
        if let Some(Login::User(login)) = login {
            users::check_enabled(&*self.store, &login.user)?;
        }
        // A new node's id, once taken, is kept across attempts.
        let mut reserved = None;
        let outcome = self.attempt(machine_key, request, login, now, &mut reserved);
        if let Some(id) = reserved {
            let used = matches!(&outcome, Ok((record, _)) if record.id == id);
            // After a store error the node may have been written all the same.
            let maybe_written = matches!(&outcome, Err(AdmitError::Store(_)));
            if !used && !maybe_written {
                self.ids.give_back(id);
            }
        }
        outcome
    }

    /// Rejoins or joins, retrying when a concurrent change got in the way.
    fn attempt(
        &self,
        machine_key: PublicKey,
        request: &Register,
        login: Option<&Login>,
        now: SystemTime,
        reserved: &mut Option<NodeId>,
    ) -> Result<(NodeRecord, u64), AdmitError> {
        for _ in 0..MAX_ATTEMPTS {
            let attempt =
                match store::get_json::<NodeId>(&*self.store, &machine_path(&machine_key))? {
                    Some((id, _)) => self.rejoin(id, request, login, now),
                    None => self.join(machine_key, request, login, now, reserved),
                };
            match attempt {
                Err(AdmitError::Store(StoreError::Conflict)) => continue,
                other => return other,
            }
        }
        Err(AdmitError::Refused(Refusal {
            code: RefusalCode::Unavailable,
            message: "the coordinator is busy with concurrent registrations; retry in a moment"
                .into(),
        }))
    }

    /// Records where a node can now be reached.
    pub(crate) fn update_endpoints(
        &self,
        id: NodeId,
        advertisement: &Advertisement,
    ) -> Result<Option<u64>, AdmitError> {
        check_advertisement(
            &advertisement.endpoints,
            advertisement.home_relay.as_deref(),
        )?;
        self.update(id, |record| {
            let changed = record.endpoints != advertisement.endpoints
                || record.home_relay != advertisement.home_relay;
            record.endpoints = advertisement.endpoints.clone();
            record.home_relay = advertisement.home_relay.clone();
            changed
        })
    }

    /// Records the attributes node `id` reports (OS, client version, posture),
    /// which posture rules are evaluated against.
    pub(crate) fn update_attributes(
        &self,
        id: NodeId,
        attributes: &BTreeMap<String, String>,
    ) -> Result<Option<u64>, AdmitError> {
        check_attributes(attributes)?;
        self.update(id, |record| {
            let changed = record.attributes != *attributes;
            record.attributes = attributes.clone();
            changed
        })
    }

    /// Applies `change` to node `id`'s record with compare-and-swap, retrying
    /// on conflicts. `change` returns whether it changed anything. The node's
    /// current revision, or `None` if it no longer exists.
    fn update(
        &self,
        id: NodeId,
        change: impl Fn(&mut NodeRecord) -> bool,
    ) -> Result<Option<u64>, AdmitError> {
        for _ in 0..MAX_ATTEMPTS {
            let path = node_path(id);
            let Some((mut record, rev)) = store::get_json::<NodeRecord>(&*self.store, &path)?
            else {
                return Ok(None);
            };
            if !change(&mut record) {
                return Ok(Some(rev));
            }
            let op = Op::Put(path.clone(), store::encode(&record)?);
            match self.store.txn(&[Compare::ModRevision(path, rev)], &[op]) {
                Ok(rev) => return Ok(Some(rev)),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict.into())
    }

    /// The node an administrator named: `arg` is its id (`n7`) or its name,
    /// or says which with `id:n7` or `name:web`. An argument that is one
    /// node's id and another's name is refused as ambiguous, never guessed.
    pub(crate) fn find(&self, arg: &str) -> Result<NodeRecord, DeleteError> {
        let not_found = || DeleteError::NotFound(arg.to_owned());
        let by_id = |text: &str| -> Result<Option<NodeRecord>, StoreError> {
            let Some(id) = ids::parse(text) else {
                return Ok(None);
            };
            Ok(store::get_json::<NodeRecord>(&*self.store, &node_path(id))?.map(|(r, _)| r))
        };
        let by_name = |name: &str| -> Result<Option<NodeRecord>, StoreError> {
            let Some((id, _)) = store::get_json::<NodeId>(&*self.store, &name_path(name))? else {
                return Ok(None);
            };
            Ok(store::get_json::<NodeRecord>(&*self.store, &node_path(id))?.map(|(r, _)| r))
        };
        if let Some(id) = arg.strip_prefix("id:") {
            return by_id(id)?.ok_or_else(not_found);
        }
        if let Some(name) = arg.strip_prefix("name:") {
            return by_name(name)?.ok_or_else(not_found);
        }
        match (by_id(arg)?, by_name(arg)?) {
            (Some(a), Some(b)) if a.id != b.id => Err(DeleteError::Ambiguous {
                arg: arg.to_owned(),
                by_id: a.id,
                by_id_name: a.name,
                by_name: b.id,
            }),
            (Some(record), _) | (None, Some(record)) => Ok(record),
            (None, None) => Err(not_found()),
        }
    }

    /// Ends the login of the node `arg` names (see [`Registry::find`]) at
    /// `now`: its peers drop it and it must log in again (`weft login`).
    pub(crate) fn expire_by(&self, arg: &str, now: SystemTime) -> Result<NodeRecord, DeleteError> {
        let id = self.find(arg)?.id;
        self.expire(id, authkey::unix_secs(now))
            .map_err(|e| DeleteError::Store(into_store_error(e)))?;
        match store::get_json::<NodeRecord>(&*self.store, &node_path(id))? {
            Some((record, _)) => Ok(record),
            None => Err(DeleteError::NotFound(arg.to_owned())),
        }
    }

    /// Disables user `email` and ends the login of every node of theirs.
    /// The nodes whose login was ended.
    pub(crate) fn disable_user(
        &self,
        email: &str,
        now: SystemTime,
    ) -> Result<Vec<NodeRecord>, StoreError> {
        users::set_disabled(&*self.store, email, true)?;
        let email = canonical::email(email.trim());
        let mut cut = Vec::new();
        for (record, _) in self.nodes()? {
            if record.identity.user.as_deref() == Some(&*email) {
                self.expire(record.id, authkey::unix_secs(now))
                    .map_err(into_store_error)?;
                cut.push(record);
            }
        }
        Ok(cut)
    }

    /// Sets node `id`'s key expiry to `at` (Unix seconds) unless it is earlier already.
    fn expire(&self, id: NodeId, at: u64) -> Result<Option<u64>, AdmitError> {
        self.update(id, |record| {
            if record.key_expiry.is_some_and(|e| e <= at) {
                return false;
            }
            record.key_expiry = Some(at);
            true
        })
    }

    /// Deletes the node `arg` names (see [`Registry::find`]).
    pub(crate) fn delete_by(&self, arg: &str) -> Result<NodeRecord, DeleteError> {
        for _ in 0..MAX_ATTEMPTS {
            let id = self.find(arg)?.id;
            match self.delete(id) {
                Ok(Some(record)) => return Ok(record),
                Ok(None) | Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict.into())
    }

    /// Deletes node `id` and frees its name, address and machine key.
    /// `Ok(None)` when it does not exist.
    pub(crate) fn delete(&self, id: NodeId) -> Result<Option<NodeRecord>, StoreError> {
        self.delete_if(id, &[])
    }

    /// Deletes node `id` like [`Registry::delete`], provided `guards` hold
    /// too (a leader's fence, say); [`StoreError::Conflict`] otherwise.
    pub(crate) fn delete_if(
        &self,
        id: NodeId,
        guards: &[Compare],
    ) -> Result<Option<NodeRecord>, StoreError> {
        let path = node_path(id);
        let Some((record, rev)) = store::get_json::<NodeRecord>(&*self.store, &path)? else {
            return Ok(None);
        };
        let ops = [
            Op::Delete(path.clone()),
            Op::Delete(machine_path(&record.machine_key)),
            Op::Delete(node_key_path(&record.node_key)),
            Op::Delete(name_path(&record.name)),
            Op::Delete(ipv4_path(record.ipv4)),
        ];
        let mut compares = vec![Compare::ModRevision(path, rev)];
        compares.extend_from_slice(guards);
        self.store.txn(&compares, &ops)?;
        Ok(Some(record))
    }

    /// Every node, with the revision of its record.
    pub(crate) fn nodes(&self) -> Result<Vec<(NodeRecord, u64)>, StoreError> {
        self.store
            .list(NODES_PREFIX)?
            .into_iter()
            .map(|(key, v)| store::decode(&key, &v.value).map(|r| (r, v.mod_revision)))
            .collect()
    }

    /// Refuses a WireGuard key another node holds.
    fn check_node_key_free(&self, key: &PublicKey) -> Result<(), AdmitError> {
        if self.store.get(&node_key_path(key))?.is_some() {
            return Err(bad_request(
                "this WireGuard key belongs to another node; every node needs its own key \
                 (remove node.key from the state directory to generate one)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn rejoin(
        &self,
        id: NodeId,
        request: &Register,
        login: Option<&Login>,
        now: SystemTime,
    ) -> Result<(NodeRecord, u64), AdmitError> {
        let path = node_path(id);
        let Some((mut record, rev)) = store::get_json::<NodeRecord>(&*self.store, &path)? else {
            // The machine key points at a node being deleted right now.
            return Err(StoreError::Conflict.into());
        };
        match login {
            Some(login) => {
                record.identity = login.identity();
                record.key_expiry = Some(login.key_expiry());
                record.ephemeral = login.ephemeral();
            }
            None => {
                if let Some(user) = &record.identity.user {
                    users::check_enabled(&*self.store, user)?;
                }
                if record.is_expired(authkey::unix_secs(now)) {
                    return Err(AdmitError::Refused(match record.identity.workload {
                        Some(_) => workload_key_expired(),
                        None => key_expired(),
                    }));
                }
            }
        }
        let mut compares = vec![Compare::ModRevision(path.clone(), rev)];
        let mut ops = Vec::new();
        if request.node_key != record.node_key {
            self.check_node_key_free(&request.node_key)?;
            compares.push(Compare::Absent(node_key_path(&request.node_key)));
            ops.push(Op::Delete(node_key_path(&record.node_key)));
            ops.push(Op::Put(
                node_key_path(&request.node_key),
                store::encode(&id)?,
            ));
        }
        record.node_key = request.node_key;
        record.endpoints = request.endpoints.clone();
        record.home_relay = request.home_relay.clone();
        record.attributes = request.attributes.clone();
        ops.push(Op::Put(path, store::encode(&record)?));
        let rev_now = self.store.txn(&compares, &ops)?;
        Ok((record, rev_now))
    }

    fn join(
        &self,
        machine_key: PublicKey,
        request: &Register,
        login: Option<&Login>,
        now: SystemTime,
        reserved: &mut Option<NodeId>,
    ) -> Result<(NodeRecord, u64), AdmitError> {
        let admission = match (login, &request.credential) {
            (Some(_), _) => None,
            (None, Some(Credential::AuthKey(auth_key))) => {
                Some(authkey::admit(&*self.store, auth_key, now)?)
            }
            (None, _) => {
                return Err(AdmitError::Refused(Refusal {
                    code: RefusalCode::AuthKeyRequired,
                    message: "this machine is not a node of the overlay yet; join with `weft up --auth-key KEY` (create a key with `weft-coordinator authkey create`), or log in with `weft up` where the coordinator has an identity provider".into(),
                }))
            }
        };

        self.check_node_key_free(&request.node_key)?;
        let id = match *reserved {
            Some(id) => id,
            None => *reserved.insert(self.ids.take(&*self.store)?),
        };
        // Probes single keys rather than listing every name and address:
        // a registration costs the same with ten nodes or ten thousand.
        // A name that reads as a node id (`n7`) is held by that id, so a log
        // line or a command naming `n7` means one node.
        let name = unique_hostname(
            &sanitize_hostname(&request.hostname)
                .ok_or_else(|| empty_hostname(&request.hostname))?,
            |candidate| {
                Ok(ids::parse(candidate).is_some()
                    || self.store.get(&name_path(candidate))?.is_some())
            },
        )?;
        let ipv4 = free_ipv4(id.0.saturating_sub(1), |candidate| {
            Ok(self.store.get(&ipv4_path(candidate))?.is_some())
        })?;
        let Some(ipv4) = ipv4 else {
            return Err(AdmitError::Refused(Refusal {
                code: RefusalCode::Unavailable,
                message: "the overlay's IPv4 range 100.64.0.0/10 is full; delete unused nodes with `weft-coordinator nodes delete`".into(),
            }));
        };
        let record = NodeRecord {
            id,
            name: name.clone(),
            machine_key,
            node_key: request.node_key,
            ipv4,
            ipv6: ipv6_for(self.ula, ipv4),
            identity: match (login, &admission) {
                (Some(login), _) => login.identity(),
                (None, Some(admission)) => Identity::tagged(admission.record.tags.clone()),
                (None, None) => Identity::default(),
            },
            endpoints: request.endpoints.clone(),
            home_relay: request.home_relay.clone(),
            attributes: request.attributes.clone(),
            created: authkey::unix_secs(now),
            ephemeral: match login {
                Some(login) => login.ephemeral(),
                None => admission.as_ref().is_some_and(|a| a.record.ephemeral),
            },
            key_expiry: login.map(Login::key_expiry),
        };
        let (mut compares, mut ops) = match &admission {
            Some(admission) => admission.consume(id)?,
            None => (Vec::new(), Vec::new()),
        };
        compares.extend([
            Compare::Absent(node_path(id)),
            Compare::Absent(machine_path(&machine_key)),
            Compare::Absent(name_path(&name)),
            Compare::Absent(ipv4_path(ipv4)),
            Compare::Absent(node_key_path(&request.node_key)),
        ]);
        ops.extend([
            Op::Put(machine_path(&machine_key), store::encode(&id)?),
            Op::Put(node_key_path(&request.node_key), store::encode(&id)?),
            Op::Put(name_path(&name), store::encode(&id)?),
            Op::Put(ipv4_path(ipv4), store::encode(&id)?),
            Op::Put(node_path(id), store::encode(&record)?),
        ]);
        let rev = self.store.txn(&compares, &ops)?;
        audit::record(
            &*self.store,
            now,
            Actor::Node { node: id },
            Event::NodeRegistered {
                node: id,
                name: record.name.clone(),
                identity: record.identity.to_string(),
                auth_key: admission.map(|a| a.record.id),
                ephemeral: record.ephemeral,
            },
        );
        Ok((record, rev))
    }
}

/// An update of a record that only stores can fail for storage reasons alone.
fn into_store_error(e: AdmitError) -> StoreError {
    match e {
        AdmitError::Store(e) => e,
        AdmitError::Refused(refusal) => StoreError::Backend(refusal.message),
    }
}

/// Lowercases `raw`, keeps its first DNS label, turns anything outside
/// `[a-z0-9-]` into `-` and cuts it to 63 characters. `None` when nothing is left.
pub(crate) fn sanitize_hostname(raw: &str) -> Option<String> {
    let label = raw.trim().split('.').next().unwrap_or_default();
    let mut out = String::with_capacity(label.len());
    for c in label.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    out.truncate(MAX_HOSTNAME);
    let out = out.trim_end_matches('-').to_owned();
    (!out.is_empty()).then_some(out)
}

/// `base`, or `base-1`, `base-2`, … — the first that no other node holds.
pub(crate) fn unique_hostname(
    base: &str,
    mut held: impl FnMut(&str) -> Result<bool, StoreError>,
) -> Result<String, StoreError> {
    if !held(base)? {
        return Ok(base.to_owned());
    }
    for n in 1u64.. {
        let suffix = format!("-{n}");
        let mut stem: String = base.chars().take(MAX_HOSTNAME - suffix.len()).collect();
        while stem.ends_with('-') {
            stem.pop();
        }
        let candidate = format!("{stem}{suffix}");
        if !held(&candidate)? {
            return Ok(candidate);
        }
    }
    Ok(base.to_owned())
}

/// Host addresses of 100.64.0.0/10 nodes may get: all but those ending in
/// `.0` or `.255` (some stacks treat them as broadcast).
const USABLE_IPV4: u32 = (1 << 22) / 256 * 254;

/// The `n`-th usable address of 100.64.0.0/10, `n < USABLE_IPV4`.
fn nth_ipv4(n: u32) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    Ipv4Addr::from(base + n / 254 * 256 + n % 254 + 1)
}

/// The first usable address `held` says is free, probing from the
/// `hint`-th onward and wrapping around; `None` when the range is full.
/// With the node counter as the hint a new node's first probe is almost
/// always free, so allocation does not scan the addresses already held.
pub(crate) fn free_ipv4(
    hint: u64,
    mut held: impl FnMut(Ipv4Addr) -> Result<bool, StoreError>,
) -> Result<Option<Ipv4Addr>, StoreError> {
    let start = u32::try_from(hint % u64::from(USABLE_IPV4)).unwrap_or(0);
    for i in 0..USABLE_IPV4 {
        let candidate = nth_ipv4((start + i) % USABLE_IPV4);
        if !held(candidate)? {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// A node's IPv6 address: the overlay's ULA /48 with its IPv4 address as the last 32 bits.
pub(crate) fn ipv6_for(ula: Ipv6Net, ipv4: Ipv4Addr) -> Ipv6Addr {
    let prefix = u128::from(ula.network()) & !u128::from(u32::MAX);
    Ipv6Addr::from(prefix | u128::from(u32::from(ipv4)))
}

/// A random RFC 4193 ULA /48: `fd` and 40 random bits.
fn random_ula() -> Ipv6Net {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    bytes[0] = 0xfd;
    rand::rngs::OsRng.fill_bytes(&mut bytes[1..6]);
    Ipv6Net::new(Ipv6Addr::from(bytes), 48).unwrap_or_default()
}

fn validate(request: &Register) -> Result<(), AdmitError> {
    if request.hostname.len() > MAX_REQUESTED_HOSTNAME {
        return Err(bad_request(format!(
            "the requested hostname is {} bytes long; give the node a name of at most {MAX_REQUESTED_HOSTNAME} (e.g. `weft up --hostname web`)",
            request.hostname.len()
        )));
    }
    check_advertisement(&request.endpoints, request.home_relay.as_deref())?;
    check_attributes(&request.attributes)
}

/// Refuses more endpoints than a node may advertise, and a home relay
/// that is not a relay name.
fn check_advertisement(
    endpoints: &[SocketAddr],
    home_relay: Option<&str>,
) -> Result<(), AdmitError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(bad_request(format!(
            "{} endpoints is more than the {MAX_ENDPOINTS} allowed",
            endpoints.len()
        )));
    }
    if home_relay.is_some_and(|name| !crate::config::is_relay_name(name)) {
        return Err(bad_request(
            "the home relay is not a relay name (lowercase letters, digits and dashes); upgrade the node"
                .into(),
        ));
    }
    Ok(())
}

fn empty_hostname(raw: &str) -> AdmitError {
    let raw: String = raw.chars().take(64).collect();
    bad_request(format!(
        "hostname {raw:?} has no usable characters; give the node a name of letters, digits and `-` (e.g. `weft up --hostname web`)"
    ))
}

fn bad_request(message: String) -> AdmitError {
    AdmitError::Refused(Refusal {
        code: RefusalCode::BadRequest,
        message,
    })
}

/// The store key of node `id`'s record; zero-padded so keys sort by id.
pub(crate) fn node_path(id: NodeId) -> String {
    format!("{NODES_PREFIX}{:020}", id.0)
}

/// The node id in a `nodes/` key.
pub(crate) fn node_id_of(key: &str) -> Option<NodeId> {
    key.strip_prefix(NODES_PREFIX)?.parse().ok().map(NodeId)
}

fn machine_path(key: &PublicKey) -> String {
    let hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("machines/{hex}")
}

/// The index that keeps WireGuard keys unique: a node claiming another's
/// key would receive the handshakes meant for it.
fn node_key_path(key: &PublicKey) -> String {
    let hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("nodekeys/{hex}")
}

fn name_path(name: &str) -> String {
    format!("names/{name}")
}

fn ipv4_path(addr: Ipv4Addr) -> String {
    format!("ipv4/{addr}")
}

/// Refuses attribute sets that are too large to store or evaluate.
fn check_attributes(attributes: &BTreeMap<String, String>) -> Result<(), AdmitError> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(bad_request(format!(
            "{} attributes is more than the {MAX_ATTRIBUTES} allowed",
            attributes.len()
        )));
    }
    if let Some((key, _)) = attributes
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_ATTRIBUTE_LEN || v.len() > MAX_ATTRIBUTE_LEN)
    {
        let shown: String = key.chars().take(40).collect();
        return Err(bad_request(format!(
            "attribute {shown:?} has an empty or over-long key or value (at most {MAX_ATTRIBUTE_LEN} bytes each)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use weft_proto::{AuthKey, PrivateKey};

    use super::*;
    use crate::authkey::AuthKeySpec;
    use crate::store::RedbStore;

    fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("weft.redb")).unwrap());
        (dir, Registry::open(store).unwrap())
    }

    fn key(registry: &Registry, reusable: bool) -> AuthKey {
        let spec = AuthKeySpec {
            tags: vec!["tag:web".into()],
            reusable,
            ephemeral: false,
            expiry: std::time::Duration::from_secs(60),
        };
        authkey::create(&**registry.store(), &spec, SystemTime::now())
            .unwrap()
            .0
    }

    fn request(hostname: &str, auth_key: Option<AuthKey>) -> Register {
        Register {
            credential: auth_key.map(Credential::AuthKey),
            hostname: hostname.into(),
            node_key: PrivateKey::generate().public_key(),
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            home_relay: None,
            attributes: BTreeMap::new(),
            resume: None,
        }
    }

    fn refusal(err: AdmitError) -> RefusalCode {
        match err {
            AdmitError::Refused(r) => r.code,
            AdmitError::Store(e) => panic!("{e}"),
        }
    }

    #[test]
    fn hostnames_are_sanitized() {
        assert_eq!(
            sanitize_hostname("Web_Server 01.example.com").as_deref(),
            Some("web-server-01")
        );
        assert_eq!(sanitize_hostname("--db--").as_deref(), Some("db"));
        assert_eq!(sanitize_hostname("Ünïcode").as_deref(), Some("n-code"));
        assert_eq!(
            sanitize_hostname(&"x".repeat(100)).map(|s| s.len()),
            Some(63)
        );
        assert_eq!(sanitize_hostname("!!!"), None);
        assert_eq!(sanitize_hostname(""), None);
    }

    #[test]
    fn addresses_follow_the_node_counter_and_skip_broadcast_endings() {
        let none = |_: Ipv4Addr| Ok(false);
        assert_eq!(
            free_ipv4(0, none).unwrap(),
            Some(Ipv4Addr::new(100, 64, 0, 1))
        );
        assert_eq!(
            free_ipv4(253, none).unwrap(),
            Some(Ipv4Addr::new(100, 64, 0, 254))
        );
        assert_eq!(
            free_ipv4(254, none).unwrap(),
            Some(Ipv4Addr::new(100, 64, 1, 1))
        );
        assert_eq!(
            free_ipv4(u64::from(USABLE_IPV4) - 1, none).unwrap(),
            Some(Ipv4Addr::new(100, 127, 255, 254))
        );
        let taken = Ipv4Addr::new(100, 64, 0, 3);
        assert_eq!(
            free_ipv4(2, |a| Ok(a == taken)).unwrap(),
            Some(Ipv4Addr::new(100, 64, 0, 4))
        );
        assert_eq!(free_ipv4(7, |_| Ok(true)).unwrap(), None, "a full range");
    }

    #[test]
    fn hostnames_are_made_unique() {
        let held: BTreeSet<String> = ["web", "web-1"].map(String::from).into();
        let probe = |held: &BTreeSet<String>, base: &str| {
            unique_hostname(base, |c| Ok(held.contains(c))).unwrap()
        };
        assert_eq!(probe(&held, "db"), "db");
        assert_eq!(probe(&held, "web"), "web-2");
        let long = "a".repeat(63);
        let held: BTreeSet<String> = [long.clone()].into();
        let unique = probe(&held, &long);
        assert_eq!(unique.len(), 63);
        assert!(unique.ends_with("-1"));
    }

    #[test]
    fn ipv6_carries_the_ipv4_in_the_ula() {
        let ula: Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
        assert_eq!(
            ipv6_for(ula, Ipv4Addr::new(100, 64, 0, 7)),
            "fd12:3456:789a::6440:7".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn a_node_cannot_claim_another_nodes_wireguard_key() {
        let (_dir, registry) = open();
        let auth = key(&registry, true);
        let first = request("web", Some(auth.clone()));
        registry
            .register(
                PrivateKey::generate().public_key(),
                &first,
                SystemTime::now(),
            )
            .unwrap();

        let mut copycat = request("evil", Some(auth.clone()));
        copycat.node_key = first.node_key;
        let refused = registry
            .register(
                PrivateKey::generate().public_key(),
                &copycat,
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(
            matches!(refused, AdmitError::Refused(ref r) if r.code == RefusalCode::BadRequest),
            "{refused:?}"
        );

        // Nor by rotating into it on rejoin.
        let machine = PrivateKey::generate().public_key();
        let other = request("db", Some(auth));
        registry
            .register(machine, &other, SystemTime::now())
            .unwrap();
        let mut rotate = request("db", None);
        rotate.node_key = first.node_key;
        assert!(registry
            .register(machine, &rotate, SystemTime::now())
            .is_err());
        // Its own fresh key is fine.
        registry
            .register(machine, &request("db", None), SystemTime::now())
            .unwrap();
    }

    #[test]
    fn registration_assigns_unique_names_and_addresses() {
        let (_dir, registry) = open();
        let key = key(&registry, true);
        let mut seen = BTreeSet::new();
        for expect in ["web", "web-1", "web-2"] {
            let machine = PrivateKey::generate().public_key();
            let (node, _) = registry
                .register(
                    machine,
                    &request("web", Some(key.clone())),
                    SystemTime::now(),
                )
                .unwrap();
            assert_eq!(node.name, expect);
            assert_eq!(node.identity.tags, ["tag:web"]);
            assert!(seen.insert(node.ipv4));
            assert!(registry.ula.contains(&node.ipv6));
        }
        assert_eq!(seen.first(), Some(&Ipv4Addr::new(100, 64, 0, 1)));
    }

    #[test]
    fn a_known_machine_rejoins_as_the_same_node_without_a_key() {
        let (_dir, registry) = open();
        let machine = PrivateKey::generate().public_key();
        let (first, _) = registry
            .register(
                machine,
                &request("db", Some(key(&registry, false))),
                SystemTime::now(),
            )
            .unwrap();
        let again = request("other-name", None);
        let (second, _) = registry
            .register(machine, &again, SystemTime::now())
            .unwrap();
        assert_eq!(
            (second.id, &second.name, second.ipv4, second.ipv6),
            (first.id, &first.name, first.ipv4, first.ipv6)
        );
        assert_eq!(second.node_key, again.node_key);
        let stranger = PrivateKey::generate().public_key();
        assert_eq!(
            refusal(
                registry
                    .register(stranger, &request("x", None), SystemTime::now())
                    .unwrap_err()
            ),
            RefusalCode::AuthKeyRequired
        );
    }

    #[test]
    fn addresses_are_not_reused_soon_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.redb");
        let machine = PrivateKey::generate().public_key();
        let (kept, deleted) = {
            let registry = Registry::open(Arc::new(RedbStore::open(&path).unwrap())).unwrap();
            let key = key(&registry, true);
            let (a, _) = registry
                .register(
                    PrivateKey::generate().public_key(),
                    &request("a", Some(key.clone())),
                    SystemTime::now(),
                )
                .unwrap();
            let (b, _) = registry
                .register(machine, &request("b", Some(key.clone())), SystemTime::now())
                .unwrap();
            registry.delete_by("a").unwrap();
            (b, a)
        };
        let registry = Registry::open(Arc::new(RedbStore::open(&path).unwrap())).unwrap();
        let (rejoined, _) = registry
            .register(machine, &request("b", None), SystemTime::now())
            .unwrap();
        assert_eq!(
            (rejoined.ipv4, rejoined.ipv6, rejoined.id),
            (kept.ipv4, kept.ipv6, kept.id)
        );
        let key = key(&registry, true);
        let (c, _) = registry
            .register(
                PrivateKey::generate().public_key(),
                &request("c", Some(key)),
                SystemTime::now(),
            )
            .unwrap();
        assert_ne!(c.ipv4, kept.ipv4);
        // A freed address is free, but new nodes take fresh ones first, so
        // an address does not name another node soon after (caches,
        // connection tables and logs elsewhere may still mention it).
        assert!(registry
            .store
            .get(&ipv4_path(deleted.ipv4))
            .unwrap()
            .is_none());
        assert_ne!(c.ipv4, deleted.ipv4);
        assert!(
            c.ipv4 > kept.ipv4,
            "a fresh address, past every one held: {}",
            c.ipv4
        );
        assert!(c.id.0 > kept.id.0, "node ids are never reused");
    }

    #[test]
    fn deleting_an_unknown_node_names_it() {
        let (_dir, registry) = open();
        let err = registry.delete_by("ghost").unwrap_err();
        assert!(matches!(err, DeleteError::NotFound(_)));
        assert!(err.to_string().contains("ghost"));
    }

    /// A node asking for a hostname that is another node's id: an
    /// administrator naming that id must reach the node with the id.
    #[test]
    fn a_hostname_that_is_another_nodes_id_does_not_take_its_place() {
        let (_dir, registry) = open();
        let auth = key(&registry, true);
        let (first, _) = registry
            .register(
                PrivateKey::generate().public_key(),
                &request("web", Some(auth.clone())),
                SystemTime::now(),
            )
            .unwrap();
        let (second, _) = registry
            .register(
                PrivateKey::generate().public_key(),
                &request(&first.id.to_string(), Some(auth)),
                SystemTime::now(),
            )
            .unwrap();
        assert_ne!(second.name, first.id.to_string());
        let deleted = registry.delete_by(&first.id.to_string()).unwrap();
        assert_eq!(deleted.id, first.id);
        let left: Vec<NodeId> = registry
            .nodes()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.id)
            .collect();
        assert_eq!(left, [second.id]);
    }

    /// A node named like another's id before such names were refused:
    /// the bare argument is refused with both candidates, and `id:` or
    /// `name:` picks one.
    #[test]
    fn an_argument_that_is_one_nodes_id_and_another_nodes_name_is_ambiguous() {
        let (_dir, registry) = open();
        let auth = key(&registry, true);
        let mut nodes = (0..2).map(|i| {
            registry
                .register(
                    PrivateKey::generate().public_key(),
                    &request(&format!("web{i}"), Some(auth.clone())),
                    SystemTime::now(),
                )
                .unwrap()
                .0
        });
        let (first, mut second) = (nodes.next().unwrap(), nodes.next().unwrap());
        let old_name = std::mem::replace(&mut second.name, first.id.to_string());
        let ops = [
            Op::Delete(name_path(&old_name)),
            Op::Put(name_path(&second.name), store::encode(&second.id).unwrap()),
            Op::Put(node_path(second.id), store::encode(&second).unwrap()),
        ];
        registry.store.txn(&[], &ops).unwrap();

        let arg = first.id.to_string();
        let err = registry.delete_by(&arg).unwrap_err();
        assert!(matches!(err, DeleteError::Ambiguous { .. }), "{err:?}");
        let text = err.to_string();
        for expected in [
            first.id.to_string(),
            first.name.clone(),
            second.id.to_string(),
            format!("id:{arg}"),
            format!("name:{arg}"),
        ] {
            assert!(text.contains(&expected), "{expected} in {text}");
        }
        assert_eq!(registry.nodes().unwrap().len(), 2, "nothing deleted");
        assert_eq!(registry.find(&format!("id:{arg}")).unwrap().id, first.id);
        assert_eq!(registry.find(&format!("name:{arg}")).unwrap().id, second.id);
        assert_eq!(registry.delete_by(&first.name).unwrap().id, first.id);
        assert_eq!(registry.find(&arg).unwrap().id, second.id);
        assert!(matches!(
            registry.find("id:n999"),
            Err(DeleteError::NotFound(_))
        ));
    }

    #[test]
    fn concurrent_registrations_with_one_single_use_key_admit_exactly_one() {
        let (_dir, registry) = open();
        let key = key(&registry, false);
        let outcomes: Vec<Result<NodeRecord, RefusalCode>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12)
                .map(|i| {
                    let registry = registry.clone();
                    let key = key.clone();
                    s.spawn(move || {
                        let machine = PrivateKey::generate().public_key();
                        registry
                            .register(
                                machine,
                                &request(&format!("n{i}"), Some(key)),
                                SystemTime::now(),
                            )
                            .map(|(n, _)| n)
                            .map_err(refusal)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1);
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, Ok(_) | Err(RefusalCode::AuthKeyUsed))));
        assert_eq!(registry.nodes().unwrap().len(), 1);
    }

    /// Two coordinators on one store register concurrently: their id
    /// allocators know nothing of each other, yet no id, name or address
    /// is shared.
    #[test]
    fn concurrent_registrations_through_two_coordinators_share_nothing() {
        let (_dir, first) = open();
        let second = Registry::open(Arc::clone(first.store())).unwrap();
        let key = key(&first, true);
        let nodes: Vec<NodeRecord> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let registry = if i % 2 == 0 { &first } else { &second };
                    let key = key.clone();
                    s.spawn(move || {
                        let machine = PrivateKey::generate().public_key();
                        registry
                            .register(machine, &request("web", Some(key)), SystemTime::now())
                            .unwrap()
                            .0
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ids: BTreeSet<NodeId> = nodes.iter().map(|n| n.id).collect();
        let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let addresses: BTreeSet<Ipv4Addr> = nodes.iter().map(|n| n.ipv4).collect();
        assert_eq!((ids.len(), names.len(), addresses.len()), (16, 16, 16));
        assert_eq!(first.nodes().unwrap().len(), 16);
    }

    #[test]
    fn oversized_requests_are_refused() {
        let (_dir, registry) = open();
        let mut req = request("x", Some(key(&registry, true)));
        req.endpoints = vec!["192.0.2.1:1".parse().unwrap(); MAX_ENDPOINTS + 1];
        let machine = PrivateKey::generate().public_key();
        assert_eq!(
            refusal(
                registry
                    .register(machine, &req, SystemTime::now())
                    .unwrap_err()
            ),
            RefusalCode::BadRequest
        );
        let req = request("***", Some(key(&registry, true)));
        assert_eq!(
            refusal(
                registry
                    .register(machine, &req, SystemTime::now())
                    .unwrap_err()
            ),
            RefusalCode::BadRequest
        );
    }

    fn workload(sa: &str, key_expiry: u64) -> Login {
        Login::Workload(WorkloadLogin {
            identity: Identity {
                workload: Some(format!("spiffe://cluster.local/ns/payments/sa/{sa}")),
                tags: vec!["tag:k8s".into()],
                user: None,
                groups: Vec::new(),
            },
            key_expiry,
            ephemeral: true,
        })
    }

    #[test]
    fn a_workload_token_joins_and_rotates_its_node_key_by_rejoining() {
        let (_dir, registry) = open();
        let now = SystemTime::now();
        let in_an_hour = authkey::unix_secs(now) + 3600;
        let machine = PrivateKey::generate().public_key();
        let mut token_request = request("api-7d9f", None);
        token_request.credential = Some(Credential::IdentityToken(weft_proto::IdentityToken::new(
            "verified elsewhere",
        )));
        let (first, _) = registry
            .register_as(
                machine,
                &token_request,
                Some(&workload("api", in_an_hour)),
                now,
            )
            .unwrap();
        assert_eq!(
            first.identity.workload.as_deref(),
            Some("spiffe://cluster.local/ns/payments/sa/api")
        );
        assert_eq!(first.identity.tags, ["tag:k8s"]);
        assert_eq!(first.key_expiry, Some(in_an_hour));
        assert_eq!(first.self_node().key_expiry, Some(in_an_hour));
        assert!(first.ephemeral);

        // Rotation: a fresh token and a new node key on a new session.
        let mut rotated = token_request.clone();
        rotated.node_key = PrivateKey::generate().public_key();
        let later = in_an_hour + 1800;
        let (second, _) = registry
            .register_as(machine, &rotated, Some(&workload("api", later)), now)
            .unwrap();
        assert_eq!(
            (second.id, &second.name, second.ipv4, second.ipv6),
            (first.id, &first.name, first.ipv4, first.ipv6)
        );
        assert_eq!(second.node_key, rotated.node_key);
        assert_eq!(second.key_expiry, Some(later));
        // The old node key is free again; the new one is taken.
        let other = PrivateKey::generate().public_key();
        let mut reuse_old = token_request.clone();
        reuse_old.hostname = "other".into();
        registry
            .register_as(other, &reuse_old, Some(&workload("web", later)), now)
            .unwrap();
        let mut steal_new = rotated.clone();
        steal_new.hostname = "thief".into();
        let thief = PrivateKey::generate().public_key();
        assert_eq!(
            refusal(
                registry
                    .register_as(thief, &steal_new, Some(&workload("x", later)), now)
                    .unwrap_err()
            ),
            RefusalCode::BadRequest
        );
    }

    #[test]
    fn a_workload_node_without_a_token_rejoins_until_its_key_expires() {
        let (_dir, registry) = open();
        let now = SystemTime::now();
        let machine = PrivateKey::generate().public_key();
        let expiry = authkey::unix_secs(now) + 60;
        registry
            .register_as(
                machine,
                &request("api", None),
                Some(&workload("api", expiry)),
                now,
            )
            .unwrap();
        let (again, _) = registry
            .register(machine, &request("api", None), now)
            .unwrap();
        assert_eq!(
            again.key_expiry,
            Some(expiry),
            "a plain rejoin keeps the expiry"
        );
        let after = now + std::time::Duration::from_secs(61);
        let err = registry
            .register(machine, &request("api", None), after)
            .unwrap_err();
        let AdmitError::Refused(refused) = err else {
            panic!("{err}")
        };
        assert_eq!(refused.code, RefusalCode::KeyExpired);
        assert!(
            refused.message.contains("fresh token"),
            "{}",
            refused.message
        );
        // A fresh token re-admits it as the same node.
        let (renewed, _) = registry
            .register_as(
                machine,
                &request("api", None),
                Some(&workload("api", expiry + 3600)),
                after,
            )
            .unwrap();
        assert_eq!(renewed.id, again.id);
    }

    #[test]
    fn a_restarted_pod_with_a_fresh_state_dir_joins_as_a_new_node_with_its_identity() {
        let (_dir, registry) = open();
        let now = SystemTime::now();
        let expiry = authkey::unix_secs(now) + 600;
        let (first, _) = registry
            .register_as(
                PrivateKey::generate().public_key(),
                &request("api", None),
                Some(&workload("api", expiry)),
                now,
            )
            .unwrap();
        let (second, _) = registry
            .register_as(
                PrivateKey::generate().public_key(),
                &request("api", None),
                Some(&workload("api", expiry)),
                now,
            )
            .unwrap();
        assert_ne!(first.id, second.id);
        assert_eq!(first.identity, second.identity);
        registry.delete(first.id).unwrap();
        assert!(registry
            .nodes()
            .unwrap()
            .iter()
            .all(|(n, _)| n.id != first.id));
    }

    proptest! {
        #[test]
        fn sanitized_hostnames_are_valid_dns_labels(raw in ".{0,100}") {
            if let Some(name) = sanitize_hostname(&raw) {
                prop_assert!(!name.is_empty() && name.len() <= 63);
                prop_assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
                prop_assert!(!name.starts_with('-') && !name.ends_with('-'));
            }
        }

        #[test]
        fn allocated_addresses_are_free_and_in_range(
            held in proptest::collection::btree_set(0u32..600, 0..200),
            hint in prop_oneof![0u64..700, Just(u64::from(USABLE_IPV4) - 1), any::<u64>()],
        ) {
            let held: BTreeSet<Ipv4Addr> = held.into_iter().map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + n)).collect();
            let addr = free_ipv4(hint, |a| Ok(held.contains(&a))).unwrap().unwrap();
            prop_assert!(!held.contains(&addr));
            prop_assert!("100.64.0.0/10".parse::<ipnet::Ipv4Net>().unwrap().contains(&addr));
            prop_assert!(!matches!(addr.octets()[3], 0 | 255));
        }
    }
}
