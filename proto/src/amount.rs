//! Money: [`MicroUsdc`], the only amount type inside posgate.
//!
//! The provider sends amounts as JSON numbers in USD; USDC has 6 decimals and 1 USD is priced as 1
//! USDC. Amounts are parsed as exact decimals (serde_json's `arbitrary_precision` keeps the number's
//! text) and converted to integer micro-units. Never `f64`: `(8.2_f64 * 1e6) as u64` is 8199999.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// An amount of USDC in micro-units (1 USDC = 1 000 000).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsdc(pub u64);

/// Why a decimal amount is not a valid [`MicroUsdc`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount {0} is negative")]
    Negative(Decimal),
    #[error("amount {0} has more than 6 decimal places")]
    TooPrecise(Decimal),
    #[error("amount {0} is too large")]
    TooLarge(Decimal),
}

/// Micro-units per USDC.
pub const MICROS_PER_USDC: u64 = 1_000_000;

impl TryFrom<Decimal> for MicroUsdc {
    type Error = AmountError;

    /// Exact conversion: negative values, more than 6 decimals and values over `u64` are errors.
    fn try_from(value: Decimal) -> Result<Self, AmountError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(AmountError::Negative(value));
        }
        let normalized = value.normalize();
        if normalized.scale() > 6 {
            return Err(AmountError::TooPrecise(value));
        }
        let micros = normalized
            .checked_mul(Decimal::from(MICROS_PER_USDC))
            .ok_or(AmountError::TooLarge(value))?;
        if !micros.fract().is_zero() {
            return Err(AmountError::TooPrecise(value));
        }
        let micros: u64 = micros
            .trunc()
            .try_into()
            .map_err(|_| AmountError::TooLarge(value))?;
        Ok(MicroUsdc(micros))
    }
}

impl MicroUsdc {
    /// The amount as an exact decimal in USDC.
    pub fn to_decimal(self) -> Decimal {
        Decimal::from(self.0) / Decimal::from(MICROS_PER_USDC)
    }

    /// `self - other`, or 0.
    pub fn saturating_sub(self, other: MicroUsdc) -> MicroUsdc {
        MicroUsdc(self.0.saturating_sub(other.0))
    }

    /// `self + other`, saturating at `u64::MAX`.
    pub fn saturating_add(self, other: MicroUsdc) -> MicroUsdc {
        MicroUsdc(self.0.saturating_add(other.0))
    }
}

/// The display form used on the wire and on screens: at least 2 decimals, at most 6
/// (`4.40`, `0.045`, `10000.00`).
impl fmt::Display for MicroUsdc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_USDC;
        let frac = self.0 % MICROS_PER_USDC;
        let digits = format!("{frac:06}");
        let trimmed = digits.trim_end_matches('0');
        let shown = if trimmed.len() < 2 {
            &digits[..2]
        } else {
            trimmed
        };
        write!(f, "{whole}.{shown}")
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn micros(s: &str) -> Result<MicroUsdc, AmountError> {
        MicroUsdc::try_from(Decimal::from_str(s).unwrap())
    }

    #[test]
    fn converts_exactly() {
        assert_eq!(micros("4.5"), Ok(MicroUsdc(4_500_000)));
        assert_eq!(micros("8.2"), Ok(MicroUsdc(8_200_000)));
        assert_eq!(micros("0.045"), Ok(MicroUsdc(45_000)));
        assert_eq!(micros("4.455"), Ok(MicroUsdc(4_455_000)));
        assert_eq!(micros("0.000001"), Ok(MicroUsdc(1)));
        assert_eq!(micros("10000"), Ok(MicroUsdc(10_000_000_000)));
        assert_eq!(
            micros("1.5000000"),
            Ok(MicroUsdc(1_500_000)),
            "trailing zeros are not precision"
        );
        assert_eq!(micros("0"), Ok(MicroUsdc(0)));
        assert_eq!(micros("-0"), Ok(MicroUsdc(0)));
    }

    #[test]
    fn rejects_bad_amounts() {
        assert!(matches!(micros("-1"), Err(AmountError::Negative(_))));
        assert!(matches!(micros("-0.01"), Err(AmountError::Negative(_))));
        assert!(matches!(
            micros("1.0000001"),
            Err(AmountError::TooPrecise(_))
        ));
        assert!(matches!(
            micros("79228162514264337593543950335"),
            Err(AmountError::TooLarge(_))
        ));
        assert!(matches!(
            micros("20000000000000"),
            Err(AmountError::TooLarge(_))
        ));
    }

    #[test]
    fn parses_json_numbers_without_f64() {
        #[derive(Deserialize)]
        struct A {
            #[serde(with = "rust_decimal::serde::arbitrary_precision")]
            amount: Decimal,
        }
        for (text, want) in [
            ("8.2", 8_200_000),
            ("19.99", 19_990_000),
            ("1e-6", 1),
            ("4.455", 4_455_000),
        ] {
            let a: A = serde_json::from_str(&format!("{{\"amount\":{text}}}")).unwrap();
            assert_eq!(MicroUsdc::try_from(a.amount), Ok(MicroUsdc(want)), "{text}");
        }
    }

    #[test]
    fn displays_two_to_six_decimals() {
        assert_eq!(MicroUsdc(4_400_000).to_string(), "4.40");
        assert_eq!(MicroUsdc(45_000).to_string(), "0.045");
        assert_eq!(MicroUsdc(10_000_000_000).to_string(), "10000.00");
        assert_eq!(MicroUsdc(1).to_string(), "0.000001");
        assert_eq!(MicroUsdc(0).to_string(), "0.00");
    }
}
