//! Starting a built gateway: every task under one `TaskTracker` and one `CancellationToken`, in
//! the order that keeps the guarantees (the delivery engine before anything that can commit a
//! row for it), and the wiring between them: which channel carries what, who tells whom.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::revoker::Revoker;
use super::{Gateway, Mqtt, Running};
use crate::admin::{self, Admin, Fleet};
use crate::broker::{self, Link, external};
use crate::channels::{self, Channels, Hub, Tickets};
use crate::config::{Config, MqttMode};
use crate::delivery::{self, Presence, Signer};
use crate::ingress::tls::TlsListener;
use crate::ingress::{self, Ingress, Secrets};
use crate::metrics::Metrics;
use crate::provider::{Budget, ProviderClient};
use crate::reconcile::{Listing, Reconciler, Stale};
use crate::rpc::{Rpc, RpcLimits};
use crate::serve;
use crate::shutdown::Supervisor;
use crate::store::{Retired, Revocation};
use posgate_proto::qr::Mode;

// === impl Gateway (spawn) ===

impl Gateway {
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
        spawn_prune(
            &supervisor,
            "events_prune",
            crate::store::prune_events(
                store.clone(),
                Duration::from_secs(config.store.retention_hours * 3600),
                token.clone(),
            ),
        );
        spawn_prune(
            &supervisor,
            "rpc_prune",
            crate::rpc::prune_answers(
                store.clone(),
                Duration::from_secs(config.rpc.answers_retention_hours * 3600),
                token.clone(),
            ),
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

/// Starts one of the hourly prune tasks (`prune_events`, `prune_answers`) under the supervisor, in
/// a span `prune{task=name}`.
fn spawn_prune(
    supervisor: &Supervisor,
    name: &'static str,
    prune: impl Future<Output = ()> + Send + 'static,
) {
    supervisor.spawn(
        name,
        prune.instrument(tracing::info_span!("prune", task = name)),
    );
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
