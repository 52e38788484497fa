//! The flow spool: the batches the coordinator has not acknowledged, one
//! file each in the state directory's `flows/`, so records survive a
//! coordinator outage and a restart of the node; and the next batch id, so
//! ids keep increasing across restarts.
//!
//! A file is written whole under a temporary name and renamed into place.
//! What does not read back as the batch its name says (cut short by a
//! crash, damaged, foreign) is logged, removed and skipped: the node starts
//! without it rather than not at all.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use weft_proto::{ClientMessage, FrameDecoder, MAX_FRAME_LEN};

use super::outbox::Batch;

const NEXT_ID: &str = "next-id";
const SUFFIX: &str = ".batch";

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A spool file or the directory could not be read or written.
    #[error("flow spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
}

/// What a spool held at start.
#[derive(Debug)]
pub struct Restored {
    /// The batches, oldest first.
    pub batches: Vec<Batch>,
    /// The id the next batch gets (at least 1).
    pub next_id: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir` and reads back what it holds.
    pub fn open(dir: &Path) -> Result<(Self, Restored), SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let spool = Self {
            dir: dir.to_owned(),
        };
        let mut batches = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(id) = name.strip_suffix(SUFFIX) {
                match id.parse::<u64>().ok().and_then(|id| read_batch(&path, id)) {
                    Some(batch) => batches.push(batch),
                    None => {
                        tracing::error!(path = %path.display(), "skipping a flow spool file that does not read back as its batch; its records are lost");
                        spool.remove_path(&path);
                    }
                }
            } else if name.ends_with(".tmp") {
                spool.remove_path(&path);
            }
        }
        batches.sort_by_key(|b| b.id);
        let saved = fs::read_to_string(dir.join(NEXT_ID))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(1);
        Ok((
            spool,
            Restored {
                batches,
                next_id: saved.max(1),
            },
        ))
    }

    /// Keeps batch `id` encoded as `frame`.
    pub fn write(&self, id: u64, frame: &[u8]) -> Result<(), SpoolError> {
        self.write_file(&format!("{id:020}{SUFFIX}"), frame)
    }

    /// Keeps the id the next batch gets.
    pub fn save_next_id(&self, next_id: u64) -> Result<(), SpoolError> {
        self.write_file(NEXT_ID, next_id.to_string().as_bytes())
    }

    /// Forgets batch `id`.
    pub fn remove(&self, id: u64) {
        self.remove_path(&self.dir.join(format!("{id:020}{SUFFIX}")));
    }

    fn remove_path(&self, path: &Path) {
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "cannot remove a flow spool file: {e}");
            }
        }
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| SpoolError::Io { path, source })
    }
}

/// The batch in `path`, if it holds exactly one `Flows` frame with `id`.
fn read_batch(path: &Path, id: u64) -> Option<Batch> {
    let len = fs::metadata(path).ok()?.len();
    if len > MAX_FRAME_LEN as u64 + 8 {
        return None;
    }
    let frame = fs::read(path).ok()?;
    let mut decoder = FrameDecoder::new();
    decoder.push(&frame);
    let Ok(Some(ClientMessage::Flows(batch))) = decoder.next_message::<ClientMessage>() else {
        return None;
    };
    decoder.finish().ok()?;
    (batch.id == id).then(|| Batch::restored(id, frame, batch.records.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::outbox::tests::record;
    use crate::flows::outbox::Outbox;
    use crate::flows::FlowQueue;

    #[test]
    fn batches_and_the_next_id_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("flows");
        let queue = FlowQueue::open(&dir);
        queue.push([record(1), record(2)], 3);
        queue.seal();
        queue.push([record(3)], 0);
        queue.seal();
        let (id, _) = queue.next_unsent().unwrap();
        queue.ack(id);
        drop(queue);

        let (_, restored) = Spool::open(&dir).unwrap();
        let ids: Vec<u64> = restored.batches.iter().map(|b| b.id).collect();
        assert_eq!(ids, [2]);
        assert_eq!(restored.next_id, 3);
        let queue = FlowQueue::open(&dir);
        assert_eq!(queue.stats().batches, 1);
        assert_eq!(queue.stats().batched, 1);
        queue.push([record(4)], 0);
        queue.seal();
        let sent: Vec<u64> = std::iter::from_fn(|| queue.next_unsent().map(|(id, _)| id)).collect();
        assert_eq!(sent, [2, 3], "ids keep increasing across the restart");
    }

    #[test]
    fn damaged_spool_files_are_skipped_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("flows");
        let (spool, _) = Spool::open(&dir).unwrap();
        let mut outbox = Outbox::new(1 << 20, 1, Vec::new());
        let mut frames = Vec::new();
        for n in 0..3 {
            outbox.push(record(n));
            frames.extend(outbox.seal().batch);
        }
        for (id, frame) in &frames {
            spool.write(*id, frame).unwrap();
        }
        // Batch 1 cut short, batch 2 renamed to another id, and garbage.
        let path = |id: u64| dir.join(format!("{id:020}.batch"));
        fs::write(path(1), &frames[0].1[..frames[0].1.len() / 2]).unwrap();
        fs::write(path(9), &frames[1].1).unwrap();
        fs::write(dir.join("x.batch"), b"\xff\xff\xff\xff").unwrap();
        fs::write(dir.join(NEXT_ID), b"not a number").unwrap();
        fs::write(path(3).with_extension("batch.tmp"), b"half").unwrap();

        let (_, restored) = Spool::open(&dir).unwrap();
        let ids: Vec<u64> = restored.batches.iter().map(|b| b.id).collect();
        assert_eq!(ids, [2, 3]);
        assert_eq!(
            restored.next_id, 1,
            "the batches still say which ids are taken"
        );
        let left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".batch") || name.ends_with(".tmp"))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        let outbox = Outbox::new(1 << 20, restored.next_id, restored.batches);
        assert_eq!(outbox.next_id(), 4);
    }
}
