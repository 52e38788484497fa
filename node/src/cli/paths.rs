//! `weft ping PEER` and `weft netcheck`: how this node reaches its peers
//! and the relays.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::api::{ApiClient, NetcheckReport, PingReply, PingRequest, RelayTransport};

/// Probes are sent at most this often.
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Sends `count` probes, one per second, and prints each answer; fails
/// when none came back.
pub(crate) async fn ping(
    client: &ApiClient,
    peer: &str,
    count: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request = PingRequest {
        peer: peer.to_owned(),
    };
    let mut pongs = 0u32;
    for probe in 0..count {
        let sent = Instant::now();
        let reply = client.ping(&request).await?;
        pongs += u32::from(reply.pong);
        if json {
            println!("{}", serde_json::to_string(&reply)?);
        } else {
            println!("{}", ping_line(&reply));
        }
        if probe + 1 < count {
            tokio::time::sleep(PING_INTERVAL.saturating_sub(sent.elapsed())).await;
        }
    }
    Ok(if pongs == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints what endpoint discovery found and how each relay is reached.
pub(crate) async fn netcheck(client: &ApiClient, json: bool) -> anyhow::Result<ExitCode> {
    let report = client.netcheck().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", netcheck_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// `pong from web-1 (100.64.0.2) via relay fra1 in 1.82 ms`, or via the
/// direct endpoint, or a timeout.
fn ping_line(reply: &PingReply) -> String {
    let who = match reply.address {
        Some(address) => format!("{} ({address})", reply.peer),
        None => reply.peer.clone(),
    };
    if !reply.pong {
        return format!("timeout: no pong from {who} within 2 s");
    }
    let via = match (&reply.relay, reply.endpoint) {
        (Some(relay), _) => format!("relay {relay}"),
        (None, Some(endpoint)) => endpoint.to_string(),
        (None, None) => "an unknown path".to_owned(),
    };
    let rtt = reply
        .rtt_ms
        .map_or_else(String::new, |ms| format!(" in {ms:.2} ms"));
    format!("pong from {who} via {via}{rtt}")
}

fn netcheck_text(report: &NetcheckReport) -> String {
    let mut out = String::new();
    let yes_no = if report.udp { "yes" } else { "no" };
    let _ = writeln!(out, "UDP:        {yes_no}");
    let mapping = report.mapping.as_deref().unwrap_or("unknown");
    let _ = writeln!(out, "mapping:    {mapping}");
    if report.reflexive.is_empty() {
        let _ = writeln!(out, "reflexive:  none");
    }
    for found in &report.reflexive {
        let _ = writeln!(
            out,
            "reflexive:  {} (seen by {})",
            found.endpoint, found.relay
        );
    }
    let local: Vec<String> = report.local.iter().map(ToString::to_string).collect();
    let local = if local.is_empty() {
        "none".to_owned()
    } else {
        local.join(", ")
    };
    let _ = writeln!(out, "local:      {local}");
    if report.relays.is_empty() {
        let _ = writeln!(out, "relays:     none listed by the coordinator");
        return out;
    }
    let _ = writeln!(out, "relays:");
    let width = report
        .relays
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0);
    for relay in &report.relays {
        let transport = match relay.transport {
            Some(RelayTransport::Quic) => "quic",
            Some(RelayTransport::Tcp) => "tcp",
            None => "down",
        };
        let rtt = relay
            .rtt_ms
            .filter(|_| relay.transport.is_some())
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        let mut line = format!("  {:<width$}  {transport:<4}  {rtt:>9}", relay.name);
        if relay.home {
            line.push_str("  home");
        }
        if let Some(max) = relay.max_payload {
            let _ = write!(line, "  datagrams up to {max} B");
        }
        if relay.dropped > 0 {
            let _ = write!(line, ", {} packets dropped", relay.dropped);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PathKind, ReflexiveEndpoint, RelayReport};

    fn reply() -> PingReply {
        PingReply {
            peer: "web-1".into(),
            address: Some("100.64.0.2".parse().unwrap()),
            pong: true,
            path: Some(PathKind::Relay),
            relay: Some("fra1".into()),
            endpoint: None,
            rtt_ms: Some(1.8234),
        }
    }

    #[test]
    fn a_ping_line_names_the_path_and_the_rtt() {
        assert_eq!(
            ping_line(&reply()),
            "pong from web-1 (100.64.0.2) via relay fra1 in 1.82 ms"
        );
        let direct = PingReply {
            path: Some(PathKind::Direct),
            relay: None,
            endpoint: Some("203.0.113.7:51820".parse().unwrap()),
            rtt_ms: Some(0.41),
            ..reply()
        };
        assert_eq!(
            ping_line(&direct),
            "pong from web-1 (100.64.0.2) via 203.0.113.7:51820 in 0.41 ms"
        );
        let lost = PingReply {
            pong: false,
            path: None,
            relay: None,
            rtt_ms: None,
            ..reply()
        };
        assert_eq!(
            ping_line(&lost),
            "timeout: no pong from web-1 (100.64.0.2) within 2 s"
        );
    }

    #[test]
    fn netcheck_text_shows_udp_mapping_endpoints_and_relays() {
        let report = NetcheckReport {
            udp: true,
            mapping: Some("endpoint-independent".into()),
            reflexive: vec![ReflexiveEndpoint {
                relay: "fra1".into(),
                endpoint: "203.0.113.7:51820".parse().unwrap(),
            }],
            local: vec!["198.18.1.2:51820".parse().unwrap()],
            relays: vec![
                RelayReport {
                    name: "fra1".into(),
                    home: true,
                    transport: Some(RelayTransport::Quic),
                    rtt_ms: Some(1.84),
                    max_payload: Some(1380),
                    oversized: 3,
                    dropped: 2,
                },
                RelayReport {
                    name: "nyc".into(),
                    home: false,
                    transport: None,
                    rtt_ms: Some(80.0),
                    max_payload: None,
                    oversized: 0,
                    dropped: 0,
                },
            ],
        };
        let text = netcheck_text(&report);
        for line in [
            "UDP:        yes",
            "mapping:    endpoint-independent",
            "reflexive:  203.0.113.7:51820 (seen by fra1)",
            "local:      198.18.1.2:51820",
            "  fra1  quic     1.8 ms  home  datagrams up to 1380 B, 2 packets dropped",
            "  nyc   down          -",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        let blocked = NetcheckReport {
            udp: false,
            mapping: None,
            reflexive: vec![],
            local: vec![],
            relays: vec![],
        };
        let text = netcheck_text(&blocked);
        assert!(
            text.contains("UDP:        no\nmapping:    unknown\nreflexive:  none"),
            "{text}"
        );
        assert!(text.contains("none listed by the coordinator"), "{text}");
    }
}
