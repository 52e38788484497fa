//! How the device connects the core's path finding to the world: relay
//! sessions, the host's addresses, the advertisement the control session
//! reports, `weft ping` and `weft netcheck`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use weft_proto::RelayInfo;

use super::control_surface::{
    NetcheckReport, PingReply, PingRequest, ReflexiveEndpoint, RelayReport,
};
use super::relays::{CoreUpdate, RelayEvent, SessionState};
use super::{endpoints, CommandError, Device, PacketIo, Platform};
use weft_dataplane::core::{Event, NatMapping, Netcheck, PeerStatus};

/// A `weft ping` probe waiting for its pong.
#[derive(Debug)]
pub(super) struct PendingPing {
    reply: oneshot::Sender<Result<PingReply, CommandError>>,
    peer: String,
    address: Option<IpAddr>,
}

impl<T: PacketIo, P: Platform> Device<T, P> {
    /// The coordinator listed the relays: the core learns them (for STUN
    /// and relayed paths) and a session runs for each.
    pub(super) fn on_relays(&mut self, relays: &[RelayInfo]) {
        let names: Vec<&str> = relays.iter().map(|r| r.name.as_str()).collect();
        tracing::info!(relays = ?names, "relays listed");
        let now = Instant::now();
        self.core.set_relays(relays, now);
        for gone in self.relays.set(relays, &self.node_key) {
            self.core.relay_disconnected(&gone, now);
        }
    }

    /// The node key rotated: relays authenticate sessions by it, so every
    /// session reconnects with the new one.
    pub(super) fn rekey_relays(&mut self) {
        let now = Instant::now();
        for gone in self.relays.rekey(&self.node_key) {
            self.core.relay_disconnected(&gone, now);
        }
    }

    /// Ends every relay session and answers waiting pings: the overlay is
    /// withdrawn.
    pub(super) fn stop_relays(&mut self) {
        let now = Instant::now();
        for gone in self.relays.stop() {
            self.core.relay_disconnected(&gone, now);
        }
        // The coordinator lists them again to the next session.
        self.core.set_relays(&[], now);
        for (_, pending) in self.pings.drain() {
            let _ = pending.reply.send(Err(CommandError::Invalid(
                "the node left the overlay (`weft down`) before the pong".into(),
            )));
        }
        self.local_endpoints = None;
        self.advertisement.send_modify(|a| a.home_relay = None);
    }

    pub(super) fn on_relay_event(&mut self, event: &RelayEvent) {
        let now = Instant::now();
        match self.relays.on_event(event) {
            Some(CoreUpdate::Connected(relay, rtt)) => self.core.relay_connected(relay, rtt, now),
            Some(CoreUpdate::Disconnected(relay)) => self.core.relay_disconnected(relay, now),
            Some(CoreUpdate::Packet(relay, from, payload)) => {
                self.core.handle_relayed(relay, from, payload, now);
            }
            None => {}
        }
    }

    /// Tells the core the host's addresses when they changed: the node
    /// moved (roaming), or an interface came or went.
    pub(super) fn poll_local_endpoints(&mut self) {
        let endpoints = match endpoints::local_endpoints(&self.platform, self.wireguard_port) {
            Ok(endpoints) => endpoints,
            Err(e) => {
                tracing::debug!("cannot list the host's addresses: {e}");
                return;
            }
        };
        if self.local_endpoints.as_ref() == Some(&endpoints) {
            return;
        }
        let now = Instant::now();
        if self.local_endpoints.is_some() {
            tracing::info!(?endpoints, "the host's addresses changed");
            for gone in self.relays.reconnect_tcp(&self.node_key) {
                self.core.relay_disconnected(&gone, now);
            }
        }
        self.core.set_local_endpoints(endpoints.clone(), now);
        self.local_endpoints = Some(endpoints);
    }

    /// Acts on everything the core asked for or reported.
    pub(super) fn drain_events(&mut self) {
        while let Some(event) = self.core.poll_event() {
            match event {
                Event::Advertise(advertisement) => {
                    tracing::debug!(endpoints = ?advertisement.endpoints, home_relay = ?advertisement.home_relay, "advertisement changed");
                    self.advertisement.send_replace(advertisement);
                }
                Event::Pong {
                    id,
                    path,
                    relay,
                    endpoint,
                    rtt,
                    ..
                } => {
                    if let Some(pending) = self.pings.remove(&id) {
                        let reply = PingReply {
                            peer: pending.peer,
                            address: pending.address,
                            pong: true,
                            path: Some(path),
                            relay,
                            endpoint,
                            rtt_ms: Some(millis(rtt)),
                        };
                        let _ = pending.reply.send(Ok(reply));
                    }
                }
                Event::PingTimeout { id, .. } => {
                    if let Some(pending) = self.pings.remove(&id) {
                        let _ = pending.reply.send(Ok(PingReply {
                            peer: pending.peer,
                            address: pending.address,
                            pong: false,
                            path: None,
                            relay: None,
                            endpoint: None,
                            rtt_ms: None,
                        }));
                    }
                }
            }
        }
        while let Some(transmit) = self.core.poll_relay_transmit() {
            self.relays
                .send(&transmit.relay, transmit.to, transmit.payload);
        }
    }

    /// `weft ping`: one disco ping, answered from [`Device::drain_events`].
    pub(super) fn on_ping(
        &mut self,
        request: &PingRequest,
        reply: oneshot::Sender<Result<PingReply, CommandError>>,
    ) {
        let peers = self.core.peers();
        let peer = match find_peer(&peers, &request.peer) {
            Ok(peer) => peer,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let Some(id) = self.core.ping(peer.id, Instant::now()) else {
            let _ = reply.send(Err(CommandError::NotFound(format!(
                "{} left the netmap; `weft status` lists the peers",
                peer.name
            ))));
            return;
        };
        self.pings.insert(
            id,
            PendingPing {
                reply,
                peer: peer.name.clone(),
                address: peer.addresses.first().copied(),
            },
        );
    }

    /// `weft netcheck`.
    pub(super) fn netcheck(&self) -> NetcheckReport {
        report(self.core.netcheck(), &self.relays.states())
    }
}

/// The peer named `query`, or owning the overlay address `query`.
fn find_peer<'a>(peers: &'a [PeerStatus], query: &str) -> Result<&'a PeerStatus, CommandError> {
    let query = query.trim();
    if query.is_empty() {
        return Err(CommandError::Invalid(
            "no peer given; name a peer or one of its overlay addresses".into(),
        ));
    }
    let by_address = query.parse::<IpAddr>().ok();
    peers
        .iter()
        .find(|p| p.name == query || by_address.is_some_and(|a| p.addresses.contains(&a)))
        .ok_or_else(|| {
            CommandError::NotFound(format!(
                "no peer named or addressed {query}; `weft status` lists the peers"
            ))
        })
}

/// Merges the core's discovery results with the sessions' transports:
/// the core's relays in its order (home first), then any session it has
/// no latency for.
fn report(found: Netcheck, sessions: &[SessionState]) -> NetcheckReport {
    let session = |name: &str| sessions.iter().find(|s| s.name == name);
    let relay = |name: String, home: bool, rtt: Option<Duration>| {
        let state = session(&name);
        RelayReport {
            home,
            transport: state.and_then(|s| s.transport),
            rtt_ms: rtt.map(millis),
            max_payload: state.and_then(|s| s.max_payload),
            oversized: state.map_or(0, |s| s.oversized),
            dropped: state.map_or(0, |s| s.dropped),
            name,
        }
    };
    let mut relays: Vec<RelayReport> = Vec::new();
    for latency in found.relays {
        relays.push(relay(latency.name, latency.home, latency.rtt));
    }
    for state in sessions {
        if !relays.iter().any(|r| r.name == state.name) {
            relays.push(relay(state.name.clone(), false, None));
        }
    }
    NetcheckReport {
        udp: found.udp,
        mapping: found.mapping.map(|m| {
            match m {
                NatMapping::EndpointIndependent => "endpoint-independent",
                NatMapping::EndpointDependent => "endpoint-dependent",
            }
            .to_owned()
        }),
        reflexive: found
            .reflexive
            .into_iter()
            .map(|r| ReflexiveEndpoint {
                relay: r.relay,
                endpoint: r.endpoint,
            })
            .collect(),
        local: found.local,
        relays,
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use weft_proto::{Identity, NodeId};

    use super::*;
    use crate::device::RelayTransport;
    use weft_dataplane::core::{Reflection, RelayLatency};

    fn peer(id: u64, name: &str, address: &str) -> PeerStatus {
        PeerStatus {
            id: NodeId(id),
            name: name.into(),
            addresses: vec![address.parse().unwrap()],
            identity: Identity::default(),
            endpoint: None,
            path: None,
            relay: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn a_peer_is_found_by_name_or_overlay_address() {
        let peers = [peer(1, "web-1", "100.64.0.1"), peer(2, "db", "100.64.0.2")];
        assert_eq!(find_peer(&peers, "db").unwrap().id, NodeId(2));
        assert_eq!(find_peer(&peers, " 100.64.0.1 ").unwrap().id, NodeId(1));
        let unknown = find_peer(&peers, "100.64.0.9").unwrap_err();
        assert!(matches!(unknown, CommandError::NotFound(_)), "{unknown}");
        assert!(unknown.to_string().contains("weft status"), "{unknown}");
        assert!(matches!(
            find_peer(&peers, "  ").unwrap_err(),
            CommandError::Invalid(_)
        ));
    }

    #[test]
    fn the_report_merges_latencies_with_session_transports() {
        let found = Netcheck {
            reflexive: vec![Reflection {
                relay: "fra1".into(),
                endpoint: "203.0.113.7:51820".parse().unwrap(),
            }],
            mapping: Some(NatMapping::EndpointDependent),
            udp: true,
            relays: vec![
                RelayLatency {
                    name: "fra1".into(),
                    rtt: Some(Duration::from_micros(1500)),
                    home: true,
                },
                RelayLatency {
                    name: "ams1".into(),
                    rtt: None,
                    home: false,
                },
            ],
            local: vec!["198.18.1.2:51820".parse().unwrap()],
        };
        let state = |name: &str, transport| SessionState {
            name: name.into(),
            transport,
            max_payload: None,
            oversized: 0,
            dropped: 4,
        };
        let sessions = [
            state("ams1", None),
            state("fra1", Some(RelayTransport::Tcp)),
            state("nyc1", Some(RelayTransport::Quic)),
        ];
        let report = report(found, &sessions);
        assert_eq!(report.mapping.as_deref(), Some("endpoint-dependent"));
        assert_eq!(report.reflexive[0].relay, "fra1");
        let relays: Vec<_> = report
            .relays
            .iter()
            .map(|r| (r.name.as_str(), r.home, r.transport, r.rtt_ms, r.dropped))
            .collect();
        assert_eq!(
            relays,
            [
                ("fra1", true, Some(RelayTransport::Tcp), Some(1.5), 4),
                ("ams1", false, None, None, 4),
                ("nyc1", false, Some(RelayTransport::Quic), None, 4),
            ]
        );
    }
}
