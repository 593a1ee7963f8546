//! Terminal RPC over MQTT/TLS: intents created through the gateway, looked up after a reboot,
//! refused across terminals, and safe to retry.

use std::time::Duration;

use posgate_proto::confirmation::ConfirmationStatus;
use posgate_sim::provider::{Faults, RunningProvider};
use serde_json::json;

use crate::harness::{self, TestGateway};

const SECRET: &str = "whsec_it_rpc";
const WAIT: Duration = Duration::from_secs(15);

async fn setup() -> (TestGateway, RunningProvider) {
    harness::spawn_with_provider(SECRET, Faults::default(), &[]).await
}

#[tokio::test]
async fn a_terminal_creates_an_intent_and_receives_its_confirmation() {
    let (gw, sim) = setup().await;
    let mut t = gw.terminal("pos_rpc").await;
    let reply = t
        .rpc(
            "r1",
            "create_intent",
            json!({"amount": "4.40", "order_id": "ord-1"}),
            WAIT,
        )
        .await
        .unwrap();
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
    let again = t
        .rpc(
            "r1",
            "create_intent",
            json!({"amount": "4.40", "order_id": "ord-1"}),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(again.result.unwrap()["intent_id"], intent_id.as_str());
    assert_eq!(sim.stats().api.intents_created, 1);

    // The customer pays; the terminal gets its confirmation; get_intent agrees.
    sim.pay(&intent_id, None, false).unwrap();
    let c = t.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status),
        (intent_id.as_str(), ConfirmationStatus::Confirmed)
    );
    let got = t
        .rpc("r2", "get_intent", json!({"intent_id": intent_id}), WAIT)
        .await
        .unwrap();
    assert_eq!(got.result.unwrap()["status"], "confirmed");
    gw.shutdown().await;
}

#[tokio::test]
async fn after_a_reboot_get_intent_tells_the_outcome() {
    let (gw, sim) = setup().await;
    let bundle = gw.provision("pos_reboot").await;
    let mut t = posgate_sim::terminal::Terminal::connect(bundle.clone(), gw.mqtt)
        .await
        .unwrap();
    let reply = t
        .rpc(
            "c1",
            "create_intent",
            json!({"amount": "12.34", "order_id": "ord-7"}),
            WAIT,
        )
        .await
        .unwrap();
    let intent_id = reply.result.unwrap()["intent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    t.kill(); // the terminal reboots; it kept only the intent id
    sim.pay(&intent_id, None, false).unwrap();
    harness::eventually(WAIT, || async {
        (gw.intent(&intent_id).await.unwrap()["status"] == "confirmed").then_some(())
    })
    .await;
    let mut t = posgate_sim::terminal::Terminal::connect(bundle, gw.mqtt)
        .await
        .unwrap();
    let got = t
        .rpc("g1", "get_intent", json!({"intent_id": intent_id}), WAIT)
        .await
        .unwrap();
    assert_eq!(got.result.unwrap()["status"], "confirmed");
    gw.shutdown().await;
}

#[tokio::test]
async fn another_terminal_s_intent_and_bad_requests_get_errors_not_silence() {
    let (gw, _sim) = setup().await;
    let mut a = gw.terminal("pos_ra").await;
    let mut b = gw.terminal("pos_rb").await;
    let reply = a
        .rpc(
            "a1",
            "create_intent",
            json!({"amount": "1.00", "order_id": "o"}),
            WAIT,
        )
        .await
        .unwrap();
    let intent_id = reply.result.unwrap()["intent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (method, id) in [("get_intent", "b1"), ("cancel_intent", "b2")] {
        let r = b
            .rpc(id, method, json!({"intent_id": intent_id}), WAIT)
            .await
            .unwrap();
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
        let r = b
            .rpc(id, "create_intent", params.clone(), WAIT)
            .await
            .unwrap();
        assert_eq!(
            r.error.map(|e| e.code).as_deref(),
            Some("invalid_params"),
            "{params}"
        );
    }
    let r = b.rpc("x6", "pay_me", json!({}), WAIT).await.unwrap();
    assert_eq!(r.error.map(|e| e.code).as_deref(), Some("unknown_method"));
    // A's own cancel works and is idempotent by request id.
    let r = a
        .rpc("a2", "cancel_intent", json!({"intent_id": intent_id}), WAIT)
        .await
        .unwrap();
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
