//! Webhook delivery: every event POSTed to the webhook URL with the provider's headers
//! (provider-api.md §3.1), retried on the §5 schedule, with the faults of §9 injected on request.
//!
//! Each attempt is signed afresh: a new `X-StableGenius-Timestamp` and a new HMAC over
//! `"{timestamp}.{body}"`, through [`events::signed_headers`] (so [`posgate_proto::sign`]). The body
//! bytes never change between attempts, duplicates or forged copies: only the headers do.
//!
//! Why an event is split into a first round and a retry tail: with `reorder`, a held-back batch
//! sends its first attempts one after another in shuffled order, and only the failures continue on
//! their own retry schedules.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use rand::Rng;
use rand::seq::SliceRandom;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{Clock, Faults, scaled};
use crate::events;

/// The provider's retry delays after a failed attempt (provider-api.md §5): 1 min, 5 min, 30 min,
/// 2 h, 12 h. With the first attempt that makes six attempts in total.
pub const RETRY_SCHEDULE: [Duration; 5] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 60 * 60),
    Duration::from_secs(12 * 60 * 60),
];

/// Attempts per event, the first included.
pub const MAX_ATTEMPTS: u32 = RETRY_SCHEDULE.len() as u32 + 1;

/// How old a stale copy's timestamp is: past the documented 300 s tolerance.
pub const STALE_AGE_SECS: i64 = 400;

/// The retry delays multiplied by `time_scale`.
pub fn retry_delays(time_scale: f64) -> [Duration; 5] {
    RETRY_SCHEDULE.map(|d| scaled(d, time_scale))
}

/// The two headers of one delivery of `body` signed with `secret` at `timestamp` (exactly what goes
/// on the wire).
pub fn headers(secret: &SecretString, timestamp: i64, body: &[u8]) -> [(&'static str, String); 2] {
    events::signed_headers(secret.expose_secret(), timestamp, body)
}

/// How one POST ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Any 2xx.
    Ok,
    /// 401.
    Unauthorized,
    /// Any other status.
    Other,
    /// No answer within the delivery timeout.
    Timeout,
    /// Connection refused, reset, or another transport error.
    Error,
}

/// What was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptKind {
    /// A correctly signed attempt (first or retry).
    Genuine,
    /// A correctly signed extra copy (`duplicate_rate`).
    Duplicate,
    /// A copy signed with a secret the gateway does not know.
    BadSignature,
    /// A copy with `sha256=` and nothing after it.
    EmptySignature,
    /// A correctly signed copy whose timestamp is [`STALE_AGE_SECS`] old.
    Stale,
}

/// One POST of an event.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    /// What was sent.
    pub kind: AttemptKind,
    /// 1-based attempt number of the genuine schedule this belongs to.
    pub attempt: u32,
    /// The timestamp header sent.
    pub timestamp: i64,
    /// Index into the webhook secrets of the one that signed it (none for forgeries).
    pub secret_index: Option<usize>,
    /// The HTTP status, if one came back.
    pub status: Option<u16>,
    /// How it ended.
    pub outcome: Outcome,
}

/// Where an event's delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Queued, held back, or waiting for a retry.
    Pending,
    /// A genuine attempt got a 2xx.
    Delivered,
    /// Dropped on purpose (`drop_rate`): never sent, as if every attempt had failed.
    Dropped,
    /// Every attempt failed.
    GaveUp,
    /// The simulator stopped before the event was delivered.
    Abandoned,
}

/// One event and everything sent for it.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRecord {
    /// `evt_…`.
    pub event_id: String,
    /// The event type.
    pub kind: String,
    /// The intent it is about, if any.
    pub intent_id: Option<String>,
    /// Where it stands.
    pub state: DeliveryState,
    /// Every POST, in order.
    pub attempts: Vec<Attempt>,
}

/// Counts by [`Outcome`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// 2xx answers.
    pub ok: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// Other statuses.
    pub other: u64,
    /// Timeouts.
    pub timeout: u64,
    /// Transport errors.
    pub error: u64,
}

impl Outcomes {
    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Unauthorized => self.unauthorized += 1,
            Outcome::Other => self.other += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Error => self.error += 1,
        }
    }

    /// All POSTs counted.
    pub fn total(&self) -> u64 {
        self.ok + self.unauthorized + self.other + self.timeout + self.error
    }
}

/// What the webhook side did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryStats {
    /// Events emitted, all types.
    pub events_emitted: u64,
    /// Events emitted by type.
    pub events_by_type: BTreeMap<String, u64>,
    /// Correctly signed POSTs (first attempts, retries and duplicates) by outcome.
    pub attempts: Outcomes,
    /// Retries (genuine attempts after the first).
    pub retries: u64,
    /// Events with a 2xx.
    pub delivered: u64,
    /// Events not finished yet.
    pub pending: u64,
    /// Events dropped on purpose (never sent).
    pub dropped: u64,
    /// Events whose six attempts all failed.
    pub gave_up: u64,
    /// Extra correctly signed copies sent.
    pub duplicates_sent: u64,
    /// Forged copies sent (bad plus empty signature).
    pub forgeries_sent: u64,
    /// Of those, with a wrong MAC.
    pub bad_signature_sent: u64,
    /// Of those, with `sha256=` only.
    pub empty_signature_sent: u64,
    /// Answers to forged copies: `unauthorized` is right, `ok` is a gateway bug.
    pub forgeries: Outcomes,
    /// Stale-timestamp copies sent.
    pub stale_sent: u64,
    /// Answers to stale copies: `unauthorized` is right.
    pub stale: Outcomes,
    /// Genuine POSTs signed with an older secret (rotation overlap).
    pub old_secret_signed: u64,
}

/// An event ready to send.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub id: String,
    pub kind: String,
    pub intent_id: Option<String>,
    pub body: Bytes,
}

#[derive(Default)]
struct Book {
    stats: DeliveryStats,
    records: Vec<DeliveryRecord>,
    index: HashMap<String, usize>,
}

/// Sends events. Shared by the API, the control endpoints and the in-process handle.
pub(crate) struct Deliverer {
    url: RwLock<String>,
    secrets: RwLock<Vec<SecretString>>,
    faults: Faults,
    time_scale: f64,
    timeout: Duration,
    reorder_window: Duration,
    http: reqwest::Client,
    clock: Clock,
    book: Mutex<Book>,
    queue: mpsc::UnboundedSender<Event>,
    forged_counter: AtomicU64,
    token: CancellationToken,
    tracker: TaskTracker,
}

/// Settings of a [`Deliverer`].
pub(crate) struct Settings {
    pub url: String,
    pub secrets: Vec<SecretString>,
    pub faults: Faults,
    pub time_scale: f64,
    pub timeout: Duration,
    pub reorder_window: Duration,
    pub clock: Clock,
}

impl Deliverer {
    /// Creates the deliverer and spawns its dispatcher on `tracker`.
    pub(crate) fn spawn(
        settings: Settings,
        token: CancellationToken,
        tracker: TaskTracker,
    ) -> anyhow::Result<Arc<Deliverer>> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(settings.timeout)
            .build()?;
        let (queue, rx) = mpsc::unbounded_channel();
        let deliverer = Arc::new(Deliverer {
            url: RwLock::new(settings.url),
            secrets: RwLock::new(settings.secrets),
            faults: settings.faults,
            time_scale: settings.time_scale,
            timeout: settings.timeout,
            reorder_window: settings.reorder_window,
            http,
            clock: settings.clock,
            book: Mutex::new(Book::default()),
            queue,
            forged_counter: AtomicU64::new(0),
            token,
            tracker: tracker.clone(),
        });
        let d = Arc::clone(&deliverer);
        tracker.spawn(
            async move { d.dispatch(rx).await }.instrument(tracing::info_span!("webhook_dispatch")),
        );
        Ok(deliverer)
    }

    /// Points deliveries (including pending retries) at another URL.
    pub(crate) fn set_url(&self, url: String) {
        if let Ok(mut u) = self.url.write() {
            *u = url;
        }
    }

    /// Replaces the webhook secrets (the last one signs; older ones sign some retries when
    /// `rotate_secret` is on).
    pub(crate) fn set_secrets(&self, secrets: Vec<SecretString>) {
        if let Ok(mut s) = self.secrets.write() {
            *s = secrets;
        }
    }

    /// Queues an event for delivery.
    pub(crate) fn emit(&self, event: Event) {
        if let Ok(mut book) = self.book.lock() {
            book.stats.events_emitted += 1;
            *book
                .stats
                .events_by_type
                .entry(event.kind.clone())
                .or_default() += 1;
            book.stats.pending += 1;
            let index = book.records.len();
            book.records.push(DeliveryRecord {
                event_id: event.id.clone(),
                kind: event.kind.clone(),
                intent_id: event.intent_id.clone(),
                state: DeliveryState::Pending,
                attempts: Vec::new(),
            });
            book.index.insert(event.id.clone(), index);
        }
        tracing::debug!(event_id = %event.id, kind = %event.kind, "event emitted");
        // The receiver lives as long as the dispatcher; after shutdown the event is abandoned.
        if self.queue.send(event).is_err() {
            tracing::debug!("event emitted after shutdown");
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> DeliveryStats {
        self.book
            .lock()
            .map(|b| b.stats.clone())
            .unwrap_or_default()
    }

    /// Every event's delivery record, in emission order.
    pub(crate) fn records(&self) -> Vec<DeliveryRecord> {
        self.book
            .lock()
            .map(|b| b.records.clone())
            .unwrap_or_default()
    }

    /// Marks everything still pending as abandoned (at shutdown).
    pub(crate) fn abandon_pending(&self) {
        if let Ok(mut book) = self.book.lock() {
            for r in &mut book.records {
                if r.state == DeliveryState::Pending {
                    r.state = DeliveryState::Abandoned;
                }
            }
        }
    }

    async fn dispatch(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Event>) {
        let mut held: Vec<Event> = Vec::new();
        // Set when the first event of a batch is held back; the batch goes out when it passes.
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            let flush = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.token.cancelled() => return,
                () = flush => {
                    flush_at = None;
                    let mut batch = std::mem::take(&mut held);
                    batch.shuffle(&mut rand::rng());
                    let d = Arc::clone(&self);
                    self.tracker.spawn(
                        async move { d.send_batch(batch).await }
                            .instrument(tracing::info_span!("webhook_batch")),
                    );
                }
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    if self.faults.reorder {
                        if held.is_empty() {
                            flush_at = Some(tokio::time::Instant::now() + self.reorder_window);
                        }
                        held.push(event);
                    } else {
                        let d = Arc::clone(&self);
                        let span = tracing::info_span!("webhook", event_id = %event.id);
                        self.tracker
                            .spawn(async move { d.send_batch(vec![event]).await }.instrument(span));
                    }
                }
            }
        }
    }

    /// First rounds one after another; each failure continues on its own schedule.
    async fn send_batch(self: Arc<Self>, batch: Vec<Event>) {
        for event in batch {
            let done = tokio::select! {
                () = self.token.cancelled() => return,
                done = self.first_round(&event) => done,
            };
            if !done {
                let d = Arc::clone(&self);
                let span = tracing::info_span!("webhook_retries", event_id = %event.id);
                self.tracker.spawn(
                    async move {
                        tokio::select! {
                            () = d.token.cancelled() => {}
                            () = d.retry_tail(&event) => {}
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }

    /// Drop decision, forged and stale copies, then the first genuine attempt. Returns whether the
    /// event is finished (delivered or dropped).
    async fn first_round(&self, event: &Event) -> bool {
        let (drop, bad, empty, stale, duplicate) = {
            let mut rng = rand::rng();
            let f = &self.faults;
            (
                rng.random_bool(f.drop_rate),
                rng.random_bool(f.bad_signature_rate),
                rng.random_bool(f.empty_signature_rate),
                rng.random_bool(f.stale_rate),
                rng.random_bool(f.duplicate_rate),
            )
        };
        if drop {
            self.finish(&event.id, DeliveryState::Dropped);
            tracing::debug!(event_id = %event.id, "dropped on purpose");
            return true;
        }
        if bad {
            let n = self.forged_counter.fetch_add(1, Ordering::Relaxed);
            let forged = SecretString::from(format!("whsec_forged_{n}_{}", event.id));
            let ts = self.now_unix();
            let [(_, t), (_, s)] = headers(&forged, ts, &event.body);
            self.send_one(event, AttemptKind::BadSignature, 1, None, t, s)
                .await;
        }
        if empty {
            let ts = self.now_unix();
            self.send_one(
                event,
                AttemptKind::EmptySignature,
                1,
                None,
                ts.to_string(),
                "sha256=".into(),
            )
            .await;
        }
        if stale {
            let ts = self.now_unix() - STALE_AGE_SECS;
            let (index, secret) = self.pick_secret(false);
            let [(_, t), (_, s)] = headers(&secret, ts, &event.body);
            self.send_one(event, AttemptKind::Stale, 1, Some(index), t, s)
                .await;
        }
        let ok = if duplicate && self.faults.simultaneous_duplicates {
            // Identical bytes and headers, at the same instant.
            let (index, secret) = self.pick_secret(false);
            let [(_, t), (_, s)] = headers(&secret, self.now_unix(), &event.body);
            let (a, b) = tokio::join!(
                self.send_one(
                    event,
                    AttemptKind::Genuine,
                    1,
                    Some(index),
                    t.clone(),
                    s.clone()
                ),
                self.send_one(event, AttemptKind::Duplicate, 1, Some(index), t, s),
            );
            a == Outcome::Ok || b == Outcome::Ok
        } else {
            self.genuine(event, 1).await == Outcome::Ok
        };
        if ok {
            if duplicate && !self.faults.simultaneous_duplicates {
                // The same delivery again, re-signed, after the first one was answered.
                let (index, secret) = self.pick_secret(true);
                let [(_, t), (_, s)] = headers(&secret, self.now_unix(), &event.body);
                self.send_one(event, AttemptKind::Duplicate, 1, Some(index), t, s)
                    .await;
            }
            self.finish(&event.id, DeliveryState::Delivered);
        }
        ok
    }

    /// Attempts 2..=6 on the scaled schedule.
    async fn retry_tail(&self, event: &Event) {
        for (i, delay) in retry_delays(self.time_scale).into_iter().enumerate() {
            tokio::time::sleep(delay).await;
            let attempt = i as u32 + 2;
            if self.genuine(event, attempt).await == Outcome::Ok {
                self.finish(&event.id, DeliveryState::Delivered);
                return;
            }
        }
        tracing::debug!(event_id = %event.id, "gave up after {MAX_ATTEMPTS} attempts");
        self.finish(&event.id, DeliveryState::GaveUp);
    }

    /// One correctly signed attempt, with a fresh timestamp.
    async fn genuine(&self, event: &Event, attempt: u32) -> Outcome {
        let (index, secret) = self.pick_secret(attempt > 1);
        let [(_, t), (_, s)] = headers(&secret, self.now_unix(), &event.body);
        self.send_one(event, AttemptKind::Genuine, attempt, Some(index), t, s)
            .await
    }

    /// The current (last) secret, or, for a retry while rotating, sometimes an older one.
    fn pick_secret(&self, retry: bool) -> (usize, SecretString) {
        let secrets = match self.secrets.read() {
            Ok(s) => s.clone(),
            Err(_) => Vec::new(),
        };
        let Some(last) = secrets.len().checked_sub(1) else {
            // No secret: sign with an empty key; the gateway must refuse it.
            return (0, SecretString::from(String::new()));
        };
        let mut index = last;
        if self.faults.rotate_secret && retry && last > 0 {
            let mut rng = rand::rng();
            if rng.random_bool(0.5) {
                index = rng.random_range(0..last);
            }
        }
        (index, secrets[index].clone())
    }

    fn now_unix(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    async fn send_one(
        &self,
        event: &Event,
        kind: AttemptKind,
        attempt: u32,
        secret_index: Option<usize>,
        timestamp: String,
        signature: String,
    ) -> Outcome {
        let url = self.url.read().map(|u| u.clone()).unwrap_or_default();
        let result = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(event.body.clone())
            .send()
            .await;
        let (status, outcome) = match result {
            Ok(r) => {
                let status = r.status();
                // Read the answer so the connection can be reused.
                drop(r.bytes().await);
                let outcome = if status.is_success() {
                    Outcome::Ok
                } else if status.as_u16() == 401 {
                    Outcome::Unauthorized
                } else {
                    Outcome::Other
                };
                (Some(status.as_u16()), outcome)
            }
            Err(e) if e.is_timeout() => (None, Outcome::Timeout),
            Err(e) => {
                tracing::debug!(error = %e, "webhook POST failed");
                (None, Outcome::Error)
            }
        };
        tracing::debug!(event_id = %event.id, ?kind, attempt, ?status, ?outcome, "webhook sent");
        let current = self.secrets.read().map(|s| s.len()).unwrap_or(0);
        if let Ok(mut book) = self.book.lock() {
            let stats = &mut book.stats;
            match kind {
                AttemptKind::Genuine | AttemptKind::Duplicate => {
                    stats.attempts.add(outcome);
                    if kind == AttemptKind::Duplicate {
                        stats.duplicates_sent += 1;
                    } else if attempt > 1 {
                        stats.retries += 1;
                    }
                    if secret_index.is_some_and(|i| i + 1 < current) {
                        stats.old_secret_signed += 1;
                    }
                }
                AttemptKind::BadSignature | AttemptKind::EmptySignature => {
                    stats.forgeries_sent += 1;
                    if kind == AttemptKind::BadSignature {
                        stats.bad_signature_sent += 1;
                    } else {
                        stats.empty_signature_sent += 1;
                    }
                    stats.forgeries.add(outcome);
                    if outcome == Outcome::Ok {
                        tracing::warn!(event_id = %event.id, "a forged webhook was accepted");
                    }
                }
                AttemptKind::Stale => {
                    stats.stale_sent += 1;
                    stats.stale.add(outcome);
                }
            }
            if let Some(&i) = book.index.get(&event.id) {
                book.records[i].attempts.push(Attempt {
                    kind,
                    attempt,
                    timestamp: timestamp.parse().unwrap_or_default(),
                    secret_index,
                    status,
                    outcome,
                });
            }
        }
        outcome
    }

    fn finish(&self, event_id: &str, state: DeliveryState) {
        if let Ok(mut book) = self.book.lock() {
            let Some(&i) = book.index.get(event_id) else {
                return;
            };
            if book.records[i].state != DeliveryState::Pending {
                return;
            }
            book.records[i].state = state;
            book.stats.pending = book.stats.pending.saturating_sub(1);
            match state {
                DeliveryState::Delivered => book.stats.delivered += 1,
                DeliveryState::Dropped => book.stats.dropped += 1,
                DeliveryState::GaveUp => book.stats.gave_up += 1,
                DeliveryState::Pending | DeliveryState::Abandoned => {}
            }
        }
    }

    /// The per-request timeout (for logs and docs).
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}
