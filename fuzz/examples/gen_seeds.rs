//! Writes the seed corpora under `corpus/<target>/` (run from `fuzz/`:
//! `cargo +nightly run --example gen_seeds`). Deterministic: the same files every run.

use std::fs;
use std::path::Path;

use posgate_fuzz::{TERMINAL_ID, signing_key};
use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::{self, Confirmation, ConfirmationStatus, Context, kid_for};
use posgate_proto::webhook::vectors;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    if let Err(e) =
        fs::create_dir_all(&dir).and_then(|()| fs::write(dir.join(format!("seed_{name}")), bytes))
    {
        eprintln!("writing {target}/{name}: {e}");
        std::process::exit(1);
    }
}

/// A `webhook_verify` input: control byte, timestamp, signature values, body.
fn webhook(control: u8, clock: Option<(i64, i64)>, ts: &str, sigs: &[&str], body: &str) -> Vec<u8> {
    let mut out = vec![control];
    if let Some((now, tol)) = clock {
        out.extend_from_slice(&now.to_le_bytes());
        out.extend_from_slice(&tol.to_le_bytes());
    }
    out.extend_from_slice(ts.as_bytes());
    out.push(b'\n');
    for s in sigs {
        out.extend_from_slice(s.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(body.as_bytes());
    out
}

fn main() {
    let (ts, cb, cs) = (
        vectors::TIMESTAMP,
        vectors::CONFIRMED_BODY,
        vectors::CONFIRMED_SIGNATURE,
    );
    let (tb, tsig) = (vectors::TRANSACTION_BODY, vectors::TRANSACTION_SIGNATURE);
    let zero = format!("sha256={}", "0".repeat(64));

    // webhook_verify: both known-answer vectors, the right value among wrong ones, five values,
    // an explicit clock at the tolerance's edge.
    write(
        "webhook_verify",
        "confirmed",
        &webhook(0, None, ts, &[cs], cb),
    );
    write(
        "webhook_verify",
        "transaction",
        &webhook(0, None, ts, &[tsig], tb),
    );
    write(
        "webhook_verify",
        "third_of_three",
        &webhook(2, None, ts, &[&zero, &zero, cs], cb),
    );
    write(
        "webhook_verify",
        "five_values",
        &webhook(4, None, ts, &[&zero, &zero, &zero, &zero, cs], cb),
    );
    write(
        "webhook_verify",
        "clock_edge",
        &webhook(0x08, Some((1_775_073_912, 300)), ts, &[cs], cb),
    );
    println!(
        "webhook vectors verify: {:?}",
        posgate_proto::webhook::verify(
            &[secrecy::SecretString::from(vectors::SECRET)],
            ts,
            cs,
            cb.as_bytes(),
            posgate_fuzz::NOW_UNIX,
            300
        )
    );
    write(
        "webhook_verify",
        "empty_sig",
        &webhook(0, None, ts, &["sha256="], cb),
    );

    // event_parse: the two vectors, an unknown type, a settlement, a decimal-string amount.
    write("event_parse", "confirmed", cb.as_bytes());
    write("event_parse", "transaction", tb.as_bytes());
    write(
        "event_parse",
        "unknown_type",
        br#"{"id":"evt_1","type":"brand.new","data":{"x":1}}"#,
    );
    write(
        "event_parse",
        "settlement",
        br#"{"id":"evt_2","type":"settlement.completed","api_version":"2026-04-01","created_at":"2026-04-01T20:00:12Z","data":{"id":"stl_1","payment_intent_ids":["pi_1","pi_2"]}}"#,
    );
    write(
        "event_parse",
        "expired_string_amount",
        br#"{"id":"evt_3","type":"payment_intent.expired","data":{"id":"pi_1","status":"expired","amount":"10000.000001","expires_at":"2026-04-01T20:04:21+02:00","metadata":{"terminal_id":"pos-0042","n":null}}}"#,
    );

    // confirmation_verify: 8 bytes of min_seq, then a JWS signed with the target's key.
    let key = signing_key();
    let kid = kid_for(&key.verifying_key().to_bytes());
    let mut confirmed = Confirmation::new(
        TERMINAL_ID,
        "pi_8Zx3RqV1mN6p",
        7,
        ConfirmationStatus::Confirmed,
        MicroUsdc(4_400_000),
        "2026-04-01T20:00:12Z",
    );
    confirmed.order_id = Some("ord-20260401-0187".into());
    let mut unresolved = confirmed.clone();
    unresolved.status = ConfirmationStatus::Unresolved;
    unresolved.context = Some(Context::Underpaid);
    unresolved.tx_hash =
        Some("0x0098ba05986a2d06ed773e7867aab18897ee53c188a12291e01b0f1ff52c2efd".into());
    let other_terminal = Confirmation::new(
        "pos_02",
        "pi_1",
        1,
        ConfirmationStatus::Expired,
        MicroUsdc(10_000),
        "2026-04-01T20:00:12Z",
    );
    for (name, min_seq, c) in [
        ("confirmed", 0_u64, &confirmed),
        ("confirmed_old_seq", 8, &confirmed),
        ("unresolved", 7, &unresolved),
        ("other_terminal", 0, &other_terminal),
    ] {
        let mut input = min_seq.to_le_bytes().to_vec();
        input.extend_from_slice(confirmation::sign(&key, &kid, c).as_bytes());
        write("confirmation_verify", name, &input);
        // The seeds that should reach the payload checks do.
        let verified = confirmation::verify(
            std::str::from_utf8(&input[8..]).unwrap_or_default(),
            &posgate_fuzz::verifying_key(),
            TERMINAL_ID,
            min_seq,
        );
        println!(
            "confirmation_verify/seed_{name}: {:?}",
            verified.map(|c| c.seq)
        );
    }
    let mut none = 0_u64.to_le_bytes().to_vec();
    none.extend_from_slice(b"eyJhbGciOiJub25lIn0.eyJ2IjoxfQ.");
    write("confirmation_verify", "alg_none", &none);

    // rpc_request: `json\ntopic\nstring`.
    let tenant = posgate_proto::topics::tenant_for(TERMINAL_ID);
    write(
        "rpc_request",
        "create_intent",
        format!(
            "{}\n/tenants/{tenant}/rpc/req\n{TERMINAL_ID}",
            r#"{"id":"req-1","method":"create_intent","params":{"amount":"4.40","order_id":"ord-1","ttl":300}}"#
        )
        .as_bytes(),
    );
    write(
        "rpc_request",
        "get_intent",
        format!(
            "{}\n/tenants/{tenant}/payments/pi_8Zx3RqV1mN6p\n{tenant}",
            r#"{"id":"req-2","method":"get_intent","params":{"intent_id":"pi_8Zx3RqV1mN6p"}}"#
        )
        .as_bytes(),
    );
    write(
        "rpc_request",
        "cancel_no_params",
        format!(
            "{}\n/tenants/+/acks\nstore-12-lane-3",
            r#"{"id":"r","method":"cancel_intent"}"#
        )
        .as_bytes(),
    );
    write(
        "rpc_request",
        "status_filter",
        format!(
            "{}\n/tenants/{tenant}/#\nt706F73",
            r#"{"id":"x","method":"m","params":[1.50,-0,1e400]}"#
        )
        .as_bytes(),
    );
}
