//! An OpenID provider on loopback for the relying party's unit tests: serves
//! discovery, its signing key and a token endpoint that answers with
//! whatever the test queued, so the coordinator's own discovery and
//! verification code runs against tokens the test signs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RsaPublicKeyComponents, RSA_PKCS1_SHA256};
use serde_json::{json, Value};

use crate::config::OidcSettings;

/// The client the test relying party is registered as.
pub(crate) const CLIENT_ID: &str = "weft";
/// The `kid` of the key the issuer publishes.
pub(crate) const KID: &str = "issuer-key";

const ISSUER_KEY: &[u8] = include_bytes!("testdata/issuer-key.der");
const ROGUE_KEY: &[u8] = include_bytes!("testdata/rogue-key.der");

/// Which key signs a token.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Signer {
    /// The issuer's published key.
    Issuer,
    /// A key the issuer never published.
    Rogue,
}

#[derive(Debug, Default)]
struct Shared {
    /// Answers of the token endpoint, in order; the last one repeats.
    token_answers: VecDeque<(StatusCode, Value)>,
    /// When the token endpoint was called.
    token_calls: Vec<Instant>,
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
    /// Starts an issuer on `127.0.0.1`; `device_flow` adds the device
    /// authorization endpoint to its discovery document.
    pub(crate) async fn start(device_flow: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut discovery = json!({
            "issuer": url,
            "authorization_endpoint": format!("{url}/auth"),
            "token_endpoint": format!("{url}/token"),
            "jwks_uri": format!("{url}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        });
        if device_flow {
            discovery["device_authorization_endpoint"] = json!(format!("{url}/device"));
        }
        let jwks = json!({"keys": [public_jwk(ISSUER_KEY, KID)]});
        let device = json!({
            "device_code": "device-code-1",
            "user_code": "WDJB-MJHT",
            "verification_uri": format!("{url}/device"),
            "expires_in": 60,
            "interval": 1,
        });
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || std::future::ready(Json(discovery.clone()))),
            )
            .route("/jwks", get(move || std::future::ready(Json(jwks.clone()))))
            .route(
                "/device",
                post(move || std::future::ready(Json(device.clone()))),
            )
            .route("/token", post(token))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            shared,
            server,
        }
    }

    /// The issuer URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Relying-party settings for this issuer.
    pub(crate) fn settings(&self) -> OidcSettings {
        OidcSettings {
            issuer: self.url.clone(),
            client_id: CLIENT_ID.into(),
            client_secret: "secret".into(),
            scopes: vec!["openid".into(), "email".into()],
            allowed_domains: vec![],
            allowed_users: vec![],
            allowed_groups: vec![],
            groups_claim: "groups".into(),
            key_expiry: Duration::from_secs(3600),
        }
    }

    /// Claims of a token this issuer would issue for `nonce`, valid now.
    pub(crate) fn claims(&self, nonce: &str) -> Value {
        let now = unix_now();
        json!({
            "iss": self.url,
            "aud": CLIENT_ID,
            "sub": "alice",
            "email": "alice@example.com",
            "email_verified": true,
            "iat": now,
            "exp": now + 600,
            "nonce": nonce,
        })
    }

    /// The token endpoint answers with these, in order; the last repeats.
    pub(crate) fn answer_tokens(&self, answers: Vec<(StatusCode, Value)>) {
        self.lock().token_answers = answers.into();
    }

    /// The token endpoint answers with an ID token with `claims`, signed by
    /// `signer` under `kid`.
    pub(crate) fn issue(&self, claims: &Value, signer: Signer, kid: &str) {
        self.answer_tokens(vec![(StatusCode::OK, token_response(claims, signer, kid))]);
    }

    /// When the token endpoint was called.
    pub(crate) fn token_calls(&self) -> Vec<Instant> {
        self.lock().token_calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A successful token response carrying an ID token.
pub(crate) fn token_response(claims: &Value, signer: Signer, kid: &str) -> Value {
    json!({
        "access_token": "access",
        "token_type": "Bearer",
        "expires_in": 60,
        "id_token": sign(claims, signer, kid),
    })
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn token(State(shared): State<Arc<Mutex<Shared>>>) -> (StatusCode, Json<Value>) {
    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
    shared.token_calls.push(Instant::now());
    let answer = if shared.token_answers.len() > 1 {
        shared.token_answers.pop_front()
    } else {
        shared.token_answers.front().cloned()
    };
    let (status, body) =
        answer.unwrap_or((StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"})));
    (status, Json(body))
}

fn sign(claims: &Value, signer: Signer, kid: &str) -> String {
    let key = RsaKeyPair::from_der(match signer {
        Signer::Issuer => ISSUER_KEY,
        Signer::Rogue => ROGUE_KEY,
    })
    .unwrap();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn public_jwk(der: &[u8], kid: &str) -> Value {
    let key = RsaKeyPair::from_der(der).unwrap();
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
    json!({
        "kty": "RSA",
        "use": "sig",
        "alg": "RS256",
        "kid": kid,
        "n": URL_SAFE_NO_PAD.encode(trim_zeros(&public.n)),
        "e": URL_SAFE_NO_PAD.encode(trim_zeros(&public.e)),
    })
}

fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
