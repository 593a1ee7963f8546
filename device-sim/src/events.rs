//! Provider events as the provider sends them (provider-api.md §4): compact JSON, amounts as JSON
//! numbers, signed with [`posgate_proto::sign`] over `"{timestamp}.{body}"`.

use posgate_proto::MicroUsdc;
use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The webhook path on the gateway.
pub const WEBHOOK_PATH: &str = "/webhooks/stablegenius";

/// USDC on Base mainnet (the `qr_payload` target).
pub const USDC_BASE: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";

/// What an intent snapshot says.
#[derive(Clone, Debug)]
pub struct Intent {
    pub id: String,
    pub status: String,
    pub amount: MicroUsdc,
    pub terminal_id: Option<String>,
    pub order_id: Option<String>,
    pub payment_address: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

impl Intent {
    /// A fresh intent of `amount`, created now, expiring in 5 minutes.
    pub fn new(id: &str, amount: MicroUsdc, terminal_id: &str) -> Self {
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        Intent {
            id: id.to_owned(),
            status: "awaiting_payment".into(),
            amount,
            terminal_id: Some(terminal_id.to_owned()),
            order_id: Some(format!("ord-{id}")),
            payment_address: address_for(id),
            created_at: now,
            expires_at: now + time::Duration::minutes(5),
        }
    }

    /// The intent object as the provider's API and webhooks show it.
    pub fn to_json(&self) -> Value {
        let mut metadata = serde_json::Map::new();
        if let Some(t) = &self.terminal_id {
            metadata.insert("terminal_id".into(), json!(t));
        }
        if let Some(o) = &self.order_id {
            metadata.insert("order_id".into(), json!(o));
        }
        json!({
            "id": self.id,
            "object": "payment_intent",
            "status": self.status,
            "amount": number(self.amount),
            "currency": "usd",
            "merchant_id": "mer_sim",
            "payment_address": self.payment_address,
            "chain": "base",
            "token": "USDC",
            "qr_payload": format!(
                "ethereum:{USDC_BASE}@8453/transfer?address={}&uint256={}",
                self.payment_address, self.amount.0
            ),
            "expires_at": rfc3339(self.expires_at),
            "created_at": rfc3339(self.created_at),
            "metadata": metadata,
        })
    }
}

/// A deterministic 20-byte address for an id (the simulator's "payment address").
pub fn address_for(id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::from("0x");
    for salt in 0u8..3 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (id, salt).hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(42);
    out
}

/// A JSON number with the amount's exact decimal text (never through `f64`).
pub fn number(amount: MicroUsdc) -> Value {
    match amount.to_string().parse::<serde_json::Number>() {
        Ok(n) => Value::Number(n),
        Err(_) => Value::String(amount.to_string()),
    }
}

/// RFC 3339 UTC, seconds precision.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// An event envelope around `data`.
pub fn envelope(event_id: &str, kind: &str, data: Value) -> String {
    json!({
        "id": event_id,
        "object": "event",
        "type": kind,
        "api_version": "2026-04-01",
        "created_at": rfc3339(OffsetDateTime::now_utc()),
        "data": data,
    })
    .to_string()
}

/// A `payment_intent.{status}` event for `intent`, with its status set accordingly.
pub fn intent_event(event_id: &str, status: &str, intent: &Intent) -> String {
    let mut intent = intent.clone();
    intent.status = status.to_owned();
    envelope(
        event_id,
        &format!("payment_intent.{status}"),
        intent.to_json(),
    )
}

/// A `transaction.created` event paying `amount` to `intent`'s address, confirmed at `at`.
pub fn transaction_event(
    event_id: &str,
    txn_id: &str,
    intent: &Intent,
    amount: MicroUsdc,
    at: OffsetDateTime,
) -> String {
    envelope(
        event_id,
        "transaction.created",
        json!({
            "id": txn_id,
            "object": "transaction",
            "payment_intent_id": intent.id,
            "merchant_id": "mer_sim",
            "status": "confirmed",
            "amount": number(amount),
            "currency": "usd",
            "chain": "base",
            "token": "USDC",
            "tx_hash": format!("0x{:0>64}", txn_id.trim_start_matches("txn_")),
            "payment_address": intent.payment_address,
            "sender_address": "0x8E8e8633490576C8a000543F0E7d50D5E54c31b5",
            "block_number": 44107218,
            "confirmed_at": rfc3339(at),
            "settlement_status": "pending",
        }),
    )
}

/// A `settlement.completed` event listing `intent_ids`.
pub fn settlement_event(event_id: &str, intent_ids: &[&str]) -> String {
    envelope(
        event_id,
        "settlement.completed",
        json!({
            "id": format!("stl_{event_id}"),
            "object": "settlement",
            "status": "completed",
            "merchant_id": "mer_sim",
            "currency": "usd",
            "payment_intent_ids": intent_ids,
        }),
    )
}

/// The two webhook headers for `body` signed with `secret` at `timestamp`.
pub fn signed_headers(secret: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 2] {
    let ts = timestamp.to_string();
    let signature = posgate_proto::sign(secret.as_bytes(), &ts, body);
    [(TIMESTAMP_HEADER, ts), (SIGNATURE_HEADER, signature)]
}

/// Now, as the provider's clock would say.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use posgate_proto::event::{Envelope, EventData};

    use super::*;

    #[test]
    fn events_parse_as_the_gateway_reads_them() {
        let intent = Intent::new("pi_1", MicroUsdc(4_400_000), "pos-1");
        let body = intent_event("evt_1", "confirmed", &intent);
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let EventData::PaymentIntent(pi) = EventData::parse(env.event_type(), env.data).unwrap()
        else {
            panic!()
        };
        assert_eq!(pi.amount, MicroUsdc(4_400_000));
        assert!(body.contains(r#""amount":4.40"#), "{body}");
        let body = transaction_event(
            "evt_2",
            "txn_1",
            &intent,
            MicroUsdc(10),
            OffsetDateTime::now_utc(),
        );
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let EventData::Transaction(tx) = EventData::parse(env.event_type(), env.data).unwrap()
        else {
            panic!()
        };
        assert_eq!(tx.amount, MicroUsdc(10));
        assert_eq!(address_for("pi_1").len(), 42);
    }

    #[test]
    fn signed_headers_match_the_known_answer() {
        use posgate_proto::webhook::vectors;
        let [(_, ts), (_, sig)] = signed_headers(
            vectors::SECRET,
            vectors::TIMESTAMP.parse().unwrap(),
            vectors::CONFIRMED_BODY.as_bytes(),
        );
        assert_eq!(ts, vectors::TIMESTAMP);
        assert_eq!(sig, vectors::CONFIRMED_SIGNATURE);
    }
}
