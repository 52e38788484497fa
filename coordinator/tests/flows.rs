//! Flow records end to end: a real coordinator on 127.0.0.1, nodes that
//! register over real control sessions and send `Flows` batches, and the
//! real `weft-coordinator flows` command reading what was kept.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use syslog_rfc5424::SyslogMessage;
use weft_coordinator::{
    AdminClient, AuthKeyRequest, Coordinator, FlowSettings, FlowView, ServeOptions, SinkSettings,
    SinkTarget, SyslogTransport,
};
use weft_net::tls::Liveness;
use weft_net::Service;
use weft_proto::flows::{
    FlowBatch, FlowDirection, FlowEndpoint, FlowId, FlowPath, FlowRecord, FlowVerdict, RuleId,
    RuleRef, Traffic, MAX_BATCH_RECORDS, MAX_FIELD_LEN,
};
use weft_proto::{
    encode_frame, AuthKey, ClientMessage, Credential, FrameDecoder, Identity, PrivateKey, Register,
    SelfNode, ServerMessage, CLOSE_PROTOCOL_ERROR,
};

const WAIT: Duration = Duration::from_secs(10);
const BIN: &str = env!("CARGO_BIN_EXE_weft-coordinator");

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
  ],
}"#;

/// A coordinator in a temporary data directory.
struct Lab {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    policy: PathBuf,
    flows: FlowSettings,
    coordinator: Option<Coordinator>,
}

impl Lab {
    async fn start(flows: FlowSettings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.hujson");
        std::fs::write(&policy, POLICY).unwrap();
        let mut lab = Self {
            data_dir: dir.path().join("data"),
            _dir: dir,
            policy,
            flows,
            coordinator: None,
        };
        lab.restart().await;
        lab
    }

    async fn restart(&mut self) {
        if let Some(running) = self.coordinator.take() {
            running.shutdown().await;
        }
        let options = ServeOptions {
            data_dir: self.data_dir.clone(),
            policy: Some(self.policy.clone()),
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            public_url: None,
            oidc: None,
            admins: Vec::new(),
            roles: Default::default(),
            store: Default::default(),
            workload_issuers: Vec::new(),
            ephemeral_timeout: weft_coordinator::DEFAULT_EPHEMERAL_TIMEOUT,
            relays: Vec::new(),
            limits: Default::default(),
            flows: self.flows.clone(),
        };
        self.coordinator = Some(Coordinator::start(options).await.unwrap());
    }

    fn coordinator(&self) -> &Coordinator {
        self.coordinator.as_ref().unwrap()
    }

    async fn credential(&self, tag: &str) -> Credential {
        let request = AuthKeyRequest {
            tags: vec![tag.into()],
            reusable: true,
            ephemeral: false,
            expiry_secs: 3600,
        };
        let created = AdminClient::new(&self.data_dir)
            .create_auth_key(&request)
            .await
            .unwrap();
        Credential::AuthKey(AuthKey::new(created.key))
    }

    /// A control session of `machine`, handshake done, not registered.
    async fn connect(&self, machine: &PrivateKey) -> Node {
        let endpoint = weft_net::tls::quic_client(
            "127.0.0.1:0".parse().unwrap(),
            Service::Control,
            Liveness {
                keep_alive: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(30),
            },
        )
        .unwrap();
        let conn = endpoint
            .connect(
                self.coordinator().local_addr(),
                Service::Control.server_name(),
            )
            .unwrap()
            .await
            .unwrap();
        let pinned = self.coordinator().public_key();
        let (send, recv) =
            weft_net::handshake::initiate_quic(&conn, Service::Control, machine, &pinned)
                .await
                .unwrap();
        Node {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(),
            me: None,
        }
    }

    /// A new machine registered as `db`, tagged `tag:db`.
    async fn db(&self) -> Node {
        let credential = self.credential("tag:db").await;
        self.join("db", credential, &PrivateKey::generate()).await
    }

    /// Registers `machine` as a node named `hostname`.
    async fn join(&self, hostname: &str, credential: Credential, machine: &PrivateKey) -> Node {
        let mut node = self.connect(machine).await;
        node.send(&ClientMessage::Register(Register {
            credential: Some(credential),
            hostname: hostname.into(),
            node_key: PrivateKey::generate().public_key(),
            endpoints: Vec::new(),
            home_relay: None,
            attributes: BTreeMap::new(),
            resume: None,
        }))
        .await;
        loop {
            match node.next().await {
                Some(ServerMessage::Registered(me)) => {
                    node.me = Some(me);
                    return node;
                }
                Some(_) => {}
                None => panic!("{hostname} was not registered"),
            }
        }
    }
}

/// The node side of a control session, raw: what it sends is up to the test.
struct Node {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    me: Option<SelfNode>,
}

impl Node {
    fn me(&self) -> &SelfNode {
        self.me.as_ref().unwrap()
    }

    fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.me().ipv4), port)
    }

    async fn send(&mut self, message: &ClientMessage) {
        self.send_raw(&encode_frame(message).unwrap()).await;
    }

    async fn send_raw(&mut self, frame: &[u8]) {
        self.send.write_all(frame).await.unwrap();
    }

    /// The next message; `None` once the session is over.
    async fn next(&mut self) -> Option<ServerMessage> {
        tokio::time::timeout(WAIT, async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if let Some(message) = self.decoder.next_message().unwrap() {
                    return Some(message);
                }
                let n = self.recv.read(&mut buf).await.ok()??;
                self.decoder.push(&buf[..n]);
            }
        })
        .await
        .expect("nothing from the coordinator in time")
    }

    /// Sends `batch` and waits for its acknowledgement.
    async fn report(&mut self, batch: FlowBatch) {
        let id = batch.id;
        self.send(&ClientMessage::Flows(batch)).await;
        loop {
            match self.next().await {
                Some(ServerMessage::FlowsAck { id: acked }) => {
                    assert_eq!(acked, id, "acknowledgements come in order");
                    return;
                }
                Some(_) => {}
                None => panic!("session ended before batch {id} was acknowledged"),
            }
        }
    }

    /// The close code the coordinator ended the session with.
    async fn closed_with(&mut self) -> Option<u32> {
        while self.next().await.is_some() {}
        match tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .unwrap()
        {
            quinn::ConnectionError::ApplicationClosed(close) => {
                u32::try_from(close.error_code.into_inner()).ok()
            }
            _ => None,
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A TCP flow from `src` to `dst` as `reporter` saw it, decided by `verdict`.
fn flow(
    src: SocketAddr,
    dst: SocketAddr,
    direction: FlowDirection,
    verdict: FlowVerdict,
) -> FlowRecord {
    let now = now_ms();
    FlowRecord {
        id: FlowId::compute(6, src, dst, 77),
        start_ms: now - 2_000,
        end_ms: now - 1_000,
        protocol: 6,
        src,
        dst,
        direction,
        verdict,
        rule: (verdict != FlowVerdict::Opened).then_some(RuleRef {
            line: 4,
            id: RuleId(0xabcd),
        }),
        src_identity: FlowEndpoint::default(),
        dst_identity: FlowEndpoint::default(),
        path: FlowPath::Direct,
        to_dst: Traffic {
            packets: 4,
            bytes: 400,
        },
        to_src: Traffic {
            packets: 3,
            bytes: 300,
        },
        ended: true,
        summary: None,
    }
}

fn batch(id: u64, records: Vec<FlowRecord>) -> FlowBatch {
    FlowBatch {
        id,
        records,
        dropped: 0,
    }
}

/// `weft-coordinator flows ARGS --data-dir DIR`, its stdout.
fn flows_command(data_dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("flows")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flows {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The records `flows --json ARGS` lists.
async fn flows_json(data_dir: &Path, args: &[&str]) -> Vec<FlowView> {
    let data_dir = data_dir.to_owned();
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.push("--json".into());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&flows_command(&data_dir, &args)).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_report_and_the_coordinator_keeps_each_batch_once() {
    let mut lab = Lab::start(FlowSettings::default()).await;
    let (web_machine, db_machine) = (PrivateKey::generate(), PrivateKey::generate());
    let mut web = lab
        .join("web", lab.credential("tag:web").await, &web_machine)
        .await;
    let mut db = lab
        .join("db", lab.credential("tag:db").await, &db_machine)
        .await;
    let (client, server) = (web.at(40_000), db.at(5432));

    // db's inbound view of web's connection, with a lie about who web is,
    // and a record of traffic db is no end of.
    let mut accepted = flow(client, server, FlowDirection::Inbound, FlowVerdict::Accept);
    accepted.src_identity = FlowEndpoint {
        node: Some(weft_proto::NodeId(999)),
        name: Some("admin-workstation".into()),
        identity: Identity::tagged(vec!["tag:admin".into()]),
    };
    let elsewhere: SocketAddr = "100.64.9.9:5432".parse().unwrap();
    let not_db = flow(client, elsewhere, FlowDirection::Inbound, FlowVerdict::Deny);
    db.report(batch(1, vec![accepted.clone(), not_db])).await;
    // web's outbound view of the same connection.
    let opened = flow(client, server, FlowDirection::Outbound, FlowVerdict::Opened);
    web.report(batch(1, vec![opened])).await;
    // The acknowledgement of batch 1 was lost: db sends it again with the next.
    let denied = flow(
        web.at(40_001),
        db.at(22),
        FlowDirection::Inbound,
        FlowVerdict::Deny,
    );
    let audited = flow(
        web.at(40_002),
        db.at(6379),
        FlowDirection::Inbound,
        FlowVerdict::AuditDeny,
    );
    db.report(batch(1, vec![accepted.clone()])).await;
    db.report(batch(2, vec![denied, audited])).await;

    let all = flows_json(&lab.data_dir, &[]).await;
    let kept: Vec<(&str, u64, u32)> = all
        .iter()
        .map(|v| (v.reporter.name.as_str(), v.batch, v.kept.index))
        .collect();
    assert_eq!(
        kept,
        [("db", 1, 0), ("web", 1, 0), ("db", 2, 0), ("db", 2, 1)]
    );
    let first = &all[0];
    let src = &first.kept.record.src_identity;
    assert_eq!(
        src.name.as_deref(),
        Some("web"),
        "the registry names web, not the node's claim"
    );
    assert_eq!(src.node, Some(web.me().id));
    assert_eq!(src.identity.tags, ["tag:web"]);
    assert_eq!(first.kept.record.dst_identity.identity.tags, ["tag:db"]);
    assert!(first.kept.src_verified && first.kept.dst_verified);
    assert_eq!(first.kept.record.rule.map(|r| r.line), Some(4));

    // Both ends' records of one connection share its id.
    let id = accepted.id.to_string();
    let same_flow = flows_json(&lab.data_dir, &["--id", &id]).await;
    let reporters: Vec<&str> = same_flow.iter().map(|v| v.reporter.name.as_str()).collect();
    assert_eq!(reporters, ["db", "web"]);

    let audit = flows_json(
        &lab.data_dir,
        &["--verdict", "audit-deny", "--since", "10m"],
    )
    .await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].kept.record.dst, db.at(6379));
    assert_eq!(
        flows_json(&lab.data_dir, &["--src", "tag:web", "--dst", "n999"]).await,
        []
    );
    let to_db = flows_json(
        &lab.data_dir,
        &["--src", "web", "--dst", &db.me().ipv4.to_string()],
    )
    .await;
    assert_eq!(to_db.len(), 4);
    assert_eq!(flows_json(&lab.data_dir, &["--limit", "1"]).await, all[3..]);

    let data_dir = lab.data_dir.clone();
    let text =
        tokio::task::spawn_blocking(move || flows_command(&data_dir, &["--verdict", "deny"]))
            .await
            .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for needle in [
        "deny",
        "line 4",
        "web (tag:web)",
        "db (tag:db)",
        "tcp ",
        ":22",
        "direct",
        "400/300",
    ] {
        assert!(
            lines[1].contains(needle),
            "{needle:?} not in {:?}",
            lines[1]
        );
    }

    // A restart keeps the records and still knows which batches it has.
    drop((web, db));
    lab.restart().await;
    assert_eq!(flows_json(&lab.data_dir, &[]).await, all);
    let mut db = lab
        .join("db", lab.credential("tag:db").await, &db_machine)
        .await;
    db.report(batch(
        2,
        vec![flow(
            client,
            server,
            FlowDirection::Inbound,
            FlowVerdict::Accept,
        )],
    ))
    .await;
    assert_eq!(flows_json(&lab.data_dir, &[]).await, all);
    db.report(batch(3, vec![accepted])).await;
    assert_eq!(flows_json(&lab.data_dir, &[]).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_is_a_protocol_error_and_nothing_of_it_is_kept() {
    let lab = Lab::start(FlowSettings::default()).await;
    let credential = lab.credential("tag:db").await;
    let machine = PrivateKey::generate();
    type Frame = fn(&Node) -> Vec<u8>;
    let cases: [(&str, Frame); 4] = [
        ("an oversized name", |node| {
            let mut record = flow(
                node.at(1),
                node.at(2),
                FlowDirection::Inbound,
                FlowVerdict::Deny,
            );
            record.src_identity.name = Some("x".repeat(MAX_FIELD_LEN + 1));
            encode_frame(&ClientMessage::Flows(batch(1, vec![record]))).unwrap()
        }),
        ("too many records", |node| {
            let record = flow(
                node.at(1),
                node.at(2),
                FlowDirection::Inbound,
                FlowVerdict::Deny,
            );
            let records = vec![record; MAX_BATCH_RECORDS + 1];
            encode_frame(&ClientMessage::Flows(batch(1, records))).unwrap()
        }),
        ("a time from a clock never set", |node| {
            let mut record = flow(
                node.at(1),
                node.at(2),
                FlowDirection::Inbound,
                FlowVerdict::Deny,
            );
            record.start_ms = 5;
            encode_frame(&ClientMessage::Flows(batch(1, vec![record]))).unwrap()
        }),
        ("garbage in a well-framed message", |node| {
            let record = flow(
                node.at(1),
                node.at(2),
                FlowDirection::Inbound,
                FlowVerdict::Deny,
            );
            let mut frame = encode_frame(&ClientMessage::Flows(batch(1, vec![record]))).unwrap();
            for byte in &mut frame[6..] {
                *byte = 0xff;
            }
            frame
        }),
    ];
    for (what, frame) in cases {
        let mut node = lab.join("db", credential.clone(), &machine).await;
        node.send_raw(&frame(&node)).await;
        assert_eq!(
            node.closed_with().await,
            Some(CLOSE_PROTOCOL_ERROR),
            "{what}"
        );
    }
    // Flow records from a session that has not registered are refused too.
    let mut stranger = lab.connect(&PrivateKey::generate()).await;
    let record = flow(
        "100.64.0.1:1".parse().unwrap(),
        "100.64.0.2:2".parse().unwrap(),
        FlowDirection::Inbound,
        FlowVerdict::Deny,
    );
    stranger
        .send(&ClientMessage::Flows(batch(1, vec![record])))
        .await;
    assert_eq!(stranger.closed_with().await, Some(CLOSE_PROTOCOL_ERROR));
    assert_eq!(flows_json(&lab.data_dir, &[]).await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_segments_past_their_age() {
    let settings = FlowSettings {
        max_age: Duration::from_secs(2),
        segment_age: Duration::from_secs(1),
        ..FlowSettings::default()
    };
    let lab = Lab::start(settings).await;
    let mut db = lab.db().await;
    let record = |port| {
        flow(
            db.at(port),
            db.at(5432),
            FlowDirection::Inbound,
            FlowVerdict::Accept,
        )
    };
    let (old, new) = (record(1000), record(2000));
    db.report(batch(1, vec![old])).await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    db.report(batch(2, vec![new])).await;
    let kept = flows_json(&lab.data_dir, &[]).await;
    assert_eq!(kept.iter().map(|v| v.batch).collect::<Vec<_>>(), [2]);
    let segments = std::fs::read_dir(lab.data_dir.join("flows"))
        .unwrap()
        .count();
    assert!(segments <= 3, "{segments} segments left");
}

/// An OTLP/HTTP logs receiver on 127.0.0.1: every export it decodes, in order.
async fn otlp_receiver() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<ExportLogsServiceRequest>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    assert_eq!(request.uri().path(), "/v1/logs");
                    assert_eq!(request.headers()["content-type"], "application/x-protobuf");
                    assert_eq!(request.headers()["x-tenant"], "ops");
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    tx.send(ExportLogsServiceRequest::decode(body).unwrap())
                        .unwrap();
                    let answer = ExportLogsServiceResponse::default().encode_to_vec();
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        answer,
                    ))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (address, rx)
}

/// The messages of an RFC 6587 octet-counted stream: `LEN SP MESSAGE`.
async fn octet_counted(stream: &mut tokio::net::TcpStream, count: usize) -> Vec<SyslogMessage> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut messages = Vec::new();
    while messages.len() < count {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("syslog over TCP too slow")
            .unwrap();
        assert!(n > 0, "the sink closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(space) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..space]).unwrap().parse().unwrap();
            if buf.len() < space + 1 + len {
                break;
            }
            let message = std::str::from_utf8(&buf[space + 1..space + 1 + len]).unwrap();
            messages.push(syslog_rfc5424::parse_message(message).unwrap());
            buf.drain(..space + 1 + len);
        }
    }
    messages
}

/// The record a syslog message carries as its MSG.
fn carried(message: &SyslogMessage) -> FlowView {
    let json = message.msg.strip_prefix('\u{feff}').expect("UTF-8 BOM");
    serde_json::from_str(json).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_records_reach_every_sink_and_a_sink_that_is_down_holds_up_nothing() {
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let (otlp, mut exports) = otlp_receiver().await;
    let scratch = tempfile::tempdir().unwrap();
    let jsonl = scratch.path().join("flows.jsonl");
    let sink = |name: &str, audit: bool, target: SinkTarget| SinkSettings {
        name: name.into(),
        queue: 100,
        audit,
        target,
    };
    let settings = FlowSettings {
        sinks: vec![
            sink(
                "siem-udp",
                true,
                SinkTarget::Syslog {
                    address: udp.local_addr().unwrap().to_string(),
                    transport: SyslogTransport::Udp,
                    facility: 16,
                },
            ),
            sink(
                "siem-tcp",
                false,
                SinkTarget::Syslog {
                    address: format!("127.0.0.1:{tcp_port}"),
                    transport: SyslogTransport::Tcp,
                    facility: 17,
                },
            ),
            sink(
                "otel",
                false,
                SinkTarget::Otlp {
                    url: format!("http://{otlp}/v1/logs").parse().unwrap(),
                    headers: vec![("x-tenant".into(), "ops".into())],
                },
            ),
            sink(
                "file",
                false,
                SinkTarget::Jsonl {
                    path: jsonl.clone(),
                },
            ),
        ],
        ..FlowSettings::default()
    };
    let lab = Lab::start(settings).await;
    let mut db = lab.db().await;
    let record = |port, verdict| flow(db.at(port), db.at(5432), FlowDirection::Inbound, verdict);
    let (denied, audited) = (
        record(1000, FlowVerdict::Deny),
        record(1001, FlowVerdict::AuditDeny),
    );
    // Nothing listens on the TCP sink's port: the acknowledgement comes anyway.
    tokio::time::timeout(
        Duration::from_secs(2),
        db.report(batch(1, vec![denied.clone(), audited.clone()])),
    )
    .await
    .expect("a sink that is down held up intake");

    let mut datagram = vec![0u8; 65_536];
    let mut over_udp = Vec::new();
    // Audit entries (the auth key created above, db's registration) come too.
    let is_flow = |m: &SyslogMessage| m.msgid.as_deref() == Some("flow");
    while over_udp.iter().filter(|m| is_flow(m)).count() < 2 {
        let n = tokio::time::timeout(WAIT, udp.recv(&mut datagram))
            .await
            .expect("no syslog datagram")
            .unwrap();
        let text = std::str::from_utf8(&datagram[..n]).unwrap();
        over_udp.push(syslog_rfc5424::parse_message(text).unwrap());
    }
    let flows: Vec<&SyslogMessage> = over_udp.iter().filter(|m| is_flow(m)).collect();
    assert!(over_udp
        .iter()
        .any(|m| m.msgid.as_deref() == Some("audit") && m.msg.contains("auth_key_created")));
    assert_eq!(flows[0].appname.as_deref(), Some("weft-coordinator"));
    assert_eq!(
        flows[0].severity,
        syslog_rfc5424::SyslogSeverity::SEV_WARNING
    );
    assert_eq!(
        flows[1].severity,
        syslog_rfc5424::SyslogSeverity::SEV_NOTICE
    );
    let first = carried(flows[0]);
    assert_eq!(first.kept.record.id, denied.id);
    assert_eq!(first.reporter.name, "db");
    assert_eq!(
        first.kept.record.dst_identity.identity.tags,
        ["tag:db"],
        "sinks get the record as kept, identities filled"
    );

    let export = tokio::time::timeout(WAIT, exports.recv())
        .await
        .expect("no OTLP export")
        .unwrap();
    let resource = &export.resource_logs[0];
    let service = resource.resource.as_ref().unwrap().attributes[0].clone();
    assert_eq!(service.key, "service.name");
    let logs = &resource.scope_logs[0].log_records;
    assert_eq!(logs.len(), 2);
    assert_eq!(logs[0].event_name, "weft.flow");
    let verdict = logs[1]
        .attributes
        .iter()
        .find(|kv| kv.key == "weft.flow.verdict")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref());
    assert_eq!(verdict, Some(&Value::StringValue("audit-deny".into())));

    let lines = std::fs::read_to_string(&jsonl).unwrap();
    let in_file: Vec<FlowView> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(in_file, flows_json(&lab.data_dir, &[]).await);

    // The TCP receiver comes up: the sink retries and delivers what it held.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", tcp_port))
        .await
        .unwrap();
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(40), listener.accept())
        .await
        .expect("the TCP sink never reconnected")
        .unwrap();
    let over_tcp = octet_counted(&mut stream, 2).await;
    assert_eq!(
        over_tcp[0].facility,
        syslog_rfc5424::SyslogFacility::LOG_LOCAL1
    );
    assert_eq!(carried(&over_tcp[1]).kept.record.id, audited.id);
}

/// The committed JSON schema `docs/schema/NAME`.
fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schema")
        .join(name);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

/// Every element of the JSON array `text` is valid under `validator`.
fn assert_valid(validator: &jsonschema::Validator, text: &str) -> Vec<serde_json::Value> {
    let elements: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    for element in &elements {
        let errors: Vec<String> = validator
            .iter_errors(element)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?} in {element:#}");
    }
    elements
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_flows_and_audit_print_follows_the_committed_schemas() {
    let lab = Lab::start(FlowSettings::default()).await;
    let mut db = lab.db().await;
    let accepted = flow(
        db.at(1),
        db.at(5432),
        FlowDirection::Inbound,
        FlowVerdict::Accept,
    );
    let mut summary = flow(
        "[fd7a::99]:0".parse().unwrap(),
        SocketAddr::new(IpAddr::V6(db.me().ipv6), 22),
        FlowDirection::Inbound,
        FlowVerdict::AuditDeny,
    );
    summary.path = FlowPath::Relay {
        name: "fra1".into(),
    };
    summary.src_identity.identity.user = Some("ghost@example.com".into());
    summary.summary = Some(weft_proto::flows::DenialSummary {
        flows: 3,
        more_ids: vec![FlowId([7; 16]), FlowId([8; 16])],
    });
    let mut opened = flow(
        db.at(40_000),
        db.at(80),
        FlowDirection::Outbound,
        FlowVerdict::Opened,
    );
    opened.path = FlowPath::Unknown;
    opened.ended = false;
    db.report(batch(1, vec![accepted, summary, opened])).await;

    let data_dir = lab.data_dir.clone();
    let (flows, audit) = tokio::task::spawn_blocking(move || {
        let flows = flows_command(&data_dir, &["--json"]);
        let out = std::process::Command::new(BIN)
            .args(["audit", "--json", "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        (flows, String::from_utf8(out.stdout).unwrap())
    })
    .await
    .unwrap();
    let flow_schema = schema("flow-record.json");
    let records = assert_valid(&flow_schema, &flows);
    assert_eq!(records.len(), 3);
    let audit_schema = schema("audit-entry.json");
    let entries = assert_valid(&audit_schema, &audit);
    let kinds: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["event"]["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"auth_key_created") && kinds.contains(&"node_registered"),
        "{kinds:?}"
    );

    // The schemas do tell wrong output from right.
    let mut wrong = records[0].clone();
    wrong["verdict"] = "audit-deny".into();
    assert!(!flow_schema.is_valid(&wrong));
    let mut wrong = entries[0].clone();
    wrong["hash"] = "not a hash".into();
    assert!(!audit_schema.is_valid(&wrong));
}
