//! The lease logic on a real PostgreSQL (two or three lease tasks on one new database, short
//! leases): never two owners of a shard by their own validity windows, fair shares, takeover after
//! expiry, hand-over on a clean stop.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Input, Leases, Ownership, SHARDS, Settings, overlap};
use crate::store::Limits;
use crate::store::testing::{Kind, TestDb};

/// A lease task under test.
struct Replica {
    ownership: Ownership,
    token: CancellationToken,
    task: JoinHandle<()>,
    inputs: mpsc::UnboundedReceiver<Input>,
}

/// A new database with posgate's schema (opening a store applies the migrations).
async fn database() -> (TestDb, String) {
    let db = TestDb::new(Kind::Postgres).await;
    let store = db.open(Limits::new(16, 16)).await;
    drop(store);
    let url = match &db.backend {
        crate::store::Backend::Postgres { url, .. } => url.clone(),
        crate::store::Backend::Redb => unreachable!(),
    };
    (db, url)
}

fn start(url: &str, id: &str, lease: Duration) -> Replica {
    let ownership = Ownership::new(id.into());
    let (tx, inputs) = mpsc::unbounded_channel();
    let token = CancellationToken::new();
    let leases = Leases::new(
        url.into(),
        crate::store::PgTls::unverified(),
        Settings {
            id: id.into(),
            lease,
        },
        ownership.clone(),
        tx,
        Arc::new(Notify::new()),
    );
    let task = tokio::spawn(leases.run(token.clone()));
    Replica {
        ownership,
        token,
        task,
        inputs,
    }
}

/// Samples every 5 ms until `done` or `within`: no shard is ever owned by two of `replicas`.
async fn watch(
    replicas: &[&Replica],
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        for (i, a) in replicas.iter().enumerate() {
            for b in &replicas[i + 1..] {
                let both = overlap(&a.ownership, &b.ownership);
                assert!(
                    both.is_empty(),
                    "shards {both:?} owned by two replicas at once"
                );
            }
        }
        if done() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "not done within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count(r: &Replica) -> usize {
    r.ownership.owned().len()
}

/// Gains minus losses as told to the engine: what it believes it delivers for.
fn told(r: &mut Replica, held: &mut BTreeSet<u16>) {
    while let Ok(input) = r.inputs.try_recv() {
        match input {
            Input::Gained(s) => held.extend(s),
            Input::Lost(s) => held.retain(|x| !s.contains(x)),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lease_tasks_split_the_shards_fairly_and_never_own_one_together() {
    let (_db, url) = database().await;
    let lease = Duration::from_millis(900);
    let mut a = start(&url, "a", lease);
    watch(&[&a], Duration::from_secs(5), || count(&a) == 64).await;
    let mut b = start(&url, "b", lease);
    // A hands over half (it stops owning before it frees the rows), B claims them.
    watch(&[&a, &b], Duration::from_secs(10), || {
        count(&a) == 32 && count(&b) == 32
    })
    .await;
    // Stable: renewals keep the split, still never overlapping (several lease times).
    let steady = Instant::now() + lease * 4;
    watch(&[&a, &b], lease * 6, || Instant::now() >= steady).await;
    assert_eq!((count(&a), count(&b)), (32, 32));
    // What the engines were told matches what they own.
    let (mut ha, mut hb) = (BTreeSet::new(), BTreeSet::new());
    told(&mut a, &mut ha);
    told(&mut b, &mut hb);
    assert_eq!(ha, a.ownership.owned());
    assert_eq!(hb, b.ownership.owned());
    assert!(a.ownership.renewing() && b.ownership.renewing());
    for r in [a, b] {
        r.token.cancel();
        r.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_shards_are_taken_over_only_after_its_lease_expired() {
    let (_db, url) = database().await;
    let lease = Duration::from_millis(1200);
    let a = start(&url, "a", lease);
    watch(&[&a], Duration::from_secs(5), || count(&a) == 64).await;
    // Killed: no release, its windows run out by themselves.
    a.task.abort();
    let killed = Instant::now();
    let b = start(&url, "b", lease);
    let took = watch(&[&a, &b], Duration::from_secs(10), || {
        count(&b) == SHARDS as usize
    })
    .await;
    // The database's expiry is at least a lease after a's last renewal began, which was at most
    // a third of a lease before the kill; b claims at its next cycle after that.
    assert!(
        took >= lease / 2,
        "taken over after {took:?}: before the lease could have expired"
    );
    assert!(
        killed.elapsed() <= lease * 2 + Duration::from_millis(500),
        "taken over after {:?}",
        killed.elapsed()
    );
    assert_eq!(count(&a), 0);
    b.token.cancel();
    b.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_releases_every_shard_at_once() {
    let (_db, url) = database().await;
    let lease = Duration::from_secs(3);
    let mut a = start(&url, "a", lease);
    watch(&[&a], Duration::from_secs(5), || count(&a) == 64).await;
    let b = start(&url, "b", lease);
    watch(&[&a, &b], Duration::from_secs(10), || {
        count(&a) == 32 && count(&b) == 32
    })
    .await;
    a.token.cancel();
    (&mut a.task).await.unwrap();
    assert_eq!(count(&a), 0, "a stopped owning before its task ended");
    assert!(!a.ownership.renewing());
    // Released, b claims at its next cycle (a third of the lease), well before the two thirds
    // of a lease the rows would need at least to expire.
    let took = watch(&[&a, &b], lease, || count(&b) == 64).await;
    assert!(took < lease * 2 / 3, "took {took:?}: not released");
    b.token.cancel();
    b.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_lease_tasks_share_64_shards_by_fair_share() {
    let (_db, url) = database().await;
    let lease = Duration::from_millis(900);
    let a = start(&url, "a", lease);
    let b = start(&url, "b", lease);
    let c = start(&url, "c", lease);
    watch(&[&a, &b, &c], Duration::from_secs(10), || {
        let mut n = [count(&a), count(&b), count(&c)];
        n.sort_unstable();
        // ceil(64 / 3) = 22: two take 22, the last the 20 left.
        n == [20, 22, 22]
    })
    .await;
    for r in [a, b, c] {
        r.token.cancel();
        r.task.await.unwrap();
    }
}
