//! The local API server: decodes requests and hands them to the daemon's main
//! loop as [`Command`]s, so all state lives in one place.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::{ApiError, SelfStatus, Status, UpRequest};

/// How long `POST /v1/up` waits for registration and the first netmap.
pub const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A request for the daemon's main loop, with the channel for its answer.
#[derive(Debug)]
pub enum Command {
    /// Connect to a coordinator; answer once registered and the netmap is applied.
    Up(UpRequest, oneshot::Sender<Result<SelfStatus, ApiError>>),
    /// Disconnect and remove the overlay addresses.
    Down(oneshot::Sender<Status>),
    /// Report the current status.
    Status(oneshot::Sender<Status>),
}

/// Binds the API socket: creates its directory (0755), replaces a stale
/// socket left by a crash, and restricts the socket to its owner (0600).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
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
        .route("/v1/down", post(down))
        .route("/v1/status", get(status))
        .with_state(commands)
}

async fn up(
    State(commands): State<mpsc::Sender<Command>>,
    body: Result<Json<UpRequest>, JsonRejection>,
) -> Result<Json<SelfStatus>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Up(request, reply))
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    match tokio::time::timeout(UP_TIMEOUT, answer).await {
        Ok(Ok(result)) => result.map(Json),
        Ok(Err(_)) => Err(ApiError::ShuttingDown),
        Err(_) => {
            let last = ask(&commands, Command::Status)
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
