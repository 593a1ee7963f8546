//! The typed sections of [`super::Config`], one struct per `[section]` of the file.

use std::net::SocketAddr;
use std::path::PathBuf;

use secrecy::SecretString;

/// `[log]`.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive.
    pub level: String,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
    /// Plain lines with their syslog priority in front (`<3>…`), for journald; chosen by itself
    /// under systemd (`$JOURNAL_STREAM`) with `plain`.
    Journald,
}

/// `[ingress]`: the provider-facing webhook listener.
#[derive(Clone, Debug)]
pub struct IngressConfig {
    pub listen: SocketAddr,
    pub body_limit_bytes: usize,
    pub tolerance_secs: i64,
    /// How often the terminals' SSE streams get a keep-alive comment and WebSockets a ping.
    pub keepalive_secs: u64,
    /// Serve TLS on this listener (the gateway's server certificate; client certificates of the
    /// gateway CA optional, and then a terminal's identity).
    pub tls: bool,
    /// Web origins (`https://pos.example`) whose pages may call the terminal API from a browser;
    /// empty: no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
}

/// `[provider]`.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// Any of these verifies a webhook (several while rotating).
    pub webhook_secrets: Vec<SecretString>,
    pub api_base: String,
    pub api_key: Option<SecretString>,
    /// The provider's rate limit for our key; the gateway budgets 80 % of it, a quarter of that
    /// for reconciliation.
    pub requests_per_minute: u32,
    /// How often open intents are checked for what the webhooks may have missed.
    pub reconcile_every_secs: u64,
    /// How long past `expires_at` (or past an exact transfer) an open intent is looked up again.
    pub reconcile_grace_secs: u64,
    /// How often the provider's recent transactions are listed, for transfers no webhook
    /// announced.
    pub transactions_every_secs: u64,
    /// How far before the last listing's start the next one begins (clock edges, late entries).
    pub transactions_overlap_secs: u64,
    /// How long a terminal's request waits for the request budget before it is refused.
    pub rpc_budget_wait_ms: u64,
}

/// `[admin]`.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When `None`, the token is generated into `data_dir/admin.token`.
    pub token: Option<SecretString>,
}

/// `[mqtt]`: terminal-facing listeners.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    pub ws_listen: Option<SocketAddr>,
    pub plain_listen: Option<SocketAddr>,
    pub server_names: Vec<String>,
    pub handshake_timeout_secs: u64,
    pub max_handshaking: usize,
    pub max_connections: usize,
    pub max_connections_per_terminal: usize,
    pub front_door: bool,
    /// Whether terminals connect to the embedded broker or to an external one.
    pub mode: MqttMode,
    /// `external` mode: the broker posgate connects to as a backend client.
    pub external: Option<ExternalBroker>,
}

/// `mqtt.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttMode {
    /// rmqtt inside the daemon, with its listeners (the default).
    Embedded,
    /// A broker run by the operator (Mosquitto 2, a NATS cluster); posgate runs no MQTT listener.
    External,
}

/// `mqtt.external_broker`: which broker posgate keeps the files of, and what it can rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// Mosquitto 2: an ACL and a CRL file; shared subscriptions (`$share/…`).
    Mosquitto,
    /// NATS (its MQTT gateway): an authorization include file, one user per certificate subject;
    /// plain subscriptions (NATS accepts `$share/…` and delivers nothing to it).
    Nats,
}

impl BrokerKind {
    /// Whether posgate takes the terminals' messages from shared subscriptions.
    pub fn shared_subscriptions(self) -> bool {
        self == BrokerKind::Mosquitto
    }
}

/// `mqtt.external_*`: the external broker and how posgate keeps its files up to date.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalBroker {
    /// `mqtts://host:port` (or `mqtt://` for tests and benchmarks only).
    pub url: String,
    /// Whether the URL is `mqtts://`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `mqtt.external_fallback_urls` as `(host, port)`, same scheme as `url`: after a failed
    /// connection posgate tries the next one (`url` first, then these, round and round).
    pub fallbacks: Vec<(String, u16)>,
    /// `mqtt.external_broker`.
    pub kind: BrokerKind,
    /// The prefix of posgate's MQTT client id at the broker (a random part is added at each
    /// start, see `broker::external`).
    pub client_id: String,
    /// Where posgate keeps the broker's ACL and CRL files (`acl`, `crl.pem`) up to date.
    pub files_dir: Option<PathBuf>,
    /// Run (no shell) after those files changed, so the broker re-reads them.
    pub reload_command: Vec<String>,
}

/// Splits `mqtts://host:port` (or `mqtt://`); `None` when it is neither.
pub fn parse_mqtt_url(url: &str) -> Option<(bool, String, u16)> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        (false, url.strip_prefix("mqtt://")?)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 || host.contains(['/', '@', '?', '#', ' ']) {
        return None;
    }
    Some((tls, host.to_owned(), port))
}

/// `[delivery]`: confirmations to terminals.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    pub republish_after_secs: u64,
}

/// `[store]`: group commit of accepted webhooks.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Requests waiting for a commit before ingress answers 503.
    pub queue_depth: usize,
    /// Most requests in one write transaction.
    pub max_batch: usize,
    /// A commit not on disk within this is a stalled store: the webhooks waiting for it are
    /// answered `503`, `/readyz` says `503`, the systemd watchdog pings stop.
    pub commit_deadline_ms: u64,
    /// redb's quick repair: each synced commit also saves the allocator state (with a two-phase
    /// commit), so the open after a crash does not walk the whole database.
    pub quick_repair: bool,
    /// Events (deduplication keys) older than this are pruned; at least 15, past the provider's
    /// last retry of a webhook (14.6 h after its first attempt).
    pub retention_hours: u64,
    /// `store.backend` (`redb` or `postgres`) with `store.postgres_url` (its `Debug` masks the
    /// URL's password) and the TLS of `store.postgres_ca_file`, `store.postgres_cert_file` and
    /// `store.postgres_key_file`.
    pub backend: crate::store::Backend,
}

/// `[rpc]`: what one terminal may ask (MQTT RPC and the HTTP payment endpoints).
#[derive(Clone, Debug)]
pub struct RpcConfig {
    pub requests_per_sec: u32,
    pub burst: u32,
    pub max_in_flight: usize,
    /// 0: a flooding terminal is never disconnected.
    pub flood_suspend_secs: u64,
    /// Stored answers (for retries) older than this are removed.
    pub answers_retention_hours: u64,
}

/// `[replicas]`: several replicas on one PostgreSQL database share delivery by leases on
/// terminal shards (`crate::replicas`); unused with redb.
#[derive(Clone, Debug)]
pub struct ReplicasConfig {
    /// A replica that stops renewing loses its shards this long after its last renewal.
    pub lease_secs: u64,
    /// This replica's name in the lease table; empty: hostname, pid and a random suffix.
    pub id: String,
}

/// `[shutdown]`.
#[derive(Clone, Debug)]
pub struct ShutdownConfig {
    pub grace_secs: u64,
}
