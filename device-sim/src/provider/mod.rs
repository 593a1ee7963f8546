//! The payment provider simulator (`posgate-sim provider`): Stable Genius as the gateway sees it.
//!
//! It speaks the provider's REST API under `http://ADDR/v1` (provider-api.md §2: create, get and
//! cancel payment intents with body-field idempotency keys, list and get transactions), and delivers
//! every event it emits as a signed webhook (§3, §4) on the provider's retry schedule (§5), each
//! attempt re-signed with a fresh timestamp. A control surface makes "the customer pay"
//! (`POST /_sim/pay/{intent_id}`, interfaces.md) and exposes counters (`GET /_sim/stats`).
//!
//! Every provider delay is multiplied by `time_scale`: the on-chain confirmation delay, `ttl` (so
//! `expires_at` too), and the retry schedule. Request timeouts, the rate-limit minute and the 24 h
//! idempotency window are not provider delays and are not scaled.
//!
//! Faults (§9) are probabilities per event, or switches: duplicate deliveries (also simultaneous
//! identical ones), reordering, drops (never delivered), stale-timestamp copies, bad and empty
//! signatures, secret-rotation overlap; on the REST side injected 5xx and 429.
//!
//! Tests and the demo start it in-process with [`ProviderSim::start`] and drive it through the
//! returned [`RunningProvider`]; the binary wraps the same calls.
//!
//! - `model`: the objects and their rules (ids, amounts, `qr_payload`, validation, idempotency).
//! - `delivery`: webhook sending, retries, faults and their counters.
//! - `api`: the axum routes (`/v1/…` and `/_sim/…`).

mod api;
pub mod delivery;
pub mod model;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use posgate_proto::MicroUsdc;
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use delivery::{
    Attempt, AttemptKind, DeliveryRecord, DeliveryState, DeliveryStats, Outcome, Outcomes,
    RETRY_SCHEDULE,
};
pub use model::{CreateRequest, Mode};

use self::delivery::{Deliverer, Event};
use self::model::{IdempotencyKeys, Intent, IntentStatus, Payment, Replay, Transaction};
use crate::events;

/// `d` multiplied by `time_scale` (a non-finite or negative product is zero; a huge one saturates).
pub fn scaled(d: Duration, time_scale: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * time_scale).unwrap_or(if time_scale > 1.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

/// The provider's clock, injectable so that tests can sign at a fixed timestamp.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> OffsetDateTime + Send + Sync>);

impl Clock {
    /// The system clock (UTC).
    pub fn system() -> Clock {
        Clock(Arc::new(OffsetDateTime::now_utc))
    }

    /// A clock that asks `now`.
    pub fn from_fn(now: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    /// A clock that always says `at`.
    pub fn fixed(at: OffsetDateTime) -> Clock {
        Clock(Arc::new(move || at))
    }

    /// Now, by this clock.
    pub fn now(&self) -> OffsetDateTime {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Webhook faults. Rates are probabilities per event, from 0.0 to 1.0.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Send a delivery twice (the copy re-signed after the first was answered, or, with
    /// `simultaneous_duplicates`, two identical requests at the same instant).
    pub duplicate_rate: f64,
    /// Send duplicates at the same instant with identical headers.
    pub simultaneous_duplicates: bool,
    /// Hold events back for `reorder_window` and send them shuffled.
    pub reorder: bool,
    /// Never deliver the event, as if every attempt had failed.
    pub drop_rate: f64,
    /// First send a correctly signed copy with a timestamp 400 s old (must be refused).
    pub stale_rate: f64,
    /// First send a copy signed with a wrong secret (must be refused).
    pub bad_signature_rate: f64,
    /// First send a copy with `sha256=` and nothing after it (must be refused).
    pub empty_signature_rate: f64,
    /// With two or more secrets: sign some retries and duplicates with an older secret.
    pub rotate_secret: bool,
}

/// REST faults.
#[derive(Clone, Debug, Default)]
pub struct ApiFaults {
    /// Probability that a `/v1` request is answered 500/502/503 before it does anything.
    pub fail_rate: f64,
    /// Probability that a create is answered 500 **after** the intent was created (the client must
    /// retry with the same idempotency key and get the same intent).
    pub fail_after_rate: f64,
    /// Answer 429 beyond this many `/v1` requests per minute (all keys together).
    pub rate_limit_per_minute: Option<u32>,
    /// Send `Retry-After` with a 429 (the provider does not document it, so off by default).
    pub retry_after: bool,
    /// Answer a create that repeats an idempotency key with the same body `409` with the original
    /// intent as the body, instead of `200` (provider-api.md §2.5: what a real 409 carries is
    /// undocumented; a different body is always a `409` with an error body).
    pub replay_409: bool,
    /// Intent objects carry a `qr_payload` for the wrong chain (Ethereum mainnet, `@1`), which
    /// the gateway's EIP-681 check must refuse (provider-api.md §7).
    pub bad_qr: bool,
}

/// How to start a [`ProviderSim`].
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// Where webhooks go (the gateway's `/webhooks/stablegenius`).
    pub webhook_url: String,
    /// Webhook secrets: the last one is current; earlier ones are older (rotation overlap).
    pub webhook_secrets: Vec<SecretString>,
    /// The only accepted API key; `None` accepts any `sk_test_…` or `sk_live_…` key.
    pub api_key: Option<SecretString>,
    /// Multiplies every provider delay (confirmation, ttl, retries). 1.0 is real time.
    pub time_scale: f64,
    /// The on-chain confirmation delay before a payment's events, unscaled (default 3 s).
    pub confirm_delay: Duration,
    /// Timeout of one webhook POST (the provider's 5 s), not scaled.
    pub delivery_timeout: Duration,
    /// How long `reorder` holds events back, not scaled.
    pub reorder_window: Duration,
    /// How long an idempotency key is honoured (24 h), not scaled.
    pub idempotency_window: Duration,
    /// The merchant of transfers to unknown addresses.
    pub merchant_id: String,
    /// Webhook faults.
    pub faults: Faults,
    /// REST faults.
    pub api_faults: ApiFaults,
    /// The provider's clock.
    pub clock: Clock,
}

impl ProviderConfig {
    /// Defaults: listen on `127.0.0.1:0`, real time, no faults, any test or live key.
    pub fn new(webhook_url: impl Into<String>, webhook_secret: impl Into<String>) -> Self {
        ProviderConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            webhook_url: webhook_url.into(),
            webhook_secrets: vec![SecretString::from(webhook_secret.into())],
            api_key: None,
            time_scale: 1.0,
            confirm_delay: Duration::from_secs(3),
            delivery_timeout: Duration::from_secs(5),
            reorder_window: Duration::from_millis(500),
            idempotency_window: Duration::from_secs(24 * 60 * 60),
            merchant_id: "mer_sim".into(),
            faults: Faults::default(),
            api_faults: ApiFaults::default(),
            clock: Clock::system(),
        }
    }

    /// Checks rates, the time scale and the secrets.
    ///
    /// # Errors
    /// A message naming the first bad setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.time_scale.is_finite() || !(0.0..=1000.0).contains(&self.time_scale) {
            bail!("time scale must be from 0 to 1000, not {}", self.time_scale);
        }
        let f = &self.faults;
        let a = &self.api_faults;
        for (name, rate) in [
            ("duplicate rate", f.duplicate_rate),
            ("drop rate", f.drop_rate),
            ("stale rate", f.stale_rate),
            ("bad signature rate", f.bad_signature_rate),
            ("empty signature rate", f.empty_signature_rate),
            ("fail rate", a.fail_rate),
            ("fail-after rate", a.fail_after_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                bail!("{name} must be from 0.0 to 1.0, not {rate}");
            }
        }
        if self.webhook_secrets.is_empty() {
            bail!("at least one webhook secret is needed");
        }
        if f.rotate_secret && self.webhook_secrets.len() < 2 {
            bail!("rotating the secret needs two webhook secrets (old, then new)");
        }
        if !self.merchant_id.starts_with("mer_") {
            bail!("merchant id must start with mer_");
        }
        Ok(())
    }
}

/// A provider error, answered as `{"error":{"type","message","param","code"}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.type`: `invalid_request_error`, `authentication_error`, `idempotency_error`,
    /// `rate_limit_error`, `api_error`.
    pub kind: &'static str,
    /// `error.code`, stable.
    pub code: String,
    /// `error.message`, for people.
    pub message: String,
    /// `error.param`, the offending parameter.
    pub param: Option<String>,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn invalid(param: &str, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: code.into(),
            message: message.into(),
            param: (!param.is_empty()).then(|| param.to_owned()),
        }
    }

    fn not_found(param: &str, what: &str) -> ApiError {
        ApiError {
            status: 404,
            kind: "invalid_request_error",
            code: "resource_missing".into(),
            message: format!("no such {what}"),
            param: Some(param.into()),
        }
    }

    fn other(status: u16, kind: &'static str, code: &str, message: &str) -> ApiError {
        ApiError {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "type": self.kind,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

/// What a scripted payment will do.
#[derive(Clone, Debug, Serialize)]
pub struct PayReceipt {
    /// The intent paid, if the address belongs to one.
    pub intent_id: Option<String>,
    /// The transfer that will appear.
    pub transaction_id: String,
    /// The amount sent.
    pub amount: String,
    /// Integer micro-USDC sent.
    pub amount_micros: u64,
    /// Whether it is confirmed after `expires_at`.
    pub late: bool,
}

/// Everything counted: webhooks and REST.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Webhook events, attempts, faults.
    #[serde(flatten)]
    pub delivery: DeliveryStats,
    /// REST side.
    pub api: ApiStats,
}

/// REST counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApiStats {
    /// `/v1` requests received.
    pub requests: u64,
    /// Answered 401.
    pub unauthorized: u64,
    /// Answered 429.
    pub rate_limited: u64,
    /// Answered with an injected 5xx.
    pub injected_failures: u64,
    /// Intents created.
    pub intents_created: u64,
    /// Creates answered from an idempotency key.
    pub idempotent_replays: u64,
    /// Creates refused 409 (same key, different body).
    pub idempotency_conflicts: u64,
    /// Transfers made (scripted payments).
    pub transactions: u64,
}

#[derive(Default)]
struct ApiCounters {
    requests: AtomicU64,
    unauthorized: AtomicU64,
    rate_limited: AtomicU64,
    injected_failures: AtomicU64,
    intents_created: AtomicU64,
    idempotent_replays: AtomicU64,
    idempotency_conflicts: AtomicU64,
    transactions: AtomicU64,
}

impl ApiCounters {
    fn snapshot(&self) -> ApiStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ApiStats {
            requests: get(&self.requests),
            unauthorized: get(&self.unauthorized),
            rate_limited: get(&self.rate_limited),
            injected_failures: get(&self.injected_failures),
            intents_created: get(&self.intents_created),
            idempotent_replays: get(&self.idempotent_replays),
            idempotency_conflicts: get(&self.idempotency_conflicts),
            transactions: get(&self.transactions),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct State {
    intents: HashMap<String, Intent>,
    /// When each intent expires, on tokio's clock (for `late` payments).
    deadlines: HashMap<String, tokio::time::Instant>,
    by_address: HashMap<String, String>,
    /// In creation order.
    transactions: Vec<Transaction>,
    idempotency: IdempotencyKeys,
    /// Start of the current rate-limit minute and the requests in it.
    window: Option<(tokio::time::Instant, u32)>,
    block_number: u64,
}

/// What the API, the control endpoints and the handle share.
pub(crate) struct Core {
    config: ProviderConfig,
    api_base: String,
    state: Mutex<State>,
    deliverer: Arc<Deliverer>,
    counters: ApiCounters,
    token: CancellationToken,
    tracker: TaskTracker,
}

fn poisoned() -> ApiError {
    ApiError::other(500, "api_error", "internal", "simulator state is poisoned")
}

// === impl Core ===

impl Core {
    fn now(&self) -> OffsetDateTime {
        self.config.clock.now()
    }

    fn scaled(&self, d: Duration) -> Duration {
        scaled(d, self.config.time_scale)
    }

    /// Auth, rate limit and injected failures for one `/v1` request; returns the key's mode.
    fn gate(&self, authorization: Option<&str>) -> Result<Mode, ApiError> {
        bump(&self.counters.requests);
        let key = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let accepted = match &self.config.api_key {
            Some(k) => secrecy::ExposeSecret::expose_secret(k) == key,
            None => true,
        };
        let mode = Mode::of_key(key).filter(|_| accepted);
        let Some(mode) = mode else {
            bump(&self.counters.unauthorized);
            return Err(ApiError::other(
                401,
                "authentication_error",
                "invalid_api_key",
                "invalid API key",
            ));
        };
        if let Some(limit) = self.config.api_faults.rate_limit_per_minute {
            let mut state = self.state.lock().map_err(|_| poisoned())?;
            let now = tokio::time::Instant::now();
            let (start, count) = match state.window {
                Some((start, count)) if now.duration_since(start) < Duration::from_secs(60) => {
                    (start, count)
                }
                _ => (now, 0),
            };
            state.window = Some((start, count.saturating_add(1)));
            if count >= limit {
                bump(&self.counters.rate_limited);
                return Err(ApiError::other(
                    429,
                    "rate_limit_error",
                    "rate_limited",
                    "too many requests",
                ));
            }
        }
        let fail = rand::rng().random_bool(self.config.api_faults.fail_rate);
        if fail {
            bump(&self.counters.injected_failures);
            let status = *[500, 502, 503].choose(&mut rand::rng()).unwrap_or(&500);
            return Err(ApiError::other(
                status,
                "api_error",
                "injected_failure",
                "the simulator failed this request on purpose",
            ));
        }
        Ok(mode)
    }

    /// `POST /v1/payment-intents`: `(201 | 200, intent)`.
    fn create(self: &Arc<Self>, mode: Mode, body: &Value) -> Result<(u16, Value), ApiError> {
        let request = CreateRequest::parse(body)?;
        let now = self.now();
        let window = time::Duration::try_from(self.config.idempotency_window)
            .unwrap_or(time::Duration::days(1));
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        match state.idempotency.check(&request, now, window) {
            Replay::Same(id) => {
                bump(&self.counters.idempotent_replays);
                let intent = state
                    .intents
                    .get(&id)
                    .ok_or_else(|| ApiError::not_found("id", "payment intent"))?;
                let status = if self.config.api_faults.replay_409 {
                    409
                } else {
                    200
                };
                return Ok((status, self.object(intent)));
            }
            Replay::Conflict => {
                bump(&self.counters.idempotency_conflicts);
                return Err(ApiError {
                    status: 409,
                    kind: "idempotency_error",
                    code: "idempotency_key_reused".into(),
                    message: "idempotency_key was already used with a different request".into(),
                    param: Some("idempotency_key".into()),
                });
            }
            Replay::New => {}
        }
        let ttl = self.scaled(Duration::from_secs(request.ttl_secs));
        let id = model::new_id("pi_");
        let address = model::random_address();
        let intent = Intent {
            id: id.clone(),
            mode,
            amount: request.amount,
            merchant_id: request.merchant_id.clone(),
            metadata: request.metadata.clone(),
            payment_address: address.clone(),
            status: IntentStatus::AwaitingPayment,
            created_at: now,
            expires_at: now + ttl,
            payment: None,
            api_base: self.api_base.clone(),
        };
        let object = self.object(&intent);
        state.idempotency.remember(&request, &id, now);
        state
            .by_address
            .insert(address.to_ascii_lowercase(), id.clone());
        state
            .deadlines
            .insert(id.clone(), tokio::time::Instant::now() + ttl);
        state.intents.insert(id.clone(), intent);
        drop(state);
        bump(&self.counters.intents_created);
        let core = Arc::clone(self);
        let token = self.token.clone();
        let expiring = id.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = tokio::time::sleep(ttl) => core.expire(&expiring),
                }
            }
            .instrument(tracing::info_span!("expiry", intent_id = %id)),
        );
        if rand::rng().random_bool(self.config.api_faults.fail_after_rate) {
            bump(&self.counters.injected_failures);
            return Err(ApiError::other(
                500,
                "api_error",
                "injected_failure",
                "the simulator failed this request on purpose, after creating the intent",
            ));
        }
        Ok((201, object))
    }

    /// The intent object.
    fn intent(&self, id: &str) -> Result<Value, ApiError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        state
            .intents
            .get(id)
            .map(|intent| self.object(intent))
            .ok_or_else(|| ApiError::not_found("id", "payment intent"))
    }

    /// `POST …/cancel`: only while `awaiting_payment`, else 409.
    fn cancel(&self, id: &str) -> Result<Value, ApiError> {
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        let intent = state
            .intents
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found("id", "payment intent"))?;
        if intent.status != IntentStatus::AwaitingPayment {
            return Err(ApiError {
                status: 409,
                kind: "invalid_request_error",
                code: "payment_intent_unexpected_state".into(),
                message: format!(
                    "the payment intent is {}; only awaiting_payment can be cancelled",
                    intent.status.as_str()
                ),
                param: None,
            });
        }
        intent.status = IntentStatus::Cancelled;
        let object = intent.to_json();
        drop(state);
        self.emit("payment_intent.cancelled", Some(id), object.clone());
        Ok(self.tampered(object))
    }

    /// An intent object as the REST API shows it (with the `bad_qr` fault applied).
    fn object(&self, intent: &Intent) -> Value {
        self.tampered(intent.to_json())
    }

    /// Applies the `bad_qr` fault: the `qr_payload` names chain 1 instead of the mode's.
    fn tampered(&self, mut object: Value) -> Value {
        if self.config.api_faults.bad_qr
            && let Some(qr) = object["qr_payload"].as_str()
            && let Some((target, rest)) = qr.split_once('@')
            && let Some((_, call)) = rest.split_once('/')
        {
            object["qr_payload"] = Value::from(format!("{target}@1/{call}"));
        }
        object
    }

    /// Expires an intent that is still awaiting payment (the expiry timer).
    fn expire(&self, id: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let Some(intent) = state.intents.get_mut(id) else {
            return;
        };
        if intent.status != IntentStatus::AwaitingPayment {
            return;
        }
        intent.status = IntentStatus::Expired;
        let object = intent.to_json();
        drop(state);
        self.emit("payment_intent.expired", Some(id), object);
    }

    /// Wraps `data` in an envelope with a new `evt_…` id and queues it.
    fn emit(&self, kind: &str, intent_id: Option<&str>, data: Value) -> String {
        let id = model::new_id("evt_");
        let body = events::envelope(&id, kind, data);
        self.deliverer.emit(Event {
            id: id.clone(),
            kind: kind.to_owned(),
            intent_id: intent_id.map(str::to_owned),
            body: Bytes::from(body),
        });
        id
    }

    /// Schedules the customer's transfer to `intent_id`.
    fn pay(
        self: &Arc<Self>,
        intent_id: &str,
        amount: Option<MicroUsdc>,
        late: bool,
    ) -> Result<PayReceipt, ApiError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        let intent = state
            .intents
            .get(intent_id)
            .ok_or_else(|| ApiError::not_found("intent_id", "payment intent"))?;
        let amount = amount.unwrap_or(intent.amount);
        let deadline = state.deadlines.get(intent_id).copied();
        drop(state);
        let mut wait = self.scaled(self.config.confirm_delay);
        if late && let Some(deadline) = deadline {
            wait += deadline.saturating_duration_since(tokio::time::Instant::now());
        }
        self.schedule_transfer(Some(intent_id), None, amount, late, wait)
    }

    /// Schedules a transfer to an address no intent has (`payment_intent_id: null`).
    fn pay_unknown(
        self: &Arc<Self>,
        amount: MicroUsdc,
        address: Option<String>,
    ) -> Result<PayReceipt, ApiError> {
        let wait = self.scaled(self.config.confirm_delay);
        let address = address.unwrap_or_else(model::random_address);
        self.schedule_transfer(None, Some(address), amount, false, wait)
    }

    /// Refuses a zero `amount`, else lands a new transfer of it on chain after `wait` (unless the
    /// simulator stops first): to `intent_id`'s address, or to `address` when no intent is named.
    fn schedule_transfer(
        self: &Arc<Self>,
        intent_id: Option<&str>,
        address: Option<String>,
        amount: MicroUsdc,
        late: bool,
        wait: Duration,
    ) -> Result<PayReceipt, ApiError> {
        if amount.0 == 0 {
            return Err(ApiError::invalid(
                "amount",
                "amount_invalid",
                "amount must be positive",
            ));
        }
        let txn_id = model::new_id("txn_");
        let span = match intent_id {
            Some(intent_id) => tracing::info_span!("payment", intent_id = %intent_id),
            None => tracing::info_span!("payment_unknown"),
        };
        let core = Arc::clone(self);
        let token = self.token.clone();
        let (intent, txn) = (intent_id.map(str::to_owned), txn_id.clone());
        self.tracker.spawn(
            async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = tokio::time::sleep(wait) => core.confirm_transfer(intent.as_deref(), address, &txn, amount, late),
                }
            }
            .instrument(span),
        );
        Ok(PayReceipt {
            intent_id: intent_id.map(str::to_owned),
            transaction_id: txn_id,
            amount: amount.to_string(),
            amount_micros: amount.0,
            late,
        })
    }

    /// The transfer lands on chain: record it, confirm the intent if it was paid exactly and on
    /// time, and emit `transaction.created` (and `payment_intent.confirmed`) in random order.
    fn confirm_transfer(
        &self,
        intent_id: Option<&str>,
        address: Option<String>,
        txn_id: &str,
        amount: MicroUsdc,
        late: bool,
    ) {
        let now = self.now();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.block_number = state.block_number.max(44_107_000) + 1;
        let block_number = state.block_number;
        let expired_by_clock = intent_id
            .and_then(|id| state.deadlines.get(id))
            .is_some_and(|d| tokio::time::Instant::now() >= *d);
        let sender = model::random_address();
        let tx_hash = model::random_tx_hash();
        let mut confirmed = None;
        let txn = match intent_id.and_then(|id| state.intents.get_mut(id)) {
            Some(intent) => {
                let late = late || expired_by_clock || intent.status == IntentStatus::Expired;
                // A late transfer is dated after `expires_at` even at whole-second precision.
                let confirmed_at = if late {
                    now.max(intent.expires_at + time::Duration::seconds(1))
                } else {
                    now
                };
                if !late
                    && intent.status == IntentStatus::AwaitingPayment
                    && amount == intent.amount
                {
                    intent.status = IntentStatus::Confirmed;
                    intent.payment = Some(Payment {
                        txn_id: txn_id.to_owned(),
                        tx_hash: tx_hash.clone(),
                        sender_address: sender.clone(),
                        block_number,
                        confirmed_at,
                    });
                    confirmed = Some(intent.to_json());
                }
                Transaction {
                    id: txn_id.to_owned(),
                    payment_intent_id: Some(intent.id.clone()),
                    merchant_id: intent.merchant_id.clone(),
                    amount,
                    tx_hash,
                    payment_address: intent.payment_address.clone(),
                    sender_address: sender,
                    block_number,
                    confirmed_at,
                    metadata: Some(intent.metadata.clone()),
                }
            }
            None => {
                let address = address.unwrap_or_else(model::random_address);
                let owner = state.by_address.get(&address.to_ascii_lowercase()).cloned();
                Transaction {
                    id: txn_id.to_owned(),
                    payment_intent_id: owner,
                    merchant_id: self.config.merchant_id.clone(),
                    amount,
                    tx_hash,
                    payment_address: address,
                    sender_address: sender,
                    block_number,
                    confirmed_at: now,
                    metadata: None,
                }
            }
        };
        let txn_json = txn.to_json();
        let intent_ref = txn.payment_intent_id.clone();
        state.transactions.push(txn);
        drop(state);
        bump(&self.counters.transactions);
        let mut out: Vec<(&str, Value)> = vec![("transaction.created", txn_json)];
        if let Some(object) = confirmed {
            out.push(("payment_intent.confirmed", object));
        }
        out.shuffle(&mut rand::rng());
        for (kind, data) in out {
            self.emit(kind, intent_ref.as_deref(), data);
        }
    }

    /// `GET /v1/transactions/{id}`.
    fn transaction(&self, id: &str) -> Result<Value, ApiError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        state
            .transactions
            .iter()
            .find(|t| t.id == id)
            .map(Transaction::to_json)
            .ok_or_else(|| ApiError::not_found("id", "transaction"))
    }

    /// `GET /v1/transactions?…`: newest first, Stripe-style cursors.
    fn list_transactions(&self, query: &HashMap<String, String>) -> Result<Value, ApiError> {
        let date = |name: &str| -> Result<Option<OffsetDateTime>, ApiError> {
            match query.get(name) {
                None => Ok(None),
                Some(text) => api::parse_date(text).map(Some).ok_or_else(|| {
                    ApiError::invalid(
                        name,
                        "parameter_invalid",
                        format!("{name} must be an ISO 8601 date or date-time (UTC)"),
                    )
                }),
            }
        };
        let date_from = date("date_from")?;
        let date_to = date("date_to")?;
        let limit = match query.get("limit") {
            None => 10,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid(
                        "limit",
                        "parameter_invalid",
                        "limit must be from 1 to 100",
                    ));
                }
            },
        };
        if let Some(status) = query.get("status")
            && !["confirmed", "pending", "failed"].contains(&status.as_str())
        {
            return Err(ApiError::invalid(
                "status",
                "parameter_invalid",
                "status must be confirmed, pending or failed",
            ));
        }
        let state = self.state.lock().map_err(|_| poisoned())?;
        let matching: Vec<&Transaction> = state
            .transactions
            .iter()
            .rev()
            .filter(|t| query.get("merchant_id").is_none_or(|m| &t.merchant_id == m))
            .filter(|_| query.get("status").is_none_or(|s| s == "confirmed"))
            .filter(|t| date_from.is_none_or(|d| t.confirmed_at >= d))
            .filter(|t| date_to.is_none_or(|d| t.confirmed_at <= d))
            .collect();
        let cursor = |name: &str| -> Result<Option<usize>, ApiError> {
            match query.get(name) {
                None => Ok(None),
                Some(id) => matching
                    .iter()
                    .position(|t| &t.id == id)
                    .map(Some)
                    .ok_or_else(|| ApiError::not_found(name, "transaction")),
            }
        };
        let (start, end) = match (cursor("starting_after")?, cursor("ending_before")?) {
            (Some(after), _) => (after + 1, (after + 1 + limit).min(matching.len())),
            (None, Some(before)) => (before.saturating_sub(limit), before),
            (None, None) => (0, limit.min(matching.len())),
        };
        let page: Vec<Value> = matching[start..end].iter().map(|t| t.to_json()).collect();
        let has_more = match query.get("ending_before") {
            Some(_) if query.get("starting_after").is_none() => start > 0,
            _ => end < matching.len(),
        };
        Ok(json!({"object": "list", "data": page, "has_more": has_more}))
    }
}

/// The provider simulator. [`ProviderSim::start`] binds and spawns it.
pub struct ProviderSim;

impl ProviderSim {
    /// Validates `config`, binds `config.listen`, and starts the API, the control endpoints and
    /// webhook delivery.
    ///
    /// # Errors
    /// A bad config, or the address cannot be bound.
    pub async fn start(config: ProviderConfig) -> anyhow::Result<RunningProvider> {
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the provider simulator to {}", config.listen))?;
        let addr = listener.local_addr()?;
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let deliverer = Deliverer::spawn(
            delivery::Settings {
                url: config.webhook_url.clone(),
                secrets: config.webhook_secrets.clone(),
                faults: config.faults.clone(),
                time_scale: config.time_scale,
                timeout: config.delivery_timeout,
                reorder_window: config.reorder_window,
                clock: config.clock.clone(),
            },
            token.clone(),
            tracker.clone(),
        )?;
        let core = Arc::new(Core {
            api_base: format!("http://{addr}/v1"),
            config,
            state: Mutex::new(State::default()),
            deliverer,
            counters: ApiCounters::default(),
            token: token.clone(),
            tracker: tracker.clone(),
        });
        let router = api::router(Arc::clone(&core));
        let stop = token.clone().cancelled_owned();
        tracker.spawn(
            async move {
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
                {
                    tracing::error!(error = %e, "provider simulator server failed");
                }
            }
            .instrument(tracing::info_span!("provider_http", %addr)),
        );
        tracing::info!(%addr, webhook_url = %core.config.webhook_url, time_scale = core.config.time_scale,
            timeout_ms = core.deliverer.timeout().as_millis() as u64, "provider simulator listening");
        Ok(RunningProvider { addr, core })
    }
}

/// A started provider simulator.
pub struct RunningProvider {
    addr: SocketAddr,
    core: Arc<Core>,
}

/// Parameters of [`RunningProvider::create_intent`].
#[derive(Clone, Debug)]
pub struct NewIntent {
    /// Whole cents, 0.01 to 10 000.
    pub amount: MicroUsdc,
    /// `mer_…`.
    pub merchant_id: String,
    /// At most 10 string values (put `terminal_id` and `order_id` here).
    pub metadata: Map<String, Value>,
    /// Seconds, 60 to 3600 (scaled by the time scale); `None` is 300.
    pub ttl_secs: Option<u64>,
    /// The body field `idempotency_key`.
    pub idempotency_key: Option<String>,
    /// Test (`sk_test_`) or live (`sk_live_`) chain and contract.
    pub mode: Mode,
}

impl NewIntent {
    /// A test-mode intent of `amount` for `terminal_id`, with `order_id` = `ord-{random}`.
    pub fn for_terminal(amount: MicroUsdc, terminal_id: &str) -> Self {
        let mut metadata = Map::new();
        metadata.insert("terminal_id".into(), json!(terminal_id));
        metadata.insert(
            "order_id".into(),
            json!(format!("ord-{}", &model::new_id("x_")[2..])),
        );
        NewIntent {
            amount,
            merchant_id: "mer_sim".into(),
            metadata,
            ttl_secs: None,
            idempotency_key: None,
            mode: Mode::Test,
        }
    }

    /// The JSON body the REST API would receive.
    pub fn to_body(&self) -> Value {
        let mut body = json!({
            "amount": events::number(self.amount),
            "currency": "usd",
            "merchant_id": self.merchant_id,
            "metadata": self.metadata,
        });
        if let Some(ttl) = self.ttl_secs {
            body["ttl"] = json!(ttl);
        }
        if let Some(key) = &self.idempotency_key {
            body["idempotency_key"] = json!(key);
        }
        body
    }
}

impl RunningProvider {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`: the gateway's `provider.api_base`.
    pub fn api_base(&self) -> String {
        self.core.api_base.clone()
    }

    /// `http://ADDR`: where `/_sim/…` lives.
    pub fn control_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates an intent exactly as `POST /v1/payment-intents` would (validation and idempotency
    /// included) and returns the intent object.
    ///
    /// # Errors
    /// The [`ApiError`] the REST API would answer (400, 409).
    pub fn create_intent(&self, intent: &NewIntent) -> Result<Value, ApiError> {
        self.core
            .create(intent.mode, &intent.to_body())
            .map(|(_, object)| object)
    }

    /// The intent object as `GET /v1/payment-intents/{id}` shows it.
    ///
    /// # Errors
    /// 404 for an unknown id.
    pub fn intent(&self, id: &str) -> Result<Value, ApiError> {
        self.core.intent(id)
    }

    /// Cancels an intent as `POST /v1/payment-intents/{id}/cancel` would.
    ///
    /// # Errors
    /// 404 for an unknown id, 409 when it is not awaiting payment.
    pub fn cancel_intent(&self, id: &str) -> Result<Value, ApiError> {
        self.core.cancel(id)
    }

    /// The customer pays `intent_id`: `amount` (default: exactly the intent's), confirmed after the
    /// scaled confirmation delay, or after `expires_at` when `late`.
    ///
    /// # Errors
    /// 404 for an unknown intent, 400 for a zero amount.
    pub fn pay(
        &self,
        intent_id: &str,
        amount: Option<MicroUsdc>,
        late: bool,
    ) -> Result<PayReceipt, ApiError> {
        self.core.pay(intent_id, amount, late)
    }

    /// A transfer of `amount` to an address no intent has (`payment_intent_id: null`), or to
    /// `address`.
    ///
    /// # Errors
    /// 400 for a zero amount.
    pub fn pay_unknown(
        &self,
        amount: MicroUsdc,
        address: Option<String>,
    ) -> Result<PayReceipt, ApiError> {
        self.core.pay_unknown(amount, address)
    }

    /// Sends `body` as an event exactly as given (through the same signing, retries and faults).
    /// Returns its `evt_…` id.
    ///
    /// # Errors
    /// When `body` is not an event envelope.
    pub fn emit_raw(&self, body: impl Into<String>) -> anyhow::Result<String> {
        let body: String = body.into();
        let envelope = posgate_proto::Envelope::parse(body.as_bytes())
            .context("the body is not an event envelope")?;
        let (id, kind) = (envelope.id.clone(), envelope.kind.clone());
        self.core.deliverer.emit(Event {
            id: id.clone(),
            kind,
            intent_id: None,
            body: Bytes::from(body),
        });
        Ok(id)
    }

    /// Points webhooks (pending retries included) at another URL.
    pub fn set_webhook_url(&self, url: impl Into<String>) {
        self.core.deliverer.set_url(url.into());
    }

    /// Replaces the webhook secrets; the last one signs from now on.
    pub fn set_webhook_secrets(&self, secrets: Vec<SecretString>) {
        self.core.deliverer.set_secrets(secrets);
    }

    /// Every counter.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// Every emitted event and what was sent for it, in emission order.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.core.deliverer.records()
    }

    /// The delivery records of the events about `intent_id`.
    pub fn deliveries_for(&self, intent_id: &str) -> Vec<DeliveryRecord> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.intent_id.as_deref() == Some(intent_id))
            .collect()
    }

    /// Stops serving, cancels timers and pending retries, and waits at most `grace` for the tasks.
    pub async fn shutdown(self, grace: Duration) {
        self.core.token.cancel();
        self.core.tracker.close();
        if tokio::time::timeout(grace, self.core.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("provider simulator tasks still running after {grace:?}");
        }
        self.core.deliverer.abandon_pending();
    }
}

/// Dropping the handle stops the simulator's tasks too (without waiting for them).
impl Drop for RunningProvider {
    fn drop(&mut self) {
        self.core.token.cancel();
    }
}

impl Core {
    fn stats(&self) -> Stats {
        Stats {
            delivery: self.deliverer.stats(),
            api: self.counters.snapshot(),
        }
    }
}
