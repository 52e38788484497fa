//! Cost of the flow record path: a flow admitted, tracked and reported
//! ended, then drained, 1,024 at a time; and a denied packet summed into
//! its denial summary. The established-flow packet, which only adds to the
//! flow's counters, is `filter`'s `established_flow`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::IpNet;
use weft_dataplane::filter::{parse, Firewall, Headers, SUMMARY_INTERVAL};
use weft_proto::{DefaultAction, FilterRule, PacketFilter, PortRange, Protocol, RuleAction};

const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const FLOWS: u16 = 1_024;

/// A UDP datagram from the peer's `sport` to this node's `dport`.
fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 36];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&36u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&PEER.octets());
    p[16..20].copy_from_slice(&ME.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&16u16.to_be_bytes());
    p
}

/// A filter admitting the peer's UDP to port 53 only.
fn dns_only() -> PacketFilter {
    PacketFilter {
        rules: vec![FilterRule {
            src: vec![IpNet::from(IpAddr::V4(PEER))],
            dst: vec![IpNet::from(IpAddr::V4(ME))],
            ports: vec![PortRange {
                first: 53,
                last: 53,
            }],
            protocols: vec![Protocol::Udp],
            action: RuleAction::Accept,
            policy_line: 1,
            rule_id: weft_proto::RuleId::of_text("dns"),
        }],
        default: DefaultAction::Deny,
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "flows are stamped with the real clock"
)]
fn bench(c: &mut Criterion) {
    let now = Instant::now();
    let opening: Vec<Headers> = (0..FLOWS)
        .filter_map(|port| parse(&udp(10_000 + port, 53)).ok())
        .collect();
    let mut group = c.benchmark_group("flow_records");
    group.throughput(Throughput::Elements(u64::from(FLOWS)));
    let mut fw = Firewall::default();
    fw.set_filter(&dns_only());
    group.bench_function("admit_end_and_drain_1024", |b| {
        b.iter(|| {
            for headers in &opening {
                fw.inbound(black_box(headers), 36, now);
            }
            fw.forget_addresses(&[IpAddr::V4(PEER)]);
            let mut drained = 0;
            while let Some(report) = fw.poll_report() {
                drained += report.to_dst.packets;
            }
            drained
        })
    });
    group.finish();

    let mut denied = c.benchmark_group("flow_records");
    let Ok(refused) = parse(&udp(40_000, 22)) else {
        return;
    };
    let mut fw = Firewall::default();
    fw.set_filter(&dns_only());
    let mut at = now;
    let mut packets = 0u32;
    denied.bench_function("denied_packet", |b| {
        b.iter(|| {
            packets += 1;
            // A new interval now and then, so summaries are reported and
            // drained as they are on a node.
            if packets % 100_000 == 0 {
                at += SUMMARY_INTERVAL;
                fw.handle_timeout(at);
                while fw.poll_report().is_some() {}
            }
            fw.inbound(black_box(&refused), 36, at)
        })
    });
    denied.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
