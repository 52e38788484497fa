//! weft's end-to-end harness: real binaries, real TUN devices and real UDP
//! between network namespaces.
//!
//! A [`Lab`] is a small simulated network: one hub namespace with a bridge,
//! and one namespace per host joined to it by a veth pair, with underlay
//! addresses from 192.0.2.0/24. The same bridge can be a simulated internet
//! with NAT routers and LANs behind them ([`Lab::add_router`],
//! [`Lab::add_host_at`], [`Lab::move_host`]). An [`Overlay`] runs
//! `weft-coordinator` in one host, `weft-relay` in others and `weftd` in the
//! rest, and drives them through their CLIs, exactly as an operator would.
//!
//! Everything is torn down on drop — processes first (by the PIDs this
//! harness started), then namespaces — including when a check panics. Leftovers
//! of a harness process that was killed outright are swept by the next run.

mod bulk;
mod lab;
pub mod load;
mod natlab;
mod netns;
mod oidc;
mod overlay;
mod probe;
mod process;
mod relay;
mod workload;

pub use bulk::hashed_transfer;
pub use lab::{Host, Lab};
pub use natlab::{observed_sources, Nat, Router, Site, UdpReflector};
pub use netns::in_netns;
pub use oidc::{Browser, TestIdp};
pub use overlay::{Coordinator, NodeHandle, Overlay};
pub use probe::{ping, tcp_echo, wait_until, EchoServer};
pub use process::Process;
pub use relay::Relay;
pub use workload::{unix_now, Signer, WorkloadIssuer};

use std::path::{Path, PathBuf};

/// Where the workspace's binaries were built: next to this executable
/// (`target/<profile>/`), or one level up for test executables in `deps/`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("test executable has no parent directory"))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for bin in ["weft-coordinator", "weftd", "weft"] {
        if !dir.join(bin).exists() {
            anyhow::bail!(
                "{bin} is not built in {}: run `cargo build --workspace --bins` first (tests/run does)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Prints a measured figure and appends it to `e2e-metrics.txt` next to the
/// binaries, which `tests/run` prints at the end.
pub fn record_metric(line: &str) {
    use std::io::Write as _;
    println!("{line}");
    let file = bin_dir()
        .map(|d| d.join("e2e-metrics.txt"))
        .unwrap_or_else(|_| std::env::temp_dir().join("weft-e2e-metrics.txt"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// A file from the end-to-end tests' `fixtures/` directory.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Fails unless the harness can create namespaces and TUN devices.
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!(
            "the end-to-end tests create network namespaces and TUN devices and must run as root \
             (run `sudo tests/run`)"
        );
    }
    Ok(())
}
