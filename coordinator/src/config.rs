//! The coordinator's configuration file (TOML), which command-line flags override.
//!
//! ```toml
//! public_url = "https://weft.example.com"
//! listen = "0.0.0.0:7443"
//! [oidc]
//! issuer = "https://login.example.com"
//! client_id = "weft"
//! client_secret_file = "/etc/weft/oidc-secret"
//!
//! [roles]
//! admin = ["alice@example.com", "group:idp:secops"]
//!
//! [[workload_issuers]]
//! issuer = "https://kubernetes.default.svc.cluster.local"
//! jwks_file = "/etc/weft/cluster-jwks.json"
//! audience = "weft"
//! kind = "kubernetes"
//! trust_domain = "cluster.local"
//! ```
//!
//! Every key is documented in the README's "Coordinator configuration" section.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use weft_proto::canonical;

mod flows;
mod relays;
mod store;

pub use self::flows::{
    FlowSettings, FlowsFileConfig, SinkFileConfig, SinkSettings, SinkTarget, SyslogTransport,
    DEFAULT_FLOW_MAX_AGE, DEFAULT_FLOW_MAX_BYTES, DEFAULT_FLOW_SEGMENT_AGE,
    DEFAULT_FLOW_SEGMENT_BYTES,
};
pub(crate) use self::relays::is_relay_name;
pub use self::relays::RelayConfig;
pub use self::store::{
    EtcdSettings, EtcdTls, EtcdTlsFileConfig, StoreFileConfig, StoreKind, StoreSettings,
};

use crate::workload::mapping::{check_trust_domain, Mapping, Template};
use crate::workload::KeySource;

/// The scopes requested when the file names none.
const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];
/// How long a person's device stays admitted after a login, unless configured.
const DEFAULT_KEY_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// How long an ephemeral node may stay offline before it is deleted, unless configured.
pub const DEFAULT_EPHEMERAL_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The oldest workload token accepted, unless an issuer's entry says otherwise.
const DEFAULT_MAX_TOKEN_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a workload token admits its node at most, unless configured.
const DEFAULT_WORKLOAD_KEY_EXPIRY: Duration = Duration::from_secs(60 * 60);

/// The parsed configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The base URL browsers use to reach the coordinator's HTTP endpoints.
    pub public_url: Option<String>,
    /// Control address: QUIC on UDP, and TLS over TCP on the same port.
    pub listen: Option<SocketAddr>,
    /// TCP address of the HTTP endpoints; defaults to `listen`'s address and port.
    pub http_listen: Option<SocketAddr>,
    /// TCP address of the Prometheus metrics endpoint (`GET /metrics`); none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// The policy file.
    pub policy: Option<PathBuf>,
    /// The identity provider people log in with.
    pub oidc: Option<OidcFileConfig>,
    /// How long an ephemeral node may stay offline before it is deleted (`10m`).
    #[serde(default)]
    pub ephemeral_timeout: Option<String>,
    /// The issuers whose workload tokens (Kubernetes service-account tokens,
    /// CI OIDC tokens, cloud instance identity tokens) admit nodes.
    #[serde(default)]
    pub workload_issuers: Vec<WorkloadIssuerConfig>,
    /// Where the state lives; the embedded store when absent.
    pub store: Option<StoreFileConfig>,
    /// The relays nodes may use, and that may ask for the admitted node keys.
    #[serde(default)]
    pub relays: Vec<RelayConfig>,
    /// Who holds the roles the policy's role autogroups (`autogroup:admin`,
    /// `autogroup:auditor`, …) stand for: each role maps to user logins and
    /// `group:idp:NAME` groups. The `admin` role's members are also
    /// administrators the lockout guard protects.
    #[serde(default)]
    pub roles: weft_policy::Roles,
    /// How long flow records are kept, and where they are forwarded
    /// ([`FlowsFileConfig`]).
    pub flows: Option<FlowsFileConfig>,
}

/// One `[[workload_issuers]]` entry as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadIssuerConfig {
    /// The exact `iss` of the tokens.
    pub issuer: String,
    /// A file holding the issuer's JWKS.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's JWKS URL; with neither this nor `jwks_file`, OIDC
    /// discovery at the issuer names it.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The audience tokens must be issued for.
    pub audience: String,
    /// How claims become the workload's SPIFFE ID.
    pub kind: WorkloadKind,
    /// The SPIFFE trust domain of this issuer's workloads.
    pub trust_domain: String,
    /// The oldest token accepted (`24h` unless given).
    #[serde(default)]
    pub max_token_age: Option<String>,
    /// How long a token admits its node at most (`1h` unless given); never
    /// past the token's own expiry.
    #[serde(default)]
    pub key_expiry: Option<String>,
    /// `tag:NAME` tags every node of this issuer carries.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Whether this issuer's nodes are deleted once offline for `ephemeral_timeout`.
    #[serde(default = "default_true")]
    pub ephemeral: bool,
    /// Allow an `http://` issuer or JWKS URL that is not on loopback (never in production).
    #[serde(default)]
    pub allow_insecure_issuer: bool,
    /// The SPIFFE ID template of a `generic` issuer: `{claim}`, `{a.b}` and `{trust_domain}`.
    #[serde(default)]
    pub identity: Option<String>,
}

/// How an issuer's token claims name the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// `sub` = `system:serviceaccount:NS:SA` → `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
    Kubernetes,
    /// `repository` and `job_workflow_ref` →
    /// `spiffe://TRUST_DOMAIN/github/OWNER/REPO/workflow/FILE/ref/REF`.
    GithubActions,
    /// The entry's `identity` template.
    Generic,
}

/// A `[[workload_issuers]]` entry, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadIssuer {
    pub(crate) issuer: String,
    pub(crate) keys: KeySource,
    pub(crate) audience: String,
    pub(crate) trust_domain: String,
    pub(crate) mapping: Mapping,
    pub(crate) max_token_age: Duration,
    pub(crate) key_expiry: Duration,
    pub(crate) tags: Vec<String>,
    pub(crate) ephemeral: bool,
    pub(crate) allow_insecure: bool,
}

impl WorkloadIssuer {
    /// The issuer's `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
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
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        source: toml::de::Error,
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
    parse(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}

impl FileConfig {
    /// `ephemeral_timeout`, or its default of ten minutes.
    pub fn resolve_ephemeral_timeout(&self) -> Result<Duration, ConfigError> {
        match &self.ephemeral_timeout {
            None => Ok(DEFAULT_EPHEMERAL_TIMEOUT),
            Some(text) => duration("ephemeral_timeout", text),
        }
    }

    /// Checks every `[[workload_issuers]]` entry; no issuer may appear twice.
    pub fn resolve_workload_issuers(&self) -> Result<Vec<WorkloadIssuer>, ConfigError> {
        let mut resolved: Vec<WorkloadIssuer> = Vec::new();
        for entry in &self.workload_issuers {
            let issuer = entry.resolve()?;
            if resolved.iter().any(|r| r.issuer == issuer.issuer) {
                return Err(ConfigError::Invalid(format!(
                    "[[workload_issuers]] lists issuer {} twice; merge the entries",
                    issuer.issuer
                )));
            }
            resolved.push(issuer);
        }
        Ok(resolved)
    }
}

impl WorkloadIssuerConfig {
    /// Checks the entry.
    pub fn resolve(&self) -> Result<WorkloadIssuer, ConfigError> {
        let invalid = |what: String| {
            ConfigError::Invalid(format!("[[workload_issuers]] {:?}: {what}", self.issuer))
        };
        if self.issuer.trim().is_empty() {
            return Err(invalid(
                "issuer is empty; write the exact `iss` of the tokens".into(),
            ));
        }
        let keys = match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(invalid("set jwks_file or jwks_url, not both".into()))
            }
            (Some(file), None) => KeySource::File(file.clone()),
            (None, Some(raw)) => {
                let url = url::Url::parse(raw)
                    .map_err(|e| invalid(format!("jwks_url {raw:?} is not a URL ({e})")))?;
                check_issuer_scheme(&url, self.allow_insecure_issuer, "jwks_url")
                    .map_err(|e| invalid(e.to_string()))?;
                KeySource::Url(url)
            }
            (None, None) => {
                let issuer_url = url::Url::parse(&self.issuer).map_err(|e| {
                    invalid(format!(
                        "issuer is not a URL ({e}), so its keys cannot be discovered; set jwks_file or jwks_url"
                    ))
                })?;
                check_issuer_scheme(&issuer_url, self.allow_insecure_issuer, "issuer")
                    .map_err(|e| invalid(e.to_string()))?;
                KeySource::Discovery
            }
        };
        if self.audience.trim().is_empty() {
            return Err(invalid(
                "audience is empty; set it to the audience the tokens are requested for (e.g. \"weft\")".into(),
            ));
        }
        check_trust_domain(&self.trust_domain).map_err(invalid)?;
        let mapping = match (self.kind, &self.identity) {
            (WorkloadKind::Generic, Some(template)) => Mapping::Generic(
                Template::parse(template, &self.trust_domain).map_err(invalid)?,
            ),
            (WorkloadKind::Generic, None) => {
                return Err(invalid(
                    "kind \"generic\" needs an identity template, e.g. identity = \"spiffe://{trust_domain}/vm/{sub}\"".into(),
                ))
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "identity is only for kind \"generic\"; kubernetes and github-actions issuers have a fixed mapping".into(),
                ))
            }
            (WorkloadKind::Kubernetes, None) => Mapping::Kubernetes,
            (WorkloadKind::GithubActions, None) => Mapping::GithubActions,
        };
        let max_token_age = match &self.max_token_age {
            None => DEFAULT_MAX_TOKEN_AGE,
            Some(text) => duration("max_token_age", text).map_err(|e| invalid(e.to_string()))?,
        };
        let key_expiry = match &self.key_expiry {
            None => DEFAULT_WORKLOAD_KEY_EXPIRY,
            Some(text) => duration("key_expiry", text).map_err(|e| invalid(e.to_string()))?,
        };
        let mut tags = self.tags.clone();
        for tag in &tags {
            crate::authkey::validate_tag(tag).map_err(invalid)?;
        }
        tags.sort();
        tags.dedup();
        Ok(WorkloadIssuer {
            issuer: self.issuer.clone(),
            keys,
            audience: self.audience.clone(),
            trust_domain: self.trust_domain.clone(),
            mapping,
            max_token_age,
            key_expiry,
            tags,
            ephemeral: self.ephemeral,
            allow_insecure: self.allow_insecure_issuer,
        })
    }
}

/// A positive duration written like `10m`, `1h` or `7d`.
fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        ConfigError::Invalid(format!(
            "{key} {text:?} is not a duration ({e}); write e.g. \"10m\" or \"1h\""
        ))
    })?;
    if parsed < Duration::from_secs(1) {
        return Err(ConfigError::Invalid(format!(
            "{key} must be at least one second"
        )));
    }
    Ok(parsed)
}

fn default_true() -> bool {
    true
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
        check_issuer_scheme(&issuer, self.allow_insecure_issuer, "[oidc] issuer")?;
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
        let canonical = |v: &[String], form: fn(&str) -> Cow<'_, str>| -> Vec<String> {
            v.iter()
                .map(|s| form(s.trim().trim_start_matches('@')).into_owned())
                .collect()
        };
        Ok(OidcSettings {
            issuer: self.issuer.trim_end_matches('/').to_owned(),
            client_id: self.client_id.clone(),
            client_secret,
            scopes,
            allowed_domains: canonical(&self.allowed_domains, canonical::domain),
            allowed_users: canonical(&self.allowed_users, canonical::email),
            allowed_groups: self.allowed_groups.clone(),
            groups_claim: self.groups_claim.clone(),
            key_expiry,
        })
    }
}

/// An identity provider's keys and tokens must arrive over TLS; plain HTTP is
/// allowed only on loopback (tests, a local IdP) or when explicitly opted into.
/// `what` names the setting in messages.
pub(crate) fn check_issuer_scheme(
    issuer: &url::Url,
    allow_insecure: bool,
    what: &str,
) -> Result<(), ConfigError> {
    match issuer.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure || is_loopback(issuer) => Ok(()),
        "http" => Err(ConfigError::Invalid(format!(
            "{what} {issuer} uses plain http; use https, or set allow_insecure_issuer = true for a test identity provider"
        ))),
        other => Err(ConfigError::Invalid(format!(
            "{what} {issuer} has scheme {other:?}; it must be an https:// URL"
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

    #[test]
    fn a_missing_configuration_file_keeps_the_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("coordinator.toml")).unwrap_err();
        let io = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    const EXAMPLE: &str = r#"
        public_url = "https://weft.example.com/"
        listen = "0.0.0.0:7443"
        http_listen = "127.0.0.1:8080"
        metrics_listen = "127.0.0.1:9460"
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
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9460".parse().unwrap())
        );
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
        let err = parse("listen = \"0.0.0.0:7443\"\nlisten_udp = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_udp"), "{err}");
        let err = parse("listen = \"not an address\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn roles_name_their_members_and_refuse_what_cannot_be_one() {
        let config =
            parse("[roles]\nadmin = [\"Ada@Example.org\", \"group:idp:secops\"]\nauditor = []\n")
                .unwrap();
        assert_eq!(
            config.roles.members(weft_policy::Role::Admin),
            ["ada@example.org", "group:idp:secops"]
        );
        let err = parse("[roles]\nadmins = [\"ada@example.org\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admins") && err.contains("it-admin"), "{err}");
        let err = parse("[roles]\nadmin = [\"tag:ops\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a user login or an identity-provider group"),
            "{err}"
        );
    }

    #[test]
    fn plain_http_issuers_are_refused_unless_loopback_or_allowed() {
        let check = |raw: &str, allow| {
            check_issuer_scheme(&url::Url::parse(raw).unwrap(), allow, "[oidc] issuer")
        };
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

    /// The README's workload example, one entry per kind.
    const WORKLOADS: &str = r#"
        ephemeral_timeout = "10m"

        [[workload_issuers]]
        issuer = "https://kubernetes.default.svc.cluster.local"
        jwks_file = "/etc/weft/cluster-jwks.json"
        audience = "weft"
        kind = "kubernetes"
        trust_domain = "cluster.local"
        max_token_age = "1h"
        key_expiry = "1h"
        tags = ["tag:k8s"]
        ephemeral = true

        [[workload_issuers]]
        issuer = "https://token.actions.githubusercontent.com"
        audience = "weft"
        kind = "github-actions"
        trust_domain = "github.example.com"
        tags = ["tag:ci"]

        [[workload_issuers]]
        issuer = "https://accounts.google.com"
        jwks_url = "https://www.googleapis.com/oauth2/v3/certs"
        audience = "https://weft.example.com"
        kind = "generic"
        trust_domain = "gcp.example.com"
        identity = "spiffe://{trust_domain}/vm/{google.compute_engine.project_id}/{google.compute_engine.instance_name}"
        ephemeral = false
        key_expiry = "30m"
    "#;

    #[test]
    fn the_documented_workload_issuers_parse_and_resolve() {
        let config = parse(WORKLOADS).unwrap();
        assert_eq!(
            config.resolve_ephemeral_timeout().unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(
            FileConfig::default().resolve_ephemeral_timeout().unwrap(),
            DEFAULT_EPHEMERAL_TIMEOUT
        );
        let issuers = config.resolve_workload_issuers().unwrap();
        assert_eq!(issuers.len(), 3);
        let [k8s, gha, gce] = &issuers[..] else {
            panic!("three issuers")
        };
        assert_eq!(
            k8s.keys,
            KeySource::File("/etc/weft/cluster-jwks.json".into())
        );
        assert_eq!(k8s.mapping, Mapping::Kubernetes);
        assert_eq!(k8s.max_token_age, Duration::from_secs(3600));
        assert!(k8s.ephemeral);
        assert_eq!(gha.keys, KeySource::Discovery);
        assert_eq!(gha.mapping, Mapping::GithubActions);
        assert_eq!(gha.max_token_age, DEFAULT_MAX_TOKEN_AGE);
        assert_eq!(gha.key_expiry, DEFAULT_WORKLOAD_KEY_EXPIRY);
        assert!(gha.ephemeral, "ephemeral by default");
        assert!(matches!(gce.keys, KeySource::Url(_)));
        assert!(matches!(gce.mapping, Mapping::Generic(_)));
        assert_eq!(gce.key_expiry, Duration::from_secs(1800));
        assert!(!gce.ephemeral);
    }

    fn entry_error(extra: &str, replace: (&str, &str)) -> String {
        let base = r#"
            [[workload_issuers]]
            issuer = "https://kubernetes.default.svc.cluster.local"
            jwks_file = "/etc/weft/cluster-jwks.json"
            audience = "weft"
            kind = "kubernetes"
            trust_domain = "cluster.local"
        "#;
        let text = format!("{}{extra}\n", base.replace(replace.0, replace.1));
        match parse(&text) {
            Err(e) => e.to_string(),
            Ok(config) => config.resolve_workload_issuers().unwrap_err().to_string(),
        }
    }

    #[test]
    fn bad_workload_issuers_are_named() {
        let cases = [
            (("", ""), "audiences = [\"x\"]", "audiences"),
            (("audience = \"weft\"", ""), "", "audience"),
            (
                ("", ""),
                "identity = \"spiffe://{trust_domain}/{sub}\"",
                "only for kind \"generic\"",
            ),
            (
                ("kind = \"kubernetes\"", "kind = \"generic\""),
                "",
                "needs an identity template",
            ),
            (
                ("kind = \"kubernetes\"", "kind = \"aws\""),
                "",
                "unknown variant",
            ),
            (
                ("cluster.local", "Cluster.Local"),
                "",
                "trust domain \"Cluster.Local\" is invalid",
            ),
            (("", ""), "tags = [\"k8s\"]", "tags look like `tag:NAME`"),
            (
                ("", ""),
                "max_token_age = \"soon\"",
                "max_token_age \"soon\" is not a duration",
            ),
            (("", ""), "jwks_url = \"https://x/jwks\"", "not both"),
            (
                ("audience = \"weft\"", "audience = \" \""),
                "",
                "audience is empty",
            ),
        ];
        for ((from, to), extra, expected) in cases {
            let err = entry_error(extra, (from, to));
            assert!(err.contains(expected), "{extra} {to}: {err}");
        }
        let generic = entry_error(
            "identity = \"spiffe://elsewhere/{sub}\"",
            ("kind = \"kubernetes\"", "kind = \"generic\""),
        );
        assert!(generic.contains("must start with"), "{generic}");
        let insecure = entry_error(
            "",
            (
                "jwks_file = \"/etc/weft/cluster-jwks.json\"",
                "jwks_url = \"http://jwks.example.com/keys\"",
            ),
        );
        assert!(insecure.contains("allow_insecure_issuer"), "{insecure}");
        let twice = format!(
            "{}{}",
            WORKLOADS,
            r#"
            [[workload_issuers]]
            issuer = "https://accounts.google.com"
            audience = "weft"
            kind = "github-actions"
            trust_domain = "x"
            "#
        );
        let err = parse(&twice)
            .unwrap()
            .resolve_workload_issuers()
            .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = parse("ephemeral_timeout = \"0s\"\n")
            .unwrap()
            .resolve_ephemeral_timeout()
            .unwrap_err();
        assert!(err.to_string().contains("at least one second"), "{err}");
    }
}
