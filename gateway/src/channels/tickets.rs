//! Single-use tickets: how a browser authenticates the streams it cannot give a header to.
//!
//! A browser's `EventSource` and `WebSocket` cannot set `Authorization`, and a web POS has no
//! client certificate. So the page asks `POST /v1/terminal/tickets` with its bearer token (an
//! ordinary `fetch`, which can set the header) and opens the stream with `?ticket=…`. A ticket names
//! the terminal that asked for it, is good for one stream opened within [`TICKET_TTL`], and is
//! kept only in memory, by its SHA-256: it never reaches the store, a log or a metric. What a URL
//! may leak (a proxy's access log, the browser's history) is then a credential that is already
//! spent or expires within seconds, never the long-lived token.
//!
//! Bounded: a terminal holds at most [`MAX_PER_TERMINAL`] unspent tickets (a further one pushes
//! out its oldest, so a loop asking for tickets cannot grow the map), expired ones are swept at
//! least every [`TICKET_TTL`], and a revoked terminal's tickets are dropped at once (redeeming
//! one re-reads the registry anyway, so a revoked terminal's ticket is refused either way).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// How long a ticket may wait before the stream it opens.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Most unspent tickets one terminal holds; a further one replaces its oldest.
pub const MAX_PER_TERMINAL: usize = 8;

/// A freshly issued ticket (64 hex characters, 256 random bits). `Debug` does not show it.
pub struct Ticket(String);

impl Ticket {
    /// The ticket itself, for the answer to the terminal and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(<redacted>)")
    }
}

type Hash = [u8; 32];

/// The unspent tickets.
#[derive(Clone)]
pub struct Tickets {
    inner: Arc<Mutex<Inner>>,
    ttl: Duration,
}

struct Inner {
    /// Ticket hash → the terminal it names and when it expires.
    by_hash: HashMap<Hash, (String, Instant)>,
    /// Per terminal, its unspent tickets' hashes, oldest first.
    by_terminal: HashMap<String, VecDeque<Hash>>,
    last_sweep: Instant,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets::with_ttl(TICKET_TTL)
    }
}

impl Tickets {
    /// Tickets valid for `ttl` (tests shorten it).
    pub fn with_ttl(ttl: Duration) -> Self {
        Tickets {
            inner: Arc::new(Mutex::new(Inner {
                by_hash: HashMap::new(),
                by_terminal: HashMap::new(),
                last_sweep: Instant::now(),
            })),
            ttl,
        }
    }

    /// How long a ticket stays valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new ticket for `terminal_id` (already authenticated by the caller).
    pub fn issue(&self, terminal_id: &str) -> Ticket {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let ticket = hex::encode(bytes);
        let hash = digest(&ticket);
        let now = Instant::now();
        let mut inner = self.lock();
        if now.duration_since(inner.last_sweep) >= self.ttl {
            inner.sweep(now);
        }
        let Inner {
            by_hash,
            by_terminal,
            ..
        } = &mut *inner;
        let queue = by_terminal.entry(terminal_id.to_owned()).or_default();
        while queue.len() >= MAX_PER_TERMINAL {
            if let Some(oldest) = queue.pop_front() {
                by_hash.remove(&oldest);
            }
        }
        queue.push_back(hash);
        by_hash.insert(hash, (terminal_id.to_owned(), now + self.ttl));
        Ticket(ticket)
    }

    /// Spends `ticket`: the terminal it names, if it is unspent and unexpired. A second call with
    /// the same ticket gets `None`.
    pub fn redeem(&self, ticket: &str) -> Option<String> {
        let hash = digest(ticket);
        let mut inner = self.lock();
        let (terminal_id, expires) = inner.by_hash.remove(&hash)?;
        if let Some(queue) = inner.by_terminal.get_mut(&terminal_id) {
            queue.retain(|h| *h != hash);
            if queue.is_empty() {
                inner.by_terminal.remove(&terminal_id);
            }
        }
        (Instant::now() < expires).then_some(terminal_id)
    }

    /// Drops every unspent ticket of `terminal_id` (at its revocation).
    pub fn revoke(&self, terminal_id: &str) {
        let mut inner = self.lock();
        if let Some(queue) = inner.by_terminal.remove(terminal_id) {
            for hash in queue {
                inner.by_hash.remove(&hash);
            }
        }
    }

    /// How many unspent tickets are kept (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().by_hash.len()
    }

    /// Whether no ticket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant) {
        self.by_hash.retain(|_, (_, expires)| *expires > now);
        let by_hash = &self.by_hash;
        self.by_terminal.retain(|_, queue| {
            queue.retain(|h| by_hash.contains_key(h));
            !queue.is_empty()
        });
        self.last_sweep = now;
    }
}

fn digest(ticket: &str) -> Hash {
    Sha256::digest(ticket.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_ticket_is_good_once() {
        let tickets = Tickets::default();
        let t = tickets.issue("pos_1");
        assert_eq!(t.expose().len(), 64);
        assert!(t.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(tickets.redeem(t.expose()).as_deref(), Some("pos_1"));
        assert_eq!(tickets.redeem(t.expose()), None, "spent");
        assert!(tickets.is_empty());
        assert_eq!(tickets.redeem(""), None);
        assert_eq!(tickets.redeem(&"0".repeat(64)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tickets_are_unique_and_name_their_terminal() {
        let tickets = Tickets::default();
        let a = tickets.issue("pos_a");
        let b = tickets.issue("pos_b");
        let a2 = tickets.issue("pos_a");
        assert_ne!(a.expose(), a2.expose());
        assert_eq!(tickets.redeem(b.expose()).as_deref(), Some("pos_b"));
        assert_eq!(tickets.redeem(a2.expose()).as_deref(), Some("pos_a"));
        assert_eq!(tickets.redeem(a.expose()).as_deref(), Some("pos_a"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_ticket_is_refused() {
        let tickets = Tickets::default();
        let early = tickets.issue("pos_1");
        let late = tickets.issue("pos_1");
        tokio::time::advance(TICKET_TTL - Duration::from_millis(1)).await;
        assert_eq!(tickets.redeem(early.expose()).as_deref(), Some("pos_1"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(tickets.redeem(late.expose()), None, "expired at the TTL");
        assert!(tickets.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_tickets_keeps_the_newest_few_per_terminal() {
        let tickets = Tickets::default();
        let first = tickets.issue("pos_1");
        let other = tickets.issue("pos_2");
        let mut newest = Vec::new();
        for _ in 0..1000 {
            newest.push(tickets.issue("pos_1"));
        }
        assert_eq!(tickets.len(), MAX_PER_TERMINAL + 1);
        assert_eq!(tickets.redeem(first.expose()), None, "pushed out");
        assert_eq!(
            tickets.redeem(newest[999].expose()).as_deref(),
            Some("pos_1")
        );
        assert_eq!(
            tickets
                .redeem(newest[1000 - MAX_PER_TERMINAL].expose())
                .as_deref(),
            Some("pos_1")
        );
        assert_eq!(
            tickets.redeem(newest[999 - MAX_PER_TERMINAL].expose()),
            None
        );
        assert_eq!(
            tickets.redeem(other.expose()).as_deref(),
            Some("pos_2"),
            "another terminal's ticket is not pushed out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_tickets_are_swept() {
        let tickets = Tickets::default();
        for i in 0..100 {
            drop(tickets.issue(&format!("pos_{i}")));
        }
        assert_eq!(tickets.len(), 100);
        tokio::time::advance(TICKET_TTL).await;
        let kept = tickets.issue("pos_new");
        assert_eq!(tickets.len(), 1, "the sweep ran with this issue");
        assert!(tickets.lock().by_terminal.len() == 1);
        assert_eq!(tickets.redeem(kept.expose()).as_deref(), Some("pos_new"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_terminals_tickets_are_dropped() {
        let tickets = Tickets::default();
        let a = tickets.issue("pos_a");
        let b = tickets.issue("pos_b");
        tickets.revoke("pos_a");
        assert_eq!(tickets.redeem(a.expose()), None);
        assert_eq!(tickets.redeem(b.expose()).as_deref(), Some("pos_b"));
    }

    #[test]
    fn debug_does_not_show_the_ticket() {
        let tickets = Tickets::default();
        let t = tickets.issue("pos_1");
        assert!(!format!("{t:?}").contains(t.expose()));
    }
}
