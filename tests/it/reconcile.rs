//! Reconciliation: an intent the webhooks never name (an underpayment, which the provider does not
//! confirm) is looked up at the provider, and the terminal hears about it.

use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::{Confirmation, ConfirmationStatus, Context};
use posgate_sim::provider::{Faults, NewIntent, RunningProvider};
use posgate_sim::terminal::Terminal;

use crate::harness::{self, TestGateway, eventually};

const SECRET: &str = "whsec_it_reconcile";
const LISTINGS_OK: &str = "posgate_reconcile_listings_total{outcome=\"ok\"}";

/// A `transaction.created` event paying `amount` for `intent_id` (terminal `pos_x`), now.
fn transfer_event(intent_id: &str, event_id: &str, txn_id: &str, amount: MicroUsdc) -> String {
    let intent = posgate_sim::events::Intent::new(intent_id, MicroUsdc(1_000_000), "pos_x");
    posgate_sim::events::transaction_event(
        event_id,
        txn_id,
        &intent,
        amount,
        time::OffsetDateTime::now_utc(),
    )
}

/// A gateway and a provider simulator that drops every webhook, with `extra` settings: only
/// reconciliation can tell the gateway what happened.
async fn webhooks_dropped(extra: &[(&str, &str)]) -> (TestGateway, RunningProvider) {
    let faults = Faults {
        drop_rate: 1.0,
        ..Faults::default()
    };
    harness::spawn_with_provider(SECRET, faults, extra).await
}

/// Creates an intent from `terminal` (RPC `create_intent` with `params`), has the customer pay
/// it in full, and returns its id and the next confirmation the terminal gets.
async fn created_and_paid(
    terminal: &mut Terminal,
    sim: &RunningProvider,
    params: serde_json::Value,
) -> (String, Confirmation) {
    let id = harness::create_intent(terminal, "c1", params).await;
    sim.pay(&id, None, false).unwrap();
    let c = terminal
        .next_confirmation(Duration::from_secs(20))
        .await
        .unwrap();
    (id, c)
}

#[tokio::test]
async fn an_underpayment_reaches_the_terminal_through_a_provider_lookup() {
    let (gw, sim) = harness::spawn_with_provider(SECRET, Faults::default(), &[]).await;
    let mut terminal = gw.terminal("pos_rec").await;

    // Created at the provider by "the merchant's backend": the gateway has never seen it.
    let intent = sim
        .create_intent(&NewIntent::for_terminal(MicroUsdc(4_500_000), "pos_rec"))
        .unwrap();
    let id = intent["id"].as_str().unwrap().to_owned();
    sim.pay(&id, Some(MicroUsdc(4_400_000)), false).unwrap();

    // Only `transaction.created` comes; the gateway asks the provider about the intent.
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status, c.context),
        (
            id.as_str(),
            ConfirmationStatus::Unresolved,
            Some(Context::Underpaid)
        )
    );
    assert_eq!(
        c.amount_micros, 4_500_000,
        "the amount asked, from the provider's snapshot"
    );
    let view = gw.intent(&id).await.unwrap();
    assert_eq!(
        (view["status"].as_str(), view["received_micros"].as_u64()),
        (Some("unresolved"), Some(4_400_000))
    );
    let kinds: Vec<&str> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"transaction.created") && kinds.contains(&"reconcile.payment_intent"),
        "{kinds:?}"
    );
    eventually(Duration::from_secs(10), || async {
        let found = gw
            .metric("posgate_reconcile_findings_total{kind=\"unknown_intent\"}")
            .await;
        (found == Some(1.0)).then_some(())
    })
    .await;
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_provider_down_is_not_fatal_and_the_event_is_kept() {
    // An API base where nothing listens: lookups fail, webhooks are still accepted and kept.
    let gw = harness::spawn_with(&[
        ("POSGATE__PROVIDER__API_BASE", "http://127.0.0.1:9/v1"),
        ("POSGATE__PROVIDER__API_KEY", "sk_test_reconcile"),
        ("POSGATE__PROVIDER__REQUESTS_PER_MINUTE", "6000"),
    ])
    .await;
    let tx = transfer_event("pi_rec_down", "evt_rec_down", "txn_rec_down", MicroUsdc(1));
    assert_eq!(gw.post_signed(&tx).await.status(), 200);
    gw.metric_reaches("posgate_reconcile_runs_total", 1.0, Duration::from_secs(20))
        .await;
    assert!(gw.intent("pi_rec_down").await.is_none());
    assert_eq!(gw.admin_get("/healthz").await.status(), 200);
    // The transfer is kept, waiting for its intent, and a resend is recognised.
    let (_, again) = crate::harness::status_json(gw.post_signed(&tx).await).await;
    assert_eq!(again["duplicate"], true);
    gw.shutdown().await;
}

#[tokio::test]
async fn with_every_webhook_dropped_the_confirmation_still_arrives() {
    // Time scale 0.01: a ttl of 60 s becomes 0.6 s.
    let (gw, sim) = webhooks_dropped(&[
        ("POSGATE__PROVIDER__RECONCILE_EVERY_SECS", "1"),
        ("POSGATE__PROVIDER__RECONCILE_GRACE_SECS", "1"),
    ])
    .await;
    let mut terminal = gw.terminal("pos_drop").await;
    // No webhook ever comes; the sweep finds the intent open past its expiry and asks.
    let (id, c) = created_and_paid(
        &mut terminal,
        &sim,
        serde_json::json!({"amount": "4.50", "order_id": "o-1", "ttl": 60}),
    )
    .await;
    assert_eq!(
        (c.intent_id.as_str(), c.status),
        (id.as_str(), ConfirmationStatus::Confirmed)
    );
    assert!(
        sim.stats().delivery.dropped > 0,
        "the simulator really dropped the webhooks"
    );
    let found = gw
        .metric("posgate_reconcile_findings_total{kind=\"missed_status\"}")
        .await;
    assert_eq!(found, Some(1.0));
    gw.shutdown().await;
}

/// Every webhook dropped, reconciliation's sweep out of the way (60 s): only the listing of the
/// provider's transactions (every second here) can find these transfers.
async fn listing_only() -> (TestGateway, RunningProvider) {
    webhooks_dropped(&[("POSGATE__PROVIDER__TRANSACTIONS_EVERY_SECS", "1")]).await
}

async fn metric_or_zero(gw: &TestGateway, name: &str) -> f64 {
    gw.metric(name).await.unwrap_or(0.0)
}

async fn orphans(gw: &TestGateway) -> Vec<serde_json::Value> {
    let response = gw.admin_get("/v1/orphan-transfers").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn transfers_no_webhook_announced_are_found_by_the_listing_once() {
    let (gw, sim) = listing_only().await;
    let mut terminal = gw.terminal("pos_list").await;

    // A: created by the terminal (known to the gateway), underpaid.
    let a = harness::create_intent(
        &mut terminal,
        "c1",
        serde_json::json!({"amount": "4.50", "order_id": "o-a", "ttl": 3600}),
    )
    .await;
    sim.pay(&a, Some(MicroUsdc(4_400_000)), false).unwrap();
    // B: created by "the merchant's backend" (unknown to the gateway), underpaid.
    let mut new = NewIntent::for_terminal(MicroUsdc(2_000_000), "pos_list");
    new.ttl_secs = Some(3600);
    let b = sim.create_intent(&new).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.pay(&b, Some(MicroUsdc(1_500_000)), false).unwrap();
    // C: a transfer to an address no intent has.
    let orphan = sim.pay_unknown(MicroUsdc(1_000_000), None).unwrap();

    // The terminal hears about both underpayments, though no webhook ever arrived.
    let mut got = Vec::new();
    for _ in 0..2 {
        let c = terminal
            .next_confirmation(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            (c.status, c.context),
            (ConfirmationStatus::Unresolved, Some(Context::Underpaid)),
            "{c:?}"
        );
        got.push(c.intent_id);
    }
    got.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(got, want);
    let stats = sim.stats().delivery;
    assert!(stats.dropped >= 3 && stats.delivered == 0, "{stats:?}");
    let view = gw.intent(&a).await.unwrap();
    assert_eq!(view["received_micros"], 4_400_000);
    assert!(
        view["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reconcile.transaction"),
        "{view}"
    );

    // C is kept as an orphan, visible to the operator.
    let found = eventually(Duration::from_secs(10), || async {
        let list = orphans(&gw).await;
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["txn_id"], orphan.transaction_id.as_str());
    assert_eq!(found[0]["amount_micros"], 1_000_000);
    assert_eq!(found[0]["payment_intent_id"], serde_json::Value::Null);

    // Every transfer listed again (the window overlaps): no second effect.
    let before = metric_or_zero(&gw, LISTINGS_OK).await;
    let a_before = gw.intent(&a).await.unwrap();
    gw.metric_reaches(LISTINGS_OK, before + 2.0, Duration::from_secs(15))
        .await;
    assert_eq!(gw.intent(&a).await.unwrap(), a_before);
    assert_eq!(
        gw.intent(&b).await.unwrap()["transactions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(orphans(&gw).await.len(), 1);
    assert_eq!(
        metric_or_zero(&gw, "posgate_orphan_transfers_total").await,
        1.0
    );
    assert_eq!(
        metric_or_zero(
            &gw,
            "posgate_reconcile_findings_total{kind=\"missed_transfer\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric_or_zero(
            &gw,
            "posgate_reconcile_findings_total{kind=\"unknown_intent\"}"
        )
        .await,
        1.0
    );
    assert!(
        terminal
            .next_confirmation(Duration::from_millis(300))
            .await
            .is_err(),
        "nothing new for the terminal"
    );
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_exact_transfer_found_by_the_listing_ends_confirmed() {
    let (gw, sim) = webhooks_dropped(&[
        ("POSGATE__PROVIDER__TRANSACTIONS_EVERY_SECS", "1"),
        ("POSGATE__PROVIDER__RECONCILE_EVERY_SECS", "1"),
        ("POSGATE__PROVIDER__RECONCILE_GRACE_SECS", "1"),
    ])
    .await;
    let mut terminal = gw.terminal("pos_exact").await;
    // The listing records the exact transfer (no news for the terminal: the provider confirms);
    // a grace period later the sweep asks the provider, which says confirmed.
    let (id, c) = created_and_paid(
        &mut terminal,
        &sim,
        serde_json::json!({"amount": "7.25", "order_id": "o-x", "ttl": 3600}),
    )
    .await;
    assert_eq!(
        (c.intent_id.as_str(), c.status, c.amount_micros),
        (id.as_str(), ConfirmationStatus::Confirmed, 7_250_000)
    );
    let view = gw.intent(&id).await.unwrap();
    assert_eq!(view["transactions"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(
        metric_or_zero(
            &gw,
            "posgate_reconcile_findings_total{kind=\"missed_transfer\"}"
        )
        .await,
        1.0
    );
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_restart_resumes_the_listing_where_it_stopped() {
    // No overlap: only the stored cursor can bring back what happened while the gateway was down.
    let (gw, sim) = webhooks_dropped(&[
        ("POSGATE__PROVIDER__TRANSACTIONS_EVERY_SECS", "1"),
        ("POSGATE__PROVIDER__TRANSACTIONS_OVERLAP_SECS", "0"),
    ])
    .await;
    let bundle = gw.provision("pos_restart").await;
    let mut new = NewIntent::for_terminal(MicroUsdc(3_000_000), "pos_restart");
    new.ttl_secs = Some(3600);
    let id = sim.create_intent(&new).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.metric_reaches(LISTINGS_OK, 1.0, Duration::from_secs(10))
        .await;
    // Paid while the gateway is down; confirmed on chain before it is back.
    let stopped = gw.stop().await;
    sim.pay(&id, Some(MicroUsdc(2_000_000)), false).unwrap();
    eventually(Duration::from_secs(10), || async {
        (sim.stats().api.transactions >= 1).then_some(())
    })
    .await;
    let gw = stopped.start().await;
    let mut terminal = gw.connect(bundle).await;
    let c = terminal
        .next_confirmation(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status, c.context),
        (
            id.as_str(),
            ConfirmationStatus::Unresolved,
            Some(Context::Underpaid)
        )
    );
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

/// A transfer names an intent the provider answers `404` for (a typo in the merchant's backend,
/// an intent of another account): the money matches no intent, so the operator sees it as an
/// orphan, with the alert's counter, as one that names no intent at all.
#[tokio::test]
async fn a_transfer_for_an_intent_the_provider_does_not_know_becomes_an_orphan() {
    let (gw, sim) = harness::spawn_with_provider(SECRET, Faults::default(), &[]).await;
    let amount = MicroUsdc(3_000_000);
    sim.emit_raw(transfer_event(
        "pi_ghost",
        "evt_ghost_1",
        "txn_ghost_1",
        amount,
    ))
    .unwrap();
    let found = eventually(Duration::from_secs(15), || async {
        let list = orphans(&gw).await;
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (
            found[0]["txn_id"].as_str(),
            found[0]["payment_intent_id"].as_str(),
            found[0]["amount_micros"].as_u64(),
            found[0]["event_id"].as_str(),
        ),
        (
            Some("txn_ghost_1"),
            Some("pi_ghost"),
            Some(3_000_000),
            Some("evt_ghost_1")
        )
    );
    assert_eq!(
        metric_or_zero(&gw, "posgate_orphan_transfers_total").await,
        1.0
    );
    assert_eq!(
        metric_or_zero(
            &gw,
            "posgate_reconcile_findings_total{kind=\"unknown_at_provider\"}"
        )
        .await,
        1.0
    );
    // Delivered again by the provider: still one orphan.
    sim.emit_raw(transfer_event(
        "pi_ghost",
        "evt_ghost_2",
        "txn_ghost_1",
        amount,
    ))
    .unwrap();
    gw.metric_reaches(
        "posgate_reconcile_findings_total{kind=\"unknown_at_provider\"}",
        2.0,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(orphans(&gw).await.len(), 1);
    assert_eq!(
        metric_or_zero(&gw, "posgate_orphan_transfers_total").await,
        1.0
    );
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}

/// The provider settles only what it confirmed: with the `confirmed` webhook lost, a settlement
/// that lists the intent is the first news of the payment, and the terminal shows it as paid.
#[tokio::test]
async fn a_settlement_is_the_first_news_of_a_payment_and_the_terminal_shows_it_paid() {
    let (gw, sim) = harness::spawn_with_provider(SECRET, Faults::default(), &[]).await;
    let mut terminal = gw.terminal("pos_settle").await;
    let id = harness::create_intent(
        &mut terminal,
        "c1",
        serde_json::json!({"amount": "4.50", "order_id": "o-s", "ttl": 3600}),
    )
    .await;
    let body = posgate_sim::events::settlement_event("evt_settle_1", &[id.as_str()]);
    sim.emit_raw(body).unwrap();
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (c.intent_id.as_str(), c.status),
        (id.as_str(), ConfirmationStatus::Confirmed)
    );
    assert_eq!(gw.intent(&id).await.unwrap()["status"], "settled");
    gw.shutdown().await;
    sim.shutdown(Duration::from_secs(1)).await;
}
