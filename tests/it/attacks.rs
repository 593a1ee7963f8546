//! Attacks from the attacker's side (issue 16), each short, beside an honest terminal or webhook
//! that must still be served: request heads sent a byte at a time, a pile of signature headers on
//! a large body, an RPC flood while confirmations flow to another terminal, a subscription flood
//! sent without waiting for the answers. `posgate-sim attack <kind>` runs the same attacks at
//! scale beside the honest load of `bench e2e` (docs/performance.md).

use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use posgate_sim::events::{self, Intent};
use posgate_sim::terminal::{Identity, Seen, connect_raw};
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::harness::{self, spawn_gateway};

const WAIT: Duration = Duration::from_secs(10);

/// Reads until the server closes `stream`; what it sent first (its answer, if any).
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return answer,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slowloris: connections that send a webhook's request line and then one header byte a second
/// (never the end of the head), and connections that send nothing, are all closed by the server
/// once the head-read timeout has passed, the trickle notwithstanding; an honest webhook beside
/// them is answered at once. (Without hyper's timer, such connections were held for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_at_the_head_read_timeout() {
    let gw = spawn_gateway().await;
    let limit = posgate::serve::HEADER_READ_TIMEOUT;
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..20 {
        let addr = gw.ingress;
        slow.spawn(async move {
            let opened = Instant::now();
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let trickles = i % 2 == 0;
            if trickles {
                let head = format!(
                    "POST {} HTTP/1.1\r\nhost: x\r\nx-slow",
                    events::WEBHOOK_PATH
                );
                stream.write_all(head.as_bytes()).await.unwrap();
            }
            let (mut read, mut write) = stream.into_split();
            // Holds the write half either way: dropping it would send a FIN.
            let writer = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if trickles && write.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            });
            let mut answer = Vec::new();
            let closed = tokio::time::timeout(limit + WAIT, async {
                let mut buf = [0u8; 1024];
                loop {
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            writer.abort();
            (trickles, closed.is_ok().then(|| opened.elapsed()), answer)
        });
    }
    // Beside them, an honest webhook is answered at once.
    let intent = Intent::new("pi_beside_slow", MicroUsdc(4_500_000), "pos-1");
    let body = events::intent_event("evt_beside_slow", "confirmed", &intent);
    let started = Instant::now();
    assert_eq!(gw.post_signed(&body).await.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    while let Some(result) = slow.join_next().await {
        let (trickles, closed_after, answer) = result.unwrap();
        let closed_after = closed_after.unwrap_or_else(|| {
            panic!(
                "a slow connection (trickling: {trickles}) was still open {:?} after it opened",
                limit + WAIT
            )
        });
        // Cut at the timeout, not before (give the timer a little slack either way).
        assert!(
            closed_after >= limit - Duration::from_millis(500),
            "closed after {closed_after:?} (trickling: {trickles}), before the {limit:?} timeout"
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 408"),
            "answered {text:?}"
        );
    }
    gw.shutdown().await;
}

/// Signature-header amplification: a webhook with a current timestamp, 90 wrong signature headers
/// and a 60 KiB body is refused from its headers alone, `401` before its body is even sent (the
/// old ingress read the whole body, then computed a MAC per header); 100 complete ones are each
/// refused, and an honest webhook beside them is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pile_of_signature_headers_is_refused_before_the_body_is_read() {
    let gw = spawn_gateway().await;
    let wrong = |n: usize| format!("sha256={:064x}", n + 1);
    let mut head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 61440\r\n{TIMESTAMP_HEADER}: {}\r\n",
        events::WEBHOOK_PATH,
        events::now_unix()
    );
    for n in 0..90 {
        head.push_str(&format!("{SIGNATURE_HEADER}: {}\r\n", wrong(n)));
    }
    head.push_str("\r\n{\"padding\":\"");
    let mut stream = tokio::net::TcpStream::connect(gw.ingress).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), until_closed(&mut stream))
        .await
        .expect("answered and closed without waiting for the body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    // The unread body stays on the connection: it is closed, and the answer says so, or a client's
    // pool would reuse it and lose its next request (the honest webhook below shares the pool).
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{text}"
    );

    // 100 complete ones, 10 at a time, beside an honest webhook.
    let body = format!("{{\"padding\":\"{}\"}}", "a".repeat(60 * 1024));
    let mut floods = tokio::task::JoinSet::new();
    for c in 0..10 {
        let (http, url, body) = (gw.http.clone(), gw.webhook_url(), body.clone());
        floods.spawn(async move {
            let mut statuses = Vec::new();
            for k in 0..10 {
                let mut request = http
                    .post(&url)
                    .header(TIMESTAMP_HEADER, events::now_unix().to_string());
                for n in 0..90 {
                    request = request.header(SIGNATURE_HEADER, wrong(c * 1000 + k * 100 + n));
                }
                // A refused request's connection may be closed under the rest of its body: an
                // error is the attacker's problem, not an answer.
                if let Ok(response) = request.body(body.clone()).send().await {
                    statuses.push(response.status().as_u16());
                }
            }
            statuses
        });
    }
    let intent = Intent::new("pi_beside_pile", MicroUsdc(4_500_000), "pos-1");
    let honest = events::intent_event("evt_beside_pile", "confirmed", &intent);
    assert_eq!(gw.post_signed(&honest).await.status(), 200);
    let mut answered = 0;
    while let Some(statuses) = floods.join_next().await {
        for status in statuses.unwrap() {
            assert_eq!(status, 401);
            answered += 1;
        }
    }
    let refused = gw
        .metric(r#"posgate_webhook_signature_failures_total{reason="bad_format"}"#)
        .await
        .unwrap_or(0.0);
    assert_eq!(refused as usize, answered + 1, "{answered} answered");
    assert!(answered >= 50, "only {answered} of 100 answered");
    gw.shutdown().await;
}

/// An RPC flood for three seconds (as fast as one terminal's connection takes it, reconnecting
/// when cut off) while webhooks for another terminal arrive at 20/s: every one of that terminal's
/// confirmations arrives, none held up by the flood for long (one terminal delayed others' by up to
/// 3.6 s before admission), and the flood is answered `rate_limited` beyond the terminal's bucket
/// (then the flooder is cut off: `rpc.flood_suspend_secs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_flood_does_not_hold_up_another_terminals_confirmations() {
    let gw = spawn_gateway().await;
    let mut flooder = gw.terminal("pos_rpcflood").await;
    let mut honest = gw.terminal("pos_honest").await;
    let began = Instant::now();
    let stop = began + Duration::from_secs(3);
    let client = flooder.client.clone();
    let topic = flooder.bundle.topics.rpc_req.clone();
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        while Instant::now() < stop {
            let request =
                json!({"id": format!("f{sent}"), "method": "unknown_method", "params": {}});
            let payload = serde_json::to_vec(&request).unwrap();
            // Once the flooder is cut off, its client's queue fills: wait a little, go on.
            let publish = client.publish(&topic, QoS::AtLeastOnce, false, payload);
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(100), publish).await {
                sent += 1;
            }
        }
        sent
    });
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while Instant::now() < stop {
        let intent_id = format!("pi_flood_{n}");
        n += 1;
        let sent = Instant::now();
        gw.pay("pos_honest", &intent_id).await;
        let c = honest.next_confirmation(WAIT).await.unwrap();
        assert_eq!(c.intent_id, intent_id);
        slowest = slowest.max(sent.elapsed());
        tokio::time::sleep_until(sent + Duration::from_millis(50)).await;
    }
    let sent = flood.await.unwrap();
    assert!(n >= 20, "only {n} confirmations in 3 s");
    assert!(
        slowest < Duration::from_secs(1),
        "a confirmation took {slowest:?} beside the flood"
    );
    assert!(sent >= 100, "the flood sent only {sent}");
    // The gateway's own count (answers published after the flooder was cut off never reach it):
    // the bucket's burst and rate handled, the rest refused, until the flooder is cut off.
    let metrics = gw.scrape().await;
    let count = |series: &str| harness::sample(&metrics, series).unwrap_or(0.0) as u64;
    let limited = count(r#"posgate_rpc_requests_total{method="any",outcome="rate_limited"}"#);
    let handled = count(r#"posgate_rpc_requests_total{method="other",outcome="unknown_method"}"#);
    let allowed = 20 + 5 * (began.elapsed().as_secs() + 1);
    assert!(
        handled <= allowed,
        "{handled} handled of {sent} ({limited} refused, at most {allowed} expected)"
    );
    assert!(
        limited >= 100,
        "{limited} refused of {sent} ({handled} handled)"
    );
    // Once suspended (at the 100th refusal) its requests are dropped unanswered: only those
    // already on their way to the RPC layer are refused after that, not the whole flood of the
    // second before it is cut off.
    assert!(
        limited <= 300,
        "{limited} refused of {sent} ({handled} handled): answered after the suspension"
    );
    // The flooder was told.
    let deadline = Instant::now() + WAIT;
    loop {
        match flooder
            .next_seen(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(Seen::Rpc(r)) if r.error.as_ref().is_some_and(|e| e.code == "rate_limited") => {
                break;
            }
            Some(_) => {}
            None => panic!("the flooder never saw a rate_limited answer"),
        }
    }
    gw.shutdown().await;
}

/// A subscription flood sent in one go (2,000 distinct filters under the terminal's own topic,
/// without waiting for the answers): the first `MAX_SUBSCRIPTIONS` are granted, every other one is
/// refused, and another terminal still connects and gets its confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_subscription_flood_is_refused_beyond_the_limit() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_subs").await;
    let (client, mut eventloop) = connect_raw(gw.mqtt, &Identity::of(&bundle)).unwrap();
    let base = bundle.topics.payments.trim_end_matches('+').to_owned();
    const FILTERS: usize = 2000;
    let subscriber = tokio::spawn(async move {
        for n in 0..FILTERS {
            client
                .subscribe(format!("{base}flood{n}"), QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        client
    });
    let (mut granted, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while granted + refused < FILTERS {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                for code in ack.return_codes {
                    match code {
                        SubscribeReasonCode::Success(_) => granted += 1,
                        SubscribeReasonCode::Failure => refused += 1,
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "the flooder's connection ended ({e}) after {granted} granted, {refused} refused"
            ),
            Err(_) => panic!("{granted} granted, {refused} refused of {FILTERS} within 20 s"),
        }
    }
    assert_eq!(granted, posgate::broker::MAX_SUBSCRIPTIONS);
    assert_eq!(refused, FILTERS - posgate::broker::MAX_SUBSCRIPTIONS);
    let _client = subscriber.await.unwrap();
    let mut other = gw.terminal("pos_other").await;
    gw.pay("pos_other", "pi_beside_subs").await;
    assert_eq!(
        other.next_confirmation(WAIT).await.unwrap().intent_id,
        "pi_beside_subs"
    );
    gw.shutdown().await;
}
