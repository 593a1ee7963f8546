//! EIP-681 `qr_payload` checks (provider-api.md §7): before a QR reaches a terminal, the gateway
//! checks that it asks for a USDC `transfer` on the right chain, to the intent's address, of the
//! intent's amount. Addresses compare case-insensitively (EIP-55 mixed case); unknown extra
//! parameters are ignored; anything else fails closed.

use crate::amount::MicroUsdc;

/// Test or live mode, from the API key's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Test,
    Live,
}

impl Mode {
    /// `sk_test_…` or `sk_live_…`.
    pub fn of_key(key: &str) -> Option<Mode> {
        if key.starts_with("sk_test_") {
            Some(Mode::Test)
        } else if key.starts_with("sk_live_") {
            Some(Mode::Live)
        } else {
            None
        }
    }

    /// The USDC contract of the mode's chain.
    pub fn usdc_contract(self) -> &'static str {
        match self {
            Mode::Test => "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            Mode::Live => "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        }
    }

    /// Base Sepolia (84532) or Base (8453).
    pub fn chain_id(self) -> u64 {
        match self {
            Mode::Test => 84532,
            Mode::Live => 8453,
        }
    }
}

/// Why a `qr_payload` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QrError {
    #[error("not an `ethereum:` URI")]
    Scheme,
    #[error("target {0} is not the USDC contract of this mode")]
    Contract(String),
    #[error("chain id {0:?} is not this mode's")]
    Chain(Option<String>),
    #[error("function is not `transfer`")]
    Function,
    #[error("`address` is missing or not the intent's payment address")]
    Address,
    #[error("`uint256` is missing, not plain digits, or not the intent's amount")]
    Amount,
}

/// Checks `qr` against the mode, the intent's payment address and amount.
///
/// # Errors
/// The first [`QrError`] found.
pub fn check(
    qr: &str,
    mode: Mode,
    payment_address: &str,
    amount: MicroUsdc,
) -> Result<(), QrError> {
    let rest = qr.strip_prefix("ethereum:").ok_or(QrError::Scheme)?;
    let (target_chain, call) = rest.split_once('/').ok_or(QrError::Function)?;
    let (target, chain) = match target_chain.split_once('@') {
        Some((t, c)) => (t, Some(c)),
        None => (target_chain, None),
    };
    if !target.eq_ignore_ascii_case(mode.usdc_contract()) {
        return Err(QrError::Contract(target.to_owned()));
    }
    if chain.and_then(|c| c.parse::<u64>().ok()) != Some(mode.chain_id()) {
        return Err(QrError::Chain(chain.map(str::to_owned)));
    }
    let (function, query) = call.split_once('?').ok_or(QrError::Function)?;
    if function != "transfer" {
        return Err(QrError::Function);
    }
    // Exactly one of each: a wallet may read the first of two `address=` (or `uint256=`) and a
    // checker the other, so a repeated key is refused whatever its values.
    let param = |name: &str| {
        let mut values = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
        let first = values.next();
        if values.next().is_some() { None } else { first }
    };
    match param("address") {
        Some(a) if a.eq_ignore_ascii_case(payment_address) => {}
        _ => return Err(QrError::Address),
    }
    match param("uint256") {
        Some(v)
            if !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_digit())
                && v.parse::<u64>() == Ok(amount.0) =>
        {
            Ok(())
        }
        _ => Err(QrError::Amount),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_address_or_amount_is_refused() {
        let address = "0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70";
        let base = "ethereum:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913@8453/transfer?";
        let good = format!("{base}address={address}&uint256=4500000");
        assert_eq!(
            check(&good, Mode::Live, address, MicroUsdc(4_500_000)),
            Ok(())
        );
        let two_addresses = format!(
            "{base}address={address}&address=0x0000000000000000000000000000000000000bad&uint256=4500000"
        );
        assert_eq!(
            check(&two_addresses, Mode::Live, address, MicroUsdc(4_500_000)),
            Err(QrError::Address)
        );
        let two_amounts = format!("{base}address={address}&uint256=4500000&uint256=1");
        assert_eq!(
            check(&two_amounts, Mode::Live, address, MicroUsdc(4_500_000)),
            Err(QrError::Amount)
        );
    }

    const ADDR: &str = "0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70";
    const DOC: &str = "ethereum:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913@8453/transfer?address=0xE006Ca5D3c7c0839CB239C6f624f36B986F56B70&uint256=4500000";

    #[test]
    fn the_documented_payload_passes() {
        assert_eq!(check(DOC, Mode::Live, ADDR, MicroUsdc(4_500_000)), Ok(()));
        assert_eq!(
            check(DOC, Mode::Live, &ADDR.to_lowercase(), MicroUsdc(4_500_000)),
            Ok(())
        );
        assert_eq!(
            check(
                &format!("{DOC}&gas=1"),
                Mode::Live,
                ADDR,
                MicroUsdc(4_500_000)
            ),
            Ok(())
        );
    }

    #[test]
    fn every_mismatch_fails_closed() {
        let amount = MicroUsdc(4_500_000);
        assert_eq!(
            check(DOC, Mode::Test, ADDR, amount),
            Err(QrError::Contract(
                "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913".into()
            ))
        );
        assert_eq!(
            check(
                &DOC.replace("ethereum:", "bitcoin:"),
                Mode::Live,
                ADDR,
                amount
            ),
            Err(QrError::Scheme)
        );
        assert_eq!(
            check(&DOC.replace("@8453", "@1"), Mode::Live, ADDR, amount),
            Err(QrError::Chain(Some("1".into())))
        );
        assert_eq!(
            check(
                &DOC.replace("/transfer", "/approve"),
                Mode::Live,
                ADDR,
                amount
            ),
            Err(QrError::Function)
        );
        assert_eq!(
            check(
                DOC,
                Mode::Live,
                "0x0000000000000000000000000000000000000001",
                amount
            ),
            Err(QrError::Address)
        );
        assert_eq!(
            check(DOC, Mode::Live, ADDR, MicroUsdc(4_400_000)),
            Err(QrError::Amount)
        );
        assert_eq!(
            check(&DOC.replace("4500000", "4.5e6"), Mode::Live, ADDR, amount),
            Err(QrError::Amount)
        );
    }
}
