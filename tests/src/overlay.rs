//! A weft overlay on a [`Lab`]: a coordinator (or several replicas of one
//! on an etcd cluster) and nodes, driven through their command-line
//! interfaces.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;
use weft_test_etcd::EtcdCluster;

use crate::lab::{Host, Lab};
use crate::natlab::Site;
use crate::probe::wait_until;
use crate::process::Process;
use crate::relay::Relay;

const CONTROL_PORT: u16 = 7443;
const WIREGUARD_PORT: u16 = 51820;
const LOG_FILTER: &str = "info,weft=debug";

/// A coordinator and nodes on a lab network. Dropping it stops every process
/// (nodes, then the coordinators, then etcd) and then deletes the namespaces.
#[derive(Debug)]
pub struct Overlay {
    nodes: BTreeMap<String, NodeHandle>,
    /// Relays by name; they stop after the nodes and before the coordinator.
    relays: BTreeMap<String, Relay>,
    coordinator: Option<Coordinator>,
    /// Coordinator replicas on [`Overlay::etcd`], in the order started.
    replicas: Vec<Coordinator>,
    etcd: Option<EtcdCluster>,
    bins: PathBuf,
    lab: Lab,
}

impl Overlay {
    /// An overlay on `lab`, using the workspace's built binaries.
    pub fn new(lab: Lab) -> Result<Self> {
        Ok(Self {
            nodes: BTreeMap::new(),
            relays: BTreeMap::new(),
            coordinator: None,
            replicas: Vec::new(),
            etcd: None,
            bins: crate::bin_dir()?,
            lab,
        })
    }

    /// The underlying lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The underlying lab, mutably (to add routers and hosts as a test goes).
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// Creates the key of relay `name` on lab host `host`, without starting
    /// it: list [`Overlay::relays_config`] in the coordinator's
    /// configuration, start the coordinator, then [`Overlay::start_relays`].
    pub fn add_relay(&mut self, host: &str, name: &str) -> Result<&Relay> {
        let host = self.lab.host(host)?.clone();
        let data_dir = self.lab.host_dir(&host.name).join(format!("relay-{name}"));
        let relay = Relay::create(&self.bins, host, name, data_dir)?;
        Ok(self.relays.entry(name.to_owned()).or_insert(relay))
    }

    /// The `[[relays]]` entries of every relay added, for the coordinator's `--config` file.
    pub fn relays_config(&self) -> String {
        self.relays
            .values()
            .map(Relay::config_entry)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts every relay added, following the running coordinator.
    pub fn start_relays(&mut self) -> Result<()> {
        let coordinator = self.coordinator()?;
        let (address, key) = (coordinator.address().to_owned(), coordinator.public_key()?);
        for relay in self.relays.values_mut() {
            relay.start(&address, &key)?;
        }
        Ok(())
    }

    /// A relay by name.
    pub fn relay(&self, name: &str) -> Result<&Relay> {
        self.relays
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no relay {name} added"))
    }

    /// A relay by name, mutably (to kill it and start it again).
    pub fn relay_mut(&mut self, name: &str) -> Result<&mut Relay> {
        self.relays
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("no relay {name} added"))
    }

    /// Starts `weft-coordinator serve` on `host` with `policy`.
    pub fn start_coordinator(&mut self, host: &str, policy: &Path) -> Result<&Coordinator> {
        self.start_coordinator_with(host, policy, &[])
    }

    /// Starts `weft-coordinator serve` on `host` with `policy` and extra flags
    /// (e.g. `--config FILE`).
    pub fn start_coordinator_with(
        &mut self,
        host: &str,
        policy: &Path,
        extra_args: &[&str],
    ) -> Result<&Coordinator> {
        let host = self.lab.host(host)?.clone();
        let data_dir = self.lab.host_dir(&host.name).join("coordinator");
        std::fs::create_dir_all(&data_dir)?;
        let coordinator = Coordinator {
            bin: self.bins.join("weft-coordinator"),
            data_dir,
            policy: policy.to_path_buf(),
            address: format!("{}:{CONTROL_PORT}", host.addr),
            host,
            process: None,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        };
        self.coordinator = Some(coordinator);
        let coordinator = self.coordinator_mut()?;
        coordinator.start()?;
        Ok(coordinator)
    }

    /// Starts an etcd cluster of `members` inside lab host `host`'s
    /// namespace, on its underlay address: coordinator replicas in other
    /// hosts reach it over the lab's network.
    pub fn start_etcd(&mut self, host: &str, members: usize) -> Result<&mut EtcdCluster> {
        let host = self.lab.host(host)?.clone();
        let cluster = EtcdCluster::start_in_netns(members, &host.netns, host.addr)
            .context("start etcd in the lab")?;
        Ok(self.etcd.insert(cluster))
    }

    /// The etcd cluster, to stop and restart members.
    pub fn etcd_mut(&mut self) -> Result<&mut EtcdCluster> {
        self.etcd
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no etcd started"))
    }

    /// Starts a coordinator replica on `host`, on the overlay's etcd, with
    /// `policy`. The first replica creates the coordinator key; later ones
    /// get a copy of it (mode 0600), as the operator would copy it.
    pub fn start_coordinator_replica(&mut self, host: &str, policy: &Path) -> Result<&Coordinator> {
        let endpoints = self
            .etcd
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("start etcd before coordinator replicas"))?
            .endpoints();
        let host = self.lab.host(host)?.clone();
        let data_dir = self.lab.host_dir(&host.name).join("coordinator");
        std::fs::create_dir_all(&data_dir)?;
        if let Some(first) = self.replicas.first() {
            let key = data_dir.join("coordinator.key");
            std::fs::copy(first.data_dir.join("coordinator.key"), &key)
                .context("copy the coordinator key to the new replica")?;
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        let quoted: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        let config = data_dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\nkind = \"etcd\"\nendpoints = [{}]\nprefix = \"/weft-e2e/\"\nrequest_timeout = \"2s\"\ndial_timeout = \"2s\"\n",
                quoted.join(", ")
            ),
        )?;
        let mut coordinator = Coordinator {
            bin: self.bins.join("weft-coordinator"),
            data_dir,
            policy: policy.to_path_buf(),
            address: format!("{}:{CONTROL_PORT}", host.addr),
            host,
            process: None,
            extra_args: vec!["--config".into(), config.to_string_lossy().into_owned()],
        };
        coordinator.start()?;
        self.replicas.push(coordinator);
        self.replica(self.replicas.len() - 1)
    }

    /// Replica `index`, in the order started.
    pub fn replica(&self, index: usize) -> Result<&Coordinator> {
        self.replicas
            .get(index)
            .ok_or_else(|| anyhow::anyhow!("no replica {index} started"))
    }

    /// Replica `index`, mutably (to kill or restart it).
    pub fn replica_mut(&mut self, index: usize) -> Result<&mut Coordinator> {
        self.replicas
            .get_mut(index)
            .ok_or_else(|| anyhow::anyhow!("no replica {index} started"))
    }

    /// Every replica's `HOST:PORT`, comma-separated in the order started, as
    /// `weft up --coordinator` takes them; the single coordinator's address
    /// when there are no replicas.
    pub fn coordinator_addresses(&self) -> Result<String> {
        if self.replicas.is_empty() {
            return Ok(self.coordinator()?.address().to_owned());
        }
        Ok(self
            .replicas
            .iter()
            .map(Coordinator::address)
            .collect::<Vec<_>>()
            .join(","))
    }

    /// The running coordinator: the single one, or the first replica.
    pub fn coordinator(&self) -> Result<&Coordinator> {
        self.coordinator
            .as_ref()
            .or(self.replicas.first())
            .ok_or_else(|| anyhow::anyhow!("no coordinator started"))
    }

    /// The running coordinator, mutably (to restart it).
    pub fn coordinator_mut(&mut self) -> Result<&mut Coordinator> {
        self.coordinator
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no coordinator started"))
    }

    /// Starts `weftd` on `host`.
    pub fn start_node(&mut self, host: &str) -> Result<&mut NodeHandle> {
        self.start_node_with(host, &[])
    }

    /// Starts `weftd` on `host` with extra flags (e.g. `--posture-file PATH`).
    pub fn start_node_with(&mut self, host: &str, extra_args: &[&str]) -> Result<&mut NodeHandle> {
        let host = self.lab.host(host)?.clone();
        let state_dir = self.lab.host_dir(&host.name).join("weftd");
        std::fs::create_dir_all(&state_dir)?;
        let mut node = NodeHandle {
            weftd: self.bins.join("weftd"),
            weft: self.bins.join("weft"),
            socket: state_dir.join("weftd.sock"),
            state_dir,
            host,
            process: None,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
        };
        node.start()?;
        let name = node.host.name.clone();
        Ok(self.nodes.entry(name).or_insert(node))
    }

    /// Starts the coordinator on `coordinator` with `policy`, joins `a` and
    /// `b` with auth keys for `tags` (one each), and waits up to 10 s for a
    /// ping from `a` to cross to `b`; returns their namespaces.
    pub fn join_pair(
        &mut self,
        coordinator: &str,
        policy: &Path,
        [(a, a_tag), (b, b_tag)]: [(&str, &str); 2],
    ) -> Result<(String, String)> {
        self.start_coordinator(coordinator, policy)?;
        for (host, tag) in [(a, a_tag), (b, b_tag)] {
            self.start_node(host)?;
            let key = self.coordinator()?.authkey(&[tag], false)?;
            self.join(host, &key)?;
        }
        let a_ns = self.lab.host(a)?.netns.clone();
        let b_ns = self.lab.host(b)?.netns.clone();
        let b_addr = self.node(b)?.overlay_ipv4()?;
        wait_until(Duration::from_secs(10), || {
            crate::ping(&a_ns, b_addr, Duration::from_millis(300))
        })
        .context("no ping crossed the tunnel within 10 s of joining")?;
        Ok((a_ns, b_ns))
    }

    /// A started node by host name.
    pub fn node(&self, host: &str) -> Result<&NodeHandle> {
        self.nodes
            .get(host)
            .ok_or_else(|| anyhow::anyhow!("no node started on {host}"))
    }

    /// A started node by host name, mutably (to restart it).
    pub fn node_mut(&mut self, host: &str) -> Result<&mut NodeHandle> {
        self.nodes
            .get_mut(host)
            .ok_or_else(|| anyhow::anyhow!("no node started on {host}"))
    }

    /// Moves the host of a running node to `site` (see [`Lab::move_host`]);
    /// weftd keeps running.
    pub fn move_node(&mut self, host: &str, site: &Site) -> Result<()> {
        let moved = self.lab.move_host(host, site)?;
        self.node_mut(host)?.host = moved;
        Ok(())
    }

    /// Stops the node on `host` and deletes it from the coordinator.
    pub fn remove_node(&mut self, host: &str) -> Result<()> {
        let mut node = self
            .nodes
            .remove(host)
            .ok_or_else(|| anyhow::anyhow!("no node started on {host}"))?;
        node.stop(false);
        self.coordinator()?.delete_node(host)
    }

    /// `weft up` on `host` with `auth_key`, named after the host, naming
    /// every replica; an error with the command's output when it fails.
    pub fn join(&self, host: &str, auth_key: &str) -> Result<()> {
        self.join_via(host, auth_key, &self.coordinator_addresses()?)
    }

    /// [`Overlay::join`] with the coordinator addresses `coordinators`
    /// (comma-separated, tried in order).
    pub fn join_via(&self, host: &str, auth_key: &str, coordinators: &str) -> Result<()> {
        let coordinator = self.coordinator()?;
        let out = self.node(host)?.up(
            coordinators,
            &coordinator.public_key()?,
            Some(auth_key),
            host,
        )?;
        anyhow::ensure!(
            out.status.success(),
            "weft up on {host} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Every process's log, for a failure report.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for c in self.coordinator.iter().chain(&self.replicas) {
            out += &format!("===== coordinator on {} =====\n{}\n", c.host.name, c.log());
        }
        for (name, relay) in &self.relays {
            out += &format!("===== weft-relay {name} =====\n{}\n", relay.log());
        }
        for (name, node) in &self.nodes {
            out += &format!("===== weftd on {name} =====\n{}\n", node.log());
        }
        out
    }
}

/// A running `weft-coordinator serve`.
#[derive(Debug)]
pub struct Coordinator {
    bin: PathBuf,
    data_dir: PathBuf,
    policy: PathBuf,
    address: String,
    host: Host,
    process: Option<Process>,
    extra_args: Vec<String>,
}

impl Coordinator {
    fn start(&mut self) -> Result<()> {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let policy = self.policy.to_string_lossy().into_owned();
        let mut args = vec![
            "serve",
            "--data-dir",
            &data_dir,
            "--policy",
            &policy,
            "--listen",
            &self.address,
        ];
        args.extend(self.extra_args.iter().map(String::as_str));
        let process = Process::spawn(
            "weft-coordinator",
            &self.host.netns,
            &self.bin,
            &args,
            self.data_dir.join("coordinator.log"),
            &[("RUST_LOG", LOG_FILTER)],
        )?;
        self.process = Some(process);
        let ready = wait_until(Duration::from_secs(15), || {
            self.admin(&["nodes", "list"]).is_ok()
        });
        if ready.is_none() {
            anyhow::bail!("coordinator did not come up:\n{}", self.log());
        }
        Ok(())
    }

    /// Stops the coordinator (SIGKILL when `hard`) and starts it again on the same data dir.
    pub fn restart(&mut self, hard: bool) -> Result<()> {
        self.stop(hard);
        self.start()
    }

    /// Stops the coordinator (SIGKILL when `hard`, as a crash would).
    pub fn stop(&mut self, hard: bool) {
        if let Some(mut p) = self.process.take() {
            p.stop_for_restart(hard);
        }
    }

    /// Starts the coordinator again after [`Coordinator::stop`].
    pub fn start_again(&mut self) -> Result<()> {
        self.start()
    }

    /// `HOST:PORT` nodes connect to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The coordinator's public key, from `weft-coordinator key`.
    pub fn public_key(&self) -> Result<String> {
        last_line(&self.admin(&["key"])?)
    }

    /// Creates an auth key with `tags`; returns the secret.
    pub fn authkey(&self, tags: &[&str], reusable: bool) -> Result<String> {
        let mut args = vec!["authkey", "create"];
        for tag in tags {
            args.extend(["--tag", tag]);
        }
        if reusable {
            args.push("--reusable");
        }
        last_line(&self.admin(&args)?)
    }

    /// `weft-coordinator nodes list --json`.
    pub fn nodes(&self) -> Result<Value> {
        let out = self.admin(&["nodes", "list", "--json"])?;
        serde_json::from_str(&out).context("nodes list --json is not JSON")
    }

    /// `weft-coordinator nodes delete NAME`.
    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.admin(&["nodes", "delete", name]).map(drop)
    }

    /// `weft-coordinator policy set FILE`, with its full output.
    pub fn policy_set(&self, file: &Path) -> Result<Output> {
        let file = file.to_string_lossy().into_owned();
        self.command(&["policy", "set", &file])
    }

    /// Runs an admin subcommand; its stdout, or an error with its stderr.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args)?;
        if !out.status.success() {
            anyhow::bail!(
                "`weft-coordinator {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn command(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .context("run weft-coordinator")
    }

    /// The PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    /// The coordinator's log.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }
}

/// A running `weftd` and the `weft` CLI that talks to it.
#[derive(Debug)]
pub struct NodeHandle {
    weftd: PathBuf,
    weft: PathBuf,
    state_dir: PathBuf,
    socket: PathBuf,
    host: Host,
    process: Option<Process>,
    extra_args: Vec<String>,
    /// Extra environment for weftd, from the next (re)start on.
    env: Vec<(String, String)>,
}

impl NodeHandle {
    /// Sets `key=value` in weftd's environment from its next (re)start on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    fn start(&mut self) -> Result<()> {
        let state_dir = self.state_dir.to_string_lossy().into_owned();
        let socket = self.socket.to_string_lossy().into_owned();
        let port = WIREGUARD_PORT.to_string();
        let mut args = vec![
            "--state-dir",
            &state_dir,
            "--socket",
            &socket,
            "--port",
            &port,
        ];
        args.extend(self.extra_args.iter().map(String::as_str));
        let mut env = vec![("RUST_LOG", LOG_FILTER)];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let process = Process::spawn(
            &format!("weftd@{}", self.host.name),
            &self.host.netns,
            &self.weftd,
            &args,
            self.state_dir.join("weftd.log"),
            &env,
        )?;
        self.process = Some(process);
        let ready = wait_until(Duration::from_secs(10), || {
            self.weft(&["status", "--json"])
                .is_ok_and(|o| o.status.success())
        });
        if ready.is_none() {
            anyhow::bail!(
                "weftd on {} did not come up:\n{}",
                self.host.name,
                self.log()
            );
        }
        Ok(())
    }

    /// Stops weftd (SIGKILL when `hard`) and starts it again on the same state dir.
    pub fn restart(&mut self, hard: bool) -> Result<()> {
        self.stop(hard);
        self.start()
    }

    /// Stops weftd (SIGKILL when `hard`), keeping its state dir and log.
    pub fn stop(&mut self, hard: bool) {
        if let Some(mut p) = self.process.take() {
            p.stop_for_restart(hard);
        }
    }

    /// Starts weftd again after [`NodeHandle::stop`] with a fresh state dir:
    /// a new machine, as a rescheduled pod is.
    pub fn start_fresh(&mut self) -> Result<()> {
        for file in ["machine.key", "node.key", "prefs.json"] {
            match std::fs::remove_file(self.state_dir.join(file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        self.start()
    }

    /// weftd's state directory (where `posture.json` is read by default).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// weftd's local API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The host this node runs on.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// `weft up`, with its full output.
    pub fn up(
        &self,
        coordinator: &str,
        coordinator_key: &str,
        auth_key: Option<&str>,
        hostname: &str,
    ) -> Result<Output> {
        let mut args = vec![
            "up",
            "--coordinator",
            coordinator,
            "--coordinator-key",
            coordinator_key,
            "--hostname",
            hostname,
        ];
        if let Some(key) = auth_key {
            args.extend(["--auth-key", key]);
        }
        self.weft(&args)
    }

    /// `weft status --json`.
    pub fn status(&self) -> Result<Value> {
        let out = self.weft(&["status", "--json"])?;
        anyhow::ensure!(
            out.status.success(),
            "weft status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("weft status --json is not JSON")
    }

    /// `weft netcheck --json`.
    pub fn netcheck(&self) -> Result<Value> {
        let out = self.weft(&["netcheck", "--json"])?;
        anyhow::ensure!(
            out.status.success(),
            "weft netcheck failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("weft netcheck --json is not JSON")
    }

    /// The node's overlay IPv4 address, from its status.
    pub fn overlay_ipv4(&self) -> Result<IpAddr> {
        self.overlay_address(IpAddr::is_ipv4, "IPv4")
    }

    /// The node's overlay IPv6 address, from its status.
    pub fn overlay_ipv6(&self) -> Result<IpAddr> {
        self.overlay_address(IpAddr::is_ipv6, "IPv6")
    }

    fn overlay_address(&self, family: fn(&IpAddr) -> bool, name: &str) -> Result<IpAddr> {
        let status = self.status()?;
        status["self"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse::<IpAddr>().ok())
            .find(family)
            .ok_or_else(|| anyhow::anyhow!("no overlay {name} in status: {status}"))
    }

    /// The coordinator replica (`IP:PORT`) the node's control session is
    /// established with, if any.
    pub fn connected_to(&self) -> Result<Option<String>> {
        let status = self.status()?;
        let coordinator = &status["coordinator"];
        if coordinator["connected"].as_bool() != Some(true) {
            return Ok(None);
        }
        Ok(coordinator["connected_to"].as_str().map(str::to_owned))
    }

    /// Hostnames of the peers the node currently has.
    pub fn peer_names(&self) -> Result<Vec<String>> {
        let status = self.status()?;
        Ok(status["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["hostname"].as_str().map(str::to_owned))
            .collect())
    }

    /// Runs `weft --socket SOCKET ARGS…`.
    pub fn weft(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.weft)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("run weft")
    }

    /// Starts `weft --socket SOCKET ARGS…` with its standard output piped,
    /// for commands that print something to act on before they finish
    /// (`weft up` printing a login URL).
    pub fn weft_spawn(&self, args: &[&str]) -> Result<std::process::Child> {
        Command::new(&self.weft)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("run weft")
    }

    /// weftd's log.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }
}

fn last_line(out: &str) -> Result<String> {
    out.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("command printed nothing"))
}
