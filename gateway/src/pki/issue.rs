//! What the CA signs: terminal certificates (with a key made here, or for a terminal's own key
//! from a CSR), posgate's client certificate for an external broker, the CRL, and the parameters
//! every certificate of this PKI shares (serials, validity, backdating).

use posgate_proto::topics::{valid_tenant, valid_terminal_id};
use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::{
    BACKDATE, CA_VALIDITY_DAYS, CsrKey, IssuedCert, Pki, PkiError, Serial, SignedCert,
    TERMINAL_VALIDITY_DAYS,
};

// === impl Pki (issuing) ===

impl Pki {
    /// Issues a client certificate for a terminal: Subject CN = `terminal_id`, O = `tenant`, EKU
    /// clientAuth, a random 16-byte serial, a fresh ECDSA P-256 key, valid
    /// [`TERMINAL_VALIDITY_DAYS`] (but never beyond the CA). The certificate also names its own
    /// serial, twice: as the subject's serialNumber and as the URI [`cert_uri`] (its only SAN),
    /// so that a broker that maps certificates to users by name (NATS) can tell two certificates
    /// of one terminal apart and retire a replaced one.
    ///
    /// The gateway passes `posgate_proto::topics::tenant_for(terminal_id)` as `tenant`. Nothing is
    /// written to disk; recording the serial (for revocation) is the caller's job.
    ///
    /// # Errors
    /// [`PkiError::BadIdentity`] for an invalid terminal id or a non-alphanumeric tenant,
    /// [`PkiError::Generate`] if key generation or signing fails.
    pub fn issue_terminal(&self, terminal_id: &str, tenant: &str) -> Result<IssuedCert, PkiError> {
        let now = now_whole_seconds();
        let not_after = (now + Duration::days(TERMINAL_VALIDITY_DAYS)).min(self.ca_not_after);
        self.issue_terminal_valid(terminal_id, tenant, now - BACKDATE, not_after)
    }

    /// As [`Pki::issue_terminal`], valid from `not_before` to `not_after` (renewals with a chosen
    /// period; tests that need an expired certificate).
    ///
    /// # Errors
    /// As [`Pki::issue_terminal`].
    pub fn issue_terminal_valid(
        &self,
        terminal_id: &str,
        tenant: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        check_identity(terminal_id, tenant)?;
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: format!("the key of terminal {terminal_id}"),
            source,
        })?;
        let signed = self.sign_terminal(terminal_id, tenant, &key, not_before, not_after)?;
        Ok(IssuedCert {
            cert_pem: signed.cert_pem,
            key_pem: key.serialize_pem(),
            serial_hex: signed.serial_hex,
            not_after: signed.not_after,
        })
    }

    /// Certifies a terminal's own key, taken from a verified CSR ([`csr::parse`](super::csr::parse)): the same
    /// certificate [`Pki::issue_terminal`] makes (CN = `terminal_id`, O = `tenant`, EKU clientAuth,
    /// a random serial, [`TERMINAL_VALIDITY_DAYS`] but never beyond the CA), whatever subject,
    /// names or extensions the request asked for. There is no private key to hand out.
    ///
    /// # Errors
    /// As [`Pki::issue_terminal`].
    pub fn issue_terminal_for_csr(
        &self,
        terminal_id: &str,
        tenant: &str,
        key: &CsrKey,
    ) -> Result<SignedCert, PkiError> {
        check_identity(terminal_id, tenant)?;
        let now = now_whole_seconds();
        let not_after = (now + Duration::days(TERMINAL_VALIDITY_DAYS)).min(self.ca_not_after);
        self.sign_terminal(terminal_id, tenant, key, now - BACKDATE, not_after)
    }

    fn sign_terminal(
        &self,
        terminal_id: &str,
        tenant: &str,
        key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<SignedCert, PkiError> {
        let (mut params, serial_hex) = leaf_params(not_before + BACKDATE, 0, self.ca_not_after);
        params.not_before = not_before;
        params.not_after = not_after;
        params
            .distinguished_name
            .push(DnType::CommonName, terminal_id);
        params
            .distinguished_name
            .push(DnType::OrganizationName, tenant);
        // The serial in the subject makes it differ from the subject of every other certificate
        // of the terminal (NATS compares whole subjects); the URI is what NATS looks up first.
        let generate = |source| PkiError::Generate {
            what: format!("the certificate of terminal {terminal_id}"),
            source,
        };
        params.distinguished_name.push(
            DnType::CustomDnType(SERIAL_NUMBER_OID.to_vec()),
            DnValue::PrintableString(serial_hex.clone().try_into().map_err(generate)?),
        );
        params.subject_alt_names = vec![SanType::URI(
            cert_uri(&serial_hex).try_into().map_err(generate)?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = params.not_after;
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: format!("the certificate of terminal {terminal_id}"),
                source,
            })?;
        Ok(SignedCert {
            cert_pem: cert.pem(),
            serial_hex,
            not_after,
        })
    }

    /// Issues posgate's own client certificate for an external broker: Subject CN =
    /// `common_name` (which must not be a valid terminal id, so that no terminal can ever be
    /// given the same identity), O = `posgate`, EKU clientAuth, a fresh ECDSA P-256 key, valid
    /// [`TERMINAL_VALIDITY_DAYS`] (never beyond the CA). Made at each start, kept in memory only.
    ///
    /// # Errors
    /// [`PkiError::BadIdentity`] when `common_name` is a valid terminal id,
    /// [`PkiError::Generate`] if key generation or signing fails.
    pub fn issue_backend(&self, common_name: &str) -> Result<IssuedCert, PkiError> {
        if valid_terminal_id(common_name) || common_name.is_empty() {
            return Err(PkiError::BadIdentity {
                terminal_id: common_name.to_owned(),
                tenant: "posgate".to_owned(),
            });
        }
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "posgate's client key".to_owned(),
            source,
        })?;
        let now = now_whole_seconds();
        let (mut params, serial_hex) = leaf_params(now, TERMINAL_VALIDITY_DAYS, self.ca_not_after);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "posgate");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = params.not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "posgate's client certificate".to_owned(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex,
            not_after,
        })
    }

    /// A certificate revocation list of the gateway CA naming `serials` (hex, any spelling
    /// [`Serial::parse`] reads), PEM, for a broker that checks client certificates against a CRL
    /// (Mosquitto's `crlfile`). Its number is the current time (so it only grows), and it is valid
    /// until the CA expires: the broker must never find it stale, since OpenSSL then refuses every
    /// client. An unreadable serial is skipped (it can name no certificate of this CA).
    ///
    /// # Errors
    /// [`PkiError::Generate`] when signing fails (an operator's CA without the cRLSign key usage).
    pub fn crl_pem<'a>(
        &self,
        serials: impl IntoIterator<Item = &'a str>,
    ) -> Result<String, PkiError> {
        let now = now_whole_seconds();
        let revoked_certs = serials
            .into_iter()
            .filter_map(|s| {
                let norm = Serial::parse(s);
                let digits = norm.as_str();
                let padded = if digits.len() % 2 == 1 {
                    format!("0{digits}")
                } else {
                    digits.to_owned()
                };
                let bytes = hex::decode(padded).ok()?;
                Some(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: self.ca_not_after.max(now + Duration::days(1)),
            crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "the certificate revocation list".to_owned(),
                source,
            })?;
        crl.pem().map_err(|source| PkiError::Generate {
            what: "the certificate revocation list's PEM".to_owned(),
            source,
        })
    }
}

/// The X.520 serialNumber attribute type (2.5.4.5).
const SERIAL_NUMBER_OID: [u64; 4] = [2, 5, 4, 5];

/// The URI a terminal certificate carries as its SAN: `urn:posgate:cert:` and its serial
/// (normalised, [`Serial`]). NATS (`verify_and_map`) looks it up as a user name.
pub fn cert_uri(serial: &str) -> String {
    format!("urn:posgate:cert:{}", Serial::parse(serial))
}

// === certificates ===

pub(super) fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "posgate gateway CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "posgate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial().0);
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    params
}

/// The current time without its fraction: X.509 times have whole seconds, so a `not_after`
/// computed from this is exactly what the certificate says.
pub(super) fn now_whole_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - Duration::nanoseconds(i64::from(now.nanosecond()))
}

fn check_identity(terminal_id: &str, tenant: &str) -> Result<(), PkiError> {
    if valid_terminal_id(terminal_id) && valid_tenant(tenant) {
        Ok(())
    } else {
        Err(PkiError::BadIdentity {
            terminal_id: terminal_id.to_owned(),
            tenant: tenant.to_owned(),
        })
    }
}

/// Parameters shared by server and terminal certificates; returns the serial as hex too.
pub(super) fn leaf_params(
    now: OffsetDateTime,
    validity_days: i64,
    ca_not_after: OffsetDateTime,
) -> (CertificateParams, String) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let (serial, serial_hex) = random_serial();
    params.serial_number = Some(serial);
    params.not_before = now - BACKDATE;
    params.not_after = (now + Duration::days(validity_days)).min(ca_not_after);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    (params, serial_hex)
}

/// 16 random bytes, the top bit cleared (a positive DER INTEGER with no padding byte) and the
/// next one set (no leading zero byte), so the hex is always 32 digits and reads back the same.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}
