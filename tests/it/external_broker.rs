//! The external broker mode (`mqtt.mode = "external"`) against a real Mosquitto 2, configured by
//! `posgate broker-config mosquitto`: delivery through it, and its isolation tested from the
//! attacker's side with real clients and certificates.
//!
//! Needs the `mosquitto` binary (Debian package `mosquitto`; `.ci/run` installs it): without it
//! these tests fail, they do not skip.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};
use posgate_sim::terminal::{Identity, Seen, connect_raw};
use rumqttc::{Event, Packet, QoS};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::crash::{self, Listen};
use crate::external_common::{
    self, connect, free_port, outbox_empties, pending, raw, until_disconnected,
};
use crate::harness::{self, SECRET, TestGateway, eventually, signed_post};

/// A Mosquitto process on a free loopback port, killed when dropped, and with the test process
/// (`setpriv --pdeathsig KILL`), so that it can never outlive the test.
pub(crate) struct Mosquitto {
    child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) log: Arc<Mutex<String>>,
}

impl Mosquitto {
    fn pid(&self) -> u32 {
        self.child.id().expect("mosquitto is running")
    }

    /// The reload command posgate runs after rewriting the ACL and CRL.
    fn reload_command(&self) -> String {
        format!("/bin/kill,-HUP,{}", self.pid())
    }

    async fn stop(mut self) -> SocketAddr {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
        self.addr
    }
}

/// `posgate broker-config mosquitto --out broker_dir --listen addr`, with `data_dir`'s PKI.
async fn broker_config(data_dir: &Path, broker_dir: &Path, addr: SocketAddr) {
    let out = Command::new(env!("CARGO_BIN_EXE_posgate-under-test"))
        .env_clear()
        .env("POSGATE__DATA_DIR", data_dir)
        .args(["broker-config", "mosquitto", "--out"])
        .arg(broker_dir)
        .args(["--listen", &addr.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "broker-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the configuration for a free port and starts Mosquitto on it, or, with `at`, starts it
/// again on the configuration already there (and the ACL and CRL posgate keeps); retries on
/// another free port when that one was taken meanwhile.
pub(crate) async fn start_mosquitto(
    data_dir: &Path,
    broker_dir: &Path,
    at: Option<SocketAddr>,
) -> Mosquitto {
    for _ in 0..5 {
        let addr = at.unwrap_or_else(free_port);
        let conf = broker_dir.join("mosquitto.conf");
        if at.is_none() {
            broker_config(data_dir, broker_dir, addr).await;
            // Tests run as root in CI: stay root, so the temp dirs (0700) stay readable.
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str("user root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n");
            std::fs::write(&conf, text).unwrap();
        }
        // Debian installs it in /usr/sbin, which a non-root PATH may lack.
        let binary = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let (mut child, log) = external_common::spawn_logged(
            Path::new(binary),
            &["-c", &conf.display().to_string()],
            "mosquitto (Debian package `mosquitto`)",
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let text = log.lock().unwrap().clone();
                if text.contains("Address already in use") && at.is_none() {
                    break;
                }
                panic!(
                    "mosquitto exited ({status}); is the Debian package `mosquitto` installed?\n{text}"
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Mosquitto { child, addr, log };
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto not listening on {addr} within 10 s:\n{}",
                log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("no free port for mosquitto after 5 tries");
}

/// The environment of a posgate in external mode for `broker`.
pub(crate) fn external_env(broker: &Mosquitto, broker_dir: &Path) -> Vec<(String, String)> {
    vec![
        ("POSGATE__MQTT__MODE".into(), "external".into()),
        (
            "POSGATE__MQTT__EXTERNAL_URL".into(),
            format!("mqtts://{}", broker.addr),
        ),
        (
            "POSGATE__MQTT__EXTERNAL_BROKER_DIR".into(),
            broker_dir.display().to_string(),
        ),
        (
            "POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND".into(),
            broker.reload_command(),
        ),
    ]
}

/// A Mosquitto and an in-process posgate in external mode using it.
struct Setup {
    gw: TestGateway,
    broker: Mosquitto,
    _broker_dir: TempDir,
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

async fn setup_with(extra: &[(&str, &str)]) -> Setup {
    let data_dir = tempfile::tempdir().unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = start_mosquitto(data_dir.path(), broker_dir.path(), None).await;
    let env = external_env(&broker, broker_dir.path());
    let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    pairs.extend_from_slice(extra);
    let gw = harness::spawn_in(data_dir, &pairs).await;
    assert_eq!(gw.mqtt, broker.addr, "posgate reports the broker's address");
    // What terminals publish while no posgate is subscribed is lost (acks are republished for,
    // RPC requests retried by the terminal): the tests start once posgate is subscribed.
    gw.metric_reaches(
        "posgate_external_broker_connected",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    Setup {
        gw,
        broker,
        _broker_dir: broker_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_reaches_a_terminal_through_mosquitto_and_its_ack_empties_the_outbox() {
    let s = setup().await;
    let bundle = s.gw.provision("pos_ext_a").await;
    assert_eq!(bundle.mqtt_url, format!("mqtts://{}", s.broker.addr));
    let mut terminal = connect(s.broker.addr, &bundle).await;
    s.gw.pay("pos_ext_a", "pi_ext_a").await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_ext_a", 1));
    // The terminal acked it (the simulator acks every verified confirmation): posgate read the
    // ack from its shared subscription and the outbox emptied.
    outbox_empties(&s.gw, "pos_ext_a").await;
    // Presence comes from the terminal's retained status.
    assert_eq!(s.gw.terminal_view("pos_ext_a").await["online"], true);
    s.gw.pay("pos_ext_a", "pi_ext_a2").await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_ext_a2", 2));
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_pending_while_the_terminal_is_offline_is_delivered_when_it_connects() {
    let s = setup().await;
    let bundle = s.gw.provision("pos_ext_b").await;
    s.gw.pay("pos_ext_b", "pi_ext_b").await;
    assert_eq!(pending(&s.gw, "pos_ext_b").await, 1);
    let mut terminal = connect(s.broker.addr, &bundle).await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_ext_b", 1));
    outbox_empties(&s.gw, "pos_ext_b").await;
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// See [`external_common::cannot_read_another_terminals_payments`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_cannot_read_another_terminals_payments() {
    let s = setup().await;
    external_common::cannot_read_another_terminals_payments(&s.gw, s.broker.addr, s.broker.addr)
        .await;
    s.gw.shutdown().await;
}

/// See [`external_common::cannot_ack_or_speak_for_another_terminal`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_cannot_ack_or_speak_for_another_terminal() {
    let s = setup().await;
    external_common::cannot_ack_or_speak_for_another_terminal(&s.gw, s.broker.addr).await;
    s.gw.shutdown().await;
}

/// Revocation through the admin API reaches the broker: the open session is cut and the
/// certificate is refused from then on (the CRL, reloaded). A client without a certificate, or
/// with one from another CA, is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_and_a_missing_or_foreign_one_are_refused() {
    let s = setup().await;
    let bundle = s.gw.provision("pos_ext_revoked").await;
    let mut terminal = connect(s.broker.addr, &bundle).await;
    let identity = Identity::of(&bundle);

    external_common::missing_or_foreign_certificates_are_refused(s.broker.addr, &bundle).await;

    let response =
        s.gw.admin_post(
            "/v1/terminals/pos_ext_revoked/revoke",
            serde_json::json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    // The open session is cut…
    until_disconnected(&mut terminal, || {
        "the revoked terminal's session was not cut".into()
    })
    .await;
    // …and the certificate is refused from then on (once the broker has reloaded the CRL).
    eventually(Duration::from_secs(10), || async {
        let (_c, mut eventloop) = connect_raw(s.broker.addr, &identity).unwrap();
        harness::connack(&mut eventloop)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let (_c, mut eventloop) = connect_raw(s.broker.addr, &identity).unwrap();
    let refused = harness::connack(&mut eventloop).await;
    assert!(refused.is_err(), "a revoked certificate connected again");
    // The session was cut only once the broker had the new CRL: the terminal's own reconnects
    // (every 200 ms) never got in again.
    while let Some(seen) = terminal.next_seen(Duration::ZERO).await {
        assert!(
            !matches!(seen, Seen::Connected),
            "the revoked terminal reconnected after its session was cut"
        );
    }
    terminal.kill();
    s.gw.shutdown().await;
}

/// A terminal that keeps flooding RPC cannot be refused at CONNECT by an external broker: its
/// session is cut (taken over), and its RPC requests are dropped unanswered for
/// `rpc.flood_suspend_secs`; then it is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_terminal_is_cut_and_its_rpc_dropped_for_a_while() {
    let s = setup_with(&[("POSGATE__RPC__FLOOD_SUSPEND_SECS", "3")]).await;
    let bundle = s.gw.provision("pos_ext_flood").await;
    let mut terminal = connect(s.broker.addr, &bundle).await;
    let reply = terminal
        .rpc(
            "before",
            "no_such_method",
            serde_json::json!({}),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(reply.error.unwrap().code, "unknown_method");
    for n in 0..300 {
        let request =
            serde_json::json!({"id": format!("f{n}"), "method": "no_such_method", "params": {}});
        drop(terminal.client.try_publish(
            &bundle.topics.rpc_req,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&request).unwrap(),
        ));
    }
    s.gw.metric_reaches(
        r#"posgate_rpc_requests_total{method="any",outcome="rate_limited"}"#,
        100.0,
        Duration::from_secs(10),
    )
    .await;
    // Cut, then back (the simulator reconnects by itself and subscribes again).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut cut = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match terminal.next_seen(left).await {
            Some(Seen::Disconnected(_)) => cut = true,
            Some(Seen::Connected) if cut => break,
            Some(_) => {}
            None => panic!("the flooding terminal's session was not cut (cut: {cut})"),
        }
    }
    let dropped = terminal
        .rpc(
            "during",
            "no_such_method",
            serde_json::json!({}),
            Duration::from_secs(1),
        )
        .await;
    assert!(
        dropped.is_err(),
        "a suspended terminal's RPC was answered: {dropped:?}"
    );
    // Answered again once the suspension is over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    let reply = loop {
        n += 1;
        let asked = terminal
            .rpc(
                &format!("after{n}"),
                "no_such_method",
                serde_json::json!({}),
                Duration::from_secs(1),
            )
            .await;
        match asked {
            Ok(reply) => break reply,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "never answered again: {e:#}"
            ),
        }
    };
    assert_eq!(reply.error.unwrap().code, "unknown_method");
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// The broker restarted under a running posgate (Mosquitto keeps nothing: `persistence false`):
/// posgate reconnects by itself, and the terminal's `online` after its own reconnect makes posgate
/// publish its pending confirmation again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_pending_confirmation() {
    let s = setup().await;
    let bundle = s.gw.provision("pos_ext_restart").await;
    s.gw.pay("pos_ext_restart", "pi_ext_restart").await;
    // The confirmation is at the broker (retained): read it, without acking, as the terminal
    // (once the broker's ACL names it).
    let topic = eventually(Duration::from_secs(10), || async {
        let (peek, mut eventloop) = raw(s.broker.addr, &bundle, "pos_ext_restart").await;
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
        got
    })
    .await;
    assert!(topic.ends_with("/payments/pi_ext_restart"), "{topic}");
    let broker_dir = s._broker_dir;
    let addr = s.broker.stop().await;
    eventually(Duration::from_secs(10), || async {
        (s.gw.metric("posgate_external_broker_connected").await == Some(0.0)).then_some(())
    })
    .await;
    let data_dir = s.gw.data_dir.path().to_owned();
    let broker = start_mosquitto(&data_dir, broker_dir.path(), Some(addr)).await;
    s.gw.metric_reaches(
        "posgate_external_broker_connected",
        1.0,
        Duration::from_secs(40),
    )
    .await;
    let mut terminal = connect(broker.addr, &bundle).await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e}\nmosquitto:\n{}", broker.log.lock().unwrap()));
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_ext_restart", 1));
    terminal.disconnect().await;
    s.gw.shutdown().await;
}

/// posgate killed (SIGKILL) with a confirmation pending, and the broker restarted meanwhile
/// (Mosquitto keeps nothing: `persistence false`): after posgate's restart the terminal gets it,
/// from the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_posgate_and_a_broker_restart_lose_no_pending_confirmation() {
    let data_dir = tempfile::tempdir().unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = start_mosquitto(data_dir.path(), broker_dir.path(), None).await;
    let env = external_env(&broker, broker_dir.path());
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut daemon = crash::start_daemon_env(data_dir.path(), None, Listen::any(), &pairs).await;
    assert_eq!(daemon.mqtt, broker.addr);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let bundle = daemon.provision(&http, "pos_ext_kill").await;
    let intent = Intent::new("pi_ext_kill", MicroUsdc(4_500_000), "pos_ext_kill");
    let body = events::intent_event("evt_ext_kill", "confirmed", &intent);
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let status = signed_post(&http, &url, SECRET, body)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();
    // The broker forgets the retained confirmation posgate may have published before the kill.
    let addr = broker.stop().await;
    let broker = start_mosquitto(data_dir.path(), broker_dir.path(), Some(addr)).await;
    let env = external_env(&broker, broker_dir.path());
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = crash::start_daemon_env(data_dir.path(), None, Listen::any(), &pairs).await;
    let mut terminal = connect(broker.addr, &bundle).await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nposgate:\n{}\nmosquitto:\n{}",
                daemon.log.lock().unwrap(),
                broker.log.lock().unwrap()
            )
        });
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_ext_kill", 1));
    terminal.disconnect().await;
    crash::sigterm(&daemon).await;
    drop(broker);
}

/// The configuration as `check-config` sees it: the external keys are validated.
#[tokio::test]
async fn check_config_validates_the_external_broker_keys() {
    let dir = tempfile::tempdir().unwrap();
    let run = |pairs: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_posgate-under-test"));
        command
            .env_clear()
            .env("POSGATE__DATA_DIR", dir.path())
            .arg("check-config")
            .envs(pairs.iter().copied());
        command.output().unwrap()
    };
    let bad = run(&[
        ("POSGATE__MQTT__MODE", "cluster"),
        ("POSGATE__MQTT__EXTERNAL_URL", "http://broker:1883"),
        ("POSGATE__MQTT__EXTERNAL_CLIENT_ID", "has space"),
    ]);
    assert_eq!(bad.status.code(), Some(64));
    let text = String::from_utf8_lossy(&bad.stderr);
    for key in ["mqtt.mode", "mqtt.external_url", "mqtt.external_client_id"] {
        assert!(text.contains(key), "{key} not reported:\n{text}");
    }
    let missing = run(&[("POSGATE__MQTT__MODE", "external")]);
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("mqtt.external_url"));
    let good = run(&[
        ("POSGATE__MQTT__MODE", "external"),
        ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://broker.example:8883"),
        (
            "POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND",
            "systemctl,reload,mosquitto",
        ),
    ]);
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let warned = String::from_utf8_lossy(&good.stderr);
    assert!(warned.contains("mqtt.external_broker_dir"), "{warned}");
    let plain = run(&[
        ("POSGATE__MQTT__MODE", "external"),
        ("POSGATE__MQTT__EXTERNAL_URL", "mqtt://127.0.0.1:1883"),
        ("POSGATE__MQTT__EXTERNAL_BROKER_DIR", "/tmp"),
    ]);
    assert_eq!(plain.status.code(), Some(0));
    let warned = String::from_utf8_lossy(&plain.stderr);
    assert!(warned.contains("plaintext"), "{warned}");
}
