//! Data-plane flow reports as the records the coordinator keeps: wall-clock
//! times, both ends' identities from the netmap, the path, and the flow id
//! both ends compute alike.

use std::net::{IpAddr, SocketAddr};
use std::time::{Instant, SystemTime};

use weft_dataplane::core::{Node, PathKind};
use weft_dataplane::filter::FlowReport;
use weft_proto::flows::{DenialSummary, MAX_FIELD_LEN, MAX_LIST_LEN};
use weft_proto::{
    FlowDirection, FlowEndpoint, FlowId, FlowPath, FlowRecord, FlowVerdict, Identity, Protocol,
    SelfNode,
};

/// One reading of both clocks, to turn the data plane's instants into
/// wall-clock times. Taken afresh for each drain, so a wall clock that was
/// stepped shows in the next records.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    instant: Instant,
    wall: SystemTime,
}

impl Anchor {
    /// Both clocks read together.
    pub fn new(instant: Instant, wall: SystemTime) -> Self {
        Self { instant, wall }
    }

    /// `at` in milliseconds since the Unix epoch.
    pub fn unix_ms(&self, at: Instant) -> u64 {
        let wall = if at >= self.instant {
            self.wall.checked_add(at - self.instant)
        } else {
            self.wall.checked_sub(self.instant - at)
        };
        wall.and_then(|wall| wall.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }
}

/// Who the ends of a flow are: this node, or a peer in the core's netmap.
#[derive(Debug, Clone, Copy)]
pub struct Ends<'a> {
    /// This node, once registered.
    pub me: Option<&'a SelfNode>,
    /// The data plane, for peers and their paths.
    pub core: &'a Node,
}

impl Ends<'_> {
    /// The endpoint at `address`, and the path to it when it is a peer.
    fn endpoint(&self, address: IpAddr) -> (FlowEndpoint, FlowPath) {
        if let Some(me) = self.me.filter(|me| me.addresses().contains(&address)) {
            let endpoint = FlowEndpoint {
                node: Some(me.id),
                name: Some(cut(&me.name)),
                identity: cut_identity(&me.identity),
            };
            return (endpoint, FlowPath::Unknown);
        }
        let Some(route) = self.core.peer_route(address) else {
            return (FlowEndpoint::default(), FlowPath::Unknown);
        };
        let path = match (route.path, route.relay) {
            (Some(PathKind::Direct), _) => FlowPath::Direct,
            (Some(PathKind::Relay), Some(relay)) => FlowPath::Relay { name: cut(&relay) },
            _ => FlowPath::Unknown,
        };
        let endpoint = FlowEndpoint {
            node: Some(route.peer.id),
            name: Some(cut(&route.peer.name)),
            identity: cut_identity(&route.peer.identity),
        };
        (endpoint, path)
    }
}

/// The record of `report`, with times read against `anchor`.
pub fn record(report: &FlowReport, ends: &Ends<'_>, anchor: &Anchor) -> FlowRecord {
    let key = &report.key;
    let protocol = protocol_number(key.protocol, key.src);
    let src = SocketAddr::new(key.src, key.src_port);
    let dst = SocketAddr::new(key.dst, key.dst_port);
    let id = FlowId::compute(protocol, src, dst, report.discriminator);
    let opened = report.verdict == FlowVerdict::Opened;
    let (src_identity, src_path) = ends.endpoint(key.src);
    let (dst_identity, dst_path) = ends.endpoint(key.dst);
    let summary = report.denied.as_ref().map(|denied| DenialSummary {
        flows: denied.flows,
        more_ids: denied
            .samples
            .iter()
            .skip(1)
            .map(|&(port, discriminator)| {
                FlowId::compute(protocol, SocketAddr::new(key.src, port), dst, discriminator)
            })
            .collect(),
    });
    FlowRecord {
        id,
        start_ms: anchor.unix_ms(report.start),
        end_ms: anchor.unix_ms(report.end),
        protocol,
        // A summary groups the opener's ports.
        src: if summary.is_some() {
            SocketAddr::new(key.src, 0)
        } else {
            src
        },
        dst,
        direction: if opened {
            FlowDirection::Outbound
        } else {
            FlowDirection::Inbound
        },
        verdict: report.verdict,
        rule: report.rule,
        src_identity,
        dst_identity,
        // The far end's path: the peer this node opened to, or the one
        // that opened to it.
        path: if opened { dst_path } else { src_path },
        to_dst: report.to_dst,
        to_src: report.to_src,
        ended: report.ended,
        summary,
    }
}

/// The IP protocol number: ICMP is 1 over IPv4 and 58 over IPv6.
fn protocol_number(protocol: Protocol, address: IpAddr) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Icmp if address.is_ipv4() => 1,
        Protocol::Icmp => 58,
        Protocol::Other(number) => number,
    }
}

/// `text` cut to [`MAX_FIELD_LEN`] bytes on a character boundary.
fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_FIELD_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// `identity` with every string and list within the record's limits.
fn cut_identity(identity: &Identity) -> Identity {
    let list = |items: &[String]| items.iter().take(MAX_LIST_LEN).map(|s| cut(s)).collect();
    Identity {
        user: identity.user.as_deref().map(cut),
        groups: list(&identity.groups),
        workload: identity.workload.as_deref().map(cut),
        tags: list(&identity.tags),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weft_dataplane::filter::{DeniedFlows, FlowKey};
    use weft_proto::{NetMap, NodeId, Peer, PrivateKey, RuleId, RuleRef, Traffic};

    use super::*;
    use crate::control::fixtures::{empty_netmap, peer, self_node};

    /// A data plane whose netmap has `peers`, for `me`.
    fn core(me: &SelfNode, peers: Vec<Peer>) -> Node {
        let mut node = Node::new(PrivateKey::generate(), Instant::now(), SystemTime::now(), 1);
        let netmap = NetMap {
            self_node: me.clone(),
            peers,
            ..empty_netmap()
        };
        node.set_netmap(&netmap, Instant::now());
        node
    }

    fn report(key: FlowKey, verdict: FlowVerdict, at: Instant) -> FlowReport {
        FlowReport {
            key,
            discriminator: 9,
            verdict,
            rule: None,
            start: at,
            end: at + Duration::from_millis(1500),
            to_dst: Traffic {
                packets: 3,
                bytes: 300,
            },
            to_src: Traffic::default(),
            ended: true,
            denied: None,
        }
    }

    #[test]
    fn both_ends_name_each_other_and_compute_one_flow_id() {
        let web = self_node();
        let db = peer(7);
        let db_self = SelfNode {
            id: db.id,
            name: db.name.clone(),
            ipv4: "100.64.0.7".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::7".parse().unwrap(),
            identity: db.identity.clone(),
            key_expiry: None,
        };
        let web_peer = Peer {
            id: web.id,
            name: web.name.clone(),
            addresses: web.addresses().to_vec(),
            identity: web.identity.clone(),
            ..peer(4)
        };
        let on_web = core(&web, vec![db.clone()]);
        let on_db = core(&db_self, vec![web_peer]);
        let key = FlowKey {
            protocol: Protocol::Tcp,
            src: "100.64.0.4".parse().unwrap(),
            src_port: 40000,
            dst: "100.64.0.7".parse().unwrap(),
            dst_port: 5432,
        };
        let now = Instant::now();
        let anchor = Anchor::new(now, SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        let opened = record(
            &report(key, FlowVerdict::Opened, now),
            &Ends {
                me: Some(&web),
                core: &on_web,
            },
            &anchor,
        );
        let mut accepted = report(key, FlowVerdict::Accept, now);
        accepted.rule = Some(RuleRef {
            line: 3,
            id: RuleId(5),
        });
        let accepted = record(
            &accepted,
            &Ends {
                me: Some(&db_self),
                core: &on_db,
            },
            &anchor,
        );
        assert_eq!(opened.id, accepted.id);
        assert_eq!(
            opened.id,
            FlowId::compute(
                6,
                "100.64.0.4:40000".parse().unwrap(),
                "100.64.0.7:5432".parse().unwrap(),
                9
            )
        );
        assert_eq!((opened.start_ms, opened.end_ms), (1_000_000, 1_001_500));
        for r in [&opened, &accepted] {
            assert_eq!(r.src_identity.node, Some(NodeId(4)));
            assert_eq!(r.src_identity.name.as_deref(), Some("web-1"));
            assert_eq!(r.dst_identity.node, Some(NodeId(7)));
            assert_eq!(r.dst_identity.identity.tags, ["tag:db"]);
            assert_eq!(r.path, FlowPath::Direct, "both peers have an endpoint");
            assert_eq!(r.to_dst.bytes, 300);
        }
        assert_eq!(opened.direction, FlowDirection::Outbound);
        assert_eq!(accepted.direction, FlowDirection::Inbound);
        assert_eq!(accepted.rule.map(|r| r.line), Some(3));
    }

    #[test]
    fn long_names_and_lists_are_cut_and_unknown_ends_stay_anonymous() {
        let web = self_node();
        let mut db = peer(7);
        db.name = "é".repeat(MAX_FIELD_LEN);
        db.identity.groups = vec!["group:idp:x".into(); MAX_LIST_LEN + 5];
        db.identity.user = Some(format!("{}@example.com", "u".repeat(MAX_FIELD_LEN)));
        let node = core(&web, vec![db]);
        let ends = Ends {
            me: Some(&web),
            core: &node,
        };
        let now = Instant::now();
        let key = |dst: &str| FlowKey {
            protocol: Protocol::Icmp,
            src: "fd7a:115c:a1e0::4".parse().unwrap(),
            src_port: 3,
            dst: dst.parse().unwrap(),
            dst_port: 0,
        };
        let anchor = Anchor::new(now, SystemTime::now());
        let cut = record(
            &report(key("100.64.0.7"), FlowVerdict::Opened, now),
            &ends,
            &anchor,
        );
        let name = cut.dst_identity.name.unwrap();
        assert!(name.len() <= MAX_FIELD_LEN && name.chars().all(|c| c == 'é'));
        assert_eq!(cut.dst_identity.identity.groups.len(), MAX_LIST_LEN);
        assert!(cut.dst_identity.identity.user.unwrap().len() <= MAX_FIELD_LEN);

        let unknown = record(
            &report(key("fd7a:115c:a1e0::99"), FlowVerdict::Opened, now),
            &ends,
            &anchor,
        );
        assert_eq!(unknown.protocol, 58, "ICMPv6");
        assert_eq!(unknown.dst_identity, FlowEndpoint::default());
        assert_eq!(unknown.path, FlowPath::Unknown);
    }

    #[test]
    fn a_denial_summary_groups_ports_and_names_its_flows() {
        let web = self_node();
        let node = core(&web, vec![peer(7)]);
        let ends = Ends {
            me: Some(&web),
            core: &node,
        };
        let now = Instant::now();
        let key = FlowKey {
            protocol: Protocol::Udp,
            src: "100.64.0.7".parse().unwrap(),
            src_port: 1,
            dst: "100.64.0.4".parse().unwrap(),
            dst_port: 53,
        };
        let mut denied = report(key, FlowVerdict::Deny, now);
        denied.discriminator = 0;
        denied.denied = Some(DeniedFlows {
            flows: 5,
            samples: vec![(1, 0), (2, 0), (3, 0)],
        });
        let summary = record(&denied, &ends, &Anchor::new(now, SystemTime::now()));
        let flow = |port| {
            FlowId::compute(
                17,
                SocketAddr::new(key.src, port),
                "100.64.0.4:53".parse().unwrap(),
                0,
            )
        };
        assert_eq!(summary.src.port(), 0);
        assert_eq!(summary.id, flow(1));
        let got = summary.summary.unwrap();
        assert_eq!((got.flows, got.more_ids), (5, vec![flow(2), flow(3)]));
        assert_eq!(summary.src_identity.node, Some(NodeId(7)));
    }
}
