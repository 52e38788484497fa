//! The relay's Prometheus metrics, rendered at scrape time from the
//! forwarding core's counters: nothing on the forwarding path changes.
//! No label names a client; reasons and transports are fixed sets.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::server::{Shared, Snapshot};

/// A handle on a running relay's counters, for a scrape handler.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Shared>);

impl Metrics {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self(shared)
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        render(&self.0.snapshot())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn render(s: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("weft_relay");
    let sessions = Family::<TransportLabels, Gauge>::default();
    for (transport, count) in [("quic", s.quic_sessions), ("tcp", s.tcp_sessions)] {
        sessions
            .get_or_create(&TransportLabels { transport })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(
        "sessions",
        "Connected client sessions, by transport",
        sessions,
    );
    let admitted = Gauge::<i64>::default();
    admitted.set(i64::try_from(s.admitted).unwrap_or(i64::MAX));
    registry.register(
        "admitted_keys",
        "Node keys the coordinator admits to this relay",
        admitted,
    );
    let c = s.counters;
    registry.register(
        "forwarded_packets",
        "Packets forwarded between clients",
        counter(c.forwarded),
    );
    registry.register(
        "forwarded_bytes",
        "Payload bytes forwarded between clients",
        counter(c.forwarded_bytes),
    );
    let drops = Family::<ReasonLabels, Counter>::default();
    for (reason, value) in [
        ("not_admitted", c.dropped_not_admitted),
        ("no_destination", c.dropped_no_destination),
        ("rate_limited", c.dropped_rate_limited),
        ("malformed", c.dropped_malformed),
        ("transport_full", s.dropped_transport),
    ] {
        drops.get_or_create(&ReasonLabels { reason }).inc_by(value);
    }
    registry.register("drops", "Client packets dropped, by reason", drops);
    registry.register(
        "rate_limited_sessions",
        "Client sessions that exceeded their rate limit at least once",
        counter(c.rate_limited_sessions),
    );
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Counters;

    #[test]
    fn the_exposition_has_sessions_bytes_drops_and_rate_limited_clients() {
        let text = render(&Snapshot {
            counters: Counters {
                forwarded: 4,
                forwarded_bytes: 400,
                dropped_rate_limited: 2,
                rate_limited_sessions: 1,
                ..Counters::default()
            },
            dropped_transport: 3,
            admitted: 5,
            quic_sessions: 2,
            tcp_sessions: 1,
        });
        for line in [
            "weft_relay_sessions{transport=\"quic\"} 2",
            "weft_relay_sessions{transport=\"tcp\"} 1",
            "weft_relay_admitted_keys 5",
            "weft_relay_forwarded_packets_total 4",
            "weft_relay_forwarded_bytes_total 400",
            "weft_relay_drops_total{reason=\"rate_limited\"} 2",
            "weft_relay_drops_total{reason=\"transport_full\"} 3",
            "weft_relay_rate_limited_sessions_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
