//! The HTTP channels for terminals that cannot speak MQTT : polling, Server-Sent Events
//! and a WebSocket on the ingress listener. They carry the same signed confirmations as MQTT (the
//! delivery engine's JWS bytes, never re-encoded) and take the same acks (injected into the delivery engine exactly
//! as an MQTT ack on `/tenants/{t}/acks` is), so the outbox stays the one truth whichever channel a
//! terminal uses, and a terminal may even use several at once.
//!
//! | call | answer |
//! |---|---|
//! | `GET /v1/terminal/payments/{intent_id}[?wait_secs=N]` | `200 {"intent_id","status","seq","confirmation"}`; `confirmation` is the JWS of the terminal's next confirmation (its lowest unacked `seq`) when that one is this intent's, else `null` (none, or an older one of another intent comes first); with `wait_secs` (≤ 30) the answer waits for one (long polling) |
//! | `GET /v1/terminal/events` | `text/event-stream`: `event: confirmation`, `id: <seq>`, `data: <jws>`; keep-alive comments every `ingress.keepalive_secs` |
//! | `GET /v1/terminal/ws` | WebSocket: a text frame per confirmation (the JWS); the terminal acks with a text frame `{"intent_id","seq"}` |
//! | `POST /v1/terminal/acks` `{"intent_id","seq"}` | `202 {"accepted":true}`: handed to the delivery engine, which commits it as an MQTT ack |
//! | `POST /v1/terminal/tickets` | `201 {"ticket","expires_in"}`: a single-use ticket for one SSE or WebSocket stream (`?ticket=…`), for browsers |
//!
//! **Delivery** is the delivery engine's (stop-and-wait per terminal, see [`crate::delivery`]): a stream
//! starts with the terminal's head (its lowest unacked `seq`) read from the store, then carries
//! whatever the delivery engine publishes for that terminal, republishes included, at the moment MQTT
//! gets it. The delivery engine reports every publish on one broadcast channel; [`Hub`] fans it out per
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
//! one generic body. Another terminal's intent is `404`, exactly like an unknown one. A browser
//! cannot give `EventSource` or `WebSocket` a header: it opens them with a single-use ticket
//! instead ([`tickets`]), and, when `ingress.cors_allowed_origins` lists the page's origin, the
//! routes here answer CORS (preflights included) for that origin only.
//!
//! **Shutdown:** streams end when shutdown starts (WebSocket: close frame 1001), so they never hold
//! the drain up; long polls answer at once with what they have.

//!
//! Files: `auth.rs` (tokens and certificates), `tickets.rs` (the browsers' tickets), `hub.rs` (the fan-out of publishes per terminal),
//! `feed.rs` (one terminal's stream), `acks.rs`, `ws.rs` (the WebSocket session); the polling and
//! SSE handlers are here.

mod acks;
mod auth;
mod feed;
mod hub;
mod payments;
#[cfg(test)]
mod tests;
pub mod tickets;
mod ws;

pub use auth::TokenIndex;
pub use hub::Hub;
pub use tickets::Tickets;

use prometheus::IntGaugeVec;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::{BrokerEvent, Signer};
use crate::http::error;
use crate::store::{Store, StoreError};
use acks::ack;
use acks::forward_ack;
use auth::{Peer, Refused, authenticate};
use feed::{End, Feed};
use hub::Signal;
use ws::ws;

/// Polling: one intent's state and confirmation.
pub const PAYMENT_PATH: &str = "/v1/terminal/payments/{intent_id}";
/// Server-Sent Events.
pub const EVENTS_PATH: &str = "/v1/terminal/events";
/// WebSocket.
pub const WS_PATH: &str = "/v1/terminal/ws";
/// Acks from polling and SSE clients.
pub const ACKS_PATH: &str = "/v1/terminal/acks";
/// Single-use tickets for a browser's streams.
pub const TICKETS_PATH: &str = "/v1/terminal/tickets";

/// The longest a long poll (`wait_secs`) may wait.
pub const MAX_WAIT_SECS: u64 = 30;

/// Payments from HTTP terminals: create.
pub const INTENTS_PATH: &str = "/v1/terminal/payment-intents";
/// Payments from HTTP terminals: read one (the reboot case).
pub const INTENT_PATH: &str = "/v1/terminal/payment-intents/{intent_id}";
/// Payments from HTTP terminals: cancel one.
pub const CANCEL_PATH: &str = "/v1/terminal/payment-intents/{intent_id}/cancel";

/// Ack bodies are tiny; anything larger is refused before it is read.
const ACK_LIMIT_BYTES: usize = 4096;

/// What the handlers share.
pub struct Channels {
    pub store: Store,
    /// Signs rows read from the store (deterministic: the same bytes the delivery engine publishes).
    pub signer: Signer,
    pub hub: Hub,
    pub tokens: TokenIndex,
    /// Unspent stream tickets (browsers).
    pub tickets: Tickets,
    /// The delivery engine's event channel: acks go in here exactly as the broker's do.
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
    /// Terminal RPC, shared with MQTT: payments from HTTP terminals go through it.
    pub rpc: Arc<crate::rpc::Rpc>,
    /// Told about every request made with a client certificate (a renewal completes on the new
    /// certificate's first use).
    pub renewals: crate::admin::Renewals,
}

/// The HTTP channels' routes (merged into the ingress router), with CORS for `cors_origins`
/// (none: no CORS headers at all). The origins are validated by the configuration.
pub fn router(channels: Arc<Channels>, cors_origins: &[String]) -> Router {
    let router = Router::new()
        .route(PAYMENT_PATH, get(payment))
        .route(EVENTS_PATH, get(events))
        .route(WS_PATH, get(ws))
        .route(
            ACKS_PATH,
            post(ack).layer(DefaultBodyLimit::max(ACK_LIMIT_BYTES)),
        )
        .route(
            INTENTS_PATH,
            post(payments::create).layer(DefaultBodyLimit::max(payments::LIMIT_BYTES)),
        )
        .route(INTENT_PATH, get(payments::get))
        .route(
            CANCEL_PATH,
            post(payments::cancel).layer(DefaultBodyLimit::max(payments::LIMIT_BYTES)),
        )
        .route(
            TICKETS_PATH,
            post(ticket).layer(DefaultBodyLimit::max(ACK_LIMIT_BYTES)),
        )
        .with_state(channels);
    match cors(cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// CORS for the listed origins only: preflights answered, the origin echoed when listed, nothing
/// when not (the browser then refuses the answer to the page). No cookies are involved (the
/// credentials are a bearer token and tickets), so credentials mode stays off.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE])
            .max_age(Duration::from_secs(600)),
    )
}

/// `?ticket=…` on the stream endpoints.
#[derive(serde::Deserialize)]
pub(super) struct TicketQuery {
    ticket: Option<String>,
}

/// `POST /v1/terminal/tickets`: a ticket for one stream, for a terminal authenticated by its
/// bearer token or certificate (a ticket cannot buy another).
async fn ticket(State(channels): State<Arc<Channels>>, peer: Peer, headers: HeaderMap) -> Response {
    let auth = match authenticate(&channels, &headers, &peer, None, false).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let ticket = channels.tickets.issue(&auth.terminal.id);
    let body = serde_json::json!({
        "ticket": ticket.expose(),
        "expires_in": channels.tickets.ttl().as_secs(),
    });
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

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
            if let Err(refused) = authenticate(&channels, &headers, &peer, None, false).await {
                return refused.into_response();
            }
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("wait_secs: an integer from 0 to {MAX_WAIT_SECS}"),
            );
        }
    };
    let auth = match authenticate(&channels, &headers, &peer, None, wait_secs > 0).await {
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
            // The terminal's next confirmation (its lowest unacked seq), if it is this intent's:
            // a later one handed out first would reach the terminal out of order, as on MQTT
            // (stop-and-wait) it never does.
            Ok(rows) => rows
                .into_iter()
                .next()
                .filter(|head| head.intent_id == intent_id),
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

/// `GET /v1/terminal/events[?ticket=…]`.
async fn events(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    Query(query): Query<TicketQuery>,
) -> Response {
    let ticket = query.ticket.as_deref();
    let auth = match authenticate(&channels, &headers, &peer, ticket, true).await {
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
