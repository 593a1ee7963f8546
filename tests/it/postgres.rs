//! The daemon on the PostgreSQL store (`store.backend = "postgres"`), against a real server the
//! test process starts (`posgate-testpg`): a webhook reaches its terminal, and a confirmation
//! not yet acked survives a SIGKILL and a restart on the same ports.

use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};

use crate::crash::{Listen, sigterm, start_daemon_env};
use crate::harness::{SECRET, signed_post};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_webhook_reaches_its_terminal_and_an_unacked_one_survives_a_sigkill() {
    let url = tokio::task::spawn_blocking(|| posgate_testpg::shared().fresh_db())
        .await
        .unwrap();
    let env = [
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", url.as_str()),
        // The restarted process renews its predecessor's shard leases at once instead of waiting
        // for them to expire (the default id is new at each start).
        ("POSGATE__REPLICAS__ID", "pg-it"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon_env(dir.path(), None, Listen::any(), &env).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let online = daemon.provision(&http, "pos_pg_on").await;
    let offline = daemon.provision(&http, "pos_pg_off").await;
    let webhook = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let post = |evt: &str, pi: &str, terminal: &str| {
        let intent = Intent::new(pi, MicroUsdc(4_500_000), terminal);
        signed_post(
            &http,
            &webhook,
            SECRET,
            events::intent_event(evt, "confirmed", &intent),
        )
        .send()
    };

    let mut terminal = posgate_sim::terminal::Terminal::connect(online, daemon.mqtt)
        .await
        .unwrap();
    assert_eq!(
        post("evt_pg_1", "pi_pg_1", "pos_pg_on")
            .await
            .unwrap()
            .status(),
        200
    );
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_pg_1", 1));
    // The same event again is a duplicate: no second confirmation.
    assert_eq!(
        post("evt_pg_1", "pi_pg_1", "pos_pg_on")
            .await
            .unwrap()
            .status(),
        200
    );

    // Nobody can ack this one before the kill: its terminal is offline.
    assert_eq!(
        post("evt_pg_2", "pi_pg_2", "pos_pg_off")
            .await
            .unwrap()
            .status(),
        200
    );
    let listen = daemon.listen();
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();
    drop(terminal);

    let daemon = start_daemon_env(dir.path(), None, listen, &env).await;
    let mut terminal = posgate_sim::terminal::Terminal::connect(offline, daemon.mqtt)
        .await
        .unwrap();
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_pg_2", 1));
    // The data is in PostgreSQL, not in a redb file beside the keys.
    assert!(!dir.path().join("posgate.redb").exists());
    let rows: i64 = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .query_one("SELECT count(*) FROM events", &[])
            .unwrap()
            .get(0)
    })
    .await
    .unwrap();
    assert_eq!(rows, 2);
    sigterm(&daemon).await;
}

/// The database killed under a running daemon: `/readyz` answers `503` and webhooks are refused
/// with `503` (the provider retries) until it is back; then the daemon takes them again by
/// itself, without a restart, and what it acknowledged before is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_database_going_away_fails_readiness_until_it_is_back() {
    let server = std::sync::Arc::new(
        tokio::task::spawn_blocking(posgate_testpg::Server::start)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let url = {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.fresh_db())
            .await
            .unwrap()
    };
    let env = [
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", url.as_str()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon_env(dir.path(), None, Listen::any(), &env).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let webhook = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let readyz = format!("http://{}/readyz", daemon.admin);
    let post = |n: u32| {
        let intent = Intent::new(&format!("pi_gone_{n}"), MicroUsdc(4_500_000), "pos_x");
        signed_post(
            &http,
            &webhook,
            SECRET,
            events::intent_event(&format!("evt_gone_{n}"), "confirmed", &intent),
        )
        .send()
    };
    assert_eq!(post(1).await.unwrap().status(), 200);
    assert_eq!(http.get(&readyz).send().await.unwrap().status(), 200);

    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.kill())
            .await
            .unwrap();
    }
    crate::harness::eventually(Duration::from_secs(10), || async {
        (http.get(&readyz).send().await.unwrap().status() == 503).then_some(())
    })
    .await;
    assert_eq!(post(2).await.unwrap().status(), 503);

    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.start_again())
            .await
            .unwrap()
            .unwrap();
    }
    crate::harness::eventually(Duration::from_secs(30), || async {
        (http.get(&readyz).send().await.unwrap().status() == 200).then_some(())
    })
    .await;
    // The provider's retry of the refused one, and a new one.
    assert_eq!(post(2).await.unwrap().status(), 200);
    assert_eq!(post(3).await.unwrap().status(), 200);
    let events: i64 = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT count(*) FROM events WHERE k IN ('evt_gone_1', 'evt_gone_2', 'evt_gone_3')",
                &[],
            )
            .unwrap()
            .get(0)
    })
    .await
    .unwrap();
    assert_eq!(events, 3);
    sigterm(&daemon).await;
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}
