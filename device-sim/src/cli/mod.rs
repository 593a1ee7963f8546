//! The `posgate-sim` command line (in the library, so tests can run it as a process).
//!
//! This file parses the command line, dispatches to the subcommand and maps errors to exit codes
//! (64 for a `UsageError`, 1 otherwise). Each subcommand has a file here with its flags and its
//! run: `demo`, `provider`, `terminal`, `web-pos`, `fleet`, `bridge`, `chaos`, `failover`, `attack` with its
//! kinds, and `bench` with its scenarios.

mod attack;
mod bench;
mod bridge;
mod chaos;
mod demo;
mod failover;
mod fleet;
mod provider;
mod terminal;
mod web_pos;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// The whole system on one machine: gateway + provider simulator + N terminals, live progress,
    /// final report; exit 0 only if nothing was lost.
    Demo(demo::DemoArgs),
    /// The payment provider simulator: REST API under http://ADDR/v1, signed webhooks, faults.
    Provider(provider::ProviderArgs),
    /// One terminal a person can watch: shows the amount and the QR code, waits for the signed
    /// confirmation, shows PAID, EXPIRED, UNDERPAID or CANCELLED.
    Terminal(terminal::TerminalArgs),
    /// The reference web POS (clients/web) for one terminal: a browser page that creates
    /// payments through the gateway, shows the QR code and the verified outcome.
    WebPos(web_pos::WebPosArgs),
    /// N terminals running the POS flow against a running gateway and provider simulator; exit
    /// 0 only if nothing was lost.
    Fleet(fleet::FleetArgs),
    /// A minimal webhook -> MQTT bridge (HMAC check, retained QoS 1 publish, no durable write),
    /// to put another broker (e.g. Mosquitto) side by side with posgate in `bench e2e --broker`.
    Bridge(bridge::BridgeArgs),
    /// A chaos soak of the real `posgate` binary: terminals on MQTT, SSE and WebSocket, webhooks
    /// retried until 200, SIGKILL/SIGTERM restarts on the same ports, terminal drops, a full disk;
    /// exit 0 only if nothing was lost, skipped or invented. `POSGATE__…` variables in the
    /// environment are passed to the daemon.
    Chaos(chaos::ChaosArgs),
    /// Several `posgate` replicas on one PostgreSQL database behind a Mosquitto (external
    /// broker mode), terminals on the broker, webhooks spread over the replicas; one replica at a
    /// time killed with SIGKILL and started again later. Reports kill -> every terminal served
    /// again; exit 0 only if nothing was lost and every terminal was served again.
    Failover(failover::FailoverArgs),
    /// An attack beside the honest load of `bench e2e`, against one gateway it starts: honest
    /// confirmation latency in a quiet phase and during the attack, the gateway's descriptors,
    /// RSS, data dir and log lines, and what the attacker got; exit 0 only if no honest
    /// confirmation was lost.
    Attack {
        #[command(subcommand)]
        kind: attack::Kind,
    },
    /// Measurements; each prints a table and can write a JSON report.
    Bench {
        #[command(subcommand)]
        scenario: bench::Scenario,
    },
}

/// Entry point of the `posgate-sim` binary.
pub fn main() -> ExitCode {
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
            if e.is::<UsageError>() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs the subcommand.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => args.run().await,
        Command::Provider(args) => args.run().await,
        Command::Terminal(args) => args.run().await,
        Command::WebPos(args) => args.run().await,
        Command::Fleet(args) => args.run().await,
        Command::Bridge(args) => args.run().await,
        Command::Chaos(args) => args.run().await,
        Command::Failover(args) => args.run().await,
        Command::Attack { kind } => kind.run().await,
        Command::Bench { scenario } => scenario.run().await,
    }
}

/// Saves a printed report to `json` when given; non-zero exit unless the run was `clean`.
fn save(
    report: &impl serde::Serialize,
    json: Option<&std::path::Path>,
    clean: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(path) = json {
        write_json(path, report)?;
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes a report as pretty JSON to `path`.
fn write_json(path: &std::path::Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The `posgate` binary given with `--posgate PATH`, else the one next to this executable.
///
/// # Errors
/// A [`UsageError`] when it is not given and not there.
fn posgate_bin(given: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let bin = exe.with_file_name("posgate");
    if !bin.exists() {
        anyhow::bail!(UsageError(format!(
            "{} not found: build it (cargo build -p posgate) or pass --posgate PATH",
            bin.display()
        )));
    }
    Ok(bin)
}

/// A problem before serving starts (bad flags, address in use): exit 64.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal(mut term: tokio::signal::unix::Signal) -> anyhow::Result<()> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
