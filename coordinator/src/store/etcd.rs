//! The replicated [`Store`] backend: an etcd v3 cluster.
//!
//! Keys are the configured prefix followed by the store key; values are
//! stored as they are. Revisions are etcd's own: a transaction returns the
//! revision etcd gave it, keys carry their etcd `mod_revision`, and
//! `revision()` is the cluster's current revision (which also counts writes
//! other programs make on the same cluster).
//!
//! The trait is synchronous and its callers run on the coordinator's tokio
//! runtime, sometimes on a worker thread. The etcd client is asynchronous, so
//! the store owns a small runtime of its own that runs every request and the
//! watch; a caller hands its request over and waits for the answer on a
//! plain channel (inside `block_in_place` on a multi-threaded runtime, which
//! moves the worker's other tasks elsewhere while it waits). A caller never
//! drives the client on its own thread, so no runtime is ever nested, and
//! every request is bounded by the configured request timeout: a cluster that
//! is down is a clear [`StoreError::Backend`] (or [`StoreError::Io`], with
//! etcd's error as the cause), never a hang.
//!
//! Transactions submitted while another is being committed are committed
//! together as one request when it returns (see `group`), so concurrent
//! registrations share etcd's disk syncs instead of queueing for one each.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions,
    Identity, KeyValue, KvClient, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::sync::broadcast;

use super::{
    Compare, LeaseId, Notice, Op, Store, StoreError, Versioned, Watch, WatchError, WatchEvent,
};
use crate::config::EtcdSettings;

mod group;

const WATCH_CAPACITY: usize = 4096;
/// Keys per range request when listing: bounded responses, however many nodes.
const LIST_PAGE: i64 = 500;
/// A page of records, each up to etcd's 1.5 MiB request limit, must decode.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Reconnection backoff of the watch.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(50);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(1);
/// HTTP/2 pings find a connection to a vanished member; etcd refuses pings
/// more often than every 5 s.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] in etcd. Opening it checks that the cluster answers; from then
/// on one etcd watch over the prefix feeds every [`Watch`], resuming after
/// the last revision it delivered whenever the stream breaks.
///
/// Each member has a client of its own: a request goes to the member that
/// last answered and moves on to the next when that one is unreachable,
/// all within the request timeout. (One client balancing over every member
/// would keep sending some requests to a dead member until they time out.)
/// Retrying elsewhere is safe because every write weft makes is either
/// guarded by compares, which then fail, or writes whole values again.
pub(crate) struct EtcdStore {
    /// `Some` until drop, which shuts it down without blocking.
    runtime: Option<Runtime>,
    handle: Handle,
    members: Arc<[Member]>,
    /// The member that answered last.
    preferred: AtomicUsize,
    prefix: String,
    /// The endpoints, for error messages.
    cluster: String,
    request_timeout: Duration,
    events: broadcast::Sender<Notice>,
    /// Transactions waiting to be committed together.
    group: group::GroupCommit,
}

/// One etcd member's clients.
#[derive(Clone)]
struct Member {
    endpoint: String,
    /// For the watch.
    client: Client,
    /// For reads and transactions, with room for large pages.
    kv: KvClient,
}

impl EtcdStore {
    /// Connects to the cluster and starts following the prefix.
    pub(crate) fn connect(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let cluster = settings.endpoints.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("cannot start the etcd client", e))?;
        let handle = runtime.handle().clone();
        let options = connect_options(settings);
        let mut members = Vec::with_capacity(settings.endpoints.len());
        let mut failure = None;
        for endpoint in &settings.endpoints {
            let (url, options) = (endpoint.clone(), options.clone());
            // Connecting is lazy unless the client must authenticate first.
            let connected = run(&handle, settings.dial_timeout, async move {
                Client::connect([url], Some(options)).await
            });
            match connected {
                Ok(client) => members.push(Member {
                    endpoint: endpoint.clone(),
                    kv: client
                        .kv_client()
                        .max_decoding_message_size(MAX_RESPONSE_BYTES),
                    client,
                }),
                Err(e) => {
                    tracing::warn!(%endpoint, "cannot connect to this etcd member: {e:?}");
                    failure = Some(e);
                }
            }
        }
        if members.is_empty() {
            let failure = failure.unwrap_or(Failure::Unreachable {
                detail: "no endpoints".into(),
                cause: None,
            });
            return Err(failure.into_error(&cluster));
        }
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        let store = Self {
            runtime: Some(runtime),
            handle,
            members: members.into(),
            preferred: AtomicUsize::new(0),
            prefix: settings.prefix.clone(),
            cluster,
            request_timeout: settings.request_timeout,
            events,
            group: group::GroupCommit::default(),
        };
        let start = store.revision()?;
        store.handle.spawn(follow(
            Arc::clone(&store.members),
            store.prefix.clone(),
            start.saturating_add(1),
            store.events.clone(),
        ));
        tracing::info!(endpoints = %store.cluster, prefix = %store.prefix, revision = start, "using etcd");
        Ok(store)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one request on the store's runtime, bounded by the request timeout.
    fn call<T, F>(&self, request: impl Fn(KvClient) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        self.call_raw(request)
            .map_err(|f| f.into_error(&self.cluster))
    }

    fn call_raw<T, F>(&self, request: impl Fn(KvClient) -> F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        self.call_member(|member| request(member.kv.clone()))
    }

    /// Tries the members in turn, from the one that answered last, giving
    /// each an equal share of what is left of the request timeout.
    fn call_member<T, F>(&self, request: impl Fn(&Member) -> F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let count = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let deadline = Instant::now() + self.request_timeout;
        let mut last = Failure::Unreachable {
            detail: "no endpoints".into(),
            cause: None,
        };
        for step in 0..count {
            let index = (first + step) % count;
            let left = deadline.saturating_duration_since(Instant::now());
            let share = u32::try_from(count - step).unwrap_or(u32::MAX);
            let Some(attempt) = left.checked_div(share).filter(|d| !d.is_zero()) else {
                break;
            };
            match run(&self.handle, attempt, request(&self.members[index])) {
                Ok(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(Failure::Unreachable { detail, cause }) => {
                    let endpoint = &self.members[index].endpoint;
                    tracing::debug!(%endpoint, %detail, "etcd member unreachable; trying the next");
                    last = Failure::Unreachable { detail, cause };
                }
                Err(other) => return Err(other),
            }
        }
        Err(last)
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a runtime thread must not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let full = self.key(key);
        let response = self.call(|mut c| {
            let full = full.clone();
            async move { c.get(full, None).await }
        })?;
        response
            .kvs()
            .first()
            .map(|kv| versioned(key, kv))
            .transpose()
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let start = self.key(prefix).into_bytes();
        let end = prefix_end(&start);
        let mut from = start;
        let mut at_revision = 0;
        let mut out = Vec::new();
        loop {
            // Later pages read at the first page's revision: one consistent view.
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE)
                .with_revision(at_revision);
            let response = self.call(|mut c| {
                let (from, options) = (from.clone(), options.clone());
                async move { c.get(from, Some(options)).await }
            })?;
            if at_revision == 0 {
                at_revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                let key = self.strip(kv.key())?;
                out.push((key.clone(), versioned(&key, kv)?));
            }
            let Some(last) = response.kvs().last() else {
                break;
            };
            if !response.more() {
                break;
            }
            from = last.key().to_vec();
            from.push(0);
        }
        Ok(out)
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<u64, StoreError> {
        let txn = group::Txn {
            compares: compares.to_vec(),
            ops: ops.to_vec(),
        };
        self.group
            .submit(txn, &|batch: &[&group::Txn]| self.commit_batch(batch))
    }

    fn watch(&self, prefix: &str) -> Watch {
        Watch::new(prefix, self.events.subscribe())
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let probe = self.prefix.clone();
        let options = GetOptions::new().with_count_only();
        let response = self.call(|mut c| {
            let (probe, options) = (probe.clone(), options.clone());
            async move { c.get(probe, Some(options)).await }
        })?;
        header_revision(response.header().map(|h| h.revision()))
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = self.call_member(|member| {
            let mut lease = member.client.lease_client();
            async move { lease.grant(seconds, None).await }
        });
        Ok(LeaseId(
            granted.map_err(|f| f.into_error(&self.cluster))?.id(),
        ))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        // Opening the keep-alive stream sends the first renewal and waits
        // for its answer, which is all a periodic renewal needs.
        let renewed = self.call_member(|member| {
            let mut client = member.client.lease_client();
            async move { client.keep_alive(lease.0).await.map(drop) }
        });
        match renewed {
            Ok(()) => Ok(true),
            Err(Failure::Refused { detail, .. }) if detail.contains("lease not found") => Ok(false),
            Err(f) => Err(f.into_error(&self.cluster)),
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let revoked = self.call_member(|member| {
            let mut client = member.client.lease_client();
            async move { client.revoke(lease.0).await }
        });
        match revoked {
            Ok(_) => Ok(()),
            // Expired already: its keys are gone, which is what revoking wants.
            Err(Failure::Refused { detail, .. }) if detail.contains("lease not found") => Ok(()),
            Err(f) => Err(f.into_error(&self.cluster)),
        }
    }
}

impl EtcdStore {
    /// Commits a batch of transactions with disjoint keys as one etcd
    /// request: each is nested in it with its own compares, so each
    /// succeeds or conflicts on its own, and all that succeed share the
    /// request's revision. If etcd refuses the batch (an expired lease in
    /// one of them, a limit), each is committed on its own for its own answer.
    fn commit_batch(&self, batch: &[&group::Txn]) -> Vec<Result<u64, StoreError>> {
        if let [only] = batch {
            return vec![self.commit_one(only)];
        }
        // `None` for those sent; those that cannot hold are answered now.
        let mut answered = Vec::with_capacity(batch.len());
        let mut nested = Vec::with_capacity(batch.len());
        for txn in batch {
            match self.etcd_txn(&txn.compares, &txn.ops) {
                Ok(txn) => {
                    nested.push(TxnOp::txn(txn));
                    answered.push(None);
                }
                Err(e) => answered.push(Some(Err(e))),
            }
        }
        if nested.is_empty() {
            return answered.into_iter().flatten().collect();
        }
        let request = Txn::new().and_then(nested);
        let response = self.call_raw(|mut c| {
            let request = request.clone();
            async move { c.txn(request).await }
        });
        match response {
            Ok(response) => {
                let revision = response.header().map(|h| h.revision());
                let mut replies = response.op_responses().into_iter();
                answered
                    .into_iter()
                    .map(|answer| {
                        answer.unwrap_or_else(|| match replies.next() {
                            Some(TxnOpResponse::Txn(reply)) if reply.succeeded() => {
                                header_revision(revision)
                            }
                            Some(TxnOpResponse::Txn(_)) => Err(StoreError::Conflict),
                            _ => Err(StoreError::Backend(
                                "etcd answered a batch of transactions with something else".into(),
                            )),
                        })
                    })
                    .collect()
            }
            Err(Failure::Refused { detail: reason, .. }) => {
                tracing::debug!(%reason, transactions = batch.len(), "etcd refused a batch; committing its transactions one by one");
                batch
                    .iter()
                    .zip(answered)
                    .map(|(txn, answer)| answer.unwrap_or_else(|| self.commit_one(txn)))
                    .collect()
            }
            Err(failure) => answered
                .into_iter()
                .map(|answer| {
                    answer.unwrap_or_else(|| Err(failure.clone().into_error(&self.cluster)))
                })
                .collect(),
        }
    }

    /// Commits one transaction as a request of its own.
    fn commit_one(&self, txn: &group::Txn) -> Result<u64, StoreError> {
        let (compares, ops, size) = (&txn.compares, &txn.ops, txn.bytes());
        let txn = self.etcd_txn(compares, ops)?;
        let response = self
            .call_raw(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .map_err(|f| match f {
                Failure::Refused { detail, .. } if detail.contains("lease not found") => {
                    StoreError::LeaseExpired
                }
                Failure::Refused { detail, cause } => caused(
                    format!(
                        "etcd at {} refused a transaction of {} compares, {} operations and \
                         {size} bytes: {detail} (etcd accepts 128 operations and 1.5 MiB per \
                         transaction unless started with larger --max-txn-ops and \
                         --max-request-bytes)",
                        self.cluster,
                        compares.len(),
                        ops.len()
                    ),
                    cause,
                ),
                other => other.into_error(&self.cluster),
            })?;
        if !response.succeeded() {
            return Err(StoreError::Conflict);
        }
        header_revision(response.header().map(|h| h.revision()))
    }

    /// The etcd transaction for `compares` and `ops`.
    fn etcd_txn(&self, compares: &[Compare], ops: &[Op]) -> Result<Txn, StoreError> {
        let mut when = Vec::with_capacity(compares.len());
        for compare in compares {
            when.push(match compare {
                Compare::Absent(key) => {
                    EtcdCompare::create_revision(self.key(key), CompareOp::Equal, 0)
                }
                Compare::ModRevision(key, revision) => {
                    // No key was ever written at revision 0 (or beyond i64): the
                    // compare cannot hold, so the transaction cannot either.
                    match i64::try_from(*revision) {
                        Ok(r) if r > 0 => {
                            EtcdCompare::mod_revision(self.key(key), CompareOp::Equal, r)
                        }
                        _ => return Err(StoreError::Conflict),
                    }
                }
            });
        }
        let then: Vec<TxnOp> = last_op_per_key(ops)
            .into_iter()
            .map(|op| match op {
                Op::Put(key, value) => TxnOp::put(self.key(key), value.clone(), None),
                Op::PutLeased(key, value, lease) => TxnOp::put(
                    self.key(key),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease.0)),
                ),
                Op::Delete(key) => TxnOp::delete(self.key(key), None),
            })
            .collect();
        Ok(Txn::new().when(when).and_then(then))
    }

    fn strip(&self, key: &[u8]) -> Result<String, StoreError> {
        let lossy = || String::from_utf8_lossy(key).into_owned();
        let Some(rest) = key.strip_prefix(self.prefix.as_bytes()) else {
            return Err(StoreError::Corrupt {
                key: lossy(),
                reason: format!("etcd returned a key outside the prefix {}", self.prefix),
                source: None,
            });
        };
        String::from_utf8(rest.to_vec()).map_err(|_| StoreError::Corrupt {
            key: lossy(),
            reason: "the key is not UTF-8".into(),
            source: None,
        })
    }
}

fn connect_options(settings: &EtcdSettings) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(settings.dial_timeout)
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        // A member cut off from the others fails requests and watches
        // instead of serving stale state.
        .with_require_leader(true);
    if let Some((name, password)) = &settings.user {
        options = options
            .with_user(name.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(tls) = &settings.tls {
        let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(config);
    }
    options
}

/// Runs `future` on the store's runtime, bounded by `timeout`, and waits for
/// it on the caller's thread (see the module documentation).
fn run<T, F>(handle: &Handle, timeout: Duration, future: F) -> Result<T, Failure>
where
    F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    handle.spawn(async move {
        // The caller may have given up; nothing to do then.
        let _ = tx.send(tokio::time::timeout(timeout, future).await);
    });
    match wait(|| rx.recv()) {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e))) => Err(Failure::from(e)),
        Ok(Err(_)) => Err(Failure::Unreachable {
            detail: format!("no answer within {timeout:?}"),
            cause: None,
        }),
        Err(_) => Err(Failure::Stopped),
    }
}

/// Runs `f`, which blocks, without starving the caller's runtime.
fn wait<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Keeps the last of several operations on one key, in their original
/// order: etcd refuses a transaction that names a key twice, and applying
/// the operations in order leaves the last one's effect.
fn last_op_per_key(ops: &[Op]) -> Vec<&Op> {
    ops.iter()
        .enumerate()
        .filter(|(i, op)| !ops[i + 1..].iter().any(|later| later.key() == op.key()))
        .map(|(_, op)| op)
        .collect()
}

/// The end of the range of keys starting with `prefix`, as etcd expects it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff (or no prefix): to the end of the keyspace.
    vec![0]
}

fn versioned(key: &str, kv: &KeyValue) -> Result<Versioned, StoreError> {
    let mod_revision = u64::try_from(kv.mod_revision()).map_err(|_| StoreError::Corrupt {
        key: key.to_owned(),
        reason: format!("negative mod_revision {}", kv.mod_revision()),
        source: None,
    })?;
    Ok(Versioned {
        value: kv.value().to_vec(),
        mod_revision,
    })
}

fn header_revision(revision: Option<i64>) -> Result<u64, StoreError> {
    revision
        .and_then(|r| u64::try_from(r).ok())
        .filter(|r| *r > 0)
        .ok_or_else(|| StoreError::Backend("etcd answered without a revision".into()))
}

/// Why an etcd request failed.
#[derive(Debug, Clone)]
enum Failure {
    /// No member answered: down, partitioned, or without a leader. `cause`
    /// is etcd's error unless no member was tried or none answered in time.
    Unreachable {
        detail: String,
        cause: Option<Cause>,
    },
    /// etcd answered and refused (limits, permissions, authentication).
    Refused { detail: String, cause: Cause },
    /// The store's runtime is gone.
    Stopped,
}

/// etcd's error, shared: one failed batch answers each of its transactions.
type Cause = Arc<etcd_client::Error>;

impl From<etcd_client::Error> for Failure {
    fn from(e: etcd_client::Error) -> Self {
        use tonic::Code;
        match &e {
            etcd_client::Error::GRpcStatus(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) =>
            {
                Failure::Unreachable {
                    detail: status.message().to_owned(),
                    cause: Some(Arc::new(e)),
                }
            }
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                Failure::Unreachable {
                    detail: e.to_string(),
                    cause: Some(Arc::new(e)),
                }
            }
            etcd_client::Error::GRpcStatus(status) => Failure::Refused {
                detail: status.message().to_owned(),
                cause: Arc::new(e),
            },
            other => Failure::Refused {
                detail: other.to_string(),
                cause: Arc::new(e),
            },
        }
    }
}

impl Failure {
    fn into_error(self, cluster: &str) -> StoreError {
        match self {
            Failure::Unreachable { detail, cause } => {
                let message = format!(
                    "etcd at {cluster} is unreachable: {detail}; the coordinator accepts no changes until it returns"
                );
                match cause {
                    Some(cause) => caused(message, cause),
                    None => StoreError::Backend(message),
                }
            }
            Failure::Refused { detail, cause } => caused(
                format!("etcd at {cluster} refused the request: {detail}"),
                cause,
            ),
            Failure::Stopped => StoreError::Backend("the etcd client has stopped".into()),
        }
    }
}

/// A store error saying `message`, with etcd's error as its cause: the
/// error itself when this failure was its only holder.
fn caused(message: String, cause: Cause) -> StoreError {
    StoreError::Io {
        message,
        source: match Arc::try_unwrap(cause) {
            Ok(cause) => Box::new(cause),
            Err(shared) => Box::new(shared),
        },
    }
}

/// How one etcd watch stream ended.
enum Ended {
    /// The revision to resume from was compacted away; resume from this one.
    Compacted(i64),
    /// The stream broke (member down, leader lost, connection reset).
    Broken(String),
}

/// Follows the prefix from revision `next` for as long as the store lives,
/// publishing changes in revision order and reconnecting after failures.
async fn follow(
    members: Arc<[Member]>,
    prefix: String,
    next: u64,
    events: broadcast::Sender<Notice>,
) {
    let mut next = i64::try_from(next).unwrap_or(i64::MAX);
    let mut retry = WATCH_RETRY_MIN;
    let mut index = 0;
    loop {
        let before = next;
        let Some(member) = members.get(index % members.len().max(1)) else {
            return;
        };
        let mut client = member.client.clone();
        match watch_from(&mut client, &prefix, &mut next, &events).await {
            Ended::Compacted(compacted) => {
                let missed = u64::try_from(compacted - next).unwrap_or(0).max(1);
                tracing::warn!(
                    from = next,
                    compacted,
                    "etcd compacted changes the coordinator had not seen; watchers re-read the state"
                );
                let _ = events.send(Err(WatchError::Lagged(missed)));
                next = compacted;
            }
            Ended::Broken(reason) => {
                if next > before {
                    retry = WATCH_RETRY_MIN;
                }
                tracing::warn!(
                    endpoint = %member.endpoint,
                    %reason,
                    resume_from = next,
                    "etcd watch broke; resuming on the next member"
                );
                index = index.wrapping_add(1);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(WATCH_RETRY_MAX);
            }
        }
    }
}

async fn watch_from(
    client: &mut Client,
    prefix: &str,
    next: &mut i64,
    events: &broadcast::Sender<Notice>,
) -> Ended {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*next)
        .with_progress_notify();
    let mut stream = match client.watch(prefix.as_bytes(), Some(options)).await {
        Ok(stream) => stream,
        Err(e) => return Ended::Broken(e.to_string()),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ended::Broken("etcd ended the watch stream".into()),
            Err(e) => return Ended::Broken(e.to_string()),
        };
        if response.compact_revision() > 0 {
            return Ended::Compacted(response.compact_revision());
        }
        if response.canceled() {
            return Ended::Broken(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            let Some(key) = kv
                .key()
                .strip_prefix(prefix.as_bytes())
                .and_then(|k| std::str::from_utf8(k).ok())
            else {
                tracing::warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    "ignoring an etcd key that is not UTF-8 text under the prefix"
                );
                continue;
            };
            let value = match event.event_type() {
                EventType::Put => Some(kv.value().to_vec()),
                EventType::Delete => None,
            };
            let Ok(revision_u64) = u64::try_from(revision) else {
                continue;
            };
            // No receivers is fine: nobody is watching yet.
            let _ = events.send(Ok(WatchEvent {
                revision: revision_u64,
                key: key.to_owned(),
                value,
            }));
            *next = (*next).max(revision.saturating_add(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use weft_test_etcd::EtcdCluster;

    use super::*;
    use crate::store::conformance::{conformance_suite, next_event, put, Fixture};

    /// A store on its own etcd cluster.
    struct Etcd {
        cluster: EtcdCluster,
    }

    impl Etcd {
        fn single() -> Self {
            Self {
                cluster: EtcdCluster::single().unwrap(),
            }
        }

        fn three() -> Self {
            Self {
                cluster: EtcdCluster::start(3).unwrap(),
            }
        }

        fn settings(&self, endpoints: Vec<String>) -> EtcdSettings {
            EtcdSettings {
                prefix: "/weft-test/".into(),
                dial_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(2),
                ..EtcdSettings::new(endpoints)
            }
        }

        fn connect(&self, endpoints: Vec<String>) -> EtcdStore {
            EtcdStore::connect(&self.settings(endpoints)).unwrap()
        }
    }

    impl Fixture for Etcd {
        fn open(&self) -> Arc<dyn Store> {
            Arc::new(self.connect(self.cluster.endpoints()))
        }
    }

    #[test]
    fn audit_appends_through_two_connections_form_one_chain() {
        let etcd = Etcd::single();
        let first = etcd.open();
        let second = etcd.open();
        crate::store::conformance::audit_appends_form_one_chain(
            &first,
            [(1, first.clone()), (2, second)],
        );
    }

    conformance_suite!(Etcd::single());

    /// An unreachable cluster is named, with etcd's error as the cause
    /// when the client reported one rather than timing out.
    fn assert_unreachable(result: Result<impl std::fmt::Debug, StoreError>) {
        let message = match result {
            Err(StoreError::Backend(message)) => message,
            Err(StoreError::Io { message, source }) => {
                assert!(is_etcd_error(&*source), "{source:?}");
                message
            }
            other => panic!("expected an unreachable-etcd error, got {other:?}"),
        };
        assert!(
            message.contains("is unreachable")
                && message.contains("accepts no changes until it returns"),
            "{message}"
        );
    }

    fn is_etcd_error(error: &(dyn std::error::Error + 'static)) -> bool {
        error.is::<etcd_client::Error>() || error.is::<Cause>()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leased_keys_vanish_when_the_lease_expires_or_is_revoked() {
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        let mut watch = store.watch("presence/");
        let short = store.grant_lease(Duration::from_secs(1)).unwrap();
        let long = store.grant_lease(Duration::from_secs(30)).unwrap();
        let leased = |key: &str, lease| Op::PutLeased(key.into(), b"x".to_vec(), lease);
        store
            .txn(
                &[],
                &[leased("presence/a", short), leased("presence/b", long)],
            )
            .unwrap();
        assert!(store.keep_alive(short).unwrap());
        let started = Instant::now();
        let mut gone = Vec::new();
        while gone.is_empty() {
            let event = next_event(&mut watch).await;
            if event.value.is_none() {
                gone.push(event.key);
            }
        }
        assert_eq!(gone, ["presence/a"]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            !store.keep_alive(short).unwrap(),
            "an expired lease stays expired"
        );
        assert!(matches!(
            store.txn(&[], &[leased("presence/c", short)]),
            Err(StoreError::LeaseExpired)
        ));
        store.revoke_lease(long).unwrap();
        store.revoke_lease(long).unwrap();
        assert!(store.list("presence/").unwrap().is_empty());
    }

    #[test]
    fn prefixes_keep_overlays_apart() {
        let etcd = Etcd::single();
        let a = etcd.connect(etcd.cluster.endpoints());
        let b = EtcdStore::connect(&EtcdSettings {
            prefix: "/weft-test-b/".into(),
            ..etcd.settings(etcd.cluster.endpoints())
        })
        .unwrap();
        a.txn(&[], &[put("nodes/1", "a")]).unwrap();
        b.txn(&[Compare::Absent("nodes/1".into())], &[put("nodes/1", "b")])
            .unwrap();
        assert_eq!(a.get("nodes/1").unwrap().unwrap().value, b"a");
        assert_eq!(b.list("").unwrap().len(), 1);
        assert_eq!(b.list("").unwrap()[0].1.value, b"b");
    }

    #[test]
    fn lists_larger_than_a_page_are_complete_and_ordered() {
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        for batch in 0..11 {
            let ops: Vec<Op> = (0..100)
                .map(|i| put(&format!("nodes/{:05}", batch * 100 + i), "x"))
                .collect();
            store.txn(&[], &ops).unwrap();
        }
        store.txn(&[], &[put("nodez", "outside")]).unwrap();
        let keys: Vec<String> = store
            .list("nodes/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let expected: Vec<String> = (0..1100).map(|i| format!("nodes/{i:05}")).collect();
        assert_eq!(keys, expected);
    }

    fn batch_txn(compares: Vec<Compare>, ops: Vec<Op>) -> group::Txn {
        group::Txn { compares, ops }
    }

    #[test]
    fn a_batch_commits_each_transaction_on_its_own_compares() {
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        let taken = store.txn(&[], &[put("names/web", "1")]).unwrap();
        let batch = [
            batch_txn(
                vec![Compare::Absent("names/db".into())],
                vec![put("names/db", "2"), put("nodes/2", "db")],
            ),
            // Claims a name that is taken: conflicts, alone.
            batch_txn(
                vec![Compare::Absent("names/web".into())],
                vec![put("names/web", "3"), put("nodes/3", "web")],
            ),
            batch_txn(
                vec![Compare::ModRevision("names/web-1".into(), 0)],
                vec![put("nodes/4", "never")],
            ),
            batch_txn(
                vec![Compare::ModRevision("config/x".into(), taken)],
                vec![put("nodes/5", "x")],
            ),
            batch_txn(
                Vec::new(),
                vec![put("nodes/6", "y"), Op::Delete("gone".into())],
            ),
        ];
        let outcomes = store.commit_batch(&batch.iter().collect::<Vec<_>>());
        assert_eq!(outcomes.len(), 5);
        assert!(
            matches!(outcomes[1], Err(StoreError::Conflict)),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Err(StoreError::Conflict)),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[3], Err(StoreError::Conflict)),
            "{outcomes:?}"
        );
        let committed = match (&outcomes[0], &outcomes[4]) {
            (Ok(a), Ok(b)) if a == b && *a > taken => *a,
            other => panic!("{other:?}"),
        };
        assert_eq!(store.get("names/web").unwrap().unwrap().value, b"1");
        let nodes: Vec<(String, u64)> = store
            .list("nodes/")
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.mod_revision))
            .collect();
        assert_eq!(
            nodes,
            [("nodes/2".into(), committed), ("nodes/6".into(), committed)]
        );
        assert_eq!(store.revision().unwrap(), committed);
    }

    #[test]
    fn a_refused_batch_is_committed_one_by_one() {
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        let lease = store.grant_lease(Duration::from_secs(30)).unwrap();
        store.revoke_lease(lease).unwrap();
        let batch = [
            batch_txn(Vec::new(), vec![put("a", "1")]),
            batch_txn(
                Vec::new(),
                vec![Op::PutLeased("presence/b".into(), b"x".to_vec(), lease)],
            ),
            batch_txn(vec![Compare::Absent("c".into())], vec![put("c", "1")]),
        ];
        let outcomes = store.commit_batch(&batch.iter().collect::<Vec<_>>());
        assert!(
            matches!(outcomes[1], Err(StoreError::LeaseExpired)),
            "{outcomes:?}"
        );
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
        assert!(store.get("a").unwrap().is_some());
        assert!(store.get("c").unwrap().is_some());
        assert!(store.get("presence/b").unwrap().is_none());
    }

    /// Concurrent callers of `txn` share commits, and each is told the
    /// revision its own keys carry.
    #[test]
    fn concurrent_transactions_share_commits() {
        const CALLERS: usize = 48;
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        let start = std::sync::Barrier::new(CALLERS);
        let revisions: Vec<(String, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CALLERS)
                .map(|i| {
                    let (store, start) = (&store, &start);
                    s.spawn(move || {
                        let key = format!("nodes/{i:03}");
                        start.wait();
                        let rev = store
                            .txn(&[Compare::Absent(key.clone())], &[put(&key, "x")])
                            .unwrap();
                        (key, rev)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (key, rev) in &revisions {
            assert_eq!(store.get(key).unwrap().unwrap().mod_revision, *rev);
        }
        let commits: std::collections::BTreeSet<u64> =
            revisions.iter().map(|(_, rev)| *rev).collect();
        assert!(
            commits.len() < CALLERS,
            "{} commits for {CALLERS} transactions",
            commits.len()
        );
    }

    #[test]
    fn repeated_keys_in_a_transaction_keep_the_last_operation() {
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        store
            .txn(&[], &[put("k", "1"), Op::Delete("k".into()), put("j", "1")])
            .unwrap();
        assert_eq!(store.get("k").unwrap(), None);
        store
            .txn(&[], &[Op::Delete("j".into()), put("j", "2")])
            .unwrap();
        assert_eq!(store.get("j").unwrap().unwrap().value, b"2");
    }

    #[test]
    fn oversized_transactions_are_refused_naming_the_limit() {
        let etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        let ops: Vec<Op> = (0..200).map(|i| put(&format!("k/{i}"), "v")).collect();
        match store.txn(&[], &ops) {
            Err(StoreError::Io { message, source }) => {
                assert!(message.contains("200 operations"), "{message}");
                assert!(message.contains("--max-txn-ops"), "{message}");
                assert!(
                    matches!(
                        source.downcast_ref::<etcd_client::Error>(),
                        Some(etcd_client::Error::GRpcStatus(_))
                    ),
                    "{source:?}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(store.list("k/").unwrap().is_empty());
    }

    #[test]
    fn a_down_cluster_is_a_clear_error_within_the_timeout_and_recovers() {
        let mut etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        store.txn(&[], &[put("a", "1")]).unwrap();
        etcd.cluster.stop_all();
        let started = Instant::now();
        assert_unreachable(store.get("a"));
        assert_unreachable(store.txn(&[], &[put("a", "2")]));
        assert_unreachable(store.revision());
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "took {:?}",
            started.elapsed()
        );
        let started = Instant::now();
        assert_unreachable(EtcdStore::connect(&etcd.settings(etcd.cluster.endpoints())));
        assert!(started.elapsed() < Duration::from_secs(5));
        etcd.cluster.restart_all().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let value = loop {
            match store.get("a") {
                Ok(value) => break value,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("etcd did not come back: {e}"),
            }
        };
        assert_eq!(value.unwrap().value, b"1");
        store.txn(&[], &[put("a", "3")]).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_restart_mid_watch_loses_no_event() {
        let mut etcd = Etcd::single();
        let store = etcd.connect(etcd.cluster.endpoints());
        let mut watch = store.watch("nodes/");
        let first = store.txn(&[], &[put("nodes/1", "a")]).unwrap();
        assert_eq!(next_event(&mut watch).await.revision, first);
        etcd.cluster.stop_all();
        etcd.cluster.restart_all().unwrap();
        let writer = etcd.connect(etcd.cluster.endpoints());
        let second = writer.txn(&[], &[put("nodes/2", "b")]).unwrap();
        let third = writer.txn(&[], &[Op::Delete("nodes/1".into())]).unwrap();
        let seen = [next_event(&mut watch).await, next_event(&mut watch).await];
        assert_eq!(
            seen.map(|e| (e.revision, e.key, e.value)),
            [
                (second, "nodes/2".into(), Some(b"b".to_vec())),
                (third, "nodes/1".into(), None)
            ]
        );
        assert!(watch.try_next().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_member_of_three_down_changes_nothing_for_clients() {
        let mut etcd = Etcd::three();
        let store = etcd.connect(etcd.cluster.endpoints());
        let mut watch = store.watch("nodes/");
        store.txn(&[], &[put("nodes/1", "a")]).unwrap();
        next_event(&mut watch).await;
        // Member 0 is the one requests and the watch went to first.
        etcd.cluster.kill(0).unwrap();
        for i in 2..10 {
            let key = format!("nodes/{i}");
            let rev = store
                .txn(&[Compare::Absent(key.clone())], &[put(&key, "x")])
                .unwrap();
            assert_eq!(store.get(&key).unwrap().unwrap().mod_revision, rev);
            let event = next_event(&mut watch).await;
            assert_eq!((event.revision, event.key), (rev, key));
        }
        assert_eq!(store.list("nodes/").unwrap().len(), 9);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_resumes_after_its_member_returns_and_reports_compaction() {
        let mut etcd = Etcd::three();
        // The watcher talks to member 0 only; the writer to the others.
        let watcher = etcd.connect(vec![etcd.cluster.endpoint(0)]);
        let writer = etcd.connect(vec![etcd.cluster.endpoint(1), etcd.cluster.endpoint(2)]);
        let mut watch = watcher.watch("nodes/");
        writer.txn(&[], &[put("nodes/1", "a")]).unwrap();
        next_event(&mut watch).await;

        etcd.cluster.stop(0).unwrap();
        let missed = writer.txn(&[], &[put("nodes/2", "b")]).unwrap();
        etcd.cluster.restart(0).unwrap();
        let event = next_event(&mut watch).await;
        assert_eq!((event.revision, event.key.as_str()), (missed, "nodes/2"));

        etcd.cluster.stop(0).unwrap();
        writer.txn(&[], &[put("nodes/3", "c")]).unwrap();
        let last = writer.txn(&[], &[put("nodes/4", "d")]).unwrap();
        let compact = i64::try_from(last).unwrap();
        writer
            .call(|mut kv| async move { kv.compact(compact, None).await })
            .unwrap();
        etcd.cluster.restart(0).unwrap();
        let lost = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap();
        assert!(matches!(lost, Err(WatchError::Lagged(_))), "{lost:?}");
        let after = writer.txn(&[], &[put("nodes/5", "e")]).unwrap();
        loop {
            let event = next_event(&mut watch).await;
            if event.revision == after {
                break;
            }
            assert!(event.revision >= last, "{event:?}");
        }
    }
}
