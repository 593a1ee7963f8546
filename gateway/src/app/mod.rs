//! Startup and shutdown: [`Gateway::build`] opens the store and binds every listener (nothing runs
//! yet, so a bad port or an unusable `data_dir` fails before anything is served);
//! [`Gateway::spawn`] starts every task under one `TaskTracker` and returns [`Running`], which knows
//! the bound addresses and drains on [`Running::shutdown`].
//!
//! Shutdown order: stop the listeners (in-flight requests finish within the grace period; the
//! provider retries what is refused), then close the store, which commits what is queued.
//!
//! The parts: `build.rs` ([`Gateway::build`], [`BuildError`]), `spawn.rs` ([`Gateway::spawn`]:
//! the tasks and how they are wired), `revoker.rs` (what a revocation does outside the store),
//! `running.rs` ([`Running`]: reload and shutdown).

use std::net::SocketAddr;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Renewals;
use crate::broker::external::External;
use crate::broker::{Broker, Link};
use crate::channels::TokenIndex;
use crate::config::Config;
use crate::delivery::BrokerEvent;
use crate::ingress::Secrets;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::shutdown::Supervisor;
use crate::store::Store;

mod build;
mod revoker;
mod running;
mod spawn;
#[cfg(test)]
mod tests;

pub use build::BuildError;

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
