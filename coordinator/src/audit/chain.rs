//! Checking a stored chain: every entry intact, in place, and linked to the
//! one before, up to the head the store records.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::entry::{AuditEntry, GENESIS_HASH};

/// The last entry of the chain, kept under its own key so that appends
/// compare on one key and removing entries from the tail shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) seq: u64,
    pub(crate) hash: String,
}

impl Head {
    /// The head of the empty chain.
    pub(crate) fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// An entry an operator recorded elsewhere, to check that the chain still
/// holds it: the only defence against a chain rewritten from that entry on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The entry's sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// How many entries were intact before the first problem (all of them
    /// when there is none).
    pub entries: u64,
    /// The last intact entry, to pin elsewhere.
    pub head: Option<Pin>,
    /// The first problem, if any.
    pub problem: Option<Tamper>,
}

/// How the stored chain differs from the one written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tamper {
    /// The entry's bytes do not decode to what was hashed.
    Edited {
        /// Its sequence number.
        seq: u64,
    },
    /// Entries are missing between two that remain.
    Removed {
        /// The first missing entry.
        seq: u64,
    },
    /// The entry's link to the entry before is broken: one before it was
    /// removed or replaced and the rest renumbered.
    Unlinked {
        /// The entry whose `prev_hash` does not match.
        seq: u64,
    },
    /// The entry stored at one position belongs to another.
    Reordered {
        /// The position.
        seq: u64,
        /// The entry found there.
        found: u64,
    },
    /// Entries were removed from the end: the head records a longer chain.
    Truncated {
        /// The first missing entry.
        seq: u64,
        /// The last entry the head records.
        head: u64,
    },
    /// The head record does not describe the last entry.
    HeadMismatch {
        /// The last entry.
        seq: u64,
    },
    /// The chain no longer holds the entry an operator pinned.
    PinMismatch {
        /// The pinned entry.
        seq: u64,
    },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Edited { seq } => write!(
                f,
                "entry {seq} was edited: its stored content does not match its hash"
            ),
            Tamper::Removed { seq } => write!(
                f,
                "entry {seq} was removed: the chain has a gap where it was"
            ),
            Tamper::Unlinked { seq } => write!(
                f,
                "entry {seq} does not link to the entry before it (prev_hash mismatch): an entry was removed or replaced"
            ),
            Tamper::Reordered { seq, found } => write!(
                f,
                "entry {seq} is out of place: entry {found} is stored in its position (entries were reordered)"
            ),
            Tamper::Truncated { seq, head } => write!(
                f,
                "entries {seq} to {head} were removed from the end of the chain"
            ),
            Tamper::HeadMismatch { seq } => write!(
                f,
                "the chain head record does not match entry {seq}, the last one stored"
            ),
            Tamper::PinMismatch { seq } => write!(
                f,
                "entry {seq} is not the entry pinned: the chain was rewritten or truncated from there"
            ),
        }
    }
}

/// Checks `entries` (each entry's position from its key, and its stored
/// bytes, in position order) against `head` (the stored head record) and an
/// optional `pin`.
pub(crate) fn verify(
    entries: &[(Option<u64>, Vec<u8>)],
    head: Option<&[u8]>,
    pin: Option<&Pin>,
) -> Verification {
    let mut last = Head::genesis();
    let mut verification = Verification {
        entries: 0,
        head: None,
        problem: None,
    };
    let mut pin_seen = false;
    for (position, bytes) in entries {
        let expected = last.seq + 1;
        let Some(position) = *position else {
            return verification.failed(Tamper::Edited { seq: expected });
        };
        let Some(entry) = intact(bytes) else {
            return verification.failed(Tamper::Edited { seq: position });
        };
        if entry.seq != position {
            return verification.failed(Tamper::Reordered {
                seq: position,
                found: entry.seq,
            });
        }
        if position > expected {
            return verification.failed(Tamper::Removed { seq: expected });
        }
        if entry.prev_hash != last.hash {
            return verification.failed(Tamper::Unlinked { seq: position });
        }
        if let Some(pin) = pin.filter(|pin| pin.seq == entry.seq) {
            if pin.hash != entry.hash {
                return verification.failed(Tamper::PinMismatch { seq: pin.seq });
            }
            pin_seen = true;
        }
        last = Head {
            seq: entry.seq,
            hash: entry.hash,
        };
        verification.entries += 1;
        verification.head = Some(Pin {
            seq: last.seq,
            hash: last.hash.clone(),
        });
    }
    if let Some(pin) = pin.filter(|_| !pin_seen) {
        return verification.failed(Tamper::PinMismatch { seq: pin.seq });
    }
    let recorded = match head {
        Some(bytes) => serde_json::from_slice::<Head>(bytes).ok(),
        None => Some(Head::genesis()),
    };
    match recorded {
        Some(recorded) if recorded == last => verification,
        Some(recorded) if recorded.seq > last.seq => verification.failed(Tamper::Truncated {
            seq: last.seq + 1,
            head: recorded.seq,
        }),
        _ => verification.failed(Tamper::HeadMismatch { seq: last.seq }),
    }
}

impl Verification {
    fn failed(mut self, problem: Tamper) -> Self {
        self.problem = Some(problem);
        self
    }
}

/// The entry `bytes` hold, if they are exactly its canonical encoding and
/// its hash matches its content.
fn intact(bytes: &[u8]) -> Option<AuditEntry> {
    let entry: AuditEntry = serde_json::from_slice(bytes).ok()?;
    let canonical = serde_json::to_vec(&entry).ok()?;
    (canonical == bytes && entry.hash == entry.computed_hash()).then_some(entry)
}
