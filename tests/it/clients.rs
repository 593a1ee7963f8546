//! The reference terminals in `clients/` (Python, C, JVM) as a terminal developer runs them: a
//! subprocess with a provisioning bundle from the admin API, against the real gateway and the
//! provider simulator; and each one against the confirmation test vectors.
//!
//! What they need is installed by `.ci/run`: a venv at `target/clients-venv` with
//! `clients/python/requirements.txt`, and the Debian packages `libmosquitto-dev`, `libsodium-dev`,
//! `libjansson-dev`, `libssl-dev` and `pkg-config` for `cc`, and `default-jdk-headless`,
//! `libmqtt-client-java` and `libgoogle-gson-java` for `javac`. A missing one fails the test with
//! what to install.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posgate_sim::provider::Faults;
use posgate_sim::terminal::{Bundle, Identity};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::{JoinHandle, JoinSet};

use crate::harness::{self, TestGateway, eventually, keep_reading};

const SECRET: &str = "whsec_it_clients";
const WAIT: Duration = Duration::from_secs(20);
/// The JVM client's libraries, from Debian's libmqtt-client-java (with hawtdispatch and hawtbuf)
/// and libgoogle-gson-java.
const JVM_JARS: [&str; 5] = [
    "mqtt-client.jar",
    "hawtdispatch-transport.jar",
    "hawtdispatch.jar",
    "hawtbuf.jar",
    "gson.jar",
];

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
    /// Whether the client makes its own key and certificate request (`--new-key`); the JVM one
    /// leaves that to the platform's keystore.
    makes_keys: bool,
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
            makes_keys: true,
        }
    }

    /// `clients/c/posgate_terminal.c` built by `cc`, as its header comment says.
    fn c() -> Program {
        let libs = ["libmosquitto", "libsodium", "jansson", "libcrypto"];
        let flags = std::process::Command::new("pkg-config")
            .args(["--cflags", "--libs"])
            .args(libs)
            .output();
        let flags = match flags {
            Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
            other => panic!(
                "pkg-config does not find {libs:?} ({other:?}); install the Debian packages \
                 libmosquitto-dev libsodium-dev libjansson-dev libssl-dev pkg-config, as .ci/run \
                 does"
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
            makes_keys: true,
        }
    }

    /// `clients/jvm/` compiled by `javac` against the Debian packages' jars in /usr/share/java,
    /// as its README says.
    fn jvm() -> Program {
        let jars: Vec<PathBuf> = JVM_JARS
            .iter()
            .map(|jar| Path::new("/usr/share/java").join(jar))
            .collect();
        if let Some(missing) = jars.iter().find(|jar| !jar.exists()) {
            panic!(
                "{} is missing; install the Debian packages default-jdk-headless \
                 libmqtt-client-java libgoogle-gson-java, as .ci/run does",
                missing.display()
            );
        }
        let sources: Vec<PathBuf> =
            std::fs::read_dir(repo().join("clients/jvm/src/posgate/terminal"))
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "java"))
                .collect();
        // Compiled once per version of the sources, not once per test (javac takes seconds).
        let mut hasher = std::hash::DefaultHasher::new();
        for source in &sources {
            std::hash::Hash::hash(&(source, std::fs::read(source).unwrap()), &mut hasher);
        }
        let classes = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "jvm-client-{:016x}",
            std::hash::Hasher::finish(&hasher)
        ));
        let classpath = std::env::join_paths(&jars).unwrap();
        if !classes.exists() {
            let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let out = std::process::Command::new("javac")
                .args(["-Xlint:all", "-Werror", "--release", "17", "-d"])
                .arg(scratch.path())
                .arg("-cp")
                .arg(&classpath)
                .args(&sources)
                .output()
                .unwrap_or_else(|e| {
                    panic!("javac: {e}; install the Debian package default-jdk-headless")
                });
            assert!(
                out.status.success(),
                "javac failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Another test may have got there first: its classes are the same.
            let compiled = scratch.keep();
            if std::fs::rename(&compiled, &classes).is_err() {
                let _ = std::fs::remove_dir_all(&compiled);
            }
        }
        let classpath = std::env::join_paths(std::iter::once(classes).chain(jars)).unwrap();
        Program {
            argv: vec![
                "java".into(),
                // A quicker start on a busy machine (C1 only, serial GC); a terminal that runs
                // for days keeps the defaults.
                "-XX:TieredStopAtLevel=1".into(),
                "-XX:+UseSerialGC".into(),
                "-cp".into(),
                classpath.into(),
                "posgate.terminal.Terminal".into(),
            ],
            _dir: None,
            makes_keys: false,
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

/// Runs `--new-key path` and returns the certificate request it printed, after checking what it
/// left on disk: a PKCS#8 private key readable by its owner only, and nothing secret in the
/// request. Asked again for the same path, it refuses and keeps the key.
async fn new_key(program: &Program, path: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;

    let out = program
        .command()
        .arg("--new-key")
        .arg(path)
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
        csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n")
            && csr.ends_with("-----END CERTIFICATE REQUEST-----\n")
            && !csr.contains("PRIVATE"),
        "{csr}"
    );
    let key = std::fs::read_to_string(path).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key}");
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is {mode:o}, not 0600");
    let again = program
        .command()
        .arg("--new-key")
        .arg(path)
        .output()
        .await
        .unwrap();
    assert!(!again.status.success(), "--new-key replaced {path:?}");
    assert_eq!(std::fs::read_to_string(path).unwrap(), key);
    csr
}

/// A new key at `path` and a certificate request for it: made by the client (`--new-key`), or
/// for the JVM client as a keystore would (here rcgen), written as the PKCS#8 file its `--key`
/// reads.
async fn key_and_csr(program: &Program, path: &Path) -> String {
    if program.makes_keys {
        return new_key(program, path).await;
    }
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(path, key.serialize_pem()).unwrap();
    rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

/// Runs the client until it exits, which must be a failure that says `why` on stderr.
async fn refuses_to_start(
    program: &Program,
    bundle: &Path,
    state: &Path,
    extra: &[&str],
    why: &str,
) {
    let mut client = Client::spawn_with(program, bundle, state, None, extra);
    let status = tokio::time::timeout(WAIT, client.child.wait())
        .await
        .unwrap_or_else(|_| panic!("still running after {WAIT:?}; {}", client.output()))
        .unwrap();
    assert!(!status.success(), "{status}; {}", client.output());
    // The reader task may still be copying stderr.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !client.err.lock().unwrap().contains(why) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {why:?} on stderr; {}",
            client.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A terminal whose key never leaves it, through its life: it makes its key and a certificate
/// request, the operator provisions it from the request (the bundle has no key), it connects
/// with its own key and shows and acks a payment; then a renewal from a new key's request: the
/// running terminal keeps working on the old certificate until it installs the new one, the new
/// bundle with the old key is refused at start, and once the terminal connects with its new key
/// the old certificate is refused while payments go on, each shown once.
async fn own_key_provisioning_and_renewal(program: Program, id: &str) {
    let (gw, sim) = harness::spawn_with_provider(SECRET, Faults::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);
    let (key, new_key_path) = (file("key.pem"), file("key-2.pem"));
    let (key_arg, new_key_arg) = (key.to_str().unwrap(), new_key_path.to_str().unwrap());
    let state_path = file("state");

    let csr = key_and_csr(&program, &key).await;
    let response = gw
        .admin_post(
            "/v1/terminals",
            json!({"id": id, "merchant_id": "mer_test", "csr_pem": csr}),
        )
        .await;
    let (status, bundle) = harness::status_json(response).await;
    assert_eq!(status, 201, "{bundle}");
    assert!(
        bundle.get("key_pem").is_none(),
        "the key never travels: {bundle}"
    );
    std::fs::write(file("bundle.json"), bundle.to_string()).unwrap();
    refuses_to_start(&program, &file("bundle.json"), &state_path, &[], "--key").await;

    let first = Client::spawn_with(
        &program,
        &file("bundle.json"),
        &state_path,
        None,
        &["--key", key_arg],
    );
    first.wait_for(&format!("READY {id}")).await;
    let token = bundle["http_token"].as_str().unwrap();
    let intent = create_intent(&gw, token, 1).await;
    sim.pay(&intent, None, false).unwrap();
    paid(&first, 1, &intent).await;

    // Renewal with a new key: the gateway certifies the new request's key, and until the new
    // certificate is used the old one still works.
    let csr = key_and_csr(&program, &new_key_path).await;
    let (status, renewed) = renew(&gw, id, json!({"csr_pem": csr})).await;
    assert_eq!(status, 200, "{renewed}");
    assert!(renewed.get("key_pem").is_none(), "{renewed}");
    assert_eq!(renewed["previous_cert_serial"], bundle["cert_serial"]);
    assert_ne!(renewed["cert_serial"], bundle["cert_serial"]);
    assert!(!gw.terminal_view(id).await["previous_cert"].is_null());
    std::fs::write(file("renewed.json"), renewed.to_string()).unwrap();
    let intent = create_intent(&gw, token, 2).await;
    sim.pay(&intent, None, false).unwrap();
    paid(&first, 2, &intent).await;
    refuses_to_start(
        &program,
        &file("renewed.json"),
        &state_path,
        &["--key", key_arg],
        "is not the key of the bundle's certificate",
    )
    .await;

    // The terminal installs the new certificate: a restart with the renewed bundle and new key.
    let mut first = first;
    harness::signal(&first.child, "TERM");
    let status = tokio::time::timeout(WAIT, first.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}; {}", first.output());
    let second = Client::spawn_with(
        &program,
        &file("renewed.json"),
        &state_path,
        None,
        &["--key", new_key_arg],
    );
    second.wait_for(&format!("READY {id}")).await;
    // Its first connection completed the renewal: the old certificate is refused from now on.
    eventually(WAIT, || async {
        gw.terminal_view(id).await["previous_cert"]
            .is_null()
            .then_some(())
    })
    .await;
    assert_eq!(
        gw.terminal_view(id).await["cert_serial"],
        renewed["cert_serial"]
    );
    let mut old: Value = bundle.clone();
    old["key_pem"] = std::fs::read_to_string(&key).unwrap().into();
    let old: Bundle = serde_json::from_value(old).unwrap();
    assert!(gw.mqtt_connect(&Identity::of(&old)).await.is_err());
    let intent = create_intent(&gw, token, 3).await;
    sim.pay(&intent, None, false).unwrap();
    let show = paid(&second, 3, &intent).await;
    assert_eq!(second.shown(), [show], "{}", second.output());
    eventually(WAIT, || async {
        (pending(&gw, id).await == 0).then_some(())
    })
    .await;
    gw.shutdown().await;
}

/// Waits until `client` has shown payment `seq` (order `ord-{seq}`) and the broker has its ack;
/// returns the `SHOW` line.
async fn paid(client: &Client, seq: u32, intent: &str) -> String {
    let show = format!("SHOW PAID seq={seq} intent={intent} amount=4.40 usd order=ord-{seq}");
    client.wait_for(&show).await;
    client
        .wait_for(&format!("ACKED seq={seq} intent={intent}"))
        .await;
    show
}

async fn renew(gw: &TestGateway, id: &str, body: Value) -> (u16, Value) {
    let response = gw
        .admin_post(&format!("/v1/terminals/{id}/certificate"), body)
        .await;
    harness::status_json(response).await
}

#[tokio::test]
async fn python_client_makes_its_own_key_and_is_provisioned_and_renewed_from_csrs() {
    own_key_provisioning_and_renewal(Program::python(), "pos_py_own_key").await;
}

#[tokio::test]
async fn c_client_makes_its_own_key_and_is_provisioned_and_renewed_from_csrs() {
    own_key_provisioning_and_renewal(Program::c(), "pos_c_own_key").await;
}

#[tokio::test]
async fn jvm_client_runs_on_its_own_key_provisioned_and_renewed_from_csrs() {
    own_key_provisioning_and_renewal(Program::jvm(), "pos_jvm_own_key").await;
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
async fn jvm_client_passes_every_confirmation_vector() {
    passes_every_vector(Program::jvm()).await;
}

#[tokio::test]
async fn python_client_shows_each_payment_once_acks_it_and_remembers_across_a_restart() {
    pays_shows_once_acks_and_remembers(Program::python(), "pos_py").await;
}

#[tokio::test]
async fn c_client_shows_each_payment_once_acks_it_and_remembers_across_a_restart() {
    pays_shows_once_acks_and_remembers(Program::c(), "pos_c").await;
}

#[tokio::test]
async fn jvm_client_shows_each_payment_once_acks_it_and_remembers_across_a_restart() {
    pays_shows_once_acks_and_remembers(Program::jvm(), "pos_jvm").await;
}

/// A subscription the broker refuses leaves no terminal connected but deaf: the client says so
/// and connects and subscribes again (a broker may refuse for a while: NATS does while it elects a
/// leader after a node's loss). Here the bundle names another tenant's payments, which the
/// gateway refuses every time: the refusal comes again and again, and the client never says
/// READY.
async fn a_refused_subscription_is_asked_for_again(program: Program, id: &str) {
    let gw = harness::spawn_gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let (bundle_path, state_path) = (dir.path().join("bundle.json"), dir.path().join("state"));
    let mut bundle = provision(&gw, id, &bundle_path).await;
    bundle["topics"]["payments"] = Value::from("/tenants/t00/payments/+");
    std::fs::write(&bundle_path, bundle.to_string()).unwrap();
    let mut client = Client::spawn(&program, &bundle_path, &state_path, None);
    let deadline = tokio::time::Instant::now() + WAIT;
    while client
        .err
        .lock()
        .unwrap()
        .matches("subscription refused")
        .count()
        < 3
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused subscription was not asked for again within {WAIT:?}; {}",
            client.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !client.out.lock().unwrap().contains("READY"),
        "{}",
        client.output()
    );
    client.child.kill().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn python_client_asks_again_for_a_refused_subscription() {
    a_refused_subscription_is_asked_for_again(Program::python(), "pos_py_refused").await;
}

#[tokio::test]
async fn c_client_asks_again_for_a_refused_subscription() {
    a_refused_subscription_is_asked_for_again(Program::c(), "pos_c_refused").await;
}

#[tokio::test]
async fn jvm_client_asks_again_for_a_refused_subscription() {
    a_refused_subscription_is_asked_for_again(Program::jvm(), "pos_jvm_refused").await;
}
