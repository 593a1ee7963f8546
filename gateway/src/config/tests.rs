use secrecy::ExposeSecret;

use super::*;

fn load_with(file_text: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("posgate.toml");
    if let Some(text) = file_text {
        std::fs::write(&path, text).unwrap();
    }
    Config::load(
        file_text.map(|_| path.as_path()),
        &Env::from_pairs(env.iter().copied()),
    )
}

fn bad_keys(err: ConfigError) -> Vec<String> {
    err.invalid_keys().iter().map(|k| k.key.clone()).collect()
}

#[test]
fn the_external_broker_keys_are_parsed_and_checked() {
    let c = load_with(None, &[]).unwrap();
    assert_eq!(
        (c.mqtt.mode, c.mqtt.external.is_none()),
        (MqttMode::Embedded, true)
    );
    let c = load_with(
        None,
        &[
            ("POSGATE__MQTT__MODE", "external"),
            ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://broker.lan:8883"),
            (
                "POSGATE__MQTT__EXTERNAL_BROKER_DIR",
                "/etc/mosquitto/posgate",
            ),
            (
                "POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND",
                "systemctl,reload,mosquitto",
            ),
        ],
    )
    .unwrap();
    let e = c.mqtt.external.unwrap();
    assert_eq!((e.tls, e.host.as_str(), e.port), (true, "broker.lan", 8883));
    assert_eq!(e.client_id, "posgate");
    assert_eq!(e.reload_command, ["systemctl", "reload", "mosquitto"]);
    assert_eq!(
        e.files_dir.as_deref(),
        Some(Path::new("/etc/mosquitto/posgate"))
    );
    assert_eq!((e.kind, e.fallbacks.len()), (BrokerKind::Mosquitto, 0));
    assert!(e.kind.shared_subscriptions());
    let c = load_with(
        None,
        &[
            ("POSGATE__MQTT__MODE", "external"),
            ("POSGATE__MQTT__EXTERNAL_BROKER", "nats"),
            ("POSGATE__MQTT__EXTERNAL_URL", "mqtts://n1:8883"),
            (
                "POSGATE__MQTT__EXTERNAL_FALLBACK_URLS",
                "mqtts://n2:8883,mqtts://n3:8884",
            ),
        ],
    )
    .unwrap();
    let e = c.mqtt.external.unwrap();
    assert_eq!(e.kind, BrokerKind::Nats);
    assert!(!e.kind.shared_subscriptions());
    assert_eq!(
        e.fallbacks,
        [("n2".to_owned(), 8883), ("n3".to_owned(), 8884)]
    );
    assert_eq!(
        parse_mqtt_url("mqtt://127.0.0.1:1883"),
        Some((false, "127.0.0.1".into(), 1883))
    );
    assert_eq!(
        parse_mqtt_url("mqtts://[::1]:8883"),
        Some((true, "::1".into(), 8883))
    );
    for bad in [
        "https://b:1",
        "mqtts://b",
        "mqtts://:1",
        "mqtts://b:0",
        "mqtts://u@b:1",
    ] {
        assert_eq!(parse_mqtt_url(bad), None, "{bad}");
    }
    let err = load_with(
        None,
        &[
            ("POSGATE__MQTT__MODE", "external"),
            ("POSGATE__MQTT__EXTERNAL_CLIENT_ID", "a b"),
            ("POSGATE__MQTT__EXTERNAL_RELOAD_COMMAND", "kill,,1"),
            ("POSGATE__MQTT__EXTERNAL_BROKER", "emqx"),
            ("POSGATE__MQTT__EXTERNAL_FALLBACK_URLS", "http://n2:1"),
        ],
    )
    .unwrap_err();
    let keys = bad_keys(err);
    for key in [
        "mqtt.external_url",
        "mqtt.external_client_id",
        "mqtt.external_reload_command",
        "mqtt.external_broker",
        "mqtt.external_fallback_urls",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
    }
}

#[test]
fn embedded_default_is_valid() {
    let c = load_with(None, &[]).unwrap();
    assert_eq!(c.ingress.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.admin.listen, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(c.mqtt.listen, "0.0.0.0:8883".parse().unwrap());
    assert_eq!(c.ingress.body_limit_bytes, 65536);
    assert_eq!(c.ingress.tolerance_secs, 300);
    assert_eq!(c.shutdown.grace_secs, 10);
    assert_eq!(c.data_dir, PathBuf::from("posgate-data"));
    assert!(c.provider.webhook_secrets.is_empty());
    assert_eq!(c.mqtt.server_names, ["localhost", "127.0.0.1"]);
    assert!(c.mqtt.ws_listen.is_none() && c.mqtt.plain_listen.is_none());
    assert_eq!(c.provider.requests_per_minute, 100);
    assert_eq!(c.provider.rpc_budget_wait_ms, 2000);
    assert_eq!(
        (
            c.provider.transactions_every_secs,
            c.provider.transactions_overlap_secs
        ),
        (900, 600)
    );
}

/// `store.backend`: redb by default; postgres only with a URL, whose password is never
/// shown (not in an error, not in `Debug`).
#[test]
fn the_store_backend_and_its_url() {
    use crate::store::Backend;
    assert_eq!(load_with(None, &[]).unwrap().store.backend, Backend::Redb);
    let url = "postgres://posgate:s3cr3t-pw@db.example:5432/posgate";
    let c = load_with(
        None,
        &[
            ("POSGATE__STORE__BACKEND", "postgres"),
            ("POSGATE__STORE__POSTGRES_URL", url),
        ],
    )
    .unwrap();
    assert_eq!(
        c.store.backend,
        Backend::Postgres {
            url: url.into(),
            tls: crate::store::PgTls::unverified()
        }
    );
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    assert!(shown.contains("postgres://posgate:***@db.example:5432/posgate"));

    let err = load_with(None, &[("POSGATE__STORE__BACKEND", "postgres")]).unwrap_err();
    let bad = err.invalid_keys();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].key, "store.postgres_url");
    assert!(
        bad[0]
            .reason
            .contains("required with store.backend = postgres"),
        "{bad:?}"
    );

    let err = load_with(
        Some("[store]\nbackend = \"postgres\"\npostgres_url = \"postgres://u:s3cr3t-pw@h:notaport/db\"\n"),
        &[],
    )
    .unwrap_err();
    let bad = err.invalid_keys();
    assert_eq!(bad[0].key, "store.postgres_url");
    let shown = format!("{err} {bad:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");

    let err = load_with(None, &[("POSGATE__STORE__BACKEND", "sqlite")]).unwrap_err();
    assert_eq!(bad_keys(err), ["store.backend"]);
}

/// `store.postgres_ca_file`: read and checked at load (a bad file is a configuration
/// error naming the key), only with `sslmode=require`; libpq's other ways to say it in the
/// URL get a reason that points to the key, and never show the password.
#[test]
fn the_postgres_ca_file_is_checked_at_load() {
    use crate::store::Backend;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    crate::store::write_test_ca(&ca);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello\n").unwrap();
    let not_der = dir.path().join("not-der.pem");
    std::fs::write(
        &not_der,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let load = |url: &str, ca_file: Option<&Path>| {
        let mut env = vec![
            ("POSGATE__STORE__BACKEND", "postgres".to_owned()),
            ("POSGATE__STORE__POSTGRES_URL", url.to_owned()),
        ];
        if let Some(file) = ca_file {
            env.push((
                "POSGATE__STORE__POSTGRES_CA_FILE",
                file.display().to_string(),
            ));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        load_with(None, &env)
    };
    let require = "postgres://u:s3cr3t-pw@db.example/p?sslmode=require";

    let c = load(require, Some(&ca)).unwrap();
    let Backend::Postgres { tls, .. } = &c.store.backend else {
        panic!("{:?}", c.store.backend)
    };
    assert_eq!(tls.ca_file(), Some(ca.as_path()));
    let Backend::Postgres { tls, .. } = load(require, None).unwrap().store.backend else {
        panic!("not postgres")
    };
    assert_eq!(tls.ca_file(), None);

    for (url, file, says) in [
        (require, dir.path().join("missing.pem"), "cannot read"),
        (require, garbage.clone(), "holds no certificate"),
        (require, not_der.clone(), "cannot be a trust anchor"),
        (
            "postgres://u:s3cr3t-pw@db.example/p",
            ca.clone(),
            "needs sslmode=require",
        ),
        (
            "postgres://u:s3cr3t-pw@db.example/p?sslmode=prefer",
            ca.clone(),
            "needs sslmode=require",
        ),
        (
            "postgres://u:s3cr3t-pw@db.example/p?sslmode=disable",
            ca.clone(),
            "needs sslmode=require",
        ),
    ] {
        let err = load(url, Some(&file)).unwrap_err();
        let bad = err.invalid_keys();
        assert_eq!(bad.len(), 1, "{url} {file:?}: {bad:?}");
        assert_eq!(bad[0].key, "store.postgres_ca_file");
        assert!(bad[0].reason.contains(says), "{says:?}: {bad:?}");
        assert!(!format!("{err} {bad:?}").contains("s3cr3t-pw"));
    }

    for url in [
        "postgres://u:s3cr3t-pw@db.example/p?sslmode=verify-full",
        "postgres://u:s3cr3t-pw@db.example/p?sslmode=require&sslrootcert=/etc/ca.pem",
    ] {
        let err = load(url, None).unwrap_err();
        let bad = err.invalid_keys();
        assert_eq!(bad.len(), 1, "{url}: {bad:?}");
        assert_eq!(bad[0].key, "store.postgres_url");
        assert!(
            bad[0].reason.contains("store.postgres_ca_file"),
            "{url}: {bad:?}"
        );
        assert!(!format!("{err} {bad:?}").contains("s3cr3t-pw"));
    }
    // With redb the key is not used, and not an error.
    assert_eq!(
        load_with(
            None,
            &[(
                "POSGATE__STORE__POSTGRES_CA_FILE",
                garbage.to_str().unwrap()
            )]
        )
        .unwrap()
        .store
        .backend,
        Backend::Redb
    );
}

/// `store.postgres_cert_file` and `store.postgres_key_file`: both or neither, read and checked
/// at load (a file that cannot be used, or a key that is not the certificate's, is a
/// configuration error naming its key and never showing the key), only with
/// `sslmode=require`; with or without the CA file; `sslcert`/`sslkey` in the URL point to them.
#[test]
fn the_postgres_client_certificate_is_checked_at_load() {
    use crate::store::Backend;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::store::write_test_client_cert(dir.path(), "posgate");
    let other = tempfile::tempdir().unwrap();
    let (_, other_cert, other_key) = crate::store::write_test_client_cert(other.path(), "posgate");
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let secret_line = key_pem.lines().nth(1).unwrap().to_owned();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello\n").unwrap();
    let broken_key = dir.path().join("broken.key");
    std::fs::write(
        &broken_key,
        format!("-----BEGIN PRIVATE KEY-----\n{secret_line}\n"),
    )
    .unwrap();
    let encrypted = dir.path().join("encrypted.key");
    std::fs::write(
        &encrypted,
        key_pem.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
    )
    .unwrap();
    let load = |url: &str, files: &[(&str, &Path)]| {
        let mut env = vec![
            ("POSGATE__STORE__BACKEND".to_owned(), "postgres".to_owned()),
            ("POSGATE__STORE__POSTGRES_URL".to_owned(), url.to_owned()),
        ];
        for (name, file) in files {
            env.push((
                format!("POSGATE__STORE__POSTGRES_{name}_FILE"),
                file.display().to_string(),
            ));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        load_with(None, &env)
    };
    let require = "postgres://u:s3cr3t-pw@db.example/p?sslmode=require";

    // Accepted, alone and with the CA file; equal when read from the same content.
    let tls = |c: Config| match c.store.backend {
        Backend::Postgres { tls, .. } => tls,
        other => panic!("{other:?}"),
    };
    let with_cert = tls(load(require, &[("CERT", &cert), ("KEY", &key)]).unwrap());
    assert_eq!(with_cert.cert_file(), Some(cert.as_path()));
    assert_eq!(with_cert.ca_file(), None);
    assert!(with_cert.describe(require).contains("client certificate"));
    let shown = format!("{with_cert:?}");
    assert!(shown.contains("client.key"), "{shown}");
    assert!(!shown.contains(&secret_line), "{shown}");
    assert_eq!(
        with_cert,
        tls(load(require, &[("CERT", &cert), ("KEY", &key)]).unwrap())
    );
    assert_ne!(
        with_cert,
        tls(load(require, &[("CERT", &other_cert), ("KEY", &other_key)]).unwrap())
    );
    assert_ne!(with_cert, crate::store::PgTls::unverified());
    let both = tls(load(require, &[("CA", &ca), ("CERT", &cert), ("KEY", &key)]).unwrap());
    assert_eq!(both.ca_file(), Some(ca.as_path()));
    assert_eq!(both.cert_file(), Some(cert.as_path()));

    let missing = dir.path().join("missing.pem");
    // (URL, files by key, the key named, what it says)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a Path)], &'a str, &'a str);
    let cases: [Case<'_>; 11] = [
        (
            require,
            &[("CERT", &cert)],
            "store.postgres_key_file",
            "is required with store.postgres_cert_file",
        ),
        (
            require,
            &[("KEY", &key)],
            "store.postgres_cert_file",
            "is required with store.postgres_key_file",
        ),
        (
            require,
            &[("CERT", &missing), ("KEY", &key)],
            "store.postgres_cert_file",
            "cannot read",
        ),
        (
            require,
            &[("CERT", &garbage), ("KEY", &key)],
            "store.postgres_cert_file",
            "holds no certificate",
        ),
        // The key file given as the certificate, the certificate as the key.
        (
            require,
            &[("CERT", &key), ("KEY", &key)],
            "store.postgres_cert_file",
            "holds no certificate",
        ),
        (
            require,
            &[("CERT", &cert), ("KEY", &cert)],
            "store.postgres_key_file",
            "holds no private key",
        ),
        (
            require,
            &[("CERT", &cert), ("KEY", &missing)],
            "store.postgres_key_file",
            "cannot read",
        ),
        (
            require,
            &[("CERT", &cert), ("KEY", &broken_key)],
            "store.postgres_key_file",
            "is not a valid PEM file",
        ),
        (
            require,
            &[("CERT", &cert), ("KEY", &encrypted)],
            "store.postgres_key_file",
            "must be decrypted",
        ),
        (
            require,
            &[("CERT", &cert), ("KEY", &other_key)],
            "store.postgres_key_file",
            "is not the key of the certificate",
        ),
        (
            "postgres://u:s3cr3t-pw@db.example/p?sslmode=prefer",
            &[("CERT", &cert), ("KEY", &key)],
            "store.postgres_cert_file",
            "needs sslmode=require",
        ),
    ];
    for (url, files, name, says) in cases {
        let err = load(url, files).unwrap_err();
        let bad = err.invalid_keys();
        assert_eq!(bad.len(), 1, "{url} {files:?}: {bad:?}");
        assert_eq!(bad[0].key, name, "{files:?}: {bad:?}");
        assert!(bad[0].reason.contains(says), "{says:?}: {bad:?}");
        let shown = format!("{err} {bad:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(!shown.contains(&secret_line), "key material shown: {shown}");
    }
    // Without sslmode=require (absent: prefer) the CA file and the certificate are both named.
    let err = load(
        "postgres://u:s3cr3t-pw@db.example/p",
        &[("CA", &ca), ("CERT", &cert), ("KEY", &key)],
    )
    .unwrap_err();
    assert_eq!(
        bad_keys(err),
        ["store.postgres_ca_file", "store.postgres_cert_file"]
    );
    // A bad CA file and a bad key are both reported.
    let err = load(
        require,
        &[("CA", &garbage), ("CERT", &cert), ("KEY", &other_key)],
    )
    .unwrap_err();
    assert_eq!(
        bad_keys(err),
        ["store.postgres_ca_file", "store.postgres_key_file"]
    );

    for (option, names) in [
        ("sslcert=/etc/c.pem", "store.postgres_cert_file"),
        ("sslkey=/etc/c.key", "store.postgres_key_file"),
    ] {
        let url = format!("{require}&{option}");
        let err = load(&url, &[]).unwrap_err();
        let bad = err.invalid_keys();
        assert_eq!(bad[0].key, "store.postgres_url", "{bad:?}");
        assert!(bad[0].reason.contains(names), "{bad:?}");
        assert!(!bad[0].reason.contains("not supported"), "{bad:?}");
    }
    // With redb the keys are not used (not even checked), and not unknown.
    assert_eq!(
        load_with(
            None,
            &[
                (
                    "POSGATE__STORE__POSTGRES_CERT_FILE",
                    garbage.to_str().unwrap()
                ),
                (
                    "POSGATE__STORE__POSTGRES_KEY_FILE",
                    garbage.to_str().unwrap()
                ),
            ]
        )
        .unwrap()
        .store
        .backend,
        Backend::Redb
    );
}

#[test]
fn cors_origins_are_a_list_of_exact_origins() {
    let c = load_with(None, &[]).unwrap();
    assert!(
        c.ingress.cors_allowed_origins.is_empty(),
        "no CORS by default"
    );
    let c = load_with(
        None,
        &[(
            "POSGATE__INGRESS__CORS_ALLOWED_ORIGINS",
            "https://pos.example,http://127.0.0.1:8480,http://[::1]:80",
        )],
    )
    .unwrap();
    assert_eq!(
        c.ingress.cors_allowed_origins,
        [
            "https://pos.example",
            "http://127.0.0.1:8480",
            "http://[::1]:80"
        ]
    );
    let c = load_with(
        Some("[ingress]\ncors_allowed_origins = [\"https://a.example\"]\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.ingress.cors_allowed_origins, ["https://a.example"]);
    for bad in [
        "*",
        "null",
        "pos.example",
        "https://pos.example/",
        "https://pos.example/pos",
        "ftp://pos.example",
        "https://POS.example",
        "https://*.example",
        "https://",
    ] {
        let err = load_with(None, &[("POSGATE__INGRESS__CORS_ALLOWED_ORIGINS", bad)]).unwrap_err();
        assert_eq!(bad_keys(err), ["ingress.cors_allowed_origins"], "{bad}");
    }
}

#[test]
fn layers_file_then_env() {
    let c = load_with(
        Some(
            "data_dir = \"/tmp/x\"\n[ingress]\nlisten = \"127.0.0.1:9000\"\ntolerance_secs = 60\n",
        ),
        &[
            ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
            ("POSGATE__PROVIDER__WEBHOOK_SECRETS", "new,old"),
            ("POSGATE__MQTT__SERVER_NAMES", "pos.example,10.0.0.2"),
            ("POSGATE__ADMIN__TOKEN", "007-token-with-leading-zero"),
            ("POSGATE__STORE__MAX_BATCH", "64"),
            ("STATE_DIRECTORY", "/var/lib/posgate"),
            ("UNRELATED", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.ingress.listen, "127.0.0.1:0".parse().unwrap());
    assert_eq!(c.ingress.tolerance_secs, 60);
    assert_eq!(
        c.data_dir,
        PathBuf::from("/tmp/x"),
        "the file beats $STATE_DIRECTORY"
    );
    let secrets: Vec<_> = c
        .provider
        .webhook_secrets
        .iter()
        .map(|s| s.expose_secret().to_owned())
        .collect();
    assert_eq!(secrets, ["new", "old"]);
    assert_eq!(c.mqtt.server_names, ["pos.example", "10.0.0.2"]);
    assert_eq!(
        c.admin.token.unwrap().expose_secret(),
        "007-token-with-leading-zero"
    );
    assert_eq!(c.store.max_batch, 64);
}

#[test]
fn state_directory_replaces_the_default_data_dir() {
    let c = load_with(None, &[("STATE_DIRECTORY", "/var/lib/posgate")]).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/posgate"));
    let c = load_with(
        None,
        &[("STATE_DIRECTORY", "/a"), ("POSGATE__DATA_DIR", "/b")],
    )
    .unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/b"));
}

#[test]
fn reports_every_bad_key() {
    let err = load_with(
        Some("[ingress]\nlisten = \"localhost:80:80\"\nbody_limit_bytes = \"lots\"\ncolour = \"red\"\n[nope]\nx = 1\n"),
        &[
            ("POSGATE__INGRESS__TOLERANCE_SECS", "0"),
            ("POSGATE__ADMIN__LISTEN", "not-an-address"),
            ("POSGATE__PROVIDER__API_KEY", "pk_wrong"),
            ("POSGATE__LOG__FORMAT", "xml"),
            ("POSGATE__TYPO", "1"),
        ],
    )
    .unwrap_err();
    let mut keys = bad_keys(err);
    keys.sort();
    assert_eq!(
        keys,
        [
            "admin.listen",
            "ingress.body_limit_bytes",
            "ingress.colour",
            "ingress.listen",
            "ingress.tolerance_secs",
            "log.format",
            "nope.x",
            "provider.api_key",
            "typo",
        ]
    );
}

#[test]
fn a_live_key_is_refused_over_plain_http() {
    let err = load_with(
        None,
        &[
            ("POSGATE__PROVIDER__API_KEY", "sk_live_abc"),
            (
                "POSGATE__PROVIDER__API_BASE",
                "http://api.stablegenius.co/v1",
            ),
        ],
    )
    .unwrap_err();
    let keys: Vec<&str> = err.invalid_keys().iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["provider.api_base"], "{err}");
    assert!(!err.to_string().contains("sk_live_abc"), "{err}");
    // A test key may talk to a simulator over plain HTTP.
    load_with(
        None,
        &[
            ("POSGATE__PROVIDER__API_KEY", "sk_test_abc"),
            ("POSGATE__PROVIDER__API_BASE", "http://127.0.0.1:9/v1"),
        ],
    )
    .unwrap();
}

#[test]
fn secrets_are_never_shown() {
    let err = load_with(
        None,
        &[
            ("POSGATE__PROVIDER__API_KEY", "sx_supersecret"),
            ("POSGATE__ADMIN__TOKEN", "short secret"),
        ],
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        !text.contains("supersecret") && !text.contains("short secret"),
        "{text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
    let ok = load_with(
        None,
        &[("POSGATE__PROVIDER__WEBHOOK_SECRETS", "whsec_hidden")],
    )
    .unwrap();
    assert!(!format!("{ok:?}").contains("whsec_hidden"));
}

#[test]
fn unreadable_file_is_a_source_error() {
    let err = Config::load(
        Some(Path::new("/nonexistent/posgate.toml")),
        &Env::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Source(_)), "{err}");
    let err = load_with(Some("this is [not toml"), &[]).unwrap_err();
    assert!(matches!(err, ConfigError::Source(_)), "{err}");
}
