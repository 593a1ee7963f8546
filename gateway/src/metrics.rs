//! The one Prometheus registry of a gateway, served at `/metrics` on the admin listener.
//!
//! One [`Metrics`] per gateway (not a global recorder), so several gateways in one process (tests)
//! never share counters. Names and units follow Prometheus conventions (`posgate_…_total`,
//! `…_seconds`); `deploy/prometheus/posgate-rules.yml` and the dashboard are built on them. Gauges
//! that describe the store (outbox, registry) are refreshed when `/metrics` is scraped.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for latencies from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every metric of the daemon.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `posgate_webhooks_total{event_type,outcome}`.
    pub webhooks: IntCounterVec,
    /// `posgate_webhook_signature_failures_total{reason}`.
    pub signature_failures: IntCounterVec,
    /// `posgate_webhook_secret_matches_total{slot}`.
    pub secret_matches: IntCounterVec,
    /// `posgate_webhook_timestamp_skew_seconds`: our clock minus the provider's, last seen.
    pub timestamp_skew: IntGauge,
    /// `posgate_ingest_answer_seconds`.
    pub ingest_answer: Histogram,
    /// `posgate_store_commit_seconds`.
    pub store_commit: Histogram,
    /// `posgate_intent_transitions_total{from,to}`.
    pub transitions: IntCounterVec,
    /// `posgate_confirmations_published_total`.
    pub published: IntCounter,
    /// `posgate_confirmations_republished_total`.
    pub republished: IntCounter,
    /// `posgate_confirmations_acked_total`.
    pub acked: IntCounter,
    /// `posgate_delivery_seconds`: webhook accepted → terminal ack.
    pub delivery: Histogram,
    /// `posgate_outbox_depth`.
    pub outbox_depth: IntGauge,
    /// `posgate_outbox_oldest_age_seconds`.
    pub outbox_oldest_age: IntGauge,
    /// `posgate_undeliverable`.
    pub undeliverable: IntGauge,
    /// `posgate_terminals_registered`.
    pub terminals_registered: IntGauge,
    /// `posgate_terminals_online`.
    pub terminals_online: IntGauge,
    /// `posgate_terminal_cert_earliest_expiry_timestamp_seconds`: the soonest `notAfter` (unix
    /// seconds) among unrevoked terminals' current certificates; `+Inf` when there is none, so
    /// an alert on "expires within N days" stays quiet and the series always exists.
    pub terminal_cert_earliest_expiry: Gauge,
    /// `posgate_terminal_cert_renewals_pending`: renewals whose replaced certificate is still
    /// accepted (the new one not used yet, its deadline not reached).
    pub terminal_cert_renewals_pending: IntGauge,
    /// `posgate_broker_connections`.
    pub broker_connections: IntGauge,
    /// `posgate_broker_publishes_total`.
    pub broker_publishes: IntCounter,
    /// `posgate_external_broker_connected`: 1 while posgate's client of an external broker is
    /// connected and subscribed (`mqtt.mode = "external"`); always 0 with the embedded broker.
    pub external_broker_connected: IntGauge,
    /// `posgate_replica_shards_owned`: terminal shards whose lease this replica holds (of 64;
    /// PostgreSQL backend only).
    pub shards_owned: IntGauge,
    /// `posgate_replica_lease_renewals_total`: lease cycles that committed.
    pub lease_renewals: IntCounter,
    /// `posgate_replica_lease_failures_total`: lease cycles that failed (`/readyz` says 503 until
    /// one succeeds).
    pub lease_failures: IntCounter,
    /// `posgate_replica_shard_changes_total{change}`: shards this replica `gained`, `released`
    /// (a replica joined), `lost` (another claimed it) or let `lapse` (not renewed in time).
    /// Steadily rising outside joins and failovers means leases flap: each change republishes
    /// the shard's heads.
    pub shard_changes: IntCounterVec,
    /// `posgate_replica_forwards_total{channel}`: notifications sent to other replicas
    /// (`posgate_events`: broker events for a terminal another replica owns;
    /// `posgate_published`: confirmations for HTTP channels elsewhere).
    pub replica_forwards: IntCounterVec,
    /// `posgate_reconcile_runs_total`.
    pub reconcile_runs: IntCounter,
    /// `posgate_reconcile_findings_total{kind}`.
    pub reconcile_findings: IntCounterVec,
    /// `posgate_reconcile_listings_total{outcome}`: listings of the provider's transactions.
    pub reconcile_listings: IntCounterVec,
    /// `posgate_orphan_transfers_total`: transfers recorded as matching no intent.
    pub orphan_transfers: IntCounter,
    /// `posgate_rpc_requests_total{method,outcome}`: terminal RPC answers.
    pub rpc_requests: IntCounterVec,
    /// `posgate_http_streams{channel}`: open SSE and WebSocket streams of terminals.
    pub http_streams: IntGaugeVec,
    /// Calls to the provider (`posgate_provider_requests_total`, `…_request_seconds`).
    pub provider: crate::provider::CallMetrics,
    /// `posgate_mqtt_refused_total{reason}`: MQTT connections refused or closed (the reasons are
    /// listed in its help).
    pub mqtt_refused: IntCounterVec,
    /// `process_open_fds`, `process_max_fds`: descriptors in use and the limit (refreshed at
    /// scrape; the names of Prometheus's own process collector).
    pub open_fds: IntGauge,
    pub max_fds: IntGauge,
    /// `posgate_task_panics_total{task}`: background tasks that panicked (the daemon then stops).
    pub task_panics: IntCounterVec,
    /// `posgate_store_healthy`: 1 while the store commits within its deadline, else 0.
    pub store_healthy: IntGauge,
    /// `posgate_data_dir_free_bytes`: space left for posgate on the file system of `data_dir`.
    pub data_dir_free: IntGauge,
    /// `posgate_data_dir_size_bytes`: size of the file system of `data_dir`.
    pub data_dir_size: IntGauge,
}

/// Registration failed (a duplicate name: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("registering metrics")]
pub struct MetricsError(#[from] prometheus::Error);

fn histogram(registry: &Registry, name: &str, help: &str) -> Result<Histogram, MetricsError> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, MetricsError> {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let h = HistogramVec::new(opts, labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Errors
    /// Only on a duplicate registration (a bug).
    pub fn new() -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("posgate_build_info", "Build of the running daemon"),
            &["version"],
        )?;
        r.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let metrics = Metrics {
            webhooks: counter_vec(
                &r,
                "posgate_webhooks_total",
                "Webhook deliveries by event type and outcome",
                &["event_type", "outcome"],
            )?,
            signature_failures: counter_vec(
                &r,
                "posgate_webhook_signature_failures_total",
                "Refused webhook signatures by reason",
                &["reason"],
            )?,
            secret_matches: counter_vec(
                &r,
                "posgate_webhook_secret_matches_total",
                "Verified webhooks by the slot of the secret that matched (0 = first)",
                &["slot"],
            )?,
            timestamp_skew: gauge(
                &r,
                "posgate_webhook_timestamp_skew_seconds",
                "Our clock minus the provider's webhook timestamp, last seen",
            )?,
            ingest_answer: histogram(
                &r,
                "posgate_ingest_answer_seconds",
                "Time to answer a webhook",
            )?,
            store_commit: histogram(
                &r,
                "posgate_store_commit_seconds",
                "Time of one group commit, from its transaction's start to its data on disk",
            )?,
            transitions: counter_vec(
                &r,
                "posgate_intent_transitions_total",
                "Intent status transitions",
                &["from", "to"],
            )?,
            published: counter(
                &r,
                "posgate_confirmations_published_total",
                "Confirmations published for the first time",
            )?,
            republished: counter(
                &r,
                "posgate_confirmations_republished_total",
                "Confirmations published again (reconnect, restart, timeout)",
            )?,
            acked: counter(
                &r,
                "posgate_confirmations_acked_total",
                "Confirmations acked by their terminal",
            )?,
            delivery: histogram(
                &r,
                "posgate_delivery_seconds",
                "Webhook accepted to terminal ack",
            )?,
            outbox_depth: gauge(
                &r,
                "posgate_outbox_depth",
                "Confirmations waiting for their terminal's ack",
            )?,
            outbox_oldest_age: gauge(
                &r,
                "posgate_outbox_oldest_age_seconds",
                "Age of the oldest unacked confirmation",
            )?,
            undeliverable: gauge(
                &r,
                "posgate_undeliverable",
                "Confirmations waiting for a terminal that is not registered",
            )?,
            terminals_registered: gauge(
                &r,
                "posgate_terminals_registered",
                "Registered, unrevoked terminals",
            )?,
            terminals_online: gauge(&r, "posgate_terminals_online", "Terminals connected now")?,
            terminal_cert_earliest_expiry: {
                let g = Gauge::new(
                    "posgate_terminal_cert_earliest_expiry_timestamp_seconds",
                    "Soonest end of validity among unrevoked terminals' current certificates (unix seconds; +Inf with none)",
                )?;
                g.set(f64::INFINITY);
                r.register(Box::new(g.clone()))?;
                g
            },
            terminal_cert_renewals_pending: gauge(
                &r,
                "posgate_terminal_cert_renewals_pending",
                "Certificate renewals whose replaced certificate is still accepted",
            )?,
            broker_connections: gauge(&r, "posgate_broker_connections", "MQTT connections")?,
            broker_publishes: counter(
                &r,
                "posgate_broker_publishes_total",
                "Publishes the gateway made into the broker",
            )?,
            external_broker_connected: gauge(
                &r,
                "posgate_external_broker_connected",
                "1 while the client of the external MQTT broker is connected and subscribed",
            )?,
            shards_owned: gauge(
                &r,
                "posgate_replica_shards_owned",
                "Terminal shards whose delivery lease this replica holds",
            )?,
            lease_renewals: counter(
                &r,
                "posgate_replica_lease_renewals_total",
                "Shard lease cycles that committed",
            )?,
            lease_failures: counter(
                &r,
                "posgate_replica_lease_failures_total",
                "Shard lease cycles that failed",
            )?,
            shard_changes: counter_vec(
                &r,
                "posgate_replica_shard_changes_total",
                "Shards gained, released, lost to another replica or lapsed, by this replica",
                &["change"],
            )?,
            replica_forwards: counter_vec(
                &r,
                "posgate_replica_forwards_total",
                "Notifications sent to other replicas, by channel",
                &["channel"],
            )?,
            reconcile_runs: counter(&r, "posgate_reconcile_runs_total", "Reconciliation runs")?,
            reconcile_findings: counter_vec(
                &r,
                "posgate_reconcile_findings_total",
                "What reconciliation found that no webhook said",
                &["kind"],
            )?,
            reconcile_listings: counter_vec(
                &r,
                "posgate_reconcile_listings_total",
                "Listings of the provider's recent transactions, by outcome (ok, failed)",
                &["outcome"],
            )?,
            orphan_transfers: counter(
                &r,
                "posgate_orphan_transfers_total",
                "Transfers that match no intent, kept as orphans (GET /v1/orphan-transfers)",
            )?,
            rpc_requests: counter_vec(
                &r,
                "posgate_rpc_requests_total",
                "Terminal RPC requests by method and answer: ok, replayed (a retry answered from \
                 the store), or the error code (rate_limited: the provider budget was spent; \
                 qr_mismatch: the provider's QR payload failed the check; provider_unavailable; …)",
                &["method", "outcome"],
            )?,
            http_streams: gauge_vec(
                &r,
                "posgate_http_streams",
                "Open terminal streams on the ingress listener, by channel (sse, ws)",
                &["channel"],
            )?,
            provider: crate::provider::CallMetrics {
                requests: counter_vec(
                    &r,
                    "posgate_provider_requests_total",
                    "Requests to the provider's API, every attempt (retries included), by endpoint \
                     and outcome: ok, the HTTP status (404, 409, 429, …), 5xx, or unreachable",
                    &["endpoint", "outcome"],
                )?,
                seconds: histogram_vec(
                    &r,
                    "posgate_provider_request_seconds",
                    "Time of each request to the provider's API until its answer, by endpoint",
                    &["endpoint"],
                )?,
            },
            mqtt_refused: counter_vec(
                &r,
                "posgate_mqtt_refused_total",
                "MQTT connections refused or closed, by reason: identity (client id, CN or O do \
                 not match), no_certificate, revoked (in the TLS handshake or at CONNECT), \
                 last_will (not the terminal's own status topic), handshake (TLS failed or timed \
                 out), first_packet (no CONNECT accepted within the handshake timeout), replaced \
                 (the terminal's oldest socket, beyond max_connections_per_terminal), capacity \
                 (the listener's max_connections), suspended (kept flooding RPC: refused for \
                 rpc.flood_suspend_secs)",
                &["reason"],
            )?,
            open_fds: gauge(
                &r,
                "process_open_fds",
                "Open file descriptors of the daemon",
            )?,
            max_fds: gauge(
                &r,
                "process_max_fds",
                "The daemon's limit of open file descriptors (RLIMIT_NOFILE)",
            )?,
            task_panics: counter_vec(
                &r,
                "posgate_task_panics_total",
                "Background tasks that panicked, by task (the daemon then stops and exits 1)",
                &["task"],
            )?,
            store_healthy: gauge(
                &r,
                "posgate_store_healthy",
                "1 while the store commits within store.commit_deadline_ms and its last commit \
                 succeeded; 0 while it is failing, stalled or reopening its database",
            )?,
            data_dir_free: gauge(
                &r,
                "posgate_data_dir_free_bytes",
                "Space available to posgate on the file system holding data_dir",
            )?,
            data_dir_size: gauge(
                &r,
                "posgate_data_dir_size_bytes",
                "Size of the file system holding data_dir",
            )?,
            registry: r,
        };
        metrics.init_known_labels();
        Ok(metrics)
    }

    /// Creates the series whose label values are known in advance, at 0: a fresh daemon exports
    /// them, so dashboards show 0 rather than "No data" and `rate()` has a starting point.
    fn init_known_labels(&self) {
        for channel in ["sse", "ws"] {
            self.http_streams.with_label_values(&[channel]);
        }
        for kind in [
            "unknown_intent",
            "missed_status",
            "missed_transfer",
            "orphan_transfer",
            "unknown_at_provider",
        ] {
            self.reconcile_findings.with_label_values(&[kind]);
        }
        for outcome in ["ok", "failed"] {
            self.reconcile_listings.with_label_values(&[outcome]);
        }
        for change in ["gained", "released", "lost", "lapsed"] {
            self.shard_changes.with_label_values(&[change]);
        }
        for method in ["create_intent", "get_intent", "cancel_intent"] {
            self.rpc_requests.with_label_values(&[method, "ok"]);
        }
        // Refused at admission, before the method is read (alert PosgateTerminalThrottled).
        self.rpc_requests
            .with_label_values(&["any", "rate_limited"]);
        for reason in [
            "missing_header",
            "bad_timestamp",
            "stale",
            "bad_format",
            "mismatch",
            "no_secret",
        ] {
            self.signature_failures.with_label_values(&[reason]);
        }
        for outcome in [
            "bad_signature",
            "stale",
            "too_large",
            "malformed",
            "store_error",
        ] {
            self.webhooks.with_label_values(&["none", outcome]);
        }
        for event_type in [
            "payment_intent.confirmed",
            "payment_intent.expired",
            "payment_intent.cancelled",
            "transaction.created",
            "settlement.completed",
            "settlement.failed",
        ] {
            self.webhooks.with_label_values(&[event_type, "accepted"]);
        }
        self.secret_matches.with_label_values(&["0"]);
        self.transitions
            .with_label_values(&["awaiting_payment", "confirmed"]);
        for reason in [
            "identity",
            "no_certificate",
            "revoked",
            "last_will",
            "handshake",
            "first_packet",
            "replaced",
            "capacity",
            "suspended",
        ] {
            self.mqtt_refused.with_label_values(&[reason]);
        }
        for endpoint in crate::provider::ENDPOINTS {
            self.provider.requests.with_label_values(&[endpoint, "ok"]);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
