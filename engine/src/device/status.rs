//! Builds the status reports from the device's and the core's state.

use std::time::{Duration, SystemTime};

use weft_proto::{PublicKey, SelfNode};

use super::control_surface::{FilterStatus, FlowLogStatus, PeerSummary, SelfStatus};
use crate::flows::outbox::OutboxStats;
use weft_dataplane::core::{FilterStats, PeerStatus};
use weft_dataplane::filter::FlowLogStats;

pub(crate) fn self_status(node: &SelfNode, key: PublicKey) -> SelfStatus {
    SelfStatus {
        hostname: node.name.clone(),
        addresses: node.addresses().to_vec(),
        identity: node.identity.to_string(),
        id: node.id.0,
        node_key: key.to_string(),
        key_expiry: node.key_expiry.map(|secs| {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            humantime::format_rfc3339_seconds(at).to_string()
        }),
    }
}

pub(crate) fn peer_summary(peer: &PeerStatus, now: SystemTime) -> PeerSummary {
    PeerSummary {
        hostname: peer.name.clone(),
        addresses: peer.addresses.clone(),
        identity: peer.identity.to_string(),
        endpoint: peer.endpoint,
        path: peer.path,
        relay: peer.relay.clone(),
        last_handshake: peer.last_handshake.map(|ago| rfc3339_ago(now, ago)),
        rx_bytes: peer.rx_bytes,
        tx_bytes: peer.tx_bytes,
    }
}

pub(crate) fn filter_status(stats: &FilterStats, malformed_frames: u64) -> FilterStatus {
    FilterStatus {
        accepted: stats.accepted,
        dropped: stats.dropped,
        denied_by_rule: stats.denied_by_rule,
        audit_passed: stats.audit_passed,
        too_big_sent: stats.too_big_sent,
        too_big_suppressed: stats.too_big_suppressed,
        spoofed: stats.dropped_spoofed,
        invalid_datagrams: stats.dropped_invalid_datagram + stats.dropped_unknown_peer,
        malformed_frames,
    }
}

fn rfc3339_ago(now: SystemTime, ago: Duration) -> String {
    let at = now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The flow log's state: the data plane's queue and the batches held for
/// the coordinator.
pub(crate) fn flow_status(log: FlowLogStats, outbox: OutboxStats) -> FlowLogStatus {
    FlowLogStatus {
        recorded: log.recorded,
        queued: log.queued + outbox.pending + outbox.batched,
        spooled_batches: outbox.batches,
        spool_bytes: outbox.bytes,
        dropped: log.dropped + outbox.dropped,
        last_acked_batch: outbox.last_acked,
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::{Identity, NodeId};

    use super::*;
    use weft_dataplane::core::PathKind;

    #[test]
    fn a_handshake_age_becomes_a_timestamp() {
        let now = humantime::parse_rfc3339("2026-01-01T00:01:00Z").unwrap();
        let peer = PeerStatus {
            id: NodeId(2),
            name: "db-1".into(),
            addresses: vec!["100.64.0.2".parse().unwrap()],
            identity: Identity {
                user: None,
                tags: vec!["tag:db".into()],
                ..Default::default()
            },
            endpoint: None,
            path: Some(PathKind::Relay),
            relay: Some("fra1".into()),
            last_handshake: Some(Duration::from_secs(12)),
            rx_bytes: 1,
            tx_bytes: 2,
        };
        let summary = peer_summary(&peer, now);
        assert_eq!(
            summary.last_handshake.as_deref(),
            Some("2026-01-01T00:00:48Z")
        );
        assert_eq!(summary.identity, "tag:db");
        assert_eq!(
            (summary.path, summary.relay.as_deref()),
            (Some(PathKind::Relay), Some("fra1"))
        );
        let never = peer_summary(
            &PeerStatus {
                last_handshake: None,
                ..peer
            },
            now,
        );
        assert_eq!(never.last_handshake, None);
    }
}
