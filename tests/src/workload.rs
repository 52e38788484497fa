//! A workload identity issuer on loopback, shaped like a Kubernetes cluster's
//! service-account issuer: it serves OIDC discovery and its JWKS over HTTP,
//! and the test mints tokens with its keys (RS256, ES256, EdDSA) — and the
//! forgeries a coordinator must refuse.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
    ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use serde_json::{json, Value};

/// The path Kubernetes serves its service-account JWKS at.
const JWKS_PATH: &str = "/openid/v1/jwks";

/// How a token is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// RS256 with the issuer's published RSA key.
    Rs256,
    /// ES256 with the issuer's published P-256 key.
    Es256,
    /// EdDSA with the issuer's published Ed25519 key.
    EdDsa,
    /// RS256 with a key the issuer never published, under a `kid` it does not know.
    UnknownKid,
    /// RS256 under the published key's `kid`, with the signature corrupted.
    BadSignature,
    /// `alg: none`, no signature.
    AlgNone,
    /// HS256 keyed with the issuer's public RSA key (the algorithm-confusion forgery).
    HmacWithPublicKey,
}

/// A running issuer; its HTTP server stops on drop.
#[derive(Debug)]
pub struct WorkloadIssuer {
    url: String,
    rsa: Arc<RsaKeyPair>,
    rogue: Arc<RsaKeyPair>,
    ec: Arc<EcdsaKeyPair>,
    ed: Arc<Ed25519KeyPair>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkloadIssuer {
    /// Serves on `127.0.0.1:port` inside namespace `ns`; the issuer URL is
    /// `http://127.0.0.1:port`.
    pub fn start(ns: &str, port: u16) -> Result<Self> {
        let rng = SystemRandom::new();
        let rsa = RsaKeyPair::from_der(include_bytes!("../fixtures/workload-issuer-rsa.der"))
            .map_err(|e| anyhow!("fixture RSA key: {e}"))?;
        let rogue = RsaKeyPair::from_der(include_bytes!("../fixtures/workload-rogue-rsa.der"))
            .map_err(|e| anyhow!("fixture rogue key: {e}"))?;
        let ec_pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| anyhow!("P-256 key: {e}"))?;
        let ec =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec_pkcs8.as_ref(), &rng)
                .map_err(|e| anyhow!("P-256 key: {e}"))?;
        let ed_pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow!("Ed25519 key: {e}"))?;
        let ed = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref())
            .map_err(|e| anyhow!("Ed25519 key: {e}"))?;
        let url = format!("http://127.0.0.1:{port}");
        let jwks = json!({"keys": [rsa_jwk(&rsa, "rsa-1"), ec_jwk(&ec), ed_jwk(&ed)]});
        let discovery = json!({
            "issuer": url,
            "jwks_uri": format!("{url}{JWKS_PATH}"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = serve(ns, port, discovery, jwks, stop.clone())?;
        Ok(Self {
            url,
            rsa: Arc::new(rsa),
            rogue: Arc::new(rogue),
            ec: Arc::new(ec),
            ed: Arc::new(ed),
            stop,
            thread: Some(thread),
        })
    }

    /// The issuer URL, as the `iss` claim and the coordinator's config name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A projected service-account token for `NAMESPACE/SERVICE_ACCOUNT`,
    /// for `audience`, valid from now for `lifetime`.
    pub fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        lifetime: Duration,
    ) -> String {
        let now = unix_now();
        self.token(
            &json!({
                "iss": self.url,
                "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
                "aud": [audience],
                "iat": now,
                "nbf": now,
                "exp": now + lifetime.as_secs(),
                "kubernetes.io": {
                    "namespace": namespace,
                    "serviceaccount": {"name": service_account, "uid": "5b2f0c1e-0000-4000-8000-000000000001"},
                    "pod": {"name": format!("{service_account}-7d9f8-abcde"), "uid": "5b2f0c1e-0000-4000-8000-000000000002"},
                },
            }),
            Signer::Rs256,
        )
    }

    /// `claims` signed (or forged) as `signer` says.
    pub fn token(&self, claims: &Value, signer: Signer) -> String {
        let (alg, kid) = match signer {
            Signer::Rs256 | Signer::BadSignature => ("RS256", "rsa-1"),
            Signer::Es256 => ("ES256", "ec-1"),
            Signer::EdDsa => ("EdDSA", "ed-1"),
            Signer::UnknownKid => ("RS256", "rotated-away"),
            Signer::AlgNone => ("none", "rsa-1"),
            Signer::HmacWithPublicKey => ("HS256", "rsa-1"),
        };
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let message = signed.as_bytes();
        let rng = SystemRandom::new();
        let signature = match signer {
            Signer::Rs256 | Signer::BadSignature => rsa_sign(&self.rsa, message),
            Signer::UnknownKid => rsa_sign(&self.rogue, message),
            Signer::Es256 => self
                .ec
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .unwrap_or_default(),
            Signer::EdDsa => self.ed.sign(message).as_ref().to_vec(),
            Signer::AlgNone => Vec::new(),
            Signer::HmacWithPublicKey => {
                let public = rsa_public_pem(&self.rsa);
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public.as_bytes());
                ring::hmac::sign(&key, message).as_ref().to_vec()
            }
        };
        let mut signature = signature;
        if signer == Signer::BadSignature {
            if let Some(last) = signature.last_mut() {
                *last ^= 0x01;
            }
        }
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

impl Drop for WorkloadIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn serve(
    ns: &str,
    port: u16,
    discovery: Value,
    jwks: Value,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let path = format!("/var/run/netns/{ns}");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let bound = (|| -> Result<TcpListener> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })();
        let listener = match bound {
            Ok(listener) => {
                let _ = ready_tx.send(Ok(()));
                listener
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = answer(stream, &discovery, &jwks);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the workload issuer did not start")??;
    Ok(thread)
}

/// Answers one HTTP request and closes the connection.
fn answer(stream: TcpStream, discovery: &Value, jwks: &Value) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/.well-known/openid-configuration" => ("200 OK", discovery.to_string()),
        JWKS_PATH => ("200 OK", jwks.to_string()),
        _ => ("404 Not Found", json!({"error": "not found"}).to_string()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn rsa_sign(key: &RsaKeyPair, message: &[u8]) -> Vec<u8> {
    let mut signature = vec![0; key.public().modulus_len()];
    match key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        message,
        &mut signature,
    ) {
        Ok(()) => signature,
        Err(_) => Vec::new(),
    }
}

fn rsa_jwk(key: &RsaKeyPair, kid: &str) -> Value {
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
    json!({
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
        "n": URL_SAFE_NO_PAD.encode(trim_zeros(&public.n)),
        "e": URL_SAFE_NO_PAD.encode(trim_zeros(&public.e)),
    })
}

fn ec_jwk(key: &EcdsaKeyPair) -> Value {
    // An uncompressed point: 0x04, then x and y.
    let point = key.public_key().as_ref();
    json!({
        "kty": "EC", "use": "sig", "alg": "ES256", "kid": "ec-1", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    })
}

fn ed_jwk(key: &Ed25519KeyPair) -> Value {
    json!({
        "kty": "OKP", "use": "sig", "alg": "EdDSA", "kid": "ed-1", "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref()),
    })
}

/// The public RSA key as PEM (SubjectPublicKeyInfo), the bytes an HMAC
/// confusion attack keys its MAC with.
fn rsa_public_pem(key: &RsaKeyPair) -> String {
    let public = base64::engine::general_purpose::STANDARD.encode(key.public().as_ref());
    format!("-----BEGIN RSA PUBLIC KEY-----\n{public}\n-----END RSA PUBLIC KEY-----\n")
}

fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
