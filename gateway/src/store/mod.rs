//! The durable store: redb tables, one writer thread with group commit, typed reads.
//!
//! Two backends (`store.backend`): the embedded redb file (the default; what this page
//! describes) and PostgreSQL (`pg.rs`: the same tables, the same group commit, SERIALIZABLE
//! transactions so that several gateways can share one database). The logic is written once,
//! against the key-value interface of `kv.rs`.
//!
//! Every accepted webhook becomes one [`Job`] on a bounded queue. A single writer thread takes all
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
mod outbox;
mod pg;
#[cfg(test)]
mod pg_tests;
mod pg_tls;
mod reconcile;
mod retention;
mod rpc;
mod snapshot;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

pub use error::{OpKey, Operation, StoreError, StoreErrorKind, io_is_transient};
pub use outbox::{
    AckOutcome, AssignRefused, NewTerminal, OutboxRow, PreviousCert, RenewRefused, RenewTerminal,
    Renewal, Retired, Revocation, TerminalRecord, Undeliverable,
};
pub use pg::redact_url;
pub(crate) use pg_tls::ssl_mode as pg_ssl_mode;
pub use pg_tls::{PgTls, PgTlsError};
pub use reconcile::{LISTED_KIND, Listed, OrphanTransfer, listed_event_id};
pub use retention::{PRUNE_VISIT, Pruned, prune_events};
pub use snapshot::SnapshotError;
use writer::Tables;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv::{KvRead, ReadKv, RedbRead, StrTable};
use posgate_proto::event::EventData;
use redb::Database;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::domain::{Effect, IntentRecord, IntentStatus};

/// redb page cache size.
const CACHE_BYTES: usize = 128 << 20;

/// File name of the database inside `data_dir`.
pub const DB_FILE: &str = "posgate.redb";

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

/// Filter for [`Store::list_intents`].
#[derive(Clone, Debug, Default)]
pub struct IntentFilter {
    pub status: Option<IntentStatus>,
    pub terminal_id: Option<String>,
    /// Exclusive cursor: the last id of the previous page.
    pub starting_after: Option<String>,
    pub limit: usize,
}

/// A unit of work for the writer: applied inside the batch's write transaction, answered only
/// after that transaction is durably committed (or with [`StoreErrorKind::NotCommitted`]).
trait WriteJob: Send {
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError>;
    /// Keys it will probably read ([`kv::Hint`]).
    fn hints(&self) -> &[kv::Hint];
    fn finish(self: Box<Self>, committed: bool);
    /// Whether its commit must be on disk before it is answered (see [`Durability`]).
    fn durability(&self) -> Durability;
}

/// How durable a write must be when it is answered. (Not redb's `Durability`: every synced batch
/// is committed with redb's *eventual* durability, whose sync our database file turns into a
/// write barrier with its own `fdatasync`; see `barrier.rs`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// On disk (`fdatasync` completed) before the answer: accepted events, registrations,
    /// revocations.
    Synced,
    /// Committed (visible, ordered) but on disk only with the next synced commit: acks and
    /// last-seen times, whose loss in a crash costs a republish the terminal deduplicates, never
    /// a confirmation. A batch of only these skips the `fdatasync`.
    Deferred,
}

type Job = Box<dyn WriteJob>;

struct Typed<T, F> {
    /// What the job does and on which key, for its errors.
    op: Operation,
    work: F,
    hints: Vec<kv::Hint>,
    result: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
    durability: Durability,
}

impl<T, F> WriteJob for Typed<T, F>
where
    T: Send,
    F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send,
{
    /// May run more than once (PostgreSQL applies a batch again after a conflict with another
    /// writer); the last run's result is the one answered.
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        // Named here: the writer logs the error that aborted a batch, and must say whose it was.
        self.result = Some((self.work)(tables).map_err(|e| e.during(&self.op))?);
        Ok(())
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    fn hints(&self) -> &[kv::Hint] {
        &self.hints
    }

    fn finish(self: Box<Self>, committed: bool) {
        let answer = match (committed, self.result) {
            (true, Some(result)) => Ok(result),
            _ => Err(StoreErrorKind::NotCommitted.into()),
        };
        // A dropped receiver means the request was abandoned (client gone, shutdown): what was
        // committed stays committed and a retry is a duplicate.
        drop(self.reply.send(answer));
    }
}

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

/// The open database and the syncer of its file; replaced whole when the store reopens it.
#[derive(Clone)]
pub(crate) struct Open {
    db: Arc<Database>,
    syncer: barrier::Syncer,
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

/// Who a write is for, for the queue's reserve ([`Inner::reserved_for_webhooks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// What the provider tells: webhooks, and what reconciliation learns in their place.
    Provider,
    /// Everything else: acks, RPC answers, presence, admin calls.
    Other,
}

// === impl Store ===

impl Store {
    /// Opens (or creates) the database in `data_dir` and starts the writer thread.
    ///
    /// # Errors
    /// [`StoreErrorKind::Open`] when the directory or database cannot be created or opened (including
    /// another process holding it), [`StoreErrorKind::Init`] when the tables cannot be created.
    pub fn open(data_dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        Store::open_backend(&Backend::Redb, data_dir, limits)
    }

    /// Opens the store on `backend`: for redb as [`Store::open`]; for PostgreSQL, connects,
    /// applies the migrations not yet applied (once, whoever else opens the same database at the
    /// same time) and starts the writer thread, which keeps its own connection.
    ///
    /// # Errors
    /// As [`Store::open`]; for PostgreSQL [`StoreErrorKind::PgConnect`] when the database cannot be
    /// reached, [`StoreErrorKind::PgMigrate`] when the schema cannot be applied.
    pub fn open_backend(
        backend: &Backend,
        data_dir: &Path,
        limits: Limits,
    ) -> Result<Store, StoreError> {
        match backend {
            Backend::Redb => Store::open_redb(data_dir, limits),
            Backend::Postgres { url, tls } => Store::open_postgres(url, tls, data_dir, limits),
        }
    }

    fn open_postgres(
        url: &str,
        tls: &PgTls,
        data_dir: &Path,
        limits: Limits,
    ) -> Result<Store, StoreError> {
        let mut conn = pg::connect(url, tls, Some(limits.commit_deadline))?;
        pg::migrate(&mut conn).map_err(|source| StoreErrorKind::PgMigrate {
            url: redact_url(url),
            source,
        })?;
        let (tx, rx) = mpsc::channel(limits.queue_depth);
        let health = Arc::new(Health::default());
        let notices = Arc::new(Notices::default());
        let commit_seconds: Arc<OnceLock<prometheus::Histogram>> = Arc::default();
        let shared = pg::Shared {
            health: health.clone(),
            notices: notices.clone(),
            commit_seconds: commit_seconds.clone(),
            url: url.to_owned(),
            tls: tls.clone(),
            statement_timeout: limits.commit_deadline,
        };
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || pg::run(conn, rx, &limits, &shared))
            .map_err(StoreErrorKind::Thread)?;
        let wake = tx.downgrade();
        std::thread::Builder::new()
            .name("store-heartbeat".into())
            .spawn(move || pg::heartbeat(wake))
            .map_err(StoreErrorKind::Thread)?;
        Ok(Store {
            inner: Arc::new(Inner {
                engine: Engine::Postgres(Arc::new(pg::Readers::new(
                    url.to_owned(),
                    tls.clone(),
                    limits.commit_deadline,
                ))),
                // No file: a name in the data directory, whose free space the metrics report.
                path: data_dir.join("postgres"),
                queue: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                health,
                notices,
                commit_seconds,
                commit_deadline: limits.commit_deadline,
                reserved_for_webhooks: limits.queue_depth / 2,
                #[cfg(test)]
                fail_writes: AtomicBool::new(false),
            }),
        })
    }

    fn open_redb(data_dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        let path = data_dir.join(DB_FILE);
        let open = open_database(&path)?;
        let (tx, rx) = mpsc::channel(limits.queue_depth);
        let health = Arc::new(Health::default());
        let notices = Arc::new(Notices::default());
        let commit_seconds: Arc<OnceLock<prometheus::Histogram>> = Arc::default();
        let slot = Arc::new(Mutex::new(Some(open.clone())));
        let writer = {
            let shared = writer::Shared {
                health: health.clone(),
                notices: notices.clone(),
                commit_seconds: commit_seconds.clone(),
                slot: slot.clone(),
                path: path.clone(),
                wake: tx.downgrade(),
            };
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer::run(open, rx, &limits, &shared))
                .map_err(StoreErrorKind::Thread)?
        };
        Ok(Store {
            inner: Arc::new(Inner {
                engine: Engine::Redb(slot),
                path,
                queue: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                health,
                notices,
                commit_seconds,
                commit_deadline: limits.commit_deadline,
                reserved_for_webhooks: limits.queue_depth / 2,
                #[cfg(test)]
                fail_writes: AtomicBool::new(false),
            }),
        })
    }

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

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        self.inner.queue.lock().ok()?.clone()
    }

    /// Runs `work` inside the next group commit; returns its result once the commit is durable.
    /// Every error comes back naming `op`.
    ///
    /// # Errors
    /// [`StoreErrorKind::Overloaded`] when the queue is full, [`StoreErrorKind::Closed`] after
    /// [`Store::close`], [`StoreErrorKind::NotCommitted`] when the batch's commit failed (also when
    /// `work` returned an error, which aborts the whole batch and is logged by the writer): in
    /// those cases nothing of `work` is committed. [`StoreErrorKind::Stalled`] when the commit did
    /// not complete within the deadline: it may still complete later (a retried webhook is then a
    /// duplicate).
    async fn write<T, F>(&self, op: Operation, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(op, work, Vec::new(), Durability::Synced, Class::Other)
            .await
    }

    /// As [`Store::write`], for what the provider tells: it may use the whole queue.
    async fn write_provider<T, F>(&self, op: Operation, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(op, work, Vec::new(), Durability::Synced, Class::Provider)
            .await
    }

    /// As [`Store::write`], answered without waiting for the disk ([`Durability::Deferred`]).
    async fn write_deferred<T, F>(&self, op: Operation, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(op, work, Vec::new(), Durability::Deferred, Class::Other)
            .await
    }

    async fn submit<T, F>(
        &self,
        op: Operation,
        work: F,
        hints: Vec<kv::Hint>,
        durability: Durability,
        class: Class,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Typed {
            op: op.clone(),
            work,
            hints,
            result: None,
            reply,
            durability,
        };
        self.enqueue(job, answer, class)
            .await
            .map_err(|e| e.during(&op))
    }

    async fn enqueue<T, F>(
        &self,
        job: Typed<T, F>,
        answer: oneshot::Receiver<Result<T, StoreError>>,
        class: Class,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        #[cfg(test)]
        if self.inner.fail_writes.load(Ordering::Relaxed) {
            return Err(StoreErrorKind::NotCommitted.into());
        }
        let sender = self.sender().ok_or(StoreErrorKind::Closed)?;
        if class == Class::Other && sender.capacity() <= self.inner.reserved_for_webhooks {
            return Err(StoreErrorKind::Overloaded.into());
        }
        sender.try_send(Box::new(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreErrorKind::Overloaded,
            mpsc::error::TrySendError::Closed(_) => StoreErrorKind::Closed,
        })?;
        let deadline = self.inner.commit_deadline;
        // Unit tests may run on paused time, which tokio advances whenever the runtime is idle:
        // also while the writer (an OS thread the runtime cannot see) commits, which would make
        // any write time out at once. A blocking task in flight stops that advance, so the
        // answer is awaited on one: paused time then moves only while the store is idle.
        #[cfg(test)]
        let answer = async {
            match tokio::task::spawn_blocking(move || answer.blocking_recv()).await {
                Ok(answer) => answer,
                Err(_) => Ok(Err(StoreErrorKind::Closed.into())),
            }
        };
        match tokio::time::timeout(deadline, answer).await {
            Ok(answer) => answer.map_err(|_| StoreErrorKind::Closed)?,
            Err(_) => Err(StoreErrorKind::Stalled {
                deadline_ms: deadline.as_millis() as u64,
            }
            .into()),
        }
    }

    /// Stores one verified event and applies it, durably, before returning.
    ///
    /// # Errors
    /// As [`Store::write`]; none of them committed anything for this event.
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
    /// As [`Store::write`].
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

    /// Runs `f` on a read transaction (on the blocking pool) once the commits before it are on
    /// disk. Every error comes back naming `op`.
    async fn read<T: Send + 'static>(
        &self,
        op: Operation,
        f: impl FnOnce(&ReadKv<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.read_txn(f).await.map_err(|e| e.during(&op))
    }

    async fn read_txn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadKv<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let deadline = self.inner.commit_deadline;
        let stalled = StoreErrorKind::Stalled {
            deadline_ms: deadline.as_millis() as u64,
        };
        if let Engine::Postgres(readers) = &self.inner.engine {
            if self.sender().is_none() {
                return Err(StoreErrorKind::Closed.into());
            }
            let readers = readers.clone();
            // A committed write is on disk (synchronous_commit) before any reader sees it.
            let read = tokio::task::spawn_blocking(move || readers.read(f));
            return match tokio::time::timeout(deadline, read).await {
                Ok(joined) => joined.map_err(|_| StoreErrorKind::Closed)?,
                Err(_) => Err(stalled.into()),
            };
        }
        let Some(Open { db, syncer }) = self.current() else {
            return Err(if self.sender().is_some() {
                StoreErrorKind::Unavailable
            } else {
                StoreErrorKind::Closed
            }
            .into());
        };
        tokio::task::spawn_blocking(move || {
            // A commit is visible before its fdatasync completes: a reader must not hand out
            // (to a terminal, say) what a crash could still take back; nor wait for ever on a
            // stalled disk.
            match syncer.wait_all_for(deadline) {
                barrier::Synced::Yes => {
                    let kv = ReadKv::Redb(RedbRead(db.begin_read()?));
                    f(&kv)
                }
                barrier::Synced::Failed => Err(StoreErrorKind::SyncFailed.into()),
                barrier::Synced::Stalled => Err(stalled.into()),
            }
        })
        .await
        .map_err(|_| StoreErrorKind::Closed)?
    }

    /// One intent.
    ///
    /// # Errors
    /// A database error, or [`StoreErrorKind::Corrupt`].
    pub async fn intent(&self, id: String) -> Result<Option<StoredIntent>, StoreError> {
        self.record(StrTable::Intents, OpKey::Intent(id.clone()), id)
            .await
    }

    /// One event.
    ///
    /// # Errors
    /// A database error, or [`StoreErrorKind::Corrupt`].
    pub async fn event(&self, id: String) -> Result<Option<StoredEvent>, StoreError> {
        self.record(StrTable::Events, OpKey::Event(id.clone()), id)
            .await
    }

    /// The record `id` of `table`, decoded; `key` names it in errors.
    async fn record<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: StrTable,
        key: OpKey,
        id: String,
    ) -> Result<Option<T>, StoreError> {
        self.read(Operation::new("read", key), move |kv| {
            let value = kv.get(table, &id)?;
            value.map(|v| decode(&id, &v)).transpose()
        })
        .await
    }

    /// A page of intents in id order, filtered.
    ///
    /// # Errors
    /// A database error, or [`StoreErrorKind::Corrupt`].
    pub async fn list_intents(
        &self,
        filter: IntentFilter,
    ) -> Result<(Vec<StoredIntent>, bool), StoreError> {
        let op = match &filter.starting_after {
            Some(after) => Operation::new("list intents after", OpKey::Intent(after.clone())),
            None => Operation::new("list intents", OpKey::None),
        };
        self.read(op, move |kv| {
            let start = filter.starting_after.clone().unwrap_or_default();
            let mut page = Vec::new();
            let mut has_more = false;
            kv.scan(StrTable::Intents, &start, &mut |key, value| {
                if filter.starting_after.as_deref() == Some(key) {
                    return Ok(true);
                }
                let intent: StoredIntent = decode(key, value)?;
                let status_ok = filter.status.is_none_or(|s| s == intent.record.status);
                let terminal_ok = filter
                    .terminal_id
                    .as_deref()
                    .is_none_or(|t| intent.record.terminal_id.as_deref() == Some(t));
                if status_ok && terminal_ok {
                    if page.len() == filter.limit {
                        has_more = true;
                        return Ok(false);
                    }
                    page.push(intent);
                }
                Ok(true)
            })?;
            Ok((page, has_more))
        })
        .await
    }

    /// Stops taking jobs, lets the writer commit what is queued, and waits for it to exit.
    pub async fn close(&self) {
        let sender = self.inner.queue.lock().ok().and_then(|mut q| q.take());
        drop(sender);
        let writer = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer
            && tokio::task::spawn_blocking(move || writer.join())
                .await
                .is_err()
        {
            tracing::error!("store writer thread panicked");
        }
        self.inner.health.failed.store(true, Ordering::Relaxed);
        let open = match &self.inner.engine {
            Engine::Redb(open) => open,
            Engine::Postgres(readers) => {
                readers.close();
                return;
            }
        };
        let Some(Open { mut db, syncer }) = open.lock().ok().and_then(|mut o| o.take()) else {
            return;
        };
        drop(syncer);
        // A read in flight holds the database (and so the file's lock) until it ends: wait for
        // it, so that a restart in this process finds the file free.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Arc::try_unwrap(db) {
                Ok(last) => {
                    // Closing writes redb's allocator state and syncs: off the runtime.
                    drop(tokio::task::spawn_blocking(move || drop(last)).await);
                    return;
                }
                Err(shared) if tokio::time::Instant::now() < deadline => {
                    db = shared;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                Err(_) => {
                    tracing::warn!(
                        "reads still hold the database after 10 s; it closes when they end"
                    );
                    return;
                }
            }
        }
    }
}

/// Opens the database file afresh: its pages in the kernel's cache dropped first, then redb, which
/// checks the last commit (and rebuilds its allocator state) after an unclean close, then the
/// tables. Used at startup and when the writer reopens the file after a disk failure.
///
/// Why drop the cache: after a failed `fdatasync`, Linux marks the pages it could not write clean
/// and keeps them, so a reader of the file (this process, or the next one: the cache outlives
/// it) would see a commit that never reached the disk (PostgreSQL's "fsyncgate"). Without them,
/// redb reads what the disk holds, and its checksums reject a commit whose pages are not there.
fn open_database(path: &Path) -> Result<Open, StoreError> {
    open_database_as(path, true)
}

/// As [`open_database`]; `repair_apart`: a file that needs a repair is repaired by [`repair`]
/// first (else by redb itself, through the small cache).
fn open_database_as(path: &Path, repair_apart: bool) -> Result<Open, StoreError> {
    let open_err = |source: redb::DatabaseError| StoreErrorKind::Open {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| open_err(e.into()))?;
    drop_cached_pages(&file, path);
    let (backend, syncer) = barrier::BarrierFile::new(file).map_err(open_err)?;
    // redb's page cache defaults to 1 GiB; the working set here (recent intents, the outbox,
    // the registry) is far smaller, and an edge server's memory is better left to the broker.
    // A file that needs a repair (after a crash) is not repaired through that small cache: see
    // `repair`.
    let mut builder = redb::Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    if repair_apart {
        builder.set_repair_callback(|session| session.abort());
    }
    let db = match builder.create_with_backend(backend) {
        Ok(db) => db,
        Err(redb::DatabaseError::RepairAborted) => {
            drop(syncer);
            repair(path).map_err(open_err)?;
            return open_database_as(path, false);
        }
        Err(e) => return Err(open_err(e).into()),
    };
    kv::redb_init(&db).map_err(|e| match e.into_kind() {
        StoreErrorKind::Db(source) => StoreErrorKind::Init {
            path: path.to_owned(),
            source,
        },
        other => other,
    })?;
    Ok(Open {
        db: Arc::new(db),
        syncer,
    })
}

/// Most page cache a repair may use.
const REPAIR_CACHE_BYTES: usize = 1 << 30;

/// Repairs the file after a crash, with a page cache large enough to keep what the repair reads.
///
/// redb's repair walks every page in use twice (checksums, then the allocator state). Through
/// the store's 128 MiB cache the second walk reads everything again, and the restart after a
/// SIGKILL grew to many seconds with the file (issue 14). Opened here with up to 1 GiB (redb's
/// own default) and closed cleanly, the file is then opened as usual without a repair; the cache's
/// memory goes back with the close.
fn repair(path: &Path) -> Result<(), redb::DatabaseError> {
    let started = Instant::now();
    tracing::warn!(path = %path.display(), "the database was not closed cleanly; repairing it");
    let db = redb::Builder::new()
        .set_cache_size(REPAIR_CACHE_BYTES)
        .create(path)?;
    drop(db);
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "database repaired"
    );
    Ok(())
}

/// Asks the kernel to forget its cached pages of `file` (`POSIX_FADV_DONTNEED`); dirty pages are
/// written back, not dropped. Best effort: a file system without it only logs.
fn drop_cached_pages(file: &std::fs::File, path: &Path) {
    if let Err(e) = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::warn!(path = %path.display(), error = %e, "could not drop the database's cached pages");
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
