//! The daemon on the PostgreSQL store (`store.backend = "postgres"`), against a real server the
//! test process starts (`posgate-testpg`): a webhook reaches its terminal, and a confirmation
//! not yet acked survives a SIGKILL and a restart on the same ports. Over TLS, on a server of
//! the test's own (`ssl = on`, a certificate from a CA the test makes, `hostssl` only): the
//! server verified with `store.postgres_ca_file`, and what each TLS problem does at start; and
//! on a server that takes client certificates only (`hostssl … cert`), the daemon's own with
//! `store.postgres_cert_file` and `store.postgres_key_file`.

use std::sync::Arc;
use std::time::Duration;

use posgate_proto::MicroUsdc;
use posgate_sim::events::{self, Intent};

use crate::crash::{Listen, sigterm, start_daemon_env};
use crate::harness::{SECRET, signed_post};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_webhook_reaches_its_terminal_and_an_unacked_one_survives_a_sigkill() {
    let url = tokio::task::spawn_blocking(|| posgate_testpg::shared().fresh_db())
        .await
        .unwrap();
    let env = [
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", url.as_str()),
        // The restarted process renews its predecessor's shard leases at once instead of waiting
        // for them to expire (the default id is new at each start).
        ("POSGATE__REPLICAS__ID", "pg-it"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon_env(dir.path(), None, Listen::any(), &env).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let online = daemon.provision(&http, "pos_pg_on").await;
    let offline = daemon.provision(&http, "pos_pg_off").await;
    let webhook = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let post = |evt: &str, pi: &str, terminal: &str| {
        let intent = Intent::new(pi, MicroUsdc(4_500_000), terminal);
        signed_post(
            &http,
            &webhook,
            SECRET,
            events::intent_event(evt, "confirmed", &intent),
        )
        .send()
    };

    let mut terminal = posgate_sim::terminal::Terminal::connect(online, daemon.mqtt)
        .await
        .unwrap();
    assert_eq!(
        post("evt_pg_1", "pi_pg_1", "pos_pg_on")
            .await
            .unwrap()
            .status(),
        200
    );
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_pg_1", 1));
    // The same event again is a duplicate: no second confirmation.
    assert_eq!(
        post("evt_pg_1", "pi_pg_1", "pos_pg_on")
            .await
            .unwrap()
            .status(),
        200
    );

    // Nobody can ack this one before the kill: its terminal is offline.
    assert_eq!(
        post("evt_pg_2", "pi_pg_2", "pos_pg_off")
            .await
            .unwrap()
            .status(),
        200
    );
    let listen = daemon.listen();
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();
    drop(terminal);

    let daemon = start_daemon_env(dir.path(), None, listen, &env).await;
    let mut terminal = posgate_sim::terminal::Terminal::connect(offline, daemon.mqtt)
        .await
        .unwrap();
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), ("pi_pg_2", 1));
    // The data is in PostgreSQL, not in a redb file beside the keys.
    assert!(!dir.path().join("posgate.redb").exists());
    let rows: i64 = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .query_one("SELECT count(*) FROM events", &[])
            .unwrap()
            .get(0)
    })
    .await
    .unwrap();
    assert_eq!(rows, 2);
    sigterm(&daemon).await;
}

/// The database killed under a running daemon: `/readyz` answers `503` and webhooks are refused
/// with `503` (the provider retries) until it is back; then the daemon takes them again by
/// itself, without a restart, and what it acknowledged before is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_database_going_away_fails_readiness_until_it_is_back() {
    let server = std::sync::Arc::new(
        tokio::task::spawn_blocking(posgate_testpg::Server::start)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let url = {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.fresh_db())
            .await
            .unwrap()
    };
    let env = [
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", url.as_str()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon_env(dir.path(), None, Listen::any(), &env).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let webhook = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let readyz = format!("http://{}/readyz", daemon.admin);
    let post = |n: u32| {
        let intent = Intent::new(&format!("pi_gone_{n}"), MicroUsdc(4_500_000), "pos_x");
        signed_post(
            &http,
            &webhook,
            SECRET,
            events::intent_event(&format!("evt_gone_{n}"), "confirmed", &intent),
        )
        .send()
    };
    assert_eq!(post(1).await.unwrap().status(), 200);
    assert_eq!(http.get(&readyz).send().await.unwrap().status(), 200);

    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.kill())
            .await
            .unwrap();
    }
    crate::harness::eventually(Duration::from_secs(10), || async {
        (http.get(&readyz).send().await.unwrap().status() == 503).then_some(())
    })
    .await;
    assert_eq!(post(2).await.unwrap().status(), 503);

    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.start_again())
            .await
            .unwrap()
            .unwrap();
    }
    crate::harness::eventually(Duration::from_secs(30), || async {
        (http.get(&readyz).send().await.unwrap().status() == 200).then_some(())
    })
    .await;
    // The provider's retry of the refused one, and a new one.
    assert_eq!(post(2).await.unwrap().status(), 200);
    assert_eq!(post(3).await.unwrap().status(), 200);
    let events: i64 = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT count(*) FROM events WHERE k IN ('evt_gone_1', 'evt_gone_2', 'evt_gone_3')",
                &[],
            )
            .unwrap()
            .get(0)
    })
    .await
    .unwrap();
    assert_eq!(events, 3);
    sigterm(&daemon).await;
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

// === PostgreSQL over TLS ===

/// A test CA named `ca_name` and a server certificate it signed for `names` (PEM): `(ca,
/// cert, key)`.
fn ca_and_server_cert(ca_name: &str, names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "posgate test PostgreSQL");
    let cert_pem = server.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert_pem, key.serialize_pem())
}

/// A client certificate for the role `user` (its CN) from a new CA named `ca_name` (PEM):
/// `(ca, cert, key)`.
fn ca_and_client_cert(ca_name: &str, user: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client.distinguished_name.push(DnType::CommonName, user);
    let cert_pem = client.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert_pem, key.serialize_pem())
}

/// A server of the test's own with `ssl = on`, a certificate for 127.0.0.1 only, and TCP
/// without TLS refused (`hostssl` only); its CA's PEM.
async fn tls_server() -> (Arc<posgate_testpg::Server>, String) {
    let (ca, cert_pem, key_pem) = ca_and_server_cert("posgate test PostgreSQL CA", &["127.0.0.1"]);
    let server = tokio::task::spawn_blocking(move || {
        posgate_testpg::Server::start_tls(&posgate_testpg::Tls {
            cert_pem,
            key_pem,
            hostssl_only: true,
            client_ca_pem: None,
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(server), ca)
}

async fn fresh_db(server: &Arc<posgate_testpg::Server>) -> String {
    let server = server.clone();
    tokio::task::spawn_blocking(move || server.fresh_db())
        .await
        .unwrap()
}

/// Runs `posgate run` with `env` (over the test defaults), expecting it to refuse to start:
/// its exit code and what it printed on stderr.
async fn refused_start(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_posgate-under-test"));
    command
        .env_clear()
        .envs(crate::harness::test_env(dir.path(), env))
        .arg("run")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("posgate started with {env:?}: it should have refused"))
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sslmode=require` with `store.postgres_ca_file`: the daemon stores a webhook in a database
/// that takes only TLS connections and its terminal gets the confirmation; every connection
/// of the daemon is encrypted, and it says that it verifies the server (no warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_over_tls_with_its_ca_a_webhook_reaches_its_terminal() {
    let (server, ca) = tls_server().await;
    let url = format!("{}?sslmode=require", fresh_db(&server).await);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("postgres-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let data = dir.path().join("data");
    let env = [
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", url.as_str()),
        (
            "POSGATE__STORE__POSTGRES_CA_FILE",
            ca_file.to_str().unwrap(),
        ),
    ];
    let daemon = start_daemon_env(&data, None, Listen::any(), &env).await;
    one_confirmation(&daemon, "pg_tls").await;

    // Seen from the server: the event is there, and posgate's sessions are all TLS.
    let (events, plain, encrypted) = server_counts(
        &server,
        &url,
        "evt_pg_tls",
        "count(*) FILTER (WHERE NOT s.ssl), count(*) FILTER (WHERE s.ssl)",
    )
    .await;
    assert_eq!(events, 1);
    assert_eq!(plain, 0, "a posgate session without TLS");
    assert!(encrypted >= 1, "no posgate session seen");
    let log = daemon.log.lock().unwrap().clone();
    assert!(
        log.contains("server verified against"),
        "the start does not say how the server is checked:\n{log}"
    );
    assert!(
        !log.contains("certificate is not checked") && !log.contains("do not check its"),
        "warned although the server is verified:\n{log}"
    );
    sigterm(&daemon).await;

    // Without the CA file, libpq's `require`: encrypted, the server not checked, and a warning.
    let daemon = start_daemon_env(&data, None, Listen::any(), &env[..2]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let webhook = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let intent = Intent::new("pi_pg_tls_2", MicroUsdc(4_500_000), "pos_pg_tls");
    let answer = signed_post(
        &http,
        &webhook,
        SECRET,
        events::intent_event("evt_pg_tls_2", "confirmed", &intent),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
    crate::harness::eventually(Duration::from_secs(10), || async {
        daemon
            .log
            .lock()
            .unwrap()
            .contains("the server's certificate is not checked")
            .then_some(())
    })
    .await;
    sigterm(&daemon).await;
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

/// What a TLS problem does at start: the daemon refuses to start (exit 64: a restart cannot
/// fix it) and says which store and why, for a certificate from another CA, a certificate that
/// does not name the URL's host, a URL without TLS where the server requires it, and a server
/// without TLS where the URL requires it. A server that is merely down stays a transient
/// failure (exit 75).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_tls_problem_stops_the_start_with_its_reason() {
    let (server, right_ca) = tls_server().await;
    let url = fresh_db(&server).await;
    let (other_ca, _, _) = ca_and_server_cert("another CA", &["127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, &other_ca).unwrap();
    let right_file = dir.path().join("right-ca.pem");
    std::fs::write(&right_file, &right_ca).unwrap();

    let require = format!("{url}?sslmode=require");
    // Connected to 127.0.0.1, the certificate checked against the name "localhost".
    let by_name = format!(
        "{}?sslmode=require&hostaddr=127.0.0.1",
        url.replace("@127.0.0.1:", "@localhost:")
    );
    let disable = format!("{url}?sslmode=disable");
    let plain_server = tokio::task::spawn_blocking(|| posgate_testpg::shared().fresh_db())
        .await
        .unwrap();
    let plain_require = format!("{plain_server}?sslmode=require");
    let cases: [(&str, &str, Option<&std::path::Path>, &[&str]); 4] = [
        (
            "another CA",
            &require,
            Some(&other_file),
            &["UnknownIssuer", "server verified against"],
        ),
        (
            "a host the certificate does not name",
            &by_name,
            Some(&right_file),
            &["not valid for name \"localhost\""],
        ),
        (
            "no TLS where the server requires it",
            &disable,
            None,
            &["no pg_hba.conf entry", "no encryption", "sslmode=disable"],
        ),
        (
            "TLS required of a server without it",
            &plain_require,
            None,
            &["server does not support TLS"],
        ),
    ];
    for (case, url, ca_file, says) in cases {
        let mut env = vec![
            ("POSGATE__STORE__BACKEND", "postgres"),
            ("POSGATE__STORE__POSTGRES_URL", url),
        ];
        if let Some(file) = ca_file {
            env.push(("POSGATE__STORE__POSTGRES_CA_FILE", file.to_str().unwrap()));
        }
        let (code, stderr) = refused_start(&env).await;
        // What an operator reads (shown with --no-capture).
        eprintln!("{case}: exit {code:?}: {stderr}");
        assert_eq!(code, Some(64), "{case}: {stderr}");
        assert!(
            stderr.contains("opening the store: connecting to PostgreSQL at postgres://"),
            "{case}: {stderr}"
        );
        for words in says {
            assert!(stderr.contains(words), "{case}: no {words:?} in: {stderr}");
        }
    }

    // The same server stopped: that may pass (exit 75, systemd tries again).
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.stop())
            .await
            .unwrap();
    }
    let right = right_file.to_str().unwrap();
    let (code, stderr) = refused_start(&[
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", &require),
        ("POSGATE__STORE__POSTGRES_CA_FILE", right),
    ])
    .await;
    assert_eq!(code, Some(75), "{stderr}");
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

/// Mutual TLS: on a server whose TCP connections must present a client certificate of its CA
/// naming the role (`hostssl all all 127.0.0.1/32 cert` and nothing else), the daemon with
/// `store.postgres_cert_file` and `store.postgres_key_file` starts, stores a webhook and its
/// terminal gets the confirmation; every posgate session on the server is TLS with that
/// certificate. Without it, with one of another CA or for another role, the start is refused
/// at once (exit 64) with the server's or the handshake's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_with_a_client_certificate_a_webhook_reaches_its_terminal() {
    let (server_ca, cert_pem, key_pem) =
        ca_and_server_cert("posgate test PostgreSQL CA", &["127.0.0.1"]);
    let (client_ca, client_cert, client_key) =
        ca_and_client_cert("posgate test client CA", posgate_testpg::USER);
    let server = tokio::task::spawn_blocking(move || {
        posgate_testpg::Server::start_tls(&posgate_testpg::Tls {
            cert_pem,
            key_pem,
            hostssl_only: true,
            client_ca_pem: Some(client_ca),
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    let server = Arc::new(server);
    let url = format!("{}?sslmode=require", fresh_db(&server).await);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca_file = write("postgres-ca.pem", &server_ca);
    let cert_file = write("client.pem", &client_cert);
    let key_file = write("client.key", &client_key);
    let (_, foreign_cert, foreign_key) = ca_and_client_cert("another CA", posgate_testpg::USER);
    let foreign_cert = write("foreign.pem", &foreign_cert);
    let foreign_key = write("foreign.key", &foreign_key);
    let env = [
        ("POSGATE__STORE__BACKEND", "postgres"),
        ("POSGATE__STORE__POSTGRES_URL", url.as_str()),
        ("POSGATE__STORE__POSTGRES_CA_FILE", ca_file.as_str()),
        ("POSGATE__STORE__POSTGRES_CERT_FILE", cert_file.as_str()),
        ("POSGATE__STORE__POSTGRES_KEY_FILE", key_file.as_str()),
    ];
    let data = dir.path().join("data");
    let daemon = start_daemon_env(&data, None, Listen::any(), &env).await;
    one_confirmation(&daemon, "pg_mtls").await;

    // Seen from the server: the event is there, and every posgate session is TLS with the
    // client certificate (the store's, and the lease and LISTEN connections if open by now).
    let (events, without, with) = server_counts(
        &server,
        &url,
        "evt_pg_mtls",
        "count(*) FILTER (WHERE s.client_dn IS DISTINCT FROM '/CN=posgate'),
         count(*) FILTER (WHERE s.ssl AND s.client_dn = '/CN=posgate')",
    )
    .await;
    assert_eq!(events, 1);
    assert_eq!(
        without, 0,
        "a posgate session without the client certificate"
    );
    assert!(with >= 1, "no posgate session seen");
    let log = daemon.log.lock().unwrap().clone();
    assert!(
        log.contains(&format!("client certificate {cert_file}")),
        "the start does not say which client certificate it offers:\n{log}"
    );
    sigterm(&daemon).await;

    // The same server, the same database, refused at once with the reason.
    let other_role = url.replacen("posgate@", "someone@", 1);
    // (case, environment, what stderr says)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a [&'a str]);
    let cases: [Case<'_>; 3] = [
        (
            "no client certificate",
            env[..3].to_vec(),
            &[
                "connection requires a valid client certificate",
                "server verified against",
            ],
        ),
        (
            "a client certificate of another CA",
            vec![
                env[0],
                env[1],
                env[2],
                ("POSGATE__STORE__POSTGRES_CERT_FILE", foreign_cert.as_str()),
                ("POSGATE__STORE__POSTGRES_KEY_FILE", foreign_key.as_str()),
            ],
            // TLS 1.3: the server refuses the certificate after the client's side of the
            // handshake is done, with an alert.
            &["received fatal alert: UnknownCA", "client certificate"],
        ),
        (
            "a client certificate for another role",
            vec![
                env[0],
                ("POSGATE__STORE__POSTGRES_URL", other_role.as_str()),
                env[2],
                env[3],
                env[4],
            ],
            &["certificate authentication failed for user \"someone\""],
        ),
    ];
    for (case, env, says) in cases {
        let (code, stderr) = refused_start(&env).await;
        eprintln!("{case}: exit {code:?}: {stderr}");
        assert_eq!(code, Some(64), "{case}: {stderr}");
        assert!(
            stderr.contains("opening the store: connecting to PostgreSQL at postgres://"),
            "{case}: {stderr}"
        );
        for words in says {
            assert!(stderr.contains(words), "{case}: no {words:?} in: {stderr}");
        }
    }
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

/// A CA file that cannot be used is a configuration error (exit 64) before anything starts,
/// named by its key.
#[test]
fn a_bad_postgres_ca_file_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    for (file, says) in [
        (&missing, "cannot read"),
        (&garbage, "holds no certificate"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_posgate-under-test"))
            .env_clear()
            .envs(crate::harness::test_env(
                dir.path(),
                &[
                    ("POSGATE__STORE__BACKEND", "postgres"),
                    (
                        "POSGATE__STORE__POSTGRES_URL",
                        "postgres://posgate@127.0.0.1:1/x?sslmode=require",
                    ),
                    ("POSGATE__STORE__POSTGRES_CA_FILE", file.to_str().unwrap()),
                ],
            ))
            .arg("run")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("store.postgres_ca_file"), "{stderr}");
        assert!(stderr.contains(says), "{says:?} not in {stderr}");
    }
}

/// `check-config` says what the start says: TLS to PostgreSQL that does not check the server
/// is a warning (exit still 0); with the CA file there is none.
#[test]
fn check_config_warns_when_the_postgres_server_is_not_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = ca_and_server_cert("posgate test PostgreSQL CA", &["127.0.0.1"]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let url = "postgres://posgate:pw@db.example:5432/posgate?sslmode=require";
    let check = |ca_file: Option<&std::path::Path>| {
        let mut env = vec![
            ("POSGATE__STORE__BACKEND", "postgres"),
            ("POSGATE__STORE__POSTGRES_URL", url),
        ];
        if let Some(file) = ca_file {
            env.push(("POSGATE__STORE__POSTGRES_CA_FILE", file.to_str().unwrap()));
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_posgate-under-test"))
            .env_clear()
            .envs(crate::harness::test_env(dir.path(), &env))
            .arg("check-config")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        stderr
    };
    let stderr = check(None);
    assert!(
        stderr.contains("warning: PostgreSQL connections are encrypted but the server's certificate is not checked"),
        "{stderr}"
    );
    let stderr = check(Some(&ca_file));
    assert!(!stderr.contains("PostgreSQL"), "{stderr}");
}

/// Through `daemon`: terminal `pos_{name}` provisioned and connected, intent `pi_{name}`
/// confirmed by webhook `evt_{name}` (answered `200`), its confirmation at the terminal.
async fn one_confirmation(daemon: &crate::crash::Daemon, name: &str) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let terminal_id = format!("pos_{name}");
    let bundle = daemon.provision(&http, &terminal_id).await;
    let mut terminal = posgate_sim::terminal::Terminal::connect(bundle, daemon.mqtt)
        .await
        .unwrap();
    let intent_id = format!("pi_{name}");
    let intent = Intent::new(&intent_id, MicroUsdc(4_500_000), &terminal_id);
    let webhook = format!("http://{}{}", daemon.ingress, events::WEBHOOK_PATH);
    let answer = signed_post(
        &http,
        &webhook,
        SECRET,
        events::intent_event(&format!("evt_{name}"), "confirmed", &intent),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
    let c = terminal
        .next_confirmation(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((c.intent_id.as_str(), c.seq), (intent_id.as_str(), 1));
}

/// Seen from the server, in `url`'s database: how many events `event_id` has, and the two counts
/// `sessions` (`count(*) FILTER (…), count(*) FILTER (…)` over `pg_stat_ssl s` joined with
/// `pg_stat_activity a`) of posgate's sessions.
async fn server_counts(
    server: &Arc<posgate_testpg::Server>,
    url: &str,
    event_id: &str,
    sessions: &str,
) -> (i64, i64, i64) {
    let db = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let (server, event_id) = (server.clone(), event_id.to_owned());
    let query = format!(
        "SELECT {sessions} FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'posgate'"
    );
    tokio::task::spawn_blocking(move || {
        let mut client =
            postgres::Client::connect(&server.admin_url(&db), postgres::NoTls).unwrap();
        let events: i64 = client
            .query_one("SELECT count(*) FROM events WHERE k = $1", &[&event_id])
            .unwrap()
            .get(0);
        let row = client.query_one(&query, &[]).unwrap();
        (events, row.get::<_, i64>(0), row.get::<_, i64>(1))
    })
    .await
    .unwrap()
}
