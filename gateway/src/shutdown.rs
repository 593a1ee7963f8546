//! Signals: SIGTERM/SIGINT stop the daemon, SIGHUP reloads what can change without a restart. And
//! the [`Supervisor`] of the long-lived tasks: one that panics stops the whole daemon.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use prometheus::IntCounterVec;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs the daemon's long-lived tasks (delivery, reconciliation, the HTTP channels' hub, the
/// listeners). A task that panics is logged, counted (`posgate_task_panics_total{task}`) and
/// stops the daemon, which then exits 1 so that systemd restarts it whole: a daemon whose
/// delivery task died would otherwise look alive, answer webhooks `200` and deliver nothing.
#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    token: CancellationToken,
    panics: IntCounterVec,
    failed: Arc<OnceLock<&'static str>>,
}

impl Supervisor {
    /// Tasks run in `tracker`; a panic cancels `token` (the daemon's shutdown).
    pub fn new(tracker: TaskTracker, token: CancellationToken, panics: IntCounterVec) -> Self {
        Supervisor {
            tracker,
            token,
            panics,
            failed: Arc::default(),
        }
    }

    /// Runs `task` (already instrumented by the caller) as `name`.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        let (token, panics, failed) =
            (self.token.clone(), self.panics.clone(), self.failed.clone());
        // The watcher is tracked, so shutdown waits for the task through it.
        self.tracker.spawn(async move {
            if let Err(e) = handle.await
                && e.is_panic()
            {
                tracing::error!(task = name, "a background task panicked; stopping posgate (exit 1) so that systemd restarts it");
                panics.with_label_values(&[name]).inc();
                // Only the first panic is named; later ones are counted.
                let _first = failed.set(name);
                token.cancel();
            }
        });
    }

    /// The first task that panicked, if any.
    pub fn failed(&self) -> Option<&'static str> {
        self.failed.get().copied()
    }
}

/// SIGTERM and SIGINT handlers. Install them before anything is announced as listening: a signal
/// that arrives earlier would otherwise kill the process with the default action instead of
/// draining it.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM or SIGINT: drain and stop.
    Stop(&'static str),
    /// SIGHUP: reload webhook secrets and revocations.
    Reload,
}

impl Signals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves on the next SIGTERM, SIGINT or SIGHUP.
    pub async fn recv(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panicking task is counted, named, and stops the daemon (its token is cancelled).
    #[tokio::test]
    async fn a_panicking_task_stops_the_daemon_and_is_counted() {
        let panics = IntCounterVec::new(prometheus::Opts::new("p", "p"), &["task"]).unwrap();
        let (tracker, token) = (TaskTracker::new(), CancellationToken::new());
        let supervisor = Supervisor::new(tracker.clone(), token.clone(), panics.clone());
        supervisor.spawn("fine", async {});
        supervisor.spawn("broken", async { panic!("injected") });
        tokio::time::timeout(std::time::Duration::from_secs(10), token.cancelled())
            .await
            .expect("the panic stops the daemon");
        assert_eq!(supervisor.failed(), Some("broken"));
        assert_eq!(panics.with_label_values(&["broken"]).get(), 1);
        assert_eq!(panics.with_label_values(&["fine"]).get(), 0);
        tracker.close();
        tracker.wait().await;
    }
}
