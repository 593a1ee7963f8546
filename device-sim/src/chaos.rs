//! `posgate-sim chaos`: a soak of the real `posgate` binary under faults.
//!
//! N terminals (most on MQTT/TLS, some on SSE or WebSocket) and a steady webhook rate with the
//! provider's retries, while faults come at random intervals, one at a time: `SIGKILL` then a
//! restart on the same ports 1–2 s later (as systemd does), `SIGTERM` then a restart, terminals
//! dropping and reconnecting, and the data dir's tmpfs filled for a while. The [`checker`] proves
//! that every event answered `200` reached its terminal verified, that `seq` has no gaps and that
//! nothing was shown that was never sent; [`ChaosReport::clean`] says whether it held.
//!
//! # Layout
//! - [`daemon`]: the `posgate` process: start, restart on the same ports, kill, stop; the tmpfs.
//! - [`terminals`]: the terminal sessions, reporting to the checker.
//! - [`webhooks`]: the provider's side: paced events, each retried until `200`.
//! - [`checker`]: what was answered `200` against what each terminal showed.
//! - [`failover`]: the same load and accounting against several replicas on PostgreSQL behind
//!   an external broker ([`mosquitto`], or a [`nats`] cluster), one replica or broker node killed
//!   at a time (`posgate-sim failover`).

pub mod checker;
pub mod daemon;
pub mod failover;
pub mod mosquitto;
pub mod nats;
pub mod terminals;
pub mod webhooks;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::seq::index;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use self::checker::{Checker, Confirmations};
use self::daemon::{ADMIN_TOKEN, Daemon, Tmpfs};
use self::terminals::{Mix, Terminals};
use self::webhooks::{Senders, Webhooks};
use crate::bench::Latency;

/// A random length of time between `min` and `max` seconds (`"10..30"`, or `"15"` for exactly).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Every {
    pub min: Duration,
    pub max: Duration,
}

impl Every {
    /// From whole seconds.
    pub fn secs(min: u64, max: u64) -> Every {
        Every {
            min: Duration::from_secs(min),
            max: Duration::from_secs(max),
        }
    }

    fn pick(&self, rng: &mut StdRng) -> Duration {
        if self.max <= self.min {
            return self.min;
        }
        rng.random_range(self.min..=self.max)
    }
}

impl FromStr for Every {
    type Err = String;

    fn from_str(s: &str) -> Result<Every, String> {
        let secs = |x: &str| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{x:?} is not a positive number of seconds"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (secs(a)?, secs(b)?),
            None => (secs(s)?, secs(s)?),
        };
        if max < min {
            return Err(format!("{s:?}: MIN is above MAX"));
        }
        Ok(Every { min, max })
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The `posgate` binary.
    pub posgate: PathBuf,
    pub terminals: usize,
    /// How many of them use SSE or WebSocket (half each) instead of MQTT.
    pub http_terminals: usize,
    /// Webhooks (new events) per second.
    pub rate: f64,
    /// How long faults and new events go on.
    pub duration: Duration,
    /// Between two `SIGKILL`s; `None`: no kills.
    pub kill_every: Option<Every>,
    /// Between two `SIGTERM` restarts; `None`: none.
    pub term_every: Option<Every>,
    /// Between two drops of some terminals' connections; `None`: none.
    pub drop_every: Option<Every>,
    /// How long the daemon stays down after a kill or stop.
    pub restart_after: Every,
    /// Disk-full periods, spread evenly over the soak (needs a tmpfs mount).
    pub disk_full: usize,
    /// How long each disk-full period lasts.
    pub disk_full_for: Duration,
    /// Size of the tmpfs data dir (only with `disk_full`).
    pub tmpfs_mib: u64,
    /// After the soak: how long the provider keeps retrying, and how long delivery may take.
    pub drain: Duration,
    pub seed: u64,
    /// One line per fault on stderr.
    pub verbose: bool,
}

impl ChaosOptions {
    /// The defaults: 200 terminals (10 % on HTTP), 100 webhooks/s, a kill every 10–30 s.
    pub fn new(posgate: PathBuf, duration: Duration) -> ChaosOptions {
        ChaosOptions {
            posgate,
            terminals: 200,
            http_terminals: 20,
            rate: 100.0,
            duration,
            kill_every: Some(Every::secs(10, 30)),
            term_every: None,
            drop_every: None,
            restart_after: Every::secs(1, 2),
            disk_full: 0,
            disk_full_for: Duration::from_secs(10),
            tmpfs_mib: 2048,
            drain: Duration::from_secs(60),
            seed: 1,
            verbose: false,
        }
    }
}

/// The faults that happened.
#[derive(Debug, Default, Serialize)]
pub struct Faults {
    /// `SIGKILL`s.
    pub kills: u64,
    /// `SIGTERM` restarts.
    pub sigterms: u64,
    /// `SIGTERM`s that did not end in exit 0 within 30 s.
    pub unclean_stops: u64,
    /// Starts that exited 75 and were tried again.
    pub transient_start_failures: u64,
    /// Terminal connections dropped on purpose.
    pub terminal_drops: u64,
    /// Disk-full periods held.
    pub disk_full_periods: u64,
    /// `503` answers during them.
    pub disk_full_503s: u64,
    /// Why disk-full periods were asked for and skipped.
    pub disk_full_skipped: Option<String>,
}

/// Restart → every terminal connected again, in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Reconnects {
    pub restarts: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Restarts after which not every terminal came back within 60 s.
    pub timeouts: u64,
}

impl Reconnects {
    pub(crate) fn of(samples: &mut [Duration], timeouts: u64) -> Reconnects {
        samples.sort();
        let at = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len().max(1));
            samples.get(i - 1).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        Reconnects {
            restarts: samples.len() as u64 + timeouts,
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
            timeouts,
        }
    }
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub scenario: &'static str,
    pub seed: u64,
    pub terminals: Mix,
    pub rate_per_sec: f64,
    /// How long the soak (faults and new events) ran.
    pub duration_secs: f64,
    pub webhooks: Webhooks,
    pub confirmations: Confirmations,
    pub faults: Faults,
    /// First connect of the whole fleet, in milliseconds.
    pub initial_connect_ms: f64,
    pub restart_to_all_reconnected_ms: Reconnects,
    /// Of that: the start of the new process → its listeners bound (the bound addresses logged);
    /// after a `SIGKILL` this includes the store's repair. The rest is the terminals' reconnects.
    pub restart_to_listening_ms: Reconnects,
    /// `200` → shown on the terminal.
    pub delivery_ms: Latency,
    /// First webhook attempt → shown on the terminal (retries through faults included).
    pub webhook_to_shown_ms: Latency,
    /// Nothing lost, skipped, invented or failing verification, and every event answered `200`.
    pub clean: bool,
}

/// Runs the soak and reports.
///
/// # Errors
/// When the daemon cannot be started or restarted, or the terminals cannot be provisioned or
/// connected: the soak cannot go on (a loss is not an error; it is in the report).
pub async fn run(opts: &ChaosOptions) -> anyhow::Result<ChaosReport> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut faults = Faults::default();
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let data_dir = dir.path().join("data");
    let tmpfs = if opts.disk_full > 0 {
        match Tmpfs::mount(&data_dir, opts.tmpfs_mib) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("chaos: no disk-full periods: cannot mount a tmpfs: {e:#}");
                faults.disk_full_skipped = Some(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    let mut daemon = Daemon::start(&opts.posgate, &data_dir).await?;
    let listen = daemon.listen;
    let ids: Vec<String> = (0..opts.terminals).map(|i| format!("chaos-{i}")).collect();
    let bundles =
        crate::fleet::provision_at(listen.admin, ADMIN_TOKEN, "chaos-", opts.terminals, 8)
            .await
            .context("provisioning the terminals")?;
    let checker = Arc::new(Checker::new(opts.terminals)?);
    let mut terminals = Terminals::new(
        bundles,
        opts.http_terminals.min(opts.terminals),
        vec![listen.mqtt],
        listen.ingress,
        checker.clone(),
    );
    checker.new_round();
    terminals.start_all()?;
    let Some(initial) = checker.all_connected(Duration::from_secs(120)).await else {
        bail!(
            "{} of {} terminals not connected after 120 s",
            checker.not_connected(),
            opts.terminals
        );
    };
    say(
        opts,
        format_args!("{} terminals connected in {initial:?}", opts.terminals),
    );

    let senders = Senders::spawn(
        listen.ingress,
        Arc::new(ids),
        opts.rate,
        rng.random(),
        checker.clone(),
    )?;
    let mut soak = Soak {
        opts,
        rng,
        daemon: &mut daemon,
        terminals: &mut terminals,
        checker: &checker,
        senders: &senders,
        tmpfs: tmpfs.as_ref(),
        faults,
        reconnects: Vec::new(),
        listening: Vec::new(),
        reconnect_timeouts: 0,
        started: Instant::now(),
    };
    let soaked = soak.run().await;
    let Soak {
        mut faults,
        mut reconnects,
        mut listening,
        reconnect_timeouts,
        started,
        ..
    } = soak;
    let duration = started.elapsed();
    soaked?;

    let webhooks = senders.finish(opts.drain).await;
    let (answered, shown) = checker.progress();
    say(
        opts,
        format_args!("drain: {answered} answered 200, {shown} shown"),
    );
    checker.all_delivered(opts.drain).await;
    let (confirmations, e2e, delivery) = checker.summary();
    faults.transient_start_failures = daemon.transient_failures;
    let status = daemon.terminate(Duration::from_secs(30)).await?;
    if !status.success() {
        faults.unclean_stops += 1;
    }
    terminals.stop_all();
    drop(tmpfs);
    let clean = confirmations.clean() && webhooks.unanswered == 0;
    Ok(ChaosReport {
        scenario: "chaos",
        seed: opts.seed,
        terminals: terminals.mix(),
        rate_per_sec: opts.rate,
        duration_secs: duration.as_secs_f64(),
        webhooks,
        confirmations,
        faults,
        initial_connect_ms: initial.as_secs_f64() * 1000.0,
        restart_to_all_reconnected_ms: Reconnects::of(&mut reconnects, reconnect_timeouts),
        restart_to_listening_ms: Reconnects::of(&mut listening, 0),
        delivery_ms: delivery,
        webhook_to_shown_ms: e2e,
        clean,
    })
}

fn say(opts: &ChaosOptions, what: std::fmt::Arguments<'_>) {
    say_if(opts.verbose, what);
}

fn say_if(verbose: bool, what: std::fmt::Arguments<'_>) {
    if verbose {
        eprintln!("chaos: {what}");
    }
}

/// The kinds of fault, each on its own schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Term,
    Drop,
    DiskFull,
}

/// The fault loop and what it measured.
struct Soak<'a> {
    opts: &'a ChaosOptions,
    rng: StdRng,
    daemon: &'a mut Daemon,
    terminals: &'a mut Terminals,
    checker: &'a Checker,
    senders: &'a Senders,
    tmpfs: Option<&'a Tmpfs>,
    faults: Faults,
    reconnects: Vec<Duration>,
    /// Start of each restart → its listeners bound.
    listening: Vec<Duration>,
    reconnect_timeouts: u64,
    started: Instant,
}

impl Soak<'_> {
    /// Faults until the duration is over, one at a time; each kind is due again a random interval
    /// after it was last due (now at the earliest), so a long fault neither stretches the others'
    /// intervals nor starves them.
    async fn run(&mut self) -> anyhow::Result<()> {
        let end = self.started + self.opts.duration;
        let opts = self.opts;
        let mut due: Vec<(Fault, Instant)> = Vec::new();
        for (fault, every) in [
            (Fault::Kill, opts.kill_every),
            (Fault::Term, opts.term_every),
            (Fault::Drop, opts.drop_every),
        ] {
            if let Some(every) = every {
                due.push((fault, self.started + every.pick(&mut self.rng)));
            }
        }
        if self.tmpfs.is_some() {
            let n = opts.disk_full as u32;
            for k in 1..=n {
                due.push((Fault::DiskFull, self.started + opts.duration * k / (n + 1)));
            }
        }
        let next = |due: &[(Fault, Instant)]| {
            let (i, &(fault, at)) = due.iter().enumerate().min_by_key(|(_, (_, at))| *at)?;
            (at < end).then_some((i, fault, at))
        };
        while let Some((i, fault, at)) = next(&due) {
            tokio::time::sleep_until(at).await;
            if Instant::now() >= end {
                break;
            }
            self.apply(fault).await?;
            let every = match fault {
                Fault::Kill => opts.kill_every,
                Fault::Term => opts.term_every,
                Fault::Drop => opts.drop_every,
                Fault::DiskFull => None,
            };
            match every {
                Some(every) => {
                    // Anchored to when it was due; but after a fault that ran long this kind is
                    // due now at the earliest, behind the others already overdue.
                    let again = at + every.pick(&mut self.rng);
                    due[i].1 = again.max(Instant::now());
                }
                None => {
                    due.remove(i);
                }
            }
        }
        tokio::time::sleep_until(end).await;
        Ok(())
    }

    async fn apply(&mut self, fault: Fault) -> anyhow::Result<()> {
        let t = self.started.elapsed().as_secs_f64();
        match fault {
            Fault::Kill => {
                self.daemon.kill().await?;
                self.faults.kills += 1;
                self.restart(format!("t={t:.1}s kill #{}", self.faults.kills))
                    .await
            }
            Fault::Term => {
                let status = self.daemon.terminate(Duration::from_secs(30)).await?;
                self.faults.sigterms += 1;
                if !status.success() {
                    self.faults.unclean_stops += 1;
                }
                self.restart(format!(
                    "t={t:.1}s SIGTERM #{} ({status})",
                    self.faults.sigterms
                ))
                .await
            }
            Fault::Drop => {
                let n = self.terminals.len();
                let k = (n / 20).clamp(1, n);
                let which: Vec<usize> = index::sample(&mut self.rng, n, k).into_vec();
                which.iter().for_each(|&i| self.terminals.drop_session(i));
                self.faults.terminal_drops += k as u64;
                tokio::time::sleep(Every::secs(1, 3).pick(&mut self.rng)).await;
                for &i in &which {
                    self.terminals.start(i)?;
                }
                say(
                    self.opts,
                    format_args!("t={t:.1}s dropped {k} terminals, reconnecting"),
                );
                Ok(())
            }
            Fault::DiskFull => {
                let Some(tmpfs) = self.tmpfs else {
                    return Ok(());
                };
                let before = self.senders.unavailable();
                let filler = tmpfs.fill().await?;
                tokio::time::sleep(self.opts.disk_full_for).await;
                std::fs::remove_file(&filler)
                    .with_context(|| format!("removing {}", filler.display()))?;
                let answered = self.senders.unavailable() - before;
                self.faults.disk_full_periods += 1;
                self.faults.disk_full_503s += answered;
                say(
                    self.opts,
                    format_args!(
                        "t={t:.1}s disk full for {:?}: {answered} webhooks answered 503",
                        self.opts.disk_full_for
                    ),
                );
                Ok(())
            }
        }
    }

    /// After a pause, starts the daemon again on the same ports and times the terminals' return.
    async fn restart(&mut self, what: String) -> anyhow::Result<()> {
        tokio::time::sleep(self.opts.restart_after.pick(&mut self.rng)).await;
        self.checker.new_round();
        let restarted = Instant::now();
        self.daemon.restart().await?;
        let bound = restarted.elapsed();
        self.listening.push(bound);
        match self.checker.all_connected(Duration::from_secs(60)).await {
            Some(took) => {
                self.reconnects.push(took);
                say(
                    self.opts,
                    format_args!("{what}: listening after {bound:?}, all reconnected in {took:?}"),
                );
            }
            None => {
                self.reconnect_timeouts += 1;
                say(
                    self.opts,
                    format_args!(
                        "{what}: {} terminals not back after 60 s",
                        self.checker.not_connected()
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parses_a_range_or_one_value() {
        assert_eq!("10..30".parse(), Ok(Every::secs(10, 30)));
        assert_eq!("5".parse(), Ok(Every::secs(5, 5)));
        assert!("30..10".parse::<Every>().is_err());
        assert!("x..3".parse::<Every>().is_err());
    }

    #[test]
    fn reconnect_percentiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let r = Reconnects::of(&mut v, 1);
        assert_eq!((r.p50, r.p99, r.max, r.restarts), (50.0, 99.0, 100.0, 101));
        assert_eq!(Reconnects::of(&mut [], 0).max, 0.0);
    }
}
