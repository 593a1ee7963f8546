//! The gateway process as `/proc` shows it (open descriptors, RSS, the descriptor limit), its
//! data dir's size and its log's length, sampled every [`EVERY`] through a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bench::rss_mib;
use crate::fleet::Target;

/// How often the gateway is sampled.
const EVERY: Duration = Duration::from_millis(250);

/// One look at the gateway.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at: Option<Instant>,
    fds: Option<u64>,
    rss_mib: Option<f64>,
    data_bytes: Option<u64>,
    log_lines: Option<u64>,
}

/// Samples the gateway until its token is cancelled.
pub(super) struct Sampler {
    task: JoinHandle<Samples>,
}

/// Every sample of a run, in order.
pub(super) struct Samples {
    samples: Vec<Sample>,
    fd_limit: Option<u64>,
    pid: Option<u32>,
}

/// What the samples say, by phase.
#[derive(Debug, Default, Serialize)]
pub struct GatewayFigures {
    pub pid: Option<u32>,
    /// The process's soft limit of open files.
    pub fd_limit: Option<u64>,
    pub quiet: Usage,
    pub attack: Usage,
    /// During the drain, after the attack phase (what was held until the end).
    pub after: Usage,
    /// `[seconds from the start, open descriptors, RSS MiB]`, about one a second.
    pub series: Vec<(f64, Option<u64>, Option<f64>)>,
}

/// One phase's figures.
#[derive(Debug, Default, Serialize)]
pub struct Usage {
    pub fds_max: Option<u64>,
    pub rss_mib_max: Option<f64>,
    /// Growth of the data dir (apparent file sizes) over the phase.
    pub data_dir_growth_kib: Option<f64>,
    /// Lines the gateway logged during the phase.
    pub log_lines: Option<u64>,
}

impl Sampler {
    /// Starts sampling `target` (only what is known: a gateway given by address has no data dir
    /// or log here).
    pub(super) fn spawn(target: &Target, stop: CancellationToken) -> Sampler {
        let (pid, data_dir, log) = (target.pid, target.data_dir(), target.log_path());
        let task = tokio::spawn(async move {
            let fd_limit = pid.and_then(fd_limit);
            let mut samples = Vec::new();
            loop {
                samples.push(Sample {
                    at: Some(Instant::now()),
                    fds: pid.and_then(open_fds),
                    rss_mib: pid.and_then(rss_mib),
                    data_bytes: data_dir.as_deref().map(dir_bytes),
                    log_lines: log.as_deref().and_then(line_count),
                });
                tokio::select! {
                    () = tokio::time::sleep(EVERY) => {}
                    () = stop.cancelled() => break,
                }
            }
            Samples {
                samples,
                fd_limit,
                pid,
            }
        });
        Sampler { task }
    }

    /// Waits for the last sample (after the token was cancelled).
    pub(super) async fn finish(self) -> Samples {
        self.task.await.unwrap_or(Samples {
            samples: Vec::new(),
            fd_limit: None,
            pid: None,
        })
    }
}

impl Samples {
    /// The figures of the quiet phase (`t0..attack`), the attack phase (`attack..end`) and what
    /// came after.
    pub(super) fn figures(&self, t0: Instant, attack: Instant, end: Instant) -> GatewayFigures {
        // A phase's samples, and the last one before it (where its growth is counted from).
        let within = |from: Instant, to: Option<Instant>| -> (Option<Sample>, Vec<Sample>) {
            let before = self
                .samples
                .iter()
                .rev()
                .find(|s| s.at.is_some_and(|at| at < from))
                .copied();
            let during = self
                .samples
                .iter()
                .filter(|s| {
                    s.at.is_some_and(|at| at >= from && to.is_none_or(|to| at < to))
                })
                .copied()
                .collect();
            (before, during)
        };
        let series = self
            .samples
            .iter()
            .step_by((Duration::from_secs(1).as_millis() / EVERY.as_millis()).max(1) as usize)
            .map(|s| {
                let secs =
                    s.at.map_or(0.0, |at| at.saturating_duration_since(t0).as_secs_f64());
                (secs, s.fds, s.rss_mib.map(|r| (r * 10.0).round() / 10.0))
            })
            .collect();
        GatewayFigures {
            pid: self.pid,
            fd_limit: self.fd_limit,
            quiet: usage(within(t0, Some(attack))),
            attack: usage(within(attack, Some(end))),
            after: usage(within(end, None)),
            series,
        }
    }
}

fn usage((before, samples): (Option<Sample>, Vec<Sample>)) -> Usage {
    let growth = |f: fn(&Sample) -> Option<u64>| {
        let first = before
            .as_ref()
            .and_then(f)
            .or_else(|| samples.iter().find_map(f))?;
        let last = samples.iter().rev().find_map(f)?;
        Some(last.saturating_sub(first))
    };
    Usage {
        fds_max: samples.iter().filter_map(|s| s.fds).max(),
        rss_mib_max: samples
            .iter()
            .filter_map(|s| s.rss_mib)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r)))),
        data_dir_growth_kib: growth(|s| s.data_bytes).map(|b| b as f64 / 1024.0),
        log_lines: growth(|s| s.log_lines),
    }
}

/// Prints the gateway's figures.
pub(super) fn print(g: &GatewayFigures) {
    let show = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    let mib = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0}"));
    let kib = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0}"));
    println!(
        "  gateway descriptors max: quiet {}, attack {}, after {} (limit {}); RSS max MiB: quiet {}, attack {}, after {}",
        show(g.quiet.fds_max),
        show(g.attack.fds_max),
        show(g.after.fds_max),
        show(g.fd_limit),
        mib(g.quiet.rss_mib_max),
        mib(g.attack.rss_mib_max),
        mib(g.after.rss_mib_max),
    );
    println!(
        "  gateway data dir growth KiB: quiet {}, attack {}; log lines: quiet {}, attack {}, after {}",
        kib(g.quiet.data_dir_growth_kib),
        kib(g.attack.data_dir_growth_kib),
        show(g.quiet.log_lines),
        show(g.attack.log_lines),
        show(g.after.log_lines),
    );
}

/// Open descriptors of `pid`.
fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The soft limit of open files of `pid`.
fn fd_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Apparent size of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Lines in the file at `path`.
fn line_count(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    Some(bytes.iter().filter(|&&b| b == b'\n').count() as u64)
}
