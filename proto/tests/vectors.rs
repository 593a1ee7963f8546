//! The confirmation test vectors, `proto/testdata/confirmation-vectors.json`: every case is
//! checked against [`confirmation::verify`] (exact error variant), the valid ones against
//! [`confirmation::sign`] (byte for byte), and the whole file against its generator below, so the
//! file cannot drift from the signer or the verifier.
//!
//! Regenerate after a deliberate change:
//! `POSGATE_REGEN_VECTORS=1 cargo nextest run -p posgate-proto --test vectors file_is_what_the_generator_writes`, then review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use posgate_proto::amount::MicroUsdc;
use posgate_proto::confirmation::{
    self, Confirmation, ConfirmationStatus, Context, Jwk, VerifyError,
};
use serde::Serialize;
use serde_json::Value;

const VECTORS: &str = include_str!("../testdata/confirmation-vectors.json");
const VECTORS_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/testdata/confirmation-vectors.json"
);

/// The test key: RFC 8032 §7.1 TEST 1 (also the key of RFC 8037 appendix A).
const SEED_HEX: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
/// Another key, which the terminal does not trust: RFC 8032 §7.1 TEST 2.
const OTHER_SEED_HEX: &str = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb";

/// Every [`VerifyError`] variant; [`variant_name`] matches exhaustively, so a new variant fails to
/// compile here until it has a name and a case.
const ALL_VARIANTS: [&str; 6] = [
    "Malformed",
    "BadAlg",
    "BadSignature",
    "BadPayload",
    "WrongTerminal",
    "OldSeq",
];

fn variant_name(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::Malformed => "Malformed",
        VerifyError::BadAlg => "BadAlg",
        VerifyError::BadSignature => "BadSignature",
        VerifyError::BadPayload => "BadPayload",
        VerifyError::WrongTerminal { .. } => "WrongTerminal",
        VerifyError::OldSeq { .. } => "OldSeq",
    }
}

fn key_from_hex(seed_hex: &str) -> SigningKey {
    SigningKey::from_bytes(&hex::decode(seed_hex).unwrap().try_into().unwrap())
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// The generator.

#[derive(Serialize)]
struct VectorFile {
    description: &'static str,
    format: &'static str,
    checks_in_order: [&'static str; 6],
    made_by: [&'static str; 4],
    regenerate: &'static str,
    key: KeyOut,
    other_key: KeyOut,
    cases: Vec<Case>,
}

#[derive(Serialize)]
struct KeyOut {
    note: &'static str,
    seed_hex: String,
    public_key_hex: String,
    jwk: Jwk,
    kid: String,
}

#[derive(Serialize)]
struct Case {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'static str>,
    made_by: &'static str,
    reason: &'static str,
    jws: String,
    terminal_id: &'static str,
    min_seq: u64,
    expect: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Confirmation>,
}

fn key_out(key: &SigningKey, seed_hex: &str, note: &'static str) -> KeyOut {
    let vk = key.verifying_key();
    KeyOut {
        note,
        seed_hex: seed_hex.to_owned(),
        public_key_hex: hex::encode(vk.to_bytes()),
        jwk: Jwk::from_verifying_key(&vk),
        kid: confirmation::kid_for(&vk.to_bytes()),
    }
}

/// `b64(header).b64(payload).b64(sig)` over the given JSON texts, signed by `key`.
fn signed(key: &SigningKey, header: &str, payload: &str) -> String {
    signed_parts(key, &b64(header), &b64(payload))
}

/// Signs the two given (already encoded) parts exactly as they are.
fn signed_parts(key: &SigningKey, header_b64: &str, payload_b64: &str) -> String {
    let input = format!("{header_b64}.{payload_b64}");
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64(sig.to_bytes()))
}

fn replace_once(s: &str, from: &str, to: &str) -> String {
    assert_eq!(s.matches(from).count(), 1, "{from:?} once in {s}");
    s.replacen(from, to, 1)
}

fn split3(jws: &str) -> (&str, &str, &str) {
    let mut p = jws.split('.');
    let parts = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
    assert!(p.next().is_none());
    parts
}

/// The group order L of Ed25519, little-endian.
const L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// `S + L` (little-endian, 256 bits): the same scalar mod L, but not reduced.
fn add_l(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = u16::from(s[i]) + u16::from(L[i]) + carry;
        out[i] = (sum & 0xff) as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0);
    out
}

const TX: &str = "0x9f2c4b1e7a3d5f60c8b2e4a1d7f3c9b5e2a8d4f1c6b3e9a7d2f5c8b1e4a7d3f6";
const ISSUED: &str = "2026-04-01T20:00:12Z";

struct Gen {
    key: SigningKey,
    other: SigningKey,
    kid: String,
    other_kid: String,
    cases: Vec<Case>,
}

impl Gen {
    #[allow(clippy::too_many_arguments)]
    fn case(
        &mut self,
        name: &'static str,
        from: Option<&'static str>,
        made_by: &'static str,
        reason: &'static str,
        jws: String,
        terminal_id: &'static str,
        min_seq: u64,
        expect: &'static str,
        payload: Option<Confirmation>,
    ) {
        assert!(self.cases.iter().all(|c| c.name != name), "{name} twice");
        self.cases.push(Case {
            name,
            from,
            made_by,
            reason,
            jws,
            terminal_id,
            min_seq,
            expect,
            payload,
        });
    }

    /// A valid confirmation as the gateway signs it.
    fn ok(&mut self, name: &'static str, reason: &'static str, c: Confirmation, min_seq: u64) {
        let jws = confirmation::sign(&self.key, &self.kid, &c);
        let terminal = leak(c.terminal_id.clone());
        self.case(
            name,
            None,
            "sign",
            reason,
            jws,
            terminal,
            min_seq,
            "ok",
            Some(c),
        );
    }

    /// An invalid case derived from the base confirmation `ok_confirmed` (terminal `pos_01`,
    /// `min_seq` 0).
    fn bad(
        &mut self,
        name: &'static str,
        made_by: &'static str,
        expect: &'static str,
        reason: &'static str,
        jws: String,
    ) {
        self.case(
            name,
            Some("ok_confirmed"),
            made_by,
            reason,
            jws,
            "pos_01",
            0,
            expect,
            None,
        );
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn with(c: Confirmation, f: impl FnOnce(&mut Confirmation)) -> Confirmation {
    let mut c = c;
    f(&mut c);
    c
}

fn generate() -> String {
    let key = key_from_hex(SEED_HEX);
    let other = key_from_hex(OTHER_SEED_HEX);
    let kid = confirmation::kid_for(&key.verifying_key().to_bytes());
    let other_kid = confirmation::kid_for(&other.verifying_key().to_bytes());
    let mut g = Gen {
        key,
        other,
        kid,
        other_kid,
        cases: Vec::new(),
    };

    // --- Valid confirmations, byte for byte what the gateway's `sign` writes.
    let base = with(
        Confirmation::new(
            "pos_01",
            "pi_8Zx3RqV1mN6p",
            7,
            ConfirmationStatus::Confirmed,
            MicroUsdc(4_400_000),
            ISSUED,
        ),
        |c| {
            c.order_id = Some("ord-20260401-0187".into());
            c.tx_hash = Some(TX.into());
        },
    );
    g.ok(
        "ok_confirmed",
        "a confirmed payment with order and transaction, fresh terminal (min_seq 0)",
        base.clone(),
        0,
    );
    let base_jws = g.cases[0].jws.clone();
    g.case(
        "ok_seq_equal_to_min_seq",
        Some("ok_confirmed"),
        "sign",
        "seq 7 with min_seq 7: at min_seq passes (only below is a replay; duplicates are deduplicated on intent_id + seq, not refused)",
        base_jws.clone(),
        "pos_01",
        7,
        "ok",
        Some(base.clone()),
    );
    g.ok(
        "ok_expired",
        "an expired intent on another terminal, no transaction",
        with(
            Confirmation::new(
                "pos_02",
                "pi_3KfT7wQ2sLp9",
                1,
                ConfirmationStatus::Expired,
                MicroUsdc(12_000_000),
                "2026-04-01T20:15:00Z",
            ),
            |c| c.order_id = Some("ord-20260401-0188".into()),
        ),
        0,
    );
    g.ok(
        "ok_cancelled",
        "a cancelled intent of one cent, no order id",
        Confirmation::new(
            "kiosk-7",
            "pi_Qm4vB8nR2tX6",
            42,
            ConfirmationStatus::Cancelled,
            MicroUsdc(10_000),
            "2026-04-02T08:30:45Z",
        ),
        40,
    );
    for (name, reason, context, seq, amount) in [
        (
            "ok_unresolved_underpaid",
            "unresolved, context underpaid",
            Context::Underpaid,
            8,
            19_990_000,
        ),
        (
            "ok_unresolved_overpaid",
            "unresolved, context overpaid",
            Context::Overpaid,
            9,
            250_000,
        ),
        (
            "ok_unresolved_late",
            "unresolved, context late; six decimals, a large amount",
            Context::Late,
            10,
            1_234_567_890_123,
        ),
        (
            "ok_unresolved_multiple",
            "unresolved, context multiple",
            Context::Multiple,
            11,
            4_400_001,
        ),
    ] {
        let c = with(
            Confirmation::new(
                "pos_01",
                "pi_8Zx3RqV1mN6p",
                seq,
                ConfirmationStatus::Unresolved,
                MicroUsdc(amount),
                ISSUED,
            ),
            |c| {
                c.context = Some(context);
                c.tx_hash = Some(TX.into());
            },
        );
        g.ok(name, reason, c, seq);
    }
    g.ok(
        "ok_seq_above_2_53",
        "seq 2^53+1 with min_seq 2^53: seq is a u64; a parser that reads numbers as doubles gets it wrong",
        Confirmation::new("pos_03", "pi_Zr7cN1wK5yH3", 9_007_199_254_740_993, ConfirmationStatus::Confirmed, MicroUsdc(1_500_000), ISSUED),
        9_007_199_254_740_992,
    );

    // --- Valid, but not as the gateway writes them: hand-built, signed with the test key.
    let header_std = format!(r#"{{"alg":"EdDSA","kid":"{}","typ":"JWT"}}"#, g.kid);
    let payload_std = serde_json::to_string(&base).unwrap();
    let (base_h, base_p, base_s) = split3(&base_jws);
    let (base_h, base_p, base_s) = (base_h.to_owned(), base_p.to_owned(), base_s.to_owned());
    assert_eq!(base_h, b64(&header_std));
    assert_eq!(base_p, b64(&payload_std));

    let extra = replace_once(
        &payload_std,
        r#","issued_at""#,
        r#","merchant_id":"mer_1","issued_at""#,
    );
    let jws = signed(&g.key, &header_std, &extra);
    g.case(
        "ok_unknown_payload_member",
        Some("ok_confirmed"),
        "signed",
        "an unknown payload member (merchant_id) is ignored; payload lists what verify returns",
        jws,
        "pos_01",
        0,
        "ok",
        Some(base.clone()),
    );
    let header_reordered = format!(r#"{{ "typ": "JWT", "kid": "{}", "alg": "EdDSA" }}"#, g.kid);
    let jws = signed(&g.key, &header_reordered, &payload_std);
    g.case("ok_header_reordered", Some("ok_confirmed"), "signed",
        "header members in another order with spaces: verify the signature over the parts as received, never re-serialise",
        jws, "pos_01", 0, "ok", Some(base.clone()));
    let header_other_kid = format!(r#"{{"alg":"EdDSA","kid":"{}","typ":"JWT"}}"#, g.other_kid);
    let jws = signed(&g.key, &header_other_kid, &payload_std);
    g.case("ok_kid_not_checked", Some("ok_confirmed"), "signed",
        "kid names another key but the gateway key signed: verify does not look at kid (a terminal holds one key; the signature decides)",
        jws, "pos_01", 0, "ok", Some(base.clone()));

    // --- Malformed: not three base64url parts with a JSON header carrying a string alg.
    g.case(
        "malformed_empty",
        None,
        "hand",
        "the empty string",
        String::new(),
        "pos_01",
        0,
        "Malformed",
        None,
    );
    g.bad(
        "malformed_two_parts",
        "edited",
        "Malformed",
        "the signature part and its dot removed",
        format!("{base_h}.{base_p}"),
    );
    g.bad(
        "malformed_four_parts",
        "edited",
        "Malformed",
        "a fourth part appended (\".AAAA\")",
        format!("{base_jws}.AAAA"),
    );
    g.bad(
        "malformed_signature_padded",
        "edited",
        "Malformed",
        "base64url padding (\"==\") on the signature part; JWS uses none",
        format!("{base_jws}=="),
    );
    let std_sig = {
        let i = base_s
            .find(['-', '_'])
            .expect("a '-' or '_' in the base signature");
        let mut s = base_s.clone();
        let std_char = if &s[i..=i] == "-" { "+" } else { "/" };
        s.replace_range(i..=i, std_char);
        s
    };
    g.bad(
        "malformed_signature_std_alphabet",
        "edited",
        "Malformed",
        "one '-' or '_' of the signature written in the standard alphabet ('+' or '/')",
        format!("{base_h}.{base_p}.{std_sig}"),
    );
    let trailing = {
        // 64 bytes are 86 characters; the last carries 4 bits and 2 unused zero bits.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = *base_s.as_bytes().last().unwrap();
        let v = ALPHABET.iter().position(|&a| a == last).unwrap();
        assert_eq!(v & 3, 0);
        let mut s = base_s[..base_s.len() - 1].to_owned();
        s.push(char::from(ALPHABET[v | 1]));
        s
    };
    g.bad("malformed_signature_trailing_bits", "edited", "Malformed",
        "the last signature character has a non-zero unused bit (decodes to the same 64 bytes in a lenient decoder; not canonical base64url, RFC 4648 §3.5)",
        format!("{base_h}.{base_p}.{trailing}"));
    let padded_header = STANDARD.encode(&header_std);
    assert!(padded_header.ends_with('=') && padded_header != base_h);
    g.bad("malformed_header_padded", "signed", "Malformed",
        "the header part in standard base64 with its \"==\" padding (signed over the parts as sent, so only the encoding is wrong)",
        signed_parts(&g.key, &padded_header, &base_p));
    g.bad(
        "malformed_header_not_json",
        "signed",
        "Malformed",
        "the header is not JSON (text EdDSA)",
        signed(&g.key, "EdDSA", &payload_std),
    );
    g.bad(
        "malformed_header_without_alg",
        "signed",
        "Malformed",
        "the header has no alg",
        signed(
            &g.key,
            &format!(r#"{{"kid":"{}","typ":"JWT"}}"#, g.kid),
            &payload_std,
        ),
    );
    g.bad(
        "malformed_header_alg_not_string",
        "signed",
        "Malformed",
        "alg is the array [\"EdDSA\"], not a string",
        signed(
            &g.key,
            &replace_once(&header_std, r#""alg":"EdDSA""#, r#""alg":["EdDSA"]"#),
            &payload_std,
        ),
    );

    // --- BadAlg: alg is not exactly "EdDSA", or a crit member is present; refused before the key is used.
    for (name, alg, reason) in [
        (
            "bad_alg_none",
            "none",
            "alg none (signed anyway: refused on alg alone)",
        ),
        ("bad_alg_hs256", "HS256", "alg HS256, the HMAC confusion"),
        (
            "bad_alg_ed25519",
            "Ed25519",
            "alg Ed25519 (the RFC 9864 name): only EdDSA is accepted",
        ),
        (
            "bad_alg_lowercase",
            "eddsa",
            "alg eddsa: the comparison is exact, case-sensitive",
        ),
    ] {
        let h = replace_once(
            &header_std,
            r#""alg":"EdDSA""#,
            &format!(r#""alg":"{alg}""#),
        );
        let jws = signed(&g.key, &h, &payload_std);
        g.bad(name, "signed", "BadAlg", reason, jws);
    }
    let crit_h = format!(
        r#"{{"alg":"EdDSA","crit":["exp"],"exp":1775073612,"kid":"{}","typ":"JWT"}}"#,
        g.kid
    );
    g.bad("bad_crit_unknown", "signed", "BadAlg", "crit [\"exp\"]: verify understands no extension, so any crit is refused (RFC 7515 §4.1.11)",
        signed(&g.key, &crit_h, &payload_std));
    let crit_empty = replace_once(&header_std, r#""kid""#, r#""crit":[],"kid""#);
    g.bad(
        "bad_crit_empty",
        "signed",
        "BadAlg",
        "crit [] (RFC 7515 forbids an empty list; verify refuses any crit)",
        signed(&g.key, &crit_empty, &payload_std),
    );

    // --- BadSignature: the signature does not verify (strictly) with the gateway key.
    let edited_payload = replace_once(&payload_std, r#""amount":"4.40""#, r#""amount":"440.00""#);
    g.bad(
        "bad_signature_payload_edited",
        "edited",
        "BadSignature",
        "amount changed to 440.00 after signing, signature kept",
        format!("{base_h}.{}.{base_s}", b64(&edited_payload)),
    );
    let edited_header = replace_once(&header_std, r#""typ":"JWT""#, r#""typ":"JOSE""#);
    g.bad(
        "bad_signature_header_edited",
        "edited",
        "BadSignature",
        "typ changed to JOSE after signing, signature kept",
        format!("{}.{base_p}.{base_s}", b64(&edited_header)),
    );
    let sig = URL_SAFE_NO_PAD.decode(&base_s).unwrap();
    let mut flipped = sig.clone();
    flipped[10] ^= 0x01;
    g.bad(
        "bad_signature_bit_flipped",
        "edited",
        "BadSignature",
        "one bit of the signature (byte 10, in R) flipped",
        format!("{base_h}.{base_p}.{}", b64(&flipped)),
    );
    let mut unreduced = sig.clone();
    unreduced[32..].copy_from_slice(&add_l(&sig[32..]));
    g.bad("bad_signature_s_not_reduced", "edited", "BadSignature",
        "S replaced by S + L (the group order): the same value mod L, which a non-strict verifier accepts; S must be below L (RFC 8032 §5.1.7)",
        format!("{base_h}.{base_p}.{}", b64(unreduced)));
    g.bad(
        "bad_signature_other_key",
        "sign",
        "BadSignature",
        "the same header (gateway kid) and payload signed by other_key",
        confirmation::sign(&g.other, &g.kid, &base),
    );
    g.bad(
        "bad_signature_truncated",
        "edited",
        "BadSignature",
        "the signature's last byte removed (63 bytes)",
        format!("{base_h}.{base_p}.{}", b64(&sig[..63])),
    );
    g.bad(
        "bad_signature_empty",
        "edited",
        "BadSignature",
        "the signature part empty (the dot kept)",
        format!("{base_h}.{base_p}."),
    );

    // --- BadPayload: validly signed, but not a version 1 confirmation.
    for (name, reason, payload) in [
        (
            "bad_payload_not_json",
            "the payload is not JSON",
            "confirmed 4.40 usd".to_owned(),
        ),
        (
            "bad_payload_version_2",
            "v is 2",
            replace_once(&payload_std, r#"{"v":1,"#, r#"{"v":2,"#),
        ),
        (
            "bad_payload_missing_amount_micros",
            "amount_micros is missing",
            replace_once(&payload_std, r#""amount_micros":4400000,"#, ""),
        ),
        (
            "bad_payload_unknown_status",
            "status refunded is not a status",
            replace_once(
                &payload_std,
                r#""status":"confirmed""#,
                r#""status":"refunded""#,
            ),
        ),
        (
            "bad_payload_seq_string",
            "seq is the string \"7\", not a number",
            replace_once(&payload_std, r#""seq":7,"#, r#""seq":"7","#),
        ),
    ] {
        let jws = signed(&g.key, &header_std, &payload);
        g.bad(name, "signed", "BadPayload", leak(reason.to_owned()), jws);
    }

    // --- WrongTerminal and OldSeq: the unchanged base message, checked by another terminal or
    // with a higher min_seq.
    g.case(
        "wrong_terminal",
        Some("ok_confirmed"),
        "sign",
        "checked by terminal pos_02; the message is for pos_01",
        base_jws.clone(),
        "pos_02",
        0,
        "WrongTerminal",
        None,
    );
    g.case(
        "wrong_terminal_case",
        Some("ok_confirmed"),
        "sign",
        "checked by terminal POS_01: terminal ids compare exactly, case-sensitive",
        base_jws.clone(),
        "POS_01",
        0,
        "WrongTerminal",
        None,
    );
    g.case(
        "old_seq",
        Some("ok_confirmed"),
        "sign",
        "seq 7 with min_seq 8: a replay of a message already processed",
        base_jws,
        "pos_01",
        8,
        "OldSeq",
        None,
    );

    let file = VectorFile {
        description: "Test vectors for posgate's signed payment confirmations (proto/src/confirmation.rs). A terminal verifier is right when every case with expect \"ok\" verifies and gives payload, and every other case is refused (expect names the posgate VerifyError variant, reason says why). See proto/testdata/README.md.",
        format: "compact JWS (RFC 7515), base64url without padding, header {\"alg\":\"EdDSA\",\"kid\":...,\"typ\":\"JWT\"} (RFC 8037), payload the JSON of a Confirmation; the signature is Ed25519 over the ASCII of header_part + \".\" + payload_part as received; verify with key.public_key_hex (or key.jwk) and the case's terminal_id and min_seq",
        checks_in_order: [
            "Malformed: three '.'-separated parts, each strict base64url without padding; header a JSON object with a string alg",
            "BadAlg: alg exactly \"EdDSA\" and no crit member",
            "BadSignature: 64-byte signature, strict Ed25519 verification (S < L, no small-order R or key)",
            "BadPayload: payload a JSON object with every required Confirmation member, the right types, v = 1 (unknown members ignored)",
            "WrongTerminal: payload terminal_id equal to the terminal's own id, byte for byte",
            "OldSeq: payload seq >= min_seq (u64)",
        ],
        made_by: [
            "sign: byte for byte the output of posgate's confirmation::sign (what the gateway sends)",
            "signed: hand-built header/payload text, signed with key over the parts as written",
            "edited: the bytes of case `from` changed after signing, not re-signed",
            "hand: written by hand",
        ],
        regenerate: "POSGATE_REGEN_VECTORS=1 cargo nextest run -p posgate-proto --test vectors file_is_what_the_generator_writes (proto/tests/vectors.rs); Ed25519 is deterministic, so the output is the same on every run",
        key: key_out(
            &g.key,
            SEED_HEX,
            "the gateway key terminals trust in these vectors: RFC 8032 section 7.1 TEST 1 (the key of RFC 8037 appendix A); a test key, never used in production",
        ),
        other_key: key_out(
            &g.other,
            OTHER_SEED_HEX,
            "a key the terminal does not trust (RFC 8032 section 7.1 TEST 2); signs bad_signature_other_key, and its kid appears in ok_kid_not_checked",
        ),
        cases: g.cases,
    };
    let mut out = serde_json::to_string_pretty(&file).unwrap();
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------------
// The checks: they read the file only, not the generator.

fn file() -> Value {
    serde_json::from_str(VECTORS).unwrap()
}

fn cases(file: &Value) -> &Vec<Value> {
    file["cases"].as_array().unwrap()
}

fn s<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// A decoder that forgives padding, the standard alphabet and trailing bits, to look behind the
/// encoding defects the Malformed cases carry.
fn lenient_decode(part: &str) -> Option<Vec<u8>> {
    let lenient = GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    lenient
        .decode(part.replace('+', "-").replace('/', "_"))
        .ok()
}

#[test]
fn the_key_is_described_consistently() {
    let f = file();
    for (field, seed) in [("key", SEED_HEX), ("other_key", OTHER_SEED_HEX)] {
        let k = &f[field];
        let key = key_from_hex(s(k, "seed_hex"));
        assert_eq!(s(k, "seed_hex"), seed);
        let vk = key.verifying_key();
        assert_eq!(s(k, "public_key_hex"), hex::encode(vk.to_bytes()));
        let jwk: Jwk = serde_json::from_value(k["jwk"].clone()).unwrap();
        assert_eq!((jwk.kty.as_str(), jwk.crv.as_str()), ("OKP", "Ed25519"));
        assert_eq!(jwk.verifying_key(), Ok(vk));
        assert_eq!(jwk.kid, confirmation::kid_for(&vk.to_bytes()));
        assert_eq!(s(k, "kid"), jwk.kid);
    }
    // RFC 8037 appendix A.3 gives this key's thumbprint.
    assert_eq!(
        s(&f["key"], "kid"),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
}

#[test]
fn every_case_verifies_as_stated() {
    let f = file();
    let vk = key_from_hex(s(&f["key"], "seed_hex")).verifying_key();
    let mut covered = BTreeSet::new();
    let mut names = BTreeSet::new();
    for case in cases(&f) {
        let name = s(case, "name");
        assert!(names.insert(name), "{name} twice");
        let terminal = s(case, "terminal_id");
        let min_seq = case["min_seq"].as_u64().unwrap();
        let got = confirmation::verify(s(case, "jws"), &vk, terminal, min_seq);
        match (s(case, "expect"), got) {
            ("ok", Ok(c)) => {
                let want: Confirmation = serde_json::from_value(case["payload"].clone()).unwrap();
                assert_eq!(c, want, "{name}");
                // The payload in the file is exactly the decoded fields, nothing more or less.
                assert_eq!(serde_json::to_value(&c).unwrap(), case["payload"], "{name}");
                covered.insert("ok");
            }
            (expect, Err(e)) => {
                assert_eq!(variant_name(&e), expect, "{name}: {e}");
                assert!(case.get("payload").is_none(), "{name}");
                match &e {
                    VerifyError::WrongTerminal { got } => assert_ne!(got, terminal, "{name}"),
                    VerifyError::OldSeq { seq, min_seq: m } => {
                        assert_eq!(*m, min_seq, "{name}");
                        assert!(seq < m, "{name}");
                    }
                    _ => {}
                }
                covered.insert(variant_name(&e));
            }
            (expect, Ok(_)) => panic!("{name}: verified, expected {expect}"),
        }
    }
    let all: BTreeSet<&str> = ALL_VARIANTS.iter().copied().chain(["ok"]).collect();
    assert_eq!(covered, all, "a case for every outcome");
}

/// Each invalid case has exactly one defect: the checks after the one that fails would pass.
/// (verify stops at the first failed check, so the exact variant above shows the earlier ones
/// pass.) A verifier that checks in another order therefore still refuses it for the same reason.
#[test]
fn every_invalid_case_has_only_its_own_defect() {
    let f = file();
    let vk = key_from_hex(s(&f["key"], "seed_hex")).verifying_key();
    for case in cases(&f) {
        let (name, expect, jws) = (s(case, "name"), s(case, "expect"), s(case, "jws"));
        if expect == "ok" {
            continue;
        }
        let parts: Vec<&str> = jws.split('.').collect();
        if parts.len() != 3 {
            assert_eq!(expect, "Malformed", "{name}");
            continue;
        }
        // The signature (however encoded) is good unless the signature is the defect.
        if expect != "BadSignature" {
            let sig = lenient_decode(parts[2]).unwrap();
            let sig = Signature::from_slice(&sig).unwrap();
            let input = &jws[..parts[0].len() + 1 + parts[1].len()];
            vk.verify_strict(input.as_bytes(), &sig)
                .unwrap_or_else(|e| panic!("{name}: signature {e}"));
        }
        // The header has alg EdDSA and no crit unless the header is the defect.
        let header: Option<Value> =
            lenient_decode(parts[0]).and_then(|h| serde_json::from_slice(&h).ok());
        match &header {
            Some(h) if h["alg"] == "EdDSA" && h.get("crit").is_none() => {}
            _ => assert!(
                matches!(expect, "Malformed" | "BadAlg"),
                "{name}: header {header:?}"
            ),
        }
        // The payload is a confirmation for this terminal at or above min_seq unless the payload
        // is the defect.
        let payload: Option<Confirmation> = lenient_decode(parts[1])
            .and_then(|p| serde_json::from_slice(&p).ok())
            .filter(|c: &Confirmation| c.v == confirmation::VERSION);
        match payload {
            Some(c) => {
                let terminal_ok = c.terminal_id == s(case, "terminal_id");
                let seq_ok = c.seq >= case["min_seq"].as_u64().unwrap();
                assert_eq!(terminal_ok, expect != "WrongTerminal", "{name}");
                assert_eq!(seq_ok, expect != "OldSeq", "{name}");
            }
            None => assert_eq!(expect, "BadPayload", "{name}"),
        }
    }
}

#[test]
fn valid_vectors_are_what_sign_gives() {
    let f = file();
    let key = key_from_hex(s(&f["key"], "seed_hex"));
    let kid = s(&f["key"], "kid");
    let mut signed = 0;
    for case in cases(&f) {
        if s(case, "made_by") == "sign" && s(case, "expect") == "ok" {
            let c: Confirmation = serde_json::from_value(case["payload"].clone()).unwrap();
            assert_eq!(
                confirmation::sign(&key, kid, &c),
                s(case, "jws"),
                "{}",
                s(case, "name")
            );
            signed += 1;
        }
    }
    assert!(signed >= 8, "{signed}");
}

#[test]
fn file_is_what_the_generator_writes() {
    let generated = generate();
    if std::env::var_os("POSGATE_REGEN_VECTORS").is_some() {
        std::fs::write(VECTORS_PATH, &generated).unwrap();
        return;
    }
    assert!(
        generated == VECTORS,
        "{VECTORS_PATH} differs from its generator; regenerate with POSGATE_REGEN_VECTORS=1 and review"
    );
}
