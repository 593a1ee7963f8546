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
//! - `config`: [`ProviderConfig`], the faults, the clock, the time scale.
//! - `running`: [`ProviderSim::start`] and the [`RunningProvider`] handle.
//! - `state`: what the API and the handle share, and the per-request gate.
//! - `intents`, `payments`, `transactions`: the operations on the objects.
//! - `model`: the objects and their rules (ids, amounts, `qr_payload`, validation, idempotency).
//! - `delivery`: webhook sending, retries, faults and their counters.
//! - `api`: the axum routes (`/v1/…` and `/_sim/…`).
//! - `error`, `stats`: [`ApiError`] and the counters.

mod api;
mod config;
pub mod delivery;
mod error;
mod intents;
pub mod model;
mod payments;
mod running;
mod state;
mod stats;
#[cfg(test)]
mod tests;
mod transactions;

pub use config::{ApiFaults, Clock, Faults, ProviderConfig, scaled};
pub use delivery::{
    Attempt, AttemptKind, DeliveryRecord, DeliveryState, DeliveryStats, Outcome, Outcomes,
    RETRY_SCHEDULE,
};
pub use error::ApiError;
pub use model::{CreateRequest, Mode};
pub use payments::PayReceipt;
pub use running::{NewIntent, ProviderSim, RunningProvider};
pub use stats::{ApiStats, Stats};
