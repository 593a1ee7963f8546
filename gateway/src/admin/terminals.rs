//! Terminal registry endpoints: provisioning, listing, revocation.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use posgate_proto::topics;
use rand::RngCore;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use super::{Admin, store_error};
use crate::delivery::PresenceEntry;
use crate::http::error;
use crate::store::{AssignRefused, NewTerminal, TerminalRecord};

fn rfc3339(t: Option<time::OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.format(&Rfc3339).ok())
}

fn view(admin: &Admin, record: &TerminalRecord, pending: u64) -> serde_json::Value {
    let presence: Option<PresenceEntry> = admin
        .fleet
        .presence
        .read()
        .ok()
        .and_then(|p| p.get(&record.id).cloned());
    let online = presence.as_ref().is_some_and(|p| p.online) && record.revoked_at.is_none();
    // The most recent of what the store recorded and what the broker just told us.
    let last_seen = match (record.last_seen, presence.as_ref().map(|p| p.since)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    serde_json::json!({
        "id": record.id,
        "tenant": record.tenant,
        "merchant_id": record.merchant_id,
        "label": record.label,
        "online": online,
        "last_seen": rfc3339(last_seen),
        "pending": pending,
        "revoked": record.revoked_at.is_some(),
        "revoked_at": rfc3339(record.revoked_at),
        "created_at": rfc3339(Some(record.created_at)),
        "cert_serial": record.cert_serial,
    })
}

fn invalid(field: &str, message: &str) -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        format!("{field}: {message}"),
    )
}

/// The request body as a JSON object, or the `422` naming what is wrong with it.
fn json_object(body: &[u8]) -> Result<serde_json::Value, Box<Response>> {
    match serde_json::from_slice(body) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(Box::new(invalid("body", "must be a JSON object"))),
        Err(e) => Err(Box::new(invalid("body", &format!("not JSON: {e}")))),
    }
}

/// The terminal id in `field` of `request`, or the `422` naming the field.
fn terminal_id_field(request: &serde_json::Value, field: &str) -> Result<String, Box<Response>> {
    match request.get(field).and_then(|v| v.as_str()) {
        Some(id) if topics::valid_terminal_id(id) => Ok(id.to_owned()),
        Some(_) => Err(Box::new(invalid(
            field,
            "1-64 characters of A-Z a-z 0-9 _ . -",
        ))),
        None => Err(Box::new(invalid(field, "required string"))),
    }
}

/// `POST /v1/terminals`.
pub(super) async fn create(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let request = match json_object(&body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let id = match terminal_id_field(&request, "id") {
        Ok(id) => id,
        Err(refused) => return *refused,
    };
    let merchant_id = match request.get("merchant_id").and_then(|v| v.as_str()) {
        Some(m) if !m.trim().is_empty() && m.len() <= 255 => m.to_owned(),
        _ => return invalid("merchant_id", "required non-empty string"),
    };
    let label = match request.get("label") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(l)) if l.len() <= 200 => Some(l.clone()),
        Some(_) => return invalid("label", "optional string of at most 200 characters"),
    };
    match admin.store.terminal(id.clone()).await {
        Ok(Some(_)) => {
            return error(
                StatusCode::CONFLICT,
                "exists",
                format!("terminal {id} already exists"),
            );
        }
        Ok(None) => {}
        Err(e) => return store_error(&e),
    }
    let tenant = topics::tenant_for(&id);
    let pki = admin.fleet.pki.clone();
    let (issue_id, issue_tenant) = (id.clone(), tenant.clone());
    let issued = match tokio::task::spawn_blocking(move || {
        pki.issue_terminal(&issue_id, &issue_tenant)
    })
    .await
    {
        Ok(Ok(issued)) => issued,
        Ok(Err(e)) => {
            tracing::error!(error = %e, terminal_id = %id, "cannot issue a terminal certificate");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "certificate could not be issued",
            );
        }
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "certificate could not be issued",
            );
        }
    };
    let mut token = [0u8; 32];
    rand::rng().fill_bytes(&mut token);
    let http_token = hex::encode(token);
    let new = NewTerminal {
        id: id.clone(),
        tenant: tenant.clone(),
        merchant_id,
        label,
        cert_serial: issued.serial_hex.clone(),
        http_token_sha256: hex::encode(Sha256::digest(http_token.as_bytes())),
    };
    let record = match admin.store.register_terminal(new).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return error(
                StatusCode::CONFLICT,
                "exists",
                format!("terminal {id} already exists"),
            );
        }
        Err(e) => return store_error(&e),
    };
    (admin.fleet.registered)(&record);
    tracing::info!(terminal_id = %id, %tenant, serial = %record.cert_serial, "terminal provisioned");
    let t = topics::TerminalTopics::new(&tenant);
    let bundle = serde_json::json!({
        "terminal_id": id,
        "tenant": tenant,
        "mqtt_url": admin.fleet.mqtt_url,
        "client_id": id,
        "ca_pem": admin.fleet.pki.ca_pem(),
        "cert_pem": issued.cert_pem,
        "key_pem": issued.key_pem,
        "http_token": http_token,
        "gateway_jwk": admin.fleet.pki.jwk(),
        "topics": {
            "payments": t.payments,
            "acks": t.acks,
            "status": t.status,
            "rpc_req": t.rpc_req,
            "rpc_res": t.rpc_res,
        },
    });
    (StatusCode::CREATED, Json(bundle)).into_response()
}

/// `GET /v1/terminals`.
pub(super) async fn list(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.terminals().await {
        Ok(all) => {
            let data: Vec<_> = all
                .iter()
                .map(|(t, pending)| view(&admin, t, *pending))
                .collect();
            Json(serde_json::json!({ "object": "list", "data": data, "has_more": false }))
                .into_response()
        }
        Err(e) => store_error(&e),
    }
}

/// `GET /v1/terminals/{id}`.
pub(super) async fn get(State(admin): State<Arc<Admin>>, UrlPath(id): UrlPath<String>) -> Response {
    let record = match admin.store.terminal(id.clone()).await {
        Ok(Some(record)) => record,
        Ok(None) => return error(StatusCode::NOT_FOUND, "not_found", "no such terminal"),
        Err(e) => return store_error(&e),
    };
    match admin.store.outbox(Some(id)).await {
        Ok(rows) => Json(view(&admin, &record, rows.len() as u64)).into_response(),
        Err(e) => store_error(&e),
    }
}

/// `POST /v1/terminals/{id}/revoke`.
pub(super) async fn revoke(
    State(admin): State<Arc<Admin>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match admin.store.revoke_terminal(id.clone()).await {
        Ok(Some(revocation)) => {
            (admin.fleet.revoke)(&revocation);
            let record = &revocation.record;
            tracing::warn!(terminal_id = %id, serial = %record.cert_serial, undeliverable = revocation.parked.len(), "terminal revoked");
            Json(view(&admin, record, 0)).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "no such terminal"),
        Err(e) => store_error(&e),
    }
}

/// `POST /v1/undeliverable/{intent_id}/assign` `{"terminal_id"}`: a payment made for a terminal
/// that is unknown or revoked goes to the one named (the replacement, or the right lane).
pub(super) async fn assign(
    State(admin): State<Arc<Admin>>,
    UrlPath(intent_id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let request = match json_object(&body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let terminal_id = match terminal_id_field(&request, "terminal_id") {
        Ok(id) => id,
        Err(refused) => return *refused,
    };
    match admin
        .store
        .assign_undeliverable(intent_id.clone(), terminal_id.clone())
        .await
    {
        Ok(Ok(())) => {
            tracing::warn!(%intent_id, %terminal_id, "undeliverable confirmation assigned");
            Json(serde_json::json!({ "intent_id": intent_id, "terminal_id": terminal_id }))
                .into_response()
        }
        Ok(Err(AssignRefused::NoIntent)) => {
            error(StatusCode::NOT_FOUND, "not_found", "no such payment intent")
        }
        Ok(Err(AssignRefused::NotWaiting)) => error(
            StatusCode::CONFLICT,
            "not_undeliverable",
            format!("{intent_id} is not waiting for a terminal (see GET /v1/undeliverable)"),
        ),
        Ok(Err(AssignRefused::NoTerminal)) => invalid("terminal_id", "no such terminal"),
        Ok(Err(AssignRefused::Revoked)) => invalid("terminal_id", "that terminal is revoked"),
        Err(e) => store_error(&e),
    }
}

/// `GET /v1/undeliverable`.
pub(super) async fn undeliverable(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.undeliverable().await {
        Ok(list) => Json(serde_json::json!({ "object": "list", "data": list, "has_more": false }))
            .into_response(),
        Err(e) => store_error(&e),
    }
}
