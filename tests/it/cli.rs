//! The real binary's command line: config errors exit 64 before anything starts.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_posgate-under-test");

fn posgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.env_clear().args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn print_config_prints_the_embedded_default() {
    let out = posgate(&["print-config"], &[]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), posgate::config::DEFAULT_CONFIG);
}

#[test]
fn check_config_lists_every_bad_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("posgate.toml");
    std::fs::write(
        &file,
        "[ingress]\nlisten = \"127.0.0.1:99999\"\nlisen = \"typo\"\n[shutdown]\ngrace_secs = -1\n",
    )
    .unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let out = posgate(
        &["check-config", "--config", file.to_str().unwrap()],
        &[
            ("POSGATE__DATA_DIR", &data_dir),
            ("POSGATE__PROVIDER__API_KEY", "not_a_key_secret"),
            // A mistyped secret key: its value must not be printed either.
            ("POSGATE__PROVIDER__API_KEYS", "sk_live_mistyped_secret"),
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    for needle in [
        "ingress.listen = \"127.0.0.1:99999\"",
        "ingress.lisen = <not shown>: unknown key",
        "provider.api_keys = <not shown>: unknown key",
        "shutdown.grace_secs",
        "provider.api_key = <redacted>",
    ] {
        assert!(err.contains(needle), "{needle:?} not in:\n{err}");
    }
    for secret in ["not_a_key_secret", "sk_live_mistyped_secret", "typo"] {
        assert!(!err.contains(secret), "{secret} was printed:\n{err}");
    }
}

#[test]
fn check_config_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let out = posgate(
        &["check-config"],
        &[
            ("POSGATE__DATA_DIR", &data_dir),
            ("POSGATE__PROVIDER__WEBHOOK_SECRETS", "whsec_x"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn run_with_bad_config_exits_64_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let common = [
        ("POSGATE__DATA_DIR", data_dir.as_str()),
        ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
        ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0"),
    ];
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("POSGATE__NOT__A_KEY", "1")], "not.a_key"),
        (&[("POSGATE__ADMIN__LISTEN", "localhost")], "admin.listen"),
        (
            &[("POSGATE__INGRESS__BODY_LIMIT_BYTES", "huge")],
            "ingress.body_limit_bytes",
        ),
    ];
    for (extra, key) in cases {
        let env: Vec<_> = common.iter().chain(extra.iter()).copied().collect();
        let out = posgate(&["run"], &env);
        assert_eq!(out.status.code(), Some(64), "{key}");
        assert!(
            text(&out.stderr).contains(key),
            "{key} not in {}",
            text(&out.stderr)
        );
        assert!(
            !text(&out.stdout).contains("listening"),
            "something started: {}",
            text(&out.stdout)
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "a bad config must not touch data_dir"
    );
}

#[test]
fn unwritable_data_dir_exits_64_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    // Under a regular file: not creatable, even for root.
    let data_dir = file.join("data").display().to_string();
    let env = [
        ("POSGATE__DATA_DIR", data_dir.as_str()),
        ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
        ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0"),
    ];
    let out = posgate(&["run"], &env);
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains("data_dir") && err.contains(&data_dir), "{err}");
    assert!(!text(&out.stdout).contains("listening"));
    let out = posgate(&["check-config"], &env);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("data_dir"));
}

#[test]
fn usage_errors_exit_64() {
    assert_eq!(posgate(&["--no-such-flag"], &[]).status.code(), Some(64));
    assert_eq!(posgate(&["frobnicate"], &[]).status.code(), Some(64));
    assert_eq!(posgate(&["--help"], &[]).status.code(), Some(0));
}

/// A port that another process holds is a transient failure: exit 75 (`EX_TEMPFAIL`), which the
/// unit restarts, not 64, which it gives up on.
#[test]
fn a_port_in_use_exits_75_for_each_listener() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    for key in [
        "POSGATE__INGRESS__LISTEN",
        "POSGATE__ADMIN__LISTEN",
        "POSGATE__MQTT__LISTEN",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().display().to_string();
        let mut env = vec![
            ("POSGATE__DATA_DIR", data_dir.as_str()),
            ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
            ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("POSGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ];
        env.retain(|(k, _)| *k != key);
        env.push((key, taken.as_str()));
        let out = posgate(&["run"], &env);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{key}: {err}");
        assert!(
            err.contains(&taken),
            "{key}: the message names the address: {err}"
        );
    }
}

/// A database that another process holds (one still stopping, or a second copy started by hand)
/// may free up: exit 75.
#[test]
fn a_database_held_by_another_process_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.path().join("posgate.redb"))
        .unwrap();
    held.try_lock().unwrap();
    let data_dir = dir.path().display().to_string();
    let env = [
        ("POSGATE__DATA_DIR", data_dir.as_str()),
        ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
        ("POSGATE__ADMIN__LISTEN", "127.0.0.1:0"),
        ("POSGATE__MQTT__LISTEN", "127.0.0.1:0"),
    ];
    let out = posgate(&["run"], &env);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    drop(held);
}

/// Under systemd (`$JOURNAL_STREAM` set) every log line carries its syslog priority, which
/// journald reads: `journalctl -p err` finds the errors.
#[test]
fn under_journald_log_lines_carry_their_priority() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let env = [
        ("POSGATE__DATA_DIR", data_dir.as_str()),
        ("POSGATE__INGRESS__LISTEN", "127.0.0.1:0"),
        ("POSGATE__ADMIN__LISTEN", taken.as_str()),
        ("POSGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ("JOURNAL_STREAM", "8:12345"),
    ];
    let out = posgate(&["run"], &env);
    assert_eq!(out.status.code(), Some(75));
    let stdout = text(&out.stdout);
    let error = stdout
        .lines()
        .find(|l| l.contains("cannot start"))
        .unwrap_or_else(|| panic!("no error line in:\n{stdout}"));
    assert!(error.starts_with("<3>"), "{error}");
    assert!(
        stdout.lines().all(|l| l.starts_with('<')),
        "a line without its priority:\n{stdout}"
    );
}
