//! Failover, short: `posgate-sim failover` with small numbers. Replicas of the real `posgate`
//! binary on one PostgreSQL database (started by the test, `posgate-testpg`) behind a real
//! Mosquitto (external broker mode); replicas killed with SIGKILL under load, one at a time, and
//! started again later; nothing answered `200` is lost, `seq` has no gaps, and every terminal is
//! served again after every kill. The long run is a benchmark (docs/performance.md, "Past one
//! server").
//!
//! Needs PostgreSQL and Mosquitto (`.ci/run` installs both): without them it fails.

use std::time::Duration;

use posgate_sim::chaos::failover::{self, FailoverOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_under_load_lose_nothing_and_every_terminal_is_served_again() {
    let url = tokio::task::spawn_blocking(|| posgate_testpg::shared().fresh_db())
        .await
        .unwrap();
    let opts = FailoverOptions {
        replicas: 3,
        // The takeover, not the restart, serves the killed replica's terminals again.
        lease_secs: Some(2),
        terminals: 40,
        rate: 40.0,
        warmup: Duration::from_secs(3),
        kills: 2,
        kill_every: Duration::from_secs(12),
        restart_after: Duration::from_secs(8),
        served_within: Duration::from_secs(30),
        drain: Duration::from_secs(30),
        verbose: true,
        ..FailoverOptions::new(env!("CARGO_BIN_EXE_posgate-under-test").into(), url)
    };
    let report = failover::run(&opts).await.unwrap();
    let summary = serde_json::to_string_pretty(&report).unwrap();
    eprintln!("{summary}");
    let c = &report.confirmations;
    assert_eq!((c.lost, c.gaps, c.never_sent), (0, 0, 0), "{summary}");
    assert_eq!(c.out_of_order, 0, "{summary}");
    assert_eq!(report.kills.len(), 2, "{summary}");
    for kill in &report.kills {
        assert_eq!(kill.not_served, 0, "{summary}");
    }
    assert!(report.clean, "{summary}");
    // Every event (the probes included) was answered 200 in the end, and shown once.
    assert_eq!(report.webhooks.ok, report.webhooks.events, "{summary}");
    assert_eq!(c.delivered, report.webhooks.events, "{summary}");
    assert!(report.webhooks.events > 500, "{summary}");
}
