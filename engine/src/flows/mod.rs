//! Flow records on the node: the data plane's reports turned into
//! [`weft_proto::FlowRecord`]s ([`convert`]), batched ([`outbox`]) and
//! kept on disk ([`spool`]) until the coordinator acknowledges them.
//!
//! The device pushes records into a [`FlowQueue`] and seals a batch every
//! [`SEAL_INTERVAL`] (or when one is full); the control task sends the
//! sealed batches once registered, at most
//! [`weft_proto::flows::MAX_BATCHES_IN_FLIGHT`] unacknowledged, and sends
//! what is still unacknowledged again in its next session. At most
//! [`SPOOL_BYTES`] of batches are held, in memory and in the state
//! directory's `flows/`; past that the oldest are dropped and counted into
//! the next batch's `dropped`.

pub mod convert;
pub mod outbox;
pub mod spool;

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use weft_proto::FlowRecord;

use outbox::{Outbox, OutboxStats, Sealed};
use spool::{Spool, SpoolError};

/// The most bytes of batches a node holds while the coordinator does not
/// acknowledge them: about 16 MiB, some ten thousand records of typical
/// size.
pub const SPOOL_BYTES: usize = 16 * 1024 * 1024;

/// How long records wait to be batched: short enough that the coordinator
/// sees flows within seconds, long enough that a quiet node sends few
/// batches.
pub const SEAL_INTERVAL: Duration = Duration::from_secs(2);

/// The records and batches a node holds for the coordinator, shared by the
/// device (which adds) and the control task (which sends and releases).
#[derive(Debug)]
pub struct FlowQueue {
    inner: Mutex<Inner>,
    /// Wakes the control task when a batch is sealed.
    sealed: tokio::sync::Notify,
}

#[derive(Debug)]
struct Inner {
    outbox: Outbox,
    spool: Option<Spool>,
}

impl FlowQueue {
    /// A queue kept in memory only.
    pub fn in_memory() -> Self {
        Self::with(Outbox::new(SPOOL_BYTES, 1, Vec::new()), None)
    }

    /// A queue spooled to `dir`, holding what the spool kept from before.
    /// A spool that cannot be opened leaves the queue in memory.
    pub fn open(dir: &Path) -> Self {
        match Spool::open(dir) {
            Ok((spool, restored)) => {
                let held = restored.batches.len();
                let mut outbox = Outbox::new(SPOOL_BYTES, restored.next_id, restored.batches);
                // A spool written with a larger bound is cut to this one.
                let cut = outbox.trim();
                for id in &cut {
                    spool.remove(*id);
                }
                if held > 0 {
                    tracing::info!(
                        batches = held - cut.len(),
                        "flow records from before the restart wait for the coordinator"
                    );
                }
                Self::with(outbox, Some(spool))
            }
            Err(e) => {
                tracing::error!("{e}; flow records are kept in memory only");
                Self::in_memory()
            }
        }
    }

    fn with(outbox: Outbox, spool: Option<Spool>) -> Self {
        Self {
            inner: Mutex::new(Inner { outbox, spool }),
            sealed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `records`, and `dropped` records lost before they got here.
    pub fn push(&self, records: impl IntoIterator<Item = FlowRecord>, dropped: u64) {
        let mut inner = self.lock();
        inner.outbox.count_dropped(dropped);
        let mut any = false;
        for record in records {
            let sealed = inner.outbox.push(record);
            any |= inner.keep(sealed);
        }
        drop(inner);
        if any {
            self.sealed.notify_one();
        }
    }

    /// Seals what is pending into a batch, if anything is.
    pub fn seal(&self) {
        let mut inner = self.lock();
        let sealed = inner.outbox.seal();
        if inner.keep(sealed) {
            drop(inner);
            self.sealed.notify_one();
        }
    }

    /// Waits until a batch is sealed (at once if one was since the last wait).
    pub async fn wait_sealed(&self) {
        self.sealed.notified().await;
    }

    /// A new control session: everything held goes out again.
    pub(crate) fn rewind(&self) {
        self.lock().outbox.rewind();
    }

    /// The oldest batch not sent in this session, marked sent.
    pub(crate) fn next_unsent(&self) -> Option<(u64, Vec<u8>)> {
        self.lock().outbox.next_unsent()
    }

    /// The coordinator kept batch `id`.
    pub(crate) fn ack(&self, id: u64) {
        let mut inner = self.lock();
        inner.outbox.ack(id);
        if let Some(spool) = &inner.spool {
            spool.remove(id);
        }
    }

    /// The counters.
    pub fn stats(&self) -> OutboxStats {
        self.lock().outbox.stats()
    }
}

impl Inner {
    /// Writes a sealed batch to the spool and forgets the dropped ones;
    /// `true` when a batch was sealed.
    fn keep(&mut self, sealed: Sealed) -> bool {
        let Some((id, frame)) = sealed.batch else {
            return false;
        };
        if let Some(spool) = &self.spool {
            for dropped in &sealed.dropped {
                spool.remove(*dropped);
            }
            let written = spool
                .write(id, &frame)
                .and_then(|()| spool.save_next_id(self.outbox.next_id()));
            if let Err(e) = written {
                log_spool_error(&e);
            }
        }
        true
    }
}

/// A spool write failed: the batch is still held in memory.
fn log_spool_error(error: &SpoolError) {
    tracing::warn!("{error}; the batch is held in memory only");
}
