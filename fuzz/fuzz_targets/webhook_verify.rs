//! Webhook signature checks on arbitrary headers and body.
//!
//! Input: one control byte, then `timestamp\n`, then N signature values each ending in `\n`, then
//! the body (the rest). Control byte: N = 1 + (bits 0-2 mod 5), i.e. 1 to 5 values (5 exercises
//! the more-than-`MAX_SIGNATURES` refusal); bit 3 set means the next 16 bytes are `now_unix` and
//! `tolerance_secs` (i64 little endian) instead of the vectors' clock and 300 s.
//!
//! Properties: nothing panics; `check_headers` agrees with `verify` for one value; a body that
//! verifies under the secret has a signature value equal (ignoring hex case) to `sign(...)`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use posgate_fuzz::{NOW_UNIX, split_line};
use posgate_proto::webhook::{self, DEFAULT_TOLERANCE_SECS, check_headers, vectors};
use secrecy::SecretString;

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    let count = 1 + usize::from(control & 0x07) % 5;
    let (now_unix, tolerance) = if control & 0x08 != 0 {
        if rest.len() < 16 {
            return;
        }
        let (clock, tail) = rest.split_at(16);
        rest = tail;
        let now = i64::from_le_bytes(clock[..8].try_into().unwrap_or_default());
        let tol = i64::from_le_bytes(clock[8..].try_into().unwrap_or_default());
        (now, tol)
    } else {
        (NOW_UNIX, DEFAULT_TOLERANCE_SECS)
    };
    let Some((timestamp, tail)) = split_line(rest) else {
        return;
    };
    rest = tail;
    let mut signatures = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((value, tail)) = split_line(rest) else {
            return;
        };
        rest = tail;
        // Header values reach the gateway as `&str`; non-UTF-8 is refused before this code.
        let Ok(value) = std::str::from_utf8(value) else {
            return;
        };
        signatures.push(value);
    }
    let Ok(timestamp) = std::str::from_utf8(timestamp) else {
        return;
    };
    let body = rest;

    let secrets = [
        SecretString::from("whsec_other"),
        SecretString::from(vectors::SECRET),
    ];
    let checked = check_headers(timestamp, signatures.iter().copied(), now_unix, tolerance);
    let result = checked
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|c| c.verify_body(&secrets, body));
    let _ = result.as_ref().map_err(|e| e.reason());

    if count == 1 {
        let single = webhook::verify(
            &secrets,
            timestamp,
            signatures[0],
            body,
            now_unix,
            tolerance,
        );
        assert_eq!(
            single, result,
            "check_headers+verify_body disagrees with verify"
        );
    }
    if let Ok(index) = result {
        let secret: &[u8] = if index == 0 {
            b"whsec_other"
        } else {
            vectors::SECRET.as_bytes()
        };
        let expected = webhook::sign(secret, timestamp, body);
        assert!(
            signatures.iter().any(|s| s.eq_ignore_ascii_case(&expected)),
            "verified without a matching signature value"
        );
    }
});
