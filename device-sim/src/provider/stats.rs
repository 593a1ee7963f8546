//! The simulator's counters: [`Stats`] (webhooks and REST, as `GET /_sim/stats` and
//! [`RunningProvider::stats`](super::RunningProvider::stats) show them), and the atomic REST counters
//! behind [`ApiStats`].

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::DeliveryStats;
use super::state::Core;

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
pub(super) struct ApiCounters {
    pub(super) requests: AtomicU64,
    pub(super) unauthorized: AtomicU64,
    pub(super) rate_limited: AtomicU64,
    pub(super) injected_failures: AtomicU64,
    pub(super) intents_created: AtomicU64,
    pub(super) idempotent_replays: AtomicU64,
    pub(super) idempotency_conflicts: AtomicU64,
    pub(super) transactions: AtomicU64,
}

impl ApiCounters {
    pub(super) fn snapshot(&self) -> ApiStats {
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

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// === impl Core ===

impl Core {
    pub(super) fn stats(&self) -> Stats {
        Stats {
            delivery: self.deliverer.stats(),
            api: self.counters.snapshot(),
        }
    }
}
