//! Terminal registry endpoints: provisioning (with a key made here or from the terminal's CSR),
//! certificate renewal, listing, revocation.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use posgate_proto::event::MAX_ID_BYTES;
use posgate_proto::topics;
use rand::RngCore;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use super::{Admin, store_error};
use crate::delivery::PresenceEntry;
use crate::http::error;
use crate::pki::{CsrError, CsrKey, csr};
use crate::store::{
    AssignRefused, NewTerminal, RenewRefused, RenewTerminal, Retired, TerminalRecord,
};

/// How long a replaced certificate stays accepted when its renewal does not say
/// (`revoke_old_after`), unless the new one is used first.
pub const DEFAULT_REVOKE_OLD_AFTER_SECS: u64 = 7 * 24 * 3600;
/// The longest `revoke_old_after` accepted.
pub const MAX_REVOKE_OLD_AFTER_SECS: u64 = 90 * 24 * 3600;

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
        "cert_not_after": rfc3339(Some(record.cert_expiry().min(admin.fleet.pki.ca_not_after()))),
        "previous_cert": record.previous_cert.as_ref().map(|p| serde_json::json!({
            "serial": p.serial,
            "not_after": rfc3339(p.not_after),
            "revoke_at": rfc3339(Some(p.revoke_at)),
        })),
    })
}

/// The `400` for a CSR that cannot be used.
fn bad_csr(e: &CsrError) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_csr",
        format!("csr_pem: {e}"),
    )
}

/// The optional `csr_pem` of `request`, parsed and verified.
fn csr_field(request: &serde_json::Value) -> Result<Option<CsrKey>, Box<Response>> {
    match request.get("csr_pem") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(pem)) => match csr::parse(pem) {
            Ok(key) => Ok(Some(key)),
            Err(e) => Err(Box::new(bad_csr(&e))),
        },
        Some(_) => Err(Box::new(invalid(
            "csr_pem",
            "optional string: a PEM PKCS#10 certificate request",
        ))),
    }
}

/// A certificate just issued, and the private key when the gateway made it.
struct Issued {
    cert_pem: String,
    serial_hex: String,
    not_after: time::OffsetDateTime,
    key_pem: Option<String>,
}

/// Issues `id`'s certificate for the CSR's key, or for a key made here.
async fn issue(admin: &Admin, id: &str, csr_key: Option<CsrKey>) -> Result<Issued, Box<Response>> {
    let tenant = topics::tenant_for(id);
    let pki = admin.fleet.pki.clone();
    let issue_id = id.to_owned();
    let issued = tokio::task::spawn_blocking(move || match csr_key {
        Some(key) => pki
            .issue_terminal_for_csr(&issue_id, &tenant, &key)
            .map(|c| Issued {
                cert_pem: c.cert_pem,
                serial_hex: c.serial_hex,
                not_after: c.not_after,
                key_pem: None,
            }),
        None => pki.issue_terminal(&issue_id, &tenant).map(|c| Issued {
            cert_pem: c.cert_pem,
            serial_hex: c.serial_hex,
            not_after: c.not_after,
            key_pem: Some(c.key_pem),
        }),
    })
    .await;
    match issued {
        Ok(Ok(issued)) => Ok(issued),
        Ok(Err(e)) => {
            tracing::error!(error = %e, terminal_id = %id, "cannot issue a terminal certificate");
            Err(Box::new(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "certificate could not be issued",
            )))
        }
        Err(_) => Err(Box::new(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "certificate could not be issued",
        ))),
    }
}

/// A new bearer token and its hash.
fn new_http_token() -> (String, String) {
    let mut token = [0u8; 32];
    rand::rng().fill_bytes(&mut token);
    let token = hex::encode(token);
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    (token, hash)
}

/// The bundle a terminal loads: provisioning's, and a renewal's (which leaves out `http_token`
/// unless it was rotated). `key_pem` only when the gateway made the key.
fn bundle(
    admin: &Admin,
    record: &TerminalRecord,
    issued: &Issued,
    http_token: Option<&str>,
) -> serde_json::Value {
    let t = topics::TerminalTopics::new(&record.tenant);
    let mut bundle = serde_json::json!({
        "terminal_id": record.id,
        "tenant": record.tenant,
        "mqtt_url": admin.fleet.mqtt_url,
        "client_id": record.id,
        "ca_pem": admin.fleet.pki.ca_pem(),
        "cert_pem": issued.cert_pem,
        "cert_serial": issued.serial_hex,
        "cert_not_after": rfc3339(Some(issued.not_after)),
        "gateway_jwk": admin.fleet.pki.jwk(),
        "topics": {
            "payments": t.payments,
            "acks": t.acks,
            "status": t.status,
            "rpc_req": t.rpc_req,
            "rpc_res": t.rpc_res,
        },
    });
    if let Some(key_pem) = &issued.key_pem {
        bundle["key_pem"] = key_pem.as_str().into();
    }
    if let Some(token) = http_token {
        bundle["http_token"] = token.into();
    }
    bundle
}

/// A merchant id as the provider writes them (docs/provider.md): `mer_` and an opaque rest, at
/// most [`MAX_ID_BYTES`] bytes. posgate does not parse the rest; it only refuses what cannot be
/// one (an empty rest, whitespace or control characters, a pasted line with its newline).
fn valid_merchant_id(id: &str) -> bool {
    id.len() <= MAX_ID_BYTES
        && id.strip_prefix("mer_").is_some_and(|rest| {
            !rest.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
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
        Some(m) if valid_merchant_id(m) => m.to_owned(),
        // Refused here rather than by the provider at the terminal's first payment, where the
        // cashier could do nothing about it.
        Some(m) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_merchant_id",
                format!(
                    "merchant_id {:?} is not a provider merchant id: mer_ followed by at least \
                     one character, at most {MAX_ID_BYTES} bytes, no spaces or control characters",
                    m.chars().take(80).collect::<String>()
                ),
            );
        }
        None => return invalid("merchant_id", "required string"),
    };
    let label = match request.get("label") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(l)) if l.len() <= 200 => Some(l.clone()),
        Some(_) => return invalid("label", "optional string of at most 200 characters"),
    };
    let csr_key = match csr_field(&request) {
        Ok(key) => key,
        Err(refused) => return *refused,
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
    let issued = match issue(&admin, &id, csr_key).await {
        Ok(issued) => issued,
        Err(refused) => return *refused,
    };
    let (http_token, http_token_sha256) = new_http_token();
    let new = NewTerminal {
        id: id.clone(),
        tenant: topics::tenant_for(&id),
        merchant_id,
        label,
        cert_serial: issued.serial_hex.clone(),
        cert_not_after: Some(issued.not_after),
        http_token_sha256,
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
    tracing::info!(terminal_id = %id, tenant = %record.tenant, serial = %record.cert_serial, own_key = issued.key_pem.is_none(), "terminal provisioned");
    let bundle = bundle(&admin, &record, &issued, Some(&http_token));
    (StatusCode::CREATED, Json(bundle)).into_response()
}

/// `POST /v1/terminals/{id}/certificate` `{"csr_pem"?, "revoke_old_after"?, "rotate_http_token"?}`
/// (an empty body is `{}`): a new certificate for the same terminal. The current one stays
/// accepted until the new one is first used or `revoke_old_after` seconds have passed.
pub(super) async fn renew(
    State(admin): State<Arc<Admin>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        match json_object(&body) {
            Ok(request) => request,
            Err(refused) => return *refused,
        }
    };
    let revoke_old_after = match request.get("revoke_old_after") {
        None | Some(serde_json::Value::Null) => DEFAULT_REVOKE_OLD_AFTER_SECS,
        Some(v) => match v.as_u64() {
            Some(secs) if secs <= MAX_REVOKE_OLD_AFTER_SECS => secs,
            _ => {
                return invalid(
                    "revoke_old_after",
                    &format!("optional integer of seconds, 0 to {MAX_REVOKE_OLD_AFTER_SECS}"),
                );
            }
        },
    };
    let rotate_http_token = match request.get("rotate_http_token") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return invalid("rotate_http_token", "optional boolean"),
    };
    let csr_key = match csr_field(&request) {
        Ok(key) => key,
        Err(refused) => return *refused,
    };
    match admin.store.terminal(id.clone()).await {
        Ok(Some(t)) if t.revoked_at.is_some() => return renew_refused(&id, &RenewRefused::Revoked),
        Ok(Some(_)) => {}
        Ok(None) => return renew_refused(&id, &RenewRefused::NoTerminal),
        Err(e) => return store_error(&e),
    }
    let issued = match issue(&admin, &id, csr_key).await {
        Ok(issued) => issued,
        Err(refused) => return *refused,
    };
    let token = rotate_http_token.then(new_http_token);
    let revoke_old_at = time::OffsetDateTime::now_utc()
        + time::Duration::seconds(i64::try_from(revoke_old_after).unwrap_or(i64::MAX));
    let renew = RenewTerminal {
        cert_serial: issued.serial_hex.clone(),
        cert_not_after: issued.not_after,
        revoke_old_at,
        http_token_sha256: token.as_ref().map(|(_, hash)| hash.clone()),
    };
    let renewal = match admin.store.renew_terminal(id.clone(), renew).await {
        Ok(Ok(renewal)) => renewal,
        Ok(Err(refused)) => return renew_refused(&id, &refused),
        Err(e) => return store_error(&e),
    };
    let record = &renewal.record;
    admin.fleet.renewals.pending(record);
    if let Some(serial) = renewal.superseded {
        admin.fleet.renewals.superseded(Retired {
            terminal_id: id.clone(),
            serial,
            used: false,
        });
    }
    // The new certificate is a user of its own at NATS, and a rotated token becomes usable.
    (admin.fleet.registered)(record);
    let previous = record.previous_cert.as_ref();
    tracing::info!(
        terminal_id = %id,
        serial = %record.cert_serial,
        previous = previous.map(|p| p.serial.as_str()),
        revoke_old_at = ?previous.map(|p| p.revoke_at),
        own_key = issued.key_pem.is_none(),
        http_token_rotated = token.is_some(),
        "terminal certificate renewed"
    );
    let mut bundle = bundle(
        &admin,
        record,
        &issued,
        token.as_ref().map(|(t, _)| t.as_str()),
    );
    bundle["previous_cert_serial"] = previous.map(|p| p.serial.clone()).into();
    bundle["revoke_old_at"] = rfc3339(previous.map(|p| p.revoke_at)).into();
    Json(bundle).into_response()
}

fn renew_refused(id: &str, refused: &RenewRefused) -> Response {
    match refused {
        RenewRefused::NoTerminal => error(StatusCode::NOT_FOUND, "not_found", "no such terminal"),
        RenewRefused::Revoked => error(
            StatusCode::CONFLICT,
            "revoked",
            format!("terminal {id} is revoked; provision a new terminal id"),
        ),
    }
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
