//! `posgate-sim attack <kind>`: a hostile client run beside the honest load of `bench e2e`,
//! against one gateway, and what it did to the honest terminals.
//!
//! One run: terminals and the attacker's identities are provisioned first; then the honest load
//! ([`Honest`]: N MQTT/TLS terminals, paced signed webhooks, each confirmation matched and timed)
//! runs alone for the quiet phase, and the attack beside it for the attack phase. A confirmation
//! counts in the phase its webhook was sent in, so the quiet phase is the baseline of the same
//! run, on the same gateway and machine. Meanwhile the gateway's open descriptors, RSS, data dir
//! size and log lines are sampled, and a few fresh terminals connect during the attack (a
//! gateway that keeps its sessions but takes no new ones would otherwise look healthy).
//!
//! - here: [`Options`], [`Attack`], [`run`], the [`AttackReport`] and how it is printed.
//! - `mqtt`: idle TLS sockets (with a revoked or a valid certificate), an RPC flood, a
//!   subscription flood, and the fresh terminals' probes.
//! - `http`: slowloris, signature-header amplification, a flood of badly signed webhooks.
//! - `sample`: the gateway process as `/proc` shows it.

mod http;
mod mqtt;
mod sample;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bench::{Latency, new_histogram};
use crate::fleet::{Honest, Pacing, Target, provision};
use crate::http_terminal::Channel;

pub use http::{LogFlood, SignatureAmplification, Slowloris};
pub use mqtt::{IdleSockets, RpcFlood, SubscriptionFlood};

/// The honest side of an attack run.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Honest MQTT/TLS terminals.
    pub terminals: usize,
    /// Their webhooks (sent through both phases).
    pub pacing: Pacing,
    /// The honest load alone, before the attack.
    pub quiet: Duration,
    /// The attack beside the honest load.
    pub duration: Duration,
    /// Fresh terminals connecting during the attack, spread over it.
    pub probes: usize,
}

/// One attack.
pub enum Attack {
    IdleSockets(IdleSockets),
    RpcFlood(RpcFlood),
    SubscriptionFlood(SubscriptionFlood),
    Slowloris(Slowloris),
    SignatureAmplification(SignatureAmplification),
    LogFlood(LogFlood),
}

/// When the attack runs, and the token that ends it (the honest load is over).
pub(crate) struct Window {
    pub(crate) start: Instant,
    /// The end of the attack phase; an attack that holds something (sockets) holds it until
    /// `stop`, which comes after the honest load has drained.
    pub(crate) end: Instant,
    pub(crate) stop: CancellationToken,
}

impl Window {
    /// Seconds from the attack's start to `at`.
    pub(crate) fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }
}

impl Attack {
    /// The name on the command line.
    pub fn kind(&self) -> &'static str {
        match self {
            Attack::IdleSockets(a) if a.revoked => "mqtt-idle-revoked",
            Attack::IdleSockets(_) => "mqtt-idle-valid",
            Attack::RpcFlood(_) => "rpc-flood",
            Attack::SubscriptionFlood(_) => "subscription-flood",
            Attack::Slowloris(_) => "slowloris",
            Attack::SignatureAmplification(_) => "signature-amplification",
            Attack::LogFlood(_) => "log-flood",
        }
    }

    /// What the attacker needs before the run (its terminal, its revocation).
    async fn prepare(&mut self, target: &Target) -> anyhow::Result<()> {
        match self {
            Attack::IdleSockets(a) => a.prepare(target).await,
            Attack::RpcFlood(a) => a.prepare(target).await,
            Attack::SubscriptionFlood(a) => a.prepare(target).await,
            Attack::Slowloris(_) | Attack::SignatureAmplification(_) | Attack::LogFlood(_) => {
                Ok(())
            }
        }
    }

    /// Runs the attack in `window`; its figures.
    async fn run(&self, target: &Target, window: &Window) -> anyhow::Result<serde_json::Value> {
        let figures = match self {
            Attack::IdleSockets(a) => serde_json::to_value(a.run(target, window).await?),
            Attack::RpcFlood(a) => serde_json::to_value(a.run(target, window).await?),
            Attack::SubscriptionFlood(a) => serde_json::to_value(a.run(target, window).await?),
            Attack::Slowloris(a) => serde_json::to_value(a.run(target, window).await?),
            Attack::SignatureAmplification(a) => serde_json::to_value(a.run(target, window).await?),
            Attack::LogFlood(a) => serde_json::to_value(a.run(target, window).await?),
        };
        Ok(figures?)
    }
}

/// Counts of distinct reasons (error messages, without the links rustls adds), for the report.
fn tally(reasons: impl IntoIterator<Item = String>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in reasons {
        let short = r.split(": https://").next().unwrap_or(&r).to_owned();
        *out.entry(short).or_default() += 1;
    }
    out
}

/// The report of `posgate-sim attack`.
#[derive(Debug, Serialize)]
pub struct AttackReport {
    pub kind: String,
    pub honest: HonestFigures,
    pub gateway: sample::GatewayFigures,
    /// Fresh terminals connecting during the attack.
    pub new_terminals: Vec<mqtt::Probe>,
    /// What the attacker did and got.
    pub attack: serde_json::Value,
    /// The goal of issue 16: during the attack, honest confirmations within 2x their quiet p99,
    /// and none lost.
    pub goal_p99_within_2x_quiet: bool,
    pub goal_none_lost: bool,
}

/// The honest terminals' confirmations, by the phase their webhook was sent in.
#[derive(Debug, Serialize)]
pub struct HonestFigures {
    pub terminals: usize,
    pub rate_per_s: u64,
    pub quiet: PhaseFigures,
    pub attack: PhaseFigures,
    pub duplicates: u64,
    /// Messages that failed verification at a terminal.
    pub rejected: u64,
    /// Webhooks the gateway did not answer `200` (not awaited, not lost).
    pub send_errors: u64,
}

/// One phase of the honest load.
#[derive(Debug, Serialize)]
pub struct PhaseFigures {
    pub seconds: f64,
    /// Webhooks answered `200` in this phase.
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Webhook sent -> confirmation verified at its terminal.
    pub latency_ms: Latency,
    /// Confirmations slower than twice the quiet phase's p99.
    pub over_2x_quiet_p99: u64,
}

impl PhaseFigures {
    fn of(h: &Histogram<u64>, lost: u64, seconds: f64, quiet_p99_us: u64) -> PhaseFigures {
        let limit = quiet_p99_us.saturating_mul(2);
        PhaseFigures {
            seconds,
            sent: h.len() + lost,
            delivered: h.len(),
            lost,
            latency_ms: Latency::of(h),
            over_2x_quiet_p99: h.len() - h.count_between(0, limit),
        }
    }
}

/// Runs `attack` beside the honest load on `target`.
///
/// # Errors
/// On setup failures (provisioning, connecting the honest terminals) or when the honest senders
/// fail.
pub async fn run(
    target: &Target,
    opts: &Options,
    mut attack: Attack,
) -> anyhow::Result<AttackReport> {
    attack
        .prepare(target)
        .await
        .context("preparing the attack")?;
    let probe_bundles = provision(target, "attack-probe-", opts.probes, 8).await?;
    let total = opts.quiet + opts.duration;
    let mut honest = Honest::start(
        target,
        opts.terminals,
        opts.pacing,
        total,
        Channel::Mqtt,
        "h",
    )
    .await?;
    let t0 = Instant::now();
    let window = Window {
        start: t0 + opts.quiet,
        end: t0 + total,
        stop: CancellationToken::new(),
    };
    let sampler = sample::Sampler::spawn(target, window.stop.clone());

    let (mut quiet, mut attacked) = (new_histogram()?, new_histogram()?);
    let honest_side = async {
        let result = honest
            .run(|sent, at| {
                let h = if sent.at < window.start {
                    &mut quiet
                } else {
                    &mut attacked
                };
                // Bounded at 60 s, as every latency of the run (a slower one is lost anyway).
                h.saturating_record(at.duration_since(sent.at).as_micros().max(1) as u64);
            })
            .await;
        window.stop.cancel();
        result
    };
    let attack_side = async {
        tokio::select! {
            () = tokio::time::sleep_until(window.start) => {}
            () = window.stop.cancelled() => return (Ok(serde_json::Value::Null), Vec::new()),
        }
        tokio::join!(
            attack.run(target, &window),
            mqtt::probes(&probe_bundles, target.mqtt, &window)
        )
    };
    let (honest_result, (figures, probes)) = tokio::join!(honest_side, attack_side);
    honest_result?;
    let figures = figures.context("running the attack")?;
    let samples = sampler.finish().await;

    let (mut lost_quiet, mut lost_attack) = (0, 0);
    for sent in honest.awaiting() {
        if sent.at < window.start {
            lost_quiet += 1;
        } else {
            lost_attack += 1;
        }
    }
    let report = honest.finish(target);
    let send_errors = report
        .rows
        .first()
        .and_then(|row| row["send_errors"].as_u64())
        .unwrap_or(0);
    let quiet_p99 = quiet.value_at_quantile(0.99);
    let quiet_figures = PhaseFigures::of(&quiet, lost_quiet, opts.quiet.as_secs_f64(), quiet_p99);
    let attack_figures = PhaseFigures::of(
        &attacked,
        lost_attack,
        opts.duration.as_secs_f64(),
        quiet_p99,
    );
    Ok(AttackReport {
        kind: attack.kind().into(),
        goal_p99_within_2x_quiet: attacked.value_at_quantile(0.99) <= quiet_p99.saturating_mul(2),
        goal_none_lost: report.lost == 0,
        honest: HonestFigures {
            terminals: opts.terminals,
            rate_per_s: opts.pacing.rate,
            quiet: quiet_figures,
            attack: attack_figures,
            duplicates: report.duplicates,
            rejected: report.rejected,
            send_errors,
        },
        gateway: samples.figures(t0, window.start, window.end),
        new_terminals: probes,
        attack: figures,
    })
}

/// Prints a report.
pub fn print(report: &AttackReport) {
    let h = &report.honest;
    println!(
        "attack {} beside {} honest terminals at {} webhooks/s: {:.0} s quiet, then {:.0} s of attack",
        report.kind, h.terminals, h.rate_per_s, h.quiet.seconds, h.attack.seconds
    );
    for (name, p) in [("quiet ", &h.quiet), ("attack", &h.attack)] {
        let l = &p.latency_ms;
        println!(
            "  honest, {name}: sent {}, delivered {}, lost {}; p50 {:.2} ms, p99 {:.2}, max {:.2}; {} over 2x the quiet p99",
            p.sent, p.delivered, p.lost, l.p50, l.p99, l.max, p.over_2x_quiet_p99
        );
    }
    println!(
        "  honest: duplicates {}, rejected {}, webhooks not answered 200: {}",
        h.duplicates, h.rejected, h.send_errors
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "  goal: attack p99 <= 2x quiet p99: {}; 0 lost: {}",
        met(report.goal_p99_within_2x_quiet),
        met(report.goal_none_lost)
    );
    sample::print(&report.gateway);
    if !report.new_terminals.is_empty() {
        let connected: Vec<String> = report
            .new_terminals
            .iter()
            .map(|p| match (p.connack_ms, &p.error) {
                (Some(ms), _) => format!("{ms:.1} ms"),
                (None, Some(e)) => format!("failed ({e})"),
                (None, None) => "not tried".into(),
            })
            .collect();
        println!(
            "  fresh terminals during the attack: {} of {} got their CONNACK: {}",
            report
                .new_terminals
                .iter()
                .filter(|p| p.connack_ms.is_some())
                .count(),
            report.new_terminals.len(),
            connected.join(", ")
        );
    }
    if let serde_json::Value::Object(figures) = &report.attack {
        println!("  attacker:");
        for (key, value) in figures {
            println!("    {key}: {value}");
        }
    }
}
