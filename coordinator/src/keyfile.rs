//! The data directory and the coordinator's Noise static key file in it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use weft_proto::PrivateKey;

/// The key file's name inside the data directory.
const KEY_FILE: &str = "coordinator.key";

/// Why the data directory or key file could not be used.
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
    /// The key file exists but does not hold a key.
    #[error("{} does not hold a coordinator key (44 characters of base64); restore it from a backup, or delete it to create a new key (every node would then need the new key pinned)", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
}

/// Creates the data directory (mode 0700) if it does not exist.
pub fn ensure_data_dir(dir: &Path) -> Result<(), KeyFileError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyFileError::Io {
            action: "create data directory",
            path: dir.to_owned(),
            source,
        })
}

/// The coordinator's key from `DATA_DIR/coordinator.key`, created (mode 0600) if absent.
pub fn load_or_create_key(data_dir: &Path) -> Result<PrivateKey, KeyFileError> {
    ensure_data_dir(data_dir)?;
    let path = data_dir.join(KEY_FILE);
    match read_key(&path) {
        Err(KeyFileError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
        other => return other,
    }
    let key = PrivateKey::generate();
    // Write a private temporary file, then link it into place: a concurrent
    // creator either wins the link or reads the winner's complete file.
    let tmp = data_dir.join(format!(".{KEY_FILE}.{}", std::process::id()));
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| KeyFileError::Io {
            action,
            path,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io("restrict", &tmp))?;
    writeln!(file, "{}", key.to_base64()).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("write", &tmp))?;
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read_key(&path),
        Err(e) => Err(io("create", &path)(e)),
    }
}

fn read_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    PrivateKey::from_base64(text.trim()).map_err(|_| KeyFileError::Malformed {
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = load_or_create_key(&data).unwrap();
        let second = load_or_create_key(&data).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        let mode = fs::metadata(data.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_corrupt_key_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), "secret-but-not-a-key").unwrap();
        let err = load_or_create_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains("coordinator.key"));
        assert!(!err.contains("secret-but-not-a-key"));
    }
}
