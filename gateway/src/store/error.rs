//! What can go wrong in the store, which store operation it was and on which key, and which
//! failures may pass on their own.

use std::fmt;
use std::path::PathBuf;

/// A store failure: what went wrong ([`StoreErrorKind`]) and, when a store operation failed,
/// which one and on which key ([`Operation`]). Displayed as the operation, then the failure:
/// `ack of 3 acks: store queue is full`, `read of intent "pi_1": database operation failed`.
///
/// Ingress answers all of them `503`: the provider retries later.
#[derive(Debug)]
pub struct StoreError {
    op: Option<Box<Operation>>,
    kind: StoreErrorKind,
}

/// Which store operation failed, and what it was about. Keys are ids (events, intents,
/// terminals, requests, certificate serials): never a token, a secret or a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// What was being done: `ingest`, `revoke`, `read`, `read terminals`, …
    pub name: &'static str,
    pub key: OpKey,
}

/// The key a store operation was about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKey {
    /// Not one record: a scan, a table-wide change, the writer's own work.
    None,
    /// An event, `evt_…`.
    Event(String),
    /// A payment intent, `pi_…`.
    Intent(String),
    /// A terminal.
    Terminal(String),
    /// A transfer found by listing the provider's transactions, `txn_…`.
    Transaction(String),
    /// A terminal's RPC request (its answer).
    Request {
        terminal_id: String,
        request_id: String,
    },
    /// A client certificate a terminal presented, by serial.
    Certificate { terminal_id: String, serial: String },
    /// Several records in one write: how many, of what.
    Many { count: usize, what: &'static str },
}

impl Operation {
    pub(crate) fn new(name: &'static str, key: OpKey) -> Operation {
        Operation { name, key }
    }
}

impl OpKey {
    pub(crate) fn request(terminal_id: &str, request_id: &str) -> OpKey {
        OpKey::Request {
            terminal_id: terminal_id.to_owned(),
            request_id: request_id.to_owned(),
        }
    }

    pub(crate) fn many(count: usize, what: &'static str) -> OpKey {
        OpKey::Many { count, what }
    }
}

// Ids are shown quoted (`{:?}`): one that came from outside cannot break a log line.
impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        match &self.key {
            OpKey::None => Ok(()),
            OpKey::Event(id) => write!(f, " of event {id:?}"),
            OpKey::Intent(id) => write!(f, " of intent {id:?}"),
            OpKey::Terminal(id) => write!(f, " of terminal {id:?}"),
            OpKey::Transaction(id) => write!(f, " of transaction {id:?}"),
            OpKey::Request {
                terminal_id,
                request_id,
            } => write!(f, " of terminal {terminal_id:?} request {request_id:?}"),
            OpKey::Certificate {
                terminal_id,
                serial,
            } => write!(f, " of terminal {terminal_id:?} certificate {serial:?}"),
            OpKey::Many { count, what } => write!(f, " of {count} {what}"),
        }
    }
}

impl StoreError {
    /// What went wrong.
    pub fn kind(&self) -> &StoreErrorKind {
        &self.kind
    }

    /// The store operation that failed, and its key; `None` for opening the store.
    pub fn operation(&self) -> Option<&Operation> {
        self.op.as_deref()
    }

    pub(super) fn into_kind(self) -> StoreErrorKind {
        self.kind
    }

    /// Names the operation that failed, unless an inner one was named already.
    pub(super) fn during(mut self, op: &Operation) -> StoreError {
        if self.op.is_none() {
            self.op = Some(Box::new(op.clone()));
        }
        self
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Some(op) => write!(f, "{op}: {}", self.kind),
            None => fmt::Display::fmt(&self.kind, f),
        }
    }
}

// The operation is part of this error's own message; its cause is the kind's.
impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

impl From<StoreErrorKind> for StoreError {
    fn from(kind: StoreErrorKind) -> Self {
        StoreError { op: None, kind }
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreErrorKind::Postgres(e).into()
    }
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreErrorKind {
    #[error("opening database at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("creating tables in {path}")]
    Init {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("starting the store writer thread")]
    Thread(#[source] std::io::Error),
    #[error("store queue is full")]
    Overloaded,
    #[error("store is closed")]
    Closed,
    #[error("the write transaction was not committed")]
    NotCommitted,
    #[error("an fdatasync of the database failed; the store reopens the file from disk")]
    SyncFailed,
    #[error("no commit within the store's deadline of {deadline_ms} ms: the disk may be stalled")]
    Stalled { deadline_ms: u64 },
    #[error("the store is reopening the database after a disk failure")]
    Unavailable,
    #[error("database operation failed")]
    Db(#[source] Box<redb::Error>),
    #[error("connecting to PostgreSQL at {url} ({tls})")]
    PgConnect {
        /// Without its password.
        url: String,
        /// What the connection does about TLS (`PgTls::describe`).
        tls: String,
        #[source]
        source: postgres::Error,
    },
    #[error("applying the PostgreSQL migrations at {url}")]
    PgMigrate {
        url: String,
        #[source]
        source: postgres::Error,
    },
    #[error("PostgreSQL operation failed")]
    Postgres(#[source] postgres::Error),
    /// A statement of this transaction failed earlier (its error was handled or ignored by the
    /// caller); PostgreSQL refuses the rest, and COMMIT would silently roll back.
    #[error("an earlier statement of this PostgreSQL transaction failed: {message}")]
    PgTransactionFailed {
        code: Option<postgres::error::SqlState>,
        message: String,
    },
    #[error("stored record {key:?} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Whether the same operation may succeed later without anyone changing anything: the
    /// database held by a process that is still stopping, a full or failing disk, an overloaded
    /// queue. Not: corruption, permissions, a file format from another version.
    pub fn is_transient(&self) -> bool {
        match &self.kind {
            StoreErrorKind::Open { source, .. } => match source {
                redb::DatabaseError::DatabaseAlreadyOpen => true,
                redb::DatabaseError::Storage(e) => storage_is_transient(e),
                _ => false,
            },
            StoreErrorKind::Init { source, .. } | StoreErrorKind::Db(source) => {
                match source.as_ref() {
                    redb::Error::DatabaseAlreadyOpen | redb::Error::PreviousIo => true,
                    redb::Error::Io(e) => io_is_transient(e),
                    _ => false,
                }
            }
            StoreErrorKind::Overloaded
            | StoreErrorKind::NotCommitted
            | StoreErrorKind::SyncFailed
            | StoreErrorKind::Stalled { .. }
            | StoreErrorKind::Unavailable
            | StoreErrorKind::Thread(_) => true,
            // Not a refusal by the server, a certificate that does not verify, TLS declined:
            // those need a person.
            StoreErrorKind::PgConnect { source, .. } => !super::pg_tls::is_refusal(source),
            StoreErrorKind::PgMigrate { source, .. } | StoreErrorKind::Postgres(source) => {
                pg_is_transient(source)
            }
            StoreErrorKind::PgTransactionFailed { code, .. } => {
                code.as_ref().is_none_or(code_is_transient)
            }
            StoreErrorKind::Closed | StoreErrorKind::Corrupt { .. } => false,
        }
    }

    /// Whether PostgreSQL refused a statement (or the connection failed): the transaction
    /// cannot go on, whatever the caller makes of the error.
    pub(super) fn is_database_refusal(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Postgres(_) | StoreErrorKind::PgTransactionFailed { .. }
        )
    }

    /// Whether this is PostgreSQL failing to answer at all (the connection lost, the server
    /// shutting down), rather than refusing a statement.
    pub(super) fn is_pg_connection(&self) -> bool {
        match &self.kind {
            StoreErrorKind::PgConnect { .. } => true,
            StoreErrorKind::Postgres(e) | StoreErrorKind::PgMigrate { source: e, .. } => {
                e.is_closed()
                    || e.code().is_none()
                    || e.code().is_some_and(|c| {
                        let c = c.code();
                        // 08: connection exception; 57P: operator intervention (shutdown).
                        c.starts_with("08") || c.starts_with("57P")
                    })
            }
            _ => false,
        }
    }
}

/// Lost connections, a server shutting down or short of resources, conflicts with concurrent
/// writers, a statement timeout: all may pass. Not: a schema or a query PostgreSQL refuses.
fn pg_is_transient(e: &postgres::Error) -> bool {
    e.is_closed() || e.code().is_none_or(code_is_transient)
}

fn code_is_transient(code: &postgres::error::SqlState) -> bool {
    ["08", "40", "53", "57"]
        .iter()
        .any(|class| code.code().starts_with(class))
}

fn storage_is_transient(e: &redb::StorageError) -> bool {
    match e {
        redb::StorageError::Io(e) => io_is_transient(e),
        redb::StorageError::PreviousIo => true,
        _ => false,
    }
}

/// A full disk (`ENOSPC`, `EDQUOT`) or a failing one (`EIO`): may pass without a person.
pub fn io_is_transient(e: &std::io::Error) -> bool {
    const EIO: i32 = 5;
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::QuotaExceeded
            | std::io::ErrorKind::ResourceBusy
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::TimedOut
    ) || e.raw_os_error() == Some(EIO)
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreErrorKind::Db(Box::new(e.into())).into() }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl StoreError {
    /// Whether the database must be opened afresh before it can be used again: redb refuses every
    /// later operation after one I/O error (`PreviousIo`), and after a failed `fdatasync` the
    /// file's cached pages cannot be trusted.
    pub(super) fn needs_reopen(&self) -> bool {
        match &self.kind {
            StoreErrorKind::Db(e) => matches!(
                e.as_ref(),
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::LockPoisoned(_)
            ),
            StoreErrorKind::SyncFailed => true,
            _ => false,
        }
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreErrorKind::Db(Box::new(e)).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::{KvWrite, RedbWrite, StrTable, WriteKv};
    use crate::store::testing::{Kind, TestDb, on_both_backends};
    use crate::store::writer::Tables;
    use crate::store::{Limits, WriteJob};

    fn terminal(id: &str) -> OpKey {
        OpKey::Terminal(id.into())
    }

    /// A write that fails (here: not committed) says which write, on which terminal.
    async fn a_failed_write_names_its_operation_and_key(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(16, 16)).await;
        store.fail_writes_for_test(true);
        let e = store.revoke_terminal("pos_7".into()).await.unwrap_err();
        assert_eq!(
            e.operation(),
            Some(&Operation::new("revoke", terminal("pos_7")))
        );
        assert!(matches!(e.kind(), StoreErrorKind::NotCommitted), "{e:?}");
        assert_eq!(
            e.to_string(),
            r#"revoke of terminal "pos_7": the write transaction was not committed"#
        );
        store.fail_writes_for_test(false);
        store.close().await;
        // Refused at the queue: named as well.
        let e = store.touch_terminals(Vec::new()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "record last seen of 0 terminals: store is closed"
        );
    }

    /// A read that meets a record it cannot decode says which read, of which intent, and why;
    /// the decoder's error stays its cause.
    async fn a_failed_read_names_its_operation_and_key(kind: Kind) {
        let db = TestDb::new(kind).await;
        let store = db.open(Limits::new(16, 16)).await;
        store
            .write(Operation::new("plant", OpKey::None), |t| {
                t.kv.insert(StrTable::Intents, "pi_bad", b"not json")
            })
            .await
            .unwrap();
        let e = store.intent("pi_bad".into()).await.unwrap_err();
        assert_eq!(
            e.operation(),
            Some(&Operation::new("read", OpKey::Intent("pi_bad".into())))
        );
        assert_eq!(
            e.to_string(),
            r#"read of intent "pi_bad": stored record "pi_bad" is corrupt"#
        );
        assert!(
            std::error::Error::source(&e).is_some_and(|s| s.is::<serde_json::Error>()),
            "{e:?}"
        );
        store.close().await;
        let e = store.outbox(Some("pos_1".into())).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"read the outbox of terminal "pos_1": store is closed"#
        );
    }

    on_both_backends!(
        a_failed_write_names_its_operation_and_key,
        a_failed_read_names_its_operation_and_key,
    );

    /// The error that aborts a batch (which the writer logs) names the job it came from, not
    /// only what failed.
    #[test]
    fn the_error_that_aborts_a_batch_names_its_job() {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        crate::store::kv::redb_init(&db).unwrap();
        let txn = db.begin_write().unwrap();
        let mut tables = Tables::new(WriteKv::Redb(Box::new(RedbWrite::open(&txn).unwrap())));
        let (reply, _) = tokio::sync::oneshot::channel::<Result<(), StoreError>>();
        let mut job = crate::store::Typed {
            op: Operation::new("ingest", OpKey::Event("evt_9".into())),
            work: |_: &mut Tables<'_>| -> Result<(), StoreError> {
                Err(StoreErrorKind::Unavailable.into())
            },
            hints: Vec::new(),
            result: None,
            reply,
            durability: crate::store::Durability::Synced,
        };
        let e = job.apply(&mut tables).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"ingest of event "evt_9": the store is reopening the database after a disk failure"#
        );
    }

    /// Keys are quoted: an id with a line break cannot forge a log line.
    #[test]
    fn keys_are_quoted() {
        let op = Operation::new(
            "save the answer",
            OpKey::Request {
                terminal_id: "pos_1\nERROR forged".into(),
                request_id: "r\"1".into(),
            },
        );
        assert_eq!(
            op.to_string(),
            r#"save the answer of terminal "pos_1\nERROR forged" request "r\"1""#
        );
    }
}
