//! What the REST API, the control endpoints and the running handle share: [`Core`] (the
//! settings, the objects in memory, the deliverer, the counters, the task tracker), the
//! per-request gate (auth, rate limit, injected 5xx) and `emit`, which queues an event for
//! delivery.
//!
//! The operations on the objects live beside it: `intents`, `payments`, `transactions`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::{Deliverer, Event};
use super::error::poisoned;
use super::model::{self, IdempotencyKeys, Intent, Transaction};
use super::stats::{ApiCounters, bump};
use super::{ApiError, Mode, ProviderConfig, scaled};
use crate::events;

#[derive(Default)]
pub(super) struct State {
    pub(super) intents: HashMap<String, Intent>,
    /// When each intent expires, on tokio's clock (for `late` payments).
    pub(super) deadlines: HashMap<String, tokio::time::Instant>,
    pub(super) by_address: HashMap<String, String>,
    /// In creation order.
    pub(super) transactions: Vec<Transaction>,
    pub(super) idempotency: IdempotencyKeys,
    /// Start of the current rate-limit minute and the requests in it.
    pub(super) window: Option<(tokio::time::Instant, u32)>,
    pub(super) block_number: u64,
}

/// What the API, the control endpoints and the handle share.
pub(super) struct Core {
    pub(super) config: ProviderConfig,
    pub(super) api_base: String,
    pub(super) state: Mutex<State>,
    pub(super) deliverer: Arc<Deliverer>,
    pub(super) counters: ApiCounters,
    pub(super) token: CancellationToken,
    pub(super) tracker: TaskTracker,
}

// === impl Core ===

impl Core {
    pub(super) fn now(&self) -> OffsetDateTime {
        self.config.clock.now()
    }

    pub(super) fn scaled(&self, d: Duration) -> Duration {
        scaled(d, self.config.time_scale)
    }

    /// Auth, rate limit and injected failures for one `/v1` request; returns the key's mode.
    pub(super) fn gate(&self, authorization: Option<&str>) -> Result<Mode, ApiError> {
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

    /// Wraps `data` in an envelope with a new `evt_…` id and queues it.
    pub(super) fn emit(&self, kind: &str, intent_id: Option<&str>, data: Value) -> String {
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
}
