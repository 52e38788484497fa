//! `weft-load`: measures one coordinator under N simulated nodes — time to
//! connect them, CPU and memory, and how fast a policy change and a join
//! reach the nodes they affect, and how fast the fleet is back in sync after
//! the coordinator restarts. Loopback only; it stops what it starts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::SignalKind;
use weft_tests::load::{self, Backend, LoadOptions};

#[derive(Debug, Parser)]
#[command(about = "Load-test a weft coordinator with simulated nodes on loopback")]
struct Cli {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Nodes per policy group; each node's peers are the rest of its group.
    #[arg(long, default_value_t = 50)]
    group_size: usize,
    /// Nodes connecting at once.
    #[arg(long, default_value_t = 200)]
    wave: usize,
    /// The coordinator's store.
    #[arg(long, value_enum, default_value_t = Store::Embedded)]
    store: Store,
    /// The weft-coordinator binary [default: the one built beside weft-load].
    #[arg(long, value_name = "PATH")]
    coordinator_bin: Option<PathBuf>,
    /// The longest wait for each phase (e.g. `120s`).
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
    /// How long to watch the connected, idle fleet for the keep-alive cost.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    idle_window: Duration,
    /// Reconnect after the coordinator restart with full netmaps instead
    /// of resuming from the views the nodes hold, for comparison.
    #[arg(long)]
    no_resume: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Store {
    Embedded,
    Etcd,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let options = LoadOptions {
        nodes: cli.nodes,
        group_size: cli.group_size,
        wave: cli.wave,
        backend: match cli.store {
            Store::Embedded => Backend::Embedded,
            Store::Etcd => Backend::Etcd,
        },
        coordinator_bin: match cli.coordinator_bin {
            Some(path) => path,
            None => load::default_binary()?,
        },
        phase_timeout: cli.phase_timeout,
        idle_window: cli.idle_window,
        resume: !cli.no_resume,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // On Ctrl-C or SIGTERM the run is dropped, which stops the coordinator it started.
    let report = runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
        tokio::select! {
            report = load::run(&options) => report,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = terminate.recv() => anyhow::bail!("terminated"),
        }
    })?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
