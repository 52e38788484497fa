//! Following the policy in force from the store, so that a policy installed
//! through one coordinator replica (`policy set`, or its policy file)
//! reaches the nodes connected to every other replica.

use std::sync::Arc;

use crate::netmap::NetmapHandle;
use crate::policy_watch::{self, InForce, StoredPolicy, CURRENT_KEY};
use crate::store::{self, Store, Watch, WatchError};

/// Installs every valid policy `watch` (on [`CURRENT_KEY`], made before
/// `in_force` was first read) reports, unless this coordinator installed it
/// already. A record that does not validate, which only a newer coordinator
/// version could write, leaves the policy as it is.
pub(crate) async fn follow(
    store: Arc<dyn Store>,
    mut watch: Watch,
    netmaps: NetmapHandle,
    in_force: InForce,
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
        match policy_watch::validate(&stored.source, &stored.file_name) {
            Ok(validated) => {
                if in_force.claim(&stored.source) {
                    tracing::info!(file = %stored.file_name, "installing the policy another coordinator put in force");
                    netmaps.set_policy(Some(Arc::new(validated.policy))).await;
                }
            }
            Err(diagnostics) => {
                tracing::error!("ignoring a stored policy that does not validate:\n{diagnostics}");
            }
        }
    }
}
