//! The coordinator's Noise static key file in its data directory.

use std::path::Path;

use weft_net::keyfile::{self, KeyFile};
pub use weft_net::keyfile::{ensure_data_dir, KeyFileError};
use weft_proto::PrivateKey;

const KEY_FILE: KeyFile = KeyFile {
    name: "coordinator.key",
    owner: "coordinator",
    if_replaced: "every node would then need the new key pinned",
};

/// The coordinator's key from `DATA_DIR/coordinator.key`, created (mode
/// 0600, directory 0700) if absent.
pub fn load_or_create_key(data_dir: &Path) -> Result<PrivateKey, KeyFileError> {
    keyfile::load_or_create(data_dir, KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_key_file_names_the_coordinator_and_the_pinned_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("coordinator.key"), "secret-but-not-a-key").unwrap();
        let err = load_or_create_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains("coordinator.key"), "{err}");
        assert!(err.contains("does not hold a coordinator key"), "{err}");
        assert!(err.contains("new key pinned"), "{err}");
        assert!(!err.contains("secret-but-not-a-key"), "{err}");
    }
}
