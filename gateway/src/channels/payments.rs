//! Payments from HTTP terminals: `POST /v1/terminal/payment-intents` (create),
//! `GET /v1/terminal/payment-intents/{intent_id}` (the reboot case) and
//! `POST /v1/terminal/payment-intents/{intent_id}/cancel`.
//!
//! One implementation behind both transports: each call becomes the MQTT RPC request it stands
//! for and goes through [`crate::rpc::Rpc`] (admission, the provider's budget and idempotency
//! keys, the QR check, ownership, the stored answer of a create or cancel); only the transport
//! differs. The terminal's `request_id` is the RPC request id, so a retried create gives the same
//! intent whichever transport carried it. Errors keep the RPC's codes in the house body.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use posgate_proto::rpc::Response as RpcResponse;
use serde_json::{Value, json};

use super::auth::{Peer, authenticate};
use super::{Channels, error};

/// Request bodies are small; larger ones are refused before they are read.
pub(super) const LIMIT_BYTES: usize = 4096;

/// `POST /v1/terminal/payment-intents` `{"request_id","amount","order_id","ttl"?}`.
pub(super) async fn create(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = match authenticate(&channels, &headers, &peer, None, false).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let Ok(Value::Object(mut params)) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            r#"expected {"request_id","amount","order_id","ttl"?}"#,
        );
    };
    let Some(Value::String(request_id)) = params.remove("request_id") else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "request_id: a string of 1 to 64 characters, the same on every retry",
        );
    };
    let request = json!({"id": request_id, "method": "create_intent", "params": params});
    call(&channels, &auth.terminal.id, &request, StatusCode::CREATED).await
}

/// `GET /v1/terminal/payment-intents/{intent_id}`.
pub(super) async fn get(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    Path(intent_id): Path<String>,
) -> Response {
    // A read is answered afresh every time: its request id only has to be unique.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let request_id = format!("http-get-{nanos}");
    on_intent(
        &channels,
        &peer,
        &headers,
        "get_intent",
        request_id,
        intent_id,
    )
    .await
}

/// `POST /v1/terminal/payment-intents/{intent_id}/cancel`.
pub(super) async fn cancel(
    State(channels): State<Arc<Channels>>,
    peer: Peer,
    headers: HeaderMap,
    Path(intent_id): Path<String>,
) -> Response {
    // One cancel per intent: a retry gets the stored answer of the first.
    let request_id = format!("http-cancel-{intent_id}");
    on_intent(
        &channels,
        &peer,
        &headers,
        "cancel_intent",
        request_id,
        intent_id,
    )
    .await
}

/// Authenticates the caller, then runs `method` on `intent_id` as its RPC request `request_id`.
async fn on_intent(
    channels: &Channels,
    peer: &Peer,
    headers: &HeaderMap,
    method: &str,
    request_id: String,
    intent_id: String,
) -> Response {
    let auth = match authenticate(channels, headers, peer, None, false).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let request = json!({
        "id": request_id,
        "method": method,
        "params": {"intent_id": intent_id},
    });
    call(channels, &auth.terminal.id, &request, StatusCode::OK).await
}

/// Runs `request` through the RPC service as `terminal_id`'s and answers it over HTTP. The
/// admission permit is held while the answer is worked out, exactly as on MQTT.
async fn call(channels: &Channels, terminal_id: &str, request: &Value, ok: StatusCode) -> Response {
    let payload = serde_json::to_vec(request).unwrap_or_default();
    let response = match channels.rpc.admit(terminal_id, &payload) {
        Ok(_permit) => channels.rpc.handle(terminal_id, &payload).await,
        // An HTTP terminal is answered 429 each time; there is no session to cut.
        Err(refused) => refused.response,
    };
    http_answer(response, ok)
}

/// The HTTP form of an RPC answer: the result as the body, or the house error body with the
/// RPC's code and the status that goes with it.
fn http_answer(response: RpcResponse, ok: StatusCode) -> Response {
    let Some(e) = response.error else {
        return (ok, Json(response.result.unwrap_or(Value::Null))).into_response();
    };
    let status = match e.code.as_str() {
        "invalid_request" => StatusCode::BAD_REQUEST,
        "invalid_params" => StatusCode::UNPROCESSABLE_ENTITY,
        "not_found" => StatusCode::NOT_FOUND,
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "idempotency_conflict" => StatusCode::CONFLICT,
        // The provider refused (a 4xx other than 429; the message names its status and code)
        // or answered a QR that failed the check: the terminal's request was fine, the provider's
        // answer is the problem, and the same request again will not do better.
        "rejected" | "qr_mismatch" => StatusCode::BAD_GATEWAY,
        "provider_unavailable" | "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut answer = error(status, &e.code, e.message);
    let retry_ms = response
        .result
        .as_ref()
        .and_then(|r| r["retry_after_ms"].as_u64());
    if let Some(ms) = retry_ms {
        let secs = ms.div_ceil(1000).max(1);
        if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
            answer.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use posgate_proto::rpc::RpcError;

    use super::*;

    /// Every error code the RPC answers (docs/interfaces.md) has its own HTTP status; only a
    /// stored answer that cannot be read is a 500. `rejected` used to fall through to 500.
    #[test]
    fn every_rpc_error_code_has_its_status() {
        for (code, status) in [
            ("invalid_request", 400),
            ("invalid_params", 422),
            ("unauthorized", 401),
            ("not_found", 404),
            ("idempotency_conflict", 409),
            ("rate_limited", 429),
            ("rejected", 502),
            ("qr_mismatch", 502),
            ("provider_unavailable", 503),
            ("unavailable", 503),
            ("internal", 500),
        ] {
            let response = RpcResponse {
                id: "r".into(),
                result: None,
                error: Some(RpcError {
                    code: code.into(),
                    message: "m".into(),
                }),
            };
            assert_eq!(
                http_answer(response, StatusCode::OK).status().as_u16(),
                status,
                "{code}"
            );
        }
    }
}
