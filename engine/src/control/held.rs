//! The verified view the control task holds across sessions, which a
//! reconnect resumes from ([`weft_proto::resume`]).

use weft_proto::signing::{Digest, NetmapKey};
use weft_proto::{NetMap, Resume, ServerMessage, SignedRecord};

use crate::netmap_cache::Restored;

/// The fold of every verified record since the last full netmap, across
/// sessions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Held {
    netmap: NetMap,
    /// The digest of the last record folded in.
    last_record: Digest,
    /// The key the records verified with: a coordinator signing with
    /// another is not resumed from them.
    key: NetmapKey,
    /// Read from the cache, not yet reported to the daemon by this task,
    /// which may hold something else: the first record is reported folded,
    /// as a full netmap.
    from_cache: bool,
}

impl Held {
    /// The view a verified cache holds ([`crate::netmap_cache::CacheWriter::reopen`]).
    pub(crate) fn restored(restored: Restored) -> Self {
        Self {
            netmap: restored.netmap,
            last_record: restored.last_record,
            key: restored.key,
            from_cache: true,
        }
    }

    /// What a registration resuming from this view says of it.
    pub(crate) fn resume(&self) -> Resume {
        Resume::of(self.last_record, &self.netmap)
    }

    /// The key the view verified with.
    pub(crate) fn key(&self) -> NetmapKey {
        self.key
    }

    /// Folds a verified record into `held` and returns the message to
    /// report for it: the record's own, except a delta onto a view the
    /// daemon was not given by this task, reported as the folded netmap.
    pub(crate) fn advance(
        held: &mut Option<Held>,
        message: ServerMessage,
        signed: &SignedRecord,
        key: NetmapKey,
    ) -> ServerMessage {
        let last_record = signed.digest();
        match message {
            ServerMessage::NetMap(netmap) => {
                *held = Some(Held {
                    netmap: netmap.clone(),
                    last_record,
                    key,
                    from_cache: false,
                });
                ServerMessage::NetMap(netmap)
            }
            ServerMessage::Delta(delta) => {
                let Some(view) = held.as_mut() else {
                    return ServerMessage::Delta(delta);
                };
                view.netmap.apply(delta.clone());
                view.last_record = last_record;
                view.key = key;
                if std::mem::take(&mut view.from_cache) {
                    ServerMessage::NetMap(view.netmap.clone())
                } else {
                    ServerMessage::Delta(delta)
                }
            }
            other => other,
        }
    }
}
