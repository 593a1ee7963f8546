//! Paced webhook senders for end-to-end runs: the [`Pacing`] of the sends (rate, senders,
//! [`Arrivals`]), [`spawn_paced_senders`], the [`SendLog`] of what left and was answered, and
//! [`Paced`], which matches arrivals at the terminals against it and measures the latencies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use hdrhistogram::Histogram;
use posgate_proto::MicroUsdc;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinHandle;

use super::FleetReport;
use super::webhooks::WebhookConn;
use crate::bench::{Latency, new_histogram};
use crate::events::{self, Intent};

/// The sending half of an end-to-end run (`bench e2e`, against posgate or another broker): paced
/// senders, and the webhooks they had accepted, awaiting their terminals.
pub(crate) struct Paced {
    log: SendLog,
    tasks: std::pin::Pin<Box<futures::future::JoinAll<JoinHandle<anyhow::Result<u64>>>>>,
    senders_done: bool,
    send_errors: u64,
    /// Ten seconds past the senders' end (set when they finish): what has not arrived by then is
    /// lost.
    drain_deadline: Option<Instant>,
    /// In case the senders never end (a target that stops answering).
    hard_deadline: Instant,
    /// Webhook sent -> message at the terminal.
    histogram: Histogram<u64>,
    /// The push alone: from the `200` to the terminal (when the `200` came first).
    push: Histogram<u64>,
    /// From when the schedule wanted the webhook sent (a sender held up by a slow answer sends
    /// late; this counts that wait too) to the terminal.
    from_schedule: Histogram<u64>,
    pacing: Pacing,
}

impl Paced {
    /// Starts [`spawn_paced_senders`] to `addr` for `duration`.
    ///
    /// # Errors
    /// When a histogram cannot be made.
    pub(crate) fn start(
        addr: SocketAddr,
        secret: &str,
        terminals: Arc<Vec<String>>,
        pacing: Pacing,
        duration: Duration,
        tag: &str,
    ) -> anyhow::Result<Paced> {
        let log = SendLog::default();
        let tasks = spawn_paced_senders(addr, secret, terminals, pacing, duration, tag, &log);
        Ok(Paced {
            log,
            tasks: Box::pin(futures::future::join_all(tasks)),
            senders_done: false,
            send_errors: 0,
            drain_deadline: None,
            hard_deadline: Instant::now() + duration + Duration::from_secs(60),
            histogram: new_histogram()?,
            push: new_histogram()?,
            from_schedule: new_histogram()?,
            pacing,
        })
    }

    /// Whether the run is over: the senders are done and every accepted webhook has arrived, or
    /// the drain deadline has passed.
    pub(crate) fn over(&self) -> bool {
        let expected = self.log.sent_at.lock().map(|m| m.len()).unwrap_or(0);
        let now = Instant::now();
        (self.senders_done && expected == 0)
            || self.drain_deadline.is_some_and(|d| now > d)
            || now > self.hard_deadline
    }

    /// Resolves when the senders have finished (never again after that), counting their failed
    /// sends. Cancel-safe (for `select!`).
    ///
    /// # Errors
    /// When a sender task failed.
    pub(crate) async fn senders_finished(&mut self) -> anyhow::Result<()> {
        if self.senders_done {
            return std::future::pending().await;
        }
        for r in (&mut self.tasks).await {
            self.send_errors += r??;
        }
        self.senders_done = true;
        self.drain_deadline = Some(Instant::now() + Duration::from_secs(10));
        Ok(())
    }

    /// The message for `intent` arrived at its terminal `at`: records its latencies; `false` when
    /// no accepted webhook was awaiting it (a repeat).
    ///
    /// # Errors
    /// When a latency cannot be recorded.
    pub(crate) fn arrived(&mut self, intent: &str, at: Instant) -> anyhow::Result<bool> {
        Ok(self.arrival(intent, at)?.is_some())
    }

    /// As [`Paced::arrived`], returning when the webhook awaiting it was sent (`None`: a repeat),
    /// for a caller that splits the run into phases.
    ///
    /// # Errors
    /// When a latency cannot be recorded.
    pub(crate) fn arrival(&mut self, intent: &str, at: Instant) -> anyhow::Result<Option<Sent>> {
        let sent = self
            .log
            .sent_at
            .lock()
            .ok()
            .and_then(|mut m| m.remove(intent));
        if let Some(sent) = sent {
            self.histogram
                .record(at.duration_since(sent.at).as_micros().max(1) as u64)?;
            self.from_schedule
                .record(at.duration_since(sent.scheduled).as_micros().max(1) as u64)?;
        }
        let answered = self
            .log
            .answered_at
            .lock()
            .ok()
            .and_then(|mut m| m.remove(intent));
        if let Some(answered) = answered {
            self.push
                .record(at.saturating_duration_since(answered).as_micros().max(1) as u64)?;
        }
        Ok(sent)
    }

    /// The accepted webhooks still awaiting their terminal (at the end: the lost ones).
    pub(crate) fn awaiting(&self) -> Vec<Sent> {
        self.log
            .sent_at
            .lock()
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    /// Counts what is still awaited as lost into `report`, with the latency; returns the row of
    /// the run's figures.
    pub(crate) fn finish(self, report: &mut FleetReport, duration: Duration) -> serde_json::Value {
        report.lost = self.log.sent_at.lock().map(|m| m.len() as u64).unwrap_or(0);
        report.sent = report.delivered + report.lost;
        report.latency_ms = Some(Latency::of(&self.histogram));
        let push = Latency::of(&self.push);
        let scheduled = Latency::of(&self.from_schedule);
        serde_json::json!({
            "rate_per_s": self.pacing.rate, "arrivals": self.pacing.arrivals,
            "senders": self.pacing.senders, "duration_secs": duration.as_secs_f64(), "send_errors": self.send_errors,
            "answered_to_terminal_ms": {"p50": push.p50, "p99": push.p99},
            "scheduled_to_terminal_ms": {"p50": scheduled.p50, "p99": scheduled.p99, "p99.9": scheduled.p999},
            "achieved_per_s": report.sent as f64 / duration.as_secs_f64(),
        })
    }
}

/// When each webhook was sent, and when it was answered `200`, by intent id.
#[derive(Clone, Default)]
pub struct SendLog {
    /// Removed again when the send failed: what remains is what the gateway accepted.
    pub sent_at: Arc<Mutex<HashMap<String, Sent>>>,
    pub answered_at: Arc<Mutex<HashMap<String, Instant>>>,
}

/// When a webhook left, and when the schedule wanted it to.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub scheduled: Instant,
    pub at: Instant,
}

/// How webhooks are sent in a paced benchmark.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct Pacing {
    /// Webhooks per second, all senders together.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,
    /// Concurrent webhook senders (keep-alive connections).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub senders: usize,
    /// When the webhooks leave: evenly spaced (`even`), as independent payments would
    /// (`poisson`: exponential gaps, so they sometimes bunch up), or all senders in step
    /// (`burst`: `senders` webhooks at once, `rate/senders` times a second).
    #[arg(long, value_enum, default_value = "even")]
    pub arrivals: Arrivals,
}

/// The schedule of a paced run's sends, all senders together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// One every `1/rate` seconds: each sender at `senders/rate`, their phases spread evenly
    /// over that period (senders started in step would send in bursts of `senders`).
    Even,
    /// A Poisson process of `rate` per second (each sender one of `rate/senders`).
    Poisson,
    /// Every sender at `senders/rate`, all in the same phase.
    Burst,
}

impl Pacing {
    /// Sender `s`'s schedule: its first send and the gap to each next one.
    fn schedule(self, s: usize) -> impl FnMut() -> Duration {
        let senders = self.senders.max(1);
        let period = Duration::from_secs_f64(senders as f64 / self.rate.max(1) as f64);
        let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
        let arrivals = self.arrivals;
        let mut first = true;
        move || match arrivals {
            Arrivals::Burst if first => {
                first = false;
                Duration::ZERO
            }
            Arrivals::Even if first => {
                first = false;
                period.mul_f64(s as f64 / senders as f64)
            }
            Arrivals::Even | Arrivals::Burst => period,
            // 1 - U is in (0, 1], so the logarithm is finite.
            Arrivals::Poisson => period.mul_f64(-(1.0 - rng.random::<f64>()).ln()),
        }
    }
}

/// `pacing.senders` keep-alive connections to `addr`, together posting `pacing.rate` signed
/// `payment_intent.confirmed` webhooks/s for `duration`, round robin over `terminals`, intent ids
/// `pi_{tag}{sender}_{n}`; each task returns its number of failed sends. A sender waits for each
/// answer; one that falls behind its schedule catches up at once. The schedule starts once every
/// sender is connected.
pub fn spawn_paced_senders(
    addr: SocketAddr,
    secret: &str,
    terminals: Arc<Vec<String>>,
    pacing: Pacing,
    duration: Duration,
    tag: &str,
    log: &SendLog,
) -> Vec<JoinHandle<anyhow::Result<u64>>> {
    let senders = pacing.senders.max(1);
    let connected = Arc::new(tokio::sync::Barrier::new(senders));
    let start = Arc::new(std::sync::OnceLock::new());
    (0..senders)
        .map(|s| {
            let (terminals, log, secret, tag) = (
                terminals.clone(),
                log.clone(),
                secret.to_owned(),
                tag.to_owned(),
            );
            let (connected, start) = (connected.clone(), start.clone());
            let mut gap = pacing.schedule(s);
            tokio::spawn(async move {
                let conn = WebhookConn::connect(addr).await;
                // A sender that could not connect still passes the barrier, or the others
                // would wait forever.
                connected.wait().await;
                let mut conn = conn?;
                let start = *start.get_or_init(tokio::time::Instant::now);
                let end = start + duration;
                let mut next = start + gap();
                let mut k = 0u64;
                let mut errors = 0u64;
                while Instant::now() < end {
                    tokio::time::sleep_until(next).await;
                    let scheduled = next;
                    next += gap();
                    let t = ((k as usize) * senders + s) % terminals.len();
                    let intent = format!("pi_{tag}{s}_{k}");
                    k += 1;
                    let body = events::intent_event(
                        &format!("evt_{intent}"),
                        "confirmed",
                        &Intent::new(&intent, MicroUsdc(4_500_000), &terminals[t]),
                    );
                    if let Ok(mut map) = log.sent_at.lock() {
                        let at = Instant::now();
                        map.insert(intent.clone(), Sent { scheduled, at });
                    }
                    if conn.post(&secret, body).await.is_err() {
                        errors += 1;
                        if let Ok(mut map) = log.sent_at.lock() {
                            map.remove(&intent);
                        }
                    } else if let Ok(mut map) = log.answered_at.lock() {
                        map.insert(intent, Instant::now());
                    }
                }
                anyhow::Ok(errors)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacing(arrivals: Arrivals) -> Pacing {
        Pacing {
            rate: 1000,
            senders: 16,
            arrivals,
        }
    }

    /// 16 senders at 1,000/s: each sends every 16 ms; evenly, their phases are 1 ms apart, so
    /// together one webhook leaves every millisecond (in step they would leave 16 at a time).
    #[test]
    fn even_arrivals_spread_the_senders_phases_and_burst_keeps_them_in_step() {
        let period = Duration::from_millis(16);
        for s in 0..16 {
            let mut even = pacing(Arrivals::Even).schedule(s);
            assert_eq!(
                even(),
                Duration::from_millis(s as u64),
                "sender {s}'s phase"
            );
            assert_eq!(even(), period);
            assert_eq!(even(), period);
            let mut burst = pacing(Arrivals::Burst).schedule(s);
            assert_eq!(burst(), Duration::ZERO);
            assert_eq!(burst(), period);
        }
    }

    /// Poisson gaps average the sender's period, and vary (an exponential's spread equals its
    /// mean): with 20,000 gaps the mean's standard error is under 1 % of it.
    #[test]
    fn poisson_arrivals_keep_the_rate_on_average() {
        let mut gap = pacing(Arrivals::Poisson).schedule(3);
        let gaps: Vec<f64> = (0..20_000).map(|_| gap().as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.016).abs() < 0.016 * 0.05, "mean gap {mean}");
        assert!(
            (var.sqrt() - 0.016).abs() < 0.016 * 0.1,
            "spread {}",
            var.sqrt()
        );
    }
}
