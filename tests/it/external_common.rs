//! What the external broker tests share, whichever the broker (Mosquitto in
//! `external_broker.rs`, a NATS cluster in `nats_cluster.rs`): broker processes that cannot
//! outlive the test, clients with a terminal's certificate, and the attacker's-side scenarios,
//! run against each broker.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate_proto::confirmation::{Ack, StatusMessage};
use posgate_proto::topics;
use posgate_sim::terminal::{Bundle, Identity, Seen, Terminal, connect_raw};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{self, TestGateway, eventually};

/// Starts `program args` under `setpriv --pdeathsig KILL` (killed with the test process) and
/// kill-on-drop, its stderr (and stdout) collected into the returned log. `what` names the
/// program and how to install it, for the panic when it cannot be started.
pub fn spawn_logged(program: &Path, args: &[&str], what: &str) -> (Child, Arc<Mutex<String>>) {
    let mut child = match Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("cannot start {what}: {e}"),
    };
    let log = Arc::new(Mutex::new(String::new()));
    harness::keep_reading(
        BufReader::new(child.stderr.take().unwrap()).lines(),
        log.clone(),
    );
    harness::keep_reading(
        BufReader::new(child.stdout.take().unwrap()).lines(),
        log.clone(),
    );
    (child, log)
}

pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Connects a provisioned terminal to the broker once the broker has reloaded the ACL naming it
/// (provisioning reaches the broker through posgate's files and the reload command).
pub async fn connect(addr: SocketAddr, bundle: &Bundle) -> Terminal {
    eventually(Duration::from_secs(10), || async {
        Terminal::connect(bundle.clone(), addr).await.ok()
    })
    .await
}

pub async fn pending(gw: &TestGateway, id: &str) -> u64 {
    gw.terminal_view(id).await["pending"].as_u64().unwrap()
}

/// Waits (10 s at most) until terminal `id` has nothing pending: its acks reached posgate.
pub async fn outbox_empties(gw: &TestGateway, id: &str) {
    eventually(Duration::from_secs(10), || async {
        (pending(gw, id).await == 0).then_some(())
    })
    .await;
}

/// Drives `eventloop` until the confirmation of `intent_id` arrives (see [`drive`]).
pub async fn drive_until_payment(
    eventloop: &mut EventLoop,
    publishes: &mut Vec<(String, Vec<u8>)>,
    intent_id: &str,
) {
    let end = format!("/payments/{intent_id}");
    drive(
        eventloop,
        publishes,
        |p| matches!(p, Packet::Publish(p) if p.topic.ends_with(&end)),
    )
    .await;
}

/// Waits until `terminal` is disconnected by the broker; panics with `why_not()` after 10 s.
pub async fn until_disconnected(terminal: &mut Terminal, why_not: impl FnOnce() -> String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match terminal.next_seen(left).await {
            Some(Seen::Disconnected(_)) => break,
            Some(_) => {}
            None => panic!("{}", why_not()),
        }
    }
}

/// Drives `eventloop` until `until` returns true for an incoming packet; every incoming publish
/// is collected. Panics after 10 s.
pub async fn drive(
    eventloop: &mut EventLoop,
    publishes: &mut Vec<(String, Vec<u8>)>,
    mut until: impl FnMut(&Packet) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(packet))) => {
                if let Packet::Publish(p) = &packet {
                    publishes.push((p.topic.clone(), p.payload.to_vec()));
                }
                if until(&packet) {
                    return;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => {
                let topics: Vec<&str> = publishes.iter().map(|(t, _)| t.as_str()).collect();
                panic!("nothing within 10 s; publishes so far on {topics:?}")
            }
        }
    }
}

/// Polls until the next PUBACK, an error or 10 s, whichever comes first.
pub async fn settle(eventloop: &mut EventLoop) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Waits until the broker's ACL names `bundle`'s terminal (provisioning reaches the broker through
/// posgate's files and the reload): until its subscription to its own payments is granted.
pub async fn await_acl(addr: SocketAddr, bundle: &Bundle) {
    eventually(Duration::from_secs(10), || async {
        let (client, mut eventloop) = raw(addr, bundle, &bundle.client_id).await;
        client
            .subscribe(&bundle.topics.payments, QoS::AtLeastOnce)
            .await
            .unwrap();
        let granted = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        return ack
                            .return_codes
                            .iter()
                            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    }
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        drop(client.disconnect().await);
        granted.then_some(())
    })
    .await;
}

/// A bare client with `bundle`'s certificate, no last will, connected.
pub async fn raw(addr: SocketAddr, bundle: &Bundle, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut identity = Identity::of(bundle);
    identity.last_will = None;
    identity.client_id = client_id.to_owned();
    eventually(Duration::from_secs(10), || async {
        let (client, mut eventloop) = connect_raw(addr, &identity).unwrap();
        harness::connack(&mut eventloop)
            .await
            .ok()
            .map(|()| (client, eventloop))
    })
    .await
}

/// A terminal's certificate subscribes to another terminal's (another tenant's) confirmations by
/// exact topic, by its filter and by wildcards: it receives none of them, although the victim's
/// confirmation sits retained at the broker. Its own retained confirmation, asked for last,
/// arrives: the broker handled the forbidden subscriptions before it, so nothing of theirs can
/// still be on its way.
pub async fn cannot_read_another_terminals_payments(
    gw: &TestGateway,
    victim_at: SocketAddr,
    attacker_at: SocketAddr,
) {
    let mallory = gw.provision("pos_mallory").await;
    let victim = gw.provision("pos_victim").await;
    await_acl(attacker_at, &mallory).await;
    await_acl(victim_at, &victim).await;
    gw.pay("pos_victim", "pi_victim").await;
    gw.pay("pos_mallory", "pi_mallory").await;
    let victim_tenant = topics::tenant_for("pos_victim");
    // The victim's confirmation is retained at the broker: a legitimate reader gets it.
    let (reader, mut reader_loop) = raw(victim_at, &victim, "pos_victim").await;
    reader
        .subscribe(topics::payments_filter(&victim_tenant), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = Vec::new();
    drive(&mut reader_loop, &mut got, |p| {
        matches!(p, Packet::Publish(_))
    })
    .await;
    assert!(got[0].0.ends_with("/payments/pi_victim"), "{got:?}");
    drop(reader.disconnect().await);

    let (client, mut eventloop) = raw(attacker_at, &mallory, "pos_mallory").await;
    let forbidden = [
        topics::payments(&victim_tenant, "pi_victim"),
        topics::payments_filter(&victim_tenant),
        format!("/{}/+/payments/+", topics::ROOT),
        format!("/{}/#", topics::ROOT),
        "#".to_owned(),
        "/#".to_owned(),
        format!("/{}/{victim_tenant}/#", topics::ROOT),
        topics::rpc_res(&victim_tenant),
    ];
    let mut seen = Vec::new();
    for filter in &forbidden {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        drive(&mut eventloop, &mut seen, |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await;
    }
    let own = topics::payments_filter(&topics::tenant_for("pos_mallory"));
    client.subscribe(&own, QoS::AtLeastOnce).await.unwrap();
    drive(
        &mut eventloop,
        &mut seen,
        |p| matches!(p, Packet::Publish(p) if p.topic.ends_with("/payments/pi_mallory")),
    )
    .await;
    let leaked: Vec<&str> = seen
        .iter()
        .map(|(topic, _)| topic.as_str())
        .filter(|topic| !topic.ends_with("/payments/pi_mallory"))
        .collect();
    assert!(
        leaked.is_empty(),
        "another terminal's messages leaked: {leaked:?}"
    );
    drop(client.disconnect().await);
}

/// A terminal's certificate publishes an ack, an `online` status and an RPC request under
/// another terminal's topics: posgate never sees them (the victim's confirmation stays in the
/// outbox), while the same terminal's own ack, sent right after, is seen.
pub async fn cannot_ack_or_speak_for_another_terminal(gw: &TestGateway, at: SocketAddr) {
    let mallory = gw.provision("pos_mallory2").await;
    let victim_bundle = gw.provision("pos_victim2").await;
    await_acl(at, &mallory).await;
    await_acl(at, &victim_bundle).await;
    gw.pay("pos_victim2", "pi_victim2").await;
    gw.pay("pos_mallory2", "pi_mallory2").await;
    let victim = topics::tenant_for("pos_victim2");
    let own = topics::tenant_for("pos_mallory2");
    // Under its own client id, and under the victim's (the broker ties the user name, not the
    // client id, to the certificate).
    for client_id in ["pos_mallory2", "pos_victim2"] {
        let (client, mut eventloop) = raw(at, &mallory, client_id).await;
        let forged_ack = serde_json::to_vec(&Ack {
            intent_id: "pi_victim2".into(),
            seq: 1,
        })
        .unwrap();
        let online = serde_json::to_vec(&StatusMessage::online()).unwrap();
        let rpc = br#"{"id":"r1","method":"get_intent","params":{"intent_id":"pi_victim2"}}"#;
        for (topic, payload) in [
            (topics::acks(&victim), forged_ack.clone()),
            (topics::status(&victim), online.clone()),
            (topics::rpc_req(&victim), rpc.to_vec()),
        ] {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            // Mosquitto and NATS answer a refused QoS 1 publish with a PUBACK (3.1.1) and drop
            // it; a disconnect would do as well.
            settle(&mut eventloop).await;
        }
        drop(client.disconnect().await);
    }
    // Its own ack, after the forged ones, at the same node and through posgate's same
    // subscription.
    let (client, mut eventloop) = raw(at, &mallory, "pos_mallory2").await;
    let own_ack = serde_json::to_vec(&Ack {
        intent_id: "pi_mallory2".into(),
        seq: 1,
    })
    .unwrap();
    client
        .publish(topics::acks(&own), QoS::AtLeastOnce, false, own_ack)
        .await
        .unwrap();
    let mut seen = Vec::new();
    drive(&mut eventloop, &mut seen, |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;
    eventually(Duration::from_secs(10), || async {
        (pending(gw, "pos_mallory2").await == 0).then_some(())
    })
    .await;
    assert_eq!(
        pending(gw, "pos_victim2").await,
        1,
        "a forged ack cleared the victim's confirmation"
    );
    let view = gw.terminal_view("pos_victim2").await;
    assert_ne!(
        view["online"], true,
        "a forged status made the victim online: {view}"
    );
    drop(client.disconnect().await);
}

/// A client without a certificate, or with one of another CA (for the same terminal id), gets
/// no CONNACK at `at`.
pub async fn missing_or_foreign_certificates_are_refused(at: SocketAddr, bundle: &Bundle) {
    let identity = Identity::of(bundle);
    let mut anonymous = identity.clone();
    anonymous.cert_key = None;
    anonymous.client_id = "anonymous".into();
    let (_c, mut eventloop) = connect_raw(at, &anonymous).unwrap();
    assert!(
        harness::connack(&mut eventloop).await.is_err(),
        "a client without a certificate was accepted"
    );

    let other = tempfile::tempdir().unwrap();
    let stranger_pki =
        posgate::pki::Pki::load_or_create(other.path(), &["localhost".to_owned()]).unwrap();
    let stranger = stranger_pki
        .issue_terminal(
            &bundle.terminal_id,
            &topics::tenant_for(&bundle.terminal_id),
        )
        .unwrap();
    let mut foreign = identity.clone();
    foreign.cert_key = Some((stranger.cert_pem, stranger.key_pem));
    let (_c, mut eventloop) = connect_raw(at, &foreign).unwrap();
    assert!(
        harness::connack(&mut eventloop).await.is_err(),
        "a certificate of another CA was accepted"
    );
}
