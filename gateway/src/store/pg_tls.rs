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
//! With `store.postgres_cert_file` and `store.postgres_key_file` (both or neither) every
//! connection offers that client certificate when the server asks for one (`pg_hba.conf`'s
//! `cert` method or `clientcert=verify-ca|verify-full`; managed PostgreSQL offerings with mutual
//! TLS). The key must be the certificate's (checked at load). Like the CA file it needs
//! `sslmode=require`: with `prefer` a server that declines TLS gets a connection in clear on
//! which the certificate is never presented, so the authentication the operator configured
//! would silently not happen.
//!
//! tokio-postgres does not read the URL's `sslrootcert`, `sslcert` or `sslkey` (an unknown
//! option is a parse error), hence the configuration keys.
//!
//! The crypto provider is aws-lc-rs, the one of the gateway's other TLS ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why `store.postgres_ca_file`, `store.postgres_cert_file` or `store.postgres_key_file`
/// cannot be used ([`PgTlsError::key`] says which). No message shows key material.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PEM file of certificates: {source}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate (-----BEGIN CERTIFICATE-----)")]
    Empty { key: &'static str, path: PathBuf },
    #[error("a certificate in {path} cannot be a trust anchor: {source}")]
    Anchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the first certificate in {path} cannot be parsed: {source}")]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    // The PEM parser's own message is left out: it may quote a line of the key file.
    #[error("{path} is not a valid PEM file")]
    KeyPem { path: PathBuf },
    #[error(
        "{path} holds no private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE \
         KEY; an encrypted key must be decrypted first)"
    )]
    NoKey { path: PathBuf },
    #[error("the private key in {path} cannot be used: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {key} is not the key of the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl PgTlsError {
    /// The configuration key of the file at fault.
    pub fn key(&self) -> &'static str {
        match self {
            PgTlsError::Read { key, .. }
            | PgTlsError::Pem { key, .. }
            | PgTlsError::Empty { key, .. } => key,
            PgTlsError::Anchor { .. } => CA_KEY,
            PgTlsError::Cert { .. } => CERT_KEY,
            PgTlsError::KeyPem { .. }
            | PgTlsError::NoKey { .. }
            | PgTlsError::BadKey { .. }
            | PgTlsError::Mismatch { .. } => KEY_KEY,
        }
    }
}

const CA_KEY: &str = "store.postgres_ca_file";
const CERT_KEY: &str = "store.postgres_cert_file";
const KEY_KEY: &str = "store.postgres_key_file";

/// The CA bundle the server's certificate is verified against.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CaFile {
    path: PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

/// The client certificate offered to the server. Its key is in the connector only (never in
/// `Debug`); the chain stands for it in comparisons: the key was checked to be the
/// certificate's at load.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClientCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    chain: Vec<CertificateDer<'static>>,
}

/// How the daemon's PostgreSQL connections do TLS: the connector, made once, what it verifies
/// and which client certificate it offers. Equal when built from the same files' content.
#[derive(Clone)]
pub struct PgTls {
    ca: Option<CaFile>,
    client: Option<ClientCert>,
    connect: MakeRustlsConnect,
}

impl PartialEq for PgTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca && self.client == other.client
    }
}

impl Eq for PgTls {}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("ca_file", &self.ca_file())
            .field("cert_file", &self.client.as_ref().map(|c| &c.cert_path))
            .field("key_file", &self.client.as_ref().map(|c| &c.key_path))
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
    /// (libpq's `require`), no client certificate.
    pub fn unverified() -> PgTls {
        PgTls {
            ca: None,
            client: None,
            connect: MakeRustlsConnect::new(finish(verifying(None).with_no_client_auth())),
        }
    }

    /// Verifying the server against the certificates of the PEM file at `path`, and its name
    /// against the URL's host; no client certificate.
    ///
    /// # Errors
    /// [`PgTlsError`] when the file cannot be read, is not PEM, holds no certificate or one
    /// that cannot be a trust anchor.
    pub fn from_ca_file(path: &Path) -> Result<PgTls, PgTlsError> {
        PgTls::from_files(Some(path), None).map_err(|mut errors| errors.remove(0))
    }

    /// The server verified against the PEM file `ca_file` if given (else not verified), and
    /// the client certificate (chain) of the PEM file `client.0` offered with the private key
    /// of the PEM file `client.1` (PKCS#8, PKCS#1 or SEC1) if given.
    ///
    /// # Errors
    /// Every problem found ([`PgTlsError::key`] names the key of its file): a file that cannot
    /// be read, is not PEM, holds no certificate (or no key); a CA certificate that cannot be a
    /// trust anchor; a key that is not usable or not the certificate's.
    pub fn from_files(
        ca_file: Option<&Path>,
        client: Option<(&Path, &Path)>,
    ) -> Result<PgTls, Vec<PgTlsError>> {
        let mut errors = Vec::new();
        let ca = ca_file.map(read_ca).transpose().unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let client = client
            .map(|(cert, key)| read_client(cert, key, &provider()))
            .transpose()
            .unwrap_or_else(|e| {
                errors.extend(e);
                None
            });
        if !errors.is_empty() {
            return Err(errors);
        }
        PgTls::build(ca, client).map_err(|e| vec![e])
    }

    fn build(
        ca: Option<(CaFile, rustls::RootCertStore)>,
        client: Option<(ClientCert, PrivateKeyDer<'static>)>,
    ) -> Result<PgTls, PgTlsError> {
        let (ca, roots) = ca.unzip();
        let verifying = verifying(roots);
        let (client, config) = match client {
            Some((client, key)) => {
                // The same checks as `read_client`'s: they passed there.
                let config = verifying
                    .with_client_auth_cert(client.chain.clone(), key)
                    .map_err(|source| PgTlsError::BadKey {
                        path: client.key_path.clone(),
                        source,
                    })?;
                (Some(client), config)
            }
            None => (None, verifying.with_no_client_auth()),
        };
        Ok(PgTls {
            ca,
            client,
            connect: MakeRustlsConnect::new(finish(config)),
        })
    }

    /// The CA file the server is verified against, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|ca| ca.path.as_path())
    }

    /// The client certificate file offered to the server, if any.
    pub fn cert_file(&self) -> Option<&Path> {
        self.client.as_ref().map(|c| c.cert_path.as_path())
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

    /// What a connection to `url` does, for logs and errors: "sslmode=require: TLS, server
    /// verified against FILE, client certificate FILE", "sslmode=require: TLS, server
    /// certificate not verified", ….
    pub fn describe(&self, url: &str) -> String {
        let mode = ssl_mode(url).unwrap_or(SslMode::Prefer);
        let mut checked = match self.ca_file() {
            Some(path) => format!("server verified against {}", path.display()),
            None => "server certificate not verified".to_owned(),
        };
        if let Some(path) = self.cert_file() {
            checked.push_str(&format!(", client certificate {}", path.display()));
        }
        match mode {
            SslMode::Disable => "sslmode=disable: no TLS".to_owned(),
            SslMode::Require => format!("sslmode=require: TLS, {checked}"),
            _ => format!("sslmode=prefer: TLS if the server offers it, {checked}"),
        }
    }
}

/// The CA file at `path` as trust anchors.
fn read_ca(path: &Path) -> Result<(CaFile, rustls::RootCertStore), PgTlsError> {
    let certs = read_certs(CA_KEY, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|source| PgTlsError::Anchor {
                path: path.to_owned(),
                source,
            })?;
    }
    let ca = CaFile {
        path: path.to_owned(),
        certs,
    };
    Ok((ca, roots))
}

/// The certificates of the PEM file at `path`, at least one.
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    let pem = std::fs::read(path).map_err(|source| PgTlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|source| PgTlsError::Pem {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PgTlsError::Empty {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The client certificate chain at `cert_path` and its private key at `key_path`, checked to
/// belong together (the key's public half is the certificate's), as rustls will use them.
fn read_client(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(ClientCert, PrivateKeyDer<'static>), Vec<PgTlsError>> {
    let chain = read_certs(CERT_KEY, cert_path);
    let key = read_key(key_path, provider);
    let (chain, (key, signing)) = match (chain, key) {
        (Ok(chain), Ok(key)) => (chain, key),
        (chain, key) => return Err(chain.err().into_iter().chain(key.err()).collect()),
    };
    match rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match() {
        // A key type whose public half the provider cannot tell: the handshake will say.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(vec![PgTlsError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            }]);
        }
        Err(source) => {
            return Err(vec![PgTlsError::Cert {
                path: cert_path.to_owned(),
                source,
            }]);
        }
    }
    let client = ClientCert {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
        chain,
    };
    Ok((client, key))
}

/// The private key of the PEM file at `path`, and as the provider will sign with it.
fn read_key(
    path: &Path,
    provider: &CryptoProvider,
) -> Result<(PrivateKeyDer<'static>, Arc<dyn rustls::sign::SigningKey>), PgTlsError> {
    let pem = std::fs::read(path).map_err(|source| PgTlsError::Read {
        key: KEY_KEY,
        path: path.to_owned(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PgTlsError::NoKey {
            path: path.to_owned(),
        },
        _ => PgTlsError::KeyPem {
            path: path.to_owned(),
        },
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|source| PgTlsError::BadKey {
            path: path.to_owned(),
            source,
        })?;
    Ok((key, signing))
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

/// The server verified against `roots`, or without them not verified (libpq's `require`).
fn verifying(
    roots: Option<rustls::RootCertStore>,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let provider = provider();
    match roots {
        Some(roots) => builder(provider).with_root_certificates(roots),
        None => builder(provider.clone())
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
    }
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

/// Writes a client certificate for `user` (its CN) signed by a new CA, and its key, to
/// `dir`: `(ca.pem, client.pem, client.key)` as an operator's PostgreSQL server and
/// `store.postgres_cert_file`/`store.postgres_key_file` would have them.
#[cfg(test)]
pub(crate) fn write_test_client_cert(
    dir: &std::path::Path,
    user: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).expect("a self-signed CA").pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("parameters");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, user);
    let cert = params
        .signed_by(&key, &issuer)
        .expect("a client certificate");
    let paths = (
        dir.join("client-ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    );
    std::fs::write(&paths.0, ca_pem).expect("writing the CA");
    std::fs::write(&paths.1, cert.pem()).expect("writing the certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("writing the key");
    paths
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
