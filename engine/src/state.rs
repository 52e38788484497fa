//! The daemon's state directory: its two private keys and its preferences.
//!
//! ```text
//! STATE_DIR/            0700
//!   machine.key         0600  Noise key proving this machine to the coordinator
//!   node.key            0600  WireGuard key of the node's tunnels (rotated
//!                             by workloads at every re-authentication)
//!   prefs.json          0600  coordinator, its pinned key, hostname,
//!                             want_running, the identity token file's path
//!   netmap.signer       0600  the key the pinned coordinator signs netmaps with
//!   netmap.cache        0600  the last session's signed netmap records
//!                             ([`crate::netmap_cache`])
//! ```
//!
//! Neither the auth key nor a workload's identity token is ever stored: once
//! a machine has registered, its machine key is what lets it rejoin, so a
//! restarted node comes back as the same node with the same addresses.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_proto::{PrivateKey, PublicKey};

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {path}: {source} (weftd must run as root, or own the state directory; pass --state-dir to use another)")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A key file does not hold a key.
    #[error("{path} does not hold a weft private key (44 base64 characters); remove it to have weftd create a new key, which makes this machine a new node")]
    BadKey {
        /// The key file.
        path: PathBuf,
    },
    /// The preferences file is not valid.
    #[error("{path} is not valid: {reason}; fix or remove it (weftd then starts stopped until `weft up`)")]
    BadPrefs {
        /// The preferences file.
        path: PathBuf,
        /// What the parser found wrong.
        reason: String,
    },
}

/// What the operator asked for with `weft up`, kept so a restart rejoins on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefs {
    /// The coordinator's replicas, `HOST:PORT` each; a file from before
    /// replicas holds one string, which loads as a list of one.
    pub coordinator: crate::coordinators::Coordinators,
    /// The coordinator's pinned public key.
    #[serde(with = "crate::key_text")]
    pub coordinator_key: PublicKey,
    /// The hostname the node asks for.
    pub hostname: String,
    /// Whether the node should be connected: set by `weft up`, cleared by `weft down`.
    pub want_running: bool,
    /// The file the platform keeps the workload's identity token in; weftd
    /// re-reads it to re-authenticate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_token_file: Option<PathBuf>,
}

/// The daemon's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens the directory, creating it with mode 0700 if it does not exist.
    /// An existing directory keeps its mode (it may be shared, e.g. a
    /// mistaken `--state-dir /var/lib`); the key files in it are 0600
    /// either way, and a directory others can read is warned about.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|source| io_error("create", path, source))?;
        let mode = fs::metadata(path)
            .map_err(|source| io_error("inspect", path, source))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the state directory is accessible to other users; weft's key files in it are 0600, but a directory of its own with mode 0700 is safer"
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The Noise machine key, created on first use.
    pub fn machine_key(&self) -> Result<PrivateKey, StateError> {
        self.load_or_create_key("machine.key")
    }

    /// The WireGuard node key, created on first use.
    pub fn node_key(&self) -> Result<PrivateKey, StateError> {
        self.load_or_create_key("node.key")
    }

    /// Replaces the WireGuard node key after a rotation.
    pub fn save_node_key(&self, key: &PrivateKey) -> Result<(), StateError> {
        Ok(write_private(
            &self.path.join("node.key"),
            key.to_base64().as_bytes(),
        )?)
    }

    /// The saved preferences, or `None` before the first `weft up`.
    pub fn load_prefs(&self) -> Result<Option<Prefs>, StateError> {
        let path = self.path.join("prefs.json");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error("read", &path, source)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::BadPrefs {
                path,
                reason: e.to_string(),
            })
    }

    /// Saves the preferences, replacing the file atomically.
    pub fn save_prefs(&self, prefs: &Prefs) -> Result<(), StateError> {
        let path = self.path.join("prefs.json");
        let text = serde_json::to_string_pretty(prefs).map_err(|e| StateError::BadPrefs {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(write_private(&path, text.as_bytes())?)
    }

    fn load_or_create_key(&self, name: &str) -> Result<PrivateKey, StateError> {
        let path = self.path.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => PrivateKey::from_base64(&text).map_err(|_| StateError::BadKey { path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                write_private(&path, key.to_base64().as_bytes())?;
                tracing::info!(file = %path.display(), public = %key.public_key().short(), "created a new key");
                Ok(key)
            }
            Err(source) => Err(io_error("read", &path, source)),
        }
    }
}

/// Writes a file readable by its owner only, via a synced temporary file
/// and a rename, so a crash leaves the old file or the new one — never half
/// a key or a torn cache.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), WriteFailure> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let failed = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteFailure {
            action,
            path,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed("create", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(failed("write", &tmp))?;
    fs::rename(&tmp, path).map_err(failed("replace", path))
}

/// The step of [`write_private`] that failed.
#[derive(Debug)]
pub(crate) struct WriteFailure {
    pub(crate) action: &'static str,
    pub(crate) path: PathBuf,
    pub(crate) source: std::io::Error,
}

impl From<WriteFailure> for StateError {
    fn from(f: WriteFailure) -> Self {
        StateError::Io {
            action: f.action,
            path: f.path,
            source: f.source,
        }
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn an_existing_directory_keeps_its_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = StateDir::open(&shared).unwrap();
        assert_eq!(
            mode(&shared),
            0o755,
            "weftd must not chmod a directory it did not create"
        );
        dir.machine_key().unwrap();
        assert_eq!(mode(&shared.join("machine.key")), 0o600);
    }

    #[test]
    fn keys_are_created_private_and_reloaded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir_path = tmp.path().join("state");
        let dir = StateDir::open(&dir_path).unwrap();
        assert_eq!(mode(&dir_path), 0o700);

        let machine = dir.machine_key().unwrap();
        let node = dir.node_key().unwrap();
        assert_ne!(machine.public_key(), node.public_key());
        assert_eq!(mode(&dir_path.join("machine.key")), 0o600);
        assert_eq!(mode(&dir_path.join("node.key")), 0o600);

        let reopened = StateDir::open(&dir_path).unwrap();
        assert_eq!(
            reopened.machine_key().unwrap().public_key(),
            machine.public_key()
        );
        assert_eq!(reopened.node_key().unwrap().public_key(), node.public_key());

        let rotated = PrivateKey::generate();
        reopened.save_node_key(&rotated).unwrap();
        assert_eq!(mode(&dir_path.join("node.key")), 0o600);
        assert_eq!(dir.node_key().unwrap().public_key(), rotated.public_key());
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("node.key"), "not a key").unwrap();
        let err = dir.node_key().unwrap_err();
        assert!(matches!(err, StateError::BadKey { .. }));
        assert!(err.to_string().contains("remove it"));
    }

    #[test]
    fn prefs_round_trip_without_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        assert_eq!(dir.load_prefs().unwrap(), None);
        let prefs = Prefs {
            coordinator: "198.51.100.1:7443".parse().unwrap(),
            coordinator_key: PrivateKey::generate().public_key(),
            hostname: "web-1".into(),
            want_running: true,
            identity_token_file: Some("/var/run/secrets/weft/token".into()),
        };
        dir.save_prefs(&prefs).unwrap();
        assert_eq!(mode(&tmp.path().join("prefs.json")), 0o600);
        assert_eq!(dir.load_prefs().unwrap(), Some(prefs.clone()));
        let text = fs::read_to_string(tmp.path().join("prefs.json")).unwrap();
        assert!(text.contains(&prefs.coordinator_key.to_string()));
        assert!(!text.contains("auth"));
    }

    #[test]
    fn malformed_prefs_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("prefs.json"), "{\"coordinator\": 3}").unwrap();
        let err = dir.load_prefs().unwrap_err();
        assert!(err.to_string().contains("prefs.json"), "{err}");
    }

    #[test]
    fn prefs_naming_one_coordinator_load_as_a_list_of_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let key = PrivateKey::generate().public_key();
        let old = format!(
            "{{\"coordinator\": \"198.51.100.1:7443\", \"coordinator_key\": \"{key}\", \"hostname\": \"web-1\", \"want_running\": true}}"
        );
        fs::write(tmp.path().join("prefs.json"), old).unwrap();
        let prefs = dir.load_prefs().unwrap().unwrap();
        assert_eq!(prefs.coordinator.addresses().len(), 1);
        assert_eq!(prefs.coordinator.to_string(), "198.51.100.1:7443");
        dir.save_prefs(&prefs).unwrap();
        let text = fs::read_to_string(tmp.path().join("prefs.json")).unwrap();
        assert!(text.contains("[\n    \"198.51.100.1:7443\"\n  ]"), "{text}");
    }
}
