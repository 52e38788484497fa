//! An issuer's published signing keys (JWKS) and when to fetch them again.
//!
//! [`KeyCache`] is the sans-IO part: given the `kid` a token names and the
//! time, it says whether the cached set answers, whether to fetch, or that
//! the issuer is unavailable. Unknown `kid`s cause at most one fetch per
//! [`REFETCH_INTERVAL`], so forged tokens cannot make the coordinator hammer
//! an issuer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

use super::verify::Alg;

/// The shortest time between two fetches of one issuer's keys.
pub(crate) const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// At most this many keys are taken from a key set.
const MAX_KEYS: usize = 64;

/// JWKS values are base64url; some publishers pad them.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One public signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Jwk {
    pub(crate) kid: Option<String>,
    /// The `alg` the key is restricted to, when the set says.
    alg: Option<String>,
    material: Material,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (`04 || x || y`).
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// An issuer's key set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeySet {
    keys: Vec<Jwk>,
}

impl KeySet {
    /// Parses a JWKS document. Keys of other types, encryption keys and
    /// keys with malformed values are skipped; a document without a `keys`
    /// array is an error.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("the key set is not JSON ({e})"))?;
        let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
            return Err("the key set has no `keys` array".into());
        };
        let keys = keys.iter().filter_map(Jwk::parse).take(MAX_KEYS).collect();
        Ok(Self { keys })
    }

    /// The keys with `kid`, or every key when the token names none.
    pub(crate) fn candidates<'a>(&'a self, kid: Option<&'a str>) -> impl Iterator<Item = &'a Jwk> {
        self.keys
            .iter()
            .filter(move |k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
    }

    fn has(&self, kid: Option<&str>) -> bool {
        self.candidates(kid).next().is_some()
    }
}

impl Jwk {
    fn parse(value: &Value) -> Option<Self> {
        let text = |name: &str| value.get(name).and_then(Value::as_str);
        let bytes = |name: &str| text(name).and_then(|s| LENIENT_B64.decode(s).ok());
        if text("use").is_some_and(|u| u != "sig") {
            return None;
        }
        let material = match (text("kty")?, text("crv")) {
            ("RSA", _) => Material::Rsa {
                n: bytes("n")?,
                e: bytes("e")?,
            },
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                let len = if crv == "P-256" { 32 } else { 48 };
                if x.len() != len || y.len() != len {
                    return None;
                }
                let point = [&[4u8][..], &x, &y].concat();
                if crv == "P-256" {
                    Material::P256(point)
                } else {
                    Material::P384(point)
                }
            }
            ("OKP", Some("Ed25519")) => Material::Ed25519(bytes("x")?),
            _ => return None,
        };
        Some(Self {
            kid: text("kid").map(str::to_owned),
            alg: text("alg").map(str::to_owned),
            material,
        })
    }

    /// Whether this key can make `alg` signatures: its type and curve
    /// match, and its own `alg`, when given, is the same.
    pub(crate) fn fits(&self, alg: Alg) -> bool {
        let kind = matches!(
            (&self.material, alg),
            (Material::Rsa { .. }, Alg::Rs256 | Alg::Rs384 | Alg::Rs512)
                | (Material::P256(_), Alg::Es256)
                | (Material::P384(_), Alg::Es384)
                | (Material::Ed25519(_), Alg::EdDsa)
        );
        kind && self.alg.as_deref().is_none_or(|a| a == alg.name())
    }

    /// The key type, for messages.
    pub(crate) fn kty(&self) -> &'static str {
        match self.material {
            Material::Rsa { .. } => "RSA",
            Material::P256(_) => "EC P-256",
            Material::P384(_) => "EC P-384",
            Material::Ed25519(_) => "Ed25519",
        }
    }

    /// Verifies `sig` over `message`; the caller checked [`Jwk::fits`].
    /// RSA keys under 2048 bits never verify.
    pub(crate) fn verify(&self, alg: Alg, message: &[u8], sig: &[u8]) -> bool {
        match (&self.material, alg) {
            (Material::Rsa { n, e }, _) => {
                let params = match alg {
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    _ => &signature::RSA_PKCS1_2048_8192_SHA256,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok()
            }
            (Material::P256(point), Alg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            (Material::P384(point), Alg::Es384) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            (Material::Ed25519(key), Alg::EdDsa) => {
                UnparsedPublicKey::new(&signature::ED25519, key)
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

/// What the cache says about a token's `kid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Try these keys (they may lack the `kid`: then it is unknown).
    Keys(Arc<KeySet>),
    /// Fetch the key set, then look again.
    Fetch,
    /// The last fetch failed, too recently to try again.
    Unavailable(String),
}

/// One issuer's cached key set.
#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    keys: Option<Arc<KeySet>>,
    last_fetch: Option<Instant>,
    last_error: Option<String>,
}

impl KeyCache {
    /// Whether the cached keys answer for `kid` at `now`.
    pub(crate) fn lookup(&self, kid: Option<&str>, now: Instant) -> Lookup {
        if let Some(keys) = self.keys.as_ref().filter(|k| k.has(kid)) {
            return Lookup::Keys(Arc::clone(keys));
        }
        let recent = self
            .last_fetch
            .is_some_and(|at| now.saturating_duration_since(at) < REFETCH_INTERVAL);
        if !recent {
            return Lookup::Fetch;
        }
        match (&self.last_error, &self.keys) {
            (Some(error), _) => Lookup::Unavailable(error.clone()),
            (None, Some(keys)) => Lookup::Keys(Arc::clone(keys)),
            (None, None) => Lookup::Unavailable("no keys fetched yet".into()),
        }
    }

    /// Records a fetch's outcome. A failed fetch keeps the keys fetched before.
    pub(crate) fn fetched(&mut self, result: Result<KeySet, String>, now: Instant) {
        self.last_fetch = Some(now);
        match result {
            Ok(keys) => {
                self.keys = Some(Arc::new(keys));
                self.last_error = None;
            }
            Err(error) => self.last_error = Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn set(kids: &[&str]) -> KeySet {
        let keys: Vec<Value> = kids
            .iter()
            .map(|kid| json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": "AAAA"}))
            .collect();
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn key_sets_skip_what_they_cannot_use() {
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB", "alg": "RS256"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "short", "x": "AAAA", "y": "AAAA"},
            {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AAAA", "y": "AAAA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AAAA"},
        ]});
        let keys = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        let kids: Vec<_> = keys
            .candidates(None)
            .filter_map(|k| k.kid.clone())
            .collect();
        assert_eq!(kids, ["r", "ed"]);
        let rsa = keys.candidates(Some("r")).next().unwrap();
        assert!(rsa.fits(Alg::Rs256));
        assert!(!rsa.fits(Alg::Rs512), "the key is restricted to RS256");
        assert!(!rsa.fits(Alg::Es256));
        assert!(KeySet::parse(b"{}").is_err());
        assert!(KeySet::parse(b"not json").is_err());
    }

    #[test]
    fn unknown_kids_refetch_at_most_every_ten_seconds() {
        let start = Instant::now();
        let mut cache = KeyCache::default();
        assert_eq!(cache.lookup(Some("a"), start), Lookup::Fetch);
        cache.fetched(Ok(set(&["a"])), start);
        assert!(matches!(cache.lookup(Some("a"), start), Lookup::Keys(_)));
        // An unknown kid right after a fetch: the keys answer (and lack it).
        let soon = start + Duration::from_secs(9);
        assert!(matches!(cache.lookup(Some("b"), soon), Lookup::Keys(k) if !k.has(Some("b"))));
        let later = start + REFETCH_INTERVAL;
        assert_eq!(cache.lookup(Some("b"), later), Lookup::Fetch);
        cache.fetched(Ok(set(&["a", "b"])), later);
        assert!(matches!(cache.lookup(Some("b"), later), Lookup::Keys(k) if k.has(Some("b"))));
    }

    #[test]
    fn a_failed_fetch_reports_unavailable_but_keeps_known_keys() {
        let start = Instant::now();
        let mut cache = KeyCache::default();
        cache.fetched(Err("connection refused".into()), start);
        assert_eq!(
            cache.lookup(Some("a"), start),
            Lookup::Unavailable("connection refused".into())
        );
        let later = start + REFETCH_INTERVAL;
        assert_eq!(cache.lookup(Some("a"), later), Lookup::Fetch);
        cache.fetched(Ok(set(&["a"])), later);
        let again = later + REFETCH_INTERVAL;
        cache.fetched(Err("timeout".into()), again);
        assert!(matches!(cache.lookup(Some("a"), again), Lookup::Keys(_)));
        assert_eq!(
            cache.lookup(Some("rotated"), again),
            Lookup::Unavailable("timeout".into())
        );
    }

    proptest! {
        #[test]
        fn any_json_key_set_parses_without_panicking(keys in proptest::collection::vec(
            (prop_oneof!["RSA", "EC", "OKP", "oct"], prop_oneof!["P-256", "P-384", "Ed25519", "X"], "[A-Za-z0-9_=-]{0,90}"), 0..6)) {
            let keys: Vec<Value> = keys.iter().map(|(kty, crv, v)| json!({"kty": kty, "crv": crv, "x": v, "y": v, "n": v, "e": v})).collect();
            if let Ok(set) = KeySet::parse(json!({"keys": keys}).to_string().as_bytes()) {
                for key in set.candidates(None) {
                    prop_assert!(!key.verify(Alg::EdDsa, b"m", b"s") || key.fits(Alg::EdDsa));
                }
            }
        }
    }
}
