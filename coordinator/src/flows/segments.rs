//! Append-only segment files: where flow records are kept.
//!
//! `DATA_DIR/flows/` (mode 0700) holds segments named
//! `SEQ-STARTED.jsonl`: `SEQ` counts up from 1 (ten digits), `STARTED` is
//! when the segment was opened (milliseconds since the epoch, thirteen
//! digits). Each segment is JSON lines (files mode 0600):
//!
//! - first a header, `{"header":{"version":1,"started_ms":…,"batches":[…]}}`,
//!   whose `batches` lists `[node, last batch id, when]` for every node that
//!   reported within the retention period, so that a coordinator reads only
//!   the newest segment at start to know which batches it already kept;
//! - then one line per kept batch, `{"batch":{…}}`: the batch's records,
//!   each stamped (see [`KeptBatch`]).
//!
//! A batch is one line written with one `write` and synced before it is
//! acknowledged, so a crash leaves at most a torn last line: reading skips
//! it with a warning, and the node, which got no acknowledgement, sends the
//! batch again. A coordinator never appends to a segment it did not open:
//! every start opens a new one.
//!
//! Retention deletes whole segments, never the active one: a sealed segment
//! whose newest record (received before the next segment started) is older
//! than `max_age`, and the oldest sealed segments while all of them hold
//! more than `max_bytes`.

use std::collections::{HashMap, VecDeque};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_proto::NodeId;

use super::intake::MAX_CLOCK_AHEAD_MS;
use super::query::FlowFilter;
use super::{FlowView, KeptBatch};
use crate::config::FlowSettings;

/// The header version this coordinator writes and reads.
const VERSION: u32 = 1;

/// The segments' directory inside the data directory.
pub(crate) const DIR_NAME: &str = "flows";

/// Why the segments cannot be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SegmentError {
    #[error("cannot create the flow records directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list the flow records directory {}: {source}", path.display())]
    ListDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read flow segment {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write flow segment {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode a flow segment line: {0}")]
    Encode(#[source] serde_json::Error),
}

/// One line of a segment.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Header(Header),
    Batch(KeptBatch),
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    started_ms: u64,
    /// `(node, last batch id kept, when it was kept)`.
    batches: Vec<(NodeId, u64, u64)>,
}

/// A segment's place in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SegmentName {
    seq: u64,
    started_ms: u64,
}

impl SegmentName {
    fn file_name(&self) -> String {
        format!("{:010}-{:013}.jsonl", self.seq, self.started_ms)
    }

    fn parse(name: &str) -> Option<Self> {
        let (seq, started) = name.strip_suffix(".jsonl")?.split_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(seq) || !digits(started) {
            return None;
        }
        Some(Self {
            seq: seq.parse().ok()?,
            started_ms: started.parse().ok()?,
        })
    }
}

/// The segments in `dir`, oldest first.
fn list(dir: &Path) -> std::io::Result<Vec<SegmentName>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str().and_then(SegmentName::parse) {
            names.push(name);
        }
    }
    names.sort_by_key(|n| n.seq);
    Ok(names)
}

/// A sealed segment: its name and size.
#[derive(Debug)]
struct Sealed {
    name: SegmentName,
    bytes: u64,
    /// When it was last written, if this process wrote it; otherwise the
    /// next segment's start bounds its records' age.
    last_write_ms: Option<u64>,
}

/// The segment being written.
#[derive(Debug)]
struct Active {
    name: SegmentName,
    path: PathBuf,
    file: File,
    bytes: u64,
    /// When a batch was last written to it.
    last_write_ms: Option<u64>,
    /// A write failed: the file may end in a torn line, so the next batch
    /// goes to a new segment.
    broken: bool,
}

/// What became of one batch handed to [`Segments::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Written and synced.
    Kept,
    /// Its id is not above the last kept from its reporter: sent again
    /// after a lost acknowledgement; nothing written.
    Duplicate,
    /// Refused: an earlier batch of the same reporter failed to be written
    /// and must come again first, or it would later count as a duplicate.
    Held,
    /// The write failed.
    Failed,
}

/// The writer's side of the segment store.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    settings: FlowSettings,
    sealed: VecDeque<Sealed>,
    active: Active,
    /// The last batch id kept from each reporter, and when.
    last: HashMap<NodeId, (u64, u64)>,
    /// Reporters whose batch failed to be written: their batches above
    /// that id are refused until it (or an earlier one) comes again.
    held: HashMap<NodeId, u64>,
}

impl Segments {
    /// Opens the store in `data_dir/flows`, learns from the newest segment
    /// which batches are already kept, and starts a new segment.
    pub(crate) fn open(
        data_dir: &Path,
        settings: FlowSettings,
        now_ms: u64,
    ) -> Result<Self, SegmentError> {
        let dir = data_dir.join(DIR_NAME);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| SegmentError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        let names = list(&dir).map_err(|source| SegmentError::ListDir {
            path: dir.clone(),
            source,
        })?;
        // The newest segment's header and lines say it all, unless a crash
        // tore its header as it was created: then the one before says the rest.
        let mut last = HashMap::new();
        for name in names.iter().rev() {
            let path = dir.join(name.file_name());
            let had_header = learn_batches(&path, &mut last)
                .map_err(|source| SegmentError::Read { path, source })?;
            if had_header {
                break;
            }
        }
        let mut sealed = VecDeque::new();
        for name in names {
            let path = dir.join(name.file_name());
            match std::fs::metadata(&path) {
                Ok(meta) => sealed.push_back(Sealed {
                    name,
                    bytes: meta.len(),
                    last_write_ms: None,
                }),
                Err(source) => return Err(SegmentError::Read { path, source }),
            }
        }
        let seq = sealed.back().map_or(1, |s| s.name.seq + 1);
        // A clock that went back must not make the new segment look older
        // than the ones before it.
        let started_ms = sealed
            .back()
            .map_or(now_ms, |s| s.name.started_ms.max(now_ms));
        let active = create(&dir, SegmentName { seq, started_ms }, &last)?;
        let mut segments = Self {
            dir,
            settings,
            sealed,
            active,
            last,
            held: HashMap::new(),
        };
        segments.maintain(now_ms);
        Ok(segments)
    }

    /// Appends `batches` in order, syncing once for all of them.
    pub(crate) fn append(&mut self, batches: &[KeptBatch], now_ms: u64) -> Vec<Appended> {
        let writable = match self.rotate_if_due(now_ms) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("cannot start a new flow segment: {e}");
                false
            }
        };
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut pending: HashMap<NodeId, u64> = HashMap::new();
        let mut bytes = Vec::new();
        for batch in batches {
            let node = batch.reporter.node;
            let last = pending
                .get(&node)
                .copied()
                .or_else(|| self.last.get(&node).map(|(id, _)| *id));
            let outcome = if last.is_some_and(|last| batch.batch <= last) {
                Appended::Duplicate
            } else if self.held.get(&node).is_some_and(|held| batch.batch > *held) {
                Appended::Held
            } else if !writable {
                Appended::Failed
            } else {
                match encode(&Line::Batch(batch.clone())) {
                    Ok(line) => {
                        bytes.extend_from_slice(&line);
                        pending.insert(node, batch.batch);
                        Appended::Kept
                    }
                    Err(e) => {
                        tracing::error!(node = %node, batch = batch.batch, "cannot encode a flow batch: {e}");
                        Appended::Failed
                    }
                }
            };
            if outcome == Appended::Failed {
                self.hold(node, batch.batch);
            }
            outcomes.push(outcome);
        }
        if bytes.is_empty() {
            return outcomes;
        }
        match self.write(&bytes, now_ms) {
            Ok(()) => {
                for batch in batches.iter().zip(&outcomes) {
                    if let (batch, Appended::Kept) = batch {
                        self.last.insert(batch.reporter.node, (batch.batch, now_ms));
                        self.held.remove(&batch.reporter.node);
                    }
                }
            }
            Err(e) => {
                tracing::error!("{e}; the nodes keep the batches and send them again");
                for (batch, outcome) in batches.iter().zip(outcomes.iter_mut()) {
                    if *outcome == Appended::Kept {
                        *outcome = Appended::Failed;
                        self.hold(batch.reporter.node, batch.batch);
                    }
                }
            }
        }
        outcomes
    }

    /// Refuses `node`'s batches after `id` until `id` (or an earlier one)
    /// comes again: kept before it, it would count as a duplicate.
    fn hold(&mut self, node: NodeId, id: u64) {
        let held = self.held.entry(node).or_insert(id);
        *held = (*held).min(id);
    }

    /// `node` started a new session: it sends its oldest unacknowledged
    /// batch first, so whatever it sends next is in order again (even when
    /// it had to drop the batch that failed).
    pub(crate) fn release(&mut self, node: NodeId) {
        self.held.remove(&node);
    }

    fn write(&mut self, bytes: &[u8], now_ms: u64) -> Result<(), SegmentError> {
        let active = &mut self.active;
        let written = active
            .file
            .write_all(bytes)
            .and_then(|()| active.file.sync_data());
        match written {
            Ok(()) => {
                active.bytes += bytes.len() as u64;
                active.last_write_ms = Some(now_ms);
                Ok(())
            }
            Err(source) => {
                active.broken = true;
                Err(SegmentError::Write {
                    path: active.path.clone(),
                    source,
                })
            }
        }
    }

    /// Starts a new segment if the active one is old, full or broken, then
    /// deletes what retention no longer keeps. Called before each append
    /// and every second or so.
    pub(crate) fn maintain(&mut self, now_ms: u64) {
        if let Err(e) = self.rotate_if_due(now_ms) {
            tracing::error!("cannot start a new flow segment: {e}");
        }
        let max_age = u64::try_from(self.settings.max_age.as_millis()).unwrap_or(u64::MAX);
        let oldest_kept = now_ms.saturating_sub(max_age);
        let mut total: u64 = self.sealed.iter().map(|s| s.bytes).sum();
        while let Some(oldest) = self.sealed.front() {
            let next_started_ms = self
                .sealed
                .get(1)
                .map_or(self.active.name.started_ms, |next| next.name.started_ms);
            let ended_ms = oldest.last_write_ms.unwrap_or(next_started_ms);
            let expired = ended_ms < oldest_kept;
            let over = total + self.active.bytes > self.settings.max_bytes;
            if !expired && !over {
                break;
            }
            let path = self.dir.join(oldest.name.file_name());
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot delete an old flow segment: {e}");
                    break;
                }
            }
            tracing::debug!(path = %path.display(), expired, over, "deleted a flow segment");
            total -= oldest.bytes;
            self.sealed.pop_front();
        }
        self.last.retain(|_, (_, when)| *when >= oldest_kept);
    }

    fn rotate_if_due(&mut self, now_ms: u64) -> Result<(), SegmentError> {
        let age_ms = u64::try_from(self.settings.segment_age.as_millis()).unwrap_or(u64::MAX);
        let active = &self.active;
        let due = active.broken
            || active.bytes >= self.settings.segment_bytes
            || now_ms.saturating_sub(active.name.started_ms) >= age_ms;
        if !due {
            return Ok(());
        }
        let name = SegmentName {
            seq: active.name.seq + 1,
            started_ms: now_ms.max(active.name.started_ms),
        };
        let next = create(&self.dir, name, &self.last)?;
        let done = std::mem::replace(&mut self.active, next);
        self.sealed.push_back(Sealed {
            last_write_ms: Some(done.last_write_ms.unwrap_or(done.name.started_ms)),
            name: done.name,
            bytes: done.bytes,
        });
        Ok(())
    }
}

fn encode(line: &Line) -> Result<Vec<u8>, SegmentError> {
    let mut bytes = serde_json::to_vec(line).map_err(SegmentError::Encode)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Creates segment `name` with its header, synced with its directory entry.
fn create(
    dir: &Path,
    name: SegmentName,
    last: &HashMap<NodeId, (u64, u64)>,
) -> Result<Active, SegmentError> {
    let path = dir.join(name.file_name());
    let mut batches: Vec<(NodeId, u64, u64)> = last
        .iter()
        .map(|(node, (batch, when))| (*node, *batch, *when))
        .collect();
    batches.sort_unstable();
    let header = encode(&Line::Header(Header {
        version: VERSION,
        started_ms: name.started_ms,
        batches,
    }))?;
    let written = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| {
            file.write_all(&header)?;
            file.sync_all()?;
            File::open(dir)?.sync_all()?;
            Ok(file)
        });
    let file = written.map_err(|source| SegmentError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(Active {
        name,
        path,
        file,
        bytes: header.len() as u64,
        last_write_ms: None,
        broken: false,
    })
}

/// Reads `path`'s header and batches into `last`: the highest batch id of
/// each reporter. Torn and malformed lines are skipped with a warning.
/// Whether the segment had its header.
fn learn_batches(path: &Path, last: &mut HashMap<NodeId, (u64, u64)>) -> std::io::Result<bool> {
    let mut had_header = false;
    let mut bump = |node: NodeId, batch: u64, when: u64| {
        let entry = last.entry(node).or_insert((batch, when));
        if batch >= entry.0 {
            *entry = (batch, when);
        }
    };
    for_each_line(path, &mut |line| match line {
        Line::Header(header) => {
            had_header = true;
            for (node, batch, when) in header.batches {
                bump(node, batch, when);
            }
        }
        Line::Batch(batch) => bump(batch.reporter.node, batch.batch, batch.received_ms),
    })?;
    Ok(had_header)
}

/// Calls `each` with every whole, well-formed line of the segment at
/// `path`. A line that does not parse, or a last line without its newline
/// (a write cut short), is skipped with a warning.
fn for_each_line(path: &Path, each: &mut dyn FnMut(Line)) -> std::io::Result<()> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut buf = Vec::new();
    let mut number = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        number += 1;
        if buf.last() != Some(&b'\n') {
            tracing::warn!(path = %path.display(), line = number, "skipping a torn last line of a flow segment (a write cut short)");
            return Ok(());
        }
        match serde_json::from_slice::<Line>(&buf) {
            Ok(line) => each(line),
            Err(e) => {
                tracing::warn!(path = %path.display(), line = number, "skipping a malformed line of a flow segment: {e}");
            }
        }
    }
}

/// Reads segments for queries, alongside the writer.
#[derive(Debug, Clone)]
pub(crate) struct FlowReader {
    dir: PathBuf,
}

impl FlowReader {
    /// Reads the segments of `data_dir`.
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(DIR_NAME),
        }
    }

    /// The newest `filter.limit` records that match, oldest first, and
    /// whether older ones may match too. Reads the newest segments first and
    /// stops once it has enough.
    pub(crate) fn query(&self, filter: &FlowFilter) -> Result<(Vec<FlowView>, bool), SegmentError> {
        let names = match list(&self.dir) {
            Ok(names) => names,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(SegmentError::ListDir {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        // Records end at most MAX_CLOCK_AHEAD_MS past when they were
        // received, so a segment closed before `since - that` holds none
        // that ended at `since` or later.
        let received_after = filter
            .since_ms
            .map(|since| since.saturating_sub(MAX_CLOCK_AHEAD_MS));
        let mut newest_first: Vec<Vec<FlowView>> = Vec::new();
        let mut found = 0;
        let mut more = false;
        for (i, name) in names.iter().enumerate().rev() {
            let closed_ms = names.get(i + 1).map(|next| next.started_ms);
            if let (Some(after), Some(closed)) = (received_after, closed_ms) {
                if closed < after {
                    break;
                }
            }
            if found >= filter.limit {
                more = true;
                break;
            }
            let path = self.dir.join(name.file_name());
            let mut matched = Vec::new();
            let read = for_each_line(&path, &mut |line| {
                if let Line::Batch(batch) = line {
                    matched.extend(batch.into_views().filter(|v| filter.matches(v)));
                }
            });
            match read {
                Ok(()) => {}
                // Retention deleted it since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(SegmentError::Read { path, source }),
            }
            let wanted = filter.limit - found;
            if matched.len() > wanted {
                matched.drain(..matched.len() - wanted);
                more = true;
            }
            found += matched.len();
            newest_first.push(matched);
        }
        Ok((newest_first.into_iter().rev().flatten().collect(), more))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use weft_proto::flows::FlowVerdict;

    use super::super::intake::tests::{record, NOW_MS};
    use super::super::{KeptRecord, Reporter};
    use super::*;

    fn settings() -> FlowSettings {
        FlowSettings {
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 20,
            segment_age: Duration::from_secs(60),
            segment_bytes: 64 << 10,
            sinks: Vec::new(),
        }
    }

    fn kept(node: u64, id: u64, received_ms: u64) -> KeptBatch {
        let record = record("100.64.0.1:40000", "100.64.0.2:5432");
        KeptBatch {
            received_ms,
            reporter: Reporter {
                node: NodeId(node),
                name: format!("node{node}"),
            },
            batch: id,
            records: vec![KeptRecord {
                index: 0,
                src_verified: true,
                dst_verified: false,
                record,
            }],
        }
    }

    fn all(dir: &Path) -> Vec<FlowView> {
        let filter = FlowFilter::everything(usize::MAX);
        FlowReader::new(dir).query(&filter).unwrap().0
    }

    #[test]
    fn batches_are_kept_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS).unwrap();
        let outcomes = segments.append(
            &[kept(1, 5, NOW_MS), kept(1, 5, NOW_MS), kept(2, 1, NOW_MS)],
            NOW_MS,
        );
        assert_eq!(
            outcomes,
            [Appended::Kept, Appended::Duplicate, Appended::Kept]
        );
        drop(segments);
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS + 10).unwrap();
        let outcomes = segments.append(
            &[kept(1, 4, NOW_MS), kept(1, 6, NOW_MS), kept(2, 1, NOW_MS)],
            NOW_MS + 10,
        );
        assert_eq!(
            outcomes,
            [Appended::Duplicate, Appended::Kept, Appended::Duplicate]
        );
        drop(segments);
        // A third start still knows node 2's batch, though the newest
        // segment before it holds no batch of node 2.
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS + 20).unwrap();
        assert_eq!(
            segments.append(&[kept(2, 1, NOW_MS)], NOW_MS + 20),
            [Appended::Duplicate]
        );
        let views = all(dir.path());
        let ids: Vec<(u64, u64)> = views.iter().map(|v| (v.reporter.node.0, v.batch)).collect();
        assert_eq!(ids, [(1, 5), (2, 1), (1, 6)]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(DIR_NAME)), 0o700);
        for name in list(&dir.path().join(DIR_NAME)).unwrap() {
            assert_eq!(
                mode(&dir.path().join(DIR_NAME).join(name.file_name())),
                0o600
            );
        }
    }

    #[test]
    fn a_torn_or_garbled_line_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS).unwrap();
        segments.append(&[kept(1, 1, NOW_MS), kept(1, 2, NOW_MS)], NOW_MS);
        let path = segments.active.path.clone();
        drop(segments);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"batch\": not json}\n").unwrap();
        let line = encode(&Line::Batch(kept(1, 3, NOW_MS))).unwrap();
        file.write_all(&line[..line.len() / 2]).unwrap();
        drop(file);
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS + 1).unwrap();
        // Batch 3 was torn: it was never acknowledged, so it is kept when sent again.
        assert_eq!(
            segments.append(&[kept(1, 3, NOW_MS)], NOW_MS + 1),
            [Appended::Kept]
        );
        let batches: Vec<u64> = all(dir.path()).iter().map(|v| v.batch).collect();
        assert_eq!(batches, [1, 2, 3]);
    }

    #[test]
    fn a_segment_torn_as_it_was_created_does_not_make_batches_new_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS).unwrap();
        segments.append(&[kept(1, 1, NOW_MS)], NOW_MS);
        let next = SegmentName {
            seq: segments.active.name.seq + 1,
            started_ms: NOW_MS + 5,
        };
        drop(segments);
        let torn = dir.path().join(DIR_NAME).join(next.file_name());
        std::fs::write(&torn, b"{\"header\":{\"vers").unwrap();
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS + 10).unwrap();
        assert_eq!(
            segments.append(&[kept(1, 1, NOW_MS)], NOW_MS + 10),
            [Appended::Duplicate]
        );
    }

    #[test]
    fn a_failed_write_holds_later_batches_of_that_reporter() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS).unwrap();
        segments.held.insert(NodeId(1), 4);
        let outcomes = segments.append(
            &[kept(1, 5, NOW_MS), kept(2, 5, NOW_MS), kept(1, 4, NOW_MS)],
            NOW_MS,
        );
        assert_eq!(outcomes, [Appended::Held, Appended::Kept, Appended::Kept]);
        assert!(segments.held.is_empty());
        assert_eq!(
            segments.append(&[kept(1, 5, NOW_MS)], NOW_MS),
            [Appended::Kept]
        );
    }

    #[test]
    fn retention_deletes_old_and_excess_segments_but_never_the_active_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings();
        settings.max_bytes = 4 * 1024;
        settings.segment_bytes = 1024;
        let mut segments = Segments::open(dir.path(), settings, NOW_MS).unwrap();
        for id in 1..=40 {
            segments.append(&[kept(1, id, NOW_MS)], NOW_MS);
        }
        segments.maintain(NOW_MS);
        let total: u64 =
            segments.sealed.iter().map(|s| s.bytes).sum::<u64>() + segments.active.bytes;
        assert!(total <= 4 * 1024, "{total} bytes kept");
        let views = all(dir.path());
        assert_eq!(views.last().map(|v| v.batch), Some(40));
        assert!(views.len() < 40);
        // An hour later, everything sealed is past max_age.
        let later = NOW_MS + 3600 * 1000 + 61_000;
        segments.maintain(later);
        assert!(segments.sealed.is_empty(), "{:?}", segments.sealed);
        assert!(segments.active.path.exists());
        assert!(all(dir.path()).is_empty());
    }

    #[test]
    fn queries_take_the_newest_matches_and_say_when_there_are_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = Segments::open(dir.path(), settings(), NOW_MS).unwrap();
        for id in 1..=5 {
            let mut batch = kept(1, id, NOW_MS);
            if id % 2 == 0 {
                batch.records[0].record.verdict = FlowVerdict::Deny;
            }
            segments.append(&[batch], NOW_MS);
        }
        let mut filter = FlowFilter::everything(2);
        let (views, more) = FlowReader::new(dir.path()).query(&filter).unwrap();
        assert_eq!(views.iter().map(|v| v.batch).collect::<Vec<_>>(), [4, 5]);
        assert!(more);
        filter.verdict = Some(FlowVerdict::Deny);
        filter.limit = 10;
        let (views, more) = FlowReader::new(dir.path()).query(&filter).unwrap();
        assert_eq!(views.iter().map(|v| v.batch).collect::<Vec<_>>(), [2, 4]);
        assert!(!more);
    }

    proptest! {
        #[test]
        fn segment_names_round_trip(seq in 0u64..10_000_000_000, started in 0u64..10_000_000_000_000) {
            let name = SegmentName { seq, started_ms: started };
            prop_assert_eq!(SegmentName::parse(&name.file_name()), Some(name));
        }

        #[test]
        fn any_bytes_in_a_segment_are_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            let flows = dir.path().join(DIR_NAME);
            std::fs::create_dir(&flows).unwrap();
            std::fs::write(flows.join(SegmentName { seq: 1, started_ms: NOW_MS }.file_name()), &bytes).unwrap();
            let mut last = HashMap::new();
            learn_batches(&flows.join(SegmentName { seq: 1, started_ms: NOW_MS }.file_name()), &mut last).unwrap();
            prop_assert!(Segments::open(dir.path(), settings(), NOW_MS).is_ok());
        }

        #[test]
        fn kept_batches_survive_the_segment_codec(ids in proptest::collection::vec(1u64..1000, 1..20)) {
            let dir = tempfile::tempdir().unwrap();
            let mut segments = Segments::open(dir.path(), settings(), NOW_MS).unwrap();
            let batches: Vec<KeptBatch> = ids.iter().map(|id| kept(id % 3, *id, NOW_MS)).collect();
            let outcomes = segments.append(&batches, NOW_MS);
            let expected: Vec<KeptBatch> = batches
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == Appended::Kept)
                .map(|(b, _)| b.clone())
                .collect();
            let views = all(dir.path());
            let read: Vec<(u64, u64)> = views.iter().map(|v| (v.reporter.node.0, v.batch)).collect();
            let written: Vec<(u64, u64)> = expected.iter().map(|b| (b.reporter.node.0, b.batch)).collect();
            prop_assert_eq!(read, written);
            for (view, batch) in views.iter().zip(&expected) {
                prop_assert_eq!(&view.kept, &batch.records[0]);
            }
        }
    }
}
