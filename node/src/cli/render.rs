//! Human-readable output of `weft up` and `weft status`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::api::{PathKind, PeerSummary, RunState, SelfStatus, Status};

/// `connected as web-1 (100.64.0.1, fd7a:115c:a1e0::1) identity tag:web`.
pub(super) fn connected(me: &SelfStatus) -> String {
    format!(
        "connected as {} ({}) identity {}",
        me.hostname,
        join(&me.addresses),
        me.identity
    )
}

/// The status as a short header and a table of peers.
pub(super) fn status(status: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let state = match status.state {
        RunState::Running => "running",
        RunState::Stopped => "stopped",
        RunState::Connecting => "connecting",
        RunState::NeedsAuth => "needs-auth",
        RunState::NeedsLogin => "needs-login",
        RunState::Deleted => "deleted",
    };
    let _ = writeln!(out, "state:       {state}");
    if let Some(message) = &status.message {
        let _ = writeln!(out, "message:     {message}");
    }
    if let Some(url) = &status.login_url {
        let _ = writeln!(out, "log in at:   {url}");
    }
    if let Some(address) = &status.coordinator.address {
        let link = match (
            status.coordinator.connected,
            status.coordinator.connected_to,
        ) {
            (true, Some(replica)) if address.contains(',') => format!("connected to {replica}"),
            (true, _) => "connected".to_owned(),
            (false, _) => "not connected".to_owned(),
        };
        let _ = writeln!(out, "coordinator: {address} ({link})");
    }
    if let Some(me) = &status.self_node {
        let _ = writeln!(
            out,
            "self:        {}",
            connected(me).trim_start_matches("connected as ")
        );
        if let Some(expiry) = &me.key_expiry {
            let _ = writeln!(out, "key expires: {expiry}");
        }
    }
    let filter = &status.filter;
    let _ = write!(
        out,
        "filter:      {} accepted, {} dropped",
        filter.accepted, filter.dropped
    );
    // Signs of an attack or a broken peer: shown only when there are any.
    if filter.spoofed > 0 {
        let _ = write!(out, ", {} with a spoofed source", filter.spoofed);
    }
    if filter.invalid_datagrams > 0 {
        let _ = write!(out, ", {} invalid datagrams", filter.invalid_datagrams);
    }
    if filter.malformed_frames > 0 {
        let _ = write!(out, ", {} malformed TUN frames", filter.malformed_frames);
    }
    out.push('\n');
    let flows = &status.flows;
    let _ = write!(
        out,
        "flow log:    {} recorded, {} not yet acknowledged ({} batches, {} bytes spooled)",
        flows.recorded, flows.queued, flows.spooled_batches, flows.spool_bytes
    );
    if flows.dropped > 0 {
        let _ = write!(out, ", {} dropped", flows.dropped);
    }
    if let Some(batch) = flows.last_acked_batch {
        let _ = write!(out, ", last acknowledged batch {batch}");
    }
    out.push('\n');
    if status.peers.is_empty() {
        let _ = writeln!(out, "no peers");
        return out;
    }
    let mut rows = vec![[
        "HOSTNAME".to_owned(),
        "ADDRESSES".to_owned(),
        "IDENTITY".to_owned(),
        "PATH".to_owned(),
        "HANDSHAKE".to_owned(),
        "RX".to_owned(),
        "TX".to_owned(),
    ]];
    for peer in &status.peers {
        rows.push([
            peer.hostname.clone(),
            join(&peer.addresses),
            peer.identity.clone(),
            path(peer),
            handshake_age(peer.last_handshake.as_deref(), now),
            bytes(peer.rx_bytes),
            bytes(peer.tx_bytes),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    out.push('\n');
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// `direct 203.0.113.7:51820`, `relay fra1`, or `-` while the peer
/// cannot be reached yet.
fn path(peer: &PeerSummary) -> String {
    match (peer.path, &peer.relay, peer.endpoint) {
        (Some(PathKind::Relay), Some(relay), _) => format!("relay {relay}"),
        (Some(PathKind::Direct), _, Some(endpoint)) => format!("direct {endpoint}"),
        (Some(PathKind::Relay), None, _) => "relay".to_owned(),
        (Some(PathKind::Direct), _, None) => "direct".to_owned(),
        (None, _, _) => "-".to_owned(),
    }
}

fn join(addresses: &[IpAddr]) -> String {
    let text: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    text.join(", ")
}

/// "12s ago", "3m ago", "never".
fn handshake_age(at: Option<&str>, now: SystemTime) -> String {
    let Some(at) = at else {
        return "never".to_owned();
    };
    let Ok(at) = humantime::parse_rfc3339(at) else {
        return at.to_owned();
    };
    ago(now.duration_since(at).unwrap_or(Duration::ZERO))
}

fn ago(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CoordinatorStatus, FilterStatus, FlowLogStatus, PeerSummary};

    #[test]
    fn the_status_table_shows_each_peer() {
        let now = humantime::parse_rfc3339("2026-01-01T00:01:00Z").unwrap();
        let status = Status {
            state: RunState::Running,
            message: None,
            login_url: None,
            self_node: Some(SelfStatus {
                hostname: "web-1".into(),
                addresses: vec!["100.64.0.1".parse().unwrap()],
                identity: "tag:web".into(),
                id: 1,
                node_key: "AAAA".into(),
                key_expiry: Some("2026-01-01T01:00:00Z".into()),
            }),
            coordinator: CoordinatorStatus {
                address: Some("198.51.100.1:7443".into()),
                connected: false,
                connected_to: None,
            },
            peers: vec![
                PeerSummary {
                    hostname: "db-1".into(),
                    addresses: vec!["100.64.0.2".parse().unwrap()],
                    identity: "tag:db".into(),
                    endpoint: Some("192.0.2.20:51820".parse().unwrap()),
                    path: Some(PathKind::Direct),
                    relay: None,
                    last_handshake: Some("2026-01-01T00:00:48Z".into()),
                    rx_bytes: 2048,
                    tx_bytes: 10,
                },
                PeerSummary {
                    hostname: "laptop".into(),
                    addresses: vec![],
                    identity: "alice@example.com".into(),
                    endpoint: None,
                    path: Some(PathKind::Relay),
                    relay: Some("fra1".into()),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ],
            filter: FilterStatus {
                accepted: 1,
                dropped: 2,
                spoofed: 3,
                malformed_frames: 4,
                ..FilterStatus::default()
            },
            flows: FlowLogStatus::default(),
        };
        let text = super::status(&status, now);
        assert!(
            text.contains("filter:      1 accepted, 2 dropped, 3 with a spoofed source, 4 malformed TUN frames\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "flow log:    0 recorded, 0 not yet acknowledged (0 batches, 0 bytes spooled)\n"
            ),
            "{text}"
        );
        let mut busy = status.clone();
        busy.flows = FlowLogStatus {
            recorded: 9,
            queued: 3,
            spooled_batches: 1,
            spool_bytes: 700,
            dropped: 2,
            last_acked_batch: Some(5),
        };
        assert!(
            super::status(&busy, now).contains(
                "flow log:    9 recorded, 3 not yet acknowledged (1 batches, 700 bytes spooled), 2 dropped, last acknowledged batch 5\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("coordinator: 198.51.100.1:7443 (not connected)"),
            "{text}"
        );
        let mut replicas = status.clone();
        replicas.coordinator = CoordinatorStatus {
            address: Some("198.51.100.1:7443,198.51.100.2:7443".into()),
            connected: true,
            connected_to: Some("198.51.100.2:7443".parse().unwrap()),
        };
        let text = super::status(&replicas, now);
        assert!(
            text.contains(
                "coordinator: 198.51.100.1:7443,198.51.100.2:7443 (connected to 198.51.100.2:7443)"
            ),
            "{text}"
        );
        assert!(
            text.contains("self:        web-1 (100.64.0.1) identity tag:web\nkey expires: 2026-01-01T01:00:00Z"),
            "{text}"
        );
        let db = text.lines().find(|l| l.starts_with("db-1")).unwrap();
        for part in [
            "100.64.0.2",
            "tag:db",
            "direct 192.0.2.20:51820",
            "12s ago",
            "2.0 KiB",
            "10 B",
        ] {
            assert!(db.contains(part), "{part} missing from {db:?}");
        }
        let laptop = text.lines().find(|l| l.starts_with("laptop")).unwrap();
        assert!(laptop.contains("never"), "{laptop}");
        assert!(laptop.contains("relay fra1"), "{laptop}");
    }

    #[test]
    fn ages_are_rounded_to_one_unit() {
        assert_eq!(ago(Duration::from_secs(12)), "12s ago");
        assert_eq!(ago(Duration::from_secs(125)), "2m ago");
        assert_eq!(ago(Duration::from_secs(7200)), "2h ago");
        assert_eq!(ago(Duration::from_secs(3 * 86_400)), "3d ago");
    }

    #[test]
    fn connected_line_matches_the_documented_form() {
        let me = SelfStatus {
            hostname: "web-1".into(),
            addresses: vec![
                "100.64.0.1".parse().unwrap(),
                "fd7a:115c:a1e0::1".parse().unwrap(),
            ],
            identity: "tag:web".into(),
            id: 1,
            node_key: "AAAA".into(),
            key_expiry: None,
        };
        assert_eq!(
            connected(&me),
            "connected as web-1 (100.64.0.1, fd7a:115c:a1e0::1) identity tag:web"
        );
    }
}
