//! What a node's batch must hold to be kept, and how its records are
//! stamped: the coordinator trusts the node only with what the node alone
//! can see (its traffic), never with who anyone is.

use std::collections::HashMap;
use std::net::IpAddr;

use weft_proto::flows::{
    FlowBatch, FlowDirection, FlowEndpoint, FlowPath, FlowRecord, MAX_BATCH_RECORDS, MAX_FIELD_LEN,
    MAX_LIST_LEN, MAX_SUMMARY_IDS,
};

use super::{KeptBatch, KeptRecord, Reporter};

/// The earliest time a record may name: 2020-01-01T00:00:00Z. Earlier
/// times come from a clock that was never set.
const EARLIEST_MS: u64 = 1_577_836_800_000;

/// How far past the coordinator's clock a record may end: nodes' clocks
/// drift, but not by a day. Queries rely on it to skip segments received
/// long before the time they ask about.
pub(crate) const MAX_CLOCK_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// Why a batch is refused. Each is a protocol error: the node's software
/// sent something the contract rules out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("flow batch {batch} holds {count} records; at most {MAX_BATCH_RECORDS} are allowed")]
    TooManyRecords { batch: u64, count: usize },
    #[error("flow batch {batch}, record {index}: {field} is {len} bytes long; at most {MAX_FIELD_LEN} are allowed")]
    FieldTooLong {
        batch: u64,
        index: usize,
        field: &'static str,
        len: usize,
    },
    #[error("flow batch {batch}, record {index}: {field} lists {len} entries; at most {max} are allowed")]
    ListTooLong {
        batch: u64,
        index: usize,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("flow batch {batch}, record {index}: {field} holds a control character")]
    ControlCharacter {
        batch: u64,
        index: usize,
        field: &'static str,
    },
    #[error("flow batch {batch}, record {index}: the flow ends (at {end_ms} ms) before it starts (at {start_ms} ms)")]
    EndsBeforeStart {
        batch: u64,
        index: usize,
        start_ms: u64,
        end_ms: u64,
    },
    #[error("flow batch {batch}, record {index}: time {time_ms} ms is before 2020 or more than a day ahead of the coordinator's clock; is the node's clock set?")]
    ImplausibleTime {
        batch: u64,
        index: usize,
        time_ms: u64,
    },
}

/// Checks everything about `batch` that does not depend on who sent it.
/// `now_ms` is the coordinator's clock.
pub(crate) fn validate(batch: &FlowBatch, now_ms: u64) -> Result<(), BatchError> {
    let id = batch.id;
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(BatchError::TooManyRecords {
            batch: id,
            count: batch.records.len(),
        });
    }
    for (index, record) in batch.records.iter().enumerate() {
        let field = |field: &'static str, value: &str| {
            if value.len() > MAX_FIELD_LEN {
                return Err(BatchError::FieldTooLong {
                    batch: id,
                    index,
                    field,
                    len: value.len(),
                });
            }
            if value.chars().any(char::is_control) {
                return Err(BatchError::ControlCharacter {
                    batch: id,
                    index,
                    field,
                });
            }
            Ok(())
        };
        let list = |name: &'static str, len: usize, max: usize| {
            if len > max {
                return Err(BatchError::ListTooLong {
                    batch: id,
                    index,
                    field: name,
                    len,
                    max,
                });
            }
            Ok(())
        };
        for (end, endpoint) in [
            ("src_identity", &record.src_identity),
            ("dst_identity", &record.dst_identity),
        ] {
            let identity = &endpoint.identity;
            let strings = [
                ("name", endpoint.name.as_deref()),
                ("user", identity.user.as_deref()),
                ("workload", identity.workload.as_deref()),
            ];
            for (what, value) in strings {
                if let Some(value) = value {
                    field(field_name(end, what), value)?;
                }
            }
            list(
                field_name(end, "groups"),
                identity.groups.len(),
                MAX_LIST_LEN,
            )?;
            list(field_name(end, "tags"), identity.tags.len(), MAX_LIST_LEN)?;
            for group in &identity.groups {
                field(field_name(end, "groups"), group)?;
            }
            for tag in &identity.tags {
                field(field_name(end, "tags"), tag)?;
            }
        }
        if let FlowPath::Relay { name } = &record.path {
            field("path.relay.name", name)?;
        }
        if let Some(summary) = &record.summary {
            list(
                "summary.more_ids",
                summary.more_ids.len(),
                MAX_SUMMARY_IDS - 1,
            )?;
        }
        if record.end_ms < record.start_ms {
            return Err(BatchError::EndsBeforeStart {
                batch: id,
                index,
                start_ms: record.start_ms,
                end_ms: record.end_ms,
            });
        }
        let latest = now_ms.saturating_add(MAX_CLOCK_AHEAD_MS);
        for time_ms in [record.start_ms, record.end_ms] {
            if !(EARLIEST_MS..=latest).contains(&time_ms) {
                return Err(BatchError::ImplausibleTime {
                    batch: id,
                    index,
                    time_ms,
                });
            }
        }
    }
    Ok(())
}

/// The dotted name of an identity field, for errors.
fn field_name(end: &'static str, what: &'static str) -> &'static str {
    match (end, what) {
        ("src_identity", "name") => "src_identity.name",
        ("src_identity", "user") => "src_identity.identity.user",
        ("src_identity", "workload") => "src_identity.identity.workload",
        ("src_identity", "groups") => "src_identity.identity.groups",
        ("src_identity", "tags") => "src_identity.identity.tags",
        (_, "name") => "dst_identity.name",
        (_, "user") => "dst_identity.identity.user",
        (_, "workload") => "dst_identity.identity.workload",
        (_, "groups") => "dst_identity.identity.groups",
        _ => "dst_identity.identity.tags",
    }
}

/// The addresses whose owners a batch's records name: each record's two ends.
pub(crate) fn addresses(batch: &FlowBatch) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = batch
        .records
        .iter()
        .flat_map(|r| [r.src.ip().to_canonical(), r.dst.ip().to_canonical()])
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

/// A validated batch, stamped: what the writer keeps, and how many records
/// were dropped because the reporter is not the end it claims to be.
#[derive(Debug)]
pub(crate) struct Stamped {
    pub(crate) batch: KeptBatch,
    pub(crate) not_an_end: u64,
}

/// Stamps `batch` as reported by `reporter`, whose overlay addresses are
/// `own`. A record is kept only if the reporter is the end its direction
/// says (`dst` of an inbound record, `src` of an outbound one); each end
/// the coordinator knows (`known`, by canonical address) takes the
/// coordinator's identity for it, whatever the node said.
pub(crate) fn stamp(
    reporter: Reporter,
    own: &[IpAddr],
    batch: FlowBatch,
    known: &HashMap<IpAddr, FlowEndpoint>,
    received_ms: u64,
) -> Stamped {
    let mut not_an_end = 0;
    let mut records = Vec::with_capacity(batch.records.len());
    for (index, record) in batch.records.into_iter().enumerate() {
        let reporter_end = match record.direction {
            FlowDirection::Inbound => record.dst.ip(),
            FlowDirection::Outbound => record.src.ip(),
        };
        if !own.contains(&reporter_end.to_canonical()) {
            not_an_end += 1;
            continue;
        }
        let Ok(index) = u32::try_from(index) else {
            // MAX_BATCH_RECORDS, checked before, is far below u32::MAX.
            continue;
        };
        records.push(verify_ends(index, record, known));
    }
    Stamped {
        batch: KeptBatch {
            received_ms,
            reporter,
            batch: batch.id,
            records,
        },
        not_an_end,
    }
}

fn verify_ends(
    index: u32,
    mut record: FlowRecord,
    known: &HashMap<IpAddr, FlowEndpoint>,
) -> KeptRecord {
    let src = known.get(&record.src.ip().to_canonical());
    let dst = known.get(&record.dst.ip().to_canonical());
    if let Some(src) = src {
        record.src_identity = src.clone();
    }
    if let Some(dst) = dst {
        record.dst_identity = dst.clone();
    }
    KeptRecord {
        index,
        src_verified: src.is_some(),
        dst_verified: dst.is_some(),
        record,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;
    use weft_proto::flows::{DenialSummary, FlowId, FlowVerdict, RuleId, RuleRef, Traffic};
    use weft_proto::{Identity, NodeId};

    use super::*;

    pub(crate) const NOW_MS: u64 = 1_780_000_000_000;

    /// An inbound record `a` → `b` that `b` reports, accepted by rule line 3.
    pub(crate) fn record(src: &str, dst: &str) -> FlowRecord {
        let src: SocketAddr = src.parse().unwrap();
        let dst: SocketAddr = dst.parse().unwrap();
        FlowRecord {
            id: FlowId::compute(6, src, dst, 1),
            start_ms: NOW_MS - 5_000,
            end_ms: NOW_MS - 1_000,
            protocol: 6,
            src,
            dst,
            direction: FlowDirection::Inbound,
            verdict: FlowVerdict::Accept,
            rule: Some(RuleRef {
                line: 3,
                id: RuleId(0xfeed),
            }),
            src_identity: FlowEndpoint::default(),
            dst_identity: FlowEndpoint::default(),
            path: FlowPath::Direct,
            to_dst: Traffic {
                packets: 3,
                bytes: 180,
            },
            to_src: Traffic {
                packets: 2,
                bytes: 120,
            },
            ended: true,
            summary: None,
        }
    }

    fn batch(records: Vec<FlowRecord>) -> FlowBatch {
        FlowBatch {
            id: 9,
            records,
            dropped: 0,
        }
    }

    #[test]
    fn a_well_formed_batch_passes() {
        let r = record("100.64.0.1:40000", "100.64.0.2:5432");
        assert_eq!(validate(&batch(vec![r; MAX_BATCH_RECORDS]), NOW_MS), Ok(()));
    }

    #[test]
    fn each_limit_is_enforced_and_named() {
        let base = record("100.64.0.1:40000", "100.64.0.2:5432");
        fn long() -> String {
            "x".repeat(MAX_FIELD_LEN + 1)
        }
        type Change = fn(&mut FlowRecord);
        let cases: [(Change, &str); 10] = [
            (
                |r| r.src_identity.name = Some(long()),
                "src_identity.name is 257 bytes",
            ),
            (
                |r| r.dst_identity.identity.user = Some(long()),
                "dst_identity.identity.user is 257",
            ),
            (
                |r| r.dst_identity.identity.tags = vec!["tag:a".into(); MAX_LIST_LEN + 1],
                "dst_identity.identity.tags lists 33",
            ),
            (
                |r| r.src_identity.identity.groups = vec![long()],
                "src_identity.identity.groups is 257",
            ),
            (
                |r| r.path = FlowPath::Relay { name: long() },
                "path.relay.name",
            ),
            (
                |r| r.src_identity.identity.workload = Some("spiffe://x/\u{1b}[2J".into()),
                "control character",
            ),
            (
                |r| {
                    r.summary = Some(DenialSummary {
                        flows: 9,
                        more_ids: vec![FlowId([1; 16]); MAX_SUMMARY_IDS],
                    })
                },
                "summary.more_ids lists 8",
            ),
            (|r| r.end_ms = r.start_ms - 1, "ends"),
            (|r| r.start_ms = 0, "before 2020"),
            (|r| r.end_ms = NOW_MS + MAX_CLOCK_AHEAD_MS + 1, "clock"),
        ];
        for (change, needle) in cases {
            let mut r = base.clone();
            change(&mut r);
            let err = validate(&batch(vec![r]), NOW_MS).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
            assert!(err.contains("flow batch 9, record 0"), "{err}");
        }
        let err = validate(&batch(vec![base; MAX_BATCH_RECORDS + 1]), NOW_MS).unwrap_err();
        assert_eq!(
            err,
            BatchError::TooManyRecords {
                batch: 9,
                count: MAX_BATCH_RECORDS + 1
            }
        );
    }

    fn known(name: &str, id: u64, user: &str) -> FlowEndpoint {
        FlowEndpoint {
            node: Some(NodeId(id)),
            name: Some(name.into()),
            identity: Identity {
                user: Some(user.into()),
                ..Identity::default()
            },
        }
    }

    #[test]
    fn records_are_stamped_and_the_registry_decides_who_is_who() {
        let me = Reporter {
            node: NodeId(2),
            name: "db".into(),
        };
        let own: Vec<IpAddr> = vec!["100.64.0.2".parse().unwrap(), "fd7a::2".parse().unwrap()];
        let mut lying = record("100.64.0.1:40000", "100.64.0.2:5432");
        lying.src_identity = known("admin-box", 99, "ceo@example.com");
        let mut unknown_peer = record("100.64.0.77:1000", "[::ffff:100.64.0.2]:22");
        unknown_peer.src_identity = known("ghost", 77, "ghost@example.com");
        let not_mine = record("100.64.0.1:40000", "100.64.0.3:5432");
        let mut outbound = record("100.64.0.2:50000", "100.64.0.1:80");
        outbound.direction = FlowDirection::Outbound;
        let mut outbound_not_mine = record("100.64.0.3:50000", "100.64.0.2:80");
        outbound_not_mine.direction = FlowDirection::Outbound;
        let batch = batch(vec![
            lying,
            unknown_peer,
            not_mine,
            outbound,
            outbound_not_mine,
        ]);
        let registry = HashMap::from([
            (
                "100.64.0.1".parse().unwrap(),
                known("laptop", 1, "alice@example.com"),
            ),
            (
                "100.64.0.2".parse().unwrap(),
                known("db", 2, "ops@example.com"),
            ),
        ]);
        let stamped = stamp(me.clone(), &own, batch, &registry, NOW_MS);
        assert_eq!(stamped.not_an_end, 2);
        let kept = stamped.batch;
        assert_eq!(kept.reporter, me);
        assert_eq!(kept.received_ms, NOW_MS);
        let indexes: Vec<u32> = kept.records.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [0, 1, 3]);
        let first = &kept.records[0];
        assert_eq!(first.record.src_identity.name.as_deref(), Some("laptop"));
        assert_eq!(first.record.dst_identity.name.as_deref(), Some("db"));
        assert!(first.src_verified && first.dst_verified);
        let second = &kept.records[1];
        assert_eq!(second.record.src_identity.name.as_deref(), Some("ghost"));
        assert!(!second.src_verified && second.dst_verified);
        assert_eq!(second.record.dst_identity.node, Some(NodeId(2)));
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_stamping_keeps_only_the_reporters_records(
            names in proptest::collection::vec(".{0,300}", 0..4),
            times in proptest::collection::vec(any::<u64>(), 2),
            inbound in any::<bool>(),
            last_octet in 1u8..4,
        ) {
            let mut r = record(&format!("100.64.0.{last_octet}:1"), "100.64.0.2:2");
            r.src_identity.identity.tags = names.clone();
            r.dst_identity.name = names.first().cloned();
            r.start_ms = times[0];
            r.end_ms = times[1];
            if !inbound {
                r.direction = FlowDirection::Outbound;
            }
            let b = batch(vec![r]);
            let valid = validate(&b, NOW_MS).is_ok();
            let own = ["100.64.0.2".parse().unwrap()];
            let stamped = stamp(me(), &own, b, &HashMap::new(), NOW_MS);
            let mine = inbound || last_octet == 2;
            prop_assert_eq!(stamped.batch.records.len(), usize::from(mine));
            prop_assert_eq!(stamped.not_an_end, u64::from(!mine));
            if valid {
                prop_assert!(names.iter().all(|n| n.len() <= MAX_FIELD_LEN));
            }
        }
    }

    fn me() -> Reporter {
        Reporter {
            node: NodeId(2),
            name: "db".into(),
        }
    }
}
