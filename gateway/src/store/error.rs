//! What can go wrong in the store, and which failures may pass on their own.

use std::path::PathBuf;

/// Store failures. Ingress answers all of them `503`: the provider retries later.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    Db(#[from] Box<redb::Error>),
    #[error("reading {what} {key:?}")]
    Read {
        what: &'static str,
        key: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("connecting to PostgreSQL at {url}")]
    PgConnect {
        /// Without its password.
        url: String,
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
    Postgres(#[from] postgres::Error),
    /// A statement of this transaction failed earlier (its error was handled or ignored by the
    /// caller); PostgreSQL refuses the rest, and COMMIT would silently roll back.
    #[error("an earlier statement of this PostgreSQL transaction failed: {message}")]
    PgTransactionFailed {
        code: Option<postgres::error::SqlState>,
        message: String,
    },
    #[error("stored record {key} is corrupt")]
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
        match self {
            StoreError::Open { source, .. } => match source {
                redb::DatabaseError::DatabaseAlreadyOpen => true,
                redb::DatabaseError::Storage(e) => storage_is_transient(e),
                _ => false,
            },
            StoreError::Init { source, .. }
            | StoreError::Db(source)
            | StoreError::Read { source, .. } => match source.as_ref() {
                redb::Error::DatabaseAlreadyOpen | redb::Error::PreviousIo => true,
                redb::Error::Io(e) => io_is_transient(e),
                _ => false,
            },
            StoreError::Overloaded
            | StoreError::NotCommitted
            | StoreError::SyncFailed
            | StoreError::Stalled { .. }
            | StoreError::Unavailable
            | StoreError::Thread(_) => true,
            StoreError::PgConnect { .. } => true,
            StoreError::PgMigrate { source, .. } | StoreError::Postgres(source) => {
                pg_is_transient(source)
            }
            StoreError::PgTransactionFailed { code, .. } => {
                code.as_ref().is_none_or(code_is_transient)
            }
            StoreError::Closed | StoreError::Corrupt { .. } => false,
        }
    }

    /// Whether this is PostgreSQL failing to answer at all (the connection lost, the server
    /// shutting down), rather than refusing a statement.
    pub(super) fn is_pg_connection(&self) -> bool {
        match self {
            StoreError::PgConnect { .. } => true,
            StoreError::Postgres(e) | StoreError::PgMigrate { source: e, .. } => {
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
            fn from(e: $t) -> Self { StoreError::Db(Box::new(e.into())) }
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
        match self {
            StoreError::Db(e) | StoreError::Read { source: e, .. } => matches!(
                e.as_ref(),
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::LockPoisoned(_)
            ),
            StoreError::SyncFailed => true,
            _ => false,
        }
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Db(Box::new(e))
    }
}
