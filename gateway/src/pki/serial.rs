//! [`Serial`]: one spelling of a certificate serial for every place that compares them (the
//! broker's CONNECT check, the HTTP channels' client certificates, renewals, the CRL).

/// A certificate serial number, normalised so that every spelling of the same number compares
/// equal: lowercase hex without a `0x`, colons or leading zeros (rmqtt prints serials as a big
/// integer in hex, this PKI writes them fixed-width, an operator may paste `00:AB:…`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

impl Serial {
    /// Normalises any spelling of a serial (it is not checked to be hex: an unknown spelling
    /// simply matches nothing).
    pub fn parse(serial: &str) -> Serial {
        let s = serial
            .trim()
            .trim_start_matches("0x")
            .replace(':', "")
            .to_ascii_lowercase();
        let trimmed = s.trim_start_matches('0');
        Serial(if trimmed.is_empty() {
            "0".to_owned()
        } else {
            trimmed.to_owned()
        })
    }

    /// The normalised form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Serial;

    #[test]
    fn every_spelling_of_a_serial_compares_equal() {
        assert_eq!(Serial::parse("00AB:CD").as_str(), "abcd");
        assert_eq!(Serial::parse("0x0abcd"), Serial::parse("ABCD"));
        assert_eq!(Serial::parse("0000").as_str(), "0");
        assert_ne!(Serial::parse("ab"), Serial::parse("abc"));
    }
}
