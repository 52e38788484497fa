//! Compiling a 1,000-rule policy for 10,000 nodes: in full, building the
//! incremental engine, and through the engine after one node changes.
//!
//! The overlay: 100 services of 100 tagged nodes each, and 2,000 people in
//! 20 groups. Rules: 900 service-to-service rules (a tag to another tag's
//! port), 90 group-to-service rules, and 10 deny rules.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use weft_policy::{Engine, NodeInfo, Policy};
use weft_proto::{Identity, NodeId};

const SERVICES: u32 = 100;
const PER_SERVICE: u32 = 80;
const PEOPLE: u32 = 2_000;

fn node(i: u32) -> NodeInfo {
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
    let identity = if i < SERVICES * PER_SERVICE {
        Identity::tagged(vec![format!("tag:svc{}", i / PER_SERVICE)])
    } else {
        Identity {
            user: Some(format!("user{}@example.com", i - SERVICES * PER_SERVICE)),
            ..Identity::default()
        }
    };
    NodeInfo {
        id: NodeId(u64::from(i)),
        name: format!("n{i}"),
        addresses: vec![IpAddr::V4(v4)],
        identity,
        attributes: BTreeMap::from([("node:os".to_owned(), "linux".to_owned())]),
    }
}

fn nodes() -> Vec<NodeInfo> {
    (0..SERVICES * PER_SERVICE + PEOPLE).map(node).collect()
}

fn policy() -> Policy {
    let owners: Vec<String> = (0..SERVICES)
        .map(|s| format!("\"tag:svc{s}\": []"))
        .collect();
    let groups: Vec<String> = (0..20)
        .map(|g| {
            let members: Vec<String> = (0..PEOPLE / 20)
                .map(|m| format!("\"user{}@example.com\"", g * (PEOPLE / 20) + m))
                .collect();
            format!("\"group:team{g}\": [{}]", members.join(","))
        })
        .collect();
    let mut rules: Vec<String> = (0..900)
        .map(|r| {
            format!(
                "{{\"action\": \"accept\", \"src\": [\"tag:svc{}\"], \"dst\": [\"tag:svc{}:{}\"], \"proto\": \"tcp\"}}",
                r % 100,
                (r * 7 + 1) % 100,
                1000 + r
            )
        })
        .collect();
    rules.extend((0..90).map(|r| {
        format!(
            "{{\"action\": \"accept\", \"src\": [\"group:team{}\"], \"dst\": [\"tag:svc{}:443,8000-8100\"]}}",
            r % 20,
            (r * 13) % 100
        )
    }));
    rules.extend((0..10).map(|r| {
        format!(
            "{{\"action\": \"deny\", \"src\": [\"group:team{}\"], \"dst\": [\"tag:svc{}:22\"]}}",
            r,
            r * 10
        )
    }));
    let source = format!(
        "{{\"groups\": {{{}}}, \"tagOwners\": {{{}}}, \"acls\": [{}]}}",
        groups.join(","),
        owners.join(","),
        rules.join(",\n")
    );
    match Policy::parse(&source, "bench.hujson") {
        Ok(policy) => policy,
        Err(err) => panic!("the benchmark policy does not parse: {err}"),
    }
}

fn compile(c: &mut Criterion) {
    let policy = policy();
    let nodes = nodes();
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("1000 rules x 10000 nodes, full", |b| {
        b.iter(|| black_box(policy.compile(black_box(&nodes))));
    });
    group.bench_function("1000 rules x 10000 nodes, engine from scratch", |b| {
        b.iter(|| black_box(Engine::new(policy.clone(), nodes.clone())));
    });
    let mut engine = Engine::new(policy.clone(), nodes.clone());
    let mut flip = false;
    group.bench_function("1000 rules x 10000 nodes, one node changes tag", |b| {
        b.iter(|| {
            flip = !flip;
            let mut changed = node(5);
            if flip {
                changed.identity = Identity::tagged(vec!["tag:svc42".into()]);
            }
            black_box(engine.upsert(changed))
        });
    });
    let mut present = true;
    group.bench_function("1000 rules x 10000 nodes, one node leaves or joins", |b| {
        b.iter(|| {
            present = !present;
            if present {
                black_box(engine.upsert(node(PER_SERVICE * 7 + 3)))
            } else {
                black_box(engine.remove(NodeId(u64::from(PER_SERVICE * 7 + 3))))
            }
        });
    });
    group.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
