//! The chaos soak, short: the real `posgate` process killed and stopped under load, restarted on
//! the same ports, with terminals on MQTT, SSE and WebSocket; nothing answered `200` is lost.

use std::time::Duration;

use posgate_sim::chaos::{self, ChaosOptions, Every};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_restarts_under_load_lose_nothing() {
    let opts = ChaosOptions {
        terminals: 30,
        http_terminals: 6,
        rate: 50.0,
        // Kills due at about 4.5, 9, 13.5 and 18 s, a SIGTERM restart in between.
        kill_every: Some(Every::secs(4, 5)),
        term_every: Some(Every::secs(8, 12)),
        // Ends as soon as everything is shown; long only on a machine far too busy (one CI run
        // with three builds beside it showed 344 of 939 at the drain's start, 827 after 15 s).
        drain: Duration::from_secs(45),
        verbose: true,
        ..ChaosOptions::new(
            env!("CARGO_BIN_EXE_posgate-under-test").into(),
            Duration::from_secs(20),
        )
    };
    let report = chaos::run(&opts).await.unwrap();
    let summary = serde_json::to_string_pretty(&report).unwrap();
    eprintln!("{summary}");
    let c = &report.confirmations;
    assert_eq!((c.lost, c.gaps), (0, 0), "{summary}");
    assert!(report.clean, "{summary}");
    // Four kills are due; a busy machine slows the restarts between them (two seen under three
    // builds), and two kills and a SIGTERM still show what the test is for.
    assert!(report.faults.kills >= 2, "{summary}");
    assert!(report.faults.sigterms >= 1, "{summary}");
    assert_eq!(report.faults.unclean_stops, 0, "{summary}");
    assert_eq!(
        report.terminals.mqtt + report.terminals.sse + report.terminals.ws,
        30
    );
    assert!(
        report.terminals.sse > 0 && report.terminals.ws > 0,
        "{summary}"
    );
    // Every event was answered 200 in the end, and every one was shown once.
    assert_eq!(report.webhooks.ok, report.webhooks.events, "{summary}");
    assert_eq!(c.delivered, report.webhooks.events, "{summary}");
    assert!(report.webhooks.events > 500, "{summary}");
}
