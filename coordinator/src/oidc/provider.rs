//! The identity provider as discovered from its issuer URL: builds
//! authorization requests, runs the device authorization grant (RFC 8628),
//! and turns what the token endpoint returns into a verified ID token's
//! claims.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthenticationFlow, AuthorizationCode, ClientId, ClientSecret,
    CsrfToken, DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl,
    Nonce, PkceCodeChallenge, PkceCodeVerifier, ProviderMetadata, RedirectUrl, Scope,
    TokenResponse as _,
};

use crate::config::OidcSettings;
use crate::error_chain;

/// Tolerated difference between the coordinator's and the IdP's clocks.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Time allowed for any one request to the identity provider.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// A discovered identity provider.
#[derive(Debug, Clone)]
pub(crate) struct Provider {
    client: Client,
    /// Where device logins start; `None` when the provider lacks the device flow.
    device_endpoint: Option<DeviceAuthorizationUrl>,
}

/// A device login the identity provider accepted: what the person is shown,
/// and what polling for the token needs.
#[derive(Debug)]
pub(crate) struct DeviceLogin {
    pub(crate) details: CoreDeviceAuthorizationResponse,
    pub(crate) nonce: Nonce,
}

/// The discovery document's fields beyond the core ones that weft reads.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
struct ExtraMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}

impl AdditionalProviderMetadata for ExtraMetadata {}

type Metadata = ProviderMetadata<
    ExtraMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// What the callback must check, kept from the authorization request.
#[derive(Debug)]
pub(crate) struct Authorization {
    pub(crate) nonce: Nonce,
    pub(crate) pkce: PkceCodeVerifier,
}

/// A verified ID token's claims.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedClaims {
    pub(crate) email: Option<String>,
    pub(crate) email_verified: Option<bool>,
    /// The whole claim set, for the configurable groups claim.
    pub(crate) payload: serde_json::Value,
}

/// Why talking to the identity provider failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProviderError {
    #[error("the identity provider at {issuer} is unreachable or its discovery document is invalid: {reason}")]
    Discovery {
        issuer: String,
        reason: String,
        #[source]
        source: BoxError,
    },
    #[error("the identity provider refused the authorization code: {reason}")]
    Exchange {
        reason: String,
        #[source]
        source: BoxError,
    },
    #[error("the identity provider returned no ID token; check that the `openid` scope is allowed for this client")]
    NoIdToken,
    #[error("the ID token was refused: {reason}")]
    Token {
        reason: String,
        #[source]
        source: BoxError,
    },
    #[error("the identity provider does not offer the device-code login (its discovery document has no device_authorization_endpoint); run `weft up` without --device-code and open the printed link in a browser, or enable the device authorization grant for this client at the identity provider")]
    NoDeviceFlow,
    #[error("the identity provider refused to start a device-code login: {reason}")]
    DeviceAuthorization {
        reason: String,
        #[source]
        source: BoxError,
    },
    #[error("the device-code login did not complete: {reason}")]
    DevicePoll {
        reason: String,
        #[source]
        source: BoxError,
    },
}

/// The cause of a [`ProviderError`], kept for `source()`.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `error`'s whole chain as text (the variant's message) and `error` itself
/// (its cause).
fn cause(error: impl std::error::Error + Send + Sync + 'static) -> (String, BoxError) {
    (error_chain(&error), Box::new(error))
}

impl Provider {
    /// Reads the issuer's discovery document and signing keys.
    pub(crate) async fn discover(
        settings: &OidcSettings,
        redirect: &RedirectUrl,
        http: &reqwest::Client,
    ) -> Result<Self, ProviderError> {
        let fail = |(reason, source): (String, BoxError)| ProviderError::Discovery {
            issuer: settings.issuer.clone(),
            reason,
            source,
        };
        let issuer = IssuerUrl::new(settings.issuer.clone()).map_err(|e| fail(cause(e)))?;
        let metadata = Metadata::discover_async(issuer, http)
            .await
            .map_err(|e| fail(cause(e)))?;
        let device_endpoint = metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone();
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(settings.client_id.clone()),
            Some(ClientSecret::new(settings.client_secret.clone())),
        )
        .set_redirect_uri(redirect.clone());
        Ok(Self {
            client,
            device_endpoint,
        })
    }

    /// The URL that sends the browser to the identity provider, its `state`,
    /// and what the callback must check.
    pub(crate) fn authorize(&self, scopes: &[String]) -> (url::Url, String, Authorization) {
        let (challenge, pkce) = PkceCodeChallenge::new_random_sha256();
        let mut request = self.client.authorize_url(
            AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        // The client adds `openid` itself.
        for scope in scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        (url, state.secret().clone(), Authorization { nonce, pkce })
    }

    /// Exchanges `code` and verifies the ID token: signature against the
    /// issuer's keys, `iss`, `aud`, `exp` and `iat` (within [`CLOCK_SKEW`])
    /// and `nonce`.
    pub(crate) async fn redeem(
        &self,
        code: String,
        authorization: Authorization,
        http: &reqwest::Client,
        now: SystemTime,
    ) -> Result<VerifiedClaims, ProviderError> {
        let response = self
            .client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| {
                let (reason, source) = cause(e);
                ProviderError::Exchange { reason, source }
            })?
            .set_pkce_verifier(authorization.pkce)
            .request_async(http)
            .await
            .map_err(|e| {
                let (reason, source) = cause(e);
                ProviderError::Exchange { reason, source }
            })?;
        self.verify(&response, &authorization.nonce, true, now)
    }

    /// Starts a device login (RFC 8628) asking for `scopes`. A nonce goes
    /// along, for providers that put it into the ID token.
    pub(crate) async fn start_device_login(
        &self,
        scopes: &[String],
        http: &reqwest::Client,
    ) -> Result<DeviceLogin, ProviderError> {
        let endpoint = self
            .device_endpoint
            .clone()
            .ok_or(ProviderError::NoDeviceFlow)?;
        let client = self.client.clone().set_device_authorization_url(endpoint);
        let nonce = Nonce::new_random();
        let mut request = client
            .exchange_device_code()
            .add_scope(Scope::new("openid".into()))
            .add_extra_param("nonce", nonce.secret().clone());
        for scope in scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let details = request.request_async(http).await.map_err(|e| {
            let (reason, source) = cause(e);
            ProviderError::DeviceAuthorization { reason, source }
        })?;
        Ok(DeviceLogin { details, nonce })
    }

    /// Polls the token endpoint until the person confirmed the device login
    /// (waiting `interval` between polls and longer after `slow_down`), then
    /// verifies the ID token as [`Provider::redeem`] does. Gives up after
    /// `timeout` or when the code expires.
    pub(crate) async fn finish_device_login(
        &self,
        login: &DeviceLogin,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<VerifiedClaims, ProviderError> {
        let response = self
            .client
            .exchange_device_access_token(&login.details)
            .map_err(|e| {
                let (reason, source) = cause(e);
                ProviderError::DevicePoll { reason, source }
            })?
            .request_async(http, tokio::time::sleep, Some(timeout))
            .await
            .map_err(|e| {
                let (reason, source) = cause(e);
                ProviderError::DevicePoll { reason, source }
            })?;
        self.verify(&response, &login.nonce, false, SystemTime::now())
    }

    /// Verifies the ID token in `response`: signature against the issuer's
    /// keys, `iss`, `aud`, `exp` and `iat` (within [`CLOCK_SKEW`]) and the
    /// nonce. In the device flow (`nonce_required` false) the token comes
    /// straight from the token endpoint for this client's device code, so a
    /// provider that leaves the nonce out is accepted; one that includes it
    /// must include ours.
    fn verify(
        &self,
        response: &CoreTokenResponse,
        nonce: &Nonce,
        nonce_required: bool,
        now: SystemTime,
    ) -> Result<VerifiedClaims, ProviderError> {
        let token = response.id_token().ok_or(ProviderError::NoIdToken)?;
        let now_utc = chrono_utc(now);
        let lenient = now_utc - chrono_duration(CLOCK_SKEW);
        let latest_iat = now_utc + chrono_duration(CLOCK_SKEW);
        let verifier = self
            .client
            .id_token_verifier()
            .set_time_fn(move || lenient)
            .set_issue_time_verifier_fn(move |iat| {
                if iat > latest_iat {
                    Err(format!("the token was issued in the future ({iat})"))
                } else {
                    Ok(())
                }
            });
        let expected = nonce.secret().clone();
        let check_nonce = move |got: Option<&Nonce>| match got {
            Some(got)
                if subtle::ConstantTimeEq::ct_eq(got.secret().as_bytes(), expected.as_bytes())
                    .into() =>
            {
                Ok(())
            }
            Some(_) => Err("the nonce does not match this login's".to_owned()),
            None if nonce_required => Err("the nonce is missing".to_owned()),
            None => Ok(()),
        };
        let claims = token.claims(&verifier, check_nonce).map_err(|e| {
            let (reason, source) = cause(e);
            ProviderError::Token { reason, source }
        })?;
        // The signature over this exact text was just verified.
        let payload = token
            .to_string()
            .split('.')
            .nth(1)
            .and_then(|part| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(part)
                    .ok()
            })
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(serde_json::Value::Null);
        Ok(VerifiedClaims {
            email: claims.email().map(|e| e.as_str().to_owned()),
            email_verified: claims.email_verified(),
            payload,
        })
    }
}

fn chrono_utc(now: SystemTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::from(now)
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::zero())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::http::StatusCode;
    use serde_json::{json, Value};

    use super::super::test_issuer::{token_response, unix_now, Signer, TestIssuer, KID};
    use super::*;

    const NONCE: &str = "nonce-of-this-login";

    async fn discover(issuer: &TestIssuer) -> Provider {
        let redirect = RedirectUrl::new("http://127.0.0.1:1/oidc/callback".into()).unwrap();
        Provider::discover(&issuer.settings(), &redirect, &reqwest::Client::new())
            .await
            .unwrap()
    }

    /// Runs the browser flow's code exchange against a token with `claims`.
    async fn redeem(claims: &Value, signer: Signer, kid: &str) -> Result<VerifiedClaims, String> {
        let issuer = TestIssuer::start(false).await;
        let mut claims = claims.clone();
        if claims["iss"] == "ISSUER" {
            claims["iss"] = json!(issuer.url());
        }
        issuer.issue(&claims, signer, kid);
        let authorization = Authorization {
            nonce: Nonce::new(NONCE.into()),
            pkce: PkceCodeVerifier::new("v".repeat(43)),
        };
        discover(&issuer)
            .await
            .redeem(
                "code".into(),
                authorization,
                &reqwest::Client::new(),
                SystemTime::now(),
            )
            .await
            .map_err(|e| e.to_string())
    }

    fn valid() -> Value {
        let now = unix_now();
        json!({
            "iss": "ISSUER",
            "aud": "weft",
            "sub": "alice",
            "email": "alice@example.com",
            "email_verified": true,
            "iat": now,
            "exp": now + 600,
            "nonce": NONCE,
            "groups": ["eng"],
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut claims = valid();
        claims[field] = value;
        claims
    }

    #[tokio::test]
    async fn a_valid_token_is_accepted() {
        let verified = redeem(&valid(), Signer::Issuer, KID).await.unwrap();
        assert_eq!(verified.email.as_deref(), Some("alice@example.com"));
        assert_eq!(verified.payload["groups"], json!(["eng"]));
    }

    #[tokio::test]
    async fn a_token_for_another_client_is_refused() {
        let err = redeem(&with("aud", json!("other-client")), Signer::Issuer, KID)
            .await
            .unwrap_err();
        assert!(err.contains("the ID token was refused"), "{err}");
        assert!(err.contains("audience"), "{err}");
    }

    #[tokio::test]
    async fn an_expired_token_is_refused() {
        let long_ago = unix_now() - 3600;
        let mut claims = with("exp", json!(long_ago));
        claims["iat"] = json!(long_ago - 600);
        let err = redeem(&claims, Signer::Issuer, KID).await.unwrap_err();
        assert!(err.contains("the ID token was refused"), "{err}");
        assert!(err.to_lowercase().contains("expire"), "{err}");
    }

    #[tokio::test]
    async fn a_token_from_the_future_is_refused() {
        let claims = with("iat", json!(unix_now() + 3600));
        let err = redeem(&claims, Signer::Issuer, KID).await.unwrap_err();
        assert!(err.contains("issued in the future"), "{err}");
    }

    #[tokio::test]
    async fn a_token_signed_by_an_unknown_key_is_refused() {
        let err = redeem(&valid(), Signer::Rogue, "rogue-key")
            .await
            .unwrap_err();
        assert!(err.contains("the ID token was refused"), "{err}");
        assert!(err.to_lowercase().contains("signature"), "{err}");
        let err = redeem(&valid(), Signer::Rogue, KID).await.unwrap_err();
        assert!(
            err.to_lowercase().contains("signature"),
            "a forged signature under the issuer's kid: {err}"
        );
    }

    #[tokio::test]
    async fn a_wrong_or_missing_nonce_is_refused() {
        let err = redeem(&with("nonce", json!("replayed")), Signer::Issuer, KID)
            .await
            .unwrap_err();
        assert!(err.contains("nonce does not match"), "{err}");
        let mut claims = valid();
        claims.as_object_mut().unwrap().remove("nonce");
        let err = redeem(&claims, Signer::Issuer, KID).await.unwrap_err();
        assert!(err.contains("nonce is missing"), "{err}");
    }

    #[tokio::test]
    async fn a_token_from_another_issuer_is_refused() {
        let claims = with("iss", json!("https://evil.example.com"));
        let err = redeem(&claims, Signer::Issuer, KID).await.unwrap_err();
        assert!(err.contains("the ID token was refused"), "{err}");
        assert!(err.to_lowercase().contains("issuer"), "{err}");
    }

    #[tokio::test]
    async fn the_device_flow_polls_patiently_and_verifies_the_token() {
        let issuer = TestIssuer::start(true).await;
        let provider = discover(&issuer).await;
        let http = reqwest::Client::new();
        let login = provider
            .start_device_login(&["email".into()], &http)
            .await
            .unwrap();
        assert_eq!(login.details.user_code().secret(), "WDJB-MJHT");
        let claims = issuer.claims(login.nonce.secret());
        issuer.answer_tokens(vec![
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "authorization_pending"}),
            ),
            (StatusCode::BAD_REQUEST, json!({"error": "slow_down"})),
            (StatusCode::OK, token_response(&claims, Signer::Issuer, KID)),
        ]);
        let started = Instant::now();
        let verified = provider
            .finish_device_login(&login, &http, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(verified.email.as_deref(), Some("alice@example.com"));
        let calls = issuer.token_calls();
        assert_eq!(calls.len(), 3, "one poll per answer");
        assert!(calls[0] - started < Duration::from_millis(900));
        assert!(
            calls[1] - calls[0] >= Duration::from_secs(1),
            "polls wait the interval"
        );
        assert!(
            calls[2] - calls[1] >= Duration::from_secs(6),
            "slow_down adds five seconds to the interval"
        );
    }

    #[tokio::test]
    async fn the_device_flow_verifies_the_token_like_the_browser_flow() {
        let issuer = TestIssuer::start(true).await;
        let provider = discover(&issuer).await;
        let http = reqwest::Client::new();
        let login = provider.start_device_login(&[], &http).await.unwrap();
        let mut claims = issuer.claims(login.nonce.secret());
        claims["aud"] = json!("other-client");
        issuer.issue(&claims, Signer::Issuer, KID);
        let err = provider
            .finish_device_login(&login, &http, Duration::from_secs(30))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("audience"), "{err}");
        let claims = issuer.claims("another login's nonce");
        issuer.issue(&claims, Signer::Issuer, KID);
        let err = provider
            .finish_device_login(&login, &http, Duration::from_secs(30))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("nonce does not match"), "{err}");
    }

    #[tokio::test]
    async fn the_device_flow_ends_when_the_person_declines() {
        let issuer = TestIssuer::start(true).await;
        let provider = discover(&issuer).await;
        let http = reqwest::Client::new();
        let login = provider.start_device_login(&[], &http).await.unwrap();
        issuer.answer_tokens(vec![(
            StatusCode::BAD_REQUEST,
            json!({"error": "access_denied"}),
        )]);
        let err = provider
            .finish_device_login(&login, &http, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("access_denied"), "{err}");
    }

    #[tokio::test]
    async fn a_provider_without_the_device_flow_is_refused_clearly() {
        let issuer = TestIssuer::start(false).await;
        let err = discover(&issuer)
            .await
            .start_device_login(&[], &reqwest::Client::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::NoDeviceFlow));
        assert!(err.to_string().contains("without --device-code"), "{err}");
    }
}
