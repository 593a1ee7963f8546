//! The embedded MQTT broker: the only module that names the broker library (rmqtt; see
//! `docs/decisions/0001-broker.md` for why not rumqttd).
//!
//! What it gives the rest of the daemon:
//! - mutual-TLS listeners (MQTT 3.1.1 and 5; optionally over secure WebSocket) whose client
//!   certificate is required and is the connection's identity: the MQTT client id must equal the
//!   certificate's CN (the terminal id) and its O must be that terminal's tenant;
//! - isolation enforced here, not by convention: a terminal may subscribe only to its own
//!   `/tenants/{t}/payments/…` and `/tenants/{t}/rpc/res`, publish only to its own `acks`, `status`
//!   and `rpc/req`, and set a last will only on its own `status` (interfaces.md);
//! - revocation by certificate: a revoked serial or terminal id is refused at CONNECT whatever else
//!   it presents, and its open session is kicked at once ([`Handle::revoke`]); a single serial
//!   (a certificate replaced by a renewal) is refused the same way, closing only the connections
//!   made with it ([`Handle::retire`]); every accepted CONNECT is reported with its serial
//!   (`seen`), which is how a renewal learns that its new certificate is in use;
//! - an in-process API: retained QoS 1 publishes ([`Handle`] is a [`Publisher`]) and a stream of
//!   [`BrokerEvent`]s (connect, disconnect, the terminals' own publishes);
//! - a front door of our own on the TLS listeners (`front`, decision 0004): handshakes bounded
//!   in number and in time, a revoked certificate refused during the TLS handshake, at most
//!   `max_connections_per_terminal` sockets per terminal, and an MQTT CONNECT required within the
//!   handshake timeout; rmqtt serves the bytes behind it on a loopback listener.
//!
//! Where each part lives: the topic rules in `posgate_proto::acl` (pure functions), `hooks`
//! (rmqtt's callbacks at CONNECT, SUBSCRIBE and PUBLISH, and the broker events), `listeners`
//! (binding rmqtt's and the front door's sockets), `front`, [`Link`] (embedded or
//! [`external`]), and this file: start-up, revocation and suspension state, and the [`Handle`].
//!
//! What it cannot do (recorded in the decision records): rmqtt keeps retained messages and
//! sessions in memory only (the store's outbox is the durable copy and is republished at startup);
//! it has no call to stop a server, so shutdown aborts its tasks.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rmqtt::codec::types::Publish as CodecPublish;
use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::server::MqttServer;
use rmqtt::session::SessionState;
use rmqtt::types::{ClientId, From, Id, Publish, QoS};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::delivery::{BrokerEvent, PublishError, Publisher};
use crate::ingress::tls::{self, TlsError};
use crate::pki::{Pki, Serial};
use crate::telemetry::Throttle;

pub mod external;
mod front;
mod hooks;
mod link;
mod listeners;
pub mod mosquitto;
pub mod nats;

use hooks::{HookRef, Hooks, cert_of};
pub use link::Link;
use listeners::{Kind, bind, bind_front, local, local_std};
pub use posgate_proto::acl::{may_publish, may_subscribe};

use front::{Door, Front, RefuseRevoked};

/// Listener ids inside rmqtt.
const TLS_LISTENER: u16 = 1;
const WSS_LISTENER: u16 = 2;
const PLAIN_LISTENER: u16 = 3;

/// What clients can cause at will is logged at most once a second per kind.
static CONNECT_REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static SUBSCRIBE_REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static PUBLISH_REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static ACCEPT_FAILED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static RPC_DROPPED_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// Most subscriptions one session may hold (a terminal uses two).
pub const MAX_SUBSCRIPTIONS: usize = 8;
/// Most levels in a topic filter (the deepest of ours has five).
const MAX_TOPIC_LEVELS: usize = 8;
/// How long a terminal suspended for flooding RPC stays connected to read the answers that
/// refused it.
const SUSPEND_GRACE: Duration = Duration::from_secs(1);

/// Broker settings (from `[mqtt]`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub ws_listen: Option<SocketAddr>,
    pub plain_listen: Option<SocketAddr>,
    /// TLS handshake plus MQTT CONNECT must finish within this.
    pub handshake_timeout: Duration,
    /// Most handshakes in flight at once.
    pub max_handshaking: usize,
    /// Most connections per listener.
    pub max_connections: usize,
    /// Most sockets one terminal holds at once after its TLS handshake (the oldest is closed).
    pub max_connections_per_terminal: usize,
    /// Terminals connect through posgate's own front door (`front`) rather than rmqtt's TLS
    /// listeners.
    pub front_door: bool,
    /// Counts the connections refused, by reason (`posgate_mqtt_refused_total`).
    pub refused: prometheus::IntCounterVec,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("binding the MQTT {name} listener on {addr}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        /// The socket's error (its kind tells a port in use from a bad certificate file).
        #[source]
        source: std::io::Error,
    },
    #[error("starting the broker's retained-message store")]
    Start(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the MQTT listeners' TLS configuration")]
    Tls(#[from] TlsError),
}

/// The bound addresses.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub mqtt: SocketAddr,
    pub ws: Option<SocketAddr>,
    pub plain: Option<SocketAddr>,
    /// rmqtt's loopback listener behind the front door of `mqtt` (with `mqtt.front_door`): it
    /// refuses whoever did not come through the front door.
    pub behind: Option<SocketAddr>,
}

/// Who may not connect.
#[derive(Default)]
struct Revoked {
    serials: RwLock<HashSet<Serial>>,
    terminals: RwLock<HashSet<String>>,
    /// Terminals refused for a while (they kept flooding); not kept across restarts.
    suspended: Suspensions,
}

/// Terminals suspended until some instant (they kept flooding RPC); not kept across restarts.
#[derive(Default)]
pub(crate) struct Suspensions(
    std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
);

impl Suspensions {
    /// Suspends `terminal_id` for `duration` from now.
    pub(crate) fn suspend(&self, terminal_id: &str, duration: Duration) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                terminal_id.to_owned(),
                tokio::time::Instant::now() + duration,
            );
    }

    /// Whether `terminal_id` is suspended now (an expired suspension is forgotten).
    pub(crate) fn contains(&self, terminal_id: &str) -> bool {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(terminal_id) {
            Some(until) if *until > tokio::time::Instant::now() => true,
            Some(_) => {
                map.remove(terminal_id);
                false
            }
            None => false,
        }
    }
}

impl Revoked {
    /// Never answers "not revoked" because of a poisoned lock: the sets are only ever extended
    /// in one call, so what a poisoned lock holds is whole, and it is read as it is.
    fn contains(&self, terminal_id: &str, serial: Option<&str>) -> bool {
        let by_id = self
            .terminals
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(terminal_id);
        let by_serial = serial.is_some_and(|s| {
            self.serials
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&Serial::parse(s))
        });
        by_id || by_serial
    }
}

/// Told `(terminal id, certificate serial)` of every CONNECT that passed authentication; called in
/// the CONNECT hook, so it must be quick.
pub type Seen = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A bound, not yet running broker.
pub struct Broker {
    scx: ServerContext,
    listeners: Vec<(rmqtt::net::Listener, u16)>,
    doors: Vec<Door>,
    front: Arc<Front>,
    addrs: Addrs,
    handle: Handle,
}

/// In-process access to the running broker; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    scx: ServerContext,
    revoked: Arc<Revoked>,
    front: Arc<Front>,
}

// === impl Broker ===

impl Broker {
    /// Builds the broker context, installs the hooks and binds every listener.
    ///
    /// # Errors
    /// [`BrokerError`] when a listener cannot be bound or the TLS files cannot be used.
    pub async fn build(
        settings: &Settings,
        pki: &Pki,
        revoked_serials: Vec<String>,
        revoked_terminals: Vec<String>,
        events: mpsc::UnboundedSender<BrokerEvent>,
        seen: Seen,
    ) -> Result<Broker, BrokerError> {
        // rmqtt's own busy check refuses CONNECTs when the machine's load is high, which is
        // exactly when a reconnect storm must get through; our handshake bound does that job.
        let scx = ServerContext::new().busy_check_enable(false).build().await;
        rmqtt_retainer::register(&scx, true, false)
            .await
            .map_err(|e| BrokerError::Start(e.into()))?;

        let revoked = Arc::new(Revoked {
            serials: RwLock::new(revoked_serials.iter().map(|s| Serial::parse(s)).collect()),
            terminals: RwLock::new(revoked_terminals.into_iter().collect()),
            suspended: Suspensions::default(),
        });
        let front = Arc::new(Front::new(
            settings.max_connections_per_terminal,
            settings.refused.clone(),
        ));
        let hooks = Arc::new(Hooks {
            revoked: revoked.clone(),
            front: front.clone(),
            front_door: settings.front_door,
            events,
            seen,
            plain_allowed: settings.plain_listen.is_some(),
            refused: settings.refused.clone(),
        });
        let register = scx.extends.hook_mgr().register();
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
            Type::MessagePublish,
            Type::ClientConnected,
            Type::ClientDisconnected,
        ] {
            register.add(typ, Box::new(HookRef(hooks.clone()))).await;
        }
        register.start().await;

        let (mut listeners, mut doors) = (Vec::new(), Vec::new());
        let (mqtt, behind_mqtt, mut ws);
        if settings.front_door {
            // Terminals reach the TLS listeners through the front door; rmqtt serves what it
            // lets through on loopback listeners of its own.
            let verifier = WebPkiClientVerifier::builder_with_provider(
                tls::client_roots(pki)?,
                tls::provider(),
            )
            .build()
            .map_err(TlsError::Verifier)?;
            let verifier = Arc::new(RefuseRevoked {
                inner: verifier,
                revoked: revoked.clone(),
                refused: settings.refused.clone(),
            });
            let tls_config = Arc::new(tls::server_config_with(pki, verifier)?);
            let internal = SocketAddr::from(([127, 0, 0, 1], 0));
            let door = |name, addr, internal: &rmqtt::net::Listener| -> Result<Door, BrokerError> {
                Ok(Door {
                    listener: bind_front(name, addr)?,
                    internal: local(internal, addr),
                    tls: tls_config.clone(),
                    handshake_timeout: settings.handshake_timeout,
                    max_handshaking: settings.max_handshaking,
                    max_connections: settings.max_connections,
                })
            };
            let behind = bind(settings, pki, "mqtt", internal, Kind::Tcp)?;
            doors.push(door("mqtt", settings.listen, &behind)?);
            listeners.push((behind, TLS_LISTENER));
            mqtt = local_std(&doors[0].listener, settings.listen);
            behind_mqtt = Some(doors[0].internal);
            ws = None;
            if let Some(addr) = settings.ws_listen {
                let behind = bind(settings, pki, "mqtt_ws", internal, Kind::Ws)?;
                let d = door("mqtt_ws", addr, &behind)?;
                ws = Some(local_std(&d.listener, addr));
                doors.push(d);
                listeners.push((behind, WSS_LISTENER));
            }
        } else {
            // rmqtt's own TLS listeners.
            let l = bind(settings, pki, "mqtt", settings.listen, Kind::Tls)?;
            mqtt = local(&l, settings.listen);
            behind_mqtt = None;
            listeners.push((l, TLS_LISTENER));
            ws = None;
            if let Some(addr) = settings.ws_listen {
                let l = bind(settings, pki, "mqtt_ws", addr, Kind::Wss)?;
                ws = Some(local(&l, addr));
                listeners.push((l, WSS_LISTENER));
            }
        }
        let mut plain = None;
        if let Some(addr) = settings.plain_listen {
            let l = bind(settings, pki, "mqtt_plain", addr, Kind::Tcp)?;
            plain = Some(local(&l, addr));
            listeners.push((l, PLAIN_LISTENER));
        }
        let handle = Handle {
            scx: scx.clone(),
            revoked,
            front: front.clone(),
        };
        Ok(Broker {
            scx,
            listeners,
            doors,
            front,
            addrs: Addrs {
                mqtt,
                ws,
                plain,
                behind: behind_mqtt,
            },
            handle,
        })
    }

    /// Where the listeners are bound.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// In-process publish and revocation.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs the listeners until `token` is cancelled (rmqtt has no stop call: its task is dropped).
    pub fn spawn(self, tracker: &TaskTracker, token: CancellationToken) {
        let Broker {
            scx,
            listeners,
            doors,
            front,
            addrs,
            ..
        } = self;
        tracing::info!(mqtt_addr = %addrs.mqtt, behind = ?addrs.behind, "MQTT listening (TLS, client certificate required)");
        if let Some(ws) = addrs.ws {
            tracing::info!(mqtt_ws_addr = %ws, "MQTT over secure WebSocket listening (client certificate required)");
        }
        if let Some(plain) = addrs.plain {
            tracing::warn!(
                mqtt_plain_addr = %plain,
                "PLAINTEXT MQTT listening: no encryption, identity is the bare client id; for benchmarks and debugging only"
            );
        }
        let mut server = MqttServer::new(scx);
        for (listener, id) in listeners {
            server = server.listener_by_id(listener, id);
        }
        let server = server.build();
        for door in doors {
            tracker.spawn(
                front
                    .clone()
                    .run(door, tracker.clone(), token.clone())
                    .instrument(tracing::info_span!("mqtt_front")),
            );
        }
        tracker.spawn(
            async move {
                tokio::select! {
                    result = server.run() => {
                        if let Err(e) = result {
                            tracing::error!(error = %e, "MQTT server stopped");
                        }
                    }
                    () = token.cancelled() => {}
                }
            }
            .instrument(tracing::info_span!("broker")),
        );
    }
}

// === impl Handle ===

impl Handle {
    /// Refuses `terminal_id` and its certificate `serial` from now on, and cuts its session.
    pub fn revoke(&self, terminal_id: &str, serial: &str) {
        // A poisoned lock must not skip a revocation.
        self.revoked
            .serials
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(Serial::parse(serial));
        self.revoked
            .terminals
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(terminal_id.to_owned());
        self.front.close_all(terminal_id);
        let (scx, id) = (self.scx.clone(), terminal_id.to_owned());
        tokio::spawn(async move { kick(&scx, &id).await });
    }

    /// Refuses one certificate `serial` of `terminal_id` from now on (a renewal replaced it): in
    /// the TLS handshake (front door) and at CONNECT, and by closing the terminal's connection or
    /// session made with it. The terminal itself stays welcome with its other certificate, and
    /// what it opened with that one stays up.
    pub fn retire(&self, terminal_id: &str, serial: &str) {
        let serial = Serial::parse(serial);
        self.revoked
            .serials
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(serial.clone());
        let closed = self.front.close_serial(terminal_id, &serial);
        if closed > 0 {
            tracing::info!(%terminal_id, %serial, closed, "connections on a replaced certificate closed");
        }
        // Without the front door the certificate is on rmqtt's session itself.
        let (scx, id) = (self.scx.clone(), terminal_id.to_owned());
        tokio::spawn(async move { kick_if_using(&scx, &id, &serial).await });
    }

    /// Adds every serial and terminal id of these lists to the refused ones (revocations are
    /// never undone: a revoked terminal is provisioned again under a new id).
    pub fn set_revoked(&self, serials: &[String], terminal_ids: &[String]) {
        self.revoked
            .serials
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(serials.iter().map(|s| Serial::parse(s)));
        self.revoked
            .terminals
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(terminal_ids.iter().cloned());
    }

    /// Number of connected clients.
    pub fn connections(&self) -> isize {
        self.scx.connections.count()
    }
}

async fn kick(scx: &ServerContext, client_id: &str) {
    let mut entry = scx
        .extends
        .shared()
        .await
        .entry(Id::from(scx.node.id(), ClientId::from(client_id)));
    if entry.session().is_none() {
        return;
    }
    match entry.kick(true, true, true).await {
        Ok(_) => tracing::info!(terminal_id = client_id, "session cut"),
        Err(e) => tracing::warn!(terminal_id = client_id, error = %e, "could not cut the session"),
    }
}

/// Cuts `client_id`'s session if its connection presented the certificate `serial` to rmqtt's
/// own TLS listener (a session behind the front door carries no certificate: the front door
/// closes those, [`Front::close_serial`]).
async fn kick_if_using(scx: &ServerContext, client_id: &str, serial: &Serial) {
    let mut entry = scx
        .extends
        .shared()
        .await
        .entry(Id::from(scx.node.id(), ClientId::from(client_id)));
    let Some(session) = entry.session() else {
        return;
    };
    let uses_it = match session.connect_info().await {
        Ok(ci) => cert_of(&ci)
            .and_then(|c| c.serial.as_deref())
            .is_some_and(|s| Serial::parse(s) == *serial),
        Err(_) => false,
    };
    if !uses_it {
        return;
    }
    match entry.kick(true, true, true).await {
        Ok(_) => {
            tracing::info!(terminal_id = client_id, %serial, "session on a replaced certificate cut");
        }
        Err(e) => tracing::warn!(terminal_id = client_id, error = %e, "could not cut the session"),
    }
}

impl Handle {
    /// An in-process QoS 1 publish from the gateway itself.
    async fn forward(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), PublishError> {
        let publish = CodecPublish {
            dup: false,
            retain,
            qos: QoS::AtLeastOnce,
            topic: topic.clone().into(),
            packet_id: None,
            payload,
            properties: None,
        };
        let publish = Publish::new(
            Box::new(publish),
            None,
            None,
            Some(rmqtt::utils::timestamp_millis()),
        );
        let from = From::from_system(Id::from(self.scx.node.id(), ClientId::from("posgate")));
        SessionState::forwards(&self.scx, from, publish, false, None)
            .await
            .map_err(|e| PublishError {
                topic,
                source: e.into(),
            })
    }
}

impl Publisher for Handle {
    async fn publish_retained(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        self.forward(topic, payload, true).await
    }

    async fn publish(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        self.forward(topic, payload, false).await
    }

    fn suspend(&self, terminal_id: &str, duration: Duration) {
        self.revoked.suspended.suspend(terminal_id, duration);
        // Cut off a moment later, so that the `rate_limited` answers already on their way reach
        // the terminal first: its log then says why it was disconnected. Until then its requests
        // are refused at the cost of a bucket check each.
        let (scx, front, id) = (self.scx.clone(), self.front.clone(), terminal_id.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(SUSPEND_GRACE).await;
            front.close_all(&id);
            kick(&scx, &id).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_normalized() {
        let r = Revoked::default();
        r.serials.write().unwrap().insert(Serial::parse("00ff"));
        assert!(r.contains("x", Some("FF")));
        assert!(!r.contains("x", Some("fe")));
    }

    /// A lock poisoned by a panic elsewhere still answers "revoked" (it used to answer "not
    /// revoked": fail open).
    #[test]
    fn a_poisoned_lock_still_refuses_a_revoked_terminal() {
        let r = std::sync::Arc::new(Revoked::default());
        r.serials.write().unwrap().insert(Serial::parse("ab"));
        r.terminals.write().unwrap().insert("pos_stolen".into());
        for poison in [true, false] {
            let r = r.clone();
            drop(
                std::thread::spawn(move || {
                    let _serials = r.serials.write().unwrap();
                    let _terminals = r.terminals.write().unwrap();
                    assert!(!poison, "poisoning the locks");
                })
                .join(),
            );
        }
        assert!(r.serials.is_poisoned() && r.terminals.is_poisoned());
        assert!(r.contains("pos_stolen", None));
        assert!(r.contains("pos_other", Some("00AB")));
        assert!(!r.contains("pos_other", Some("cd")));
    }
}
