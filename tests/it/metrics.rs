//! `/metrics` after a real webhook and a real delivery.

use std::time::Duration;

use crate::harness::{eventually, sample, spawn_gateway};

#[tokio::test]
async fn counters_and_histograms_move_with_a_webhook_and_a_delivery() {
    let gw = spawn_gateway().await;
    let before = gw.scrape().await;
    assert_eq!(sample(&before, "posgate_build_info{"), Some(1.0));
    assert_eq!(sample(&before, "posgate_delivery_seconds_count"), Some(0.0));

    let mut t = gw.terminal("pos_m").await;
    gw.pay("pos_m", "pi_m_1").await;
    t.next_confirmation(Duration::from_secs(10)).await.unwrap();
    // A forged delivery too.
    let body = posgate_sim::events::intent_event(
        "evt_m_x",
        "confirmed",
        &posgate_sim::events::Intent::new("pi_m_x", posgate_proto::MicroUsdc(1), "pos_m"),
    );
    let headers = posgate_sim::events::signed_headers(
        "not-the-secret",
        posgate_sim::events::now_unix(),
        body.as_bytes(),
    );
    assert_eq!(gw.post_with(body, &headers).await.status(), 401);

    let after = eventually(Duration::from_secs(10), || async {
        let text = gw.scrape().await;
        // The depth is read from the store before the counters are rendered: a scrape can
        // count the delivery and still show the row it read a moment before.
        (sample(&text, "posgate_delivery_seconds_count") == Some(1.0)
            && sample(&text, "posgate_outbox_depth") == Some(0.0))
        .then_some(text)
    })
    .await;
    let expect = [
        (
            "posgate_webhooks_total{event_type=\"payment_intent.confirmed\",outcome=\"accepted\"}",
            1.0,
        ),
        (
            "posgate_webhooks_total{event_type=\"none\",outcome=\"bad_signature\"}",
            1.0,
        ),
        (
            "posgate_webhook_signature_failures_total{reason=\"mismatch\"}",
            1.0,
        ),
        ("posgate_webhook_secret_matches_total{slot=\"0\"}", 1.0),
        (
            "posgate_intent_transitions_total{from=\"awaiting_payment\",to=\"confirmed\"}",
            1.0,
        ),
        ("posgate_confirmations_published_total", 1.0),
        ("posgate_confirmations_acked_total", 1.0),
        ("posgate_ingest_answer_seconds_count", 2.0),
        ("posgate_terminals_registered", 1.0),
        ("posgate_terminals_online", 1.0),
        ("posgate_broker_connections", 1.0),
        ("posgate_outbox_depth", 0.0),
    ];
    for (prefix, want) in expect {
        assert_eq!(sample(&after, prefix), Some(want), "{prefix} in\n{after}");
    }
    assert!(sample(&after, "posgate_store_commit_seconds_count").is_some_and(|n| n >= 2.0));
    gw.shutdown().await;
}

/// A fresh daemon already exports the series whose labels are known (at 0), and the store and
/// disk gauges: the shipped dashboard and alerts have data from the first scrape.
#[tokio::test]
async fn a_fresh_daemon_exports_its_known_series() {
    let gw = spawn_gateway().await;
    let text = gw.scrape().await;
    for series in [
        r#"posgate_http_streams{channel="sse"}"#,
        r#"posgate_http_streams{channel="ws"}"#,
        r#"posgate_reconcile_findings_total{kind="missed_status"}"#,
        r#"posgate_reconcile_listings_total{outcome="failed"}"#,
        r#"posgate_rpc_requests_total{method="create_intent",outcome="ok"}"#,
        r#"posgate_rpc_requests_total{method="any",outcome="rate_limited"}"#,
        r#"posgate_webhook_signature_failures_total{reason="mismatch"}"#,
        r#"posgate_provider_requests_total{endpoint="get_intent",outcome="ok"}"#,
        r#"posgate_webhooks_total{event_type="none",outcome="store_error"}"#,
        r#"posgate_webhook_secret_matches_total{slot="0"}"#,
        r#"posgate_intent_transitions_total{from="awaiting_payment",to="confirmed"}"#,
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in:\n{text}");
    }
    assert_eq!(sample(&text, "posgate_store_healthy"), Some(1.0));
    assert_eq!(
        sample(&text, r#"posgate_mqtt_refused_total{reason="revoked"}"#),
        Some(0.0)
    );
    let open = sample(&text, "process_open_fds").unwrap();
    let max = sample(&text, "process_max_fds").unwrap();
    assert!(open > 0.0 && open <= max, "{open} descriptors of {max}");
    let free = sample(&text, "posgate_data_dir_free_bytes").unwrap();
    let size = sample(&text, "posgate_data_dir_size_bytes").unwrap();
    assert!(free > 0.0 && free <= size, "free {free} of {size}");
    gw.shutdown().await;
}
