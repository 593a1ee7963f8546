//! A fleet of simulated terminals, and the benchmarks that need one: connect rate, reconnect
//! storms, RSS and churn, webhook → terminal latency.
//!
//! The gateway runs as a separate process (one process may hold about 20,000 open files here):
//! started by the benchmark (`posgate` next to this executable) or given by address.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use posgate_proto::MicroUsdc;
use rand::{Rng, SeedableRng};
use rumqttc::AsyncClient;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::bench::{
    CHILD_ADMIN_TOKEN, Child, Latency, default_posgate_bin, new_histogram, rss_mib, start_child,
};
use crate::events::{self, Intent};
use crate::http_terminal::{Channel, spawn_http_session};
use crate::terminal::{Bundle, Seen, spawn_session};

/// Where the gateway under test is.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// `ingress,admin,mqtt` addresses of a running gateway; `None` starts a child.
    pub addrs: Option<(SocketAddr, SocketAddr, SocketAddr)>,
    pub admin_token: Option<String>,
    pub secret: String,
    pub posgate_bin: Option<PathBuf>,
    pub log_level: String,
    /// Process whose RSS is reported (default: the child).
    pub pid: Option<u32>,
}

/// A gateway under test.
pub struct Target {
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
    pub token: String,
    pub secret: String,
    pub pid: Option<u32>,
    child: Option<Child>,
}

impl Target {
    /// Starts or attaches to the gateway.
    ///
    /// # Errors
    /// When the child cannot be started.
    pub async fn new(opts: &TargetOptions) -> anyhow::Result<Target> {
        match opts.addrs {
            Some((ingress, admin, mqtt)) => Ok(Target {
                ingress,
                admin,
                mqtt,
                token: opts
                    .admin_token
                    .clone()
                    .context("--admin-token is needed with a running gateway")?,
                secret: opts.secret.clone(),
                pid: opts.pid,
                child: None,
            }),
            None => {
                let bin = match &opts.posgate_bin {
                    Some(bin) => bin.clone(),
                    None => default_posgate_bin()?,
                };
                let child = start_child(&bin, &opts.secret, &opts.log_level, &[]).await?;
                Ok(Target {
                    ingress: child.ingress,
                    admin: child.admin,
                    mqtt: child.mqtt,
                    token: CHILD_ADMIN_TOKEN.to_owned(),
                    secret: opts.secret.clone(),
                    pid: opts.pid.or_else(|| child.process.id()),
                    child: Some(child),
                })
            }
        }
    }

    /// RSS of the gateway process, if known.
    pub fn rss_mib(&self) -> Option<f64> {
        self.pid.and_then(rss_mib)
    }

    /// Stops a child gateway.
    pub async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            child.process.kill().await.ok();
        }
    }
}

/// Provisions `n` terminals `{prefix}{i}` through the admin API, `concurrency` at a time.
///
/// # Errors
/// When a provisioning call fails.
pub async fn provision(
    target: &Target,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Bundle>> {
    provision_at(target.admin, &target.token, prefix, n, concurrency).await
}

/// As [`provision`], against the admin API at `admin` with `token`.
///
/// # Errors
/// When a provisioning call fails.
pub async fn provision_at(
    admin: SocketAddr,
    token: &str,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Bundle>> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{admin}/v1/terminals");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(vec![None; n]));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, next, out, token, prefix) = (
            http.clone(),
            url.clone(),
            next.clone(),
            out.clone(),
            token.to_owned(),
            prefix.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"id": format!("{prefix}{i}"), "merchant_id": "mer_bench"}))
                    .send()
                    .await?;
                if response.status() != 201 {
                    bail!("provisioning {prefix}{i}: {}", response.status());
                }
                let bundle: Bundle = response.json().await?;
                if let Ok(mut out) = out.lock() {
                    out[i] = Some(bundle);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let bundles = out
        .lock()
        .map(|mut v| v.drain(..).flatten().collect())
        .unwrap_or_default();
    Ok(bundles)
}

/// What a fleet member saw, and when.
#[derive(Debug)]
pub struct FleetEvent {
    pub terminal: usize,
    pub seen: Seen,
    pub at: Instant,
}

/// N terminal sessions reporting into one channel, read with [`Fleet::next_event`].
pub struct Fleet {
    pub bundles: Vec<Bundle>,
    sessions: Vec<Option<(Option<AsyncClient>, JoinHandle<()>)>>,
    tx: mpsc::UnboundedSender<FleetEvent>,
    events: mpsc::UnboundedReceiver<FleetEvent>,
    /// Events [`Fleet::wait_connected`] read but was not waiting for, handed out first by
    /// [`Fleet::next_event`]. Terminals may already be paying while others still connect (the
    /// POS flow starts each terminal at once): a confirmation read here must still be counted.
    held: VecDeque<FleetEvent>,
    addr: SocketAddr,
    /// `Mqtt` (to `addr`), or an HTTP channel of the ingress at `ingress`.
    channel: Channel,
    ingress: Option<SocketAddr>,
}

impl Fleet {
    pub fn new(bundles: Vec<Bundle>, addr: SocketAddr) -> Fleet {
        let (tx, events) = mpsc::unbounded_channel();
        let sessions = bundles.iter().map(|_| None).collect();
        Fleet {
            bundles,
            sessions,
            tx,
            events,
            held: VecDeque::new(),
            addr,
            channel: Channel::Mqtt,
            ingress: None,
        }
    }

    /// A fleet whose terminals use `channel`: MQTT at `mqtt`, or an HTTP channel of the ingress
    /// listener at `ingress`.
    pub fn over(
        bundles: Vec<Bundle>,
        channel: Channel,
        mqtt: SocketAddr,
        ingress: SocketAddr,
    ) -> Fleet {
        Fleet {
            channel,
            ingress: Some(ingress),
            ..Fleet::new(bundles, mqtt)
        }
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// The next thing a terminal saw: first what [`Fleet::wait_connected`] held back, then the
    /// channel, in the order the sessions reported it; `None` when the channel is closed.
    ///
    /// Cancel-safe (for `select!`): an event is only taken from the queue or the channel when it
    /// is returned.
    pub async fn next_event(&mut self) -> Option<FleetEvent> {
        match self.held.pop_front() {
            Some(event) => Some(event),
            None => self.events.recv().await,
        }
    }

    /// Starts terminal `i`'s session (it connects, retrying by itself).
    ///
    /// # Errors
    /// When its bundle does not parse.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        // One session per terminal: a start while one runs replaces it.
        self.kill(i);
        let tx = self.tx.clone();
        let sink = Box::new(move |seen| {
            tx.send(FleetEvent {
                terminal: i,
                seen,
                at: Instant::now(),
            })
            .is_ok()
        });
        self.sessions[i] = Some(match (self.channel, self.ingress) {
            (Channel::Sse | Channel::Ws, Some(ingress)) => (
                None,
                spawn_http_session(&self.bundles[i], ingress, self.channel, sink)?,
            ),
            _ => {
                let (client, task) = spawn_session(&self.bundles[i], self.addr, sink)?;
                (Some(client), task)
            }
        });
        Ok(())
    }

    /// Drops terminal `i`'s connection without DISCONNECT (a crash, a cable pulled).
    pub fn kill(&mut self, i: usize) {
        if let Some((_, task)) = self.sessions[i].take() {
            task.abort();
        }
    }

    /// Starts every terminal, `wave` at a time, each wave connected before the next starts.
    ///
    /// # Errors
    /// When a wave does not connect within `timeout`.
    pub async fn connect_all(&mut self, wave: usize, timeout: Duration) -> anyhow::Result<()> {
        let all: Vec<usize> = (0..self.len()).collect();
        for chunk in all.chunks(wave.max(1)) {
            for &i in chunk {
                self.start(i)?;
            }
            self.wait_connected(chunk, timeout).await?;
        }
        Ok(())
    }

    /// Waits until every terminal in `which` has reported `Connected`; returns the time taken.
    /// Every other event read meanwhile (other terminals' confirmations, duplicates, rejections,
    /// disconnects, extra `Connected`s) is kept, in order, for [`Fleet::next_event`]: nothing a
    /// terminal saw is dropped here.
    ///
    /// # Errors
    /// When not all connect within `timeout`.
    pub async fn wait_connected(
        &mut self,
        which: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut waiting: std::collections::HashSet<usize> = which.iter().copied().collect();
        while !waiting.is_empty() {
            let left = timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(FleetEvent {
                    terminal,
                    seen: Seen::Connected,
                    ..
                })) => {
                    waiting.remove(&terminal);
                }
                Ok(Some(other)) => self.held.push_back(other),
                Ok(None) | Err(_) => bail!(
                    "{} of {} terminals not connected after {timeout:?}",
                    waiting.len(),
                    which.len()
                ),
            }
        }
        Ok(started.elapsed())
    }
}

/// Results of a fleet benchmark, printed as a table and written as JSON.
#[derive(Debug, Default, Serialize)]
pub struct FleetReport {
    pub scenario: String,
    pub terminals: usize,
    pub rows: Vec<serde_json::Value>,
    pub latency_ms: Option<Latency>,
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub gateway_rss_mib: Vec<f64>,
}

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
    report.rows.push(serde_json::json!({"concurrency": concurrency, "seconds": took.as_secs_f64(), "per_second": rate}));
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
    let bundles = provision(target, "bench-e-", n, 32).await?;
    let mut fleet = Fleet::over(bundles, channel, target.mqtt, target.ingress);
    fleet.connect_all(1000, Duration::from_secs(120)).await?;
    let terminals: Arc<Vec<String>> = Arc::new(
        fleet
            .bundles
            .iter()
            .map(|b| b.terminal_id.clone())
            .collect(),
    );
    let mut paced = Paced::start(
        target.ingress,
        &target.secret,
        terminals,
        pacing,
        duration,
        "e",
    )?;
    let mut report = FleetReport {
        scenario: "e2e".into(),
        terminals: n,
        ..Default::default()
    };
    while !paced.over() {
        tokio::select! {
            result = paced.senders_finished() => result?,
            event = fleet.next_event() => match event {
                Some(FleetEvent { seen: Seen::Confirmation(c), at, .. }) => {
                    if paced.arrived(&c.intent_id, at)? {
                        report.delivered += 1;
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
    let mut row = paced.finish(&mut report, duration);
    report.gateway_rss_mib.extend(target.rss_mib());
    row["channel"] = serde_json::json!(channel);
    report.rows.push(row);
    Ok(report)
}

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
        Ok(sent.is_some())
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
                let end = start.into_std() + duration;
                let mut next = start + gap();
                let mut k = 0u64;
                let mut errors = 0u64;
                while Instant::now() < end {
                    tokio::time::sleep_until(next).await;
                    let scheduled = next.into_std();
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

/// One keep-alive HTTP/1.1 connection that posts signed webhooks.
pub(crate) struct WebhookConn {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl WebhookConn {
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<WebhookConn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(WebhookConn { addr, sender })
    }

    pub(crate) async fn post(&mut self, secret: &str, body: String) -> anyhow::Result<()> {
        let mut request = Request::post(events::WEBHOOK_PATH)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (name, value) in events::signed_headers(secret, events::now_unix(), body.as_bytes()) {
            request = request.header(name, value);
        }
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        response.into_body().collect().await?;
        if status != 200 {
            bail!("webhook answered {status}");
        }
        Ok(())
    }
}

/// Prints a report's heading, its rows, and its latency naming what was `measured` (the counts
/// are the caller's).
pub(crate) fn print_measured(report: &FleetReport, measured: &str) {
    println!("bench {}: {} terminals", report.scenario, report.terminals);
    for row in &report.rows {
        println!("  {row}");
    }
    if let Some(l) = &report.latency_ms {
        println!(
            "  {measured}: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
}

/// Sends batches of confirmations over a few connections.
struct WebhookSender {
    conns: Vec<tokio::sync::Mutex<WebhookConn>>,
    secret: String,
}

impl WebhookSender {
    async fn new(addr: SocketAddr, secret: &str, n: usize) -> anyhow::Result<WebhookSender> {
        let mut conns = Vec::new();
        for _ in 0..n {
            conns.push(tokio::sync::Mutex::new(WebhookConn::connect(addr).await?));
        }
        Ok(WebhookSender {
            conns,
            secret: secret.to_owned(),
        })
    }

    /// Confirms each `(terminal, intent)`; returns once every webhook was answered 200.
    async fn send_all(&self, intents: &[(String, String)]) -> anyhow::Result<()> {
        let chunks: Vec<&[(String, String)]> = intents
            .chunks(intents.len().div_ceil(self.conns.len()).max(1))
            .collect();
        let futures = chunks
            .into_iter()
            .zip(&self.conns)
            .map(|(chunk, conn)| async move {
                let mut conn = conn.lock().await;
                for (terminal, intent) in chunk {
                    let body = events::intent_event(
                        &format!("evt_{intent}"),
                        "confirmed",
                        &Intent::new(intent, MicroUsdc(4_500_000), terminal),
                    );
                    conn.post(&self.secret, body).await?;
                }
                anyhow::Ok(())
            });
        for result in futures::future::join_all(futures).await {
            result?;
        }
        Ok(())
    }
}

/// Prints a fleet report.
pub fn print(report: &FleetReport) {
    print_measured(
        report,
        "webhook sent -> confirmation verified at the terminal",
    );
    println!(
        "  sent {}, delivered {}, lost {}, duplicates {}, rejected {}",
        report.sent, report.delivered, report.lost, report.duplicates, report.rejected
    );
    if !report.gateway_rss_mib.is_empty() {
        let list: Vec<String> = report
            .gateway_rss_mib
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        println!("  gateway RSS (MiB): {}", list.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::confirmation::{Confirmation, ConfirmationStatus};

    use super::*;

    fn confirmation(terminal_id: &str, intent_id: &str, seq: u64) -> Confirmation {
        Confirmation::new(
            terminal_id,
            intent_id,
            seq,
            ConfirmationStatus::Confirmed,
            posgate_proto::MicroUsdc(4_500_000),
            "2026-11-25T00:00:00Z",
        )
    }

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

    /// The demo's intermittent loss: terminal 0 connected, paid and got its confirmation while
    /// terminal 1 was still connecting; waiting for terminal 1 threw the confirmation away, so
    /// the POS flow counted a delivered (and acked) confirmation as lost.
    #[tokio::test]
    async fn what_arrives_while_waiting_for_connections_is_kept_in_order() {
        let mut fleet = Fleet::new(Vec::new(), SocketAddr::from(([127, 0, 0, 1], 1)));
        let conf = confirmation("pos-0", "pi_early", 1);
        let seen = [
            (0, Seen::Connected),
            (0, Seen::Confirmation(conf.clone())),
            (
                0,
                Seen::Duplicate {
                    intent_id: "pi_early".into(),
                    seq: 1,
                },
            ),
            (1, Seen::Disconnected("connection refused".into())),
            (1, Seen::Connected),
        ];
        for (terminal, seen) in seen {
            let at = Instant::now();
            fleet.tx.send(FleetEvent { terminal, seen, at }).unwrap();
        }
        fleet
            .wait_connected(&[0, 1], Duration::from_secs(10))
            .await
            .unwrap();
        // After the connect phase, in the order the sessions reported them, then the channel.
        let late = confirmation("pos-1", "pi_late", 1);
        let at = Instant::now();
        fleet
            .tx
            .send(FleetEvent {
                terminal: 1,
                seen: Seen::Confirmation(late.clone()),
                at,
            })
            .unwrap();
        // Up to the last event sent (so a dropped one fails the comparison instead of hanging).
        let mut next = Vec::new();
        loop {
            let event = fleet.next_event().await.unwrap();
            let last = event.seen == Seen::Confirmation(late.clone());
            next.push((event.terminal, event.seen));
            if last {
                break;
            }
        }
        assert_eq!(
            next,
            [
                (0, Seen::Confirmation(conf)),
                (
                    0,
                    Seen::Duplicate {
                        intent_id: "pi_early".into(),
                        seq: 1
                    }
                ),
                (1, Seen::Disconnected("connection refused".into())),
                (1, Seen::Confirmation(late)),
            ]
        );
    }
}
