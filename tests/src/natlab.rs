//! NAT topologies on a [`Lab`]: a simulated internet, NAT routers with LANs
//! behind them, and hosts that move from one network to another while
//! their programs keep running.
//!
//! The lab's hub bridge is the internet. Servers sit on it at 198.51.100.x,
//! routers' WAN sides and public hosts at 203.0.113.x; each of the two /24s
//! has an on-link route to the other, so they talk without a router between
//! them. A router owns a LAN bridge with 198.18.N.0/24 (itself at .1), and
//! nftables rules in its namespace decide how LAN traffic leaves: see [`Nat`].
//! Only router namespaces forward. Nothing on the internet routes to a LAN,
//! so a LAN host is reachable only through the mappings its router made.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};

use crate::lab::{Host, Lab};
use crate::netns::{in_netns, Netns};
use crate::process::run;

/// The simulated internet's two networks (TEST-NET-2 and TEST-NET-3).
const INTERNET: [[u8; 3]; 2] = [[198, 51, 100], [203, 0, 113]];
/// The LANs behind routers: 198.18.N.0/24 (benchmarking space).
const LAN: [u8; 2] = [198, 18];

/// How a router treats traffic leaving its LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: Linux keeps a flow's source port when it is free, so a
    /// socket has one public endpoint whatever it sends to
    /// (endpoint-independent mapping). Filtering is per destination, as
    /// conntrack's is: hole punching needs both sides to send.
    EndpointIndependent,
    /// `masquerade random,fully-random`: each destination sees another
    /// source port (endpoint-dependent, "symmetric" mapping).
    Symmetric,
    /// Endpoint-independent masquerading, and forwarded UDP from the LAN
    /// dropped: only TCP (and ICMP) leaves.
    UdpBlocked,
}

/// Where a host plugs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Site {
    /// Directly on the internet at this address (198.51.100.x or 203.0.113.x): no NAT.
    Internet(Ipv4Addr),
    /// On `router`'s LAN at 198.18.N.`octet`, with the router as default gateway.
    Lan {
        /// The router's name, as given to [`Lab::add_router`].
        router: String,
        /// The host's last address octet (2–254).
        octet: u8,
    },
}

/// A NAT router of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Router {
    /// Short name, as given to [`Lab::add_router`].
    pub name: String,
    /// The namespace the router lives in.
    pub netns: String,
    /// Its address on the internet: where LAN traffic appears to come from.
    pub wan: Ipv4Addr,
    /// Its LAN address (198.18.N.1), the LAN hosts' default gateway.
    pub gateway: Ipv4Addr,
    /// How it translates.
    pub nat: Nat,
}

impl Lab {
    /// Adds a NAT router with WAN address `wan` on the internet and the LAN
    /// 198.18.`lan`.0/24 behind it.
    pub fn add_router(&mut self, name: &str, wan: Ipv4Addr, lan: u8, nat: Nat) -> Result<Router> {
        check_internet(wan)?;
        anyhow::ensure!(
            !self.routers.values().any(|r| r.gateway.octets()[2] == lan),
            "LAN 198.18.{lan}.0/24 is already behind another router"
        );
        let ns = Netns::create(&format!("{}{name}", self.id))?;
        let router = Router {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            wan,
            gateway: Ipv4Addr::new(LAN[0], LAN[1], lan, 1),
            nat,
        };
        self.host_ns.push(ns);
        self.plug_internet(&router.netns, wan)
            .with_context(|| format!("connect router {name} to the internet"))?;
        ip(&router.netns, &["link", "add", "lan0", "type", "bridge"])?;
        ip(
            &router.netns,
            &[
                "addr",
                "add",
                &format!("{}/24", router.gateway),
                "dev",
                "lan0",
            ],
        )?;
        ip(&router.netns, &["link", "set", "lan0", "up"])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &router.netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        let rules = self.dir().join(format!("{name}.nft"));
        std::fs::write(&rules, nft_rules(nat))?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &router.netns,
                "nft",
                "-f",
                &rules.to_string_lossy(),
            ],
        )
        .with_context(|| format!("load router {name}'s NAT rules (is nftables installed?)"))?;
        self.routers.insert(name.to_owned(), router.clone());
        Ok(router)
    }

    /// A router by name.
    pub fn router(&self, name: &str) -> Result<&Router> {
        self.routers
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no router {name} in the lab"))
    }

    /// Adds a host at `site`: on the internet or behind a router.
    pub fn add_host_at(&mut self, name: &str, site: &Site) -> Result<Host> {
        let ns = Netns::create(&format!("{}{name}", self.id))?;
        let netns = ns.name().to_owned();
        self.host_ns.push(ns);
        let addr = self
            .plug(&netns, site)
            .with_context(|| format!("plug host {name} in at {site:?}"))?;
        let host = Host {
            name: name.to_owned(),
            netns,
            addr,
        };
        std::fs::create_dir_all(self.host_dir(name))?;
        self.hosts.insert(name.to_owned(), host.clone());
        Ok(host)
    }

    /// Moves a host to `site` while its programs run: its link is unplugged
    /// (address and routes go with it) and a new one plugged in elsewhere,
    /// as a laptop moving from one Wi-Fi to another.
    pub fn move_host(&mut self, name: &str, site: &Site) -> Result<Host> {
        let netns = self.host(name)?.netns.clone();
        ip(&netns, &["link", "del", "eth0"]).with_context(|| format!("unplug host {name}"))?;
        let addr = self
            .plug(&netns, site)
            .with_context(|| format!("plug host {name} in at {site:?}"))?;
        let host = self
            .hosts
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("no host {name} in the lab"))?;
        host.addr = addr;
        Ok(host.clone())
    }

    /// Gives namespace `ns` an `eth0` at `site`; returns its address.
    fn plug(&mut self, ns: &str, site: &Site) -> Result<Ipv4Addr> {
        match site {
            Site::Internet(addr) => {
                check_internet(*addr)?;
                self.plug_internet(ns, *addr)?;
                Ok(*addr)
            }
            Site::Lan { router, octet } => {
                anyhow::ensure!(
                    (2..=254).contains(octet),
                    "a LAN host's octet must be 2 to 254 (the router is .1), not {octet}"
                );
                let router = self.router(router)?.clone();
                let [_, _, lan, _] = router.gateway.octets();
                let addr = Ipv4Addr::new(LAN[0], LAN[1], lan, *octet);
                let end = self.next_link("l");
                ip(
                    &router.netns,
                    &[
                        "link", "add", &end, "type", "veth", "peer", "name", "eth0", "netns", ns,
                    ],
                )?;
                ip(
                    &router.netns,
                    &["link", "set", &end, "master", "lan0", "up"],
                )?;
                ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                ip(ns, &["link", "set", "eth0", "up"])?;
                ip(
                    ns,
                    &[
                        "route",
                        "add",
                        "default",
                        "via",
                        &router.gateway.to_string(),
                    ],
                )?;
                Ok(addr)
            }
        }
    }

    /// Joins namespace `ns` to the internet bridge at `addr`, with on-link
    /// routes to the internet's other network.
    fn plug_internet(&mut self, ns: &str, addr: Ipv4Addr) -> Result<()> {
        let end = self.next_link("v");
        self.hub.ip(&[
            "link", "add", &end, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        self.hub.ip(&["link", "set", &end, "master", "br0", "up"])?;
        ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(ns, &["link", "set", "eth0", "up"])?;
        let [a, b, c, _] = addr.octets();
        for [x, y, z] in INTERNET {
            if [x, y, z] != [a, b, c] {
                ip(
                    ns,
                    &["route", "add", &format!("{x}.{y}.{z}.0/24"), "dev", "eth0"],
                )?;
            }
        }
        Ok(())
    }

    fn next_link(&mut self, prefix: &str) -> String {
        self.links += 1;
        format!("{prefix}{}", self.links)
    }
}

/// A UDP server that answers each datagram with the source address it saw,
/// as text: what a STUN server tells a client, readable in a test. Stopped on drop.
#[derive(Debug)]
pub struct UdpReflector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpReflector {
    /// Listens on `addr` inside namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/var/run/netns/{ns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let socket = (|| -> Result<UdpSocket> {
                let file = std::fs::File::open(&path)?;
                setns(&file, CloneFlags::CLONE_NEWNET)?;
                let socket = UdpSocket::bind(addr)?;
                socket.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(socket)
            })();
            let socket = match socket {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(from.to_string().as_bytes(), from);
                }
            }
        });
        ready_rx
            .recv()
            .context("UDP reflector thread died")?
            .with_context(|| format!("bind a UDP reflector on {addr} in {ns}"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpReflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// From one UDP socket on `port` in namespace `ns`, asks each
/// [`UdpReflector`] in `servers` which source address it sees; `None` for a
/// server that did not answer within `timeout` (asked three times).
pub fn observed_sources(
    ns: &str,
    port: u16,
    servers: &[SocketAddr],
    timeout: Duration,
) -> Result<Vec<Option<SocketAddr>>> {
    let servers = servers.to_vec();
    in_netns(ns, move || -> Result<Vec<Option<SocketAddr>>> {
        let socket =
            UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("bind UDP port {port}"))?;
        socket.set_read_timeout(Some(timeout / 3))?;
        let mut seen = Vec::with_capacity(servers.len());
        for server in servers {
            seen.push(ask(&socket, server)?);
        }
        Ok(seen)
    })?
}

fn ask(socket: &UdpSocket, server: SocketAddr) -> Result<Option<SocketAddr>> {
    let mut buf = [0u8; 128];
    for _ in 0..3 {
        // Unreachable or filtered servers are an answer too: None.
        if socket.send_to(b"who am i", server).is_err() {
            continue;
        }
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if from != server {
                continue;
            }
            let text = std::str::from_utf8(&buf[..n]).context("reflector reply is not text")?;
            return Ok(Some(text.parse().with_context(|| {
                format!("reflector reply {text:?} is not an address")
            })?));
        }
    }
    Ok(None)
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

fn check_internet(addr: Ipv4Addr) -> Result<()> {
    let [a, b, c, d] = addr.octets();
    anyhow::ensure!(
        INTERNET.contains(&[a, b, c]) && (1..=254).contains(&d),
        "{addr} is not on the simulated internet: use 198.51.100.1-254 or 203.0.113.1-254"
    );
    Ok(())
}

/// The router's nftables ruleset: masquerade out of the WAN side, no
/// unsolicited connections in, and for [`Nat::UdpBlocked`] no UDP out.
///
/// Unsolicited packets to the router itself are dropped before conntrack
/// confirms an entry for them: a confirmed entry for a peer's early punch
/// (peer → WAN:port) would take the tuple the LAN host's own mapping to
/// that peer needs, and masquerade would pick another port, turning an
/// endpoint-independent NAT symmetric for exactly the peers that punch first.
fn nft_rules(nat: Nat) -> String {
    let masquerade = match nat {
        Nat::EndpointIndependent | Nat::UdpBlocked => "masquerade",
        Nat::Symmetric => "masquerade random,fully-random",
    };
    let udp = match nat {
        Nat::UdpBlocked => "\t\tiifname \"lan0\" oifname \"eth0\" meta l4proto udp drop\n",
        Nat::EndpointIndependent | Nat::Symmetric => "",
    };
    format!(
        "table ip weft_nat {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" {masquerade}\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         {udp}\
         \t\tiifname \"eth0\" oifname \"lan0\" ct state new drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"eth0\" ct state new drop\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_differ_only_where_the_nat_kinds_do() {
        let eim = nft_rules(Nat::EndpointIndependent);
        let sym = nft_rules(Nat::Symmetric);
        let blocked = nft_rules(Nat::UdpBlocked);
        assert!(eim.contains("oifname \"eth0\" masquerade\n"), "{eim}");
        assert!(sym.contains("masquerade random,fully-random"), "{sym}");
        assert!(!eim.contains("udp drop") && !sym.contains("udp drop"));
        assert!(blocked.contains("meta l4proto udp drop"), "{blocked}");
        for rules in [&eim, &sym, &blocked] {
            assert!(rules.contains("chain input"), "{rules}");
        }
        assert!(
            blocked.contains("oifname \"eth0\" masquerade\n"),
            "{blocked}"
        );
    }

    #[test]
    fn only_internet_addresses_are_accepted() {
        assert!(check_internet(Ipv4Addr::new(198, 51, 100, 7)).is_ok());
        assert!(check_internet(Ipv4Addr::new(203, 0, 113, 254)).is_ok());
        let err = check_internet(Ipv4Addr::new(192, 0, 2, 1)).unwrap_err();
        assert!(err.to_string().contains("198.51.100.1-254"), "{err}");
        assert!(check_internet(Ipv4Addr::new(203, 0, 113, 0)).is_err());
    }
}
