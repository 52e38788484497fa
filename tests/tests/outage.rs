//! Every coordinator down: tunnels keep passing traffic for minutes, a node
//! restarted during the outage brings its tunnels back from the netmap it
//! cached (signed by the coordinator, verified at start), a tampered cache
//! is refused, and everything converges once the coordinator returns.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use weft_tests::{ping, record_metric, wait_until, Lab, Overlay};

/// How long the coordinator stays down while traffic is probed.
const OUTAGE: Duration = Duration::from_secs(120);
/// Time between probes during the outage.
const PROBE_EVERY: Duration = Duration::from_secs(3);
/// A restarted node must pass traffic again this soon, coordinator or not.
const RESTORE_BUDGET: Duration = Duration::from_secs(10);
/// Generous bound for anything that should happen within seconds, on a
/// loaded two-core machine.
const WAIT: Duration = Duration::from_secs(20);
/// After a long outage a node's reconnect backoff has reached its cap (30 s,
/// jittered up to 36 s): the returned coordinator is found within that.
const RECONNECT: Duration = Duration::from_secs(45);

const OPEN: &str = r#"{
  "tagOwners": {"tag:a": [], "tag:b": []},
  "acls": [
    {"action": "accept", "src": ["tag:a"], "dst": ["tag:b:*"]},
    {"action": "accept", "src": ["tag:b"], "dst": ["tag:a:*"]},
  ],
}"#;

#[test]
fn tunnels_survive_a_coordinator_outage_and_a_node_restart_during_it() {
    let mut lab = Lab::new().unwrap();
    for (name, octet) in [("coord", 1), ("a", 11), ("b", 12)] {
        lab.add_host(name, octet).unwrap();
    }
    let mut overlay = Overlay::new(lab).unwrap();
    if let Err(e) = scenario(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

fn scenario(overlay: &mut Overlay) -> Result<()> {
    let policy = overlay.lab().dir().join("policy.hujson");
    std::fs::write(&policy, OPEN)?;
    overlay.start_coordinator("coord", &policy)?;
    overlay.start_node("a")?;
    overlay.start_node("b")?;
    let key_a = overlay.coordinator()?.authkey(&["tag:a"], false)?;
    let key_b = overlay.coordinator()?.authkey(&["tag:b"], false)?;
    overlay.join("a", &key_a)?;
    overlay.join("b", &key_b)?;
    let a = overlay.node("a")?.overlay_ipv4()?;
    let b = overlay.node("b")?.overlay_ipv4()?;
    let (ns_a, ns_b) = (netns(overlay, "a")?, netns(overlay, "b")?);
    ensure!(
        reachable(&ns_a, b, WAIT) && reachable(&ns_b, a, WAIT),
        "a and b never reached each other with the coordinator up"
    );

    // Every coordinator down, as a crash would take it.
    overlay.coordinator_mut()?.stop(true);
    let started = Instant::now();
    let (mut probes, mut failures) = (0, Vec::new());
    while started.elapsed() < OUTAGE {
        let at = started.elapsed();
        for (from, to, label) in [(&ns_a, b, "a -> b"), (&ns_b, a, "b -> a")] {
            probes += 1;
            if !ping(from, to, Duration::from_secs(1)) {
                failures.push(format!("{label} at {:.0} s", at.as_secs_f64()));
            }
        }
        std::thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed() - at));
    }
    record_metric(&format!(
        "outage: {probes} probes over {} s with every coordinator down, {} failed",
        OUTAGE.as_secs(),
        failures.len()
    ));
    ensure!(
        failures.is_empty(),
        "tunnels failed during the outage: {failures:?}"
    );

    // A node restarted during the outage restores its tunnels from its cache.
    let restarting = Instant::now();
    overlay.node_mut("b")?.restart(true)?;
    let restored = wait_until(RESTORE_BUDGET, || {
        ping(&ns_b, a, Duration::from_millis(500)) && ping(&ns_a, b, Duration::from_millis(500))
    });
    let restored = restored.map(|_| restarting.elapsed()).with_context(|| {
        format!(
            "b's tunnel did not come back from its cache within {RESTORE_BUDGET:?}; status: {}",
            overlay
                .node("b")
                .and_then(|n| n.status())
                .map(|s| s.to_string())
                .unwrap_or_default()
        )
    })?;
    record_metric(&format!(
        "outage: weftd restarted with every coordinator down passes traffic again {} ms after the kill (from its signed cache)",
        restored.as_millis()
    ));
    ensure!(
        overlay.node("b")?.peer_names()? == ["a"],
        "b restored the wrong peers: {:?}",
        overlay.node("b")?.peer_names()?
    );

    // A tampered cache is refused whole: the node starts without peers and says why.
    let cache = overlay.node("b")?.state_dir().join("netmap.cache");
    overlay.node_mut("b")?.stop(true);
    let mut bytes = std::fs::read(&cache).context("b has no netmap cache")?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&cache, bytes)?;
    overlay.node_mut("b")?.restart(true)?;
    ensure!(
        overlay.node("b")?.peer_names()?.is_empty(),
        "b installed a tampered cache"
    );
    ensure!(
        overlay
            .node("b")?
            .log()
            .contains("ignoring the cached netmap, starting without peers"),
        "b did not log why it ignored its cache"
    );
    ensure!(
        !ping(&ns_b, a, Duration::from_secs(1)),
        "b reached a without a verified netmap"
    );

    // The coordinator returns: everything converges.
    let back = Instant::now();
    overlay.coordinator_mut()?.start_again()?;
    ensure!(
        reachable(&ns_b, a, WAIT) && reachable(&ns_a, b, WAIT),
        "a and b did not reach each other after the coordinator returned"
    );
    let converged = wait_until(RECONNECT, || {
        ["a", "b"].iter().all(|host| {
            overlay
                .node(host)
                .and_then(|n| n.status())
                .is_ok_and(|s| s["coordinator"]["connected"] == true)
        })
    });
    ensure!(
        converged.is_some(),
        "the nodes did not reconnect to the returned coordinator"
    );
    record_metric(&format!(
        "outage: coordinator back, both nodes connected and passing traffic within {} ms",
        back.elapsed().as_millis()
    ));
    Ok(())
}

fn netns(overlay: &Overlay, host: &str) -> Result<String> {
    Ok(overlay.lab().host(host)?.netns.clone())
}

fn reachable(ns: &str, dst: IpAddr, within: Duration) -> bool {
    wait_until(within, || ping(ns, dst, Duration::from_millis(500))).is_some()
}
