//! Signed netmaps: what lets a node trust a netmap it kept on disk.
//!
//! The Noise session authenticates the coordinator only while it lasts. A
//! node restarted while every coordinator is down restores its tunnels from
//! the netmap it cached, and that cache must be as trustworthy as the
//! session was. So the coordinator signs every [`NetMap`] and
//! [`NetMapDelta`] it sends, with an Ed25519 key derived from its static key
//! ([`NetmapSigner::derive`]): every replica sharing the static key signs
//! alike. The public half ([`NetmapKey`]) reaches the node inside the
//! authenticated session ([`ServerMessage::NetmapKey`]).
//!
//! The records of a session form a chain: each signature covers a domain
//! label, the node's id and WireGuard key, the digest of the previous record
//! of the session (zero for the session's netmap) and the record's exact
//! encoded bytes. Records cannot be moved to another node, reordered,
//! dropped or repeated without breaking a signature, and signing costs one
//! Ed25519 signature over bytes already encoded — O(change), never O(world).
//!
//! A node that reconnects may ask to resume ([`crate::resume`]): the new
//! session's chain then continues the old one ([`Chain::resume`]), its first
//! record a delta signed after the last record the node verified, so the
//! node's cached chain grows across sessions and still verifies from its
//! netmap. A coordinator that sends a full netmap instead starts a new chain.
//!
//! [`Opener`] is the node's side: it takes the coordinator's messages in
//! order and turns each [`ServerMessage::Signed`] back into the
//! [`ServerMessage::NetMap`] or [`ServerMessage::Delta`] it carries, after
//! checking its signature and place in the chain.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyParseError, PrivateKey, PublicKey};
use crate::messages::{NetMap, NetMapDelta, NodeId, ServerMessage};

/// What the signature of every record starts with, so it can never be
/// mistaken for a signature over anything else.
const RECORD_LABEL: &[u8] = b"weft signed netmap record v1\0";
/// The HKDF label of the signing key's derivation from the coordinator key.
const DERIVATION_LABEL: &[u8] = b"weft coordinator netmap signing key v1";

/// The digest of a signed record, which the next record of the chain signs.
pub type Digest = [u8; 32];

/// The digest that stands before a session's first record.
pub const CHAIN_START: Digest = [0; 32];

/// The coordinator's netmap-signing key. Derived, never stored.
pub struct NetmapSigner {
    pair: Ed25519KeyPair,
}

impl NetmapSigner {
    /// The signing key of the coordinator with static key `coordinator`:
    /// HKDF-SHA256 of the key under a weft-specific label, as an Ed25519 seed.
    #[expect(
        clippy::expect_used,
        reason = "HKDF-SHA256 always yields 32 bytes (one hash length), and any 32 bytes are an Ed25519 seed"
    )]
    pub fn derive(coordinator: &PrivateKey) -> Self {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, DERIVATION_LABEL);
        let mut seed = [0u8; 32];
        salt.extract(coordinator.as_bytes())
            .expand(&[DERIVATION_LABEL], ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut seed))
            .expect("32 bytes is within HKDF-SHA256's output limit");
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are a seed");
        seed.fill(0);
        Self { pair }
    }

    /// The public half, which nodes verify with.
    pub fn public_key(&self) -> NetmapKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        NetmapKey(key)
    }
}

impl fmt::Debug for NetmapSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetmapSigner(public {})", self.public_key())
    }
}

/// The public key nodes verify netmap signatures with: standard base64 of
/// 32 bytes in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetmapKey([u8; 32]);

impl NetmapKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for NetmapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for NetmapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetmapKey({self})")
    }
}

impl FromStr for NetmapKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyParseError)?;
        bytes.try_into().map(Self).map_err(|_| KeyParseError)
    }
}

/// What a signed record carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A complete netmap: starts a chain.
    NetMap(NetMap),
    /// A change to the netmap of the chain.
    Delta(NetMapDelta),
}

impl Record {
    /// The logical message the record stands for.
    pub fn into_message(self) -> ServerMessage {
        match self {
            Record::NetMap(netmap) => ServerMessage::NetMap(netmap),
            Record::Delta(delta) => ServerMessage::Delta(delta),
        }
    }
}

/// A [`Record`] as sent and cached: its encoding and the coordinator's
/// signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// `postcard` encoding of the [`Record`], exactly as signed.
    pub body: Vec<u8>,
    /// Ed25519 signature (64 bytes) over the chain position and `body`.
    pub signature: Vec<u8>,
}

impl SignedRecord {
    /// The digest the next record of the chain signs.
    pub fn digest(&self) -> Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(self.body.len() as u64).to_be_bytes());
        ctx.update(&self.body);
        ctx.update(&self.signature);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ctx.finish().as_ref());
        digest
    }
}

/// Why a signed record was refused. Any of these ends the session (or
/// refuses a whole cache): a node never applies a netmap it cannot verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature does not verify: tampered or corrupted, from another
    /// coordinator, for another node or node key, or out of chain order.
    #[error("a netmap record's signature does not verify (tampered, reordered, for another node or node key, or signed by another coordinator)")]
    BadSignature,
    /// The body is not a record.
    #[error("a signed netmap record is malformed: {0}")]
    Malformed(#[source] postcard::Error),
    /// A delta came before any netmap.
    #[error("a netmap delta arrived before the netmap it changes")]
    DeltaFirst,
    /// A signed record arrived before the key to verify it with.
    #[error("a signed netmap arrived before the coordinator's netmap key; the coordinator broke the control protocol")]
    NoKey,
    /// A signed record arrived before the node knew its own id.
    #[error("a signed netmap arrived before registration completed")]
    NotRegistered,
    /// The coordinator sent a netmap without a signature.
    #[error(
        "the coordinator sent an unsigned {0}; it runs an older weft than this node — upgrade it"
    )]
    Unsigned(&'static str),
    /// The record cannot be encoded.
    #[error("cannot encode a netmap record: {0}")]
    Encode(#[source] postcard::Error),
}

/// One session's chain of records for one node: signs on the coordinator,
/// verifies on the node.
#[derive(Debug, Clone)]
pub struct Chain {
    node: NodeId,
    node_key: PublicKey,
    prev: Option<Digest>,
}

impl Chain {
    /// An empty chain for the node `node` with WireGuard key `node_key`.
    pub fn new(node: NodeId, node_key: PublicKey) -> Self {
        Self {
            node,
            node_key,
            prev: None,
        }
    }

    /// A chain that continues, in a new session, the chain whose last
    /// record had digest `prev`: its first record is a delta signed after
    /// `prev`, or a netmap that starts the chain afresh.
    pub fn resume(node: NodeId, node_key: PublicKey, prev: Digest) -> Self {
        Self {
            node,
            node_key,
            prev: Some(prev),
        }
    }

    /// The node the chain is for.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Encodes and signs the next record.
    pub fn sign(
        &mut self,
        signer: &NetmapSigner,
        record: &Record,
    ) -> Result<SignedRecord, SignatureError> {
        let prev = self.prev_for(record)?;
        let body = postcard::to_allocvec(record).map_err(SignatureError::Encode)?;
        let signature = signer
            .pair
            .sign(&self.message(&prev, &body))
            .as_ref()
            .to_vec();
        let signed = SignedRecord { body, signature };
        self.prev = Some(signed.digest());
        Ok(signed)
    }

    /// Verifies the next record and decodes it. The chain does not advance
    /// on an error.
    pub fn verify(
        &mut self,
        key: &NetmapKey,
        signed: &SignedRecord,
    ) -> Result<Record, SignatureError> {
        let record: Record =
            postcard::from_bytes(&signed.body).map_err(SignatureError::Malformed)?;
        let prev = self.prev_for(&record)?;
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&self.message(&prev, &signed.body), &signed.signature)
            .map_err(|_| SignatureError::BadSignature)?;
        self.prev = Some(signed.digest());
        Ok(record)
    }

    /// The digest a record signs: a netmap starts the chain again.
    fn prev_for(&self, record: &Record) -> Result<Digest, SignatureError> {
        match (record, self.prev) {
            (Record::NetMap(_), _) => Ok(CHAIN_START),
            (Record::Delta(_), Some(prev)) => Ok(prev),
            (Record::Delta(_), None) => Err(SignatureError::DeltaFirst),
        }
    }

    fn message(&self, prev: &Digest, body: &[u8]) -> Vec<u8> {
        let mut message = Vec::with_capacity(RECORD_LABEL.len() + 8 + 32 + 32 + body.len());
        message.extend_from_slice(RECORD_LABEL);
        message.extend_from_slice(&self.node.0.to_be_bytes());
        message.extend_from_slice(self.node_key.as_bytes());
        message.extend_from_slice(prev);
        message.extend_from_slice(body);
        message
    }
}

/// The node's view of a session's messages: learns its id from
/// [`ServerMessage::Registered`] and the verification key from
/// [`ServerMessage::NetmapKey`], then opens every
/// [`ServerMessage::Signed`]. Unsigned netmaps are refused.
#[derive(Debug, Clone)]
pub struct Opener {
    node_key: PublicKey,
    key: Option<NetmapKey>,
    chain: Option<Chain>,
    /// The digest of the last record the node verified before this
    /// session, when it asked to resume after it.
    resume_after: Option<Digest>,
}

/// A message as [`Opener::open`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// The logical message: a signed record becomes the `NetMap` or `Delta` it carries.
    pub message: ServerMessage,
    /// The verified record as received, for a cache; `None` for other messages.
    pub signed: Option<SignedRecord>,
}

impl Opener {
    /// A session of the node whose WireGuard key is `node_key`.
    pub fn new(node_key: PublicKey) -> Self {
        Self {
            node_key,
            key: None,
            chain: None,
            resume_after: None,
        }
    }

    /// A session of the node whose WireGuard key is `node_key` that asked to
    /// resume after the record with digest `prev`
    /// ([`crate::messages::Resume::last_record`]): the first record may be a
    /// delta chained after `prev`, or a netmap if the coordinator chose a
    /// full one.
    pub fn resume(node_key: PublicKey, prev: Digest) -> Self {
        Self {
            resume_after: Some(prev),
            ..Self::new(node_key)
        }
    }

    /// The key signed records are verified with, once the coordinator sent it.
    pub fn key(&self) -> Option<NetmapKey> {
        self.key
    }

    /// Takes the session's next message.
    pub fn open(&mut self, message: ServerMessage) -> Result<Opened, SignatureError> {
        match message {
            ServerMessage::Registered(node) => {
                self.chain = Some(match self.resume_after {
                    Some(prev) => Chain::resume(node.id, self.node_key, prev),
                    None => Chain::new(node.id, self.node_key),
                });
                Ok(Opened {
                    message: ServerMessage::Registered(node),
                    signed: None,
                })
            }
            ServerMessage::NetmapKey(key) => {
                self.key = Some(key);
                Ok(Opened {
                    message: ServerMessage::NetmapKey(key),
                    signed: None,
                })
            }
            ServerMessage::Signed(signed) => {
                let key = self.key.ok_or(SignatureError::NoKey)?;
                let chain = self.chain.as_mut().ok_or(SignatureError::NotRegistered)?;
                let record = chain.verify(&key, &signed)?;
                Ok(Opened {
                    message: record.into_message(),
                    signed: Some(signed),
                })
            }
            ServerMessage::NetMap(_) | ServerMessage::Delta(_) => {
                Err(SignatureError::Unsigned(message.kind()))
            }
            other => Ok(Opened {
                message: other,
                signed: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::messages::{Identity, PacketFilter, SelfNode};

    fn self_node(id: u64) -> SelfNode {
        SelfNode {
            id: NodeId(id),
            name: "web-1".into(),
            ipv4: "100.64.0.4".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::4".parse().unwrap(),
            identity: Identity::tagged(vec!["tag:web".into()]),
            key_expiry: None,
        }
    }

    fn netmap(revision: u64) -> Record {
        Record::NetMap(NetMap {
            revision,
            self_node: self_node(4),
            peers: Vec::new(),
            filter: PacketFilter::default(),
            capabilities: Vec::new(),
        })
    }

    fn delta(revision: u64) -> Record {
        Record::Delta(NetMapDelta {
            revision,
            upsert_peers: Vec::new(),
            remove_peers: vec![NodeId(revision)],
            filter: None,
            capabilities: None,
            self_node: None,
        })
    }

    /// A netmap and `deltas` deltas signed for node 4 with `node_key`.
    fn signed_session(
        signer: &NetmapSigner,
        node_key: PublicKey,
        deltas: u64,
    ) -> (Vec<Record>, Vec<SignedRecord>) {
        let mut chain = Chain::new(NodeId(4), node_key);
        let records: Vec<Record> = std::iter::once(netmap(1))
            .chain((2..2 + deltas).map(delta))
            .collect();
        let signed = records
            .iter()
            .map(|r| chain.sign(signer, r).unwrap())
            .collect();
        (records, signed)
    }

    fn verify_all(
        key: &NetmapKey,
        node_key: PublicKey,
        signed: &[SignedRecord],
    ) -> Result<Vec<Record>, SignatureError> {
        let mut chain = Chain::new(NodeId(4), node_key);
        signed.iter().map(|s| chain.verify(key, s)).collect()
    }

    #[test]
    fn the_signing_key_is_derived_deterministically_from_the_coordinator_key() {
        let coordinator = PrivateKey::generate();
        let again = PrivateKey::from_bytes(*coordinator.as_bytes());
        assert_eq!(
            NetmapSigner::derive(&coordinator).public_key(),
            NetmapSigner::derive(&again).public_key()
        );
        assert_ne!(
            NetmapSigner::derive(&coordinator).public_key(),
            NetmapSigner::derive(&PrivateKey::generate()).public_key()
        );
        let key = NetmapSigner::derive(&coordinator).public_key();
        assert_eq!(key.to_string().parse::<NetmapKey>(), Ok(key));
    }

    #[test]
    fn a_chain_signs_and_verifies() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let node_key = PrivateKey::generate().public_key();
        let (records, signed) = signed_session(&signer, node_key, 3);
        assert_eq!(
            verify_all(&signer.public_key(), node_key, &signed),
            Ok(records)
        );
    }

    #[test]
    fn a_body_that_is_not_a_record_keeps_the_decoders_error() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let node_key = PrivateKey::generate().public_key();
        let signed = SignedRecord {
            body: vec![0xff; 3],
            signature: Vec::new(),
        };
        let err = Chain::new(NodeId(4), node_key)
            .verify(&signer.public_key(), &signed)
            .unwrap_err();
        let SignatureError::Malformed(cause) = &err else {
            panic!("expected a malformed record, got {err:?}");
        };
        let source =
            std::error::Error::source(&err).and_then(|s| s.downcast_ref::<postcard::Error>());
        assert_eq!(source, Some(cause));
        assert_eq!(
            err.to_string(),
            format!("a signed netmap record is malformed: {cause}")
        );
    }

    #[test]
    fn records_do_not_move_between_nodes_keys_or_coordinators() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let node_key = PrivateKey::generate().public_key();
        let (_, signed) = signed_session(&signer, node_key, 1);
        let other_key = PrivateKey::generate().public_key();
        assert_eq!(
            verify_all(&signer.public_key(), other_key, &signed),
            Err(SignatureError::BadSignature)
        );
        let mut other_node = Chain::new(NodeId(5), node_key);
        assert_eq!(
            other_node.verify(&signer.public_key(), &signed[0]),
            Err(SignatureError::BadSignature)
        );
        let other_coordinator = NetmapSigner::derive(&PrivateKey::generate()).public_key();
        assert_eq!(
            verify_all(&other_coordinator, node_key, &signed),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn reordered_dropped_or_repeated_records_are_refused() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let key = signer.public_key();
        let node_key = PrivateKey::generate().public_key();
        let (_, signed) = signed_session(&signer, node_key, 3);
        let mut swapped = signed.clone();
        swapped.swap(1, 2);
        let mut dropped = signed.clone();
        dropped.remove(1);
        let mut repeated = signed.clone();
        repeated.insert(2, signed[1].clone());
        for broken in [swapped, dropped, repeated] {
            assert_eq!(
                verify_all(&key, node_key, &broken),
                Err(SignatureError::BadSignature)
            );
        }
        assert_eq!(
            verify_all(&key, node_key, &signed[1..]),
            Err(SignatureError::DeltaFirst)
        );
    }

    #[test]
    fn the_opener_refuses_unsigned_and_unkeyed_netmaps() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let node_key = PrivateKey::generate().public_key();
        let Record::NetMap(plain) = netmap(1) else {
            unreachable!()
        };
        let mut opener = Opener::new(node_key);
        assert_eq!(
            opener.open(ServerMessage::NetMap(plain.clone())),
            Err(SignatureError::Unsigned("NetMap"))
        );
        let signed = Chain::new(NodeId(4), node_key)
            .sign(&signer, &netmap(1))
            .unwrap();
        opener
            .open(ServerMessage::Registered(self_node(4)))
            .unwrap();
        assert_eq!(
            opener.open(ServerMessage::Signed(signed.clone())),
            Err(SignatureError::NoKey)
        );
        opener
            .open(ServerMessage::NetmapKey(signer.public_key()))
            .unwrap();
        let opened = opener.open(ServerMessage::Signed(signed.clone())).unwrap();
        assert_eq!(opened.message, ServerMessage::NetMap(plain));
        assert_eq!(opened.signed, Some(signed));
    }

    #[test]
    fn a_resumed_delta_verifies_only_after_the_record_it_continues() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let key = signer.public_key();
        let node_key = PrivateKey::generate().public_key();
        let (_, signed) = signed_session(&signer, node_key, 2);
        let last = signed[2].digest();
        let mut next = Chain::resume(NodeId(4), node_key, last);
        let resumed = next.sign(&signer, &delta(9)).unwrap();

        // The node's chain, and its cache, continue across the sessions.
        let mut whole = signed.clone();
        whole.push(resumed.clone());
        assert_eq!(verify_all(&key, node_key, &whole).unwrap().len(), 4);
        let mut fresh = Chain::resume(NodeId(4), node_key, last);
        assert_eq!(fresh.verify(&key, &resumed), Ok(delta(9)));

        // After any other record, or in another node's chain, it fails.
        let mut early = signed[..2].to_vec();
        early.push(resumed.clone());
        assert_eq!(
            verify_all(&key, node_key, &early),
            Err(SignatureError::BadSignature)
        );
        let mut other_node = Chain::resume(NodeId(5), node_key, last);
        assert_eq!(
            other_node.verify(&key, &resumed),
            Err(SignatureError::BadSignature)
        );
        let other_key = PrivateKey::generate().public_key();
        let mut other_key_chain = Chain::resume(NodeId(4), other_key, last);
        assert_eq!(
            other_key_chain.verify(&key, &resumed),
            Err(SignatureError::BadSignature)
        );
        // A delta of a fresh session cannot be replayed into a resumed one.
        let mut replay = Chain::resume(NodeId(4), node_key, last);
        assert_eq!(
            replay.verify(&key, &signed[1]),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn a_resuming_opener_takes_a_chained_delta_or_a_fresh_netmap() {
        let signer = NetmapSigner::derive(&PrivateKey::generate());
        let node_key = PrivateKey::generate().public_key();
        let (_, signed) = signed_session(&signer, node_key, 1);
        let last = signed[1].digest();
        let hello = |opener: &mut Opener| {
            opener
                .open(ServerMessage::Registered(self_node(4)))
                .unwrap();
            opener
                .open(ServerMessage::NetmapKey(signer.public_key()))
                .unwrap();
        };

        let resumed = Chain::resume(NodeId(4), node_key, last)
            .sign(&signer, &delta(5))
            .unwrap();
        let mut opener = Opener::resume(node_key, last);
        hello(&mut opener);
        let opened = opener.open(ServerMessage::Signed(resumed.clone())).unwrap();
        assert_eq!(opened.message, delta(5).into_message());

        let full = Chain::new(NodeId(4), node_key)
            .sign(&signer, &netmap(6))
            .unwrap();
        let mut opener = Opener::resume(node_key, last);
        hello(&mut opener);
        let opened = opener.open(ServerMessage::Signed(full)).unwrap();
        assert_eq!(opened.message, netmap(6).into_message());

        // A plain session refuses the resumed delta; a resume after
        // another record does too.
        let mut plain = Opener::new(node_key);
        hello(&mut plain);
        assert_eq!(
            plain.open(ServerMessage::Signed(resumed.clone())),
            Err(SignatureError::DeltaFirst)
        );
        let mut elsewhere = Opener::resume(node_key, signed[0].digest());
        hello(&mut elsewhere);
        assert_eq!(
            elsewhere.open(ServerMessage::Signed(resumed)),
            Err(SignatureError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn a_resumed_chain_verifies_only_from_its_own_prev(prev: [u8; 32], other: [u8; 32]) {
            prop_assume!(prev != other);
            let signer = NetmapSigner::derive(&PrivateKey::from_bytes([7; 32]));
            let node_key = PublicKey::from_bytes([9; 32]);
            let signed = Chain::resume(NodeId(4), node_key, prev).sign(&signer, &delta(3)).unwrap();
            let key = signer.public_key();
            prop_assert!(Chain::resume(NodeId(4), node_key, prev).verify(&key, &signed).is_ok());
            prop_assert_eq!(
                Chain::resume(NodeId(4), node_key, other).verify(&key, &signed),
                Err(SignatureError::BadSignature)
            );
        }

        #[test]
        fn any_flipped_bit_is_refused(record in 0usize..3, bit in 0usize..4096, in_signature: bool) {
            let signer = NetmapSigner::derive(&PrivateKey::from_bytes([7; 32]));
            let node_key = PublicKey::from_bytes([9; 32]);
            let (_, mut signed) = signed_session(&signer, node_key, 2);
            let target = if in_signature {
                &mut signed[record].signature
            } else {
                &mut signed[record].body
            };
            let bit = bit % (target.len() * 8);
            target[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(verify_all(&signer.public_key(), node_key, &signed).is_err());
        }

        #[test]
        fn garbage_never_panics(body: Vec<u8>, signature: Vec<u8>) {
            let key = NetmapSigner::derive(&PrivateKey::from_bytes([7; 32])).public_key();
            let mut chain = Chain::new(NodeId(4), PublicKey::from_bytes([9; 32]));
            let signed = SignedRecord { body, signature };
            prop_assert!(chain.verify(&key, &signed).is_err());
        }
    }
}
