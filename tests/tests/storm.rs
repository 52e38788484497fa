//! `kill -9` of the coordinator during a registration storm, on both stores:
//! no acknowledged registration is lost, no node is registered twice, and
//! every node that had no answer is registered exactly once after the
//! restart. The trials are seeded and the seed printed; a failing trial is
//! replayed with `WEFT_STORM_SEED`.
//!
//! Longer runs: `WEFT_STORM_TRIALS=50 WEFT_STORM_NODES=1000 cargo test -p
//! weft-tests --test storm -- --nocapture`.

#![expect(
    clippy::expect_used,
    reason = "a test whose setup fails must stop there"
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_tests::load::{self, Backend, SplitMix64, StormOptions, TrialReport, ViolationKind};

/// Trials per store in the default run.
const TRIALS: usize = 3;
/// Nodes per storm in the default run, per store: etcd commits each
/// registration through its log, so fewer keep its run as short.
fn default_nodes(backend: Backend) -> usize {
    match backend {
        Backend::Embedded => 300,
        Backend::Etcd => 150,
    }
}
/// Nodes registering at once.
const WAVE: usize = 60;

/// The trials start processes and etcd and use both cores; one store at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_registration_storm_on_the_embedded_store() {
    storm(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_registration_storm_on_etcd() {
    storm(Backend::Etcd).await;
}

async fn storm(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let trials = env_number("WEFT_STORM_TRIALS", TRIALS);
    let nodes = env_number("WEFT_STORM_NODES", default_nodes(backend));
    let seed = match std::env::var("WEFT_STORM_SEED") {
        Ok(seed) => parse_seed(&seed),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    println!("storm on the {backend} store: {trials} trial(s) of {nodes} nodes, seed {seed:#x} (replay with WEFT_STORM_SEED={seed:#x})");
    let mut seeds = SplitMix64(seed);
    let mut reports: Vec<TrialReport> = Vec::with_capacity(trials);
    for trial in 0..trials {
        // The first trial replays the printed seed itself.
        let trial_seed = if trial == 0 { seed } else { seeds.next_u64() };
        let options = StormOptions {
            nodes,
            wave: WAVE,
            backend,
            coordinator_bin: load::default_binary().expect("binaries built"),
            seed: trial_seed,
            timeout: Duration::from_secs(90),
        };
        let report = load::trial(&options)
            .await
            .unwrap_or_else(|e| panic!("{backend} trial {trial} (seed {trial_seed:#x}): {e:#}"));
        println!("trial {trial}: {}", report.summary());
        if !report.violations.is_empty() {
            let lines: Vec<String> = report
                .violations
                .iter()
                .map(|v| format!("  {:?}: {}", v.kind, v.detail))
                .collect();
            panic!(
                "{backend} trial {trial} (replay with WEFT_STORM_SEED={trial_seed:#x}) broke {} guarantee(s):\n{}",
                lines.len(),
                lines.join("\n")
            );
        }
        reports.push(report);
    }

    let sum = |f: fn(&TrialReport) -> usize| reports.iter().map(f).sum::<usize>();
    let slowest = |f: fn(&TrialReport) -> Duration| {
        reports
            .iter()
            .map(f)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
    };
    let total: Duration = reports.iter().map(|r| r.total).sum();
    weft_tests::record_metric(&format!(
        "storm kill -9 ({backend}): {} trials x {nodes} nodes, seed {seed:#x}: {} acknowledged before the kill, \
         {} sent without answer, {} not yet sent; lost {}, duplicates {}; restart <= {:.2} s, \
         all registered <= {:.2} s after the kill, {:.1} s in all",
        reports.len(),
        sum(|r| r.acked_before_kill),
        sum(|r| r.sent_unacked),
        sum(|r| r.not_sent),
        sum(|r| r.count(ViolationKind::Lost)),
        sum(|r| r.count(ViolationKind::Duplicate)),
        slowest(|r| r.restart),
        slowest(|r| r.recovery),
        total.as_secs_f64(),
    ));
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number; set a positive integer")),
        Err(_) => default,
    }
}

fn parse_seed(value: &str) -> u64 {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.unwrap_or_else(|_| {
        panic!("WEFT_STORM_SEED={value:?} is not a number; use the value a trial printed")
    })
}
