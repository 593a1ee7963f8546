//! Retention: old rows of `events` are removed in small batches, so that the store (and with it
//! redb's repair after a crash, which walks every live page) stops growing with every webhook
//! ever received.
//!
//! An `events` row is the deduplication key of a webhook. The provider retries a webhook for up
//! to 14.6 hours after its first attempt (docs/provider.md), and an event's `received_at` is
//! never earlier than that first attempt, so a row older than `store.retention_hours` (at least
//! 15) can no longer be asked about again. What is never pruned, whatever its age: an event that
//! still waits for its intent (`pending`) and one whose body is still kept for a replay (a
//! settlement naming an intent not known yet); intents, terminals and the outbox are not touched
//! (an outbox row goes on the terminal's ack).

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kv::{KvRead, KvWrite, StrTable};
use super::{EventOutcome, OpKey, Operation, Store, StoreError, StoredEvent, decode};

/// Rows looked at per write transaction, so that a prune never holds the writer for long (a few
/// milliseconds; webhooks are committed in between).
pub const PRUNE_VISIT: usize = 2_000;
/// How often the whole table is walked.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// One step of a prune: what it removed and where the next step starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    pub removed: usize,
    /// The key the next step starts at; `None` once the end of the table was reached.
    pub next: Option<String>,
}

/// Whether a stored event may go once older than the cutoff (see the module docs).
fn prunable(event: &StoredEvent) -> bool {
    match event.outcome {
        EventOutcome::Pending => false,
        EventOutcome::Applied | EventOutcome::Recorded => event.raw.is_none(),
        EventOutcome::Unparsed | EventOutcome::UnknownType => true,
    }
}

impl Store {
    /// Looks at up to `visit` rows of `events` from key `from` on and removes those received
    /// before `before` that nothing needs any more.
    ///
    /// # Errors
    /// As any write.
    pub async fn prune_events(
        &self,
        before: OffsetDateTime,
        from: String,
        visit: usize,
    ) -> Result<Pruned, StoreError> {
        let op = Operation::new("prune old events", OpKey::None);
        self.write_deferred(op, move |t| {
            let mut old = Vec::new();
            let mut seen = 0;
            let mut next = None;
            t.kv.scan(StrTable::Events, &from, &mut |key, value| {
                if seen == visit {
                    next = Some(key.to_owned());
                    return Ok(false);
                }
                seen += 1;
                let event: StoredEvent = decode(key, value)?;
                if event.received_at < before && prunable(&event) {
                    old.push(key.to_owned());
                }
                Ok(true)
            })?;
            for key in &old {
                t.kv.remove(StrTable::Events, key)?;
            }
            Ok(Pruned {
                removed: old.len(),
                next: next.clone(),
            })
        })
        .await
    }
}

/// Removes events older than `retention` every `PRUNE_EVERY` (the first time two minutes
/// after start), [`PRUNE_VISIT`] rows at a time, until `token` is cancelled.
pub async fn prune_events(store: Store, retention: Duration, token: CancellationToken) {
    let mut tick = tokio::time::interval_at(Instant::now() + Duration::from_secs(120), PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = OffsetDateTime::now_utc()
            .checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let (mut from, mut removed) = (String::new(), 0);
        loop {
            if token.is_cancelled() {
                return;
            }
            match store.prune_events(before, from, PRUNE_VISIT).await {
                Ok(step) => {
                    removed += step.removed;
                    match step.next {
                        Some(next) => from = next,
                        None => break,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune old events; trying again later");
                    break;
                }
            }
            // Webhooks first: a pause between steps leaves the writer to them.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if removed > 0 {
            tracing::info!(removed, "old events pruned");
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use posgate_proto::event::{Envelope, EventData};
    use time::{Duration, OffsetDateTime};

    use crate::store::testing::{Kind, TestDb, on_both_backends, register};
    use crate::store::{EventOutcome, IncomingEvent, Ingested, Limits, Store};

    fn event(id: &str, kind: &str, data: &str, received_at: OffsetDateTime) -> IncomingEvent {
        let body = format!(
            r#"{{"id":"{id}","object":"event","type":"{kind}","created_at":"2026-04-01T20:00:12Z","data":{data}}}"#
        );
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let data = EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string());
        IncomingEvent {
            event_id: id.into(),
            kind: kind.into(),
            raw: Bytes::from(body),
            received_at,
            created_at: None,
            data,
        }
    }

    fn confirmed(n: u32, at: OffsetDateTime) -> IncomingEvent {
        let pi = format!(
            r#"{{"id":"pi_{n}","status":"confirmed","amount":4.5,"payment_address":"0xa{n}","metadata":{{"terminal_id":"pos-1"}}}}"#
        );
        event(&format!("evt_{n}"), "payment_intent.confirmed", &pi, at)
    }

    async fn prune_all(store: &Store, before: OffsetDateTime, visit: usize) -> usize {
        let (mut from, mut removed) = (String::new(), 0);
        loop {
            let step = store.prune_events(before, from, visit).await.unwrap();
            removed += step.removed;
            match step.next {
                Some(next) => from = next,
                None => return removed,
            }
        }
    }

    /// Applied events older than the retention go; a webhook retried inside the window is still
    /// a duplicate (answered `200`, no second confirmation); a transfer that waits for its intent
    /// stays whatever its age, and is applied when the intent comes. The body of an applied event
    /// is not kept, its hash is.
    async fn old_events_go_and_what_dedupe_or_delivery_needs_stays(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(64, 16)).await;
        register(&store, "pos-1").await;
        let now = OffsetDateTime::now_utc();
        let two_days_ago = now - Duration::days(2);
        let ten_hours_ago = now - Duration::hours(10);
        for n in 0..5 {
            store.ingest(confirmed(n, two_days_ago)).await.unwrap();
        }
        for n in 5..8 {
            store.ingest(confirmed(n, ten_hours_ago)).await.unwrap();
        }
        // A transfer for an intent nobody has named yet, as old as the oldest.
        let tx = r#"{"id":"txn_9","object":"transaction","payment_intent_id":"pi_9","amount":4.5,"payment_address":"0xa9","tx_hash":"0xfeed","confirmed_at":"2026-04-01T20:00:07Z"}"#;
        let waiting = store
            .ingest(event("evt_t9", "transaction.created", tx, two_days_ago))
            .await
            .unwrap();
        assert!(matches!(
            waiting,
            Ingested::New {
                outcome: EventOutcome::Pending,
                ..
            }
        ));
        let applied = store.event("evt_0".into()).await.unwrap().unwrap();
        assert!(applied.raw.is_none(), "an applied event's body is not kept");
        assert_eq!(applied.body_sha256.as_deref().map(str::len), Some(64));
        let pending = store.event("evt_t9".into()).await.unwrap().unwrap();
        assert!(pending.raw.is_some(), "a waiting event keeps its body");
        let confirmations = store.outbox(Some("pos-1".into())).await.unwrap().len();
        assert_eq!(confirmations, 8);

        // 15 hours: past the provider's last retry. Three rows per step, to cross step edges.
        let removed = prune_all(&store, now - Duration::hours(15), 3).await;
        assert_eq!(removed, 5);
        for n in 0..5 {
            assert!(store.event(format!("evt_{n}")).await.unwrap().is_none());
        }
        for n in 5..8 {
            assert!(store.event(format!("evt_{n}")).await.unwrap().is_some());
            // The provider's retry inside the window: a duplicate, nothing enqueued again.
            assert_eq!(
                store.ingest(confirmed(n, now)).await.unwrap(),
                Ingested::Duplicate
            );
        }
        assert!(store.event("evt_t9".into()).await.unwrap().is_some());
        assert_eq!(
            store.outbox(Some("pos-1".into())).await.unwrap().len(),
            confirmations
        );
        // Pruning again removes nothing more.
        assert_eq!(prune_all(&store, now - Duration::hours(15), 3).await, 0);

        // The intent comes: the old waiting transfer is applied then, and its body dropped.
        let pi9 = r#"{"id":"pi_9","status":"confirmed","amount":4.5,"payment_address":"0xa9","metadata":{"terminal_id":"pos-1"}}"#;
        let created = store
            .ingest(event("evt_p9", "payment_intent.confirmed", pi9, now))
            .await
            .unwrap();
        let Ingested::New { effects, .. } = created else {
            panic!("{created:?}")
        };
        assert_eq!(effects.len(), 2, "{effects:?}");
        let intent = store.intent("pi_9".into()).await.unwrap().unwrap();
        assert_eq!(intent.record.txns, ["txn_9"]);
        let resolved = store.event("evt_t9".into()).await.unwrap().unwrap();
        assert_eq!(resolved.outcome, EventOutcome::Applied);
        assert!(resolved.raw.is_none());
        // Now applied and old: the next prune takes it.
        assert_eq!(prune_all(&store, now - Duration::hours(15), 1000).await, 1);
        store.close().await;
    }

    /// A settlement naming a known and an unknown intent is applied to the first at once and
    /// keeps its body, whatever its age, until the second comes: then it is applied to that one
    /// too (not lost to the body drop or to the prune).
    async fn a_settlement_waiting_for_one_of_its_intents_keeps_its_body(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(64, 16)).await;
        let now = OffsetDateTime::now_utc();
        let two_days_ago = now - Duration::days(2);
        store.ingest(confirmed(1, two_days_ago)).await.unwrap();
        let settlement =
            r#"{"id":"st_1","object":"settlement","payment_intent_ids":["pi_1","pi_2"]}"#;
        let settled = store
            .ingest(event(
                "evt_s",
                "settlement.completed",
                settlement,
                two_days_ago,
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                &settled,
                Ingested::New {
                    outcome: EventOutcome::Applied,
                    ..
                }
            ),
            "{settled:?}"
        );
        let stored = store.event("evt_s".into()).await.unwrap().unwrap();
        assert!(stored.raw.is_some(), "pi_2 still waits for it");
        assert_eq!(prune_all(&store, now - Duration::hours(15), 1000).await, 1);
        assert!(store.event("evt_1".into()).await.unwrap().is_none());
        assert!(store.event("evt_s".into()).await.unwrap().is_some());

        store.ingest(confirmed(2, now)).await.unwrap();
        let intent = store.intent("pi_2".into()).await.unwrap().unwrap();
        assert_eq!(
            intent.record.status,
            crate::domain::IntentStatus::Settled,
            "{intent:?}"
        );
        // Nothing waits for it any more: its body goes, and an old one is pruned.
        let stored = store.event("evt_s".into()).await.unwrap().unwrap();
        assert!(stored.raw.is_none());
        assert_eq!(prune_all(&store, now - Duration::hours(15), 1000).await, 1);
        store.close().await;
    }

    /// The file a SIGKILL leaves (a copy taken while the store is open, its last commit synced)
    /// is repaired at open, apart from the store's small cache, and keeps what was committed: the
    /// retried webhook is still a duplicate, its confirmation still in the outbox.
    #[tokio::test]
    async fn a_crashed_file_is_repaired_and_keeps_what_was_committed() {
        let db = TestDb::new(Kind::Redb).await;
        let store = db.open(Limits::new(64, 16)).await;
        register(&store, "pos-1").await;
        let now = OffsetDateTime::now_utc();
        for n in 0..50 {
            store.ingest(confirmed(n, now)).await.unwrap();
        }
        let crashed = tempfile::tempdir().unwrap();
        std::fs::copy(
            db.dir.path().join(crate::store::DB_FILE),
            crashed.path().join(crate::store::DB_FILE),
        )
        .unwrap();
        store.close().await;
        let file = crashed.path().join(crate::store::DB_FILE);
        let needs_repair = redb::Builder::new()
            .set_repair_callback(|session| session.abort())
            .create(&file);
        assert!(
            matches!(needs_repair, Err(redb::DatabaseError::RepairAborted)),
            "the copy is what a crash leaves: it needs a repair"
        );
        drop(needs_repair);
        let dir = crashed.path().to_owned();
        let again = tokio::task::spawn_blocking(move || Store::open(&dir, Limits::new(64, 16)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            again.ingest(confirmed(7, now)).await.unwrap(),
            Ingested::Duplicate
        );
        assert_eq!(again.outbox(Some("pos-1".into())).await.unwrap().len(), 50);
        again.close().await;
        // Closed cleanly after the repair: no repair needed any more.
        let clean = redb::Builder::new()
            .set_repair_callback(|session| session.abort())
            .create(&file);
        assert!(clean.is_ok(), "{:?}", clean.err());
    }

    on_both_backends!(
        old_events_go_and_what_dedupe_or_delivery_needs_stays,
        a_settlement_waiting_for_one_of_its_intents_keeps_its_body,
    );
}
