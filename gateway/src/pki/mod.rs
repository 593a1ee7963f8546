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
//!
//! The parts: `load.rs` (the files at start: load what is there, create what is missing),
//! `issue.rs` (what the CA signs), `files.rs` (crash-safe writes), `serial.rs` ([`Serial`]), and
//! `csr.rs` (a terminal's certificate request).

use std::fmt;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use posgate_proto::confirmation::Jwk;
use rcgen::{Issuer, KeyPair};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

pub mod csr;
mod files;
mod issue;
mod load;
mod serial;
#[cfg(test)]
mod tests;

pub use csr::{CsrError, CsrKey, KeyKind};
pub use issue::cert_uri;
pub use serial::Serial;

use files::warn_if_loose;
use issue::now_whole_seconds;
use load::{load_or_create_ca, load_or_create_server, load_or_create_signing_key};

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
