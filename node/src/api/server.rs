//! The local API server: decodes requests and hands them to the daemon's main
//! loop as [`Command`]s, so all state lives in one place.

use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::{parse_address, ApiError, LoginRequest, Status, UpReply, UpRequest, WhoIs, WhoIsQuery};

/// How long `POST /v1/up` waits for registration and the first netmap.
pub const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A request for the daemon's main loop, with the channel for its answer.
#[derive(Debug)]
pub enum Command {
    /// Connect to a coordinator; answer once registered and the netmap is applied.
    Up(UpRequest, oneshot::Sender<Result<UpReply, ApiError>>),
    /// Log a person in again; answer with the login URL, or once running.
    Login(LoginRequest, oneshot::Sender<Result<UpReply, ApiError>>),
    /// Disconnect and remove the overlay addresses.
    Down(oneshot::Sender<Status>),
    /// Report the current status.
    Status(oneshot::Sender<Status>),
    /// Say who owns an overlay address, and their capabilities here.
    WhoIs(IpAddr, oneshot::Sender<Result<WhoIs, ApiError>>),
}

/// Binds the API socket: creates its directory (0700) if missing, replaces
/// a stale socket left by a crash — never any other kind of file — and
/// restricts the socket to its owner (0600).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it (pass another --socket)",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API until the listener fails.
pub async fn serve(listener: UnixListener, commands: mpsc::Sender<Command>) -> std::io::Result<()> {
    axum::serve(listener, router(commands)).await
}

fn router(commands: mpsc::Sender<Command>) -> Router {
    Router::new()
        .route("/v1/up", post(up))
        .route("/v1/login", post(login))
        .route("/v1/down", post(down))
        .route("/v1/status", get(status))
        .route("/v1/whois", get(whois))
        .with_state(commands)
}

async fn up(
    State(commands): State<mpsc::Sender<Command>>,
    body: Result<Json<UpRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<UpReply>), ApiError> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Up(request, reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    wait_for_up(&commands, answer).await
}

async fn login(
    State(commands): State<mpsc::Sender<Command>>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<UpReply>), ApiError> {
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
    answer: oneshot::Receiver<Result<UpReply, ApiError>>,
) -> Result<(StatusCode, Json<UpReply>), ApiError> {
    match tokio::time::timeout(UP_TIMEOUT, answer).await {
        Ok(Ok(result)) => result.map(|reply| {
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

async fn down(State(commands): State<mpsc::Sender<Command>>) -> Result<Json<Status>, ApiError> {
    ask(&commands, Command::Down).await.map(Json)
}

async fn status(State(commands): State<mpsc::Sender<Command>>) -> Result<Json<Status>, ApiError> {
    ask(&commands, Command::Status).await.map(Json)
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
    answer.await.map_err(|_| ApiError::ShuttingDown)?.map(Json)
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
