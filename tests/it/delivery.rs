//! Confirmations reach their terminal over real MQTT/TLS, whatever happens in between.

use std::time::Duration;

use posgate_proto::confirmation::ConfirmationStatus;
use posgate_sim::events;
use posgate_sim::terminal::{Seen, Terminal};
use serde_json::{Value, json};

use crate::harness::{assert_error_body, eventually, spawn_gateway, spawn_with, status_json};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn confirmation_reaches_its_terminal_and_the_ack_clears_it() {
    let gw = spawn_gateway().await;
    let mut a = gw.terminal("pos_01").await;
    gw.pay("pos_01", "pi_del_1").await;
    let c = a.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (c.terminal_id.as_str(), c.intent_id.as_str(), c.seq),
        ("pos_01", "pi_del_1", 1)
    );
    assert_eq!(
        (c.status, c.amount.as_str(), c.amount_micros),
        (ConfirmationStatus::Confirmed, "4.50", 4_500_000)
    );
    assert_eq!(c.order_id.as_deref(), Some("ord-pi_del_1"));
    // The terminal acked it: nothing pending, and the registry shows the terminal online.
    let view = eventually(WAIT, || async {
        let v = gw.terminal_view("pos_01").await;
        (v["pending"] == 0 && v["online"] == true).then_some(v)
    })
    .await;
    assert!(view["last_seen"].is_string());
    // The id is taken: a second provisioning is refused.
    let (status, body) = status_json(
        gw.admin_post(
            "/v1/terminals",
            serde_json::json!({"id": "pos_01", "merchant_id": "mer_test"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    a.disconnect().await;
    gw.shutdown().await;
}

/// Offline while the confirmation is published and published again (nobody acks): it is there
/// when the terminal connects. (Waits for two republishes, not for a fixed time.)
#[tokio::test]
async fn an_offline_terminal_gets_it_when_it_connects_after_republishes() {
    let gw = spawn_with(&[("POSGATE__DELIVERY__REPUBLISH_AFTER_SECS", "1")]).await;
    let bundle = gw.provision("store-12-lane-3").await;
    gw.pay("store-12-lane-3", "pi_off_1").await;
    gw.metric_reaches("posgate_confirmations_republished_total", 2.0, WAIT)
        .await;
    let mut t = Terminal::connect(bundle, gw.mqtt).await.unwrap();
    let c = t.next_confirmation(WAIT).await.unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_off_1", 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hundred_queued_confirmations_arrive_in_seq_order() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_100").await;
    for n in 1..=100 {
        gw.pay("pos_100", &format!("pi_q_{n:03}")).await;
    }
    assert_eq!(gw.terminal_view("pos_100").await["pending"], 100);
    let mut t = Terminal::connect(bundle, gw.mqtt).await.unwrap();
    for n in 1..=100u64 {
        let c = t.next_confirmation(WAIT).await.unwrap();
        assert_eq!((c.seq, c.intent_id.clone()), (n, format!("pi_q_{n:03}")));
    }
    eventually(WAIT, || async {
        (gw.terminal_view("pos_100").await["pending"] == 0).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_confirmation_for_an_unregistered_terminal_waits_for_it() {
    let gw = spawn_gateway().await;
    gw.pay("pos_later", "pi_wait_1").await;
    let (_, list) = status_json(gw.admin_get("/v1/undeliverable").await).await;
    assert_eq!(
        list["data"],
        serde_json::json!([{"terminal_id": "pos_later", "intent_id": "pi_wait_1"}])
    );
    let mut t = gw.terminal("pos_later").await;
    let c = t.next_confirmation(WAIT).await.unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_wait_1", 1));
    let (_, list) = status_json(gw.admin_get("/v1/undeliverable").await).await;
    assert_eq!(list["data"], serde_json::json!([]));
    gw.shutdown().await;
}

#[tokio::test]
async fn presence_follows_the_connection_and_the_last_will() {
    let gw = spawn_gateway().await;
    let t = gw.terminal("pos_presence").await;
    eventually(WAIT, || async {
        (gw.terminal_view("pos_presence").await["online"] == true).then_some(())
    })
    .await;
    t.kill(); // no DISCONNECT: the broker publishes the last will
    eventually(Duration::from_secs(60), || async {
        (gw.terminal_view("pos_presence").await["online"] == false).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_clean_restart_republishes_what_was_not_acked() {
    let gw = spawn_gateway().await;
    let bundle = gw.provision("pos_restart").await;
    gw.pay("pos_restart", "pi_rs_1").await;
    let gw = gw.restart().await;
    let mut t = Terminal::connect(bundle, gw.mqtt).await.unwrap();
    let c = t.next_confirmation(WAIT).await.unwrap();
    assert_eq!(c.intent_id, "pi_rs_1");
    // Any duplicate that follows is recognised by seq, never shown twice.
    while let Some(seen) = t.next_seen(Duration::from_millis(300)).await {
        assert!(
            matches!(seen, Seen::Duplicate { .. } | Seen::Connected),
            "{seen:?}"
        );
    }
    gw.shutdown().await;
}

/// A lost terminal is revoked with payments still pending: they leave the outbox (no unacked
/// alert that could never clear, no republishing into the void) and wait as undeliverable until
/// the operator assigns them to the replacement, which gets them over MQTT/TLS, signed for it.
#[tokio::test]
async fn a_revoked_terminals_pending_confirmations_go_to_the_terminal_they_are_assigned_to() {
    let gw = spawn_gateway().await;
    gw.provision("pos_lost").await; // never connects again
    gw.pay("pos_lost", "pi_lost_1").await;
    gw.pay("pos_lost", "pi_lost_2").await;
    assert_eq!(gw.terminal_view("pos_lost").await["pending"], 2);
    assert_eq!(gw.metric("posgate_outbox_depth").await, Some(2.0));
    let (status, body) = status_json(
        gw.admin_post("/v1/terminals/pos_lost/revoke", json!({}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.terminal_view("pos_lost").await["pending"], 0);
    assert_eq!(gw.metric("posgate_outbox_depth").await, Some(0.0));
    assert_eq!(gw.metric("posgate_undeliverable").await, Some(2.0));
    let (_, list) = status_json(gw.admin_get("/v1/undeliverable").await).await;
    assert_eq!(
        list["data"],
        json!([
            {"terminal_id": "pos_lost", "intent_id": "pi_lost_1"},
            {"terminal_id": "pos_lost", "intent_id": "pi_lost_2"},
        ])
    );

    let assign = |intent: &'static str, body: Value| {
        let gw = &gw;
        async move {
            status_json(
                gw.admin_post(&format!("/v1/undeliverable/{intent}/assign"), body)
                    .await,
            )
            .await
        }
    };
    // Refused, and nothing moves: the revoked terminal itself, an unknown one, a bad body, an
    // unknown intent.
    for (body, status) in [
        (json!({"terminal_id": "pos_lost"}), 422),
        (json!({"terminal_id": "pos_nobody"}), 422),
        (json!({"terminal_id": "bad id!"}), 422),
        (json!({}), 422),
        (json!(["pos_new"]), 422),
    ] {
        let (got, answer) = assign("pi_lost_1", body.clone()).await;
        assert_eq!(got, status, "{body} -> {answer}");
        assert_error_body(&answer);
    }
    let (got, answer) = assign("pi_nope", json!({"terminal_id": "pos_lost"})).await;
    assert_eq!(got, 404, "{answer}");

    let mut b = gw.terminal("pos_new").await;
    for intent in ["pi_lost_1", "pi_lost_2"] {
        let (got, answer) = assign(intent, json!({"terminal_id": "pos_new"})).await;
        assert_eq!(got, 200, "{answer}");
    }
    // The Terminal verifies each JWS against the gateway key, its own id and seq.
    for (n, intent) in [(1, "pi_lost_1"), (2, "pi_lost_2")] {
        let c = b.next_confirmation(WAIT).await.unwrap();
        assert_eq!(
            (c.terminal_id.as_str(), c.intent_id.as_str(), c.seq),
            ("pos_new", intent, n)
        );
    }
    let (got, answer) = assign("pi_lost_1", json!({"terminal_id": "pos_new"})).await;
    assert_eq!(got, 409, "{answer}");
    let (_, list) = status_json(gw.admin_get("/v1/undeliverable").await).await;
    assert_eq!(list["data"], json!([]));
    assert_eq!(
        gw.intent("pi_lost_1").await.unwrap()["terminal_id"],
        "pos_new"
    );
    b.disconnect().await;
    gw.shutdown().await;
}

/// The provider settles only what it confirmed: a payment settled before its terminal was
/// registered still reaches it, as paid.
#[tokio::test]
async fn a_payment_settled_before_its_terminal_is_registered_reaches_it_as_confirmed() {
    let gw = spawn_gateway().await;
    gw.pay("pos_set_b", "pi_set_b").await;
    let body = events::settlement_event("evt_settle_b", &["pi_set_b"]);
    assert_eq!(gw.post_signed(&body).await.status(), 200);
    assert_eq!(gw.intent("pi_set_b").await.unwrap()["status"], "settled");
    let mut b = gw.terminal("pos_set_b").await;
    let c = b.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status, c.seq),
        ("pi_set_b", ConfirmationStatus::Confirmed, 1)
    );
    b.disconnect().await;
    gw.shutdown().await;
}
