//! The gateway's key material: its certificate authority, the MQTT server certificate, terminal
//! client certificates for provisioning, and the Ed25519 key that signs confirmations.
//!
//! Everything lives in `data_dir/pki/` (mode 0700):
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.pem` · `ca.key` | the CA: ECDSA P-256, self-signed, 10 years, path length 0 | 0644 · 0600 |
//! | `server.pem` · `server.key` | the MQTT TLS identity, signed by the CA, SANs = `mqtt.server_names` | 0644 · 0600 |
//! | `server.managed` | marker: posgate issued `server.pem` and may reissue it | 0644 |
//! | `signing.key` | the confirmation-signing key, Ed25519, PKCS#8 PEM (`PRIVATE KEY`) | 0600 |
//!
//! The first start creates all of them; later starts load them. An operator may supply their own
//! `ca.pem` + `ca.key` (PKCS#8 PEM key, e.g. `openssl pkcs8 -topk8 -nocrypt`), and optionally
//! `server.pem` + `server.key`, before the first start: existing files are used as they are, and a
//! missing server certificate is issued by whichever CA is there. `server.pem` is posgate's to
//! rewrite only while `server.managed` exists (posgate writes it when it issues the certificate):
//! then a change of `mqtt.server_names`, a CA it does not chain to, a key it does not match, or
//! fewer than [`SERVER_RENEW_DAYS`] days left make the next start reissue it, keeping `server.key`.
//! Delete the marker to manage `server.pem` yourself.
//!
//! Crash safety: every file is written to `name.tmp` (created with its final mode), synced, then
//! renamed over `name`, so a crash never leaves half a key. Keys are written before the
//! certificates that use them, and a key found without its certificate gets a new certificate (the
//! CA's included), so a crash between two files is repaired at the next start.
//!
//! Terminal certificates: [`Pki::issue_terminal`] makes the key too (returned once, in the
//! provisioning bundle, never kept); [`Pki::issue_terminal_for_csr`] certifies a key that never
//! leaves the terminal, taken from a PKCS#10 request that [`csr::parse`] checked (see its docs for
//! what is and is not taken from a request). Either way the gateway alone decides the subject.
//!
//! This module does no TLS: the broker builds its rustls configuration from
//! [`Pki::ca_pem`], [`Pki::server_cert_pem`] and [`Pki::server_key_pem`], and reads a connecting
//! terminal's identity with [`identity_of`]. It must not log key material.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use posgate_proto::confirmation::Jwk;
use posgate_proto::topics::{valid_tenant, valid_terminal_id};
use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

pub mod csr;
pub use csr::{CsrError, CsrKey, KeyKind};

/// The CA certificate, PEM.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key, PKCS#8 PEM.
pub const CA_KEY_FILE: &str = "ca.key";
/// The MQTT server certificate, PEM.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The MQTT server private key, PKCS#8 PEM.
pub const SERVER_KEY_FILE: &str = "server.key";
/// Marker: `server.pem` was issued by posgate, which may reissue it.
pub const SERVER_MANAGED_FILE: &str = "server.managed";
/// The Ed25519 confirmation-signing key, PKCS#8 PEM.
pub const SIGNING_KEY_FILE: &str = "signing.key";

/// Lifetime of a CA posgate creates.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Lifetime of the server certificate (never beyond the CA's).
pub const SERVER_VALIDITY_DAYS: i64 = 1826;
/// A managed server certificate with fewer days left is reissued at start.
pub const SERVER_RENEW_DAYS: i64 = 180;
/// Lifetime of a terminal certificate (never beyond the CA's).
pub const TERMINAL_VALIDITY_DAYS: i64 = 1826;

/// Backdating of `notBefore`, so terminals with a slightly slow clock accept a fresh certificate.
const BACKDATE: Duration = Duration::hours(1);
const PRIVATE_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// Why the key material could not be loaded, created or issued.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("creating directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{present} exists but {missing} does not; supply both or neither")]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{path} is not a PKCS#8 PEM private key posgate can use")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} is not a PKCS#8 PEM Ed25519 private key")]
    BadSigningKey {
        path: PathBuf,
        #[source]
        source: ed25519_dalek::pkcs8::Error,
    },
    #[error("{what} is not a PEM X.509 certificate")]
    BadPem { what: String },
    #[error("{what} is not a valid X.509 certificate")]
    BadCert {
        what: String,
        #[source]
        source: x509_parser::error::X509Error,
    },
    #[error("{path} is not a CA certificate (basicConstraints cA is not set)")]
    NotCa { path: PathBuf },
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{server} was supplied without a CA; put the CA that issued it in {ca_cert} and {ca_key}"
    )]
    ServerWithoutCa {
        server: PathBuf,
        ca_cert: PathBuf,
        ca_key: PathBuf,
    },
    #[error("mqtt.server_names is empty; the server certificate needs at least one name")]
    NoServerNames,
    #[error("terminal id {terminal_id:?} or tenant {tenant:?} cannot go in a certificate")]
    BadIdentity { terminal_id: String, tenant: String },
    #[error("certificate has no {field}")]
    MissingField { field: &'static str },
    #[error("generating {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("encoding the signing key")]
    EncodeSigningKey(#[source] ed25519_dalek::pkcs8::Error),
}

/// A freshly issued terminal certificate with its private key. `key_pem` is a secret: it goes
/// into the provisioning bundle once and is not kept by the gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its ECDSA P-256 private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The serial number, lowercase hex (32 digits), as [`identity_of`] reads it back.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A terminal certificate for a key the gateway never saw (from a CSR): nothing secret in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The serial number, lowercase hex (32 digits), as [`identity_of`] reads it back.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Who a client certificate names, as the broker needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    /// Subject CN: the terminal id.
    pub cn: String,
    /// Subject O: the terminal's MQTT tenant.
    pub o: String,
    /// Serial number, lowercase hex, without leading zero bytes.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// The loaded key material. Cheap to share behind an `Arc`; issuing takes `&self`.
pub struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca_not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
    signing_key: SigningKey,
    jwk: Jwk,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("ca_not_after", &self.ca_not_after)
            .field("kid", &self.jwk.kid)
            .finish_non_exhaustive()
    }
}

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

// === impl Pki ===

impl Pki {
    /// Loads the key material from `data_dir/pki/`, creating whatever is missing (see the module
    /// docs for the files and the rules).
    ///
    /// `server_names` are the server certificate's SANs (`mqtt.server_names`); names that parse as
    /// IP addresses become IP SANs.
    ///
    /// # Errors
    /// [`PkiError`] when the directory or a file cannot be read or written, a supplied key or
    /// certificate cannot be used (unreadable, not PKCS#8, not a CA, key and certificate that don't
    /// belong together, half of a pair), or `server_names` is empty.
    pub fn load_or_create(data_dir: &Path, server_names: &[String]) -> Result<Pki, PkiError> {
        if server_names.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let dir = data_dir.join("pki");
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(|source| PkiError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        warn_if_loose(&dir);
        let now = now_whole_seconds();

        let signing_key = load_or_create_signing_key(&dir.join(SIGNING_KEY_FILE))?;
        let jwk = Jwk::from_verifying_key(&signing_key.verifying_key());

        let ca = load_or_create_ca(&dir, now)?;
        let (server_cert_pem, server_key_pem) =
            load_or_create_server(&dir, &ca, server_names, now)?;

        Ok(Pki {
            dir,
            ca_pem: ca.pem,
            ca_not_after: ca.not_after,
            issuer: ca.issuer,
            server_cert_pem,
            server_key_pem,
            signing_key,
            jwk,
        })
    }

    /// Issues a client certificate for a terminal: Subject CN = `terminal_id`, O = `tenant`, EKU
    /// clientAuth, a random 16-byte serial, a fresh ECDSA P-256 key, valid
    /// [`TERMINAL_VALIDITY_DAYS`] (but never beyond the CA).
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

    /// Certifies a terminal's own key, taken from a verified CSR ([`csr::parse`]): the same
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

    /// End of the CA's validity: no certificate it issues outlives it.
    pub fn ca_not_after(&self) -> OffsetDateTime {
        self.ca_not_after
    }

    /// The CA certificate, PEM: terminals trust it for the server, the broker for clients.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The MQTT server certificate, PEM (leaf only).
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The MQTT server private key, PKCS#8 PEM. Secret: never log it.
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// The Ed25519 key that signs confirmations.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing_key
    }

    /// The public half of [`Pki::signing_key`] as a JWK, for the provisioning bundle.
    pub fn jwk(&self) -> Jwk {
        self.jwk.clone()
    }

    /// The signing key's id: its RFC 7638 thumbprint, the JWS header's `kid`.
    pub fn kid(&self) -> &str {
        &self.jwk.kid
    }

    /// The directory holding the files (`data_dir/pki`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads the identity of a client certificate (DER, as TLS hands it over).
///
/// # Errors
/// [`PkiError::BadCert`] if it is not an X.509 certificate, [`PkiError::MissingField`] if the
/// subject has no UTF-8 CN or O.
pub fn identity_of(cert_der: &[u8]) -> Result<CertIdentity, PkiError> {
    let cert = parse_der(cert_der, "client certificate")?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(PkiError::MissingField { field: "CN" })?;
    let o = subject
        .iter_organization()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(PkiError::MissingField { field: "O" })?;
    let serial = cert.raw_serial();
    let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    Ok(CertIdentity {
        cn: cn.to_owned(),
        o: o.to_owned(),
        serial_hex: hex::encode(&serial[first..]),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// [`identity_of`] for a PEM certificate (the first one in `pem`).
///
/// # Errors
/// [`PkiError::BadPem`] if `pem` holds no certificate, else as [`identity_of`].
pub fn identity_of_pem(pem: &str) -> Result<CertIdentity, PkiError> {
    identity_of(&pem_to_der(pem, "client certificate")?)
}

// === loading and creating ===

struct Ca {
    pem: String,
    der: Vec<u8>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

fn load_or_create_signing_key(path: &Path) -> Result<SigningKey, PkiError> {
    if let Some(pem) = read_opt(path)? {
        warn_if_loose(path);
        return SigningKey::from_pkcs8_pem(&pem).map_err(|source| PkiError::BadSigningKey {
            path: path.to_owned(),
            source,
        });
    }
    // ed25519-dalek 2 wants rand_core 0.6; the workspace has rand 0.9. Drawing the 32 seed
    // bytes ourselves avoids a second rand in the build.
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(PkiError::EncodeSigningKey)?;
    write_atomic(path, pem.as_bytes(), PRIVATE_MODE)?;
    tracing::info!(path = %path.display(), "created the confirmation-signing key");
    Ok(key)
}

fn load_or_create_ca(dir: &Path, now: OffsetDateTime) -> Result<Ca, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read_opt(&cert_path)?;
    let key_pem = read_opt(&key_path)?;
    let key = match (&cert_pem, key_pem) {
        (Some(_), None) => {
            return Err(PkiError::Incomplete {
                present: cert_path,
                missing: key_path,
            });
        }
        (_, Some(pem)) => {
            warn_if_loose(&key_path);
            KeyPair::from_pem(&pem).map_err(|source| PkiError::BadKey {
                path: key_path.clone(),
                source,
            })?
        }
        (None, None) => {
            let key = KeyPair::generate().map_err(|source| PkiError::Generate {
                what: "the CA key".to_owned(),
                source,
            })?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), PRIVATE_MODE)?;
            key
        }
    };

    let Some(pem) = cert_pem else {
        // No certificate (first start, or a crash right after the key was written).
        let params = ca_params(now);
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "the CA certificate".to_owned(),
                source,
            })?;
        let pem = cert.pem();
        write_atomic(&cert_path, pem.as_bytes(), PUBLIC_MODE)?;
        tracing::info!(path = %cert_path.display(), "created the gateway CA");
        return Ok(Ca {
            pem,
            der: cert.der().to_vec(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        });
    };

    let der = pem_to_der(&pem, &cert_path.display().to_string())?;
    let (not_after, key_matches, is_ca) = {
        let cert = parse_der(&der, &cert_path.display().to_string())?;
        (
            cert.validity().not_after.to_datetime(),
            cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
            cert.is_ca(),
        )
    };
    if !is_ca {
        return Err(PkiError::NotCa { path: cert_path });
    }
    if !key_matches {
        return Err(PkiError::KeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    if not_after < now {
        tracing::warn!(path = %cert_path.display(), %not_after, "the CA certificate has expired");
    }
    let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key).map_err(|source| {
        PkiError::Generate {
            what: format!("an issuer from {}", cert_path.display()),
            source,
        }
    })?;
    Ok(Ca {
        pem,
        der,
        not_after,
        issuer,
    })
}

/// Returns (certificate PEM, key PEM) of the server identity.
fn load_or_create_server(
    dir: &Path,
    ca: &Ca,
    server_names: &[String],
    now: OffsetDateTime,
) -> Result<(String, String), PkiError> {
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let marker_path = dir.join(SERVER_MANAGED_FILE);
    let cert_pem = read_opt(&cert_path)?;
    let key_pem = read_opt(&key_path)?;
    let managed = marker_path.exists();

    if let (Some(cert_pem), false) = (&cert_pem, managed) {
        // The operator's certificate: used as it is, after checks that turn a TLS failure at
        // every terminal into an error at start.
        let Some(key_pem) = key_pem else {
            return Err(PkiError::Incomplete {
                present: cert_path,
                missing: key_path,
            });
        };
        warn_if_loose(&key_path);
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadKey {
            path: key_path.clone(),
            source,
        })?;
        let der = pem_to_der(cert_pem, &cert_path.display().to_string())?;
        let check = check_server(&der, &key, ca, &wanted_sans(server_names))?;
        if !check.key_matches {
            return Err(PkiError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        if !check.chains {
            return Err(PkiError::ServerWithoutCa {
                server: cert_path,
                ca_cert: dir.join(CA_CERT_FILE),
                ca_key: dir.join(CA_KEY_FILE),
            });
        }
        if !check.names_match {
            tracing::warn!(
                path = %cert_path.display(),
                "the supplied server certificate's names differ from mqtt.server_names; using it as is"
            );
        }
        return Ok((cert_pem.clone(), key_pem));
    }

    // Ours to manage. Mark it so before the first certificate is written.
    if !managed {
        write_atomic(
            &marker_path,
            b"posgate issued server.pem and reissues it when mqtt.server_names change.\n\
              Delete this file to manage server.pem and server.key yourself.\n",
            PUBLIC_MODE,
        )?;
    }
    // The key is kept across reissues: only server.pem changes, in one rename.
    let (key, key_pem) = match key_pem {
        Some(pem) => {
            warn_if_loose(&key_path);
            let key = KeyPair::from_pem(&pem).map_err(|source| PkiError::BadKey {
                path: key_path.clone(),
                source,
            })?;
            (key, pem)
        }
        None => {
            let key = KeyPair::generate().map_err(|source| PkiError::Generate {
                what: "the server key".to_owned(),
                source,
            })?;
            let pem = key.serialize_pem();
            write_atomic(&key_path, pem.as_bytes(), PRIVATE_MODE)?;
            (key, pem)
        }
    };
    let wanted = wanted_sans(server_names);
    if let Some(cert_pem) = cert_pem {
        let reason = match pem_to_der(&cert_pem, &cert_path.display().to_string())
            .and_then(|der| check_server(&der, &key, ca, &wanted))
        {
            Err(_) => Some("unreadable"),
            Ok(check) if !check.key_matches => Some("key changed"),
            Ok(check) if !check.chains => Some("CA changed"),
            Ok(check) if !check.names_match => Some("server names changed"),
            Ok(check) if check.not_after - now < Duration::days(SERVER_RENEW_DAYS) => {
                Some("expiring")
            }
            Ok(_) => None,
        };
        let Some(reason) = reason else {
            return Ok((cert_pem, key_pem));
        };
        tracing::info!(path = %cert_path.display(), reason, "reissuing the server certificate");
    }

    let (mut params, _serial) = leaf_params(now, SERVER_VALIDITY_DAYS, ca.not_after);
    params.distinguished_name.push(
        DnType::CommonName,
        server_names.first().map(String::as_str).unwrap_or_default(),
    );
    params.subject_alt_names = server_names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(|source| PkiError::Generate {
            what: "the server certificate's names".to_owned(),
            source,
        })?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|source| PkiError::Generate {
            what: "the server certificate".to_owned(),
            source,
        })?;
    let cert_pem = cert.pem();
    write_atomic(&cert_path, cert_pem.as_bytes(), PUBLIC_MODE)?;
    tracing::info!(path = %cert_path.display(), names = ?server_names, "issued the server certificate");
    Ok((cert_pem, key_pem))
}

// === certificates ===

fn ca_params(now: OffsetDateTime) -> CertificateParams {
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
fn now_whole_seconds() -> OffsetDateTime {
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
fn leaf_params(
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

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum San {
    Dns(String),
    Ip(IpAddr),
}

fn wanted_sans(server_names: &[String]) -> BTreeSet<San> {
    server_names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::Dns(name.to_ascii_lowercase()),
        })
        .collect()
}

struct ServerCheck {
    key_matches: bool,
    chains: bool,
    names_match: bool,
    not_after: OffsetDateTime,
}

fn check_server(
    der: &[u8],
    key: &KeyPair,
    ca: &Ca,
    wanted: &BTreeSet<San>,
) -> Result<ServerCheck, PkiError> {
    let cert = parse_der(der, SERVER_CERT_FILE)?;
    let ca_cert = parse_der(&ca.der, CA_CERT_FILE)?;
    let chains = cert.issuer() == ca_cert.subject()
        && cert.verify_signature(Some(ca_cert.public_key())).is_ok();
    let mut sans = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    sans.insert(San::Dns(dns.to_ascii_lowercase()));
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(ServerCheck {
        key_matches: cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
        chains,
        names_match: &sans == wanted,
        not_after: cert.validity().not_after.to_datetime(),
    })
}

fn parse_der<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::BadCert {
            what: what.to_owned(),
            source: match e {
                x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                x509_parser::nom::Err::Incomplete(_) => {
                    x509_parser::error::X509Error::InvalidCertificate
                }
            },
        })
}

fn pem_to_der(pem: &str, what: &str) -> Result<Vec<u8>, PkiError> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .ok_or_else(|| PkiError::BadPem {
            what: what.to_owned(),
        })
}

// === files ===

/// The file's contents, or `None` if it does not exist.
fn read_opt(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `path` atomically with `mode`: a fresh `path.tmp` created with the mode (never a
/// moment with wider permissions), synced, renamed over `path`, then the directory synced.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover from a crash may have another mode; `create_new` below must make it afresh.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

/// Warns when a private file or the directory is readable by group or others. Supplied files
/// are not chmod-ed behind the operator's back.
fn warn_if_loose(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "key material is accessible to group or others; chmod it to 0600 (0700 for the directory)"
            );
        }
    }
}

#[cfg(test)]
mod serial_tests {
    use super::Serial;

    #[test]
    fn every_spelling_of_a_serial_compares_equal() {
        assert_eq!(Serial::parse("00AB:CD").as_str(), "abcd");
        assert_eq!(Serial::parse("0x0abcd"), Serial::parse("ABCD"));
        assert_eq!(Serial::parse("0000").as_str(), "0");
        assert_ne!(Serial::parse("ab"), Serial::parse("abc"));
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::confirmation::kid_for;
    use x509_parser::extensions::ParsedExtension;

    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn der(pem: &str) -> Vec<u8> {
        pem_to_der(pem, "test").unwrap()
    }

    /// Whether `cert_pem` is signed by `ca_pem`'s key and names it as issuer.
    fn chains_to(cert_pem: &str, ca_pem: &str) -> bool {
        let (cert_der, ca_der) = (der(cert_pem), der(ca_pem));
        let cert = parse_der(&cert_der, "cert").unwrap();
        let ca = parse_der(&ca_der, "ca").unwrap();
        cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    fn ekus(cert_pem: &str) -> (bool, bool) {
        let cert_der = der(cert_pem);
        let cert = parse_der(&cert_der, "cert").unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        (eku.server_auth, eku.client_auth)
    }

    fn sans(cert_pem: &str) -> BTreeSet<San> {
        let cert_der = der(cert_pem);
        let cert = parse_der(&cert_der, "cert").unwrap();
        let mut out = BTreeSet::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => {
                            out.insert(San::Dns((*d).to_owned()));
                        }
                        GeneralName::IPAddress(b) if b.len() == 4 => {
                            out.insert(San::Ip(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())));
                        }
                        other => panic!("unexpected SAN {other:?}"),
                    }
                }
            }
        }
        out
    }

    #[test]
    fn pki_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pki>();
    }

    #[test]
    fn first_start_creates_private_files() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(tmp.path(), &names(&["localhost", "127.0.0.1"])).unwrap();
        let dir = tmp.path().join("pki");
        assert_eq!(pki.dir(), dir);
        assert_eq!(mode(&dir), 0o700);
        for key in [CA_KEY_FILE, SERVER_KEY_FILE, SIGNING_KEY_FILE] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        for public in [CA_CERT_FILE, SERVER_CERT_FILE, SERVER_MANAGED_FILE] {
            assert!(dir.join(public).exists(), "{public}");
        }
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        assert_eq!(
            fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(),
            pki.ca_pem()
        );
        assert!(pki.server_key_pem().contains("BEGIN PRIVATE KEY"));
        let signing = fs::read_to_string(dir.join(SIGNING_KEY_FILE)).unwrap();
        assert!(signing.starts_with("-----BEGIN PRIVATE KEY-----"));

        // The CA is a CA; the server certificate chains to it and names both SANs.
        let ca_der = der(pki.ca_pem());
        assert!(parse_der(&ca_der, "ca").unwrap().is_ca());
        assert!(chains_to(pki.server_cert_pem(), pki.ca_pem()));
        assert_eq!(ekus(pki.server_cert_pem()), (true, false));
        assert_eq!(
            sans(pki.server_cert_pem()),
            BTreeSet::from([
                San::Dns("localhost".into()),
                San::Ip("127.0.0.1".parse().unwrap())
            ])
        );

        // The JWK is the signing key's, named by its thumbprint.
        let jwk = pki.jwk();
        assert_eq!(
            jwk.verifying_key().unwrap(),
            pki.signing_key().verifying_key()
        );
        assert_eq!(
            pki.kid(),
            kid_for(&pki.signing_key().verifying_key().to_bytes())
        );
        assert_eq!(jwk.kid, pki.kid());
        // Debug never shows key material.
        assert!(!format!("{pki:?}").contains("PRIVATE"));
    }

    #[test]
    fn second_start_loads_the_same_material() {
        let tmp = tempfile::tempdir().unwrap();
        let server_names = names(&["localhost", "127.0.0.1"]);
        let first = Pki::load_or_create(tmp.path(), &server_names).unwrap();
        let second = Pki::load_or_create(tmp.path(), &server_names).unwrap();
        assert_eq!(first.kid(), second.kid());
        assert_eq!(
            first.signing_key().to_bytes(),
            second.signing_key().to_bytes()
        );
        assert_eq!(first.ca_pem(), second.ca_pem());
        assert_eq!(first.server_cert_pem(), second.server_cert_pem());
        assert_eq!(first.server_key_pem(), second.server_key_pem());
        // A certificate issued after the restart chains to the same CA.
        let cert = second.issue_terminal("pos_01", "t706f735f3031").unwrap();
        assert!(chains_to(&cert.cert_pem, first.ca_pem()));
    }

    #[test]
    fn changed_names_reissue_a_managed_server_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        let second = Pki::load_or_create(tmp.path(), &names(&["gw.example", "10.0.0.7"])).unwrap();
        assert_ne!(first.server_cert_pem(), second.server_cert_pem());
        assert_eq!(first.server_key_pem(), second.server_key_pem(), "key kept");
        assert_eq!(first.ca_pem(), second.ca_pem());
        assert_eq!(
            sans(second.server_cert_pem()),
            BTreeSet::from([
                San::Dns("gw.example".into()),
                San::Ip("10.0.0.7".parse().unwrap())
            ])
        );
        // Same names (another order, another case): no reissue.
        let third = Pki::load_or_create(tmp.path(), &names(&["10.0.0.7", "GW.example"])).unwrap();
        assert_eq!(second.server_cert_pem(), third.server_cert_pem());
    }

    #[test]
    fn terminal_certificate_chains_and_names_the_terminal() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        let tenant = posgate_proto::topics::tenant_for("store-12-lane-3");
        let issued = pki.issue_terminal("store-12-lane-3", &tenant).unwrap();
        assert!(chains_to(&issued.cert_pem, pki.ca_pem()));
        assert_eq!(ekus(&issued.cert_pem), (false, true));

        let id = identity_of_pem(&issued.cert_pem).unwrap();
        assert_eq!(id.cn, "store-12-lane-3");
        assert_eq!(id.o, tenant);
        assert_eq!(id.serial_hex, issued.serial_hex);
        assert_eq!(id.serial_hex.len(), 32);
        assert_eq!(id.not_after, issued.not_after);
        let years = (issued.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((1820..=1827).contains(&years), "{years} days");
        assert_eq!(identity_of(&der(&issued.cert_pem)).unwrap(), id);

        // The private key belongs to the certificate and is a P-256 PKCS#8 key.
        let key = KeyPair::from_pem(&issued.key_pem).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let cert_der = der(&issued.cert_pem);
        let cert = parse_der(&cert_der, "cert").unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(!format!("{issued:?}").contains("PRIVATE"));

        let again = pki.issue_terminal("store-12-lane-3", &tenant).unwrap();
        assert_ne!(again.serial_hex, issued.serial_hex);
        assert_ne!(again.key_pem, issued.key_pem);
    }

    #[test]
    fn bad_identities_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        for (id, tenant) in [("", "t1"), ("pos 1", "t1"), ("pos_1", "t_1"), ("pos_1", "")] {
            assert!(
                matches!(
                    pki.issue_terminal(id, tenant),
                    Err(PkiError::BadIdentity { .. })
                ),
                "{id:?} {tenant:?}"
            );
        }
        assert!(matches!(
            identity_of(b"not a certificate"),
            Err(PkiError::BadCert { .. })
        ));
        assert!(matches!(
            identity_of_pem("nothing here"),
            Err(PkiError::BadPem { .. })
        ));
        // The server certificate has a CN but no O.
        assert!(matches!(
            identity_of_pem(pki.server_cert_pem()),
            Err(PkiError::MissingField { field: "O" })
        ));
    }

    /// An operator's CA, made the way `openssl` would: its own DN, its own key.
    fn operator_ca(dir: &Path) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Example Retail Root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let pki = dir.join("pki");
        fs::create_dir_all(&pki).unwrap();
        fs::set_permissions(&pki, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(pki.join(CA_CERT_FILE), cert.pem()).unwrap();
        fs::write(pki.join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        fs::set_permissions(pki.join(CA_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn operator_ca_is_used_as_is() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca_pem, ca_key) = operator_ca(tmp.path());
        let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        assert_eq!(pki.ca_pem(), ca_pem);
        let dir = tmp.path().join("pki");
        assert_eq!(fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(), ca_pem);
        assert_eq!(fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap(), ca_key);
        assert!(chains_to(pki.server_cert_pem(), &ca_pem));
        let issued = pki.issue_terminal("pos_01", "t706f735f3031").unwrap();
        assert!(chains_to(&issued.cert_pem, &ca_pem));
    }

    #[test]
    fn operator_server_certificate_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca_pem, ca_key) = operator_ca(tmp.path());
        // The operator's server certificate, signed by their CA, names of their choosing.
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names(&["mqtt.example"])).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = tmp.path().join("pki");
        fs::write(dir.join(SERVER_CERT_FILE), cert.pem()).unwrap();
        fs::write(dir.join(SERVER_KEY_FILE), key.serialize_pem()).unwrap();

        let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        assert_eq!(
            pki.server_cert_pem(),
            cert.pem(),
            "not reissued for other names"
        );
        assert!(!dir.join(SERVER_MANAGED_FILE).exists());

        // Without the CA that issued it, it is refused rather than served to terminals that
        // could never verify it.
        let other = tempfile::tempdir().unwrap();
        let other_dir = other.path().join("pki");
        fs::create_dir_all(&other_dir).unwrap();
        fs::write(other_dir.join(SERVER_CERT_FILE), cert.pem()).unwrap();
        fs::write(other_dir.join(SERVER_KEY_FILE), key.serialize_pem()).unwrap();
        assert!(matches!(
            Pki::load_or_create(other.path(), &names(&["localhost"])),
            Err(PkiError::ServerWithoutCa { .. })
        ));
    }

    #[test]
    fn half_pairs_and_mismatches_are_refused() {
        // A CA certificate without its key.
        let tmp = tempfile::tempdir().unwrap();
        let (_, _) = operator_ca(tmp.path());
        fs::remove_file(tmp.path().join("pki").join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            Pki::load_or_create(tmp.path(), &names(&["localhost"])),
            Err(PkiError::Incomplete { .. })
        ));

        // A CA certificate with somebody else's key.
        let tmp = tempfile::tempdir().unwrap();
        operator_ca(tmp.path());
        let stranger = KeyPair::generate().unwrap().serialize_pem();
        fs::write(tmp.path().join("pki").join(CA_KEY_FILE), stranger).unwrap();
        assert!(matches!(
            Pki::load_or_create(tmp.path(), &names(&["localhost"])),
            Err(PkiError::KeyMismatch { .. })
        ));

        // A key that is not PKCS#8 PEM.
        let tmp = tempfile::tempdir().unwrap();
        operator_ca(tmp.path());
        fs::write(tmp.path().join("pki").join(CA_KEY_FILE), "garbage").unwrap();
        assert!(matches!(
            Pki::load_or_create(tmp.path(), &names(&["localhost"])),
            Err(PkiError::BadKey { .. })
        ));

        // A leaf certificate where the CA should be.
        let tmp = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        let dir = tmp.path().join("pki");
        fs::write(dir.join(CA_CERT_FILE), first.server_cert_pem()).unwrap();
        fs::write(dir.join(CA_KEY_FILE), first.server_key_pem()).unwrap();
        assert!(matches!(
            Pki::load_or_create(tmp.path(), &names(&["localhost"])),
            Err(PkiError::NotCa { .. })
        ));

        assert!(matches!(
            Pki::load_or_create(tmp.path(), &[]),
            Err(PkiError::NoServerNames)
        ));
    }

    #[test]
    fn a_crash_between_files_is_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        let dir = tmp.path().join("pki");
        // Crash after the CA key, before its certificate; and after the server key, before its
        // certificate; with a stale temp file left behind.
        fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
        fs::remove_file(dir.join(SERVER_CERT_FILE)).unwrap();
        fs::write(dir.join("ca.pem.tmp"), "half").unwrap();
        let second = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        assert!(chains_to(second.server_cert_pem(), second.ca_pem()));
        assert_eq!(first.server_key_pem(), second.server_key_pem());
        assert_eq!(first.kid(), second.kid());
        // The old server certificate still chains: same CA key, same name.
        assert!(chains_to(first.server_cert_pem(), second.ca_pem()));

        // A managed server certificate whose key vanished gets a new key and certificate.
        fs::remove_file(dir.join(SERVER_KEY_FILE)).unwrap();
        let third = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        assert_ne!(third.server_key_pem(), second.server_key_pem());
        assert!(chains_to(third.server_cert_pem(), third.ca_pem()));
        let cert_der = der(third.server_cert_pem());
        let cert = parse_der(&cert_der, "cert").unwrap();
        let key = KeyPair::from_pem(third.server_key_pem()).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn signing_key_survives_as_pkcs8() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(tmp.path(), &names(&["localhost"])).unwrap();
        let pem = fs::read_to_string(tmp.path().join("pki").join(SIGNING_KEY_FILE)).unwrap();
        let key = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(key.to_bytes(), pki.signing_key().to_bytes());
        // A signature made with it verifies with the published JWK.
        let c = posgate_proto::Confirmation::new(
            "pos_01",
            "pi_1",
            1,
            posgate_proto::ConfirmationStatus::Confirmed,
            posgate_proto::MicroUsdc(4_400_000),
            "2026-04-01T20:00:12Z",
        );
        let jws = posgate_proto::confirmation::sign(pki.signing_key(), pki.kid(), &c);
        let vk = pki.jwk().verifying_key().unwrap();
        assert_eq!(
            posgate_proto::confirmation::verify(&jws, &vk, "pos_01", 1),
            Ok(c)
        );
    }
}
