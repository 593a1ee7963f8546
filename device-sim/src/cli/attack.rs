//! `posgate-sim attack <kind>`: each attack's flags, the honest load's (as `bench e2e`'s), and
//! the run of [`crate::attack`] with its report.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::bench::TargetArgs;
use super::save;
use crate::attack::{self, Attack};
use crate::fleet::{self, Pacing};

#[derive(Subcommand)]
pub(super) enum Kind {
    /// Sockets that complete TLS with a REVOKED terminal's certificate and send nothing.
    MqttIdleRevoked(IdleArgs),
    /// Sockets that complete TLS with a valid terminal's certificate and send nothing.
    MqttIdleValid(IdleArgs),
    /// One valid terminal publishing `rpc/req` (unknown_method) as fast as it can.
    RpcFlood(RpcArgs),
    /// One terminal subscribing to many distinct filters under its own topic.
    SubscriptionFlood(SubscriptionArgs),
    /// Many HTTP connections to the ingress, each sending a header byte every few seconds.
    Slowloris(SlowlorisArgs),
    /// Large webhooks with many wrong `X-StableGenius-Signature` headers, at a high rate.
    SignatureAmplification(AmplificationArgs),
    /// A flood of webhooks signed with a wrong secret (how many log lines do they cost?).
    LogFlood(LogFloodArgs),
}

/// The gateway and the honest load beside the attack (100 webhooks/s by default: the machine
/// is shared with the attacker).
#[derive(clap::Args)]
#[command(mut_arg("rate", |a| a.default_value("100")), mut_arg("senders", |a| a.default_value("8")))]
struct Common {
    #[command(flatten)]
    target: TargetArgs,
    /// Honest terminals (MQTT/TLS), as `bench e2e --terminals`.
    #[arg(long, default_value_t = 100)]
    terminals: usize,
    #[command(flatten)]
    pacing: Pacing,
    /// Seconds of honest load alone first (the baseline of the same run).
    #[arg(long, default_value_t = 10)]
    quiet: u64,
    /// Seconds of attack beside the honest load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Fresh terminals connecting during the attack (their CONNACK timed), spread over it.
    #[arg(long, default_value_t = 5)]
    probes: usize,
}

/// `attack mqtt-idle-revoked|mqtt-idle-valid`.
#[derive(clap::Args)]
pub(super) struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Idle sockets to open.
    #[arg(long, default_value_t = 3000)]
    sockets: usize,
    /// TLS handshakes in flight at once while opening them.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
}

/// `attack rpc-flood`.
#[derive(clap::Args)]
pub(super) struct RpcArgs {
    #[command(flatten)]
    common: Common,
    /// Requests to publish.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
}

/// `attack subscription-flood`.
#[derive(clap::Args)]
pub(super) struct SubscriptionArgs {
    #[command(flatten)]
    common: Common,
    /// Distinct filters to subscribe to.
    #[arg(long, default_value_t = 20_000)]
    filters: usize,
}

/// `attack slowloris`.
#[derive(clap::Args)]
pub(super) struct SlowlorisArgs {
    #[command(flatten)]
    common: Common,
    /// Slow connections.
    #[arg(long, default_value_t = 1500)]
    connections: usize,
    /// Seconds between two header bytes of one connection.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
}

/// `attack signature-amplification`.
#[derive(clap::Args)]
pub(super) struct AmplificationArgs {
    #[command(flatten)]
    common: Common,
    /// Attacking webhooks per second, all connections together.
    #[arg(long, default_value_t = 300)]
    attack_rate: u64,
    /// The attacker's keep-alive connections.
    #[arg(long, default_value_t = 16)]
    attack_connections: usize,
    /// Body size of each.
    #[arg(long, default_value_t = 60 * 1024)]
    body_bytes: usize,
    /// Wrong signature headers on each.
    #[arg(long, default_value_t = 90)]
    signatures: usize,
}

/// `attack log-flood`.
#[derive(clap::Args)]
pub(super) struct LogFloodArgs {
    #[command(flatten)]
    common: Common,
    /// Badly signed webhooks to send.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// The attacker's keep-alive connections.
    #[arg(long, default_value_t = 16)]
    attack_connections: usize,
}

impl Kind {
    /// Runs the attack beside the honest load; non-zero exit when honest confirmations were
    /// lost or rejected.
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        let (common, attack) = match self {
            Kind::MqttIdleRevoked(a) => (
                a.common,
                Attack::IdleSockets(attack::IdleSockets::new(true, a.sockets, a.concurrency)),
            ),
            Kind::MqttIdleValid(a) => (
                a.common,
                Attack::IdleSockets(attack::IdleSockets::new(false, a.sockets, a.concurrency)),
            ),
            Kind::RpcFlood(a) => (
                a.common,
                Attack::RpcFlood(attack::RpcFlood::new(a.requests)),
            ),
            Kind::SubscriptionFlood(a) => (
                a.common,
                Attack::SubscriptionFlood(attack::SubscriptionFlood::new(a.filters)),
            ),
            Kind::Slowloris(a) => (
                a.common,
                Attack::Slowloris(attack::Slowloris {
                    connections: a.connections,
                    interval: Duration::from_secs_f64(a.interval.max(0.001)),
                }),
            ),
            Kind::SignatureAmplification(a) => (
                a.common,
                Attack::SignatureAmplification(attack::SignatureAmplification {
                    rate: a.attack_rate.max(1),
                    connections: a.attack_connections,
                    body_bytes: a.body_bytes,
                    signatures: a.signatures,
                }),
            ),
            Kind::LogFlood(a) => (
                a.common,
                Attack::LogFlood(attack::LogFlood {
                    requests: a.requests,
                    connections: a.attack_connections,
                }),
            ),
        };
        let opts = attack::Options {
            terminals: common.terminals,
            pacing: common.pacing,
            quiet: Duration::from_secs(common.quiet),
            duration: Duration::from_secs(common.duration),
            probes: common.probes,
        };
        let target = fleet::Target::new(&common.target.options()).await?;
        let report = attack::run(&target, &opts, attack).await;
        target.stop().await;
        let report = report?;
        attack::print(&report);
        let clean = report.goal_none_lost && report.honest.rejected == 0;
        save(&report, common.target.json.as_deref(), clean)
    }
}
