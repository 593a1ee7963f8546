//! TLS on the ingress listener itself (`ingress.tls`), for terminals that reach the HTTP channels
//! without a reverse proxy: rustls with the gateway's server certificate (`data_dir/pki/server.pem`,
//! the SANs of `mqtt.server_names`), HTTP/1.1. A client certificate is optional; one that is
//! presented must chain to the gateway CA (else the handshake fails), and [`crate::channels`] then
//! takes it as the terminal's identity (CN = terminal id), checked against the registry like the
//! broker does (serial, tenant, revocation).
//!
//! Handshakes run in their own tasks (at most [`MAX_HANDSHAKING`] at once, each within
//! [`HANDSHAKE_TIMEOUT`]), so a silent client never holds up the others; finished connections are
//! handed to `axum::serve` through [`TlsListener`], which therefore keeps its graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::pki::{self, CertIdentity, Pki};

/// Most TLS handshakes in progress at once; more connections wait to be accepted.
pub const MAX_HANDSHAKING: usize = 256;
/// A handshake not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the ingress TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the {what} PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the gateway CA certificate")]
    Ca(#[source] rustls::Error),
    #[error("the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the server certificate and key")]
    Server(#[source] rustls::Error),
}

/// Who is at the other end of a TLS connection.
#[derive(Clone, Debug)]
pub struct TlsPeer {
    pub addr: SocketAddr,
    /// The client certificate's identity, when one was presented (already verified against
    /// the gateway CA by the handshake).
    pub cert: Option<CertIdentity>,
}

/// The rustls server configuration: the gateway's server certificate, client certificates
/// optional but verified against the gateway CA when presented.
///
/// # Errors
/// [`TlsError`] when a PEM does not parse or the certificate does not match its key.
pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(client_roots(pki)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = server_config_with(pki, verifier)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The one crypto provider of the gateway's TLS servers: aws-lc-rs, which the broker library
/// brings anyway and which does a mutual-TLS handshake in less CPU than ring (decision 0004).
///
/// Its cipher suites with SHA-256 come first (and the servers choose in this order, not the
/// client's): TLS 1.3's handshake hashes its transcript and derives its keys with the suite's
/// hash, and SHA-256 has CPU instructions on current x86 and ARM where SHA-384 has none. Clients
/// commonly list `TLS13_AES_256_GCM_SHA384` first; with it, SHA-512 blocks were 5 % of the
/// gateway's CPU while terminals connected (decision 0004).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // A stable sort: otherwise aws-lc-rs's own order.
    provider.cipher_suites.sort_by_key(|suite| {
        suite
            .suite()
            .as_str()
            .is_none_or(|name| !name.ends_with("SHA256"))
    });
    Arc::new(provider)
}

/// The gateway CA, the root of every terminal certificate.
///
/// # Errors
/// [`TlsError`] when the CA PEM does not parse.
pub fn client_roots(pki: &Pki) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        let cert = cert.map_err(|source| TlsError::Pem { what: "CA", source })?;
        roots.add(cert).map_err(TlsError::Ca)?;
    }
    Ok(Arc::new(roots))
}

/// A server configuration with the gateway's server certificate and this client verifier.
///
/// # Errors
/// [`TlsError`] when a PEM does not parse or the certificate does not match its key.
pub fn server_config_with(
    pki: &Pki,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert_pem().as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Pem {
                what: "server certificate",
                source,
            })?;
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem().as_bytes()).map_err(|source| {
        TlsError::Pem {
            what: "server key",
            source,
        }
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Server)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Server)?;
    // The cheaper suites of `provider` first, whatever the client prefers.
    config.ignore_client_order = true;
    Ok(config)
}

/// Finished TLS connections, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, TlsPeer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` and runs each handshake in a task of `tracker`, until `token` is
    /// cancelled.
    pub fn spawn(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> TlsListener {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKING);
        let acceptor = TlsAcceptor::from(config);
        let limit = Arc::new(Semaphore::new(MAX_HANDSHAKING));
        let handshakes = tracker.clone();
        tracker.spawn(
            async move {
                loop {
                    let permit = tokio::select! {
                        () = token.cancelled() => break,
                        permit = limit.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                    };
                    let (tcp, addr) = tokio::select! {
                        () = token.cancelled() => break,
                        accepted = listener.accept() => match accepted {
                            Ok(accepted) => accepted,
                            Err(e) => {
                                // Out of file descriptors and the like: back off, don't spin.
                                tracing::warn!(error = %e, "ingress accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        },
                    };
                    let (acceptor, tx, token) = (acceptor.clone(), tx.clone(), token.clone());
                    handshakes.spawn(async move {
                        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                        let tls = tokio::select! {
                            () = token.cancelled() => return,
                            done = handshake => match done {
                                Ok(Ok(tls)) => tls,
                                Ok(Err(e)) => {
                                    tracing::debug!(%addr, error = %e, "ingress TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%addr, "ingress TLS handshake timed out");
                                    return;
                                }
                            },
                        };
                        drop(permit);
                        let cert = peer_identity(&tls);
                        drop(tx.send((tls, TlsPeer { addr, cert })).await);
                    });
                }
            }
            .instrument(tracing::info_span!("ingress_tls")),
        );
        TlsListener { ready, local }
    }
}

/// The identity of the client certificate, if one was presented.
fn peer_identity(tls: &TlsStream<TcpStream>) -> Option<CertIdentity> {
    let der = tls.get_ref().1.peer_certificates()?.first()?;
    match pki::identity_of(der) {
        Ok(identity) => Some(identity),
        Err(e) => {
            // Signed by our CA yet without CN or O: not a terminal certificate.
            tracing::warn!(error = %e, "client certificate names no terminal; ignored");
            None
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(next) => next,
            // The acceptor stopped (shutdown): nothing will come any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(TlsPeer {
            addr: self.local,
            cert: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for TlsPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use rustls::CipherSuite;
    use rustls::pki_types::ServerName;

    use super::*;

    /// A handshake in memory between a client with aws-lc-rs's defaults (which list
    /// `TLS13_AES_256_GCM_SHA384` first, as OpenSSL does) and the gateway's server configuration:
    /// the suite the server chose.
    fn negotiated_with_a_default_client() -> CipherSuite {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &["localhost".into()]).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(client_roots(&pki).unwrap())
        .with_no_client_auth();
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let mut server = rustls::ServerConnection::new(server_config(&pki).unwrap()).unwrap();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut wire = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            wire.clear();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        let suite = server.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(client.negotiated_cipher_suite().unwrap().suite(), suite);
        suite
    }

    #[test]
    fn the_server_chooses_a_sha256_suite_whatever_the_client_prefers() {
        assert_eq!(
            negotiated_with_a_default_client(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
