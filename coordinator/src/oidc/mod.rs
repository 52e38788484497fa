//! The OpenID Connect relying party: people log their devices in with the
//! organisation's identity provider.
//!
//! A node's session asks [`Logins::start`] for a login and gets a link to
//! `PUBLIC_URL/login/ID` and a [`Waiting`] handle. The browser that opens the
//! link ([`Logins::open_link`]) is sent to the identity provider with a fresh
//! `state`, `nonce` and PKCE challenge and given a cookie; the provider sends
//! it back to `PUBLIC_URL/oidc/callback` ([`Logins::callback`]), where the
//! code is exchanged, the ID token verified and the person checked against
//! the allow-lists. The result goes to the waiting session only.
//!
//! With [`LoginFlow::DeviceCode`] (RFC 8628) the session's prompt is instead
//! the provider's verification URL and a user code, and the coordinator
//! polls the provider's token endpoint until the person entered the code;
//! the ID token is verified and the person admitted as in the browser flow.
//!
//! The provider is discovered in the background with backoff, so the
//! coordinator starts and serves existing nodes while it is unreachable;
//! logins meanwhile fail with a refusal that says so.
//!
//! Anyone who completes the control handshake can start a login, so the
//! logins waiting at once are capped; one beyond the cap is refused before
//! the provider is asked anything.

mod claims;
mod pending;
mod provider;
#[cfg(test)]
mod test_issuer;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use openidconnect::RedirectUrl;
use rand::RngCore as _;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use weft_proto::{LoginFlow, LoginPrompt, Refusal, RefusalCode};

use self::claims::AdmissionError;
pub(crate) use self::claims::LoginIdentity;
pub(crate) use self::pending::LOGIN_TTL;
use self::pending::{PendingError, PendingLogins};
use self::provider::{Authorization, DeviceLogin, Provider, ProviderError, REQUEST_TIMEOUT};
use crate::config::OidcSettings;
use crate::limits::Report;
use crate::metrics::{self, IdpFetch};
use crate::server::StartError;

/// The name of the cookie that binds a login to the browser that opened its link.
pub(crate) const BROWSER_COOKIE: &str = "weft_login";
/// The callback path under the public URL.
pub(crate) const CALLBACK_PATH: &str = "/oidc/callback";
/// A discovered provider older than this is discovered again at the next
/// login, so rotated signing keys are picked up.
const REDISCOVER_AFTER: Duration = Duration::from_secs(5 * 60);
const DISCOVERY_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const DISCOVERY_BACKOFF_MAX: Duration = Duration::from_secs(60);

type Reply = oneshot::Sender<Result<LoginIdentity, Refusal>>;

/// The relying party, shared by the control sessions and the HTTP server.
pub(crate) struct Logins {
    settings: OidcSettings,
    public_url: String,
    redirect: RedirectUrl,
    http: reqwest::Client,
    provider: Mutex<Option<(Arc<Provider>, Instant)>>,
    pending: Mutex<PendingLogins<Reply, Authorization>>,
    /// One permit per login that may wait at once.
    waiting: Arc<Semaphore>,
    max_waiting: usize,
    refusals: Mutex<Report>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("issuer", &self.settings.issuer)
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

/// A session's login in progress; dropping it abandons the login.
#[derive(Debug)]
pub(crate) struct Waiting {
    id: String,
    logins: Arc<Logins>,
    /// The task polling the provider in a device login.
    poll: Option<tokio::task::AbortHandle>,
    /// Receives the person once they logged in, or why they could not.
    pub(crate) result: oneshot::Receiver<Result<LoginIdentity, Refusal>>,
    /// This login's place under the cap, freed when it ends.
    _slot: OwnedSemaphorePermit,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.logins.pending().cancel(&self.id);
        if let Some(poll) = &self.poll {
            poll.abort();
        }
    }
}

/// Why a login step failed, for the person at the browser.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    #[error("{0}")]
    Link(#[from] PendingError),
    #[error(transparent)]
    Unavailable(ProviderError),
    #[error("login refused: {0}")]
    Refused(String),
    /// The identity provider refused the code, the ID token or the device
    /// login.
    #[error("login refused: {0}")]
    ProviderRefused(#[source] ProviderError),
    /// The person the verified token names is not admitted.
    #[error("login refused: {0}")]
    NotAdmitted(#[source] AdmissionError),
    #[error("the device stopped waiting for this login; run `weft login` again")]
    DeviceGone,
    #[error("the callback is missing its `{0}` parameter; open the login link again")]
    MissingParameter(&'static str),
}

/// The query of the identity provider's redirect back.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct CallbackParams {
    pub(crate) code: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) error_description: Option<String>,
    pub(crate) iss: Option<String>,
}

/// A browser that opened a login link: where to send it, and its cookie.
#[derive(Debug)]
pub(crate) struct Redirect {
    pub(crate) location: url::Url,
    pub(crate) cookie: String,
}

impl Logins {
    /// A relying party for `settings`, reachable by browsers at `public_url`,
    /// with at most `max_waiting` logins waiting at once.
    pub(crate) fn new(
        settings: OidcSettings,
        public_url: &str,
        max_waiting: usize,
    ) -> Result<Arc<Self>, StartError> {
        let redirect =
            RedirectUrl::new(format!("{public_url}{CALLBACK_PATH}")).map_err(|source| {
                StartError::CallbackUrl {
                    public_url: public_url.to_owned(),
                    source,
                }
            })?;
        let http = reqwest::Client::builder()
            // Following redirects would let the IdP's endpoints bounce requests elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|source| StartError::HttpClient {
                what: "the identity provider",
                source,
            })?;
        Ok(Arc::new(Self {
            settings,
            public_url: public_url.to_owned(),
            redirect,
            http,
            provider: Mutex::new(None),
            pending: Mutex::new(PendingLogins::default()),
            waiting: Arc::new(Semaphore::new(max_waiting)),
            max_waiting,
            refusals: Mutex::new(Report::default()),
        }))
    }

    /// How long a login admits a device.
    pub(crate) fn key_expiry(&self) -> Duration {
        self.settings.key_expiry
    }

    /// Discovers the provider in the background, retrying with backoff until
    /// it answers. Never blocks start-up.
    pub(crate) async fn discover_in_background(self: Arc<Self>) {
        let mut delay = DISCOVERY_BACKOFF_FIRST;
        loop {
            match self.discover().await {
                Ok(_) => {
                    tracing::info!(issuer = %self.settings.issuer, "identity provider discovered");
                    return;
                }
                Err(e) => {
                    tracing::warn!("{e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(DISCOVERY_BACKOFF_MAX);
                }
            }
        }
    }

    /// Starts a login for a node's session.
    pub(crate) async fn start(
        self: &Arc<Self>,
        flow: LoginFlow,
    ) -> Result<(LoginPrompt, Waiting), Refusal> {
        let slot = self.reserve()?;
        // Asked afresh at every login, so an outage is reported at once
        // instead of after the person opened the link.
        let provider = self.discover().await.map_err(|e| Refusal {
            code: RefusalCode::IdentityProviderUnavailable,
            message: format!("{e}; logins work again once it is reachable, retry later"),
        })?;
        if flow == LoginFlow::DeviceCode {
            return self.start_device(provider, slot).await;
        }
        let id = random_token();
        let (reply, result) = oneshot::channel();
        self.pending().insert(id.clone(), reply, Instant::now());
        let prompt = LoginPrompt {
            url: format!("{}/login/{id}", self.public_url),
            user_code: None,
            expires_in_secs: LOGIN_TTL.as_secs(),
        };
        let waiting = Waiting {
            id,
            logins: Arc::clone(self),
            poll: None,
            result,
            _slot: slot,
        };
        Ok((prompt, waiting))
    }

    /// A place for one more waiting login, or the refusal saying there is none.
    fn reserve(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        Arc::clone(&self.waiting).try_acquire_owned().map_err(|_| {
            let hit = self
                .refusals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .hit(tokio::time::Instant::now());
            if let Some((refused, since_start)) = hit {
                tracing::warn!(
                    refused,
                    refused_since_start = since_start,
                    "refusing interactive logins: {} are waiting to be finished, the most allowed (--max-pending-logins)",
                    self.max_waiting
                );
            }
            Refusal {
                code: RefusalCode::Unavailable,
                message: format!(
                    "the coordinator has {} logins waiting to be finished, the most it allows at once; retry in a few minutes",
                    self.max_waiting
                ),
            }
        })
    }

    /// Starts a device login and polls for its outcome in the background.
    async fn start_device(
        self: &Arc<Self>,
        provider: Arc<Provider>,
        slot: OwnedSemaphorePermit,
    ) -> Result<(LoginPrompt, Waiting), Refusal> {
        let login = provider
            .start_device_login(&self.settings.scopes, &self.http)
            .await
            .map_err(|e| Refusal {
                code: match e {
                    ProviderError::DeviceAuthorization { .. } => {
                        RefusalCode::IdentityProviderUnavailable
                    }
                    _ => RefusalCode::LoginFailed,
                },
                message: e.to_string(),
            })?;
        let expires_in = login.details.expires_in().min(LOGIN_TTL);
        let prompt = LoginPrompt {
            url: login.details.verification_uri().to_string(),
            user_code: Some(login.details.user_code().secret().clone()),
            expires_in_secs: expires_in.as_secs(),
        };
        let (reply, result) = oneshot::channel();
        let logins = Arc::clone(self);
        let poll = tokio::spawn(async move {
            let outcome = logins.poll_device(&provider, &login, expires_in).await;
            log_outcome(&outcome);
            let _ = reply.send(outcome.map_err(|e| Refusal {
                code: RefusalCode::LoginFailed,
                message: e.to_string(),
            }));
        });
        tracing::info!("device login started");
        let waiting = Waiting {
            id: String::new(),
            logins: Arc::clone(self),
            poll: Some(poll.abort_handle()),
            result,
            _slot: slot,
        };
        Ok((prompt, waiting))
    }

    async fn poll_device(
        &self,
        provider: &Provider,
        login: &DeviceLogin,
        timeout: Duration,
    ) -> Result<LoginIdentity, LoginError> {
        let verified = provider
            .finish_device_login(login, &self.http, timeout)
            .await
            .map_err(LoginError::ProviderRefused)?;
        claims::admit(
            &self.settings,
            verified.email.as_deref(),
            verified.email_verified,
            &verified.payload,
        )
        .map_err(LoginError::NotAdmitted)
    }

    /// A browser opened login link `id`.
    pub(crate) async fn open_link(&self, id: &str) -> Result<Redirect, LoginError> {
        let provider = self
            .current_provider()
            .await
            .map_err(LoginError::Unavailable)?;
        let (location, state, authorization) = provider.authorize(&self.settings.scopes);
        let cookie = random_token();
        self.pending()
            .begin(id, state, &cookie, authorization, Instant::now())?;
        Ok(Redirect { location, cookie })
    }

    /// The identity provider sent the browser back. On success the waiting
    /// session gets the person and the browser is told who logged in.
    pub(crate) async fn callback(
        &self,
        params: CallbackParams,
        browser_cookie: Option<&str>,
    ) -> Result<LoginIdentity, LoginError> {
        let state = params
            .state
            .as_deref()
            .ok_or(LoginError::MissingParameter("state"))?;
        let (reply, authorization) =
            self.pending()
                .finish(state, browser_cookie, Instant::now())?;
        let outcome = self.redeem(params, authorization).await;
        let for_device = outcome.as_ref().map(Clone::clone).map_err(|e| Refusal {
            code: RefusalCode::LoginFailed,
            message: e.to_string(),
        });
        log_outcome(&outcome);
        if reply.send(for_device).is_err() && outcome.is_ok() {
            return Err(LoginError::DeviceGone);
        }
        outcome
    }

    async fn redeem(
        &self,
        params: CallbackParams,
        authorization: Authorization,
    ) -> Result<LoginIdentity, LoginError> {
        if let Some(error) = params.error {
            let detail = params
                .error_description
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            return Err(LoginError::Refused(format!(
                "the identity provider answered `{error}`{detail}"
            )));
        }
        if let Some(iss) = &params.iss {
            if iss.trim_end_matches('/') != self.settings.issuer {
                return Err(LoginError::Refused(format!(
                    "the response came from issuer {iss}, not the configured {}",
                    self.settings.issuer
                )));
            }
        }
        let code = params.code.ok_or(LoginError::MissingParameter("code"))?;
        let provider = self
            .current_provider()
            .await
            .map_err(LoginError::Unavailable)?;
        let verified = provider
            .redeem(code, authorization, &self.http, SystemTime::now())
            .await
            .map_err(|e| match e {
                ProviderError::Discovery { .. } => LoginError::Unavailable(e),
                other => LoginError::ProviderRefused(other),
            })?;
        claims::admit(
            &self.settings,
            verified.email.as_deref(),
            verified.email_verified,
            &verified.payload,
        )
        .map_err(LoginError::NotAdmitted)
    }

    /// The provider, discovered now if it never was or is due for a refresh.
    /// A refresh that fails falls back to what was discovered before.
    async fn current_provider(&self) -> Result<Arc<Provider>, ProviderError> {
        let cached = self
            .provider
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match cached {
            Some((provider, at)) if at.elapsed() < REDISCOVER_AFTER => Ok(provider),
            Some((provider, _)) => match self.discover().await {
                Ok(fresh) => Ok(fresh),
                Err(e) => {
                    tracing::warn!("{e}; keeping the keys discovered earlier");
                    Ok(provider)
                }
            },
            None => self.discover().await,
        }
    }

    async fn discover(&self) -> Result<Arc<Provider>, ProviderError> {
        let provider = Provider::discover(&self.settings, &self.redirect, &self.http)
            .await
            .inspect_err(|_| metrics::idp_fetch_failed(IdpFetch::OidcDiscovery))?;
        let provider = Arc::new(provider);
        *self.provider.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Arc::clone(&provider), Instant::now()));
        Ok(provider)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, PendingLogins<Reply, Authorization>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn log_outcome(outcome: &Result<LoginIdentity, LoginError>) {
    match outcome {
        Ok(who) => {
            tracing::info!("login completed");
            tracing::debug!(user = %who.email, groups = ?who.groups, "logged in");
        }
        Err(e) => tracing::info!("login failed: {e}"),
    }
}

/// 256 random bits, URL-safe.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::test_issuer::TestIssuer;
    use super::*;

    #[tokio::test]
    async fn logins_beyond_the_cap_are_refused_until_one_ends() {
        let issuer = TestIssuer::start(false).await;
        let logins = Logins::new(issuer.settings(), "http://127.0.0.1:9", 1).unwrap();
        let (_, first) = logins.start(LoginFlow::Browser).await.unwrap();
        let refusal = logins.start(LoginFlow::Browser).await.unwrap_err();
        assert_eq!(refusal.code, RefusalCode::Unavailable);
        assert!(
            refusal.message.contains("logins waiting"),
            "{}",
            refusal.message
        );
        drop(first);
        assert!(
            logins.start(LoginFlow::Browser).await.is_ok(),
            "an abandoned login frees its place"
        );
    }
}
