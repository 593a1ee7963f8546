//! The engine over channels: a recording publisher, a real store in a temp dir. On paused time:
//! the republish timers, back-offs and "nothing more comes" waits take no real time, and the
//! clock moves only while the engine and the store are idle (see `on_both_backends!`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use posgate_proto::confirmation;
use posgate_proto::topics::{self, TopicKind};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use posgate_proto::MicroUsdc;
use posgate_proto::confirmation::{ConfirmationStatus, verify};
use posgate_proto::event::{Envelope, EventData};
use tokio::sync::Mutex;

use super::*;
use crate::metrics::Metrics;
use crate::store::testing::{Kind, TestDb, on_both_backends, register};
use crate::store::{AckOutcome, IncomingEvent, Limits, Store};

/// Records every publish.
struct Recorder(mpsc::UnboundedSender<(String, Bytes)>);

impl Publisher for Recorder {
    async fn publish_retained(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        drop(self.0.send((topic, payload)));
        Ok(())
    }

    async fn publish(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        drop(self.0.send((topic, payload)));
        Ok(())
    }
}

struct Rig {
    store: Store,
    events: mpsc::UnboundedSender<BrokerEvent>,
    published: Mutex<mpsc::UnboundedReceiver<(String, Bytes)>>,
    signer: Signer,
    presence: Presence,
    tenant: String,
    token: CancellationToken,
    _db: TestDb,
}

async fn rig(kind: Kind, republish_after: Duration) -> Rig {
    let db = TestDb::new(kind).await;
    let store = db.open(Limits::new(64, 16)).await;
    let tenant = topics::tenant_for("pos-1");
    register(&store, "pos-1").await;
    let (pub_tx, pub_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let signer = Signer {
        kid: confirmation::kid_for(&key.verifying_key().to_bytes()),
        key,
    };
    let presence = Presence::default();
    let engine = Engine::new(
        store.clone(),
        Arc::new(Recorder(pub_tx)),
        signer.clone(),
        Settings { republish_after },
        presence.clone(),
        Metrics::new().unwrap(),
    );
    let token = CancellationToken::new();
    tokio::spawn(engine.run(store.subscribe_outbox(), events_rx, token.clone()));
    Rig {
        store,
        events: events_tx,
        published: Mutex::new(pub_rx),
        signer,
        presence,
        tenant,
        token,
        _db: db,
    }
}

async fn confirm(store: &Store, n: u32) {
    let body = format!(
        r#"{{"id":"evt_{n}","type":"payment_intent.confirmed","data":{{"id":"pi_{n}","status":"confirmed","amount":4.5,"metadata":{{"terminal_id":"pos-1"}}}}}}"#
    );
    let env = Envelope::parse(body.as_bytes()).unwrap();
    let data = EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string());
    let event = IncomingEvent {
        event_id: env.id.clone(),
        kind: env.kind.clone(),
        raw: Bytes::from(body.clone()),
        received_at: OffsetDateTime::now_utc(),
        created_at: None,
        data,
    };
    store.ingest(event).await.unwrap();
}

impl Rig {
    async fn next(&self) -> (String, Bytes) {
        let mut rx = self.published.lock().await;
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    fn check(&self, payload: &Bytes) -> posgate_proto::confirmation::Confirmation {
        verify(
            std::str::from_utf8(payload).unwrap(),
            &self.signer.key.verifying_key(),
            "pos-1",
            0,
        )
        .unwrap()
    }

    /// The next publish is the head with `seq`; returns its bytes.
    async fn expect_head(&self, seq: u64) -> Bytes {
        let (topic, payload) = self.next().await;
        assert_eq!(self.check(&payload).seq, seq, "{topic}");
        payload
    }

    /// The next publish clears `intent`'s retained confirmation.
    async fn expect_cleared(&self, intent: &str) {
        let (topic, payload) = self.next().await;
        assert!(
            payload.is_empty() && topic.ends_with(&format!("/{intent}")),
            "{topic}"
        );
    }

    /// Waits until the outbox holds the rows `seqs` (the delivery engine acts on an ack before it is
    /// stored).
    async fn outbox_becomes(&self, seqs: &[u64]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let rows = self.store.outbox(None).await.unwrap();
            let now: Vec<u64> = rows.iter().map(|r| r.seq).collect();
            if now == seqs {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "outbox: {now:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn connected(&self) {
        self.events
            .send(BrokerEvent::Connected {
                terminal_id: "pos-1".into(),
            })
            .unwrap();
    }

    async fn ack(&self, intent: &str, seq: u64) {
        let payload = Bytes::from(format!(r#"{{"intent_id":"{intent}","seq":{seq}}}"#));
        let event = BrokerEvent::Message {
            terminal_id: "pos-1".into(),
            kind: TopicKind::Acks,
            payload,
        };
        self.events.send(event).unwrap();
    }
}

async fn publishes_signed_then_clears_on_ack(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    confirm(&rig.store, 1).await;
    let (topic, payload) = rig.next().await;
    assert_eq!(topic, topics::payments(&rig.tenant, "pi_1"));
    let c = rig.check(&payload);
    assert_eq!(
        (c.seq, c.status, c.amount_micros),
        (1, ConfirmationStatus::Confirmed, 4_500_000)
    );
    assert_eq!(c.amount, MicroUsdc(4_500_000).to_string());

    rig.ack("pi_1", 1).await;
    let (topic, payload) = rig.next().await;
    assert_eq!(
        (topic.as_str(), payload.is_empty()),
        (topics::payments(&rig.tenant, "pi_1").as_str(), true)
    );
    rig.outbox_becomes(&[]).await;
    rig.token.cancel();
}

/// The ack of the head puts the next confirmation on the wire at once, not after the ack is
/// stored: here every store answer is held behind a sync that does not finish.
async fn an_ack_moves_the_terminal_on_before_it_is_stored(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    confirm(&rig.store, 1).await;
    confirm(&rig.store, 2).await;
    rig.expect_head(1).await;
    rig.store.hold_syncs_for_test(true);
    // A durable write ahead of the ack's: its answer, and so the ack's, waits for the sync.
    let held = confirm(&rig.store, 3);
    tokio::pin!(held);
    assert!(futures::poll!(&mut held).is_pending());
    rig.ack("pi_1", 1).await;
    rig.expect_cleared("pi_1").await;
    rig.expect_head(2).await;
    assert!(futures::poll!(&mut held).is_pending(), "the store answered");
    rig.store.hold_syncs_for_test(false);
    held.await;
    rig.ack("pi_2", 2).await;
    rig.expect_cleared("pi_2").await;
    rig.expect_head(3).await;
    rig.outbox_becomes(&[3]).await;
    rig.token.cancel();
}

/// A row the delivery engine already moved past that is put back on the wire before its ack is
/// stored (here by a late notice and a reconnect; a reload can do the same) is cleared once the
/// ack is stored, not left retained.
async fn a_row_back_on_the_wire_before_its_ack_is_stored_is_cleared(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    confirm(&rig.store, 1).await;
    confirm(&rig.store, 2).await;
    let first = rig.store.outbox(None).await.unwrap().remove(0);
    rig.expect_head(1).await;
    rig.store.hold_syncs_for_test(true);
    let held = confirm(&rig.store, 3);
    tokio::pin!(held);
    assert!(futures::poll!(&mut held).is_pending());
    rig.ack("pi_1", 1).await;
    rig.expect_cleared("pi_1").await;
    rig.expect_head(2).await;
    rig.store.notify_for_test(vec![first]);
    // Reconnects republish the head; once the notice is in, that is row 1 again.
    loop {
        rig.connected();
        let (_, payload) = rig.next().await;
        if rig.check(&payload).seq == 1 {
            break;
        }
    }
    rig.store.hold_syncs_for_test(false);
    held.await;
    rig.expect_cleared("pi_1").await;
    rig.expect_head(2).await;
    rig.token.cancel();
}

/// When the store does not confirm an ack the delivery engine acted on (its queue had run ahead of
/// the outbox), the outbox is read again and its head goes out again.
async fn an_ack_the_store_does_not_confirm_reloads_the_terminal(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    confirm(&rig.store, 1).await;
    confirm(&rig.store, 2).await;
    rig.expect_head(1).await;
    // Row 1 leaves the outbox behind the delivery engine's back: its queue still has it.
    let outcome = rig
        .store
        .ack_many(vec![("pos-1".into(), "pi_1".into(), 1)])
        .await;
    assert!(matches!(
        outcome.unwrap()[..],
        [Some(AckOutcome::Delivered { .. })]
    ));
    rig.ack("pi_1", 1).await;
    rig.expect_cleared("pi_1").await;
    rig.expect_head(2).await;
    // The store found nothing to remove: the outbox is read again, its head republished.
    rig.expect_head(2).await;
    rig.token.cancel();
}

/// A store that refuses every ack write (a full or failing disk) while the terminal acks each
/// republish at once: the delivery engine slows down (250 ms, then doubling) instead of republishing
/// and re-acking as fast as both can. Once the store takes writes, the ack goes through.
async fn a_failing_store_slows_republishing_down(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    confirm(&rig.store, 1).await;
    let head = rig.expect_head(1).await;
    rig.store.fail_writes_for_test(true);
    let started = tokio::time::Instant::now();
    let mut republished = 0;
    // Bounded: on paused time an engine that never pauses would never let the clock move.
    while started.elapsed() < Duration::from_millis(1500) && republished <= 4 {
        rig.ack("pi_1", 1).await;
        rig.expect_cleared("pi_1").await;
        // The row comes back (the ack was not stored): ack it again, as a terminal does.
        assert_eq!(rig.expect_head(1).await, head);
        republished += 1;
    }
    // 250 + 500 + 1000 ms of pauses fit in 1.5 s: three rounds; without a pause, thousands.
    assert!(republished <= 4, "{republished} republishes in 1.5 s");
    rig.store.fail_writes_for_test(false);
    rig.ack("pi_1", 1).await;
    rig.expect_cleared("pi_1").await;
    rig.outbox_becomes(&[]).await;
    rig.token.cancel();
}

/// After a revocation the delivery engine clears what was on the wire for the terminal and never
/// publishes its parked rows again: not on the republish timer, not from a late notice.
async fn a_revoked_terminal_is_cleared_and_never_republished(kind: Kind) {
    let rig = rig(kind, Duration::from_millis(200)).await;
    confirm(&rig.store, 1).await;
    confirm(&rig.store, 2).await;
    rig.expect_head(1).await;
    let revocation = rig
        .store
        .revoke_terminal("pos-1".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revocation.parked.len(), 2);
    assert!(rig.store.outbox(None).await.unwrap().is_empty());
    // A notice of a row committed just before the revocation, arriving after it.
    let late = revocation.parked[1].clone();
    rig.events
        .send(BrokerEvent::Revoked {
            terminal_id: "pos-1".into(),
            parked: revocation.parked,
        })
        .unwrap();
    rig.expect_cleared("pi_1").await;
    rig.expect_cleared("pi_2").await;
    rig.store.notify_for_test(vec![late]);
    // Several republish periods: nothing more goes out.
    let mut rx = rig.published.lock().await;
    let quiet = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
    assert!(quiet.is_err(), "published after revocation: {quiet:?}");
    assert!(!rig.presence.read().unwrap()["pos-1"].online);
    rig.token.cancel();
}

async fn a_wrong_ack_changes_nothing(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    confirm(&rig.store, 1).await;
    rig.next().await;
    rig.ack("pi_1", 2).await; // wrong seq
    rig.ack("pi_other", 1).await; // wrong intent
    let garbage = BrokerEvent::Message {
        terminal_id: "pos-1".into(),
        kind: TopicKind::Acks,
        payload: Bytes::from_static(b"{"),
    };
    rig.events.send(garbage).unwrap();
    // Still there, and a reconnect publishes it again.
    rig.connected();
    rig.expect_head(1).await;
    assert_eq!(rig.store.outbox(None).await.unwrap().len(), 1);
    rig.token.cancel();
}

async fn one_in_flight_per_terminal_in_seq_order(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    for n in 1..=5 {
        confirm(&rig.store, n).await;
    }
    // Only the head is on the wire; a reconnect publishes the head again.
    let first = rig.expect_head(1).await;
    rig.connected();
    let again = rig.expect_head(1).await;
    assert_eq!(again, first);
    assert!(rig.presence.read().unwrap()["pos-1"].online);
    for seq in 1..=5u64 {
        rig.ack(&format!("pi_{seq}"), seq).await;
        rig.expect_cleared(&format!("pi_{seq}")).await;
        if seq < 5 {
            rig.expect_head(seq + 1).await;
        }
    }
    rig.outbox_becomes(&[]).await;
    rig.events
        .send(BrokerEvent::Disconnected {
            terminal_id: "pos-1".into(),
        })
        .unwrap();
    rig.token.cancel();
}

async fn acks_sent_in_a_burst_each_count(kind: Kind) {
    let rig = rig(kind, Duration::from_secs(60)).await;
    for n in 1..=3 {
        confirm(&rig.store, n).await;
    }
    rig.expect_head(1).await;
    // Sent before the first is stored, so later ones wait for the write in flight and go
    // into the next ones: a wrong ack, the right one, a repeat of it, and an ack for a row
    // not yet out. However they are split into writes, each counts, in order.
    rig.ack("pi_9", 9).await;
    rig.ack("pi_1", 1).await;
    rig.ack("pi_1", 1).await;
    rig.ack("pi_2", 2).await;
    rig.expect_cleared("pi_1").await;
    // pi_2's early ack counted too: its row is gone once published, and 3 follows.
    rig.expect_head(2).await;
    rig.expect_cleared("pi_2").await;
    rig.expect_head(3).await;
    rig.ack("pi_3", 3).await;
    rig.expect_cleared("pi_3").await;
    rig.outbox_becomes(&[]).await;
    rig.token.cancel();
}

async fn unacked_rows_are_published_again_after_the_timeout(kind: Kind) {
    let rig = rig(kind, Duration::from_millis(100)).await;
    confirm(&rig.store, 1).await;
    let (_, first) = rig.next().await;
    let (_, again) = rig.next().await;
    assert_eq!(first, again, "a republish sends identical bytes");
    rig.ack("pi_1", 1).await;
    let (_, clear) = rig.next().await;
    assert!(clear.is_empty());
    rig.token.cancel();
}

async fn startup_publishes_what_was_left_unacked(kind: Kind) {
    let db = TestDb::new(kind).await;
    {
        let store = db.open(Limits::new(64, 16)).await;
        register(&store, "pos-1").await;
        confirm(&store, 9).await;
        store.close().await;
    }
    let store = db.open(Limits::new(64, 16)).await;
    let (pub_tx, mut pub_rx) = mpsc::unbounded_channel();
    let (_events_tx, events_rx) = mpsc::unbounded_channel();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let signer = Signer {
        kid: "k".into(),
        key,
    };
    let engine = Engine::new(
        store.clone(),
        Arc::new(Recorder(pub_tx)),
        signer,
        Settings {
            republish_after: Duration::from_secs(60),
        },
        Presence::default(),
        Metrics::new().unwrap(),
    );
    let token = CancellationToken::new();
    tokio::spawn(engine.run(store.subscribe_outbox(), events_rx, token.clone()));
    let (topic, _) = tokio::time::timeout(Duration::from_secs(10), pub_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(topic.ends_with("/payments/pi_9"), "{topic}");
    token.cancel();
}

/// Rows committed while the startup load is still reading wait behind the older rows it finds:
/// the terminal is shown `seq` 1 first. (A notice that came in before the load used to be
/// published at once, so after a restart under load a terminal saw a newer `seq` before older
/// ones: found by `posgate-sim chaos`.)
#[tokio::test(start_paused = true)]
async fn rows_committed_during_the_startup_load_wait_behind_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Limits::new(64, 16)).unwrap();
    register(&store, "pos-1").await;
    for n in 1..=3 {
        confirm(&store, n).await;
    }
    let newest = store.outbox(None).await.unwrap().pop().unwrap();
    assert_eq!(newest.seq, 3);
    // The disk holds a commit back, so the startup load (a read) waits for it.
    let before = store.syncs_requested_for_test();
    store.hold_syncs_for_test(true);
    let held = tokio::spawn({
        let store = store.clone();
        async move { confirm(&store, 4).await }
    });
    while store.syncs_requested_for_test() == before {
        tokio::task::yield_now().await;
    }
    let (pub_tx, mut pub_rx) = mpsc::unbounded_channel();
    let (_events_tx, events_rx) = mpsc::unbounded_channel();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let signer = Signer {
        kid: "k".into(),
        key: key.clone(),
    };
    let engine = Engine::new(
        store.clone(),
        Arc::new(Recorder(pub_tx)),
        signer,
        Settings {
            republish_after: Duration::from_secs(60),
        },
        Presence::default(),
        Metrics::new().unwrap(),
    );
    let token = CancellationToken::new();
    tokio::spawn(engine.run(store.subscribe_outbox(), events_rx, token.clone()));
    // A notice of row 3 reaches the engine before its startup load does.
    store.notify_for_test(vec![newest]);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    store.hold_syncs_for_test(false);
    held.await.unwrap();
    let (_, payload) = tokio::time::timeout(Duration::from_secs(10), pub_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let first = confirmation::verify(
        std::str::from_utf8(&payload).unwrap(),
        &key.verifying_key(),
        "pos-1",
        0,
    )
    .unwrap();
    assert_eq!(first.seq, 1, "the first confirmation on the wire");
    token.cancel();
}

on_both_backends!(
    paused: publishes_signed_then_clears_on_ack,
    an_ack_moves_the_terminal_on_before_it_is_stored,
    a_row_back_on_the_wire_before_its_ack_is_stored_is_cleared,
    an_ack_the_store_does_not_confirm_reloads_the_terminal,
    a_failing_store_slows_republishing_down,
    a_revoked_terminal_is_cleared_and_never_republished,
    a_wrong_ack_changes_nothing,
    one_in_flight_per_terminal_in_seq_order,
    acks_sent_in_a_burst_each_count,
    unacked_rows_are_published_again_after_the_timeout,
    startup_publishes_what_was_left_unacked,
);

/// One replica's engine over channels: what it publishes, the broker events and replica inputs
/// it is fed, what it tells the other replicas, and its shard ownership (none yet).
struct Replica {
    published: mpsc::UnboundedReceiver<(String, Bytes)>,
    events: mpsc::UnboundedSender<BrokerEvent>,
    inputs: mpsc::UnboundedSender<crate::replicas::Input>,
    outgoing: mpsc::UnboundedReceiver<crate::replicas::notify::Outgoing>,
    ownership: crate::replicas::Ownership,
    signer: Signer,
    token: CancellationToken,
}

/// Starts a replica's engine on `store`; `forward_events`: the broker hands each message to one
/// replica (shared subscriptions); `rpc`: it answers terminals' RPC (no provider).
fn replica(store: &Store, forward_events: bool, rpc: bool) -> Replica {
    let (pub_tx, published) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let (inputs, input_rx) = mpsc::unbounded_channel();
    let (out_tx, outgoing) = mpsc::unbounded_channel();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let signer = Signer {
        kid: confirmation::kid_for(&key.verifying_key().to_bytes()),
        key,
    };
    let ownership = crate::replicas::Ownership::new("r1".into());
    let mut engine = Engine::new(
        store.clone(),
        Arc::new(Recorder(pub_tx)),
        signer.clone(),
        Settings {
            republish_after: Duration::from_secs(60),
        },
        Presence::default(),
        Metrics::new().unwrap(),
    );
    if rpc {
        engine = engine.with_rpc(Arc::new(crate::rpc::Rpc::new(store.clone(), None)));
    }
    let engine = engine.with_cluster(Cluster {
        ownership: ownership.clone(),
        inputs: input_rx,
        outgoing: out_tx,
        forward_events,
        reread_every: Duration::from_secs(3600),
    });
    let token = CancellationToken::new();
    tokio::spawn(engine.run(store.subscribe_outbox(), events_rx, token.clone()));
    Replica {
        published,
        events,
        inputs,
        outgoing,
        ownership,
        signer,
        token,
    }
}

/// A store on `db` with `pos-1` registered, and a replica's engine on it (shared subscriptions,
/// no RPC).
async fn replica_with_terminal(db: &TestDb) -> (Store, Replica) {
    let store = db.open(Limits::new(64, 16)).await;
    register(&store, "pos-1").await;
    let replica = replica(&store, true, false);
    (store, replica)
}

/// The engine of one replica among several: it publishes only for terminals in its shards, starts
/// when it gains the shard (reading the outbox), stops when it loses it, and forwards an ack it
/// read for a terminal it does not own.
#[tokio::test(start_paused = true)]
async fn a_replica_publishes_only_for_terminals_in_its_shards() {
    use crate::replicas::{Input, notify::Outgoing, shard_of};
    use std::collections::BTreeSet;

    let db = TestDb::new(Kind::Redb).await;
    let (
        store,
        Replica {
            published: mut pub_rx,
            events: events_tx,
            inputs: input_tx,
            outgoing: mut out_rx,
            ownership,
            token,
            ..
        },
    ) = replica_with_terminal(&db).await;
    let quiet = |rx: &mut mpsc::UnboundedReceiver<(String, Bytes)>| {
        let got = rx.try_recv().ok();
        assert!(
            got.is_none(),
            "published {got:?} for a terminal it does not own"
        );
    };

    // Not its shard: a committed row is not published, an ack is forwarded to the owner.
    confirm(&store, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    quiet(&mut pub_rx);
    let ack = BrokerEvent::Message {
        terminal_id: "pos-1".into(),
        kind: TopicKind::Acks,
        payload: Bytes::from_static(br#"{"intent_id":"pi_1","seq":1}"#),
    };
    events_tx.send(ack.clone()).unwrap();
    let forwarded = tokio::time::timeout(Duration::from_secs(5), out_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(forwarded, Outgoing::Event(e) if e == ack));
    assert_eq!(
        store.outbox(None).await.unwrap().len(),
        1,
        "not stored here"
    );

    // Gained: the outbox is read and the head published.
    let shard = BTreeSet::from([shard_of("pos-1")]);
    ownership.grant(
        &shard,
        tokio::time::Instant::now() + Duration::from_secs(60),
    );
    input_tx.send(Input::Gained(shard.clone())).unwrap();
    let (_, payload) = tokio::time::timeout(Duration::from_secs(5), pub_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!payload.is_empty());
    // Every publish is offered to the other replicas' HTTP channels.
    let told = tokio::time::timeout(Duration::from_secs(5), out_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(told, Outgoing::Published(p) if p.seq == 1));

    // Lost (withdrawn first, as the lease task does): the reconnect of the terminal, which
    // republishes for an owner, publishes nothing.
    ownership.withdraw(&shard);
    input_tx.send(Input::Lost(shard)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    events_tx
        .send(BrokerEvent::Connected {
            terminal_id: "pos-1".into(),
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    quiet(&mut pub_rx);
    token.cancel();
}

/// Shards gained (another replica died) republish this replica's own heads still waiting for an
/// ack: the ack may have gone, through the broker's shared subscription, to the replica that
/// died before it forwarded it. Without this the terminal waited for `republish_after`.
#[tokio::test(start_paused = true)]
async fn gaining_shards_republishes_heads_waiting_for_an_ack() {
    use crate::replicas::{Input, shard_of};
    use std::collections::BTreeSet;

    let db = TestDb::new(Kind::Redb).await;
    let (
        store,
        Replica {
            published: mut pub_rx,
            // Kept open: the engine ends with the broker's event stream.
            events: _events,
            inputs: input_tx,
            ownership,
            token,
            ..
        },
    ) = replica_with_terminal(&db).await;
    let mine = shard_of("pos-1");
    let until = tokio::time::Instant::now() + Duration::from_secs(600);
    ownership.grant(&BTreeSet::from([mine]), until);
    input_tx
        .send(Input::Gained(BTreeSet::from([mine])))
        .unwrap();
    confirm(&store, 1).await;
    let (_, first) = tokio::time::timeout(Duration::from_secs(5), pub_rx.recv())
        .await
        .unwrap()
        .unwrap();
    // The terminal's ack is lost with a replica that dies; its shard comes to this one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pub_rx.try_recv().is_err(), "nothing before the gain");
    let other = (0..crate::replicas::SHARDS).find(|s| *s != mine).unwrap();
    ownership.grant(&BTreeSet::from([mine, other]), until);
    input_tx
        .send(Input::Gained(BTreeSet::from([other])))
        .unwrap();
    let (_, again) = tokio::time::timeout(Duration::from_secs(5), pub_rx.recv())
        .await
        .expect("the head waiting for an ack was published again at the gain")
        .unwrap();
    assert_eq!(again, first, "the same confirmation, byte for byte");
    token.cancel();
}

/// With plain subscriptions (every replica receives every message, as on NATS), a terminal's RPC
/// request is answered by the replica that owns the terminal only: each replica answering made
/// the terminal get one answer, and the provider one call, per replica.
#[tokio::test(start_paused = true)]
async fn with_plain_subscriptions_only_the_owner_answers_rpc() {
    use crate::replicas::shard_of;
    use std::collections::BTreeSet;

    let db = TestDb::new(Kind::Redb).await;
    let store = db.open(Limits::new(64, 16)).await;
    let Replica {
        published: mut pub_rx,
        events: events_tx,
        ownership,
        token,
        ..
    } = replica(&store, false, true);
    let request = |terminal: &str, id: &str| BrokerEvent::Message {
        terminal_id: terminal.into(),
        kind: TopicKind::RpcReq,
        payload: Bytes::from(format!(
            r#"{{"id":"{id}","method":"no_such_method","params":{{}}}}"#
        )),
    };
    // This replica owns pos-1's shard, not pos-2's.
    assert_ne!(shard_of("pos-1"), shard_of("pos-2"));
    let shard = BTreeSet::from([shard_of("pos-1")]);
    ownership.grant(
        &shard,
        tokio::time::Instant::now() + Duration::from_secs(60),
    );
    events_tx.send(request("pos-2", "r-other")).unwrap();
    events_tx.send(request("pos-1", "r-own")).unwrap();
    events_tx.send(request("pos-1", "r-own-2")).unwrap();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(5), pub_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        answered.push((topic, answer["id"].as_str().unwrap_or_default().to_owned()));
    }
    let own = topics::rpc_res(&topics::tenant_for("pos-1"));
    answered.sort();
    assert_eq!(
        answered,
        [
            (own.clone(), "r-own".to_owned()),
            (own, "r-own-2".to_owned())
        ],
        "answered for a terminal another replica owns"
    );
    assert!(pub_rx.try_recv().is_err(), "a third answer");
    token.cancel();
}

/// Two replicas on one database: a row another replica committed first (seq 1, which this engine
/// has not heard of yet: its wake-up is still on the way) and then a row committed here (seq 2,
/// which this engine hears of at once). The first publish is seq 1: a local row above a gap
/// waits for a read of the outbox. Before, seq 2 went out first (the out-of-order confirmations
/// of the failover benchmark's runs B–D).
#[tokio::test(start_paused = true)]
async fn a_local_row_above_another_replicas_row_waits_for_it() {
    use crate::replicas::shard_of;
    use std::collections::BTreeSet;

    let db = TestDb::new(Kind::Postgres).await;
    // `_events` held: the engine ends when the broker's event stream does.
    let (
        here,
        Replica {
            published: mut pub_rx,
            events: _events,
            ownership,
            signer,
            token,
            ..
        },
    ) = replica_with_terminal(&db).await;
    let other = db.open(Limits::new(64, 16)).await;
    ownership.grant(
        &BTreeSet::from([shard_of("pos-1")]),
        tokio::time::Instant::now() + Duration::from_secs(60),
    );
    // The startup read finds nothing yet: wait until it is in (a republish of nothing).
    tokio::time::sleep(Duration::from_millis(200)).await;
    confirm(&other, 1).await;
    confirm(&here, 2).await;
    let (_, payload) = tokio::time::timeout(Duration::from_secs(5), pub_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let first = verify(
        std::str::from_utf8(&payload).unwrap(),
        &signer.key.verifying_key(),
        "pos-1",
        0,
    )
    .unwrap();
    assert_eq!(first.seq, 1, "a later seq went out first");
    token.cancel();
}
