//! The coordinator on etcd, driven by weftd's own control client: a node
//! registered on etcd survives a coordinator restart with nothing kept in
//! the data directory but the key; and with two replicas on one
//! three-member cluster, changes made through either replica reach the
//! nodes connected to the other, and the ephemeral reap runs once, under
//! whichever replica holds the leader lease. The audit trail records what
//! administrators and nodes did, on the embedded store and as one chain
//! that replicas on one etcd cluster write together.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weft_coordinator::{
    Actor, AdminClient, AuditEntry, AuthKeyRequest, Coordinator, EtcdSettings, Event, ServeOptions,
    StoreSettings,
};
use weft_engine::control::{ControlConfig, ControlEvent, ControlTask, ControlUpdate};
use weft_proto::{AuthKey, Credential, NodeId, PrivateKey, SelfNode};
use weft_test_etcd::EtcdCluster;

const WAIT: Duration = Duration::from_secs(10);

const WEB_TO_DB: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"}],
}"#;

const LONELY_TO_DB: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["tag:lonely"], "dst": ["tag:db:22"], "proto": "tcp"},
  ],
}"#;

/// One replica's data directory; every replica holds the same key file.
fn data_dir(root: &Path, name: &str, key_from: Option<&Path>) -> PathBuf {
    let dir = root.join(name);
    if let Some(first) = key_from {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(first.join("coordinator.key"), dir.join("coordinator.key")).unwrap();
    }
    dir
}

async fn start(data_dir: &Path, etcd: &EtcdCluster, ephemeral_timeout: Duration) -> Coordinator {
    let store = StoreSettings::Etcd(EtcdSettings {
        prefix: "/weft-replicas/".into(),
        ..EtcdSettings::new(etcd.endpoints())
    });
    start_on(data_dir, store, ephemeral_timeout).await
}

async fn start_on(
    data_dir: &Path,
    store: StoreSettings,
    ephemeral_timeout: Duration,
) -> Coordinator {
    Coordinator::start(ServeOptions {
        data_dir: data_dir.to_owned(),
        policy: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        public_url: None,
        oidc: None,
        admins: Vec::new(),
        roles: Default::default(),
        store,
        workload_issuers: Vec::new(),
        ephemeral_timeout,
        relays: Vec::new(),
        limits: Default::default(),
        flows: Default::default(),
    })
    .await
    .unwrap()
}

/// The control client's settings for a node with `(machine, node)` keys.
fn control_config(
    coordinator: &Coordinator,
    (machine_key, node_key): &(PrivateKey, PrivateKey),
    hostname: &str,
    credential: Option<Credential>,
) -> ControlConfig {
    let (_posture_tx, posture) = tokio::sync::watch::channel(Default::default());
    ControlConfig {
        coordinator: coordinator.local_addr().into(),
        coordinator_key: coordinator.public_key(),
        machine_key: machine_key.clone(),
        credential,
        hostname: hostname.into(),
        node_key: node_key.public_key(),
        advertisement: tokio::sync::watch::channel(weft_proto::Advertisement {
            endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
            home_relay: None,
        })
        .1,
        system_attributes: |_| Default::default(),
        posture,
    }
}

/// Registers through weftd's control client and returns what the coordinator assigned.
async fn register(
    coordinator: &Coordinator,
    keys: &(PrivateKey, PrivateKey),
    credential: Option<Credential>,
) -> SelfNode {
    let (tx, mut rx) = mpsc::channel(16);
    let _task = ControlTask::spawn(control_config(coordinator, keys, "db-1", credential), 1, tx);
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await.expect("the control task ended").event {
                ControlEvent::Registered(me) => return me,
                ControlEvent::Refused(refusal) => panic!("refused: {refusal:?}"),
                _ => continue,
            }
        }
    })
    .await
    .expect("not registered in time")
}

/// A node connected to one replica, following its netmap.
struct Node {
    _task: ControlTask,
    updates: mpsc::Receiver<ControlUpdate>,
    peers: BTreeMap<NodeId, String>,
    /// The packet filter, rendered, for comparing.
    filter: String,
}

impl Node {
    fn connect(coordinator: &Coordinator, hostname: &str, credential: Option<Credential>) -> Self {
        let keys = (PrivateKey::generate(), PrivateKey::generate());
        let config = control_config(coordinator, &keys, hostname, credential);
        let (tx, updates) = mpsc::channel(64);
        Self {
            _task: ControlTask::spawn(config, 1, tx),
            updates,
            peers: BTreeMap::new(),
            filter: String::new(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.peers.values().any(|peer| peer == name)
    }

    /// Follows the netmap until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let update = tokio::time::timeout_at(deadline, self.updates.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; peers {:?}", self.peers))
                .expect("the control task ended");
            match update.event {
                ControlEvent::NetMap(map) => {
                    self.peers = map.peers.into_iter().map(|p| (p.id, p.name)).collect();
                    self.filter = format!("{:?}", map.filter);
                }
                ControlEvent::Delta(delta) => {
                    for peer in delta.upsert_peers {
                        self.peers.insert(peer.id, peer.name);
                    }
                    for id in delta.remove_peers {
                        self.peers.remove(&id);
                    }
                    if let Some(filter) = delta.filter {
                        self.filter = format!("{filter:?}");
                    }
                }
                event @ ControlEvent::Refused(_) if event.is_final() => {
                    panic!("refused: {event:?}")
                }
                _ => {}
            }
        }
    }
}

async fn auth_key(admin: &AdminClient, tag: &str, ephemeral: bool) -> Option<Credential> {
    let key = admin
        .create_auth_key(&AuthKeyRequest {
            tags: vec![tag.into()],
            reusable: true,
            ephemeral,
            expiry_secs: 3600,
        })
        .await
        .unwrap();
    Some(Credential::AuthKey(AuthKey::new(key.key)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_replica_reach_nodes_on_the_other() {
    let etcd = EtcdCluster::start(3).unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir_a = data_dir(root.path(), "a", None);
    let a = start(&dir_a, &etcd, Duration::from_secs(600)).await;
    let dir_b = data_dir(root.path(), "b", Some(&dir_a));
    let b = start(&dir_b, &etcd, Duration::from_secs(600)).await;
    assert_eq!(a.public_key(), b.public_key(), "replicas share one key");
    let (admin_a, admin_b) = (AdminClient::new(&dir_a), AdminClient::new(&dir_b));
    admin_a
        .set_policy("web-to-db", WEB_TO_DB, false)
        .await
        .unwrap();

    let mut db = Node::connect(&b, "db", auth_key(&admin_b, "tag:db", false).await);
    let mut web = Node::connect(&a, "web", auth_key(&admin_a, "tag:web", false).await);
    // Registered through A, seen by a node on B.
    db.until("web on B", |n| n.has("web")).await;
    web.until("db on A", |n| n.has("db")).await;

    // A policy installed through A reaches the node on B; one etcd member
    // down changes nothing.
    let mut etcd = etcd;
    etcd.stop(0).unwrap();
    let mut lonely = Node::connect(&a, "lonely", auth_key(&admin_a, "tag:lonely", false).await);
    lonely
        .until("its first netmap", |n| !n.filter.is_empty())
        .await;
    let filter_before = db.filter.clone();
    admin_a
        .set_policy("lonely-to-db", LONELY_TO_DB, false)
        .await
        .unwrap();
    db.until("the new policy on B", |n| {
        n.has("lonely") && n.filter != filter_before
    })
    .await;

    // Deleted through B, gone from the node on A.
    admin_b.delete_node("db").await.unwrap();
    web.until("db gone on A", |n| !n.has("db")).await;
    assert!(admin_a
        .nodes()
        .await
        .unwrap()
        .iter()
        .all(|n| n.name != "db"));

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reap_runs_once_and_survives_the_leader() {
    let etcd = EtcdCluster::start(3).unwrap();
    let root = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let dir_a = data_dir(root.path(), "a", None);
    let a = start(&dir_a, &etcd, timeout).await;
    let dir_b = data_dir(root.path(), "b", Some(&dir_a));
    let b = start(&dir_b, &etcd, timeout).await;
    let admin_b = AdminClient::new(&dir_b);
    admin_b
        .set_policy("web-to-db", WEB_TO_DB, false)
        .await
        .unwrap();

    // An ephemeral node on B stays while it is online there, though A leads.
    let mut eph = Node::connect(&b, "eph", auth_key(&admin_b, "tag:web", true).await);
    eph.until("its first netmap", |n| !n.filter.is_empty())
        .await;
    tokio::time::sleep(timeout * 2).await;
    assert_eq!(
        admin_b.nodes().await.unwrap().len(),
        1,
        "an online node is never reaped"
    );

    // The leader goes away; the node drops off B and is reaped by B alone.
    a.shutdown().await;
    drop(eph);
    let started = Instant::now();
    while !admin_b.nodes().await.unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "not reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reaped_after = started.elapsed();
    assert!(
        reaped_after >= timeout,
        "reaped after {reaped_after:?}, before the timeout"
    );
    eprintln!("reaped {reaped_after:?} after the node left and the leader stopped");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_registered_on_etcd_survive_a_coordinator_restart() {
    let etcd = EtcdCluster::single().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let keys = (PrivateKey::generate(), PrivateKey::generate());

    let coordinator = start(
        &data_dir,
        &etcd,
        weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
    )
    .await;
    let admin = AdminClient::new(&data_dir);
    let key = admin
        .create_auth_key(&AuthKeyRequest {
            tags: vec!["tag:db".into()],
            reusable: false,
            ephemeral: false,
            expiry_secs: 3600,
        })
        .await
        .unwrap();
    let credential = Some(Credential::AuthKey(AuthKey::new(key.key)));
    let joined = register(&coordinator, &keys, credential).await;
    assert_eq!(joined.name, "db-1");
    coordinator.shutdown().await;
    assert!(
        !data_dir.join("weft.redb").exists(),
        "the etcd store must not write an embedded database"
    );

    let coordinator = start(
        &data_dir,
        &etcd,
        weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
    )
    .await;
    let listed = admin.nodes().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].ipv4, listed[0].name.as_str()),
        (joined.id, joined.ipv4, "db-1")
    );
    let rejoined = register(&coordinator, &keys, None).await;
    assert_eq!(rejoined, joined);
    coordinator.shutdown().await;
}

/// Runs `weft-coordinator audit ARGS --data-dir DIR`.
async fn audit_command(data_dir: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-coordinator"))
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .await
        .unwrap()
}

/// The audit trail as `weft-coordinator audit --json` prints it.
async fn audit_json(data_dir: &Path) -> Vec<AuditEntry> {
    let out = audit_command(data_dir, &["--json"]).await;
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `weft-coordinator audit verify`'s report of an intact chain.
async fn audit_verified(data_dir: &Path) -> String {
    let out = audit_command(data_dir, &["verify"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    stdout
}

fn kinds(entries: &[AuditEntry]) -> Vec<&'static str> {
    entries.iter().map(|e| e.event.kind()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_who_changed_what() {
    use std::os::unix::fs::MetadataExt as _;

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let coordinator = start_on(
        &data_dir,
        StoreSettings::Embedded,
        weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
    )
    .await;
    let admin = AdminClient::new(&data_dir);
    admin
        .set_policy("web-to-db", WEB_TO_DB, false)
        .await
        .unwrap();
    let credential = auth_key(&admin, "tag:db", false).await;
    let Some(Credential::AuthKey(secret)) = &credential else {
        unreachable!()
    };
    let secret = secret.expose_secret().to_owned();
    let keys = (PrivateKey::generate(), PrivateKey::generate());
    let joined = register(&coordinator, &keys, credential).await;
    admin.delete_node(&joined.name).await.unwrap();

    let entries = audit_json(&data_dir).await;
    assert_eq!(
        kinds(&entries),
        [
            "policy_installed",
            "auth_key_created",
            "node_registered",
            "node_deleted"
        ]
    );
    let me = Actor::Admin {
        uid: Some(std::fs::metadata(&data_dir).unwrap().uid()),
    };
    assert_eq!(entries[0].actor, me, "the admin socket's peer");
    let Event::PolicyInstalled {
        sha256,
        newly_allowed,
        ..
    } = &entries[0].event
    else {
        unreachable!()
    };
    assert_eq!(sha256.len(), 64);
    assert_eq!(*newly_allowed, Some(1), "web to db on 5432");
    assert_eq!(entries[1].actor, me);
    assert_eq!(entries[2].actor, Actor::Node { node: joined.id });
    assert_eq!(
        entries[3].event,
        Event::NodeDeleted {
            node: joined.id,
            name: joined.name.clone()
        }
    );
    assert_eq!(entries[3].actor, me);
    let printed = String::from_utf8(audit_command(&data_dir, &[]).await.stdout).unwrap();
    assert!(!printed.contains(&secret), "no secret in the trail");
    let deletion = format!("node {} ({}) deleted", joined.id, joined.name);
    assert!(printed.contains(&deletion), "{printed}");

    let verified = audit_verified(&data_dir).await;
    assert!(verified.contains("intact: 4 entries"), "{verified}");
    assert!(
        verified.contains(&format!("4:{}", entries[3].hash)),
        "{verified}"
    );
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_etcd_write_one_audit_chain() {
    let etcd = EtcdCluster::single().unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir_a = data_dir(root.path(), "a", None);
    let a = start(&dir_a, &etcd, Duration::from_secs(600)).await;
    let dir_b = data_dir(root.path(), "b", Some(&dir_a));
    let b = start(&dir_b, &etcd, Duration::from_secs(600)).await;
    let (admin_a, admin_b) = (AdminClient::new(&dir_a), AdminClient::new(&dir_b));
    admin_a
        .set_policy("web-to-db", WEB_TO_DB, false)
        .await
        .unwrap();
    // Both replicas write at once.
    let (_web_key, db_key) = tokio::join!(
        auth_key(&admin_a, "tag:web", false),
        auth_key(&admin_b, "tag:db", false)
    );
    let keys = (PrivateKey::generate(), PrivateKey::generate());
    let joined = register(&b, &keys, db_key).await;
    admin_a.delete_node(&joined.name).await.unwrap();

    let from_a = audit_json(&dir_a).await;
    let from_b = audit_json(&dir_b).await;
    assert_eq!(from_a, from_b, "one chain");
    let mut listed = kinds(&from_a);
    listed[1..3].sort_unstable();
    assert_eq!(
        listed,
        [
            "policy_installed",
            "auth_key_created",
            "auth_key_created",
            "node_registered",
            "node_deleted"
        ],
        "B follows A's policy without a second entry"
    );
    let verified_a = audit_verified(&dir_a).await;
    assert!(verified_a.contains("intact: 5 entries"), "{verified_a}");
    assert_eq!(verified_a, audit_verified(&dir_b).await);

    // Someone with write access to etcd moves the policy install an hour
    // back: both replicas' `audit verify` name the edited entry and fail.
    let mut etcd_client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let key = "/weft-replicas/audit/entries/00000000000000000001";
    let stored = etcd_client.get(key, None).await.unwrap();
    let mut entry: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    entry["time"] = (entry["time"].as_u64().unwrap() - 3600).into();
    etcd_client
        .put(key, serde_json::to_vec(&entry).unwrap(), None)
        .await
        .unwrap();
    for dir in [&dir_a, &dir_b] {
        let out = audit_command(dir, &["verify"]).await;
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{report}");
        assert!(
            report.contains("entry 1 was edited"),
            "the edited entry is named: {report}"
        );
    }

    a.shutdown().await;
    b.shutdown().await;
}
