//! Pre-auth keys: creation, verification and single-use consumption.
//!
//! Only a SHA-256 hash of each key is stored, under the key's public id; the
//! secret itself is shown once, at creation. A single-use key is consumed in
//! the same compare-and-swap transaction that creates the node it admits, so
//! of any number of concurrent registrations exactly one succeeds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use weft_proto::{canonical, AuthKey, NodeId, Refusal, RefusalCode};

use crate::store::{self, Compare, Op, Store, StoreError};

/// What an operator asks for when creating a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuthKeySpec {
    /// `tag:NAME` tags given to every node the key admits.
    pub(crate) tags: Vec<String>,
    /// Whether the key may admit any number of nodes.
    pub(crate) reusable: bool,
    /// Whether the nodes it admits are removed once they go offline.
    pub(crate) ephemeral: bool,
    /// How long the key stays valid.
    pub(crate) expiry: Duration,
}

/// The stored form of a key: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuthKeyRecord {
    pub(crate) id: String,
    /// Hex SHA-256 of the whole key text.
    pub(crate) secret_sha256: String,
    pub(crate) tags: Vec<String>,
    pub(crate) reusable: bool,
    pub(crate) ephemeral: bool,
    /// Unix seconds.
    pub(crate) created: u64,
    /// Unix seconds after which the key admits nobody.
    pub(crate) expires: u64,
    /// The node a single-use key admitted.
    pub(crate) used_by: Option<NodeId>,
}

/// A key that passed verification, with the store revision it was read at.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub(crate) record: AuthKeyRecord,
    mod_revision: u64,
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    #[error("{0}")]
    BadTag(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a registration could not use a key: a refusal for the node, or a store failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    #[error("{}", .0.message)]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that `tag` has the form `tag:NAME`, NAME being letters, digits, `-` or `_`.
pub(crate) fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = tag.strip_prefix("tag:").is_some_and(|name| {
        name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid tag {tag:?}: tags look like `tag:NAME`, NAME being 1-63 letters, digits, `-` or `_` and starting with a letter or digit (e.g. `--tag tag:web`)"
        ))
    }
}

/// Creates and stores a new key; returns the secret and its record.
pub(crate) fn create(
    store: &dyn Store,
    spec: &AuthKeySpec,
    now: SystemTime,
) -> Result<(AuthKey, AuthKeyRecord), CreateError> {
    for tag in &spec.tags {
        validate_tag(tag).map_err(CreateError::BadTag)?;
    }
    let mut tags: Vec<String> = spec
        .tags
        .iter()
        .map(|t| canonical::tag(t).into_owned())
        .collect();
    tags.sort();
    tags.dedup();
    let created = unix_secs(now);
    loop {
        let key = AuthKey::generate();
        let Some(id) = key.id() else {
            return Err(StoreError::Backend("generated auth key has no id".into()).into());
        };
        let record = AuthKeyRecord {
            id: id.to_owned(),
            secret_sha256: hash(&key),
            tags: tags.clone(),
            reusable: spec.reusable,
            ephemeral: spec.ephemeral,
            created,
            expires: created.saturating_add(spec.expiry.as_secs()),
            used_by: None,
        };
        let path = key_path(id);
        match store.txn(
            &[Compare::Absent(path.clone())],
            &[Op::Put(path, store::encode(&record)?)],
        ) {
            Ok(_) => return Ok((key, record)),
            // A 48-bit id collided with an existing key: draw another.
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Looks `key` up and checks its secret, expiry and remaining uses.
pub(crate) fn admit(
    store: &dyn Store,
    key: &AuthKey,
    now: SystemTime,
) -> Result<Admission, AdmitError> {
    let Some(id) = key.id() else {
        return Err(refused(
            RefusalCode::AuthKeyInvalid,
            "the auth key is not in weft's format (`weft-auth-…`); create one with `weft-coordinator authkey create`".into(),
        ));
    };
    let Some((record, mod_revision)) = store::get_json::<AuthKeyRecord>(store, &key_path(id))?
    else {
        return Err(invalid(id));
    };
    let admission = Admission {
        record,
        mod_revision,
    };
    admission.check(key, now)?;
    Ok(admission)
}

impl Admission {
    fn check(&self, key: &AuthKey, now: SystemTime) -> Result<(), AdmitError> {
        let record = &self.record;
        let matches: bool = hash(key)
            .as_bytes()
            .ct_eq(record.secret_sha256.as_bytes())
            .into();
        if !matches {
            return Err(invalid(&record.id));
        }
        if unix_secs(now) >= record.expires {
            let at =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(record.expires));
            return Err(refused(
                RefusalCode::AuthKeyExpired,
                format!(
                    "auth key {} expired at {at}; create a new one with `weft-coordinator authkey create`",
                    record.id
                ),
            ));
        }
        if !record.reusable && record.used_by.is_some() {
            return Err(refused(
                RefusalCode::AuthKeyUsed,
                format!(
                    "auth key {} was single-use and has already admitted a node; create a new one with `weft-coordinator authkey create`",
                    record.id
                ),
            ));
        }
        Ok(())
    }

    /// The compares and writes that consume the key for `node`, to be part of
    /// the transaction that creates the node. Reusable keys need none.
    pub(crate) fn consume(&self, node: NodeId) -> Result<(Vec<Compare>, Vec<Op>), StoreError> {
        if self.record.reusable {
            return Ok((Vec::new(), Vec::new()));
        }
        let path = key_path(&self.record.id);
        let used = AuthKeyRecord {
            used_by: Some(node),
            ..self.record.clone()
        };
        Ok((
            vec![Compare::ModRevision(path.clone(), self.mod_revision)],
            vec![Op::Put(path, store::encode(&used)?)],
        ))
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn key_path(id: &str) -> String {
    format!("authkeys/{id}")
}

fn hash(key: &AuthKey) -> String {
    crate::audit::sha256_hex(key.expose_secret().as_bytes())
}

fn invalid(id: &str) -> AdmitError {
    refused(
        RefusalCode::AuthKeyInvalid,
        format!("auth key {id} is not one this coordinator issued; create one with `weft-coordinator authkey create`"),
    )
}

fn refused(code: RefusalCode, message: String) -> AdmitError {
    AdmitError::Refused(Refusal { code, message })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::RedbStore;

    fn open() -> (tempfile::TempDir, Arc<RedbStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        (dir, Arc::new(store))
    }

    fn spec(reusable: bool) -> AuthKeySpec {
        AuthKeySpec {
            tags: vec!["tag:web".into(), "tag:db".into(), "tag:Web".into()],
            reusable,
            ephemeral: false,
            expiry: Duration::from_secs(3600),
        }
    }

    fn code(err: AdmitError) -> RefusalCode {
        match err {
            AdmitError::Refused(r) => r.code,
            AdmitError::Store(e) => panic!("store error {e}"),
        }
    }

    #[test]
    fn a_created_key_is_admitted_and_only_its_hash_is_stored() {
        let (_dir, store) = open();
        let now = SystemTime::now();
        let (key, record) = create(&*store, &spec(false), now).unwrap();
        assert_eq!(record.tags, ["tag:db", "tag:web"]);
        let stored = store.get(&key_path(key.id().unwrap())).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&stored.value).contains(key.expose_secret()));
        let admission = admit(&*store, &key, now).unwrap();
        assert_eq!(admission.record, record);
    }

    #[test]
    fn a_wrong_secret_or_unknown_id_is_invalid_without_echoing_it() {
        let (_dir, store) = open();
        let (key, _) = create(&*store, &spec(false), SystemTime::now()).unwrap();
        let id = key.id().unwrap();
        let forged = AuthKey::new(format!("weft-auth-{id}-not-the-secret"));
        let err = admit(&*store, &forged, SystemTime::now()).unwrap_err();
        assert!(!err.to_string().contains("not-the-secret"));
        assert_eq!(code(err), RefusalCode::AuthKeyInvalid);
        let unknown = AuthKey::new("weft-auth-000000000000-whatever");
        assert_eq!(
            code(admit(&*store, &unknown, SystemTime::now()).unwrap_err()),
            RefusalCode::AuthKeyInvalid
        );
        let garbage = AuthKey::new("hunter2");
        let err = admit(&*store, &garbage, SystemTime::now()).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        assert_eq!(code(err), RefusalCode::AuthKeyInvalid);
    }

    #[test]
    fn an_expired_key_is_refused() {
        let (_dir, store) = open();
        let now = SystemTime::now();
        let (key, _) = create(&*store, &spec(true), now).unwrap();
        let later = now + Duration::from_secs(3601);
        let err = admit(&*store, &key, later).unwrap_err();
        assert!(err.to_string().contains("expired"));
        assert_eq!(code(err), RefusalCode::AuthKeyExpired);
    }

    #[test]
    fn malformed_tags_are_refused_with_the_expected_form() {
        let (_dir, store) = open();
        for bad in ["web", "tag:", "tag:-x", "tag:a b", "tag:é"] {
            let spec = AuthKeySpec {
                tags: vec![bad.into()],
                ..spec(false)
            };
            let err = create(&*store, &spec, SystemTime::now()).unwrap_err();
            assert!(err.to_string().contains("tag:NAME"), "{bad}: {err}");
        }
        assert_eq!(store.revision().unwrap(), 0);
    }

    #[test]
    fn a_single_use_key_is_consumed_by_exactly_one_of_many_threads() {
        let (_dir, store) = open();
        let (key, _) = create(&*store, &spec(false), SystemTime::now()).unwrap();
        let outcomes: Vec<Result<(), RefusalCode>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16u64)
                .map(|i| {
                    let store = Arc::clone(&store);
                    let key = key.clone();
                    s.spawn(move || loop {
                        let admission = admit(&*store, &key, SystemTime::now()).map_err(code)?;
                        let (compares, mut ops) = admission.consume(NodeId(i)).unwrap();
                        ops.push(Op::Put(format!("nodes/{i}"), b"{}".to_vec()));
                        match store.txn(&compares, &ops) {
                            Ok(_) => return Ok(()),
                            Err(StoreError::Conflict) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1);
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, Ok(()) | Err(RefusalCode::AuthKeyUsed))));
        assert_eq!(store.list("nodes/").unwrap().len(), 1);
    }

    #[test]
    fn a_reusable_key_admits_many() {
        let (_dir, store) = open();
        let (key, _) = create(&*store, &spec(true), SystemTime::now()).unwrap();
        for i in 0..3 {
            let admission = admit(&*store, &key, SystemTime::now()).unwrap();
            let (compares, ops) = admission.consume(NodeId(i)).unwrap();
            store.txn(&compares, &ops).unwrap();
        }
    }
}
