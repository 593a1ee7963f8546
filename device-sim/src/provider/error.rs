//! [`ApiError`]: a refused REST or control request, answered in the provider's error shape
//! `{"error":{"type","message","param","code"}}` (provider-api.md §2).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A provider error, answered as `{"error":{"type","message","param","code"}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.type`: `invalid_request_error`, `authentication_error`, `idempotency_error`,
    /// `rate_limit_error`, `api_error`.
    pub kind: &'static str,
    /// `error.code`, stable.
    pub code: String,
    /// `error.message`, for people.
    pub message: String,
    /// `error.param`, the offending parameter.
    pub param: Option<String>,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn invalid(param: &str, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: code.into(),
            message: message.into(),
            param: (!param.is_empty()).then(|| param.to_owned()),
        }
    }

    pub(super) fn not_found(param: &str, what: &str) -> ApiError {
        ApiError {
            status: 404,
            kind: "invalid_request_error",
            code: "resource_missing".into(),
            message: format!("no such {what}"),
            param: Some(param.into()),
        }
    }

    pub(super) fn other(status: u16, kind: &'static str, code: &str, message: &str) -> ApiError {
        ApiError {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "type": self.kind,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

pub(super) fn poisoned() -> ApiError {
    ApiError::other(500, "api_error", "internal", "simulator state is poisoned")
}
