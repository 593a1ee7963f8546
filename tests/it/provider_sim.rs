//! The provider simulator against the real gateway: an intent created at the simulator's REST API,
//! paid through `/_sim/pay/{id}`, reaches a terminal over MQTT/TLS; duplicate and forged deliveries
//! leave exactly one effect.

use std::time::Duration;

use posgate_proto::confirmation::Context;
use posgate_proto::{ConfirmationStatus, MicroUsdc};
use posgate_sim::provider::{Faults, ProviderConfig, ProviderSim, RunningProvider, Stats};
use serde_json::{Value, json};

use crate::harness::{self, TestGateway};

const SECRET: &str = "whsec_it_provider_sim";
const WAIT: Duration = Duration::from_secs(15);

async fn gateway() -> TestGateway {
    harness::spawn_with(&[("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET)]).await
}

async fn provider(gw: &TestGateway, faults: Faults) -> RunningProvider {
    let mut config = ProviderConfig::new(gw.webhook_url(), SECRET);
    // Confirmation after 30 ms; ttl 3600 s becomes 36 s.
    config.time_scale = 0.01;
    config.faults = faults;
    ProviderSim::start(config).await.unwrap()
}

/// Creates a 4.50 intent for `terminal_id` through the simulator's REST API; returns its id.
async fn create_intent(gw: &TestGateway, sim: &RunningProvider, terminal_id: &str) -> String {
    let response = gw
        .http
        .post(format!("{}/payment-intents", sim.api_base()))
        .bearer_auth("sk_test_posgate")
        .json(&json!({
            "amount": 4.50,
            "currency": "usd",
            "merchant_id": "mer_test",
            "ttl": 3600,
            "idempotency_key": format!("posgate:{terminal_id}:ord-{terminal_id}:1"),
            "metadata": {"terminal_id": terminal_id, "order_id": format!("ord-{terminal_id}")},
        }))
        .send()
        .await
        .unwrap();
    let (status, intent) = harness::status_json(response).await;
    assert_eq!(status, 201, "{intent}");
    assert_eq!(intent["status"], "awaiting_payment");
    intent["id"].as_str().unwrap().to_owned()
}

/// The customer pays through the control endpoint.
async fn pay(gw: &TestGateway, sim: &RunningProvider, intent_id: &str, body: Value) {
    let response = gw
        .http
        .post(format!("{}/_sim/pay/{intent_id}", sim.control_base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// Waits until every event the simulator emitted is finished and `check` holds.
async fn settled(sim: &RunningProvider, check: impl Fn(&Stats) -> bool) -> Stats {
    harness::eventually(WAIT, || {
        let stats = sim.stats();
        let done = stats.delivery.pending == 0 && check(&stats);
        async move { done.then_some(stats) }
    })
    .await
}

/// The event ids the gateway recorded for an intent, once it has `n` of them.
async fn gateway_events(gw: &TestGateway, intent_id: &str, n: usize) -> Vec<String> {
    harness::eventually(WAIT, || async {
        let view = gw.intent(intent_id).await?;
        let events: Vec<String> = view["events"]
            .as_array()?
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect();
        (events.len() >= n).then_some(events)
    })
    .await
}

#[tokio::test]
async fn a_payment_at_the_simulator_reaches_the_terminal() {
    let gw = gateway().await;
    let sim = provider(&gw, Faults::default()).await;
    let mut terminal = gw.terminal("pos-sim-1").await;

    let id = create_intent(&gw, &sim, "pos-sim-1").await;
    pay(&gw, &sim, &id, json!({})).await;

    let c = terminal.next_confirmation(WAIT).await.unwrap();
    assert_eq!(c.intent_id, id);
    assert_eq!(c.terminal_id, "pos-sim-1");
    assert_eq!(c.status, ConfirmationStatus::Confirmed);
    assert_eq!(c.amount_micros, 4_500_000);
    assert_eq!(c.amount, "4.50");
    assert_eq!(c.order_id.as_deref(), Some("ord-pos-sim-1"));

    // Both events arrived and were accepted at the first attempt.
    let stats = settled(&sim, |s| s.delivery.delivered == 2).await;
    assert_eq!(stats.delivery.attempts.ok, 2, "{stats:?}");
    assert_eq!(stats.delivery.attempts.total(), 2, "{stats:?}");
    let events = gateway_events(&gw, &id, 2).await;
    assert_eq!(events.len(), 2);
    let view = gw.intent(&id).await.unwrap();
    assert_eq!(view["status"], "confirmed", "{view}");
    assert_eq!(view["amount_micros"], 4_500_000);

    sim.shutdown(Duration::from_secs(2)).await;
    gw.shutdown().await;
}

/// Pays a fresh intent and checks the single effect: one confirmation, each event recorded once,
/// and the terminal's next message is the next payment's (no second message in between).
async fn one_effect_under(faults: Faults, terminal_id: &str) -> Stats {
    let gw = gateway().await;
    let sim = provider(&gw, faults).await;
    let mut terminal = gw.terminal(terminal_id).await;

    let id = create_intent(&gw, &sim, terminal_id).await;
    pay(&gw, &sim, &id, json!({"amount": "4.50", "late": false})).await;
    let first = terminal.next_confirmation(WAIT).await.unwrap();
    assert_eq!(first.intent_id, id);
    assert_eq!(first.status, ConfirmationStatus::Confirmed);

    settled(&sim, |s| s.delivery.delivered == 2).await;
    let events = gateway_events(&gw, &id, 2).await;
    let mut unique = events.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        events.len(),
        "an event applied twice: {events:?}"
    );
    assert_eq!(events.len(), 2, "{events:?}");
    let emitted: Vec<String> = sim
        .deliveries_for(&id)
        .into_iter()
        .map(|d| d.event_id)
        .collect();
    for event in &emitted {
        assert!(events.contains(event), "{event} not recorded: {events:?}");
    }

    // The next message to this terminal is the next payment's, with the next seq.
    // A second order at the same terminal.
    let second_id = create_intent_for_order(&gw, &sim, terminal_id, "2").await;
    sim.pay(&second_id, None, false).unwrap();
    let next = terminal.next_confirmation(WAIT).await.unwrap();
    assert_eq!(next.intent_id, second_id, "a second effect for {id}");
    assert_eq!(next.seq, first.seq + 1);
    assert_eq!(next.amount_micros, MicroUsdc(3_100_000).0);

    let stats_after = settled(&sim, |s| s.delivery.delivered == 4).await;
    sim.shutdown(Duration::from_secs(2)).await;
    gw.shutdown().await;
    stats_after
}

#[tokio::test]
async fn duplicates_and_a_forged_copy_leave_one_effect() {
    let stats = one_effect_under(
        Faults {
            duplicate_rate: 1.0,
            bad_signature_rate: 1.0,
            ..Faults::default()
        },
        "pos-sim-dup",
    )
    .await;
    let d = &stats.delivery;
    // Four events, each forged once (refused) and sent twice correctly signed (both 200).
    assert_eq!(d.events_emitted, 4, "{d:?}");
    assert_eq!(d.bad_signature_sent, 4, "{d:?}");
    assert_eq!(
        d.forgeries.unauthorized, 4,
        "forgeries must be refused with 401: {d:?}"
    );
    assert_eq!(d.forgeries.ok, 0, "{d:?}");
    assert_eq!(d.duplicates_sent, 4, "{d:?}");
    assert_eq!(d.attempts.ok, 8, "{d:?}");
    assert_eq!(d.attempts.total(), 8, "{d:?}");
}

#[tokio::test]
async fn simultaneous_duplicates_stale_and_empty_signatures_leave_one_effect() {
    let stats = one_effect_under(
        Faults {
            duplicate_rate: 1.0,
            simultaneous_duplicates: true,
            stale_rate: 1.0,
            empty_signature_rate: 1.0,
            ..Faults::default()
        },
        "pos-sim-simul",
    )
    .await;
    let d = &stats.delivery;
    assert_eq!(d.empty_signature_sent, 4, "{d:?}");
    assert_eq!(d.forgeries.unauthorized, 4, "{d:?}");
    assert_eq!(d.stale_sent, 4, "{d:?}");
    assert_eq!(
        d.stale.unauthorized, 4,
        "stale copies must be refused: {d:?}"
    );
    assert_eq!(d.duplicates_sent, 4, "{d:?}");
    assert_eq!(d.attempts.ok, 8, "{d:?}");
}

#[tokio::test]
async fn expiry_then_a_late_payment_reach_the_terminal() {
    let gw = gateway().await;
    let sim = provider(&gw, Faults::default()).await;
    let mut terminal = gw.terminal("pos-sim-late").await;

    // ttl 60 s at time scale 0.01: expires after 0.6 s.
    let response = gw
        .http
        .post(format!("{}/payment-intents", sim.api_base()))
        .bearer_auth("sk_test_posgate")
        .json(
            &json!({"amount": 2.00, "currency": "usd", "merchant_id": "mer_test", "ttl": 60,
            "metadata": {"terminal_id": "pos-sim-late", "order_id": "ord-late"}}),
        )
        .send()
        .await
        .unwrap();
    let (status, intent) = harness::status_json(response).await;
    assert_eq!(status, 201, "{intent}");
    let id = intent["id"].as_str().unwrap().to_owned();
    pay(&gw, &sim, &id, json!({"late": true})).await;

    let expired = terminal.next_confirmation(WAIT).await.unwrap();
    assert_eq!(
        (expired.intent_id.as_str(), expired.status),
        (id.as_str(), ConfirmationStatus::Expired)
    );
    let late = terminal.next_confirmation(WAIT).await.unwrap();
    assert_eq!(late.intent_id, id);
    assert_eq!(late.status, ConfirmationStatus::Unresolved);
    assert_eq!(late.context, Some(Context::Late));
    assert_eq!(late.seq, expired.seq + 1);

    settled(&sim, |s| s.delivery.delivered == 2).await;
    let stats = sim.stats();
    assert_eq!(
        stats
            .delivery
            .events_by_type
            .get("payment_intent.confirmed"),
        None
    );
    sim.shutdown(Duration::from_secs(2)).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn rotation_overlap_both_secrets_are_accepted() {
    let gw = harness::spawn_with(&[(
        "POSGATE__PROVIDER__WEBHOOK_SECRETS",
        "whsec_it_old,whsec_it_new",
    )])
    .await;
    let mut config = ProviderConfig::new(gw.webhook_url(), "whsec_it_old");
    config
        .webhook_secrets
        .push("whsec_it_new".to_owned().into());
    config.time_scale = 0.01;
    // Duplicates count as retries: half of them are signed with the old secret.
    config.faults = Faults {
        duplicate_rate: 1.0,
        rotate_secret: true,
        ..Faults::default()
    };
    let sim = ProviderSim::start(config).await.unwrap();
    let mut terminal = gw.terminal("pos-sim-rot").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = create_intent_for_order(&gw, &sim, "pos-sim-rot", &ids.len().to_string()).await;
        pay(&gw, &sim, &id, json!({})).await;
        let c = terminal.next_confirmation(WAIT).await.unwrap();
        assert_eq!(c.intent_id, id);
        ids.push(id);
    }
    let stats = settled(&sim, |s| s.delivery.delivered == 6).await;
    let d = &stats.delivery;
    assert_eq!(d.attempts.unauthorized, 0, "{d:?}");
    assert_eq!(d.attempts.ok, 12, "{d:?}");
    sim.shutdown(Duration::from_secs(2)).await;
    gw.shutdown().await;
}

async fn create_intent_for_order(
    gw: &TestGateway,
    sim: &RunningProvider,
    terminal_id: &str,
    order: &str,
) -> String {
    let response = gw
        .http
        .post(format!("{}/payment-intents", sim.api_base()))
        .bearer_auth("sk_test_posgate")
        .json(
            &json!({"amount": 3.10, "currency": "usd", "merchant_id": "mer_test", "ttl": 3600,
            "metadata": {"terminal_id": terminal_id, "order_id": format!("ord-{order}")}}),
        )
        .send()
        .await
        .unwrap();
    let (status, intent) = harness::status_json(response).await;
    assert_eq!(status, 201, "{intent}");
    intent["id"].as_str().unwrap().to_owned()
}
