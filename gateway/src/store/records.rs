//! What the store takes in and hands out: a verified webhook on its way in ([`IncomingEvent`]),
//! what ingesting it did ([`Ingested`]), and the event and intent records as stored. Plain data,
//! kept apart from the machinery that writes and reads them.

use bytes::Bytes;
use posgate_proto::event::EventData;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::domain::{Effect, IntentRecord, IntentStatus};

/// A verified webhook on its way into the store.
#[derive(Debug)]
pub struct IncomingEvent {
    pub event_id: String,
    /// The event type as sent.
    pub kind: String,
    /// The exact bytes that were verified.
    pub raw: Bytes,
    pub received_at: OffsetDateTime,
    /// The envelope's `created_at`.
    pub created_at: Option<OffsetDateTime>,
    /// The typed data, or why it did not fit its type.
    pub data: Result<EventData, String>,
}

/// What happened to an event in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventOutcome {
    /// Applied to at least one intent.
    Applied,
    /// About intents we do not know yet: kept and applied when they appear.
    Pending,
    /// `data` did not fit its type (a missing field, a bad amount): kept, nothing applied.
    Unparsed,
    /// An event type we do not act on: kept.
    UnknownType,
    /// A valid event with nothing to apply (e.g. `settlement.failed`).
    Recorded,
}

impl EventOutcome {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Applied => "applied",
            EventOutcome::Pending => "pending",
            EventOutcome::Unparsed => "unparsed",
            EventOutcome::UnknownType => "unknown_type",
            EventOutcome::Recorded => "recorded",
        }
    }
}

/// The answer to one ingest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// First time this event id was seen; committed.
    New {
        outcome: EventOutcome,
        /// Intents whose record this event changed, with what changed.
        effects: Vec<(String, Effect)>,
        /// Intents this event is about that the gateway does not know yet (it waits for them).
        unknown_intents: Vec<String>,
    },
    /// The event id was already stored: nothing was done.
    Duplicate,
}

/// An event as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: String,
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub outcome: EventOutcome,
    /// Intents this event was about.
    pub intent_ids: Vec<String>,
    /// Why `data` did not fit its type, for `unparsed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exact verified body, kept while the gateway may still need it: an event that waits
    /// for its intent (`pending`, replayed when the intent comes), a settlement that may still
    /// apply to an intent not known yet, and `unparsed`/`unknown_type` events (for the operator).
    /// Dropped once an event is applied or recorded: deduplication needs only the id, and the
    /// body was most of what the store grew by per webhook (docs/performance.md, "Store size").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Box<RawValue>>,
    /// SHA-256 of the verified body (hex), kept when the body is not: what was applied can still
    /// be matched against the provider's copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
}

/// One event as seen from an intent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventRef {
    pub id: String,
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// Status before and after this event.
    pub from: IntentStatus,
    pub to: IntentStatus,
}

/// An intent as stored: the domain record plus its history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredIntent {
    pub record: IntentRecord,
    pub events: Vec<EventRef>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Filter for [`Store::list_intents`](super::Store::list_intents).
#[derive(Clone, Debug, Default)]
pub struct IntentFilter {
    pub status: Option<IntentStatus>,
    pub terminal_id: Option<String>,
    /// Exclusive cursor: the last id of the previous page.
    pub starting_after: Option<String>,
    pub limit: usize,
}
