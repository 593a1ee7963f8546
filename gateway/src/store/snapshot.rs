//! Intent objects read from the provider (a GET, a create, a cancel), applied like a webhook.

use bytes::Bytes;
use posgate_proto::event::{EventData, PaymentIntent};
use time::OffsetDateTime;

use super::{IncomingEvent, Ingested, Store, StoreError};

/// Why a snapshot was not applied. Nothing was committed in any case.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the provider's intent object does not parse")]
    Parse(#[source] serde_json::Error),
    #[error("asked the provider for {expected}, it answered for {got}")]
    WrongIntent { expected: String, got: String },
    #[error("storing the snapshot of {intent_id}")]
    Store {
        intent_id: String,
        #[source]
        source: StoreError,
    },
}

impl Store {
    /// Applies an intent object read from the provider through the same transaction, state
    /// machine and outbox as a webhook. It is kept like an event of kind `kind` (the intent's
    /// history names why the gateway read it: `reconcile.payment_intent`, `rpc.qr_rejected`, …).
    /// With `expected`, an object about another intent is refused before anything is written.
    ///
    /// # Errors
    /// [`SnapshotError`]; nothing is committed then.
    pub async fn ingest_snapshot(
        &self,
        raw: Bytes,
        kind: &str,
        expected: Option<&str>,
    ) -> Result<(PaymentIntent, Ingested), SnapshotError> {
        let snapshot: PaymentIntent = serde_json::from_slice(&raw).map_err(SnapshotError::Parse)?;
        if let Some(expected) = expected
            && snapshot.id != expected
        {
            return Err(SnapshotError::WrongIntent {
                expected: expected.to_owned(),
                got: snapshot.id,
            });
        }
        let now = OffsetDateTime::now_utc();
        let event = IncomingEvent {
            event_id: format!("rec_{}_{}", snapshot.id, now.unix_timestamp_nanos()),
            kind: kind.into(),
            raw,
            received_at: now,
            created_at: Some(now),
            data: Ok(EventData::PaymentIntent(snapshot.clone())),
        };
        let ingested = self
            .ingest(event)
            .await
            .map_err(|source| SnapshotError::Store {
                intent_id: snapshot.id.clone(),
                source,
            })?;
        Ok((snapshot, ingested))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limits;
    use crate::store::testing::{Kind, TestDb, on_both_backends};

    /// An answer about another intent is refused before the commit: nothing of it is stored.
    async fn a_snapshot_of_another_intent_is_refused_before_it_is_stored(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(16, 16)).await;
        let raw = Bytes::from_static(
            br#"{"id":"pi_other","status":"confirmed","amount":"1.00","metadata":{}}"#,
        );
        let refused = store
            .ingest_snapshot(raw.clone(), "reconcile.payment_intent", Some("pi_asked"))
            .await;
        assert!(
            matches!(&refused, Err(SnapshotError::WrongIntent { got, .. }) if got == "pi_other"),
            "{refused:?}"
        );
        assert!(store.intent("pi_other".into()).await.unwrap().is_none());
        let (snapshot, _) = store
            .ingest_snapshot(raw, "reconcile.payment_intent", Some("pi_other"))
            .await
            .unwrap();
        assert_eq!(snapshot.id, "pi_other");
        assert!(store.intent("pi_other".into()).await.unwrap().is_some());
        store.close().await;
    }

    on_both_backends!(a_snapshot_of_another_intent_is_refused_before_it_is_stored,);
}
