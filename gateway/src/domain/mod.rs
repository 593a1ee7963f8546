//! The intent state machine: pure, no I/O.
//!
//! [`apply`] takes an intent's record and one input (a webhook's data, later a REST read during
//! reconciliation) and moves the record forward. Transitions only move forward by rank
//! (`awaiting_payment 0 < expired = cancelled 1 < unresolved 2 < confirmed 3 < settled 4`): a stale
//! or reordered event never moves an intent back, but what it says (transfers, contexts) is still
//! recorded. The same function serves every source, so the outcome does not depend on which path
//! delivered an event first.

mod intent;

pub use intent::{Effect, Input, IntentRecord, IntentStatus, UnresolvedContext, apply};
