//! Logins in progress: sans-IO bookkeeping that makes login links single-use,
//! short-lived and bound to the machine and browser that started them.
//!
//! A login moves through three steps, each allowed once:
//! 1. [`PendingLogins::insert`] — a node's session asked for a login and got
//!    the link `…/login/ID`.
//! 2. [`PendingLogins::begin`] — a browser opened the link: the login gets an
//!    OAuth `state`, and the browser a cookie whose hash the login keeps.
//! 3. [`PendingLogins::finish`] — the identity provider redirected back with
//!    that `state`, from the browser holding that cookie.
//!
//! Whoever completes step 3 hands the identity to the session of step 1
//! only, so another machine can neither complete nor take over the login.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// How long a login link stays usable.
pub(crate) const LOGIN_TTL: Duration = Duration::from_secs(10 * 60);

/// Why a login step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PendingError {
    #[error("this login link is unknown or has expired; run `weft login` again for a new one")]
    UnknownLink,
    #[error("this login link was already opened; run `weft login` again for a new one")]
    LinkUsed,
    #[error(
        "the login's state is unknown, already used or expired; start again with `weft login`"
    )]
    UnknownState,
    #[error("this login was started in another browser; finish it in the browser that opened the login link")]
    WrongBrowser,
}

/// A login in progress. `T` is how the result reaches the waiting session.
#[derive(Debug)]
struct Pending<T, A> {
    created: Instant,
    reply: T,
    begun: Option<Begun<A>>,
}

#[derive(Debug)]
struct Begun<A> {
    state: String,
    browser: [u8; 32],
    authorization: A,
}

/// The logins in progress. `T` carries the result to the session, `A` is
/// what the authorization request left to check (nonce, PKCE verifier).
#[derive(Debug)]
pub(crate) struct PendingLogins<T, A> {
    logins: HashMap<String, Pending<T, A>>,
    states: HashMap<String, String>,
}

impl<T, A> Default for PendingLogins<T, A> {
    fn default() -> Self {
        Self {
            logins: HashMap::new(),
            states: HashMap::new(),
        }
    }
}

impl<T, A> PendingLogins<T, A> {
    /// Records a new login under the random `id` of its link.
    pub(crate) fn insert(&mut self, id: String, reply: T, now: Instant) {
        self.sweep(now);
        self.logins.insert(
            id,
            Pending {
                created: now,
                reply,
                begun: None,
            },
        );
    }

    /// A browser opened link `id`: remember the OAuth `state`, the hash of the
    /// browser's cookie and what the callback must check.
    pub(crate) fn begin(
        &mut self,
        id: &str,
        state: String,
        browser_cookie: &str,
        authorization: A,
        now: Instant,
    ) -> Result<(), PendingError> {
        self.sweep(now);
        let pending = self.logins.get_mut(id).ok_or(PendingError::UnknownLink)?;
        if pending.begun.is_some() {
            return Err(PendingError::LinkUsed);
        }
        self.states.insert(state.clone(), id.to_owned());
        pending.begun = Some(Begun {
            state,
            browser: hash(browser_cookie),
            authorization,
        });
        Ok(())
    }

    /// The identity provider redirected back with `state`: takes the login
    /// out (it cannot be finished twice) if the same browser began it.
    pub(crate) fn finish(
        &mut self,
        state: &str,
        browser_cookie: Option<&str>,
        now: Instant,
    ) -> Result<(T, A), PendingError> {
        self.sweep(now);
        let id = self.states.get(state).ok_or(PendingError::UnknownState)?;
        let pending = self.logins.get(id).ok_or(PendingError::UnknownState)?;
        let begun = pending.begun.as_ref().ok_or(PendingError::UnknownState)?;
        let same_browser = browser_cookie.is_some_and(|c| {
            subtle::ConstantTimeEq::ct_eq(&hash(c)[..], &begun.browser[..]).into()
        });
        if !same_browser {
            return Err(PendingError::WrongBrowser);
        }
        let id = self
            .states
            .remove(state)
            .ok_or(PendingError::UnknownState)?;
        let pending = self.logins.remove(&id).ok_or(PendingError::UnknownState)?;
        let begun = pending.begun.ok_or(PendingError::UnknownState)?;
        Ok((pending.reply, begun.authorization))
    }

    /// Forgets login `id` (its session ended).
    pub(crate) fn cancel(&mut self, id: &str) {
        if let Some(pending) = self.logins.remove(id) {
            if let Some(begun) = pending.begun {
                self.states.remove(&begun.state);
            }
        }
    }

    /// Drops logins older than [`LOGIN_TTL`]; their sessions see the reply
    /// channel close.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .logins
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.created) >= LOGIN_TTL)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.cancel(&id);
        }
    }

    /// How many logins are in progress.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.logins.len()
    }
}

fn hash(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn begun(now: Instant) -> PendingLogins<u32, &'static str> {
        let mut logins = PendingLogins::default();
        logins.insert("link".into(), 7, now);
        logins
            .begin("link", "state".into(), "cookie", "nonce", now)
            .unwrap();
        logins
    }

    #[test]
    fn a_login_completes_once_from_the_browser_that_began_it() {
        let now = Instant::now();
        let mut logins = begun(now);
        assert_eq!(
            logins.finish("state", Some("cookie"), now),
            Ok((7, "nonce"))
        );
        assert_eq!(
            logins.finish("state", Some("cookie"), now),
            Err(PendingError::UnknownState),
            "a replayed callback is refused"
        );
        assert_eq!(logins.len(), 0);
    }

    #[test]
    fn links_are_single_use() {
        let now = Instant::now();
        let mut logins = begun(now);
        assert_eq!(
            logins.begin("link", "other".into(), "evil", "n2", now),
            Err(PendingError::LinkUsed)
        );
        assert_eq!(
            logins.begin("nope", "s".into(), "c", "n", now),
            Err(PendingError::UnknownLink)
        );
    }

    #[test]
    fn another_browser_or_a_wrong_state_cannot_finish_a_login() {
        let now = Instant::now();
        let mut logins = begun(now);
        assert_eq!(
            logins.finish("state", Some("evil"), now),
            Err(PendingError::WrongBrowser)
        );
        assert_eq!(
            logins.finish("state", None, now),
            Err(PendingError::WrongBrowser)
        );
        assert_eq!(
            logins.finish("forged", Some("cookie"), now),
            Err(PendingError::UnknownState)
        );
        assert!(
            logins.finish("state", Some("cookie"), now).is_ok(),
            "failed attempts do not spoil the real login"
        );
    }

    #[test]
    fn logins_expire_after_ten_minutes() {
        let now = Instant::now();
        let mut logins = begun(now);
        let late = now + LOGIN_TTL;
        assert_eq!(
            logins.finish("state", Some("cookie"), late),
            Err(PendingError::UnknownState)
        );
        let mut logins = PendingLogins::<u32, ()>::default();
        logins.insert("link".into(), 1, now);
        assert_eq!(
            logins.begin("link", "s".into(), "c", (), late),
            Err(PendingError::UnknownLink)
        );
    }

    #[test]
    fn a_cancelled_login_cannot_be_finished() {
        let now = Instant::now();
        let mut logins = begun(now);
        logins.cancel("link");
        assert_eq!(
            logins.finish("state", Some("cookie"), now),
            Err(PendingError::UnknownState)
        );
    }

    proptest! {
        #[test]
        fn only_the_exact_state_and_cookie_finish(state in "[a-z]{1,8}", cookie in "[a-z]{1,8}") {
            let now = Instant::now();
            let mut logins = begun(now);
            let result = logins.finish(&state, Some(&cookie), now);
            prop_assert_eq!(result.is_ok(), state == "state" && cookie == "cookie");
        }
    }
}
