//! The fleet benchmarks (`posgate-sim bench connect|storm|churn|e2e`): each provisions terminals
//! on a [`Target`], drives a [`Fleet`] through its scenario and returns a [`FleetReport`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::bail;

use super::webhooks::WebhookSender;
use super::{Fleet, FleetEvent, FleetReport, Paced, Pacing, Sent, Target, provision};
use crate::http_terminal::Channel;
use crate::terminal::Seen;

/// `bench connect`: N new mutual-TLS terminals, `concurrency` connecting at a time.
///
/// # Errors
/// On setup failures or when terminals do not connect.
pub async fn connect_rate(
    target: &Target,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<FleetReport> {
    let bundles = provision(target, "bench-c-", n, 32).await?;
    let mut fleet = Fleet::new(bundles, target.mqtt);
    let cpu_before = target.cpu_secs();
    let started = Instant::now();
    let mut connected = 0usize;
    let mut started_count = 0usize;
    while started_count < n.min(concurrency.max(1)) {
        fleet.start(started_count)?;
        started_count += 1;
    }
    while connected < n {
        match tokio::time::timeout(Duration::from_secs(60), fleet.next_event()).await {
            Ok(Some(FleetEvent {
                seen: Seen::Connected,
                ..
            })) => {
                connected += 1;
                if started_count < n {
                    fleet.start(started_count)?;
                    started_count += 1;
                }
            }
            Ok(Some(_)) => {}
            _ => bail!("only {connected} of {n} connected"),
        }
    }
    let took = started.elapsed();
    let rate = n as f64 / took.as_secs_f64();
    let mut report = FleetReport {
        scenario: "connect".into(),
        terminals: n,
        ..Default::default()
    };
    // What each connection cost the gateway (the TLS handshake, CONNECT, two subscriptions): a
    // figure the machine's other load disturbs less than the rate.
    let cpu_ms_per_terminal = cpu_before
        .zip(target.cpu_secs())
        .map(|(before, after)| (after - before) * 1000.0 / n as f64);
    report.rows.push(serde_json::json!({"concurrency": concurrency, "seconds": took.as_secs_f64(), "per_second": rate, "gateway_cpu_ms_per_terminal": cpu_ms_per_terminal}));
    report.gateway_rss_mib.extend(target.rss_mib());
    Ok(report)
}

/// `bench storm`: every round, all N terminals drop, each gets a confirmation while offline, then
/// all reconnect at once (retrying on their own); the round ends when every one has its
/// confirmation.
///
/// # Errors
/// On setup failures, or when a round does not complete within `timeout`.
pub async fn storm(
    target: &Target,
    n: usize,
    rounds: usize,
    timeout: Duration,
) -> anyhow::Result<FleetReport> {
    let bundles = provision(target, "bench-s-", n, 32).await?;
    let mut fleet = Fleet::new(bundles, target.mqtt);
    let mut report = FleetReport {
        scenario: "storm".into(),
        terminals: n,
        ..Default::default()
    };
    let sender = WebhookSender::new(target.ingress, &target.secret, 16).await?;
    for round in 0..rounds {
        for i in 0..n {
            fleet.kill(i);
        }
        // One pending confirmation each, committed before anyone reconnects.
        let intents: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    fleet.bundles[i].terminal_id.clone(),
                    format!("pi_s{round}_{i}"),
                )
            })
            .collect();
        sender.send_all(&intents).await?;
        let cpu_before = target.cpu_secs();
        let started = Instant::now();
        for i in 0..n {
            fleet.start(i)?;
        }
        let mut waiting: std::collections::HashSet<usize> = (0..n).collect();
        let mut connected = std::collections::HashSet::new();
        let mut all_connected = None;
        while !waiting.is_empty() {
            let left = timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, fleet.next_event()).await {
                Ok(Some(FleetEvent {
                    terminal,
                    seen: Seen::Confirmation(c),
                    ..
                })) => {
                    if c.intent_id == format!("pi_s{round}_{terminal}") {
                        waiting.remove(&terminal);
                        report.delivered += 1;
                    }
                }
                Ok(Some(FleetEvent {
                    terminal,
                    seen: Seen::Connected,
                    ..
                })) => {
                    connected.insert(terminal);
                    if connected.len() == n {
                        all_connected = Some(started.elapsed());
                    }
                }
                Ok(Some(FleetEvent {
                    seen: Seen::Duplicate { .. },
                    ..
                })) => report.duplicates += 1,
                Ok(Some(FleetEvent {
                    seen: Seen::Rejected(_),
                    ..
                })) => report.rejected += 1,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!(
                    "round {round}: {} of {n} confirmations missing after {timeout:?} \
                     ({} of {n} terminals connected; first missing: {:?})",
                    waiting.len(),
                    connected.len(),
                    waiting.iter().take(5).collect::<Vec<_>>()
                ),
            }
        }
        let took = started.elapsed();
        report.sent += n as u64;
        let rss = target.rss_mib();
        report.gateway_rss_mib.extend(rss);
        report.rows.push(serde_json::json!({
            "round": round + 1,
            "all_delivered_secs": took.as_secs_f64(),
            "all_connected_secs": all_connected.map(|d| d.as_secs_f64()),
            "gateway_rss_mib": rss,
            "gateway_cpu_secs": cpu_before.zip(target.cpu_secs()).map(|(b, a)| a - b),
        }));
    }
    report.lost = report.sent - report.delivered;
    Ok(report)
}

/// `bench churn`: N connected, then `cycles` times `k` of them drop and reconnect; RSS after each.
///
/// # Errors
/// On setup failures or when terminals do not reconnect.
pub async fn churn(
    target: &Target,
    n: usize,
    k: usize,
    cycles: usize,
) -> anyhow::Result<FleetReport> {
    let bundles = provision(target, "bench-r-", n, 32).await?;
    let mut fleet = Fleet::new(bundles, target.mqtt);
    fleet.connect_all(1000, Duration::from_secs(120)).await?;
    let mut report = FleetReport {
        scenario: "churn".into(),
        terminals: n,
        ..Default::default()
    };
    let baseline = target.rss_mib();
    report.gateway_rss_mib.extend(baseline);
    report
        .rows
        .push(serde_json::json!({"cycle": 0, "connected": n, "gateway_rss_mib": baseline}));
    for cycle in 1..=cycles {
        let which: Vec<usize> = (0..k).map(|j| (cycle * k + j) % n).collect();
        for &i in &which {
            fleet.kill(i);
        }
        for &i in &which {
            fleet.start(i)?;
        }
        let took = fleet
            .wait_connected(&which, Duration::from_secs(120))
            .await?;
        let rss = target.rss_mib();
        report.gateway_rss_mib.extend(rss);
        report.rows.push(serde_json::json!({
            "cycle": cycle, "reconnected": k, "reconnect_secs": took.as_secs_f64(), "gateway_rss_mib": rss,
        }));
    }
    Ok(report)
}

/// `bench e2e`: N connected terminals, R webhooks/s spread over them for `duration`; the time from
/// the webhook being sent to the signed confirmation being verified at its terminal.
///
/// # Errors
/// On setup failures.
pub async fn e2e(
    target: &Target,
    n: usize,
    pacing: Pacing,
    duration: Duration,
    channel: Channel,
) -> anyhow::Result<FleetReport> {
    let mut honest = Honest::start(target, n, pacing, duration, channel, "e").await?;
    honest.run(|_, _| {}).await?;
    Ok(honest.finish(target))
}

/// The load of `bench e2e`, also run beside the attacks of `posgate-sim attack`: N connected
/// terminals and paced webhooks to them, each matched with its confirmation.
pub struct Honest {
    fleet: Fleet,
    paced: Paced,
    report: FleetReport,
    channel: Channel,
    duration: Duration,
}

impl Honest {
    /// Provisions `n` terminals `bench-{tag}-{i}`, connects them over `channel`, and starts the
    /// paced senders (intent ids `pi_{tag}…`), which send for `duration` from now.
    ///
    /// # Errors
    /// On setup failures.
    pub async fn start(
        target: &Target,
        n: usize,
        pacing: Pacing,
        duration: Duration,
        channel: Channel,
        tag: &str,
    ) -> anyhow::Result<Honest> {
        let bundles = provision(target, &format!("bench-{tag}-"), n, 32).await?;
        let mut fleet = Fleet::over(bundles, channel, target.mqtt, target.ingress);
        fleet.connect_all(1000, Duration::from_secs(120)).await?;
        let terminals: Arc<Vec<String>> = Arc::new(
            fleet
                .bundles
                .iter()
                .map(|b| b.terminal_id.clone())
                .collect(),
        );
        let paced = Paced::start(
            target.ingress,
            &target.secret,
            terminals,
            pacing,
            duration,
            tag,
        )?;
        let report = FleetReport {
            scenario: "e2e".into(),
            terminals: n,
            ..Default::default()
        };
        Ok(Honest {
            fleet,
            paced,
            report,
            channel,
            duration,
        })
    }

    /// Matches confirmations with what was sent until the senders are done and every accepted
    /// webhook arrived (or the drain deadline passed); `on_arrival(sent, at)` for each first
    /// arrival.
    ///
    /// # Errors
    /// When a sender task failed or a latency could not be recorded.
    pub async fn run(&mut self, mut on_arrival: impl FnMut(Sent, Instant)) -> anyhow::Result<()> {
        let (paced, report) = (&mut self.paced, &mut self.report);
        while !paced.over() {
            tokio::select! {
                result = paced.senders_finished() => result?,
                event = self.fleet.next_event() => match event {
                    Some(FleetEvent { seen: Seen::Confirmation(c), at, .. }) => {
                        if let Some(sent) = paced.arrival(&c.intent_id, at)? {
                            report.delivered += 1;
                            on_arrival(sent, at);
                        }
                    }
                    Some(FleetEvent { seen: Seen::Duplicate { .. }, .. }) => report.duplicates += 1,
                    Some(FleetEvent { seen: Seen::Rejected(_), .. }) => report.rejected += 1,
                    Some(_) => {}
                    None => break,
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        Ok(())
    }

    /// The accepted webhooks still awaiting their terminal.
    pub fn awaiting(&self) -> Vec<Sent> {
        self.paced.awaiting()
    }

    /// The report: what is still awaited counts as lost.
    pub fn finish(self, target: &Target) -> FleetReport {
        let mut report = self.report;
        let mut row = self.paced.finish(&mut report, self.duration);
        report.gateway_rss_mib.extend(target.rss_mib());
        row["channel"] = serde_json::json!(self.channel);
        report.rows.push(row);
        report
    }
}
