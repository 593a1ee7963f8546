//! The outbox of confirmations and their acks, and the confirmations with no terminal to go to
//! (undeliverable): the delivery side of the store. The terminals themselves are `terminals.rs`.
//!
//! The outbox is the truth about what each terminal still has to receive; the broker is only a
//! cache. A row is written in the same transaction as the event that caused it, with the next
//! per-terminal `seq`, and deleted only when the terminal acks it (never on publish: that would be
//! at-most-once). An ack also removes older rows of the same intent, which its newer confirmation
//! supersedes.

use posgate_proto::confirmation::{Confirmation, ConfirmationStatus, Context};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::kv::{KvRead, KvWrite, MultiTable};
use super::writer::{Tables, encode};
use super::{OpKey, Operation, Store, StoreError, decode};
use crate::domain::{IntentRecord, IntentStatus, UnresolvedContext};

/// Key for intents that name no terminal at all.
const NO_TERMINAL: &str = "";

/// One confirmation waiting for its terminal's ack.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboxRow {
    pub terminal_id: String,
    pub tenant: String,
    pub seq: u64,
    pub intent_id: String,
    /// The signed payload's content (signing is deterministic: a republish sends identical bytes).
    pub confirmation: Confirmation,
    /// When the webhook that caused it was accepted (unix microseconds), for the latency to ack.
    pub accepted_at_us: i64,
}

/// Why an undeliverable confirmation could not be assigned to a terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssignRefused {
    /// No such intent.
    NoIntent,
    /// The intent's confirmation is not waiting for a terminal (it has one, or there is none).
    NotWaiting,
    /// No such terminal.
    NoTerminal,
    /// That terminal is revoked.
    Revoked,
}

/// What an ack did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The row existed and is gone; `clear` when no newer row of that intent is still waiting
    /// (the retained message can be cleared).
    Delivered {
        row: Box<OutboxRow>,
        removed: usize,
        clear: bool,
    },
    /// No such row (already acked, or never existed): nothing changed.
    Unknown,
}

/// An intent whose confirmation has no registered terminal to go to.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Undeliverable {
    /// `None` when the intent names no terminal.
    pub terminal_id: Option<String>,
    pub intent_id: String,
}

fn status_of(record: &IntentRecord) -> Option<(ConfirmationStatus, Option<Context>)> {
    let status = match record.status {
        // The provider settles only what it confirmed (provider-api.md §6.1).
        IntentStatus::Confirmed | IntentStatus::Settled => ConfirmationStatus::Confirmed,
        IntentStatus::Expired => ConfirmationStatus::Expired,
        IntentStatus::Cancelled => ConfirmationStatus::Cancelled,
        IntentStatus::Unresolved => ConfirmationStatus::Unresolved,
        IntentStatus::AwaitingPayment => return None,
    };
    let context = match (status, record.primary_context()) {
        (ConfirmationStatus::Unresolved, Some(c)) => Some(match c {
            UnresolvedContext::Late => Context::Late,
            UnresolvedContext::Underpaid => Context::Underpaid,
            UnresolvedContext::Overpaid => Context::Overpaid,
            UnresolvedContext::Multiple => Context::Multiple,
        }),
        _ => None,
    };
    Some((status, context))
}

// === impl Tables (inside the write transaction) ===

impl Tables<'_> {
    /// Queues the confirmation of `record`'s current status for its terminal, or records it as
    /// undeliverable when that terminal is not registered (or revoked).
    pub(super) fn enqueue(
        &mut self,
        record: &IntentRecord,
        accepted_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let Some((status, context)) = status_of(record) else {
            return Ok(());
        };
        let terminal = match record.terminal_id.as_deref() {
            Some(id) => self.terminal(id)?.filter(|t| t.revoked_at.is_none()),
            None => None,
        };
        let Some(mut terminal) = terminal else {
            let key = record.terminal_id.as_deref().unwrap_or(NO_TERMINAL);
            self.kv
                .multi_insert(MultiTable::Undeliverable, key, &record.id)?;
            return Ok(());
        };
        let seq = terminal.next_seq;
        terminal.next_seq += 1;
        self.save_terminal(&terminal)?;
        let issued_at = accepted_at.format(&Rfc3339).unwrap_or_default();
        let base = Confirmation::new(
            &terminal.id,
            &record.id,
            seq,
            status,
            record.expected_micros,
            &issued_at,
        );
        let confirmation = Confirmation {
            context,
            currency: record.currency.clone().unwrap_or(base.currency.clone()),
            order_id: record.order_id.clone(),
            tx_hash: record.tx_hash.clone(),
            ..base
        };
        let row = OutboxRow {
            terminal_id: terminal.id.clone(),
            tenant: terminal.tenant.clone(),
            seq,
            intent_id: record.id.clone(),
            confirmation,
            accepted_at_us: (accepted_at.unix_timestamp_nanos() / 1000) as i64,
        };
        self.kv
            .outbox_insert(&terminal.id, seq, encode(&row.intent_id, &row)?.as_slice())?;
        self.new_rows.push(row);
        Ok(())
    }

    /// Moves a terminal's unacked confirmations to undeliverable: nobody will ack them (a revoked
    /// terminal), and left in the outbox they would be republished and alerted on forever.
    pub(super) fn park(&mut self, terminal_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
        let mut rows = Vec::new();
        self.kv.outbox_scan(Some(terminal_id), &mut |_, value| {
            rows.push(decode::<OutboxRow>(terminal_id, value)?);
            Ok(true)
        })?;
        for row in &rows {
            self.kv.outbox_remove(terminal_id, row.seq)?;
            self.kv
                .multi_insert(MultiTable::Undeliverable, terminal_id, &row.intent_id)?;
        }
        Ok(rows)
    }

    /// Sends an undeliverable intent's confirmation to `terminal_id` from now on (its record
    /// names that terminal; later events follow it).
    fn assign(
        &mut self,
        intent_id: &str,
        terminal_id: &str,
        now: OffsetDateTime,
    ) -> Result<Result<(), AssignRefused>, StoreError> {
        let Some(mut intent) = self.intent(intent_id)? else {
            return Ok(Err(AssignRefused::NoIntent));
        };
        match self.terminal(terminal_id)? {
            None => return Ok(Err(AssignRefused::NoTerminal)),
            Some(t) if t.revoked_at.is_some() => return Ok(Err(AssignRefused::Revoked)),
            Some(_) => {}
        }
        let key = intent.record.terminal_id.as_deref().unwrap_or(NO_TERMINAL);
        if !self
            .kv
            .multi_remove(MultiTable::Undeliverable, key, intent_id)?
        {
            return Ok(Err(AssignRefused::NotWaiting));
        }
        intent.record.terminal_id = Some(terminal_id.to_owned());
        self.save_intent(&intent)?;
        self.enqueue(&intent.record, now)?;
        Ok(Ok(()))
    }

    fn ack(
        &mut self,
        terminal_id: &str,
        intent_id: &str,
        seq: u64,
    ) -> Result<AckOutcome, StoreError> {
        let row: OutboxRow = match self.kv.outbox_get(terminal_id, seq)? {
            Some(v) => decode(intent_id, &v)?,
            None => return Ok(AckOutcome::Unknown),
        };
        if row.intent_id != intent_id {
            return Ok(AckOutcome::Unknown);
        }
        // This row and the older rows of the same intent are done; a newer one keeps the topic.
        let mut done = vec![seq];
        let mut newer_waiting = false;
        self.kv
            .outbox_scan(Some(terminal_id), &mut |(_, s), value| {
                if s == seq {
                    return Ok(true);
                }
                let other: OutboxRow = decode(intent_id, value)?;
                if other.intent_id == intent_id {
                    if s < seq {
                        done.push(s);
                    } else {
                        newer_waiting = true;
                    }
                }
                Ok(true)
            })?;
        for s in &done {
            self.kv.outbox_remove(terminal_id, *s)?;
        }
        Ok(AckOutcome::Delivered {
            row: Box::new(row),
            removed: done.len(),
            clear: !newer_waiting,
        })
    }
}

// === impl Store (the outbox) ===

impl Store {
    /// Assigns an undeliverable confirmation to another (registered, not revoked) terminal; its
    /// confirmation is queued for that terminal in the same write.
    ///
    /// # Errors
    /// As any write.
    pub async fn assign_undeliverable(
        &self,
        intent_id: String,
        terminal_id: String,
    ) -> Result<Result<(), AssignRefused>, StoreError> {
        let op = Operation::new(
            "assign to another terminal",
            OpKey::Intent(intent_id.clone()),
        );
        self.write(op, move |t| {
            t.assign(&intent_id, &terminal_id, OffsetDateTime::now_utc())
        })
        .await
    }

    /// Records terminals' acks `(terminal, intent, seq)` in one write, with an outcome for each,
    /// in order (`None`: that ack could not be applied, e.g. its row does not decode; it is
    /// logged and the others still count). Not fsync'd on its own: an ack lost in a crash means
    /// one more delivery of a confirmation the terminal already has, which it deduplicates.
    ///
    /// # Errors
    /// As any write; then none of them is recorded.
    pub async fn ack_many(
        &self,
        acks: Vec<(String, String, u64)>,
    ) -> Result<Vec<Option<AckOutcome>>, StoreError> {
        let op = Operation::new("ack", OpKey::many(acks.len(), "acks"));
        self.write_deferred(op, move |t| {
            let mut outcomes = Vec::with_capacity(acks.len());
            for (terminal_id, intent_id, seq) in &acks {
                match t.ack(terminal_id, intent_id, *seq) {
                    Ok(outcome) => outcomes.push(Some(outcome)),
                    // The database refused a statement: the whole transaction is lost (and
                    // retried if it was a conflict), not only this ack.
                    Err(e) if e.is_database_refusal() => return Err(e),
                    Err(e) => {
                        tracing::error!(%terminal_id, %intent_id, seq, error = %e, error_chain = ?e, "ack not applied");
                        outcomes.push(None);
                    }
                }
            }
            Ok(outcomes)
        })
        .await
    }

    /// Unacked rows, in `seq` order per terminal; one terminal's, or everyone's.
    ///
    /// # Errors
    /// As any read.
    pub async fn outbox(&self, terminal_id: Option<String>) -> Result<Vec<OutboxRow>, StoreError> {
        let key = terminal_id.clone().map_or(OpKey::None, OpKey::Terminal);
        self.read(Operation::new("read the outbox", key), move |kv| {
            let mut rows = Vec::new();
            kv.outbox_scan(terminal_id.as_deref(), &mut |(terminal, _), value| {
                rows.push(decode(terminal, value)?);
                Ok(true)
            })?;
            Ok(rows)
        })
        .await
    }

    /// Intents whose confirmation waits for a terminal that is not registered.
    ///
    /// # Errors
    /// As any read.
    pub async fn undeliverable(&self) -> Result<Vec<Undeliverable>, StoreError> {
        self.read(
            Operation::new("read undeliverable confirmations", OpKey::None),
            |kv| {
                let mut out = Vec::new();
                kv.multi_scan(MultiTable::Undeliverable, &mut |terminal, intent| {
                    out.push(Undeliverable {
                        terminal_id: (terminal != NO_TERMINAL).then(|| terminal.to_owned()),
                        intent_id: String::from_utf8_lossy(intent).into_owned(),
                    });
                    Ok(true)
                })?;
                Ok(out)
            },
        )
        .await
    }
}
