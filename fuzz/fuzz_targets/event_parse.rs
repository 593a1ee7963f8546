//! Webhook bodies: the envelope, then the typed `data` of its event type.
//!
//! Properties: nothing panics; an accepted envelope has an `evt_` id of 5-255 bytes, a non-empty
//! type and object `data`; a parsed amount converts back to itself through `Decimal`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use posgate_proto::MicroUsdc;
use posgate_proto::event::{self, Envelope, EventData, MAX_ID_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::parse(data) else {
        return;
    };
    assert!(envelope.id.starts_with("evt_") && envelope.id.len() > 4);
    assert!(envelope.id.len() <= MAX_ID_BYTES);
    assert!(!envelope.kind.is_empty());
    assert!(envelope.data.get().trim_start().starts_with('{'));
    let kind = envelope.event_type();
    let _ = kind.label();
    match EventData::parse(kind, envelope.data) {
        Ok(EventData::PaymentIntent(pi)) => {
            let _ = event::metadata_str(pi.metadata.as_ref(), "terminal_id");
            amount_round_trip(pi.amount);
        }
        Ok(EventData::Transaction(tx)) => {
            let _ = event::metadata_str(tx.metadata.as_ref(), "terminal_id");
            amount_round_trip(tx.amount);
        }
        Ok(EventData::Settlement(_)) | Ok(EventData::Unknown) | Err(_) => {}
    }
});

/// A parsed amount's decimal form converts back to the same amount, and displays.
fn amount_round_trip(amount: MicroUsdc) {
    let back = MicroUsdc::try_from(amount.to_decimal());
    assert_eq!(
        back.ok(),
        Some(amount),
        "amount does not round-trip through Decimal"
    );
    let _ = amount.to_string();
}
