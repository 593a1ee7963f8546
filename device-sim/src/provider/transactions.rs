//! The REST read side of transfers: `GET /v1/transactions/{id}` and `GET /v1/transactions`, newest
//! first, filtered by merchant, status and date, paged with Stripe-style cursors (provider-api.md
//! §2.6, §2.7).

use std::collections::HashMap;

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::error::poisoned;
use super::model::Transaction;
use super::state::Core;
use super::{ApiError, api};

// === impl Core ===

impl Core {
    /// `GET /v1/transactions/{id}`.
    pub(super) fn transaction(&self, id: &str) -> Result<Value, ApiError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        state
            .transactions
            .iter()
            .find(|t| t.id == id)
            .map(Transaction::to_json)
            .ok_or_else(|| ApiError::not_found("id", "transaction"))
    }

    /// `GET /v1/transactions?…`: newest first, Stripe-style cursors.
    pub(super) fn list_transactions(
        &self,
        query: &HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let date = |name: &str| -> Result<Option<OffsetDateTime>, ApiError> {
            match query.get(name) {
                None => Ok(None),
                Some(text) => api::parse_date(text).map(Some).ok_or_else(|| {
                    ApiError::invalid(
                        name,
                        "parameter_invalid",
                        format!("{name} must be an ISO 8601 date or date-time (UTC)"),
                    )
                }),
            }
        };
        let date_from = date("date_from")?;
        let date_to = date("date_to")?;
        let limit = match query.get("limit") {
            None => 10,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid(
                        "limit",
                        "parameter_invalid",
                        "limit must be from 1 to 100",
                    ));
                }
            },
        };
        if let Some(status) = query.get("status")
            && !["confirmed", "pending", "failed"].contains(&status.as_str())
        {
            return Err(ApiError::invalid(
                "status",
                "parameter_invalid",
                "status must be confirmed, pending or failed",
            ));
        }
        let state = self.state.lock().map_err(|_| poisoned())?;
        let matching: Vec<&Transaction> = state
            .transactions
            .iter()
            .rev()
            .filter(|t| query.get("merchant_id").is_none_or(|m| &t.merchant_id == m))
            .filter(|_| query.get("status").is_none_or(|s| s == "confirmed"))
            .filter(|t| date_from.is_none_or(|d| t.confirmed_at >= d))
            .filter(|t| date_to.is_none_or(|d| t.confirmed_at <= d))
            .collect();
        let cursor = |name: &str| -> Result<Option<usize>, ApiError> {
            match query.get(name) {
                None => Ok(None),
                Some(id) => matching
                    .iter()
                    .position(|t| &t.id == id)
                    .map(Some)
                    .ok_or_else(|| ApiError::not_found(name, "transaction")),
            }
        };
        let (start, end) = match (cursor("starting_after")?, cursor("ending_before")?) {
            (Some(after), _) => (after + 1, (after + 1 + limit).min(matching.len())),
            (None, Some(before)) => (before.saturating_sub(limit), before),
            (None, None) => (0, limit.min(matching.len())),
        };
        let page: Vec<Value> = matching[start..end].iter().map(|t| t.to_json()).collect();
        let has_more = match query.get("ending_before") {
            Some(_) if query.get("starting_after").is_none() => start > 0,
            _ => end < matching.len(),
        };
        Ok(json!({"object": "list", "data": page, "has_more": has_more}))
    }
}
