//! Three real posgate daemons on one PostgreSQL database and one Mosquitto (external broker
//! mode): they split the terminal shards by leases, deliver each terminal's confirmations from
//! one replica in `seq` order whichever replica took the webhook, and a replica killed with
//! SIGKILL has its terminals served again by another once its lease expired.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use posgate::replicas::{SHARDS, shard_of};
use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};
use posgate_sim::terminal::Bundle;
use rumqttc::{Event, Packet, QoS};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::crash::{self, Daemon, Listen};
use crate::external_broker::{self as ext, Mosquitto};
use crate::harness::{self, SECRET, eventually, signed_post};

/// The lease time of the daemons under test (seconds).
const LEASE_SECS: u64 = 2;

const IDS: [&str; 3] = ["ra", "rb", "rc"];

/// One database, one broker, three daemons.
struct Replicas {
    url: String,
    broker: Mosquitto,
    broker_dir: TempDir,
    dirs: Vec<TempDir>,
    daemons: Vec<Option<Daemon>>,
    http: reqwest::Client,
}

/// Copies the PKI (gateway CA, signing key) of `from` into `to`: replicas are one gateway to
/// the terminals.
fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

impl Replicas {
    async fn start() -> Replicas {
        let url = tokio::task::spawn_blocking(|| posgate_testpg::shared().fresh_db())
            .await
            .unwrap();
        let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let broker_dir = tempfile::tempdir().unwrap();
        // `broker-config` creates the PKI in the first data dir; the others get a copy.
        let broker = ext::start_mosquitto(dirs[0].path(), broker_dir.path(), None).await;
        for dir in &dirs[1..] {
            copy_dir(dirs[0].path(), dir.path());
        }
        let mut replicas = Replicas {
            url,
            broker,
            broker_dir,
            dirs,
            daemons: vec![None, None, None],
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        for i in 0..3 {
            replicas.start_one(i, Listen::any()).await;
        }
        replicas
    }

    async fn start_one(&mut self, i: usize, listen: Listen) {
        let mut env = ext::external_env(&self.broker, self.broker_dir.path());
        if i > 0 {
            // One replica writes the broker's ACL and CRL (all would write the same files).
            env.retain(|(k, _)| !k.contains("EXTERNAL_BROKER_DIR") && !k.contains("RELOAD"));
        }
        env.extend([
            ("POSGATE__STORE__BACKEND".into(), "postgres".into()),
            ("POSGATE__STORE__POSTGRES_URL".into(), self.url.clone()),
            ("POSGATE__REPLICAS__ID".into(), IDS[i].into()),
            (
                "POSGATE__REPLICAS__LEASE_SECS".into(),
                LEASE_SECS.to_string(),
            ),
            (
                "POSGATE__MQTT__EXTERNAL_CLIENT_ID".into(),
                format!("posgate-{}", IDS[i]),
            ),
            // Only the takeover republishes within a test's time.
            (
                "POSGATE__DELIVERY__REPUBLISH_AFTER_SECS".into(),
                "120".into(),
            ),
        ]);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let daemon = crash::start_daemon_env(self.dirs[i].path(), None, listen, &pairs).await;
        self.daemons[i] = Some(daemon);
    }

    fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().expect("replica running")
    }

    async fn admin_get(&self, i: usize, path: &str) -> serde_json::Value {
        self.http
            .get(format!("http://{}{path}", self.daemon(i).admin))
            .bearer_auth("crash-test-admin-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Each running replica's owned shards, once they cover all 64 without overlap and each
    /// running replica has some.
    async fn split(&self) -> Vec<Option<BTreeSet<u16>>> {
        eventually(Duration::from_secs(20), || async {
            let mut owned = Vec::new();
            for i in 0..3 {
                if self.daemons[i].is_none() {
                    owned.push(None);
                    continue;
                }
                let view = self.admin_get(i, "/v1/replica").await;
                assert_eq!(view["id"], IDS[i]);
                let set: BTreeSet<u16> = serde_json::from_value(view["owned"].clone()).unwrap();
                owned.push(Some(set));
            }
            let sets: Vec<&BTreeSet<u16>> = owned.iter().flatten().collect();
            let total: usize = sets.iter().map(|s| s.len()).sum();
            let union: BTreeSet<u16> = sets.iter().flat_map(|s| s.iter().copied()).collect();
            (total == SHARDS as usize
                && union.len() == SHARDS as usize
                && sets.iter().all(|s| !s.is_empty()))
            .then_some(owned)
        })
        .await
    }

    async fn post(&self, i: usize, evt: &str, intent: &str, terminal: &str) {
        let intent = Intent::new(intent, MicroUsdc(4_500_000), terminal);
        let url = format!("http://{}{}", self.daemon(i).ingress, events::WEBHOOK_PATH);
        let status = signed_post(
            &self.http,
            &url,
            SECRET,
            events::intent_event(evt, "confirmed", &intent),
        )
        .send()
        .await
        .unwrap()
        .status();
        assert_eq!(status, 200, "webhook {evt} to replica {}", IDS[i]);
    }

    async fn pending(&self, i: usize, terminal: &str) -> u64 {
        self.admin_get(i, &format!("/v1/terminals/{terminal}"))
            .await["pending"]
            .as_u64()
            .unwrap()
    }

    async fn metric(&self, i: usize, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.daemon(i).admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        harness::sample(&text, name).unwrap_or(0.0)
    }

    /// Registers `id` (through replica 0, which writes the broker's ACL).
    async fn provision(&self, id: &str) -> Bundle {
        let bundle = self.daemon(0).provision(&self.http, id).await;
        ext::await_acl(self.broker.addr, &bundle).await;
        bundle
    }

    fn owner(owned: &[Option<BTreeSet<u16>>], terminal: &str) -> usize {
        let shard = shard_of(terminal);
        owned
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.contains(&shard)))
            .unwrap()
    }

    async fn stop(mut self) {
        for daemon in self.daemons.iter_mut().flatten() {
            crash::sigterm(daemon).await;
            let _ = tokio::time::timeout(Duration::from_secs(20), daemon.child.wait()).await;
        }
    }
}

/// Webhooks for six terminals (two per replica's shards), sent round-robin to the three
/// replicas: every terminal gets its four confirmations in `seq` order, each published once
/// (by its owner: the sum of first publishes over the replicas is the number of webhooks), and
/// the acks, which reach whichever replica the broker hands them to, empty the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_split_the_shards_and_each_terminal_is_served_by_one_in_seq_order() {
    let r = Replicas::start().await;
    let owned = r.split().await;
    // Two terminals in each replica's shards.
    let mut terminals: Vec<String> = Vec::new();
    let mut per = [0; 3];
    for n in 0.. {
        let id = format!("pos_rep_{n}");
        let o = Replicas::owner(&owned, &id);
        if per[o] < 2 {
            per[o] += 1;
            terminals.push(id);
        }
        if terminals.len() == 6 {
            break;
        }
    }
    let mut connected = Vec::new();
    for id in &terminals {
        let bundle = r.provision(id).await;
        connected.push(ext::connect(r.broker.addr, &bundle).await);
    }
    const PER_TERMINAL: usize = 4;
    let mut k = 0;
    for round in 1..=PER_TERMINAL {
        for id in &terminals {
            r.post(
                k % 3,
                &format!("evt_{id}_{round}"),
                &format!("pi_{id}_{round}"),
                id,
            )
            .await;
            k += 1;
        }
    }
    for (id, terminal) in terminals.iter().zip(connected.iter_mut()) {
        let mut seqs = Vec::new();
        while seqs.len() < PER_TERMINAL {
            let c = terminal
                .next_confirmation(Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("{id} after {seqs:?}: {e}"));
            assert_eq!(c.intent_id, format!("pi_{id}_{}", c.seq));
            seqs.push(c.seq);
        }
        // The terminal acks each on receipt: a later seq shown before an earlier one would mean
        // two replicas published for it (each holds its own stop-and-wait).
        assert_eq!(seqs, (1..=PER_TERMINAL as u64).collect::<Vec<_>>(), "{id}");
    }
    for id in &terminals {
        eventually(Duration::from_secs(15), || async {
            (r.pending(1, id).await == 0).then_some(())
        })
        .await;
    }
    let mut published = 0.0;
    let mut shards = 0.0;
    for i in 0..3 {
        published += r.metric(i, "posgate_confirmations_published_total").await;
        shards += r.metric(i, "posgate_replica_shards_owned").await;
    }
    assert_eq!(published, (terminals.len() * PER_TERMINAL) as f64);
    assert_eq!(shards, f64::from(SHARDS));
    for t in connected {
        t.disconnect().await;
    }
    r.stop().await;
}

/// The replica owning a terminal is killed (SIGKILL) while the terminal holds a confirmation it
/// does not ack: another replica claims the shard once the lease expired and publishes it again,
/// within the lease time and a margin of the kill. Restarted on the same ports and data dir,
/// the killed replica rejoins, gets shards back and delivers for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_terminals_are_served_again_within_the_lease_and_it_rejoins() {
    let mut r = Replicas::start().await;
    let owned = r.split().await;
    let victim = (0..)
        .map(|n| format!("pos_kill_{n}"))
        .find(|id| Replicas::owner(&owned, id) == 1)
        .unwrap();
    let bundle = r.provision(&victim).await;
    // A terminal that reads but never acks.
    let (client, mut eventloop) = ext::raw(r.broker.addr, &bundle, &bundle.client_id).await;
    client
        .subscribe(&bundle.topics.payments, QoS::AtLeastOnce)
        .await
        .unwrap();
    // The webhook goes to a replica that is not the owner.
    r.post(2, "evt_kill_1", "pi_kill_1", &victim).await;
    let topic = next_publish(&mut eventloop, Duration::from_secs(15))
        .await
        .expect("the owner published the confirmation");
    assert!(topic.ends_with("/payments/pi_kill_1"), "{topic}");

    let owner = r.daemons[1].take().unwrap();
    let listen = owner.listen();
    let mut owner = owner;
    owner.child.start_kill().unwrap();
    let killed = Instant::now();
    owner.child.wait().await.unwrap();
    let limit = Duration::from_secs(LEASE_SECS) + Duration::from_secs(3);
    let again = next_publish(&mut eventloop, Duration::from_secs(30)).await;
    let took = killed.elapsed();
    assert_eq!(
        again.as_deref(),
        Some(topic.as_str()),
        "no replica published the confirmation again after the kill"
    );
    eprintln!("replica killed -> confirmation published again by another: {took:?}");
    assert!(
        took <= limit,
        "served again {took:?} after the kill (lease {LEASE_SECS} s)"
    );
    let after = r.split().await;
    let new_owner = Replicas::owner(&after, &victim);
    assert_ne!(new_owner, 1);
    // The terminal acks now, to the broker (any replica reads it): the outbox empties.
    let ack = serde_json::json!({"intent_id": "pi_kill_1", "seq": 1});
    client
        .publish(
            &bundle.topics.acks,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&ack).unwrap(),
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                return;
            }
        }
    })
    .await;
    eventually(Duration::from_secs(15), || async {
        (r.pending(0, &victim).await == 0).then_some(())
    })
    .await;
    drop(client.disconnect().await);

    // Restarted with the same id, ports and data dir: it rejoins and gets its fair share back.
    r.start_one(1, listen).await;
    let rejoined = eventually(Duration::from_secs(20), || async {
        let owned = r.split().await;
        owned[1]
            .as_ref()
            .is_some_and(|s| s.len() >= 20)
            .then_some(owned)
    })
    .await;
    let back = (0..)
        .map(|n| format!("pos_back_{n}"))
        .find(|id| Replicas::owner(&rejoined, id) == 1)
        .unwrap();
    let bundle = r.provision(&back).await;
    let mut terminal = ext::connect(r.broker.addr, &bundle).await;
    r.post(0, "evt_back_1", "pi_back_1", &back).await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_back_1", 1));
    terminal.disconnect().await;
    r.stop().await;
}

/// The next non-empty publish the client receives within `within`, by topic.
async fn next_publish(eventloop: &mut rumqttc::EventLoop, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if !p.payload.is_empty() => {
                return Some(p.topic);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the terminal's connection failed: {e}"),
            Err(_) => return None,
        }
    }
}
