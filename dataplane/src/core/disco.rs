//! Disco: the sealed ping/pong nodes exchange to find and keep direct paths.
//!
//! ```text
//! +-------------+------------------+-------------------------------------+
//! | magic: 6 B  | sender key: 32 B | Noise_K one-way message (e, payload) |
//! +-------------+------------------+-------------------------------------+
//! payload: type: u8 | tx: 12 B | (pong) family: u8 | address: 0/4/16 B | port: u16
//! ```
//!
//! The magic cannot start a WireGuard message (first byte 1–4, then three
//! zero bytes) or a STUN message (first two bits zero), so one look at the
//! first byte tells the three apart on the shared socket. The sender's key is
//! in the clear so the receiver picks the peer (and drops unknown keys)
//! before any Diffie-Hellman; Noise `K` then proves that key and the
//! receiver's, and keeps the payload private. One-way Noise has no replay
//! protection of its own: pongs only count for a transaction this node
//! started, and the receiver remembers recent ping transactions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use weft_proto::PublicKey;

/// The first bytes of every disco datagram.
pub(crate) const MAGIC: [u8; 6] = [0xf7, b'w', b'e', b'f', b't', 0xd1];
/// A transaction id: pairs a pong with its ping.
pub(crate) type Tx = [u8; 12];

const PATTERN: &str = "Noise_K_25519_ChaChaPoly_BLAKE2s";
/// Binds the messages to this use, so no other Noise K message of these keys opens as disco.
const PROLOGUE: &[u8] = b"weft-disco/1";
const KEY: usize = 32;
const HEADER: usize = MAGIC.len() + KEY;
/// Noise K's ephemeral key and the payload's tag.
const NOISE_OVERHEAD: usize = 32 + 16;
/// The largest payload: a pong with an IPv6 address.
const MAX_PAYLOAD: usize = 1 + 12 + 1 + 16 + 2;
const PING: u8 = 1;
const PONG: u8 = 2;

/// A disco message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message {
    /// Is this path up? Answered with a pong carrying the same `tx`.
    Ping { tx: Tx },
    /// The answer to a ping, with the source address the ping came from
    /// (none when it came through a relay).
    Pong {
        tx: Tx,
        observed: Option<SocketAddr>,
    },
}

/// Why a datagram is not a valid disco message.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum DiscoError {
    #[error("not a disco message: the magic prefix is missing")]
    NotDisco,
    #[error("disco message truncated: {0} bytes")]
    Truncated(usize),
    #[error("disco message does not authenticate for this sender and receiver")]
    Unauthenticated,
    #[error("disco payload malformed: {0}")]
    Malformed(&'static str),
    #[error("cannot seal a disco message: {0}")]
    Seal(#[source] snow::Error),
}

/// Whether `datagram` is disco (rather than WireGuard or STUN).
pub(crate) fn is_disco(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

/// The key `datagram` claims to come from, read before any cryptography.
pub(crate) fn sender(datagram: &[u8]) -> Result<PublicKey, DiscoError> {
    if !is_disco(datagram) {
        return Err(DiscoError::NotDisco);
    }
    let key = datagram
        .get(MAGIC.len()..HEADER)
        .and_then(|k| <[u8; KEY]>::try_from(k).ok())
        .ok_or(DiscoError::Truncated(datagram.len()))?;
    Ok(PublicKey::from_bytes(key))
}

/// Seals `message` from the holder of `private` (whose public key is `from`)
/// to `to`; Noise `K`'s ephemeral key is drawn from a generator seeded with
/// `rng_seed`.
pub(crate) fn seal(
    private: &[u8; 32],
    from: &PublicKey,
    to: &PublicKey,
    message: &Message,
    rng_seed: u64,
) -> Result<Vec<u8>, DiscoError> {
    let payload = encode(message);
    let params = PATTERN.parse().map_err(DiscoError::Seal)?;
    let resolver = FallbackResolver::new(Box::new(SeededRng(rng_seed)), Box::new(DefaultResolver));
    let mut noise = snow::Builder::with_resolver(params, Box::new(resolver))
        .local_private_key(private)
        .and_then(|b| b.remote_public_key(to.as_bytes()))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(DiscoError::Seal)?;
    let mut out = vec![0u8; HEADER + NOISE_OVERHEAD + payload.len()];
    out[..MAGIC.len()].copy_from_slice(&MAGIC);
    out[MAGIC.len()..HEADER].copy_from_slice(from.as_bytes());
    let written = noise
        .write_message(&payload, &mut out[HEADER..])
        .map_err(DiscoError::Seal)?;
    out.truncate(HEADER + written);
    Ok(out)
}

/// Gives snow a generator seeded by the node rather than the OS's, so disco
/// messages replay from the node's seed too; snow's defaults do the rest.
struct SeededRng(u64);

impl CryptoResolver for SeededRng {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(Seeded(StdRng::seed_from_u64(self.0))))
    }

    fn resolve_dh(&self, _: &DHChoice) -> Option<Box<dyn Dh>> {
        None
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

struct Seeded(StdRng);

impl Random for Seeded {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

/// Opens `datagram`, which must come from `sender` (the key in its header)
/// and be sealed to the holder of `private`.
pub(crate) fn open(
    private: &[u8; 32],
    sender: &PublicKey,
    datagram: &[u8],
) -> Result<Message, DiscoError> {
    let sealed = datagram
        .get(HEADER..)
        .filter(|s| s.len() >= NOISE_OVERHEAD)
        .ok_or(DiscoError::Truncated(datagram.len()))?;
    if sealed.len() > NOISE_OVERHEAD + MAX_PAYLOAD {
        return Err(DiscoError::Malformed("longer than any disco message"));
    }
    let params = PATTERN
        .parse()
        .map_err(|_: snow::Error| DiscoError::Unauthenticated)?;
    let mut noise = snow::Builder::new(params)
        .local_private_key(private)
        .and_then(|b| b.remote_public_key(sender.as_bytes()))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_responder())
        .map_err(|_| DiscoError::Unauthenticated)?;
    let mut payload = [0u8; MAX_PAYLOAD];
    let len = noise
        .read_message(sealed, &mut payload)
        .map_err(|_| DiscoError::Unauthenticated)?;
    decode(&payload[..len])
}

fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_PAYLOAD);
    match message {
        Message::Ping { tx } => {
            out.push(PING);
            out.extend_from_slice(tx);
        }
        Message::Pong { tx, observed } => {
            out.push(PONG);
            out.extend_from_slice(tx);
            match observed.map(|a| (a.ip(), a.port())) {
                None => out.push(0),
                Some((IpAddr::V4(ip), port)) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                    out.extend_from_slice(&port.to_be_bytes());
                }
                Some((IpAddr::V6(ip), port)) => {
                    out.push(6);
                    out.extend_from_slice(&ip.octets());
                    out.extend_from_slice(&port.to_be_bytes());
                }
            }
        }
    }
    out
}

fn decode(payload: &[u8]) -> Result<Message, DiscoError> {
    let [kind, rest @ ..] = payload else {
        return Err(DiscoError::Malformed("empty payload"));
    };
    let (tx, rest) = rest
        .split_first_chunk::<12>()
        .ok_or(DiscoError::Malformed("no transaction id"))?;
    match (*kind, rest) {
        (PING, []) => Ok(Message::Ping { tx: *tx }),
        (PONG, [0]) => Ok(Message::Pong {
            tx: *tx,
            observed: None,
        }),
        (PONG, [4, a, b, c, d, p0, p1]) => Ok(Message::Pong {
            tx: *tx,
            observed: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)),
                u16::from_be_bytes([*p0, *p1]),
            )),
        }),
        (PONG, [6, rest @ ..]) if rest.len() == 18 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&rest[..16]);
            Ok(Message::Pong {
                tx: *tx,
                observed: Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(octets)),
                    u16::from_be_bytes([rest[16], rest[17]]),
                )),
            })
        }
        (PING | PONG, _) => Err(DiscoError::Malformed("wrong length for its type")),
        _ => Err(DiscoError::Malformed("unknown message type")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use weft_proto::PrivateKey;

    use super::*;

    struct Keys {
        private: [u8; 32],
        public: PublicKey,
    }

    fn keys() -> Keys {
        let key = PrivateKey::generate();
        Keys {
            private: key.to_x25519().to_bytes(),
            public: key.public_key(),
        }
    }

    fn sealed(from: &Keys, to: &Keys, message: &Message) -> Vec<u8> {
        seal(&from.private, &from.public, &to.public, message, 1).unwrap()
    }

    #[test]
    fn messages_open_only_for_their_receiver_and_sender() {
        let (a, b, c) = (keys(), keys(), keys());
        let ping = Message::Ping { tx: [7; 12] };
        let datagram = sealed(&a, &b, &ping);
        assert_eq!(sender(&datagram), Ok(a.public));
        assert_eq!(open(&b.private, &a.public, &datagram), Ok(ping));
        assert_eq!(
            open(&c.private, &a.public, &datagram),
            Err(DiscoError::Unauthenticated)
        );
        assert_eq!(
            open(&b.private, &c.public, &datagram),
            Err(DiscoError::Unauthenticated),
            "a forged sender key in the header does not open"
        );
    }

    #[test]
    fn a_flipped_bit_anywhere_after_the_header_fails() {
        let (a, b) = (keys(), keys());
        let datagram = sealed(&a, &b, &Message::Ping { tx: [1; 12] });
        for i in HEADER..datagram.len() {
            let mut bad = datagram.clone();
            bad[i] ^= 0x20;
            assert_eq!(
                open(&b.private, &a.public, &bad),
                Err(DiscoError::Unauthenticated)
            );
        }
    }

    #[test]
    fn disco_is_neither_wireguard_nor_stun() {
        let (a, b) = (keys(), keys());
        let datagram = sealed(&a, &b, &Message::Ping { tx: [0; 12] });
        assert!(!(1..=4).contains(&datagram[0]));
        assert_ne!(datagram[0] & 0xc0, 0);
        assert!(!is_disco(&[4, 0, 0, 0, 1, 2, 3]));
        assert!(!is_disco(&weft_proto::stun::request(&[9; 12])));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let v4 = (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port));
        let v6 = (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port));
        prop_oneof![
            any::<Tx>().prop_map(|tx| Message::Ping { tx }),
            (any::<Tx>(), proptest::option::of(prop_oneof![v4, v6]))
                .prop_map(|(tx, observed)| Message::Pong { tx, observed }),
        ]
    }

    proptest! {
        #[test]
        fn seal_then_open_round_trips(message in arb_message()) {
            let (a, b) = (keys(), keys());
            let datagram = sealed(&a, &b, &message);
            prop_assert_eq!(open(&b.private, &a.public, &datagram), Ok(message));
        }

        #[test]
        fn any_bytes_are_an_error_never_a_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..200),
            prefixed in any::<bool>(),
        ) {
            let b = keys();
            let mut datagram = if prefixed { MAGIC.to_vec() } else { Vec::new() };
            datagram.extend_from_slice(&tail);
            if let Ok(key) = sender(&datagram) {
                prop_assert!(open(&b.private, &key, &datagram).is_err());
            }
            prop_assert!(decode(&tail).is_err() || tail.len() >= 13);
        }
    }
}
