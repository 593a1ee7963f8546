//! `posgate-sim`: the provider simulator, terminals, the demo and the benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use posgate_sim::bench;

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

#[derive(Subcommand)]
enum Scenario {
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
        },
    }
}
