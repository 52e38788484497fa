//! Any two nodes connect across NATs. A simulated internet carries the
//! coordinator and two relays; NAT routers (nftables in their own
//! namespaces) put LANs behind endpoint-independent, symmetric or
//! UDP-blocking translation; each case places two fresh nodes and checks
//! the time to the first packet, the path they settle on (direct or
//! relayed), and that traffic comes back within 5 s when the relay in use
//! dies and when a node moves to another network.
//!
//! `WEFT_NAT_CASE=eim-both` runs one case of the matrix.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use weft_tests::{
    observed_sources, ping, record_metric, tcp_echo, wait_until, EchoServer, Lab, Nat, Overlay,
    Site, UdpReflector,
};

/// From `weft up` of the second node to the first ping answered over the overlay.
const FIRST_PACKET_BUDGET: Duration = Duration::from_secs(5);
/// From the first packet to a direct path, where one is possible.
const DIRECT_BUDGET: Duration = Duration::from_secs(5);
/// From killing the relay in use, or moving a node, to traffic flowing again.
const RECOVERY_BUDGET: Duration = Duration::from_secs(5);
/// How long a relayed pair is watched to be sure it never claims a direct path.
const RELAY_WATCH: Duration = Duration::from_secs(3);
/// How long endpoint discovery may take to report what the NAT does.
const NETCHECK_BUDGET: Duration = Duration::from_secs(5);
const PROBE: Duration = Duration::from_millis(300);

const POLICY: &str = r#"// Nodes of the NAT matrix reach each other.
{
  "tagOwners": {"tag:nat": []},
  "acls": [{"action": "accept", "src": ["tag:nat"], "dst": ["tag:nat:*"]}],
}
"#;

/// Where one node of a case sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// On the internet, no NAT.
    Public,
    /// On a LAN behind a router.
    Behind(Nat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Relay,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }
}

/// One case of the matrix: node A (the one that roams) and node B.
#[derive(Debug)]
struct Case {
    name: &'static str,
    a: Place,
    b: Place,
    path: Path,
}

const CASES: [Case; 6] = [
    Case {
        name: "no-nat",
        a: Place::Public,
        b: Place::Public,
        path: Path::Direct,
    },
    Case {
        name: "eim-one-side",
        a: Place::Behind(Nat::EndpointIndependent),
        b: Place::Public,
        path: Path::Direct,
    },
    Case {
        name: "eim-both",
        a: Place::Behind(Nat::EndpointIndependent),
        b: Place::Behind(Nat::EndpointIndependent),
        path: Path::Direct,
    },
    Case {
        name: "symmetric-one-side",
        a: Place::Behind(Nat::Symmetric),
        b: Place::Public,
        path: Path::Direct,
    },
    Case {
        name: "symmetric-both",
        a: Place::Behind(Nat::Symmetric),
        b: Place::Behind(Nat::Symmetric),
        path: Path::Relay,
    },
    Case {
        name: "udp-blocked",
        a: Place::Behind(Nat::UdpBlocked),
        b: Place::Public,
        path: Path::Relay,
    },
];

const COORDINATOR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const RELAYS: [(&str, Ipv4Addr); 2] = [
    ("relay1", Ipv4Addr::new(198, 51, 100, 2)),
    ("relay2", Ipv4Addr::new(198, 51, 100, 3)),
];

#[test]
fn routers_translate_as_configured() {
    let mut lab = Lab::new().expect("create lab");
    let s1 = lab
        .add_host_at("stun1", &Site::Internet(Ipv4Addr::new(198, 51, 100, 11)))
        .expect("add server");
    let s2 = lab
        .add_host_at("stun2", &Site::Internet(Ipv4Addr::new(198, 51, 100, 12)))
        .expect("add server");
    let servers = [
        SocketAddr::from((s1.addr, 3478)),
        SocketAddr::from((s2.addr, 3478)),
    ];
    let _reflect1 = UdpReflector::start(&s1.netns, servers[0]).expect("reflector");
    let _reflect2 = UdpReflector::start(&s2.netns, servers[1]).expect("reflector");
    let _tcp = EchoServer::start(&s1.netns, 8080).expect("echo server");
    let eim = lab
        .add_router(
            "eim",
            Ipv4Addr::new(203, 0, 113, 11),
            1,
            Nat::EndpointIndependent,
        )
        .expect("add router");
    let sym = lab
        .add_router("sym", Ipv4Addr::new(203, 0, 113, 12), 2, Nat::Symmetric)
        .expect("add router");
    lab.add_router("noudp", Ipv4Addr::new(203, 0, 113, 13), 3, Nat::UdpBlocked)
        .expect("add router");
    let lan = |router: &str| Site::Lan {
        router: router.into(),
        octet: 2,
    };
    let public = lab
        .add_host_at("public", &Site::Internet(Ipv4Addr::new(203, 0, 113, 100)))
        .expect("add host");
    let behind_eim = lab.add_host_at("h-eim", &lan("eim")).expect("add host");
    let behind_sym = lab.add_host_at("h-sym", &lan("sym")).expect("add host");
    let behind_noudp = lab.add_host_at("h-noudp", &lan("noudp")).expect("add host");
    let wait = Duration::from_millis(900);
    let seen = |ns: &str| observed_sources(ns, 40000, &servers, wait).expect("ask reflectors");

    let on_internet = seen(&public.netns);
    assert_eq!(
        on_internet,
        [Some(SocketAddr::from((public.addr, 40000))); 2],
        "a public host is seen as itself"
    );
    let through_eim = seen(&behind_eim.netns);
    assert_eq!(
        through_eim,
        [Some(SocketAddr::from((eim.wan, 40000))); 2],
        "masquerade keeps the source port, whatever the destination"
    );
    let through_sym = seen(&behind_sym.netns);
    let [Some(first), Some(second)] = through_sym[..] else {
        panic!("the symmetric NAT passed no UDP: {through_sym:?}");
    };
    assert!(
        first.ip() == IpAddr::V4(sym.wan) && second.ip() == IpAddr::V4(sym.wan),
        "the symmetric NAT did not translate: {through_sym:?}"
    );
    assert_ne!(
        first.port(),
        second.port(),
        "fully-random masquerade gave two destinations the same port: {through_sym:?}"
    );
    assert_eq!(
        seen(&behind_noudp.netns),
        [None, None],
        "UDP left a UDP-blocking router"
    );
    tcp_echo(
        &behind_noudp.netns,
        SocketAddr::from((s1.addr, 8080)),
        Duration::from_secs(2),
    )
    .expect("TCP must leave a UDP-blocking router");
    assert!(
        !ping(
            &s1.netns,
            IpAddr::V4(behind_eim.addr),
            Duration::from_millis(300)
        ),
        "a LAN host answered from the internet"
    );

    // Simultaneous sends punch through two endpoint-independent NATs, not through two symmetric ones.
    let eim2 = lab
        .add_router(
            "eim2",
            Ipv4Addr::new(203, 0, 113, 14),
            4,
            Nat::EndpointIndependent,
        )
        .expect("add router");
    let sym2 = lab
        .add_router("sym2", Ipv4Addr::new(203, 0, 113, 15), 5, Nat::Symmetric)
        .expect("add router");
    let behind_eim2 = lab.add_host_at("h-eim2", &lan("eim2")).expect("add host");
    let behind_sym2 = lab.add_host_at("h-sym2", &lan("sym2")).expect("add host");
    let punched = punch((&behind_eim.netns, eim.wan), (&behind_eim2.netns, eim2.wan))
        .expect("punch through two endpoint-independent NATs");
    assert_eq!(
        punched,
        (true, true),
        "simultaneous sends did not cross two endpoint-independent NATs"
    );
    let punched = punch((&behind_sym.netns, sym.wan), (&behind_sym2.netns, sym2.wan))
        .expect("punch through two symmetric NATs");
    assert_eq!(
        punched,
        (false, false),
        "simultaneous sends crossed two symmetric NATs"
    );

    // A host moves: it is seen from its new router's address, and its old one is gone.
    let moved = lab
        .move_host(
            "h-eim",
            &Site::Lan {
                router: "sym".into(),
                octet: 3,
            },
        )
        .expect("move host");
    assert_eq!(moved.addr, Ipv4Addr::new(198, 18, 2, 3));
    let after_move = seen(&moved.netns);
    assert!(
        after_move
            .iter()
            .all(|s| s.is_some_and(|s| s.ip() == IpAddr::V4(sym.wan))),
        "after moving behind the symmetric NAT: {after_move:?}"
    );
}

#[test]
fn routers_relays_and_moved_hosts_are_removed_when_a_check_fails() {
    let mut recorded: Option<(Vec<String>, u32)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new().expect("create lab");
        let coord = lab
            .add_host_at("coord", &Site::Internet(COORDINATOR))
            .expect("add host");
        let relay = lab
            .add_host_at("relay1", &Site::Internet(RELAYS[0].1))
            .expect("add host");
        let router = lab
            .add_router(
                "nat",
                Ipv4Addr::new(203, 0, 113, 11),
                1,
                Nat::EndpointIndependent,
            )
            .expect("add router");
        lab.add_router("nat2", Ipv4Addr::new(203, 0, 113, 12), 2, Nat::Symmetric)
            .expect("add router");
        let host = lab
            .add_host_at(
                "laptop",
                &Site::Lan {
                    router: "nat".into(),
                    octet: 2,
                },
            )
            .expect("add host");
        lab.move_host(
            "laptop",
            &Site::Lan {
                router: "nat2".into(),
                octet: 2,
            },
        )
        .expect("move host");
        let mut overlay = Overlay::new(lab).expect("create overlay");
        overlay.add_relay("relay1", "relay1").expect("relay key");
        let config = overlay.lab().dir().join("coordinator.toml");
        std::fs::write(&config, overlay.relays_config()).expect("config");
        let policy = overlay.lab().dir().join("policy.hujson");
        std::fs::write(&policy, POLICY).expect("policy");
        overlay
            .start_coordinator_with("coord", &policy, &["--config", &config.to_string_lossy()])
            .expect("coordinator");
        overlay.start_relays().expect("relay");
        let pid = overlay.relay("relay1").expect("relay").pid().expect("pid");
        recorded = Some((
            vec![coord.netns, relay.netns, router.netns, host.netns],
            pid,
        ));
        panic!("a deliberately failing check");
    }));
    assert!(result.is_err());
    let (namespaces, pid) = recorded.expect("the scenario ran up to the failing check");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "relay {pid} outlived the failed test"
    );
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for ns in namespaces {
        assert!(
            !list.contains(&ns),
            "namespace {ns} outlived the failed test"
        );
    }
}

#[test]
fn nat_matrix() {
    let only = std::env::var("WEFT_NAT_CASE").ok();
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name))
        .collect();
    assert!(
        !cases.is_empty(),
        "WEFT_NAT_CASE={only:?} names no case; the cases are {:?}",
        CASES.iter().map(|c| c.name).collect::<Vec<_>>()
    );
    let started = Instant::now();
    let mut world = World::new().expect("start the coordinator and relays");
    let mut failures = Vec::new();
    for case in cases {
        let case_started = Instant::now();
        match world.run(case) {
            Ok(metrics) => record_metric(&format!(
                "nat matrix [{}] {} path: {} (case took {:.1} s)",
                case.name,
                case.path.as_str(),
                metrics.join(", "),
                case_started.elapsed().as_secs_f64()
            )),
            Err(e) => {
                let summary: String = e.to_string().chars().take(160).collect();
                record_metric(&format!("nat matrix [{}] FAILED: {summary}", case.name));
                failures.push(format!(
                    "case {} (A {:?}, B {:?}, expected {} path): {e:#}\n{}",
                    case.name,
                    case.a,
                    case.b,
                    case.path.as_str(),
                    world.observe(case)
                ));
            }
        }
        world.clean_up(case);
    }
    record_metric(&format!(
        "nat matrix: {} failed, whole matrix took {:.1} s",
        failures.len(),
        started.elapsed().as_secs_f64()
    ));
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The coordinator and relays the cases share, and the addresses handed out so far.
struct World {
    overlay: Overlay,
    auth_key: String,
    public_hosts: u8,
    routers: u8,
}

impl World {
    fn new() -> Result<Self> {
        let mut lab = Lab::new()?;
        lab.add_host_at("coord", &Site::Internet(COORDINATOR))?;
        for (name, addr) in RELAYS {
            lab.add_host_at(name, &Site::Internet(addr))?;
        }
        let mut overlay = Overlay::new(lab)?;
        let world = (|| -> Result<String> {
            for (name, _) in RELAYS {
                overlay.add_relay(name, name)?;
            }
            let config = overlay.lab().dir().join("coordinator.toml");
            std::fs::write(&config, overlay.relays_config())?;
            let policy = overlay.lab().dir().join("policy.hujson");
            std::fs::write(&policy, POLICY)?;
            overlay.start_coordinator_with(
                "coord",
                &policy,
                &["--config", &config.to_string_lossy()],
            )?;
            overlay.start_relays()?;
            overlay.coordinator()?.authkey(&["tag:nat"], true)
        })();
        match world {
            Ok(auth_key) => Ok(Self {
                overlay,
                auth_key,
                public_hosts: 0,
                routers: 0,
            }),
            Err(e) => Err(e.context(overlay.logs())),
        }
    }

    /// A fresh place of kind `place`: a new public address, or a new LAN
    /// behind a new router named `router`.
    fn site(&mut self, router: &str, place: Place) -> Result<Site> {
        match place {
            Place::Public => {
                self.public_hosts += 1;
                Ok(Site::Internet(Ipv4Addr::new(
                    203,
                    0,
                    113,
                    100 + self.public_hosts,
                )))
            }
            Place::Behind(nat) => {
                self.routers += 1;
                let wan = Ipv4Addr::new(203, 0, 113, 10 + self.routers);
                self.overlay
                    .lab_mut()
                    .add_router(router, wan, self.routers, nat)?;
                Ok(Site::Lan {
                    router: router.to_owned(),
                    octet: 2,
                })
            }
        }
    }

    fn run(&mut self, case: &Case) -> Result<Vec<String>> {
        let (a, b) = hosts(case);
        let mut metrics = Vec::new();
        let site_a = self.site(&format!("{}-ra", case.name), case.a)?;
        let site_b = self.site(&format!("{}-rb", case.name), case.b)?;
        self.overlay.lab_mut().add_host_at(&a, &site_a)?;
        self.overlay.lab_mut().add_host_at(&b, &site_b)?;
        self.overlay.start_node(&a)?;
        self.overlay.start_node(&b)?;
        let blocked = case.a == Place::Behind(Nat::UdpBlocked);
        self.overlay.join(&a, &self.auth_key).with_context(|| {
            if blocked {
                "A's control connection must fall back to TLS over TCP where UDP is blocked"
            } else {
                "A could not join"
            }
        })?;
        let up = Instant::now();
        self.overlay.join(&b, &self.auth_key)?;
        let a_ns = self.overlay.lab().host(&a)?.netns.clone();
        let b_ip = self.overlay.node(&b)?.overlay_ipv4()?;
        let first = answered_within(&a_ns, b_ip, up, FIRST_PACKET_BUDGET).with_context(|| {
            format!(
                "no ping from A to B ({b_ip}) answered within {FIRST_PACKET_BUDGET:?} of B's `weft up`"
            )
        })?;
        metrics.push(format!(
            "first packet {} ms after weft up",
            first.as_millis()
        ));

        metrics.push(self.check_path(case, "")?);
        self.check_ping_command(case)?;
        self.check_netcheck(case)?;
        metrics.push(self.kill_relay_in_use(case)?);

        let roam_to = self.site(&format!("{}-roam", case.name), case.a)?;
        ensure!(
            ping(&a_ns, b_ip, Duration::from_secs(1)),
            "traffic did not flow before A moved"
        );
        self.overlay.move_node(&a, &roam_to)?;
        let back =
            answered_within(&a_ns, b_ip, Instant::now(), RECOVERY_BUDGET).with_context(|| {
                format!("after A moved to {roam_to:?}, no ping answered within {RECOVERY_BUDGET:?}")
            })?;
        metrics.push(format!(
            "A moved -> traffic back in {} ms",
            back.as_millis()
        ));
        metrics.push(self.check_path(case, " after A moved")?);
        if case.path == Path::Direct {
            // B talks to A where A is now: its new address, or its new router's.
            let now_at = match &roam_to {
                Site::Internet(addr) => *addr,
                Site::Lan { router, .. } => self.overlay.lab().router(router)?.wan,
            };
            let view = peer(&self.overlay, &b, &a)?;
            let endpoint: Option<SocketAddr> =
                view["endpoint"].as_str().and_then(|e| e.parse().ok());
            ensure!(
                endpoint.is_some_and(|e| e.ip() == IpAddr::V4(now_at)),
                "after A moved behind {now_at}, B still sends elsewhere: {view}"
            );
        }
        Ok(metrics)
    }

    /// Waits for the expected path on both sides while traffic flows: a
    /// direct path within [`DIRECT_BUDGET`], or a relayed one that stays
    /// relayed for [`RELAY_WATCH`].
    fn check_path(&self, case: &Case, when: &str) -> Result<String> {
        let (a, b) = hosts(case);
        let a_ns = self.overlay.lab().host(&a)?.netns.clone();
        let b_ip = self.overlay.node(&b)?.overlay_ipv4()?;
        let mut last = (Value::Null, Value::Null);
        let paths = |last: &mut (Value, Value)| -> Result<(Value, Value)> {
            *last = (peer(&self.overlay, &a, &b)?, peer(&self.overlay, &b, &a)?);
            Ok((last.0["path"].clone(), last.1["path"].clone()))
        };
        match case.path {
            Path::Direct => {
                // Traffic must flow too: a path is not direct while its handshake is lost.
                let direct = wait_until(DIRECT_BUDGET, || {
                    let flowing = ping(&a_ns, b_ip, PROBE);
                    let both = paths(&mut last).is_ok_and(|(x, y)| x == "direct" && y == "direct");
                    flowing && both
                })
                .filter(|t| *t <= DIRECT_BUDGET);
                ensure!(
                    direct.is_some(),
                    "the path{when} did not become direct on both sides within {DIRECT_BUDGET:?}; \
                     A sees B as {}; B sees A as {}",
                    last.0,
                    last.1
                );
                Ok(format!(
                    "direct{when} after {} ms",
                    direct.unwrap_or_default().as_millis()
                ))
            }
            Path::Relay => {
                let watch = Instant::now();
                let mut relayed = false;
                while watch.elapsed() < RELAY_WATCH || !relayed {
                    let flowing = ping(&a_ns, b_ip, PROBE);
                    let (x, y) = paths(&mut last)?;
                    ensure!(
                        x != "direct" && y != "direct",
                        "a direct path{when} where none can exist: A sees B as {}; B sees A as {}",
                        last.0,
                        last.1
                    );
                    relayed = flowing
                        && x == "relay"
                        && y == "relay"
                        && last.0["relay"].is_string()
                        && last.1["relay"].is_string();
                    ensure!(
                        relayed || watch.elapsed() < RELAY_WATCH + DIRECT_BUDGET,
                        "the path{when} is not relayed on both sides (with a relay named and pings answered) \
                         {:?} after the first packet; A sees B as {}; B sees A as {}",
                        RELAY_WATCH + DIRECT_BUDGET,
                        last.0,
                        last.1
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(format!(
                    "relayed{when} via {} (A->B) / {} (B->A)",
                    last.0["relay"], last.1["relay"]
                ))
            }
        }
    }

    /// `weft ping B` on A answers over the expected path.
    fn check_ping_command(&self, case: &Case) -> Result<()> {
        let (a, b) = hosts(case);
        let out = self
            .overlay
            .node(&a)?
            .weft(&["ping", &b, "-c", "1", "--json"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "`weft ping {b} -c 1 --json` on A failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let probe: Value = stdout
            .lines()
            .next()
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("`weft ping --json` printed no JSON object: {stdout}"))?;
        ensure!(
            probe["path"] == case.path.as_str(),
            "`weft ping {b}` answered over another path than expected: {probe}"
        );
        Ok(())
    }

    /// A's endpoint discovery reports what its NAT does.
    fn check_netcheck(&self, case: &Case) -> Result<()> {
        let (a, _) = hosts(case);
        let node = self.overlay.node(&a)?;
        let mut last = Value::Null;
        let ok = wait_until(NETCHECK_BUDGET, || {
            let Ok(report) = node.netcheck() else {
                return false;
            };
            last = report;
            let mapping = last["mapping"]
                .as_str()
                .map(|m| m.replace(['-', '_'], "").to_lowercase());
            let home = last["relays"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["home"] == true));
            let relays_over_tcp = last["relays"].as_array().is_some_and(|r| {
                !r.is_empty()
                    && r.iter()
                        .all(|r| r["transport"].is_null() || r["transport"] == "tcp")
                    && r.iter().any(|r| r["transport"] == "tcp")
            });
            home && match case.a {
                Place::Public | Place::Behind(Nat::EndpointIndependent) => {
                    last["udp"] == true && mapping.as_deref() == Some("endpointindependent")
                }
                Place::Behind(Nat::Symmetric) => {
                    last["udp"] == true && mapping.as_deref() == Some("endpointdependent")
                }
                Place::Behind(Nat::UdpBlocked) => {
                    last["udp"] == false && last["mapping"].is_null() && relays_over_tcp
                }
            }
        });
        ensure!(
            ok.is_some(),
            "A's netcheck (behind {:?}) did not report the expected mapping, UDP reachability, \
             home relay and relay transports within {NETCHECK_BUDGET:?}: {last}",
            case.a
        );
        Ok(())
    }

    /// Kills the relay A's traffic to B uses (A's home relay when the path
    /// is direct) while traffic flows; traffic must be back within
    /// [`RECOVERY_BUDGET`], relayed pairs through the other relay. The relay
    /// is started again afterwards.
    fn kill_relay_in_use(&mut self, case: &Case) -> Result<String> {
        let (a, b) = hosts(case);
        let a_ns = self.overlay.lab().host(&a)?.netns.clone();
        let b_ip = self.overlay.node(&b)?.overlay_ipv4()?;
        let victim = match case.path {
            Path::Relay => peer(&self.overlay, &a, &b)?["relay"]
                .as_str()
                .map(str::to_owned),
            Path::Direct => {
                let report = self.overlay.node(&a)?.netcheck()?;
                report["relays"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["home"] == true)
                    .and_then(|r| r["name"].as_str().map(str::to_owned))
            }
        }
        .context("A names no relay in use")?;
        ensure!(
            ping(&a_ns, b_ip, Duration::from_secs(1)),
            "traffic did not flow before relay {victim} was killed"
        );
        self.overlay.relay_mut(&victim)?.kill();
        let Some(back) = answered_within(&a_ns, b_ip, Instant::now(), RECOVERY_BUDGET) else {
            anyhow::bail!(
                "relay {victim} (in use) killed: no ping answered within {RECOVERY_BUDGET:?}; \
                 A sees B as {}",
                peer(&self.overlay, &a, &b).unwrap_or_default()
            );
        };
        if case.path == Path::Relay {
            let mut views = (Value::Null, Value::Null);
            let moved_on = wait_until(Duration::from_secs(2), || {
                let (Ok(x), Ok(y)) = (peer(&self.overlay, &a, &b), peer(&self.overlay, &b, &a))
                else {
                    return false;
                };
                views = (x, y);
                [&views.0, &views.1].iter().all(|v| {
                    v["path"] == "relay" && v["relay"].is_string() && v["relay"] != victim.as_str()
                })
            });
            ensure!(
                moved_on.is_some(),
                "after relay {victim} died, both should reach each other through the other relay; \
                 A sees B as {}; B sees A as {}",
                views.0,
                views.1
            );
        }
        self.overlay.relay_mut(&victim)?.start_again()?;
        Ok(format!(
            "relay {victim} killed -> traffic back in {} ms",
            back.as_millis()
        ))
    }

    /// What the case's nodes and the relays say now, for a failure report.
    fn observe(&self, case: &Case) -> String {
        let (a, b) = hosts(case);
        let mut out = String::new();
        for (label, host) in [("A", &a), ("B", &b)] {
            let Ok(node) = self.overlay.node(host) else {
                continue;
            };
            let status = node
                .status()
                .map_or_else(|e| format!("{e:#}"), |s| s.to_string());
            let netcheck = node
                .netcheck()
                .map_or_else(|e| format!("{e:#}"), |s| s.to_string());
            let _ = write!(
                out,
                "--- {label} ({host}, underlay {}) ---\nstatus: {status}\nnetcheck: {netcheck}\nlog (last lines):\n{}\n",
                node.host().addr,
                tail(&node.log(), 60)
            );
        }
        for (name, _) in RELAYS {
            if let Ok(relay) = self.overlay.relay(name) {
                let _ = write!(
                    out,
                    "--- relay {name} (log, last lines) ---\n{}\n",
                    tail(&relay.log(), 20)
                );
            }
        }
        out
    }

    /// Stops the case's nodes and deletes them from the coordinator, and
    /// starts any relay the case left dead.
    fn clean_up(&mut self, case: &Case) {
        let (a, b) = hosts(case);
        for host in [a, b] {
            let _ = self.overlay.remove_node(&host);
        }
        for (name, _) in RELAYS {
            if let Ok(relay) = self.overlay.relay_mut(name) {
                if !relay.is_running() {
                    if let Err(e) = relay.start_again() {
                        eprintln!("relay {name} did not start again: {e:#}");
                    }
                }
            }
        }
    }
}

/// Two hosts behind NATs send to each other's router on the same UDP port
/// for a second, as hole punching does; whether each heard the other. The
/// second starts 150 ms late, so the first one's packets reach its router
/// before it has sent anything: the order that exposes a NAT remapping.
fn punch(a: (&str, Ipv4Addr), b: (&str, Ipv4Addr)) -> Result<(bool, bool)> {
    const PORT: u16 = 41000;
    let side = |(ns, _): (&str, Ipv4Addr), (_, peer): (&str, Ipv4Addr), delay: u64| {
        let ns = ns.to_owned();
        std::thread::spawn(move || {
            weft_tests::in_netns(&ns, move || -> std::io::Result<bool> {
                std::thread::sleep(Duration::from_millis(delay));
                let socket = std::net::UdpSocket::bind(("0.0.0.0", PORT))?;
                socket.set_read_timeout(Some(Duration::from_millis(50)))?;
                let mut heard = false;
                let mut buf = [0u8; 64];
                for _ in 0..20 {
                    // A refused or filtered send is part of punching: keep going.
                    let _ = socket.send_to(b"punch", (peer, PORT));
                    while let Ok((_, from)) = socket.recv_from(&mut buf) {
                        heard |= from.ip() == IpAddr::V4(peer);
                    }
                }
                Ok(heard)
            })
        })
    };
    let (ta, tb) = (side(a, b, 0), side(b, a, 150));
    let heard = |t: std::thread::JoinHandle<Result<std::io::Result<bool>>>| -> Result<bool> {
        let heard = t
            .join()
            .map_err(|_| anyhow::anyhow!("punch thread panicked"))???;
        Ok(heard)
    };
    Ok((heard(ta)?, heard(tb)?))
}

/// Pings from namespace `ns` to `dst` until one is answered; the time from
/// `since` to that answer, or None when none was answered within `budget`
/// of `since` (an answer that comes later does not count).
fn answered_within(ns: &str, dst: IpAddr, since: Instant, budget: Duration) -> Option<Duration> {
    loop {
        if ping(ns, dst, PROBE) {
            let elapsed = since.elapsed();
            return (elapsed <= budget).then_some(elapsed);
        }
        if since.elapsed() >= budget {
            return None;
        }
        // A ping that fails at once (no route yet) must not spin.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host (and node) names of a case's two nodes.
fn hosts(case: &Case) -> (String, String) {
    (format!("{}-a", case.name), format!("{}-b", case.name))
}

/// How `host`'s node sees the peer named `peer` (its `weft status --json` entry).
fn peer(overlay: &Overlay, host: &str, peer: &str) -> Result<Value> {
    let status = overlay.node(host)?.status()?;
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["hostname"] == peer)
        .cloned()
        .with_context(|| format!("{host} has no peer {peer}: {status}"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
