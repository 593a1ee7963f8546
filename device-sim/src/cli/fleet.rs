//! `posgate-sim fleet`: its flags, and the run of [`crate::fleet_cmd`] (the POS fleet against a
//! running gateway and provider simulator) with its report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::save;
use crate::{fleet_cmd, pos, remote};

/// `posgate-sim fleet`: the POS fleet against a running gateway and provider simulator.
#[derive(clap::Args)]
pub(super) struct FleetArgs {
    /// The gateway's admin API, HOST:PORT or http://HOST:PORT.
    #[arg(long)]
    admin: String,
    /// The admin token.
    #[arg(long, env = "POSGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The gateway's MQTT/TLS listener.
    #[arg(long)]
    mqtt: String,
    /// The provider (simulator) API.
    #[arg(long)]
    provider_api: String,
    /// The simulator's control endpoint (default: --provider-api without /v1).
    #[arg(long)]
    provider_control: Option<String>,
    /// API key for the provider's REST API.
    #[arg(long, default_value = remote::DEFAULT_API_KEY)]
    api_key: String,
    /// Simulated terminals.
    #[arg(long, default_value_t = 200)]
    terminals: usize,
    /// Seconds during which payments are started.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds a paid intent may take to reach its terminal before it counts as lost.
    #[arg(long, default_value_t = 20)]
    grace: u64,
    /// Probability per payment that the terminal drops its connection while waiting.
    #[arg(long, default_value_t = 0.0)]
    disconnect_rate: f64,
    /// Probability per payment that the terminal reboots while waiting (same intent id).
    #[arg(long, default_value_t = 0.0)]
    reboot_rate: f64,
    /// Probability per payment that the terminal goes offline for 2 to 6 s while waiting.
    #[arg(long, default_value_t = 0.0)]
    offline_rate: f64,
    /// A connection storm every SECS seconds: all terminals drop and reconnect at once.
    #[arg(long, value_name = "SECS")]
    storm_every: Option<u64>,
    /// Terminal ids are PREFIX0, PREFIX1, … (default: fleet-XXXX- with a random XXXX, so runs
    /// against the same gateway never collide).
    #[arg(long)]
    prefix: Option<String>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No live progress bar.
    #[arg(long)]
    quiet: bool,
}

impl FleetArgs {
    /// Runs `posgate-sim fleet`; the exit code says whether it was clean.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let prefix = self
            .prefix
            .unwrap_or_else(|| format!("fleet-{:04x}-", rand::random::<u16>()));
        let options = fleet_cmd::FleetOptions {
            admin: self.admin,
            admin_token: self.admin_token,
            mqtt: self.mqtt,
            provider_api: self.provider_api,
            provider_control: self.provider_control,
            api_key: self.api_key,
            terminals: self.terminals,
            prefix,
            pos: pos::PosOptions {
                duration: Duration::from_secs(self.duration),
                grace: Duration::from_secs(self.grace),
                disconnect_rate: self.disconnect_rate,
                reboot_rate: self.reboot_rate,
                underpay_rate: 0.0,
                offline_rate: self.offline_rate,
                storm_every: self.storm_every.map(Duration::from_secs),
            },
            progress: !self.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let report = fleet_cmd::run(&options).await?;
        fleet_cmd::print(&report);
        save(&report, self.json.as_deref(), report.clean())
    }
}
