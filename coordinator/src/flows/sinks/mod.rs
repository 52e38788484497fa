//! Forwarding: every kept flow record, and audit trail entries where a sink
//! asks for them, go to the configured sinks — JSON lines in a file, syslog
//! (RFC 5424 over UDP or TCP) and OTLP logs over HTTP.
//!
//! Forwarding never holds up intake: each sink has a bounded queue and a
//! task of its own. A record is offered to each queue once it is kept; a
//! full queue drops it and counts the drop
//! (`weft_coordinator_sink_records_total{result="dropped"}`). A sink that
//! fails keeps the records it was sending and tries again with backoff,
//! while its queue fills. The segments, not the sinks, are the durable copy:
//! what a sink misses is still in `weft-coordinator flows`.

mod jsonl;
mod otlp;
mod syslog;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{FlowView, KeptBatch};
use crate::audit::{self, AuditEntry};
use crate::config::{SinkSettings, SinkTarget};
use crate::metrics;
use crate::store::{Store, WatchError};

/// The most items one delivery carries.
const MAX_DELIVERY: usize = 256;
/// The first wait after a failed delivery; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a sink forwards.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Flow(Arc<FlowView>),
    Audit(Arc<AuditEntry>),
}

impl Item {
    /// The item as `flows --json` or `audit --json` prints one element.
    fn json(&self) -> Result<String, serde_json::Error> {
        match self {
            Item::Flow(view) => serde_json::to_string(&**view),
            Item::Audit(entry) => serde_json::to_string(&**entry),
        }
    }
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot write {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        source: std::io::Error,
    },
    #[error("{address} resolves to no address")]
    NoAddress { address: String },
    #[error("cannot send to {address}: {source}")]
    Send {
        address: String,
        source: std::io::Error,
    },
    #[error("{address} did not take the records within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("cannot reach the OTLP collector at {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("the OTLP collector at {url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
}

impl SinkError {
    /// Whether sending the same records again cannot succeed (the
    /// collector refused them as malformed): they are dropped, not retried.
    fn is_permanent(&self) -> bool {
        match self {
            SinkError::Encode(_) => true,
            SinkError::Status { status, .. } => {
                status.is_client_error()
                    && *status != reqwest::StatusCode::TOO_MANY_REQUESTS
                    && *status != reqwest::StatusCode::REQUEST_TIMEOUT
            }
            _ => false,
        }
    }
}

/// Where one sink delivers.
#[derive(Debug)]
enum Target {
    Jsonl(jsonl::Jsonl),
    Syslog(syslog::Syslog),
    Otlp(otlp::Otlp),
}

impl Target {
    fn new(target: &SinkTarget) -> Result<Self, reqwest::Error> {
        Ok(match target {
            SinkTarget::Jsonl { path } => Target::Jsonl(jsonl::Jsonl::new(path.clone())),
            SinkTarget::Syslog {
                address,
                transport,
                facility,
            } => Target::Syslog(syslog::Syslog::new(address.clone(), *transport, *facility)),
            SinkTarget::Otlp { url, headers } => {
                Target::Otlp(otlp::Otlp::new(url.clone(), headers)?)
            }
        })
    }

    /// Delivers `items`; the ones it had to drop (each too large for the
    /// transport) are counted in the returned number.
    async fn deliver(&mut self, items: &[Item]) -> Result<usize, SinkError> {
        match self {
            Target::Jsonl(sink) => sink.deliver(items).await.map(|()| 0),
            Target::Syslog(sink) => sink.deliver(items).await,
            Target::Otlp(sink) => sink.deliver(items).await.map(|()| 0),
        }
    }
}

/// The queue of one sink.
#[derive(Debug, Clone)]
struct Queue {
    name: Arc<str>,
    audit: bool,
    tx: mpsc::Sender<Item>,
}

/// The configured sinks; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sinks {
    queues: Arc<[Queue]>,
}

/// Why a sink could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start flow sink {name:?}: {source}")]
pub(crate) struct StartError {
    name: String,
    source: reqwest::Error,
}

impl Sinks {
    /// Starts a task for each sink.
    pub(crate) fn start(
        settings: &[SinkSettings],
    ) -> Result<(Self, Vec<JoinHandle<()>>), StartError> {
        let mut queues = Vec::with_capacity(settings.len());
        let mut tasks = Vec::with_capacity(settings.len());
        for sink in settings {
            let target = Target::new(&sink.target).map_err(|source| StartError {
                name: sink.name.clone(),
                source,
            })?;
            let (tx, rx) = mpsc::channel(sink.queue);
            let name: Arc<str> = sink.name.as_str().into();
            metrics::sink_registered(&name);
            tasks.push(tokio::spawn(run(Arc::clone(&name), target, rx)));
            queues.push(Queue {
                name,
                audit: sink.audit,
                tx,
            });
        }
        Ok((
            Self {
                queues: queues.into(),
            },
            tasks,
        ))
    }

    /// Whether any sink forwards audit entries.
    pub(crate) fn wants_audit(&self) -> bool {
        self.queues.iter().any(|q| q.audit)
    }

    /// Offers the records of kept batches to every sink.
    pub(super) fn publish(&self, batches: &[&KeptBatch]) {
        if self.queues.is_empty() {
            return;
        }
        let items: Vec<Item> = batches
            .iter()
            .flat_map(|batch| (*batch).clone().into_views())
            .map(|view| Item::Flow(Arc::new(view)))
            .collect();
        for queue in self.queues.iter() {
            offer(queue, &items);
        }
    }

    fn publish_audit(&self, entry: AuditEntry) {
        let item = [Item::Audit(Arc::new(entry))];
        for queue in self.queues.iter().filter(|q| q.audit) {
            offer(queue, &item);
        }
    }
}

fn offer(queue: &Queue, items: &[Item]) {
    let mut dropped = 0;
    for item in items {
        if queue.tx.try_send(item.clone()).is_err() {
            dropped += 1;
        }
    }
    if dropped > 0 {
        metrics::sink_records(&queue.name, metrics::SinkResult::Dropped, dropped);
    }
}

/// Delivers what the queue holds, in order, until every handle is gone.
async fn run(name: Arc<str>, mut target: Target, mut rx: mpsc::Receiver<Item>) {
    let mut batch: Vec<Item> = Vec::new();
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(item) => batch.push(item),
                None => return,
            }
            while batch.len() < MAX_DELIVERY {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        }
        match target.deliver(&batch).await {
            Ok(dropped) => {
                if failing {
                    tracing::info!(sink = %name, "flow sink delivering again");
                    failing = false;
                }
                let sent = batch.len() - dropped;
                metrics::sink_records(&name, metrics::SinkResult::Sent, sent as u64);
                metrics::sink_records(&name, metrics::SinkResult::Dropped, dropped as u64);
                batch.clear();
                backoff = MIN_BACKOFF;
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(sink = %name, records = batch.len(), "flow sink refused records; dropping them: {e}");
                metrics::sink_records(&name, metrics::SinkResult::Dropped, batch.len() as u64);
                batch.clear();
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(sink = %name, "flow sink failing, retrying with backoff (logged again once it recovers): {e}");
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Forwards audit trail entries appended from now on to the sinks that
/// ask for them, until the store closes. Every replica sharing a store
/// forwards every entry; an entry's `hash` names it uniquely.
pub(crate) async fn forward_audit(store: Arc<dyn Store>, sinks: Sinks) {
    let mut watch = store.watch(audit::ENTRIES_PREFIX);
    let mut last = {
        let store = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || audit::head_seq(&*store)).await {
            Ok(Ok(seq)) => seq,
            Ok(Err(e)) => {
                tracing::error!(
                    "cannot read the audit trail's head; audit entries are not forwarded: {e}"
                );
                return;
            }
            Err(e) => {
                tracing::error!("audit forwarding task failed: {e}");
                return;
            }
        }
    };
    loop {
        match watch.next().await {
            Ok(event) => {
                let Some(value) = event.value else { continue };
                match crate::store::decode::<AuditEntry>(&event.key, &value) {
                    Ok(entry) if entry.seq > last => {
                        last = entry.seq;
                        sinks.publish_audit(entry);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("not forwarding an audit entry: {e}"),
                }
            }
            Err(WatchError::Lagged(_)) => {
                let store = Arc::clone(&store);
                let missed = tokio::task::spawn_blocking(move || audit::list(&*store, None)).await;
                match missed {
                    Ok(Ok(entries)) => {
                        let after = last;
                        for entry in entries.into_iter().filter(|e| e.seq > after) {
                            last = entry.seq;
                            sinks.publish_audit(entry);
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("cannot re-read the audit trail to forward it: {e}")
                    }
                    Err(e) => tracing::warn!("audit forwarding task failed: {e}"),
                }
            }
            Err(WatchError::Closed) => return,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use weft_proto::NodeId;

    use super::super::intake::tests::record;
    use super::super::{KeptRecord, Reporter};
    use super::*;

    /// A kept record, as sinks receive it.
    pub(crate) fn view() -> FlowView {
        FlowView {
            received_ms: 1_780_000_000_123,
            reporter: Reporter {
                node: NodeId(2),
                name: "db".into(),
            },
            batch: 7,
            kept: KeptRecord {
                index: 1,
                src_verified: true,
                dst_verified: true,
                record: record("100.64.0.1:40000", "100.64.0.2:5432"),
            },
        }
    }

    #[test]
    fn only_refusals_of_the_records_themselves_are_final() {
        let status = |status| SinkError::Status {
            url: "http://collector".into(),
            status,
        };
        assert!(status(reqwest::StatusCode::BAD_REQUEST).is_permanent());
        assert!(!status(reqwest::StatusCode::TOO_MANY_REQUESTS).is_permanent());
        assert!(!status(reqwest::StatusCode::SERVICE_UNAVAILABLE).is_permanent());
        let timeout = SinkError::Timeout {
            address: "siem:514".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(!timeout.is_permanent());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, mut rx) = mpsc::channel(2);
        let queue = Queue {
            name: "unit-full".into(),
            audit: false,
            tx,
        };
        let items: Vec<Item> = (0..5).map(|_| Item::Flow(Arc::new(view()))).collect();
        offer(&queue, &items);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
        let text = metrics::render();
        assert!(
            text.contains(
                "weft_coordinator_sink_records_total{sink=\"unit-full\",result=\"dropped\"} 3"
            ),
            "{text}"
        );
    }
}
