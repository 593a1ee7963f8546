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

mod read;
mod write;
mod writer;

pub(crate) use read::{PgRead, Readers};
pub(crate) use write::PgWrite;
pub(super) use writer::{Shared, heartbeat, run};

/// The schema, in order; each applied once, recorded in `posgate_schema`.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../../migrations/0001_tables.sql")),
    (2, include_str!("../../../migrations/0002_replicas.sql")),
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
