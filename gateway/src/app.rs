//! Startup and shutdown: [`Gateway::build`] opens the store and binds every listener (nothing runs
//! yet, so a bad port or an unusable `data_dir` fails before anything is served);
//! [`Gateway::spawn`] starts every task under one `TaskTracker` and returns [`Running`], which knows
//! the bound addresses and drains on [`Running::shutdown`].
//!
//! Shutdown order: stop the listeners (in-flight requests finish within the grace period; the
//! provider retries what is refused), then close the store, which commits what is queued.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin::{self, Admin, Fleet, Renewals, TokenError};
use crate::broker::external::{self, External, ExternalError};
use crate::broker::{self, Broker, BrokerError, Link};
use crate::channels::{self, Channels, Hub, Tickets, TokenIndex};
use crate::config::{Config, MqttMode};
use crate::delivery::{self, BrokerEvent, Presence, Signer};
use crate::ingress::tls::{self, TlsError, TlsListener};
use crate::ingress::{self, Ingress, Secrets};
use crate::metrics::{Metrics, MetricsError};
use crate::pki::{Pki, PkiError};
use crate::provider::{Budget, ProviderClient};
use crate::reconcile::{Listing, Reconciler, Stale};
use crate::rpc::{Rpc, RpcLimits};
use crate::serve;
use crate::shutdown::Supervisor;
use crate::store::{Limits, Retired, Revocation, Store, StoreError};
use posgate_proto::qr::Mode;
use secrecy::ExposeSecret;

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

/// A gateway whose store is open and whose listeners are bound, not yet serving.
pub struct Gateway {
    config: Config,
    store: Store,
    pki: Arc<Pki>,
    admin_token: SecretString,
    broker: Mqtt,
    broker_events: mpsc::UnboundedReceiver<BrokerEvent>,
    /// The delivery engine's event channel besides the broker: acks from the HTTP channels, revocations.
    delivery_events: mpsc::UnboundedSender<BrokerEvent>,
    /// Bearer tokens of the HTTP channels, by hash.
    http_tokens: TokenIndex,
    renewals: Renewals,
    /// Set when `ingress.tls`: the ingress listener serves TLS itself.
    ingress_tls: Option<Arc<rustls::ServerConfig>>,
    ingress: TcpListener,
    admin: TcpListener,
    metrics: Metrics,
}

/// The embedded broker, or the client of an external one (`mqtt.mode`).
// One value, built once and taken apart at spawn: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Mqtt {
    Embedded(Broker),
    External(External),
}

/// A serving gateway.
pub struct Running {
    /// Where provider webhooks are accepted.
    pub ingress_addr: SocketAddr,
    /// Where the admin API, `/healthz` and `/readyz` are served.
    pub admin_addr: SocketAddr,
    /// The MQTT/TLS listener (with an external broker: the broker's address).
    pub mqtt_addr: SocketAddr,
    /// The MQTT over secure WebSocket listener, when configured.
    pub mqtt_ws_addr: Option<SocketAddr>,
    /// The plaintext MQTT listener, when configured (benchmarks only).
    pub mqtt_plain_addr: Option<SocketAddr>,
    /// The broker's loopback listener behind the MQTT/TLS front door (`mqtt.front_door`).
    pub mqtt_behind_addr: Option<SocketAddr>,
    admin_token: SecretString,
    store: Store,
    secrets: Secrets,
    broker: Link,
    token: CancellationToken,
    /// Cancelled when the grace period is over: connections still open are dropped.
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    supervisor: Supervisor,
}

// === impl Gateway ===

impl Gateway {
    /// Creates `data_dir`, opens the store, loads the admin token and binds every listener.
    ///
    /// # Errors
    /// [`BuildError`] naming what failed; nothing is left running.
    pub async fn build(config: Config) -> Result<Gateway, BuildError> {
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

    /// Starts serving.
    pub fn spawn(self) -> Running {
        let Gateway {
            config,
            store,
            pki,
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
        } = self;
        let token = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let supervisor =
            Supervisor::new(tracker.clone(), token.clone(), metrics.task_panics.clone());
        let ready = Arc::new(AtomicBool::new(false));
        let ingress_addr = local_addr(&ingress, config.ingress.listen);
        let admin_addr = local_addr(&admin, config.admin.listen);

        if config.provider.webhook_secrets.is_empty() {
            tracing::warn!(
                "provider.webhook_secrets is empty: every webhook is answered 401 until one is set"
            );
        }
        let secrets: Secrets = Arc::new(RwLock::new(config.provider.webhook_secrets.clone()));
        // One request budget for every call to the provider: terminal RPC and reconciliation.
        let budget = Arc::new(Budget::new(
            config.provider.requests_per_minute,
            Duration::from_millis(config.provider.rpc_budget_wait_ms),
        ));
        let client = config.provider.api_key.as_ref().and_then(|key| {
            let mode = Mode::of_key(key.expose_secret())?;
            match ProviderClient::new(&config.provider.api_base, key.clone(), budget.clone()) {
                Ok(client) => Some((client.with_metrics(metrics.provider.clone()), mode)),
                Err(e) => {
                    tracing::error!(error = %e, "no provider client: reconciliation and terminal RPC are off");
                    None
                }
            }
        });
        let rpc = Arc::new(
            Rpc::with_limits(store.clone(), client.clone(), rpc_limits(&config.rpc))
                .with_metrics(metrics.rpc_requests.clone()),
        );
        let reconcile = match client {
            Some((client, _)) => {
                let (reconciler, handle) = Reconciler::new(
                    store.clone(),
                    client.background(),
                    metrics.clone(),
                    Stale {
                        every: Duration::from_secs(config.provider.reconcile_every_secs),
                        grace: Duration::from_secs(config.provider.reconcile_grace_secs),
                    },
                    Listing {
                        every: Duration::from_secs(config.provider.transactions_every_secs),
                        overlap: Duration::from_secs(config.provider.transactions_overlap_secs),
                    },
                );
                supervisor.spawn(
                    "reconcile",
                    reconciler
                        .run(token.clone())
                        .instrument(tracing::info_span!("reconcile")),
                );
                Some(handle)
            }
            None => {
                tracing::warn!(
                    "provider.api_key is not set: reconciliation and terminal RPC are off"
                );
                None
            }
        };
        supervisor.spawn(
            "events_prune",
            crate::store::prune_events(
                store.clone(),
                Duration::from_secs(config.store.retention_hours * 3600),
                token.clone(),
            )
            .instrument(tracing::info_span!("events_prune")),
        );
        supervisor.spawn(
            "rpc_prune",
            crate::rpc::prune_answers(
                store.clone(),
                Duration::from_secs(config.rpc.answers_retention_hours * 3600),
                token.clone(),
            )
            .instrument(tracing::info_span!("rpc_prune")),
        );
        let signer = Signer {
            key: pki.signing_key().clone(),
            kid: pki.kid().to_owned(),
        };
        // The HTTP channels see every publish the delivery engine makes, through one broadcast channel
        // that the hub fans out per terminal.
        let (published_tx, published_rx) = broadcast::channel(1024);
        let hub = Hub::default();
        let tickets = Tickets::default();
        supervisor.spawn(
            "http_channels",
            hub.clone()
                .run(published_rx, token.clone())
                .instrument(tracing::info_span!("http_channels")),
        );
        let channels = Arc::new(Channels {
            store: store.clone(),
            signer: signer.clone(),
            hub: hub.clone(),
            tokens: http_tokens.clone(),
            tickets: tickets.clone(),
            acks: delivery_events.clone(),
            shutdown: token.clone(),
            tracker: tracker.clone(),
            keepalive: Duration::from_secs(config.ingress.keepalive_secs),
            streams: metrics.http_streams.clone(),
            rpc: rpc.clone(),
            renewals: renewals.clone(),
        });
        let ingress_router = ingress::router(Arc::new(Ingress {
            store: store.clone(),
            metrics: metrics.clone(),
            reconcile,
            secrets: secrets.clone(),
            body_limit_bytes: config.ingress.body_limit_bytes,
            tolerance_secs: config.ingress.tolerance_secs,
        }))
        .merge(channels::router(
            channels,
            &config.ingress.cors_allowed_origins,
        ));
        let (addrs, handle) = match &broker {
            Mqtt::Embedded(b) => (b.addrs(), Link::Embedded(b.handle())),
            Mqtt::External(e) => (
                broker::Addrs {
                    mqtt: e.addr(),
                    ws: None,
                    plain: None,
                    behind: None,
                },
                Link::External(e.handle()),
            ),
        };
        let presence = Presence::default();

        // Delivery first, so that nothing committed from now on misses it.
        let engine = delivery::Engine::new(
            store.clone(),
            Arc::new(handle.clone()),
            signer,
            delivery::Settings {
                republish_after: Duration::from_secs(config.delivery.republish_after_secs),
            },
            presence.clone(),
            metrics.clone(),
        )
        .with_rpc(rpc)
        .with_published(published_tx.clone())
        .with_tracker(tracker.clone());
        // With PostgreSQL, replicas share the database and split delivery by shard leases.
        let (engine, replicas) = match &config.store.backend {
            crate::store::Backend::Postgres { url, tls } => {
                let (engine, ownership) = spawn_replicas(
                    engine,
                    url,
                    tls,
                    &config,
                    published_tx,
                    &metrics,
                    &supervisor,
                    &token,
                );
                (engine, Some(ownership))
            }
            crate::store::Backend::Redb => (engine, None),
        };
        supervisor.spawn(
            "delivery",
            engine
                .run(store.subscribe_outbox(), broker_events, token.clone())
                .instrument(tracing::info_span!("delivery")),
        );
        match broker {
            Mqtt::Embedded(b) => b.spawn(&tracker, token.clone()),
            Mqtt::External(e) => {
                let ext = config.mqtt.external.as_ref();
                match ext.and_then(|x| x.files_dir.clone()) {
                    Some(dir) => {
                        let files = external::Files {
                            dir,
                            kind: ext.map_or(crate::config::BrokerKind::Mosquitto, |x| x.kind),
                            reload_command: ext
                                .map(|x| x.reload_command.clone())
                                .unwrap_or_default(),
                            store: store.clone(),
                            pki: pki.clone(),
                            handle: e.handle(),
                        };
                        supervisor.spawn(
                            "external_broker_files",
                            files
                                .run(token.clone())
                                .instrument(tracing::info_span!("external_broker_files")),
                        );
                    }
                    None => tracing::warn!(
                        "mqtt.external_broker_dir is not set: provisioning and revocation do not reach the external broker's ACL and CRL; keep them up to date yourself"
                    ),
                }
                e.spawn(&tracker, token.clone());
            }
        }

        let host = config
            .mqtt
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into());
        let revoker = Revoker {
            broker: handle.clone(),
            hub,
            tickets,
            delivery: delivery_events,
        };
        let retiring = handle.clone();
        supervisor.spawn(
            "renewals",
            renewals
                .clone()
                .run(
                    store.clone(),
                    Arc::new(move |r: &Retired| retiring.retire(&r.terminal_id, &r.serial)),
                    token.clone(),
                )
                .instrument(tracing::info_span!("renewals")),
        );
        let counter = handle.clone();
        let told = handle.clone();
        let mqtt_url = match &config.mqtt.external {
            Some(external) if config.mqtt.mode == MqttMode::External => external.url.clone(),
            _ => format!("mqtts://{host}:{}", addrs.mqtt.port()),
        };
        let fleet = Fleet {
            pki,
            presence,
            mqtt_url,
            revoke: Arc::new(move |r: &Revocation| revoker.revoke(r)),
            registered: Arc::new(move |t| {
                http_tokens.insert(t);
                told.registered();
            }),
            renewals,
            connections: Arc::new(move || counter.connections() as i64),
        };
        let admin_router = admin::router(Arc::new(Admin {
            store: store.clone(),
            token: admin_token.clone(),
            ready: ready.clone(),
            fleet,
            metrics: metrics.clone(),
            replicas,
        }));
        let stop = serve::Stop {
            graceful: token.clone(),
            hard: hard_stop.clone(),
        };
        match ingress_tls {
            Some(config) => {
                let listener = TlsListener::spawn(ingress, config, &tracker, token.clone());
                supervisor.spawn(
                    "ingress",
                    serve::serve(
                        listener,
                        ingress_router,
                        tracker.clone(),
                        stop.clone(),
                        serve::INGRESS_MAX_CONNECTIONS,
                    )
                    .instrument(tracing::info_span!("listener", name = "ingress")),
                );
            }
            None => {
                supervisor.spawn(
                    "ingress",
                    serve::serve(
                        ingress,
                        ingress_router,
                        tracker.clone(),
                        stop.clone(),
                        serve::INGRESS_MAX_CONNECTIONS,
                    )
                    .instrument(tracing::info_span!("listener", name = "ingress")),
                );
            }
        }
        supervisor.spawn(
            "admin",
            serve::serve(
                admin,
                admin_router,
                tracker.clone(),
                stop,
                serve::ADMIN_MAX_CONNECTIONS,
            )
            .instrument(tracing::info_span!("listener", name = "admin")),
        );
        tracing::info!(%ingress_addr, tls = config.ingress.tls, "ingress listening (POST {})", ingress::PATH);
        tracing::info!(%admin_addr, "admin listening");
        if !admin_addr.ip().is_loopback() {
            tracing::warn!(%admin_addr, "admin.listen is not on loopback and the admin API has no TLS: its bearer token and every provisioning bundle (terminal keys) cross the network in clear text; keep it on 127.0.0.1 or put a TLS proxy in front");
        }
        match &config.store.backend {
            crate::store::Backend::Redb => {
                tracing::info!(backend = "redb", path = %store.path().display(), "store open");
            }
            crate::store::Backend::Postgres { url, tls } => {
                tracing::info!(backend = "postgres", url = %crate::store::redact_url(url), tls = %tls.describe(url), "store open");
                if let Some(warning) = tls.warning(url) {
                    tracing::warn!(url = %crate::store::redact_url(url), "{warning}");
                }
            }
        }
        ready.store(true, Ordering::Relaxed);
        Running {
            ingress_addr,
            admin_addr,
            mqtt_addr: addrs.mqtt,
            mqtt_ws_addr: addrs.ws,
            mqtt_plain_addr: addrs.plain,
            mqtt_behind_addr: addrs.behind,
            admin_token,
            store,
            secrets,
            broker: handle,
            token,
            hard_stop,
            tracker,
            supervisor,
        }
    }
}

/// Starts this replica's lease task, its `LISTEN` connection and its forwarder, and gives the
/// delivery engine its share.
// The URL and its TLS are one database, passed as two arguments.
#[allow(clippy::too_many_arguments)]
fn spawn_replicas<P: delivery::Publisher>(
    engine: delivery::Engine<P>,
    url: &str,
    tls: &crate::store::PgTls,
    config: &Config,
    published: broadcast::Sender<delivery::Published>,
    metrics: &Metrics,
    supervisor: &Supervisor,
    token: &CancellationToken,
) -> (delivery::Engine<P>, crate::replicas::Ownership) {
    use crate::replicas::{Leases, Ownership, Settings, notify};
    let id = if config.replicas.id.is_empty() {
        Settings::default_id()
    } else {
        config.replicas.id.clone()
    };
    let settings = Settings {
        id: id.clone(),
        lease: Duration::from_secs(config.replicas.lease_secs),
    };
    tracing::info!(replica = %id, lease_secs = config.replicas.lease_secs, "sharing delivery with other replicas by shard leases");
    let ownership = Ownership::new(id.clone());
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let wake = Arc::new(tokio::sync::Notify::new());
    supervisor.spawn(
        "replica_leases",
        Leases::new(
            url.to_owned(),
            tls.clone(),
            settings.clone(),
            ownership.clone(),
            input_tx.clone(),
            wake.clone(),
        )
        .with_metrics(metrics.clone())
        .run(token.clone())
        .instrument(tracing::info_span!("replica_leases")),
    );
    supervisor.spawn(
        "replica_listen",
        notify::Listener {
            url: url.to_owned(),
            tls: tls.clone(),
            id: id.clone(),
            engine: input_tx,
            leases: wake,
            published: Some(published),
        }
        .run(token.clone())
        .instrument(tracing::info_span!("replica_listen")),
    );
    supervisor.spawn(
        "replica_forward",
        notify::Forwarder {
            url: url.to_owned(),
            tls: tls.clone(),
            id,
            metrics: Some(metrics.clone()),
        }
        .run(out_rx, token.clone())
        .instrument(tracing::info_span!("replica_forward")),
    );
    let engine = engine.with_cluster(delivery::Cluster {
        ownership: ownership.clone(),
        inputs: input_rx,
        outgoing: out_tx,
        // Shared subscriptions (Mosquitto) hand each event to one replica; with plain ones (NATS)
        // every replica reads every event and ignores those of terminals it does not own.
        forward_events: config.mqtt.mode == MqttMode::External
            && config
                .mqtt
                .external
                .as_ref()
                .is_some_and(|x| x.kind.shared_subscriptions()),
        reread_every: settings.lease,
    });
    (engine, ownership)
}

async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, BuildError> {
    crate::serve::listen(addr, 1024, false).map_err(|source| BuildError::Bind {
        name,
        addr,
        source,
    })
}

fn rpc_limits(config: &crate::config::RpcConfig) -> RpcLimits {
    RpcLimits {
        per_sec: config.requests_per_sec,
        burst: config.burst,
        in_flight: config.max_in_flight,
        flood_suspend: (config.flood_suspend_secs > 0)
            .then(|| Duration::from_secs(config.flood_suspend_secs)),
    }
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// What a revocation does outside the store (which has already marked the terminal revoked and
/// parked its unacked confirmations): the broker refuses its certificate and cuts its session, its
/// HTTP streams end and its unspent stream tickets are dropped, and delivery stops republishing
/// what was parked and clears it from the broker.
struct Revoker {
    broker: Link,
    hub: Hub,
    tickets: Tickets,
    delivery: mpsc::UnboundedSender<BrokerEvent>,
}

impl Revoker {
    fn revoke(&self, r: &Revocation) {
        self.broker.revoke(&r.record.id, &r.record.cert_serial);
        self.hub.revoke(&r.record.id);
        self.tickets.revoke(&r.record.id);
        drop(self.delivery.send(BrokerEvent::Revoked {
            terminal_id: r.record.id.clone(),
            parked: r.parked.clone(),
        }));
    }
}

// === impl Running ===

impl Running {
    /// Cancelled when shutdown starts; cancel it to request a shutdown.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The background task that panicked and stopped the daemon, if one did.
    pub fn failed(&self) -> Option<&'static str> {
        self.supervisor.failed()
    }

    /// The admin API's bearer token.
    pub fn admin_token(&self) -> &SecretString {
        &self.admin_token
    }

    /// The store, for in-process inspection (tests, the simulator's demo).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Applies what can change without a restart (SIGHUP): the webhook secrets from `config`, and
    /// the revocations recorded in the store. Connections stay up.
    ///
    /// # Errors
    /// When the store cannot be read (nothing is changed then).
    pub async fn reload(&self, config: &Config) -> Result<(), StoreError> {
        let (serials, revoked) = self.store.revocations().await?;
        let count = config.provider.webhook_secrets.len();
        // Replaced whole, so a poisoned lock holds nothing half-written: never skip a rotation.
        *self
            .secrets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            config.provider.webhook_secrets.clone();
        self.broker.set_revoked(&serials, &revoked);
        if count == 0 {
            tracing::warn!(
                "reloaded: provider.webhook_secrets is empty, every webhook is answered 401"
            );
        }
        tracing::info!(
            webhook_secrets = count,
            revoked_terminals = revoked.len(),
            log_level = %config.log.level,
            "reloaded"
        );
        Ok(())
    }

    /// Stops the listeners, waits at most `grace` for in-flight requests, then cuts every
    /// connection still open and closes the store. Returns how long the drain took.
    pub async fn shutdown(self, grace: Duration) -> Duration {
        let started = Instant::now();
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "in-flight requests did not finish in time; cutting them"
            );
            self.hard_stop.cancel();
            // The connections end at once; give what else is left a moment, then go on.
            if tokio::time::timeout(Duration::from_secs(1), self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("tasks still running after the hard stop; closing the store anyway");
            }
        }
        self.store.close().await;
        let took = started.elapsed();
        tracing::info!(took_ms = took.as_millis() as u64, "stopped; store closed");
        took
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};

    use super::*;
    use crate::config::Env;

    const SECRET: &str = "whsec_app_test";

    async fn gateway(dir: &std::path::Path, extra: &[(&str, &str)]) -> Running {
        let mut pairs = vec![
            ("POSGATE__DATA_DIR", dir.display().to_string()),
            ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0".into()),
            ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0".into()),
            ("POSGATE__MQTT__LISTEN", "127.0.0.1:0".into()),
            ("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET.into()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let config = Config::load(None, &Env::from_pairs(pairs)).unwrap();
        Gateway::build(config).await.unwrap().spawn()
    }

    async fn post(running: &Running, body: &str) -> (u16, String) {
        let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
        let signature = posgate_proto::webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
        let response = reqwest::Client::new()
            .post(format!("http://{}{}", running.ingress_addr, ingress::PATH))
            .header(TIMESTAMP_HEADER, ts)
            .header(SIGNATURE_HEADER, signature)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn readyz(running: &Running) -> u16 {
        reqwest::get(format!("http://{}/readyz", running.admin_addr))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// A disk that stops answering (an fdatasync held back): the webhook waiting for it is
    /// answered `503` at `store.commit_deadline_ms`, not left hanging; `/readyz` (and with it the
    /// systemd watchdog) says unhealthy; once the disk answers again, both recover, and the
    /// webhook's retry is a duplicate (it was committed after all).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_disk_answers_503_and_fails_readiness_until_it_answers_again() {
        let dir = tempfile::tempdir().unwrap();
        let running = gateway(dir.path(), &[("POSGATE__STORE__COMMIT_DEADLINE_MS", "300")]).await;
        let body = r#"{"id":"evt_stall","type":"payment_intent.confirmed","created_at":"2026-01-01T00:00:00Z","data":{"id":"pi_stall","status":"confirmed","amount":"1.00","metadata":{"terminal_id":"pos-1"}}}"#;
        assert_eq!(readyz(&running).await, 200);
        running.store().hold_syncs_for_test(true);
        let stalled = post(&running, body).await;
        // The answer's deadline runs from the submission, the store's own from the commit's
        // start a moment later: not ready within moments, while the sync is still held.
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut ready = readyz(&running).await;
        while ready == 200 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            ready = readyz(&running).await;
        }
        running.store().hold_syncs_for_test(false);
        assert_eq!(stalled.0, 503, "{}", stalled.1);
        assert_eq!(ready, 503, "/readyz while the disk is stalled");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while readyz(&running).await != 200 {
            assert!(tokio::time::Instant::now() < deadline, "never ready again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let retried = post(&running, body).await;
        assert_eq!(retried.0, 200);
        assert!(retried.1.contains(r#""duplicate":true"#), "{}", retried.1);
        running.shutdown(Duration::from_secs(5)).await;
    }

    /// A request stuck inside the daemon (its commit waits on a disk that does not answer) is
    /// cut at the end of the grace period: its connection is closed, not left running after
    /// `shutdown` returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_the_connection_of_a_stuck_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let dir = tempfile::tempdir().unwrap();
        let running = gateway(
            dir.path(),
            &[("POSGATE__STORE__COMMIT_DEADLINE_MS", "60000")],
        )
        .await;
        let store = running.store().clone();
        let body = r#"{"id":"evt_stuck","type":"payment_intent.confirmed","created_at":"2026-01-01T00:00:00Z","data":{"id":"pi_stuck","status":"confirmed","amount":"1.00","metadata":{"terminal_id":"pos-1"}}}"#;
        let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
        let signature = posgate_proto::webhook::sign(SECRET.as_bytes(), &ts, body.as_bytes());
        let request = format!(
            "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{TIMESTAMP_HEADER}: {ts}\r\n{SIGNATURE_HEADER}: {signature}\r\ncontent-length: {}\r\n\r\n{body}",
            ingress::PATH,
            body.len()
        );
        let before = store.syncs_requested_for_test();
        store.hold_syncs_for_test(true);
        let mut stream = tokio::net::TcpStream::connect(running.ingress_addr)
            .await
            .unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        // The webhook is committed and waits for its fdatasync, which does not come.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.syncs_requested_for_test() == before {
            assert!(tokio::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let shutdown = tokio::spawn(running.shutdown(Duration::from_millis(300)));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .is_ok();
        // The store closes only once its last commit is answered: let the disk answer now.
        store.hold_syncs_for_test(false);
        shutdown.await.unwrap();
        assert!(
            closed,
            "the stuck request's connection was still open 5 s after a 300 ms grace period"
        );
    }
}
