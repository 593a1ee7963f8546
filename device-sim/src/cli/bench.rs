//! `posgate-sim bench …`: the measurements. Each scenario's flags, and the run that drives
//! [`crate::bench`] (ingest) or [`crate::fleet`] (connect, storm, churn, e2e; `e2e --broker`
//! through [`crate::compare`]), prints its table, saves its JSON and picks the exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{UsageError, save, write_json};
use crate::{bench, compare, fleet, remote};

#[derive(Subcommand)]
pub(super) enum Scenario {
    /// Connect rate: N new mutual-TLS terminals, C connecting at a time.
    Connect(ConnectArgs),
    /// Reconnect storms: all N drop, each gets a confirmation while offline, all reconnect at once.
    Storm(StormArgs),
    /// RSS at N connected terminals and its drift over cycles of K reconnecting.
    Churn(ChurnArgs),
    /// Webhook sent -> confirmation verified at the terminal, at N terminals and R webhooks/s.
    E2e(E2eArgs),
    /// Sustained durable webhooks/s and answer times over real HTTP on 127.0.0.1.
    Ingest(IngestArgs),
    /// Bytes of the redb file per webhook and per table, and the repair time after a crash.
    Store(StoreArgs),
}

impl Scenario {
    /// Runs the scenario.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Scenario::Connect(args) => args.run().await,
            Scenario::Storm(args) => args.run().await,
            Scenario::Churn(args) => args.run().await,
            Scenario::E2e(args) => args.run().await,
            Scenario::Ingest(args) => args.run().await,
            Scenario::Store(args) => args.run().await,
        }
    }
}

/// Where the gateway under test is (default: start `posgate` from next to this binary).
#[derive(clap::Args)]
pub(super) struct TargetArgs {
    /// Ingress address of a running gateway (with --admin, --mqtt and --admin-token).
    #[arg(long, requires_all = ["admin", "mqtt", "admin_token"])]
    ingress: Option<SocketAddr>,
    #[arg(long)]
    admin: Option<SocketAddr>,
    #[arg(long)]
    mqtt: Option<SocketAddr>,
    #[arg(long)]
    admin_token: Option<String>,
    /// Webhook secret the gateway accepts.
    #[arg(long, default_value = "whsec_bench")]
    secret: String,
    /// The posgate binary to start (default: next to this one).
    #[arg(long)]
    posgate_bin: Option<PathBuf>,
    /// Log level of the started gateway.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Report the RSS of this process (default: the started gateway).
    #[arg(long)]
    pid: Option<u32>,
    /// Start the gateway on the PostgreSQL store at this URL (`store.backend = "postgres"`)
    /// instead of its embedded redb file; give it an empty database (or one only benches use).
    #[arg(long, conflicts_with = "ingress")]
    postgres_url: Option<String>,
    /// Write the report as JSON.
    #[arg(long)]
    pub(super) json: Option<PathBuf>,
}

impl TargetArgs {
    pub(super) fn options(&self) -> fleet::TargetOptions {
        let addrs = match (self.ingress, self.admin, self.mqtt) {
            (Some(i), Some(a), Some(m)) => Some((i, a, m)),
            _ => None,
        };
        fleet::TargetOptions {
            addrs,
            admin_token: self.admin_token.clone(),
            secret: self.secret.clone(),
            posgate_bin: self.posgate_bin.clone(),
            log_level: self.log_level.clone(),
            pid: self.pid,
            postgres_url: self.postgres_url.clone(),
        }
    }
}

/// `posgate-sim bench connect`.
#[derive(clap::Args)]
pub(super) struct ConnectArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 2000)]
    terminals: usize,
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
}

/// `posgate-sim bench storm`.
#[derive(clap::Args)]
pub(super) struct StormArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seconds a round may take before it counts as failed.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// `posgate-sim bench churn`.
#[derive(clap::Args)]
pub(super) struct ChurnArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    #[arg(long, default_value_t = 1000)]
    reconnect: usize,
    #[arg(long, default_value_t = 20)]
    cycles: usize,
}

/// `posgate-sim bench e2e`.
#[derive(clap::Args)]
pub(super) struct E2eArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    #[command(flatten)]
    pacing: crate::fleet::Pacing,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// How the terminals get their confirmations: MQTT/TLS, or the ingress listener's
    /// Server-Sent Events or WebSocket (bearer token).
    #[arg(long, value_enum, default_value = "mqtt", conflicts_with = "broker")]
    channel: crate::http_terminal::Channel,
    /// Measure another MQTT broker instead (HOST:PORT), fed by `posgate-sim bridge`; --pid
    /// then names the broker's process.
    #[arg(long)]
    broker: Option<String>,
    /// Terminals connect to --broker without TLS.
    #[arg(long, requires = "broker", conflicts_with = "certs")]
    plain: bool,
    /// Terminals (and the bridge) connect to --broker over mutual TLS: a directory with
    /// ca.pem (the broker's CA), client.pem and client.key.
    #[arg(long, requires = "broker")]
    certs: Option<PathBuf>,
    /// A running bridge in front of --broker (default: start one as a child process).
    #[arg(long, requires = "broker")]
    bridge: Option<SocketAddr>,
    /// The started bridge clears retained messages when terminals ack.
    #[arg(long, requires = "broker")]
    clear_on_ack: bool,
}

/// `posgate-sim bench ingest`.
#[derive(clap::Args)]
pub(super) struct IngestArgs {
    /// Ingress address of a running gateway (default: start `posgate` as a child process).
    #[arg(long)]
    target: Option<SocketAddr>,
    /// Admin address of that gateway, for the /healthz baseline.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Webhook secret the gateway accepts.
    #[arg(long, default_value = "whsec_bench")]
    secret: String,
    /// Concurrent senders, one keep-alive connection each.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up seconds per phase.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// The posgate binary to start (default: next to this one).
    #[arg(long)]
    posgate_bin: Option<PathBuf>,
    /// Log level of the started gateway.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Skip the /healthz baseline phase.
    #[arg(long)]
    no_baseline: bool,
    /// Report the RSS of this process (default: the started gateway).
    #[arg(long)]
    pid: Option<u32>,
    /// Start the gateway on the PostgreSQL store at this URL (`store.backend = "postgres"`)
    /// instead of its embedded redb file; give it an empty database (or one only benches use).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

// === impl ConnectArgs, StormArgs, ChurnArgs, E2eArgs, IngestArgs ===

impl ConnectArgs {
    /// Runs `posgate-sim bench connect`.
    async fn run(self) -> anyhow::Result<ExitCode> {
        let t = fleet::Target::new(&self.target.options()).await?;
        let report = fleet::connect_rate(&t, self.terminals, self.concurrency).await;
        finish(t, report, self.target.json.as_deref()).await
    }
}

impl StormArgs {
    /// Runs `posgate-sim bench storm`.
    async fn run(self) -> anyhow::Result<ExitCode> {
        let t = fleet::Target::new(&self.target.options()).await?;
        let timeout = Duration::from_secs(self.timeout);
        let report = fleet::storm(&t, self.terminals, self.rounds, timeout).await;
        finish(t, report, self.target.json.as_deref()).await
    }
}

impl ChurnArgs {
    /// Runs `posgate-sim bench churn`.
    async fn run(self) -> anyhow::Result<ExitCode> {
        let t = fleet::Target::new(&self.target.options()).await?;
        let report = fleet::churn(&t, self.terminals, self.reconnect, self.cycles).await;
        finish(t, report, self.target.json.as_deref()).await
    }
}

impl E2eArgs {
    /// Against the gateway under test, or with `--broker` against another broker fed by a bridge.
    async fn run(self) -> anyhow::Result<ExitCode> {
        let duration = Duration::from_secs(self.duration);
        let Some(broker) = &self.broker else {
            let t = fleet::Target::new(&self.target.options()).await?;
            let report = fleet::e2e(&t, self.terminals, self.pacing, duration, self.channel).await;
            let store = match (&self.target.ingress, &self.target.postgres_url) {
                (Some(_), _) => None,
                (None, Some(_)) => Some("postgres"),
                (None, None) => Some("redb"),
            };
            let report = report.map(|r| fleet::FleetReport { store, ..r });
            return finish(t, report, self.target.json.as_deref()).await;
        };
        if !self.plain && self.certs.is_none() {
            anyhow::bail!(UsageError("--broker needs --plain or --certs DIR".into()));
        }
        let plain = compare::PlainTarget {
            certs: self.certs,
            broker: remote::resolve(broker).await?,
            bridge: self.bridge,
            secret: self.target.secret.clone(),
            broker_pid: self.target.pid,
            clear_on_ack: self.clear_on_ack,
        };
        let report = compare::e2e_plain(&plain, self.terminals, self.pacing, duration).await;
        report_only(report, self.target.json.as_deref())
    }
}

impl IngestArgs {
    /// Runs `posgate-sim bench ingest`.
    async fn run(self) -> anyhow::Result<ExitCode> {
        let opts = bench::IngestOptions {
            target: self.target,
            admin: self.admin,
            secret: self.secret,
            concurrency: self.concurrency,
            duration: Duration::from_secs(self.duration),
            warmup: Duration::from_secs(self.warmup),
            posgate_bin: self.posgate_bin,
            log_level: self.log_level,
            no_baseline: self.no_baseline,
            pid: self.pid,
            postgres_url: self.postgres_url,
        };
        let report = bench::ingest(&opts).await?;
        bench::print_ingest(&report);
        if let Some(path) = self.json {
            write_json(&path, &report)?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Prints and saves a fleet report, stops a started gateway; non-zero exit when anything was lost.
async fn finish(
    target: fleet::Target,
    report: anyhow::Result<fleet::FleetReport>,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    target.stop().await;
    conclude(&report?, fleet::print, json)
}

/// Prints and saves a report measured against another broker; non-zero exit when anything was
/// lost.
fn report_only(
    report: anyhow::Result<fleet::FleetReport>,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    conclude(&report?, compare::print, json)
}

/// Prints a fleet report with `print` and saves it to `json`; non-zero exit when anything was
/// lost or rejected.
fn conclude(
    report: &fleet::FleetReport,
    print: fn(&fleet::FleetReport),
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    print(report);
    save(report, json, report.lost == 0 && report.rejected == 0)
}

/// `posgate-sim bench store`.
#[derive(clap::Args)]
pub(super) struct StoreArgs {
    /// Webhooks written (as `chaos` sends them: a new intent each).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    /// Ingests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Where the temporary store lives (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl StoreArgs {
    async fn run(self) -> anyhow::Result<ExitCode> {
        let bench = crate::store_size::StoreBench {
            events: self.events,
            terminals: self.terminals.max(1),
            concurrency: self.concurrency.max(1),
        };
        let report = bench.run(self.dir.as_deref()).await?;
        crate::store_size::print(&report);
        save(&report, self.json.as_deref(), true)
    }
}
