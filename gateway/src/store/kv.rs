//! The small transactional key-value interface under the store's logic, and its redb side.
//!
//! The domain logic (`Tables` in `writer.rs`, `outbox.rs`, `reconcile.rs`, `rpc.rs`) and the read
//! paths of [`super::Store`] speak only this interface, so that one implementation of the logic
//! runs on either backend: the embedded redb file (here) or PostgreSQL (`pg/`). The tables
//! keep the names and key shapes they have in redb:
//! - string keys ([`StrTable`]), bytes or strings as values (a string value is its UTF-8 bytes);
//! - the outbox, keyed by (terminal id, `seq`);
//! - the RPC answers, keyed by (terminal id, request id);
//! - `rejected`, keyed by a sequence number;
//! - two multimaps ([`MultiTable`]), string → set of strings.
//!
//! Dispatch is static: [`WriteKv`] and [`ReadKv`] are enums over the backends, so a call is one
//! `match`, no allocation and no vtable on redb's hot path.

use redb::{
    MultimapTableDefinition, ReadOnlyMultimapTable, ReadOnlyTable, ReadTransaction,
    ReadableMultimapTable, ReadableTable, Table, TableDefinition, TableError, WriteTransaction,
};

use super::StoreError;
use super::pg::{PgRead, PgWrite};

/// Tables with a string key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum StrTable {
    Events,
    Intents,
    IntentByAddress,
    Terminals,
    RevokedSerials,
    OrphanTransfers,
    ReconcileState,
}

impl StrTable {
    /// Its name, in redb and in PostgreSQL.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StrTable::Events => "events",
            StrTable::Intents => "intents",
            StrTable::IntentByAddress => "intent_by_address",
            StrTable::Terminals => "terminals",
            StrTable::RevokedSerials => "revoked_serials",
            StrTable::OrphanTransfers => "orphan_transfers",
            StrTable::ReconcileState => "reconcile_state",
        }
    }

    /// Whether its values are strings in redb (`&str`, not `&[u8]`).
    fn str_values(self) -> bool {
        matches!(self, StrTable::IntentByAddress | StrTable::RevokedSerials)
    }
}

/// Multimaps: a string key, a set of string values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum MultiTable {
    Pending,
    Undeliverable,
}

impl MultiTable {
    pub(crate) fn name(self) -> &'static str {
        match self {
            MultiTable::Pending => "pending",
            MultiTable::Undeliverable => "undeliverable",
        }
    }
}

/// A key a write job will probably read: the PostgreSQL backend fetches the hints of a whole
/// batch with one query per table before applying it (a wrong or missing hint only costs a round
/// trip). redb ignores them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hint {
    Str(StrTable, String),
    Multi(MultiTable, String),
}

/// Visits rows in key order; returns `false` to stop.
pub(crate) type VisitStr<'a> = &'a mut dyn FnMut(&str, &[u8]) -> Result<bool, StoreError>;
/// As [`VisitStr`], for the outbox's (terminal, `seq`) keys.
pub(crate) type VisitOutbox<'a> = &'a mut dyn FnMut((&str, u64), &[u8]) -> Result<bool, StoreError>;
/// As [`VisitStr`], for the RPC answers' (terminal, request) keys.
pub(crate) type VisitRpc<'a> = &'a mut dyn FnMut((&str, &str), &[u8]) -> Result<bool, StoreError>;

/// What a transaction (read or write) can read.
pub(crate) trait KvRead {
    fn get(&self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Rows with keys at or after `from`, in key (byte) order.
    fn scan(&self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError>;
    fn outbox_get(&self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// One terminal's rows in `seq` order, or (`None`) everyone's in (terminal, `seq`) order.
    fn outbox_scan(&self, terminal: Option<&str>, visit: VisitOutbox<'_>)
    -> Result<(), StoreError>;
    fn rpc_get(&self, terminal: &str, request: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn rpc_scan(&self, visit: VisitRpc<'_>) -> Result<(), StoreError>;
    /// A key's values, in order.
    fn multi_get(&self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError>;
    /// Every (key, value) pair in order (the value as its bytes).
    fn multi_scan(&self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError>;
    /// The highest key of `rejected`.
    fn rejected_last(&self) -> Result<Option<u64>, StoreError>;
}

/// What a write transaction can change. Inserts overwrite.
pub(crate) trait KvWrite: KvRead {
    fn insert(&mut self, t: StrTable, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn remove(&mut self, t: StrTable, key: &str) -> Result<(), StoreError>;
    fn outbox_insert(&mut self, terminal: &str, seq: u64, value: &[u8]) -> Result<(), StoreError>;
    fn outbox_remove(&mut self, terminal: &str, seq: u64) -> Result<(), StoreError>;
    fn rpc_insert(&mut self, terminal: &str, request: &str, value: &[u8])
    -> Result<(), StoreError>;
    fn rpc_remove(&mut self, terminal: &str, request: &str) -> Result<(), StoreError>;
    fn rejected_insert(&mut self, n: u64, value: &[u8]) -> Result<(), StoreError>;
    fn multi_insert(&mut self, t: MultiTable, key: &str, value: &str) -> Result<(), StoreError>;
    /// Whether the pair was there.
    fn multi_remove(&mut self, t: MultiTable, key: &str, value: &str) -> Result<bool, StoreError>;
    /// Removes a key with all its values; returns them, in order.
    fn multi_remove_all(&mut self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError>;
}

/// A write transaction on either backend.
pub(crate) enum WriteKv<'t> {
    Redb(Box<RedbWrite<'t>>),
    Pg(Box<PgWrite<'t>>),
}

/// A read transaction on either backend.
pub(crate) enum ReadKv<'a> {
    Redb(RedbRead),
    Pg(PgRead<'a>),
}

macro_rules! dispatch_read {
    ($ty:ident) => {
        impl KvRead for $ty<'_> {
            fn get(&self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
                match self {
                    $ty::Redb(kv) => kv.get(t, key),
                    $ty::Pg(kv) => kv.get(t, key),
                }
            }
            fn scan(&self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError> {
                match self {
                    $ty::Redb(kv) => kv.scan(t, from, visit),
                    $ty::Pg(kv) => kv.scan(t, from, visit),
                }
            }
            fn outbox_get(&self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
                match self {
                    $ty::Redb(kv) => kv.outbox_get(terminal, seq),
                    $ty::Pg(kv) => kv.outbox_get(terminal, seq),
                }
            }
            fn outbox_scan(
                &self,
                terminal: Option<&str>,
                visit: VisitOutbox<'_>,
            ) -> Result<(), StoreError> {
                match self {
                    $ty::Redb(kv) => kv.outbox_scan(terminal, visit),
                    $ty::Pg(kv) => kv.outbox_scan(terminal, visit),
                }
            }
            fn rpc_get(
                &self,
                terminal: &str,
                request: &str,
            ) -> Result<Option<Vec<u8>>, StoreError> {
                match self {
                    $ty::Redb(kv) => kv.rpc_get(terminal, request),
                    $ty::Pg(kv) => kv.rpc_get(terminal, request),
                }
            }
            fn rpc_scan(&self, visit: VisitRpc<'_>) -> Result<(), StoreError> {
                match self {
                    $ty::Redb(kv) => kv.rpc_scan(visit),
                    $ty::Pg(kv) => kv.rpc_scan(visit),
                }
            }
            fn multi_get(&self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
                match self {
                    $ty::Redb(kv) => kv.multi_get(t, key),
                    $ty::Pg(kv) => kv.multi_get(t, key),
                }
            }
            fn multi_scan(&self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError> {
                match self {
                    $ty::Redb(kv) => kv.multi_scan(t, visit),
                    $ty::Pg(kv) => kv.multi_scan(t, visit),
                }
            }
            fn rejected_last(&self) -> Result<Option<u64>, StoreError> {
                match self {
                    $ty::Redb(kv) => kv.rejected_last(),
                    $ty::Pg(kv) => kv.rejected_last(),
                }
            }
        }
    };
}

dispatch_read!(WriteKv);
dispatch_read!(ReadKv);

impl KvWrite for WriteKv<'_> {
    fn insert(&mut self, t: StrTable, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.insert(t, key, value),
            WriteKv::Pg(kv) => kv.insert(t, key, value),
        }
    }
    fn remove(&mut self, t: StrTable, key: &str) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.remove(t, key),
            WriteKv::Pg(kv) => kv.remove(t, key),
        }
    }
    fn outbox_insert(&mut self, terminal: &str, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.outbox_insert(terminal, seq, value),
            WriteKv::Pg(kv) => kv.outbox_insert(terminal, seq, value),
        }
    }
    fn outbox_remove(&mut self, terminal: &str, seq: u64) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.outbox_remove(terminal, seq),
            WriteKv::Pg(kv) => kv.outbox_remove(terminal, seq),
        }
    }
    fn rpc_insert(
        &mut self,
        terminal: &str,
        request: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.rpc_insert(terminal, request, value),
            WriteKv::Pg(kv) => kv.rpc_insert(terminal, request, value),
        }
    }
    fn rpc_remove(&mut self, terminal: &str, request: &str) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.rpc_remove(terminal, request),
            WriteKv::Pg(kv) => kv.rpc_remove(terminal, request),
        }
    }
    fn rejected_insert(&mut self, n: u64, value: &[u8]) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.rejected_insert(n, value),
            WriteKv::Pg(kv) => kv.rejected_insert(n, value),
        }
    }
    fn multi_insert(&mut self, t: MultiTable, key: &str, value: &str) -> Result<(), StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.multi_insert(t, key, value),
            WriteKv::Pg(kv) => kv.multi_insert(t, key, value),
        }
    }
    fn multi_remove(&mut self, t: MultiTable, key: &str, value: &str) -> Result<bool, StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.multi_remove(t, key, value),
            WriteKv::Pg(kv) => kv.multi_remove(t, key, value),
        }
    }
    fn multi_remove_all(&mut self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        match self {
            WriteKv::Redb(kv) => kv.multi_remove_all(t, key),
            WriteKv::Pg(kv) => kv.multi_remove_all(t, key),
        }
    }
}

// === redb ===

const fn bytes_def(name: &'static str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}
const fn str_def(name: &'static str) -> TableDefinition<'static, &'static str, &'static str> {
    TableDefinition::new(name)
}

const EVENTS: TableDefinition<'_, &str, &[u8]> = bytes_def("events");
const INTENTS: TableDefinition<'_, &str, &[u8]> = bytes_def("intents");
const INTENT_BY_ADDRESS: TableDefinition<'_, &str, &str> = str_def("intent_by_address");
const TERMINALS: TableDefinition<'_, &str, &[u8]> = bytes_def("terminals");
const REVOKED: TableDefinition<'_, &str, &str> = str_def("revoked_serials");
const ORPHAN_TRANSFERS: TableDefinition<'_, &str, &[u8]> = bytes_def("orphan_transfers");
const RECONCILE_STATE: TableDefinition<'_, &str, &[u8]> = bytes_def("reconcile_state");
const PENDING: MultimapTableDefinition<'_, &str, &str> = MultimapTableDefinition::new("pending");
const UNDELIVERABLE: MultimapTableDefinition<'_, &str, &str> =
    MultimapTableDefinition::new("undeliverable");
const REJECTED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("rejected");
const OUTBOX: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("outbox");
const RPC_ANSWERS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("rpc_answers");

fn bytes_table(t: StrTable) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match t {
        StrTable::Events => EVENTS,
        StrTable::Intents => INTENTS,
        StrTable::Terminals => TERMINALS,
        StrTable::OrphanTransfers => ORPHAN_TRANSFERS,
        StrTable::ReconcileState => RECONCILE_STATE,
        // Never asked: see `str_values`.
        StrTable::IntentByAddress | StrTable::RevokedSerials => EVENTS,
    }
}

fn str_table(t: StrTable) -> TableDefinition<'static, &'static str, &'static str> {
    match t {
        StrTable::RevokedSerials => REVOKED,
        _ => INTENT_BY_ADDRESS,
    }
}

fn multi_table(t: MultiTable) -> MultimapTableDefinition<'static, &'static str, &'static str> {
    match t {
        MultiTable::Pending => PENDING,
        MultiTable::Undeliverable => UNDELIVERABLE,
    }
}

/// Creates the tables a fresh file lacks. (The reconciliation tables are created by the first
/// write; a reader of an older file finds them missing and reads them as empty.)
pub(crate) fn redb_init(db: &redb::Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    txn.open_table(EVENTS)?;
    txn.open_table(INTENTS)?;
    txn.open_table(INTENT_BY_ADDRESS)?;
    txn.open_multimap_table(PENDING)?;
    txn.open_table(REJECTED)?;
    txn.open_table(TERMINALS)?;
    txn.open_table(REVOKED)?;
    txn.open_table(OUTBOX)?;
    txn.open_multimap_table(UNDELIVERABLE)?;
    txn.open_table(RPC_ANSWERS)?;
    txn.commit()?;
    Ok(())
}

/// The tables of one redb write transaction, opened once per batch.
pub(crate) struct RedbWrite<'txn> {
    events: Table<'txn, &'static str, &'static [u8]>,
    intents: Table<'txn, &'static str, &'static [u8]>,
    by_address: Table<'txn, &'static str, &'static str>,
    pending: redb::MultimapTable<'txn, &'static str, &'static str>,
    rejected: Table<'txn, u64, &'static [u8]>,
    terminals: Table<'txn, &'static str, &'static [u8]>,
    revoked: Table<'txn, &'static str, &'static str>,
    outbox: Table<'txn, (&'static str, u64), &'static [u8]>,
    undeliverable: redb::MultimapTable<'txn, &'static str, &'static str>,
    rpc_answers: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    orphans: Table<'txn, &'static str, &'static [u8]>,
    state: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> RedbWrite<'txn> {
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(RedbWrite {
            events: txn.open_table(EVENTS)?,
            intents: txn.open_table(INTENTS)?,
            by_address: txn.open_table(INTENT_BY_ADDRESS)?,
            pending: txn.open_multimap_table(PENDING)?,
            rejected: txn.open_table(REJECTED)?,
            terminals: txn.open_table(TERMINALS)?,
            revoked: txn.open_table(REVOKED)?,
            outbox: txn.open_table(OUTBOX)?,
            undeliverable: txn.open_multimap_table(UNDELIVERABLE)?,
            rpc_answers: txn.open_table(RPC_ANSWERS)?,
            orphans: txn.open_table(ORPHAN_TRANSFERS)?,
            state: txn.open_table(RECONCILE_STATE)?,
        })
    }

    fn bytes(&self, t: StrTable) -> &Table<'txn, &'static str, &'static [u8]> {
        match t {
            StrTable::Events => &self.events,
            StrTable::Intents => &self.intents,
            StrTable::Terminals => &self.terminals,
            StrTable::OrphanTransfers => &self.orphans,
            _ => &self.state,
        }
    }

    fn bytes_mut(&mut self, t: StrTable) -> &mut Table<'txn, &'static str, &'static [u8]> {
        match t {
            StrTable::Events => &mut self.events,
            StrTable::Intents => &mut self.intents,
            StrTable::Terminals => &mut self.terminals,
            StrTable::OrphanTransfers => &mut self.orphans,
            _ => &mut self.state,
        }
    }

    fn strs(&self, t: StrTable) -> &Table<'txn, &'static str, &'static str> {
        match t {
            StrTable::RevokedSerials => &self.revoked,
            _ => &self.by_address,
        }
    }

    fn strs_mut(&mut self, t: StrTable) -> &mut Table<'txn, &'static str, &'static str> {
        match t {
            StrTable::RevokedSerials => &mut self.revoked,
            _ => &mut self.by_address,
        }
    }

    fn multi(&self, t: MultiTable) -> &redb::MultimapTable<'txn, &'static str, &'static str> {
        match t {
            MultiTable::Pending => &self.pending,
            MultiTable::Undeliverable => &self.undeliverable,
        }
    }

    fn multi_mut(
        &mut self,
        t: MultiTable,
    ) -> &mut redb::MultimapTable<'txn, &'static str, &'static str> {
        match t {
            MultiTable::Pending => &mut self.pending,
            MultiTable::Undeliverable => &mut self.undeliverable,
        }
    }
}

// Shared by the write and the read side: the same code over any readable redb table.

fn get_bytes(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key)?.map(|v| v.value().to_vec()))
}

fn get_str(
    table: &impl ReadableTable<&'static str, &'static str>,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key)?.map(|v| v.value().as_bytes().to_vec()))
}

fn scan_bytes(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    from: &str,
    visit: VisitStr<'_>,
) -> Result<(), StoreError> {
    for entry in table.range(from..)? {
        let (k, v) = entry?;
        if !visit(k.value(), v.value())? {
            break;
        }
    }
    Ok(())
}

fn scan_str(
    table: &impl ReadableTable<&'static str, &'static str>,
    from: &str,
    visit: VisitStr<'_>,
) -> Result<(), StoreError> {
    for entry in table.range(from..)? {
        let (k, v) = entry?;
        if !visit(k.value(), v.value().as_bytes())? {
            break;
        }
    }
    Ok(())
}

fn outbox_get(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    terminal: &str,
    seq: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get((terminal, seq))?.map(|v| v.value().to_vec()))
}

fn outbox_scan(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    terminal: Option<&str>,
    visit: VisitOutbox<'_>,
) -> Result<(), StoreError> {
    let range = match terminal {
        Some(id) => table.range((id, 0)..=(id, u64::MAX))?,
        None => table.range::<(&str, u64)>(..)?,
    };
    for entry in range {
        let (k, v) = entry?;
        if !visit(k.value(), v.value())? {
            break;
        }
    }
    Ok(())
}

fn rpc_get(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    terminal: &str,
    request: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get((terminal, request))?.map(|v| v.value().to_vec()))
}

fn rpc_scan(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    visit: VisitRpc<'_>,
) -> Result<(), StoreError> {
    for entry in table.iter()? {
        let (k, v) = entry?;
        if !visit(k.value(), v.value())? {
            break;
        }
    }
    Ok(())
}

fn multi_get(
    table: &impl ReadableMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<Vec<String>, StoreError> {
    table
        .get(key)?
        .map(|v| v.map(|v| v.value().to_owned()).map_err(StoreError::from))
        .collect()
}

fn multi_scan(
    table: &impl ReadableMultimapTable<&'static str, &'static str>,
    visit: VisitStr<'_>,
) -> Result<(), StoreError> {
    for entry in table.iter()? {
        let (key, values) = entry?;
        for value in values {
            if !visit(key.value(), value?.value().as_bytes())? {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn rejected_last(
    table: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<Option<u64>, StoreError> {
    Ok(table.last()?.map(|(k, _)| k.value()))
}

impl KvRead for RedbWrite<'_> {
    fn get(&self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if t.str_values() {
            get_str(self.strs(t), key)
        } else {
            get_bytes(self.bytes(t), key)
        }
    }
    fn scan(&self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError> {
        if t.str_values() {
            scan_str(self.strs(t), from, visit)
        } else {
            scan_bytes(self.bytes(t), from, visit)
        }
    }
    fn outbox_get(&self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        outbox_get(&self.outbox, terminal, seq)
    }
    fn outbox_scan(
        &self,
        terminal: Option<&str>,
        visit: VisitOutbox<'_>,
    ) -> Result<(), StoreError> {
        outbox_scan(&self.outbox, terminal, visit)
    }
    fn rpc_get(&self, terminal: &str, request: &str) -> Result<Option<Vec<u8>>, StoreError> {
        rpc_get(&self.rpc_answers, terminal, request)
    }
    fn rpc_scan(&self, visit: VisitRpc<'_>) -> Result<(), StoreError> {
        rpc_scan(&self.rpc_answers, visit)
    }
    fn multi_get(&self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        multi_get(self.multi(t), key)
    }
    fn multi_scan(&self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError> {
        multi_scan(self.multi(t), visit)
    }
    fn rejected_last(&self) -> Result<Option<u64>, StoreError> {
        rejected_last(&self.rejected)
    }
}

impl KvWrite for RedbWrite<'_> {
    fn insert(&mut self, t: StrTable, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if t.str_values() {
            let value = String::from_utf8_lossy(value);
            self.strs_mut(t).insert(key, value.as_ref())?;
        } else {
            self.bytes_mut(t).insert(key, value)?;
        }
        Ok(())
    }
    fn remove(&mut self, t: StrTable, key: &str) -> Result<(), StoreError> {
        if t.str_values() {
            self.strs_mut(t).remove(key)?;
        } else {
            self.bytes_mut(t).remove(key)?;
        }
        Ok(())
    }
    fn outbox_insert(&mut self, terminal: &str, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        self.outbox.insert((terminal, seq), value)?;
        Ok(())
    }
    fn outbox_remove(&mut self, terminal: &str, seq: u64) -> Result<(), StoreError> {
        self.outbox.remove((terminal, seq))?;
        Ok(())
    }
    fn rpc_insert(
        &mut self,
        terminal: &str,
        request: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.rpc_answers.insert((terminal, request), value)?;
        Ok(())
    }
    fn rpc_remove(&mut self, terminal: &str, request: &str) -> Result<(), StoreError> {
        self.rpc_answers.remove((terminal, request))?;
        Ok(())
    }
    fn rejected_insert(&mut self, n: u64, value: &[u8]) -> Result<(), StoreError> {
        self.rejected.insert(n, value)?;
        Ok(())
    }
    fn multi_insert(&mut self, t: MultiTable, key: &str, value: &str) -> Result<(), StoreError> {
        self.multi_mut(t).insert(key, value)?;
        Ok(())
    }
    fn multi_remove(&mut self, t: MultiTable, key: &str, value: &str) -> Result<bool, StoreError> {
        Ok(self.multi_mut(t).remove(key, value)?)
    }
    fn multi_remove_all(&mut self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        self.multi_mut(t)
            .remove_all(key)?
            .map(|v| v.map(|v| v.value().to_owned()).map_err(StoreError::from))
            .collect()
    }
}

/// A redb read transaction; its tables are opened per call (a table an older file lacks reads
/// as empty).
pub(crate) struct RedbRead(pub(crate) ReadTransaction);

impl RedbRead {
    fn bytes(
        &self,
        t: StrTable,
    ) -> Result<Option<ReadOnlyTable<&'static str, &'static [u8]>>, StoreError> {
        missing_is_none(self.0.open_table(bytes_table(t)))
    }
    fn strs(
        &self,
        t: StrTable,
    ) -> Result<Option<ReadOnlyTable<&'static str, &'static str>>, StoreError> {
        missing_is_none(self.0.open_table(str_table(t)))
    }
    fn multi(
        &self,
        t: MultiTable,
    ) -> Result<Option<ReadOnlyMultimapTable<&'static str, &'static str>>, StoreError> {
        match self.0.open_multimap_table(multi_table(t)) {
            Ok(table) => Ok(Some(table)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn missing_is_none<T>(opened: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match opened {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl KvRead for RedbRead {
    fn get(&self, t: StrTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if t.str_values() {
            self.strs(t)?.map_or(Ok(None), |table| get_str(&table, key))
        } else {
            self.bytes(t)?
                .map_or(Ok(None), |table| get_bytes(&table, key))
        }
    }
    fn scan(&self, t: StrTable, from: &str, visit: VisitStr<'_>) -> Result<(), StoreError> {
        if t.str_values() {
            self.strs(t)?
                .map_or(Ok(()), |table| scan_str(&table, from, visit))
        } else {
            self.bytes(t)?
                .map_or(Ok(()), |table| scan_bytes(&table, from, visit))
        }
    }
    fn outbox_get(&self, terminal: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        missing_is_none(self.0.open_table(OUTBOX))?
            .map_or(Ok(None), |table| outbox_get(&table, terminal, seq))
    }
    fn outbox_scan(
        &self,
        terminal: Option<&str>,
        visit: VisitOutbox<'_>,
    ) -> Result<(), StoreError> {
        missing_is_none(self.0.open_table(OUTBOX))?
            .map_or(Ok(()), |table| outbox_scan(&table, terminal, visit))
    }
    fn rpc_get(&self, terminal: &str, request: &str) -> Result<Option<Vec<u8>>, StoreError> {
        missing_is_none(self.0.open_table(RPC_ANSWERS))?
            .map_or(Ok(None), |table| rpc_get(&table, terminal, request))
    }
    fn rpc_scan(&self, visit: VisitRpc<'_>) -> Result<(), StoreError> {
        missing_is_none(self.0.open_table(RPC_ANSWERS))?
            .map_or(Ok(()), |table| rpc_scan(&table, visit))
    }
    fn multi_get(&self, t: MultiTable, key: &str) -> Result<Vec<String>, StoreError> {
        self.multi(t)?
            .map_or(Ok(Vec::new()), |table| multi_get(&table, key))
    }
    fn multi_scan(&self, t: MultiTable, visit: VisitStr<'_>) -> Result<(), StoreError> {
        self.multi(t)?
            .map_or(Ok(()), |table| multi_scan(&table, visit))
    }
    fn rejected_last(&self) -> Result<Option<u64>, StoreError> {
        missing_is_none(self.0.open_table(REJECTED))?
            .map_or(Ok(None), |table| rejected_last(&table))
    }
}
