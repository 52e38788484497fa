//! Reading an issuer's key set: from a file, from a JWKS URL, or from the
//! `jwks_uri` its OpenID discovery document names. Every request is bounded
//! by [`FETCH_TIMEOUT`] and a size limit, so a slow or hostile issuer delays
//! only the registrations that name it.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::keys::KeySet;
use crate::error_chain;

/// The longest a fetch of one issuer's keys may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Discovery documents and key sets larger than this are refused.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// A JWKS file, for clusters whose issuer is not reachable from the coordinator.
    File(PathBuf),
    /// A JWKS URL.
    Url(url::Url),
    /// `ISSUER/.well-known/openid-configuration` names the JWKS URL.
    Discovery,
}

/// Reads the key set of `issuer` from `source`. The error says what failed
/// and where, for the log and the node's "retry later" refusal.
pub(crate) async fn fetch(
    source: &KeySource,
    issuer: &str,
    allow_insecure: bool,
    http: &reqwest::Client,
) -> Result<KeySet, String> {
    let work = async {
        match source {
            KeySource::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("cannot read jwks_file {}: {e}", path.display()))?;
                KeySet::parse(&bytes).map_err(|e| format!("jwks_file {}: {e}", path.display()))
            }
            KeySource::Url(url) => fetch_jwks(url, http).await,
            KeySource::Discovery => {
                let url = discover(issuer, allow_insecure, http).await?;
                fetch_jwks(&url, http).await
            }
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")))
}

async fn fetch_jwks(url: &url::Url, http: &reqwest::Client) -> Result<KeySet, String> {
    let bytes = get(url, http).await?;
    KeySet::parse(&bytes).map_err(|e| format!("{url}: {e}"))
}

/// The `jwks_uri` of `issuer`'s discovery document, which must name the
/// issuer itself.
async fn discover(
    issuer: &str,
    allow_insecure: bool,
    http: &reqwest::Client,
) -> Result<url::Url, String> {
    let raw = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let url = url::Url::parse(&raw).map_err(|e| format!("{raw} is not a URL: {e}"))?;
    let bytes = get(&url, http).await?;
    let doc: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{url} is not JSON: {e}"))?;
    if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
        return Err(format!(
            "{url} names another issuer than {issuer}; set jwks_url or jwks_file instead"
        ));
    }
    let jwks = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{url} has no jwks_uri"))?;
    let jwks = url::Url::parse(jwks).map_err(|e| format!("{url}: jwks_uri is not a URL: {e}"))?;
    crate::config::check_issuer_scheme(&jwks, allow_insecure, "jwks_uri")
        .map_err(|e| e.to_string())?;
    Ok(jwks)
}

async fn get(url: &url::Url, http: &reqwest::Client) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("{url}: {}", error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(format!("{url} sent more than {MAX_DOCUMENT} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
