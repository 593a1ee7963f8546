//! Acks: the head moves on at once, the write follows (one in flight, the rest batched into the
//! next), and what the store made of it comes back to the loop.

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use posgate_proto::confirmation::Ack;
use posgate_proto::topics;
use time::OffsetDateTime;

use super::Publisher;
use super::engine::{Engine, Internal, PendingAck};
use crate::store::{AckOutcome, OutboxRow};

/// First and longest pause after an ack write the store refused, before its outcome is acted on
/// (which republishes the rows it did not remove) and the next ack write.
const ACK_RETRY_FIRST: Duration = Duration::from_millis(250);
const ACK_RETRY_MAX: Duration = Duration::from_secs(30);

/// Unreadable acks are logged at most once a second: a terminal can send them at will.
static UNREADABLE_LOG: crate::telemetry::Throttle =
    crate::telemetry::Throttle::new(Duration::from_secs(1));

impl<P: Publisher> Engine<P> {
    pub(super) async fn ack(&mut self, terminal_id: String, payload: &[u8]) {
        let ack: Ack = match serde_json::from_slice(payload) {
            Ok(ack) => ack,
            Err(e) => {
                if let Some(left_out) = UNREADABLE_LOG.allow() {
                    tracing::warn!(%terminal_id, error = %e, left_out, "unreadable ack (at most one line a second)");
                }
                return;
            }
        };
        let advanced = self.advance(&terminal_id, &ack).await;
        if advanced && self.cluster.is_some() {
            self.acked_rows.insert((terminal_id.clone(), ack.seq), None);
        }
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
    pub(super) fn flush_acks(&mut self) {
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
    pub(super) async fn acked(&mut self, pending: PendingAck, outcome: Option<AckOutcome>) {
        let PendingAck {
            terminal_id,
            advanced,
            ack,
        } = pending;
        if advanced && self.cluster.is_some() {
            let key = (terminal_id.clone(), ack.seq);
            if matches!(outcome, Some(AckOutcome::Delivered { .. })) {
                self.acked_rows.insert(key, Some(Instant::now()));
            } else {
                // Not removed: the reload below must see it.
                self.acked_rows.remove(&key);
            }
        }
        let terminal_id = terminal_id.as_str();
        let Some(AckOutcome::Delivered { row, clear, .. }) = outcome else {
            if advanced {
                // The queue ran ahead of the store: the store's view replaces it (a row not
                // removed goes out again).
                tracing::debug!(terminal_id, "an ack acted on was not stored; reloading");
                self.load(Some(terminal_id.to_owned()), true);
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

    pub(super) async fn clear(&self, row: &OutboxRow, clear: bool) {
        if clear {
            self.metrics.broker_publishes.inc();
            let topic = topics::payments(&row.tenant, &row.intent_id);
            if let Err(e) = self.publisher.publish_retained(topic, Bytes::new()).await {
                tracing::warn!(error = %e, "could not clear a delivered confirmation");
            }
        }
    }
}
