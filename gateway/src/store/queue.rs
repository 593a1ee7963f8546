//! The writer's queue: every write is a job ([`WriteJob`]) handed to the writer thread, applied in
//! the next group commit and answered once that commit is as durable as the job asked
//! ([`Durability`]). Here too the queue's reserve for webhooks ([`Class`]) and the deadline a
//! caller waits at most. Kept apart from the writer thread (`writer.rs`), which takes the jobs.

#[cfg(test)]
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::writer::Tables;
use super::{Operation, Store, StoreError, StoreErrorKind, kv};

/// A unit of work for the writer: applied inside the batch's write transaction, answered only
/// after that transaction is durably committed (or with [`StoreErrorKind::NotCommitted`]).
pub(super) trait WriteJob: Send {
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

pub(super) type Job = Box<dyn WriteJob>;

pub(super) struct Typed<T, F> {
    /// What the job does and on which key, for its errors.
    pub(super) op: Operation,
    pub(super) work: F,
    pub(super) hints: Vec<kv::Hint>,
    pub(super) result: Option<T>,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
    pub(super) durability: Durability,
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

/// Who a write is for, for the queue's reserve ([`Inner::reserved_for_webhooks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// What the provider tells: webhooks, and what reconciliation learns in their place.
    Provider,
    /// Everything else: acks, RPC answers, presence, admin calls.
    Other,
}

// === impl Store (the writes) ===

impl Store {
    pub(super) fn sender(&self) -> Option<mpsc::Sender<Job>> {
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
    pub(super) async fn write<T, F>(&self, op: Operation, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(op, work, Vec::new(), Durability::Synced, Class::Other)
            .await
    }

    /// As [`Store::write`], for what the provider tells: it may use the whole queue.
    pub(super) async fn write_provider<T, F>(&self, op: Operation, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(op, work, Vec::new(), Durability::Synced, Class::Provider)
            .await
    }

    /// As [`Store::write`], answered without waiting for the disk ([`Durability::Deferred`]).
    pub(super) async fn write_deferred<T, F>(&self, op: Operation, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut Tables<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(op, work, Vec::new(), Durability::Deferred, Class::Other)
            .await
    }

    pub(super) async fn submit<T, F>(
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
}
