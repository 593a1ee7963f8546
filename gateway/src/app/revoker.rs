//! What a revocation does outside the store, in one place: the admin API calls it (through
//! `Fleet::revoke`) after the store has committed the revocation.

use tokio::sync::mpsc;

use crate::broker::Link;
use crate::channels::{Hub, Tickets};
use crate::delivery::BrokerEvent;
use crate::store::Revocation;

/// What a revocation does outside the store (which has already marked the terminal revoked and
/// parked its unacked confirmations): the broker refuses its certificate and cuts its session, its
/// HTTP streams end and its unspent stream tickets are dropped, and delivery stops republishing
/// what was parked and clears it from the broker.
pub(super) struct Revoker {
    pub(super) broker: Link,
    pub(super) hub: Hub,
    pub(super) tickets: Tickets,
    pub(super) delivery: mpsc::UnboundedSender<BrokerEvent>,
}

impl Revoker {
    pub(super) fn revoke(&self, r: &Revocation) {
        self.broker.revoke(&r.record.id, &r.record.cert_serial);
        self.hub.revoke(&r.record.id);
        self.tickets.revoke(&r.record.id);
        drop(self.delivery.send(BrokerEvent::Revoked {
            terminal_id: r.record.id.clone(),
            parked: r.parked.clone(),
        }));
    }
}
