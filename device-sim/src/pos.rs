//! The point-of-sale flow of simulated terminals, and the demo built on it.
//!
//! Each terminal runs the provider guide's flow: the cashier creates an intent (at the provider
//! simulator, with `metadata.terminal_id`), the customer pays after a short random delay, the
//! terminal waits for the signed confirmation, verifies it, acks it, and shows it. With chaos on,
//! terminals drop their connection or reboot in the middle of a payment (keeping the active intent
//! id, as the guide advises) and the provider sends duplicate, forged and stale deliveries.
//! Every paid intent must reach its terminal: anything else is counted as lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Context;
use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::ConfirmationStatus;
use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::bench::{Latency, new_histogram};
use crate::fleet::{Fleet, FleetEvent};
use crate::provider::{NewIntent, RunningProvider};
use crate::terminal::{Bundle, Seen};

/// Where the POS flow creates intents and where the customer pays: the in-process provider
/// simulator ([`RunningProvider`]), or one reached over HTTP ([`crate::remote::RemoteProvider`],
/// for `posgate-sim fleet` against a running simulator).
pub trait Checkout: Send + Sync {
    /// The cashier creates an intent of `amount` for `terminal_id` (`metadata.terminal_id`);
    /// returns its `pi_…` id.
    fn new_intent<'a>(
        &'a self,
        amount: MicroUsdc,
        terminal_id: &'a str,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<String>>;

    /// The customer pays `amount` to `intent_id`.
    fn customer_pays<'a>(
        &'a self,
        intent_id: &'a str,
        amount: MicroUsdc,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<()>>;
}

impl Checkout for RunningProvider {
    fn new_intent<'a>(
        &'a self,
        amount: MicroUsdc,
        terminal_id: &'a str,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<String>> {
        let id = self
            .create_intent(&NewIntent::for_terminal(amount, terminal_id))
            .map_err(anyhow::Error::from)
            .and_then(|intent| {
                intent["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("the intent has no id")
            });
        Box::pin(std::future::ready(id))
    }

    fn customer_pays<'a>(
        &'a self,
        intent_id: &'a str,
        amount: MicroUsdc,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<()>> {
        let paid = self
            .pay(intent_id, Some(amount), false)
            .map(drop)
            .map_err(anyhow::Error::from);
        Box::pin(std::future::ready(paid))
    }
}

/// How the fleet behaves.
#[derive(Clone, Debug)]
pub struct PosOptions {
    /// How long new payments are started.
    pub duration: Duration,
    /// After `duration`, how long outstanding confirmations may take before they count as lost.
    pub grace: Duration,
    /// Probability per payment that the terminal drops its connection while waiting.
    pub disconnect_rate: f64,
    /// Probability per payment that the terminal reboots (new session, same intent id).
    pub reboot_rate: f64,
    /// Probability per payment that the customer pays less than asked.
    pub underpay_rate: f64,
    /// Probability per payment that the terminal goes offline for a longer period (2–6 s).
    pub offline_rate: f64,
    /// A connection storm every so often: all terminals drop and reconnect at once.
    pub storm_every: Option<Duration>,
}

/// The counts and latencies of a run (the demo's report; field names are fixed by
/// interfaces.md).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub terminals: usize,
    pub payments: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates_suppressed: u64,
    pub forged_rejected: u64,
    /// Customer pays → the terminal shows it (includes the provider's scaled confirmation delay).
    pub latency_ms: Latency,
    pub disconnects: u64,
    pub reboots: u64,
    pub offline_periods: u64,
    pub storms: u64,
    pub underpaid: u64,
    /// Messages that failed verification at a terminal (must be 0: forgeries never get through).
    pub rejected_at_terminal: u64,
}

impl Report {
    /// Nothing lost, nothing failing verification, and at least one payment made.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.rejected_at_terminal == 0 && self.payments > 0
    }

    /// Prints the report for a person under `title`.
    pub fn print(&self, title: &str) {
        let l = &self.latency_ms;
        println!("{title}: {} terminals", self.terminals);
        println!("  payments                 {}", self.payments);
        println!("  confirmations delivered  {}", self.delivered);
        println!("  lost                     {}", self.lost);
        println!(
            "  duplicates suppressed    {}  (terminal side, by intent and seq)",
            self.duplicates_suppressed
        );
        println!(
            "  forged webhooks rejected {}  (bad, empty or stale signatures, answered 401)",
            self.forged_rejected
        );
        println!(
            "  chaos                    {} disconnects, {} reboots, {} offline periods, {} storms, {} underpayments",
            self.disconnects, self.reboots, self.offline_periods, self.storms, self.underpaid
        );
        println!(
            "  latency, customer pays -> terminal shows it: p50 {:.1} ms, p90 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if self.rejected_at_terminal > 0 {
            println!(
                "  messages failing verification at a terminal: {}",
                self.rejected_at_terminal
            );
        }
        let verdict = if self.clean() {
            "nothing lost"
        } else if self.payments == 0 {
            "NO PAYMENT WAS MADE"
        } else {
            "CONFIRMATIONS WERE LOST"
        };
        println!("  {verdict}");
    }
}

/// A live progress bar over [`Progress`] (on stderr), until [`ProgressDisplay::finish`].
pub struct ProgressDisplay {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl ProgressDisplay {
    /// Shows `progress` for a run of `duration`, refreshed five times a second.
    pub fn start(progress: Arc<Progress>, duration: Duration) -> ProgressDisplay {
        let bar = indicatif::ProgressBar::new(duration.as_secs());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                shown.set_position(shown.elapsed().as_secs().min(shown.length().unwrap_or(0)));
                shown.set_message(format!(
                    "payments {}  shown {}  waiting {}",
                    progress.payments.load(Ordering::Relaxed),
                    progress.delivered.load(Ordering::Relaxed),
                    progress.waiting.load(Ordering::Relaxed),
                ));
            }
        });
        ProgressDisplay { bar, ticker }
    }

    /// Stops and clears the bar.
    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Live counters for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub payments: AtomicU64,
    pub delivered: AtomicU64,
    pub waiting: AtomicU64,
}

struct Shared {
    provider: Arc<dyn Checkout>,
    options: PosOptions,
    progress: Arc<Progress>,
}

/// What one terminal did.
#[derive(Default)]
struct Tally {
    payments: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    rejected: u64,
    disconnects: u64,
    reboots: u64,
    offline_periods: u64,
    underpaid: u64,
    latencies_us: Vec<u64>,
}

/// Commands from a terminal's POS task to the fleet owner.
enum Control {
    Kill(usize),
    Start(usize),
}

/// Runs the POS flow on every terminal of `fleet` until `options.duration` has passed and every
/// paid intent has been shown or counted lost.
///
/// # Errors
/// When a session cannot be started.
pub async fn run(
    fleet: Fleet,
    provider: Arc<RunningProvider>,
    options: PosOptions,
    progress: Arc<Progress>,
) -> anyhow::Result<Report> {
    run_with(fleet, provider, options, progress).await
}

/// As [`run`], creating intents and paying through any [`Checkout`].
///
/// # Errors
/// When a session cannot be started.
pub async fn run_with(
    mut fleet: Fleet,
    provider: Arc<dyn Checkout>,
    options: PosOptions,
    progress: Arc<Progress>,
) -> anyhow::Result<Report> {
    let n = fleet.len();
    let shared = Arc::new(Shared {
        provider,
        options: options.clone(),
        progress,
    });
    let (control_tx, mut control_rx) = mpsc::unbounded_channel();
    let mut inboxes = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (tx, rx) = mpsc::unbounded_channel();
        inboxes.insert(i, tx);
        let (shared, control, bundle) =
            (shared.clone(), control_tx.clone(), fleet.bundles[i].clone());
        tasks.push(tokio::spawn(terminal_loop(i, bundle, shared, rx, control)));
    }
    drop(control_tx);
    // The terminals are already paying: a confirmation that reaches one while others still
    // connect is held by the fleet and handed out by `next_event` below, not dropped.
    fleet.connect_all(500, Duration::from_secs(60)).await?;
    let mut done = futures::future::join_all(tasks);
    let mut storms = 0u64;
    let storm_every = options.storm_every.unwrap_or(Duration::from_secs(3600));
    let mut storm =
        tokio::time::interval_at(tokio::time::Instant::now() + storm_every, storm_every);
    let tallies = loop {
        tokio::select! {
            _ = storm.tick(), if options.storm_every.is_some() => {
                // Everyone drops at once and reconnects at once, each retrying on its own.
                for i in 0..n {
                    fleet.kill(i);
                }
                for i in 0..n {
                    fleet.start(i)?;
                }
                storms += 1;
            }
            event = fleet.next_event() => match event {
                Some(FleetEvent { terminal, seen, at }) => {
                    if let Some(inbox) = inboxes.get(&terminal) {
                        drop(inbox.send((seen, at)));
                    }
                }
                None => anyhow::bail!("the fleet's event stream ended"),
            },
            control = control_rx.recv() => match control {
                Some(Control::Kill(i)) => fleet.kill(i),
                Some(Control::Start(i)) => fleet.start(i)?,
                None => {}
            },
            tallies = &mut done => break tallies,
        }
    };
    for i in 0..n {
        fleet.kill(i);
    }
    let mut report = Report {
        terminals: n,
        storms,
        ..Report::default()
    };
    let mut histogram = new_histogram()?;
    for tally in tallies {
        let t = tally.context("a terminal task failed")?;
        report.payments += t.payments;
        report.delivered += t.delivered;
        report.lost += t.lost;
        report.duplicates_suppressed += t.duplicates;
        report.rejected_at_terminal += t.rejected;
        report.disconnects += t.disconnects;
        report.reboots += t.reboots;
        report.offline_periods += t.offline_periods;
        report.underpaid += t.underpaid;
        for us in t.latencies_us {
            histogram.record(us.max(1))?;
        }
    }
    report.latency_ms = Latency::of(&histogram);
    Ok(report)
}

/// One terminal's cashier and customer.
async fn terminal_loop(
    i: usize,
    bundle: Bundle,
    shared: Arc<Shared>,
    mut inbox: mpsc::UnboundedReceiver<(Seen, Instant)>,
    control: mpsc::UnboundedSender<Control>,
) -> Tally {
    let options = &shared.options;
    let started = Instant::now();
    let mut tally = Tally::default();
    while started.elapsed() < options.duration {
        let (underpay, chaos, cents) = {
            let mut rng = rand::rng();
            (
                rng.random_bool(options.underpay_rate),
                rng.random::<f64>(),
                rng.random_range(100u64..=5000),
            )
        };
        let amount = MicroUsdc(cents * 10_000);
        let intent_id = match shared
            .provider
            .new_intent(amount, &bundle.terminal_id)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(terminal = i, error = ?e, "creating an intent failed");
                // Not a busy loop when the provider is unreachable.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The customer scans the QR and pays a moment later.
        let think = Duration::from_millis(rand::rng().random_range(50..400));
        tokio::time::sleep(think).await;
        let paid = if underpay {
            MicroUsdc(amount.0 - 10_000)
        } else {
            amount
        };
        let paid_at = Instant::now();
        if let Err(e) = shared.provider.customer_pays(&intent_id, paid).await {
            tracing::warn!(terminal = i, %intent_id, error = ?e, "paying failed");
            continue;
        }
        tally.payments += 1;
        tally.underpaid += u64::from(underpay);
        shared.progress.payments.fetch_add(1, Ordering::Relaxed);
        shared.progress.waiting.fetch_add(1, Ordering::Relaxed);
        // Chaos while waiting: the connection drops, or the terminal reboots, for a moment.
        let (d, r, o) = (
            options.disconnect_rate,
            options.reboot_rate,
            options.offline_rate,
        );
        if chaos < d + r + o {
            // A blip or a reboot: back within 1.5 s; an offline period: 2 to 6 s.
            let (from, to) = if chaos < d + r {
                (100, 1500)
            } else {
                (2000, 6000)
            };
            drop(control.send(Control::Kill(i)));
            let offline = Duration::from_millis(rand::rng().random_range(from..to));
            tokio::time::sleep(offline).await;
            drop(control.send(Control::Start(i)));
            if chaos < d {
                tally.disconnects += 1
            } else if chaos < d + r {
                tally.reboots += 1
            } else {
                tally.offline_periods += 1
            }
        }
        let deadline = paid_at + options.grace;
        let expected = if underpay {
            ConfirmationStatus::Unresolved
        } else {
            ConfirmationStatus::Confirmed
        };
        let shown = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, inbox.recv()).await {
                Ok(Some((Seen::Confirmation(c), at))) if c.intent_id == intent_id => {
                    if c.status != expected {
                        tracing::warn!(terminal = i, %intent_id, status = ?c.status, "unexpected status");
                    }
                    break Some(at);
                }
                Ok(Some((Seen::Duplicate { .. }, _))) => tally.duplicates += 1,
                Ok(Some((Seen::Rejected(_), _))) => tally.rejected += 1,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break None,
            }
        };
        shared.progress.waiting.fetch_sub(1, Ordering::Relaxed);
        match shown {
            Some(at) => {
                tally.delivered += 1;
                tally
                    .latencies_us
                    .push(at.duration_since(paid_at).as_micros() as u64);
                shared.progress.delivered.fetch_add(1, Ordering::Relaxed);
            }
            None => tally.lost += 1,
        }
    }
    // Duplicates that arrive after the last payment still count.
    while let Ok((seen, _)) = inbox.try_recv() {
        match seen {
            Seen::Duplicate { .. } => tally.duplicates += 1,
            Seen::Rejected(_) => tally.rejected += 1,
            _ => {}
        }
    }
    tally
}
