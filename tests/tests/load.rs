//! The load tool works: 200 simulated nodes connect to a real coordinator,
//! a policy change reaches every one, a joining node reaches its group, and
//! after the coordinator is killed and restarted every node resumes.
//! The large runs are the documented `weft-load` command (README, "Scale").

use std::time::Duration;

use weft_tests::load::{self, Backend, LoadOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_simulated_nodes_get_a_policy_change_and_a_join() {
    let options = LoadOptions {
        nodes: 200,
        group_size: 50,
        wave: 50,
        backend: Backend::Embedded,
        coordinator_bin: load::default_binary().expect("binaries built"),
        phase_timeout: Duration::from_secs(60),
        idle_window: Duration::from_secs(1),
        resume: true,
    };
    let report = load::run(&options).await.expect("load run");
    print!("{}", report.table());
    assert_eq!(report.connected, 200, "{report:?}");
    assert_eq!(report.groups, 4);
    assert!(report.policy_change.complete(), "{report:?}");
    assert_eq!(report.policy_change.expected, 200);
    assert_eq!(report.join.expected, 50);
    assert!(report.join.complete(), "{report:?}");
    assert!(report.join_self.is_some());
    assert!(report.coordinator.peak_rss > 0);
    assert!(report.reconnect.complete(), "{report:?}");
    assert_eq!(
        (report.reconnect_resumed, report.reconnect_full),
        (201, 0),
        "every node resumes after the restart: {report:?}"
    );
    let ms = |d: Option<std::time::Duration>| {
        d.map_or("-".to_owned(), |d| format!("{} ms", d.as_millis()))
    };
    weft_tests::record_metric(&format!(
        "load smoke (200 nodes, debug build): connect {:.2} s, policy change p99 {}, join p100 {}",
        report.connect_time.as_secs_f64(),
        ms(report.policy_change.p99),
        ms(report.join.p100),
    ));
}
