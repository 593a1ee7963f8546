//! `posgate-sim fleet`: the POS fleet against a gateway and a provider simulator that already run
//! (in other processes, or on another machine's loopback).
//!
//! N terminals are provisioned through the admin API and connected over mutual TLS; each runs the
//! POS flow of [`crate::pos`]: the cashier creates an intent over the provider's REST API, the
//! customer pays through the simulator's `POST /_sim/pay/{id}`, the terminal waits for the signed
//! confirmation, verifies and acks it. Chaos by flag (disconnects, reboots). The report is the
//! demo's; anything lost makes the exit code non-zero.

use std::sync::Arc;

use serde::Serialize;

use crate::fleet::{Fleet, provision_at};
use crate::pos::{self, PosOptions, Progress, ProgressDisplay, Report};
use crate::remote::{self, RemoteProvider};

/// What `posgate-sim fleet` was asked to do.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// The gateway's admin API (`HOST:PORT` or `http://HOST:PORT`).
    pub admin: String,
    pub admin_token: String,
    /// The gateway's MQTT/TLS listener.
    pub mqtt: String,
    /// The provider's API, `http://ADDR/v1`.
    pub provider_api: String,
    /// The simulator's control endpoint (default: `provider_api` without `/v1`).
    pub provider_control: Option<String>,
    pub api_key: String,
    pub terminals: usize,
    /// Terminal ids are `{prefix}{i}`.
    pub prefix: String,
    /// The POS flow's duration, grace and chaos.
    pub pos: PosOptions,
    /// Show a live progress bar (on a TTY).
    pub progress: bool,
}

/// The fleet's report: the POS figures plus the provider simulator's counters.
#[derive(Debug, Serialize)]
pub struct FleetRunReport {
    #[serde(flatten)]
    pub pos: Report,
    /// `GET /_sim/stats` after the run (null when unreachable).
    pub provider: serde_json::Value,
}

impl FleetRunReport {
    /// Nothing lost, nothing failing verification, and at least one payment made.
    pub fn clean(&self) -> bool {
        self.pos.clean()
    }
}

/// Runs the fleet.
///
/// # Errors
/// When addresses do not resolve, provisioning fails, or terminals do not connect.
pub async fn run(options: &FleetOptions) -> anyhow::Result<FleetRunReport> {
    let admin = remote::resolve(&options.admin).await?;
    let mqtt = remote::resolve(&options.mqtt).await?;
    let provider = Arc::new(RemoteProvider::new(
        &options.provider_api,
        options.provider_control.as_deref(),
        &options.api_key,
    )?);
    let bundles = provision_at(
        admin,
        &options.admin_token,
        &options.prefix,
        options.terminals,
        16,
    )
    .await?;
    let fleet = Fleet::new(bundles, mqtt);
    let progress = Arc::new(Progress::default());
    let display = options
        .progress
        .then(|| ProgressDisplay::start(progress.clone(), options.pos.duration));
    let report = pos::run_with(fleet, provider.clone(), options.pos.clone(), progress).await;
    if let Some(display) = display {
        display.finish();
    }
    let stats = provider.stats().await.unwrap_or(serde_json::Value::Null);
    let mut pos = report?;
    let unauthorized = |kind: &str| {
        stats["delivery"][kind]["unauthorized"]
            .as_u64()
            .unwrap_or(0)
    };
    pos.forged_rejected = unauthorized("forgeries") + unauthorized("stale");
    Ok(FleetRunReport {
        pos,
        provider: stats,
    })
}

/// Prints the report for a person.
pub fn print(report: &FleetRunReport) {
    report.pos.print("posgate-sim fleet");
}
