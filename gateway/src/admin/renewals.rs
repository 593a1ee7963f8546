//! Certificate renewals in flight (`POST /v1/terminals/{id}/certificate`): the replaced
//! certificate stays accepted until the new one is first used, by an MQTT CONNECT or an HTTP
//! channel request over TLS made with it, or until its deadline (`revoke_old_after`), whichever
//! comes first; then it is revoked like a revoked terminal's certificate, and cut from the broker
//! if a session still uses it.
//!
//! The store holds the truth ([`TerminalRecord::previous_cert`], written in the renewal's own
//! transaction, and `revoked_serials` once it completes), so a restart resumes where it stood:
//! renewals whose deadline passed while the daemon was down complete before the broker takes its
//! first connection ([`Renewals::load`]). [`Renewals`] adds an in-memory index (terminal id → the
//! new serial and the deadline) so the broker's CONNECT hook answers "is this the first use of a
//! renewal?" in a read lock, and one task ([`Renewals::run`]) does the revoking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pki::Serial;
use crate::store::{Retired, Store, StoreError, TerminalRecord};

/// The longest the task sleeps without looking at the clock again (a wall-clock deadline and a
/// monotonic sleep drift apart when the clock is set).
const RECHECK: Duration = Duration::from_secs(300);

/// What wakes the task.
enum Wake {
    /// A terminal used a certificate with this serial.
    Used { terminal_id: String, serial: String },
    /// A renewal was recorded (a new deadline to wait for).
    Scheduled,
    /// A renewal revoked this never-used certificate at once.
    Superseded(Retired),
}

/// The renewals waiting for their new certificate's first use; cheap to clone.
#[derive(Clone)]
pub struct Renewals {
    inner: Arc<Inner>,
}

struct Inner {
    /// Terminal id → (serial of the new certificate, deadline of the replaced one).
    waiting: RwLock<HashMap<String, (Serial, OffsetDateTime)>>,
    wake: mpsc::UnboundedSender<Wake>,
    woken: Mutex<Option<mpsc::UnboundedReceiver<Wake>>>,
}

impl Renewals {
    /// Completes the renewals whose deadline has passed, then indexes the others. Call it before
    /// the broker reads the revocations, so no replaced certificate past its deadline connects.
    ///
    /// # Errors
    /// When the store cannot be read or written.
    pub async fn load(store: &Store) -> Result<Renewals, StoreError> {
        for retired in store.retire_due(OffsetDateTime::now_utc()).await? {
            log_retired(&retired);
        }
        let renewals = Renewals::empty();
        for record in store.renewing().await? {
            renewals.pending(&record);
        }
        Ok(renewals)
    }

    fn empty() -> Renewals {
        let (wake, woken) = mpsc::unbounded_channel();
        Renewals {
            inner: Arc::new(Inner {
                waiting: RwLock::default(),
                wake,
                woken: Mutex::new(Some(woken)),
            }),
        }
    }

    /// A terminal authenticated with a certificate of this serial (its own: the caller checked).
    /// Cheap when no renewal waits for it, so it is called on every MQTT CONNECT.
    pub fn seen(&self, terminal_id: &str, serial: &str) {
        let first_use = self
            .inner
            .waiting
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(terminal_id)
            .is_some_and(|(new, _)| *new == Serial::parse(serial));
        if first_use {
            drop(self.inner.wake.send(Wake::Used {
                terminal_id: terminal_id.to_owned(),
                serial: serial.to_owned(),
            }));
        }
    }

    /// Indexes `record`'s pending renewal, if it has one. Called after the renewal is committed
    /// and before its bundle is answered, so the new certificate's first use cannot come first.
    pub(crate) fn pending(&self, record: &TerminalRecord) {
        let Some(previous) = &record.previous_cert else {
            return;
        };
        if record.revoked_at.is_some() {
            return;
        }
        self.inner
            .waiting
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                record.id.clone(),
                (Serial::parse(&record.cert_serial), previous.revoke_at),
            );
        drop(self.inner.wake.send(Wake::Scheduled));
    }

    /// A renewal revoked `retired` (never used) at once: the broker must refuse it too.
    pub(crate) fn superseded(&self, retired: Retired) {
        drop(self.inner.wake.send(Wake::Superseded(retired)));
    }

    /// Forgets `terminal_id`'s entry if it is still the one `done` describes.
    fn done(&self, terminal_id: &str, done: impl Fn(&Serial, OffsetDateTime) -> bool) {
        let mut waiting = self
            .inner
            .waiting
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if waiting
            .get(terminal_id)
            .is_some_and(|(serial, deadline)| done(serial, *deadline))
        {
            waiting.remove(terminal_id);
        }
    }

    fn next_deadline(&self) -> Option<OffsetDateTime> {
        self.inner
            .waiting
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|(_, deadline)| *deadline)
            .min()
    }

    /// Revokes replaced certificates as their renewals complete, until `token` is cancelled;
    /// `retire` makes the broker refuse a revoked serial (and cut a session still using it).
    /// Runs once per [`Renewals`] (a second call returns at once).
    pub async fn run(
        self,
        store: Store,
        retire: Arc<dyn Fn(&Retired) + Send + Sync>,
        token: CancellationToken,
    ) {
        let taken = self
            .inner
            .woken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut woken) = taken else {
            return;
        };
        loop {
            let sleep = match self.next_deadline() {
                Some(deadline) => {
                    let left = deadline - OffsetDateTime::now_utc();
                    Duration::try_from(left)
                        .unwrap_or(Duration::ZERO)
                        .min(RECHECK)
                }
                None => RECHECK,
            };
            tokio::select! {
                () = token.cancelled() => return,
                wake = woken.recv() => match wake {
                    None => return,
                    Some(Wake::Scheduled) => {}
                    Some(Wake::Superseded(retired)) => {
                        log_retired(&retired);
                        retire(&retired);
                    }
                    Some(Wake::Used { terminal_id, serial }) => {
                        match store.retire_used(terminal_id.clone(), serial.clone()).await {
                            Ok(Some(retired)) => {
                                log_retired(&retired);
                                retire(&retired);
                            }
                            Ok(None) => {}
                            // The entry stays: its deadline, or the next use, tries again.
                            Err(e) => {
                                tracing::error!(%terminal_id, error = %e, "cannot complete a certificate renewal");
                                continue;
                            }
                        }
                        let used = Serial::parse(&serial);
                        self.done(&terminal_id, |new, _| *new == used);
                    }
                },
                () = tokio::time::sleep(sleep) => {
                    let now = OffsetDateTime::now_utc();
                    match store.retire_due(now).await {
                        Ok(retired) => {
                            for r in &retired {
                                log_retired(r);
                                retire(r);
                            }
                            let ids: Vec<String> = self
                                .inner
                                .waiting
                                .read()
                                .unwrap_or_else(PoisonError::into_inner)
                                .keys()
                                .cloned()
                                .collect();
                            for id in ids {
                                self.done(&id, |_, deadline| deadline <= now);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot revoke replaced certificates past their deadline");
                            tokio::select! {
                                () = token.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                            }
                        }
                    }
                }
            }
        }
    }
}

fn log_retired(r: &Retired) {
    let why = if r.used {
        "the new certificate was used"
    } else {
        "its deadline passed"
    };
    tracing::info!(terminal_id = %r.terminal_id, serial = %r.serial, why, "replaced certificate revoked");
}
