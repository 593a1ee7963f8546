//! Reconciliation: an intent the webhooks never name (an underpayment, which the provider does not
//! confirm) is looked up at the provider, and the terminal hears about it.

use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::{ConfirmationStatus, Context};
use posgate_sim::provider::{Faults, NewIntent};

use crate::harness::{self, eventually};

const SECRET: &str = "whsec_it_reconcile";

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
    let pi = posgate_sim::events::Intent::new("pi_rec_down", MicroUsdc(1_000_000), "pos_x");
    let tx = posgate_sim::events::transaction_event(
        "evt_rec_down",
        "txn_rec_down",
        &pi,
        MicroUsdc(1),
        time::OffsetDateTime::now_utc(),
    );
    assert_eq!(gw.post_signed(&tx).await.status(), 200);
    eventually(Duration::from_secs(20), || async {
        let runs = gw
            .metric("posgate_reconcile_runs_total")
            .await
            .unwrap_or(0.0);
        (runs >= 1.0).then_some(())
    })
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
    let faults = Faults {
        drop_rate: 1.0,
        ..Faults::default()
    };
    let extra = [
        ("POSGATE__PROVIDER__RECONCILE_EVERY_SECS", "1"),
        ("POSGATE__PROVIDER__RECONCILE_GRACE_SECS", "1"),
    ];
    let (gw, sim) = harness::spawn_with_provider(SECRET, faults, &extra).await;
    let mut terminal = gw.terminal("pos_drop").await;
    let reply = terminal
        .rpc(
            "c1",
            "create_intent",
            serde_json::json!({"amount": "4.50", "order_id": "o-1", "ttl": 60}),
            Duration::from_secs(15),
        )
        .await
        .unwrap();
    let id = reply.result.unwrap()["intent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.pay(&id, None, false).unwrap();
    // No webhook ever comes; the sweep finds the intent open past its expiry and asks.
    let c = terminal
        .next_confirmation(Duration::from_secs(20))
        .await
        .unwrap();
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
