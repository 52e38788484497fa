//! The coordinator's Prometheus metrics: registrations and refusals, nodes
//! online, policy loads, netmap fan-out latency, store errors and the
//! identity providers' fetch failures, served by `--metrics-listen`.
//!
//! The metrics are process-wide, like the process's file descriptors: the
//! places that count (control sessions, the netmap service, the store, the
//! OIDC and workload-key fetchers) reach them without a handle threaded
//! through every constructor. A process running several coordinators (the
//! test suites) sums them. Every label value comes from a fixed set
//! (refusal codes, results, error kinds): no node, user or key is a label.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use weft_proto::RefusalCode;

use crate::store::StoreError;

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Fetch {
    fetch: &'static str,
}

#[derive(Debug)]
struct Metrics {
    registry: Registry,
    registrations: Counter,
    refusals: Family<Reason, Counter>,
    nodes_online: Gauge,
    policy_loads: Family<Outcome, Counter>,
    policy_validate: Histogram,
    policy_installed: Gauge,
    fanout: Histogram,
    store_errors: Family<Kind, Counter>,
    idp_failures: Family<Fetch, Counter>,
    clock: Gauge<f64, AtomicU64>,
    flow_batches: Family<Outcome, Counter>,
    flow_records: Family<Outcome, Counter>,
    flow_records_dropped_by_nodes: Counter,
    sink_records: Family<SinkOutcome, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkOutcome {
    /// The sink's configured name: a fixed set, from the configuration.
    sink: String,
    result: &'static str,
}

/// What became of records offered to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SinkResult {
    /// Delivered.
    Sent,
    /// Dropped: the sink's queue was full, the sink refused them, or one
    /// was too large for its transport.
    Dropped,
}

/// What became of a policy someone or something tried to put in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolicyResult {
    /// It parsed, passed its tests and is in force.
    Installed,
    /// It does not parse or its tests fail.
    Invalid,
    /// It is valid but was refused: it locks administrators out or is
    /// over the netmap budget.
    Refused,
}

/// What became of a flow record batch a node sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowBatchResult {
    /// Written and acknowledged.
    Kept,
    /// Already kept: acknowledged again, not written again.
    Duplicate,
    /// Refused as a protocol error.
    Invalid,
    /// Storage failed; not acknowledged, so the node sends it again.
    NotKept,
}

impl FlowBatchResult {
    const ALL: [Self; 4] = [Self::Kept, Self::Duplicate, Self::Invalid, Self::NotKept];

    fn label(self) -> &'static str {
        match self {
            Self::Kept => "kept",
            Self::Duplicate => "duplicate",
            Self::Invalid => "invalid",
            Self::NotKept => "not_kept",
        }
    }
}

/// Where the coordinator fetches an identity provider's documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdpFetch {
    /// The login provider's discovery document and signing keys.
    OidcDiscovery,
    /// A workload issuer's JWKS.
    WorkloadJwks,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_coordinator");
        let metrics = Self {
            registrations: Counter::default(),
            refusals: Family::default(),
            nodes_online: Gauge::default(),
            policy_loads: Family::default(),
            // 1 ms to ~4 s: a policy with many tests takes a while.
            policy_validate: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            policy_installed: Gauge::default(),
            // 100 µs to ~1.6 s: recomputing and queueing every view.
            fanout: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            store_errors: Family::default(),
            idp_failures: Family::default(),
            clock: Gauge::default(),
            flow_batches: Family::default(),
            flow_records: Family::default(),
            flow_records_dropped_by_nodes: Counter::default(),
            sink_records: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "registrations",
            "Nodes that registered and received their netmap",
            metrics.registrations.clone(),
        );
        for code in ALL_REFUSALS {
            let _ = metrics.refusals.get_or_create(&Reason {
                reason: refusal_reason(code),
            });
        }
        registry.register(
            "refusals",
            "Registrations and sessions refused, by refusal code",
            metrics.refusals.clone(),
        );
        registry.register(
            "nodes_online",
            "Nodes with a control session on this coordinator",
            metrics.nodes_online.clone(),
        );
        for result in ["installed", "invalid", "refused"] {
            let _ = metrics.policy_loads.get_or_create(&Outcome { result });
        }
        registry.register(
            "policy_loads",
            "Policies offered (file reloads, `policy set`, another replica's), by result",
            metrics.policy_loads.clone(),
        );
        registry.register(
            "policy_validate_seconds",
            "Time to parse a policy and run its tests",
            metrics.policy_validate.clone(),
        );
        registry.register(
            "policy_installed_timestamp_seconds",
            "When the policy in force was installed, Unix time (0: none yet)",
            metrics.policy_installed.clone(),
        );
        registry.register(
            "netmap_fanout_seconds",
            "Time from a change to every affected session's update being queued",
            metrics.fanout.clone(),
        );
        for kind in ["backend", "lease_expired", "corrupt"] {
            let _ = metrics.store_errors.get_or_create(&Kind { kind });
        }
        registry.register(
            "store_errors",
            "Store operations that failed, by kind (conflicts, which are retried, are not counted)",
            metrics.store_errors.clone(),
        );
        for fetch in [IdpFetch::OidcDiscovery, IdpFetch::WorkloadJwks] {
            let _ = metrics.idp_failures.get_or_create(&Fetch {
                fetch: fetch_name(fetch),
            });
        }
        registry.register(
            "idp_fetch_failures",
            "Failed fetches of an identity provider's discovery document or keys",
            metrics.idp_failures.clone(),
        );
        registry.register(
            "time_seconds",
            "The coordinator's wall clock at the scrape, Unix time: against the \
             scrape's own time it shows clock skew",
            metrics.clock.clone(),
        );
        for result in FlowBatchResult::ALL {
            let _ = metrics.flow_batches.get_or_create(&Outcome {
                result: result.label(),
            });
        }
        registry.register(
            "flow_batches",
            "Flow record batches nodes sent, by result (kept, duplicate: sent again after a \
             lost acknowledgement, invalid: a protocol error, not_kept: storage failed)",
            metrics.flow_batches.clone(),
        );
        for result in ["kept", "not_an_end"] {
            let _ = metrics.flow_records.get_or_create(&Outcome { result });
        }
        registry.register(
            "flow_records",
            "Flow records in batches kept, by result (not_an_end: dropped because the \
             reporting node is not the end of the flow it claims to be)",
            metrics.flow_records.clone(),
        );
        registry.register(
            "flow_records_dropped_by_nodes",
            "Flow records nodes report they dropped before sending (buffer or spool full)",
            metrics.flow_records_dropped_by_nodes.clone(),
        );
        registry.register(
            "sink_records",
            "Flow records and audit entries offered to each configured sink, by result \
             (sent, dropped: queue full while the sink was slow or down, or refused)",
            metrics.sink_records.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

/// The exposition, in the OpenMetrics text format.
pub fn render() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    METRICS.clock.set(now.as_secs_f64());
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry);
    text
}

/// A node registered and got its first netmap.
pub(crate) fn registered() {
    METRICS.registrations.inc();
}

/// A node (or relay) was refused with `code`.
pub(crate) fn refused(code: RefusalCode) {
    METRICS
        .refusals
        .get_or_create(&Reason {
            reason: refusal_reason(code),
        })
        .inc();
}

/// Counts a node online for as long as it lives.
#[derive(Debug)]
pub(crate) struct Online(());

impl Online {
    pub(crate) fn new() -> Self {
        METRICS.nodes_online.inc();
        Self(())
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        METRICS.nodes_online.dec();
    }
}

/// A policy was offered; `Installed` also stamps the time.
pub(crate) fn policy_load(result: PolicyResult) {
    let result = match result {
        PolicyResult::Installed => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            METRICS
                .policy_installed
                .set(i64::try_from(now).unwrap_or(i64::MAX));
            "installed"
        }
        PolicyResult::Invalid => "invalid",
        PolicyResult::Refused => "refused",
    };
    METRICS
        .policy_loads
        .get_or_create(&Outcome { result })
        .inc();
}

/// Validating a policy took `elapsed`.
pub(crate) fn policy_validated(elapsed: Duration) {
    METRICS.policy_validate.observe(elapsed.as_secs_f64());
}

/// One fan-out of netmap updates took `elapsed`.
pub(crate) fn fanned_out(elapsed: Duration) {
    METRICS.fanout.observe(elapsed.as_secs_f64());
}

/// A store operation failed with `error`.
pub(crate) fn store_error(error: &StoreError) {
    let kind = match error {
        StoreError::Conflict => return,
        StoreError::Backend(_) | StoreError::Io { .. } => "backend",
        StoreError::LeaseExpired => "lease_expired",
        StoreError::Corrupt { .. } => "corrupt",
    };
    METRICS.store_errors.get_or_create(&Kind { kind }).inc();
}

/// A flow record batch ended as `result`.
pub(crate) fn flow_batch(result: FlowBatchResult) {
    METRICS
        .flow_batches
        .get_or_create(&Outcome {
            result: result.label(),
        })
        .inc();
}

/// A batch was kept with `kept` records; `not_an_end` more were dropped,
/// and the node said it dropped `by_node` before sending.
pub(crate) fn flow_records(kept: u64, not_an_end: u64, by_node: u64) {
    let count = |result| METRICS.flow_records.get_or_create(&Outcome { result });
    count("kept").inc_by(kept);
    count("not_an_end").inc_by(not_an_end);
    METRICS.flow_records_dropped_by_nodes.inc_by(by_node);
}

/// A sink named `sink` exists: both its series show from the start.
pub(crate) fn sink_registered(sink: &str) {
    for result in [SinkResult::Sent, SinkResult::Dropped] {
        let _ = METRICS
            .sink_records
            .get_or_create(&sink_outcome(sink, result));
    }
}

/// `count` records offered to `sink` ended as `result`.
pub(crate) fn sink_records(sink: &str, result: SinkResult, count: u64) {
    METRICS
        .sink_records
        .get_or_create(&sink_outcome(sink, result))
        .inc_by(count);
}

fn sink_outcome(sink: &str, result: SinkResult) -> SinkOutcome {
    SinkOutcome {
        sink: sink.to_owned(),
        result: match result {
            SinkResult::Sent => "sent",
            SinkResult::Dropped => "dropped",
        },
    }
}

/// Fetching an identity provider's documents failed.
pub(crate) fn idp_fetch_failed(fetch: IdpFetch) {
    METRICS
        .idp_failures
        .get_or_create(&Fetch {
            fetch: fetch_name(fetch),
        })
        .inc();
}

fn fetch_name(fetch: IdpFetch) -> &'static str {
    match fetch {
        IdpFetch::OidcDiscovery => "oidc_discovery",
        IdpFetch::WorkloadJwks => "workload_jwks",
    }
}

const ALL_REFUSALS: [RefusalCode; 13] = [
    RefusalCode::AuthKeyRequired,
    RefusalCode::AuthKeyInvalid,
    RefusalCode::AuthKeyUsed,
    RefusalCode::AuthKeyExpired,
    RefusalCode::NodeDeleted,
    RefusalCode::KeyExpired,
    RefusalCode::UserDisabled,
    RefusalCode::LoginFailed,
    RefusalCode::IdentityProviderUnavailable,
    RefusalCode::TokenInvalid,
    RefusalCode::BadRequest,
    RefusalCode::Unavailable,
    RefusalCode::MachineKeyInUse,
];

fn refusal_reason(code: RefusalCode) -> &'static str {
    match code {
        RefusalCode::AuthKeyRequired => "auth_key_required",
        RefusalCode::AuthKeyInvalid => "auth_key_invalid",
        RefusalCode::AuthKeyUsed => "auth_key_used",
        RefusalCode::AuthKeyExpired => "auth_key_expired",
        RefusalCode::NodeDeleted => "node_deleted",
        RefusalCode::KeyExpired => "key_expired",
        RefusalCode::UserDisabled => "user_disabled",
        RefusalCode::LoginFailed => "login_failed",
        RefusalCode::IdentityProviderUnavailable => "identity_provider_unavailable",
        RefusalCode::TokenInvalid => "token_invalid",
        RefusalCode::BadRequest => "bad_request",
        RefusalCode::Unavailable => "unavailable",
        RefusalCode::MachineKeyInUse => "machine_key_in_use",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_with_bounded_labels() {
        refused(RefusalCode::AuthKeyInvalid);
        policy_load(PolicyResult::Invalid);
        store_error(&StoreError::LeaseExpired);
        store_error(&StoreError::Conflict);
        idp_fetch_failed(IdpFetch::WorkloadJwks);
        fanned_out(Duration::from_millis(3));
        flow_batch(FlowBatchResult::Duplicate);
        flow_records(2, 1, 5);
        let online = Online::new();
        let text = render();
        drop(online);
        for needle in [
            "weft_coordinator_registrations_total ",
            "weft_coordinator_refusals_total{reason=\"auth_key_invalid\"} ",
            "weft_coordinator_refusals_total{reason=\"machine_key_in_use\"} ",
            "weft_coordinator_nodes_online ",
            "weft_coordinator_policy_loads_total{result=\"invalid\"} ",
            "weft_coordinator_policy_loads_total{result=\"installed\"} ",
            "weft_coordinator_policy_validate_seconds_bucket{le=",
            "weft_coordinator_policy_installed_timestamp_seconds ",
            "weft_coordinator_netmap_fanout_seconds_count ",
            "weft_coordinator_store_errors_total{kind=\"lease_expired\"} ",
            "weft_coordinator_idp_fetch_failures_total{fetch=\"workload_jwks\"} ",
            "weft_coordinator_time_seconds ",
            "weft_coordinator_flow_batches_total{result=\"duplicate\"} ",
            "weft_coordinator_flow_batches_total{result=\"not_kept\"} ",
            "weft_coordinator_flow_records_total{result=\"not_an_end\"} ",
            "weft_coordinator_flow_records_dropped_by_nodes_total ",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Other tests in this process count too: only the minimum is known.
        let value = |prefix: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(prefix)).unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("weft_coordinator_refusals_total{reason=\"auth_key_invalid\"}") >= 1.0);
        assert!(value("weft_coordinator_store_errors_total{kind=\"lease_expired\"}") >= 1.0);
        assert!(value("weft_coordinator_flow_records_dropped_by_nodes_total") >= 5.0);
        assert!(text.ends_with("# EOF\n"));
    }
}
