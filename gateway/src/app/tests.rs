//! The whole gateway in-process, over real sockets: a stalled disk and a stuck request at
//! shutdown.

use std::time::Duration;

use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};

use super::*;
use crate::config::Env;
use crate::ingress;

const SECRET: &str = "whsec_app_test";

async fn gateway(dir: &std::path::Path, extra: &[(&str, &str)]) -> Running {
    let mut pairs = vec![
        ("POSGATE__DATA_DIR", dir.display().to_string()),
        ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0".into()),
        ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0".into()),
        ("POSGATE__MQTT__LISTEN", "127.0.0.1:0".into()),
        ("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET.into()),
    ];
    pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let config = Config::load(None, &Env::from_pairs(pairs)).unwrap();
    Gateway::build(config).await.unwrap().spawn()
}

async fn post(running: &Running, body: &str) -> (u16, String) {
    let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let signature = posgate_proto::webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
    let response = reqwest::Client::new()
        .post(format!("http://{}{}", running.ingress_addr, ingress::PATH))
        .header(TIMESTAMP_HEADER, ts)
        .header(SIGNATURE_HEADER, signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn readyz(running: &Running) -> u16 {
    reqwest::get(format!("http://{}/readyz", running.admin_addr))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A disk that stops answering (an fdatasync held back): the webhook waiting for it is
/// answered `503` at `store.commit_deadline_ms`, not left hanging; `/readyz` (and with it the
/// systemd watchdog) says unhealthy; once the disk answers again, both recover, and the
/// webhook's retry is a duplicate (it was committed after all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_answers_503_and_fails_readiness_until_it_answers_again() {
    let dir = tempfile::tempdir().unwrap();
    let running = gateway(dir.path(), &[("POSGATE__STORE__COMMIT_DEADLINE_MS", "300")]).await;
    let body = r#"{"id":"evt_stall","type":"payment_intent.confirmed","created_at":"2026-01-01T00:00:00Z","data":{"id":"pi_stall","status":"confirmed","amount":"1.00","metadata":{"terminal_id":"pos-1"}}}"#;
    assert_eq!(readyz(&running).await, 200);
    running.store().hold_syncs_for_test(true);
    let stalled = post(&running, body).await;
    // The answer's deadline runs from the submission, the store's own from the commit's
    // start a moment later: not ready within moments, while the sync is still held.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut ready = readyz(&running).await;
    while ready == 200 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
        ready = readyz(&running).await;
    }
    running.store().hold_syncs_for_test(false);
    assert_eq!(stalled.0, 503, "{}", stalled.1);
    assert_eq!(ready, 503, "/readyz while the disk is stalled");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while readyz(&running).await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retried = post(&running, body).await;
    assert_eq!(retried.0, 200);
    assert!(retried.1.contains(r#""duplicate":true"#), "{}", retried.1);
    running.shutdown(Duration::from_secs(5)).await;
}

/// A request stuck inside the daemon (its commit waits on a disk that does not answer) is
/// cut at the end of the grace period: its connection is closed, not left running after
/// `shutdown` returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_connection_of_a_stuck_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let running = gateway(
        dir.path(),
        &[("POSGATE__STORE__COMMIT_DEADLINE_MS", "60000")],
    )
    .await;
    let store = running.store().clone();
    let body = r#"{"id":"evt_stuck","type":"payment_intent.confirmed","created_at":"2026-01-01T00:00:00Z","data":{"id":"pi_stuck","status":"confirmed","amount":"1.00","metadata":{"terminal_id":"pos-1"}}}"#;
    let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let signature = posgate_proto::webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
    let request = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{TIMESTAMP_HEADER}: {ts}\r\n{SIGNATURE_HEADER}: {signature}\r\ncontent-length: {}\r\n\r\n{body}",
        ingress::PATH,
        body.len()
    );
    let before = store.syncs_requested_for_test();
    store.hold_syncs_for_test(true);
    let mut stream = tokio::net::TcpStream::connect(running.ingress_addr)
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    // The webhook is committed and waits for its fdatasync, which does not come.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.syncs_requested_for_test() == before {
        assert!(tokio::time::Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shutdown = tokio::spawn(running.shutdown(Duration::from_millis(300)));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .is_ok();
    // The store closes only once its last commit is answered: let the disk answer now.
    store.hold_syncs_for_test(false);
    shutdown.await.unwrap();
    assert!(
        closed,
        "the stuck request's connection was still open 5 s after a 300 ms grace period"
    );
}
