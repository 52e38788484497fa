//! A workload token issuer on loopback, shaped like a Kubernetes
//! service-account issuer: OIDC discovery at
//! `/.well-known/openid-configuration` naming `/openid/v1/jwks`. It signs
//! with RS256/384/512 (the committed test RSA keys), ES256, ES384 and
//! Ed25519 keys generated per test, so the coordinator's production
//! verification runs against real signatures.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_SHA256,
    RSA_PKCS1_SHA384, RSA_PKCS1_SHA512,
};
use serde_json::{json, Value};

const ISSUER_KEY: &[u8] = include_bytes!("../oidc/testdata/issuer-key.der");
const ROGUE_KEY: &[u8] = include_bytes!("../oidc/testdata/rogue-key.der");

/// A signing key and the `kid` it is published under.
pub(crate) struct TestKey {
    pub(crate) kid: String,
    pair: Pair,
}

enum Pair {
    Rsa(RsaKeyPair, &'static str),
    Ecdsa(EcdsaKeyPair, &'static str),
    Ed25519(Ed25519KeyPair),
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestKey({} {})", self.alg(), self.kid)
    }
}

impl TestKey {
    /// The committed RSA issuer key, signing with `alg` (RS256, RS384 or RS512).
    pub(crate) fn rsa(kid: &str, alg: &'static str) -> Self {
        Self::with_rsa(ISSUER_KEY, kid, alg)
    }

    /// An RSA key no issuer publishes.
    pub(crate) fn rogue(kid: &str) -> Self {
        Self::with_rsa(ROGUE_KEY, kid, "RS256")
    }

    fn with_rsa(der: &[u8], kid: &str, alg: &'static str) -> Self {
        Self {
            kid: kid.into(),
            pair: Pair::Rsa(RsaKeyPair::from_der(der).unwrap(), alg),
        }
    }

    /// A fresh P-256 key.
    pub(crate) fn es256(kid: &str) -> Self {
        Self::ecdsa(kid, "ES256")
    }

    /// A fresh P-384 key.
    pub(crate) fn es384(kid: &str) -> Self {
        Self::ecdsa(kid, "ES384")
    }

    fn ecdsa(kid: &str, alg: &'static str) -> Self {
        let rng = SystemRandom::new();
        let params = if alg == "ES256" {
            &ECDSA_P256_SHA256_FIXED_SIGNING
        } else {
            &ECDSA_P384_SHA384_FIXED_SIGNING
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(params, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(params, pkcs8.as_ref(), &rng).unwrap();
        Self {
            kid: kid.into(),
            pair: Pair::Ecdsa(pair, alg),
        }
    }

    /// A fresh Ed25519 key.
    pub(crate) fn ed25519(kid: &str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self {
            kid: kid.into(),
            pair: Pair::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()),
        }
    }

    pub(crate) fn alg(&self) -> &'static str {
        match &self.pair {
            Pair::Rsa(_, alg) | Pair::Ecdsa(_, alg) => alg,
            Pair::Ed25519(_) => "EdDSA",
        }
    }

    /// The public key as a JWK.
    pub(crate) fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(pair, _) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({"kty": "RSA", "use": "sig", "kid": self.kid, "alg": self.alg(),
                       "n": b64(trim_zeros(&public.n)), "e": b64(trim_zeros(&public.e))})
            }
            Pair::Ecdsa(pair, alg) => {
                let point = pair.public_key().as_ref();
                let half = (point.len() - 1) / 2;
                let crv = if *alg == "ES256" { "P-256" } else { "P-384" };
                json!({"kty": "EC", "use": "sig", "kid": self.kid, "crv": crv,
                       "x": b64(&point[1..=half]), "y": b64(&point[1 + half..])})
            }
            Pair::Ed25519(pair) => {
                json!({"kty": "OKP", "kid": self.kid, "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
        }
    }

    /// The RSA modulus, the "public key bytes" an HMAC confusion attack uses.
    pub(crate) fn public_bytes(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Rsa(pair, _) => pair.public().as_ref().to_vec(),
            Pair::Ecdsa(pair, _) => pair.public_key().as_ref().to_vec(),
            Pair::Ed25519(pair) => pair.public_key().as_ref().to_vec(),
        }
    }

    /// A token with `claims`, signed under this key's `kid`.
    pub(crate) fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A token with this exact header, signed by this key.
    pub(crate) fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signed = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Rsa(pair, alg) => {
                let params = match *alg {
                    "RS384" => &RSA_PKCS1_SHA384,
                    "RS512" => &RSA_PKCS1_SHA512,
                    _ => &RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(params, &rng, signed.as_bytes(), &mut sig)
                    .unwrap();
                sig
            }
            Pair::Ecdsa(pair, _) => pair
                .sign(&rng, signed.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Pair::Ed25519(pair) => pair.sign(signed.as_bytes()).as_ref().to_vec(),
        };
        format!("{signed}.{}", b64(signature))
    }
}

/// `header.claims.signature` with the signature given verbatim.
pub(crate) fn assemble(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string()),
        b64(claims.to_string()),
        b64(signature)
    )
}

#[derive(Debug, Default)]
struct Shared {
    jwks: Value,
    jwks_fetches: usize,
}

/// The running issuer; stops when dropped.
#[derive(Debug)]
pub(crate) struct TestIssuer {
    url: String,
    shared: Arc<Mutex<Shared>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestIssuer {
    /// Starts an issuer on `127.0.0.1` publishing `keys`.
    pub(crate) async fn start(keys: &[&TestKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let discovery = json!({
            "issuer": url,
            "jwks_uri": format!("{url}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        });
        let jwks_shared = Arc::clone(&shared);
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || std::future::ready(Json(discovery.clone()))),
            )
            .route(
                "/openid/v1/jwks",
                get(move || {
                    let mut shared = jwks_shared.lock().unwrap_or_else(PoisonError::into_inner);
                    shared.jwks_fetches += 1;
                    std::future::ready(Json(shared.jwks.clone()))
                }),
            );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let issuer = Self {
            url,
            shared,
            server,
        };
        issuer.publish(keys);
        issuer
    }

    /// The issuer URL (`iss`).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Publishes exactly `keys` from now on.
    pub(crate) fn publish(&self, keys: &[&TestKey]) {
        self.lock().jwks = jwks(keys);
    }

    /// How often the key set was fetched.
    pub(crate) fn jwks_fetches(&self) -> usize {
        self.lock().jwks_fetches
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A JWKS document of `keys`.
pub(crate) fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
