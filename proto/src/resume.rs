//! Resuming a view across sessions without per-node state on the coordinator.
//!
//! A node that reconnects states what it holds in its `Register`
//! ([`Resume`]): the digest of the last signed record it verified, and one
//! [`ViewDigest`] per item of its folded view — each peer, the filter, the
//! capabilities and its own details. Any replica computes the node's view as
//! for a full netmap, compares digests and sends only what differs, as a
//! [`crate::NetMapDelta`] chained after that record ([`crate::signing`]).
//!
//! Each digest is the first 16 bytes of SHA-256 over a label naming the item
//! kind and the item's `postcard` encoding, so node and coordinator compute
//! it identically from the same value. It only tells versions apart: a node
//! that lies about what it holds gets a wrong view of what it may already
//! see, never more access — the filter it enforces and the peers it is sent
//! are still the coordinator's, and a digest that matches nothing is sent in
//! full.

use serde::Serialize;

use crate::messages::{
    AppGrant, NetMap, NodeId, PacketFilter, Peer, PeerVersion, Resume, SelfNode, ViewDigest,
};
use crate::signing::Digest;

/// The most peers a [`Resume`] may list; a coordinator reads larger ones as
/// malformed (and its frame limit refuses them).
pub const MAX_RESUME_PEERS: usize = 65_536;

/// The bytes a [`Resume`] of [`MAX_RESUME_PEERS`] peers takes at most,
/// encoded: each peer an id (a varint of at most 10 bytes) and a digest.
pub const MAX_RESUME_BYTES: usize = MAX_RESUME_PEERS * (10 + 16) + 1024;

/// Why a [`Resume`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// More peers than [`MAX_RESUME_PEERS`].
    #[error("a resume lists {0} peers, beyond the limit of {MAX_RESUME_PEERS}")]
    TooManyPeers(usize),
    /// The peers are not sorted by id, or an id repeats.
    #[error("a resume's peers are not sorted by id without repeats (at entry {0})")]
    Unsorted(usize),
}

impl Resume {
    /// What a node holding `netmap`, the fold of records whose last had
    /// digest `last_record`, sends to resume. The peers are sorted by id;
    /// of repeated ids the last wins, as when the view was folded.
    pub fn of(last_record: Digest, netmap: &NetMap) -> Self {
        let mut peers: Vec<PeerVersion> = netmap
            .peers
            .iter()
            .map(|peer| PeerVersion {
                id: peer.id,
                version: peer_digest(peer),
            })
            .collect();
        peers.reverse();
        peers.sort_by_key(|p| p.id);
        peers.dedup_by_key(|p| p.id);
        Self {
            node: netmap.self_node.id,
            last_record,
            revision: netmap.revision,
            peers,
            filter: filter_digest(&netmap.filter),
            capabilities: capabilities_digest(&netmap.capabilities),
            self_node: self_node_digest(&netmap.self_node),
        }
    }

    /// Checks the bounds and order a coordinator relies on.
    pub fn check(&self) -> Result<(), ResumeError> {
        if self.peers.len() > MAX_RESUME_PEERS {
            return Err(ResumeError::TooManyPeers(self.peers.len()));
        }
        match self.peers.windows(2).position(|w| w[0].id >= w[1].id) {
            Some(index) => Err(ResumeError::Unsorted(index + 1)),
            None => Ok(()),
        }
    }

    /// The version of peer `id` the node holds, if it holds it. Needs a
    /// [`Resume::check`]ed resume (binary search over sorted peers).
    pub fn peer(&self, id: NodeId) -> Option<ViewDigest> {
        self.peers
            .binary_search_by_key(&id, |p| p.id)
            .ok()
            .map(|i| self.peers[i].version)
    }
}

/// The digest of a peer record.
pub fn peer_digest(peer: &Peer) -> ViewDigest {
    digest(b"weft resume peer v1\0", peer)
}

/// The digest of a packet filter.
pub fn filter_digest(filter: &PacketFilter) -> ViewDigest {
    digest(b"weft resume filter v1\0", filter)
}

/// The digest of a node's capabilities.
pub fn capabilities_digest(capabilities: &[AppGrant]) -> ViewDigest {
    digest(b"weft resume capabilities v1\0", capabilities)
}

/// The digest of a node's own details.
pub fn self_node_digest(node: &SelfNode) -> ViewDigest {
    digest(b"weft resume self node v1\0", node)
}

#[expect(
    clippy::expect_used,
    reason = "postcard encodes these plain structs (no maps of unknown length, no custom serializers) into a Vec without fail"
)]
fn digest<T: Serialize + ?Sized>(label: &[u8], item: &T) -> ViewDigest {
    let body = postcard::to_allocvec(item).expect("plain data encodes");
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(label);
    ctx.update(&body);
    let mut out = [0u8; 16];
    out.copy_from_slice(&ctx.finish().as_ref()[..16]);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::messages::Identity;
    use crate::PublicKey;

    fn peer(id: u64, port: u16) -> Peer {
        Peer {
            id: NodeId(id),
            name: format!("peer-{id}"),
            node_key: PublicKey::from_bytes([id as u8; 32]),
            addresses: vec![format!("100.64.0.{}", id % 250).parse().unwrap()],
            endpoints: vec![format!("192.0.2.1:{port}").parse().unwrap()],
            home_relay: None,
            identity: Identity::tagged(vec!["tag:db".into()]),
        }
    }

    fn netmap(peers: Vec<Peer>) -> NetMap {
        NetMap {
            revision: 7,
            self_node: SelfNode {
                id: NodeId(1),
                name: "web-1".into(),
                ipv4: "100.64.0.1".parse().unwrap(),
                ipv6: "fd7a:115c:a1e0::1".parse().unwrap(),
                identity: Identity::tagged(vec!["tag:web".into()]),
                key_expiry: None,
            },
            peers,
            filter: PacketFilter::default(),
            capabilities: Vec::new(),
        }
    }

    #[test]
    fn digests_tell_versions_and_kinds_apart() {
        assert_eq!(peer_digest(&peer(2, 1)), peer_digest(&peer(2, 1)));
        assert_ne!(peer_digest(&peer(2, 1)), peer_digest(&peer(2, 2)));
        // An empty filter and empty capabilities encode alike; the label differs.
        assert_ne!(
            filter_digest(&PacketFilter::default()),
            capabilities_digest(&[])
        );
    }

    #[test]
    fn a_resume_lists_peers_sorted_and_checks() {
        let resume = Resume::of([3; 32], &netmap(vec![peer(9, 1), peer(2, 1), peer(5, 1)]));
        let ids: Vec<u64> = resume.peers.iter().map(|p| p.id.0).collect();
        assert_eq!(ids, [2, 5, 9]);
        assert_eq!(resume.check(), Ok(()));
        assert_eq!(resume.peer(NodeId(5)), Some(peer_digest(&peer(5, 1))));
        assert_eq!(resume.peer(NodeId(6)), None);
        assert_eq!((resume.node, resume.revision), (NodeId(1), 7));
    }

    #[test]
    fn unsorted_repeated_or_oversized_resumes_are_refused() {
        let mut resume = Resume::of([0; 32], &netmap(vec![peer(2, 1), peer(5, 1)]));
        resume.peers.swap(0, 1);
        assert_eq!(resume.check(), Err(ResumeError::Unsorted(1)));
        resume.peers[1] = resume.peers[0];
        assert_eq!(resume.check(), Err(ResumeError::Unsorted(1)));
        resume.peers = (0..=MAX_RESUME_PEERS as u64)
            .map(|id| PeerVersion {
                id: NodeId(id),
                version: [0; 16],
            })
            .collect();
        assert_eq!(
            resume.check(),
            Err(ResumeError::TooManyPeers(MAX_RESUME_PEERS + 1))
        );
    }

    #[test]
    fn the_largest_resume_fits_its_byte_bound() {
        let mut resume = Resume::of([0; 32], &netmap(Vec::new()));
        resume.peers = (0..MAX_RESUME_PEERS as u64)
            .map(|i| PeerVersion {
                id: NodeId(u64::MAX - i),
                version: [0xff; 16],
            })
            .rev()
            .collect();
        assert_eq!(resume.check(), Ok(()));
        let encoded = postcard::to_allocvec(&resume).unwrap();
        assert!(encoded.len() <= MAX_RESUME_BYTES, "{}", encoded.len());
    }

    proptest! {
        #[test]
        fn any_view_yields_a_valid_resume(ids in prop::collection::vec(0u64..64, 0..40)) {
            let peers = ids.iter().map(|id| peer(*id, 1)).collect();
            let resume = Resume::of([1; 32], &netmap(peers));
            prop_assert_eq!(resume.check(), Ok(()));
            let mut distinct = ids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(resume.peers.len(), distinct.len());
        }
    }
}
