//! The writer thread on PostgreSQL: group commit of the queued jobs, conflicts retried, the
//! connection re-established after a failure, and the heartbeat that notices a lost server.

// std's clock on purpose: the writer is an OS thread, outside any runtime.
#![allow(clippy::disallowed_types)]

use super::*;

/// What the PostgreSQL writer shares with the store's handles.
pub(in crate::store) struct Shared {
    pub(in crate::store) health: Arc<Health>,
    pub(in crate::store) notices: Arc<Notices>,
    pub(in crate::store) commit_seconds: Arc<OnceLock<prometheus::Histogram>>,
    pub(in crate::store) url: String,
    pub(in crate::store) tls: PgTls,
    /// Every write of the writer's session waits at most this long (a hung server is a failed one).
    pub(in crate::store) statement_timeout: Duration,
}

/// One transaction for the whole batch (SERIALIZABLE when `durable`, else REPEATABLE READ);
/// committed with `synchronous_commit = on` when `durable`. Any error aborts all of it (the
/// transaction rolls back when dropped).
fn commit_batch(
    conn: &mut Conn,
    batch: &mut [Job],
    durable: bool,
) -> Result<Vec<OutboxRow>, StoreError> {
    let Conn { client, stmts } = conn;
    // REPEATABLE READ for acks and last-seen times: every row they change is read first, and
    // PostgreSQL refuses (40001, retried) an update of a row changed since the snapshot, so
    // nothing is lost; what it allows is an ack not seeing a newer row of the same intent
    // committed meanwhile, which only decides whether the retained message is cleared, and the
    // delivery engine, which knows its queue, does not clear a topic a newer row replaces.
    let isolation = if durable {
        IsolationLevel::Serializable
    } else {
        IsolationLevel::RepeatableRead
    };
    let mut txn = client
        .build_transaction()
        .isolation_level(isolation)
        .start()?;
    if !durable {
        txn.batch_execute("SET LOCAL synchronous_commit = off")?;
    }
    let write = PgWrite::new(txn, stmts);
    write.prefetch(batch.iter().flat_map(|job| job.hints()))?;
    let mut t = Tables::new(WriteKv::Pg(Box::new(write)));
    for job in batch.iter_mut() {
        job.apply(&mut t)?;
    }
    let new_rows = std::mem::take(&mut t.new_rows);
    if let WriteKv::Pg(write) = t.kv {
        write.commit()?;
    }
    Ok(new_rows)
}

/// Runs until every sender is gone and the queue is empty. A batch is applied in one
/// transaction, again (from the start) when a concurrent writer made it fail, and answered once
/// COMMIT returned. When the connection is lost, the batch is answered "not committed" (it may
/// have committed: a retried webhook is then a duplicate) and the writer reconnects with
/// backoff, answering what comes meanwhile at once, unhealthy until it is back.
///
/// What waits for the disk (webhooks, provider answers, provisioning) and what does not (acks,
/// last-seen times) commit as two transactions: the second at REPEATABLE READ (see
/// [`commit_batch`]), so that a terminal's acks do not make the SERIALIZABLE webhook batches of
/// other replicas fail, nor fail with them.
pub(in crate::store) fn run(
    mut conn: Conn,
    mut rx: mpsc::Receiver<Job>,
    limits: &crate::store::Limits,
    shared: &Shared,
) {
    while let Some(batch) = crate::store::writer::next_batch(&mut rx, limits.max_batch) {
        let (synced, deferred): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .partition(|job| job.durability() == Durability::Synced);
        for (jobs, durable) in [(synced, true), (deferred, false)] {
            if jobs.is_empty() {
                continue;
            }
            if !commit_jobs(&mut conn, jobs, durable, shared) {
                match reconnect(&mut rx, shared) {
                    Some(fresh) => conn = fresh,
                    None => return,
                }
            }
        }
    }
}

/// Commits `jobs` (retrying conflicts) and answers them; false when the connection is lost.
fn commit_jobs(conn: &mut Conn, mut jobs: Vec<Job>, durable: bool, shared: &Shared) -> bool {
    let started = Instant::now();
    shared.health.busy(true);
    #[cfg(test)]
    while shared.health.hold.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut attempt = 1;
    let result = loop {
        match commit_batch(conn, &mut jobs, durable) {
            Err(e) if is_conflict(&e) && attempt < MAX_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, error_chain = ?e, "a concurrent writer conflicted with this batch; applying it again");
                // A random pause, growing with the attempts, so that two replicas writing
                // the same keys in step do not collide again at once.
                let most = 1u64 << attempt.min(6);
                std::thread::sleep(Duration::from_micros(rand::random_range(0..most * 1000)));
                attempt += 1;
            }
            other => break other,
        }
    };
    shared.health.busy(false);
    if let Some(h) = shared.commit_seconds.get() {
        h.observe(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(new_rows) => {
            shared.health.failed.store(false, Ordering::Relaxed);
            if !new_rows.is_empty() {
                shared.notices.send(new_rows);
            }
            for job in jobs {
                job.finish(true);
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, error_chain = ?e, jobs = jobs.len(), attempts = attempt, "store commit failed; nothing of this batch was kept");
            for job in jobs {
                job.finish(false);
            }
            !(conn.client.is_closed() || e.is_pg_connection())
        }
    }
}

/// Connects again, until that works or the store is closed (`None`); unhealthy meanwhile,
/// every write answered "not committed" at once (ingress says `503`; the provider retries).
fn reconnect(rx: &mut mpsc::Receiver<Job>, shared: &Shared) -> Option<Conn> {
    shared.health.failed.store(true, Ordering::Relaxed);
    tracing::warn!(url = %redact_url(&shared.url), "lost the PostgreSQL connection; reconnecting");
    let conn =
        crate::store::writer::retry_until_open(rx, "PostgreSQL unreachable; retrying", || {
            connect(&shared.url, &shared.tls, Some(shared.statement_timeout))
        })?;
    shared.health.failed.store(false, Ordering::Relaxed);
    tracing::info!("PostgreSQL reconnected; the store takes writes again");
    Some(conn)
}

/// How often an idle writer checks its connection, so that health follows the database even
/// when nothing is written.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Sends the writer an empty write every [`HEARTBEAT`] (an empty transaction: a lost
/// connection is found and the writer reconnects); ends when the store closes.
pub(in crate::store) fn heartbeat(wake: mpsc::WeakSender<Job>) {
    loop {
        std::thread::sleep(HEARTBEAT);
        let Some(queue) = wake.upgrade() else {
            return;
        };
        // Only into an idle queue: a busy writer checks its connection anyway.
        if queue.capacity() == queue.max_capacity() {
            crate::store::writer::wake_writer(&queue.downgrade());
        }
    }
}
