//! Terminal RPC: `create_intent`, `get_intent`, `cancel_intent` over the terminal's own MQTT
//! connection (`/tenants/{t}/rpc/req` → `/tenants/{t}/rpc/res`).
//!
//! The provider's secret API key stays on the gateway: terminals ask the gateway, which calls the
//! provider (with an idempotency key derived from the terminal's request id, so a retried request
//! never creates two intents), checks the `qr_payload` before any QR reaches a terminal, and
//! records the intent as that terminal's before answering. A terminal sees and acts on its own
//! intents only (another terminal's is "not found"). Every request gets an answer, never silence;
//! the answers of `create_intent` and `cancel_intent` are stored, so a retry with the same request
//! id gets the same answer (and never a second intent). A provider that cannot be
//! reached gives `provider_unavailable` ("unknown, checking"), never "failed", and nothing is
//! stored, so the retry goes to the provider again with the same idempotency key.
//!
//! Provider calls share one request budget with reconciliation (provider-api.md §2.6); a request
//! that finds it spent for longer than `provider.rpc_budget_wait_ms` is answered `rate_limited`
//! (not stored: the retry is a new try). A `409` on create (the idempotency key matched an earlier
//! request, §2.5) that carries that request's intent (ours: same terminal, order and amount) is
//! used like a `2xx`; any other `409` is answered `idempotency_conflict`: the outcome of the
//! earlier request is unknown, start a new attempt with a new request id. A `qr_payload` that
//! fails its EIP-681 check (§7) is never shown: the intent is kept (its history shows
//! `rpc.qr_rejected`) and cancelled at the provider, and the terminal is answered `qr_mismatch`.
//!
//! **Admission** ([`Rpc::admit`]), before a request costs anything: each terminal has its own
//! token bucket ([`RpcLimits`]) and a bound on its requests in flight; the excess is answered
//! `rate_limited` at once, with the time to wait, and never reaches the store or the provider.
//! Only answers that a retry must get again are stored (`create_intent`, `cancel_intent`, whose
//! effects happened); a validation error, an unknown method or a `get_intent` is answered afresh
//! on a retry, so a flood of bad requests writes nothing.

use prometheus::IntCounterVec;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use posgate_proto::MicroUsdc;
use posgate_proto::event::PaymentIntent;
use posgate_proto::event::{MAX_ID_BYTES, is_usable_id};
use posgate_proto::qr::{self, Mode};
use posgate_proto::rpc::{CreateIntent, IntentRef, MAX_ID_LEN, Request, Response};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::domain::IntentStatus;
use crate::provider::{ProviderClient, ProviderError};
use crate::reconcile::SNAPSHOT_KIND;
use crate::store::{Store, StoredIntent};

/// How much one terminal may ask.
#[derive(Clone, Copy, Debug)]
pub struct RpcLimits {
    /// Requests per second, sustained, per terminal.
    pub per_sec: u32,
    /// Requests at once above the sustained rate (the bucket's size).
    pub burst: u32,
    /// Requests of one terminal being answered at once.
    pub in_flight: usize,
    /// How long a terminal that keeps flooding ([`FLOOD_REFUSALS`] refusals within
    /// [`FLOOD_WINDOW`]) is disconnected and refused; `None`: never.
    pub flood_suspend: Option<Duration>,
}

/// Refusals within [`FLOOD_WINDOW`] that make a terminal a flooder: far more than a terminal
/// that merely retries too fast collects.
pub const FLOOD_REFUSALS: u32 = 100;
/// The window in which [`FLOOD_REFUSALS`] are counted.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// A request not let in: its `rate_limited` answer, and whether the terminal is to be
/// disconnected and refused for a while (it keeps flooding).
#[derive(Debug)]
pub struct Refused {
    pub response: Response,
    pub suspend: Option<Duration>,
}

impl Default for RpcLimits {
    fn default() -> Self {
        RpcLimits {
            per_sec: 5,
            burst: 20,
            in_flight: 4,
            flood_suspend: Some(Duration::from_secs(60)),
        }
    }
}

type Buckets = governor::DefaultKeyedRateLimiter<String>;

/// Refused requests are logged at most once a second (a flooding terminal must not flood the log).
static THROTTLED_LOG: crate::telemetry::Throttle =
    crate::telemetry::Throttle::new(Duration::from_secs(1));

/// A request admitted: holds one of its terminal's in-flight places until dropped.
pub struct Admitted {
    terminal_id: String,
    in_flight: std::sync::Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.terminal_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.terminal_id);
            }
        }
    }
}

/// The RPC service.
pub struct Rpc {
    store: Store,
    /// `None` when no API key is configured: every call answers `provider_unavailable`.
    provider: Option<(ProviderClient, Mode)>,
    /// When each open intent was last refreshed from the provider: a terminal that polls every
    /// few seconds must not spend the provider's rate limit.
    refreshed: Mutex<HashMap<String, Instant>>,
    /// `posgate_rpc_requests_total{method,outcome}` (`None` in tests that do not count).
    requests: Option<IntCounterVec>,
    limits: RpcLimits,
    buckets: Buckets,
    in_flight: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    /// Per terminal: when its current window of refusals started, and how many so far.
    refusals: Mutex<HashMap<String, (Instant, u32)>>,
}

/// How often stored answers older than the retention are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Answers removed per write, so that a prune never holds the store's writer for long.
const PRUNE_BATCH: usize = 10_000;

/// Removes stored answers older than `retention`, every `PRUNE_EVERY` (the first time a minute
/// after start), until `token` is cancelled.
pub async fn prune_answers(
    store: Store,
    retention: Duration,
    token: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval_at(Instant::now() + Duration::from_secs(60), PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = time::OffsetDateTime::now_utc()
            .checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let mut removed = 0;
        loop {
            match store.prune_rpc_answers(before, PRUNE_BATCH).await {
                Ok(n) => {
                    removed += n;
                    if n < PRUNE_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune old RPC answers; trying again later");
                    break;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "old RPC answers pruned");
        }
    }
}

/// An open intent is refreshed from the provider at most this often.
const REFRESH_EVERY: Duration = Duration::from_secs(30);

type Answer = Result<Value, (&'static str, String)>;

impl Rpc {
    /// The service; `provider` is `None` without an API key.
    pub fn new(store: Store, provider: Option<(ProviderClient, Mode)>) -> Rpc {
        Rpc::with_limits(store, provider, RpcLimits::default())
    }

    /// As [`Rpc::new`], with `limits` per terminal.
    pub fn with_limits(
        store: Store,
        provider: Option<(ProviderClient, Mode)>,
        limits: RpcLimits,
    ) -> Rpc {
        let per_sec =
            std::num::NonZeroU32::new(limits.per_sec).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(limits.burst).unwrap_or(per_sec);
        Rpc {
            store,
            provider,
            refreshed: Mutex::default(),
            requests: None,
            limits,
            buckets: governor::RateLimiter::keyed(
                governor::Quota::per_second(per_sec).allow_burst(burst),
            ),
            in_flight: std::sync::Arc::default(),
            refusals: Mutex::default(),
        }
    }

    /// Lets a request of `terminal_id` in, or answers it `rate_limited` at once (with the time
    /// to wait) when the terminal is over its rate or has too many requests in flight. Cheap: it
    /// reads only the request's id.
    ///
    /// # Errors
    /// The `rate_limited` answer to publish, and whether to disconnect the terminal.
    pub fn admit(&self, terminal_id: &str, payload: &[u8]) -> Result<Admitted, Refused> {
        let refuse = |wait: Duration, why: &str| {
            #[derive(serde::Deserialize)]
            struct IdOnly {
                #[serde(default)]
                id: String,
            }
            let id = serde_json::from_slice::<IdOnly>(payload)
                .map(|r| r.id)
                .unwrap_or_default();
            if let Some(requests) = &self.requests {
                requests.with_label_values(&["any", "rate_limited"]).inc();
            }
            if let Some(left_out) = THROTTLED_LOG.allow() {
                tracing::warn!(%terminal_id, reason = why, left_out, "RPC refused: too many requests (at most one line a second)");
            }
            let retry_ms = wait.as_millis().max(1);
            let mut response = Response::err(
                &id,
                "rate_limited",
                format!("{why}; retry in {retry_ms} ms"),
            );
            response.result = Some(json!({ "retry_after_ms": retry_ms as u64 }));
            Err(Refused {
                response,
                suspend: self.flooding(terminal_id),
            })
        };
        if let Err(not_until) = self.buckets.check_key(&terminal_id.to_owned()) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return refuse(wait, "too many requests from this terminal");
        }
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(terminal_id.to_owned()).or_insert(0);
        if *n >= self.limits.in_flight {
            drop(map);
            return refuse(
                Duration::from_millis(500),
                "too many requests of this terminal in flight",
            );
        }
        *n += 1;
        Ok(Admitted {
            terminal_id: terminal_id.to_owned(),
            in_flight: self.in_flight.clone(),
        })
    }

    /// Counts a refusal of `terminal_id`; `Some(how long)` once it reaches [`FLOOD_REFUSALS`]
    /// within [`FLOOD_WINDOW`] (then the count starts again).
    fn flooding(&self, terminal_id: &str) -> Option<Duration> {
        let suspend = self.limits.flood_suspend?;
        let now = Instant::now();
        let mut map = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Old windows go, so the map holds only terminals refused lately.
        if map.len() > 1024 {
            map.retain(|_, (since, _)| now.duration_since(*since) < FLOOD_WINDOW);
        }
        let (since, count) = map.entry(terminal_id.to_owned()).or_insert((now, 0));
        if now.duration_since(*since) >= FLOOD_WINDOW {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        if *count < FLOOD_REFUSALS {
            return None;
        }
        map.remove(terminal_id);
        drop(map);
        tracing::warn!(%terminal_id, refused = FLOOD_REFUSALS, within = ?FLOOD_WINDOW, suspended_for = ?suspend, "terminal keeps flooding RPC: disconnected and refused for a while");
        Some(suspend)
    }

    /// Whether `intent_id` may be refreshed now (and notes that it is).
    fn may_refresh(&self, intent_id: &str) -> bool {
        let Ok(mut map) = self.refreshed.lock() else {
            return false;
        };
        let now = Instant::now();
        map.retain(|_, at| now.duration_since(*at) < REFRESH_EVERY);
        if map.contains_key(intent_id) {
            return false;
        }
        map.insert(intent_id.to_owned(), now);
        true
    }

    /// Counts every answer in `requests` (`{method, outcome}`).
    pub fn with_metrics(mut self, requests: IntCounterVec) -> Rpc {
        self.requests = Some(requests);
        self
    }

    /// Answers one request from `terminal_id`.
    pub async fn handle(&self, terminal_id: &str, payload: &[u8]) -> Response {
        let (method, replayed, response) = self.answer(terminal_id, payload).await;
        if let Some(requests) = &self.requests {
            let outcome = match (&response.error, replayed) {
                (_, true) => "replayed",
                (None, false) => "ok",
                (Some(e), false) => e.code.as_str(),
            };
            requests.with_label_values(&[method, outcome]).inc();
        }
        response
    }

    /// The answer, with the method for the metric (one of ours, never the terminal's string) and
    /// whether it was replayed from the store.
    async fn answer(&self, terminal_id: &str, payload: &[u8]) -> (&'static str, bool, Response) {
        let request: Request = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                // Echo the id if there is one, so the terminal can match the error.
                let id = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned));
                let response = Response::err(
                    &id.unwrap_or_default(),
                    "invalid_request",
                    format!("not an RPC request: {e}"),
                );
                return ("other", false, response);
            }
        };
        let method = match request.method.as_str() {
            "create_intent" => "create_intent",
            "get_intent" => "get_intent",
            "cancel_intent" => "cancel_intent",
            _ => "other",
        };
        // The id is a store key (the stored answer's): no control characters (see
        // `is_usable_id`).
        if !is_usable_id(&request.id, MAX_ID_LEN) {
            let response = Response::err(
                &request.id,
                "invalid_request",
                format!("id must be 1 to {MAX_ID_LEN} bytes without control characters"),
            );
            return (method, false, response);
        }
        // A revoked terminal is refused here too, not only at CONNECT: a session that connected
        // just before its revocation (and that the kick missed) gets nothing done.
        match self.store.terminal(terminal_id.to_owned()).await {
            Ok(Some(t)) if t.revoked_at.is_none() => {}
            Ok(_) => {
                let response = Response::err(
                    &request.id,
                    "unauthorized",
                    "this terminal is not registered or is revoked",
                );
                return (method, false, response);
            }
            Err(e) => {
                let response = Response::err(&request.id, "unavailable", format!("store: {e}"));
                return (method, false, response);
            }
        }
        match self
            .store
            .rpc_answer(terminal_id.to_owned(), request.id.clone())
            .await
        {
            Ok(Some(answer)) => {
                let response = serde_json::from_value(answer).unwrap_or_else(|_| {
                    Response::err(&request.id, "internal", "stored answer unreadable")
                });
                return (method, true, response);
            }
            Ok(None) => {}
            Err(e) => {
                let response = Response::err(&request.id, "unavailable", format!("store: {e}"));
                return (method, false, response);
            }
        }
        let (answer, created) = match request.method.as_str() {
            "create_intent" => self.create(terminal_id, &request).await,
            "get_intent" => (self.get(terminal_id, &request).await, None),
            "cancel_intent" => (self.cancel(terminal_id, &request).await, None),
            other => (
                Err(("unknown_method", format!("unknown method {other:?}"))),
                None,
            ),
        };
        let response = match answer {
            Ok(result) => Response::ok(&request.id, result),
            Err((code, message)) => Response::err(&request.id, code, message),
        };
        // A transient failure is not an answer: the retry must reach the provider again. And only
        // answers with an effect must be replayed: a bad request or a read is answered afresh,
        // so a flood of them writes nothing.
        let transient = response.error.as_ref().is_some_and(|e| {
            e.code == "provider_unavailable" || e.code == "unavailable" || e.code == "rate_limited"
        });
        let has_effect = matches!(method, "create_intent" | "cancel_intent")
            && response
                .error
                .as_ref()
                .is_none_or(|e| !matches!(e.code.as_str(), "invalid_params" | "not_found"));
        if !transient && has_effect {
            let value = serde_json::to_value(&response).unwrap_or_default();
            if let Err(e) = self
                .store
                .save_rpc_answer(terminal_id.to_owned(), request.id.clone(), created, value)
                .await
            {
                tracing::warn!(%terminal_id, request_id = %request.id, error = %e, "RPC answer not stored");
                let response = Response::err(
                    &request.id,
                    "unavailable",
                    "the gateway could not record the answer; retry",
                );
                return (method, false, response);
            }
        }
        (method, false, response)
    }

    /// The provider client for calls `terminal_id` asked for (they spend its share of the
    /// budget), and the QR mode.
    fn client(&self, terminal_id: &str) -> Result<(ProviderClient, Mode), (&'static str, String)> {
        let (client, mode) = self.provider.as_ref().ok_or((
            "provider_unavailable",
            "the gateway has no provider API key configured".into(),
        ))?;
        Ok((client.for_terminal(terminal_id), *mode))
    }

    async fn create(
        &self,
        terminal_id: &str,
        request: &Request,
    ) -> (Answer, Option<PaymentIntent>) {
        let params: CreateIntent = match serde_json::from_value(request.params.clone()) {
            Ok(p) => p,
            Err(e) => return (Err(("invalid_params", e.to_string())), None),
        };
        let amount = match Decimal::from_str(params.amount.trim())
            .ok()
            .and_then(|d| MicroUsdc::try_from(d).ok())
        {
            Some(a) if a.0 % 10_000 == 0 && (10_000..=10_000_000_000).contains(&a.0) => a,
            _ => {
                return (
                    Err((
                        "invalid_params",
                        "amount: a decimal string, whole cents, 0.01 to 10000".into(),
                    )),
                    None,
                );
            }
        };
        if !is_usable_id(&params.order_id, 64) {
            return (
                Err((
                    "invalid_params",
                    "order_id: 1 to 64 bytes without control characters".into(),
                )),
                None,
            );
        }
        if params.ttl.is_some_and(|t| !(60..=3600).contains(&t)) {
            return (
                Err(("invalid_params", "ttl: 60 to 3600 seconds".into())),
                None,
            );
        }
        let (client, mode) = match self.client(terminal_id) {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        };
        let merchant_id = match self.store.terminal(terminal_id.to_owned()).await {
            Ok(Some(t)) => t.merchant_id,
            Ok(None) => return (Err(("not_found", "unknown terminal".into())), None),
            Err(e) => return (Err(("unavailable", format!("store: {e}"))), None),
        };
        let idempotency_key = idempotency_key(terminal_id, &request.id);
        let mut body = json!({
            "amount": cents_number(amount),
            "currency": "usd",
            "merchant_id": merchant_id,
            "idempotency_key": idempotency_key,
            "metadata": {"terminal_id": terminal_id, "order_id": params.order_id},
        });
        if let Some(ttl) = params.ttl {
            body["ttl"] = json!(ttl);
        }
        let raw = match client.create_intent(&body).await {
            Ok(raw) => raw,
            // The key matched an earlier request (provider-api.md §2.5).
            Err(ProviderError::Status {
                status: 409,
                body: answer,
                code,
                ..
            }) => match original_intent(&answer, terminal_id, &params.order_id, amount) {
                Some(raw) => {
                    tracing::info!(%terminal_id, %idempotency_key, "409 with the original intent: using it");
                    raw
                }
                None => {
                    tracing::warn!(%terminal_id, %idempotency_key, code = code.as_deref().unwrap_or("-"),
                        "409: the idempotency key was already used and the original intent is not in the answer; the earlier request's outcome is unknown");
                    return (
                        Err((
                            "idempotency_conflict",
                            "the provider already holds another request under this request id; \
                             its outcome is unknown: start a new attempt with a new request id"
                                .into(),
                        )),
                        None,
                    );
                }
            },
            Err(e) => return (Err(provider_error(&e)), None),
        };
        let pi: PaymentIntent = match serde_json::from_slice(&raw) {
            Ok(pi) => pi,
            Err(e) => {
                return (
                    Err((
                        "provider_unavailable",
                        format!("unreadable answer from the provider: {e}"),
                    )),
                    None,
                );
            }
        };
        let qr_payload = pi.qr_payload.clone().unwrap_or_default();
        let address = pi.payment_address.clone().unwrap_or_default();
        if let Err(e) = qr::check(&qr_payload, mode, &address, amount) {
            tracing::error!(%terminal_id, intent_id = %pi.id, error = %e, "the provider's qr_payload failed its check; no QR shown, cancelling the intent");
            // No open intent may stay behind at the provider: cancel it, and keep what it says
            // (the intent is stored, its history shows the rejection).
            let outcome = match cancel_or_read(&client, &pi.id).await {
                Ok(raw) => match self
                    .store
                    .ingest_snapshot(raw, QR_REJECTED, Some(&pi.id))
                    .await
                {
                    Ok((snapshot, _)) => format!("it is {} at the provider", snapshot.status),
                    Err(e) => {
                        tracing::error!(intent_id = %pi.id, error = %e, "recording the cancelled intent failed");
                        "it was cancelled at the provider".into()
                    }
                },
                Err(cancel) => {
                    tracing::error!(intent_id = %pi.id, error = %cancel, "cancelling an intent with a bad qr_payload failed; it expires on its own");
                    "cancelling it failed; it expires on its own".into()
                }
            };
            return (
                Err((
                    "qr_mismatch",
                    format!(
                        "the payment request for {} failed its check ({e}); {outcome}",
                        pi.id
                    ),
                )),
                Some(pi),
            );
        }
        let expires_at = pi.expires_at.and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
        let result = json!({
            "intent_id": pi.id,
            "qr_payload": qr_payload,
            "amount": amount.to_string(),
            "expires_at": expires_at,
        });
        (Ok(result), Some(pi))
    }

    /// The caller's own intent, or "not found".
    async fn own(
        &self,
        terminal_id: &str,
        request: &Request,
    ) -> Result<StoredIntent, (&'static str, String)> {
        let params: IntentRef = serde_json::from_value(request.params.clone())
            .map_err(|e| ("invalid_params", e.to_string()))?;
        if !is_usable_id(&params.intent_id, MAX_ID_BYTES) {
            return Err((
                "invalid_params",
                format!("intent_id: 1 to {MAX_ID_BYTES} bytes without control characters"),
            ));
        }
        match self.store.intent(params.intent_id.clone()).await {
            Ok(Some(i)) if i.record.terminal_id.as_deref() == Some(terminal_id) => Ok(i),
            Ok(_) => Err((
                "not_found",
                format!("no intent {} for this terminal", params.intent_id),
            )),
            Err(e) => Err(("unavailable", format!("store: {e}"))),
        }
    }

    async fn get(&self, terminal_id: &str, request: &Request) -> Answer {
        let mut intent = self.own(terminal_id, request).await?;
        // Still open: the webhooks may have missed something (the guide's reboot case); ask.
        if intent.record.status == IntentStatus::AwaitingPayment
            && let Ok((client, _)) = self.client(terminal_id)
            && self.may_refresh(&intent.record.id)
        {
            match client.get_intent(&intent.record.id).await {
                Ok(raw) => {
                    if self
                        .store
                        .ingest_snapshot(raw, SNAPSHOT_KIND, Some(&intent.record.id))
                        .await
                        .is_ok()
                    {
                        intent = self.own(terminal_id, request).await?;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "refresh from the provider failed; answering from the store")
                }
            }
        }
        Ok(view(&intent))
    }

    async fn cancel(&self, terminal_id: &str, request: &Request) -> Answer {
        let intent = self.own(terminal_id, request).await?;
        let (client, _) = self.client(terminal_id)?;
        let raw = cancel_or_read(&client, &intent.record.id)
            .await
            .map_err(|e| provider_error(&e))?;
        self.store
            .ingest_snapshot(raw, SNAPSHOT_KIND, Some(&intent.record.id))
            .await
            .map_err(|e| ("unavailable", e.to_string()))?;
        let intent = self.own(terminal_id, request).await?;
        Ok(view(&intent))
    }
}

/// The kind under which the snapshot of an intent cancelled for a bad `qr_payload` is kept.
const QR_REJECTED: &str = "rpc.qr_rejected";

/// Cancels an intent; when it is no longer awaiting payment (perhaps paid a moment ago), reads
/// what it is instead. Either way, the intent object.
async fn cancel_or_read(client: &ProviderClient, id: &str) -> Result<bytes::Bytes, ProviderError> {
    match client.cancel_intent(id).await {
        Err(ProviderError::Status {
            status: 400 | 409, ..
        }) => client.get_intent(id).await,
        other => other,
    }
}

/// The idempotency key of a create: `posgate:{terminal_id}:{request_id}`, or, when that is longer
/// than 64 characters, `posgate:` and a SHA-256 prefix of it (truncating instead could give two
/// different requests the same key).
fn idempotency_key(terminal_id: &str, request_id: &str) -> String {
    let key = format!("posgate:{terminal_id}:{request_id}");
    if key.len() <= 64 {
        return key;
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("posgate:{}", &digest[..56])
}

/// The intent in a 409's body, when it is the one this request would have created: an object
/// with `"object":"payment_intent"` for this terminal, order and amount (provider-api.md §2.5).
fn original_intent(
    body: &bytes::Bytes,
    terminal_id: &str,
    order_id: &str,
    amount: MicroUsdc,
) -> Option<bytes::Bytes> {
    let value: Value = serde_json::from_slice(body).ok()?;
    if value["object"] != "payment_intent" {
        return None;
    }
    let pi: PaymentIntent = serde_json::from_value(value).ok()?;
    let meta = pi.metadata.as_ref()?;
    let ours = meta.get("terminal_id").and_then(Value::as_str) == Some(terminal_id)
        && meta.get("order_id").and_then(Value::as_str) == Some(order_id)
        && pi.amount == amount;
    ours.then(|| body.clone())
}

fn provider_error(e: &ProviderError) -> (&'static str, String) {
    match e {
        ProviderError::Budget { source, .. } => (
            "rate_limited",
            format!(
                "the gateway's request budget at the provider is spent; retry in {} s",
                source.retry_after.as_secs().max(1)
            ),
        ),
        ProviderError::Status { status, code, .. }
            if (400..500).contains(status) && *status != 429 =>
        {
            (
                "rejected",
                format!(
                    "the provider refused the request ({status}, {})",
                    code.as_deref().unwrap_or("no code")
                ),
            )
        }
        _ => (
            "provider_unavailable",
            "the provider could not be reached; the outcome is unknown, checking".into(),
        ),
    }
}

/// A JSON number with exactly two decimals (`4.50`), as the provider's create expects.
fn cents_number(amount: MicroUsdc) -> Value {
    let cents = amount.0 / 10_000;
    format!("{}.{:02}", cents / 100, cents % 100)
        .parse::<serde_json::Number>()
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// What a terminal sees of its intent.
fn view(intent: &StoredIntent) -> Value {
    let r = &intent.record;
    json!({
        "intent_id": r.id,
        "status": r.status.as_str(),
        "context": r.primary_context(),
        "amount": r.expected_micros.to_string(),
        "received": r.received_micros.to_string(),
        "order_id": r.order_id,
        "expires_at": r.expires_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{Kind, TestDb, on_both_backends};

    on_both_backends!(a_revoked_terminal_is_refused);

    /// RPC from a revoked terminal (a session that connected just before its revocation) is
    /// refused, not served: it used to be answered like any other.
    async fn a_revoked_terminal_is_refused(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(crate::store::Limits::new(16, 16)).await;
        crate::store::testing::register(&store, "pos-r").await;
        let rpc = Rpc::new(store.clone(), None);
        let request = br#"{"id":"r1","method":"get_intent","params":{"intent_id":"pi_x"}}"#;
        let before = rpc.handle("pos-r", request).await;
        assert_eq!(before.error.unwrap().code, "not_found");
        store.revoke_terminal("pos-r".into()).await.unwrap();
        let after = rpc.handle("pos-r", request).await;
        assert_eq!(after.error.unwrap().code, "unauthorized");
        let unknown = rpc.handle("pos-nobody", request).await;
        assert_eq!(unknown.error.unwrap().code, "unauthorized");
        store.close().await;
    }

    on_both_backends!(ids_with_control_characters_are_refused_before_the_store);

    /// A request id or intent id with a NUL is refused as the terminal's mistake; it never
    /// reaches the store (PostgreSQL's `text` cannot hold a NUL: the lookup failed, answered
    /// `unavailable`, and the answer's write would have failed its batch).
    async fn ids_with_control_characters_are_refused_before_the_store(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(crate::store::Limits::new(16, 16)).await;
        crate::store::testing::register(&store, "pos-n").await;
        let rpc = Rpc::new(store.clone(), None);
        let nul_id = br#"{"id":"r\u0000","method":"get_intent","params":{"intent_id":"pi_x"}}"#;
        assert_eq!(
            rpc.handle("pos-n", nul_id).await.error.unwrap().code,
            "invalid_request"
        );
        let nul_intent = br#"{"id":"r2","method":"get_intent","params":{"intent_id":"pi_\u0000"}}"#;
        assert_eq!(
            rpc.handle("pos-n", nul_intent).await.error.unwrap().code,
            "invalid_params"
        );
        let fine = br#"{"id":"r3","method":"get_intent","params":{"intent_id":"pi_x"}}"#;
        assert_eq!(
            rpc.handle("pos-n", fine).await.error.unwrap().code,
            "not_found"
        );
        store.close().await;
    }

    #[test]
    fn long_idempotency_keys_are_hashed_not_truncated() {
        assert_eq!(idempotency_key("pos-1", "r1"), "posgate:pos-1:r1");
        let terminal = "store-0012-lane-0003-terminal-with-a-long-name";
        let a = idempotency_key(terminal, "request-0000000000000000000000000000001");
        let b = idempotency_key(terminal, "request-0000000000000000000000000000002");
        assert_ne!(a, b);
        assert_eq!((a.len(), b.len()), (64, 64));
        assert!(a.starts_with("posgate:"));
        assert_eq!(
            a,
            idempotency_key(terminal, "request-0000000000000000000000000000001")
        );
    }

    #[test]
    fn a_409_body_is_used_only_when_it_is_our_intent() {
        let intent = |terminal: &str, order: &str, amount: &str| {
            bytes::Bytes::from(format!(
                r#"{{"id":"pi_1","object":"payment_intent","status":"awaiting_payment","amount":{amount},"metadata":{{"terminal_id":"{terminal}","order_id":"{order}"}}}}"#
            ))
        };
        let amount = MicroUsdc(4_500_000);
        let ours = intent("pos-1", "ord-1", "4.50");
        assert_eq!(original_intent(&ours, "pos-1", "ord-1", amount), Some(ours));
        for other in [
            intent("pos-2", "ord-1", "4.50"),
            intent("pos-1", "ord-2", "4.50"),
            intent("pos-1", "ord-1", "4.40"),
            bytes::Bytes::from_static(
                br#"{"error":{"type":"idempotency_error","code":"idempotency_key_reused"}}"#,
            ),
            bytes::Bytes::from_static(br#"{"object":"transaction","id":"txn_1"}"#),
            bytes::Bytes::new(),
        ] {
            assert_eq!(original_intent(&other, "pos-1", "ord-1", amount), None);
        }
    }
}
