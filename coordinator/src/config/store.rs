//! The `[store]` section: where the coordinator keeps its state.
//!
//! ```toml
//! [store]
//! kind = "etcd"
//! endpoints = ["https://etcd-1.example.com:2379", "https://etcd-2.example.com:2379"]
//! prefix = "/weft/"
//! tls = { ca_file = "/etc/weft/etcd-ca.pem", cert_file = "/etc/weft/etcd.pem", key_file = "/etc/weft/etcd-key.pem" }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Every key lives under this prefix unless configured.
const DEFAULT_PREFIX: &str = "/weft/";
/// How long connecting to etcd may take, unless configured.
const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one etcd request may take, unless configured.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The `[store]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFileConfig {
    /// `embedded` (redb under the data directory, the default) or `etcd`.
    #[serde(default)]
    pub kind: StoreKind,
    /// etcd client URLs (`http://HOST:PORT` or `https://HOST:PORT`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The key prefix weft's keys live under; default `/weft/`.
    pub prefix: Option<String>,
    /// TLS towards etcd; required with `https://` endpoints.
    pub tls: Option<EtcdTlsFileConfig>,
    /// The etcd user to authenticate as.
    pub username: Option<String>,
    /// A file holding that user's password (one line).
    pub password_file: Option<PathBuf>,
    /// How long connecting may take (`5s`, `500ms`).
    pub dial_timeout: Option<String>,
    /// How long one request may take before the store reports etcd unreachable.
    pub request_timeout: Option<String>,
}

/// Which backend holds the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A redb file in the data directory.
    #[default]
    Embedded,
    /// An etcd cluster.
    Etcd,
}

/// The `[store.tls]` table as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsFileConfig {
    /// The CA certificate(s) (PEM) that signed etcd's server certificates.
    pub ca_file: PathBuf,
    /// A client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
}

/// Where the coordinator keeps its state, checked and with its files read.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StoreSettings {
    /// A redb file in the data directory.
    #[default]
    Embedded,
    /// An etcd cluster.
    Etcd(EtcdSettings),
}

/// How to reach etcd.
#[derive(Clone, PartialEq)]
pub struct EtcdSettings {
    /// Client URLs, all `http://` or all `https://`.
    pub endpoints: Vec<String>,
    /// The key prefix (non-empty).
    pub prefix: String,
    /// TLS material, with `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// User name and password. The password is never logged.
    pub user: Option<(String, String)>,
    /// Bound on connecting.
    pub dial_timeout: Duration,
    /// Bound on every request.
    pub request_timeout: Duration,
}

/// PEM-encoded TLS material for etcd connections.
#[derive(Clone, PartialEq)]
pub struct EtcdTls {
    /// The CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// A client certificate and its private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdSettings {
    /// Plain-HTTP endpoints with the default prefix and timeouts.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.into(),
            tls: None,
            user: None,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl StoreFileConfig {
    /// Checks the section and reads the files it names.
    pub fn resolve(&self) -> Result<StoreSettings, ConfigError> {
        match self.kind {
            StoreKind::Embedded => {
                let stray = self.etcd_keys_set();
                if stray.is_empty() {
                    Ok(StoreSettings::Embedded)
                } else {
                    Err(invalid(format!(
                        "[store] {} only apply to kind = \"etcd\"; set kind = \"etcd\" or remove them",
                        stray.join(", ")
                    )))
                }
            }
            StoreKind::Etcd => self.resolve_etcd().map(StoreSettings::Etcd),
        }
    }

    fn etcd_keys_set(&self) -> Vec<&'static str> {
        [
            ("endpoints", !self.endpoints.is_empty()),
            ("prefix", self.prefix.is_some()),
            ("tls", self.tls.is_some()),
            ("username", self.username.is_some()),
            ("password_file", self.password_file.is_some()),
            ("dial_timeout", self.dial_timeout.is_some()),
            ("request_timeout", self.request_timeout.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    fn resolve_etcd(&self) -> Result<EtcdSettings, ConfigError> {
        if self.endpoints.is_empty() {
            return Err(invalid(
                "[store] kind = \"etcd\" needs endpoints, e.g. endpoints = [\"http://127.0.0.1:2379\"]",
            ));
        }
        let mut secure = None;
        for endpoint in &self.endpoints {
            let https = check_endpoint(endpoint)?;
            if secure.is_some_and(|s| s != https) {
                return Err(invalid(
                    "[store] endpoints mix http:// and https://; use one scheme for every member",
                ));
            }
            secure = Some(https);
        }
        let tls = match (&self.tls, secure == Some(true)) {
            (Some(tls), true) => Some(tls.read()?),
            (None, false) => None,
            (Some(_), false) => {
                return Err(invalid(
                    "[store] tls is set but the endpoints are http://; write them as https://",
                ))
            }
            (None, true) => {
                return Err(invalid(
                    "[store] endpoints are https:// but [store] tls is missing; set tls = { ca_file = \"…\" } to the CA that signed etcd's certificates",
                ))
            }
        };
        let prefix = self.prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.into());
        if prefix.is_empty() {
            return Err(invalid(
                "[store] prefix is empty; weft's keys need a prefix of their own, e.g. \"/weft/\"",
            ));
        }
        let user = match (&self.username, &self.password_file) {
            (None, None) => None,
            (Some(name), Some(file)) if !name.is_empty() => {
                Some((name.clone(), read_secret(file, "password_file")?))
            }
            (Some(_), Some(_)) => return Err(invalid("[store] username is empty")),
            (Some(_), None) => {
                return Err(invalid(
                    "[store] username needs password_file, a file holding the user's password",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "[store] password_file needs username, the etcd user it belongs to",
                ))
            }
        };
        Ok(EtcdSettings {
            endpoints: self
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            prefix,
            tls,
            user,
            dial_timeout: duration("dial_timeout", self.dial_timeout.as_deref())?
                .unwrap_or(DEFAULT_DIAL_TIMEOUT),
            request_timeout: duration("request_timeout", self.request_timeout.as_deref())?
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        })
    }
}

impl EtcdTlsFileConfig {
    fn read(&self) -> Result<EtcdTls, ConfigError> {
        let ca_pem = read_file(&self.ca_file, "tls.ca_file")?;
        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read_file(cert, "tls.cert_file")?,
                read_file(key, "tls.key_file")?,
            )),
            _ => {
                return Err(invalid(
                    "[store] tls.cert_file and tls.key_file go together; set both for a client certificate, or neither",
                ))
            }
        };
        Ok(EtcdTls { ca_pem, identity })
    }
}

/// Whether `endpoint` is an `https://` URL; an error unless it is `http(s)://HOST:PORT`.
fn check_endpoint(endpoint: &str) -> Result<bool, ConfigError> {
    let url = url::Url::parse(endpoint).map_err(|e| {
        invalid(format!(
            "[store] endpoint {endpoint:?} is not a URL ({e}); write it as http://HOST:2379"
        ))
    })?;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => {
            return Err(invalid(format!(
                "[store] endpoint {endpoint:?} has scheme {other:?}; use http:// or https://"
            )))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: the URL holds a credential.
        return Err(invalid(
            "[store] an endpoint carries credentials; put them in username and password_file",
        ));
    }
    if url.host().is_none() || url.port_or_known_default().is_none() {
        return Err(invalid(format!(
            "[store] endpoint {endpoint:?} needs a host, e.g. http://127.0.0.1:2379"
        )));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(invalid(format!(
            "[store] endpoint {endpoint:?} must be just scheme, host and port"
        )));
    }
    Ok(https)
}

fn duration(key: &str, text: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let value = humantime::parse_duration(text).map_err(|e| {
        invalid(format!(
            "[store] {key} {text:?} is not a duration ({e}); write e.g. \"5s\" or \"500ms\""
        ))
    })?;
    if value.is_zero() {
        return Err(invalid(format!("[store] {key} must be longer than zero")));
    }
    Ok(Some(value))
}

fn read_file(path: &Path, key: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| invalid(format!("cannot read [store] {key} {}: {e}", path.display())))
}

fn read_secret(path: &Path, key: &str) -> Result<String, ConfigError> {
    let text = String::from_utf8(read_file(path, key)?).map_err(|_| {
        invalid(format!(
            "[store] {key} {} is not UTF-8 text",
            path.display()
        ))
    })?;
    let secret = text.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        return Err(invalid(format!(
            "[store] {key} {} is empty; put the password in it",
            path.display()
        )));
    }
    Ok(secret)
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StoreFileConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wrapper {
            store: StoreFileConfig,
        }
        toml::from_str::<Wrapper>(text)
            .map(|w| w.store)
            .map_err(|e| e.to_string())
    }

    fn resolve(text: &str) -> Result<StoreSettings, String> {
        parse(text)?.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn embedded_is_the_default() {
        assert_eq!(resolve("[store]\n").unwrap(), StoreSettings::Embedded);
        assert_eq!(
            resolve("[store]\nkind = \"embedded\"\n").unwrap(),
            StoreSettings::Embedded
        );
        let err = resolve("[store]\nendpoints = [\"http://127.0.0.1:2379\"]\n").unwrap_err();
        assert!(
            err.contains("endpoints") && err.contains("kind = \"etcd\""),
            "{err}"
        );
    }

    #[test]
    fn an_etcd_section_resolves_with_defaults_and_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "hunter2\n").unwrap();
        let text = format!(
            "[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379/\", \"http://127.0.0.1:22379\"]\n\
             username = \"weft\"\npassword_file = {:?}\nrequest_timeout = \"2s\"\n",
            password.display().to_string()
        );
        let StoreSettings::Etcd(etcd) = resolve(&text).unwrap() else {
            panic!("expected etcd settings");
        };
        assert_eq!(
            etcd.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
        );
        assert_eq!(etcd.prefix, DEFAULT_PREFIX);
        assert_eq!(etcd.user, Some(("weft".into(), "hunter2".into())));
        assert_eq!(etcd.dial_timeout, DEFAULT_DIAL_TIMEOUT);
        assert_eq!(etcd.request_timeout, Duration::from_secs(2));
        assert!(!format!("{etcd:?}").contains("hunter2"));
    }

    #[test]
    fn tls_material_is_read_and_must_match_the_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "CA").unwrap();
        let text = format!(
            "[store]\nkind = \"etcd\"\nendpoints = [\"https://etcd.example.com:2379\"]\ntls = {{ ca_file = {:?} }}\n",
            ca.display().to_string()
        );
        let StoreSettings::Etcd(etcd) = resolve(&text).unwrap() else {
            panic!("expected etcd settings");
        };
        assert_eq!(etcd.tls.unwrap().ca_pem, b"CA");
        let err = resolve(&text.replace("https://", "http://")).unwrap_err();
        assert!(err.contains("https://"), "{err}");
        let err =
            resolve("[store]\nkind = \"etcd\"\nendpoints = [\"https://etcd.example.com:2379\"]\n")
                .unwrap_err();
        assert!(err.contains("ca_file"), "{err}");
        let err = resolve(&text.replace("ca.pem", "missing.pem")).unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let etcd = |rest: &str| {
            resolve(&format!(
                "[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n{rest}"
            ))
            .unwrap_err()
        };
        assert!(etcd("prefix = \"\"\n").contains("prefix"));
        assert!(etcd("dial_timeout = \"soon\"\n").contains("dial_timeout"));
        assert!(etcd("request_timeout = \"0s\"\n").contains("request_timeout"));
        assert!(etcd("username = \"weft\"\n").contains("password_file"));
        assert!(etcd("password_file = \"/nonexistent\"\n").contains("username"));
        let err = resolve("[store]\nkind = \"etcd\"\n").unwrap_err();
        assert!(err.contains("endpoints"), "{err}");
        for endpoint in ["127.0.0.1:2379", "grpc://h:1", "http://h:1/v3", "http://:1"] {
            let err = resolve(&format!(
                "[store]\nkind = \"etcd\"\nendpoints = [{endpoint:?}]\n"
            ))
            .unwrap_err();
            assert!(err.contains(endpoint), "{err}");
        }
        let err = resolve("[store]\nkind = \"etcd\"\nendpoints = [\"http://weft:s3cret@h:1\"]\n")
            .unwrap_err();
        assert!(
            err.contains("credentials") && !err.contains("s3cret"),
            "{err}"
        );
        let err = resolve("[store]\nkind = \"zookeeper\"\n").unwrap_err();
        assert!(err.contains("zookeeper") || err.contains("kind"), "{err}");
        let err = resolve("[store]\nkind = \"etcd\"\nendpoint = [\"http://h:1\"]\n").unwrap_err();
        assert!(err.contains("endpoint"), "{err}");
    }
}
