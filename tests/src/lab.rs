//! A simulated underlay: hosts in their own namespaces on one bridged LAN.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result};

use crate::natlab::Router;
use crate::netns::{self, Netns};

const PREFIX: &str = "weft";
/// The underlay network: TEST-NET-1, reserved for documentation and tests.
const UNDERLAY: [u8; 3] = [192, 0, 2];

/// One host of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name, as given to [`Lab::add_host`].
    pub name: String,
    /// The namespace the host lives in.
    pub netns: String,
    /// Its underlay address.
    pub addr: Ipv4Addr,
}

/// Hosts in network namespaces, joined by a bridge in a hub namespace.
/// Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Lab {
    pub(crate) id: String,
    dir: tempfile::TempDir,
    pub(crate) hosts: BTreeMap<String, Host>,
    /// NAT routers by name (see [`crate::natlab`]).
    pub(crate) routers: BTreeMap<String, Router>,
    /// Veth pairs made so far, to name each new one uniquely.
    pub(crate) links: usize,
    // Host namespaces drop before the hub, so their veth pairs go first.
    pub(crate) host_ns: Vec<Netns>,
    pub(crate) hub: Netns,
}

impl Lab {
    /// Creates the hub namespace and its bridge.
    pub fn new() -> Result<Self> {
        crate::require_root()?;
        netns::sweep_stale(PREFIX);
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let seq = LABS.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}-{seq}-", std::process::id());
        let hub = Netns::create(&format!("{id}hub"))?;
        hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        hub.ip(&["link", "set", "br0", "up"])?;
        let dir = tempfile::Builder::new().prefix("weft-lab-").tempdir()?;
        Ok(Self {
            id,
            dir,
            hosts: BTreeMap::new(),
            routers: BTreeMap::new(),
            links: 0,
            host_ns: Vec::new(),
            hub,
        })
    }

    /// Adds a host with underlay address 192.0.2.`octet`.
    pub fn add_host(&mut self, name: &str, octet: u8) -> Result<Host> {
        let ns = Netns::create(&format!("{}{name}", self.id))?;
        let hub_end = format!("v{}", self.links);
        self.links += 1;
        let addr = Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], octet);
        self.hub.ip(&[
            "link",
            "add",
            &hub_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.hub
            .ip(&["link", "set", &hub_end, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])
            .with_context(|| format!("bring up {name}'s underlay link"))?;
        let host = Host {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            addr,
        };
        std::fs::create_dir_all(self.host_dir(name))?;
        self.host_ns.push(ns);
        self.hosts.insert(name.to_owned(), host.clone());
        Ok(host)
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no host {name} in the lab"))
    }

    /// Sets the MTU of both ends of `host`'s underlay link (a host added
    /// with [`Lab::add_host`]): a narrower path for its traffic either way.
    pub fn set_underlay_mtu(&self, host: &str, mtu: u16) -> Result<()> {
        let ns = self.host(host)?.netns.clone();
        let mtu = mtu.to_string();
        // `N: eth0@ifM: …`: M is the peer end's index in the hub.
        let link = crate::process::run("ip", &["-n", &ns, "-o", "link", "show", "eth0"])?;
        let peer = link
            .split_once("eth0@if")
            .and_then(|(_, rest)| rest.split(':').next())
            .ok_or_else(|| anyhow::anyhow!("{host}'s eth0 is not a veth: {link}"))?;
        let hub_links = self.hub.ip(&["-o", "link", "show"])?;
        let hub_end = hub_links
            .lines()
            .find_map(|line| {
                let (index, rest) = line.split_once(": ")?;
                let name = rest.split([':', '@']).next()?;
                (index == peer).then(|| name.to_owned())
            })
            .ok_or_else(|| anyhow::anyhow!("{host}'s underlay link does not end on the hub"))?;
        self.hub.ip(&["link", "set", &hub_end, "mtu", &mtu])?;
        crate::process::run("ip", &["-n", &ns, "link", "set", "eth0", "mtu", &mtu])
            .with_context(|| format!("set {host}'s underlay MTU"))?;
        Ok(())
    }

    /// A scratch directory for one host's state and logs.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The lab's scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
