//! The static key files of coordinators and relays: `DATA_DIR/NAME`,
//! created on first use with mode 0600 in a directory of mode 0700.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use weft_proto::PrivateKey;

/// Whose key a file holds, for its name and for what an operator is told
/// when it is damaged.
#[derive(Debug, Clone, Copy)]
pub struct KeyFile {
    /// The file's name inside the data directory.
    pub name: &'static str,
    /// Whose key it is ("coordinator", "relay").
    pub owner: &'static str,
    /// What replacing the key means for others, said when the file is damaged.
    pub if_replaced: &'static str,
}

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
    #[error("{} does not hold a {} key (44 characters of base64); restore it from a backup, or delete it to create a new key ({})", path.display(), file.owner, file.if_replaced)]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// Whose key it should hold.
        file: KeyFile,
    },
}

/// Creates the data directory (mode 0700) if it does not exist.
pub fn ensure_data_dir(dir: &Path) -> Result<(), KeyFileError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create data directory", dir))
}

/// The key in `data_dir`'s `file`, created (mode 0600, directory 0700) if
/// absent.
pub fn load_or_create(data_dir: &Path, file: KeyFile) -> Result<PrivateKey, KeyFileError> {
    ensure_data_dir(data_dir)?;
    let path = data_dir.join(file.name);
    match read_key(&path, file) {
        Err(KeyFileError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
        other => return other,
    }
    let key = PrivateKey::generate();
    // Write a private temporary file, then link it into place: a concurrent
    // creator either wins the link or reads the winner's complete file.
    let tmp = data_dir.join(format!(".{}.{}", file.name, std::process::id()));
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io("restrict", &tmp))?;
    writeln!(out, "{}", key.to_base64()).map_err(io("write", &tmp))?;
    out.sync_all().map_err(io("write", &tmp))?;
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read_key(&path, file),
        Err(e) => Err(io("create", &path)(e)),
    }
}

fn read_key(path: &Path, file: KeyFile) -> Result<PrivateKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(io("read", path))?;
    PrivateKey::from_base64(text.trim()).map_err(|_| KeyFileError::Malformed {
        path: path.to_owned(),
        file,
    })
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError {
    let path = path.to_owned();
    move |source| KeyFileError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: KeyFile = KeyFile {
        name: "test.key",
        owner: "test",
        if_replaced: "nobody minds",
    };

    #[test]
    fn the_key_is_created_once_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = load_or_create(&data, FILE).unwrap();
        let second = load_or_create(&data, FILE).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        let mode = fs::metadata(data.join(FILE.name))
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
        fs::write(dir.path().join(FILE.name), "secret-but-not-a-key").unwrap();
        let err = load_or_create(dir.path(), FILE).unwrap_err().to_string();
        assert!(err.contains("test.key"), "{err}");
        assert!(err.contains("does not hold a test key"), "{err}");
        assert!(err.contains("nobody minds"), "{err}");
        assert!(!err.contains("secret-but-not-a-key"), "{err}");
    }
}
