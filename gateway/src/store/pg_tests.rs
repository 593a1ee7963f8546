//! What only the PostgreSQL backend has to show: several stores (replicas) on one database,
//! concurrent migrations, a database that goes away under load.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use posgate_proto::event::{Envelope, EventData};
use time::OffsetDateTime;

use super::testing::{Kind, TestDb};
use super::{IncomingEvent, Ingested, Limits, OpKey, Operation, Store};

/// `payment_intent.confirmed` for `pi_{n}` on terminal `pos-1`, as event `evt_{n}`.
fn confirmed(n: u32) -> IncomingEvent {
    incoming(format!(
        r#"{{"id":"evt_{n}","type":"payment_intent.confirmed","data":{{"id":"pi_{n}","status":"confirmed","amount":4.5,"metadata":{{"terminal_id":"pos-1"}}}}}}"#
    ))
}

/// The event `body` as the ingress hands it to the store.
fn incoming(body: String) -> IncomingEvent {
    let env = Envelope::parse(body.as_bytes()).unwrap();
    let data = EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string());
    IncomingEvent {
        event_id: env.id.clone(),
        kind: env.kind.clone(),
        raw: Bytes::from(body.clone()),
        received_at: OffsetDateTime::now_utc(),
        created_at: None,
        data,
    }
}

/// Two stores ("replicas") on one new database, terminal `pos-1` registered.
async fn replicas() -> (TestDb, Store, Store) {
    let db = TestDb::new(Kind::Postgres).await;
    let a = db.open(Limits::new(256, 64)).await;
    let b = db.open(Limits::new(256, 64)).await;
    crate::store::testing::register(&a, "pos-1").await;
    (db, a, b)
}

/// The outbox's `seq`s of `pos-1`, which must be 1..=n without a gap or a repeat.
async fn assert_gap_free(store: &Store, n: u64) {
    let seqs: Vec<u64> = store
        .outbox(Some("pos-1".into()))
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    let terminal = store.terminal("pos-1".into()).await.unwrap().unwrap();
    assert_eq!(terminal.next_seq, n + 1);
}

/// The same `evt_…` delivered to two replicas at the same instant: one stores it (`New`), the
/// other answers `Duplicate`, and it has one effect (one confirmation).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_ingesting_one_event_at_once_have_one_effect() {
    let (_db, a, b) = replicas().await;
    const ROUNDS: u32 = 30;
    for n in 0..ROUNDS {
        let (x, y) = tokio::join!(a.ingest(confirmed(n)), b.ingest(confirmed(n)));
        let (x, y) = (x.unwrap(), y.unwrap());
        let new = [&x, &y]
            .iter()
            .filter(|i| matches!(i, Ingested::New { .. }))
            .count();
        assert_eq!(new, 1, "round {n}: {x:?} / {y:?}");
        assert!(x == Ingested::Duplicate || y == Ingested::Duplicate);
    }
    assert_gap_free(&a, u64::from(ROUNDS)).await;
    let intents: BTreeSet<String> = a
        .outbox(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.intent_id)
        .collect();
    assert_eq!(intents.len(), ROUNDS as usize);
    a.close().await;
    b.close().await;
}

/// Two replicas taking different events for one terminal at once: every confirmation gets its
/// own `seq`, 1..=n, none twice, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_keep_a_terminals_seq_gap_free() {
    let (_db, a, b) = replicas().await;
    const EACH: u32 = 60;
    let mut tasks = Vec::new();
    for n in 0..EACH * 2 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(
            async move { store.ingest(confirmed(n)).await },
        ));
    }
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Ok(Ingested::New { .. })));
    }
    assert_gap_free(&b, u64::from(EACH * 2)).await;
    a.close().await;
    b.close().await;
}

/// Replicas starting at the same instant on a new database: each migration is applied once,
/// and every one of them opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_applied_once_when_stores_open_together() {
    let db = Arc::new(TestDb::new(Kind::Postgres).await);
    let opening: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.try_open(Limits::new(16, 16)).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opening {
        stores.push(open.await.unwrap().expect("a replica failed to open"));
    }
    let super::Backend::Postgres { url, .. } = db.backend.clone() else {
        unreachable!()
    };
    let versions = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .query("SELECT version FROM posgate_schema ORDER BY version", &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2]);
    for store in stores {
        store.close().await;
    }
}

/// The database killed (SIGKILL, as in a crash) and started again under load: the store turns
/// unhealthy, answers writes "not committed" (a `503`: the provider retries) meanwhile, and
/// reconnects by itself; every webhook it answered as stored is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_under_load_loses_no_acknowledged_webhook() {
    let server = Arc::new(
        tokio::task::spawn_blocking(posgate_testpg::Server::start)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let url = {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.fresh_db())
            .await
            .unwrap()
    };
    let db = TestDb {
        dir: tempfile::tempdir().unwrap(),
        backend: super::Backend::Postgres {
            url,
            tls: super::PgTls::unverified(),
        },
    };
    let limits = Limits {
        commit_deadline: Duration::from_secs(3),
        ..Limits::new(256, 64)
    };
    let store = db.open(limits).await;
    crate::store::testing::register(&store, "pos-1").await;

    // Four "providers", each sending its own events one after another, retrying every refusal.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4u32)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut refused = 0u32;
                for k in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let n = w * 1_000_000 + k;
                    while store.ingest(confirmed(n)).await.is_err() {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    acked.push(n);
                }
                (acked, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.is_healthy());
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.kill())
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.is_healthy() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still healthy without its database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.start_again())
            .await
            .unwrap()
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !store.is_healthy() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never healthy again after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut refused = 0;
    for worker in workers {
        let (a, r) = worker.await.unwrap();
        acked.extend(a);
        refused += r;
    }
    assert!(
        refused > 0,
        "no write was refused while the database was down"
    );
    assert!(acked.len() > 20, "too little load: {}", acked.len());
    // Every acknowledged webhook is stored, its confirmation queued, exactly once each.
    let rows = store.outbox(Some("pos-1".into())).await.unwrap();
    let intents: BTreeSet<String> = rows.iter().map(|r| r.intent_id.clone()).collect();
    assert_eq!(rows.len(), intents.len(), "an event applied twice");
    assert_eq!(rows.len(), acked.len());
    for n in &acked {
        assert!(
            store.event(format!("evt_{n}")).await.unwrap().is_some(),
            "evt_{n} was answered stored and is gone"
        );
        assert!(intents.contains(&format!("pi_{n}")), "pi_{n} lost its row");
    }
    assert_gap_free(&store, rows.len() as u64).await;
    store.close().await;
    drop(db);
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

/// A commit that does not come back within the deadline (here held back before it is sent) is
/// answered `Stalled` and the store reports unhealthy; once it goes through, the store is
/// healthy again and the write turns out committed (its retry is a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_past_its_deadline_is_answered_stalled_and_the_store_is_unhealthy() {
    let db = TestDb::new(Kind::Postgres).await;
    let limits = Limits {
        commit_deadline: Duration::from_millis(300),
        ..Limits::new(16, 16)
    };
    let store = db.open(limits).await;
    store.ingest(confirmed(1)).await.unwrap();
    store.hold_syncs_for_test(true);
    let waited = store.ingest(confirmed(2)).await;
    // The answer's deadline runs from the submission, the store's own from the commit's start
    // a moment later: unhealthy within moments, while the commit is still held.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut healthy = store.is_healthy();
    while healthy && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
        healthy = store.is_healthy();
    }
    store.hold_syncs_for_test(false);
    assert!(
        matches!(
            waited.as_ref().map_err(super::StoreError::kind),
            Err(super::StoreErrorKind::Stalled { deadline_ms: 300 })
        ),
        "{waited:?}"
    );
    assert!(!healthy, "a stalled store reported healthy");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !store.is_healthy() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never healthy again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.ingest(confirmed(2)).await.unwrap(),
        Ingested::Duplicate
    );
    store.close().await;
}

/// A job that handles a failed statement itself (as `ack_many` does for each of its acks) must
/// not be answered "committed": PostgreSQL answers the COMMIT of a failed transaction with a
/// rollback and no error, so writes sent before the failure were lost while the job was told
/// they were kept (and a serialization failure so handled was never retried: the acks of a
/// whole batch were dropped, and their confirmations published again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_failure_a_job_handled_still_fails_its_batch() {
    use super::kv::{KvRead, KvWrite, MultiTable, StrTable};
    let db = TestDb::new(Kind::Postgres).await;
    let store = db.open(Limits::new(256, 64)).await;
    let answer = store
        .write(Operation::new("insert, then fail", OpKey::None), |t| {
            t.kv.multi_insert(MultiTable::Pending, "evt_kept", "pi_1")?;
            // Sends the buffered insert to the server now.
            t.kv.multi_remove_all(MultiTable::Pending, "evt_other")?;
            // A key PostgreSQL refuses (text cannot hold NUL): the statement fails, the job
            // carries on as if it had not found the row.
            let refused = t.kv.get(StrTable::Terminals, "pos\0-1");
            assert!(refused.is_err(), "PostgreSQL refuses NUL in text");
            Ok(())
        })
        .await;
    assert!(
        answer.is_err(),
        "a batch with a failed statement was answered committed"
    );
    let kept = store
        .read(Operation::new("read pending", OpKey::None), |kv| {
            kv.multi_get(MultiTable::Pending, "evt_kept")
        })
        .await
        .unwrap();
    assert!(kept.is_empty(), "nothing of a failed batch is kept");
    // The writer goes on: the next batch commits.
    store
        .write(Operation::new("insert", OpKey::None), |t| {
            t.kv.multi_insert(MultiTable::Pending, "evt_next", "pi_2")
        })
        .await
        .unwrap();
}

/// A provider event whose intent id holds a NUL byte (PostgreSQL's `text` cannot hold one) is
/// kept as `unparsed`, and the webhooks written beside it commit: the id used to become a key
/// and fail the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_with_a_nul_byte_is_kept_unparsed_and_fails_no_batch() {
    let (_db, a, _b) = replicas().await;
    let nul = |event: &str, intent: &str, terminal: &str| {
        let body = format!(
            r#"{{"id":"{event}","type":"payment_intent.confirmed","data":{{"id":"{intent}","status":"confirmed","amount":4.5,"metadata":{{"terminal_id":"{terminal}"}}}}}}"#
        );
        let event = incoming(body);
        assert!(event.data.is_err(), "the NUL id parsed: {:?}", event.data);
        event
    };
    // The intent's id, then the terminal it names (a key of `terminals` and `undeliverable`).
    let nul_intent = nul("evt_nul1", r"pi_\u0000", "pos-1");
    let nul_terminal = nul("evt_nul2", "pi_nul2", r"pos\u0000");
    let others = futures::future::join_all((0..20).map(|n| a.ingest(confirmed(n))));
    let (x, y, others) = tokio::join!(a.ingest(nul_intent), a.ingest(nul_terminal), others);
    for result in [x, y] {
        assert!(matches!(result, Ok(Ingested::New { .. })), "{result:?}");
    }
    for (n, result) in others.into_iter().enumerate() {
        assert!(
            matches!(result, Ok(Ingested::New { .. })),
            "evt_{n}: {result:?}"
        );
    }
    assert_gap_free(&a, 20).await;
}
