//! The PostgreSQL backend: the key-value interface of `kv.rs` on PostgreSQL tables, its writer
//! thread (group commit, as for redb), its read connections and its migrations.
//!
//! Why the synchronous `postgres` crate (sfackler's, over `tokio-postgres`): the store's logic
//! runs on the writer's OS thread and on the blocking pool, both synchronous, through the same
//! `KvRead`/`KvWrite` calls as redb; a blocking client fits that without a second async path
//! (sqlx would need an async interface, or a runtime per call). It is the same protocol code as
//! `tokio-postgres`, prepared statements and binary parameters included.
//!
//! Correctness with several writers (replicas) on one database: every batch runs in one
//! SERIALIZABLE transaction. PostgreSQL then reports any interleaving that differs from some
//! serial order (two replicas both finding `evt_…` absent and inserting it; both reading a
//! terminal's `next_seq`) as a serialization failure (40001), and a batch failing so, or with a
//! deadlock (40P01) or a unique violation (23505), is rolled back and applied again from the
//! start (jobs are `Fn`) up to [`MAX_ATTEMPTS`] times. Nothing is answered before COMMIT
//! returned, with `synchronous_commit = on` (the WAL flushed; a standby too if the server is set
//! up so); batches of only acks and last-seen times commit with `synchronous_commit = off`, the
//! PostgreSQL form of redb's deferred durability.
//!
//! Speed: a batch's writes are buffered (read-your-writes inside the batch) and written at the
//! end with one multi-row statement per table (`unnest` of arrays, binary); only point reads
//! and multimap changes go to the server as they happen; statements are prepared once per
//! connection.

// std's clock on purpose: the writer is an OS thread, outside any runtime.
#![allow(clippy::disallowed_types)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, IsolationLevel, Statement, Transaction};
use tokio::sync::mpsc;

use super::kv::{
    Hint, KvRead, KvWrite, MultiTable, ReadKv, StrTable, VisitOutbox, VisitRpc, VisitStr, WriteKv,
};
use super::pg_tls::PgTls;
use super::writer::Tables;
use super::{Durability, Health, Job, Notices, OutboxRow, StoreError, StoreErrorKind};

/// The schema, in order; each applied once, recorded in `posgate_schema`.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_tables.sql")),
    (2, include_str!("../../migrations/0002_replicas.sql")),
];

/// Advisory lock key held while migrating, so that replicas starting together apply each
/// migration once ("posgate1" in ASCII).
const MIGRATION_LOCK: i64 = 0x706f_7367_6174_6531;

/// Most attempts at one batch that concurrent writers keep conflicting with.
pub(super) const MAX_ATTEMPTS: u32 = 5;

/// Rows fetched per round trip by an ordered scan.
const SCAN_CHUNK: i32 = 512;

/// Read connections kept open between reads.
const IDLE_READERS: usize = 8;

/// A URL with its password replaced by `***`, for logs and errors: the userinfo's (up to the
/// last `@`, as a password may hold an unencoded `@`, `/` or `?`), a `password=` query parameter,
/// and the key=value form's `password=…`.
pub fn redact_url(url: &str) -> String {
    let hide = |kv: &str| match kv.split_once('=') {
        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
        _ => kv.to_owned(),
    };
    if let Some((scheme, rest)) = url.split_once("://") {
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, rest),
        };
        let user = userinfo.map(|u| match u.split_once(':') {
            Some((user, _)) => format!("{user}:***@"),
            None => format!("{u}@"),
        });
        let host = match host.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query.split('&').map(hide).collect();
                format!("{path}?{}", query.join("&"))
            }
            None => host.to_owned(),
        };
        return format!("{scheme}://{}{host}", user.unwrap_or_default());
    }
    url.split_whitespace()
        .map(hide)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    /// No form of the password survives: in the userinfo (also with an unencoded `@`, `/` or
    /// `?` in it), in the query, in the key=value form.
    #[test]
    fn the_password_never_survives() {
        for (url, shown) in [
            (
                "postgres://u:secret@db:5432/p",
                "postgres://u:***@db:5432/p",
            ),
            ("postgres://u:se@c/r?et@db/p", "postgres://u:***@db/p"),
            ("postgres://u@db/p", "postgres://u@db/p"),
            (
                "postgres://db/p?user=u&password=secret",
                "postgres://db/p?user=u&password=***",
            ),
            (
                "host=db user=u password=secret",
                "host=db user=u password=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}

/// A connection and its prepared statements.
pub(crate) struct Conn {
    client: Client,
    stmts: Stmts,
}

/// Connects (TLS as the URL's `sslmode` and `tls` say), with `synchronous_commit = on`
/// whatever the server's default.
pub(crate) fn connect(
    url: &str,
    tls: &PgTls,
    statement_timeout: Option<Duration>,
) -> Result<Conn, StoreError> {
    let err = |source| StoreErrorKind::PgConnect {
        url: redact_url(url),
        tls: tls.describe(url),
        source,
    };
    let mut config: postgres::Config = url.parse().map_err(err)?;
    config.application_name("posgate");
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let mut client = config.connect(tls.connector()).map_err(err)?;
    let mut setup = String::from("SET synchronous_commit = on");
    if let Some(t) = statement_timeout {
        setup.push_str(&format!("; SET statement_timeout = {}", t.as_millis()));
    }
    client.batch_execute(&setup).map_err(err)?;
    Ok(Conn {
        client,
        stmts: Stmts::default(),
    })
}

/// Applies the migrations not yet applied, in one transaction under an advisory lock.
pub(crate) fn migrate(conn: &mut Conn) -> Result<(), postgres::Error> {
    let mut txn = conn.client.transaction()?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS posgate_schema (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let current: i32 = txn
        .query_one("SELECT coalesce(max(version), 0) FROM posgate_schema", &[])?
        .get(0);
    for (version, sql) in MIGRATIONS {
        if *version > current {
            txn.batch_execute(sql)?;
            txn.execute(
                "INSERT INTO posgate_schema (version) VALUES ($1)",
                &[version],
            )?;
            tracing::info!(version, "applied PostgreSQL migration");
        }
    }
    txn.commit()
}

/// Whether a failed batch may succeed when applied again: a concurrent writer got in its way.
pub(super) fn is_conflict(e: &StoreError) -> bool {
    let code = match e.kind() {
        StoreErrorKind::Postgres(e) => e.code(),
        // A conflict a job handled (e.g. one ack of many) still fails, and retries, the batch.
        StoreErrorKind::PgTransactionFailed { code, .. } => code.as_ref(),
        _ => return false,
    };
    matches!(
        code,
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

// === statements ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Get(StrTable),
    Scan(StrTable),
    Upsert(StrTable),
    Delete(StrTable),
    OutboxGet,
    OutboxScanOne,
    OutboxScanAll,
    OutboxUpsert,
    OutboxDelete,
    RpcGet,
    RpcScan,
    RpcUpsert,
    RpcDelete,
    RejectedLast,
    RejectedUpsert,
    MultiGet(MultiTable),
    MultiScan(MultiTable),
    MultiRemove(MultiTable),
    MultiRemoveAll(MultiTable),
    GetMany(StrTable),
    MultiGetMany(MultiTable),
    MultiInsertMany(MultiTable),
}

impl Op {
    fn sql(self) -> String {
        match self {
            Op::Get(t) => format!("SELECT v FROM {} WHERE k = $1", t.name()),
            Op::Scan(t) => format!("SELECT k, v FROM {} WHERE k >= $1 ORDER BY k", t.name()),
            Op::Upsert(t) => format!(
                "INSERT INTO {} (k, v) SELECT * FROM unnest($1::text[], $2::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                t.name()
            ),
            Op::Delete(t) => format!("DELETE FROM {} WHERE k = ANY($1::text[])", t.name()),
            Op::OutboxGet => "SELECT v FROM outbox WHERE terminal = $1 AND seq = $2".into(),
            Op::OutboxScanOne => {
                "SELECT terminal, seq, v FROM outbox WHERE terminal = $1 ORDER BY seq".into()
            }
            Op::OutboxScanAll => {
                "SELECT terminal, seq, v FROM outbox ORDER BY terminal, seq".into()
            }
            Op::OutboxUpsert => "INSERT INTO outbox (terminal, seq, v) \
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[]) \
                 ON CONFLICT (terminal, seq) DO UPDATE SET v = EXCLUDED.v"
                .into(),
            Op::OutboxDelete => "DELETE FROM outbox o USING unnest($1::text[], $2::int8[]) \
                 AS d(terminal, seq) WHERE o.terminal = d.terminal AND o.seq = d.seq"
                .into(),
            Op::RpcGet => "SELECT v FROM rpc_answers WHERE terminal = $1 AND request = $2".into(),
            Op::RpcScan => {
                "SELECT terminal, request, v FROM rpc_answers ORDER BY terminal, request".into()
            }
            Op::RpcUpsert => "INSERT INTO rpc_answers (terminal, request, v) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) \
                 ON CONFLICT (terminal, request) DO UPDATE SET v = EXCLUDED.v"
                .into(),
            Op::RpcDelete => "DELETE FROM rpc_answers r USING unnest($1::text[], $2::text[]) \
                 AS d(terminal, request) WHERE r.terminal = d.terminal AND r.request = d.request"
                .into(),
            Op::RejectedLast => "SELECT max(k) FROM rejected".into(),
            Op::RejectedUpsert => "INSERT INTO rejected (k, v) \
                 SELECT * FROM unnest($1::int8[], $2::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
                .into(),
            Op::MultiGet(t) => format!("SELECT v FROM {} WHERE k = $1 ORDER BY v", t.name()),
            Op::MultiScan(t) => format!("SELECT k, v FROM {} ORDER BY k, v", t.name()),
            Op::MultiRemove(t) => format!("DELETE FROM {} WHERE k = $1 AND v = $2", t.name()),
            Op::MultiRemoveAll(t) => format!("DELETE FROM {} WHERE k = $1 RETURNING v", t.name()),
            Op::GetMany(t) => format!("SELECT k, v FROM {} WHERE k = ANY($1::text[])", t.name()),
            Op::MultiGetMany(t) => format!(
                "SELECT k, v FROM {} WHERE k = ANY($1::text[]) ORDER BY k, v",
                t.name()
            ),
            Op::MultiInsertMany(t) => format!(
                "INSERT INTO {} (k, v) SELECT * FROM unnest($1::text[], $2::text[]) \
                 ON CONFLICT DO NOTHING",
                t.name()
            ),
        }
    }
}

/// Statements prepared on one connection.
#[derive(Default)]
pub(crate) struct Stmts(HashMap<Op, Statement>);

/// A transaction and its connection's statements: what both the read and the write side query.
struct Q<'t> {
    txn: Transaction<'t>,
    stmts: &'t mut Stmts,
    /// The first statement of this transaction that failed. PostgreSQL refuses every later
    /// statement of a failed transaction and answers its COMMIT with a rollback, *not an
    /// error*: a caller that handled or ignored a failure (an ack among many) must not make the
    /// batch look committed. Every later statement and the commit fail with it, without a round
    /// trip, and a conflict among them is still retried as one.
    failed: Option<(Option<SqlState>, String)>,
}

impl<'t> Q<'t> {
    fn new(txn: Transaction<'t>, stmts: &'t mut Stmts) -> Self {
        Q {
            txn,
            stmts,
            failed: None,
        }
    }

    /// Refuses to go on after a failed statement (see [`Q::failed`]).
    fn usable(&self) -> Result<(), StoreError> {
        match &self.failed {
            None => Ok(()),
            Some((code, message)) => Err(StoreErrorKind::PgTransactionFailed {
                code: code.clone(),
                message: message.clone(),
            }
            .into()),
        }
    }

    /// Passes `result` on, remembering the transaction's first failure.
    fn note<T>(&mut self, result: Result<T, postgres::Error>) -> Result<T, StoreError> {
        result.map_err(|e| {
            if self.failed.is_none() {
                self.failed = Some((e.code().cloned(), e.to_string()));
            }
            StoreError::from(e)
        })
    }

    fn stmt(&mut self, op: Op) -> Result<Statement, StoreError> {
        self.usable()?;
        if let Some(s) = self.stmts.0.get(&op) {
            return Ok(s.clone());
        }
        let s = self.txn.prepare(&op.sql());
        let s = self.note(s)?;
        self.stmts.0.insert(op, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        s: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, StoreError> {
        self.usable()?;
        let rows = self.txn.query(s, params);
        self.note(rows)
    }

    fn opt_bytes(
        &mut self,
        op: Op,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let s = self.stmt(op)?;
        let row = self.txn.query_opt(&s, params);
        Ok(self.note(row)?.map(|row| row.get(0)))
    }

    fn execute(&mut self, op: Op, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let s = self.stmt(op)?;
        let n = self.txn.execute(&s, params);
        self.note(n)
    }

    /// Commits, unless a statement failed (then PostgreSQL would roll back and say nothing).
    fn commit(self) -> Result<(), StoreError> {
        self.usable()?;
        Ok(self.txn.commit()?)
    }

    /// Runs an ordered query in chunks through a portal, so that a visitor that stops early
    /// does not make the server send the whole table.
    fn each(
        &mut self,
        op: Op,
        params: &[&(dyn ToSql + Sync)],
        visit: &mut dyn FnMut(&postgres::Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let s = self.stmt(op)?;
        let portal = self.txn.bind(&s, params);
        let portal = self.note(portal)?;
        loop {
            let rows = self.txn.query_portal(&portal, SCAN_CHUNK);
            let rows = self.note(rows)?;
            for row in &rows {
                if !visit(row)? {
                    return Ok(());
                }
            }
            if rows.len() < SCAN_CHUNK as usize {
                return Ok(());
            }
        }
    }

    fn get(&mut self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.opt_bytes(Op::Get(t), &[&key])
    }

    fn scan(&mut self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.each(Op::Scan(t), &[&from], &mut |row| {
            visit(row.get::<_, &str>(0), row.get::<_, &[u8]>(1))
        })
    }

    fn outbox_get(&mut self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.opt_bytes(Op::OutboxGet, &[&terminal, &to_i64(seq)])
    }

    fn outbox_scan(
        &mut self,
        terminal: Option<&str>,
        visit: VisitOutbox<'_>,
    ) -> Result<(), StoreError> {
        let mut each = |row: &postgres::Row| {
            let key = (row.get::<_, &str>(0), row.get::<_, i64>(1) as u64);
            visit(key, row.get::<_, &[u8]>(2))
        };
        match terminal {
            Some(id) => self.each(Op::OutboxScanOne, &[&id], &mut each),
            None => self.each(Op::OutboxScanAll, &[], &mut each),
        }
    }

    fn rpc_get(&mut self, terminal: &str, request: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.opt_bytes(Op::RpcGet, &[&terminal, &request])
    }

    fn rpc_scan(&mut self, visit: VisitRpc<'_>) -> Result<(), StoreError> {
        self.each(Op::RpcScan, &[], &mut |row| {
            let key = (row.get::<_, &str>(0), row.get::<_, &str>(1));
            visit(key, row.get::<_, &[u8]>(2))
        })
    }

    fn multi_get(&mut self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        let s = self.stmt(Op::MultiGet(t))?;
        Ok(self
            .query(&s, &[&key])?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    fn multi_scan(&mut self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.each(Op::MultiScan(t), &[], &mut |row| {
            visit(row.get::<_, &str>(0), row.get::<_, &str>(1).as_bytes())
        })
    }

    fn rejected_last(&mut self) -> Result<Option<u64>, StoreError> {
        let s = self.stmt(Op::RejectedLast)?;
        let row = self.txn.query_one(&s, &[]);
        let last: Option<i64> = self.note(row)?.get(0);
        Ok(last.map(|n| n as u64))
    }
}

/// Keys are u64 in the logic, bigint in PostgreSQL: `seq`s and sequence numbers start at 1 and
/// never come near 2^63.
fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// === the write side ===

/// A buffered row: where it goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Str(StrTable, String),
    Outbox(String, u64),
    Rpc(String, String),
    Rejected(u64),
}

/// Writes buffered in a batch, by where they go (`None`: removed).
type Buffer = BTreeMap<Slot, Option<Vec<u8>>>;

/// A batch's transaction and what it knows beyond the server's answers.
struct State<'t> {
    q: Q<'t>,
    /// Rows written in this batch, not yet sent (read before anything else).
    buffer: Buffer,
    /// Rows fetched ahead ([`PgWrite::prefetch`]) as the server held them (`None`: no row);
    /// dropped for a key once its buffered write is flushed.
    cache: HashMap<(StrTable, String), Option<Vec<u8>>>,
    /// Multimap keys fetched ahead or read, with their values as the batch sees them
    /// (buffered inserts included), in order.
    multi_cache: HashMap<(MultiTable, String), Vec<String>>,
    /// Multimap pairs inserted in this batch, not yet sent.
    multi_inserts: BTreeSet<(MultiTable, String, String)>,
}

/// A batch's SERIALIZABLE transaction and its buffered writes.
pub(crate) struct PgWrite<'t> {
    state: RefCell<State<'t>>,
}

impl<'t> PgWrite<'t> {
    fn new(txn: Transaction<'t>, stmts: &'t mut Stmts) -> Self {
        PgWrite {
            state: RefCell::new(State {
                q: Q::new(txn, stmts),
                buffer: BTreeMap::new(),
                cache: HashMap::new(),
                multi_cache: HashMap::new(),
                multi_inserts: BTreeSet::new(),
            }),
        }
    }

    /// Fetches the hinted keys of a whole batch: one query per table.
    fn prefetch<'h>(&self, hints: impl Iterator<Item = &'h Hint>) -> Result<(), StoreError> {
        let mut strs: BTreeMap<StrTable, BTreeSet<&str>> = BTreeMap::new();
        let mut multis: HashMap<MultiTable, BTreeSet<&str>> = HashMap::new();
        for hint in hints {
            match hint {
                Hint::Str(t, k) => {
                    strs.entry(*t).or_default().insert(k);
                }
                Hint::Multi(t, k) => {
                    multis.entry(*t).or_default().insert(k);
                }
            }
        }
        let mut state = self.state.borrow_mut();
        let State {
            q,
            cache,
            multi_cache,
            ..
        } = &mut *state;
        for (t, keys) in strs {
            let keys: Vec<&str> = keys.into_iter().collect();
            for k in &keys {
                cache.insert((t, (*k).to_owned()), None);
            }
            let s = q.stmt(Op::GetMany(t))?;
            for row in q.query(&s, &[&keys])? {
                cache.insert((t, row.get(0)), Some(row.get(1)));
            }
        }
        for (t, keys) in multis {
            let keys: Vec<&str> = keys.into_iter().collect();
            for k in &keys {
                multi_cache.insert((t, (*k).to_owned()), Vec::new());
            }
            let s = q.stmt(Op::MultiGetMany(t))?;
            for row in q.query(&s, &[&keys])? {
                if let Some(values) = multi_cache.get_mut(&(t, row.get::<_, String>(0))) {
                    values.push(row.get(1));
                }
            }
        }
        Ok(())
    }

    /// Buffered value of `slot`: `Some(Some(v))` written, `Some(None)` removed in this batch.
    fn buffered(&self, slot: &Slot) -> Option<Option<Vec<u8>>> {
        self.state.borrow().buffer.get(slot).cloned()
    }

    fn buffer(&self, slot: Slot, value: Option<&[u8]>) {
        self.state
            .borrow_mut()
            .buffer
            .insert(slot, value.map(<[u8]>::to_vec));
    }

    /// Writes the buffered rows `which` selects to the server (before a scan of their table, and
    /// at the end), with one statement per table and kind.
    fn flush(&self, which: impl Fn(&Slot) -> bool) -> Result<(), StoreError> {
        let mut state = self.state.borrow_mut();
        let State {
            q, buffer, cache, ..
        } = &mut *state;
        if !buffer.keys().any(&which) {
            return Ok(());
        }
        let (take, keep): (Buffer, Buffer) = std::mem::take(buffer)
            .into_iter()
            .partition(|(s, _)| which(s));
        *buffer = keep;
        let mut strs: BTreeMap<StrTable, (Vec<&str>, Vec<&[u8]>)> = BTreeMap::new();
        let mut strs_del: BTreeMap<StrTable, Vec<&str>> = BTreeMap::new();
        let (mut ob_up, mut ob_del) = ((vec![], vec![], vec![]), (vec![], vec![]));
        let (mut rpc_up, mut rpc_del) = ((vec![], vec![], vec![]), (vec![], vec![]));
        let mut rejected: (Vec<i64>, Vec<&[u8]>) = (vec![], vec![]);
        for (slot, value) in &take {
            match (slot, value) {
                (Slot::Str(t, k), Some(v)) => {
                    // From now on the server has it.
                    cache.remove(&(*t, k.clone()));
                    let e = strs.entry(*t).or_default();
                    e.0.push(k.as_str());
                    e.1.push(v.as_slice());
                }
                (Slot::Str(t, k), None) => {
                    cache.remove(&(*t, k.clone()));
                    strs_del.entry(*t).or_default().push(k.as_str());
                }
                (Slot::Outbox(k, s), Some(v)) => {
                    ob_up.0.push(k.as_str());
                    ob_up.1.push(to_i64(*s));
                    ob_up.2.push(v.as_slice());
                }
                (Slot::Outbox(k, s), None) => {
                    ob_del.0.push(k.as_str());
                    ob_del.1.push(to_i64(*s));
                }
                (Slot::Rpc(k, r), Some(v)) => {
                    rpc_up.0.push(k.as_str());
                    rpc_up.1.push(r.as_str());
                    rpc_up.2.push(v.as_slice());
                }
                (Slot::Rpc(k, r), None) => {
                    rpc_del.0.push(k.as_str());
                    rpc_del.1.push(r.as_str());
                }
                (Slot::Rejected(n), Some(v)) => {
                    rejected.0.push(to_i64(*n));
                    rejected.1.push(v.as_slice());
                }
                (Slot::Rejected(_), None) => {}
            }
        }
        for (t, keys) in &strs_del {
            q.execute(Op::Delete(*t), &[keys])?;
        }
        for (t, (keys, values)) in &strs {
            q.execute(Op::Upsert(*t), &[keys, values])?;
        }
        if !ob_del.0.is_empty() {
            q.execute(Op::OutboxDelete, &[&ob_del.0, &ob_del.1])?;
        }
        if !ob_up.0.is_empty() {
            q.execute(Op::OutboxUpsert, &[&ob_up.0, &ob_up.1, &ob_up.2])?;
        }
        if !rpc_del.0.is_empty() {
            q.execute(Op::RpcDelete, &[&rpc_del.0, &rpc_del.1])?;
        }
        if !rpc_up.0.is_empty() {
            q.execute(Op::RpcUpsert, &[&rpc_up.0, &rpc_up.1, &rpc_up.2])?;
        }
        if !rejected.0.is_empty() {
            q.execute(Op::RejectedUpsert, &[&rejected.0, &rejected.1])?;
        }
        Ok(())
    }

    /// Sends the multimap inserts of `t` buffered so far.
    fn flush_multi(&self, t: MultiTable) -> Result<(), StoreError> {
        let mut state = self.state.borrow_mut();
        let State {
            q, multi_inserts, ..
        } = &mut *state;
        if !multi_inserts.iter().any(|(u, ..)| *u == t) {
            return Ok(());
        }
        let (take, keep): (BTreeSet<_>, BTreeSet<_>) = std::mem::take(multi_inserts)
            .into_iter()
            .partition(|(u, ..)| *u == t);
        *multi_inserts = keep;
        let keys: Vec<&str> = take.iter().map(|(_, k, _)| k.as_str()).collect();
        let values: Vec<&str> = take.iter().map(|(_, _, v)| v.as_str()).collect();
        q.execute(Op::MultiInsertMany(t), &[&keys, &values])?;
        Ok(())
    }

    /// Writes what is buffered and commits; returns once the server has (with
    /// `synchronous_commit = on`: once the commit is in the flushed WAL).
    fn commit(self) -> Result<(), StoreError> {
        self.flush(|_| true)?;
        self.flush_multi(MultiTable::Pending)?;
        self.flush_multi(MultiTable::Undeliverable)?;
        self.state.into_inner().q.commit()?;
        Ok(())
    }

    fn q(&self) -> std::cell::RefMut<'_, Q<'t>> {
        std::cell::RefMut::map(self.state.borrow_mut(), |s| &mut s.q)
    }

    fn cached(&self, t: StrTable, key: &str) -> Option<Option<Vec<u8>>> {
        self.state.borrow().cache.get(&(t, key.to_owned())).cloned()
    }

    fn multi_cached(&self, t: MultiTable, key: &str) -> Option<Vec<String>> {
        self.state
            .borrow()
            .multi_cache
            .get(&(t, key.to_owned()))
            .cloned()
    }

    fn set_multi_cache(&self, t: MultiTable, key: &str, values: Vec<String>) {
        self.state
            .borrow_mut()
            .multi_cache
            .insert((t, key.to_owned()), values);
    }
}

impl KvRead for PgWrite<'_> {
    fn get(&self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.buffered(&Slot::Str(t, key.to_owned())) {
            return Ok(v);
        }
        if let Some(v) = self.cached(t, key) {
            return Ok(v);
        }
        self.q().get(t, key)
    }
    fn scan(&self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.flush(|s| matches!(s, Slot::Str(u, _) if *u == t))?;
        self.q().scan(t, from, visit)
    }
    fn outbox_get(&self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.buffered(&Slot::Outbox(terminal.to_owned(), seq)) {
            return Ok(v);
        }
        self.q().outbox_get(terminal, seq)
    }
    fn outbox_scan(
        &self,
        terminal: Option<&str>,
        visit: VisitOutbox<'_>,
    ) -> Result<(), StoreError> {
        self.flush(|s| matches!(s, Slot::Outbox(..)))?;
        self.q().outbox_scan(terminal, visit)
    }
    fn rpc_get(&self, terminal: &str, request: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.buffered(&Slot::Rpc(terminal.to_owned(), request.to_owned())) {
            return Ok(v);
        }
        self.q().rpc_get(terminal, request)
    }
    fn rpc_scan(&self, visit: VisitRpc<'_>) -> Result<(), StoreError> {
        self.flush(|s| matches!(s, Slot::Rpc(..)))?;
        self.q().rpc_scan(visit)
    }
    fn multi_get(&self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        if let Some(values) = self.multi_cached(t, key) {
            return Ok(values);
        }
        self.flush_multi(t)?;
        let values = self.q().multi_get(t, key)?;
        self.set_multi_cache(t, key, values.clone());
        Ok(values)
    }
    fn multi_scan(&self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.flush_multi(t)?;
        self.q().multi_scan(t, visit)
    }
    fn rejected_last(&self) -> Result<Option<u64>, StoreError> {
        self.flush(|s| matches!(s, Slot::Rejected(_)))?;
        self.q().rejected_last()
    }
}

impl KvWrite for PgWrite<'_> {
    fn insert(&mut self, t: StrTable, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.buffer(Slot::Str(t, key.to_owned()), Some(value));
        Ok(())
    }
    fn remove(&mut self, t: StrTable, key: &str) -> Result<(), StoreError> {
        self.buffer(Slot::Str(t, key.to_owned()), None);
        Ok(())
    }
    fn outbox_insert(&mut self, terminal: &str, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        self.buffer(Slot::Outbox(terminal.to_owned(), seq), Some(value));
        Ok(())
    }
    fn outbox_remove(&mut self, terminal: &str, seq: u64) -> Result<(), StoreError> {
        self.buffer(Slot::Outbox(terminal.to_owned(), seq), None);
        Ok(())
    }
    fn rpc_insert(
        &mut self,
        terminal: &str,
        request: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.buffer(
            Slot::Rpc(terminal.to_owned(), request.to_owned()),
            Some(value),
        );
        Ok(())
    }
    fn rpc_remove(&mut self, terminal: &str, request: &str) -> Result<(), StoreError> {
        self.buffer(Slot::Rpc(terminal.to_owned(), request.to_owned()), None);
        Ok(())
    }
    fn rejected_insert(&mut self, n: u64, value: &[u8]) -> Result<(), StoreError> {
        self.buffer(Slot::Rejected(n), Some(value));
        Ok(())
    }
    fn multi_insert(&mut self, t: MultiTable, key: &str, value: &str) -> Result<(), StoreError> {
        let mut state = self.state.borrow_mut();
        state
            .multi_inserts
            .insert((t, key.to_owned(), value.to_owned()));
        if let Some(values) = state.multi_cache.get_mut(&(t, key.to_owned()))
            && let Err(at) = values.binary_search_by(|v| v.as_str().cmp(value))
        {
            values.insert(at, value.to_owned());
        }
        Ok(())
    }
    fn multi_remove(&mut self, t: MultiTable, key: &str, value: &str) -> Result<bool, StoreError> {
        if self
            .multi_cached(t, key)
            .is_some_and(|values| !values.iter().any(|v| v == value))
        {
            return Ok(false);
        }
        self.flush_multi(t)?;
        let removed = self.q().execute(Op::MultiRemove(t), &[&key, &value])? > 0;
        if let Some(values) = self
            .state
            .borrow_mut()
            .multi_cache
            .get_mut(&(t, key.to_owned()))
        {
            values.retain(|v| v != value);
        }
        Ok(removed)
    }
    fn multi_remove_all(&mut self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        // A key known to be empty (fetched ahead: the usual case of a new intent) costs nothing.
        if self.multi_cached(t, key).is_some_and(|v| v.is_empty()) {
            return Ok(Vec::new());
        }
        self.flush_multi(t)?;
        let mut values: Vec<String> = {
            let mut q = self.q();
            let s = q.stmt(Op::MultiRemoveAll(t))?;
            q.query(&s, &[&key])?.iter().map(|row| row.get(0)).collect()
        };
        values.sort();
        self.set_multi_cache(t, key, Vec::new());
        Ok(values)
    }
}

// === the read side ===

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

// === the writer ===

/// What the PostgreSQL writer shares with the store's handles.
pub(super) struct Shared {
    pub(super) health: Arc<Health>,
    pub(super) notices: Arc<Notices>,
    pub(super) commit_seconds: Arc<OnceLock<prometheus::Histogram>>,
    pub(super) url: String,
    pub(super) tls: PgTls,
    /// Every write of the writer's session waits at most this long (a hung server is a failed one).
    pub(super) statement_timeout: Duration,
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
pub(super) fn run(
    mut conn: Conn,
    mut rx: mpsc::Receiver<Job>,
    limits: &super::Limits,
    shared: &Shared,
) {
    while let Some(batch) = super::writer::next_batch(&mut rx, limits.max_batch) {
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
    let conn = super::writer::retry_until_open(rx, "PostgreSQL unreachable; retrying", || {
        connect(&shared.url, &shared.tls, Some(shared.statement_timeout))
    })?;
    shared.health.failed.store(false, Ordering::Relaxed);
    tracing::info!("PostgreSQL reconnected; the store takes writes again");
    Some(conn)
}

/// How often an idle writer checks its connection, so that health follows the database even
/// when nothing is written.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(1);

/// Sends the writer an empty write every [`HEARTBEAT`] (an empty transaction: a lost
/// connection is found and the writer reconnects); ends when the store closes.
pub(super) fn heartbeat(wake: mpsc::WeakSender<Job>) {
    loop {
        std::thread::sleep(HEARTBEAT);
        let Some(queue) = wake.upgrade() else {
            return;
        };
        // Only into an idle queue: a busy writer checks its connection anyway.
        if queue.capacity() == queue.max_capacity() {
            super::writer::wake_writer(&queue.downgrade());
        }
    }
}
