//! `weft-relay`: the relay server and its key command.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use weft_proto::relay::{DEFAULT_RELAY_PORT, DEFAULT_STUN_PORT};
use weft_proto::PublicKey;
use weft_relay::core::RateLimit;
use weft_relay::{load_or_create_key, Relay, RelayOptions};

/// Forwards WireGuard packets between nodes the coordinator admitted.
#[derive(Debug, Parser)]
#[command(name = "weft-relay", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the relay's public key (created on first use), for the
    /// coordinator's `[[relays]]` entry.
    Key {
        /// Holds the relay's key.
        #[arg(long, default_value = "/var/lib/weft-relay")]
        data_dir: PathBuf,
    },
    /// Runs the relay.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Holds the relay's key.
    #[arg(long, default_value = "/var/lib/weft-relay")]
    data_dir: PathBuf,
    /// The relay's name, as in the coordinator's `[[relays]]` entry.
    #[arg(long)]
    name: String,
    /// The coordinator's control address (HOST:PORT).
    #[arg(long)]
    coordinator: String,
    /// The coordinator's key, as `weft-coordinator key` prints it.
    #[arg(long)]
    coordinator_key: PublicKey,
    /// UDP address of the QUIC listener.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_RELAY_PORT)))]
    listen: SocketAddr,
    /// TCP address of the TLS fallback listener, for nodes whose network blocks UDP.
    #[arg(long)]
    tcp_listen: Option<SocketAddr>,
    /// UDP address of the STUN responder.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_STUN_PORT)))]
    stun_listen: SocketAddr,
    /// Run no STUN responder.
    #[arg(long)]
    no_stun: bool,
    /// Sustained bytes per second each client may send.
    #[arg(long, default_value_t = RateLimit::default().bytes_per_sec)]
    rate_limit: u64,
    /// Serve Prometheus metrics (`GET /metrics`) on this TCP address.
    /// They name no clients; bind it to a private or loopback address.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Key { data_dir } => {
            let key = load_or_create_key(&data_dir)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Serve(args) => {
            let ServeArgs {
                data_dir,
                name,
                coordinator,
                coordinator_key,
                listen,
                tcp_listen,
                stun_listen,
                no_stun,
                rate_limit,
                metrics_listen,
            } = *args;
            anyhow::ensure!(
                rate_limit > 0,
                "--rate-limit must be at least 1 byte per second"
            );
            let key = load_or_create_key(&data_dir)?;
            let relay = Relay::start(RelayOptions {
                key,
                name,
                listen,
                tcp_listen,
                stun_listen: (!no_stun).then_some(stun_listen),
                coordinator,
                coordinator_key,
                rate: RateLimit {
                    bytes_per_sec: rate_limit,
                    burst: rate_limit.max(64 * 1024) / 8,
                },
            })
            .await?;
            if let Some(addr) = metrics_listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
                tracing::info!(%addr, "metrics listening");
                let metrics = relay.metrics();
                tokio::spawn(weft_net::metrics_http::serve(listener, move || {
                    let metrics = metrics.clone();
                    async move { metrics.render() }
                }));
            }
            shutdown_signal()
                .await
                .context("cannot wait for a signal")?;
            relay.shutdown().await;
            Ok(())
        }
    }
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = term.recv() => Ok(()),
    }
}
