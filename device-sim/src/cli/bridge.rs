//! `posgate-sim bridge`: its flags, and running [`crate::compare`]'s webhook → MQTT bridge until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{UsageError, wait_for_signal};
use crate::{compare, remote};

/// `posgate-sim bridge`: webhooks in, retained QoS 1 MQTT messages out.
#[derive(clap::Args)]
pub(super) struct BridgeArgs {
    /// Where webhooks are accepted (POST /webhooks/stablegenius); port 0 picks one. The bound
    /// address is the first line on stdout.
    #[arg(long, default_value = "127.0.0.1:8085")]
    listen: SocketAddr,
    /// The MQTT broker, HOST:PORT (plain TCP, or mutual TLS with --certs).
    #[arg(long)]
    broker: String,
    /// Mutual TLS to the broker: a directory with ca.pem, client.pem and client.key.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Accepted webhook secret (repeat while rotating).
    #[arg(long = "webhook-secret", required = true)]
    webhook_secrets: Vec<String>,
    /// Clear a message's retained copy when its terminal acks on terminals/{id}/acks.
    #[arg(long)]
    clear_on_ack: bool,
}

impl BridgeArgs {
    /// Runs `posgate-sim bridge`.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let broker = remote::resolve(&self.broker)
            .await
            .map_err(|e| anyhow::anyhow!(UsageError(format!("--broker: {e:#}"))))?;
        let bridge = compare::start_bridge(compare::BridgeOptions {
            listen: self.listen,
            broker,
            secrets: self
                .webhook_secrets
                .into_iter()
                .map(secrecy::SecretString::from)
                .collect(),
            clear_on_ack: self.clear_on_ack,
            certs: self.certs,
        })
        .await
        .map_err(|e| anyhow::anyhow!(UsageError(format!("{e:#}"))))?;
        // The first line on stdout: what `bench e2e --broker` reads.
        println!("posgate-sim bridge: listening on {}", bridge.addr);
        std::io::Write::flush(&mut std::io::stdout()).ok();
        wait_for_signal(term).await?;
        bridge.stop().await;
        Ok(ExitCode::SUCCESS)
    }
}
