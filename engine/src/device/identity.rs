//! A workload's identity token: the file its platform keeps fresh (a
//! Kubernetes projected service-account token, a CI job's OIDC token, a
//! cloud instance identity token), and when to re-authenticate with it.
//!
//! Every re-authentication also rotates the node's WireGuard key, so a
//! workload's key never outlives the token that vouched for it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_proto::IdentityToken;

/// The largest token file the device reads; platform tokens are a few KiB.
const MAX_TOKEN_BYTES: u64 = 16 * 1024;
/// The least time between two re-authentications a changed file triggers,
/// so a platform rewriting the file in several steps causes one rotation.
const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// How long to wait after a failed re-authentication before trying again
/// with an unchanged file.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenFileError {
    /// The file cannot be read.
    #[error("cannot read the identity token file {path}: {source} (check --identity-token-file and that the platform mounts the token there)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("the identity token file {path} is empty; the platform has not written a token yet")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is too large to be a token.
    #[error("the identity token file {path} is larger than {MAX_TOKEN_BYTES} bytes; it does not hold a platform token")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

/// Reads the token in `path`: one JWT, surrounding whitespace ignored.
pub(crate) fn read_token(path: &Path) -> Result<IdentityToken, TokenFileError> {
    let read_error = |source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_TOKEN_BYTES {
        return Err(TokenFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(IdentityToken::new(token))
}

/// Decides when a registered workload re-authenticates: soon after its
/// platform rewrites the token file, and in any case before its node key
/// expires. Time is passed in as Unix seconds and durations since start, so
/// the policy is tested without a clock.
#[derive(Debug, Default)]
pub(super) struct Renewal {
    /// The token last presented to the coordinator.
    presented: Option<IdentityToken>,
    /// When the node's current key was issued and when it expires (Unix seconds).
    key: Option<(u64, u64)>,
    /// When the last re-authentication started (seconds on the caller's clock).
    last_attempt: Option<Duration>,
    /// The token the coordinator refused last, not presented again.
    refused: Option<IdentityToken>,
}

impl Renewal {
    /// The coordinator accepted `token` (or a rejoin kept the key) and the
    /// node's key now lives until `expiry`.
    pub(super) fn accepted(
        &mut self,
        token: Option<IdentityToken>,
        issued: u64,
        expiry: Option<u64>,
    ) {
        if token.is_some() {
            self.presented = token;
        }
        self.key = expiry.map(|expiry| (issued, expiry));
        self.refused = None;
    }

    /// A re-authentication starts now.
    pub(super) fn started(&mut self, now: Duration) {
        self.last_attempt = Some(now);
    }

    /// The coordinator refused `token`.
    pub(super) fn refused(&mut self, token: IdentityToken) {
        self.refused = Some(token);
    }

    /// Whether to re-authenticate now with `current`, the file's token.
    pub(super) fn due(&self, current: &IdentityToken, unix_now: u64, now: Duration) -> bool {
        let since_attempt = self.last_attempt.map(|at| now.saturating_sub(at));
        let wait = if self.refused.is_some() {
            RETRY_AFTER_FAILURE
        } else {
            MIN_INTERVAL
        };
        if since_attempt.is_some_and(|since| since < wait) {
            return false;
        }
        let same = |other: &Option<IdentityToken>| {
            other
                .as_ref()
                .is_some_and(|t| t.expose_secret() == current.expose_secret())
        };
        if !same(&self.presented) && !same(&self.refused) {
            return true;
        }
        match self.key {
            Some((issued, expiry)) => unix_now >= renew_at(issued, expiry),
            None => false,
        }
    }
}

/// When a key issued at `issued` and expiring at `expiry` should be renewed
/// even though the token file did not change: with a fifth of its lifetime
/// left, and at least 10 s before it runs out.
fn renew_at(issued: u64, expiry: u64) -> u64 {
    let lifetime = expiry.saturating_sub(issued);
    let margin = (lifetime / 5).max(10);
    expiry.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> IdentityToken {
        IdentityToken::new(text)
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_rewritten_token_file_triggers_one_renewal() {
        let mut renewal = Renewal::default();
        renewal.accepted(Some(token("a")), 1_000, Some(4_600));
        assert!(!renewal.due(&token("a"), 1_010, 10 * SEC));
        assert!(renewal.due(&token("b"), 1_010, 10 * SEC));
        renewal.started(10 * SEC);
        assert!(
            !renewal.due(&token("b"), 1_011, 11 * SEC),
            "one renewal at a time"
        );
        renewal.accepted(Some(token("b")), 1_011, Some(4_611));
        assert!(!renewal.due(&token("b"), 1_030, 30 * SEC));
    }

    #[test]
    fn a_key_close_to_expiry_is_renewed_with_the_same_token() {
        let mut renewal = Renewal::default();
        renewal.accepted(Some(token("a")), 0, Some(3_600));
        assert!(!renewal.due(&token("a"), 2_879, 100 * SEC));
        assert!(renewal.due(&token("a"), 2_880, 100 * SEC));
        assert_eq!(renew_at(0, 20), 10, "short keys renew 10 s ahead");
    }

    #[test]
    fn a_refused_renewal_waits_before_retrying() {
        let mut renewal = Renewal::default();
        renewal.accepted(Some(token("a")), 0, Some(3_600));
        renewal.started(10 * SEC);
        renewal.refused(token("b"));
        assert!(!renewal.due(&token("c"), 20, 20 * SEC));
        assert!(
            !renewal.due(&token("b"), 45, 45 * SEC),
            "a refused token is not presented again"
        );
        assert!(renewal.due(&token("c"), 45, 45 * SEC), "a new token is");
        assert!(
            renewal.due(&token("b"), 3_000, 3_000 * SEC),
            "close to expiry, anything is worth a try"
        );
    }

    #[test]
    fn token_files_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        assert!(matches!(
            read_token(&path),
            Err(TokenFileError::Read { .. })
        ));
        std::fs::write(&path, "  \n").unwrap();
        let err = read_token(&path).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        std::fs::write(&path, "x".repeat(20_000)).unwrap();
        assert!(matches!(
            read_token(&path),
            Err(TokenFileError::TooLarge { .. })
        ));
        std::fs::write(&path, "eyJ.payload.sig\n").unwrap();
        assert_eq!(
            read_token(&path).unwrap().expose_secret(),
            "eyJ.payload.sig"
        );
    }
}
