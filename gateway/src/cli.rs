//! The command line: `run` (default), `print-config`, `check-config`, `broker-config`.
//!
//! Exit codes (`docs/interfaces.md`): 0 clean stop; 64 for what a restart cannot fix (bad usage or
//! config, an unusable `data_dir`, unreadable or invalid certificates); 75 (`EX_TEMPFAIL`) for a
//! start that failed for a reason that may pass (a port in use, a store that cannot be opened yet),
//! which systemd restarts; 1 for a failure at runtime.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::Gateway;
use crate::config::{Config, ConfigError, DEFAULT_CONFIG, Env};
use crate::shutdown::Request;
use crate::systemd::{Notifier, NotifyEnv};

/// `EX_USAGE`: bad usage, configuration or environment; systemd does not restart on it.
pub const EXIT_USAGE: u8 = 64;

/// `EX_TEMPFAIL`: a start that failed for a reason that may pass (a port still in use, a store
/// that cannot be opened yet); systemd restarts it.
pub const EXIT_TEMPFAIL: u8 = 75;

#[derive(Parser)]
#[command(
    name = "posgate",
    version,
    about = "Gets payment confirmations onto point-of-sale terminals"
)]
struct Cli {
    /// Configuration file (TOML), layered over the embedded default.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGTERM or SIGINT (the default).
    Run,
    /// Print the embedded default configuration.
    PrintConfig,
    /// Validate the configuration; list every bad key with its value; exit 0 or 64.
    CheckConfig,
    /// Write an external broker's configuration (mqtt.mode = "external") into a directory.
    BrokerConfig {
        /// The broker: `mosquitto` (Mosquitto 2) or `nats` (one node of a NATS cluster, its
        /// MQTT gateway and JetStream; run once per node with the same --out).
        #[arg(value_parser = ["mosquitto", "nats"])]
        broker: String,
        /// Directory to write into (created if missing); also where posgate keeps the ACL and
        /// CRL (Mosquitto) or the authorization file (NATS) up to date (set
        /// mqtt.external_broker_dir to it).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The broker's MQTT TLS listener.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8883")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        nats: Box<NatsArgs>,
    },
}

/// `broker-config nats`: one node of the cluster.
#[derive(clap::Args)]
struct NatsArgs {
    /// NATS: the node's name (`server_name`, and its file `{name}.conf`).
    #[arg(long, value_name = "NAME", default_value = "nats-1")]
    name: String,
    /// NATS: the core client port (no posgate user may use it).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4222")]
    client_listen: std::net::SocketAddr,
    /// NATS: the cluster listener; without it the node runs alone.
    #[arg(long, value_name = "ADDR")]
    cluster_listen: Option<std::net::SocketAddr>,
    /// NATS: the routes to every node of the cluster (nats-route://host:port), comma-separated.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    routes: Vec<String>,
    /// NATS: the monitoring listener (/healthz, /jsz), if wanted.
    #[arg(long, value_name = "ADDR")]
    monitor_listen: Option<std::net::SocketAddr>,
}

/// Entry point of the `posgate` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage_error = e.use_stderr();
            drop(e.print());
            return if usage_error {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let env = Env::from_process();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig => check_config(cli.config.as_deref(), &env),
        Command::Run => run(cli.config.as_deref(), &env),
        Command::BrokerConfig {
            broker,
            out,
            listen,
            nats,
        } => {
            let NatsArgs {
                name,
                client_listen,
                cluster_listen,
                routes,
                monitor_listen,
            } = *nats;
            if broker == "nats" && cluster_listen.is_none() && !routes.is_empty() {
                eprintln!("posgate: broker-config: --routes needs --cluster-listen");
                return ExitCode::from(EXIT_USAGE);
            }
            let which = if broker == "nats" {
                BrokerFiles::Nats(crate::broker::nats::Node {
                    name,
                    mqtt: listen,
                    client: client_listen,
                    cluster: cluster_listen.map(|c| (c, routes)),
                    monitor: monitor_listen,
                })
            } else {
                BrokerFiles::Mosquitto(listen)
            };
            broker_config(cli.config.as_deref(), &env, &out, &which)
        }
    }
}

fn report_config_error(e: &ConfigError) {
    eprintln!("posgate: invalid configuration");
    if e.invalid_keys().is_empty() {
        eprintln!("  {}", error_chain(e));
    }
    for key in e.invalid_keys() {
        eprintln!("  {key}");
    }
}

/// An error and its sources, `: `-separated (one log line, one message).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Keys SIGHUP applies; a change of any other key is reported as needing a restart.
const RELOADABLE: &[&str] = &["provider.webhook_secrets", "log.level"];

/// SIGHUP with a valid configuration: applies the webhook secrets, the revocations and the log
/// level; names every other changed key (against the configuration the daemon started with) as
/// not applied.
async fn reload(
    running: &crate::app::Running,
    log: Option<&crate::telemetry::LogReload>,
    started_with: &Config,
    config: &Config,
) {
    if let Some(log) = log
        && let Err(e) = log.set_level(&config.log.level)
    {
        tracing::error!(error = %e, level = %config.log.level, "log level not applied");
    }
    if let Err(e) = running.reload(config).await {
        tracing::error!(error = %error_chain(&e), "reload failed; webhook secrets and revocations unchanged");
    }
    let needs_restart: Vec<String> = started_with
        .changed_keys(config)
        .into_iter()
        .filter(|k| !RELOADABLE.contains(&k.as_str()))
        .collect();
    if !needs_restart.is_empty() {
        tracing::warn!(
            keys = %needs_restart.join(", "),
            "reload: these keys changed but take effect only after a restart (systemctl restart posgate); running with their old values"
        );
    }
}

fn check_config(file: Option<&Path>, env: &Env) -> ExitCode {
    let config = match Config::load(file, env) {
        Ok(config) => config,
        Err(e) => {
            report_config_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = probe_data_dir(&config.data_dir) {
        eprintln!("posgate: invalid configuration");
        eprintln!(
            "  data_dir = {:?}: {}",
            config.data_dir,
            error_chain(e.as_ref())
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if config.provider.webhook_secrets.is_empty() {
        eprintln!(
            "posgate: warning: provider.webhook_secrets is empty: every webhook will be answered 401"
        );
    }
    if let Some(external) = &config.mqtt.external {
        if !external.tls {
            eprintln!(
                "posgate: warning: mqtt.external_url is plaintext mqtt://: tests and benchmarks only"
            );
        }
        if external.files_dir.is_none() {
            eprintln!(
                "posgate: warning: mqtt.external_broker_dir is not set: provisioning and revocation will not reach the broker's ACL and CRL"
            );
        }
    }
    if let crate::store::Backend::Postgres { url, tls } = &config.store.backend
        && let Some(warning) = tls.warning(url)
    {
        eprintln!("posgate: warning: {warning}");
    }
    println!("configuration ok");
    ExitCode::SUCCESS
}

/// Which broker `broker-config` writes for.
enum BrokerFiles {
    Mosquitto(std::net::SocketAddr),
    Nats(crate::broker::nats::Node),
}

/// `broker-config mosquitto|nats`: the gateway's PKI (created in `data_dir` if missing, as at a
/// first start) and the files of [`crate::broker::mosquitto::write_config`] or
/// [`crate::broker::nats::write_config`].
fn broker_config(file: Option<&Path>, env: &Env, out: &Path, which: &BrokerFiles) -> ExitCode {
    if let BrokerFiles::Nats(node) = which
        && (node.name.is_empty()
            || !node
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)))
    {
        eprintln!("posgate: broker-config: --name must be letters, digits, - and _");
        return ExitCode::from(EXIT_USAGE);
    }
    let config = match Config::load(file, env) {
        Ok(config) => config,
        Err(e) => {
            report_config_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let out = match std::fs::create_dir_all(out).and_then(|()| out.canonicalize()) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("posgate: cannot use {}: {e}", out.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let written = crate::pki::Pki::load_or_create(&config.data_dir, &config.mqtt.server_names)
        .map_err(|e| error_chain(&e))
        .and_then(|pki| {
            match which {
                BrokerFiles::Mosquitto(listen) => {
                    crate::broker::mosquitto::write_config(&pki, &out, *listen)
                        .map(|()| (crate::broker::mosquitto::CONF_FILE.to_owned(), "mosquitto"))
                }
                BrokerFiles::Nats(node) => crate::broker::nats::write_config(&pki, &out, node)
                    .map(|()| (format!("{}.conf", node.name), "nats")),
            }
            .map_err(|e| error_chain(&e))
        });
    match written {
        Ok((conf, kind)) => {
            println!(
                "wrote {}/{conf}; set mqtt.mode = \"external\", mqtt.external_broker = \"{kind}\", mqtt.external_broker_dir = {:?} and mqtt.external_reload_command",
                out.display(),
                out.display().to_string()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("posgate: broker-config: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `data_dir` can be created and written.
fn probe_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).context("cannot create it")?;
    let probe = dir.join(".posgate-write-probe");
    std::fs::write(&probe, b"probe").context("cannot write into it")?;
    std::fs::remove_file(&probe).context("cannot remove the write probe")?;
    Ok(())
}

fn run(file: Option<&Path>, env: &Env) -> ExitCode {
    let config = match Config::load(file, env) {
        Ok(config) => config,
        Err(e) => {
            report_config_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let log_reload = crate::telemetry::init(&config.log, env.get("JOURNAL_STREAM").is_some());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("posgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (file, env) = (file.map(Path::to_path_buf), env.clone());
    runtime.block_on(async move {
        let grace = Duration::from_secs(config.shutdown.grace_secs);
        let mut signals = match crate::shutdown::Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("posgate: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        };
        let started_with = config.clone();
        let gateway = match Gateway::build(config).await {
            Ok(gateway) => gateway,
            Err(e) => {
                let transient = e.is_transient();
                tracing::error!(error = %error_chain(&e), transient, "cannot start");
                eprintln!("posgate: cannot start: {}", error_chain(&e));
                return ExitCode::from(if transient { EXIT_TEMPFAIL } else { EXIT_USAGE });
            }
        };
        let running = gateway.spawn();
        let token = running.token();
        // systemd (Type=notify): ready now that every listener is bound; watchdog while healthy.
        let notifier = Arc::new(Notifier::from_env(
            &NotifyEnv::from_process(),
            std::process::id(),
        ));
        notifier.ready(&format!(
            "serving: ingress {}, admin {}, mqtt {}",
            running.ingress_addr, running.admin_addr, running.mqtt_addr
        ));
        let store = running.store().clone();
        let stop_watchdog = CancellationToken::new();
        notifier.spawn_watchdog(move || store.is_healthy(), stop_watchdog.clone());
        loop {
            tokio::select! {
                request = signals.recv() => match request {
                    Request::Stop(name) => {
                        tracing::info!(signal = name, "shutting down");
                        break;
                    }
                    Request::Reload => match Config::load(file.as_deref(), &env) {
                        Ok(config) => {
                            reload(&running, log_reload.as_ref(), &started_with, &config).await;
                        }
                        Err(e) => tracing::error!(error = %error_chain(&e), "reload refused: invalid configuration; nothing changed"),
                    },
                },
                () = token.cancelled() => {
                    tracing::info!("shutdown requested");
                    break;
                }
            }
        }
        notifier.stopping("draining");
        let failed = running.failed();
        running.shutdown(grace).await;
        // Pings continued through the drain (bounded by grace_secs < WatchdogSec); now they stop.
        stop_watchdog.cancel();
        match failed {
            // A task died: a failure at runtime, which systemd restarts.
            Some(task) => {
                tracing::error!(task, "stopped because a background task panicked");
                ExitCode::from(1)
            }
            None => ExitCode::SUCCESS,
        }
    })
}
