//! The demo overlay: a coordinator and three nodes with different identities
//! in network namespaces on this machine, a policy between them, and the
//! connections it allows and denies. Everything is removed at the end.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use weft_tests::{tcp_echo, wait_until, EchoServer, Lab, Overlay};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

const NODES: [(&str, u8, &str); 3] = [
    ("web", 11, "tag:web"),
    ("db", 12, "tag:db"),
    ("admin", 13, "tag:admin"),
];

fn main() -> Result<()> {
    let hold = std::env::args()
        .skip_while(|a| a != "--hold")
        .nth(1)
        .map(|s| s.parse::<u64>().context("--hold takes a number of seconds"))
        .transpose()?;
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "weft-demo [--hold SECONDS]\n\nStarts a weft coordinator and three nodes (web, db, admin) in network \
             namespaces, shows which connections the demo policy allows, then removes everything.\n\
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
    lab.add_host("coord", 1)?;
    for (name, octet, _) in NODES {
        lab.add_host(name, octet)?;
    }
    let mut overlay = Overlay::new(lab)?;
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
    let coordinator = overlay.start_coordinator("coord", policy)?;
    let address = coordinator.address().to_owned();
    let key = coordinator.public_key()?;
    println!("coordinator   {address}   key {key}");
    println!("policy        {}\n", policy.display());
    check_interrupt()?;
    for (name, _, tag) in NODES {
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
        println!("node {name:<8} {tag:<10} overlay {ip:<14} underlay {underlay}");
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

    println!("\n`weft status` on web:");
    let out = overlay.node("web")?.weft(&["status"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    if let Some(seconds) = hold {
        println!("\nThe overlay stays up for {seconds} s (Ctrl-C ends it). Try, for example:");
        let web = &overlay.lab().host("web")?.netns;
        let db_ip = overlay.node("db")?.overlay_ipv4()?;
        println!("  ip netns exec {web} ping {db_ip}");
        let socket = overlay.lab().host_dir("web").join("weftd/weftd.sock");
        println!("  weft --socket {} status", socket.display());
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
