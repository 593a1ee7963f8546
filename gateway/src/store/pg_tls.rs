//! TLS for every PostgreSQL connection of the daemon (the store's writer and readers, the
//! replicas' lease and `LISTEN`/`NOTIFY` connections): rustls through `tokio-postgres-rustls`.
//!
//! Whether TLS is used is the URL's `sslmode`, as tokio-postgres reads it (libpq's meaning):
//! `disable` never, `prefer` (the default) when the server accepts it, `require` always (a
//! server that declines is an error). What is checked is `store.postgres_ca_file`:
//! - set: the server's certificate must chain to a certificate of that PEM file and name the
//!   URL's host (libpq's `verify-full`). The configuration refuses it without `sslmode=require`:
//!   with `prefer`, a server (or whoever sits on the path) that declines TLS gets the connection
//!   in clear, so a verification the attacker can skip would only look safe.
//! - unset: libpq's `require`/`prefer`: encrypted, but any certificate is taken (a passive
//!   eavesdropper learns nothing; an active one in the path can pose as the server). The daemon
//!   says so with a warning at start.
//!
//! tokio-postgres does not read the URL's `sslrootcert`, `sslcert` or `sslkey` (an unknown
//! option is a parse error), hence the configuration key. Client certificates are not offered.
//!
//! The crypto provider is aws-lc-rs, the one of the gateway's other TLS ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why `store.postgres_ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PEM file of certificates: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate (-----BEGIN CERTIFICATE-----)")]
    Empty { path: PathBuf },
    #[error("a certificate in {path} cannot be a trust anchor: {source}")]
    Anchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The CA bundle the server's certificate is verified against.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CaFile {
    path: PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

/// How the daemon's PostgreSQL connections do TLS: the connector, made once, and what it
/// verifies. Equal when built from the same CA file content.
#[derive(Clone)]
pub struct PgTls {
    ca: Option<CaFile>,
    connect: MakeRustlsConnect,
}

impl PartialEq for PgTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca
    }
}

impl Eq for PgTls {}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("ca_file", &self.ca_file())
            .finish()
    }
}

impl Default for PgTls {
    fn default() -> Self {
        PgTls::unverified()
    }
}

impl PgTls {
    /// Without a CA file: TLS as the URL's `sslmode` asks, the server's certificate not checked
    /// (libpq's `require`).
    pub fn unverified() -> PgTls {
        let provider = provider();
        let config = builder(provider.clone())
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        PgTls {
            ca: None,
            connect: MakeRustlsConnect::new(finish(config)),
        }
    }

    /// Verifying the server against the certificates of the PEM file at `path`, and its name
    /// against the URL's host.
    ///
    /// # Errors
    /// [`PgTlsError`] when the file cannot be read, is not PEM, holds no certificate or one
    /// that cannot be a trust anchor.
    pub fn from_ca_file(path: &Path) -> Result<PgTls, PgTlsError> {
        let pem = std::fs::read(path).map_err(|source| PgTlsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|source| PgTlsError::Pem {
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(PgTlsError::Empty {
                path: path.to_owned(),
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|source| PgTlsError::Anchor {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let config = builder(provider())
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(PgTls {
            ca: Some(CaFile {
                path: path.to_owned(),
                certs,
            }),
            connect: MakeRustlsConnect::new(finish(config)),
        })
    }

    /// The CA file the server is verified against, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|ca| ca.path.as_path())
    }

    /// The connector for `postgres::Config::connect` and `tokio_postgres::connect`.
    pub(crate) fn connector(&self) -> MakeRustlsConnect {
        self.connect.clone()
    }

    /// What to warn about at start for `url`: TLS that may be used (`prefer`, `require`) over
    /// TCP without a CA file, so the server is not authenticated. `None` with a CA file, with
    /// `sslmode=disable` (chosen in so many words) and on Unix sockets only (no TLS there).
    pub fn warning(&self, url: &str) -> Option<&'static str> {
        let config = url.parse::<postgres::Config>().ok()?;
        let tcp = config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)))
            || !config.get_hostaddrs().is_empty();
        if self.ca.is_some() || !tcp {
            return None;
        }
        match config.get_ssl_mode() {
            SslMode::Require => Some(
                "PostgreSQL connections are encrypted but the server's certificate is not checked \
                 (libpq's sslmode=require): whoever can sit between here and the database can pose \
                 as it; set store.postgres_ca_file to the CA of the server's certificate",
            ),
            SslMode::Disable => None,
            _ => Some(
                "PostgreSQL connections use TLS only if the server offers it and do not check its \
                 certificate (sslmode=prefer, the default): across a network, set sslmode=require \
                 in store.postgres_url and store.postgres_ca_file to the CA of the server's certificate",
            ),
        }
    }

    /// What a connection to `url` does, for logs and errors: "TLS required, server verified
    /// against FILE", "TLS required, server not verified", ….
    pub fn describe(&self, url: &str) -> String {
        let mode = ssl_mode(url).unwrap_or(SslMode::Prefer);
        let checked = match self.ca_file() {
            Some(path) => format!("server verified against {}", path.display()),
            None => "server certificate not verified".to_owned(),
        };
        match mode {
            SslMode::Disable => "sslmode=disable: no TLS".to_owned(),
            SslMode::Require => format!("sslmode=require: TLS, {checked}"),
            _ => format!("sslmode=prefer: TLS if the server offers it, {checked}"),
        }
    }
}

/// What PostgreSQL 17's direct TLS negotiation (`sslnegotiation=direct`) requires of the
/// client; older servers ignore it.
fn finish(mut config: rustls::ClientConfig) -> rustls::ClientConfig {
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    config
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client configuration builder with rustls's safe default protocol versions.
#[allow(clippy::expect_used)]
fn builder(
    provider: Arc<CryptoProvider>,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // Fails only for a provider without cipher suites for them; aws-lc-rs's default has all.
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
}

/// The URL's `sslmode` as tokio-postgres reads it (`prefer` when absent); `None` when the URL
/// does not parse.
pub(crate) fn ssl_mode(url: &str) -> Option<SslMode> {
    url.parse::<postgres::Config>()
        .ok()
        .map(|c| c.get_ssl_mode())
}

/// Whether a failed connection attempt needs a person rather than time: the server refused
/// this client (`pg_hba.conf`, a password: SQLSTATE class 28), declined the TLS that
/// `sslmode=require` asks for, or a TLS handshake failed (a certificate that does not verify
/// or does not name the host). A server that is down or unreachable is not such a failure.
pub(crate) fn is_refusal(e: &postgres::Error) -> bool {
    if e.code().is_some_and(|c| c.code().starts_with("28")) {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<rustls::Error>()
            || s
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
            // tokio-postgres's own words when the server answers the SSLRequest with `N`.
            || s.to_string() == "server does not support TLS"
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Takes any certificate, but still checks that the server holds its key (the handshake
/// signature): libpq's `sslmode=require` without a root certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes a self-signed CA certificate to `path`, as an operator's `store.postgres_ca_file`.
#[cfg(test)]
pub(crate) fn write_test_ca(path: &std::path::Path) {
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA certificate parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).expect("a self-signed CA").pem();
    std::fs::write(path, pem).expect("writing the CA file");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{PgTls, write_test_ca};

    /// The start warns when TLS may be used over TCP without checking the server: `require`
    /// and `prefer` (also when absent) without a CA file; not with one, not with `disable`, not
    /// on a Unix socket.
    #[test]
    fn the_warning_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        write_test_ca(&ca);
        let verified = PgTls::from_ca_file(&ca).unwrap();
        let unverified = PgTls::unverified();
        let url = "postgres://u:pw@db.example/p";
        assert!(
            unverified
                .warning(&format!("{url}?sslmode=require"))
                .unwrap()
                .contains("is not checked")
        );
        assert!(
            unverified
                .warning(url)
                .unwrap()
                .contains("only if the server offers it")
        );
        assert_eq!(unverified.warning(&format!("{url}?sslmode=disable")), None);
        assert_eq!(
            unverified.warning("host=/run/postgresql user=posgate dbname=posgate"),
            None
        );
        assert_eq!(verified.warning(&format!("{url}?sslmode=require")), None);
        assert!(
            verified
                .describe(&format!("{url}?sslmode=require"))
                .contains("server verified against")
        );
        assert_ne!(verified, unverified);
        assert_eq!(verified, PgTls::from_ca_file(&ca).unwrap());
    }
}
