//! The customer's side: a scripted transfer ([`PayReceipt`]) to an intent's address or to an
//! unknown one, landing on chain after the scaled confirmation delay; it records the transaction,
//! confirms an intent paid exactly and on time, and emits `transaction.created` and
//! `payment_intent.confirmed` in random order.

use std::sync::Arc;
use std::time::Duration;

use posgate_proto::MicroUsdc;
use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use super::ApiError;
use super::error::poisoned;
use super::model::{self, IntentStatus, Payment, Transaction};
use super::state::Core;
use super::stats::bump;

/// What a scripted payment will do.
#[derive(Clone, Debug, Serialize)]
pub struct PayReceipt {
    /// The intent paid, if the address belongs to one.
    pub intent_id: Option<String>,
    /// The transfer that will appear.
    pub transaction_id: String,
    /// The amount sent.
    pub amount: String,
    /// Integer micro-USDC sent.
    pub amount_micros: u64,
    /// Whether it is confirmed after `expires_at`.
    pub late: bool,
}

// === impl Core ===

impl Core {
    /// Schedules the customer's transfer to `intent_id`.
    pub(super) fn pay(
        self: &Arc<Self>,
        intent_id: &str,
        amount: Option<MicroUsdc>,
        late: bool,
    ) -> Result<PayReceipt, ApiError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        let intent = state
            .intents
            .get(intent_id)
            .ok_or_else(|| ApiError::not_found("intent_id", "payment intent"))?;
        let amount = amount.unwrap_or(intent.amount);
        let deadline = state.deadlines.get(intent_id).copied();
        drop(state);
        let mut wait = self.scaled(self.config.confirm_delay);
        if late && let Some(deadline) = deadline {
            wait += deadline.saturating_duration_since(tokio::time::Instant::now());
        }
        self.schedule_transfer(Some(intent_id), None, amount, late, wait)
    }

    /// Schedules a transfer to an address no intent has (`payment_intent_id: null`).
    pub(super) fn pay_unknown(
        self: &Arc<Self>,
        amount: MicroUsdc,
        address: Option<String>,
    ) -> Result<PayReceipt, ApiError> {
        let wait = self.scaled(self.config.confirm_delay);
        let address = address.unwrap_or_else(model::random_address);
        self.schedule_transfer(None, Some(address), amount, false, wait)
    }

    /// Refuses a zero `amount`, else lands a new transfer of it on chain after `wait` (unless the
    /// simulator stops first): to `intent_id`'s address, or to `address` when no intent is named.
    fn schedule_transfer(
        self: &Arc<Self>,
        intent_id: Option<&str>,
        address: Option<String>,
        amount: MicroUsdc,
        late: bool,
        wait: Duration,
    ) -> Result<PayReceipt, ApiError> {
        if amount.0 == 0 {
            return Err(ApiError::invalid(
                "amount",
                "amount_invalid",
                "amount must be positive",
            ));
        }
        let txn_id = model::new_id("txn_");
        let span = match intent_id {
            Some(intent_id) => tracing::info_span!("payment", intent_id = %intent_id),
            None => tracing::info_span!("payment_unknown"),
        };
        let core = Arc::clone(self);
        let token = self.token.clone();
        let (intent, txn) = (intent_id.map(str::to_owned), txn_id.clone());
        self.tracker.spawn(
            async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = tokio::time::sleep(wait) => core.confirm_transfer(intent.as_deref(), address, &txn, amount, late),
                }
            }
            .instrument(span),
        );
        Ok(PayReceipt {
            intent_id: intent_id.map(str::to_owned),
            transaction_id: txn_id,
            amount: amount.to_string(),
            amount_micros: amount.0,
            late,
        })
    }

    /// The transfer lands on chain: record it, confirm the intent if it was paid exactly and on
    /// time, and emit `transaction.created` (and `payment_intent.confirmed`) in random order.
    fn confirm_transfer(
        &self,
        intent_id: Option<&str>,
        address: Option<String>,
        txn_id: &str,
        amount: MicroUsdc,
        late: bool,
    ) {
        let now = self.now();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.block_number = state.block_number.max(44_107_000) + 1;
        let block_number = state.block_number;
        let expired_by_clock = intent_id
            .and_then(|id| state.deadlines.get(id))
            .is_some_and(|d| tokio::time::Instant::now() >= *d);
        let sender = model::random_address();
        let tx_hash = model::random_tx_hash();
        let mut confirmed = None;
        let txn = match intent_id.and_then(|id| state.intents.get_mut(id)) {
            Some(intent) => {
                let late = late || expired_by_clock || intent.status == IntentStatus::Expired;
                // A late transfer is dated after `expires_at` even at whole-second precision.
                let confirmed_at = if late {
                    now.max(intent.expires_at + time::Duration::seconds(1))
                } else {
                    now
                };
                if !late
                    && intent.status == IntentStatus::AwaitingPayment
                    && amount == intent.amount
                {
                    intent.status = IntentStatus::Confirmed;
                    intent.payment = Some(Payment {
                        txn_id: txn_id.to_owned(),
                        tx_hash: tx_hash.clone(),
                        sender_address: sender.clone(),
                        block_number,
                        confirmed_at,
                    });
                    confirmed = Some(intent.to_json());
                }
                Transaction {
                    id: txn_id.to_owned(),
                    payment_intent_id: Some(intent.id.clone()),
                    merchant_id: intent.merchant_id.clone(),
                    amount,
                    tx_hash,
                    payment_address: intent.payment_address.clone(),
                    sender_address: sender,
                    block_number,
                    confirmed_at,
                    metadata: Some(intent.metadata.clone()),
                }
            }
            None => {
                let address = address.unwrap_or_else(model::random_address);
                let owner = state.by_address.get(&address.to_ascii_lowercase()).cloned();
                Transaction {
                    id: txn_id.to_owned(),
                    payment_intent_id: owner,
                    merchant_id: self.config.merchant_id.clone(),
                    amount,
                    tx_hash,
                    payment_address: address,
                    sender_address: sender,
                    block_number,
                    confirmed_at: now,
                    metadata: None,
                }
            }
        };
        let txn_json = txn.to_json();
        let intent_ref = txn.payment_intent_id.clone();
        state.transactions.push(txn);
        drop(state);
        bump(&self.counters.transactions);
        let mut out: Vec<(&str, Value)> = vec![("transaction.created", txn_json)];
        if let Some(object) = confirmed {
            out.push(("payment_intent.confirmed", object));
        }
        out.shuffle(&mut rand::rng());
        for (kind, data) in out {
            self.emit(kind, intent_ref.as_deref(), data);
        }
    }
}
