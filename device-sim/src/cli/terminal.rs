//! `posgate-sim terminal`: its flags, and the run of [`crate::watch`] (one terminal a person can
//! watch).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::UsageError;
use crate::{remote, watch};

/// `posgate-sim terminal`: one terminal a person can watch.
#[derive(clap::Args)]
pub(super) struct TerminalArgs {
    /// The terminal's id (provisioned with it; the intent's `metadata.terminal_id`).
    #[arg(long)]
    id: String,
    /// The gateway's admin API, HOST:PORT or http://HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin: String,
    /// The admin token.
    #[arg(long, env = "POSGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The gateway's MQTT/TLS listener (default: the bundle's mqtt_url).
    #[arg(long)]
    mqtt: Option<String>,
    /// A provisioning bundle: used when the file exists, written (mode 0600) after provisioning
    /// when it does not.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Merchant the terminal is registered under.
    #[arg(long, default_value = "mer_sim")]
    merchant_id: String,
    /// The provider (simulator) API.
    #[arg(long, default_value = "http://127.0.0.1:8090/v1")]
    provider_api: String,
    /// The simulator's control endpoint (default: --provider-api without /v1).
    #[arg(long)]
    provider_control: Option<String>,
    /// API key for the provider's REST API.
    #[arg(long, default_value = remote::DEFAULT_API_KEY)]
    api_key: String,
    /// The amount to charge, in USD (exact decimal).
    #[arg(long, default_value = "4.40")]
    amount: String,
    /// Intent time to live in seconds, before the provider's time scale (default: 300).
    #[arg(long)]
    ttl: Option<u64>,
    /// The customer pays by themselves after --pay-after-ms (through POST /_sim/pay/{id}).
    #[arg(long)]
    pay: bool,
    /// How long the customer takes to pay with --pay.
    #[arg(long, default_value_t = 3000)]
    pay_after_ms: u64,
    /// What the customer pays with --pay (default: the amount due; less shows UNDERPAID).
    #[arg(long)]
    pay_amount: Option<String>,
    /// Seconds to wait for the outcome.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

impl TerminalArgs {
    /// Runs `posgate-sim terminal`.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let options = watch::WatchOptions {
            amount: watch::parse_amount(&self.amount)
                .map_err(|e| anyhow::anyhow!(UsageError(format!("--amount: {e:#}"))))?,
            pay_amount: self
                .pay_amount
                .as_deref()
                .map(watch::parse_amount)
                .transpose()
                .map_err(|e| anyhow::anyhow!(UsageError(format!("--pay-amount: {e:#}"))))?,
            id: self.id,
            admin: self.admin,
            admin_token: self.admin_token,
            mqtt: self.mqtt,
            bundle: self.bundle,
            merchant_id: self.merchant_id,
            provider_api: self.provider_api,
            provider_control: self.provider_control,
            api_key: self.api_key,
            ttl_secs: self.ttl,
            pay: self.pay,
            pay_after: Duration::from_millis(self.pay_after_ms),
            timeout: Duration::from_secs(self.timeout),
        };
        watch::run(&options).await?;
        Ok(ExitCode::SUCCESS)
    }
}
