//! [`Files`]: the broker's `acl` and `crl.pem` (NATS: `authorization.conf`) kept in step with
//! the store, and the reload command run after each change (and once more when they settle).

use super::*;

/// Keeps the broker's `acl` and `crl.pem` (NATS: `authorization.conf`) in
/// `mqtt.external_broker_dir` in step with the store:
/// written at start and after every change of the registry or of the revocations, each file
/// replaced whole (written aside, then renamed), then `mqtt.external_reload_command` is run.
pub struct Files {
    pub dir: PathBuf,
    /// Which files: Mosquitto's ACL and CRL, or NATS's authorization include file.
    pub kind: BrokerKind,
    pub reload_command: Vec<String>,
    pub store: Store,
    pub pki: Arc<Pki>,
    /// The client whose revocations this task completes (it cuts their sessions).
    pub handle: Handle,
}

/// How long the files must stay unchanged after a reload before the broker is told to reload
/// once more (longer than a reload of a large ACL takes).
pub(super) const SETTLE: Duration = Duration::from_secs(2);

impl Files {
    /// Runs until `token` is cancelled.
    pub async fn run(self, token: CancellationToken) {
        let state = self.handle.files.clone();
        state
            .active
            .store(true, std::sync::atomic::Ordering::Release);
        let mut last: Option<(String, BTreeSet<String>)> = None;
        // Files written since the last reload that nothing followed for [`SETTLE`].
        let mut unsettled = false;
        loop {
            let synced = self.sync(&mut last).await;
            // Cut after the reload (also after a failed one: the session is cut at least).
            let kicks =
                std::mem::take(&mut *state.kicks.lock().unwrap_or_else(PoisonError::into_inner));
            for terminal_id in kicks {
                self.handle.kick(&terminal_id);
            }
            match synced {
                Ok(wrote) => unsettled |= wrote,
                Err(e) => {
                    tracing::error!(error = %crate::cli::error_chain(&e), dir = %self.dir.display(), "the external broker's files were not updated; retrying in 5 s");
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    continue;
                }
            }
            if unsettled {
                // A broker may lose a reload asked for while it is reloading (Mosquitto clears
                // its reload flag *after* reloading: a SIGHUP in between is dropped, and the
                // terminals provisioned last stayed out of its ACL until the next change). Once
                // the changes stop for a moment, the broker is told once more.
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = state.wake.notified() => continue,
                    _ = tokio::time::sleep(SETTLE) => {
                        self.reload().await;
                        unsettled = false;
                    }
                }
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = state.wake.notified() => {}
            }
        }
    }

    /// Writes the files if what they say changed, then runs the reload command; true when it
    /// wrote.
    async fn sync(
        &self,
        last: &mut Option<(String, BTreeSet<String>)>,
    ) -> Result<bool, ExternalError> {
        let store_error = |e: crate::store::StoreError| ExternalError::Write {
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        };
        let records = self.store.terminals().await.map_err(store_error)?;
        let (serials, _) = self.store.revocations().await.map_err(store_error)?;
        let mut revoked: BTreeSet<String> = serials.into_iter().collect();
        let mut allowed = Vec::new();
        for (record, _) in &records {
            if record.revoked_at.is_some() {
                revoked.insert(record.cert_serial.clone());
            } else {
                allowed.push(record.id.as_str());
            }
        }
        let terminals = allowed.len();
        let (main, crl_too) = match self.kind {
            BrokerKind::Mosquitto => (crate::broker::mosquitto::acl(allowed), true),
            // NATS reads no CRL: only live certificates have a user (one each), so a revoked
            // terminal's certificates, a replaced one and any revoked serial are refused.
            BrokerKind::Nats => {
                let serials: BTreeSet<crate::pki::Serial> = revoked
                    .iter()
                    .map(|s| crate::pki::Serial::parse(s))
                    .collect();
                revoked.clear();
                let users = records
                    .iter()
                    .map(|(record, _)| crate::broker::nats::Users::of(record, &serials));
                (crate::broker::nats::authorization(users), false)
            }
        };
        if last
            .as_ref()
            .is_some_and(|(a, r)| *a == main && *r == revoked)
        {
            return Ok(false);
        }
        if crl_too {
            let crl = self.pki.crl_pem(revoked.iter().map(String::as_str))?;
            write_file(&self.dir.join(crate::broker::mosquitto::ACL_FILE), &main)?;
            write_file(&self.dir.join(crate::broker::mosquitto::CRL_FILE), &crl)?;
        } else {
            write_file(&self.dir.join(crate::broker::nats::AUTH_FILE), &main)?;
        }
        tracing::info!(terminals, revoked = revoked.len(), dir = %self.dir.display(), "external broker files written");
        *last = Some((main, revoked));
        self.reload().await;
        Ok(true)
    }

    async fn reload(&self) {
        let Some((program, args)) = self.reload_command.split_first() else {
            return;
        };
        let status = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(program)
                .args(args)
                .kill_on_drop(true)
                .status(),
        )
        .await;
        match status {
            Ok(Ok(s)) if s.success() => tracing::debug!("external broker reloaded"),
            Ok(Ok(s)) => {
                tracing::error!(command = ?self.reload_command, status = %s, "mqtt.external_reload_command failed: the broker may be using old ACL and CRL files")
            }
            Ok(Err(e)) => {
                tracing::error!(command = ?self.reload_command, error = %e, "mqtt.external_reload_command could not be run")
            }
            Err(_) => {
                tracing::error!(command = ?self.reload_command, "mqtt.external_reload_command did not finish within 10 s")
            }
        }
    }
}

/// Replaces `path` whole: written next to it, synced, renamed over it; readable by the broker's
/// user (nothing in it is secret).
pub fn write_file(path: &Path, contents: &str) -> Result<(), ExternalError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| ExternalError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)?;
    Ok(())
}
