//! What terminal RPC needs from the store: intents created through the gateway, and the answers
//! already given (a retried request id gets the same answer), kept for a retention period.
//!
//! An answer is stored as `{"at": unix seconds, "answer": …}`. Answers stored before the time was
//! recorded (the bare answer) count as the oldest: the first prune removes them, and a retry of
//! such an old request is answered afresh (a `create_intent` then finds its intent by the
//! provider's idempotency key).

use posgate_proto::event::PaymentIntent;
use time::OffsetDateTime;

use super::kv::{KvRead, KvWrite};
use super::writer::{Tables, encode};
use super::{OpKey, Operation, Store, StoreError, decode};

/// An answer and when it was given.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    at: i64,
    answer: serde_json::Value,
}

/// Reads only the time of a stored answer: 0 for an answer stored without one.
fn stored_at(bytes: &[u8]) -> i64 {
    #[derive(serde::Deserialize)]
    struct At {
        at: Option<i64>,
    }
    serde_json::from_slice::<At>(bytes)
        .ok()
        .and_then(|a| a.at)
        .unwrap_or(0)
}

impl Tables<'_> {
    /// Records an intent created through the gateway for `terminal_id` (before the terminal is
    /// answered), or gives an existing record of it that terminal when it had none.
    fn adopt_intent(
        &mut self,
        pi: &PaymentIntent,
        terminal_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut intent = match self.intent(&pi.id)? {
            Some(intent) => intent,
            None => {
                let mut intent = self.create_intent(pi, now)?;
                intent.record.terminal_id = Some(terminal_id.to_owned());
                let mut effects = Vec::new();
                self.resolve_pending(&mut intent, &mut effects)?;
                intent
            }
        };
        if intent.record.terminal_id.is_none() {
            intent.record.terminal_id = Some(terminal_id.to_owned());
        }
        self.save_intent(&intent)
    }
}

impl Store {
    /// The answer already given to `(terminal_id, request_id)`, if any.
    ///
    /// # Errors
    /// As any read.
    pub async fn rpc_answer(
        &self,
        terminal_id: String,
        request_id: String,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let op = Operation::new("read the answer", OpKey::request(&terminal_id, &request_id));
        self.read(op, move |kv| {
            let Some(value) = kv.rpc_get(&terminal_id, &request_id)? else {
                return Ok(None);
            };
            let value: serde_json::Value = decode(&request_id, &value)?;
            // A bare answer was stored before answers carried their time.
            match serde_json::from_value::<StoredAnswer>(value.clone()) {
                Ok(stored) => Ok(Some(stored.answer)),
                Err(_) => Ok(Some(value)),
            }
        })
        .await
    }

    /// Durably records the answer to a request, and the intent it created (if any), before the
    /// terminal is told.
    ///
    /// # Errors
    /// As any write.
    pub async fn save_rpc_answer(
        &self,
        terminal_id: String,
        request_id: String,
        created: Option<PaymentIntent>,
        answer: serde_json::Value,
    ) -> Result<(), StoreError> {
        let op = Operation::new("save the answer", OpKey::request(&terminal_id, &request_id));
        self.write(op, move |t| {
            if let Some(pi) = &created {
                t.adopt_intent(pi, &terminal_id, OffsetDateTime::now_utc())?;
            }
            let stored = StoredAnswer {
                at: OffsetDateTime::now_utc().unix_timestamp(),
                answer: answer.clone(),
            };
            let bytes = encode(&request_id, &stored)?;
            t.kv.rpc_insert(&terminal_id, &request_id, bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Removes up to `at_most` answers given before `before`; says how many it removed.
    ///
    /// # Errors
    /// As any write.
    pub async fn prune_rpc_answers(
        &self,
        before: OffsetDateTime,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        let cutoff = before.unix_timestamp();
        let op = Operation::new("prune old RPC answers", OpKey::None);
        self.write(op, move |t| {
            let mut expired = Vec::new();
            t.kv.rpc_scan(&mut |(terminal_id, request_id), value| {
                if stored_at(value) < cutoff {
                    expired.push((terminal_id.to_owned(), request_id.to_owned()));
                    if expired.len() >= at_most {
                        return Ok(false);
                    }
                }
                Ok(true)
            })?;
            for (terminal_id, request_id) in &expired {
                t.kv.rpc_remove(terminal_id, request_id)?;
            }
            Ok(expired.len())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::testing::{Kind, TestDb, on_both_backends};
    use serde_json::json;
    use time::{Duration, OffsetDateTime};

    use crate::store::Limits;
    use crate::store::kv::KvWrite;
    use crate::store::{OpKey, Operation};

    /// Answers older than the retention go, newer ones and their replays stay; an answer stored
    /// before answers carried their time counts as the oldest.
    async fn old_answers_are_pruned_and_new_ones_kept(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(64, 64)).await;
        for n in 0..5 {
            store
                .save_rpc_answer("pos_a".into(), format!("r{n}"), None, json!({"n": n}))
                .await
                .unwrap();
        }
        store
            .write(Operation::new("insert a legacy answer", OpKey::None), |t| {
                t.kv.rpc_insert(
                    "pos_a",
                    "legacy",
                    br#"{"id":"legacy","result":{}}"#.as_slice(),
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let legacy = store
            .rpc_answer("pos_a".into(), "legacy".into())
            .await
            .unwrap();
        assert_eq!(legacy, Some(json!({"id": "legacy", "result": {}})));
        assert_eq!(
            store.rpc_answer("pos_a".into(), "r3".into()).await.unwrap(),
            Some(json!({"n": 3}))
        );
        let an_hour_ago = OffsetDateTime::now_utc() - Duration::hours(1);
        // Only the legacy answer is older than an hour.
        assert_eq!(store.prune_rpc_answers(an_hour_ago, 100).await.unwrap(), 1);
        assert_eq!(
            store
                .rpc_answer("pos_a".into(), "legacy".into())
                .await
                .unwrap(),
            None
        );
        assert!(
            store
                .rpc_answer("pos_a".into(), "r0".into())
                .await
                .unwrap()
                .is_some()
        );
        // With the cutoff in the future everything is old: removed at most `at_most` at a time.
        let later = OffsetDateTime::now_utc() + Duration::hours(1);
        assert_eq!(store.prune_rpc_answers(later, 3).await.unwrap(), 3);
        assert_eq!(store.prune_rpc_answers(later, 3).await.unwrap(), 2);
        assert_eq!(store.prune_rpc_answers(later, 3).await.unwrap(), 0);
        store.close().await;
    }

    on_both_backends!(old_answers_are_pruned_and_new_ones_kept,);
}
