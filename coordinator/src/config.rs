//! The coordinator's configuration file (TOML), which command-line flags override.
//!
//! ```toml
//! public_url = "https://weft.example.com"
//! listen = "0.0.0.0:7443"
//! [oidc]
//! issuer = "https://login.example.com"
//! client_id = "weft"
//! client_secret_file = "/etc/weft/oidc-secret"
//! ```
//!
//! Every key is documented in the README's "Coordinator configuration" section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The scopes requested when the file names none.
const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];
/// How long a person's device stays admitted after a login, unless configured.
const DEFAULT_KEY_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// The parsed configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The base URL browsers use to reach the coordinator's HTTP endpoints.
    pub public_url: Option<String>,
    /// UDP address of the QUIC control listener.
    pub listen: Option<SocketAddr>,
    /// TCP address of the HTTP endpoints; defaults to `listen`'s address and port.
    pub http_listen: Option<SocketAddr>,
    /// The policy file.
    pub policy: Option<PathBuf>,
    /// The identity provider people log in with.
    pub oidc: Option<OidcFileConfig>,
}

/// The `[oidc]` section as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFileConfig {
    /// The issuer URL; discovery reads `ISSUER/.well-known/openid-configuration`.
    pub issuer: String,
    /// The client id registered at the identity provider.
    pub client_id: String,
    /// A file holding the client secret (one line).
    pub client_secret_file: PathBuf,
    /// Scopes to request; `openid` is always added.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Email domains admitted; empty admits every domain.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Email addresses admitted; empty admits every user (of the allowed domains).
    #[serde(default)]
    pub allowed_users: Vec<String>,
    /// IdP groups, one of which a user must be in; empty admits every group.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// The ID-token claim holding the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// How long a device stays admitted after a login (`24h`, `7d`, `30m`).
    #[serde(default)]
    pub key_expiry: Option<String>,
    /// Allow an `http://` issuer that is not a loopback address (never in production).
    #[serde(default)]
    pub allow_insecure_issuer: bool,
}

/// The `[oidc]` section, checked and with its secret read.
#[derive(Clone, PartialEq)]
pub struct OidcSettings {
    /// The issuer URL.
    pub issuer: String,
    /// The client id.
    pub client_id: String,
    /// The client secret. Never logged.
    pub client_secret: String,
    /// Scopes to request, `openid` first.
    pub scopes: Vec<String>,
    /// Email domains admitted (lowercase); empty admits all.
    pub allowed_domains: Vec<String>,
    /// Email addresses admitted (lowercase); empty admits all.
    pub allowed_users: Vec<String>,
    /// Groups admitted; empty admits all.
    pub allowed_groups: Vec<String>,
    /// The claim holding the groups.
    pub groups_claim: String,
    /// How long a login admits a device.
    pub key_expiry: Duration,
}

impl std::fmt::Debug for OidcSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcSettings")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("scopes", &self.scopes)
            .field("groups_claim", &self.groups_claim)
            .field("key_expiry", &self.key_expiry)
            .finish_non_exhaustive()
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
    /// A value is unusable.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads and parses the configuration file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

impl OidcFileConfig {
    /// Checks the section and reads the client secret from its file.
    pub fn resolve(&self) -> Result<OidcSettings, ConfigError> {
        let issuer = url::Url::parse(&self.issuer).map_err(|e| {
            ConfigError::Invalid(format!(
                "[oidc] issuer {:?} is not a URL ({e}); write it as https://HOST[/PATH]",
                self.issuer
            ))
        })?;
        check_issuer_scheme(&issuer, self.allow_insecure_issuer)?;
        if self.client_id.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "[oidc] client_id is empty; set it to the client id registered at the identity provider".into(),
            ));
        }
        let secret = std::fs::read_to_string(&self.client_secret_file).map_err(|e| {
            ConfigError::Invalid(format!(
                "cannot read [oidc] client_secret_file {}: {e}",
                self.client_secret_file.display()
            ))
        })?;
        let client_secret = secret.trim().to_owned();
        if client_secret.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "[oidc] client_secret_file {} is empty; put the client secret in it",
                self.client_secret_file.display()
            )));
        }
        let mut scopes = vec!["openid".to_owned()];
        let wanted: Vec<String> = if self.scopes.is_empty() {
            DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect()
        } else {
            self.scopes.clone()
        };
        for scope in wanted {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        let key_expiry = match &self.key_expiry {
            None => DEFAULT_KEY_EXPIRY,
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                ConfigError::Invalid(format!(
                    "[oidc] key_expiry {text:?} is not a duration ({e}); write e.g. \"24h\" or \"7d\""
                ))
            })?,
        };
        if key_expiry < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "[oidc] key_expiry must be at least one second".into(),
            ));
        }
        let lower = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().trim_start_matches('@').to_ascii_lowercase())
                .collect()
        };
        Ok(OidcSettings {
            issuer: self.issuer.trim_end_matches('/').to_owned(),
            client_id: self.client_id.clone(),
            client_secret,
            scopes,
            allowed_domains: lower(&self.allowed_domains),
            allowed_users: lower(&self.allowed_users),
            allowed_groups: self.allowed_groups.clone(),
            groups_claim: self.groups_claim.clone(),
            key_expiry,
        })
    }
}

/// An identity provider's keys and tokens must arrive over TLS; plain HTTP is
/// allowed only on loopback (tests, a local IdP) or when explicitly opted into.
fn check_issuer_scheme(issuer: &url::Url, allow_insecure: bool) -> Result<(), ConfigError> {
    match issuer.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure || is_loopback(issuer) => Ok(()),
        "http" => Err(ConfigError::Invalid(format!(
            "[oidc] issuer {issuer} uses plain http; use https, or set allow_insecure_issuer = true for a test identity provider"
        ))),
        other => Err(ConfigError::Invalid(format!(
            "[oidc] issuer {issuer} has scheme {other:?}; it must be an https:// URL"
        ))),
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

fn default_groups_claim() -> String {
    "groups".into()
}

/// Checks `public_url` and returns it without a trailing slash.
pub fn check_public_url(raw: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(raw).map_err(|e| {
        ConfigError::Invalid(format!(
            "public_url {raw:?} is not a URL ({e}); write it as https://HOST[:PORT]"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::Invalid(format!(
            "public_url {raw:?} must be an http:// or https:// URL with a host"
        )));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        public_url = "https://weft.example.com/"
        listen = "0.0.0.0:7443"
        http_listen = "127.0.0.1:8080"
        policy = "/etc/weft/policy.hujson"

        [oidc]
        issuer = "https://login.example.com/"
        client_id = "weft"
        client_secret_file = "SECRET"
        scopes = ["email", "groups"]
        allowed_domains = ["Example.com"]
        allowed_users = []
        allowed_groups = ["eng"]
        groups_claim = "groups"
        key_expiry = "12h"
    "#;

    fn example(secret_file: &Path) -> FileConfig {
        parse(&EXAMPLE.replace("SECRET", &secret_file.display().to_string())).unwrap()
    }

    #[test]
    fn the_documented_example_parses_and_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let config = example(&secret);
        assert_eq!(config.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
        let oidc = config.oidc.unwrap().resolve().unwrap();
        assert_eq!(oidc.issuer, "https://login.example.com");
        assert_eq!(oidc.client_secret, "s3cret");
        assert_eq!(oidc.scopes, ["openid", "email", "groups"]);
        assert_eq!(oidc.allowed_domains, ["example.com"]);
        assert_eq!(oidc.key_expiry, Duration::from_secs(12 * 3600));
        assert!(!format!("{oidc:?}").contains("s3cret"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = parse("listen = \"0.0.0.0:7443\"\nlisten_udp = 1\n").unwrap_err();
        assert!(err.contains("listen_udp"), "{err}");
        let err = parse("listen = \"not an address\"\n").unwrap_err();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn plain_http_issuers_are_refused_unless_loopback_or_allowed() {
        let check = |raw: &str, allow| check_issuer_scheme(&url::Url::parse(raw).unwrap(), allow);
        assert!(check("http://127.0.0.1:9000", false).is_ok());
        assert!(check("http://localhost:9000", false).is_ok());
        let err = check("http://idp.example.com", false).unwrap_err();
        assert!(err.to_string().contains("allow_insecure_issuer"), "{err}");
        assert!(check("http://idp.example.com", true).is_ok());
        assert!(check("ftp://idp.example.com", true).is_err());
    }

    #[test]
    fn a_missing_or_empty_secret_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let err = example(&secret).oidc.unwrap().resolve().unwrap_err();
        assert!(err.to_string().contains("client_secret_file"), "{err}");
        std::fs::write(&secret, "\n").unwrap();
        let err = example(&secret).oidc.unwrap().resolve().unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn public_urls_must_be_http_urls() {
        assert_eq!(
            check_public_url("https://weft.example.com/").unwrap(),
            "https://weft.example.com"
        );
        assert!(check_public_url("weft.example.com").is_err());
        assert!(check_public_url("ftp://weft.example.com").is_err());
    }
}
