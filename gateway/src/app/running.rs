//! A serving gateway ([`Running`]): its handles for the CLI and tests, what SIGHUP applies
//! without a restart ([`Running::reload`]), and the drain ([`Running::shutdown`]).

use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Running;
use crate::config::Config;
use crate::store::{Store, StoreError};

// === impl Running ===

impl Running {
    /// Cancelled when shutdown starts; cancel it to request a shutdown.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The background task that panicked and stopped the daemon, if one did.
    pub fn failed(&self) -> Option<&'static str> {
        self.supervisor.failed()
    }

    /// The admin API's bearer token.
    pub fn admin_token(&self) -> &SecretString {
        &self.admin_token
    }

    /// The store, for in-process inspection (tests, the simulator's demo).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Applies what can change without a restart (SIGHUP): the webhook secrets from `config`, and
    /// the revocations recorded in the store. Connections stay up.
    ///
    /// # Errors
    /// When the store cannot be read (nothing is changed then).
    pub async fn reload(&self, config: &Config) -> Result<(), StoreError> {
        let (serials, revoked) = self.store.revocations().await?;
        let count = config.provider.webhook_secrets.len();
        // Replaced whole, so a poisoned lock holds nothing half-written: never skip a rotation.
        *self
            .secrets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            config.provider.webhook_secrets.clone();
        self.broker.set_revoked(&serials, &revoked);
        if count == 0 {
            tracing::warn!(
                "reloaded: provider.webhook_secrets is empty, every webhook is answered 401"
            );
        }
        tracing::info!(
            webhook_secrets = count,
            revoked_terminals = revoked.len(),
            log_level = %config.log.level,
            "reloaded"
        );
        Ok(())
    }

    /// Stops the listeners, waits at most `grace` for in-flight requests, then cuts every
    /// connection still open and closes the store. Returns how long the drain took.
    pub async fn shutdown(self, grace: Duration) -> Duration {
        let started = Instant::now();
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "in-flight requests did not finish in time; cutting them"
            );
            self.hard_stop.cancel();
            // The connections end at once; give what else is left a moment, then go on.
            if tokio::time::timeout(Duration::from_secs(1), self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("tasks still running after the hard stop; closing the store anyway");
            }
        }
        self.store.close().await;
        let took = started.elapsed();
        tracing::info!(took_ms = took.as_millis() as u64, "stopped; store closed");
        took
    }
}
