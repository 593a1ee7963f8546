//! `posgate-sim demo`: the whole system on one machine, with a little chaos, and a report.
//!
//! Starts the provider simulator and the gateway in this process (temporary data dir, loopback
//! ports), provisions N terminals through the admin API, connects them over mutual TLS, runs the
//! POS flow ([`crate::pos`]) with disconnects, reboots, underpayments and forged, stale and
//! duplicate webhooks, and ends with the report of interfaces.md. Nothing may be lost.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use posgate::Gateway;
use posgate::config::{Config, Env};
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::fleet::{Fleet, provision_at};
use crate::pos::{self, PosOptions, Progress, ProgressDisplay, Report};
use crate::provider::{Faults, ProviderConfig, ProviderSim};

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub terminals: usize,
    pub duration: Duration,
    /// How long a paid intent may take to reach its terminal before it counts as lost.
    pub grace: Duration,
    /// Multiplies the provider's delays (on-chain confirmation, retries, expiry).
    pub time_scale: f64,
    /// Chaos: terminal disconnects and reboots, faulty webhook deliveries.
    pub chaos: bool,
    /// The provider never delivers a webhook. The demo's intents are created at the provider (not
    /// through the gateway), so the gateway never hears of them and the demo must report them lost.
    pub drop_all_webhooks: bool,
    /// Show a live progress bar.
    pub progress: bool,
}

/// The demo's report: the POS figures plus what the provider and the gateway saw.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    #[serde(flatten)]
    pub pos: Report,
    /// Webhook deliveries the provider simulator attempted, and how the gateway answered.
    pub provider: serde_json::Value,
}

/// Runs the demo.
///
/// # Errors
/// When a part cannot start.
pub async fn run(options: &DemoOptions) -> anyhow::Result<DemoReport> {
    const SECRET: &str = "whsec_demo_posgate";
    let dir = tempfile::tempdir().context("creating a temporary data dir")?;

    let mut provider_config = ProviderConfig::new("http://127.0.0.1:9/unused", SECRET);
    provider_config.time_scale = options.time_scale;
    if options.chaos {
        provider_config.faults = Faults {
            duplicate_rate: 0.1,
            simultaneous_duplicates: true,
            bad_signature_rate: 0.03,
            empty_signature_rate: 0.02,
            stale_rate: 0.02,
            ..Faults::default()
        };
    }
    if options.drop_all_webhooks {
        provider_config.faults.drop_rate = 1.0;
    }
    let provider = Arc::new(
        ProviderSim::start(provider_config)
            .await
            .context("starting the provider simulator")?,
    );

    let data_dir = dir.path().join("data").display().to_string();
    let api_base = provider.api_base();
    let env = Env::from_pairs([
        ("POSGATE__DATA_DIR", data_dir.as_str()),
        ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
        ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0"),
        ("POSGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET),
        ("POSGATE__PROVIDER__API_BASE", api_base.as_str()),
        ("POSGATE__DELIVERY__REPUBLISH_AFTER_SECS", "5"),
        // The simulator has no rate limit: let reconciliation look intents up at once.
        ("POSGATE__PROVIDER__API_KEY", "sk_test_demo"),
        ("POSGATE__PROVIDER__REQUESTS_PER_MINUTE", "60000"),
    ]);
    let config = Config::load(None, &env).context("the demo's gateway configuration")?;
    let running = Gateway::build(config)
        .await
        .context("starting the gateway")?
        .spawn();
    provider.set_webhook_url(format!(
        "http://{}/webhooks/stablegenius",
        running.ingress_addr
    ));
    let token = running.admin_token().expose_secret().to_owned();

    let bundles = provision_at(running.admin_addr, &token, "pos-", options.terminals, 16).await?;
    let fleet = Fleet::new(bundles, running.mqtt_addr);
    let progress = Arc::new(Progress::default());
    let display = options
        .progress
        .then(|| ProgressDisplay::start(progress.clone(), options.duration));
    let chaos = if options.chaos { 0.05 } else { 0.0 };
    let pos_options = PosOptions {
        duration: options.duration,
        grace: options.grace,
        disconnect_rate: chaos,
        reboot_rate: chaos,
        // An underpayment only emits `transaction.created`: the gateway learns the intent by asking
        // the provider (reconciliation), and the terminal shows UNRESOLVED (underpaid).
        underpay_rate: if options.chaos { 0.05 } else { 0.0 },
        offline_rate: if options.chaos { 0.02 } else { 0.0 },
        storm_every: None,
    };
    let report = pos::run(fleet, provider.clone(), pos_options, progress).await;
    if let Some(display) = display {
        display.finish();
    }
    let stats = provider.stats();
    running.shutdown(Duration::from_secs(5)).await;
    let mut pos = report?;
    pos.forged_rejected = stats.delivery.forgeries.unauthorized + stats.delivery.stale.unauthorized;
    let provider_view = serde_json::to_value(&stats).unwrap_or_default();
    Ok(DemoReport {
        pos,
        provider: provider_view,
    })
}

/// Prints the report for a person.
pub fn print(report: &DemoReport) {
    report.pos.print("posgate demo");
}
