//! The local API client the `weft` CLI uses.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::{
    ErrorBody, LoginRequest, NetcheckReport, PingReply, PingRequest, Status, UpReply, UpRequest,
    WhoIs,
};

/// Why a call to weftd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot reach weftd at {}: is weftd running? (start it with `weftd`, or pass --socket)", socket.display())]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The socket is there but this user may not use it.
    #[error("cannot reach weftd at {}: permission denied (the socket is root-only; run weft as root)", socket.display())]
    PermissionDenied {
        /// The socket tried.
        socket: PathBuf,
    },
    /// weftd answered with an error; the message is weftd's.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// weftd's explanation.
        message: String,
    },
    /// weftd's answer could not be understood.
    #[error("weftd sent an unexpected reply ({0}); are weft and weftd the same version?")]
    Protocol(String),
}

/// A client for one weftd socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// `POST /v1/up`.
    pub async fn up(&self, request: &UpRequest) -> Result<UpReply, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/up", body).await
    }

    /// `POST /v1/login`.
    pub async fn login(&self, request: &LoginRequest) -> Result<UpReply, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/login", body).await
    }

    /// `POST /v1/down`.
    pub async fn down(&self) -> Result<Status, ClientError> {
        self.call(Method::POST, "/v1/down", Vec::new()).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call(Method::GET, "/v1/status", Vec::new()).await
    }

    /// `POST /v1/ping`: one probe.
    pub async fn ping(&self, request: &PingRequest) -> Result<PingReply, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/ping", body).await
    }

    /// `GET /v1/netcheck`.
    pub async fn netcheck(&self) -> Result<NetcheckReport, ClientError> {
        self.call(Method::GET, "/v1/netcheck", Vec::new()).await
    }

    /// `GET /v1/whois?addr=ADDRESS`, `ADDRESS` being `IP`, `IP:PORT` or `[IPv6]:PORT`.
    pub async fn whois(&self, address: &str) -> Result<WhoIs, ClientError> {
        let encoded: String = address
            .trim()
            .bytes()
            .map(|b| match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' | b'.' | b':' => char::from(b).to_string(),
                other => format!("%{other:02X}"),
            })
            .collect();
        self.call(
            Method::GET,
            &format!("/v1/whois?addr={encoded}"),
            Vec::new(),
        )
        .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            let socket = self.socket.clone();
            match e.kind() {
                std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { socket },
                _ => ClientError::Unreachable { socket },
            }
        })?;
        let protocol = |e: &dyn std::fmt::Display| ClientError::Protocol(e.to_string());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(&e))?;
        let connection = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "weftd")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| protocol(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| protocol(&e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| protocol(&e))?
            .to_bytes();
        connection.abort();
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| protocol(&e));
        }
        let message = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => body.error,
            Err(_) => format!(
                "weftd answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::api::{
        bind, serve, Command, CommandError, CoordinatorStatus, FilterStatus, LoginPending,
        RunState, SelfStatus,
    };

    fn status(state: RunState) -> Status {
        Status {
            state,
            message: None,
            login_url: None,
            self_node: None,
            coordinator: CoordinatorStatus {
                address: None,
                connected: false,
                connected_to: None,
            },
            peers: vec![],
            filter: FilterStatus::default(),
            flows: crate::api::FlowLogStatus::default(),
        }
    }

    /// Stands in for the device loop: answers commands from a fixed script.
    async fn answer(mut commands: mpsc::Receiver<Command>) {
        while let Some(command) = commands.recv().await {
            match command {
                Command::Status(reply) => {
                    let _ = reply.send(status(RunState::Running));
                }
                Command::Down(reply) => {
                    let _ = reply.send(status(RunState::Stopped));
                }
                Command::Up(request, reply) => {
                    let answer = match (request.auth_key, request.device_code) {
                        (Some(_), _) => Ok(UpReply::Running(SelfStatus {
                            hostname: request.hostname.unwrap_or_default(),
                            addresses: vec!["100.64.0.1".parse().unwrap()],
                            identity: "tag:web".into(),
                            id: 7,
                            node_key: "AAAA".into(),
                            key_expiry: None,
                        })),
                        (None, false) => Ok(UpReply::LoginRequired(LoginPending {
                            login_url: "http://198.51.100.1:7443/login/x".into(),
                            user_code: None,
                            expires_in_secs: 600,
                        })),
                        (None, true) => Err(CommandError::Refused("no device-code login".into())),
                    };
                    let _ = reply.send(answer);
                }
                Command::Login(_, reply) => {
                    let _ = reply.send(Err(CommandError::Invalid("not joined".into())));
                }
                Command::WhoIs(addr, reply) => {
                    let peer = weft_dataplane::core::PeerStatus {
                        id: weft_proto::NodeId(4),
                        name: "db".into(),
                        addresses: vec!["100.64.0.4".parse().unwrap(), "fd7a::4".parse().unwrap()],
                        identity: weft_proto::Identity::tagged(vec!["tag:db".into()]),
                        endpoint: None,
                        path: None,
                        relay: None,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    };
                    let _ = reply.send(crate::api::whois_lookup(&[peer], &[], addr));
                }
                Command::Ping(request, reply) => {
                    let answer = match request.peer.as_str() {
                        "db" => Ok(PingReply {
                            peer: "db".into(),
                            address: Some("100.64.0.4".parse().unwrap()),
                            pong: true,
                            path: Some(crate::api::PathKind::Relay),
                            relay: Some("fra1".into()),
                            endpoint: None,
                            rtt_ms: Some(1.5),
                        }),
                        other => Err(CommandError::NotFound(format!("no peer named {other}"))),
                    };
                    let _ = reply.send(answer);
                }
                Command::Metrics(_) => {}
                Command::Netcheck(reply) => {
                    let _ = reply.send(NetcheckReport {
                        udp: false,
                        mapping: None,
                        reflexive: vec![],
                        local: vec!["198.18.1.2:51820".parse().unwrap()],
                        relays: vec![],
                    });
                }
            }
        }
    }

    #[tokio::test]
    async fn the_client_drives_the_server_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/weftd.sock");
        let listener = bind(&socket, None).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(answer(rx));

        let client = ApiClient::new(&socket);
        assert_eq!(client.status().await.unwrap().state, RunState::Running);
        assert_eq!(client.down().await.unwrap().state, RunState::Stopped);

        let mut request = UpRequest {
            coordinator: "198.51.100.1:7443".parse().unwrap(),
            coordinator_key: weft_proto::PrivateKey::generate().public_key(),
            auth_key: Some(weft_proto::AuthKey::new("weft-auth-0123456789ab-s")),
            hostname: Some("web-1".into()),
            device_code: false,
            identity_token_file: None,
        };
        let UpReply::Running(me) = client.up(&request).await.unwrap() else {
            panic!("not running");
        };
        assert_eq!((me.hostname.as_str(), me.id), ("web-1", 7));

        request.auth_key = None;
        let UpReply::LoginRequired(pending) = client.up(&request).await.unwrap() else {
            panic!("no login prompt");
        };
        assert_eq!(pending.login_url, "http://198.51.100.1:7443/login/x");

        request.device_code = true;
        match client.up(&request).await.unwrap_err() {
            ClientError::Api { status, message } => {
                assert_eq!(status, 403);
                assert_eq!(message, "no device-code login");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = client.login(&LoginRequest::default()).await.unwrap_err();
        assert!(err.to_string().contains("not joined"), "{err}");
    }

    #[tokio::test]
    async fn whois_answers_known_addresses_and_404s_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(bind(&socket, None).unwrap(), tx));
        tokio::spawn(answer(rx));
        let client = ApiClient::new(&socket);
        let who = client.whois("100.64.0.4:5432").await.unwrap();
        assert_eq!((who.node.name.as_str(), who.node.id), ("db", 4));
        assert_eq!(who.identity.tags, vec!["tag:db"]);
        let by_v6 = client.whois("[fd7a::4]:5432").await.unwrap();
        assert_eq!(by_v6.node.name, "db");
        match client.whois("100.64.0.5").await.unwrap_err() {
            ClientError::Api { status, message } => {
                assert_eq!(status, 404);
                assert!(message.contains("100.64.0.5"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = client.whois("db & more").await.unwrap_err();
        assert!(err.to_string().contains("not an IP address"), "{err}");
    }

    #[tokio::test]
    async fn ping_and_netcheck_travel_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(bind(&socket, None).unwrap(), tx));
        tokio::spawn(answer(rx));
        let client = ApiClient::new(&socket);
        let pong = client
            .ping(&PingRequest { peer: "db".into() })
            .await
            .unwrap();
        assert_eq!((pong.pong, pong.relay.as_deref()), (true, Some("fra1")));
        match client
            .ping(&PingRequest {
                peer: "nope".into(),
            })
            .await
            .unwrap_err()
        {
            ClientError::Api { status, message } => {
                assert_eq!(status, 404);
                assert!(message.contains("nope"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let report = client.netcheck().await.unwrap();
        assert!(!report.udp);
        assert_eq!(report.local, ["198.18.1.2:51820".parse().unwrap()]);
    }

    #[tokio::test]
    async fn a_missing_daemon_is_reported_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let err = ApiClient::new(&dir.path().join("none.sock"))
            .status()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("is weftd running?"), "{text}");
        assert!(text.contains("none.sock"), "{text}");
    }

    #[tokio::test]
    async fn malformed_requests_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(bind(&socket, None).unwrap(), tx));
        tokio::spawn(answer(rx));
        let client = ApiClient::new(&socket);
        let err = client
            .call::<SelfStatus>(Method::POST, "/v1/up", b"{\"coordinator\": 1}".to_vec())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Api {
                    status: 400 | 422,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
