//! The read side: REPEATABLE READ snapshots on read connections kept for the next read.

use super::*;

/// A read-only REPEATABLE READ transaction: one snapshot for a whole read (never a
/// serialization failure for a read-only transaction at this level).
pub(crate) struct PgRead<'a> {
    q: RefCell<Q<'a>>,
}

impl KvRead for PgRead<'_> {
    fn get(&self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.q.borrow_mut().get(t, key)
    }
    fn scan(&self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.q.borrow_mut().scan(t, from, visit)
    }
    fn outbox_get(&self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.q.borrow_mut().outbox_get(terminal, seq)
    }
    fn outbox_scan(
        &self,
        terminal: Option<&str>,
        visit: VisitOutbox<'_>,
    ) -> Result<(), StoreError> {
        self.q.borrow_mut().outbox_scan(terminal, visit)
    }
    fn rpc_get(&self, terminal: &str, request: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.q.borrow_mut().rpc_get(terminal, request)
    }
    fn rpc_scan(&self, visit: VisitRpc<'_>) -> Result<(), StoreError> {
        self.q.borrow_mut().rpc_scan(visit)
    }
    fn multi_get(&self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        self.q.borrow_mut().multi_get(t, key)
    }
    fn multi_scan(&self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.q.borrow_mut().multi_scan(t, visit)
    }
    fn rejected_last(&self) -> Result<Option<u64>, StoreError> {
        self.q.borrow_mut().rejected_last()
    }
}

/// Read connections, opened on demand and kept for the next read.
pub(crate) struct Readers {
    url: String,
    tls: PgTls,
    idle: Mutex<Vec<Conn>>,
    statement_timeout: Duration,
}

impl Readers {
    pub(crate) fn new(url: String, tls: PgTls, statement_timeout: Duration) -> Readers {
        Readers {
            url,
            tls,
            idle: Mutex::new(Vec::new()),
            statement_timeout,
        }
    }

    /// Runs `f` in a read-only transaction (blocking: call it on the blocking pool).
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&ReadKv<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut f = Some(f);
        let mut kept = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        loop {
            let (mut conn, was_kept) = match kept.take() {
                Some(conn) if !conn.client.is_closed() => (conn, true),
                _ => (
                    connect(&self.url, &self.tls, Some(self.statement_timeout))?,
                    false,
                ),
            };
            let result = Readers::run(&mut conn, &mut f);
            if !conn.client.is_closed()
                && let Ok(mut idle) = self.idle.lock()
                && idle.len() < IDLE_READERS
            {
                idle.push(conn);
            }
            match result {
                // A kept connection that died meanwhile (a database restart) fails before `f`
                // ran: the read goes on on a new one.
                Err(_) if was_kept && f.is_some() => continue,
                other => return other,
            }
        }
    }

    fn run<T>(
        conn: &mut Conn,
        f: &mut Option<impl FnOnce(&ReadKv<'_>) -> Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Conn { client, stmts } = conn;
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let Some(f) = f.take() else {
            return Err(StoreErrorKind::Closed.into());
        };
        let kv = ReadKv::Pg(PgRead {
            q: RefCell::new(Q::new(txn, stmts)),
        });
        let out = f(&kv)?;
        if let ReadKv::Pg(read) = kv {
            read.q.into_inner().commit()?;
        }
        Ok(out)
    }

    /// Closes the idle connections (on a thread of their own: closing a blocking client from
    /// an async task would block the runtime, and tokio refuses that).
    pub(crate) fn close(&self) {
        let idle = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        if !idle.is_empty() {
            drop(
                std::thread::Builder::new()
                    .name("store-pg-close".into())
                    .spawn(move || drop(idle)),
            );
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.close();
    }
}
