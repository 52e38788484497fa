//! The netmap cache: what lets a node restarted while every coordinator is
//! down bring its tunnels back on its own.
//!
//! The control task appends every signed record of its session, as it was
//! received and verified ([`weft_proto::signing`]), to `STATE_DIR/netmap.cache`;
//! at start, before any coordinator answers, [`restore`] verifies the whole
//! file again and folds it into one [`NetMap`] for the daemon to install.
//!
//! ```text
//! netmap.cache   0600
//!   "WEFTNMC1"                         magic and format version
//!   u32 BE length, postcard(NodeId)    whose cache this is
//!   u32 BE length, postcard(SignedRecord), repeated:
//!                                      the session's netmap, then its deltas
//! netmap.signer  0600  {"coordinator_key": …, "netmap_key": …}
//! ```
//!
//! Trust: the records verify against the netmap key the pinned coordinator
//! sent over its authenticated session, kept in `netmap.signer` together
//! with that coordinator's key; a cache of another node, node key,
//! coordinator or with any byte changed, any record dropped, repeated or
//! moved is refused whole, never half-applied. Freshness: the file's
//! modification time, which the control task refreshes while a session is
//! up ([`CacheWriter::touch`]); a cache not confirmed for [`MAX_AGE`], or
//! whose node key expired, is refused.
//!
//! Limits: each session's netmap replaces the file (written beside it and
//! renamed); a delta is appended and synced before the daemon applies it.
//! A session that resumed ([`weft_proto::resume`]) starts with a delta
//! chained after the file's last record, appended like any other, so the
//! file holds one netmap and the deltas of every session since.
//! A file that would outgrow [`MAX_CACHE_BYTES`] is removed rather than left
//! behind the live netmap, and the writer stops offering a base to resume
//! from ([`CacheWriter::is_current`]) until a full netmap restarts it.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use weft_proto::signing::{Chain, Digest, NetmapKey, Record, SignatureError, SignedRecord};
use weft_proto::{NetMap, NodeId, PublicKey};

use crate::state::Prefs;

/// How long a cache stays usable after a coordinator last confirmed it.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest cache file kept.
pub const MAX_CACHE_BYTES: u64 = 64 << 20;

const CACHE_FILE: &str = "netmap.cache";
const SIGNER_FILE: &str = "netmap.signer";
const MAGIC: &[u8; 8] = b"WEFTNMC1";
const LEN_BYTES: usize = 4;

/// Why a cached netmap was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// There is no cache (the node never received a netmap, or it was removed).
    #[error("no cached netmap")]
    Missing,
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The netmap key on file was learnt from another coordinator than the
    /// pinned one, or is missing or unreadable.
    #[error(
        "no netmap key of the pinned coordinator is on file ({0}); the cache cannot be verified"
    )]
    NoKey(String),
    /// The file is not a netmap cache, or is cut short.
    #[error("the netmap cache is malformed: {0}")]
    Malformed(String),
    /// The session's records outgrew [`MAX_CACHE_BYTES`].
    #[error("the netmap cache would outgrow {} MiB; it is dropped until the next session's netmap", MAX_CACHE_BYTES >> 20)]
    TooLarge,
    /// A record failed verification.
    #[error("record {index} of the netmap cache is refused: {source}")]
    Signature {
        /// Which record (0 is the netmap).
        index: usize,
        /// Why.
        source: SignatureError,
    },
    /// The cache was last confirmed by a coordinator too long ago.
    #[error("the netmap cache was last confirmed {} ago, beyond the {} limit", humantime::format_duration(*.age), humantime::format_duration(MAX_AGE))]
    Stale {
        /// How long ago.
        age: Duration,
    },
    /// The node's own key has expired: it would not be admitted anyway.
    #[error("the node's key expired at Unix time {expiry}; log in again (`weft login`)")]
    KeyExpired {
        /// The expiry, in Unix seconds.
        expiry: u64,
    },
}

/// Loads, verifies and folds the cache in `dir` of the node with WireGuard
/// key `node_key`, trusting only the netmap key learnt from `coordinator_key`.
pub fn restore(
    dir: &Path,
    coordinator_key: PublicKey,
    node_key: PublicKey,
    now: SystemTime,
) -> Result<NetMap, CacheError> {
    read_verified(dir, coordinator_key, node_key, now).map(|(restored, _)| restored.netmap)
}

/// [`restore`], keeping the last record's digest and key, and the file's length.
fn read_verified(
    dir: &Path,
    coordinator_key: PublicKey,
    node_key: PublicKey,
    now: SystemTime,
) -> Result<(Restored, u64), CacheError> {
    let key = load_key(dir, coordinator_key)?;
    let path = dir.join(CACHE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CacheError::Missing),
        Err(source) => return Err(io_error("read", &path, source)),
    };
    let confirmed = fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(|source| io_error("inspect", &path, source))?;
    let (netmap, last_record) = verify_chain(&bytes, &key, node_key)?;
    check_fresh(&netmap, confirmed, now)?;
    let restored = Restored {
        netmap,
        last_record,
        key,
    };
    Ok((restored, bytes.len() as u64))
}

/// A verified cache, as a base to resume a session from.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The fold of every record.
    pub netmap: NetMap,
    /// The digest of the last record, which a resumed session chains after.
    pub last_record: Digest,
    /// The netmap key the records verified with.
    pub key: NetmapKey,
}

/// [`restore`] for weftd's start: the netmap to install before any
/// coordinator answers, or `None` (with the reason logged) to start
/// without peers.
pub fn restore_at_start(dir: &Path, prefs: &Prefs, node_key: PublicKey) -> Option<NetMap> {
    match restore(dir, prefs.coordinator_key, node_key, SystemTime::now()) {
        Ok(netmap) => {
            tracing::info!(
                revision = netmap.revision,
                peers = netmap.peers.len(),
                "restoring tunnels from the cached netmap until a coordinator answers"
            );
            Some(netmap)
        }
        Err(CacheError::Missing) => None,
        Err(e) => {
            tracing::warn!("ignoring the cached netmap, starting without peers: {e}");
            None
        }
    }
}

/// Verifies a whole cache file and folds its records into one netmap.
pub fn verify(bytes: &[u8], key: &NetmapKey, node_key: PublicKey) -> Result<NetMap, CacheError> {
    verify_chain(bytes, key, node_key).map(|(netmap, _)| netmap)
}

/// [`verify`], also returning the digest of the last record.
fn verify_chain(
    bytes: &[u8],
    key: &NetmapKey,
    node_key: PublicKey,
) -> Result<(NetMap, Digest), CacheError> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| CacheError::Malformed("not a weft netmap cache (bad magic)".into()))?;
    let (node, mut rest) = take::<NodeId>(rest)?;
    let mut chain = Chain::new(node, node_key);
    let mut netmap: Option<NetMap> = None;
    let mut last = None;
    let mut index = 0;
    while !rest.is_empty() {
        let (signed, tail) = take::<SignedRecord>(rest)?;
        rest = tail;
        last = Some(signed.digest());
        let record = chain
            .verify(key, &signed)
            .map_err(|source| CacheError::Signature { index, source })?;
        match (record, netmap.as_mut()) {
            (Record::NetMap(full), None) if full.self_node.id == node => netmap = Some(full),
            (Record::Delta(delta), Some(netmap)) => netmap.apply(delta),
            (Record::NetMap(_), _) => {
                return Err(CacheError::Malformed(format!(
                    "record {index} is a netmap of the wrong node or a second netmap"
                )))
            }
            (Record::Delta(_), None) => {
                return Err(CacheError::Signature {
                    index,
                    source: SignatureError::DeltaFirst,
                })
            }
        }
        index += 1;
    }
    match (netmap, last) {
        (Some(netmap), Some(last)) => Ok((netmap, last)),
        _ => Err(CacheError::Malformed("the cache holds no netmap".into())),
    }
}

/// Refuses a cache last confirmed more than [`MAX_AGE`] before `now`, or
/// whose node key has expired.
pub fn check_fresh(
    netmap: &NetMap,
    confirmed: SystemTime,
    now: SystemTime,
) -> Result<(), CacheError> {
    // A confirmation time in the future (the clock was set back) counts as now.
    let age = now.duration_since(confirmed).unwrap_or_default();
    if age > MAX_AGE {
        return Err(CacheError::Stale { age });
    }
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match netmap.self_node.key_expiry {
        Some(expiry) if expiry <= now_secs => Err(CacheError::KeyExpired { expiry }),
        _ => Ok(()),
    }
}

/// Writes a session's verified records to the cache, for the control task.
#[derive(Debug)]
pub struct CacheWriter {
    dir: PathBuf,
    coordinator_key: PublicKey,
    /// The open cache file, while it is current; `None` before the
    /// session's netmap and after a failure.
    file: Option<File>,
    len: u64,
}

impl CacheWriter {
    /// A writer for the state directory `dir`, trusting the coordinator
    /// pinned as `coordinator_key`.
    pub fn new(dir: &Path, coordinator_key: PublicKey) -> Self {
        Self {
            dir: dir.to_path_buf(),
            coordinator_key,
            file: None,
            len: 0,
        }
    }

    /// Verifies the cache on file, as [`restore`] does, and keeps it open to
    /// append the deltas of a session that resumes from it. `Err` leaves
    /// the writer as it was (no file open until a session's netmap).
    pub fn reopen(&mut self, node_key: PublicKey, now: SystemTime) -> Result<Restored, CacheError> {
        let (restored, len) = read_verified(&self.dir, self.coordinator_key, node_key, now)?;
        let path = self.dir.join(CACHE_FILE);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| io_error("open", &path, source))?;
        self.file = Some(file);
        self.len = len;
        Ok(restored)
    }

    /// Whether the file holds every record verified so far, so a session
    /// may resume from them: false before any netmap and once the cache
    /// was dropped (too large, or a write failed).
    pub fn is_current(&self) -> bool {
        self.file.is_some()
    }

    /// Keeps the netmap key the coordinator sent, unless already on file.
    pub fn save_key(&self, key: NetmapKey) -> Result<(), CacheError> {
        if load_key(&self.dir, self.coordinator_key).is_ok_and(|saved| saved == key) {
            return Ok(());
        }
        let signer = SignerFile {
            coordinator_key: self.coordinator_key.to_string(),
            netmap_key: key.to_string(),
        };
        let text = serde_json::to_string_pretty(&signer)
            .map_err(|e| CacheError::Malformed(e.to_string()))?;
        let path = self.dir.join(SIGNER_FILE);
        replace(&path, text.as_bytes())
    }

    /// Stores a session's verified netmap, replacing the file. On failure
    /// the cache is removed, so it never lags the netmap in force.
    pub fn netmap(&mut self, node: NodeId, signed: &SignedRecord) -> Result<(), CacheError> {
        let result = self.replace_with(node, signed);
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// Appends a verified delta of the session. On failure (or past
    /// [`MAX_CACHE_BYTES`]) the cache is removed, so it never lags the
    /// netmap in force.
    pub fn delta(&mut self, signed: &SignedRecord) -> Result<(), CacheError> {
        let result = self.append(signed);
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// Marks the cache as current now: a coordinator is connected.
    pub fn touch(&self) {
        if let Some(file) = &self.file {
            if let Err(e) = file.set_modified(SystemTime::now()) {
                tracing::debug!("cannot refresh the netmap cache's time: {e}");
            }
        }
    }

    /// Removes the cache: its netmap must not outlive the node's admission.
    pub fn discard(&mut self) {
        self.file = None;
        self.len = 0;
        let path = self.dir.join(CACHE_FILE);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }

    fn replace_with(&mut self, node: NodeId, signed: &SignedRecord) -> Result<(), CacheError> {
        let mut bytes = MAGIC.to_vec();
        push_framed(&mut bytes, &node)?;
        push_framed(&mut bytes, signed)?;
        let path = self.dir.join(CACHE_FILE);
        self.file = None;
        replace(&path, &bytes)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| io_error("open", &path, source))?;
        self.file = Some(file);
        self.len = bytes.len() as u64;
        Ok(())
    }

    fn append(&mut self, signed: &SignedRecord) -> Result<(), CacheError> {
        let path = self.dir.join(CACHE_FILE);
        let mut bytes = Vec::new();
        push_framed(&mut bytes, signed)?;
        if self.len + bytes.len() as u64 > MAX_CACHE_BYTES {
            return Err(CacheError::TooLarge);
        }
        // No netmap cached in this session (or it was dropped): nothing lags.
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(|source| io_error("append to", &path, source))?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// `netmap.signer`: the netmap key, and the coordinator it was learnt from.
#[derive(Debug, Serialize, Deserialize)]
struct SignerFile {
    coordinator_key: String,
    netmap_key: String,
}

fn load_key(dir: &Path, coordinator_key: PublicKey) -> Result<NetmapKey, CacheError> {
    let path = dir.join(SIGNER_FILE);
    let text = fs::read_to_string(&path).map_err(|e| CacheError::NoKey(e.to_string()))?;
    let signer: SignerFile = serde_json::from_str(&text)
        .map_err(|e| CacheError::NoKey(format!("{}: {e}", path.display())))?;
    let learnt_from: PublicKey = signer
        .coordinator_key
        .parse()
        .map_err(|e| CacheError::NoKey(format!("{}: {e}", path.display())))?;
    if learnt_from != coordinator_key {
        return Err(CacheError::NoKey(format!(
            "{} holds the key of coordinator {}, not of the pinned {}",
            path.display(),
            learnt_from.short(),
            coordinator_key.short()
        )));
    }
    signer
        .netmap_key
        .parse()
        .map_err(|e| CacheError::NoKey(format!("{}: {e}", path.display())))
}

/// Splits one length-prefixed postcard value off the front of `bytes`.
fn take<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), CacheError> {
    let cut = || CacheError::Malformed("the file is cut short".into());
    let len = bytes.get(..LEN_BYTES).ok_or_else(cut)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let body = bytes
        .get(LEN_BYTES..LEN_BYTES.saturating_add(len))
        .ok_or_else(cut)?;
    let (value, trailing) =
        postcard::take_from_bytes(body).map_err(|e| CacheError::Malformed(e.to_string()))?;
    if !trailing.is_empty() {
        return Err(CacheError::Malformed(format!(
            "{} stray bytes inside a record",
            trailing.len()
        )));
    }
    Ok((value, &bytes[LEN_BYTES + len..]))
}

fn push_framed<T: Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), CacheError> {
    let body = postcard::to_allocvec(value).map_err(|e| CacheError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len())
        .map_err(|_| CacheError::Malformed("a record beyond 4 GiB".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Writes a 0600 file atomically ([`crate::state::write_private`]).
fn replace(path: &Path, contents: &[u8]) -> Result<(), CacheError> {
    crate::state::write_private(path, contents).map_err(|f| io_error(f.action, &f.path, f.source))
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> CacheError {
    CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;
    use weft_proto::signing::NetmapSigner;
    use weft_proto::{Identity, NetMapDelta, PacketFilter, Peer, PrivateKey, SelfNode};

    use super::*;
    use weft_dataplane::core::Node;

    const NODE: NodeId = NodeId(4);

    fn self_node(expiry: Option<u64>) -> SelfNode {
        SelfNode {
            id: NODE,
            name: "web-1".into(),
            ipv4: "100.64.0.4".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::4".parse().unwrap(),
            identity: Identity::tagged(vec!["tag:web".into()]),
            key_expiry: expiry,
        }
    }

    fn peer(id: u64, port: u16) -> Peer {
        Peer {
            id: NodeId(id),
            name: format!("peer-{id}"),
            node_key: PrivateKey::from_bytes([id as u8; 32]).public_key(),
            addresses: vec![format!("100.64.0.{id}").parse().unwrap()],
            endpoints: vec![format!("192.0.2.{id}:{port}").parse().unwrap()],
            home_relay: None,
            identity: Identity::tagged(vec!["tag:db".into()]),
        }
    }

    fn netmap() -> NetMap {
        NetMap {
            revision: 1,
            self_node: self_node(None),
            peers: vec![peer(5, 1), peer(6, 1)],
            filter: PacketFilter::default(),
            capabilities: Vec::new(),
        }
    }

    fn deltas() -> Vec<NetMapDelta> {
        let delta = |revision, upsert_peers, remove_peers| NetMapDelta {
            revision,
            upsert_peers,
            remove_peers,
            filter: None,
            capabilities: None,
            self_node: None,
        };
        vec![
            delta(2, vec![peer(7, 1)], vec![NodeId(5)]),
            delta(3, vec![peer(6, 2)], vec![]),
            delta(4, vec![peer(8, 1)], vec![NodeId(8)]),
        ]
    }

    /// A coordinator, a node and what the node's control task cached.
    struct Fixture {
        coordinator: PrivateKey,
        node_key: PrivateKey,
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                coordinator: PrivateKey::generate(),
                node_key: PrivateKey::generate(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        /// Signs `netmap` and `deltas` as one session and caches them as
        /// the control task does.
        fn cache(&self, netmap: &NetMap, deltas: &[NetMapDelta]) {
            let signer = NetmapSigner::derive(&self.coordinator);
            let mut chain = Chain::new(NODE, self.node_key.public_key());
            let mut writer = CacheWriter::new(self.dir.path(), self.coordinator.public_key());
            writer.save_key(signer.public_key()).unwrap();
            let first = chain
                .sign(&signer, &Record::NetMap(netmap.clone()))
                .unwrap();
            writer.netmap(NODE, &first).unwrap();
            for delta in deltas {
                let signed = chain.sign(&signer, &Record::Delta(delta.clone())).unwrap();
                writer.delta(&signed).unwrap();
            }
        }

        fn restore(&self) -> Result<NetMap, CacheError> {
            restore(
                self.dir.path(),
                self.coordinator.public_key(),
                self.node_key.public_key(),
                SystemTime::now(),
            )
        }

        fn file(&self) -> PathBuf {
            self.dir.path().join(CACHE_FILE)
        }

        /// The cached records, each as its framed bytes.
        fn records(&self) -> (Vec<u8>, Vec<Vec<u8>>) {
            let bytes = fs::read(self.file()).unwrap();
            let (_, mut rest) = take::<NodeId>(&bytes[MAGIC.len()..]).unwrap();
            let head = bytes[..bytes.len() - rest.len()].to_vec();
            let mut records = Vec::new();
            while !rest.is_empty() {
                let (_, tail) = take::<SignedRecord>(rest).unwrap();
                records.push(rest[..rest.len() - tail.len()].to_vec());
                rest = tail;
            }
            (head, records)
        }

        fn write_records(&self, head: &[u8], records: &[Vec<u8>]) {
            let mut bytes = head.to_vec();
            records.iter().for_each(|r| bytes.extend_from_slice(r));
            fs::write(self.file(), bytes).unwrap();
        }
    }

    fn folded() -> NetMap {
        let mut expected = netmap();
        deltas().into_iter().for_each(|d| expected.apply(d));
        expected
    }

    #[test]
    fn a_cached_session_restores_folded() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let restored = fixture.restore().unwrap();
        assert_eq!(restored, folded());
        assert_eq!(restored.revision, 4);
        let ids: Vec<u64> = restored.peers.iter().map(|p| p.id.0).collect();
        assert_eq!(ids, [6, 7]);
        assert_eq!(restored.peers[0].endpoints[0].port(), 2);
    }

    #[test]
    fn the_fold_matches_what_the_data_plane_does_with_the_messages() {
        let now = Instant::now();
        let key = PrivateKey::generate();
        let wall = std::time::SystemTime::now();
        let mut live = Node::new(key.clone(), now, wall, 1);
        live.set_netmap(&netmap(), now);
        for delta in deltas() {
            live.apply_delta(&delta, now);
        }
        let mut restored = Node::new(key, now, wall, 2);
        restored.set_netmap(&folded(), now);
        let view = |node: &Node| {
            node.peers()
                .into_iter()
                .map(|p| (p.id, p.name, p.addresses, p.identity))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&live), view(&restored));
        assert_eq!(view(&live).len(), 2);
    }

    #[test]
    fn a_resumed_session_appends_to_the_chain_and_restore_verifies_it() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let mut writer = CacheWriter::new(fixture.dir.path(), fixture.coordinator.public_key());
        assert!(!writer.is_current());
        let base = writer
            .reopen(fixture.node_key.public_key(), SystemTime::now())
            .unwrap();
        assert!(writer.is_current());
        assert_eq!(base.netmap, folded());
        let (_, records) = fixture.records();
        let (last, _) = take::<SignedRecord>(records.last().unwrap()).unwrap();
        assert_eq!(base.last_record, last.digest());

        // The next session's first record: a delta chained after the last one.
        let signer = NetmapSigner::derive(&fixture.coordinator);
        let mut chain = Chain::resume(NODE, fixture.node_key.public_key(), base.last_record);
        let resumed = NetMapDelta {
            revision: 5,
            upsert_peers: vec![peer(9, 1)],
            remove_peers: vec![NodeId(6)],
            filter: None,
            capabilities: None,
            self_node: None,
        };
        let signed = chain
            .sign(&signer, &Record::Delta(resumed.clone()))
            .unwrap();
        writer.delta(&signed).unwrap();
        let mut expected = folded();
        expected.apply(resumed);
        assert_eq!(fixture.restore().unwrap(), expected);

        // A delta chained after anything else breaks the whole cache.
        let stray = Chain::resume(NODE, fixture.node_key.public_key(), [0; 32])
            .sign(&signer, &Record::Delta(deltas()[0].clone()))
            .unwrap();
        writer.delta(&stray).unwrap();
        assert!(matches!(
            fixture.restore(),
            Err(CacheError::Signature {
                index: 5,
                source: SignatureError::BadSignature
            })
        ));
    }

    #[test]
    fn a_cache_that_outgrows_its_limit_is_dropped_and_offers_no_base() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &[]);
        let mut writer = CacheWriter::new(fixture.dir.path(), fixture.coordinator.public_key());
        writer
            .reopen(fixture.node_key.public_key(), SystemTime::now())
            .unwrap();
        let huge = SignedRecord {
            body: vec![0; MAX_CACHE_BYTES as usize],
            signature: Vec::new(),
        };
        assert!(matches!(writer.delta(&huge), Err(CacheError::TooLarge)));
        assert!(!writer.is_current(), "nothing to resume from");
        assert!(matches!(fixture.restore(), Err(CacheError::Missing)));
        assert!(matches!(
            writer.reopen(fixture.node_key.public_key(), SystemTime::now()),
            Err(CacheError::Missing)
        ));
    }

    #[test]
    fn a_stale_or_foreign_cache_is_no_base_to_resume_from() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let mut writer = CacheWriter::new(fixture.dir.path(), fixture.coordinator.public_key());
        let later = SystemTime::now() + MAX_AGE + Duration::from_secs(60);
        assert!(matches!(
            writer.reopen(fixture.node_key.public_key(), later),
            Err(CacheError::Stale { .. })
        ));
        assert!(writer
            .reopen(PrivateKey::generate().public_key(), SystemTime::now())
            .is_err());
        assert!(!writer.is_current());
    }

    #[test]
    fn a_new_session_replaces_the_cache() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let mut next = netmap();
        next.revision = 9;
        next.peers = vec![peer(9, 1)];
        fixture.cache(&next, &[]);
        assert_eq!(fixture.restore().unwrap(), next);
    }

    #[test]
    fn dropped_repeated_or_reordered_records_are_refused() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let (head, records) = fixture.records();
        let mut dropped = records.clone();
        dropped.remove(1);
        let mut repeated = records.clone();
        repeated.insert(2, records[1].clone());
        let mut swapped = records.clone();
        swapped.swap(1, 2);
        for broken in [dropped, repeated, swapped] {
            fixture.write_records(&head, &broken);
            assert!(
                matches!(
                    fixture.restore(),
                    Err(CacheError::Signature {
                        source: SignatureError::BadSignature,
                        ..
                    })
                ),
                "{:?}",
                fixture.restore()
            );
        }
        fixture.write_records(&head, &records[1..]);
        assert!(matches!(
            fixture.restore(),
            Err(CacheError::Signature {
                index: 0,
                source: SignatureError::DeltaFirst
            })
        ));
    }

    #[test]
    fn another_nodes_or_coordinators_cache_is_refused() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let other_node = restore(
            fixture.dir.path(),
            fixture.coordinator.public_key(),
            PrivateKey::generate().public_key(),
            SystemTime::now(),
        );
        assert!(matches!(
            other_node,
            Err(CacheError::Signature {
                index: 0,
                source: SignatureError::BadSignature
            })
        ));
        let other_coordinator = restore(
            fixture.dir.path(),
            PrivateKey::generate().public_key(),
            fixture.node_key.public_key(),
            SystemTime::now(),
        );
        assert!(matches!(other_coordinator, Err(CacheError::NoKey(_))));

        // A cache signed by another coordinator, with its key on file as the pinned one's.
        let forged = Fixture::new();
        forged.cache(&netmap(), &deltas());
        fs::copy(forged.file(), fixture.file()).unwrap();
        assert!(matches!(
            fixture.restore(),
            Err(CacheError::Signature { index: 0, .. })
        ));
    }

    #[test]
    fn stale_caches_and_expired_keys_are_refused() {
        let now = SystemTime::now();
        let map = netmap();
        assert!(check_fresh(&map, now - MAX_AGE + Duration::from_secs(60), now).is_ok());
        assert!(matches!(
            check_fresh(&map, now - MAX_AGE - Duration::from_secs(1), now),
            Err(CacheError::Stale { .. })
        ));
        let err = check_fresh(&map, now - Duration::from_secs(25 * 3600), now).unwrap_err();
        assert!(err.to_string().contains("1day 1h ago"), "{err}");
        assert!(check_fresh(&map, now + Duration::from_secs(3600), now).is_ok());

        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut expired = netmap();
        expired.self_node.key_expiry = Some(unix - 1);
        assert!(matches!(
            check_fresh(&expired, now, now),
            Err(CacheError::KeyExpired { .. })
        ));
        expired.self_node.key_expiry = Some(unix + 3600);
        assert!(check_fresh(&expired, now, now).is_ok());

        let fixture = Fixture::new();
        fixture.cache(&netmap(), &deltas());
        let later = restore(
            fixture.dir.path(),
            fixture.coordinator.public_key(),
            fixture.node_key.public_key(),
            SystemTime::now() + MAX_AGE + Duration::from_secs(60),
        );
        assert!(matches!(later, Err(CacheError::Stale { .. })));
    }

    #[test]
    fn a_missing_cache_is_told_apart_from_a_bad_one() {
        let fixture = Fixture::new();
        CacheWriter::new(fixture.dir.path(), fixture.coordinator.public_key())
            .save_key(NetmapSigner::derive(&fixture.coordinator).public_key())
            .unwrap();
        assert!(matches!(fixture.restore(), Err(CacheError::Missing)));
        fs::write(fixture.file(), b"not a cache").unwrap();
        assert!(matches!(fixture.restore(), Err(CacheError::Malformed(_))));
    }

    #[test]
    fn a_discarded_cache_is_gone() {
        let fixture = Fixture::new();
        fixture.cache(&netmap(), &[]);
        let mut writer = CacheWriter::new(fixture.dir.path(), fixture.coordinator.public_key());
        writer.discard();
        assert!(matches!(fixture.restore(), Err(CacheError::Missing)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_flipped_bit_refuses_the_whole_cache(bit in 0usize..1 << 16) {
            let fixture = Fixture::new();
            fixture.cache(&netmap(), &deltas());
            let mut bytes = fs::read(fixture.file()).unwrap();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            fs::write(fixture.file(), &bytes).unwrap();
            prop_assert!(fixture.restore().is_err());
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(tail: Vec<u8>, with_magic: bool) {
            let key = NetmapSigner::derive(&PrivateKey::from_bytes([1; 32])).public_key();
            let mut bytes = if with_magic { MAGIC.to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&tail);
            prop_assert!(verify(&bytes, &key, PublicKey::from_bytes([2; 32])).is_err());
        }
    }
}
