//! The HTTP channels for terminals that cannot speak MQTT (issue 7): polling, Server-Sent Events
//! and a WebSocket on the ingress listener. They carry the same signed confirmations as MQTT (the
//! router's JWS bytes, never re-encoded) and take the same acks (injected into the router exactly
//! as an MQTT ack on `/tenants/{t}/acks` is), so the outbox stays the one truth whichever channel a
//! terminal uses, and a terminal may even use several at once.
//!
//! | call | answer |
//! |---|---|
//! | `GET /v1/terminal/payments/{intent_id}[?wait_secs=N]` | `200 {"intent_id","status","seq","confirmation"}`; `confirmation` is the JWS of this terminal's newest unacked confirmation of the intent, or `null`; with `wait_secs` (≤ 30) the answer waits for one (long polling) |
//! | `GET /v1/terminal/events` | `text/event-stream`: `event: confirmation`, `id: <seq>`, `data: <jws>`; keep-alive comments every `ingress.keepalive_secs` |
//! | `GET /v1/terminal/ws` | WebSocket: a text frame per confirmation (the JWS); the terminal acks with a text frame `{"intent_id","seq"}` |
//! | `POST /v1/terminal/acks` `{"intent_id","seq"}` | `202 {"accepted":true}`: handed to the router, which commits it as an MQTT ack |
//!
//! **Delivery** is the router's (stop-and-wait per terminal, see [`crate::router`]): a stream
//! starts with the terminal's head (its lowest unacked `seq`) read from the store, then carries
//! whatever the router publishes for that terminal, republishes included, at the moment MQTT
//! gets it. The router reports every publish on one broadcast channel; [`Hub`] fans it out per
//! terminal, so a publish wakes only that terminal's streams. A stream that falls behind re-reads
//! the store (the outbox is the truth, so nothing is lost, at worst something is sent twice; the
//! terminal deduplicates by `intent_id` + `seq` as it does on MQTT).
//!
//! **Authentication**, per terminal: `Authorization: Bearer <http_token>` from the provisioning
//! bundle (looked up by its SHA-256, then compared in constant time with the registry's hash), or,
//! when the ingress serves TLS itself (`ingress.tls`), the terminal's client certificate (CN = its
//! id, O = its tenant, serial = the one it was issued). Every request re-reads the terminal from
//! the store, so a revoked terminal is refused on every channel from the moment of its revocation;
//! its open streams end (SSE) or are closed with code 1008 (WebSocket). Anything else is `401` with
//! one generic body. Another terminal's intent is `404`, exactly like an unknown one.
//!
//! **Shutdown:** streams end when shutdown starts (WebSocket: close frame 1001), so they never hold
//! the drain up; long polls answer at once with what they have.

use prometheus::{IntGauge, IntGaugeVec};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use posgate_proto::confirmation::Ack;
use posgate_proto::topics::TopicKind;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::tls::TlsPeer;
use crate::http::error;
use crate::pki::CertIdentity;
use crate::router::{BrokerEvent, Published, Signer};
use crate::store::{Store, StoreError, TerminalRecord};

/// Polling: one intent's state and confirmation.
pub const PAYMENT_PATH: &str = "/v1/terminal/payments/{intent_id}";
/// Server-Sent Events.
pub const EVENTS_PATH: &str = "/v1/terminal/events";
/// WebSocket.
pub const WS_PATH: &str = "/v1/terminal/ws";
/// Acks from polling and SSE clients.
pub const ACKS_PATH: &str = "/v1/terminal/acks";

/// The longest a long poll (`wait_secs`) may wait.
pub const MAX_WAIT_SECS: u64 = 30;

/// Ack bodies are tiny; anything larger is refused before it is read.
const ACK_LIMIT_BYTES: usize = 4096;

/// What the handlers share.
pub struct Channels {
    pub store: Store,
    /// Signs rows read from the store (deterministic: the same bytes the router publishes).
    pub signer: Signer,
    pub hub: Hub,
    pub tokens: TokenIndex,
    /// The router's event channel: acks go in here exactly as the broker's do.
    pub acks: mpsc::UnboundedSender<BrokerEvent>,
    /// Cancelled when shutdown starts: streams end, long polls answer.
    pub shutdown: CancellationToken,
    /// WebSocket sessions run outside the HTTP server once upgraded; they hold a token of this
    /// tracker so the drain waits for their close frame.
    pub tracker: TaskTracker,
    /// SSE keep-alive comments and WebSocket pings.
    pub keepalive: Duration,
    /// `posgate_http_streams{channel}`: each open stream counts while its feed lives.
    pub streams: IntGaugeVec,
}

/// The HTTP channels' routes (merged into the ingress router).
pub fn router(channels: Arc<Channels>) -> Router {
    Router::new()
        .route(PAYMENT_PATH, get(payment))
        .route(EVENTS_PATH, get(events))
        .route(WS_PATH, get(ws))
        .route(
            ACKS_PATH,
            post(ack).layer(DefaultBodyLimit::max(ACK_LIMIT_BYTES)),
        )
        .with_state(channels)
}

// === Hub ===

/// What a terminal's streams are told.
#[derive(Clone, Debug)]
enum Signal {
    Published(Arc<Published>),
    /// Something may have been missed: read the head from the store again.
    Resync,
    /// The terminal was revoked: end the stream.
    Revoked,
}

/// Per-terminal fan-out of the router's publishes to the open streams and long polls.
#[derive(Clone, Default)]
pub struct Hub {
    terminals: Arc<Mutex<HashMap<String, broadcast::Sender<Signal>>>>,
}

impl Hub {
    /// Capacity of one terminal's channel (stop-and-wait: one confirmation in flight at a time).
    const PER_TERMINAL: usize = 16;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Signal>>> {
        self.terminals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn subscribe(&self, terminal_id: &str) -> broadcast::Receiver<Signal> {
        self.lock()
            .entry(terminal_id.to_owned())
            .or_insert_with(|| broadcast::channel(Self::PER_TERMINAL).0)
            .subscribe()
    }

    /// Sends to the terminal's streams; forgets the terminal when none is left.
    fn send(&self, terminal_id: &str, signal: Signal) {
        let mut map = self.lock();
        if let Some(tx) = map.get(terminal_id)
            && tx.send(signal).is_err()
        {
            map.remove(terminal_id);
        }
    }

    /// Ends the terminal's open streams (called right after its revocation is committed).
    pub fn revoke(&self, terminal_id: &str) {
        if let Some(tx) = self.lock().remove(terminal_id) {
            drop(tx.send(Signal::Revoked));
        }
    }

    /// Forwards the router's publishes until `token` is cancelled or the router is gone.
    pub async fn run(
        self,
        mut published: broadcast::Receiver<Published>,
        token: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                item = published.recv() => match item {
                    Ok(p) => {
                        let id = p.terminal_id.clone();
                        self.send(&id, Signal::Published(Arc::new(p)));
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "HTTP channels fell behind the router; every stream re-reads the store");
                        let ids: Vec<String> = self.lock().keys().cloned().collect();
                        for id in ids {
                            self.send(&id, Signal::Resync);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    }
}

// === TokenIndex ===

/// Bearer token hashes → terminal ids, so a token is found without scanning the registry. Loaded
/// at startup and told about every new terminal; the store stays the truth (every request
/// re-reads the terminal).
#[derive(Clone, Default)]
pub struct TokenIndex {
    by_hash: Arc<RwLock<HashMap<[u8; 32], String>>>,
}

impl TokenIndex {
    /// An index of these terminals.
    pub fn of<'a>(terminals: impl IntoIterator<Item = &'a TerminalRecord>) -> Self {
        let index = TokenIndex::default();
        for t in terminals {
            index.insert(t);
        }
        index
    }

    /// Adds (or replaces) a terminal's token hash; a terminal without one is skipped.
    pub fn insert(&self, terminal: &TerminalRecord) {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(&terminal.http_token_sha256, &mut hash).is_err() {
            return;
        }
        if let Ok(mut map) = self.by_hash.write() {
            map.insert(hash, terminal.id.clone());
        }
    }

    fn lookup(&self, token: &str) -> Option<String> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.read().ok()?.get(&hash).cloned()
    }
}

// === authentication ===

/// The verified client certificate of the request's connection, if any (only a TLS listener,
/// `ingress.tls`, has one).
struct Peer(Option<CertIdentity>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<TlsPeer>>()
                .and_then(|c| c.0.cert.clone()),
        ))
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no credentials")]
    Missing,
    #[error("unknown bearer token")]
    UnknownToken,
    #[error("the bearer token and the client certificate name different terminals")]
    Mismatch,
    #[error("terminal {0} is unknown or revoked, or its credentials do not match")]
    Terminal(String),
    #[error("reading the registry")]
    Store(#[source] StoreError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Store(e) => {
                tracing::error!(error = %e, error_chain = ?e, "terminal authentication: store unavailable");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "try again later",
                )
            }
            // One generic answer: the caller learns nothing about which check failed.
            refused => {
                tracing::debug!(reason = %refused, "terminal request refused");
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing, invalid or revoked terminal credentials",
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Serials compare without leading zeros, case-insensitively.
fn same_serial(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim_start_matches('0').to_ascii_lowercase();
    norm(a) == norm(b)
}

/// An authenticated terminal, with a subscription to its streams when asked for.
struct Authenticated {
    terminal: TerminalRecord,
    signals: Option<broadcast::Receiver<Signal>>,
}

/// Who is asking: the terminal named by the bearer token and/or the client certificate, checked
/// against the registry (not revoked, same token hash in constant time, same certificate serial).
///
/// With `subscribe`, the terminal's signals are subscribed to *before* the registry is read, so a
/// revocation committed after that read still reaches the stream.
async fn authenticate(
    channels: &Channels,
    headers: &HeaderMap,
    peer: &Peer,
    subscribe: bool,
) -> Result<Authenticated, Refused> {
    let token = bearer(headers);
    let by_token = match token {
        Some(token) => Some(channels.tokens.lookup(token).ok_or(Refused::UnknownToken)?),
        None if headers.contains_key(header::AUTHORIZATION) => return Err(Refused::UnknownToken),
        None => None,
    };
    let by_cert = peer.0.as_ref().map(|c| c.cn.clone());
    let id = match (by_token, by_cert) {
        (Some(a), Some(b)) if a != b => return Err(Refused::Mismatch),
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => return Err(Refused::Missing),
    };
    let signals = subscribe.then(|| channels.hub.subscribe(&id));
    let terminal = channels
        .store
        .terminal(id.clone())
        .await
        .map_err(Refused::Store)?
        .filter(|t| t.revoked_at.is_none())
        .ok_or_else(|| Refused::Terminal(id.clone()))?;
    if let Some(token) = token {
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        if !bool::from(hash.as_bytes().ct_eq(terminal.http_token_sha256.as_bytes())) {
            return Err(Refused::Terminal(id));
        }
    }
    if let Some(cert) = &peer.0
        && (!same_serial(&cert.serial_hex, &terminal.cert_serial) || cert.o != terminal.tenant)
    {
        return Err(Refused::Terminal(id));
    }
    Ok(Authenticated { terminal, signals })
}

// === the stream of one terminal ===

/// Why a stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    ShuttingDown,
    Revoked,
    Failed,
}

/// One terminal's confirmations as the router puts them on the wire: first its head from the
/// store, then every publish. `next` is cancel-safe (a store read that is cut is done again).
struct Feed {
    channels: Arc<Channels>,
    terminal_id: String,
    signals: broadcast::Receiver<Signal>,
    resync: bool,
    /// After a store read: the seq it sent, and how many signals were already queued then. A
    /// publish of that same row among those is the one the read already carried (skipped); a
    /// later one is a republish (sent, as MQTT sends it).
    just_read: Option<(u64, usize)>,
    /// Its `posgate_http_streams` gauge, decremented when the feed is dropped.
    open: IntGauge,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Feed {
    /// The feed of one stream on `channel` (`"sse"` or `"ws"`).
    fn new(
        channels: Arc<Channels>,
        terminal_id: String,
        signals: broadcast::Receiver<Signal>,
        channel: &'static str,
    ) -> Feed {
        let open = channels.streams.with_label_values(&[channel]);
        open.inc();
        Feed {
            channels,
            terminal_id,
            signals,
            resync: true,
            just_read: None,
            open,
        }
    }

    async fn next(&mut self) -> Result<Arc<Published>, End> {
        loop {
            if self.channels.shutdown.is_cancelled() {
                return Err(End::ShuttingDown);
            }
            if self.resync {
                let rows = self
                    .channels
                    .store
                    .outbox(Some(self.terminal_id.clone()))
                    .await
                    .map_err(|e| {
                        tracing::warn!(terminal_id = %self.terminal_id, error = %e, "cannot read the outbox for a stream");
                        End::Failed
                    })?;
                self.resync = false;
                self.just_read = None;
                // Stop-and-wait, as on MQTT: only the head is on the wire.
                if let Some(head) = rows.first() {
                    self.just_read = Some((head.seq, self.signals.len()));
                    return Ok(Arc::new(Published {
                        terminal_id: head.terminal_id.clone(),
                        intent_id: head.intent_id.clone(),
                        seq: head.seq,
                        jws: self.channels.signer.sign(head),
                    }));
                }
            }
            tokio::select! {
                biased;
                () = self.channels.shutdown.cancelled() => return Err(End::ShuttingDown),
                signal = self.signals.recv() => match signal {
                    Ok(Signal::Published(p)) => {
                        if let Some((seq, n)) = self.just_read.take()
                            && n > 0
                        {
                            self.just_read = Some((seq, n - 1));
                            if p.seq == seq {
                                continue;
                            }
                        }
                        return Ok(p);
                    }
                    Ok(Signal::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.resync = true;
                    }
                    Ok(Signal::Revoked) | Err(broadcast::error::RecvError::Closed) => {
                        return Err(End::Revoked);
                    }
                },
            }
        }
    }
}

// === handlers ===

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such payment intent")
}

fn store_unavailable(e: &StoreError) -> Response {
    tracing::error!(error = %e, error_chain = ?e, "terminal channel: store unavailable");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "try again later",
    )
}

/// `GET /v1/terminal/payments/{intent_id}[?wait_secs=N]`.
async fn payment(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    Path(intent_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let wait_secs = match query.get("wait_secs").map(|v| v.parse::<u64>()) {
        None => 0,
        Some(Ok(n)) if n <= MAX_WAIT_SECS => n,
        Some(_) => {
            // Authentication first: an unauthenticated caller learns nothing, not even this.
            if let Err(refused) = authenticate(&channels, &headers, &peer, false).await {
                return refused.into_response();
            }
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("wait_secs: an integer from 0 to {MAX_WAIT_SECS}"),
            );
        }
    };
    let auth = match authenticate(&channels, &headers, &peer, wait_secs > 0).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let terminal_id = auth.terminal.id;
    let intent = match channels.store.intent(intent_id.clone()).await {
        Ok(Some(intent)) if intent.record.terminal_id.as_deref() == Some(&terminal_id) => intent,
        // Another terminal's intent looks exactly like an unknown one.
        Ok(_) => return not_found(),
        Err(e) => return store_unavailable(&e),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    let mut signals = auth.signals;
    let mut status = intent.record.status;
    loop {
        let row = match channels.store.outbox(Some(terminal_id.clone())).await {
            // The newest unacked confirmation of this intent (an ack of it also clears older ones).
            Ok(rows) => rows.into_iter().rev().find(|r| r.intent_id == intent_id),
            Err(e) => return store_unavailable(&e),
        };
        let Some(rx) = signals.as_mut().filter(|_| row.is_none()) else {
            if row.is_some() {
                // The status that goes with the confirmation (it may have moved while we waited).
                if let Ok(Some(fresh)) = channels.store.intent(intent_id.clone()).await {
                    status = fresh.record.status;
                }
            }
            let body = serde_json::json!({
                "intent_id": intent_id,
                "status": status.as_str(),
                "seq": row.as_ref().map(|r| r.seq),
                "confirmation": row.as_ref().map(|r| String::from_utf8_lossy(&channels.signer.sign(r)).into_owned()),
            });
            return Json(body).into_response();
        };
        // Long poll: wait for a publish of this intent (or anything that may have been missed).
        let woke = tokio::select! {
            biased;
            () = channels.shutdown.cancelled() => false,
            () = tokio::time::sleep_until(deadline) => false,
            woke = wait_for(rx, &intent_id) => woke,
        };
        if !woke {
            signals = None;
        }
    }
}

/// Resolves when a publish of `intent_id` (or a resync) arrives; false when the stream ended.
async fn wait_for(rx: &mut broadcast::Receiver<Signal>, intent_id: &str) -> bool {
    loop {
        match rx.recv().await {
            Ok(Signal::Published(p)) if p.intent_id == intent_id => return true,
            Ok(Signal::Published(_)) => continue,
            Ok(Signal::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Ok(Signal::Revoked) | Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
}

/// `GET /v1/terminal/events`.
async fn events(State(channels): State<Arc<Channels>>, peer: Peer, headers: HeaderMap) -> Response {
    let auth = match authenticate(&channels, &headers, &peer, true).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let Some(signals) = auth.signals else {
        return Refused::Missing.into_response();
    };
    let terminal_id = auth.terminal.id;
    tracing::info!(%terminal_id, "SSE stream opened");
    let keepalive = channels.keepalive;
    let feed = Feed::new(channels, terminal_id, signals, "sse");
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        match feed.next().await {
            Ok(p) => {
                let event = Event::default()
                    .event("confirmation")
                    .id(p.seq.to_string())
                    .data(String::from_utf8_lossy(&p.jws));
                Some((Ok::<_, Infallible>(event), feed))
            }
            Err(end) => {
                tracing::info!(terminal_id = %feed.terminal_id, reason = ?end, "SSE stream ended");
                None
            }
        }
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response();
    // A reverse proxy (nginx) must not buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Why an ack was not taken.
#[derive(Debug, thiserror::Error)]
enum AckError {
    #[error("expected {{\"intent_id\":\"pi_…\",\"seq\":N}}: {0}")]
    Invalid(#[source] serde_json::Error),
    #[error("shutting down; ack again later")]
    Closed,
}

impl AckError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            AckError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_ack"),
            AckError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    /// The house error body, as a WebSocket text frame.
    fn frame(&self) -> String {
        let (_, code) = self.parts();
        serde_json::json!({ "error": { "code": code, "message": self.to_string() } }).to_string()
    }
}

impl IntoResponse for AckError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        error(status, code, self.to_string())
    }
}

/// Hands an ack to the router, exactly as the broker hands it an MQTT ack.
fn forward_ack(channels: &Channels, terminal_id: &str, body: &[u8]) -> Result<Ack, AckError> {
    let ack: Ack = serde_json::from_slice(body).map_err(AckError::Invalid)?;
    let event = BrokerEvent::Message {
        terminal_id: terminal_id.to_owned(),
        kind: TopicKind::Acks,
        payload: Bytes::copy_from_slice(body),
    };
    channels.acks.send(event).map_err(|_| AckError::Closed)?;
    Ok(ack)
}

/// `POST /v1/terminal/acks`.
async fn ack(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let auth = match authenticate(&channels, &headers, &peer, false).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("body exceeds {ACK_LIMIT_BYTES} bytes"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the body could not be read",
            );
        }
    };
    match forward_ack(&channels, &auth.terminal.id, &body) {
        Ok(ack) => {
            tracing::debug!(terminal_id = %auth.terminal.id, intent_id = %ack.intent_id, seq = ack.seq, "HTTP ack");
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"accepted": true})),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/terminal/ws`.
async fn ws(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, rejection::WebSocketUpgradeRejection>,
) -> Response {
    let auth = match authenticate(&channels, &headers, &peer, true).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => {
            return error(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                e.body_text(),
            );
        }
    };
    let Some(signals) = auth.signals else {
        return Refused::Missing.into_response();
    };
    let terminal_id = auth.terminal.id;
    // Held for the session's life: the drain waits for its close frame.
    let held = channels.tracker.token();
    let span = tracing::info_span!("ws", %terminal_id);
    upgrade
        .max_message_size(ACK_LIMIT_BYTES)
        .on_upgrade(move |socket| {
            async move {
                let feed = Feed::new(channels.clone(), terminal_id.clone(), signals, "ws");
                session(channels, terminal_id, feed, socket).await;
                drop(held);
            }
            .instrument(span)
        })
}

/// One WebSocket session: confirmations out, acks in, pings both ways, a close frame at the end.
async fn session(
    channels: Arc<Channels>,
    terminal_id: String,
    mut feed: Feed,
    mut socket: WebSocket,
) {
    tracing::info!("WebSocket opened");
    let mut ping = tokio::time::interval(channels.keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let close = loop {
        tokio::select! {
            next = feed.next() => match next {
                Ok(p) => {
                    let text = String::from_utf8_lossy(&p.jws).into_owned();
                    if socket.send(Message::text(text)).await.is_err() {
                        break None;
                    }
                }
                Err(End::ShuttingDown) => break Some((1001, "shutting down")),
                Err(End::Revoked) => break Some((1008, "revoked")),
                Err(End::Failed) => break Some((1011, "internal error")),
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Err(e) = forward_ack(&channels, &terminal_id, text.as_bytes())
                        && socket.send(Message::text(e.frame())).await.is_err()
                    {
                        break None;
                    }
                }
                Some(Ok(Message::Binary(body))) => {
                    if let Err(e) = forward_ack(&channels, &terminal_id, &body)
                        && socket.send(Message::text(e.frame())).await.is_err()
                    {
                        break None;
                    }
                }
                // Pongs to the client's pings are sent by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // A client that does not read is not waited for.
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
        tracing::info!(
            reason,
            sent = matches!(sent, Ok(Ok(()))),
            "WebSocket closed by the gateway"
        );
    } else {
        tracing::info!("WebSocket closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn serials_compare_normalized() {
        assert!(same_serial("00ab", "AB"));
        assert!(!same_serial("ab", "abc"));
    }

    #[tokio::test]
    async fn hub_forwards_per_terminal_and_forgets_the_revoked() {
        let hub = Hub::default();
        let (tx, rx) = broadcast::channel(8);
        let token = CancellationToken::new();
        let task = tokio::spawn(hub.clone().run(rx, token.clone()));
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        let published = |t: &str, seq| Published {
            terminal_id: t.into(),
            intent_id: format!("pi_{seq}"),
            seq,
            jws: Bytes::from_static(b"x.y.z"),
        };
        tx.send(published("a", 1)).unwrap();
        tx.send(published("b", 2)).unwrap();
        match a.recv().await.unwrap() {
            Signal::Published(p) => assert_eq!((p.terminal_id.as_str(), p.seq), ("a", 1)),
            other => panic!("{other:?}"),
        }
        match b.recv().await.unwrap() {
            Signal::Published(p) => assert_eq!((p.terminal_id.as_str(), p.seq), ("b", 2)),
            other => panic!("{other:?}"),
        }
        hub.revoke("a");
        assert!(matches!(a.recv().await.unwrap(), Signal::Revoked));
        assert!(!hub.lock().contains_key("a"));
        // A terminal whose streams are all gone is forgotten at its next publish.
        drop(b);
        tx.send(published("b", 3)).unwrap();
        drop(tx);
        task.await.unwrap();
        assert!(hub.lock().is_empty());
        token.cancel();
    }

    #[test]
    fn token_index_finds_by_hash_only() {
        let record = TerminalRecord {
            id: "pos_1".into(),
            tenant: "t".into(),
            merchant_id: "m".into(),
            label: None,
            cert_serial: "01".into(),
            http_token_sha256: hex::encode(Sha256::digest(b"secret-token")),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
            next_seq: 1,
            last_seen: None,
        };
        let index = TokenIndex::of([&record]);
        assert_eq!(index.lookup("secret-token").as_deref(), Some("pos_1"));
        assert_eq!(index.lookup("secret-tokem"), None);
        assert_eq!(index.lookup(""), None);
    }
}
