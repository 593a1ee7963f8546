//! The writer thread: group commit and the per-event logic inside the write transaction.

// std's clock on purpose: the writer is an OS thread, outside any runtime.
#![allow(clippy::disallowed_types)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use posgate_proto::event::{Envelope, EventData, PaymentIntent, Transaction};
use redb::{Database, Durability};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::Durability as StoreDurability;
use super::kv::{Hint, KvRead, KvWrite, MultiTable, RedbWrite, StrTable, WriteKv};
use super::{
    EventOutcome, EventRef, Health, IncomingEvent, Ingested, Job, Notices, Open, OutboxRow,
    StoreError, StoreErrorKind, StoredEvent, StoredIntent, decode,
};
use crate::domain::{self, Effect, Input, IntentRecord};

/// Most consecutive batches committed without fsync.
const MAX_LAZY_STREAK: u32 = 64;

/// What the writer shares with the store's handles.
pub(super) struct Shared {
    pub(super) health: Arc<Health>,
    pub(super) notices: Arc<Notices>,
    pub(super) commit_seconds: Arc<OnceLock<prometheus::Histogram>>,
    /// Where the handles find the open database; emptied and refilled by [`recover`].
    pub(super) slot: Arc<Mutex<Option<Open>>>,
    pub(super) path: PathBuf,
    /// Wakes the writer after a failed `fdatasync`, so that it reopens the file even when no
    /// write comes (weak: the queue still closes when the last handle lets go).
    pub(super) wake: mpsc::WeakSender<Job>,
}

/// Runs until every sender is gone and the queue is empty.
///
/// A durable batch is committed with redb's eventual durability, whose sync the database file
/// turns into a write barrier ([`super::barrier`]): its `fdatasync` runs while the next batch is
/// applied. Every batch is answered, and its new outbox rows go to the notices (a hint for the
/// delivery engine; the rows are the truth), only once the commits up to its own are on disk, so answers
/// keep their order and none reveals what a crash could take back.
///
/// After an I/O error (a full disk, a failed `fdatasync`) redb refuses every later operation on
/// the open database, so the writer reopens the file ([`recover`]) and goes on: a full disk heals
/// in place once there is space again.
pub(super) fn run(
    mut open: Open,
    mut rx: mpsc::Receiver<Job>,
    limits: &super::Limits,
    shared: &Shared,
) {
    let mut lazy_streak = 0u32;
    while let Some(mut batch) = next_batch(&mut rx, limits.max_batch) {
        let started = Instant::now();
        let lazy = batch
            .iter()
            .all(|job| job.durability() == StoreDurability::Deferred);
        // Every so often a batch of only eventual writes is made durable anyway, so that they
        // never pile up unpersisted for long.
        lazy_streak = if lazy { lazy_streak + 1 } else { 0 };
        let durable = !lazy || lazy_streak >= MAX_LAZY_STREAK;
        if durable {
            lazy_streak = 0;
        }
        shared.health.busy(true);
        let result = commit_batch(&open.db, &mut batch, durable, limits.quick_repair);
        shared.health.busy(false);
        let commit_seconds = shared.commit_seconds.get().cloned();
        match result {
            Ok(new_rows) => {
                tracing::trace!(
                    jobs = batch.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "committed"
                );
                let (health, notices) = (shared.health.clone(), shared.notices.clone());
                let wake = shared.wake.clone();
                let answer = move |on_disk: bool| {
                    if let Some(h) = commit_seconds {
                        h.observe(started.elapsed().as_secs_f64());
                    }
                    health.failed.store(!on_disk, Ordering::Relaxed);
                    if on_disk && !new_rows.is_empty() {
                        notices.send(new_rows);
                    }
                    for job in batch {
                        job.finish(on_disk);
                    }
                    if !on_disk {
                        // The next write fails and makes the writer reopen the file; this one
                        // makes sure there is a next write.
                        wake_writer(&wake);
                    }
                };
                open.syncer.after(open.syncer.requested(), Box::new(answer));
            }
            Err(e) => {
                if let Some(h) = commit_seconds {
                    h.observe(started.elapsed().as_secs_f64());
                }
                shared.health.failed.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, error_chain = ?e, jobs = batch.len(), "store commit failed; nothing of this batch was kept");
                for job in batch {
                    job.finish(false);
                }
                if e.needs_reopen() {
                    match recover(open, &mut rx, shared) {
                        Some(reopened) => open = reopened,
                        None => return,
                    }
                }
            }
        }
    }
    // A clean close leaves nothing unpersisted.
    if lazy_streak > 0
        && let Err(e) = commit_batch(&open.db, &mut [], true, limits.quick_repair)
    {
        tracing::warn!(error = %e, "final durable commit failed; the last acks may be replayed");
    }
    if !open.syncer.wait_all() {
        tracing::warn!("the last commits could not be synced to disk");
    }
}

/// The next batch for a group commit (both backends): waits for a job, then takes those already
/// queued behind it, `max_batch` at most. `None` once every sender is gone and the queue is empty.
pub(super) fn next_batch(rx: &mut mpsc::Receiver<Job>, max_batch: usize) -> Option<Vec<Job>> {
    let mut batch = Vec::with_capacity(max_batch);
    batch.push(rx.blocking_recv()?);
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// A write that changes nothing, sent to wake the writer.
pub(super) fn wake_writer(wake: &mpsc::WeakSender<Job>) {
    if let Some(queue) = wake.upgrade() {
        let (reply, _) = tokio::sync::oneshot::channel();
        let nothing = |_: &mut Tables<'_>| Ok::<(), StoreError>(());
        drop(queue.try_send(Box::new(super::Typed {
            op: super::Operation::new("wake the writer", super::OpKey::None),
            work: nothing,
            hints: Vec::new(),
            result: None,
            reply,
            durability: StoreDurability::Deferred,
        })));
    }
}

/// First and longest pause between two attempts to reopen the database.
const REOPEN_FIRST: Duration = Duration::from_millis(250);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// Closes the failed database and opens the file again, until that works (a full disk: once
/// there is space) or the store is closed (`None`). Meanwhile reads answer
/// [`super::StoreErrorKind::Unavailable`] and writes "not committed" (ingress says `503`; the provider
/// retries), and the store reports itself unhealthy.
fn recover(open: Open, rx: &mut mpsc::Receiver<Job>, shared: &Shared) -> Option<Open> {
    shared.health.failed.store(true, Ordering::Relaxed);
    // Readers let go of the database (those in flight end within the commit deadline), and the
    // file's lock with it.
    let taken = shared.slot.lock().ok().and_then(|mut slot| slot.take());
    drop(taken);
    let Open { mut db, syncer } = open;
    drop(syncer);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match Arc::try_unwrap(db) {
            Ok(last) => {
                drop(last);
                break;
            }
            Err(shared_db) if Instant::now() < until => {
                db = shared_db;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => {
                tracing::error!(
                    "reads still hold the failed database after 30 s; cannot reopen it"
                );
                return None;
            }
        }
    }
    tracing::warn!(path = %shared.path.display(), "reopening the database after a disk failure");
    let reopened = retry_until_open(rx, "the database cannot be reopened yet; retrying", || {
        super::open_database(&shared.path)
    })?;
    if let Ok(mut slot) = shared.slot.lock() {
        *slot = Some(reopened.clone());
    }
    shared.health.failed.store(false, Ordering::Relaxed);
    tracing::info!("database reopened; the store takes writes again");
    Some(reopened)
}

/// Calls `open` with a growing pause between attempts (0.25 s up to 5 s) until it works, and
/// answers every write that comes meanwhile "not committed" at once (ingress says `503`; the
/// provider retries). `None` once the store is closed. Used by both backends' writers: redb
/// reopening its file after a disk failure, PostgreSQL reconnecting.
pub(super) fn retry_until_open<T, E>(
    rx: &mut mpsc::Receiver<Job>,
    failing: &'static str,
    mut open: impl FnMut() -> Result<T, E>,
) -> Option<T>
where
    E: std::error::Error,
{
    let mut pause = REOPEN_FIRST;
    for attempt in 1u64.. {
        // Wait, answering what comes meanwhile at once.
        let until = Instant::now() + pause;
        while Instant::now() < until {
            loop {
                match rx.try_recv() {
                    Ok(job) => job.finish(false),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match open() {
            Ok(opened) => return Some(opened),
            Err(e) => {
                // One line a minute at most while it keeps failing.
                if attempt == 1 || attempt % 12 == 0 {
                    tracing::error!(error = %e, error_chain = ?e, attempts = attempt, "{failing}");
                }
                pause = (pause * 2).min(REOPEN_MAX);
            }
        }
    }
    None
}

/// One write transaction for the whole batch; `durable`: with a sync (a barrier, completed on
/// the syncer thread), else visible only. Any error aborts all of it.
fn commit_batch(
    db: &Database,
    batch: &mut [Job],
    durable: bool,
    quick_repair: bool,
) -> Result<Vec<OutboxRow>, StoreError> {
    let mut txn = db.begin_write()?;
    // The allocator state is saved with synced commits only: after a crash the database goes back
    // to the last of those, which then carries it.
    txn.set_quick_repair(durable && quick_repair);
    // redb's "eventual" is our synced commit: its sync is the barrier's fdatasync (barrier.rs).
    txn.set_durability(if durable {
        Durability::Eventual
    } else {
        Durability::None
    });
    let new_rows = {
        let mut t = Tables::new(WriteKv::Redb(Box::new(RedbWrite::open(&txn)?)));
        for job in batch.iter_mut() {
            job.apply(&mut t)?;
        }
        std::mem::take(&mut t.new_rows)
    };
    txn.commit()?;
    Ok(new_rows)
}

/// One write transaction (on either backend), and what the batch produced for the delivery engine.
pub(crate) struct Tables<'txn> {
    pub(super) kv: WriteKv<'txn>,
    /// Outbox rows added in this transaction, handed to the delivery engine after the commit.
    pub(super) new_rows: Vec<OutboxRow>,
    /// The event being ingested was kept in `pending` under some key (its body is needed again).
    parked: bool,
}

pub(super) fn encode<T: serde::Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| {
        StoreErrorKind::Corrupt {
            key: key.to_owned(),
            source,
        }
        .into()
    })
}

/// The keys [`Tables::ingest`] will read for `event` (see [`Hint`]).
pub(super) fn hints_for(event: &IncomingEvent) -> Vec<Hint> {
    let mut hints = vec![Hint::Str(StrTable::Events, event.event_id.clone())];
    match &event.data {
        Ok(EventData::PaymentIntent(pi)) => {
            hints.push(Hint::Str(StrTable::Intents, pi.id.clone()));
            hints.push(Hint::Multi(MultiTable::Pending, pi.id.clone()));
            if let Some(address) = &pi.payment_address {
                hints.push(Hint::Multi(MultiTable::Pending, address_key(address)));
            }
            if let Some(terminal) = IntentRecord::from_snapshot(pi).terminal_id {
                hints.push(Hint::Str(StrTable::Terminals, terminal));
            }
        }
        Ok(EventData::Transaction(tx)) => {
            if let Some(id) = &tx.payment_intent_id {
                hints.push(Hint::Str(StrTable::Intents, id.clone()));
            }
            if let Some(address) = &tx.payment_address {
                hints.push(Hint::Str(
                    StrTable::IntentByAddress,
                    address.to_ascii_lowercase(),
                ));
            }
        }
        Ok(EventData::Settlement(s)) => {
            for id in &s.payment_intent_ids {
                hints.push(Hint::Str(StrTable::Intents, id.clone()));
            }
        }
        _ => {}
    }
    hints
}

/// Whether an event's raw body is kept (see [`StoredEvent::raw`]): while it may be replayed
/// (`parked` under an intent not known yet) or for the operator when nothing was applied.
fn keeps_body(outcome: EventOutcome, parked: bool) -> bool {
    match outcome {
        EventOutcome::Applied | EventOutcome::Recorded => parked,
        EventOutcome::Pending | EventOutcome::Unparsed | EventOutcome::UnknownType => true,
    }
}

/// The hex SHA-256 of a body.
pub(super) fn body_sha256(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(body))
}

pub(super) fn address_key(address: &str) -> String {
    format!("addr:{}", address.to_ascii_lowercase())
}

impl<'txn> Tables<'txn> {
    pub(super) fn new(kv: WriteKv<'txn>) -> Self {
        Tables {
            kv,
            new_rows: Vec::new(),
            parked: false,
        }
    }

    pub(super) fn reject(
        &mut self,
        raw: &[u8],
        reason: &str,
        received_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let next = self.kv.rejected_last()?.map_or(1, |last| last + 1);
        let record = serde_json::json!({
            "received_at": received_at.unix_timestamp(),
            "reason": reason,
            "raw": String::from_utf8_lossy(raw),
        });
        self.kv
            .rejected_insert(next, encode("rejected", &record)?.as_slice())?;
        Ok(())
    }

    pub(super) fn ingest(&mut self, event: &IncomingEvent) -> Result<Ingested, StoreError> {
        if self.kv.get(StrTable::Events, &event.event_id)?.is_some() {
            return Ok(Ingested::Duplicate);
        }
        let mut effects = Vec::new();
        let mut intent_ids = Vec::new();
        self.parked = false;
        let (outcome, error) = match &event.data {
            Err(message) => (EventOutcome::Unparsed, Some(message.clone())),
            Ok(data) => (
                self.apply_data(event, data, &mut effects, &mut intent_ids)?,
                None,
            ),
        };
        let raw = if keeps_body(outcome, self.parked) {
            Some(
                RawValue::from_string(String::from_utf8_lossy(&event.raw).into_owned()).map_err(
                    |source| StoreErrorKind::Corrupt {
                        key: event.event_id.clone(),
                        source,
                    },
                )?,
            )
        } else {
            None
        };
        // Intents nobody has named yet: reconciliation asks the provider about them.
        let unknown_intents = if outcome == EventOutcome::Pending {
            intent_ids.clone()
        } else {
            Vec::new()
        };
        let stored = StoredEvent {
            id: event.event_id.clone(),
            kind: event.kind.clone(),
            received_at: event.received_at,
            outcome,
            intent_ids,
            error,
            raw,
            body_sha256: Some(body_sha256(&event.raw)),
        };
        self.kv.insert(
            StrTable::Events,
            &event.event_id,
            encode(&event.event_id, &stored)?.as_slice(),
        )?;
        Ok(Ingested::New {
            outcome,
            effects,
            unknown_intents,
        })
    }

    fn apply_data(
        &mut self,
        event: &IncomingEvent,
        data: &EventData,
        effects: &mut Vec<(String, Effect)>,
        intent_ids: &mut Vec<String>,
    ) -> Result<EventOutcome, StoreError> {
        Ok(match data {
            EventData::Unknown => EventOutcome::UnknownType,
            EventData::PaymentIntent(pi) => {
                intent_ids.push(pi.id.clone());
                let mut intent = match self.intent(&pi.id)? {
                    Some(intent) => intent,
                    None => {
                        // Events that arrived earlier for this intent are applied first, in
                        // arrival order, so the outcome does not depend on which came first.
                        let mut intent = self.create_intent(pi, event.received_at)?;
                        self.resolve_pending(&mut intent, effects)?;
                        intent
                    }
                };
                let effect =
                    self.apply_one(&mut intent, Input::Snapshot(pi), event, event.created_at)?;
                effects.push((pi.id.clone(), effect));
                self.save_intent(&intent)?;
                EventOutcome::Applied
            }
            EventData::Transaction(tx) => {
                let found = self.find_intent_for(tx)?;
                match found {
                    Some(mut intent) => {
                        intent_ids.push(intent.record.id.clone());
                        let effect = self.apply_one(
                            &mut intent,
                            Input::Transfer(tx),
                            event,
                            event.created_at,
                        )?;
                        effects.push((intent.record.id.clone(), effect));
                        self.save_intent(&intent)?;
                        EventOutcome::Applied
                    }
                    None => {
                        // Kept under every key it could be resolved by later.
                        if let Some(id) = &tx.payment_intent_id {
                            intent_ids.push(id.clone());
                            self.wait_for_intent(id, &event.event_id)?;
                        }
                        if let Some(address) = &tx.payment_address {
                            self.wait_for_intent(&address_key(address), &event.event_id)?;
                        }
                        EventOutcome::Pending
                    }
                }
            }
            EventData::Settlement(s) => {
                if event.kind != "settlement.completed" || s.payment_intent_ids.is_empty() {
                    return Ok(EventOutcome::Recorded);
                }
                let mut outcome = EventOutcome::Pending;
                for id in &s.payment_intent_ids {
                    intent_ids.push(id.clone());
                    match self.intent(id)? {
                        Some(mut intent) => {
                            let effect = self.apply_one(
                                &mut intent,
                                Input::Settled,
                                event,
                                event.created_at,
                            )?;
                            effects.push((id.clone(), effect));
                            self.save_intent(&intent)?;
                            outcome = EventOutcome::Applied;
                        }
                        None => self.wait_for_intent(id, &event.event_id)?,
                    }
                }
                outcome
            }
        })
    }

    /// Keeps `event_id` under `key` until the intent `key` names is known.
    fn wait_for_intent(&mut self, key: &str, event_id: &str) -> Result<(), StoreError> {
        self.parked = true;
        self.kv.multi_insert(MultiTable::Pending, key, event_id)
    }

    /// Applies one input and, when the terminal must be told, enqueues its confirmation.
    fn apply_one(
        &mut self,
        intent: &mut StoredIntent,
        input: Input<'_>,
        event: &IncomingEvent,
        at: Option<OffsetDateTime>,
    ) -> Result<Effect, StoreError> {
        let effect = domain::apply(&mut intent.record, input, at);
        if effect.notify {
            self.enqueue(&intent.record, event.received_at)?;
        }
        intent.events.push(EventRef {
            id: event.event_id.clone(),
            kind: event.kind.clone(),
            received_at: event.received_at,
            from: effect.from,
            to: effect.to,
        });
        intent.updated_at = event.received_at;
        Ok(effect)
    }

    pub(super) fn intent(&self, id: &str) -> Result<Option<StoredIntent>, StoreError> {
        match self.kv.get(StrTable::Intents, id)? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn save_intent(&mut self, intent: &StoredIntent) -> Result<(), StoreError> {
        let id = intent.record.id.as_str();
        self.kv
            .insert(StrTable::Intents, id, encode(id, intent)?.as_slice())?;
        Ok(())
    }

    pub(super) fn create_intent(
        &mut self,
        pi: &PaymentIntent,
        now: OffsetDateTime,
    ) -> Result<StoredIntent, StoreError> {
        let record = IntentRecord::from_snapshot(pi);
        if let Some(address) = &record.payment_address {
            self.kv.insert(
                StrTable::IntentByAddress,
                &address.to_ascii_lowercase(),
                record.id.as_bytes(),
            )?;
        }
        Ok(StoredIntent {
            record,
            events: Vec::new(),
            created_at: now,
            updated_at: now,
        })
    }

    pub(super) fn find_intent_for(
        &self,
        tx: &Transaction,
    ) -> Result<Option<StoredIntent>, StoreError> {
        if let Some(id) = &tx.payment_intent_id
            && let Some(intent) = self.intent(id)?
        {
            return Ok(Some(intent));
        }
        let Some(address) = &tx.payment_address else {
            return Ok(None);
        };
        let id = match self
            .kv
            .get(StrTable::IntentByAddress, &address.to_ascii_lowercase())?
        {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => return Ok(None),
        };
        self.intent(&id)
    }

    /// Applies the events that arrived before this intent was known, in arrival order.
    pub(super) fn resolve_pending(
        &mut self,
        intent: &mut StoredIntent,
        effects: &mut Vec<(String, Effect)>,
    ) -> Result<(), StoreError> {
        let mut keys = vec![intent.record.id.clone()];
        if let Some(address) = &intent.record.payment_address {
            keys.push(address_key(address));
        }
        let mut waiting: Vec<StoredEvent> = Vec::new();
        for key in &keys {
            let ids = self.kv.multi_remove_all(MultiTable::Pending, key)?;
            for id in ids {
                if waiting.iter().any(|e| e.id == id) {
                    continue;
                }
                if let Some(v) = self.kv.get(StrTable::Events, &id)? {
                    waiting.push(decode(&id, &v)?);
                }
            }
        }
        waiting.sort_by_key(|e| e.received_at);
        for mut stored in waiting {
            // An applied transfer whose body is gone (seen here under its other key) has nothing
            // left to apply.
            let Some(body) = stored.raw.as_ref().map(|raw| raw.get().to_owned()) else {
                continue;
            };
            let Ok(envelope) = Envelope::parse(body.as_bytes()) else {
                continue;
            };
            let Ok(data) = EventData::parse(envelope.event_type(), envelope.data) else {
                continue;
            };
            let replay = IncomingEvent {
                event_id: stored.id.clone(),
                kind: stored.kind.clone(),
                raw: bytes::Bytes::new(),
                received_at: stored.received_at,
                created_at: envelope.created_at,
                data: Ok(EventData::Unknown),
            };
            let input = match &data {
                // A transfer belongs to one intent; kept under two keys, it is applied once.
                EventData::Transaction(_) if stored.outcome == EventOutcome::Applied => continue,
                EventData::Transaction(tx) => Input::Transfer(tx),
                EventData::Settlement(_) => Input::Settled,
                _ => continue,
            };
            let effect = self.apply_one(intent, input, &replay, envelope.created_at)?;
            effects.push((intent.record.id.clone(), effect));
            if !stored.intent_ids.contains(&intent.record.id) {
                stored.intent_ids.push(intent.record.id.clone());
            }
            stored.outcome = EventOutcome::Applied;
            // A transfer is applied once: its body is no longer needed. A settlement's is, while
            // another of its intents is still unknown.
            let waits_elsewhere = match data {
                EventData::Transaction(_) => false,
                _ => {
                    let mut any = false;
                    for id in &stored.intent_ids {
                        if id != &intent.record.id && self.kv.get(StrTable::Intents, id)?.is_none()
                        {
                            any = true;
                            break;
                        }
                    }
                    any
                }
            };
            if !waits_elsewhere {
                if stored.body_sha256.is_none() {
                    stored.body_sha256 = Some(body_sha256(body.as_bytes()));
                }
                stored.raw = None;
            }
            self.kv.insert(
                StrTable::Events,
                &stored.id,
                encode(&stored.id, &stored)?.as_slice(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::domain::IntentStatus;
    use crate::store::testing::{Kind, TestDb, on_both_backends, register};
    use crate::store::{Limits, Undeliverable};

    fn event(id: &str, kind: &str, data: &str) -> IncomingEvent {
        let body = format!(
            r#"{{"id":"{id}","object":"event","type":"{kind}","created_at":"2026-04-01T20:00:12Z","data":{data}}}"#
        );
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let data = EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string());
        IncomingEvent {
            event_id: id.into(),
            kind: kind.into(),
            raw: Bytes::from(body),
            received_at: OffsetDateTime::now_utc(),
            created_at: None,
            data,
        }
    }

    /// A transfer that comes before its intent waits (under the intent's id and its address), is
    /// applied once when the intent comes, and the confirmation waits for its terminal to be
    /// registered. On PostgreSQL this is the path whose keys are fetched ahead per batch.
    async fn a_transfer_before_its_intent_is_applied_when_the_intent_comes(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(64, 16)).await;
        let tx = r#"{"id":"txn_1","object":"transaction","payment_intent_id":"pi_1","amount":4.5,"payment_address":"0xAbC1","tx_hash":"0xfeed","confirmed_at":"2026-04-01T20:00:07Z"}"#;
        let pi = r#"{"id":"pi_1","status":"confirmed","amount":4.5,"payment_address":"0xabc1","metadata":{"terminal_id":"pos-1"}}"#;
        let transfer = || event("evt_t", "transaction.created", tx);
        let first = store.ingest(transfer()).await.unwrap();
        assert!(
            matches!(&first, Ingested::New { outcome: EventOutcome::Pending, unknown_intents, .. } if unknown_intents == &["pi_1"]),
            "{first:?}"
        );
        assert_eq!(store.ingest(transfer()).await.unwrap(), Ingested::Duplicate);
        assert!(store.intent("pi_1".into()).await.unwrap().is_none());

        let created = store
            .ingest(event("evt_p", "payment_intent.confirmed", pi))
            .await
            .unwrap();
        let Ingested::New {
            outcome, effects, ..
        } = created
        else {
            panic!("{created:?}")
        };
        assert_eq!(outcome, EventOutcome::Applied);
        // The waiting transfer, then the snapshot itself.
        assert_eq!(effects.len(), 2, "{effects:?}");
        let intent = store.intent("pi_1".into()).await.unwrap().unwrap();
        assert_eq!(intent.record.txns, ["txn_1"]);
        assert_eq!(intent.record.status, IntentStatus::Confirmed);
        let stored = store.event("evt_t".into()).await.unwrap().unwrap();
        assert_eq!(stored.outcome, EventOutcome::Applied);
        // Applied once: again, nothing waits.
        assert_eq!(store.ingest(transfer()).await.unwrap(), Ingested::Duplicate);
        assert_eq!(
            store.undeliverable().await.unwrap(),
            [Undeliverable {
                terminal_id: Some("pos-1".into()),
                intent_id: "pi_1".into()
            }]
        );
        register(&store, "pos-1").await;
        assert!(store.undeliverable().await.unwrap().is_empty());
        let rows = store.outbox(Some("pos-1".into())).await.unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.intent_id.as_str(), r.seq))
                .collect::<Vec<_>>(),
            [("pi_1", 1)]
        );
        store.close().await;
    }

    on_both_backends!(a_transfer_before_its_intent_is_applied_when_the_intent_comes);
}
