//! The lease task: renews, claims, hands over and releases this replica's shards.
//!
//! One transaction per cycle (READ COMMITTED; the row locks do the work):
//! 1. the heartbeat (`replicas.seen_at = now()`);
//! 2. renew every lease this replica still holds (`WHERE owner = me`: a lease another replica
//!    claimed after it expired is not ours any more, and the renewal does not touch it);
//! 3. count the replicas seen within one lease time: the fair share is `ceil(64 / live)`;
//! 4. above the share (a replica joined): stop publishing for the excess first (`Ownership::withdraw`),
//!    then free those rows, and `NOTIFY posgate_leases` so the others claim at once; below it:
//!    claim free or expired rows (`FOR UPDATE SKIP LOCKED`: two claimers never wait on, nor
//!    take, the same row).
//!
//! The validity window of what the cycle returns starts at the local instant read *before* the
//! transaction began, so it ends before the database's expiry (see the module above).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{Input, Ownership, SHARDS, Settings};
use crate::metrics::Metrics;
use crate::store::PgTls;

/// Heartbeat rows of replicas not seen for this long are deleted (ids are new per start).
const FORGET_REPLICAS_AFTER: &str = "1 hour";

/// The lease task of one replica.
pub struct Leases {
    url: String,
    tls: PgTls,
    settings: Settings,
    ownership: Ownership,
    /// The delivery engine (gains and losses).
    engine: mpsc::UnboundedSender<Input>,
    /// Rung by the listener when another replica released shards or stopped: claim now rather
    /// than at the next renewal.
    wake: Arc<Notify>,
    metrics: Option<Metrics>,
    /// What the engine was last told this replica owns.
    held: BTreeSet<u16>,
    /// The first cycle committed (and told the others that this replica joined).
    joined: bool,
}

impl Leases {
    pub fn new(
        url: String,
        tls: PgTls,
        settings: Settings,
        ownership: Ownership,
        engine: mpsc::UnboundedSender<Input>,
        wake: Arc<Notify>,
    ) -> Self {
        Leases {
            url,
            tls,
            settings,
            ownership,
            engine,
            wake,
            metrics: None,
            held: BTreeSet::new(),
            joined: false,
        }
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs until `token` is cancelled, then releases every shard (a clean stop hands them over
    /// at once instead of after the lease time).
    pub async fn run(mut self, token: CancellationToken) {
        let mut client: Option<Client> = None;
        let mut next = Instant::now();
        loop {
            // Wake at the next renewal, or when a validity window closes (the engine forgets
            // those terminals), or when told.
            let until = self
                .ownership
                .earliest_end()
                .map_or(next, |end| end.min(next));
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep_until(until) => {}
                () = self.wake.notified() => next = Instant::now(),
            }
            self.expire();
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + self.settings.renew_every();
            if client.is_none() {
                client = self.connect().await;
            }
            let Some(c) = client.as_mut() else {
                self.failed();
                continue;
            };
            match self.cycle(c).await {
                Ok(()) => {
                    self.ownership.set_renewing(true);
                    if let Some(m) = &self.metrics {
                        m.lease_renewals.inc();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, error_chain = ?e, "cannot renew shard leases");
                    self.failed();
                    // A broken connection is replaced at the next cycle.
                    if c.is_closed() {
                        client = None;
                    }
                }
            }
        }
        self.release_all(client).await;
    }

    async fn connect(&self) -> Option<Client> {
        match tokio_postgres::connect(&self.url, self.tls.connector()).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "lease connection closed");
                    }
                });
                Some(client)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to PostgreSQL for shard leases");
                None
            }
        }
    }

    fn failed(&self) {
        self.ownership.set_renewing(false);
        if let Some(m) = &self.metrics {
            m.lease_failures.inc();
        }
    }

    /// Validity windows that closed since the last look: tell the engine.
    fn expire(&mut self) {
        let owned = self.ownership.owned();
        let lost: BTreeSet<u16> = self.held.difference(&owned).copied().collect();
        if !lost.is_empty() {
            tracing::warn!(shards = ?lost, "shard leases lapsed (not renewed in time)");
            self.count("lapsed", lost.len());
            self.held = owned;
            self.told(Input::Lost(lost));
        }
    }

    /// One renewal cycle; see the module's docs.
    async fn cycle(&mut self, client: &mut Client) -> Result<(), tokio_postgres::Error> {
        let started = Instant::now();
        let lease_ms = self.settings.lease.as_millis() as f64;
        let id = self.settings.id.as_str();
        let txn = client.transaction().await?;
        txn.execute(
            "INSERT INTO replicas (id, seen_at) VALUES ($1, now()) \
                 ON CONFLICT (id) DO UPDATE SET seen_at = now()",
            &[&id],
        )
        .await?;
        let renewed = txn
            .query(
                "UPDATE shard_leases SET expires_at = now() + $2::float8 * interval '1 millisecond' \
                 WHERE owner = $1 RETURNING shard",
                &[&id as &(dyn ToSql + Sync), &lease_ms],
            )
            .await?;
        let mut owned: BTreeSet<u16> = renewed.iter().map(|r| r.get::<_, i16>(0) as u16).collect();
        let live: i64 = txn
            .query_one(
                "SELECT count(*) FROM replicas \
                 WHERE seen_at > now() - $1::float8 * interval '1 millisecond'",
                &[&lease_ms],
            )
            .await?
            .get(0);
        let live = live.max(1) as usize;
        let share = usize::from(SHARDS).div_ceil(live);
        let mut released = BTreeSet::new();
        if owned.len() > share {
            released = owned
                .iter()
                .rev()
                .take(owned.len() - share)
                .copied()
                .collect();
            // The giver stops publishing before the rows are freed: from here on no publish
            // for these terminals starts on this replica.
            self.ownership.withdraw(&released);
            self.held.retain(|s| !released.contains(s));
            self.told(Input::Lost(released.clone()));
            let list: Vec<i16> = released.iter().map(|s| *s as i16).collect();
            txn.execute(
                "UPDATE shard_leases SET owner = NULL, expires_at = '-infinity' \
                 WHERE owner = $1 AND shard = ANY($2)",
                &[&id as &(dyn ToSql + Sync), &list],
            )
            .await?;
            owned.retain(|s| !released.contains(s));
        } else if owned.len() < share {
            let want = (share - owned.len()) as i64;
            let claimed = txn
                .query(
                    "WITH free AS (SELECT shard FROM shard_leases \
                       WHERE owner IS NULL OR expires_at < now() \
                       ORDER BY shard LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     UPDATE shard_leases s SET owner = $1, \
                       expires_at = now() + $3::float8 * interval '1 millisecond' \
                     FROM free WHERE s.shard = free.shard RETURNING s.shard",
                    &[&id as &(dyn ToSql + Sync), &want, &lease_ms],
                )
                .await?;
            owned.extend(claimed.iter().map(|r| r.get::<_, i16>(0) as u16));
        }
        if !released.is_empty() || !self.joined {
            // The others rebalance now instead of at their next renewal.
            txn.execute("SELECT pg_notify('posgate_leases', $1)", &[&id])
                .await?;
        }
        txn.execute(
            &format!(
                "DELETE FROM replicas WHERE seen_at < now() - interval '{FORGET_REPLICAS_AFTER}'"
            ),
            &[],
        )
        .await?;
        txn.commit().await?;
        self.joined = true;

        let until = started + self.settings.lease - self.settings.margin();
        if Instant::now() >= until {
            // The cycle took longer than the window it grants: own nothing rather than too long.
            tracing::warn!(
                took_ms = started.elapsed().as_millis() as u64,
                "the lease renewal took longer than the lease less its margin"
            );
            owned.clear();
        }
        self.ownership.grant(&owned, until);
        let gained: BTreeSet<u16> = owned.difference(&self.held).copied().collect();
        let lost: BTreeSet<u16> = self.held.difference(&owned).copied().collect();
        self.held = owned;
        if let Some(m) = &self.metrics {
            m.shards_owned.set(self.held.len() as i64);
        }
        if !lost.is_empty() {
            tracing::warn!(shards = ?lost, "shard leases lost to another replica");
            self.count("lost", lost.len());
            self.told(Input::Lost(lost));
        }
        if !gained.is_empty() || !released.is_empty() {
            tracing::info!(
                replica = %self.settings.id,
                gained = gained.len(),
                released = released.len(),
                owned = self.held.len(),
                live,
                "shard leases changed"
            );
        }
        self.count("released", released.len());
        self.count("gained", gained.len());
        if !gained.is_empty() {
            self.told(Input::Gained(gained));
        }
        Ok(())
    }

    fn count(&self, change: &str, shards: usize) {
        if let Some(m) = &self.metrics {
            m.shard_changes
                .with_label_values(&[change])
                .inc_by(shards as u64);
        }
    }

    fn told(&self, input: Input) {
        // The engine gone means shutdown; nothing to tell.
        drop(self.engine.send(input));
    }

    /// A clean stop: nothing is published for the shards from now on, then they are freed and
    /// the others told, so they take over at once.
    async fn release_all(&mut self, client: Option<Client>) {
        let all = self.held.clone();
        self.ownership.withdraw(&all);
        self.ownership.set_renewing(false);
        if let Some(m) = &self.metrics {
            m.shards_owned.set(0);
        }
        let client = match client {
            Some(c) => Some(c),
            None => self.connect().await,
        };
        let Some(client) = client else { return };
        let id = self.settings.id.as_str();
        let release = async {
            client
                .execute(
                    "UPDATE shard_leases SET owner = NULL, expires_at = '-infinity' WHERE owner = $1",
                    &[&id],
                )
                .await?;
            client
                .execute("DELETE FROM replicas WHERE id = $1", &[&id])
                .await?;
            client
                .execute("SELECT pg_notify('posgate_leases', $1)", &[&id])
                .await
        };
        match tokio::time::timeout(Duration::from_secs(5), release).await {
            Ok(Ok(_)) => tracing::info!(shards = all.len(), "shard leases released"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "shard leases not released; they expire by themselves")
            }
            Err(_) => tracing::warn!("shard leases not released in 5 s; they expire by themselves"),
        }
    }
}
