//! The write side: a batch's SERIALIZABLE transaction, its buffered writes (read-your-writes
//! inside the batch) and their flush as one multi-row statement per table.

use super::*;

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
    pub(super) fn new(txn: Transaction<'t>, stmts: &'t mut Stmts) -> Self {
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
    pub(super) fn prefetch<'h>(
        &self,
        hints: impl Iterator<Item = &'h Hint>,
    ) -> Result<(), StoreError> {
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
    pub(super) fn commit(self) -> Result<(), StoreError> {
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
