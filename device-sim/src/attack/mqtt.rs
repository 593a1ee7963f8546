//! Attacks on the MQTT listener: sockets that finish TLS with a terminal's certificate (revoked
//! or valid) and then send nothing ([`IdleSockets`]); one terminal publishing RPC requests as fast
//! as it can ([`RpcFlood`]); one terminal subscribing to filter after filter
//! ([`SubscriptionFlood`]); and the fresh terminals whose CONNACK is timed during an attack
//! ([`probes`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::{Window, tally};
use crate::bench::{Latency, new_histogram};
use crate::fleet::{Target, provision};
use crate::terminal::{Bundle, Identity, connect_raw, tls_config};

/// How long a socket may take to connect and finish TLS before it counts as refused.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

/// A terminal for the attacker, provisioned as `attack-{name}`.
async fn attacker(target: &Target, name: &str) -> anyhow::Result<Bundle> {
    provision(target, &format!("attack-{name}-"), 1, 1)
        .await?
        .pop()
        .context("provisioning the attacker's terminal")
}

// === IdleSockets ===

/// `mqtt-idle-revoked`, `mqtt-idle-valid`: `sockets` connections that complete TLS with one
/// terminal's certificate (revoked before the run, or valid) and send nothing, `concurrency`
/// handshakes at a time; each is held until the server closes it or the run ends.
pub struct IdleSockets {
    pub revoked: bool,
    pub sockets: usize,
    pub concurrency: usize,
    bundle: Option<Bundle>,
}

impl IdleSockets {
    pub fn new(revoked: bool, sockets: usize, concurrency: usize) -> IdleSockets {
        IdleSockets {
            revoked,
            sockets,
            concurrency,
            bundle: None,
        }
    }

    pub(super) async fn prepare(&mut self, target: &Target) -> anyhow::Result<()> {
        let bundle = attacker(target, "idle").await?;
        if self.revoked {
            let response = reqwest::Client::builder()
                .no_proxy()
                .build()?
                .post(format!(
                    "http://{}/v1/terminals/{}/revoke",
                    target.admin, bundle.terminal_id
                ))
                .bearer_auth(&target.token)
                .send()
                .await?;
            if response.status() != 200 {
                bail!("revoking {}: {}", bundle.terminal_id, response.status());
            }
        }
        self.bundle = Some(bundle);
        Ok(())
    }

    pub(super) async fn run(
        &self,
        target: &Target,
        window: &Window,
    ) -> anyhow::Result<IdleFigures> {
        let bundle = self.bundle.as_ref().context("not prepared")?;
        let tls = tls_config(
            &bundle.ca_pem,
            Some((bundle.cert_pem.as_str(), bundle.key_pem.as_str())),
        )?;
        let connector = tokio_rustls::TlsConnector::from(tls);
        let server_name = rustls::pki_types::ServerName::IpAddress(target.mqtt.ip().into());
        let permits = Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        let fates: Arc<Mutex<Vec<Fate>>> = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        let mut last_started = window.start;
        for _ in 0..self.sockets {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit?,
                () = window.stop.cancelled() => break,
            };
            last_started = Instant::now();
            let (connector, server_name, fates, stop) = (
                connector.clone(),
                server_name.clone(),
                fates.clone(),
                window.stop.clone(),
            );
            let addr = target.mqtt;
            tasks.spawn(async move {
                let started = Instant::now();
                let opened = tokio::time::timeout(HANDSHAKE_WAIT, async {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    connector.connect(server_name, tcp).await
                })
                .await;
                drop(permit);
                let mut stream = match opened {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        push(&fates, Fate::refused(started, e.to_string()));
                        return;
                    }
                    Err(_) => {
                        push(&fates, Fate::refused(started, "no TLS within 10 s".into()));
                        return;
                    }
                };
                let handshaken = Instant::now();
                let mut buf = [0u8; 256];
                // Whatever the server sends (it never should before a CONNECT) or its close.
                let closed = loop {
                    tokio::select! {
                        read = stream.read(&mut buf) => match read {
                            Ok(0) => break Some((Instant::now(), "closed".to_owned())),
                            Ok(_) => continue,
                            Err(e) => break Some((Instant::now(), e.to_string())),
                        },
                        () = stop.cancelled() => break None,
                    }
                };
                push(
                    &fates,
                    Fate {
                        started,
                        handshaken: Some(handshaken),
                        closed,
                        refused: None,
                    },
                );
            });
        }
        let opening_secs = window.secs(last_started);
        while tasks.join_next().await.is_some() {}
        let fates = std::mem::take(&mut *fates.lock().unwrap_or_else(|e| e.into_inner()));
        IdleFigures::of(self, &fates, window, opening_secs)
    }
}

fn push(fates: &Mutex<Vec<Fate>>, fate: Fate) {
    fates.lock().unwrap_or_else(|e| e.into_inner()).push(fate);
}

/// What became of one socket.
struct Fate {
    started: Instant,
    /// When TLS finished (from the client's side: with TLS 1.3 a refused client certificate is
    /// only told after that, by an alert).
    handshaken: Option<Instant>,
    /// When and how the server closed it (`None`: still open when the run ended).
    closed: Option<(Instant, String)>,
    /// Why it never finished TLS.
    refused: Option<String>,
}

impl Fate {
    fn refused(started: Instant, why: String) -> Fate {
        Fate {
            started,
            handshaken: None,
            closed: None,
            refused: Some(why),
        }
    }
}

/// What the idle sockets did and got.
#[derive(Debug, Serialize)]
pub struct IdleFigures {
    pub certificate: &'static str,
    pub sockets: usize,
    /// Seconds from the attack's start until the last socket was started.
    pub opening_secs: f64,
    /// TLS finished from the client's side.
    pub tls_completed: usize,
    /// Never finished TLS (refused, or no answer within 10 s), by reason.
    pub tls_refused: BTreeMap<String, u64>,
    /// Closed by the server after TLS, by reason.
    pub closed_by_server: BTreeMap<String, u64>,
    /// Seconds from the end of TLS to the server's close.
    pub closed_after_secs: Option<Latency>,
    /// Open at the end of the attack phase (T seconds after the attack began).
    pub open_at_end_of_attack: usize,
    /// Open when the run ended (after the honest load's drain too).
    pub open_at_end_of_run: usize,
    /// Time to connect and finish TLS.
    pub tls_ms: Option<Latency>,
}

impl IdleFigures {
    fn of(
        attack: &IdleSockets,
        fates: &[Fate],
        window: &Window,
        opening_secs: f64,
    ) -> anyhow::Result<IdleFigures> {
        let (mut tls, mut closed_after) = (new_histogram()?, new_histogram()?);
        for f in fates {
            if let Some(h) = f.handshaken {
                tls.record(h.duration_since(f.started).as_micros().max(1) as u64)?;
                if let Some((at, _)) = &f.closed {
                    closed_after.record(at.duration_since(h).as_micros().max(1) as u64)?;
                }
            }
        }
        let latency = |h: &hdrhistogram::Histogram<u64>| (!h.is_empty()).then(|| Latency::of(h));
        Ok(IdleFigures {
            certificate: if attack.revoked { "revoked" } else { "valid" },
            sockets: attack.sockets,
            opening_secs,
            tls_completed: fates.iter().filter(|f| f.handshaken.is_some()).count(),
            tls_refused: tally(fates.iter().filter_map(|f| f.refused.clone())),
            closed_by_server: tally(
                fates
                    .iter()
                    .filter_map(|f| Some(f.closed.as_ref()?.1.clone())),
            ),
            // In milliseconds in the histogram; shown in seconds.
            closed_after_secs: latency(&closed_after).map(|l| Latency {
                p50: l.p50 / 1000.0,
                p90: l.p90 / 1000.0,
                p99: l.p99 / 1000.0,
                p999: l.p999 / 1000.0,
                max: l.max / 1000.0,
            }),
            open_at_end_of_attack: fates
                .iter()
                .filter(|f| {
                    f.handshaken.is_some_and(|h| h < window.end)
                        && f.closed.as_ref().is_none_or(|(at, _)| *at >= window.end)
                })
                .count(),
            open_at_end_of_run: fates
                .iter()
                .filter(|f| f.handshaken.is_some() && f.closed.is_none())
                .count(),
            tls_ms: latency(&tls),
        })
    }
}

// === RpcFlood ===

/// `rpc-flood`: one valid terminal publishing `requests` `rpc/req` messages (QoS 1, method
/// `unknown_method`) as fast as its connection takes them, and reading every answer.
pub struct RpcFlood {
    pub requests: usize,
    bundle: Option<Bundle>,
}

impl RpcFlood {
    pub fn new(requests: usize) -> RpcFlood {
        RpcFlood {
            requests,
            bundle: None,
        }
    }

    pub(super) async fn prepare(&mut self, target: &Target) -> anyhow::Result<()> {
        self.bundle = Some(attacker(target, "rpc").await?);
        Ok(())
    }

    pub(super) async fn run(&self, target: &Target, window: &Window) -> anyhow::Result<RpcFigures> {
        let bundle = self.bundle.as_ref().context("not prepared")?;
        let (client, mut eventloop) = connect_raw(target.mqtt, &Identity::of(bundle))?;
        let (subscribed_tx, subscribed) = tokio::sync::watch::channel(false);
        let rpc_res = bundle.topics.rpc_res.clone();
        let stop = window.stop.clone();
        let sub_client = client.clone();
        // Reads everything the gateway sends back until the run ends.
        let reader = tokio::spawn(async move {
            let mut answers: BTreeMap<String, u64> = BTreeMap::new();
            let mut disconnects = Vec::new();
            loop {
                let event = tokio::select! {
                    event = eventloop.poll() => event,
                    () = stop.cancelled() => break,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if sub_client
                            .subscribe(&rpc_res, QoS::AtLeastOnce)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed_tx.send_replace(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == rpc_res => {
                        let code = match serde_json::from_slice::<posgate_proto::rpc::Response>(
                            &p.payload,
                        ) {
                            Ok(r) => r.error.map_or("result".to_owned(), |e| e.code),
                            Err(_) => "unreadable".to_owned(),
                        };
                        *answers.entry(code).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        disconnects.push(e.to_string());
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                            () = stop.cancelled() => break,
                        }
                    }
                }
            }
            (answers, disconnects)
        });
        let started = Instant::now();
        let mut ready = subscribed.clone();
        tokio::select! {
            r = ready.wait_for(|s| *s) => { r.context("the attacker's session ended")?; }
            () = tokio::time::sleep(HANDSHAKE_WAIT) => bail!("the attacker's terminal did not connect within 10 s"),
        }
        let mut sent = 0usize;
        for n in 0..self.requests {
            let request = serde_json::json!({"id": format!("f{n}"), "method": "unknown_method", "params": {}});
            let publish = client.publish(
                &bundle.topics.rpc_req,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&request)?,
            );
            tokio::select! {
                r = publish => if r.is_err() { break },
                () = window.stop.cancelled() => break,
            }
            sent += 1;
        }
        let publish_secs = started.elapsed().as_secs_f64();
        window.stop.cancelled().await;
        let (answers, disconnects) = reader.await?;
        Ok(RpcFigures {
            requests: self.requests,
            published: sent,
            publish_secs,
            published_per_s: sent as f64 / publish_secs.max(1e-9),
            answers_total: answers.values().sum(),
            answers,
            disconnects: tally(disconnects),
        })
    }
}

/// What the RPC flood did and got.
#[derive(Debug, Serialize)]
pub struct RpcFigures {
    pub requests: usize,
    /// Handed to the client (QoS 1: the client keeps at most its in-flight window unacked).
    pub published: usize,
    pub publish_secs: f64,
    pub published_per_s: f64,
    pub answers_total: u64,
    /// Answers by error code (`result`: a success).
    pub answers: BTreeMap<String, u64>,
    /// The attacker's connection ended, by reason (it reconnects).
    pub disconnects: BTreeMap<String, u64>,
}

// === SubscriptionFlood ===

/// `subscription-flood`: one valid terminal subscribing to `filters` distinct filters under its
/// own payments topic, one SUBSCRIBE each, without waiting for the answers.
pub struct SubscriptionFlood {
    pub filters: usize,
    bundle: Option<Bundle>,
}

impl SubscriptionFlood {
    pub fn new(filters: usize) -> SubscriptionFlood {
        SubscriptionFlood {
            filters,
            bundle: None,
        }
    }

    pub(super) async fn prepare(&mut self, target: &Target) -> anyhow::Result<()> {
        self.bundle = Some(attacker(target, "subs").await?);
        Ok(())
    }

    pub(super) async fn run(
        &self,
        target: &Target,
        window: &Window,
    ) -> anyhow::Result<SubscriptionFigures> {
        let bundle = self.bundle.as_ref().context("not prepared")?;
        let (client, mut eventloop) = connect_raw(target.mqtt, &Identity::of(bundle))?;
        let (connected_tx, connected) = tokio::sync::watch::channel(false);
        let stop = window.stop.clone();
        let want = self.filters;
        let reader = tokio::spawn(async move {
            let (mut granted, mut refused) = (0u64, 0u64);
            let mut disconnects = Vec::new();
            let mut last_answer = None;
            loop {
                let event = tokio::select! {
                    event = eventloop.poll() => event,
                    () = stop.cancelled() => break,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected_tx.send_replace(true);
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        for code in ack.return_codes {
                            match code {
                                SubscribeReasonCode::Failure => refused += 1,
                                SubscribeReasonCode::Success(_) => granted += 1,
                            }
                        }
                        last_answer = Some(Instant::now());
                        if granted + refused >= want as u64 {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        disconnects.push(e.to_string());
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                            () = stop.cancelled() => break,
                        }
                    }
                }
            }
            (granted, refused, disconnects, last_answer)
        });
        let started = Instant::now();
        let mut ready = connected.clone();
        tokio::select! {
            r = ready.wait_for(|c| *c) => { r.context("the attacker's session ended")?; }
            () = tokio::time::sleep(HANDSHAKE_WAIT) => bail!("the attacker's terminal did not connect within 10 s"),
        }
        let base = bundle.topics.payments.trim_end_matches('+').to_owned();
        let mut sent = 0usize;
        for n in 0..self.filters {
            tokio::select! {
                r = client.subscribe(format!("{base}flood{n}"), QoS::AtLeastOnce) => if r.is_err() { break },
                () = window.stop.cancelled() => break,
            }
            sent += 1;
        }
        let (granted, refused, disconnects, last_answer) = reader.await?;
        Ok(SubscriptionFigures {
            filters: self.filters,
            sent,
            granted,
            refused,
            unanswered: (sent as u64).saturating_sub(granted + refused),
            answered_in_secs: last_answer.map(|at| at.duration_since(started).as_secs_f64()),
            disconnects: tally(disconnects),
        })
    }
}

/// What the subscription flood did and got.
#[derive(Debug, Serialize)]
pub struct SubscriptionFigures {
    pub filters: usize,
    /// SUBSCRIBEs handed to the client.
    pub sent: usize,
    pub granted: u64,
    pub refused: u64,
    /// Never answered (the connection ended first, or the run did).
    pub unanswered: u64,
    /// From the first SUBSCRIBE to the last answer.
    pub answered_in_secs: Option<f64>,
    pub disconnects: BTreeMap<String, u64>,
}

// === probes ===

/// A fresh terminal connecting during the attack.
#[derive(Debug, Serialize)]
pub struct Probe {
    pub terminal_id: String,
    /// Seconds after the attack began.
    pub at_secs: f64,
    /// From the TCP connect to the CONNACK.
    pub connack_ms: Option<f64>,
    pub error: Option<String>,
}

/// Connects each of `bundles` once, spread evenly over the attack phase, and times its CONNACK
/// (10 s at most); each disconnects again at once.
pub(super) async fn probes(bundles: &[Bundle], mqtt: SocketAddr, window: &Window) -> Vec<Probe> {
    let n = bundles.len() as u32;
    let span = window.end.saturating_duration_since(window.start);
    let tries = bundles.iter().enumerate().map(|(i, bundle)| async move {
        let at = window.start + span.mul_f64((i as f64 + 0.5) / n.max(1) as f64);
        tokio::time::sleep_until(at).await;
        let started = Instant::now();
        let outcome = probe(bundle, mqtt).await;
        Probe {
            terminal_id: bundle.terminal_id.clone(),
            at_secs: window.secs(started),
            connack_ms: outcome.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
            error: outcome.err().map(|e| format!("{e:#}")),
        }
    });
    futures::future::join_all(tries).await
}

/// Connects as `bundle`; the time to its CONNACK.
async fn probe(bundle: &Bundle, mqtt: SocketAddr) -> anyhow::Result<Duration> {
    let (client, mut eventloop) = connect_raw(mqtt, &Identity::of(bundle))?;
    let started = Instant::now();
    let result = tokio::time::timeout(HANDSHAKE_WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code == rumqttc::ConnectReturnCode::Success {
                        return Ok(started.elapsed());
                    }
                    bail!("CONNACK {:?}", ack.code);
                }
                Ok(_) => {}
                Err(e) => bail!("{e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| bail!("no CONNACK within 10 s"));
    drop(client.disconnect().await);
    // One more poll sends the DISCONNECT.
    drop(tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await);
    result
}
