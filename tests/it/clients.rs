//! The reference terminals in `clients/` (Python, C) as a terminal developer runs them: a
//! subprocess with a provisioning bundle from the admin API, against the real gateway and the
//! provider simulator; and each one against the confirmation test vectors.
//!
//! What they need is installed by `.ci/run`: a venv at `target/clients-venv` with
//! `clients/python/requirements.txt`, and the Debian packages `libmosquitto-dev`, `libsodium-dev`,
//! `libjansson-dev` and `pkg-config` for `cc`. A missing one fails the test with what to install.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate_sim::provider::Faults;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::{JoinHandle, JoinSet};

use crate::harness::{self, TestGateway, eventually, keep_reading};

const SECRET: &str = "whsec_it_clients";
const WAIT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vectors_path() -> PathBuf {
    repo().join("proto/testdata/confirmation-vectors.json")
}

/// One of the reference clients, ready to run.
struct Program {
    argv: Vec<PathBuf>,
    /// Holds the C binary.
    _dir: Option<TempDir>,
}

impl Program {
    /// `clients/python/posgate_terminal.py` under the venv's Python (`POSGATE_CLIENT_PYTHON`
    /// overrides which Python).
    fn python() -> Program {
        let python = std::env::var_os("POSGATE_CLIENT_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/clients-venv/bin/python3"));
        let imports = std::process::Command::new(&python)
            .args(["-c", "import paho.mqtt.client, cryptography"])
            .output();
        match imports {
            Ok(out) if out.status.success() => {}
            other => panic!(
                "{} cannot import paho-mqtt and cryptography ({other:?}); install them as .ci/run \
                 does: python3 -m venv target/clients-venv && target/clients-venv/bin/pip install \
                 -r clients/python/requirements.txt",
                python.display()
            ),
        }
        Program {
            argv: vec![python, repo().join("clients/python/posgate_terminal.py")],
            _dir: None,
        }
    }

    /// `clients/c/posgate_terminal.c` built by `cc`, as its header comment says.
    fn c() -> Program {
        let libs = ["libmosquitto", "libsodium", "jansson"];
        let flags = std::process::Command::new("pkg-config")
            .args(["--cflags", "--libs"])
            .args(libs)
            .output();
        let flags = match flags {
            Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
            other => panic!(
                "pkg-config does not find {libs:?} ({other:?}); install the Debian packages \
                 libmosquitto-dev libsodium-dev libjansson-dev pkg-config, as .ci/run does"
            ),
        };
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("posgate-terminal");
        let out = std::process::Command::new("cc")
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-o"])
            .arg(&binary)
            .arg(repo().join("clients/c/posgate_terminal.c"))
            .args(flags.split_whitespace())
            .output()
            .unwrap_or_else(|e| panic!("cc: {e}; install a C compiler (Debian gcc)"));
        assert!(
            out.status.success(),
            "cc failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Program {
            argv: vec![binary],
            _dir: Some(dir),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.argv[0]);
        command.args(&self.argv[1..]);
        command
    }
}

/// A running client: its stdout lines as they come.
struct Client {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Client {
    fn spawn(program: &Program, bundle: &Path, state: &Path, mqtt: Option<SocketAddr>) -> Client {
        Client::spawn_with(program, bundle, state, mqtt, &[])
    }

    fn spawn_with(
        program: &Program,
        bundle: &Path,
        state: &Path,
        mqtt: Option<SocketAddr>,
        extra: &[&str],
    ) -> Client {
        let mut command = program.command();
        command.args(extra);
        // Where the clients put the PEM files their TLS library wants (removed at exit, but a
        // SIGKILL leaves them): the test's own directory.
        command.env("TMPDIR", bundle.parent().unwrap());
        command
            .arg("--bundle")
            .arg(bundle)
            .arg("--state")
            .arg(state);
        if let Some(addr) = mqtt {
            command.arg("--mqtt").arg(addr.to_string());
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (out, err) = (Arc::default(), Arc::default());
        keep_reading(
            BufReader::new(child.stdout.take().unwrap()).lines(),
            Arc::clone(&out),
        );
        keep_reading(
            BufReader::new(child.stderr.take().unwrap()).lines(),
            Arc::clone(&err),
        );
        Client { child, out, err }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}stderr:\n{}",
            self.out.lock().unwrap(),
            self.err.lock().unwrap()
        )
    }

    /// Waits for the line `line` on stdout.
    async fn wait_for(&self, line: &str) {
        self.wait_line(line, |l| l == line).await;
    }

    /// Waits for a line starting with `prefix` on stdout.
    async fn wait_for_prefix(&self, prefix: &str) {
        self.wait_line(prefix, |l| l.starts_with(prefix)).await;
    }

    async fn wait_line(&self, what: &str, matches: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.out.lock().unwrap().lines().any(&matches) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line {what:?} within {WAIT:?}; {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every `SHOW` line: what the cashier saw, in order.
    fn shown(&self) -> Vec<String> {
        self.out
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("SHOW "))
            .map(str::to_owned)
            .collect()
    }
}

/// A TCP relay in front of the broker that can start losing everything the terminal sends while
/// what the gateway sends still arrives: the ack of a confirmation the terminal has shown is lost
/// on the way, as on a network that fails at the wrong moment.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let uplink_cut = Arc::clone(&cut);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let cut = Arc::clone(&uplink_cut);
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let down = tokio::io::copy(&mut server_read, &mut client_write);
                    let up = async {
                        let mut buf = vec![0; 16 * 1024];
                        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                            if !cut.load(Ordering::SeqCst)
                                && server_write.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = down => {}
                        () = up => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }

    /// From now on, what the terminal sends is read and dropped.
    fn cut_uplink(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Provisions `id` through the admin API and writes its bundle, as an installer would.
async fn provision(gw: &TestGateway, id: &str, path: &Path) -> Value {
    let response = gw
        .admin_post(
            "/v1/terminals",
            json!({"id": id, "merchant_id": "mer_test"}),
        )
        .await;
    let (status, bundle) = harness::status_json(response).await;
    assert_eq!(status, 201, "{bundle}");
    std::fs::write(path, bundle.to_string()).unwrap();
    bundle
}

/// The cashier starts a 4.40 payment over the terminal's HTTP API; returns the intent id.
async fn create_intent(gw: &TestGateway, token: &str, n: u32) -> String {
    let response = gw
        .http
        .post(format!("http://{}/v1/terminal/payment-intents", gw.ingress))
        .bearer_auth(token)
        .json(&json!({"request_id": format!("req-{n}"), "amount": "4.40", "order_id": format!("ord-{n}")}))
        .send()
        .await
        .unwrap();
    let (status, body) = harness::status_json(response).await;
    assert_eq!(status, 201, "{body}");
    body["intent_id"].as_str().unwrap().to_owned()
}

async fn pending(gw: &TestGateway, id: &str) -> u64 {
    gw.terminal_view(id).await["pending"].as_u64().unwrap()
}

fn state(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Payments queued while the terminal was off arrive, each shown once and in `seq` order and
/// acked; then an ack lost on the way, a power cut and a restart: the confirmation comes again
/// and is acked but not shown again (the state file), and the next payment still arrives; SIGTERM
/// says offline and exits 0.
async fn pays_shows_once_acks_and_remembers(program: Program, id: &str) {
    let (gw, sim) = harness::spawn_with_provider(SECRET, Faults::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (bundle_path, state_path) = (dir.path().join("bundle.json"), dir.path().join("state"));
    let bundle = provision(&gw, id, &bundle_path).await;
    let token = bundle["http_token"].as_str().unwrap();

    // Three customers pay while the terminal is off (the cashier used the HTTP API).
    let mut orders = HashMap::new();
    for n in 1..=3 {
        let intent = create_intent(&gw, token, n).await;
        sim.pay(&intent, None, false).unwrap();
        orders.insert(intent, n);
    }
    eventually(WAIT, || async {
        (pending(&gw, id).await == 3).then_some(())
    })
    .await;
    let relay = Relay::start(gw.mqtt).await;
    let first = Client::spawn(&program, &bundle_path, &state_path, Some(relay.addr));
    first.wait_for_prefix("ACKED seq=3 ").await;
    // In seq order, each once, each with its own payment's details, each acked.
    let shown = first.shown();
    assert_eq!(shown.len(), 3, "{}", first.output());
    for (line, seq) in shown.iter().zip(1..) {
        let intent = line
            .strip_prefix(&format!("SHOW PAID seq={seq} intent="))
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("{line:?} is not seq {seq}; {}", first.output()));
        let n = orders[intent];
        assert_eq!(
            line,
            &format!("SHOW PAID seq={seq} intent={intent} amount=4.40 usd order=ord-{n}")
        );
        first
            .wait_for(&format!("ACKED seq={seq} intent={intent}"))
            .await;
    }
    // The gateway has every ack: nothing pending, three acks counted.
    eventually(WAIT, || async {
        (pending(&gw, id).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        gw.metric("posgate_confirmations_acked_total").await,
        Some(3.0)
    );
    assert_eq!(
        state(&state_path),
        Some(json!({"terminal_id": id, "last_shown_seq": 3}))
    );

    // The terminal's packets are lost from here: it shows seq 4 and saves it, but its ack never
    // reaches the gateway. Then the power goes (SIGKILL).
    relay.cut_uplink();
    let lost = create_intent(&gw, token, 4).await;
    sim.pay(&lost, None, false).unwrap();
    first
        .wait_for(&format!(
            "SHOW PAID seq=4 intent={lost} amount=4.40 usd order=ord-4"
        ))
        .await;
    eventually(WAIT, || async {
        (state(&state_path)? == json!({"terminal_id": id, "last_shown_seq": 4})).then_some(())
    })
    .await;
    assert_eq!(pending(&gw, id).await, 1, "the ack must not have arrived");
    let mut first = first;
    first.child.kill().await.unwrap();
    drop(relay);

    // After the restart (straight to the bundle's mqtt_url) the gateway sends seq 4 again: acked,
    // not shown. The next payment is shown.
    let second = Client::spawn(&program, &bundle_path, &state_path, None);
    second.wait_for(&format!("ACKED seq=4 intent={lost}")).await;
    second
        .wait_for(&format!("REPEAT seq=4 intent={lost}"))
        .await;
    eventually(WAIT, || async {
        (pending(&gw, id).await == 0).then_some(())
    })
    .await;
    let next = create_intent(&gw, token, 5).await;
    sim.pay(&next, None, false).unwrap();
    second.wait_for(&format!("ACKED seq=5 intent={next}")).await;
    assert_eq!(
        second.shown(),
        [format!(
            "SHOW PAID seq=5 intent={next} amount=4.40 usd order=ord-5"
        )],
        "{}",
        second.output()
    );
    assert_eq!(
        gw.metric("posgate_confirmations_acked_total").await,
        Some(5.0)
    );

    // SIGTERM: the client says offline itself (a clean disconnect has no last will) and exits 0.
    let mut second = second;
    harness::signal(&second.child, "TERM");
    let status = tokio::time::timeout(WAIT, second.child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit within {WAIT:?} of SIGTERM; {}", second.output()))
        .unwrap();
    assert!(status.success(), "{status}; {}", second.output());
    eventually(WAIT, || async {
        (gw.terminal_view(id).await["online"] == false).then_some(())
    })
    .await;
    gw.shutdown().await;
}

/// The cashier starts a payment on the terminal itself (`--charge`: `create_intent` over MQTT
/// RPC), the customer pays, the terminal shows it; asked again after a reboot, the same order
/// gives the same intent, not a second one.
#[tokio::test]
async fn python_client_starts_a_payment_over_rpc_and_a_reboot_does_not_start_a_second() {
    // Time at a tenth: the intent's 300 s last 30 s, time enough for a reboot.
    let mut config = harness::sim_config(SECRET);
    config.time_scale = 0.1;
    let (gw, sim) = harness::spawn_with_sim(config, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (bundle_path, state_path) = (dir.path().join("bundle.json"), dir.path().join("state"));
    provision(&gw, "pos_charge", &bundle_path).await;
    let program = Program::python();
    let charge = ["--charge", "12.34", "--order", "ord-rpc"];
    let intent_line = |client: &Client| {
        let out = client.out.lock().unwrap();
        out.lines()
            .find_map(|l| l.strip_prefix("INTENT "))
            .map(|rest| rest.split(' ').next().unwrap().to_owned())
    };
    let first = Client::spawn_with(&program, &bundle_path, &state_path, None, &charge);
    first.wait_for_prefix("QR ethereum:").await;
    let intent = intent_line(&first).unwrap();
    let view = gw.intent(&intent).await.unwrap();
    assert_eq!(
        (view["terminal_id"].as_str(), view["order_id"].as_str()),
        (Some("pos_charge"), Some("ord-rpc"))
    );
    assert!(
        first
            .out
            .lock()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("QR ") && l.ends_with("uint256=12340000")),
        "{}",
        first.output()
    );
    // A reboot before the customer paid: the terminal asks again and gets the same intent.
    let mut first = first;
    first.child.kill().await.unwrap();
    let second = Client::spawn_with(&program, &bundle_path, &state_path, None, &charge);
    second.wait_for_prefix("QR ethereum:").await;
    assert_eq!(intent_line(&second).as_deref(), Some(intent.as_str()));
    assert_eq!(sim.stats().api.intents_created, 1);
    sim.pay(&intent, None, false).unwrap();
    second
        .wait_for(&format!(
            "SHOW PAID seq=1 intent={intent} amount=12.34 usd order=ord-rpc"
        ))
        .await;
    second
        .wait_for(&format!("ACKED seq=1 intent={intent}"))
        .await;
    gw.shutdown().await;
}

/// A terminal whose key never leaves it: the Python client makes its key and a certificate
/// request, the operator provisions the terminal from that request (the bundle has no key), and
/// the terminal connects with its own key and shows a payment.
#[tokio::test]
async fn python_client_provisioned_from_its_own_key_shows_a_payment() {
    let (gw, sim) = harness::spawn_with_provider(SECRET, Faults::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key.pem");
    let program = Program::python();
    let out = program
        .command()
        .arg("--new-key")
        .arg(&key_path)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr = String::from_utf8(out.stdout).unwrap();
    assert!(
        csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{csr}"
    );
    let response = gw
        .admin_post(
            "/v1/terminals",
            json!({"id": "pos_own_key", "merchant_id": "mer_test", "csr_pem": csr}),
        )
        .await;
    let (status, bundle) = harness::status_json(response).await;
    assert_eq!(status, 201, "{bundle}");
    assert!(
        bundle.get("key_pem").is_none(),
        "the key never travels: {bundle}"
    );
    let (bundle_path, state_path) = (dir.path().join("bundle.json"), dir.path().join("state"));
    std::fs::write(&bundle_path, bundle.to_string()).unwrap();
    // Without its key the client says what is missing.
    let mut keyless = Client::spawn(&program, &bundle_path, &state_path, None);
    let status = tokio::time::timeout(WAIT, keyless.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    let key = key_path.to_str().unwrap();
    let client = Client::spawn_with(&program, &bundle_path, &state_path, None, &["--key", key]);
    client.wait_for("READY pos_own_key").await;
    let token = bundle["http_token"].as_str().unwrap();
    let intent = create_intent(&gw, token, 1).await;
    sim.pay(&intent, None, false).unwrap();
    client
        .wait_for_prefix(&format!("SHOW PAID seq=1 intent={intent}"))
        .await;
    client
        .wait_for(&format!("ACKED seq=1 intent={intent}"))
        .await;
    gw.shutdown().await;
}

/// Every case of the test vectors gives what the file says: valid ones verify with the stated
/// payload, each invalid one is refused for its stated reason.
async fn passes_every_vector(program: Program) {
    let file: Value = serde_json::from_slice(&std::fs::read(vectors_path()).unwrap()).unwrap();
    let cases = file["cases"].as_array().unwrap();
    let out = program
        .command()
        .arg("--check-vectors")
        .arg(vectors_path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for case in cases {
        let line = format!(
            "pass {} ({})",
            case["name"].as_str().unwrap(),
            case["expect"].as_str().unwrap()
        );
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in\n{stdout}"
        );
    }
    assert_eq!(
        stdout.lines().last(),
        Some(format!("{} passed, 0 failed", cases.len()).as_str())
    );
}

#[tokio::test]
async fn python_client_passes_every_confirmation_vector() {
    passes_every_vector(Program::python()).await;
}

#[tokio::test]
async fn c_client_passes_every_confirmation_vector() {
    passes_every_vector(Program::c()).await;
}

#[tokio::test]
async fn python_client_shows_each_payment_once_acks_it_and_remembers_across_a_restart() {
    pays_shows_once_acks_and_remembers(Program::python(), "pos_py").await;
}

#[tokio::test]
async fn c_client_shows_each_payment_once_acks_it_and_remembers_across_a_restart() {
    pays_shows_once_acks_and_remembers(Program::c(), "pos_c").await;
}
