//! Following the policy in force from the store, so that a policy installed
//! through one coordinator replica (`policy set`, or its policy file)
//! reaches the nodes connected to every other replica.

use std::sync::Arc;

use weft_policy::Roles;

use crate::netmap::NetmapHandle;
use crate::policy_watch::{self, InForce, CURRENT_KEY};
use crate::store::{Store, Watch, WatchError};

/// Installs every valid policy `watch` (on [`CURRENT_KEY`], made before
/// `in_force` was first read) reports, unless this coordinator installed it
/// already. A record that does not validate, which only a newer coordinator
/// version could write, leaves the policy as it is.
///
/// An event only says that the policy changed: what is installed is the
/// policy in force *now*. Events arrive after the writes they report, so
/// installing an event's own value would put an older policy back in force
/// for a moment whenever this coordinator installed two in quick succession
/// (a file saved twice), undoing the newer one until its own event came.
pub(crate) async fn follow(
    store: Arc<dyn Store>,
    mut watch: Watch,
    netmaps: NetmapHandle,
    in_force: InForce,
    roles: Arc<Roles>,
) {
    loop {
        match watch.next().await {
            Ok(event) if event.key != CURRENT_KEY => continue,
            Ok(_) | Err(WatchError::Lagged(_)) => {}
            Err(WatchError::Closed) => return,
        }
        let reading = store.clone();
        let stored =
            match tokio::task::spawn_blocking(move || policy_watch::last_good(&*reading)).await {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::error!("reading the policy in force failed: {e}");
                    continue;
                }
            };
        let stored = match stored {
            Ok(Some(stored)) => stored,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("cannot read the policy in force: {e}");
                continue;
            }
        };
        match policy_watch::validate(&stored.source, &stored.file_name, &roles) {
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Mutex, PoisonError};
    use std::time::Duration;

    use super::*;
    use crate::nodes::Registry;
    use crate::policy_watch::StoredPolicy;
    use crate::store::RedbStore;

    /// Collects what the code under test logs.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn stored(version: u32) -> StoredPolicy {
        StoredPolicy {
            file_name: "policy.hujson".into(),
            source: format!("// version {version}\n{{}}"),
        }
    }

    /// This coordinator installed two policies before their echoes came
    /// back: neither echo may put anything back in force.
    #[tokio::test(flavor = "current_thread")]
    async fn late_echoes_of_own_policies_change_nothing() {
        let log = Log::default();
        let writer = log.clone();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let watch = store.watch(CURRENT_KEY);
        let (netmaps, _netmap) = NetmapHandle::spawn(
            Registry::open(store.clone()).unwrap(),
            None,
            Duration::from_secs(60),
        )
        .unwrap();
        let in_force = InForce::new(None);
        for version in [1, 2] {
            policy_watch::remember(&*store, &stored(version)).unwrap();
            assert!(in_force.claim(&stored(version).source));
        }
        let follower = tokio::spawn(follow(
            store.clone(),
            watch,
            netmaps,
            in_force.clone(),
            Arc::default(),
        ));
        let logged = || {
            let text = log.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&text)
                .matches("another coordinator")
                .count()
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            logged(),
            0,
            "an echo of this coordinator's own policy was installed"
        );
        assert!(
            !in_force.claim(&stored(2).source),
            "the newest stays in force"
        );

        // A policy another coordinator stored is installed, once.
        policy_watch::remember(&*store, &stored(3)).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(logged(), 1);
        assert!(!in_force.claim(&stored(3).source));
        follower.abort();
    }
}
