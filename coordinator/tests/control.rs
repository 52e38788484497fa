//! End to end in one process: a coordinator on 127.0.0.1 and real QUIC
//! clients doing the node side of the handshake and protocol.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_coordinator::{
    AdminClient, AuthKeyRequest, ClientError, Coordinator, ServeOptions, WorkloadIssuer,
    WorkloadIssuerConfig, WorkloadKind, DEFAULT_EPHEMERAL_TIMEOUT,
};
use weft_net::handshake::{self, InitiateError, QuicInitiateError};
use weft_net::Service;
use weft_proto::{
    encode_frame, AuthKey, ClientMessage, Credential, FrameDecoder, IdentityToken, NodeId, Opener,
    PacketFilter, Peer, PrivateKey, PublicKey, Refusal, RefusalCode, Register, SelfNode,
    ServerMessage, ALPN, CLOSE_BY_COORDINATOR, CLOSE_HANDSHAKE_FAILED, CLOSE_PROTOCOL_ERROR,
};

const WAIT: Duration = Duration::from_secs(5);

const POLICY: &str = r#"// web reaches the database; lonely reaches nothing.
{
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
  ],
  "tests": [{"src": "tag:web", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}],
}"#;

const LONELY_TO_DB: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
  "acls": [
    {"action": "accept", "src": ["tag:lonely"], "dst": ["tag:db:22"], "proto": "tcp"},
  ],
}"#;

const FAILING_TEST: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:lonely": []},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:db:5432"]}],
  "tests": [{"src": "tag:lonely", "deny": ["tag:db:5432"]}],
}"#;

struct Harness {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    policy: PathBuf,
    coordinator: Option<Coordinator>,
    client: quinn::Endpoint,
    workload_issuers: Vec<WorkloadIssuer>,
    ephemeral_timeout: Duration,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(Vec::new(), DEFAULT_EPHEMERAL_TIMEOUT).await
    }

    async fn start_with(
        workload_issuers: Vec<WorkloadIssuer>,
        ephemeral_timeout: Duration,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let policy = dir.path().join("policy.hujson");
        std::fs::write(&policy, POLICY).unwrap();
        let mut harness = Self {
            _dir: dir,
            data_dir,
            policy,
            coordinator: None,
            client: client_endpoint(),
            workload_issuers,
            ephemeral_timeout,
        };
        harness.restart().await;
        harness
    }

    async fn restart(&mut self) {
        if let Some(coordinator) = self.coordinator.take() {
            coordinator.shutdown().await;
        }
        let coordinator = Coordinator::start(ServeOptions {
            data_dir: self.data_dir.clone(),
            policy: Some(self.policy.clone()),
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            public_url: None,
            oidc: None,
            admins: Vec::new(),
            roles: Default::default(),
            store: Default::default(),
            workload_issuers: self.workload_issuers.clone(),
            ephemeral_timeout: self.ephemeral_timeout,
            relays: Vec::new(),
            limits: Default::default(),
            flows: Default::default(),
        })
        .await
        .unwrap();
        self.coordinator = Some(coordinator);
    }

    fn coordinator(&self) -> &Coordinator {
        self.coordinator.as_ref().unwrap()
    }

    fn admin(&self) -> AdminClient {
        AdminClient::new(&self.data_dir)
    }

    async fn auth_key(&self, tag: &str, reusable: bool) -> AuthKey {
        let request = AuthKeyRequest {
            tags: vec![tag.into()],
            reusable,
            ephemeral: false,
            expiry_secs: 3600,
        };
        AuthKey::new(self.admin().create_auth_key(&request).await.unwrap().key)
    }

    async fn connect(
        &self,
        machine: &PrivateKey,
        pinned: &PublicKey,
    ) -> Result<Control, quinn::ConnectionError> {
        connect_from(
            &self.client,
            self.coordinator().local_addr(),
            machine,
            pinned,
        )
        .await
    }

    async fn join(
        &self,
        machine: &PrivateKey,
        hostname: &str,
        key: Option<AuthKey>,
    ) -> Result<Node, Refusal> {
        self.join_with(machine, hostname, key.map(Credential::AuthKey))
            .await
    }

    async fn join_with(
        &self,
        machine: &PrivateKey,
        hostname: &str,
        credential: Option<Credential>,
    ) -> Result<Node, Refusal> {
        let pinned = self.coordinator().public_key();
        let mut control = self.connect(machine, &pinned).await.unwrap();
        let node_key = PrivateKey::generate().public_key();
        control.opener = Some(Opener::new(node_key));
        control
            .send(&ClientMessage::Register(Register {
                credential,
                hostname: hostname.into(),
                node_key,
                endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
                home_relay: None,
                attributes: BTreeMap::new(),
                resume: None,
            }))
            .await;
        let me = match control.next().await {
            ServerMessage::Registered(me) => me,
            ServerMessage::Refused(refusal) => {
                assert_eq!(control.closed_with().await, Some(CLOSE_BY_COORDINATOR));
                return Err(refusal);
            }
            other => panic!("expected Registered, got {other:?}"),
        };
        let ServerMessage::NetMap(netmap) = control.next().await else {
            panic!("expected a NetMap after Registered");
        };
        assert_eq!(netmap.revision, 1);
        assert_eq!(netmap.self_node, me);
        Ok(Node {
            me,
            peers: netmap.peers.into_iter().map(|p| (p.id, p)).collect(),
            filter: netmap.filter,
            revision: netmap.revision,
            control,
        })
    }
}

struct Control {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// Verifies the signed netmaps of a registered node's session.
    opener: Option<Opener>,
}

impl Control {
    async fn send(&mut self, message: &ClientMessage) {
        self.send
            .write_all(&encode_frame(message).unwrap())
            .await
            .unwrap();
    }

    async fn next(&mut self) -> ServerMessage {
        tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(message) = self.decoder.next_message().unwrap() {
                    let Some(opener) = self.opener.as_mut() else {
                        return message;
                    };
                    match opener.open(message).unwrap().message {
                        ServerMessage::NetmapKey(_) => continue,
                        message => return message,
                    }
                }
                let n = self
                    .recv
                    .read(&mut buf)
                    .await
                    .unwrap()
                    .expect("stream ended");
                self.decoder.push(&buf[..n]);
            }
        })
        .await
        .expect("no message from the coordinator in time")
    }

    /// The next message, unsigned and unverified; `None` when the
    /// connection ends or nothing arrives within [`WAIT`].
    async fn try_next(&mut self) -> Option<ServerMessage> {
        tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(message) = self.decoder.next_message().unwrap() {
                    return Some(message);
                }
                let n = self.recv.read(&mut buf).await.ok()??;
                self.decoder.push(&buf[..n]);
            }
        })
        .await
        .ok()?
    }

    async fn closed_with(&self) -> Option<u32> {
        let reason = tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .expect("connection still open");
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => {
                u32::try_from(close.error_code.into_inner()).ok()
            }
            _ => None,
        }
    }
}

struct Node {
    me: SelfNode,
    peers: BTreeMap<NodeId, Peer>,
    filter: PacketFilter,
    revision: u64,
    control: Control,
}

impl Node {
    fn peer_ids(&self) -> BTreeSet<NodeId> {
        self.peers.keys().copied().collect()
    }

    /// Applies deltas until `done` holds; fails after [`WAIT`].
    async fn until(&mut self, what: &str, done: impl Fn(&Node) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting until {what}",
                self.me.name
            );
            match self.control.next().await {
                ServerMessage::Delta(delta) => {
                    assert_eq!(
                        delta.revision,
                        self.revision + 1,
                        "revisions count up by one"
                    );
                    self.revision = delta.revision;
                    for id in delta.remove_peers {
                        self.peers.remove(&id);
                    }
                    for peer in delta.upsert_peers {
                        self.peers.insert(peer.id, peer);
                    }
                    if let Some(filter) = delta.filter {
                        self.filter = filter;
                    }
                }
                other => panic!("expected a Delta, got {other:?}"),
            }
        }
    }
}

fn write_by_rename(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_see_what_the_policy_allows_and_follow_every_change() {
    let h = Harness::start().await;
    let web_key = h.auth_key("tag:web", false).await;
    let mut web = h
        .join(
            &PrivateKey::generate(),
            "Web.example.com",
            Some(web_key.clone()),
        )
        .await
        .unwrap();
    let mut db = h
        .join(
            &PrivateKey::generate(),
            "db",
            Some(h.auth_key("tag:db", false).await),
        )
        .await
        .unwrap();
    let mut lonely = h
        .join(
            &PrivateKey::generate(),
            "lonely",
            Some(h.auth_key("tag:lonely", true).await),
        )
        .await
        .unwrap();
    assert_eq!(web.me.name, "web");
    assert_eq!(web.me.identity.tags, ["tag:web"]);

    // The netmaps honour the policy: web and db see each other, lonely sees nobody.
    web.until("web sees db", |n| n.peer_ids() == [db.me.id].into())
        .await;
    db.until("db sees web", |n| n.peer_ids() == [web.me.id].into())
        .await;
    assert!(
        lonely.peers.is_empty(),
        "lonely must learn nothing: {:?}",
        lonely.peers
    );
    assert!(!db.filter.rules.is_empty() && web.filter.rules.is_empty());
    assert_eq!(db.peers[&web.me.id].addresses, web.me.addresses().to_vec());

    // A used single-use key is refused, naming the key and the fix.
    let refusal = h
        .join(&PrivateKey::generate(), "web2", Some(web_key))
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.code, RefusalCode::AuthKeyUsed);
    assert!(
        refusal.message.contains("authkey create"),
        "{}",
        refusal.message
    );

    // A policy file replaced by rename reaches the nodes quickly.
    let started = Instant::now();
    write_by_rename(&h.policy, LONELY_TO_DB);
    lonely
        .until("lonely sees db", |n| n.peer_ids() == [db.me.id].into())
        .await;
    web.until("web forgets db", |n| n.peers.is_empty()).await;
    db.until("db sees only lonely", |n| {
        n.peer_ids() == [lonely.me.id].into()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "policy took {:?}",
        started.elapsed()
    );

    // A policy whose tests fail is refused and changes nothing.
    let err = h
        .admin()
        .set_policy("bad.hujson", FAILING_TEST, false)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 422, .. }), "{err}");
    assert!(err.to_string().contains("bad.hujson"), "{err}");
    // The admin API installs a valid policy.
    h.admin()
        .set_policy("admin.hujson", POLICY, false)
        .await
        .unwrap();
    web.until("web sees db again", |n| n.peer_ids() == [db.me.id].into())
        .await;
    lonely
        .until("lonely forgets db", |n| n.peers.is_empty())
        .await;
    db.until("db sees web again", |n| n.peer_ids() == [web.me.id].into())
        .await;

    // Online status, then deletion: db's session is refused, its peers forget it promptly.
    let listed = h.admin().nodes().await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|n| n.online));
    let started = Instant::now();
    h.admin().delete_node(&db.me.name).await.unwrap();
    web.until("web forgets the deleted db", |n| n.peers.is_empty())
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "deletion took {:?}",
        started.elapsed()
    );
    match db.control.next().await {
        ServerMessage::Refused(refusal) => assert_eq!(refusal.code, RefusalCode::NodeDeleted),
        other => panic!("expected the deleted node to be refused, got {other:?}"),
    }
    assert_eq!(db.control.closed_with().await, Some(CLOSE_BY_COORDINATOR));
    let err = h.admin().delete_node(&db.me.name).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_registrations_with_one_single_use_key_admit_exactly_one() {
    let h = Arc::new(Harness::start().await);
    let key = h.auth_key("tag:web", false).await;
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let h = Arc::clone(&h);
            let key = key.clone();
            tokio::spawn(async move {
                h.join(&PrivateKey::generate(), &format!("n{i}"), Some(key))
                    .await
                    .map(|node| node.me.id)
                    .map_err(|r| r.code)
            })
        })
        .collect();
    let mut admitted = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(code) => assert_eq!(code, RefusalCode::AuthKeyUsed),
        }
    }
    assert_eq!(admitted, 1);
    assert_eq!(h.admin().nodes().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pinned_key_fails_the_handshake() {
    let h = Harness::start().await;
    let wrong = PrivateKey::generate().public_key();
    let Err(quinn::ConnectionError::ApplicationClosed(close)) =
        h.connect(&PrivateKey::generate(), &wrong).await
    else {
        panic!("the handshake with a wrong pinned key must fail");
    };
    assert_eq!(close.error_code, CLOSE_HANDSHAKE_FAILED.into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_missing_keys_end_the_session() {
    let h = Harness::start().await;
    let pinned = h.coordinator().public_key();
    let mut control = h.connect(&PrivateKey::generate(), &pinned).await.unwrap();
    control
        .send
        .write_all(&[0, 0, 0, 3, 0, 1, 0xff])
        .await
        .unwrap();
    assert_eq!(control.closed_with().await, Some(CLOSE_PROTOCOL_ERROR));

    let refusal = h
        .join(&PrivateKey::generate(), "stranger", None)
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.code, RefusalCode::AuthKeyRequired);
    let forged = AuthKey::new("weft-auth-0123456789ab-forged-secret");
    let refusal = h
        .join(&PrivateKey::generate(), "forger", Some(forged))
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.code, RefusalCode::AuthKeyInvalid);
    assert!(!refusal.message.contains("forged-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_keeps_nodes_and_addresses() {
    let mut h = Harness::start().await;
    let machine = PrivateKey::generate();
    let key_before = h.coordinator().public_key();
    let first = h
        .join(&machine, "db", Some(h.auth_key("tag:db", false).await))
        .await
        .unwrap();
    let before = first.me.clone();
    drop(first);
    h.restart().await;
    assert_eq!(h.coordinator().public_key(), key_before);
    let listed = h.admin().nodes().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].ipv4, listed[0].ipv6),
        (before.id, before.ipv4, before.ipv6)
    );
    let again = h.join(&machine, "renamed", None).await.unwrap();
    assert_eq!(again.me, before);
}

const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A cluster's service-account signing key, published in a JWKS file.
struct ClusterKey {
    pair: ring::signature::Ed25519KeyPair,
}

impl ClusterKey {
    fn new() -> Self {
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap();
        Self {
            pair: ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        }
    }

    fn jwks(&self) -> String {
        use ring::signature::KeyPair as _;
        serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "sa-key", "use": "sig",
            "x": b64(self.pair.public_key().as_ref()),
        }]})
        .to_string()
    }

    /// A projected service-account token for `sub`, for `audience`.
    fn token(&self, sub: &str, audience: &str) -> Credential {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let header = serde_json::json!({"alg": "EdDSA", "kid": "sa-key", "typ": "JWT"});
        let claims = serde_json::json!({
            "iss": CLUSTER_ISSUER, "aud": [audience], "sub": sub,
            "iat": now, "nbf": now, "exp": now + 3600,
        });
        let signed = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let signature = self.pair.sign(signed.as_bytes());
        Credential::IdentityToken(IdentityToken::new(format!(
            "{signed}.{}",
            b64(signature.as_ref())
        )))
    }
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_joins_with_its_token_and_is_deleted_once_offline() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::new();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, key.jwks()).unwrap();
    let issuer = WorkloadIssuerConfig {
        issuer: CLUSTER_ISSUER.into(),
        jwks_file: Some(jwks),
        jwks_url: None,
        audience: "weft".into(),
        kind: WorkloadKind::Kubernetes,
        trust_domain: "cluster.local".into(),
        max_token_age: None,
        key_expiry: None,
        tags: vec![],
        ephemeral: true,
        allow_insecure_issuer: false,
        identity: None,
    }
    .resolve()
    .unwrap();
    let h = Harness::start_with(vec![issuer], Duration::from_secs(1)).await;

    let refused = h
        .join_with(
            &PrivateKey::generate(),
            "api",
            Some(key.token("system:serviceaccount:payments:api", "api")),
        )
        .await
        .err()
        .expect("a token for another audience is refused");
    assert_eq!(refused.code, RefusalCode::TokenInvalid);
    assert!(
        refused
            .message
            .contains("request a token with audience \"weft\""),
        "{}",
        refused.message
    );

    let api = h
        .join_with(
            &PrivateKey::generate(),
            "api-5d8c",
            Some(key.token("system:serviceaccount:payments:api", "weft")),
        )
        .await
        .unwrap();
    assert_eq!(
        api.me.identity.workload.as_deref(),
        Some("spiffe://cluster.local/ns/payments/sa/api")
    );
    assert!(api.me.key_expiry.is_some());
    assert_eq!(h.admin().nodes().await.unwrap().len(), 1);

    drop(api);
    let deadline = Instant::now() + WAIT;
    while !h.admin().nodes().await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the offline ephemeral node was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two machines with one machine key (a cloned VM image) that reconnect
/// at once whenever they lose the session: the coordinator lets a few
/// replacements through, then refuses the newcomer while the other holds
/// the key, naming the holder's address, instead of registering the node
/// hundreds of times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_machines_with_one_machine_key_do_not_take_the_node_from_each_other() {
    const RUN: Duration = Duration::from_secs(5);
    let harness = Harness::start().await;
    let machine = PrivateKey::generate();
    let key = harness.auth_key("tag:web", false).await;
    let first = harness.join(&machine, "vm", Some(key)).await.unwrap();
    drop(first);

    let pinned = harness.coordinator().public_key();
    let addr = harness.coordinator().local_addr();
    let node_key = PrivateKey::generate().public_key();
    let clone = |local: &str| {
        let endpoint = endpoint_at(local);
        let (machine, pinned) = (machine.clone(), pinned);
        tokio::spawn(async move {
            let local = endpoint.local_addr().unwrap();
            let (mut registered, mut refusals) = (0u32, Vec::new());
            let deadline = Instant::now() + RUN;
            for _ in 0..100_000 {
                if Instant::now() >= deadline {
                    break;
                }
                let Ok(mut control) = connect_from(&endpoint, addr, &machine, &pinned).await else {
                    continue;
                };
                let register = ClientMessage::Register(Register {
                    credential: None,
                    hostname: "vm".into(),
                    node_key,
                    endpoints: Vec::new(),
                    home_relay: None,
                    attributes: BTreeMap::new(),
                    resume: None,
                });
                if control
                    .send
                    .write_all(&encode_frame(&register).unwrap())
                    .await
                    .is_err()
                {
                    continue;
                }
                // The other machine may take the node before this one reads its answer.
                match control.try_next().await {
                    Some(ServerMessage::Registered(_)) => {
                        registered += 1;
                        let left = deadline.saturating_duration_since(Instant::now());
                        let _ = tokio::time::timeout(left, control.conn.closed()).await;
                    }
                    Some(ServerMessage::Refused(refusal)) => refusals.push(refusal),
                    Some(other) => panic!("expected Registered or Refused, got {other:?}"),
                    None => {}
                }
            }
            (local, registered, refusals)
        })
    };
    let (a, b) = (clone("127.0.0.1:0"), clone("127.0.0.2:0"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let registrations = a.1 + b.1;
    let per_second = f64::from(registrations) / RUN.as_secs_f64();
    eprintln!("registrations of one machine key from two machines: {registrations} in {RUN:?} ({per_second:.1}/s)");
    assert!(per_second < 5.0, "{registrations} registrations in {RUN:?}");
    for (me, other) in [(&a, &b), (&b, &a)] {
        for refusal in &me.2 {
            assert_eq!(refusal.code, RefusalCode::MachineKeyInUse, "{refusal:?}");
            assert!(refusal.message.contains("cloned"), "{}", refusal.message);
            assert!(
                refusal.message.contains(&other.0.to_string()),
                "{} names {}",
                refusal.message,
                other.0
            );
        }
    }
    assert!(!a.2.is_empty() || !b.2.is_empty(), "nobody was refused");
}

/// A client endpoint on `local`. Nodes authenticate the coordinator by the
/// Noise handshake, not its certificate.
fn endpoint_at(local: &str) -> quinn::Endpoint {
    let tls = weft_net::tls::client_config(ALPN).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(local.parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// The node side of the handshake from `endpoint`, like [`Harness::connect`].
async fn connect_from(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    machine: &PrivateKey,
    pinned: &PublicKey,
) -> Result<Control, quinn::ConnectionError> {
    let server_name = Service::Control.server_name();
    let conn = endpoint.connect(addr, server_name).unwrap().await?;
    let (send, recv) =
        match handshake::initiate_quic(&conn, Service::Control, machine, pinned).await {
            Ok(streams) => streams,
            Err(QuicInitiateError::Stream(e)) => return Err(e),
            Err(QuicInitiateError::Handshake(InitiateError::Noise(e))) => panic!("{e}"),
            Err(_) => return Err(conn.closed().await),
        };
    Ok(Control {
        conn,
        send,
        recv,
        decoder: FrameDecoder::new(),
        opener: None,
    })
}

fn client_endpoint() -> quinn::Endpoint {
    endpoint_at("127.0.0.1:0")
}
