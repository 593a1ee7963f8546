//! The HTTP surface: the provider's REST API under `/v1` (provider-api.md §2) and the simulator's
//! control endpoints under `/_sim` (interfaces.md, "Simulator contract").
//!
//! Bodies are read as bytes and parsed here, so a malformed body gets the provider's error shape
//! rather than axum's.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use posgate_proto::MicroUsdc;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

use super::state::Core;
use super::{ApiError, model};

pub(super) fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/v1/payment-intents", post(create_intent))
        .route("/v1/payment-intents/{id}", get(by_id(Core::intent)))
        .route("/v1/payment-intents/{id}/cancel", post(by_id(Core::cancel)))
        .route("/v1/transactions", get(list_transactions))
        .route("/v1/transactions/{id}", get(by_id(Core::transaction)))
        .route("/_sim/pay/{intent_id}", post(sim_pay))
        .route("/_sim/pay-unknown", post(sim_pay_unknown))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/deliveries", get(sim_deliveries))
        .fallback(not_found)
        .with_state(core)
}

/// ISO 8601 UTC: a date-time (RFC 3339), a date (`2026-04-01`, midnight), or Unix seconds.
pub(super) fn parse_date(text: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = Date::parse(text, &date_format) {
        return Some(d.midnight().assume_utc());
    }
    text.parse::<i64>()
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
}

/// Auth, rate limit and injected failures.
fn gate(core: &Core, headers: &HeaderMap) -> Result<super::Mode, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    core.gate(authorization)
}

/// A refused request as a response (with `Retry-After` on a 429 when configured).
fn reject(core: &Core, e: ApiError) -> Response {
    let retry_after = e.status == 429 && core.config.api_faults.retry_after;
    let mut response = e.into_response();
    if retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|_| ApiError::invalid("", "body_invalid", "the body is not valid JSON"))
}

fn answer(status: u16, object: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, axum::Json(object)).into_response()
}

fn result(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(object) => answer(200, object),
        Err(e) => e.into_response(),
    }
}

async fn create_intent(State(core): State<Arc<Core>>, headers: HeaderMap, body: Bytes) -> Response {
    let mode = match gate(&core, &headers) {
        Ok(mode) => mode,
        Err(e) => return reject(&core, e),
    };
    match json_body(&body).and_then(|b| core.create(mode, &b)) {
        Ok((status, object)) => answer(status, object),
        Err(e) => e.into_response(),
    }
}

/// A gated call on the `{id}` of its path (get an intent, cancel it, get a transaction): the gate
/// first, then `op` on the id.
fn by_id(
    op: fn(&Core, &str) -> Result<Value, ApiError>,
) -> impl Fn(State<Arc<Core>>, HeaderMap, Path<String>) -> std::future::Ready<Response>
+ Clone
+ Send
+ Sync
+ 'static {
    move |State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>| {
        std::future::ready(gated(&core, &headers, || op(&core, &id)))
    }
}

async fn list_transactions(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    gated(&core, &headers, || core.list_transactions(&query))
}

/// The gate, then `op`'s object answered 200 (or its error).
fn gated(
    core: &Core,
    headers: &HeaderMap,
    op: impl FnOnce() -> Result<Value, ApiError>,
) -> Response {
    if let Err(e) = gate(core, headers) {
        return reject(core, e);
    }
    result(op())
}

/// The optional body of `/_sim/pay/{id}`: `{"amount":"4.40","late":false}` (amount as a decimal
/// string or number; default: the intent's amount).
fn pay_args(body: &Bytes) -> Result<(Option<MicroUsdc>, bool, Option<String>), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, false, None));
    }
    let value = json_body(body)?;
    let amount = match value.get("amount") {
        None | Some(Value::Null) => None,
        Some(a) => Some(model::parse_amount(a).ok_or_else(|| {
            ApiError::invalid(
                "amount",
                "amount_invalid",
                "amount must be a decimal with at most 6 places",
            )
        })?),
    };
    let late = match value.get("late") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "late",
                "parameter_invalid_type",
                "late must be a boolean",
            ));
        }
    };
    let address = value
        .get("address")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok((amount, late, address))
}

async fn sim_pay(
    State(core): State<Arc<Core>>,
    Path(intent_id): Path<String>,
    body: Bytes,
) -> Response {
    let receipt = pay_args(&body).and_then(|(amount, late, _)| core.pay(&intent_id, amount, late));
    match receipt {
        Ok(r) => (StatusCode::ACCEPTED, axum::Json(r)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn sim_pay_unknown(State(core): State<Arc<Core>>, body: Bytes) -> Response {
    let receipt = pay_args(&body).and_then(|(amount, _, address)| {
        core.pay_unknown(amount.unwrap_or(MicroUsdc(1_000_000)), address)
    });
    match receipt {
        Ok(r) => (StatusCode::ACCEPTED, axum::Json(r)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn sim_stats(State(core): State<Arc<Core>>) -> Response {
    axum::Json(core.stats()).into_response()
}

async fn sim_deliveries(State(core): State<Arc<Core>>) -> Response {
    axum::Json(core.deliverer.records()).into_response()
}

async fn not_found() -> Response {
    ApiError {
        status: 404,
        kind: "invalid_request_error",
        code: "route_not_found".into(),
        message: "no such route".into(),
        param: None,
    }
    .into_response()
}
