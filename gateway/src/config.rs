//! Configuration: the file schema, loading in layers, and validation that reports every bad key.
//!
//! Sources, lowest priority first: the embedded `config/posgate.toml`, `$STATE_DIRECTORY` (as
//! `data_dir`, when systemd sets it), `--config FILE`, then `POSGATE__SECTION__KEY` environment
//! variables (lists comma-separated). The environment is passed in ([`Env`]), so tests never touch
//! the process environment.
//!
//! Validation reads the merged tree key by key instead of failing on the first serde error, so
//! `posgate check-config` can list every unknown key and every bad value at once. Secret values are
//! never printed: they are [`SecretString`] in [`Config`] and shown as `<redacted>` in errors.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/posgate.toml");

/// Keys whose values are secrets: never printed, never logged.
const SECRET_KEYS: &[&str] = &[
    "provider.webhook_secrets",
    "provider.api_key",
    "admin.token",
    // May carry a password: shown only with it masked (see `Reader::shown`).
    "store.postgres_url",
];

/// Keys whose environment form is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "provider.webhook_secrets",
    "mqtt.server_names",
    "ingress.cors_allowed_origins",
    "mqtt.external_reload_command",
    "mqtt.external_fallback_urls",
];

/// The validated configuration of the daemon.
#[derive(Clone, Debug)]
pub struct Config {
    /// Database, keys and admin token live here.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub ingress: IngressConfig,
    pub provider: ProviderConfig,
    pub admin: AdminConfig,
    pub mqtt: MqttConfig,
    pub delivery: DeliveryConfig,
    pub rpc: RpcConfig,
    pub store: StoreConfig,
    pub shutdown: ShutdownConfig,
    pub replicas: ReplicasConfig,
    /// Every key with its value as loaded (secrets as a digest), to tell what a reload changed.
    values: Values,
}

/// The loaded values by key; `Debug` shows only how many there are (secrets are among them, as
/// digests, and a digest is not for logs either).
#[derive(Clone, Default, PartialEq, Eq)]
struct Values(std::collections::BTreeMap<String, String>);

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} keys>", self.0.len())
    }
}

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
    /// URL's password) and the TLS of `store.postgres_ca_file`.
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

/// The environment the configuration is read from.
#[derive(Clone, Debug, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    /// The process environment (only the binary calls this).
    pub fn from_process() -> Self {
        Env {
            vars: std::env::vars().collect(),
        }
    }

    /// An explicit environment, for tests and embedding.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// One variable, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    fn posgate_vars(&self) -> config::Map<String, String> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with("POSGATE__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One bad key, as `check-config` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidKey {
    /// Dotted key, e.g. `ingress.listen`.
    pub key: String,
    /// The offending value (`<redacted>` for secrets, empty when the key is missing).
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.reason)
    }
}

/// Why no configuration could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading configuration: {0}")]
    Source(#[source] config::ConfigError),
    #[error("{} invalid configuration key(s):\n{}", .0.len(), list(.0))]
    Invalid(Vec<InvalidKey>),
}

fn list(keys: &[InvalidKey]) -> String {
    keys.iter()
        .map(|k| format!("  {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every bad key (empty for a source error, whose message says what failed).
    pub fn invalid_keys(&self) -> &[InvalidKey] {
        match self {
            ConfigError::Invalid(keys) => keys,
            ConfigError::Source(_) => &[],
        }
    }
}

// === impl Config ===

impl Config {
    /// Loads and validates: embedded default, `$STATE_DIRECTORY`, `file`, then `POSGATE__…`.
    ///
    /// # Errors
    /// [`ConfigError::Source`] when the file cannot be read or parsed; [`ConfigError::Invalid`]
    /// listing every unknown key and every bad value otherwise.
    pub fn load(file: Option<&Path>, env: &Env) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_CONFIG,
            config::FileFormat::Toml,
        ));
        if let Some(dir) = env.get("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
            // systemd may list several directories separated by ':'; ours is the first.
            let first = dir.split(':').next().unwrap_or(dir);
            builder = builder.add_source(config::File::from_str(
                &format!("data_dir = {}", toml::Value::String(first.to_owned())),
                config::FileFormat::Toml,
            ));
        }
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        // Lists are split here rather than by `config` (which only splits with `try_parsing`, and that
        // would also turn a token like "007" into the integer 7).
        let (lists, scalars): (Vec<_>, Vec<_>) = env
            .posgate_vars()
            .into_iter()
            .partition(|(name, _)| LIST_KEYS.contains(&env_key(name).as_str()));
        builder = builder.add_source(
            config::Environment::with_prefix("POSGATE")
                .prefix_separator("__")
                .separator("__")
                .source(Some(scalars.into_iter().collect())),
        );
        for (name, value) in lists {
            let items: Vec<String> = if value.is_empty() {
                Vec::new()
            } else {
                value.split(',').map(|s| s.trim().to_owned()).collect()
            };
            builder = builder
                .set_override(env_key(&name), items)
                .map_err(ConfigError::Source)?;
        }
        let merged = builder.build().map_err(ConfigError::Source)?;
        Config::from_merged(&merged)
    }

    /// Reads every known key from the merged tree, collecting every problem.
    fn from_merged(merged: &config::Config) -> Result<Config, ConfigError> {
        let mut r = Reader {
            merged,
            seen: BTreeSet::new(),
            bad: Vec::new(),
        };

        let data_dir: Option<PathBuf> = r.required("data_dir");
        let log_format = r
            .required::<String>("log.format")
            .and_then(|f| match f.as_str() {
                "plain" => Some(LogFormat::Plain),
                "json" => Some(LogFormat::Json),
                "journald" => Some(LogFormat::Journald),
                _ => r.reject("log.format", "must be \"plain\", \"json\" or \"journald\""),
            });
        let log_level: Option<String> = r.required("log.level");
        if let Some(Err(e)) = log_level
            .as_deref()
            .map(tracing_subscriber::EnvFilter::try_new)
        {
            r.reject::<()>("log.level", &format!("not a tracing filter: {e}"));
        }
        let ingress_listen = r.addr("ingress.listen");
        let body_limit_bytes = r.in_range::<usize>("ingress.body_limit_bytes", 1024, 16 << 20);
        let tolerance_secs = r.in_range::<i64>("ingress.tolerance_secs", 1, 3600);
        let keepalive_secs = r.in_range::<u64>("ingress.keepalive_secs", 1, 3600);
        let ingress_tls = r.required::<bool>("ingress.tls");
        let cors_allowed_origins = r.required::<Vec<String>>("ingress.cors_allowed_origins");
        if let Some(bad) = cors_allowed_origins
            .iter()
            .flatten()
            .find_map(|o| origin_problem(o).map(|why| format!("{o:?}: {why}")))
        {
            r.reject::<()>("ingress.cors_allowed_origins", &bad);
        }

        let webhook_secrets = r
            .optional::<Vec<String>>("provider.webhook_secrets")
            .map(|v| v.unwrap_or_default());
        r.ensure(
            "provider.webhook_secrets",
            &webhook_secrets,
            |secrets| secrets.iter().all(|s| !s.trim().is_empty()),
            "an empty secret is not allowed",
        );
        let api_base = r.required::<String>("provider.api_base");
        r.ensure(
            "provider.api_base",
            &api_base,
            |base| {
                (base.starts_with("http://") || base.starts_with("https://")) && base.len() >= 10
            },
            "must be an http:// or https:// URL",
        );
        let api_key = r.optional::<String>("provider.api_key").flatten();
        r.ensure(
            "provider.api_key",
            &api_key,
            |key| key.starts_with("sk_test_") || key.starts_with("sk_live_"),
            "must start with sk_test_ or sk_live_",
        );
        // A live key is never sent in clear text (a test key may go to a simulator on loopback).
        if let (Some(base), Some(key)) = (&api_base, &api_key)
            && key.starts_with("sk_live_")
            && !base.starts_with("https://")
        {
            r.reject::<()>(
                "provider.api_base",
                "must be https:// with a live key (sk_live_…): the key would travel in clear text",
            );
        }

        let requests_per_minute = r.in_range::<u32>("provider.requests_per_minute", 1, 100_000);
        let reconcile_every_secs = r.in_range::<u64>("provider.reconcile_every_secs", 1, 86_400);
        let reconcile_grace_secs = r.in_range::<u64>("provider.reconcile_grace_secs", 0, 86_400);
        let transactions_every_secs =
            r.in_range::<u64>("provider.transactions_every_secs", 1, 86_400);
        let transactions_overlap_secs =
            r.in_range::<u64>("provider.transactions_overlap_secs", 0, 86_400);
        let rpc_budget_wait_ms = r.in_range::<u64>("provider.rpc_budget_wait_ms", 0, 60_000);

        let admin_listen = r.addr("admin.listen");
        let admin_token = r.optional::<String>("admin.token").flatten();
        r.ensure(
            "admin.token",
            &admin_token,
            |token| {
                token.len() >= 16 && !token.chars().any(|c| c.is_whitespace() || c.is_control())
            },
            "must be at least 16 printable characters without spaces",
        );

        let mqtt_listen = r.addr("mqtt.listen");
        let ws_listen = r.optional_addr("mqtt.ws_listen");
        let plain_listen = r.optional_addr("mqtt.plain_listen");
        let server_names = r.required::<Vec<String>>("mqtt.server_names");
        r.ensure(
            "mqtt.server_names",
            &server_names,
            |names| !names.is_empty() && names.iter().all(|n| !n.trim().is_empty()),
            "needs at least one non-empty name",
        );

        let handshake_timeout_secs = r.in_range::<u64>("mqtt.handshake_timeout_secs", 1, 300);
        let max_handshaking = r.in_range::<usize>("mqtt.max_handshaking", 1, 100_000);
        let max_connections = r.in_range::<usize>("mqtt.max_connections", 1, 1_000_000);
        let max_connections_per_terminal =
            r.in_range::<usize>("mqtt.max_connections_per_terminal", 1, 64);
        let front_door = r.required::<bool>("mqtt.front_door");
        let mode = r
            .required::<String>("mqtt.mode")
            .and_then(|m| match m.as_str() {
                "embedded" => Some(MqttMode::Embedded),
                "external" => Some(MqttMode::External),
                _ => r.reject("mqtt.mode", "must be \"embedded\" or \"external\""),
            });
        let external_url = r.optional::<String>("mqtt.external_url").flatten();
        let parsed_url = external_url.as_deref().map(parse_mqtt_url);
        if let Some(None) = parsed_url {
            r.reject::<()>(
                "mqtt.external_url",
                "must be mqtts://host:port (mqtt://host:port only for tests and benchmarks)",
            );
        }
        let fallback_urls = r
            .optional::<Vec<String>>("mqtt.external_fallback_urls")
            .map(|v| v.unwrap_or_default());
        let fallbacks: Option<Vec<(String, u16)>> = fallback_urls.and_then(|urls| {
            let primary_tls = parsed_url.clone().flatten().map(|(tls, _, _)| tls);
            let parsed: Option<Vec<_>> = urls
                .iter()
                .map(|u| parse_mqtt_url(u).filter(|(tls, _, _)| primary_tls.is_none_or(|p| p == *tls)))
                .map(|u| u.map(|(_, host, port)| (host, port)))
                .collect();
            match parsed {
                Some(list) => Some(list),
                None => r.reject(
                    "mqtt.external_fallback_urls",
                    "each must be host:port URL with the same scheme as mqtt.external_url (mqtts:// or mqtt://)",
                ),
            }
        });
        let kind = r
            .required::<String>("mqtt.external_broker")
            .and_then(|k| match k.as_str() {
                "mosquitto" => Some(BrokerKind::Mosquitto),
                "nats" => Some(BrokerKind::Nats),
                _ => r.reject("mqtt.external_broker", "must be \"mosquitto\" or \"nats\""),
            });
        let external_client_id = r.required::<String>("mqtt.external_client_id");
        r.ensure(
            "mqtt.external_client_id",
            &external_client_id,
            |id| {
                (1..=64).contains(&id.len())
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            },
            "must be 1-64 characters of A-Z a-z 0-9 - _ . :",
        );
        let external_files_dir = r.optional::<PathBuf>("mqtt.external_broker_dir");
        let external_reload_command = r
            .optional::<Vec<String>>("mqtt.external_reload_command")
            .map(|v| v.unwrap_or_default());
        r.ensure(
            "mqtt.external_reload_command",
            &external_reload_command,
            |argv| argv.iter().all(|a| !a.is_empty()),
            "an empty argument is not allowed",
        );
        if mode == Some(MqttMode::External) && external_url.is_none() {
            r.reject::<()>(
                "mqtt.external_url",
                "is required with mqtt.mode = \"external\"",
            );
        }
        let external = match (mode, parsed_url) {
            (Some(MqttMode::External), Some(Some((tls, host, port)))) => Some(ExternalBroker {
                url: external_url.clone().unwrap_or_default(),
                tls,
                host,
                port,
                fallbacks: fallbacks.clone().unwrap_or_default(),
                kind: kind.unwrap_or(BrokerKind::Mosquitto),
                client_id: external_client_id.clone().unwrap_or_default(),
                files_dir: external_files_dir.clone().flatten(),
                reload_command: external_reload_command.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        let republish_after_secs = r.in_range::<u64>("delivery.republish_after_secs", 1, 86_400);

        let queue_depth = r.in_range::<usize>("store.queue_depth", 1, 1 << 20);
        let max_batch = r.in_range::<usize>("store.max_batch", 1, 1 << 16);
        let commit_deadline_ms = r.in_range::<u64>("store.commit_deadline_ms", 100, 600_000);
        let quick_repair = r.required::<bool>("store.quick_repair");
        let retention_hours = r.in_range::<u64>("store.retention_hours", 15, 87_600);
        let backend = r.store_backend();
        let grace_secs = r.in_range::<u64>("shutdown.grace_secs", 0, 3600);
        let lease_secs = r.in_range::<u64>("replicas.lease_secs", 2, 300);
        let replica_id = r.required::<String>("replicas.id");
        r.ensure(
            "replicas.id",
            &replica_id,
            |id| {
                id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            },
            "must be at most 64 characters of A-Z a-z 0-9 - _ . : (empty: hostname, pid and a random suffix)",
        );
        let rpc_per_sec = r.in_range::<u32>("rpc.requests_per_sec", 1, 10_000);
        let rpc_burst = r.in_range::<u32>("rpc.burst", 1, 100_000);
        let rpc_in_flight = r.in_range::<usize>("rpc.max_in_flight", 1, 1_000);
        let flood_suspend_secs = r.in_range::<u64>("rpc.flood_suspend_secs", 0, 86_400);
        let answers_retention_hours = r.in_range::<u64>("rpc.answers_retention_hours", 1, 87_600);

        r.unknown_keys();
        if !r.bad.is_empty() {
            return Err(ConfigError::Invalid(r.bad));
        }
        let config = (|| {
            Some(Config {
                data_dir: data_dir?,
                log: LogConfig {
                    format: log_format?,
                    level: log_level?,
                },
                ingress: IngressConfig {
                    listen: ingress_listen?,
                    body_limit_bytes: body_limit_bytes?,
                    tolerance_secs: tolerance_secs?,
                    keepalive_secs: keepalive_secs?,
                    tls: ingress_tls?,
                    cors_allowed_origins: cors_allowed_origins?,
                },
                provider: ProviderConfig {
                    webhook_secrets: webhook_secrets?
                        .into_iter()
                        .map(SecretString::from)
                        .collect(),
                    api_base: api_base?,
                    api_key: api_key.map(SecretString::from),
                    requests_per_minute: requests_per_minute?,
                    reconcile_every_secs: reconcile_every_secs?,
                    reconcile_grace_secs: reconcile_grace_secs?,
                    transactions_every_secs: transactions_every_secs?,
                    transactions_overlap_secs: transactions_overlap_secs?,
                    rpc_budget_wait_ms: rpc_budget_wait_ms?,
                },
                admin: AdminConfig {
                    listen: admin_listen?,
                    token: admin_token.map(SecretString::from),
                },
                mqtt: MqttConfig {
                    listen: mqtt_listen?,
                    ws_listen: ws_listen?,
                    plain_listen: plain_listen?,
                    server_names: server_names?,
                    handshake_timeout_secs: handshake_timeout_secs?,
                    max_handshaking: max_handshaking?,
                    max_connections: max_connections?,
                    max_connections_per_terminal: max_connections_per_terminal?,
                    front_door: front_door?,
                    mode: mode?,
                    external,
                },
                delivery: DeliveryConfig {
                    republish_after_secs: republish_after_secs?,
                },
                rpc: RpcConfig {
                    requests_per_sec: rpc_per_sec?,
                    burst: rpc_burst?,
                    max_in_flight: rpc_in_flight?,
                    flood_suspend_secs: flood_suspend_secs?,
                    answers_retention_hours: answers_retention_hours?,
                },
                store: StoreConfig {
                    queue_depth: queue_depth?,
                    max_batch: max_batch?,
                    commit_deadline_ms: commit_deadline_ms?,
                    quick_repair: quick_repair?,
                    retention_hours: retention_hours?,
                    backend: backend?,
                },
                shutdown: ShutdownConfig {
                    grace_secs: grace_secs?,
                },
                replicas: ReplicasConfig {
                    lease_secs: lease_secs?,
                    id: replica_id?,
                },
                values: Values::default(),
            })
        })();
        // Every `None` above recorded a bad key, so this is only reached with all values present.
        let mut config = config.ok_or_else(|| ConfigError::Invalid(Vec::new()))?;
        let mut leaves = Vec::new();
        if let config::ValueKind::Table(root) = &merged.cache.kind {
            collect_leaves("", root, &mut leaves);
        }
        config.values = Values(
            leaves
                .into_iter()
                .map(|(key, value)| {
                    let value = if SECRET_KEYS.contains(&key.as_str()) {
                        hex::encode(Sha256::digest(value.as_bytes()))
                    } else {
                        value
                    };
                    (key, value)
                })
                .collect(),
        );
        Ok(config)
    }

    /// The keys whose value differs in `newer` (added or removed keys included), in order.
    pub fn changed_keys(&self, newer: &Config) -> Vec<String> {
        let (old, new) = (&self.values.0, &newer.values.0);
        let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .cloned()
            .collect()
    }
}

/// Reads typed keys out of the merged tree and records what is wrong with them.
struct Reader<'a> {
    merged: &'a config::Config,
    seen: BTreeSet<&'static str>,
    bad: Vec<InvalidKey>,
}

impl Reader<'_> {
    fn shown(&self, key: &str) -> String {
        if key == "store.postgres_url" {
            // Absent: nothing to show.
            return self
                .merged
                .get::<String>(key)
                .map(|url| crate::store::redact_url(&url))
                .unwrap_or_default();
        }
        if SECRET_KEYS.contains(&key) {
            return "<redacted>".to_owned();
        }
        match self.merged.get::<config::Value>(key) {
            Ok(value) => show(&value),
            Err(_) => String::new(),
        }
    }

    /// Records `reason` for `key` when its (present) value fails `ok`.
    fn ensure<T>(&mut self, key: &str, value: &Option<T>, ok: impl Fn(&T) -> bool, reason: &str) {
        if value.as_ref().is_some_and(|v| !ok(v)) {
            self.reject::<()>(key, reason);
        }
    }

    fn reject<T>(&mut self, key: &str, reason: &str) -> Option<T> {
        // serde's messages quote the value ("invalid type: string \"…\""): not for secrets.
        let reason = if SECRET_KEYS.contains(&key) && reason.contains('"') {
            "has the wrong type"
        } else {
            reason
        };
        self.bad.push(InvalidKey {
            key: key.to_owned(),
            value: self.shown(key),
            reason: reason.to_owned(),
        });
        None
    }

    /// `Some(None)` when absent, `None` when present but invalid.
    fn optional<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<Option<T>> {
        self.seen.insert(key);
        match self.merged.get::<config::Value>(key) {
            Err(config::ConfigError::NotFound(_)) => Some(None),
            Err(e) => self.reject(key, &e.to_string()),
            Ok(_) => match self.merged.get::<T>(key) {
                Ok(v) => Some(Some(v)),
                Err(e) => self.reject(key, &strip_key(&e.to_string())),
            },
        }
    }

    fn required<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        match self.optional(key)? {
            Some(v) => Some(v),
            None => self.reject(key, "is required"),
        }
    }

    fn addr(&mut self, key: &'static str) -> Option<SocketAddr> {
        let text: String = self.required(key)?;
        self.parse_addr(key, &text)
    }

    fn optional_addr(&mut self, key: &'static str) -> Option<Option<SocketAddr>> {
        match self.optional::<String>(key)? {
            None => Some(None),
            Some(text) => self.parse_addr(key, &text).map(Some),
        }
    }

    fn parse_addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => self.reject(
                key,
                "not a socket address like 127.0.0.1:8080 or [::1]:8080",
            ),
        }
    }

    fn in_range<T>(&mut self, key: &'static str, min: T, max: T) -> Option<T>
    where
        T: DeserializeOwned + PartialOrd + fmt::Display + Copy,
    {
        let v: T = self.required(key)?;
        if v < min || v > max {
            return self.reject(key, &format!("must be between {min} and {max}"));
        }
        Some(v)
    }

    /// `store.backend` and, for `postgres`, the `store.postgres_url` it needs and the
    /// `store.postgres_ca_file` it may have.
    fn store_backend(&mut self) -> Option<crate::store::Backend> {
        let ca_file = self.optional::<PathBuf>("store.postgres_ca_file");
        let name: String = self.required("store.backend")?;
        let url = self.optional::<String>("store.postgres_url")?;
        match (name.as_str(), url) {
            ("redb", _) => Some(crate::store::Backend::Redb),
            ("postgres", None) => self.reject(
                "store.postgres_url",
                "is required with store.backend = postgres (a URL like postgres://posgate:PASSWORD@db.example:5432/posgate)",
            ),
            ("postgres", Some(url)) if url.parse::<postgres::Config>().is_err() => {
                let why = url
                    .parse::<postgres::Config>()
                    .err()
                    .and_then(|e| std::error::Error::source(&e).map(|s| s.to_string()))
                    .unwrap_or_default();
                // Only option names from the error: the URL may carry a password.
                let reason = if why.contains("`sslmode`") {
                    "sslmode must be disable, prefer or require (for libpq's verify-ca or \
                     verify-full: sslmode=require and store.postgres_ca_file)"
                } else if ["sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword"]
                    .iter()
                    .any(|o| why.contains(&format!("`{o}`")))
                {
                    "the ssl file options of libpq are not read from the URL: set the server's CA \
                     in store.postgres_ca_file (client certificates are not supported)"
                } else {
                    "is not a PostgreSQL connection URL (postgres://user:password@host:port/database)"
                };
                self.reject("store.postgres_url", reason)
            }
            ("postgres", Some(url)) => {
                let tls = self.postgres_tls(&url, ca_file?)?;
                Some(crate::store::Backend::Postgres { url, tls })
            }
            _ => self.reject("store.backend", "must be \"redb\" or \"postgres\""),
        }
    }

    /// `store.postgres_ca_file`, read and checked now (a bad file is a configuration error,
    /// exit 64): verification needs `sslmode=require`, which a server cannot talk its way out of.
    fn postgres_tls(&mut self, url: &str, ca_file: Option<PathBuf>) -> Option<crate::store::PgTls> {
        let Some(path) = ca_file else {
            return Some(crate::store::PgTls::unverified());
        };
        if crate::store::pg_ssl_mode(url) != Some(tokio_postgres::config::SslMode::Require) {
            return self.reject(
                "store.postgres_ca_file",
                "needs sslmode=require in store.postgres_url: with prefer (the default) a server, \
                 or whoever sits in between, can decline TLS and the connection goes on in clear",
            );
        }
        match crate::store::PgTls::from_ca_file(&path) {
            Ok(tls) => Some(tls),
            Err(e) => self.reject("store.postgres_ca_file", &e.to_string()),
        }
    }

    /// Records every leaf key of the merged tree that no reader asked for.
    fn unknown_keys(&mut self) {
        let mut leaves = Vec::new();
        if let config::ValueKind::Table(root) = &self.merged.cache.kind {
            collect_leaves("", root, &mut leaves);
        }
        for (key, _) in leaves {
            let known_section = self.seen.iter().any(|k| k.starts_with(&format!("{key}.")));
            if !self.seen.contains(key.as_str()) && !known_section {
                // Its value is never shown: an unknown key may be a mistyped secret
                // (`provider.api_keys = "sk_live_…"`).
                self.bad.push(InvalidKey {
                    key,
                    value: "<not shown>".to_owned(),
                    reason: "unknown key".to_owned(),
                });
            }
        }
    }
}

fn collect_leaves(
    prefix: &str,
    table: &config::Map<String, config::Value>,
    out: &mut Vec<(String, String)>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            config::ValueKind::Table(inner) if !inner.is_empty() => {
                collect_leaves(&key, inner, out)
            }
            _ => out.push((key, show(value))),
        }
    }
}

/// What is wrong with a CORS origin, if anything. A browser sends `Origin` as
/// `scheme://host[:port]`, lowercase, with no path, and the comparison is exact, so anything else
/// would never match: better an error at start than a page that silently fails.
fn origin_problem(origin: &str) -> Option<&'static str> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Some("must be scheme://host[:port], e.g. https://pos.example");
    };
    if scheme != "http" && scheme != "https" {
        return Some("the scheme must be http or https");
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', '*']) {
        return Some("must be scheme://host[:port]: no path (not even a trailing /), no wildcard");
    }
    if !rest
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:[]".contains(c))
    {
        return Some("the host must be written as a browser sends it: lowercase ASCII (punycode)");
    }
    None
}

/// `POSGATE__PROVIDER__WEBHOOK_SECRETS` → `provider.webhook_secrets`.
fn env_key(name: &str) -> String {
    name.to_lowercase()
        .trim_start_matches("posgate__")
        .replace("__", ".")
}

fn show(value: &config::Value) -> String {
    match &value.kind {
        config::ValueKind::String(s) => format!("{s:?}"),
        config::ValueKind::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(show).collect::<Vec<_>>().join(", ")
            )
        }
        config::ValueKind::Table(_) => "{…}".to_owned(),
        _ => value.to_string(),
    }
}

/// serde errors from `config` repeat the key ("invalid type … for key `x`"); keep the reason.
fn strip_key(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn load_with(file_text: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("posgate.toml");
        if let Some(text) = file_text {
            std::fs::write(&path, text).unwrap();
        }
        Config::load(
            file_text.map(|_| path.as_path()),
            &Env::from_pairs(env.iter().copied()),
        )
    }

    fn bad_keys(err: ConfigError) -> Vec<String> {
        err.invalid_keys().iter().map(|k| k.key.clone()).collect()
    }

    #[test]
    fn the_external_broker_keys_are_parsed_and_checked() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(
            (c.mqtt.mode, c.mqtt.external.is_none()),
            (MqttMode::Embedded, true)
        );
        let c = load_with(
            None,
            &[
                ("POSGATE__MQTT__MODE", "external"),
                ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://broker.lan:8883"),
                (
                    "POSGATE__MQTT__EXTERNAL_BROKER_DIR",
                    "/etc/mosquitto/posgate",
                ),
                (
                    "POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND",
                    "systemctl,reload,mosquitto",
                ),
            ],
        )
        .unwrap();
        let e = c.mqtt.external.unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (true, "broker.lan", 8883));
        assert_eq!(e.client_id, "posgate");
        assert_eq!(e.reload_command, ["systemctl", "reload", "mosquitto"]);
        assert_eq!(
            e.files_dir.as_deref(),
            Some(Path::new("/etc/mosquitto/posgate"))
        );
        assert_eq!((e.kind, e.fallbacks.len()), (BrokerKind::Mosquitto, 0));
        assert!(e.kind.shared_subscriptions());
        let c = load_with(
            None,
            &[
                ("POSGATE__MQTT__MODE", "external"),
                ("POSGATE__MQTT__EXTERNAL_BROKER", "nats"),
                ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://n1:8883"),
                (
                    "POSGATE__MQTT__EXTERNAL_FALLBACK_URLS",
                    "mqtts://n2:8883,mqtts://n3:8884",
                ),
            ],
        )
        .unwrap();
        let e = c.mqtt.external.unwrap();
        assert_eq!(e.kind, BrokerKind::Nats);
        assert!(!e.kind.shared_subscriptions());
        assert_eq!(
            e.fallbacks,
            [("n2".to_owned(), 8883), ("n3".to_owned(), 8884)]
        );
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1883"),
            Some((false, "127.0.0.1".into(), 1883))
        );
        assert_eq!(
            parse_mqtt_url("mqtts://[::1]:8883"),
            Some((true, "::1".into(), 8883))
        );
        for bad in [
            "https://b:1",
            "mqtts://b",
            "mqtts://:1",
            "mqtts://b:0",
            "mqtts://u@b:1",
        ] {
            assert_eq!(parse_mqtt_url(bad), None, "{bad}");
        }
        let err = load_with(
            None,
            &[
                ("POSGATE__MQTT__MODE", "external"),
                ("POSGATE__MQTT__EXTERNAL_CLIENT_ID", "a b"),
                ("POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND", "kill,,1"),
                ("POSGATE__MQTT__EXTERNAL_BROKER", "emqx"),
                ("POSGATE__MQTT__EXTERNAL_FALLBACK_URLS", "http://n2:1"),
            ],
        )
        .unwrap_err();
        let keys = bad_keys(err);
        for key in [
            "mqtt.external_url",
            "mqtt.external_client_id",
            "mqtt.external_reload_command",
            "mqtt.external_broker",
            "mqtt.external_fallback_urls",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(c.ingress.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.mqtt.listen, "0.0.0.0:8883".parse().unwrap());
        assert_eq!(c.ingress.body_limit_bytes, 65536);
        assert_eq!(c.ingress.tolerance_secs, 300);
        assert_eq!(c.shutdown.grace_secs, 10);
        assert_eq!(c.data_dir, PathBuf::from("posgate-data"));
        assert!(c.provider.webhook_secrets.is_empty());
        assert_eq!(c.mqtt.server_names, ["localhost", "127.0.0.1"]);
        assert!(c.mqtt.ws_listen.is_none() && c.mqtt.plain_listen.is_none());
        assert_eq!(c.provider.requests_per_minute, 100);
        assert_eq!(c.provider.rpc_budget_wait_ms, 2000);
        assert_eq!(
            (
                c.provider.transactions_every_secs,
                c.provider.transactions_overlap_secs
            ),
            (900, 600)
        );
    }

    /// `store.backend`: redb by default; postgres only with a URL, whose password is never
    /// shown (not in an error, not in `Debug`).
    #[test]
    fn the_store_backend_and_its_url() {
        use crate::store::Backend;
        assert_eq!(load_with(None, &[]).unwrap().store.backend, Backend::Redb);
        let url = "postgres://posgate:s3cr3t-pw@db.example:5432/posgate";
        let c = load_with(
            None,
            &[
                ("POSGATE__STORE__BACKEND", "postgres"),
                ("POSGATE__STORE__POSTGRES_URL", url),
            ],
        )
        .unwrap();
        assert_eq!(
            c.store.backend,
            Backend::Postgres {
                url: url.into(),
                tls: crate::store::PgTls::unverified()
            }
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("postgres://posgate:***@db.example:5432/posgate"));

        let err = load_with(None, &[("POSGATE__STORE__BACKEND", "postgres")]).unwrap_err();
        let bad = err.invalid_keys();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, "store.postgres_url");
        assert!(
            bad[0]
                .reason
                .contains("required with store.backend = postgres"),
            "{bad:?}"
        );

        let err = load_with(
            Some("[store]\nbackend = \"postgres\"\npostgres_url = \"postgres://u:s3cr3t-pw@h:notaport/db\"\n"),
            &[],
        )
        .unwrap_err();
        let bad = err.invalid_keys();
        assert_eq!(bad[0].key, "store.postgres_url");
        let shown = format!("{err} {bad:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");

        let err = load_with(None, &[("POSGATE__STORE__BACKEND", "sqlite")]).unwrap_err();
        assert_eq!(bad_keys(err), ["store.backend"]);
    }

    /// `store.postgres_ca_file`: read and checked at load (a bad file is a configuration
    /// error naming the key), only with `sslmode=require`; libpq's other ways to say it in the
    /// URL get a reason that points to the key, and never show the password.
    #[test]
    fn the_postgres_ca_file_is_checked_at_load() {
        use crate::store::Backend;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello\n").unwrap();
        let not_der = dir.path().join("not-der.pem");
        std::fs::write(
            &not_der,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let load = |url: &str, ca_file: Option<&Path>| {
            let mut env = vec![
                ("POSGATE__STORE__BACKEND", "postgres".to_owned()),
                ("POSGATE__STORE__POSTGRES_URL", url.to_owned()),
            ];
            if let Some(file) = ca_file {
                env.push((
                    "POSGATE__STORE__POSTGRES_CA_FILE",
                    file.display().to_string(),
                ));
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            load_with(None, &env)
        };
        let require = "postgres://u:s3cr3t-pw@db.example/p?sslmode=require";

        let c = load(require, Some(&ca)).unwrap();
        let Backend::Postgres { tls, .. } = &c.store.backend else {
            panic!("{:?}", c.store.backend)
        };
        assert_eq!(tls.ca_file(), Some(ca.as_path()));
        let Backend::Postgres { tls, .. } = load(require, None).unwrap().store.backend else {
            panic!("not postgres")
        };
        assert_eq!(tls.ca_file(), None);

        for (url, file, says) in [
            (require, dir.path().join("missing.pem"), "cannot read"),
            (require, garbage.clone(), "holds no certificate"),
            (require, not_der.clone(), "cannot be a trust anchor"),
            (
                "postgres://u:s3cr3t-pw@db.example/p",
                ca.clone(),
                "needs sslmode=require",
            ),
            (
                "postgres://u:s3cr3t-pw@db.example/p?sslmode=prefer",
                ca.clone(),
                "needs sslmode=require",
            ),
            (
                "postgres://u:s3cr3t-pw@db.example/p?sslmode=disable",
                ca.clone(),
                "needs sslmode=require",
            ),
        ] {
            let err = load(url, Some(&file)).unwrap_err();
            let bad = err.invalid_keys();
            assert_eq!(bad.len(), 1, "{url} {file:?}: {bad:?}");
            assert_eq!(bad[0].key, "store.postgres_ca_file");
            assert!(bad[0].reason.contains(says), "{says:?}: {bad:?}");
            assert!(!format!("{err} {bad:?}").contains("s3cr3t-pw"));
        }

        for url in [
            "postgres://u:s3cr3t-pw@db.example/p?sslmode=verify-full",
            "postgres://u:s3cr3t-pw@db.example/p?sslmode=require&sslrootcert=/etc/ca.pem",
        ] {
            let err = load(url, None).unwrap_err();
            let bad = err.invalid_keys();
            assert_eq!(bad.len(), 1, "{url}: {bad:?}");
            assert_eq!(bad[0].key, "store.postgres_url");
            assert!(
                bad[0].reason.contains("store.postgres_ca_file"),
                "{url}: {bad:?}"
            );
            assert!(!format!("{err} {bad:?}").contains("s3cr3t-pw"));
        }
        // With redb the key is not used, and not an error.
        assert_eq!(
            load_with(
                None,
                &[(
                    "POSGATE__STORE__POSTGRES_CA_FILE",
                    garbage.to_str().unwrap()
                )]
            )
            .unwrap()
            .store
            .backend,
            Backend::Redb
        );
    }

    #[test]
    fn cors_origins_are_a_list_of_exact_origins() {
        let c = load_with(None, &[]).unwrap();
        assert!(
            c.ingress.cors_allowed_origins.is_empty(),
            "no CORS by default"
        );
        let c = load_with(
            None,
            &[(
                "POSGATE__INGRESS__CORS_ALLOWED_ORIGINS",
                "https://pos.example,http://127.0.0.1:8480,http://[::1]:80",
            )],
        )
        .unwrap();
        assert_eq!(
            c.ingress.cors_allowed_origins,
            [
                "https://pos.example",
                "http://127.0.0.1:8480",
                "http://[::1]:80"
            ]
        );
        let c = load_with(
            Some("[ingress]\ncors_allowed_origins = [\"https://a.example\"]\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.ingress.cors_allowed_origins, ["https://a.example"]);
        for bad in [
            "*",
            "null",
            "pos.example",
            "https://pos.example/",
            "https://pos.example/pos",
            "ftp://pos.example",
            "https://POS.example",
            "https://*.example",
            "https://",
        ] {
            let err =
                load_with(None, &[("POSGATE__INGRESS__CORS_ALLOWED_ORIGINS", bad)]).unwrap_err();
            assert_eq!(bad_keys(err), ["ingress.cors_allowed_origins"], "{bad}");
        }
    }

    #[test]
    fn layers_file_then_env() {
        let c = load_with(
            Some("data_dir = \"/tmp/x\"\n[ingress]\nlisten = \"127.0.0.1:9000\"\ntolerance_secs = 60\n"),
            &[
                ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
                ("POSGATE__PROVIDER__WEBHOOK_SECRETS", "new,old"),
                ("POSGATE__MQTT__SERVER_NAMES", "pos.example,10.0.0.2"),
                ("POSGATE__ADMIN__TOKEN", "007-token-with-leading-zero"),
                ("POSGATE__STORE__MAX_BATCH", "64"),
                ("STATE_DIRECTORY", "/var/lib/posgate"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.ingress.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.ingress.tolerance_secs, 60);
        assert_eq!(
            c.data_dir,
            PathBuf::from("/tmp/x"),
            "the file beats $STATE_DIRECTORY"
        );
        let secrets: Vec<_> = c
            .provider
            .webhook_secrets
            .iter()
            .map(|s| s.expose_secret().to_owned())
            .collect();
        assert_eq!(secrets, ["new", "old"]);
        assert_eq!(c.mqtt.server_names, ["pos.example", "10.0.0.2"]);
        assert_eq!(
            c.admin.token.unwrap().expose_secret(),
            "007-token-with-leading-zero"
        );
        assert_eq!(c.store.max_batch, 64);
    }

    #[test]
    fn state_directory_replaces_the_default_data_dir() {
        let c = load_with(None, &[("STATE_DIRECTORY", "/var/lib/posgate")]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/posgate"));
        let c = load_with(
            None,
            &[("STATE_DIRECTORY", "/a"), ("POSGATE__DATA_DIR", "/b")],
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/b"));
    }

    #[test]
    fn reports_every_bad_key() {
        let err = load_with(
            Some("[ingress]\nlisten = \"localhost:80:80\"\nbody_limit_bytes = \"lots\"\ncolour = \"red\"\n[nope]\nx = 1\n"),
            &[
                ("POSGATE__INGRESS__TOLERANCE_SECS", "0"),
                ("POSGATE__ADMIN__LISTEN", "not-an-address"),
                ("POSGATE__PROVIDER__API_KEY", "pk_wrong"),
                ("POSGATE__LOG__FORMAT", "xml"),
                ("POSGATE__TYPO", "1"),
            ],
        )
        .unwrap_err();
        let mut keys = bad_keys(err);
        keys.sort();
        assert_eq!(
            keys,
            [
                "admin.listen",
                "ingress.body_limit_bytes",
                "ingress.colour",
                "ingress.listen",
                "ingress.tolerance_secs",
                "log.format",
                "nope.x",
                "provider.api_key",
                "typo",
            ]
        );
    }

    #[test]
    fn a_live_key_is_refused_over_plain_http() {
        let err = load_with(
            None,
            &[
                ("POSGATE__PROVIDER__API_KEY", "sk_live_abc"),
                (
                    "POSGATE__PROVIDER__API_BASE",
                    "http://api.stablegenius.co/v1",
                ),
            ],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.invalid_keys().iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["provider.api_base"], "{err}");
        assert!(!err.to_string().contains("sk_live_abc"), "{err}");
        // A test key may talk to a simulator over plain HTTP.
        load_with(
            None,
            &[
                ("POSGATE__PROVIDER__API_KEY", "sk_test_abc"),
                ("POSGATE__PROVIDER__API_BASE", "http://127.0.0.1:9/v1"),
            ],
        )
        .unwrap();
    }

    #[test]
    fn secrets_are_never_shown() {
        let err = load_with(
            None,
            &[
                ("POSGATE__PROVIDER__API_KEY", "sx_supersecret"),
                ("POSGATE__ADMIN__TOKEN", "short secret"),
            ],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains("supersecret") && !text.contains("short secret"),
            "{text}"
        );
        assert!(text.contains("<redacted>"), "{text}");
        let ok = load_with(
            None,
            &[("POSGATE__PROVIDER__WEBHOOK_SECRETS", "whsec_hidden")],
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("whsec_hidden"));
    }

    #[test]
    fn unreadable_file_is_a_source_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/posgate.toml")),
            &Env::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Source(_)), "{err}");
        let err = load_with(Some("this is [not toml"), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Source(_)), "{err}");
    }
}
