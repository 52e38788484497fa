//! The demo overlay: a coordinator, a relay and three nodes with different
//! identities in network namespaces on this machine — one of them behind a
//! NAT router — a policy between them, and the connections it allows and
//! denies. Everything is removed at the end.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use weft_tests::{tcp_echo, wait_until, EchoServer, Lab, Nat, Overlay, Site};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The nodes: web and db on the (simulated) internet, admin on a home LAN
/// behind a NAT router.
const NODES: [(&str, &str); 3] = [("web", "tag:web"), ("db", "tag:db"), ("admin", "tag:admin")];

fn site(node: &str) -> Site {
    match node {
        "web" => Site::Internet(Ipv4Addr::new(203, 0, 113, 21)),
        "db" => Site::Internet(Ipv4Addr::new(203, 0, 113, 22)),
        _ => Site::Lan {
            router: "home".into(),
            octet: 2,
        },
    }
}

fn main() -> Result<()> {
    let hold = std::env::args()
        .skip_while(|a| a != "--hold")
        .nth(1)
        .map(|s| s.parse::<u64>().context("--hold takes a number of seconds"))
        .transpose()?;
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "weft-demo [--hold SECONDS]\n\nStarts a weft coordinator, a relay and three nodes (web, db, and admin \
             behind a NAT router) in network namespaces, shows which connections the demo policy allows and \
             how admin's tunnels cross the NAT, then removes everything.\n\
             --hold keeps the overlay running that long so you can try it yourself. Needs root."
        );
        return Ok(());
    }
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }?;
    }
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo-policy.hujson");

    let mut lab = Lab::new()?;
    lab.add_host_at("coord", &Site::Internet(Ipv4Addr::new(198, 51, 100, 1)))?;
    lab.add_host_at("relay", &Site::Internet(Ipv4Addr::new(198, 51, 100, 2)))?;
    lab.add_router(
        "home",
        Ipv4Addr::new(203, 0, 113, 11),
        1,
        Nat::EndpointIndependent,
    )?;
    for (name, _) in NODES {
        lab.add_host_at(name, &site(name))?;
    }
    let mut overlay = Overlay::new(lab)?;
    overlay.add_relay("relay", "demo1")?;
    let result = run(&mut overlay, &policy, hold);
    if result.is_err() {
        eprintln!("{}", overlay.logs());
    }
    println!("\nRemoving the demo's processes and namespaces.");
    drop(overlay);
    result
}

fn run(overlay: &mut Overlay, policy: &Path, hold: Option<u64>) -> Result<()> {
    println!("weft demo: an identity overlay in network namespaces on this machine\n");
    let config = overlay.lab().dir().join("coordinator.toml");
    std::fs::write(&config, overlay.relays_config())?;
    let coordinator = overlay.start_coordinator_with(
        "coord",
        policy,
        &["--config", &config.to_string_lossy()],
    )?;
    let address = coordinator.address().to_owned();
    let key = coordinator.public_key()?;
    overlay.start_relays()?;
    println!("coordinator   {address}   key {key}");
    println!("relay demo1   {}", overlay.relay("demo1")?.address());
    println!("policy        {}\n", policy.display());
    check_interrupt()?;
    for (name, tag) in NODES {
        overlay.start_node(name)?;
        let auth_key = overlay.coordinator()?.authkey(&[tag], false)?;
        let out = overlay
            .node(name)?
            .up(&address, &key, Some(&auth_key), name)?;
        anyhow::ensure!(
            out.status.success(),
            "weft up on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ip = overlay.node(name)?.overlay_ipv4()?;
        let underlay = overlay.lab().host(name)?.addr;
        let behind = match site(name) {
            Site::Lan { router, .. } => {
                format!(" behind NAT {}", overlay.lab().router(&router)?.wan)
            }
            Site::Internet(_) => String::new(),
        };
        println!("node {name:<8} {tag:<10} overlay {ip:<14} underlay {underlay}{behind}");
        check_interrupt()?;
    }

    let mut servers = Vec::new();
    for (name, port) in [("db", 5432), ("db", 22), ("web", 80), ("admin", 22)] {
        servers.push(EchoServer::start(&overlay.lab().host(name)?.netns, port)?);
    }
    println!("\nconnections through the overlay (TCP, each answered by an echo server):");
    for (from, to, port) in [
        ("web", "db", 5432),
        ("web", "db", 22),
        ("db", "web", 80),
        ("admin", "web", 80),
        ("admin", "db", 22),
        ("web", "admin", 22),
    ] {
        let dst = SocketAddr::new(overlay.node(to)?.overlay_ipv4()?, port);
        let netns = overlay.lab().host(from)?.netns.clone();
        let allowed = wait_until(Duration::from_secs(2), || {
            tcp_echo(&netns, dst, Duration::from_millis(700)).is_ok()
        })
        .is_some();
        let mark = if allowed { "allowed" } else { "denied " };
        println!("  {mark}  {from:>5} -> {to}:{port}");
        check_interrupt()?;
    }

    println!("\n`weft status` on admin (behind the NAT: direct once hole punching worked, else through the relay):");
    let out = overlay.node("admin")?.weft(&["status"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("\n`weft netcheck` on admin:");
    let out = overlay.node("admin")?.weft(&["netcheck"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    if let Some(seconds) = hold {
        println!("\nThe overlay stays up for {seconds} s (Ctrl-C ends it). Try, for example:");
        let web = &overlay.lab().host("web")?.netns;
        let db_ip = overlay.node("db")?.overlay_ipv4()?;
        println!("  ip netns exec {web} ping {db_ip}");
        let socket = overlay.lab().host_dir("admin").join("weftd/weftd.sock");
        println!("  weft --socket {} status", socket.display());
        println!("  weft --socket {} ping web", socket.display());
        let until = std::time::Instant::now() + Duration::from_secs(seconds);
        while std::time::Instant::now() < until && !INTERRUPTED.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(servers);
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
