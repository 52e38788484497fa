//! The local API server: decodes requests and hands them to the device loop
//! as [`Command`]s, so all state lives in one place.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use nix::unistd::Gid;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::{
    parse_address, ApiError, Command, CommandError, LoginRequest, NetcheckReport, PingReply,
    PingRequest, Status, UpReply, UpRequest, WhoIs, WhoIsQuery,
};

/// How long `POST /v1/up` waits for registration and the first netmap.
pub const UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `POST /v1/ping` waits for the device's answer; the core gives
/// up on a ping after 2 s, so this only bounds a daemon that lost it.
const PING_WAIT: Duration = Duration::from_secs(5);

/// Binds the API socket: creates its directory if missing, replaces a stale
/// socket left by a crash — never any other kind of file — and restricts the
/// socket to its owner (0600), or to its owner and `group` (0660), whose
/// members may then read status and `whois` but not change the node.
pub fn bind(path: &Path, group: Option<Gid>) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(if group.is_some() { 0o750 } else { 0o700 })
                .create(parent)?;
            if group.is_some() {
                nix::unistd::chown(parent, None, group)?;
            }
        }
    }
    let listener = weft_net::unix::bind_private(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(e.kind(), format!("{e} (pass another --socket)"))
        } else {
            e
        }
    })?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(listener)
}

/// Serves the API until the listener fails.
pub async fn serve(listener: UnixListener, commands: mpsc::Sender<Command>) -> std::io::Result<()> {
    let app = router(commands).into_make_service_with_connect_info::<Caller>();
    axum::serve(listener, app).await
}

/// Who is calling, from the socket's peer credentials.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|cred| cred.uid()),
        }
    }
}

impl Caller {
    /// Only root and weftd's own user change the node; members of the
    /// socket's group (applications asking `whois`) only read.
    fn may_change(self) -> Result<(), ApiError> {
        let own = nix::unistd::geteuid().as_raw();
        match self.uid {
            Some(uid) if uid == 0 || uid == own => Ok(()),
            _ => Err(ApiError::Forbidden(
                "only root or weftd's own user may change the node; members of weftd's --socket-group may read status and whois".into(),
            )),
        }
    }
}

fn router(commands: mpsc::Sender<Command>) -> Router {
    Router::new()
        .route("/v1/up", post(up))
        .route("/v1/login", post(login))
        .route("/v1/down", post(down))
        .route("/v1/status", get(status))
        .route("/v1/whois", get(whois))
        .route("/v1/ping", post(ping))
        .route("/v1/netcheck", get(netcheck))
        .route("/metrics", get(metrics))
        .with_state(commands)
}

async fn up(
    ConnectInfo(caller): ConnectInfo<Caller>,
    State(commands): State<mpsc::Sender<Command>>,
    body: Result<Json<UpRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<UpReply>), ApiError> {
    caller.may_change()?;
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Up(request, reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    wait_for_up(&commands, answer).await
}

async fn login(
    ConnectInfo(caller): ConnectInfo<Caller>,
    State(commands): State<mpsc::Sender<Command>>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<UpReply>), ApiError> {
    caller.may_change()?;
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Login(request, reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    wait_for_up(&commands, answer).await
}

/// 200 once running, 202 with the login URL when a person must log in.
async fn wait_for_up(
    commands: &mpsc::Sender<Command>,
    answer: oneshot::Receiver<Result<UpReply, CommandError>>,
) -> Result<(StatusCode, Json<UpReply>), ApiError> {
    match tokio::time::timeout(UP_TIMEOUT, answer).await {
        Ok(Ok(result)) => result.map_err(ApiError::from).map(|reply| {
            let status = match reply {
                UpReply::Running(_) => StatusCode::OK,
                UpReply::LoginRequired(_) => StatusCode::ACCEPTED,
            };
            (status, Json(reply))
        }),
        Ok(Err(_)) => Err(ApiError::ShuttingDown),
        Err(_) => {
            let last = ask(commands, Command::Status)
                .await
                .ok()
                .and_then(|s| s.message)
                .map(|m| format!(" (last error: {m})"))
                .unwrap_or_default();
            Err(ApiError::Timeout(format!(
                "not registered with the coordinator within {} s{last}; weftd keeps trying, see `weft status`",
                UP_TIMEOUT.as_secs()
            )))
        }
    }
}

async fn down(
    ConnectInfo(caller): ConnectInfo<Caller>,
    State(commands): State<mpsc::Sender<Command>>,
) -> Result<Json<Status>, ApiError> {
    caller.may_change()?;
    ask(&commands, Command::Down).await.map(Json)
}

/// Anyone on the socket reads the status; only those who may change the
/// node see a pending login link.
async fn status(
    ConnectInfo(caller): ConnectInfo<Caller>,
    State(commands): State<mpsc::Sender<Command>>,
) -> Result<Json<Status>, ApiError> {
    let mut status = ask(&commands, Command::Status).await?;
    if caller.may_change().is_err() {
        status.login_url = None;
    }
    Ok(Json(status))
}

async fn whois(
    State(commands): State<mpsc::Sender<Command>>,
    query: Result<Query<WhoIsQuery>, QueryRejection>,
) -> Result<Json<WhoIs>, ApiError> {
    let Query(query) = query
        .map_err(|_| ApiError::BadRequest("missing `addr`; ask /v1/whois?addr=IP[:PORT]".into()))?;
    let addr = parse_address(&query.addr)?;
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::WhoIs(addr, reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    answer
        .await
        .map_err(|_| ApiError::ShuttingDown)?
        .map(Json)
        .map_err(ApiError::from)
}

async fn ping(
    ConnectInfo(caller): ConnectInfo<Caller>,
    State(commands): State<mpsc::Sender<Command>>,
    body: Result<Json<PingRequest>, JsonRejection>,
) -> Result<Json<PingReply>, ApiError> {
    caller.may_change()?;
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Ping(request, reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    match tokio::time::timeout(PING_WAIT, answer).await {
        Ok(Ok(result)) => result.map(Json).map_err(ApiError::from),
        Ok(Err(_)) => Err(ApiError::ShuttingDown),
        Err(_) => Err(ApiError::Timeout(
            "weftd did not answer the ping in time; see its log".into(),
        )),
    }
}

async fn netcheck(
    State(commands): State<mpsc::Sender<Command>>,
) -> Result<Json<NetcheckReport>, ApiError> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Netcheck(reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    answer.await.map(Json).map_err(|_| ApiError::ShuttingDown)
}

async fn metrics(
    State(commands): State<mpsc::Sender<Command>>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let text = metrics_text(&commands).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            weft_net::metrics_http::CONTENT_TYPE,
        )],
        text,
    ))
}

/// The Prometheus exposition of the device's counters
/// ([`weft_engine::metrics`]): what `GET /metrics` and `--metrics-listen` serve.
pub async fn metrics_text(commands: &mpsc::Sender<Command>) -> Result<String, ApiError> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Metrics(reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    let snapshot = answer.await.map_err(|_| ApiError::ShuttingDown)?;
    Ok(weft_engine::metrics::render(&snapshot))
}

async fn ask(
    commands: &mpsc::Sender<Command>,
    command: fn(oneshot::Sender<Status>) -> Command,
) -> Result<Status, ApiError> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(command(reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    answer.await.map_err(|_| ApiError::ShuttingDown)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn only_root_and_weftds_user_change_the_node() {
        let own = nix::unistd::geteuid().as_raw();
        for uid in [0, own] {
            assert!(Caller { uid: Some(uid) }.may_change().is_ok());
        }
        let other = Caller {
            uid: Some(own.wrapping_add(4242).max(1)),
        };
        let err = other.may_change().unwrap_err();
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert!(err.to_string().contains("--socket-group"), "{err}");
        assert!(Caller { uid: None }.may_change().is_err());
    }

    /// A reader on the socket's group must not see a pending login link:
    /// whoever opens it first chooses whose identity the node joins as.
    #[tokio::test]
    async fn only_those_who_may_change_the_node_see_the_login_link() {
        let (commands, mut requests) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Command::Status(reply)) = requests.recv().await {
                let status = crate::api::Status {
                    state: crate::api::RunState::NeedsLogin,
                    message: Some("waiting for a person to log in".into()),
                    login_url: Some("https://coord.example.com/login/secret".into()),
                    self_node: None,
                    coordinator: crate::api::CoordinatorStatus {
                        address: None,
                        connected: false,
                        connected_to: None,
                    },
                    peers: Vec::new(),
                    filter: crate::api::FilterStatus::default(),
                    flows: crate::api::FlowLogStatus::default(),
                };
                let _ = reply.send(status);
            }
        });
        let own = nix::unistd::geteuid().as_raw();
        let reader = Caller {
            uid: Some(own.wrapping_add(4242).max(1)),
        };
        let Json(seen) = status(ConnectInfo(reader), State(commands.clone()))
            .await
            .unwrap();
        assert_eq!(seen.login_url, None);
        let text = serde_json::to_string(&seen).unwrap();
        assert!(!text.contains("/login/"), "{text}");
        let Json(seen) = status(ConnectInfo(Caller { uid: Some(0) }), State(commands))
            .await
            .unwrap();
        assert_eq!(
            seen.login_url.as_deref(),
            Some("https://coord.example.com/login/secret")
        );
    }

    #[tokio::test]
    async fn a_socket_group_may_read_the_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("private/weftd.sock");
        let _listener = bind(&private, None).unwrap();
        assert_eq!(std::fs::metadata(&private).unwrap().mode() & 0o777, 0o600);

        let shared = tmp.path().join("shared/weftd.sock");
        // Root may hand the socket to any group; others only to their own.
        let group = if nix::unistd::geteuid().is_root() {
            Gid::from_raw(4242)
        } else {
            nix::unistd::getegid()
        };
        let _listener = bind(&shared, Some(group)).unwrap();
        let meta = std::fs::metadata(&shared).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, group.as_raw()));
        let dir = std::fs::metadata(shared.parent().unwrap()).unwrap();
        assert_eq!((dir.mode() & 0o777, dir.gid()), (0o750, group.as_raw()));
    }

    #[tokio::test]
    async fn metrics_render_the_loops_snapshot() {
        let (commands, mut requests) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Command::Metrics(reply)) = requests.recv().await {
                let _ = reply.send(weft_engine::metrics::NodeMetrics {
                    clock: std::time::SystemTime::now(),
                    state: crate::api::RunState::Running,
                    coordinator_connected: true,
                    netmap_age: None,
                    key_expiry: None,
                    key_granted: None,
                    peers: Vec::new(),
                    filter: weft_dataplane::core::FilterStats {
                        dropped: 3,
                        denied_by_rule: 3,
                        ..Default::default()
                    },
                    rules: Vec::new(),
                    malformed_frames: 0,
                    relay_dropped: 0,
                    flows: weft_engine::device::FlowLogStatus::default(),
                });
            }
        });
        let text = metrics_text(&commands).await.unwrap();
        assert!(
            text.contains("weft_filter_verdicts_total{verdict=\"drop\",rule=\"deny\"} 3"),
            "{text}"
        );
        assert!(text.contains("weft_coordinator_connected 1"), "{text}");
        drop(commands);
    }
}
