//! The walking skeleton, end to end: a coordinator and five nodes in network
//! namespaces, real TUN devices, real WireGuard over real UDP, identities
//! from tagged auth keys, and a policy file that decides who reaches whom.

#![expect(
    clippy::expect_used,
    reason = "a test whose setup fails must stop there"
)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use weft_tests::{fixture, ping, tcp_echo, wait_until, EchoServer, Lab, Overlay};

const DENY_WAIT: Duration = Duration::from_millis(1500);
const ALLOW_WAIT: Duration = Duration::from_secs(3);
const PROPAGATION_BUDGET: Duration = Duration::from_secs(5);
/// A well-formed key that no coordinator holds.
const WRONG_COORDINATOR_KEY: &str = "EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE=";

/// Runs a scenario on a fresh overlay; on failure, the panic carries every
/// process's log. The overlay is torn down either way.
fn with_overlay(hosts: &[(&str, u8)], scenario: impl FnOnce(&mut Overlay) -> Result<()>) {
    let mut lab = Lab::new().expect("create lab");
    for (name, octet) in hosts {
        lab.add_host(name, *octet).expect("add host");
    }
    let mut overlay = Overlay::new(lab).expect("create overlay");
    if let Err(e) = scenario(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

fn addr(overlay: &Overlay, host: &str) -> Result<IpAddr> {
    overlay.node(host)?.overlay_ipv4()
}

fn ns(overlay: &Overlay, host: &str) -> Result<String> {
    Ok(overlay.lab().host(host)?.netns.clone())
}

fn expect_ping(overlay: &Overlay, from: &str, to: &str, allowed: bool) -> Result<()> {
    let dst = addr(overlay, to)?;
    let ok = if allowed {
        wait_until(ALLOW_WAIT, || {
            ping(
                &ns(overlay, from).unwrap_or_default(),
                dst,
                Duration::from_millis(500),
            )
        })
        .is_some()
    } else {
        ping(&ns(overlay, from)?, dst, DENY_WAIT)
    };
    ensure!(
        ok == allowed,
        "ping {from} -> {to} ({dst}): expected {}, got {}",
        verdict(allowed),
        verdict(ok)
    );
    Ok(())
}

fn expect_tcp(overlay: &Overlay, from: &str, to: &str, port: u16, allowed: bool) -> Result<()> {
    let dst = SocketAddr::new(addr(overlay, to)?, port);
    let from_ns = ns(overlay, from)?;
    let result = if allowed {
        let mut last = Ok(());
        let ok = wait_until(ALLOW_WAIT, || {
            last = tcp_echo(&from_ns, dst, Duration::from_secs(1));
            last.is_ok()
        });
        ok.map(|_| ())
            .ok_or_else(|| anyhow::anyhow!("{:?}", last.err()))
    } else {
        tcp_echo(&from_ns, dst, DENY_WAIT)
    };
    ensure!(
        result.is_ok() == allowed,
        "tcp {from} -> {to}:{port}: expected {}, got {} ({result:?})",
        verdict(allowed),
        verdict(result.is_ok())
    );
    Ok(())
}

fn verdict(allowed: bool) -> &'static str {
    if allowed {
        "allowed"
    } else {
        "denied"
    }
}

#[test]
fn identity_admitted_overlay_end_to_end() {
    let hosts = [
        ("coord", 1),
        ("web", 11),
        ("db", 12),
        ("admin", 13),
        ("lonely", 14),
        ("intruder", 15),
    ];
    with_overlay(&hosts, |overlay| {
        let policy = overlay.lab().dir().join("policy.hujson");
        std::fs::copy(fixture("policy-initial.hujson"), &policy)?;
        overlay.start_coordinator("coord", &policy)?;
        for host in ["web", "db", "admin", "lonely", "intruder"] {
            overlay.start_node(host)?;
        }
        let coordinator = overlay.coordinator()?;
        let web_key = coordinator.authkey(&["tag:web"], false)?;
        let db_key = coordinator.authkey(&["tag:db"], false)?;
        let admin_key = coordinator.authkey(&["tag:admin"], false)?;
        let lonely_key = coordinator.authkey(&["tag:lonely"], false)?;

        // Joining, and the time from `weft up` to the first packet through the tunnel.
        overlay.join("web", &web_key)?;
        let started = Instant::now();
        overlay.join("db", &db_key)?;
        let db_addr = addr(overlay, "db")?;
        let web_ns = ns(overlay, "web")?;
        let first_packet = wait_until(Duration::from_secs(10), || {
            ping(&web_ns, db_addr, Duration::from_millis(300))
        })
        .context("no packet crossed the tunnel within 10 s of `weft up`")?;
        weft_tests::record_metric(&format!(
            "weft up -> first packet through the tunnel: {} ms (of which the first ping's wait: {} ms)",
            started.elapsed().as_millis(),
            first_packet.as_millis()
        ));
        overlay.join("admin", &admin_key)?;
        overlay.join("lonely", &lonely_key)?;

        // Identities and addresses.
        let nodes = overlay.coordinator()?.nodes()?;
        let nodes = nodes.as_array().context("nodes list is an array")?;
        ensure!(nodes.len() == 4, "expected 4 nodes, got {nodes:?}");
        let web_status = overlay.node("web")?.status()?;
        let addresses = web_status["self"]["addresses"]
            .as_array()
            .context("addresses")?;
        ensure!(
            addresses
                .iter()
                .any(|a| a.as_str().is_some_and(|a| a.starts_with("100."))),
            "web has no 100.64.0.0/10 address: {web_status}"
        );
        ensure!(
            addresses
                .iter()
                .any(|a| a.as_str().is_some_and(|a| a.starts_with("fd"))),
            "web has no ULA address: {web_status}"
        );

        // Allowed flows pass; their return traffic passes.
        let _db_port = EchoServer::start(&ns(overlay, "db")?, 5432)?;
        let _web_port = EchoServer::start(&ns(overlay, "web")?, 8080)?;
        let _admin_port = EchoServer::start(&ns(overlay, "admin")?, 22)?;
        expect_ping(overlay, "web", "db", true)?;
        expect_tcp(overlay, "web", "db", 5432, true)?;
        expect_ping(overlay, "admin", "web", true)?;
        expect_tcp(overlay, "admin", "web", 8080, true)?;
        // Denied flows get nothing, and an allowed flow does not open the reverse direction.
        expect_ping(overlay, "db", "web", false)?;
        expect_tcp(overlay, "db", "web", 8080, false)?;
        expect_ping(overlay, "web", "admin", false)?;
        expect_tcp(overlay, "web", "admin", 22, false)?;
        expect_ping(overlay, "lonely", "web", false)?;

        // Each node learns only the peers policy relates it to.
        let web_peers = overlay.node("web")?.peer_names()?;
        ensure!(
            sorted(&web_peers) == ["admin", "db"],
            "web should see exactly admin and db, sees {web_peers:?}"
        );
        let lonely_peers = overlay.node("lonely")?.peer_names()?;
        ensure!(
            lonely_peers == ["admin"],
            "lonely should see only admin, sees {lonely_peers:?}"
        );
        let db_status = overlay.node("db")?.status()?;
        let web_seen_by_db = db_status["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["hostname"] == "web")
            .context("db does not see web")?;
        ensure!(
            web_seen_by_db["identity"].to_string().contains("tag:web"),
            "identity: {web_seen_by_db}"
        );
        for field in [
            "addresses",
            "endpoint",
            "last_handshake",
            "rx_bytes",
            "tx_bytes",
        ] {
            ensure!(
                !web_seen_by_db[field].is_null(),
                "peer field {field} missing: {web_seen_by_db}"
            );
        }

        // A policy edit reaches running nodes: a new allow and a removed allow.
        std::fs::copy(fixture("policy-edited.hujson"), &policy)?;
        let db_ns = ns(overlay, "db")?;
        let web_8080 = SocketAddr::new(addr(overlay, "web")?, 8080);
        let opened = wait_until(PROPAGATION_BUDGET, || {
            tcp_echo(&db_ns, web_8080, Duration::from_millis(100)).is_ok()
        })
        .context("the new allow (db -> web:8080) did not take effect within 5 s")?;
        let db_5432 = SocketAddr::new(db_addr, 5432);
        let closed = wait_until(PROPAGATION_BUDGET, || {
            tcp_echo(&web_ns, db_5432, Duration::from_millis(100)).is_err()
        })
        .context("the removed allow (web -> db:5432) still worked 5 s after the edit")?;
        weft_tests::record_metric(&format!(
            "policy edit -> enforced on nodes: new allow after {} ms, removed allow confirmed after {} ms",
            opened.as_millis(),
            (opened + closed).as_millis()
        ));

        // A policy that fails its own tests is refused; the one in force stays.
        let refused = overlay
            .coordinator()?
            .policy_set(&fixture("policy-failing-test.hujson"))?;
        let refusal = String::from_utf8_lossy(&refused.stderr).to_string()
            + &String::from_utf8_lossy(&refused.stdout);
        ensure!(
            !refused.status.success(),
            "a policy failing its tests was accepted: {refusal}"
        );
        ensure!(
            refusal.contains("policy-failing-test.hujson:"),
            "refusal does not point at the file: {refusal}"
        );
        std::fs::copy(fixture("policy-failing-test.hujson"), &policy)?;
        std::thread::sleep(Duration::from_secs(2));
        expect_tcp(overlay, "lonely", "db", 5432, false)?;
        expect_tcp(overlay, "db", "web", 8080, true)?;

        // A restarted node keeps its addresses and its tunnels come back.
        let before = overlay.node("db")?.status()?["self"]["addresses"].clone();
        overlay.node_mut("db")?.restart(true)?;
        let back = wait_until(Duration::from_secs(10), || {
            overlay
                .node("db")
                .and_then(|n| n.status())
                .is_ok_and(|s| s["self"]["addresses"] == before)
        });
        ensure!(
            back.is_some(),
            "db came back with other addresses than {before}"
        );
        expect_ping(overlay, "web", "db", true)?;
        weft_tests::record_metric(&format!(
            "node restart -> tunnel back: {} ms",
            back.unwrap_or_default().as_millis()
        ));

        // A coordinator killed outright loses nothing it acknowledged.
        let nodes_before = overlay.coordinator()?.nodes()?;
        overlay.coordinator_mut()?.restart(true)?;
        let nodes_after = overlay.coordinator()?.nodes()?;
        ensure!(
            same_nodes(&nodes_before, &nodes_after),
            "nodes changed across kill -9: {nodes_before} vs {nodes_after}"
        );
        let reconnected = wait_until(Duration::from_secs(10), || {
            overlay
                .coordinator()
                .and_then(|c| c.nodes())
                .is_ok_and(|nodes| {
                    nodes
                        .as_array()
                        .is_some_and(|n| n.iter().all(|n| n["online"] == true))
                })
        })
        .context("nodes did not reconnect to the restarted coordinator within 10 s")?;
        weft_tests::record_metric(&format!(
            "coordinator kill -9 and restart -> every node online again: {} ms after it listened",
            reconnected.as_millis()
        ));
        expect_ping(overlay, "admin", "db", true)?;

        // A reused single-use key and a wrong coordinator key are refused clearly.
        let coordinator = overlay.coordinator()?;
        let intruder = overlay.node("intruder")?;
        let reused = intruder.up(
            coordinator.address(),
            &coordinator.public_key()?,
            Some(&web_key),
            "intruder",
        )?;
        let text = output_text(&reused);
        ensure!(
            !reused.status.success(),
            "a reused single-use key was accepted: {text}"
        );
        ensure!(
            text.contains("single-use"),
            "refusal does not say the key was single-use: {text}"
        );
        ensure!(
            !text.contains(&web_key),
            "the refusal echoes the secret auth key: {text}"
        );
        let fresh = coordinator.authkey(&["tag:web"], false)?;
        let wrong = intruder.up(
            coordinator.address(),
            WRONG_COORDINATOR_KEY,
            Some(&fresh),
            "intruder",
        )?;
        let text = output_text(&wrong);
        ensure!(
            !wrong.status.success(),
            "a wrong coordinator key was accepted: {text}"
        );
        ensure!(
            text.contains("coordinator-key"),
            "refusal does not name --coordinator-key: {text}"
        );
        ensure!(
            coordinator.nodes()?.as_array().map(Vec::len) == Some(4),
            "a refused node was registered"
        );

        // Deleting a node cuts its tunnels on every peer.
        let web_ip = addr(overlay, "web")?;
        overlay.coordinator()?.delete_node("web")?;
        let gone = wait_until(PROPAGATION_BUDGET, || {
            ["db", "admin"].iter().all(|h| {
                overlay
                    .node(h)
                    .and_then(|n| n.peer_names())
                    .is_ok_and(|p| !p.iter().any(|n| n == "web"))
            })
        })
        .context("peers still list the deleted node after 5 s")?;
        ensure!(
            !ping(&ns(overlay, "admin")?, web_ip, DENY_WAIT),
            "admin still reaches the deleted node"
        );
        ensure!(
            !ping(&ns(overlay, "web")?, db_addr, DENY_WAIT),
            "the deleted node still reaches db"
        );
        let state = overlay.node("web")?.status()?["state"].clone();
        ensure!(
            state != "running",
            "the deleted node still says it is running"
        );
        weft_tests::record_metric(&format!(
            "nodes delete -> removed from every peer: {} ms",
            gone.as_millis()
        ));
        Ok(())
    });
}

fn sorted(names: &[String]) -> Vec<&str> {
    let mut v: Vec<&str> = names.iter().map(String::as_str).collect();
    v.sort_unstable();
    v
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn same_nodes(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    let key = |v: &serde_json::Value| {
        let mut nodes: Vec<(String, String, String)> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["name"].to_string(),
                    n["ipv4"].to_string(),
                    n["ipv6"].to_string(),
                )
            })
            .collect();
        nodes.sort();
        nodes
    };
    key(a) == key(b) && !key(a).is_empty()
}

#[test]
fn namespaces_and_processes_are_removed_when_a_check_fails() {
    let mut recorded: Option<(String, u32)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new().expect("create lab");
        lab.add_host("coord", 1).expect("add host");
        let ns = lab.host("coord").expect("host").netns.clone();
        let mut overlay = Overlay::new(lab).expect("create overlay");
        let policy = overlay.lab().dir().join("policy.hujson");
        std::fs::copy(fixture("policy-initial.hujson"), &policy).expect("policy");
        let pid = overlay
            .start_coordinator("coord", &policy)
            .expect("coordinator")
            .pid()
            .expect("pid");
        recorded = Some((ns, pid));
        panic!("a deliberately failing check");
    }));
    assert!(result.is_err());
    let (ns, pid) = recorded.expect("the scenario ran up to the failing check");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "coordinator {pid} outlived the failed test"
    );
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&ns),
        "namespace {ns} outlived the failed test"
    );
}
