//! Opening and closing the store: the backend's threads at open, the redb file itself (its cached
//! pages dropped, a repair through a larger cache after a crash, the tables created), and a close
//! that lets the writer commit what is queued and releases the file. Kept apart from the reads and
//! writes of every day; the writer thread comes here too ([`open_database`]) to reopen the file
//! after a disk failure.

use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::Database;
use tokio::sync::mpsc;

use super::{
    Backend, DB_FILE, Engine, Health, Inner, Job, Limits, Notices, PgTls, Store, StoreError,
    StoreErrorKind, barrier, kv, pg, redact_url, writer,
};

/// redb page cache size.
const CACHE_BYTES: usize = 128 << 20;

/// The open database and the syncer of its file; replaced whole when the store reopens it.
#[derive(Clone)]
pub(crate) struct Open {
    pub(super) db: Arc<Database>,
    pub(super) syncer: barrier::Syncer,
}

/// What a backend's writer thread shares with the store's handles.
#[derive(Default)]
struct WriterState {
    health: Arc<Health>,
    notices: Arc<Notices>,
    commit_seconds: Arc<OnceLock<prometheus::Histogram>>,
}

// === impl Store (open and close) ===

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
        let state = WriterState::default();
        let shared = pg::Shared {
            health: state.health.clone(),
            notices: state.notices.clone(),
            commit_seconds: state.commit_seconds.clone(),
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
        let readers = pg::Readers::new(url.to_owned(), tls.clone(), limits.commit_deadline);
        Ok(Store::started(
            Engine::Postgres(Arc::new(readers)),
            // No file: a name in the data directory, whose free space the metrics report.
            data_dir.join("postgres"),
            (tx, writer),
            state,
            &limits,
        ))
    }

    fn open_redb(data_dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        let path = data_dir.join(DB_FILE);
        let open = open_database(&path)?;
        let (tx, rx) = mpsc::channel(limits.queue_depth);
        let state = WriterState::default();
        let slot = Arc::new(Mutex::new(Some(open.clone())));
        let writer = {
            let shared = writer::Shared {
                health: state.health.clone(),
                notices: state.notices.clone(),
                commit_seconds: state.commit_seconds.clone(),
                slot: slot.clone(),
                path: path.clone(),
                wake: tx.downgrade(),
            };
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer::run(open, rx, &limits, &shared))
                .map_err(StoreErrorKind::Thread)?
        };
        Ok(Store::started(
            Engine::Redb(slot),
            path,
            (tx, writer),
            state,
            &limits,
        ))
    }

    /// The handle over a writer thread just started, on either backend.
    fn started(
        engine: Engine,
        path: PathBuf,
        (queue, writer): (mpsc::Sender<Job>, JoinHandle<()>),
        state: WriterState,
        limits: &Limits,
    ) -> Store {
        Store {
            inner: Arc::new(Inner {
                engine,
                path,
                queue: Mutex::new(Some(queue)),
                writer: Mutex::new(Some(writer)),
                health: state.health,
                notices: state.notices,
                commit_seconds: state.commit_seconds,
                commit_deadline: limits.commit_deadline,
                reserved_for_webhooks: limits.queue_depth / 2,
                #[cfg(test)]
                fail_writes: AtomicBool::new(false),
            }),
        }
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
pub(super) fn open_database(path: &Path) -> Result<Open, StoreError> {
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
