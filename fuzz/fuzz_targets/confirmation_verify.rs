//! Signed confirmations (compact JWS) as a terminal receives them, on arbitrary UTF-8.
//!
//! Input: the first 8 bytes are `min_seq` (u64 little endian), the rest must be UTF-8 and is the
//! message. The key is fixed (`posgate_fuzz::verifying_key`), the terminal `pos_01`.
//!
//! Properties: nothing panics; an accepted confirmation is version 1, for `pos_01`, with
//! `seq >= min_seq`. (A fuzzer finding a *valid* signature on its own would be news: the accepted
//! inputs come from the seed corpus, mutated only where the signature does not cover.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use posgate_fuzz::{TERMINAL_ID, verifying_key};
use posgate_proto::confirmation::{self, VERSION};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (seq, text) = data.split_at(8);
    let min_seq = u64::from_le_bytes(seq.try_into().unwrap_or_default());
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let key = verifying_key();
    match confirmation::verify(text, &key, TERMINAL_ID, min_seq) {
        Ok(c) => {
            assert_eq!(c.v, VERSION);
            assert_eq!(c.terminal_id, TERMINAL_ID);
            assert!(c.seq >= min_seq);
        }
        Err(e) => {
            let _ = e.reason();
        }
    }
    // The same message for another terminal never verifies.
    if let Ok(c) = confirmation::verify(text, &key, "pos_02", 0) {
        assert_eq!(c.terminal_id, "pos_02");
    }
});
