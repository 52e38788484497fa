//! The coordinator under test: a `weft-coordinator serve` child process on
//! loopback with a temporary data directory, driven through its admin CLI,
//! and stopped by its PID.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;
use weft_proto::PublicKey;
use weft_test_etcd::EtcdCluster;

use super::scenario::{self, Groups};
use super::stats::Usage;
use super::{Backend, LoadOptions};

/// How long the coordinator may take to start answering its admin socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running coordinator; stopped (and its etcd with it) on drop.
pub(crate) struct CoordinatorProcess {
    bin: PathBuf,
    /// The `serve` arguments, kept to restart on the same state.
    args: Vec<String>,
    child: Child,
    listen: SocketAddr,
    public_key: PublicKey,
    policy: PathBuf,
    // Dropped after the coordinator: kept for the data directory and etcd.
    _etcd: Option<EtcdCluster>,
    dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Writes the first policy and starts the coordinator on a free loopback port.
    pub(crate) async fn start(options: &LoadOptions, groups: Groups) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("weft-load-")
            .tempdir()
            .context("create a temporary directory")?;
        let data_dir = dir.path().join("data");
        let policy = dir.path().join("policy.hujson");
        std::fs::write(&policy, scenario::policy(groups, scenario::PORT_BEFORE))
            .context("write the policy file")?;
        let listen = free_udp_port()?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--policy".into(),
            policy.display().to_string(),
            "--listen".into(),
            listen.to_string(),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
        ];
        let etcd = match options.backend {
            Backend::Embedded => None,
            Backend::Etcd => {
                let etcd = EtcdCluster::single().context("start etcd")?;
                let config = dir.path().join("coordinator.toml");
                let endpoints: Vec<String> = etcd
                    .endpoints()
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect();
                std::fs::write(
                    &config,
                    format!(
                        "[store]\nkind = \"etcd\"\nendpoints = [{}]\nprefix = \"/weft-load/\"\n",
                        endpoints.join(", ")
                    ),
                )
                .context("write the coordinator config")?;
                args.extend(["--config".into(), config.display().to_string()]);
                Some(etcd)
            }
        };
        let child = spawn(&options.coordinator_bin, &args, dir.path())?;
        let mut coordinator = Self {
            bin: options.coordinator_bin.clone(),
            args,
            child,
            listen,
            public_key: PublicKey::from_bytes([0; 32]),
            policy,
            _etcd: etcd,
            dir,
        };
        coordinator.wait_ready().await?;
        Ok(coordinator)
    }

    pub(crate) fn listen(&self) -> SocketAddr {
        self.listen
    }

    pub(crate) fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// One reusable auth key per group, tagging its nodes with the group's tag.
    pub(crate) async fn create_auth_keys(&self, groups: Groups) -> Result<Vec<String>> {
        let mut keys = Vec::with_capacity(groups.count());
        for group in 0..groups.count() {
            let tag = scenario::tag(group);
            let out = self
                .admin(&[
                    "authkey",
                    "create",
                    "--tag",
                    &tag,
                    "--reusable",
                    "--expiry",
                    "2h",
                ])
                .await?;
            let key = out
                .lines()
                .last()
                .filter(|l| l.starts_with(weft_proto::AuthKey::PREFIX))
                .context("`authkey create` printed no key")?;
            keys.push(key.to_owned());
        }
        Ok(keys)
    }

    /// Replaces the policy file with the version that changes every node's
    /// filter, as an editor would (write, then rename over); returns when.
    pub(crate) fn change_policy(&self, groups: Groups) -> Result<Instant> {
        let staged = self.dir.path().join("policy.hujson.new");
        std::fs::write(&staged, scenario::policy(groups, scenario::PORT_AFTER))
            .context("write the changed policy")?;
        let at = Instant::now();
        std::fs::rename(&staged, &self.policy).context("install the changed policy")?;
        Ok(at)
    }

    pub(crate) fn usage(&self) -> Result<Usage> {
        Usage::of(self.child.id())
    }

    /// Kills the coordinator with SIGKILL, as a crash or the OOM killer
    /// would: no shutdown code runs.
    pub(crate) fn kill_hard(&mut self) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context("the coordinator's PID")?;
        if self.child.try_wait()?.is_some() {
            bail!("the coordinator had exited before the kill: {}", self.log());
        }
        kill(Pid::from_raw(pid), Signal::SIGKILL).context("kill -9 the coordinator")?;
        self.child.wait().context("reap the killed coordinator")?;
        Ok(())
    }

    /// Starts the coordinator again on the same data directory, store,
    /// policy and listen address; returns once it answers its admin socket.
    pub(crate) async fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            bail!("the coordinator is still running; stop it before a restart");
        }
        self.child = spawn(&self.bin, &self.args, self.dir.path())?;
        self.wait_ready().await
    }

    /// The registered nodes as the admin CLI lists them (`nodes list --json`).
    pub(crate) async fn nodes(&self) -> Result<Vec<ListedNode>> {
        let out = self.admin(&["nodes", "list", "--json"]).await?;
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .context("`nodes list --json` printed no JSON array")?
            .iter()
            .map(ListedNode::from_json)
            .collect()
    }

    /// Stops the coordinator: SIGTERM, then SIGKILL after 5 s.
    pub(crate) fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Waits until the admin socket answers, then reads the coordinator's key.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "the coordinator exited ({status}) during start-up: {}",
                    self.log()
                );
            }
            if self.admin(&["nodes", "list"]).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not answer its admin socket within {START_TIMEOUT:?}: {}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let key = self.admin(&["key"]).await?;
        self.public_key = key
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("`weft-coordinator key` printed no key: {key}"))?;
        Ok(())
    }

    /// Runs an admin subcommand against this coordinator's data directory.
    async fn admin(&self, args: &[&str]) -> Result<String> {
        let mut command = tokio::process::Command::new(&self.bin);
        command
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .stdin(Stdio::null());
        let out = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .with_context(|| format!("`weft-coordinator {}` timed out", args.join(" ")))?
            .with_context(|| format!("run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "`weft-coordinator {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// One node of `nodes list --json`: what a registration promised it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedNode {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
}

impl ListedNode {
    fn from_json(value: &serde_json::Value) -> Result<Self> {
        let field = |name: &str| {
            value
                .get(name)
                .with_context(|| format!("`nodes list --json` has a node without {name}: {value}"))
        };
        let text = |name: &str| -> Result<String> {
            field(name)?
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("`nodes list --json`: {name} is not a string: {value}"))
        };
        Ok(Self {
            id: field("id")?
                .as_u64()
                .with_context(|| format!("`nodes list --json`: id is not a number: {value}"))?,
            name: text("name")?,
            ipv4: text("ipv4")?.parse().context("`nodes list --json`: ipv4")?,
            ipv6: text("ipv6")?.parse().context("`nodes list --json`: ipv6")?,
        })
    }
}

/// Spawns `weft-coordinator` with `args`, appending its output to
/// `coordinator.log` in `dir` so a restart keeps the first run's log.
fn spawn(bin: &Path, args: &[String], dir: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coordinator.log"))
        .context("open the coordinator log")?;
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))
}

/// A loopback UDP address free at the moment of asking.
fn free_udp_port() -> Result<SocketAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("find a free UDP port")?;
    socket.local_addr().context("find a free UDP port")
}

/// The `weft-coordinator` built beside this tool, so a release build of the
/// tool measures a release coordinator.
pub fn default_binary() -> Result<PathBuf> {
    Ok(crate::bin_dir()?.join("weft-coordinator"))
}
