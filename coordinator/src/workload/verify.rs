//! JWT validation without IO: parse the compact form without trusting it,
//! check the algorithm against weft's own allow-list, verify the signature
//! with `ring`, then check the claims at a given `now`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

use super::error::TokenError;
use super::keys::Jwk;

/// Tokens longer than this are refused before parsing.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;
/// How far the issuer's clock may be from the coordinator's.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The signature algorithms weft accepts: public-key ones only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    /// The header's `alg`, refusing `none`, HMAC and anything unknown.
    fn parse(alg: &str) -> Result<Self, TokenError> {
        match alg {
            "RS256" => Ok(Alg::Rs256),
            "RS384" => Ok(Alg::Rs384),
            "RS512" => Ok(Alg::Rs512),
            "ES256" => Ok(Alg::Es256),
            "ES384" => Ok(Alg::Es384),
            "EdDSA" => Ok(Alg::EdDsa),
            a if a.eq_ignore_ascii_case("none") => Err(TokenError::Unsigned),
            a if a.to_ascii_uppercase().starts_with("HS") => Err(TokenError::Hmac(a.to_owned())),
            other => Err(TokenError::UnsupportedAlg(other.chars().take(32).collect())),
        }
    }

    /// The JOSE name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A token split and decoded, its signature not yet checked.
#[derive(Debug)]
pub(crate) struct Unverified {
    pub(crate) alg: Alg,
    pub(crate) kid: Option<String>,
    /// `header.payload`, the signed text.
    signed: String,
    signature: Vec<u8>,
    /// The claims; trusted only after [`Unverified::verify_with`] succeeded.
    pub(crate) claims: Value,
}

/// Splits and decodes `token`, checking size and algorithm first.
pub(crate) fn parse(token: &str) -> Result<Unverified, TokenError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "it does not have three dot-separated parts".into(),
        ));
    };
    let header: Value = decode_json(header, "header")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| TokenError::Malformed("its header has no `alg`".into()))?;
    let alg = Alg::parse(alg)?;
    if header.get("crit").is_some() {
        return Err(TokenError::Malformed(
            "its header has `crit` extensions, which weft does not understand".into(),
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.chars().take(128).collect()),
        Some(_) => return Err(TokenError::Malformed("its `kid` is not a string".into())),
    };
    let claims: Value = decode_json(payload, "payload")?;
    if !claims.is_object() {
        return Err(TokenError::Malformed(
            "its payload is not a JSON object".into(),
        ));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed("its signature is not base64url".into()))?;
    let signed_len = token.len() - signature_len(token);
    Ok(Unverified {
        alg,
        kid,
        signed: token[..signed_len].to_owned(),
        signature,
        claims,
    })
}

/// The length of the last part of `token` with its dot.
fn signature_len(token: &str) -> usize {
    token.rfind('.').map_or(0, |dot| token.len() - dot)
}

fn decode_json(part: &str, what: &str) -> Result<Value, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(format!("its {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| TokenError::Malformed(format!("its {what} is not JSON")))
}

impl Unverified {
    /// The `iss` claim, not yet trusted: it only selects whose keys to try.
    pub(crate) fn claimed_issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Verifies the signature with `key`; `Ok(false)` when it does not verify.
    pub(crate) fn verify_with(&self, key: &Jwk) -> Result<bool, TokenError> {
        if !key.fits(self.alg) {
            return Err(TokenError::KeyMismatch {
                kid: key.kid.clone().unwrap_or_else(|| "(no kid)".into()),
                alg: self.alg.name().into(),
                kty: key.kty().into(),
            });
        }
        Ok(key.verify(self.alg, self.signed.as_bytes(), &self.signature))
    }
}

/// What the issuer's entry requires of a token's claims.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimRules<'a> {
    pub(crate) issuer: &'a str,
    pub(crate) audience: &'a str,
    pub(crate) max_token_age: Duration,
}

/// Checks `iss`, `aud`, `exp`, `nbf` and `iat` (within [`CLOCK_SKEW`]) and
/// the token's age at `now`. Returns `exp` (Unix seconds).
pub(crate) fn check_claims(
    claims: &Value,
    rules: ClaimRules<'_>,
    now: SystemTime,
) -> Result<i64, TokenError> {
    let iss = claims.get("iss").and_then(Value::as_str);
    if iss != Some(rules.issuer) {
        return Err(TokenError::UntrustedIssuer(
            iss.unwrap_or_default().chars().take(200).collect(),
        ));
    }
    let audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    if !audiences.iter().any(|a| a == rules.audience) {
        return Err(TokenError::Audience {
            got: audiences
                .into_iter()
                .take(8)
                .map(|a| a.chars().take(100).collect())
                .collect(),
            want: rules.audience.to_owned(),
        });
    }
    let now = unix(now);
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(i64::MAX);
    let exp = time_claim(claims, "exp")?.ok_or(TokenError::MissingTime("exp"))?;
    if exp.saturating_add(skew) <= now {
        return Err(TokenError::Expired { exp, now });
    }
    if let Some(nbf) = time_claim(claims, "nbf")? {
        if nbf > now.saturating_add(skew) {
            return Err(TokenError::NotYetValid { nbf, now });
        }
    }
    let iat = time_claim(claims, "iat")?.ok_or(TokenError::MissingTime("iat"))?;
    if iat > now.saturating_add(skew) {
        return Err(TokenError::IssuedInFuture { iat, now });
    }
    let age = now.saturating_sub(iat);
    let max = rules.max_token_age.as_secs();
    if u64::try_from(age).is_ok_and(|age| age > max) {
        return Err(TokenError::TooOld {
            age_secs: age,
            max_secs: max,
        });
    }
    Ok(exp)
}

/// A NumericDate claim (whole or fractional seconds); `Err` when present but not a number.
fn time_claim(claims: &Value, name: &'static str) -> Result<Option<i64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.floor() as i64)
            })
            .map(Some)
            .ok_or(TokenError::MissingTime(name)),
        Some(_) => Err(TokenError::MissingTime(name)),
    }
}

/// Unix seconds at `now`; instants before 1970 count as 0.
pub(crate) fn unix(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn encode(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    fn token(header: Value) -> String {
        format!("{}.{}.c2ln", encode(&header), encode(&json!({"iss": "x"})))
    }

    #[test]
    fn the_algorithm_allow_list_is_weft_s() {
        assert_eq!(
            parse(&token(json!({"alg": "none"}))).unwrap_err(),
            TokenError::Unsigned
        );
        assert_eq!(
            parse(&token(json!({"alg": "NONE"}))).unwrap_err(),
            TokenError::Unsigned
        );
        for hmac in ["HS256", "HS384", "HS512"] {
            assert_eq!(
                parse(&token(json!({ "alg": hmac }))).unwrap_err(),
                TokenError::Hmac(hmac.into())
            );
        }
        assert!(matches!(
            parse(&token(json!({"alg": "PS256"}))).unwrap_err(),
            TokenError::UnsupportedAlg(_)
        ));
        for alg in ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"] {
            assert_eq!(
                parse(&token(json!({ "alg": alg }))).unwrap().alg.name(),
                alg
            );
        }
    }

    #[test]
    fn malformed_tokens_are_named() {
        for bad in ["", "a.b", "a.b.c.d", "!!.e30.c2ln", "e30.e30.c2ln"] {
            assert!(
                matches!(parse(bad), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
        let crit = token(json!({"alg": "RS256", "crit": ["b64"]}));
        assert!(matches!(parse(&crit), Err(TokenError::Malformed(_))));
        let big = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            parse(&big).unwrap_err(),
            TokenError::TooLarge(MAX_TOKEN_LEN + 1)
        );
    }

    #[test]
    fn the_signed_text_is_header_and_payload() {
        let t = token(json!({"alg": "ES256", "kid": "k1"}));
        let parsed = parse(&t).unwrap();
        assert_eq!(parsed.kid.as_deref(), Some("k1"));
        assert_eq!(format!("{}.c2ln", parsed.signed), t);
        assert_eq!(parsed.signature, b"sig");
        assert_eq!(parsed.claimed_issuer(), Some("x"));
    }

    fn rules() -> ClaimRules<'static> {
        ClaimRules {
            issuer: "https://iss",
            audience: "weft",
            max_token_age: Duration::from_secs(3600),
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn time_claims_allow_five_minutes_of_skew() {
        let now = 1_000_000;
        let claims = |exp: i64, nbf: i64, iat: i64| json!({"iss": "https://iss", "aud": ["other", "weft"], "exp": exp, "nbf": nbf, "iat": iat});
        assert_eq!(
            check_claims(&claims(now + 10, now, now), rules(), at(1_000_000)),
            Ok(now + 10)
        );
        assert!(check_claims(&claims(now - 299, now, now - 600), rules(), at(1_000_000)).is_ok());
        assert!(matches!(
            check_claims(&claims(now - 300, now, now - 600), rules(), at(1_000_000)),
            Err(TokenError::Expired { .. })
        ));
        assert!(check_claims(&claims(now + 900, now + 300, now), rules(), at(1_000_000)).is_ok());
        assert!(matches!(
            check_claims(&claims(now + 900, now + 301, now), rules(), at(1_000_000)),
            Err(TokenError::NotYetValid { .. })
        ));
        assert!(matches!(
            check_claims(&claims(now + 900, now, now + 301), rules(), at(1_000_000)),
            Err(TokenError::IssuedInFuture { .. })
        ));
        assert!(check_claims(&claims(now + 900, now, now - 3600), rules(), at(1_000_000)).is_ok());
        assert_eq!(
            check_claims(&claims(now + 900, now, now - 3601), rules(), at(1_000_000)),
            Err(TokenError::TooOld {
                age_secs: 3601,
                max_secs: 3600
            })
        );
    }

    #[test]
    fn issuer_audience_and_times_are_required() {
        let now = at(1_000_000);
        let good = json!({"iss": "https://iss", "aud": "weft", "exp": 1_000_100, "iat": 1_000_000});
        assert!(check_claims(&good, rules(), now).is_ok());
        let mut c = good.clone();
        c["aud"] = json!("api");
        let err = check_claims(&c, rules(), now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the token's audience is [\"api\"]; request a token with audience \"weft\" (projected token `audience: weft`)"
        );
        let mut c = good.clone();
        c["iss"] = json!("https://evil");
        assert!(matches!(
            check_claims(&c, rules(), now),
            Err(TokenError::UntrustedIssuer(_))
        ));
        for missing in ["exp", "iat"] {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(missing);
            assert_eq!(
                check_claims(&c, rules(), now),
                Err(TokenError::MissingTime(missing))
            );
        }
        let mut c = good;
        c["exp"] = json!("tomorrow");
        assert_eq!(
            check_claims(&c, rules(), now),
            Err(TokenError::MissingTime("exp"))
        );
    }

    proptest! {
        #[test]
        fn parsing_garbage_never_panics(text in ".{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn parsing_corrupted_tokens_never_panics(header in proptest::collection::vec(any::<u8>(), 0..64), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let t = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload), "c2ln");
            let _ = parse(&t);
        }
    }
}
