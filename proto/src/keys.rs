//! Curve25519 keys and pre-auth keys, with text forms that never leak secrets.
//!
//! Public keys print as standard base64, as `wg(8)` shows them. Private keys
//! and auth keys have no `Display` and a redacted `Debug`, so they cannot end
//! up in a log line or an error message by accident.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A key that is not valid base64 of 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key: expected 44 characters of base64 encoding 32 bytes (as printed by `weft-coordinator key`)")]
pub struct KeyParseError;

/// A Curve25519 public key: a node's WireGuard key, a machine key, or the coordinator's key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short, non-secret fingerprint for log lines: the first 8 base64 characters.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(Self)
    }
}

impl From<x25519_dalek::PublicKey> for PublicKey {
    fn from(k: x25519_dalek::PublicKey) -> Self {
        Self(k.to_bytes())
    }
}

impl From<PublicKey> for x25519_dalek::PublicKey {
    fn from(k: PublicKey) -> Self {
        x25519_dalek::PublicKey::from(k.0)
    }
}

/// A Curve25519 private key, zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        Self(secret.to_bytes())
    }

    /// Wraps raw key bytes (e.g. read back from a key file).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses the base64 form written by [`PrivateKey::to_base64`].
    pub fn from_base64(s: &str) -> Result<Self, KeyParseError> {
        decode_key(s).map(Self)
    }

    /// The base64 form, for key files only.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(x25519_dalek::PublicKey::from(&self.to_x25519()))
    }

    /// The key as x25519-dalek's type, as boringtun takes it.
    pub fn to_x25519(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key().short())
    }
}

/// A pre-auth key: a bearer secret that admits a node. Redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct AuthKey(String);

impl AuthKey {
    /// The prefix every auth key starts with, so scanners can find leaked keys.
    pub const PREFIX: &'static str = "weft-auth-";

    /// A fresh random key: the prefix, a public 12-hex-digit id, a dash and 32
    /// secret bytes in URL-safe base64.
    pub fn generate() -> Self {
        use rand::RngCore as _;
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        Self(format!("{}{id}-{secret}", Self::PREFIX))
    }

    /// Wraps a key given by an operator.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The whole secret, for sending it to the coordinator or printing it once at creation.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The non-secret id part (e.g. `3fa2c19b07de`), for logs and listings.
    /// `None` when the key is not in weft's format.
    pub fn id(&self) -> Option<&str> {
        let rest = self.0.strip_prefix(Self::PREFIX)?;
        let (id, secret) = rest.split_once('-')?;
        (id.len() == 12 && !secret.is_empty()).then_some(id)
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id() {
            Some(id) => write!(f, "AuthKey({id}-<redacted>)"),
            None => f.write_str("AuthKey(<redacted>)"),
        }
    }
}

fn decode_key(s: &str) -> Result<[u8; 32], KeyParseError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyParseError)?;
    bytes.try_into().map_err(|_| KeyParseError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_through_base64() {
        let key = PrivateKey::generate().public_key();
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
    }

    #[test]
    fn malformed_public_keys_are_rejected() {
        for bad in ["", "abc", "!!!!", &"A".repeat(44), &"QUFB".repeat(12)] {
            assert_eq!(bad.parse::<PublicKey>(), Err(KeyParseError), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let private = PrivateKey::generate();
        assert!(!format!("{private:?}").contains(&private.to_base64()));
        let auth = AuthKey::generate();
        let debug = format!("{auth:?}");
        assert!(!debug.contains(auth.expose_secret()));
        assert!(debug.contains(auth.id().unwrap()));
    }

    #[test]
    fn auth_key_ids_are_recognised_only_in_weft_format() {
        assert_eq!(
            AuthKey::new("weft-auth-0123456789ab-xyz").id(),
            Some("0123456789ab")
        );
        assert_eq!(AuthKey::new("weft-auth-short-xyz").id(), None);
        assert_eq!(AuthKey::new("tskey-whatever").id(), None);
    }
}
