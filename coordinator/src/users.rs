//! People who log in through the identity provider, and the administrator's
//! switch that locks one out.

use serde::{Deserialize, Serialize};
use weft_proto::{canonical, Refusal, RefusalCode};

use crate::authkey::AdmitError;
use crate::store::{self, Op, Store, StoreError};

/// A user as stored. Absent means enabled: users are known from their logins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UserRecord {
    pub(crate) disabled: bool,
}

/// Refuses a disabled user.
pub(crate) fn check_enabled(store: &dyn Store, email: &str) -> Result<(), AdmitError> {
    match store::get_json::<UserRecord>(store, &user_path(email))? {
        Some((record, _)) if record.disabled => Err(AdmitError::Refused(Refusal {
            code: RefusalCode::UserDisabled,
            message: "this device's user was disabled by an administrator; ask them to re-enable the account".into(),
        })),
        _ => Ok(()),
    }
}

/// Marks `email` disabled (or enabled again).
pub(crate) fn set_disabled(
    store: &dyn Store,
    email: &str,
    disabled: bool,
) -> Result<(), StoreError> {
    let op = Op::Put(user_path(email), store::encode(&UserRecord { disabled })?);
    store.txn(&[], &[op]).map(|_| ())
}

/// Emails are case-insensitive in practice; store them in canonical form.
fn user_path(email: &str) -> String {
    format!("users/{}", canonical::email(email.trim()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::RedbStore;

    #[test]
    fn a_disabled_user_is_refused_until_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("weft.redb")).unwrap());
        assert!(check_enabled(&*store, "alice@example.com").is_ok());
        set_disabled(&*store, "Alice@Example.com", true).unwrap();
        let Err(AdmitError::Refused(refusal)) = check_enabled(&*store, "alice@example.com") else {
            panic!("not refused");
        };
        assert_eq!(refusal.code, RefusalCode::UserDisabled);
        set_disabled(&*store, "alice@example.com", false).unwrap();
        assert!(check_enabled(&*store, "alice@example.com").is_ok());
    }
}
