//! Reconciliation: asks the provider about what the webhooks left open, and feeds the answer
//! through the same path as a webhook (same store transaction, state machine and outbox).
//!
//! Two cases. Open intents past `expires_at` (or holding an exact transfer) plus a grace period
//! are looked up again: their `expired` or `confirmed` webhook may have been lost. And an event
//! about an intent the gateway has never seen (a transfer or a
//! settlement for an intent the merchant's backend created, whose `payment_intent.*` event has not
//! arrived and may never arrive, e.g. an underpayment, which the provider does not confirm). The
//! gateway GETs the intent; its snapshot creates the record, and the events waiting for it are
//! applied, so the terminal hears about it. Calls are paced to stay inside the provider's
//! published rate limit (100 requests/min, budgeted at 80 % in provider-api.md §2.6; reconciliation
//! takes at most a quarter of it).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use posgate_proto::event::{EventData, PaymentIntent};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::IntentStatus;
use crate::metrics::Metrics;
use crate::provider::ProviderClient;
use crate::store::{IncomingEvent, Ingested, IntentFilter, Store};

/// The pace of reconciliation calls for a provider rate limit of `requests_per_minute`: a quarter
/// of 80 % of it (3 s between calls for the documented 100/min).
pub fn interval(requests_per_minute: u32) -> Duration {
    let per_minute = (f64::from(requests_per_minute.max(1)) * 0.8 / 4.0).max(1.0 / 60.0);
    Duration::from_secs_f64(60.0 / per_minute)
}

/// Where the ingress reports intents it could not resolve.
#[derive(Clone)]
pub struct Handle(mpsc::UnboundedSender<String>);

impl Handle {
    /// Asks for `intent_id` to be looked up at the provider (deduplicated while pending).
    pub fn unknown_intent(&self, intent_id: &str) {
        drop(self.0.send(intent_id.to_owned()));
    }
}

/// Applies an intent object read from the provider (a GET, a create, a cancel) through the same
/// store transaction, state machine and outbox as a webhook; it is kept like an event, so the
/// intent's history shows the observation.
///
/// # Errors
/// When the object does not parse or the store fails.
pub async fn apply_snapshot(
    store: &Store,
    raw: Bytes,
) -> anyhow::Result<(PaymentIntent, Ingested)> {
    let snapshot: PaymentIntent = serde_json::from_slice(&raw)?;
    let now = OffsetDateTime::now_utc();
    let event = IncomingEvent {
        event_id: format!("rec_{}_{}", snapshot.id, now.unix_timestamp_nanos()),
        kind: "reconcile.payment_intent".into(),
        raw,
        received_at: now,
        created_at: Some(now),
        data: Ok(EventData::PaymentIntent(snapshot.clone())),
    };
    let ingested = store.ingest(event).await?;
    Ok((snapshot, ingested))
}

/// Attempts per lookup before it is left to the sweeps (and the log).
const MAX_ATTEMPTS: u32 = 5;

/// When open intents are looked at again.
#[derive(Clone, Copy, Debug)]
pub struct Stale {
    /// How often the store is swept for stale intents.
    pub every: Duration,
    /// How long past `expires_at` (or past an exact transfer) before an open intent is stale.
    pub grace: Duration,
}

/// The reconciliation task.
pub struct Reconciler {
    store: Store,
    client: ProviderClient,
    metrics: Metrics,
    interval: Duration,
    stale: Stale,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Reconciler {
    /// A reconciler and the handle that feeds it.
    pub fn new(
        store: Store,
        client: ProviderClient,
        metrics: Metrics,
        interval: Duration,
        stale: Stale,
    ) -> (Reconciler, Handle) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Reconciler {
                store,
                client,
                metrics,
                interval,
                stale,
                rx,
            },
            Handle(tx),
        )
    }

    /// Runs until `token` is cancelled.
    pub async fn run(mut self, token: CancellationToken) {
        // (intent id, failed attempts so far); `seen` keeps an id queued once.
        let mut queued: VecDeque<(String, u32)> = VecDeque::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(self.stale.every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                Some(id) = self.rx.recv() => {
                    if seen.insert(id.clone()) {
                        queued.push_back((id, 0));
                    }
                }
                _ = sweep.tick() => {
                    for id in self.stale_intents().await {
                        if seen.insert(id.clone()) {
                            queued.push_back((id, 0));
                        }
                    }
                }
                _ = tick.tick(), if !queued.is_empty() => {
                    let Some((id, failures)) = queued.pop_front() else { continue };
                    self.metrics.reconcile_runs.inc();
                    // A lookup may wait on retries: shutdown does not wait for it.
                    let result = tokio::select! {
                        result = self.resolve(&id) => result,
                        () = token.cancelled() => break,
                    };
                    match result {
                        Ok(Some(kind)) => self.metrics.reconcile_findings.with_label_values(&[kind]).inc(),
                        Ok(None) => {}
                        // The provider may be down for a while: try again later, a few times (an
                        // open intent is also found again by the next sweeps).
                        Err(e) if failures + 1 < MAX_ATTEMPTS => {
                            tracing::warn!(intent_id = %id, error = %e, "reconciliation failed; will retry");
                            queued.push_back((id, failures + 1));
                            continue;
                        }
                        Err(e) => tracing::error!(intent_id = %id, error = %e, "reconciliation failed; giving up on it"),
                    }
                    seen.remove(&id);
                }
            }
        }
    }

    /// Intents still `awaiting_payment` more than the grace period after `expires_at` (their
    /// `payment_intent.expired` or `.confirmed` webhook may have been lost), and those holding an
    /// exact, on-time transfer with no confirmation a grace period later (provider-api.md §8).
    async fn stale_intents(&self) -> Vec<String> {
        let now = OffsetDateTime::now_utc();
        let grace = time::Duration::try_from(self.stale.grace).unwrap_or(time::Duration::MINUTE);
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let filter = IntentFilter {
                status: Some(IntentStatus::AwaitingPayment),
                terminal_id: None,
                starting_after: cursor.clone(),
                limit: 500,
            };
            let Ok((page, more)) = self.store.list_intents(filter).await else {
                break;
            };
            for intent in &page {
                let r = &intent.record;
                let expired = r.expires_at.is_some_and(|at| at + grace < now);
                let paid_unconfirmed = !r.txns.is_empty()
                    && r.received_micros == r.expected_micros
                    && intent.updated_at + grace < now;
                if expired || paid_unconfirmed {
                    out.push(r.id.clone());
                }
            }
            cursor = page.last().map(|i| i.record.id.clone());
            if !more || cursor.is_none() {
                break;
            }
        }
        out
    }

    /// GETs the intent and applies its snapshot; names the finding when that changed something.
    async fn resolve(&self, intent_id: &str) -> anyhow::Result<Option<&'static str>> {
        let before = self.store.intent(intent_id.to_owned()).await?;
        if before
            .as_ref()
            .is_some_and(|i| i.record.status != IntentStatus::AwaitingPayment)
        {
            return Ok(None); // a webhook settled it meanwhile
        }
        let raw = self.client.get_intent(intent_id).await?;
        let (snapshot, ingested) = apply_snapshot(&self.store, raw).await?;
        anyhow::ensure!(
            snapshot.id == intent_id,
            "the provider answered for {} instead",
            snapshot.id
        );
        let changed = match &ingested {
            Ingested::New { effects, .. } => {
                before.is_none() || effects.iter().any(|(_, e)| e.from != e.to)
            }
            Ingested::Duplicate => false,
        };
        if !changed {
            return Ok(None);
        }
        let kind = if before.is_none() {
            "unknown_intent"
        } else {
            "missed_status"
        };
        tracing::info!(%intent_id, finding = kind, status = %snapshot.status, "reconciliation found what no webhook said");
        Ok(Some(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_inside_a_quarter_of_the_budget() {
        assert_eq!(interval(100), Duration::from_secs(3));
        assert_eq!(interval(1000), Duration::from_millis(300));
    }
}
