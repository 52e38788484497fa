//! A real coordinator (in process), the real `weft-relay` binary and relay
//! clients holding the node keys of registered nodes, all on loopback.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_coordinator::{AdminClient, AuthKeyRequest, Coordinator, ServeOptions};
use weft_net::relay::{endpoint, ClientError, RelayClient, TcpRelayClient};
use weft_net::tls::Liveness;
use weft_net::{handshake, tls, Service};
use weft_proto::relay::{CLOSE_RELAY_NOT_ADMITTED, CLOSE_RELAY_REMOVED, CLOSE_RELAY_REPLACED};
use weft_proto::stun;
use weft_proto::{
    encode_frame, AuthKey, ClientMessage, Credential, FrameDecoder, PrivateKey, PublicKey,
    Register, RelayInfo, ServerMessage,
};

const WAIT: Duration = Duration::from_secs(10);

/// The relay process, killed when the test ends.
struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn relay_key(data_dir: &Path) -> PublicKey {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-relay"))
        .args(["key", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Loopback ports for the relay, held until it starts: the coordinator
/// starts first and binds ports of its own, which must not be these.
struct RelayPorts {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    stun: std::net::UdpSocket,
}

impl RelayPorts {
    fn reserve() -> Self {
        Self {
            udp: std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            tcp: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            stun: std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        }
    }
}

fn control_endpoint() -> quinn::Endpoint {
    let liveness = Liveness {
        keep_alive: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(15),
    };
    tls::quic_client("127.0.0.1:0".parse().unwrap(), Service::Control, liveness).unwrap()
}

/// Registers a node whose WireGuard key is `node_key`; returns the messages
/// that followed `Registered` up to the relay list.
async fn register(
    endpoint: &quinn::Endpoint,
    coordinator: &Coordinator,
    auth: &AuthKey,
    hostname: &str,
    node_key: &PublicKey,
) -> Vec<RelayInfo> {
    let conn = endpoint
        .connect(coordinator.local_addr(), Service::Control.server_name())
        .unwrap()
        .await
        .unwrap();
    let machine_key = PrivateKey::generate();
    let (mut send, mut recv) = handshake::initiate_quic(
        &conn,
        Service::Control,
        &machine_key,
        &coordinator.public_key(),
    )
    .await
    .unwrap();
    let register = ClientMessage::Register(Register {
        credential: Some(Credential::AuthKey(auth.clone())),
        hostname: hostname.into(),
        node_key: *node_key,
        endpoints: Vec::new(),
        home_relay: None,
        attributes: BTreeMap::new(),
        resume: None,
    });
    send.write_all(&encode_frame(&register).unwrap())
        .await
        .unwrap();
    let mut decoder = FrameDecoder::new();
    let mut opener = weft_proto::Opener::new(*node_key);
    let mut buf = [0u8; 4096];
    let mut kinds = Vec::new();
    let relays = tokio::time::timeout(WAIT, async {
        loop {
            while let Some(message) = decoder.next_message::<ServerMessage>().unwrap() {
                match opener.open(message).unwrap().message {
                    ServerMessage::Relays(relays) => return relays,
                    ServerMessage::NetmapKey(_) => {}
                    other => kinds.push(format!("{other:?}").chars().take(12).collect::<String>()),
                }
            }
            let n = recv.read(&mut buf).await.unwrap().expect("stream ended");
            decoder.push(&buf[..n]);
        }
    })
    .await
    .expect("no relay list after the netmap");
    assert!(kinds[0].starts_with("Registered"), "{kinds:?}");
    assert!(kinds[1].starts_with("NetMap"), "{kinds:?}");
    conn.close(0u32.into(), b"");
    relays
}

/// Connects until the relay admits the key: it learns of new nodes from
/// the coordinator's feed a moment after they registered.
async fn admitted(
    endpoint: &quinn::Endpoint,
    relay: &RelayInfo,
    node_key: &PrivateKey,
) -> RelayClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match RelayClient::connect(endpoint, relay.address, &relay.key, node_key).await {
            Ok(client) => return client,
            Err(ClientError::Closed { code, .. })
                if code == CLOSE_RELAY_NOT_ADMITTED && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("relay refused a registered node: {e}"),
        }
    }
}

async fn recv(client: &RelayClient) -> (PublicKey, Vec<u8>) {
    let (from, payload) = tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("no packet through the relay")
        .unwrap();
    (from, payload.to_vec())
}

/// Sends until one arrives: datagrams are unreliable, even on loopback.
async fn exchange(from: &RelayClient, from_key: &PublicKey, to: &RelayClient, to_key: &PublicKey) {
    from.send(to_key, b"wireguard packet").unwrap();
    assert_eq!(recv(to).await, (*from_key, b"wireguard packet".to_vec()));
}

async fn closed_with(client: &RelayClient) -> u32 {
    match tokio::time::timeout(WAIT, client.recv()).await {
        Ok(Err(ClientError::Closed { code, .. })) => code,
        other => panic!("expected the relay to close the session, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_forwards_between_admitted_nodes_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay_dir = dir.path().join("relay");
    let relay_pub = relay_key(&relay_dir);
    let ports = RelayPorts::reserve();
    let relay = RelayInfo {
        name: "test1".into(),
        address: ports.udp.local_addr().unwrap(),
        key: relay_pub,
        tcp_address: Some(ports.tcp.local_addr().unwrap()),
        stun_address: Some(ports.stun.local_addr().unwrap()),
    };
    let coordinator = Coordinator::start(ServeOptions {
        data_dir: dir.path().join("coordinator"),
        policy: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        public_url: None,
        oidc: None,
        admins: Vec::new(),
        roles: Default::default(),
        store: Default::default(),
        workload_issuers: Vec::new(),
        ephemeral_timeout: weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
        relays: vec![relay.clone()],
        limits: Default::default(),
        flows: Default::default(),
    })
    .await
    .unwrap();
    drop(ports);
    let _process = RelayProcess(
        Command::new(env!("CARGO_BIN_EXE_weft-relay"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&relay_dir)
            .args(["--name", "test1"])
            .args(["--coordinator", &coordinator.local_addr().to_string()])
            .args(["--coordinator-key", &coordinator.public_key().to_string()])
            .args(["--listen", &relay.address.to_string()])
            .args(["--tcp-listen", &relay.tcp_address.unwrap().to_string()])
            .args(["--stun-listen", &relay.stun_address.unwrap().to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let admin = AdminClient::new(&dir.path().join("coordinator"));
    let auth = AuthKey::new(
        admin
            .create_auth_key(&AuthKeyRequest {
                tags: vec!["tag:web".into()],
                reusable: true,
                ephemeral: false,
                expiry_secs: 3600,
            })
            .await
            .unwrap()
            .key,
    );
    let control = control_endpoint();
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let (ka, kb) = (a.public_key(), b.public_key());
    let relays = register(&control, &coordinator, &auth, "node-a", &ka).await;
    assert_eq!(
        relays,
        std::slice::from_ref(&relay),
        "nodes learn the configured relays"
    );
    register(&control, &coordinator, &auth, "node-b", &kb).await;

    let endpoint = endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let client_a = admitted(&endpoint, &relay, &a).await;
    let client_b = admitted(&endpoint, &relay, &b).await;
    exchange(&client_a, &ka, &client_b, &kb).await;
    exchange(&client_b, &kb, &client_a, &ka).await;
    // A packet larger than the connection's datagram limit (a full-size
    // WireGuard packet can be) travels on the session's stream, both ways.
    let big = vec![0x5a; weft_proto::relay::MAX_PAYLOAD];
    assert!(
        big.len() > client_a.max_payload(),
        "{}",
        client_a.max_payload()
    );
    client_a.send(&kb, &big).unwrap();
    assert_eq!(recv(&client_b).await, (ka, big.clone()));
    client_b.send(&ka, &big).unwrap();
    assert_eq!(recv(&client_a).await, (kb, big));

    // A key the coordinator never admitted is refused, with the reason.
    let stranger = RelayClient::connect(
        &endpoint,
        relay.address,
        &relay.key,
        &PrivateKey::generate(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(stranger, ClientError::Closed { code, .. } if code == CLOSE_RELAY_NOT_ADMITTED),
        "{stranger}"
    );
    // A wrong pinned relay key fails the handshake.
    let impostor = PrivateKey::generate().public_key();
    let wrong = RelayClient::connect(&endpoint, relay.address, &impostor, &a)
        .await
        .unwrap_err();
    assert!(
        matches!(wrong, ClientError::Closed { .. } | ClientError::Lost(_)),
        "{wrong}"
    );

    // The TCP fallback carries the same packets; it replaces A's QUIC session.
    let mut tcp_a = TcpRelayClient::connect(relay.tcp_address.unwrap(), &relay.key, &a)
        .await
        .unwrap();
    assert_eq!(closed_with(&client_a).await, CLOSE_RELAY_REPLACED);
    client_b.send(&ka, b"over tcp").unwrap();
    let (from, payload) = tokio::time::timeout(WAIT, tcp_a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((from, payload.as_ref()), (kb, &b"over tcp"[..]));
    tcp_a.send(&kb, b"back").await.unwrap();
    assert_eq!(recv(&client_b).await, (ka, b"back".to_vec()));
    let tcp_stranger = TcpRelayClient::connect(
        relay.tcp_address.unwrap(),
        &relay.key,
        &PrivateKey::generate(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(tcp_stranger, ClientError::Closed { code, .. } if code == CLOSE_RELAY_NOT_ADMITTED),
        "{tcp_stranger}"
    );

    // STUN tells a node the address the relay saw it from.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let transaction = [9u8; 12];
    let mut reflexive = None;
    for _ in 0..20 {
        socket
            .send_to(&stun::request(&transaction), relay.stun_address.unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(250), socket.recv_from(&mut buf)).await
        {
            reflexive = stun::parse_response(&buf[..n], &transaction);
            break;
        }
    }
    assert_eq!(reflexive, Some(socket.local_addr().unwrap()));

    // Deleting a node cuts its relay session at once, and it cannot come back.
    admin.delete_node("node-b").await.unwrap();
    assert_eq!(closed_with(&client_b).await, CLOSE_RELAY_REMOVED);
    let refused = RelayClient::connect(&endpoint, relay.address, &relay.key, &b)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ClientError::Closed { code, .. } if code == CLOSE_RELAY_NOT_ADMITTED),
        "{refused}"
    );
    coordinator.shutdown().await;
}
