//! [`Link`]: the one broker type the rest of the daemon holds, embedded or external.

use std::time::Duration;

use bytes::Bytes;

use super::{Handle, external};
use crate::delivery::{PublishError, Publisher};

/// The broker the rest of the daemon talks to: the embedded one, or an external broker posgate
/// is a client of (`mqtt.mode`).
#[derive(Clone)]
pub enum Link {
    Embedded(Handle),
    External(external::Handle),
}

impl Link {
    /// Refuses `terminal_id` and its certificate `serial` from now on and cuts its session
    /// (external: the CRL and ACL are rewritten and the broker reloaded, then the session is
    /// taken over).
    pub fn revoke(&self, terminal_id: &str, serial: &str) {
        match self {
            Link::Embedded(h) => h.revoke(terminal_id, serial),
            Link::External(h) => {
                h.revoke(terminal_id);
            }
        }
    }

    /// Refuses one replaced certificate `serial` of `terminal_id` from now on.
    pub fn retire(&self, terminal_id: &str, serial: &str) {
        match self {
            Link::Embedded(h) => h.retire(terminal_id, serial),
            Link::External(h) => h.files_changed(),
        }
    }

    /// Applies the stored revocations (SIGHUP).
    pub fn set_revoked(&self, serials: &[String], terminal_ids: &[String]) {
        match self {
            Link::Embedded(h) => h.set_revoked(serials, terminal_ids),
            Link::External(h) => h.files_changed(),
        }
    }

    /// A terminal was registered or renewed: an external broker's ACL must name it (NATS: its
    /// new certificate).
    pub fn registered(&self) {
        if let Link::External(h) = self {
            h.files_changed();
        }
    }

    /// Connections at the embedded broker; 0 with an external broker (its own metrics count them).
    pub fn connections(&self) -> isize {
        match self {
            Link::Embedded(h) => h.connections(),
            Link::External(_) => 0,
        }
    }
}

impl Publisher for Link {
    async fn publish_retained(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        match self {
            Link::Embedded(h) => h.publish_retained(topic, payload).await,
            Link::External(h) => h.publish_retained(topic, payload).await,
        }
    }

    async fn publish(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        match self {
            Link::Embedded(h) => h.publish(topic, payload).await,
            Link::External(h) => h.publish(topic, payload).await,
        }
    }

    fn suspend(&self, terminal_id: &str, duration: Duration) {
        match self {
            Link::Embedded(h) => Publisher::suspend(h, terminal_id, duration),
            Link::External(h) => Publisher::suspend(h, terminal_id, duration),
        }
    }
}
