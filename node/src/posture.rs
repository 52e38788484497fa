//! The attributes a node reports about itself, which posture rules in the
//! policy (`srcPosture`) decide on.
//!
//! weft reports `node:os`, `node:osVersion`, `node:clientVersion`,
//! `node:hostname` and, where the system tells, `node:diskEncrypted`
//! itself. An administrator's tooling (MDM, disk-encryption
//! checks) adds `custom:*` attributes by writing a JSON object of strings to
//! the posture file; [`watch`] re-reads it every [`POLL`] and publishes the
//! custom attributes whenever they change. Keys outside `custom:` are
//! refused with a warning and never sent: only weft itself may speak for
//! `node:*`. A file that cannot be read or parsed counts as empty, so a
//! broken file withdraws posture instead of keeping stale claims.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch as channel;

pub use weft_engine::posture::Attributes;

/// How often the posture file is re-read.
pub const POLL: Duration = Duration::from_secs(2);
/// The largest posture file read.
pub const MAX_FILE: u64 = 64 * 1024;
/// The prefix every key of the posture file must carry.
pub const CUSTOM_PREFIX: &str = "custom:";

/// Why the posture file was not used.
#[derive(Debug, thiserror::Error)]
pub enum PostureError {
    /// The file could not be read.
    #[error("cannot read the posture file {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        reason: String,
    },
    /// The file is over [`MAX_FILE`].
    #[error("the posture file {} is {size} bytes, over the {MAX_FILE}-byte limit; keep it to a few attributes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file is not a JSON object of strings.
    #[error("the posture file {} is not a JSON object of string values ({reason}); write e.g. {{\"custom:managed\": \"true\"}}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
}

/// The attributes weft reports on its own: OS, OS version, client version
/// and the host name the node asked for.
pub fn system_attributes(hostname: &str) -> Attributes {
    let mut attributes = BTreeMap::from([
        ("node:os".to_owned(), "linux".to_owned()),
        (
            "node:clientVersion".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        ("node:hostname".to_owned(), hostname.to_owned()),
    ]);
    if let Some(version) = os_version() {
        attributes.insert("node:osVersion".to_owned(), version);
    }
    if let Some(encrypted) = root_disk_encrypted() {
        attributes.insert("node:diskEncrypted".to_owned(), encrypted.to_string());
    }
    attributes
}

/// Whether the root filesystem lives on a dm-crypt (LUKS) device, directly
/// or below LVM. `None` where the system does not tell: a container's
/// overlay root, a network filesystem, or an unreadable `/sys`.
fn root_disk_encrypted() -> Option<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let source = root_source(&mountinfo)?;
    let device = std::fs::canonicalize(&source).ok()?;
    let name = device.file_name()?.to_str()?.to_owned();
    block_device_encrypted(Path::new("/sys/class/block"), &name, 0)
}

/// The device the root filesystem is mounted from, from `/proc/self/mountinfo`.
fn root_source(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        let source = right.split_whitespace().nth(1)?;
        (mount_point == "/" && source.starts_with("/dev/")).then(|| source.to_owned())
    })
}

/// Walks from a block device down its `slaves/` (LVM over LUKS, partitions
/// of a crypt device) looking for a device-mapper target whose UUID marks it
/// as dm-crypt.
fn block_device_encrypted(sys_block: &Path, name: &str, depth: u8) -> Option<bool> {
    const MAX_DEPTH: u8 = 8;
    let dir = sys_block.join(name);
    if !dir.exists() || depth > MAX_DEPTH {
        return None;
    }
    if let Ok(uuid) = std::fs::read_to_string(dir.join("dm/uuid")) {
        if uuid.starts_with("CRYPT-") {
            return Some(true);
        }
    }
    let slaves = std::fs::read_dir(dir.join("slaves"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let encrypted = slaves
        .iter()
        .any(|slave| block_device_encrypted(sys_block, slave, depth + 1) == Some(true));
    Some(encrypted)
}

/// Parses a posture file's contents: the `custom:*` attributes, and the keys
/// refused for lacking the prefix.
pub fn parse(path: &Path, contents: &[u8]) -> Result<(Attributes, Vec<String>), PostureError> {
    let object: BTreeMap<String, String> =
        serde_json::from_slice(contents).map_err(|e| PostureError::Malformed {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let (custom, refused): (Attributes, Attributes) = object
        .into_iter()
        .partition(|(key, _)| key.starts_with(CUSTOM_PREFIX) && key.len() > CUSTOM_PREFIX.len());
    Ok((custom, refused.into_keys().collect()))
}

/// Reads the posture file: no file means no custom attributes.
pub fn read(path: &Path) -> Result<Attributes, PostureError> {
    let read_error = |e: std::io::Error| PostureError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attributes::new()),
        Err(e) => return Err(read_error(e)),
    };
    if size > MAX_FILE {
        return Err(PostureError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    let contents = match std::fs::read(path) {
        Ok(contents) => contents,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attributes::new()),
        Err(e) => return Err(read_error(e)),
    };
    // The file may have grown between the two calls.
    if contents.len() as u64 > MAX_FILE {
        return Err(PostureError::TooLarge {
            path: path.to_path_buf(),
            size: contents.len() as u64,
        });
    }
    let (custom, refused) = parse(path, &contents)?;
    if !refused.is_empty() {
        tracing::warn!(
            "ignoring {} in the posture file {}: posture keys must start with `{CUSTOM_PREFIX}` (weft reports `node:*` itself)",
            refused.join(", "),
            path.display()
        );
    }
    Ok(custom)
}

/// Reads the posture file now and then every [`POLL`], publishing the
/// custom attributes when they change. Errors are logged once per distinct
/// error, and publish no attributes (fail closed).
pub fn watch(path: PathBuf) -> channel::Receiver<Attributes> {
    let (first, mut last_error) = load(&path, None);
    let (tx, rx) = channel::channel(first);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            let (attributes, error) = load(&path, last_error.as_deref());
            last_error = error;
            let changed = tx.send_if_modified(|current| {
                if *current == attributes {
                    return false;
                }
                *current = attributes;
                true
            });
            if changed {
                tracing::info!(path = %path.display(), "posture attributes changed");
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// Reads the file; on an error not already reported, logs it. Returns the
/// attributes and the error message in force.
fn load(path: &Path, reported: Option<&str>) -> (Attributes, Option<String>) {
    match read(path) {
        Ok(attributes) => (attributes, None),
        Err(e) => {
            let message = e.to_string();
            if reported != Some(message.as_str()) {
                tracing::warn!("{message}; reporting no custom posture attributes");
            }
            (Attributes::new(), Some(message))
        }
    }
}

/// `VERSION_ID` from `/etc/os-release`, or else the kernel release.
fn os_version() -> Option<String> {
    let from_release = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| os_release_version(&text));
    from_release.or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|release| release.trim().to_owned())
            .filter(|release| !release.is_empty())
    })
}

fn os_release_version(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("VERSION_ID=")?;
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_source_comes_from_mountinfo() {
        let mountinfo = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
";
        assert_eq!(
            root_source(mountinfo).as_deref(),
            Some("/dev/mapper/vg-root")
        );
        let container = "1 0 0:50 / / rw - overlay overlay rw,lowerdir=/a\n";
        assert_eq!(root_source(container), None);
    }

    #[test]
    fn dm_crypt_is_found_below_lvm() {
        let sys = tempfile::tempdir().unwrap();
        let block = |name: &str, uuid: Option<&str>, slaves: &[&str]| {
            let dir = sys.path().join(name);
            std::fs::create_dir_all(dir.join("slaves")).unwrap();
            if let Some(uuid) = uuid {
                std::fs::create_dir_all(dir.join("dm")).unwrap();
                std::fs::write(dir.join("dm/uuid"), uuid).unwrap();
            }
            for slave in slaves {
                std::fs::write(dir.join("slaves").join(slave), "").unwrap();
            }
        };
        block("sda", None, &[]);
        block("sda2", None, &[]);
        block("dm-0", Some("CRYPT-LUKS2-abc-luks"), &["sda2"]);
        block("dm-1", Some("LVM-xyz"), &["dm-0"]);
        block("dm-2", Some("LVM-plain"), &["sda"]);
        assert_eq!(block_device_encrypted(sys.path(), "dm-1", 0), Some(true));
        assert_eq!(block_device_encrypted(sys.path(), "dm-0", 0), Some(true));
        assert_eq!(block_device_encrypted(sys.path(), "dm-2", 0), Some(false));
        assert_eq!(block_device_encrypted(sys.path(), "sda2", 0), Some(false));
        assert_eq!(block_device_encrypted(sys.path(), "nvme9n9", 0), None);
    }

    #[test]
    fn only_custom_keys_are_kept() {
        let (custom, refused) = parse(
            Path::new("p.json"),
            br#"{"custom:managed": "true", "node:os": "windows", "custom:": "x", "team": "a"}"#,
        )
        .unwrap();
        assert_eq!(
            custom,
            Attributes::from([("custom:managed".to_owned(), "true".to_owned())])
        );
        assert_eq!(refused, vec!["custom:", "node:os", "team"]);
    }

    #[test]
    fn non_string_values_and_non_objects_are_refused_with_the_fix() {
        for bad in [&br#"{"custom:managed": true}"#[..], b"[1]", b"{"] {
            let err = parse(Path::new("/x/posture.json"), bad).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("/x/posture.json"), "{text}");
            assert!(text.contains("custom:managed"), "{text}");
        }
    }

    #[test]
    fn a_missing_file_is_empty_and_a_large_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("posture.json");
        assert!(read(&path).unwrap().is_empty());
        std::fs::write(&path, vec![b' '; MAX_FILE as usize + 1]).unwrap();
        assert!(matches!(read(&path), Err(PostureError::TooLarge { .. })));
        std::fs::write(&path, br#"{"custom:tier": "gold"}"#).unwrap();
        assert_eq!(read(&path).unwrap()["custom:tier"], "gold");
    }

    #[test]
    fn the_os_version_comes_from_version_id() {
        let text = "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n";
        assert_eq!(os_release_version(text).as_deref(), Some("12"));
        assert_eq!(os_release_version("ID=arch\n"), None);
        let attributes = system_attributes("web-1");
        assert_eq!(attributes["node:os"], "linux");
        assert_eq!(attributes["node:hostname"], "web-1");
        assert_eq!(attributes["node:clientVersion"], env!("CARGO_PKG_VERSION"));
        assert!(attributes.contains_key("node:osVersion"));
    }

    #[tokio::test]
    async fn changes_to_the_file_are_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("posture.json");
        let mut rx = watch(path.clone());
        assert!(rx.borrow().is_empty());
        std::fs::write(&path, br#"{"custom:managed": "true"}"#).unwrap();
        tokio::time::timeout(POLL * 3, rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update()["custom:managed"], "true");
        std::fs::write(&path, b"not json").unwrap();
        tokio::time::timeout(POLL * 3, rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(rx.borrow().is_empty(), "a broken file withdraws posture");
    }
}
