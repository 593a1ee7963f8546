//! Payment intents: create (validation and body-field idempotency keys), get, cancel, and the
//! expiry timer (provider-api.md §2.1 to §2.5), with the `bad_qr` fault applied to the objects the
//! REST API shows.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tracing::Instrument;

use super::error::poisoned;
use super::model::{self, Intent, IntentStatus, Replay};
use super::state::Core;
use super::stats::bump;
use super::{ApiError, CreateRequest, Mode};

// === impl Core ===

impl Core {
    /// `POST /v1/payment-intents`: `(201 | 200, intent)`.
    pub(super) fn create(
        self: &Arc<Self>,
        mode: Mode,
        body: &Value,
    ) -> Result<(u16, Value), ApiError> {
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
    pub(super) fn intent(&self, id: &str) -> Result<Value, ApiError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        state
            .intents
            .get(id)
            .map(|intent| self.object(intent))
            .ok_or_else(|| ApiError::not_found("id", "payment intent"))
    }

    /// `POST …/cancel`: only while `awaiting_payment`, else 409.
    pub(super) fn cancel(&self, id: &str) -> Result<Value, ApiError> {
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
}
