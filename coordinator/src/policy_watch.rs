//! Loading the policy file, and following its changes.
//!
//! The file is polled by path, so a change is seen however an editor writes
//! it (in place, or by renaming a new file over it). An invalid file never
//! replaces a valid policy: its diagnostics go to the log and the policy in
//! force stays.
//!
//! Every path that installs a policy (this file at start and on change,
//! `policy set`) holds it to one budget: at most [`MAX_POLICY_BYTES`] of
//! text, and no node's netmap over [`crate::netmap::NETMAP_BUDGET`].
//!
//! Every installed policy is also written to the store, so the policy in
//! force survives a restart: a coordinator that restarts while the file holds
//! a broken edit keeps serving the last good policy instead of refusing to
//! start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use weft_policy::{Diagnostics, Policy, Role, Roles, TestReport};

use crate::audit::{self, Actor, Event};
use crate::metrics::{self, PolicyResult};
use crate::netmap::{NetmapHandle, OverBudget};
use crate::store::{self, Compare, Op, Store, StoreError};

/// The largest policy accepted, from a file or through `policy set`: room
/// for some 100,000 rules, while parsing one stays within a few hundred
/// megabytes of memory.
pub(crate) const MAX_POLICY_BYTES: usize = 8 << 20;

/// Where the policy in force is kept.
pub(crate) const CURRENT_KEY: &str = "policy/current";

/// What every path that installs a policy judges it by.
#[derive(Debug, Clone, Default)]
pub(crate) struct Context {
    /// Who the role autogroups (`autogroup:admin`, …) stand for: the
    /// `[roles]` setting.
    pub(crate) roles: Arc<Roles>,
    /// Principals a new policy must not cut off (see
    /// [`crate::netmap::Lockout`]): the `--admin` principals and the
    /// members of the `admin` role.
    pub(crate) admins: Arc<[String]>,
}

impl Context {
    pub(crate) fn new(roles: Roles, mut admins: Vec<String>) -> Self {
        for member in roles.members(Role::Admin) {
            if !admins.contains(&member) {
                admins.push(member);
            }
        }
        Self {
            roles: Arc::new(roles),
            admins: admins.into(),
        }
    }
}

/// The policy in force, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredPolicy {
    /// The name diagnostics use (the file it came from).
    pub(crate) file_name: String,
    /// The policy text.
    pub(crate) source: String,
}

/// The source of the policy this coordinator last installed. A policy
/// reaches it twice — from where it was given (file or admin API) and back
/// through the store's watch — and is compiled only the first time.
#[derive(Debug, Clone, Default)]
pub(crate) struct InForce(Arc<std::sync::Mutex<Option<String>>>);

impl InForce {
    pub(crate) fn new(source: Option<String>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(source)))
    }

    /// Records `source` as installed; false when it already was, so the
    /// caller need not install it again.
    pub(crate) fn claim(&self, source: &str) -> bool {
        let mut current = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.as_deref() == Some(source) {
            return false;
        }
        *current = Some(source.to_owned());
        true
    }
}

/// Policies with more rules than this are installed without the
/// access-change summary in their audit entry: the comparison goes over
/// every pair of identities the policies name, which for tens of
/// thousands of rules would hold the install up for minutes.
const DIFF_SUMMARY_MAX_RULES: usize = 1_000;

/// Records `policy` as the policy in force.
pub(crate) fn remember(store: &dyn Store, policy: &StoredPolicy) -> Result<(), StoreError> {
    store
        .txn(&[], &[Op::Put(CURRENT_KEY.into(), store::encode(policy)?)])
        .map(drop)
}

/// Puts `stored`, which compiled to `policy`, in force. Unless it is the
/// policy in force already, its audit entry (by `actor`, with the policy's
/// hash and what it changes in access) is written in the same transaction:
/// no policy is ever in force without its entry.
pub(crate) fn install(
    store: &dyn Store,
    stored: &StoredPolicy,
    policy: &Policy,
    roles: &Roles,
    actor: &Actor,
    forced: bool,
    now: SystemTime,
) -> Result<(), StoreError> {
    if last_good(store)?.is_some_and(|old| old.source == stored.source) {
        return remember(store, stored);
    }
    let value = store::encode(stored)?;
    let sha256 = audit::sha256_hex(stored.source.as_bytes());
    audit::append_with(store, now, || {
        let (old, guard) = match store.get(CURRENT_KEY)? {
            Some(v) => (
                Some(store::decode::<StoredPolicy>(CURRENT_KEY, &v.value)?),
                Compare::ModRevision(CURRENT_KEY.into(), v.mod_revision),
            ),
            None => (None, Compare::Absent(CURRENT_KEY.into())),
        };
        // Without a policy before, every node was denied everything.
        let old = match old {
            Some(old) => Policy::parse_with_roles(&old.source, &old.file_name, roles),
            None => Policy::parse("{}", "(no policy)"),
        };
        let (newly_allowed, newly_denied) = match old {
            Ok(old)
                if old.rule_count() <= DIFF_SUMMARY_MAX_RULES
                    && policy.rule_count() <= DIFF_SUMMARY_MAX_RULES =>
            {
                let change = weft_policy::diff(&old, policy);
                (
                    Some(change.newly_allowed.len()),
                    Some(change.newly_denied.len()),
                )
            }
            Ok(_) | Err(_) => (None, None),
        };
        Ok(audit::Staged {
            compares: vec![guard],
            ops: vec![Op::Put(CURRENT_KEY.into(), value.clone())],
            actor: actor.clone(),
            event: Event::PolicyInstalled {
                file_name: stored.file_name.clone(),
                sha256: sha256.clone(),
                newly_allowed,
                newly_denied,
                forced,
            },
        })
    })
    .map(drop)
}

/// The policy last put in force, if any.
pub(crate) fn last_good(store: &dyn Store) -> Result<Option<StoredPolicy>, StoreError> {
    store
        .get(CURRENT_KEY)?
        .map(|v| store::decode(CURRENT_KEY, &v.value))
        .transpose()
}

/// Without a policy file: the policy last installed with `policy set`, or
/// deny-all when there never was one.
pub(crate) fn installed(
    store: &dyn Store,
    roles: &Roles,
) -> Result<Option<Arc<Policy>>, LoadError> {
    let Some(stored) = last_good(store).map_err(LoadError::Store)? else {
        tracing::warn!(
            "no --policy given and none installed: every node is denied all traffic and sees no peers until `weft-coordinator policy set`"
        );
        return Ok(None);
    };
    let validated = validate(&stored.source, &stored.file_name, roles)?;
    tracing::info!(
        "no --policy given: serving the policy installed earlier from {}",
        stored.file_name
    );
    Ok(Some(Arc::new(validated.policy)))
}

/// Reads the policy file at start and holds it to `checks` (its tests on
/// the registered nodes, the netmap budget). When the file is invalid but a
/// policy was in force before, that one stays in force (loudly); only a
/// coordinator that never had a valid policy refuses to start.
pub(crate) fn load_at_start(
    path: &Path,
    store: &dyn Store,
    roles: &Roles,
    checks: impl FnOnce(&Policy) -> Result<TestReport, LoadError>,
) -> Result<(Validated, Vec<u8>), LoadError> {
    let loaded = load(path, roles).and_then(|(validated, content)| {
        let report = checks(&validated.policy)?;
        Ok((validated.tested_on_nodes(report), content))
    });
    let error = match loaded {
        Ok((validated, content)) => {
            let stored = StoredPolicy {
                file_name: path.display().to_string(),
                source: String::from_utf8_lossy(&content).into_owned(),
            };
            install(
                store,
                &stored,
                &validated.policy,
                roles,
                &Actor::PolicyFileWatcher,
                false,
                SystemTime::now(),
            )
            .map_err(LoadError::Store)?;
            return Ok((validated, content));
        }
        Err(error) => error,
    };
    let Some(stored) = last_good(store).map_err(LoadError::Store)? else {
        return Err(error);
    };
    let validated = validate(&stored.source, &stored.file_name, roles)?;
    tracing::error!(
        "{error}\nkeeping the policy that was in force before the restart until {} is fixed",
        path.display()
    );
    // Follow from the file's current (refused) bytes: only a change is retried.
    let content = read_bounded(path).unwrap_or_default();
    Ok((validated, content))
}

/// How often the policy file is checked for changes.
const POLL: Duration = Duration::from_millis(250);

/// A policy that parsed and passed its own tests.
#[derive(Debug)]
pub(crate) struct Validated {
    pub(crate) policy: Policy,
    /// How many of the policy's test checks passed.
    pub(crate) tests_passed: usize,
    /// Non-fatal diagnostics, rendered.
    pub(crate) warnings: Vec<String>,
}

/// Why a policy file was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy file {path} is not UTF-8 text")]
    NotUtf8 { path: PathBuf },
    #[error("{}", too_large(&path.display().to_string(), *len))]
    TooLarge { path: PathBuf, len: u64 },
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    #[error("{0}")]
    Invalid(#[from] Diagnostics),
    #[error("cannot record the policy in force: {0}")]
    Store(#[source] StoreError),
}

impl Validated {
    /// The policy's tests ran again, against the registered nodes
    /// (`report`): its count stands, and the warnings that tests were not
    /// evaluated offline are void.
    pub(crate) fn tested_on_nodes(mut self, report: TestReport) -> Self {
        self.tests_passed = report.passed;
        self.warnings = self
            .policy
            .warnings_with_nodes()
            .map(ToString::to_string)
            .collect();
        self
    }
}

/// Parses `source` with the role members and runs the policy's tests
/// without nodes; [`Validated::tested_on_nodes`] follows on every install.
pub(crate) fn validate(
    source: &str,
    file_name: &str,
    roles: &Roles,
) -> Result<Validated, Diagnostics> {
    let started = std::time::Instant::now();
    let validated = parse_and_test(source, file_name, roles);
    metrics::policy_validated(started.elapsed());
    if validated.is_err() {
        metrics::policy_load(PolicyResult::Invalid);
    }
    validated
}

fn parse_and_test(source: &str, file_name: &str, roles: &Roles) -> Result<Validated, Diagnostics> {
    let policy = Policy::parse_with_roles(source, file_name, roles)?;
    let report = policy.run_tests()?;
    let warnings = policy.warnings().iter().map(ToString::to_string).collect();
    Ok(Validated {
        policy,
        tests_passed: report.passed,
        warnings,
    })
}

/// Why a policy of `len` bytes from `origin` is refused.
pub(crate) fn too_large(origin: &str, len: u64) -> String {
    format!(
        "policy {origin} is {len} bytes, over the {MAX_POLICY_BYTES}-byte limit for policies \
         (the same for --policy files and `policy set`); split rules that list many addresses \
         into groups or tags"
    )
}

/// Reads and validates the policy file; also returns the bytes read.
pub(crate) fn load(path: &Path, roles: &Roles) -> Result<(Validated, Vec<u8>), LoadError> {
    let content = read_bounded(path)?;
    let validated = validate_bytes(path, &content, roles)?;
    Ok((validated, content))
}

/// Reads the policy file, refusing one over [`MAX_POLICY_BYTES`] without
/// reading more than one byte past the limit.
fn read_bounded(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read as _;
    let read_error = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut content = Vec::new();
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut content)
        .map_err(read_error)?;
    if content.len() > MAX_POLICY_BYTES {
        let len = std::fs::metadata(path).map_or(content.len() as u64, |m| m.len());
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    Ok(content)
}

/// Follows the policy file at `path`, whose last installed content was
/// `last`, and installs every valid new version.
pub(crate) async fn follow(
    path: PathBuf,
    mut last: Vec<u8>,
    netmaps: NetmapHandle,
    store: Arc<dyn Store>,
    context: Context,
    in_force: InForce,
) {
    let mut interval = tokio::time::interval(POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreadable = false;
    let mut oversized = None;
    loop {
        interval.tick().await;
        let reading = path.clone();
        let read = tokio::task::spawn_blocking(move || read_bounded(&reading)).await;
        let content = match read {
            Ok(Ok(content)) => content,
            Ok(Err(LoadError::TooLarge { len, .. })) => {
                if oversized != Some(len) {
                    tracing::error!(
                        "{}; keeping the policy in force",
                        too_large(&path.display().to_string(), len)
                    );
                    oversized = Some(len);
                }
                continue;
            }
            Ok(Err(e)) => {
                if !unreadable {
                    tracing::warn!("{e}; keeping the policy in force");
                    unreadable = true;
                }
                continue;
            }
            Err(e) => {
                tracing::error!("reading policy file {} failed: {e}", path.display());
                continue;
            }
        };
        unreadable = false;
        oversized = None;
        if content == last {
            continue;
        }
        match validate_bytes(&path, &content, &context.roles) {
            Ok(validated) => {
                let policy = Arc::new(validated.policy);
                match netmaps.check_tests(policy.clone()).await {
                    Ok(_) => {
                        for warning in policy.warnings_with_nodes() {
                            tracing::warn!("{warning}");
                        }
                    }
                    Err(failures) => {
                        tracing::error!(
                            "the changed policy file {} is refused: its tests fail on the registered nodes; keeping the policy in force:\n{failures}",
                            path.display()
                        );
                        last = content;
                        continue;
                    }
                }
                if let Err(lockout) = netmaps
                    .check_lockout(policy.clone(), context.admins.clone())
                    .await
                {
                    tracing::error!(
                        "the changed policy file {} is refused; keeping the policy in force: {lockout}",
                        path.display()
                    );
                    last = content;
                    continue;
                }
                if let Err(over) = netmaps.check_budget(policy.clone()).await {
                    tracing::error!(
                        "the changed policy file {} is refused; keeping the policy in force: {over}",
                        path.display()
                    );
                    last = content;
                    continue;
                }
                let stored = StoredPolicy {
                    file_name: path.display().to_string(),
                    source: String::from_utf8_lossy(&content).into_owned(),
                };
                let installed = install(
                    &*store,
                    &stored,
                    &policy,
                    &context.roles,
                    &Actor::PolicyFileWatcher,
                    false,
                    SystemTime::now(),
                );
                if let Err(e) = installed {
                    tracing::error!("{e}; the changed policy is not installed, retrying");
                    continue;
                }
                if in_force.claim(&stored.source) {
                    netmaps.set_policy(Some(policy)).await;
                }
                tracing::info!("installed the changed policy from {}", path.display());
            }
            Err(e) => tracing::warn!(
                "the changed policy file {} is invalid; keeping the policy in force:\n{e}",
                path.display()
            ),
        }
        last = content;
    }
}

fn validate_bytes(path: &Path, content: &[u8], roles: &Roles) -> Result<Validated, LoadError> {
    let source = std::str::from_utf8(content).map_err(|_| LoadError::NotUtf8 {
        path: path.to_owned(),
    })?;
    Ok(validate(source, &path.display().to_string(), roles)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks at start without registered nodes: the offline tests.
    fn offline_tests(policy: &Policy) -> Result<TestReport, LoadError> {
        Ok(policy.run_tests()?)
    }

    #[test]
    fn the_admin_roles_members_are_administrators_too() {
        let roles: Roles =
            serde_json::from_str(r#"{"admin": ["ada@example.org", "group:idp:secops"]}"#).unwrap();
        let context = Context::new(roles, vec!["tag:admin".into(), "ada@example.org".into()]);
        assert_eq!(
            &*context.admins,
            ["tag:admin", "ada@example.org", "group:idp:secops"]
        );
    }

    #[test]
    fn a_policy_is_claimed_once() {
        let in_force = InForce::new(Some("a".into()));
        assert!(!in_force.claim("a"));
        assert!(in_force.claim("b"));
        assert!(!in_force.clone().claim("b"), "clones share the record");
        assert!(in_force.claim("a"));
    }
    use crate::store::RedbStore;

    const GOOD: &str = r#"{"tagOwners": {"tag:a": []}, "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:*"]}]}"#;
    const BROKEN: &str =
        r#"{"acls": [{"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]}]}"#;

    #[test]
    fn a_restart_with_a_broken_file_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        let file = dir.path().join("policy.hujson");

        std::fs::write(&file, GOOD).unwrap();
        load_at_start(&file, &store, &Roles::default(), offline_tests).unwrap();
        assert_eq!(last_good(&store).unwrap().unwrap().source, GOOD);
        load_at_start(&file, &store, &Roles::default(), offline_tests).unwrap();

        std::fs::write(&file, BROKEN).unwrap();
        let (_, content) = load_at_start(&file, &store, &Roles::default(), offline_tests).unwrap();
        assert_eq!(
            content,
            BROKEN.as_bytes(),
            "follows from the broken bytes on disk"
        );
        assert_eq!(last_good(&store).unwrap().unwrap().source, GOOD);

        let audited = crate::audit::list(&store, None).unwrap();
        assert_eq!(audited.len(), 1, "one install: {audited:?}");
        assert_eq!(audited[0].actor, Actor::PolicyFileWatcher);
        let Event::PolicyInstalled {
            sha256,
            newly_allowed,
            newly_denied,
            ..
        } = &audited[0].event
        else {
            panic!("{audited:?}");
        };
        assert_eq!(*sha256, audit::sha256_hex(GOOD.as_bytes()));
        assert_eq!(
            (*newly_allowed, *newly_denied),
            (Some(3), Some(0)),
            "tag:a to tag:a is new, on every protocol"
        );
    }

    #[test]
    fn a_policy_too_large_to_compare_is_installed_without_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        let rules: Vec<String> = (0..=DIFF_SUMMARY_MAX_RULES)
            .map(|i| {
                format!(
                    r#"{{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:{}"]}}"#,
                    i + 1
                )
            })
            .collect();
        let source = format!(
            r#"{{"tagOwners": {{"tag:a": []}}, "acls": [{}]}}"#,
            rules.join(",")
        );
        let policy = Policy::parse(&source, "big.hujson").unwrap();
        let stored = StoredPolicy {
            file_name: "big.hujson".into(),
            source,
        };
        let roles = Roles::default();
        install(
            &store,
            &stored,
            &policy,
            &roles,
            &Actor::Replica,
            false,
            SystemTime::now(),
        )
        .unwrap();
        let audited = crate::audit::list(&store, None).unwrap();
        let [entry] = audited.as_slice() else {
            panic!("{audited:?}")
        };
        assert!(
            matches!(
                entry.event,
                Event::PolicyInstalled {
                    newly_allowed: None,
                    newly_denied: None,
                    ..
                }
            ),
            "{entry:?}"
        );
        assert!(entry.event.to_string().contains("too large to summarise"));
    }

    #[test]
    fn without_a_file_the_installed_policy_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        assert!(
            installed(&store, &Roles::default()).unwrap().is_none(),
            "nothing installed: deny all"
        );
        let stored = StoredPolicy {
            file_name: "set.hujson".into(),
            source: GOOD.into(),
        };
        remember(&store, &stored).unwrap();
        assert!(installed(&store, &Roles::default()).unwrap().is_some());
    }

    #[test]
    fn a_first_start_with_a_broken_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("weft.redb")).unwrap();
        let file = dir.path().join("policy.hujson");
        std::fs::write(&file, BROKEN).unwrap();
        let error = load_at_start(&file, &store, &Roles::default(), offline_tests)
            .unwrap_err()
            .to_string();
        assert!(error.contains("group:nobody"), "{error}");
        assert!(last_good(&store).unwrap().is_none());
    }
}
