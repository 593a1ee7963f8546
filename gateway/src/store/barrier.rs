//! The database file, with redb's "eventual" sync as a write barrier: the `fdatasync` of a commit
//! runs on a syncer thread while the writer already builds the next batch.
//!
//! redb asks of `sync_data(eventual = true)` only that every write before it reaches the disk
//! before any write after it (its `StorageBackend` contract). So [`BarrierFile::sync_data`] starts
//! an `fdatasync` and returns; the next write (the next commit's pages) waits until that sync has
//! completed. A commit's data is durable once the sync it asked for (its generation) has completed;
//! the writer answers each batch only then ([`Syncer::after`]), in commit order.
//!
//! A failed `fdatasync` poisons the file: the kernel may have dropped the pages it could not
//! write, so nothing after it can be trusted. Every later write and sync fails, the waiting
//! batches are answered "not committed", and the store reports unhealthy until a restart reads
//! the disk again.

// std's clock on purpose: the syncer thread and the condvar timeouts run on OS threads, outside any runtime.
#![allow(clippy::disallowed_types)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::StorageBackend;
use redb::backends::FileBackend;

/// What runs once a generation is on disk (`true`) or can never be (`false`).
pub(super) type Completion = Box<dyn FnOnce(bool) + Send>;

#[derive(Default)]
struct State {
    /// Syncs asked for so far; the generation of the latest.
    requested: u64,
    /// Every generation up to this one is on disk.
    synced: u64,
    /// An `fdatasync` failed: nothing is durable from here on.
    failed: bool,
    stop: bool,
    /// Completions waiting for their generation, in order.
    waiting: VecDeque<(u64, Completion)>,
    /// The syncer thread is running completions: a later one must queue behind them.
    running: bool,
    /// When the `fdatasync` in flight began (none in flight: `None`); a stalled disk shows here.
    syncing_since: Option<Instant>,
}

impl State {
    /// The completions that can run now, in order (all of them once a sync has failed).
    fn runnable(&mut self) -> Vec<Completion> {
        let mut out = Vec::new();
        while self
            .waiting
            .front()
            .is_some_and(|(g, _)| self.failed || *g <= self.synced)
        {
            if let Some((_, completion)) = self.waiting.pop_front() {
                out.push(completion);
            }
        }
        out
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Tests hold the disk back or make it fail.
    #[cfg(test)]
    faults: Mutex<Faults>,
    #[cfg(test)]
    faults_changed: Condvar,
}

#[cfg(test)]
#[derive(Default)]
struct Faults {
    /// The next `fdatasync` waits while this is set.
    hold: bool,
    /// The next `fdatasync` fails.
    fail: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding it; a poisoned lock still holds consistent counters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `generation` is on disk; `false` if it never will be.
    fn wait_synced(&self, mut state: MutexGuard<'_, State>, generation: u64) -> bool {
        while state.synced < generation && !state.failed {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        !state.failed
    }

    /// Blocks until no sync is in flight: the barrier before any write.
    fn idle(&self) -> io::Result<()> {
        let state = self.lock();
        let generation = state.requested;
        if self.wait_synced(state, generation) {
            Ok(())
        } else {
            Err(poisoned())
        }
    }

    /// The syncer thread, with its own handle of the file (closed when the thread ends, so the
    /// file's lock goes with the database, whatever [`Syncer`] clones live on).
    fn run(&self, file: &File) {
        loop {
            let target = {
                let mut state = self.lock();
                while state.synced == state.requested && !state.stop {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if state.synced == state.requested || state.failed {
                    return;
                }
                state.syncing_since = Some(Instant::now());
                state.requested
            };
            let result = self.sync_file(file);
            let ok = result.is_ok();
            let mut done = {
                let mut state = self.lock();
                state.syncing_since = None;
                match &result {
                    Ok(()) => state.synced = target,
                    Err(e) => {
                        tracing::error!(error = %e, "fdatasync of the database failed: the store stops accepting writes; restart posgate once the disk is fixed");
                        state.failed = true;
                    }
                }
                self.changed.notify_all();
                let done = state.runnable();
                state.running = !done.is_empty();
                done
            };
            // Completions queued meanwhile behind these run here too, so the order holds.
            while !done.is_empty() {
                for completion in done {
                    completion(ok);
                }
                let mut state = self.lock();
                done = state.runnable();
                state.running = !done.is_empty();
            }
            if !ok {
                return;
            }
        }
    }
}

impl Shared {
    #[cfg(not(test))]
    fn sync_file(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    #[cfg(test)]
    fn sync_file(&self, file: &File) -> io::Result<()> {
        let mut faults = self.faults.lock().unwrap();
        while faults.hold {
            faults = self.faults_changed.wait(faults).unwrap();
        }
        if std::mem::take(&mut faults.fail) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        file.sync_data()
    }
}

fn poisoned() -> io::Error {
    io::Error::other("an earlier fdatasync of the database failed")
}

/// What [`Syncer::wait_all_for`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Synced {
    /// Everything committed before the call is on disk.
    Yes,
    /// An `fdatasync` failed.
    Failed,
    /// Still not on disk when the deadline passed.
    Stalled,
}

/// The database file as redb's storage backend.
pub(super) struct BarrierFile {
    inner: FileBackend,
    shared: Arc<Shared>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BarrierFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarrierFile").finish_non_exhaustive()
    }
}

/// The writer's view of the syncs.
#[derive(Clone)]
pub(super) struct Syncer(Arc<Shared>);

impl BarrierFile {
    /// Wraps `file` (locked against a second process, as redb's own backend does) and starts its
    /// syncer thread.
    ///
    /// # Errors
    /// When the file is already open elsewhere, cannot be duplicated, or the thread cannot start.
    pub(super) fn new(file: File) -> Result<(BarrierFile, Syncer), redb::DatabaseError> {
        let sync_handle = file.try_clone()?;
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            changed: Condvar::new(),
            #[cfg(test)]
            faults: Mutex::default(),
            #[cfg(test)]
            faults_changed: Condvar::new(),
        });
        let inner = FileBackend::new(file)?;
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-sync".into())
                .spawn(move || shared.run(&sync_handle))?
        };
        let syncer = Syncer(shared.clone());
        Ok((
            BarrierFile {
                inner,
                shared,
                syncer: Mutex::new(Some(thread)),
            },
            syncer,
        ))
    }
}

impl StorageBackend for BarrierFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.shared.idle()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        let mut state = self.shared.lock();
        if state.failed {
            return Err(poisoned());
        }
        state.requested += 1;
        let generation = state.requested;
        self.shared.changed.notify_all();
        if eventual || self.shared.wait_synced(state, generation) {
            Ok(())
        } else {
            Err(poisoned())
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.shared.idle()?;
        self.inner.write(offset, data)
    }
}

impl Drop for BarrierFile {
    /// Lets the last sync finish before the file closes.
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        let thread = self
            .syncer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            drop(thread.join());
        }
    }
}

impl Syncer {
    /// The generation of the latest sync asked for: right after a durable commit, that commit's.
    pub(super) fn requested(&self) -> u64 {
        self.0.lock().requested
    }

    /// Runs `completion` once `generation` is on disk (`true`), or with `false` if it never will
    /// be; after every completion given before it. At once (on this thread) when nothing is
    /// ahead of it.
    pub(super) fn after(&self, generation: u64, completion: Completion) {
        let mut state = self.0.lock();
        if state.failed {
            drop(state);
            completion(false);
        } else if state.synced >= generation && state.waiting.is_empty() && !state.running {
            drop(state);
            completion(true);
        } else {
            state.waiting.push_back((generation, completion));
        }
    }

    /// Holds every `fdatasync` back (`true`) until released (`false`).
    #[cfg(test)]
    pub(super) fn hold(&self, hold: bool) {
        self.0.faults.lock().unwrap().hold = hold;
        self.0.faults_changed.notify_all();
    }

    /// The next `fdatasync` fails.
    #[cfg(test)]
    pub(super) fn fail_next(&self) {
        self.0.faults.lock().unwrap().fail = true;
    }

    /// Blocks until everything committed so far is on disk; `false` if it never will be.
    pub(super) fn wait_all(&self) -> bool {
        let state = self.0.lock();
        let generation = state.requested;
        self.0.wait_synced(state, generation)
    }

    /// As [`Syncer::wait_all`], for at most `deadline`: a stalled disk must not hold a reader for
    /// ever.
    pub(super) fn wait_all_for(&self, deadline: Duration) -> Synced {
        let until = Instant::now() + deadline;
        let mut state = self.0.lock();
        let generation = state.requested;
        while state.synced < generation && !state.failed {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                return Synced::Stalled;
            };
            state = self
                .0
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if state.failed {
            Synced::Failed
        } else {
            Synced::Yes
        }
    }

    /// An `fdatasync` failed: nothing written from here on can be trusted to reach the disk.
    pub(super) fn failed(&self) -> bool {
        self.0.lock().failed
    }

    /// How long the `fdatasync` in flight has been running, if one is.
    pub(super) fn syncing_for(&self) -> Option<Duration> {
        self.0.lock().syncing_since.map(|since| since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn file() -> (tempfile::TempDir, BarrierFile, Syncer) {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let (backend, syncer) = BarrierFile::new(f).unwrap();
        (dir, backend, syncer)
    }

    #[test]
    fn completions_run_in_order_once_their_generation_is_synced() {
        let (_dir, backend, syncer) = file();
        let (tx, rx) = std::sync::mpsc::channel();
        for n in 0..3u64 {
            backend.write(n * 4096, &[n as u8; 4096]).unwrap();
            backend.sync_data(true).unwrap();
            let generation = syncer.requested();
            assert_eq!(generation, n + 1);
            let tx = tx.clone();
            syncer.after(
                generation,
                Box::new(move |ok| {
                    // Run only once its generation is on disk.
                    tx.send((n, ok)).unwrap();
                }),
            );
        }
        let ran: Vec<(u64, bool)> = (0..3)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(ran, vec![(0, true), (1, true), (2, true)]);
        assert!(syncer.wait_all());
        assert!(syncer.0.lock().synced >= 3);
        assert_eq!(backend.read(4096, 1).unwrap(), vec![1]);
    }

    /// A completion whose generation is already synced still waits for the ones given before it
    /// (here: held behind a sync that is not done).
    #[test]
    fn a_completion_never_overtakes_an_earlier_one() {
        let (_dir, backend, syncer) = file();
        backend.write(0, b"x").unwrap();
        backend.sync_data(false).unwrap();
        syncer.hold(true);
        backend.sync_data(true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let first = tx.clone();
        syncer.after(2, Box::new(move |ok| first.send(("durable", ok)).unwrap()));
        // Generation 1 is on disk, but the completion of 2 is ahead of it.
        syncer.after(1, Box::new(move |ok| tx.send(("eventual", ok)).unwrap()));
        let early = rx.try_recv();
        syncer.hold(false);
        assert!(early.is_err(), "ran before the sync: {early:?}");
        let order: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(order, vec![("durable", true), ("eventual", true)]);
    }

    /// The barrier: a write after an eventual sync does not start while that sync is held back.
    #[test]
    fn a_write_after_an_eventual_sync_waits_for_it() {
        let (_dir, backend, syncer) = file();
        backend.write(0, b"before").unwrap();
        syncer.hold(true);
        backend.sync_data(true).unwrap();
        let generation = syncer.requested();
        let backend = Arc::new(backend);
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let backend = backend.clone();
            std::thread::spawn(move || {
                backend.write(8, b"after").unwrap();
                tx.send(()).unwrap();
            })
        };
        let early = rx.recv_timeout(std::time::Duration::from_millis(200));
        // Released before asserting, so that a failure does not leave the syncer held.
        syncer.hold(false);
        assert!(early.is_err(), "the write went ahead of the sync");
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        assert!(syncer.0.lock().synced >= generation);
    }

    #[test]
    fn an_immediate_sync_returns_once_on_disk_and_completions_already_synced_run_at_once() {
        let (_dir, backend, syncer) = file();
        backend.write(0, b"x").unwrap();
        backend.sync_data(false).unwrap();
        assert_eq!(syncer.0.lock().synced, 1);
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        syncer.after(
            1,
            Box::new(move |ok| {
                assert!(ok);
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}

/// The store on this file: what is answered, and when.
#[cfg(test)]
mod store_tests {
    use std::time::Duration;

    use bytes::Bytes;
    use time::OffsetDateTime;

    use super::super::{
        IncomingEvent, Ingested, Limits, OpKey, Operation, Store, StoreError, StoreErrorKind,
    };
    use crate::store::testing::{Kind, TestDb, on_both_backends};

    fn event(n: u32) -> IncomingEvent {
        IncomingEvent {
            event_id: format!("evt_b{n}"),
            kind: "settlement.completed".into(),
            raw: Bytes::from(format!(r#"{{"id":"evt_b{n}"}}"#)),
            received_at: OffsetDateTime::now_utc(),
            created_at: None,
            data: Err("not needed here".into()),
        }
    }

    /// The `200` of a webhook waits for its commit's fdatasync, and so does a duplicate of it
    /// (whose commit reads the first one's unsynced data); a reader does not see it before.
    #[tokio::test]
    async fn nothing_is_answered_or_read_before_its_commit_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::new(16, 16)).unwrap();
        let syncer = store.current().unwrap().syncer;
        let before = syncer.requested();
        syncer.hold(true);
        let first = tokio::spawn({
            let store = store.clone();
            async move { store.ingest(event(1)).await }
        });
        // Committed (a sync is asked for), not yet on disk.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while syncer.requested() <= before {
            assert!(tokio::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let duplicate = tokio::spawn({
            let store = store.clone();
            async move { store.ingest(event(1)).await }
        });
        let read = tokio::spawn({
            let store = store.clone();
            async move { store.event("evt_b1".into()).await }
        });
        // Held back for a while: none of them is answered. (Released before asserting, so that a
        // failure does not leave the syncer held.)
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answered = [
            first.is_finished(),
            duplicate.is_finished(),
            read.is_finished(),
        ];
        syncer.hold(false);
        assert_eq!(
            answered, [false; 3],
            "answered before the sync: first, duplicate, read"
        );
        assert!(matches!(first.await.unwrap(), Ok(Ingested::New { .. })));
        assert_eq!(duplicate.await.unwrap().unwrap(), Ingested::Duplicate);
        assert!(read.await.unwrap().unwrap().is_some());
        store.close().await;
    }

    /// A restart in the same process must find the file free once `close` has returned, even
    /// while handles of the old store live on (tasks not yet finished).
    #[tokio::test]
    async fn a_closed_store_releases_the_file_while_its_handles_live_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::new(16, 16)).unwrap();
        store.ingest(event(1)).await.unwrap();
        let lingering = store.clone();
        store.close().await;
        let again =
            Store::open(dir.path(), Limits::new(16, 16)).expect("reopened while a handle lives on");
        assert!(again.event("evt_b1".into()).await.unwrap().is_some());
        again.close().await;
        drop(lingering);
    }

    /// A failed fdatasync: the batch waiting for it is not answered as stored, the store turns
    /// unhealthy, then reopens the file from disk (its cached pages dropped) on its own, without
    /// a write to wake it, and takes writes again; what was committed before is still there.
    #[tokio::test]
    async fn a_failed_fdatasync_answers_not_committed_then_the_store_reopens_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Limits::new(16, 16)).unwrap();
        store.ingest(event(1)).await.unwrap();
        assert!(store.is_healthy());
        let failed = store.current().unwrap().syncer;
        failed.fail_next();
        assert!(matches!(
            store.ingest(event(2)).await.map_err(|e| e.into_kind()),
            Err(StoreErrorKind::NotCommitted)
        ));
        assert!(!store.is_healthy());
        // Reopened by itself.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !store.is_healthy() {
            assert!(tokio::time::Instant::now() < deadline, "never reopened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed.failed(), "the old file stays poisoned");
        assert!(store.event("evt_b1".into()).await.unwrap().is_some());
        assert!(matches!(
            store.ingest(event(3)).await,
            Ok(Ingested::New { .. })
        ));
        // Event 2 was answered "not committed": its retry is new or (had its pages reached the
        // disk after all) a duplicate, never lost.
        assert!(store.ingest(event(2)).await.is_ok());
        store.close().await;
    }

    /// With quick repair (two-phase commits that save the allocator state), writes are answered
    /// once synced as before and survive a reopen.
    #[tokio::test]
    async fn quick_repair_commits_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            quick_repair: true,
            ..Limits::new(16, 16)
        };
        let store = Store::open(dir.path(), limits).unwrap();
        assert!(matches!(
            store.ingest(event(1)).await,
            Ok(Ingested::New { .. })
        ));
        store.close().await;
        let store = Store::open(dir.path(), limits).unwrap();
        assert!(store.event("evt_b1".into()).await.unwrap().is_some());
        assert_eq!(store.ingest(event(1)).await.unwrap(), Ingested::Duplicate);
        store.close().await;
    }

    /// A stalled disk (an fdatasync that does not return) is a failed store: the write waiting for
    /// it is answered `Stalled` at the deadline, reads give up at the deadline too, and the store
    /// reports unhealthy; once the disk answers, the store is healthy again and the write turns
    /// out committed (its retry is a duplicate).
    #[tokio::test]
    async fn a_commit_past_its_deadline_is_answered_stalled_and_the_store_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            commit_deadline: Duration::from_millis(300),
            ..Limits::new(16, 16)
        };
        let store = Store::open(dir.path(), limits).unwrap();
        store.ingest(event(1)).await.unwrap();
        let syncer = store.current().unwrap().syncer;
        syncer.hold(true);
        let waited = store.ingest(event(2)).await;
        let read = store.event("evt_b1".into()).await;
        let healthy = store.is_healthy();
        syncer.hold(false);
        assert!(
            matches!(
                waited.as_ref().map_err(StoreError::kind),
                Err(StoreErrorKind::Stalled { deadline_ms: 300 })
            ),
            "{waited:?}"
        );
        assert!(
            matches!(
                read.as_ref().map_err(StoreError::kind),
                Err(StoreErrorKind::Stalled { .. })
            ),
            "{read:?}"
        );
        assert!(!healthy, "a stalled store reported healthy");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !store.is_healthy() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never healthy again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.ingest(event(2)).await.unwrap(), Ingested::Duplicate);
        store.close().await;
    }

    /// Webhooks first: acks, RPC answers and admin writes may fill only half of the queue; the
    /// other half is kept for webhooks, so a flood of the former never answers a webhook `503`.
    async fn other_writes_leave_half_the_queue_to_webhooks(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(8, 64)).await;
        // A write that holds the writer thread, so that what follows stays queued.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(Operation::new("hold the writer", OpKey::None), move |_| {
                        started_tx.send(()).unwrap();
                        released.recv().ok();
                        Ok(())
                    })
                    .await
            }
        });
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        // Queued (the future is left waiting for its commit) or refused at once.
        async fn queued<T: std::fmt::Debug>(
            write: impl std::future::Future<Output = Result<T, StoreError>>,
        ) -> bool {
            match tokio::time::timeout(std::time::Duration::from_millis(50), write).await {
                Err(_) => true,
                Ok(Err(e)) if matches!(e.kind(), StoreErrorKind::Overloaded) => false,
                Ok(other) => panic!("{other:?}"),
            }
        }
        let other = || store.write(Operation::new("other", OpKey::None), |_| Ok(()));
        for n in 0..4 {
            assert!(queued(other()).await, "other write {n} refused");
        }
        assert!(
            !queued(other()).await,
            "a fifth other write took a webhook's slot"
        );
        for n in 0..4 {
            assert!(queued(store.ingest(event(n))).await, "webhook {n} refused");
        }
        assert!(!queued(store.ingest(event(9))).await, "beyond the queue");
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        store.close().await;
    }

    on_both_backends!(other_writes_leave_half_the_queue_to_webhooks,);
}
