//! Terminal RPC over MQTT: `/tenants/{t}/rpc/req` → `/tenants/{t}/rpc/res` (interfaces.md).
//!
//! Requests `{"id","method","params"}`, replies `{"id","result"}` or `{"id","error":{"code",
//! "message"}}`. Amounts are decimal strings (`"4.40"`). The same request id sent twice gets the same
//! answer, so a terminal can retry freely.

use serde::{Deserialize, Serialize};

/// Longest request id accepted.
pub const MAX_ID_LEN: usize = 64;

/// A request from a terminal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    pub id: String,
    pub method: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RpcError {
    pub code: String,
    pub message: String,
}

/// A reply to a terminal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    /// A successful reply.
    pub fn ok(id: &str, result: serde_json::Value) -> Response {
        Response {
            id: id.to_owned(),
            result: Some(result),
            error: None,
        }
    }

    /// An error reply.
    pub fn err(id: &str, code: &str, message: impl Into<String>) -> Response {
        Response {
            id: id.to_owned(),
            result: None,
            error: Some(RpcError {
                code: code.to_owned(),
                message: message.into(),
            }),
        }
    }
}

/// `create_intent` parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateIntent {
    /// Decimal string, whole cents, 0.01 to 10000.
    pub amount: String,
    pub order_id: String,
    /// Seconds, 60 to 3600 (provider default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

/// `get_intent` and `cancel_intent` parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntentRef {
    pub intent_id: String,
}
