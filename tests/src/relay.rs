//! `weft-relay` servers on lab hosts, which the harness can kill and start
//! again by PID.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;

use crate::lab::Host;
use crate::probe::wait_until;
use crate::process::Process;

/// The relay's QUIC port (UDP) and its TLS fallback port (TCP).
const RELAY_PORT: u16 = 7444;
/// The relay's STUN responder (UDP).
const STUN_PORT: u16 = 3478;
/// The relay's Prometheus metrics (TCP).
const METRICS_PORT: u16 = 9462;
const LOG_FILTER: &str = "info,weft_relay=debug";

/// A `weft-relay serve` on a lab host: QUIC on 7444/udp, TLS over TCP on
/// 7444/tcp, STUN on 3478/udp, metrics on 9462/tcp, all on the host's address.
#[derive(Debug)]
pub struct Relay {
    name: String,
    host: Host,
    bin: PathBuf,
    data_dir: PathBuf,
    key: String,
    /// The coordinator's address and key, once started.
    coordinator: Option<(String, String)>,
    process: Option<Process>,
    /// Logs of every run, oldest first: a restart does not erase the last one.
    logs: Vec<PathBuf>,
}

impl Relay {
    /// Creates relay `name`'s key in `data_dir` (`weft-relay key`) without
    /// starting it on `host`: the coordinator must list the key first.
    pub(crate) fn create(bins: &Path, host: Host, name: &str, data_dir: PathBuf) -> Result<Self> {
        let bin = bins.join("weft-relay");
        anyhow::ensure!(
            bin.exists(),
            "weft-relay is not built in {}: run `cargo build --workspace --bins` first (tests/run does)",
            bins.display()
        );
        std::fs::create_dir_all(&data_dir)?;
        let out = Command::new(&bin)
            .args(["key", "--data-dir"])
            .arg(&data_dir)
            .output()
            .context("run weft-relay key")?;
        anyhow::ensure!(
            out.status.success(),
            "weft-relay key failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Self {
            name: name.to_owned(),
            host,
            bin,
            data_dir,
            key,
            coordinator: None,
            process: None,
            logs: Vec::new(),
        })
    }

    /// The relay's name, as the coordinator lists it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its public key, as `weft-relay key` printed it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The QUIC address (UDP).
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((self.host.addr, RELAY_PORT))
    }

    /// The TLS-over-TCP fallback address.
    pub fn tcp_address(&self) -> SocketAddr {
        SocketAddr::from((self.host.addr, RELAY_PORT))
    }

    /// The STUN responder's address (UDP).
    pub fn stun_address(&self) -> SocketAddr {
        SocketAddr::from((self.host.addr, STUN_PORT))
    }

    /// Its Prometheus metrics endpoint (TCP).
    pub fn metrics_address(&self) -> SocketAddr {
        SocketAddr::from((self.host.addr, METRICS_PORT))
    }

    /// Its `[[relays]]` entry for the coordinator's configuration file.
    pub fn config_entry(&self) -> String {
        format!(
            "[[relays]]\nname = \"{}\"\naddress = \"{}\"\nkey = \"{}\"\ntcp_address = \"{}\"\nstun_address = \"{}\"\n",
            self.name,
            self.address(),
            self.key,
            self.tcp_address(),
            self.stun_address()
        )
    }

    /// Starts `weft-relay serve`, following the coordinator at `address`
    /// whose key is `key`; returns once it listens.
    pub(crate) fn start(&mut self, address: &str, key: &str) -> Result<()> {
        self.coordinator = Some((address.to_owned(), key.to_owned()));
        self.start_again()
    }

    /// Starts the relay again after [`Relay::kill`].
    pub fn start_again(&mut self) -> Result<()> {
        let (coordinator, coordinator_key) = self
            .coordinator
            .clone()
            .ok_or_else(|| anyhow::anyhow!("relay {} was never started", self.name))?;
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let listen = self.address().to_string();
        let tcp_listen = self.tcp_address().to_string();
        let stun_listen = self.stun_address().to_string();
        let metrics_listen = self.metrics_address().to_string();
        let log = self
            .data_dir
            .join(format!("relay-{}.log", self.logs.len() + 1));
        self.logs.push(log.clone());
        let process = Process::spawn(
            &format!("weft-relay {}", self.name),
            &self.host.netns,
            &self.bin,
            &[
                "serve",
                "--data-dir",
                &data_dir,
                "--name",
                &self.name,
                "--coordinator",
                &coordinator,
                "--coordinator-key",
                &coordinator_key,
                "--listen",
                &listen,
                "--tcp-listen",
                &tcp_listen,
                "--stun-listen",
                &stun_listen,
                "--metrics-listen",
                &metrics_listen,
            ],
            log,
            &[("RUST_LOG", LOG_FILTER)],
        )?;
        self.process = Some(process);
        let ready = wait_until(Duration::from_secs(10), || {
            self.process
                .as_ref()
                .is_some_and(|p| p.log().contains("relay listening"))
        });
        if ready.is_none() {
            anyhow::bail!("relay {} did not come up:\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// Kills the relay outright (SIGKILL), as a crash or a lost machine would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop_with(Signal::SIGKILL);
        }
    }

    /// The PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    /// Whether the server is running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// The logs of every run so far.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for (run, path) in self.logs.iter().enumerate() {
            out += &format!("--- run {} ---\n", run + 1);
            out += &std::fs::read_to_string(path).unwrap_or_default();
        }
        out
    }
}
