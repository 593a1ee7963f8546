//! The admin listener: `/healthz`, `/readyz`, and the admin API behind the bearer admin token.
//!
//! The token comes from `admin.token`, or is generated at first start into `data_dir/admin.token`
//! (mode 0600) and read from there on later starts. It is compared in constant time.
//!
//! | call | answer |
//! |---|---|
//! | `POST /v1/terminals` `{"id","merchant_id","label"?,"csr_pem"?}` | `201` + provisioning bundle (no `key_pem` with a CSR); `409` if the id exists; `400` for an unusable CSR or a `merchant_id` not of the provider's form (`mer_…`) |
//! | `POST /v1/terminals/{id}/certificate` `{"csr_pem"?,"revoke_old_after"?,"rotate_http_token"?}` | `200` + a bundle with a new certificate; the old one is revoked at the new one's first use or after `revoke_old_after` s (default 7 days); `409` if revoked |
//! | `GET /v1/terminals`, `GET /v1/terminals/{id}` | registry with `online`, `last_seen`, `pending` |
//! | `POST /v1/terminals/{id}/revoke` | `200`; disconnected and refused from then on |
//! | `GET /v1/payment-intents/{id}`, `GET /v1/payment-intents?…` | the gateway's view of intents |
//! | `GET /v1/undeliverable` | confirmations waiting for a terminal that is not registered (or revoked) |
//! | `POST /v1/undeliverable/{intent_id}/assign` | `{"terminal_id"}`: send that confirmation to another terminal |
//! | `GET /v1/orphan-transfers` | transfers that match no intent (found by reconciliation) |
//!
//! Missing or wrong token: `401`. Unknown id: `404`. Bad JSON or field: `422` naming the field.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::delivery::Presence;
use crate::domain::IntentStatus;
use crate::http::error;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::store::{IntentFilter, Store, StoreError, StoredIntent};
use crate::store::{Revocation, TerminalRecord};

mod orphans;
mod renewals;
mod terminals;

pub use renewals::Renewals;
pub use terminals::{DEFAULT_REVOKE_OLD_AFTER_SECS, MAX_REVOKE_OLD_AFTER_SECS};

/// File name of the generated admin token inside `data_dir`.
pub const TOKEN_FILE: &str = "admin.token";

/// Shared state of the admin API.
pub struct Admin {
    pub store: Store,
    pub token: SecretString,
    /// Set once every listener is bound and serving.
    pub ready: Arc<AtomicBool>,
    /// Terminal provisioning and revocation.
    pub fleet: Fleet,
    pub metrics: Metrics,
    /// This replica's shard leases (PostgreSQL backend; `None` with redb: it owns everything).
    pub replicas: Option<crate::replicas::Ownership>,
}

/// What the terminal endpoints need besides the store.
pub struct Fleet {
    pub pki: Arc<Pki>,
    pub presence: Presence,
    /// `mqtts://host:port` for provisioning bundles.
    pub mqtt_url: String,
    /// Cuts a revoked terminal's connections and refuses its certificate from now on; tells the
    /// delivery engine which confirmations left the outbox.
    pub revoke: Arc<dyn Fn(&Revocation) + Send + Sync>,
    /// Told about every terminal just registered or renewed: its bearer token (new or rotated)
    /// becomes usable, and an external broker's files must name its new certificate.
    pub registered: Arc<dyn Fn(&TerminalRecord) + Send + Sync>,
    /// Certificate renewals waiting for their new certificate's first use.
    pub renewals: Renewals,
    /// The broker's number of open connections.
    pub connections: Arc<dyn Fn() -> i64 + Send + Sync>,
}

/// Errors loading or creating the admin token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading admin token {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing admin token {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token file {path} is empty or too short")]
    Invalid { path: PathBuf },
}

/// The configured token, or the one in `data_dir/admin.token`, generated (mode 0600) if absent.
///
/// # Errors
/// [`TokenError`] when the file cannot be read, created, or holds no usable token.
pub fn load_or_create_token(
    configured: Option<&SecretString>,
    data_dir: &Path,
) -> Result<SecretString, TokenError> {
    if let Some(token) = configured {
        return Ok(token.clone());
    }
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() < 16 {
                return Err(TokenError::Invalid { path });
            }
            return Ok(SecretString::from(token.to_owned()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TokenError::Read { path, source }),
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    write().map_err(|source| TokenError::Write {
        path: path.clone(),
        source,
    })?;
    tracing::info!(path = %path.display(), "generated the admin token");
    Ok(SecretString::from(token))
}

/// The admin router.
pub fn router(admin: Arc<Admin>) -> Router {
    let api = Router::new()
        .route("/v1/payment-intents", get(list_intents))
        .route("/v1/payment-intents/{id}", get(get_intent))
        .route(
            "/v1/terminals",
            get(terminals::list).post(terminals::create),
        )
        .route("/v1/terminals/{id}", get(terminals::get))
        .route("/v1/terminals/{id}/revoke", post(terminals::revoke))
        .route("/v1/terminals/{id}/certificate", post(terminals::renew))
        .route("/v1/undeliverable", get(terminals::undeliverable))
        .route(
            "/v1/undeliverable/{intent_id}/assign",
            post(terminals::assign),
        )
        .route("/v1/orphan-transfers", get(orphans::list))
        .route("/v1/replica", get(replica))
        .route_layer(middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(admin)
}

async fn require_token(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = admin.token.expose_secret().as_bytes();
    if bool::from(presented.as_bytes().ct_eq(expected)) {
        next.run(request).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token",
        )
    }
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let ready = admin.ready.load(Ordering::Relaxed);
    let store = admin.store.is_healthy();
    // A replica that cannot renew its leases delivers nothing (its shards lapse).
    let leases = admin.replicas.as_ref().is_none_or(|o| o.renewing());
    let body = serde_json::json!({
        "ready": ready && store && leases,
        "listeners": ready,
        "store": store,
        "leases": leases,
    });
    let status = if ready && store && leases {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /v1/replica`: this replica's id and the terminal shards it delivers for now.
async fn replica(State(admin): State<Arc<Admin>>) -> Response {
    let body = match &admin.replicas {
        Some(o) => serde_json::json!({
            "id": o.id(),
            "shards": crate::replicas::SHARDS,
            "owned": o.owned(),
            "renewing": o.renewing(),
        }),
        // redb: a single process delivers to every terminal.
        None => serde_json::json!({
            "id": null,
            "shards": crate::replicas::SHARDS,
            "owned": (0..crate::replicas::SHARDS).collect::<Vec<_>>(),
            "renewing": true,
        }),
    };
    Json(body).into_response()
}

/// `GET /metrics`: refreshes the gauges that describe the store, then the text format.
async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let m = &admin.metrics;
    if let Ok(rows) = admin.store.outbox(None).await {
        m.outbox_depth.set(rows.len() as i64);
        let now_us = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        let oldest = rows.iter().map(|r| r.accepted_at_us).min();
        m.outbox_oldest_age
            .set(oldest.map_or(0, |t| (now_us - t).max(0) / 1_000_000));
    }
    if let Ok(list) = admin.store.undeliverable().await {
        m.undeliverable.set(list.len() as i64);
    }
    if let Ok(terminals) = admin.store.terminals().await {
        let active: Vec<&TerminalRecord> = terminals
            .iter()
            .map(|(t, _)| t)
            .filter(|t| t.revoked_at.is_none())
            .collect();
        m.terminals_registered.set(active.len() as i64);
        let ca_end = admin.fleet.pki.ca_not_after();
        let earliest = active.iter().map(|t| t.cert_expiry().min(ca_end)).min();
        m.terminal_cert_earliest_expiry
            .set(earliest.map_or(f64::INFINITY, |t| t.unix_timestamp() as f64));
        m.terminal_cert_renewals_pending
            .set(active.iter().filter(|t| t.previous_cert.is_some()).count() as i64);
    }
    if let Ok(presence) = admin.fleet.presence.read() {
        m.terminals_online
            .set(presence.values().filter(|p| p.online).count() as i64);
    }
    m.broker_connections.set((admin.fleet.connections)());
    m.store_healthy.set(i64::from(admin.store.is_healthy()));
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        m.open_fds.set(fds.count() as i64);
    }
    // `None`: unlimited.
    if let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        m.max_fds.set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    if let Some(dir) = admin.store.path().parent()
        && let Ok(fs) = rustix::fs::statvfs(dir)
    {
        let block = i64::try_from(fs.f_frsize).unwrap_or(i64::MAX);
        let blocks = |n: u64| i64::try_from(n).unwrap_or(i64::MAX).saturating_mul(block);
        m.data_dir_free.set(blocks(fs.f_bavail));
        m.data_dir_size.set(blocks(fs.f_blocks));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.encode(),
    )
        .into_response()
}

pub(crate) fn store_error(e: &StoreError) -> Response {
    tracing::error!(error = %e, error_chain = ?e, "admin read failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the store could not be read",
    )
}

/// The admin view of an intent.
fn view(intent: &StoredIntent) -> serde_json::Value {
    let r = &intent.record;
    serde_json::json!({
        "id": r.id,
        "status": r.status.as_str(),
        "contexts": r.contexts,
        "amount": r.expected_micros.to_string(),
        "amount_micros": r.expected_micros.0,
        "received": r.received_micros.to_string(),
        "received_micros": r.received_micros.0,
        "currency": r.currency,
        "terminal_id": r.terminal_id,
        "order_id": r.order_id,
        "merchant_id": r.merchant_id,
        "payment_address": r.payment_address,
        "expires_at": r.expires_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        "tx_hash": r.tx_hash,
        "transactions": r.txns,
        "events": intent.events,
        "created_at": intent.created_at.format(&time::format_description::well_known::Rfc3339).ok(),
        "updated_at": intent.updated_at.format(&time::format_description::well_known::Rfc3339).ok(),
    })
}

async fn get_intent(State(admin): State<Arc<Admin>>, UrlPath(id): UrlPath<String>) -> Response {
    match admin.store.intent(id).await {
        Ok(Some(intent)) => Json(view(&intent)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "no such payment intent"),
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    terminal_id: Option<String>,
    limit: Option<String>,
    starting_after: Option<String>,
}

async fn list_intents(State(admin): State<Arc<Admin>>, Query(q): Query<ListQuery>) -> Response {
    let status = match q.status.as_deref().map(|s| IntentStatus::parse(s).ok_or(s)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                "status: unknown status",
            );
        }
    };
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => 50,
        Some(Ok(n)) if (1..=500).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                "limit: must be 1 to 500",
            );
        }
    };
    let filter = IntentFilter {
        status,
        terminal_id: q.terminal_id,
        starting_after: q.starting_after,
        limit,
    };
    match admin.store.list_intents(filter).await {
        Ok((page, has_more)) => {
            let data: Vec<_> = page.iter().map(view).collect();
            Json(serde_json::json!({ "object": "list", "data": data, "has_more": has_more }))
                .into_response()
        }
        Err(e) => store_error(&e),
    }
}
