//! A [`Store`] that counts its backend's failures for the metrics
//! ([`crate::metrics::store_error`]), whichever backend it wraps.

use std::time::Duration;

use super::{Compare, LeaseId, Op, Store, StoreError, Versioned, Watch};
use crate::metrics;

/// Passes every call through to `S`, counting the errors.
#[derive(Debug)]
pub(crate) struct Counted<S>(pub(crate) S);

fn counted<T>(result: Result<T, StoreError>) -> Result<T, StoreError> {
    if let Err(error) = &result {
        metrics::store_error(error);
    }
    result
}

impl<S: Store> Store for Counted<S> {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        counted(self.0.get(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        counted(self.0.list(prefix))
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<u64, StoreError> {
        counted(self.0.txn(compares, ops))
    }

    fn watch(&self, prefix: &str) -> Watch {
        self.0.watch(prefix)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        counted(self.0.revision())
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        counted(self.0.grant_lease(ttl))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        counted(self.0.keep_alive(lease))
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        counted(self.0.revoke_lease(lease))
    }
}
