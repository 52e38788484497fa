//! Installing policies on a real `weft-coordinator serve` with weftd's real
//! control client: a policy whose netmaps would not fit, or whose tests fail
//! on the registered nodes, is refused by every path alike while sessions
//! stay up, and a node whose netmap outgrew a frame anyway is told so and
//! backs off.
#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed step fails the test"
)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weft_coordinator::{AdminClient, AuthKeyRequest, ClientError};
use weft_engine::control::{ControlConfig, ControlEvent, ControlTask, ControlUpdate};
use weft_proto::{Advertisement, AuthKey, Credential, PrivateKey, PublicKey, RefusalCode};

const BIN: &str = env!("CARGO_BIN_EXE_weft-coordinator");

/// Long enough for a debug build to parse and compile 100,000 rules.
const SLOW: Duration = Duration::from_secs(120);

/// The limit on policy text (`MAX_POLICY_BYTES`).
const MAX_POLICY_BYTES: usize = 8 << 20;

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:c": [], "tag:d": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:web:443"], "proto": "tcp"}],
}"#;

/// `rules` accept rules for `tag:web`, each for other ports, from `src(i)`.
fn generated(rules: usize, src: impl Fn(usize) -> String) -> String {
    let mut text = String::from(
        "{\"tagOwners\": {\"tag:web\": [], \"tag:c\": [], \"tag:d\": []},\n\"acls\": [\n\
         {\"action\": \"accept\", \"src\": [\"tag:web\"], \"dst\": [\"tag:web:443\"]}",
    );
    for i in 0..rules {
        write!(
            text,
            ",\n{{\"action\":\"accept\",\"src\":[{}],\"dst\":[\"tag:web:{}\"]}}",
            src(i),
            match i {
                0..65_000 => format!("{}", 1 + i),
                _ => format!("{}-{}", i - 64_999, i - 64_998),
            }
        )
        .unwrap();
    }
    text.push_str("\n]}\n");
    text
}

/// 100,000 rules, each from its own IPv6 address: well within the size
/// limit for text, but several megabytes of filter for every web node.
fn wide_policy() -> String {
    let text = generated(100_000, |i| {
        format!("\"2001:db8::{:x}:{:x}\"", i >> 16, i & 0xffff)
    });
    assert!(text.len() < MAX_POLICY_BYTES, "{} bytes", text.len());
    text
}

/// Kills the coordinator when the test ends, however it ends.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
    listen: SocketAddr,
    key: PublicKey,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.hujson"), POLICY).unwrap();
        let data_dir = dir.path().join("data");
        let out = Command::new(BIN)
            .arg("key")
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        let key: PublicKey = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let listen = free_port();
        let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--listen", &listen.to_string()])
            .args(["--http-listen", "127.0.0.1:0", "--policy"])
            .arg(dir.path().join("policy.hujson"))
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let server = Self {
            child,
            dir,
            listen,
            key,
        };
        server.wait_for_log("", |_| server.data_dir().join("admin.sock").exists());
        server
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn policy_file(&self) -> PathBuf {
        self.dir.path().join("policy.hujson")
    }

    fn admin(&self) -> AdminClient {
        AdminClient::new(&self.data_dir())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap()
    }

    /// Waits until the log has a line containing `needle` and `ready` holds.
    fn wait_for_log(&self, needle: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SLOW;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle) && ready(l)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in time:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Replaces the followed policy file in one step, as an editor or a
    /// deployment tool does.
    fn write_policy(&self, text: &str) {
        let temporary = self.dir.path().join("policy.hujson.new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, self.policy_file()).unwrap();
    }

    async fn auth_key(&self, tag: &str) -> AuthKey {
        let request = AuthKeyRequest {
            tags: vec![tag.into()],
            reusable: true,
            ephemeral: false,
            expiry_secs: 3600,
        };
        AuthKey::new(self.admin().create_auth_key(&request).await.unwrap().key)
    }

    /// weftd's control client for a new node.
    async fn node(&self, tag: &str, hostname: &str) -> Node {
        let config = ControlConfig {
            coordinator: self.listen.into(),
            coordinator_key: self.key,
            machine_key: PrivateKey::generate(),
            credential: Some(Credential::AuthKey(self.auth_key(tag).await)),
            hostname: hostname.into(),
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
        let events = Arc::new(Mutex::new(Vec::new()));
        let recorder = tokio::spawn(record(updates, Arc::clone(&events)));
        Node {
            _task: ControlTask::spawn(config, 1, tx),
            recorder,
            events,
        }
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP, for the control listener.
fn free_port() -> SocketAddr {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = udp.local_addr().unwrap();
        if std::net::TcpListener::bind(address).is_ok() {
            return address;
        }
    }
}

/// What a node's control task reported, in short.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Connected,
    NetMap { rules: usize },
    Delta,
    Refused(RefusalCode, String),
    Disconnected(String),
    Other,
}

async fn record(mut updates: mpsc::Receiver<ControlUpdate>, events: Arc<Mutex<Vec<Event>>>) {
    while let Some(update) = updates.recv().await {
        let event = match update.event {
            ControlEvent::Connected(_) => Event::Connected,
            ControlEvent::NetMap(netmap) => Event::NetMap {
                rules: netmap.filter.rules.len(),
            },
            ControlEvent::Delta(_) => Event::Delta,
            ControlEvent::Refused(refusal) => Event::Refused(refusal.code, refusal.message),
            ControlEvent::Disconnected(error) => Event::Disconnected(error.to_string()),
            _ => Event::Other,
        };
        events.lock().unwrap().push(event);
    }
}

struct Node {
    _task: ControlTask,
    recorder: tokio::task::JoinHandle<()>,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.recorder.abort();
    }
}

impl Node {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until an event satisfies `found`; its index.
    async fn wait_for(&self, what: &str, found: impl Fn(&Event) -> bool) -> usize {
        let deadline = Instant::now() + SLOW;
        loop {
            if let Some(at) = self.events().iter().position(&found) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never came: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn session_ends(&self) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| matches!(e, Event::Refused(..) | Event::Disconnected(_)))
            .collect()
    }
}

async fn policy_set(admin: &AdminClient, file: &Path) -> Result<(), (u16, String)> {
    let source = std::fs::read_to_string(file).unwrap();
    match admin
        .set_policy(&file.display().to_string(), &source, false)
        .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Api { status, message }) => Err((status, message)),
        Err(other) => panic!("policy set failed: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_too_large_for_a_netmap_is_refused_naming_nodes_and_sessions_stay() {
    let server = Server::start();
    let web = server.node("tag:web", "web-1").await;
    web.wait_for("web-1's netmap", |e| matches!(e, Event::NetMap { .. }))
        .await;

    server.write_policy(&wide_policy());
    let refusal = server.wait_for_log("is refused", |_| true);
    for expected in [
        "web-1",
        "MiB",
        "4194304",
        "frame limit",
        "keeping the policy in force",
    ] {
        assert!(
            refusal.contains(expected),
            "{expected:?} missing from: {refusal}"
        );
    }
    assert!(
        !server.log().contains("installed the changed policy"),
        "{}",
        server.log()
    );

    // The same policy through the admin socket is refused alike.
    let (status, message) = policy_set(&server.admin(), &server.policy_file())
        .await
        .unwrap_err();
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("web-1") && message.contains("4194304"),
        "{message}"
    );

    // The session stayed up throughout, with the policy in force.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(web.session_ends(), [], "{:?}", web.events());
    assert_eq!(
        web.events()
            .iter()
            .filter(|e| **e == Event::Connected)
            .count(),
        1
    );
}

/// A policy whose `tests` name a device by its overlay address.
fn device_tested(address: &str, expect: &str) -> String {
    format!(
        r#"{{
  "tagOwners": {{"tag:web": [], "tag:c": [], "tag:d": []}},
  "acls": [{{"action": "accept", "src": ["tag:web"], "dst": ["tag:web:443"], "proto": "tcp"}}],
  "tests": [{{"src": "{address}", "{expect}": ["tag:web:443"]}}],
}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_naming_devices_run_against_the_registered_nodes_on_every_install() {
    let server = Server::start();
    let web = server.node("tag:web", "web-1").await;
    web.wait_for("web-1's netmap", |e| matches!(e, Event::NetMap { .. }))
        .await;
    let nodes = server.admin().nodes().await.unwrap();
    let address = nodes[0].ipv4.to_string();

    // web-1 is tag:web, which reaches tag:web:443: the test passes on it.
    let file = server.dir.path().join("devices.hujson");
    std::fs::write(&file, device_tested(&address, "accept")).unwrap();
    let source = std::fs::read_to_string(&file).unwrap();
    let installed = server
        .admin()
        .set_policy("devices.hujson", &source, false)
        .await
        .unwrap();
    assert_eq!(installed.tests_passed, 1);
    assert!(
        !installed
            .warnings
            .iter()
            .any(|w| w.contains("not evaluated offline")),
        "{:?}",
        installed.warnings
    );

    // Expecting the opposite of what the device gets is refused, by both paths.
    std::fs::write(&file, device_tested(&address, "deny")).unwrap();
    let (status, message) = policy_set(&server.admin(), &file).await.unwrap_err();
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("tests fail on the registered nodes") && message.contains(&address),
        "{message}"
    );
    server.write_policy(&device_tested(&address, "deny"));
    let refusal = server.wait_for_log("is refused", |_| true);
    assert!(
        refusal.contains("tests fail on the registered nodes")
            && refusal.contains("keeping the policy in force"),
        "{refusal}"
    );
    assert_eq!(web.session_ends(), [], "{:?}", web.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_set_and_the_file_watcher_apply_the_same_size_limit() {
    let server = Server::start();
    let web = server.node("tag:web", "web-1").await;
    web.wait_for("web-1's netmap", |e| matches!(e, Event::NetMap { .. }))
        .await;
    let limit = MAX_POLICY_BYTES.to_string();

    // Just under the limit (a long comment): both paths accept it.
    let mut within = String::from(POLICY);
    within.push_str("\n//");
    within.push_str(&"x".repeat(MAX_POLICY_BYTES - POLICY.len() - 8));
    within.push('\n');
    assert!(within.len() <= MAX_POLICY_BYTES);
    let file = server.dir.path().join("within.hujson");
    std::fs::write(&file, &within).unwrap();
    policy_set(&server.admin(), &file).await.unwrap();
    server.write_policy(&within);
    server.wait_for_log("installed the changed policy", |_| true);

    // Over it: both refuse, naming the limit, and the policy stays.
    let mut over = within.clone();
    over.push_str(&"// padding\n".repeat(1024));
    std::fs::write(&file, &over).unwrap();
    let (status, message) = policy_set(&server.admin(), &file).await.unwrap_err();
    assert_eq!(status, 413, "{message}");
    assert!(message.contains(&limit), "{message}");
    server.write_policy(&over);
    let refusal = server.wait_for_log("over the", |l| l.contains(&limit));
    assert!(refusal.contains("keeping the policy in force"), "{refusal}");

    assert_eq!(web.session_ends(), [], "{:?}", web.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_netmap_outgrew_a_frame_is_told_and_backs_off() {
    let server = Server::start();
    let web = server.node("tag:web", "web-1").await;
    web.wait_for("web-1's netmap", |e| matches!(e, Event::NetMap { .. }))
        .await;
    // Sources that no node holds yet: the policy passes its budget.
    let policy = generated(100_000, |_| "\"tag:c\"".into());
    let file = server.dir.path().join("tagged.hujson");
    std::fs::write(&file, &policy).unwrap();
    policy_set(&server.admin(), &file).await.unwrap();

    // Each node of tag:c adds its addresses to every one of web-1's rules,
    // until web-1's netmap no longer fits in a frame. Nodes of tag:d take
    // the addresses in between, so no two sources merge into one prefix.
    let mut others = Vec::new();
    for i in 0..8 {
        for tag in ["tag:c", "tag:d"] {
            let name = format!("{}-{i}", &tag[4..]);
            let node = server.node(tag, &name).await;
            node.wait_for("a netmap", |e| matches!(e, Event::NetMap { .. }))
                .await;
            others.push(node);
        }
    }
    let first = web
        .wait_for("the refusal", |e| matches!(e, Event::Refused(..)))
        .await;
    let Event::Refused(code, message) = &web.events()[first] else {
        unreachable!()
    };
    assert_eq!(*code, RefusalCode::Unavailable);
    assert!(
        message.contains("netmap too large") && message.contains("16777216"),
        "{message}"
    );

    // It retries, but after a growing backoff (0.5 s, 1 s, 2 s, ...), not
    // in a tight loop.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let reconnects = web.events()[first..]
        .iter()
        .filter(|e| **e == Event::Connected)
        .count();
    assert!(
        (1..=4).contains(&reconnects),
        "{reconnects} reconnects in 4 s: {:?}",
        web.session_ends()
    );
}
