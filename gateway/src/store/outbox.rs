//! Terminals, the outbox of confirmations, acks and revocations: the delivery side of the store.
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

use super::kv::{KvRead, KvWrite, MultiTable, StrTable};
use super::writer::{Tables, encode};
use super::{OpKey, Operation, Store, StoreError, decode};
use crate::domain::{IntentRecord, IntentStatus, UnresolvedContext};
use crate::pki::Serial;

/// Key for intents that name no terminal at all.
const NO_TERMINAL: &str = "";

/// A registered terminal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TerminalRecord {
    pub id: String,
    /// Its MQTT tenant (`posgate_proto::topics::tenant_for(id)`).
    pub tenant: String,
    pub merchant_id: String,
    pub label: Option<String>,
    /// Serial of its client certificate (lowercase hex).
    pub cert_serial: String,
    /// SHA-256 (hex) of its bearer token for the HTTP channels; the token itself is never stored.
    #[serde(default)]
    pub http_token_sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// The `seq` of its next confirmation.
    pub next_seq: u64,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// End of validity of its current certificate. `None` in records written before posgate
    /// kept it: see [`TerminalRecord::cert_expiry`].
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub cert_not_after: Option<OffsetDateTime>,
    /// The certificate a renewal replaced, still accepted until the new one is first used or
    /// its `revoke_at`, whichever comes first; then its serial joins `revoked_serials`.
    #[serde(default)]
    pub previous_cert: Option<PreviousCert>,
}

/// A terminal's replaced certificate while its renewal is pending.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreviousCert {
    /// Its serial (lowercase hex).
    pub serial: String,
    /// Its end of validity, when known.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    /// When it is revoked if the new certificate has not been used by then.
    #[serde(with = "time::serde::rfc3339")]
    pub revoke_at: OffsetDateTime,
}

impl TerminalRecord {
    /// Whether a client certificate with this serial speaks for this terminal: its current one,
    /// or the one a pending renewal replaced. (Revocation is checked apart: `revoked_at`.)
    pub fn accepts_serial(&self, serial: &str) -> bool {
        let serial = Serial::parse(serial);
        serial == Serial::parse(&self.cert_serial)
            || self
                .previous_cert
                .as_ref()
                .is_some_and(|p| serial == Serial::parse(&p.serial))
    }

    /// End of validity of its current certificate. Records from before posgate kept it
    /// (`cert_not_after` absent) had theirs issued at `created_at` for
    /// [`TERMINAL_VALIDITY_DAYS`](crate::pki::TERMINAL_VALIDITY_DAYS) (capped by the CA, which
    /// the caller applies), so that is what is answered for them.
    pub fn cert_expiry(&self) -> OffsetDateTime {
        self.cert_not_after
            .unwrap_or(self.created_at + time::Duration::days(crate::pki::TERMINAL_VALIDITY_DAYS))
    }
}

/// What registration needs.
#[derive(Clone, Debug)]
pub struct NewTerminal {
    pub id: String,
    pub tenant: String,
    pub merchant_id: String,
    pub label: Option<String>,
    pub cert_serial: String,
    /// End of validity of that certificate.
    pub cert_not_after: Option<OffsetDateTime>,
    pub http_token_sha256: String,
}

/// What a certificate renewal changes.
#[derive(Clone, Debug)]
pub struct RenewTerminal {
    /// The new certificate's serial and end of validity.
    pub cert_serial: String,
    pub cert_not_after: OffsetDateTime,
    /// When the current certificate is revoked if the new one has not been used by then.
    pub revoke_old_at: OffsetDateTime,
    /// A new bearer token's hash, when the token is rotated too (the old one stops at once).
    pub http_token_sha256: Option<String>,
}

/// A renewal as committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub record: TerminalRecord,
    /// The serial revoked by this renewal at once: the certificate of an earlier renewal that was
    /// still pending, so never used (its first use would have completed that renewal).
    pub superseded: Option<String>,
}

/// Why a renewal was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewRefused {
    /// No such terminal.
    NoTerminal,
    /// That terminal is revoked (for good: provision a new id).
    Revoked,
}

/// A replaced certificate now revoked: its renewal completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retired {
    pub terminal_id: String,
    pub serial: String,
    /// Why: the new certificate was used, or the deadline passed.
    pub used: bool,
}

#[cfg(test)]
impl NewTerminal {
    /// A terminal for unit tests: `id` with its own tenant (`topics::tenant_for`), merchant
    /// `mer_test`, certificate serial `01`, no HTTP token.
    pub(crate) fn for_test(id: &str) -> NewTerminal {
        NewTerminal {
            id: id.into(),
            tenant: posgate_proto::topics::tenant_for(id),
            merchant_id: "mer_test".into(),
            label: None,
            cert_serial: "01".into(),
            cert_not_after: None,
            http_token_sha256: String::new(),
        }
    }
}

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

/// A revoked terminal, and the confirmations it will never ack: taken out of the outbox and
/// kept as undeliverable (by intent) until someone assigns them to another terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub record: TerminalRecord,
    pub parked: Vec<OutboxRow>,
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
    pub(super) fn terminal(&self, id: &str) -> Result<Option<TerminalRecord>, StoreError> {
        match self.kv.get(StrTable::Terminals, id)? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    fn save_terminal(&mut self, t: &TerminalRecord) -> Result<(), StoreError> {
        self.kv
            .insert(StrTable::Terminals, &t.id, encode(&t.id, t)?.as_slice())?;
        Ok(())
    }

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

    fn register(
        &mut self,
        new: NewTerminal,
        now: OffsetDateTime,
    ) -> Result<Option<TerminalRecord>, StoreError> {
        if self.terminal(&new.id)?.is_some() {
            return Ok(None);
        }
        let record = TerminalRecord {
            id: new.id,
            tenant: new.tenant,
            merchant_id: new.merchant_id,
            label: new.label,
            cert_serial: new.cert_serial,
            http_token_sha256: new.http_token_sha256,
            created_at: now,
            revoked_at: None,
            next_seq: 1,
            last_seen: None,
            cert_not_after: new.cert_not_after,
            previous_cert: None,
        };
        self.save_terminal(&record)?;
        // Confirmations that waited for this terminal go out now, with their intent's current status.
        let waiting = self
            .kv
            .multi_remove_all(MultiTable::Undeliverable, &record.id)?;
        for intent_id in waiting {
            if let Some(intent) = self.intent(&intent_id)? {
                self.enqueue(&intent.record, now)?;
            }
        }
        self.terminal(&record.id)
    }

    fn revoke(&mut self, id: &str, now: OffsetDateTime) -> Result<Option<Revocation>, StoreError> {
        let Some(mut terminal) = self.terminal(id)? else {
            return Ok(None);
        };
        if terminal.revoked_at.is_none() {
            terminal.revoked_at = Some(now);
            self.save_terminal(&terminal)?;
        }
        self.kv.insert(
            StrTable::RevokedSerials,
            &terminal.cert_serial,
            terminal.id.as_bytes(),
        )?;
        if let Some(previous) = &terminal.previous_cert {
            self.kv.insert(
                StrTable::RevokedSerials,
                &previous.serial,
                terminal.id.as_bytes(),
            )?;
        }
        let parked = self.park(&terminal.id)?;
        Ok(Some(Revocation {
            record: terminal,
            parked,
        }))
    }

    /// Moves a terminal's unacked confirmations to undeliverable: nobody will ack them (a revoked
    /// terminal), and left in the outbox they would be republished and alerted on forever.
    fn park(&mut self, terminal_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
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

    fn renew(
        &mut self,
        id: &str,
        renew: RenewTerminal,
    ) -> Result<Result<Renewal, RenewRefused>, StoreError> {
        let Some(mut terminal) = self.terminal(id)? else {
            return Ok(Err(RenewRefused::NoTerminal));
        };
        if terminal.revoked_at.is_some() {
            return Ok(Err(RenewRefused::Revoked));
        }
        let superseded = match terminal.previous_cert.take() {
            // A renewal already pending: its new certificate was never used (a use completes it),
            // so that one goes, and the certificate the terminal really has stays accepted.
            Some(mut previous) => {
                self.kv.insert(
                    StrTable::RevokedSerials,
                    &terminal.cert_serial,
                    terminal.id.as_bytes(),
                )?;
                previous.revoke_at = renew.revoke_old_at;
                terminal.previous_cert = Some(previous);
                Some(terminal.cert_serial.clone())
            }
            None => {
                terminal.previous_cert = Some(PreviousCert {
                    serial: terminal.cert_serial.clone(),
                    not_after: Some(terminal.cert_expiry()),
                    revoke_at: renew.revoke_old_at,
                });
                None
            }
        };
        terminal.cert_serial = renew.cert_serial;
        terminal.cert_not_after = Some(renew.cert_not_after);
        if let Some(hash) = renew.http_token_sha256 {
            terminal.http_token_sha256 = hash;
        }
        self.save_terminal(&terminal)?;
        Ok(Ok(Renewal {
            record: terminal,
            superseded,
        }))
    }

    /// Revokes a terminal's replaced certificate if `used` is its current serial, or if `now` is
    /// past the replaced one's deadline.
    fn retire(
        &mut self,
        id: &str,
        used: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Option<Retired>, StoreError> {
        let Some(mut terminal) = self.terminal(id)? else {
            return Ok(None);
        };
        let Some(previous) = terminal.previous_cert.clone() else {
            return Ok(None);
        };
        let by_use = used.is_some_and(|s| Serial::parse(s) == Serial::parse(&terminal.cert_serial));
        if !by_use && now < previous.revoke_at {
            return Ok(None);
        }
        self.kv.insert(
            StrTable::RevokedSerials,
            &previous.serial,
            terminal.id.as_bytes(),
        )?;
        terminal.previous_cert = None;
        self.save_terminal(&terminal)?;
        Ok(Some(Retired {
            terminal_id: terminal.id,
            serial: previous.serial,
            used: by_use,
        }))
    }

    fn touch(&mut self, terminal_id: &str, at: OffsetDateTime) -> Result<(), StoreError> {
        if let Some(mut terminal) = self.terminal(terminal_id)? {
            terminal.last_seen = Some(at);
            self.save_terminal(&terminal)?;
        }
        Ok(())
    }
}

// === impl Store (fleet API) ===

impl Store {
    /// Registers a terminal; `None` when the id exists. Confirmations that waited for it are queued.
    ///
    /// # Errors
    /// As any write.
    pub async fn register_terminal(
        &self,
        new: NewTerminal,
    ) -> Result<Option<TerminalRecord>, StoreError> {
        let op = Operation::new("register", OpKey::Terminal(new.id.clone()));
        self.write(op, move |t| {
            t.register(new.clone(), OffsetDateTime::now_utc())
        })
        .await
    }

    /// Revokes a terminal (idempotent); `None` for an unknown id. Its unacked confirmations
    /// become undeliverable in the same write.
    ///
    /// # Errors
    /// As any write.
    pub async fn revoke_terminal(&self, id: String) -> Result<Option<Revocation>, StoreError> {
        let op = Operation::new("revoke", OpKey::Terminal(id.clone()));
        self.write(op, move |t| t.revoke(&id, OffsetDateTime::now_utc()))
            .await
    }

    /// Gives a terminal a new certificate (and maybe a new bearer token). Its current
    /// certificate stays accepted as `previous_cert` until [`Store::retire_used`] or
    /// [`Store::retire_due`] revokes it; a renewal while one is pending revokes the pending one's
    /// never-used certificate at once ([`Renewal::superseded`]).
    ///
    /// # Errors
    /// As any write.
    pub async fn renew_terminal(
        &self,
        id: String,
        renew: RenewTerminal,
    ) -> Result<Result<Renewal, RenewRefused>, StoreError> {
        let op = Operation::new("renew", OpKey::Terminal(id.clone()));
        self.write(op, move |t| t.renew(&id, renew.clone())).await
    }

    /// A client certificate with `serial` was just used by terminal `id`: if that is the new
    /// certificate of a pending renewal, the replaced one is revoked (durably) and returned.
    ///
    /// # Errors
    /// As any write.
    pub async fn retire_used(
        &self,
        id: String,
        serial: String,
    ) -> Result<Option<Retired>, StoreError> {
        let op = Operation::new(
            "retire the replaced certificate",
            OpKey::Certificate {
                terminal_id: id.clone(),
                serial: serial.clone(),
            },
        );
        self.write(op, move |t| {
            t.retire(&id, Some(&serial), OffsetDateTime::now_utc())
        })
        .await
    }

    /// Revokes every replaced certificate whose deadline is at or before `now`.
    ///
    /// # Errors
    /// As any write; then none is revoked.
    pub async fn retire_due(&self, now: OffsetDateTime) -> Result<Vec<Retired>, StoreError> {
        let due: Vec<String> = self
            .renewing()
            .await?
            .into_iter()
            .filter(|t| t.previous_cert.as_ref().is_some_and(|p| p.revoke_at <= now))
            .map(|t| t.id)
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let op = Operation::new(
            "retire replaced certificates",
            OpKey::many(due.len(), "terminals"),
        );
        self.write(op, move |t| {
            let mut retired = Vec::new();
            for id in &due {
                retired.extend(t.retire(id, None, now)?);
            }
            Ok(retired)
        })
        .await
    }

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

    /// Records when terminals were last seen (connects and disconnects, batched).
    ///
    /// # Errors
    /// As any write.
    pub async fn touch_terminals(
        &self,
        seen: Vec<(String, OffsetDateTime)>,
    ) -> Result<(), StoreError> {
        let op = Operation::new("record last seen", OpKey::many(seen.len(), "terminals"));
        self.write_deferred(op, move |t| {
            for (terminal_id, at) in &seen {
                t.touch(terminal_id, *at)?;
            }
            Ok(())
        })
        .await
    }

    /// One terminal.
    ///
    /// # Errors
    /// As any read.
    pub async fn terminal(&self, id: String) -> Result<Option<TerminalRecord>, StoreError> {
        self.record(StrTable::Terminals, OpKey::Terminal(id.clone()), id)
            .await
    }

    /// Every terminal with its number of unacked confirmations, in id order.
    ///
    /// # Errors
    /// As any read.
    pub async fn terminals(&self) -> Result<Vec<(TerminalRecord, u64)>, StoreError> {
        self.read(Operation::new("read terminals", OpKey::None), |kv| {
            let mut records = Vec::new();
            kv.scan(StrTable::Terminals, "", &mut |key, value| {
                records.push(decode::<TerminalRecord>(key, value)?);
                Ok(true)
            })?;
            // One pass over the outbox (in terminal order), not one scan per terminal.
            let mut counts = std::collections::HashMap::<String, u64>::new();
            kv.outbox_scan(None, &mut |(terminal, _), _| {
                match counts.get_mut(terminal) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(terminal.to_owned(), 1);
                    }
                }
                Ok(true)
            })?;
            Ok(records
                .into_iter()
                .map(|record| {
                    let pending = counts.get(&record.id).copied().unwrap_or(0);
                    (record, pending)
                })
                .collect())
        })
        .await
    }

    /// The terminals with a pending certificate renewal (`previous_cert` set), in id order. Reads
    /// only the registry (not the outbox, unlike [`Store::terminals`]): it runs at every start.
    ///
    /// # Errors
    /// As any read.
    pub async fn renewing(&self) -> Result<Vec<TerminalRecord>, StoreError> {
        self.read(Operation::new("read pending renewals", OpKey::None), |kv| {
            let mut out = Vec::new();
            kv.scan(StrTable::Terminals, "", &mut |key, value| {
                let record: TerminalRecord = decode(key, value)?;
                if record.previous_cert.is_some() {
                    out.push(record);
                }
                Ok(true)
            })?;
            Ok(out)
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

    /// Every revocation: the serials of revoked client certificates (revoked terminals' and
    /// certificates replaced by a renewal), and the revoked terminal ids.
    ///
    /// # Errors
    /// As any read.
    pub async fn revocations(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        self.read(Operation::new("read revocations", OpKey::None), |kv| {
            let mut serials = Vec::new();
            kv.scan(StrTable::RevokedSerials, "", &mut |serial, _terminal| {
                serials.push(serial.to_owned());
                Ok(true)
            })?;
            // Not the ids in `revoked_serials`: a renewal puts a live terminal's old serial there.
            let mut terminals = Vec::new();
            kv.scan(StrTable::Terminals, "", &mut |key, value| {
                let record: TerminalRecord = decode(key, value)?;
                if record.revoked_at.is_some() {
                    terminals.push(record.id);
                }
                Ok(true)
            })?;
            Ok((serials, terminals))
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

#[cfg(test)]
mod renewal_tests {
    use crate::store::testing::{Kind, TestDb, on_both_backends};
    use time::Duration;

    use super::*;
    use crate::store::Limits;

    fn renew(serial: &str, revoke_old_at: OffsetDateTime) -> RenewTerminal {
        RenewTerminal {
            cert_serial: serial.into(),
            cert_not_after: revoke_old_at + Duration::days(365),
            revoke_old_at,
            http_token_sha256: None,
        }
    }

    async fn a_renewal_keeps_both_until_the_new_one_is_used_and_survives_a_reopen(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(64, 16)).await;
        store
            .register_terminal(NewTerminal::for_test("pos-1"))
            .await
            .unwrap()
            .unwrap();
        let later = OffsetDateTime::now_utc() + Duration::days(7);
        let renewal = store
            .renew_terminal("pos-1".into(), renew("0a", later))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(renewal.superseded, None);
        let record = renewal.record;
        assert!(record.accepts_serial("01") && record.accepts_serial("0A"));
        assert!(!record.accepts_serial("02"));
        // Neither serial is revoked, and the terminal is not either.
        assert_eq!(store.revocations().await.unwrap(), (vec![], vec![]));

        // The old certificate's use completes nothing.
        assert_eq!(
            store
                .retire_used("pos-1".into(), "01".into())
                .await
                .unwrap(),
            None
        );
        assert!(
            store
                .retire_due(OffsetDateTime::now_utc())
                .await
                .unwrap()
                .is_empty()
        );

        store.close().await;
        let store = db.open(Limits::new(64, 16)).await;
        let record = store.terminal("pos-1".into()).await.unwrap().unwrap();
        assert_eq!(record.previous_cert.as_ref().unwrap().serial, "01");

        let retired = store
            .retire_used("pos-1".into(), "0a".into())
            .await
            .unwrap();
        assert_eq!(
            retired,
            Some(Retired {
                terminal_id: "pos-1".into(),
                serial: "01".into(),
                used: true
            })
        );
        let record = store.terminal("pos-1".into()).await.unwrap().unwrap();
        assert!(!record.accepts_serial("01") && record.accepts_serial("0a"));
        // The old serial is revoked; the terminal is not.
        assert_eq!(
            store.revocations().await.unwrap(),
            (vec!["01".to_owned()], vec![])
        );
    }

    async fn deadlines_a_second_renewal_and_refusals(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(64, 16)).await;
        for id in ["pos-1", "pos-2"] {
            store
                .register_terminal(NewTerminal::for_test(id))
                .await
                .unwrap()
                .unwrap();
        }
        let now = OffsetDateTime::now_utc();
        store
            .renew_terminal("pos-1".into(), renew("0a", now + Duration::hours(1)))
            .await
            .unwrap()
            .unwrap();
        // A second renewal before the first completed: the never-used 0a goes at once, 01 (the
        // one the terminal has) stays, with the new deadline.
        let second = store
            .renew_terminal("pos-1".into(), renew("0b", now + Duration::hours(2)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.superseded.as_deref(), Some("0a"));
        let previous = second.record.previous_cert.clone().unwrap();
        assert_eq!(
            (previous.serial.as_str(), previous.revoke_at),
            ("01", now + Duration::hours(2))
        );
        assert!(!second.record.accepts_serial("0a"));
        store
            .renew_terminal("pos-2".into(), renew("0c", now + Duration::hours(3)))
            .await
            .unwrap()
            .unwrap();

        assert!(
            store
                .retire_due(now + Duration::minutes(90))
                .await
                .unwrap()
                .is_empty()
        );
        let retired = store.retire_due(now + Duration::hours(2)).await.unwrap();
        assert_eq!(
            retired,
            vec![Retired {
                terminal_id: "pos-1".into(),
                serial: "01".into(),
                used: false
            }]
        );
        let (serials, terminals) = store.revocations().await.unwrap();
        assert_eq!((serials.len(), terminals.len()), (2, 0), "{serials:?}");

        assert_eq!(
            store
                .renew_terminal("nobody".into(), renew("0d", now))
                .await
                .unwrap(),
            Err(RenewRefused::NoTerminal)
        );
        // Revoking a terminal mid-renewal revokes both of its certificates.
        store
            .revoke_terminal("pos-2".into())
            .await
            .unwrap()
            .unwrap();
        let (serials, terminals) = store.revocations().await.unwrap();
        assert!(serials.contains(&"0c".to_owned()) && serials.contains(&"01".to_owned()));
        assert_eq!(terminals, vec!["pos-2".to_owned()]);
        assert_eq!(
            store
                .renew_terminal("pos-2".into(), renew("0d", now))
                .await
                .unwrap(),
            Err(RenewRefused::Revoked)
        );
    }

    on_both_backends!(
        a_renewal_keeps_both_until_the_new_one_is_used_and_survives_a_reopen,
        deadlines_a_second_renewal_and_refusals,
    );
}
