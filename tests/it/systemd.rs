//! systemd's readiness protocol, against the real `posgate` process: with `$NOTIFY_SOCKET` set it
//! sends `READY=1` once serving, `WATCHDOG=1` pings at half `$WATCHDOG_USEC`, and `STOPPING=1` on
//! SIGTERM before exiting 0.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use crate::harness::{self, SECRET};

fn start(data_dir: &Path, notify_socket: &Path) -> (Child, Arc<Mutex<String>>) {
    start_in(
        Command::new(env!("CARGO_BIN_EXE_posgate-under-test")),
        data_dir,
        notify_socket,
    )
}

fn start_in(
    mut command: Command,
    data_dir: &Path,
    notify_socket: &Path,
) -> (Child, Arc<Mutex<String>>) {
    let mut child = command
        .env_clear()
        .env("POSGATE__DATA_DIR", data_dir)
        .env("POSGATE__INGRESS__LISTEN", "127.0.0.1:0")
        .env("POSGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("POSGATE__MQTT__LISTEN", "127.0.0.1:0")
        .env("POSGATE__PROVIDER__WEBHOOK_SECRETS", SECRET)
        .env("NOTIFY_SOCKET", notify_socket)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Keep draining stdout so the daemon never blocks on a full pipe; keep it for failure messages.
    let log = Arc::new(Mutex::new(String::new()));
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    harness::keep_reading(lines, log.clone());
    (child, log)
}

/// The next datagram, or `None` after `within`.
async fn next(socket: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, socket.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(String::from_utf8(buf[..n].to_vec()).unwrap())
}

/// Reads datagrams until one holds the line `wanted`; returns it and what came before it.
async fn until(
    socket: &UnixDatagram,
    wanted: &str,
    within: Duration,
    log: &Mutex<String>,
) -> (String, Vec<String>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(message) = next(socket, left).await else {
            panic!(
                "no {wanted} within {within:?}; got {before:?}\nlog:\n{}",
                log.lock().unwrap()
            );
        };
        if message.lines().any(|l| l == wanted) {
            return (message, before);
        }
        before.push(message);
    }
}

#[tokio::test]
async fn daemon_reports_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let (mut child, log) = start(&dir.path().join("data"), &socket_path);

    // READY comes first, once every listener is bound, and says where.
    let (ready, before) = until(&socket, "READY=1", Duration::from_secs(60), &log).await;
    assert!(before.is_empty(), "sent before READY=1: {before:?}");
    assert!(
        ready.contains("STATUS=serving: ingress 127.0.0.1:"),
        "{ready}"
    );

    // WATCHDOG_USEC=200000: pings every 100 ms, so one well within a second.
    until(&socket, "WATCHDOG=1", Duration::from_secs(5), &log).await;
    until(&socket, "WATCHDOG=1", Duration::from_secs(5), &log).await;

    // SIGTERM: STOPPING=1 (watchdog pings may come first), then exit 0.
    harness::signal(&child, "TERM");
    let (stopping, _) = until(&socket, "STOPPING=1", Duration::from_secs(10), &log).await;
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("posgate did not exit within 20 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", log.lock().unwrap());
}

/// The open-file limit of `pid`: (soft, hard), as /proc shows them.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

/// Started from a shell whose soft limit is low (a login shell's is often 1,024, room for about
/// 300 terminals through the front door), the daemon raises it to the hard limit.
#[tokio::test]
async fn a_low_soft_open_file_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut command = Command::new("/bin/sh");
    command.args([
        "-c",
        "ulimit -Sn 256 && exec \"$0\"",
        env!("CARGO_BIN_EXE_posgate-under-test"),
    ]);
    let (mut child, log) = start_in(command, &dir.path().join("data"), &socket_path);
    until(&socket, "READY=1", Duration::from_secs(60), &log).await;
    let pid = child.id().unwrap();
    let (soft, hard) = open_file_limits(pid);
    assert_ne!(soft, "256", "log:\n{}", log.lock().unwrap());
    assert_eq!(soft, hard);
    child.kill().await.unwrap();
}
