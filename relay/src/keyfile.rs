//! The relay's static key file in its data directory.

use std::path::Path;

use weft_net::keyfile::{self, KeyFile, KeyFileError};
use weft_proto::PrivateKey;

const KEY_FILE: KeyFile = KeyFile {
    name: "relay.key",
    owner: "relay",
    if_replaced: "the coordinator's [[relays]] entry would then need the new key",
};

/// The relay's key from `DATA_DIR/relay.key`, created (mode 0600, directory
/// 0700) on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<PrivateKey, KeyFileError> {
    keyfile::load_or_create(data_dir, KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_key_file_names_the_relay_and_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("relay.key"), "nope\n").unwrap();
        let err = load_or_create_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not hold a relay key"), "{err}");
        assert!(err.contains("[[relays]]"), "{err}");
    }
}
