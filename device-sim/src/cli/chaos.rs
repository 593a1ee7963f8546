//! `posgate-sim chaos`: its flags, the [`ChaosOptions`](crate::chaos::ChaosOptions) they make, and
//! the run of [`crate::chaos`] with its report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{UsageError, save};
use crate::chaos;

/// `posgate-sim chaos`.
#[derive(clap::Args)]
pub(super) struct ChaosArgs {
    /// The `posgate` binary (default: `posgate` next to this executable).
    #[arg(long)]
    posgate: Option<PathBuf>,
    /// Simulated terminals.
    #[arg(long, default_value_t = 200)]
    terminals: usize,
    /// How many of them use SSE or WebSocket (half each) instead of MQTT (default: 10 %).
    #[arg(long)]
    http_terminals: Option<usize>,
    /// New webhooks per second (each retried until 200).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of faults and new webhooks.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Seconds between two SIGKILLs, MIN..MAX; each is followed by a restart on the same ports.
    #[arg(long, default_value = "10..30")]
    kill_every: chaos::Every,
    /// No SIGKILLs.
    #[arg(long, conflicts_with = "kill_every")]
    no_kills: bool,
    /// Seconds between two SIGTERM restarts, MIN..MAX (default: none).
    #[arg(long)]
    term_every: Option<chaos::Every>,
    /// Seconds between two drops of 5 % of the terminals' connections, MIN..MAX (default: none).
    #[arg(long)]
    drop_every: Option<chaos::Every>,
    /// Disk-full periods, spread over the soak: the data dir is a tmpfs (needs root), filled
    /// for a while, then freed.
    #[arg(long, default_value_t = 0)]
    disk_full: usize,
    /// Seconds each disk-full period lasts.
    #[arg(long, default_value_t = 10)]
    disk_full_secs: u64,
    /// Size of the tmpfs data dir in MiB (with --disk-full).
    #[arg(long, default_value_t = 2048)]
    tmpfs_mib: u64,
    /// Seconds after the soak for the last retries and deliveries.
    #[arg(long, default_value_t = 60)]
    drain: u64,
    /// Write the report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed of every random choice (terminals, intervals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No line per fault on stderr.
    #[arg(long)]
    quiet: bool,
}

impl ChaosArgs {
    fn options(self) -> anyhow::Result<chaos::ChaosOptions> {
        let posgate = super::posgate_bin(self.posgate)?;
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            anyhow::bail!(UsageError("--rate must be above 0".into()));
        }
        Ok(chaos::ChaosOptions {
            terminals: self.terminals,
            http_terminals: self.http_terminals.unwrap_or(self.terminals / 10),
            rate: self.rate,
            kill_every: (!self.no_kills).then_some(self.kill_every),
            term_every: self.term_every,
            drop_every: self.drop_every,
            disk_full: self.disk_full,
            disk_full_for: Duration::from_secs(self.disk_full_secs),
            tmpfs_mib: self.tmpfs_mib,
            drain: Duration::from_secs(self.drain),
            seed: self.seed,
            verbose: !self.quiet,
            ..chaos::ChaosOptions::new(posgate, Duration::from_secs(self.duration))
        })
    }

    /// Runs `posgate-sim chaos`; the exit code says whether it was clean.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let json = self.report.clone();
        let report = chaos::run(&self.options()?).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        save(&report, json.as_deref(), report.clean)
    }
}
