//! The external broker mode (`mqtt.mode = "external"`): terminals connect to a broker the
//! operator runs (Mosquitto 2, [`super::mosquitto`] writes its configuration; or a NATS cluster,
//! [`super::nats`]), and posgate is one of its clients, a backend client with its own certificate, issued from the gateway CA at each
//! start (CN [`BACKEND_CN`], which can never be a terminal id).
//!
//! What the broker must guarantee, since posgate no longer sees the terminals' connections:
//! - the client certificate, issued by the gateway CA and not on its CRL, is the identity
//!   (Mosquitto: `require_certificate`, `use_identity_as_username`, `crlfile`);
//! - a terminal reads and writes only its own topics (the per-terminal ACL posgate keeps in
//!   `mqtt.external_broker_dir`). This is what makes the terminal id posgate reads from a topic
//!   trustworthy: a message on `/tenants/{t}/acks` can only come from the terminal of tenant `t`.
//!
//! What posgate does here:
//! - publishes the retained QoS 1 confirmations and the RPC answers ([`Handle`] is a
//!   [`Publisher`]); a publish is handed to rumqttc's queue without waiting (a full queue is an
//!   error, and the delivery engine publishes the row again later), so a broker that is away
//!   never stalls the engine;
//! - takes the terminals' acks, status and RPC requests from shared subscriptions
//!   (`$share/posgate/…`, MQTT 3.1.1 as Mosquitto allows), so that replicas split them, or from
//!   plain ones on NATS, which delivers nothing to `$share/…`; asks again for a subscription the
//!   broker refused (NATS refuses some while JetStream elects a leader after a node's loss);
//! - turns a terminal's retained status into presence: `online` is a connect (its pending
//!   confirmations are published again, as in embedded mode), `offline` (its last will) a
//!   disconnect;
//! - reconnects with a backoff that doubles from 250 ms to 30 s, to the next of the broker's URLs
//!   (`mqtt.external_url`, then `mqtt.external_fallback_urls`) each time, subscribing again
//!   (clean session: nothing is kept at the broker for posgate; what was missed meanwhile is
//!   published again from the outbox after `delivery.republish_after_secs`);
//! - keeps the broker's ACL and CRL files (NATS: its authorization file) up to date ([`Files`]) and runs the reload command after
//!   each change: provisioning, revocation and renewals reach the broker that way;
//! - cuts a session (revocation, an RPC flood) by taking it over: a short connection with the
//!   terminal's own client id makes the broker close the terminal's. A revoked terminal's
//!   reconnect then fails on the CRL; a suspended one may reconnect, and its RPC requests are
//!   dropped unanswered until the suspension ends.
//!
//! What it cannot do: know which certificate an open session used (a renewal's replaced
//! certificate is refused from the next connection on, an open session on it stays), or when a
//! renewal's new certificate is first used (renewals complete at their deadline).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use posgate_proto::confirmation::StatusMessage;
use posgate_proto::topics::{self, TopicKind};
use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{BrokerKind, ExternalBroker};
use crate::delivery::{BrokerEvent, PublishError, Publisher};
use crate::pki::{Pki, PkiError};
use crate::store::Store;
use crate::telemetry::Throttle;

/// The CN of posgate's own client certificate, hence its user name at the broker. The `:` keeps
/// it out of the terminal ids (`[A-Za-z0-9_.-]`), so no terminal can be provisioned as it.
pub const BACKEND_CN: &str = "posgate:backend";

/// The shared-subscription group of every replica.
pub const SHARE_GROUP: &str = "posgate";

/// Requests (publishes) rumqttc may hold while the broker is away or slow; beyond, a publish
/// fails at once and the row is published again later.
const QUEUE: usize = 16_384;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

static CONNECTION_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// The filters posgate subscribes to, shared between replicas.
pub fn shared_filters() -> [String; 3] {
    plain_filters().map(|topic| format!("$share/{SHARE_GROUP}/{topic}"))
}

/// The same filters unshared (NATS: it accepts `$share/…` and delivers nothing to it). With
/// several replicas on such a broker every replica receives every terminal's messages.
pub fn plain_filters() -> [String; 3] {
    let any = "+";
    [topics::acks(any), topics::status(any), topics::rpc_req(any)]
}

/// Why the external broker's client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("issuing posgate's client certificate")]
    Pki(#[from] PkiError),
    #[error("posgate's TLS client configuration")]
    Tls(#[source] rustls::Error),
    #[error("writing the broker file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where to connect and as whom; also used for the short take-over connections.
struct Target {
    /// `mqtt.external_url` then `mqtt.external_fallback_urls`, as `(host, port)`.
    endpoints: Vec<(String, u16)>,
    /// The endpoint in use: the next one is tried after a failed connection.
    current: std::sync::atomic::AtomicUsize,
    /// `None` for `mqtt://` (tests and benchmarks only).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    fn endpoint(&self) -> (String, u16) {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.endpoints[i % self.endpoints.len()].clone()
    }

    /// Moves to the next endpoint; whether there was another one to move to.
    fn advance(&self) -> bool {
        self.current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.endpoints.len() > 1
    }

    fn options(&self, client_id: &str) -> MqttOptions {
        let (host, port) = self.endpoint();
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        options.set_request_channel_capacity(QUEUE);
        options.set_inflight(1000);
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        options
    }
}

/// A connected-to-be client of the external broker, not yet running.
pub struct External {
    eventloop: EventLoop,
    handle: Handle,
    events: mpsc::UnboundedSender<BrokerEvent>,
    addr: SocketAddr,
    url: String,
    client_id: String,
    shared: bool,
    /// `posgate_external_broker_connected`.
    connected: prometheus::IntGauge,
}

/// posgate's side of the external broker; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    client: AsyncClient,
    target: Arc<Target>,
    /// Terminals whose RPC requests are dropped until then (they kept flooding).
    suspended: Arc<super::Suspensions>,
    /// Shared with the [`Files`] task.
    files: Arc<FilesState>,
}

/// What the [`Handle`] and the [`Files`] task share.
#[derive(Default)]
struct FilesState {
    /// Wakes the task: the registry or the revocations changed.
    wake: Notify,
    /// Whether a [`Files`] task runs (`mqtt.external_broker_dir` is set).
    active: std::sync::atomic::AtomicBool,
    /// Terminals whose session is cut once the broker has the new files: cut earlier, a revoked
    /// terminal would reconnect before the broker knew of its revocation.
    kicks: Mutex<Vec<String>>,
}

// === impl External ===

impl External {
    /// Issues posgate's client certificate and prepares the client; connects only when spawned.
    ///
    /// # Errors
    /// [`ExternalError`] when the certificate cannot be issued or used.
    pub async fn build(
        config: &ExternalBroker,
        pki: &Pki,
        events: mpsc::UnboundedSender<BrokerEvent>,
        connected: prometheus::IntGauge,
    ) -> Result<External, ExternalError> {
        let tls = if config.tls {
            Some(tls_config(pki)?)
        } else {
            None
        };
        let mut endpoints = vec![(config.host.clone(), config.port)];
        endpoints.extend(config.fallbacks.iter().cloned());
        let target = Arc::new(Target {
            endpoints,
            current: Default::default(),
            tls,
        });
        // A random part per start: a terminal cannot take posgate's session over by guessing
        // its client id (the broker does not tie client ids to certificates).
        let client_id = format!(
            "{}:{}",
            config.client_id,
            hex::encode(rand::random::<[u8; 6]>())
        );
        let (client, eventloop) = AsyncClient::new(target.options(&client_id), QUEUE);
        let addr = resolve(&config.host, config.port).await;
        Ok(External {
            eventloop,
            handle: Handle {
                client,
                target,
                suspended: Arc::default(),
                files: Arc::default(),
            },
            events,
            addr,
            url: config.url.clone(),
            client_id,
            shared: config.kind.shared_subscriptions(),
            connected,
        })
    }

    /// The broker's address (resolved at build; the unspecified address when it did not resolve).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs the client until `token` is cancelled.
    pub fn spawn(self, tracker: &TaskTracker, token: CancellationToken) {
        let External {
            eventloop,
            handle,
            events,
            addr,
            url,
            client_id,
            shared,
            connected,
        } = self;
        if handle.target.tls.is_none() {
            tracing::warn!(%url, "mqtt.external_url is plaintext mqtt://: posgate's link to the broker is neither encrypted nor authenticated; tests and benchmarks only");
        }
        tracing::info!(mqtt_addr = %addr, %url, "external broker: posgate runs no MQTT listener and connects as a backend client");
        let link = Link {
            handle,
            client_id,
            shared,
        };
        tracker.spawn(
            run(eventloop, link, events, connected, token)
                .instrument(tracing::info_span!("external_broker")),
        );
    }
}

async fn resolve(host: &str, port: u16) -> SocketAddr {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, port);
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    }
    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port)))
}

fn tls_config(pki: &Pki) -> Result<Arc<rustls::ClientConfig>, ExternalError> {
    let issued = pki.issue_backend(BACKEND_CN)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        let cert = cert.map_err(|e| ExternalError::Tls(rustls::Error::General(e.to_string())))?;
        roots.add(cert).map_err(ExternalError::Tls)?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ExternalError::Tls(rustls::Error::General(e.to_string())))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| ExternalError::Tls(rustls::Error::General(e.to_string())))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ExternalError::Tls)?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(ExternalError::Tls)?;
    Ok(Arc::new(config))
}

/// What the client's loop needs besides its event loop.
struct Link {
    handle: Handle,
    client_id: String,
    /// Shared subscriptions (`$share/posgate/…`) or plain ones.
    shared: bool,
}

/// The client's loop: poll, (re)subscribe after every CONNACK, turn the terminals' messages
/// into events, back off after errors and move on to the next endpoint.
async fn run(
    mut eventloop: EventLoop,
    link: Link,
    events: mpsc::UnboundedSender<BrokerEvent>,
    connected: prometheus::IntGauge,
    token: CancellationToken,
) {
    let Link {
        handle,
        client_id,
        shared,
    } = link;
    let filters = if shared {
        shared_filters()
    } else {
        plain_filters()
    };
    let subscribe = |asked: &[String]| {
        let filters = asked
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        if let Err(e) = handle.client.try_subscribe_many(filters) {
            tracing::error!(error = %e, "could not subscribe at the external broker");
        }
    };
    let mut backoff = BACKOFF_MIN;
    // The filters of the last SUBSCRIBE (a SUBACK's codes are in their order), and when to ask
    // again for those refused: a refusal may pass (NATS refuses while its JetStream elects a
    // leader after a node's loss) or not (an ACL without posgate's user), so keep asking.
    let mut asked: Vec<String> = Vec::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut retry_backoff = BACKOFF_MIN;
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let polled = tokio::select! {
            _ = token.cancelled() => break,
            () = retry => {
                retry_at = None;
                subscribe(&asked);
                continue;
            }
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                retry_backoff = BACKOFF_MIN;
                retry_at = None;
                let (host, port) = handle.target.endpoint();
                tracing::info!(%host, port, "connected to the external broker");
                asked = filters.to_vec();
                subscribe(&asked);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<String> = asked
                    .iter()
                    .zip(&ack.return_codes)
                    .filter(|(_, c)| matches!(c, SubscribeReasonCode::Failure))
                    .map(|(f, _)| f.clone())
                    .collect();
                if refused.is_empty() {
                    connected.set(1);
                } else {
                    tracing::error!(
                        ?refused,
                        retry_in_ms = retry_backoff.as_millis() as u64,
                        "the external broker refused posgate's subscriptions (its ACL must let {BACKEND_CN} read them, see `posgate broker-config`; NATS also refuses while JetStream elects a leader); asking again"
                    );
                    asked = refused;
                    retry_at = Some(tokio::time::Instant::now() + retry_backoff);
                    retry_backoff = (retry_backoff * 2).min(BACKOFF_MAX);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(event) = handle.event_of(&p.topic, p.payload)
                    && events.send(event).is_err()
                {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.set(0);
                retry_at = None;
                if let Some(skipped) = CONNECTION_LOG.allow() {
                    let (host, port) = handle.target.endpoint();
                    tracing::warn!(error = %e, %host, port, retry_in_ms = backoff.as_millis() as u64, skipped, "external broker connection failed");
                }
                // A cluster: the next node, keeping what rumqttc holds (publishes not yet
                // acknowledged are sent again on the new connection).
                if handle.target.advance() {
                    eventloop.mqtt_options = handle.target.options(&client_id);
                }
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    connected.set(0);
    drop(handle.client.try_disconnect());
}

// === impl Handle ===

impl Handle {
    /// What a terminal's publish means for the delivery engine. The terminal is the one the topic
    /// names: the broker's ACL lets only that terminal publish there.
    fn event_of(&self, topic: &str, payload: Bytes) -> Option<BrokerEvent> {
        let (tenant, kind) = topics::parse(topic)?;
        let terminal_id = topics::terminal_for(&tenant)
            .filter(|id| topics::valid_terminal_id(id) && topics::tenant_for(id) == tenant)?;
        match kind {
            TopicKind::Acks => Some(BrokerEvent::Message {
                terminal_id,
                kind,
                payload,
            }),
            TopicKind::Status => {
                // An empty retained message only clears the topic.
                let status: StatusMessage = serde_json::from_slice(&payload).ok()?;
                Some(if status.is_online() {
                    BrokerEvent::Connected { terminal_id }
                } else {
                    BrokerEvent::Disconnected { terminal_id }
                })
            }
            TopicKind::RpcReq => {
                if self.is_suspended(&terminal_id) {
                    if let Some(skipped) = super::RPC_DROPPED_LOG.allow() {
                        tracing::info!(%terminal_id, skipped, "RPC request of a suspended terminal dropped");
                    }
                    return None;
                }
                Some(BrokerEvent::Message {
                    terminal_id,
                    kind,
                    payload,
                })
            }
            _ => None,
        }
    }

    fn is_suspended(&self, terminal_id: &str) -> bool {
        self.suspended.contains(terminal_id)
    }

    fn try_publish(&self, topic: String, payload: Bytes, retain: bool) -> Result<(), PublishError> {
        self.client
            .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
            .map_err(|e: ClientError| PublishError {
                topic,
                source: e.into(),
            })
    }

    /// The broker's files must change: the registry or the revocations did.
    pub fn files_changed(&self) {
        self.files.wake.notify_one();
    }

    /// A revocation: the files change, then (once the broker has them, when posgate keeps
    /// them) the terminal's session is cut.
    pub fn revoke(&self, terminal_id: &str) {
        if self.files.active.load(std::sync::atomic::Ordering::Acquire) {
            self.files
                .kicks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(terminal_id.to_owned());
            self.files_changed();
        } else {
            self.kick(terminal_id);
        }
    }

    /// Cuts `terminal_id`'s session at the broker by taking it over: a short connection with its
    /// client id (the terminal id, as its bundle says), which the broker answers by closing the
    /// terminal's. A terminal that connected under another client id is not reached this way;
    /// the ACL (and for a revocation the CRL) still hold it.
    pub fn kick(&self, terminal_id: &str) {
        let options = self.target.options(terminal_id);
        let terminal_id = terminal_id.to_owned();
        tokio::spawn(async move {
            let (client, mut eventloop) = AsyncClient::new(options, 4);
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            drop(client.try_disconnect());
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
            })
            .await;
            match outcome {
                Ok(Ok(())) => tracing::info!(%terminal_id, "session at the external broker cut"),
                Ok(Err(e)) => {
                    tracing::warn!(%terminal_id, error = %e, "could not cut the session at the external broker")
                }
                Err(_) => {
                    tracing::warn!(%terminal_id, "cutting the session at the external broker timed out")
                }
            }
        });
    }

    /// Drops `terminal_id`'s RPC requests for `duration` and cuts its session.
    pub fn suspend(&self, terminal_id: &str, duration: Duration) {
        self.suspended.suspend(terminal_id, duration);
        self.kick(terminal_id);
    }
}

impl Publisher for Handle {
    async fn publish_retained(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        self.try_publish(topic, payload, true)
    }

    async fn publish(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        self.try_publish(topic, payload, false)
    }

    fn suspend(&self, terminal_id: &str, duration: Duration) {
        Handle::suspend(self, terminal_id, duration);
    }
}

mod files;

#[cfg(test)]
use files::SETTLE;
pub use files::{Files, write_file};

#[cfg(test)]
mod tests {
    use super::*;

    /// Mosquitto drops a SIGHUP that arrives while it is reloading; after the files change, the
    /// broker is told once more when they have stayed unchanged for [`SETTLE`], so the last
    /// change is loaded even if its own reload was lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_broker_is_told_once_more_after_the_changes_stop() {
        use crate::store::testing::{Kind, store};
        let dir = tempfile::tempdir().unwrap();
        let (_db, store) = store(Kind::Redb, crate::store::Limits::new(64, 16)).await;
        crate::store::testing::register(&store, "pos-1").await;
        let names = vec!["localhost".to_owned()];
        let pki = Arc::new(Pki::load_or_create(&dir.path().join("pki"), &names).unwrap());
        let reloads = dir.path().join("reloads");
        let files = Files {
            dir: dir.path().to_owned(),
            kind: BrokerKind::Mosquitto,
            reload_command: vec![
                "sh".into(),
                "-c".into(),
                format!("echo reload >> {}", reloads.display()),
            ],
            store,
            pki,
            handle: handle(),
        };
        let token = CancellationToken::new();
        let task = tokio::spawn(files.run(token.clone()));
        let count = || {
            std::fs::read_to_string(&reloads)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let deadline = tokio::time::Instant::now() + SETTLE * 5;
        while count() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count(), 2, "one reload for the write, one once it settled");
        assert!(
            std::fs::read_to_string(dir.path().join(super::super::mosquitto::ACL_FILE))
                .unwrap()
                .contains("user pos-1"),
        );
        token.cancel();
        task.await.unwrap();
    }

    fn handle() -> Handle {
        let target = Arc::new(Target {
            endpoints: vec![("127.0.0.1".into(), 1)],
            current: Default::default(),
            tls: None,
        });
        let (client, _eventloop) = AsyncClient::new(target.options("posgate:test"), 8);
        Handle {
            client,
            target,
            suspended: Arc::default(),
            files: Arc::default(),
        }
    }

    #[tokio::test]
    async fn the_terminal_comes_from_the_topic_and_status_is_presence() {
        let h = handle();
        let tenant = topics::tenant_for("pos-01");
        let ack = h.event_of(&topics::acks(&tenant), Bytes::from_static(b"{}"));
        assert!(
            matches!(ack, Some(BrokerEvent::Message { ref terminal_id, kind: TopicKind::Acks, .. }) if terminal_id == "pos-01")
        );
        let online = serde_json::to_vec(&StatusMessage::online()).unwrap();
        assert_eq!(
            h.event_of(&topics::status(&tenant), online.into()),
            Some(BrokerEvent::Connected {
                terminal_id: "pos-01".into()
            })
        );
        let offline = serde_json::to_vec(&StatusMessage::offline()).unwrap();
        assert_eq!(
            h.event_of(&topics::status(&tenant), offline.into()),
            Some(BrokerEvent::Disconnected {
                terminal_id: "pos-01".into()
            })
        );
        // Not the terminals' topics, or a tenant no terminal id makes: nothing.
        assert_eq!(
            h.event_of(&topics::payments(&tenant, "pi_1"), Bytes::new()),
            None
        );
        assert_eq!(h.event_of("/tenants/tZZ/acks", Bytes::new()), None);
        assert_eq!(h.event_of(&topics::status(&tenant), Bytes::new()), None);
    }

    #[tokio::test]
    async fn a_suspended_terminal_s_rpc_requests_are_dropped_until_the_end() {
        tokio::time::pause();
        let h = handle();
        let req = topics::rpc_req(&topics::tenant_for("pos-02"));
        h.suspended.suspend("pos-02", Duration::from_secs(60));
        assert_eq!(h.event_of(&req, Bytes::from_static(b"{}")), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(h.event_of(&req, Bytes::from_static(b"{}")).is_some());
    }
}
