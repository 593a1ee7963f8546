//! The provider's event envelope and the typed `data` of each event type.
//!
//! Parsing is two-step so that nothing is ever dropped: the [`Envelope`] (`id`, `type`, `data` as raw
//! JSON) is all the gateway needs to deduplicate and store an event; [`EventData::parse`] then reads
//! `data` by type. An unknown type, or `data` that does not fit its type, still has a valid envelope
//! and is kept. Provider types ignore unknown fields (the provider adds fields without notice).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::amount::MicroUsdc;

/// Longest id we store (provider-api.md §2.1).
pub const MAX_ID_BYTES: usize = 255;

/// Whether `id` can be a key of the store: 1 to `max` bytes, no control characters. Every id
/// that becomes a key is checked: PostgreSQL's `text` cannot hold a NUL byte, so one such id
/// would otherwise fail the whole batch of webhooks it was written with.
pub fn is_usable_id(id: &str, max: usize) -> bool {
    !id.is_empty() && id.len() <= max && !id.chars().any(char::is_control)
}

/// The outer event envelope, borrowed from the raw body.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    /// `evt_…`: the deduplication key.
    pub id: String,
    /// The event type, e.g. `payment_intent.confirmed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Expected `2026-04-01`; another value is logged, not refused.
    #[serde(default)]
    pub api_version: Option<String>,
    /// When the provider created the event.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    /// The object snapshot, parsed later by type.
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// Why a body is not an event envelope (answered `400`).
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not a JSON event envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("event id must start with `evt_` and be at most 255 bytes, without control characters")]
    BadId,
    #[error("event type must not be empty")]
    EmptyType,
    #[error("event data must be a JSON object")]
    DataNotObject,
}

impl<'a> Envelope<'a> {
    /// Parses and checks the envelope of a raw (already verified) body.
    ///
    /// # Errors
    /// [`EnvelopeError`] when the body is not JSON, or lacks a usable `id`, `type` or object `data`.
    pub fn parse(body: &'a [u8]) -> Result<Self, EnvelopeError> {
        let env: Envelope<'a> = serde_json::from_slice(body)?;
        if !env.id.starts_with("evt_") || env.id.len() <= 4 || !is_usable_id(&env.id, MAX_ID_BYTES)
        {
            return Err(EnvelopeError::BadId);
        }
        if env.kind.is_empty() {
            return Err(EnvelopeError::EmptyType);
        }
        if !env.data.get().trim_start().starts_with('{') {
            return Err(EnvelopeError::DataNotObject);
        }
        Ok(env)
    }

    /// The event type.
    pub fn event_type(&self) -> EventType {
        EventType::from_name(&self.kind)
    }
}

/// The event types the gateway acts on; anything else is [`EventType::Unknown`] and only stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    PaymentIntentConfirmed,
    PaymentIntentExpired,
    PaymentIntentCancelled,
    TransactionCreated,
    SettlementCompleted,
    SettlementFailed,
    Unknown,
}

impl EventType {
    /// Maps the wire name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "payment_intent.confirmed" => EventType::PaymentIntentConfirmed,
            "payment_intent.expired" => EventType::PaymentIntentExpired,
            "payment_intent.cancelled" => EventType::PaymentIntentCancelled,
            "transaction.created" => EventType::TransactionCreated,
            "settlement.completed" => EventType::SettlementCompleted,
            "settlement.failed" => EventType::SettlementFailed,
            _ => EventType::Unknown,
        }
    }

    /// A stable label for metrics (unknown names are not echoed, to bound label cardinality).
    pub fn label(self) -> &'static str {
        match self {
            EventType::PaymentIntentConfirmed => "payment_intent.confirmed",
            EventType::PaymentIntentExpired => "payment_intent.expired",
            EventType::PaymentIntentCancelled => "payment_intent.cancelled",
            EventType::TransactionCreated => "transaction.created",
            EventType::SettlementCompleted => "settlement.completed",
            EventType::SettlementFailed => "settlement.failed",
            EventType::Unknown => "unknown",
        }
    }
}

/// `metadata` as echoed by the provider: at most 10 string keys.
pub type Metadata = BTreeMap<String, serde_json::Value>;

/// A payment intent snapshot (`data` of `payment_intent.*` events, and the REST object).
#[derive(Clone, Debug, Deserialize)]
pub struct PaymentIntent {
    #[serde(deserialize_with = "de_id")]
    pub id: String,
    pub status: String,
    #[serde(deserialize_with = "de_micros")]
    pub amount: MicroUsdc,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub merchant_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub payment_address: Option<String>,
    #[serde(default)]
    pub qr_payload: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub confirmed_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub tx_hash: Option<String>,
    #[serde(default, deserialize_with = "de_metadata")]
    pub metadata: Option<Metadata>,
}

/// An on-chain transfer (`data` of `transaction.created`; the payload is inferred, so most fields
/// are optional).
#[derive(Clone, Debug, Deserialize)]
pub struct Transaction {
    #[serde(deserialize_with = "de_id")]
    pub id: String,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub payment_intent_id: Option<String>,
    #[serde(deserialize_with = "de_micros")]
    pub amount: MicroUsdc,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub payment_address: Option<String>,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub tx_hash: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub confirmed_at: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "de_metadata")]
    pub metadata: Option<Metadata>,
}

/// A settlement (`data` of `settlement.*`; inferred: only the listed intents are read).
#[derive(Clone, Debug, Deserialize)]
pub struct Settlement {
    #[serde(deserialize_with = "de_id")]
    pub id: String,
    #[serde(default, deserialize_with = "de_ids")]
    pub payment_intent_ids: Vec<String>,
}

/// The typed `data` of an event.
#[derive(Clone, Debug)]
pub enum EventData {
    /// `payment_intent.confirmed|expired|cancelled`.
    PaymentIntent(PaymentIntent),
    /// `transaction.created`.
    Transaction(Transaction),
    /// `settlement.completed|failed`.
    Settlement(Settlement),
    /// A type we do not act on: stored, never dropped.
    Unknown,
}

impl EventData {
    /// Parses `data` according to `kind`.
    ///
    /// # Errors
    /// The JSON error when `data` does not fit its type (a missing field, a negative amount, more
    /// than 6 decimals). The caller keeps such an event flagged `unparsed`.
    pub fn parse(kind: EventType, data: &RawValue) -> Result<Self, serde_json::Error> {
        let raw = data.get();
        Ok(match kind {
            EventType::PaymentIntentConfirmed
            | EventType::PaymentIntentExpired
            | EventType::PaymentIntentCancelled => {
                EventData::PaymentIntent(serde_json::from_str(raw)?)
            }
            EventType::TransactionCreated => EventData::Transaction(serde_json::from_str(raw)?),
            EventType::SettlementCompleted | EventType::SettlementFailed => {
                EventData::Settlement(serde_json::from_str(raw)?)
            }
            EventType::Unknown => EventData::Unknown,
        })
    }
}

/// The string value of a metadata key, if it is a non-empty string.
pub fn metadata_str<'m>(metadata: Option<&'m Metadata>, key: &str) -> Option<&'m str> {
    metadata?.get(key)?.as_str().filter(|s| !s.is_empty())
}

/// An id that may become a store key ([`is_usable_id`]).
fn de_id<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    usable(String::deserialize(de)?)
}

/// An optional id: absent, empty (as the provider sends some fields), or usable as a key.
fn de_opt_id<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(de)? {
        Some(id) if !id.is_empty() => usable(id).map(Some),
        other => Ok(other),
    }
}

fn de_ids<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(de)?
        .into_iter()
        .map(usable)
        .collect()
}

/// Metadata whose `terminal_id`, when it is a string, can be a key (the terminal it names is
/// looked up, and an undeliverable confirmation is filed under it).
fn de_metadata<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Metadata>, D::Error> {
    let metadata = Option::<Metadata>::deserialize(de)?;
    if let Some(id) = metadata_str(metadata.as_ref(), "terminal_id") {
        usable::<D::Error>(id.to_owned())?;
    }
    Ok(metadata)
}

fn usable<E: serde::de::Error>(id: String) -> Result<String, E> {
    if is_usable_id(&id, MAX_ID_BYTES) {
        Ok(id)
    } else {
        Err(E::custom(format!(
            "id {id:?} must be 1 to {MAX_ID_BYTES} bytes without control characters"
        )))
    }
}

/// Deserialises a JSON number (or decimal string) into [`MicroUsdc`] exactly.
///
/// # Errors
/// A serde error for negative values, more than 6 decimals or values over `u64`.
pub fn de_micros<'de, D: Deserializer<'de>>(de: D) -> Result<MicroUsdc, D::Error> {
    let value: Decimal = rust_decimal::serde::arbitrary_precision::deserialize(de)?;
    MicroUsdc::try_from(value).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::vectors;

    #[test]
    fn parses_the_vectors() {
        let env = Envelope::parse(vectors::CONFIRMED_BODY.as_bytes()).unwrap();
        assert_eq!(env.id, "evt_01KN5A3MB94TFF59TDWH9EDD1R");
        assert_eq!(env.event_type(), EventType::PaymentIntentConfirmed);
        let EventData::PaymentIntent(pi) = EventData::parse(env.event_type(), env.data).unwrap()
        else {
            panic!("not an intent")
        };
        assert_eq!(pi.id, "pi_8Zx3RqV1mN6p");
        assert_eq!(pi.amount, MicroUsdc(4_500_000));
        assert_eq!(
            metadata_str(pi.metadata.as_ref(), "terminal_id"),
            Some("pos-0042")
        );

        let env = Envelope::parse(vectors::TRANSACTION_BODY.as_bytes()).unwrap();
        let EventData::Transaction(tx) = EventData::parse(env.event_type(), env.data).unwrap()
        else {
            panic!("not a transaction")
        };
        assert_eq!(tx.amount, MicroUsdc(4_400_000));
        assert_eq!(tx.payment_intent_id.as_deref(), Some("pi_5Tn2Kd8WqL0c"));
    }

    #[test]
    fn envelope_errors() {
        for body in [
            "not json",
            "[]",
            r#"{"id":"evt_1","type":"x"}"#,
            r#"{"id":"pi_1","type":"x","data":{}}"#,
            r#"{"id":"evt_","type":"x","data":{}}"#,
            r#"{"id":"evt_1","type":"","data":{}}"#,
            r#"{"id":"evt_1","type":"x","data":[1]}"#,
            r#"{"id":5,"type":"x","data":{}}"#,
        ] {
            assert!(Envelope::parse(body.as_bytes()).is_err(), "{body}");
        }
        let env = Envelope::parse(br#"{"id":"evt_1","type":"brand.new","data":{"x":1}}"#).unwrap();
        assert_eq!(env.event_type(), EventType::Unknown);
        assert!(matches!(
            EventData::parse(env.event_type(), env.data),
            Ok(EventData::Unknown)
        ));
    }

    #[test]
    fn bad_amounts_do_not_fit_the_type() {
        for amount in ["-4.5", "4.1234567", "\"abc\""] {
            let body = format!(
                r#"{{"id":"evt_1","type":"payment_intent.confirmed","data":{{"id":"pi_1","status":"confirmed","amount":{amount}}}}}"#
            );
            let env = Envelope::parse(body.as_bytes()).unwrap();
            assert!(
                EventData::parse(env.event_type(), env.data).is_err(),
                "{amount}"
            );
        }
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    /// An id with a NUL or another control character never becomes a store key: PostgreSQL's
    /// `text` cannot hold a NUL, and one such key failed the whole batch it was written in.
    #[test]
    fn ids_with_control_characters_are_refused() {
        let bad = Envelope::parse(br#"{"id":"evt_a\u0000b","type":"x","data":{}}"#);
        assert!(matches!(bad, Err(EnvelopeError::BadId)), "{bad:?}");
        for data in [
            r#"{"id":"pi_\u0000","status":"confirmed","amount":1}"#,
            r#"{"id":"pi_1","status":"confirmed","amount":1,"payment_address":"0x\u0001"}"#,
        ] {
            let raw = RawValue::from_string(data.to_owned()).unwrap();
            let parsed = EventData::parse(EventType::PaymentIntentConfirmed, &raw);
            assert!(parsed.is_err(), "{data}");
        }
        let raw = RawValue::from_string(
            r#"{"id":"tx_1","amount":1,"payment_intent_id":"pi_\u007f","tx_hash":""}"#.to_owned(),
        )
        .unwrap();
        assert!(EventData::parse(EventType::TransactionCreated, &raw).is_err());
        let raw =
            RawValue::from_string(r#"{"id":"st_1","payment_intent_ids":["pi_1","pi_\n"]}"#.into())
                .unwrap();
        assert!(EventData::parse(EventType::SettlementCompleted, &raw).is_err());
        let raw = RawValue::from_string(
            r#"{"id":"pi_1","status":"confirmed","amount":1,"metadata":{"terminal_id":"pos\u0000"}}"#
                .to_owned(),
        )
        .unwrap();
        assert!(EventData::parse(EventType::PaymentIntentConfirmed, &raw).is_err());
        // Empty optional fields and ordinary ids still parse.
        let raw = RawValue::from_string(
            r#"{"id":"tx_1","amount":1,"payment_intent_id":"pi_1","tx_hash":"","payment_address":""}"#
                .to_owned(),
        )
        .unwrap();
        assert!(EventData::parse(EventType::TransactionCreated, &raw).is_ok());
        assert!(!is_usable_id("", 10));
        assert!(!is_usable_id("abcdefghijk", 10));
        assert!(is_usable_id("pi_é✓", 10));
    }
}
