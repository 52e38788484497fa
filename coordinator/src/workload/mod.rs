//! Workload identity: pods, VMs and CI jobs join with the short-lived JWT
//! their platform issues (a Kubernetes projected service-account token, a
//! GitHub Actions OIDC token, a cloud instance identity token), and become a
//! node named by a SPIFFE ID.
//!
//! [`Workloads::verify`] takes the token a node sent in
//! `Credential::IdentityToken` and either admits it as a [`WorkloadLogin`]
//! or refuses it with a [`TokenError`]:
//!
//! 1. tokens over 16 KiB are refused unread; the header is parsed without
//!    trusting it, and only RS256/384/512, ES256/384 and EdDSA pass
//!    (`alg: none` and HMAC are refused by name);
//! 2. the unverified `iss` picks the configured issuer;
//! 3. the signature is checked against that issuer's key for the `kid`,
//!    fetching the key set when the `kid` is unknown (at most once per 10 s);
//! 4. `iss`, `aud`, `exp`, `nbf`, `iat` (±5 min) and `max_token_age`;
//! 5. the issuer's `kind` maps the claims to a SPIFFE ID, or refuses.

mod error;
mod issuer;
mod keys;
pub(crate) mod mapping;
#[cfg(test)]
mod test_issuer;
mod verify;

use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use weft_proto::Identity;

pub(crate) use self::error::TokenError;
pub(crate) use self::issuer::KeySource;
use self::issuer::FETCH_TIMEOUT;
use self::keys::{KeyCache, KeySet, Lookup};
use self::verify::{check_claims, ClaimRules, Unverified};
use crate::config::WorkloadIssuer;

/// A workload the token vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkloadLogin {
    /// Its SPIFFE ID and the issuer's tags.
    pub(crate) identity: Identity,
    /// When its node key stops admitting it (Unix seconds): the token's
    /// expiry or the issuer's `key_expiry` from now, whichever is first.
    pub(crate) key_expiry: u64,
    /// Whether its node is deleted once offline for the ephemeral timeout.
    pub(crate) ephemeral: bool,
}

/// The trusted workload issuers and their cached keys.
#[derive(Debug)]
pub(crate) struct Workloads {
    issuers: Vec<Issuer>,
    http: reqwest::Client,
}

#[derive(Debug)]
struct Issuer {
    settings: WorkloadIssuer,
    cache: Mutex<KeyCache>,
    /// One fetch per issuer at a time; others wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

impl Workloads {
    /// Trusts `issuers`.
    pub(crate) fn new(issuers: Vec<WorkloadIssuer>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            // A redirect could send the coordinator anywhere; key sets are fetched where configured.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .build()?;
        let issuers = issuers
            .into_iter()
            .map(|settings| Issuer {
                settings,
                cache: Mutex::new(KeyCache::default()),
                fetching: tokio::sync::Mutex::new(()),
            })
            .collect();
        Ok(Self { issuers, http })
    }

    /// Fetches every issuer's keys once, so the first registrations need not
    /// wait. Failures are logged; registrations retry the fetch.
    pub(crate) async fn prefetch(&self) {
        for issuer in &self.issuers {
            if let Err(e) = self.keys(issuer, None).await {
                tracing::warn!("{e}");
            }
        }
    }

    /// Verifies `token` at `now` and maps it to the workload's identity.
    pub(crate) async fn verify(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<WorkloadLogin, TokenError> {
        let token = verify::parse(token)?;
        let claimed = token.claimed_issuer().ok_or(TokenError::NoIssuer)?;
        let Some(issuer) = self.issuers.iter().find(|i| i.settings.issuer == claimed) else {
            return Err(TokenError::UntrustedIssuer(
                claimed.chars().take(200).collect(),
            ));
        };
        let keys = self.keys(issuer, token.kid.as_deref()).await?;
        check_signature(&token, &keys, &issuer.settings.issuer)?;
        let settings = &issuer.settings;
        let rules = ClaimRules {
            issuer: &settings.issuer,
            audience: &settings.audience,
            max_token_age: settings.max_token_age,
        };
        let exp = check_claims(&token.claims, rules, now)?;
        let workload = settings
            .mapping
            .spiffe_id(&token.claims, &settings.trust_domain)?;
        let limit = verify::unix(now)
            .saturating_add(i64::try_from(settings.key_expiry.as_secs()).unwrap_or(i64::MAX));
        Ok(WorkloadLogin {
            identity: Identity {
                workload: Some(workload),
                tags: settings.tags.clone(),
                user: None,
                groups: Vec::new(),
            },
            key_expiry: u64::try_from(exp.min(limit)).unwrap_or(0),
            ephemeral: settings.ephemeral,
        })
    }

    /// The issuer's keys for `kid`, fetched when the cache says so.
    async fn keys(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
    ) -> Result<std::sync::Arc<KeySet>, TokenError> {
        let unavailable = |reason: String| TokenError::Unavailable {
            issuer: issuer.settings.issuer.clone(),
            reason,
        };
        if let Some(done) = answered(issuer.lookup(kid)) {
            return done.map_err(unavailable);
        }
        let _fetching = issuer.fetching.lock().await;
        // Another registration may have fetched while this one waited.
        if let Some(done) = answered(issuer.lookup(kid)) {
            return done.map_err(unavailable);
        }
        let settings = &issuer.settings;
        let fetched = issuer::fetch(
            &settings.keys,
            &settings.issuer,
            settings.allow_insecure,
            &self.http,
        )
        .await;
        match &fetched {
            Ok(_) => {
                tracing::info!(issuer = %settings.issuer, "fetched the workload issuer's keys")
            }
            Err(e) => {
                crate::metrics::idp_fetch_failed(crate::metrics::IdpFetch::WorkloadJwks);
                tracing::warn!(issuer = %settings.issuer, "cannot fetch the workload issuer's keys: {e}")
            }
        }
        let mut cache = issuer.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.fetched(fetched, Instant::now());
        match cache.lookup(kid, Instant::now()) {
            Lookup::Keys(keys) => Ok(keys),
            Lookup::Unavailable(reason) => Err(unavailable(reason)),
            Lookup::Fetch => Err(unavailable("the key set was not fetched".into())),
        }
    }
}

impl Issuer {
    fn lookup(&self, kid: Option<&str>) -> Lookup {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup(kid, Instant::now())
    }
}

/// The lookup's answer, or `None` when the keys must be fetched.
fn answered(lookup: Lookup) -> Option<Result<std::sync::Arc<KeySet>, String>> {
    match lookup {
        Lookup::Keys(keys) => Some(Ok(keys)),
        Lookup::Unavailable(reason) => Some(Err(reason)),
        Lookup::Fetch => None,
    }
}

/// Verifies the signature with the key the token names, or with any of the
/// issuer's keys for its algorithm when it names none.
fn check_signature(token: &Unverified, keys: &KeySet, issuer: &str) -> Result<(), TokenError> {
    let mut candidates = keys.candidates(token.kid.as_deref()).peekable();
    if candidates.peek().is_none() {
        return Err(match &token.kid {
            Some(kid) => TokenError::UnknownKid(kid.clone()),
            None => TokenError::NoKey(token.alg.name().into()),
        });
    }
    let mut tried = false;
    for key in candidates {
        if token.kid.is_none() && !key.fits(token.alg) {
            continue;
        }
        tried = true;
        if token.verify_with(key)? {
            return Ok(());
        }
    }
    if !tried {
        return Err(TokenError::NoKey(token.alg.name().into()));
    }
    Err(TokenError::BadSignature(issuer.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use weft_proto::RefusalCode;

    use super::test_issuer::{assemble, jwks, unix_now, TestIssuer, TestKey};
    use super::*;
    use crate::config::{WorkloadIssuerConfig, WorkloadKind};

    fn entry(issuer: &str, kind: WorkloadKind) -> WorkloadIssuerConfig {
        WorkloadIssuerConfig {
            issuer: issuer.into(),
            jwks_file: None,
            jwks_url: None,
            audience: "weft".into(),
            kind,
            trust_domain: "cluster.local".into(),
            max_token_age: Some("1h".into()),
            key_expiry: Some("1h".into()),
            tags: vec!["tag:k8s".into()],
            ephemeral: true,
            allow_insecure_issuer: false,
            identity: None,
        }
    }

    fn trusting(entries: &[WorkloadIssuerConfig]) -> Workloads {
        Workloads::new(entries.iter().map(|e| e.resolve().unwrap()).collect()).unwrap()
    }

    /// Claims of a valid projected service-account token from `issuer`.
    fn sa_claims(issuer: &str) -> serde_json::Value {
        let now = unix_now();
        json!({
            "iss": issuer,
            "aud": ["weft"],
            "sub": "system:serviceaccount:payments:api",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api"}},
        })
    }

    /// An issuer serving `keys` and a coordinator trusting it by discovery.
    async fn cluster(keys: &[&TestKey]) -> (TestIssuer, Workloads) {
        let issuer = TestIssuer::start(keys).await;
        let workloads = trusting(&[entry(issuer.url(), WorkloadKind::Kubernetes)]);
        (issuer, workloads)
    }

    async fn refusal(workloads: &Workloads, token: &str) -> (RefusalCode, String) {
        let err = workloads
            .verify(token, SystemTime::now())
            .await
            .unwrap_err();
        let refusal = err.refusal();
        assert!(
            !refusal.message.contains(token),
            "the token is never echoed"
        );
        (refusal.code, refusal.message)
    }

    #[tokio::test]
    async fn service_account_tokens_join_with_every_algorithm() {
        let keys = [
            TestKey::rsa("rs256", "RS256"),
            TestKey::rsa("rs384", "RS384"),
            TestKey::rsa("rs512", "RS512"),
            TestKey::es256("es256"),
            TestKey::es384("es384"),
            TestKey::ed25519("ed"),
        ];
        let refs: Vec<&TestKey> = keys.iter().collect();
        let (issuer, workloads) = cluster(&refs).await;
        for key in &keys {
            let login = workloads
                .verify(&key.sign(&sa_claims(issuer.url())), SystemTime::now())
                .await
                .unwrap_or_else(|e| panic!("{key:?}: {e}"));
            assert_eq!(
                login.identity.workload.as_deref(),
                Some("spiffe://cluster.local/ns/payments/sa/api")
            );
            assert_eq!(login.identity.tags, ["tag:k8s"]);
            assert!(login.identity.user.is_none() && login.identity.groups.is_empty());
            assert!(login.ephemeral);
        }
        assert_eq!(issuer.jwks_fetches(), 1, "the key set is cached");
    }

    #[tokio::test]
    async fn the_key_expiry_is_bounded_by_the_token_and_the_issuer() {
        let key = TestKey::es256("k");
        let (issuer, workloads) = cluster(&[&key]).await;
        let now = SystemTime::now();
        let mut claims = sa_claims(issuer.url());
        let login = workloads.verify(&key.sign(&claims), now).await.unwrap();
        let now_secs = u64::try_from(verify::unix(now)).unwrap();
        assert_eq!(login.key_expiry, now_secs + 3600);
        claims["exp"] = json!(unix_now() + 600);
        let login = workloads.verify(&key.sign(&claims), now).await.unwrap();
        assert_eq!(
            login.key_expiry,
            u64::try_from(claims["exp"].as_i64().unwrap()).unwrap()
        );
    }

    #[tokio::test]
    async fn every_bad_claim_is_refused_with_its_check() {
        let key = TestKey::rsa("k", "RS256");
        let (issuer, workloads) = cluster(&[&key]).await;
        let now = unix_now();
        let cases: [(&str, serde_json::Value, &str); 8] = [
            (
                "aud",
                json!(["api"]),
                "request a token with audience \"weft\"",
            ),
            ("exp", json!(now - 600), "expired"),
            ("nbf", json!(now + 900), "not valid before"),
            ("iat", json!(now + 900), "in the future"),
            ("iat", json!(now - 7200), "max_token_age"),
            (
                "sub",
                json!("system:node:worker-1"),
                "not a Kubernetes service account",
            ),
            (
                "sub",
                json!("system:serviceaccount:pay/ments:api"),
                "cannot be part of a SPIFFE ID",
            ),
            (
                "sub",
                json!("system:serviceaccount:..:api"),
                "cannot be part of a SPIFFE ID",
            ),
        ];
        for (claim, value, expected) in cases {
            let mut claims = sa_claims(issuer.url());
            claims[claim] = value;
            let (code, message) = refusal(&workloads, &key.sign(&claims)).await;
            assert_eq!(code, RefusalCode::TokenInvalid, "{claim}: {message}");
            assert!(message.contains(expected), "{claim}: {message}");
        }
        let mut claims = sa_claims(issuer.url());
        claims.as_object_mut().unwrap().remove("iat");
        let (_, message) = refusal(&workloads, &key.sign(&claims)).await;
        assert!(message.contains("`iat`"), "{message}");
    }

    #[tokio::test]
    async fn forged_and_unsigned_tokens_are_refused() {
        let key = TestKey::rsa("k", "RS256");
        let (issuer, workloads) = cluster(&[&key]).await;
        let claims = sa_claims(issuer.url());

        let rogue = TestKey::rogue("k");
        let (code, message) = refusal(&workloads, &rogue.sign(&claims)).await;
        assert_eq!(code, RefusalCode::TokenInvalid);
        assert!(message.contains("signature does not verify"), "{message}");

        let genuine = key.sign(&claims);
        let mut tampered_claims = claims.clone();
        tampered_claims["sub"] = json!("system:serviceaccount:kube-system:admin");
        let (header, _) = genuine.split_once('.').unwrap();
        let signature = genuine.rsplit_once('.').unwrap().1;
        let body = assemble(&json!({}), &tampered_claims, b"");
        let payload = body.split('.').nth(1).unwrap();
        let tampered = format!("{header}.{payload}.{signature}");
        let (_, message) = refusal(&workloads, &tampered).await;
        assert!(message.contains("signature does not verify"), "{message}");

        let none = assemble(&json!({"alg": "none", "typ": "JWT"}), &claims, b"");
        let (code, message) = refusal(&workloads, &none).await;
        assert_eq!(code, RefusalCode::TokenInvalid);
        assert!(message.contains("unsigned (alg \"none\")"), "{message}");

        let header = json!({"alg": "HS256", "typ": "JWT", "kid": "k"});
        let signed = assemble(&header, &claims, b"");
        let signed = signed.trim_end_matches('.');
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.public_bytes()),
            signed.as_bytes(),
        );
        let hmac = format!(
            "{signed}.{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, mac)
        );
        let (code, message) = refusal(&workloads, &hmac).await;
        assert_eq!(code, RefusalCode::TokenInvalid);
        assert!(
            message.contains("HS256, a shared-secret algorithm"),
            "{message}"
        );

        let mismatched = key.sign_with_header(&json!({"alg": "ES256", "kid": "k"}), &claims);
        let (_, message) = refusal(&workloads, &mismatched).await;
        assert!(
            message.contains("cannot make ES256 signatures"),
            "{message}"
        );

        let huge = "a".repeat(16 * 1024 + 1);
        let (_, message) = refusal(&workloads, &huge).await;
        assert!(
            message.contains("more than the 16384 accepted"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn unknown_issuers_are_named_without_listing_the_trusted_ones() {
        let key = TestKey::es256("k");
        let (issuer, workloads) = cluster(&[&key]).await;
        let mut claims = sa_claims(issuer.url());
        claims["iss"] = json!("https://evil.example.com");
        let (code, message) = refusal(&workloads, &key.sign(&claims)).await;
        assert_eq!(code, RefusalCode::TokenInvalid);
        assert_eq!(
            message,
            "issuer https://evil.example.com is not trusted by this coordinator; add a [[workload_issuers]] entry"
        );
        assert!(!message.contains(issuer.url()));
    }

    #[tokio::test]
    async fn an_unknown_kid_refetches_once_and_finds_a_rotated_key() {
        let old = TestKey::es256("old");
        let (issuer, workloads) = cluster(&[&old]).await;
        let claims = sa_claims(issuer.url());
        workloads
            .verify(&old.sign(&claims), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(issuer.jwks_fetches(), 1);

        // The issuer rotates; more than ten seconds later a token under the new kid arrives.
        let new = TestKey::ed25519("new");
        issuer.publish(&[&old, &new]);
        let issuer_state = &workloads.issuers[0];
        {
            let mut cache = issuer_state.cache.lock().unwrap();
            let keys = KeySet::parse(jwks(&[&old]).to_string().as_bytes()).unwrap();
            cache.fetched(Ok(keys), Instant::now() - Duration::from_secs(11));
        }
        workloads
            .verify(&new.sign(&claims), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(issuer.jwks_fetches(), 2);

        // A kid nobody publishes: one refetch at most per ten seconds.
        let stranger = TestKey::es256("stranger");
        for _ in 0..3 {
            let (code, message) = refusal(&workloads, &stranger.sign(&claims)).await;
            assert_eq!(code, RefusalCode::TokenInvalid);
            assert_eq!(
                message,
                "signing key stranger is not in the issuer's key set; the issuer must publish it (jwks_url, discovery or jwks_file)"
            );
        }
        assert_eq!(
            issuer.jwks_fetches(),
            2,
            "fetched within the last ten seconds"
        );
    }

    #[tokio::test]
    async fn keys_come_from_a_jwks_file_or_url_too() {
        let key = TestKey::ed25519("file-key");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, jwks(&[&key]).to_string()).unwrap();
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let mut from_file = entry(issuer, WorkloadKind::Kubernetes);
        from_file.jwks_file = Some(file.clone());
        let workloads = trusting(&[from_file]);
        let login = workloads
            .verify(&key.sign(&sa_claims(issuer)), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(
            login.identity.workload.as_deref(),
            Some("spiffe://cluster.local/ns/payments/sa/api")
        );

        let served = TestIssuer::start(&[&key]).await;
        let mut from_url = entry(
            "https://token.actions.githubusercontent.com",
            WorkloadKind::GithubActions,
        );
        from_url.jwks_url = Some(format!("{}/openid/v1/jwks", served.url()));
        from_url.trust_domain = "ci.example".into();
        let workloads = trusting(&[from_url]);
        let now = unix_now();
        let claims = json!({
            "iss": "https://token.actions.githubusercontent.com",
            "aud": "weft", "iat": now, "exp": now + 300,
            "repository": "acme/shop",
            "job_workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
        });
        let login = workloads
            .verify(&key.sign(&claims), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(
            login.identity.workload.as_deref(),
            Some("spiffe://ci.example/github/acme/shop/workflow/deploy.yml/ref/refs/heads/main")
        );
    }

    #[tokio::test]
    async fn generic_issuers_map_nested_claims() {
        let key = TestKey::rsa("gce", "RS256");
        let issuer = TestIssuer::start(&[&key]).await;
        let mut generic = entry(issuer.url(), WorkloadKind::Generic);
        generic.trust_domain = "gcp.example".into();
        generic.identity = Some(
            "spiffe://{trust_domain}/vm/{google.compute_engine.project_id}/{google.compute_engine.instance_name}".into(),
        );
        generic.ephemeral = false;
        let workloads = trusting(&[generic]);
        let now = unix_now();
        let mut claims = json!({
            "iss": issuer.url(), "aud": "weft", "iat": now, "exp": now + 300,
            "google": {"compute_engine": {"project_id": "shop-prod", "instance_name": "db-1"}},
        });
        let login = workloads
            .verify(&key.sign(&claims), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(
            login.identity.workload.as_deref(),
            Some("spiffe://gcp.example/vm/shop-prod/db-1")
        );
        assert!(!login.ephemeral);
        claims["google"]["compute_engine"]["instance_name"] = json!("../../admin");
        let (code, message) = refusal(&workloads, &key.sign(&claims)).await;
        assert_eq!(code, RefusalCode::TokenInvalid);
        assert!(
            message.contains("refused rather than rewritten"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_issuer_is_worth_retrying() {
        let key = TestKey::es256("k");
        let issuer = TestIssuer::start(&[&key]).await;
        let url = issuer.url().to_owned();
        drop(issuer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let workloads = trusting(&[entry(&url, WorkloadKind::Kubernetes)]);
        let (code, message) = refusal(&workloads, &key.sign(&sa_claims(&url))).await;
        assert_eq!(code, RefusalCode::IdentityProviderUnavailable, "{message}");
        assert!(message.contains("retry later"), "{message}");
    }
}
