//! Why a workload token was refused, worded for the operator of the node.
//! Claim values (issuer, audience, times) may appear; the token never does.

use weft_proto::{Refusal, RefusalCode};

use super::mapping::MappingError;
use super::verify::MAX_TOKEN_LEN;

/// Why a workload token does not admit a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("the identity token is {0} bytes, more than the {MAX_TOKEN_LEN} accepted; send the platform's token file unchanged")]
    TooLarge(usize),
    #[error(
        "the identity token is not a signed JWT ({0}); send the platform's token file unchanged"
    )]
    Malformed(String),
    #[error("the identity token is unsigned (alg \"none\"); only tokens signed by a trusted issuer are accepted")]
    Unsigned,
    #[error("the identity token is signed with {0}, a shared-secret algorithm; only the issuer's public-key signatures (RS256, RS384, RS512, ES256, ES384, EdDSA) are accepted")]
    Hmac(String),
    #[error("the identity token's algorithm {0:?} is not supported; the issuer must sign with RS256, RS384, RS512, ES256, ES384 or EdDSA")]
    UnsupportedAlg(String),
    #[error("the identity token has no `iss` claim; use a token from a trusted issuer")]
    NoIssuer,
    #[error("issuer {0} is not trusted by this coordinator; add a [[workload_issuers]] entry")]
    UntrustedIssuer(String),
    #[error("signing key {0} is not in the issuer's key set; the issuer must publish it (jwks_url, discovery or jwks_file)")]
    UnknownKid(String),
    #[error("the issuer publishes no {0} key; the token names no `kid` and nothing could have signed it")]
    NoKey(String),
    #[error("signing key {kid} cannot make {alg} signatures (it is a {kty} key or is restricted to another alg); the token is not from this issuer")]
    KeyMismatch {
        kid: String,
        alg: String,
        kty: String,
    },
    #[error("the identity token's signature does not verify with the key of issuer {0}; the token was altered or signed by someone else")]
    BadSignature(String),
    #[error("the token's audience is {got:?}; request a token with audience {want:?} (projected token `audience: {want}`)")]
    Audience { got: Vec<String>, want: String },
    #[error("the token has no numeric `{0}` claim; the issuer must include it")]
    MissingTime(&'static str),
    #[error("the token expired at {} (now {}, 5 minutes of clock skew allowed); read a fresh token from the platform", rfc3339(*.exp), rfc3339(*.now))]
    Expired { exp: i64, now: i64 },
    #[error("the token is not valid before {} (now {}, 5 minutes of clock skew allowed); check the clocks of the issuer and the coordinator", rfc3339(*.nbf), rfc3339(*.now))]
    NotYetValid { nbf: i64, now: i64 },
    #[error("the token was issued at {}, in the future (now {}, 5 minutes of clock skew allowed); check the clocks of the issuer and the coordinator", rfc3339(*.iat), rfc3339(*.now))]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("the token was issued {age_secs} s ago, more than the issuer's max_token_age of {max_secs} s; use a fresh token (or raise max_token_age)")]
    TooOld { age_secs: i64, max_secs: u64 },
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("the keys of issuer {issuer} cannot be read right now ({reason}); retry later")]
    Unavailable { issuer: String, reason: String },
}

/// A Unix time as RFC 3339, for messages people read.
fn rfc3339(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(secs) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
        .to_string(),
        Err(_) => format!("{secs} (Unix seconds)"),
    }
}

impl TokenError {
    /// The refusal the node gets: an unreachable issuer is worth retrying;
    /// everything else is wrong with the token.
    pub(crate) fn refusal(&self) -> Refusal {
        let code = match self {
            TokenError::Unavailable { .. } => RefusalCode::IdentityProviderUnavailable,
            _ => RefusalCode::TokenInvalid,
        };
        Refusal {
            code,
            message: self.to_string(),
        }
    }
}
