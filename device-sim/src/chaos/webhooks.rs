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
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let senders = Senders {
            stop: CancellationToken::new(),
            give_up: CancellationToken::new(),
            tasks: TaskTracker::new(),
            counters: Arc::default(),
        };
        let url = format!("http://{ingress}{}", events::WEBHOOK_PATH);
        let (stop, give_up, tasks, counters) = (
            senders.stop.clone(),
            senders.give_up.clone(),
            senders.tasks.clone(),
            senders.counters.clone(),
        );
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
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
                let intent_id = format!("pi_chaos_{n}");
                let amount = 1_000_000 + n % 1_000_000;
                let intent = Intent::new(&intent_id, MicroUsdc(amount), &ids[terminal]);
                let body = events::intent_event(&format!("evt_chaos_{n}"), "confirmed", &intent);
                checker.sent(&intent_id, terminal, amount);
                counters.events.fetch_add(1, Ordering::Relaxed);
                let delivery = Delivery {
                    http: http.clone(),
                    url: url.clone(),
                    body,
                    intent_id,
                };
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
    url: String,
    body: String,
    intent_id: String,
}

impl Delivery {
    async fn run(
        self,
        checker: &Checker,
        counters: &Counters,
        give_up: &CancellationToken,
        in_flight: &Semaphore,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let status = {
                let Ok(_permit) = in_flight.acquire().await else {
                    return;
                };
                counters.attempts.fetch_add(1, Ordering::Relaxed);
                let mut request = self
                    .http
                    .post(&self.url)
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
