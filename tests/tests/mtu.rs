//! MTU through the tunnel: the TUN device's 1420 bytes carry full-size
//! packets; a larger packet with DF set is answered with ICMP "too big" by
//! weftd, so the host's path MTU discovery learns 1420; and an underlay
//! narrower than a full WireGuard datagram still carries a bulk transfer
//! intact, because the outer UDP datagrams are fragmented.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use weft_tests::{fixture, hashed_transfer, Lab, Overlay};

/// The TUN device's name: weftd's default.
const TUN: &str = "weft0";
/// The port the fixture policy opens between web and db.
const PORT: u16 = 5432;
/// The bulk transfer over a narrow underlay each way, and the time it may
/// take (seconds when every datagram is fragmented as it should be).
const TRANSFER: usize = 8 * 1024 * 1024;
const TRANSFER_TIME: Duration = Duration::from_secs(30);

#[test]
fn path_mtu_discovery_learns_the_tunnel_mtu() {
    let mut overlay = overlay().unwrap();
    if let Err(e) = path_mtu(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

#[test]
fn a_narrow_underlay_fragments_the_outer_datagrams() {
    let mut overlay = overlay().unwrap();
    if let Err(e) = narrow_underlay(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

fn overlay() -> Result<Overlay> {
    let mut lab = Lab::new()?;
    for (name, octet) in [("coord", 1), ("web", 11), ("db", 12)] {
        lab.add_host(name, octet)?;
    }
    Overlay::new(lab)
}

/// Starts the coordinator, joins web and db, and waits for a ping to
/// cross; returns their namespaces.
fn join(overlay: &mut Overlay) -> Result<(String, String)> {
    let policy = overlay.lab().dir().join("policy.hujson");
    std::fs::copy(fixture("policy-mtu.hujson"), &policy)?;
    overlay.join_pair("coord", &policy, [("web", "tag:web"), ("db", "tag:db")])
}

fn path_mtu(overlay: &mut Overlay) -> Result<()> {
    let (web_ns, _) = join(overlay)?;
    let db4 = overlay.node("db")?.overlay_ipv4()?;
    let db6 = overlay.node("db")?.overlay_ipv6()?;

    // 1392 bytes of payload + 8 of ICMP + 20 of IP: exactly the TUN MTU.
    let full = df_ping(&web_ns, db4, 1392, 1)?;
    ensure!(
        full.ok,
        "a 1420-byte DF ping did not cross:\n{}",
        full.output
    );
    let over = df_ping(&web_ns, db4, 1393, 1)?;
    ensure!(
        !over.ok && over.output.contains("mtu=1420"),
        "a 1421-byte DF ping was not refused by the host for the TUN MTU:\n{}",
        over.output
    );
    let full6 = df_ping(&web_ns, db6, 1372, 1)?;
    ensure!(
        full6.ok,
        "a 1420-byte IPv6 ping did not cross:\n{}",
        full6.output
    );

    // A TUN device wider than the tunnel: the host hands weftd 1500-byte
    // packets, and only weftd's answer can teach it the path MTU.
    netns_cmd(&web_ns, "ip", &["link", "set", TUN, "mtu", "1500"])?;
    let big = df_ping(&web_ns, db4, 1472, 3)?;
    ensure!(
        big.output.contains("Frag needed and DF set (mtu = 1420)"),
        "no ICMP fragmentation-needed answer for a 1500-byte DF ping:\n{}",
        big.output
    );
    let route = netns_cmd(&web_ns, "ip", &["route", "get", &db4.to_string()])?;
    ensure!(
        route.contains("mtu 1420"),
        "the host did not cache the path MTU:\n{route}"
    );
    let again = df_ping(&web_ns, db4, 1472, 1)?;
    ensure!(
        !again.ok && again.output.contains("mtu=1420"),
        "the host sent a 1500-byte DF packet again after learning the path MTU:\n{}",
        again.output
    );
    let fits = df_ping(&web_ns, db4, 1392, 1)?;
    ensure!(
        fits.ok,
        "a 1420-byte DF ping failed after path MTU discovery:\n{}",
        fits.output
    );

    // IPv6 is never fragmented on the way: Packet Too Big instead.
    let big6 = df_ping(&web_ns, db6, 1452, 3)?;
    ensure!(
        big6.output.contains("Packet too big: mtu=1420"),
        "no ICMPv6 packet-too-big answer for a 1500-byte IPv6 ping:\n{}",
        big6.output
    );
    let route6 = netns_cmd(&web_ns, "ip", &["-6", "route", "get", &db6.to_string()])?;
    ensure!(
        route6.contains("mtu 1420"),
        "the host did not cache the IPv6 path MTU:\n{route6}"
    );

    let status = overlay.node("web")?.status()?;
    let sent = status["filter"]["too_big_sent"].as_u64().unwrap_or(0);
    ensure!(
        sent >= 2,
        "weft status counts {sent} too-big answers, expected one per family at least: {status}"
    );
    Ok(())
}

fn narrow_underlay(overlay: &mut Overlay) -> Result<()> {
    let (web_ns, db_ns) = join(overlay)?;
    let web4 = overlay.node("web")?.overlay_ipv4()?;
    let db4 = overlay.node("db")?.overlay_ipv4()?;
    // A full WireGuard datagram is 1420 + 32 + 8 + 20 = 1480 bytes. The
    // lab's underlay is one bridged LAN, which drops what does not fit
    // rather than answering, so both ends get the narrow link.
    overlay.lab().set_underlay_mtu("web", 1280)?;
    overlay.lab().set_underlay_mtu("db", 1280)?;
    let fragments_before = fragments_created(&web_ns)? + fragments_created(&db_ns)?;

    let full = df_ping(&web_ns, db4, 1392, 1)?;
    ensure!(
        full.ok,
        "a 1420-byte DF ping and its reply did not cross a 1280-byte underlay:\n{}",
        full.output
    );
    for (from, to, dst) in [(&web_ns, &db_ns, db4), (&db_ns, &web_ns, web4)] {
        hashed_transfer(
            from,
            to,
            SocketAddr::new(dst, PORT),
            TRANSFER,
            TRANSFER_TIME,
        )
        .with_context(|| format!("a bulk transfer to {dst} over a 1280-byte underlay"))?;
    }
    let fragments = fragments_created(&web_ns)? + fragments_created(&db_ns)? - fragments_before;
    ensure!(
        fragments > 0,
        "no outer datagram was fragmented: the test did not exercise the narrow underlay"
    );
    Ok(())
}

/// What a `ping` run printed, and whether every echo was answered.
struct PingRun {
    ok: bool,
    output: String,
}

/// `count` pings with DF set ("-M do") and `size` bytes of payload from
/// namespace `ns` to `dst`.
fn df_ping(ns: &str, dst: IpAddr, size: u16, count: u8) -> Result<PingRun> {
    let family = if dst.is_ipv4() { "-4" } else { "-6" };
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", family, "-n", "-M", "do"])
        .args(["-s", &size.to_string(), "-c", &count.to_string()])
        .args(["-i", "0.2", "-W", "2"])
        .arg(dst.to_string())
        .output()
        .context("run ping")?;
    Ok(PingRun {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// Runs `program args…` in namespace `ns` and returns its output.
fn netns_cmd(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` in {ns} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 fragments namespace `ns` has created (`FragCreates` in
/// `/proc/net/snmp`).
fn fragments_created(ns: &str) -> Result<u64> {
    let snmp = netns_cmd(ns, "cat", &["/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = ip.next().zip(ip.next()).context("no Ip: lines")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "FragCreates")
        .context("no FragCreates counter")?
        .1
        .parse()
        .context("FragCreates is not a number")
}
