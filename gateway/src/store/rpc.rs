//! What terminal RPC needs from the store: intents created through the gateway, and the answers
//! already given (a retried request id gets the same answer).

use posgate_proto::event::PaymentIntent;
use time::OffsetDateTime;

use super::writer::{Tables, encode};
use super::{RPC_ANSWERS, Store, StoreError, decode};

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
        self.read(
            "the RPC answer of",
            format!("{terminal_id}/{request_id}"),
            move |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(RPC_ANSWERS)?;
                let value = table.get((terminal_id.as_str(), request_id.as_str()))?;
                value.map(|v| decode(&request_id, v.value())).transpose()
            },
        )
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
        self.write(move |t| {
            if let Some(pi) = &created {
                t.adopt_intent(pi, &terminal_id, OffsetDateTime::now_utc())?;
            }
            let bytes = encode(&request_id, &answer)?;
            t.rpc_answers.insert(
                (terminal_id.as_str(), request_id.as_str()),
                bytes.as_slice(),
            )?;
            Ok(())
        })
        .await
    }
}
