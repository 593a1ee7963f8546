//! Webhook ingress: `POST /webhooks/stablegenius`.
//!
//! Headers checked first ([`posgate_proto::webhook::check_headers`]: timestamp, at most four
//! signature values) → raw body (capped), its MAC computed once per secret on those exact bytes →
//! parse the envelope from the same bytes → [`Store::ingest`] (one durable commit) → answer. Nothing slow happens here: no call
//! to the provider, no MQTT publish; the answer is sent as soon as the commit is durable.
//!
//! | situation | answer |
//! |---|---|
//! | new event, committed | `200 {"received":true,"duplicate":false}` |
//! | duplicate `evt_…` | `200 {"received":true,"duplicate":true}` |
//! | header missing or garbled, bad or empty signature, stale timestamp, no secret configured | `401` |
//! | verified, but not an event envelope | `400` (the body is kept in `rejected`) |
//! | body over `ingress.body_limit_bytes` | `413` |
//! | store overloaded or failing | `503` |
//!
//! The same listener carries the terminals' HTTP channels (polling, SSE, WebSocket, acks) of
//! [`crate::channels`], and serves TLS itself when `ingress.tls` is set ([`tls`]).

use std::sync::Arc;
use tokio::time::Instant;

pub mod tls;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use posgate_proto::event::{Envelope, EnvelopeError, EventData, EventType, metadata_str};
use posgate_proto::webhook::{CheckedHeaders, SIGNATURE_HEADER, SignatureError, TIMESTAMP_HEADER};
use secrecy::SecretString;
use time::OffsetDateTime;

use crate::http::error;
use crate::metrics::Metrics;
use crate::reconcile;
use crate::store::{IncomingEvent, Ingested, Store, StoreError, StoreErrorKind};

/// The webhook path.
pub const PATH: &str = "/webhooks/stablegenius";

/// The webhook secrets, shared with whoever reloads them.
pub type Secrets = Arc<std::sync::RwLock<Vec<SecretString>>>;

/// Settings the handler needs.
pub struct Ingress {
    pub store: Store,
    pub metrics: Metrics,
    /// Told about intents an event names that the gateway does not know (when an API key is set).
    pub reconcile: Option<reconcile::Handle>,
    /// Replaced as a whole on reload (SIGHUP); read once per delivery.
    pub secrets: Secrets,
    pub body_limit_bytes: usize,
    pub tolerance_secs: i64,
}

/// Why a delivery was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("signature check failed: {0}")]
    Unauthorized(#[from] SignatureError),
    #[error("body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the body failed")]
    Body(#[source] axum::Error),
    #[error("the body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())]
    BodyTimeout,
    #[error(transparent)]
    BadEnvelope(#[from] EnvelopeError),
    #[error("storing event {event_id}")]
    Store {
        event_id: String,
        #[source]
        source: StoreError,
    },
}

impl IngressError {
    /// Whether the answer goes out before the body was read whole: the connection then carries
    /// unread bytes and is closed, and says so (`Connection: close`), so that a client does not
    /// put it back in its pool and lose its next request on it.
    fn body_left_unread(&self) -> bool {
        matches!(
            self,
            IngressError::Unauthorized(_)
                | IngressError::TooLarge { .. }
                | IngressError::Body(_)
                | IngressError::BodyTimeout
        )
    }

    /// Label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            IngressError::Unauthorized(SignatureError::Stale { .. }) => "stale",
            IngressError::Unauthorized(_) => "bad_signature",
            IngressError::TooLarge { .. } => "too_large",
            IngressError::Body(_) | IngressError::BodyTimeout | IngressError::BadEnvelope(_) => {
                "malformed"
            }
            IngressError::Store { .. } => "store_error",
        }
    }
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        match &self {
            // One generic answer for every signature problem: the sender learns nothing about which
            // check failed or which secret exists.
            IngressError::Unauthorized(_) => error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing, invalid or stale signature",
            ),
            IngressError::TooLarge { limit } => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("body exceeds {limit} bytes"),
            ),
            IngressError::Body(_) => error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the body could not be read",
            ),
            IngressError::BodyTimeout => error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive in time",
            ),
            IngressError::BadEnvelope(e) => {
                error(StatusCode::BAD_REQUEST, "invalid_event", e.to_string())
            }
            IngressError::Store { source, .. }
                if matches!(source.kind(), StoreErrorKind::Overloaded) =>
            {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "busy; retry later",
                )
            }
            IngressError::Store { .. } => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "event not stored; retry later",
            ),
        }
    }
}

/// Refused webhooks are logged at most once a second (a flood of bad signatures must not bury
/// the lines that matter).
static REFUSED_LOG: crate::telemetry::Throttle =
    crate::telemetry::Throttle::new(std::time::Duration::from_secs(1));

/// Most time a webhook's body may take to arrive once its headers are in.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The ingress router.
pub fn router(ingress: Arc<Ingress>) -> Router {
    Router::new().route(PATH, post(webhook)).with_state(ingress)
}

async fn webhook(State(ingress): State<Arc<Ingress>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let result = handle(&ingress, &headers, body).await;
    let m = &ingress.metrics;
    m.ingest_answer.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(answer) => {
            let micros = started.elapsed().as_micros() as u64;
            let duplicate = answer.ingested == Ingested::Duplicate;
            let outcome = if duplicate { "duplicate" } else { "accepted" };
            m.webhooks
                .with_label_values(&[EventType::from_name(&answer.kind).label(), outcome])
                .inc();
            m.secret_matches
                .with_label_values(&[answer.secret_slot.to_string().as_str()])
                .inc();
            m.timestamp_skew.set(answer.skew_s);
            if let Ingested::New {
                outcome,
                effects,
                unknown_intents,
            } = &answer.ingested
            {
                for (_, effect) in effects.iter().filter(|(_, e)| e.from != e.to) {
                    m.transitions
                        .with_label_values(&[effect.from.as_str(), effect.to.as_str()])
                        .inc();
                }
                if let Some(reconcile) = &ingress.reconcile {
                    for id in unknown_intents {
                        reconcile.unknown_intent(id);
                    }
                }
                for (intent_id, effect) in effects {
                    tracing::info!(
                        event_id = %answer.event_id, event_type = %answer.kind, intent_id = %intent_id,
                        terminal_id = answer.terminal_id.as_deref().unwrap_or("-"),
                        from = effect.from.as_str(), to = effect.to.as_str(), answer_us = micros,
                        "webhook applied"
                    );
                }
                if effects.is_empty() {
                    tracing::info!(
                        event_id = %answer.event_id, event_type = %answer.kind, outcome = outcome.as_str(),
                        answer_us = micros, "webhook stored"
                    );
                }
            } else {
                tracing::debug!(event_id = %answer.event_id, "duplicate webhook");
            }
            let body = if duplicate {
                r#"{"received":true,"duplicate":true}"#
            } else {
                r#"{"received":true,"duplicate":false}"#
            };
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => {
            m.webhooks.with_label_values(&["none", e.outcome()]).inc();
            if let IngressError::Unauthorized(reason) = &e {
                m.signature_failures
                    .with_label_values(&[reason.reason()])
                    .inc();
            }
            match &e {
                IngressError::Store { .. } => {
                    tracing::error!(error = %e, error_chain = ?e, "webhook not stored")
                }
                _ => {
                    if let Some(left_out) = REFUSED_LOG.allow() {
                        tracing::warn!(reason = e.outcome(), error = %e, left_out, "webhook refused (at most one line a second; posgate_webhooks_total counts all)");
                    }
                }
            }
            if e.body_left_unread() {
                ([(header::CONNECTION, "close")], e).into_response()
            } else {
                e.into_response()
            }
        }
    }
}

struct Answer {
    event_id: String,
    kind: String,
    ingested: Ingested,
    /// Which configured secret verified it.
    secret_slot: usize,
    /// Our clock minus the provider's timestamp.
    skew_s: i64,
    /// The terminal the event names (`metadata.terminal_id`), for the log line.
    terminal_id: Option<String>,
}

async fn handle(
    ingress: &Ingress,
    headers: &HeaderMap,
    body: Body,
) -> Result<Answer, IngressError> {
    let limit = ingress.body_limit_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(IngressError::TooLarge { limit });
    }
    // The headers are checked before the body is read: a sender with a stale or missing timestamp,
    // or a pile of signature headers, is refused without costing a body read or a MAC.
    let now = OffsetDateTime::now_utc();
    let checked = check_headers(ingress, headers, now.unix_timestamp())?;
    // A body that trickles in is cut: the provider sends a webhook in one go.
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| IngressError::BodyTimeout)?;
    let raw: Bytes = read.map_err(|e| {
        if is_length_limit(&e) {
            IngressError::TooLarge { limit }
        } else {
            IngressError::Body(e)
        }
    })?;

    let skew_s = checked.skew_s;
    let secret_slot = {
        // Held only while the MACs are computed (no await). A reload that panicked mid-write
        // cannot leave a half-written Vec (it is replaced whole), so a poisoned lock still holds
        // good secrets.
        let secrets = ingress
            .secrets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        checked.verify_body(&secrets, &raw)?
    };

    let envelope = match Envelope::parse(&raw) {
        Ok(envelope) => envelope,
        Err(e) => {
            // Verified but unusable: kept for forensics, answered 400 (a retry would fail the same way).
            if let Err(store_error) = ingress.store.reject(raw.clone(), e.to_string(), now).await {
                tracing::warn!(error = %store_error, "could not keep the rejected body");
            }
            return Err(e.into());
        }
    };
    if envelope
        .api_version
        .as_deref()
        .is_some_and(|v| v != "2026-04-01")
    {
        tracing::warn!(event_id = %envelope.id, api_version = ?envelope.api_version, "unexpected api_version");
    }
    let kind = envelope.event_type();
    let data = EventData::parse(kind, envelope.data).map_err(|e| e.to_string());
    let terminal_id = match &data {
        Ok(EventData::PaymentIntent(pi)) => metadata_str(pi.metadata.as_ref(), "terminal_id"),
        Ok(EventData::Transaction(tx)) => metadata_str(tx.metadata.as_ref(), "terminal_id"),
        _ => None,
    }
    .map(str::to_owned);
    if let Err(reason) = &data {
        tracing::warn!(event_id = %envelope.id, event_type = %envelope.kind, %reason, "event data does not fit its type; kept as unparsed");
    }
    let event = IncomingEvent {
        event_id: envelope.id.clone(),
        kind: envelope.kind.clone(),
        raw: raw.clone(),
        received_at: now,
        created_at: envelope.created_at,
        data,
    };
    let event_id = envelope.id;
    let kind = envelope.kind;
    let ingested = ingress
        .store
        .ingest(event)
        .await
        .map_err(|source| IngressError::Store {
            event_id: event_id.clone(),
            source,
        })?;
    Ok(Answer {
        event_id,
        kind,
        ingested,
        secret_slot,
        skew_s,
        terminal_id,
    })
}

/// Checks both headers, the timestamp window and the MAC. Several signature headers are each tried.
fn check_headers(
    ingress: &Ingress,
    headers: &HeaderMap,
    now: i64,
) -> Result<CheckedHeaders, SignatureError> {
    let timestamp = headers
        .get(TIMESTAMP_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(SignatureError::MissingHeader(TIMESTAMP_HEADER))?;
    // A value that is not text is malformed (refused), not skipped.
    let signatures = headers
        .get_all(SIGNATURE_HEADER)
        .iter()
        .map(|v| v.to_str().unwrap_or_default());
    posgate_proto::webhook::check_headers(timestamp, signatures, now, ingress.tolerance_secs)
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use secrecy::SecretString;
    use tower::ServiceExt;

    use super::*;
    use crate::store::Limits;

    /// A body that never finishes is cut at `BODY_READ_TIMEOUT` with `408` (paused time: no
    /// real wait), instead of holding its connection and task for ever.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_arrives_is_answered_408() {
        let dir = tempfile::tempdir().unwrap();
        let ingress = Arc::new(Ingress {
            store: Store::open(dir.path(), Limits::new(16, 16)).unwrap(),
            metrics: Metrics::new().unwrap(),
            reconcile: None,
            secrets: Arc::new(std::sync::RwLock::new(vec![SecretString::from("whsec_t")])),
            body_limit_bytes: 65_536,
            tolerance_secs: 300,
        });
        let ts = OffsetDateTime::now_utc().unix_timestamp().to_string();
        let never = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        let request = Request::post(PATH)
            .header(TIMESTAMP_HEADER, ts)
            .header(SIGNATURE_HEADER, format!("sha256={}", "0".repeat(64)))
            .body(Body::from_stream(never))
            .unwrap();
        let response = router(ingress.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        ingress.store.close().await;
    }
}
