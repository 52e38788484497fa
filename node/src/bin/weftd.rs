//! `weftd`: the weft node daemon. Must run as root (it creates a TUN device).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft_engine::coordinators::{CoordinatorAddress, Coordinators};
use weft_node::cli::DEFAULT_SOCKET;
use weft_node::daemon::{
    self, DaemonConfig, JoinConfig, DEFAULT_PORT, DEFAULT_STATE_DIR, DEFAULT_TUN,
};
use weft_proto::PublicKey;

/// The weft node daemon: joins this machine to a weft overlay network.
///
/// Drive it with `weft up`, `weft status` and `weft down`, or give it
/// --coordinator, --coordinator-key and --identity-token-file to join on its
/// own as a workload (a pod's sidecar, a VM agent, a CI job). Logs go to
/// stderr; set RUST_LOG (e.g. `RUST_LOG=weft_node=debug`) for more detail.
#[derive(Debug, Parser)]
#[command(name = "weftd", version)]
struct Args {
    /// Where the node's keys and preferences live (created 0700).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The local API socket `weft` talks to (created 0600; 0660 with --socket-group).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A group whose members may read the local API socket (status and
    /// whois, for applications authorizing their callers) but not change
    /// the node; the socket is then 0660.
    #[arg(long, value_name = "GROUP", env = "WEFT_SOCKET_GROUP", value_parser = parse_group)]
    socket_group: Option<nix::unistd::Gid>,
    /// The WireGuard UDP port; 0 picks a free port.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// The name of the TUN device to create.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_TUN)]
    tun: String,
    /// A JSON object of `custom:*` posture attributes to report, re-read
    /// every 2 s (default: STATE_DIR/posture.json, when present).
    #[arg(long, value_name = "PATH")]
    posture_file: Option<PathBuf>,
    /// Join this coordinator at start, without `weft up`. Repeat the
    /// option, or separate addresses with commas, to name several replicas,
    /// tried in order.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "WEFT_COORDINATOR",
        value_delimiter = ',',
        requires = "coordinator_key"
    )]
    coordinator: Vec<CoordinatorAddress>,
    /// The coordinator's public key, as `weft-coordinator key` prints it
    /// (public: it pins the coordinator, it is not a secret).
    #[arg(
        long,
        value_name = "KEY",
        env = "WEFT_COORDINATOR_KEY",
        requires = "coordinator"
    )]
    coordinator_key: Option<PublicKey>,
    /// The workload's identity token file, kept fresh by its platform (a
    /// Kubernetes projected service-account token, a CI job's OIDC token, a
    /// cloud instance identity token); re-read to renew the identity and
    /// rotate the node key before it expires.
    #[arg(
        long,
        value_name = "PATH",
        env = "WEFT_IDENTITY_TOKEN_FILE",
        requires = "coordinator"
    )]
    identity_token_file: Option<PathBuf>,
    /// The name to ask for when joining at start (default: the host's name).
    #[arg(
        long,
        value_name = "NAME",
        env = "WEFT_HOSTNAME",
        requires = "coordinator"
    )]
    hostname: Option<String>,
    /// Also serve Prometheus metrics (`GET /metrics`, as on the local API)
    /// on this TCP address. The metrics carry no peer names or identities;
    /// still, bind it to the overlay or a loopback address rather than the
    /// internet.
    #[arg(long, value_name = "ADDR:PORT", env = "WEFT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

// One thread: the data path is one loop anyway, and a multi-threaded
// runtime only adds cross-thread wakeups to every packet (idle ping p50
// 0.36 -> 0.24 ms, idle RSS 10.3 -> 9 MB on the benchmark rig).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = DaemonConfig {
        state_dir: args.state_dir,
        socket: args.socket,
        socket_group: args.socket_group,
        port: args.port,
        tun_name: args.tun,
        posture_file: args.posture_file,
        metrics_listen: args.metrics_listen,
        join: Coordinators::new(args.coordinator)
            .ok()
            .zip(args.coordinator_key)
            .map(|(coordinator, coordinator_key)| JoinConfig {
                coordinator,
                coordinator_key,
                hostname: args.hostname,
                identity_token_file: args
                    .identity_token_file
                    .map(|path| std::path::absolute(&path).unwrap_or(path)),
            }),
    };
    match daemon::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A group by name or number.
fn parse_group(value: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    match nix::unistd::Group::from_name(value) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(format!(
            "no group called {value}; create it, or pass a numeric group id"
        )),
        Err(e) => Err(format!("cannot look up group {value}: {e}")),
    }
}
