//! Two coordinator replicas on a three-member etcd cluster, with real weftd
//! nodes in network namespaces. etcd runs in a lab host of its own, so the
//! replicas reach it over the lab's network, and the nodes reach the
//! replicas over real UDP.
//!
//! Each scenario is measured: how long a node takes to move to the other
//! replica when its replica is killed, and how many probes of a continuous
//! 10/s ping are lost while replicas die, restart or lose etcd.

#![expect(
    clippy::expect_used,
    reason = "a test whose setup fails must stop there"
)]

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use weft_tests::{ping, record_metric, wait_until, Lab, Overlay};

/// A node must be on another replica this soon after its replica died.
const FAILOVER_BUDGET: Duration = Duration::from_secs(5);
/// Generous bound for anything that should happen within seconds, on a
/// loaded two-core machine.
const WAIT: Duration = Duration::from_secs(20);

const OPEN: &str = r#"{
  "tagOwners": {"tag:a": [], "tag:b": []},
  "acls": [
    {"action": "accept", "src": ["tag:a"], "dst": ["tag:b:*"]},
    {"action": "accept", "src": ["tag:b"], "dst": ["tag:a:*"]},
  ],
}"#;

/// Only TCP to 5432: pings are denied.
const NO_PING: &str = r#"{
  "tagOwners": {"tag:a": [], "tag:b": []},
  "acls": [
    {"action": "accept", "src": ["tag:a"], "dst": ["tag:b:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["tag:b"], "dst": ["tag:a:5432"], "proto": "tcp"},
  ],
}"#;

/// The scenarios each run five to eight processes and etcd; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `scenario` on a lab with etcd, two replicas (`ctl1`, `ctl2`) and
/// weftd on each of `nodes`; on failure the panic carries every log.
fn with_replicas(nodes: &[(&str, u8)], scenario: impl FnOnce(&mut Overlay) -> Result<()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new().expect("create lab");
    for (name, octet) in [("etcd", 250), ("ctl1", 2), ("ctl2", 3)]
        .iter()
        .chain(nodes)
    {
        lab.add_host(name, *octet).expect("add host");
    }
    let mut overlay = Overlay::new(lab).expect("create overlay");
    let result = (|| -> Result<()> {
        overlay.start_etcd("etcd", 3)?;
        let policy = overlay.lab().dir().join("policy.hujson");
        std::fs::write(&policy, OPEN)?;
        overlay.start_coordinator_replica("ctl1", &policy)?;
        overlay.start_coordinator_replica("ctl2", &policy)?;
        for (name, _) in nodes {
            overlay.start_node(name)?;
        }
        scenario(&mut overlay)
    })();
    if let Err(e) = result {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

#[test]
fn replicas_share_changes_fail_over_and_restart_without_dropping_tunnels() {
    with_replicas(&[("a", 11), ("b", 12)], |overlay| {
        let first = overlay.replica(0)?.address().to_owned();
        let second = overlay.replica(1)?.address().to_owned();
        let a_key = overlay.replica(0)?.authkey(&["tag:a"], false)?;
        let b_key = overlay.replica(1)?.authkey(&["tag:b"], false)?;
        overlay.join_via("a", &a_key, &format!("{first},{second}"))?;
        overlay.join_via("b", &b_key, &format!("{second},{first}"))?;
        wait_connected(overlay, "a", &first)?;
        wait_connected(overlay, "b", &second)?;

        // Registered through different replicas, they reach each other.
        expect_ping(overlay, "a", "b", true)?;
        expect_ping(overlay, "b", "a", true)?;

        // A policy put in force through one replica is enforced on the
        // nodes of both.
        let strict = overlay.lab().dir().join("no-ping.hujson");
        std::fs::write(&strict, NO_PING)?;
        let started = Instant::now();
        set_policy(overlay, 1, &strict)?;
        wait_denied(overlay, "a", "b")?;
        wait_denied(overlay, "b", "a")?;
        record_metric(&format!(
            "replicas: policy set through one replica enforced on both replicas' nodes in {} ms",
            started.elapsed().as_millis()
        ));
        let open = overlay.lab().dir().join("open.hujson");
        std::fs::write(&open, OPEN)?;
        set_policy(overlay, 0, &open)?;
        expect_ping(overlay, "a", "b", true)?;

        // kill -9 of a's replica: a moves to the other within the budget,
        // and the tunnel passes every probe throughout.
        let probe = ContinuousPing::start(overlay, "a", "b", 100)?;
        std::thread::sleep(Duration::from_secs(1));
        overlay.replica_mut(0)?.stop(true);
        let killed = Instant::now();
        let moved = wait_until(WAIT, || {
            overlay
                .node("a")
                .and_then(|n| n.connected_to())
                .is_ok_and(|c| c.as_deref() == Some(second.as_str()))
        })
        .context("a did not connect to the surviving replica")?;
        let failover = killed.elapsed();
        record_metric(&format!(
            "replicas: kill -9 of a node's replica -> node on the other replica in {} ms (budget {} ms)",
            failover.as_millis(),
            FAILOVER_BUDGET.as_millis()
        ));
        ensure!(
            failover < FAILOVER_BUDGET,
            "failover took {failover:?} (observed after {moved:?}), over the {FAILOVER_BUDGET:?} budget"
        );
        let (sent, received) = probe.finish()?;
        record_metric(&format!(
            "replicas: continuous ping across kill -9 of a replica: {received}/{sent} answered"
        ));
        ensure!(
            sent == received,
            "{} of {sent} probes lost across the failover",
            sent - received
        );

        // The killed replica comes back; then a rolling restart of both
        // (SIGTERM, start, wait until every node is connected, next).
        overlay.replica_mut(0)?.start_again()?;
        let mut probe = ContinuousPing::start(overlay, "b", "a", 400)?;
        let rolling = Instant::now();
        for (replica, other) in [(0, &second), (1, &first)] {
            let restarted = overlay.replica(replica)?.address().to_owned();
            let mut on_it = Vec::new();
            for node in ["a", "b"] {
                if overlay.node(node)?.connected_to()?.as_deref() == Some(restarted.as_str()) {
                    on_it.push(node);
                }
            }
            overlay.replica_mut(replica)?.restart(false)?;
            for node in on_it {
                wait_connected(overlay, node, other)?;
            }
        }
        ensure!(
            [&first, &second].iter().any(|r| overlay
                .node("a")
                .and_then(|n| n.connected_to())
                .ok()
                .flatten()
                .as_deref()
                == Some(r.as_str())),
            "a is not connected after the rolling restart"
        );
        let took = rolling.elapsed();
        ensure!(
            probe.is_running(),
            "the ping ended before the rolling restart did ({took:?}); it covered only part of it"
        );
        let (sent, received) = probe.finish()?;
        record_metric(&format!(
            "replicas: rolling restart of both replicas ({} ms): {received}/{sent} pings answered",
            took.as_millis()
        ));
        ensure!(
            sent == received,
            "{} of {sent} probes lost in the rolling restart",
            sent - received
        );
        expect_ping(overlay, "a", "b", true)?;
        Ok(())
    });
}

#[test]
fn etcd_faults_keep_tunnels_and_refuse_changes_only_without_quorum() {
    with_replicas(&[("a", 11), ("b", 12), ("c", 13), ("d", 14)], |overlay| {
        let addresses = overlay.coordinator_addresses()?;
        let replica = overlay.replica(0)?;
        let a_key = replica.authkey(&["tag:a"], false)?;
        let b_key = replica.authkey(&["tag:b"], false)?;
        let c_key = replica.authkey(&["tag:b"], false)?;
        let d_key = replica.authkey(&["tag:b"], false)?;
        overlay.join_via("a", &a_key, &addresses)?;
        overlay.join("b", &b_key)?;
        expect_ping(overlay, "a", "b", true)?;

        // One etcd member stopped: a new node still registers and reaches its peer.
        overlay.etcd_mut()?.stop(1)?;
        overlay.etcd_mut()?.wait_healthy()?;
        let started = Instant::now();
        overlay.join("c", &c_key)?;
        expect_ping(overlay, "c", "a", true)?;
        record_metric(&format!(
            "replicas: one of three etcd members stopped: new node registered and reached its peer in {} ms",
            started.elapsed().as_millis()
        ));
        overlay.etcd_mut()?.restart_all()?;

        // The whole etcd down: registration is refused with a clear error
        // and existing tunnels keep passing traffic.
        let key = overlay.coordinator()?.public_key()?;
        let mut probe = ContinuousPing::start(overlay, "a", "b", 150)?;
        std::thread::sleep(Duration::from_secs(1));
        overlay.etcd_mut()?.stop_all();
        let out = overlay.node("d")?.up(&addresses, &key, Some(&d_key), "d")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !out.status.success(),
            "weft up succeeded with etcd down: {text}"
        );
        ensure!(
            text.contains("cannot reach its database") && text.contains("retry later"),
            "the refusal does not say etcd is away: {text}"
        );
        record_metric(
            "replicas: whole etcd down: `weft up` refused at once (\"the coordinator cannot reach its database right now; retry later\")",
        );
        std::thread::sleep(Duration::from_secs(5));
        ensure!(
            probe.is_running(),
            "the ping ended before the etcd outage did"
        );

        // etcd returns: a registration succeeds, and the new node reaches its peer.
        overlay.etcd_mut()?.restart_all()?;
        let (sent, received) = probe.finish()?;
        record_metric(&format!(
            "replicas: continuous ping through a whole-etcd outage: {received}/{sent} answered"
        ));
        ensure!(
            sent == received,
            "{} of {sent} probes lost while etcd was down",
            sent - received
        );
        let started = Instant::now();
        let joined = wait_until(WAIT, || overlay.join("d", &d_key).is_ok());
        joined.context("no registration succeeded after etcd returned")?;
        expect_ping(overlay, "d", "a", true)?;
        record_metric(&format!(
            "replicas: etcd back: registration succeeded and the node reached its peer in {} ms",
            started.elapsed().as_millis()
        ));
        Ok(())
    });
}

/// `ping -i 0.1 -c COUNT` from one node to another, in the background.
#[test]
fn a_node_back_after_its_coordinator_restarts_resumes_with_a_delta() {
    with_replicas(&[("a", 11), ("b", 12), ("c", 13), ("d", 14)], |overlay| {
        let first = overlay.replica(0)?.address().to_owned();
        let second = overlay.replica(1)?.address().to_owned();
        let replica = overlay.replica(1)?;
        let a_key = replica.authkey(&["tag:a"], false)?;
        let b_keys = [
            replica.authkey(&["tag:b"], false)?,
            replica.authkey(&["tag:b"], false)?,
            replica.authkey(&["tag:b"], false)?,
        ];
        // a knows only the first replica, so it waits for it to return.
        overlay.join_via("a", &a_key, &first)?;
        for (node, key) in ["b", "c", "d"].iter().zip(&b_keys) {
            overlay.join_via(node, key, &second)?;
        }
        wait_peers(overlay, "a", &["b", "c", "d"], WAIT)?;
        expect_ping(overlay, "a", "c", true)?;

        // While a's coordinator is away, c's endpoints change and d is deleted.
        overlay.replica_mut(0)?.stop(false);
        let c_ns = overlay.lab().host("c")?.netns.clone();
        let added = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c_ns,
                "ip",
                "addr",
                "add",
                "198.18.0.13/32",
                "dev",
                "lo",
            ])
            .status()?;
        ensure!(added.success(), "cannot add an address to c");
        let c_moved = wait_until(WAIT, || {
            overlay
                .replica(1)
                .and_then(|r| r.nodes())
                .is_ok_and(|nodes| nodes.to_string().contains("198.18.0.13"))
        });
        c_moved.context("c's new endpoint never reached the coordinator")?;
        overlay.replica(1)?.delete_node("d")?;

        // The replica returns: a resumes, and gets exactly what changed.
        let restarted = Instant::now();
        overlay.replica_mut(0)?.start_again()?;
        wait_connected_within(overlay, "a", &first, Duration::from_secs(45))?;
        wait_peers(overlay, "a", &["b", "c"], WAIT)?;
        let log = overlay.replica(0)?.log();
        let resumed = log
            .lines()
            .find(|line| line.contains("session resumed with a delta"))
            .with_context(|| format!("a did not resume:\n{log}"))?;
        ensure!(
            resumed.contains("upserts=1") && resumed.contains("removals=1"),
            "the resumed delta should carry c's new record and d's removal: {resumed}"
        );
        ensure!(
            !log.contains("session starts with a full netmap"),
            "a got a full netmap:\n{log}"
        );
        record_metric(&format!(
            "replicas: node back on its restarted replica resumed with a delta (1 upsert, 1 removal) {} ms after the restart",
            restarted.elapsed().as_millis()
        ));
        expect_ping(overlay, "a", "c", true)?;
        expect_ping(overlay, "a", "b", true)?;
        Ok(())
    });
}

/// Waits until `node`'s peers are exactly `expected`.
fn wait_peers(overlay: &Overlay, node: &str, expected: &[&str], within: Duration) -> Result<()> {
    let mut seen = Vec::new();
    let ok = wait_until(within, || {
        seen = overlay
            .node(node)
            .and_then(|n| n.peer_names())
            .unwrap_or_default();
        seen.sort();
        seen == expected
    });
    ensure!(
        ok.is_some(),
        "{node} has peers {seen:?}, expected {expected:?}"
    );
    Ok(())
}

fn wait_connected_within(
    overlay: &Overlay,
    node: &str,
    replica: &str,
    within: Duration,
) -> Result<()> {
    let ok = wait_until(within, || {
        overlay
            .node(node)
            .and_then(|n| n.connected_to())
            .ok()
            .flatten()
            .as_deref()
            == Some(replica)
    });
    ensure!(
        ok.is_some(),
        "{node} did not reconnect to {replica} within {within:?}"
    );
    Ok(())
}

struct ContinuousPing {
    child: Option<Child>,
}

impl ContinuousPing {
    fn start(overlay: &Overlay, from: &str, to: &str, count: u32) -> Result<Self> {
        let dst = addr(overlay, to)?;
        let ns = overlay.lab().host(from)?.netns.clone();
        // `ip netns exec` execs ping, so the child's PID is ping's.
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-n", "-q", "-i", "0.1", "-W", "1",
            ])
            .args(["-c", &count.to_string()])
            .arg(dst.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start ping")?;
        Ok(Self { child: Some(child) })
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the last probe; `(sent, received)`.
    fn finish(mut self) -> Result<(u32, u32)> {
        let child = self.child.take().context("ping already finished")?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no ping summary in {text:?}"))?;
        let number = |word: &str| -> Result<u32> {
            let before = line
                .split(',')
                .find(|part| part.contains(word))
                .with_context(|| format!("no {word:?} in {line:?}"))?;
            before
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("bad count in {line:?}"))
        };
        Ok((number("transmitted")?, number("received")?))
    }
}

impl Drop for ContinuousPing {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn addr(overlay: &Overlay, host: &str) -> Result<IpAddr> {
    overlay.node(host)?.overlay_ipv4()
}

fn set_policy(overlay: &Overlay, replica: usize, file: &std::path::Path) -> Result<()> {
    let out = overlay.replica(replica)?.policy_set(file)?;
    ensure!(
        out.status.success(),
        "policy set through replica {replica} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn wait_connected(overlay: &Overlay, node: &str, replica: &str) -> Result<()> {
    let mut seen = None;
    let ok = wait_until(WAIT, || {
        seen = overlay
            .node(node)
            .and_then(|n| n.connected_to())
            .ok()
            .flatten();
        seen.as_deref() == Some(replica)
    });
    ensure!(
        ok.is_some(),
        "{node} is connected to {seen:?}, expected {replica}"
    );
    Ok(())
}

fn expect_ping(overlay: &Overlay, from: &str, to: &str, allowed: bool) -> Result<()> {
    let dst = addr(overlay, to)?;
    let ns = overlay.lab().host(from)?.netns.clone();
    let ok = wait_until(WAIT, || {
        ping(&ns, dst, Duration::from_millis(500)) == allowed
    });
    ensure!(
        ok.is_some(),
        "ping {from} -> {to} ({dst}): expected {}",
        if allowed { "replies" } else { "none" }
    );
    Ok(())
}

fn wait_denied(overlay: &Overlay, from: &str, to: &str) -> Result<()> {
    expect_ping(overlay, from, to, false)
}
