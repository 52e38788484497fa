//! The policy language enforced on real nodes: a deny rule overriding an
//! accept, an audit-mode deny logged at the destination while traffic
//! passes, a posture-gated rule following the source's posture file, and an
//! application capability the destination's local API reports.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use weft_tests::{fixture, tcp_echo, wait_until, EchoServer, Lab, Overlay};

const DENY_WAIT: Duration = Duration::from_millis(1500);
const ALLOW_WAIT: Duration = Duration::from_secs(3);
/// How soon a posture change must open or close access.
const POSTURE_BUDGET: Duration = Duration::from_secs(5);

/// Whether a TCP echo from `from` to `to:port` works within `within`.
fn reaches(overlay: &Overlay, from: &str, to: &str, port: u16, within: Duration) -> Result<bool> {
    let dst = SocketAddr::new(overlay.node(to)?.overlay_ipv4()?, port);
    let from_ns = overlay.lab().host(from)?.netns.clone();
    Ok(wait_until(within, || {
        tcp_echo(&from_ns, dst, Duration::from_millis(800)).is_ok()
    })
    .is_some())
}

/// Whether a single TCP echo attempt fails (the flow is dropped).
fn blocked(overlay: &Overlay, from: &str, to: &str, port: u16) -> Result<bool> {
    let dst = SocketAddr::new(overlay.node(to)?.overlay_ipv4()?, port);
    let from_ns = overlay.lab().host(from)?.netns.clone();
    Ok(tcp_echo(&from_ns, dst, DENY_WAIT).is_err())
}

#[test]
fn deny_audit_posture_and_capabilities_on_real_nodes() {
    weft_tests::require_root().expect("root");
    let mut lab = Lab::new().expect("create lab");
    for (name, octet) in [("coord", 10), ("client", 11), ("server", 12)] {
        lab.add_host(name, octet).expect("add host");
    }
    let mut overlay = Overlay::new(lab).expect("create overlay");
    if let Err(e) = scenario(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

fn scenario(overlay: &mut Overlay) -> Result<()> {
    let policy = overlay.lab().dir().join("policy.hujson");
    std::fs::copy(fixture("policy-enforce.hujson"), &policy)?;
    overlay.start_coordinator("coord", &policy)?;
    let posture = overlay.lab().host_dir("client").join("posture.json");
    let posture_arg = posture.to_string_lossy().into_owned();
    overlay.start_node_with("client", &["--posture-file", &posture_arg])?;
    overlay.start_node("server")?;
    let client_key = overlay.coordinator()?.authkey(&["tag:client"], false)?;
    let server_key = overlay.coordinator()?.authkey(&["tag:server"], false)?;
    overlay.join("client", &client_key)?;
    overlay.join("server", &server_key)?;

    let server_ns = overlay.lab().host("server")?.netns.clone();
    let _echo: Vec<EchoServer> = (7000..=7003)
        .map(|port| EchoServer::start(&server_ns, port))
        .collect::<Result<_>>()?;
    let server_ip = overlay.node("server")?.overlay_ipv4()?;
    let client_ip = overlay.node("client")?.overlay_ipv4()?;

    // The accept covers 7000-7002; without it nothing below would mean much.
    ensure!(
        reaches(overlay, "client", "server", 7000, ALLOW_WAIT)?,
        "client -> server:7000 must pass: an accept covers it"
    );

    // (a) An enforced deny wins over the accept that covers the port.
    ensure!(
        blocked(overlay, "client", "server", 7001)?,
        "client -> server:7001 must be dropped: a deny rule covers it"
    );
    let status = overlay.node("server")?.status()?;
    let denied = status["filter"]["denied_by_rule"].as_u64().unwrap_or(0);
    ensure!(
        denied > 0,
        "the server counts no packet dropped by a deny rule: {status}"
    );

    // (b) An audit-mode deny lets traffic through and logs the would-be
    // denial at the destination, with addresses and the port.
    ensure!(
        reaches(overlay, "client", "server", 7002, ALLOW_WAIT)?,
        "client -> server:7002 must pass: its deny rule is in audit mode"
    );
    let audit_line = format!("dst={server_ip}:7002");
    let logged = wait_until(Duration::from_secs(2), || {
        overlay
            .node("server")
            .map(|n| {
                n.log()
                    .lines()
                    .any(|l| l.contains("would deny") && l.contains(&audit_line))
            })
            .unwrap_or(false)
    });
    ensure!(
        logged.is_some(),
        "the server's log has no `would deny` line for {audit_line}"
    );
    let server_log = overlay.node("server")?.log();
    ensure!(
        !server_log
            .lines()
            .any(|l| l.contains("would deny") && l.contains(&format!("{server_ip}:7000"))),
        "traffic no deny rule covers was logged as a would-be denial"
    );

    // (c) The posture-gated rule follows the client's posture file.
    ensure!(
        blocked(overlay, "client", "server", 7003)?,
        "client -> server:7003 must be dropped while the client is not managed"
    );
    std::fs::write(
        &posture,
        r#"{"custom:managed": "true", "node:os": "spoofed"}"#,
    )?;
    ensure!(
        reaches(overlay, "client", "server", 7003, POSTURE_BUDGET)?,
        "client -> server:7003 did not open within {POSTURE_BUDGET:?} of writing custom:managed"
    );
    let nodes = overlay.coordinator()?.nodes()?;
    ensure!(
        !nodes.to_string().contains("spoofed"),
        "a posture key outside custom: reached the coordinator: {nodes}"
    );
    std::fs::remove_file(&posture)?;
    let closed = wait_until(POSTURE_BUDGET, || {
        blocked(overlay, "client", "server", 7003).unwrap_or(false)
    });
    ensure!(
        closed.is_some(),
        "client -> server:7003 stayed open {POSTURE_BUDGET:?} after the posture file was removed"
    );

    // (d) The grant's capability, as the destination's local API reports it.
    let out = overlay
        .node("server")?
        .weft(&["whois", &client_ip.to_string(), "--json"])?;
    ensure!(
        out.status.success(),
        "weft whois failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let who: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("weft whois --json output")?;
    ensure!(
        who["capabilities"]["example.com/cap/deploy"] == serde_json::json!([{"env": "prod"}]),
        "whois on the server does not show the client's capability: {who}"
    );
    ensure!(
        who["identity"]["tags"] == serde_json::json!(["tag:client"]),
        "whois names the wrong identity: {who}"
    );
    let unknown: IpAddr = "100.127.255.254".parse()?;
    let out = overlay
        .node("server")?
        .weft(&["whois", &unknown.to_string()])?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no peer"),
        "whois of an unknown address must fail with a reason: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
