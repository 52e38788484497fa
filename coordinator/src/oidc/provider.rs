//! The identity provider as discovered from its issuer URL: builds
//! authorization requests and turns an authorization code into a verified
//! ID token's claims.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use openidconnect::core::{CoreClient, CoreProviderMetadata, CoreResponseType};
use openidconnect::{
    AuthenticationFlow, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, TokenResponse as _,
};

use crate::config::OidcSettings;

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
}

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
    Discovery { issuer: String, reason: String },
    #[error("the identity provider refused the authorization code: {0}")]
    Exchange(String),
    #[error("the identity provider returned no ID token; check that the `openid` scope is allowed for this client")]
    NoIdToken,
    #[error("the ID token was refused: {0}")]
    Token(String),
}

impl Provider {
    /// Reads the issuer's discovery document and signing keys.
    pub(crate) async fn discover(
        settings: &OidcSettings,
        redirect: &RedirectUrl,
        http: &reqwest::Client,
    ) -> Result<Self, ProviderError> {
        let fail = |reason: String| ProviderError::Discovery {
            issuer: settings.issuer.clone(),
            reason,
        };
        let issuer = IssuerUrl::new(settings.issuer.clone()).map_err(|e| fail(e.to_string()))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, http)
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(settings.client_id.clone()),
            Some(ClientSecret::new(settings.client_secret.clone())),
        )
        .set_redirect_uri(redirect.clone());
        Ok(Self { client })
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
            .map_err(|e| ProviderError::Exchange(e.to_string()))?
            .set_pkce_verifier(authorization.pkce)
            .request_async(http)
            .await
            .map_err(|e| ProviderError::Exchange(error_chain(&e)))?;
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
        let claims = token
            .claims(&verifier, &authorization.nonce)
            .map_err(|e| ProviderError::Token(error_chain(&e)))?;
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

/// An error with its causes, which is where the useful detail sits.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
