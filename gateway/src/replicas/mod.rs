//! Several replicas on one PostgreSQL database: who delivers to which terminal.
//!
//! Any replica takes webhooks and admin calls (the store's SERIALIZABLE batches make that safe);
//! delivery to a terminal is owned by one replica at a time, so that its `seq` order and "one
//! confirmation in flight" (decision 0002) hold across replicas. Terminals map to [`SHARDS`]
//! shards by [`shard_of`]; a replica owns the shards whose lease it holds in `shard_leases`
//! (migration `0002_replicas.sql`), and its delivery engine publishes only for terminals in them.
//!
//! - [`lease`]: the lease task. It renews its shards every third of the lease time, claims free or
//!   expired ones up to its fair share, releases the excess when replicas join (after it stopped
//!   publishing for them), and releases all on a clean stop.
//! - [`notify`]: `LISTEN` (new outbox rows committed by any replica, broker events forwarded by a
//!   non-owner, confirmations published by another replica for the HTTP channels, lease changes)
//!   and the forwarding of this replica's events to the owner (`NOTIFY`).
//!
//! Safety rests on one inequality, without comparing clocks: a lease's expiry is written as the
//! database's `now()` plus the lease time, and `now()` is read after this replica's monotonic
//! clock was read before the renewing transaction began. The replica counts the shard as its own
//! until that local reading plus the lease time less a margin ([`Ownership`]), which ends before
//! the row can expire in the database, so before anyone else can claim it. What remains is the
//! difference in clock *rates* and the time a publish takes to reach the broker, which the margin
//! covers.
//!
//! With redb there is no `[replicas]` at work: one process owns everything.

pub mod lease;
pub mod notify;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use lease::Leases;

/// How many shards terminals are spread over. Fixed by the migration that created the lease
/// table: never change it.
pub const SHARDS: u16 = 64;

/// A terminal's shard: FNV-1a (32 bits) of its id's UTF-8 bytes, modulo [`SHARDS`]. Stable across
/// builds, platforms and versions (unlike `std`'s hasher): every replica, old or new, must agree.
pub fn shard_of(terminal_id: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in terminal_id.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(SHARDS)) as u16
}

/// This replica's settings (`[replicas]`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Unique among the replicas sharing the database.
    pub id: String,
    pub lease: Duration,
}

impl Settings {
    /// How often the lease task renews: a third of the lease, so that two renewals may fail
    /// before the lease is lost.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// Taken off the local validity window: the publishes started just before it ends must
    /// reach the broker before another replica can claim the shard, and clocks' rates differ
    /// slightly. A fifth of the lease, at least 200 ms.
    pub fn margin(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(200))
    }

    /// The id to use when `replicas.id` is empty: hostname, pid and a random suffix (a
    /// restarted process is a new replica; its predecessor's leases expire or were released).
    pub fn default_id() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| {
                h.trim()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                    .take(40)
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "posgate".into());
        format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        )
    }
}

/// Which shards this replica may publish for, and until when by its own clock. Shared by the
/// lease task (which grants and withdraws) and the delivery engine (which asks before every
/// publish).
#[derive(Clone)]
pub struct Ownership(Arc<Inner>);

struct Inner {
    id: String,
    valid_until: Mutex<[Option<Instant>; SHARDS as usize]>,
    /// The last renewal succeeded (`/readyz`).
    renewing: AtomicBool,
}

impl Ownership {
    pub fn new(id: String) -> Self {
        Ownership(Arc::new(Inner {
            id,
            valid_until: Mutex::new([None; SHARDS as usize]),
            renewing: AtomicBool::new(false),
        }))
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Whether this replica may publish for `terminal_id` now.
    pub fn owns(&self, terminal_id: &str) -> bool {
        self.owns_shard(shard_of(terminal_id))
    }

    pub fn owns_shard(&self, shard: u16) -> bool {
        let now = Instant::now();
        self.lock()
            .get(usize::from(shard))
            .copied()
            .flatten()
            .is_some_and(|until| now < until)
    }

    /// The shards owned now.
    pub fn owned(&self) -> BTreeSet<u16> {
        let now = Instant::now();
        self.lock()
            .iter()
            .enumerate()
            .filter(|(_, until)| until.is_some_and(|u| now < u))
            .map(|(shard, _)| shard as u16)
            .collect()
    }

    /// Whether the lease task's last renewal succeeded.
    pub fn renewing(&self) -> bool {
        self.0.renewing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_renewing(&self, ok: bool) {
        self.0.renewing.store(ok, Ordering::Relaxed);
    }

    /// Exactly `shards` are owned until `until` (the others are not).
    pub(crate) fn grant(&self, shards: &BTreeSet<u16>, until: Instant) {
        let mut slots = self.lock();
        for (shard, slot) in slots.iter_mut().enumerate() {
            *slot = shards.contains(&(shard as u16)).then_some(until);
        }
    }

    /// Stops owning `shards` at once (before their leases are released).
    pub(crate) fn withdraw(&self, shards: &BTreeSet<u16>) {
        let mut slots = self.lock();
        for shard in shards {
            if let Some(slot) = slots.get_mut(usize::from(*shard)) {
                *slot = None;
            }
        }
    }

    /// The earliest end of a validity window still open.
    pub(crate) fn earliest_end(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock()
            .iter()
            .flatten()
            .filter(|u| **u > now)
            .min()
            .copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<Instant>; SHARDS as usize]> {
        // A panic while holding it cannot leave the array half-written (plain stores).
        self.0
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the replica machinery tells the delivery engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Shards just claimed: load their terminals' outbox rows and publish the heads.
    Gained(BTreeSet<u16>),
    /// Shards no longer owned: forget their terminals (publishing stopped already).
    Lost(BTreeSet<u16>),
    /// Another replica (or this one) committed outbox rows for `terminal_id`, the newest `seq`.
    Wake { terminal_id: String, seq: u64 },
    /// A broker event another replica read for a terminal it does not own.
    Event(crate::delivery::BrokerEvent),
    /// Notifications may have been lost (the listening connection was re-established): read the
    /// owned terminals' outbox again.
    Reread,
}

/// The shards both own at one instant, each by its own validity window (both held still).
#[cfg(test)]
pub(crate) fn overlap(a: &Ownership, b: &Ownership) -> BTreeSet<u16> {
    let (sa, sb) = (a.lock(), b.lock());
    let now = Instant::now();
    (0..SHARDS)
        .filter(|s| {
            let valid = |slots: &[Option<Instant>; SHARDS as usize]| {
                slots[usize::from(*s)].is_some_and(|u| now < u)
            };
            valid(&sa) && valid(&sb)
        })
        .collect()
}

#[cfg(test)]
mod lease_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// The shard function is part of the database's contract: these values must never change.
    #[test]
    fn shards_are_stable() {
        assert_eq!(shard_of(""), (0x811c_9dc5u32 % 64) as u16);
        let pinned: Vec<u16> = ["pos-01", "pos-02", "t-0001", "shop-7-till-3"]
            .iter()
            .map(|id| shard_of(id))
            .collect();
        assert_eq!(pinned, PINNED);
        // Spread: 6,400 ids cover every shard.
        let seen: BTreeSet<u16> = (0..6400).map(|i| shard_of(&format!("t-{i}"))).collect();
        assert_eq!(seen.len(), SHARDS as usize);
    }

    const PINNED: [u16; 4] = [63, 18, 61, 3];
}
