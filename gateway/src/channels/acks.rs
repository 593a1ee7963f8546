//! `POST /v1/terminal/acks`: an ack handed to the delivery engine as an MQTT ack would be.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use posgate_proto::confirmation::Ack;
use posgate_proto::topics::TopicKind;

use crate::delivery::BrokerEvent;
use crate::http::error;

use super::*;

/// Why an ack was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum AckError {
    #[error("expected {{\"intent_id\":\"pi_…\",\"seq\":N}}: {0}")]
    Invalid(#[source] serde_json::Error),
    #[error("shutting down; ack again later")]
    Closed,
}

impl AckError {
    pub(super) fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            AckError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_ack"),
            AckError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    /// The house error body, as a WebSocket text frame.
    pub(super) fn frame(&self) -> String {
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

/// Hands an ack to the delivery engine, exactly as the broker hands it an MQTT ack.
pub(super) fn forward_ack(
    channels: &Channels,
    terminal_id: &str,
    body: &[u8],
) -> Result<Ack, AckError> {
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
pub(super) async fn ack(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let auth = match authenticate(&channels, &headers, &peer, None, false).await {
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
