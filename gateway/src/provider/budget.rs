//! One client-side token bucket for every call to the provider (provider-api.md §2.6), shared by
//! terminal RPC and reconciliation, built on `governor`'s GCRA.
//!
//! - The shared bucket refills at 80 % of `provider.requests_per_minute` and holds a burst of a
//!   tenth of it, so no 60 s window ever sees more than 90 % of the published limit (burst plus
//!   one minute of refill), whatever the mix of callers.
//! - Background work (reconciliation lookups, sweeps, listings) must also take a token from its
//!   own bucket, refilled at a quarter of the budget with no burst: it can never use more than a
//!   quarter, so interactive calls always have at least three quarters. It also steps aside while
//!   an interactive call is waiting for a token.
//! - An interactive call (a cashier waits on it) waits at most `interactive_wait`; when the next
//!   token is further away than that it is refused at once with [`Exhausted`], so the terminal
//!   gets a clear "retry in N s" instead of a silent hang. Background calls wait as long as needed
//!   (their loops select on shutdown).
//!
//! - A terminal's interactive calls also take a token from that terminal's own bucket, refilled at
//!   a quarter of the shared rate with a quarter of its burst: one terminal (a firmware loop, a
//!   stolen device within its RPC limits) can never spend more than a quarter of the budget, so
//!   the provider budget is shared fairly among terminals. Calls not made for a terminal (admin)
//!   take only the shared token.
//!
//! The clock is tokio's, so `tokio::time::pause()` drives the buckets in tests.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Who is calling: a terminal waiting for an answer, or a background job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Terminal RPC: a person waits; bounded wait, then a clear error.
    Interactive,
    /// Reconciliation: at most a quarter of the budget, yields to interactive calls.
    Background,
}

/// The budget is spent for longer than an interactive call may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the provider request budget is spent; the next request is possible in {retry_after:?}")]
pub struct Exhausted {
    /// How long until a token is expected.
    pub retry_after: Duration,
}

/// Tokio's clock for `governor`, so that paused test time applies.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    // governor wants std's type; the value comes from tokio's (paused) clock.
    #[allow(clippy::disallowed_types)]
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Bucket<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type TerminalBuckets<C> =
    RateLimiter<String, HashMapStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Terminals whose buckets are kept before the full ones are dropped (a full bucket is the same
/// as none).
const TERMINAL_BUCKETS_KEPT: usize = 4096;

/// The rates derived from `requests_per_minute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rates {
    /// Shared refill: one token per this period (80 % of the limit).
    pub shared_period: Duration,
    /// Shared burst (a tenth of the limit, at least one).
    pub shared_burst: u32,
    /// Background refill: one token per this period (a quarter of the shared rate).
    pub background_period: Duration,
    /// One terminal's refill: one token per this period (a quarter of the shared rate).
    pub terminal_period: Duration,
    /// One terminal's burst (a quarter of the shared burst, at least one).
    pub terminal_burst: u32,
}

impl Rates {
    /// The rates for a published limit of `requests_per_minute`.
    pub fn for_limit(requests_per_minute: u32) -> Rates {
        let limit = f64::from(requests_per_minute.max(1));
        let budget = limit * 0.8;
        let shared_burst = (requests_per_minute / 10).max(1);
        Rates {
            shared_period: Duration::from_secs_f64(60.0 / budget),
            shared_burst,
            background_period: Duration::from_secs_f64(60.0 / (budget / 4.0)),
            terminal_period: Duration::from_secs_f64(60.0 / (budget / 4.0)),
            terminal_burst: (shared_burst / 4).max(1),
        }
    }

    /// Most requests any window of `window` can see: the burst plus the refill.
    pub fn most_in(&self, window: Duration) -> u64 {
        u64::from(self.shared_burst)
            + (window.as_secs_f64() / self.shared_period.as_secs_f64()).floor() as u64
    }
}

/// The shared request budget. Cheap to share behind an `Arc`.
pub struct Budget<C: Clock = TokioClock> {
    shared: Bucket<C>,
    background: Bucket<C>,
    terminals: TerminalBuckets<C>,
    clock: C,
    /// Interactive callers waiting for a shared token right now.
    interactive_waiting: AtomicUsize,
    interactive_wait: Duration,
    rates: Rates,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("rates", &self.rates)
            .field("interactive_wait", &self.interactive_wait)
            .finish_non_exhaustive()
    }
}

impl Budget<TokioClock> {
    /// A budget for a published limit of `requests_per_minute`; interactive calls wait at most
    /// `interactive_wait` for a token.
    pub fn new(requests_per_minute: u32, interactive_wait: Duration) -> Budget<TokioClock> {
        Budget::with_clock(requests_per_minute, interactive_wait, TokioClock)
    }
}

fn quota(period: Duration, burst: u32) -> Quota {
    let one = NonZeroU32::MIN;
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(one))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(one))
}

impl<C: Clock + Clone> Budget<C> {
    /// As [`Budget::new`], on `clock`.
    pub fn with_clock(requests_per_minute: u32, interactive_wait: Duration, clock: C) -> Budget<C> {
        let rates = Rates::for_limit(requests_per_minute);
        Budget {
            shared: RateLimiter::direct_with_clock(
                quota(rates.shared_period, rates.shared_burst),
                clock.clone(),
            ),
            background: RateLimiter::direct_with_clock(
                quota(rates.background_period, 1),
                clock.clone(),
            ),
            terminals: RateLimiter::hashmap_with_clock(
                quota(rates.terminal_period, rates.terminal_burst),
                clock.clone(),
            ),
            clock,
            interactive_waiting: AtomicUsize::new(0),
            interactive_wait,
            rates,
        }
    }

    /// The rates in force.
    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// Takes a shared token now, or says how long until one is expected.
    fn try_shared(&self) -> Result<(), Duration> {
        self.shared
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes a background token now (only then a shared one may be taken), or says how long
    /// until one is expected.
    fn try_background(&self) -> Result<(), Duration> {
        self.background
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes a token from `terminal`'s own bucket now, or says how long until one is expected.
    fn try_terminal(&self, terminal: &str) -> Result<(), Duration> {
        if self.terminals.len() > TERMINAL_BUCKETS_KEPT {
            self.terminals.retain_recent();
        }
        self.terminals
            .check_key(&terminal.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn interactive_waiting(&self) -> bool {
        self.interactive_waiting.load(Ordering::Acquire) > 0
    }
}

impl Budget<TokioClock> {
    /// Waits for a token for one request (every attempt, retries included, is one request);
    /// an interactive call made for `terminal` also takes one of that terminal's own.
    ///
    /// # Errors
    /// [`Exhausted`] for an interactive call whose token (its terminal's or the shared one) is
    /// further away than the interactive wait; background calls wait as long as it takes.
    pub async fn acquire(
        &self,
        priority: Priority,
        terminal: Option<&str>,
    ) -> Result<(), Exhausted> {
        match priority {
            Priority::Interactive => {
                let deadline = tokio::time::Instant::now() + self.interactive_wait;
                if let Some(terminal) = terminal {
                    wait_for(deadline, || self.try_terminal(terminal)).await?;
                }
                self.acquire_interactive(deadline).await
            }
            Priority::Background => {
                self.acquire_background().await;
                Ok(())
            }
        }
    }

    async fn acquire_interactive(&self, deadline: tokio::time::Instant) -> Result<(), Exhausted> {
        self.interactive_waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.interactive_waiting);
        wait_for(deadline, || self.try_shared()).await
    }

    async fn acquire_background(&self) {
        // Its own quarter first: background work never takes more than that.
        while let Err(wait) = self.try_background() {
            tokio::time::sleep(wait).await;
        }
        loop {
            // Step aside while a terminal is waiting for a token.
            if self.interactive_waiting() {
                tokio::time::sleep(self.rates.shared_period).await;
                continue;
            }
            match self.try_shared() {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// Takes a token with `try_take`, sleeping until it is due, unless it is due after `deadline`.
async fn wait_for(
    deadline: tokio::time::Instant,
    try_take: impl Fn() -> Result<(), Duration>,
) -> Result<(), Exhausted> {
    loop {
        match try_take() {
            Ok(()) => return Ok(()),
            Err(wait) => {
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(Exhausted { retry_after: wait });
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Decrements the waiting count when an interactive wait ends (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use governor::clock::FakeRelativeClock;

    use super::*;

    #[test]
    fn rates_for_the_documented_limits() {
        let r = Rates::for_limit(100);
        assert_eq!(r.shared_period, Duration::from_millis(750), "80/min");
        assert_eq!(r.shared_burst, 10);
        assert_eq!(r.background_period, Duration::from_secs(3), "20/min");
        assert_eq!(r.terminal_period, Duration::from_secs(3), "20/min");
        assert_eq!(r.terminal_burst, 2);
        // Never more than 90 % of the limit in any minute.
        assert_eq!(r.most_in(Duration::from_secs(60)), 90);
        let r = Rates::for_limit(1000);
        assert_eq!(r.shared_period, Duration::from_micros(75_000));
        assert_eq!(r.most_in(Duration::from_secs(60)), 900);
        assert_eq!(Rates::for_limit(1).shared_burst, 1);
    }

    /// The pacing of the shared bucket: the burst at once, then one token per period.
    #[test]
    fn shared_bucket_paces_after_the_burst() {
        let clock = FakeRelativeClock::default();
        let budget = Budget::with_clock(100, Duration::ZERO, clock.clone());
        for i in 0..10 {
            assert!(budget.try_shared().is_ok(), "burst token {i}");
        }
        let wait = budget.try_shared().unwrap_err();
        assert!(
            wait <= Duration::from_millis(750) && wait > Duration::ZERO,
            "{wait:?}"
        );
        clock.advance(Duration::from_millis(750));
        assert!(budget.try_shared().is_ok());
        assert!(budget.try_shared().is_err());
        // Over a simulated minute of constant demand: burst + 80 refills.
        let mut taken = 11;
        for _ in 0..(60_000 / 50) {
            clock.advance(Duration::from_millis(50));
            while budget.try_shared().is_ok() {
                taken += 1;
            }
        }
        assert!(taken <= 10 + 81, "{taken}");
        assert!(taken >= 10 + 79, "{taken}");
    }

    #[test]
    fn background_gets_a_quarter_without_burst() {
        let clock = FakeRelativeClock::default();
        let budget = Budget::with_clock(100, Duration::ZERO, clock.clone());
        assert!(budget.try_background().is_ok());
        assert_eq!(budget.try_background(), Err(Duration::from_secs(3)));
        let mut taken = 1;
        for _ in 0..(60_000 / 100) {
            clock.advance(Duration::from_millis(100));
            while budget.try_background().is_ok() {
                taken += 1;
            }
        }
        assert_eq!(taken, 21, "one now, then 20 per minute");
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_waits_a_bounded_time_then_gets_a_clear_error() {
        let budget = Budget::new(60, Duration::from_secs(2));
        let rates = budget.rates();
        for _ in 0..rates.shared_burst {
            budget.acquire(Priority::Interactive, None).await.unwrap();
        }
        // The next token is 1.25 s away: inside the wait.
        let started = tokio::time::Instant::now();
        budget.acquire(Priority::Interactive, None).await.unwrap();
        assert!(started.elapsed() <= Duration::from_millis(1250));
        // Two callers at once: one gets the token in 1.25 s, the other would need 2.5 s: refused.
        let (a, b) = tokio::join!(
            budget.acquire(Priority::Interactive, None),
            budget.acquire(Priority::Interactive, None)
        );
        let refused = [a, b]
            .into_iter()
            .filter_map(Result::err)
            .collect::<Vec<_>>();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].retry_after > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn background_yields_to_a_waiting_terminal() {
        let budget = Arc::new(Budget::new(60, Duration::from_secs(10)));
        for _ in 0..budget.rates().shared_burst {
            budget.acquire(Priority::Interactive, None).await.unwrap();
        }
        // A background call and then a terminal both want the next token: the terminal gets it.
        let bg = {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget.acquire(Priority::Background, None).await.unwrap();
                tokio::time::Instant::now()
            })
        };
        tokio::task::yield_now().await;
        budget.acquire(Priority::Interactive, None).await.unwrap();
        let terminal_at = tokio::time::Instant::now();
        let background_at = bg.await.unwrap();
        assert!(background_at > terminal_at);
    }

    #[tokio::test(start_paused = true)]
    async fn background_never_exceeds_its_quarter() {
        let budget = Budget::new(600, Duration::ZERO);
        let started = tokio::time::Instant::now();
        for _ in 0..11 {
            budget.acquire(Priority::Background, None).await.unwrap();
        }
        // 600/min → 480 budget → 120/min background: one now, then one every 0.5 s.
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// A terminal asking as fast as it is answered for a minute gets at most its quarter (burst
    /// plus refill), while another terminal asking every 5 s gets every call through. Without
    /// the per-terminal buckets the flooder took the whole budget (about 90 in the minute).
    #[tokio::test(start_paused = true)]
    async fn one_terminal_cannot_take_more_than_its_share() {
        let budget = Arc::new(Budget::new(100, Duration::from_secs(2)));
        let minute = Duration::from_secs(60);
        let flooder = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let (mut granted, mut refused) = (0u32, 0u32);
                while started.elapsed() < minute {
                    match budget
                        .acquire(Priority::Interactive, Some("pos-flood"))
                        .await
                    {
                        Ok(()) => granted += 1,
                        Err(e) => {
                            refused += 1;
                            tokio::time::sleep(e.retry_after.min(Duration::from_millis(100))).await;
                        }
                    }
                }
                (granted, refused)
            })
        };
        let mut honest = 0;
        for _ in 0..12 {
            budget
                .acquire(Priority::Interactive, Some("pos-honest"))
                .await
                .expect("the honest terminal's call goes through");
            honest += 1;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let (granted, refused) = flooder.await.unwrap();
        let rates = budget.rates();
        assert_eq!(honest, 12);
        assert!(
            u64::from(granted) <= u64::from(rates.terminal_burst) + 20 + 1,
            "the flooder got {granted}"
        );
        assert!(granted >= 20, "the flooder still gets its share: {granted}");
        assert!(refused > 0);
    }
}
