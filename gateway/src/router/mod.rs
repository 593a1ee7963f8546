//! The router: outbox → broker publish, acks → outbox clear, terminal presence.
//!
//! The outbox rows in the store are the truth; everything here is a cache that can be rebuilt from
//! them. The router republishes every unacked row at startup, a terminal's rows (in `seq` order)
//! whenever it connects, and any row unacked for `republish_after` (the broker keeps nothing across
//! a restart, and a resumed MQTT session does not always resend retained messages). Publishing is
//! idempotent: the signed bytes of a row never change, and terminals deduplicate by intent and seq.
//!
//! Delivery is stop-and-wait per terminal (see [`Router`]), which keeps `seq` order on the wire.
//! One task owns the state; acks are stored off the loop, at most one write in flight, acks that
//! arrive meanwhile batched into the next, and report back to it. An ack of the head moves the
//! terminal on at once, without waiting for that write (see [`Router`]).
//!
//! The broker is behind [`Publisher`] and [`BrokerEvent`], so this module is tested over channels.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use posgate_proto::confirmation::{self, Ack, StatusMessage};
use posgate_proto::topics::{self, TopicKind};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::rpc::Rpc;
use crate::store::{AckOutcome, OutboxRow, Store};

/// Why a publish failed (the row stays in the outbox and is published again later).
#[derive(Debug, thiserror::Error)]
#[error("publishing to {topic}: {message}")]
pub struct PublishError {
    pub topic: String,
    pub message: String,
}

/// What the router needs from the broker.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes a retained QoS 1 message (an empty payload clears the topic's retained message).
    fn publish_retained(
        &self,
        topic: String,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Publishes a QoS 1 message that is not retained (RPC replies).
    fn publish(
        &self,
        topic: String,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// What the broker tells the router, each about a terminal identified by its verified certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerEvent {
    Connected {
        terminal_id: String,
    },
    Disconnected {
        terminal_id: String,
    },
    /// The terminal was revoked; `parked` are its confirmations that left the outbox with it
    /// (now undeliverable).
    Revoked {
        terminal_id: String,
        parked: Vec<OutboxRow>,
    },
    /// A publish the terminal made under its own tenant.
    Message {
        terminal_id: String,
        kind: TopicKind,
        payload: Bytes,
    },
}

/// A terminal's presence as the registry shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PresenceEntry {
    pub online: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// Shared, read by the admin API.
pub type Presence = Arc<RwLock<HashMap<String, PresenceEntry>>>;

/// Router settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A row unacked for this long since its last publish is published again.
    pub republish_after: Duration,
}

/// The gateway's confirmation signer.
#[derive(Clone)]
pub struct Signer {
    pub key: SigningKey,
    pub kid: String,
}

impl Signer {
    /// The JWS of a row (deterministic: Ed25519 signatures of the same bytes are identical).
    pub fn sign(&self, row: &OutboxRow) -> Bytes {
        Bytes::from(confirmation::sign(&self.key, &self.kid, &row.confirmation))
    }
}

/// A confirmation the router just put on the wire (first publish or republish), for the HTTP
/// channels (`ingress::terminal`), which carry the same bytes to terminals without MQTT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub terminal_id: String,
    pub intent_id: String,
    pub seq: u64,
    /// The JWS, byte for byte what the MQTT topic carries.
    pub jws: Bytes,
}

enum Internal {
    /// Rows read from the store: the whole outbox at startup, or one terminal's on reconnect.
    Loaded {
        terminal_id: Option<String>,
        rows: Vec<OutboxRow>,
    },
    /// The outcome of one ack write: every ack it carried, in order (`None`: not stored; the row
    /// stays and is published again, and the terminal acks again).
    Acked {
        outcomes: Vec<(PendingAck, Option<AckOutcome>)>,
        /// The write failed, and the task waited this long before reporting (see
        /// [`Router::flush_acks`]).
        failed_after: Option<Duration>,
    },
}

/// First and longest pause after an ack write the store refused, before its outcome is acted on
/// (which republishes the rows it did not remove) and the next ack write.
const ACK_RETRY_FIRST: Duration = Duration::from_millis(250);
const ACK_RETRY_MAX: Duration = Duration::from_secs(30);

/// An ack on its way to the store.
struct PendingAck {
    terminal_id: String,
    ack: Ack,
    /// It acked the terminal's head, which the router has already dropped from the queue (and
    /// whose successor it has already published).
    advanced: bool,
}

/// One terminal's unacked rows, mirrored from the store, and whether its head is on the wire.
#[derive(Default)]
struct Queue {
    rows: BTreeMap<u64, OutboxRow>,
    /// When the head row was last published.
    head_published: Option<Instant>,
    /// The highest seq published at least once (to tell first publishes from republishes).
    last_seq_published: u64,
}

/// The router task.
///
/// Delivery is stop-and-wait per terminal: only the lowest unacked `seq` (the head) is on the
/// wire; the next one is published when the head is acked. Retained messages are handed out by the
/// broker in its own order on (re)subscribe, so this is what makes "in `seq` order" hold across
/// reconnects; a terminal handles one payment at a time, so one message in flight costs nothing.
///
/// The terminal's ack of its head moves it on at once: the head leaves the queue, its retained
/// message is cleared and the next row is published, while the ack is still being stored. The
/// terminal has the acked row, so order on the wire is kept; the row stays in the outbox until the
/// ack is stored, and if the store does not confirm it, the terminal's queue is read again from
/// the outbox (the row goes out once more; terminals deduplicate). Waiting for the ack's write
/// instead would add a store round trip to every confirmation that queued behind another.
pub struct Router<P> {
    store: Store,
    publisher: Arc<P>,
    signer: Signer,
    settings: Settings,
    presence: Presence,
    metrics: Metrics,
    queues: HashMap<String, Queue>,
    /// Presence changes not yet written to the registry.
    last_seen: HashMap<String, OffsetDateTime>,
    /// Terminal RPC (`None` in tests that do not need it).
    rpc: Option<Arc<Rpc>>,
    /// Told about every publish of a head row (`None` when nothing listens).
    published: Option<broadcast::Sender<Published>>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    /// Acks waiting for the next ack write.
    acks: Vec<PendingAck>,
    /// An ack write is on its way (its outcome comes back as [`Internal::Acked`]).
    ack_in_flight: bool,
    /// The pause after the last ack write, when it failed: a failing store slows republishing
    /// down instead of storming the terminals.
    ack_retry: Option<Duration>,
    /// Terminals revoked while running: a notice of their rows committed just before the
    /// revocation may arrive after it, and must not queue them again.
    revoked: HashSet<String>,
    /// Where the router's own tasks run (store reads and writes, RPC answers): the gateway's
    /// tracker, so that shutdown waits for them before closing the store.
    tasks: TaskTracker,
}

impl<P: Publisher> Router<P> {
    pub fn new(
        store: Store,
        publisher: Arc<P>,
        signer: Signer,
        settings: Settings,
        presence: Presence,
        metrics: Metrics,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        Router {
            store,
            publisher,
            signer,
            settings,
            presence,
            metrics,
            queues: HashMap::new(),
            last_seen: HashMap::new(),
            rpc: None,
            published: None,
            internal_tx,
            internal_rx,
            acks: Vec::new(),
            ack_in_flight: false,
            ack_retry: None,
            revoked: HashSet::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Runs the router's own tasks in `tracker` (the gateway's), so that shutdown waits for them.
    pub fn with_tracker(mut self, tracker: TaskTracker) -> Self {
        self.tasks = tracker;
        self
    }

    /// Answers the terminals' RPC requests with `rpc`.
    pub fn with_rpc(mut self, rpc: Arc<Rpc>) -> Self {
        self.rpc = Some(rpc);
        self
    }

    /// Sends every publish and republish of a head row to `published` as well (the HTTP
    /// channels), so they carry the same bytes at the same moments as MQTT.
    pub fn with_published(mut self, published: broadcast::Sender<Published>) -> Self {
        self.published = Some(published);
        self
    }

    /// Runs until `token` is cancelled or the broker's event stream ends.
    pub async fn run(
        mut self,
        mut rows: mpsc::UnboundedReceiver<Vec<OutboxRow>>,
        mut events: mpsc::UnboundedReceiver<BrokerEvent>,
        token: CancellationToken,
    ) {
        // Everything unacked, from before a restart or a crash.
        self.load(None);
        let period = (self.settings.republish_after / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                Some(batch) = rows.recv() => self.add_rows(batch).await,
                Some(internal) = self.internal_rx.recv() => match internal {
                    Internal::Loaded { terminal_id, rows } => self.loaded(terminal_id, rows).await,
                    Internal::Acked { outcomes, failed_after } => {
                        self.ack_in_flight = false;
                        self.ack_retry = failed_after;
                        for (pending, outcome) in outcomes {
                            self.acked(pending, outcome).await;
                        }
                        self.flush_acks();
                    }
                },
                event = events.recv() => match event {
                    Some(event) => self.event(event).await,
                    None => break,
                },
                _ = tick.tick() => {
                    self.republish_stale().await;
                    self.flush_last_seen();
                }
            }
        }
        // The last presence changes are written before the router ends, so before the store
        // closes (shutdown waits for the router, then closes the store).
        if let Some(write) = self.last_seen_write() {
            write.await;
        }
    }

    /// Reads unacked rows (one terminal's, or all) off the loop and feeds them back to it.
    fn load(&self, terminal_id: Option<String>) {
        let (store, tx) = (self.store.clone(), self.internal_tx.clone());
        self.tasks.spawn(async move {
            // Retried until it succeeds (or the router is gone): the startup load is the only way
            // rows from before a restart get back on the wire.
            let mut pause = Duration::from_millis(100);
            loop {
                match store.outbox(terminal_id.clone()).await {
                    Ok(rows) => {
                        drop(tx.send(Internal::Loaded { terminal_id, rows }));
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, error_chain = ?e, terminal_id = ?terminal_id, retry_in_ms = pause.as_millis() as u64, "cannot read the outbox");
                    }
                }
                tokio::time::sleep(pause).await;
                if tx.is_closed() {
                    return;
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// New rows committed by the store.
    async fn add_rows(&mut self, rows: Vec<OutboxRow>) {
        let mut touched = Vec::new();
        for row in rows {
            if self.revoked.contains(&row.terminal_id) {
                continue;
            }
            let id = row.terminal_id.clone();
            self.queues
                .entry(id.clone())
                .or_default()
                .rows
                .insert(row.seq, row);
            if !touched.contains(&id) {
                touched.push(id);
            }
        }
        for id in touched {
            self.publish_head(&id, false).await;
        }
    }

    /// The store's view replaces ours (rows acked meanwhile disappear, none are missed).
    async fn loaded(&mut self, terminal_id: Option<String>, rows: Vec<OutboxRow>) {
        let mut fresh: HashMap<String, BTreeMap<u64, OutboxRow>> = HashMap::new();
        for row in rows {
            fresh
                .entry(row.terminal_id.clone())
                .or_default()
                .insert(row.seq, row);
        }
        // A reconnect republishes its head; the startup load only publishes heads not yet out.
        let force = terminal_id.is_some();
        let ids: Vec<String> = match terminal_id {
            Some(id) => vec![id],
            None => fresh.keys().cloned().collect(),
        };
        for id in ids {
            let rows = fresh.remove(&id).unwrap_or_default();
            let queue = self.queues.entry(id.clone()).or_default();
            // Rows that arrived by notice after the read began are newer than what it saw.
            let newest_read = rows.keys().next_back().copied().unwrap_or(0);
            let newer: Vec<(u64, OutboxRow)> = queue
                .rows
                .iter()
                .filter(|(s, _)| **s > newest_read)
                .map(|(s, r)| (*s, r.clone()))
                .collect();
            let head_before = queue.rows.keys().next().copied();
            queue.rows = rows;
            queue.rows.extend(newer);
            if queue.rows.keys().next().copied() != head_before {
                queue.head_published = None;
            }
            self.publish_head(&id, force).await;
        }
    }

    /// Publishes the terminal's head row, unless it is already on the wire (or `force`).
    async fn publish_head(&mut self, terminal_id: &str, force: bool) {
        let Some(queue) = self.queues.get_mut(terminal_id) else {
            return;
        };
        let Some(head) = queue.rows.values().next() else {
            self.queues.remove(terminal_id);
            return;
        };
        if queue.head_published.is_some() && !force {
            return;
        }
        queue.head_published = Some(Instant::now());
        if head.seq > queue.last_seq_published {
            queue.last_seq_published = head.seq;
            self.metrics.published.inc();
        } else {
            self.metrics.republished.inc();
        }
        self.metrics.broker_publishes.inc();
        let topic = topics::payments(&head.tenant, &head.intent_id);
        let payload = self.signer.sign(head);
        let seq = head.seq;
        if let Some(published) = &self.published {
            // No receiver (no HTTP client connected) is not an error.
            drop(published.send(Published {
                terminal_id: terminal_id.to_owned(),
                intent_id: head.intent_id.clone(),
                seq,
                jws: payload.clone(),
            }));
        }
        if let Err(e) = self.publisher.publish_retained(topic, payload).await {
            tracing::warn!(error = %e, %terminal_id, seq, "publish failed; will retry");
        }
    }

    async fn republish_stale(&mut self) {
        let now = Instant::now();
        let stale: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| {
                q.head_published
                    .is_some_and(|at| now.duration_since(at) >= self.settings.republish_after)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            tracing::debug!(terminal_id = %id, "republishing an unacked confirmation");
            self.publish_head(&id, true).await;
        }
    }

    async fn event(&mut self, event: BrokerEvent) {
        match event {
            BrokerEvent::Connected { terminal_id } => {
                self.set_presence(&terminal_id, true);
                // A resumed session does not always get retained messages again: republish the
                // head. The queues mirror the outbox (loaded at startup, then every commit's new
                // rows), so no read is needed here; a reconnect storm costs no store work.
                self.publish_head(&terminal_id, true).await;
            }
            BrokerEvent::Disconnected { terminal_id } => self.set_presence(&terminal_id, false),
            BrokerEvent::Revoked {
                terminal_id,
                parked,
            } => {
                self.set_presence(&terminal_id, false);
                self.queues.remove(&terminal_id);
                let mut cleared = HashSet::new();
                for row in &parked {
                    if cleared.insert(row.intent_id.as_str()) {
                        self.clear(row, true).await;
                    }
                }
                self.revoked.insert(terminal_id);
            }
            BrokerEvent::Message {
                terminal_id,
                kind,
                payload,
            } => match kind {
                TopicKind::Acks => self.ack(terminal_id, &payload).await,
                TopicKind::Status => match serde_json::from_slice::<StatusMessage>(&payload) {
                    Ok(status) => self.set_presence(&terminal_id, status.is_online()),
                    Err(_) if payload.is_empty() => {}
                    Err(e) => {
                        tracing::debug!(%terminal_id, error = %e, "unreadable status message")
                    }
                },
                TopicKind::RpcReq => self.rpc(terminal_id, payload),
                other => {
                    tracing::debug!(%terminal_id, kind = ?other, "message not handled by the router")
                }
            },
        }
    }

    fn set_presence(&mut self, terminal_id: &str, online: bool) {
        let now = OffsetDateTime::now_utc();
        let changed = match self.presence.write() {
            Ok(mut map) => {
                let changed = map.get(terminal_id).is_none_or(|p| p.online != online);
                if changed {
                    map.insert(terminal_id.to_owned(), PresenceEntry { online, since: now });
                }
                changed
            }
            Err(_) => false,
        };
        if changed {
            tracing::info!(%terminal_id, online, "terminal presence");
            // Written in batches by the periodic tick: a reconnect storm must not become a
            // storm of writes.
            self.last_seen.insert(terminal_id.to_owned(), now);
        }
    }

    /// Persists the last-seen times gathered since the previous flush, in one write (off the
    /// loop).
    fn flush_last_seen(&mut self) {
        if let Some(write) = self.last_seen_write() {
            self.tasks.spawn(write);
        }
    }

    /// The write of the last-seen times gathered since the previous flush, if any.
    fn last_seen_write(&mut self) -> Option<impl Future<Output = ()> + Send + 'static> {
        if self.last_seen.is_empty() {
            return None;
        }
        let batch: Vec<(String, OffsetDateTime)> = self.last_seen.drain().collect();
        let store = self.store.clone();
        Some(async move {
            if let Err(e) = store.touch_terminals(batch).await {
                tracing::debug!(error = %e, "could not record last_seen");
            }
        })
    }

    /// Answers an RPC request off the loop (it may call the provider), on the terminal's `rpc/res`.
    fn rpc(&self, terminal_id: String, payload: Bytes) {
        let Some(rpc) = self.rpc.clone() else { return };
        let publisher = self.publisher.clone();
        self.tasks.spawn(async move {
            let response = rpc.handle(&terminal_id, &payload).await;
            let topic = topics::rpc_res(&topics::tenant_for(&terminal_id));
            let body = Bytes::from(serde_json::to_vec(&response).unwrap_or_default());
            if let Err(e) = publisher.publish(topic, body).await {
                tracing::warn!(%terminal_id, error = %e, "RPC answer not published");
            }
        });
    }

    async fn ack(&mut self, terminal_id: String, payload: &[u8]) {
        let ack: Ack = match serde_json::from_slice(payload) {
            Ok(ack) => ack,
            Err(e) => {
                tracing::warn!(%terminal_id, error = %e, "unreadable ack");
                return;
            }
        };
        let advanced = self.advance(&terminal_id, &ack).await;
        self.acks.push(PendingAck {
            terminal_id,
            ack,
            advanced,
        });
        self.flush_acks();
    }

    /// When `ack` names the terminal's head: drops it, clears its retained message (unless a
    /// newer row of the same intent will replace it) and publishes the next row.
    async fn advance(&mut self, terminal_id: &str, ack: &Ack) -> bool {
        let Some(queue) = self.queues.get_mut(terminal_id) else {
            return false;
        };
        let Some(head) = queue.rows.first_entry() else {
            return false;
        };
        if *head.key() != ack.seq || head.get().intent_id != ack.intent_id {
            return false;
        }
        let row = head.remove();
        queue.head_published = None;
        let clear = !queue.rows.values().any(|r| r.intent_id == row.intent_id);
        self.clear(&row, clear).await;
        self.publish_head(terminal_id, false).await;
        true
    }

    /// Stores the waiting acks in one write, off the loop, unless a write is already in flight:
    /// acks arriving meanwhile go into the next one. An idle gateway stores an ack at once; a busy
    /// one shares each write (and its turn at the writer) among many acks.
    ///
    /// A write the store refuses is reported only after a pause that doubles while the store
    /// keeps failing (250 ms up to 30 s): its rows go out again then, and the acks that arrive
    /// meanwhile wait for the next write. Without it a failing store and an acking terminal
    /// would republish and re-ack as fast as they can.
    fn flush_acks(&mut self) {
        if self.ack_in_flight || self.acks.is_empty() {
            return;
        }
        self.ack_in_flight = true;
        let acks = std::mem::take(&mut self.acks);
        let (store, tx) = (self.store.clone(), self.internal_tx.clone());
        let pause = self
            .ack_retry
            .map_or(ACK_RETRY_FIRST, |p| (p * 2).min(ACK_RETRY_MAX));
        self.tasks.spawn(async move {
            let keys = acks
                .iter()
                .map(|p| (p.terminal_id.clone(), p.ack.intent_id.clone(), p.ack.seq))
                .collect();
            let (outcomes, failed_after): (Vec<Option<AckOutcome>>, _) = match store
                .ack_many(keys)
                .await
            {
                Ok(outcomes) => (outcomes, None),
                Err(e) => {
                    tracing::warn!(acks = acks.len(), error = %e, retry_in_ms = pause.as_millis() as u64, "acks not stored; the confirmations will be published again");
                    tokio::time::sleep(pause).await;
                    (acks.iter().map(|_| None).collect(), Some(pause))
                }
            };
            let outcomes = acks.into_iter().zip(outcomes).collect();
            drop(tx.send(Internal::Acked {
                outcomes,
                failed_after,
            }));
        });
    }

    /// What the store made of an ack.
    async fn acked(&mut self, pending: PendingAck, outcome: Option<AckOutcome>) {
        let PendingAck {
            terminal_id,
            advanced,
            ..
        } = pending;
        let terminal_id = terminal_id.as_str();
        let Some(AckOutcome::Delivered { row, clear, .. }) = outcome else {
            if advanced {
                // The queue ran ahead of the store: the store's view replaces it (a row not
                // removed goes out again).
                tracing::debug!(terminal_id, "an ack acted on was not stored; reloading");
                self.load(Some(terminal_id.to_owned()));
            }
            return;
        };
        let latency_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000
            - i128::from(row.accepted_at_us)) as f64
            / 1000.0;
        tracing::info!(terminal_id, intent_id = %row.intent_id, seq = row.seq, latency_ms, "confirmation delivered");
        self.metrics.acked.inc();
        self.metrics.delivery.observe(latency_ms / 1000.0);
        // `advance` cleared it already, unless something (a reload, a late notice) has put the
        // row back in the queue, and maybe on the wire, since.
        let clear = clear
            && (!advanced
                || self
                    .queues
                    .get(terminal_id)
                    .is_some_and(|q| q.rows.contains_key(&row.seq)));
        let Some(queue) = self.queues.get_mut(terminal_id) else {
            self.clear(&row, clear).await;
            return;
        };
        let head_before = queue.rows.keys().next().copied();
        // The store removed this row and the older rows of the same intent.
        queue
            .rows
            .retain(|s, r| !(*s == row.seq || (r.intent_id == row.intent_id && *s < row.seq)));
        let head_after = queue
            .rows
            .values()
            .next()
            .map(|r| (r.seq, r.intent_id.clone()));
        // The next confirmation of the same intent replaces the retained message itself.
        let replaced = head_after
            .as_ref()
            .is_some_and(|(_, intent)| *intent == row.intent_id);
        if !replaced {
            self.clear(&row, clear).await;
        }
        if head_after.as_ref().map(|(s, _)| *s) != head_before {
            if let Some(queue) = self.queues.get_mut(terminal_id) {
                queue.head_published = None;
            }
            self.publish_head(terminal_id, false).await;
        }
    }

    async fn clear(&self, row: &OutboxRow, clear: bool) {
        if clear {
            self.metrics.broker_publishes.inc();
            let topic = topics::payments(&row.tenant, &row.intent_id);
            if let Err(e) = self.publisher.publish_retained(topic, Bytes::new()).await {
                tracing::warn!(error = %e, "could not clear a delivered confirmation");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use posgate_proto::MicroUsdc;
    use posgate_proto::confirmation::{ConfirmationStatus, verify};
    use posgate_proto::event::{Envelope, EventData};
    use tokio::sync::Mutex;

    use super::*;
    use crate::store::{IncomingEvent, Limits, NewTerminal};

    /// Records every publish.
    struct Recorder(mpsc::UnboundedSender<(String, Bytes)>);

    impl Publisher for Recorder {
        async fn publish_retained(
            &self,
            topic: String,
            payload: Bytes,
        ) -> Result<(), PublishError> {
            drop(self.0.send((topic, payload)));
            Ok(())
        }

        async fn publish(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
            drop(self.0.send((topic, payload)));
            Ok(())
        }
    }

    struct Rig {
        store: Store,
        events: mpsc::UnboundedSender<BrokerEvent>,
        published: Mutex<mpsc::UnboundedReceiver<(String, Bytes)>>,
        signer: Signer,
        presence: Presence,
        tenant: String,
        token: CancellationToken,
        _dir: tempfile::TempDir,
    }

    async fn rig(republish_after: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::new(64, 16)).unwrap();
        let tenant = topics::tenant_for("pos-1");
        store
            .register_terminal(NewTerminal::for_test("pos-1"))
            .await
            .unwrap()
            .unwrap();
        let (pub_tx, pub_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let signer = Signer {
            kid: confirmation::kid_for(&key.verifying_key().to_bytes()),
            key,
        };
        let presence = Presence::default();
        let router = Router::new(
            store.clone(),
            Arc::new(Recorder(pub_tx)),
            signer.clone(),
            Settings { republish_after },
            presence.clone(),
            Metrics::new().unwrap(),
        );
        let token = CancellationToken::new();
        tokio::spawn(router.run(store.subscribe_outbox(), events_rx, token.clone()));
        Rig {
            store,
            events: events_tx,
            published: Mutex::new(pub_rx),
            signer,
            presence,
            tenant,
            token,
            _dir: dir,
        }
    }

    async fn confirm(store: &Store, n: u32) {
        let body = format!(
            r#"{{"id":"evt_{n}","type":"payment_intent.confirmed","data":{{"id":"pi_{n}","status":"confirmed","amount":4.5,"metadata":{{"terminal_id":"pos-1"}}}}}}"#
        );
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let data = EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string());
        let event = IncomingEvent {
            event_id: env.id.clone(),
            kind: env.kind.clone(),
            raw: Bytes::from(body.clone()),
            received_at: OffsetDateTime::now_utc(),
            created_at: None,
            data,
        };
        store.ingest(event).await.unwrap();
    }

    impl Rig {
        async fn next(&self) -> (String, Bytes) {
            let mut rx = self.published.lock().await;
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap()
        }

        fn check(&self, payload: &Bytes) -> posgate_proto::confirmation::Confirmation {
            verify(
                std::str::from_utf8(payload).unwrap(),
                &self.signer.key.verifying_key(),
                "pos-1",
                0,
            )
            .unwrap()
        }

        /// The next publish is the head with `seq`; returns its bytes.
        async fn expect_head(&self, seq: u64) -> Bytes {
            let (topic, payload) = self.next().await;
            assert_eq!(self.check(&payload).seq, seq, "{topic}");
            payload
        }

        /// The next publish clears `intent`'s retained confirmation.
        async fn expect_cleared(&self, intent: &str) {
            let (topic, payload) = self.next().await;
            assert!(
                payload.is_empty() && topic.ends_with(&format!("/{intent}")),
                "{topic}"
            );
        }

        /// Waits until the outbox holds the rows `seqs` (the router acts on an ack before it is
        /// stored).
        async fn outbox_becomes(&self, seqs: &[u64]) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let rows = self.store.outbox(None).await.unwrap();
                let now: Vec<u64> = rows.iter().map(|r| r.seq).collect();
                if now == seqs {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "outbox: {now:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn connected(&self) {
            self.events
                .send(BrokerEvent::Connected {
                    terminal_id: "pos-1".into(),
                })
                .unwrap();
        }

        async fn ack(&self, intent: &str, seq: u64) {
            let payload = Bytes::from(format!(r#"{{"intent_id":"{intent}","seq":{seq}}}"#));
            let event = BrokerEvent::Message {
                terminal_id: "pos-1".into(),
                kind: TopicKind::Acks,
                payload,
            };
            self.events.send(event).unwrap();
        }
    }

    #[tokio::test]
    async fn publishes_signed_then_clears_on_ack() {
        let rig = rig(Duration::from_secs(60)).await;
        confirm(&rig.store, 1).await;
        let (topic, payload) = rig.next().await;
        assert_eq!(topic, topics::payments(&rig.tenant, "pi_1"));
        let c = rig.check(&payload);
        assert_eq!(
            (c.seq, c.status, c.amount_micros),
            (1, ConfirmationStatus::Confirmed, 4_500_000)
        );
        assert_eq!(c.amount, MicroUsdc(4_500_000).to_string());

        rig.ack("pi_1", 1).await;
        let (topic, payload) = rig.next().await;
        assert_eq!(
            (topic.as_str(), payload.is_empty()),
            (topics::payments(&rig.tenant, "pi_1").as_str(), true)
        );
        rig.outbox_becomes(&[]).await;
        rig.token.cancel();
    }

    /// The ack of the head puts the next confirmation on the wire at once, not after the ack is
    /// stored: here every store answer is held behind a sync that does not finish.
    #[tokio::test]
    async fn an_ack_moves_the_terminal_on_before_it_is_stored() {
        let rig = rig(Duration::from_secs(60)).await;
        confirm(&rig.store, 1).await;
        confirm(&rig.store, 2).await;
        rig.expect_head(1).await;
        rig.store.hold_syncs_for_test(true);
        // A durable write ahead of the ack's: its answer, and so the ack's, waits for the sync.
        let held = confirm(&rig.store, 3);
        tokio::pin!(held);
        assert!(futures::poll!(&mut held).is_pending());
        rig.ack("pi_1", 1).await;
        rig.expect_cleared("pi_1").await;
        rig.expect_head(2).await;
        assert!(futures::poll!(&mut held).is_pending(), "the store answered");
        rig.store.hold_syncs_for_test(false);
        held.await;
        rig.ack("pi_2", 2).await;
        rig.expect_cleared("pi_2").await;
        rig.expect_head(3).await;
        rig.outbox_becomes(&[3]).await;
        rig.token.cancel();
    }

    /// A row the router already moved past that is put back on the wire before its ack is
    /// stored (here by a late notice and a reconnect; a reload can do the same) is cleared once the
    /// ack is stored, not left retained.
    #[tokio::test]
    async fn a_row_back_on_the_wire_before_its_ack_is_stored_is_cleared() {
        let rig = rig(Duration::from_secs(60)).await;
        confirm(&rig.store, 1).await;
        confirm(&rig.store, 2).await;
        let first = rig.store.outbox(None).await.unwrap().remove(0);
        rig.expect_head(1).await;
        rig.store.hold_syncs_for_test(true);
        let held = confirm(&rig.store, 3);
        tokio::pin!(held);
        assert!(futures::poll!(&mut held).is_pending());
        rig.ack("pi_1", 1).await;
        rig.expect_cleared("pi_1").await;
        rig.expect_head(2).await;
        rig.store.notify_for_test(vec![first]);
        // Reconnects republish the head; once the notice is in, that is row 1 again.
        loop {
            rig.connected();
            let (_, payload) = rig.next().await;
            if rig.check(&payload).seq == 1 {
                break;
            }
        }
        rig.store.hold_syncs_for_test(false);
        held.await;
        rig.expect_cleared("pi_1").await;
        rig.expect_head(2).await;
        rig.token.cancel();
    }

    /// When the store does not confirm an ack the router acted on (its queue had run ahead of
    /// the outbox), the outbox is read again and its head goes out again.
    #[tokio::test]
    async fn an_ack_the_store_does_not_confirm_reloads_the_terminal() {
        let rig = rig(Duration::from_secs(60)).await;
        confirm(&rig.store, 1).await;
        confirm(&rig.store, 2).await;
        rig.expect_head(1).await;
        // Row 1 leaves the outbox behind the router's back: its queue still has it.
        let outcome = rig
            .store
            .ack_many(vec![("pos-1".into(), "pi_1".into(), 1)])
            .await;
        assert!(matches!(
            outcome.unwrap()[..],
            [Some(AckOutcome::Delivered { .. })]
        ));
        rig.ack("pi_1", 1).await;
        rig.expect_cleared("pi_1").await;
        rig.expect_head(2).await;
        // The store found nothing to remove: the outbox is read again, its head republished.
        rig.expect_head(2).await;
        rig.token.cancel();
    }

    /// A store that refuses every ack write (a full or failing disk) while the terminal acks each
    /// republish at once: the router slows down (250 ms, then doubling) instead of republishing
    /// and re-acking as fast as both can. Once the store takes writes, the ack goes through.
    #[tokio::test]
    async fn a_failing_store_slows_republishing_down() {
        let rig = rig(Duration::from_secs(60)).await;
        confirm(&rig.store, 1).await;
        let head = rig.expect_head(1).await;
        rig.store.fail_writes_for_test(true);
        let started = tokio::time::Instant::now();
        let mut republished = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            rig.ack("pi_1", 1).await;
            rig.expect_cleared("pi_1").await;
            // The row comes back (the ack was not stored): ack it again, as a terminal does.
            assert_eq!(rig.expect_head(1).await, head);
            republished += 1;
        }
        // 250 + 500 + 1000 ms of pauses fit in 1.5 s: three rounds; without a pause, thousands.
        assert!(republished <= 4, "{republished} republishes in 1.5 s");
        rig.store.fail_writes_for_test(false);
        rig.ack("pi_1", 1).await;
        rig.expect_cleared("pi_1").await;
        rig.outbox_becomes(&[]).await;
        rig.token.cancel();
    }

    /// After a revocation the router clears what was on the wire for the terminal and never
    /// publishes its parked rows again: not on the republish timer, not from a late notice.
    #[tokio::test]
    async fn a_revoked_terminal_is_cleared_and_never_republished() {
        let rig = rig(Duration::from_millis(200)).await;
        confirm(&rig.store, 1).await;
        confirm(&rig.store, 2).await;
        rig.expect_head(1).await;
        let revocation = rig
            .store
            .revoke_terminal("pos-1".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revocation.parked.len(), 2);
        assert!(rig.store.outbox(None).await.unwrap().is_empty());
        // A notice of a row committed just before the revocation, arriving after it.
        let late = revocation.parked[1].clone();
        rig.events
            .send(BrokerEvent::Revoked {
                terminal_id: "pos-1".into(),
                parked: revocation.parked,
            })
            .unwrap();
        rig.expect_cleared("pi_1").await;
        rig.expect_cleared("pi_2").await;
        rig.store.notify_for_test(vec![late]);
        // Several republish periods: nothing more goes out.
        let mut rx = rig.published.lock().await;
        let quiet = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
        assert!(quiet.is_err(), "published after revocation: {quiet:?}");
        assert!(!rig.presence.read().unwrap()["pos-1"].online);
        rig.token.cancel();
    }

    #[tokio::test]
    async fn a_wrong_ack_changes_nothing() {
        let rig = rig(Duration::from_secs(60)).await;
        confirm(&rig.store, 1).await;
        rig.next().await;
        rig.ack("pi_1", 2).await; // wrong seq
        rig.ack("pi_other", 1).await; // wrong intent
        let garbage = BrokerEvent::Message {
            terminal_id: "pos-1".into(),
            kind: TopicKind::Acks,
            payload: Bytes::from_static(b"{"),
        };
        rig.events.send(garbage).unwrap();
        // Still there, and a reconnect publishes it again.
        rig.connected();
        rig.expect_head(1).await;
        assert_eq!(rig.store.outbox(None).await.unwrap().len(), 1);
        rig.token.cancel();
    }

    #[tokio::test]
    async fn one_in_flight_per_terminal_in_seq_order() {
        let rig = rig(Duration::from_secs(60)).await;
        for n in 1..=5 {
            confirm(&rig.store, n).await;
        }
        // Only the head is on the wire; a reconnect publishes the head again.
        let first = rig.expect_head(1).await;
        rig.connected();
        let again = rig.expect_head(1).await;
        assert_eq!(again, first);
        assert!(rig.presence.read().unwrap()["pos-1"].online);
        for seq in 1..=5u64 {
            rig.ack(&format!("pi_{seq}"), seq).await;
            rig.expect_cleared(&format!("pi_{seq}")).await;
            if seq < 5 {
                rig.expect_head(seq + 1).await;
            }
        }
        rig.outbox_becomes(&[]).await;
        rig.events
            .send(BrokerEvent::Disconnected {
                terminal_id: "pos-1".into(),
            })
            .unwrap();
        rig.token.cancel();
    }

    #[tokio::test]
    async fn acks_sent_in_a_burst_each_count() {
        let rig = rig(Duration::from_secs(60)).await;
        for n in 1..=3 {
            confirm(&rig.store, n).await;
        }
        rig.expect_head(1).await;
        // Sent before the first is stored, so later ones wait for the write in flight and go
        // into the next ones: a wrong ack, the right one, a repeat of it, and an ack for a row
        // not yet out. However they are split into writes, each counts, in order.
        rig.ack("pi_9", 9).await;
        rig.ack("pi_1", 1).await;
        rig.ack("pi_1", 1).await;
        rig.ack("pi_2", 2).await;
        rig.expect_cleared("pi_1").await;
        // pi_2's early ack counted too: its row is gone once published, and 3 follows.
        rig.expect_head(2).await;
        rig.expect_cleared("pi_2").await;
        rig.expect_head(3).await;
        rig.ack("pi_3", 3).await;
        rig.expect_cleared("pi_3").await;
        rig.outbox_becomes(&[]).await;
        rig.token.cancel();
    }

    #[tokio::test]
    async fn unacked_rows_are_published_again_after_the_timeout() {
        let rig = rig(Duration::from_millis(100)).await;
        confirm(&rig.store, 1).await;
        let (_, first) = rig.next().await;
        let (_, again) = rig.next().await;
        assert_eq!(first, again, "a republish sends identical bytes");
        rig.ack("pi_1", 1).await;
        let (_, clear) = rig.next().await;
        assert!(clear.is_empty());
        rig.token.cancel();
    }

    #[tokio::test]
    async fn startup_publishes_what_was_left_unacked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), Limits::new(64, 16)).unwrap();
            store
                .register_terminal(NewTerminal::for_test("pos-1"))
                .await
                .unwrap();
            confirm(&store, 9).await;
            store.close().await;
        }
        let store = Store::open(dir.path(), Limits::new(64, 16)).unwrap();
        let (pub_tx, mut pub_rx) = mpsc::unbounded_channel();
        let (_events_tx, events_rx) = mpsc::unbounded_channel();
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let signer = Signer {
            kid: "k".into(),
            key,
        };
        let router = Router::new(
            store.clone(),
            Arc::new(Recorder(pub_tx)),
            signer,
            Settings {
                republish_after: Duration::from_secs(60),
            },
            Presence::default(),
            Metrics::new().unwrap(),
        );
        let token = CancellationToken::new();
        tokio::spawn(router.run(store.subscribe_outbox(), events_rx, token.clone()));
        let (topic, _) = tokio::time::timeout(Duration::from_secs(10), pub_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(topic.ends_with("/payments/pi_9"), "{topic}");
        token.cancel();
    }
}
