//! Delivery: from the outbox to the terminals, and their acks back.
//!
//! The outbox rows in the store are the truth; everything here is a cache that can be rebuilt from
//! them. The [`Engine`] republishes every unacked row at startup, a terminal's rows (in `seq` order)
//! whenever it connects, and any row unacked for `republish_after` (the broker keeps nothing across
//! a restart, and a resumed MQTT session does not always resend retained messages). Publishing is
//! idempotent: the signed bytes of a row never change, and terminals deduplicate by intent and seq.
//!
//! Delivery is stop-and-wait per terminal (see [`Engine`]), which keeps `seq` order on the wire.
//! One task owns the state; acks are stored off the loop, at most one write in flight, acks that
//! arrive meanwhile batched into the next, and report back to it (`acks.rs`). An ack of the head
//! moves the terminal on at once, without waiting for that write.
//!
//! The broker is behind [`Publisher`] and [`BrokerEvent`] (this module's ports, below), so the
//! engine is tested over channels (`tests.rs`); the HTTP channels (`crate::channels`) see every
//! publish through [`Published`].
//!
//! Named `router` in wave 1; renamed because it is the delivery engine (its config section is
//! `[delivery]`) and `axum::Router` is another thing.

mod acks;
mod engine;
#[cfg(test)]
mod tests;

pub use engine::Engine;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use posgate_proto::confirmation;
use posgate_proto::topics::TopicKind;
use serde::Serialize;
use time::OffsetDateTime;

use crate::store::OutboxRow;

/// Why a publish failed (the row stays in the outbox and is published again later).
#[derive(Debug, thiserror::Error)]
#[error("publishing to {topic}")]
pub struct PublishError {
    pub topic: String,
    /// The broker's own error (this module does not name the broker library).
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// What delivery needs from the broker.
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

    /// Disconnects `terminal_id` and refuses its connections for `duration` (it keeps flooding).
    /// A publisher without sessions has nothing to cut.
    fn suspend(&self, terminal_id: &str, duration: std::time::Duration) {
        let _ = (terminal_id, duration);
    }
}

/// What the broker tells the delivery engine, each about a terminal identified by its verified certificate.
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

/// Delivery settings (`[delivery]`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// A row unacked for this long since its last publish is published again.
    pub republish_after: Duration,
}

/// Delivery shared with other replicas (PostgreSQL backend): the engine publishes only for
/// terminals whose shard this replica owns (`crate::replicas`).
pub struct Cluster {
    pub ownership: crate::replicas::Ownership,
    /// Gains, losses, wake-ups and forwarded events.
    pub inputs: tokio::sync::mpsc::UnboundedReceiver<crate::replicas::Input>,
    /// To the other replicas: events about terminals owned elsewhere (when `forward_events`),
    /// and every publish (for their HTTP channels).
    pub outgoing: tokio::sync::mpsc::UnboundedSender<crate::replicas::notify::Outgoing>,
    /// Whether broker events read here may be the only copy (shared subscriptions hand each
    /// to one replica): then events for terminals owned elsewhere are forwarded. With plain
    /// subscriptions every replica reads every event and ignores those it does not own.
    pub forward_events: bool,
    /// How often the owned terminals' outbox is read again (notifications can be lost).
    pub reread_every: Duration,
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

/// A confirmation the engine just put on the wire (first publish or republish), for the HTTP
/// channels (`crate::channels`), which carry the same bytes to terminals without MQTT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub terminal_id: String,
    pub intent_id: String,
    pub seq: u64,
    /// The JWS, byte for byte what the MQTT topic carries.
    pub jws: Bytes,
}
