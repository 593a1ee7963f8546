//! Graceful shutdown: in-flight requests drain within the grace period and the store closes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate::Gateway;
use posgate::config::{Config, Env};
use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{SECRET, signed_post, spawn_gateway, test_env};

#[tokio::test]
async fn shutdown_mid_stream_keeps_every_acknowledged_event_and_reopens() {
    let gw = spawn_gateway().await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let senders: Vec<_> = (0..8)
        .map(|s| {
            let (url, acked, count_tx) = (gw.webhook_url(), acked.clone(), count_tx.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                for n in 0.. {
                    let pi = format!("pi_sd_{s}_{n}");
                    let body = events::intent_event(
                        &format!("evt_sd_{s}_{n}"),
                        "confirmed",
                        &Intent::new(&pi, MicroUsdc(1), "pos-1"),
                    );
                    match signed_post(&http, &url, SECRET, body).send().await {
                        Ok(r) if r.status() == 200 => {
                            let mut acked = acked.lock().unwrap();
                            acked.push(pi);
                            count_tx.send_replace(acked.len());
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    count_rx.wait_for(|n| *n >= 100).await.unwrap();
    let gw = gw.restart().await; // clean shutdown while the senders are still sending
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for pi in &acked {
        assert!(
            gw.intent(pi).await.is_some(),
            "{pi} was answered 200 but is gone"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stuck_request_is_cut_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load(None, &Env::from_pairs(test_env(dir.path(), &[]))).unwrap();
    let running = Gateway::build(config).await.unwrap().spawn();
    // A sender that announces a body and never finishes it.
    let mut stream = tokio::net::TcpStream::connect(running.ingress_addr)
        .await
        .unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\nx-stablegenius-timestamp: 1\r\n\r\n{{",
        events::WEBHOOK_PATH
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let took = running.shutdown(Duration::from_secs(1)).await;
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a 1 s grace"
    );
    // Its connection was cut, not left running after the daemon "stopped": the client reads the
    // end of the stream (or a reset) at once.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the stuck request's connection is still open after shutdown"
    );
    // The store was closed: the database can be opened again at once.
    let config = Config::load(None, &Env::from_pairs(test_env(dir.path(), &[]))).unwrap();
    let running = Gateway::build(config)
        .await
        .expect("store reopens after shutdown")
        .spawn();
    running.shutdown(Duration::from_secs(1)).await;
}
