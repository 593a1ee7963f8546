//! The durable store: redb tables, one writer thread with group commit, typed reads.
//!
//! Two backends (`store.backend`): the embedded redb file (the default; what this page
//! describes) and PostgreSQL (`pg/`: the same tables, the same group commit, SERIALIZABLE
//! transactions so that several gateways can share one database). The logic is written once,
//! against the key-value interface of `kv.rs`.
//!
//! Every accepted webhook becomes one `Job` on a bounded queue. A single writer thread takes all
//! jobs that are waiting, applies them one after another inside **one** write transaction and
//! commits it, synced to disk (`fdatasync`), before any of their senders is answered: a `200`
//! always means durable. Grouping concurrent requests into one commit is what lifts ingest above the
//! one-fsync-per-request ceiling (about 2,000–4,000/s here) without weakening that promise.
//! Because jobs are applied in sequence inside the transaction, two identical deliveries at the
//! same instant are a check-then-insert on the same transaction: exactly one has an effect.
//!
//! A full queue is answered [`StoreErrorKind::Overloaded`] (the ingress says `503`, the provider
//! retries). Webhooks first: writes that are not the provider's (acks, RPC answers, presence,
//! admin) may take only half of the queue. Reads use their own read transactions on the blocking
//! pool.
//!
//! Tables (values are JSON, so an operator can inspect them with any redb tool):
//! - `events`: `evt_…` → [`StoredEvent`]; the deduplication key. The exact raw body is kept only
//!   while it may be needed (see [`StoredEvent::raw`]); rows older than `store.retention_hours`
//!   are pruned in small batches (`prune_events`), never one that still waits for its intent.
//! - `intents`: `pi_…` → [`StoredIntent`].
//! - `intent_by_address`: lowercase payment address → `pi_…`, to match transfers without an id.
//! - `pending`: `pi_…` or `addr:0x…` → `evt_…` for events about intents we do not know yet; they
//!   are applied when the intent appears.
//! - `rejected`: sequence → verified bodies that were not an event envelope, for forensics.
//! - `terminals`: terminal id → [`TerminalRecord`] (registry, next `seq`, revocation, its
//!   certificate and the one a pending renewal replaced).
//! - `revoked_serials`: client certificate serial → terminal id (revoked terminals' certificates
//!   and certificates replaced by a completed renewal: a live terminal can have entries here).
//! - `outbox`: (terminal id, `seq`) → [`OutboxRow`], deleted only on the terminal's ack.
//! - `undeliverable`: terminal id (empty: none named) → intent ids waiting for that terminal.
//! - `rpc_answers`: (terminal id, request id) → the answer given, so a retried request gets it again.
//! - `orphan_transfers`, `reconcile_state`: see `store/reconcile.rs`.

// std's clock on purpose: `Health` is written by the writer thread and read from any thread: real time, not a (test-paused) runtime clock.
#![allow(clippy::disallowed_types)]

mod barrier;
mod error;
mod kv;
mod lifecycle;
mod outbox;
mod pg;
#[cfg(test)]
mod pg_tests;
mod pg_tls;
#[cfg(test)]
pub(crate) use pg_tls::{write_test_ca, write_test_client_cert};
mod queue;
mod reads;
mod reconcile;
mod records;
mod renewals;
mod retention;
mod rpc;
mod snapshot;
mod terminals;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

pub use error::{OpKey, Operation, StoreError, StoreErrorKind, io_is_transient};
use lifecycle::{Open, open_database};
pub use outbox::{AckOutcome, AssignRefused, OutboxRow, Undeliverable};
pub use pg::redact_url;
pub(crate) use pg_tls::ssl_mode as pg_ssl_mode;
pub use pg_tls::{PgTls, PgTlsError};
#[cfg(test)]
use queue::WriteJob;
use queue::{Class, Durability, Job, Typed};
pub use reconcile::{LISTED_KIND, Listed, OrphanTransfer, listed_event_id};
pub use records::{
    EventOutcome, EventRef, IncomingEvent, Ingested, IntentFilter, StoredEvent, StoredIntent,
};
pub use renewals::{RenewRefused, RenewTerminal, Renewal, Retired};
pub use retention::{PRUNE_VISIT, Pruned, prune_events};
pub use snapshot::SnapshotError;
pub use terminals::{NewTerminal, PreviousCert, Revocation, TerminalRecord};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// File name of the database inside `data_dir`.
pub const DB_FILE: &str = "posgate.redb";

/// How the store is sized, and how long a commit may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Writes waiting for the next group commit; beyond it, [`StoreErrorKind::Overloaded`].
    pub queue_depth: usize,
    /// Most writes in one transaction.
    pub max_batch: usize,
    /// A write not durably committed within this is answered [`StoreErrorKind::Stalled`] (it may
    /// still commit later), a read waits at most this long for the disk, and the store reports
    /// itself unhealthy while a commit or an `fdatasync` has been running longer.
    pub commit_deadline: Duration,
    /// redb's quick repair on every synced commit (see `store.quick_repair`).
    pub quick_repair: bool,
}

impl Limits {
    /// `queue_depth` and `max_batch` with the default commit deadline (5 s).
    pub fn new(queue_depth: usize, max_batch: usize) -> Limits {
        Limits {
            queue_depth,
            max_batch,
            commit_deadline: Duration::from_secs(5),
            quick_repair: false,
        }
    }
}

/// What the writer thread and the handles know of the store's health.
#[derive(Default)]
pub(crate) struct Health {
    /// The last commit failed, or the database is being reopened.
    failed: AtomicBool,
    /// When the writer began the batch it is committing now.
    busy_since: Mutex<Option<Instant>>,
    /// Tests hold the PostgreSQL writer's commits back (redb's are held at its syncer).
    #[cfg(test)]
    hold: AtomicBool,
}

impl Health {
    fn busy(&self, busy: bool) {
        if let Ok(mut since) = self.busy_since.lock() {
            *since = busy.then(Instant::now);
        }
    }

    fn busy_for(&self) -> Option<Duration> {
        self.busy_since
            .lock()
            .ok()
            .and_then(|since| since.map(|s| s.elapsed()))
    }
}

/// Where the writer hands new outbox rows after each commit.
#[derive(Default)]
pub(crate) struct Notices(Mutex<Option<mpsc::UnboundedSender<Vec<OutboxRow>>>>);

impl Notices {
    pub(crate) fn send(&self, rows: Vec<OutboxRow>) {
        if let Ok(guard) = self.0.lock()
            && let Some(tx) = guard.as_ref()
        {
            // A gone receiver only loses the hint; the rows stay in the outbox.
            drop(tx.send(rows));
        }
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    path: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    health: Arc<Health>,
    notices: Arc<Notices>,
    commit_seconds: Arc<OnceLock<prometheus::Histogram>>,
    commit_deadline: Duration,
    /// Queue slots only webhooks (and reconciliation's provider data) may take: other writes
    /// (acks, RPC answers, presence, admin) are refused `Overloaded` while fewer are free, so they
    /// can never push a webhook into `503`.
    reserved_for_webhooks: usize,
    /// Tests make every write fail.
    #[cfg(test)]
    fail_writes: AtomicBool,
}

/// Where the data lives.
enum Engine {
    /// The database; taken at [`Store::close`] (so the file is released even if a handle outlives
    /// the store) and while the writer reopens it after a disk failure.
    Redb(Arc<Mutex<Option<Open>>>),
    /// Read connections (the writer thread has its own).
    Postgres(Arc<pg::Readers>),
}

/// Which database the store keeps its tables in (`store.backend`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Backend {
    /// The embedded redb file `posgate.redb` in the data directory (the default).
    #[default]
    Redb,
    /// A PostgreSQL database (`store.postgres_url`), which several gateways may share, reached
    /// with `tls` (`store.postgres_ca_file`).
    Postgres { url: String, tls: PgTls },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Redb => f.write_str("Redb"),
            Backend::Postgres { url, tls } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("tls", tls)
                .finish(),
        }
    }
}

// === impl Store ===

impl Store {
    /// Receives the outbox rows of every later commit (one receiver; a new call replaces it).
    pub fn subscribe_outbox(&self) -> mpsc::UnboundedReceiver<Vec<OutboxRow>> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut slot) = self.inner.notices.0.lock() {
            *slot = Some(tx);
        }
        rx
    }

    /// Holds every `fdatasync` back (`true`) until released (`false`): a durable write then
    /// waits, and every answer after it.
    #[cfg(test)]
    pub(crate) fn hold_syncs_for_test(&self, hold: bool) {
        if let Some(open) = self.current() {
            open.syncer.hold(hold);
        }
        self.inner.health.hold.store(hold, Ordering::Relaxed);
    }

    /// Every later write fails (`true`) with [`StoreErrorKind::NotCommitted`], until released.
    #[cfg(test)]
    pub(crate) fn fail_writes_for_test(&self, fail: bool) {
        self.inner.fail_writes.store(fail, Ordering::Relaxed);
    }

    /// How many `fdatasync`s the open database has asked for so far.
    #[cfg(test)]
    pub(crate) fn syncs_requested_for_test(&self) -> u64 {
        self.current().map_or(0, |open| open.syncer.requested())
    }

    /// The open database, unless closed or being reopened.
    fn current(&self) -> Option<Open> {
        match &self.inner.engine {
            Engine::Redb(open) => open.lock().ok()?.clone(),
            Engine::Postgres(_) => None,
        }
    }

    /// Which backend this store runs on.
    pub fn backend_name(&self) -> &'static str {
        match self.inner.engine {
            Engine::Redb(_) => "redb",
            Engine::Postgres(_) => "postgres",
        }
    }

    /// Hands `rows` to the outbox subscriber as if a commit had just added them (a late notice).
    #[cfg(test)]
    pub(crate) fn notify_for_test(&self, rows: Vec<OutboxRow>) {
        self.inner.notices.send(rows);
    }

    /// Records the duration of every later group commit into `histogram`.
    pub fn observe_commits(&self, histogram: prometheus::Histogram) {
        drop(self.inner.commit_seconds.set(histogram));
    }

    /// Where the database file lives.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The writer is running, its last commit succeeded, and no commit or `fdatasync` has been
    /// running longer than the commit deadline (a stalled disk is a failed one).
    pub fn is_healthy(&self) -> bool {
        let deadline = self.inner.commit_deadline;
        // A writer thread that died (a panic) closed the queue's receiving end.
        let writer_ok = !self.inner.health.failed.load(Ordering::Relaxed)
            && self.sender().is_some_and(|s| !s.is_closed())
            && self.inner.health.busy_for().is_none_or(|d| d < deadline);
        match &self.inner.engine {
            Engine::Redb(_) => {
                let Some(open) = self.current() else {
                    return false;
                };
                writer_ok
                    && !open.syncer.failed()
                    && open.syncer.syncing_for().is_none_or(|d| d < deadline)
            }
            // The writer finds a lost connection within a heartbeat, and is failed until it
            // has reconnected.
            Engine::Postgres(_) => writer_ok,
        }
    }

    /// Stores one verified event and applies it, durably, before returning.
    ///
    /// # Errors
    /// As `Store::write`; none of them committed anything for this event.
    pub async fn ingest(&self, event: IncomingEvent) -> Result<Ingested, StoreError> {
        let hints = match self.inner.engine {
            Engine::Postgres(_) => writer::hints_for(&event),
            Engine::Redb(_) => Vec::new(),
        };
        let op = Operation::new("ingest", OpKey::Event(event.event_id.clone()));
        self.submit(
            op,
            move |t| t.ingest(&event),
            hints,
            Durability::Synced,
            Class::Provider,
        )
        .await
    }

    /// Keeps a verified body that was not an event envelope, for forensics.
    ///
    /// # Errors
    /// As `Store::write`.
    pub async fn reject(
        &self,
        raw: Bytes,
        reason: String,
        received_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let op = Operation::new("keep rejected body", OpKey::None);
        self.write_provider(op, move |t| t.reject(&raw, &reason, received_at))
            .await
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| {
        StoreErrorKind::Corrupt {
            key: key.to_owned(),
            source,
        }
        .into()
    })
}
