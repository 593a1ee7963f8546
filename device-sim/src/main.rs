//! `posgate-sim`: the provider simulator, terminals, the demo and the benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use posgate_sim::{bench, fleet};

#[derive(Parser)]
#[command(
    name = "posgate-sim",
    version,
    about = "posgate's simulator: provider, terminals, demo, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measurements; each prints a table and can write a JSON report.
    Bench {
        #[command(subcommand)]
        scenario: Scenario,
    },
}

/// Where the gateway under test is (default: start `posgate` from next to this binary).
#[derive(clap::Args)]
struct TargetArgs {
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
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl TargetArgs {
    fn options(&self) -> fleet::TargetOptions {
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
        }
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// Connect rate: N new mutual-TLS terminals, C connecting at a time.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 2000)]
        terminals: usize,
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
    },
    /// Reconnect storms: all N drop, each gets a confirmation while offline, all reconnect at once.
    Storm {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Seconds a round may take before it counts as failed.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// RSS at N connected terminals and its drift over cycles of K reconnecting.
    Churn {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        #[arg(long, default_value_t = 1000)]
        reconnect: usize,
        #[arg(long, default_value_t = 20)]
        cycles: usize,
    },
    /// Webhook sent -> confirmation verified at the terminal, at N terminals and R webhooks/s.
    E2e {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        terminals: usize,
        /// Webhooks per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Concurrent webhook senders (keep-alive connections).
        #[arg(long, default_value_t = 16)]
        senders: usize,
    },
    /// Sustained durable webhooks/s and answer times over real HTTP on 127.0.0.1.
    Ingest {
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
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("posgate-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("posgate-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bench { scenario } => match scenario {
            Scenario::Ingest {
                target,
                admin,
                secret,
                concurrency,
                duration,
                warmup,
                posgate_bin,
                log_level,
                no_baseline,
                pid,
                json,
            } => {
                let opts = bench::IngestOptions {
                    target,
                    admin,
                    secret,
                    concurrency,
                    duration: Duration::from_secs(duration),
                    warmup: Duration::from_secs(warmup),
                    posgate_bin,
                    log_level,
                    no_baseline,
                    pid,
                };
                let report = bench::ingest(&opts).await?;
                bench::print_ingest(&report);
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(ExitCode::SUCCESS)
            }
            Scenario::Connect {
                target,
                terminals,
                concurrency,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report = fleet::connect_rate(&t, terminals, concurrency).await;
                finish(t, report, target.json.as_deref()).await
            }
            Scenario::Storm {
                target,
                terminals,
                rounds,
                timeout,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report =
                    fleet::storm(&t, terminals, rounds, Duration::from_secs(timeout)).await;
                finish(t, report, target.json.as_deref()).await
            }
            Scenario::Churn {
                target,
                terminals,
                reconnect,
                cycles,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report = fleet::churn(&t, terminals, reconnect, cycles).await;
                finish(t, report, target.json.as_deref()).await
            }
            Scenario::E2e {
                target,
                terminals,
                rate,
                duration,
                senders,
            } => {
                let t = fleet::Target::new(&target.options()).await?;
                let report =
                    fleet::e2e(&t, terminals, rate, Duration::from_secs(duration), senders).await;
                finish(t, report, target.json.as_deref()).await
            }
        },
    }
}

/// Prints and saves a fleet report, stops a started gateway; non-zero exit when anything was lost.
async fn finish(
    target: fleet::Target,
    report: anyhow::Result<fleet::FleetReport>,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    target.stop().await;
    let report = report?;
    fleet::print(&report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.lost == 0 && report.rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
