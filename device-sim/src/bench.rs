//! Benchmarks: load generators that print a table and write a JSON report.
//!
//! `ingest`: sustained durable webhooks/s over real HTTP on 127.0.0.1 from concurrent senders, with
//! the answer-time distribution. Each sender keeps one HTTP/1.1 keep-alive connection (as a provider's
//! delivery worker does) and sends distinct, freshly signed events: for every payment a
//! `payment_intent.confirmed` (creates the intent) then its `transaction.created`. A baseline phase
//! with the same senders against `GET /healthz` runs beside it, so the cost of verification plus
//! durable storage shows as a ratio on the same machine in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use posgate_proto::MicroUsdc;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::events::{self, Intent};

/// Options of `bench ingest`.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Ingress address of a running gateway; when `None`, a `posgate` child process is started.
    pub target: Option<SocketAddr>,
    /// Admin address of the target (for the baseline phase); derived when the child is ours.
    pub admin: Option<SocketAddr>,
    /// Webhook secret the target accepts.
    pub secret: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// `posgate` binary for the child process (default: next to this executable).
    pub posgate_bin: Option<PathBuf>,
    /// Log level of the child process.
    pub log_level: String,
    /// Skip the `/healthz` baseline.
    pub no_baseline: bool,
    /// Process whose RSS is reported (default: the child).
    pub pid: Option<u32>,
    /// The child's store on PostgreSQL at this URL instead of redb.
    pub postgres_url: Option<String>,
}

/// Latency summary in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One measured phase.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub requests: u64,
    pub per_second: f64,
    pub errors: u64,
    pub latency_ms: Latency,
}

/// The `bench ingest` report.
#[derive(Clone, Debug, Serialize)]
pub struct IngestReport {
    pub scenario: &'static str,
    /// `redb` or `postgres`: where the gateway kept what it accepted.
    pub store: &'static str,
    pub concurrency: usize,
    pub duration_secs: f64,
    pub webhooks: Phase,
    pub duplicates: u64,
    pub status_counts: std::collections::BTreeMap<u16, u64>,
    pub baseline: Option<Phase>,
    /// webhooks/s divided by baseline requests/s.
    pub ratio_to_baseline: Option<f64>,
    pub target_rss_mib: Option<f64>,
}

/// The admin token of gateways the benchmarks start.
pub const CHILD_ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// A `posgate` child process with a temporary data dir.
pub struct Child {
    pub process: tokio::process::Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub mqtt: SocketAddr,
    dir: tempfile::TempDir,
}

impl Child {
    /// The gateway's data dir (its database, keys and admin token).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file the gateway's log lines (its standard output) go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("posgate.log")
    }
}

/// The `posgate` binary next to this executable.
///
/// # Errors
/// When it is not there.
pub fn default_posgate_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let bin = exe.with_file_name("posgate");
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p posgate) or pass --posgate-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Starts `posgate` on 127.0.0.1:0 ports with a temporary data dir and waits for its addresses.
///
/// # Errors
/// When it cannot start or does not report its addresses within 30 s.
pub async fn start_child(
    bin: &Path,
    secret: &str,
    log_level: &str,
    extra_env: &[(&str, &str)],
) -> anyhow::Result<Child> {
    let dir = tempfile::tempdir().context("creating a temporary data dir")?;
    let log_path = dir.path().join("posgate.log");
    let log = std::fs::File::create(&log_path).context("creating the child's log")?;
    let mut command = tokio::process::Command::new(bin);
    command
        .env("POSGATE__DATA_DIR", dir.path().join("data"))
        .env("POSGATE__INGRESS__LISTEN", "127.0.0.1:0")
        .env("POSGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("POSGATE__MQTT__LISTEN", "127.0.0.1:0")
        .env("POSGATE__PROVIDER__WEBHOOK_SECRETS", secret)
        .env("POSGATE__ADMIN__TOKEN", CHILD_ADMIN_TOKEN)
        // The bound addresses are logged at info by these two modules, whatever the level asked.
        .env(
            "POSGATE__LOG__LEVEL",
            format!("{log_level},posgate::app=info,posgate::broker=info"),
        );
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let process = command
        .stdout(log)
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let (Some(ingress), Some(admin), Some(mqtt)) = (
            find_addr(&text, "ingress_addr="),
            find_addr(&text, "admin_addr="),
            find_addr(&text, "mqtt_addr="),
        ) {
            return Ok(Child {
                process,
                ingress,
                admin,
                mqtt,
                dir,
            });
        }
        if Instant::now() > deadline {
            bail!("posgate did not report its addresses within 30 s; log:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finds `key<addr>` in a log.
pub fn find_addr(log: &str, key: &str) -> Option<SocketAddr> {
    let start = log.find(key)? + key.len();
    let rest = log[start..].trim_start_matches('"');
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Resident set size of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU time (user and system) `pid` has used so far, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): state is field 3, utime
    // and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3)?.parse::<u64>().ok();
    Some((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

struct WorkerResult {
    histogram: Histogram<u64>,
    statuses: std::collections::BTreeMap<u16, u64>,
    duplicates: u64,
    errors: u64,
}

/// A histogram of microseconds up to 60 s.
///
/// # Errors
/// Never in practice (fixed bounds).
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

async fn connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One sender: distinct signed webhooks on one keep-alive connection until `end`.
async fn webhook_worker(
    addr: SocketAddr,
    secret: String,
    worker: usize,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<WorkerResult> {
    let mut sender = connect(addr).await?;
    let mut result = WorkerResult {
        histogram: new_histogram()?,
        statuses: Default::default(),
        duplicates: 0,
        errors: 0,
    };
    let run = std::process::id();
    let mut seq: u64 = 0;
    let mut intent = Intent::new("pi_x", MicroUsdc(4_500_000), "pos-bench");
    while Instant::now() < end {
        let payment = seq / 2;
        let body = if seq.is_multiple_of(2) {
            intent = Intent::new(
                &format!("pi_b{run}w{worker}n{payment}"),
                MicroUsdc(4_500_000),
                &format!("pos-{worker}"),
            );
            events::intent_event(&format!("evt_b{run}w{worker}n{seq}"), "confirmed", &intent)
        } else {
            events::transaction_event(
                &format!("evt_b{run}w{worker}n{seq}"),
                &format!("txn_b{run}w{worker}n{payment}"),
                &intent,
                intent.amount,
                intent.created_at,
            )
        };
        seq += 1;
        let mut request = Request::post(events::WEBHOOK_PATH)
            .header("host", addr.to_string())
            .header("content-type", "application/json");
        for (name, value) in events::signed_headers(&secret, events::now_unix(), body.as_bytes()) {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let started = Instant::now();
        let outcome = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        }
        .await;
        let took = started.elapsed();
        if started < measure_from {
            continue;
        }
        match outcome {
            Ok((status, body)) => {
                *result.statuses.entry(status).or_default() += 1;
                if status == 200 {
                    result.histogram.record(took.as_micros().max(1) as u64)?;
                    if body.windows(16).any(|w| w == b"\"duplicate\":true") {
                        result.duplicates += 1;
                    }
                } else {
                    result.errors += 1;
                }
            }
            Err(_) => {
                result.errors += 1;
                sender = connect(addr).await?;
            }
        }
    }
    Ok(result)
}

/// One sender of `GET /healthz` (the baseline: HTTP on this machine with no work behind it).
async fn healthz_worker(
    addr: SocketAddr,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<WorkerResult> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut result = WorkerResult {
        histogram: new_histogram()?,
        statuses: Default::default(),
        duplicates: 0,
        errors: 0,
    };
    while Instant::now() < end {
        let request = Request::get("/healthz")
            .header("host", addr.to_string())
            .body(Empty::new())?;
        let started = Instant::now();
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        if started >= measure_from {
            *result.statuses.entry(status).or_default() += 1;
            result
                .histogram
                .record(started.elapsed().as_micros().max(1) as u64)?;
        }
    }
    Ok(result)
}

fn merge(
    name: &str,
    results: Vec<WorkerResult>,
    measured: Duration,
) -> anyhow::Result<(Phase, WorkerResult)> {
    let mut total = WorkerResult {
        histogram: new_histogram()?,
        statuses: Default::default(),
        duplicates: 0,
        errors: 0,
    };
    for r in results {
        total.histogram.add(&r.histogram)?;
        for (status, n) in r.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        total.duplicates += r.duplicates;
        total.errors += r.errors;
    }
    let ok = total.histogram.len();
    let phase = Phase {
        name: name.to_owned(),
        requests: ok,
        per_second: ok as f64 / measured.as_secs_f64(),
        errors: total.errors,
        latency_ms: Latency::of(&total.histogram),
    };
    Ok((phase, total))
}

/// Runs `bench ingest`.
///
/// # Errors
/// When the target cannot be started or reached.
pub async fn ingest(opts: &IngestOptions) -> anyhow::Result<IngestReport> {
    let mut child = None;
    let (target, admin) = match opts.target {
        Some(target) => (target, opts.admin),
        None => {
            let bin = match &opts.posgate_bin {
                Some(bin) => bin.clone(),
                None => default_posgate_bin()?,
            };
            let mut env = Vec::new();
            if let Some(url) = &opts.postgres_url {
                env.push(("POSGATE__STORE__BACKEND", "postgres"));
                env.push(("POSGATE__STORE__POSTGRES_URL", url.as_str()));
            }
            let c = start_child(&bin, &opts.secret, &opts.log_level, &env).await?;
            let addrs = (c.ingress, Some(c.admin));
            child = Some(c);
            addrs
        }
    };
    let pid = opts
        .pid
        .or_else(|| child.as_ref().and_then(|c| c.process.id()));

    let baseline = match (admin, opts.no_baseline) {
        (Some(admin), false) => {
            let start = Instant::now();
            let (measure_from, end) = (start + opts.warmup, start + opts.warmup + opts.duration);
            let tasks: Vec<_> = (0..opts.concurrency)
                .map(|_| tokio::spawn(healthz_worker(admin, measure_from, end)))
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await??);
            }
            Some(merge("baseline GET /healthz", results, opts.duration)?.0)
        }
        _ => None,
    };

    let start = Instant::now();
    let (measure_from, end) = (start + opts.warmup, start + opts.warmup + opts.duration);
    let tasks: Vec<_> = (0..opts.concurrency)
        .map(|w| {
            tokio::spawn(webhook_worker(
                target,
                opts.secret.clone(),
                w,
                measure_from,
                end,
            ))
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    let (webhooks, total) = merge("durable webhooks", results, opts.duration)?;
    let target_rss_mib = pid.and_then(rss_mib);
    if let Some(mut c) = child {
        c.process.kill().await.ok();
    }
    let ratio_to_baseline = baseline
        .as_ref()
        .map(|b| webhooks.per_second / b.per_second);
    Ok(IngestReport {
        scenario: "ingest",
        store: if opts.postgres_url.is_some() {
            "postgres"
        } else {
            "redb"
        },
        concurrency: opts.concurrency,
        duration_secs: opts.duration.as_secs_f64(),
        duplicates: total.duplicates,
        status_counts: total.statuses,
        webhooks,
        baseline,
        ratio_to_baseline,
        target_rss_mib,
    })
}

/// Prints a report as a table.
pub fn print_ingest(report: &IngestReport) {
    println!(
        "bench ingest: {} concurrent senders, {:.0} s measured, store {}",
        report.concurrency, report.duration_secs, report.store
    );
    println!(
        "{:<24} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "phase", "requests", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9", "max ms", "errors"
    );
    for phase in report
        .baseline
        .iter()
        .chain(std::iter::once(&report.webhooks))
    {
        let l = &phase.latency_ms;
        println!(
            "{:<24} {:>10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}",
            phase.name,
            phase.requests,
            phase.per_second,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            phase.errors
        );
    }
    if let Some(ratio) = report.ratio_to_baseline {
        println!("durable webhooks / baseline: {ratio:.2}");
    }
    println!(
        "answers by status: {:?}; duplicates: {}",
        report.status_counts, report.duplicates
    );
    if let Some(rss) = report.target_rss_mib {
        println!("gateway RSS at the end: {rss:.1} MiB");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_secs_counts_this_process_working() {
        let me = std::process::id();
        let before = cpu_secs(me).expect("this process's /proc/self/stat");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut spin = 0u64;
        while cpu_secs(me).unwrap() < before + 0.05 {
            assert!(Instant::now() < deadline, "no CPU time counted in 10 s");
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        assert_eq!(cpu_secs(u32::MAX), None);
    }
}
