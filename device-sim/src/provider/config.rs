//! How to start the simulator: [`ProviderConfig`] (addresses, secrets, the time scale), the webhook
//! [`Faults`] and REST [`ApiFaults`] it injects, the injectable [`Clock`], and [`scaled`], the one
//! place a provider delay meets the time scale.
//!
//! Settings only: nothing here binds, spawns or sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use secrecy::SecretString;
use time::OffsetDateTime;

/// `d` multiplied by `time_scale` (a non-finite or negative product is zero; a huge one saturates).
pub fn scaled(d: Duration, time_scale: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * time_scale).unwrap_or(if time_scale > 1.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

/// The provider's clock, injectable so that tests can sign at a fixed timestamp.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> OffsetDateTime + Send + Sync>);

impl Clock {
    /// The system clock (UTC).
    pub fn system() -> Clock {
        Clock(Arc::new(OffsetDateTime::now_utc))
    }

    /// A clock that asks `now`.
    pub fn from_fn(now: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    /// A clock that always says `at`.
    pub fn fixed(at: OffsetDateTime) -> Clock {
        Clock(Arc::new(move || at))
    }

    /// Now, by this clock.
    pub fn now(&self) -> OffsetDateTime {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Webhook faults. Rates are probabilities per event, from 0.0 to 1.0.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Send a delivery twice (the copy re-signed after the first was answered, or, with
    /// `simultaneous_duplicates`, two identical requests at the same instant).
    pub duplicate_rate: f64,
    /// Send duplicates at the same instant with identical headers.
    pub simultaneous_duplicates: bool,
    /// Hold events back for `reorder_window` and send them shuffled.
    pub reorder: bool,
    /// Never deliver the event, as if every attempt had failed.
    pub drop_rate: f64,
    /// First send a correctly signed copy with a timestamp 400 s old (must be refused).
    pub stale_rate: f64,
    /// First send a copy signed with a wrong secret (must be refused).
    pub bad_signature_rate: f64,
    /// First send a copy with `sha256=` and nothing after it (must be refused).
    pub empty_signature_rate: f64,
    /// With two or more secrets: sign some retries and duplicates with an older secret.
    pub rotate_secret: bool,
}

/// REST faults.
#[derive(Clone, Debug, Default)]
pub struct ApiFaults {
    /// Probability that a `/v1` request is answered 500/502/503 before it does anything.
    pub fail_rate: f64,
    /// Probability that a create is answered 500 **after** the intent was created (the client must
    /// retry with the same idempotency key and get the same intent).
    pub fail_after_rate: f64,
    /// Answer 429 beyond this many `/v1` requests per minute (all keys together).
    pub rate_limit_per_minute: Option<u32>,
    /// Send `Retry-After` with a 429 (the provider does not document it, so off by default).
    pub retry_after: bool,
    /// Answer a create that repeats an idempotency key with the same body `409` with the original
    /// intent as the body, instead of `200` (provider-api.md §2.5: what a real 409 carries is
    /// undocumented; a different body is always a `409` with an error body).
    pub replay_409: bool,
    /// Intent objects carry a `qr_payload` for the wrong chain (Ethereum mainnet, `@1`), which
    /// the gateway's EIP-681 check must refuse (provider-api.md §7).
    pub bad_qr: bool,
}

/// How to start a [`ProviderSim`](super::ProviderSim).
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// Where webhooks go (the gateway's `/webhooks/stablegenius`).
    pub webhook_url: String,
    /// Webhook secrets: the last one is current; earlier ones are older (rotation overlap).
    pub webhook_secrets: Vec<SecretString>,
    /// The only accepted API key; `None` accepts any `sk_test_…` or `sk_live_…` key.
    pub api_key: Option<SecretString>,
    /// Multiplies every provider delay (confirmation, ttl, retries). 1.0 is real time.
    pub time_scale: f64,
    /// The on-chain confirmation delay before a payment's events, unscaled (default 3 s).
    pub confirm_delay: Duration,
    /// Timeout of one webhook POST (the provider's 5 s), not scaled.
    pub delivery_timeout: Duration,
    /// How long `reorder` holds events back, not scaled.
    pub reorder_window: Duration,
    /// How long an idempotency key is honoured (24 h), not scaled.
    pub idempotency_window: Duration,
    /// The merchant of transfers to unknown addresses.
    pub merchant_id: String,
    /// Webhook faults.
    pub faults: Faults,
    /// REST faults.
    pub api_faults: ApiFaults,
    /// The provider's clock.
    pub clock: Clock,
}

impl ProviderConfig {
    /// Defaults: listen on `127.0.0.1:0`, real time, no faults, any test or live key.
    pub fn new(webhook_url: impl Into<String>, webhook_secret: impl Into<String>) -> Self {
        ProviderConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            webhook_url: webhook_url.into(),
            webhook_secrets: vec![SecretString::from(webhook_secret.into())],
            api_key: None,
            time_scale: 1.0,
            confirm_delay: Duration::from_secs(3),
            delivery_timeout: Duration::from_secs(5),
            reorder_window: Duration::from_millis(500),
            idempotency_window: Duration::from_secs(24 * 60 * 60),
            merchant_id: "mer_sim".into(),
            faults: Faults::default(),
            api_faults: ApiFaults::default(),
            clock: Clock::system(),
        }
    }

    /// Checks rates, the time scale and the secrets.
    ///
    /// # Errors
    /// A message naming the first bad setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.time_scale.is_finite() || !(0.0..=1000.0).contains(&self.time_scale) {
            bail!("time scale must be from 0 to 1000, not {}", self.time_scale);
        }
        let f = &self.faults;
        let a = &self.api_faults;
        for (name, rate) in [
            ("duplicate rate", f.duplicate_rate),
            ("drop rate", f.drop_rate),
            ("stale rate", f.stale_rate),
            ("bad signature rate", f.bad_signature_rate),
            ("empty signature rate", f.empty_signature_rate),
            ("fail rate", a.fail_rate),
            ("fail-after rate", a.fail_after_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                bail!("{name} must be from 0.0 to 1.0, not {rate}");
            }
        }
        if self.webhook_secrets.is_empty() {
            bail!("at least one webhook secret is needed");
        }
        if f.rotate_secret && self.webhook_secrets.len() < 2 {
            bail!("rotating the secret needs two webhook secrets (old, then new)");
        }
        if !self.merchant_id.starts_with("mer_") {
            bail!("merchant id must start with mer_");
        }
        Ok(())
    }
}
