//! Flow records on their way to the coordinator, without IO: records are
//! gathered into batches of at most [`MAX_BATCH_RECORDS`] records and
//! [`MAX_BATCH_BYTES`] encoded bytes, each batch keeps its id until the
//! coordinator acknowledges it, and the batches held are bounded in bytes,
//! the oldest dropped (and counted) first.

use std::collections::VecDeque;

use weft_proto::flows::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
use weft_proto::{ClientMessage, FlowBatch, FlowRecord};

/// What a frame adds to its batch's records: length prefix, version,
/// message tag, id, count and dropped counter, rounded up.
const FRAME_OVERHEAD: usize = 48;

/// A sealed batch, encoded as the frame that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The batch's id.
    pub id: u64,
    /// The `ClientMessage::Flows` frame.
    pub frame: Vec<u8>,
    /// How many records it holds.
    pub records: usize,
    /// Sent in the current session.
    sent: bool,
}

impl Batch {
    /// A batch read back from the spool, not yet sent in this session.
    pub fn restored(id: u64, frame: Vec<u8>, records: usize) -> Self {
        Self {
            id,
            frame,
            records,
            sent: false,
        }
    }
}

/// What sealing did: the batch to keep on disk, and the batches dropped to
/// make room for it.
#[derive(Debug, Default)]
pub struct Sealed {
    /// The new batch's id and frame.
    pub batch: Option<(u64, Vec<u8>)>,
    /// Ids of the batches dropped, oldest first.
    pub dropped: Vec<u64>,
}

/// The outbox's counters, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records waiting to be batched.
    pub pending: u64,
    /// Batches held until acknowledged.
    pub batches: u64,
    /// Records in them.
    pub batched: u64,
    /// Their encoded size.
    pub bytes: u64,
    /// Records dropped since start because the outbox was full (the data
    /// plane's own drops are counted there).
    pub dropped: u64,
    /// The last batch the coordinator acknowledged.
    pub last_acked: Option<u64>,
}

/// Records and batches waiting for the coordinator.
#[derive(Debug)]
pub struct Outbox {
    pending: Vec<FlowRecord>,
    /// The encoded size of `pending`'s records.
    pending_bytes: usize,
    batches: VecDeque<Batch>,
    /// The encoded size of `batches`.
    bytes: usize,
    /// The most `bytes` may reach.
    limit: usize,
    next_id: u64,
    /// Records dropped since the last sealed batch, reported with the next.
    unreported: u64,
    dropped: u64,
    last_acked: Option<u64>,
}

impl Outbox {
    /// An outbox holding at most `limit` bytes of batches, numbering new
    /// batches from `next_id`, holding `restored` (oldest first).
    pub fn new(limit: usize, next_id: u64, restored: Vec<Batch>) -> Self {
        let bytes = restored.iter().map(|b| b.frame.len()).sum();
        let next_id = restored
            .iter()
            .map(|b| b.id.saturating_add(1))
            .fold(next_id, u64::max);
        Self {
            pending: Vec::new(),
            pending_bytes: 0,
            batches: restored.into(),
            bytes,
            limit,
            next_id,
            unreported: 0,
            dropped: 0,
            last_acked: None,
        }
    }

    /// The id the next batch gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Adds `record`; seals the pending records first when it would not
    /// fit their batch.
    pub fn push(&mut self, record: FlowRecord) -> Sealed {
        let size = postcard::experimental::serialized_size(&record).unwrap_or(MAX_BATCH_BYTES);
        let full = self.pending.len() >= MAX_BATCH_RECORDS
            || self.pending_bytes + size + FRAME_OVERHEAD > MAX_BATCH_BYTES;
        let sealed = if full { self.seal() } else { Sealed::default() };
        self.pending_bytes += size;
        self.pending.push(record);
        sealed
    }

    /// Counts records lost before they reached the outbox.
    pub fn count_dropped(&mut self, records: u64) {
        self.unreported += records;
    }

    /// Seals the pending records (or a drop count alone) into a batch,
    /// dropping the oldest batches when the outbox is over its limit.
    pub fn seal(&mut self) -> Sealed {
        if self.pending.is_empty() && self.unreported == 0 {
            return Sealed::default();
        }
        let id = self.next_id;
        let records = std::mem::take(&mut self.pending);
        let count = records.len();
        self.pending_bytes = 0;
        let message = ClientMessage::Flows(FlowBatch {
            id,
            records,
            dropped: self.unreported,
        });
        let Ok(frame) = weft_proto::encode_frame(&message) else {
            // Every record is cut to fit a batch of its own; a batch that
            // still does not encode is lost, and counted.
            self.unreported += count as u64;
            self.dropped += count as u64;
            return Sealed::default();
        };
        self.next_id += 1;
        self.unreported = 0;
        self.bytes += frame.len();
        self.batches.push_back(Batch {
            id,
            frame: frame.clone(),
            records: count,
            sent: false,
        });
        Sealed {
            batch: Some((id, frame)),
            dropped: self.trim(),
        }
    }

    /// Drops the oldest batches (counting their records) until the outbox
    /// is within its limit, keeping the newest; returns their ids.
    pub fn trim(&mut self) -> Vec<u64> {
        let mut dropped = Vec::new();
        while self.bytes > self.limit && self.batches.len() > 1 {
            let Some(oldest) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= oldest.frame.len();
            self.unreported += oldest.records as u64;
            self.dropped += oldest.records as u64;
            dropped.push(oldest.id);
        }
        dropped
    }

    /// A new session: every batch held is sent again.
    pub fn rewind(&mut self) {
        for batch in &mut self.batches {
            batch.sent = false;
        }
    }

    /// The oldest batch not sent in this session, marked sent.
    pub fn next_unsent(&mut self) -> Option<(u64, Vec<u8>)> {
        let batch = self.batches.iter_mut().find(|b| !b.sent)?;
        batch.sent = true;
        Some((batch.id, batch.frame.clone()))
    }

    /// The coordinator kept batch `id`: it is released. `false` when the
    /// outbox no longer holds it (dropped for room meanwhile).
    pub fn ack(&mut self, id: u64) -> bool {
        self.last_acked = Some(self.last_acked.map_or(id, |last| last.max(id)));
        let Some(at) = self.batches.iter().position(|b| b.id == id) else {
            return false;
        };
        if let Some(batch) = self.batches.remove(at) {
            self.bytes -= batch.frame.len();
        }
        true
    }

    /// The counters.
    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            pending: self.pending.len() as u64,
            batches: self.batches.len() as u64,
            batched: self.batches.iter().map(|b| b.records as u64).sum(),
            bytes: self.bytes as u64,
            dropped: self.dropped,
            last_acked: self.last_acked,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use weft_proto::flows::{MAX_FIELD_LEN, MAX_LIST_LEN};
    use weft_proto::{
        FlowDirection, FlowEndpoint, FlowId, FlowPath, FlowVerdict, FrameDecoder, Identity, Traffic,
    };

    use super::*;

    /// A record whose endpoints carry `groups` groups of the longest name.
    pub(crate) fn record(groups: usize) -> FlowRecord {
        let endpoint = FlowEndpoint {
            node: None,
            name: Some("db-1".into()),
            identity: Identity {
                groups: vec!["g".repeat(MAX_FIELD_LEN); groups.min(MAX_LIST_LEN)],
                ..Identity::default()
            },
        };
        FlowRecord {
            id: FlowId([1; 16]),
            start_ms: 1,
            end_ms: 2,
            protocol: 6,
            src: "100.64.0.1:40000".parse().unwrap(),
            dst: "100.64.0.2:5432".parse().unwrap(),
            direction: FlowDirection::Outbound,
            verdict: FlowVerdict::Opened,
            rule: None,
            src_identity: endpoint.clone(),
            dst_identity: endpoint,
            path: FlowPath::Direct,
            to_dst: Traffic::default(),
            to_src: Traffic::default(),
            ended: true,
            summary: None,
        }
    }

    fn decode(frame: &[u8]) -> FlowBatch {
        let mut decoder = FrameDecoder::new();
        decoder.push(frame);
        match decoder.next_message::<ClientMessage>().unwrap() {
            Some(ClientMessage::Flows(batch)) => batch,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batches_stay_within_the_record_and_byte_limits() {
        let mut outbox = Outbox::new(1 << 30, 1, Vec::new());
        let mut sealed = Vec::new();
        for _ in 0..300 {
            sealed.extend(outbox.push(record(0)).batch);
        }
        sealed.extend(outbox.seal().batch);
        let sizes: Vec<usize> = sealed
            .iter()
            .map(|(_, f)| decode(f).records.len())
            .collect();
        assert_eq!(sizes, [MAX_BATCH_RECORDS, MAX_BATCH_RECORDS, 44]);

        let mut sealed = Vec::new();
        for _ in 0..10 {
            sealed.extend(outbox.push(record(MAX_LIST_LEN)).batch);
        }
        sealed.extend(outbox.seal().batch);
        assert!(sealed.len() > 1);
        for (_, frame) in &sealed {
            assert!(frame.len() <= MAX_BATCH_BYTES, "{} bytes", frame.len());
        }
        let ids: Vec<u64> = sealed.iter().map(|(id, _)| *id).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert_eq!(ids[0], 4);
    }

    #[test]
    fn a_full_outbox_drops_its_oldest_batches_and_reports_them_dropped() {
        let one = {
            let mut probe = Outbox::new(usize::MAX, 1, Vec::new());
            probe.push(record(4));
            probe.seal().batch.map_or(0, |(_, f)| f.len())
        };
        let mut outbox = Outbox::new(3 * one, 7, Vec::new());
        outbox.count_dropped(2);
        let mut dropped = Vec::new();
        for _ in 0..5 {
            outbox.push(record(4));
            dropped.extend(outbox.seal().dropped);
        }
        assert_eq!(dropped, [7, 8]);
        let stats = outbox.stats();
        assert_eq!((stats.batches, stats.dropped), (3, 2));
        assert!(stats.bytes <= 3 * one as u64);
        // Each batch reports the drops since the one before: batch 8 was
        // dropped to make room for batch 11.
        outbox.push(record(0));
        let (id, frame) = outbox.seal().batch.unwrap();
        assert_eq!((id, decode(&frame).dropped), (12, 1));
        let first = outbox.next_unsent().unwrap();
        assert_eq!(first.0, 10, "the oldest held goes first");
    }

    #[test]
    fn nothing_to_seal_seals_nothing_but_drops_alone_are_reported() {
        let mut outbox = Outbox::new(1 << 20, 1, Vec::new());
        assert!(outbox.seal().batch.is_none());
        outbox.count_dropped(5);
        let (_, frame) = outbox.seal().batch.unwrap();
        let batch = decode(&frame);
        assert!(batch.records.is_empty());
        assert_eq!(batch.dropped, 5);
    }
}
