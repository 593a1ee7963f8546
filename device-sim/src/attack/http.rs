//! Attacks on the ingress listener: connections that send their request head a byte at a time
//! ([`Slowloris`]); large webhooks carrying a pile of wrong signature headers
//! ([`SignatureAmplification`]); and a flood of badly signed webhooks ([`LogFlood`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use posgate_proto::MicroUsdc;
use posgate_proto::webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Window, tally};
use crate::bench::{Latency, new_histogram};
use crate::events::{self, Intent};
use crate::fleet::Target;

/// Connections opened at once by [`Slowloris`].
const OPENING: usize = 100;

// === Slowloris ===

/// `slowloris`: `connections` connections to the ingress, each sending a webhook's request line
/// and then one more header byte every `interval` (never the end of the head), until the server
/// closes it or the run ends.
pub struct Slowloris {
    pub connections: usize,
    pub interval: Duration,
}

/// What became of one slow connection.
struct Slow {
    opened: Option<Instant>,
    /// When the server closed it, and the first line of what it answered first, if anything.
    closed: Option<(Instant, Option<String>)>,
    failed: Option<String>,
    bytes_sent: u64,
}

impl Slowloris {
    pub(super) async fn run(
        &self,
        target: &Target,
        window: &Window,
    ) -> anyhow::Result<SlowFigures> {
        let addr = target.ingress;
        let permits = Arc::new(tokio::sync::Semaphore::new(OPENING));
        let mut tasks = tokio::task::JoinSet::new();
        let head = format!(
            "POST {} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nx-slow",
            events::WEBHOOK_PATH
        );
        for i in 0..self.connections {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit?,
                () = window.stop.cancelled() => break,
            };
            let (head, stop, interval) = (head.clone(), window.stop.clone(), self.interval);
            // Spread over the interval, so the bytes do not all come at once.
            let phase = interval.mul_f64(i as f64 / self.connections.max(1) as f64);
            tasks.spawn(async move {
                let mut slow = Slow {
                    opened: None,
                    closed: None,
                    failed: None,
                    bytes_sent: 0,
                };
                let connected = tokio::net::TcpStream::connect(addr).await;
                let mut stream = match connected {
                    Ok(s) => s,
                    Err(e) => {
                        slow.failed = Some(e.to_string());
                        return slow;
                    }
                };
                drop(permit);
                if let Err(e) = stream.write_all(head.as_bytes()).await {
                    slow.failed = Some(e.to_string());
                    return slow;
                }
                slow.opened = Some(Instant::now());
                slow.bytes_sent = head.len() as u64;
                let (mut read, mut write) = stream.into_split();
                let mut next = Instant::now() + phase;
                let mut answer: Vec<u8> = Vec::new();
                let mut buf = [0u8; 512];
                loop {
                    tokio::select! {
                        n = read.read(&mut buf) => match n {
                            Ok(0) | Err(_) => {
                                let first = (!answer.is_empty()).then(|| {
                                    String::from_utf8_lossy(&answer)
                                        .lines()
                                        .next()
                                        .unwrap_or_default()
                                        .to_owned()
                                });
                                slow.closed = Some((Instant::now(), first));
                                break;
                            }
                            Ok(n) => {
                                if answer.len() < 512 {
                                    answer.extend_from_slice(&buf[..n]);
                                }
                            }
                        },
                        () = tokio::time::sleep_until(next) => {
                            next += interval;
                            if write.write_all(b"x").await.is_err() {
                                slow.closed = Some((Instant::now(), None));
                                break;
                            }
                            slow.bytes_sent += 1;
                        }
                        () = stop.cancelled() => break,
                    }
                }
                slow
            });
        }
        let mut all = Vec::new();
        while let Some(slow) = tasks.join_next().await {
            all.push(slow?);
        }
        SlowFigures::of(self, &all, window)
    }
}

/// What the slow connections did and got.
#[derive(Debug, Serialize)]
pub struct SlowFigures {
    pub connections: usize,
    pub interval_secs: f64,
    pub opened: usize,
    /// Could not connect or write their request line, by reason.
    pub failed: BTreeMap<String, u64>,
    pub closed_by_server: usize,
    /// The first line of what the server answered before closing (`none`: closed silently).
    pub answers: BTreeMap<String, u64>,
    /// Seconds from the request line to the server's close.
    pub closed_after_secs: Option<Latency>,
    /// Open at the end of the attack phase.
    pub open_at_end_of_attack: usize,
    /// Open when the run ended.
    pub open_at_end_of_run: usize,
    pub bytes_sent: u64,
}

impl SlowFigures {
    fn of(attack: &Slowloris, all: &[Slow], window: &Window) -> anyhow::Result<SlowFigures> {
        let mut after = new_histogram()?;
        for s in all {
            if let (Some(opened), Some((closed, _))) = (s.opened, &s.closed) {
                after.record(closed.duration_since(opened).as_micros().max(1) as u64)?;
            }
        }
        Ok(SlowFigures {
            connections: attack.connections,
            interval_secs: attack.interval.as_secs_f64(),
            opened: all.iter().filter(|s| s.opened.is_some()).count(),
            failed: tally(all.iter().filter_map(|s| s.failed.clone())),
            closed_by_server: all.iter().filter(|s| s.closed.is_some()).count(),
            answers: tally(all.iter().filter_map(|s| {
                let (_, first) = s.closed.as_ref()?;
                Some(first.clone().unwrap_or_else(|| "none".into()))
            })),
            closed_after_secs: (!after.is_empty()).then(|| seconds(&after)),
            open_at_end_of_attack: all
                .iter()
                .filter(|s| {
                    s.opened.is_some_and(|o| o < window.end)
                        && s.closed.as_ref().is_none_or(|(at, _)| *at >= window.end)
                })
                .count(),
            open_at_end_of_run: all
                .iter()
                .filter(|s| s.opened.is_some() && s.closed.is_none())
                .count(),
            bytes_sent: all.iter().map(|s| s.bytes_sent).sum(),
        })
    }
}

/// A histogram of microseconds in seconds.
fn seconds(h: &Histogram<u64>) -> Latency {
    let l = Latency::of(h);
    Latency {
        p50: l.p50 / 1000.0,
        p90: l.p90 / 1000.0,
        p99: l.p99 / 1000.0,
        p999: l.p999 / 1000.0,
        max: l.max / 1000.0,
    }
}

// === the webhook floods ===

/// What a flood of webhooks got back.
#[derive(Debug, Serialize)]
pub struct FloodFigures {
    pub sent: u64,
    pub seconds: f64,
    pub per_s: f64,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Sends that got no answer, by reason.
    pub errors: BTreeMap<String, u64>,
    /// Request sent -> answer received.
    pub answer_ms: Option<Latency>,
}

/// Builds the `n`th request of a flood.
type MakeRequest = Arc<dyn Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync>;

/// Sends the requests `make` builds over `connections` keep-alive connections, `rate` a second
/// (all together; `None`: as fast as they are answered), `total` of them at most, until the end
/// of the attack phase.
async fn flood(
    window: &Window,
    connections: usize,
    rate: Option<u64>,
    total: Option<usize>,
    make: MakeRequest,
) -> anyhow::Result<FloodFigures> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let merged = Arc::new(Mutex::new((
        new_histogram()?,
        BTreeMap::<u16, u64>::new(),
        Vec::<String>::new(),
    )));
    let started = Instant::now();
    let connections = connections.max(1);
    let period = rate.map(|r| Duration::from_secs_f64(connections as f64 / r.max(1) as f64));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let (http, next, merged, make, stop, end) = (
            http.clone(),
            next.clone(),
            merged.clone(),
            make.clone(),
            window.stop.clone(),
            window.end,
        );
        tasks.spawn(async move {
            let mut mine = new_histogram()?;
            let (mut statuses, mut errors) = (BTreeMap::<u16, u64>::new(), Vec::new());
            let mut due = Instant::now()
                + period.map_or(Duration::ZERO, |p| p.mul_f64(c as f64 / connections as f64));
            while Instant::now() < end && !stop.is_cancelled() {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|t| n >= t) {
                    break;
                }
                if let Some(p) = period {
                    tokio::time::sleep_until(due).await;
                    due += p;
                }
                let sent = Instant::now();
                match make(&http, n).send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        drop(response.bytes().await);
                        mine.record(sent.elapsed().as_micros().max(1) as u64)?;
                        *statuses.entry(status).or_default() += 1;
                    }
                    Err(e) => errors.push(error_kind(&e)),
                }
            }
            let mut m = merged.lock().unwrap_or_else(|e| e.into_inner());
            m.0.add(&mine)?;
            for (s, n) in statuses {
                *m.1.entry(s).or_default() += n;
            }
            m.2.extend(errors);
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (h, statuses, errors) = std::mem::replace(
        &mut *merged.lock().unwrap_or_else(|e| e.into_inner()),
        (new_histogram()?, BTreeMap::new(), Vec::new()),
    );
    let sent = h.len() + errors.len() as u64;
    Ok(FloodFigures {
        sent,
        seconds,
        per_s: sent as f64 / seconds.max(1e-9),
        statuses,
        errors: tally(errors),
        answer_ms: (!h.is_empty()).then(|| Latency::of(&h)),
    })
}

/// A short name for a failed send (reqwest's messages carry the URL).
fn error_kind(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        format!("timeout: {last}")
    } else {
        last
    }
}

/// `signature-amplification`: webhooks of about `body_bytes` with `signatures` wrong
/// `X-StableGenius-Signature` headers (and a current timestamp), `rate` a second over
/// `connections` connections, through the attack phase.
pub struct SignatureAmplification {
    pub rate: u64,
    pub connections: usize,
    pub body_bytes: usize,
    pub signatures: usize,
}

/// What the amplification attack did and got.
#[derive(Debug, Serialize)]
pub struct AmplificationFigures {
    pub rate_per_s: u64,
    pub body_bytes: usize,
    pub signature_headers: usize,
    #[serde(flatten)]
    pub flood: FloodFigures,
}

impl SignatureAmplification {
    pub(super) async fn run(
        &self,
        target: &Target,
        window: &Window,
    ) -> anyhow::Result<AmplificationFigures> {
        let pad = "a".repeat(self.body_bytes.saturating_sub(16));
        let body = bytes::Bytes::from(format!("{{\"padding\":\"{pad}\"}}"));
        let url = format!("http://{}{}", target.ingress, events::WEBHOOK_PATH);
        let signatures: Vec<String> = (0..self.signatures)
            .map(|_| {
                let tag: [u8; 32] = rand::rng().random();
                format!("sha256={}", hex(&tag))
            })
            .collect();
        let make = Arc::new(move |http: &reqwest::Client, _n: usize| {
            let mut request = http
                .post(&url)
                .header("content-type", "application/json")
                .header(TIMESTAMP_HEADER, events::now_unix().to_string());
            for s in &signatures {
                request = request.header(SIGNATURE_HEADER, s);
            }
            request.body(body.clone())
        });
        let flood = flood(window, self.connections, Some(self.rate), None, make).await?;
        Ok(AmplificationFigures {
            rate_per_s: self.rate,
            body_bytes: self.body_bytes,
            signature_headers: self.signatures,
            flood,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `log-flood`: `requests` webhooks signed with a wrong secret (each a well-formed event with a
/// current timestamp), over `connections` connections as fast as they are answered.
pub struct LogFlood {
    pub requests: usize,
    pub connections: usize,
}

impl LogFlood {
    pub(super) async fn run(
        &self,
        target: &Target,
        window: &Window,
    ) -> anyhow::Result<FloodFigures> {
        let url = format!("http://{}{}", target.ingress, events::WEBHOOK_PATH);
        let make = Arc::new(move |http: &reqwest::Client, n: usize| {
            let intent = Intent::new(&format!("pi_flood{n}"), MicroUsdc(4_500_000), "pos-flood");
            let body = events::intent_event(&format!("evt_flood{n}"), "confirmed", &intent);
            let mut request = http.post(&url).header("content-type", "application/json");
            for (name, value) in events::signed_headers(
                "whsec_not_the_gateways",
                events::now_unix(),
                body.as_bytes(),
            ) {
                request = request.header(name, value);
            }
            request.body(body)
        });
        flood(window, self.connections, None, Some(self.requests), make)
            .await
            .context("flooding the ingress")
    }
}
