//! Per-packet cost of the inbound filter: a packet of an established flow,
//! and the rule decision for a new flow, with 10, 100 and 1,000 rules. Both
//! should stay flat as rules grow.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ipnet::IpNet;
use weft_dataplane::filter::{parse, Filter, Firewall, Query};
use weft_proto::{DefaultAction, FilterRule, PacketFilter, PortRange, Protocol, RuleAction};

const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);

/// `count` rules the way a busy node gets them: each admits one source
/// (host or /24) to one port, with a deny rule every tenth.
fn rules(count: u32) -> PacketFilter {
    let rules = (0..count)
        .map(|i| {
            let [_, _, hi, lo] = (0x6440_0000_u32 + 2 + i).to_be_bytes();
            let src: IpNet = if i % 3 == 0 {
                IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(100, 65, (i % 256) as u8, 0)), 24)
            } else {
                IpNet::from(IpAddr::V4(Ipv4Addr::new(100, 64, hi, lo)))
            };
            let port = 1000 + (i % 5000) as u16;
            FilterRule {
                src: vec![src],
                dst: vec![IpNet::from(IpAddr::V4(ME))],
                ports: vec![PortRange {
                    first: port,
                    last: port + (i % 4) as u16,
                }],
                protocols: vec![Protocol::Tcp],
                action: if i % 10 == 9 {
                    RuleAction::Deny
                } else {
                    RuleAction::Accept
                },
                policy_line: i + 1,
                rule_id: weft_proto::RuleId::default(),
            }
        })
        .collect();
    PacketFilter {
        rules,
        default: DefaultAction::Deny,
    }
}

/// A TCP segment from `src:sport` to this node's port `dport`.
fn tcp(src: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&ME.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[32] = 0x50;
    p[33] = 0x10;
    p
}

#[expect(
    clippy::disallowed_methods,
    reason = "flows are stamped with the real clock"
)]
fn bench(c: &mut Criterion) {
    let mut established = c.benchmark_group("established_flow");
    for count in [10u32, 100, 1_000] {
        let filter = rules(count);
        let mut fw = Firewall::default();
        fw.set_filter(&filter);
        // The last host rule that admits: an accept for a /32.
        let i = (0..count)
            .rev()
            .find(|i| i % 3 != 0 && i % 10 != 9)
            .unwrap_or(1);
        let [_, _, hi, lo] = (0x6440_0000_u32 + 2 + i).to_be_bytes();
        let src = Ipv4Addr::new(100, 64, hi, lo);
        let packet = tcp(src, 50_000, 1000 + (i % 5000) as u16);
        let Ok(headers) = parse(&packet) else {
            return;
        };
        let now = Instant::now();
        // Fill the table so lookups are not in a near-empty map.
        for port in 1..5_000u16 {
            if let Ok(h) = parse(&tcp(Ipv4Addr::new(100, 66, 0, 1), port, 1000)) {
                fw.outbound(&h, 40, now);
            }
        }
        fw.inbound(&headers, 40, now);
        established.bench_with_input(BenchmarkId::from_parameter(count), &headers, |b, h| {
            b.iter(|| fw.inbound(black_box(h), 40, now))
        });
    }
    established.finish();

    let mut new_flow = c.benchmark_group("new_flow_decision");
    for count in [10u32, 100, 1_000] {
        let filter = Filter::new(&rules(count));
        let i = count - 2;
        let [_, _, hi, lo] = (0x6440_0000_u32 + 2 + i).to_be_bytes();
        let query = Query {
            protocol: Protocol::Tcp,
            src: IpAddr::V4(Ipv4Addr::new(100, 64, hi, lo)),
            dst: IpAddr::V4(ME),
            dst_port: Some(1000 + (i % 5000) as u16),
        };
        new_flow.bench_with_input(BenchmarkId::from_parameter(count), &query, |b, q| {
            b.iter(|| filter.evaluate(black_box(q)))
        });
    }
    new_flow.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
