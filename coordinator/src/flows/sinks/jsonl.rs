//! The JSON lines sink: one line per record, as `flows --json` prints one
//! (and per audit entry, as `audit --json` prints one), appended to a file.
//!
//! The file is opened for each delivery, so external rotation needs no
//! signal: once logrotate (without `copytruncate`) or a shipper moves the
//! file away, the next delivery creates a new one. The file is created
//! with mode 0600.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use super::{Item, SinkError};

#[derive(Debug)]
pub(super) struct Jsonl {
    path: PathBuf,
}

impl Jsonl {
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(super) async fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let mut bytes = Vec::new();
        for item in items {
            bytes.extend_from_slice(item.json()?.as_bytes());
            bytes.push(b'\n');
        }
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut file| file.write_all(&bytes))
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        written.map_err(|source| SinkError::File {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Arc;

    use super::super::tests::view;
    use super::*;
    use crate::flows::FlowView;

    #[tokio::test]
    async fn records_are_appended_one_per_line_and_survive_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let mut sink = Jsonl::new(path.clone());
        let items = [Item::Flow(Arc::new(view())), Item::Flow(Arc::new(view()))];
        sink.deliver(&items).await.unwrap();
        std::fs::rename(&path, dir.path().join("flows.jsonl.1")).unwrap();
        sink.deliver(&items[..1]).await.unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("flows.jsonl.1")).unwrap();
        let lines: Vec<FlowView> = rotated
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, [view(), view()]);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn an_unwritable_path_is_an_error_naming_it() {
        let mut sink = Jsonl::new("/nonexistent-dir/flows.jsonl".into());
        let err = sink
            .deliver(&[Item::Flow(Arc::new(view()))])
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/flows.jsonl"),
            "{err}"
        );
    }
}
