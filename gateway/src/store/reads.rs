//! The store's reads: each on its own read transaction on the blocking pool, and only once the
//! commits before it are on disk (a reader must not hand out what a crash could take back). The
//! typed reads of events and intents live here; those of terminals, the outbox and the rest next
//! to their writes.

use super::kv::{KvRead, ReadKv, RedbRead, StrTable};
use super::lifecycle::Open;
use super::{
    Engine, IntentFilter, OpKey, Operation, Store, StoreError, StoreErrorKind, StoredEvent,
    StoredIntent, barrier, decode,
};

// === impl Store (the reads) ===

impl Store {
    /// Runs `f` on a read transaction (on the blocking pool) once the commits before it are on
    /// disk. Every error comes back naming `op`.
    pub(super) async fn read<T: Send + 'static>(
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
    pub(super) async fn record<T: serde::de::DeserializeOwned + Send + 'static>(
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
}
