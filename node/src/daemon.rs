//! `weftd`: the Linux shell around the device engine. It creates the TUN
//! device and the host hooks, binds the WireGuard socket and the local API,
//! and runs the [`Device`] until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use weft_engine::device::{Device, Underlay, UpRequest};
use weft_engine::state::StateDir;
use weft_proto::PublicKey;

use crate::api;
use crate::host::LinuxHost;
use crate::tun_device::TunDevice;

/// Where weftd keeps its keys and preferences unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft";
/// The default WireGuard UDP port.
pub const DEFAULT_PORT: u16 = 51820;
/// The default TUN device name.
pub const DEFAULT_TUN: &str = "weft0";

/// How weftd was started.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The local API socket.
    pub socket: PathBuf,
    /// A group whose members may read the local API (status, `whois`) but
    /// not change the node: the applications that ask who is calling.
    pub socket_group: Option<nix::unistd::Gid>,
    /// The WireGuard UDP port; 0 picks a free one.
    pub port: u16,
    /// The TUN device name.
    pub tun_name: String,
    /// The posture file ([`crate::posture`]); `None` for
    /// `STATE_DIR/posture.json`, read when present.
    pub posture_file: Option<PathBuf>,
    /// Join this overlay at start without waiting for `weft up` (pods, VMs
    /// and CI runners).
    pub join: Option<JoinConfig>,
    /// Also serve `GET /metrics` on this TCP address, for a Prometheus
    /// that cannot reach the local API socket.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// An unattended join, as `weftd --coordinator … --identity-token-file …` asks.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// The coordinator's replicas, tried in order.
    pub coordinator: weft_engine::coordinators::Coordinators,
    /// The coordinator's pinned public key.
    pub coordinator_key: PublicKey,
    /// The name to ask for; the host's name by default.
    pub hostname: Option<String>,
    /// The workload's identity token file.
    pub identity_token_file: Option<PathBuf>,
}

/// The posture file read unless `--posture-file` names another.
pub const DEFAULT_POSTURE_FILE: &str = "posture.json";

/// Runs weftd until SIGTERM or SIGINT.
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let state = StateDir::open(&config.state_dir)?;
    let tun = TunDevice::create(&config.tun_name).await?;
    let host = LinuxHost::new(&config.tun_name)?;
    let underlay = Underlay::bind(config.port).with_context(|| {
        format!(
            "cannot bind the WireGuard UDP port {} (in use? pass --port)",
            config.port
        )
    })?;
    tracing::info!(port = underlay.port()?, "WireGuard socket bound");

    let posture_file = config
        .posture_file
        .clone()
        .unwrap_or_else(|| config.state_dir.join(DEFAULT_POSTURE_FILE));
    tracing::info!(path = %posture_file.display(), "watching the posture file");
    let posture = crate::posture::watch(posture_file);
    let mut device = Device::new(state, tun, host, underlay, posture)?;

    let listener = api::bind(&config.socket, config.socket_group).with_context(|| {
        format!(
            "cannot listen on {} (pass --socket to use another path)",
            config.socket.display()
        )
    })?;
    let (commands_tx, commands) = mpsc::channel(16);
    let metrics = match config.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, commands_tx.clone()).await?),
        None => None,
    };
    let server = tokio::spawn(api::serve(listener, commands_tx));
    tracing::info!(socket = %config.socket.display(), "local API listening");

    let join = config.join.map(|join| UpRequest {
        coordinator: join.coordinator,
        coordinator_key: join.coordinator_key,
        auth_key: None,
        hostname: join.hostname,
        device_code: false,
        identity_token_file: join.identity_token_file,
    });
    device.resume(join).await?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    let result = device.run(commands, shutdown).await;
    server.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!("cannot remove {}: {e}", config.socket.display());
    }
    Ok(result?)
}

/// Binds `--metrics-listen` and serves the device's metrics there.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    commands: mpsc::Sender<weft_engine::device::Command>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (pass another --metrics-listen)"))?;
    tracing::info!(%addr, "metrics listening");
    Ok(tokio::spawn(weft_net::metrics_http::serve(
        listener,
        move || {
            let commands = commands.clone();
            async move { api::metrics_text(&commands).await.unwrap_or_default() }
        },
    )))
}
