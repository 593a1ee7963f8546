//! What reconciliation needs from the store: transfers found by listing the provider's
//! transactions, the orphan transfers among them, and the listing's cursor.
//!
//! Tables (values are JSON):
//! - `orphan_transfers`: `txn_…` → [`OrphanTransfer`]: transfers that match no intent (no
//!   `payment_intent_id` and no intent with their address, provider-api.md §6.5; or naming an
//!   intent the provider answers `404` for). Never pushed to
//!   a terminal, never dropped; the admin API lists them (`GET /v1/orphan-transfers`).
//! - `reconcile_state`: `transactions_cursor` → when the last complete listing started, so a
//!   restart resumes from there instead of skipping a window.
//!
//! A listed transfer goes through the webhook's own path ([`Tables::ingest`]: the same event
//! dedupe, state machine and outbox, in the same write transaction), as an event with the
//! deterministic id `evt_rec_{txn_id}` whose body is a `transaction.created` envelope around the
//! provider's transaction object, byte for byte. Before that, a transfer the gateway already has
//! (recorded on an intent, or kept by a webhook while it waits for its intent) is recognised by
//! its `txn_…` id and has no second effect.

use posgate_proto::event::{Envelope, EventData, Transaction};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::kv::{KvRead, KvWrite, MultiTable, StrTable};
use super::writer::{Tables, address_key, encode};
use super::{
    EventOutcome, IncomingEvent, Ingested, OpKey, Operation, Store, StoreError, StoredEvent, decode,
};

const CURSOR_KEY: &str = "transactions_cursor";

/// The stored kind of an event made from a listed transfer.
pub const LISTED_KIND: &str = "reconcile.transaction";

/// The event id under which a listed transfer is stored (and deduplicated).
pub fn listed_event_id(txn_id: &str) -> String {
    format!("evt_rec_{txn_id}")
}

/// A transfer that matches no intent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrphanTransfer {
    pub txn_id: String,
    /// The intent the provider named, if any.
    pub payment_intent_id: Option<String>,
    pub payment_address: Option<String>,
    /// Decimal string, e.g. `"1.00"`.
    pub amount: String,
    pub amount_micros: u64,
    pub tx_hash: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub confirmed_at: Option<OffsetDateTime>,
    /// When the gateway recorded it as an orphan.
    #[serde(with = "time::serde::rfc3339")]
    pub found_at: OffsetDateTime,
    /// The stored event that carried it (a webhook's `evt_…`, or `evt_rec_…` from a listing).
    pub event_id: String,
}

/// What became of a listed transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    /// Already recorded on an intent, or seen by an earlier listing: nothing was done.
    Duplicate,
    /// A webhook brought it before and it still waits for its intent: nothing was applied.
    Waiting {
        /// The intent it names (worth a lookup at the provider).
        intent_id: Option<String>,
        /// Recorded as an orphan just now.
        orphaned: bool,
    },
    /// New to the gateway: applied through the webhook path.
    New {
        ingested: Ingested,
        /// Recorded as an orphan just now (it matches no intent).
        orphaned: bool,
    },
}

/// A `transaction.created` envelope around the provider's transaction object (kept exact), so a
/// listed transfer that waits for its intent is replayed like a webhook's.
fn envelope(event_id: &str, raw_tx: &str, created_at: OffsetDateTime) -> String {
    let created = created_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        r#"{{"id":{},"object":"event","type":"transaction.created","api_version":"2026-04-01","created_at":{},"data":{raw_tx}}}"#,
        serde_json::Value::from(event_id),
        serde_json::Value::from(created),
    )
}

impl Tables<'_> {
    /// Applies one transfer found by a listing (see the module docs).
    fn ingest_listed(
        &mut self,
        tx: &Transaction,
        raw_tx: &str,
        now: OffsetDateTime,
    ) -> Result<Listed, StoreError> {
        let event_id = listed_event_id(&tx.id);
        if self.kv.get(StrTable::Events, &event_id)?.is_some() {
            return Ok(Listed::Duplicate);
        }
        match self.find_intent_for(tx)? {
            Some(intent) if intent.record.txns.iter().any(|t| t == &tx.id) => {
                return Ok(Listed::Duplicate);
            }
            Some(_) => {}
            None => {
                if let Some(webhook_event) = self.pending_transfer(tx)? {
                    let orphaned = tx.payment_intent_id.is_none()
                        && self.record_orphan(tx, &webhook_event, now)?;
                    return Ok(Listed::Waiting {
                        intent_id: tx.payment_intent_id.clone(),
                        orphaned,
                    });
                }
            }
        }
        let event = IncomingEvent {
            event_id: event_id.clone(),
            kind: LISTED_KIND.into(),
            raw: bytes::Bytes::from(envelope(&event_id, raw_tx, now)),
            received_at: now,
            created_at: Some(now),
            data: Ok(EventData::Transaction(tx.clone())),
        };
        let ingested = self.ingest(&event)?;
        let pending = matches!(
            &ingested,
            Ingested::New {
                outcome: EventOutcome::Pending,
                ..
            }
        );
        let orphaned =
            pending && tx.payment_intent_id.is_none() && self.record_orphan(tx, &event_id, now)?;
        Ok(Listed::New { ingested, orphaned })
    }

    /// The id of a stored event that carries `tx` and waits for its intent, if any.
    fn pending_transfer(&self, tx: &Transaction) -> Result<Option<String>, StoreError> {
        let mut keys = Vec::new();
        keys.extend(tx.payment_intent_id.clone());
        keys.extend(tx.payment_address.as_deref().map(address_key));
        for key in keys {
            if let Some((id, _)) = self
                .pending_transfers(&key)?
                .into_iter()
                .find(|(_, t)| t.id == tx.id)
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// The transfers kept under `key` (an intent id or [`address_key`]) while they wait for their
    /// intent, with the ids of the events that carry them.
    fn pending_transfers(&self, key: &str) -> Result<Vec<(String, Transaction)>, StoreError> {
        let ids = self.kv.multi_get(MultiTable::Pending, key)?;
        let mut out = Vec::new();
        for id in ids {
            let Some(value) = self.kv.get(StrTable::Events, &id)? else {
                continue;
            };
            let stored: StoredEvent = decode(&id, &value)?;
            let Some(raw) = &stored.raw else {
                // Applied since (under its other key): it no longer waits.
                continue;
            };
            if let Some(EventData::Transaction(tx)) = Envelope::parse(raw.get().as_bytes())
                .ok()
                .and_then(|env| EventData::parse(env.event_type(), env.data).ok())
            {
                out.push((id, tx));
            }
        }
        Ok(out)
    }

    /// The provider does not know `intent_id`: the transfers waiting for it match no intent and
    /// are recorded as orphans (they stay kept under the intent too). Returns the new orphans.
    fn orphan_unknown_intent(
        &mut self,
        intent_id: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let mut new = Vec::new();
        for (event_id, tx) in self.pending_transfers(intent_id)? {
            if self.record_orphan(&tx, &event_id, now)? {
                new.push(tx.id);
            }
        }
        Ok(new)
    }

    /// Records `tx` as an orphan; `false` when it already was one.
    fn record_orphan(
        &mut self,
        tx: &Transaction,
        event_id: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        if self.kv.get(StrTable::OrphanTransfers, &tx.id)?.is_some() {
            return Ok(false);
        }
        let orphan = OrphanTransfer {
            txn_id: tx.id.clone(),
            payment_intent_id: tx.payment_intent_id.clone(),
            payment_address: tx.payment_address.clone(),
            amount: tx.amount.to_string(),
            amount_micros: tx.amount.0,
            tx_hash: tx.tx_hash.clone(),
            confirmed_at: tx.confirmed_at,
            found_at: now,
            event_id: event_id.to_owned(),
        };
        self.kv.insert(
            StrTable::OrphanTransfers,
            &tx.id,
            encode(&tx.id, &orphan)?.as_slice(),
        )?;
        Ok(true)
    }
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
}

impl Store {
    /// Applies a transfer found by listing the provider's transactions, durably, through the
    /// webhook's path; `raw_tx` is the provider's transaction object as sent.
    ///
    /// # Errors
    /// As any write.
    pub async fn ingest_listed(
        &self,
        tx: Transaction,
        raw_tx: String,
        now: OffsetDateTime,
    ) -> Result<Listed, StoreError> {
        let op = Operation::new("ingest listed", OpKey::Transaction(tx.id.clone()));
        self.write_provider(op, move |t| t.ingest_listed(&tx, &raw_tx, now))
            .await
    }

    /// Records the transfers waiting for `intent_id`, which the provider does not know, as
    /// orphans; returns the `txn_…` ids newly recorded.
    ///
    /// # Errors
    /// As any write.
    pub async fn orphan_unknown_intent(
        &self,
        intent_id: String,
        now: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let op = Operation::new("orphan the transfers", OpKey::Intent(intent_id.clone()));
        self.write_provider(op, move |t| t.orphan_unknown_intent(&intent_id, now))
            .await
    }

    /// When the last complete listing of the provider's transactions started.
    ///
    /// # Errors
    /// As any read.
    pub async fn transactions_cursor(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        self.read(
            Operation::new("read the transactions cursor", OpKey::None),
            |kv| {
                let value = kv.get(StrTable::ReconcileState, CURSOR_KEY)?;
                value
                    .map(|v| decode::<Cursor>(CURSOR_KEY, &v).map(|c| c.at))
                    .transpose()
            },
        )
        .await
    }

    /// Durably records that a complete listing started at `at`.
    ///
    /// # Errors
    /// As any write.
    pub async fn set_transactions_cursor(&self, at: OffsetDateTime) -> Result<(), StoreError> {
        let op = Operation::new("set the transactions cursor", OpKey::None);
        self.write(op, move |t| {
            let bytes = encode(CURSOR_KEY, &Cursor { at })?;
            t.kv.insert(StrTable::ReconcileState, CURSOR_KEY, bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Every orphan transfer, oldest first.
    ///
    /// # Errors
    /// As any read.
    pub async fn orphan_transfers(&self) -> Result<Vec<OrphanTransfer>, StoreError> {
        self.read(Operation::new("read orphan transfers", OpKey::None), |kv| {
            let mut out: Vec<OrphanTransfer> = Vec::new();
            kv.scan(StrTable::OrphanTransfers, "", &mut |key, value| {
                out.push(decode(key, value)?);
                Ok(true)
            })?;
            out.sort_by_key(|o| o.found_at);
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::testing::{Kind, TestDb, on_both_backends};
    use posgate_proto::MicroUsdc;
    use posgate_proto::event::PaymentIntent;

    use super::*;
    use crate::domain::{IntentStatus, UnresolvedContext};
    use crate::store::Limits;

    const ADDRESS: &str = "0xAbC0000000000000000000000000000000000001";

    async fn store(kind: Kind) -> (TestDb, Store) {
        crate::store::testing::store(kind, Limits::new(16, 16)).await
    }

    fn raw_tx(id: &str, intent: Option<&str>, address: &str, amount: &str) -> String {
        let intent = intent.map_or("null".to_owned(), |i| format!("{i:?}"));
        format!(
            r#"{{"id":"{id}","object":"transaction","payment_intent_id":{intent},"amount":{amount},"payment_address":"{address}","tx_hash":"0xfeed","confirmed_at":"2026-04-01T20:00:07Z"}}"#
        )
    }

    async fn list(store: &Store, raw: &str) -> Listed {
        let tx: Transaction = serde_json::from_str(raw).unwrap();
        store
            .ingest_listed(tx, raw.to_owned(), OffsetDateTime::now_utc())
            .await
            .unwrap()
    }

    /// The transfer `raw` as a `transaction.created` webhook brought it, under `event_id`.
    async fn webhook(store: &Store, event_id: &str, raw: &str) {
        let body = format!(
            r#"{{"id":"{event_id}","object":"event","type":"transaction.created","created_at":"2026-04-01T20:00:12Z","data":{raw}}}"#
        );
        let tx: Transaction = serde_json::from_str(raw).unwrap();
        store
            .ingest(IncomingEvent {
                event_id: event_id.into(),
                kind: "transaction.created".into(),
                raw: bytes::Bytes::from(body),
                received_at: OffsetDateTime::now_utc(),
                created_at: None,
                data: Ok(EventData::Transaction(tx)),
            })
            .await
            .unwrap();
    }

    async fn known_intent(store: &Store, id: &str) {
        let pi: PaymentIntent = serde_json::from_value(serde_json::json!({
            "id": id, "status": "awaiting_payment", "amount": 4.5,
            "payment_address": ADDRESS, "expires_at": "2026-04-01T20:04:21Z",
            "metadata": {"terminal_id": "pos-1", "order_id": "ord-1"}
        }))
        .unwrap();
        store
            .save_rpc_answer(
                "pos-1".into(),
                format!("req-{id}"),
                Some(pi),
                serde_json::json!({}),
            )
            .await
            .unwrap();
    }

    fn applied(listed: &Listed) -> bool {
        matches!(
            listed,
            Listed::New {
                ingested: Ingested::New {
                    outcome: EventOutcome::Applied,
                    ..
                },
                orphaned: false
            }
        )
    }

    async fn a_listed_underpayment_moves_a_known_intent_once(kind: Kind) {
        let (_db, store) = store(kind).await;
        known_intent(&store, "pi_1").await;
        let raw = raw_tx("txn_1", Some("pi_1"), ADDRESS, "4.40");
        let first = list(&store, &raw).await;
        assert!(applied(&first), "{first:?}");
        let intent = store.intent("pi_1".into()).await.unwrap().unwrap();
        assert_eq!(intent.record.status, IntentStatus::Unresolved);
        assert_eq!(
            intent.record.primary_context(),
            Some(UnresolvedContext::Underpaid)
        );
        let outbox = store.outbox(None).await.unwrap().len();
        // Seen again (the listing overlaps): no second effect.
        assert_eq!(list(&store, &raw).await, Listed::Duplicate);
        let again = store.intent("pi_1".into()).await.unwrap().unwrap();
        assert_eq!(again, intent);
        assert_eq!(store.outbox(None).await.unwrap().len(), outbox);
    }

    async fn a_transfer_a_webhook_already_brought_is_a_duplicate(kind: Kind) {
        let (_db, store) = store(kind).await;
        known_intent(&store, "pi_1").await;
        let raw = raw_tx("txn_1", Some("pi_1"), ADDRESS, "4.40");
        webhook(&store, "evt_w1", &raw).await;
        let before = store.intent("pi_1".into()).await.unwrap().unwrap();
        assert_eq!(list(&store, &raw).await, Listed::Duplicate);
        assert_eq!(store.intent("pi_1".into()).await.unwrap().unwrap(), before);
        assert!(
            store
                .event(listed_event_id("txn_1"))
                .await
                .unwrap()
                .is_none()
        );
    }

    async fn matched_by_address_when_the_intent_id_is_missing(kind: Kind) {
        let (_db, store) = store(kind).await;
        known_intent(&store, "pi_1").await;
        let raw = raw_tx("txn_1", None, &ADDRESS.to_lowercase(), "4.50");
        assert!(applied(&list(&store, &raw).await));
        let intent = store.intent("pi_1".into()).await.unwrap().unwrap();
        assert_eq!(intent.record.txns, ["txn_1"]);
        assert_eq!(intent.record.received_micros, MicroUsdc(4_500_000));
    }

    async fn an_unknown_intent_waits_and_is_applied_when_it_appears(kind: Kind) {
        let (_db, store) = store(kind).await;
        let raw = raw_tx("txn_1", Some("pi_1"), ADDRESS, "4.40");
        let listed = list(&store, &raw).await;
        let Listed::New {
            ingested:
                Ingested::New {
                    outcome,
                    unknown_intents,
                    ..
                },
            orphaned,
        } = listed
        else {
            panic!("{listed:?}")
        };
        assert_eq!(
            (outcome, unknown_intents, orphaned),
            (EventOutcome::Pending, vec!["pi_1".to_owned()], false)
        );
        // The intent appears (the lookup's snapshot, or a create): the waiting transfer applies.
        known_intent(&store, "pi_1").await;
        let intent = store.intent("pi_1".into()).await.unwrap().unwrap();
        assert_eq!(intent.record.txns, ["txn_1"]);
        assert_eq!(intent.record.status, IntentStatus::Unresolved);
        assert_eq!(list(&store, &raw).await, Listed::Duplicate);
    }

    async fn a_transfer_matching_nothing_is_an_orphan_once(kind: Kind) {
        let (_db, store) = store(kind).await;
        let raw = raw_tx("txn_9", None, "0x9999", "1.00");
        let listed = list(&store, &raw).await;
        assert!(
            matches!(listed, Listed::New { orphaned: true, .. }),
            "{listed:?}"
        );
        assert_eq!(list(&store, &raw).await, Listed::Duplicate);
        let orphans = store.orphan_transfers().await.unwrap();
        assert_eq!(orphans.len(), 1);
        assert_eq!(
            (orphans[0].txn_id.as_str(), orphans[0].amount_micros),
            ("txn_9", 1_000_000)
        );
        assert_eq!(orphans[0].event_id, listed_event_id("txn_9"));
    }

    async fn a_webhook_orphan_is_recorded_by_the_listing(kind: Kind) {
        let (_db, store) = store(kind).await;
        let raw = raw_tx("txn_9", None, "0x9999", "1.00");
        webhook(&store, "evt_w9", &raw).await;
        assert_eq!(
            list(&store, &raw).await,
            Listed::Waiting {
                intent_id: None,
                orphaned: true
            }
        );
        assert_eq!(
            list(&store, &raw).await,
            Listed::Waiting {
                intent_id: None,
                orphaned: false
            }
        );
        let orphans = store.orphan_transfers().await.unwrap();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].event_id, "evt_w9");
    }

    async fn the_cursor_survives_a_reopen(kind: Kind) {
        let (db, store) = store(kind).await;
        assert_eq!(store.transactions_cursor().await.unwrap(), None);
        assert!(store.orphan_transfers().await.unwrap().is_empty());
        let at = time::macros::datetime!(2026-04-01 20:00:00 UTC);
        store.set_transactions_cursor(at).await.unwrap();
        store.close().await;
        let store = db.open(Limits::new(16, 16)).await;
        assert_eq!(store.transactions_cursor().await.unwrap(), Some(at));
        store.close().await;
    }

    on_both_backends!(
        a_listed_underpayment_moves_a_known_intent_once,
        a_transfer_a_webhook_already_brought_is_a_duplicate,
        matched_by_address_when_the_intent_id_is_missing,
        an_unknown_intent_waits_and_is_applied_when_it_appears,
        a_transfer_matching_nothing_is_an_orphan_once,
        a_webhook_orphan_is_recorded_by_the_listing,
        the_cursor_survives_a_reopen,
    );
}
