//! The provider's objects and their rules, without I/O: ids, payment addresses, amounts,
//! `qr_payload`, create-request validation, intents, transactions and idempotency keys
//! (provider-api.md §2, §4, §7).
//!
//! Amounts are [`MicroUsdc`] everywhere and reach JSON through [`events::number`], so a `4.50`
//! request is never rounded through `f64` on its way to `uint256=4500000`.

use std::collections::HashMap;
use std::str::FromStr;

use posgate_proto::MicroUsdc;
use rand::Rng;
use rand::distr::Alphanumeric;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::ApiError;
use crate::events;

/// USDC on Base Sepolia, the test-mode `qr_payload` target (provider-api.md §1).
pub const USDC_BASE_SEPOLIA: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

/// Smallest intent amount: 0.01 USD.
pub const MIN_AMOUNT: MicroUsdc = MicroUsdc(10_000);
/// Largest intent amount: 10 000 USD.
pub const MAX_AMOUNT: MicroUsdc = MicroUsdc(10_000_000_000);
/// Default, smallest and largest `ttl` in seconds.
pub const TTL_DEFAULT_SECS: u64 = 300;
/// Smallest allowed `ttl`.
pub const TTL_MIN_SECS: u64 = 60;
/// Largest allowed `ttl`.
pub const TTL_MAX_SECS: u64 = 3600;
/// At most this many metadata keys.
pub const METADATA_MAX_KEYS: usize = 10;
/// Metadata values up to this many characters.
pub const METADATA_MAX_VALUE_CHARS: usize = 500;
/// Longest accepted `idempotency_key` (the provider's limit is undocumented; ids are ≤ 255).
pub const IDEMPOTENCY_KEY_MAX_BYTES: usize = 255;
/// The fee the simulated provider keeps, 1 % (illustrative, like the documented example).
pub const FEE_PERCENT: u64 = 1;

/// Test or live, chosen by the API key's prefix: the gateway's own definition, so the simulator's
/// `qr_payload` and the gateway's check of it cannot drift apart.
pub use posgate_proto::qr::Mode;

/// A random id with a type prefix: `pi_`, `txn_`, `evt_` and 14 (24 for events) base62 characters.
pub fn new_id(prefix: &str) -> String {
    let len = if prefix == "evt_" { 24 } else { 14 };
    let tail: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// A random 20-byte address, hex with mixed case so that it looks like EIP-55 (the checksum itself
/// is not computed: nothing may compare addresses case-sensitively anyway).
pub fn random_address() -> String {
    random_hex(40, true)
}

/// A random 32-byte transaction hash, lowercase.
pub fn random_tx_hash() -> String {
    random_hex(64, false)
}

fn random_hex(digits: usize, mixed_case: bool) -> String {
    let mut rng = rand::rng();
    let mut out = String::with_capacity(digits + 2);
    out.push_str("0x");
    for _ in 0..digits {
        let c = char::from(b"0123456789abcdef"[rng.random_range(0..16)]);
        if mixed_case && rng.random_bool(0.5) {
            out.push(c.to_ascii_uppercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The EIP-681 payment request of provider-api.md §7:
/// `ethereum:<usdc>@<chain>/transfer?address=<payment address>&uint256=<micro-units>`.
pub fn qr_payload(mode: Mode, payment_address: &str, amount: MicroUsdc) -> String {
    format!(
        "ethereum:{}@{}/transfer?address={payment_address}&uint256={}",
        mode.usdc_contract(),
        mode.chain_id(),
        amount.0
    )
}

/// Parses a decimal amount given as a JSON number or a decimal string (exponents allowed), exactly.
///
/// # Errors
/// `None` for anything that is not a non-negative decimal with at most 6 places.
pub fn parse_amount(value: &Value) -> Option<MicroUsdc> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return None,
    };
    let decimal = Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .ok()?;
    MicroUsdc::try_from(decimal).ok()
}

/// A validated `POST /v1/payment-intents` body. Two requests are "the same body" for idempotency
/// when these values are equal (so `4.5` and `4.50` are the same amount).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateRequest {
    /// The amount, whole cents from 0.01 to 10 000.
    pub amount: MicroUsdc,
    /// `mer_…`.
    pub merchant_id: String,
    /// Echoed back in the intent and its events.
    pub metadata: Map<String, Value>,
    /// Lifetime in (unscaled) seconds.
    pub ttl_secs: u64,
    /// The body field `idempotency_key`, if given.
    pub idempotency_key: Option<String>,
}

fn invalid(param: &str, code: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, code, message)
}

impl CreateRequest {
    /// Validates a create body as the provider does (provider-api.md §2.2).
    ///
    /// # Errors
    /// An `invalid_request_error` naming the first bad parameter.
    pub fn parse(body: &Value) -> Result<CreateRequest, ApiError> {
        let Some(obj) = body.as_object() else {
            return Err(invalid(
                "",
                "body_invalid",
                "the body must be a JSON object",
            ));
        };
        let amount = match obj.get("amount") {
            None | Some(Value::Null) => {
                return Err(invalid("amount", "parameter_missing", "amount is required"));
            }
            Some(Value::Number(_)) => parse_amount(&obj["amount"]).ok_or_else(|| {
                invalid(
                    "amount",
                    "amount_invalid",
                    "amount must be a positive number with at most 2 decimal places",
                )
            })?,
            Some(_) => {
                return Err(invalid(
                    "amount",
                    "parameter_invalid_type",
                    "amount must be a JSON number",
                ));
            }
        };
        if amount.0 % 10_000 != 0 {
            return Err(invalid(
                "amount",
                "amount_invalid",
                "amount must have at most 2 decimal places",
            ));
        }
        if !(MIN_AMOUNT..=MAX_AMOUNT).contains(&amount) {
            return Err(invalid(
                "amount",
                "amount_out_of_range",
                "amount must be between 0.01 and 10000",
            ));
        }
        match obj.get("currency") {
            Some(Value::String(c)) if c == "usd" => {}
            None | Some(Value::Null) => {
                return Err(invalid(
                    "currency",
                    "parameter_missing",
                    "currency is required",
                ));
            }
            Some(_) => {
                return Err(invalid(
                    "currency",
                    "currency_unsupported",
                    "only \"usd\" is supported",
                ));
            }
        }
        let merchant_id = match obj.get("merchant_id") {
            Some(Value::String(m)) if m.starts_with("mer_") && m.len() > 4 && m.len() <= 255 => {
                m.clone()
            }
            None | Some(Value::Null) => {
                return Err(invalid(
                    "merchant_id",
                    "parameter_missing",
                    "merchant_id is required",
                ));
            }
            Some(_) => {
                return Err(invalid(
                    "merchant_id",
                    "parameter_invalid",
                    "merchant_id must be a mer_… id",
                ));
            }
        };
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(invalid(
                    "metadata",
                    "parameter_invalid_type",
                    "metadata must be an object",
                ));
            }
        };
        if metadata.len() > METADATA_MAX_KEYS {
            return Err(invalid(
                "metadata",
                "metadata_too_many_keys",
                "metadata may have at most 10 keys",
            ));
        }
        for (key, value) in &metadata {
            let Some(s) = value.as_str() else {
                return Err(invalid(
                    &format!("metadata[{key}]"),
                    "parameter_invalid_type",
                    "metadata values must be strings",
                ));
            };
            if s.chars().count() > METADATA_MAX_VALUE_CHARS {
                return Err(invalid(
                    &format!("metadata[{key}]"),
                    "metadata_value_too_long",
                    "metadata values may have at most 500 characters",
                ));
            }
        }
        let ttl_secs = match obj.get("ttl") {
            None | Some(Value::Null) => TTL_DEFAULT_SECS,
            Some(Value::Number(n)) => match n.to_string().parse::<u64>() {
                Ok(t) if (TTL_MIN_SECS..=TTL_MAX_SECS).contains(&t) => t,
                _ => {
                    return Err(invalid(
                        "ttl",
                        "ttl_out_of_range",
                        "ttl must be a whole number of seconds from 60 to 3600",
                    ));
                }
            },
            Some(_) => {
                return Err(invalid(
                    "ttl",
                    "parameter_invalid_type",
                    "ttl must be a JSON number",
                ));
            }
        };
        let idempotency_key = match obj.get("idempotency_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) if !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_MAX_BYTES => {
                Some(k.clone())
            }
            Some(_) => {
                return Err(invalid(
                    "idempotency_key",
                    "parameter_invalid",
                    "idempotency_key must be a string of 1 to 255 bytes",
                ));
            }
        };
        Ok(CreateRequest {
            amount,
            merchant_id,
            metadata,
            ttl_secs,
            idempotency_key,
        })
    }
}

/// An intent's status at the provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    /// Waiting for the customer.
    AwaitingPayment,
    /// Paid exactly and on time.
    Confirmed,
    /// `ttl` ran out.
    Expired,
    /// Cancelled through the API.
    Cancelled,
}

impl IntentStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            IntentStatus::AwaitingPayment => "awaiting_payment",
            IntentStatus::Confirmed => "confirmed",
            IntentStatus::Expired => "expired",
            IntentStatus::Cancelled => "cancelled",
        }
    }
}

/// What a confirmed intent adds to its object.
#[derive(Clone, Debug)]
pub struct Payment {
    /// The transfer that paid it.
    pub txn_id: String,
    /// Its hash.
    pub tx_hash: String,
    /// Who paid.
    pub sender_address: String,
    /// The block it landed in.
    pub block_number: u64,
    /// When it was confirmed on chain.
    pub confirmed_at: OffsetDateTime,
}

/// One payment intent held by the simulator.
#[derive(Clone, Debug)]
pub struct Intent {
    /// `pi_…`.
    pub id: String,
    /// Chosen by the creating key.
    pub mode: Mode,
    /// The amount asked for.
    pub amount: MicroUsdc,
    /// `mer_…`.
    pub merchant_id: String,
    /// Echoed back.
    pub metadata: Map<String, Value>,
    /// Where the customer pays.
    pub payment_address: String,
    /// Now.
    pub status: IntentStatus,
    /// Creation time (provider clock).
    pub created_at: OffsetDateTime,
    /// `created_at` + scaled `ttl`.
    pub expires_at: OffsetDateTime,
    /// Set when confirmed.
    pub payment: Option<Payment>,
    /// `http://ADDR/v1`, for `qr_image_url`.
    pub api_base: String,
}

/// The JSON form of an intent, in the documented field order.
#[derive(Serialize)]
struct IntentObject<'a> {
    id: &'a str,
    object: &'static str,
    status: &'static str,
    amount: Value,
    currency: &'static str,
    merchant_id: &'a str,
    payment_address: &'a str,
    chain: &'static str,
    token: &'static str,
    qr_payload: String,
    qr_image_url: String,
    expires_at: String,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    net_amount: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fee: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fee_rate: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tx_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender_address: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_number: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    confirmed_at: Option<String>,
    metadata: &'a Map<String, Value>,
}

/// The fee kept on `amount`: [`FEE_PERCENT`] of it, in whole micro-units (exact for whole cents).
pub fn fee_of(amount: MicroUsdc) -> MicroUsdc {
    MicroUsdc(amount.0 / 100 * FEE_PERCENT)
}

impl Intent {
    /// The intent object as `GET /v1/payment-intents/{id}` and the `payment_intent.*` events show
    /// it; a confirmed intent adds `net_amount`, `fee`, `fee_rate`, `tx_hash`, `sender_address`,
    /// `block_number` and `confirmed_at`.
    pub fn to_json(&self) -> Value {
        let paid = self.payment.as_ref();
        let fee = fee_of(self.amount);
        let object = IntentObject {
            id: &self.id,
            object: "payment_intent",
            status: self.status.as_str(),
            amount: events::number(self.amount),
            currency: "usd",
            merchant_id: &self.merchant_id,
            payment_address: &self.payment_address,
            chain: "base",
            token: "USDC",
            qr_payload: qr_payload(self.mode, &self.payment_address, self.amount),
            qr_image_url: format!("{}/payment-intents/{}/qr.png", self.api_base, self.id),
            expires_at: events::rfc3339(self.expires_at),
            created_at: events::rfc3339(self.created_at),
            net_amount: paid.map(|_| events::number(self.amount.saturating_sub(fee))),
            fee: paid.map(|_| events::number(fee)),
            fee_rate: paid.and_then(|_| {
                format!("0.{FEE_PERCENT:02}")
                    .parse::<serde_json::Number>()
                    .ok()
                    .map(Value::Number)
            }),
            tx_hash: paid.map(|p| p.tx_hash.as_str()),
            sender_address: paid.map(|p| p.sender_address.as_str()),
            block_number: paid.map(|p| p.block_number),
            confirmed_at: paid.map(|p| events::rfc3339(p.confirmed_at)),
            metadata: &self.metadata,
        };
        serde_json::to_value(object).unwrap_or(Value::Null)
    }
}

/// One on-chain transfer to a payment address.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// `txn_…`.
    pub id: String,
    /// The intent whose address was paid; `None` for an address the provider does not know.
    pub payment_intent_id: Option<String>,
    /// The paid intent's merchant (or the simulator's default).
    pub merchant_id: String,
    /// The actual amount sent.
    pub amount: MicroUsdc,
    /// Hash of the transfer.
    pub tx_hash: String,
    /// The address paid.
    pub payment_address: String,
    /// Who paid.
    pub sender_address: String,
    /// Block number.
    pub block_number: u64,
    /// Confirmation time (provider clock).
    pub confirmed_at: OffsetDateTime,
    /// The paid intent's metadata, if any.
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Serialize)]
struct TransactionObject<'a> {
    id: &'a str,
    object: &'static str,
    payment_intent_id: Option<&'a str>,
    merchant_id: &'a str,
    status: &'static str,
    amount: Value,
    currency: &'static str,
    chain: &'static str,
    token: &'static str,
    tx_hash: &'a str,
    payment_address: &'a str,
    sender_address: &'a str,
    block_number: u64,
    confirmed_at: String,
    settlement_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Map<String, Value>>,
}

impl Transaction {
    /// The transaction object as the API and `transaction.created` show it (provider-api.md §4.6).
    pub fn to_json(&self) -> Value {
        let object = TransactionObject {
            id: &self.id,
            object: "transaction",
            payment_intent_id: self.payment_intent_id.as_deref(),
            merchant_id: &self.merchant_id,
            status: "confirmed",
            amount: events::number(self.amount),
            currency: "usd",
            chain: "base",
            token: "USDC",
            tx_hash: &self.tx_hash,
            payment_address: &self.payment_address,
            sender_address: &self.sender_address,
            block_number: self.block_number,
            confirmed_at: events::rfc3339(self.confirmed_at),
            settlement_status: "pending",
            metadata: self.metadata.as_ref(),
        };
        serde_json::to_value(object).unwrap_or(Value::Null)
    }
}

/// What an idempotency key remembers.
#[derive(Clone, Debug)]
pub struct IdempotencyRecord {
    /// The validated request it was first used with.
    pub request: CreateRequest,
    /// The intent that request created.
    pub intent_id: String,
    /// When (provider clock); the key is honoured for the configured window after it.
    pub at: OffsetDateTime,
}

/// What an idempotency lookup says.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// A new key (or an expired one): create.
    New,
    /// The same key with the same body: answer with this intent.
    Same(String),
    /// The same key with a different body: 409.
    Conflict,
}

/// Idempotency keys, honoured for `window` after first use.
#[derive(Debug, Default)]
pub struct IdempotencyKeys {
    keys: HashMap<String, IdempotencyRecord>,
}

impl IdempotencyKeys {
    /// Looks `request` up by its key at `now`.
    pub fn check(
        &mut self,
        request: &CreateRequest,
        now: OffsetDateTime,
        window: time::Duration,
    ) -> Replay {
        let Some(key) = &request.idempotency_key else {
            return Replay::New;
        };
        match self.keys.get(key) {
            Some(rec) if now - rec.at <= window => {
                if &rec.request == request {
                    Replay::Same(rec.intent_id.clone())
                } else {
                    Replay::Conflict
                }
            }
            Some(_) => {
                self.keys.remove(key);
                Replay::New
            }
            None => Replay::New,
        }
    }

    /// Remembers that `request` created `intent_id` at `now`.
    pub fn remember(&mut self, request: &CreateRequest, intent_id: &str, now: OffsetDateTime) {
        if let Some(key) = &request.idempotency_key {
            self.keys.insert(
                key.clone(),
                IdempotencyRecord {
                    request: request.clone(),
                    intent_id: intent_id.to_owned(),
                    at: now,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn amount_of(text: &str) -> MicroUsdc {
        let body: Value = serde_json::from_str(&format!(
            r#"{{"amount":{text},"currency":"usd","merchant_id":"mer_1"}}"#
        ))
        .unwrap();
        CreateRequest::parse(&body).unwrap().amount
    }

    #[test]
    fn qr_payload_is_eip681_with_exact_base_units() {
        let address = "0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70";
        assert_eq!(
            qr_payload(Mode::Live, address, amount_of("4.50")),
            "ethereum:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913@8453/transfer?address=0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70&uint256=4500000"
        );
        assert_eq!(
            qr_payload(Mode::Test, address, amount_of("4.5")),
            "ethereum:0x036CbD53842c5426634e7929541eC2318f3dCF7e@84532/transfer?address=0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70&uint256=4500000"
        );
        for (text, units) in [
            ("0.01", "10000"),
            ("7.25", "7250000"),
            ("12.34", "12340000"),
            ("8.2", "8200000"),
            ("19.99", "19990000"),
            ("10000", "10000000000"),
        ] {
            let qr = qr_payload(Mode::Test, address, amount_of(text));
            assert!(qr.ends_with(&format!("&uint256={units}")), "{text}: {qr}");
        }
    }

    #[test]
    fn create_validation() {
        let ok = json!({"amount": 4.5, "currency": "usd", "merchant_id": "mer_1",
                        "metadata": {"terminal_id": "pos-1"}, "idempotency_key": "k"});
        let req = CreateRequest::parse(&ok).unwrap();
        assert_eq!(req.ttl_secs, 300);
        assert_eq!(req.idempotency_key.as_deref(), Some("k"));
        let bad = |patch: Value, code: &str| {
            let mut body = ok.clone();
            for (k, v) in patch.as_object().unwrap() {
                body[k] = v.clone();
            }
            let e = CreateRequest::parse(&body).unwrap_err();
            assert_eq!(e.code, code, "{body}");
            assert_eq!(e.status, 400);
        };
        bad(json!({"amount": 0.001}), "amount_invalid");
        bad(json!({"amount": 4.555}), "amount_invalid");
        bad(json!({"amount": 0}), "amount_out_of_range");
        bad(json!({"amount": 10000.01}), "amount_out_of_range");
        bad(json!({"amount": -1}), "amount_invalid");
        bad(json!({"amount": "4.50"}), "parameter_invalid_type");
        bad(json!({"currency": "eur"}), "currency_unsupported");
        bad(json!({"ttl": 59}), "ttl_out_of_range");
        bad(json!({"ttl": 3601}), "ttl_out_of_range");
        bad(json!({"merchant_id": "acct_1"}), "parameter_invalid");
        let many: Map<String, Value> = (0..11).map(|i| (format!("k{i}"), json!("v"))).collect();
        bad(json!({ "metadata": many }), "metadata_too_many_keys");
        bad(
            json!({"metadata": {"k": "x".repeat(501)}}),
            "metadata_value_too_long",
        );
        assert_eq!(amount_of("10000"), MAX_AMOUNT);
        assert_eq!(amount_of("0.01"), MIN_AMOUNT);
        assert_eq!(amount_of("1e1"), MicroUsdc(10_000_000));
    }

    #[test]
    fn idempotency_same_body_replays_different_body_conflicts() {
        let now = OffsetDateTime::now_utc();
        let window = time::Duration::hours(24);
        let body = json!({"amount": 4.5, "currency": "usd", "merchant_id": "mer_1",
                          "idempotency_key": "posgate:pos-1:ord-1:1"});
        let req = CreateRequest::parse(&body).unwrap();
        let mut keys = IdempotencyKeys::default();
        assert_eq!(keys.check(&req, now, window), Replay::New);
        keys.remember(&req, "pi_1", now);
        // 4.50 is the same amount as 4.5.
        let same: Value = serde_json::from_str(
            r#"{"amount":4.50,"currency":"usd","merchant_id":"mer_1","idempotency_key":"posgate:pos-1:ord-1:1"}"#,
        )
        .unwrap();
        let same = CreateRequest::parse(&same).unwrap();
        assert_eq!(keys.check(&same, now, window), Replay::Same("pi_1".into()));
        let mut other = body.clone();
        other["amount"] = json!(4.4);
        let other = CreateRequest::parse(&other).unwrap();
        assert_eq!(keys.check(&other, now, window), Replay::Conflict);
        // After the window the key is free again.
        let later = now + window + time::Duration::seconds(1);
        assert_eq!(keys.check(&other, later, window), Replay::New);
    }

    #[test]
    fn ids_and_addresses() {
        let id = new_id("pi_");
        assert!(id.starts_with("pi_") && id.len() == 17, "{id}");
        assert!(new_id("evt_").len() == 28);
        let address = random_address();
        assert_eq!(address.len(), 42);
        assert!(address[2..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(random_tx_hash().len(), 66);
    }

    #[test]
    fn paid_intent_object_has_payment_fields() {
        let now = OffsetDateTime::now_utc();
        let mut intent = Intent {
            id: "pi_1".into(),
            mode: Mode::Test,
            amount: MicroUsdc(4_500_000),
            merchant_id: "mer_1".into(),
            metadata: Map::new(),
            payment_address: random_address(),
            status: IntentStatus::AwaitingPayment,
            created_at: now,
            expires_at: now,
            payment: None,
            api_base: "http://x/v1".into(),
        };
        let open = intent.to_json();
        assert!(open.get("fee").is_none());
        assert_eq!(open["status"], "awaiting_payment");
        intent.status = IntentStatus::Confirmed;
        intent.payment = Some(Payment {
            txn_id: "txn_1".into(),
            tx_hash: random_tx_hash(),
            sender_address: random_address(),
            block_number: 1,
            confirmed_at: now,
        });
        let text = intent.to_json().to_string();
        assert!(text.contains(r#""amount":4.50"#), "{text}");
        assert!(text.contains(r#""fee":0.045"#), "{text}");
        assert!(text.contains(r#""net_amount":4.455"#), "{text}");
        assert!(text.contains(r#""fee_rate":0.01"#), "{text}");
        assert!(text.contains(r#""confirmed_at""#), "{text}");
    }
}
