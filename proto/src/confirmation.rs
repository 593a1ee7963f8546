//! Signed payment confirmations and the other terminal messages.
//!
//! A confirmation travels as a JWS in compact serialization (RFC 7515):
//! `base64url(header) "." base64url(payload) "." base64url(signature)`, no padding, with the header
//! `{"alg":"EdDSA","kid":"…","typ":"JWT"}` (RFC 8037; `EdDSA` rather than RFC 9864's `Ed25519`
//! because every JOSE library reads it today). The payload is the JSON of [`Confirmation`]. The
//! `kid` is the RFC 7638 thumbprint of the gateway's public key ([`kid_for`]), which the terminal
//! receives as a JWK ([`Jwk`]) in its provisioning bundle, so any JOSE library can check the message.
//!
//! The gateway signs once, when it enqueues the message ([`sign`]); a republish sends the same bytes.
//! A terminal calls [`verify`], which checks, in this order: the three parts, `alg` (only `EdDSA`:
//! `none`, `HS256` and everything else are refused before any key is used), the signature
//! (`verify_strict`, which also refuses small-order keys and non-canonical signatures), the payload,
//! the `terminal_id`, and the `seq`. It then shows the payment and publishes an [`Ack`].
//!
//! Pure functions: no I/O, no clock (`issued_at` is set by the caller).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::amount::MicroUsdc;

/// The payload version this crate writes and accepts.
pub const VERSION: u32 = 1;
/// The only `alg` accepted.
pub const ALG: &str = "EdDSA";

/// The outcome a confirmation reports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmationStatus {
    /// Paid in full and confirmed on chain: hand over the goods.
    Confirmed,
    /// The intent expired unpaid.
    Expired,
    /// The intent was cancelled.
    Cancelled,
    /// Money arrived but does not settle the intent cleanly; [`Context`] says why.
    Unresolved,
}

/// Why a confirmation is [`ConfirmationStatus::Unresolved`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Context {
    /// Paid after the intent expired.
    Late,
    /// Paid less than the amount due.
    Underpaid,
    /// Paid more than the amount due.
    Overpaid,
    /// Paid more than once.
    Multiple,
}

/// The payload of a signed confirmation. Field names are the wire names (interfaces.md); `None`
/// fields are left out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    /// Payload version, [`VERSION`].
    pub v: u32,
    /// The terminal this confirmation is for; a terminal refuses any other.
    pub terminal_id: String,
    /// The provider's payment intent id (`pi_…`).
    pub intent_id: String,
    /// Per-terminal sequence number, increasing with every message to that terminal.
    pub seq: u64,
    /// The outcome.
    pub status: ConfirmationStatus,
    /// Why the outcome is `unresolved`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    /// The amount as a decimal string, e.g. `"4.40"`.
    pub amount: String,
    /// The same amount in micro units (1 USDC = 1 000 000).
    pub amount_micros: u64,
    /// The currency, as the provider names it.
    pub currency: String,
    /// The merchant's order id, when the intent carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// The settling transaction, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_hash: Option<String>,
    /// When the gateway issued this message, RFC 3339 UTC.
    pub issued_at: String,
}

impl Confirmation {
    /// A confirmation of [`VERSION`] with `status` for `amount`, whose decimal (`amount`) and
    /// integer (`amount_micros`) forms therefore agree, in `usd`; no context, order or
    /// transaction (set those fields where they apply).
    pub fn new(
        terminal_id: &str,
        intent_id: &str,
        seq: u64,
        status: ConfirmationStatus,
        amount: MicroUsdc,
        issued_at: &str,
    ) -> Confirmation {
        Confirmation {
            v: VERSION,
            terminal_id: terminal_id.to_owned(),
            intent_id: intent_id.to_owned(),
            seq,
            status,
            context: None,
            amount: amount.to_string(),
            amount_micros: amount.0,
            currency: "usd".to_owned(),
            order_id: None,
            tx_hash: None,
            issued_at: issued_at.to_owned(),
        }
    }
}

/// A terminal's acknowledgement on `/tenants/{t}/acks`: `{"intent_id":"pi_…","seq":N}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    /// The acknowledged confirmation's intent.
    pub intent_id: String,
    /// The acknowledged confirmation's `seq`.
    pub seq: u64,
}

/// A terminal's presence on `/tenants/{t}/status`: `{"state":"online"|"offline"}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct StatusMessage {
    /// [`StatusMessage::ONLINE`] or [`StatusMessage::OFFLINE`].
    pub state: String,
}

impl StatusMessage {
    /// The state a terminal publishes after connecting.
    pub const ONLINE: &'static str = "online";
    /// The state of the terminal's last will.
    pub const OFFLINE: &'static str = "offline";

    /// `{"state":"online"}`.
    pub fn online() -> StatusMessage {
        StatusMessage {
            state: Self::ONLINE.to_owned(),
        }
    }

    /// `{"state":"offline"}`.
    pub fn offline() -> StatusMessage {
        StatusMessage {
            state: Self::OFFLINE.to_owned(),
        }
    }

    /// Whether the state is `online` (anything else counts as offline).
    pub fn is_online(&self) -> bool {
        self.state == Self::ONLINE
    }
}

/// The gateway's public key as a JSON Web Key (RFC 8037 `OKP`/`Ed25519`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Jwk {
    /// Always `"OKP"`.
    pub kty: String,
    /// Always `"Ed25519"`.
    pub crv: String,
    /// The 32-byte public key, base64url without padding.
    pub x: String,
    /// The key id: the RFC 7638 thumbprint, as in [`kid_for`].
    pub kid: String,
}

/// Why a [`Jwk`] does not give an Ed25519 public key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("JWK is {kty}/{crv}, not OKP/Ed25519")]
    WrongType { kty: String, crv: String },
    #[error("JWK `x` is not 32 bytes of base64url")]
    BadX,
    #[error("JWK `x` is not a valid Ed25519 public key")]
    BadKey,
}

impl Jwk {
    /// The JWK of `key`, with its thumbprint as `kid`.
    pub fn from_verifying_key(key: &VerifyingKey) -> Jwk {
        let bytes = key.to_bytes();
        Jwk {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x: URL_SAFE_NO_PAD.encode(bytes),
            kid: kid_for(&bytes),
        }
    }

    /// The public key this JWK carries (`kid` is not checked: it is a name, not key material).
    ///
    /// # Errors
    /// [`JwkError`] when `kty`/`crv` are not `OKP`/`Ed25519` or `x` is not a valid key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, JwkError> {
        if self.kty != "OKP" || self.crv != "Ed25519" {
            return Err(JwkError::WrongType {
                kty: self.kty.clone(),
                crv: self.crv.clone(),
            });
        }
        let bytes: [u8; 32] = URL_SAFE_NO_PAD
            .decode(&self.x)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(JwkError::BadX)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| JwkError::BadKey)
    }
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key: base64url (no padding) of the SHA-256 of
/// `{"crv":"Ed25519","kty":"OKP","x":"…"}` (required members only, lexicographic order, no spaces).
pub fn kid_for(public_key_bytes: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public_key_bytes)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Why a confirmation was refused. The terminal drops the message (and does not ack it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("not a JWS in compact serialization (three base64url parts, JSON header)")]
    Malformed,
    #[error("JWS header alg is not EdDSA")]
    BadAlg,
    #[error("signature does not verify with the gateway key")]
    BadSignature,
    #[error("signed payload is not a version {VERSION} confirmation")]
    BadPayload,
    #[error("confirmation is for terminal {got}")]
    WrongTerminal { got: String },
    #[error("confirmation seq {seq} is below {min_seq}")]
    OldSeq { seq: u64, min_seq: u64 },
}

impl VerifyError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Malformed => "malformed",
            VerifyError::BadAlg => "bad_alg",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::BadPayload => "bad_payload",
            VerifyError::WrongTerminal { .. } => "wrong_terminal",
            VerifyError::OldSeq { .. } => "old_seq",
        }
    }
}

/// The JWS protected header we write. Field order is the serialisation order.
#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

/// The header members [`verify`] looks at; others are ignored, except `crit`.
#[derive(Deserialize)]
struct HeaderIn {
    alg: String,
    /// RFC 7515 §4.1.11: a recipient must refuse extensions it does not understand; we understand
    /// none, so any `crit` is refused.
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs (string keys, no custom `Serialize`) cannot fail.
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes,
        Err(_) => unreachable!("serialising a struct with string keys"),
    }
}

/// Signs `c` as a compact JWS: `b64(header).b64(payload).b64(signature)`.
///
/// `kid` names the key (the gateway passes [`kid_for`] of its public key). Ed25519 is
/// deterministic, so the same confirmation and key always give the same bytes.
pub fn sign(key: &SigningKey, kid: &str, c: &Confirmation) -> String {
    let header = to_json(&HeaderOut {
        alg: ALG,
        kid,
        typ: "JWT",
    });
    let payload = to_json(c);
    let mut jws = URL_SAFE_NO_PAD.encode(header);
    jws.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut jws);
    let signature = key.sign(jws.as_bytes());
    jws.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut jws);
    jws
}

/// Verifies a confirmation for terminal `terminal_id` and returns its payload.
///
/// `min_seq` is one more than the highest `seq` below which the terminal has processed
/// everything (0 for a fresh terminal): a message below it is a replay. Messages at or above it
/// pass, duplicates included; the terminal still deduplicates on `intent_id` + `seq`.
///
/// # Errors
/// The first failed check, in order: [`VerifyError::Malformed`], [`VerifyError::BadAlg`],
/// [`VerifyError::BadSignature`], [`VerifyError::BadPayload`], [`VerifyError::WrongTerminal`],
/// [`VerifyError::OldSeq`]. Nothing of the payload is trusted before the signature checks out.
pub fn verify(
    jws: &str,
    key: &VerifyingKey,
    terminal_id: &str,
    min_seq: u64,
) -> Result<Confirmation, VerifyError> {
    let mut parts = jws.split('.');
    let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed);
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| VerifyError::Malformed)?;
    let header: HeaderIn =
        serde_json::from_slice(&header_bytes).map_err(|_| VerifyError::Malformed)?;
    if header.alg != ALG || header.crit.is_some() {
        return Err(VerifyError::BadAlg);
    }
    let payload_bytes = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| VerifyError::Malformed)?;
    let sig_bytes = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| VerifyError::Malformed)?;
    let signature = Signature::from_slice(&sig_bytes).map_err(|_| VerifyError::BadSignature)?;
    // The signing input is the ASCII of the first two parts exactly as received.
    let signing_input = &jws[..header_b64.len() + 1 + payload_b64.len()];
    key.verify_strict(signing_input.as_bytes(), &signature)
        .map_err(|_| VerifyError::BadSignature)?;
    let c: Confirmation =
        serde_json::from_slice(&payload_bytes).map_err(|_| VerifyError::BadPayload)?;
    if c.v != VERSION {
        return Err(VerifyError::BadPayload);
    }
    if c.terminal_id != terminal_id {
        return Err(VerifyError::WrongTerminal { got: c.terminal_id });
    }
    if c.seq < min_seq {
        return Err(VerifyError::OldSeq {
            seq: c.seq,
            min_seq,
        });
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32])
    }

    fn kid(key: &SigningKey) -> String {
        kid_for(&key.verifying_key().to_bytes())
    }

    fn sample() -> Confirmation {
        Confirmation {
            v: VERSION,
            terminal_id: "pos_01".into(),
            intent_id: "pi_8Zx3RqV1mN6p".into(),
            seq: 7,
            status: ConfirmationStatus::Confirmed,
            context: None,
            amount: "4.40".into(),
            amount_micros: 4_400_000,
            currency: "usd".into(),
            order_id: Some("ord-20260401-0187".into()),
            tx_hash: None,
            issued_at: "2026-04-01T20:00:12Z".into(),
        }
    }

    fn b64json(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    /// Re-signs arbitrary header and payload JSON with `key`, as a forger with the key would.
    fn forge(key: &SigningKey, header: &serde_json::Value, payload: &serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let sig = key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let c = sample();
        let jws = sign(&k, &kid(&k), &c);
        assert_eq!(verify(&jws, &k.verifying_key(), "pos_01", 0), Ok(c.clone()));
        assert_eq!(verify(&jws, &k.verifying_key(), "pos_01", 7), Ok(c.clone()));
        assert_eq!(sign(&k, &kid(&k), &c), jws, "deterministic");

        let unresolved = Confirmation {
            status: ConfirmationStatus::Unresolved,
            context: Some(Context::Underpaid),
            tx_hash: Some("0xabc".into()),
            order_id: None,
            ..sample()
        };
        let jws = sign(&k, &kid(&k), &unresolved);
        assert_eq!(
            verify(&jws, &k.verifying_key(), "pos_01", 0),
            Ok(unresolved)
        );
    }

    #[test]
    fn generic_jose_reader_sees_standard_parts() {
        let k = key(2);
        let jws = sign(&k, &kid(&k), &sample());
        let parts: Vec<&str> = jws.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(!jws.contains('='), "no padding");
        assert!(
            !jws.contains('+') && !jws.contains('/'),
            "url-safe alphabet"
        );
        assert_eq!(
            b64json(parts[0]),
            json!({"alg": "EdDSA", "kid": kid(&k), "typ": "JWT"})
        );
        assert_eq!(b64json(parts[1])["intent_id"], "pi_8Zx3RqV1mN6p");
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 64);
        // The signature covers the ASCII "header.payload", as RFC 7515 §5.1 says.
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        k.verifying_key()
            .verify_strict(input.as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn payload_field_names_match_interfaces() {
        let k = key(3);
        let full = Confirmation {
            status: ConfirmationStatus::Unresolved,
            context: Some(Context::Late),
            tx_hash: Some("0xdef".into()),
            ..sample()
        };
        let jws = sign(&k, &kid(&k), &full);
        let payload = b64json(jws.split('.').nth(1).unwrap());
        assert_eq!(
            payload,
            json!({
                "v": 1, "terminal_id": "pos_01", "intent_id": "pi_8Zx3RqV1mN6p", "seq": 7,
                "status": "unresolved", "context": "late", "amount": "4.40",
                "amount_micros": 4_400_000, "currency": "usd", "order_id": "ord-20260401-0187",
                "tx_hash": "0xdef", "issued_at": "2026-04-01T20:00:12Z"
            })
        );
        // None fields are left out, not null.
        let minimal = Confirmation {
            order_id: None,
            ..sample()
        };
        let value = serde_json::to_value(&minimal).unwrap();
        let obj = value.as_object().unwrap();
        for absent in ["context", "order_id", "tx_hash"] {
            assert!(!obj.contains_key(absent), "{absent}");
        }
        for (status, wire) in [
            (ConfirmationStatus::Confirmed, "confirmed"),
            (ConfirmationStatus::Expired, "expired"),
            (ConfirmationStatus::Cancelled, "cancelled"),
            (ConfirmationStatus::Unresolved, "unresolved"),
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), wire);
        }
        for (context, wire) in [
            (Context::Late, "late"),
            (Context::Underpaid, "underpaid"),
            (Context::Overpaid, "overpaid"),
            (Context::Multiple, "multiple"),
        ] {
            assert_eq!(serde_json::to_value(context).unwrap(), wire);
        }
        assert_eq!(
            serde_json::to_value(Ack {
                intent_id: "pi_1".into(),
                seq: 3
            })
            .unwrap(),
            json!({"intent_id": "pi_1", "seq": 3})
        );
        assert_eq!(
            serde_json::to_value(StatusMessage::offline()).unwrap(),
            json!({"state": "offline"})
        );
        assert!(StatusMessage::online().is_online());
    }

    #[test]
    fn tampered_payload_is_refused() {
        let k = key(4);
        let jws = sign(&k, &kid(&k), &sample());
        let parts: Vec<&str> = jws.split('.').collect();
        let mut payload = b64json(parts[1]);
        payload["amount"] = json!("440.00");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            parts[2]
        );
        assert_eq!(
            verify(&tampered, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn tampered_signature_is_refused() {
        let k = key(5);
        let jws = sign(&k, &kid(&k), &sample());
        let (input, sig) = jws.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig[10] ^= 0x01;
        let flipped = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            verify(&flipped, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadSignature)
        );
        let short = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig[..63]));
        assert_eq!(
            verify(&short, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadSignature)
        );
        let empty = format!("{input}.");
        assert_eq!(
            verify(&empty, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn another_key_is_refused() {
        let gateway = key(6);
        let forger = key(7);
        let jws = sign(&forger, &kid(&gateway), &sample());
        assert_eq!(
            verify(&jws, &gateway.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn only_eddsa_is_accepted() {
        let k = key(8);
        let payload = serde_json::to_value(sample()).unwrap();
        let payload_b64 = URL_SAFE_NO_PAD.encode(payload.to_string());

        // alg none with an empty signature, the classic downgrade.
        let none = format!(
            "{}.{payload_b64}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#)
        );
        assert_eq!(
            verify(&none, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadAlg)
        );
        // HS256 "keyed" with the public key, the classic confusion.
        for alg in ["HS256", "ES256", "RS256", "Ed25519", "eddsa", ""] {
            let forged = forge(&k, &json!({"alg": alg, "typ": "JWT"}), &payload);
            assert_eq!(
                verify(&forged, &k.verifying_key(), "pos_01", 0),
                Err(VerifyError::BadAlg),
                "{alg}"
            );
        }
        let no_alg = forge(&k, &json!({"typ": "JWT"}), &payload);
        assert_eq!(
            verify(&no_alg, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::Malformed)
        );
        let crit = forge(&k, &json!({"alg": "EdDSA", "crit": ["exp"]}), &payload);
        assert_eq!(
            verify(&crit, &k.verifying_key(), "pos_01", 0),
            Err(VerifyError::BadAlg)
        );
    }

    #[test]
    fn malformed_input_is_refused() {
        let k = key(9);
        let jws = sign(&k, &kid(&k), &sample());
        let vk = k.verifying_key();
        for bad in [
            String::new(),
            "a.b".into(),
            format!("{jws}.extra"),
            format!("{jws}="),
            "!!!.!!!.!!!".into(),
            format!("{}.x.y", URL_SAFE_NO_PAD.encode("not json")),
        ] {
            assert!(
                matches!(
                    verify(&bad, &vk, "pos_01", 0),
                    Err(VerifyError::Malformed | VerifyError::BadSignature)
                ),
                "{bad}"
            );
        }
        // Validly signed garbage is a payload error, and so is an unknown version.
        let header = json!({"alg": "EdDSA", "kid": kid(&k), "typ": "JWT"});
        let garbage = forge(&k, &header, &json!({"hello": "world"}));
        assert_eq!(
            verify(&garbage, &vk, "pos_01", 0),
            Err(VerifyError::BadPayload)
        );
        let mut v2 = serde_json::to_value(sample()).unwrap();
        v2["v"] = json!(2);
        assert_eq!(
            verify(&forge(&k, &header, &v2), &vk, "pos_01", 0),
            Err(VerifyError::BadPayload)
        );
        // Unknown payload fields are tolerated (the gateway may add some).
        let mut extra = serde_json::to_value(sample()).unwrap();
        extra["merchant_id"] = json!("mer_1");
        assert_eq!(
            verify(&forge(&k, &header, &extra), &vk, "pos_01", 0),
            Ok(sample())
        );
    }

    #[test]
    fn wrong_terminal_is_refused() {
        let k = key(10);
        let jws = sign(&k, &kid(&k), &sample());
        assert_eq!(
            verify(&jws, &k.verifying_key(), "pos_02", 0),
            Err(VerifyError::WrongTerminal {
                got: "pos_01".into()
            })
        );
    }

    #[test]
    fn old_seq_is_refused() {
        let k = key(11);
        let jws = sign(&k, &kid(&k), &sample());
        let err = verify(&jws, &k.verifying_key(), "pos_01", 8);
        assert_eq!(err, Err(VerifyError::OldSeq { seq: 7, min_seq: 8 }));
        assert_eq!(err.unwrap_err().reason(), "old_seq");
    }

    #[test]
    fn rfc8037_signature_known_answer() {
        // RFC 8037 appendix A.4: header {"alg":"EdDSA"}, payload "Example of Ed25519 signing".
        let secret = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let k = SigningKey::from_bytes(&secret.try_into().unwrap());
        let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
        assert_eq!(
            URL_SAFE_NO_PAD.encode(k.sign(input.as_bytes()).to_bytes()),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }

    #[test]
    fn jwk_and_thumbprint() {
        // RFC 8037 appendix A.1/A.2/A.3: the test key and its RFC 7638 thumbprint.
        let secret = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let k = SigningKey::from_bytes(&secret.try_into().unwrap());
        let jwk = Jwk::from_verifying_key(&k.verifying_key());
        assert_eq!(jwk.x, "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        assert_eq!(jwk.kid, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert_eq!(
            serde_json::to_value(&jwk).unwrap(),
            json!({"kty": "OKP", "crv": "Ed25519", "x": jwk.x, "kid": jwk.kid})
        );
        assert_eq!(jwk.verifying_key(), Ok(k.verifying_key()));
        let wrong = Jwk {
            crv: "X25519".into(),
            ..jwk.clone()
        };
        assert!(matches!(
            wrong.verifying_key(),
            Err(JwkError::WrongType { .. })
        ));
        let short = Jwk {
            x: "AAAA".into(),
            ..jwk
        };
        assert_eq!(short.verifying_key(), Err(JwkError::BadX));
    }
}
