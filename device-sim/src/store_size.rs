//! `posgate-sim bench store`: where the bytes of the redb file go, per webhook and per table,
//! and how long the repair after a crash takes at that size.
//!
//! The gateway's store is opened in this process on a temporary directory (no HTTP: what is
//! measured is the file, not the path to it). `terminals` terminals are registered, then
//! `events` webhooks shaped as `posgate-sim chaos` sends them (a new `payment_intent.confirmed`
//! per event, each for a random terminal) are ingested, `concurrency` at a time, and every
//! confirmation is acked as a terminal would, as it goes. Then, for each table: entries' bytes,
//! metadata, fragmentation and pages (redb's own statistics), divided by the number of events.
//! A copy of the file taken while the store is open (its last commit synced) is what a SIGKILL
//! leaves behind: opening it times redb's repair.

// std's clock on purpose: the repair is timed around a blocking open, outside any runtime task.
#![allow(clippy::disallowed_types)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use posgate::store::{IncomingEvent, Limits, NewTerminal, Store};
use posgate_proto::MicroUsdc;
use posgate_proto::event::{Envelope, EventData};
use redb::{MultimapTableHandle, ReadableTableMetadata, TableHandle};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::events::{self, Intent};

/// What to write.
#[derive(Clone, Debug)]
pub struct StoreBench {
    pub events: u64,
    pub terminals: usize,
    pub concurrency: usize,
}

/// One table's share of the file.
#[derive(Debug, Serialize)]
pub struct TableSize {
    pub table: String,
    pub entries: u64,
    /// Keys and values as stored.
    pub stored_bytes: u64,
    /// B-tree overhead: headers, branch pages.
    pub metadata_bytes: u64,
    /// Unused space inside the table's pages.
    pub fragmented_bytes: u64,
    pub pages: u64,
    /// All of the above (the pages' bytes) per event.
    pub bytes_per_event: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct StoreReport {
    pub events: u64,
    pub terminals: usize,
    pub seconds: f64,
    pub file_bytes: u64,
    pub file_bytes_per_event: f64,
    /// Pages in use (all tables, redb's own included) per event.
    pub allocated_bytes_per_event: f64,
    pub tables: Vec<TableSize>,
    /// Opening the copy a SIGKILL would leave with the gateway's own `Store::open` (redb's full
    /// repair included).
    pub repair_secs: f64,
}

impl StoreBench {
    /// Runs it in a temporary directory under `tmp` (or the system's).
    ///
    /// # Errors
    /// The store cannot be opened or written, or the file read.
    pub async fn run(&self, tmp: Option<&Path>) -> anyhow::Result<StoreReport> {
        let dir = match tmp {
            Some(t) => tempfile::tempdir_in(t)?,
            None => tempfile::tempdir()?,
        };
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let started = Instant::now();
        let store = {
            let data = data.clone();
            tokio::task::spawn_blocking(move || Store::open(&data, Limits::new(8192, 1024)))
                .await??
        };
        let ids: Arc<Vec<String>> =
            Arc::new((0..self.terminals).map(|n| format!("pos-{n:05}")).collect());
        for id in ids.iter() {
            store
                .register_terminal(NewTerminal {
                    id: id.clone(),
                    tenant: format!("t-{id}"),
                    merchant_id: "mer_sim".into(),
                    label: None,
                    cert_serial: format!("{:032x}", id.len()),
                    cert_not_after: None,
                    http_token_sha256: String::new(),
                })
                .await?
                .with_context(|| format!("{id} registered twice"))?;
        }
        let mut outbox = store.subscribe_outbox();
        let mut tasks = JoinSet::new();
        let mut acked = 0u64;
        for n in 0..self.events {
            while tasks.len() >= self.concurrency {
                if let Some(done) = tasks.join_next().await {
                    done??;
                }
            }
            let terminal = ids[rand::random_range(0..ids.len())].clone();
            let writer = store.clone();
            tasks.spawn(async move { writer.ingest(chaos_event(n, &terminal)).await.map(drop) });
            // Acks as terminals send them: a batch per turn of whatever was committed.
            while let Ok(rows) = outbox.try_recv() {
                let acks: Vec<_> = rows
                    .into_iter()
                    .map(|r| (r.terminal_id, r.intent_id, r.seq))
                    .collect();
                acked += acks.len() as u64;
                store.ack_many(acks).await?;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        // The rest, until every confirmation is acked.
        while acked < self.events {
            let Ok(Some(rows)) = tokio::time::timeout(Duration::from_secs(10), outbox.recv()).await
            else {
                anyhow::bail!(
                    "only {acked} of {} confirmations were enqueued",
                    self.events
                );
            };
            let acks: Vec<_> = rows
                .into_iter()
                .map(|r| (r.terminal_id, r.intent_id, r.seq))
                .collect();
            acked += acks.len() as u64;
            store.ack_many(acks).await?;
        }
        // A synced commit, so that the copy holds everything above.
        store
            .register_terminal(NewTerminal {
                id: "pos-sync".into(),
                tenant: "t-sync".into(),
                merchant_id: "mer_sim".into(),
                label: None,
                cert_serial: "ff".into(),
                cert_not_after: None,
                http_token_sha256: String::new(),
            })
            .await?
            .context("pos-sync registered twice")?;
        let db_file = data.join(posgate::store::DB_FILE);
        let crashed = dir.path().join("crashed.redb");
        std::fs::copy(&db_file, &crashed).context("copying the open database")?;
        let seconds = started.elapsed().as_secs_f64();
        store.close().await;

        let file_bytes = std::fs::metadata(&db_file)?.len();
        let (tables, allocated) = tokio::task::spawn_blocking({
            let db_file = db_file.clone();
            let events = self.events;
            move || table_sizes(&db_file, events)
        })
        .await??;
        // The gateway's own open: what a restart after a SIGKILL does before it binds.
        let reopen = dir.path().join("reopen");
        std::fs::create_dir_all(&reopen)?;
        std::fs::rename(&crashed, reopen.join(posgate::store::DB_FILE))?;
        let repair_secs = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let started = Instant::now();
            let store =
                Store::open(&reopen, Limits::new(64, 64)).context("opening the crashed copy")?;
            let took = started.elapsed().as_secs_f64();
            drop(store);
            Ok(took)
        })
        .await??;
        let per = |b: u64| b as f64 / self.events.max(1) as f64;
        Ok(StoreReport {
            events: self.events,
            terminals: self.terminals,
            seconds,
            file_bytes,
            file_bytes_per_event: per(file_bytes),
            allocated_bytes_per_event: per(allocated),
            tables,
            repair_secs,
        })
    }
}

/// The webhook `posgate-sim chaos` sends for its `n`th event.
fn chaos_event(n: u64, terminal: &str) -> IncomingEvent {
    let intent = Intent::new(
        &format!("pi_chaos_{n}"),
        MicroUsdc(1_000_000 + n % 1_000_000),
        terminal,
    );
    let event_id = format!("evt_chaos_{n}");
    let body = events::intent_event(&event_id, "confirmed", &intent);
    let (kind, created_at, data) = match Envelope::parse(body.as_bytes()) {
        Ok(env) => (
            env.kind.clone(),
            env.created_at,
            EventData::parse(env.event_type(), env.data).map_err(|e| e.to_string()),
        ),
        Err(e) => (String::new(), None, Err(e.to_string())),
    };
    IncomingEvent {
        event_id,
        kind,
        raw: Bytes::from(body),
        received_at: OffsetDateTime::now_utc(),
        created_at,
        data,
    }
}

/// Every table's statistics, and the bytes of every allocated page.
fn table_sizes(file: &Path, events: u64) -> anyhow::Result<(Vec<TableSize>, u64)> {
    let db = redb::Database::open(file)?;
    let mut out = Vec::new();
    let page_bytes =
        |s: &redb::TableStats| s.stored_bytes() + s.metadata_bytes() + s.fragmented_bytes();
    let per = |b: u64| b as f64 / events.max(1) as f64;
    let size = |table: &str, entries: u64, stats: redb::TableStats| TableSize {
        table: table.to_owned(),
        entries,
        stored_bytes: stats.stored_bytes(),
        metadata_bytes: stats.metadata_bytes(),
        fragmented_bytes: stats.fragmented_bytes(),
        pages: stats.leaf_pages() + stats.branch_pages(),
        bytes_per_event: per(page_bytes(&stats)),
    };
    {
        let txn = db.begin_read()?;
        for handle in txn.list_tables()? {
            let table = txn.open_untyped_table(handle.clone())?;
            out.push(size(handle.name(), table.len()?, table.stats()?));
        }
        for handle in txn.list_multimap_tables()? {
            let table = txn.open_untyped_multimap_table(handle.clone())?;
            out.push(size(handle.name(), table.len()?, table.stats()?));
        }
    }
    let txn = db.begin_write()?;
    let stats = txn.stats()?;
    let allocated = stats.allocated_pages() * stats.page_size() as u64;
    txn.abort()?;
    out.sort_by(|a, b| b.bytes_per_event.total_cmp(&a.bytes_per_event));
    Ok((out, allocated))
}

/// The report as a table.
pub fn print(report: &StoreReport) {
    println!(
        "{} events, {} terminals, written in {:.1} s; file {:.1} MB = {:.0} B/event, pages in use {:.0} B/event; repair after a crash {:.2} s",
        report.events,
        report.terminals,
        report.seconds,
        report.file_bytes as f64 / 1e6,
        report.file_bytes_per_event,
        report.allocated_bytes_per_event,
        report.repair_secs,
    );
    println!(
        "{:<20} {:>10} {:>12} {:>12} {:>12} {:>8} {:>9}",
        "table", "entries", "stored B", "metadata B", "fragment. B", "pages", "B/event"
    );
    for t in &report.tables {
        println!(
            "{:<20} {:>10} {:>12} {:>12} {:>12} {:>8} {:>9.1}",
            t.table,
            t.entries,
            t.stored_bytes,
            t.metadata_bytes,
            t.fragmented_bytes,
            t.pages,
            t.bytes_per_event
        );
    }
}
