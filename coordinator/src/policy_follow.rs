//! Following the policy in force from the store, so that a policy installed
//! through one coordinator replica (`policy set`, or its policy file)
//! reaches the nodes connected to every other replica.

use std::sync::Arc;

use crate::netmap::NetmapHandle;
use crate::policy_watch::{self, StoredPolicy, CURRENT_KEY};
use crate::store::{self, Store, Watch, WatchError};

/// Installs every valid policy `watch` (on [`CURRENT_KEY`], made before
/// `initial`, the source in force at start, was read) reports. A record that does not validate, which
/// only a newer coordinator version could write, leaves the policy as it is.
pub(crate) async fn follow(
    store: Arc<dyn Store>,
    mut watch: Watch,
    netmaps: NetmapHandle,
    mut initial: Option<String>,
) {
    loop {
        let stored = match watch.next().await {
            Ok(event) if event.key != CURRENT_KEY => continue,
            Ok(event) => match event.value {
                Some(value) => store::decode::<StoredPolicy>(CURRENT_KEY, &value).map(Some),
                None => Ok(None),
            },
            Err(WatchError::Lagged(_)) => policy_watch::last_good(&*store),
            Err(WatchError::Closed) => return,
        };
        let stored = match stored {
            Ok(Some(stored)) => stored,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("cannot read the policy in force: {e}");
                continue;
            }
        };
        if initial.as_deref() == Some(stored.source.as_str()) {
            continue;
        }
        match policy_watch::validate(&stored.source, &stored.file_name) {
            Ok(validated) => {
                tracing::info!(file = %stored.file_name, "installing the policy another coordinator put in force");
                netmaps.set_policy(Some(Arc::new(validated.policy))).await;
                initial = Some(stored.source);
            }
            Err(diagnostics) => {
                tracing::error!("ignoring a stored policy that does not validate:\n{diagnostics}");
            }
        }
    }
}
