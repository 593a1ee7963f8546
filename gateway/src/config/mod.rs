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

mod reader;
mod sections;

use reader::{Reader, collect_leaves, env_key, origin_problem};
pub use sections::{
    AdminConfig, BrokerKind, DeliveryConfig, ExternalBroker, IngressConfig, LogConfig, LogFormat,
    MqttConfig, MqttMode, ProviderConfig, ReplicasConfig, RpcConfig, ShutdownConfig, StoreConfig,
    parse_mqtt_url,
};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/posgate.toml");

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

#[cfg(test)]
mod tests;
