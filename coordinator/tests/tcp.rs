//! Control sessions over TLS on TCP, end to end in one process: a real
//! coordinator, whose control port's TCP side serves both control sessions
//! and HTTP, and weftd's real control client, which falls back to TCP when
//! QUIC gets no answer.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_coordinator::{AdminClient, AuthKeyRequest, Coordinator, ServeOptions};
use weft_engine::control::{
    ControlConfig, ControlError, ControlEvent, ControlTask, ControlUpdate, CONNECT_TIMEOUT,
};
use weft_proto::handshake::HandshakeError;
use weft_proto::{Advertisement, AuthKey, Credential, PrivateKey, PublicKey, RefusalCode};

const WAIT: Duration = Duration::from_secs(10);

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:web:443"], "proto": "tcp"}],
}"#;

struct Lab {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    coordinator: Coordinator,
}

impl Lab {
    /// A coordinator on 127.0.0.1; HTTP shares the control port unless
    /// `http_listen` is given.
    async fn start(http_listen: Option<SocketAddr>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let policy = dir.path().join("policy.hujson");
        std::fs::write(&policy, POLICY).unwrap();
        let coordinator = Coordinator::start(ServeOptions {
            data_dir: data_dir.clone(),
            policy: Some(policy),
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen,
            public_url: None,
            oidc: None,
            admins: Vec::new(),
            roles: Default::default(),
            store: Default::default(),
            workload_issuers: Vec::new(),
            ephemeral_timeout: weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
            relays: Vec::new(),
            limits: Default::default(),
            flows: Default::default(),
        })
        .await
        .unwrap();
        Self {
            _dir: dir,
            data_dir,
            coordinator,
        }
    }

    fn admin(&self) -> AdminClient {
        AdminClient::new(&self.data_dir)
    }

    async fn auth_key(&self) -> AuthKey {
        let request = AuthKeyRequest {
            tags: vec!["tag:web".into()],
            reusable: true,
            ephemeral: false,
            expiry_secs: 3600,
        };
        AuthKey::new(self.admin().create_auth_key(&request).await.unwrap().key)
    }

    /// weftd's control client for a new node reaching the coordinator at `address`.
    async fn node(&self, address: SocketAddr, pinned: PublicKey) -> Node {
        let config = ControlConfig {
            coordinator: address.into(),
            coordinator_key: pinned,
            machine_key: PrivateKey::generate(),
            credential: Some(Credential::AuthKey(self.auth_key().await)),
            hostname: "web-1".into(),
            node_key: PrivateKey::generate().public_key(),
            advertisement: tokio::sync::watch::channel(Advertisement {
                endpoints: vec!["192.0.2.10:51820".parse().unwrap()],
                home_relay: None,
            })
            .1,
            system_attributes: |_| Default::default(),
            posture: tokio::sync::watch::channel(Default::default()).1,
        };
        let (tx, updates) = mpsc::channel(64);
        Node {
            _task: ControlTask::spawn(config, 1, tx),
            updates,
        }
    }
}

struct Node {
    _task: ControlTask,
    updates: mpsc::Receiver<ControlUpdate>,
}

impl Node {
    async fn next(&mut self) -> ControlEvent {
        tokio::time::timeout(WAIT, self.updates.recv())
            .await
            .expect("no control update in time")
            .expect("the control task ended")
            .event
    }

    /// Waits for a session to register and receive its netmap (a delta when
    /// it resumed); the address it connected to.
    async fn registered(&mut self) -> SocketAddr {
        let mut connected = None;
        loop {
            match self.next().await {
                ControlEvent::Connected(address) => connected = Some(address),
                ControlEvent::Registered(_) => {}
                ControlEvent::NetMap(netmap) => {
                    assert_eq!(netmap.self_node.name, "web-1");
                    return connected.expect("a netmap before the session connected");
                }
                ControlEvent::Delta(_) => {
                    return connected.expect("a delta before the session connected");
                }
                ControlEvent::Disconnected(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next session end, skipping other updates.
    async fn disconnected(&mut self) -> ControlError {
        loop {
            if let ControlEvent::Disconnected(error) = self.next().await {
                return error;
            }
        }
    }
}

/// An address where UDP gets no answer and TCP is forwarded to the
/// coordinator's control port: a network that blocks UDP.
struct TcpOnly {
    address: SocketAddr,
    _silent: std::net::UdpSocket,
    accept: JoinHandle<()>,
    forwards: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpOnly {
    async fn start(to: SocketAddr) -> Self {
        let (silent, listener) = loop {
            let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = silent.local_addr().unwrap();
            if let Ok(listener) = TcpListener::bind(port).await {
                break (silent, listener);
            }
        };
        let address = listener.local_addr().unwrap();
        let forwards = Arc::new(Mutex::new(Vec::new()));
        let tracked = Arc::clone(&forwards);
        let accept = tokio::spawn(async move {
            while let Ok((mut node, _)) = listener.accept().await {
                let forward = tokio::spawn(async move {
                    let mut coordinator = TcpStream::connect(to).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut node, &mut coordinator).await;
                });
                tracked.lock().unwrap().push(forward);
            }
        });
        Self {
            address,
            _silent: silent,
            accept,
            forwards,
        }
    }

    /// Drops every forwarded connection without a word: a TCP close with no TLS close.
    fn cut(&self) {
        for forward in self.forwards.lock().unwrap().drain(..) {
            forward.abort();
        }
    }
}

impl Drop for TcpOnly {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Sends `request` on a new TCP connection and reads until the coordinator closes it.
async fn exchange(address: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the connection stayed open");
    match read {
        Ok(_) => answer,
        // A reset (unread garbage) is as good a refusal as a close.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => answer,
        Err(e) => panic!("reading the answer: {e}"),
    }
}

async fn healthz(address: SocketAddr) -> String {
    let answer = exchange(
        address,
        b"GET /healthz HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n",
    )
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_node_without_udp_registers_over_tcp_beside_http_and_reconnects_quickly() {
    let lab = Lab::start(None).await;
    let control = lab.coordinator.local_addr();
    assert_eq!(lab.coordinator.http_addr(), control, "HTTP shares the port");
    let blocked = TcpOnly::start(control).await;

    let started = Instant::now();
    let mut node = lab
        .node(blocked.address, lab.coordinator.public_key())
        .await;
    assert_eq!(node.registered().await, blocked.address);
    let took = started.elapsed();
    assert!(
        took < CONNECT_TIMEOUT + Duration::from_secs(2),
        "QUIC's timeout then TCP took {took:?}"
    );

    // The same TCP port still answers HTTP while the session runs.
    let answer = healthz(control).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");

    // The connection drops without a TLS close: reported as lost, not as the coordinator's doing.
    blocked.cut();
    match node.disconnected().await {
        ControlError::Lost { reason, .. } => {
            assert!(reason.contains("without a TLS close"), "{reason}")
        }
        other => panic!("expected a lost connection, got {other:?}"),
    }
    // QUIC is retried only briefly where TCP worked, so reconnecting costs less than its timeout.
    let dropped = Instant::now();
    assert_eq!(node.registered().await, blocked.address);
    let took = dropped.elapsed();
    assert!(took < CONNECT_TIMEOUT, "reconnecting took {took:?}");
    lab.coordinator.shutdown().await;
}

#[tokio::test]
async fn garbage_on_the_tcp_port_is_refused_without_harm() {
    let lab = Lab::start(Some("127.0.0.1:0".parse().unwrap())).await;
    let control = lab.coordinator.local_addr();
    assert_ne!(lab.coordinator.http_addr(), control);

    // HTTP listens elsewhere: the control port closes anything that is not TLS...
    assert_eq!(exchange(control, b"\x00\x01 not a protocol\r\n").await, b"");
    let answer = exchange(
        control,
        b"GET /healthz HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // ...and a TLS record that is no handshake fails the TLS handshake.
    let answer = exchange(control, b"\x16\x03\x01\x00\x05hello and more").await;
    assert!(
        !answer.windows(7).any(|w| w == b"healthz"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // The listener lives on: HTTP on its own port, and a control session over TCP.
    let answer = healthz(lab.coordinator.http_addr()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let blocked = TcpOnly::start(control).await;
    let mut node = lab
        .node(blocked.address, lab.coordinator.public_key())
        .await;
    assert_eq!(node.registered().await, blocked.address);
    lab.coordinator.shutdown().await;
}

#[tokio::test]
async fn a_shared_port_hands_garbage_to_http_and_keeps_serving() {
    let lab = Lab::start(None).await;
    let control = lab.coordinator.local_addr();
    let answer = exchange(control, b"\x00\x01 not a protocol\r\n\r\n").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // A connection that sends nothing and goes away harms nothing either.
    drop(TcpStream::connect(control).await.unwrap());
    let answer = healthz(control).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    lab.coordinator.shutdown().await;
}

#[tokio::test]
async fn a_wrong_pinned_key_over_tcp_is_reported_as_such() {
    let lab = Lab::start(None).await;
    let blocked = TcpOnly::start(lab.coordinator.local_addr()).await;
    let wrong = PrivateKey::generate().public_key();
    let mut node = lab.node(blocked.address, wrong).await;
    match node.disconnected().await {
        ControlError::Handshake(HandshakeError::Authentication) => {}
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    lab.coordinator.shutdown().await;
}

#[tokio::test]
async fn the_coordinator_ending_a_tcp_session_is_reported_as_such() {
    let lab = Lab::start(None).await;
    let blocked = TcpOnly::start(lab.coordinator.local_addr()).await;
    let mut node = lab
        .node(blocked.address, lab.coordinator.public_key())
        .await;
    node.registered().await;
    lab.coordinator.shutdown().await;
    match node.disconnected().await {
        ControlError::Lost { reason, .. } => {
            assert_eq!(reason, "the coordinator ended the session (TLS close)");
        }
        other => panic!("expected the coordinator's close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_deleted_node_hears_its_refusal_over_tcp() {
    let lab = Lab::start(None).await;
    let blocked = TcpOnly::start(lab.coordinator.local_addr()).await;
    let mut node = lab
        .node(blocked.address, lab.coordinator.public_key())
        .await;
    node.registered().await;
    lab.admin().delete_node("web-1").await.unwrap();
    loop {
        match node.next().await {
            ControlEvent::Refused(refusal) => {
                assert_eq!(refusal.code, RefusalCode::NodeDeleted);
                break;
            }
            ControlEvent::Delta(_) | ControlEvent::NetMap(_) => {}
            other => panic!("expected the refusal, got {other:?}"),
        }
    }
    lab.coordinator.shutdown().await;
}

/// Real UDP blocking and a vanishing coordinator, with nftables in a
/// network namespace of this test's own (gone with its thread).
#[test]
#[ignore = "needs root for a network namespace and nftables; `sudo tests/run` runs it"]
fn where_udp_is_blocked_the_node_uses_tcp_and_notices_a_vanished_coordinator_within_seconds() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("cannot create a network namespace (run as root)");
        command("ip", &["link", "set", "lo", "up"], "");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(vanishing_coordinator());
    })
    .join()
    .expect("the test failed");
}

async fn vanishing_coordinator() {
    let lab = Lab::start(None).await;
    let control = lab.coordinator.local_addr();
    let port = control.port();
    command(
        "nft",
        &["-f", "-"],
        &format!(
            "table inet weft {{\n chain out {{\n type filter hook output priority 0;\n udp dport {port} drop\n }}\n}}\n"
        ),
    );
    let mut node = lab.node(control, lab.coordinator.public_key()).await;
    assert_eq!(node.registered().await, control);

    // The coordinator's host vanishes: nothing answers, nothing closes.
    command(
        "nft",
        &["-f", "-"],
        &format!("add rule inet weft out tcp dport {port} drop\nadd rule inet weft out tcp sport {port} drop\n"),
    );
    let vanished = Instant::now();
    let error = node.disconnected().await;
    let noticed = vanished.elapsed();
    eprintln!("over TCP, a vanished coordinator was noticed after {noticed:?}: {error}");
    assert!(
        noticed < Duration::from_secs(6),
        "noticed only after {noticed:?}"
    );

    // It comes back (UDP still blocked): the node rejoins over TCP.
    command(
        "nft",
        &["-f", "-"],
        &format!("flush chain inet weft out\nadd rule inet weft out udp dport {port} drop\n"),
    );
    assert_eq!(node.registered().await, control);
    lab.coordinator.shutdown().await;
}

/// Runs `program` with `input` on stdin; panics with its output on failure.
fn command(program: &str, args: &[&str], input: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
