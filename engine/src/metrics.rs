//! weftd's Prometheus metrics: a snapshot the device loop takes on request
//! ([`Command::Metrics`](crate::device::Command::Metrics)), rendered in the
//! OpenMetrics text format by the shell's scrape handler, so a scrape costs
//! the loop one copy of its counters and nothing on the packet path changes.
//!
//! Label values come only from bounded sets (path, verdict, drop reason,
//! run state, and the policy lines of the rules in this node's filter):
//! peers' names and identities belong in flow records, never in metric
//! labels, so the series count does not grow with the overlay.

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weft_dataplane::core::{FilterStats, PathKind, PathTraffic, RuleVerdicts};

use crate::device::{FlowLogStatus, RunState};

/// What a scrape reports, copied out of the device loop.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeMetrics {
    /// The node's wall clock when the snapshot was taken: against the
    /// scrape's own time it shows clock skew, which breaks key expiry and
    /// token validation.
    pub clock: SystemTime,
    /// The device's connection state.
    pub state: RunState,
    /// Whether a control session is established.
    pub coordinator_connected: bool,
    /// How long ago the last netmap (or delta) arrived, once one has.
    pub netmap_age: Option<Duration>,
    /// When the node key expires (Unix seconds), for expiring keys.
    pub key_expiry: Option<u64>,
    /// When the coordinator granted that expiry (Unix seconds): with
    /// `key_expiry`, the key's lifetime, so alerts can speak of a fraction of it.
    pub key_granted: Option<u64>,
    /// Each peer's path and counters, without who the peer is.
    pub peers: Vec<PeerMetrics>,
    /// The data plane's counters.
    pub filter: FilterStats,
    /// Verdicts by the policy rule (line) that decided them.
    pub rules: Vec<RuleVerdicts>,
    /// Frames from the TUN device that could not be split into packets.
    pub malformed_frames: u64,
    /// Packets dropped because a relay session was down or congested.
    pub relay_dropped: u64,
    /// The flow log's counters.
    pub flows: FlowLogStatus,
}

/// One peer's tunnel, as metrics see it: no name, no identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerMetrics {
    /// How the peer is reached now; `None` while there is no way yet.
    pub path: Option<PathKind>,
    /// How long ago the current session's handshake completed.
    pub last_handshake: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Path {
    direct,
    relay,
    none,
}

impl From<Option<PathKind>> for Path {
    fn from(path: Option<PathKind>) -> Self {
        match path {
            Some(PathKind::Direct) => Path::direct,
            Some(PathKind::Relay) => Path::relay,
            None => Path::none,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: Path,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficLabels {
    path: Path,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
    rule: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    line: u32,
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

const STATES: [(RunState, &str); 6] = [
    (RunState::Running, "running"),
    (RunState::Stopped, "stopped"),
    (RunState::Connecting, "connecting"),
    (RunState::NeedsAuth, "needs-auth"),
    (RunState::NeedsLogin, "needs-login"),
    (RunState::Deleted, "deleted"),
];

/// The exposition of `metrics`, in the OpenMetrics text format
/// ([`weft_net::metrics_http::CONTENT_TYPE`]).
pub fn render(metrics: &NodeMetrics) -> String {
    let mut registry = Registry::with_prefix("weft");
    register(&mut registry, metrics);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

fn register(registry: &mut Registry, m: &NodeMetrics) {
    let clock = m
        .clock
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    registry.register(
        "node_time_seconds",
        "The node's wall clock at the scrape, Unix time",
        float(clock.as_secs_f64()),
    );
    let state = Family::<StateLabels, Gauge>::default();
    for (s, name) in STATES {
        state
            .get_or_create(&StateLabels { state: name })
            .set(i64::from(s == m.state));
    }
    registry.register(
        "node_state",
        "The device's connection state: 1 for the current one",
        state,
    );
    registry.register(
        "coordinator_connected",
        "Whether a control session with a coordinator is established",
        gauge(i64::from(m.coordinator_connected)),
    );
    if let Some(age) = m.netmap_age {
        registry.register(
            "netmap_age_seconds",
            "Seconds since the last netmap or netmap delta arrived",
            float(age.as_secs_f64()),
        );
    }
    if let Some(expiry) = m.key_expiry {
        registry.register(
            "node_key_expiry_timestamp_seconds",
            "When the node key expires, Unix time",
            gauge(saturate(expiry)),
        );
    }
    if let Some(granted) = m.key_granted.filter(|_| m.key_expiry.is_some()) {
        registry.register(
            "node_key_granted_timestamp_seconds",
            "When the coordinator granted the node key's expiry, Unix time",
            gauge(saturate(granted)),
        );
    }
    register_peers(registry, &m.peers);
    register_traffic(registry, &m.filter);
    register_filter(registry, &m.filter, m.malformed_frames, m.relay_dropped);
    register_rules(registry, &m.rules);
    register_flows(registry, &m.flows);
}

fn register_flows(registry: &mut Registry, flows: &FlowLogStatus) {
    registry.register(
        "flow_records",
        "Flow records made: flows that ended, interim reports of long ones, denial summaries",
        counter(flows.recorded),
    );
    registry.register(
        "flow_records_dropped",
        "Flow records dropped because a queue or the spool was full",
        counter(flows.dropped),
    );
    registry.register(
        "flow_records_queued",
        "Flow records not yet acknowledged by the coordinator",
        gauge(saturate(flows.queued)),
    );
    registry.register(
        "flow_spool_bytes",
        "Bytes of flow batches held until the coordinator acknowledges them",
        gauge(saturate(flows.spool_bytes)),
    );
}

fn register_rules(registry: &mut Registry, rules: &[RuleVerdicts]) {
    let verdicts = Family::<RuleLabels, Counter>::default();
    for rule in rules {
        for (verdict, value) in [
            ("accept", rule.accepted),
            ("audit", rule.audit_passed),
            ("drop", rule.denied),
        ] {
            verdicts
                .get_or_create(&RuleLabels {
                    line: rule.line,
                    verdict,
                })
                .inc_by(value);
        }
    }
    registry.register(
        "filter_rule_verdicts",
        "Inbound packets each policy rule decided, by its line in the policy file: \
         accept (a flow's first packet), audit (a deny in audit mode let it pass), drop",
        verdicts,
    );
}

fn register_peers(registry: &mut Registry, peers: &[PeerMetrics]) {
    let count = Family::<PathLabels, Gauge>::default();
    let oldest = Family::<PathLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let without = Family::<PathLabels, Gauge>::default();
    for path in [Path::direct, Path::relay, Path::none] {
        let labels = PathLabels { path };
        // Every path's series exists from the first scrape, so sums and
        // absences mean what they say.
        let _ = count.get_or_create(&labels);
        let _ = without.get_or_create(&labels);
        let _ = oldest.get_or_create(&labels);
    }
    for peer in peers {
        let path = Path::from(peer.path);
        let labels = PathLabels { path };
        count.get_or_create(&labels).inc();
        match peer.last_handshake {
            Some(age) => {
                let max = oldest.get_or_create(&labels);
                if age.as_secs_f64() > max.get() {
                    max.set(age.as_secs_f64());
                }
            }
            None => {
                without.get_or_create(&labels).inc();
            }
        }
    }
    registry.register(
        "peers",
        "Peers in the netmap, by how they are reached now",
        count,
    );
    registry.register(
        "peer_handshake_age_max_seconds",
        "The oldest current WireGuard session's handshake age among the peers on a path",
        oldest,
    );
    registry.register(
        "peers_without_handshake",
        "Peers on a path with no WireGuard session yet",
        without,
    );
}

fn register_traffic(registry: &mut Registry, f: &FilterStats) {
    let packets = Family::<TrafficLabels, Counter>::default();
    let bytes = Family::<TrafficLabels, Counter>::default();
    for (direction, traffic) in [("rx", f.received), ("tx", f.sent)] {
        let PathTraffic {
            direct_packets,
            direct_bytes,
            relay_packets,
            relay_bytes,
        } = traffic;
        for (path, p, b) in [
            (Path::direct, direct_packets, direct_bytes),
            (Path::relay, relay_packets, relay_bytes),
        ] {
            let labels = TrafficLabels { path, direction };
            packets.get_or_create(&labels).inc_by(p);
            bytes.get_or_create(&labels).inc_by(b);
        }
    }
    registry.register(
        "tunnel_packets",
        "Data packets through the tunnels, by the path they took and direction",
        packets,
    );
    registry.register(
        "tunnel_bytes",
        "Bytes of the IP packets through the tunnels, by path and direction",
        bytes,
    );
}

fn register_filter(registry: &mut Registry, f: &FilterStats, malformed: u64, relay_dropped: u64) {
    let verdicts = Family::<VerdictLabels, Counter>::default();
    let allowed = f.accepted.saturating_sub(f.audit_passed);
    let by_default = f.dropped.saturating_sub(f.denied_by_rule);
    for (verdict, rule, value) in [
        ("accept", "allow", allowed),
        ("accept", "audit", f.audit_passed),
        ("drop", "deny", f.denied_by_rule),
        ("drop", "default", by_default),
    ] {
        verdicts
            .get_or_create(&VerdictLabels { verdict, rule })
            .inc_by(value);
    }
    registry.register(
        "filter_verdicts",
        "Inbound packets by the filter's verdict and the kind of rule that decided it \
         (audit: a deny in audit mode let it pass, default: no rule allowed it)",
        verdicts,
    );
    let drops = Family::<ReasonLabels, Counter>::default();
    for (reason, value) in [
        ("policy", f.dropped),
        ("spoofed", f.dropped_spoofed),
        ("malformed", f.dropped_malformed),
        ("no_peer", f.dropped_no_peer),
        ("no_endpoint", f.dropped_no_endpoint),
        ("unknown_peer", f.dropped_unknown_peer),
        ("invalid_datagram", f.dropped_invalid_datagram),
        ("too_big", f.too_big_sent + f.too_big_suppressed),
        ("malformed_frame", malformed),
        ("relay_unavailable", relay_dropped),
    ] {
        drops.get_or_create(&ReasonLabels { reason }).inc_by(value);
    }
    registry.register("drops", "Packets and datagrams dropped, by reason", drops);
    let failures = Counter::<u64>::default();
    failures.inc_by(f.handshake_failures);
    registry.register(
        "handshake_failures",
        "WireGuard handshakes abandoned after their retries went unanswered",
        failures,
    );
    registry.register(
        "flows",
        "Flows the filter tracks now",
        gauge(saturate(f.flows)),
    );
}

fn gauge(value: i64) -> Gauge {
    let g = Gauge::default();
    g.set(value);
    g
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn float(value: f64) -> Gauge<f64, std::sync::atomic::AtomicU64> {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    g.set(value);
    g
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeMetrics {
        NodeMetrics {
            clock: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
            state: RunState::Running,
            coordinator_connected: true,
            netmap_age: Some(Duration::from_millis(2500)),
            key_expiry: Some(1_800_000_000),
            key_granted: Some(1_700_000_000),
            peers: vec![
                PeerMetrics {
                    path: Some(PathKind::Direct),
                    last_handshake: Some(Duration::from_secs(30)),
                },
                PeerMetrics {
                    path: Some(PathKind::Direct),
                    last_handshake: Some(Duration::from_secs(90)),
                },
                PeerMetrics {
                    path: None,
                    last_handshake: None,
                },
            ],
            filter: FilterStats {
                accepted: 10,
                audit_passed: 3,
                dropped: 7,
                denied_by_rule: 2,
                handshake_failures: 4,
                received: PathTraffic {
                    direct_packets: 3,
                    direct_bytes: 300,
                    relay_packets: 1,
                    relay_bytes: 80,
                },
                sent: PathTraffic {
                    direct_packets: 2,
                    direct_bytes: 202,
                    ..PathTraffic::default()
                },
                ..FilterStats::default()
            },
            rules: vec![RuleVerdicts {
                line: 12,
                accepted: 0,
                audit_passed: 1,
                denied: 2,
            }],
            malformed_frames: 1,
            relay_dropped: 5,
            flows: FlowLogStatus {
                recorded: 40,
                queued: 5,
                spooled_batches: 2,
                spool_bytes: 4096,
                dropped: 2,
                last_acked_batch: Some(9),
            },
        }
    }

    #[test]
    fn the_exposition_names_every_metric_with_bounded_labels() {
        let text = render(&sample());
        for line in [
            "weft_node_time_seconds 1700000000.5",
            "weft_node_state{state=\"running\"} 1",
            "weft_node_state{state=\"stopped\"} 0",
            "weft_coordinator_connected 1",
            "weft_netmap_age_seconds 2.5",
            "weft_node_key_expiry_timestamp_seconds 1800000000",
            "weft_node_key_granted_timestamp_seconds 1700000000",
            "weft_peers{path=\"direct\"} 2",
            "weft_peers{path=\"none\"} 1",
            "weft_peers{path=\"relay\"} 0",
            "weft_peer_handshake_age_max_seconds{path=\"direct\"} 90.0",
            "weft_peers_without_handshake{path=\"none\"} 1",
            "weft_tunnel_packets_total{path=\"direct\",direction=\"rx\"} 3",
            "weft_tunnel_packets_total{path=\"relay\",direction=\"rx\"} 1",
            "weft_tunnel_packets_total{path=\"relay\",direction=\"tx\"} 0",
            "weft_tunnel_bytes_total{path=\"direct\",direction=\"rx\"} 300",
            "weft_tunnel_bytes_total{path=\"relay\",direction=\"rx\"} 80",
            "weft_tunnel_bytes_total{path=\"direct\",direction=\"tx\"} 202",
            "weft_filter_verdicts_total{verdict=\"accept\",rule=\"allow\"} 7",
            "weft_filter_verdicts_total{verdict=\"accept\",rule=\"audit\"} 3",
            "weft_filter_verdicts_total{verdict=\"drop\",rule=\"deny\"} 2",
            "weft_filter_verdicts_total{verdict=\"drop\",rule=\"default\"} 5",
            "weft_drops_total{reason=\"policy\"} 7",
            "weft_drops_total{reason=\"malformed_frame\"} 1",
            "weft_drops_total{reason=\"relay_unavailable\"} 5",
            "weft_handshake_failures_total 4",
            "weft_filter_rule_verdicts_total{line=\"12\",verdict=\"drop\"} 2",
            "weft_filter_rule_verdicts_total{line=\"12\",verdict=\"audit\"} 1",
            "weft_filter_rule_verdicts_total{line=\"12\",verdict=\"accept\"} 0",
            "weft_flows 0",
            "weft_flow_records_total 40",
            "weft_flow_records_dropped_total 2",
            "weft_flow_records_queued 5",
            "weft_flow_spool_bytes 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_node_without_a_netmap_or_expiring_key_leaves_those_out() {
        let text = render(&NodeMetrics {
            state: RunState::Stopped,
            coordinator_connected: false,
            netmap_age: None,
            key_expiry: None,
            key_granted: Some(1),
            peers: Vec::new(),
            ..sample()
        });
        assert!(!text.contains("weft_netmap_age_seconds"), "{text}");
        assert!(!text.contains("weft_node_key_"), "{text}");
        assert!(text.contains("weft_peers{path=\"direct\"} 0"), "{text}");
        assert!(text.contains("weft_coordinator_connected 0"), "{text}");
    }
}
