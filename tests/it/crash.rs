//! Crash safety: the real `posgate` process, killed with SIGKILL under load, loses nothing that it
//! answered `200` for.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_sim::bench::find_addr;
use posgate_sim::events::{self, Intent};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use posgate_sim::terminal::{Seen, Terminal};

use crate::harness::{self, SECRET, signed_post, status_json};

const TOKEN: &str = "crash-test-admin-token";

/// A `posgate` process with its addresses, read from its startup log.
pub struct Daemon {
    pub child: Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Registers a terminal through the admin API; its provisioning bundle.
    pub async fn provision(
        &self,
        http: &reqwest::Client,
        id: &str,
    ) -> posgate_sim::terminal::Bundle {
        let response = http
            .post(format!("http://{}/v1/terminals", self.admin))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"id": id, "merchant_id": "mer_test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }
}

/// Where a daemon listens: any free port for a first start, the same addresses again for a
/// restart as systemd does it.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
}

impl Listen {
    /// Port 0 everywhere on loopback.
    pub fn any() -> Listen {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Listen {
            ingress: any,
            admin: any,
            mqtt: any,
        }
    }
}

impl Daemon {
    /// The addresses it bound, for a restart on the same ports.
    pub fn listen(&self) -> Listen {
        Listen {
            ingress: self.ingress,
            admin: self.admin,
            mqtt: self.mqtt,
        }
    }
}

pub async fn start_daemon(data_dir: &Path) -> Daemon {
    start_daemon_at(data_dir, None, Listen::any()).await
}

/// With `config`, the webhook secrets come from that file (`--config`), not the environment.
pub async fn start_daemon_with(data_dir: &Path, config: Option<&Path>) -> Daemon {
    start_daemon_at(data_dir, config, Listen::any()).await
}

/// Starts `posgate run` on `listen`; panics with its output if it exits before listening.
pub async fn start_daemon_at(data_dir: &Path, config: Option<&Path>, listen: Listen) -> Daemon {
    start_daemon_env(data_dir, config, listen, &[]).await
}

/// As [`start_daemon_at`], with more `POSGATE__…` variables in its environment.
pub async fn start_daemon_env(
    data_dir: &Path,
    config: Option<&Path>,
    listen: Listen,
    env: &[(&str, &str)],
) -> Daemon {
    let mut command = Command::new(env!("CARGO_BIN_EXE_posgate-under-test"));
    command.env_clear().envs(env.iter().copied());
    command
        .env("POSGATE__DATA_DIR", data_dir)
        .env("POSGATE__INGRESS__LISTEN", listen.ingress.to_string())
        .env("POSGATE__ADMIN__LISTEN", listen.admin.to_string())
        .env("POSGATE__MQTT__LISTEN", listen.mqtt.to_string())
        .env("POSGATE__ADMIN__TOKEN", TOKEN);
    match config {
        Some(file) => command.arg("run").arg("--config").arg(file),
        None => command.env("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET),
    };
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(String::new()));
    harness::keep_reading(
        BufReader::new(child.stderr.take().unwrap()).lines(),
        log.clone(),
    );
    let (mut ingress, mut admin, mut mqtt) = (None, None, None);
    while ingress.is_none() || admin.is_none() || mqtt.is_none() {
        let Some(line) = lines.next_line().await.unwrap() else {
            let status = child.wait().await.unwrap();
            panic!(
                "posgate exited ({status}) before listening on {listen:?}:\n{}",
                log.lock().unwrap()
            );
        };
        ingress = ingress.or_else(|| find_addr(&line, "ingress_addr="));
        admin = admin.or_else(|| find_addr(&line, "admin_addr="));
        mqtt = mqtt.or_else(|| find_addr(&line, "mqtt_addr="));
        log.lock().unwrap().push_str(&line);
    }
    harness::keep_reading(lines, log.clone());
    Daemon {
        child,
        ingress: ingress.unwrap(),
        admin: admin.unwrap(),
        mqtt: mqtt.unwrap(),
        log,
    }
}

fn body_for(sender: usize, n: usize) -> (String, String) {
    let pi = format!("pi_crash_{sender}_{n}");
    let intent = Intent::new(
        &pi,
        MicroUsdc(1_000_000 + n as u64),
        &format!("pos-{sender}"),
    );
    (
        pi,
        events::intent_event(&format!("evt_crash_{sender}_{n}"), "confirmed", &intent),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon(dir.path()).await;
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);

    // Eight concurrent senders until the process dies under them.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let (enough_tx, enough_rx) = tokio::sync::watch::channel(0usize);
    let senders: Vec<_> = (0..8)
        .map(|sender| {
            let (url, acked, enough_tx) = (url.clone(), acked.clone(), enough_tx.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                for n in 0.. {
                    let (pi, body) = body_for(sender, n);
                    match signed_post(&http, &url, SECRET, body.clone()).send().await {
                        Ok(r) if r.status() == 200 => {
                            let mut acked = acked.lock().unwrap();
                            acked.push((pi, body));
                            enough_tx.send_replace(acked.len());
                        }
                        Ok(r) => panic!("unexpected answer {} before the kill", r.status()),
                        Err(_) => return, // the daemon is gone
                    }
                }
            })
        })
        .collect();
    let mut enough = enough_rx;
    enough.wait_for(|n| *n >= 400).await.unwrap();
    daemon.child.start_kill().unwrap(); // SIGKILL
    let status = daemon.child.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 400);

    // Same data dir: every acknowledged event is there, and sending it again is a duplicate.
    let daemon = start_daemon(dir.path()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    for (pi, body) in &acked {
        let view = http
            .get(format!("http://{}/v1/payment-intents/{pi}", daemon.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let (status, view) = status_json(view).await;
        assert_eq!(
            (status, view["status"].as_str()),
            (200, Some("confirmed")),
            "{pi} lost: {view}"
        );
        let (status, answer) = status_json(
            signed_post(&http, &url, SECRET, body.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, &answer["duplicate"]),
            (200, &serde_json::Value::Bool(true)),
            "{pi}"
        );
    }
    sigterm(&daemon).await;
}

/// SIGTERM: exit 0 after closing the store.
pub async fn sigterm(daemon: &Daemon) {
    harness::signal(&daemon.child, "TERM");
}

#[tokio::test]
async fn sigterm_stops_cleanly_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon(dir.path()).await;
    sigterm(&daemon).await;
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Let the drain task read the last lines.
    let mut tries = 0;
    while !daemon.log.lock().unwrap().contains("store closed") && tries < 100 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        tries += 1;
    }
    assert!(
        daemon.log.lock().unwrap().contains("store closed"),
        "{}",
        daemon.log.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_200_before_the_ack_still_delivers_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon(dir.path()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let bundle = daemon.provision(&http, "pos_crash").await;
    // The terminal is offline: nobody can ack before the kill.
    let intent = Intent::new("pi_crash_ack", MicroUsdc(4_500_000), "pos_crash");
    let body = events::intent_event("evt_crash_ack", "confirmed", &intent);
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    assert_eq!(
        signed_post(&http, &url, SECRET, body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();

    let daemon = start_daemon(dir.path()).await;
    let mut terminal = posgate_sim::terminal::Terminal::connect(bundle, daemon.mqtt)
        .await
        .unwrap();
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_crash_ack", 1));
    sigterm(&daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_webhook_secrets_without_dropping_terminals() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("posgate.toml");
    std::fs::write(&config, "[provider]\nwebhook_secrets = [\"whsec_old\"]\n").unwrap();
    let daemon = start_daemon_with(&dir.path().join("data"), Some(&config)).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let bundle = daemon.provision(&http, "pos_hup").await;
    let mut terminal = posgate_sim::terminal::Terminal::connect(bundle, daemon.mqtt)
        .await
        .unwrap();
    let send = |secret: &'static str, n: u32| {
        let (http, url) = (
            http.clone(),
            format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH),
        );
        async move {
            let intent = Intent::new(&format!("pi_hup_{n}"), MicroUsdc(1_000_000), "pos_hup");
            let body = events::intent_event(&format!("evt_hup_{n}"), "confirmed", &intent);
            signed_post(&http, &url, secret, body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send("whsec_new", 1).await, 401);
    // Rotation, step 1: add the new secret, reload.
    std::fs::write(
        &config,
        "[provider]\nwebhook_secrets = [\"whsec_new\", \"whsec_old\"]\n",
    )
    .unwrap();
    harness::signal(&daemon.child, "HUP");
    let mut n = 2;
    crate::harness::eventually(Duration::from_secs(10), || {
        n += 1;
        let attempt = send("whsec_new", n);
        async move { (attempt.await == 200).then_some(()) }
    })
    .await;
    assert_eq!(
        send("whsec_old", 100).await,
        200,
        "the old secret still works during the overlap"
    );
    // A bad config is refused at reload, and nothing changes.
    std::fs::write(&config, "[provider]\nwebhook_secrets = 7\n").unwrap();
    harness::signal(&daemon.child, "HUP");
    assert_eq!(send("whsec_old", 101).await, 200);
    // The terminal's session survived the reloads: it gets its confirmations without reconnecting.
    let mut got = Vec::new();
    while got.len() < 3 {
        match terminal
            .next_seen(Duration::from_secs(10))
            .await
            .expect("confirmations keep coming")
        {
            posgate_sim::terminal::Seen::Confirmation(c) => got.push(c.intent_id),
            posgate_sim::terminal::Seen::Disconnected(why) => {
                panic!("the terminal was dropped: {why}")
            }
            _ => {}
        }
    }
    sigterm(&daemon).await;
}

/// `n` terminals provisioned on `daemon` and connected over MQTT/TLS.
pub async fn connect_terminals(
    daemon: &Daemon,
    http: &reqwest::Client,
    prefix: &str,
    n: usize,
) -> Vec<Terminal> {
    let mut terminals = Vec::with_capacity(n);
    for i in 0..n {
        let bundle = daemon.provision(http, &format!("{prefix}_{i}")).await;
        terminals.push(Terminal::connect(bundle, daemon.mqtt).await.unwrap());
    }
    terminals
}

/// Waits until `terminal` reports `wanted` (`Disconnected` or `Connected`), for at most 20 s.
pub async fn wait_for(terminal: &mut Terminal, connected: bool) {
    loop {
        match terminal.next_seen(Duration::from_secs(20)).await {
            Some(Seen::Connected) if connected => return,
            Some(Seen::Disconnected(_)) if !connected => return,
            Some(_) => {}
            None => panic!(
                "{}: not {} within 20 s",
                terminal.bundle.terminal_id,
                if connected {
                    "reconnected"
                } else {
                    "disconnected"
                }
            ),
        }
    }
}

/// Each terminal gets a confirmation of a new payment from `daemon`.
async fn each_is_served(
    daemon: &Daemon,
    http: &reqwest::Client,
    terminals: &mut [Terminal],
    round: &str,
) {
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    for terminal in terminals.iter() {
        let id = &terminal.bundle.terminal_id;
        let intent = Intent::new(&format!("pi_{round}_{id}"), MicroUsdc(2_000_000), id);
        let body = events::intent_event(&format!("evt_{round}_{id}"), "confirmed", &intent);
        let response = signed_post(http, &url, SECRET, body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    for terminal in terminals.iter_mut() {
        let c = terminal
            .next_confirmation(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            c.intent_id,
            format!("pi_{round}_{}", terminal.bundle.terminal_id)
        );
    }
}

/// Once every terminal has seen its connection end and closed its side (a plain FIN, so the
/// stopped process's side of each waits in TIME_WAIT on the MQTT port), starts the daemon again on
/// `listen` and waits until every terminal is back.
async fn restart_on(data_dir: &Path, listen: Listen, terminals: &mut [Terminal]) -> Daemon {
    for terminal in terminals.iter_mut() {
        wait_for(terminal, false).await;
    }
    let daemon = start_daemon_at(data_dir, None, listen).await;
    for terminal in terminals.iter_mut() {
        wait_for(terminal, true).await;
    }
    daemon
}

/// What systemd does after a crash: the same ports and data dir, at once. The killed process's
/// connections (terminals, and the HTTP client's kept-alive one) wait in TIME_WAIT on the
/// listening ports once the peers have closed their side; the new process binds anyway, takes the
/// terminals back and serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_terminals_connected_restarts_on_the_same_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon(dir.path()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut terminals = connect_terminals(&daemon, &http, "pos_kill", 20).await;
    each_is_served(&daemon, &http, &mut terminals, "before").await;
    let listen = daemon.listen();

    daemon.child.start_kill().unwrap(); // SIGKILL
    daemon.child.wait().await.unwrap();
    let daemon = restart_on(dir.path(), listen, &mut terminals).await;
    each_is_served(&daemon, &http, &mut terminals, "after").await;
    sigterm(&daemon).await;
}

/// A clean stop closes the terminals' connections from the server side, so the TIME_WAIT sockets
/// are the stopped process's own: a start on the same ports right after must still bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_terminals_connected_restarts_on_the_same_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon(dir.path()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut terminals = connect_terminals(&daemon, &http, "pos_term", 10).await;
    let listen = daemon.listen();

    sigterm(&daemon).await;
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let daemon = restart_on(dir.path(), listen, &mut terminals).await;
    each_is_served(&daemon, &http, &mut terminals, "after_term").await;
    sigterm(&daemon).await;
}

/// SIGHUP applies the log level (a debug line appears that did not before), and names every
/// other changed key as needing a restart instead of ignoring it silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_log_level_and_names_keys_that_need_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("posgate.toml");
    let base = "[provider]\nwebhook_secrets = [\"whsec_hup\"]\n";
    std::fs::write(&config, format!("{base}[log]\nlevel = \"info\"\n")).unwrap();
    let daemon = start_daemon_with(&dir.path().join("data"), Some(&config)).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let post = |n: u32| {
        let intent = Intent::new("pi_lvl", MicroUsdc(1_000_000), "pos_lvl");
        let body = events::intent_event(&format!("evt_lvl_{n}"), "confirmed", &intent);
        signed_post(&http, &url, "whsec_hup", body).send()
    };
    // A duplicate is logged at debug level only.
    assert_eq!(post(1).await.unwrap().status(), 200);
    assert_eq!(post(1).await.unwrap().status(), 200);
    std::fs::write(
        &config,
        format!(
            "{base}[log]\nlevel = \"posgate=debug,info\"\n[ingress]\nbody_limit_bytes = 4096\n"
        ),
    )
    .unwrap();
    harness::signal(&daemon.child, "HUP");
    harness::eventually(Duration::from_secs(10), || async {
        daemon
            .log
            .lock()
            .unwrap()
            .contains("take effect only after a restart")
            .then_some(())
    })
    .await;
    assert_eq!(post(1).await.unwrap().status(), 200);
    harness::eventually(Duration::from_secs(10), || async {
        let log = daemon.log.lock().unwrap();
        log.contains("duplicate webhook").then_some(())
    })
    .await;
    let log = daemon.log.lock().unwrap().clone();
    assert_eq!(
        log.matches("duplicate webhook").count(),
        1,
        "only the duplicate after the reload is logged at debug:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("take effect only after a restart"))
        .unwrap();
    assert!(
        line.contains("ingress.body_limit_bytes") && !line.contains("log.level"),
        "{line}"
    );
    sigterm(&daemon).await;
}

/// An admin listener off loopback is served (an operator may have a reason) but warned about at
/// start: its token and the terminals' bundles would cross the network in clear text.
#[tokio::test]
async fn an_admin_listener_off_loopback_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let listen = Listen {
        admin: "0.0.0.0:0".parse().unwrap(),
        ..Listen::any()
    };
    let daemon = start_daemon_at(dir.path(), None, listen).await;
    harness::eventually(Duration::from_secs(10), || async {
        daemon
            .log
            .lock()
            .unwrap()
            .contains("admin.listen is not on loopback")
            .then_some(())
    })
    .await;
    sigterm(&daemon).await;
}

/// A flood of bad signatures writes a log line a second, not a line each (journald's rate limit
/// would then drop the lines that matter); the metric counts every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_webhooks_is_logged_once_a_second_and_counted_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let started = tokio::time::Instant::now();
    for n in 0..300 {
        let (_, body) = body_for(0, n);
        let response = signed_post(&http, &url, "whsec_wrong", body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let metrics = http
        .get(format!("http://{}/metrics", daemon.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        harness::sample(
            &metrics,
            r#"posgate_webhooks_total{event_type="none",outcome="bad_signature"}"#
        ),
        Some(300.0)
    );
    let lines = daemon
        .log
        .lock()
        .unwrap()
        .matches("webhook refused")
        .count() as u64;
    assert!(
        (1..=seconds + 1).contains(&lines),
        "{lines} lines in about {seconds} s"
    );
    sigterm(&daemon).await;
}
