//! The coordinator on etcd: a node registers over the real control protocol
//! (weftd's own control client), the coordinator restarts, and the node is
//! still there and rejoins as itself — with nothing kept in the data
//! directory but the coordinator's key.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;
use weft_coordinator::{
    AdminClient, AuthKeyRequest, Coordinator, EtcdSettings, ServeOptions, StoreSettings,
};
use weft_node::control::{ControlConfig, ControlEvent, ControlTask};
use weft_proto::{AuthKey, Credential, PrivateKey, SelfNode};
use weft_test_etcd::EtcdCluster;

const WAIT: Duration = Duration::from_secs(10);

async fn start(data_dir: &Path, etcd: &EtcdCluster) -> Coordinator {
    Coordinator::start(ServeOptions {
        data_dir: data_dir.to_owned(),
        policy: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        public_url: None,
        oidc: None,
        admins: Vec::new(),
        store: StoreSettings::Etcd(EtcdSettings {
            prefix: "/weft-it/".into(),
            ..EtcdSettings::new(etcd.endpoints())
        }),
        workload_issuers: Vec::new(),
        ephemeral_timeout: weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
        relays: Vec::new(),
    })
    .await
    .unwrap()
}

/// Registers through weftd's control client and returns what the coordinator assigned.
async fn register(
    coordinator: &Coordinator,
    machine_key: &PrivateKey,
    node_key: &PrivateKey,
    credential: Option<Credential>,
) -> SelfNode {
    let (_posture_tx, posture) = tokio::sync::watch::channel(Default::default());
    let config = ControlConfig {
        coordinator: coordinator.local_addr().into(),
        coordinator_key: coordinator.public_key(),
        machine_key: machine_key.clone(),
        credential,
        hostname: "db-1".into(),
        node_key: node_key.public_key(),
        wireguard_port: 51820,
        overlay_interface: "weft-test0".into(),
        posture,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let _task = ControlTask::spawn(config, 1, tx);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_registered_on_etcd_survive_a_coordinator_restart() {
    let etcd = EtcdCluster::single().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let machine_key = PrivateKey::generate();
    let node_key = PrivateKey::generate();

    let coordinator = start(&data_dir, &etcd).await;
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
    let joined = register(&coordinator, &machine_key, &node_key, credential).await;
    assert_eq!(joined.name, "db-1");
    coordinator.shutdown().await;
    assert!(
        !data_dir.join("weft.redb").exists(),
        "the etcd store must not write an embedded database"
    );

    let coordinator = start(&data_dir, &etcd).await;
    let listed = admin.nodes().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].ipv4, listed[0].name.as_str()),
        (joined.id, joined.ipv4, "db-1")
    );
    let rejoined = register(&coordinator, &machine_key, &node_key, None).await;
    assert_eq!(rejoined, joined);
    coordinator.shutdown().await;
}
