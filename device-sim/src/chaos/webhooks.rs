//! The provider's side: `rate` signed `payment_intent.confirmed` webhooks/s, each a new intent
//! for a random terminal, each retried as the provider does (same event id and body, freshly
//! signed, backing off) until the gateway answers `200`: through `503`s while its store is full
//! and refused connections while it is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use posgate_proto::MicroUsdc;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::checker::Checker;
use super::daemon::SECRET;
use crate::events::{self, Intent};

/// Requests in flight at once (the provider's delivery workers).
const IN_FLIGHT: usize = 256;
/// First pause before a retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the senders counted.
#[derive(Debug, Default, Serialize)]
pub struct Webhooks {
    /// Distinct events (one intent each).
    pub events: u64,
    /// Requests, retries included.
    pub attempts: u64,
    /// Answered `200`.
    pub ok: u64,
    /// Answered `503` (store failing or full), retried.
    pub unavailable: u64,
    /// Any other status, retried.
    pub other_status: u64,
    /// No answer (refused, reset, timed out), retried.
    pub connection_errors: u64,
    /// Events still without a `200` when the senders gave up, after the drain.
    pub unanswered: u64,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    attempts: AtomicU64,
    ok: AtomicU64,
    unavailable: AtomicU64,
    other_status: AtomicU64,
    connection_errors: AtomicU64,
    unanswered: AtomicU64,
}

/// The running senders.
pub struct Senders {
    /// Stops new events.
    stop: CancellationToken,
    /// Ends the retries of events still unanswered.
    give_up: CancellationToken,
    tasks: TaskTracker,
    counters: Arc<Counters>,
    /// What a probe needs to send events of its own.
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    ids: Arc<Vec<String>>,
    checker: Arc<Checker>,
    in_flight: Arc<Semaphore>,
    probes: AtomicU64,
}

impl Senders {
    /// Starts `rate` events/s to the ingress at `ingress`, for `terminals` terminals named in
    /// `ids`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn spawn(
        ingress: SocketAddr,
        ids: Arc<Vec<String>>,
        rate: f64,
        seed: u64,
        checker: Arc<Checker>,
    ) -> anyhow::Result<Senders> {
        Senders::spawn_over(&[ingress], ids, rate, seed, checker)
    }

    /// As [`Senders::spawn`], spread over several gateways' ingresses as a load balancer would:
    /// event `n` goes first to `ingresses[n % len]`, and each retry to the next one, so that an
    /// event whose gateway died is answered by another.
    ///
    /// # Errors
    /// When the HTTP client cannot be built, or `ingresses` is empty.
    pub fn spawn_over(
        ingresses: &[SocketAddr],
        ids: Arc<Vec<String>>,
        rate: f64,
        seed: u64,
        checker: Arc<Checker>,
    ) -> anyhow::Result<Senders> {
        anyhow::ensure!(!ingresses.is_empty(), "no ingress to send webhooks to");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let urls: Arc<Vec<String>> = Arc::new(
            ingresses
                .iter()
                .map(|a| format!("http://{a}{}", events::WEBHOOK_PATH))
                .collect(),
        );
        let senders = Senders {
            stop: CancellationToken::new(),
            give_up: CancellationToken::new(),
            tasks: TaskTracker::new(),
            counters: Arc::default(),
            http: http.clone(),
            urls: urls.clone(),
            ids: ids.clone(),
            checker: checker.clone(),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            probes: AtomicU64::new(0),
        };
        let (stop, give_up, tasks, counters, in_flight) = (
            senders.stop.clone(),
            senders.give_up.clone(),
            senders.tasks.clone(),
            senders.counters.clone(),
            senders.in_flight.clone(),
        );
        senders.tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 0u64.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let terminal = rng.random_range(0..ids.len());
                let delivery = Delivery::new(
                    &http,
                    &urls,
                    n as usize,
                    &format!("pi_chaos_{n}"),
                    &format!("evt_chaos_{n}"),
                    1_000_000 + n % 1_000_000,
                    &ids[terminal],
                );
                checker.sent(&delivery.intent_id, terminal, delivery.amount);
                counters.events.fetch_add(1, Ordering::Relaxed);
                let (checker, counters, give_up, in_flight) = (
                    checker.clone(),
                    counters.clone(),
                    give_up.clone(),
                    in_flight.clone(),
                );
                tasks.spawn(async move {
                    delivery
                        .run(&checker, &counters, &give_up, &in_flight)
                        .await;
                });
            }
        });
        Ok(senders)
    }

    /// One extra event for every terminal now, beside the paced ones (each retried until `200`
    /// like them): after a fault, every terminal then has something to be served.
    pub fn probe_all(&self) {
        let round = self.probes.fetch_add(1, Ordering::Relaxed);
        for (terminal, id) in self.ids.iter().enumerate() {
            let delivery = Delivery::new(
                &self.http,
                &self.urls,
                terminal,
                &format!("pi_probe_{round}_{terminal}"),
                &format!("evt_probe_{round}_{terminal}"),
                2_000_000 + round,
                id,
            );
            self.checker
                .sent(&delivery.intent_id, terminal, delivery.amount);
            self.counters.events.fetch_add(1, Ordering::Relaxed);
            let (checker, counters, give_up, in_flight) = (
                self.checker.clone(),
                self.counters.clone(),
                self.give_up.clone(),
                self.in_flight.clone(),
            );
            self.tasks.spawn(async move {
                delivery
                    .run(&checker, &counters, &give_up, &in_flight)
                    .await;
            });
        }
    }

    /// Stops new events, waits at most `drain` for every event to be answered `200`, then gives
    /// up on the rest (counted unanswered).
    pub async fn finish(&self, drain: Duration) -> Webhooks {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(drain, self.tasks.wait())
            .await
            .is_err()
        {
            self.give_up.cancel();
            self.tasks.wait().await;
        }
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Webhooks {
            events: get(&c.events),
            attempts: get(&c.attempts),
            ok: get(&c.ok),
            unavailable: get(&c.unavailable),
            other_status: get(&c.other_status),
            connection_errors: get(&c.connection_errors),
            unanswered: get(&c.unanswered),
        }
    }

    /// Answers `503` so far (to see a disk-full period take effect).
    pub fn unavailable(&self) -> u64 {
        self.counters.unavailable.load(Ordering::Relaxed)
    }
}

/// One event, delivered until `200`.
struct Delivery {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    /// The ingress tried next.
    next: usize,
    body: String,
    intent_id: String,
    amount: u64,
}

impl Delivery {
    fn new(
        http: &reqwest::Client,
        urls: &Arc<Vec<String>>,
        first: usize,
        intent_id: &str,
        event_id: &str,
        amount: u64,
        terminal_id: &str,
    ) -> Delivery {
        let intent = Intent::new(intent_id, MicroUsdc(amount), terminal_id);
        Delivery {
            http: http.clone(),
            urls: urls.clone(),
            next: first,
            body: events::intent_event(event_id, "confirmed", &intent),
            intent_id: intent_id.to_owned(),
            amount,
        }
    }

    async fn run(
        mut self,
        checker: &Checker,
        counters: &Counters,
        give_up: &CancellationToken,
        in_flight: &Semaphore,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let url = &self.urls[self.next % self.urls.len()];
            self.next += 1;
            let status = {
                let Ok(_permit) = in_flight.acquire().await else {
                    return;
                };
                counters.attempts.fetch_add(1, Ordering::Relaxed);
                let mut request = self
                    .http
                    .post(url)
                    .header("content-type", "application/json");
                // Signed afresh on every attempt, as the provider does: same body, new timestamp.
                for (name, value) in
                    events::signed_headers(SECRET, events::now_unix(), self.body.as_bytes())
                {
                    request = request.header(name, value);
                }
                tokio::select! {
                    r = request.body(self.body.clone()).send() => r.map(|r| r.status().as_u16()),
                    _ = give_up.cancelled() => {
                        counters.unanswered.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            };
            match status {
                Ok(200) => {
                    counters.ok.fetch_add(1, Ordering::Relaxed);
                    checker.answered(&self.intent_id);
                    return;
                }
                Ok(503) => counters.unavailable.fetch_add(1, Ordering::Relaxed),
                Ok(_) => counters.other_status.fetch_add(1, Ordering::Relaxed),
                Err(_) => counters.connection_errors.fetch_add(1, Ordering::Relaxed),
            };
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = give_up.cancelled() => {
                    counters.unanswered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
