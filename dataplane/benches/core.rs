//! Per-packet cost of the data-plane core, without IO: a 1,400-byte TCP
//! segment encapsulated by one node, decapsulated and filtered by the other,
//! between two in-memory `Node`s with an established session, over a direct
//! path and through a relay. Output buffers are recycled as the daemon
//! does, so a regression that allocates per packet shows.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::IpNet;
use weft_dataplane::core::Node;
use weft_proto::{
    DefaultAction, FilterRule, Identity, NetMap, NodeId, PacketFilter, Peer, PortRange, PrivateKey,
    Protocol, PublicKey, RelayInfo, RuleAction, SelfNode,
};

const PAYLOAD: usize = 1_400;

struct Side {
    id: NodeId,
    key: PrivateKey,
    public: PublicKey,
    v4: Ipv4Addr,
    underlay: SocketAddr,
}

impl Side {
    fn new(n: u8) -> Self {
        let key = PrivateKey::generate();
        Self {
            id: NodeId(u64::from(n)),
            public: key.public_key(),
            key,
            v4: Ipv4Addr::new(100, 64, 0, n),
            underlay: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 41641),
        }
    }

    fn peer(&self, relayed: bool) -> Peer {
        Peer {
            id: self.id,
            name: format!("node{}", self.id.0),
            node_key: self.public,
            addresses: vec![IpAddr::V4(self.v4)],
            endpoints: if relayed {
                Vec::new()
            } else {
                vec![self.underlay]
            },
            home_relay: relayed.then(|| RELAY.to_owned()),
            identity: Identity::default(),
        }
    }

    /// The netmap naming `other` as the only peer, admitting TCP to port
    /// 5201; `relayed`: the peer advertises no endpoint, only a home relay.
    fn netmap(&self, other: &Side, relayed: bool) -> NetMap {
        NetMap {
            revision: 1,
            self_node: SelfNode {
                id: self.id,
                name: format!("node{}", self.id.0),
                ipv4: self.v4,
                ipv6: "fd7a:115c:a1e0::1"
                    .parse()
                    .unwrap_or(std::net::Ipv6Addr::LOCALHOST),
                identity: Identity::default(),
                key_expiry: None,
            },
            peers: vec![other.peer(relayed)],
            filter: PacketFilter {
                rules: vec![FilterRule {
                    src: vec![IpNet::from(IpAddr::V4(other.v4))],
                    dst: vec![IpNet::from(IpAddr::V4(self.v4))],
                    ports: vec![PortRange {
                        first: 5201,
                        last: 5201,
                    }],
                    protocols: vec![Protocol::Tcp],
                    action: RuleAction::Accept,
                    policy_line: 1,
                    rule_id: weft_proto::RuleId::default(),
                }],
                default: DefaultAction::Deny,
            },
            capabilities: Vec::new(),
        }
    }
}

/// An IPv4 TCP ACK segment carrying `PAYLOAD` bytes, with a valid header checksum.
fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let total = 20 + 20 + PAYLOAD;
    let mut packet = vec![0u8; total];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    packet[8] = 64;
    packet[9] = 6;
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    let sum = packet[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    packet[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
    packet[22..24].copy_from_slice(&5201u16.to_be_bytes());
    packet[32] = 5 << 4;
    packet[33] = 0x10;
    packet
}

const RELAY: &str = "fra1";

/// Moves datagrams (UDP and relayed) between the two nodes until neither
/// has any left; returns how many packets reached `b`'s TUN device.
fn settle(a: &mut Node, b: &mut Node, sa: &Side, sb: &Side, now: Instant) -> usize {
    let mut delivered = 0;
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            moved = true;
            b.handle_udp(sa.underlay, &t.payload, now);
            a.recycle(t.payload);
        }
        while let Some(t) = b.poll_transmit() {
            moved = true;
            a.handle_udp(sb.underlay, &t.payload, now);
            b.recycle(t.payload);
        }
        while let Some(t) = a.poll_relay_transmit() {
            moved = true;
            b.handle_relayed(&t.relay, sa.public, &t.payload, now);
            a.recycle(t.payload);
        }
        while let Some(t) = b.poll_relay_transmit() {
            moved = true;
            a.handle_relayed(&t.relay, sb.public, &t.payload, now);
            b.recycle(t.payload);
        }
        while let Some(packet) = b.poll_tun_packet() {
            delivered += 1;
            b.recycle(packet);
        }
        if !moved {
            return delivered;
        }
    }
}

fn encapsulate_filter_decapsulate(c: &mut Criterion) {
    let mut group = c.benchmark_group("core");
    for (name, relayed) in [
        ("tcp_1400_a_to_b", false),
        ("tcp_1400_a_to_b_relayed", true),
    ] {
        bench_path(&mut group, name, relayed);
    }
    group.finish();
}

#[expect(
    clippy::disallowed_methods,
    reason = "the nodes start at the real clock and a fixed seed, like the daemon's"
)]
fn bench_path(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    relayed: bool,
) {
    let now = Instant::now();
    let (sa, sb) = (Side::new(1), Side::new(2));
    let wall = std::time::SystemTime::now();
    let mut a = Node::new(sa.key.clone(), now, wall, 1);
    let mut b = Node::new(sb.key.clone(), now, wall, 2);
    if relayed {
        let relay = RelayInfo {
            name: RELAY.into(),
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 7444),
            key: PrivateKey::generate().public_key(),
            tcp_address: None,
            stun_address: None,
        };
        for node in [&mut a, &mut b] {
            node.set_relays(std::slice::from_ref(&relay), now);
            node.relay_connected(RELAY, Duration::from_millis(5), now);
        }
    }
    a.set_netmap(&sa.netmap(&sb, relayed), now);
    b.set_netmap(&sb.netmap(&sa, relayed), now);
    let packet = tcp_segment(sa.v4, sb.v4);
    a.handle_tun_packet(&packet, now);
    settle(&mut a, &mut b, &sa, &sb, now);
    a.handle_tun_packet(&packet, now);
    assert_eq!(
        settle(&mut a, &mut b, &sa, &sb, now),
        1,
        "the session is up and the filter admits the segment"
    );

    group.throughput(Throughput::Bytes(packet.len() as u64));
    group.bench_function(name, |bench| {
        bench.iter(|| {
            a.handle_tun_packet(black_box(&packet), now);
            let delivered = settle(&mut a, &mut b, &sa, &sb, now);
            black_box(delivered)
        });
    });
}

criterion_group!(benches, encapsulate_filter_decapsulate);
criterion_main!(benches);
