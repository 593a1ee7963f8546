//! Fixed inputs shared by the fuzz targets and the seed generator.

use ed25519_dalek::{SigningKey, VerifyingKey};

/// The signing key of the confirmation target (a fixed test key, never a real one).
pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

/// The key `confirmation_verify` verifies with.
pub fn verifying_key() -> VerifyingKey {
    signing_key().verifying_key()
}

/// The terminal `confirmation_verify` verifies for.
pub const TERMINAL_ID: &str = "pos_01";

/// The webhook timestamp the `webhook_verify` target's clock reads when the input does not set it
/// (the known-answer vectors' timestamp, so they verify).
pub const NOW_UNIX: i64 = 1_775_073_612;

/// Splits `data` at the first `\n`: (before, after). `None` when there is no `\n`.
pub fn split_line(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = data.iter().position(|&b| b == b'\n')?;
    Some((&data[..n], &data[n + 1..]))
}
