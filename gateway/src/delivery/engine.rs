//! The engine's state and loop: the per-terminal queues mirrored from the outbox, publishing
//! heads, republishing, presence, RPC dispatch. Acks are in `acks.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use posgate_proto::confirmation::{Ack, StatusMessage};
use posgate_proto::topics;
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    BrokerEvent, Cluster, Presence, PresenceEntry, Published, Publisher, Settings, Signer,
};
use crate::metrics::Metrics;
use crate::replicas::{Input, notify::Outgoing, shard_of};
use crate::rpc::{Refused, Rpc};
use crate::store::{AckOutcome, OutboxRow, Store};
use posgate_proto::topics::TopicKind;

pub(super) enum Internal {
    /// Rows read from the store: the whole outbox at startup, or one terminal's on reconnect.
    Loaded {
        terminal_id: Option<String>,
        rows: Vec<OutboxRow>,
        /// Republish the head even if it is on the wire already (a reconnect).
        force: bool,
    },
    /// The outcome of one ack write: every ack it carried, in order (`None`: not stored; the row
    /// stays and is published again, and the terminal acks again).
    Acked {
        outcomes: Vec<(PendingAck, Option<AckOutcome>)>,
        /// The write failed, and the task waited this long before reporting (see
        /// [`Engine::flush_acks`]).
        failed_after: Option<Duration>,
    },
}

/// An ack on its way to the store.
pub(super) struct PendingAck {
    pub(super) terminal_id: String,
    pub(super) ack: Ack,
    /// It acked the terminal's head, which the delivery engine has already dropped from the queue (and
    /// whose successor it has already published).
    pub(super) advanced: bool,
}

/// One terminal's unacked rows, mirrored from the store, and whether its head is on the wire.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) rows: BTreeMap<u64, OutboxRow>,
    /// When the head row was last published.
    pub(super) head_published: Option<Instant>,
    /// The highest seq published at least once (to tell first publishes from republishes).
    pub(super) last_seq_published: u64,
}

/// The delivery engine: one task.
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
pub struct Engine<P> {
    pub(super) store: Store,
    pub(super) publisher: Arc<P>,
    pub(super) signer: Signer,
    pub(super) settings: Settings,
    pub(super) presence: Presence,
    pub(super) metrics: Metrics,
    pub(super) queues: HashMap<String, Queue>,
    /// Presence changes not yet written to the registry.
    pub(super) last_seen: HashMap<String, OffsetDateTime>,
    /// Terminal RPC (`None` in tests that do not need it).
    pub(super) rpc: Option<Arc<Rpc>>,
    /// Told about every publish of a head row (`None` when nothing listens).
    pub(super) published: Option<broadcast::Sender<Published>>,
    pub(super) internal_tx: mpsc::UnboundedSender<Internal>,
    pub(super) internal_rx: mpsc::UnboundedReceiver<Internal>,
    /// Acks waiting for the next ack write.
    pub(super) acks: Vec<PendingAck>,
    /// An ack write is on its way (its outcome comes back as [`Internal::Acked`]).
    pub(super) ack_in_flight: bool,
    /// The pause after the last ack write, when it failed: a failing store slows republishing
    /// down instead of storming the terminals.
    pub(super) ack_retry: Option<Duration>,
    /// Terminals revoked while running: a notice of their rows committed just before the
    /// revocation may arrive after it, and must not queue them again.
    pub(super) revoked: HashSet<String>,
    /// The startup load (the whole outbox) is in; nothing is published before.
    pub(super) started: bool,
    /// Where the delivery engine's own tasks run (store reads and writes, RPC answers): the gateway's
    /// tracker, so that shutdown waits for them before closing the store.
    pub(super) tasks: TaskTracker,
    /// Shared with other replicas (`None`: this one owns every terminal).
    pub(super) cluster: Option<Cluster>,
    /// With replicas: rows the terminal acked (the queue moved on), with when the store removed
    /// them (`None`: the write is on its way). An outbox read that began before the removal
    /// still shows them; the periodic read and the wake-ups of other replicas' commits would
    /// otherwise put an acked row back on the wire.
    /// With replicas: per owned terminal, the highest `seq` this engine knows of (queued, or
    /// published). Rows committed by other replicas arrive by a later read, rows committed here
    /// at once: a local row above a gap waits for that read, or it would go out before the rows
    /// another replica committed first.
    pub(super) seen_through: HashMap<String, u64>,
    pub(super) acked_rows: HashMap<(String, u64), Option<Instant>>,
}

/// Heads on the wire at least this long are published again when this replica gains shards
/// (an ack may have been lost with a replica that died); younger ones may still be acked.
const GAINED_REPUBLISH_AGE: Duration = Duration::from_millis(500);

impl<P: Publisher> Engine<P> {
    pub fn new(
        store: Store,
        publisher: Arc<P>,
        signer: Signer,
        settings: Settings,
        presence: Presence,
        metrics: Metrics,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        Engine {
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
            started: false,
            tasks: TaskTracker::new(),
            cluster: None,
            acked_rows: HashMap::new(),
            seen_through: HashMap::new(),
        }
    }

    /// Runs the delivery engine's own tasks in `tracker` (the gateway's), so that shutdown waits for them.
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

    /// Shares delivery with other replicas: publishes only for terminals in `cluster`'s shards.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Whether this replica delivers to `terminal_id` now.
    pub(super) fn owns(&self, terminal_id: &str) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|c| c.ownership.owns(terminal_id))
    }

    /// Runs until `token` is cancelled or the broker's event stream ends.
    pub async fn run(
        mut self,
        mut rows: mpsc::UnboundedReceiver<Vec<OutboxRow>>,
        mut events: mpsc::UnboundedReceiver<BrokerEvent>,
        token: CancellationToken,
    ) {
        // Everything unacked, from before a restart or a crash.
        self.load(None, false);
        let (mut inputs, reread_every) = match self.cluster.as_mut() {
            Some(c) => {
                let (_, rx) = mpsc::unbounded_channel();
                (Some(std::mem::replace(&mut c.inputs, rx)), c.reread_every)
            }
            None => (None, Duration::from_secs(3600)),
        };
        let mut reread = tokio::time::interval_at(Instant::now() + reread_every, reread_every);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let period = (self.settings.republish_after / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                Some(batch) = rows.recv() => self.add_rows(batch).await,
                Some(internal) = self.internal_rx.recv() => match internal {
                    Internal::Loaded { terminal_id, rows, force } => {
                        self.loaded(terminal_id, rows, force).await
                    }
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
                    // Reads take far less than this.
                    self.acked_rows.retain(|_, stored| {
                        stored.is_none_or(|at| at.elapsed() < Duration::from_secs(30))
                    });
                }
                Some(input) = async {
                    match inputs.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.cluster_input(input).await,
                _ = reread.tick(), if inputs.is_some() => self.load(None, false),
            }
        }
        // The last presence changes are written before the delivery engine ends, so before the store
        // closes (shutdown waits for the delivery engine, then closes the store).
        if let Some(write) = self.last_seen_write() {
            write.await;
        }
    }

    /// Reads unacked rows (one terminal's, or all) off the loop and feeds them back to it.
    pub(super) fn load(&self, terminal_id: Option<String>, force: bool) {
        let (store, tx) = (self.store.clone(), self.internal_tx.clone());
        self.tasks.spawn(async move {
            // Retried until it succeeds (or the delivery engine is gone): the startup load is the only way
            // rows from before a restart get back on the wire.
            let mut pause = Duration::from_millis(100);
            loop {
                match store.outbox(terminal_id.clone()).await {
                    Ok(rows) => {
                        drop(tx.send(Internal::Loaded {
                            terminal_id,
                            rows,
                            force,
                        }));
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
        let mut gaps = Vec::new();
        for row in rows {
            if self.revoked.contains(&row.terminal_id) || !self.owns(&row.terminal_id) {
                continue;
            }
            let id = row.terminal_id.clone();
            if self.cluster.is_some() {
                let seen = self.seen_through.get(&id).copied();
                if seen.is_none_or(|seen| row.seq > seen + 1) {
                    // Rows below it may have been committed by another replica: read them all.
                    if !gaps.contains(&id) {
                        gaps.push(id);
                    }
                    continue;
                }
                self.seen_through
                    .insert(id.clone(), row.seq.max(seen.unwrap_or(0)));
            }
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
        for id in gaps {
            self.load(Some(id), false);
        }
    }

    /// The store's view replaces ours (rows acked meanwhile disappear, none are missed).
    async fn loaded(&mut self, terminal_id: Option<String>, rows: Vec<OutboxRow>, force: bool) {
        let mut fresh: HashMap<String, BTreeMap<u64, OutboxRow>> = HashMap::new();
        for row in rows {
            if !self.owns(&row.terminal_id)
                || self
                    .acked_rows
                    .contains_key(&(row.terminal_id.clone(), row.seq))
            {
                continue;
            }
            fresh
                .entry(row.terminal_id.clone())
                .or_default()
                .insert(row.seq, row);
        }
        // A reconnect republishes its head; the startup load only publishes heads not yet out.
        let ids: Vec<String> = match terminal_id {
            Some(id) => vec![id],
            None => {
                // Nothing was published before this: the rows committed meanwhile (by notice)
                // wait in their queues behind the older rows this read found.
                self.started = true;
                let mut ids: HashSet<String> = fresh.keys().cloned().collect();
                ids.extend(self.queues.keys().cloned());
                ids.into_iter().collect()
            }
        };
        for id in ids {
            if !self.owns(&id) {
                // Its shard went to another replica while the read was out.
                self.queues.remove(&id);
                continue;
            }
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
            if self.cluster.is_some() {
                let highest = queue
                    .rows
                    .keys()
                    .next_back()
                    .copied()
                    .unwrap_or(0)
                    .max(queue.last_seq_published);
                let seen = self.seen_through.entry(id.clone()).or_default();
                *seen = (*seen).max(highest);
            }
            if queue.rows.keys().next().copied() != head_before {
                queue.head_published = None;
            }
            self.publish_head(&id, force).await;
        }
    }

    /// Publishes the terminal's head row, unless it is already on the wire (or `force`), or the
    /// startup load is not in yet.
    pub(super) async fn publish_head(&mut self, terminal_id: &str, force: bool) {
        // Before the startup load, a queue knows only the rows committed since the start: its
        // "head" may be newer than rows still in the outbox, and publishing it would show the
        // terminal a later `seq` first.
        if !self.started {
            return;
        }
        // Checked at every publish (not only when told of a loss): the validity window of the
        // shard's lease may close between two messages of the lease task.
        if !self.owns(terminal_id) {
            return;
        }
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
        let published = Published {
            terminal_id: terminal_id.to_owned(),
            intent_id: head.intent_id.clone(),
            seq,
            jws: payload.clone(),
        };
        if let Some(cluster) = &self.cluster {
            // The terminal may be on another replica's HTTP channels.
            drop(
                cluster
                    .outgoing
                    .send(Outgoing::Published(published.clone())),
            );
        }
        if let Some(tx) = &self.published {
            // No receiver (no HTTP client connected) is not an error.
            drop(tx.send(published));
        }
        if let Err(e) = self.publisher.publish_retained(topic, payload).await {
            tracing::warn!(error = %e, %terminal_id, seq, "publish failed; will retry");
        }
    }

    async fn republish_stale(&mut self) {
        self.republish_older_than(self.settings.republish_after)
            .await;
    }

    /// Publishes again every head on the wire for at least `age` without an ack.
    async fn republish_older_than(&mut self, age: Duration) {
        let now = Instant::now();
        let stale: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| {
                q.head_published
                    .is_some_and(|at| now.duration_since(at) >= age)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            tracing::debug!(terminal_id = %id, "republishing an unacked confirmation");
            self.publish_head(&id, true).await;
        }
    }

    /// What the replica machinery reports (see [`Input`]).
    async fn cluster_input(&mut self, input: Input) {
        match input {
            Input::Gained(shards) => {
                tracing::info!(shards = shards.len(), "delivering for new shards");
                // Shards come free when a replica joins or dies. One that died took with it the
                // acks the broker had handed it (a shared subscription gives each message to one
                // replica) and was forwarding to their owners: heads of ours still on the wire
                // may wait for an ack that will never come. Publish them again now rather than
                // at `republish_after` (a terminal acks a repeat).
                self.republish_older_than(GAINED_REPUBLISH_AGE).await;
                // Their terminals' rows, from the store (the takeover's republish).
                self.load(None, false);
                let _ = shards;
            }
            Input::Lost(shards) => {
                self.queues.retain(|id, _| !shards.contains(&shard_of(id)));
                self.seen_through
                    .retain(|id, _| !shards.contains(&shard_of(id)));
            }
            Input::Wake { terminal_id, seq } => {
                if !self.owns(&terminal_id) {
                    return;
                }
                // Our own commits reach the queue through the store's notice first, mostly.
                let known = self
                    .queues
                    .get(&terminal_id)
                    .is_some_and(|q| q.rows.contains_key(&seq) || q.last_seq_published >= seq);
                if !known {
                    self.load(Some(terminal_id), false);
                }
            }
            Input::Event(event) => {
                // Forwarded by a replica that does not own the terminal; not forwarded again.
                if self.owns(event_terminal(&event)) {
                    self.handle_event(event).await;
                }
            }
            Input::Reread => self.load(None, false),
        }
    }

    async fn event(&mut self, event: BrokerEvent) {
        if let Some(cluster) = &self.cluster {
            let terminal_id = event_terminal(&event);
            // An RPC request is answered where it arrived when the broker hands each message to
            // one replica (shared subscriptions); when every replica receives every message
            // (plain subscriptions, NATS), only the owner answers, or the terminal would get an
            // answer, and the provider a call, from each replica.
            let local = match &event {
                BrokerEvent::Revoked { .. } => true,
                BrokerEvent::Message {
                    kind: TopicKind::RpcReq,
                    ..
                } => cluster.forward_events,
                _ => false,
            };
            if !local && !cluster.ownership.owns(terminal_id) {
                // Presence is shown by the replica that saw it; the stop-and-wait is the owner's.
                match &event {
                    BrokerEvent::Connected { terminal_id } => self.set_presence(terminal_id, true),
                    BrokerEvent::Disconnected { terminal_id } => {
                        self.set_presence(terminal_id, false)
                    }
                    _ => {}
                }
                if let Some(cluster) = &self.cluster
                    && cluster.forward_events
                {
                    drop(cluster.outgoing.send(Outgoing::Event(event)));
                }
                return;
            }
        }
        self.handle_event(event).await;
    }

    async fn handle_event(&mut self, event: BrokerEvent) {
        match event {
            BrokerEvent::Connected { terminal_id } => {
                self.set_presence(&terminal_id, true);
                // A resumed session does not always get retained messages again: republish the
                // head. The queues mirror the outbox (loaded at startup, then every commit's new
                // rows), so no read is needed here; a reconnect storm costs no store work.
                if self.queues.contains_key(&terminal_id) {
                    self.publish_head(&terminal_id, true).await;
                }
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
                    tracing::debug!(%terminal_id, kind = ?other, "message not handled by delivery")
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
    pub(super) fn flush_last_seen(&mut self) {
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
        // Admission first: a flooding terminal costs a bucket check per request, not a task.
        let admitted = rpc.admit(&terminal_id, &payload);
        if let Err(Refused {
            suspend: Some(duration),
            ..
        }) = &admitted
        {
            publisher.suspend(&terminal_id, *duration);
        }
        self.tasks.spawn(async move {
            let response = match admitted {
                Ok(_permit) => rpc.handle(&terminal_id, &payload).await,
                Err(refused) => refused.response,
            };
            let topic = topics::rpc_res(&topics::tenant_for(&terminal_id));
            let body = Bytes::from(serde_json::to_vec(&response).unwrap_or_default());
            if let Err(e) = publisher.publish(topic, body).await {
                tracing::warn!(%terminal_id, error = %e, "RPC answer not published");
            }
        });
    }
}

/// The terminal a broker event is about.
fn event_terminal(event: &BrokerEvent) -> &str {
    match event {
        BrokerEvent::Connected { terminal_id }
        | BrokerEvent::Disconnected { terminal_id }
        | BrokerEvent::Revoked { terminal_id, .. }
        | BrokerEvent::Message { terminal_id, .. } => terminal_id,
    }
}
