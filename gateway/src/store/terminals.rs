//! The terminal registry: registration, revocation, certificate renewal and the retirement of a
//! replaced certificate, and when each terminal was last seen. Apart from the outbox
//! (`outbox.rs`), which it touches only where a registration releases confirmations that waited
//! for the terminal and a revocation parks those it will never ack.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::kv::{KvRead, KvWrite, MultiTable, StrTable};
use super::outbox::OutboxRow;
use super::writer::{Tables, encode};
use super::{OpKey, Operation, Store, StoreError, decode};
use crate::pki::Serial;

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
    /// Whether its current certificate names its serial (as the subject's serialNumber and the
    /// URI [`crate::pki::cert_uri`]), as every certificate posgate issues now does. `false` in
    /// records written before: a broker that maps certificates to users by name (NATS) must then
    /// still know that certificate by its subject alone.
    #[serde(default)]
    pub cert_names_serial: bool,
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
    /// Whether it names its serial ([`TerminalRecord::cert_names_serial`] while it was current).
    #[serde(default)]
    pub names_serial: bool,
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

/// A revoked terminal, and the confirmations it will never ack: taken out of the outbox and
/// kept as undeliverable (by intent) until someone assigns them to another terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub record: TerminalRecord,
    pub parked: Vec<OutboxRow>,
}

// === impl Tables (inside the write transaction) ===

impl Tables<'_> {
    pub(super) fn terminal(&self, id: &str) -> Result<Option<TerminalRecord>, StoreError> {
        match self.kv.get(StrTable::Terminals, id)? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    pub(super) fn save_terminal(&mut self, t: &TerminalRecord) -> Result<(), StoreError> {
        self.kv
            .insert(StrTable::Terminals, &t.id, encode(&t.id, t)?.as_slice())?;
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
            // Registered with a certificate from `Pki::issue_terminal*`, which names its serial.
            cert_names_serial: true,
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

    fn touch(&mut self, terminal_id: &str, at: OffsetDateTime) -> Result<(), StoreError> {
        if let Some(mut terminal) = self.terminal(terminal_id)? {
            terminal.last_seen = Some(at);
            self.save_terminal(&terminal)?;
        }
        Ok(())
    }
}

// === impl Store (the registry) ===

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
}
