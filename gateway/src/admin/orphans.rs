//! `GET /v1/orphan-transfers`: transfers that match no intent (provider-api.md §6.5), found by
//! reconciliation's listing of the provider's transactions. They are never pushed to a terminal
//! and never dropped; an operator decides what to do with each (refund, attach to an order).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{Admin, store_error};

/// Every orphan transfer, oldest first: `{"object":"list","data":[…]}`.
pub(super) async fn list(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.orphan_transfers().await {
        Ok(orphans) => Json(serde_json::json!({
            "object": "list",
            "data": orphans,
            "has_more": false,
        }))
        .into_response(),
        Err(e) => store_error(&e),
    }
}
