//! `posgate-sim demo`: its flags, and the run of [`crate::demo`] with its report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::save;
use crate::demo;

/// `posgate-sim demo`.
#[derive(clap::Args)]
pub(super) struct DemoArgs {
    /// Simulated terminals.
    #[arg(long, default_value_t = 200)]
    terminals: usize,
    /// Seconds during which payments are started.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Multiplies the provider's delays (3 s on-chain confirmation at 1.0).
    #[arg(long, default_value_t = 0.01)]
    time_scale: f64,
    /// No disconnects, reboots, underpayments or faulty webhooks.
    #[arg(long)]
    no_chaos: bool,
    /// No live progress bar.
    #[arg(long)]
    quiet: bool,
    /// Seconds a paid intent may take to reach its terminal before it counts as lost.
    #[arg(long, default_value_t = 20)]
    grace: u64,
    /// The provider drops every webhook (shows that the demo reports loss; for tests).
    #[arg(long, hide = true)]
    drop_all_webhooks: bool,
}

impl DemoArgs {
    /// Runs `posgate-sim demo`; the exit code says whether it was clean.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let DemoArgs {
            terminals,
            duration,
            json,
            time_scale,
            no_chaos,
            quiet,
            grace,
            drop_all_webhooks,
        } = self;
        let options = demo::DemoOptions {
            terminals,
            duration: Duration::from_secs(duration),
            grace: Duration::from_secs(grace),
            time_scale,
            chaos: !no_chaos,
            drop_all_webhooks,
            progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let report = demo::run(&options).await?;
        demo::print(&report);
        save(&report, json.as_deref(), report.pos.clean())
    }
}
