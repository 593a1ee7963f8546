//! systemd's readiness and watchdog protocol (`sd_notify(3)`): `READY=1` once every listener is
//! bound, `STOPPING=1` when shutdown begins, and `WATCHDOG=1` pings while the daemon is healthy.
//!
//! Owns only the notification socket; it must not decide *when* the daemon is ready or healthy:
//! `cli` calls [`Notifier::ready`] after [`crate::Gateway::spawn`] and passes the health check to
//! [`Notifier::spawn_watchdog`]. Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op.
//!
//! Why not the `sd-notify` crate (MIT OR Apache-2.0, so the licence would do): it reads
//! `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` from the process environment only, so tests could not
//! inject them without `std::env::set_var` (banned in `.clippy.toml`). The protocol is one datagram
//! of `KEY=VALUE` lines to a Unix socket, a path or, with a leading `@`, an abstract name.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The variables systemd passes to a `Type=notify` service, read once at start.
#[derive(Clone, Debug, Default)]
pub struct NotifyEnv {
    /// `$NOTIFY_SOCKET`: where notifications go (`/run/systemd/notify` or `@abstract-name`).
    pub notify_socket: Option<String>,
    /// `$WATCHDOG_USEC`: the service's `WatchdogSec=` in microseconds; pings are due within it.
    pub watchdog_usec: Option<String>,
    /// `$WATCHDOG_PID`: the process the watchdog applies to; absent means this one.
    pub watchdog_pid: Option<String>,
}

impl NotifyEnv {
    /// The process environment (only the binary calls this; tests build a `NotifyEnv` directly).
    pub fn from_process() -> NotifyEnv {
        NotifyEnv {
            notify_socket: std::env::var("NOTIFY_SOCKET").ok(),
            watchdog_usec: std::env::var("WATCHDOG_USEC").ok(),
            watchdog_pid: std::env::var("WATCHDOG_PID").ok(),
        }
    }
}

/// Sends notifications to systemd; a no-op when the service manager asked for none.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier for `env`, as seen by process `pid` (`std::process::id()` in the daemon).
    ///
    /// Never fails: a socket that cannot be used is logged and notifications are skipped, since a
    /// daemon that serves without telling systemd is better than one that does not start (systemd
    /// reports the missing `READY=1` itself, by timing out the start).
    pub fn from_env(env: &NotifyEnv, pid: u32) -> Notifier {
        let target = env
            .notify_socket
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| match open(s) {
                Ok(target) => Some(target),
                Err(e) => {
                    tracing::warn!(notify_socket = s, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from posgate");
                    None
                }
            });
        let ours = env
            .watchdog_pid
            .as_deref()
            .is_none_or(|p| p.trim().parse::<u32>().ok() == Some(pid));
        let watchdog = env
            .watchdog_usec
            .as_deref()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&usec| usec > 0 && ours && target.is_some())
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Whether a notification socket is configured.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog interval systemd expects pings within (`WatchdogSec=`), when it asked for them.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1` with a one-line `STATUS=` (shown by `systemctl status`). Call it once every
    /// listener is bound: systemd then starts the units ordered after posgate.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// `STOPPING=1`: shutdown has begun (systemd shows "deactivating" instead of a failure).
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
    }

    /// A free-form `STATUS=` line.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}\n", one_line(status)));
    }

    /// Starts the watchdog task on the current Tokio runtime when systemd asked for pings
    /// (`$WATCHDOG_USEC`, and `$WATCHDOG_PID` absent or ours): `WATCHDOG=1` every half interval,
    /// but only while `healthy()` holds, so a daemon whose store has failed is restarted by
    /// systemd instead of lingering. The task ends when `stop` is cancelled.
    pub fn spawn_watchdog<F>(
        self: &Arc<Self>,
        healthy: F,
        stop: CancellationToken,
    ) -> Option<JoinHandle<()>>
    where
        F: Fn() -> bool + Send + Sync + 'static,
    {
        let interval = self.watchdog? / 2;
        let notifier = self.clone();
        let task = async move {
            tracing::info!(
                interval_ms = interval.as_millis() as u64,
                "systemd watchdog enabled"
            );
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_healthy = true;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let now_healthy = healthy();
                if now_healthy {
                    notifier.send("WATCHDOG=1\n");
                    if !was_healthy {
                        tracing::info!("healthy again; watchdog pings resumed");
                        notifier.status("serving");
                    }
                } else if was_healthy {
                    // Why stop pinging: systemd then restarts the daemon after WatchdogSec, which
                    // reopens the store; the provider retries whatever was refused meanwhile.
                    tracing::error!(
                        "unhealthy; withholding watchdog pings (systemd restarts posgate after WatchdogSec)"
                    );
                    notifier.status("unhealthy: store failing; watchdog pings withheld");
                }
                was_healthy = now_healthy;
            }
        };
        Some(tokio::spawn(
            task.instrument(tracing::info_span!("watchdog")),
        ))
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

/// An unbound, non-blocking datagram socket and the address of `$NOTIFY_SOCKET`.
fn open(socket: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "neither an absolute path nor an abstract name (@...)",
        ));
    };
    let datagram = UnixDatagram::unbound()?;
    // Why non-blocking: the watchdog pings from a runtime worker; a full queue at systemd's end
    // must cost one lost ping, never a stalled worker.
    datagram.set_nonblocking(true)?;
    Ok((datagram, addr))
}

/// `STATUS=` is one line: a newline would start another (possibly meaningful) assignment.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, socket, path.to_str().unwrap().to_owned())
    }

    fn env(socket: &str, usec: Option<&str>, pid: Option<&str>) -> NotifyEnv {
        NotifyEnv {
            notify_socket: Some(socket.to_owned()),
            watchdog_usec: usec.map(str::to_owned),
            watchdog_pid: pid.map(str::to_owned),
        }
    }

    #[test]
    fn ready_and_stopping_reach_a_path_socket() {
        let (_dir, socket, path) = listener();
        let n = Notifier::from_env(&env(&path, None, None), 42);
        assert!(n.is_enabled());
        n.ready("serving\non 127.0.0.1:8080");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=serving on 127.0.0.1:8080\n");
        n.stopping("draining");
        assert_eq!(recv(&socket), "STOPPING=1\nSTATUS=draining\n");
    }

    #[test]
    fn abstract_sockets_work() {
        let name = format!("posgate-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::from_env(&env(&format!("@{name}"), None, None), 1);
        n.ready("ok");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=ok\n");
    }

    #[test]
    fn nothing_configured_is_a_no_op() {
        let n = Notifier::from_env(&NotifyEnv::default(), 1);
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("ok");
        n.stopping("bye");
        let relative = Notifier::from_env(&env("relative/path", Some("1000"), None), 1);
        assert!(!relative.is_enabled());
        assert_eq!(relative.watchdog_interval(), None);
    }

    #[test]
    fn watchdog_applies_only_to_its_pid() {
        let (_dir, _socket, path) = listener();
        let ours = Notifier::from_env(&env(&path, Some("30000000"), Some("7")), 7);
        assert_eq!(ours.watchdog_interval(), Some(Duration::from_secs(30)));
        let unset_pid = Notifier::from_env(&env(&path, Some("30000000"), None), 7);
        assert_eq!(unset_pid.watchdog_interval(), Some(Duration::from_secs(30)));
        let other = Notifier::from_env(&env(&path, Some("30000000"), Some("8")), 7);
        assert_eq!(other.watchdog_interval(), None);
        for bad in ["0", "", "soon"] {
            let n = Notifier::from_env(&env(&path, Some(bad), None), 7);
            assert_eq!(n.watchdog_interval(), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn watchdog_pings_only_while_healthy() {
        let (_dir, socket, path) = listener();
        let n = Arc::new(Notifier::from_env(&env(&path, Some("40000"), None), 1));
        let healthy = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let check = healthy.clone();
        let task = n
            .spawn_watchdog(move || check.load(Ordering::Relaxed), stop.clone())
            .unwrap();
        // Unhealthy from the start: the only message is the status saying so, never a ping.
        let first = tokio::task::spawn_blocking({
            let socket = socket.try_clone().unwrap();
            move || recv(&socket)
        })
        .await
        .unwrap();
        assert!(first.starts_with("STATUS=unhealthy"), "{first}");
        healthy.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        while !seen.iter().any(|m: &String| m == "WATCHDOG=1\n") {
            let socket = socket.try_clone().unwrap();
            seen.push(
                tokio::task::spawn_blocking(move || recv(&socket))
                    .await
                    .unwrap(),
            );
        }
        assert!(
            seen.iter().all(|m| !m.starts_with("STATUS=unhealthy")),
            "{seen:?}"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
