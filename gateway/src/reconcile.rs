//! Reconciliation: asks the provider about what the webhooks left open, and feeds the answer
//! through the same path as a webhook (same store transaction, state machine and outbox).
//!
//! Three cases. Open intents past `expires_at` (or holding an exact transfer) plus a grace period
//! are looked up again: their `expired` or `confirmed` webhook may have been lost. An event
//! about an intent the gateway has never seen (a transfer or a
//! settlement for an intent the merchant's backend created, whose `payment_intent.*` event has not
//! arrived and may never arrive, e.g. an underpayment, which the provider does not confirm). The
//! gateway GETs the intent; its snapshot creates the record, and the events waiting for it are
//! applied, so the terminal hears about it. And the provider's recent transactions are listed
//! (provider-api.md §8: every `provider.transactions_every_secs`, from the start of the last
//! complete listing minus `provider.transactions_overlap_secs`, the cursor kept in the store):
//! a transfer no webhook announced goes through the webhook's own path (`Store::ingest_listed`),
//! one naming an intent we do not know triggers the lookup above, and one matching no intent is
//! kept as an orphan (admin API, metric, error log).
//!
//! Every call takes a background token from the provider budget (provider-api.md §2.6: at most a
//! quarter of 80 % of the published limit, yielding to terminal requests), which paces this loop.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use posgate_proto::event::Transaction;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::IntentStatus;
use crate::metrics::Metrics;
use crate::provider::{ProviderClient, ProviderError};
use crate::store::{
    Ingested, IntentFilter, Listed, SnapshotError, Store, StoreError, StoredIntent,
};

/// Where the ingress reports intents it could not resolve.
#[derive(Clone)]
pub struct Handle(mpsc::UnboundedSender<String>);

impl Handle {
    /// Asks for `intent_id` to be looked up at the provider (deduplicated while pending).
    pub fn unknown_intent(&self, intent_id: &str) {
        drop(self.0.send(intent_id.to_owned()));
    }
}

/// The kind under which an intent object read by reconciliation is kept.
pub const SNAPSHOT_KIND: &str = "reconcile.payment_intent";

/// Why a reconciliation step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("asking the provider")]
    Provider(#[from] ProviderError),
    #[error("reading or writing the store")]
    Store(#[from] StoreError),
    #[error("applying the provider's intent object")]
    Snapshot(#[from] SnapshotError),
    #[error("a listed transaction has no readable id")]
    ListedId(#[source] serde_json::Error),
    #[error("formatting the listing's start time")]
    Time(#[from] time::error::Format),
}

impl ReconcileError {
    /// The provider does not know the intent (`404`): asking again will not change that.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ReconcileError::Provider(ProviderError::Status { status: 404, .. })
        )
    }
}

/// How long a lookup waits after it is asked for (and between attempts). The provider sends a
/// payment's `transaction.created` and `payment_intent.confirmed` together, in either order: when
/// the transfer comes first, the confirmation usually follows within moments, and a lookup right
/// away would spend the provider budget (and a durable write) on what the next webhook says.
const SETTLE: Duration = Duration::from_secs(1);

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

/// When the provider's transactions are listed.
#[derive(Clone, Copy, Debug)]
pub struct Listing {
    /// How often.
    pub every: Duration,
    /// How far before the last complete listing's start the next one begins.
    pub overlap: Duration,
}

/// Page size of a listing (the provider's maximum, in the simulator at least).
const PAGE_LIMIT: &str = "100";

/// Where a listing starts: the last complete listing's start (or now, on the very first run: older
/// transfers predate this gateway) minus the overlap.
pub fn window_start(
    cursor: Option<OffsetDateTime>,
    now: OffsetDateTime,
    overlap: Duration,
) -> OffsetDateTime {
    let overlap = time::Duration::try_from(overlap).unwrap_or(time::Duration::ZERO);
    let from = cursor.unwrap_or(now);
    from.checked_sub(overlap).unwrap_or(from)
}

/// Whether an open intent is due for a lookup: more than `grace` past its `expires_at`, or holding
/// an exact transfer with no confirmation `grace` after it. The provider's timestamps are not
/// trusted to be sane: a time `grace` cannot be added to (`expires_at` near year 9999) is never
/// due, rather than a panic of the reconciler.
fn is_stale(intent: &StoredIntent, grace: time::Duration, now: OffsetDateTime) -> bool {
    let past = |at: OffsetDateTime| at.checked_add(grace).is_some_and(|due| due < now);
    let r = &intent.record;
    let expired = r.expires_at.is_some_and(past);
    let paid_unconfirmed =
        !r.txns.is_empty() && r.received_micros == r.expected_micros && past(intent.updated_at);
    expired || paid_unconfirmed
}

/// What one listing found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListingReport {
    /// Transfers the provider listed.
    pub listed: usize,
    /// New to the gateway (no webhook brought them), applied through the webhook path.
    pub missed: usize,
    /// Newly recorded orphans.
    pub orphans: usize,
    /// Intents worth a lookup (named by a transfer, unknown here).
    pub lookups: Vec<String>,
    /// Listed items that did not parse as a transaction.
    pub unparsed: usize,
}

impl ListingReport {
    /// Counts what the store did with one listed transfer.
    pub fn note(&mut self, listed: &Listed) {
        match listed {
            Listed::Duplicate => {}
            Listed::Waiting {
                intent_id,
                orphaned,
            } => {
                self.orphans += usize::from(*orphaned);
                self.lookups.extend(intent_id.clone());
            }
            Listed::New { ingested, orphaned } => {
                self.orphans += usize::from(*orphaned);
                self.missed += usize::from(!*orphaned);
                if let Ingested::New {
                    unknown_intents, ..
                } = ingested
                {
                    self.lookups.extend(unknown_intents.iter().cloned());
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// The reconciliation task.
pub struct Reconciler {
    store: Store,
    client: ProviderClient,
    metrics: Metrics,
    stale: Stale,
    listing: Listing,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Reconciler {
    /// A reconciler and the handle that feeds it; `client` should be a background client
    /// ([`ProviderClient::background`]), which paces it.
    pub fn new(
        store: Store,
        client: ProviderClient,
        metrics: Metrics,
        stale: Stale,
        listing: Listing,
    ) -> (Reconciler, Handle) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Reconciler {
                store,
                client,
                metrics,
                stale,
                listing,
                rx,
            },
            Handle(tx),
        )
    }

    /// Runs until `token` is cancelled.
    pub async fn run(mut self, token: CancellationToken) {
        // (intent id, failed attempts so far, not before); `seen` keeps an id queued once.
        let mut queued: VecDeque<(String, u32, Instant)> = VecDeque::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut sweep = tokio::time::interval(self.stale.every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listing = tokio::time::interval(self.listing.every);
        listing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let queue = |id: String,
                     queued: &mut VecDeque<(String, u32, Instant)>,
                     seen: &mut HashSet<String>| {
            if seen.insert(id.clone()) {
                queued.push_back((id, 0, Instant::now() + SETTLE));
            }
        };
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                Some(id) = self.rx.recv() => queue(id, &mut queued, &mut seen),
                _ = sweep.tick() => {
                    for id in self.stale_intents().await {
                        queue(id, &mut queued, &mut seen);
                    }
                }
                _ = listing.tick() => {
                    // Many pages may take a while (each call waits for its budget): shutdown
                    // does not wait for them; the cursor only moves after a complete listing.
                    let result = tokio::select! {
                        result = self.list_transactions() => result,
                        () = token.cancelled() => break,
                    };
                    match result {
                        Ok(report) => {
                            self.metrics.reconcile_listings.with_label_values(&["ok"]).inc();
                            for id in report.lookups {
                                queue(id, &mut queued, &mut seen);
                            }
                        }
                        Err(e) => {
                            self.metrics.reconcile_listings.with_label_values(&["failed"]).inc();
                            tracing::warn!(error = %e, error_chain = ?e, "listing the provider's transactions failed; the next listing starts from the same cursor");
                        }
                    }
                }
                // Entries become due in order, each SETTLE after it was queued; the provider
                // calls then pace themselves (each waits for a background token).
                () = tokio::time::sleep_until(queued.front().map_or_else(Instant::now, |q| q.2)), if !queued.is_empty() => {
                    let Some((id, failures, _)) = queued.pop_front() else { continue };
                    self.metrics.reconcile_runs.inc();
                    // A lookup may wait on retries: shutdown does not wait for it.
                    let result = tokio::select! {
                        result = self.resolve(&id) => result,
                        () = token.cancelled() => break,
                    };
                    match result {
                        Ok(Some(kind)) => self.metrics.reconcile_findings.with_label_values(&[kind]).inc(),
                        Ok(None) => {}
                        // The provider does not know it: asking again will not change that.
                        Err(e) if e.is_not_found() => {
                            self.metrics.reconcile_findings.with_label_values(&["unknown_at_provider"]).inc();
                            tracing::error!(intent_id = %id, error = %e, "the provider does not know this intent (404); its events stay kept, unapplied");
                            self.orphan_unknown_intent(&id).await;
                        }
                        // The provider may be down for a while: try again later, a few times (an
                        // open intent is also found again by the next sweeps).
                        Err(e) if failures + 1 < MAX_ATTEMPTS => {
                            tracing::warn!(intent_id = %id, error = %e, "reconciliation failed; will retry");
                            queued.push_back((id, failures + 1, Instant::now() + SETTLE));
                            continue;
                        }
                        Err(e) => tracing::error!(intent_id = %id, error = %e, "reconciliation failed; giving up on it"),
                    }
                    seen.remove(&id);
                }
            }
        }
    }

    /// Counts and logs a transfer newly kept as an orphan (`intent_id`: the unknown intent it named).
    fn orphan_recorded(&self, txn_id: &str, intent_id: Option<&str>) {
        self.metrics.orphan_transfers.inc();
        self.metrics
            .reconcile_findings
            .with_label_values(&["orphan_transfer"])
            .inc();
        tracing::error!(%txn_id, intent_id = intent_id.unwrap_or("-"), "a transfer matches no intent: kept as an orphan (GET /v1/orphan-transfers)");
    }

    /// Money sent for an intent the provider does not know matches no intent: each such transfer
    /// becomes an orphan (the operator's list and alert), as one with no intent named would.
    async fn orphan_unknown_intent(&self, intent_id: &str) {
        match self
            .store
            .orphan_unknown_intent(intent_id.to_owned(), OffsetDateTime::now_utc())
            .await
        {
            Ok(txn_ids) => {
                for txn_id in txn_ids {
                    self.orphan_recorded(&txn_id, Some(intent_id));
                }
            }
            Err(e) => {
                tracing::error!(%intent_id, error = %e, error_chain = ?e, "could not record the transfers of an unknown intent as orphans")
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
                if is_stale(intent, grace, now) {
                    out.push(intent.record.id.clone());
                }
            }
            cursor = page.last().map(|i| i.record.id.clone());
            if !more || cursor.is_none() {
                break;
            }
        }
        out
    }

    /// Lists the provider's transactions since the cursor (minus the overlap), page by page, and
    /// feeds each transfer through the store; moves the cursor when every page was read.
    async fn list_transactions(&self) -> Result<ListingReport, ReconcileError> {
        let started = OffsetDateTime::now_utc();
        let cursor = self.store.transactions_cursor().await?;
        let from = window_start(cursor, started, self.listing.overlap);
        let date_from = from.format(&time::format_description::well_known::Rfc3339)?;
        let mut report = ListingReport::default();
        let mut after: Option<String> = None;
        loop {
            // No merchant_id filter: the API key is the account's, and one listing covers every
            // merchant the gateway's terminals belong to.
            let mut query = vec![
                ("date_from", date_from.clone()),
                ("status", "confirmed".to_owned()),
                ("limit", PAGE_LIMIT.to_owned()),
            ];
            if let Some(after) = &after {
                query.push(("starting_after", after.clone()));
            }
            let page = self.client.list_transactions(&query).await?;
            for item in &page.data {
                report.listed += 1;
                let raw = item.get();
                let id: IdOnly = serde_json::from_str(raw).map_err(ReconcileError::ListedId)?;
                after = Some(id.id.clone());
                let tx: Transaction = match serde_json::from_str(raw) {
                    Ok(tx) => tx,
                    Err(e) => {
                        report.unparsed += 1;
                        tracing::error!(txn_id = %id.id, error = %e, "a listed transaction does not parse; it is skipped");
                        continue;
                    }
                };
                let listed = self
                    .store
                    .ingest_listed(tx, raw.to_owned(), OffsetDateTime::now_utc())
                    .await?;
                self.observe(&id.id, &listed);
                report.note(&listed);
            }
            if !page.has_more || page.data.is_empty() {
                break;
            }
        }
        self.store.set_transactions_cursor(started).await?;
        tracing::debug!(listed = report.listed, missed = report.missed, orphans = report.orphans, %date_from, "listed the provider's transactions");
        Ok(report)
    }

    /// Metrics and logs for one listed transfer.
    fn observe(&self, txn_id: &str, listed: &Listed) {
        let (ingested, orphaned) = match listed {
            Listed::Duplicate => return,
            Listed::Waiting { orphaned, .. } => (None, *orphaned),
            Listed::New { ingested, orphaned } => (Some(ingested), *orphaned),
        };
        if orphaned {
            self.orphan_recorded(txn_id, None);
        }
        let Some(Ingested::New { effects, .. }) = ingested else {
            return;
        };
        if !orphaned {
            self.metrics
                .reconcile_findings
                .with_label_values(&["missed_transfer"])
                .inc();
        }
        for (intent_id, effect) in effects {
            if effect.from != effect.to {
                self.metrics
                    .transitions
                    .with_label_values(&[effect.from.as_str(), effect.to.as_str()])
                    .inc();
            }
            tracing::info!(%txn_id, %intent_id, from = effect.from.as_str(), to = effect.to.as_str(),
                "reconciliation found a transfer no webhook announced");
        }
    }

    /// GETs the intent and applies its snapshot; names the finding when that changed something.
    async fn resolve(&self, intent_id: &str) -> Result<Option<&'static str>, ReconcileError> {
        let before = self.store.intent(intent_id.to_owned()).await?;
        if before
            .as_ref()
            .is_some_and(|i| i.record.status != IntentStatus::AwaitingPayment)
        {
            return Ok(None); // a webhook settled it meanwhile
        }
        let raw = self.client.get_intent(intent_id).await?;
        let (snapshot, ingested) = self
            .store
            .ingest_snapshot(raw, SNAPSHOT_KIND, Some(intent_id))
            .await?;
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

    use posgate_proto::event::PaymentIntent;
    use time::macros::datetime;

    #[test]
    fn an_expiry_near_year_9999_is_never_due_and_does_not_panic() {
        let snapshot: PaymentIntent = serde_json::from_str(
            r#"{"id":"pi_far","status":"awaiting_payment","amount":"1.00","expires_at":"9999-12-31T23:59:59Z"}"#,
        )
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let intent = StoredIntent {
            record: crate::domain::IntentRecord::from_snapshot(&snapshot),
            events: Vec::new(),
            created_at: now,
            updated_at: now,
        };
        assert!(intent.record.expires_at.is_some());
        assert!(!is_stale(&intent, time::Duration::hours(1), now));
        let far_cursor = datetime!(-9999-01-01 00:00 UTC);
        assert_eq!(
            window_start(Some(far_cursor), now, Duration::from_secs(600)),
            far_cursor
        );
    }

    #[test]
    fn the_window_overlaps_the_last_listing() {
        let now = datetime!(2026-04-01 20:15:00 UTC);
        let last = datetime!(2026-04-01 20:00:00 UTC);
        let ten = Duration::from_secs(600);
        assert_eq!(
            window_start(Some(last), now, ten),
            datetime!(2026-04-01 19:50:00 UTC)
        );
        // First run: only what is recent (older transfers predate the gateway).
        assert_eq!(
            window_start(None, now, ten),
            datetime!(2026-04-01 20:05:00 UTC)
        );
        // After a long outage the window reaches back to the last complete listing.
        let week = datetime!(2026-03-25 20:00:00 UTC);
        assert_eq!(
            window_start(Some(week), now, ten),
            datetime!(2026-03-25 19:50:00 UTC)
        );
    }

    #[test]
    fn the_report_counts_what_each_transfer_did() {
        let mut report = ListingReport::default();
        report.note(&Listed::Duplicate);
        report.note(&Listed::Waiting {
            intent_id: Some("pi_1".into()),
            orphaned: false,
        });
        report.note(&Listed::Waiting {
            intent_id: None,
            orphaned: true,
        });
        report.note(&Listed::New {
            ingested: Ingested::New {
                outcome: crate::store::EventOutcome::Pending,
                effects: Vec::new(),
                unknown_intents: vec!["pi_2".into()],
            },
            orphaned: false,
        });
        report.note(&Listed::New {
            ingested: Ingested::New {
                outcome: crate::store::EventOutcome::Pending,
                effects: Vec::new(),
                unknown_intents: Vec::new(),
            },
            orphaned: true,
        });
        assert_eq!(
            report,
            ListingReport {
                listed: 0,
                missed: 1,
                orphans: 2,
                lookups: vec!["pi_1".into(), "pi_2".into()],
                unparsed: 0,
            }
        );
    }
}
