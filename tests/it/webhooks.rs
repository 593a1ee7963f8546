//! `POST /webhooks/stablegenius`: every row of the answer table, from the attacker's side too.

use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER, vectors};
use posgate_sim::events::{self, Intent};
use serde_json::Value;
use time::OffsetDateTime;

use crate::harness::{SECRET, assert_error_body, spawn_gateway, spawn_with, status_json};

fn intent(id: &str) -> Intent {
    Intent::new(id, MicroUsdc(4_500_000), "pos-1")
}

async fn assert_401(response: reqwest::Response) {
    let (status, body) = status_json(response).await;
    assert_eq!(status, 401, "{body}");
    assert_error_body(&body);
    assert!(!body.to_string().contains(SECRET));
}

#[tokio::test]
async fn valid_event_is_stored_and_applied() {
    let gw = spawn_gateway().await;
    let body = events::intent_event("evt_ok_1", "confirmed", &intent("pi_ok_1"));
    let (status, answer) = status_json(gw.post_signed(&body).await).await;
    assert_eq!((status, &answer["duplicate"]), (200, &Value::Bool(false)));
    let view = gw.intent("pi_ok_1").await.expect("intent stored");
    assert_eq!(view["status"], "confirmed");
    assert_eq!(view["amount_micros"], 4_500_000);
    assert_eq!(view["terminal_id"], "pos-1");
    assert_eq!(view["events"][0]["id"], "evt_ok_1");
    gw.shutdown().await;
}

#[tokio::test]
async fn known_answer_vector_is_accepted_within_its_window() {
    // The documented vector is signed at 2026-04-01T20:00:12Z: outside today's window, refused.
    let gw = spawn_gateway().await;
    let headers = [
        (TIMESTAMP_HEADER, vectors::TIMESTAMP.to_owned()),
        (SIGNATURE_HEADER, vectors::CONFIRMED_SIGNATURE.to_owned()),
    ];
    assert_401(gw.post_with(vectors::CONFIRMED_BODY, &headers).await).await;
    // The same bytes signed now are accepted and parsed exactly.
    let (status, _) = status_json(gw.post_signed(vectors::CONFIRMED_BODY).await).await;
    assert_eq!(status, 200);
    let view = gw.intent("pi_8Zx3RqV1mN6p").await.unwrap();
    assert_eq!(
        (view["status"].as_str(), view["amount"].as_str()),
        (Some("confirmed"), Some("4.50"))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn missing_and_garbled_headers_are_401() {
    let gw = spawn_gateway().await;
    let body = events::intent_event("evt_hdr_1", "confirmed", &intent("pi_hdr_1"));
    let ts = events::now_unix().to_string();
    let good = posgate_proto::sign(SECRET.as_bytes(), &ts, body.as_bytes());
    let hex = good.trim_start_matches("sha256=").to_owned();
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![(SIGNATURE_HEADER, good.clone())],
        vec![(TIMESTAMP_HEADER, ts.clone())],
        vec![
            (TIMESTAMP_HEADER, ts.clone()),
            (SIGNATURE_HEADER, "sha256=".into()),
        ],
        vec![
            (TIMESTAMP_HEADER, ts.clone()),
            (SIGNATURE_HEADER, format!("sha256={}", &hex[..62])),
        ],
        vec![
            (TIMESTAMP_HEADER, ts.clone()),
            (SIGNATURE_HEADER, format!("sha256={}", &hex[..63])),
        ],
        vec![
            (TIMESTAMP_HEADER, ts.clone()),
            (SIGNATURE_HEADER, format!("sha256={}zz", &hex[..62])),
        ],
        vec![
            (TIMESTAMP_HEADER, ts.clone()),
            (SIGNATURE_HEADER, hex.clone()),
        ],
        vec![
            (TIMESTAMP_HEADER, "yesterday".into()),
            (SIGNATURE_HEADER, good.clone()),
        ],
        vec![
            (TIMESTAMP_HEADER, format!("{ts}.5")),
            (SIGNATURE_HEADER, good.clone()),
        ],
        vec![
            (TIMESTAMP_HEADER, format!("+{ts}")),
            (SIGNATURE_HEADER, good.clone()),
        ],
    ];
    for headers in cases {
        assert_401(gw.post_with(body.clone(), &headers).await).await;
    }
    assert!(
        gw.intent("pi_hdr_1").await.is_none(),
        "nothing refused may have an effect"
    );
    // The untouched delivery is accepted: the refusals above were about the headers.
    let headers = [(TIMESTAMP_HEADER, ts), (SIGNATURE_HEADER, good)];
    assert_eq!(gw.post_with(body, &headers).await.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn stale_and_future_timestamps_are_401() {
    let gw = spawn_gateway().await;
    let body = events::intent_event("evt_ts_1", "confirmed", &intent("pi_ts_1"));
    let now = events::now_unix();
    assert_401(gw.post_signed_at(&body, now - 301).await).await;
    assert_401(gw.post_signed_at(&body, now + 301).await).await;
    assert!(gw.intent("pi_ts_1").await.is_none());
    assert_eq!(gw.post_signed_at(&body, now - 290).await.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn retired_secret_is_401_and_rotation_accepts_both() {
    let gw = spawn_with(&[("POSGATE__PROVIDER__WEBHOOK_SECRETS", "whsec_new,whsec_old")]).await;
    let now = events::now_unix();
    for (i, secret) in ["whsec_new", "whsec_old"].iter().enumerate() {
        let body = events::intent_event(
            &format!("evt_rot_{i}"),
            "confirmed",
            &intent(&format!("pi_rot_{i}")),
        );
        let headers = events::signed_headers(secret, now, body.as_bytes());
        assert_eq!(gw.post_with(body, &headers).await.status(), 200, "{secret}");
    }
    // The documented test secret is not configured here: refused.
    let body = events::intent_event("evt_rot_x", "confirmed", &intent("pi_rot_x"));
    assert_401(gw.post_signed(&body).await).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn no_secret_configured_refuses_everything() {
    let gw = spawn_with(&[("POSGATE__PROVIDER__WEBHOOK_SECRETS", "")]).await;
    let body = events::intent_event("evt_nos_1", "confirmed", &intent("pi_nos_1"));
    assert_401(gw.post_signed(&body).await).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn verified_garbage_is_400_and_kept() {
    let gw = spawn_gateway().await;
    for body in [
        "{not json",
        "[1,2,3]",
        r#"{"id":"evt_1","type":"x"}"#,
        r#"{"hello":"world"}"#,
        "",
    ] {
        let (status, answer) = status_json(gw.post_signed(body).await).await;
        assert_eq!(status, 400, "{body:?}: {answer}");
        assert_error_body(&answer);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_amounts_are_kept_unparsed_without_effect() {
    let gw = spawn_gateway().await;
    for (i, amount) in ["-4.50", "4.5000001"].iter().enumerate() {
        let pi = format!("pi_amt_{i}");
        let body = events::intent_event(&format!("evt_amt_{i}"), "confirmed", &intent(&pi))
            .replace(r#""amount":4.50"#, &format!(r#""amount":{amount}"#));
        assert!(body.contains(amount));
        // The envelope is valid: answered 200 (a retry would fail the same way) and kept flagged.
        assert_eq!(gw.post_signed(&body).await.status(), 200, "{amount}");
        assert!(
            gw.intent(&pi).await.is_none(),
            "a bad amount must not create or move an intent"
        );
        // Kept: the same delivery again is a duplicate.
        let (_, again) = status_json(gw.post_signed(&body).await).await;
        assert_eq!(again["duplicate"], true);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let gw = spawn_with(&[("POSGATE__INGRESS__BODY_LIMIT_BYTES", "2048")]).await;
    let base = events::intent_event("evt_big_1", "confirmed", &intent("pi_big_1"));
    // Pad with whitespace inside the JSON so that the body stays a valid, signed event.
    let pad = |len: usize| format!("{}{}", " ".repeat(len - base.len()), base);
    let (status, body) = status_json(gw.post_signed(&pad(2049)).await).await;
    assert_eq!(status, 413);
    assert_error_body(&body);
    // Chunked (no Content-Length) is limited too.
    let ts = events::now_unix();
    let big = pad(2049);
    let headers = events::signed_headers(SECRET, ts, big.as_bytes());
    let stream = futures_stream(big.into_bytes());
    let mut request = gw.http.post(gw.webhook_url());
    for (k, v) in &headers {
        request = request.header(*k, v);
    }
    let response = request
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(gw.intent("pi_big_1").await.is_none());
    // Exactly at the limit is accepted.
    assert_eq!(gw.post_signed(&pad(2048)).await.status(), 200);
    assert!(gw.intent("pi_big_1").await.is_some());
    gw.shutdown().await;
}

fn futures_stream(bytes: Vec<u8>) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(500).map(|c| Ok(c.to_vec())).collect();
    futures::stream::iter(chunks)
}

#[tokio::test]
async fn fifty_identical_concurrent_deliveries_have_one_effect() {
    let gw = spawn_gateway().await;
    let body = events::intent_event("evt_dup_1", "confirmed", &intent("pi_dup_1"));
    let ts = events::now_unix();
    // 50 tasks, each with its own connection, released together by a barrier.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let headers = events::signed_headers(SECRET, ts, body.as_bytes());
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (barrier, body, headers, url) = (
                barrier.clone(),
                body.clone(),
                headers.clone(),
                gw.webhook_url(),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                let mut request = http.post(url);
                for (k, v) in &headers {
                    request = request.header(*k, v);
                }
                barrier.wait().await;
                status_json(request.body(body).send().await.unwrap()).await
            })
        })
        .collect();
    let answers = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    let new = answers
        .iter()
        .filter(|(_, a)| a["duplicate"] == false)
        .count();
    assert_eq!(new, 1, "exactly one delivery has an effect");
    let view = gw.intent("pi_dup_1").await.unwrap();
    assert_eq!(view["events"].as_array().unwrap().len(), 1, "{view}");
    gw.shutdown().await;
}

#[tokio::test]
async fn events_of_one_intent_in_reverse_order_end_settled() {
    let gw = spawn_gateway().await;
    let pi = intent("pi_rev_1");
    let on_time = OffsetDateTime::now_utc();
    let forward = [
        events::transaction_event("evt_rev_1", "txn_rev_1", &pi, pi.amount, on_time),
        events::intent_event("evt_rev_2", "confirmed", &pi),
        events::intent_event("evt_rev_3", "expired", &pi),
        events::settlement_event("evt_rev_4", &["pi_rev_1"]),
    ];
    for body in forward.iter().rev() {
        assert_eq!(gw.post_signed(body).await.status(), 200);
    }
    let view = gw.intent("pi_rev_1").await.unwrap();
    assert_eq!(view["status"], "settled", "{view}");
    assert_eq!(view["received_micros"], 4_500_000);
    assert_eq!(view["transactions"], serde_json::json!(["txn_rev_1"]));
    let seen: Vec<&str> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    for id in ["evt_rev_1", "evt_rev_2", "evt_rev_3", "evt_rev_4"] {
        assert!(seen.contains(&id), "{id} missing from {seen:?}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_types_and_unknown_intents_are_kept() {
    let gw = spawn_gateway().await;
    let unknown = events::envelope(
        "evt_unk_1",
        "brand_new.thing",
        serde_json::json!({"id": "x_1"}),
    );
    assert_eq!(gw.post_signed(&unknown).await.status(), 200);
    let (_, again) = status_json(gw.post_signed(&unknown).await).await;
    assert_eq!(
        again["duplicate"], true,
        "an unknown type is stored, so a resend is a duplicate"
    );

    // A transfer for an intent the gateway has never seen: kept, then applied when it appears.
    let pi = intent("pi_late_known");
    let tx = events::transaction_event(
        "evt_unk_2",
        "txn_unk_2",
        &pi,
        MicroUsdc(4_400_000),
        OffsetDateTime::now_utc(),
    );
    assert_eq!(gw.post_signed(&tx).await.status(), 200);
    assert!(gw.intent("pi_late_known").await.is_none());
    let created = events::intent_event("evt_unk_3", "expired", &pi);
    assert_eq!(gw.post_signed(&created).await.status(), 200);
    let view = gw.intent("pi_late_known").await.unwrap();
    assert_eq!(view["received_micros"], 4_400_000, "{view}");
    assert_eq!(view["transactions"], serde_json::json!(["txn_unk_2"]));
    gw.shutdown().await;
}

#[tokio::test]
async fn underpayment_is_unresolved_whatever_arrives_first() {
    let gw = spawn_gateway().await;
    let pi = intent("pi_under_1");
    // The transfer (4.40 of 4.50, on time) arrives before any event that names the intent.
    let tx = events::transaction_event(
        "evt_under_1",
        "txn_under_1",
        &pi,
        MicroUsdc(4_400_000),
        OffsetDateTime::now_utc(),
    );
    assert_eq!(gw.post_signed(&tx).await.status(), 200);
    // Then the provider expires the intent: the underpayment outranks the expiry.
    let expired = events::intent_event("evt_under_2", "expired", &pi);
    assert_eq!(gw.post_signed(&expired).await.status(), 200);
    let view = gw.intent("pi_under_1").await.unwrap();
    assert_eq!(view["status"], "unresolved", "{view}");
    assert_eq!(
        view["contexts"],
        serde_json::json!(["underpaid"]),
        "paid on time, so not late: {view}"
    );
    gw.shutdown().await;
}

/// The headers are checked before the body is read: a delivery with a stale timestamp is refused
/// at once, even while its announced body has not come (the old code waited for the body).
#[tokio::test]
async fn a_stale_delivery_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = spawn_gateway().await;
    let mut stream = tokio::net::TcpStream::connect(gw.ingress).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 60000\r\nx-stablegenius-timestamp: 1000\r\nx-stablegenius-signature: sha256={}\r\n\r\n{{",
        posgate_sim::events::WEBHOOK_PATH,
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    gw.shutdown().await;
}

/// A delivery with dozens of signature headers is refused without a MAC per header.
#[tokio::test]
async fn a_pile_of_signature_headers_is_refused() {
    let gw = spawn_gateway().await;
    let body = events::intent_event(
        "evt_pile",
        "confirmed",
        &Intent::new("pi_pile", MicroUsdc(1_000_000), "pos-1"),
    );
    let mut headers = events::signed_headers(SECRET, events::now_unix(), body.as_bytes()).to_vec();
    let wrong = format!("sha256={}", "0".repeat(64));
    for _ in 0..90 {
        headers.push((SIGNATURE_HEADER, wrong.clone()));
    }
    let (status, body) = status_json(gw.post_with(body, &headers).await).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        gw.metric(r#"posgate_webhook_signature_failures_total{reason="bad_format"}"#)
            .await,
        Some(1.0)
    );
    gw.shutdown().await;
}
