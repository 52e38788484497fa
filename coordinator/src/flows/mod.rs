//! Flow records: taken from nodes' control sessions, kept in append-only
//! segment files under `DATA_DIR/flows/`, and answered to `flows` queries.
//!
//! A node's batch goes through [`intake`] in its session: checked (a bad
//! batch is a protocol error), its records stamped with the reporting node,
//! records the reporter is not an end of dropped and counted, and both
//! ends' identities filled from the coordinator's own view of the nodes.
//! The session hands it to the writer ([`writer`]), which appends it to the
//! active segment ([`segments`]) together with whatever other sessions sent
//! meanwhile, syncs the file once for all of them, and only then lets each
//! session acknowledge its batch. A batch sent again after a lost
//! acknowledgement is recognised by `(reporter, batch id)` and acknowledged
//! without being kept twice.
//!
//! Kept records then go to the configured sinks ([`sinks`]), never holding
//! up intake.
//!
//! Every replica keeps what the nodes connected to it sent; `flows` on a
//! replica answers from that replica's segments alone.

mod intake;
mod query;
mod segments;
mod sinks;
mod writer;

use serde::{Deserialize, Serialize};
use weft_proto::flows::FlowRecord;
use weft_proto::NodeId;

pub(crate) use self::intake::BatchError;
pub(crate) use self::query::{FilterError, FlowFilter};
pub use self::query::{FlowList, FlowQuery};
pub(crate) use self::segments::{FlowReader, SegmentError};
pub(crate) use self::sinks::{forward_audit, Sinks, StartError as SinkStartError};
pub(crate) use self::writer::{FlowWriter, Progress, StartError};

/// The node that reported a record, as its control session showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reporter {
    /// The node's id.
    pub node: NodeId,
    /// The node's name when it registered.
    pub name: String,
}

/// One kept record, as `weft-coordinator flows --json` prints it.
///
/// `(reporter.node, batch, index)` names the record wherever it goes: a
/// replica or sink that received it twice holds the same triple twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// When the coordinator kept the record, in milliseconds since the
    /// Unix epoch, by the coordinator's clock.
    pub received_ms: u64,
    /// Who reported it.
    pub reporter: Reporter,
    /// The id of the batch it came in.
    pub batch: u64,
    /// The record as kept.
    #[serde(flatten)]
    pub kept: KeptRecord,
}

/// A record as the coordinator keeps it: what the node said, with the
/// ends it knows filled from its registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRecord {
    /// Its position in the batch the node sent.
    pub index: u32,
    /// Whether `src_identity` is the coordinator's own (the address is a
    /// node's); otherwise it is what the reporter said.
    pub src_verified: bool,
    /// The same for `dst_identity`.
    pub dst_verified: bool,
    /// The record.
    #[serde(flatten)]
    pub record: FlowRecord,
}

/// A batch as kept: one line of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeptBatch {
    received_ms: u64,
    reporter: Reporter,
    batch: u64,
    records: Vec<KeptRecord>,
}

impl KeptBatch {
    fn into_views(self) -> impl Iterator<Item = FlowView> {
        let KeptBatch {
            received_ms,
            reporter,
            batch,
            records,
        } = self;
        records.into_iter().map(move |kept| FlowView {
            received_ms,
            reporter: reporter.clone(),
            batch,
            kept,
        })
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
