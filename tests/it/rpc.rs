//! Terminal RPC over MQTT/TLS: intents created through the gateway, looked up after a reboot,
//! refused across terminals, and safe to retry.

use std::time::Duration;

use posgate_proto::confirmation::ConfirmationStatus;
use posgate_sim::provider::{Faults, RunningProvider};
use posgate_sim::terminal::{Seen, Terminal};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{self, TestGateway, rpc};

const SECRET: &str = "whsec_it_rpc";
const WAIT: Duration = Duration::from_secs(15);

async fn setup() -> (TestGateway, RunningProvider) {
    harness::spawn_with_provider(SECRET, Faults::default(), &[]).await
}

#[tokio::test]
async fn a_terminal_creates_an_intent_and_receives_its_confirmation() {
    let (gw, sim) = setup().await;
    let mut t = gw.terminal("pos_rpc").await;
    let params = json!({"amount": "4.40", "order_id": "ord-1"});
    let reply = rpc(&mut t, "r1", "create_intent", params.clone()).await;
    let result = reply.result.unwrap_or_else(|| panic!("{:?}", reply.error));
    let intent_id = result["intent_id"].as_str().unwrap().to_owned();
    assert_eq!(result["amount"], "4.40");
    let qr = result["qr_payload"].as_str().unwrap();
    assert!(
        qr.starts_with("ethereum:0x036CbD53842c5426634e7929541eC2318f3dCF7e@84532/transfer?"),
        "{qr}"
    );
    assert!(qr.ends_with("uint256=4400000"), "{qr}");
    // The gateway recorded it as this terminal's before answering.
    let view = gw.intent(&intent_id).await.unwrap();
    assert_eq!(
        (view["terminal_id"].as_str(), view["order_id"].as_str()),
        (Some("pos_rpc"), Some("ord-1"))
    );

    // The same request id again: the same answer, and still one intent at the provider.
    let again = rpc(&mut t, "r1", "create_intent", params).await;
    assert_eq!(again.result.unwrap()["intent_id"], intent_id.as_str());
    assert_eq!(sim.stats().api.intents_created, 1);

    // The customer pays; the terminal gets its confirmation; get_intent agrees.
    sim.pay(&intent_id, None, false).unwrap();
    let c = t.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status),
        (intent_id.as_str(), ConfirmationStatus::Confirmed)
    );
    let got = rpc(&mut t, "r2", "get_intent", json!({"intent_id": intent_id})).await;
    assert_eq!(got.result.unwrap()["status"], "confirmed");
    // Every call to the provider is counted by endpoint and outcome, with its time.
    let metrics = gw.scrape().await;
    let created = harness::sample(
        &metrics,
        r#"posgate_provider_requests_total{endpoint="create_intent",outcome="ok"}"#,
    );
    assert_eq!(created, Some(1.0), "one create reached the provider");
    let timed = harness::sample(
        &metrics,
        r#"posgate_provider_request_seconds_count{endpoint="create_intent"}"#,
    );
    assert_eq!(timed, Some(1.0));
    gw.shutdown().await;
}

#[tokio::test]
async fn after_a_reboot_get_intent_tells_the_outcome() {
    let (gw, sim) = setup().await;
    let bundle = gw.provision("pos_reboot").await;
    let mut t = gw.connect(bundle.clone()).await;
    let intent_id = harness::create_intent(
        &mut t,
        "c1",
        json!({"amount": "12.34", "order_id": "ord-7"}),
    )
    .await;
    t.kill(); // the terminal reboots; it kept only the intent id
    sim.pay(&intent_id, None, false).unwrap();
    harness::eventually(WAIT, || async {
        (gw.intent(&intent_id).await.unwrap()["status"] == "confirmed").then_some(())
    })
    .await;
    let mut t = gw.connect(bundle).await;
    let got = rpc(&mut t, "g1", "get_intent", json!({"intent_id": intent_id})).await;
    assert_eq!(got.result.unwrap()["status"], "confirmed");
    gw.shutdown().await;
}

#[tokio::test]
async fn another_terminal_s_intent_and_bad_requests_get_errors_not_silence() {
    let (gw, _sim) = setup().await;
    let mut a = gw.terminal("pos_ra").await;
    let mut b = gw.terminal("pos_rb").await;
    let intent_id =
        harness::create_intent(&mut a, "a1", json!({"amount": "1.00", "order_id": "o"})).await;
    for (method, id) in [("get_intent", "b1"), ("cancel_intent", "b2")] {
        let r = rpc(&mut b, id, method, json!({"intent_id": intent_id})).await;
        assert_eq!(
            r.error.map(|e| e.code).as_deref(),
            Some("not_found"),
            "{method}"
        );
    }
    for (params, id) in [
        (json!({"amount": "4.405", "order_id": "o"}), "x1"),
        (json!({"amount": "-1", "order_id": "o"}), "x2"),
        (json!({"amount": "20000", "order_id": "o"}), "x3"),
        (json!({"amount": "4.40"}), "x4"),
        (json!({"amount": "4.40", "order_id": "o", "ttl": 5}), "x5"),
    ] {
        let r = rpc(&mut b, id, "create_intent", params.clone()).await;
        assert_eq!(
            r.error.map(|e| e.code).as_deref(),
            Some("invalid_params"),
            "{params}"
        );
    }
    let r = rpc(&mut b, "x6", "pay_me", json!({})).await;
    assert_eq!(r.error.map(|e| e.code).as_deref(), Some("unknown_method"));
    // A's own cancel works and is idempotent by request id.
    let cancel = json!({"intent_id": intent_id});
    let r = rpc(&mut a, "a2", "cancel_intent", cancel).await;
    assert_eq!(r.result.unwrap()["status"], "cancelled");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_provider_down_gives_a_clear_error_and_a_retry_creates_one_intent() {
    // Nothing listens at the API base: a clear error, never a made-up intent.
    let gw = harness::spawn_with(&[
        ("POSGATE__PROVIDER__API_BASE", "http://127.0.0.1:9/v1"),
        ("POSGATE__PROVIDER__API_KEY", "sk_test_rpc"),
    ])
    .await;
    let mut t = gw.terminal("pos_down").await;
    let r = t
        .rpc(
            "d1",
            "create_intent",
            json!({"amount": "1.00", "order_id": "o"}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let e = r.error.expect("an error");
    assert_eq!(e.code, "provider_unavailable");
    assert!(e.message.contains("unknown"), "{}", e.message);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_409_with_the_original_intent_is_used_and_any_other_is_a_clear_conflict() {
    let mut config = harness::sim_config(SECRET);
    config.api_faults.replay_409 = true;
    let (gw, sim) = harness::spawn_with_sim(config, &[]).await;
    let mut t = gw.terminal("pos_409").await;
    // Earlier requests under the keys the gateway derives from request ids r1 and r2: r1's with
    // exactly the body the gateway will send, r2's with another amount.
    let earlier = |key: &str, amount: u64| {
        let mut new = posgate_sim::provider::NewIntent::for_terminal(
            posgate_proto::MicroUsdc(amount),
            "pos_409",
        );
        new.merchant_id = "mer_test".into();
        new.metadata.insert("order_id".into(), json!("ord-409"));
        new.idempotency_key = Some(key.into());
        sim.create_intent(&new).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let original = earlier("posgate:pos_409:r1", 4_500_000);
    earlier("posgate:pos_409:r2", 1_000_000);
    assert_eq!(sim.stats().api.intents_created, 2);

    // The provider answers 409 with the intent r1 created: the terminal gets that intent.
    let params = json!({"amount": "4.50", "order_id": "ord-409"});
    let reply = rpc(&mut t, "r1", "create_intent", params.clone()).await;
    let result = reply.result.unwrap_or_else(|| panic!("{:?}", reply.error));
    assert_eq!(result["intent_id"], original.as_str());
    assert!(
        result["qr_payload"]
            .as_str()
            .unwrap()
            .ends_with("uint256=4500000")
    );
    let view = gw.intent(&original).await.unwrap();
    assert_eq!(view["terminal_id"], "pos_409");

    // A 409 without our intent (another body under that key): a clear error, nothing created.
    let reply = rpc(&mut t, "r2", "create_intent", params.clone()).await;
    let e = reply.error.expect("an error");
    assert_eq!(e.code, "idempotency_conflict", "{}", e.message);
    assert!(e.message.contains("new request id"), "{}", e.message);
    // It is an answer: the same request id gets it again, without asking the provider.
    let requests = sim.stats().api.requests;
    let again = rpc(&mut t, "r2", "create_intent", params.clone()).await;
    assert_eq!(
        again.error.map(|e| e.code).as_deref(),
        Some("idempotency_conflict")
    );
    assert_eq!(sim.stats().api.requests, requests);
    // A new attempt works.
    harness::create_intent(&mut t, "r3", params).await;
    assert_eq!(sim.stats().api.intents_created, 3);
    assert_eq!(sim.stats().api.idempotency_conflicts, 1);
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_bad_qr_payload_is_never_shown_and_the_intent_is_cancelled() {
    let mut config = harness::sim_config(SECRET);
    config.api_faults.bad_qr = true;
    let (gw, sim) = harness::spawn_with_sim(config, &[]).await;
    let mut t = gw.terminal("pos_qr").await;
    let params = json!({"amount": "4.50", "order_id": "ord-qr"});
    let reply = rpc(&mut t, "q1", "create_intent", params).await;
    assert!(reply.result.is_none(), "no QR for the terminal");
    let e = reply.error.expect("an error");
    assert_eq!(e.code, "qr_mismatch");
    assert!(e.message.contains("cancelled"), "{}", e.message);
    assert_eq!(
        gw.metric("posgate_rpc_requests_total{method=\"create_intent\",outcome=\"qr_mismatch\"}")
            .await,
        Some(1.0)
    );

    // The intent is kept, as this terminal's, with the rejection in its history; cancelled at
    // the provider, so nothing open is left behind.
    let list = gw
        .admin_get("/v1/payment-intents?terminal_id=pos_qr")
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let intents = list["data"].as_array().unwrap();
    assert_eq!(intents.len(), 1, "{list}");
    let id = intents[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(intents[0]["status"], "cancelled");
    assert!(
        intents[0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "rpc.qr_rejected"),
        "{list}"
    );
    assert_eq!(sim.intent(&id).unwrap()["status"], "cancelled");
    assert_eq!(sim.stats().api.intents_created, 1);
    // The terminal is told the intent is cancelled (it never showed it).
    let c = t.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status),
        (id.as_str(), ConfirmationStatus::Cancelled)
    );
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn terminals_and_reconciliation_share_one_budget_inside_the_provider_limit() {
    const LIMIT: u32 = 60;
    let mut config = harness::sim_config(SECRET);
    // The provider refuses anything beyond its limit (one fixed minute, as documented).
    config.api_faults.rate_limit_per_minute = Some(LIMIT);
    let extra = [
        ("POSGATE__PROVIDER__REQUESTS_PER_MINUTE", "60"),
        ("POSGATE__PROVIDER__RPC_BUDGET_WAIT_MS", "2000"),
        // Reconciliation wants to call as often as it can.
        ("POSGATE__PROVIDER__TRANSACTIONS_EVERY_SECS", "1"),
        ("POSGATE__PROVIDER__RECONCILE_EVERY_SECS", "1"),
    ];
    let started = tokio::time::Instant::now();
    let (gw, sim) = harness::spawn_with_sim(config, &extra).await;
    let rates = posgate::provider::Rates::for_limit(LIMIT);
    let mut terminals = Vec::new();
    for i in 0..12 {
        terminals.push(gw.terminal(&format!("pos_busy{i}")).await);
    }
    // Twelve cashiers at once: more than the burst. Every one gets an answer: an intent, or a
    // clear `rate_limited` with the time to wait.
    let replies = futures::future::join_all(terminals.iter_mut().enumerate().map(|(i, t)| {
        t.rpc(
            "b1",
            "create_intent",
            json!({"amount": "1.00", "order_id": format!("o-{i}")}),
            WAIT,
        )
    }))
    .await;
    let mut created = 0;
    let mut refused = 0;
    for reply in replies {
        let reply = reply.expect("every request is answered");
        match (reply.result, reply.error) {
            (Some(_), None) => created += 1,
            (None, Some(e)) => {
                assert_eq!(e.code, "rate_limited", "{}", e.message);
                assert!(e.message.contains("retry in"), "{}", e.message);
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        created >= 1 && refused >= 1,
        "created {created}, refused {refused}"
    );
    let counted = |outcome: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(&format!(
                "posgate_rpc_requests_total{{method=\"create_intent\",outcome=\"{outcome}\"}}"
            ))
            .await
            .unwrap_or(0.0)
        }
    };
    assert_eq!(
        (counted("ok").await, counted("rate_limited").await),
        (created as f64, refused as f64)
    );
    // Reconciliation keeps running, and a cashier who retries is still served.
    let t = &mut terminals[0];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        // Not found is answered from the store, whatever the budget.
        let params = json!({"intent_id": "pi_none"});
        let reply = rpc(t, &format!("g{attempt}"), "get_intent", params).await;
        assert_eq!(reply.error.map(|e| e.code).as_deref(), Some("not_found"));
        let params = json!({"amount": "2.00", "order_id": "o-retry"});
        let reply = rpc(t, &format!("c{attempt}"), "create_intent", params).await;
        match reply.error {
            None => break,
            Some(e) => {
                assert_eq!(e.code, "rate_limited", "{}", e.message);
                // As a cashier's app does: wait as long as the answer says (the terminal's own
                // share of the budget refills more slowly than the shared one).
                tokio::time::sleep(retry_hint(&e.message).min(Duration::from_secs(5))).await;
            }
        }
    }
    gw.metric_reaches(
        "posgate_reconcile_listings_total{outcome=\"ok\"}",
        2.0,
        Duration::from_secs(20),
    )
    .await;
    // At the provider: never refused, and never more than the bucket allows since the start.
    let stats = sim.stats().api;
    let allowed = rates.most_in(started.elapsed()) + 1;
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(
        stats.requests <= allowed,
        "{} requests in {:?}, bucket allows {allowed}",
        stats.requests,
        started.elapsed()
    );
    assert!(stats.requests >= 4, "{stats:?}");
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

/// A terminal whose firmware loops on a request: beyond its bucket (burst 20, then 5/s) and its
/// in-flight bound, requests are answered `rate_limited` at once, with the time to wait, and cost
/// the store and the provider nothing; another terminal's confirmation still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_terminal_is_rate_limited_and_others_are_served() {
    // Rate limiting alone: the flood is not cut off here (see the next test).
    let (gw, sim) = harness::spawn_with_provider(
        SECRET,
        Faults::default(),
        &[("POSGATE__RPC__FLOOD_SUSPEND_SECS", "0")],
    )
    .await;
    let mut flooder = gw.terminal("pos_flood").await;
    let mut honest = gw.terminal("pos_honest").await;
    const SENT: usize = 300;
    for n in 0..SENT {
        let request = json!({"id": format!("f{n}"), "method": "no_such_method", "params": {}});
        flooder
            .client
            .publish(
                &flooder.bundle.topics.rpc_req,
                rumqttc::QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&request).unwrap(),
            )
            .await
            .unwrap();
    }
    let intent = posgate_sim::events::Intent::new(
        "pi_during_flood",
        posgate_proto::MicroUsdc(4_500_000),
        "pos_honest",
    );
    let body = posgate_sim::events::intent_event("evt_during_flood", "confirmed", &intent);
    let response = harness::signed_post(&gw.http, &gw.webhook_url(), SECRET, body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let c = honest.next_confirmation(WAIT).await.unwrap();
    assert_eq!(c.intent_id, "pi_during_flood");
    let (mut limited, mut answered) = (0, 0);
    while limited + answered < SENT {
        match flooder.next_seen(WAIT).await {
            Some(Seen::Rpc(reply)) => match reply.error {
                Some(e) if e.code == "rate_limited" => {
                    assert!(reply.result.unwrap()["retry_after_ms"].as_u64().unwrap() >= 1);
                    limited += 1;
                }
                Some(e) => {
                    assert_eq!(e.code, "unknown_method");
                    answered += 1;
                }
                None => panic!("{reply:?}"),
            },
            Some(_) => {}
            None => panic!("{limited} + {answered} of {SENT} answered"),
        }
    }
    assert!(answered <= 40, "{answered} handled, {limited} rate limited");
    assert!(
        limited >= SENT - 40,
        "{answered} handled, {limited} rate limited"
    );
    // Nothing of the flood was stored: a retry of a handled id is answered afresh, not replayed.
    let metrics = gw.scrape().await;
    assert_eq!(
        harness::sample(
            &metrics,
            r#"posgate_rpc_requests_total{method="other",outcome="replayed"}"#
        ),
        None
    );
    drop(sim);
    gw.shutdown().await;
}

/// A terminal that keeps flooding after being told to wait (100 refusals within 10 s) is
/// disconnected and refused at CONNECT for `rpc.flood_suspend_secs`; then it connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_that_keeps_flooding_is_disconnected_for_a_while() {
    let (gw, sim) = harness::spawn_with_provider(
        SECRET,
        Faults::default(),
        &[("POSGATE__RPC__FLOOD_SUSPEND_SECS", "3")],
    )
    .await;
    let flooder = gw.terminal("pos_flood").await;
    let bundle = flooder.bundle.clone();
    for n in 0..300 {
        let request = json!({"id": format!("f{n}"), "method": "no_such_method", "params": {}});
        // Once the terminal is cut off its client queues these, or refuses them: either is fine.
        drop(flooder.client.try_publish(
            &bundle.topics.rpc_req,
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&request).unwrap(),
        ));
    }
    gw.metric_reaches(
        r#"posgate_rpc_requests_total{method="any",outcome="rate_limited"}"#,
        100.0,
        WAIT,
    )
    .await;
    // Cut off: the terminal is seen offline, and a new connection is refused.
    let deadline = Instant::now() + WAIT;
    while gw.terminal_view("pos_flood").await["online"] != false {
        assert!(
            Instant::now() < deadline,
            "the flooding terminal is still online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(flooder);
    let refused = Terminal::connect(bundle.clone(), gw.mqtt).await;
    assert!(
        refused.is_err(),
        "a suspended terminal connected again at once"
    );
    gw.metric_reaches(
        r#"posgate_mqtt_refused_total{reason="suspended"}"#,
        1.0,
        WAIT,
    )
    .await;
    // After the suspension it is served again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut back = loop {
        match Terminal::connect(bundle.clone(), gw.mqtt).await {
            Ok(t) => break t,
            Err(e) => assert!(Instant::now() < deadline, "still refused: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let reply = rpc(&mut back, "after", "no_such_method", json!({})).await;
    assert_eq!(reply.error.unwrap().code, "unknown_method");
    drop(sim);
    gw.shutdown().await;
}

/// A terminal without MQTT pays over HTTP with its bearer token: create (idempotent by its
/// request id), read, cancel, through the same RPC implementation, with the same codes.
#[tokio::test]
async fn an_http_terminal_creates_reads_and_cancels_intents() {
    let (gw, sim) = setup().await;
    let bundle = gw.provision("pos_http_pay").await;
    let other = gw.provision("pos_http_other").await;
    let url = |path: &str| format!("http://{}/v1/terminal/payment-intents{path}", gw.ingress);
    let post = |path: String, token: String, body: serde_json::Value| {
        let http = gw.http.clone();
        async move {
            harness::status_json(
                http.post(path)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let body = json!({"request_id": "web-1", "amount": "4.40", "order_id": "ord-http"});
    let (status, created) = post(url(""), bundle.http_token.clone(), body.clone()).await;
    assert_eq!(status, 201, "{created}");
    let intent_id = created["intent_id"].as_str().unwrap().to_owned();
    assert!(
        created["qr_payload"]
            .as_str()
            .unwrap()
            .ends_with("uint256=4400000")
    );
    // The same request id again: the same intent, one at the provider.
    let (status, again) = post(url(""), bundle.http_token.clone(), body).await;
    assert_eq!((status, &again["intent_id"]), (201, &created["intent_id"]));
    assert_eq!(sim.stats().api.intents_created, 1);
    // Bad input gets the RPC's code in the house body.
    let (status, bad) = post(
        url(""),
        bundle.http_token.clone(),
        json!({"request_id": "web-2", "amount": "4.405", "order_id": "o"}),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (422, Some("invalid_params"))
    );
    // Read: the owner sees it, another terminal gets 404, no token 401.
    let get = |token: Option<String>| {
        let mut request = gw.http.get(url(&format!("/{intent_id}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { harness::status_json(request.send().await.unwrap()).await }
    };
    let (status, view) = get(Some(bundle.http_token.clone())).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (200, Some("awaiting_payment"))
    );
    assert_eq!(get(Some(other.http_token.clone())).await.0, 404);
    assert_eq!(get(None).await.0, 401);
    // Cancel: another terminal cannot, the owner can.
    let cancel = url(&format!("/{intent_id}/cancel"));
    assert_eq!(
        post(cancel.clone(), other.http_token.clone(), json!({}))
            .await
            .0,
        404
    );
    let (status, cancelled) = post(cancel, bundle.http_token.clone(), json!({})).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    gw.shutdown().await;
}

/// The provider refuses the gateway's calls (its API key was revoked: a 401): an HTTP terminal
/// gets a clear 502 `rejected` naming the provider's status and code, not a 500, and an MQTT
/// terminal the same code; nothing is created.
#[tokio::test]
async fn a_provider_refusal_is_a_502_over_http_and_rejected_over_mqtt() {
    let mut config = harness::sim_config(SECRET);
    config.api_key = Some("sk_test_not_the_gateways".to_owned().into());
    let (gw, sim) = harness::spawn_with_sim(config, &[]).await;
    let bundle = gw.provision("pos_refused_http").await;
    let response = gw
        .http
        .post(format!("http://{}/v1/terminal/payment-intents", gw.ingress))
        .bearer_auth(&bundle.http_token)
        .json(&json!({"request_id": "r1", "amount": "4.40", "order_id": "ord-1"}))
        .send()
        .await
        .unwrap();
    let (status, body) = harness::status_json(response).await;
    assert_eq!(status, 502, "{body}");
    harness::assert_error_body(&body);
    assert_eq!(body["error"]["code"], "rejected");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("401") && message.contains("invalid_api_key"),
        "{message}"
    );

    let mut t = gw.terminal("pos_refused_mqtt").await;
    let reply = rpc(
        &mut t,
        "r1",
        "create_intent",
        json!({"amount": "4.40", "order_id": "ord-1"}),
    )
    .await;
    assert_eq!(reply.error.map(|e| e.code).as_deref(), Some("rejected"));
    assert_eq!(sim.stats().api.intents_created, 0);
    gw.shutdown().await;
}

/// The wait a `rate_limited` answer names: "… retry in N s" or "… retry in N ms".
fn retry_hint(message: &str) -> Duration {
    let rest = message
        .rsplit_once("retry in ")
        .map_or("", |(_, rest)| rest);
    let (number, unit) = rest.split_once(' ').unwrap_or((rest, ""));
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("no retry time in {message:?}"));
    if unit.starts_with("ms") {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n)
    }
}
