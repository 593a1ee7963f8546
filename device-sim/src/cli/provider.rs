//! `posgate-sim provider` (interfaces.md, "Simulator contract"): its flags, the
//! [`ProviderConfig`](crate::provider::ProviderConfig) they make, and serving until SIGINT or
//! SIGTERM, then printing the counters.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::{UsageError, wait_for_signal};
use crate::provider;

/// `posgate-sim provider` (interfaces.md, "Simulator contract").
#[derive(clap::Args)]
pub(super) struct ProviderArgs {
    /// Address to listen on; the API lives under http://ADDR/v1.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Where webhooks go, e.g. http://127.0.0.1:8080/webhooks/stablegenius.
    #[arg(long)]
    webhook_url: String,
    /// Webhook signing secret; give it twice (old, then new) for a rotation overlap.
    #[arg(long = "webhook-secret", required = true)]
    webhook_secrets: Vec<String>,
    /// The only API key accepted (default: any sk_test_… or sk_live_… key).
    #[arg(long)]
    api_key: Option<String>,
    /// Multiplies every provider delay (confirmation, ttl, retry schedule).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// On-chain confirmation delay in milliseconds, before scaling.
    #[arg(long, default_value_t = 3000)]
    confirm_delay_ms: u64,
    /// Probability of sending a delivery twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate_rate: f64,
    /// Send duplicates at the same instant, with identical headers.
    #[arg(long)]
    simultaneous_duplicates: bool,
    /// Hold events back and send them shuffled.
    #[arg(long)]
    reorder: bool,
    /// How long --reorder holds events back, in milliseconds (not scaled).
    #[arg(long, default_value_t = 500)]
    reorder_window_ms: u64,
    /// Probability that an event is never delivered (dropped after the final attempt).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Probability of first sending a copy with a 400 s old timestamp.
    #[arg(long, default_value_t = 0.0)]
    stale_rate: f64,
    /// Probability of first sending a copy with a wrong signature.
    #[arg(long, default_value_t = 0.0)]
    bad_signature_rate: f64,
    /// Probability of first sending a copy with an empty signature (`sha256=`).
    #[arg(long, default_value_t = 0.0)]
    empty_signature_rate: f64,
    /// Sign some retries and duplicates with the older secret (needs two --webhook-secret).
    #[arg(long)]
    rotate_secret: bool,
    /// Probability that a /v1 request is answered with an injected 5xx.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Probability that a create is answered 500 after the intent was created.
    #[arg(long, default_value_t = 0.0)]
    fail_after_rate: f64,
    /// Answer 429 beyond this many /v1 requests per minute.
    #[arg(long)]
    rate_limit_per_minute: Option<u32>,
    /// Send `Retry-After: 1` with a 429.
    #[arg(long)]
    retry_after: bool,
    /// Answer a repeated idempotency key (same body) 409 with the original intent, not 200.
    #[arg(long)]
    replay_409: bool,
    /// Give intents a qr_payload for the wrong chain (the gateway must refuse it).
    #[arg(long)]
    bad_qr: bool,
    /// Merchant of transfers to unknown addresses.
    #[arg(long, default_value = "mer_sim")]
    merchant_id: String,
}

impl ProviderArgs {
    fn config(self) -> provider::ProviderConfig {
        let mut config = provider::ProviderConfig::new(self.webhook_url, String::new());
        config.listen = self.listen;
        config.webhook_secrets = self
            .webhook_secrets
            .into_iter()
            .map(secrecy::SecretString::from)
            .collect();
        config.api_key = self.api_key.map(secrecy::SecretString::from);
        config.time_scale = self.time_scale;
        config.confirm_delay = Duration::from_millis(self.confirm_delay_ms);
        config.reorder_window = Duration::from_millis(self.reorder_window_ms);
        config.merchant_id = self.merchant_id;
        config.faults = provider::Faults {
            duplicate_rate: self.duplicate_rate,
            simultaneous_duplicates: self.simultaneous_duplicates,
            reorder: self.reorder,
            drop_rate: self.drop_rate,
            stale_rate: self.stale_rate,
            bad_signature_rate: self.bad_signature_rate,
            empty_signature_rate: self.empty_signature_rate,
            rotate_secret: self.rotate_secret,
        };
        config.api_faults = provider::ApiFaults {
            fail_rate: self.fail_rate,
            fail_after_rate: self.fail_after_rate,
            rate_limit_per_minute: self.rate_limit_per_minute,
            retry_after: self.retry_after,
            replay_409: self.replay_409,
            bad_qr: self.bad_qr,
        };
        config
    }

    /// Runs `posgate-sim provider`.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        // Before anything listens, so a SIGTERM right after start stops cleanly.
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let running = provider::ProviderSim::start(self.config())
            .await
            .map_err(|e| anyhow::anyhow!(UsageError(format!("{e:#}"))))?;
        eprintln!(
            "posgate-sim provider: API at {}, control at {}/_sim",
            running.api_base(),
            running.control_base()
        );
        wait_for_signal(term).await?;
        let stats = running.stats();
        running.shutdown(Duration::from_secs(5)).await;
        println!("{}", serde_json::to_string_pretty(&stats)?);
        Ok(ExitCode::SUCCESS)
    }
}
