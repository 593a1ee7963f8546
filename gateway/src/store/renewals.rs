//! Certificate renewal in the registry: a terminal's new certificate is recorded beside the one
//! it replaces, which stays accepted until the new one is first used or a deadline passes, then is
//! retired (revoked). Kept apart from registration and revocation (`terminals.rs`), whose record
//! it changes.

use time::OffsetDateTime;

use super::kv::{KvRead, KvWrite, StrTable};
use super::terminals::{PreviousCert, TerminalRecord};
use super::writer::Tables;
use super::{OpKey, Operation, Store, StoreError, decode};
use crate::pki::Serial;

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

// === impl Tables (inside the write transaction) ===

impl Tables<'_> {
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
                    names_serial: terminal.cert_names_serial,
                });
                None
            }
        };
        terminal.cert_serial = renew.cert_serial;
        terminal.cert_not_after = Some(renew.cert_not_after);
        // Issued by `Pki::issue_terminal*`, which names its serial.
        terminal.cert_names_serial = true;
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
}

// === impl Store (renewals) ===

impl Store {
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
}

#[cfg(test)]
mod tests {
    use crate::store::testing::{Kind, TestDb, on_both_backends, register};
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
        register(&store, "pos-1").await;
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
            register(&store, id).await;
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
