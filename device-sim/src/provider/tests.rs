//! The simulator against a tiny webhook receiver that verifies with `posgate_proto::verify`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use posgate_proto::MicroUsdc;
use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER, vectors};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::*;
use crate::events;

/// One POST the receiver saw.
#[derive(Clone, Debug)]
struct Seen {
    timestamp: String,
    signature: String,
    body: Bytes,
    verified: bool,
}

#[derive(Clone)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    secrets: Vec<SecretString>,
    /// Answer this to verified requests.
    status: u16,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (timestamp, signature) = (header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER));
    let verified = posgate_proto::verify(
        &r.secrets,
        &timestamp,
        &signature,
        &body,
        events::now_unix(),
        300,
    )
    .is_ok();
    r.seen.lock().unwrap().push(Seen {
        timestamp,
        signature,
        body,
        verified,
    });
    if verified {
        StatusCode::from_u16(r.status).unwrap()
    } else {
        StatusCode::UNAUTHORIZED
    }
}

/// Starts a receiver; returns its URL and what it sees.
async fn receiver(secret: &str, status: u16) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let state = Receiver {
        seen: Arc::clone(&seen),
        secrets: vec![SecretString::from(secret.to_owned())],
        status,
    };
    let app = Router::new()
        .route("/webhooks/stablegenius", post(receive))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/webhooks/stablegenius"), seen)
}

use axum::Router;

async fn until<F: FnMut() -> bool>(mut check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn fast(url: &str, secret: &str) -> ProviderConfig {
    let mut config = ProviderConfig::new(url, secret);
    config.time_scale = 0.001;
    config
}

#[test]
fn signatures_match_the_known_answer_vectors() {
    let secret = SecretString::from(vectors::SECRET);
    for (body, signature) in [
        (vectors::CONFIRMED_BODY, vectors::CONFIRMED_SIGNATURE),
        (vectors::TRANSACTION_BODY, vectors::TRANSACTION_SIGNATURE),
    ] {
        let ts: i64 = vectors::TIMESTAMP.parse().unwrap();
        let [(t_name, t), (s_name, s)] = delivery::headers(&secret, ts, body.as_bytes());
        assert_eq!(t_name, "X-StableGenius-Timestamp");
        assert_eq!(t, "1775073612");
        assert_eq!(s_name, "X-StableGenius-Signature");
        assert_eq!(s, signature);
    }
    assert_eq!(vectors::CONFIRMED_BODY.len(), 1010);
    assert_eq!(vectors::TRANSACTION_BODY.len(), 717);
}

#[tokio::test]
async fn the_vectors_go_on_the_wire_byte_for_byte() {
    let (url, seen) = receiver("unused", 200).await;
    let mut config = ProviderConfig::new(url, vectors::SECRET);
    let at = OffsetDateTime::from_unix_timestamp(vectors::TIMESTAMP.parse().unwrap()).unwrap();
    config.clock = Clock::fixed(at);
    let sim = ProviderSim::start(config).await.unwrap();
    sim.emit_raw(vectors::CONFIRMED_BODY).unwrap();
    until(|| seen.lock().unwrap().len() == 1).await;
    sim.emit_raw(vectors::TRANSACTION_BODY).unwrap();
    until(|| seen.lock().unwrap().len() == 2).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].body.as_ref(), vectors::CONFIRMED_BODY.as_bytes());
    assert_eq!(seen[0].timestamp, vectors::TIMESTAMP);
    assert_eq!(seen[0].signature, vectors::CONFIRMED_SIGNATURE);
    assert_eq!(seen[1].body.as_ref(), vectors::TRANSACTION_BODY.as_bytes());
    assert_eq!(seen[1].timestamp, vectors::TIMESTAMP);
    assert_eq!(seen[1].signature, vectors::TRANSACTION_SIGNATURE);
    sim.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn retry_schedule_scales() {
    let secs = |s: u64| Duration::from_secs(s);
    assert_eq!(
        delivery::retry_delays(1.0),
        [secs(60), secs(300), secs(1800), secs(7200), secs(43200)]
    );
    let ms = Duration::from_millis;
    assert_eq!(
        delivery::retry_delays(0.001),
        [ms(60), ms(300), ms(1800), ms(7200), ms(43200)]
    );
    assert_eq!(delivery::retry_delays(0.0), [Duration::ZERO; 5]);
    assert_eq!(delivery::MAX_ATTEMPTS, 6);
    assert_eq!(scaled(secs(300), 0.5), secs(150));
}

#[tokio::test]
async fn failed_deliveries_are_retried_six_times_each_signed_afresh() {
    let (url, seen) = receiver("whsec_retry", 500).await;
    let mut config = ProviderConfig::new(url, "whsec_retry");
    config.time_scale = 0.000_01;
    // A clock that moves one second per reading, so every attempt has its own timestamp.
    let tick = Arc::new(AtomicI64::new(events::now_unix() - 10));
    let t = Arc::clone(&tick);
    config.clock = Clock::from_fn(move || {
        OffsetDateTime::from_unix_timestamp(t.fetch_add(1, Ordering::Relaxed)).unwrap()
    });
    let sim = ProviderSim::start(config).await.unwrap();
    let body = events::envelope(
        "evt_retry_1",
        "payment_intent.confirmed",
        json!({"id":"pi_1"}),
    );
    sim.emit_raw(body.clone()).unwrap();
    until(|| sim.stats().delivery.gave_up == 1).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.iter().all(|s| s.verified && s.body == body.as_bytes()));
    let stamps: Vec<i64> = seen.iter().map(|s| s.timestamp.parse().unwrap()).collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    let stats = sim.stats().delivery;
    assert_eq!(stats.attempts.other, 6);
    assert_eq!(stats.retries, 5);
    assert_eq!(stats.delivered, 0);
    let record = &sim.deliveries()[0];
    assert_eq!(record.state, DeliveryState::GaveUp);
    assert_eq!(
        record
            .attempts
            .iter()
            .map(|a| a.attempt)
            .collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    sim.shutdown(Duration::from_secs(1)).await;
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post_json(url: &str, key: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"].get("param").is_some(), "{body}");
}

#[tokio::test]
async fn idempotency_keys_over_http() {
    let (url, _) = receiver("s", 200).await;
    let sim = ProviderSim::start(fast(&url, "s")).await.unwrap();
    let create = format!("{}/payment-intents", sim.api_base());
    let body = json!({"amount": 4.5, "currency": "usd", "merchant_id": "mer_1",
        "metadata": {"terminal_id": "pos-1", "order_id": "ord-1"},
        "idempotency_key": "posgate:pos-1:ord-1:1"});
    let (s1, first) = post_json(&create, "sk_test_abc", &body).await;
    assert_eq!(s1, 201, "{first}");
    let (s2, second) = post_json(&create, "sk_test_abc", &body).await;
    assert_eq!(s2, 200, "{second}");
    assert_eq!(first["id"], second["id"]);
    assert_eq!(sim.stats().api.intents_created, 1);
    let mut other = body.clone();
    other["amount"] = json!(4.4);
    let (s3, conflict) = post_json(&create, "sk_test_abc", &other).await;
    assert_eq!(s3, 409);
    assert_error(&conflict, "idempotency_key_reused");
    // Wrong or missing key.
    let (s4, unauth) = post_json(&create, "pk_test_abc", &body).await;
    assert_eq!(s4, 401);
    assert_error(&unauth, "invalid_api_key");
    let r = client().post(&create).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Validation.
    let mut bad = body.clone();
    bad["amount"] = json!(0.001);
    bad["idempotency_key"] = json!("other");
    let (s5, invalid) = post_json(&create, "sk_test_abc", &bad).await;
    assert_eq!(s5, 400);
    assert_error(&invalid, "amount_invalid");
    assert_eq!(invalid["error"]["param"], "amount");
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn replay_409_answers_a_repeated_key_with_the_original_intent() {
    let (url, _) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.api_faults.replay_409 = true;
    let sim = ProviderSim::start(config).await.unwrap();
    let create = format!("{}/payment-intents", sim.api_base());
    let body = json!({"amount": 4.5, "currency": "usd", "merchant_id": "mer_1",
        "idempotency_key": "k-409"});
    let (s1, first) = post_json(&create, "sk_test_abc", &body).await;
    assert_eq!(s1, 201, "{first}");
    let (s2, second) = post_json(&create, "sk_test_abc", &body).await;
    assert_eq!(s2, 409, "{second}");
    assert_eq!(
        (second["object"].as_str(), &second["id"]),
        (Some("payment_intent"), &first["id"])
    );
    // A different body under the same key is still an error body.
    let mut other = body.clone();
    other["amount"] = json!(4.4);
    let (s3, conflict) = post_json(&create, "sk_test_abc", &other).await;
    assert_eq!(s3, 409);
    assert_error(&conflict, "idempotency_key_reused");
    assert_eq!(sim.stats().api.intents_created, 1);
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bad_qr_names_the_wrong_chain() {
    let (url, _) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.api_faults.bad_qr = true;
    let sim = ProviderSim::start(config).await.unwrap();
    let create = format!("{}/payment-intents", sim.api_base());
    let body = json!({"amount": 4.5, "currency": "usd", "merchant_id": "mer_1"});
    let (status, intent) = post_json(&create, "sk_test_abc", &body).await;
    assert_eq!(status, 201, "{intent}");
    let qr = intent["qr_payload"].as_str().unwrap();
    let address = intent["payment_address"].as_str().unwrap();
    assert!(
        qr.starts_with("ethereum:0x036CbD53842c5426634e7929541eC2318f3dCF7e@1/transfer?"),
        "{qr}"
    );
    assert_eq!(
        posgate_proto::qr::check(qr, Mode::Test, address, MicroUsdc(4_500_000)),
        Err(posgate_proto::qr::QrError::Chain(Some("1".into())))
    );
    let id = intent["id"].as_str().unwrap();
    assert_eq!(sim.intent(id).unwrap()["qr_payload"], qr);
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn intents_carry_the_mode_qr_payload_and_cancel_once() {
    let (url, seen) = receiver("s", 200).await;
    let sim = ProviderSim::start(fast(&url, "s")).await.unwrap();
    let create = format!("{}/payment-intents", sim.api_base());
    let body = json!({"amount": 7.25, "currency": "usd", "merchant_id": "mer_1", "ttl": 3600});
    let (_, test) = post_json(&create, "sk_test_1", &body).await;
    let address = test["payment_address"].as_str().unwrap();
    assert_eq!(
        test["qr_payload"],
        format!(
            "ethereum:{}@84532/transfer?address={address}&uint256=7250000",
            model::USDC_BASE_SEPOLIA
        )
    );
    assert!(test["id"].as_str().unwrap().starts_with("pi_"));
    assert_eq!(test["status"], "awaiting_payment");
    assert!(test.to_string().contains(r#""amount":7.25"#), "{test}");
    let (_, live) = post_json(&create, "sk_live_1", &body).await;
    assert!(
        live["qr_payload"].as_str().unwrap().starts_with(
            "ethereum:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913@8453/transfer?address="
        )
    );
    let id = test["id"].as_str().unwrap();
    let cancel = format!("{}/payment-intents/{id}/cancel", sim.api_base());
    let (s1, cancelled) = post_json(&cancel, "sk_test_1", &json!({})).await;
    assert_eq!((s1, cancelled["status"].as_str()), (200, Some("cancelled")));
    let (s2, again) = post_json(&cancel, "sk_test_1", &json!({})).await;
    assert_eq!(s2, 409);
    assert_error(&again, "payment_intent_unexpected_state");
    let r = client()
        .get(format!("{}/payment-intents/pi_nope", sim.api_base()))
        .bearer_auth("sk_test_1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    until(|| seen.lock().unwrap().len() == 1).await;
    assert!(
        String::from_utf8_lossy(&seen.lock().unwrap()[0].body)
            .contains(r#""type":"payment_intent.cancelled""#)
    );
    sim.shutdown(Duration::from_secs(1)).await;
}

fn kinds(sim: &RunningProvider, intent_id: &str) -> Vec<String> {
    let mut k: Vec<String> = sim
        .deliveries_for(intent_id)
        .into_iter()
        .map(|d| d.kind)
        .collect();
    k.sort();
    k
}

#[tokio::test]
async fn money_cases_exact_under_late_twice_unknown() {
    let (url, seen) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.time_scale = 0.0005; // ttl 60 s -> 30 ms, confirmation 1.5 ms
    let sim = ProviderSim::start(config).await.unwrap();
    let new = |amount: u64| {
        let mut n = NewIntent::for_terminal(MicroUsdc(amount), "pos-1");
        n.ttl_secs = Some(3600);
        sim.create_intent(&n).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let exact = new(4_500_000);
    sim.pay(&exact, None, false).unwrap();
    let under = new(4_500_000);
    sim.pay(&under, Some(MicroUsdc(4_400_000)), false).unwrap();
    let twice = new(1_000_000);
    sim.pay(&twice, None, false).unwrap();
    sim.pay(&twice, None, false).unwrap();
    let mut short = NewIntent::for_terminal(MicroUsdc(2_000_000), "pos-1");
    short.ttl_secs = Some(60);
    let late = sim.create_intent(&short).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.pay(&late, None, true).unwrap();
    let stray = sim.pay_unknown(MicroUsdc(3_000_000), None).unwrap();

    // `under` may also expire (its ttl is 60 times the late one's) before the checks finish.
    until(|| sim.stats().delivery.delivered >= 9).await;
    assert_eq!(
        kinds(&sim, &exact),
        ["payment_intent.confirmed", "transaction.created"]
    );
    let under_kinds = kinds(&sim, &under);
    assert!(
        under_kinds.iter().all(|k| k != "payment_intent.confirmed"),
        "{under_kinds:?}"
    );
    assert_eq!(
        under_kinds
            .iter()
            .filter(|k| *k == "transaction.created")
            .count(),
        1
    );
    assert_eq!(
        kinds(&sim, &twice),
        [
            "payment_intent.confirmed",
            "transaction.created",
            "transaction.created"
        ]
    );
    assert_eq!(
        kinds(&sim, &late),
        ["payment_intent.expired", "transaction.created"]
    );
    assert_eq!(sim.intent(&exact).unwrap()["status"], "confirmed");
    let paid = sim.intent(&exact).unwrap();
    for field in ["net_amount", "fee", "tx_hash", "confirmed_at"] {
        assert!(paid.get(field).is_some(), "{field} in {paid}");
    }
    assert_ne!(sim.intent(&under).unwrap()["status"], "confirmed");
    assert_eq!(sim.intent(&late).unwrap()["status"], "expired");

    let bodies: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    let txn_of = |id: &str| {
        bodies
            .iter()
            .find(|b| b["type"] == "transaction.created" && b["data"]["payment_intent_id"] == id)
            .unwrap()
            .clone()
    };
    assert!(txn_of(&under).to_string().contains(r#""amount":4.40"#));
    let late_txn = txn_of(&late);
    let expires = sim.intent(&late).unwrap()["expires_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let parse =
        |s: &str| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(parse(late_txn["data"]["confirmed_at"].as_str().unwrap()) > parse(&expires));
    let stray_body = bodies
        .iter()
        .find(|b| b["data"]["id"] == stray.transaction_id.as_str())
        .unwrap();
    assert!(stray_body["data"]["payment_intent_id"].is_null());

    // The REST list and get.
    let list: Value = client()
        .get(format!(
            "{}/transactions?merchant_id=mer_sim&limit=2",
            sim.api_base()
        ))
        .bearer_auth("sk_test_1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["has_more"], true);
    let last = list["data"][1]["id"].as_str().unwrap();
    let rest: Value = client()
        .get(format!(
            "{}/transactions?merchant_id=mer_sim&starting_after={last}&limit=100",
            sim.api_base()
        ))
        .bearer_auth("sk_test_1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["data"].as_array().unwrap().len(), 4, "{rest}");
    assert_eq!(rest["has_more"], false);
    let one = client()
        .get(format!("{}/transactions/{last}", sim.api_base()))
        .bearer_auth("sk_test_1")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn faults_forgeries_stale_duplicates_and_drops_are_counted() {
    let (url, seen) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.faults = Faults {
        duplicate_rate: 1.0,
        bad_signature_rate: 1.0,
        empty_signature_rate: 1.0,
        stale_rate: 1.0,
        ..Faults::default()
    };
    let sim = ProviderSim::start(config).await.unwrap();
    sim.emit_raw(events::envelope("evt_f_1", "x.y", json!({})))
        .unwrap();
    until(|| sim.stats().delivery.delivered == 1 && seen.lock().unwrap().len() == 5).await;
    let stats = sim.stats().delivery;
    assert_eq!(stats.forgeries_sent, 2);
    assert_eq!(stats.forgeries.unauthorized, 2);
    assert_eq!(stats.stale_sent, 1);
    assert_eq!(stats.stale.unauthorized, 1);
    assert_eq!(stats.duplicates_sent, 1);
    assert_eq!(stats.attempts.ok, 2);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[1].signature, "sha256=");
    assert_eq!(seen.iter().filter(|s| s.verified).count(), 2);
    sim.shutdown(Duration::from_secs(1)).await;

    // Drops: never sent. Simultaneous duplicates: same headers.
    let (url, seen) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.faults.drop_rate = 1.0;
    let sim = ProviderSim::start(config).await.unwrap();
    sim.emit_raw(events::envelope("evt_d_1", "x.y", json!({})))
        .unwrap();
    until(|| sim.stats().delivery.dropped == 1).await;
    assert!(seen.lock().unwrap().is_empty());
    sim.shutdown(Duration::from_secs(1)).await;

    let (url, seen) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.faults.duplicate_rate = 1.0;
    config.faults.simultaneous_duplicates = true;
    let sim = ProviderSim::start(config).await.unwrap();
    sim.emit_raw(events::envelope("evt_s_1", "x.y", json!({})))
        .unwrap();
    until(|| seen.lock().unwrap().len() == 2).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].timestamp, seen[1].timestamp);
    assert_eq!(seen[0].signature, seen[1].signature);
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn rotation_signs_some_retries_with_the_old_secret() {
    // The receiver knows only the new secret, and fails everything it can verify.
    let (url, seen) = receiver("whsec_new", 500).await;
    let mut config = ProviderConfig::new(url, "whsec_old");
    config.webhook_secrets.push(SecretString::from("whsec_new"));
    config.faults.rotate_secret = true;
    config.time_scale = 0.000_01;
    let sim = ProviderSim::start(config).await.unwrap();
    for i in 0..4 {
        sim.emit_raw(events::envelope(&format!("evt_r_{i}"), "x.y", json!({})))
            .unwrap();
    }
    until(|| sim.stats().delivery.gave_up == 4).await;
    let records = sim.deliveries();
    // First attempts always use the new secret (index 1).
    assert!(
        records
            .iter()
            .all(|r| r.attempts[0].secret_index == Some(1))
    );
    let old = sim.stats().delivery.old_secret_signed;
    assert!(old > 0, "20 retries, none with the old secret");
    let unverified = seen.lock().unwrap().iter().filter(|s| !s.verified).count();
    assert_eq!(unverified as u64, old);
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn rate_limit_and_injected_failures() {
    let (url, _) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.api_faults.rate_limit_per_minute = Some(2);
    let sim = ProviderSim::start(config).await.unwrap();
    let get = || {
        client()
            .get(format!("{}/transactions", sim.api_base()))
            .bearer_auth("sk_test_1")
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(get().await.unwrap().status(), 200);
    let limited = get().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_error(&limited.json().await.unwrap(), "rate_limited");
    sim.shutdown(Duration::from_secs(1)).await;

    let mut config = fast(&url, "s");
    config.api_faults.fail_after_rate = 1.0;
    let sim = ProviderSim::start(config).await.unwrap();
    let body = json!({"amount": 1, "currency": "usd", "merchant_id": "mer_1",
        "idempotency_key": "k1"});
    let create = format!("{}/payment-intents", sim.api_base());
    let (status, err) = post_json(&create, "sk_test_1", &body).await;
    assert_eq!(status, 500);
    assert_error(&err, "injected_failure");
    assert_eq!(sim.stats().api.intents_created, 1);
    sim.shutdown(Duration::from_secs(1)).await;

    let mut config = fast(&url, "s");
    config.api_faults.fail_rate = 1.0;
    let sim = ProviderSim::start(config).await.unwrap();
    let create = format!("{}/payment-intents", sim.api_base());
    let (status, _) = post_json(&create, "sk_test_1", &body).await;
    assert!(status >= 500);
    let stats: Value = client()
        .get(format!("{}/_sim/stats", sim.control_base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["api"]["injected_failures"], 1, "{stats}");
    assert!(stats.get("forgeries").is_some(), "{stats}");
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn control_endpoint_pays() {
    let (url, _) = receiver("s", 200).await;
    let sim = ProviderSim::start(fast(&url, "s")).await.unwrap();
    let intent = sim
        .create_intent(&NewIntent::for_terminal(MicroUsdc(4_500_000), "pos-9"))
        .unwrap();
    let id = intent["id"].as_str().unwrap();
    let r = client()
        .post(format!("{}/_sim/pay/{id}", sim.control_base()))
        .json(&json!({"amount": "4.40", "late": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let receipt: Value = r.json().await.unwrap();
    assert_eq!(receipt["amount"], "4.40");
    assert_eq!(receipt["amount_micros"], 4_400_000);
    let r = client()
        .post(format!("{}/_sim/pay/pi_nope", sim.control_base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .post(format!("{}/_sim/pay-unknown", sim.control_base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    until(|| sim.stats().delivery.delivered == 2).await;
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn reorder_holds_events_back_and_shuffles_them() {
    let (url, seen) = receiver("s", 200).await;
    let mut config = fast(&url, "s");
    config.faults.reorder = true;
    config.reorder_window = Duration::from_millis(50);
    let sim = ProviderSim::start(config).await.unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("evt_o_{i}")).collect();
    for id in &ids {
        sim.emit_raw(events::envelope(id, "x.y", json!({})))
            .unwrap();
    }
    until(|| sim.stats().delivery.delivered == 8).await;
    let order: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            serde_json::from_slice::<Value>(&s.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "every event exactly once");
    // 1 in 40320 that a shuffle keeps the order.
    assert_ne!(order, ids, "sent in emission order");
    sim.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn the_handle_can_be_shared_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RunningProvider>();
    send_sync::<ProviderConfig>();
}
