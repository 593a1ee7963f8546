//! Building a gateway: everything that can fail before anything is served (the data directory,
//! the store, the PKI, the admin token, the broker, every listener bound), and [`BuildError`],
//! which tells the CLI whether a later start may succeed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Gateway, Mqtt};
use crate::admin::{self, Renewals, TokenError};
use crate::broker::external::{External, ExternalError};
use crate::broker::{self, Broker, BrokerError};
use crate::channels::TokenIndex;
use crate::config::{Config, MqttMode};
use crate::ingress::tls::{self, TlsError};
use crate::metrics::{Metrics, MetricsError};
use crate::pki::{Pki, PkiError};
use crate::store::{Limits, Store, StoreError};

/// Why the gateway could not be built. The CLI exits 75 (`EX_TEMPFAIL`) for what may pass on its
/// own ([`BuildError::is_transient`]: a port still in use, a store that cannot be opened yet), so
/// systemd tries again, and 64 for the rest, which a restart cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("creating data_dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the store")]
    Store(#[from] StoreError),
    #[error("loading the admin token")]
    Token(#[from] TokenError),
    #[error("loading the gateway's certificates and keys")]
    Pki(#[from] PkiError),
    #[error("starting the MQTT broker")]
    Broker(#[from] BrokerError),
    #[error("setting up the external MQTT broker's client")]
    External(#[from] ExternalError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("setting up TLS on the ingress listener")]
    IngressTls(#[from] TlsError),
    #[error("binding the {name} listener on {addr}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl BuildError {
    /// Whether a later start may succeed without anyone changing anything: a port still in use
    /// (another process, or one that is still stopping) or an address not configured yet, a
    /// database still held by a process that is stopping, a full or failing disk.
    pub fn is_transient(&self) -> bool {
        match self {
            BuildError::Bind { source, .. }
            | BuildError::Broker(BrokerError::Bind { source, .. }) => matches!(
                source.kind(),
                std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
            ),
            BuildError::Broker(BrokerError::Start(_)) => true,
            BuildError::Broker(BrokerError::Tls(_)) => false,
            BuildError::Store(e) => e.is_transient(),
            BuildError::DataDir { source, .. } => crate::store::io_is_transient(source),
            BuildError::Token(_)
            | BuildError::Pki(_)
            | BuildError::Metrics(_)
            | BuildError::External(_)
            | BuildError::IngressTls(_) => false,
        }
    }
}

// === impl Gateway (build) ===

impl Gateway {
    /// Creates `data_dir`, opens the store, loads the admin token and binds every listener.
    ///
    /// # Errors
    /// [`BuildError`] naming what failed; nothing is left running.
    pub async fn build(config: Config) -> Result<Gateway, BuildError> {
        descriptor_limit(&config);
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| BuildError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let store = {
            let dir = data_dir.clone();
            let limits = Limits {
                queue_depth: config.store.queue_depth,
                max_batch: config.store.max_batch,
                commit_deadline: Duration::from_millis(config.store.commit_deadline_ms),
                quick_repair: config.store.quick_repair,
            };
            let backend = config.store.backend.clone();
            tokio::task::spawn_blocking(move || Store::open_backend(&backend, &dir, limits))
                .await
                .map_err(|e| BuildError::DataDir {
                    path: data_dir.clone(),
                    source: std::io::Error::other(e),
                })??
        };
        let pki = {
            let (dir, names) = (data_dir.clone(), config.mqtt.server_names.clone());
            tokio::task::spawn_blocking(move || Pki::load_or_create(&dir, &names))
                .await
                .map_err(|e| BuildError::DataDir {
                    path: data_dir.clone(),
                    source: std::io::Error::other(e),
                })??
        };
        let admin_token = admin::load_or_create_token(config.admin.token.as_ref(), &data_dir)?;

        let metrics = Metrics::new()?;
        // Renewals past their deadline complete first, so that their replaced certificates are
        // among the revocations the broker refuses from its first connection on.
        let renewals = Renewals::load(&store).await?;
        let (revoked_serials, revoked_terminals) = store.revocations().await?;
        let (events_tx, broker_events) = mpsc::unbounded_channel();
        let delivery_events = events_tx.clone();
        let http_tokens = TokenIndex::of(store.terminals().await?.iter().map(|(t, _)| t));
        let settings = broker::Settings {
            listen: config.mqtt.listen,
            ws_listen: config.mqtt.ws_listen,
            plain_listen: config.mqtt.plain_listen,
            handshake_timeout: Duration::from_secs(config.mqtt.handshake_timeout_secs),
            max_handshaking: config.mqtt.max_handshaking,
            max_connections: config.mqtt.max_connections,
            max_connections_per_terminal: config.mqtt.max_connections_per_terminal,
            front_door: config.mqtt.front_door,
            refused: metrics.mqtt_refused.clone(),
        };
        let seen = renewals.clone();
        let broker = match (config.mqtt.mode, &config.mqtt.external) {
            (MqttMode::External, Some(external)) => Mqtt::External(
                External::build(
                    external,
                    &pki,
                    events_tx,
                    metrics.external_broker_connected.clone(),
                )
                .await?,
            ),
            _ => Mqtt::Embedded(
                Broker::build(
                    &settings,
                    &pki,
                    revoked_serials,
                    revoked_terminals,
                    events_tx,
                    Arc::new(move |terminal_id: &str, serial: &str| seen.seen(terminal_id, serial)),
                )
                .await?,
            ),
        };

        let ingress_tls = if config.ingress.tls {
            Some(tls::server_config(&pki)?)
        } else {
            None
        };
        let ingress = bind("ingress", config.ingress.listen).await?;
        let admin = bind("admin", config.admin.listen).await?;
        store.observe_commits(metrics.store_commit.clone());
        Ok(Gateway {
            config,
            store,
            pki: Arc::new(pki),
            admin_token,
            broker,
            broker_events,
            delivery_events,
            http_tokens,
            renewals,
            ingress_tls,
            ingress,
            admin,
            metrics,
        })
    }
}

/// Descriptors one terminal holds: its socket, and with the front door the loopback pair to the
/// broker behind it.
fn descriptors_per_terminal(front_door: bool) -> u64 {
    if front_door { 3 } else { 1 }
}

/// Raises the soft limit of open descriptors to the hard one (a login shell's soft limit, often
/// 1,024, holds about 300 terminals through the front door; the systemd unit sets both), and
/// warns when the limit cannot hold `mqtt.max_connections` terminals.
fn descriptor_limit(config: &Config) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // The soft limit is at most the hard one (`None` is unlimited).
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE) to its hard limit");
        }
    }
    // `None`: unlimited.
    let Some(limit) = getrlimit(Resource::Nofile).current else {
        return;
    };
    if config.mqtt.mode != MqttMode::Embedded {
        return;
    }
    let terminals = limit / descriptors_per_terminal(config.mqtt.front_door);
    if terminals < config.mqtt.max_connections as u64 {
        tracing::warn!(
            limit,
            terminals,
            max_connections = config.mqtt.max_connections,
            front_door = config.mqtt.front_door,
            "the open-file limit (RLIMIT_NOFILE) holds fewer terminals than mqtt.max_connections \
             (each holds 3 descriptors through the front door, 1 without): raise LimitNOFILE in \
             the unit or lower mqtt.max_connections"
        );
    }
}

async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, BuildError> {
    crate::serve::listen(addr, 1024, false).map_err(|source| BuildError::Bind {
        name,
        addr,
        source,
    })
}
