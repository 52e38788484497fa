//! The writer task, and each session's share of it.
//!
//! One task owns the segments ([`Segments`]); sessions send it stamped
//! batches over a bounded channel. It writes whatever has queued up as one
//! group with one sync (off the async workers), then answers each batch, so
//! many nodes reporting at once cost one sync rather than one each.
//!
//! A session ([`SessionFlows`]) reads another batch from its node only
//! while it has a free place in the node's window of unacknowledged
//! batches and the writer has taken the one before: when storage is slow,
//! the channel fills, sessions stop reading, and the transport's flow
//! control holds the nodes back. Nothing waits in memory beyond the
//! channel and one batch per session. Kept batches go on to the sinks.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use weft_proto::flows::{FlowBatch, MAX_BATCHES_IN_FLIGHT};

use super::intake::{self, BatchError};
use super::segments::{Appended, SegmentError, Segments};
use super::sinks::Sinks;
use super::{unix_ms, KeptBatch, Reporter};
use crate::config::FlowSettings;
use crate::metrics::{self, FlowBatchResult};
use crate::netmap::NetmapHandle;
use crate::nodes::NodeRecord;

/// Batches queued for the writer, from all sessions together.
const QUEUE: usize = 256;
/// The most batches written with one sync.
const MAX_GROUP: usize = 64;
/// How often the writer rotates and applies retention when idle.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Why flow records cannot be kept at all.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Open(#[from] SegmentError),
    #[error("the flow store's start-up task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A stamped batch.
#[derive(Debug)]
struct Stamped {
    batch: KeptBatch,
    /// The first batch of its session: the node sends its oldest
    /// unacknowledged batch first, so what a failed write held back is
    /// released.
    first: bool,
    /// Records dropped because the reporter is not their end, counted once
    /// the batch is kept (not again when it comes twice).
    not_an_end: u64,
    /// Records the node dropped before sending.
    dropped_by_node: u64,
}

/// A stamped batch on its way to the writer, and where its answer goes.
#[derive(Debug)]
struct Append {
    stamped: Stamped,
    reply: oneshot::Sender<Appended>,
}

/// A handle to the writer task, and what stamping needs.
#[derive(Debug, Clone)]
pub(crate) struct FlowWriter {
    tx: mpsc::Sender<Append>,
    netmaps: NetmapHandle,
}

impl FlowWriter {
    /// Opens the segments under `data_dir` and starts the writer. The task
    /// ends once every handle is gone.
    pub(crate) async fn start(
        data_dir: &Path,
        settings: FlowSettings,
        netmaps: NetmapHandle,
        sinks: Sinks,
    ) -> Result<(Self, JoinHandle<()>), StartError> {
        let data_dir = data_dir.to_owned();
        let segments = tokio::task::spawn_blocking(move || {
            Segments::open(&data_dir, settings, unix_ms(SystemTime::now()))
        })
        .await
        .map_err(StartError::Task)??;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(segments, rx, sinks));
        Ok((Self { tx, netmaps }, task))
    }

    /// The flow intake of the session of the node `record`.
    pub(crate) fn session(&self, record: &NodeRecord) -> SessionFlows {
        SessionFlows {
            writer: self.clone(),
            reporter: Reporter {
                node: record.id,
                name: record.name.clone(),
            },
            own: [IpAddr::V4(record.ipv4), IpAddr::V6(record.ipv6)],
            waiting: None,
            acks: VecDeque::new(),
            warned: false,
            started: false,
        }
    }
}

async fn run(mut segments: Segments, mut rx: mpsc::Receiver<Append>, sinks: Sinks) {
    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let first = tokio::select! {
            append = rx.recv() => match append {
                Some(append) => append,
                None => return,
            },
            _ = tick.tick() => {
                let maintained = tokio::task::spawn_blocking(move || {
                    segments.maintain(unix_ms(SystemTime::now()));
                    segments
                });
                segments = match maintained.await {
                    Ok(segments) => segments,
                    Err(e) => {
                        tracing::error!("the flow writer stopped: {e}");
                        return;
                    }
                };
                continue;
            }
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        let mut batches = Vec::with_capacity(group.len());
        let mut answers = Vec::with_capacity(group.len());
        let mut new_sessions = Vec::new();
        for Append { stamped, reply } in group {
            if stamped.first {
                new_sessions.push(stamped.batch.reporter.node);
            }
            batches.push(stamped.batch);
            answers.push((stamped.not_an_end, stamped.dropped_by_node, reply));
        }
        let written = tokio::task::spawn_blocking(move || {
            for node in new_sessions {
                segments.release(node);
            }
            let outcomes = segments.append(&batches, unix_ms(SystemTime::now()));
            (segments, outcomes, batches)
        });
        let (outcomes, batches);
        (segments, outcomes, batches) = match written.await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!("the flow writer stopped: {e}");
                return;
            }
        };
        let kept: Vec<&KeptBatch> = batches
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| **outcome == Appended::Kept)
            .map(|(batch, _)| batch)
            .collect();
        sinks.publish(&kept);
        for ((batch, outcome), (not_an_end, dropped_by_node, reply)) in
            batches.iter().zip(outcomes).zip(answers)
        {
            let result = match outcome {
                Appended::Kept => {
                    metrics::flow_records(batch.records.len() as u64, not_an_end, dropped_by_node);
                    FlowBatchResult::Kept
                }
                Appended::Duplicate => FlowBatchResult::Duplicate,
                Appended::Held | Appended::Failed => FlowBatchResult::NotKept,
            };
            metrics::flow_batch(result);
            let _ = reply.send(outcome);
        }
    }
}

/// What [`SessionFlows::progress`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The waiting batch went to the writer.
    Submitted,
    /// The batch with this id is kept: acknowledge it.
    Ack(u64),
    /// The batch with this id was not kept: the session must end, so the
    /// node, without an acknowledgement, sends it again on its next one.
    NotKept(u64),
}

/// One session's batches between the node and the writer.
#[derive(Debug)]
pub(crate) struct SessionFlows {
    writer: FlowWriter,
    reporter: Reporter,
    /// The reporter's overlay addresses.
    own: [IpAddr; 2],
    /// Stamped, waiting for room in the writer's queue.
    waiting: Option<Stamped>,
    /// Batches with the writer, oldest first: acknowledged in this order.
    acks: VecDeque<(u64, oneshot::Receiver<Appended>)>,
    /// Whether this session logged records the node is not an end of.
    warned: bool,
    /// Whether a batch of this session went to the writer yet.
    started: bool,
}

impl SessionFlows {
    /// Whether the session may read another batch from the node.
    pub(crate) fn accepts(&self) -> bool {
        self.waiting.is_none() && self.acks.len() < MAX_BATCHES_IN_FLIGHT
    }

    /// Whether [`SessionFlows::progress`] has anything to do.
    pub(crate) fn busy(&self) -> bool {
        self.waiting.is_some() || !self.acks.is_empty()
    }

    /// Checks and stamps a batch the node sent; it goes to the writer in
    /// [`SessionFlows::progress`]. Only while [`SessionFlows::accepts`].
    pub(crate) async fn offer(&mut self, batch: FlowBatch) -> Result<(), BatchError> {
        let now_ms = unix_ms(SystemTime::now());
        if let Err(e) = intake::validate(&batch, now_ms) {
            metrics::flow_batch(FlowBatchResult::Invalid);
            return Err(e);
        }
        let known = self
            .writer
            .netmaps
            .endpoints(intake::addresses(&batch))
            .await;
        let dropped_by_node = batch.dropped;
        let stamped = intake::stamp(self.reporter.clone(), &self.own, batch, &known, now_ms);
        if stamped.not_an_end > 0 && !self.warned {
            self.warned = true;
            tracing::warn!(
                node = %self.reporter.node,
                batch = stamped.batch.batch,
                records = stamped.not_an_end,
                "dropping flow records of traffic the reporting node is not an end of \
                 (logged once per session; counted in weft_coordinator_flow_records_total)"
            );
        }
        self.waiting = Some(Stamped {
            batch: stamped.batch,
            first: !self.started,
            not_an_end: stamped.not_an_end,
            dropped_by_node,
        });
        self.started = true;
        Ok(())
    }

    /// Hands the waiting batch to the writer, or takes the answer for the
    /// oldest batch with it, whichever comes first. Cancel-safe: nothing is
    /// lost when another branch of the session's `select!` wins.
    pub(crate) async fn progress(&mut self) -> Progress {
        let SessionFlows {
            writer,
            waiting,
            acks,
            ..
        } = self;
        let oldest = async {
            match acks.front_mut() {
                Some((_, answer)) => answer.await,
                None => std::future::pending().await,
            }
        };
        let room = async {
            match waiting {
                Some(_) => writer.tx.reserve().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            answer = oldest => {
                let Some((id, _)) = acks.pop_front() else {
                    return Progress::Submitted;
                };
                match answer {
                    Ok(Appended::Kept | Appended::Duplicate) => Progress::Ack(id),
                    Ok(Appended::Held | Appended::Failed) | Err(_) => Progress::NotKept(id),
                }
            }
            permit = room => {
                let Some(stamped) = waiting.take() else {
                    return Progress::Submitted;
                };
                let id = stamped.batch.batch;
                let (reply, answer) = oneshot::channel();
                match permit {
                    Ok(permit) => {
                        permit.send(Append { stamped, reply });
                        acks.push_back((id, answer));
                        Progress::Submitted
                    }
                    // The writer is gone: the coordinator is stopping.
                    Err(_) => Progress::NotKept(id),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use weft_proto::NodeId;

    use super::super::intake::tests::record;
    use super::*;
    use crate::nodes::Registry;
    use crate::store::{RedbStore, Store};

    /// A session of node 2 (100.64.0.2) whose writer queue holds `room`
    /// batches and is read by the test.
    fn session(dir: &Path, room: usize) -> (SessionFlows, mpsc::Receiver<Append>) {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("s.redb")).unwrap());
        let registry = Registry::open(store).unwrap();
        let (netmaps, _task) =
            NetmapHandle::spawn(registry, None, Duration::from_secs(60)).unwrap();
        let (tx, rx) = mpsc::channel(room);
        let session = SessionFlows {
            writer: FlowWriter { tx, netmaps },
            reporter: Reporter {
                node: NodeId(2),
                name: "db".into(),
            },
            own: ["100.64.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            waiting: None,
            acks: VecDeque::new(),
            warned: false,
            started: false,
        };
        (session, rx)
    }

    fn batch(id: u64) -> FlowBatch {
        FlowBatch {
            id,
            records: vec![record("100.64.0.1:40000", "100.64.0.2:5432")],
            dropped: 0,
        }
    }

    #[tokio::test]
    async fn a_session_reads_no_further_while_the_writer_has_no_room() {
        let dir = tempfile::tempdir().unwrap();
        let (mut session, mut writer) = session(dir.path(), 1);
        session.offer(batch(1)).await.unwrap();
        assert!(!session.accepts(), "one batch waits at a time");
        assert_eq!(session.progress().await, Progress::Submitted);
        assert!(session.accepts());
        session.offer(batch(2)).await.unwrap();
        let stuck = tokio::time::timeout(Duration::from_millis(100), session.progress()).await;
        assert!(stuck.is_err(), "the writer's queue is full");
        assert!(!session.accepts());
        let first = writer.recv().await.unwrap();
        assert_eq!(first.stamped.batch.batch, 1);
        assert!(first.stamped.first);
        first.reply.send(Appended::Kept).unwrap();
        assert_eq!(session.progress().await, Progress::Ack(1));
        assert_eq!(session.progress().await, Progress::Submitted);
        let second = writer.recv().await.unwrap();
        assert!(!second.stamped.first);
        second.reply.send(Appended::Failed).unwrap();
        assert_eq!(session.progress().await, Progress::NotKept(2));
        assert!(!session.busy());
    }

    #[tokio::test]
    async fn a_session_holds_at_most_the_nodes_window_with_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (mut session, _writer) = session(dir.path(), 64);
        for id in 1..=MAX_BATCHES_IN_FLIGHT as u64 {
            assert!(session.accepts());
            session.offer(batch(id)).await.unwrap();
            assert_eq!(session.progress().await, Progress::Submitted);
        }
        assert!(!session.accepts());
    }
}
