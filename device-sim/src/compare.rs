//! Side by side against another MQTT broker (e.g. Mosquitto): a small webhook bridge and the
//! `bench e2e` latency measurement over plain MQTT.
//!
//! The bridge (`posgate-sim bridge`) is what issue 5's reference setup put in front of Mosquitto
//! (there in Python, Flask + paho): it checks the webhook's HMAC with [`posgate_proto::verify`],
//! reads `metadata.terminal_id`, and publishes a small JSON message retained at QoS 1 on
//! `terminals/{terminal_id}/payments/{intent_id}` through one rumqttc connection, answering `200`
//! once the publish is queued. No durable write, no signature on the message, no per-terminal
//! identity: a confirmation in flight when it stops is gone. With `--clear-on-ack` it also
//! subscribes to `terminals/+/acks` and clears a message's retained copy when its terminal acks
//! (what posgate does), so both sides move the same number of messages.
//!
//! `bench e2e --broker HOST:PORT --plain` starts that bridge as a child process (or uses
//! `--bridge ADDR`), connects N plain-MQTT terminals that subscribe to their topic and ack each
//! message, and sends signed webhooks at R/s spread over them exactly as `bench e2e` does for
//! posgate: the figure is the time from the webhook being sent to the message at its terminal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use posgate_proto::webhook::{DEFAULT_TOLERANCE_SECS, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bench::rss_mib;
use crate::events::{self};
use crate::fleet::{FleetReport, Paced, Pacing};

/// The topic a terminal's messages are published on.
pub fn payments_topic(terminal_id: &str, intent_id: &str) -> String {
    format!("terminals/{terminal_id}/payments/{intent_id}")
}

/// The topic a terminal acks on.
pub fn acks_topic(terminal_id: &str) -> String {
    format!("terminals/{terminal_id}/acks")
}

/// What `posgate-sim bridge` was asked to do.
#[derive(Clone, Debug)]
pub struct BridgeOptions {
    /// Where webhooks are accepted (`POST /webhooks/stablegenius`).
    pub listen: SocketAddr,
    /// The MQTT broker.
    pub broker: SocketAddr,
    /// Mutual TLS to the broker with the certificates of this directory ([`tls_transport`]);
    /// `None` is plain TCP.
    pub certs: Option<PathBuf>,
    /// Accepted webhook secrets.
    pub secrets: Vec<SecretString>,
    /// Clear a message's retained copy when its terminal acks.
    pub clear_on_ack: bool,
}

/// A running bridge.
pub struct RunningBridge {
    /// The bound webhook address.
    pub addr: SocketAddr,
    token: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    mqtt: tokio::task::JoinHandle<()>,
}

impl RunningBridge {
    /// Stops serving and drops the broker connection.
    pub async fn stop(self) {
        self.token.cancel();
        drop(self.server.await);
        self.mqtt.abort();
    }
}

struct BridgeState {
    client: AsyncClient,
    secrets: Vec<SecretString>,
}

/// Binds `options.listen`, connects to the broker, and serves webhooks.
///
/// # Errors
/// When the address cannot be bound.
pub async fn start_bridge(options: BridgeOptions) -> anyhow::Result<RunningBridge> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding the bridge to {}", options.listen))?;
    let addr = listener.local_addr()?;
    let mut mqtt = MqttOptions::new(
        format!("posgate-sim-bridge-{}", std::process::id()),
        options.broker.ip().to_string(),
        options.broker.port(),
    );
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_clean_session(true);
    mqtt.set_inflight(1000);
    mqtt.set_request_channel_capacity(10_000);
    if let Some(dir) = &options.certs {
        mqtt.set_transport(tls_transport(dir)?);
    }
    let (client, eventloop) = crate::terminal::client(mqtt, 10_000);
    let token = CancellationToken::new();
    let mqtt = tokio::spawn(drive_bridge(
        client.clone(),
        eventloop,
        options.clear_on_ack,
    ));
    let state = Arc::new(BridgeState {
        client,
        secrets: options.secrets,
    });
    let router = Router::new()
        .route(events::WEBHOOK_PATH, post(webhook))
        .with_state(state);
    let stop = token.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "the bridge's server failed");
        }
    });
    Ok(RunningBridge {
        addr,
        token,
        server,
        mqtt,
    })
}

/// Drives the bridge's broker connection; with `clear_on_ack`, clears acked messages.
async fn drive_bridge(client: AsyncClient, mut eventloop: EventLoop, clear_on_ack: bool) {
    // Clears go through their own task: the event loop must never wait on its own request queue.
    let (clear_tx, mut clear_rx) = mpsc::unbounded_channel::<String>();
    let clearer = client.clone();
    tokio::spawn(async move {
        while let Some(topic) = clear_rx.recv().await {
            if clearer
                .publish(topic, QoS::AtLeastOnce, true, Vec::new())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                eprintln!("posgate-sim bridge: connected to the broker");
                if clear_on_ack
                    && client
                        .try_subscribe("terminals/+/acks", QoS::AtLeastOnce)
                        .is_err()
                {
                    eprintln!("posgate-sim bridge: cannot subscribe to acks");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let terminal = p.topic.split('/').nth(1).unwrap_or_default();
                let intent = serde_json::from_slice::<Value>(&p.payload)
                    .ok()
                    .and_then(|v| v["intent_id"].as_str().map(str::to_owned));
                if let Some(intent) = intent {
                    drop(clear_tx.send(payments_topic(terminal, &intent)));
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("posgate-sim bridge: broker connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error(status: StatusCode, code: &str) -> Response {
    reply(
        status,
        json!({"error": {"code": code, "message": code.replace('_', " ")}}),
    )
}

/// `POST /webhooks/stablegenius`: verify, pick the terminal, publish retained at QoS 1.
async fn webhook(
    State(state): State<Arc<BridgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    if posgate_proto::verify(
        &state.secrets,
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        &body,
        events::now_unix(),
        DEFAULT_TOLERANCE_SECS,
    )
    .is_err()
    {
        return error(StatusCode::UNAUTHORIZED, "invalid_signature");
    }
    let Ok(envelope) = posgate_proto::Envelope::parse(&body) else {
        return error(StatusCode::BAD_REQUEST, "not_an_event");
    };
    let Ok(data) = serde_json::from_str::<Value>(envelope.data.get()) else {
        return error(StatusCode::BAD_REQUEST, "not_an_event");
    };
    let intent_id = match data["object"].as_str() {
        Some("payment_intent") => data["id"].as_str(),
        _ => data["payment_intent_id"].as_str(),
    };
    let terminal_id = data["metadata"]["terminal_id"].as_str();
    let (Some(intent_id), Some(terminal_id)) = (intent_id, terminal_id) else {
        // Nothing to show on a terminal.
        return reply(
            StatusCode::OK,
            json!({"received": true, "published": false}),
        );
    };
    let topic_safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#']);
    if !topic_safe(intent_id) || !topic_safe(terminal_id) {
        return error(StatusCode::BAD_REQUEST, "unusable_id");
    }
    let message = json!({
        "intent_id": intent_id,
        "terminal_id": terminal_id,
        "event": envelope.kind,
        "status": data["status"],
        "amount": data["amount"],
        "currency": data["currency"],
    });
    let payload = serde_json::to_vec(&message).unwrap_or_default();
    match state
        .client
        .publish(
            payments_topic(terminal_id, intent_id),
            QoS::AtLeastOnce,
            true,
            payload,
        )
        .await
    {
        Ok(()) => reply(StatusCode::OK, json!({"received": true, "published": true})),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
    }
}

// === the plain-MQTT fleet ===

/// What a plain terminal saw.
#[derive(Debug)]
enum PlainSeen {
    Connected,
    Message(String),
    Disconnected,
}

/// One plain-MQTT terminal: subscribes to its payments, acks every message, reports to `tx`.
fn spawn_plain_terminal(
    i: usize,
    terminal_id: String,
    broker: SocketAddr,
    transport: Option<Transport>,
    tx: mpsc::UnboundedSender<(usize, PlainSeen, Instant)>,
) -> tokio::task::JoinHandle<()> {
    let mut options = MqttOptions::new(
        format!("plain-{terminal_id}"),
        broker.ip().to_string(),
        broker.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    if let Some(transport) = transport {
        options.set_transport(transport);
    }
    let (client, mut eventloop) = crate::terminal::client(options, 64);
    let (payments, acks) = (payments_topic(&terminal_id, "+"), acks_topic(&terminal_id));
    tokio::spawn(async move {
        loop {
            let seen = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if client.subscribe(&payments, QoS::AtLeastOnce).await.is_err() {
                        break;
                    }
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => PlainSeen::Connected,
                Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                    let intent = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
                    let ack =
                        serde_json::to_vec(&json!({ "intent_id": intent })).unwrap_or_default();
                    if client
                        .publish(&acks, QoS::AtLeastOnce, false, ack)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    PlainSeen::Message(intent)
                }
                Ok(_) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    PlainSeen::Disconnected
                }
            };
            if tx.send((i, seen, Instant::now())).is_err() {
                break;
            }
        }
    })
}

/// Where the plain-MQTT measurement goes.
#[derive(Debug)]
pub struct PlainTarget {
    /// The broker.
    pub broker: SocketAddr,
    /// Mutual TLS to the broker with this certificate directory; `None` is plain TCP.
    pub certs: Option<PathBuf>,
    /// A running bridge; `None` starts `posgate-sim bridge` (this executable) as a child.
    pub bridge: Option<SocketAddr>,
    /// Webhook secret the bridge accepts.
    pub secret: String,
    /// The broker's pid, for its RSS.
    pub broker_pid: Option<u32>,
    /// Have the started bridge clear retained messages on ack.
    pub clear_on_ack: bool,
}

/// Mutual TLS to another broker from a certificate directory: `ca.pem` (the broker's CA),
/// `client.pem` and `client.key` (one client certificate all simulated terminals present). The
/// broker address is also the name checked in its certificate (an IP SAN for 127.0.0.1).
///
/// # Errors
/// When a file is missing or does not parse.
pub fn tls_transport(dir: &Path) -> anyhow::Result<Transport> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    let (ca, cert, key) = (read("ca.pem")?, read("client.pem")?, read("client.key")?);
    let config = crate::terminal::tls_config(&ca, Some((&cert, &key)))?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(config)))
}

/// A bridge child process.
struct BridgeChild {
    process: tokio::process::Child,
    addr: SocketAddr,
}

/// Starts `posgate-sim bridge` (this executable) on a free loopback port.
async fn start_bridge_child(target: &PlainTarget) -> anyhow::Result<BridgeChild> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut process = tokio::process::Command::new(&exe)
        .args(["bridge", "--listen", "127.0.0.1:0", "--broker"])
        .arg(target.broker.to_string())
        .args(["--webhook-secret", &target.secret])
        .args(target.clear_on_ack.then_some("--clear-on-ack"))
        .args(
            target
                .certs
                .iter()
                .flat_map(|dir| [std::ffi::OsStr::new("--certs"), dir.as_os_str()]),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} bridge", exe.display()))?;
    let stdout = process.stdout.take().context("the bridge's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the bridge did not report its address within 10 s")??
        .context("the bridge exited before reporting its address")?;
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in the bridge's first line {line:?}"))?;
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(BridgeChild { process, addr })
}

/// `bench e2e --broker HOST:PORT --plain`: N plain-MQTT terminals, R signed webhooks/s through the
/// bridge; the time from the webhook being sent to the message at its terminal.
///
/// # Errors
/// On setup failures (bridge, broker, terminals not connecting).
pub async fn e2e_plain(
    target: &PlainTarget,
    n: usize,
    pacing: Pacing,
    duration: Duration,
) -> anyhow::Result<FleetReport> {
    let mut child = match target.bridge {
        Some(_) => None,
        None => Some(start_bridge_child(target).await?),
    };
    let bridge = match (&child, target.bridge) {
        (Some(c), _) => c.addr,
        (None, Some(addr)) => addr,
        (None, None) => bail!("no bridge"),
    };
    let result = measure(target, bridge, n, pacing, duration).await;
    let bridge_rss = child
        .as_ref()
        .and_then(|c| c.process.id())
        .and_then(rss_mib);
    if let Some(c) = child.as_mut() {
        c.process.kill().await.ok();
    }
    let mut report = result?;
    let broker_rss = target.broker_pid.and_then(rss_mib);
    report.rows.push(json!({
        "broker": target.broker.to_string(), "bridge": bridge.to_string(),
        "broker_rss_mib": broker_rss, "bridge_rss_mib": bridge_rss,
        "clear_on_ack": target.clear_on_ack,
    }));
    Ok(report)
}

async fn measure(
    target: &PlainTarget,
    bridge: SocketAddr,
    n: usize,
    pacing: Pacing,
    duration: Duration,
) -> anyhow::Result<FleetReport> {
    let run = format!("{:04x}", rand::random::<u16>());
    let terminals: Arc<Vec<String>> =
        Arc::new((0..n).map(|i| format!("bench-p{run}-{i}")).collect());
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut sessions = Vec::with_capacity(n);
    // Connect in chunks, as `bench e2e` does.
    let transport = target.certs.as_deref().map(tls_transport).transpose()?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        for &i in chunk {
            sessions.push(spawn_plain_terminal(
                i,
                terminals[i].clone(),
                target.broker,
                transport.clone(),
                tx.clone(),
            ));
        }
        let mut waiting: std::collections::HashSet<usize> = chunk.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Some((i, PlainSeen::Connected, _))) => {
                    waiting.remove(&i);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!(
                    "{} of {n} plain terminals not subscribed after 120 s (is the broker at {} \
                     up, and does it allow {n} connections?)",
                    waiting.len(),
                    target.broker
                ),
            }
        }
    }
    drop(tx);

    let mut paced = Paced::start(
        bridge,
        &target.secret,
        terminals,
        pacing,
        duration,
        &format!("p{run}_"),
    )?;
    let mut report = FleetReport {
        scenario: if target.certs.is_some() {
            "e2e (another MQTT broker over mutual TLS + bridge)".into()
        } else {
            "e2e (plain MQTT broker + bridge)".into()
        },
        terminals: n,
        ..Default::default()
    };
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    while !paced.over() {
        tokio::select! {
            result = paced.senders_finished() => result?,
            event = events.recv() => match event {
                Some((_, PlainSeen::Message(intent), at)) => {
                    if paced.arrived(&intent, at)? {
                        report.delivered += 1;
                        seen.insert(intent);
                    } else if seen.contains(&intent) {
                        report.duplicates += 1;
                    }
                }
                Some(_) => {}
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    for session in sessions {
        session.abort();
    }
    let row = paced.finish(&mut report, duration);
    report.rows.push(row);
    Ok(report)
}

/// Prints a plain-broker report (as [`crate::fleet::print`], naming what was measured here).
pub fn print(report: &FleetReport) {
    crate::fleet::print_measured(
        report,
        "webhook sent -> message received at the terminal (no signature to verify)",
    );
    println!(
        "  sent {}, delivered {}, lost {}, duplicates {}",
        report.sent, report.delivered, report.lost, report.duplicates
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_per_terminal() {
        assert_eq!(
            payments_topic("pos-1", "pi_1"),
            "terminals/pos-1/payments/pi_1"
        );
        assert_eq!(acks_topic("pos-1"), "terminals/pos-1/acks");
    }
}
