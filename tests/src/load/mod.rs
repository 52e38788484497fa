//! The coordinator load test: a real `weft-coordinator serve` on loopback and
//! N simulated nodes speaking the control protocol to it.
//!
//! [`run`] connects the fleet in bounded waves, then changes the policy so
//! every node's filter changes, then lets one more node join, and measures how
//! long each takes to reach the nodes it affects, and what the coordinator
//! spent (CPU time, peak RSS, CPU while the fleet idles on keep-alives).
//! Last it kills the coordinator (SIGKILL) and starts it again, and measures
//! how long the fleet takes to be back in sync and how many bytes the
//! coordinator sent for it: with [`LoadOptions::resume`] the nodes resume
//! from the views they hold and get deltas, without it full netmaps.
//!
//! [`trial`] is the registration-storm fault trial: the coordinator is killed
//! with SIGKILL during a storm of new nodes, restarted on the same state, and
//! checked for lost acknowledgements and duplicate nodes.

mod coordinator;
mod scenario;
mod sim;
mod stats;
mod storm;

pub use coordinator::default_binary;
pub use stats::{Spread, Usage};
pub use storm::{trial, SplitMix64, StormOptions, TrialReport, Violation, ViolationKind};

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use coordinator::CoordinatorProcess;
use scenario::Groups;
use sim::{Fleet, Milestone};

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded database in the data directory.
    Embedded,
    /// A single-member etcd on loopback, started for the run.
    Etcd,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Etcd => "etcd",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Simulated nodes.
    pub nodes: usize,
    /// Nodes per policy group: each node sees the other members of its group.
    pub group_size: usize,
    /// Nodes connecting at once.
    pub wave: usize,
    /// The coordinator's store.
    pub backend: Backend,
    /// The `weft-coordinator` binary.
    pub coordinator_bin: PathBuf,
    /// The longest wait for any one phase (connecting, policy change, join).
    pub phase_timeout: Duration,
    /// How long to watch the idle fleet for the keep-alive cost.
    pub idle_window: Duration,
    /// Whether nodes reconnecting after the coordinator restart resume
    /// from the views they hold (else they ask for full netmaps).
    pub resume: bool,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The options' node count.
    pub nodes: usize,
    /// The store used.
    pub backend: Backend,
    /// Policy groups, and so rules.
    pub groups: usize,
    /// Nodes registered and holding their first netmap.
    pub connected: usize,
    /// Time from the first connection attempt until the last node was synced.
    pub connect_time: Duration,
    /// Connection attempts that failed and were retried before a node synced.
    pub connect_retries: usize,
    /// Why nodes failed to connect, the first of them, and how many.
    pub connect_failures: Option<(usize, String)>,
    /// Coordinator CPU time spent connecting the fleet.
    pub connect_cpu: Duration,
    /// Coordinator CPU use while the connected fleet only sent keep-alives, in % of one core.
    pub idle_cpu_percent: f64,
    /// After writing a policy that changes every node's filter: when nodes had it.
    pub policy_change: Spread,
    /// Coordinator CPU time from writing that policy until the last node had it.
    pub policy_cpu: Duration,
    /// After one more node joined: when the peers that should see it had it.
    pub join: Spread,
    /// The joining node's own time to be registered and synced.
    pub join_self: Option<Duration>,
    /// Whether nodes resumed on reconnect.
    pub resume: bool,
    /// From the kill until the restarted coordinator answered its admin socket.
    pub restart_ready: Duration,
    /// After the coordinator was killed and started again: when each
    /// synced node was back in sync, from the kill.
    pub reconnect: Spread,
    /// Control-stream bytes the coordinator sent from the kill until the
    /// last node was back in sync.
    pub reconnect_bytes: u64,
    /// Reconnected sessions that started with a delta, and with a full netmap.
    pub reconnect_resumed: usize,
    pub reconnect_full: usize,
    /// The restarted coordinator's CPU time until the last node was back in sync.
    pub reconnect_cpu: Duration,
    /// The coordinator that served the fleet, just before it was killed:
    /// the run's CPU time and peak RSS.
    pub coordinator: Usage,
    /// The restarted coordinator once every node was back in sync.
    pub restarted: Usage,
    /// The load tool itself, which shares the machine.
    pub load_tool: Usage,
}

/// Runs the scenario; fails only when the coordinator cannot be started or
/// driven. Nodes that miss a deadline show as missing in the report.
pub async fn run(options: &LoadOptions) -> Result<Report> {
    if options.nodes == 0 || options.wave == 0 || options.group_size == 0 {
        bail!("--nodes, --wave and --group-size must be at least 1");
    }
    raise_fd_limit();
    let groups = Groups::new(options.nodes, options.group_size);
    let mut coordinator = CoordinatorProcess::start(options, groups).await?;
    let keys = coordinator.create_auth_keys(groups).await?;
    let mut fleet = Fleet::new(coordinator.listen(), coordinator.public_key())?;
    fleet.resume = options.resume;
    fleet.reconnects = Arc::new(Semaphore::new(options.wave));
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let (failures_tx, failures) = mpsc::unbounded_channel();
    let mut tracker = Tracker::new(options.nodes + 1, reports, failures);
    let waves = Arc::new(Semaphore::new(options.wave));

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..options.nodes {
        let permit = tokio::select! {
            permit = waves.clone().acquire_owned() => permit.context("wave semaphore closed")?,
            () = tracker.drain_until(started + options.phase_timeout) => break,
        };
        let key = keys[groups.of(index)].clone();
        let node = sim::run_node(
            fleet.clone(),
            index,
            format!("n{index}"),
            key,
            permit,
            reports_tx.clone(),
        );
        let failures_tx = failures_tx.clone();
        tasks.spawn(async move {
            if let Err(e) = node.await {
                let _ = failures_tx.send(format!("{e:#}"));
            }
        });
    }
    tracker
        .wait(
            Milestone::Synced,
            options.nodes,
            started + options.phase_timeout,
        )
        .await;
    let synced = tracker.arrivals(Milestone::Synced, started, 0..options.nodes);
    let connected = synced.len();
    let connect_time = synced.iter().max().copied().unwrap_or_default();
    let after_connect = coordinator.usage()?;

    tracker.drain_for(options.idle_window).await;
    let after_idle = coordinator.usage()?;
    let idle_cpu = after_idle.cpu.saturating_sub(after_connect.cpu);
    let idle_cpu_percent = 100.0 * idle_cpu.as_secs_f64() / options.idle_window.as_secs_f64();

    let before_change = coordinator.usage()?;
    let changed = coordinator.change_policy(groups)?;
    tracker
        .wait(
            Milestone::PolicyApplied,
            connected,
            changed + options.phase_timeout,
        )
        .await;
    let policy_change = Spread::new(
        connected,
        tracker.arrivals(Milestone::PolicyApplied, changed, 0..options.nodes),
    );
    let policy_cpu = coordinator.usage()?.cpu.saturating_sub(before_change.cpu);

    let joiner_group = 0;
    let expected = (0..options.nodes)
        .filter(|&i| groups.of(i) == joiner_group && tracker.reached(Milestone::Synced, i))
        .count();
    let joining = Instant::now();
    let permit = Arc::new(Semaphore::new(1))
        .acquire_owned()
        .await
        .context("joiner semaphore closed")?;
    let joiner = sim::run_node(
        fleet.clone(),
        options.nodes,
        fleet.joiner.to_string(),
        keys[joiner_group].clone(),
        permit,
        reports_tx.clone(),
    );
    let failures_joiner = failures_tx.clone();
    tasks.spawn(async move {
        if let Err(e) = joiner.await {
            let _ = failures_joiner.send(format!("joiner: {e:#}"));
        }
    });
    tracker
        .wait(
            Milestone::SawJoiner,
            expected,
            joining + options.phase_timeout,
        )
        .await;
    // The joiner's own report can trail its peers' in the channel.
    tracker
        .wait_node(
            Milestone::Synced,
            options.nodes,
            joining + options.phase_timeout,
        )
        .await;
    let join = Spread::new(
        expected,
        tracker.arrivals(Milestone::SawJoiner, joining, 0..options.nodes),
    );
    let join_self = tracker
        .arrivals(Milestone::Synced, joining, options.nodes..options.nodes + 1)
        .first()
        .copied();

    let in_sync = tracker.count(Milestone::Synced);
    let bytes_before = fleet.received.load(Ordering::Relaxed);
    let resumed_before = fleet.resumed.load(Ordering::Relaxed);
    let full_before = fleet.full_syncs.load(Ordering::Relaxed);
    let before_kill = coordinator.usage()?;
    coordinator.kill_hard()?;
    let killed = Instant::now();
    coordinator.restart().await?;
    let restart_ready = killed.elapsed();
    tracker
        .wait(Milestone::Resynced, in_sync, killed + options.phase_timeout)
        .await;
    let reconnect_bytes = fleet.received.load(Ordering::Relaxed) - bytes_before;
    let restarted = coordinator.usage()?;
    let reconnect = Spread::new(
        in_sync,
        tracker.arrivals(Milestone::Resynced, killed, 0..options.nodes + 1),
    );

    let report = Report {
        nodes: options.nodes,
        backend: options.backend,
        groups: groups.count(),
        connected,
        connect_time,
        connect_retries: fleet.retries.load(std::sync::atomic::Ordering::Relaxed),
        connect_failures: tracker.failures(),
        connect_cpu: after_connect.cpu,
        idle_cpu_percent,
        policy_change,
        policy_cpu,
        join,
        join_self,
        resume: options.resume,
        restart_ready,
        reconnect,
        reconnect_bytes,
        reconnect_resumed: fleet.resumed.load(Ordering::Relaxed) - resumed_before,
        reconnect_full: fleet.full_syncs.load(Ordering::Relaxed) - full_before,
        reconnect_cpu: restarted.cpu,
        coordinator: before_kill,
        restarted,
        load_tool: Usage::of(std::process::id())?,
    };
    tasks.abort_all();
    fleet.endpoint.close(0u32.into(), b"load test over");
    coordinator.stop();
    Ok(report)
}

impl Report {
    /// The figures as an aligned table.
    pub fn table(&self) -> String {
        let ms = |d: Option<Duration>| match d {
            Some(d) => format!("{:.0} ms", d.as_secs_f64() * 1000.0),
            None => "missed".to_owned(),
        };
        let spread = |s: &Spread| {
            format!(
                "p50 {}  p99 {}  p100 {}  ({}/{} nodes)",
                ms(s.p50),
                ms(s.p99),
                ms(s.p100),
                s.reached,
                s.expected
            )
        };
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let mut rows = vec![
            (
                "nodes",
                format!(
                    "{} ({} groups, {} store)",
                    self.nodes, self.groups, self.backend
                ),
            ),
            (
                "connected",
                format!(
                    "{}/{} in {:.2} s ({} retried attempts)",
                    self.connected,
                    self.nodes,
                    self.connect_time.as_secs_f64(),
                    self.connect_retries
                ),
            ),
            (
                "coordinator CPU to connect",
                format!("{:.2} s", self.connect_cpu.as_secs_f64()),
            ),
            (
                "coordinator CPU idle (keep-alives)",
                format!("{:.1} % of a core", self.idle_cpu_percent),
            ),
            ("policy change reached", spread(&self.policy_change)),
            (
                "coordinator CPU for the change",
                format!("{:.2} s", self.policy_cpu.as_secs_f64()),
            ),
            ("join reached peers", spread(&self.join)),
            ("joiner synced", ms(self.join_self)),
            (
                "coordinator kill -9 and restart",
                format!(
                    "resume {}: up again after {}, back in sync {}",
                    if self.resume { "on" } else { "off" },
                    ms(Some(self.restart_ready)),
                    spread(&self.reconnect)
                ),
            ),
            (
                "  coordinator sent",
                format!(
                    "{:.2} MiB ({} resumed, {} full netmaps), CPU {:.2} s",
                    mib(self.reconnect_bytes),
                    self.reconnect_resumed,
                    self.reconnect_full,
                    self.reconnect_cpu.as_secs_f64()
                ),
            ),
            (
                "coordinator before the kill",
                format!(
                    "CPU {:.2} s, peak RSS {:.0} MiB",
                    self.coordinator.cpu.as_secs_f64(),
                    mib(self.coordinator.peak_rss)
                ),
            ),
            (
                "restarted coordinator",
                format!("peak RSS {:.0} MiB", mib(self.restarted.peak_rss)),
            ),
            (
                "load tool total",
                format!(
                    "CPU {:.2} s, peak RSS {:.0} MiB",
                    self.load_tool.cpu.as_secs_f64(),
                    mib(self.load_tool.peak_rss)
                ),
            ),
        ];
        if let Some((count, first)) = &self.connect_failures {
            rows.push(("node failures", format!("{count}, first: {first}")));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }

    /// The figures as JSON, durations in milliseconds.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        let spread = |s: &Spread| {
            serde_json::json!({
                "expected": s.expected,
                "reached": s.reached,
                "p50_ms": ms(s.p50),
                "p99_ms": ms(s.p99),
                "p100_ms": ms(s.p100),
            })
        };
        serde_json::json!({
            "nodes": self.nodes,
            "backend": self.backend.to_string(),
            "groups": self.groups,
            "connected": self.connected,
            "connect_ms": ms(Some(self.connect_time)),
            "connect_retries": self.connect_retries,
            "connect_failures": self.connect_failures.as_ref().map(|(n, _)| n),
            "connect_cpu_s": self.connect_cpu.as_secs_f64(),
            "idle_cpu_percent": self.idle_cpu_percent,
            "policy_change": spread(&self.policy_change),
            "policy_cpu_s": self.policy_cpu.as_secs_f64(),
            "join": spread(&self.join),
            "join_self_ms": ms(self.join_self),
            "resume": self.resume,
            "restart_ready_ms": ms(Some(self.restart_ready)),
            "reconnect": spread(&self.reconnect),
            "reconnect_bytes": self.reconnect_bytes,
            "reconnect_resumed": self.reconnect_resumed,
            "reconnect_full": self.reconnect_full,
            "reconnect_cpu_s": self.reconnect_cpu.as_secs_f64(),
            "coordinator_cpu_s": self.coordinator.cpu.as_secs_f64(),
            "coordinator_peak_rss_bytes": self.coordinator.peak_rss,
            "restarted_peak_rss_bytes": self.restarted.peak_rss,
            "load_tool_cpu_s": self.load_tool.cpu.as_secs_f64(),
            "load_tool_peak_rss_bytes": self.load_tool.peak_rss,
        })
    }
}

/// Collects the simulated nodes' milestones as they arrive.
struct Tracker {
    times: [Vec<Option<Instant>>; 4],
    /// How many nodes reached each milestone, kept as reports arrive:
    /// counting `times` per report would cost O(n²) at 10k nodes on the
    /// cores the coordinator under test shares.
    counts: [usize; 4],
    reports: mpsc::UnboundedReceiver<sim::Report>,
    failures: mpsc::UnboundedReceiver<String>,
    failure_count: usize,
    first_failure: Option<String>,
}

impl Tracker {
    fn new(
        nodes: usize,
        reports: mpsc::UnboundedReceiver<sim::Report>,
        failures: mpsc::UnboundedReceiver<String>,
    ) -> Self {
        Self {
            times: std::array::from_fn(|_| vec![None; nodes]),
            counts: [0; 4],
            reports,
            failures,
            failure_count: 0,
            first_failure: None,
        }
    }

    fn slot(milestone: Milestone) -> usize {
        match milestone {
            Milestone::Synced => 0,
            Milestone::PolicyApplied => 1,
            Milestone::SawJoiner => 2,
            Milestone::Resynced => 3,
        }
    }

    fn record(&mut self, report: sim::Report) {
        let milestone = Self::slot(report.milestone);
        if let Some(slot @ None) = self.times[milestone].get_mut(report.index) {
            *slot = Some(report.at);
            self.counts[milestone] += 1;
        }
    }

    fn count(&self, milestone: Milestone) -> usize {
        self.counts[Self::slot(milestone)]
    }

    fn reached(&self, milestone: Milestone, index: usize) -> bool {
        self.times[Self::slot(milestone)]
            .get(index)
            .is_some_and(Option::is_some)
    }

    /// How long after `since` each node in `range` reached `milestone`.
    fn arrivals(
        &self,
        milestone: Milestone,
        since: Instant,
        range: std::ops::Range<usize>,
    ) -> Vec<Duration> {
        self.times[Self::slot(milestone)][range]
            .iter()
            .flatten()
            .map(|t| t.saturating_duration_since(since))
            .collect()
    }

    fn failures(&self) -> Option<(usize, String)> {
        self.first_failure
            .clone()
            .map(|first| (self.failure_count, first))
    }

    /// Records one report or failure; false when both channels are closed.
    async fn next(&mut self) -> bool {
        tokio::select! {
            Some(report) = self.reports.recv() => self.record(report),
            Some(failure) = self.failures.recv() => {
                self.failure_count += 1;
                self.first_failure.get_or_insert(failure);
            }
            else => return false,
        }
        true
    }

    /// Records reports until `count` nodes reached `milestone` or `deadline` passes.
    async fn wait(&mut self, milestone: Milestone, count: usize, deadline: Instant) {
        while self.count(milestone) < count {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Records reports until node `index` reached `milestone` or `deadline` passes.
    async fn wait_node(&mut self, milestone: Milestone, index: usize, deadline: Instant) {
        while !self.reached(milestone, index) {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Records reports until `deadline`.
    async fn drain_until(&mut self, deadline: Instant) {
        while let Ok(true) = tokio::time::timeout_at(deadline, self.next()).await {}
    }

    /// Records reports for `window`.
    async fn drain_for(&mut self, window: Duration) {
        self.drain_until(Instant::now() + window).await;
    }
}

/// Raises the open-file limit to its hard maximum; the coordinator inherits it.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_counts_each_node_once_per_milestone() {
        let (_reports_tx, reports) = mpsc::unbounded_channel();
        let (_failures_tx, failures) = mpsc::unbounded_channel();
        let mut tracker = Tracker::new(3, reports, failures);
        let start = Instant::now();
        let report = |index, milestone, ms| sim::Report {
            index,
            milestone,
            at: start + Duration::from_millis(ms),
        };
        tracker.record(report(0, Milestone::Synced, 5));
        tracker.record(report(0, Milestone::Synced, 9));
        tracker.record(report(2, Milestone::Synced, 7));
        tracker.record(report(7, Milestone::Synced, 1));
        tracker.record(report(1, Milestone::PolicyApplied, 3));
        assert_eq!(tracker.count(Milestone::Synced), 2);
        assert_eq!(tracker.count(Milestone::PolicyApplied), 1);
        assert_eq!(tracker.count(Milestone::SawJoiner), 0);
        assert_eq!(
            tracker.arrivals(Milestone::Synced, start, 0..3),
            [Duration::from_millis(5), Duration::from_millis(7)],
            "the first arrival of a node counts"
        );
    }

    #[tokio::test]
    async fn waiting_for_one_node_takes_the_reports_before_it_and_stops_at_the_deadline() {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (_failures_tx, failures) = mpsc::unbounded_channel();
        let mut tracker = Tracker::new(3, reports, failures);
        let report = |index, milestone| sim::Report {
            index,
            milestone,
            at: Instant::now(),
        };
        reports_tx.send(report(0, Milestone::SawJoiner)).unwrap();
        reports_tx.send(report(2, Milestone::Synced)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        tracker.wait_node(Milestone::Synced, 2, deadline).await;
        assert!(tracker.reached(Milestone::Synced, 2));
        assert!(tracker.reached(Milestone::SawJoiner, 0));
        let waited = Instant::now();
        tracker
            .wait_node(Milestone::Synced, 1, waited + Duration::from_millis(50))
            .await;
        assert!(!tracker.reached(Milestone::Synced, 1));
        assert!(waited.elapsed() >= Duration::from_millis(50));
    }
}
