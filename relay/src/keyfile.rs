//! The relay's data directory and its static key file.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use weft_proto::PrivateKey;

const KEY_FILE: &str = "relay.key";

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file system refused.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exists but holds no key.
    #[error("{} does not hold a relay key (44 characters of base64); restore it from a backup, or delete it to create a new key (the coordinator's [[relays]] entry would then need the new key)", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
}

/// The relay's key from `DATA_DIR/relay.key`, created (mode 0600, directory
/// 0700) on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<PrivateKey, KeyFileError> {
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| KeyFileError::Io {
            action,
            path,
            source,
        }
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(io("create data directory", data_dir))?;
    let path = data_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            return PrivateKey::from_base64(text.trim())
                .map_err(|_| KeyFileError::Malformed { path })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", &path)(e)),
    }
    let key = PrivateKey::generate();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("create", &path))?;
    writeln!(file, "{}", key.to_base64()).map_err(io("write", &path))?;
    file.sync_all().map_err(io("write", &path))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn the_key_is_created_private_once_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("relay");
        let first = load_or_create_key(&data).unwrap();
        let mode = fs::metadata(data.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create_key(&data).unwrap().public_key(),
            first.public_key()
        );
        fs::write(data.join(KEY_FILE), "nope\n").unwrap();
        let err = load_or_create_key(&data).unwrap_err().to_string();
        assert!(err.contains("does not hold a relay key"), "{err}");
    }
}
