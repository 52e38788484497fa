//! `weftd`: the weft node daemon. Must run as root (it creates a TUN device).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft_node::cli::DEFAULT_SOCKET;
use weft_node::daemon::{self, DaemonConfig, DEFAULT_PORT, DEFAULT_STATE_DIR, DEFAULT_TUN};

/// The weft node daemon: joins this machine to a weft overlay network.
///
/// Drive it with `weft up`, `weft status` and `weft down`. Logs go to stderr;
/// set RUST_LOG (e.g. `RUST_LOG=weft_node=debug`) for more detail.
#[derive(Debug, Parser)]
#[command(name = "weftd", version)]
struct Args {
    /// Where the node's keys and preferences live (created 0700).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The local API socket `weft` talks to (created 0600).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
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
}

#[tokio::main]
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
        port: args.port,
        tun_name: args.tun,
        posture_file: args.posture_file,
    };
    match daemon::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
