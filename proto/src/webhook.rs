//! The provider's webhook signature scheme.
//!
//! `X-StableGenius-Signature: sha256=<hex>` is HMAC-SHA256, keyed with the secret's bytes as-is,
//! over `"{timestamp}.{raw body}"`, where `timestamp` is the `X-StableGenius-Timestamp` header's
//! bytes exactly as received. The gateway verifies the raw bytes it received, never a re-serialised
//! document, and only then parses those same bytes. Shared by the gateway (verify) and the simulator
//! (sign), so the known-answer vectors below are what keeps a shared bug from passing both sides.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// Name of the timestamp header.
pub const TIMESTAMP_HEADER: &str = "X-StableGenius-Timestamp";
/// Name of the signature header.
pub const SIGNATURE_HEADER: &str = "X-StableGenius-Signature";
/// The documented tolerance between the timestamp and our clock.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery's signature was refused. Every variant is answered `401`; the variant goes to the
/// log and the metrics, never to the sender.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("header {0} is missing or not UTF-8")]
    MissingHeader(&'static str),
    #[error("timestamp is not 1-12 ASCII digits")]
    BadTimestamp,
    #[error("timestamp is {skew_s} s away from our clock")]
    Stale { skew_s: i64 },
    #[error("signature is not `sha256=` followed by hex")]
    BadSignatureFormat,
    #[error("signature does not match any configured secret")]
    Mismatch,
    #[error("no webhook secret is configured")]
    NoSecret,
}

impl SignatureError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::MissingHeader(_) => "missing_header",
            SignatureError::BadTimestamp => "bad_timestamp",
            SignatureError::Stale { .. } => "stale",
            SignatureError::BadSignatureFormat => "bad_format",
            SignatureError::Mismatch => "mismatch",
            SignatureError::NoSecret => "no_secret",
        }
    }
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signature header value for `body` sent at `timestamp`: `sha256=<lowercase hex>`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("sha256={}", hex::encode(tag))
}

/// Parses the timestamp header: 1-12 ASCII digits.
///
/// # Errors
/// [`SignatureError::BadTimestamp`] for anything else.
pub fn parse_timestamp(timestamp: &str) -> Result<i64, SignatureError> {
    if timestamp.is_empty()
        || timestamp.len() > 12
        || !timestamp.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(SignatureError::BadTimestamp);
    }
    timestamp.parse().map_err(|_| SignatureError::BadTimestamp)
}

/// Most `X-StableGenius-Signature` values looked at in one delivery (the provider sends one; a
/// sender of many is refused before any MAC is computed).
pub const MAX_SIGNATURES: usize = 4;

/// The headers of a delivery, checked before its body is read: the timestamp's form and distance
/// from `now_unix`, and the signature values' form (at most [`MAX_SIGNATURES`]).
#[derive(Clone, Debug)]
pub struct CheckedHeaders {
    timestamp: String,
    tags: Vec<Vec<u8>>,
    /// Our clock minus the timestamp.
    pub skew_s: i64,
}

/// Checks the headers of a delivery without its body.
///
/// # Errors
/// A [`SignatureError`] naming the first check that failed, in the documented order: timestamp
/// form, tolerance, signature form (including more than [`MAX_SIGNATURES`] values).
pub fn check_headers<'a>(
    timestamp: &str,
    signatures: impl IntoIterator<Item = &'a str>,
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<CheckedHeaders, SignatureError> {
    let ts = parse_timestamp(timestamp)?;
    let skew_s = now_unix.saturating_sub(ts);
    if skew_s.unsigned_abs() > tolerance_secs.unsigned_abs() {
        return Err(SignatureError::Stale { skew_s });
    }
    let mut tags = Vec::new();
    for (n, signature) in signatures.into_iter().enumerate() {
        if n == MAX_SIGNATURES {
            return Err(SignatureError::BadSignatureFormat);
        }
        let tag = signature
            .strip_prefix("sha256=")
            .and_then(|hex_part| hex::decode(hex_part).ok())
            .ok_or(SignatureError::BadSignatureFormat)?;
        tags.push(tag);
    }
    if tags.is_empty() {
        return Err(SignatureError::MissingHeader(SIGNATURE_HEADER));
    }
    Ok(CheckedHeaders {
        timestamp: timestamp.to_owned(),
        tags,
        skew_s,
    })
}

impl CheckedHeaders {
    /// Whether one of the signature values is the MAC of `body` under one of `secrets`: the MAC
    /// is computed once per secret (over the body once), then compared with each value.
    /// Returns the index of the secret that matched, for the rotation metric. The comparison is
    /// `hmac::Mac::verify_slice`, constant time with a length check, so an empty or truncated
    /// signature fails instead of matching a prefix.
    ///
    /// # Errors
    /// [`SignatureError::NoSecret`] or [`SignatureError::Mismatch`].
    pub fn verify_body(
        &self,
        secrets: &[SecretString],
        body: &[u8],
    ) -> Result<usize, SignatureError> {
        if secrets.is_empty() {
            return Err(SignatureError::NoSecret);
        }
        secrets
            .iter()
            .position(|secret| {
                let mac = mac(secret.expose_secret().as_bytes(), &self.timestamp, body);
                self.tags
                    .iter()
                    .any(|tag| mac.clone().verify_slice(tag).is_ok())
            })
            .ok_or(SignatureError::Mismatch)
    }
}

/// Verifies one delivery: [`check_headers`] with one signature value, then
/// [`CheckedHeaders::verify_body`]. Returns the index of the secret that matched.
///
/// # Errors
/// A [`SignatureError`] naming the first check that failed, in the documented order: timestamp
/// form, tolerance, signature form, MAC.
pub fn verify(
    secrets: &[SecretString],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<usize, SignatureError> {
    check_headers(timestamp, [signature], now_unix, tolerance_secs)?.verify_body(secrets, body)
}

/// The known-answer vectors of the provider documentation (provider-api.md §11), exact bytes.
pub mod vectors {
    /// The test secret, used as its 18 literal bytes.
    pub const SECRET: &str = "whsec_test_posgate";
    /// The timestamp header of both vectors (2026-04-01T20:00:12Z).
    pub const TIMESTAMP: &str = "1775073612";
    /// Vector 1: `payment_intent.confirmed`, 1010 bytes.
    pub const CONFIRMED_BODY: &str = r#"{"id":"evt_01KN5A3MB94TFF59TDWH9EDD1R","object":"event","type":"payment_intent.confirmed","api_version":"2026-04-01","created_at":"2026-04-01T20:00:12Z","data":{"id":"pi_8Zx3RqV1mN6p","object":"payment_intent","status":"confirmed","amount":4.5,"currency":"usd","merchant_id":"mer_4kT9wQz2","payment_address":"0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70","chain":"base","token":"USDC","qr_payload":"ethereum:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913@8453/transfer?address=0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70&uint256=4500000","qr_image_url":"https://api.stablegenius.co/v1/payment-intents/pi_8Zx3RqV1mN6p/qr.png","expires_at":"2026-04-01T20:04:21Z","created_at":"2026-04-01T19:59:21Z","net_amount":4.455,"fee":0.045,"fee_rate":0.01,"tx_hash":"0x0098ba05986a2d06ed773e7867aab18897ee53c188a12291e01b0f1ff52c2efd","sender_address":"0x6568868Af58B3CFD61bd0dbB288f25A9F71F3359","block_number":44107219,"confirmed_at":"2026-04-01T20:00:09Z","metadata":{"order_id":"ord-20260401-0187","terminal_id":"pos-0042"}}}"#;
    /// Expected signature header of vector 1.
    pub const CONFIRMED_SIGNATURE: &str =
        "sha256=41bc195f7ff9adbdd2af30529ae1c148a9897a904be744c774fffeb6b2f4f165";
    /// Vector 2: `transaction.created`, 717 bytes.
    pub const TRANSACTION_BODY: &str = r#"{"id":"evt_01KN5A3MT31HEAD8X4A1JH69RE","object":"event","type":"transaction.created","api_version":"2026-04-01","created_at":"2026-04-01T20:00:12Z","data":{"id":"txn_3Jm7Qe1VbY9s","object":"transaction","payment_intent_id":"pi_5Tn2Kd8WqL0c","merchant_id":"mer_4kT9wQz2","status":"confirmed","amount":4.4,"currency":"usd","chain":"base","token":"USDC","tx_hash":"0x600a64a060420ede762cc8a2b387d4e85b5ec1e162d29f2ebe1dbaff84766460","payment_address":"0x6426362575Ac5Bc13e67d1495840fFe0a00F3De7","sender_address":"0x8E8e8633490576C8a000543F0E7d50D5E54c31b5","block_number":44107218,"confirmed_at":"2026-04-01T20:00:07Z","settlement_status":"pending","metadata":{"order_id":"ord-20260401-0188","terminal_id":"pos-0017"}}}"#;
    /// Expected signature header of vector 2.
    pub const TRANSACTION_SIGNATURE: &str =
        "sha256=bdaae2d76ff53c4caa6003d48c3beaacba5e9123a6ef613c8237c8dedc3dcdbd";
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::vectors::*;
    use super::*;

    /// Several signature values: the right one anywhere among the first four verifies; a fifth
    /// value is refused before any MAC is computed.
    #[test]
    fn at_most_four_signature_values_are_looked_at() {
        let now = TIMESTAMP.parse::<i64>().unwrap();
        let wrong = "sha256=".to_owned() + &"0".repeat(64);
        let values = [wrong.as_str(), wrong.as_str(), CONFIRMED_SIGNATURE];
        let checked = check_headers(TIMESTAMP, values, now, 300).unwrap();
        assert_eq!(
            checked.verify_body(
                &secrets(&["whsec_other", SECRET]),
                CONFIRMED_BODY.as_bytes()
            ),
            Ok(1)
        );
        let five = [wrong.as_str(); 4]
            .into_iter()
            .chain([CONFIRMED_SIGNATURE])
            .collect::<Vec<_>>();
        assert_eq!(
            check_headers(TIMESTAMP, five, now, 300).map(|_| ()),
            Err(SignatureError::BadSignatureFormat)
        );
        assert_eq!(
            check_headers(TIMESTAMP, [], now, 300).map(|_| ()),
            Err(SignatureError::MissingHeader(SIGNATURE_HEADER))
        );
    }

    const TS: i64 = 1_775_073_612;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from(s.to_string()))
            .collect()
    }

    fn check(
        ts: &str,
        sig: &str,
        body: &str,
        now: i64,
        list: &[&str],
    ) -> Result<usize, SignatureError> {
        verify(
            &secrets(list),
            ts,
            sig,
            body.as_bytes(),
            now,
            DEFAULT_TOLERANCE_SECS,
        )
    }

    #[test]
    fn vectors_are_the_documented_bytes() {
        assert_eq!(CONFIRMED_BODY.len(), 1010);
        assert_eq!(
            hex::encode(Sha256::digest(CONFIRMED_BODY)),
            "423d6bfc4412cb16ebbf9059e5e93189e826d47287b276ba7db427cf585cae93"
        );
        assert_eq!(TRANSACTION_BODY.len(), 717);
        assert_eq!(
            hex::encode(Sha256::digest(TRANSACTION_BODY)),
            "e30c342f60876e2d77cc5a30e2ebc03cfe960d7eb1324b5c1587bb65b736429c"
        );
    }

    #[test]
    fn sign_matches_known_answers() {
        assert_eq!(
            sign(SECRET.as_bytes(), TIMESTAMP, CONFIRMED_BODY.as_bytes()),
            CONFIRMED_SIGNATURE
        );
        assert_eq!(
            sign(SECRET.as_bytes(), TIMESTAMP, TRANSACTION_BODY.as_bytes()),
            TRANSACTION_SIGNATURE
        );
    }

    #[test]
    fn verify_companion_cases() {
        let body = CONFIRMED_BODY;
        let sig = CONFIRMED_SIGNATURE;
        assert_eq!(check(TIMESTAMP, sig, body, TS, &[SECRET]), Ok(0));
        assert_eq!(
            check(
                TIMESTAMP,
                TRANSACTION_SIGNATURE,
                TRANSACTION_BODY,
                TS,
                &[SECRET]
            ),
            Ok(0)
        );
        assert_eq!(
            check("1775073613", sig, body, TS, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(TIMESTAMP, "sha256=", body, TS, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(TIMESTAMP, &sig[..sig.len() - 1], body, TS, &[SECRET]),
            Err(SignatureError::BadSignatureFormat)
        );
        assert_eq!(
            check(TIMESTAMP, &sig[..sig.len() - 2], body, TS, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
        let upper = format!("sha256={}", sig["sha256=".len()..].to_uppercase());
        assert_eq!(check(TIMESTAMP, &upper, body, TS, &[SECRET]), Ok(0));
        assert_eq!(
            check(TIMESTAMP, sig, &format!("{body}\n"), TS, &[SECRET]),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(check(TIMESTAMP, sig, body, TS + 300, &[SECRET]), Ok(0));
        assert_eq!(check(TIMESTAMP, sig, body, TS - 300, &[SECRET]), Ok(0));
        assert_eq!(
            check(TIMESTAMP, sig, body, TS + 301, &[SECRET]),
            Err(SignatureError::Stale { skew_s: 301 })
        );
        assert_eq!(
            check(TIMESTAMP, sig, body, TS - 301, &[SECRET]),
            Err(SignatureError::Stale { skew_s: -301 })
        );
        assert_eq!(check(TIMESTAMP, sig, body, TS, &["other", SECRET]), Ok(1));
        assert_eq!(
            check(TIMESTAMP, sig, body, TS, &[]),
            Err(SignatureError::NoSecret)
        );
        assert_eq!(
            check(TIMESTAMP, sig, body, TS, &["other"]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_headers_are_refused_not_panicking() {
        let body = CONFIRMED_BODY;
        for ts in [
            "",
            "abc",
            "17750736.12",
            "-1775073612",
            "1234567890123",
            " 1775073612",
        ] {
            assert_eq!(
                check(ts, CONFIRMED_SIGNATURE, body, TS, &[SECRET]),
                Err(SignatureError::BadTimestamp),
                "{ts:?}"
            );
        }
        for sig in [
            "",
            "sha256",
            "sha1=abcd",
            "sha256=zz",
            "SHA256=41bc",
            "sha256=41bc195g",
        ] {
            assert_eq!(
                check(TIMESTAMP, sig, body, TS, &[SECRET]),
                Err(SignatureError::BadSignatureFormat),
                "{sig:?}"
            );
        }
    }
}
